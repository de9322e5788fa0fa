use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::support::*;

/// A key pair made by ssh-keygen.
pub(crate) struct Key {
    pub(crate) private: PathBuf,
    pub(crate) public: String,
}

pub(crate) fn keygen(dir: &Path, name: &str) -> Key {
    need("ssh-keygen", "openssh-client");
    let private = dir.join(name);
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&private)
        .status()
        .unwrap();
    assert!(st.success());
    let public = std::fs::read_to_string(private.with_extension("pub"))
        .unwrap()
        .trim()
        .to_string();
    Key { private, public }
}

/// Signs `key` with `ca`: `ssh-keygen -s ca -I id -n principals -V validity [opts]`.
fn sign(ca: &Key, key: &Key, principals: &str, validity: &str, opts: &[&str]) -> PathBuf {
    let mut cmd = std::process::Command::new("ssh-keygen");
    cmd.args(["-q", "-s"]).arg(&ca.private).args([
        "-I",
        "test-cert",
        "-n",
        principals,
        "-V",
        validity,
    ]);
    for o in opts {
        cmd.args(["-O", o]);
    }
    let out = cmd.arg(key.private.with_extension("pub")).output().unwrap();
    assert!(
        out.status.success(),
        "ssh-keygen -s: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cert = PathBuf::from(format!("{}-cert.pub", key.private.display()));
    assert!(cert.exists());
    cert
}

/// The `[routes.ssh]` and `[ssh]` tables both fixtures use: keys from `DIR/authorized_keys`,
/// `permit_open` targets, `listen_ports`, unix sockets in `DIR/sockets`, plus `ssh_extra`.
pub(crate) fn ssh_section(
    dir: &Path,
    host_key: &Path,
    permit_open: &[String],
    ports: &str,
    ssh_extra: &str,
) -> String {
    let permit: Vec<String> = permit_open.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "[routes.ssh]\n[ssh]\nhost_key = \"{}\"\nauthorized_keys = [\"{}\"]\npermit_open = [{}]\nlisten_ports = \"{ports}\"\nsocket_dir = \"{}\"\n{ssh_extra}",
        host_key.display(),
        dir.join("authorized_keys").display(),
        permit.join(", "),
        dir.join("sockets").display()
    )
}

/// sluice with the embedded SSH server, and what the tests need around it.
pub(crate) struct Fixture {
    pub(crate) d: Daemon,
    dir: tempfile::TempDir,
    authorized: PathBuf,
    host_key: PathBuf,
    pub(crate) echo: std::net::SocketAddr,
    pub(crate) cert: TestCert,
}

impl Fixture {
    /// `authorized` lines; `permit` extra `permit_open` entries besides the echo server.
    pub(crate) async fn new(authorized: &str, permit: &[String], ports: &str) -> Fixture {
        Fixture::with(authorized, permit, ports, "").await
    }

    /// As `new`, with extra `[ssh]` keys.
    pub(crate) async fn with(
        authorized: &str,
        permit: &[String],
        ports: &str,
        ssh_extra: &str,
    ) -> Fixture {
        need("ssh", "openssh-client");
        need("openssl", "openssl");
        // Tunnel visitors come as NAME.t.localhost (tunnels.rs).
        let cert = TestCert::new(&["localhost", "127.0.0.1", "*.t.localhost"]);
        let dir = tempfile::tempdir().unwrap();
        let echo = echo_upstream().await;
        let auth_path = dir.path().join("authorized_keys");
        std::fs::write(&auth_path, authorized).unwrap();
        let host_key = dir.path().join("state/ssh_host_ed25519_key");
        let mut permit_open = vec![echo.to_string()];
        permit_open.extend(permit.iter().cloned());
        let extra = ssh_section(dir.path(), &host_key, &permit_open, ports, ssh_extra);
        let d = Daemon::start(&cert, &extra).await;
        Fixture {
            d,
            dir,
            authorized: auth_path,
            host_key,
            echo,
            cert,
        }
    }

    /// The embedded server's host key fingerprint (`SHA256:...`).
    pub(crate) fn host_key_fingerprint(&self) -> String {
        host_key_fingerprint(&self.host_key)
    }

    /// `ssh` through sluice's TLS port with `key`, plus `args`.
    pub(crate) fn ssh(&self, key: &Path, args: &[&str]) -> Command {
        ssh_via(self.d.addr.port(), key, args)
    }

    /// `ssh -N -o ExitOnForwardFailure=yes -R spec` run to its end (at most 20 s).
    pub(crate) async fn forward_output(&self, key: &Path, spec: &str) -> std::process::Output {
        let mut c = self.ssh(
            key,
            &[
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                spec,
                "tunnel@localhost",
            ],
        );
        tokio::time::timeout(Duration::from_secs(20), c.output())
            .await
            .expect("ssh -R hung")
            .unwrap()
    }

    /// `ssh -W target` with `input` on stdin: (success, stdout, stderr).
    pub(crate) async fn w(
        &self,
        key: &Path,
        target: &str,
        input: &[u8],
    ) -> (bool, Vec<u8>, String) {
        w_via(self.d.addr.port(), key, target, input).await
    }
}

/// `sluice serve` in a child process with the embedded SSH server, for tests that check what
/// it logs. Lines are read in order (`next_with`) or searched from the start (`any_with`).
struct Logged {
    d: crate::cli::Child2,
    seen: Vec<String>,
    /// Lines before this one were passed by `next_with`.
    cursor: usize,
    dir: tempfile::TempDir,
    echo: std::net::SocketAddr,
    cert: TestCert,
}

impl Logged {
    /// `authorized` lines, extra `[ssh]` keys.
    async fn new(authorized: &str, ssh_extra: &str) -> Logged {
        need("ssh", "openssh-client");
        need("openssl", "openssl");
        // Tunnel visitors come as NAME.t.localhost (tunnels.rs).
        let cert = TestCert::new(&["localhost", "127.0.0.1", "*.t.localhost"]);
        let dir = tempfile::tempdir().unwrap();
        let echo = echo_upstream().await;
        let authorized_path = dir.path().join("authorized_keys");
        std::fs::write(&authorized_path, authorized).unwrap();
        let cfg = dir.path().join("sluice.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = [\"127.0.0.1:0\"]\nshutdown_grace = \"2s\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n{}",
                cert.cert.display(),
                cert.key.display(),
                ssh_section(
                    dir.path(),
                    &dir.path().join("hostkey"),
                    &[echo.to_string()],
                    &port_range(10).1,
                    ssh_extra
                ),
            ),
        )
        .unwrap();
        let d = crate::cli::spawn_serve(&["serve", "--config", cfg.to_str().unwrap()]);
        Logged {
            d,
            seen: Vec::new(),
            cursor: 0,
            dir,
            echo,
            cert,
        }
    }

    /// Takes what the daemon logged since the last call, waiting until the deadline if nothing
    /// came; `false` once the deadline has passed.
    async fn read_more(&mut self, deadline: tokio::time::Instant) -> bool {
        loop {
            let mut got = false;
            while let Ok(l) = self.d.log.try_recv() {
                self.seen.push(l);
                got = true;
            }
            if got {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The next line (after the last one `next_with` returned) holding every needle, waiting up
    /// to 20 s for it.
    async fn next_with(&mut self, needles: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            while self.cursor < self.seen.len() {
                let l = &self.seen[self.cursor];
                self.cursor += 1;
                if needles.iter().all(|n| l.contains(n)) {
                    return l.clone();
                }
            }
            if !self.read_more(deadline).await {
                panic!(
                    "no log line with {needles:?} within 20 s; the log:\n{}",
                    self.seen.join("\n")
                );
            }
        }
    }

    /// The first line since the start holding every needle, waiting up to 20 s for it.
    async fn any_with(&mut self, needles: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(l) = self
                .seen
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return l.clone();
            }
            if !self.read_more(deadline).await {
                panic!(
                    "no log line with {needles:?} within 20 s; the log:\n{}",
                    self.seen.join("\n")
                );
            }
        }
    }
}

