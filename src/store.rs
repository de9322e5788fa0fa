//! What sluice must remember across restarts, in one SQLite file in the state directory
//! (`sluice.db`, 0600): the owners of tunnel names, and access grants with their allotted
//! ports (`grant`).
//!
//! SQLite through rusqlite (bundled, so no system library is needed): transactions and unique
//! keys make a claim atomic, the file survives a crash mid-write (WAL), and an operator can
//! read it with the `sqlite3` shell. One connection behind a mutex: writes are rare (a new
//! name), reads are served from memory by the callers. Or Redis (`[store] redis`, the `redis` module),
//! the same operations as Lua scripts, for replicas that share one state.

mod redis;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// The store's file name in the state directory.
pub(crate) const FILE: &str = "sluice.db";

/// The schema this build writes; older files are migrated forward, newer ones refused.
const SCHEMA: i64 = 3;

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening, creating or migrating the file failed.
    #[error("{}: cannot open the store: {source}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The file could not be created.
    #[error("{}: cannot create the store: {source}", path.display())]
    Create {
        /// The database file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file was written by a newer sluice.
    #[error("{}: written by a newer sluice (schema {found}, this one knows {SCHEMA})", path.display())]
    Newer {
        /// The database file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
    },
    /// A query failed (disk full, I/O error).
    #[error("store: {0}")]
    Query(#[from] rusqlite::Error),
    /// Redis could not be reached or refused a command.
    #[error("store: Redis at {url}: {message}")]
    Redis {
        /// The server, without its password.
        url: String,
        /// What went wrong.
        message: String,
    },
}

/// The outcome of claiming a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Claim {
    /// It was free and is now this owner's.
    New,
    /// It was already this owner's.
    Ours,
    /// Someone else owns it.
    Other(String),
}

/// The open store: SQLite in the state directory, or Redis.
pub struct Store {
    backend: Backend,
}

enum Backend {
    Sqlite(Sqlite),
    /// Boxed: its scripts and client are most of the size, and there is one store.
    Redis(Box<redis::RedisStore>),
}

/// Calls the same method on whichever backend is open.
macro_rules! dispatch {
    ($self:ident . $m:ident ( $($a:expr),* )) => {
        match &$self.backend {
            Backend::Sqlite(s) => s.$m($($a),*),
            Backend::Redis(r) => r.$m($($a),*),
        }
    };
}

