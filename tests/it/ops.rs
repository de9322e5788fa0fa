//! Operations: socket activation and sd_notify (systemd-socket-activate, a test notify socket),
//! SIGHUP and file-watch reloads under load, the admin endpoint, PROXY protocol input, and the
//! deploy/ files parsed.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cli::{sigterm, spawn_cmd, spawn_serve, wait_exit, wait_for_line};
use crate::support::*;

fn hup(pid: u32) {
    Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
}

/// A plain HTTP GET to the admin endpoint: (status code, body).
fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Parses Prometheus text: every sample line must be `name{labels} value`.
fn samples(text: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad metrics line: {line}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad metrics value: {line}"));
        assert!(name.starts_with("sluice_"), "unprefixed metric: {line}");
        out.push((name.to_string(), v));
    }
    assert!(text.ends_with("# EOF\n"), "no # EOF terminator");
    out
}

fn sample(all: &[(String, f64)], name: &str) -> f64 {
    all.iter().find(|(n, _)| n == name).map_or(0.0, |(_, v)| *v)
}

fn config_file(dir: &Path, text: &str) -> String {
    let p = dir.join("sluice.toml");
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// `sluice serve` with `cfg`, its state under `dir`.
fn serve_in(dir: &Path, cfg: &str) -> crate::cli::Child2 {
    spawn_serve(&[
        "serve",
        "--config",
        cfg,
        "--state-dir",
        &dir.join("state").display().to_string(),
    ])
}

fn tls_config_trusting(certs: &[&CertificateDer<'static>]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add((*c).clone()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// One TLS handshake; the certificate the server presented.
async fn handshake(addr: SocketAddr, cfg: &Arc<rustls::ClientConfig>) -> Result<Vec<u8>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(cfg.clone())
            .connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    Ok(leaf)
}

#[test]
fn socket_activation_and_sd_notify_messages() {
    need("systemd-socket-activate", "systemd");
    let cert = TestCert::localhost();
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // systemd-socket-activate binds the port itself and takes no port 0: one from below the
    // ephemeral range, checked free.
    let port = reserve_ports(1);
    // `listen` names another port, held here (bound, not listening): with inherited sockets
    // sluice must not bind it (if it tried, it would fail to start).
    let unused = dead_port().port();
    let cfg = config_file(
        dir.path(),
        &format!(
            "listen = [\"127.0.0.1:{unused}\"]\nshutdown_grace = \"2s\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[routes.http]\n",
            cert.cert.display(),
            cert.key.display()
        ),
    );
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args(["-l", &format!("127.0.0.1:{port}")])
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
        // The unit's WatchdogSec=, as systemd passes it: pings every 100 ms.
        .args([
            "--setenv=RUST_LOG=info",
            "--setenv=WATCHDOG_USEC=200000",
            "--",
        ])
        .arg(bin())
        .args(["serve", "--config", &cfg, "--state-dir"])
        .arg(dir.path().join("state"));
    let mut child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, log) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    wait_for_line(&log, "Listening on", Duration::from_secs(10));
    // systemd-socket-activate starts sluice at the first connection, which sluice then serves.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let reply = rt.block_on(async {
        let mut tls = tls_connect(addr, &cert, "localhost", &["http/1.1"]).await;
        tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        read_all(&mut tls).await
    });
    assert!(
        String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    wait_for_line(&log, "sockets from systemd", Duration::from_secs(5));
    let mut buf = [0u8; 512];
    let recv = |buf: &mut [u8]| -> String {
        let n = notify.recv(buf).expect("no sd_notify message");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // STATUS= lines may come between; collect until the expected state shows up.
    let expect = |state: &str, buf: &mut [u8]| -> String {
        for _ in 0..50 {
            let m = recv(buf);
            if m.lines().any(|l| l == state) {
                return m;
            }
        }
        panic!("no {state} from sluice");
    };
    expect("READY=1", &mut buf);
    expect("WATCHDOG=1", &mut buf);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", unused)).is_err(),
        "bound `listen` although sockets were passed"
    );
    hup(child.id());
    let reloading = expect("RELOADING=1", &mut buf);
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading}"
    );
    expect("READY=1", &mut buf);
    sigterm(&child);
    expect("STOPPING=1", &mut buf);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(10)), 0);
}

#[test]
fn a_socket_that_is_not_a_listener_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // fd 3 is a plain file, as if a unit passed the wrong thing.
    let script = format!(
        "exec 3>{0}/x; LISTEN_FDS=1 LISTEN_PID=$$ exec \"$0\" serve --state-dir {0}/state",
        dir.path().display()
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .arg(bin())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("descriptor 3 is not a listening TCP socket"),
        "{err}"
    );
}

