//! Configuration: TOML file → serde shape (`file`) → validation (`validate`) → [`Config`]
//! (`types`); errors and their place in the file in `error`. This file loads, parses and
//! describes a config.
//!
//! Every error names the file, line, column and key. Relative paths are resolved against the
//! config file's directory. With no file at all, [`Config::embedded_default`] gives a working
//! daemon on 127.0.0.1:8443 with a self-signed certificate.

mod error;
mod file;
mod types;
mod validate;

use std::path::Path;
use std::time::Duration;

pub(crate) use error::locate;
pub use error::{ConfigError, Location};
pub use types::*;
use validate::Validator;

/// The tunnel domain of `sluice serve` without a config file: `*.localhost` resolves to the
/// loopback in curl and browsers, and `*.t.localhost` (unlike `*.localhost`, a wildcard over one
/// label, which no verifier accepts) can be in a certificate.
pub const DEMO_TUNNEL_DOMAIN: &str = "t.localhost";

impl Config {
    /// What `sluice serve` runs without a config file: the embedded default, plus tunnels at
    /// `NAME.t.localhost` that any admitted key may publish, and the running user's own
    /// `~/.ssh/authorized_keys` (under `home`) admitted when it exists. A config file gets
    /// none of this unless it says so.
    pub fn without_file(home: Option<&Path>) -> Config {
        let mut cfg = Config::embedded_default();
        let mut tunnels = TunnelSettings::with_domain(DEMO_TUNNEL_DOMAIN);
        tunnels.permit_listen = crate::net::PermitListen::parse("*:*").into_iter().collect();
        cfg.tunnels = Some(tunnels);
        if let Some(keys) = home
            .map(|h| h.join(".ssh/authorized_keys"))
            .filter(|p| p.is_file())
        {
            cfg.embedded_ssh.authorized_keys.push(ConfigPath {
                path: keys,
                at: Location::default(),
            });
        }
        cfg
    }

    /// The configuration a config file starts from.
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
                cipher_suites: None,
                min_version: TlsVersion::V1_2,
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
            tunnels: None,
            grants: None,
            control: ControlSettings::default(),
            store: StoreSettings::default(),
            audit: None,
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
                s.push_str("tls           self-signed certificate in the state directory\n");
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
        if let Some(t) = &self.tunnels {
            s.push_str(&format!(
                "tunnels       ssh -R NAME:PORT:... publishes NAME; reached as NAME or NAME.{} with -W/-J/-L; at most {} names per key\n",
                t.domain, t.max_per_identity
            ));
            s.push_str(&format!(
                "              https://NAME.{}/ to NAME:80; {} visitors per tunnel; request head within {}; pooled channels idle {}\n",
                t.domain,
                t.max_visitors,
                humantime::format_duration(t.header_timeout),
                humantime::format_duration(t.pool_idle)
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

#[cfg(test)]
mod tests;
