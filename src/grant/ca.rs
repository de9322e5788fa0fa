//! sluice's own user CA: the Ed25519 key that signs grant certificates. Made 0600 in the state
//! directory on first use (`ssh_user_ca`, its public line beside it in `ssh_user_ca.pub`), or
//! read from `[grants] ca_key`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::{Certificate, HashAlg, PrivateKey, PublicKey};

/// The CA key's file name in the state directory.
pub const CA_FILE: &str = "ssh_user_ca";

/// The CA key could not be read or made.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct CaError {
    /// The key file.
    pub path: PathBuf,
    /// What went wrong.
    pub message: String,
}

/// The CA that signs grant certificates.
pub struct UserCa {
    key: PrivateKey,
    fingerprint: String,
}

/// What a grant certificate says.
pub(crate) struct CertSpec<'a> {
    pub(crate) key: &'a PublicKey,
    /// The grant id.
    pub(crate) key_id: &'a str,
    /// The device id: the one principal, and so the login name.
    pub(crate) principal: &'a str,
    pub(crate) valid_after: SystemTime,
    pub(crate) valid_before: SystemTime,
    /// `source-address` (comma-separated CIDRs), when the grant pins one.
    pub(crate) source_address: Option<&'a str>,
}

impl UserCa {
    /// Loads the key at `path`, or makes one there (0600) if there is none.
    pub fn load_or_create(path: &Path) -> Result<UserCa, CaError> {
        let err = |message: String| CaError {
            path: path.to_path_buf(),
            message,
        };
        let key = match std::fs::read_to_string(path) {
            Ok(text) => {
                let key = PrivateKey::from_openssh(&text)
                    .map_err(|e| err(format!("not an OpenSSH private key: {e}")))?;
                if key.is_encrypted() {
                    return Err(err(
                        "the CA key is encrypted; sluice needs it without a passphrase".into(),
                    ));
                }
                key
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = crate::sshkey::create_key_files(path, "sluice user CA").map_err(err)?;
                tracing::info!(path = %path.display(), "made a new ssh user CA for grants");
                key
            }
            Err(e) => return Err(err(e.to_string())),
        };
        let fingerprint = key.public_key().fingerprint(HashAlg::Sha256).to_string();
        Ok(UserCa { key, fingerprint })
    }

    /// The CA's public key.
    pub fn public_key(&self) -> &PublicKey {
        self.key.public_key()
    }

    /// `SHA256:...`.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The public line, as a `cert-authority` line elsewhere would quote it.
    pub fn public_line(&self) -> String {
        self.key
            .public_key()
            .to_openssh()
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Signs a user certificate that allows port forwarding and nothing else.
    pub(crate) fn sign(&self, spec: &CertSpec<'_>) -> Result<Certificate, String> {
        let secs = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        };
        let mut nonce = [0u8; 16];
        let mut serial = [0u8; 8];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| "no randomness".to_string())?;
        aws_lc_rs::rand::fill(&mut serial).map_err(|_| "no randomness".to_string())?;
        let e = |e: russh::keys::ssh_key::Error| e.to_string();
        let mut b = Builder::new(
            nonce,
            spec.key.key_data().clone(),
            secs(spec.valid_after),
            secs(spec.valid_before),
        )
        .map_err(e)?;
        b.cert_type(CertType::User).map_err(e)?;
        b.serial(u64::from_be_bytes(serial)).map_err(e)?;
        b.key_id(spec.key_id).map_err(e)?;
        b.valid_principal(spec.principal).map_err(e)?;
        b.extension("permit-port-forwarding", "").map_err(e)?;
        if let Some(sa) = spec.source_address {
            b.critical_option("source-address", sa).map_err(e)?;
        }
        b.comment(format!("sluice grant {}", spec.key_id))
            .map_err(e)?;
        b.sign(&self.key).map_err(e)
    }

    /// Whether this CA signed `cert` (its signature key is ours; russh has checked the
    /// signature itself before authentication sees it).
    pub(crate) fn signed(&self, cert: &Certificate) -> bool {
        cert.signature_key() == self.key.public_key().key_data()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_new_ca_is_private_and_kept_and_its_certificates_validate() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CA_FILE);
        let ca = UserCa::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = UserCa::load_or_create(&path).unwrap();
        assert_eq!(ca.public_line(), again.public_line(), "the CA is kept");
        assert!(ca.public_line().starts_with("ssh-ed25519 "));

        let device = PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(
            &[3; 32],
        ));
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let cert = ca
            .sign(&CertSpec {
                key: device.public_key(),
                key_id: "g-1",
                principal: "00:1b:44:11:3a:b7",
                valid_after: now - Duration::from_secs(60),
                valid_before: now + Duration::from_secs(7200),
                source_address: Some("10.0.0.0/8"),
            })
            .unwrap();
        assert!(ca.signed(&cert));
        let fp = ca.public_key().fingerprint(HashAlg::Sha256);
        cert.validate_at(1_800_000_001, [&fp]).unwrap();
        assert!(cert.validate_at(1_800_007_200, [&fp]).is_err(), "expired");
        assert_eq!(cert.key_id(), "g-1");
        assert_eq!(cert.valid_principals(), ["00:1b:44:11:3a:b7"]);
        assert_eq!(cert.cert_type(), CertType::User);
        assert!(cert.extensions().contains_key("permit-port-forwarding"));
        assert_eq!(cert.extensions().len(), 1, "no pty, no agent, no X11");
        assert_eq!(
            cert.critical_options()
                .get("source-address")
                .map(String::as_str),
            Some("10.0.0.0/8")
        );
        let other = UserCa::load_or_create(&dir.path().join("other")).unwrap();
        assert!(!other.signed(&cert));
    }
}
