//! Who the client says it is: keys from files (`-i`), from `SSH_KEY` (a path or the key
//! itself), from a grant bundle, or held by ssh-agent; OpenSSH certificates beside them.
//! Files are read once at start (an encrypted key asks for its passphrase on the terminal
//! once), the agent at every connection (keys come and go in it).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh::keys::{Certificate, HashAlg, PrivateKey, PrivateKeyWithHashAlg};

use super::TunnelError;

/// A private key and the certificate that goes with it, if any.
#[derive(Clone)]
pub struct Key {
    /// The key.
    pub key: Arc<PrivateKey>,
    /// An OpenSSH certificate for it (tried first).
    pub certificate: Option<Certificate>,
    /// Where it came from, for messages.
    pub from: String,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        f.debug_struct("Key")
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// This key with `certificate` (a `...-cert.pub` line, e.g. from a grant bundle).
    pub fn with_certificate(
        mut self,
        certificate_text: &str,
        from: &str,
    ) -> Result<Key, TunnelError> {
        let cert = certificate(certificate_text, from)?;
        if cert.public_key() != self.key.public_key().key_data() {
            return Err(bad_key(
                from,
                format!("the certificate is for another key than {}", self.from),
            ));
        }
        self.certificate = Some(cert);
        Ok(self)
    }
}

/// Every way the client may authenticate, in the order tried.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// Keys loaded at start.
    pub keys: Vec<Key>,
    /// Also ask ssh-agent (`SSH_AUTH_SOCK`) at every connection.
    pub agent: bool,
}

/// Where a key is read from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A file, with `FILE-cert.pub` beside it used if it exists.
    File(PathBuf),
    /// The key text itself (`SSH_KEY` holding a key rather than a path).
    Text(String),
    /// A key and certificate given together (a grant bundle).
    WithCertificate {
        /// Private key text.
        key: String,
        /// The `...-cert.pub` line.
        certificate: String,
        /// For messages.
        from: String,
    },
}

impl KeySource {
    /// `SSH_KEY`: the key if it looks like one, else a path.
    pub fn from_env_value(v: &str) -> KeySource {
        if v.trim_start().starts_with("-----BEGIN") || v.starts_with("PuTTY-User-Key-File-") {
            KeySource::Text(v.to_string())
        } else {
            KeySource::File(PathBuf::from(v))
        }
    }
}

fn bad_key(from: &str, why: impl std::fmt::Display) -> TunnelError {
    TunnelError::Config(format!("{from}: {why}"))
}

/// Decodes `text`, asking for a passphrase on the terminal if it is encrypted.
fn decode(text: &str, from: &str) -> Result<PrivateKey, TunnelError> {
    match russh::keys::decode_secret_key(text, None) {
        Ok(k) => Ok(k),
        Err(russh::keys::Error::KeyIsEncrypted) => {
            let pass = ask_passphrase(&format!("Enter passphrase for {from}: ")).map_err(|e| {
                bad_key(
                    from,
                    format!("the key is encrypted and {e}; load it into ssh-agent instead"),
                )
            })?;
            russh::keys::decode_secret_key(text, Some(&pass)).map_err(|e| match e {
                russh::keys::Error::KeyIsEncrypted => bad_key(from, "wrong passphrase"),
                e => bad_key(from, format!("cannot decrypt: {e}")),
            })
        }
        Err(e) => Err(bad_key(
            from,
            format!("not a private key sluice can read: {e}"),
        )),
    }
}

fn certificate(text: &str, from: &str) -> Result<Certificate, TunnelError> {
    Certificate::from_openssh(text.trim())
        .map_err(|e| bad_key(from, format!("not an OpenSSH certificate: {e}")))
}

/// Reads one key (and its certificate).
pub fn load(source: &KeySource) -> Result<Key, TunnelError> {
    match source {
        KeySource::File(path) => {
            let from = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|e| bad_key(&from, e))?;
            let key = decode(&text, &from)?;
            let cert_path = cert_beside(path);
            let certificate = match std::fs::read_to_string(&cert_path) {
                Ok(t) => Some(certificate(&t, &cert_path.display().to_string())?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(bad_key(&cert_path.display().to_string(), e)),
            };
            Ok(Key {
                key: Arc::new(key),
                certificate,
                from,
            })
        }
        KeySource::Text(text) => Ok(Key {
            key: Arc::new(decode(text, "SSH_KEY")?),
            certificate: None,
            from: "SSH_KEY".into(),
        }),
        KeySource::WithCertificate {
            key,
            certificate: cert,
            from,
        } => Ok(Key {
            key: Arc::new(decode(key, from)?),
            certificate: Some(certificate(cert, from)?),
            from: from.clone(),
        }),
    }
}

