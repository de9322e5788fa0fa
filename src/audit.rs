//! The audit trail: one JSON line per security event, tamper evident. Each line carries a
//! sequence number and the SHA-256 of the line before it (`prev`), across files: the first
//! line of a rotated-in file chains to the last line of the one before. `sluice audit verify`
//! checks the chain and names the first line that breaks it.
//!
//! Writing never blocks the daemon: events go through a bounded queue to a writer thread; a
//! full queue or a failed write is logged and counted (`sluice_audit_failures_total`), never
//! waited on.
//!
//! One process, one trail (like the metrics): a global, set once at start.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::SystemTime;

use serde::Serialize;

/// The current file's name in the audit directory; rotated files are `audit-SEQ.log`.
pub const CURRENT: &str = "audit.log";
/// Events queued for the writer at most; more are dropped (and counted).
const QUEUE: usize = 4096;
/// `prev` of the very first line.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A security event. Fields are what an auditor needs, never a secret.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// sluice started writing the trail (at every start: a restart is visible).
    AuditStarted {
        /// sluice's version.
        version: String,
        /// The process id.
        pid: u32,
    },
    /// An access grant was issued.
    GrantIssued {
        /// The grant id.
        grant: String,
        /// The device id.
        device: String,
        /// The allotted port.
        port: u16,
        /// The tunnel name.
        name: Option<String>,
        /// The device key's fingerprint.
        key: String,
        /// When it expires (RFC 3339).
        expires: String,
        /// Who asked: the control socket, or a token's name and address.
        by: String,
    },
    /// A grant's certificate authenticated for the first time.
    GrantUsed {
        /// The grant id.
        grant: String,
        /// The device id.
        device: String,
        /// The client's address.
        peer: String,
    },
    /// A grant ended: `revoked`, `expired` or `replaced`.
    GrantEnded {
        /// The grant id.
        grant: String,
        /// The device id.
        device: String,
        /// How.
        how: String,
        /// Live sessions it ended here.
        sessions_ended: usize,
    },
    /// A connection ended after it was routed (junk that never reached a route is not here).
    ConnectionClosed {
        /// The connection id (as in the log).
        id: u64,
        /// The client's address.
        peer: String,
        /// The SNI it sent.
        sni: Option<String>,
        /// The ALPN agreed.
        alpn: Option<String>,
        /// `http`, `ssh`, ...
        route: String,
        /// Where it went.
        backend: Option<String>,
        /// Bytes from the client.
        bytes_up: u64,
        /// Bytes to the client.
        bytes_down: u64,
        /// How long it lasted.
        duration_ms: u64,
        /// How it ended.
        end: String,
    },
    /// A tunnel name was published (`-R NAME:PORT`).
    TunnelPublished {
        /// The name.
        name: String,
        /// The port visitors use.
        port: u16,
        /// The identity that owns it.
        owner: String,
        /// The publisher's address.
        peer: String,
    },
    /// A tunnel was withdrawn by its publisher, taken from a stale session (`evicted`), or
    /// ended with its session (`session_ended`).
    TunnelEnded {
        /// The name.
        name: String,
        /// The port.
        port: u16,
        /// `withdrawn`, `evicted` or `session_ended`.
        how: String,
        /// The address of the session that asked.
        peer: String,
    },
    /// A `-R` listener was opened on the server.
    ReverseForwardOpened {
        /// The login name.
        user: String,
        /// The key's fingerprint.
        key: String,
        /// The address or socket listened on.
        listen: String,
        /// The client's address.
        peer: String,
    },
    /// An SSH authentication succeeded.
    SshAuthAccepted {
        /// The login name.
        user: String,
        /// The client's address.
        peer: String,
        /// `publickey` or `certificate`.
        method: String,
        /// The key's fingerprint.
        key: String,
        /// The key line or certificate, as logged.
        label: String,
        /// The access grant, if it was one's certificate.
        grant: Option<String>,
    },
    /// An SSH authentication was refused.
    SshAuthRefused {
        /// The login name.
        user: String,
        /// The client's address.
        peer: String,
        /// What was offered.
        what: String,
        /// Why it was refused.
        reason: String,
    },
    /// A channel opened: `-W/-L/-J` (`direct`), to a tunnel by name (`tunnel`), or a
    /// connection to a `-R` port or socket carried to the client (`reverse`, `reverse_socket`).
    ForwardOpened {
        /// The session (as in `GET /v1/sessions`).
        session: u64,
        /// The channel, within the session.
        channel: u64,
        /// What it carries.
        kind: String,
        /// `host:port`, `NAME:PORT`, or the listener and the visitor's address.
        target: String,
        /// The login name.
        user: String,
        /// The key's fingerprint.
        key: String,
        /// The client's address.
        peer: String,
    },
    /// A channel closed.
    ForwardClosed {
        /// The session.
        session: u64,
        /// The channel.
        channel: u64,
        /// What it carried.
        kind: String,
        /// Where.
        target: String,
        /// Bytes from the session's client.
        bytes_up: u64,
        /// Bytes to it.
        bytes_down: u64,
        /// How long it was open.
        duration_ms: u64,
    },
    /// An operator (or a lock) ended a live session.
    SessionKilled {
        /// The session.
        session: u64,
        /// Its login name.
        user: String,
        /// Its key's fingerprint.
        key: String,
        /// Its client's address.
        peer: String,
        /// Who ended it: the control socket, a token's name, or `lock ID`.
        by: String,
        /// The message its client got.
        why: String,
    },
    /// A lock was added.
    LockAdded {
        /// The lock id.
        lock: String,
        /// `key`, `grant`, `device` or `source`.
        kind: String,
        /// What it matches.
        value: String,
        /// Why.
        reason: String,
        /// When it expires (RFC 3339), if it does.
        expires: Option<String>,
        /// Who added it.
        by: String,
    },
    /// A lock ended: `lifted` by an operator, or `expired`.
    LockLifted {
        /// The lock id.
        lock: String,
        /// How.
        how: String,
        /// Who lifted it (`sluice` when it expired).
        by: String,
    },
    /// The configuration, certificates or keys were reloaded (or a reload failed).
    Reloaded {
        /// `config`, `certificates`, or `authorized_keys`.
        what: String,
        /// Whether it took effect.
        ok: bool,
        /// What changed, or why nothing did.
        detail: String,
    },
}

