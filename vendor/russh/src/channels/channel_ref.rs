use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc::Sender;

use super::WindowSizeRef;
use crate::{ChannelMsg, Sig};

/// A handle to the [`super::Channel`]'s to be able to transmit messages
/// to it and update it's `window_size`.
#[derive(Debug)]
pub struct ChannelRef {
    pub(super) sender: Sender<ChannelMsg>,
    pub(super) window_size: WindowSizeRef,
    /// sluice patch: bytes the application has read, so that the server grants window
    /// only for consumed data (per-channel flow control; no head-of-line blocking).
    pub(crate) consumed: Arc<Consumed>,
    /// sluice patch: the peer sent CHANNEL_EOF (a second one is dropped; data after it is
    /// a protocol violation).
    pub(crate) eof_received: bool,
    /// sluice patch: a dropped duplicate or a refused request was logged for this channel.
    pub(crate) logged: bool,
}

/// sluice patch: most channel requests (pty-req, env, exec, window-change, signal, ...) that
/// may wait unread in one channel's queue and backlog together; one more is refused.
pub(crate) const MAX_QUEUED_REQUESTS: usize = 32;
/// sluice patch: most bytes those waiting requests may hold together (see `request_cost`).
pub(crate) const MAX_QUEUED_REQUEST_BYTES: usize = 64 * 1024;

/// sluice patch: the process-wide window budget: bytes of window offered to peers on gated
/// channels plus bytes received on them that the application has not read yet. A peer can
/// make the daemon hold at most this much channel data, whatever the number of channels.
static BUDGET_USED: AtomicUsize = AtomicUsize::new(0);
/// sluice patch: sessions that have a channel waiting for budget (see `Starved`).
static STARVED: AtomicUsize = AtomicUsize::new(0);
/// sluice patch: woken when budget is given back while some session waits for it.
static BUDGET_FREED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// sluice patch: bytes of the process-wide window budget in use (all sessions).
pub fn window_budget_in_use() -> usize {
    BUDGET_USED.load(Ordering::Acquire)
}

/// sluice patch: what is left of a budget of `limit` bytes.
pub(crate) fn budget_left(limit: usize) -> usize {
    limit.saturating_sub(BUDGET_USED.load(Ordering::Acquire))
}

/// sluice patch: resolves once budget is given back (create it before checking the budget).
pub(crate) fn budget_freed() -> tokio::sync::futures::Notified<'static> {
    BUDGET_FREED.notified()
}

/// sluice patch: marks a session with a channel waiting for the window budget, so that
/// releases wake it. Cleared when it is dropped.
#[derive(Debug, Default)]
pub(crate) struct Starved(bool);

impl Starved {
    pub(crate) fn get(&self) -> bool {
        self.0
    }

