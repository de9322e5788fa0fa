//! What a connection sees of the running server: the snapshot it is served with and the
//! shared counters and limits (visible inside `server` only). `conn` and `dispatch` depend on
//! this and on [`Ctx`], not on the server itself; what comes next (a tunnel registry, grants,
//! an audit sink) joins `Shared` as one field each.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tokio::time::Instant;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::tls::{self};

use super::limits::{PerClient, Throttle};

/// What new connections are served with: replaced whole by a reload, while open connections
/// keep the one they started with.
pub(super) struct Snapshot {
    pub(super) cfg: Config,
    /// The TLS config offering the routes' ALPN ids.
    pub(super) tls: Arc<rustls::ServerConfig>,
    /// The same without ALPN, for clients whose ALPN list matches none of ours: they are
    /// routed by SNI or by their first bytes instead of failing the handshake.
    pub(super) tls_no_alpn: Arc<rustls::ServerConfig>,
    /// For SNIs naming a tunnel: ALPN h2, http/1.1 (and the ssh route's ids).
    pub(super) tls_tunnel: Option<Arc<rustls::ServerConfig>>,
    /// Serves HTTPS visitors of tunnels, with `[tunnels]` and the embedded SSH server.
    pub(super) gateway: Option<Arc<crate::tunnel::http::Gateway>>,
    /// Who may visit private tunnels (htpasswd files as read at start or the last reload).
    pub(super) access: Arc<crate::tunnel::access::Access>,
    /// The embedded SSH server, when the ssh route has no upstream.
    pub(super) ssh: Option<Arc<crate::ssh::SshServer>>,
    /// `tls.client_ca`'s verifier, to re-verify client certificates of resumed sessions.
    pub(super) client_verifier: Option<tls::ClientVerifier>,
}

/// Shared state of a running server.
pub(super) struct Shared {
    /// Config, TLS and SSH for new connections.
    pub(super) snapshot: ArcSwap<Snapshot>,
    /// Limits fixed at start (a reload does not resize them).
    pub(super) limits: crate::config::Limits,
    /// `threads` at start.
    pub(super) limits_threads: Option<u32>,
    /// Connections per client still in handshake or detection.
    pub(super) unrouted: Arc<PerClient>,
    /// All connections per client.
    pub(super) per_client: Arc<PerClient>,
    pub(super) next_id: AtomicU64,
    /// Cancelled when the shutdown grace runs out: open connections close.
    pub(super) force_close: CancellationToken,
    /// Pipes for splicing plain legs.
    pub(super) pipes: Arc<crate::relay::splice::PipePool>,
    pub(super) refusals: Throttle,
    pub(super) failures: Throttle,
}

/// What one connection is served with: the server's shared state and the snapshot (config,
/// TLS, SSH server) that was current when it was accepted.
pub(super) struct Ctx {
    pub(super) shared: Arc<Shared>,
    pub(super) snap: Arc<Snapshot>,
    /// When the connection was accepted: a client that stays silent has `detect.timeout` from
    /// here, PROXY header included.
    pub(super) accepted: Instant,
}
