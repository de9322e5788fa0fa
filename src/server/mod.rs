//! The server: sockets, the accept loop, connection limits and graceful shutdown.
//!
//! [`Server::bind`] loads everything that can fail (certificates, sockets) before serving;
//! [`Server::run`] accepts until its shutdown future resolves, then drains open connections
//! for `shutdown_grace` and closes what is left.
//!
//! One connection's way through: `accept` (per-core workers, the accept loop, admission) ->
//! `proxy_header` (from trusted load balancers) -> `conn` (outer detection, TLS, inner
//! detection and routing: [`crate::detect`], `route`) -> `dispatch` (the upstream
//! through [`crate::relay`], the embedded [`crate::ssh`] server, or sluice's own answer).
//! Beside them: `conn_log` (the one line and the counters per connection), `reload` (snapshot building, the certificate watch), `limits` (per-client
//! counts, log throttles), `shared` (what connections see of the server, `Ctx`).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::{Liveness, Readiness};
use crate::config::Config;
use crate::tls::{self, CertStore};

mod accept;
mod conn;
mod conn_log;
mod dispatch;
mod error;
mod limits;
mod proxy_header;
mod reload;
mod shared;

use accept::{bind, spawn_acceptors};
pub use error::ServeError;
use limits::{PerClient, Throttle};
pub use reload::Reloader;
use reload::{build_snapshot, cert_digest};
use shared::Shared;

/// The control API's TCP listener and what it needs.
struct ControlTcp {
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    tokens: Arc<crate::control::tokens::Tokens>,
}

/// A bound, ready server.
pub struct Server {
    listeners: Vec<TcpListener>,
    admin: Option<TcpListener>,
    /// The control API's socket.
    control: Option<(tokio::net::UnixListener, PathBuf)>,
    /// The control API on TCP (`[control] listen`): listener, TLS, tokens.
    control_tcp: Option<ControlTcp>,
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
        if let Some(a) = &cfg.audit {
            let dir = crate::audit::dir(a, &state_dir);
            crate::audit::start(&dir, a).map_err(|source| ServeError::Audit { dir, source })?;
        }
        // One store for the tunnel names, the grants and the locks (SQLite here, or Redis),
        // opened whatever tables there are: [tunnels] added at a reload uses it.
        let store = Arc::new(
            crate::store::Store::open_with(&cfg.store, &state_dir).map_err(ServeError::Store)?,
        );
        let locks = Arc::new(crate::lock::Locks::open(store.clone()).map_err(ServeError::Store)?);
        let store = Some(store);
        let grants = match (&cfg.grants, &store) {
            (Some(g), Some(store)) => Some(Arc::new(
                crate::grant::Grants::open(
                    g,
                    &cfg.embedded_ssh,
                    cfg.tunnels.as_ref(),
                    store.clone(),
                    &state_dir,
                    cfg.listen[0],
                    grant_host_keys(&cfg, &state_dir)?,
                )
                .map_err(ServeError::Grants)?,
            )),
            _ => None,
        };
        let persistent = reload::Persistent {
            grants,
            store,
            locks: Some(locks),
        };
        let snapshot = build_snapshot(
            cfg.clone(),
            &certs,
            &ticketer,
            &state_dir,
            &force_close,
            &persistent,
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
        if let (Some(g), Some(first)) = (&persistent.grants, listeners.first()) {
            if let Ok(addr) = first.local_addr() {
                g.listening_on(addr);
            }
        }
        let admin = match cfg.admin {
            Some(addr) => {
                Some(crate::admin::bind(addr).map_err(|source| ServeError::Bind { addr, source })?)
            }
            None => None,
        };
        // The control socket is always served; it is required (a failure to bind stops the
        // start) when the config asks for what needs it: grants, or a socket path of its own.
        let control = {
            let path = crate::control::socket_path(&cfg.control, &state_dir);
            let required = cfg.grants.is_some() || cfg.control.socket.is_some();
            match crate::control::bind(&path) {
                Ok(l) => Some((l, path)),
                Err(e) if !required && e.kind() == std::io::ErrorKind::AddrInUse => {
                    warn!(socket = %path.display(), "control socket not served: another process answers on it (a second sluice on this state directory?); `sluice sessions` and `sluice lock` reach that one. Set [control] socket to serve this one's");
                    None
                }
                Err(source) => return Err(ServeError::ControlSocket { path, source }),
            }
        };
        let control_tcp = match (&cfg.control.listen, &cfg.control.tokens) {
            (Some(addr), Some(tokens)) => Some(ControlTcp {
                tokens: Arc::new(crate::control::tokens::Tokens::load(tokens)?),
                tls: crate::control::tls_config(certs.clone()).map_err(ServeError::ControlTls)?,
                listener: bind(*addr).map_err(|source| ServeError::Bind {
                    addr: *addr,
                    source,
                })?,
            }),
            _ => None,
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
            persistent,
        };
        Ok(Server {
            listeners,
            admin,
            control,
            control_tcp,
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
    pub fn state_dir(&self) -> &Path {
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
        let shared = self.shared.clone();
        let tunnels: crate::admin::TunnelList = Arc::new(move || {
            let snap = shared.snapshot.load();
            match (&snap.cfg.tunnels, &snap.ssh) {
                (Some(_), Some(ssh)) => ssh.registry.list(),
                _ => Vec::new(),
            }
        });
        let api = Arc::new(crate::control::Api {
            grants: self.reloader.persistent.grants.clone(),
            locks: self.reloader.persistent.locks.clone(),
            tunnels: tunnels.clone(),
        });
        if let Some(admin) = self.admin {
            tokio::spawn(crate::admin::serve(
                admin,
                self.readiness.clone(),
                self.liveness.clone(),
                stop_admin.clone(),
                tunnels,
            ));
        }
        let stop_control = CancellationToken::new();
        if let Some((l, path)) = self.control {
            tokio::spawn(crate::control::serve(
                l,
                path,
                api.clone(),
                stop_control.clone(),
            ));
        }
        if let Some(grants) = &self.reloader.persistent.grants {
            tokio::spawn(grants.clone().sweep(stop_control.clone()));
        }
        if let Some(locks) = &self.reloader.persistent.locks {
            tokio::spawn(locks.clone().watch(stop_control.clone()));
        }
        if let Some(c) = self.control_tcp {
            tokio::spawn(crate::control::serve_tls(
                c.listener,
                c.tls,
                c.tokens,
                api.clone(),
                stop_control.clone(),
            ));
        }
        let _stop_control = stop_control.drop_guard();
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

/// The embedded SSH server's host key fingerprint (made now if it is not there yet, as the
/// SSH server would), for the grant bundles that let devices check it.
fn grant_host_keys(cfg: &Config, state_dir: &Path) -> Result<Vec<String>, ServeError> {
    let path = crate::ssh::host_key_path(&cfg.embedded_ssh, state_dir);
    let key = crate::ssh::load_or_create_host_key(&path).map_err(crate::ssh::SshError::from)?;
    Ok(vec![key
        .public_key()
        .fingerprint(russh::keys::HashAlg::Sha256)
        .to_string()])
}
