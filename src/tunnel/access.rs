//! Private tunnels: which visitors may reach a tunnel whose name `[[tunnels.private]]` lists.
//! A client certificate from `[tls] client_ca` (verified in the handshake, and again on
//! resumption), HTTP Basic credentials checked against an htpasswd file of bcrypt entries, or
//! both when both are set.
//!
//! bcrypt is slow on purpose (tens of milliseconds): checks run on the blocking pool, at most
//! two at once, and a verified credential is remembered (as a SHA-256, never the password) for
//! a few minutes so that a page's many requests cost one check.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::{ConfigError, PrivateTunnels};

/// How long a verified credential is taken without running bcrypt again.
const REMEMBER: Duration = Duration::from_secs(300);
/// Verified credentials remembered at most (then the oldest are forgotten).
const REMEMBER_MAX: usize = 1024;
/// bcrypt checks at once.
const BCRYPT_AT_ONCE: usize = 2;
/// The longest `Authorization` header looked at.
const MAX_CREDENTIALS: usize = 4096;

/// An htpasswd file: user -> bcrypt hash.
#[derive(Debug, Default)]
pub struct Htpasswd {
    users: HashMap<String, String>,
}

/// Why an htpasswd line was refused: its 1-based number and the reason.
#[derive(Debug, PartialEq, Eq)]
pub struct HtpasswdError {
    /// 1-based.
    pub line: usize,
    /// Why.
    pub message: String,
}

impl Htpasswd {
    /// The users listed.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    /// Parses `user:hash` lines (blank lines and `#` comments skipped); only bcrypt hashes
    /// (`$2y$`, `$2b$`, `$2a$`, as `htpasswd -B` writes) are taken.
    pub fn parse(text: &str) -> Result<Htpasswd, HtpasswdError> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let err = |message: &str| HtpasswdError {
                line: i + 1,
                message: message.to_string(),
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(err("not user:hash"));
            };
            if user.is_empty() {
                return Err(err("empty user name"));
            }
            let bcrypt = ["$2y$", "$2b$", "$2a$"].iter().any(|p| hash.starts_with(p))
                && hash.len() == 60
                && hash.parse::<bcrypt::HashParts>().is_ok();
            if !bcrypt {
                return Err(err(
                    "not a bcrypt hash: only bcrypt entries are accepted (htpasswd -B)",
                ));
            }
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(err(&format!("user {user} is listed twice")));
            }
        }
        Ok(Htpasswd { users })
    }
}

/// A `[[tunnels.private]]` entry, its htpasswd file read.
struct Rule {
    names: PrivateTunnels,
    htpasswd: Option<Htpasswd>,
}

/// The rules of every private tunnel, and what checking them needs (none: all public).
pub(crate) struct Access {
    rules: Vec<Rule>,
    /// SHA-256 of `rule index:user:password` -> when it was verified.
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    bcrypt: Arc<Semaphore>,
}

impl Default for Access {
    fn default() -> Self {
        Access {
            rules: Vec::new(),
            verified: Mutex::new(HashMap::new()),
            bcrypt: Arc::new(Semaphore::new(BCRYPT_AT_ONCE)),
        }
    }
}

/// Why a visitor of a private tunnel was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Denied {
    /// The tunnel needs a client certificate and the connection presented none.
    NoClientCert,
    /// The tunnel needs Basic credentials and the request has none (or not Basic).
    NoCredentials,
    /// Wrong user or password (the user as sent, for the log).
    Wrong(String),
}

/// The verdict for a request to a tunnel.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not a private tunnel.
    Public,
    /// Private, and the visitor passed (`user` when Basic credentials were checked).
    Allowed { user: Option<String> },
    /// Private, and the visitor did not pass.
    Denied(Denied),
}

impl Access {
    /// Reads the htpasswd files of `private` (entries of the config file `source`).
    pub(crate) fn load(
        private: &[PrivateTunnels],
        source: Option<&Path>,
    ) -> Result<Access, ConfigError> {
        let mut rules = Vec::new();
        for p in private {
            let htpasswd = match &p.htpasswd {
                None => None,
                Some(file) => {
                    let bad = |m: String| ConfigError::at(source, &file.at, m);
                    let text = std::fs::read_to_string(&file.path)
                        .map_err(|e| bad(format!("{}: {e}", file.path.display())))?;
                    let h = Htpasswd::parse(&text).map_err(|e| {
                        bad(format!("{}:{}: {}", file.path.display(), e.line, e.message))
                    })?;
                    Some(h)
                }
            };
            rules.push(Rule {
                names: p.clone(),
                htpasswd,
            });
        }
        Ok(Access {
            rules,
            ..Access::default()
        })
    }

    /// Whether tunnel `name` is private.
    pub(crate) fn covers(&self, name: &str) -> bool {
        self.rules.iter().any(|r| r.names.covers(name))
    }