/// Installs `cert` as the served pair the way certbot and Kubernetes do: new files, then one
/// symlink swap (`..data` -> a fresh directory).
fn install_pair(root: &Path, generation: u32, cert: &TestCert) {
    let gen_dir = root.join(format!("..{generation}"));
    std::fs::create_dir_all(&gen_dir).unwrap();
    std::fs::copy(&cert.cert, gen_dir.join("tls.crt")).unwrap();
    std::fs::copy(&cert.key, gen_dir.join("tls.key")).unwrap();
    let tmp = root.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{generation}"), &tmp).unwrap();
    std::fs::rename(&tmp, root.join("..data")).unwrap();
    for name in ["tls.crt", "tls.key"] {
        let link = root.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
        }
    }
}

/// `sluice serve` with `first` installed the Kubernetes way in `<dir>/tls` (`tls_extra`: more
/// `[tls]` keys): (dir, tls dir, config path, daemon).
fn serve_swappable(
    first: &TestCert,
    tls_extra: &str,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    String,
    crate::cli::Child2,
) {
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    install_pair(&tls_dir, 1, first);
    let cfg = config_file(
        dir.path(),
        &format!(
            "listen = [\"127.0.0.1:0\"]\n[tls]\ncert = \"{0}/tls.crt\"\nkey = \"{0}/tls.key\"\n{tls_extra}[routes.http]\n",
            tls_dir.display()
        ),
    );
    let d = serve_in(dir.path(), &cfg);
    (dir, tls_dir, cfg, d)
}

/// Handshakes in a loop from 4 clients until `stop`; returns (ok, failures, last leaf seen).
fn handshake_loop(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<(usize, Vec<String>, Vec<u8>)> {
    rt.spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (cfg, stop, ok) = (cfg.clone(), stop.clone(), ok.clone());
            tasks.push(tokio::spawn(async move {
                let mut failures = Vec::new();
                let mut last = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match handshake(addr, &cfg).await {
                        Ok(leaf) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            last = leaf;
                        }
                        Err(e) => failures.push(e),
                    }
                }
                (failures, last)
            }));
        }
        let mut failures = Vec::new();
        let mut last = Vec::new();
        for t in tasks {
            let (f, l) = t.await.unwrap();
            failures.extend(f);
            last = l;
        }
        (ok.load(Ordering::Relaxed), failures, last)
    })
}

#[test]
fn certificate_renewal_under_load_fails_no_handshake() {
    let (a, b, c) = (
        TestCert::localhost(),
        TestCert::localhost(),
        TestCert::localhost(),
    );
    let (_dir, tls_dir, cfg, mut d) = serve_swappable(&a, "");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = tls_config_trusting(&[&a.der, &b.der, &c.der]);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let looping = handshake_loop(&rt, d.addr, client.clone(), stop.clone(), done.clone());
    // Ten more handshakes from now: the load is on at each step, whatever the machine's speed.
    let ten_more = || {
        let from = done.load(Ordering::Relaxed);
        until_sync("ten more handshakes", Duration::from_secs(20), || {
            done.load(Ordering::Relaxed) >= from + 10
        });
    };
    ten_more();

    // 1. Renewal picked up by the file watch alone (a symlink swap, no signal).
    install_pair(&tls_dir, 2, &b);
    wait_for_line(&d.log, "certificates reloaded", Duration::from_secs(10));
    ten_more();
    assert_eq!(
        rt.block_on(handshake(d.addr, &client)).unwrap(),
        b.der.to_vec(),
        "the renewed certificate is not served"
    );
    // 2. Renewal and a changed config, then SIGHUP (a certbot deploy hook, an edit).
    install_pair(&tls_dir, 3, &c);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}[detect]\ntimeout = \"3s\"\n")).unwrap();
    hup(d.child.id());
    wait_for_line(&d.log, "SIGHUP: reloaded", Duration::from_secs(10));
    ten_more();
    stop.store(true, Ordering::Relaxed);
    let (ok, failures, last) = rt.block_on(looping).unwrap();
    assert!(failures.is_empty(), "failed handshakes: {failures:?}");
    assert!(ok >= 30, "only {ok} handshakes");
    assert_eq!(last, c.der.to_vec(), "the last certificate is not served");
    sigterm(&d.child);
    assert_eq!(wait_exit(&mut d.child, Duration::from_secs(10)), 0);
}

