//! From the serde shape (`file`) to a validated [`Config`](super::Config): every value
//! checked, relative paths resolved, `${VAR}` expanded, each error at its key. The
//! `[ssh]` table is checked in `ssh`, the routes and fallbacks in `route`.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::error::{locate, ConfigError, Location};
use super::file;
use super::types::*;

mod route;
mod ssh;

/// Replaces each `${NAME}` in `text` with the variable's value; an unset or empty variable,
/// or an unclosed `${`, is an error naming it.
pub(super) fn expand_env(
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

pub(super) struct Validator<'a> {
    pub(super) text: &'a str,
    pub(super) file: Option<&'a Path>,
    pub(super) base: &'a Path,
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

    pub(super) fn validate(&self, raw: file::File) -> Result<Config, ConfigError> {
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
            if let Some(v) = &t.min_version {
                cfg.tls.min_version = match v.get_ref().as_str() {
                    "1.2" => TlsVersion::V1_2,
                    "1.3" => TlsVersion::V1_3,
                    other => {
                        return self
                            .err(v.span(), format!("`{other}`: expected \"1.2\" or \"1.3\""))
                    }
                };
            }
            if let Some(list) = &t.cipher_suites {
                cfg.tls.cipher_suites = Some(self.cipher_suites(list, cfg.tls.min_version)?);
            }
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
        if let Some(spanned) = &raw.tunnels {
            if cfg.ssh.upstream.is_some() {
                return self.err(
                    spanned.span(),
                    "tunnels are carried by the embedded SSH server, but [routes.ssh] sends SSH to an upstream: remove its upstream or the [tunnels] table",
                );
            }
            let t = spanned.get_ref();
            let domain = self.server_name(&t.domain)?;
            if domain.starts_with("*.") {
                return self.err(
                    t.domain.span(),
                    "the tunnel domain is written without `*.`: tunnel NAME is reached at NAME.<domain>",
                );
            }
            let defaults = TunnelSettings::with_domain(&domain);
            let max_per_identity = match &t.max_per_identity {
                Some(n) if *n.get_ref() == 0 || *n.get_ref() > 10_000 => {
                    return self.err(n.span(), "must be 1 to 10000")
                }
                Some(n) => *n.get_ref(),
                None => defaults.max_per_identity,
            };
            let mut permit_listen = Vec::new();
            for p in &t.permit_listen {
                match crate::net::PermitListen::parse(p.get_ref()) {
                    Some(l) if l.names() => permit_listen.push(l),
                    _ => {
                        return self.err(
                            p.span(),
                            format!("`{}` is not a name pattern: use NAME:PORT, e.g. \"preview-*:80\" or \"myapp:*\"", p.get_ref()),
                        )
                    }
                }
            }
            let max_visitors = match &t.max_visitors {
                Some(n) if *n.get_ref() == 0 || *n.get_ref() > 1_000_000 => {
                    return self.err(n.span(), "must be 1 to 1000000")
                }
                Some(n) => *n.get_ref(),
                None => defaults.max_visitors,
            };
            let header_timeout = match &t.header_timeout {
                Some(d) => self.duration(d, MIN_TIMEOUT, 5 * MINUTE)?,
                None => defaults.header_timeout,
            };
            let pool_idle = match &t.pool_idle {
                Some(d) => self.duration(d, MIN_TIMEOUT, 60 * MINUTE)?,
                None => defaults.pool_idle,
            };
            let mut private = Vec::new();
            for p in &t.private {
                let e = p.get_ref();
                if e.names.is_empty() {
                    return self.err(
                        p.span(),
                        "`names` lists no tunnel names (globs such as \"admin-*\")",
                    );
                }
                let mut names = Vec::new();
                for n in &e.names {
                    let g = n.get_ref().to_ascii_lowercase();
                    let ok = !g.is_empty()
                        && g.bytes().all(|b| {
                            b.is_ascii_lowercase()
                                || b.is_ascii_digit()
                                || b == b'-'
                                || b == b'*'
                                || b == b'?'
                        });
                    if !ok {
                        return self.err(
                            n.span(),
                            format!(
                                "`{}` is not a tunnel name glob (letters, digits, -, * and ?)",
                                n.get_ref()
                            ),
                        );
                    }
                    names.push(g);
                }
                let client_cert = e.client_cert.as_ref().is_some_and(|c| *c.get_ref());
                if client_cert && cfg.tls.client_ca.is_none() {
                    let at = e.client_cert.as_ref().map_or(p.span(), |c| c.span());
                    return self.err(
                        at,
                        "needs [tls] client_ca, the CA that signs client certificates",
                    );
                }
                let htpasswd = match &e.htpasswd {
                    Some(h) => Some(self.path(h)?),
                    None => None,
                };
                if htpasswd.is_none() && !client_cert {
                    return self.err(
                        p.span(),
                        "a private tunnel needs `htpasswd`, `client_cert = true`, or both",
                    );
                }
                private.push(PrivateTunnels {
                    names,
                    htpasswd,
                    client_cert,
                });
            }
            cfg.tunnels = Some(TunnelSettings {
                private,
                domain,
                max_per_identity,
                header_timeout,
                max_visitors,
                pool_idle,
                permit_listen,
            });
        }
        if let Some(spanned) = &raw.grants {
            if cfg.ssh.upstream.is_some() {
                return self.err(
                    spanned.span(),
                    "grants are enforced by the embedded SSH server, but [routes.ssh] sends SSH to an upstream: remove its upstream or the [grants] table",
                );
            }
            let g = spanned.get_ref();
            let d = GrantSettings::default();
            let max_ttl = match &g.max_ttl {
                Some(t) => self.duration(t, Duration::from_secs(60), 366 * 24 * 60 * MINUTE)?,
                None => d.max_ttl,
            };
            let default_ttl = match &g.default_ttl {
                Some(t) => {
                    let v = self.duration(t, Duration::from_secs(60), 366 * 24 * 60 * MINUTE)?;
                    if v > max_ttl {
                        return self.err(t.span(), "longer than max_ttl");
                    }
                    v
                }
                None => d.default_ttl.min(max_ttl),
            };
            let ca_key = match &g.ca_key {
                Some(p) => Some(self.path(p)?.path),
                None => None,
            };
            let server = match &g.server {
                Some(s) => {
                    let text = s.get_ref().trim();
                    let host = match text.rsplit_once(':') {
                        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                            if p.parse::<u16>().map_or(true, |p| p == 0) {
                                return self
                                    .err(s.span(), format!("`{text}`: the port is not 1-65535"));
                            }
                            h
                        }
                        _ => text,
                    };
                    if host.is_empty() || host.contains(char::is_whitespace) {
                        return self.err(s.span(), format!("`{text}` is not HOST[:PORT]"));
                    }
                    Some(text.to_string())
                }
                None => None,
            };
            cfg.grants = Some(GrantSettings {
                max_ttl,
                default_ttl,
                ca_key,
                server,
            });
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
        if let Some(a) = &raw.audit {
            let t = a.get_ref();
            let dir = match &t.dir {
                Some(p) => Some(self.path(p)?.path),
                None => None,
            };
            let max_bytes = match &t.max_bytes {
                Some(m) if *m.get_ref() < 4096 => {
                    return self.err(m.span(), "at least 4096 (bytes)")
                }
                Some(m) => *m.get_ref(),
                None => 64 << 20,
            };
            let on_failure = match &t.on_failure {
                None => AuditFailure::Continue,
                Some(v) => match v.get_ref().as_str() {
                    "continue" => AuditFailure::Continue,
                    "refuse" => AuditFailure::Refuse,
                    _ => {
                        return self.err(v.span(), "on_failure must be \"continue\" or \"refuse\"")
                    }
                },
            };
            cfg.audit = Some(AuditSettings {
                dir,
                max_bytes,
                rotate_daily: t.rotate_daily.as_ref().is_none_or(|d| *d.get_ref()),
                on_failure,
            });
        }
        if let Some(st) = &raw.store {
            let t = st.get_ref();
            let d = StoreSettings::default();
            let redis = match &t.redis {
                Some(u) => {
                    let text = u.get_ref().trim();
                    if text.starts_with("rediss://") {
                        return self.err(
                            u.span(),
                            "rediss:// (TLS to Redis) is not supported yet: use redis:// on a private network or a unix socket (redis+unix:///path)",
                        );
                    }
                    if !(text.starts_with("redis://") || text.starts_with("redis+unix://")) {
                        return self.err(
                            u.span(),
                            "must be redis://[user:password@]host[:port][/db] or redis+unix:///path",
                        );
                    }
                    Some(text.to_string())
                }
                None => None,
            };
            let prefix = match &t.prefix {
                Some(p) => {
                    let v = p.get_ref();
                    if v.is_empty() || v.len() > 64 || v.contains(char::is_whitespace) {
                        return self.err(p.span(), "must be 1-64 characters, no spaces");
                    }
                    v.clone()
                }
                None => d.prefix,
            };
            let timeout = match &t.timeout {
                // Short: a call blocks the thread that makes it.
                Some(v) => self.duration(v, Duration::from_millis(10), Duration::from_secs(5))?,
                None => d.timeout,
            };
            cfg.store = StoreSettings {
                redis,
                prefix,
                timeout,
            };
        }
        if let Some(control) = &raw.control {
            if raw.grants.is_none() {
                return self.err(
                    control.span(),
                    "the control API serves [grants]: add a [grants] table, or remove [control]",
                );
            }
            let c = control.get_ref();
            let socket = match &c.socket {
                Some(p) => Some(self.path(p)?.path),
                None => None,
            };
            let listen = match &c.listen {
                Some(l) => Some(l.get_ref().parse().or_else(|_| {
                    self.err(
                        l.span(),
                        format!(
                            "`{}` is not an IP address and port, e.g. \"0.0.0.0:9443\"",
                            l.get_ref()
                        ),
                    )
                })?),
                None => None,
            };
            let tokens = match &c.tokens {
                Some(p) => Some(self.path(p)?.path),
                None => None,
            };
            match (&c.listen, &c.tokens) {
                (Some(l), None) => {
                    return self.err(
                        l.span(),
                        "the control API on TCP needs bearer tokens: add tokens = \"FILE\" (lines of NAME TOKEN)",
                    )
                }
                (None, Some(t)) => {
                    return self.err(t.span(), "tokens are for the TCP listener: add listen")
                }
                _ => {}
            }
            cfg.control = ControlSettings {
                socket,
                listen,
                tokens,
            };
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
                None => DEFAULT_ADMIN_LISTEN,
            });
        }
        Ok(cfg)
    }

    /// A duration within `[min, max]`; bounds keep deadlines meaningful and `Instant` math safe.
    /// `[tls] cipher_suites`: known names, each once, in the order given; with TLS 1.3 only,
    /// at least one TLS 1.3 suite.
    fn cipher_suites(
        &self,
        list: &Spanned<Vec<Spanned<String>>>,
        min: TlsVersion,
    ) -> Result<Vec<rustls::CipherSuite>, ConfigError> {
        if list.get_ref().is_empty() {
            return self.err(
                list.span(),
                "list at least one cipher suite, or leave the key out for sluice's order",
            );
        }
        let mut suites = Vec::new();
        for n in list.get_ref() {
            let name = n.get_ref();
            let Some(suite) = cipher_suite_by_name(name) else {
                let known: Vec<&str> = CIPHER_SUITES.iter().map(|(_, n, _)| *n).collect();
                return self.err(
                    n.span(),
                    format!(
                        "`{name}` is not a cipher suite sluice offers; these are (or OpenSSL's names for them): {}",
                        known.join(", ")
                    ),
                );
            };
            if suites.contains(&suite) {
                return self.err(n.span(), format!("`{name}` is listed twice"));
            }
            suites.push(suite);
        }
        if min == TlsVersion::V1_3 && !suites.iter().any(|s| is_tls13_suite(*s)) {
            return self.err(list.span(), "no TLS 1.3 suite, and tls.min_version is 1.3");
        }
        Ok(suites)
    }

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
}
