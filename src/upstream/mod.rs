//! Upstream connections: resolve at connect time, try each address, one deadline for all.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use crate::config::Upstream;

/// Why an upstream could not be reached.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// The name did not resolve.
    #[error("cannot resolve {addr}: {source}")]
    Resolve {
        /// The configured `host:port`.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Every address refused or failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address tried last.
        addr: String,
        /// Its error.
        #[source]
        source: io::Error,
    },
    /// The connect timeout ran out.
    #[error("connect to {addr} timed out after {}", humantime::format_duration(*.after))]
    Timeout {
        /// The configured `host:port`.
        addr: String,
        /// The timeout.
        after: std::time::Duration,
    },
}

/// Connects to `up`, trying each resolved address in turn within `up.connect_timeout`.
pub(crate) async fn connect(up: &Upstream) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let deadline = Instant::now() + up.connect_timeout;
    let timeout = || ConnectError::Timeout {
        addr: up.addr.clone(),
        after: up.connect_timeout,
    };
    let addrs: Vec<SocketAddr> =
        timeout_at(deadline, crate::resolve::lookup_host_port(up.addr.as_str()))
            .await
            .map_err(|_| timeout())?
            .map_err(|source| ConnectError::Resolve {
                addr: up.addr.clone(),
                source,
            })?;
    let mut last = None;
    for addr in addrs {
        match timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => return Err(timeout()),
            Ok(Ok(s)) => {
                // Interactive SSH and small HTTP replies: no Nagle delay on the relay's writes.
                let _ = s.set_nodelay(true);
                return Ok((s, addr));
            }
            Ok(Err(e)) => last = Some((addr, e)),
        }
    }
    let (addr, source) = last.map_or_else(
        || {
            (
                up.addr.clone(),
                io::Error::new(io::ErrorKind::NotFound, "name resolved to no address"),
            )
        },
        |(a, e)| (a.to_string(), e),
    );
    Err(ConnectError::Connect { addr, source })
}
