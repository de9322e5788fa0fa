//! Operating-system calls: the open-files limit, the kTLS probe, the host name, adopting
//! sockets systemd passed, and an inotify directory watch. Everything goes through rustix
//! except two things that cannot be
//! safe: adopting an inherited descriptor ([`adopt_tcp_listener`] says what its caller must
//! uphold) and registering the inotify descriptor with tokio.

#![allow(unsafe_code)]

use std::os::fd::OwnedFd;
#[cfg(target_os = "linux")]
use std::os::fd::{AsFd, FromRawFd, RawFd};

/// Lifts the soft open-files limit to the hard one: each relayed connection needs two.
pub(crate) fn raise_nofile_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
    }
}

/// Whether the kernel offers kTLS: the `tls` upper-layer protocol is listed in
/// /proc/sys/net/ipv4/tcp_available_ulp (once the module is loaded). `Err` says why not.
pub(crate) fn ktls_probe() -> Result<(), std::io::Error> {
    let path = "/proc/sys/net/ipv4/tcp_available_ulp";
    let ulps = std::fs::read_to_string(path)?;
    if ulps.split_whitespace().any(|u| u == "tls") {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "{path} lists {:?}, no \"tls\" (modprobe tls?)",
            ulps.trim()
        )))
    }
}

#[cfg(target_os = "linux")]
/// Takes ownership of `fd`, a socket systemd passed to this process (socket activation), and
/// checks that it is a listening TCP socket; the error says what it is instead (and the
/// descriptor is then closed).
///
/// # Safety
///
/// `fd` must be open and owned by nobody else in this process, and must not be used through
/// its number afterwards: the returned listener (or the error path) closes it. systemd's
/// `LISTEN_FDS` descriptors for this PID satisfy this when each is adopted once per process.
pub(crate) unsafe fn adopt_tcp_listener(fd: RawFd) -> Result<std::net::TcpListener, String> {
    // SAFETY: the caller guarantees `fd` is open and ours alone.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    check_tcp_listener(owned.as_fd())?;
    Ok(std::net::TcpListener::from(owned))
}

/// Whether `fd` is a listening TCP (IPv4 or IPv6) stream socket; the error says what it is.
#[cfg(target_os = "linux")]
fn check_tcp_listener(fd: std::os::fd::BorrowedFd<'_>) -> Result<(), String> {
    use rustix::net::{sockopt, AddressFamily, SocketType};
    let domain = sockopt::socket_domain(fd).map_err(|e| e.to_string())?;
    if domain != AddressFamily::INET && domain != AddressFamily::INET6 {
        return Err(format!("address family {}, not IPv4/IPv6", domain.as_raw()));
    }
    if sockopt::socket_type(fd).map_err(|e| e.to_string())? != SocketType::STREAM {
        return Err("not a stream socket".into());
    }
    if !sockopt::socket_acceptconn(fd).map_err(|e| e.to_string())? {
        return Err("not listening".into());
    }
    Ok(())
}

/// The host name, from uname(2).
pub(crate) fn hostname() -> Option<String> {
    rustix::system::uname()
        .nodename()
        .to_str()
        .ok()
        .map(str::to_string)
}

/// An inotify instance that reports entries created, replaced, written or removed in the
/// directories it watches (certificate renewals swap files and symlinks there).
pub(crate) struct DirWatch {
    fd: OwnedFd,
}

impl DirWatch {
    /// A new, non-blocking inotify instance (Linux only: elsewhere an error, and the callers
    /// poll instead).
    #[cfg(target_os = "linux")]
    pub(crate) fn new() -> std::io::Result<DirWatch> {
        use rustix::fs::inotify::{init, CreateFlags};
        Ok(DirWatch {
            fd: init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC)?,
        })
    }

    /// inotify is Linux's.
    #[cfg(not(target_os = "linux"))]
    pub fn new() -> std::io::Result<DirWatch> {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }

    /// Watches `dir` (adding it twice is harmless).
    #[cfg(target_os = "linux")]
    pub(crate) fn add(&self, dir: &std::path::Path) -> std::io::Result<()> {
        use rustix::fs::inotify::{add_watch, WatchFlags};
        let mask = WatchFlags::CLOSE_WRITE
            | WatchFlags::MOVED_TO
            | WatchFlags::CREATE
            | WatchFlags::DELETE
            | WatchFlags::ATTRIB;
        add_watch(&self.fd, dir, mask)?;
        Ok(())
    }

    /// inotify is Linux's.
    #[cfg(not(target_os = "linux"))]
    pub fn add(&self, _dir: &std::path::Path) -> std::io::Result<()> {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }

    /// Reads and discards the pending events; whether there were any.
    pub(crate) fn drain(&self) -> bool {
        let mut buf = [0u8; 4096];
        let mut any = false;
        while let Ok(n) = rustix::io::read(&self.fd, &mut buf) {
            if n == 0 {
                break;
            }
            any = true;
        }
        any
    }

    /// A new watch registered with the current tokio runtime.
    pub(crate) fn new_async() -> std::io::Result<tokio::io::unix::AsyncFd<DirWatch>> {
        let w = DirWatch::new()?;
        // SAFETY: the descriptor is owned by the DirWatch that the AsyncFd owns, so it stays
        // open for as long as it is registered.
        unsafe { tokio::io::unix::AsyncFd::register(w) }.map_err(std::io::Error::from)
    }
}

impl std::os::fd::AsRawFd for DirWatch {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
