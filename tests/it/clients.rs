use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::support::*;

async fn output(cmd: &mut Command) -> (bool, String, String) {
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.stdin(Stdio::null()).output())
        .await
        .expect("client timed out")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn curl_https_and_plain_http_reach_the_upstream() {
    need("curl", "curl");
    let cert = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &format!("[routes.http]\nupstream = \"{}\"\n", http_upstream().await),
    )
    .await;
    let url = format!("https://localhost:{}/hello.txt", d.addr.port());
    let (ok, out, err) = output(
        Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&cert.cert)
            .arg(&url),
    )
    .await;
    assert!(
        ok && out == "hello-from-upstream\n",
        "curl https: {out} {err}"
    );
    // curl offering h2: sluice offers only http/1.1 without `h2 = true`, so ALPN routes it.
    let (ok, out, err) = output(
        Command::new("curl")
            .args(["-sS", "--http2", "--max-time", "10", "--cacert"])
            .arg(&cert.cert)
            .arg(&url),
    )
    .await;
    assert!(
        ok && out == "hello-from-upstream\n",
        "curl --http2: {out} {err}"
    );
    let url = format!("http://127.0.0.1:{}/hello.txt", d.addr.port());
    let (ok, out, err) = output(
        Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .arg(&url),
    )
    .await;
    assert!(
        ok && out == "hello-from-upstream\n",
        "curl http: {out} {err}"
    );
    d.stop().await;
}

#[tokio::test]
async fn curl_rejects_the_wrong_certificate() {
    need("curl", "curl");
    let cert = TestCert::localhost();
    let other = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &format!("[routes.http]\nupstream = \"{}\"\n", http_upstream().await),
    )
    .await;
    let url = format!("https://localhost:{}/", d.addr.port());
    let (ok, _, _) = output(
        Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&other.cert)
            .arg(&url),
    )
    .await;
    assert!(!ok, "curl accepted a certificate it should not trust");
    d.stop().await;
}

#[tokio::test]
async fn openssl_s_client_ssh_banner_reaches_the_ssh_upstream() {
    need("openssl", "openssl");
    let cert = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &format!("[routes.ssh]\nupstream = \"{}\"\n", banner_upstream().await),
    )
    .await;
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-verify_return_error", "-CAfile"])
        .arg(&cert.cert)
        .args([
            "-connect",
            &format!("127.0.0.1:{}", d.addr.port()),
            "-servername",
            "localhost",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"SSH-2.0-probe\r\n").await.unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let got = read_n(&mut stdout, BANNER.len() + 15).await;
    assert_eq!(&got[..BANNER.len()], BANNER);
    assert_eq!(&got[BANNER.len()..], b"SSH-2.0-probe\r\n");
    drop(stdin);
    let _ = child.kill().await;
    d.stop().await;
}

#[tokio::test]
async fn openssl_sees_the_sni_certificate() {
    need("openssl", "openssl");
    let cert = TestCert::localhost();
    let other = TestCert::new(&["other.test"]);
    let extra = format!(
        "[[tls.sni]]\nnames = [\"other.test\"]\ncert = \"{}\"\nkey = \"{}\"\n",
        other.cert.display(),
        other.key.display()
    );
    let d = Daemon::start(&cert, &extra).await;
    for (name, want) in [("other.test", &other), ("localhost", &cert)] {
        let (_, out, err) = output(
            Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &format!("127.0.0.1:{}", d.addr.port()),
                    "-servername",
                    name,
                ])
                .stdin(Stdio::null()),
        )
        .await;
        let pem_start = out
            .find("-----BEGIN CERTIFICATE-----")
            .unwrap_or_else(|| panic!("no certificate shown: {out}{err}"));
        let pem_end = out.find("-----END CERTIFICATE-----").unwrap() + 25;
        let der =
            rustls::pki_types::CertificateDer::from_pem_slice_compat(&out[pem_start..pem_end]);
        assert_eq!(der, want.der, "SNI {name}");
    }
    d.stop().await;
}

