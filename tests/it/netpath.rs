//! Relays over a real network path, not loopback: the `sluice` binary in one network namespace,
//! the client and the upstream in another, joined by a veth pair at MTU 1500 with scatter-gather,
//! segmentation and receive offloads off, so each skb carries one segment as from a NIC. Loopback hides what
//! such a path does to splice(2): a pipe fills by slots (one per skb fragment), long before its
//! byte capacity. Each test moves 64 MiB up, then (after the client's half-close) 64 MiB down,
//! one direction at a time: traffic the other way would wake a stalled reader by chance (any
//! epoll event on a socket reports its readable state too). Readers are slower than senders;
//! both directions are checked by SHA-256, and the daemon's metrics say which relay moved them.
//!
//! The namespaces are made by the test (`ip netns`, `ip link`, `ethtool`), which needs root; CI
//! runs as root.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cli::{spawn_cmd, Child2};
use crate::support::*;

const BIG: usize = 64 << 20;
const SERVER_IP: &str = "10.99.0.1";
const CLIENT_IP: &str = "10.99.0.2";

/// Two network namespaces joined by a veth pair; removed (with the pair) on drop.
struct NetPath {
    server: String,
    client: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetPath {
    fn new() -> NetPath {
        need("ip", "iproute2");
        need("ethtool", "ethtool");
        let root = rustix::process::geteuid().is_root();
        assert!(
            root,
            "this test makes network namespaces (ip netns add) and needs root; CI runs as root"
        );
        static N: AtomicUsize = AtomicUsize::new(0);
        let tag = format!(
            "{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let path = NetPath {
            server: format!("sluice-{tag}-s"),
            client: format!("sluice-{tag}-c"),
        };
        let (vs, vc) = (format!("vs{tag}"), format!("vc{tag}"));
        ip(&["netns", "add", &path.server]);
        ip(&["netns", "add", &path.client]);
        ip(&[
            "link",
            "add",
            &vs,
            "netns",
            &path.server,
            "type",
            "veth",
            "peer",
            "name",
            &vc,
            "netns",
            &path.client,
        ]);
        for (ns, dev, addr) in [
            (&path.server, &vs, SERVER_IP),
            (&path.client, &vc, CLIENT_IP),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "mtu", "1500", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            // One segment per skb in memory of its own, as a NIC delivers: what fills a pipe by
            // slots. With scatter-gather on, veth hands over the sender's skbs, whose fragments
            // share pages and coalesce, and a pipe fills by bytes as on loopback.
            let out = Command::new("ip")
                .args(["netns", "exec", ns, "ethtool", "-K", dev])
                .args(["sg", "off", "gso", "off", "tso", "off", "gro", "off"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ethtool -K {dev}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        path
    }

    /// Runs `f` on a thread inside the client namespace: every socket it makes lives there.
    fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.client)).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on an fd we hold open; it moves only this thread.
                #[allow(unsafe_code)]
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// `sluice serve` inside the server namespace.
    fn serve(&self, dir: &std::path::Path, config: &str) -> Child2 {
        let path = dir.join("sluice.toml");
        std::fs::write(&path, config).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.server])
            .arg(bin())
            .args(["serve", "--config"])
            .arg(&path)
            .arg("--state-dir")
            .arg(dir.join("state"));
        spawn_cmd(cmd)
    }
}

impl Drop for NetPath {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and with it the pair.
        for ns in [&self.server, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Reads to EOF, hashing what it got, slower than any sender here: in each 32 MiB, the first
/// 4 MiB come at about 2 MB/s (a pause after every 64 KiB), the rest as fast as it can. The
/// slow stretches back up into the daemon's sockets and pipes, where splice(2) stalled.
/// Hashes as it reads: one SHA-256 of 64 MiB at the end would block its runtime for seconds
/// in a debug build, long enough for the daemon's idle timeout.
async fn slow_read<R: AsyncRead + Unpin>(r: &mut R) -> (usize, Vec<u8>) {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    let mut got = 0;
    let mut buf = vec![0u8; 16 * 1024];
    let mut next_pause = 64 * 1024;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                hash.update(&buf[..n]);
                got += n;
            }
        }
        if got >= next_pause {
            next_pause += 64 * 1024;
            if got % (32 << 20) < 4 << 20 {
                // Pacing, not a barrier: this is what makes the reader slower than the sender.
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }
    }
    (got, hash.finalize().to_vec())
}

/// The client's side: sends `data` and half-closes, then reads the answer slowly.
async fn send_then_read<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    data: Vec<u8>,
) -> (usize, Vec<u8>) {
    let _ = s.write_all(&data).await;
    let _ = s.shutdown().await;
    slow_read(&mut s).await
}

/// The upstream's side: reads everything slowly, then sends `data` and closes.
async fn read_then_send<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    data: Vec<u8>,
) -> (usize, Vec<u8>) {
    let got = slow_read(&mut s).await;
    let _ = s.write_all(&data).await;
    let _ = s.shutdown().await;
    got
}

