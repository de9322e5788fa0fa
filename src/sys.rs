//! The few calls into libc that need `unsafe`, each small and commented: the open-files
//! limit, local time for `expiry-time`, and the kTLS probe.

#![allow(unsafe_code)]

use crate::ssh::policy::LocalOffset;

/// Lifts the soft open-files limit to the hard one: each relayed connection needs two.
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The system time zone (TZ, /etc/localtime), as OpenSSH uses for `expiry-time` without `Z`.
pub struct SystemTz;

impl LocalOffset for SystemTz {
    fn offset_secs(&self, naive: i64) -> i64 {
        let days = naive.div_euclid(86_400);
        let secs = naive.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        // SAFETY: `tm` is a plain C struct; zeroed is a valid value, and mktime only reads and
        // normalises the struct we own. tzset is called by mktime itself.
        let utc = unsafe {
            let mut tm: libc::tm = std::mem::zeroed();
            tm.tm_year = (y - 1900) as libc::c_int;
            tm.tm_mon = (m - 1) as libc::c_int;
            tm.tm_mday = d as libc::c_int;
            tm.tm_hour = (secs / 3600) as libc::c_int;
            tm.tm_min = (secs / 60 % 60) as libc::c_int;
            tm.tm_sec = (secs % 60) as libc::c_int;
            tm.tm_isdst = -1;
            libc::mktime(&mut tm)
        };
        if utc == -1 {
            0
        } else {
            naive - utc as i64
        }
    }
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Whether the kernel offers kTLS: sets the `tls` upper-layer protocol on a loopback TCP
/// socket, as a kTLS implementation would (which may autoload the module). `Err` says why not.
pub fn ktls_probe() -> Result<(), std::io::Error> {
    use std::os::fd::AsRawFd;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let _server = listener.accept()?;
    let name = b"tls";
    // SAFETY: a valid socket fd we own for the duration of the call, and a pointer/length pair
    // for a live byte array.
    let rc = unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Takes ownership of `fd`, a listening socket systemd passed to this process (socket
/// activation), after checking that it is one; the error says what it is instead.
pub fn adopt_tcp_listener(fd: std::os::fd::RawFd) -> Result<std::net::TcpListener, String> {
    use std::os::fd::FromRawFd;
    check_tcp_listener(fd)?;
    // SAFETY: systemd passed `fd` to this process (LISTEN_PID matched, checked by the caller's
    // sd_notify::listen_fds) and nothing else owns it; it is a listening TCP socket.
    Ok(unsafe { std::net::TcpListener::from_raw_fd(fd) })
}

/// Whether `fd` is a listening TCP (IPv4 or IPv6) stream socket; the error says what it is.
fn check_tcp_listener(fd: std::os::fd::RawFd) -> Result<(), String> {
    let get = |level: libc::c_int, opt: libc::c_int| -> Result<libc::c_int, String> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`, which we own; a bad fd
        // only makes it fail.
        let r = unsafe {
            libc::getsockopt(
                fd,
                level,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r == 0 {
            Ok(v)
        } else {
            Err(std::io::Error::last_os_error().to_string())
        }
    };
    let domain = get(libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return Err(format!("address family {domain}, not IPv4/IPv6"));
    }
    if get(libc::SOL_SOCKET, libc::SO_TYPE)? != libc::SOCK_STREAM {
        return Err("not a stream socket".into());
    }
    if get(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? == 0 {
        return Err("not listening".into());
    }
    Ok(())
}

/// The host name, from uname(2).
pub fn hostname() -> Option<String> {
    // SAFETY: `utsname` is a plain C struct; zeroed is valid, and uname only writes into it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = u
        .nodename
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8(bytes).ok()
}

/// An inotify instance that reports entries created, replaced, written or removed in the
/// directories it watches (certificate renewals swap files and symlinks there).
pub struct DirWatch {
    fd: std::os::fd::OwnedFd,
}

impl DirWatch {
    /// A new, non-blocking inotify instance.
    pub fn new() -> std::io::Result<DirWatch> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscall; the returned descriptor is checked and then owned.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by inotify_init1 and nothing else owns it.
        Ok(DirWatch {
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches `dir` (adding it twice is harmless).
    pub fn add(&self, dir: &std::path::Path) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_ATTRIB;
        // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), path.as_ptr(), mask) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads and discards the pending events; whether there were any.
    pub fn drain(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 4096];
        let mut any = false;
        loop {
            // SAFETY: reads at most `buf.len()` bytes into `buf`, which we own.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return any;
            }
            any = true;
        }
    }
}

impl DirWatch {
    /// A new watch registered with the current tokio runtime.
    pub fn new_async() -> std::io::Result<tokio::io::unix::AsyncFd<DirWatch>> {
        let w = DirWatch::new()?;
        // SAFETY: the descriptor is owned by the DirWatch that the AsyncFd owns, so it stays
        // open for as long as it is registered.
        unsafe { tokio::io::unix::AsyncFd::register(w) }.map_err(std::io::Error::from)
    }
}

impl std::os::fd::AsRawFd for DirWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_780), (2026, 11, 23));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