    /// Decides a request to tunnel `name`: `client_cert` says whether the connection showed a
    /// verified client certificate, `authorization` is the request's header.
    pub(crate) async fn check(
        &self,
        name: &str,
        client_cert: bool,
        authorization: Option<&[u8]>,
    ) -> Verdict {
        let Some((index, rule)) = self
            .rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.names.covers(name))
        else {
            return Verdict::Public;
        };
        if rule.names.client_cert && !client_cert {
            return Verdict::Denied(Denied::NoClientCert);
        }
        let Some(file) = &rule.htpasswd else {
            return Verdict::Allowed { user: None };
        };
        let Some((user, password)) = authorization.and_then(basic) else {
            return Verdict::Denied(Denied::NoCredentials);
        };
        // An unknown user costs a bcrypt check too (against another entry's hash), so that
        // the answer's timing does not tell which users exist.
        let (hash, known) = match file.users.get(&user) {
            Some(h) => (h.clone(), true),
            None => match file.users.values().next() {
                Some(h) => (h.clone(), false),
                None => return Verdict::Denied(Denied::Wrong(user)),
            },
        };
        let key = {
            let mut d = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            d.update(&index.to_le_bytes());
            d.update(user.as_bytes());
            d.update(b":");
            d.update(password.as_bytes());
            let mut k = [0u8; 32];
            k.copy_from_slice(d.finish().as_ref());
            k
        };
        if known && self.remembered(&key) {
            return Verdict::Allowed { user: Some(user) };
        }
        let ok = match self.bcrypt.clone().acquire_owned().await {
            Ok(permit) => tokio::task::spawn_blocking(move || {
                let _permit = permit;
                bcrypt::verify(password, &hash).unwrap_or(false)
            })
            .await
            .unwrap_or(false),
            Err(_) => false,
        };
        if !ok || !known {
            return Verdict::Denied(Denied::Wrong(user));
        }
        self.remember(key);
        Verdict::Allowed { user: Some(user) }
    }

    fn remembered(&self, key: &[u8; 32]) -> bool {
        let v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        v.get(key).is_some_and(|at| at.elapsed() < REMEMBER)
    }

    fn remember(&self, key: [u8; 32]) {
        let mut v = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if v.len() >= REMEMBER_MAX {
            v.retain(|_, at| at.elapsed() < REMEMBER);
            if v.len() >= REMEMBER_MAX {
                v.clear();
            }
        }
        v.insert(key, Instant::now());
    }
}

/// The user and password of an `Authorization: Basic ...` header.
pub fn basic(header: &[u8]) -> Option<(String, String)> {
    if header.len() > MAX_CREDENTIALS {
        return None;
    }
    let text = std::str::from_utf8(header).ok()?.trim();
    let (scheme, b64) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (user, password) = raw.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // `htpasswd -nbB -C 5 alice secret` (cost 5, to keep the test fast).
    const ALICE: &str = "alice:$2y$05$Q0f2M8QXDbhjHLUWwxIWsuYX3juHnmJC4FKcx52uNBeahdfeN6Tu.";

    #[test]
    fn htpasswd_takes_bcrypt_only() {
        let h = Htpasswd::parse(&format!("# users\n\n{ALICE}\n")).unwrap();
        assert_eq!(h.users.len(), 1);
        let e = Htpasswd::parse("bob:$apr1$abc$def\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("bcrypt"), "{e:?}");
        assert_eq!(Htpasswd::parse("x\n").unwrap_err().line, 1);
        assert!(Htpasswd::parse(&format!("{ALICE}\n{ALICE}\n"))
            .unwrap_err()
            .message
            .contains("twice"));
        assert!(
            Htpasswd::parse(":$2y$05$Q0f2M8QXDbhjHLUWwxIWsuYX3juHnmJC4FKcx52uNBeahdfeN6Tu.")
                .is_err()
        );
    }

    #[test]
    fn basic_credentials() {
        // "alice:se:cret"
        assert_eq!(
            basic(b"Basic YWxpY2U6c2U6Y3JldA=="),
            Some(("alice".into(), "se:cret".into()))
        );
        assert_eq!(
            basic(b"basic  YWxpY2U6c2U6Y3JldA== "),
            Some(("alice".into(), "se:cret".into()))
        );
        assert_eq!(basic(b"Bearer abc"), None);
        assert_eq!(basic(b"Basic !!!"), None);
        assert_eq!(basic(b"Basic YWxpY2U="), None, "no colon");
        assert_eq!(basic(&[b'a'; MAX_CREDENTIALS + 1]), None);
    }

    #[tokio::test]
    async fn rules_decide_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("htpasswd");
        std::fs::write(&file, format!("{ALICE}\n")).unwrap();
        let path = crate::config::ConfigPath {
            path: file,
            at: Default::default(),
        };
        let rules = [
            PrivateTunnels {
                names: vec!["admin-*".into()],
                htpasswd: Some(path.clone()),
                client_cert: true,
            },
            PrivateTunnels {
                names: vec!["staff".into()],
                htpasswd: Some(path),
                client_cert: false,
            },
        ];
        let a = Access::load(&rules, None).unwrap();
        let good = b"Basic YWxpY2U6c2VjcmV0".as_slice(); // alice:secret
        let bad = b"Basic YWxpY2U6d3Jvbmc=".as_slice(); // alice:wrong
        assert_eq!(a.check("public", false, None).await, Verdict::Public);
        assert_eq!(
            a.check("staff", false, None).await,
            Verdict::Denied(Denied::NoCredentials)
        );
        assert_eq!(
            a.check("staff", false, Some(bad)).await,
            Verdict::Denied(Denied::Wrong("alice".into()))
        );
        let allowed = Verdict::Allowed {
            user: Some("alice".into()),
        };
        // bob is not listed: refused even with a password that matches another entry.
        let bob = b"Basic Ym9iOnNlY3JldA==".as_slice(); // bob:secret
        assert_eq!(
            a.check("staff", false, Some(bob)).await,
            Verdict::Denied(Denied::Wrong("bob".into()))
        );
        assert_eq!(a.check("staff", false, Some(good)).await, allowed);
        assert_eq!(
            a.check("staff", false, Some(good)).await,
            allowed,
            "remembered"
        );
        // Both required.
        assert_eq!(
            a.check("admin-1", false, Some(good)).await,
            Verdict::Denied(Denied::NoClientCert)
        );
        assert_eq!(a.check("admin-1", true, Some(good)).await, allowed);
        assert_eq!(
            a.check("admin-1", true, None).await,
            Verdict::Denied(Denied::NoCredentials)
        );
    }
}
