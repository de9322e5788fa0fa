//! Forwarded channels: `-W`/`-L`/`-J` connects, `-R` listeners on TCP ports and unix sockets,
//! and the relay between a channel and its socket.

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use russh::server::{ChannelOpenHandle, Handle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::time::{timeout_at, Instant};
use tracing::{info, warn};

use super::limits::{ChannelCount, ChannelSlot};
use super::SshServer;
use crate::sessions::{ChannelGuard, ChannelKind, Session};

/// Name lookups in flight at once, across all sessions.
static LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(32);

/// How long the client gets to accept a forwarded channel before the connection is dropped.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Relays a channel and a socket to the end; the bytes from the channel's side (`up`) and
/// from the socket's (`down`). `record` (the session's record of this channel) counts them
/// as they go and writes the channel's close to the trail when it is dropped.
async fn splice<S>(
    server: &SshServer,
    channel: Channel<Msg>,
    mut socket: S,
    _slot: ChannelSlot,
    record: Option<ChannelGuard>,
) -> crate::relay::Bytes
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let counts = record
        .as_ref()
        .map(ChannelGuard::counts)
        .unwrap_or_default();
    let mut stream = crate::io::Counted::quiet(channel.into_stream(), counts);
    crate::relay::relay(&mut stream, &mut socket, server.channel_idle, &server.stop)
        .await
        .0
}

/// The live session's record of a new channel, if the session is in the table.
fn record(live: Option<&Arc<Session>>, kind: ChannelKind, target: String) -> Option<ChannelGuard> {
    live.map(|s| s.channel(kind, target))
}

/// `-W`/`-L`/`-J`: resolve, check addresses against `permit_open`, connect, then accept the
/// channel (or reject it) and relay.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn direct(
    server: Arc<SshServer>,
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    host: String,
    port: u16,
    allowed_by_name: bool,
    peer: SocketAddr,
    user: String,
    slot: ChannelSlot,
    live: Option<Arc<Session>>,
) {
    let _forward = crate::metrics::GaugeGuard::new(&crate::metrics::get().ssh_forwards_active);
    let target = format!("{host}:{port}");
    let deadline = Instant::now() + server.settings.connect_timeout;
    // Lookups are futures (cancelled with the channel), but still bounded in number.
    let Ok(Ok(lookup)) = timeout_at(deadline, LOOKUPS.acquire()).await else {
        warn!(target: "sluice::ssh", %peer, user, target, "direct-tcpip: too many name lookups in progress");
        reply.reject(ChannelOpenFailure::ResourceShortage).await;
        return;
    };
    let addrs: Vec<SocketAddr> = match timeout_at(deadline, crate::resolve::lookup(&host, port))
        .await
    {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            warn!(target: "sluice::ssh", %peer, user, target, error = %e, "direct-tcpip: cannot resolve");
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
        Err(_) => {
            warn!(target: "sluice::ssh", %peer, user, target, "direct-tcpip: resolving timed out");
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    drop(lookup);
    // A name allowed as a name may go to any of its addresses; otherwise each address must be
    // allowed itself, and only those are tried (no DNS tricks past a CIDR rule).
    let rules = &server.settings.permit_open;
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| allowed_by_name || rules.iter().any(|r| r.allows_addr(a.ip(), port)))
        .collect();
    if allowed.is_empty() {
        warn!(target: "sluice::ssh", %peer, user, target, reason = "resolved address not in ssh.permit_open", "denied direct-tcpip");
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        return;
    }
    let mut last_err = None;
    let mut tcp = None;
    for a in allowed {
        match timeout_at(deadline, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                tcp = Some(s);
                break;
            }
            Ok(Err(e)) => last_err = Some(e.to_string()),
            Err(_) => {
                last_err = Some("timed out".into());
                break;
            }
        }
    }
    let Some(tcp) = tcp else {
        warn!(target: "sluice::ssh", %peer, user, target, error = last_err.as_deref().unwrap_or("-"), "direct-tcpip: connect failed");
        reply.reject(ChannelOpenFailure::ConnectFailed).await;
        return;
    };
    let _ = tcp.set_nodelay(true);
    reply.accept().await;
    info!(target: "sluice::ssh", %peer, user, target, "direct-tcpip opened");
    let to = tcp
        .peer_addr()
        .map_or(target.clone(), |a| format!("{target} ({a})"));
    let rec = record(live.as_ref(), ChannelKind::Direct, to);
    splice(&server, channel, tcp, slot, rec).await;
}

/// A tunnel a visitor asked for, and the session that serves it.
pub(crate) struct Visit {
    pub(crate) to: crate::tunnel::Published,
    pub(crate) name: String,
    pub(crate) port: u16,
}

