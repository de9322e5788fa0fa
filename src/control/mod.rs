//! The control API: HTTP+JSON over a unix socket (0600, in the state directory by default),
//! for the operator's own tools and the `sluice grant` commands. Versioned paths:
//!
//! - `GET /v1/ca`: the grants CA's public line and fingerprint
//! - `GET /v1/grants[?all=true]`, `POST /v1/grants`, `GET|DELETE /v1/grants/ID`
//! - `GET /v1/sessions`, `GET|DELETE /v1/sessions/ID`: live SSH sessions (`sessions`)
//! - `GET /v1/locks`, `POST /v1/locks`, `DELETE /v1/locks/ID` (`lock`)
//! - `GET /v1/openapi.json`: this API, described (docs/openapi.json)
//! - `/ui`: the admin page (`page`), on TCP only, with its own login
//!
//! Errors are `{"error": {"code", "message", "field"?}}` with a 4xx naming the field at fault.
//! Whoever can open the socket may use the API: the file's mode is the access control. On TCP
//! (`[control] listen`), TLS with the `[tls]` certificates and a bearer token from
//! `[control] tokens` on every request ([`tokens`]).

mod page;
pub mod tokens;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::grant::{Grants, IssueError, IssueRequest, RevokeError};
use crate::lock::{LockError, LockRequest, Locks};
use tokens::Tokens;

/// The control socket's file name in the state directory.
pub const SOCKET: &str = "control.sock";

/// The control socket's path: `[control] socket`, else `control.sock` in `state_dir`.
pub fn socket_path(settings: &crate::config::ControlSettings, state_dir: &Path) -> PathBuf {
    settings
        .socket
        .clone()
        .unwrap_or_else(|| state_dir.join(SOCKET))
}

/// A TLS handshake on the TCP listener must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who may call: whoever opened the socket, or a caller on TCP with a token.
#[derive(Clone)]
enum Caller {
    Socket,
    Tcp {
        tokens: Arc<Tokens>,
        peer: std::net::SocketAddr,
    },
}

/// A request body larger than this is refused (413).
const MAX_BODY: usize = 64 * 1024;
/// Connections served at once (more wait to be accepted).
const MAX_CONNECTIONS: usize = 32;
/// A request head must arrive within this; a whole exchange within `EXCHANGE`.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const EXCHANGE: Duration = Duration::from_secs(30);

/// The API's description, served at `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// Binds the control socket at `path` (0600). A socket file left by a sluice that is gone is
/// replaced; one a running process answers on is not.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::state::ensure_dir(dir)?;
    }
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way (not removed)",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process answers on it (a sluice already running?)",
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Made 0600 from the start (umask 077 around the bind), not chmod'ed after: nobody else
    // can connect in between. The umask is the process's, and this runs once, at start.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let l = UnixListener::bind(path);
    rustix::process::umask(old);
    let l = l?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves the API on `listener` until `stop`; the socket file is removed then.
pub async fn serve(listener: UnixListener, path: PathBuf, api: Arc<Api>, stop: CancellationToken) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    info!(socket = %path.display(), "control API listening");
    while let Some((permit, (stream, _))) = next(&limit, &stop, || listener.accept()).await {
        let api = api.clone();
        tokio::spawn(async move {
            serve_conn(stream, api, Caller::Socket).await;
            drop(permit);
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// The next connection of either listener, with its slot: at most `MAX_CONNECTIONS` at once,
/// more wait in the listen backlog (not dropped); `None` once `stop` fires.
async fn next<T, F, Fut>(
    limit: &Arc<Semaphore>,
    stop: &CancellationToken,
    mut accept: F,
) -> Option<(tokio::sync::OwnedSemaphorePermit, T)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = io::Result<T>>,
{
    let permit = tokio::select! {
        p = limit.clone().acquire_owned() => p.ok()?,
        () = stop.cancelled() => return None,
    };
    loop {
        tokio::select! {
            r = accept() => match r {
                Ok(c) => return Some((permit, c)),
                Err(e) => {
                    warn!(error = %e, "control API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = stop.cancelled() => return None,
        }
    }
}

/// The rustls config of the TCP listener: the `[tls]` certificates (reloads included), HTTP/1.1.
pub fn tls_config(
    certs: Arc<crate::tls::CertStore>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut c = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// Serves the API on TCP with TLS, each request with a bearer token from `tokens`, until `stop`.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    tokens: Arc<Tokens>,
    api: Arc<Api>,
    stop: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    if let Ok(a) = listener.local_addr() {
        info!(listen = %a, "control API listening on TCP (TLS, bearer tokens)");
    }
    while let Some((permit, (stream, peer))) = next(&limit, &stop, || listener.accept()).await {
        let (api, acceptor, tokens) = (api.clone(), acceptor.clone(), tokens.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => serve_conn(tls, api, Caller::Tcp { tokens, peer }).await,
                Ok(Err(e)) => debug!(%peer, error = %e, "control API: TLS handshake failed"),
                Err(_) => debug!(%peer, "control API: TLS handshake timed out"),
            }
            drop(permit);
        });
    }
}

/// One connection: HTTP/1.1 with bounded heads, bodies and time.
async fn serve_conn<S>(stream: S, api: Arc<Api>, caller: Caller)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let (api, caller) = (api.clone(), caller.clone());
        async move { Ok::<_, std::convert::Infallible>(authorized(req, api, caller).await) }
    });
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_BODY);
    let conn = b.serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(EXCHANGE, conn).await;
}

