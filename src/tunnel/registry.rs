//! Who owns which name and which session serves it now.
//!
//! A name belongs to the first identity that publishes it and stays its own (in the store, so
//! across restarts too): a reconnect gets it back and nobody else takes it meanwhile. While a
//! session serves the name, visitors are sent to it, port by port.

#[cfg(test)]
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use russh::server::Handle;

use crate::store::{Claim, Store, StoreError};

/// Why a name could not be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Another identity owns the name.
    Owned,
    /// Another session of the same identity serves this name and port now.
    Held {
        /// When that session published it.
        since: SystemTime,
    },
    /// The identity holds `max_per_identity` names already.
    TooMany(u32),
    /// The owner could not be recorded (the store failed): nothing was published.
    Store(String),
}

impl Refused {
    /// The metric label.
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Refused::Owned => "owned",
            Refused::Held { .. } => "held",
            Refused::TooMany(_) => "too_many",
            Refused::Store(_) => "store_error",
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Owned => f.write_str("the name belongs to another key"),
            Refused::Held { since } => write!(
                f,
                "another session of this key serves the name and port (since {})",
                humantime::format_rfc3339_seconds(*since)
            ),
            Refused::TooMany(n) => write!(
                f,
                "this key holds {n} names already (tunnels.max_per_identity)"
            ),
            Refused::Store(e) => write!(f, "cannot record the name's owner: {e}"),
        }
    }
}

/// Where a visitor for a name and port goes: the session that publishes it.
#[derive(Clone)]
pub(crate) struct Published {
    pub(crate) handle: Handle,
    /// How the publisher asked for it, and so which channel reaches it.
    pub(crate) via: Via,
    /// The publishing session (pooled HTTP channels belong to one session).
    pub(crate) session: u64,
    /// What went through it.
    pub(crate) traffic: Arc<Traffic>,
}

/// Visits and bytes of one published tunnel (a name and port, for one session).
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    visits: AtomicU64,
    to_publisher: AtomicU64,
    to_visitors: AtomicU64,
}

impl Traffic {
    /// Counts `visits` (requests, or relayed connections) and bytes each way.
    pub(crate) fn add(&self, visits: u64, to_publisher: u64, to_visitors: u64) {
        self.visits.fetch_add(visits, Relaxed);
        self.to_publisher.fetch_add(to_publisher, Relaxed);
        self.to_visitors.fetch_add(to_visitors, Relaxed);
    }
}

/// One live tunnel, as `sluice tunnels` lists it (the admin endpoint's `/tunnels`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LiveTunnel {
    /// The name.
    pub name: String,
    /// The port published on it (80: HTTPS visitors; 443: passed through).
    pub port: u16,
    /// The identity that owns it (a key fingerprint, or `cert CA KEY-ID USER`).
    pub owner: String,
    /// When this session published it (RFC 3339, UTC).
    pub since: String,
    /// `tcp` (`-R NAME:PORT`) or `socket` (`-R /NAME`).
    pub via: String,
    /// Requests (HTTPS) and relayed connections (`-W/-J/-L`, passthrough) since then.
    pub visits: u64,
    /// Bytes from visitors to the publisher.
    pub bytes_to_publisher: u64,
    /// Bytes from the publisher to visitors.
    pub bytes_to_visitors: u64,
    /// The publishing session (as in `GET /v1/sessions`).
    #[serde(default)]
    pub session: u64,
}

/// How a tunnel was published.
#[derive(Clone, Debug)]
pub(crate) enum Via {
    /// `-R NAME:PORT:...`: `tcpip-forward` with this bind address, reached by `forwarded-tcpip`.
    Tcp(String),
    /// `-R /NAME:...`: `streamlocal-forward` of this socket path, reached by
    /// `forwarded-streamlocal` (published on port 80, as Preevy's clients use it).
    Socket(String),
}

/// What a registry entry says about its traffic, for [`Registry::list`].
pub(crate) trait AsTraffic {
    /// How it was published (`tcp`, `socket`) and its counters.
    fn traffic(&self) -> (&'static str, &Traffic);
}

impl AsTraffic for Published {
    fn traffic(&self) -> (&'static str, &Traffic) {
        let via = match self.via {
            Via::Tcp(_) => "tcp",
            Via::Socket(_) => "socket",
        };
        (via, &self.traffic)
    }
}

impl Published {
    /// Opens a channel to the publisher for a visitor from `from` to `port`.
    pub(crate) async fn open(
        &self,
        port: u16,
        from: std::net::SocketAddr,
    ) -> Result<russh::Channel<russh::server::Msg>, russh::Error> {
        match &self.via {
            Via::Tcp(address) => {
                self.handle
                    .channel_open_forwarded_tcpip(
                        address.clone(),
                        u32::from(port),
                        from.ip().to_string(),
                        u32::from(from.port()),
                    )
                    .await
            }
            Via::Socket(path) => {
                self.handle
                    .channel_open_forwarded_streamlocal(path.clone())
                    .await
            }
        }
    }
}

struct Name<T> {
    owner: String,
    /// Port -> the session serving it.
    live: HashMap<u16, Live<T>>,
}

struct Live<T> {
    session: u64,
    since: SystemTime,
    to: T,
}

/// All names, shared by every SSH session (and kept across reloads). `T` is where a
/// visitor goes ([`Published`]; the unit tests use a number).
pub(crate) struct Registry<T = Published> {
    /// Names known in this process (published since start), with their owners.
    names: Mutex<HashMap<String, Name<T>>>,
    /// Where owners are kept across restarts; without it, for the life of the process.
    store: Option<Arc<Store>>,
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Registry::new(None)
    }
}

