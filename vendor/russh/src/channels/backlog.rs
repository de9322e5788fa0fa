//! sluice patch: delivery to gated channels that never waits (server and client sessions).

use std::collections::HashMap;

use super::{ChannelMsg, ChannelRef};
use crate::ChannelId;

/// Hands `msg` to a gated channel without ever waiting: if its queue is full (or already
/// backed up), the message waits in the channel's backlog. The backlog holds at most one
/// window of data, since window is only granted for consumed data; the server caps requests
/// (`deliver_request`), EOF and CLOSE come once. What a closed channel cannot take is
/// discarded (data counted as read).
pub(crate) fn deliver(
    channels: &HashMap<ChannelId, ChannelRef>,
    backlog: &mut HashMap<ChannelId, Backlog>,
    id: ChannelId,
    msg: ChannelMsg,
) {
    let Some(chan) = channels.get(&id) else {
        return;
    };
    if let Some(b) = backlog.get_mut(&id) {
        if !b.sender.is_closed() {
            b.push(msg);
            return;
        }
        // Nobody reads it any more: what waited goes (see `Backlog::drop`).
        backlog.remove(&id);
    }
    match chan.try_send(msg) {
        Ok(()) => {}
        Err(tokio::sync::mpsc::error::TrySendError::Full(msg)) => {
            let mut b = Backlog {
                sender: (**chan).clone(),
                consumed: chan.consumed.clone(),
                queue: std::collections::VecDeque::new(),
                others: 0,
                logged: false,
            };
            b.push(msg);
            backlog.insert(id, b);
        }
        Err(tokio::sync::mpsc::error::TrySendError::Closed(msg)) => {
            discard(&chan.consumed, &msg);
        }
    }
}

/// Messages waiting for room in a gated channel's queue, in order. Consecutive
/// data is merged (up to 32 KiB a message), so many small packets cost little memory.
pub(crate) struct Backlog {
    sender: tokio::sync::mpsc::Sender<ChannelMsg>,
    consumed: std::sync::Arc<crate::channels::Consumed>,
    queue: std::collections::VecDeque<Pending>,
    /// Messages other than data waiting here. The server side caps what a peer can make
    /// wait (requests, EOF and CLOSE once); this is the floor for both sides.
    others: usize,
    logged: bool,
}

fn once(msg: &ChannelMsg) -> bool {
    matches!(
        msg,
        ChannelMsg::Eof
            | ChannelMsg::Close
            | ChannelMsg::Open { .. }
            | ChannelMsg::OpenFailure(_)
    )
}

/// Most messages other than data one backlog holds; past it they are dropped (logged once).
const MAX_BACKLOG_OTHERS: usize = 64;

enum Pending {
    Data(bytes::BytesMut),
    Ext(u32, bytes::BytesMut),
    Other(ChannelMsg),
}

const BACKLOG_MERGE: usize = 32 * 1024;

impl std::fmt::Debug for Backlog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backlog")
            .field("queued", &self.queue.len())
            .finish()
    }
}

/// A message nobody will read: its data counts as read (window and budget
/// come back), a request leaves the channel's request cap.
fn discard(consumed: &crate::channels::Consumed, msg: &ChannelMsg) {
    match msg {
        ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => {
            consumed.add(data.len())
        }
        other => {
            if let Some(cost) = crate::channels::request_cost(other) {
                consumed.unqueue_request(cost)
            }
        }
    }
}

impl Backlog {
    pub(crate) fn push(&mut self, msg: ChannelMsg) {
        match (self.queue.back_mut(), msg) {
            (Some(Pending::Data(b)), ChannelMsg::Data { data })
                if b.len() + data.len() <= BACKLOG_MERGE =>
            {
                b.extend_from_slice(&data)
            }
            (Some(Pending::Ext(e, b)), ChannelMsg::ExtendedData { ext, data })
                if *e == ext && b.len() + data.len() <= BACKLOG_MERGE =>
            {
                b.extend_from_slice(&data)
            }
            (_, ChannelMsg::Data { data }) => self
                .queue
                .push_back(Pending::Data(bytes::BytesMut::from(&data[..]))),
            (_, ChannelMsg::ExtendedData { ext, data }) => self
                .queue
                .push_back(Pending::Ext(ext, bytes::BytesMut::from(&data[..]))),
            // EOF, CLOSE and the open's answer come once each and are never dropped.
            (_, other) if self.others >= MAX_BACKLOG_OTHERS && !once(&other) => {
                if !std::mem::replace(&mut self.logged, true) {
                    log::warn!("{MAX_BACKLOG_OTHERS} channel messages wait unread; dropping more");
                }
                discard(&self.consumed, &other);
            }
            (_, other) => {
                self.others += 1;
                self.queue.push_back(Pending::Other(other))
            }
        }
    }

    /// Moves what fits into the channel's queue; `true` while something is left for a
    /// channel that is still read (what a closed one held is dropped with the backlog).
    pub(crate) fn drain(&mut self) -> bool {
        while let Some(p) = self.queue.pop_front() {
            let msg = match p {
                Pending::Data(b) => ChannelMsg::Data { data: b.freeze() },
                Pending::Ext(ext, b) => ChannelMsg::ExtendedData {
                    ext,
                    data: b.freeze(),
                },
                Pending::Other(m) => {
                    self.others -= 1;
                    m
                }
            };
            match self.sender.try_send(msg) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Full(msg)) => {
                    self.push_front(msg);
                    return true;
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(msg)) => {
                    self.push_front(msg);
                    return false;
                }
            }
        }
        false
    }

    fn push_front(&mut self, msg: ChannelMsg) {
        let p = match msg {
            ChannelMsg::Data { data } => Pending::Data(bytes::BytesMut::from(&data[..])),
            ChannelMsg::ExtendedData { ext, data } => {
                Pending::Ext(ext, bytes::BytesMut::from(&data[..]))
            }
            other => {
                self.others += 1;
                Pending::Other(other)
            }
        };
        self.queue.push_front(p);
    }
}

/// What a backlog still holds when it goes is never read: discarded.
impl Drop for Backlog {
    fn drop(&mut self) {
        for p in self.queue.drain(..) {
            match p {
                Pending::Data(b) | Pending::Ext(_, b) => self.consumed.add(b.len()),
                Pending::Other(m) => discard(&self.consumed, &m),
            }
        }
    }
}
