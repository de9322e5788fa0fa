use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn bad_configs_exit_78_with_file_line_column_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        (
            "listen = [\"127.0.0.1:1\"]\nbogus_key = 1\n",
            ":2:1: bogus_key: unknown field `bogus_key`",
        ),
        ("[detect]\ntimeout = \"soon\"\n", ":2:11: detect.timeout: "),
        (
            "[routes.http]\nupstream = \"no-port\"\n",
            ":2:12: routes.http.upstream: `no-port` is not host:port",
        ),
        (
            "[tls]\ncert = \"missing.pem\"\nkey = \"missing-key.pem\"\n",
            ":2:8: tls.cert: ",
        ),
        ("listen = [\n", ":"),
        (
            "[routes.ssh]\n[grants]\n[control]\nlisten = \"127.0.0.1:0\"\n",
            ":4:10: control.listen: the control API on TCP needs bearer tokens",
        ),
        (
            "[control]\nsocket = \"c.sock\"\n",
            ":1:1: control: the control API serves [grants]",
        ),
        (
            "[tls]\ncipher_suites = [\"TLS13_AES_128_GCM_SHA256\", \"TLS_RSA_WITH_RC4_128_SHA\"]\n",
            ":2:46: tls.cipher_suites: `TLS_RSA_WITH_RC4_128_SHA` is not a cipher suite sluice offers",
        ),
        (
            "[tls]\nmin_version = \"1.1\"\n",
            ":2:15: tls.min_version: `1.1`: expected \"1.2\" or \"1.3\"",
        ),
        (
            "[tls]\nmin_version = \"1.3\"\ncipher_suites = [\"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\"]\n",
            ":3:17: tls.cipher_suites: no TLS 1.3 suite, and tls.min_version is 1.3",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = write(dir.path(), &format!("bad{i}.toml"), text);
        for cmd in ["check", "serve"] {
            let (code, _, err) = run(&[cmd, "--config", &path]);
            assert_eq!(code, 78, "{cmd} {text:?}: {err}");
            assert!(
                err.contains(&format!("{path}{want}")),
                "{cmd} {text:?}: expected {want:?} in: {err}"
            );
        }
    }
    let (code, _, err) = run(&["check", "--config", "/nonexistent/sluice.toml"]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("/nonexistent/sluice.toml: cannot read config"),
        "{err}"
    );
}

#[test]
fn mismatched_key_is_a_config_error() {
    let a = TestCert::localhost();
    let b = TestCert::localhost();
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "s.toml",
        &format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            a.cert.display(),
            b.key.display()
        ),
    );
    let (code, _, err) = run(&["check", "--config", &path]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("tls.key: ") && err.contains("does not fit certificate"),
        "{err}"
    );
}

#[test]
fn check_prints_the_routing_table() {
    let cert = TestCert::localhost();
    let path = write(
        cert.dir.path(),
        "sluice.toml",
        "listen = [\"127.0.0.1:8443\"]\n[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n[routes.http]\nupstream = \"127.0.0.1:8080\"\nproxy_protocol = \"v2\"\n[routes.ssh]\nupstream = \"127.0.0.1:22\"\n",
    );
    let (code, out, err) = run(&["check", "--config", &path]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("route http    -> upstream 127.0.0.1:8080"),
        "{out}"
    );
    assert!(out.contains("PROXY v2"), "{out}");
    assert!(
        out.contains("route ssh     -> upstream 127.0.0.1:22"),
        "{out}"
    );
    assert!(out.contains("alpn offered  http/1.1, ssh"), "{out}");
}

#[test]
fn example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let text = std::fs::read_to_string(example).unwrap();
    // Its certificate paths point at files a test machine does not have; swap in real ones.
    let cert = TestCert::localhost();
    let text = text
        .replace(
            "/etc/sluice/fullchain.pem",
            &cert.cert.display().to_string(),
        )
        .replace("/etc/sluice/privkey.pem", &cert.key.display().to_string());
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "example.toml", &text);
    let (code, out, err) = run(&["check", "--config", &path]);
    assert_eq!(code, 0, "{out}{err}");
}