impl<T> Registry<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Name<T>>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new(store: Option<Arc<Store>>) -> Self {
        Registry {
            names: Mutex::new(HashMap::new()),
            store,
        }
    }

    /// A registry that keeps owners in `store`, with every owner it holds loaded now: after
    /// this the store is written (new names), never read, so visitors cost no query.
    pub(crate) fn open(store: Arc<Store>) -> Result<Self, StoreError> {
        let owners = store.names()?;
        let r = Registry::new(Some(store));
        r.lock().extend(owners.into_iter().map(|(name, owner)| {
            (
                name,
                Name {
                    owner,
                    live: HashMap::new(),
                },
            )
        }));
        Ok(r)
    }
}

impl<T: Clone> Registry<T> {
    /// Publishes `name:port` for `owner`'s `session`.
    pub(crate) fn publish(
        &self,
        name: &str,
        port: u16,
        owner: &str,
        session: u64,
        to: T,
        max_per_identity: u32,
    ) -> Result<(), Refused> {
        let mut names = self.lock();
        match names.get(name) {
            // Remembered as another's, and not live: the store may have freed it since (an
            // access grant's name is released when the grant ends). The store decides.
            Some(n) if n.owner != owner && n.live.is_empty() && self.store.is_some() => {
                match self.store.as_ref().map(|s| s.claim_name(name, owner)) {
                    Some(Ok(Claim::New | Claim::Ours)) => {
                        names.remove(name);
                    }
                    Some(Err(e)) => return Err(Refused::Store(e.to_string())),
                    Some(Ok(Claim::Other(_))) | None => return Err(Refused::Owned),
                }
            }
            Some(n) if n.owner != owner => return Err(Refused::Owned),
            Some(n) => {
                if let Some(l) = n.live.get(&port).filter(|l| l.session != session) {
                    return Err(Refused::Held { since: l.since });
                }
            }
            None => {
                let held = names.values().filter(|n| n.owner == owner).count();
                if held >= max_per_identity as usize {
                    return Err(Refused::TooMany(max_per_identity));
                }
                // Recorded before it is served; the claim is atomic in the store, which is
                // what decides once several processes share one.
                match self.store.as_ref().map(|s| s.claim_name(name, owner)) {
                    Some(Ok(Claim::Other(_))) => return Err(Refused::Owned),
                    Some(Err(e)) => return Err(Refused::Store(e.to_string())),
                    Some(Ok(Claim::New | Claim::Ours)) | None => {}
                }
            }
        }
        let entry = names.entry(name.to_string()).or_insert_with(|| Name {
            owner: owner.to_string(),
            live: HashMap::new(),
        });
        let previous = entry.live.insert(
            port,
            Live {
                session,
                since: SystemTime::now(),
                to,
            },
        );
        if previous.is_none() {
            crate::metrics::get().tunnels_published.inc();
        }
        Ok(())
    }

    /// Stops serving `name:port` from `session` (the name stays its owner's).
    pub(crate) fn unpublish(&self, name: &str, port: u16, session: u64) -> bool {
        let mut names = self.lock();
        let Some(n) = names.get_mut(name) else {
            return false;
        };
        let ours = n.live.get(&port).is_some_and(|l| l.session == session);
        if ours {
            n.live.remove(&port);
            crate::metrics::get().tunnels_published.dec();
        }
        ours
    }

    /// Everything `session` served stops (it ended).
    pub(crate) fn end_session(&self, session: u64) {
        let mut ended = 0;
        for n in self.lock().values_mut() {
            let before = n.live.len();
            n.live.retain(|_, l| l.session != session);
            ended += before - n.live.len();
        }
        crate::metrics::get().tunnels_published.dec_by(ended as i64);
    }

    /// The session serving `name:port` now, if any.
    pub(crate) fn route(&self, name: &str, port: u16) -> Option<T> {
        self.lock()
            .get(name)
            .and_then(|n| n.live.get(&port))
            .map(|l| l.to.clone())
    }

