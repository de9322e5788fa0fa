//! Reloads: building the snapshot new connections get, restart-only changes, and watching
//! the certificate files (inotify where there is one, and a poll).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::tls::{self, CertStore};

use super::error::ServeError;
use super::shared::{Shared, Snapshot};

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

/// What outlives a reload: the grants and the store they and the tunnel names share.
#[derive(Clone, Default)]
pub(crate) struct Persistent {
    pub(crate) grants: Option<Arc<crate::grant::Grants>>,
    pub(crate) store: Option<Arc<crate::store::Store>>,
    pub(crate) locks: Option<Arc<crate::lock::Locks>>,
}

/// Builds what new connections are served with. The embedded SSH server is kept from
/// `previous` when its settings did not change (its -R ports and failure counts carry over).
pub(super) fn build_snapshot(
    cfg: Config,
    certs: &Arc<CertStore>,
    ticketer: &Arc<dyn rustls::server::ProducesTickets>,
    state_dir: &std::path::Path,
    force_close: &CancellationToken,
    persistent: &Persistent,
    previous: Option<&Snapshot>,
) -> Result<Snapshot, ServeError> {
    let (tls_config, client_verifier) = tls::server_config(
        certs.clone(),
        cfg.alpn_offered(),
        &cfg.tls,
        cfg.source.as_deref(),
        ticketer.clone(),
    )?;
    tracing::info!(target: "sluice::tls", "{}", tls::describe(&cfg.tls));
    let ssh = match cfg.ssh.upstream {
        Some(_) => None,
        None => match previous.and_then(|p| {
            p.ssh.as_ref().filter(|_| {
                p.cfg.embedded_ssh == cfg.embedded_ssh
                    && p.cfg.ssh.idle() == cfg.ssh.idle()
                    && p.cfg.tunnels == cfg.tunnels
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
                crate::ssh::Platform {
                    tunnels: cfg.tunnels.clone(),
                    grants: persistent.grants.clone(),
                    store: persistent.store.clone(),
                    locks: persistent.locks.clone(),
                },
            )?)),
        },
    };
    // The gateway keeps its pool of channels while the registry it dials stays the same.
    // htpasswd files are read at every reload, even when the config did not change.
    let access = match &cfg.tunnels {
        Some(t) => Arc::new(crate::tunnel::access::Access::load(
            &t.private,
            cfg.source.as_deref(),
        )?),
        None => Arc::default(),
    };
    // The gateway keeps its pool of channels while the registry it dials stays the same.
    let gateway = match (&cfg.tunnels, &ssh) {
        (Some(t), Some(ssh)) => Some(
            match previous
                .and_then(|p| p.gateway.as_ref())
                .filter(|g| g.serves(&ssh.registry, t))
            {
                Some(g) => g.clone(),
                None => Arc::new(crate::tunnel::http::Gateway::new(
                    t.clone(),
                    ssh.registry.clone(),
                    force_close.clone(),
                )),
            },
        ),
        _ => None,
    };
    let tls_tunnel = gateway.as_ref().map(|_| {
        let mut c = (*tls_config).clone();
        c.alpn_protocols = [b"h2".to_vec(), b"http/1.1".to_vec()]
            .into_iter()
            .chain(cfg.ssh.alpn.iter().map(|a| a.as_bytes().to_vec()))
            .collect();
        Arc::new(c)
    });
    // Last: a reload that fails above leaves the grants as they were.
    if let Some(g) = &persistent.grants {
        g.reconfigure(&cfg.embedded_ssh, cfg.tunnels.as_ref());
    }
    Ok(Snapshot {
        tls_tunnel,
        gateway,
        access,
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
    pub(super) shared: Arc<Shared>,
    pub(super) certs: Arc<CertStore>,
    pub(super) state_dir: PathBuf,
    /// The config at start: settings that need a restart are compared against it.
    pub(super) started: Arc<Config>,
    /// One reload at a time (SIGHUP and the certificate poll may race).
    pub(super) lock: Arc<tokio::sync::Mutex<()>>,
    /// The content of the certificate files last loaded (or last found broken).
    pub(super) cert_digest: Arc<tokio::sync::Mutex<Vec<Option<u64>>>>,
    /// Session-ticket keys, kept across reloads so that tickets issued before still resume.
    pub(super) ticketer: Arc<dyn rustls::server::ProducesTickets>,
    /// The grants and the store, opened at start (their settings apply at a restart).
    pub(super) persistent: Persistent,
}

/// The content of `cfg`'s certificate files, to notice changes.
pub(super) fn cert_digest(cfg: &Config) -> Vec<Option<u64>> {
    crate::state::digest_files(tls::cert_files(cfg).iter().map(PathBuf::as_path))
}

impl Reloader {
    /// Reloads everything (SIGHUP). Returns what changed, or why nothing did (both in the
    /// audit trail).
    pub async fn reload(&self) -> Result<String, String> {
        let r = self.reload_all().await;
        crate::audit::record(|| crate::audit::Event::Reloaded {
            what: "config".into(),
            ok: r.is_ok(),
            detail: match &r {
                Ok(s) | Err(s) => s.clone(),
            },
        });
        r
    }

    async fn reload_all(&self) -> Result<String, String> {
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
            &self.persistent,
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
                            crate::audit::record(|| crate::audit::Event::Reloaded {
                                what: "certificates".into(),
                                ok: true,
                                detail: format!("a file changed; now sha256 {fp}"),
                            });
                            failed = None;
                        }
                        Err(e) if failed.as_ref() == Some(&now) => {
                            // Failed twice on the same content: not a swap in progress.
                            warn!(
                                "certificates changed but do not load; the old ones stay in force: {e}"
                            );
                            crate::metrics::get().reload("certificates", false);
                            crate::audit::record(|| crate::audit::Event::Reloaded {
                                what: "certificates".into(),
                                ok: false,
                                detail: e.to_string(),
                            });
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
                &self.persistent,
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
    if started.grants != now.grants {
        v.push("grants");
    }
    if started.store != now.store {
        v.push("store");
    }
    if started.control != now.control {
        v.push("control");
    }
    v
}
