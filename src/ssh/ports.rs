//! The TCP ports `-R` forwards listen on, and which session holds each: a client that
//! reconnects after a dead link asks for its port again while the server may not have noticed
//! the old session is gone. If the old session is the same identity's and does not answer a
//! keepalive, it is ended and the port is the new session's (as tunnel names are).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Who holds a port.
#[derive(Clone)]
pub(crate) struct Holder {
    /// The session id.
    pub(crate) session: u64,
    /// The identity that authenticated it (key fingerprint or certificate).
    pub(crate) identity: String,
    /// To ask it whether it is alive, and to end it.
    pub(crate) handle: russh::server::Handle,
}

/// Ports held by live sessions (shared across a reload).
#[derive(Default)]
pub(crate) struct Ports {
    held: Mutex<HashMap<u16, Holder>>,
}

/// One held port; dropping it (with the forward's task) forgets the holder.
pub(crate) struct Hold {
    ports: Arc<Ports>,
    port: u16,
    session: u64,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut held = self.ports.lock();
        if held
            .get(&self.port)
            .is_some_and(|h| h.session == self.session)
        {
            held.remove(&self.port);
        }
    }
}

impl Ports {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Holder>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `holder` listens on `port`.
    pub(crate) fn hold(self: &Arc<Self>, port: u16, holder: Holder) -> Hold {
        let session = holder.session;
        self.lock().insert(port, holder);
        Hold {
            ports: self.clone(),
            port,
            session,
        }
    }

    /// Who holds `port`, if a session does.
    pub(crate) fn holder(&self, port: u16) -> Option<Holder> {
        self.lock().get(&port).cloned()
    }
}
