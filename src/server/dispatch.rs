//! A routed connection meets its target: an upstream (splice or copy relay), the embedded SSH
//! server, or one of sluice's own answers; and the clean close that ends each.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tracing::warn;

use super::conn_log::ConnLog;
use super::shared::Ctx;
use crate::builtin;
use crate::config::{Route, RouteKind};
use crate::io::Prefixed;
use crate::outcome::{Answer, Outcome, Side};
use crate::proxy_protocol;
use crate::relay;
use crate::route::Decision;
use crate::upstream;

/// How long a closing goodbye (close_notify, a short HTTP answer) may take.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long, and how much, to read and discard after our last bytes before dropping a client.
const LINGER: std::time::Duration = std::time::Duration::from_millis(500);
const LINGER_BYTES: usize = 64 * 1024;

/// Closes a client cleanly (close_notify on TLS, then FIN), without waiting on a stuck peer.
/// Then it briefly reads what the client still sends: dropping a socket with unread data makes
/// the kernel send a reset, and the client could lose our last answer (a 502, a redirect).
pub(super) async fn close<S: AsyncRead + AsyncWrite + Unpin>(client: &mut S) {
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

/// Sends one of sluice's own answers, with `CLOSE_TIMEOUT` past its deadline to finish.
async fn answered(
    what: Answer,
    deadline: Instant,
    send: impl std::future::Future<Output = io::Result<()>>,
) -> Outcome {
    match timeout_at(deadline + CLOSE_TIMEOUT, Box::pin(send)).await {
        Ok(Ok(())) => Outcome::Answered(what),
        Ok(Err(e)) => Outcome::AnswerFailed(what, Some(e)),
        Err(_) => Outcome::AnswerFailed(what, None),
    }
}

/// What the TLS layer (if any) established for a connection, as its target needs it.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Inner {
    /// The client speaks h2 (ALPN, or the preface seen).
    pub(super) h2: bool,
    /// The client showed a client certificate that verifies now (re-verified if resumed).
    pub(super) client_cert: bool,
}

/// Sends a routed connection to its target. `prefix` holds client bytes already read.
pub(super) async fn dispatch<S>(
    cx: &Ctx,
    mut stream: S,
    prefix: Vec<u8>,
    decision: Decision,
    log: &mut ConnLog,
    inner: Inner,
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
            log.route = Some(RouteKind::Http.as_str());
            log.target = Some("redirect to https".into());
            let send = builtin::redirect(client, &prefix, reply_deadline);
            log.outcome = Some(answered(Answer::Redirect, reply_deadline, send).await);
            close(client).await;
            return;
        }
        Decision::Tunnel(name) => {
            log.route = Some("tunnel");
            let _live = crate::sessions::table().route("tunnel");
            let Some(gateway) = &cx.snap.gateway else {
                log.outcome = Some(Outcome::Refused(Side::Internal, "no tunnel gateway"));
                close(client).await;
                return;
            };
            let host = log
                .sni
                .as_deref()
                .unwrap_or_default()
                .trim_end_matches('.')
                .to_ascii_lowercase();
            log.target = Some(name.clone());
            let (counted, counts) = crate::io::Counted::new(Prefixed::new(prefix, stream));
            let visit = crate::tunnel::http::Visit {
                name: &name,
                host: &host,
                peer: log.peer,
                conn: log.id,
                h2: inner.h2,
                client_cert: inner.client_cert,
                access: cx.snap.access.clone(),
            };
            let served = Box::pin(gateway.serve(counted, visit)).await;
            log.bytes = counts.get();
            log.outcome = Some(Outcome::Http(served));
            return;
        }
        Decision::Close(why) => {
            log.noisy = true;
            log.outcome = Some(Outcome::Refused(Side::Client, why));
            close(client).await;
            return;
        }
    };
    log.route = Some(kind.as_str());
    // Counted in `GET /v1/sessions` while it lasts.
    let _live = crate::sessions::table().route(kind.as_str());
    let route: &Route = cfg.route(kind);
    let Some(up) = &route.upstream else {
        match kind {
            RouteKind::Http => {
                log.target = Some("status page".into());
                let send = builtin::status_page(client, &prefix, reply_deadline);
                log.outcome = Some(answered(Answer::StatusPage, reply_deadline, send).await);
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
            if kind == RouteKind::Http && !inner.h2 {
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
