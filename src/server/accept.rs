//! The per-core workers and their accept loops, with admission (limits, back-off when out of
//! descriptors).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::admin::{Heartbeat, Liveness};

use super::limits::ClientSlot;
use super::shared::Shared;

/// The accept loops, and a way to wait until they have all stopped.
pub(super) struct Acceptors {
    /// Closed (all senders dropped) once every accept loop has returned.
    done: tokio::sync::mpsc::Receiver<()>,
}

impl Acceptors {
    pub(super) async fn stopped(mut self) {
        while self.done.recv().await.is_some() {}
    }
}

/// One thread per core, each with its own single-threaded runtime accepting on every listener
/// (a clone of the socket) and running the connections it accepted to the end: a connection's
/// handshake and relay never hop threads, which saves the cross-thread wake-ups a work-stealing
/// scheduler pays per connection. Every waiting thread is woken for a new connection and one
/// of them gets it. A thread keeps its runtime until every tracked connection has finished.
/// A worker that cannot get a thread or a runtime runs on the calling runtime instead.
pub(super) fn spawn_acceptors(
    listeners: Vec<TcpListener>,
    shared: &Arc<Shared>,
    stop: &CancellationToken,
    tracker: &TaskTracker,
    limit: &Arc<Semaphore>,
    liveness: &Liveness,
) -> Acceptors {
    let (done_tx, done) = tokio::sync::mpsc::channel(1);
    let threads = match shared.limits_threads {
        Some(n) => n as usize,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let std_listeners: Vec<std::net::TcpListener> = listeners
        .into_iter()
        .filter_map(|l| l.into_std().ok())
        .collect();
    let here = tokio::runtime::Handle::current();
    for i in 0..threads {
        let worker = Worker {
            listeners: std_listeners
                .iter()
                .filter_map(|l| l.try_clone().ok())
                .collect(),
            shared: shared.clone(),
            stop: stop.clone(),
            tracker: tracker.clone(),
            limit: limit.clone(),
            done: done_tx.clone(),
            beat: liveness.register(),
        };
        // The worker is handed over only once the thread exists, so that it can run here
        // instead if the thread cannot be made (a tasks or pids limit).
        let (give, take) = std::sync::mpsc::channel::<Worker>();
        let fallback = here.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("sluice-worker-{i}"))
            .spawn(move || {
                let Ok(worker) = take.recv() else { return };
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(worker.run()),
                    Err(e) => {
                        warn!(error = %e, "cannot build a worker runtime; accepting on the main one");
                        fallback.spawn(worker.run());
                    }
                }
            });
        match spawned {
            Ok(_) => {
                let _ = give.send(worker);
            }
            Err(e) => {
                warn!(error = %e, "cannot start a worker thread; accepting on the main runtime");
                here.spawn(worker.run());
            }
        }
    }
    Acceptors { done }
}

/// What one accepting thread needs.
struct Worker {
    listeners: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
    limit: Arc<Semaphore>,
    /// Dropped when this worker's accept loops have all returned.
    done: tokio::sync::mpsc::Sender<()>,
    /// Ticked while this worker's runtime runs (liveness, watchdog).
    beat: Heartbeat,
}

impl Worker {
    async fn run(self) {
        let mut loops = tokio::task::JoinSet::new();
        for l in self.listeners {
            match TcpListener::from_std(l) {
                Ok(l) => {
                    loops.spawn(accept_loop(
                        l,
                        self.shared.clone(),
                        self.stop.clone(),
                        self.tracker.clone(),
                        self.limit.clone(),
                    ));
                }
                Err(e) => warn!(error = %e, "cannot register a listener"),
            }
        }
        let beating = tokio::spawn(self.beat.run());
        while loops.join_next().await.is_some() {}
        drop(self.done);
        // The connections this runtime runs must finish before it goes away.
        self.tracker.wait().await;
        beating.abort();
    }
}

pub(super) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
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
        let accepted_at = tokio::time::Instant::now();
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            crate::metrics::get().refuse("max_connections");
            if let Some(n) = shared.refusals.allow() {
                warn!(%peer, limit = shared.limits.max_connections, suppressed = n, "refused connection: limits.max_connections reached");
            }
            drop(tcp);
            continue;
        };
        let local = tcp.local_addr().unwrap_or(peer);
        configure(&tcp);
        let trusted = shared
            .snapshot
            .load()
            .cfg
            .trusted_proxies
            .iter()
            .any(|c| c.contains(peer.ip()));
        if trusted {
            // The real client is in the PROXY header: limits apply to it, once it is read.
            let shared = shared.clone();
            tracker.spawn(async move {
                let mut tcp = tcp;
                let Some((peer, local, prefix)) = super::proxy_header::read_proxy_header(
                    &shared,
                    &mut tcp,
                    peer,
                    local,
                    accepted_at,
                )
                .await
                else {
                    return;
                };
                let Some((client_slot, unrouted)) = admit(&shared, peer) else {
                    return;
                };
                super::conn::handle(shared, tcp, peer, local, unrouted, prefix, accepted_at).await;
                drop((permit, client_slot));
            });
            continue;
        }
        let Some((client_slot, unrouted)) = admit(&shared, peer) else {
            continue;
        };
        let shared = shared.clone();
        tracker.spawn(async move {
            super::conn::handle(shared, tcp, peer, local, unrouted, Vec::new(), accepted_at).await;
            drop((permit, client_slot));
        });
    }
}

/// Takes the per-client slots for a new connection from `peer`, or logs why not.
fn admit(shared: &Shared, peer: SocketAddr) -> Option<(ClientSlot, ClientSlot)> {
    let Some(client_slot) = shared.per_client.enter(peer.ip()) else {
        crate::metrics::get().refuse("max_connections_per_ip");
        if let Some(n) = shared.refusals.allow() {
            warn!(%peer, limit = shared.limits.max_connections_per_ip, suppressed = n, "refused connection: limits.max_connections_per_ip reached for this client");
        }
        return None;
    };
    let Some(unrouted) = shared.unrouted.enter(peer.ip()) else {
        crate::metrics::get().refuse("max_unrouted_per_ip");
        if let Some(n) = shared.refusals.allow() {
            warn!(%peer, limit = shared.limits.max_unrouted_per_ip, suppressed = n, "refused connection: limits.max_unrouted_per_ip reached for this client");
        }
        return None;
    };
    Some((client_slot, unrouted))
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