/// One line as written: the chain fields, then the event.
#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    time: String,
    prev: &'a str,
    #[serde(flatten)]
    event: &'a Event,
}

/// What the chain needs of a line read back.
#[derive(serde::Deserialize)]
struct Head {
    seq: u64,
    prev: String,
}

fn head(line: &str) -> Result<Head, Break> {
    serde_json::from_str(line).map_err(|e| Break::Malformed(e.to_string()))
}

/// The chain's state: the next sequence number and the hash of the last line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The next line's sequence number.
    pub next_seq: u64,
    /// SHA-256 (hex) of the last line written.
    pub prev: String,
}

impl Default for Chain {
    fn default() -> Self {
        Chain {
            next_seq: 1,
            prev: GENESIS.into(),
        }
    }
}

fn sha256_hex(b: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b);
    d.as_ref().iter().map(|x| format!("{x:02x}")).collect()
}

impl Chain {
    /// The line for `event` at `time` (without its newline), and the chain after it.
    pub fn line(&mut self, event: &Event, time: SystemTime) -> String {
        let text = serde_json::to_string(&Line {
            seq: self.next_seq,
            time: humantime::format_rfc3339_millis(time).to_string(),
            prev: &self.prev,
            event,
        })
        .unwrap_or_default();
        self.prev = sha256_hex(text.as_bytes());
        self.next_seq += 1;
        text
    }