/// `-W/-J/-L NAME:PORT` to a published tunnel: a `forwarded-tcpip` channel to the publisher,
/// then the visitor's channel is accepted and the two are relayed. No socket is involved.
pub(crate) async fn to_tunnel(
    server: Arc<SshServer>,
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    visit: Visit,
    peer: SocketAddr,
    slot: ChannelSlot,
    live: Option<Arc<Session>>,
) {
    let Visit { to, name, port } = visit;
    let _forward = crate::metrics::GaugeGuard::new(&crate::metrics::get().ssh_forwards_active);
    let publisher = match tokio::time::timeout(OPEN_TIMEOUT, to.open(port, peer)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            crate::metrics::count(&crate::metrics::get().tunnel_visits, "publisher_failed");
            warn!(target: "sluice::ssh", %peer, tunnel = name, port, error = %e, "tunnel: the publisher refused the channel");
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
        Err(_) => {
            crate::metrics::count(&crate::metrics::get().tunnel_visits, "publisher_failed");
            warn!(target: "sluice::ssh", %peer, tunnel = name, port, "tunnel: the publisher did not answer the channel open");
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    reply.accept().await;
    crate::metrics::count(&crate::metrics::get().tunnel_visits, "opened");
    info!(target: "sluice::ssh", %peer, tunnel = name, port, "direct-tcpip to a tunnel opened");
    let rec = record(live.as_ref(), ChannelKind::Tunnel, format!("{name}:{port}"));
    let bytes = splice(&server, channel, publisher.into_stream(), slot, rec).await;
    to.traffic.add(1, bytes.up, bytes.down);
}

/// Binds `address:port` for `-R`; port 0 takes a free port from `range`, never a `reserved` one.
pub(crate) fn bind_tcp(
    address: IpAddr,
    port: u16,
    range: RangeInclusive<u16>,
    reserved: &std::collections::HashSet<u16>,
) -> std::io::Result<TcpListener> {
    let bind = |p: u16| -> std::io::Result<TcpListener> {
        let l = std::net::TcpListener::bind((address, p))?;
        l.set_nonblocking(true)?;
        TcpListener::from_std(l)
    };
    if port != 0 {
        return bind(port);
    }
    // Start at a random offset so that sessions don't all race for the same first port.
    let (start, end) = (*range.start(), *range.end());
    let span = u32::from(end - start) + 1;
    let mut r = [0u8; 4];
    let _ = aws_lc_rs::rand::fill(&mut r);
    let offset = u32::from_le_bytes(r) % span;
    for i in 0..span {
        let p = start + ((offset + i) % span) as u16;
        if reserved.contains(&p) {
            continue;
        }
        match bind(p) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free port left in ssh.listen_ports",
    ))
}

/// Accepts on a `-R` TCP listener and opens a forwarded channel for each connection.
pub(crate) async fn reverse_tcp(
    server: Arc<SshServer>,
    listener: TcpListener,
    handle: Handle,
    address: String,
    port: u32,
    channels: Arc<ChannelCount>,
    live: Option<Arc<Session>>,
) {
    // Held while the -R listener lives (the task is aborted when the forward ends).
    let _forward = crate::metrics::GaugeGuard::new(&crate::metrics::get().ssh_forwards_active);
    loop {
        let Ok((tcp, from)) = listener.accept().await else {
            // Out of descriptors, most likely: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Some(slot) = channels.enter() else {
            warn!(target: "sluice::ssh", port, "reverse forward: too many channels; dropping a connection");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (server, handle, address) = (server.clone(), handle.clone(), address.clone());
        let live = live.clone();
        tokio::spawn(async move {
            let what = format!("{address}:{port} from {from}");
            let open = handle.channel_open_forwarded_tcpip(
                address,
                port,
                from.ip().to_string(),
                u32::from(from.port()),
            );
            match tokio::time::timeout(OPEN_TIMEOUT, open).await {
                Ok(Ok(channel)) => {
                    let rec = record(live.as_ref(), ChannelKind::Reverse, what);
                    splice(&server, channel, tcp, slot, rec).await;
                }
                Ok(Err(e)) => {
                    warn!(target: "sluice::ssh", port, error = %e, "reverse forward: the client refused the channel");
                }
                Err(_) => {
                    warn!(target: "sluice::ssh", port, "reverse forward: the client did not answer the channel open");
                }
            }
        });
    }
}

/// Accepts on a `-R` unix socket and opens a forwarded channel for each connection.
pub(crate) async fn reverse_unix(
    server: Arc<SshServer>,
    listener: UnixListener,
    handle: Handle,
    socket_path: String,
    channels: Arc<ChannelCount>,
    live: Option<Arc<Session>>,
) {
    let _forward = crate::metrics::GaugeGuard::new(&crate::metrics::get().ssh_forwards_active);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Some(slot) = channels.enter() else {
            continue;
        };
        let (server, handle, socket_path) = (server.clone(), handle.clone(), socket_path.clone());
        let live = live.clone();
        tokio::spawn(async move {
            let what = socket_path.clone();
            match tokio::time::timeout(
                OPEN_TIMEOUT,
                handle.channel_open_forwarded_streamlocal(socket_path),
            )
            .await
            {
                Ok(Ok(channel)) => {
                    let rec = record(live.as_ref(), ChannelKind::ReverseSocket, what);
                    splice(&server, channel, stream, slot, rec).await;
                }
                _ => {
                    warn!(target: "sluice::ssh", "reverse forward (unix): the client did not take the channel");
                }
            }
        });
    }
}
