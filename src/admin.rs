//! The admin listener: `/livez`, `/readyz` (503 while draining) and `/metrics`, plus the client
//! side used by `sluice healthcheck`. A deliberately tiny HTTP/1 server: GET only, one request
//! per connection, bounded in time, bytes and concurrency.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// A request must arrive and its answer be written within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Admin connections served at once; more get an immediate 503.
const MAX_CONCURRENT: usize = 64;
/// How long a "busy" answer may take.
const BUSY_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether the server takes new connections: false from the first shutdown signal on.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Ready.
    pub fn ready() -> Readiness {
        Readiness(Arc::new(AtomicBool::new(true)))
    }

    /// `/readyz` answers 503 from now on.
    pub fn set_draining(&self) {
        self.0.store(false, Ordering::SeqCst);
        crate::metrics::get().draining.set(1);
    }

    /// Ready or not (`sluice tunnel`: while connected).
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A heartbeat older than this means its runtime is stuck.
const STALE: Duration = Duration::from_secs(10);

/// Whether the runtimes that serve connections are alive: each ticks a [`Heartbeat`].
#[derive(Clone)]
pub struct Liveness(Arc<LivenessInner>);

struct LivenessInner {
    epoch: tokio::time::Instant,
    beats: std::sync::Mutex<Vec<Arc<std::sync::atomic::AtomicU64>>>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness(Arc::new(LivenessInner {
            epoch: tokio::time::Instant::now(),
            beats: std::sync::Mutex::new(Vec::new()),
        }))
    }
}

impl Liveness {
    /// A heartbeat for one more runtime.
    pub fn register(&self) -> Heartbeat {
        let cell = Arc::new(std::sync::atomic::AtomicU64::new(self.now_ms()));
        self.0
            .beats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(cell.clone());
        Heartbeat {
            cell,
            liveness: self.clone(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.0.epoch.elapsed().as_millis() as u64
    }

    /// Whether every registered runtime ticked recently.
    pub fn is_live(&self) -> bool {
        let now = self.now_ms();
        let stale = STALE.as_millis() as u64;
        self.0
            .beats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .all(|t| t == RETIRED || now.saturating_sub(t) < stale)
    }
}

/// A heartbeat that has stopped on purpose (its runtime finished).
const RETIRED: u64 = u64::MAX;

/// One runtime's heartbeat: [`Heartbeat::run`] ticks it every second on that runtime.
pub struct Heartbeat {
    cell: Arc<std::sync::atomic::AtomicU64>,
    liveness: Liveness,
}

impl Heartbeat {
    /// Ticks until dropped (then it counts as retired, not stuck).
    pub async fn run(self) {
        loop {
            self.cell.store(self.liveness.now_ms(), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.cell.store(RETIRED, Ordering::Relaxed);
    }
}

/// Binds the admin address (a failure is reported at start, like the main listeners).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(64)?;
    TcpListener::from_std(s.into())
}

/// The live tunnels now, for `/tunnels` (the server's registry, as a reload left it).
pub type TunnelList = Arc<dyn Fn() -> Vec<crate::tunnel::LiveTunnel> + Send + Sync>;

/// Serves admin requests until `stop` is cancelled; `/tunnels` when `tunnels` is given.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    liveness: Liveness,
    stop: CancellationToken,
    tunnels: TunnelList,
) {
    if let Ok(a) = listener.local_addr() {
        info!(admin = %a, "admin endpoint: /livez /readyz /metrics /tunnels");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT));
    let busy = Arc::new(Semaphore::new(MAX_CONCURRENT));
    loop {
        let (mut stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Full: answer 503 at once rather than leave probes waiting behind slow clients (and
        // if even the "busy" answers are all taken, just close).
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let Ok(busy_permit) = busy.clone().try_acquire_owned() else {
                continue;
            };
            tokio::spawn(async move {
                let _ = tokio::time::timeout(BUSY_TIMEOUT, busy_answer(&mut stream)).await;
                drop(busy_permit);
            });
            continue;
        };
        let (readiness, liveness, tunnels) = (readiness.clone(), liveness.clone(), tunnels.clone());
        tokio::spawn(async move {
            let answer = answer(stream, &readiness, &liveness, &tunnels);
            if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
                debug!(%peer, error = %e, "admin request timed out");
            }
            drop(permit);
        });
    }
}

async fn answer(
    mut s: TcpStream,
    readiness: &Readiness,
    liveness: &Liveness,
    tunnels: &TunnelList,
) {
    use crate::builtin::{read_head, request_line, respond, TEXT};
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    let head = match read_head(&mut s, &[], deadline).await {
        Ok(h) => h,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            let _ = respond(
                &mut s,
                "431 Request Header Fields Too Large",
                TEXT,
                "",
                "request too large\n",
                false,
            )
            .await;
            let _ = s.shutdown().await;
            return;
        }
        Err(_) => return,
    };
    let (method, target) = request_line(&head).unwrap_or(("", ""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let _ = respond(
            &mut s,
            "405 Method Not Allowed",
            TEXT,
            "",
            "only GET\n",
            false,
        )
        .await;
        let _ = s.shutdown().await;
        return;
    }
    const OK: &str = "200 OK";
    const UNAVAILABLE: &str = "503 Service Unavailable";
    let (status, ctype, body) = match path {
        "/livez" if liveness.is_live() => (OK, TEXT, "ok\n".to_string()),
        "/livez" => (UNAVAILABLE, TEXT, "a worker runtime is stuck\n".to_string()),
        "/readyz" if readiness.is_ready() => (OK, TEXT, "ready\n".to_string()),
        "/readyz" => (UNAVAILABLE, TEXT, "draining\n".to_string()),
        "/metrics" => (
            OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            crate::metrics::get().encode(),
        ),
        "/tunnels" => (
            OK,
            "application/json",
            serde_json::to_string(&tunnels()).unwrap_or_else(|_| "[]".into()) + "\n",
        ),
        _ => (
            "404 Not Found",
            TEXT,
            "not found; try /livez, /readyz, /metrics or /tunnels\n".to_string(),
        ),
    };
    let _ = respond(&mut s, status, ctype, "", &body, head_only).await;
    let _ = s.shutdown().await;
}

/// Reads the request (closing on unread bytes would reset the connection and lose the
/// answer), then says 503.
async fn busy_answer(s: &mut TcpStream) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    let _ = crate::builtin::read_head(s, &[], deadline).await;
    let _ = crate::builtin::respond(
        s,
        "503 Service Unavailable",
        crate::builtin::TEXT,
        "",
        "busy\n",
        false,
    )
    .await;
    let _ = s.shutdown().await;
}