    /// The chain after `line` (as read back), checking that it follows this chain.
    pub fn follow(&mut self, line: &str) -> Result<(), Break> {
        let head = head(line)?;
        if head.seq != self.next_seq {
            return Err(Break::Sequence {
                expected: self.next_seq,
                found: head.seq,
            });
        }
        if head.prev != self.prev {
            return Err(Break::Hash);
        }
        self.prev = sha256_hex(line.as_bytes());
        self.next_seq += 1;
        Ok(())
    }
}

/// Why a line does not follow the one before.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Break {
    /// Not a JSON line with `seq` and `prev`.
    #[error("not an audit line: {0}")]
    Malformed(String),
    /// A line is missing, repeated or out of order.
    #[error("sequence {found} where {expected} was due (a line deleted, repeated or moved)")]
    Sequence {
        /// What the chain expected.
        expected: u64,
        /// What the line says.
        found: u64,
    },
    /// The line before it was changed (or this one's `prev` was).
    #[error("prev does not match the line before (it, or this line, was edited)")]
    Hash,
}

/// Where the chain broke.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line does not follow.
    #[error("{}:{line}: {why}", path.display())]
    Broken {
        /// The file.
        path: PathBuf,
        /// 1-based.
        line: usize,
        /// How.
        why: Break,
    },
}

/// Reads `files` in order as one chain from its start (or from the first line's own `seq` and
/// `prev` when `from_first`: a trail whose oldest files were deleted). The lines checked.
pub fn verify(files: &[PathBuf], from_first: bool) -> Result<u64, VerifyError> {
    let mut chain: Option<Chain> = (!from_first).then(Chain::default);
    let mut n = 0;
    for path in files {
        let f = File::open(path).map_err(|source| VerifyError::Read {
            path: path.clone(),
            source,
        })?;
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let line = line.map_err(|source| VerifyError::Read {
                path: path.clone(),
                source,
            })?;
            let broken = |why| VerifyError::Broken {
                path: path.clone(),
                line: i + 1,
                why,
            };
            let c = match &mut chain {
                Some(c) => c,
                None => {
                    // Trust the first line's own place in the chain.
                    let h = head(&line).map_err(broken)?;
                    chain.insert(Chain {
                        next_seq: h.seq,
                        prev: h.prev,
                    })
                }
            };
            c.follow(&line).map_err(broken)?;
            n += 1;
        }
    }
    Ok(n)
}

/// The trail's files in `dir`, oldest first: rotated ones by their first sequence number,
/// then the current one.
pub fn files_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut rotated: Vec<(u64, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(seq) = name
            .strip_prefix("audit-")
            .and_then(|r| r.strip_suffix(".log"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            rotated.push((seq, p));
        }
    }
    rotated.sort();
    let mut out: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    let current = dir.join(CURRENT);
    if current.exists() {
        out.push(current);
    }
    Ok(out)
}

/// What `sluice audit search` keeps.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Lines at or after this time.
    pub since: Option<SystemTime>,
    /// Lines before this time.
    pub until: Option<SystemTime>,
    /// A key fingerprint, CA, certificate id or tunnel owner: contained in `key`, `owner`,
    /// `label`, `what` or `value`.
    pub identity: Option<String>,
    /// A device id: equal to `device`, `user` (a grant's login is its device) or a lock's
    /// value, or owning the tunnel (`owner`).
    pub device: Option<String>,
    /// A grant id: equal to `grant` or a lock's value.
    pub grant: Option<String>,
    /// A session id.
    pub session: Option<u64>,
    /// Event names (`session_killed`, ...); empty: all.
    pub events: Vec<String>,
}