#[test]
fn broken_reloads_are_refused_and_the_old_state_serves_on() {
    let cert = TestCert::localhost();
    let dir = tempfile::tempdir().unwrap();
    let good = format!(
        "listen = [\"127.0.0.1:0\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[routes.http]\n",
        cert.cert.display(),
        cert.key.display()
    );
    let cfg = config_file(dir.path(), &good);
    let mut d = serve_in(dir.path(), &cfg);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let admin = d.admin_addr();
    let client = tls_config_trusting(&[&cert.der]);

    // A config that does not parse.
    std::fs::write(&cfg, format!("{good}\nbogus = 1\n")).unwrap();
    hup(d.child.id());
    let line = wait_for_line(&d.log, "reload refused", Duration::from_secs(10));
    assert!(line.contains("bogus"), "{line}");
    rt.block_on(handshake(d.addr, &client)).unwrap();

    // A certificate file that is not a certificate.
    let broken_cert = dir.path().join("broken.pem");
    std::fs::write(
        &broken_cert,
        "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(
        &cfg,
        good.replace(
            &cert.cert.display().to_string(),
            &broken_cert.display().to_string(),
        ),
    )
    .unwrap();
    hup(d.child.id());
    wait_for_line(&d.log, "reload refused", Duration::from_secs(10));
    assert_eq!(
        rt.block_on(handshake(d.addr, &client)).unwrap(),
        cert.der.to_vec()
    );

    // A good config that changes a route: new connections get it, an open one keeps its own.
    let mut open = rt.block_on(tls_connect(d.addr, &cert, "localhost", &["http/1.1"]));
    let echo = rt.block_on(echo_upstream());
    std::fs::write(
        &cfg,
        good.replace(
            "[routes.http]\n",
            &format!("[routes.http]\nupstream = \"{echo}\"\n"),
        ),
    )
    .unwrap();
    hup(d.child.id());
    wait_for_line(&d.log, "SIGHUP: reloaded", Duration::from_secs(10));
    let reply = rt.block_on(async {
        let mut tls = tls_connect(d.addr, &cert, "localhost", &["http/1.1"]).await;
        tls.write_all(b"echo me").await.unwrap();
        read_n(&mut tls, 7).await
    });
    assert_eq!(
        reply, b"echo me",
        "new connections do not use the new route"
    );
    let old = rt.block_on(async {
        open.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        read_all(&mut open).await
    });
    assert!(
        String::from_utf8_lossy(&old).contains("sluice"),
        "the open connection lost its route: {}",
        String::from_utf8_lossy(&old)
    );
    let m = samples(&admin_get(admin, "/metrics").1);
    assert_eq!(
        sample(
            &m,
            "sluice_reloads_total{what=\"config\",result=\"failure\"}"
        ),
        2.0
    );
    assert_eq!(
        sample(
            &m,
            "sluice_reloads_total{what=\"config\",result=\"success\"}"
        ),
        1.0
    );
    sigterm(&d.child);
    assert_eq!(wait_exit(&mut d.child, Duration::from_secs(10)), 0);
}

