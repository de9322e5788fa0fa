//! End-to-end comparison on this machine: sluice against HAProxy, stunnel and sslh, configured
//! alike (same ECDSA P-256 certificate, same upstream sink on 127.0.0.1), measured interleaved
//! (A B A B ...) and reported as medians. Peers that are not installed are skipped, and said so.
//!
//! Scenarios: the ceiling (no relay; iperf3); (1) bulk TLS -> upstream, N MiB each way on one
//! connection; (2) bulk on a plain leg (plain SSH -> upstream) against sslh; (3) new TLS
//! connections per second and per CPU-second; (4) latency to the first upstream byte by ALPN,
//! peek and plaintext routing; (5) resident memory per idle TLS connection; (6) the embedded SSH
//! server's `ssh -W` against OpenSSH's sshd; (7) HTTP through a tunnel published with
//! `ssh -R`, sluice by name over HTTPS against sshd's `-R` port, rathole and bore (at full
//! load, on new connections and at a moderate paced load), and bulk through a raw TCP tunnel;
//! (8) server memory per idle tunnel at 1,000 tunnels. CPU is the relay process's, from
//! /proc/PID/stat.
//!
//! Run: `cargo bench --bench compare`. Environment: COMPARE_ONLY=ceiling,1,...,10 (which),
//! COMPARE_MIB=1024, COMPARE_ROUNDS=3, COMPARE_HS_SECS=3, COMPARE_HS_CLIENTS=4,
//! COMPARE_LAT_N=500, COMPARE_IDLE=9000, COMPARE_IDLE_STUNNEL=2000, COMPARE_SLUICE_THREADS=1
//! (sluice's `threads`; HAProxy runs with `nbthread 1`), COMPARE_TUN_CONNS=16, COMPARE_TUN_SECS=5,
//! COMPARE_TUN_RATE=1000 (the paced load, requests per second), COMPARE_IDLE_TUNNELS=1000,
//! COMPARE_SLUICE_WRAP (a command to run sluice under: benches/heaptrack-wrap.sh),
//! COMPARE_AUDIT=1 (a second sluice with `[audit]` on, in the TLS scenarios: the trail's cost),
//! COMPARE_SUITES=1 (a second sluice with AES-256-GCM first and a second HAProxy with AES-128-GCM
//! only: "same suite" rows beside "default against default").
// Test and benchmark code: a panic (unwrap) is the failure report, and wall-clock time is
// what a benchmark or an end-to-end test against real processes measures.
#![allow(clippy::unwrap_used, clippy::disallowed_types, missing_docs)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn wait_port(port: u16) -> bool {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The first bytes of scenario 10's upload and download (HTTP-looking, so that sluice routes an
/// ALPN-less OpenSSL client to its HTTP route by its first bytes).
const UPLOAD: &[u8] = b"PUT /upload HTTP/1.1\r\n\r\n";
const DOWNLOAD: &[u8] = b"GET /download HTTP/1.1\r\n\r\n";

/// The upstream every peer relays to, on 127.0.0.1. What it does depends on the first bytes:
/// `PING` gets `PONG` (handshake scenario); `GET /lat` records when its first byte arrived and
/// answers `OK` (latency scenario); anything else is bulk: it discards what it reads and sends
/// `mib` MiB back. A connection that sends nothing is held open (idle-memory scenario).
async fn sink(
    mib: usize,
    arrivals: mpsc::UnboundedSender<Instant>,
    uploads: mpsc::UnboundedSender<(usize, Instant)>,
) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let arrivals = arrivals.clone();
            let uploads = uploads.clone();
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.into_split();
                let mut first = [0u8; 64];
                let n = match r.read(&mut first).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let now = Instant::now();
                // Scenario 10's upload is read to its end and reported (a download is the bulk
                // branch below with nothing sent after the request).
                if first[..n].starts_with(UPLOAD) {
                    let mut got = n;
                    let mut buf = vec![0u8; 1 << 20];
                    while let Ok(n) = r.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        got += n;
                    }
                    let _ = uploads.send((got, Instant::now()));
                    return;
                }
                let writer = if first[..n].starts_with(b"PING") {
                    let _ = w.write_all(b"PONG").await;
                    None
                } else if first[..n].starts_with(b"GET /lat") {
                    let _ = arrivals.send(now);
                    let _ = w.write_all(b"OK").await;
                    None
                } else {
                    Some(tokio::spawn(async move {
                        let chunk = vec![0u8; 1 << 20];
                        for _ in 0..mib {
                            if w.write_all(&chunk).await.is_err() {
                                return;
                            }
                        }
                        let _ = w.shutdown().await;
                    }))
                };
                let mut buf = vec![0u8; 1 << 20];
                while let Ok(n) = r.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                if let Some(w) = writer {
                    let _ = w.await;
                }
            });
        }
    });
    addr
}

