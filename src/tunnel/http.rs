//! HTTPS visitors of `NAME.<domain>`: sluice terminates TLS and serves HTTP/1.1 or h2 with
//! hyper; each request goes to the publisher of `NAME:80` over a `forwarded-tcpip` channel,
//! as HTTP/1.1, on channels pooled per publishing session (hyper-util's client pool).
//!
//! sluice is the edge here: the visitor's own `Forwarded` and `X-Forwarded-*` headers are
//! replaced, never trusted.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use russh::server::Msg;
use russh::ChannelStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::access::{Access, Denied, Verdict};
use super::{Registry, Traffic};
use crate::config::TunnelSettings;
use crate::outcome::HttpEnd;

/// The publisher's port that HTTPS visitors reach (`ssh -R NAME:80:...`).
pub(crate) const HTTP_PORT: u16 = 80;
/// A tunnel published on this port gets its visitors' TLS untouched (passthrough).
pub(crate) const TLS_PORT: u16 = 443;

/// The largest request head (HTTP/1.1 buffer, h2 header list).
const MAX_HEAD: usize = 64 * 1024;
/// Streams at once on one h2 visitor connection.
const H2_STREAMS: u32 = 100;
/// How long opening a channel to the publisher may take.
pub(crate) const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry-After on the page for a tunnel whose publisher is away.
const RETRY_AFTER: &str = "5";

/// Serves HTTPS visitors of tunnels; one per server, shared by every visitor connection.
pub(crate) struct Gateway {
    settings: TunnelSettings,

    registry: Arc<Registry>,
    /// Visitor connections open now, per tunnel name (bounded by `max_visitors`).
    visitors: Arc<Mutex<HashMap<Arc<str>, u32>>>,
    client: Client<Dialer, Upload>,
    server: hyper_util::server::conn::auto::Builder<TokioExecutor>,
    /// Cancelled at the end of the shutdown grace: upgraded streams close.
    stop: CancellationToken,
}

/// A visitor connection as the server hands it over.
pub(crate) struct Visit<'a> {
    /// The tunnel its SNI named.
    pub(crate) name: &'a str,
    /// That SNI, lower case, without a trailing dot.
    pub(crate) host: &'a str,
    pub(crate) peer: SocketAddr,
    /// The connection's id in the logs.
    pub(crate) conn: u64,
    /// ALPN chose h2 (else HTTP/1.1).
    pub(crate) h2: bool,
    /// The connection showed a client certificate that verifies now.
    pub(crate) client_cert: bool,
    /// Who may visit private tunnels.
    pub(crate) access: Arc<Access>,
}

/// One visitor connection: the tunnel its SNI names, and who it is.
#[derive(Clone)]
struct Visitor {
    name: Arc<str>,
    /// `NAME.<domain>`, as the SNI had it (lower case): what `Host` must name.
    host: Arc<str>,
    peer: SocketAddr,
    conn: u64,
    requests: Arc<std::sync::atomic::AtomicU64>,
    /// `None`: the tunnel had `max_visitors` connections already; requests get a 503.
    admitted: Option<Arc<Admitted>>,
    client_cert: bool,
    access: Arc<Access>,
}

/// A visitor connection counted against its tunnel's `max_visitors`, until dropped.
pub(crate) struct Admitted {
    visitors: Arc<Mutex<HashMap<Arc<str>, u32>>>,
    name: Arc<str>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut v = self.visitors.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = v.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                v.remove(&self.name);
            }
        }
    }
}