#[test]
fn admin_endpoint_metrics_and_readyz_during_drain() {
    let cert = TestCert::localhost();
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let echo = rt.block_on(echo_upstream());
    // healthcheck reads the admin address from the config file below: a fixed port, from below
    // the ephemeral range and checked free (port 0 is refused there: see the end).
    let admin_port = reserve_ports(1);
    let cfg = config_file(
        dir.path(),
        &format!(
            "listen = [\"127.0.0.1:0\"]\nshutdown_grace = \"20s\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n[routes.http]\nupstream = \"{echo}\"\n[routes.ssh]\nupstream = \"{echo}\"\n",
            cert.cert.display(),
            cert.key.display()
        ),
    );
    let mut d = serve_in(dir.path(), &cfg);
    let admin = d.admin_addr();
    assert_eq!(admin_get(admin, "/livez").0, 200);
    assert_eq!(admin_get(admin, "/readyz").0, 200);
    assert_eq!(admin_get(admin, "/nope").0, 404);
    let hc = Command::new(bin())
        .args(["healthcheck", "--admin", &admin.to_string()])
        .output()
        .unwrap();
    assert!(hc.status.success(), "{hc:?}");
    // --admin wins over SLUICE_CONFIG from the environment (a container may set both).
    let hc = Command::new(bin())
        .args(["healthcheck", "--admin", &admin.to_string()])
        .env("SLUICE_CONFIG", "/nonexistent/sluice.toml")
        .output()
        .unwrap();
    assert!(hc.status.success(), "{hc:?}");
    // healthcheck finds the address in the config file too.
    let hc = Command::new(bin())
        .args(["healthcheck", "--live", "--config", &cfg])
        .output()
        .unwrap();
    assert!(hc.status.success(), "{hc:?}");
    // A config whose admin port is 0 cannot tell healthcheck where to ask: a config error.
    let zero = dir.path().join("zero.toml");
    std::fs::write(&zero, "[admin]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let hc = Command::new(bin())
        .args(["healthcheck", "--config"])
        .arg(&zero)
        .output()
        .unwrap();
    assert_eq!(hc.status.code(), Some(78), "{hc:?}");
    assert!(
        String::from_utf8_lossy(&hc.stderr).contains("names port 0"),
        "{hc:?}"
    );

    let before = samples(&admin_get(admin, "/metrics").1);
    // Real traffic: an ALPN route with bytes, a plain SSH connection, a failed handshake.
    rt.block_on(async {
        let mut tls = tls_connect(d.addr, &cert, "localhost", &["http/1.1"]).await;
        tls.write_all(&[7u8; 1000]).await.unwrap();
        read_n(&mut tls, 1000).await;
        drop(tls);
        let mut plain = TcpStream::connect(d.addr).await.unwrap();
        plain.write_all(b"SSH-2.0-metrics\r\n").await.unwrap();
        read_n(&mut plain, 17).await;
        drop(plain);
        let mut junk = TcpStream::connect(d.addr).await.unwrap();
        junk.write_all(b"\x16\x03\x01\x00\x05hello").await.unwrap();
        let mut sink = Vec::new();
        let _ = junk.read_to_end(&mut sink).await;
    });
    let mut after = Vec::new();
    for _ in 0..50 {
        after = samples(&admin_get(admin, "/metrics").1);
        if sample(&after, "sluice_tls_handshake_failures_total") >= 1.0
            && sample(
                &after,
                "sluice_connections_total{route=\"none\",routed_by=\"none\",end=\"error\",side=\"client\"}",
            ) >= 1.0
            && sample(
                &after,
                "sluice_connections_total{route=\"ssh\",routed_by=\"plaintext\",end=\"closed\",side=\"client\"}",
            ) >= 1.0
            && sample(
                &after,
                "sluice_connections_total{route=\"http\",routed_by=\"alpn\",end=\"closed\",side=\"client\"}",
            ) >= 1.0
            && sample(&after, "sluice_connections_active") == 0.0
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let moved = |name: &str| sample(&after, name) - sample(&before, name);
    assert_eq!(
        moved("sluice_connections_total{route=\"http\",routed_by=\"alpn\",end=\"closed\",side=\"client\"}"),
        1.0
    );
    assert_eq!(
        moved("sluice_connections_total{route=\"ssh\",routed_by=\"plaintext\",end=\"closed\",side=\"client\"}"),
        1.0
    );
    assert_eq!(moved("sluice_tls_handshake_failures_total"), 1.0);
    // The junk handshake: closed unrouted, an error on the client's side.
    assert_eq!(
        moved("sluice_connections_total{route=\"none\",routed_by=\"none\",end=\"error\",side=\"client\"}"),
        1.0
    );
    assert!(moved("sluice_bytes_total{direction=\"from_client\"}") >= 1017.0);
    assert!(moved("sluice_bytes_total{direction=\"to_client\"}") >= 1017.0);
    assert!(moved("sluice_detect_seconds_count") >= 2.0);
    assert_eq!(sample(&after, "sluice_connections_active"), 0.0);
    assert_eq!(sample(&after, "sluice_draining"), 0.0);

    // Drain: /readyz turns 503 at once while an open connection keeps the process alive.
    let mut open = rt.block_on(tls_connect(d.addr, &cert, "localhost", &["http/1.1"]));
    rt.block_on(async {
        open.write_all(b"x").await.unwrap();
        read_n(&mut open, 1).await;
    });
    // Bytes are counted as they move, not only when a connection closes.
    let live = samples(&admin_get(admin, "/metrics").1);
    assert!(
        sample(&live, "sluice_bytes_total{direction=\"from_client\"}")
            > sample(&after, "sluice_bytes_total{direction=\"from_client\"}"),
        "bytes of an open connection are not counted"
    );
    sigterm(&d.child);
    let t0 = Instant::now();
    loop {
        let (code, _) = admin_get(admin, "/readyz");
        if code == 503 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "/readyz still {code} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(admin_get(admin, "/livez").0, 200, "not live while draining");
    let draining = samples(&admin_get(admin, "/metrics").1);
    assert_eq!(sample(&draining, "sluice_draining"), 1.0);
    assert_eq!(sample(&draining, "sluice_connections_active"), 1.0);
    let hc = Command::new(bin())
        .args(["healthcheck", "--admin", &admin.to_string()])
        .output()
        .unwrap();
    assert_eq!(hc.status.code(), Some(1), "{hc:?}");
    drop(open);
    assert_eq!(wait_exit(&mut d.child, Duration::from_secs(10)), 0);
    let gone = Command::new(bin())
        .args(["healthcheck", "--admin", &admin.to_string()])
        .output()
        .unwrap();
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("cannot reach"));
}

/// An upstream that reads a PROXY v2 header and reports the client address in it.
async fn proxy_reporting_upstream() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<SocketAddr>)
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let up = serve_upstream(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut buf = vec![0u8; 16];
            if s.read_exact(&mut buf).await.is_err() {
                return;
            }
            let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
            buf.resize(16 + len, 0);
            if s.read_exact(&mut buf[16..]).await.is_err() {
                return;
            }
            let h = sluice::proxy_protocol::decode_v2(&buf).expect("a PROXY v2 header first");
            let _ = tx.send(h.src);
            let _ = s.write_all(b"ok").await;
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        }
    })
    .await;
    (up, rx)
}

