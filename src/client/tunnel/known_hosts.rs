//! `~/.ssh/known_hosts`: is this the server's key? OpenSSH's format: plain and hashed
//! (`|1|salt|hash`) host patterns, wildcards, negations, `[host]:port`, `@revoked`.
//! `@cert-authority` lines are skipped (sluice presents plain host keys).

use std::path::{Path, PathBuf};

use russh::keys::ssh_key::known_hosts::{Entry, HostPatterns, Marker};
use russh::keys::ssh_key::{HashAlg, PublicKey};

/// What known_hosts says about a server's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A line for this host holds this key.
    Known,
    /// No line names this host.
    Unknown,
    /// Lines name this host with other keys: someone may be in the middle.
    Changed {
        /// The 1-based line numbers that name the host.
        lines: Vec<usize>,
    },
    /// The key is marked `@revoked`.
    Revoked {
        /// Its 1-based line number.
        line: usize,
    },
}

/// The name known_hosts records a host under: `host`, or `[host]:port` off port 22.
pub fn host_label(host: &str, port: u16) -> String {
    let host = host.to_ascii_lowercase();
    if port == 22 {
        host
    } else {
        format!("[{host}]:{port}")
    }
}

/// The line to add for `key` at `host:port`.
pub fn line_for(host: &str, port: u16, key: &PublicKey) -> String {
    let mut key = key.clone();
    key.set_comment("");
    let text = key.to_openssh().unwrap_or_default();
    format!("{} {}", host_label(host, port), text.trim_end())
}

/// OpenSSH's `match_pattern`: `*` any run, `?` any one character, ASCII case ignored.
/// Greedy with one backtrack point: O(pattern x text), whatever the stars.
fn wildcard(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(&c) if c == b'?' || c.eq_ignore_ascii_case(&s[si]) => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Whether `patterns` (one line's) name `label`: one positive match and no negated one.
fn names(patterns: &HostPatterns, label: &str) -> bool {
    match patterns {
        HostPatterns::HashedName { salt, hash } => {
            use aws_lc_rs::hmac;
            let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, salt);
            hmac::verify(&key, label.as_bytes(), hash).is_ok()
        }
        HostPatterns::Patterns(list) => {
            let mut hit = false;
            for p in list {
                match p.strip_prefix('!') {
                    Some(neg) if wildcard(neg.as_bytes(), label.as_bytes()) => return false,
                    Some(_) => {}
                    None => hit |= wildcard(p.as_bytes(), label.as_bytes()),
                }
            }
            hit
        }
    }
}

/// Looks `key` up for `label` in known_hosts text. Lines that do not parse are skipped, as
/// OpenSSH skips them.
pub fn check(text: &str, label: &str, key: &PublicKey) -> Verdict {
    let mut changed = Vec::new();
    let mut known = false;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Ok(entry) = line.parse::<Entry>() else {
            continue;
        };
        if !names(entry.host_patterns(), label) {
            continue;
        }
        let same = entry.public_key().key_data() == key.key_data();
        match entry.marker() {
            Some(Marker::Revoked) if same => return Verdict::Revoked { line: n + 1 },
            Some(_) => {}
            None if same => known = true,
            None => changed.push(n + 1),
        }
    }
    if known {
        Verdict::Known
    } else if changed.is_empty() {
        Verdict::Unknown
    } else {
        Verdict::Changed { lines: changed }
    }
}

/// Where OpenSSH keeps the user's file.
pub fn default_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".ssh").join("known_hosts"))
}

/// Appends `line` to `path` (creating `~/.ssh` 0700 and the file 0600 if missing).
pub(super) fn append(path: &Path, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
    }
    let existing = std::fs::read(path).unwrap_or_default();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let sep = if existing.is_empty() || existing.ends_with(b"\n") {
        ""
    } else {
        "\n"
    };
    f.write_all(format!("{sep}{line}\n").as_bytes())?;
    f.sync_all()
}

/// `SHA256:...` of a key, as OpenSSH prints it.
pub(super) fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILIG2T/B0l0gaqj3puu510tu9N1OkQ4znY3LYuEm5zCF";
    const B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";

    fn key(s: &str) -> PublicKey {
        PublicKey::from_openssh(s).unwrap()
    }

    #[test]
    fn plain_hashed_wildcards_and_ports() {
        let a = key(A);
        let label = host_label("Sluice.Example.org", 443);
        assert_eq!(label, "[sluice.example.org]:443");
        assert_eq!(check("", &label, &a), Verdict::Unknown);
        assert_eq!(
            check(&format!("[sluice.example.org]:443 {A}\n"), &label, &a),
            Verdict::Known
        );
        // The same host on port 22 is another entry.
        assert_eq!(
            check(&format!("sluice.example.org {A}\n"), &label, &a),
            Verdict::Unknown
        );
        assert_eq!(
            check(
                &format!("# c\n\nother,[*.example.org]:443 {A} me@x\n"),
                &label,
                &a
            ),
            Verdict::Known
        );
        assert_eq!(
            check(
                &format!("[*.example.org]:443,![sluice.example.org]:443 {A}\n"),
                &label,
                &a
            ),
            Verdict::Unknown
        );
        assert_eq!(
            check(&format!("[sluice.example.or?]:443 {A}\n"), &label, &a),
            Verdict::Known
        );
        // A hashed entry for "example.com" (russh's test vector).
        let hashed = format!("|1|O33ESRMWPVkMYIwJ1Uw+n877jTo=|nuuC5vEqXlEZ/8BXQR7m619W6Ak= {A}\n");
        assert_eq!(check(&hashed, "example.com", &a), Verdict::Known);
        assert_eq!(check(&hashed, "example.org", &a), Verdict::Unknown);
    }

    #[test]
    fn changed_and_revoked_keys_are_told_apart() {
        let (a, b) = (key(A), key(B));
        let file = format!("junk line\nh {B}\nh2 {A}\n");
        assert_eq!(check(&file, "h", &a), Verdict::Changed { lines: vec![2] });
        assert_eq!(check(&file, "h", &b), Verdict::Known);
        // A key that is listed for the host, beside one that is not, is known.
        assert_eq!(check(&format!("h {B}\nh {A}\n"), "h", &a), Verdict::Known);
        assert_eq!(
            check(&format!("h {A}\n@revoked * {A}\n"), "h", &a),
            Verdict::Revoked { line: 2 }
        );
        assert_eq!(
            check(&format!("@cert-authority h {B}\n"), "h", &a),
            Verdict::Unknown
        );
    }

    #[test]
    fn lines_to_add_and_appending() {
        let a = key(&format!("{A} comment"));
        assert_eq!(line_for("H", 443, &a), format!("[h]:443 {A}"));
        assert_eq!(line_for("h", 22, &a), format!("h {A}"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ssh/known_hosts");
        append(&path, &line_for("h", 443, &a)).unwrap();
        std::fs::write(&path, std::fs::read_to_string(&path).unwrap().trim_end()).unwrap();
        append(&path, &line_for("g", 443, &a)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert_eq!(check(&text, "[g]:443", &a), Verdict::Known);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn wildcards_terminate_on_long_input() {
        let p = "*a*a*a*a*a*a*a*a*a*a*b".repeat(3);
        assert!(!names(&HostPatterns::Patterns(vec![p]), &"a".repeat(200)));
    }
}