/// A `sluice serve` child whose log is read until it says where it listens.
pub(crate) struct Child2 {
    pub(crate) child: Child,
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) log: std::sync::mpsc::Receiver<String>,
    /// Where the admin endpoint listens, once its log line has been read.
    admin: Option<std::net::SocketAddr>,
}

impl Child2 {
    /// The admin endpoint's address as sluice logged it (`[admin] listen` may name port 0),
    /// reading the log up to that line (at most 10 s).
    pub(crate) fn admin_addr(&mut self) -> std::net::SocketAddr {
        if let Some(a) = self.admin {
            return a;
        }
        let line = wait_for_line(&self.log, "admin endpoint", Duration::from_secs(10));
        let a = admin_in(&line).expect("no admin= in the admin endpoint's line");
        self.admin = Some(a);
        a
    }
}

/// The `admin=ADDR` field of sluice's "admin endpoint" log line.
fn admin_in(line: &str) -> Option<std::net::SocketAddr> {
    if !line.contains("admin endpoint") {
        return None;
    }
    let i = line.find("admin=")? + 6;
    line[i..].split([' ', ',', '"']).next()?.parse().ok()
}

pub(crate) fn spawn_serve(args: &[&str]) -> Child2 {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    spawn_cmd(cmd)
}

/// `sluice serve` with `text` as `DIR/sluice.toml` and its state in `DIR/state`.
pub(crate) fn serve_config(dir: &std::path::Path, text: &str) -> Child2 {
    let cfg = dir.join("sluice.toml");
    std::fs::write(&cfg, text).unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("serve")
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(dir.join("state"));
    spawn_cmd(cmd)
}

// The child is returned inside Child2; its owner waits for it (or kills it on drop).
#[allow(clippy::zombie_processes)]
pub(crate) fn spawn_cmd(mut cmd: Command) -> Child2 {
    let mut child = cmd
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut admin = None;
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("sluice did not say where it listens");
        admin = admin.or(admin_in(&line));
        let at = line
            .find("listen=")
            .map(|i| i + 7)
            .or_else(|| line.find("\"listen\":\"").map(|i| i + 10));
        if let Some(i) = at {
            let addr = line[i..]
                .split([' ', ',', '"'])
                .next()
                .unwrap()
                .parse()
                .unwrap();
            return Child2 {
                child,
                addr,
                log: rx,
                admin,
            };
        }
    }
}

pub(crate) fn sighup(c: &Child) {
    Command::new("kill")
        .args(["-HUP", &c.id().to_string()])
        .status()
        .unwrap();
}

pub(crate) fn sigterm(c: &Child) {
    Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status()
        .unwrap();
}

pub(crate) fn wait_for_line(
    log: &std::sync::mpsc::Receiver<String>,
    needle: &str,
    limit: Duration,
) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let line = log
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no log line containing `{needle}` within {limit:?}"));
        if line.contains(needle) {
            return line;
        }
    }
}

pub(crate) fn wait_exit(c: &mut Child, limit: Duration) -> i32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        assert!(
            Instant::now() < deadline,
            "sluice did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn fingerprint_line(rx: &std::sync::mpsc::Receiver<String>) -> String {
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("no fingerprint line");
        if let Some(i) = line.find("sha256=") {
            return line[i + 7..].split_whitespace().next().unwrap().to_string();
        }
    }
}