impl Logged {
    /// Every line so far holding `needle`.
    fn all_with(&mut self, needle: &str) -> Vec<String> {
        while let Ok(l) = self.d.log.try_recv() {
            self.seen.push(l);
        }
        self.seen
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.d.child.kill();
        let _ = self.d.child.wait();
    }
}

/// What `ssh-keygen -lf` prints for a key: `SHA256:...`.
/// `SHA256:...` of the key in `path` (a private or public key file).
pub(crate) fn host_key_fingerprint(path: &Path) -> String {
    let out = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh-keygen -lf {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

fn fingerprint_of(key: &Key) -> String {
    let out = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(key.private.with_extension("pub"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

/// The real OpenSSH client through sluice's TLS port `port` (openssl s_client as ProxyCommand),
/// logging in with `key`, plus `args`.
pub(crate) fn ssh_via(port: u16, key: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("ssh");
    c.args(["-F", "none", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10"])
        .arg("-o")
        .arg(format!("ProxyCommand=openssl s_client -quiet -verify_quiet -connect 127.0.0.1:{port} -servername localhost"))
        .arg("-i")
        .arg(key)
        .args(args)
        .kill_on_drop(true);
    c
}

/// `ssh -W target` through sluice's TLS port `port` with `input` on stdin: (success, stdout, stderr).
pub(crate) async fn w_via(
    port: u16,
    key: &Path,
    target: &str,
    input: &[u8],
) -> (bool, Vec<u8>, String) {
    let mut child = ssh_via(port, key, &["-W", target, "tunnel@localhost"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&data).await;
        drop(stdin);
    });
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("ssh -W took over 60 s")
        .unwrap();
    writer.await.unwrap();
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A free port range of `n` ports for `listen_ports`: (first port, "FIRST-LAST").
pub(crate) fn port_range(n: u16) -> (u16, String) {
    let start = reserve_ports(n);
    (start, format!("{start}-{}", start + n - 1))
}

/// Ends an ssh client the way a user does (SIGTERM): it takes its ProxyCommand down with it.
async fn term(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
}

async fn wait_listening(port: u16) {
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {port}");
}

/// Connects to the unix socket `path` once something listens there (at most 10 s).
async fn unix_when_listening(path: &Path) -> tokio::net::UnixStream {
    for _ in 0..200 {
        if let Ok(s) = tokio::net::UnixStream::connect(path).await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {}", path.display());
}

const MIB16: usize = 16 << 20;

#[tokio::test]
async fn w_and_l_carry_16_mib_intact() {
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    let f = Fixture::new(&id.public, &[], &port_range(10).1).await;
    let data = pattern(11, MIB16);
    let (ok, out, err) = f.w(&id.private, &f.echo.to_string(), &data).await;
    assert!(ok, "ssh -W failed: {err}");
    assert_eq!(out.len(), MIB16, "{err}");
    assert_eq!(sha256(&out), sha256(&data));

    // The local end on a unix socket: no port to pick (the server side is the same -L).
    let local = dir.path().join("l.sock");
    let mut child = f
        .ssh(
            &id.private,
            &[
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-L",
                &format!("{}:{}", local.display(), f.echo),
                "tunnel@localhost",
            ],
        )
        .spawn()
        .unwrap();
    let s = unix_when_listening(&local).await;
    let got = tokio::time::timeout(Duration::from_secs(60), exchange(s, &data))
        .await
        .unwrap();
    assert_eq!(sha256(&got), sha256(&data), "ssh -L carried 16 MiB intact");
    child.kill().await.unwrap();
    f.d.stop().await;
}

#[tokio::test]
async fn targets_outside_permit_open_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    let f = Fixture::new(&id.public, &[], &port_range(10).1).await;
    let other = echo_upstream().await;
    let (_, out, err) = f.w(&id.private, &other.to_string(), b"x").await;
    assert!(out.is_empty(), "reached a target outside permit_open");
    assert!(
        err.contains("administratively prohibited") || err.contains("open failed"),
        "{err}"
    );
    // A name is checked by what it resolves to: localhost is 127.0.0.1, but not that port.
    let (_, out, _) = f
        .w(&id.private, &format!("localhost:{}", other.port()), b"x")
        .await;
    assert!(out.is_empty());
    f.d.stop().await;
}

#[tokio::test]
async fn cidr_and_wildcard_port_entries_allow_by_resolved_address() {
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    let f = Fixture::new(
        &id.public,
        &["127.0.0.0/8:*".to_string()],
        &port_range(10).1,
    )
    .await;
    let other = echo_upstream().await;
    let (ok, out, err) = f
        .w(
            &id.private,
            &format!("localhost:{}", other.port()),
            b"via-cidr",
        )
        .await;
    assert!(ok && out == b"via-cidr", "{err}");
    f.d.stop().await;
}

#[tokio::test]
async fn unknown_key_refused_and_shell_gets_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    let stranger = keygen(dir.path(), "stranger");
    let f = Fixture::new(&id.public, &[], &port_range(10).1).await;
    let (ok, out, err) = f.w(&stranger.private, &f.echo.to_string(), b"x").await;
    assert!(!ok && out.is_empty(), "an unknown key was let in");
    assert!(err.contains("Permission denied"), "{err}");

    // A command or a shell: a clear refusal and an exit, never a hang.
    let ssh_line = |extra: &str| {
        format!(
            "ssh -F none -o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o 'ProxyCommand=openssl s_client -quiet -verify_quiet -connect 127.0.0.1:{} -servername localhost' -i {} {extra}",
            f.d.addr.port(),
            id.private.display()
        )
    };
    let cases = [
        ("a command", ssh_line("tunnel@localhost uname")),
        ("a shell without a terminal", ssh_line("tunnel@localhost")),
        // From a real terminal (script(1) provides one): no PTY, then the message.
        (
            "an interactive login",
            format!(
                "script -qec \"{}\" /dev/null",
                ssh_line("tunnel@localhost").replace('"', "\\\"")
            ),
        ),
    ];
    for (what, line) in cases {
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            Command::new("sh")
                .arg("-c")
                .arg(&line)
                .stdin(Stdio::null())
                .output(),
        )
        .await
        .expect("ssh hung")
        .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(!out.status.success(), "{what}: exited 0");
        assert!(
            all.contains("this server provides tunnels only; use -N, -W, -L or -R"),
            "{what}: {all}"
        );
    }
    // A forced terminal (-tt): the PTY refusal ends it at once.
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        f.ssh(&id.private, &["-tt", "tunnel@localhost"])
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("ssh -tt hung")
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PTY allocation request failed"));
    // -N stays up: logged in, it is still there a second later (an observation window after
    // the login, not a barrier).
    let mut n = f
        .ssh(&id.private, &["-v", "-N", "tunnel@localhost"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = tokio::io::BufReader::new(n.stderr.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(l) = err.next_line().await.unwrap() {
            if l.contains("Authenticated to") {
                return;
            }
        }
        panic!("ssh -N ended before logging in");
    })
    .await
    .expect("ssh -N not logged in within 20 s");
    // Keep reading: a closed pipe must not be what ends it.
    let _drain = tokio::spawn(async move { while let Ok(Some(_)) = err.next_line().await {} });
    assert!(
        tokio::time::timeout(Duration::from_secs(1), n.wait())
            .await
            .is_err(),
        "ssh -N exited after logging in"
    );
    n.kill().await.unwrap();
    f.d.stop().await;
}

async fn stderr_line_with(child: &mut Child, needle: &str) -> String {
    let mut err = child.stderr.take().unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = String::from_utf8_lossy(&buf).into_owned();
        if s.contains(needle) {
            child.stderr = None;
            return s;
        }
        match tokio::time::timeout_at(deadline, err.read(&mut chunk)).await {
            Ok(Ok(0)) | Err(_) => return s,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(_)) => return s,
        }
    }
}

#[tokio::test]
async fn reverse_forwards_allocated_fixed_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    let (start, range) = port_range(20);
    let f = Fixture::new(&id.public, &[], &range).await;
    let web = http_upstream().await;

    // -R 0: a port from the range, reported to the client.
    let mut r0 = f
        .ssh(
            &id.private,
            &[
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                &format!("0:{web}"),
                "tunnel@localhost",
            ],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = stderr_line_with(&mut r0, "Allocated port").await;
    let port: u16 = err
        .split("Allocated port ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        (start..start + 20).contains(&port),
        "{port} outside {range}"
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let reply = String::from_utf8(read_all(&mut s).await).unwrap();
    assert!(reply.contains("hello-from-upstream"), "{reply}");

    // A fixed port in the range; a second session cannot take it.
    let fixed = if port == start { start + 1 } else { start };
    let mut r1 = f
        .ssh(
            &id.private,
            &[
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                &format!("{fixed}:{web}"),
                "tunnel@localhost",
            ],
        )
        .spawn()
        .unwrap();
    wait_listening(fixed).await;
    let out = f
        .forward_output(&id.private, &format!("{fixed}:{web}"))
        .await;
    assert!(!out.status.success(), "two sessions held one port");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "remote port forwarding failed for listen port {fixed}"
        )),
        "{err}"
    );

    // Outside the range: refused.
    let out = f
        .forward_output(&id.private, &format!("{}:{web}", start + 100))
        .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("remote port forwarding failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // When a session ends, its listeners close: no leaked ports.
    term(&mut r1).await;
    let mut freed = false;
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", fixed)).await.is_err() {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(freed, "port {fixed} still open after its session ended");
    r0.kill().await.unwrap();
    f.d.stop().await;
}

#[tokio::test]
async fn reverse_forward_onto_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    let line = format!("permitlisten=\"/preview-*.sock\" {}", id.public);
    let f = Fixture::new(&line, &[], &port_range(10).1).await;
    let web = http_upstream().await;
    let mut r = f
        .ssh(
            &id.private,
            &[
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                &format!("/preview-1.sock:{web}"),
                "tunnel@localhost",
            ],
        )
        .spawn()
        .unwrap();
    let sock = f.dir.path().join("sockets/preview-1.sock");
    let mut s = None;
    for _ in 0..200 {
        if let Ok(c) = tokio::net::UnixStream::connect(&sock).await {
            s = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut s = s.expect("the unix socket did not appear");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let reply = String::from_utf8(read_all(&mut s).await).unwrap();
    assert!(reply.contains("hello-from-upstream"), "{reply}");
    term(&mut r).await;
    for _ in 0..100 {
        if !sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!sock.exists(), "the socket file outlived its session");
    f.d.stop().await;
}

#[tokio::test]
async fn key_options_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let (po, pl, fr, ex, rs) = (
        keygen(dir.path(), "po"),
        keygen(dir.path(), "pl"),
        keygen(dir.path(), "fr"),
        keygen(dir.path(), "ex"),
        keygen(dir.path(), "rs"),
    );
    let second = echo_upstream().await;
    let (start, range) = port_range(10);
    // The echo server address is only known once the fixture starts; permitopen names it.
    let f = Fixture::new("", &[second.to_string()], &range).await;
    let lines = format!(
        "permitopen=\"{}\" {}\npermitlisten=\"{}\" {}\nfrom=\"10.0.0.0/8\" {}\nexpiry-time=\"20200101Z\" {}\nrestrict {}\n",
        f.echo,
        po.public,
        start + 1,
        pl.public,
        fr.public,
        ex.public,
        rs.public
    );
    std::fs::write(&f.authorized, lines).unwrap();
    // The watcher picks the new lines up: the permitopen key logs in to its target.
    f.until_login(&po.private, true).await;
    let (_, out, _) = f.w(&po.private, &second.to_string(), b"po").await;
    assert!(
        out.is_empty(),
        "a globally permitted target outside the key's permitopen was reached"
    );

    let web = http_upstream().await;
    let ok_r = f
        .ssh(
            &pl.private,
            &[
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                &format!("{}:{web}", start + 1),
                "tunnel@localhost",
            ],
        )
        .spawn()
        .unwrap();
    wait_listening(start + 1).await;
    drop(ok_r);
    let out = f
        .forward_output(&pl.private, &format!("{}:{web}", start + 2))
        .await;
    assert!(!out.status.success(), "permitlisten allowed another port");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "remote port forwarding failed for listen port {}",
            start + 2
        )),
        "{err}"
    );

    for (k, what) in [(&fr, "from="), (&ex, "expiry-time")] {
        let (ok, out, err) = f.w(&k.private, &f.echo.to_string(), b"x").await;
        assert!(!ok && out.is_empty(), "{what} not enforced: {err}");
        assert!(err.contains("Permission denied"), "{what}: {err}");
    }
    // restrict: logs in, but may not forward.
    let (_, out, err) = f.w(&rs.private, &f.echo.to_string(), b"x").await;
    assert!(
        out.is_empty() && !err.contains("Permission denied"),
        "restrict: {err}"
    );
    f.d.stop().await;
}

