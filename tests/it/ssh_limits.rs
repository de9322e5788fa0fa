//! The embedded SSH server's bounds on what one client can make it hold (vendor/russh): EOF and
//! request floods on a stalled channel, data after EOF, the process-wide window budget.
//!
//! A stalled channel: a `direct-tcpip` channel to a target that accepts and never reads, written
//! to until its window is gone. sluice then holds a full window (2 MiB) unread, more than its
//! relay can still push into the kernel on the way to the target (a small receive buffer and
//! MSS there), so the relay never reads that channel again and anything the client sends after
//! the data waits in the channel.
//!
//! The tests that measure the process (its RSS, the process-wide budget) run alone in a fresh
//! process of this test binary (see `alone`); the daemon runs in that process.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client;
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;

use crate::ssh::keygen;
use crate::support::*;

/// Set in the process `alone` starts, to the name of the test it runs.
const ALONE: &str = "SLUICE_TEST_ALONE";

/// Runs test `name` (its full path) alone in a fresh process of this test binary, so that the
/// process's RSS and the process-wide window budget are that test's own. Returns `true` in that
/// process (run the test's body), `false` in the one that started it (the child passed).
async fn alone(name: &str) -> bool {
    if std::env::var(ALONE).as_deref() == Ok(name) {
        return true;
    }
    let child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(ALONE, name)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), child)
        .await
        .unwrap_or_else(|_| panic!("{name} took over 300 s in its own process"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{name} failed in its own process (output above)"
    );
    false
}

/// Log lines of this process (only where `alone` runs a test: the subscriber is global).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Collects this process's logs at info level, russh's included (through `log`).
    fn capture() -> Logs {
        let logs = Logs::default();
        let w = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_ansi(false)
            .with_writer(move || w.clone())
            .try_init()
            .expect("a log subscriber was already set");
        logs
    }

    /// The first line containing `needle`, waiting up to `limit` for it.
    async fn line_with(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
            if let Some(l) = text.lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no log line containing `{needle}` within {limit:?}; the log:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A target that accepts and never reads. Its receive buffer and MSS are small, so that the
/// kernel takes little (tens of KiB) on the way to it.
async fn stuck_target() -> (SocketAddr, UnboundedReceiver<TcpStream>) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mss: libc::c_int = 536;
    // SAFETY: a valid socket and a c_int option value of the size given.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            (&mss as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_MAXSEG: {}", std::io::Error::last_os_error());
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(16).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = tx.send(s);
        }
    });
    (addr, rx)
}

/// sluice with the embedded SSH server; `-W`/`-L` may go to an echo server and the stuck target.
struct Setup {
    d: Daemon,
    key: PathBuf,
    echo: SocketAddr,
    stuck: SocketAddr,
    held: UnboundedReceiver<TcpStream>,
    cert: TestCert,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    let authorized = dir.path().join("authorized_keys");
    std::fs::write(&authorized, format!("{}\n", id.public)).unwrap();
    let echo = echo_upstream().await;
    let (stuck, held) = stuck_target().await;
    let cert = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &format!(
            "[routes.ssh]\n[ssh]\nauthorized_keys = [\"{}\"]\npermit_open = [\"{echo}\", \"{stuck}\"]\n",
            authorized.display()
        ),
    )
    .await;
    Setup {
        d,
        key: id.private,
        echo,
        stuck,
        held,
        cert,
        _dir: dir,
    }
}

/// What the server said when it disconnected: (reason code, description).
type Goodbye = Arc<Mutex<Option<(russh::Disconnect, String)>>>;

struct Peer(Goodbye);

impl client::Handler for Peer {
    type Error = russh::Error;

    async fn check_server_key(&mut self, _: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }

    async fn disconnected(
        &mut self,
        reason: client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        if let client::DisconnectReason::ReceivedDisconnect(info) = reason {
            *self.0.lock().unwrap() = Some((info.reason_code, info.message));
        }
        Ok(())
    }
}

/// A russh client logged in to sluice through its TLS port.
struct Client {
    handle: client::Handle<Peer>,
    goodbye: Goodbye,
}

