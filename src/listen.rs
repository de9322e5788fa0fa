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

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::{Heartbeat, Liveness, Readiness};
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
    /// Sockets passed by systemd are unusable.
    #[error(transparent)]
    Activation(#[from] crate::systemd::ActivationError),
}

/// What new connections are served with: replaced whole by a reload, while open connections
/// keep the one they started with.
pub(crate) struct Snapshot {
    pub(crate) cfg: Config,
    /// The TLS config offering the routes' ALPN ids.
    pub(crate) tls: Arc<rustls::ServerConfig>,
    /// The same without ALPN, for clients whose ALPN list matches none of ours: they are
    /// routed by SNI or by their first bytes instead of failing the handshake.
    pub(crate) tls_no_alpn: Arc<rustls::ServerConfig>,
    /// The embedded SSH server, when the ssh route has no upstream.
    pub(crate) ssh: Option<Arc<crate::ssh::SshServer>>,
    /// `tls.client_ca`'s verifier, to re-verify client certificates of resumed sessions.
    pub(crate) client_verifier: Option<tls::ClientVerifier>,
}

/// Shared state of a running server.
pub(crate) struct Shared {
    /// Config, TLS and SSH for new connections.
    pub(crate) snapshot: ArcSwap<Snapshot>,
    /// Limits fixed at start (a reload does not resize them).
    pub(crate) limits: crate::config::Limits,
    /// `threads` at start.
    pub(crate) limits_threads: Option<u32>,
    /// Connections per client still in handshake or detection.
    pub(crate) unrouted: Arc<PerClient>,
    /// All connections per client.
    pub(crate) per_client: Arc<PerClient>,
    pub(crate) next_id: AtomicU64,
    /// Cancelled when the shutdown grace runs out: open connections close.
    pub(crate) force_close: CancellationToken,
    /// Pipes for splicing plain legs.
    pub(crate) pipes: Arc<crate::relay::splice::PipePool>,
    pub(crate) refusals: Throttle,
    pub(crate) failures: Throttle,
}

/// A bound, ready server.
pub struct Server {
    listeners: Vec<TcpListener>,
    admin: Option<TcpListener>,
    readiness: Readiness,
    liveness: Liveness,
    shared: Arc<Shared>,
    reloader: Reloader,
    activated: bool,
}

impl Server {
    /// Loads certificates and keys and binds every listen address (or takes the sockets
    /// systemd passed); nothing is served yet.
    pub async fn bind(cfg: Config, state_dir: PathBuf) -> Result<Server, ServeError> {
        crate::sys::raise_nofile_limit();
        let certs = Arc::new(CertStore::new(tls::load_certs(&cfg, &state_dir)?));
        let force_close = CancellationToken::new();
        let ticketer = tls::ticketer()?;
        let snapshot = build_snapshot(
            cfg.clone(),
            &certs,
            &ticketer,
            &state_dir,
            &force_close,
            None,
        )?;
        let inherited = crate::systemd::inherited_listeners()?;
        let activated = !inherited.is_empty();
        let mut listeners = Vec::new();
        if activated {
            for l in inherited {
                listeners.push(TcpListener::from_std(l).map_err(|source| ServeError::Bind {
                    addr: cfg.listen[0],
                    source,
                })?);
            }
        } else {
            for addr in &cfg.listen {
                let l = bind(*addr).map_err(|source| ServeError::Bind {
                    addr: *addr,
                    source,
                })?;
                listeners.push(l);
            }
        }
        let admin = match cfg.admin {
            Some(addr) => {
                Some(crate::admin::bind(addr).map_err(|source| ServeError::Bind { addr, source })?)
            }
            None => None,
        };
        crate::resolve::configure(&cfg.dns);
        let shared = Arc::new(Shared {
            unrouted: Arc::new(PerClient::new(cfg.limits.max_unrouted_per_ip)),
            per_client: Arc::new(PerClient::new(cfg.limits.max_connections_per_ip)),
            pipes: crate::relay::splice::PipePool::new(cfg.limits.splice_pipes as usize),
            limits: cfg.limits.clone(),
            limits_threads: cfg.threads,
            snapshot: ArcSwap::from_pointee(snapshot),
            next_id: AtomicU64::new(1),
            force_close,
            refusals: Throttle::new(),
            failures: Throttle::new(),
        });
        let reloader = Reloader {
            shared: shared.clone(),
            certs,
            state_dir,
            cert_digest: Arc::new(tokio::sync::Mutex::new(cert_digest(&cfg))),
            started: Arc::new(cfg),
            lock: Arc::new(tokio::sync::Mutex::new(())),
            ticketer,
        };
        Ok(Server {
            listeners,
            admin,
            readiness: Readiness::ready(),
            liveness: Liveness::default(),
            shared,
            reloader,
            activated,
        })
    }

