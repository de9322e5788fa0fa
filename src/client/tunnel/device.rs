//! The device config (`sluice tunnel --config FILE`): what the command line says, in TOML, for
//! a tunnel run as a service. Every key is checked here, with file:line:column and the key in
//! the error (exit 78), before anything connects.
//!
//! ```toml
//! server = "sluice.example.org"          # HOST[:PORT], 443 by default
//! grant = "/var/lib/sluice-tunnel/grant.json"
//! remote = ["cam-7:22:localhost:22"]     # -R; also local = [...] (-L), dynamic = [...] (-D)
//! keepalive = "30s"
//! [tls]
//! ca = "/etc/sluice-tunnel/ca.pem"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::spec::Forward;
use crate::config::{locate, ConfigError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    server: Option<Spanned<String>>,
    user: Option<String>,
    grant: Option<PathBuf>,
    #[serde(default)]
    identity: Vec<PathBuf>,
    #[serde(default)]
    no_tls: bool,
    #[serde(default)]
    local: Vec<Spanned<String>>,
    #[serde(default)]
    remote: Vec<Spanned<String>>,
    #[serde(default)]
    dynamic: Vec<Spanned<String>>,
    #[serde(default)]
    host_keys: Vec<Spanned<String>>,
    known_hosts: Option<PathBuf>,
    #[serde(default)]
    accept_new: bool,
    keepalive: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    backoff: Option<Spanned<String>>,
    backoff_max: Option<Spanned<String>>,
    admin: Option<Spanned<String>>,
    #[serde(default)]
    tls: Tls,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Tls {
    ca: Option<PathBuf>,
    pin: Option<String>,
    #[serde(default)]
    insecure: bool,
    sni: Option<String>,
    #[serde(default)]
    no_sni: bool,
    proxy: Option<String>,
    #[serde(default)]
    no_proxy: bool,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// A checked device config; paths are made absolute against the file's directory.
#[derive(Debug, Clone, Default)]
pub struct DeviceConfig {
    /// `server`: `[USER@]HOST[:PORT]`.
    pub server: Option<String>,
    /// `user`.
    pub user: Option<String>,
    /// `grant`: a grant bundle file.
    pub grant: Option<PathBuf>,
    /// `identity`: key files.
    pub identity: Vec<PathBuf>,
    /// `no_tls`.
    pub no_tls: bool,
    /// `local`, `remote`, `dynamic`, as written (checked).
    pub local: Vec<String>,
    /// See `local`.
    pub remote: Vec<String>,
    /// See `local`.
    pub dynamic: Vec<String>,
    /// `host_keys`: `SHA256:...` fingerprints.
    pub host_keys: Vec<String>,
    /// `known_hosts`.
    pub known_hosts: Option<PathBuf>,
    /// `accept_new`.
    pub accept_new: bool,
    /// `keepalive`, `connect_timeout`, `backoff`, `backoff_max`.
    pub keepalive: Option<Duration>,
    /// See `keepalive`.
    pub connect_timeout: Option<Duration>,
    /// See `keepalive`.
    pub backoff: Option<Duration>,
    /// See `keepalive`.
    pub backoff_max: Option<Duration>,
    /// `admin`: where /metrics, /livez and /readyz are served.
    pub admin: Option<SocketAddr>,
    /// `[tls] ca`.
    pub ca: Option<PathBuf>,
    /// `[tls] pin`.
    pub pin: Option<String>,
    /// `[tls] insecure`.
    pub insecure: bool,
    /// `[tls] sni`.
    pub sni: Option<String>,
    /// `[tls] no_sni`.
    pub no_sni: bool,
    /// `[tls] proxy`.
    pub proxy: Option<String>,
    /// `[tls] no_proxy`.
    pub no_proxy: bool,
    /// `[tls] cert` and `key`: a client certificate.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl DeviceConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<DeviceConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        DeviceConfig::parse(&text, Some(path), &base)
    }

    /// Checks `text`; `file` names it in errors, `base` resolves relative paths.
    pub fn parse(
        text: &str,
        file: Option<&Path>,
        base: &Path,
    ) -> Result<DeviceConfig, ConfigError> {
        let f: File = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| locate(text, s)).unwrap_or_default();
            ConfigError::at(file, &at, e.message().trim().to_string())
        })?;
        let at = |s: &Spanned<String>, m: String| ConfigError::at(file, &locate(text, s.span()), m);
        let path = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let duration = |d: &Option<Spanned<String>>| -> Result<Option<Duration>, ConfigError> {
            d.as_ref()
                .map(|s| {
                    humantime::parse_duration(s.get_ref()).map_err(|e| {
                        at(
                            s,
                            format!("`{}` is not a duration ({e}), e.g. \"30s\"", s.get_ref()),
                        )
                    })
                })
                .transpose()
        };
        let specs = |list: &[Spanned<String>], parse: fn(&str) -> Result<Forward, String>| {
            list.iter()
                .map(|s| {
                    parse(s.get_ref())
                        .map(|_| s.get_ref().clone())
                        .map_err(|e| at(s, e))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let local = specs(&f.local, Forward::local)?;
        let remote = specs(&f.remote, Forward::remote)?;
        let dynamic = specs(&f.dynamic, Forward::dynamic)?;
        if f.server.is_none() && f.grant.is_none() {
            return Err(ConfigError::at(
                file,
                &Default::default(),
                "set `server` (HOST[:PORT]) or `grant`",
            ));
        }
        if local.is_empty() && remote.is_empty() && dynamic.is_empty() && f.grant.is_none() {
            return Err(ConfigError::at(
                file,
                &Default::default(),
                "nothing to do: set `local`, `remote` or `dynamic` (or `grant`)",
            ));
        }
        for k in &f.host_keys {
            if !k.get_ref().starts_with("SHA256:") {
                return Err(at(
                    k,
                    format!("`{}` is not a key fingerprint (SHA256:...)", k.get_ref()),
                ));
            }
        }
        let admin = f
            .admin
            .as_ref()
            .map(|s| {
                s.get_ref()
                    .parse()
                    .map_err(|_| at(s, format!("`{}` is not ADDRESS:PORT", s.get_ref())))
            })
            .transpose()?;
        if let Some(s) = &f.server {
            let target = s
                .get_ref()
                .rsplit_once('@')
                .map_or(s.get_ref().as_str(), |(_, t)| t);
            super::super::parse_target(target).map_err(|e| at(s, e.to_string()))?;
        }
        let client_cert = match (f.tls.cert, f.tls.key) {
            (Some(c), Some(k)) => Some((path(c), path(k))),
            (None, None) => None,
            _ => {
                return Err(ConfigError::at(
                    file,
                    &Default::default(),
                    "tls: `cert` and `key` go together",
                ))
            }
        };
        Ok(DeviceConfig {
            server: f.server.map(Spanned::into_inner),
            user: f.user,
            grant: f.grant.map(path),
            identity: f.identity.into_iter().map(path).collect(),
            no_tls: f.no_tls,
            local,
            remote,
            dynamic,
            host_keys: f.host_keys.into_iter().map(Spanned::into_inner).collect(),
            known_hosts: f.known_hosts.map(path),
            accept_new: f.accept_new,
            keepalive: duration(&f.keepalive)?,
            connect_timeout: duration(&f.connect_timeout)?,
            backoff: duration(&f.backoff)?,
            backoff_max: duration(&f.backoff_max)?,
            admin,
            ca: f.tls.ca.map(path),
            pin: f.tls.pin,
            insecure: f.tls.insecure,
            sni: f.tls.sni,
            no_sni: f.tls.no_sni,
            proxy: f.tls.proxy,
            no_proxy: f.tls.no_proxy,
            client_cert,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<DeviceConfig, String> {
        DeviceConfig::parse(text, Some(Path::new("/etc/d.toml")), Path::new("/etc"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_device_config_reads_and_paths_resolve() {
        let c = parse(
            "server = \"s.example.org\"\nidentity = [\"key\"]\nremote = [\"cam:22:localhost:22\"]\nkeepalive = \"10s\"\nadmin = \"127.0.0.1:9101\"\n[tls]\nca = \"/etc/ca.pem\"\n",
        )
        .unwrap();
        assert_eq!(c.identity, vec![PathBuf::from("/etc/key")]);
        assert_eq!(c.keepalive, Some(Duration::from_secs(10)));
        assert_eq!(c.remote, vec!["cam:22:localhost:22".to_string()]);
        assert!(parse("grant = \"g.json\"\n")
            .unwrap()
            .grant
            .unwrap()
            .ends_with("g.json"));
    }

    #[test]
    fn mistakes_say_where() {
        for (text, says) in [
            (
                "server = \"s\"\nlocal = [\"80:h\"]\n",
                "/etc/d.toml:2:10: local: -L 80:h: expected",
            ),
            (
                "server = \"s\"\nremote = [\"0:h:1\"]\nkeepalive = \"soon\"\n",
                "/etc/d.toml:3:13: keepalive: `soon` is not a duration",
            ),
            (
                "server = \"s\"\nremote = [\"0:h:1\"]\nhost_keys = [\"MD5:x\"]\n",
                ":3:14: host_keys: `MD5:x` is not a key fingerprint",
            ),
            (
                "server = \"s\"\nremote = [\"0:h:1\"]\nport = 1\n",
                ":3:1: port: unknown field `port`",
            ),
            ("server = \"s:x\"\nremote = [\"0:h:1\"]\n", ":1:10: server:"),
            ("remote = [\"0:h:1\"]\n", "set `server`"),
            ("server = \"s\"\n", "nothing to do"),
            (
                "server = \"s\"\nremote = [\"0:h:1\"]\n[tls]\ncert = \"c\"\n",
                "go together",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }
}
