//! Shared helpers: test certificates, a daemon started in-process on 127.0.0.1:0, test
//! upstreams and clients.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};
use sluice::config::Config;
use sluice::server::Server;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Fails the test with what to install when a real client is missing.
pub fn need(tool: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "this test needs `{tool}`: apt-get install -y {package} (scripts/test installs it)"
    );
}

/// A certificate and key written as PEM into a temporary directory.
pub struct TestCert {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
}

impl TestCert {
    /// A self-signed ECDSA P-256 certificate for `names`.
    pub fn new(names: &[&str]) -> TestCert {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        TestCert {
            der: ck.cert.der().clone(),
            dir,
            cert,
            key,
        }
    }

    /// The default test certificate: localhost and 127.0.0.1.
    pub fn localhost() -> TestCert {
        TestCert::new(&["localhost", "127.0.0.1"])
    }
}

/// A daemon running in this process.
pub struct Daemon {
    pub addr: SocketAddr,
    pub addrs: Vec<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts sluice with `extra` TOML appended to a `listen` + `[tls]` header for `cert`.
    pub async fn start(cert: &TestCert, extra: &str) -> Daemon {
        let text = format!(
            "listen = [\"127.0.0.1:0\"]\nshutdown_grace = \"2s\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nhandshake_timeout = \"3s\"\n{extra}",
            cert.cert.display(),
            cert.key.display()
        );
        Daemon::start_raw(&text).await
    }

    /// Starts sluice with exactly this config text.
    pub async fn start_raw(text: &str) -> Daemon {
        Daemon::start_raw_in(text, None).await
    }

    /// As `start`, with its state in `state` (kept across a restart) instead of a new one.
    pub async fn start_in(state: &Path, cert: &TestCert, extra: &str) -> Daemon {
        let text = format!(
            "listen = [\"127.0.0.1:0\"]\nshutdown_grace = \"2s\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n{extra}",
            cert.cert.display(),
            cert.key.display()
        );
        Daemon::start_raw_in(&text, Some(state)).await
    }

    async fn start_raw_in(text: &str, state: Option<&Path>) -> Daemon {
        // SLUICE_TEST_LOG=debug (an EnvFilter) shows the daemons' logs on stderr, to debug.
        if let Ok(filter) = std::env::var("SLUICE_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::parse(text, None, dir.path())
            .unwrap_or_else(|e| panic!("test config: {e}\n{text}"));
        let state = state.map_or_else(|| dir.path().join("state"), Path::to_path_buf);
        let server = Server::bind(cfg, state).await.unwrap();
        let addrs = server.local_addrs();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Daemon {
            addr: addrs[0],
            addrs,
            stop: Some(tx),
            task: Some(task),
            dir,
        }
    }

    /// Asks it to stop and waits until it has.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }

    /// Triggers shutdown and returns the task to await.
    pub fn begin_stop(&mut self) -> JoinHandle<()> {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap()
    }
}

/// Waits (up to `limit`) until `f` holds, checking every few milliseconds: a state to wait
/// for, never a sleep standing in for one.
pub async fn until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + limit;
    while !f().await {
        assert!(
            std::time::Instant::now() < deadline,
            "not within {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `until` for tests on plain threads.
pub fn until_sync(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "not within {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Builds a rustls client config trusting `cert`, offering `alpn`.
pub fn client_config(cert: &TestCert, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    Arc::new(cfg)
}

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// Connects with a real rustls client: SNI `sni`, ALPN `alpn`, verifying against `cert`.
pub async fn tls_connect(addr: SocketAddr, cert: &TestCert, sni: &str, alpn: &[&str]) -> Tls {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config(cert, alpn));
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .expect("handshake timed out")
        .expect("handshake failed")
}

/// An upstream that echoes everything and shuts down its write side at EOF.
pub async fn echo_upstream() -> SocketAddr {
    serve_upstream(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

pub const BANNER: &[u8] = b"SSH-2.0-FakeUpstream\r\n";

/// A fake sshd: sends a banner at once, then echoes.
pub async fn banner_upstream() -> SocketAddr {
    serve_upstream(|mut s| async move {
        let _ = s.write_all(BANNER).await;
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// A minimal HTTP upstream: reads one request head, answers `hello-from-upstream`.
pub async fn http_upstream() -> SocketAddr {
    serve_upstream(|mut s| async move {
        let mut head = Vec::new();
        let mut b = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&b[..n]),
            }
        }
        let body = "hello-from-upstream\n";
        let _ = s
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
        let _ = s.shutdown().await;
    })
    .await
}

/// Accepts connections on 127.0.0.1:0 and runs `f` on each.
pub async fn serve_upstream<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(f(s));
        }
    });
    addr
}

/// A port with nothing listening on it: bound by a socket that never listens (connecting is
/// refused) and is kept for the rest of the process, so no other test can take the port.
pub fn dead_port() -> SocketAddr {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    std::mem::forget(s);
    addr
}

/// `n` consecutive free ports for a daemon to bind itself (`listen_ports`, an admin address).
/// They come from below the kernel's ephemeral range, so no socket bound to port 0 and no
/// outgoing connection is handed one between this check and the daemon's bind; they are
/// disjoint across the tests of this process, and start at a place derived from the process id
/// so that two test processes at once rarely meet.
pub fn reserve_ports(n: u16) -> u16 {
    use std::sync::Mutex;
    static NEXT: Mutex<Option<u16>> = Mutex::new(None);
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    const LOW: u16 = 10_000;
    assert!(
        ephemeral_low > LOW + 4 * n,
        "ephemeral ports start at {ephemeral_low}"
    );
    let span = ephemeral_low - LOW - n;
    let mut next = NEXT.lock().unwrap_or_else(|p| p.into_inner());
    let mut at = next.unwrap_or(LOW + (std::process::id() % u32::from(span)) as u16);
    for _ in 0..(span / n + 1) {
        if at + n > ephemeral_low {
            at = LOW;
        }
        let start = at;
        at += n;
        let free =
            (start..start + n).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            *next = Some(at);
            return start;
        }
    }
    panic!("no {n} consecutive free ports below {ephemeral_low}");
}

/// Reads exactly `n` bytes (or fails the test after 10 s).
pub async fn read_n<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .expect("read timed out")
        .expect("read failed");
    buf
}

/// Reads to EOF (or fails the test after 10 s).
pub async fn read_all<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("read timed out")
        .expect("read failed");
    out
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn sha256(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

/// Writes all of `data` then shuts down the write side, concurrently with reading `n` bytes.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: S, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(s);
    let write = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let read = async {
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        out
    };
    let ((), out) = tokio::join!(write, read);
    out
}

/// Path of the built binary.
pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_sluice"))
}

/// Reads until EOF or error (failing the test after `limit`); returns how long it took.
pub async fn closed_within(s: &mut TcpStream, limit: Duration) -> Duration {
    let t0 = std::time::Instant::now();
    let mut b = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit, s.read(&mut b)).await {
            Err(_) => panic!("connection still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return t0.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}