#[test]
fn self_signed_default_is_made_once_and_reused() {
    need("curl", "curl");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = write(dir.path(), "s.toml", "listen = [\"127.0.0.1:0\"]\n");
    let args = [
        "serve",
        "--config",
        &cfg,
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let mut first = spawn_serve(&args);
    let fp1 = fingerprint_line(&first.log);
    let cert = state.join(sluice::tls::SELF_SIGNED_CERT);
    let key = state.join(sluice::tls::SELF_SIGNED_KEY);
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600,
        "private key must be 0600"
    );
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&cert)
        .arg(format!("https://localhost:{}/", first.addr.port()))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("sluice"),
        "status page over the self-signed certificate: {body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    sigterm(&first.child);
    assert_eq!(wait_exit(&mut first.child, Duration::from_secs(10)), 0);

    let mut second = spawn_serve(&args);
    assert_eq!(
        fingerprint_line(&second.log),
        fp1,
        "the certificate is reused on the second start"
    );
    sigterm(&second.child);
    assert_eq!(wait_exit(&mut second.child, Duration::from_secs(10)), 0);
}

fn echo_config(dir: &std::path::Path, cert: &TestCert, grace: &str) -> String {
    // A blocking echo upstream on its own thread, for the child process to reach.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    write(
        dir,
        "s.toml",
        &format!(
            "listen = [\"127.0.0.1:0\"]\nshutdown_grace = \"{grace}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[routes.ssh]\nupstream = \"{up}\"\n",
            cert.cert.display(),
            cert.key.display()
        ),
    )
}

fn plain_echo_roundtrip(s: &mut std::net::TcpStream, msg: &[u8]) {
    use std::io::{Read, Write};
    s.write_all(msg).unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(buf, msg);
}

#[test]
fn sigterm_drains_open_connections_and_exits_0() {
    let cert = TestCert::localhost();
    let dir = tempfile::tempdir().unwrap();
    let cfg = echo_config(dir.path(), &cert, "20s");
    let mut d = spawn_serve(&["serve", "--config", &cfg]);
    let mut s = std::net::TcpStream::connect(d.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    plain_echo_roundtrip(&mut s, b"SSH-2.0-drain\r\n");
    sigterm(&d.child);
    wait_for_line(
        &d.log,
        "shutting down: no new connections",
        Duration::from_secs(10),
    );
    // No new connections...
    assert!(
        std::net::TcpStream::connect(d.addr).is_err(),
        "still accepting after SIGTERM"
    );
    // ...but the open one keeps working.
    plain_echo_roundtrip(&mut s, b"still here");
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "exited while a connection was open"
    );
    drop(s);
    assert_eq!(wait_exit(&mut d.child, Duration::from_secs(10)), 0);
}

#[test]
fn shutdown_grace_closes_what_is_left() {
    use std::io::Read;
    let cert = TestCert::localhost();
    let dir = tempfile::tempdir().unwrap();
    let cfg = echo_config(dir.path(), &cert, "1s");
    let mut d = spawn_serve(&["serve", "--config", &cfg]);
    let mut s = std::net::TcpStream::connect(d.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    plain_echo_roundtrip(&mut s, b"SSH-2.0-linger\r\n");
    let t0 = Instant::now();
    sigterm(&d.child);
    assert_eq!(wait_exit(&mut d.child, Duration::from_secs(10)), 0);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "exited before the grace period: {took:?}"
    );
    let mut b = [0u8; 16];
    assert!(
        matches!(s.read(&mut b), Ok(0) | Err(_)),
        "the lingering connection was closed"
    );
}