impl Store {
    /// Opens `dir/sluice.db` (SQLite).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Ok(Store {
            backend: Backend::Sqlite(Sqlite::open(dir)?),
        })
    }

    /// Opens the store `[store]` names: Redis, else `dir/sluice.db`.
    pub fn open_with(
        settings: &crate::config::StoreSettings,
        dir: &Path,
    ) -> Result<Store, StoreError> {
        match &settings.redis {
            Some(url) => Ok(Store {
                backend: Backend::Redis(Box::new(redis::RedisStore::open(
                    url,
                    &settings.prefix,
                    settings.timeout,
                )?)),
            }),
            None => Store::open(dir),
        }
    }

    /// Claims `name` for `owner` unless someone owns it, atomically.
    pub(crate) fn claim_name(&self, name: &str, owner: &str) -> Result<Claim, StoreError> {
        dispatch!(self.claim_name(name, owner))
    }

    /// Issues a grant atomically (see [`Sqlite::issue_grant`]).
    pub(crate) fn issue_grant(
        &self,
        new: &GrantRow,
        want: Option<u16>,
        ports: std::ops::RangeInclusive<u16>,
        owner: &str,
        replace: bool,
    ) -> Result<Allot, StoreError> {
        dispatch!(self.issue_grant(new, want, ports, owner, replace))
    }

    /// One grant, live or ended.
    pub(crate) fn grant(&self, id: &str) -> Result<Option<GrantRow>, StoreError> {
        dispatch!(self.grant(id))
    }

    /// Live grants, or every grant kept (`all`), oldest first.
    pub(crate) fn grants(&self, all: bool) -> Result<Vec<GrantRow>, StoreError> {
        dispatch!(self.grants(all))
    }

    /// Ends a live, unexpired grant; the row as ended, or `None` if it was not live.
    pub(crate) fn end_grant(
        &self,
        id: &str,
        reason: &str,
        now: u64,
    ) -> Result<Option<GrantRow>, StoreError> {
        dispatch!(self.end_grant(id, reason, now))
    }

    /// Ports held by live grants.
    pub(crate) fn allotted_ports(
        &self,
        now: u64,
    ) -> Result<std::collections::HashSet<u16>, StoreError> {
        dispatch!(self.allotted_ports(now))
    }

    /// Whether a grant (live or ended) was issued for the key with this fingerprint.
    pub(crate) fn key_has_grant(&self, key: &str) -> Result<bool, StoreError> {
        dispatch!(self.key_has_grant(key))
    }

    /// Records the first use of a grant; true if this was it.
    pub(crate) fn mark_used(&self, id: &str, now: u64) -> Result<bool, StoreError> {
        dispatch!(self.mark_used(id, now))
    }

    /// Ends every live grant that has expired by `now`; those it ended.
    pub(crate) fn sweep(&self, now: u64) -> Result<Vec<GrantRow>, StoreError> {
        dispatch!(self.sweep(now))
    }

    /// When the next live grant expires.
    pub(crate) fn next_expiry(&self) -> Result<Option<u64>, StoreError> {
        dispatch!(self.next_expiry())
    }

    /// How many grants are in each state at `now`.
    pub(crate) fn grant_counts(&self, now: u64) -> Result<GrantCounts, StoreError> {
        dispatch!(self.grant_counts(now))
    }

    /// Every name with its owner.
    pub(crate) fn names(&self) -> Result<Vec<(String, String)>, StoreError> {
        dispatch!(self.names())
    }

    /// Stores a new lock.
    pub(crate) fn add_lock(&self, lock: &LockRow) -> Result<(), StoreError> {
        dispatch!(self.add_lock(lock))
    }

    /// Removes a lock; the row, or `None` if there was none with this id.
    pub(crate) fn lift_lock(&self, id: &str) -> Result<Option<LockRow>, StoreError> {
        dispatch!(self.lift_lock(id))
    }

    /// Every lock stored (expired ones until they are lifted), oldest first.
    pub(crate) fn locks(&self) -> Result<Vec<LockRow>, StoreError> {
        dispatch!(self.locks())
    }
}

/// A lock as stored (times in Unix seconds): what it matches, why, until when.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct LockRow {
    pub(crate) id: String,
    /// `key`, `grant`, `device` or `source`.
    pub(crate) kind: String,
    pub(crate) value: String,
    pub(crate) reason: String,
    pub(crate) created: u64,
    pub(crate) expires: Option<u64>,
    /// Who added it.
    pub(crate) by: String,
}

/// The store in SQLite.
struct Sqlite {
    conn: Mutex<Connection>,
}

