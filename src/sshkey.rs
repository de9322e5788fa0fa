//! The Ed25519 keys sluice makes: the SSH host key, the grants' user CA, a grant's device key.

use std::path::Path;

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::PrivateKey;

/// A new Ed25519 key with `comment`.
pub(crate) fn new_ed25519(comment: &str) -> Result<PrivateKey, String> {
    let mut seed = [0u8; 32];
    aws_lc_rs::rand::fill(&mut seed).map_err(|_| "no randomness for a new key".to_string())?;
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment(comment);
    Ok(key)
}

/// Makes a new Ed25519 key at `path` (0600, its directory made if need be) and its public
/// line beside it (`.pub`); the key.
pub(crate) fn create_key_files(path: &Path, comment: &str) -> Result<PrivateKey, String> {
    let key = new_ed25519(comment)?;
    let pem = key.to_openssh(LineEnding::LF).map_err(|e| e.to_string())?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::state::ensure_dir(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    crate::state::write_private(path, pem.as_bytes()).map_err(|e| e.to_string())?;
    let public = key.public_key().to_openssh().map_err(|e| e.to_string())?;
    let _ = crate::state::write_public(
        &path.with_extension("pub"),
        format!("{public}\n").as_bytes(),
    );
    Ok(key)
}
