//! Per-source penalties for failed logins, after OpenSSH's `PerSourcePenalties`.
//!
//! Each connection that ends without authenticating, after a rejected attempt, adds
//! [`AUTHFAIL`] to its source's penalty, up to [`MAX`]; a penalty runs down by itself, one
//! second per second. What a penalty does differs from OpenSSH's on purpose: sshd refuses
//! every new connection from a penalised source, which locks out the valid keys behind the same
//! address (CGNAT, an office, a balancer that is not trusted). Here nothing is refused. While a
//! source's penalty is at least [`MIN`], each rejected attempt from it is answered late
//! ([`delay_for`]: longer as the penalty grows, at most [`MAX_DELAY`]); an attempt that
//! succeeds is never delayed, so a key that verifies gets in at once however penalised its
//! address. Sources are IPv4 addresses and IPv6 /64s (a host usually holds a whole /64), as
//! OpenSSH's `PerSourceNetBlockSize` would group them with `32:64`; `[ssh] penalty_exempt`
//! lists sources that are never penalised.
//!
//! The table is bounded ([`SOURCES`]) and every operation is O(1): a least-recently-penalised
//! list in a slab, so a full table takes a new source by reusing its oldest entry, without a
//! sweep. Pure: the caller passes the time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::net::{unmap, Cidr};

/// Added to a source's penalty by each failed connection (OpenSSH: `authfail:5s`).
pub const AUTHFAIL: Duration = Duration::from_secs(5);

/// A penalty below this slows nothing (OpenSSH: `min:15s`): a few failures, such as an agent
/// offering other keys first, cost nothing.
pub const MIN: Duration = Duration::from_secs(15);

/// The most a penalty can stand at (OpenSSH: `max:600s`).
pub const MAX: Duration = Duration::from_secs(600);

/// The longest one rejected attempt is held: well inside the default `auth_timeout` (30 s),
/// so a penalised client still hears why it failed.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// Sources tracked at once (OpenSSH: `max-sources4:65536`).
pub const SOURCES: usize = 65_536;

/// How long a rejected attempt from a source with `penalty` is held before its answer: none
/// below [`MIN`], then a tenth of the penalty (1.5 s at 15 s, 6 s at 60 s), at most
/// [`MAX_DELAY`].
pub fn delay_for(penalty: Duration) -> Duration {
    if penalty < MIN {
        Duration::ZERO
    } else {
        (penalty / 10).min(MAX_DELAY)
    }
}