impl Sqlite {
    /// Opens (or creates, 0600) `dir/sluice.db`.
    fn open(dir: &Path) -> Result<Sqlite, StoreError> {
        let path = dir.join(FILE);
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let create_err = |source| StoreError::Create {
            path: path.clone(),
            source,
        };
        crate::state::ensure_dir(dir).map_err(create_err)?;
        // Created private before SQLite writes anything into it.
        if !path.exists() {
            crate::state::write_private(&path, b"").map_err(create_err)?;
        }
        let conn = Connection::open(&path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        // WAL with NORMAL: a commit survives a crash of sluice; a power loss may lose the
        // last ones, never the file.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(2))
            .map_err(open_err)?;
        let found: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(open_err)?;
        if found > SCHEMA {
            return Err(StoreError::Newer { path, found });
        }
        if found < 1 {
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS tunnel_names (
                     name TEXT PRIMARY KEY,
                     owner TEXT NOT NULL,
                     created INTEGER NOT NULL
                 );
                 CREATE INDEX IF NOT EXISTS tunnel_names_owner ON tunnel_names (owner);
                 PRAGMA user_version = 1;",
            )
            .map_err(open_err)?;
        }
        if found < 2 {
            // A grant is live while `ended` is NULL (and it has not expired: the sweep ends
            // those). The partial unique indexes make "one live grant per port" and "per
            // device" hold whatever the code above them does.
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS grants (
                     id TEXT PRIMARY KEY,
                     device TEXT NOT NULL,
                     port INTEGER NOT NULL,
                     name TEXT,
                     key TEXT NOT NULL,
                     permit_open TEXT NOT NULL DEFAULT '',
                     source_address TEXT,
                     created INTEGER NOT NULL,
                     expires INTEGER NOT NULL,
                     first_used INTEGER,
                     ended INTEGER,
                     end_reason TEXT
                 );
                 CREATE UNIQUE INDEX IF NOT EXISTS grants_live_port ON grants (port) WHERE ended IS NULL;
                 CREATE UNIQUE INDEX IF NOT EXISTS grants_live_device ON grants (device) WHERE ended IS NULL;
                 CREATE INDEX IF NOT EXISTS grants_expires ON grants (expires) WHERE ended IS NULL;
                 CREATE INDEX IF NOT EXISTS grants_key ON grants (key);
                 PRAGMA user_version = 2;",
            )
            .map_err(open_err)?;
        }
        if found < 3 {
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS locks (
                     id TEXT PRIMARY KEY,
                     kind TEXT NOT NULL,
                     value TEXT NOT NULL,
                     reason TEXT NOT NULL DEFAULT '',
                     created INTEGER NOT NULL,
                     expires INTEGER,
                     by TEXT NOT NULL DEFAULT ''
                 );
                 PRAGMA user_version = 3;",
            )
            .map_err(open_err)?;
        }
        Ok(Sqlite {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `name` for `owner` unless someone owns it, in one transaction.
    pub(crate) fn claim_name(&self, name: &str, owner: &str) -> Result<Claim, StoreError> {
        let mut conn = self.conn();
        // IMMEDIATE: a read that becomes a write could fail as busy against another writer.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing: Option<String> = tx
            .query_row(
                "SELECT owner FROM tunnel_names WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?;
        let claim = match existing {
            Some(o) if o == owner => Claim::Ours,
            Some(o) => Claim::Other(o),
            None => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                tx.execute(
                    "INSERT INTO tunnel_names (name, owner, created) VALUES (?1, ?2, ?3)",
                    params![name, owner, now as i64],
                )?;
                Claim::New
            }
        };
        tx.commit()?;
        Ok(claim)
    }

    /// Issues a grant in one write transaction: ends expired grants, ends the device's live
    /// grant if `replace` (else refuses), allots `want` or the lowest free port of `ports`,
    /// claims the tunnel name for `owner`, and stores the grant.
    pub(crate) fn issue_grant(
        &self,
        new: &GrantRow,
        want: Option<u16>,
        ports: std::ops::RangeInclusive<u16>,
        owner: &str,
        replace: bool,
    ) -> Result<Allot, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let now = new.created;
        let mut ended = sweep_in(&tx, now)?;
        let live: Option<GrantRow> = tx
            .query_row(
                &format!("SELECT {COLUMNS} FROM grants WHERE device = ?1 AND ended IS NULL"),
                params![new.device],
                row,
            )
            .optional()?;
        if let Some(old) = live {
            if !replace {
                return Ok(Allot::DeviceHasGrant(old.id));
            }
            tx.execute(
                "UPDATE grants SET ended = ?2, end_reason = 'replaced' WHERE id = ?1",
                params![old.id, now as i64],
            )?;
            release_name(&tx, &old)?;
            ended.push(GrantRow {
                ended: Some(now),
                end_reason: Some("replaced".into()),
                ..old
            });
        }
        // The name first: a name another owner holds is the more telling refusal.
        if let Some(name) = &new.name {
            let existing: Option<String> = tx
                .query_row(
                    "SELECT owner FROM tunnel_names WHERE name = ?1",
                    params![name],
                    |r| r.get(0),
                )
                .optional()?;
            match existing {
                Some(o) if o != owner => return Ok(Allot::NameOwned(o)),
                Some(_) => {}
                None => {
                    tx.execute(
                        "INSERT INTO tunnel_names (name, owner, created) VALUES (?1, ?2, ?3)",
                        params![name, owner, now as i64],
                    )?;
                }
            }
        }
        let used: std::collections::HashMap<u16, String> = {
            let mut q = tx.prepare("SELECT port, id FROM grants WHERE ended IS NULL")?;
            let rows = q.query_map([], |r| Ok((r.get::<_, u16>(0)?, r.get::<_, String>(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let port = match want {
            Some(p) => match used.get(&p) {
                Some(id) => return Ok(Allot::PortTaken(id.clone())),
                None => p,
            },
            None => match ports.into_iter().find(|p| !used.contains_key(p)) {
                Some(p) => p,
                None => return Ok(Allot::NoFreePort),
            },
        };
        let row = GrantRow {
            port,
            ..new.clone()
        };
        tx.execute(
            "INSERT INTO grants (id, device, port, name, key, permit_open, source_address, created, expires)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                row.id,
                row.device,
                row.port,
                row.name,
                row.key,
                serde_json::to_string(&row.permit_open).unwrap_or_else(|_| "[]".into()),
                row.source_address,
                row.created as i64,
                row.expires as i64
            ],
        )?;
        tx.commit()?;
        Ok(Allot::Granted {
            row: Box::new(row),
            ended,
        })
    }

    /// One grant, live or not.
    pub(crate) fn grant(&self, id: &str) -> Result<Option<GrantRow>, StoreError> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM grants WHERE id = ?1"),
                params![id],
                row,
            )
            .optional()?)
    }

    /// Live grants (`all`: every grant kept), oldest first.
    pub(crate) fn grants(&self, all: bool) -> Result<Vec<GrantRow>, StoreError> {
        let conn = self.conn();
        let filter = if all { "" } else { "WHERE ended IS NULL" };
        let mut q = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM grants {filter} ORDER BY created, id"
        ))?;
        let rows = q.query_map([], row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Ends a live grant (`revoked`); the ended grant, or `None` if it was not live.
    pub(crate) fn end_grant(
        &self,
        id: &str,
        reason: &str,
        now: u64,
    ) -> Result<Option<GrantRow>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Expired but not yet swept is not live: the sweeper ends it, as expired.
        let n = tx.execute(
            "UPDATE grants SET ended = ?2, end_reason = ?3 WHERE id = ?1 AND ended IS NULL AND expires > ?2",
            params![id, now as i64, reason],
        )?;
        if n == 0 {
            tx.commit()?;
            return Ok(None);
        }
        let r = tx
            .query_row(
                &format!("SELECT {COLUMNS} FROM grants WHERE id = ?1"),
                params![id],
                row,
            )
            .optional()?;
        if let Some(r) = &r {
            release_name(&tx, r)?;
        }
        tx.commit()?;
        Ok(r)
    }

    /// Ports held by live grants.
    pub(crate) fn allotted_ports(
        &self,
        now: u64,
    ) -> Result<std::collections::HashSet<u16>, StoreError> {
        let conn = self.conn();
        let mut q = conn.prepare("SELECT port FROM grants WHERE ended IS NULL AND expires > ?1")?;
        let rows = q.query_map(params![now as i64], |r| r.get::<_, u16>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Whether a grant (live or ended) was issued for the key with this fingerprint.
    pub(crate) fn key_has_grant(&self, key: &str) -> Result<bool, StoreError> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                "SELECT 1 FROM grants WHERE key = ?1 LIMIT 1",
                params![key],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Records the first use of a grant; true if this was it.
    pub(crate) fn mark_used(&self, id: &str, now: u64) -> Result<bool, StoreError> {
        let conn = self.conn();
        let n = conn.execute(
            "UPDATE grants SET first_used = ?2 WHERE id = ?1 AND first_used IS NULL",
            params![id, now as i64],
        )?;
        Ok(n > 0)
    }

    /// Ends every live grant that has expired by `now`; those it ended.
    pub(crate) fn sweep(&self, now: u64) -> Result<Vec<GrantRow>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let ended = sweep_in(&tx, now)?;
        tx.commit()?;
        Ok(ended)
    }

    /// The next expiry among live grants.
    pub(crate) fn next_expiry(&self) -> Result<Option<u64>, StoreError> {
        let conn = self.conn();
        let t: Option<i64> = conn.query_row(
            "SELECT MIN(expires) FROM grants WHERE ended IS NULL",
            [],
            |r| r.get(0),
        )?;
        Ok(t.map(|t| t.max(0) as u64))
    }

    /// How many grants are in each state at `now`: (live, revoked, expired, replaced).
    pub(crate) fn grant_counts(&self, now: u64) -> Result<GrantCounts, StoreError> {
        let conn = self.conn();
        let mut q = conn.prepare(
            "SELECT COALESCE(end_reason, CASE WHEN expires <= ?1 THEN 'expired' ELSE 'live' END), COUNT(*)
             FROM grants GROUP BY 1",
        )?;
        let rows = q.query_map(params![now as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        let mut c = GrantCounts::default();
        for r in rows {
            let (state, n) = r?;
            let n = n.max(0) as u64;
            match state.as_str() {
                "live" => c.live += n,
                "revoked" => c.revoked += n,
                "replaced" => c.replaced += n,
                _ => c.expired += n,
            }
        }
        Ok(c)
    }

    /// Every name with its owner.
    pub(crate) fn names(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn();
        let mut q = conn.prepare("SELECT name, owner FROM tunnel_names")?;
        let rows = q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub(crate) fn add_lock(&self, l: &LockRow) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO locks (id, kind, value, reason, created, expires, by) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![l.id, l.kind, l.value, l.reason, l.created as i64, l.expires.map(|e| e as i64), l.by],
        )?;
        Ok(())
    }

    pub(crate) fn lift_lock(&self, id: &str) -> Result<Option<LockRow>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row = tx
            .query_row(
                &format!("SELECT {LOCK_COLUMNS} FROM locks WHERE id = ?1"),
                params![id],
                lock_row,
            )
            .optional()?;
        tx.execute("DELETE FROM locks WHERE id = ?1", params![id])?;
        tx.commit()?;
        Ok(row)
    }

    pub(crate) fn locks(&self) -> Result<Vec<LockRow>, StoreError> {
        let conn = self.conn();
        let mut q = conn.prepare(&format!(
            "SELECT {LOCK_COLUMNS} FROM locks ORDER BY created, id"
        ))?;
        let rows = q.query_map([], lock_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

const LOCK_COLUMNS: &str = "id, kind, value, reason, created, expires, by";

fn lock_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LockRow> {
    let secs = |v: Option<i64>| v.map(|v| v.max(0) as u64);
    Ok(LockRow {
        id: r.get(0)?,
        kind: r.get(1)?,
        value: r.get(2)?,
        reason: r.get(3)?,
        created: secs(r.get(4)?).unwrap_or(0),
        expires: secs(r.get(5)?),
        by: r.get(6)?,
    })
}

/// A grant as stored (times in Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GrantRow {
    pub(crate) id: String,
    pub(crate) device: String,
    /// The allotted `-R` port (ignored on insert: `issue_grant` allots it).
    pub(crate) port: u16,
    pub(crate) name: Option<String>,
    /// The device key's fingerprint.
    pub(crate) key: String,
    /// `-W/-L` targets the grant allows (empty: none).
    pub(crate) permit_open: Vec<String>,
    pub(crate) source_address: Option<String>,
    pub(crate) created: u64,
    pub(crate) expires: u64,
    pub(crate) first_used: Option<u64>,
    pub(crate) ended: Option<u64>,
    /// `revoked`, `expired` or `replaced`.
    pub(crate) end_reason: Option<String>,
}

/// Grants by state (`Store::grant_counts`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GrantCounts {
    pub(crate) live: u64,
    pub(crate) revoked: u64,
    pub(crate) expired: u64,
    pub(crate) replaced: u64,
}

/// How issuing a grant went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Allot {
    /// Stored, with the grants this transaction ended (expired ones swept, a replaced one).
    Granted {
        row: Box<GrantRow>,
        ended: Vec<GrantRow>,
    },
    /// The device has this live grant (and `replace` was not asked for).
    DeviceHasGrant(String),
    /// The port asked for belongs to this live grant.
    PortTaken(String),
    /// Every port of the range is allotted.
    NoFreePort,
    /// The tunnel name belongs to this other owner.
    NameOwned(String),
}

const COLUMNS: &str = "id, device, port, name, key, permit_open, source_address, created, expires, first_used, ended, end_reason";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<GrantRow> {
    let secs = |v: Option<i64>| v.map(|v| v.max(0) as u64);
    let open: String = r.get(5)?;
    Ok(GrantRow {
        id: r.get(0)?,
        device: r.get(1)?,
        port: r.get(2)?,
        name: r.get(3)?,
        key: r.get(4)?,
        // A JSON list (entries may hold any character the API let through).
        permit_open: serde_json::from_str(&open).unwrap_or_default(),
        source_address: r.get(6)?,
        created: secs(r.get(7)?).unwrap_or(0),
        expires: secs(r.get(8)?).unwrap_or(0),
        first_used: secs(r.get(9)?),
        ended: secs(r.get(10)?),
        end_reason: r.get(11)?,
    })
}

/// The owner of a device's tunnel name: the device, whichever grant it holds.
pub(crate) fn device_owner(device: &str) -> String {
    format!("device {device}")
}

/// Frees an ended grant's name (if its device still owns it), as the grant promised.
fn release_name(tx: &rusqlite::Transaction<'_>, g: &GrantRow) -> Result<(), StoreError> {
    if let Some(n) = &g.name {
        tx.execute(
            "DELETE FROM tunnel_names WHERE name = ?1 AND owner = ?2",
            params![n, device_owner(&g.device)],
        )?;
    }
    Ok(())
}

fn sweep_in(tx: &rusqlite::Transaction<'_>, now: u64) -> Result<Vec<GrantRow>, StoreError> {
    let expired: Vec<GrantRow> = {
        let mut q = tx.prepare(&format!(
            "SELECT {COLUMNS} FROM grants WHERE ended IS NULL AND expires <= ?1"
        ))?;
        let rows = q.query_map(params![now as i64], row)?;
        rows.collect::<Result<_, _>>()?
    };
    tx.execute(
        "UPDATE grants SET ended = expires, end_reason = 'expired' WHERE ended IS NULL AND expires <= ?1",
        params![now as i64],
    )?;
    for g in &expired {
        release_name(tx, g)?;
    }
    Ok(expired
        .into_iter()
        .map(|g| GrantRow {
            ended: Some(g.expires),
            end_reason: Some("expired".into()),
            ..g
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    use super::*;

    #[test]
    fn names_are_claimed_once_and_kept_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the store is private");
        assert_eq!(s.claim_name("myapp", "alice").unwrap(), Claim::New);
        assert_eq!(s.claim_name("myapp", "alice").unwrap(), Claim::Ours);
        assert_eq!(
            s.claim_name("myapp", "bob").unwrap(),
            Claim::Other("alice".into())
        );
        assert_eq!(s.claim_name("other", "alice").unwrap(), Claim::New);
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        let mut names = s.names().unwrap();
        names.sort();
        assert_eq!(
            names,
            [
                ("myapp".into(), "alice".into()),
                ("other".into(), "alice".into())
            ]
        );
        assert_eq!(
            s.claim_name("myapp", "bob").unwrap(),
            Claim::Other("alice".into())
        );
    }

    fn new_grant(id: &str, device: &str, now: u64) -> GrantRow {
        GrantRow {
            id: id.into(),
            device: device.into(),
            port: 0,
            name: Some(format!("dev-{device}")),
            key: "SHA256:k".into(),
            permit_open: Vec::new(),
            source_address: None,
            created: now,
            expires: now + 100,
            first_used: None,
            ended: None,
            end_reason: None,
        }
    }

    fn granted(a: Allot) -> (GrantRow, Vec<GrantRow>) {
        match a {
            Allot::Granted { row, ended } => (*row, ended),
            other => panic!("not granted: {other:?}"),
        }
    }

    #[test]
    fn grants_get_distinct_ports_one_per_device_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let range = 20000..=20002;
        let issue = |id: &str, dev: &str, now, want, replace| {
            s.issue_grant(
                &new_grant(id, dev, now),
                want,
                range.clone(),
                &format!("device {dev}"),
                replace,
            )
            .unwrap()
        };
        let (a, _) = granted(issue("a", "d1", 1000, None, false));
        assert_eq!(a.port, 20000);
        assert_eq!(
            issue("a2", "d1", 1000, None, false),
            Allot::DeviceHasGrant("a".into())
        );
        assert_eq!(
            issue("b", "d2", 1000, Some(20000), false),
            Allot::PortTaken("a".into())
        );
        let (b, _) = granted(issue("b", "d2", 1000, Some(20002), false));
        assert_eq!(b.port, 20002);
        let (c, _) = granted(issue("c", "d3", 1000, None, false));
        assert_eq!(c.port, 20001);
        assert_eq!(issue("d", "d4", 1000, None, false), Allot::NoFreePort);
        // Replacing ends the old grant and frees its port for the new one.
        let (a2, ended) = granted(issue("a2", "d1", 1001, None, true));
        assert_eq!(a2.port, 20000);
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].end_reason.as_deref(), Some("replaced"));
        // Another device cannot take a device's name.
        let mut n = new_grant("e", "d5", 1001);
        n.name = Some("dev-d1".into());
        assert_eq!(
            s.issue_grant(&n, None, range.clone(), "device d5", false)
                .unwrap(),
            Allot::NameOwned("device d1".into())
        );
        // At expiry the sweep ends them all and the ports come free.
        assert_eq!(s.next_expiry().unwrap(), Some(1100));
        // b and c at 1100, the replacement a2 (issued at 1001) at 1101.
        let swept = s.sweep(1101).unwrap();
        assert_eq!(swept.len(), 3, "{swept:?}");
        assert!(s.grants(false).unwrap().is_empty());
        let (d, _) = granted(issue("d", "d4", 1101, None, false));
        assert_eq!(d.port, 20000);
        // Revoked: ended once; kept in the full list across a reopen.
        assert!(s.end_grant("d", "revoked", 1102).unwrap().is_some());
        assert!(s.end_grant("d", "revoked", 1103).unwrap().is_none());
        assert!(s.mark_used("a", 1000).unwrap());
        assert!(!s.mark_used("a", 1001).unwrap());
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        let all = s.grants(true).unwrap();
        assert_eq!(all.len(), 5);
        let d = s.grant("d").unwrap().unwrap();
        assert_eq!(
            (d.ended, d.end_reason.as_deref()),
            (Some(1102), Some("revoked"))
        );
        assert_eq!(s.grant("a").unwrap().unwrap().first_used, Some(1000));
    }

    #[test]
    fn concurrent_issues_never_share_a_port() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Store::open(dir.path()).unwrap());
        // Two connections to one file, as two processes would have.
        let s2 = Arc::new(Store::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..100)
            .map(|i| {
                let s = if i % 2 == 0 { s.clone() } else { s2.clone() };
                std::thread::spawn(move || {
                    let dev = format!("d{i}");
                    match s
                        .issue_grant(
                            &new_grant(&format!("g{i}"), &dev, 1000),
                            None,
                            20000..=20199,
                            &dev,
                            false,
                        )
                        .unwrap()
                    {
                        Allot::Granted { row, .. } => row.port,
                        other => panic!("{other:?}"),
                    }
                })
            })
            .collect();
        let mut ports: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 100, "a port was allotted twice");
    }

    #[test]
    fn a_newer_schema_is_refused_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let c = Connection::open(dir.path().join(FILE)).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let e = Store::open(dir.path()).map(|_| ()).unwrap_err();
        assert!(matches!(e, StoreError::Newer { found: 99, .. }), "{e}");
    }
}
