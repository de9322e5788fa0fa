//! Live sessions: every authenticated SSH session with its channels, listeners and identity,
//! and counts of the other routed connections. What `GET /v1/sessions`, `sluice sessions` and
//! the admin page show; what `DELETE /v1/sessions/ID` and locks end.
//!
//! One process, one table (like the metrics and the trail): a global. A session registers when
//! it authenticates and leaves when its handler is dropped (`SessionGuard`); a channel
//! likewise (`ChannelGuard`), which writes its `forward_opened` and `forward_closed` audit
//! events, so a channel's timeline is in the trail whichever way it ends.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use tokio::time::Instant;

use serde::{Deserialize, Serialize};

/// The message an SSH client gets when an operator ends its session.
pub const KILLED: &str = "closed by an administrator";

/// Ends a session: sends the reason as SSH_MSG_DISCONNECT, then cuts the connection.
pub(crate) type End = Box<dyn Fn(&str) + Send + Sync>;

/// Who a session is, as its authentication established.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The login name.
    pub user: String,
    /// The fingerprint of the key that signed (`SHA256:...`; a certificate's own key).
    pub key: String,
    /// The certificate it came with, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertId>,
    /// The access grant (a certificate from sluice's own CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    /// The grant's device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// An OpenSSH certificate, as an auditor names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertId {
    /// The certificate's key id.
    pub key_id: String,
    /// Its serial number.
    pub serial: u64,
    /// The fingerprint of the CA that signed it.
    pub ca: String,
}

/// What a channel carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    /// `-W`, `-L` or `-J`: a connection sluice made to a target.
    Direct,
    /// `-W/-L/-J NAME:PORT` to a tunnel another session publishes.
    Tunnel,
    /// A connection to a `-R` port, carried to this session's client.
    Reverse,
    /// A connection to a `-R` unix socket, carried to this session's client.
    ReverseSocket,
}

impl ChannelKind {
    fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Direct => "direct",
            ChannelKind::Tunnel => "tunnel",
            ChannelKind::Reverse => "reverse",
            ChannelKind::ReverseSocket => "reverse_socket",
        }
    }
}

/// One live channel as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelView {
    /// Unique within the session.
    pub id: u64,
    /// What it carries.
    pub kind: ChannelKind,
    /// `host:port`, `NAME:PORT`, or the `-R` port or socket and the visitor.
    pub target: String,
    /// When it opened (RFC 3339, UTC).
    pub since: String,
    /// Bytes from this session's client.
    pub bytes_up: u64,
    /// Bytes to this session's client.
    pub bytes_down: u64,
}

/// One live SSH session as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    /// The session id (`DELETE /v1/sessions/ID`).
    pub id: u64,
    /// Who.
    #[serde(flatten)]
    pub identity: Identity,
    /// The client's address (after a trusted PROXY header).
    pub source: String,
    /// When it authenticated (RFC 3339, UTC).
    pub since: String,
    /// Open channels, oldest first.
    pub channels: Vec<ChannelView>,
    /// `-R` ports and sockets it listens on.
    pub listeners: Vec<String>,
    /// Tunnel names it publishes (filled in by whoever knows the tunnel registry).
    #[serde(default)]
    pub tunnels: Vec<crate::tunnel::LiveTunnel>,
    /// Bytes through all its channels so far, closed ones included.
    pub bytes_up: u64,
    /// Bytes to its client through all its channels so far, closed ones included.
    pub bytes_down: u64,
}

/// Everything live: `GET /v1/sessions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// SSH sessions, by id.
    pub sessions: Vec<SessionView>,
    /// Routed connections open now, per route (`http`, `ssh`, `tunnel`, ...); SSH
    /// connections count here too, authenticated or not.
    pub connections: BTreeMap<String, u64>,
}

/// A live session.
pub(crate) struct Session {
    pub(crate) id: u64,
    pub(crate) identity: Identity,
    pub(crate) source: SocketAddr,
    since: SystemTime,
    end: End,
    channels: Mutex<BTreeMap<u64, Arc<Channel>>>,
    listeners: Mutex<Vec<String>>,
    next_channel: AtomicU64,
    /// Bytes of channels that closed.
    closed_up: AtomicU64,
    closed_down: AtomicU64,
}

struct Channel {
    kind: ChannelKind,
    target: String,
    since: SystemTime,
    start: Instant,
    counts: crate::io::Counts,
}

/// The live table.
#[derive(Default)]
pub struct Table {
    sessions: Mutex<BTreeMap<u64, Arc<Session>>>,
    routes: Mutex<BTreeMap<&'static str, u64>>,
}