    /// The addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Whether the listening sockets came from systemd (socket activation).
    pub fn socket_activated(&self) -> bool {
        self.activated
    }

    /// The admin listener's address, if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The certificates in force.
    pub fn certs(&self) -> Arc<CertStore> {
        self.reloader.certs.clone()
    }

    /// Re-reads config, certificates and keys on request (SIGHUP) or when files change.
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// Cancelling this token closes every open connection at once (e.g. on a second SIGTERM).
    pub fn force_close_token(&self) -> CancellationToken {
        self.shared.force_close.clone()
    }

    /// `/readyz` turns 503 when this is set to draining.
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// Whether the connection-serving runtimes are alive (for `/livez` and the watchdog).
    pub fn liveness(&self) -> Liveness {
        self.liveness.clone()
    }

    /// The embedded SSH server new connections get, if the ssh route uses it.
    pub fn ssh(&self) -> Option<Arc<crate::ssh::SshServer>> {
        self.shared.snapshot.load().ssh.clone()
    }

    /// The state directory in use.
    pub fn state_dir(&self) -> &std::path::Path {
        &self.reloader.state_dir
    }

    /// Serves until `shutdown` resolves, then drains for `shutdown_grace` and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let stop_accepting = CancellationToken::new();
        let stop_admin = CancellationToken::new();
        let tracker = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(self.shared.limits.max_connections as usize));
        let accepting = spawn_acceptors(
            self.listeners,
            &self.shared,
            &stop_accepting,
            &tracker,
            &limit,
            &self.liveness,
        );
        if let Some(admin) = self.admin {
            tokio::spawn(crate::admin::serve(
                admin,
                self.readiness.clone(),
                self.liveness.clone(),
                stop_admin.clone(),
            ));
        }
        self.reloader.watch_certs(stop_accepting.clone());
        shutdown.await;
        self.readiness.set_draining();
        stop_accepting.cancel();
        accepting.stopped().await;
        tracker.close();
        let grace = self.shared.snapshot.load().cfg.shutdown_grace;
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
        stop_admin.cancel();
        info!("stopped");
    }
}

/// After a certificate pair failed to load, when to look again.
const CERT_RETRY: Duration = Duration::from_secs(1);
/// After an inotify event, how long to let further renames settle.
const CERT_SETTLE: Duration = Duration::from_millis(100);

/// Resolves when a watched directory has events (never, without inotify).
async fn dir_changed(w: Option<&tokio::io::unix::AsyncFd<crate::sys::DirWatch>>) {
    let Some(w) = w else {
        return std::future::pending().await;
    };
    loop {
        let Ok(mut ready) = w.readable().await else {
            return std::future::pending().await;
        };
        let any = ready.get_inner().drain();
        // Drained until EAGAIN: wait for the next readiness.
        ready.clear_ready();
        if any {
            return;
        }
    }
}

/// Builds what new connections are served with. The embedded SSH server is kept from
/// `previous` when its settings did not change (its -R ports and failure counts carry over).
fn build_snapshot(
    cfg: Config,
    certs: &Arc<CertStore>,
    ticketer: &Arc<dyn rustls::server::ProducesTickets>,
    state_dir: &std::path::Path,
    force_close: &CancellationToken,
    previous: Option<&Snapshot>,
) -> Result<Snapshot, ServeError> {
    let (tls_config, client_verifier) = tls::server_config(
        certs.clone(),
        cfg.alpn_offered(),
        cfg.tls
            .client_ca
            .as_ref()
            .map(|c| (c, cfg.source.as_deref())),
        ticketer.clone(),
    )?;
    let ssh = match cfg.ssh.upstream {
        Some(_) => None,
        None => match previous.and_then(|p| {
            p.ssh.as_ref().filter(|_| {
                p.cfg.embedded_ssh == cfg.embedded_ssh && p.cfg.ssh.idle() == cfg.ssh.idle()
            })
        }) {
            Some(same) => Some(same.clone()),
            None => Some(Arc::new(crate::ssh::SshServer::new(
                &cfg.embedded_ssh,
                state_dir,
                cfg.source.as_deref(),
                cfg.ssh.idle(),
                force_close.clone(),
                previous.and_then(|p| p.ssh.as_deref()),
            )?)),
        },
    };
    Ok(Snapshot {
        tls_no_alpn: {
            let mut c = (*tls_config).clone();
            c.alpn_protocols.clear();
            Arc::new(c)
        },
        tls: tls_config,
        ssh,
        client_verifier,
        cfg,
    })
}