impl Fixture {
    /// After a change to authorized_keys, waits (at most 20 s) until the file watcher has picked
    /// it up: until `key` logs in and reaches the echo server (`accepted`), or is refused with
    /// "Permission denied".
    async fn until_login(&self, key: &Path, accepted: bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (ok, out, err) = self.w(key, &self.echo.to_string(), b"probe").await;
            let now = if accepted {
                ok && out == b"probe"
            } else {
                !ok && out.is_empty() && err.contains("Permission denied")
            };
            if now {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "authorized_keys change not in force after 20 s (want accepted={accepted}): {err}"
            );
        }
    }
}

#[tokio::test]
async fn certificates_checked_fully() {
    let dir = tempfile::tempdir().unwrap();
    let ca = keygen(dir.path(), "ca");
    let rogue_ca = keygen(dir.path(), "rogue");
    let mut f = Logged::new(&format!("cert-authority {}", ca.public), "").await;
    // (name, signing CA, principal, validity, extra ssh-keygen options, the refusal logged
    // or None: accepted)
    type Case<'a> = (
        &'a str,
        &'a Key,
        &'a str,
        &'a str,
        &'a [&'a str],
        Option<&'a str>,
    );
    let cases: [Case<'_>; 7] = [
        ("valid", &ca, "tunnel", "-5m:+1h", &[], None),
        (
            "expired",
            &ca,
            "tunnel",
            "-2d:-1d",
            &[],
            Some("certificate not valid: expired (at "),
        ),
        (
            "not yet valid",
            &ca,
            "tunnel",
            "+1d:+2d",
            &[],
            Some("certificate not valid: not yet valid (from "),
        ),
        (
            "wrong principal",
            &ca,
            "someone-else",
            "-5m:+1h",
            &[],
            Some("no principal of the certificate (someone-else) allowed for this login"),
        ),
        (
            "untrusted CA",
            &rogue_ca,
            "tunnel",
            "-5m:+1h",
            &[],
            Some("certificate authority not trusted"),
        ),
        (
            "source-address elsewhere",
            &ca,
            "tunnel",
            "-5m:+1h",
            &["source-address=10.0.0.0/8"],
            Some("client address not in source-address 10.0.0.0/8"),
        ),
        (
            "source-address here",
            &ca,
            "tunnel",
            "-5m:+1h",
            &["source-address=127.0.0.0/8"],
            None,
        ),
    ];
    let echo = f.echo.to_string();
    for (i, (name, signer, principal, validity, opts, refusal)) in cases.into_iter().enumerate() {
        let user = keygen(dir.path(), &format!("user{i}"));
        sign(signer, &user, principal, validity, opts);
        let (ok, out, err) = w_via(f.d.addr.port(), &user.private, &echo, name.as_bytes()).await;
        match refusal {
            None => assert!(ok && out == name.as_bytes(), "{name}: {err}"),
            Some(reason) => {
                assert!(!ok && out.is_empty(), "{name} was let in");
                assert!(err.contains("Permission denied"), "{name}: {err}");
                f.next_with(&[
                    "Failed publickey for tunnel",
                    "certificate ID test-cert",
                    reason,
                ])
                .await;
            }
        }
    }
    // Without permit-port-forwarding the certificate logs in but cannot forward.
    let user = keygen(dir.path(), "noport");
    sign(&ca, &user, "tunnel", "-5m:+1h", &["no-port-forwarding"]);
    let (_, out, err) = w_via(f.d.addr.port(), &user.private, &echo, b"x").await;
    assert!(
        out.is_empty() && !err.contains("Permission denied"),
        "{err}"
    );
}