/// What `sluice healthcheck` found.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// Nothing answered.
    #[error("cannot reach the admin endpoint at {addr}: {source}")]
    Unreachable {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// It answered, but not 200.
    #[error("{path} at {addr} answered: {status}")]
    NotOk {
        /// Where.
        addr: SocketAddr,
        /// Which endpoint.
        path: &'static str,
        /// The status line.
        status: String,
    },
}

/// Asks the admin endpoint at `addr` for `path` (`/readyz` or `/livez`); Ok if it answers 200.
/// Blocking and dependency-free, for exec probes in images without curl.
pub fn check(addr: SocketAddr, path: &'static str, timeout: Duration) -> Result<(), HealthError> {
    use std::io::Read;
    let mut s = request(addr, path, timeout)?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 512];
    while !reply.contains(&b'\n') && reply.len() < 4096 {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&chunk[..n]),
            Err(source) => return Err(HealthError::Unreachable { addr, source }),
        }
    }
    ok_status(&String::from_utf8_lossy(&reply), addr, path)
}

/// GETs `path` from the admin endpoint at `addr`: the body of a 200 answer (at most 16 MiB).
pub fn fetch(
    addr: SocketAddr,
    path: &'static str,
    timeout: Duration,
) -> Result<String, HealthError> {
    use std::io::Read;
    let mut reply = Vec::new();
    request(addr, path, timeout)?
        .take(16 << 20)
        .read_to_end(&mut reply)
        .map_err(|source| HealthError::Unreachable { addr, source })?;
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    ok_status(head, addr, path)?;
    Ok(body.to_string())
}

/// Connects to `addr` and sends `GET path`, with `timeout` for every step.
fn request(
    addr: SocketAddr,
    path: &'static str,
    timeout: Duration,
) -> Result<std::net::TcpStream, HealthError> {
    use std::io::Write;
    let unreachable = |source| HealthError::Unreachable { addr, source };
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(unreachable)?;
    s.set_read_timeout(Some(timeout)).map_err(unreachable)?;
    s.set_write_timeout(Some(timeout)).map_err(unreachable)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(unreachable)?;
    Ok(s)
}

/// Ok if the answer's status line (the first of `head`) says 200.
fn ok_status(head: &str, addr: SocketAddr, path: &'static str) -> Result<(), HealthError> {
    let status = head.lines().next().unwrap_or("").trim().to_string();
    if status.split_whitespace().nth(1) == Some("200") {
        return Ok(());
    }
    Err(HealthError::NotOk {
        addr,
        path,
        status: if status.is_empty() {
            "nothing".into()
        } else {
            status
        },
    })
}

/// The address to probe for a listen address: a wildcard becomes loopback.
pub fn probe_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}
