//! The embedded SSH server: a tunnel and jump host, not a login server.
//!
//! SSH streams that `conn` routed here (over TLS or plain) run through russh's `run_stream`.
//! Clients authenticate with public keys or OpenSSH user certificates only; they may open
//! `-W`/`-L`/`-J` channels to `permit_open` targets and publish `-R` listeners in
//! `listen_ports` (or unix sockets under `socket_dir`). Shells and commands are refused with a
//! message. Deny by default everywhere.

pub mod authorized_keys;
mod forward;
mod handler;
mod hostkey;
mod keys;
pub mod policy;

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

pub use hostkey::{host_key_path, load_or_create_host_key, HostKeyError};
pub use keys::KeyStore;

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
    /// Idle limit for each forwarded channel's relay.
    pub(crate) channel_idle: Duration,
    /// Cancelled when open connections must close (shutdown grace over).
    pub(crate) stop: CancellationToken,
    host_fingerprint: String,
}

impl SshServer {
    /// Loads (or makes) the host key and the authorized keys; nothing is served yet.
    pub fn new(
        settings: &SshSettings,
        state_dir: &Path,
        source: Option<&Path>,
        channel_idle: Duration,
        stop: CancellationToken,
    ) -> Result<SshServer, SshError> {
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
        Ok(SshServer {
            config: Arc::new(russh_config(settings, host_key)),
            settings: settings.clone(),
            keys,
            socket_dir,
            channel_idle,
            stop,
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
    /// `source-address` and logs). Returns a short outcome for the connection log.
    pub async fn serve<S>(self: &Arc<Self>, stream: S, peer: SocketAddr) -> String
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let authenticated = Arc::new(AtomicBool::new(false));
        let state = Arc::new(handler::ConnState::default());
        let h = handler::Conn::new(self.clone(), peer, authenticated.clone(), state.clone());
        let session = match russh::server::run_stream(self.config.clone(), stream, h).await {
            Ok(s) => s,
            Err(e) => return format!("ssh handshake failed: {e}"),
        };
        let handle = session.handle();
        let auth_deadline = tokio::time::sleep(self.settings.auth_timeout);
        tokio::pin!(auth_deadline);
        tokio::pin!(session);
        let mut auth_watch = true;
        let result = loop {
            tokio::select! {
                r = &mut session => break r,
                () = &mut auth_deadline, if auth_watch => {
                    auth_watch = false;
                    if !authenticated.load(Ordering::Acquire) {
                        warn!(%peer, "Timeout before authentication for {} port {}", peer.ip(), peer.port());
                        let _ = handle.disconnect(russh::Disconnect::ByApplication, "authentication timed out".into(), String::new()).await;
                    }
                }
                () = self.stop.cancelled() => {
                    let _ = handle.disconnect(russh::Disconnect::ByApplication, "sluice is shutting down".into(), String::new()).await;
                    // Give the disconnect a moment to be written, then stop waiting.
                    let _ = tokio::time::timeout(Duration::from_secs(2), &mut session).await;
                    break Ok(());
                }
            }
        };
        let who = state.describe();
        match result {
            Ok(()) => format!("ssh session ended{who}"),
            Err(e) => format!("ssh session ended{who}: {e}"),
        }
    }
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
        preferred,
        ..Default::default()
    }
}

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
