//! The validated configuration's types and defaults.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use crate::proxy_protocol::ProxyVersion;

use super::error::Location;

/// Where the embedded default listens.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
pub(super) const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub(super) const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub(super) const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(2);
pub(super) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub(super) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
pub(super) const MIN_TIMEOUT: Duration = Duration::from_millis(1);
pub(super) const MINUTE: Duration = Duration::from_secs(60);
pub(super) const DAY: Duration = Duration::from_secs(86_400);
pub(super) const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
pub(super) const DEFAULT_MAX_UNROUTED_PER_IP: u32 = 64;
pub(super) const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 256;
pub(super) const DEFAULT_SPLICE_PIPES: u32 = 64;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, if any.
    pub source: Option<PathBuf>,
    /// Addresses to listen on.
    pub listen: Vec<SocketAddr>,
    /// Where generated state (the self-signed certificate, host keys) lives, if set explicitly.
    pub state_dir: Option<PathBuf>,
    /// How long open connections may finish after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// Threads that accept and serve connections; `None`: one per CPU.
    pub threads: Option<u32>,
    /// TLS settings.
    pub tls: TlsSettings,
    /// Detection settings.
    pub detect: DetectSettings,
    /// Connection limits.
    pub limits: Limits,
    /// The HTTP route.
    pub http: Route,
    /// The SSH route.
    pub ssh: Route,
    /// `[ssh]`: the embedded SSH server (used when the ssh route has no upstream).
    pub embedded_ssh: SshSettings,
    /// Load balancers whose PROXY protocol header (v1 or v2) is accepted; from anyone else a
    /// header is refused.
    pub trusted_proxies: Vec<crate::net::Cidr>,
    /// Whether a connection from `trusted_proxies` must start with a PROXY header.
    pub proxy_header: ProxyHeader,
    /// `[admin]`: where `/livez`, `/readyz` and `/metrics` are served; `None`: nowhere.
    pub admin: Option<SocketAddr>,
    /// `[dns]`: name servers and timeout for upstream and forward-target names.
    pub dns: crate::resolve::DnsSettings,
    /// `[tunnels]`: services published by name through the embedded SSH server.
    pub tunnels: Option<TunnelSettings>,
    /// `[grants]`: access grants for devices (sluice's own user CA, the control API).
    pub grants: Option<GrantSettings>,
    /// `[control]`: where the control API listens (with `[grants]`).
    pub control: ControlSettings,
    /// `[store]`: SQLite in the state directory, or Redis.
    pub store: StoreSettings,
    /// `[audit]`: the audit trail; `None`: none.
    pub audit: Option<AuditSettings>,
}

/// `[audit]`: where the trail is written and when a file is rotated.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditSettings {
    /// The directory; `None`: `audit` in the state directory.
    pub dir: Option<PathBuf>,
    /// A file is rotated once it reaches this size.
    pub max_bytes: u64,
    /// A file is also rotated when the UTC day changes.
    pub rotate_daily: bool,
    /// What happens to new SSH sessions while the trail cannot be written.
    pub on_failure: AuditFailure,
}

/// `[audit] on_failure`: what a trail that cannot be written does to new sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuditFailure {
    /// Serve on; the failure is logged and counted (`sluice_audit_failures_total`).
    #[default]
    Continue,
    /// Refuse new SSH sessions until a write succeeds again (live ones go on).
    Refuse,
}

impl AuditSettings {
    /// `[audit]` with every default, in `dir` (or the state directory's `audit`).
    pub fn defaults(dir: Option<PathBuf>) -> AuditSettings {
        AuditSettings {
            dir,
            max_bytes: 64 << 20,
            rotate_daily: true,
            on_failure: AuditFailure::Continue,
        }
    }
}

/// `[store]`: where tunnel names and grants are kept.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreSettings {
    /// `redis://[user:password@]host[:port][/db]` or `redis+unix:///path`; `None`:
    /// `sluice.db` in the state directory.
    pub redis: Option<String>,
    /// The prefix of every key sluice writes in Redis.
    pub prefix: String,
    /// How long one Redis call may take (connect, read, write).
    pub timeout: Duration,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            redis: None,
            prefix: "sluice:".into(),
            timeout: Duration::from_secs(2),
        }
    }
}

/// `[control]`: the control API's unix socket, and optionally TCP with TLS and bearer tokens.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ControlSettings {
    /// The unix socket; `None`: `control.sock` in the state directory.
    pub socket: Option<PathBuf>,
    /// TCP with TLS (the `[tls]` certificates), for callers on other machines.
    pub listen: Option<SocketAddr>,
    /// The bearer tokens file (`NAME TOKEN` lines); required with `listen`.
    pub tokens: Option<PathBuf>,
}

