//! The PROXY protocol header a trusted load balancer sends before the client's bytes.

use std::net::SocketAddr;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tracing::warn;

use super::shared::Shared;
use crate::config::ProxyHeader;
use crate::proxy_protocol;

/// Whether a client's first bytes start (or could start) a PROXY header.
pub(super) fn looks_like_proxy_header(prefix: &[u8]) -> bool {
    !matches!(
        proxy_protocol::decode(prefix),
        Ok(proxy_protocol::Decoded::NotProxy)
    )
}

/// Reads the PROXY header a trusted load balancer sends first. Returns the client's address,
/// the address it connected to, and any client bytes read past the header. Without a header
/// (other bytes, or silence until `detect.timeout`) the connection is refused unless
/// `proxy_header = "optional"`, where the bytes are the client's own and the socket's
/// addresses stand. `None` (logged and counted) when refused.
pub(super) async fn read_proxy_header(
    shared: &Shared,
    tcp: &mut TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    accepted: Instant,
) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
    let deadline = accepted + shared.snapshot.load().cfg.detect.timeout;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 2048];
    let required = shared.snapshot.load().cfg.proxy_header == ProxyHeader::Required;
    let refuse = |reason: &'static str, why: &str| {
        crate::metrics::get().refuse(reason);
        if let Some(n) = shared.failures.allow() {
            warn!(%peer, suppressed_similar = n, "closed connection from a trusted proxy: {why}");
        }
    };
    let missing = || {
        refuse(
            "proxy_header_missing",
            "no PROXY header (proxy_header = \"required\"; set \"optional\" if clients also connect directly from trusted_proxies)",
        );
    };
    loop {
        match proxy_protocol::decode(&buf) {
            Ok(proxy_protocol::Decoded::Header { addrs, len }) => {
                let rest = buf.split_off(len);
                let (src, dst) = addrs.unwrap_or((peer, local));
                return Some((src, dst, rest));
            }
            Ok(proxy_protocol::Decoded::NotProxy) if required => {
                missing();
                return None;
            }
            Ok(proxy_protocol::Decoded::NotProxy) => return Some((peer, local, buf)),
            Ok(proxy_protocol::Decoded::Incomplete) => {}
            Err(why) => {
                refuse("proxy_header_invalid", why);
                return None;
            }
        }
        match timeout_at(deadline, tcp.read(&mut chunk)).await {
            Err(_) if buf.is_empty() && required => {
                missing();
                return None;
            }
            // Silent: a client waiting for the server, straight from the proxy host.
            Err(_) if buf.is_empty() => return Some((peer, local, buf)),
            Err(_) => {
                refuse(
                    "proxy_header_invalid",
                    "incomplete PROXY header (timed out)",
                );
                return None;
            }
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
