//! The embedded SSH server: a tunnel and jump host, not a login server.
//!
//! SSH streams that `conn` routed here (over TLS or plain) run through russh's `run_stream`.
//! Clients authenticate with public keys or OpenSSH user certificates only; they may open
//! `-W`/`-L`/`-J` channels to `permit_open` targets and publish `-R` listeners in
//! `listen_ports` (or unix sockets under `socket_dir`). Shells and commands are refused with a
//! message. Deny by default everywhere.

mod auth;
pub mod authorized_keys;
mod forward;
mod handler;
mod hostkey;
mod keys;
mod limits;
pub mod penalty;
mod permit;
pub mod policy;
mod ports;
mod sockets;
mod tz;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use russh::keys::PrivateKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{ConfigError, SshSettings};
use crate::outcome::SshEnd;

pub use hostkey::{host_key_path, load_or_create_host_key, HostKeyError};
pub use keys::KeyStore;
pub use tz::SystemTz;

/// The message shells, commands and subsystems get.
pub const TUNNELS_ONLY: &str =
    "sluice: this server provides tunnels only; use -N, -W, -L or -R\r\n";

/// Why the SSH server could not start.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The host key could not be loaded or made.
    #[error(transparent)]
    HostKey(#[from] HostKeyError),
    /// An authorized_keys file could not be read.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store that keeps tunnel names' owners could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The unix socket directory could not be made.
    #[error("{}: cannot create the socket directory: {source}", path.display())]
    SocketDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The embedded server, shared by all SSH connections.
pub struct SshServer {
    pub(crate) config: Arc<russh::server::Config>,
    pub(crate) settings: SshSettings,
    pub(crate) keys: Arc<KeyStore>,
    pub(crate) socket_dir: PathBuf,
    /// Idle limits for each forwarded channel's relay.
    pub(crate) channel_idle: crate::relay::Idle,
    /// Cancelled when open connections must close (shutdown grace over).
    pub(crate) stop: CancellationToken,
    /// Failed-login penalties per source (shared with the server a reload replaces, so they
    /// survive it).
    pub(crate) penalties: Arc<penalty::Penalties>,
    /// Unix socket names held by `-R /name` forwards of live sessions, shared the same way: a
    /// session on the old server and one on the new must not take each other's sockets.
    pub(crate) sockets: Arc<sockets::Sockets>,
    /// TCP ports held by `-R` forwards of live sessions, shared the same way.
    pub(crate) ports: Arc<ports::Ports>,
    /// `[tunnels]`, when names may be published.
    pub(crate) tunnels: Option<crate::config::TunnelSettings>,
    /// Tunnel names and who serves them, shared the same way across a reload.
    pub(crate) registry: Arc<crate::tunnel::Registry>,
    /// `[grants]`: certificates from sluice's own CA, checked against the grant store.
    pub(crate) grants: Option<Arc<crate::grant::Grants>>,
    /// Locks: checked at authentication.
    pub(crate) locks: Option<Arc<crate::lock::Locks>>,
    host_fingerprint: String,
}

/// What the SSH server serves besides forwards: tunnels by name and access grants.
#[derive(Default)]
pub struct Platform {
    /// `[tunnels]`.
    pub tunnels: Option<crate::config::TunnelSettings>,
    /// `[grants]`: certificates from sluice's own CA, checked against the grant store.
    pub grants: Option<Arc<crate::grant::Grants>>,
    /// The store tunnel names are kept in (shared with the grants); `None`: `sluice.db` in
    /// the state directory.
    pub store: Option<Arc<crate::store::Store>>,
    /// Locks, checked at authentication.
    pub locks: Option<Arc<crate::lock::Locks>>,
}

impl SshServer {
    /// Loads (or makes) the host key and the authorized keys; nothing is served yet.
    pub fn new(
        settings: &SshSettings,
        state_dir: &Path,
        source: Option<&Path>,
        channel_idle: crate::relay::Idle,
        stop: CancellationToken,
        previous: Option<&SshServer>,
        platform: Platform,
    ) -> Result<SshServer, SshError> {
        let Platform {
            tunnels,
            grants,
            store,
            locks,
        } = platform;
        let key_path = host_key_path(settings, state_dir);
        let host_key = load_or_create_host_key(&key_path)?;
        let host_fingerprint = host_key
            .public_key()
            .fingerprint(russh::keys::HashAlg::Sha256)
            .to_string();
        let keys = Arc::new(KeyStore::load(&settings.authorized_keys, source)?);
        keys.watch(Duration::from_secs(2));
        let socket_dir = settings
            .socket_dir
            .clone()
            .unwrap_or_else(|| state_dir.join("sockets"));
        crate::state::ensure_dir(&socket_dir).map_err(|source| SshError::SocketDir {
            path: socket_dir.clone(),
            source,
        })?;
        // A reload keeps the registry (live tunnels stay up) unless tunnels were switched on.
        let registry = match previous {
            Some(p) if p.tunnels.is_some() || tunnels.is_none() => p.registry.clone(),
            _ if tunnels.is_some() => {
                let store = match store {
                    Some(s) => s,
                    None => Arc::new(crate::store::Store::open(state_dir)?),
                };
                Arc::new(crate::tunnel::Registry::open(store)?)
            }
            _ => Arc::new(crate::tunnel::Registry::default()),
        };
        Ok(SshServer {
            config: Arc::new(russh_config(settings, host_key)),
            settings: settings.clone(),
            keys,
            socket_dir,
            channel_idle,
            stop,
            penalties: previous.map_or_else(
                || Arc::new(penalty::Penalties::new(penalty::SOURCES)),
                |p| p.penalties.clone(),
            ),
            sockets: previous.map_or_else(Default::default, |p| p.sockets.clone()),
            ports: previous.map_or_else(Default::default, |p| p.ports.clone()),
            tunnels,
            registry,
            grants,
            locks,
            host_fingerprint,
        })
    }

    /// The host key's fingerprint, `SHA256:...` as OpenSSH prints it.
    pub fn host_fingerprint(&self) -> &str {
        &self.host_fingerprint
    }

    /// The authorized keys in force (for reloads).
    pub fn keys(&self) -> &Arc<KeyStore> {
        &self.keys
    }

    /// Runs one SSH connection to its end. `peer` is the real client address (for `from=`,
    /// `source-address` and logs). Returns how it ended, for the connection log.
    pub async fn serve<S>(self: &Arc<Self>, stream: S, peer: SocketAddr) -> SshEnd
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // No refusal here, however penalised the source: a valid key must get in (see penalty).
        let authenticated = Arc::new(AtomicBool::new(false));
        let state = Arc::new(handler::ConnState::default());
        // russh runs the session in its own task; this token lets sluice end it regardless.
        let kill = CancellationToken::new();
        let stream = crate::io::Killable::new(stream, kill.clone());
        let _kill_on_return = kill.clone().drop_guard();
        let h = handler::Conn::new(
            self.clone(),
            peer,
            authenticated.clone(),
            state.clone(),
            kill.clone(),
        );
        // The whole pre-authentication phase, banner exchange included, is bounded.
        let auth_deadline = tokio::time::Instant::now() + self.settings.auth_timeout;
        let session = match tokio::time::timeout_at(
            auth_deadline,
            russh::server::run_stream(self.config.clone(), stream, h),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return SshEnd::HandshakeFailed(e.to_string()),
            // run_stream returns once the client's banner line is in: past it, a stall is
            // the key exchange's or authentication's (see ConnState::stalled_at).
            Err(_) => return SshEnd::NoBanner,
        };
        let handle = session.handle();
        let auth_deadline = tokio::time::sleep_until(auth_deadline);
        tokio::pin!(auth_deadline);
        tokio::pin!(session);
        let mut auth_watch = true;
        let mut timed_out = false;
        let mut stopped = false;
        let result = loop {
            tokio::select! {
                r = &mut session => break r,
                () = &mut auth_deadline, if auth_watch => {
                    auth_watch = false;
                    if !authenticated.load(Ordering::Acquire) {
                        timed_out = true;
                        warn!(target: "sluice::ssh::auth", "Timeout before authentication for {} port {}", peer.ip(), peer.port());
                        say_goodbye(&handle, &kill, "authentication timed out");
                    }
                }
                () = self.stop.cancelled() => {
                    stopped = true;
                    say_goodbye(&handle, &kill, "sluice is shutting down");
                    let _ = tokio::time::timeout(GOODBYE + Duration::from_secs(1), &mut session).await;
                    break Ok(());
                }
            }
        };
        let mut refused = false;
        if !authenticated.load(Ordering::Acquire) {
            if let Some((user, what, reason)) = state.last_failure() {
                refused = true;
                warn!(target: "sluice::ssh::auth", "Failed publickey for {user} from {} port {} ssh2: {what}: {reason}", peer.ip(), peer.port());
                let now = tokio::time::Instant::now();
                let exempt = &self.settings.penalty_exempt;
                if let Some(p) = self.penalties.record(peer.ip(), exempt, now) {
                    info!(
                        target: "sluice::ssh::auth",
                        source = %penalty::Source::of(peer.ip()),
                        peer = %peer,
                        penalty_s = p.as_secs(),
                        "penalty raised: failed authentication"
                    );
                }
                crate::metrics::get()
                    .ssh_auth
                    .get_or_create(&crate::metrics::ResultLabels { result: "rejected" })
                    .inc();
            }
        }
        let who = state.describe();
        if timed_out {
            SshEnd::AuthTimeout {
                who,
                stalled: state.stalled_at(),
            }
        } else if stopped {
            SshEnd::Shutdown { who }
        } else {
            SshEnd::Ended {
                who,
                refused,
                error: result.err().map(|e| e.to_string()),
            }
        }
    }
}