impl Filter {
    /// Whether the line (one JSON object) passes; a line that is not one never does.
    pub fn matches(&self, line: &str) -> bool {
        let Ok(serde_json::Value::Object(o)) = serde_json::from_str::<serde_json::Value>(line)
        else {
            return false;
        };
        let text = |k: &str| o.get(k).and_then(|v| v.as_str());
        if self.since.is_some() || self.until.is_some() {
            let Some(t) = text("time").and_then(|t| humantime::parse_rfc3339(t).ok()) else {
                return false;
            };
            if self.since.is_some_and(|s| t < s) || self.until.is_some_and(|u| t >= u) {
                return false;
            }
        }
        if !self.events.is_empty()
            && !text("event").is_some_and(|e| self.events.iter().any(|x| x == e))
        {
            return false;
        }
        let any =
            |keys: &[&str], f: &dyn Fn(&str) -> bool| keys.iter().any(|k| text(k).is_some_and(f));
        if let Some(id) = &self.identity {
            if !any(&["key", "owner", "label", "what", "value"], &|v| {
                v.contains(id.as_str())
            }) {
                return false;
            }
        }
        if let Some(d) = &self.device {
            let owner = crate::store::device_owner(d);
            if !any(&["device", "user", "value"], &|v| v == d) && text("owner") != Some(&owner) {
                return false;
            }
        }
        if let Some(g) = &self.grant {
            if !any(&["grant", "value"], &|v| v == g) {
                return false;
            }
        }
        if let Some(n) = self.session {
            if o.get("session").and_then(|v| v.as_u64()) != Some(n) {
                return false;
            }
        }
        true
    }
}

/// Calls `out` with every line of `files` (in order) that `filter` keeps; how many.
pub fn search(
    files: &[PathBuf],
    filter: &Filter,
    mut out: impl FnMut(&str),
) -> Result<u64, VerifyError> {
    let mut n = 0;
    for path in files {
        let f = File::open(path).map_err(|source| VerifyError::Read {
            path: path.clone(),
            source,
        })?;
        for line in BufReader::new(f).lines() {
            let line = line.map_err(|source| VerifyError::Read {
                path: path.clone(),
                source,
            })?;
            if filter.matches(&line) {
                out(&line);
                n += 1;
            }
        }
    }
    Ok(n)
}

/// The chain as the trail in `dir` leaves it (its last line), to continue it.
fn resume(dir: &Path) -> Chain {
    let mut chain = Chain::default();
    let Ok(files) = files_in(dir) else {
        return chain;
    };
    // The last line of the newest file that has one (regular files only: a device such as
    // /dev/full or a FIFO in its place would be read forever).
    for path in files.iter().rev().filter(|p| is_regular(p)) {
        let Ok(f) = File::open(path) else { continue };
        let last = BufReader::new(f).lines().map_while(Result::ok).last();
        if let Some(line) = last {
            if let Ok(h) = head(&line) {
                chain = Chain {
                    next_seq: h.seq + 1,
                    prev: sha256_hex(line.as_bytes()),
                };
            }
            break;
        }
    }
    chain
}

/// The writer's end: the file, its size, the chain.
struct Writer {
    dir: PathBuf,
    max_bytes: u64,
    rotate_daily: bool,
    file: File,
    size: u64,
    chain: Chain,
    /// The sequence number of the current file's first line (its name when rotated).
    first_seq: u64,
    /// The UTC day of the current file's first line.
    day: u64,
}

impl Writer {
    fn open(dir: &Path, max_bytes: u64, rotate_daily: bool) -> std::io::Result<Writer> {
        crate::state::ensure_dir(dir)?;
        let chain = resume(dir);
        let path = dir.join(CURRENT);
        let file = open_current(&path)?;
        let size = file.metadata()?.len();
        let first_seq = first_seq_of(&path).unwrap_or(chain.next_seq);
        let day = first_day_of(&path).unwrap_or_else(|| day_of(SystemTime::now()));
        Ok(Writer {
            dir: dir.to_path_buf(),
            max_bytes,
            rotate_daily,
            file,
            size,
            chain,
            first_seq,
            day,
        })
    }

