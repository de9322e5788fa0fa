//! Locks, like Teleport's: a key, a grant, a device or a source network that may not hold an
//! SSH session until the lock is lifted or expires. Adding one ends every matching live session
//! at once; authentication refuses new ones.
//!
//! Locks live in the store (so they survive a restart and reach every replica that shares it);
//! the SSH server checks a copy in memory, re-read from the store every [`REFRESH`], so that an
//! authentication never waits on the store and a store that fails keeps the last locks in force
//! (it fails closed, not open).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::net::Cidr;
use crate::sessions::Identity;
use crate::store::{LockRow, Store, StoreError};

/// How often the locks are re-read from the store (locks added elsewhere, expiries).
pub const REFRESH: Duration = Duration::from_secs(1);
/// The longest lock with a TTL (without one, a lock lasts until lifted).
const MAX_TTL: Duration = Duration::from_secs(3650 * 86400);
/// The longest reason kept.
const MAX_REASON: usize = 200;

/// What a lock matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Sessions that authenticated with this key (`SHA256:...`), alone or in a certificate.
    Key(String),
    /// Sessions of this access grant.
    Grant(String),
    /// Sessions of this grant device.
    Device(String),
    /// Sessions from this network.
    Source(Cidr),
}

impl Target {
    /// Whether a session with `who`, from `peer`, is locked out by this.
    pub fn matches(&self, who: &Identity, peer: SocketAddr) -> bool {
        match self {
            Target::Key(k) => who.key == *k,
            Target::Grant(g) => who.grant.as_deref() == Some(g),
            Target::Device(d) => who.device.as_deref() == Some(d),
            Target::Source(c) => c.contains(peer.ip()),
        }
    }
}

/// `POST /v1/locks`: exactly one of `key`, `grant`, `device`, `source`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LockRequest {
    /// A key fingerprint, `SHA256:...`.
    #[serde(default, deserialize_with = "present")]
    pub key: Option<String>,
    /// A grant id, `g-...`.
    #[serde(default, deserialize_with = "present")]
    pub grant: Option<String>,
    /// A device id.
    #[serde(default, deserialize_with = "present")]
    pub device: Option<String>,
    /// An address or CIDR.
    #[serde(default, deserialize_with = "present")]
    pub source: Option<String>,
    /// How long it lasts; default until lifted.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// Why, for the trail and the disconnect message.
    #[serde(default)]
    pub reason: Option<String>,
}

/// A target given as `null` is refused (it would be a second target that is not there).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d).map(Some)
}

/// A lock as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockView {
    /// `l-...`.
    pub id: String,
    /// `key`, `grant`, `device` or `source`.
    pub kind: String,
    /// What it matches.
    pub value: String,
    /// Why.
    pub reason: String,
    /// RFC 3339 times.
    pub created: String,
    /// When it ends by itself; `None`: when lifted.
    pub expires: Option<String>,
    /// Who added it.
    pub by: String,
}