/// Writes `mib` MiB while reading `mib` MiB; returns when both are done.
/// Returns the bytes read and the two halves, still open (so that CPU can be measured while a
/// per-connection process still exists).
async fn push_pull<S: AsyncRead + AsyncWrite + Unpin + 'static>(
    s: S,
    first: &[u8],
    mib: usize,
) -> (usize, Box<dyn std::any::Any>) {
    let (mut r, mut w) = tokio::io::split(s);
    let first = first.to_vec();
    let write = async move {
        // A peer may cut the connection early (sslh at the first EOF): stop writing then.
        if w.write_all(&first).await.is_ok() {
            let chunk = vec![0x5au8; 1 << 20];
            for _ in 0..mib {
                if w.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let _ = w.flush().await;
        }
        // Keep the write side open: some peers close both ways on a half-close.
        w
    };
    let read = async move {
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < mib << 20 {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        (got, r)
    };
    let (w, (got, r)) = tokio::join!(write, read);
    (got, Box::new((r, w)))
}

/// Starts sluice on a free port with the bench certificate, `threads` and `rest` of a config
/// (written to `dir/file`, state in `dir/state`).
fn spawn_sluice(b: &Bench, dir: &std::path::Path, file: &str, rest: &str) -> Option<Peer> {
    let p = free_port();
    let cfg = dir.join(file);
    std::fs::write(
        &cfg,
        format!(
            "listen = [\"127.0.0.1:{p}\"]\nthreads = {}\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n{rest}",
            sluice_threads(),
            b.cert.display(),
            b.key.display(),
        ),
    )
    .unwrap();
    // COMPARE_SLUICE_WRAP runs sluice under a profiler (e.g. `heaptrack`); the figures of that
    // run are the profiler's, not sluice's.
    let mut cmd = match std::env::var_os("COMPARE_SLUICE_WRAP") {
        Some(w) => {
            let mut c = Command::new(w);
            c.arg(env!("CARGO_BIN_EXE_sluice"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_sluice")),
    };
    spawn(
        "sluice",
        p,
        cmd.args(["serve", "--config"])
            .arg(&cfg)
            .args(["--state-dir"])
            .arg(dir.join("state")),
    )
}

/// The load generator's TLS client: X25519 only (what OpenSSL 3.0 in HAProxy and stunnel
/// would choose too; rustls would otherwise offer the ML-KEM hybrid) and no resumption, so that
/// every connection is a full ECDSA P-256 handshake.
fn client_config(
    cert: &rustls::pki_types::CertificateDer<'static>,
    alpn: Option<&[u8]>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.map(|a| vec![a.to_vec()]).unwrap_or_default();
    c.resumption = rustls::client::Resumption::disabled();
    Arc::new(c)
}

struct Peer {
    name: &'static str,
    child: Child,
    port: u16,
}

impl Drop for Peer {
    fn drop(&mut self) {
        // The whole process group: sslh-fork leaves children behind otherwise.
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(name: &'static str, port: u16, cmd: &mut Command) -> Option<Peer> {
    use std::os::unix::process::CommandExt;
    // A process group of its own, so that Drop can end forked children too.
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .ok()?;
    let p = Peer { name, child, port };
    wait_port(port).then_some(p)
}

/// As `spawn`, for a process that listens nowhere (a publisher): its start is not awaited.
fn spawn_running(name: &'static str, cmd: &mut Command) -> Option<Peer> {
    use std::os::unix::process::CommandExt;
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .ok()?;
    Some(Peer {
        name,
        child,
        port: 0,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// What every scenario shares: the runtime, the certificate, the sink and the sluice binary.
struct Bench {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    combined: std::path::PathBuf,
    der: rustls::pki_types::CertificateDer<'static>,
    sink: SocketAddr,
    arrivals: mpsc::UnboundedReceiver<Instant>,
    uploads: mpsc::UnboundedReceiver<(usize, Instant)>,
    mib: usize,
    rounds: usize,
    skipped: Vec<String>,
}

/// sluice's `threads` for the comparison: 1 by default, as HAProxy runs with `nbthread 1`.
fn sluice_threads() -> u32 {
    env_or("COMPARE_SLUICE_THREADS", 1)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes --bench; this harness reads its settings from the environment.
    let only: String = env_or("COMPARE_ONLY", "ceiling,1,2,3,4,5,6,7,8,9,10".to_string());
    let want = |s: &str| only.split(',').any(|o| o.trim() == s);
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // *.t.localhost for scenario 7's tunnel visitors.
    let ck = rcgen::generate_simple_self_signed(vec![
        "localhost".to_string(),
        "*.t.localhost".to_string(),
    ])
    .unwrap();
    let (cert, key, combined) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("combined.pem"),
    );
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    std::fs::write(
        &combined,
        format!("{}{}", ck.cert.pem(), ck.key_pair.serialize_pem()),
    )
    .unwrap();
    let mib = env_or("COMPARE_MIB", 1024usize);
    let (tx, arrivals) = mpsc::unbounded_channel();
    let (up_tx, uploads) = mpsc::unbounded_channel();
    let sink = rt.block_on(sink(mib, tx, up_tx));
    let mut b = Bench {
        rt,
        dir,
        cert,
        key,
        combined,
        der: ck.cert.der().clone(),
        sink,
        arrivals,
        uploads,
        mib,
        rounds: env_or("COMPARE_ROUNDS", 3usize),
        skipped: Vec::new(),
    };
    println!(
        "sluice compare: {} MiB each way per bulk run, {} interleaved rounds, loopback, {} CPUs",
        b.mib,
        b.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    type Scenario = (&'static str, fn(&mut Bench));
    let scenarios: [Scenario; 11] = [
        ("ceiling", ceiling),
        ("1", bulk_tls),
        ("2", bulk_plain),
        ("3", handshakes),
        ("4", latency),
        ("5", idle_memory),
        ("6", ssh_forward),
        ("7", tunnel_http),
        ("8", idle_tunnels),
        ("9", tunnel_client),
        ("10", one_way),
    ];
    for (name, run) in scenarios {
        if want(name) {
            run(&mut b);
        }
    }
    if !b.skipped.is_empty() {
        b.skipped.sort();
        b.skipped.dedup();
        println!("\nSkipped: {}", b.skipped.join(", "));
    }
}

/// Each relay needs two descriptors per connection; the idle scenario holds thousands.
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        },
    );
}

/// sluice, HAProxy and stunnel in front of the sink, configured alike. sluice has both routes
/// (so that routing by ALPN, by peeking and of plaintext can be measured) and limits high
/// enough for the idle scenario.
fn tls_peers(b: &mut Bench) -> Vec<Peer> {
    let mut peers = Vec::new();
    let routes = format!(
        "[limits]\nmax_connections = 20000\nmax_connections_per_ip = 20000\nmax_unrouted_per_ip = 20000\n[routes.http]\nupstream = \"{0}\"\nplaintext = \"accept\"\n[routes.ssh]\nupstream = \"{0}\"\n",
        b.sink
    );
    if let Some(peer) = spawn_sluice(b, b.dir.path(), "sluice.toml", &routes) {
        peers.push(peer);
    }
    // COMPARE_AUDIT=1: sluice again with the audit trail on, to measure what it costs.
    if std::env::var_os("COMPARE_AUDIT").is_some() {
        let dir = b.dir.path().join("audited");
        std::fs::create_dir_all(&dir).unwrap();
        let audited = format!("{routes}[audit]\n");
        if let Some(mut peer) = spawn_sluice(b, &dir, "sluice.toml", &audited) {
            peer.name = "sluice+aud";
            peers.push(peer);
        }
    }
    // COMPARE_SUITES=1: sluice again with AES-256-GCM first (what rustls and OpenSSL clients
    // prefer, and what sluice negotiated before it chose in its own order): the suite's cost.
    if std::env::var_os("COMPARE_SUITES").is_some() {
        let dir = b.dir.path().join("aes256");
        std::fs::create_dir_all(&dir).unwrap();
        let aes256 = format!(
            "cipher_suites = [\"TLS13_AES_256_GCM_SHA384\", \"TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384\"]\n{routes}"
        );
        if let Some(mut peer) = spawn_sluice(b, &dir, "sluice.toml", &aes256) {
            peer.name = "sluice-256";
            peers.push(peer);
        }
    }
    if have("haproxy") {
        // COMPARE_SUITES=1: HAProxy again with sluice's default TLS 1.3 suite (OpenSSL's default
        // order puts AES-256-GCM first).
        let mut variants = vec![("haproxy", "")];
        if std::env::var_os("COMPARE_SUITES").is_some() {
            variants.push((
                "haproxy-128",
                "  ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256\n",
            ));
        }
        for (name, global) in variants {
            let p = free_port();
            let hcfg = b.dir.path().join(format!("{name}.cfg"));
            std::fs::write(
                &hcfg,
                format!(
                    "global\n  nbthread 1\n  maxconn 9500\n  tune.ssl.default-dh-param 2048\n{global}defaults\n  mode tcp\n  maxconn 9500\n  timeout connect 5s\n  timeout client 600s\n  timeout server 600s\nfrontend f\n  bind 127.0.0.1:{p} ssl crt {} alpn http/1.1\n  default_backend b\nbackend b\n  server s {}\n",
                    b.combined.display(),
                    b.sink
                ),
            )
            .unwrap();
            match spawn(
                name,
                p,
                Command::new("haproxy").arg("-db").arg("-f").arg(&hcfg),
            ) {
                Some(peer) => peers.push(peer),
                None => b.skipped.push(format!("{name} (did not start)")),
            }
        }
    } else {
        b.skipped.push("haproxy (not installed)".into());
    }
    if let Some(bin) = ["stunnel4", "stunnel"].into_iter().find(|c| have(c)) {
        let p = free_port();
        let scfg = b.dir.path().join("stunnel.conf");
        std::fs::write(
            &scfg,
            format!(
                "foreground = yes\npid =\n[bench]\naccept = 127.0.0.1:{p}\nconnect = {}\ncert = {}\n",
                b.sink,
                b.combined.display()
            ),
        )
        .unwrap();
        match spawn("stunnel", p, Command::new(bin).arg(&scfg)) {
            Some(peer) => peers.push(peer),
            None => b.skipped.push("stunnel (did not start)".into()),
        }
    } else {
        b.skipped.push("stunnel (not installed)".into());
    }
    peers
}

async fn tls_connect(
    cc: &Arc<rustls::ClientConfig>,
    port: u16,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    tokio_rustls::TlsConnector::from(cc.clone())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The ceiling: the same transfer straight to the sink (no relay), and iperf3 over loopback.
fn ceiling(b: &mut Bench) {
    let mib = b.mib;
    let mut direct = Vec::new();
    for _ in 0..b.rounds {
        let sink = b.sink;
        let start = Instant::now();
        let got = b.rt.block_on(async {
            let tcp = TcpStream::connect(sink).await.unwrap();
            push_pull(tcp, b"", mib).await.0
        });
        assert_eq!(got, mib << 20);
        direct.push(2.0 * mib as f64 / 1024.0 / start.elapsed().as_secs_f64());
    }
    println!("\nCeiling: no relay");
    println!(
        "direct to the sink (harness both ends): {:.2} GiB/s both ways",
        median(direct)
    );
    if !have("iperf3") {
        b.skipped.push("iperf3 (not installed)".into());
        return;
    }
    let mut runs = Vec::new();
    for _ in 0..b.rounds {
        let p = free_port();
        let Some(server) = spawn(
            "iperf3",
            p,
            Command::new("iperf3").args(["-s", "-1", "-p", &p.to_string()]),
        ) else {
            b.skipped.push("iperf3 (server did not start)".into());
            return;
        };
        // wait_port connected once, which a one-shot server may take as its client: give it a
        // fresh one.
        drop(server);
        let server = Command::new("iperf3")
            .args(["-s", "-1", "-p", &p.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        std::thread::sleep(Duration::from_millis(300));
        let out = Command::new("iperf3")
            .args([
                "-c",
                "127.0.0.1",
                "-p",
                &p.to_string(),
                "-t",
                "3",
                "--bidir",
                "-J",
            ])
            .output();
        if let Ok(mut s) = server {
            let _ = s.kill();
            let _ = s.wait();
        }
        let Ok(out) = out else { continue };
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            + v["end"]["sum_received_bidir_reverse"]["bits_per_second"]
                .as_f64()
                .unwrap_or(0.0);
        if bps > 0.0 {
            runs.push(bps / 8.0 / (1u64 << 30) as f64);
        }
    }
    if !runs.is_empty() {
        println!(
            "iperf3 --bidir (one TCP stream each way): {:.2} GiB/s both ways",
            median(runs)
        );
    }
}

/// Scenario 1: TLS -> upstream, `mib` MiB each way on one connection.
fn bulk_tls(b: &mut Bench) {
    let peers = tls_peers(b);
    let cc = client_config(&b.der, Some(b"http/1.1"));
    let mib = b.mib;
    let mut results: Vec<(&'static str, Vec<f64>, Vec<f64>)> = peers
        .iter()
        .map(|p| (p.name, Vec::new(), Vec::new()))
        .collect();
    let mut suites = Vec::new();
    for _ in 0..b.rounds {
        for (i, peer) in peers.iter().enumerate() {
            let pid = peer.child.id();
            let t0 = cpu_ticks(pid);
            let start = Instant::now();
            let (got, suite) = b.rt.block_on(async {
                let tls = tls_connect(&cc, peer.port).await.unwrap();
                let (_, c) = tls.get_ref();
                let suite = format!(
                    "{}: {:?} {:?} {:?}",
                    peer.name,
                    c.protocol_version().unwrap(),
                    c.negotiated_cipher_suite().unwrap().suite(),
                    c.negotiated_key_exchange_group().map(|g| g.name())
                );
                (push_pull(tls, b"", mib).await.0, suite)
            });
            let secs = start.elapsed().as_secs_f64();
            let cpu = (cpu_ticks(pid) - t0) as f64 / 100.0;
            assert_eq!(got, mib << 20, "{}: short transfer", peer.name);
            let gib = 2.0 * mib as f64 / 1024.0;
            results[i].1.push(gib / secs);
            results[i].2.push(cpu / gib);
            suites.push(suite);
        }
    }
    println!("\nScenario 1: bulk TLS -> upstream ({mib} MiB each way, one connection)");
    report(&results);
    suites.sort();
    suites.dedup();
    for s in suites {
        println!("negotiated: {s}");
    }
}

/// Scenario 2: plain leg (plain SSH -> upstream) against sslh.
fn bulk_plain(b: &mut Bench) {
    let mib = b.mib;
    let mut plain_peers: Vec<Peer> = Vec::new();
    let routes = format!("[routes.ssh]\nupstream = \"{}\"\n", b.sink);
    if let Some(peer) = spawn_sluice(b, b.dir.path(), "sluice-plain.toml", &routes) {
        plain_peers.push(peer);
    }
    if have("sslh") {
        let p = free_port();
        match spawn(
            "sslh",
            p,
            Command::new("sslh").args([
                "-f",
                "-p",
                &format!("127.0.0.1:{p}"),
                "--ssh",
                &b.sink.to_string(),
            ]),
        ) {
            Some(peer) => plain_peers.push(peer),
            None => b.skipped.push("sslh (did not start)".into()),
        }
    } else {
        b.skipped.push("sslh (not installed)".into());
    }
    let mut notes: Vec<String> = Vec::new();
    let mut results: Vec<(&'static str, Vec<f64>, Vec<f64>)> = plain_peers
        .iter()
        .map(|p| (p.name, Vec::new(), Vec::new()))
        .collect();
    for _ in 0..b.rounds {
        for (i, peer) in plain_peers.iter().enumerate() {
            // sslh-fork relays in a child per connection, which may exit before the transfer
            // returns (it closes at the first EOF) and is never reaped into sslh's CPU: sample
            // the whole tree while it runs.
            let sampler = TreeSampler::start(peer.child.id());
            let start = Instant::now();
            let (got, open) = b.rt.block_on(async {
                let tcp = TcpStream::connect(("127.0.0.1", peer.port)).await.unwrap();
                push_pull(tcp, b"SSH-2.0-bench\r\n", mib).await
            });
            let secs = start.elapsed().as_secs_f64();
            let cpu = sampler.finish() as f64 / 100.0;
            drop(open);
            if got != mib << 20 {
                notes.push(format!(
                    "{}: delivered {got} of {} bytes back",
                    peer.name,
                    mib << 20
                ));
            }
            let gib = 2.0 * mib as f64 / 1024.0;
            results[i].1.push(gib / secs);
            results[i].2.push(cpu / gib);
        }
    }
    println!("\nScenario 2: bulk on a plain leg (plain SSH -> upstream, {mib} MiB each way)");
    report(&results);
    for n in &notes {
        println!("note: {n}");
    }
}

/// Scenario 3: new TLS connections per second, each a full handshake (ECDSA P-256, X25519, no
/// resumption) plus one small request and reply, from `COMPARE_HS_CLIENTS` concurrent clients
/// for `COMPARE_HS_SECS` per run.
fn handshakes(b: &mut Bench) {
    let peers = tls_peers(b);
    let cc = client_config(&b.der, Some(b"http/1.1"));
    let secs: f64 = env_or("COMPARE_HS_SECS", 3.0);
    let clients: usize = env_or("COMPARE_HS_CLIENTS", 4);
    // (name, conns/s, conns per CPU-s)
    let mut results: Vec<(&'static str, Vec<f64>, Vec<f64>)> = peers
        .iter()
        .map(|p| (p.name, Vec::new(), Vec::new()))
        .collect();
    let mut failures = vec![0usize; peers.len()];
    for _ in 0..b.rounds {
        for (i, peer) in peers.iter().enumerate() {
            let pid = peer.child.id();
            let t0 = cpu_ticks(pid);
            let start = Instant::now();
            let deadline = start + Duration::from_secs_f64(secs);
            let (ok, bad) = b.rt.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for _ in 0..clients {
                    let cc = cc.clone();
                    let port = peer.port;
                    set.spawn(async move {
                        let (mut ok, mut bad) = (0usize, 0usize);
                        while Instant::now() < deadline {
                            let one = async {
                                let mut tls = tls_connect(&cc, port).await?;
                                tls.write_all(b"PING").await?;
                                let mut pong = [0u8; 4];
                                tls.read_exact(&mut pong).await?;
                                let _ = tls.shutdown().await;
                                std::io::Result::Ok(())
                            };
                            match tokio::time::timeout(Duration::from_secs(5), one).await {
                                Ok(Ok(())) => ok += 1,
                                _ => bad += 1,
                            }
                        }
                        (ok, bad)
                    });
                }
                let (mut ok, mut bad) = (0, 0);
                while let Some(Ok((o, f))) = set.join_next().await {
                    ok += o;
                    bad += f;
                }
                (ok, bad)
            });
            let wall = start.elapsed().as_secs_f64();
            // Let the relay finish closing before reading its CPU.
            std::thread::sleep(Duration::from_millis(200));
            let cpu = (cpu_ticks(pid) - t0) as f64 / 100.0;
            failures[i] += bad;
            results[i].1.push(ok as f64 / wall);
            results[i].2.push(ok as f64 / cpu.max(0.01));
        }
    }
    println!(
        "\nScenario 3: new TLS connections, full handshake + 4-byte request and reply ({clients} clients, {secs} s per run)"
    );
    let base = results
        .iter()
        .find(|r| r.0 == "sluice")
        .map(|r| median(r.2.clone()));
    println!(
        "{:<10} {:>12} {:>16} {:>18} {:>9}",
        "peer", "conns/s", "conns per CPU-s", "sluice per CPU-s x", "failures"
    );
    for (i, (name, rate, per_cpu)) in results.iter().enumerate() {
        let pc = median(per_cpu.clone());
        println!(
            "{:<10} {:>12.0} {:>16.0} {:>18.2} {:>9}",
            name,
            median(rate.clone()),
            pc,
            base.map_or(0.0, |s| s / pc),
            failures[i]
        );
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Scenario 4: time from connect() to the first byte at the upstream, and from the client's
/// write of its first request byte to that arrival (the routing decision), p50 and p99.
fn latency(b: &mut Bench) {
    let peers = tls_peers(b);
    let n: usize = env_or("COMPARE_LAT_N", 500);
    let alpn = client_config(&b.der, Some(b"http/1.1"));
    let no_alpn = client_config(&b.der, None);
    #[derive(Clone, Copy)]
    enum Mode {
        Alpn,
        Peek,
        Plain,
    }
    let mut cases: Vec<(String, u16, Mode)> = Vec::new();
    for p in &peers {
        if p.name == "sluice" {
            cases.push(("sluice, no ALPN (peek)".into(), p.port, Mode::Peek));
            cases.push(("sluice, plaintext HTTP".into(), p.port, Mode::Plain));
            cases.push(("sluice, ALPN http/1.1".into(), p.port, Mode::Alpn));
        } else {
            cases.push((format!("{}, ALPN http/1.1", p.name), p.port, Mode::Alpn));
        }
    }
    let req = b"GET /lat HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut total: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut after_send: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..n {
        for (i, (_, port, mode)) in cases.iter().enumerate() {
            let (port, mode) = (*port, *mode);
            let (cc_alpn, cc_none) = (alpn.clone(), no_alpn.clone());
            let arrivals = &mut b.arrivals;
            let (t0, sent, arrived) = b.rt.block_on(async move {
                let t0 = Instant::now();
                let sent;
                let keep: Box<dyn std::any::Any> = match mode {
                    Mode::Plain => {
                        let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                        tcp.set_nodelay(true).unwrap();
                        sent = Instant::now();
                        tcp.write_all(req).await.unwrap();
                        Box::new(tcp)
                    }
                    Mode::Alpn | Mode::Peek => {
                        let cc = if matches!(mode, Mode::Alpn) {
                            cc_alpn
                        } else {
                            cc_none
                        };
                        let mut tls = tls_connect(&cc, port).await.unwrap();
                        sent = Instant::now();
                        tls.write_all(req).await.unwrap();
                        tls.flush().await.unwrap();
                        Box::new(tls)
                    }
                };
                let arrived = tokio::time::timeout(Duration::from_secs(5), arrivals.recv())
                    .await
                    .expect("no request reached the upstream")
                    .unwrap();

                drop(keep);
                // Let this peer finish closing before the next case starts (stunnel takes ms).
                tokio::time::sleep(Duration::from_millis(10)).await;
                (t0, sent, arrived)
            });
            total[i].push(arrived.duration_since(t0).as_secs_f64() * 1e3);
            after_send[i].push(arrived.duration_since(sent).as_secs_f64() * 1e3);
        }
    }
    println!(
        "\nScenario 4: latency to the first upstream byte, ms ({n} sequential connections per case, interleaved)"
    );
    println!(
        "{:<28} {:>14} {:>14} {:>18} {:>18}",
        "case", "connect p50", "connect p99", "first byte p50", "first byte p99"
    );
    for (i, (name, _, _)) in cases.iter().enumerate() {
        println!(
            "{:<28} {:>14.3} {:>14.3} {:>18.3} {:>18.3}",
            name,
            percentile(&mut total[i], 0.5),
            percentile(&mut total[i], 0.99),
            percentile(&mut after_send[i], 0.5),
            percentile(&mut after_send[i], 0.99)
        );
    }
    println!("(connect: from connect() to the upstream's first byte; first byte: from the client's write of its request)");
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Scenario 5: resident memory per idle, established TLS connection (relayed to the sink),
/// at `COMPARE_IDLE` connections (default 9000: each costs the relay two descriptors and the
/// harness two, under a 20,000 per-process limit).
fn idle_memory(b: &mut Bench) {
    let n: usize = env_or("COMPARE_IDLE", 9000);
    let stunnel_n: usize = env_or("COMPARE_IDLE_STUNNEL", 2000).min(n);
    let peers = tls_peers(b);
    let cc = client_config(&b.der, Some(b"http/1.1"));
    println!("\nScenario 5: resident memory per idle TLS connection");
    println!(
        "{:<10} {:>12} {:>14} {:>14} {:>12}",
        "peer", "connections", "RSS before", "RSS after", "KiB / conn"
    );
    for peer in &peers {
        // stunnel runs a thread per connection.
        let n = if peer.name == "stunnel" { stunnel_n } else { n };
        let pid = peer.child.id();
        let before = rss_kib(pid);
        let conns = b.rt.block_on(async {
            let sem = Arc::new(tokio::sync::Semaphore::new(32));
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..n {
                let permit = sem.clone().acquire_owned().await.unwrap();
                let cc = cc.clone();
                let port = peer.port;
                set.spawn(async move {
                    let s = tls_connect(&cc, port).await;
                    drop(permit);
                    s
                });
            }
            let mut conns = Vec::with_capacity(n);
            while let Some(r) = set.join_next().await {
                if let Ok(Ok(s)) = r {
                    conns.push(s);
                }
            }
            conns
        });
        std::thread::sleep(Duration::from_secs(2));
        let after = rss_kib(pid);
        println!(
            "{:<10} {:>12} {:>10} KiB {:>10} KiB {:>12.1}",
            peer.name,
            conns.len(),
            before,
            after,
            (after as f64 - before as f64) / conns.len().max(1) as f64
        );
        b.rt.block_on(async move { drop(conns) });
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Scenario 6: `ssh -W` through sluice's embedded server (plain SSH on its port) against
/// OpenSSH's sshd doing the same forward, same client, same cipher.
fn ssh_forward(b: &mut Bench) {
    for (cmd, pkg) in [
        ("ssh", "openssh-client"),
        ("/usr/sbin/sshd", "openssh-server"),
    ] {
        if !have(cmd) {
            b.skipped
                .push(format!("ssh forward ({cmd} not installed: {pkg})"));
            return;
        }
    }
    let d = b.dir.path().join("ssh");
    std::fs::create_dir_all(&d).unwrap();
    ssh_keys(&d);
    let auth = d.join("authorized_keys");
    std::fs::copy(d.join("client.pub"), &auth).unwrap();
    let mut peers = Vec::new();
    let ssh = format!(
        "[routes.ssh]\n[ssh]\nauthorized_keys = [\"{}\"]\npermit_open = [\"127.0.0.1:*\"]\n",
        auth.display()
    );
    if let Some(peer) = spawn_sluice(b, &d, "sluice.toml", &ssh) {
        peers.push(peer);
    }
    let _ = std::fs::create_dir_all("/run/sshd");
    let p = free_port();
    let scfg = d.join("sshd_config");
    std::fs::write(
        &scfg,
        format!(
            "Port {p}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nStrictModes no\nUsePAM no\nPidFile none\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
            d.join("host").display(),
            auth.display()
        ),
    )
    .unwrap();
    match spawn(
        "sshd",
        p,
        Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&scfg),
    ) {
        Some(peer) => peers.push(peer),
        None => b.skipped.push("sshd (did not start)".into()),
    }
    let mib = b.mib;
    let cipher = "aes128-gcm@openssh.com";
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let mut results: Vec<(&'static str, Vec<f64>, Vec<f64>)> = peers
        .iter()
        .map(|p| (p.name, Vec::new(), Vec::new()))
        .collect();
    for _ in 0..b.rounds {
        for (i, peer) in peers.iter().enumerate() {
            let sampler = TreeSampler::start(peer.child.id());
            let start = Instant::now();
            let mut child = Command::new("ssh")
                .args(["-F", "/dev/null", "-i"])
                .arg(d.join("client"))
                .args([
                    "-o",
                    "IdentitiesOnly=yes",
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                    "-o",
                    "LogLevel=ERROR",
                    "-c",
                    cipher,
                    "-p",
                    &peer.port.to_string(),
                    "-W",
                    &b.sink.to_string(),
                    &format!("{user}@127.0.0.1"),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let mut stdout = child.stdout.take().unwrap();
            let writer = std::thread::spawn(move || {
                use std::io::Write;
                let chunk = vec![0x5au8; 1 << 20];
                for _ in 0..mib {
                    if stdin.write_all(&chunk).is_err() {
                        break;
                    }
                }
            });
            let mut got = 0usize;
            let mut buf = vec![0u8; 1 << 20];
            use std::io::Read;
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got += n;
            }
            let _ = writer.join();
            let _ = child.wait();
            let secs = start.elapsed().as_secs_f64();
            let cpu = sampler.finish() as f64 / 100.0;
            assert_eq!(got, mib << 20, "{}: short ssh -W transfer", peer.name);
            let gib = 2.0 * mib as f64 / 1024.0;
            results[i].1.push(gib / secs);
            results[i].2.push(cpu / gib);
        }
    }
    println!("\nScenario 6: ssh -W ({cipher}, {mib} MiB each way): sluice's embedded server vs OpenSSH sshd");
    report(&results);
}

/// Fresh Ed25519 key pairs `DIR/client` and `DIR/host` (the sshd scenarios' user and host keys).
fn ssh_keys(d: &std::path::Path) {
    for k in ["client", "host"] {
        let _ = std::fs::remove_file(d.join(k));
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join(k))
            .status()
            .unwrap();
        assert!(st.success());
    }
}

/// Samples the CPU of a process and its children every 20 ms; `finish` gives the ticks used
/// since `start`, counting children that came and went in between.
struct TreeSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl TreeSampler {
    fn start(pid: u32) -> TreeSampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s2 = stop.clone();
        let base = cpu_ticks(pid);
        let thread = std::thread::spawn(move || {
            let mut seen: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
            let mut own = base;
            loop {
                let done = s2.load(std::sync::atomic::Ordering::Relaxed);
                own = own.max(cpu_ticks(pid));
                for (child, t) in children(pid) {
                    let e = seen.entry(child).or_insert(t);
                    *e = (*e).max(t);
                }
                if done {
                    return own - base + seen.values().sum::<u64>();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        TreeSampler { stop, thread }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// (pid, CPU ticks) of the live descendants of `pid` (sslh-fork: listener child, then a
/// grandchild per connection).
fn children(pid: u32) -> Vec<(u32, u64)> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            let f: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            if let Some(pp) = f.get(1).and_then(|v| v.parse::<u32>().ok()) {
                parent_of.push((p, pp));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(p, pp) in &parent_of {
            if pp == parent {
                out.push((p, cpu_ticks(p)));
                frontier.push(p);
            }
        }
    }
    out
}

fn report(results: &[(&'static str, Vec<f64>, Vec<f64>)]) {
    let Some(base) = results.iter().find(|r| r.0.starts_with("sluice")) else {
        return;
    };
    let (b_thr, b_cpu) = (median(base.1.clone()), median(base.2.clone()));
    println!(
        "{:<12} {:>10} {:>12} {:>16} {:>16}",
        "peer", "GiB/s", "CPU-s/GiB", "sluice thr x", "sluice CPU /"
    );
    for (name, thr, cpu) in results {
        let (t, c) = (median(thr.clone()), median(cpu.clone()));
        println!(
            "{:<12} {:>10.2} {:>12.3} {:>16.2} {:>16.2}",
            name,
            t,
            c,
            b_thr / t,
            b_cpu / c
        );
    }
}

/// The web service behind the tunnels: HTTP/1.1 keep-alive, `ok` to every request.
async fn http_origin() -> SocketAddr {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"ok\n"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// How a visitor reaches a tunnel: plain HTTP to a port, or HTTPS with this SNI.
#[derive(Clone)]
enum Visit {
    Plain(u16),
    Tls(u16, Arc<rustls::ClientConfig>, &'static str),
}

/// One visitor connection, ready for HTTP/1.1 requests.
async fn visit(
    v: &Visit,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<hyper::body::Bytes>> {
    let tcp = TcpStream::connect((
        "127.0.0.1",
        match v {
            Visit::Plain(p) | Visit::Tls(p, _, _) => *p,
        },
    ))
    .await
    .unwrap();
    tcp.set_nodelay(true).unwrap();
    macro_rules! handshake {
        ($io:expr) => {{
            let (send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new($io))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            send
        }};
    }
    match v {
        Visit::Plain(_) => handshake!(tcp),
        Visit::Tls(_, cc, sni) => {
            let tls = tokio_rustls::TlsConnector::from(cc.clone())
                .connect(ServerName::try_from(*sni).unwrap(), tcp)
                .await
                .unwrap();
            handshake!(tls)
        }
    }
}

/// How visitors send their requests.
#[derive(Clone, Copy)]
enum Load {
    /// As fast as answers come, on kept-alive connections.
    KeptAlive,
    /// As fast as answers come, each on a new connection.
    NewConnections,
    /// This many requests per second in all, on kept-alive connections (latency at moderate
    /// load: each visitor sends on a fixed schedule, not when the last answer came).
    Paced(f64),
}

/// `conns` visitors sending requests for `secs`: (requests per second, p50 ms, p99 ms,
/// requests).
fn http_load(b: &Bench, v: &Visit, conns: usize, secs: f64, load: Load) -> (f64, f64, f64, usize) {
    use http_body_util::BodyExt;
    b.rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let v = v.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut send = visit(&v).await;
                let every = match load {
                    Load::Paced(rate) => Some(Duration::from_secs_f64(conns as f64 / rate)),
                    Load::KeptAlive | Load::NewConnections => None,
                };
                let mut next = Instant::now();
                while Instant::now() < deadline {
                    if every.is_some() {
                        // A fixed schedule, not "after the last answer": a slow answer
                        // leaves the next request due at once.
                        tokio::time::sleep_until(next.into()).await;
                    }
                    // From the send: tokio's timer fires up to a millisecond late, which
                    // would add the same noise to every peer.
                    let t0 = Instant::now();
                    if let Some(every) = every {
                        next += every;
                    }
                    if matches!(load, Load::NewConnections) {
                        send = visit(&v).await;
                    }
                    let req = hyper::Request::get("/")
                        .header("host", "bench.t.localhost")
                        .body(http_body_util::Empty::new())
                        .unwrap();
                    let resp = send.send_request(req).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    let _ = resp.into_body().collect().await.unwrap();
                    lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                }
                lat
            }));
        }
        let start = Instant::now();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let took = start.elapsed().as_secs_f64().max(secs);
        let n = all.len();
        (
            n as f64 / took,
            percentile(&mut all, 0.50),
            percentile(&mut all, 0.99),
            n,
        )
    })
}

/// Whether a request through `v` gets a 200 within 20 s.
async fn served(v: &Visit) -> bool {
    for _ in 0..200 {
        let ok = tokio::time::timeout(Duration::from_secs(2), async {
            let tcp_ok = match v {
                Visit::Plain(p) | Visit::Tls(p, _, _) => {
                    TcpStream::connect(("127.0.0.1", *p)).await.is_ok()
                }
            };
            if !tcp_ok {
                return false;
            }
            let mut s = visit(v).await;
            let req = hyper::Request::get("/")
                .header("host", "bench.t.localhost")
                .body(http_body_util::Empty::new())
                .unwrap();
            s.send_request(req).await.is_ok_and(|r| r.status() == 200)
        })
        .await;
        if ok == Ok(true) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A Noise key pair from `rathole --genkey`: (its output, private, public).
fn rathole_keys() -> (String, Option<String>, Option<String>) {
    let keys = Command::new("rathole").arg("--genkey").output().unwrap();
    let text = String::from_utf8_lossy(&keys.stdout).into_owned();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let (mut private, mut public) = (None, None);
    while let Some(l) = lines.next() {
        if l.starts_with("Private Key") {
            private = lines.next().map(str::to_string);
        } else if l.starts_with("Public Key") {
            public = lines.next().map(str::to_string);
        }
    }
    (text, private, public)
}

/// Another tunnel server with two tunnels published through it: HTTP to the origin and raw
/// TCP to the bulk sink.
struct OtherTunnel {
    name: &'static str,
    http: u16,
    bulk: u16,
    server: Peer,
    /// The client that publishes `bulk` (and, for rathole, `http` too).
    bulk_client: Peer,
    _others: Vec<Peer>,
}

/// rathole (Noise transport, so its tunnel pays one layer of crypto as an SSH channel does)
/// and bore (no encryption), when installed (`cargo install rathole bore-cli`).
fn other_tunnels(b: &mut Bench, d: &std::path::Path, origin: SocketAddr) -> Vec<OtherTunnel> {
    let mut out = Vec::new();
    if have("rathole") {
        let (text, private, public) = rathole_keys();
        let (control, vport, bulk) = (free_port(), free_port(), free_port());
        if let (Some(private), Some(public)) = (private, public) {
            let server = d.join("rathole-server.toml");
            std::fs::write(&server, format!(
                "[server]\nbind_addr = \"127.0.0.1:{control}\"\n[server.transport]\ntype = \"noise\"\n[server.transport.noise]\nlocal_private_key = \"{private}\"\n[server.services.bench]\ntoken = \"bench\"\nbind_addr = \"127.0.0.1:{vport}\"\n[server.services.bulk]\ntoken = \"bulk\"\nbind_addr = \"127.0.0.1:{bulk}\"\n"
            )).unwrap();
            let client = d.join("rathole-client.toml");
            std::fs::write(&client, format!(
                "[client]\nremote_addr = \"127.0.0.1:{control}\"\n[client.transport]\ntype = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{public}\"\n[client.services.bench]\ntoken = \"bench\"\nlocal_addr = \"{origin}\"\n[client.services.bulk]\ntoken = \"bulk\"\nlocal_addr = \"{}\"\n",
                b.sink
            )).unwrap();
            match (
                spawn(
                    "rathole",
                    control,
                    Command::new("rathole").arg("--server").arg(&server),
                ),
                spawn_running(
                    "rathole client",
                    Command::new("rathole").arg("--client").arg(&client),
                ),
            ) {
                (Some(server), Some(client)) => out.push(OtherTunnel {
                    name: "rathole",
                    http: vport,
                    bulk,
                    server,
                    bulk_client: client,
                    _others: Vec::new(),
                }),
                _ => b.skipped.push("tunnels: rathole (did not start)".into()),
            }
        } else {
            b.skipped
                .push(format!("tunnels: rathole (--genkey printed {text:?})"));
        }
    } else {
        b.skipped
            .push("tunnels: rathole (not installed: cargo install rathole)".into());
    }
    if have("bore") {
        // bore's control port is fixed (7835); the tunnel port is chosen with --port.
        let (vport, bulk) = (free_port(), free_port());
        let client = |name: &'static str, local: u16, port: u16| {
            spawn_running(
                name,
                Command::new("bore").args([
                    "local",
                    &local.to_string(),
                    "--local-host",
                    "127.0.0.1",
                    "--to",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                ]),
            )
        };
        let server = spawn(
            "bore",
            7835,
            Command::new("bore").args(["server", "--bind-addr", "127.0.0.1", "--min-port", "1024"]),
        );
        match (
            server,
            client("bore client", origin.port(), vport),
            client("bore client (bulk)", b.sink.port(), bulk),
        ) {
            (Some(server), Some(c), Some(bulk_client)) => out.push(OtherTunnel {
                name: "bore",
                http: vport,
                bulk,
                server,
                bulk_client,
                _others: vec![c],
            }),
            _ => b
                .skipped
                .push("tunnels: bore (did not start; is port 7835 free?)".into()),
        }
    } else {
        b.skipped
            .push("tunnels: bore (not installed: cargo install bore-cli)".into());
    }
    out
}

/// Scenario 7: HTTP through a tunnel from a machine behind NAT. OpenSSH's `ssh -N -R` is the
/// publisher for both servers: to sluice by name (`-R bench:80:...` through `sluice connect`,
/// visitors on HTTPS at bench.t.localhost, terminated by sluice), and to OpenSSH's sshd
/// (`-R PORT:...`, visitors on plain HTTP to the bound port). And the same load straight to
/// the origin, for the latency a tunnel adds. CPU is the server's (sluice, or sshd and its
/// per-connection children), per 1,000 requests.
fn tunnel_http(b: &mut Bench) {
    for (cmd, pkg) in [
        ("ssh", "openssh-client"),
        ("/usr/sbin/sshd", "openssh-server"),
    ] {
        if !have(cmd) {
            b.skipped
                .push(format!("tunnels ({cmd} not installed: {pkg})"));
            return;
        }
    }
    let d = b.dir.path().join("tunnels");
    std::fs::create_dir_all(&d).unwrap();
    ssh_keys(&d);
    let public = std::fs::read_to_string(d.join("client.pub")).unwrap();
    let auth = d.join("authorized_keys");
    // A raw TCP port tunnel to the sink beside the named HTTP one, for bulk.
    let sluice_bulk = free_port();
    std::fs::write(
        &auth,
        format!("permitlisten=\"bench:80\",permitlisten=\"{sluice_bulk}\" {public}"),
    )
    .unwrap();
    let origin = b.rt.block_on(http_origin());
    let conns: usize = env_or("COMPARE_TUN_CONNS", 16);
    let secs: f64 = env_or("COMPARE_TUN_SECS", 5.0);
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let ssh_opts = |key: &std::path::Path| -> Vec<String> {
        vec![
            "-F".into(),
            "/dev/null".into(),
            "-i".into(),
            key.display().to_string(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
            "-o".into(),
            "ExitOnForwardFailure=yes".into(),
            "-N".into(),
        ]
    };
    // sluice, publisher through `sluice connect` (TLS to port 443, as from behind NAT).
    let ssh = format!(
        "[routes.ssh]\n[ssh]\nauthorized_keys = [\"{}\"]\nlisten_ports = \"{sluice_bulk}-{sluice_bulk}\"\n[tunnels]\ndomain = \"t.localhost\"\n",
        auth.display()
    );
    let Some(sluice) = spawn_sluice(b, &d, "sluice.toml", &ssh) else {
        b.skipped.push("tunnels (sluice did not start)".into());
        return;
    };
    let connect = format!(
        "{} connect --ca {} localhost:{}",
        env!("CARGO_BIN_EXE_sluice"),
        b.cert.display(),
        sluice.port
    );
    let sluice_pub = spawn_running(
        "ssh -R (sluice)",
        Command::new("ssh")
            .args(ssh_opts(&d.join("client")))
            .args(["-o", &format!("ProxyCommand={connect}")])
            .args(["-R", &format!("bench:80:{origin}")])
            .args([
                "-R",
                &format!("{sluice_bulk}:{}", b.sink),
                "tunnel@localhost",
            ]),
    );
    // sshd, publisher on plain TCP.
    let _ = std::fs::create_dir_all("/run/sshd");
    let (sp, rport, sshd_bulk) = (free_port(), free_port(), free_port());
    let scfg = d.join("sshd_config");
    std::fs::write(
        &scfg,
        format!(
            "Port {sp}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nStrictModes no\nUsePAM no\nPidFile none\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nGatewayPorts no\n",
            d.join("host").display(),
            d.join("sshd_keys").display()
        ),
    )
    .unwrap();
    std::fs::write(d.join("sshd_keys"), &public).unwrap();
    let sshd = spawn(
        "sshd",
        sp,
        Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&scfg),
    );
    let sshd_pub = spawn(
        "ssh -R (sshd)",
        rport,
        Command::new("ssh")
            .args(ssh_opts(&d.join("client")))
            .args(["-p", &sp.to_string()])
            .args(["-R", &format!("{rport}:{origin}")])
            .args([
                "-R",
                &format!("{sshd_bulk}:{}", b.sink),
                &format!("{user}@127.0.0.1"),
            ]),
    );
    let mut cc = (*client_config(&b.der, Some(b"http/1.1"))).clone();
    cc.resumption = rustls::client::Resumption::default();
    let tls = Visit::Tls(sluice.port, Arc::new(cc), "bench.t.localhost");
    // Published once a request gets through.
    let ready = b.rt.block_on(served(&tls));
    if !ready {
        b.skipped
            .push("tunnels (the sluice tunnel never served)".into());
        return;
    }
    // (name, visitor, server pid, bulk port and publisher pid).
    type TunnelPeer = (&'static str, Visit, Option<u32>, Option<(u16, u32)>);
    let mut peers: Vec<TunnelPeer> = vec![("direct", Visit::Plain(origin.port()), None, None)];
    let sluice_publisher = sluice_pub.as_ref().map(|p| (sluice_bulk, p.child.id()));
    peers.push(("sluice", tls, Some(sluice.child.id()), sluice_publisher));
    match (&sshd, &sshd_pub) {
        (Some(s), Some(p)) => peers.push((
            "sshd -R",
            Visit::Plain(rport),
            Some(s.child.id()),
            Some((sshd_bulk, p.child.id())),
        )),
        _ => b.skipped.push("tunnels: sshd -R (did not start)".into()),
    }
    let others = other_tunnels(b, &d, origin);
    for o in &others {
        if b.rt.block_on(served(&Visit::Plain(o.http))) {
            peers.push((
                o.name,
                Visit::Plain(o.http),
                Some(o.server.child.id()),
                Some((o.bulk, o.bulk_client.child.id())),
            ));
        } else {
            b.skipped
                .push(format!("tunnels: {} (never served)", o.name));
        }
    }
    let _keep = (sluice_pub, sshd_pub, others);
    let rate: f64 = env_or("COMPARE_TUN_RATE", 1000.0);
    for mode in [Load::KeptAlive, Load::NewConnections, Load::Paced(rate)] {
        // (req/s, p50, p99, server CPU-ms per 1,000 requests), one list per peer.
        let mut rows: Vec<(&'static str, Vec<[f64; 4]>)> =
            peers.iter().map(|p| (p.0, Vec::new())).collect();
        let c = match mode {
            Load::KeptAlive => conns,
            Load::NewConnections | Load::Paced(_) => conns.min(4),
        };
        for _ in 0..b.rounds {
            for (i, (_, v, pid, _)) in peers.iter().enumerate() {
                let sampler = pid.map(TreeSampler::start);
                let (rps, p50, p99, n) = http_load(b, v, c, secs, mode);
                let cpu_ms = sampler.map_or(0.0, |s| s.finish() as f64 * 10.0);
                rows[i]
                    .1
                    .push([rps, p50, p99, cpu_ms / (n as f64 / 1000.0)]);
            }
        }
        println!(
            "\nScenario 7: HTTP through a tunnel, {} ({c} visitors, {secs} s, {} rounds)",
            match mode {
                Load::KeptAlive => "kept-alive connections".to_string(),
                Load::NewConnections => "a new connection per request".to_string(),
                Load::Paced(r) => format!("moderate load: {r:.0} req/s in all, kept alive"),
            },
            b.rounds
        );
        println!(
            "{:<10} {:>10} {:>9} {:>9} {:>16}",
            "peer", "req/s", "p50 ms", "p99 ms", "CPU-ms/1k req"
        );
        for (name, r) in &rows {
            let col = |k: usize| median(r.iter().map(|x| x[k]).collect());
            let cpu = if *name == "direct" {
                "-".to_string()
            } else {
                format!("{:.1}", col(3))
            };
            println!(
                "{:<10} {:>10.0} {:>9.2} {:>9.2} {:>16}",
                name,
                col(0),
                col(1),
                col(2),
                cpu
            );
        }
    }
    // Bulk through the raw TCP tunnels: (GiB/s, server CPU-s/GiB, publisher CPU-s/GiB).
    let mib = b.mib;
    let bulk: Vec<_> = peers
        .iter()
        .filter_map(|(name, _, pid, bulk)| Some((*name, (*pid)?, (*bulk)?)))
        .collect();
    let mut rows: Vec<Vec<[f64; 3]>> = bulk.iter().map(|_| Vec::new()).collect();
    for _ in 0..b.rounds {
        for (i, (name, server, (port, publisher))) in bulk.iter().enumerate() {
            let (s, p) = (TreeSampler::start(*server), TreeSampler::start(*publisher));
            let start = Instant::now();
            let (got, open) = b.rt.block_on(async {
                let tcp = TcpStream::connect(("127.0.0.1", *port)).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                push_pull(tcp, b"BULK", mib).await
            });
            let secs = start.elapsed().as_secs_f64();
            let (s, p) = (s.finish() as f64 / 100.0, p.finish() as f64 / 100.0);
            drop(open);
            assert_eq!(
                got,
                mib << 20,
                "{name}: short bulk transfer through the tunnel"
            );
            let gib = 2.0 * mib as f64 / 1024.0;
            rows[i].push([gib / secs, s / gib, p / gib]);
        }
    }
    println!(
        "\nScenario 7: raw TCP through a tunnel, {mib} MiB each way on one connection ({} rounds)",
        b.rounds
    );
    println!(
        "{:<10} {:>8} {:>18} {:>20} {:>14}",
        "peer", "GiB/s", "server CPU-s/GiB", "publisher CPU-s/GiB", "GiB/CPU-s"
    );
    for ((name, _, _), r) in bulk.iter().zip(&rows) {
        let col = |k: usize| median(r.iter().map(|x| x[k]).collect());
        println!(
            "{:<10} {:>8.2} {:>18.3} {:>20.3} {:>14.2}",
            name,
            col(0),
            col(1),
            col(2),
            1.0 / col(1)
        );
    }
    println!("(GiB/CPU-s: throughput per server CPU-second; the publisher is OpenSSH's ssh, with `sluice connect` for sluice, or the peer's own client)");
}

/// A publisher that accepts any host key and never answers a forwarded channel: an idle
/// device holding one tunnel.
struct IdlePublisher;

impl russh::client::Handler for IdlePublisher {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// One SSH session on `stream` logged in with `key` that publishes `-R NAME:PORT`.
async fn publish_idle<S>(
    stream: S,
    key: Arc<russh::keys::PrivateKey>,
    user: &str,
    name: &str,
    port: u32,
) -> Result<russh::client::Handle<IdlePublisher>, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = Arc::new(russh::client::Config {
        inactivity_timeout: None,
        ..Default::default()
    });
    let mut h = russh::client::connect_stream(config, stream, IdlePublisher)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let auth = h
        .authenticate_publickey(user, russh::keys::PrivateKeyWithHashAlg::new(key, None))
        .await
        .map_err(|e| format!("auth: {e}"))?;
    if !auth.success() {
        return Err("authentication refused".into());
    }
    h.tcpip_forward(name, port)
        .await
        .map_err(|e| format!("tcpip-forward {name}:{port}: {e}"))?;
    Ok(h)
}

/// A server's memory (KiB): the proportional set size of it and its descendants if it forks
/// per connection (sshd: shared pages counted once across the children, where summing RSS
/// would count them in each), else its RSS (PSS would shrink a process whose binary the
/// publishers on this machine also map: bore, rathole).
fn server_kib(pid: u32, forks: bool) -> u64 {
    if forks {
        pss_tree_kib(pid)
    } else {
        rss_kib(pid)
    }
}

/// Proportional set size of a process and its descendants (KiB).
fn pss_tree_kib(pid: u32) -> u64 {
    let pss = |p: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{p}/smaps_rollup"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("Pss:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    pss(pid) + children(pid).iter().map(|(c, _)| pss(*c)).sum::<u64>()
}

/// How many of `ports` have a listening socket on 127.0.0.1 (from /proc/net/tcp).
fn listening(ports: &[u16]) -> usize {
    let want: std::collections::HashSet<u16> = ports.iter().copied().collect();
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(3) == Some(&"0A")
                && f.get(1)
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    .is_some_and(|p| want.contains(&p))
        })
        .count()
}

/// Waits up to `secs` for `n` of `ports` to listen; the count reached.
fn until_listening(ports: &[u16], n: usize, secs: u64) -> usize {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = listening(ports);
        if got >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `n` distinct free ports on 127.0.0.1 (held together while chosen, so none repeats).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Scenario 8: server memory per idle tunnel at `COMPARE_IDLE_TUNNELS` tunnels (default
/// 1,000), each its own publisher connection, as a fleet of devices would hold them: sluice
/// (one SSH session over TLS per tunnel, `-R idle-N:80`), OpenSSH's sshd (one session per
/// tunnel, `-R 0`: a process pair each), rathole (one client, a service each: a Noise control
/// channel per service) and bore (a client process per tunnel). The publishers are russh
/// sessions in this process for sluice and sshd, and the peers' own clients for the others.
fn idle_tunnels(b: &mut Bench) {
    let n: usize = env_or("COMPARE_IDLE_TUNNELS", 1000);
    let d = b.dir.path().join("idle-tunnels");
    std::fs::create_dir_all(&d).unwrap();
    ssh_keys(&d);
    let key = Arc::new(russh::keys::load_secret_key(d.join("client"), None).unwrap());
    let public = std::fs::read_to_string(d.join("client.pub")).unwrap();
    let public = public.trim();
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let mut rows: Vec<IdleRow> = Vec::new();
    let settle = || std::thread::sleep(Duration::from_secs(2));

    // sluice
    let auth = d.join("authorized_keys");
    std::fs::write(&auth, format!("permitlisten=\"idle-*:80\" {public}\n")).unwrap();
    let cfg = format!(
        "[limits]\nmax_connections = 20000\nmax_connections_per_ip = 20000\nmax_unrouted_per_ip = 20000\n[routes.ssh]\n[ssh]\nauthorized_keys = [\"{}\"]\n[tunnels]\ndomain = \"t.localhost\"\nmax_per_identity = {}\n",
        auth.display(),
        n + 16
    );
    match spawn_sluice(b, &d, "sluice.toml", &cfg) {
        Some(sluice) => {
            let cc = client_config(&b.der, Some(b"ssh"));
            let port = sluice.port;
            rows.push(hold_idle(
                b,
                "sluice",
                sluice.child.id(),
                false,
                n,
                16,
                |i| {
                    let (cc, key, user) = (cc.clone(), key.clone(), user.clone());
                    async move {
                        match tls_connect(&cc, port).await {
                            Ok(tls) => {
                                publish_idle(tls, key, &user, &format!("idle-{i}"), 80).await
                            }
                            Err(e) => Err(format!("tls: {e}")),
                        }
                    }
                },
            ));
        }
        None => b
            .skipped
            .push("idle tunnels: sluice (did not start)".into()),
    }

    // sshd
    if have("/usr/sbin/sshd") {
        let _ = std::fs::create_dir_all("/run/sshd");
        let p = free_port();
        let scfg = d.join("sshd_config");
        std::fs::write(
            &scfg,
            format!(
                "Port {p}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nStrictModes no\nUsePAM no\nPidFile none\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nMaxStartups {}\nMaxSessions 10\n",
                d.join("host").display(),
                d.join("sshd_keys").display(),
                n + 16
            ),
        )
        .unwrap();
        std::fs::write(d.join("sshd_keys"), format!("{public}\n")).unwrap();
        match spawn(
            "sshd",
            p,
            Command::new("/usr/sbin/sshd")
                .args(["-D", "-e", "-f"])
                .arg(&scfg),
        ) {
            Some(sshd) => {
                rows.push(hold_idle(b, "sshd -R", sshd.child.id(), true, n, 8, |_| {
                    let (key, user) = (key.clone(), user.clone());
                    async move {
                        match TcpStream::connect(("127.0.0.1", p)).await {
                            Ok(tcp) => publish_idle(tcp, key, &user, "127.0.0.1", 0).await,
                            Err(e) => Err(format!("connect: {e}")),
                        }
                    }
                }));
            }
            None => b.skipped.push("idle tunnels: sshd (did not start)".into()),
        }
    } else {
        b.skipped
            .push("idle tunnels: sshd (not installed: openssh-server)".into());
    }

    // rathole: one client, n services.
    if have("rathole") {
        let (_, private, public) = rathole_keys();
        let control = free_port();
        let ports = free_ports(n);
        if let (Some(private), Some(public)) = (private, public) {
            let mut server = format!("[server]\nbind_addr = \"127.0.0.1:{control}\"\n[server.transport]\ntype = \"noise\"\n[server.transport.noise]\nlocal_private_key = \"{private}\"\n");
            let mut client = format!("[client]\nremote_addr = \"127.0.0.1:{control}\"\n[client.transport]\ntype = \"noise\"\n[client.transport.noise]\nremote_public_key = \"{public}\"\n");
            for (i, port) in ports.iter().enumerate() {
                server.push_str(&format!(
                    "[server.services.s{i}]\ntoken = \"t{i}\"\nbind_addr = \"127.0.0.1:{port}\"\n"
                ));
                client.push_str(&format!(
                    "[client.services.s{i}]\ntoken = \"t{i}\"\nlocal_addr = \"{}\"\n",
                    b.sink
                ));
            }
            std::fs::write(d.join("rathole-server.toml"), server).unwrap();
            std::fs::write(d.join("rathole-client.toml"), client).unwrap();
            if let Some(s) = spawn(
                "rathole",
                control,
                Command::new("rathole")
                    .arg("--server")
                    .arg(d.join("rathole-server.toml")),
            ) {
                let pid = s.child.id();
                let before = server_kib(pid, false);
                let c = spawn_running(
                    "rathole client",
                    Command::new("rathole")
                        .arg("--client")
                        .arg(d.join("rathole-client.toml")),
                );
                let up = until_listening(&ports, n, 180);
                settle();
                let after = server_kib(pid, false);
                rows.push(("rathole", per(before, after, up), up, before, after));
                drop((c, s));
            } else {
                b.skipped
                    .push("idle tunnels: rathole (did not start)".into());
            }
        }
    } else {
        b.skipped
            .push("idle tunnels: rathole (not installed: cargo install rathole)".into());
    }

    // bore: a client process per tunnel.
    if have("bore") {
        if let Some(s) = spawn(
            "bore",
            7835,
            Command::new("bore").args(["server", "--bind-addr", "127.0.0.1", "--min-port", "1024"]),
        ) {
            let pid = s.child.id();
            let before = server_kib(pid, false);
            let ports = free_ports(n);
            let clients: Vec<Peer> = ports
                .iter()
                .filter_map(|port| {
                    spawn_running(
                        "bore client",
                        Command::new("bore").args([
                            "local",
                            &b.sink.port().to_string(),
                            "--local-host",
                            "127.0.0.1",
                            "--to",
                            "127.0.0.1",
                            "--port",
                            &port.to_string(),
                        ]),
                    )
                })
                .collect();
            let up = until_listening(&ports, n, 120);
            settle();
            let after = server_kib(pid, false);
            rows.push(("bore", per(before, after, up), up, before, after));
            drop((clients, s));
        } else {
            b.skipped
                .push("idle tunnels: bore (did not start; is port 7835 free?)".into());
        }
    } else {
        b.skipped
            .push("idle tunnels: bore (not installed: cargo install bore-cli)".into());
    }

    println!("\nScenario 8: server memory per idle tunnel ({n} tunnels, each its own publisher connection; the server's RSS, or for sshd the PSS of its processes)");
    println!(
        "{:<10} {:>8} {:>14} {:>14} {:>14}",
        "peer", "tunnels", "before", "after", "KiB / tunnel"
    );
    for (name, kib, up, before, after) in rows {
        println!("{name:<10} {up:>8} {before:>10} KiB {after:>10} KiB {kib:>14.1}");
    }
}

/// (name, KiB per tunnel, tunnels up, KiB before, KiB after)
type IdleRow = (&'static str, f64, usize, u64, u64);

/// Opens `n` idle publisher sessions (`open(i)`, `concurrency` at a time) against the server
/// `pid` and measures its memory before and after; the sessions close when it returns.
fn hold_idle<F, Fut>(
    b: &Bench,
    name: &'static str,
    pid: u32,
    forks: bool,
    n: usize,
    concurrency: usize,
    open: F,
) -> IdleRow
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<russh::client::Handle<IdlePublisher>, String>>
        + Send
        + 'static,
{
    let before = server_kib(pid, forks);
    let (held, errors) = b.rt.block_on(async {
        let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let mut set = tokio::task::JoinSet::new();
        for i in 0..n {
            let permit = sem.clone().acquire_owned().await.unwrap();
            let session = open(i);
            set.spawn(async move {
                let r = session.await;
                drop(permit);
                r
            });
        }
        collect_sessions(set).await
    });
    std::thread::sleep(Duration::from_secs(2));
    let after = server_kib(pid, forks);
    if let Some(e) = errors.first() {
        println!(
            "{name}: {} of {n} publishers failed, the first: {e}",
            errors.len()
        );
    }
    let up = held.len();
    b.rt.block_on(async move { drop(held) });
    (name, per(before, after, up), up, before, after)
}

fn per(before: u64, after: u64, n: usize) -> f64 {
    (after as f64 - before as f64) / n.max(1) as f64
}

/// The sessions that came up, and the errors of those that did not.
async fn collect_sessions(
    mut set: tokio::task::JoinSet<Result<russh::client::Handle<IdlePublisher>, String>>,
) -> (Vec<russh::client::Handle<IdlePublisher>>, Vec<String>) {
    let (mut held, mut errors) = (Vec::new(), Vec::new());
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(h)) => held.push(h),
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(format!("task: {e}")),
        }
    }
    (held, errors)
}

/// Sends PING through `port` until the sink answers PONG (within `secs`): the path is up.
fn until_pong(port: u16, secs: u64) -> Option<Duration> {
    use std::io::{Read, Write};
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut b = [0u8; 4];
            if s.write_all(b"PING").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"PONG" {
                return Some(start.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// `mib` MiB each way through `127.0.0.1:port` (to the sink); the elapsed time.
fn through(port: u16, mib: usize) -> Duration {
    use std::io::{Read, Write};
    let start = Instant::now();
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..mib {
            if w.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let mut r = s;
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    while let Ok(n) = r.read(&mut buf) {
        if n == 0 {
            break;
        }
        got += n;
    }
    let _ = writer.join();
    assert_eq!(got, mib << 20, "short transfer through port {port}");
    start.elapsed()
}

/// Scenario 9: `sluice tunnel -L` against `ssh -N -L` (with `sluice connect` as its TLS
/// ProxyCommand) through the same sluice: the client side's throughput and CPU per GiB, then
/// how long `sluice tunnel` takes to serve again after the server is killed and restarted.
fn tunnel_client(b: &mut Bench) {
    if !have("ssh") {
        b.skipped
            .push("tunnel client (ssh not installed: openssh-client)".into());
        return;
    }
    let d = b.dir.path().join("tunnel-client");
    std::fs::create_dir_all(&d).unwrap();
    ssh_keys(&d);
    let auth = d.join("authorized_keys");
    std::fs::copy(d.join("client.pub"), &auth).unwrap();
    let rest = format!(
        "[routes.ssh]\n[ssh]\nauthorized_keys = [\"{}\"]\npermit_open = [\"127.0.0.1:*\"]\n",
        auth.display()
    );
    let Some(server) = spawn_sluice(b, &d, "sluice.toml", &rest) else {
        b.skipped
            .push("tunnel client (sluice did not start)".into());
        return;
    };
    let fp = {
        let out = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(d.join("state/ssh_host_ed25519_key"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    let cipher = "aes128-gcm@openssh.com";
    let (pa, pb) = (free_port(), free_port());
    let sink = b.sink.to_string();
    let tunnel_cmd = |port: u16, local: u16| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
        c.args(["tunnel", "--ca"])
            .arg(&b.cert)
            .args(["--host-key", &fp, "-i"])
            .arg(d.join("client"))
            .args(["-L", &format!("127.0.0.1:{local}:{sink}")])
            .arg(format!("tunnel@localhost:{port}"));
        c
    };
    let Some(ours) = spawn_running("sluice tunnel", &mut tunnel_cmd(server.port, pa)) else {
        b.skipped
            .push("tunnel client (sluice tunnel did not start)".into());
        return;
    };
    let proxy = format!(
        "ProxyCommand={} connect --ca {} localhost:{}",
        env!("CARGO_BIN_EXE_sluice"),
        b.cert.display(),
        server.port
    );
    let theirs = spawn_running(
        "ssh -N -L",
        Command::new("ssh")
            .args(["-F", "/dev/null", "-N", "-i"])
            .arg(d.join("client"))
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "LogLevel=ERROR", "-o", &proxy, "-c", cipher])
            .args(["-L", &format!("127.0.0.1:{pb}:{sink}"), "tunnel@localhost"]),
    );
    let mut clients = vec![(ours, pa)];
    if let Some(t) = theirs {
        clients.push((t, pb));
    }
    for (c, port) in &clients {
        assert!(
            until_pong(*port, 30).is_some(),
            "{}: never forwarded",
            c.name
        );
    }
    let mib = b.mib;
    let mut results: Vec<(&'static str, Vec<f64>, Vec<f64>)> = clients
        .iter()
        .map(|(c, _)| (c.name, Vec::new(), Vec::new()))
        .collect();
    for _ in 0..b.rounds {
        for (i, (c, port)) in clients.iter().enumerate() {
            let sampler = TreeSampler::start(c.child.id());
            let secs = through(*port, mib).as_secs_f64();
            let cpu = sampler.finish() as f64 / 100.0;
            let gib = 2.0 * mib as f64 / 1024.0;
            results[i].1.push(gib / secs);
            results[i].2.push(cpu / gib);
        }
    }
    println!("\nScenario 9: the client side of -L through sluice ({cipher} for ssh; {mib} MiB each way): sluice tunnel vs ssh -N -L with sluice connect (client process tree CPU)");
    report(&results);

    // Reconnect: kill the server, start it again on the same port; the time from the new
    // server's start to the first PONG through the unchanged -L (the default backoff).
    drop(clients);
    let mut server = server;
    let Some(mut tunnel) = spawn_running("sluice tunnel", &mut tunnel_cmd(server.port, pa)) else {
        return;
    };
    assert!(until_pong(pa, 30).is_some());
    let mut times = Vec::new();
    for _ in 0..b.rounds.max(5) {
        let _ = server.child.kill();
        let _ = server.child.wait();
        // The old session is dead: the tunnel notices at once (the TCP connection is reset).
        std::thread::sleep(Duration::from_millis(200));
        // sluice.toml still names the same port.
        let start = Instant::now();
        let Some(s) = spawn(
            "sluice",
            server.port,
            Command::new(env!("CARGO_BIN_EXE_sluice"))
                .args(["serve", "--config"])
                .arg(d.join("sluice.toml"))
                .arg("--state-dir")
                .arg(d.join("state")),
        ) else {
            break;
        };
        let listening = start.elapsed();
        match until_pong(pa, 30) {
            Some(t) => times.push((listening + t).as_secs_f64()),
            None => println!("sluice tunnel did not come back within 30 s"),
        }
        server = s;
    }
    let _ = tunnel.child.kill();
    let _ = tunnel.child.wait();
    tunnel.port = 0;
    if !times.is_empty() {
        let max = times.iter().copied().fold(0.0, f64::max);
        println!(
            "\nScenario 9b: sluice tunnel back after a server restart (kill -9, 200 ms down, then start): median {:.2} s, max {:.2} s over {} restarts (from the new server's start to the first byte through -L)",
            median(times.clone()),
            max,
            times.len()
        );
    }
}

/// Who drives scenario 10: the harness's rustls client, or socat (OpenSSL 3, its defaults).
#[derive(Clone, Copy, PartialEq)]
enum OneWayClient {
    Rustls,
    Socat,
}

/// Scenario 10: one direction at a time, upload (client to upstream) and download (upstream to
/// client), from the harness's rustls client and from socat (an OpenSSL client with its own
/// defaults: 8 KiB reads and records, AES-256-GCM first in its offer). The relay's CPU per GiB
/// for each, since the two directions cost differently (decrypt vs encrypt, read vs write).
fn one_way(b: &mut Bench) {
    let peers = tls_peers(b);
    let mib = b.mib;
    let cc = client_config(&b.der, Some(b"http/1.1"));
    let mut clients = vec![OneWayClient::Rustls];
    if have("socat") {
        clients.push(OneWayClient::Socat);
    } else {
        b.skipped
            .push("socat (not installed: apt-get install socat): the OpenSSL client rows".into());
    }
    // The upload body: the request line, then zeros (a sparse file: no disk reads).
    let blob = b.dir.path().join("upload.bin");
    {
        let mut f = std::fs::File::create(&blob).unwrap();
        std::io::Write::write_all(&mut f, UPLOAD).unwrap();
        f.set_len(((mib as u64) << 20) + UPLOAD.len() as u64)
            .unwrap();
    }
    // What an OpenSSL client negotiates with each peer, out of the box.
    for peer in &peers {
        let out = Command::new("openssl")
            .args(["s_client", "-brief", "-connect"])
            .arg(format!("127.0.0.1:{}", peer.port))
            .stdin(Stdio::null())
            .output();
        let suite = out
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .find_map(|l| l.strip_prefix("Ciphersuite: ").map(str::to_string))
            })
            .unwrap_or_else(|| "?".into());
        println!("openssl s_client with {}: {suite}", peer.name);
    }
    type Rows = Vec<(&'static str, Vec<f64>, Vec<f64>)>;
    let fresh = || -> Rows {
        peers
            .iter()
            .map(|p| (p.name, Vec::new(), Vec::new()))
            .collect()
    };
    // (client, upload?) -> rows
    let mut table: Vec<((OneWayClient, bool), Rows)> = Vec::new();
    for &c in &clients {
        for up in [true, false] {
            table.push(((c, up), fresh()));
        }
    }
    let (rt, uploads, rounds) = (&b.rt, &mut b.uploads, b.rounds);
    for _ in 0..rounds {
        for ((client, up), rows) in table.iter_mut() {
            for (i, peer) in peers.iter().enumerate() {
                let pid = peer.child.id();
                let t0 = cpu_ticks(pid);
                let start = Instant::now();
                let end = match (*client, *up) {
                    (OneWayClient::Rustls, true) => rt.block_on(async {
                        let mut tls = tls_connect(&cc, peer.port).await.unwrap();
                        tls.write_all(UPLOAD).await.unwrap();
                        let chunk = vec![0u8; 1 << 20];
                        for _ in 0..mib {
                            tls.write_all(&chunk).await.unwrap();
                        }
                        tls.shutdown().await.unwrap();
                        let (got, at) =
                            tokio::time::timeout(Duration::from_secs(120), uploads.recv())
                                .await
                                .expect("the sink saw the upload end within 120 s")
                                .unwrap();
                        assert_eq!(
                            got,
                            UPLOAD.len() + (mib << 20),
                            "{}: short upload",
                            peer.name
                        );
                        at
                    }),
                    (OneWayClient::Rustls, false) => rt.block_on(async {
                        let mut tls = tls_connect(&cc, peer.port).await.unwrap();
                        tls.write_all(DOWNLOAD).await.unwrap();
                        let mut buf = vec![0u8; 1 << 20];
                        let mut got = 0;
                        while got < mib << 20 {
                            match tls.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => got += n,
                            }
                        }
                        assert_eq!(got, mib << 20, "{}: short download", peer.name);
                        Instant::now()
                    }),
                    (OneWayClient::Socat, true) => {
                        let st = Command::new("socat")
                            .arg("-u")
                            .arg(format!("OPEN:{},rdonly", blob.display()))
                            .arg(format!("OPENSSL:127.0.0.1:{},verify=0", peer.port))
                            .stderr(Stdio::null())
                            .status()
                            .unwrap();
                        assert!(st.success(), "{}: socat upload failed", peer.name);
                        let (got, at) =
                            b.rt.block_on(async {
                                tokio::time::timeout(Duration::from_secs(120), uploads.recv()).await
                            })
                            .expect("the sink saw the upload end within 120 s")
                            .unwrap();
                        assert_eq!(
                            got,
                            UPLOAD.len() + (mib << 20),
                            "{}: short upload",
                            peer.name
                        );
                        at
                    }
                    (OneWayClient::Socat, false) => {
                        // stdin stays open (socat would end the connection at its EOF); the
                        // download ends when the last byte reaches socat's stdout.
                        let mut child = Command::new("socat")
                            .arg("-")
                            .arg(format!("OPENSSL:127.0.0.1:{},verify=0", peer.port))
                            .stdin(Stdio::piped())
                            .stdout(Stdio::piped())
                            .stderr(Stdio::null())
                            .spawn()
                            .unwrap();
                        let mut stdin = child.stdin.take().unwrap();
                        std::io::Write::write_all(&mut stdin, DOWNLOAD).unwrap();
                        let mut out = child.stdout.take().unwrap();
                        let mut buf = vec![0u8; 1 << 20];
                        let mut got = 0;
                        while got < mib << 20 {
                            match std::io::Read::read(&mut out, &mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => got += n,
                            }
                        }
                        let at = Instant::now();
                        drop(stdin);
                        let _ = child.kill();
                        let _ = child.wait();
                        assert_eq!(got, mib << 20, "{}: short download", peer.name);
                        at
                    }
                };
                let secs = end.duration_since(start).as_secs_f64();
                let cpu = (cpu_ticks(pid) - t0) as f64 / 100.0;
                let gib = mib as f64 / 1024.0;
                rows[i].1.push(gib / secs);
                rows[i].2.push(cpu / gib);
            }
        }
    }
    for ((client, up), rows) in &table {
        let who = match client {
            OneWayClient::Rustls => "the harness's rustls client",
            OneWayClient::Socat => "socat (OpenSSL client)",
        };
        let way = if *up {
            "upload, client -> upstream"
        } else {
            "download, upstream -> client"
        };
        println!("\nScenario 10: {way}, {mib} MiB, {who}");
        report(rows);
    }
}