#[tokio::test]
async fn proxy_protocol_in_from_trusted_addresses_only() {
    let cert = TestCert::localhost();
    let (up, mut seen) = proxy_reporting_upstream().await;
    let route = format!("[routes.ssh]\nupstream = \"{up}\"\nproxy_protocol = \"v2\"\n[limits]\nmax_connections_per_ip = 1\n");
    let text = |trusted: &str| {
        format!(
            "trusted_proxies = [\"{trusted}\"]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"1s\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n{route}",
            cert.cert.display(),
            cert.key.display()
        )
    };
    let d = Daemon::start_raw(&text("127.0.0.0/8")).await;
    // v1 and v2 headers: the upstream hears the client from the header.
    let mut v2 = Vec::new();
    sluice::proxy_protocol::encode(
        sluice::proxy_protocol::ProxyVersion::V2,
        "[2001:db8::9]:4444".parse().unwrap(),
        "[2001:db8::1]:443".parse().unwrap(),
        &mut v2,
    );
    for (header, client) in [
        (
            b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 443\r\n".to_vec(),
            "203.0.113.9:5555",
        ),
        (v2, "[2001:db8::9]:4444"),
    ] {
        let mut s = TcpStream::connect(d.addr).await.unwrap();
        // Header and client bytes in one write: what follows the header is the client's.
        s.write_all(&[header, b"SSH-2.0-behind-lb\r\n".to_vec()].concat())
            .await
            .unwrap();
        assert_eq!(read_n(&mut s, 2).await, b"ok");
        let got = tokio::time::timeout(Duration::from_secs(5), seen.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, client.parse::<SocketAddr>().unwrap());
    }
    // Limits count the client in the header, not the load balancer: with one connection per
    // client allowed, two clients behind one proxy both get through, the same client twice not.
    let open = |client: &'static str| async move {
        let mut s = TcpStream::connect(d.addr).await.unwrap();
        s.write_all(format!("PROXY TCP4 {client} 192.0.2.1 1000 443\r\nSSH-2.0-x\r\n").as_bytes())
            .await
            .unwrap();
        let mut b = [0u8; 2];
        let ok = tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
            .await
            .is_ok_and(|r| r.is_ok());
        (s, ok)
    };
    let (_a, ok_a) = open("198.51.100.1").await;
    let (_b, ok_b) = open("198.51.100.2").await;
    let (_c, ok_c) = open("198.51.100.1").await;
    assert!(ok_a && ok_b, "two clients behind one proxy");
    assert!(
        !ok_c,
        "the same client twice past max_connections_per_ip = 1"
    );
    for want in ["198.51.100.1:1000", "198.51.100.2:1000"] {
        let got = tokio::time::timeout(Duration::from_secs(5), seen.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, want.parse::<SocketAddr>().unwrap());
    }
    // A LOCAL header (the balancer's own health check) uses the socket's addresses.
    let mut local = sluice::proxy_protocol::V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    s.write_all(&[local, b"SSH-2.0-hc\r\n".to_vec()].concat())
        .await
        .unwrap();
    assert_eq!(read_n(&mut s, 2).await, b"ok");
    let got = tokio::time::timeout(Duration::from_secs(5), seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(got.ip().is_loopback(), "{got}");
    // A malformed header is closed without reaching the upstream.
    let mut bad = TcpStream::connect(d.addr).await.unwrap();
    bad.write_all(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 443\r\nSSH-2.0-x\r\n")
        .await
        .unwrap();
    closed_within(&mut bad, Duration::from_secs(5)).await;
    d.stop().await;

    // From a trusted address the header is required by default: a host in the range that
    // connects directly (client bytes first, or silence) is closed before routing and counted.
    let missing = || {
        sluice::metrics::get()
            .refused
            .get_or_create(&sluice::metrics::ReasonLabels {
                reason: "proxy_header_missing",
            })
            .get()
    };
    let d = Daemon::start_raw(&text("127.0.0.0/8")).await;
    let before = missing();
    let mut direct = TcpStream::connect(d.addr).await.unwrap();
    direct.write_all(b"SSH-2.0-direct\r\n").await.unwrap();
    closed_within(&mut direct, Duration::from_secs(5)).await;
    let mut silent = TcpStream::connect(d.addr).await.unwrap();
    closed_within(&mut silent, Duration::from_secs(5)).await;
    assert_eq!(
        missing() - before,
        2,
        "both refused as proxy_header_missing"
    );
    assert!(seen.try_recv().is_err(), "nothing reached the upstream");
    d.stop().await;

    // With proxy_header = "optional", a direct connection keeps the socket's address.
    let d = Daemon::start_raw(&format!(
        "proxy_header = \"optional\"\n{}",
        text("127.0.0.0/8")
    ))
    .await;
    let mut direct = TcpStream::connect(d.addr).await.unwrap();
    direct.write_all(b"SSH-2.0-direct\r\n").await.unwrap();
    assert_eq!(read_n(&mut direct, 2).await, b"ok");
    let got = tokio::time::timeout(Duration::from_secs(5), seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(got.ip().is_loopback(), "{got}");
    d.stop().await;

    // From an address outside trusted_proxies, a header is refused and nothing is relayed.
    let d = Daemon::start_raw(&text("10.0.0.0/8")).await;
    for header in [b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 443\r\n".to_vec(), {
        let mut h = Vec::new();
        sluice::proxy_protocol::encode(
            sluice::proxy_protocol::ProxyVersion::V2,
            "203.0.113.9:1".parse().unwrap(),
            "192.0.2.1:443".parse().unwrap(),
            &mut h,
        );
        h
    }] {
        let mut s = TcpStream::connect(d.addr).await.unwrap();
        s.write_all(&[header, b"SSH-2.0-spoof\r\n".to_vec()].concat())
            .await
            .unwrap();
        closed_within(&mut s, Duration::from_secs(5)).await;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), seen.recv())
            .await
            .is_err(),
        "a spoofed header reached the upstream"
    );
    d.stop().await;
}