/// `FILE-cert.pub`, where OpenSSH looks for a key's certificate.
pub fn cert_beside(key: &Path) -> PathBuf {
    let mut s = key.as_os_str().to_owned();
    s.push("-cert.pub");
    PathBuf::from(s)
}

/// The keys OpenSSH would try without `-i`: `~/.ssh/id_ed25519`, `id_ecdsa`, `id_rsa`, those
/// that exist.
pub fn default_files() -> Vec<PathBuf> {
    let Some(home) = std::env::var_os("HOME") else {
        return Vec::new();
    };
    ["id_ed25519", "id_ecdsa", "id_rsa"]
        .iter()
        .map(|n| Path::new(&home).join(".ssh").join(n))
        .filter(|p| p.is_file())
        .collect()
}

/// The key with the signature hash to use (RSA: SHA-512 unless the server says otherwise).
pub(super) fn with_hash(
    key: &Arc<PrivateKey>,
    rsa: Option<Option<HashAlg>>,
) -> PrivateKeyWithHashAlg {
    PrivateKeyWithHashAlg::new(key.clone(), rsa.unwrap_or(Some(HashAlg::Sha512)))
}

/// Reads a passphrase from the controlling terminal without echo.
fn ask_passphrase(prompt: &str) -> Result<String, String> {
    use rustix::termios::{tcgetattr, tcsetattr, LocalModes, OptionalActions};
    use std::io::{BufRead, Write};
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|_| "there is no terminal to ask for its passphrase".to_string())?;
    let saved = tcgetattr(&tty).map_err(|e| format!("the terminal: {e}"))?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(LocalModes::ECHO);
    quiet.local_modes.insert(LocalModes::ECHONL);
    tcsetattr(&tty, OptionalActions::Flush, &quiet).map_err(|e| format!("the terminal: {e}"))?;
    let mut out = &tty;
    let _ = out.write_all(prompt.as_bytes());
    let mut line = String::new();
    let read = std::io::BufReader::new(&tty).read_line(&mut line);
    let _ = tcsetattr(&tty, OptionalActions::Flush, &saved);
    read.map_err(|e| format!("the terminal: {e}"))?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_key_holds_a_path_or_a_key() {
        assert!(matches!(
            KeySource::from_env_value("/home/me/.ssh/id_ed25519"),
            KeySource::File(p) if p == Path::new("/home/me/.ssh/id_ed25519")
        ));
        assert!(matches!(
            KeySource::from_env_value("-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n"),
            KeySource::Text(_)
        ));
        assert_eq!(
            cert_beside(Path::new("/k/device_key")),
            Path::new("/k/device_key-cert.pub")
        );
    }

    #[test]
    fn keys_load_with_their_certificates_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::sshkey::new_ed25519("t").unwrap();
        let path = dir.path().join("id");
        std::fs::write(
            &path,
            key.to_openssh(Default::default()).unwrap().as_bytes(),
        )
        .unwrap();
        let k = load(&KeySource::File(path.clone())).unwrap();
        assert!(k.certificate.is_none());
        assert_eq!(k.key.public_key(), key.public_key());
        std::fs::write(
            cert_beside(&path),
            "ssh-ed25519-cert-v01@openssh.com AAAA\n",
        )
        .unwrap();
        let e = load(&KeySource::File(path)).unwrap_err().to_string();
        assert!(
            e.contains("id-cert.pub") && e.contains("certificate"),
            "{e}"
        );
        let e = load(&KeySource::Text(
            "-----BEGIN OPENSSH PRIVATE KEY-----\nnope\n".into(),
        ))
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("SSH_KEY:"), "{e}");
        let e = load(&KeySource::File(dir.path().join("missing")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }
}
