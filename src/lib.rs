//! sluice: one TLS port that carries a site's HTTPS and SSH.
//!
//! # Layout: one connection's way through
//! - [`server`]: `accept` (per-core workers, admission) -> `proxy_header` -> `conn` (outer
//!   detection, TLS, inner detection, routing) -> `dispatch` (the target) -> `conn_log` (one
//!   line, the counters); `reload`, `limits` and `shared` beside them.
//! - [`detect`]: the pure, incremental protocol classifier.
//! - `route`: pure routing decisions from ALPN, SNI and the detected protocol.
//! - [`relay`]: the two-way copy (splice(2) between plain sockets) with half-close, idle
//!   timeout and byte counts.
//! - `upstream` and `resolve`: connecting to backends, with cached asynchronous name lookups.
//! - [`ssh`]: the embedded SSH server (tunnels and jump host): `auth` decides logins, `handler`
//!   answers russh, `forward` moves the bytes.
//! - `tunnel`: names published with `ssh -R NAME:PORT:...` and who owns them.
//! - `outcome`: how a connection ended and which side ended it (the log line and metrics).
//!
//! # Beside it
//! - [`config`]: the TOML file, validated into a [`Config`].
//! - [`tls`]: certificates (PEM, self-signed, SNI) and the rustls server config.
//! - [`proxy_protocol`] and [`net`]: PROXY headers; CIDRs, globs, permit entries (pure leaves).
//! - [`daemon`]: `sluice serve` as a process (runtime, signals, systemd).
//! - [`admin`] and [`metrics`]: the health and Prometheus endpoint.
//! - [`builtin`]: sluice's own small HTTP answers (status page, redirect, 502).
//! - [`state`]: the state directory for generated secrets; [`store`]: what must survive a
//!   restart (tunnel name owners), in SQLite.
//! - [`grant`]: access grants for devices (sluice's user CA, ports and names allotted in the
//!   store); [`control`]: the control API that issues and revokes them.
//! - [`client`]: `sluice connect`, the ProxyCommand TLS helper.
//! - [`exit`]: exit codes, and the errors that know theirs.
//!
//! Modules are public where something outside the library uses them (the binary, the
//! integration tests, the fuzz targets, the benchmarks); the rest are `pub(crate)`.

pub mod admin;
pub mod audit;
pub mod builtin;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
pub mod detect;
pub mod exit;
pub mod grant;
pub(crate) mod io;
pub mod lock;
pub mod metrics;
pub mod net;
pub(crate) mod outcome;
pub mod proxy_protocol;
pub mod relay;
pub(crate) mod resolve;
pub(crate) mod route;
pub mod server;
pub mod sessions;
pub mod ssh;
pub mod sshkey;
pub mod state;
pub mod store;
pub(crate) mod sys;
pub mod systemd;
pub(crate) mod text;
pub mod tls;
pub mod tunnel;
pub(crate) mod upstream;

pub use config::{Config, ConfigError};
pub use exit::Exit;
pub use server::{ServeError, Server};
