//! The state directory: where generated secrets (the self-signed certificate, host keys) live.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Picks the state directory: the explicit one, else systemd's `$STATE_DIRECTORY`, else
/// `$XDG_STATE_HOME/sluice`, else `~/.local/state/sluice`, else `/var/lib/sluice`.
pub fn resolve(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(s) = std::env::var("STATE_DIRECTORY")
        .ok()
        .and_then(|v| v.split(':').next().map(PathBuf::from))
    {
        if !s.as_os_str().is_empty() {
            return s;
        }
    }
    if let Some(x) = env("XDG_STATE_HOME") {
        return x.join("sluice");
    }
    if let Some(h) = env("HOME") {
        return h.join(".local/state/sluice");
    }
    PathBuf::from("/var/lib/sluice")
}

/// Creates `dir` (mode 0700) if it does not exist.
pub fn ensure_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Writes a secret atomically with mode 0600: a temporary file, fsync, rename.
pub fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    write_atomic(path, data, 0o600)
}

/// Writes a public file atomically with mode 0644.
pub fn write_public(path: &Path, data: &[u8]) -> io::Result<()> {
    write_atomic(path, data, 0o644)
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode; a secret must never be wider than asked.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A hash of each file's content (`None`: unreadable), to notice changes by content: mtimes
/// and inotify miss the symlink swaps of certbot and Kubernetes secret volumes.
pub(crate) fn digest_files<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Vec<Option<u64>> {
    use std::hash::{Hash, Hasher};
    paths
        .into_iter()
        .map(|p| {
            std::fs::read(p).ok().map(|b| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                b.hash(&mut h);
                h.finish()
            })
        })
        .collect()
}
