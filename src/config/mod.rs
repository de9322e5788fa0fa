//! Configuration: TOML file → serde shape (`file`) → validation → [`Config`].
//!
//! Every error names the file, line, column and key. Relative paths are resolved against the
//! config file's directory. With no file at all, [`Config::embedded_default`] gives a working
//! daemon on 127.0.0.1:8443 with a self-signed certificate.

mod file;

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use crate::proxy_protocol::ProxyVersion;

/// Where the embedded default listens.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
const MIN_TIMEOUT: Duration = Duration::from_millis(1);
const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);
const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
const DEFAULT_MAX_UNROUTED_PER_IP: u32 = 64;
const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 256;
const DEFAULT_SPLICE_PIPES: u32 = 64;

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
}

/// The admin listener's address when `[admin]` sets none.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

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
            listen_address: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
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
    fn as_str(self) -> &'static str {
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
    fn as_str(self) -> &'static str {
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

/// Where in the config file something is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Location {
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// 1-based column (0 when unknown).
    pub col: usize,
    /// The dotted key, e.g. `routes.http.upstream`.
    pub key: String,
}

/// A configuration error.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read config: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but is wrong.
    #[error("{}", fmt_invalid(file.as_deref(), at, message))]
    Invalid {
        /// The file, if the config came from one.
        file: Option<PathBuf>,
        /// Where.
        at: Location,
        /// What is wrong.
        message: String,
    },
}

fn fmt_invalid(file: Option<&Path>, at: &Location, message: &str) -> String {
    let file = file.map_or_else(
        || "<built-in config>".to_string(),
        |f| f.display().to_string(),
    );
    let mut s = file;
    if at.line > 0 {
        s.push_str(&format!(":{}:{}", at.line, at.col));
    }
    s.push_str(": ");
    if !at.key.is_empty() {
        s.push_str(&format!("{}: ", at.key));
    }
    s.push_str(message);
    s
}

impl ConfigError {
    /// An error about the value at `at` in the file `file`.
    pub fn at(file: Option<&Path>, at: &Location, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            file: file.map(Path::to_path_buf),
            at: at.clone(),
            message: message.into(),
        }
    }
}

impl Config {
    /// The configuration used when no file is given.
    pub fn embedded_default() -> Config {
        let listen = DEFAULT_LISTEN.parse().expect("constant address parses");
        Config {
            source: None,
            listen: vec![listen],
            state_dir: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            threads: None,
            tls: TlsSettings {
                cert: CertSource::SelfSigned,
                sni: Vec::new(),
                handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
                poll_interval: Duration::from_secs(2),
                client_ca: None,
            },
            detect: DetectSettings {
                timeout: DEFAULT_DETECT_TIMEOUT,
                on_timeout: Fallback::Route(RouteKind::Ssh),
                on_unknown: Fallback::Close,
            },
            limits: Limits {
                max_connections: DEFAULT_MAX_CONNECTIONS,
                max_unrouted_per_ip: DEFAULT_MAX_UNROUTED_PER_IP,
                max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
                splice_pipes: DEFAULT_SPLICE_PIPES,
            },
            http: Route::default_for(RouteKind::Http),
            ssh: Route::default_for(RouteKind::Ssh),
            embedded_ssh: SshSettings::default(),
            trusted_proxies: Vec::new(),
            proxy_header: ProxyHeader::Required,
            dns: crate::resolve::DnsSettings::default(),
            admin: None,
        }
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::parse(&text, Some(path), &base)
    }