#[tokio::test]
async fn removed_key_refused_after_reload_open_session_kept() {
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    let f = Fixture::new(&id.public, &[], &port_range(10).1).await;
    let local = dir.path().join("l.sock");
    let mut open = f
        .ssh(
            &id.private,
            &[
                "-N",
                "-L",
                &format!("{}:{}", local.display(), f.echo),
                "tunnel@localhost",
            ],
        )
        .spawn()
        .unwrap();
    unix_when_listening(&local).await;
    std::fs::write(&f.authorized, "# nobody\n").unwrap();
    f.until_login(&id.private, false).await;
    // The session opened before the reload still works.
    let s = tokio::net::UnixStream::connect(&local).await.unwrap();
    assert_eq!(exchange(s, b"still open").await, b"still open");
    open.kill().await.unwrap();
    f.d.stop().await;
}

fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[tokio::test]
async fn expiry_ends_a_live_session() {
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    // expiry-time has whole seconds.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry = UNIX_EPOCH + Duration::from_secs(now + 4);
    let line = format!("expiry-time=\"{}\" {}", utc_stamp(expiry), id.public);
    let f = Fixture::new(&line, &[], &port_range(10).1).await;
    let mut child = f
        .ssh(
            &id.private,
            &["-W", &f.echo.to_string(), "tunnel@localhost"],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    stdin.write_all(b"alive").await.unwrap();
    assert_eq!(
        read_n(&mut stdout, 5).await,
        b"alive",
        "the tunnel works before expiry"
    );
    // The client keeps stdin open; only the server can end this.
    let st = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the session outlived its key's expiry-time")
        .unwrap();
    assert!(SystemTime::now() >= expiry, "closed before the expiry");
    let _ = st;
    drop(stdin);
    f.d.stop().await;
}

#[tokio::test]
async fn host_key_is_made_once_with_mode_0600_and_reused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    let f = Fixture::new(&id.public, &[], &port_range(10).1).await;
    let meta = std::fs::metadata(&f.host_key).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let first = std::fs::read(&f.host_key).unwrap();
    f.d.stop().await;
    // A second server on the same file keeps the key.
    let key = sluice::ssh::load_or_create_host_key(&f.host_key).unwrap();
    assert_eq!(std::fs::read(&f.host_key).unwrap(), first);
    assert_eq!(
        key.public_key()
            .to_openssh()
            .unwrap()
            .split_whitespace()
            .nth(1),
        std::fs::read_to_string(f.host_key.with_extension("pub"))
            .unwrap()
            .split_whitespace()
            .nth(1)
    );
}

/// A real OpenSSH sshd on a loopback port, for `-J` through sluice. The test holds the
/// listener (port 0: no port handed from one socket to another) and runs `sshd -i` (inetd mode)
/// on each connection.
pub(crate) struct Sshd {
    pub(crate) child: SshdProcesses,
    pub(crate) port: u16,
    /// Its host key's public line.
    pub(crate) host_public: String,
    _dir: tempfile::TempDir,
}

/// The accept loop and the `sshd -i` processes it started: killing or dropping it ends them.
pub(crate) struct SshdProcesses(tokio::task::JoinHandle<()>);