/// `[grants]`: short-lived certificates that let one device publish one port and one name.
#[derive(Debug, Clone, PartialEq)]
pub struct GrantSettings {
    /// The longest TTL a grant may have.
    pub max_ttl: Duration,
    /// The TTL of a grant that asks for none.
    pub default_ttl: Duration,
    /// The CA key that signs grant certificates; `None`: `ssh_user_ca` in the state directory.
    pub ca_key: Option<PathBuf>,
    /// `HOST[:PORT]` devices dial, for the ssh command a grant comes with; `None`: the first
    /// listen address.
    pub server: Option<String>,
}

impl Default for GrantSettings {
    fn default() -> Self {
        GrantSettings {
            max_ttl: Duration::from_secs(24 * 3600),
            default_ttl: Duration::from_secs(3600),
            ca_key: None,
            server: None,
        }
    }
}

/// `[tunnels]`: names published with `ssh -R NAME:PORT:...`.
#[derive(Debug, Clone, PartialEq)]
pub struct TunnelSettings {
    /// Visitors reach tunnel NAME at `NAME.<domain>` (lower case, no trailing dot).
    pub domain: String,
    /// Names one identity may hold at once (published or kept for it).
    pub max_per_identity: u32,
    /// How long an HTTPS visitor may take to send a request head (and a keep-alive
    /// connection may wait for its next one).
    pub header_timeout: Duration,
    /// HTTPS visitor connections at once per tunnel name.
    pub max_visitors: u32,
    /// How long a channel to a publisher stays pooled unused.
    pub pool_idle: Duration,
    /// Names any key without a `permitlisten` of its own may publish (`NAME-GLOB:PORT`).
    pub permit_listen: Vec<crate::net::PermitListen>,
    /// `[[tunnels.private]]`: names whose visitors must authenticate; the first match decides.
    pub private: Vec<PrivateTunnels>,
}

/// Tunnel names whose HTTPS visitors must show a client certificate, HTTP Basic credentials
/// from an htpasswd file (bcrypt), or both when both are set.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivateTunnels {
    /// Name globs (`admin-*`).
    pub names: Vec<String>,
    /// An htpasswd file of bcrypt entries (`htpasswd -B`).
    pub htpasswd: Option<ConfigPath>,
    /// A client certificate from `[tls] client_ca` is required.
    pub client_cert: bool,
}

impl PrivateTunnels {
    /// Whether this entry covers tunnel `name`.
    pub fn covers(&self, name: &str) -> bool {
        self.names.iter().any(|g| crate::net::glob(g, name))
    }
}

impl TunnelSettings {
    /// `[tunnels]` with `domain` and every other key at its default.
    pub fn with_domain(domain: &str) -> TunnelSettings {
        TunnelSettings {
            domain: domain.to_string(),
            max_per_identity: 16,
            header_timeout: Duration::from_secs(10),
            max_visitors: 256,
            pool_idle: Duration::from_secs(30),
            permit_listen: Vec::new(),
            private: Vec::new(),
        }
    }
}

/// The admin listener's address when `[admin]` sets none.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9090));

/// `[ssh]`: the embedded SSH server.
#[derive(Debug, Clone, PartialEq)]
pub struct SshSettings {
    /// The Ed25519 host key; `None`: `ssh_host_ed25519_key` in the state directory.
    pub host_key: Option<PathBuf>,
    /// authorized_keys files (OpenSSH format, with options and cert-authority lines).
    pub authorized_keys: Vec<ConfigPath>,
    /// Targets `-W`/`-L`/`-J` may reach. Empty: none (deny by default).
    pub permit_open: Vec<crate::net::PermitOpen>,
    /// Where `-R` listeners bind.
    pub listen_address: std::net::IpAddr,
    /// Ports `-R` may bind.
    pub listen_ports: std::ops::RangeInclusive<u16>,
    /// Where `ssh -R /name:...` sockets go; `None`: `sockets` in the state directory.
    pub socket_dir: Option<PathBuf>,
    /// Deadline for connecting to a `-W`/`-L` target.
    pub connect_timeout: Duration,
    /// How long a client may take to authenticate.
    pub auth_timeout: Duration,
    /// Authentication attempts per connection.
    pub max_auth_attempts: u32,
    /// Open channels per session.
    pub max_channels: u32,
    /// `-R` forwards per session.
    pub max_forwards: u32,
    /// Keepalive interval; three unanswered ones end the session.
    pub keepalive_interval: Duration,
    /// Client addresses whose failed logins are never penalised (see `ssh::penalty`).
    pub penalty_exempt: Vec<crate::net::Cidr>,
}