impl Gateway {
    pub(crate) fn new(
        settings: TunnelSettings,
        registry: Arc<Registry>,
        stop: CancellationToken,
    ) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(settings.pool_idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http1_max_buf_size(MAX_HEAD.max(8192) * 2)
            // The visitor's Host is set on every request; nothing is added.
            .set_host(false)
            .build(Dialer {
                registry: registry.clone(),
            });
        let mut server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        server
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_timeout)
            .max_buf_size(MAX_HEAD.max(8192));
        server
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_STREAMS)
            .max_header_list_size(MAX_HEAD as u32)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(settings.header_timeout);
        Gateway {
            settings,
            registry,
            visitors: Arc::default(),
            client,
            server,
            stop,
        }
    }

    /// Whether this gateway reaches the tunnels of `registry` with `settings`.
    pub(crate) fn serves(&self, registry: &Arc<Registry>, settings: &TunnelSettings) -> bool {
        Arc::ptr_eq(&self.registry, registry) && self.settings == *settings
    }

    /// The session serving `name` on port 443, whose visitors' TLS is passed through. Never
    /// for a private tunnel: sluice must see its requests to check them.
    pub(crate) fn passthrough(&self, name: &str, access: &Access) -> Option<super::Published> {
        if access.covers(name) {
            return None;
        }
        self.registry.route(name, TLS_PORT)
    }

    /// Counts a visitor connection against `max_visitors`; `None` when the tunnel is full.
    pub(crate) fn admit(&self, name: &str) -> Option<Arc<Admitted>> {
        let name: Arc<str> = name.into();
        let mut v = self.visitors.lock().unwrap_or_else(|p| p.into_inner());
        let n = v.entry(name.clone()).or_insert(0);
        if *n >= self.settings.max_visitors {
            return None;
        }
        *n += 1;
        Some(Arc::new(Admitted {
            visitors: self.visitors.clone(),
            name,
        }))
    }

    /// Serves one visitor connection to its end.
    pub(crate) async fn serve<S>(self: &Arc<Self>, io: S, visit: Visit<'_>) -> HttpEnd
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Visit {
            name,
            host,
            peer,
            conn,
            h2,
            client_cert,
            access,
        } = visit;
        let name: Arc<str> = name.into();
        let admitted = self.admit(&name);
        if admitted.is_none() {
            warn!(target: "sluice::tunnel", tunnel = %name, %peer, conn, max_visitors = self.settings.max_visitors, "too many visitors: requests on this connection get 503");
        }
        let visitor = Visitor {
            name,
            host: host.into(),
            peer,
            conn,
            requests: Arc::default(),
            admitted,
            client_cert,
            access,
        };
        let requests = visitor.requests.clone();
        let gateway = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let (gateway, visitor) = (gateway.clone(), visitor.clone());
            async move { Ok::<_, Infallible>(gateway.handle(&visitor, req).await) }
        });
        // ALPN decided the protocol: no sniffing, so a silent client meets the header timeout.
        let builder = self.server.clone();
        let builder = if h2 {
            builder.http2_only()
        } else {
            builder.http1_only()
        };
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            () = self.stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        let timeout = result.as_ref().err().is_some_and(|e| {
            e.downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout)
        });
        HttpEnd {
            requests: requests.load(std::sync::atomic::Ordering::Relaxed),
            error: result.err().map(|e| error_chain(&*e)),
            timeout,
        }
    }

    async fn handle(&self, v: &Visitor, mut req: Request<Incoming>) -> Response<Body> {
        v.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let start = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let log = Log {
            tunnel: v.name.clone(),
            conn: v.conn,
            method,
            path,
            start,
            traffic: None,
        };
        let Some(authority) = authority(&req) else {
            return log.answer(StatusCode::BAD_REQUEST, "the request names no host\n");
        };
        if host_of(&authority) != *v.host {
            return log.answer(
                StatusCode::MISDIRECTED_REQUEST,
                "this connection serves another host (Host and SNI differ)\n",
            );
        }
        if v.admitted.is_none() {
            let mut r = log.answer(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("tunnel {} has too many visitors now\n", v.name),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER));
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
        let access = v.access.clone();
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        let user = match access.check(&v.name, v.client_cert, authorization).await {
            Verdict::Public => None,
            Verdict::Allowed { user } => {
                // The credentials were sluice's to check, not the device's to see.
                if user.is_some() {
                    req.headers_mut().remove(header::AUTHORIZATION);
                }
                user
            }
            Verdict::Denied(d) => return refuse(log, v, d),
        };
        let Some(to) = self.registry.route(&v.name, HTTP_PORT) else {
            return if self.registry.is_owned(&v.name) {
                self.away(log, &v.name)
            } else {
                log.answer(StatusCode::NOT_FOUND, &format!("no tunnel {}\n", v.name))
            };
        };
        let upgrade = wants_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let Ok(uri) = Uri::builder()
            .scheme("http")
            .authority(format!("{}.{}:{HTTP_PORT}", v.name, to.session))
            .path_and_query(
                req.uri()
                    .path_and_query()
                    .map_or("/", http::uri::PathAndQuery::as_str),
            )
            .build()
        else {
            return log.answer(StatusCode::BAD_REQUEST, "malformed request target\n");
        };
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        let keep_upgrade = upgrade.is_some();
        strip_hop_by_hop(req.headers_mut(), keep_upgrade);
        forwarding_headers(req.headers_mut(), v.peer, &authority);
        if let Some(u) = user.as_deref().and_then(|u| HeaderValue::from_str(u).ok()) {
            req.headers_mut()
                .insert(HeaderName::from_static("x-forwarded-user"), u);
        }
        let mut log = log;
        log.traffic = Some(to.traffic.clone());
        let req = req.map(|body| Upload {
            inner: body,
            traffic: to.traffic.clone(),
        });
        let resp = match self.client.request(req).await {
            Ok(r) => r,
            Err(e) if self.registry.route(&v.name, HTTP_PORT).is_none() => {
                // The session ended while the request was on its way.
                warn!(target: "sluice::tunnel", tunnel = %v.name, conn = v.conn, error = %error_chain(&e), "the publisher went away");
                return self.away(log, &v.name);
            }
            Err(e) => {
                warn!(target: "sluice::tunnel", tunnel = %v.name, conn = v.conn, error = %error_chain(&e), "the publisher's service did not answer");
                return log.answer(
                    StatusCode::BAD_GATEWAY,
                    &format!("tunnel {}: the service behind it did not answer\n", v.name),
                );
            }
        };
        let (mut parts, body) = resp.into_parts();
        let status = parts.status;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(visitor_side) = upgrade {
                let mut resp = Response::from_parts(parts, ());
                let publisher_side = hyper::upgrade::on(&mut resp);
                let (parts, ()) = resp.into_parts();
                let stop = self.stop.clone();
                let (tunnel, conn) = (v.name.clone(), v.conn);
                tokio::spawn(async move {
                    let (Ok(a), Ok(b)) = tokio::join!(visitor_side, publisher_side) else {
                        return;
                    };
                    let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                    let idle = crate::relay::Idle::new(Duration::from_secs(3600));
                    let (bytes, end) = crate::relay::relay(&mut a, &mut b, idle, &stop).await;
                    info!(target: "sluice::tunnel", %tunnel, conn, bytes_up = bytes.up, bytes_down = bytes.down, end = %end, "upgraded stream closed");
                });
                return log.finish(Response::from_parts(parts, Body::Empty), status);
            }
        } else {
            strip_hop_by_hop(&mut parts.headers, false);
        }
        log.finish(Response::from_parts(parts, Body::Tunnel(body)), status)
    }
}

