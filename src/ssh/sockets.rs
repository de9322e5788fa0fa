//! The `-R /name` unix sockets: names checked, claimed once across all sessions (and across
//! a reload, which shares the registry), and given back by dropping the claim, which removes
//! the socket file first.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::net::UnixListener;

/// The socket file name for `ssh -R /name:...`: the last path component, a safe name.
pub(crate) fn socket_name(requested: &str) -> Option<String> {
    let name = Path::new(requested).file_name()?.to_str()?;
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    ok.then(|| name.to_string())
}

/// Socket names held by live sessions.
#[derive(Default)]
pub(crate) struct Sockets {
    names: Mutex<HashSet<String>>,
}

/// One held socket: dropping it removes the file, then frees the name.
pub(crate) struct Claim {
    sockets: Arc<Sockets>,
    name: String,
    path: PathBuf,
}

impl Claim {
    /// Where the socket is.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut names = self.sockets.lock();
        let _ = std::fs::remove_file(&self.path);
        names.remove(&self.name);
    }
}

impl Sockets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds socket `name` (from [`socket_name`]) in `dir`. The name is claimed under the lock,
    /// so two sessions cannot race for it; a file left by a crashed run is replaced.
    pub(crate) fn claim(
        self: &Arc<Self>,
        dir: &Path,
        name: &str,
    ) -> io::Result<(Claim, UnixListener)> {
        let mut names = self.lock();
        if names.contains(name) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another session holds this socket",
            ));
        }
        let path = dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        names.insert(name.to_string());
        let claim = Claim {
            sockets: self.clone(),
            name: name.to_string(),
            path,
        };
        Ok((claim, listener))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names() {
        assert_eq!(socket_name("/app.sock").as_deref(), Some("app.sock"));
        assert_eq!(
            socket_name("/x/y/preview-42_a.sock").as_deref(),
            Some("preview-42_a.sock")
        );
        assert_eq!(socket_name("/.hidden"), None);
        assert_eq!(socket_name("/a b"), None);
        assert_eq!(socket_name("/"), None);
        assert_eq!(socket_name("/.."), None);
    }

    #[tokio::test]
    async fn a_name_is_held_once_and_its_file_goes_with_the_claim() {
        let dir = tempfile::tempdir().unwrap();
        let sockets = Arc::new(Sockets::default());
        // A file left by a crashed run is replaced.
        std::fs::write(dir.path().join("app"), b"stale").unwrap();
        let (claim, _l) = sockets.claim(dir.path(), "app").unwrap();
        assert!(claim.path().exists());
        let taken = sockets.claim(dir.path(), "app").map(|_| ()).unwrap_err();
        assert_eq!(taken.kind(), io::ErrorKind::AddrInUse);
        let path = claim.path().to_path_buf();
        drop(claim);
        assert!(!path.exists(), "the socket file outlived its claim");
        assert!(
            sockets.claim(dir.path(), "app").is_ok(),
            "the name came back"
        );
    }
}
