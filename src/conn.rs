//! One client connection, from accept to close: outer detection, TLS, inner detection,
//! routing, the target, and one log line at the end.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tracing::{info, warn};

use crate::builtin;
use crate::config::{ProxyHeader, Route, RouteKind};
use crate::detect::{self, Candidates, Protocol, Verdict};
use crate::io::Prefixed;
use crate::outcome::{Answer, Outcome, Side};
use crate::proxy_protocol;
use crate::relay;
use crate::route::{self, Decision, RoutedBy};
use crate::server::limits::ClientSlot;
use crate::server::shared::{Shared, Snapshot};
use crate::tls;
use crate::upstream;

/// Read size while detecting; with signatures of at most 24 bytes, the bytes held before a
/// decision are bounded by this plus 24.
const PEEK_READ: usize = 4096;

/// After the shutdown grace, how long connections get to end on their own (an SSH disconnect).
const FORCE_LINGER: std::time::Duration = std::time::Duration::from_secs(3);

/// How long a closing goodbye (close_notify, a short HTTP answer) may take.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long, and how much, to read and discard after our last bytes before dropping a client.
const LINGER: std::time::Duration = std::time::Duration::from_millis(500);
const LINGER_BYTES: usize = 64 * 1024;

/// Closes a client cleanly (close_notify on TLS, then FIN), without waiting on a stuck peer.
/// Then it briefly reads what the client still sends: dropping a socket with unread data makes
/// the kernel send a reset, and the client could lose our last answer (a 502, a redirect).
async fn close<S: AsyncRead + AsyncWrite + Unpin>(client: &mut S) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, client.shutdown()).await;
    let deadline = Instant::now() + LINGER;
    let mut buf = vec![0u8; 4096];
    let mut total = 0;
    while total < LINGER_BYTES {
        match timeout_at(deadline, client.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => total += n,
            _ => break,
        }
    }
}

/// What is known about a connection, logged once when it closes.
struct ConnLog {
    id: u64,
    peer: SocketAddr,
    local: SocketAddr,
    start: Instant,
    tls: bool,
    /// The TLS session was resumed (from a ticket or the session cache).
    resumed: bool,
    sni: Option<String>,
    alpn: Option<String>,
    by: Option<RoutedBy>,
    route: Option<RouteKind>,
    target: Option<String>,
    bytes: relay::Bytes,
    /// Which relay core moved the bytes: `splice` or `copy`.
    relay: Option<&'static str>,
    /// Set by whichever phase ends the connection.
    outcome: Option<Outcome>,
    /// Failures before routing (scanners, junk) are logged through a throttle.
    noisy: bool,
}

impl ConnLog {
    fn emit(&self, shared: &Shared) {
        debug_assert!(
            self.outcome.is_some(),
            "connection {} ended without an outcome",
            self.id
        );
        let outcome = self.outcome.as_ref().unwrap_or(&Outcome::Closed);
        let m = crate::metrics::get();
        m.connections
            .get_or_create(&crate::metrics::ConnLabels {
                route: self.route.map_or("none", RouteKind::as_str),
                routed_by: self.by.map_or("none", RoutedBy::as_str),
                end: outcome.kind().as_str(),
                side: outcome.side().as_str(),
            })
            .inc();
        // Only throttled lines say how many similar ones were dropped before them.
        let suppressed = if self.noisy {
            match shared.failures.allow() {
                Some(n) => Some(n).filter(|n| *n > 0),
                None => return,
            }
        } else {
            None
        };
        info!(
            target: "sluice::conn",
            id = self.id,
            peer = %self.peer,
            local = %self.local,
            tls = self.tls,
            resumed = self.resumed,
            sni = self.sni.as_deref().unwrap_or("-"),
            alpn = self.alpn.as_deref().unwrap_or("-"),
            routed_by = self.by.map_or("-", RoutedBy::as_str),
            route = self.route.map_or("-", RouteKind::as_str),
            backend = self.target.as_deref().unwrap_or("-"),
            bytes_up = self.bytes.up,
            bytes_down = self.bytes.down,
            relay = self.relay.unwrap_or("-"),
            duration_ms = self.start.elapsed().as_millis() as u64,
            end = outcome.kind().as_str(),
            side = outcome.side().as_str(),
            outcome = %outcome,
            suppressed_similar = suppressed,
            "connection closed"
        );
    }
}

/// The result of reading a stream's first bytes.
enum Peek {
    Match(Protocol),
    NoMatch,
    Timeout,
    Eof,
    Error(io::Error),
}

