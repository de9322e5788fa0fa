//! systemd integration: listening sockets passed by socket activation, and sd_notify state
//! messages (READY, RELOADING, STOPPING, WATCHDOG). Every call is a no-op outside systemd.

use std::io;
use std::os::fd::RawFd;

use tracing::warn;

/// Why inherited sockets cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_FDS`/`LISTEN_PID` are malformed.
    #[error("socket activation: {0}")]
    Env(io::Error),
    /// A passed descriptor is not a listening TCP socket.
    #[error("socket activation: descriptor {fd} is not a listening TCP socket ({why}); sluice.socket needs ListenStream=")]
    NotTcpListener {
        /// The descriptor.
        fd: RawFd,
        /// What it is instead.
        why: String,
    },
}

/// The listening sockets systemd passed (`LISTEN_FDS` for this PID), non-blocking and ready for
/// tokio; empty when not socket-activated.
pub(crate) fn inherited_listeners() -> Result<Vec<std::net::TcpListener>, ActivationError> {
    // The environment stays (unsetting it is unsound once threads run): adopt the descriptors
    // once per process, or a second server would own them twice.
    static ADOPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if ADOPTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    adopt_all()
}

#[cfg(target_os = "linux")]
fn adopt_all() -> Result<Vec<std::net::TcpListener>, ActivationError> {
    let fds: Vec<RawFd> = sd_notify::listen_fds()
        .map_err(ActivationError::Env)?
        .collect();
    let mut out = Vec::with_capacity(fds.len());
    for fd in fds {
        // SAFETY: LISTEN_PID named this process (checked by sd_notify::listen_fds), nothing
        // else in it touches these descriptors, and ADOPTED makes this run once per process.
        #[allow(unsafe_code)]
        let l = unsafe { crate::sys::adopt_tcp_listener(fd) }
            .map_err(|why| ActivationError::NotTcpListener { fd, why })?;
        // Inherited sockets are blocking; tokio needs O_NONBLOCK.
        l.set_nonblocking(true)
            .map_err(|e| ActivationError::NotTcpListener {
                fd,
                why: e.to_string(),
            })?;
        out.push(l);
    }
    Ok(out)
}

/// Socket activation is systemd's, on Linux.
#[cfg(not(target_os = "linux"))]
fn adopt_all() -> Result<Vec<std::net::TcpListener>, ActivationError> {
    Ok(Vec::new())
}

fn send(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "sd_notify failed");
    }
}

/// Config, certificates, keys and listeners are ready.
pub fn ready() {
    send(&[sd_notify::NotifyState::Ready]);
}

/// A reload starts (systemd then waits for [`ready`] again).
pub(crate) fn reloading() {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[sd_notify::NotifyState::Reloading, now]),
        Err(_) => send(&[sd_notify::NotifyState::Reloading]),
    }
}

/// Shutdown starts.
pub fn stopping() {
    send(&[sd_notify::NotifyState::Stopping]);
}

/// A one-line status shown by `systemctl status`.
pub fn status(text: &str) {
    send(&[sd_notify::NotifyState::Status(text)]);
}

/// If the unit sets `WatchdogSec=`, pings systemd at half the interval while `liveness` holds:
/// a stalled runtime stops the pings and systemd restarts the service.
pub fn spawn_watchdog(liveness: crate::admin::Liveness) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval / 2);
        loop {
            tick.tick().await;
            if liveness.is_live() {
                send(&[sd_notify::NotifyState::Watchdog]);
            } else {
                warn!("a worker runtime is stuck: not pinging the systemd watchdog");
            }
        }
    });
}