/// Re-reads the config file, certificates and authorized keys. A reload that fails anywhere
/// changes nothing: the old state stays in force.
#[derive(Clone)]
pub struct Reloader {
    shared: Arc<Shared>,
    certs: Arc<CertStore>,
    state_dir: PathBuf,
    /// The config at start: settings that need a restart are compared against it.
    started: Arc<Config>,
    /// One reload at a time (SIGHUP and the certificate poll may race).
    lock: Arc<tokio::sync::Mutex<()>>,
    /// The content of the certificate files last loaded (or last found broken).
    cert_digest: Arc<tokio::sync::Mutex<Vec<Option<u64>>>>,
    /// Session-ticket keys, kept across reloads so that tickets issued before still resume.
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
}

/// The content of `cfg`'s certificate files, to notice changes.
fn cert_digest(cfg: &Config) -> Vec<Option<u64>> {
    crate::state::digest_files(tls::cert_files(cfg).iter().map(PathBuf::as_path))
}

impl Reloader {
    /// Reloads everything (SIGHUP). Returns what changed, or why nothing did.
    pub async fn reload(&self) -> Result<String, String> {
        let _one = self.lock.lock().await;
        let m = crate::metrics::get();
        let old = self.shared.snapshot.load_full();
        let cfg = match &old.cfg.source {
            Some(path) => match Config::load(path) {
                Ok(c) => c,
                Err(e) => {
                    m.reload("config", false);
                    return Err(format!("config error: {e}"));
                }
            },
            None => old.cfg.clone(),
        };
        let digest = cert_digest(&cfg);
        let certs = match tls::load_certs(&cfg, &self.state_dir) {
            Ok(c) => c,
            Err(e) => {
                m.reload("config", false);
                m.reload("certificates", false);
                return Err(e.to_string());
            }
        };
        let snapshot = match build_snapshot(
            cfg,
            &self.certs,
            &self.ticketer,
            &self.state_dir,
            &self.shared.force_close,
            Some(&old),
        ) {
            Ok(s) => s,
            Err(e) => {
                m.reload("config", false);
                return Err(e.to_string());
            }
        };
        let mut notes = Vec::new();
        let reused_ssh = match (&old.ssh, &snapshot.ssh) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        if reused_ssh {
            if let Some(ssh) = &snapshot.ssh {
                // The same server: its keys are re-read in place.
                match ssh.keys().reload() {
                    Ok(()) => {
                        m.reload("authorized_keys", true);
                        notes.push("authorized keys reloaded".to_string());
                    }
                    Err(e) => {
                        m.reload("authorized_keys", false);
                        notes.push(format!("authorized keys kept: {e}"));
                    }
                }
            }
        }
        let restart_only = restart_only_changes(&self.started, &snapshot.cfg);
        let fingerprint = certs.fingerprint.clone();
        self.certs.replace(certs);
        *self.cert_digest.lock().await = digest;
        crate::resolve::configure(&snapshot.cfg.dns);
        self.shared.snapshot.store(Arc::new(snapshot));
        m.reload("config", true);
        m.reload("certificates", true);
        let mut summary = format!("certificate {fingerprint}");
        if !notes.is_empty() {
            summary.push_str("; ");
            summary.push_str(&notes.join("; "));
        }
        if !restart_only.is_empty() {
            summary.push_str(&format!(
                "; changed but only applied at restart: {}",
                restart_only.join(", ")
            ));
        }
        Ok(summary)
    }

