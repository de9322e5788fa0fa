use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::support::*;

/// `sluice connect ARGS`, with stdin piped; returns the child.
fn connect(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("connect")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Runs `sluice connect ARGS` with `input` on stdin: (exit code, stdout, stderr).
async fn run(args: &[&str], input: &[u8]) -> (i32, Vec<u8>, String) {
    let mut child = connect(args).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let w = tokio::spawn(async move {
        let _ = stdin.write_all(&data).await;
    });
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("sluice connect hung")
        .unwrap();
    w.await.unwrap();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn pins(cert: &TestCert) -> Vec<String> {
    let d = sha256(cert.der.as_ref());
    let hex = sluice::client::format_hex(&d);
    let b64 = sluice::client::format_pin(<&[u8; 32]>::try_from(d.as_slice()).unwrap());
    let bare = b64.trim_start_matches("sha256:").to_string();
    vec![
        b64,
        format!("sha256//{bare}"),
        bare,
        hex.clone(),
        format!("sha256:{hex}"),
    ]
}

#[tokio::test]
async fn ca_and_every_pin_spelling_reach_the_server_and_stdout_is_only_data() {
    let cert = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &format!("[routes.ssh]\nupstream = \"{}\"\n", echo_upstream().await),
    )
    .await;
    let target = format!("localhost:{}", d.addr.port());
    let data = pattern(21, 4 << 20);
    let (code, out, err) = run(&["--ca", cert.cert.to_str().unwrap(), &target], &data).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        sha256(&out),
        sha256(&data),
        "stdout carries exactly the server's bytes"
    );
    assert!(err.is_empty(), "no noise on stderr on success: {err}");
    for p in pins(&cert) {
        let (code, out, err) = run(&["--pin", &p, &target], b"pinned").await;
        assert_eq!(
            (code, out.as_slice()),
            (0, &b"pinned"[..]),
            "--pin {p}: {err}"
        );
    }
    d.stop().await;
}

#[tokio::test]
async fn wrong_pin_unknown_ca_and_wrong_name_are_refused_clearly() {
    let cert = TestCert::new(&["localhost"]);
    let other = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &format!("[routes.ssh]\nupstream = \"{}\"\n", echo_upstream().await),
    )
    .await;
    let target = format!("localhost:{}", d.addr.port());
    let presented = sluice::client::format_hex(&sha256(cert.der.as_ref()));

    let bad = pins(&other)[0].clone();
    let (code, out, err) = run(&["--pin", &bad, &target], b"x").await;
    assert_eq!(code, 76, "{err}");
    assert!(out.is_empty());
    assert!(
        err.contains("does not match --pin") && err.contains(&presented),
        "{err}"
    );
    assert!(err.lines().count() <= 2, "{err}");

    // Not trusted: the system store (pointed at an unrelated CA) does not know it.
    let mut c = connect(&[&target]);
    c.env("SSL_CERT_FILE", &other.cert);
    let out = c.output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(76), "{err}");
    assert!(
        err.contains("not trusted") && err.contains(&presented) && err.contains("--pin"),
        "{err}"
    );
    assert!(err.lines().count() <= 2, "{err}");

    // The right certificate for the wrong name.
    let (code, _, err) = run(
        &[
            "--ca",
            cert.cert.to_str().unwrap(),
            "--sni",
            "elsewhere.test",
            &target,
        ],
        b"x",
    )
    .await;
    assert_eq!(code, 76, "{err}");
    assert!(
        err.contains("is not valid for") && err.contains("elsewhere.test"),
        "{err}"
    );
    d.stop().await;
}

#[tokio::test]
async fn insecure_is_loud_and_refused_connections_are_one_line() {
    let cert = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &format!("[routes.ssh]\nupstream = \"{}\"\n", echo_upstream().await),
    )
    .await;
    let (code, out, err) = run(
        &["--insecure", &format!("127.0.0.1:{}", d.addr.port())],
        b"hi",
    )
    .await;
    assert_eq!((code, out.as_slice()), (0, &b"hi"[..]));
    assert!(
        err.contains("WARNING") && err.contains("not verified"),
        "{err}"
    );
    let (code, _, err) = run(
        &["--insecure", &format!("127.0.0.1:{}", dead_port().port())],
        b"",
    )
    .await;
    assert_eq!(code, 69, "{err}");
    assert!(
        err.contains("cannot connect") && err.lines().count() <= 2,
        "{err}"
    );
    let (code, _, err) = run(&["--pin", "nonsense", "localhost"], b"").await;
    assert_eq!(code, 64, "{err}");
    d.stop().await;
}