impl Gateway {
    /// The 502 for a tunnel whose publisher is not connected.
    fn away(&self, log: Log, name: &str) -> Response<Body> {
        let mut r = log.answer(
            StatusCode::BAD_GATEWAY,
            &format!("tunnel {name} is not connected now: its publisher is away\n"),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER));
        r
    }
}

/// The answer to a visitor a private tunnel refused; wrong credentials are logged in a line
/// fail2ban matches (deploy/fail2ban), the rest (a browser's first request before it asks for
/// credentials, a missing certificate) only at debug and info.
fn refuse(log: Log, v: &Visitor, d: Denied) -> Response<Body> {
    let ip = v.peer.ip().to_canonical();
    match d {
        Denied::NoClientCert => {
            info!(target: "sluice::tunnel::auth", tunnel = %v.name, peer = %v.peer, "refused: the tunnel is private and the connection showed no client certificate");
            log.answer(
                StatusCode::FORBIDDEN,
                &format!(
                    "tunnel {} is private: a client certificate is needed\n",
                    v.name
                ),
            )
        }
        Denied::NoCredentials | Denied::Wrong(_) => {
            if let Denied::Wrong(user) = &d {
                warn!(target: "sluice::tunnel::auth", "Failed password for {} from {ip} tunnel {}", crate::text::clean(user), v.name);
            } else {
                tracing::debug!(target: "sluice::tunnel::auth", tunnel = %v.name, peer = %v.peer, "asked for credentials");
            }
            let mut r = log.answer(
                StatusCode::UNAUTHORIZED,
                &format!("tunnel {} is private: credentials are needed\n", v.name),
            );
            if let Ok(realm) =
                HeaderValue::from_str(&format!("Basic realm=\"{}\", charset=\"UTF-8\"", v.name))
            {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, realm);
            }
            r
        }
    }
}

