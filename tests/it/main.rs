//! Integration tests: the daemon on 127.0.0.1:0 driven by real clients (rustls, curl,
//! openssl s_client) against test upstreams. One binary; one module per area.
// Test and benchmark code: a panic (unwrap) is the failure report, and wall-clock time is
// what a benchmark or an end-to-end test against real processes measures.
#![allow(clippy::unwrap_used, clippy::disallowed_types, unreachable_pub)]

/// Helpers: certificates, the daemon in-process, upstreams, clients.
mod support;

/// ALPN, SNI, peek, timeout and plaintext routing; PROXY headers; built-in answers.
mod routing;

/// Bulk data, half-close, missing close_notify, idle timeout.
mod relay;

/// Junk, truncated and stalled handshakes, dead upstreams, limits.
mod robustness;

/// curl and openssl s_client against the daemon.
mod clients;

/// The embedded SSH server, driven by the real OpenSSH client through TLS.
mod ssh;

/// Tunnels by name: `ssh -R NAME:PORT:...` published, owned, and reached with `-W`.
mod tunnels;

/// The embedded SSH server's bounds (vendor/russh): EOF and request floods on a stalled
/// channel, data after EOF, the process-wide window budget; driven by a russh client.
mod ssh_limits;

/// Access grants: `sluice grant`, the control API, OpenSSH as the device with its certificate.
mod grants;

/// Live sessions, kill and locks, with real OpenSSH clients.
mod sessions;

/// `sluice tunnel`, the client without OpenSSH: forwards, keys, host keys, reconnects.
mod tunnel_client;

/// `sluice connect`, the ProxyCommand helper, against the daemon and with OpenSSH.
mod connect;

/// The `sluice` binary: config errors, `check`, the embedded default, signals.
mod cli;

/// systemd (socket activation, sd_notify), reloads, the admin endpoint, PROXY input, deploy/.
mod ops;

/// Relays across a real network path: network namespaces joined by veth, slow readers.
mod netpath;

/// The committed fuzz corpus and regression inputs, replayed through the fuzz targets' bodies.
mod fuzz_replay;