    pub(crate) fn set(&mut self, on: bool) {
        if on != self.0 {
            self.0 = on;
            if on {
                STARVED.fetch_add(1, Ordering::AcqRel);
            } else {
                STARVED.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl Drop for Starved {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// sluice patch: what a channel request costs while it waits unread, or `None` for messages
/// that are not channel requests.
pub(crate) fn request_cost(msg: &ChannelMsg) -> Option<usize> {
    let payload = match msg {
        ChannelMsg::RequestPty {
            term,
            terminal_modes,
            ..
        } => term.len() + terminal_modes.len() * 8,
        ChannelMsg::RequestX11 {
            x11_authentication_protocol,
            x11_authentication_cookie,
            ..
        } => x11_authentication_protocol.len() + x11_authentication_cookie.len(),
        ChannelMsg::SetEnv {
            variable_name,
            variable_value,
            ..
        } => variable_name.len() + variable_value.len(),
        ChannelMsg::Exec { command, .. } => command.len(),
        ChannelMsg::RequestSubsystem { name, .. } => name.len(),
        ChannelMsg::Signal {
            signal: Sig::Custom(name),
        } => name.len(),
        ChannelMsg::RequestShell { .. }
        | ChannelMsg::AgentForward { .. }
        | ChannelMsg::WindowChange { .. }
        | ChannelMsg::Signal { .. } => 0,
        _ => return None,
    };
    Some(payload + 64)
}

/// sluice patch: bytes read by the application from one channel, and who to wake; what the
/// channel holds of the window budget; requests waiting unread.
#[derive(Debug, Default)]
pub struct Consumed {
    bytes: AtomicUsize,
    notify: OnceLock<Arc<tokio::sync::Notify>>,
    /// Bytes of the process-wide budget this channel holds: window offered to the peer and
    /// data received but not read. Given back as the application reads, and in full on drop.
    charged: AtomicUsize,
    requests: AtomicUsize,
    request_bytes: AtomicUsize,
    /// Client-side channels: gated, but not charged to the (server's) window budget.
    unbudgeted: std::sync::atomic::AtomicBool,
}

impl Consumed {
    /// Records `n` bytes read by the application (or discarded unread).
    pub(crate) fn add(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.release(n);
        if self.bytes.fetch_add(n, Ordering::AcqRel) == 0 {
            if let Some(notify) = self.notify.get() {
                notify.notify_one();
            }
        }
    }

    /// The application took `msg` out of the channel's queue: requests leave the cap.
    pub(crate) fn seen(&self, msg: &ChannelMsg) {
        if let Some(cost) = request_cost(msg) {
            if self.gated() {
                self.unqueue_request(cost);
                // Room in the queue: move the backlog on.
                if let Some(notify) = self.notify.get() {
                    notify.notify_one();
                }
            }
        }
    }

    /// Counts a request about to wait in the channel; `false` (and nothing counted) at the
    /// cap. Only the session adds, so checking first is enough.
    pub(crate) fn queue_request(&self, cost: usize) -> bool {
        if self.requests.load(Ordering::Acquire) >= MAX_QUEUED_REQUESTS
            || self.request_bytes.load(Ordering::Acquire) + cost > MAX_QUEUED_REQUEST_BYTES
        {
            return false;
        }
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.request_bytes.fetch_add(cost, Ordering::AcqRel);
        true
    }

    pub(crate) fn unqueue_request(&self, cost: usize) {
        let sub = |n: usize| Some(n.saturating_sub(cost));
        let _ = self
            .requests
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            });
        let _ = self
            .request_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, sub);
    }

    /// Takes up to `want` bytes of a process-wide budget of `limit` for this channel's
    /// window; returns what it got.
    pub(crate) fn try_charge(&self, want: usize, limit: usize) -> usize {
        if self.unbudgeted.load(Ordering::Acquire) {
            return want;
        }
        let mut got = 0;
        let _ = BUDGET_USED.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            got = want.min(limit.saturating_sub(used));
            (got > 0).then_some(used + got)
        });
        if got > 0 {
            self.charged.fetch_add(got, Ordering::AcqRel);
        }
        got
    }

    /// Gives `n` bytes of this channel's charge back to the budget.
    pub(crate) fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let prev = self
            .charged
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                Some(c.saturating_sub(n))
            })
            .unwrap_or(0);
        give_back(prev.min(n));
    }

    /// Takes the bytes recorded so far.
    pub(crate) fn take(&self) -> usize {
        self.bytes.swap(0, Ordering::AcqRel)
    }

    /// Turns on consumption-gated windows for this channel, waking `notify` on reads.
    pub(crate) fn gate(&self, notify: &Arc<tokio::sync::Notify>) {
        let _ = self.notify.set(notify.clone());
    }

    /// Turns on consumption-gated windows for a client-side channel, which the
    /// process-wide budget (the server's) does not count.
    pub(crate) fn gate_unbudgeted(&self, notify: &Arc<tokio::sync::Notify>) {
        self.unbudgeted.store(true, Ordering::Release);
        self.gate(notify);
    }

    /// Whether windows are granted on consumption for this channel.
    pub(crate) fn gated(&self) -> bool {
        self.notify.get().is_some()
    }
}

/// sluice patch: whatever a channel still holds goes back when nobody can read it any more.
impl Drop for Consumed {
    fn drop(&mut self) {
        give_back(*self.charged.get_mut());
    }
}

fn give_back(n: usize) {
    if n == 0 {
        return;
    }
    BUDGET_USED.fetch_sub(n, Ordering::AcqRel);
    if STARVED.load(Ordering::Acquire) > 0 {
        BUDGET_FREED.notify_waiters();
    }
}

impl ChannelRef {
    pub fn new(sender: Sender<ChannelMsg>) -> Self {
        Self {
            sender,
            window_size: WindowSizeRef::new(0),
            consumed: Arc::default(),
            eof_received: false,
            logged: false,
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
