//! What sluice must remember across restarts, in one SQLite file in the state directory
//! (`sluice.db`, 0600): today the owners of tunnel names; grants and allocations join it.
//!
//! SQLite through rusqlite (bundled, so no system library is needed): transactions and unique
//! keys make a claim atomic, the file survives a crash mid-write (WAL), and an operator can
//! read it with the `sqlite3` shell. One connection behind a mutex: writes are rare (a new
//! name), reads are served from memory by the callers.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};

/// The store's file name in the state directory.
pub(crate) const FILE: &str = "sluice.db";

/// The schema this build writes; older files are migrated forward, newer ones refused.
const SCHEMA: i64 = 1;

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

/// The open store.
pub(crate) struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (or creates, 0600) `dir/sluice.db`.
    pub(crate) fn open(dir: &Path) -> Result<Store, StoreError> {
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
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `name` for `owner` unless someone owns it, in one transaction.
    pub(crate) fn claim_name(&self, name: &str, owner: &str) -> Result<Claim, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
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

    /// Every name with its owner.
    pub(crate) fn names(&self) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.conn();
        let mut q = conn.prepare("SELECT name, owner FROM tunnel_names")?;
        let rows = q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

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