/// The request's authority: `:authority` (h2, absolute-form) or `Host`.
fn authority(req: &Request<Incoming>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_string());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
        .map(str::to_string)
}

/// The host of an authority, lower case, without port or trailing dot; empty if malformed.
pub(crate) fn host_of(authority: &str) -> String {
    authority
        .parse::<http::uri::Authority>()
        .map(|a| a.host().trim_end_matches('.').to_ascii_lowercase())
        .unwrap_or_default()
}

/// HTTP/1.1 `Connection: upgrade` with an `Upgrade` header (WebSocket and the like).
fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(h: &HeaderMap) -> impl Iterator<Item = &str> {
    h.get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes the headers that belong to one hop (RFC 9110 section 7.6.1), and those the
/// `Connection` header names; with `upgrade`, `Connection: upgrade` and `Upgrade` stay.
fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = connection_tokens(h)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for n in named {
        if !(upgrade && n == header::UPGRADE) {
            h.remove(n);
        }
    }
    for n in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        if !(upgrade && n == header::UPGRADE) {
            h.remove(n);
        }
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// `Host` as the visitor asked, and the forwarding headers, replacing any the visitor sent.
fn forwarding_headers(h: &mut HeaderMap, peer: SocketAddr, authority: &str) {
    for n in [
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
    ] {
        h.remove(n);
    }
    let ip = peer.ip().to_canonical().to_string();
    if let Ok(a) = HeaderValue::from_str(authority) {
        h.insert(header::HOST, a.clone());
        h.insert(HeaderName::from_static("x-forwarded-host"), a);
    }
    if let Ok(v) = HeaderValue::from_str(&ip) {
        h.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    h.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("https"),
    );
}

/// An error and its sources, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// One request's log line and metrics, written when its response body ends (or is dropped).
struct Log {
    tunnel: Arc<str>,
    conn: u64,
    method: Method,
    path: String,
    start: Instant,
    /// The tunnel's counters, once the request goes to it.
    traffic: Option<Arc<Traffic>>,
}

impl Log {
    /// sluice's own small answer.
    fn answer(self, status: StatusCode, text: &str) -> Response<Body> {
        let mut r = Response::new(Body::Full(Full::new(Bytes::from(text.to_string()))));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        self.finish(r, status)
    }

    fn finish(self, r: Response<Body>, status: StatusCode) -> Response<Body> {
        let (parts, body) = r.into_parts();
        Response::from_parts(
            parts,
            Body::Logged(Box::new(Logged {
                inner: body,
                bytes: 0,
                status,
                log: Some(self),
            })),
        )
    }
}

/// A response body: the publisher's, sluice's own, or one of those counted for the log.
pub(crate) enum Body {
    Tunnel(Incoming),
    Full(Full<Bytes>),
    Empty,
    Logged(Box<Logged>),
}

/// A body whose bytes are counted; the request's log line is written at its end.
pub(crate) struct Logged {
    inner: Body,
    bytes: u64,
    status: StatusCode,
    log: Option<Log>,
}

impl Logged {
    fn done(&mut self, error: Option<&hyper::Error>) {
        let Some(l) = self.log.take() else {
            return;
        };
        if let Some(t) = &l.traffic {
            t.add(1, 0, self.bytes);
        }
        let class = match self.status.as_u16() {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        crate::metrics::get()
            .tunnel_requests
            .get_or_create(&crate::metrics::TunnelRequestLabels {
                tunnel: l.tunnel.to_string(),
                class,
            })
            .inc();
        info!(
            target: "sluice::tunnel",
            tunnel = %l.tunnel,
            conn = l.conn,
            method = %l.method,
            path = %l.path,
            status = self.status.as_u16(),
            bytes = self.bytes,
            duration_ms = l.start.elapsed().as_millis() as u64,
            error = error.map(|e| e.to_string()),
            "request"
        );
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.done(None);
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Body::Tunnel(b) => Pin::new(b).poll_frame(cx),
            Body::Full(b) => Pin::new(b).poll_frame(cx).map_err(|e| match e {}),
            Body::Empty => Poll::Ready(None),
            Body::Logged(l) => {
                let r = Pin::new(&mut l.inner).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(f))) => {
                        if let Some(d) = f.data_ref() {
                            l.bytes += d.len() as u64;
                        }
                    }
                    Poll::Ready(Some(Err(e))) => l.done(Some(e)),
                    Poll::Ready(None) => l.done(None),
                    Poll::Pending => {}
                }
                r
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Tunnel(b) => b.is_end_stream(),
            Body::Full(b) => b.is_end_stream(),
            Body::Empty => true,
            Body::Logged(l) => l.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Tunnel(b) => b.size_hint(),
            Body::Full(b) => b.size_hint(),
            Body::Empty => SizeHint::with_exact(0),
            Body::Logged(l) => l.inner.size_hint(),
        }
    }
}

