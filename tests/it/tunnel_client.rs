//! `sluice tunnel`, the client without OpenSSH: -L, -R (port and name) and -D against sluice's
//! embedded server and against a real OpenSSH sshd; keys from files, SSH_KEY and a real
//! ssh-agent; host keys from known_hosts or pinned; reconnecting after the server restarts.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ssh::{keygen, port_range, start_sshd, Fixture};
use crate::support::*;

/// `sluice tunnel ARGS` with its log lines on a channel; killed on drop.
struct Tunnel {
    child: Child,
    log: Receiver<String>,
    seen: Vec<String>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tunnel {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Tunnel {
        let mut cmd = Command::new(bin());
        cmd.arg("tunnel")
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("SSH_KEY")
            .env_remove("SSH_USER")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Tunnel {
            child,
            log,
            seen: Vec::new(),
        }
    }

    /// The next line containing every one of `needles`, within `limit`.
    fn line_with(&mut self, needles: &[&str], limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.log.recv_timeout(left) else {
                panic!(
                    "no line with {needles:?} within {limit:?}; the log:\n{}",
                    self.seen.join("\n")
                );
            };
            self.seen.push(line.clone());
            if needles.iter().all(|n| line.contains(n)) {
                return line;
            }
        }
    }

    /// Waits for the process to exit (at most `limit`): its code and everything it logged.
    fn exit(&mut self, limit: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                while let Ok(l) = self.log.recv_timeout(Duration::from_millis(500)) {
                    self.seen.push(l);
                }
                return (st.code(), self.seen.join("\n"));
            }
            assert!(
                Instant::now() < deadline,
                "sluice tunnel still runs: {}",
                self.seen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The value of `key=` in a log line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let at = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        + key.len()
        + 1;
    line[at..].split_whitespace().next().unwrap()
}

/// Sends `n` pseudo-random bytes to `addr` (an echo, end to end) and checks that the same
/// bytes come back, by SHA-256.
async fn echo_intact(addr: &str, n: usize) {
    let data: Vec<u8> = (0..n)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(n);
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut back))
        .await
        .expect("the echo took over 60 s")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), n, "{addr}: bytes lost");
    assert_eq!(sha256(&back), sha256(&data), "{addr}: bytes changed");
}

/// A one-line HTTP server for -D: answers `hello from behind` to every request.
async fn http_target() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 18\r\nConnection: close\r\n\r\nhello from behind\n")
                    .await;
            });
        }
    });
    addr
}

