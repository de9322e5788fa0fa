//! The serde shape of the TOML file: defaults and unknown-key rejection live here; meaning and
//! cross-field checks live in `config::validate`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::proxy_protocol::ProxyVersion;

/// A duration written like "500ms", "2s", "5m".
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(transparent)]
pub(super) struct Dur(#[serde(with = "humantime_serde")] pub Duration);

/// The whole file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    pub listen: Option<Spanned<Vec<Spanned<String>>>>,
    pub state_dir: Option<Spanned<PathBuf>>,
    pub shutdown_grace: Option<Spanned<Dur>>,
    pub threads: Option<Spanned<u32>>,
    pub tls: Option<Spanned<Tls>>,
    #[serde(default)]
    pub detect: Detect,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub routes: Routes,
    pub ssh: Option<Spanned<Ssh>>,
    pub trusted_proxies: Option<Spanned<Vec<Spanned<String>>>>,
    pub proxy_header: Option<Spanned<String>>,
    pub admin: Option<Spanned<Admin>>,
    pub dns: Option<Spanned<Dns>>,
    pub tunnels: Option<Spanned<Tunnels>>,
    pub grants: Option<Spanned<Grants>>,
    pub control: Option<Spanned<Control>>,
    pub store: Option<Spanned<StoreTable>>,
    pub audit: Option<Spanned<AuditTable>>,
}

/// `[audit]`: the tamper-evident trail of security events.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditTable {
    pub dir: Option<Spanned<PathBuf>>,
    pub max_bytes: Option<Spanned<u64>>,
    pub rotate_daily: Option<Spanned<bool>>,
    pub on_failure: Option<Spanned<String>>,
}

/// `[store]`: where names and grants are kept.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StoreTable {
    pub redis: Option<Spanned<String>>,
    pub prefix: Option<Spanned<String>>,
    pub timeout: Option<Spanned<Dur>>,
}

/// `[control]`: where the control API listens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Control {
    pub socket: Option<Spanned<PathBuf>>,
    pub listen: Option<Spanned<String>>,
    pub tokens: Option<Spanned<PathBuf>>,
}

/// `[grants]`: short-lived access grants for devices.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Grants {
    pub max_ttl: Option<Spanned<Dur>>,
    pub default_ttl: Option<Spanned<Dur>>,
    pub ca_key: Option<Spanned<PathBuf>>,
    pub server: Option<Spanned<String>>,
}

/// `[tunnels]`: services published by name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Tunnels {
    pub domain: Spanned<String>,
    pub max_per_identity: Option<Spanned<u32>>,
    pub header_timeout: Option<Spanned<Dur>>,
    pub max_visitors: Option<Spanned<u32>>,
    pub pool_idle: Option<Spanned<Dur>>,
    #[serde(default)]
    pub permit_listen: Vec<Spanned<String>>,
    #[serde(default)]
    pub private: Vec<Spanned<PrivateTunnels>>,
}

/// `[[tunnels.private]]`: names whose HTTPS visitors must authenticate.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PrivateTunnels {
    pub names: Vec<Spanned<String>>,
    pub htpasswd: Option<Spanned<PathBuf>>,
    pub client_cert: Option<Spanned<bool>>,
}

/// `[dns]`: name resolution for upstreams and forward targets.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Dns {
    #[serde(default)]
    pub servers: Vec<Spanned<String>>,
    pub timeout: Option<Spanned<Dur>>,
}

/// `[admin]`: health and metrics listener.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Admin {
    pub listen: Option<Spanned<String>>,
}

/// `[ssh]`: the embedded SSH server.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Ssh {
    pub host_key: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub authorized_keys: Vec<Spanned<PathBuf>>,
    #[serde(default)]
    pub permit_open: Vec<Spanned<String>>,
    pub listen_address: Option<Spanned<String>>,
    pub listen_ports: Option<Spanned<String>>,
    pub socket_dir: Option<Spanned<PathBuf>>,
    pub connect_timeout: Option<Spanned<Dur>>,
    pub auth_timeout: Option<Spanned<Dur>>,
    pub max_auth_attempts: Option<Spanned<u32>>,
    pub max_channels: Option<Spanned<u32>>,
    pub max_forwards: Option<Spanned<u32>>,
    pub keepalive_interval: Option<Spanned<Dur>>,
    /// Deprecated: read only to warn that it does nothing now.
    pub max_auth_failures_per_ip: Option<Spanned<u32>>,
    #[serde(default)]
    pub penalty_exempt: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Tls {
    pub cert: Option<Spanned<PathBuf>>,
    pub key: Option<Spanned<PathBuf>>,
    pub handshake_timeout: Option<Spanned<Dur>>,
    pub poll_interval: Option<Spanned<Dur>>,
    pub client_ca: Option<Spanned<PathBuf>>,
    pub cipher_suites: Option<Spanned<Vec<Spanned<String>>>>,
    pub min_version: Option<Spanned<String>>,
    #[serde(default)]
    pub sni: Vec<Spanned<SniCert>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SniCert {
    pub names: Spanned<Vec<Spanned<String>>>,
    pub cert: Spanned<PathBuf>,
    pub key: Spanned<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Detect {
    pub timeout: Option<Spanned<Dur>>,
    pub on_timeout: Option<Spanned<String>>,
    pub on_unknown: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Limits {
    pub max_connections: Option<Spanned<u32>>,
    pub max_unrouted_per_ip: Option<Spanned<u32>>,
    pub max_connections_per_ip: Option<Spanned<u32>>,
    pub splice_pipes: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Routes {
    pub http: Option<Route>,
    pub ssh: Option<Route>,
}

/// One route's table; the same keys for both routes, checked per route in validation.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Route {
    pub upstream: Option<Spanned<String>>,
    pub proxy_protocol: Option<Spanned<ProxyVersion>>,
    pub connect_timeout: Option<Spanned<Dur>>,
    pub idle_timeout: Option<Spanned<Dur>>,
    pub half_closed_timeout: Option<Spanned<Dur>>,
    pub plaintext: Option<Spanned<String>>,
    #[serde(default)]
    pub sni: Vec<Spanned<String>>,
    pub alpn: Option<Spanned<Vec<Spanned<String>>>>,
    pub h2: Option<Spanned<bool>>,
    pub require_client_cert: Option<Spanned<bool>>,
}
