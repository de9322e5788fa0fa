//! sluice: one TLS port that carries a site's HTTPS and SSH.
//!
//! # Layout
//! - [`config`]: the TOML file, validated into a [`config::Config`].
//! - [`server`]: sockets, the accept loop, limits, reload and graceful shutdown ([`server::Server`]).
//! - `conn`: one connection from accept to close: outer detection, TLS, inner detection,
//!   routing, the target, one log line.
//! - [`detect`]: the pure, incremental protocol classifier.
//! - [`route`]: pure routing decisions from ALPN, SNI and detected protocol.
//! - [`tls`]: certificates (PEM, self-signed, SNI) and the rustls server config.
//! - [`outcome`]: how a connection ended and which side ended it (log line and metrics).
//! - [`relay`]: the two-way copy with half-close, idle timeout and byte counts.
//! - [`upstream`]: connecting to backends.
//! - [`proxy_protocol`]: PROXY protocol v1/v2 headers, encoded and decoded (pure).
//! - [`net`]: CIDRs, host globs, `host:port` permit entries, port ranges (pure).
//! - [`resolve`]: asynchronous, cached name resolution (hickory) for upstreams and forwards.
//! - [`builtin`]: sluice's own small HTTP answers (status page, redirect, 502).
//! - [`io`]: a stream that replays bytes already read.
//! - [`state`]: the state directory for generated secrets.
//! - [`ssh`]: the embedded SSH server (tunnels and jump host).
//! - [`exit`]: exit codes, and the errors that know theirs.
//! - [`client`]: `sluice connect`, the ProxyCommand TLS helper.

pub mod admin;
pub mod builtin;
pub mod client;
pub mod config;
pub mod daemon;
pub mod detect;
pub mod exit;
pub mod io;
pub mod metrics;
pub mod net;
pub mod outcome;
pub mod proxy_protocol;
pub mod relay;
pub mod resolve;
pub mod route;
pub mod server;
pub mod ssh;
pub mod state;
pub mod sys;
pub mod systemd;
pub mod tls;
pub mod upstream;