impl SshdProcesses {
    /// Ends the accept loop and every sshd it started.
    pub(crate) async fn kill(&mut self) -> std::io::Result<()> {
        self.0.abort();
        let _ = (&mut self.0).await;
        Ok(())
    }
}

impl Drop for SshdProcesses {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(crate) async fn start_sshd(client: &Key) -> Sshd {
    need("/usr/sbin/sshd", "openssh-server");
    let dir = tempfile::tempdir().unwrap();
    let host = keygen(dir.path(), "host");
    let auth = dir.path().join("authorized_keys");
    std::fs::write(&auth, format!("{}\n", client.public)).unwrap();
    // sshd wants its privilege-separation directory even in -i mode.
    let _ = std::fs::create_dir_all("/run/sshd");
    let cfg = dir.path().join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "HostKey {}\nAuthorizedKeysFile {}\nStrictModes no\nUsePAM no\nPidFile none\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
            host.private.display(),
            auth.display()
        ),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accept = tokio::spawn(async move {
        // Dropped with the task: kill_on_drop ends each sshd.
        let mut running = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let tcp = tcp.into_std().unwrap();
            tcp.set_nonblocking(false).unwrap();
            let stdin = std::os::fd::OwnedFd::from(tcp);
            let stdout = stdin.try_clone().unwrap();
            running.push(
                Command::new("/usr/sbin/sshd")
                    .args(["-i", "-e", "-f"])
                    .arg(&cfg)
                    .stdin(stdin)
                    .stdout(stdout)
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .unwrap(),
            );
        }
    });
    Sshd {
        child: SshdProcesses(accept),
        port,
        host_public: host.public,
        _dir: dir,
    }
}

/// The local login name, which the test sshd (running as this user) accepts.
pub(crate) fn login_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".into())
}

/// An ssh_config in `dir` with `Host sluice` (through TLS to `port`) and `key` for every host:
/// `ssh -F CFG -J sluice ...`.
pub(crate) fn jump_config(dir: &Path, port: u16, key: &Path) -> PathBuf {
    let cfg = dir.join("ssh_config");
    std::fs::write(
        &cfg,
        format!(
            "Host sluice\n  HostName localhost\n  User tunnel\n  ProxyCommand openssl s_client -quiet -verify_quiet -connect 127.0.0.1:{port} -servername localhost\n\
             Host *\n  IdentityFile {}\n  IdentitiesOnly yes\n  BatchMode yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n",
            key.display()
        ),
    )
    .unwrap();
    cfg
}

#[tokio::test]
async fn jump_through_sluice_to_a_real_sshd() {
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    let mut sshd = start_sshd(&id).await;
    let f = Fixture::new(
        &id.public,
        &[format!("127.0.0.1:{}", sshd.port)],
        &port_range(10).1,
    )
    .await;
    let user = login_user();
    let cfg = jump_config(dir.path(), f.d.addr.port(), &id.private);
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new("ssh")
            .arg("-F")
            .arg(&cfg)
            .args([
                "-J",
                "sluice",
                "-p",
                &sshd.port.to_string(),
                &format!("{user}@127.0.0.1"),
                "echo jumped-$((6*7))",
            ])
            .output(),
    )
    .await
    .expect("ssh -J hung")
    .unwrap();
    assert!(
        out.status.success(),
        "ssh -J: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "jumped-42");
    sshd.child.kill().await.unwrap();
    f.d.stop().await;
}

#[tokio::test]
async fn unauthenticated_time_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    let f = Fixture::with(
        &id.public,
        &[],
        &port_range(10).1,
        "auth_timeout = \"2s\"\n",
    )
    .await;
    // Sends its banner, then nothing.
    let mut s = TcpStream::connect(f.d.addr).await.unwrap();
    s.write_all(b"SSH-2.0-slowpoke\r\n").await.unwrap();
    let took = closed_within(&mut s, Duration::from_secs(10)).await;
    assert!(
        took >= Duration::from_millis(1900),
        "closed before auth_timeout: {took:?}"
    );
    // Inside TLS, sending nothing at all: routed to ssh at detect.timeout, then bounded too.
    let tls = tls_connect(f.d.addr, &f.cert, "localhost", &["ssh"]).await;
    let mut tls = tls;
    let mut banner = [0u8; 14];
    tls.read_exact(&mut banner).await.unwrap();
    assert_eq!(&banner, b"SSH-2.0-sluice");
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest)).await;
    assert!(
        r.is_ok(),
        "a silent SSH client was not dropped after auth_timeout"
    );
    f.d.stop().await;
}

#[tokio::test]
async fn forwards_per_session_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    let f = Fixture::with(&id.public, &[], &port_range(10).1, "max_forwards = 1\n").await;
    let web = http_upstream().await;
    let (a, b) = (format!("0:{web}"), format!("0:{}", f.echo));
    let mut c = f.ssh(
        &id.private,
        &[
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &a,
            "-R",
            &b,
            "tunnel@localhost",
        ],
    );
    let out = tokio::time::timeout(Duration::from_secs(20), c.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        !out.status.success(),
        "two -R forwards with max_forwards = 1"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("remote port forwarding failed"));
    f.d.stop().await;
}

/// Real log lines from the binary, checked against the shipped fail2ban filter.
#[tokio::test]
async fn fail2ban_filter_matches_real_failure_lines() {
    need("fail2ban-regex", "fail2ban");
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    let stranger = keygen(dir.path(), "stranger");
    let cert = TestCert::localhost();
    std::fs::write(dir.path().join("authorized_keys"), &id.public).unwrap();
    let echo = echo_upstream().await;
    for format in ["text", "json"] {
        let cfg = dir.path().join(format!("{format}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "listen = [\"127.0.0.1:0\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[routes.ssh]\n[ssh]\nhost_key = \"{}\"\nauthorized_keys = [\"{}\"]\npermit_open = [\"{echo}\"]\n",
                cert.cert.display(),
                cert.key.display(),
                dir.path().join("hostkey").display(),
                dir.path().join("authorized_keys").display()
            ),
        )
        .unwrap();
        let mut d = crate::cli::spawn_serve(&[
            "--log-format",
            format,
            "serve",
            "--config",
            cfg.to_str().unwrap(),
        ]);
        let fixture_port = d.addr.port();
        let mut lines = Vec::new();
        // A plain failure, then a user name that tries to plant another address in the line.
        for user in ["mallory", "x from 198.51.100.9 port 1 ssh2"] {
            let out = ssh_via(
                fixture_port,
                &stranger.private,
                &["-l", user, "-W", &echo.to_string(), "localhost"],
            )
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
            assert!(!out.status.success());
            while let Ok(l) = d.log.recv_timeout(Duration::from_secs(5)) {
                let done = l.contains("connection closed");
                lines.push(l);
                if done {
                    break;
                }
            }
        }
        let failed: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("Failed publickey"))
            .collect();
        assert_eq!(failed.len(), 2, "one line per failed connection: {lines:?}");
        crate::cli::sigterm(&d.child);
        crate::cli::wait_exit(&mut d.child, Duration::from_secs(10));
        let log = dir.path().join(format!("{format}.log"));
        std::fs::write(&log, lines.join("\n") + "\n").unwrap();
        let filter = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/fail2ban/filter.d/sluice.conf"
        );
        let out = Command::new("fail2ban-regex")
            .arg(&log)
            .arg(filter)
            .output()
            .await
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "fail2ban-regex: {report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let matched: u32 = report
            .lines()
            .find(|l| l.starts_with("Lines: "))
            .and_then(|l| l.split(',').find(|p| p.contains("matched")))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(
            matched >= 1,
            "{format}: the filter matched no line:\n{report}\n{}",
            lines.join("\n")
        );
        assert!(report.contains("127.0.0.1"), "{format}: {report}");
        assert!(
            !report.contains("198.51.100.9"),
            "{format}: a user name planted an address: {report}"
        );
    }
}