impl Client {
    async fn connect(s: &Setup) -> Client {
        let tls = tls_connect(s.d.addr, &s.cert, "localhost", &[]).await;
        let goodbye = Goodbye::default();
        let config = Arc::new(client::Config::default());
        let mut handle = client::connect_stream(config, tls, Peer(goodbye.clone()))
            .await
            .expect("SSH handshake with sluice");
        let key = russh::keys::load_secret_key(&s.key, None).unwrap();
        let auth = handle
            .authenticate_publickey("tunnel", PrivateKeyWithHashAlg::new(Arc::new(key), None))
            .await
            .unwrap();
        assert!(auth.success(), "sluice refused the key: {auth:?}");
        Client { handle, goodbye }
    }

    async fn open(&self, to: SocketAddr) -> russh::Channel<client::Msg> {
        self.handle
            .channel_open_direct_tcpip(to.ip().to_string(), u32::from(to.port()), "127.0.0.1", 0)
            .await
            .unwrap_or_else(|e| panic!("direct-tcpip to {to}: {e}"))
    }
}

/// A channel to the stuck target, written to until its window is gone (see the module doc).
struct Stalled {
    read: ChannelReadHalf,
    write: Arc<ChannelWriteHalf<client::Msg>>,
    _target: TcpStream,
}

impl Stalled {
    async fn open(s: &mut Setup, c: &Client) -> Stalled {
        let (read, write) = c.open(s.stuck).await.split();
        let target = tokio::time::timeout(Duration::from_secs(10), s.held.recv())
            .await
            .expect("sluice did not connect to the stuck target")
            .unwrap();
        let write = Arc::new(write);
        let w = write.clone();
        let filler = tokio::spawn(async move {
            let chunk = bytes::Bytes::from(vec![7u8; 32 << 10]);
            while w.data_bytes(chunk.clone()).await.is_ok() {}
        });
        let w = &write;
        until(
            "the stalled channel's window is used up",
            Duration::from_secs(30),
            || async move { w.writable_packet_size().await == 0 },
        )
        .await;
        // Nothing more: data after the EOFs to come would be a protocol violation.
        filler.abort();
        let _ = filler.await;
        Stalled {
            read,
            write,
            _target: target,
        }
    }
}

/// Keeps an echo channel busy with small round trips until `stop`; returns how many completed
/// and the slowest.
fn keep_echoing(
    mut echo: russh::ChannelStream<client::Msg>,
    stop: Arc<tokio::sync::Notify>,
) -> JoinHandle<(u64, Duration)> {
    tokio::spawn(async move {
        let (mut n, mut slowest) = (0u64, Duration::ZERO);
        let stopped = stop.notified();
        tokio::pin!(stopped);
        loop {
            let msg = format!("ping {n:08}\n");
            let t = Instant::now();
            let trip = async {
                echo.write_all(msg.as_bytes()).await.unwrap();
                let mut back = vec![0u8; msg.len()];
                echo.read_exact(&mut back).await.unwrap();
                assert_eq!(back, msg.as_bytes());
            };
            tokio::select! {
                () = &mut stopped => return (n, slowest),
                r = tokio::time::timeout(Duration::from_secs(10), trip) => {
                    r.expect("an echo round trip on another session took over 10 s");
                }
            }
            n += 1;
            slowest = slowest.max(t.elapsed());
        }
    })
}

/// EOFs the flood sends. Without the bound each one waited in the channel's backlog, about
/// 80 bytes apiece: 600,000 grew the process by about 47 MiB.
const FLOOD: usize = 600_000;

