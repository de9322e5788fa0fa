//! Listening: sockets, the accept loop, connection limits and graceful shutdown.
//!
//! [`Server::bind`] loads everything that can fail (certificates, sockets) before serving;
//! [`Server::run`] accepts until its shutdown future resolves, then drains open connections
//! for `shutdown_grace` and closes what is left.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::tls::{self, CertStore, TlsError};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Certificates or TLS settings are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The embedded SSH server could not start.
    #[error(transparent)]
    Ssh(#[from] crate::ssh::SshError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Shared, read-only state of a running server.
pub(crate) struct Shared {
    pub(crate) cfg: Config,
    /// The TLS config offering the routes' ALPN ids.
    pub(crate) tls: Arc<rustls::ServerConfig>,
    /// The same without ALPN, for clients whose ALPN list matches none of ours: they are
    /// routed by SNI or by their first bytes instead of failing the handshake.
    pub(crate) tls_no_alpn: Arc<rustls::ServerConfig>,
    /// Connections per client still in handshake or detection.
    pub(crate) unrouted: Arc<PerClient>,
    /// All connections per client.
    pub(crate) per_client: Arc<PerClient>,
    pub(crate) next_id: AtomicU64,
    /// Cancelled when the shutdown grace runs out: open connections close.
    pub(crate) force_close: CancellationToken,
    /// Pipes for splicing plain legs.
    pub(crate) pipes: Arc<crate::relay::splice::PipePool>,
    /// The embedded SSH server, when the ssh route has no upstream.
    pub(crate) ssh: Option<Arc<crate::ssh::SshServer>>,
    pub(crate) refusals: Throttle,
    pub(crate) failures: Throttle,
}

/// A bound, ready server.
pub struct Server {
    listeners: Vec<TcpListener>,
    shared: Arc<Shared>,
    certs: Arc<CertStore>,
    state_dir: PathBuf,
}

impl Server {
    /// Loads certificates and binds every listen address; nothing is served yet.
    pub async fn bind(cfg: Config, state_dir: PathBuf) -> Result<Server, ServeError> {
        crate::sys::raise_nofile_limit();
        let certs = Arc::new(CertStore::new(tls::load_certs(&cfg, &state_dir)?));
        let tls_config = tls::server_config(
            certs.clone(),
            cfg.alpn_offered(),
            cfg.tls
                .client_ca
                .as_ref()
                .map(|c| (c, cfg.source.as_deref())),
        )?;
        let force_close = CancellationToken::new();
        let ssh = match cfg.ssh.upstream {
            Some(_) => None,
            None => Some(Arc::new(crate::ssh::SshServer::new(
                &cfg.embedded_ssh,
                &state_dir,
                cfg.source.as_deref(),
                cfg.ssh.idle_timeout,
                force_close.clone(),
            )?)),
        };
        let mut listeners = Vec::new();
        for addr in &cfg.listen {
            let l = bind(*addr).map_err(|source| ServeError::Bind {
                addr: *addr,
                source,
            })?;
            listeners.push(l);
        }
        let shared = Arc::new(Shared {
            unrouted: Arc::new(PerClient::new(cfg.limits.max_unrouted_per_ip)),
            per_client: Arc::new(PerClient::new(cfg.limits.max_connections_per_ip)),
            pipes: crate::relay::splice::PipePool::new(cfg.limits.splice_pipes as usize),
            cfg,
            tls_no_alpn: {
                let mut c = (*tls_config).clone();
                c.alpn_protocols.clear();
                Arc::new(c)
            },
            tls: tls_config,
            next_id: AtomicU64::new(1),
            force_close,
            ssh,
            refusals: Throttle::new(),
            failures: Throttle::new(),
        });
        Ok(Server {
            listeners,
            shared,
            certs,
            state_dir,
        })
    }

    /// The addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The certificates in force.
    pub fn certs(&self) -> Arc<CertStore> {
        self.certs.clone()
    }

    /// Cancelling this token closes every open connection at once (e.g. on a second SIGTERM).
    pub fn force_close_token(&self) -> CancellationToken {
        self.shared.force_close.clone()
    }

    /// The embedded SSH server, if the ssh route uses it.
    pub fn ssh(&self) -> Option<&Arc<crate::ssh::SshServer>> {
        self.shared.ssh.as_ref()
    }

    /// The state directory in use.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.state_dir
    }

    /// Serves until `shutdown` resolves, then drains for `shutdown_grace` and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let stop_accepting = CancellationToken::new();
        let tracker = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(
            self.shared.cfg.limits.max_connections as usize,
        ));
        let mut accepting = tokio::task::JoinSet::new();
        for l in self.listeners {
            let (shared, stop, tracker, limit) = (
                self.shared.clone(),
                stop_accepting.clone(),
                tracker.clone(),
                limit.clone(),
            );
            accepting.spawn(accept_loop(l, shared, stop, tracker, limit));
        }
        shutdown.await;
        stop_accepting.cancel();
        while accepting.join_next().await.is_some() {}
        tracker.close();
        let grace = self.shared.cfg.shutdown_grace;
        let open = tracker.len();
        info!(open_connections = open, grace = %humantime::format_duration(grace), "shutting down: no new connections; open ones may finish");
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(
                open_connections = tracker.len(),
                "shutdown grace over: closing the remaining connections"
            );
            self.shared.force_close.cancel();
            if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
                .await
                .is_err()
            {
                warn!(
                    open_connections = tracker.len(),
                    "connections still open after close; exiting anyway"
                );
            }
        }
        info!("stopped");
    }
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        // "[::]:443" and "0.0.0.0:443" must be able to coexist in `listen`.
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