#[tokio::test]
async fn sighup_reloads_authorized_keys() {
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    let cert = TestCert::localhost();
    let auth = dir.path().join("authorized_keys");
    std::fs::write(&auth, "# nobody yet\n").unwrap();
    let echo = echo_upstream().await;
    let cfg = dir.path().join("s.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = [\"127.0.0.1:0\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[routes.ssh]\n[ssh]\nhost_key = \"{}\"\nauthorized_keys = [\"{}\"]\npermit_open = [\"{echo}\"]\n",
            cert.cert.display(),
            cert.key.display(),
            dir.path().join("hostkey").display(),
            auth.display()
        ),
    )
    .unwrap();
    let mut d = crate::cli::spawn_serve(&["serve", "--config", cfg.to_str().unwrap()]);
    std::fs::write(&auth, format!("{}\n", id.public)).unwrap();
    Command::new("kill")
        .args(["-HUP", &d.child.id().to_string()])
        .status()
        .await
        .unwrap();
    let mut reloaded = false;
    while let Ok(l) = d.log.recv_timeout(Duration::from_secs(5)) {
        if l.contains("SIGHUP: reloaded") && l.contains("authorized keys reloaded") {
            reloaded = true;
            break;
        }
    }
    assert!(reloaded, "no reload logged after SIGHUP");
    let mut child = ssh_via(
        d.addr.port(),
        &id.private,
        &["-W", &echo.to_string(), "tunnel@localhost"],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"after-hup").await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.stdout, b"after-hup");
    crate::cli::sigterm(&d.child);
    assert_eq!(
        crate::cli::wait_exit(&mut d.child, Duration::from_secs(10)),
        0
    );
}