const TUNNELS: &str = "[tunnels]\ndomain = \"t.localhost\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l_r_and_d_through_sluice_with_a_key_file_and_ssh_key() {
    need("curl", "curl");
    let dir = tempfile::tempdir().unwrap();
    let owner = keygen(dir.path(), "owner");
    let visitor = keygen(dir.path(), "visitor");
    let web = http_target().await;
    let authorized = format!(
        "permitlisten=\"myapp:80\",permitlisten=\"localhost:*\" {}\n{}\n",
        owner.public.trim(),
        visitor.public.trim()
    );
    let (_, range) = port_range(4);
    let permit = [web.to_string(), "myapp:*".to_string()];
    let f = Fixture::with(&authorized, &permit, &range, TUNNELS).await;
    let server = format!("tunnel@localhost:{}", f.d.addr.port());
    let fp = f.host_key_fingerprint();
    let local = reserve_ports(2);
    let (l, d) = (
        format!("127.0.0.1:{local}"),
        format!("127.0.0.1:{}", local + 1),
    );

    let mut t = Tunnel::start(
        &[
            "--ca",
            f.cert.cert.to_str().unwrap(),
            "--host-key",
            &fp,
            "-i",
            owner.private.to_str().unwrap(),
            "-L",
            &format!("{l}:{}", f.echo),
            "-R",
            &format!("myapp:80:{}", f.echo),
            "-R",
            &format!("0:{}", f.echo),
            "-D",
            &d,
            &server,
        ],
        &[],
    );
    let by_port = t.line_with(
        &["remote forward in place", "-R localhost:0"],
        Duration::from_secs(20),
    );
    let port = field(&by_port, "listen")
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    t.line_with(&["connected"], Duration::from_secs(5));

    // -L, 16 MiB each way, to the echo server the server side reaches.
    echo_intact(&l, 16 << 20).await;
    // -R with a port the server chose: sluice listens there and comes back to the echo.
    echo_intact(&format!("127.0.0.1:{port}"), 16 << 20).await;
    // -R NAME: another key reaches the name with ssh -W.
    let (ok, out, err) = f.w(&visitor.private, "myapp:80", b"by name").await;
    assert!(
        ok && out == b"by name",
        "myapp:80 through the tunnel: {err}"
    );
    // -D: curl through the SOCKS5 proxy, the name resolved on the server's side.
    let out = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "10", "--socks5-hostname", &d])
        .arg(format!("http://localhost:{}/", web.port()))
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from behind\n",
        "{out:?}"
    );
    // A target permit_open refuses: curl is told (SOCKS refusal), the tunnel lives on.
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "10",
            "--socks5-hostname",
            &d,
            "http://localhost:1/",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    echo_intact(&l, 1024).await;
    drop(t);

    // SSH_KEY, as a path and as the key itself; the user from SSH_USER.
    let text = std::fs::read_to_string(&owner.private).unwrap();
    let target = format!("localhost:{}", f.d.addr.port());
    for key in [owner.private.to_str().unwrap(), text.as_str()] {
        let mut t = Tunnel::start(
            &[
                "--ca",
                f.cert.cert.to_str().unwrap(),
                "--host-key",
                &fp,
                "-L",
                &format!("{l}:{}", f.echo),
                &target,
            ],
            &[("SSH_KEY", key), ("SSH_USER", "tunnel")],
        );
        t.line_with(&["connected"], Duration::from_secs(20));
        echo_intact(&l, 1 << 20).await;
    }

    // A key the server does not know: refused at the first attempt, with the key named.
    let stranger = keygen(dir.path(), "stranger");
    let mut t = Tunnel::start(
        &[
            "--ca",
            f.cert.cert.to_str().unwrap(),
            "--host-key",
            &fp,
            "-i",
            stranger.private.to_str().unwrap(),
            "-R",
            "0:127.0.0.1:9",
            &server,
        ],
        &[],
    );
    let (code, log) = t.exit(Duration::from_secs(20));
    assert_eq!(code, Some(77), "{log}");
    assert!(
        log.contains("accepted none of") && log.contains("stranger"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_openssh_sshd_with_ssh_agent_and_known_hosts() {
    need("ssh-agent", "openssh-client");
    need("ssh-add", "openssh-client");
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "agent-key");
    let sshd = start_sshd(&key).await;
    let echo = echo_upstream().await;
    let user = crate::ssh::login_user();
    let server = format!("{user}@127.0.0.1:{}", sshd.port);
    // A real agent holding the key; sluice tunnel gets no key file at all.
    let sock = dir.path().join("agent.sock");
    let mut agent = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "ssh-agent never made its socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let added = Command::new("ssh-add")
        .arg(&key.private)
        .env("SSH_AUTH_SOCK", &sock)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(added.success());
    let known = dir.path().join("known_hosts");
    let local = reserve_ports(1);
    let l = format!("127.0.0.1:{local}");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--no-tls".into(),
            "--known-hosts".into(),
            known.display().to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.extend([
            "-L".into(),
            format!("{l}:{echo}"),
            "-R".into(),
            format!("0:{echo}"),
            server.clone(),
        ]);
        v
    };
    let env = [
        ("SSH_AUTH_SOCK", sock.to_str().unwrap()),
        ("HOME", dir.path().to_str().unwrap()),
    ];
    let start =
        |a: &[String]| Tunnel::start(&a.iter().map(String::as_str).collect::<Vec<_>>(), &env);

    // Unknown host: refused, with its fingerprint and the line to add.
    let mut t = start(&args(&[]));
    let (code, log) = t.exit(Duration::from_secs(20));
    assert_eq!(code, Some(77), "{log}");
    let host_line = format!(
        "[127.0.0.1]:{} {}",
        sshd.port,
        sshd.host_public
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    );
    assert!(log.contains("not known: SHA256:"), "{log}");
    assert!(log.contains(&host_line), "the line to add is shown: {log}");

    // A different key recorded for the host: refused as changed, whatever --accept-new says.
    let other = keygen(dir.path(), "other-host");
    std::fs::write(
        &known,
        format!("[127.0.0.1]:{} {}\n", sshd.port, other.public),
    )
    .unwrap();
    let mut t = start(&args(&["--accept-new"]));
    let (code, log) = t.exit(Duration::from_secs(20));
    assert_eq!(code, Some(77), "{log}");
    assert!(
        log.contains("HAS CHANGED") && log.contains("line 1"),
        "{log}"
    );

    // --accept-new on an unknown host records it; then the recorded key (hashed, as
    // `ssh-keygen -H` writes it) is known.
    std::fs::remove_file(&known).unwrap();
    let mut t = start(&args(&["--accept-new"]));
    t.line_with(&["connected"], Duration::from_secs(20));
    drop(t);
    assert!(std::fs::read_to_string(&known)
        .unwrap()
        .contains(&host_line));
    let hashed = Command::new("ssh-keygen")
        .arg("-H")
        .arg("-f")
        .arg(&known)
        .output()
        .unwrap();
    assert!(hashed.status.success(), "{hashed:?}");
    assert!(std::fs::read_to_string(&known).unwrap().starts_with("|1|"));

    // -D too, and the admin endpoint: the state as a metric, /readyz while connected.
    let (d, admin) = (reserve_ports(1), reserve_ports(1));
    let web = http_target().await;
    let mut t = start(&args(&[
        "-D",
        &format!("127.0.0.1:{d}"),
        "--admin",
        &format!("127.0.0.1:{admin}"),
    ]));
    let by_port = t.line_with(&["remote forward in place"], Duration::from_secs(20));
    let port = field(&by_port, "listen")
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    t.line_with(&["connected"], Duration::from_secs(5));
    echo_intact(&l, 16 << 20).await;
    // OpenSSH's sshd listens on the port it chose for -R 0.
    echo_intact(&format!("127.0.0.1:{port}"), 16 << 20).await;
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "10",
            "--socks5-hostname",
            &format!("127.0.0.1:{d}"),
        ])
        .arg(format!("http://127.0.0.1:{}/", web.port()))
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from behind\n",
        "{out:?}"
    );
    let get = |path: &str| {
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:{admin}{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let metrics = get("/metrics");
    assert!(
        metrics.contains("sluice_tunnel_client_state{state=\"connected\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_tunnel_client_state_changes_total{state=\"connected\"} 1"),
        "{metrics}"
    );
    assert!(get("/readyz").ends_with("200"));
    drop(t);
    let _ = agent.kill();
    let _ = agent.wait();
}

/// Tries an echo through `addr` until it answers, within `limit`.
async fn until_echoes(addr: &str, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let tried = async {
            let mut s = TcpStream::connect(addr).await.ok()?;
            s.write_all(b"are you there").await.ok()?;
            let mut back = [0u8; 13];
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
                .await
                .ok()?
                .ok()?;
            (&back == b"are you there").then_some(())
        };
        if tried.await.is_some() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr} never echoed within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_bundle_publishes_and_both_ends_come_back_after_a_restart_and_a_dead_link() {
    use crate::grants::{Server, DEVICE, NAME};
    let dir = tempfile::tempdir().unwrap();
    let admin = keygen(dir.path(), "admin");
    let mut s = Server::start(dir.path(), admin, 4, "");
    let echo = echo_upstream().await;
    let issued = s
        .issue(&[
            "--device",
            DEVICE,
            "--ttl",
            "10m",
            "--local",
            &echo.to_string(),
        ])
        .await;
    let bundle = dir.path().join("grant.json");
    std::fs::write(&bundle, issued.to_string()).unwrap();
    let port = issued["grant"]["port"].as_u64().unwrap();
    let cert = s.cert.cert.to_str().unwrap().to_string();

    // The device, as a service: a device config naming the bundle (key, certificate, user,
    // server, host key, forwards) and the CA.
    let device_toml = dir.path().join("device.toml");
    std::fs::write(
        &device_toml,
        format!("grant = \"grant.json\"\nkeepalive = \"3s\"\n[tls]\nca = \"{cert}\"\n"),
    )
    .unwrap();
    // systemd's side of Type=notify and WatchdogSec=2s (a ping every second).
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    // Read at once, as systemd does: the socket queues only a few datagrams (10 here) and the
    // sender blocks when it is full.
    let (notes_tx, notes) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok(n) = notify.recv(&mut buf) {
            if notes_tx
                .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                .is_err()
            {
                break;
            }
        }
    });
    let mut device = Tunnel::start(
        &["--config", device_toml.to_str().unwrap()],
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000000"),
        ],
    );
    let notified = |want: &str| {
        let mut got = Vec::new();
        loop {
            let m = notes
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("no {want:?} from sd_notify ({e}); got {got:?}"));
            if m.contains(want) {
                return got;
            }
            got.push(m);
        }
    };
    let before = notified("READY=1");
    assert!(before.is_empty(), "READY=1 comes first: {before:?}");
    notified("STATUS=connected");
    notified("WATCHDOG=1");
    device.line_with(
        &["remote forward in place", &format!("-R {NAME}:")],
        Duration::from_secs(20),
    );
    device.line_with(&["connected"], Duration::from_secs(5));
    s.line_with(&["tunnel published", NAME]);
    // The cloud: the admin key's -L to the grant's port on the server, which the device's -R
    // holds: through two tunnels to the echo.
    let lp = reserve_ports(1);
    let l = format!("127.0.0.1:{lp}");
    let server = format!("tunnel@localhost:{}", s.port());
    let fp = crate::ssh::host_key_fingerprint(&dir.path().join("state/ssh_host_ed25519_key"));
    let mut cloud = Tunnel::start(
        &[
            "--ca",
            &cert,
            "--host-key",
            &fp,
            "-i",
            s.admin.private.to_str().unwrap(),
            "--keepalive",
            "3s",
            "-L",
            &format!("{l}:127.0.0.1:{port}"),
            &server,
        ],
        &[],
    );
    cloud.line_with(&["connected"], Duration::from_secs(20));
    until_echoes(&l, Duration::from_secs(20)).await;
    // 16 MiB each way through a published name: -L on one client, -R NAME on the other.
    echo_intact(&l, 16 << 20).await;

    // A restart on the same port: both notice, keep their local ports, and come back.
    let config = std::fs::read_to_string(dir.path().join("sluice.toml")).unwrap();
    let fixed = config.replacen(
        "listen = [\"127.0.0.1:0\"]",
        &format!("listen = [\"127.0.0.1:{}\"]", s.port()),
        1,
    );
    std::fs::write(dir.path().join("sluice.toml"), fixed).unwrap();
    s.stop();
    device.line_with(&["disconnected"], Duration::from_secs(10));
    cloud.line_with(&["disconnected"], Duration::from_secs(10));
    // The -L port is still bound while the server is away: a client is let in and reset,
    // never refused.
    let mut c = TcpStream::connect(&l)
        .await
        .expect("the -L port vanished while disconnected");
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(30), c.read(&mut b))
        .await
        .unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let restarted = Instant::now();
    s.spawn();
    device.line_with(&["connected"], Duration::from_secs(20));
    cloud.line_with(&["connected"], Duration::from_secs(20));
    eprintln!(
        "both back {:?} after the restart began",
        restarted.elapsed()
    );
    until_echoes(&l, Duration::from_secs(20)).await;
    s.line_with(&["tunnel published", NAME]);

    // A dead link: the server stops answering (SIGSTOP). Both notice within the keepalive
    // bound (3 s here; a little more for the check interval), then come back once it does.
    let pid = s.d.as_ref().unwrap().child.id().to_string();
    let stopped = Instant::now();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let line = device.line_with(&["disconnected"], Duration::from_secs(10));
    let noticed = stopped.elapsed();
    assert!(
        line.contains("keepalive") || line.contains("failed"),
        "{line}"
    );
    cloud.line_with(&["disconnected"], Duration::from_secs(10));
    assert!(
        noticed < Duration::from_secs(6),
        "the dead link went unnoticed for {noticed:?}"
    );
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    device.line_with(&["connected"], Duration::from_secs(30));
    cloud.line_with(&["connected"], Duration::from_secs(30));
    until_echoes(&l, Duration::from_secs(20)).await;
    echo_intact(&l, 1 << 20).await;

    // SIGTERM: channels closed, exit 0.
    crate::cli::sigterm(&device.child);
    let (code, log) = device.exit(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{log}");
    // Reconnect and stop were told too (after many watchdog pings).
    notified("STOPPING=1");
    s.stop();
}