#[test]
fn deploy_files_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Kubernetes: every document, the native sidecar, probes, the secret as a directory.
    let py = "/usr/bin/python3";
    assert!(
        Path::new(py).exists(),
        "this test needs Debian's python3 and python3-yaml: apt-get install -y python3-yaml (scripts/test installs it)"
    );
    let check = r#"
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
out = {"kinds": [d["kind"] for d in docs], "toml": None, "sidecar": None, "mounts": []}
for d in docs:
    assert "apiVersion" in d and "metadata" in d, d
    if d["kind"] == "ConfigMap":
        out["toml"] = d["data"]["sluice.toml"]
    if d["kind"] == "Deployment":
        spec = d["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []):
            if "sluice" in c["name"]:
                out["sidecar"] = c
        for c in spec.get("initContainers", []) + spec["containers"]:
            out["mounts"] += c.get("volumeMounts", [])
print(json.dumps(out))
"#;
    let out = Command::new(py)
        .args(["-c", check])
        .arg(root.join("deploy/kubernetes/sidecar.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sidecar.yaml: {} (needs python3-yaml: apt-get install -y python3-yaml)",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for kind in ["ConfigMap", "Deployment", "Service"] {
        assert!(
            v["kinds"].as_array().unwrap().iter().any(|k| k == kind),
            "no {kind} in sidecar.yaml"
        );
    }
    let sidecar = &v["sidecar"];
    assert_eq!(sidecar["restartPolicy"], "Always", "not a native sidecar");
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        assert!(sidecar[probe].is_object(), "sidecar has no {probe}");
    }
    assert_eq!(sidecar["securityContext"]["runAsNonRoot"], true);
    for m in v["mounts"].as_array().unwrap() {
        assert!(
            m.get("subPath").is_none(),
            "subPath mount (no updates): {m}"
        );
    }
    let toml_text = v["toml"].as_str().expect("sluice.toml in the ConfigMap");
    let cfg = sluice::config::Config::parse(toml_text, None, Path::new("/etc/sluice"))
        .unwrap_or_else(|e| panic!("ConfigMap sluice.toml: {e}"));
    assert!(cfg.admin.is_some(), "the probes need [admin]");

    // systemd: the example config (with credentials), then the units.
    let cert = TestCert::localhost();
    let creds = tempfile::tempdir().unwrap();
    std::fs::copy(&cert.key, creds.path().join("tls.key")).unwrap();
    // The chain is read in place from /etc/sluice/tls.crt: point that at a test certificate.
    let shipped = std::fs::read_to_string(root.join("deploy/systemd/sluice.toml")).unwrap();
    assert!(
        shipped.contains("\"/etc/sluice/tls.crt\""),
        "the shipped config moved the chain"
    );
    let local = creds.path().join("sluice.toml");
    std::fs::write(
        &local,
        shipped.replace("/etc/sluice/tls.crt", &cert.cert.display().to_string()),
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&local)
        .env("CREDENTIALS_DIRECTORY", creds.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy/systemd/sluice.toml: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    need("systemd-analyze", "systemd");
    let units = tempfile::tempdir().unwrap();
    for unit in [
        "sluice.service",
        "sluice.socket",
        "sluice-bind.service",
        "sluice-tunnel.service",
    ] {
        let text = std::fs::read_to_string(root.join("deploy/systemd").join(unit)).unwrap();
        // verify wants the ExecStart binary to exist.
        let text = text.replace("/usr/local/bin/sluice", &bin().display().to_string());
        std::fs::write(units.path().join(unit), text).unwrap();
    }
    // The device side's unit and config too.
    let device = root.join("deploy/systemd/sluice-tunnel.toml");
    let text = std::fs::read_to_string(&device).unwrap();
    sluice::client::tunnel::DeviceConfig::parse(
        &text,
        Some(&device),
        Path::new("/etc/sluice-tunnel"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    for unit in [
        "sluice.service",
        "sluice-bind.service",
        "sluice-tunnel.service",
    ] {
        let out = Command::new("systemd-analyze")
            .args(["verify"])
            .arg(units.path().join(unit))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !err.contains(unit), "{unit}: {err}");
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(units.path().join(unit))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let score: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for").nth(1))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no exposure score for {unit}: {text}"));
        assert!(score <= 1.5, "{unit}: exposure {score} > 1.5");
    }
    // The image: multi-stage, non-root.
    let docker = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    assert!(docker.matches("\nFROM ").count() + usize::from(docker.starts_with("FROM ")) >= 2);
    assert!(docker.contains("USER 65532"));
}

#[test]
fn reload_without_admin_or_ssh_keeps_serving_and_sighup_is_not_fatal() {
    // With an external sshd route nothing watches keys: SIGHUP must still be handled.
    let cert = TestCert::localhost();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(
        dir.path(),
        &format!(
            "listen = [\"127.0.0.1:0\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[routes.ssh]\nupstream = \"{}\"\n",
            cert.cert.display(),
            cert.key.display(),
            dead_port()
        ),
    );
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "--config", &cfg, "--state-dir"])
        .arg(dir.path().join("state"));
    let mut d = spawn_cmd(cmd);
    hup(d.child.id());
    wait_for_line(&d.log, "SIGHUP: reloaded", Duration::from_secs(10));
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "SIGHUP killed sluice"
    );
    sigterm(&d.child);
    assert_eq!(wait_exit(&mut d.child, Duration::from_secs(10)), 0);
}