/// Two forwards on one connection; one target never reads. The other must keep flowing, as
/// with OpenSSH's sshd (russh alone stalls the whole connection: see vendor/russh).
async fn stalled_channel_case(chunk: usize, count: usize) {
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    // Accepts and never reads.
    let (hold_tx, mut hold_rx) = tokio::sync::mpsc::unbounded_channel();
    let stuck = serve_upstream(move |s| {
        let hold_tx = hold_tx.clone();
        async move {
            let _ = hold_tx.send(s);
        }
    })
    .await;
    let f = Fixture::new(&id.public, &[stuck.to_string()], &port_range(10).1).await;
    let (la, lb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    let mut child = f
        .ssh(
            &id.private,
            &[
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-L",
                &format!("{}:{}", la.display(), f.echo),
                "-L",
                &format!("{}:{stuck}", lb.display()),
                "tunnel@localhost",
            ],
        )
        .spawn()
        .unwrap();
    unix_when_listening(&la).await;
    let mut b = unix_when_listening(&lb).await;
    let pushed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let progress = pushed.clone();
    let pusher = tokio::spawn(async move {
        let data = vec![7u8; chunk];
        for _ in 0..count {
            let mut off = 0;
            while off < data.len() {
                match b.write(&data[off..]).await {
                    Ok(0) | Err(_) => return b,
                    Ok(n) => {
                        off += n;
                        progress.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }
        b
    });
    let _held = hold_rx.recv().await;
    // The pusher fills everything on the way to the stuck target (window, buffers) until it can
    // write no more: wait until it has made no progress for half a second (at most 30 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut seen = usize::MAX;
    loop {
        let now = pushed.load(std::sync::atomic::Ordering::Relaxed);
        if now == seen {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pusher never stalled ({now} bytes written): does the target read?"
        );
        seen = now;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        seen < chunk * count,
        "all {seen} bytes were taken: nothing is stuck"
    );
    let mut a = tokio::net::UnixStream::connect(&la).await.unwrap();
    a.write_all(b"still-flowing").await.unwrap();
    let mut got = [0u8; 13];
    let r = tokio::time::timeout(Duration::from_secs(10), a.read_exact(&mut got)).await;
    assert!(
        r.is_ok(),
        "a channel stalled behind another channel's unread data ({chunk} B writes)"
    );
    assert_eq!(&got, b"still-flowing");
    pusher.abort();
    term(&mut child).await;
    f.d.stop().await;
}

#[tokio::test]
async fn a_stalled_channel_does_not_stall_the_others() {
    stalled_channel_case(1 << 20, 64).await;
}

#[tokio::test]
async fn a_certificate_expiring_ends_its_live_session() {
    let dir = tempfile::tempdir().unwrap();
    let ca = keygen(dir.path(), "ca");
    let user = keygen(dir.path(), "user");
    // Valid from a minute ago until 5 seconds from now.
    sign(&ca, &user, "tunnel", "-1m:+5s", &[]);
    let f = Fixture::new(
        &format!("cert-authority {}", ca.public),
        &[],
        &port_range(10).1,
    )
    .await;
    let mut child = f
        .ssh(
            &user.private,
            &["-W", &f.echo.to_string(), "tunnel@localhost"],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    stdin.write_all(b"alive").await.unwrap();
    assert_eq!(read_n(&mut stdout, 5).await, b"alive");
    tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the session outlived its certificate")
        .unwrap();
    drop(stdin);
    f.d.stop().await;
}

#[tokio::test]
async fn strict_kex_and_modern_algorithms_only() {
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    let f = Fixture::new(&id.public, &[], &port_range(10).1).await;
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        f.ssh(
            &id.private,
            &["-vv", "-W", &f.echo.to_string(), "tunnel@localhost"],
        )
        .stdin(Stdio::null())
        .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let proposal = err
        .lines()
        .skip_while(|l| !l.contains("peer server KEXINIT proposal"))
        .take(12)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        proposal.contains("kex-strict-s-v00@openssh.com"),
        "no strict kex offered:\n{proposal}"
    );
    for weak in [
        "diffie-hellman-group14-sha1",
        "diffie-hellman-group1-sha1",
        "hmac-sha1",
        "zlib",
        "3des-cbc",
        "aes128-cbc",
    ] {
        assert!(!proposal.contains(weak), "offers {weak}:\n{proposal}");
    }
    // A client that insists on an old key exchange is turned away.
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        f.ssh(
            &id.private,
            &[
                "-o",
                "KexAlgorithms=diffie-hellman-group14-sha1",
                "-W",
                &f.echo.to_string(),
                "tunnel@localhost",
            ],
        )
        .stdin(Stdio::null())
        .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no matching key exchange method"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    f.d.stop().await;
}

#[tokio::test]
async fn shutdown_sends_ssh_sessions_a_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    let cert = TestCert::localhost();
    std::fs::write(dir.path().join("authorized_keys"), &id.public).unwrap();
    let cfg = dir.path().join("s.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = [\"127.0.0.1:0\"]\nshutdown_grace = \"1s\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[routes.ssh]\n[ssh]\nhost_key = \"{}\"\nauthorized_keys = [\"{}\"]\n",
            cert.cert.display(),
            cert.key.display(),
            dir.path().join("hostkey").display(),
            dir.path().join("authorized_keys").display()
        ),
    )
    .unwrap();
    let mut d = crate::cli::spawn_serve(&["serve", "--config", cfg.to_str().unwrap()]);
    let child = ssh_via(d.addr.port(), &id.private, &["-N", "tunnel@localhost"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut logged_in = false;
    while let Ok(l) = d.log.recv_timeout(Duration::from_secs(10)) {
        if l.contains("Accepted publickey") {
            logged_in = true;
            break;
        }
    }
    assert!(logged_in);
    crate::cli::sigterm(&d.child);
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("ssh -N still connected after shutdown")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sluice is shutting down"), "{err}");
    assert_eq!(
        crate::cli::wait_exit(&mut d.child, Duration::from_secs(10)),
        0
    );
}

#[test]
fn hostkey_command_prints_the_fingerprint_the_server_uses() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .args(["hostkey", "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let fp = text.split_whitespace().next().unwrap().to_string();
    assert!(fp.starts_with("SHA256:"), "{text}");
    // The same key again, and the same fingerprint ssh-keygen computes.
    let again = std::process::Command::new(bin())
        .args(["hostkey", "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&again.stdout), text);
    let pubfile = dir.path().join("ssh_host_ed25519_key.pub");
    let kg = std::process::Command::new("ssh-keygen")
        .arg("-lf")
        .arg(&pubfile)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&kg.stdout).contains(&fp),
        "{}",
        String::from_utf8_lossy(&kg.stdout)
    );
}

#[tokio::test]
async fn unix_socket_forwards_need_permitlisten() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, listed) = (keygen(dir.path(), "plain"), keygen(dir.path(), "listed"));
    let mut f = Logged::new(
        &format!(
            "{}\npermitlisten=\"/app-*.sock\" {}\n",
            plain.public, listed.public
        ),
        "",
    )
    .await;
    let web = http_upstream().await;
    let port = f.d.addr.port();
    let forward = |key: &Key, name: &str| {
        ssh_via(
            port,
            &key.private,
            &[
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                &format!("/{name}:{web}"),
                "tunnel@localhost",
            ],
        )
    };
    // Any key could take any name before; without permitlisten= it gets none.
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        forward(&plain, "app-1.sock").output(),
    )
    .await
    .expect("ssh -R stayed up: a key without permitlisten= got the socket")
    .unwrap();
    assert!(
        !out.status.success(),
        "a key without permitlisten= took a socket"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("remote port forwarding failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let l = f
        .any_with(&["denied streamlocal-forward", "app-1.sock"])
        .await;
    assert!(
        l.contains("unix-socket forwards need permitlisten=") && l.contains("user=\"tunnel\""),
        "{l}"
    );
    assert!(!f.dir.path().join("sockets/app-1.sock").exists());
    // A key that lists the name gets it, and only names it lists.
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        forward(&listed, "other.sock").output(),
    )
    .await
    .expect("ssh -R hung")
    .unwrap();
    assert!(!out.status.success());
    f.any_with(&[
        "denied streamlocal-forward",
        "not in the key's permitlisten",
    ])
    .await;
    let mut ok = forward(&listed, "app-2.sock").spawn().unwrap();
    let l = f.any_with(&["reverse forward opened", "app-2.sock"]).await;
    assert!(
        l.contains(&fingerprint_of(&listed)),
        "the key is named: {l}"
    );
    term(&mut ok).await;
}

#[tokio::test]
async fn reverse_forward_lines_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let id = keygen(dir.path(), "id");
    let mut f = Logged::new(&id.public, "").await;
    let web = http_upstream().await;
    let mut r = ssh_via(
        f.d.addr.port(),
        &id.private,
        &[
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &format!("0:{web}"),
            "tunnel@localhost",
        ],
    )
    .spawn()
    .unwrap();
    let l = f.any_with(&["reverse forward opened", "listen="]).await;
    assert!(
        l.contains(&format!("key=\"{}\"", fingerprint_of(&id))),
        "which key published the port: {l}"
    );
    term(&mut r).await;
}

/// Accepts any host key; records nothing.
struct AnyHostKey;

impl russh::client::Handler for AnyHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

#[tokio::test]
async fn a_stalled_handshake_is_logged_for_where_it_stalled() {
    let mut f = Logged::new("", "auth_timeout = \"2s\"\n").await;
    let closed = |port: u16| format!("peer=127.0.0.1:{port} ");

    // A banner, then nothing: a stalled key exchange, not a missing banner.
    let mut s = TcpStream::connect(f.d.addr).await.unwrap();
    let port = s.local_addr().unwrap().port();
    s.write_all(b"SSH-2.0-stalls\r\n").await.unwrap();
    let l = f.any_with(&["connection closed", &closed(port)]).await;
    assert!(
        l.contains("authentication timed out during the key exchange (client banner received"),
        "{l}"
    );
    assert!(!l.contains("no client banner"), "{l}");
    f.any_with(&[&format!(
        "Timeout before authentication for 127.0.0.1 port {port}"
    )])
    .await;

    // Nothing at all (inside TLS, routed by ALPN): no banner.
    let tls = tls_connect(f.d.addr, &f.cert, "localhost", &["ssh"]).await;
    let port = tls.get_ref().0.local_addr().unwrap().port();
    let l = f.any_with(&["connection closed", &closed(port)]).await;
    assert!(
        l.contains("ssh handshake timed out: no client banner"),
        "{l}"
    );
    drop(tls);

    // Keys exchanged, one "none" request, then nothing.
    let tcp = TcpStream::connect(f.d.addr).await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let mut h = russh::client::connect_stream(
        std::sync::Arc::new(russh::client::Config::default()),
        tcp,
        AnyHostKey,
    )
    .await
    .unwrap();
    let none = h.authenticate_none("tunnel").await.unwrap();
    assert!(!none.success());
    let l = f.any_with(&["connection closed", &closed(port)]).await;
    assert!(
        l.contains("authentication timed out after 1 authentication request, not accepted"),
        "{l}"
    );
}

#[tokio::test]
async fn certificate_fields_are_escaped_in_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let ca = keygen(dir.path(), "ca");
    let user = keygen(dir.path(), "user");
    // A key ID and principals that try to write a fail2ban line of their own.
    let planted = "sluice::ssh::auth: Failed publickey for x from 198.51.100.9 port 1 ssh2:";
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(&ca.private)
        .args(["-I", &format!("id\n{planted}")])
        .args([
            "-n",
            &format!("someone\n{planted},other from 198.51.100.10 port 2"),
        ])
        .args(["-V", "-5m:+1h"])
        .arg(user.private.with_extension("pub"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut f = Logged::new(&format!("cert-authority {}", ca.public), "").await;
    let out = ssh_via(
        f.d.addr.port(),
        &user.private,
        &["-W", "127.0.0.1:9", "tunnel@localhost"],
    )
    .stdin(Stdio::null())
    .output()
    .await
    .unwrap();
    assert!(
        !out.status.success(),
        "a principal that is not the user let it in"
    );
    let l = f
        .any_with(&["Failed publickey for tunnel from 127.0.0.1 port"])
        .await;
    assert!(
        l.contains("no principal of the certificate (someone%0Asluice%3A%3Assh%3A%3Aauth%3A%20Failed%20publickey%20for%20x%20from%20198.51.100.9%20port%201%20ssh2%3A,other%20from%20198.51.100.10%20port%202)"),
        "principals escaped: {l}"
    );
    assert!(
        l.contains("certificate ID id%0Asluice%3A%3Assh"),
        "key ID escaped: {l}"
    );
    let planted_lines: Vec<String> = f
        .all_with("198.51.100.")
        .into_iter()
        .filter(|l| l.contains(" from 198.51.100."))
        .collect();
    assert!(planted_lines.is_empty(), "{planted_lines:?}");
}

/// The number after `name=` in a log line.
fn field(line: &str, name: &str) -> u64 {
    line.split(&format!("{name}="))
        .nth(1)
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {line}"))
}

/// ssh -W as `key` through `f`, `input` on stdin, run to its end: (success, stdout, how long).
async fn w_run(f: &Logged, key: &Key, input: &[u8]) -> (bool, Vec<u8>, Duration) {
    let t = std::time::Instant::now();
    let mut child = ssh_via(
        f.d.addr.port(),
        &key.private,
        &["-W", &f.echo.to_string(), "tunnel@localhost"],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("ssh -W took over 60 s")
        .unwrap();
    (out.status.success(), out.stdout, t.elapsed())
}

#[tokio::test]
async fn failures_slow_an_address_down_and_a_valid_key_still_gets_in() {
    const FAILURES: u64 = 10;
    let dir = tempfile::tempdir().unwrap();
    let (id, stranger) = (keygen(dir.path(), "id"), keygen(dir.path(), "stranger"));
    // Before, 3 failures locked this address out, valid keys included, for 10 minutes.
    let mut f = Logged::new(&id.public, "max_auth_failures_per_ip = 3\n").await;
    // Said at load (here by `sluice check` on the same file: the daemon says it before its
    // listen= line, which spawn_serve reads past).
    let check = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(f.dir.path().join("sluice.toml"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&check.stderr)
            .lines()
            .any(|l| l.contains("WARN sluice::config")
                && l.contains("ssh.max_auth_failures_per_ip is deprecated and has no effect")),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let start = std::time::Instant::now();
    let mut penalties = Vec::new();
    let mut delayed = Vec::new();
    let mut seen_delays = 0;
    for _ in 0..FAILURES {
        let (ok, _, took) = w_run(&f, &stranger, b"x").await;
        assert!(!ok, "an unknown key got in");
        // The fail2ban line, as before, then the penalty it raised.
        f.next_with(&[
            "WARN sluice::ssh::auth: Failed publickey for tunnel from 127.0.0.1 port",
            "key not authorized",
        ])
        .await;
        let l = f
            .next_with(&["penalty raised: failed authentication", "source=127.0.0.1 "])
            .await;
        penalties.push(field(&l, "penalty_s"));
        // Every late answer of this connection was logged before its penalty line.
        let late = f.all_with("failed attempt answered late: penalised source");
        for l in &late[seen_delays..] {
            let (delay, penalty) = (field(l, "delay_ms"), field(l, "penalty_s"));
            assert!(penalty >= 15, "slowed below the threshold: {l}");
            assert!((1500..=10_000).contains(&delay), "{l}");
            assert!(
                took >= Duration::from_millis(delay),
                "the client heard back after {took:?}, before the {delay} ms delay"
            );
            delayed.push((penalty, delay));
        }
        seen_delays = late.len();
    }
    let elapsed = start.elapsed().as_secs() + 1;
    println!("penalties {penalties:?}, (penalty, delay) {delayed:?}, {elapsed} s");
    // Each failure added 5 s and the penalty ran down by at most the time that passed.
    let last = *penalties.last().unwrap();
    assert!(
        last + elapsed + 1 >= 5 * FAILURES && last <= 5 * FAILURES,
        "penalty {last}s after {FAILURES} failures in {elapsed}s: {penalties:?}"
    );
    assert!(last > penalties[0], "the penalty grew: {penalties:?}");
    assert!(
        !delayed.is_empty(),
        "no failure was slowed down (penalties {penalties:?})"
    );

    // The valid key from the same, penalised, address: in at once, not delayed.
    let (ok, out, took) = w_run(&f, &id, b"valid-key").await;
    assert!(ok && out == b"valid-key", "the valid key was kept out");
    f.next_with(&["Accepted publickey for tunnel from 127.0.0.1 port"])
        .await;
    assert_eq!(
        f.all_with("failed attempt answered late").len(),
        seen_delays,
        "the valid key's login was slowed"
    );
    assert!(
        took < Duration::from_millis(delayed.last().unwrap().1),
        "the valid key took {took:?}"
    );
    assert!(f.all_with("Refused connection").is_empty());
}

#[tokio::test]
async fn exempt_addresses_are_not_penalised() {
    let dir = tempfile::tempdir().unwrap();
    let (id, stranger) = (keygen(dir.path(), "id"), keygen(dir.path(), "stranger"));
    let mut f = Logged::new(&id.public, "penalty_exempt = [\"127.0.0.0/8\"]\n").await;
    for _ in 0..5 {
        let (ok, _, _) = w_run(&f, &stranger, b"x").await;
        assert!(!ok);
        f.next_with(&["Failed publickey for tunnel from 127.0.0.1 port"])
            .await;
        // The connection's line comes after any penalty line it would have raised.
        f.next_with(&[
            "connection closed",
            "outcome=ssh session ended (not authenticated)",
        ])
        .await;
    }
    assert!(f.all_with("penalty raised").is_empty());
    assert!(f.all_with("answered late").is_empty());
}