impl Default for SshSettings {
    fn default() -> Self {
        SshSettings {
            host_key: None,
            authorized_keys: Vec::new(),
            permit_open: Vec::new(),
            listen_address: std::net::IpAddr::V4(Ipv4Addr::LOCALHOST),
            listen_ports: 20000..=25000,
            socket_dir: None,
            connect_timeout: Duration::from_secs(10),
            auth_timeout: Duration::from_secs(30),
            max_auth_attempts: 6,
            max_channels: 32,
            max_forwards: 8,
            keepalive_interval: Duration::from_secs(30),
            penalty_exempt: Vec::new(),
        }
    }
}

/// A path from the config file, with where it was written (for errors found when loading it).
#[derive(Debug, Clone)]
pub struct ConfigPath {
    /// The resolved path.
    pub path: PathBuf,
    /// Where the key stands in the file.
    pub at: Location,
}

/// Two config paths are the same when they name the same file, wherever they were written.
impl PartialEq for ConfigPath {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path
    }
}

/// The certificate and key served by default.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// PEM files named in `[tls]`.
    Files {
        /// The certificate chain, leaf first.
        cert: ConfigPath,
        /// The private key (PKCS#8, PKCS#1 or SEC1).
        key: ConfigPath,
    },
    /// A self-signed certificate made on first start in the state directory.
    SelfSigned,
}

/// An extra certificate chosen by SNI.
#[derive(Debug, Clone)]
pub struct SniCert {
    /// Server names it is served for (exact, or `*.example.com`).
    pub names: Vec<String>,
    /// The certificate chain.
    pub cert: ConfigPath,
    /// The private key.
    pub key: ConfigPath,
}

/// `[tls]`.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// The default certificate.
    pub cert: CertSource,
    /// Extra certificates by SNI.
    pub sni: Vec<SniCert>,
    /// Deadline for the whole TLS handshake.
    pub handshake_timeout: Duration,
    /// CA certificates for client certificates; clients may present one, routes may require it.
    pub client_ca: Option<ConfigPath>,
    /// How often certificate files are checked for new content (besides inotify and SIGHUP).
    pub poll_interval: Duration,
    /// The cipher suites offered, in the server's order of preference; `None`: sluice's
    /// order for this CPU (`tls::default_suites`).
    pub cipher_suites: Option<Vec<rustls::CipherSuite>>,
    /// The oldest TLS version accepted.
    pub min_version: TlsVersion,
}

/// `[tls] min_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    V1_2,
    /// TLS 1.3 only.
    V1_3,
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        })
    }
}

/// The cipher suites sluice can offer (all of rustls's aws-lc-rs provider), each with the
/// names `[tls] cipher_suites` accepts: rustls's (IANA's for TLS 1.2) and OpenSSL's.
pub const CIPHER_SUITES: &[(rustls::CipherSuite, &str, &str)] = {
    use rustls::CipherSuite as C;
    &[
        (
            C::TLS13_AES_128_GCM_SHA256,
            "TLS13_AES_128_GCM_SHA256",
            "TLS_AES_128_GCM_SHA256",
        ),
        (
            C::TLS13_AES_256_GCM_SHA384,
            "TLS13_AES_256_GCM_SHA384",
            "TLS_AES_256_GCM_SHA384",
        ),
        (
            C::TLS13_CHACHA20_POLY1305_SHA256,
            "TLS13_CHACHA20_POLY1305_SHA256",
            "TLS_CHACHA20_POLY1305_SHA256",
        ),
        (
            C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
        ),
        (
            C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            "ECDHE-ECDSA-AES256-GCM-SHA384",
        ),
        (
            C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
            "ECDHE-ECDSA-CHACHA20-POLY1305",
        ),
        (
            C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
            "ECDHE-RSA-AES128-GCM-SHA256",
        ),
        (
            C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
            "ECDHE-RSA-AES256-GCM-SHA384",
        ),
        (
            C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
            "ECDHE-RSA-CHACHA20-POLY1305",
        ),
    ]
};

/// The suite `name` (either spelling, any case) stands for.
pub fn cipher_suite_by_name(name: &str) -> Option<rustls::CipherSuite> {
    CIPHER_SUITES
        .iter()
        .find(|(_, a, b)| a.eq_ignore_ascii_case(name) || b.eq_ignore_ascii_case(name))
        .map(|(s, _, _)| *s)
}

/// rustls's name of `suite` (as logged at start).
pub fn cipher_suite_name(suite: rustls::CipherSuite) -> &'static str {
    CIPHER_SUITES
        .iter()
        .find(|(s, _, _)| *s == suite)
        .map_or("unknown", |(_, name, _)| *name)
}

/// Whether `suite` is a TLS 1.3 suite.
pub fn is_tls13_suite(suite: rustls::CipherSuite) -> bool {
    cipher_suite_name(suite).starts_with("TLS13_")
}

/// What to do with a connection that detection could not place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Send it to this route.
    Route(RouteKind),
    /// Close it.
    Close,
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fallback::Route(r) => f.write_str(r.as_str()),
            Fallback::Close => f.write_str("close"),
        }
    }
}