/// How much the process may grow during the flood (with the bound: 1-2 MiB).
const RSS_BOUND_KIB: u64 = 16 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eof_flood_on_a_stalled_channel_leaves_memory_bounded_and_others_flowing() {
    if !alone(
        "ssh_limits::an_eof_flood_on_a_stalled_channel_leaves_memory_bounded_and_others_flowing",
    )
    .await
    {
        return;
    }
    let logs = Logs::capture();
    let mut s = setup().await;

    // Another session, forwarding all along.
    let other = Client::connect(&s).await;
    let echo = other.open(s.echo).await.into_stream();
    let stop = Arc::new(tokio::sync::Notify::new());
    let echoing = keep_echoing(echo, stop.clone());

    let flood = Client::connect(&s).await;
    let stalled = Stalled::open(&mut s, &flood).await;
    let rss_before = rss_kib();
    let t = Instant::now();
    for _ in 0..FLOOD {
        stalled.write.eof().await.unwrap();
    }
    // The server answers a ping only after it has handled every EOF before it.
    tokio::time::timeout(Duration::from_secs(120), flood.handle.send_ping())
        .await
        .expect("the flooding connection stopped answering")
        .expect("the flooding connection was ended");
    let took = t.elapsed();
    let rss_after = rss_kib();
    stop.notify_one();
    let (trips, slowest) = echoing.await.unwrap();
    let grew = rss_after.saturating_sub(rss_before);
    println!(
        "EOF flood: {FLOOD} EOFs on a stalled channel in {took:.1?}; RSS {rss_before} -> \
         {rss_after} KiB (+{grew} KiB, bound {RSS_BOUND_KIB} KiB); the other session made \
         {trips} echo round trips meanwhile, the slowest {slowest:.1?}"
    );
    assert!(
        grew < RSS_BOUND_KIB,
        "the EOF flood grew the process by {grew} KiB"
    );
    // (One session's flood of small packets kept its runtime thread for seconds before the
    // session loop counted against tokio's task budget.)
    assert!(
        trips >= 10 && slowest < Duration::from_secs(2),
        "the other session stalled during the flood: {trips} round trips, the slowest {slowest:?}"
    );
    // The excess EOFs were dropped, said once; the flooding connection itself is fine.
    let line = logs
        .line_with("duplicate CHANNEL_EOF dropped", Duration::from_secs(5))
        .await;
    assert!(line.contains("WARN"), "{line}");
    assert!(flood.goodbye.lock().unwrap().is_none());
    let again = flood.open(s.echo).await.into_stream();
    assert_eq!(
        exchange(again, b"after the flood").await,
        b"after the flood"
    );

    drop((stalled, flood, other));
    s.d.stop().await;
    // Everything the sessions held of the window budget came back.
    until(
        "the window budget is all given back",
        Duration::from_secs(10),
        || async { russh::server::window_budget_in_use() == 0 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_a_stalled_channel_never_block_the_connection() {
    let mut s = setup().await;
    let c = Client::connect(&s).await;
    let mut echo = c.open(s.echo).await.into_stream();
    let mut stalled = Stalled::open(&mut s, &c).await;
    // Far more requests than the channel's queue holds: upstream russh waited for room in it,
    // and the whole connection (its other channels, keepalives) with it.
    for _ in 0..2_000 {
        stalled.write.window_change(80, 24, 0, 0).await.unwrap();
    }
    // The same connection's other channel still forwards.
    let back = tokio::time::timeout(Duration::from_secs(10), async {
        echo.write_all(b"still forwarding").await.unwrap();
        let mut b = [0u8; 16];
        echo.read_exact(&mut b).await.unwrap();
        b
    })
    .await
    .expect("the connection stalled behind the stalled channel's requests");
    assert_eq!(&back, b"still forwarding");
    // A request past the stalled channel's cap is refused, not left unanswered.
    stalled.write.set_env(true, "LANG", "C").await.unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stalled.read.wait().await {
                Some(ChannelMsg::Failure) => return,
                Some(_) => continue,
                None => panic!("the stalled channel was closed"),
            }
        }
    })
    .await;
    assert!(
        refused.is_ok(),
        "a request past the stalled channel's cap was not refused"
    );
    drop((stalled, echo, c));
    s.d.stop().await;
}

#[tokio::test]
async fn data_after_eof_ends_the_connection_with_a_protocol_error() {
    let s = setup().await;
    let c = Client::connect(&s).await;
    let ch = c.open(s.echo).await;
    ch.eof().await.unwrap();
    ch.data(&b"too late"[..]).await.unwrap();
    let goodbye = &c.goodbye;
    until(
        "sluice disconnects the client",
        Duration::from_secs(10),
        || async move { goodbye.lock().unwrap().is_some() },
    )
    .await;
    let (code, why) = c.goodbye.lock().unwrap().take().unwrap();
    assert!(
        matches!(code, russh::Disconnect::ProtocolError),
        "{code:?}: {why}"
    );
    assert!(
        why.starts_with("data after CHANNEL_EOF on channel "),
        "{why}"
    );
    let handle = &c.handle;
    until(
        "the connection ends",
        Duration::from_secs(10),
        || async move { handle.is_closed() },
    )
    .await;
    s.d.stop().await;
}