/// Checks the caller's token (on TCP), then answers; changes are logged with who asked.
async fn authorized(
    req: Request<Incoming>,
    api: Arc<Api>,
    caller: Caller,
) -> Response<Full<Bytes>> {
    // The admin page has its own login (a cookie), on TCP only: a browser cannot reach the socket.
    if req.uri().path() == "/ui" || req.uri().path().starts_with("/ui/") {
        return match &caller {
            Caller::Tcp { tokens, peer } => page::handle(req, &api, tokens, *peer).await,
            Caller::Socket => error(
                StatusCode::NOT_FOUND,
                "not_found",
                None,
                "the admin page is served on [control] listen (TCP with TLS), not on the socket"
                    .into(),
            ),
        };
    }
    let who = match &caller {
        Caller::Socket => "the control socket".to_string(),
        Caller::Tcp { tokens, peer } => {
            let presented = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            match presented.and_then(|t| tokens.check(t)) {
                Some(name) => format!("token {name} from {peer}"),
                None => {
                    warn!(target: "sluice::control", %peer, presented = presented.is_some(), "control API: refused a request without a valid bearer token");
                    crate::metrics::count(&crate::metrics::get().control_refused, "unauthorized");
                    let mut r = error(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        None,
                        "a valid bearer token is required (Authorization: Bearer TOKEN)".into(),
                    );
                    r.headers_mut().insert(
                        http::header::WWW_AUTHENTICATE,
                        http::HeaderValue::from_static("Bearer realm=\"sluice\""),
                    );
                    return r;
                }
            }
        }
    };
    let (method, path) = (req.method().clone(), crate::text::clean(req.uri().path()));
    let resp = handle(req, &api, &who).await;
    if method != Method::GET {
        info!(target: "sluice::control", method = %method, path, status = resp.status().as_u16(), by = who, "control API request");
    }
    resp
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec_pretty(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(
    status: StatusCode,
    code: &str,
    field: Option<&str>,
    message: String,
) -> Response<Full<Bytes>> {
    json(
        status,
        &ErrorBody {
            error: ErrorDetail {
                code,
                message,
                field,
            },
        },
    )
}

/// The field a serde_json error names (`missing field \`device\``, `unknown field \`x\``).
fn named_field(e: &serde_json::Error) -> Option<String> {
    let text = e.to_string();
    // Only these name a field; a syntax error's backticks quote the expected token.
    if !(text.starts_with("missing field") || text.starts_with("unknown field")) {
        return None;
    }
    let start = text.find('`')? + 1;
    let len = text[start..].find('`')?;
    Some(text[start..start + len].to_string())
}

/// Reads a JSON body of at most [`MAX_BODY`] as `T`; a 4xx naming the field otherwise.
async fn body_json<T: serde::de::DeserializeOwned>(
    body: Incoming,
    what: &str,
) -> Result<T, Response<Full<Bytes>>> {
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                None,
                format!("the request body is over {MAX_BODY} bytes"),
            ))
        }
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                None,
                format!("reading the request body: {e}"),
            ))
        }
    };
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // The path names a field whose value is wrong (`ttl`); a missing or unknown field is
        // named in the message only.
        let path = e.path().to_string();
        let e = e.into_inner();
        let field = if path == "." {
            named_field(&e)
        } else {
            Some(path)
        };
        error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            field.as_deref(),
            format!("the body is not {what}: {e}"),
        )
    })
}

/// What the API serves: grants (with `[grants]`), live sessions, locks.
#[derive(Clone)]
pub struct Api {
    /// `[grants]`, if on.
    pub grants: Option<Arc<Grants>>,
    /// Locks (with a store).
    pub locks: Option<Arc<Locks>>,
    /// The live tunnels, for the sessions that hold them.
    pub tunnels: crate::admin::TunnelList,
}