pub(crate) use crate::text::{clean, clean_text};

/// How long a disconnect message gets to reach the client before the connection is cut.
pub(crate) const GOODBYE: Duration = Duration::from_secs(2);

/// Sends SSH_MSG_DISCONNECT (when the transport can carry it), then cuts the connection
/// after [`GOODBYE`] whatever the client does.
pub(crate) fn say_goodbye(handle: &russh::server::Handle, kill: &CancellationToken, why: &str) {
    let (handle, kill, why) = (handle.clone(), kill.clone(), why.to_string());
    tokio::spawn(async move {
        let _ = tokio::time::timeout(
            GOODBYE,
            handle.disconnect(russh::Disconnect::ByApplication, why, String::new()),
        )
        .await;
        tokio::time::sleep(GOODBYE).await;
        kill.cancel();
    });
}

fn russh_config(s: &SshSettings, host_key: PrivateKey) -> russh::server::Config {
    use russh::{cipher, kex, mac, Preferred};
    use std::borrow::Cow;
    let preferred = Preferred {
        kex: Cow::Borrowed(&[
            kex::MLKEM768X25519_SHA256,
            kex::CURVE25519,
            kex::CURVE25519_PRE_RFC_8731,
            kex::EXTENSION_SUPPORT_AS_SERVER,
            kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
        ]),
        key: Cow::Borrowed(&[
            russh::keys::Algorithm::Ed25519,
            russh::keys::Algorithm::Ecdsa {
                curve: russh::keys::EcdsaCurve::NistP256,
            },
            russh::keys::Algorithm::Ecdsa {
                curve: russh::keys::EcdsaCurve::NistP384,
            },
            russh::keys::Algorithm::Ecdsa {
                curve: russh::keys::EcdsaCurve::NistP521,
            },
            russh::keys::Algorithm::Rsa {
                hash: Some(russh::keys::HashAlg::Sha512),
            },
            russh::keys::Algorithm::Rsa {
                hash: Some(russh::keys::HashAlg::Sha256),
            },
        ]),
        host_key_certificates: Cow::Borrowed(&[]),
        cipher: Cow::Borrowed(&[
            cipher::CHACHA20_POLY1305,
            cipher::AES_256_GCM,
            cipher::AES_128_GCM,
            cipher::AES_256_CTR,
            cipher::AES_128_CTR,
        ]),
        mac: Cow::Borrowed(&[mac::HMAC_SHA512_ETM, mac::HMAC_SHA256_ETM]),
        // The stream is already inside TLS, and decompression has had DoS advisories.
        compression: Cow::Borrowed(&[russh::compression::NONE]),
    };
    russh::server::Config {
        server_id: russh::SshId::Standard(Cow::Borrowed("SSH-2.0-sluice")),
        methods: russh::MethodSet::from(&[russh::MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_secs(1),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        max_auth_attempts: s.max_auth_attempts as usize,
        // Liveness comes from keepalives; tunnels may be quiet for a long time.
        inactivity_timeout: None,
        keepalive_interval: Some(s.keepalive_interval),
        keepalive_max: 3,
        // With window granted on consumption (vendor/russh), a channel holds at most one
        // window (2 MiB) unread: 64 full packets. Room for that and for small packets.
        channel_buffer_size: 256,
        window_budget: WINDOW_BUDGET,
        preferred,
        ..Default::default()
    }
}

/// Process-wide budget for unread SSH channel data (vendor/russh, `Config::window_budget`):
/// window offered to clients plus data received and not yet relayed, over all sessions. When
/// it is used up, clients wait for window instead of the daemon's memory growing. 256 MiB is
/// 128 channels at the full 2 MiB window; without it, 32 channels x 2 MiB x 256 connections
/// from one address could pin 16 GiB. (A candidate for an `[ssh]` setting.)
pub const WINDOW_BUDGET: usize = 256 << 20;

/// Logs what a reload or the first load found.
pub(crate) fn log_skipped(skipped: &[authorized_keys::Skipped]) {
    for s in skipped {
        warn!(line = %s.origin, reason = %s.reason, "authorized_keys: line skipped");
    }
}

/// Logs the authorized keys in force.
pub(crate) fn log_loaded(store: &KeyStore) {
    let (keys, cas) = store.counts();
    info!(keys, cert_authorities = cas, "authorized keys loaded");
    if keys + cas == 0 {
        warn!("no authorized keys: nobody can log in to the embedded SSH server");
    }
}