/// A russh server holding every direct-tcpip channel it is offered, unread.
#[derive(Clone, Default)]
struct Hoard(Arc<Mutex<Vec<russh::Channel<russh::server::Msg>>>>);

impl russh::server::Handler for Hoard {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _: &str,
        _: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<russh::server::Auth, Self::Error> {
        Ok(russh::server::Auth::Accept)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: russh::Channel<russh::server::Msg>,
        _: &str,
        _: u32,
        _: &str,
        _: u32,
        reply: russh::server::ChannelOpenHandle,
        _: &mut russh::server::Session,
    ) -> Result<(), Self::Error> {
        self.0.lock().unwrap().push(channel);
        reply.accept().await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_budget_is_shared_by_all_sessions() {
    if !alone("ssh_limits::the_window_budget_is_shared_by_all_sessions").await {
        return;
    }
    const WINDOW: u32 = 64 << 10;
    const BUDGET: usize = 3 * WINDOW as usize;
    let dir = tempfile::tempdir().unwrap();
    let host = russh::keys::load_secret_key(keygen(dir.path(), "host").private, None).unwrap();
    let user = keygen(dir.path(), "user").private;
    let config = Arc::new(russh::server::Config {
        keys: vec![host],
        window_size: WINDOW,
        window_budget: BUDGET,
        auth_rejection_time: Duration::ZERO,
        inactivity_timeout: None,
        ..Default::default()
    });
    let hoard = Hoard::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (cfg, h) = (config.clone(), hoard.clone());
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let session = russh::server::run_stream(cfg.clone(), tcp, h.clone())
                .await
                .unwrap();
            tokio::spawn(session);
        }
    });
    // A client Handle is itself a future (the session's end); it is returned, not awaited.
    #[allow(clippy::async_yields_async)]
    let login = || async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut handle = client::connect_stream(
            Arc::new(client::Config::default()),
            tcp,
            Peer(Goodbye::default()),
        )
        .await
        .unwrap();
        let key = russh::keys::load_secret_key(&user, None).unwrap();
        let auth = handle
            .authenticate_publickey("u", PrivateKeyWithHashAlg::new(Arc::new(key), None))
            .await
            .unwrap();
        assert!(auth.success());
        handle
    };

    // One session takes the whole budget with three unread channels.
    let a = login().await;
    let mut a_channels = Vec::new();
    for _ in 0..3 {
        let (r, w) = open_any(&a).await;
        assert!(w.writable_packet_size().await > 0);
        a_channels.push((r, w));
    }
    assert_eq!(russh::server::window_budget_in_use(), BUDGET);

    // Another session's channel opens with no window: its client waits.
    let b = login().await;
    let (_b_read, b_write) = open_any(&b).await;
    assert_eq!(
        b_write.writable_packet_size().await,
        0,
        "a channel opened past the window budget was given window"
    );
    assert_eq!(russh::server::window_budget_in_use(), BUDGET);

    // A channel of the first session closes: its window goes back, to the waiting channel.
    let (_r, w) = a_channels.remove(0);
    w.close().await.unwrap();
    let bw = &b_write;
    until(
        "the waiting channel gets window",
        Duration::from_secs(10),
        || async move { bw.writable_packet_size().await > 0 },
    )
    .await;
    assert!(russh::server::window_budget_in_use() <= BUDGET);

    // Sessions ending and their unread channels dropped give back everything they held.
    for h in [a, b] {
        h.disconnect(russh::Disconnect::ByApplication, "", "")
            .await
            .unwrap();
    }
    drop((a_channels, b_write));
    hoard.0.lock().unwrap().clear();
    until(
        "the window budget is all given back",
        Duration::from_secs(10),
        || async {
            hoard.0.lock().unwrap().clear();
            russh::server::window_budget_in_use() == 0
        },
    )
    .await;
    server.abort();
}

/// A channel to anywhere (the hoarding server takes them all).
async fn open_any(h: &client::Handle<Peer>) -> (ChannelReadHalf, ChannelWriteHalf<client::Msg>) {
    h.channel_open_direct_tcpip("x", 1, "127.0.0.1", 0)
        .await
        .unwrap()
        .split()
}
