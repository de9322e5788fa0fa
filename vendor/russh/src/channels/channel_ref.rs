use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc::Sender;

use super::WindowSizeRef;
use crate::ChannelMsg;

/// A handle to the [`super::Channel`]'s to be able to transmit messages
/// to it and update it's `window_size`.
#[derive(Debug)]
pub struct ChannelRef {
    pub(super) sender: Sender<ChannelMsg>,
    pub(super) window_size: WindowSizeRef,
    /// sluice patch: bytes the application has read, so that the server grants window
    /// only for consumed data (per-channel flow control; no head-of-line blocking).
    pub(crate) consumed: Arc<Consumed>,
}

/// sluice patch: bytes read by the application from one channel, and who to wake.
#[derive(Debug, Default)]
pub struct Consumed {
    bytes: AtomicUsize,
    notify: OnceLock<Arc<tokio::sync::Notify>>,
}

impl Consumed {
    /// Records `n` bytes read by the application.
    pub(crate) fn add(&self, n: usize) {
        if n == 0 {
            return;
        }
        if self.bytes.fetch_add(n, Ordering::AcqRel) == 0 {
            if let Some(notify) = self.notify.get() {
                notify.notify_one();
            }
        }
    }

    /// Takes the bytes recorded so far.
    pub(crate) fn take(&self) -> usize {
        self.bytes.swap(0, Ordering::AcqRel)
    }

    /// Turns on consumption-gated windows for this channel, waking `notify` on reads.
    pub(crate) fn gate(&self, notify: &Arc<tokio::sync::Notify>) {
        let _ = self.notify.set(notify.clone());
    }

    /// Whether windows are granted on consumption for this channel.
    pub(crate) fn gated(&self) -> bool {
        self.notify.get().is_some()
    }
}

impl ChannelRef {
    pub fn new(sender: Sender<ChannelMsg>) -> Self {
        Self {
            sender,
            window_size: WindowSizeRef::new(0),
            consumed: Arc::default(),
        }
    }

    pub(crate) fn window_size(&self) -> &WindowSizeRef {
        &self.window_size
    }
}

impl std::ops::Deref for ChannelRef {
    type Target = Sender<ChannelMsg>;

    fn deref(&self) -> &Self::Target {
        &self.sender
    }
}