    /// Parses and validates `text`; `file` is used in messages, `base` resolves relative paths.
    pub fn parse(text: &str, file: Option<&Path>, base: &Path) -> Result<Config, ConfigError> {
        let raw: file::File = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| locate(text, s)).unwrap_or_default();
            ConfigError::at(file, &at, e.message().trim().to_string())
        })?;
        Validator { text, file, base }.validate(raw)
    }

    /// The route of this kind.
    pub fn route(&self, kind: RouteKind) -> &Route {
        match kind {
            RouteKind::Http => &self.http,
            RouteKind::Ssh => &self.ssh,
        }
    }

    /// ALPN protocols offered in the handshake, most preferred first.
    pub fn alpn_offered(&self) -> Vec<Vec<u8>> {
        // h2 before http/1.1 so that clients offering both get h2 when the upstream speaks it.
        let mut http = self.http.alpn.clone();
        http.sort_by_key(|p| p != "h2");
        http.iter()
            .chain(self.ssh.alpn.iter())
            .map(|p| p.as_bytes().to_vec())
            .collect()
    }

    /// The routing table, as `sluice check` prints it.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        let listen: Vec<String> = self.listen.iter().map(ToString::to_string).collect();
        s.push_str(&format!("listen        {}\n", listen.join(", ")));
        match &self.tls.cert {
            CertSource::Files { cert, key } => s.push_str(&format!(
                "tls           cert {} key {}\n",
                cert.path.display(),
                key.path.display()
            )),
            CertSource::SelfSigned => {
                s.push_str("tls           self-signed certificate in the state directory\n")
            }
        }
        for c in &self.tls.sni {
            s.push_str(&format!(
                "tls sni       {} -> cert {}\n",
                c.names.join(", "),
                c.cert.path.display()
            ));
        }
        if !self.trusted_proxies.is_empty() {
            s.push_str(&format!(
                "proxy in      PROXY header {} from {} trusted address range(s)\n",
                self.proxy_header.as_str(),
                self.trusted_proxies.len()
            ));
        }
        if let Some(a) = self.admin {
            s.push_str(&format!(
                "admin         http://{a}/ (livez, readyz, metrics)\n"
            ));
        }
        let alpn: Vec<String> = self
            .alpn_offered()
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        s.push_str(&format!("alpn offered  {}\n", alpn.join(", ")));
        s.push_str(&format!(
            "detect        alpn, then sni, then first bytes within {}; silent -> {}; unknown -> {}\n",
            humantime::format_duration(self.detect.timeout),
            self.detect.on_timeout,
            self.detect.on_unknown
        ));
        for r in [&self.ssh, &self.http] {
            s.push_str(&format!(
                "route {:<7} -> {}\n",
                r.kind.as_str(),
                r.target_description()
            ));
            if r.require_client_cert {
                s.push_str("              requires a client certificate from tls.client_ca\n");
            }
            s.push_str(&format!(
                "              alpn [{}]  sni [{}]  plaintext {}  idle {}  half-closed {}\n",
                r.alpn.join(", "),
                r.sni.join(", "),
                r.plaintext.as_str(),
                humantime::format_duration(r.idle_timeout),
                humantime::format_duration(r.half_closed_timeout.min(r.idle_timeout))
            ));
        }
        s.push_str(&format!(
            "limits        {} connections, {} per client, {} unrouted per client, handshake {}, shutdown grace {}\n",
            self.limits.max_connections,
            self.limits.max_connections_per_ip,
            self.limits.max_unrouted_per_ip,
            humantime::format_duration(self.tls.handshake_timeout),
            humantime::format_duration(self.shutdown_grace)
        ));
        s
    }
}

impl Route {
    /// The relay's idle limits on this route.
    pub fn idle(&self) -> crate::relay::Idle {
        crate::relay::Idle {
            open: self.idle_timeout,
            half_closed: self.half_closed_timeout,
        }
    }