impl Api {
    /// Every live session with the tunnels it holds, and connection counts per route.
    pub fn sessions(&self) -> crate::sessions::Snapshot {
        let mut snap = crate::sessions::table().snapshot();
        let tunnels = (self.tunnels)();
        for s in &mut snap.sessions {
            s.tunnels = tunnels
                .iter()
                .filter(|t| t.session == s.id)
                .cloned()
                .collect();
        }
        snap
    }
}

fn off(what: &str, table: &str) -> Response<Full<Bytes>> {
    error(
        StatusCode::NOT_FOUND,
        "not_enabled",
        None,
        format!("{what} are not enabled on this server (add a {table} table)"),
    )
}

fn bad_session_id(id: &str) -> Response<Full<Bytes>> {
    error(
        StatusCode::BAD_REQUEST,
        "bad_request",
        Some("id"),
        format!("session ids are numbers, not {}", crate::text::clean(id)),
    )
}

async fn handle(req: Request<Incoming>, api: &Api, who: &str) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().trim_end_matches('/').to_string();
    let mut all = false;
    for kv in parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
    {
        all = match kv {
            "all=true" | "all=1" => true,
            "all=false" | "all=0" => false,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    Some("all"),
                    format!(
                        "unknown query parameter `{}` (all=true or all=false)",
                        crate::text::clean(kv)
                    ),
                )
            }
        };
    }
    let method = parts.method.clone();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let grants = api.grants.as_ref();
    let resp = match (&method, segments.as_slice()) {
        (&Method::GET, ["v1", "openapi.json"]) => {
            let mut r = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            r
        }
        (&Method::GET, ["v1", "sessions"]) => json(StatusCode::OK, &api.sessions()),
        (&Method::GET, ["v1", "sessions", id]) => match id.parse::<u64>() {
            Ok(n) => match api.sessions().sessions.into_iter().find(|s| s.id == n) {
                Some(s) => json(StatusCode::OK, &s),
                None => no_session(n),
            },
            Err(_) => bad_session_id(id),
        },
        (&Method::DELETE, ["v1", "sessions", id]) => match id.parse::<u64>() {
            Ok(n) => match crate::sessions::table().kill(n, who) {
                Ok(s) => json(StatusCode::OK, &serde_json::json!({ "session": s })),
                Err(crate::sessions::KillError::NotFound(n)) => no_session(n),
            },
            Err(_) => bad_session_id(id),
        },
        (_, ["v1", "locks", ..]) if api.locks.is_none() => off("locks", "[store]"),
        (&Method::GET, ["v1", "locks"]) => match &api.locks {
            Some(l) => json(StatusCode::OK, &serde_json::json!({ "locks": l.list() })),
            None => off("locks", "[store]"),
        },
        (&Method::POST, ["v1", "locks"]) => {
            let req: LockRequest = match body_json(body, "a lock request").await {
                Ok(r) => r,
                Err(r) => return r,
            };
            let Some(locks) = api.locks.clone() else {
                return off("locks", "[store]");
            };
            let by = who.to_string();
            let added = tokio::task::spawn_blocking(move || locks.add(&req, &by)).await;
            match added {
                Ok(Ok((l, n))) => json(
                    StatusCode::CREATED,
                    &serde_json::json!({ "lock": l, "sessions_ended": n }),
                ),
                Ok(Err(LockError::Field { field, message })) => {
                    error(StatusCode::BAD_REQUEST, "bad_request", Some(field), message)
                }
                Ok(Err(e)) => internal(&e.to_string()),
                Err(e) => internal(&format!("the lock task failed: {e}")),
            }
        }
        (&Method::DELETE, ["v1", "locks", id]) => {
            let Some(locks) = api.locks.clone() else {
                return off("locks", "[store]");
            };
            let (id, by) = (id.to_string(), who.to_string());
            match tokio::task::spawn_blocking(move || locks.lift(&id, &by)).await {
                Ok(Ok(l)) => json(StatusCode::OK, &serde_json::json!({ "lock": l })),
                Ok(Err(e @ LockError::NotFound(_))) => {
                    error(StatusCode::NOT_FOUND, "not_found", None, e.to_string())
                }
                Ok(Err(e)) => internal(&e.to_string()),
                Err(e) => internal(&format!("the lock task failed: {e}")),
            }
        }
        (_, ["v1", "grants", ..] | ["v1", "ca"]) if grants.is_none() => off("grants", "[grants]"),
        (&Method::GET, ["v1", "ca"]) => match grants {
            Some(g) => json(
                StatusCode::OK,
                &serde_json::json!({
                    "public_key": g.ca().public_line(),
                    "fingerprint": g.ca().fingerprint(),
                }),
            ),
            None => off("grants", "[grants]"),
        },
        (&Method::GET, ["v1", "grants"]) => match grants.map(|g| g.list(all)) {
            Some(Ok(list)) => json(StatusCode::OK, &serde_json::json!({ "grants": list })),
            Some(Err(e)) => internal(&e.to_string()),
            None => off("grants", "[grants]"),
        },
        (&Method::POST, ["v1", "grants"]) => {
            let req: IssueRequest = match body_json(body, "a grant request").await {
                Ok(r) => r,
                Err(r) => return r,
            };
            let Some(grants) = grants else {
                return off("grants", "[grants]");
            };
            // Signing and the store's transaction are short but blocking.
            match issue(grants.clone(), req, who.to_string()).await {
                Ok(issued) => json(StatusCode::CREATED, &issued),
                Err(IssueError::Field { field, message }) => {
                    error(StatusCode::BAD_REQUEST, "bad_request", Some(field), message)
                }
                Err(IssueError::Conflict { field, message }) => {
                    error(StatusCode::CONFLICT, "conflict", Some(field), message)
                }
                Err(e @ IssueError::NoFreePort(_)) => {
                    let mut r = error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no_free_port",
                        Some("port"),
                        e.to_string(),
                    );
                    r.headers_mut().insert(
                        http::header::RETRY_AFTER,
                        http::HeaderValue::from_static("60"),
                    );
                    r
                }
                Err(e) => internal(&e.to_string()),
            }
        }
        (&Method::GET, ["v1", "grants", id]) => match grants.map(|g| g.get(id)) {
            Some(Ok(Some(g))) => json(StatusCode::OK, &g),
            Some(Ok(None)) => not_found(id),
            Some(Err(e)) => internal(&e.to_string()),
            None => off("grants", "[grants]"),
        },
        (&Method::DELETE, ["v1", "grants", id]) => match grants.map(|g| g.revoke(id)) {
            Some(Ok((g, n))) => json(
                StatusCode::OK,
                &serde_json::json!({ "grant": g, "sessions_ended": n }),
            ),
            Some(Err(RevokeError::NotFound(_))) => not_found(id),
            Some(Err(e @ RevokeError::NotLive(_))) => {
                error(StatusCode::CONFLICT, "conflict", None, e.to_string())
            }
            Some(Err(e)) => internal(&e.to_string()),
            None => off("grants", "[grants]"),
        },
        (
            _,
            ["v1", "grants" | "sessions" | "locks"]
            | ["v1", "grants" | "sessions" | "locks", _]
            | ["v1", "ca"]
            | ["v1", "openapi.json"],
        ) => {
            let allow = match segments.as_slice() {
                ["v1", "grants" | "locks"] => "GET, POST",
                ["v1", "grants" | "sessions", _] => "GET, DELETE",
                ["v1", "locks", _] => "DELETE",
                _ => "GET",
            };
            let mut r = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                None,
                format!("{method} is not allowed on {}", crate::text::clean(&path)),
            );
            r.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
            r
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            None,
            format!("no such path {}", crate::text::clean(&path)),
        ),
    };
    debug!(target: "sluice::control", method = %method, path = crate::text::clean(&path), status = resp.status().as_u16(), "control API request");
    resp
}

