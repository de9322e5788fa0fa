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
    let (tmp, mut f) = create_temp_beside(path, mode)?;
    let result = (|| {
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

/// Creates a new file with a random name next to `path` (`.NAME.RANDOM.tmp`). Not the PID: a
/// stale temporary file of a process with the same PID (1, in a container, every time) would
/// make every later start fail.
fn create_temp_beside(path: &Path, mode: u32) -> io::Result<(PathBuf, fs::File)> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let mut last = io::Error::other("no temporary name");
    for _ in 0..8 {
        let mut r = [0u8; 8];
        aws_lc_rs::rand::SecureRandom::fill(&rng, &mut r)
            .map_err(|_| io::Error::other("no randomness for a temporary file name"))?;
        let tmp = dir.join(format!(".{name}.{:016x}.tmp", u64::from_le_bytes(r)));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// A hash of each file's content (`None`: unreadable), to notice changes by content: mtimes
/// and inotify miss the symlink swaps of certbot and Kubernetes secret volumes.
pub(crate) fn digest_files<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Vec<Option<u64>> {
    use std::hash::{Hash, Hasher};
    paths
        .into_iter()
        .map(|p| {
            fs::read(p).ok().map(|b| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                b.hash(&mut h);
                h.finish()
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_stale_temporary_file_does_not_block_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ssh_host_ed25519_key");
        // What an earlier process with this PID (PID 1 in a container) may have left behind.
        fs::write(
            path.with_extension(format!("tmp{}", std::process::id())),
            b"stale",
        )
        .unwrap();
        write_private(&path, b"secret").unwrap();
        write_private(&path, b"secret, again").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"secret, again");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Only the stale file and the result: no temporary file of ours is left.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