    /// Reloads the certificates when their files' content changes: woken by inotify on the
    /// files' directories, and checked every `tls.poll_interval` besides (inotify misses some
    /// network file systems). A pair that fails to load is retried shortly (certbot and
    /// Kubernetes swap the certificate and the key one after the other) and reported once it
    /// fails twice on the same content; the old one stays.
    pub fn watch_certs(&self, stop: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            let files = |r: &Reloader| tls::cert_files(&r.shared.snapshot.load().cfg);
            let mut failed: Option<Vec<Option<u64>>> = None;
            let inotify = match crate::sys::DirWatch::new_async() {
                Ok(w) => Some(w),
                Err(e) => {
                    warn!(error = %e, "inotify unavailable: certificate files are polled only");
                    None
                }
            };
            let mut unwatchable = std::collections::HashSet::new();
            loop {
                let paths = files(&me);
                if let Some(w) = &inotify {
                    // Added on every round: re-adding is a no-op, and a directory that was
                    // missing, or deleted and made again, gets its watch back.
                    for dir in paths.iter().filter_map(|p| p.parent()) {
                        match w.get_ref().add(dir) {
                            Ok(()) => {
                                unwatchable.remove(dir);
                            }
                            Err(e) => {
                                if unwatchable.insert(dir.to_path_buf()) {
                                    warn!(dir = %dir.display(), error = %e, "cannot watch certificate directory; polling it");
                                }
                            }
                        }
                    }
                }
                let now = crate::state::digest_files(paths.iter().map(PathBuf::as_path));
                // Checked before waiting too: a change between start-up and the first watch
                // would otherwise wait for the next poll.
                if now == *me.cert_digest.lock().await {
                    failed = None;
                } else {
                    match me.reload_certs().await {
                        Ok(fp) => {
                            info!(sha256 = %fp, "certificates reloaded: a file changed");
                            failed = None;
                        }
                        Err(e) if failed.as_ref() == Some(&now) => {
                            // Failed twice on the same content: not a swap in progress.
                            warn!(
                                "certificates changed but do not load; the old ones stay in force: {e}"
                            );
                            crate::metrics::get().reload("certificates", false);
                            *me.cert_digest.lock().await = now;
                            failed = None;
                        }
                        Err(_) => failed = Some(now),
                    }
                }
                let wait = if failed.is_some() {
                    CERT_RETRY
                } else {
                    me.shared.snapshot.load().cfg.tls.poll_interval
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                    () = dir_changed(inotify.as_ref()) => {
                        // Let a burst of renames settle, then read the result once.
                        tokio::time::sleep(CERT_SETTLE).await;
                        if let Some(w) = &inotify {
                            w.get_ref().drain();
                        }
                    }
                }
            }
        });
    }

    /// Reloads only the certificates named by the config in force.
    async fn reload_certs(&self) -> Result<String, ServeError> {
        let _one = self.lock.lock().await;
        let old = self.shared.snapshot.load_full();
        let cfg = &old.cfg;
        let digest = cert_digest(cfg);
        let certs = tls::load_certs(cfg, &self.state_dir)?;
        // The client CA lives in the TLS config: rebuilt (same settings, the SSH server kept)
        // so that a CA removed or replaced applies to new handshakes and resumed sessions.
        let snapshot = match cfg.tls.client_ca {
            Some(_) => Some(build_snapshot(
                cfg.clone(),
                &self.certs,
                &self.ticketer,
                &self.state_dir,
                &self.shared.force_close,
                Some(&old),
            )?),
            None => None,
        };
        let fp = certs.fingerprint.clone();
        self.certs.replace(certs);
        if let Some(s) = snapshot {
            self.shared.snapshot.store(Arc::new(s));
        }
        *self.cert_digest.lock().await = digest;
        crate::metrics::get().reload("certificates", true);
        Ok(fp)
    }
}

/// Settings a reload cannot apply to a running server.
fn restart_only_changes(started: &Config, now: &Config) -> Vec<&'static str> {
    let mut v = Vec::new();
    if started.listen != now.listen {
        v.push("listen");
    }
    if started.admin != now.admin {
        v.push("admin.listen");
    }
    if started.limits != now.limits {
        v.push("limits");
    }
    if started.threads != now.threads {
        v.push("threads");
    }
    if started.state_dir != now.state_dir {
        v.push("state_dir");
    }
    v
}

/// The accept loops, and a way to wait until they have all stopped.
struct Acceptors {
    /// Closed (all senders dropped) once every accept loop has returned.
    done: tokio::sync::mpsc::Receiver<()>,
}

impl Acceptors {
    async fn stopped(mut self) {
        while self.done.recv().await.is_some() {}
    }
}

/// One thread per core, each with its own single-threaded runtime accepting on every listener
/// (a clone of the socket) and running the connections it accepted to the end: a connection's
/// handshake and relay never hop threads, which saves the cross-thread wake-ups a work-stealing
/// scheduler pays per connection. Every waiting thread is woken for a new connection and one
/// of them gets it. A thread keeps its runtime until every tracked connection has finished.
/// A worker that cannot get a thread or a runtime runs on the calling runtime instead.
fn spawn_acceptors(
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
                let Some((peer, local, prefix)) =
                    crate::conn::read_proxy_header(&shared, &mut tcp, peer, local, accepted_at)
                        .await
                else {
                    return;
                };
                let Some((client_slot, unrouted)) = admit(&shared, peer) else {
                    return;
                };
                crate::conn::handle(shared, tcp, peer, local, unrouted, prefix, accepted_at).await;
                drop((permit, client_slot));
            });
            continue;
        }
        let Some((client_slot, unrouted)) = admit(&shared, peer) else {
            continue;
        };
        let shared = shared.clone();
        tracker.spawn(async move {
            crate::conn::handle(shared, tcp, peer, local, unrouted, Vec::new(), accepted_at).await;
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
    pub(crate) fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
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
