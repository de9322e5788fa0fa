//! Per-client connection counts and a log throttle.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Counts connections per client (an IPv4 address, or an IPv6 /64: one host's usual share).
pub(super) struct PerClient {
    max: u32,
    map: Mutex<HashMap<IpAddr, u32>>,
}

impl PerClient {
    pub(super) fn new(max: u32) -> Self {
        PerClient {
            max,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            },
        }
    }

    /// Takes a slot for `ip`, or `None` if its client is at the limit.
    pub(super) fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let key = Self::key(ip);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            owner: self.clone(),
            key,
        })
    }
}

/// One connection's slot in a [`PerClient`] count; dropping it frees the slot.
pub(super) struct ClientSlot {
    owner: Arc<PerClient>,
    key: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut map = self.owner.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// Lets a burst of log lines through per second and counts the rest.
pub(super) struct Throttle {
    state: Mutex<(tokio::time::Instant, u32, u64)>,
}

const THROTTLE_PER_SECOND: u32 = 10;

impl Throttle {
    pub(super) fn new() -> Self {
        Throttle {
            state: Mutex::new((tokio::time::Instant::now(), 0, 0)),
        }
    }

    /// `Some(suppressed since the last line)` if this line may be logged.
    pub(super) fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = tokio::time::Instant::now();
        if now.duration_since(s.0) >= Duration::from_secs(1) {
            s.0 = now;
            s.1 = 0;
        }
        if s.1 < THROTTLE_PER_SECOND {
            s.1 += 1;
            let suppressed = std::mem::take(&mut s.2);
            Some(suppressed)
        } else {
            s.2 += 1;
            None
        }
    }
}