    fn default_for(kind: RouteKind) -> Route {
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

fn default_alpn(kind: RouteKind, h2: bool) -> Vec<String> {
    match kind {
        RouteKind::Http if h2 => vec!["h2".into(), "http/1.1".into()],
        RouteKind::Http => vec!["http/1.1".into()],
        RouteKind::Ssh => vec!["ssh".into()],
    }
}

/// Replaces each `${NAME}` in `text` with the variable's value; an unset or empty variable,
/// or an unclosed `${`, is an error naming it.
pub(crate) fn expand_env(
    text: &str,
    lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("`${{` without a closing `}}` in `{text}`"));
        };
        let name = &after[..end];
        match lookup(name).filter(|v| !v.is_empty()) {
            Some(v) => out.push_str(&v.to_string_lossy()),
            None => {
                return Err(format!(
                    "`${{{name}}}` is not set{}",
                    if name == "CREDENTIALS_DIRECTORY" {
                        " (systemd sets it for units with LoadCredential=)"
                    } else {
                        ""
                    }
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// 1-based line and column of a byte offset, plus the dotted key being defined there.
fn locate(text: &str, span: Range<usize>) -> Location {
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    Location {
        line,
        col,
        key: key_at(text, line_start),
    }
}

/// The dotted key of the assignment on the line starting at `line_start`, with its table.
fn key_at(text: &str, line_start: usize) -> String {
    let line = text[line_start..].lines().next().unwrap_or("");
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let trimmed = line.trim_start();
    let key = if trimmed.starts_with('[') {
        return trimmed
            .trim_end()
            .trim_matches(|c| c == '[' || c == ']')
            .trim()
            .to_string();
    } else {
        trimmed
            .split('=')
            .next()
            .filter(|_| trimmed.contains('='))
            .map(|k| k.trim().trim_matches('"').to_string())
    };
    match (table, key) {
        (Some(t), Some(k)) => format!("{t}.{k}"),
        (None, Some(k)) => k,
        (Some(t), None) => t,
        (None, None) => String::new(),
    }
}

struct Validator<'a> {
    text: &'a str,
    file: Option<&'a Path>,
    base: &'a Path,
}

impl Validator<'_> {
    fn loc(&self, span: Range<usize>) -> Location {
        locate(self.text, span)
    }

    fn err<T>(&self, span: Range<usize>, message: impl Into<String>) -> Result<T, ConfigError> {
        Err(ConfigError::at(self.file, &self.loc(span), message))
    }

    /// A path, `${VAR}` expanded from the environment (systemd's `${CREDENTIALS_DIRECTORY}`,
    /// `${STATE_DIRECTORY}`), relative ones resolved against the config file's directory.
    fn path(&self, p: &Spanned<PathBuf>) -> Result<ConfigPath, ConfigError> {
        let expanded = match p.get_ref().to_str() {
            Some(text) if text.contains("${") => PathBuf::from(
                expand_env(text, |v| std::env::var_os(v)).or_else(|m| self.err(p.span(), m))?,
            ),
            _ => p.get_ref().clone(),
        };
        let path = if expanded.is_absolute() {
            expanded
        } else {
            self.base.join(expanded)
        };
        Ok(ConfigPath {
            path,
            at: self.loc(p.span()),
        })
    }

    fn validate(&self, raw: file::File) -> Result<Config, ConfigError> {
        let mut cfg = Config::embedded_default();
        cfg.source = self.file.map(Path::to_path_buf);

        if let Some(listen) = &raw.listen {
            if listen.get_ref().is_empty() {
                return self.err(
                    listen.span(),
                    "needs at least one address, e.g. [\"0.0.0.0:443\", \"[::]:443\"]",
                );
            }
            cfg.listen.clear();
            for a in listen.get_ref() {
                match a.get_ref().parse::<SocketAddr>() {
                    Ok(addr) => cfg.listen.push(addr),
                    Err(_) => {
                        return self.err(a.span(), format!("`{}` is not an IP address and port, e.g. \"0.0.0.0:443\" or \"[::]:443\"", a.get_ref()))
                    }
                }
            }
        }
        cfg.state_dir = match &raw.state_dir {
            Some(p) => Some(self.path(p)?.path),
            None => None,
        };
        if let Some(g) = &raw.shutdown_grace {
            cfg.shutdown_grace = self.duration(g, Duration::ZERO, DAY)?;
        }
        if let Some(t) = &raw.threads {
            if !(1..=1024).contains(t.get_ref()) {
                return self.err(t.span(), "must be between 1 and 1024");
            }
            cfg.threads = Some(*t.get_ref());
        }

        if let Some(tls) = &raw.tls {
            let t = tls.get_ref();
            cfg.tls.cert = match (&t.cert, &t.key) {
                (Some(c), Some(k)) => CertSource::Files {
                    cert: self.path(c)?,
                    key: self.path(k)?,
                },
                (None, None) => CertSource::SelfSigned,
                (Some(_), None) | (None, Some(_)) => {
                    return self.err(
                        tls.span(),
                        "set both `cert` and `key`, or neither for a self-signed certificate",
                    )
                }
            };
            if let Some(h) = &t.handshake_timeout {
                cfg.tls.handshake_timeout = self.duration(h, MIN_TIMEOUT, 5 * MINUTE)?;
            }
            if let Some(p) = &t.poll_interval {
                cfg.tls.poll_interval =
                    self.duration(p, Duration::from_millis(100), 60 * MINUTE)?;
            }
            cfg.tls.client_ca = match &t.client_ca {
                Some(p) => Some(self.path(p)?),
                None => None,
            };
            let mut seen = std::collections::HashSet::new();
            for s in &t.sni {
                let sc = s.get_ref();
                if sc.names.get_ref().is_empty() {
                    return self.err(sc.names.span(), "list at least one server name");
                }
                let mut names = Vec::new();
                for n in sc.names.get_ref() {
                    let name = self.server_name(n)?;
                    if !seen.insert(name.clone()) {
                        return self.err(
                            n.span(),
                            format!("`{name}` is already listed for another certificate"),
                        );
                    }
                    names.push(name);
                }
                cfg.tls.sni.push(SniCert {
                    names,
                    cert: self.path(&sc.cert)?,
                    key: self.path(&sc.key)?,
                });
            }
        }

        if let Some(t) = &raw.detect.timeout {
            cfg.detect.timeout = self.duration(t, MIN_TIMEOUT, 5 * MINUTE)?;
        }
        if let Some(f) = &raw.detect.on_timeout {
            cfg.detect.on_timeout = self.fallback(f)?;
        }
        if let Some(f) = &raw.detect.on_unknown {
            cfg.detect.on_unknown = self.fallback(f)?;
        }

        if let Some(m) = &raw.limits.max_connections {
            if *m.get_ref() == 0 {
                return self.err(m.span(), "must be at least 1");
            }
            cfg.limits.max_connections = *m.get_ref();
        }
        if let Some(m) = &raw.limits.max_unrouted_per_ip {
            if *m.get_ref() == 0 {
                return self.err(m.span(), "must be at least 1");
            }
            cfg.limits.max_unrouted_per_ip = *m.get_ref();
        }
        if let Some(m) = &raw.limits.splice_pipes {
            cfg.limits.splice_pipes = *m.get_ref();
        }
        if let Some(m) = &raw.limits.max_connections_per_ip {
            if *m.get_ref() == 0 {
                return self.err(m.span(), "must be at least 1");
            }
            cfg.limits.max_connections_per_ip = *m.get_ref();
        }

        if let Some(r) = &raw.routes.http {
            cfg.http = self.route(RouteKind::Http, r)?;
        }
        if let Some(r) = &raw.routes.ssh {
            cfg.ssh = self.route(RouteKind::Ssh, r)?;
        }
        for r in [&raw.routes.http, &raw.routes.ssh].into_iter().flatten() {
            if let Some(req) = r.require_client_cert.as_ref().filter(|v| *v.get_ref()) {
                if cfg.tls.client_ca.is_none() {
                    return self.err(
                        req.span(),
                        "needs [tls] client_ca, the CA that signs client certificates",
                    );
                }
            }
        }
        // An SNI name or ALPN id bound to both routes would make the choice arbitrary.
        for n in &cfg.http.sni {
            if cfg.ssh.sni.contains(n) {
                let span = raw
                    .routes
                    .ssh
                    .as_ref()
                    .and_then(|r| r.sni.iter().find(|s| s.get_ref() == n))
                    .map(|s| s.span());
                return self.err(
                    span.unwrap_or(0..0),
                    format!("server name `{n}` is bound to both routes"),
                );
            }
        }
        for p in &cfg.http.alpn {
            if cfg.ssh.alpn.contains(p) {
                let span = raw
                    .routes
                    .ssh
                    .as_ref()
                    .and_then(|r| r.alpn.as_ref())
                    .map(|s| s.span());
                return self.err(
                    span.unwrap_or(0..0),
                    format!("ALPN `{p}` is bound to both routes"),
                );
            }
        }
        if let Some(ssh) = &raw.ssh {
            if cfg.ssh.upstream.is_some() {
                return self.err(ssh.span(), "[ssh] configures the embedded SSH server, but [routes.ssh] sends SSH to an upstream");
            }
            cfg.embedded_ssh = self.ssh(ssh.get_ref())?;
        }
        if let Some(dns) = &raw.dns {
            let dns = dns.get_ref();
            for s in &dns.servers {
                let text = s.get_ref();
                let addr = text.parse::<SocketAddr>().ok().or_else(|| {
                    text.parse::<std::net::IpAddr>()
                        .ok()
                        .map(|ip| SocketAddr::new(ip, 53))
                });
                match addr {
                    Some(a) => cfg.dns.servers.push(a),
                    None => {
                        return self.err(
                            s.span(),
                            format!("`{text}` is not a name server address, e.g. \"10.0.0.2\" or \"127.0.0.1:5353\""),
                        )
                    }
                }
            }
            if let Some(t) = &dns.timeout {
                cfg.dns.timeout = self.duration(t, MIN_TIMEOUT, MINUTE)?;
            }
        }
        if let Some(p) = &raw.proxy_header {
            cfg.proxy_header = match p.get_ref().as_str() {
                "required" => ProxyHeader::Required,
                "optional" => ProxyHeader::Optional,
                other => {
                    return self.err(
                        p.span(),
                        format!("`{other}` is not a PROXY header policy; expected \"required\" or \"optional\""),
                    )
                }
            };
            if raw.trusted_proxies.is_none() {
                return self.err(
                    p.span(),
                    "proxy_header applies to trusted_proxies, which is not set",
                );
            }
        }
        if let Some(list) = &raw.trusted_proxies {
            for c in list.get_ref() {
                match crate::net::Cidr::parse(c.get_ref()) {
                    Some(cidr) => cfg.trusted_proxies.push(cidr),
                    None => {
                        return self.err(
                            c.span(),
                            format!(
                                "`{}` is not an address or CIDR, e.g. \"10.0.0.0/8\"",
                                c.get_ref()
                            ),
                        )
                    }
                }
            }
        }
        if let Some(admin) = &raw.admin {
            cfg.admin = Some(match &admin.get_ref().listen {
                Some(l) => l.get_ref().parse().or_else(|_| {
                    self.err(
                        l.span(),
                        format!(
                            "`{}` is not an IP address and port, e.g. \"127.0.0.1:9090\"",
                            l.get_ref()
                        ),
                    )
                })?,
                None => DEFAULT_ADMIN_LISTEN
                    .parse()
                    .expect("constant address parses"),
            });
        }
        Ok(cfg)
    }

    fn ssh(&self, raw: &file::Ssh) -> Result<SshSettings, ConfigError> {
        let mut s = SshSettings {
            host_key: match &raw.host_key {
                Some(p) => Some(self.path(p)?.path),
                None => None,
            },
            ..SshSettings::default()
        };
        s.authorized_keys = raw
            .authorized_keys
            .iter()
            .map(|p| self.path(p))
            .collect::<Result<_, _>>()?;
        for p in &raw.permit_open {
            s.permit_open.push(
                crate::net::PermitOpen::parse(p.get_ref()).or_else(|m| self.err(p.span(), m))?,
            );
        }
        if let Some(a) = &raw.listen_address {
            s.listen_address = a.get_ref().parse().or_else(|_| {
                self.err(a.span(), format!("`{}` is not an IP address", a.get_ref()))
            })?;
        }
        if let Some(r) = &raw.listen_ports {
            s.listen_ports = crate::net::parse_port_range(r.get_ref()).map_or_else(
                || {
                    self.err(
                        r.span(),
                        format!("`{}` is not a port range like \"20000-25000\"", r.get_ref()),
                    )
                },
                Ok,
            )?;
        }
        s.socket_dir = match &raw.socket_dir {
            Some(p) => Some(self.path(p)?.path),
            None => None,
        };
        if let Some(t) = &raw.connect_timeout {
            s.connect_timeout = self.duration(t, MIN_TIMEOUT, 10 * MINUTE)?;
        }
        if let Some(t) = &raw.auth_timeout {
            s.auth_timeout = self.duration(t, Duration::from_secs(1), 10 * MINUTE)?;
        }
        if let Some(t) = &raw.keepalive_interval {
            s.keepalive_interval = self.duration(t, Duration::from_secs(1), 60 * MINUTE)?;
        }
        for c in &raw.penalty_exempt {
            s.penalty_exempt
                .push(crate::net::Cidr::parse(c.get_ref()).map_or_else(
                    || {
                        self.err(
                            c.span(),
                            format!("`{}` is not an address or CIDR", c.get_ref()),
                        )
                    },
                    Ok,
                )?);
        }
        if raw.max_auth_failures_per_ip.is_some() {
            tracing::warn!(
                "ssh.max_auth_failures_per_ip is deprecated and has no effect: failed logins no longer lock an address out, they slow its later failures down (a key that verifies always gets in); ssh.penalty_exempt lists addresses never slowed. Remove the setting."
            );
        }
        for (v, slot) in [
            (&raw.max_auth_attempts, &mut s.max_auth_attempts),
            (&raw.max_channels, &mut s.max_channels),
            (&raw.max_forwards, &mut s.max_forwards),
        ] {
            if let Some(v) = v {
                if *v.get_ref() == 0 {
                    return self.err(v.span(), "must be at least 1");
                }
                *slot = *v.get_ref();
            }
        }
        Ok(s)
    }

    /// A duration within `[min, max]`; bounds keep deadlines meaningful and `Instant` math safe.
    fn duration(
        &self,
        d: &Spanned<file::Dur>,
        min: Duration,
        max: Duration,
    ) -> Result<Duration, ConfigError> {
        let v = d.get_ref().0;
        if v < min || v > max {
            let fmt = |d: Duration| humantime::format_duration(d).to_string();
            return self.err(
                d.span(),
                format!(
                    "{} is out of range: use {} to {}",
                    fmt(v),
                    fmt(min),
                    fmt(max)
                ),
            );
        }
        Ok(v)
    }

    fn fallback(&self, f: &Spanned<String>) -> Result<Fallback, ConfigError> {
        match f.get_ref().as_str() {
            "ssh" => Ok(Fallback::Route(RouteKind::Ssh)),
            "http" => Ok(Fallback::Route(RouteKind::Http)),
            "close" => Ok(Fallback::Close),
            other => self.err(
                f.span(),
                format!("`{other}` is not a route; expected \"ssh\", \"http\" or \"close\""),
            ),
        }
    }

    fn server_name(&self, n: &Spanned<String>) -> Result<String, ConfigError> {
        let name = n.get_ref().trim_end_matches('.').to_ascii_lowercase();
        let plain = name.strip_prefix("*.").unwrap_or(&name);
        let ok = !plain.is_empty()
            && plain.len() <= 253
            && plain.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok {
            return self.err(
                n.span(),
                format!(
                    "`{}` is not a DNS name (wildcards only as `*.example.com`)",
                    n.get_ref()
                ),
            );
        }
        Ok(name)
    }

    fn route(&self, kind: RouteKind, r: &file::Route) -> Result<Route, ConfigError> {
        let mut route = Route::default_for(kind);
        if let Some(u) = &r.upstream {
            let addr = u.get_ref().trim();
            let valid = match addr.rsplit_once(':') {
                Some((host, port)) => {
                    !host.is_empty()
                        && port.parse::<u16>().is_ok_and(|p| p != 0)
                        && (!host.contains(':') || host.starts_with('['))
                }
                None => false,
            };
            if !valid {
                return self.err(u.span(), format!("`{addr}` is not host:port, e.g. \"127.0.0.1:8080\", \"[::1]:22\" or \"backend.internal:8080\""));
            }
            route.upstream = Some(Upstream {
                addr: addr.to_string(),
                proxy_protocol: r.proxy_protocol.as_ref().map(|p| *p.get_ref()),
                connect_timeout: match &r.connect_timeout {
                    Some(t) => self.duration(t, MIN_TIMEOUT, 10 * MINUTE)?,
                    None => DEFAULT_CONNECT_TIMEOUT,
                },
            });
        } else if let Some(span) = r
            .proxy_protocol
            .as_ref()
            .map(|p| p.span())
            .or(r.connect_timeout.as_ref().map(|t| t.span()))
        {
            return self.err(span, "only applies to an `upstream`, and none is set");
        }
        if let Some(t) = &r.idle_timeout {
            route.idle_timeout = self.duration(t, MIN_TIMEOUT, 30 * DAY)?;
        }
        if let Some(t) = &r.half_closed_timeout {
            route.half_closed_timeout = self.duration(t, MIN_TIMEOUT, 30 * DAY)?;
        }
        if let Some(p) = &r.plaintext {
            route.plaintext = match (p.get_ref().as_str(), kind) {
                ("accept", _) => Plaintext::Accept,
                ("reject", _) => Plaintext::Reject,
                ("redirect", RouteKind::Http) => Plaintext::Redirect,
                ("redirect", RouteKind::Ssh) => return self.err(p.span(), "\"redirect\" is for the http route only; use \"accept\" or \"reject\""),
                (other, _) => return self.err(p.span(), format!("`{other}` is not a plaintext policy; expected \"accept\", \"reject\" or \"redirect\"")),
            };
        }
        if let Some(req) = r.require_client_cert.as_ref().filter(|v| *v.get_ref()) {
            route.require_client_cert = true;
            // Without TLS there is no certificate: plaintext would walk around the requirement.
            match &r.plaintext {
                None => route.plaintext = Plaintext::Reject,
                Some(p) if route.plaintext != Plaintext::Reject => return self.err(
                    p.span(),
                    "a route that requires client certificates takes no plaintext; use \"reject\"",
                ),
                Some(_) => {}
            }
            let _ = req;
        }
        for n in &r.sni {
            route.sni.push(self.server_name(n)?);
        }
        match kind {
            RouteKind::Http => {
                if let Some(a) = &r.alpn {
                    return self.err(a.span(), "the http route's ALPN is http/1.1 (and h2 with `h2 = true`); it is not configurable");
                }
                let h2 = r.h2.as_ref().is_some_and(|h| *h.get_ref());
                if h2 && route.upstream.is_none() {
                    let span = r.h2.as_ref().map(|h| h.span()).unwrap_or(0..0);
                    return self.err(span, "h2 needs an `upstream` that speaks HTTP/2; the built-in status page speaks HTTP/1.1 only");
                }
                route.alpn = default_alpn(kind, h2);
            }
            RouteKind::Ssh => {
                if let Some(h) = &r.h2 {
                    return self.err(h.span(), "h2 is for the http route only");
                }
                if let Some(a) = &r.alpn {
                    route.alpn.clear();
                    for p in a.get_ref() {
                        let v = p.get_ref();
                        if v.is_empty() || v.len() > 255 {
                            return self.err(p.span(), "an ALPN id is 1 to 255 bytes");
                        }
                        if v == "http/1.1" || v == "h2" {
                            return self.err(p.span(), format!("`{v}` is HTTP's ALPN id"));
                        }
                        route.alpn.push(v.clone());
                    }
                }
            }
        }
        Ok(route)
    }
}

#[cfg(test)]
mod tests;