/// Why a lock was not added or lifted.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The request is malformed in this field.
    #[error("{field}: {message}")]
    Field {
        /// The field at fault.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No lock has this id.
    #[error("no lock {0}")]
    NotFound(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A lock in force, parsed.
#[derive(Debug, Clone)]
struct Live {
    row: LockRow,
    target: Target,
}

fn parse(row: LockRow) -> Option<Live> {
    let target = match row.kind.as_str() {
        "key" => Target::Key(row.value.clone()),
        "grant" => Target::Grant(row.value.clone()),
        "device" => Target::Device(row.value.clone()),
        "source" => Target::Source(Cidr::parse(&row.value)?),
        _ => return None,
    };
    Some(Live { row, target })
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn stamp(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

fn view(r: &LockRow) -> LockView {
    LockView {
        id: r.id.clone(),
        kind: r.kind.clone(),
        value: r.value.clone(),
        reason: r.reason.clone(),
        created: stamp(r.created),
        expires: r.expires.map(stamp),
        by: r.by.clone(),
    }
}

/// A key fingerprint as OpenSSH prints it: `SHA256:` and 43 base64 characters.
fn valid_fingerprint(s: &str) -> bool {
    s.strip_prefix("SHA256:").is_some_and(|b| {
        b.len() == 43
            && b.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
    })
}

/// Checks a request; the row to store (without id, time and author).
pub fn validate(
    req: &LockRequest,
) -> Result<(String, String, Option<Duration>, String), LockError> {
    let field = |field, message: &str| LockError::Field {
        field,
        message: message.into(),
    };
    let given: Vec<(&'static str, &String)> = [
        ("key", &req.key),
        ("grant", &req.grant),
        ("device", &req.device),
        ("source", &req.source),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    .collect();
    let (kind, value) = match given[..] {
        [one] => one,
        [] => {
            return Err(field(
                "key",
                "one of key, grant, device or source is required",
            ))
        }
        [_, (second, _), ..] => {
            return Err(field(
                second,
                "only one of key, grant, device or source per lock",
            ))
        }
    };
    let value = value.trim().to_string();
    match kind {
        "key" if !valid_fingerprint(&value) => {
            return Err(field(
                "key",
                "must be a key fingerprint, SHA256:... (ssh-keygen -lf KEY)",
            ))
        }
        "grant"
            if !(value.starts_with("g-")
                && value.len() <= 64
                && value[2..].bytes().all(|b| b.is_ascii_hexdigit())
                && value.len() > 2) =>
        {
            return Err(field("grant", "must be a grant id, g-..."))
        }
        "device" if !crate::grant::valid_device(&value) => {
            return Err(field(
                "device",
                "must be 1-64 characters of A-Z a-z 0-9 : . _ -",
            ))
        }
        "source" if Cidr::parse(&value).is_none() => {
            return Err(field("source", "must be an address or CIDR (192.0.2.0/24)"))
        }
        _ => {}
    }
    if req.ttl.is_some_and(|t| t < Duration::from_secs(1)) {
        return Err(field("ttl", "must be at least 1s"));
    }
    if req.ttl.is_some_and(|t| t > MAX_TTL) {
        return Err(field("ttl", "at most 3650d (leave it out: until lifted)"));
    }
    let reason = req.reason.clone().unwrap_or_default();
    if reason.chars().count() > MAX_REASON {
        return Err(field("reason", "at most 200 characters"));
    }
    let reason = crate::text::clean_text(reason.trim());
    Ok((kind.to_string(), value, req.ttl, reason))
}

fn new_id() -> String {
    let mut b = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut b);
    format!(
        "l-{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

/// The locks of this server: the store, and the copy authentication checks.
pub struct Locks {
    store: Arc<Store>,
    live: Mutex<Vec<Live>>,
}

impl Locks {
    /// Reads the locks in the store.
    pub fn open(store: Arc<Store>) -> Result<Locks, StoreError> {
        let l = Locks {
            store,
            live: Mutex::default(),
        };
        l.refresh()?;
        let n = l.lock().len();
        if n > 0 {
            info!(locks = n, "locks in force");
        }
        Ok(l)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads the store; on failure the locks in memory stay in force.
    fn refresh(&self) -> Result<(), StoreError> {
        let rows = self.store.locks()?;
        *self.lock() = rows.into_iter().filter_map(parse).collect();
        Ok(())
    }

    /// The lock in force that refuses a session with `who` from `peer`, if any.
    pub fn matching(&self, who: &Identity, peer: SocketAddr) -> Option<LockView> {
        let now = unix(SystemTime::now());
        self.lock()
            .iter()
            .find(|l| l.row.expires.is_none_or(|e| e > now) && l.target.matches(who, peer))
            .map(|l| view(&l.row))
    }

    /// Every lock in force.
    pub fn list(&self) -> Vec<LockView> {
        let now = unix(SystemTime::now());
        self.lock()
            .iter()
            .filter(|l| l.row.expires.is_none_or(|e| e > now))
            .map(|l| view(&l.row))
            .collect()
    }

    /// Adds a lock and ends the sessions it matches; `by` says who asked. The lock and how
    /// many sessions it ended.
    pub fn add(&self, req: &LockRequest, by: &str) -> Result<(LockView, usize), LockError> {
        let (kind, value, ttl, reason) = validate(req)?;
        let now = unix(SystemTime::now());
        let row = LockRow {
            id: new_id(),
            kind,
            value,
            reason,
            created: now,
            expires: ttl.map(|t| now.saturating_add(t.as_secs())),
            by: by.to_string(),
        };
        self.store.add_lock(&row)?;
        let live = parse(row.clone()).ok_or_else(|| LockError::Field {
            field: "source",
            message: "unparsable".into(),
        })?;
        self.lock().push(live.clone());
        info!(target: "sluice::lock", lock = row.id, kind = row.kind, value = row.value, reason = row.reason, by, "lock added");
        crate::audit::record(|| crate::audit::Event::LockAdded {
            lock: row.id.clone(),
            kind: row.kind.clone(),
            value: row.value.clone(),
            reason: row.reason.clone(),
            expires: row.expires.map(stamp),
            by: by.to_string(),
        });
        let ended = enforce(&live);
        Ok((view(&row), ended))
    }

    /// Lifts lock `id`; `by` says who asked.
    pub fn lift(&self, id: &str, by: &str) -> Result<LockView, LockError> {
        let row = self
            .store
            .lift_lock(id)?
            .ok_or_else(|| LockError::NotFound(crate::text::clean(id)))?;
        self.lock().retain(|l| l.row.id != id);
        info!(target: "sluice::lock", lock = row.id, by, "lock lifted");
        crate::audit::record(|| crate::audit::Event::LockLifted {
            lock: row.id.clone(),
            how: "lifted".into(),
            by: by.to_string(),
        });
        Ok(view(&row))
    }

    /// Every [`REFRESH`] until `stop`: re-reads the store, lifts expired locks, and ends live
    /// sessions that a lock seen for the first time matches (one added by another replica).
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut failing = false;
        loop {
            tokio::select! {
                () = tokio::time::sleep(REFRESH) => {}
                () = stop.cancelled() => return,
            }
            let this = self.clone();
            let r = tokio::task::spawn_blocking(move || this.tick()).await;
            match r {
                Ok(Err(e)) if !failing => {
                    failing = true;
                    warn!(target: "sluice::lock", error = %e, "cannot re-read the locks; the last ones read stay in force");
                }
                Ok(Ok(())) if failing => {
                    failing = false;
                    info!(target: "sluice::lock", "locks re-read from the store again");
                }
                _ => {}
            }
        }
    }

    fn tick(&self) -> Result<(), StoreError> {
        let now = unix(SystemTime::now());
        let before: Vec<String> = self.lock().iter().map(|l| l.row.id.clone()).collect();
        for row in self.store.locks()? {
            if row.expires.is_some_and(|e| e <= now) && self.store.lift_lock(&row.id)?.is_some() {
                info!(target: "sluice::lock", lock = row.id, "lock expired");
                crate::audit::record(|| crate::audit::Event::LockLifted {
                    lock: row.id.clone(),
                    how: "expired".into(),
                    by: "sluice".into(),
                });
            }
        }
        self.refresh()?;
        let new: Vec<Live> = self
            .lock()
            .iter()
            .filter(|l| !before.contains(&l.row.id))
            .cloned()
            .collect();
        for l in &new {
            enforce(l);
        }
        Ok(())
    }
}

/// Ends the live sessions `l` matches.
fn enforce(l: &Live) -> usize {
    let why = match l.row.reason.as_str() {
        "" => "locked by an administrator".to_string(),
        r => format!("locked by an administrator: {r}"),
    };
    crate::sessions::table().end_where(
        |who, peer| l.target.matches(who, peer),
        &format!("lock {}", l.row.id),
        &why,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "SHA256:abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ";

    fn req() -> LockRequest {
        LockRequest::default()
    }

    #[test]
    fn a_request_names_exactly_one_valid_target() {
        let e = validate(&req()).unwrap_err();
        assert!(matches!(e, LockError::Field { field: "key", .. }), "{e}");
        let two = LockRequest {
            key: Some(FP.into()),
            device: Some("d1".into()),
            ..req()
        };
        assert!(matches!(
            validate(&two),
            Err(LockError::Field {
                field: "device",
                ..
            })
        ));
        let bad = |r: LockRequest, f: &str| match validate(&r) {
            Err(LockError::Field { field, .. }) => assert_eq!(field, f),
            other => panic!("{other:?}"),
        };
        bad(
            LockRequest {
                key: Some("SHA256:short".into()),
                ..req()
            },
            "key",
        );
        bad(
            LockRequest {
                grant: Some("x-12".into()),
                ..req()
            },
            "grant",
        );
        bad(
            LockRequest {
                device: Some("a b".into()),
                ..req()
            },
            "device",
        );
        bad(
            LockRequest {
                source: Some("10.0.0.0/33".into()),
                ..req()
            },
            "source",
        );
        bad(
            LockRequest {
                source: Some("10.0.0.1".into()),
                ttl: Some(Duration::ZERO),
                ..req()
            },
            "ttl",
        );
        bad(
            LockRequest {
                key: Some(FP.into()),
                reason: Some("x".repeat(201)),
                ..req()
            },
            "reason",
        );
        let ok = validate(&LockRequest {
            source: Some(" 10.0.0.0/8 ".into()),
            reason: Some("stolen\nlaptop".into()),
            ..req()
        })
        .unwrap();
        assert_eq!((ok.0.as_str(), ok.1.as_str()), ("source", "10.0.0.0/8"));
        assert!(!ok.3.contains('\n'));
    }

    #[test]
    fn targets_match_their_own_field_only() {
        let who = Identity {
            user: "d1".into(),
            key: FP.into(),
            certificate: None,
            grant: Some("g-01".into()),
            device: Some("d1".into()),
        };
        let peer: SocketAddr = "10.1.2.3:999".parse().unwrap();
        assert!(Target::Key(FP.into()).matches(&who, peer));
        assert!(!Target::Key("SHA256:other".into()).matches(&who, peer));
        assert!(Target::Grant("g-01".into()).matches(&who, peer));
        assert!(!Target::Grant("g-02".into()).matches(&who, peer));
        assert!(Target::Device("d1".into()).matches(&who, peer));
        assert!(!Target::Device("d2".into()).matches(&Identity::default(), peer));
        assert!(Target::Source(Cidr::parse("10.0.0.0/8").unwrap()).matches(&who, peer));
        assert!(!Target::Source(Cidr::parse("192.0.2.0/24").unwrap()).matches(&who, peer));
    }

    #[test]
    fn locks_are_stored_matched_expire_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let locks = Locks::open(store.clone()).unwrap();
        let who = Identity {
            key: FP.into(),
            ..Identity::default()
        };
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(locks.matching(&who, peer).is_none());
        let (l, _) = locks
            .add(
                &LockRequest {
                    key: Some(FP.into()),
                    ..req()
                },
                "test",
            )
            .unwrap();
        assert_eq!(locks.matching(&who, peer).unwrap().id, l.id);
        // A second server on the same store sees it.
        let again = Locks::open(store.clone()).unwrap();
        assert_eq!(again.list(), vec![l.clone()]);
        locks.lift(&l.id, "test").unwrap();
        assert!(locks.matching(&who, peer).is_none());
        assert!(matches!(
            locks.lift(&l.id, "test"),
            Err(LockError::NotFound(_))
        ));
        // Expired: no longer matches, and the sweep removes it from the store.
        let mut row = store.locks().unwrap();
        assert!(row.is_empty());
        store
            .add_lock(&LockRow {
                id: "l-old".into(),
                kind: "source".into(),
                value: "127.0.0.0/8".into(),
                reason: String::new(),
                created: 1,
                expires: Some(2),
                by: "test".into(),
            })
            .unwrap();
        let locks = Locks::open(store.clone()).unwrap();
        assert!(locks.matching(&who, peer).is_none());
        locks.tick().unwrap();
        row = store.locks().unwrap();
        assert!(row.is_empty());
    }
}
