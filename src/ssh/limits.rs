//! Per-connection channel limits: a count with a maximum, and a slot that gives its place
//! back when dropped (a forward's relay ends, a session channel closes).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Open channels of one connection, with the limit.
pub(crate) struct ChannelCount {
    open: AtomicU32,
    max: u32,
}

impl ChannelCount {
    /// At most `max` channels open at once.
    pub(crate) fn new(max: u32) -> Arc<ChannelCount> {
        Arc::new(ChannelCount {
            open: AtomicU32::new(0),
            max,
        })
    }

    /// Takes a slot, or `None` at the limit.
    pub(crate) fn enter(self: &Arc<Self>) -> Option<ChannelSlot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| ChannelSlot(self.clone()))
    }
}

/// One open channel; dropping it frees the slot.
pub(crate) struct ChannelSlot(Arc<ChannelCount>);

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_come_back_when_dropped() {
        let c = ChannelCount::new(2);
        let a = c.enter().unwrap();
        let b = c.enter().unwrap();
        assert!(c.enter().is_none(), "a third over the limit of 2");
        drop(a);
        let again = c.enter();
        assert!(again.is_some());
        drop((b, again));
        assert_eq!(c.open.load(Ordering::Acquire), 0);
    }
}