/// Reads into `buf` until the classifier decides, the deadline passes or the stream ends.
async fn peek<S: AsyncRead + Unpin>(
    s: &mut S,
    cands: Candidates,
    deadline: Instant,
    buf: &mut Vec<u8>,
) -> Peek {
    // On the heap and only while peeking: a stack array would sit in every connection
    // task's state machine for the connection's whole life.
    let mut chunk = vec![0u8; PEEK_READ];
    loop {
        match detect::classify(buf, cands) {
            Verdict::Match(p) => return Peek::Match(p),
            Verdict::NoMatch => return Peek::NoMatch,
            Verdict::NeedMore => {}
        }
        match timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => return Peek::Timeout,
            Ok(Ok(0)) => return Peek::Eof,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Peek::Eof,
            Ok(Err(e)) => return Peek::Error(e),
        }
    }
}

fn looks_like_proxy_header(prefix: &[u8]) -> bool {
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
pub(crate) async fn read_proxy_header(
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

/// What one connection is served with: the server's shared state and the snapshot (config,
/// TLS, SSH server) that was current when it was accepted.
struct Ctx {
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    /// When the connection was accepted: a client that stays silent has `detect.timeout` from
    /// here, PROXY header included.
    accepted: Instant,
}

/// Serves one accepted connection to the end. `prefix` holds client bytes already read (after
/// a PROXY header).
pub(crate) async fn handle(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    unrouted: ClientSlot,
    prefix: Vec<u8>,
    accepted: Instant,
) {
    let _active = crate::metrics::GaugeGuard::new(&crate::metrics::get().connections_active);
    let cx = Ctx {
        snap: shared.snapshot.load_full(),
        shared,
        accepted,
    };
    let shared = &cx.shared;
    let mut log = ConnLog {
        id: shared
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        peer,
        local,
        start: Instant::now(),
        tls: false,
        resumed: false,
        sni: None,
        alpn: None,
        by: None,
        route: None,
        target: None,
        bytes: relay::Bytes::default(),
        relay: None,
        outcome: None,
        noisy: false,
    };
    let force = shared.force_close.clone();
    let mut cut = false;
    {
        let serve = serve(&cx, tcp, prefix, &mut log, unrouted);
        tokio::pin!(serve);
        tokio::select! {
            () = &mut serve => {}
            () = force.cancelled() => {
                // Relays and SSH sessions end on this token themselves (SSH says goodbye
                // first): give them that moment, then drop what is still mid-handshake.
                cut = tokio::time::timeout(FORCE_LINGER, &mut serve).await.is_err();
            }
        }
    }
    if cut && log.outcome.is_none() {
        log.outcome = Some(Outcome::Shutdown);
    }
    log.emit(shared);
}

async fn serve(
    cx: &Ctx,
    mut tcp: TcpStream,
    mut prefix: Vec<u8>,
    log: &mut ConnLog,
    unrouted: ClientSlot,
) {
    let cfg = &cx.snap.cfg;
    let detect_start = Instant::now();
    let deadline = cx.accepted + cfg.detect.timeout;
    let (decision, by) = match peek(&mut tcp, Candidates::OUTER, deadline, &mut prefix).await {
        Peek::Match(Protocol::Tls) => {
            log.tls = true;
            let routed = Box::pin(handshake_and_route(cx, tcp, prefix, log, unrouted)).await;
            if let Some(r) = routed {
                Box::pin(dispatch(cx, r.tls, r.prefix, r.decision, log, r.h2)).await;
            }
            return;
        }
        Peek::Match(p) => (route::plaintext(cfg, p), RoutedBy::Plaintext),
        Peek::Timeout => (route::plaintext_timeout(cfg), RoutedBy::Timeout),
        Peek::NoMatch if prefix.len() >= 3 && looks_like_proxy_header(&prefix) => {
            crate::metrics::get().refuse("proxy_header_untrusted");
            (
                Decision::Close(
                    "unexpected PROXY protocol header (not from trusted_proxies, or a second one)",
                ),
                RoutedBy::Plaintext,
            )
        }
        Peek::NoMatch => (Decision::Close("unknown protocol"), RoutedBy::Plaintext),
        Peek::Eof => (
            Decision::Close("client closed before sending"),
            RoutedBy::Plaintext,
        ),
        Peek::Error(e) => {
            log.noisy = true;
            log.outcome = Some(Outcome::Io(Side::Client, e));
            return;
        }
    };
    log.by = Some(by);
    crate::metrics::get()
        .detect_seconds
        .observe(detect_start.elapsed().as_secs_f64());
    drop(unrouted);
    Box::pin(dispatch(cx, tcp, prefix, decision, log, false)).await;
}

/// A TLS connection, handshaken and routed, ready for [`dispatch`].
struct RoutedTls {
    /// Boxed: moved through several futures, it would take room in each one's state.
    tls: Box<tokio_rustls::server::TlsStream<Prefixed<TcpStream>>>,
    prefix: Vec<u8>,
    decision: Decision,
    h2: bool,
}

/// The TLS handshake and the inner routing decision; `None` if the connection is done (the
/// outcome is in `log`). Returning instead of dispatching from here keeps this phase's state
/// out of the memory an established connection holds.
async fn handshake_and_route(
    cx: &Ctx,
    tcp: TcpStream,
    prefix: Vec<u8>,
    log: &mut ConnLog,
    unrouted: ClientSlot,
) -> Option<RoutedTls> {
    let cfg = &cx.snap.cfg;
    let handshake = async {
        let start = tokio_rustls::LazyConfigAcceptor::new(
            rustls::server::Acceptor::default(),
            Prefixed::new(prefix, tcp),
        )
        .await?;
        let hello = start.client_hello();
        let offered = &cx.snap.tls.alpn_protocols;
        let overlap = hello
            .alpn()
            .map(|mut theirs| theirs.any(|p| offered.iter().any(|o| o.as_slice() == p)));
        let config = if overlap == Some(false) {
            cx.snap.tls_no_alpn.clone()
        } else {
            cx.snap.tls.clone()
        };
        start.into_stream(config).await
    };
    let mut tls = match tokio::time::timeout(cfg.tls.handshake_timeout, Box::pin(handshake)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            crate::metrics::get().tls_handshake_failures.inc();
            log.noisy = true;
            log.outcome = Some(Outcome::TlsFailed(e));
            return None;
        }
        Err(_) => {
            crate::metrics::get().tls_handshake_failures.inc();
            log.noisy = true;
            log.outcome = Some(Outcome::TlsTimeout(cfg.tls.handshake_timeout));
            return None;
        }
    };
    let (alpn, sni) = {
        let (_, conn) = tls.get_ref();
        log.resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        (
            conn.alpn_protocol().map(<[u8]>::to_vec),
            conn.server_name().map(str::to_string),
        )
    };
    log.alpn = alpn
        .as_deref()
        .map(|a| String::from_utf8_lossy(a).into_owned());
    log.sni = sni.clone();

    let mut prefix = Vec::new();
    let detect_start = Instant::now();
    let (decision, by) = if let Some(kind) = alpn.as_deref().and_then(|a| route::by_alpn(cfg, a)) {
        (Decision::Route(kind), RoutedBy::Alpn)
    } else if let Some(kind) = sni.as_deref().and_then(|n| route::by_sni(cfg, n)) {
        (Decision::Route(kind), RoutedBy::Sni)
    } else {
        let deadline = Instant::now() + cfg.detect.timeout;
        match peek(&mut tls, Candidates::INNER, deadline, &mut prefix).await {
            Peek::Match(p) => (route::by_inner_protocol(cfg, p), RoutedBy::Peek),
            Peek::NoMatch => (route::inner_unknown(cfg), RoutedBy::Peek),
            Peek::Timeout => (route::inner_timeout(cfg), RoutedBy::Timeout),
            Peek::Eof => (
                Decision::Close("client closed before sending"),
                RoutedBy::Peek,
            ),
            Peek::Error(e) => {
                log.noisy = true;
                log.outcome = Some(Outcome::Io(Side::Client, e));
                return None;
            }
        }
    };
    log.by = Some(by);
    crate::metrics::get()
        .detect_seconds
        .observe(detect_start.elapsed().as_secs_f64());
    let decision = match decision {
        Decision::Route(k) if cfg.route(k).require_client_cert => {
            let conn = tls.get_ref().1;
            match conn.peer_certificates().filter(|c| !c.is_empty()) {
                None => Decision::Close("route requires a client certificate"),
                // rustls restores the chain from the ticket without verifying it again.
                Some(chain) if log.resumed => {
                    match tls::reverify_resumed(cx.snap.client_verifier.as_ref(), chain) {
                        Ok(()) => Decision::Route(k),
                        Err(e) => {
                            log.noisy = true;
                            log.outcome = Some(Outcome::CertRejected(e.to_string()));
                            close(&mut tls).await;
                            return None;
                        }
                    }
                }
                Some(_) => Decision::Route(k),
            }
        }
        d => d,
    };
    drop(unrouted);
    let h2 = alpn.as_deref() == Some(b"h2") || prefix.starts_with(b"PRI ");
    Some(RoutedTls {
        tls: Box::new(tls),
        prefix,
        decision,
        h2,
    })
}

/// The outcome of one of sluice's own answers, sent under a deadline.
fn answered(what: Answer, sent: Result<io::Result<()>, tokio::time::error::Elapsed>) -> Outcome {
    match sent {
        Ok(Ok(())) => Outcome::Answered(what),
        Ok(Err(e)) => Outcome::AnswerFailed(what, Some(e)),
        Err(_) => Outcome::AnswerFailed(what, None),
    }
}

/// Sends a routed connection to its target. `prefix` holds client bytes already read.
async fn dispatch<S>(
    cx: &Ctx,
    mut stream: S,
    prefix: Vec<u8>,
    decision: Decision,
    log: &mut ConnLog,
    h2: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let client = &mut stream;
    let cfg = &cx.snap.cfg;
    let reply_deadline =
        Instant::now() + cfg.detect.timeout.max(std::time::Duration::from_secs(10));
    let kind = match decision {
        Decision::Route(kind) => kind,
        Decision::Redirect => {
            log.route = Some(RouteKind::Http);
            log.target = Some("redirect to https".into());
            log.outcome = Some(answered(
                Answer::Redirect,
                timeout_at(
                    reply_deadline + CLOSE_TIMEOUT,
                    Box::pin(builtin::redirect(client, &prefix, reply_deadline)),
                )
                .await,
            ));
            close(client).await;
            return;
        }
        Decision::Close(why) => {
            log.noisy = true;
            log.outcome = Some(Outcome::Refused(Side::Client, why));
            close(client).await;
            return;
        }
    };
    log.route = Some(kind);
    let route: &Route = cfg.route(kind);
    let Some(up) = &route.upstream else {
        match kind {
            RouteKind::Http => {
                log.target = Some("status page".into());
                log.outcome = Some(answered(
                    Answer::StatusPage,
                    timeout_at(
                        reply_deadline + CLOSE_TIMEOUT,
                        Box::pin(builtin::status_page(client, &prefix, reply_deadline)),
                    )
                    .await,
                ));
                close(client).await;
            }
            RouteKind::Ssh => {
                log.target = Some("embedded ssh".into());
                let Some(ssh) = &cx.snap.ssh else {
                    log.outcome = Some(Outcome::Refused(Side::Internal, "no embedded SSH server"));
                    close(client).await;
                    return;
                };
                // russh reads the stream itself: no relay, the peeked bytes replayed first.
                let (counted, counts) = crate::io::Counted::new(Prefixed::new(prefix, stream));
                log.outcome = Some(Outcome::Ssh(Box::pin(ssh.serve(counted, log.peer)).await));
                log.bytes = counts.get();
            }
        }
        return;
    };
    log.target = Some(up.addr.clone());
    let (mut server, addr) = match Box::pin(upstream::connect(up)).await {
        Ok(s) => s,
        Err(e) => {
            crate::metrics::get()
                .upstream_failures
                .get_or_create(&crate::metrics::RouteLabels {
                    route: kind.as_str(),
                })
                .inc();
            warn!(id = log.id, peer = %log.peer, route = kind.as_str(), error = %e, "upstream unreachable");
            log.outcome = Some(Outcome::UpstreamUnreachable(e.to_string()));
            if kind == RouteKind::Http && !h2 {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, builtin::bad_gateway(client)).await;
            }
            close(client).await;
            return;
        }
    };
    log.target = Some(addr.to_string());
    let mut first = Vec::new();
    if let Some(v) = up.proxy_protocol {
        proxy_protocol::encode(v, log.peer, log.local, &mut first);
    }
    first.extend_from_slice(&prefix);
    if !first.is_empty() {
        if let Err(e) = server.write_all(&first).await {
            log.outcome = Some(Outcome::Io(Side::Upstream, e));
            return;
        }
        crate::metrics::get().relayed(true, prefix.len() as u64);
    }
    // Plain on both sides: splice(2), no copies through user space (copy relay if no pipes).
    let spliced = match (&*client as &dyn std::any::Any).downcast_ref::<TcpStream>() {
        Some(tcp) => {
            Box::pin(relay::splice::relay(
                &cx.shared.pipes,
                tcp,
                &server,
                route.idle(),
                &cx.shared.force_close,
            ))
            .await
        }
        None => None,
    };
    log.relay = Some(if spliced.is_some() { "splice" } else { "copy" });
    let (bytes, end) = match spliced {
        Some(r) => r,
        None => {
            Box::pin(relay::relay(
                client,
                &mut server,
                route.idle(),
                &cx.shared.force_close,
            ))
            .await
        }
    };
    log.bytes = relay::Bytes {
        up: bytes.up + prefix.len() as u64,
        down: bytes.down,
    };
    log.outcome = Some(end.into());
}
