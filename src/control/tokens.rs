//! Bearer tokens for the control API on TCP: a file of `NAME TOKEN` lines, re-read when it
//! changes (rotation without a restart). Only SHA-256 digests are kept in memory; a presented
//! token is compared against every entry in constant time, and never logged.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// The shortest token accepted: 32 characters (e.g. `openssl rand -hex 32` gives 64).
pub const MIN_TOKEN_LEN: usize = 32;

/// Why the tokens file was not taken.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// It could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Other users may read it.
    #[error("{}: readable by other users (mode {mode:o}): chmod 600 or 640", path.display())]
    Mode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A line is not `NAME TOKEN` with a long enough token.
    #[error("{}:{line}: {message}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based.
        line: usize,
        /// What is wrong (never the token itself).
        message: String,
    },
    /// No token at all.
    #[error("{}: no tokens (lines of NAME TOKEN)", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// A token's name and digest.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    digest: [u8; 32],
}

#[derive(Debug)]
struct Loaded {
    stamp: (Option<SystemTime>, u64),
    entries: Vec<Entry>,
}

/// The tokens in force.
#[derive(Debug)]
pub struct Tokens {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

fn digest(token: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn stamp(path: &Path) -> Result<(Option<SystemTime>, u64), TokensError> {
    let m = std::fs::metadata(path).map_err(|source| TokensError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt;
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err(TokensError::Mode {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok((m.modified().ok(), m.len()))
}

/// Parses the file's text: `NAME TOKEN` per line, `#` comments and blank lines skipped.
fn parse(path: &Path, text: &str) -> Result<Vec<Entry>, TokensError> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bad = |message: &str| TokensError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            message: message.to_string(),
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(name), Some(token), None) = (words.next(), words.next(), words.next()) else {
            return Err(bad("expected NAME TOKEN"));
        };
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
        {
            return Err(bad("the name must be of A-Z a-z 0-9 . _ - @"));
        }
        if token.len() < MIN_TOKEN_LEN {
            return Err(bad(&format!(
                "the token is shorter than {MIN_TOKEN_LEN} characters (openssl rand -hex 32)"
            )));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("the token must be printable ASCII"));
        }
        entries.push(Entry {
            name: name.to_string(),
            digest: digest(token.as_bytes()),
        });
    }
    if entries.is_empty() {
        return Err(TokensError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(entries)
}

fn load(path: &Path) -> Result<Loaded, TokensError> {
    let stamp = stamp(path)?;
    let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Loaded {
        stamp,
        entries: parse(path, &text)?,
    })
}

impl Tokens {
    /// Reads the file; an error is the operator's to fix before sluice starts.
    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        Ok(Tokens {
            path: path.to_path_buf(),
            loaded: Mutex::new(load(path)?),
        })
    }

    /// The name of the token `presented` is, if it is one. The file is re-read when its
    /// modification time or size changed; a file that became unreadable or malformed keeps
    /// the tokens in force (and says why).
    pub fn check(&self, presented: &str) -> Option<String> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        match stamp(&self.path) {
            Ok(s) if s != loaded.stamp => match load(&self.path) {
                Ok(l) => {
                    tracing::info!(target: "sluice::control", file = %self.path.display(), tokens = l.entries.len(), "control API: tokens re-read");
                    *loaded = l;
                }
                Err(e) => {
                    tracing::warn!(target: "sluice::control", error = %e, "control API: the tokens file changed but cannot be used; the previous tokens stay in force");
                    loaded.stamp = s;
                }
            },
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(target: "sluice::control", error = %e, "control API: the tokens file cannot be checked; the previous tokens stay in force");
            }
        }
        let d = digest(presented.as_bytes());
        // Every entry is compared, whatever matched: the time taken says nothing.
        let mut found = None;
        for e in &loaded.entries {
            if aws_lc_rs::constant_time::verify_slices_are_equal(&e.digest, &d).is_ok() {
                found = Some(e.name.clone());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_name_and_token_and_bad_ones_are_named_without_the_token() {
        let p = Path::new("t");
        let long = "a".repeat(40);
        let e = parse(p, &format!("# ops\n\nci {long}\nops  {}\n", "b".repeat(32))).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].name, "ci");
        assert_eq!(e[0].digest, digest(long.as_bytes()));
        let err = parse(p, "ci short\n").unwrap_err().to_string();
        assert!(err.starts_with("t:1:") && err.contains("shorter"), "{err}");
        assert!(!err.contains("short\n"));
        assert!(parse(p, &format!("a b {long}\n")).is_err());
        assert!(parse(p, &format!("bad/name {long}\n")).is_err());
        assert!(matches!(
            parse(p, "# none\n"),
            Err(TokensError::Empty { .. })
        ));
    }

    #[test]
    fn a_changed_file_is_reread_and_a_world_readable_one_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        let (one, two) = ("1".repeat(32), "2".repeat(33));
        std::fs::write(&f, format!("first {one}\n")).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Tokens::load(&f), Err(TokensError::Mode { .. })));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = Tokens::load(&f).unwrap();
        assert_eq!(t.check(&one).as_deref(), Some("first"));
        assert_eq!(t.check(&two), None);
        assert_eq!(t.check(""), None);
        // Rotated: a different size, so the change is seen whatever the clock's resolution.
        std::fs::write(&f, format!("second {two}\n")).unwrap();
        assert_eq!(t.check(&one), None);
        assert_eq!(t.check(&two).as_deref(), Some("second"));
        // Broken: the tokens in force stay.
        std::fs::write(&f, "oops\n").unwrap();
        assert_eq!(t.check(&two).as_deref(), Some("second"));
    }
}