#[test]
fn json_logs_one_line_per_connection() {
    use std::io::{Read, Write};
    let cert = TestCert::localhost();
    let dir = tempfile::tempdir().unwrap();
    let cfg = echo_config(dir.path(), &cert, "1s");
    let mut d = spawn_serve(&["--log-format", "json", "serve", "--config", &cfg]);
    let mut s = std::net::TcpStream::connect(d.addr).unwrap();
    s.write_all(b"SSH-2.0-json\r\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let line = loop {
        let l = d
            .log
            .recv_timeout(Duration::from_secs(10))
            .expect("no connection log line");
        if l.contains("connection closed") {
            break l;
        }
    };
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(v["routed_by"], "plaintext", "{line}");
    assert_eq!(v["route"], "ssh", "{line}");
    assert_eq!(v["tls"], false, "{line}");
    assert_eq!(v["bytes_up"], 14, "{line}");
    assert_eq!(v["bytes_down"], 14, "{line}");
    assert_eq!(v["outcome"], "closed", "{line}");
    assert_eq!(v["end"], "closed", "{line}");
    assert_eq!(v["side"], "client", "{line}");
    assert!(
        v["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{line}"
    );
    sigterm(&d.child);
    assert_eq!(wait_exit(&mut d.child, Duration::from_secs(10)), 0);
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn out_of_file_descriptors_backs_off_and_recovers() {
    let cert = TestCert::localhost();
    let dir = tempfile::tempdir().unwrap();
    let up = dead_port();
    let cfg = write(
        dir.path(),
        "s.toml",
        &format!(
            "listen = [\"127.0.0.1:0\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[detect]\ntimeout = \"60s\"\non_timeout = \"close\"\n[routes.ssh]\nupstream = \"{up}\"\n",
            cert.cert.display(),
            cert.key.display()
        ),
    );
    // A hard limit of 64 descriptors: silent clients exhaust it quickly.
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "ulimit -n 64 && exec {} serve --config {cfg}",
        bin().display()
    ));
    let mut d = spawn_cmd(cmd);
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(std::net::TcpStream::connect(d.addr).unwrap());
    }
    let saw_backoff = loop {
        match d.log.recv_timeout(Duration::from_secs(10)) {
            Ok(l) if l.contains("backing off") => break true,
            Ok(_) => {}
            Err(_) => break false,
        }
    };
    assert!(saw_backoff, "no back-off logged when out of descriptors");
    // Backing off, not spinning: well under half a core over two seconds.
    let t0 = cpu_ticks(d.child.id());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(d.child.id()) - t0;
    assert!(
        used < 100,
        "accept loop spins while out of descriptors: {used} ticks in 2 s"
    );
    drop(silent);
    // Once descriptors free up, it serves again (after its back-off): plain HTTP gets the
    // built-in status page.
    let mut reply = String::new();
    until_sync(
        "serving again after descriptors freed",
        Duration::from_secs(20),
        || {
            use std::io::{Read, Write};
            reply.clear();
            let Ok(mut s) = std::net::TcpStream::connect(d.addr) else {
                return false;
            };
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            let _ = s.read_to_string(&mut reply);
            reply.starts_with("HTTP/1.1 200")
        },
    );
    sigterm(&d.child);
    assert_eq!(wait_exit(&mut d.child, Duration::from_secs(10)), 0);
}

#[test]
fn second_sigterm_closes_at_once() {
    let cert = TestCert::localhost();
    let dir = tempfile::tempdir().unwrap();
    let cfg = echo_config(dir.path(), &cert, "60s");
    let mut d = spawn_serve(&["serve", "--config", &cfg]);
    let mut s = std::net::TcpStream::connect(d.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    plain_echo_roundtrip(&mut s, b"SSH-2.0-impatient\r\n");
    sigterm(&d.child);
    wait_for_line(
        &d.log,
        "shutting down: no new connections",
        Duration::from_secs(10),
    );
    assert!(
        d.child.try_wait().unwrap().is_none(),
        "the first SIGTERM waits for the open connection"
    );
    sigterm(&d.child);
    assert_eq!(
        wait_exit(&mut d.child, Duration::from_secs(10)),
        0,
        "the second SIGTERM ends the 60 s grace at once"
    );
}

#[test]
fn start_up_log_reports_the_ktls_probe() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "s.toml", "listen = [\"127.0.0.1:0\"]\n");
    let mut d = spawn_serve(&[
        "serve",
        "--config",
        &cfg,
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
    ]);
    let line = loop {
        let l = d
            .log
            .recv_timeout(Duration::from_secs(10))
            .expect("no kTLS line at start-up");
        if l.contains("kTLS:") {
            break l;
        }
    };
    assert!(line.contains("offered by this kernel"), "{line}");
    sigterm(&d.child);
    assert_eq!(wait_exit(&mut d.child, Duration::from_secs(10)), 0);
}