/// A visitor's request body on its way to the publisher, counted into the tunnel's traffic.
pub(crate) struct Upload {
    inner: Incoming,
    traffic: Arc<Traffic>,
}

impl http_body::Body for Upload {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                self.traffic.add(0, d.len() as u64, 0);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Opens a channel to the session publishing a tunnel, for hyper's client pool. The pool's
/// key, the URI's authority, is `NAME.SESSION:PORT`: a reconnected publisher is a new
/// session, so no request goes down a channel of the one before.
#[derive(Clone)]
struct Dialer {
    registry: Arc<Registry>,
}

/// Why no channel to a publisher opened.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("malformed pool key {0}")]
    Key(String),
    #[error("no session serves the tunnel now")]
    Gone,
    #[error("the publisher refused the channel: {0}")]
    Refused(russh::Error),
    #[error(
        "the publisher did not answer the channel open in {}",
        humantime::format_duration(OPEN_TIMEOUT)
    )]
    Timeout,
}

impl tower_service::Service<Uri> for Dialer {
    type Response = TokioIo<Link>;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let registry = self.registry.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default();
            let port = uri.port_u16().unwrap_or(HTTP_PORT);
            let (name, session) = host
                .rsplit_once('.')
                .and_then(|(n, s)| Some((n, s.parse::<u64>().ok()?)))
                .ok_or_else(|| DialError::Key(host.to_string()))?;
            let to = registry
                .route(name, port)
                .filter(|t| t.session == session)
                .ok_or(DialError::Gone)?;
            // The visitor's address is in X-Forwarded-For; the channel is shared by many.
            let from = SocketAddr::from(([127, 0, 0, 1], 0));
            match tokio::time::timeout(OPEN_TIMEOUT, to.open(port, from)).await {
                Ok(Ok(c)) => Ok(TokioIo::new(Link(c.into_stream()))),
                Ok(Err(e)) => Err(DialError::Refused(e)),
                Err(_) => Err(DialError::Timeout),
            }
        })
    }
}

/// A channel to a publisher, as hyper's client sees a connection.
struct Link(ChannelStream<Msg>);

impl Connection for Link {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Link {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(host_of("MyApp.T.Localhost:8443"), "myapp.t.localhost");
        assert_eq!(host_of("myapp.t.localhost."), "myapp.t.localhost");
        assert_eq!(host_of("[::1]"), "[::1]");
        assert_eq!(host_of("[::1]:80"), "[::1]");
        assert_eq!(host_of("a b"), "");
    }

    #[test]
    fn hop_by_hop_headers_stay_behind() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn forwarding_headers_replace_the_visitors() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.9.9.9"));
        h.insert("forwarded", HeaderValue::from_static("for=10.9.9.9"));
        forwarding_headers(
            &mut h,
            "[::ffff:192.0.2.7]:5000".parse().unwrap(),
            "a.t.example:443",
        );
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "a.t.example:443");
        assert_eq!(h[header::HOST], "a.t.example:443");
        assert!(!h.contains_key("forwarded"));
    }
}