/// A client address as penalties count it: IPv4 per address, IPv6 per /64 (v4-mapped v6
/// addresses count as IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// The source `ip` belongs to.
    pub fn of(ip: IpAddr) -> Source {
        match unmap(ip) {
            IpAddr::V6(v6) => Source(IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into())),
            v4 => Source(v4),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

/// The penalties of every source, shared by all connections (and kept across reloads).
pub struct Penalties {
    table: Mutex<Lru>,
}

impl Penalties {
    /// An empty table for at most `capacity` sources.
    pub fn new(capacity: usize) -> Penalties {
        Penalties {
            table: Mutex::new(Lru::new(capacity.max(1))),
        }
    }

    /// A failed connection from `ip`: adds [`AUTHFAIL`] to its source's penalty. Returns the
    /// penalty now, or `None` if `ip` is in `exempt`.
    pub fn record(&self, ip: IpAddr, exempt: &[Cidr], now: Instant) -> Option<Duration> {
        if exempt.iter().any(|c| c.contains(ip)) {
            return None;
        }
        Some(self.lock().add(Source::of(ip), AUTHFAIL, now))
    }

    /// `ip`'s source's penalty now (zero for an exempt or unknown source).
    pub fn penalty(&self, ip: IpAddr, exempt: &[Cidr], now: Instant) -> Duration {
        if exempt.iter().any(|c| c.contains(ip)) {
            return Duration::ZERO;
        }
        self.lock().get(Source::of(ip), now)
    }

    /// Sources in the table (some perhaps with a penalty run down to zero).
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// "No node".
const NIL: u32 = u32::MAX;

/// One source's penalty, linked into the recency list.
struct Node {
    source: Source,
    /// When the penalty has run down to zero.
    until: Instant,
    /// Towards the most recently penalised end.
    newer: u32,
    /// Towards the least recently penalised end.
    older: u32,
}

/// Sources by recency of their last penalty, in a slab: the map finds a node, the list orders
/// them, and a full table reuses the oldest node for a new source. Every operation touches a
/// fixed number of nodes.
struct Lru {
    map: HashMap<Source, u32>,
    nodes: Vec<Node>,
    /// Most recently penalised.
    newest: u32,
    /// Least recently penalised: evicted first.
    oldest: u32,
    capacity: usize,
    /// Nodes read or written by the last operation (for the O(1) test).
    #[cfg(test)]
    touched: usize,
}

impl Lru {
    fn new(capacity: usize) -> Lru {
        Lru {
            map: HashMap::new(),
            nodes: Vec::new(),
            newest: NIL,
            oldest: NIL,
            capacity,
            #[cfg(test)]
            touched: 0,
        }
    }

    fn node(&mut self, i: u32) -> &mut Node {
        #[cfg(test)]
        {
            self.touched += 1;
        }
        &mut self.nodes[i as usize]
    }

    fn get(&mut self, source: Source, now: Instant) -> Duration {
        #[cfg(test)]
        {
            self.touched = 0;
        }
        match self.map.get(&source) {
            Some(&i) => self.node(i).until.saturating_duration_since(now),
            None => Duration::ZERO,
        }
    }

    /// Adds `add` to `source`'s penalty (what is left of it, at most [`MAX`]); returns it.
    fn add(&mut self, source: Source, add: Duration, now: Instant) -> Duration {
        #[cfg(test)]
        {
            self.touched = 0;
        }
        let i = match self.map.get(&source) {
            Some(&i) => {
                self.unlink(i);
                i
            }
            None if self.nodes.len() < self.capacity => {
                self.nodes.push(Node {
                    source,
                    until: now,
                    newer: NIL,
                    older: NIL,
                });
                (self.nodes.len() - 1) as u32
            }
            None => {
                // Full: the least recently penalised source gives up its node.
                let i = self.oldest;
                self.unlink(i);
                let old = std::mem::replace(&mut self.node(i).source, source);
                self.map.remove(&old);
                self.node(i).until = now;
                i
            }
        };
        self.map.insert(source, i);
        let node = self.node(i);
        let left = node.until.saturating_duration_since(now);
        let penalty = (left + add).min(MAX);
        node.until = now + penalty;
        self.push_newest(i);
        penalty
    }

    fn unlink(&mut self, i: u32) {
        let (newer, older) = {
            let n = self.node(i);
            (n.newer, n.older)
        };
        if newer == NIL {
            self.newest = older;
        } else {
            self.node(newer).older = older;
        }
        if older == NIL {
            self.oldest = newer;
        } else {
            self.node(older).newer = newer;
        }
    }

    fn push_newest(&mut self, i: u32) {
        let was = self.newest;
        {
            let n = self.node(i);
            n.newer = NIL;
            n.older = was;
        }
        if was == NIL {
            self.oldest = i;
        } else {
            self.node(was).newer = i;
        }
        self.newest = i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn each_failure_adds_and_the_penalty_runs_down() {
        let p = Penalties::new(16);
        let t = Instant::now();
        let a = ip("192.0.2.7");
        assert_eq!(p.penalty(a, &[], t), Duration::ZERO);
        assert_eq!(p.record(a, &[], t), Some(secs(5)));
        assert_eq!(p.record(a, &[], t), Some(secs(10)));
        assert_eq!(p.record(a, &[], t), Some(secs(15)));
        // One second per second...
        assert_eq!(p.penalty(a, &[], t + secs(4)), secs(11));
        // ...and a failure adds to what is left.
        assert_eq!(p.record(a, &[], t + secs(4)), Some(secs(16)));
        // Down to nothing, then from nothing again.
        assert_eq!(p.penalty(a, &[], t + secs(30)), Duration::ZERO);
        assert_eq!(p.record(a, &[], t + secs(30)), Some(secs(5)));
        // Other sources are their own.
        assert_eq!(p.penalty(ip("192.0.2.8"), &[], t), Duration::ZERO);
    }

    #[test]
    fn the_penalty_is_capped() {
        let p = Penalties::new(16);
        let t = Instant::now();
        let a = ip("192.0.2.7");
        for _ in 0..1000 {
            p.record(a, &[], t);
        }
        assert_eq!(p.penalty(a, &[], t), MAX);
        assert_eq!(p.record(a, &[], t), Some(MAX));
        assert_eq!(p.penalty(a, &[], t + MAX), Duration::ZERO);
    }

    #[test]
    fn delays_grow_with_the_penalty_then_stop_growing() {
        assert_eq!(delay_for(Duration::ZERO), Duration::ZERO);
        assert_eq!(delay_for(secs(14)), Duration::ZERO, "below MIN: no delay");
        assert_eq!(delay_for(MIN), Duration::from_millis(1500));
        assert_eq!(delay_for(secs(60)), secs(6));
        assert_eq!(delay_for(secs(100)), MAX_DELAY);
        assert_eq!(delay_for(MAX), MAX_DELAY);
        let mut last = Duration::ZERO;
        for s in 0..=600 {
            let d = delay_for(secs(s));
            assert!(d >= last, "the delay never shrinks as the penalty grows");
            last = d;
        }
    }

    #[test]
    fn sources_are_v4_addresses_and_v6_64s() {
        let p = Penalties::new(16);
        let t = Instant::now();
        p.record(ip("2001:db8:1:2::1"), &[], t);
        assert_eq!(p.penalty(ip("2001:db8:1:2:ffff::9"), &[], t), AUTHFAIL);
        assert_eq!(p.penalty(ip("2001:db8:1:3::1"), &[], t), Duration::ZERO);
        p.record(ip("::ffff:198.51.100.4"), &[], t);
        assert_eq!(p.penalty(ip("198.51.100.4"), &[], t), AUTHFAIL);
        assert_eq!(p.penalty(ip("198.51.100.5"), &[], t), Duration::ZERO);
        assert_eq!(
            Source::of(ip("2001:db8:1:2::1")).to_string(),
            "2001:db8:1:2::/64"
        );
        assert_eq!(Source::of(ip("::ffff:127.0.0.1")).to_string(), "127.0.0.1");
    }

    #[test]
    fn exempt_sources_are_never_penalised() {
        let p = Penalties::new(16);
        let t = Instant::now();
        let exempt = [Cidr::parse("10.0.0.0/8").unwrap()];
        for _ in 0..10 {
            assert_eq!(p.record(ip("10.1.2.3"), &exempt, t), None);
        }
        assert_eq!(p.penalty(ip("10.1.2.3"), &exempt, t), Duration::ZERO);
        assert!(p.is_empty(), "exempt sources take no room");
        assert_eq!(p.record(ip("11.1.2.3"), &exempt, t), Some(AUTHFAIL));
    }

    #[test]
    fn a_full_table_gives_the_oldest_entry_to_a_new_source() {
        let p = Penalties::new(3);
        let t = Instant::now();
        let (a, b, c, d) = (
            ip("192.0.2.1"),
            ip("192.0.2.2"),
            ip("192.0.2.3"),
            ip("192.0.2.4"),
        );
        p.record(a, &[], t);
        p.record(b, &[], t);
        p.record(c, &[], t);
        // a penalised again: now b is the least recently penalised.
        p.record(a, &[], t);
        p.record(d, &[], t);
        assert_eq!(p.len(), 3);
        assert_eq!(p.penalty(b, &[], t), Duration::ZERO, "b made room");
        assert_eq!(p.penalty(a, &[], t), secs(10));
        assert_eq!(p.penalty(c, &[], t), secs(5));
        assert_eq!(p.penalty(d, &[], t), secs(5));
        // And on in order: c, then a.
        p.record(b, &[], t);
        assert_eq!(p.penalty(c, &[], t), Duration::ZERO);
        p.record(ip("192.0.2.5"), &[], t);
        assert_eq!(p.penalty(a, &[], t), Duration::ZERO);
        assert_eq!(p.penalty(d, &[], t), secs(5));
        assert_eq!(p.penalty(b, &[], t), secs(5));
    }

    #[test]
    fn a_full_table_takes_new_sources_without_a_sweep() {
        let p = Penalties::new(SOURCES);
        let t = Instant::now();
        let addr = |n: u32| IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n));
        for n in 0..SOURCES as u32 {
            p.record(addr(n), &[], t);
        }
        assert_eq!(p.len(), SOURCES);
        // New sources at capacity: each evicts one entry and touches a fixed few nodes,
        // however full the table (the old failure log swept all 65,536 under its lock).
        for n in 0..1000 {
            let new = addr(SOURCES as u32 + n);
            assert_eq!(p.record(new, &[], t + secs(1)), Some(AUTHFAIL));
            let touched = p.lock().touched;
            assert!(touched <= 8, "{touched} nodes touched for one new source");
            assert_eq!(p.len(), SOURCES);
        }
        // The oldest went first, the newest stayed.
        assert_eq!(p.penalty(addr(999), &[], t), Duration::ZERO);
        assert_eq!(p.penalty(addr(1000), &[], t), AUTHFAIL);
        assert_eq!(p.penalty(addr(SOURCES as u32 - 1), &[], t), AUTHFAIL);
        // Penalising a known source, and reading one, are as cheap.
        p.record(addr(5000), &[], t + secs(1));
        assert!(p.lock().touched <= 8);
        p.penalty(addr(5001), &[], t);
        assert!(p.lock().touched <= 1);
    }
}