async fn accept_loop(
    l: TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
    limit: Arc<Semaphore>,
) {
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            r = l.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::ZERO;
                a
            }
            Err(e) => {
                if is_resource_exhaustion(&e) {
                    // Out of descriptors or memory: accepting again at once would spin.
                    backoff =
                        (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    if let Some(n) = shared.refusals.allow() {
                        warn!(error = %e, retry_in = ?backoff, suppressed = n, "accept failed: out of resources; backing off");
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                }
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            if let Some(n) = shared.refusals.allow() {
                warn!(%peer, limit = shared.cfg.limits.max_connections, suppressed = n, "refused connection: limits.max_connections reached");
            }
            drop(tcp);
            continue;
        };
        let Some(client_slot) = shared.per_client.enter(peer.ip()) else {
            if let Some(n) = shared.refusals.allow() {
                warn!(%peer, limit = shared.cfg.limits.max_connections_per_ip, suppressed = n, "refused connection: limits.max_connections_per_ip reached for this client");
            }
            continue;
        };
        let Some(unrouted) = shared.unrouted.enter(peer.ip()) else {
            if let Some(n) = shared.refusals.allow() {
                warn!(%peer, limit = shared.cfg.limits.max_unrouted_per_ip, suppressed = n, "refused connection: limits.max_unrouted_per_ip reached for this client");
            }
            continue;
        };
        let local = tcp.local_addr().unwrap_or(peer);
        configure(&tcp);
        let shared = shared.clone();
        tracker.spawn(async move {
            crate::conn::handle(shared, tcp, peer, local, unrouted).await;
            drop((permit, client_slot));
        });
    }
}

fn configure(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(120))
        .with_interval(Duration::from_secs(30));
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Counts connections per client (an IPv4 address, or an IPv6 /64: one host's usual share).
pub(crate) struct PerClient {
    max: u32,
    map: Mutex<HashMap<IpAddr, u32>>,
}

impl PerClient {
    fn new(max: u32) -> Self {
        PerClient {
            max,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            },
        }
    }

    /// Takes a slot for `ip`, or `None` if its client is at the limit.
    fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let key = Self::key(ip);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            owner: self.clone(),
            key,
        })
    }
}

/// One connection's slot in a [`PerClient`] count; dropping it frees the slot.
pub(crate) struct ClientSlot {
    owner: Arc<PerClient>,
    key: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut map = self.owner.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// Lets a burst of log lines through per second and counts the rest.
pub(crate) struct Throttle {
    state: Mutex<(tokio::time::Instant, u32, u64)>,
}

const THROTTLE_PER_SECOND: u32 = 10;

impl Throttle {
    fn new() -> Self {
        Throttle {
            state: Mutex::new((tokio::time::Instant::now(), 0, 0)),
        }
    }

    /// `Some(suppressed since the last line)` if this line may be logged.
    pub(crate) fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = tokio::time::Instant::now();
        if now.duration_since(s.0) >= Duration::from_secs(1) {
            s.0 = now;
            s.1 = 0;
        }
        if s.1 < THROTTLE_PER_SECOND {
            s.1 += 1;
            let suppressed = std::mem::take(&mut s.2);
            Some(suppressed)
        } else {
            s.2 += 1;
            None
        }
    }
}