/// A value of a counter in the Prometheus text of `addr`'s /metrics.
fn metric(addr: std::net::SocketAddr, name: &str) -> u64 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// Waits for the log line that says where the admin endpoint listens.
fn admin_addr(d: &Child2) -> std::net::SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = d
            .log
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("sluice did not say where its admin endpoint listens");
        if let Some(i) = line.find("admin=") {
            return line[i + 6..].split(' ').next().unwrap().parse().unwrap();
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Leg {
    /// Plain SSH to the upstream: spliced.
    PlainSpliced,
    /// Plain SSH with `splice_pipes = 0`: the copy relay.
    PlainCopied,
    /// HTTPS: TLS is terminated, so the copy relay.
    Tls,
}

fn sixty_four_mib_each_way_across_veth(leg: Leg) {
    let net = NetPath::new();
    let cert = TestCert::new(&["localhost", SERVER_IP]);
    let dir = tempfile::tempdir().unwrap();
    // The upstream's listener is made in the client namespace and held until the test ends.
    let upstream = net.in_client(|| std::net::TcpListener::bind((CLIENT_IP, 0)).unwrap());
    let up_addr = upstream.local_addr().unwrap();
    let (route, pipes) = match leg {
        Leg::PlainSpliced => ("ssh", 64),
        Leg::PlainCopied => ("ssh", 0),
        Leg::Tls => ("http", 64),
    };
    let config = format!(
        "listen = [\"{SERVER_IP}:0\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\
         [limits]\nsplice_pipes = {pipes}\n\
         [routes.{route}]\nupstream = \"{up_addr}\"\nidle_timeout = \"5s\"\n\
         [admin]\nlisten = \"{SERVER_IP}:0\"\n",
        cert.cert.display(),
        cert.key.display()
    );
    let mut d = net.serve(dir.path(), &config);
    let admin = admin_addr(&d);
    let addr = d.addr;
    let spliced_before = net.in_client(|| metric(admin, "sluice_spliced_bytes_total"));

    let mut sent = b"SSH-2.0-veth\r\n".to_vec();
    sent.extend_from_slice(&pattern(3, BIG - sent.len()));
    let down_data = pattern(2, BIG);
    let want_down = (BIG, sha256(&down_data));
    let want_up = (BIG, sha256(&sent));
    let (down, up) = net.in_client(|| {
        // Worker threads are made here, so they are in the client namespace too.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            upstream.set_nonblocking(true).unwrap();
            let upstream = tokio::net::TcpListener::from_std(upstream).unwrap();
            let serve = async {
                let (s, _) = upstream.accept().await.unwrap();
                read_then_send(s, down_data).await
            };
            let client = async {
                let tcp = TcpStream::connect(addr).await.unwrap();
                match leg {
                    Leg::Tls => {
                        let tls =
                            tokio_rustls::TlsConnector::from(client_config(&cert, &["http/1.1"]))
                                .connect(
                                    rustls::pki_types::ServerName::try_from(SERVER_IP).unwrap(),
                                    tcp,
                                )
                                .await
                                .unwrap();
                        send_then_read(tls, sent.clone()).await
                    }
                    _ => send_then_read(tcp, sent.clone()).await,
                }
            };
            tokio::time::timeout(Duration::from_secs(120), async {
                tokio::join!(client, serve)
            })
            .await
            .expect("64 MiB each way across veth within 120 s")
        })
    });
    let spliced = net.in_client(|| metric(admin, "sluice_spliced_bytes_total")) - spliced_before;
    crate::cli::sigterm(&d.child);
    crate::cli::wait_exit(&mut d.child, Duration::from_secs(10));
    let log: Vec<String> = d.log.try_iter().collect();
    let log = log.join("\n");
    assert_eq!(
        down,
        want_down,
        "upstream -> client: all 64 MiB, intact (a stalled leg ends at the idle timeout); log:\n{log}"
    );
    assert_eq!(
        up,
        want_up,
        "client -> upstream: all 64 MiB, intact (a stalled leg ends at the idle timeout); log:\n{log}"
    );
    match leg {
        // All but the first bytes, which detection read and the daemon wrote from user space.
        Leg::PlainSpliced => assert!(
            spliced > 2 * BIG as u64 - 64 * 1024,
            "both directions spliced: {spliced} bytes"
        ),
        _ => assert_eq!(spliced, 0, "nothing spliced on this leg"),
    }
    // The connection's log line names the relay core too.
    let want = if leg == Leg::PlainSpliced {
        "relay=\"splice\""
    } else {
        "relay=\"copy\""
    };
    assert!(
        log.lines()
            .any(|l| l.contains("connection closed") && l.contains(want)),
        "no `connection closed ... {want}` line in:\n{log}"
    );
}

#[test]
fn plain_leg_spliced_across_veth_with_slow_readers() {
    sixty_four_mib_each_way_across_veth(Leg::PlainSpliced);
}

#[test]
fn plain_leg_copied_across_veth_with_slow_readers() {
    sixty_four_mib_each_way_across_veth(Leg::PlainCopied);
}

#[test]
fn tls_leg_across_veth_with_slow_readers() {
    sixty_four_mib_each_way_across_veth(Leg::Tls);
}