#[test]
fn certificate_swaps_are_seen_by_inotify_between_polls() {
    let (a, b) = (TestCert::localhost(), TestCert::localhost());
    // An hour between polls: only the directory watch can notice the swap in time.
    let (_dir, tls_dir, _cfg, mut d) = serve_swappable(&a, "poll_interval = \"1h\"\n");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = tls_config_trusting(&[&a.der, &b.der]);
    assert_eq!(
        rt.block_on(handshake(d.addr, &client)).unwrap(),
        a.der.to_vec()
    );
    install_pair(&tls_dir, 2, &b);
    wait_for_line(&d.log, "certificates reloaded", Duration::from_secs(20));
    assert_eq!(
        rt.block_on(handshake(d.addr, &client)).unwrap(),
        b.der.to_vec()
    );
    sigterm(&d.child);
    assert_eq!(wait_exit(&mut d.child, Duration::from_secs(10)), 0);
}

#[tokio::test]
async fn a_silent_client_behind_a_trusted_proxy_waits_one_detect_timeout() {
    // detect.timeout counts from accept, PROXY header wait included, not twice (with the
    // header optional, a silent client is the proxy host's own, routed on timeout).
    let cert = TestCert::localhost();
    let up = banner_upstream().await;
    let d = Daemon::start_raw(&format!(
        "trusted_proxies = [\"127.0.0.1\"]\nproxy_header = \"optional\"\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"1s\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[detect]\ntimeout = \"2s\"\non_timeout = \"ssh\"\n[routes.ssh]\nupstream = \"{up}\"\n",
        cert.cert.display(),
        cert.key.display()
    ))
    .await;
    let t0 = Instant::now();
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    assert_eq!(read_n(&mut s, BANNER.len()).await, BANNER);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_millis(3500),
        "routed after {waited:?}, expected one detect.timeout (2s)"
    );
    d.stop().await;
}