#[test]
fn a_bad_device_config_is_refused_with_its_place_and_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("device.toml");
    std::fs::write(
        &cfg,
        "server = \"s.example.org\"\nremote = [\"cam:22:localhost\"]\n",
    )
    .unwrap();
    let mut t = Tunnel::start(&["--config", cfg.to_str().unwrap()], &[]);
    let (code, log) = t.exit(Duration::from_secs(10));
    assert_eq!(code, Some(78), "{log}");
    assert!(
        log.contains(&format!(
            "{}:2:11: remote: -R cam:22:localhost: port `cam` is not a port",
            cfg.display()
        )),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_key_asks_for_its_passphrase_on_the_terminal() {
    need("script", "bsdutils");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("locked");
    let made = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "open sesame",
            "-C",
            "locked",
            "-f",
        ])
        .arg(&key)
        .status()
        .unwrap();
    assert!(made.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let (_, range) = port_range(2);
    let f = Fixture::with(&public, &[], &range, "").await;
    let l = format!("127.0.0.1:{}", reserve_ports(1));
    let cmd = format!(
        "{} tunnel --ca {} --host-key {} -i {} -L {l}:{} tunnel@localhost:{}",
        bin().display(),
        f.cert.cert.display(),
        f.host_key_fingerprint(),
        key.display(),
        f.echo,
        f.d.addr.port()
    );
    // script(1) gives it a terminal: the prompt comes out there, the passphrase goes in.
    let mut child = tokio::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    read_until(&mut out, &mut seen, "Enter passphrase for").await;
    stdin.write_all(b"open sesame\n").await.unwrap();
    read_until(&mut out, &mut seen, "connected").await;
    assert!(
        !seen.contains("open sesame"),
        "the passphrase was echoed: {seen}"
    );
    echo_intact(&l, 1 << 20).await;
}