/// `[detect]`.
#[derive(Debug, Clone)]
pub struct DetectSettings {
    /// How long to wait for the client's first bytes.
    pub timeout: Duration,
    /// Where a client that sends nothing within `timeout` goes.
    pub on_timeout: Fallback,
    /// Where bytes that match no protocol go.
    pub on_unknown: Fallback,
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Open connections at once, all phases.
    pub max_connections: u32,
    /// Connections per client IP (IPv6: per /64) still in handshake or detection.
    pub max_unrouted_per_ip: u32,
    /// Connections per client IP (IPv6: per /64), all phases.
    pub max_connections_per_ip: u32,
    /// Pipes for splice(2) on plain legs, two per connection; 0 turns splicing off.
    pub splice_pipes: u32,
}

/// The two kinds of route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteKind {
    /// HTTP (HTTP/1.x, and h2 when the upstream speaks it).
    Http,
    /// SSH.
    Ssh,
}

impl RouteKind {
    /// The route's name in the config and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Http => "http",
            RouteKind::Ssh => "ssh",
        }
    }
}

/// What a connection from a trusted proxy must send first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A PROXY header, or the connection is closed. The default: otherwise any host in the
    /// trusted range could connect directly, send its own header, and pick the client address
    /// that limits, `from=`, `source-address` and lockouts see.
    Required,
    /// A header if one comes; without one, the socket's address stands (a range that holds both
    /// load balancers and ordinary clients).
    Optional,
}

impl ProxyHeader {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            ProxyHeader::Required => "required",
            ProxyHeader::Optional => "optional",
        }
    }
}

/// What a route does with a connection that arrives without TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plaintext {
    /// Serve it like a TLS one.
    Accept,
    /// Close it.
    Reject,
    /// HTTP only: answer with a 308 redirect to the same URL over https.
    Redirect,
}

impl Plaintext {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Plaintext::Accept => "accept",
            Plaintext::Reject => "reject",
            Plaintext::Redirect => "redirect",
        }
    }
}

/// A backend reached over TCP.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `host:port`, resolved at connect time.
    pub addr: String,
    /// PROXY protocol header to send first, if any.
    pub proxy_protocol: Option<ProxyVersion>,
    /// Deadline for the TCP connect (all resolved addresses together).
    pub connect_timeout: Duration,
}

/// One route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Which route this is.
    pub kind: RouteKind,
    /// The backend; `None` means the built-in one (status page for http, embedded SSH server).
    pub upstream: Option<Upstream>,
    /// Plaintext policy.
    pub plaintext: Plaintext,
    /// SNI names bound to this route.
    pub sni: Vec<String>,
    /// ALPN protocol names that select this route (and are offered in the handshake).
    pub alpn: Vec<String>,
    /// Close a relayed connection after this long without bytes in either direction.
    pub idle_timeout: Duration,
    /// The same once one direction has finished (a half-closed connection); at most
    /// `idle_timeout` applies.
    pub half_closed_timeout: Duration,
    /// Only TLS clients with a certificate from `tls.client_ca` reach this route.
    pub require_client_cert: bool,
}

impl Route {
    /// The relay's idle limits on this route.
    pub fn idle(&self) -> crate::relay::Idle {
        crate::relay::Idle {
            open: self.idle_timeout,
            half_closed: self.half_closed_timeout,
        }
    }

    pub(super) fn default_for(kind: RouteKind) -> Route {
        Route {
            kind,
            upstream: None,
            plaintext: Plaintext::Accept,
            sni: Vec::new(),
            alpn: default_alpn(kind, false),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            half_closed_timeout: crate::relay::HALF_CLOSED_IDLE,
            require_client_cert: false,
        }
    }

    /// Where the route sends connections, for logs and `sluice check`.
    pub fn target_description(&self) -> String {
        match (&self.upstream, self.kind) {
            (Some(u), _) => {
                let mut s = format!(
                    "upstream {} (connect timeout {}",
                    u.addr,
                    humantime::format_duration(u.connect_timeout)
                );
                if let Some(p) = u.proxy_protocol {
                    s.push_str(&format!(", PROXY {}", p.as_str()));
                }
                s.push(')');
                s
            }
            (None, RouteKind::Http) => "built-in status page".to_string(),
            (None, RouteKind::Ssh) => "embedded SSH server".to_string(),
        }
    }
}

pub(super) fn default_alpn(kind: RouteKind, h2: bool) -> Vec<String> {
    match kind {
        RouteKind::Http if h2 => vec!["h2".into(), "http/1.1".into()],
        RouteKind::Http => vec!["http/1.1".into()],
        RouteKind::Ssh => vec!["ssh".into()],
    }
}