#[tokio::test]
async fn stdin_eof_half_closes_and_the_reply_still_arrives() {
    let cert = TestCert::localhost();
    let up = serve_upstream(|mut s| async move {
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(format!("got {} bytes after EOF", got.len()).as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
    })
    .await;
    let d = Daemon::start(&cert, &format!("[routes.ssh]\nupstream = \"{up}\"\n")).await;
    let (code, out, err) = run(
        &[
            "--ca",
            cert.cert.to_str().unwrap(),
            &format!("localhost:{}", d.addr.port()),
        ],
        b"0123456789",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(String::from_utf8_lossy(&out), "got 10 bytes after EOF");
    d.stop().await;
}

#[tokio::test]
async fn openssh_through_sluice_connect_to_the_embedded_server() {
    need("ssh", "openssh-client");
    let cert = TestCert::localhost();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id");
    assert!(std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap()
        .success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    std::fs::write(dir.path().join("authorized_keys"), public).unwrap();
    let echo = echo_upstream().await;
    let extra = format!(
        "[routes.ssh]\n[ssh]\nhost_key = \"{}\"\nauthorized_keys = [\"{}\"]\npermit_open = [\"{echo}\"]\n",
        dir.path().join("hk").display(),
        dir.path().join("authorized_keys").display()
    );
    let d = Daemon::start(&cert, &extra).await;
    let proxy = format!(
        "ProxyCommand={} connect --ca {} localhost:{}",
        bin().display(),
        cert.cert.display(),
        d.addr.port()
    );
    let mut child = Command::new("ssh")
        .args([
            "-F",
            "none",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .arg("-o")
        .arg(&proxy)
        .arg("-i")
        .arg(&key)
        .args(["-W", &echo.to_string(), "tunnel@localhost"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let data = pattern(22, 16 << 20);
    let mut stdin = child.stdin.take().unwrap();
    let d2 = data.clone();
    let w = tokio::spawn(async move {
        stdin.write_all(&d2).await.unwrap();
    });
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    w.await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sha256(&out.stdout),
        sha256(&data),
        "16 MiB through ssh -W over sluice connect"
    );
    d.stop().await;
}

#[tokio::test]
async fn ssh_config_block_works_as_printed() {
    need("ssh", "openssh-client");
    let cert = TestCert::localhost();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id");
    assert!(std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap()
        .success());
    std::fs::write(
        dir.path().join("authorized_keys"),
        std::fs::read(key.with_extension("pub")).unwrap(),
    )
    .unwrap();
    let echo = echo_upstream().await;
    let extra = format!(
        "[routes.ssh]\n[ssh]\nhost_key = \"{}\"\nauthorized_keys = [\"{}\"]\npermit_open = [\"{echo}\"]\n",
        dir.path().join("hk").display(),
        dir.path().join("authorized_keys").display()
    );
    let d = Daemon::start(&cert, &extra).await;
    let pin = pins(&cert).remove(3); // the hex spelling `sluice serve` logs
    let out = Command::new(bin())
        .args([
            "ssh-config",
            "mytunnel",
            &format!("localhost:{}", d.addr.port()),
            "--pin",
            &pin,
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let block = String::from_utf8(out.stdout).unwrap();
    assert!(
        block.starts_with("Host mytunnel\n") && block.contains("ServerAliveInterval"),
        "{block}"
    );
    let cfg = dir.path().join("ssh_config");
    std::fs::write(
        &cfg,
        format!(
            "{block}  User tunnel\n  IdentityFile {}\n  IdentitiesOnly yes\n  BatchMode yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n",
            key.display()
        ),
    )
    .unwrap();
    let mut child = Command::new("ssh")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .arg("-F")
        .arg(&cfg)
        .args(["-W", &echo.to_string(), "mytunnel"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"via-ssh-config").await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        out.stdout,
        b"via-ssh-config",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.stop().await;
}

/// A CONNECT proxy for tests: requires `user:pw` when `auth`; records each request line.
pub(crate) async fn connect_proxy(
    auth: bool,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = serve_upstream(move |mut s| {
        let tx = tx.clone();
        async move {
            let head = sluice::builtin::read_head(&mut s, b"", tokio::time::Instant::now() + Duration::from_secs(5)).await.unwrap();
            let text = String::from_utf8_lossy(&head).into_owned();
            let line = text.lines().next().unwrap_or_default().to_string();
            tx.send(line.clone()).unwrap();
            // "user:pw" in base64.
            if auth && !text.contains("Proxy-Authorization: Basic dXNlcjpwdw==") {
                let _ = s.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"t\"\r\n\r\n").await;
                return;
            }
            let target = line.split_whitespace().nth(1).unwrap().to_string();
            let mut up = tokio::net::TcpStream::connect(target).await.unwrap();
            s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.unwrap();
            let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
        }
    })
    .await;
    (addr, rx)
}

#[tokio::test]
async fn through_http_connect_proxies() {
    let cert = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &format!("[routes.ssh]\nupstream = \"{}\"\n", echo_upstream().await),
    )
    .await;
    let target = format!("localhost:{}", d.addr.port());
    let ca = cert.cert.to_str().unwrap().to_string();

    let (p, mut seen) = connect_proxy(true).await;
    let (code, out, err) = run(
        &[
            "--ca",
            &ca,
            "--proxy",
            &format!("http://user:pw@{p}"),
            &target,
        ],
        b"proxied",
    )
    .await;
    assert_eq!((code, out.as_slice()), (0, &b"proxied"[..]), "{err}");
    assert_eq!(
        seen.recv().await.unwrap(),
        format!("CONNECT {target} HTTP/1.1")
    );

    let (code, _, err) = run(
        &["--ca", &ca, "--proxy", &format!("http://{p}"), &target],
        b"x",
    )
    .await;
    assert_eq!(code, 69, "{err}");
    assert!(
        err.contains("requires authentication (407)") && err.lines().count() <= 2,
        "{err}"
    );

    // From the environment, and NO_PROXY.
    let (p, mut seen) = connect_proxy(false).await;
    let mut c = connect(&["--ca", &ca, &target]);
    c.env("HTTPS_PROXY", format!("http://{p}"))
        .env_remove("NO_PROXY")
        .env_remove("no_proxy");
    let mut child = c.spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"env").await.unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(
        out.stdout,
        b"env",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(seen.recv().await.is_some(), "HTTPS_PROXY was not used");
    let mut c = connect(&["--ca", &ca, &target]);
    c.env("HTTPS_PROXY", format!("http://{p}"))
        .env("NO_PROXY", "localhost");
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"direct")
        .await
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.stdout, b"direct");
    assert!(seen.try_recv().is_err(), "NO_PROXY was ignored");
    d.stop().await;
}

/// A client CA and a client certificate it signed, as PEM files in `dir`.
pub(crate) fn client_pki(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test client CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["laptop-7".to_string()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let (ca_path, cert_path, key_path) = (
        dir.join("client-ca.pem"),
        dir.join("client.pem"),
        dir.join("client.key"),
    );
    std::fs::write(&ca_path, ca.pem()).unwrap();
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (ca_path, cert_path, key_path)
}

#[tokio::test]
async fn routes_can_require_client_certificates() {
    let cert = TestCert::localhost();
    let dir = tempfile::tempdir().unwrap();
    let (ca, client_cert, client_key) = client_pki(dir.path());
    let text = format!(
        "listen = [\"127.0.0.1:0\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n[routes.ssh]\nupstream = \"{}\"\nrequire_client_cert = true\n",
        cert.cert.display(),
        cert.key.display(),
        ca.display(),
        banner_upstream().await
    );
    let d = Daemon::start_raw(&text).await;
    let target = format!("localhost:{}", d.addr.port());
    let server_ca = cert.cert.to_str().unwrap();
    let (code, out, err) = run(
        &[
            "--ca",
            server_ca,
            "--cert",
            client_cert.to_str().unwrap(),
            "--key",
            client_key.to_str().unwrap(),
            &target,
        ],
        b"",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out, BANNER,
        "with a client certificate the ssh route answers"
    );
    // Without one, nothing of the SSH side is reachable: no banner, over TLS or plain.
    let (code, out, err) = run(&["--ca", server_ca, &target], b"").await;
    assert!(
        out.is_empty(),
        "reached the ssh route without a client certificate"
    );
    assert!(code == 69 && err.contains("--cert/--key"), "{code} {err}");
    let mut s = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    s.write_all(b"SSH-2.0-scanner\r\n").await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .unwrap();
    assert!(
        got.is_empty(),
        "plain SSH walked around the client certificate requirement"
    );
    // A route without the requirement still serves anyone.
    let mut tls = tls_connect(d.addr, &cert, "localhost", &["http/1.1"]).await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let reply = String::from_utf8(read_all(&mut tls).await).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    d.stop().await;
}

#[tokio::test]
async fn openssh_through_sluice_connect_to_an_external_sshd() {
    let dir = tempfile::tempdir().unwrap();
    let id = crate::ssh::keygen(dir.path(), "id");
    let mut sshd = crate::ssh::start_sshd(&id).await;
    let cert = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &format!("[routes.ssh]\nupstream = \"127.0.0.1:{}\"\n", sshd.port),
    )
    .await;
    let user = crate::ssh::login_user();
    let proxy = format!(
        "ProxyCommand={} connect --ca {} localhost:{}",
        bin().display(),
        cert.cert.display(),
        d.addr.port()
    );
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new("ssh")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .args([
                "-F",
                "none",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .arg("-o")
            .arg(&proxy)
            .arg("-i")
            .arg(&id.private)
            .args([&format!("{user}@localhost"), "echo via-sshd-$((20+22))"])
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("ssh hung")
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "via-sshd-42");
    sshd.child.kill().await.unwrap();
    d.stop().await;
}

#[tokio::test]
async fn exits_when_the_server_closes_first_even_with_stdin_open() {
    let cert = TestCert::localhost();
    // The ssh upstream is down: sluice closes right after TLS, before any byte.
    let d = Daemon::start(
        &cert,
        &format!("[routes.ssh]\nupstream = \"{}\"\n", dead_port()),
    )
    .await;
    let mut child = connect(&[
        "--ca",
        cert.cert.to_str().unwrap(),
        &format!("localhost:{}", d.addr.port()),
    ])
    .spawn()
    .unwrap();
    let _stdin = child.stdin.take().unwrap(); // kept open, as ssh keeps it
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("the helper hung after the server closed")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains("without sending anything") && err.lines().count() <= 2,
        "{err}"
    );
    d.stop().await;
}
