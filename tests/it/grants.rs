//! Access grants (issue 13): `sluice grant issue|list|revoke` on a running sluice, OpenSSH as
//! the device publishing its real sshd with the grant's certificate through `sluice connect`,
//! and the cloud reaching that sshd by port and by name.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::cli::Child2;
use crate::ssh::{keygen, login_user, port_range, Key};
use crate::support::{bin, need, TestCert};

pub(crate) const DEVICE: &str = "00:1b:44:11:3a:b7";

/// Where the grants are kept: the embedded store, or a real redis-server the test starts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Backend {
    Sqlite,
    Redis,
}

/// A redis-server on a free loopback port, no persistence; killed on drop.
pub(crate) struct Redis {
    child: std::process::Child,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        need("redis-server", "redis-server");
        let port = crate::support::reserve_ports(1);
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis { child, port }
    }

    /// The `[store]` table that points sluice at it.
    fn table(&self) -> String {
        format!("[store]\nredis = \"redis://127.0.0.1:{}/0\"\n", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `[store]` table for `backend` (and the server to keep alive with it).
pub(crate) fn store_for(backend: Backend) -> (Option<Redis>, String) {
    match backend {
        Backend::Sqlite => (None, String::new()),
        Backend::Redis => {
            let r = Redis::start();
            let t = r.table();
            (Some(r), t)
        }
    }
}
pub(crate) const NAME: &str = "00-1b-44-11-3a-b7";

/// sluice as a child process with `[grants]` and `[tunnels]`, its log kept for searching.
pub(crate) struct Server {
    pub(crate) d: Option<Child2>,
    pub(crate) dir: PathBuf,
    pub(crate) cert: TestCert,
    pub(crate) seen: Vec<String>,
    pub(crate) first_port: u16,
    ports: String,
    pub(crate) admin: Key,
}

impl Server {
    /// The cloud's `admin` key may `-W/-J` to the device's name and to the grant ports.
    pub(crate) fn start(dir: &Path, admin: Key, ports: u16, grants_extra: &str) -> Server {
        Server::start_on(dir, admin, port_range(ports), grants_extra)
    }

    /// As `start`, with `listen_ports` given: (first port, "FIRST-LAST").
    pub(crate) fn start_on(
        dir: &Path,
        admin: Key,
        range: (u16, String),
        grants_extra: &str,
    ) -> Server {
        Server::start_keys(dir, admin, &[], range, grants_extra)
    }

    /// As `start_on`, with more authorized keys (OpenSSH public lines) than `admin`'s.
    pub(crate) fn start_keys(
        dir: &Path,
        admin: Key,
        more: &[&str],
        range: (u16, String),
        grants_extra: &str,
    ) -> Server {
        need("ssh", "openssh-client");
        let cert = TestCert::new(&["localhost", "127.0.0.1", "*.t.localhost"]);
        let (first_port, ports) = range;
        let mut keys = format!("{}\n", admin.public);
        for k in more {
            keys.push_str(k);
            keys.push('\n');
        }
        std::fs::write(dir.join("authorized_keys"), keys).unwrap();
        let mut s = Server {
            d: None,
            dir: dir.to_path_buf(),
            cert,
            seen: Vec::new(),
            first_port,
            ports,
            admin,
        };
        s.config(grants_extra);
        s.spawn();
        s
    }

    pub(crate) fn config(&self, grants_extra: &str) {
        let text = format!(
            "listen = [\"127.0.0.1:0\"]\nshutdown_grace = \"1s\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n\
             [routes.ssh]\n[ssh]\nauthorized_keys = [\"{}\"]\npermit_open = [\"{NAME}:22\", \"127.0.0.1:*\"]\n\
             listen_ports = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[audit]\n[tunnels]\ndomain = \"t.localhost\"\n[grants]\nmax_ttl = \"1h\"\n{grants_extra}",
            self.cert.cert.display(),
            self.cert.key.display(),
            self.dir.join("authorized_keys").display(),
            self.ports,
        );
        std::fs::write(self.dir.join("sluice.toml"), text).unwrap();
    }

    pub(crate) fn spawn(&mut self) {
        let mut cmd = std::process::Command::new(bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(self.dir.join("sluice.toml"))
            .arg("--state-dir")
            .arg(self.dir.join("state"));
        self.d = Some(crate::cli::spawn_cmd(cmd));
        self.seen.clear();
    }

    pub(crate) fn port(&self) -> u16 {
        self.d.as_ref().unwrap().addr.port()
    }

    /// Stops sluice (SIGTERM) and waits for it.
    pub(crate) fn stop(&mut self) {
        let mut d = self.d.take().unwrap();
        crate::cli::sigterm(&d.child);
        crate::cli::wait_exit(&mut d.child, Duration::from_secs(10));
    }

    /// `sluice grant ARGS` against this server: (exit code, stdout, stderr).
    pub(crate) async fn grant(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin())
            .arg("grant")
            .args(args)
            .arg("--config")
            .arg(self.dir.join("sluice.toml"))
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .output()
            .await
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Issues a grant; the JSON sluice printed.
    pub(crate) async fn issue(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["issue"];
        all.extend_from_slice(args);
        let (code, out, err) = self.grant(&all).await;
        assert_eq!(code, 0, "sluice grant issue {args:?}: {err}");
        serde_json::from_str(&out).unwrap()
    }

    /// `sluice_grants` by state from /metrics: (live, revoked, expired, replaced).
    pub(crate) async fn grant_gauges(&mut self) -> [u64; 4] {
        let line = self.line_with(&["admin endpoint"]);
        let addr = line
            .split("admin=")
            .nth(1)
            .unwrap()
            .split([' ', '"'])
            .next()
            .unwrap()
            .to_string();
        let out = Command::new("curl")
            .args(["-sf", &format!("http://{addr}/metrics")])
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        ["live", "revoked", "expired", "replaced"].map(|state| {
            text.lines()
                .find(|l| l.starts_with(&format!("sluice_grants{{state=\"{state}\"}}")))
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
                .unwrap_or_else(|| panic!("no sluice_grants for {state} in /metrics:\n{text}"))
        })
    }

    /// The control socket.
    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.join("state/control.sock")
    }

    /// Waits up to 20 s for a log line holding every needle (searching from the start).
    pub(crate) fn line_with(&mut self, needles: &[&str]) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(l) = self
                .seen
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.d.as_ref().unwrap().log.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!(
                    "no log line with {needles:?} within 20 s; the log:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The device's `ssh` with the grant's key and certificate through `sluice connect`,
    /// logging in as `user`, plus `args`.
    pub(crate) fn device_ssh(&self, key: &Path, user: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        c.args([
            "-F",
            "none",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-o", "ConnectTimeout=10", "-o", "ExitOnForwardFailure=yes"])
        .arg("-o")
        .arg(format!(
            "ProxyCommand={} connect --ca {} localhost:{}",
            bin().display(),
            self.cert.cert.display(),
            self.port()
        ))
        .arg("-i")
        .arg(key)
        .arg("-o")
        .arg(format!("CertificateFile={}-cert.pub", key.display()))
        .args(["-l", user])
        .args(args)
        .arg("localhost")
        .stdin(Stdio::null())
        .kill_on_drop(true);
        c
    }

    /// The device's `ssh` with `args`, run to its end (20 s), expected to fail.
    pub(crate) async fn run_refused(&self, key: &Path, args: &[&str]) -> std::process::Output {
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            self.device_ssh(key, DEVICE, args).output(),
        )
        .await
        .expect("ssh hung")
        .unwrap();
        assert!(!out.status.success(), "{args:?} was let through");
        out
    }

    /// An ssh_config for the cloud: `Host sluice` through TLS, the admin key for every host.
    pub(crate) fn cloud_config(&self) -> PathBuf {
        crate::ssh::jump_config(&self.dir, self.port(), &self.admin.private)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(d) = self.d.as_mut() {
            let _ = d.child.kill();
            let _ = d.child.wait();
        }
    }
}

/// Writes the grant's private key (0600) and certificate as `DIR/device_key{,-cert.pub}`.
pub(crate) fn save_credentials(dir: &Path, issued: &serde_json::Value) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let key = dir.join("device_key");
    let private = issued["private_key"].as_str().expect("no private_key");
    std::fs::write(&key, private).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cert = issued["certificate"].as_str().expect("no certificate");
    std::fs::write(dir.join("device_key-cert.pub"), format!("{cert}\n")).unwrap();
    key
}

/// `ssh` to the device's sshd through `via` (`["-p", PORT, "user@127.0.0.1"]` or
/// `["-J", "sluice", "user@NAME"]`), running `echo`, until it answers (30 s).
async fn until_device_answers(cfg: &Path, via: &[&str], what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("ssh")
            .arg("-F")
            .arg(cfg)
            .args(via)
            .arg("echo device-$((6*7))")
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap();
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "device-42");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the device's sshd never answered {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits up to `limit` for `child` to exit; its stderr.
pub(crate) async fn exits_within(
    child: &mut tokio::process::Child,
    limit: Duration,
    what: &str,
) -> String {
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(_) => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            err
        }
        Err(_) => panic!("{what}: the device's ssh still runs after {limit:?}"),
    }
}

#[tokio::test]
async fn a_device_publishes_with_its_grant_and_the_cloud_reaches_it_until_revoked() {
    device_flow(Backend::Sqlite).await;
}

#[tokio::test]
async fn with_redis_a_device_publishes_with_its_grant_until_revoked() {
    device_flow(Backend::Redis).await;
}

async fn device_flow(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let admin = keygen(dir.path(), "admin");
    let sshd = crate::ssh::start_sshd(&admin).await;
    let (_redis, store) = store_for(backend);
    let mut s = Server::start(dir.path(), admin, 4, &store);
    let user = login_user();

    let issued = s.issue(&["--device", DEVICE, "--ttl", "10m"]).await;
    let g = &issued["grant"];
    let id = g["id"].as_str().unwrap().to_string();
    let port = g["port"].as_u64().unwrap() as u16;
    assert!(id.starts_with("g-"), "{issued}");
    assert_eq!(port, s.first_port, "the lowest free port");
    assert_eq!(g["name"], NAME);
    assert_eq!(g["state"], "live");
    assert!(issued["ssh_command"]
        .as_str()
        .unwrap()
        .contains(&format!("-R {port}:localhost:22")));
    let key = save_credentials(dir.path(), &issued);
    // The port is the device's only, while it is offline too: other keys are refused it.
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        crate::ssh::ssh_via(
            s.port(),
            &s.admin.private,
            &[
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                &format!("{port}:127.0.0.1:9"),
                "tunnel@localhost",
            ],
        )
        .output(),
    )
    .await
    .expect("ssh -R hung")
    .unwrap();
    assert!(!out.status.success(), "another key took the grant's port");
    s.line_with(&[
        "denied tcpip-forward",
        &port.to_string(),
        "allotted to an access grant",
    ]);
    // The certificate is what the grant says (ssh-keygen reads it).
    let shown = std::process::Command::new("ssh-keygen")
        .arg("-Lf")
        .arg(dir.path().join("device_key-cert.pub"))
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains(&format!("Key ID: \"{id}\"")), "{shown}");
    assert!(shown.contains(DEVICE), "{shown}");
    assert!(shown.contains("permit-port-forwarding"), "{shown}");
    assert!(!shown.contains("permit-pty"), "{shown}");
    // The private key never reaches the log.
    let private = issued["private_key"].as_str().unwrap();
    let body = private.lines().nth(1).unwrap();

    // The device publishes its sshd on the grant's port and its name.
    let mut device = s
        .device_ssh(
            &key,
            DEVICE,
            &[
                "-N",
                "-R",
                &format!("{port}:127.0.0.1:{}", sshd.port),
                "-R",
                &format!("{NAME}:22:127.0.0.1:{}", sshd.port),
            ],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    s.line_with(&["grant first used", &id]);
    let cfg = s.cloud_config();
    until_device_answers(
        &cfg,
        &["-p", &port.to_string(), &format!("{user}@127.0.0.1")],
        "on the grant's port",
    )
    .await;
    until_device_answers(
        &cfg,
        &["-J", "sluice", &format!("{user}@{NAME}")],
        "by name",
    )
    .await;
    // A file copied to the device by name.
    let data = crate::support::pattern(13, 1 << 20);
    std::fs::write(dir.path().join("payload"), &data).unwrap();
    let out = Command::new("scp")
        .arg("-F")
        .arg(&cfg)
        .args(["-O", "-q", "-J", "sluice"])
        .arg(dir.path().join("payload"))
        .arg(format!(
            "{user}@{NAME}:{}",
            dir.path().join("copied").display()
        ))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "scp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(dir.path().join("copied")).unwrap(), data);

    // Listed as live and used.
    let (code, out, _) = s.grant(&["list", "--json"]).await;
    assert_eq!(code, 0);
    let list = &serde_json::from_str::<serde_json::Value>(&out).unwrap()["grants"];
    assert_eq!(list[0]["id"], id.as_str(), "{list}");
    assert_eq!(list[0]["state"], "live");
    assert!(list[0]["first_used"].is_string(), "{list}");

    // Anything else the grant does not name is refused, the reason logged.
    let other = s.first_port + 1;
    let out = s
        .run_refused(
            &key,
            &["-N", "-R", &format!("{other}:127.0.0.1:{}", sshd.port)],
        )
        .await;
    assert!(!out.status.success());
    s.line_with(&[
        "denied tcpip-forward",
        &other.to_string(),
        "not allowed by access grant",
    ]);
    let out = s
        .run_refused(
            &key,
            &[
                "-N",
                "-R",
                &format!("someone-else:22:127.0.0.1:{}", sshd.port),
            ],
        )
        .await;
    assert!(!out.status.success());
    s.line_with(&["denied", "someone-else", "not allowed by access grant"]);
    let out = s
        .run_refused(&key, &["-W", &format!("127.0.0.1:{}", sshd.port)])
        .await;
    assert!(!out.status.success());
    s.line_with(&[
        "denied",
        &format!("127.0.0.1:{}", sshd.port),
        "not allowed by access grant",
    ]);
    // The device's certificate as another login is refused.
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        s.device_ssh(&key, "someone", &["-N"]).output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!out.status.success());
    s.line_with(&["access grant refused", "login someone is not the device"]);

    // Revoke: the live session ends at once; the certificate is refused from then on.
    let (code, out, err) = s.grant(&["revoke", &id]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked"), "{out}");
    let said = exits_within(&mut device, Duration::from_secs(3), "after the revoke").await;
    assert!(
        said.contains("revoked"),
        "the device was not told why: {said}"
    );
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        s.device_ssh(
            &key,
            DEVICE,
            &["-N", "-R", &format!("{port}:127.0.0.1:{}", sshd.port)],
        )
        .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!out.status.success());
    s.line_with(&["access grant refused", &format!("grant {id} is revoked")]);
    let (_, out, _) = s.grant(&["list", "--all", "--json"]).await;
    let list = &serde_json::from_str::<serde_json::Value>(&out).unwrap()["grants"];
    assert_eq!(list[0]["state"], "revoked", "{list}");
    assert!(
        !s.seen.iter().any(|l| l.contains(body)),
        "the private key was logged"
    );
    // The audit trail has it all, chained: `sluice audit verify` holds, then names an edit.
    let trail = dir.path().join("state/audit/audit.log");
    let needles = [
        "\"event\":\"grant_issued\"".to_string(),
        "\"by\":\"the control socket\"".into(),
        "\"event\":\"grant_used\"".into(),
        "\"event\":\"ssh_auth_accepted\"".into(),
        format!("\"grant\":\"{id}\""),
        "\"event\":\"ssh_auth_refused\"".into(),
        "\"event\":\"reverse_forward_opened\"".into(),
        format!("\"event\":\"tunnel_published\",\"name\":\"{NAME}\",\"port\":22"),
        "\"event\":\"connection_closed\"".into(),
        "\"route\":\"ssh\"".into(),
        "\"how\":\"revoked\",\"sessions_ended\":1".into(),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let t = std::fs::read_to_string(&trail).unwrap_or_default();
        let missing: Vec<&String> = needles.iter().filter(|n| !t.contains(n.as_str())).collect();
        if missing.is_empty() {
            break t;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not in the trail: {missing:?}\n{t}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!text.contains(body), "the private key is in the trail");
    let verify = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(["audit", "verify"])
            .args(args)
            .arg("--config")
            .arg(dir.path().join("sluice.toml"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .output()
            .unwrap()
    };
    let out = verify(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: "));
    let copy = dir.path().join("edited.log");
    let lines: Vec<&str> = text.lines().collect();
    let mut edited = lines.clone();
    // The first line with the client's address, edited: the line after it names the break.
    let at = lines.iter().position(|l| l.contains("127.0.0.1")).unwrap();
    let changed = edited[at].replace("127.0.0.1", "10.9.9.9");
    edited[at] = &changed;
    std::fs::write(&copy, edited.join("\n") + "\n").unwrap();
    let out = verify(&[copy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("edited.log:{}: prev does not match", at + 2)),
        "{err}"
    );

    // The revoked grant's name and port are free for another device.
    let other = s
        .issue(&[
            "--device",
            "gw-next",
            "--name",
            NAME,
            "--port",
            &port.to_string(),
        ])
        .await;
    assert_eq!(other["grant"]["name"], NAME, "{other}");
    s.stop();
}

#[tokio::test]
async fn a_grant_ends_its_session_at_expiry_and_frees_its_port_and_a_restart_keeps_grants() {
    expiry_and_restart(Backend::Sqlite).await;
}

#[tokio::test]
async fn with_redis_a_grant_ends_at_expiry_and_a_restart_keeps_grants() {
    expiry_and_restart(Backend::Redis).await;
}

async fn expiry_and_restart(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let admin = keygen(dir.path(), "admin");
    let sshd = crate::ssh::start_sshd(&admin).await;
    let (_redis, store) = store_for(backend);
    let mut s = Server::start(dir.path(), admin, 2, &store);
    // The device brings its own key: no private key comes back.
    let own = keygen(dir.path(), "own");
    let issued = s
        .issue(&[
            "--device",
            "gw-1",
            "--ttl",
            "4s",
            "--public-key",
            &format!("{}.pub", own.private.display()),
        ])
        .await;
    assert!(issued["private_key"].is_null(), "{issued}");
    let id = issued["grant"]["id"].as_str().unwrap().to_string();
    let port = issued["grant"]["port"].as_u64().unwrap() as u16;
    std::fs::write(
        format!("{}-cert.pub", own.private.display()),
        format!("{}\n", issued["certificate"].as_str().unwrap()),
    )
    .unwrap();
    let mut device = s
        .device_ssh(
            &own.private,
            "gw-1",
            &["-N", "-R", &format!("{port}:127.0.0.1:{}", sshd.port)],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    s.line_with(&["grant first used", &id]);
    // A second device takes the other port; a third finds none (503 through the CLI).
    let second = s.issue(&["--device", "gw-2", "--ttl", "10m"]).await;
    let second_id = second["grant"]["id"].as_str().unwrap().to_string();
    let (code, _, err) = s.grant(&["issue", "--device", "gw-3"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("503") && err.contains("no free port"), "{err}");
    // At expiry the session ends and the port comes free.
    let said = exits_within(&mut device, Duration::from_secs(20), "at expiry").await;
    assert!(
        said.contains("expired"),
        "the device was not told why: {said}"
    );
    s.line_with(&["grant expired", &id]);
    let third = s.issue(&["--device", "gw-3", "--ttl", "10m"]).await;
    assert_eq!(
        third["grant"]["port"].as_u64().unwrap() as u16,
        port,
        "{third}"
    );

    // A restart keeps the grants, the allotments and the revocations.
    let (code, _, err) = s.grant(&["revoke", &second_id]).await;
    assert_eq!(code, 0, "{err}");
    s.stop();
    s.spawn();
    let (_, out, _) = s.grant(&["list", "--all", "--json"]).await;
    let list = &serde_json::from_str::<serde_json::Value>(&out).unwrap()["grants"];
    let state = |id: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|g| g["id"] == id)
            .map(|g| g["state"].as_str().unwrap().to_string())
    };
    assert_eq!(state(&id).as_deref(), Some("expired"), "{list}");
    assert_eq!(state(&second_id).as_deref(), Some("revoked"), "{list}");
    let third_id = third["grant"]["id"].as_str().unwrap();
    assert_eq!(state(third_id).as_deref(), Some("live"), "{list}");
    // The live one still holds its port: gw-4 gets the revoked one's.
    let fourth = s.issue(&["--device", "gw-4", "--ttl", "10m"]).await;
    // gw-1 expired, gw-2 revoked, gw-3 and gw-4 live.
    assert_eq!(s.grant_gauges().await, [2, 1, 1, 0]);
    assert_eq!(fourth["grant"]["port"], second["grant"]["port"], "{fourth}");
    let (code, _, err) = s.grant(&["issue", "--device", "gw-3"]).await;
    assert_ne!(code, 0);
    assert!(
        err.contains("409") && err.contains("has live grant"),
        "{err}"
    );
    // The revoked certificate is still refused after the restart.
    let key = save_credentials(dir.path(), &second);
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        s.device_ssh(&key, "gw-2", &["-N"]).output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!out.status.success());
    s.line_with(&[
        "access grant refused",
        &format!("grant {second_id} is revoked"),
    ]);
    s.stop();
}

/// `curl` against the control socket: (status, JSON body).
async fn api(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value, String) {
    need("curl", "curl");
    let mut c = Command::new("curl");
    c.args([
        "-s",
        "-i",
        "--max-time",
        "10",
        "-X",
        method,
        "--unix-socket",
    ])
    .arg(socket)
    .arg(format!("http://sluice{path}"));
    if let Some(b) = body {
        c.args(["-H", "content-type: application/json", "--data-binary", b]);
    }
    let out = c.output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status from curl: {text}"));
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (status, json, head.to_string())
}

#[tokio::test]
async fn the_control_api_names_the_field_of_a_bad_request_and_never_shares_a_port() {
    api_errors_and_concurrency(Backend::Sqlite).await;
}

#[tokio::test]
async fn with_redis_120_concurrent_issues_never_share_a_port() {
    api_errors_and_concurrency(Backend::Redis).await;
}

async fn api_errors_and_concurrency(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let admin = keygen(dir.path(), "admin");
    let (redis, store) = store_for(backend);
    let s = Server::start(dir.path(), admin, 120, &store);
    let sock = s.socket();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is the owner's only");

    let cases: &[(&str, u16, &str)] = &[
        (r#"{"device":"a b"}"#, 400, "device"),
        (r#"{"device":"d1","ttl":"0s"}"#, 400, "ttl"),
        (r#"{"device":"d1","ttl":"2h"}"#, 400, "ttl"),
        (r#"{"device":"d1","ttl":"soon"}"#, 400, "ttl"),
        (r#"{"device":"d1","port":1}"#, 400, "port"),
        (
            r#"{"device":"d1","public_key":"ssh-ed25519 AAAAnope"}"#,
            400,
            "public_key",
        ),
        (r#"{"device":"d1","name":"Not_A-Label!"}"#, 400, "name"),
        (
            r#"{"device":"d1","source_address":"here"}"#,
            400,
            "source_address",
        ),
        (r#"{"device":"d1","name":"localhost"}"#, 400, "name"),
        (r#"{"device":"d1","local":"x:22;reboot"}"#, 400, "local"),
        (r#"{"device":"d1","local":"$(id):22"}"#, 400, "local"),
        (
            r#"{"device":"d1","permit_open":["a:b:22"]}"#,
            400,
            "permit_open",
        ),
        (
            r#"{"device":"d1","permit_open":["nohost"]}"#,
            400,
            "permit_open",
        ),
        (r#"{"device":"d1","colour":"blue"}"#, 400, "colour"),
        (r#"{"ttl":"1m"}"#, 400, "device"),
        (r#"not json"#, 400, ""),
    ];
    for (body, status, field) in cases {
        let (got, json, _) = api(&sock, "POST", "/v1/grants", Some(body)).await;
        assert_eq!(got, *status, "{body}: {json}");
        let err = &json["error"];
        assert!(
            err["code"].is_string() && err["message"].is_string(),
            "{body}: {json}"
        );
        if !field.is_empty() {
            assert!(
                err["field"] == *field || err["message"].as_str().unwrap().contains(field),
                "{body}: the field is not named: {json}"
            );
        }
    }
    let (got, _, _) = api(&sock, "GET", "/v1/grants/g-00000000000000000000", None).await;
    assert_eq!(got, 404);
    let (got, _, _) = api(&sock, "PUT", "/v1/grants", Some("{}")).await;
    assert_eq!(got, 405);
    let (got, json, _) = api(&sock, "GET", "/v1/openapi.json", None).await;
    assert_eq!(got, 200);
    assert!(json["paths"]["/v1/grants"].is_object(), "{json}");
    let (got, json, _) = api(&sock, "GET", "/v1/ca", None).await;
    assert_eq!(got, 200);
    assert!(
        json["public_key"]
            .as_str()
            .unwrap_or("")
            .starts_with("ssh-ed25519 "),
        "{json}"
    );

    // 120 issues at once for 120 ports: all granted, no port twice; the 121st gets a 503.
    let issues: Vec<_> = (0..120)
        .map(|i| {
            let sock = sock.clone();
            tokio::spawn(async move {
                let body = format!(r#"{{"device":"dev-{i}","ttl":"10m"}}"#);
                api(&sock, "POST", "/v1/grants", Some(&body)).await
            })
        })
        .collect();
    let mut ports = std::collections::HashSet::new();
    for t in issues {
        let (status, json, _) = t.await.unwrap();
        assert_eq!(status, 201, "{json}");
        assert!(
            ports.insert(json["grant"]["port"].as_u64().unwrap()),
            "a port given twice: {json}"
        );
    }
    assert_eq!(ports.len(), 120);
    if let Some(r) = &redis {
        // They are Redis's: 120 live ports there, and no SQLite file beside sluice.
        need("redis-cli", "redis-tools");
        let out = Command::new("redis-cli")
            .args(["-p", &r.port.to_string(), "HLEN", "sluice:port"])
            .output()
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "120");
        assert!(!dir.path().join("state/sluice.db").exists());
    }
    let (got, json, head) = api(
        &sock,
        "POST",
        "/v1/grants",
        Some(r#"{"device":"one-more"}"#),
    )
    .await;
    assert_eq!(got, 503, "{json}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    let (got, json, _) = api(&sock, "POST", "/v1/grants", Some(r#"{"device":"dev-1"}"#)).await;
    assert_eq!(got, 409, "{json}");
    assert_eq!(json["error"]["field"], "device", "{json}");
}

#[tokio::test]
async fn the_control_api_on_tcp_needs_tls_and_a_bearer_token_and_takes_a_rotated_one() {
    use std::os::unix::fs::PermissionsExt;
    need("curl", "curl");
    let dir = tempfile::tempdir().unwrap();
    let admin = keygen(dir.path(), "admin");
    let tokens = dir.path().join("control.tokens");
    let (first, second) = ("f".repeat(64), "s".repeat(48));
    std::fs::write(&tokens, format!("# who may call\nci {first}\n")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut s = Server::start(
        dir.path(),
        admin,
        4,
        &format!(
            "[control]\nlisten = \"127.0.0.1:0\"\ntokens = \"{}\"\n",
            tokens.display()
        ),
    );
    let line = s.line_with(&["control API listening on TCP"]);
    let port: u16 = line
        .split("listen=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let cacert = s.cert.cert.clone();
    let call = |token: Option<String>, method: &'static str, body: Option<&'static str>| {
        let cacert = cacert.clone();
        async move {
            let mut c = Command::new("curl");
            c.args(["-s", "-i", "--max-time", "10", "-X", method, "--cacert"])
                .arg(&cacert)
                .arg(format!("https://localhost:{port}/v1/grants"));
            if let Some(t) = token {
                c.args(["-H", &format!("authorization: Bearer {t}")]);
            }
            if let Some(b) = body {
                c.args(["-H", "content-type: application/json", "--data-binary", b]);
            }
            let out = c.output().await.unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let status = |r: &str| r.split_whitespace().nth(1).unwrap_or("").to_string();
    let r = call(None, "GET", None).await;
    assert_eq!(status(&r), "401", "{r}");
    assert!(
        r.to_ascii_lowercase().contains("www-authenticate: bearer"),
        "{r}"
    );
    let r = call(Some(second.clone()), "GET", None).await;
    assert_eq!(status(&r), "401", "{r}");
    let r = call(Some(first.clone()), "GET", None).await;
    assert_eq!(status(&r), "200", "{r}");
    let r = call(
        Some(first.clone()),
        "POST",
        Some(r#"{"device":"tcp-1","ttl":"5m"}"#),
    )
    .await;
    assert_eq!(status(&r), "201", "{r}");
    s.line_with(&["control API request", "POST", "token ci from 127.0.0.1"]);
    // Plain HTTP on the TLS port gets nothing.
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
        ])
        .arg(format!("http://127.0.0.1:{port}/v1/grants"))
        .output()
        .await
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&out.stdout), "200");

    // Rotated: the new token works at once, the old one no longer.
    std::fs::write(&tokens, format!("ci {second}\n")).unwrap();
    let r = call(Some(second.clone()), "GET", None).await;
    assert_eq!(status(&r), "200", "{r}");
    let r = call(Some(first.clone()), "GET", None).await;
    assert_eq!(status(&r), "401", "{r}");
    s.line_with(&["control API: tokens re-read"]);
    s.line_with(&["refused a request without a valid bearer token"]);
    assert!(
        !s.seen
            .iter()
            .any(|l| l.contains(&first) || l.contains(&second)),
        "a token was logged"
    );
    // The socket still answers without a token.
    let (got, _, _) = api(&s.socket(), "GET", "/v1/grants", None).await;
    assert_eq!(got, 200);
    s.stop();
}

#[tokio::test]
async fn the_control_api_holds_to_its_openapi_document_under_schemathesis() {
    use std::os::unix::fs::PermissionsExt;
    need("schemathesis", "schemathesis (pip install schemathesis)");
    let dir = tempfile::tempdir().unwrap();
    let admin = keygen(dir.path(), "admin");
    let tokens = dir.path().join("control.tokens");
    let token = "t".repeat(40);
    std::fs::write(&tokens, format!("schemathesis {token}\n")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Ports enough that the run never exhausts them: a 503 for "no free port" is right, but
    // it is a 5xx, which schemathesis counts as a server error. (Allotted, never bound.)
    let mut s = Server::start(
        dir.path(),
        admin,
        1500,
        &format!(
            "[control]\nlisten = \"127.0.0.1:0\"\ntokens = \"{}\"\n",
            tokens.display()
        ),
    );
    let line = s.line_with(&["control API listening on TCP"]);
    let addr = line
        .split("listen=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let port = addr.rsplit(':').next().unwrap();
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    // A lock made with `ttl: 1s` is gone a second later, so lifting it then is rightly a
    // 404; on a slow machine schemathesis's DELETE comes later than that, and its
    // ensure_resource_availability check would call the 404 a lost resource.
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        "[[operations]]\ninclude-path = \"/v1/locks/{id}\"\ninclude-method = \"DELETE\"\nchecks.ensure_resource_availability.enabled = false\n",
    )
    .unwrap();
    // Every check but two that cannot hold by design: a schema-valid request may still be
    // refused by the configuration (a TTL over max_ttl, a port outside listen_ports, a key
    // that does not parse), and a revoked grant stays readable (its state says revoked).
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        Command::new("schemathesis")
            .arg("--config-file")
            .arg(&config)
            .arg("run")
            .arg(&schema)
            .args(["--url", &format!("https://localhost:{port}")])
            .arg("--tls-verify")
            .arg(&s.cert.cert)
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args([
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance,use_after_free",
            ])
            // SCHEMATHESIS_SEED, _EXAMPLES and _ARGS (more arguments) widen the search by hand.
            .args(["--workers", "1", "--max-examples"])
            .arg(std::env::var("SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "60".into()))
            .arg("--seed")
            .arg(std::env::var("SCHEMATHESIS_SEED").unwrap_or_else(|_| "13".into()))
            .args(
                std::env::var("SCHEMATHESIS_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .env("NO_COLOR", "1")
            // Its cache and reports go in the test's directory, not the source tree.
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("schemathesis took over 600 s")
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    // The failures section first: CI keeps only the head and tail of a long panic message.
    let failures = report
        .find("FAILURES")
        .or_else(|| report.find("ERRORS"))
        .map_or(&report[..0], |at| &report[at..]);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{failures}\n---- full report ----\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("passed"), "{report}");
    // It exercised the API for real: grants were issued.
    let (got, json, _) = api(&s.socket(), "GET", "/v1/grants?all=true", None).await;
    assert_eq!(got, 200);
    assert!(!json["grants"].as_array().unwrap().is_empty(), "{json}");
    s.stop();
}

#[tokio::test]
async fn two_sluices_sharing_one_redis_never_give_one_port_twice() {
    let redis = Redis::start();
    let range = port_range(100);
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start_on(
        a_dir.path(),
        keygen(a_dir.path(), "admin"),
        range.clone(),
        &redis.table(),
    );
    let b = Server::start_on(
        b_dir.path(),
        keygen(b_dir.path(), "admin"),
        range,
        &redis.table(),
    );
    // 60 devices asked for at each at once: 120 requests for 100 ports.
    let issues: Vec<_> = (0..120)
        .map(|i| {
            let sock = if i % 2 == 0 { a.socket() } else { b.socket() };
            tokio::spawn(async move {
                let body = format!(r#"{{"device":"dev-{}","ttl":"10m"}}"#, i / 2);
                api(&sock, "POST", "/v1/grants", Some(&body)).await
            })
        })
        .collect();
    let (mut ports, mut conflicts, mut full) = (std::collections::HashSet::new(), 0, 0);
    for t in issues {
        let (status, json, _) = t.await.unwrap();
        match status {
            201 => assert!(
                ports.insert(json["grant"]["port"].as_u64().unwrap()),
                "a port given twice: {json}"
            ),
            // The same device asked for at both: one of them wins.
            409 => {
                assert_eq!(json["error"]["field"], "device", "{json}");
                conflicts += 1;
            }
            503 => full += 1,
            _ => panic!("{status}: {json}"),
        }
    }
    assert_eq!(ports.len() + conflicts + full, 120);
    assert_eq!(
        ports.len(),
        60,
        "one grant per device: {conflicts} conflicts, {full} full"
    );
    // Each sees the other's grants.
    let (_, la, _) = api(&a.socket(), "GET", "/v1/grants", None).await;
    let (_, lb, _) = api(&b.socket(), "GET", "/v1/grants", None).await;
    assert_eq!(la["grants"].as_array().unwrap().len(), 60);
    assert_eq!(la, lb);
}

#[test]
fn an_unreachable_redis_stops_sluice_at_start_with_exit_69_and_no_password_shown() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on (reserved for this test, never bound).
    let port = crate::support::reserve_ports(1);
    let cfg = dir.path().join("sluice.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = [\"127.0.0.1:0\"]\n[routes.ssh]\n[grants]\n[store]\nredis = \"redis://default:hunter22@127.0.0.1:{port}/0\"\ntimeout = \"1s\"\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains(&format!("Redis at redis://default:***@127.0.0.1:{port}/0")),
        "{err}"
    );
    assert!(!err.contains("hunter22"), "the password was shown: {err}");
}
