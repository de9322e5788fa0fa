//! The server's Ed25519 host key: loaded from `ssh.host_key`, or made there (mode 0600) on
//! first start and reused afterwards, so clients' known_hosts entries stay valid.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use russh::keys::PrivateKey;
use tracing::{info, warn};

use crate::config::SshSettings;

/// The default file name in the state directory.
pub(super) const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";

/// The host key could not be loaded or made.
#[derive(Debug, thiserror::Error)]
#[error("ssh host key {}: {message}", path.display())]
pub struct HostKeyError {
    /// The key file.
    pub path: PathBuf,
    /// What failed.
    pub message: String,
}

/// Where the host key lives.
pub fn host_key_path(s: &SshSettings, state_dir: &Path) -> PathBuf {
    s.host_key
        .clone()
        .unwrap_or_else(|| state_dir.join(HOST_KEY_FILE))
}

/// Loads the key at `path`, or makes a new Ed25519 key there if there is no file.
pub fn load_or_create_host_key(path: &Path) -> Result<PrivateKey, HostKeyError> {
    let err = |message: String| HostKeyError {
        path: path.to_path_buf(),
        message,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = PrivateKey::from_openssh(&text)
                .map_err(|e| err(format!("not an OpenSSH private key: {e}")))?;
            if key.is_encrypted() {
                return Err(err(
                    "the key is encrypted; sluice needs it without a passphrase".into(),
                ));
            }
            if let Ok(meta) = std::fs::metadata(path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    warn!(path = %path.display(), "ssh host key is readable by group or others; chmod 600 it");
                }
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = crate::sshkey::create_key_files(path, "sluice host key").map_err(err)?;
            info!(path = %path.display(), "made a new ssh host key");
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}
