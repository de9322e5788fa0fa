//! One client connection, from accept to close: outer detection, TLS, inner detection,
//! routing, the target, and one log line at the end.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use super::conn_log::ConnLog;
use super::dispatch::{close, dispatch, Inner};
use super::limits::ClientSlot;
use super::proxy_header::looks_like_proxy_header;
use super::shared::{Ctx, Shared};
use crate::config::RouteKind;
use crate::detect::{self, Candidates, Protocol, Verdict};
use crate::io::Prefixed;
use crate::outcome::{Outcome, Side};
use crate::relay;
use crate::route::{self, Decision, RoutedBy};
use crate::tls;

/// Read size while detecting; with signatures of at most 24 bytes, the bytes held before a
/// decision are bounded by this plus 24.
const PEEK_READ: usize = 4096;

/// After the shutdown grace, how long connections get to end on their own (an SSH disconnect).
const FORCE_LINGER: std::time::Duration = std::time::Duration::from_secs(3);

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

/// Serves one accepted connection to the end. `prefix` holds client bytes already read (after
/// a PROXY header).
pub(super) async fn handle(
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
            match Box::pin(handshake_and_route(cx, tcp, prefix, log, unrouted)).await {
                Some(Routed::Tls(r)) => {
                    Box::pin(dispatch(cx, r.tls, r.prefix, r.decision, log, r.inner)).await;
                }
                Some(Routed::Passthrough(p)) => Box::pin(passthrough(cx, p, log)).await,
                None => {}
            }
            return;
        }
        Peek::Match(Protocol::Http1) if cfg.tunnels.is_some() => {
            // Plain http://NAME.<domain>/ goes to https whatever the http route does with
            // plaintext: the Host decides, so the head is read first (and kept for the route).
            let deadline = Instant::now()
                + cfg
                    .tunnels
                    .as_ref()
                    .map_or(cfg.detect.timeout, |t| t.header_timeout);
            match crate::builtin::read_until_head(&mut tcp, &mut prefix, deadline).await {
                Ok(len) => {
                    let tunnel = crate::builtin::header(&prefix[..len], "host")
                        .map(crate::tunnel::http::host_of)
                        .and_then(|h| route::by_tunnel_sni(cfg, &h));
                    match tunnel {
                        Some(_) => (Decision::Redirect, RoutedBy::Plaintext),
                        None => (route::plaintext(cfg, Protocol::Http1), RoutedBy::Plaintext),
                    }
                }
                Err(e) => {
                    log.noisy = true;
                    log.outcome = Some(match e.kind() {
                        io::ErrorKind::TimedOut => {
                            Outcome::Refused(Side::Client, "request head not complete in time")
                        }
                        io::ErrorKind::InvalidData => {
                            Outcome::Refused(Side::Client, "request head too large")
                        }
                        _ => Outcome::Io(Side::Client, e),
                    });
                    return;
                }
            }
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
    Box::pin(dispatch(cx, tcp, prefix, decision, log, Inner::default())).await;
}

/// Where a TLS connection goes after its ClientHello.
enum Routed {
    /// Handshaken by sluice and routed.
    Tls(RoutedTls),
    /// Not terminated: SNI names a tunnel published on port 443.
    Passthrough(Box<Passthrough>),
}

