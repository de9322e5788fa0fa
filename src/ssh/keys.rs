//! The authorized keys in force: parsed from the `ssh.authorized_keys` files and swapped
//! atomically on reload, so a reload never disturbs a login in progress or an open session.

use std::path::Path;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use russh::keys::ssh_key::public::KeyData;
use russh::keys::PublicKey;

use super::authorized_keys::{self, AuthorizedKey, Skipped};
use super::tz::SystemTz;
use crate::config::{ConfigError, ConfigPath};

/// All keys from all files, split into login keys and certificate authorities.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<AuthorizedKey>,
    cas: Vec<AuthorizedKey>,
}

impl KeySet {
    /// The set of these lines: `cert-authority` lines are CAs, the rest log in themselves.
    pub(crate) fn from_keys(lines: Vec<AuthorizedKey>) -> KeySet {
        let (cas, keys) = lines.into_iter().partition(|k| k.options.cert_authority);
        KeySet { keys, cas }
    }

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
    /// Digests of the bytes the set in force was parsed from (`None`: a file that was gone),
    /// the watcher's baseline: a change made after they were read is always seen.
    parsed: Mutex<Digests>,
}

/// One digest per file, in order (see [`digest`]).
type Digests = Vec<Option<u64>>;

impl KeyStore {
    /// Loads every file; an unreadable file is a config error, a bad line only a warning.
    pub fn load(files: &[ConfigPath], source: Option<&Path>) -> Result<KeyStore, ConfigError> {
        let (set, skipped, parsed) = read_all(files, source, false)?;
        super::log_skipped(&skipped);
        let store = KeyStore {
            files: files.to_vec(),
            source: source.map(Path::to_path_buf),
            current: ArcSwap::from_pointee(set),
            parsed: Mutex::new(parsed),
        };
        super::log_loaded(&store);
        Ok(store)
    }

    /// Re-reads the files; on any unreadable file the old set stays in force.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let (set, skipped, parsed) = read_all(&self.files, self.source.as_deref(), true)?;
        super::log_skipped(&skipped);
        // Set and baseline change together: the watcher never pairs one with the other's files.
        let mut baseline = self.parsed.lock().unwrap_or_else(|p| p.into_inner());
        self.current.store(Arc::new(set));
        *baseline = parsed;
        drop(baseline);
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
/// Returns the set, the skipped lines and the digests of the bytes parsed.
fn read_all(
    files: &[ConfigPath],
    source: Option<&Path>,
    missing_is_empty: bool,
) -> Result<(KeySet, Vec<Skipped>, Digests), ConfigError> {
    let mut lines = Vec::new();
    let mut skipped = Vec::new();
    let mut digests = Vec::new();
    for f in files {
        let bytes = match std::fs::read(&f.path) {
            Ok(b) => {
                digests.push(Some(digest(&b)));
                b
            }
            Err(e) if missing_is_empty && e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(file = %f.path.display(), "authorized_keys file is gone: its keys no longer log in");
                digests.push(None);
                Vec::new()
            }
            Err(e) => {
                return Err(ConfigError::at(
                    source,
                    &f.at,
                    format!("{}: cannot read authorized keys: {e}", f.path.display()),
                ))
            }
        };
        let (keys, bad) = authorized_keys::parse(&bytes, &f.path.display().to_string(), &SystemTz);
        skipped.extend(bad);
        keys.iter().for_each(warn_negated_names);
        lines.extend(keys);
    }
    Ok((KeySet::from_keys(lines), skipped, digests))
}

/// `from="!evil.example.org"` reads as "not from that host", but sluice does not resolve client
/// addresses to names, so the pattern never matches and keeps nobody out: say so at load.
fn warn_negated_names(k: &AuthorizedKey) {
    for name in k.options.from.iter().flat_map(|f| f.negated_names()) {
        tracing::warn!(
            line = %k.origin,
            pattern = %format!("!{name}"),
            "authorized_keys: from= negates a host name, which never matches (sluice does not resolve client addresses to names): it keeps nobody out; write addresses or CIDRs"
        );
    }
}

