//! The authorized keys in force: parsed from the `ssh.authorized_keys` files and swapped
//! atomically on reload, so a reload never disturbs a login in progress or an open session.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use russh::keys::ssh_key::public::KeyData;
use russh::keys::PublicKey;

use super::authorized_keys::{self, AuthorizedKey, Skipped};
use crate::config::{ConfigError, ConfigPath};
use crate::sys::SystemTz;

/// All keys from all files, split into login keys and certificate authorities.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<AuthorizedKey>,
    cas: Vec<AuthorizedKey>,
}

impl KeySet {
    /// Lines (in file order) that authorize this key to log in itself.
    pub fn lines_for<'a>(
        &'a self,
        key: &'a PublicKey,
    ) -> impl Iterator<Item = &'a AuthorizedKey> + 'a {
        self.keys
            .iter()
            .filter(move |k| k.key.key_data() == key.key_data())
    }

    /// cert-authority lines for this CA key.
    pub fn cas_for<'a>(&'a self, ca: &'a KeyData) -> impl Iterator<Item = &'a AuthorizedKey> + 'a {
        self.cas.iter().filter(move |k| k.key.key_data() == ca)
    }

    /// Whether any cert-authority line exists.
    pub fn has_cas(&self) -> bool {
        !self.cas.is_empty()
    }
}

/// The swappable key set and the files it came from.
pub struct KeyStore {
    files: Vec<ConfigPath>,
    source: Option<std::path::PathBuf>,
    current: ArcSwap<KeySet>,
}

impl KeyStore {
    /// Loads every file; an unreadable file is a config error, a bad line only a warning.
    pub fn load(files: &[ConfigPath], source: Option<&Path>) -> Result<KeyStore, ConfigError> {
        let (set, skipped) = read_all(files, source, false)?;
        super::log_skipped(&skipped);
        let store = KeyStore {
            files: files.to_vec(),
            source: source.map(Path::to_path_buf),
            current: ArcSwap::from_pointee(set),
        };
        super::log_loaded(&store);
        Ok(store)
    }

    /// Re-reads the files; on any unreadable file the old set stays in force.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let (set, skipped) = read_all(&self.files, self.source.as_deref(), true)?;
        super::log_skipped(&skipped);
        self.current.store(Arc::new(set));
        super::log_loaded(self);
        Ok(())
    }

    /// The set in force.
    pub fn current(&self) -> Arc<KeySet> {
        self.current.load_full()
    }

    /// (login keys, certificate authorities).
    pub fn counts(&self) -> (usize, usize) {
        let c = self.current.load();
        (c.keys.len(), c.cas.len())
    }
}

/// On a reload (`missing_is_empty`), a deleted file revokes its keys; other read errors keep
/// the old set in force. At start, a missing file is a config error (a typo, most likely).
fn read_all(
    files: &[ConfigPath],
    source: Option<&Path>,
    missing_is_empty: bool,
) -> Result<(KeySet, Vec<Skipped>), ConfigError> {
    let mut set = KeySet::default();
    let mut skipped = Vec::new();
    for f in files {
        let text = match std::fs::read_to_string(&f.path) {
            Ok(t) => t,
            Err(e) if missing_is_empty && e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(file = %f.path.display(), "authorized_keys file is gone: its keys no longer log in");
                String::new()
            }
            Err(e) => {
                return Err(ConfigError::at(
                    source,
                    &f.at,
                    format!("{}: cannot read authorized keys: {e}", f.path.display()),
                ))
            }
        };
        let (keys, bad) = authorized_keys::parse(&text, &f.path.display().to_string(), &SystemTz);
        skipped.extend(bad);
        for k in keys {
            if k.options.cert_authority {
                set.cas.push(k);
            } else {
                set.keys.push(k);
            }
        }
    }
    Ok((set, skipped))
}

impl KeyStore {
    /// Re-reads the files whenever their content changes, checked every `every` (content, not
    /// mtime or inotify: Kubernetes secrets and certbot swap symlinks). Stops with the store.
    pub fn watch(self: &Arc<Self>, every: std::time::Duration) {
        let weak = Arc::downgrade(self);
        let mut last = content_digest(&self.files);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(store) = weak.upgrade() else { return };
                let now = content_digest(&store.files);
                if now == last {
                    continue;
                }
                last = now;
                match store.reload() {
                    Ok(()) => tracing::info!("authorized keys reloaded: a file changed"),
                    Err(e) => tracing::warn!(
                        "authorized keys not reloaded, the old ones stay in force: {e}"
                    ),
                }
            }
        });
    }
}

fn content_digest(files: &[ConfigPath]) -> Vec<Option<u64>> {
    crate::state::digest_files(files.iter().map(|f| f.path.as_path()))
}
