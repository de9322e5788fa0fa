//! Where to connect: `HOST[:PORT]` targets and the TCP connect with one deadline.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use super::error::ConnectError;

/// Splits `HOST[:PORT]` (`[v6]:port` for IPv6), default port 443.
pub fn parse_target(s: &str) -> Result<(String, u16), ConnectError> {
    let bad = || ConnectError::Usage(format!("`{s}` is not HOST[:PORT]"));
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err(bad()),
        }
    } else if s.matches(':').count() == 1 {
        let (h, p) = s.split_once(':').ok_or_else(bad)?;
        (h, Some(p))
    } else {
        (s, None)
    };
    // A name or address only: nothing that could end a line in a proxy request or a log.
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:%".contains(&b))
    {
        return Err(bad());
    }
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?,
        None => 443,
    };
    Ok((host.to_string(), port))
}

pub(super) async fn connect_tcp(
    host: &str,
    port: u16,
    deadline: Instant,
) -> Result<TcpStream, ConnectError> {
    let target = format!("{host}:{port}");
    let host = host.trim_matches(|c| c == '[' || c == ']');
    let addrs: Vec<SocketAddr> =
        match timeout_at(deadline, tokio::net::lookup_host((host, port))).await {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => {
                return Err(ConnectError::Unavailable(format!(
                    "cannot resolve {host}: {e}"
                )))
            }
            Err(_) => {
                return Err(ConnectError::Unavailable(format!(
                    "{target}: resolving timed out"
                )))
            }
        };
    let mut last = None;
    for (i, a) in addrs.iter().enumerate() {
        // Each address gets a fair share of what is left, so a dead first address (an
        // unreachable AAAA record) does not use up the whole timeout.
        let left = deadline.saturating_duration_since(Instant::now());
        let share = (left / (addrs.len() - i) as u32)
            .max(Duration::from_secs(1))
            .min(left);
        match tokio::time::timeout(share, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = Some(format!("{a}: {e}")),
            Err(_) => last = Some(format!("{a}: timed out")),
        }
    }
    Err(ConnectError::Unavailable(format!(
        "cannot connect to {target}: {}",
        last.unwrap_or_else(|| "no address".into())
    )))
}