    /// Writes `event` at `now`. The chain moves on only once the line is written: a failed
    /// write leaves no gap for `verify` to report.
    fn write(&mut self, event: &Event, now: SystemTime) -> std::io::Result<()> {
        let new_day = self.rotate_daily && day_of(now) != self.day;
        if self.size > 0 && (self.size >= self.max_bytes || new_day) {
            self.rotate()?;
        }
        if self.size == 0 {
            self.day = day_of(now);
        }
        let mut chain = self.chain.clone();
        let mut line = chain.line(event, now);
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.chain = chain;
        self.size += line.len() as u64;
        Ok(())
    }

    /// Opens the current file again (after a failed write), where the chain left it.
    fn reopen(&mut self) -> std::io::Result<()> {
        let path = self.dir.join(CURRENT);
        self.file = open_current(&path)?;
        self.size = self.file.metadata()?.len();
        self.first_seq = first_seq_of(&path).unwrap_or(self.chain.next_seq);
        Ok(())
    }

    /// Renames the current file `audit-FIRSTSEQ.log` and starts a new one; the chain goes on.
    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        let to = self.dir.join(format!("audit-{:020}.log", self.first_seq));
        std::fs::rename(self.dir.join(CURRENT), to)?;
        self.file = open_current(&self.dir.join(CURRENT))?;
        self.size = 0;
        self.first_seq = self.chain.next_seq;
        Ok(())
    }
}

fn is_regular(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file())
}

/// The day (since the epoch, UTC) of `t`.
fn day_of(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86400)
}