/// A TLS connection, handshaken and routed, ready for [`dispatch`].
struct RoutedTls {
    /// Boxed: moved through several futures, it would take room in each one's state.
    tls: Box<tokio_rustls::server::TlsStream<Prefixed<TcpStream>>>,
    prefix: Vec<u8>,
    decision: Decision,
    inner: Inner,
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
) -> Option<Routed> {
    let cfg = &cx.snap.cfg;
    let handshake = async {
        // With tunnels, the ClientHello is kept: a tunnel on port 443 gets it as it came.
        let io = match &cx.snap.gateway {
            Some(_) => Prefixed::recording(prefix, tcp),
            None => Prefixed::new(prefix, tcp),
        };
        let mut start =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
        let hello = start.client_hello();
        let sni = hello.server_name().map(str::to_string);
        if let Some((gateway, name)) = cx
            .snap
            .gateway
            .as_ref()
            .zip(sni.as_deref().and_then(|n| route::by_tunnel_sni(cfg, n)))
        {
            if let Some(to) = gateway.passthrough(&name, &cx.snap.access) {
                match start.io.replay() {
                    Ok(stream) => {
                        return Ok(Handshake::Passthrough(Box::new(Passthrough {
                            stream,
                            name,
                            sni: sni.unwrap_or_default(),
                            to,
                            gateway: gateway.clone(),
                        })))
                    }
                    // A ClientHello past 64 KiB: served as an ordinary visitor instead.
                    Err(io) => start.io = io,
                }
            }
        }
        start.io.stop_recording();
        let hello = start.client_hello();
        // A tunnel's visitors are offered h2 and http/1.1, whatever the http route speaks.
        let tls = match &cx.snap.tls_tunnel {
            Some(t)
                if hello
                    .server_name()
                    .is_some_and(|n| route::by_tunnel_sni(cfg, n).is_some()) =>
            {
                t
            }
            _ => &cx.snap.tls,
        };
        let offered = &tls.alpn_protocols;
        let overlap = hello
            .alpn()
            .map(|mut theirs| theirs.any(|p| offered.iter().any(|o| o.as_slice() == p)));
        let config = if overlap == Some(false) {
            cx.snap.tls_no_alpn.clone()
        } else {
            tls.clone()
        };
        start
            .into_stream(config)
            .await
            .map(|t| Handshake::Tls(Box::new(t)))
    };
    let mut tls = match tokio::time::timeout(cfg.tls.handshake_timeout, Box::pin(handshake)).await {
        Ok(Ok(Handshake::Tls(s))) => *s,
        Ok(Ok(Handshake::Passthrough(p))) => {
            log.sni = Some(p.sni.clone());
            log.by = Some(RoutedBy::Sni);
            drop(unrouted);
            return Some(Routed::Passthrough(p));
        }
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
    let by_alpn = alpn.as_deref().and_then(|a| route::by_alpn(cfg, a));
    let tunnel = sni.as_deref().and_then(|n| route::by_tunnel_sni(cfg, n));
    let (decision, by) =
        if let Some(kind) = by_alpn.filter(|k| *k == RouteKind::Ssh || tunnel.is_none()) {
            // ALPN `ssh` reaches the SSH server under any name, a tunnel's too.
            (Decision::Route(kind), RoutedBy::Alpn)
        } else if let Some(name) = tunnel {
            (Decision::Tunnel(name), RoutedBy::Sni)
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
    // A tunnel may be private to holders of a client certificate: one that verifies now.
    let client_cert = matches!(decision, Decision::Tunnel(_))
        && match tls
            .get_ref()
            .1
            .peer_certificates()
            .filter(|c| !c.is_empty())
        {
            None => false,
            Some(chain) if log.resumed => {
                tls::reverify_resumed(cx.snap.client_verifier.as_ref(), chain).is_ok()
            }
            Some(_) => true,
        };
    let inner = Inner {
        h2: alpn.as_deref() == Some(b"h2") || prefix.starts_with(b"PRI "),
        client_cert,
    };
    Some(Routed::Tls(RoutedTls {
        tls: Box::new(tls),
        prefix,
        decision,
        inner,
    }))
}

/// The first half of a TLS handshake: sluice's own, or a ClientHello to pass through.
enum Handshake {
    Tls(Box<tokio_rustls::server::TlsStream<Prefixed<TcpStream>>>),
    Passthrough(Box<Passthrough>),
}

/// A TLS connection for a tunnel on port 443: its bytes from the first, and where they go.
struct Passthrough {
    /// Replays the ClientHello, then the rest.
    stream: Prefixed<TcpStream>,
    name: String,
    sni: String,
    to: crate::tunnel::Published,
    gateway: Arc<crate::tunnel::http::Gateway>,
}

/// Relays a passed-through TLS connection to the tunnel's publisher, untouched.
async fn passthrough(cx: &Ctx, p: Box<Passthrough>, log: &mut ConnLog) {
    use crate::tunnel::http::TLS_PORT;
    let Passthrough {
        mut stream,
        name,
        to,
        gateway,
        ..
    } = *p;
    log.route = Some("tunnel");
    let _live = crate::sessions::table().route("tunnel");
    log.target = Some(format!("{name}:{TLS_PORT} (passthrough)"));
    let Some(_admitted) = gateway.admit(&name) else {
        log.outcome = Some(Outcome::Refused(
            Side::Internal,
            "too many visitors for this tunnel (tunnels.max_visitors)",
        ));
        return;
    };
    let open = tokio::time::timeout(
        crate::tunnel::http::OPEN_TIMEOUT,
        to.open(TLS_PORT, log.peer),
    );
    let channel = match open.await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            log.outcome = Some(Outcome::UpstreamUnreachable(format!(
                "the publisher refused the channel: {e}"
            )));
            return;
        }
        Err(_) => {
            log.outcome = Some(Outcome::UpstreamUnreachable(
                "the publisher did not answer the channel open".into(),
            ));
            return;
        }
    };
    log.relay = Some("copy");
    let mut upstream = channel.into_stream();
    let (bytes, end) = Box::pin(relay::relay(
        &mut stream,
        &mut upstream,
        cx.snap.cfg.http.idle(),
        &cx.shared.force_close,
    ))
    .await;
    to.traffic.add(1, bytes.up, bytes.down);
    log.bytes = bytes;
    log.outcome = Some(end.into());
}