impl KeyStore {
    /// Re-reads the files whenever their content differs from what the set in force was parsed
    /// from, checked every `every` (content, not mtime or inotify: Kubernetes secrets and
    /// certbot swap symlinks). A failed reload is retried once the content changes again.
    /// Stops with the store.
    pub fn watch(self: &Arc<Self>, every: std::time::Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut failed: Option<Digests> = None;
            loop {
                tokio::time::sleep(every).await;
                let Some(store) = weak.upgrade() else { return };
                let now = content_digest(&store.files);
                let parsed = store
                    .parsed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                if now == parsed || failed.as_ref() == Some(&now) {
                    continue;
                }
                match store.reload() {
                    Ok(()) => {
                        failed = None;
                        tracing::info!("authorized keys reloaded: a file changed");
                        let (keys, cas) = store.counts();
                        crate::audit::record(|| crate::audit::Event::Reloaded {
                            what: "authorized_keys".into(),
                            ok: true,
                            detail: format!("a file changed: {keys} keys, {cas} cert authorities"),
                        });
                    }
                    Err(e) => {
                        failed = Some(now);
                        tracing::warn!(
                            "authorized keys not reloaded, the old ones stay in force: {e}"
                        );
                        crate::audit::record(|| crate::audit::Event::Reloaded {
                            what: "authorized_keys".into(),
                            ok: false,
                            detail: e.to_string(),
                        });
                    }
                }
            }
        });
    }
}

/// What each file holds now (`None`: unreadable or gone).
fn content_digest(files: &[ConfigPath]) -> Digests {
    files
        .iter()
        .map(|f| std::fs::read(&f.path).ok().map(|b| digest(&b)))
        .collect()
}

/// A digest of one file's bytes, for change detection (not an integrity check).
fn digest(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAII6PJt6gygun9F1+cX3z+z2WRqj2ULyj+c7gO9sh7kh4 a";
    const B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAII6B56wnfYJNEAn1Xl+QMosyveHiNopM1ygVr8CTslSJ b";

    fn key(line: &str) -> PublicKey {
        PublicKey::from_openssh(line).unwrap()
    }

    fn authorizes(store: &KeyStore, line: &str) -> bool {
        store.current().lines_for(&key(line)).next().is_some()
    }

    fn store_with(text: &[u8]) -> (tempfile::TempDir, std::path::PathBuf, KeyStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorized_keys");
        std::fs::write(&path, text).unwrap();
        let files = [ConfigPath {
            path: path.clone(),
            at: Default::default(),
        }];
        let store = KeyStore::load(&files, None).unwrap();
        (dir, path, store)
    }

    #[test]
    fn a_latin1_byte_does_not_keep_a_removed_key_in_force() {
        let (_dir, path, store) = store_with(format!("{A}\n{B}\n").as_bytes());
        assert!(authorizes(&store, A) && authorizes(&store, B));
        // B removed; A's comment rewritten in Latin-1 (é is 0xE9).
        let mut edit = A.as_bytes().to_vec();
        edit.extend_from_slice(b" Jos\xe9\n");
        std::fs::write(&path, &edit).unwrap();
        let reloaded = store.reload();
        assert!(
            !authorizes(&store, B),
            "the removed key still logs in (reload: {reloaded:?})"
        );
        reloaded.expect("a file with a non-UTF-8 line still loads");
        assert!(!authorizes(&store, A), "the non-UTF-8 line is skipped");
        std::fs::write(&path, format!("{A}\n# Jos\u{e9}\n")).unwrap();
        store.reload().unwrap();
        assert!(authorizes(&store, A));
    }

    /// Log lines written while `f` runs on this thread.
    fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let w = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || w.clone())
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        (out, text)
    }

    #[test]
    fn a_negated_host_name_in_from_warns_at_load() {
        let text = format!(
            "from=\"!evil.example.org,127.0.0.0/8\" {A}\nfrom=\"!10.0.0.1,10.0.0.0/8\" {B}\n"
        );
        let ((_dir, path, store), log) = logged(|| store_with(text.as_bytes()));
        let warned: Vec<&str> = log.lines().filter(|l| l.contains("from=")).collect();
        assert_eq!(warned.len(), 1, "{log}");
        assert!(
            warned[0].contains("WARN")
                && warned[0].contains(&format!("line={}:1", path.display()))
                && warned[0].contains("pattern=!evil.example.org")
                && warned[0].contains("negates a host name, which never matches"),
            "{log}"
        );
        assert!(authorizes(&store, A), "the line still loads");
        // And on every reload.
        let (r, log) = logged(|| store.reload());
        r.unwrap();
        assert!(log.contains("pattern=!evil.example.org"), "{log}");
    }

    #[tokio::test]
    async fn an_edit_made_right_after_loading_is_seen() {
        let (_dir, path, store) = store_with(format!("{A}\n").as_bytes());
        let store = Arc::new(store);
        // After the load, before the watcher starts: the window SshServer::new leaves.
        std::fs::write(&path, format!("{B}\n")).unwrap();
        store.watch(Duration::from_millis(10));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !authorizes(&store, B) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "an edit between loading and watching was never picked up"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!authorizes(&store, A));
    }
}