/// Reads `out` into `seen` until it holds `needle` (20 s).
async fn read_until(
    out: &mut (impl tokio::io::AsyncRead + Unpin),
    seen: &mut String,
    needle: &str,
) {
    let mut buf = [0u8; 1024];
    while !seen.contains(needle) {
        let n = tokio::time::timeout(Duration::from_secs(20), out.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no `{needle}` on the terminal: {seen}"))
            .unwrap();
        assert!(n > 0, "the terminal closed before `{needle}`: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

/// A local client that stops reading one `-L` connection while its target keeps sending
/// does not stall the session's other forwards. russh's client granted window on receipt
/// and pushed data into each channel's bounded queue with a blocking send: one full queue
/// stopped the session loop, and every channel with it (sluice's patch gates client-side
/// channels as it does the server's: window back as the application reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_nobody_reads_does_not_stall_the_others() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "key");
    let sshd = start_sshd(&key).await;
    let echo = echo_upstream().await;
    // A target that sends as fast as it may, counting what its socket took.
    let sent = std::sync::Arc::new(AtomicU64::new(0));
    let hose = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hose_addr = hose.local_addr().unwrap();
    let counter = sent.clone();
    tokio::spawn(async move {
        let (mut s, _) = hose.accept().await.unwrap();
        let chunk = vec![7u8; 64 << 10];
        while let Ok(n) = s.write(&chunk).await {
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    let local = reserve_ports(2);
    let (stuck, l) = (
        format!("127.0.0.1:{local}"),
        format!("127.0.0.1:{}", local + 1),
    );
    let known = dir.path().join("known_hosts");
    let server = format!("{}@127.0.0.1:{}", crate::ssh::login_user(), sshd.port);
    let mut t = Tunnel::start(
        &[
            "--no-tls",
            "--known-hosts",
            known.to_str().unwrap(),
            "--accept-new",
            "-i",
            key.private.to_str().unwrap(),
            "-L",
            &format!("{stuck}:{hose_addr}"),
            "-L",
            &format!("{l}:{echo}"),
            &server,
        ],
        &[("HOME", dir.path().to_str().unwrap())],
    );
    t.line_with(&["connected"], Duration::from_secs(20));

    // Connect and never read, until every buffer on the way is full: the target's count
    // stands still for a second.
    let mut unread = TcpStream::connect(&stuck).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut last, mut since) = (0, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = sent.load(Ordering::Relaxed);
        if now != last || now == 0 {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_secs(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the target never stopped: {now} bytes"
        );
    }
    assert!(
        last >= 1 << 20,
        "only {last} bytes reached the stalled forward"
    );

    // The other forward carries 16 MiB each way meanwhile.
    echo_intact(&l, 16 << 20).await;

    // And the stalled one resumes once read: everything the target sent arrives.
    let mut got = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    let deadline = Instant::now() + Duration::from_secs(30);
    while got < last + (8 << 20) {
        let n = tokio::time::timeout(Duration::from_secs(10), unread.read(&mut buf))
            .await
            .expect("the stalled forward did not resume")
            .unwrap();
        assert!(n > 0, "the stalled forward ended after {got} bytes");
        assert!(buf[..n].iter().all(|&b| b == 7), "bytes changed");
        got += n as u64;
        assert!(Instant::now() < deadline, "{got} bytes in 30 s");
    }
}

/// The TLS side as `sluice connect` has it, end to end: an HTTP CONNECT proxy that wants
/// credentials, a client certificate the ssh route requires, the server's certificate checked
/// against `--ca`; behind sluice a real OpenSSH sshd. Without the certificate, the log says
/// what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_connect_proxy_with_a_client_certificate_to_openssh() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "key");
    let sshd = start_sshd(&key).await;
    let echo = echo_upstream().await;
    let cert = TestCert::localhost();
    let (client_ca, client_cert, client_key) = crate::connect::client_pki(dir.path());
    let d = Daemon::start_raw(&format!(
        "listen = [\"127.0.0.1:0\"]\nshutdown_grace = \"2s\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n[routes.ssh]\nupstream = \"127.0.0.1:{}\"\nrequire_client_cert = true\n",
        cert.cert.display(),
        cert.key.display(),
        client_ca.display(),
        sshd.port
    ))
    .await;
    let host_pub = dir.path().join("host.pub");
    std::fs::write(&host_pub, &sshd.host_public).unwrap();
    let fp = crate::ssh::host_key_fingerprint(&host_pub);
    let (proxy, mut seen) = crate::connect::connect_proxy(true).await;
    let local = reserve_ports(1);
    let l = format!("127.0.0.1:{local}");
    let target = format!("localhost:{}", d.addr.port());
    let server = format!("{}@{target}", crate::ssh::login_user());
    let proxy_url = format!("http://user:pw@{proxy}");
    let mut args = vec![
        "--ca",
        cert.cert.to_str().unwrap(),
        "--proxy",
        &proxy_url,
        "--host-key",
        &fp,
        "-i",
        key.private.to_str().unwrap(),
        "-L",
    ];
    let forward = format!("{l}:{echo}");
    args.push(&forward);
    let with_cert = [
        "--cert",
        client_cert.to_str().unwrap(),
        "--key",
        client_key.to_str().unwrap(),
        &server,
    ];
    let mut t = Tunnel::start(&[&args[..], &with_cert[..]].concat(), &[]);
    t.line_with(&["connected"], Duration::from_secs(20));
    assert_eq!(
        seen.recv().await.unwrap(),
        format!("CONNECT {target} HTTP/1.1")
    );
    echo_intact(&l, 16 << 20).await;
    drop(t);

    // No client certificate: turned away after TLS, retried, and told why.
    let mut t = Tunnel::start(&[&args[..], &[server.as_str()][..]].concat(), &[]);
    let line = t.line_with(&["connecting failed"], Duration::from_secs(20));
    assert!(line.contains("--cert/--key"), "{line}");
    // The local port is there all the same; a client there is refused, not left hanging.
    let mut s = TcpStream::connect(&l).await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
        .await
        .expect("a client of a -L with no session waited over 30 s");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    d.stop().await;
}