/// The README's quick start, verbatim in spirit: `sluice serve` with no config, the user's
/// own key in `~/.ssh/authorized_keys`, `ssh -R myapp:80:...` through `sluice connect`, then
/// `curl https://myapp.t.localhost:8443/`. In a network namespace of its own (the default
/// port is fixed), with HOME in a temporary directory.
#[test]
fn the_embedded_default_serves_a_tunnel_end_to_end() {
    need("unshare", "util-linux");
    need("ip", "iproute2");
    need("ssh", "openssh-client");
    need("curl", "curl");
    let home = tempfile::tempdir().unwrap();
    let key = crate::ssh::keygen(home.path(), "id_ed25519");
    let ssh_dir = home.path().join(".ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    std::fs::write(ssh_dir.join("authorized_keys"), &key.public).unwrap();
    let site = home.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("hello.txt"), "hello from behind NAT\n").unwrap();
    let script = r#"
set -u
trap 'kill $(jobs -p) 2>/dev/null' EXIT
ip link set lo up
# exec: the job is python itself, so the EXIT trap ends it (a netns does not end processes).
(cd "$HOME/site" && exec /usr/bin/python3 -m http.server --bind 127.0.0.1 3000 >/dev/null 2>&1) &
"$BIN" serve >/dev/null 2>"$HOME/sluice.log" &
for i in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/8443) 2>/dev/null && break; sleep 0.05; done
CERT="$HOME/.local/state/sluice/tls-cert.pem"
ssh -F none -i "$KEY" -o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=no \
  -o UserKnownHostsFile=/dev/null -o ExitOnForwardFailure=yes \
  -o ProxyCommand="$BIN connect --ca $CERT %h:%p" \
  -N -R myapp:80:localhost:3000 -p 8443 tunnel@localhost >/dev/null 2>"$HOME/ssh.log" </dev/null &
for i in $(seq 1 200); do
  curl -sf --max-time 5 --cacert "$CERT" https://myapp.t.localhost:8443/hello.txt && exit 0
  sleep 0.05
done
echo "--- sluice log"; cat "$HOME/sluice.log"; echo "--- ssh log"; cat "$HOME/ssh.log"
exit 1
"#;
    let out = Command::new("unshare")
        .args(["--net", "--kill-child", "bash", "-c", script])
        .env("HOME", home.path())
        .env("BIN", bin())
        .env("KEY", &key.private)
        .env_remove("XDG_STATE_HOME")
        .env_remove("SLUICE_CONFIG")
        .env_remove("SLUICE_STATE_DIR")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("hello from behind NAT"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The TLS choices for this CPU are logged at start.
    let log = std::fs::read_to_string(home.path().join("sluice.log")).unwrap();
    let order = if sluice::tls::aes_hardware() {
        "TLS 1.2+, server order (default: AES instructions present): TLS13_AES_128_GCM_SHA256, "
    } else {
        "TLS 1.2+, server order (default: no AES instructions): TLS13_CHACHA20_POLY1305_SHA256, "
    };
    assert!(log.contains(order), "{log}");
}

#[test]
fn check_warns_when_no_certificate_covers_the_tunnel_domain() {
    let cert = TestCert::localhost();
    let text =
        "[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n[tunnels]\ndomain = \"t.example.org\"\n";
    let path = write(cert.dir.path(), "sluice.toml", text);
    let (code, _, err) = run(&["check", "--config", &path]);
    assert_eq!(code, 0, "a warning, not an error: {err}");
    assert!(
        err.contains("warning: no certificate") && err.contains("*.t.example.org"),
        "{err}"
    );
    let covered = TestCert::new(&["localhost", "*.t.example.org"]);
    let path = write(covered.dir.path(), "sluice.toml", text);
    let (code, _, err) = run(&["check", "--config", &path]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning"), "{err}");
}