/// rustls's own session cache, counting the TLS 1.3 tickets the server sends.
#[derive(Debug)]
struct CountingTickets {
    inner: rustls::client::ClientSessionMemoryCache,
    tickets: AtomicUsize,
}

impl rustls::client::ClientSessionStore for CountingTickets {
    fn set_kx_hint(&self, name: ServerName<'static>, group: rustls::NamedGroup) {
        self.inner.set_kx_hint(name, group);
    }
    fn kx_hint(&self, name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(name)
    }
    fn set_tls12_session(
        &self,
        name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.inner.set_tls12_session(name, value);
    }
    fn tls12_session(
        &self,
        name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(name)
    }
    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.inner.remove_tls12_session(name);
    }
    fn insert_tls13_ticket(
        &self,
        name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.tickets.fetch_add(1, Ordering::SeqCst);
        self.inner.insert_tls13_ticket(name, value);
    }
    fn take_tls13_ticket(
        &self,
        name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(name)
    }
}

#[test]
fn tls_sessions_resume_across_a_reload() {
    let cert = TestCert::localhost();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(
        dir.path(),
        &format!(
            "listen = [\"127.0.0.1:0\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[routes.http]\n",
            cert.cert.display(),
            cert.key.display()
        ),
    );
    let mut d = serve_in(dir.path(), &cfg);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // One client config: its session cache carries the ticket to the next connection.
    let store = Arc::new(CountingTickets {
        inner: rustls::client::ClientSessionMemoryCache::new(8),
        tickets: AtomicUsize::new(0),
    });
    let mut client = (*tls_config_trusting(&[&cert.der])).clone();
    client.resumption = rustls::client::Resumption::store(store.clone());
    let client = Arc::new(client);
    let connect = |client: Arc<rustls::ClientConfig>| {
        rt.block_on(async {
            let tcp = TcpStream::connect(d.addr).await.unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap();
            let kind = tls.get_ref().1.handshake_kind();
            // Reading the answer also takes in the session tickets sent after the handshake.
            tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .await
                .unwrap();
            read_all(&mut tls).await;
            kind
        })
    };
    assert_eq!(connect(client.clone()), Some(rustls::HandshakeKind::Full));
    // One ticket per handshake (sluice::tls::TLS13_TICKETS), not rustls's default two.
    assert_eq!(
        store.tickets.load(Ordering::SeqCst),
        1,
        "tickets after a full handshake"
    );
    assert_eq!(
        connect(client.clone()),
        Some(rustls::HandshakeKind::Resumed)
    );
    assert_eq!(
        store.tickets.load(Ordering::SeqCst),
        2,
        "a resumed one gets a fresh ticket"
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("{text}[detect]\ntimeout = \"3s\"\n")).unwrap();
    hup(d.child.id());
    wait_for_line(&d.log, "SIGHUP: reloaded", Duration::from_secs(10));
    assert_eq!(
        connect(client),
        Some(rustls::HandshakeKind::Resumed),
        "a reload made tickets issued before it useless"
    );
    sigterm(&d.child);
    assert_eq!(wait_exit(&mut d.child, Duration::from_secs(10)), 0);
}

#[test]
fn a_full_admin_endpoint_answers_503_at_once() {
    let cert = TestCert::localhost();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_file(
        dir.path(),
        &format!(
            "listen = [\"127.0.0.1:0\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[routes.http]\n",
            cert.cert.display(),
            cert.key.display()
        ),
    );
    let mut d = serve_in(dir.path(), &cfg);
    let admin = d.admin_addr();
    assert_eq!(admin_get(admin, "/readyz").0, 200);
    // 64 clients that send nothing hold every slot...
    let idle: Vec<std::net::TcpStream> = (0..64)
        .map(|_| std::net::TcpStream::connect(admin).unwrap())
        .collect();
    // ...so, once they are accepted, the next request is told "busy" instead of waiting behind
    // them (the 65th answer, not a hang: admin_get has a read timeout).
    let mut last = (0, String::new());
    until_sync("/readyz answers busy", Duration::from_secs(10), || {
        last = admin_get(admin, "/readyz");
        last.0 == 503
    });
    assert_eq!((last.0, last.1.as_str()), (503, "busy\n"));
    drop(idle);
    until_sync("/readyz ready again", Duration::from_secs(10), || {
        admin_get(admin, "/readyz").0 == 200
    });
    sigterm(&d.child);
    assert_eq!(wait_exit(&mut d.child, Duration::from_secs(10)), 0);
}