/// The day of the first line of `path`, if it has one.
fn first_day_of(path: &Path) -> Option<u64> {
    if !is_regular(path) {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Time {
        time: String,
    }
    let f = File::open(path).ok()?;
    let first = BufReader::new(f).lines().next()?.ok()?;
    let t: Time = serde_json::from_str(&first).ok()?;
    humantime::parse_rfc3339(&t.time).ok().map(day_of)
}

/// Opens the current file for appending, private (a non-regular file is left as it is).
fn open_current(path: &Path) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    if is_regular(path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

fn first_seq_of(path: &Path) -> Option<u64> {
    if !is_regular(path) {
        return None;
    }
    let f = File::open(path).ok()?;
    let first = BufReader::new(f).lines().next()?.ok()?;
    head(&first).ok().map(|h| h.seq)
}

static TRAIL: OnceLock<SyncSender<Event>> = OnceLock::new();

/// The trail's directory: `[audit] dir`, else `audit` in the state directory.
pub fn dir(settings: &crate::config::AuditSettings, state_dir: &Path) -> PathBuf {
    settings
        .dir
        .clone()
        .unwrap_or_else(|| state_dir.join("audit"))
}

/// Whether the last write succeeded (or none failed yet).
static WRITABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);
/// `[audit] on_failure = "refuse"`: new sessions wait for a writable trail.
static REFUSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Starts the trail `settings` describe in `dir`; events recorded before this, or without
/// it, go nowhere.
pub fn start(dir: &Path, settings: &crate::config::AuditSettings) -> std::io::Result<()> {
    use std::sync::atomic::Ordering::Release;
    let mut w = Writer::open(dir, settings.max_bytes, settings.rotate_daily)?;
    let (tx, rx) = sync_channel::<Event>(QUEUE);
    std::thread::Builder::new()
        .name("sluice-audit".into())
        .spawn(move || {
            while let Ok(e) = rx.recv() {
                // Once more on a fresh open: the file may have been moved or replaced.
                let r = w
                    .write(&e, SystemTime::now())
                    .or_else(|_| w.reopen().and_then(|()| w.write(&e, SystemTime::now())));
                match r {
                    Ok(()) => {
                        if !WRITABLE.swap(true, Release) {
                            tracing::info!(target: "sluice::audit", "audit trail: written again");
                        }
                    }
                    Err(err) => {
                        WRITABLE.store(false, Release);
                        failed("write", &err.to_string());
                    }
                }
            }
        })?;
    REFUSE.store(
        settings.on_failure == crate::config::AuditFailure::Refuse,
        Release,
    );
    let _ = TRAIL.set(tx);
    record(|| Event::AuditStarted {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
    });
    tracing::info!(dir = %dir.display(), "audit trail: {}", dir.join(CURRENT).display());
    Ok(())
}

/// Whether a new session must be refused: `on_failure = "refuse"` and the trail's last write
/// (or queueing) failed. The refusal is itself an event, whose write tells when it works again.
pub fn refusing() -> bool {
    use std::sync::atomic::Ordering::Acquire;
    REFUSE.load(Acquire) && !WRITABLE.load(Acquire)
}

fn failed(what: &'static str, why: &str) {
    crate::metrics::count(&crate::metrics::get().audit_failures, what);
    tracing::warn!(target: "sluice::audit", what, error = why, "audit trail: an event was not written");
}

/// Records the event `make` builds (never waits: a full queue drops it, logged and counted).
/// Without a trail, `make` is not called: the connection path builds nothing for it.
pub fn record(make: impl FnOnce() -> Event) {
    if let Some(tx) = TRAIL.get() {
        match tx.try_send(make()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                WRITABLE.store(false, std::sync::atomic::Ordering::Release);
                failed("queue_full", "the writer is behind");
            }
            Err(TrySendError::Disconnected(_)) => failed("writer_gone", "the writer stopped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: usize) -> Event {
        Event::GrantUsed {
            grant: format!("g-{i}"),
            device: "d".into(),
            peer: "127.0.0.1".into(),
        }
    }

    #[test]
    fn the_chain_names_an_edit_a_deletion_and_a_swap() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.log");
        let mut c = Chain::default();
        let lines: Vec<String> = (0..5).map(|i| c.line(&ev(i), SystemTime::now())).collect();
        let write = |ls: &[String]| std::fs::write(&f, ls.join("\n") + "\n").unwrap();
        write(&lines);
        assert_eq!(verify(std::slice::from_ref(&f), false).unwrap(), 5);
        // An edit: the next line's prev no longer matches.
        let mut edited = lines.clone();
        edited[2] = edited[2].replace("g-2", "g-X");
        write(&edited);
        let e = verify(std::slice::from_ref(&f), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with(":4: prev does not match the line before (it, or this line, was edited)"),
            "{e}"
        );
        // A deleted line.
        let mut deleted = lines.clone();
        deleted.remove(1);
        write(&deleted);
        let e = verify(std::slice::from_ref(&f), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(":2: sequence 3 where 2 was due"), "{e}");
        // Two lines swapped.
        let mut swapped = lines;
        swapped.swap(3, 4);
        write(&swapped);
        let e = verify(std::slice::from_ref(&f), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(":4: sequence 5 where 4 was due"), "{e}");
        assert!(matches!(
            Chain::default().follow("not json"),
            Err(Break::Malformed(_))
        ));
    }

    #[test]
    fn rotation_and_a_restart_keep_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let mut w = Writer::open(dir.path(), 600, true).unwrap();
        for i in 0..20 {
            w.write(&ev(i), now).unwrap();
        }
        drop(w);
        // A restart continues where the trail ends.
        let mut w = Writer::open(dir.path(), 600, true).unwrap();
        for i in 20..25 {
            w.write(&ev(i), now).unwrap();
        }
        drop(w);
        let files = files_in(dir.path()).unwrap();
        assert!(files.len() > 2, "{files:?}");
        assert_eq!(verify(&files, false).unwrap(), 25);
        // The oldest file deleted (retention): from the first line on, the rest still holds.
        std::fs::remove_file(&files[0]).unwrap();
        let rest = files_in(dir.path()).unwrap();
        assert!(verify(&rest, false).is_err());
        assert!(verify(&rest, true).unwrap() < 25);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(CURRENT))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_new_day_starts_a_new_file_and_the_chain_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let day = std::time::Duration::from_secs(86400);
        let t0 = std::time::UNIX_EPOCH + day * 20_000 + std::time::Duration::from_secs(3600);
        let mut w = Writer::open(dir.path(), 1 << 20, true).unwrap();
        w.write(&ev(0), t0).unwrap();
        w.write(&ev(1), t0 + std::time::Duration::from_secs(60))
            .unwrap();
        // Restarted on the same day: the same file.
        drop(w);
        let mut w = Writer::open(dir.path(), 1 << 20, true).unwrap();
        assert_eq!(w.day, 20_000);
        w.write(&ev(2), t0 + std::time::Duration::from_secs(120))
            .unwrap();
        assert_eq!(files_in(dir.path()).unwrap().len(), 1);
        w.write(&ev(3), t0 + day).unwrap();
        w.write(&ev(4), t0 + day * 3).unwrap();
        let files = files_in(dir.path()).unwrap();
        assert_eq!(files.len(), 3, "{files:?}");
        assert_eq!(verify(&files, false).unwrap(), 5);
        // Size only: one file.
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::open(dir.path(), 1 << 20, false).unwrap();
        w.write(&ev(0), t0).unwrap();
        w.write(&ev(1), t0 + day).unwrap();
        assert_eq!(files_in(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn search_filters_by_time_identity_device_grant_session_and_event() {
        let mut c = Chain::default();
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let killed = c.line(
            &Event::SessionKilled {
                session: 7,
                user: "dev-1".into(),
                key: "SHA256:abc".into(),
                peer: "127.0.0.1:1".into(),
                by: "the control socket".into(),
                why: "closed by an administrator".into(),
            },
            t,
        );
        let locked = c.line(
            &Event::LockAdded {
                lock: "l-1".into(),
                kind: "grant".into(),
                value: "g-9".into(),
                reason: String::new(),
                expires: None,
                by: "x".into(),
            },
            t + std::time::Duration::from_secs(3600),
        );
        let f = |f: Filter| (f.matches(&killed), f.matches(&locked));
        assert_eq!(f(Filter::default()), (true, true));
        let later = t + std::time::Duration::from_secs(60);
        assert_eq!(
            f(Filter {
                since: Some(later),
                ..Filter::default()
            }),
            (false, true)
        );
        assert_eq!(
            f(Filter {
                until: Some(later),
                ..Filter::default()
            }),
            (true, false)
        );
        assert_eq!(
            f(Filter {
                identity: Some("SHA256:ab".into()),
                ..Filter::default()
            }),
            (true, false)
        );
        assert_eq!(
            f(Filter {
                device: Some("dev-1".into()),
                ..Filter::default()
            }),
            (true, false)
        );
        assert_eq!(
            f(Filter {
                grant: Some("g-9".into()),
                ..Filter::default()
            }),
            (false, true)
        );
        assert_eq!(
            f(Filter {
                session: Some(7),
                ..Filter::default()
            }),
            (true, false)
        );
        assert_eq!(
            f(Filter {
                events: vec!["lock_added".into()],
                ..Filter::default()
            }),
            (false, true)
        );
        assert!(!Filter::default().matches("not json"));
    }

    #[test]
    fn a_failed_write_leaves_no_gap_in_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::open(dir.path(), 1 << 20, false).unwrap();
        let now = SystemTime::now();
        w.write(&ev(0), now).unwrap();
        let good = std::mem::replace(&mut w.file, File::open("/dev/null").unwrap());
        // Read-only: the write fails; the chain stays where it was.
        assert!(w.write(&ev(1), now).is_err());
        w.file = good;
        w.write(&ev(2), now).unwrap();
        assert_eq!(verify(&files_in(dir.path()).unwrap(), false).unwrap(), 2);
    }
}