/// PEM to DER without pulling in another crate.
trait FromPemCompat {
    fn from_pem_slice_compat(pem: &str) -> rustls::pki_types::CertificateDer<'static>;
}

impl FromPemCompat for rustls::pki_types::CertificateDer<'static> {
    fn from_pem_slice_compat(pem: &str) -> Self {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }
}

/// Makes a key in `format` with openssl and a certificate for localhost signed by it.
async fn openssl_cert(dir: &std::path::Path, name: &str, genkey: &[&str]) -> TestCert {
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.pem"));
    let mut gen = Command::new("openssl");
    gen.args(genkey).arg("-out").arg(&key);
    if genkey[0] == "genrsa" {
        gen.arg("2048");
    }
    let (ok, _, err) = output(&mut gen).await;
    assert!(ok, "openssl {genkey:?}: {err}");
    let (ok, _, err) = output(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-new",
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost",
                "-addext",
                "basicConstraints=critical,CA:FALSE",
                "-key",
            ])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    )
    .await;
    assert!(ok, "openssl req: {err}");
    let pem = std::fs::read(&cert).unwrap();
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    TestCert {
        dir: tempfile::tempdir().unwrap(),
        cert,
        key,
        der,
    }
}

#[tokio::test]
async fn pkcs1_sec1_and_pkcs8_keys_over_tls12_and_tls13() {
    need("openssl", "openssl");
    let dir = tempfile::tempdir().unwrap();
    let kinds: [(&str, &[&str], &[u8]); 3] = [
        (
            "pkcs1",
            &["genrsa", "-traditional"],
            b"-----BEGIN RSA PRIVATE KEY-----",
        ),
        (
            "sec1",
            &["ecparam", "-name", "prime256v1", "-genkey", "-noout"],
            b"-----BEGIN EC PRIVATE KEY-----",
        ),
        (
            "pkcs8",
            &["genpkey", "-algorithm", "ed25519"],
            b"-----BEGIN PRIVATE KEY-----",
        ),
    ];
    let up = banner_upstream().await;
    for (name, genkey, header) in kinds {
        let cert = openssl_cert(dir.path(), name, genkey).await;
        assert!(
            std::fs::read(&cert.key).unwrap().starts_with(header),
            "{name} key format"
        );
        let d = Daemon::start(&cert, &format!("[routes.ssh]\nupstream = \"{up}\"\n")).await;
        let mut tls = tls_connect(d.addr, &cert, "localhost", &["ssh"]).await;
        assert_eq!(read_n(&mut tls, BANNER.len()).await, BANNER, "{name}");
        for version in ["-tls1_2", "-tls1_3"] {
            if name == "pkcs8" && version == "-tls1_2" {
                continue; // Ed25519 certificates are TLS 1.3 only in most stacks
            }
            let mut child = Command::new("openssl")
                .args([
                    "s_client",
                    "-quiet",
                    "-verify_return_error",
                    version,
                    "-alpn",
                    "ssh",
                    "-CAfile",
                ])
                .arg(&cert.cert)
                .args([
                    "-connect",
                    &format!("127.0.0.1:{}", d.addr.port()),
                    "-servername",
                    "localhost",
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut stdout = child.stdout.take().unwrap();
            assert_eq!(
                read_n(&mut stdout, BANNER.len()).await,
                BANNER,
                "{name} {version}"
            );
            let _ = child.kill().await;
        }
        d.stop().await;
    }
}

/// A client CA, as PEM, and a way to sign client certificates valid until `until`.
pub(crate) struct ClientCa {
    key: rcgen::KeyPair,
    pub(crate) cert: rcgen::Certificate,
}

impl ClientCa {
    pub(crate) fn new(name: &str) -> ClientCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        ClientCa { key, cert }
    }

    /// A client certificate and its key, as PEM files `NAME.pem` and `NAME.key` in `dir`.
    pub(crate) fn issue(
        &self,
        dir: &std::path::Path,
        name: &str,
        until: std::time::SystemTime,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        // rcgen takes `time` dates: the epoch plus the offset, without a dependency on `time`.
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        let now = std::time::SystemTime::now();
        params.not_before = epoch
            + (now - Duration::from_secs(60))
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
        params.not_after = epoch + until.duration_since(std::time::UNIX_EPOCH).unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// One `openssl s_client` request with a client certificate, saving or resuming its session:
/// (whether the session was resumed, what came back).
async fn s_client_request(
    addr: std::net::SocketAddr,
    server_ca: &std::path::Path,
    client: &(std::path::PathBuf, std::path::PathBuf),
    session: (&str, &std::path::Path),
) -> (bool, String) {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "localhost",
        ])
        .arg("-CAfile")
        .arg(server_ca)
        .arg("-cert")
        .arg(&client.0)
        .arg("-key")
        .arg(&client.1)
        .args(["-alpn", "http/1.1", "-ign_eof", session.0])
        .arg(session.1)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("openssl s_client timed out")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (text.contains("\nReused, "), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn resumed_sessions_reverify_the_client_certificate() {
    need("openssl", "openssl");
    // rustls restores the client's chain from the ticket on resumption; on a route that
    // requires a client certificate it must pass the CA in force now, at the current time.
    let cert = TestCert::localhost();
    let dir = tempfile::tempdir().unwrap();
    let ca = ClientCa::new("client CA one");
    let ca_path = dir.path().join("client-ca.pem");
    std::fs::write(&ca_path, ca.cert.pem()).unwrap();
    let hour = std::time::SystemTime::now() + Duration::from_secs(3600);
    let laptop = ca.issue(dir.path(), "laptop", hour);
    // Expires a few seconds from now, after its first handshake.
    let soon = std::time::SystemTime::now() + Duration::from_secs(4);
    let brief = ca.issue(dir.path(), "brief", soon);
    let mut d = crate::cli::serve_config(
        dir.path(),
        &format!(
            "listen = [\"127.0.0.1:0\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\npoll_interval = \"500ms\"\n[routes.http]\nupstream = \"{}\"\nrequire_client_cert = true\n",
            cert.cert.display(),
            cert.key.display(),
            ca_path.display(),
            http_upstream().await
        ),
    );
    let (sess, sess_brief) = (
        dir.path().join("laptop.sess"),
        dir.path().join("brief.sess"),
    );
    for (client, sess) in [(&laptop, &sess), (&brief, &sess_brief)] {
        let (resumed, out) =
            s_client_request(d.addr, &cert.cert, client, ("-sess_out", sess)).await;
        assert!(!resumed && out.contains("hello-from-upstream"), "{out}");
    }
    // While the CA stands, the saved session resumes and is served: the test can tell.
    let (resumed, out) = s_client_request(d.addr, &cert.cert, &laptop, ("-sess_in", &sess)).await;
    assert!(resumed, "the session did not resume: {out}");
    assert!(out.contains("hello-from-upstream"), "{out}");
    crate::cli::wait_for_line(&d.log, "resumed=true", Duration::from_secs(20));

    // The short-lived certificate expires: its resumed session is refused.
    while std::time::SystemTime::now() < soon + Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (resumed, out) =
        s_client_request(d.addr, &cert.cert, &brief, ("-sess_in", &sess_brief)).await;
    assert!(resumed, "the session did not resume: {out}");
    assert!(
        !out.contains("hello-from-upstream"),
        "an expired client certificate was served: {out}"
    );
    let line = crate::cli::wait_for_line(
        &d.log,
        "client certificate no longer verifies",
        Duration::from_secs(20),
    );
    assert!(
        line.contains("resumed=true") && line.contains("xpired"),
        "{line}"
    );

    // The CA is replaced by another (the file watch reloads it): the resumed session of a
    // certificate from the old CA is refused.
    let other = ClientCa::new("client CA two");
    std::fs::write(&ca_path, other.cert.pem()).unwrap();
    crate::cli::wait_for_line(&d.log, "certificates reloaded", Duration::from_secs(20));
    let (resumed, out) = s_client_request(d.addr, &cert.cert, &laptop, ("-sess_in", &sess)).await;
    assert!(resumed, "the session did not resume: {out}");
    assert!(
        !out.contains("hello-from-upstream"),
        "a certificate of a removed CA was served: {out}"
    );
    let line = crate::cli::wait_for_line(
        &d.log,
        "client certificate no longer verifies",
        Duration::from_secs(20),
    );
    assert!(line.contains("resumed=true"), "{line}");
    crate::cli::sigterm(&d.child);
    crate::cli::wait_exit(&mut d.child, Duration::from_secs(10));
}

/// What `openssl s_client -brief` negotiated: (protocol, cipher suite), or `None` if the
/// handshake failed.
async fn negotiated(port: u16, extra: &[&str]) -> Option<(String, String)> {
    let (_, out, err) = output(
        Command::new("openssl")
            .args(["s_client", "-brief", "-connect"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-servername", "localhost"])
            .args(extra),
    )
    .await;
    let text = format!("{out}{err}");
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
    };
    Some((field("Protocol version:")?, field("Ciphersuite:")?))
}

/// sluice picks the suite in its own order, whatever the client prefers: OpenSSL puts
/// AES-256-GCM first, sluice AES-128-GCM where the CPU has AES instructions (ChaCha20 where it
/// does not). A configured order is honoured and a suite left out is refused; `min_version`
/// refuses older clients.
#[tokio::test]
async fn the_server_picks_the_cipher_suite_in_its_own_order() {
    need("openssl", "openssl");
    let cert = TestCert::localhost();
    let d = Daemon::start(&cert, "").await;
    let port = d.addr.port();
    let (aes13, aes12) = if sluice::tls::aes_hardware() {
        ("TLS_AES_128_GCM_SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256")
    } else {
        (
            "TLS_CHACHA20_POLY1305_SHA256",
            "ECDHE-ECDSA-CHACHA20-POLY1305",
        )
    };
    assert_eq!(
        negotiated(port, &[]).await,
        Some(("TLSv1.3".into(), aes13.into())),
        "OpenSSL's defaults"
    );
    assert_eq!(
        negotiated(port, &["-tls1_2"]).await,
        Some(("TLSv1.2".into(), aes12.into())),
        "OpenSSL's defaults over TLS 1.2"
    );
    // A client that only speaks AES-256-GCM still gets it.
    assert_eq!(
        negotiated(port, &["-ciphersuites", "TLS_AES_256_GCM_SHA384"]).await,
        Some(("TLSv1.3".into(), "TLS_AES_256_GCM_SHA384".into()))
    );
    d.stop().await;

    let d = Daemon::start(
        &cert,
        "cipher_suites = [\"TLS13_CHACHA20_POLY1305_SHA256\", \"TLS13_AES_256_GCM_SHA384\"]\nmin_version = \"1.3\"\n",
    )
    .await;
    let port = d.addr.port();
    assert_eq!(
        negotiated(port, &[]).await,
        Some(("TLSv1.3".into(), "TLS_CHACHA20_POLY1305_SHA256".into())),
        "the configured order"
    );
    assert_eq!(
        negotiated(port, &["-ciphersuites", "TLS_AES_128_GCM_SHA256"]).await,
        None,
        "a suite left out of tls.cipher_suites"
    );
    assert_eq!(
        negotiated(port, &["-tls1_2"]).await,
        None,
        "TLS 1.2 under min_version 1.3"
    );
    d.stop().await;
}