fn no_session(id: u64) -> Response<Full<Bytes>> {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        None,
        format!("no live session {id}"),
    )
}

async fn issue(
    grants: Arc<Grants>,
    req: IssueRequest,
    by: String,
) -> Result<crate::grant::Issued, IssueError> {
    tokio::task::spawn_blocking(move || grants.issue(&req, &by))
        .await
        .unwrap_or_else(|e| Err(IssueError::Sign(format!("the issuing task failed: {e}"))))
}

fn not_found(id: &str) -> Response<Full<Bytes>> {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        None,
        format!("no grant {}", crate::text::clean(id)),
    )
}

fn internal(e: &str) -> Response<Full<Bytes>> {
    warn!(target: "sluice::control", error = e, "control API: request failed");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        None,
        e.to_string(),
    )
}

/// Why the CLI's request did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("{}: {source}\n  is sluice running (sluice serve), and may this user open its control socket?", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The exchange failed midway.
    #[error("control API: {0}")]
    Http(String),
}

/// One request to the control socket at `path`: (status, body).
pub async fn request(
    path: &Path,
    method: Method,
    uri: &str,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Vec<u8>), ClientError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header(http::header::HOST, "sluice");
    if body.is_some() {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?
        .to_bytes();
    Ok((status, bytes.to_vec()))
}
