//! End-to-end comparison on this machine: sluice against HAProxy, stunnel and sslh, configured
//! alike (same ECDSA P-256 certificate, same upstream sink on 127.0.0.1), measured interleaved
//! (A B A B ...) and reported as medians. Peers that are not installed are skipped, and said so.
//!
//! Scenarios so far: (1) bulk TLS -> upstream, N MiB each way on one connection; (2) bulk on a
//! plain leg (plain SSH -> upstream) against sslh. For each: throughput and the relay process's
//! CPU seconds per GiB (from /proc/PID/stat).
//!
//! Run: `cargo bench --bench compare` (env COMPARE_MIB=1024 COMPARE_ROUNDS=3 to change sizes).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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

/// An upstream that discards what it reads and sends `mib` MiB back, per connection.
async fn sink(mib: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let writer = tokio::spawn(async move {
                    let chunk = vec![0u8; 1 << 20];
                    for _ in 0..mib {
                        if w.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                    let _ = w.shutdown().await;
                });
                let mut buf = vec![0u8; 1 << 20];
                while let Ok(n) = r.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = writer.await;
            });
        }
    });
    addr
}

/// Writes `mib` MiB while reading `mib` MiB; returns when both are done.
/// Returns the bytes read and the two halves, still open (so that CPU can be measured while a
/// per-connection process still exists).
async fn push_pull<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    first: &[u8],
    mib: usize,
) -> (usize, Box<dyn std::any::Any>)
where
    S: 'static,
{
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

fn client_config(cert: &rustls::pki_types::CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; this harness takes no arguments.
    let mib: usize = std::env::var("COMPARE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let rounds: usize = std::env::var("COMPARE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
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
    let der = ck.cert.der().clone();
    let sink_addr = rt.block_on(sink(mib));
    let sluice = env!("CARGO_BIN_EXE_sluice");

    println!(
        "sluice compare: {mib} MiB each way per run, {rounds} interleaved rounds, 2-vCPU loopback"
    );
    let mut skipped = Vec::new();

    // Scenario 1: TLS -> upstream.
    let mut tls_peers: Vec<Peer> = Vec::new();
    let p = free_port();
    let cfg = dir.path().join("sluice.toml");
    std::fs::write(
        &cfg,
        format!("listen = [\"127.0.0.1:{p}\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[routes.http]\nupstream = \"{sink_addr}\"\n", cert.display(), key.display()),
    )
    .unwrap();
    if let Some(peer) = spawn(
        "sluice",
        p,
        Command::new(sluice)
            .args(["serve", "--config"])
            .arg(&cfg)
            .args(["--state-dir"])
            .arg(dir.path().join("state")),
    ) {
        tls_peers.push(peer);
    }
    if have("haproxy") {
        let p = free_port();
        let hcfg = dir.path().join("haproxy.cfg");
        std::fs::write(
            &hcfg,
            format!(
                "global\n  nbthread 1\n  tune.ssl.default-dh-param 2048\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend f\n  bind 127.0.0.1:{p} ssl crt {} alpn http/1.1\n  default_backend b\nbackend b\n  server s {sink_addr}\n",
                combined.display()
            ),
        )
        .unwrap();
        match spawn(
            "haproxy",
            p,
            Command::new("haproxy").arg("-db").arg("-f").arg(&hcfg),
        ) {
            Some(peer) => tls_peers.push(peer),
            None => skipped.push("haproxy (did not start)".to_string()),
        }
    } else {
        skipped.push("haproxy (not installed)".into());
    }
    let stunnel = ["stunnel4", "stunnel"].into_iter().find(|c| have(c));
    if let Some(bin) = stunnel {
        let p = free_port();
        let scfg = dir.path().join("stunnel.conf");
        std::fs::write(&scfg, format!("foreground = yes\npid =\n[bench]\naccept = 127.0.0.1:{p}\nconnect = {sink_addr}\ncert = {}\n", combined.display())).unwrap();
        match spawn("stunnel", p, Command::new(bin).arg(&scfg)) {
            Some(peer) => tls_peers.push(peer),
            None => skipped.push("stunnel (did not start)".into()),
        }
    } else {
        skipped.push("stunnel (not installed)".into());
    }

    let mut results: Vec<(&'static str, Vec<f64>, Vec<f64>)> = tls_peers
        .iter()
        .map(|p| (p.name, Vec::new(), Vec::new()))
        .collect();
    let cc = client_config(&der);
    for _ in 0..rounds {
        for (i, peer) in tls_peers.iter().enumerate() {
            let pid = peer.child.id();
            let t0 = cpu_ticks(pid);
            let start = Instant::now();
            let got = rt.block_on(async {
                let tcp = TcpStream::connect(("127.0.0.1", peer.port)).await.unwrap();
                let tls = tokio_rustls::TlsConnector::from(cc.clone())
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await
                    .unwrap();
                push_pull(tls, b"", mib).await.0
            });
            let secs = start.elapsed().as_secs_f64();
            let cpu = (cpu_ticks(pid) - t0) as f64 / 100.0;
            assert_eq!(got, mib << 20, "{}: short transfer", peer.name);
            let gib = 2.0 * mib as f64 / 1024.0;
            results[i].1.push(gib / secs);
            results[i].2.push(cpu / gib);
        }
    }
    println!("\nScenario 1: bulk TLS -> upstream ({mib} MiB each way, one connection)");
    report(&results);

    // Scenario 2: plain leg (plain SSH -> upstream).
    let mut plain_peers: Vec<Peer> = Vec::new();
    let p = free_port();
    let cfg2 = dir.path().join("sluice-plain.toml");
    std::fs::write(&cfg2, format!("listen = [\"127.0.0.1:{p}\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[routes.ssh]\nupstream = \"{sink_addr}\"\n", cert.display(), key.display())).unwrap();
    if let Some(peer) = spawn(
        "sluice",
        p,
        Command::new(sluice)
            .args(["serve", "--config"])
            .arg(&cfg2)
            .args(["--state-dir"])
            .arg(dir.path().join("state")),
    ) {
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
                &sink_addr.to_string(),
            ]),
        ) {
            Some(peer) => plain_peers.push(peer),
            None => skipped.push("sslh (did not start)".into()),
        }
    } else {
        skipped.push("sslh (not installed)".into());
    }
    let mut notes: Vec<String> = Vec::new();
    let mut results: Vec<(&'static str, Vec<f64>, Vec<f64>)> = plain_peers
        .iter()
        .map(|p| (p.name, Vec::new(), Vec::new()))
        .collect();
    for _ in 0..rounds {
        for (i, peer) in plain_peers.iter().enumerate() {
            // sslh-fork does the work in a child process; count the whole process group's CPU
            // by summing children too.
            let pid = peer.child.id();
            // Children may exit before the transfer returns (sslh closes at the first EOF) and
            // sslh ignores SIGCHLD, so their CPU is never added to it: sample while it runs.
            let sampler = TreeSampler::start(pid);
            let start = Instant::now();
            let (got, open) = rt.block_on(async {
                let tcp = TcpStream::connect(("127.0.0.1", peer.port)).await.unwrap();
                push_pull(tcp, b"SSH-2.0-bench\r\n", mib).await
            });
            let secs = start.elapsed().as_secs_f64();
            // Measured while the connection (and a forked per-connection process) still exists.
            let cpu = sampler.finish() as f64 / 100.0;
            drop(open);
            if got != mib << 20 {
                // sslh closes both directions at the first EOF: the tail of the reply is lost.
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
    if !skipped.is_empty() {
        println!("\nSkipped: {}", skipped.join(", "));
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

/// CPU of a process and its live children (sslh-fork relays in a child per connection).
#[allow(dead_code)]
fn tree_ticks(pid: u32) -> u64 {
    let mut total = cpu_ticks(pid);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            let f: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            if f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
                total += cpu_ticks(child);
            }
        }
    }
    total
}

fn report(results: &[(&'static str, Vec<f64>, Vec<f64>)]) {
    let Some(base) = results.iter().find(|r| r.0.starts_with("sluice")) else {
        return;
    };
    let (b_thr, b_cpu) = (median(base.1.clone()), median(base.2.clone()));
    println!(
        "{:<10} {:>10} {:>12} {:>16} {:>16}",
        "peer", "GiB/s", "CPU-s/GiB", "sluice thr x", "sluice CPU /"
    );
    for (name, thr, cpu) in results {
        let (t, c) = (median(thr.clone()), median(cpu.clone()));
        println!(
            "{:<10} {:>10.2} {:>12.3} {:>16.2} {:>16.2}",
            name,
            t,
            c,
            b_thr / t,
            b_cpu / c
        );
    }
}