/// The process's table.
pub fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(Table::default)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a session was not ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KillError {
    /// No live session has this id (it ended, or never was).
    #[error("no live session {0}")]
    NotFound(u64),
}

impl Table {
    /// Registers an authenticated session until the guard is dropped.
    pub(crate) fn enter(
        &self,
        id: u64,
        identity: Identity,
        source: SocketAddr,
        end: End,
    ) -> SessionGuard {
        let s = Arc::new(Session {
            id,
            identity,
            source,
            since: SystemTime::now(),
            end,
            channels: Mutex::default(),
            listeners: Mutex::default(),
            next_channel: AtomicU64::new(1),
            closed_up: AtomicU64::new(0),
            closed_down: AtomicU64::new(0),
        });
        lock(&self.sessions).insert(id, s.clone());
        SessionGuard(s)
    }

    /// Counts a routed connection under `route` until the guard is dropped.
    pub(crate) fn route(&self, route: &'static str) -> RouteGuard {
        *lock(&self.routes).entry(route).or_default() += 1;
        RouteGuard(route)
    }

    /// Everything live now, sessions by id.
    pub fn snapshot(&self) -> Snapshot {
        let sessions: Vec<Arc<Session>> = lock(&self.sessions).values().cloned().collect();
        Snapshot {
            sessions: sessions.iter().map(|s| s.view()).collect(),
            connections: lock(&self.routes)
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| (k.to_string(), *n))
                .collect(),
        }
    }

    /// One session now.
    pub fn get(&self, id: u64) -> Option<SessionView> {
        let s = lock(&self.sessions).get(&id).cloned();
        s.map(|s| s.view())
    }

    /// Ends session `id` with [`KILLED`]; `by` (who asked) goes to the trail.
    pub fn kill(&self, id: u64, by: &str) -> Result<SessionView, KillError> {
        let s = lock(&self.sessions).get(&id).cloned();
        let s = s.ok_or(KillError::NotFound(id))?;
        s.kill(by, KILLED);
        Ok(s.view())
    }

    /// Ends every session `matches` picks, with `why`; how many.
    pub(crate) fn end_where(
        &self,
        matches: impl Fn(&Identity, SocketAddr) -> bool,
        by: &str,
        why: &str,
    ) -> usize {
        let picked: Vec<Arc<Session>> = lock(&self.sessions)
            .values()
            .filter(|s| matches(&s.identity, s.source))
            .cloned()
            .collect();
        for s in &picked {
            s.kill(by, why);
        }
        picked.len()
    }

    /// How many sessions are live.
    pub fn len(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Session {
    fn kill(&self, by: &str, why: &str) {
        tracing::warn!(target: "sluice::ssh", session = self.id, peer = %self.source, user = crate::text::clean(&self.identity.user), key = self.identity.key, by, "session ended: {why}");
        crate::audit::record(|| crate::audit::Event::SessionKilled {
            session: self.id,
            user: self.identity.user.clone(),
            key: self.identity.key.clone(),
            peer: self.source.to_string(),
            by: by.to_string(),
            why: why.to_string(),
        });
        (self.end)(why);
    }

    /// Opens a channel record until the guard is dropped; logs `forward_opened` now and
    /// `forward_closed` (bytes, duration) then.
    pub(crate) fn channel(self: &Arc<Self>, kind: ChannelKind, target: String) -> ChannelGuard {
        let id = self.next_channel.fetch_add(1, Relaxed);
        crate::audit::record(|| crate::audit::Event::ForwardOpened {
            session: self.id,
            channel: id,
            kind: kind.as_str().into(),
            target: target.clone(),
            user: self.identity.user.clone(),
            key: self.identity.key.clone(),
            peer: self.source.to_string(),
        });
        let c = Arc::new(Channel {
            kind,
            target,
            since: SystemTime::now(),
            start: Instant::now(),
            counts: crate::io::Counts::default(),
        });
        lock(&self.channels).insert(id, c.clone());
        ChannelGuard {
            session: self.clone(),
            id,
            counts: c.counts.clone(),
        }
    }

    /// Notes a `-R` listener (port or socket) until `unlisten`.
    pub(crate) fn listen(&self, what: String) {
        lock(&self.listeners).push(what);
    }

    /// Forgets a `-R` listener.
    pub(crate) fn unlisten(&self, what: &str) {
        lock(&self.listeners).retain(|l| l != what);
    }

    fn view(&self) -> SessionView {
        let channels: Vec<ChannelView> = lock(&self.channels)
            .iter()
            .map(|(id, c)| {
                let b = c.counts.get();
                ChannelView {
                    id: *id,
                    kind: c.kind,
                    target: c.target.clone(),
                    since: humantime::format_rfc3339_seconds(c.since).to_string(),
                    bytes_up: b.up,
                    bytes_down: b.down,
                }
            })
            .collect();
        let (up, down) = channels.iter().fold(
            (self.closed_up.load(Relaxed), self.closed_down.load(Relaxed)),
            |(u, d), c| (u + c.bytes_up, d + c.bytes_down),
        );
        SessionView {
            id: self.id,
            identity: self.identity.clone(),
            source: self.source.to_string(),
            since: humantime::format_rfc3339_seconds(self.since).to_string(),
            channels,
            listeners: lock(&self.listeners).clone(),
            tunnels: Vec::new(),
            bytes_up: up,
            bytes_down: down,
        }
    }
}

/// Keeps a session in the table; it leaves when this is dropped.
pub(crate) struct SessionGuard(Arc<Session>);

impl SessionGuard {
    pub(crate) fn session(&self) -> &Arc<Session> {
        &self.0
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        lock(&table().sessions).remove(&self.0.id);
    }
}

/// Keeps a channel in its session's record; dropping it logs `forward_closed`.
pub(crate) struct ChannelGuard {
    session: Arc<Session>,
    id: u64,
    counts: crate::io::Counts,
}

impl ChannelGuard {
    /// The counters the channel's stream adds to (reads: from the client; writes: to it).
    pub(crate) fn counts(&self) -> crate::io::Counts {
        self.counts.clone()
    }
}

impl Drop for ChannelGuard {
    fn drop(&mut self) {
        let c = lock(&self.session.channels).remove(&self.id);
        let Some(c) = c else { return };
        let b = c.counts.get();
        self.session.closed_up.fetch_add(b.up, Relaxed);
        self.session.closed_down.fetch_add(b.down, Relaxed);
        let s = &self.session;
        crate::audit::record(|| crate::audit::Event::ForwardClosed {
            session: s.id,
            channel: self.id,
            kind: c.kind.as_str().into(),
            target: c.target.clone(),
            bytes_up: b.up,
            bytes_down: b.down,
            duration_ms: u64::try_from(c.start.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
    }
}

/// Counts one connection under its route while alive.
pub(crate) struct RouteGuard(&'static str);

impl Drop for RouteGuard {
    fn drop(&mut self) {
        let mut r = lock(&table().routes);
        if let Some(n) = r.get_mut(self.0) {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn who(user: &str, key: &str) -> Identity {
        Identity {
            user: user.into(),
            key: key.into(),
            ..Identity::default()
        }
    }

    #[test]
    fn sessions_and_channels_come_and_go_with_their_guards() {
        let t = table();
        let ended = Arc::new(AtomicUsize::new(0));
        let e = ended.clone();
        let peer: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let g = t.enter(
            9_000_001,
            who("alice", "SHA256:a"),
            peer,
            Box::new(move |why| {
                assert_eq!(why, KILLED);
                e.fetch_add(1, Relaxed);
            }),
        );
        let ch = g.session().channel(ChannelKind::Direct, "db:5432".into());
        let v = t.get(9_000_001).unwrap();
        assert_eq!(v.channels.len(), 1);
        assert_eq!(v.channels[0].target, "db:5432");
        drop(ch);
        assert!(t.get(9_000_001).unwrap().channels.is_empty());
        assert_eq!(t.kill(9_000_001, "test").unwrap().identity.user, "alice");
        assert_eq!(ended.load(Relaxed), 1);
        drop(g);
        assert!(t.get(9_000_001).is_none());
        assert_eq!(
            t.kill(9_000_001, "test"),
            Err(KillError::NotFound(9_000_001))
        );
    }

    #[test]
    fn end_where_picks_only_matching_sessions() {
        let t = table();
        let n = Arc::new(AtomicUsize::new(0));
        let peer: SocketAddr = "198.51.100.1:1".parse().unwrap();
        let mk = |id, key: &str| {
            let n = n.clone();
            t.enter(
                id,
                who("u", key),
                peer,
                Box::new(move |_| {
                    n.fetch_add(1, Relaxed);
                }),
            )
        };
        let (_a, _b) = (mk(9_100_001, "SHA256:x"), mk(9_100_002, "SHA256:y"));
        let ended = t.end_where(|i, _| i.key == "SHA256:x", "lock", "locked");
        assert_eq!((ended, n.load(Relaxed)), (1, 1));
    }

    #[test]
    fn route_counts_fall_back_to_zero_and_vanish() {
        let t = table();
        let a = t.route("test-route");
        let b = t.route("test-route");
        assert_eq!(t.snapshot().connections.get("test-route"), Some(&2));
        drop((a, b));
        assert_eq!(t.snapshot().connections.get("test-route"), None);
    }
}