    /// Every live tunnel, sorted by name and port.
    pub(crate) fn list(&self) -> Vec<LiveTunnel>
    where
        T: AsTraffic,
    {
        let mut v: Vec<LiveTunnel> = self
            .lock()
            .iter()
            .flat_map(|(name, n)| {
                n.live.iter().map(move |(port, l)| {
                    let (via, t) = l.to.traffic();
                    LiveTunnel {
                        name: name.clone(),
                        port: *port,
                        owner: n.owner.clone(),
                        since: humantime::format_rfc3339_seconds(l.since).to_string(),
                        via: via.to_string(),
                        visits: t.visits.load(Relaxed),
                        bytes_to_publisher: t.to_publisher.load(Relaxed),
                        bytes_to_visitors: t.to_visitors.load(Relaxed),
                        session: l.session,
                    }
                })
            })
            .collect();
        v.sort_by(|a, b| (&a.name, a.port).cmp(&(&b.name, b.port)));
        v
    }

    /// Whether any identity owns `name`.
    pub(crate) fn is_owned(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Names with live ports: (name, owner, ports).
    #[cfg(test)]
    fn live(&self) -> Vec<(String, String, BTreeSet<u16>)> {
        let mut v: Vec<_> = self
            .lock()
            .iter()
            .filter(|(_, n)| !n.live.is_empty())
            .map(|(k, n)| (k.clone(), n.owner.clone(), n.live.keys().copied().collect()))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl AsTraffic for u32 {
        fn traffic(&self) -> (&'static str, &Traffic) {
            static NONE: Traffic = Traffic {
                visits: AtomicU64::new(0),
                to_publisher: AtomicU64::new(0),
                to_visitors: AtomicU64::new(0),
            };
            ("tcp", &NONE)
        }
    }

    #[test]
    fn names_belong_to_their_first_publisher() {
        let r: Registry<u32> = Registry::default();
        r.publish("myapp", 80, "alice", 1, 10, 16).unwrap();
        assert_eq!(r.route("myapp", 80), Some(10));
        assert_eq!(r.route("myapp", 443), None, "port by port");
        assert_eq!(
            r.publish("myapp", 80, "bob", 2, 20, 16),
            Err(Refused::Owned)
        );
        assert_eq!(
            r.publish("myapp", 22, "bob", 2, 20, 16),
            Err(Refused::Owned)
        );
        // The same session adds a port; the same key in another session cannot take a live one.
        r.publish("myapp", 22, "alice", 1, 11, 16).unwrap();
        let listed: Vec<(String, u16, String)> = r
            .list()
            .into_iter()
            .map(|t| (t.name, t.port, t.owner))
            .collect();
        assert_eq!(
            listed,
            vec![
                ("myapp".into(), 22, "alice".into()),
                ("myapp".into(), 80, "alice".into())
            ]
        );
        assert!(matches!(
            r.publish("myapp", 80, "alice", 3, 30, 16),
            Err(Refused::Held { .. })
        ));
        assert_eq!(
            r.live(),
            vec![("myapp".into(), "alice".into(), [22, 80].into())]
        );
        // The session ends: visitors find nothing, the name stays alice's.
        r.end_session(1);
        assert_eq!(r.route("myapp", 80), None);
        assert!(r.is_owned("myapp"));
        assert_eq!(
            r.publish("myapp", 80, "bob", 2, 20, 16),
            Err(Refused::Owned)
        );
        r.publish("myapp", 80, "alice", 3, 30, 16).unwrap();
        assert_eq!(r.route("myapp", 80), Some(30));
        assert!(!r.unpublish("myapp", 80, 1), "not the serving session");
        assert!(r.unpublish("myapp", 80, 3));
        assert_eq!(r.route("myapp", 80), None);
    }

    #[test]
    fn with_a_store_owners_outlive_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let store = || Arc::new(Store::open(dir.path()).unwrap());
        let r: Registry<u32> = Registry::open(store()).unwrap();
        r.publish("myapp", 80, "alice", 1, 10, 2).unwrap();
        r.publish("b", 80, "alice", 1, 10, 2).unwrap();
        drop(r);
        // A restart: bob still cannot take it, alice gets it back, and her limit counts it.
        let r: Registry<u32> = Registry::open(store()).unwrap();
        assert!(r.is_owned("myapp"));
        assert!(!r.is_owned("free"));
        assert_eq!(r.publish("myapp", 80, "bob", 2, 20, 2), Err(Refused::Owned));
        assert_eq!(
            r.publish("c", 80, "alice", 3, 30, 2),
            Err(Refused::TooMany(2))
        );
        assert!(!r.is_owned("c"), "a refused claim is given back");
        r.publish("myapp", 80, "alice", 3, 30, 2).unwrap();
        assert_eq!(r.route("myapp", 80), Some(30));
    }

    #[test]
    fn names_per_identity_are_bounded() {
        let r: Registry<u32> = Registry::default();
        r.publish("a", 80, "alice", 1, 0, 2).unwrap();
        r.publish("b", 80, "alice", 1, 0, 2).unwrap();
        assert_eq!(
            r.publish("c", 80, "alice", 1, 0, 2),
            Err(Refused::TooMany(2))
        );
        // More ports on a name it holds are not more names.
        r.publish("a", 443, "alice", 1, 0, 2).unwrap();
        r.publish("c", 80, "bob", 2, 0, 2).unwrap();
    }
}
