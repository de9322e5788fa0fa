use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::ssh::{keygen, port_range, Fixture};
use crate::support::{need, tls_connect};

/// `[tunnels]` for the fixtures: names under `t.localhost`.
const TUNNELS: &str = "\n[tunnels]\ndomain = \"t.localhost\"\n";

/// The short id a key publishes under (`NAME-<id>`): SHA-256 of its fingerprint, 8 hex digits.
fn own_id(public: &str) -> String {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k.pub");
    std::fs::write(&p, public).unwrap();
    let out = std::process::Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(&p)
        .output()
        .unwrap();
    let line = String::from_utf8(out.stdout).unwrap();
    let fp = line.split_whitespace().nth(1).unwrap().to_string();
    let d = sha2::Sha256::digest(fp.as_bytes());
    d[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// A tunnel counter now (process-wide: other tests add to it, so compare with `>=`).
fn counted(visits: bool, result: &'static str) -> u64 {
    let m = sluice::metrics::get();
    let f = if visits {
        &m.tunnel_visits
    } else {
        &m.tunnel_publish
    };
    f.get_or_create(&sluice::metrics::ResultLabels { result })
        .get()
}

/// Keeps `ssh -N -R spec` up with `key` through sluice on `port`; killed on drop.
fn publish(port: u16, key: &Path, spec: &str) -> tokio::process::Child {
    crate::ssh::ssh_via(
        port,
        key,
        &[
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            spec,
            "tunnel@localhost",
        ],
    )
    .stderr(Stdio::null())
    .spawn()
    .unwrap()
}

/// Tries `ssh -W target` through sluice on `port` until it echoes, within 30 s.
async fn until_reached(port: u16, key: &Path, target: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out, err) = crate::ssh::w_via(port, key, target, b"ping through the tunnel").await;
        if ok && out == b"ping through the tunnel" {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{target} never answered through the tunnel: {err}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_name_published_with_dash_r_is_reached_by_name_and_owned() {
    let dir = tempfile::tempdir().unwrap();
    let owner = keygen(dir.path(), "owner");
    let other = keygen(dir.path(), "other");
    let authorized = format!(
        "permitlisten=\"mydevice:22\" {}\n{}\n",
        owner.public.trim(),
        other.public.trim()
    );
    let (_, range) = port_range(4);
    // Ports other than 22 and names nobody owns are allowed here, so that what refuses them
    // below is the registry, not permit_open.
    let permit = ["mydevice:*".to_string(), "*.t.localhost:22".to_string()];
    let f = Fixture::with(&authorized, &permit, &range, TUNNELS).await;

    let (opened, denied, no_tunnel) = (
        counted(true, "opened"),
        counted(false, "denied"),
        counted(true, "no_tunnel"),
    );
    // The device publishes its "sshd" (the echo server here) as mydevice:22; no port is bound.
    let mut device = publish(
        f.d.addr.port(),
        &owner.private,
        &format!("mydevice:22:{}", f.echo),
    );
    until_reached(f.d.addr.port(), &other.private, "mydevice:22").await;
    until_reached(f.d.addr.port(), &other.private, "mydevice.t.localhost:22").await;

    // Another key cannot take the name, even while its owner is connected.
    let out = f
        .forward_output(&other.private, &format!("mydevice:22:{}", f.echo))
        .await;
    assert!(
        !out.status.success(),
        "a key without permitlisten took mydevice"
    );
    // A port the device did not publish, and a name nobody owns under the domain: refused,
    // never looked up in DNS.
    // ssh reports the channel refusal: "connect failed" is the registry's (no live tunnel),
    // "administratively prohibited" would be permit_open's.
    let (ok, _, err) = f.w(&other.private, "mydevice:23", b"x").await;
    assert!(!ok, "mydevice:23 is not published");
    assert!(err.contains("open failed: connect failed"), "{err}");
    let (ok, _, err) = f.w(&other.private, "nobody.t.localhost:22", b"x").await;
    assert!(!ok);
    assert!(err.contains("open failed: connect failed"), "{err}");
    assert!(counted(true, "opened") >= opened + 2, "visits counted");
    assert!(
        counted(true, "no_tunnel") >= no_tunnel + 2,
        "refused visits counted"
    );
    assert!(counted(false, "denied") > denied, "the refused -R counted");

    // The publisher goes: visitors are refused, and the name stays its owner's.
    device.kill().await.unwrap();
    device.wait().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, _, _) = f.w(&other.private, "mydevice:22", b"x").await;
        if !ok {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tunnel outlived its publisher"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = f
        .forward_output(&other.private, &format!("mydevice:22:{}", f.echo))
        .await;
    assert!(
        !out.status.success(),
        "another key took an owned name while its owner was away"
    );
    // The owner comes back and gets it again.
    let _device = publish(
        f.d.addr.port(),
        &owner.private,
        &format!("mydevice:22:{}", f.echo),
    );
    until_reached(f.d.addr.port(), &other.private, "mydevice:22").await;
    f.d.stop().await;
}

#[tokio::test]
async fn without_permitlisten_a_key_publishes_under_its_own_id() {
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path(), "key");
    let own = own_id(&key.public);
    let name = format!("myapp-{own}");
    let (_, range) = port_range(4);
    let f = Fixture::with(&key.public, &[format!("{name}:80")], &range, TUNNELS).await;
    let denied = counted(false, "denied");
    let out = f
        .forward_output(&key.private, &format!("myapp:80:{}", f.echo))
        .await;
    assert!(
        counted(false, "denied") > denied,
        "refused by the naming rule"
    );
    assert!(
        !out.status.success(),
        "a bare name without permitlisten was published"
    );
    let _tunnel = publish(
        f.d.addr.port(),
        &key.private,
        &format!("{name}:80:{}", f.echo),
    );
    until_reached(f.d.addr.port(), &key.private, &format!("{name}:80")).await;
    // Not in ssh.permit_open (only NAME:80 is): the name alone does not open other ports.
    let (ok, _, err) = f.w(&key.private, &format!("{name}:81"), b"x").await;
    assert!(!ok);
    assert!(err.contains("administratively prohibited"), "{err}");
    f.d.stop().await;
}

#[tokio::test]
async fn ssh_dash_j_reaches_a_real_sshd_behind_a_name_and_scp_moves_32_mib() {
    use tokio::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let device_key = keygen(dir.path(), "device");
    let admin = keygen(dir.path(), "admin");
    let mut sshd = crate::ssh::start_sshd(&admin).await;
    let authorized = format!(
        "permitlisten=\"mydevice:22\" {}\n{}\n",
        device_key.public.trim(),
        admin.public.trim()
    );
    let f = Fixture::with(
        &authorized,
        &["mydevice:22".into()],
        &port_range(4).1,
        TUNNELS,
    )
    .await;
    // The device behind NAT: its sshd is published by name, nothing listens on the server.
    let _device = publish(
        f.d.addr.port(),
        &device_key.private,
        &format!("mydevice:22:127.0.0.1:{}", sshd.port),
    );
    let user = crate::ssh::login_user();
    let cfg = crate::ssh::jump_config(dir.path(), f.d.addr.port(), &admin.private);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("ssh")
            .arg("-F")
            .arg(&cfg)
            .args([
                "-J",
                "sluice",
                &format!("{user}@mydevice"),
                "echo via-name-$((6*7))",
            ])
            .output()
            .await
            .unwrap();
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "via-name-42");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ssh -J sluice mydevice: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // 32 MiB there with scp (its own protocol, -O: the test sshd has no sftp subsystem).
    let data = crate::support::pattern(7, 32 << 20);
    let src = dir.path().join("payload");
    std::fs::write(&src, &data).unwrap();
    let dst = dir.path().join("copied");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new("scp")
            .arg("-F")
            .arg(&cfg)
            .args(["-O", "-q", "-J", "sluice"])
            .arg(&src)
            .arg(format!("{user}@mydevice:{}", dst.display()))
            .output(),
    )
    .await
    .expect("scp hung")
    .unwrap();
    assert!(
        out.status.success(),
        "scp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copied = std::fs::read(&dst).unwrap();
    assert_eq!(
        crate::support::sha256(&copied),
        crate::support::sha256(&data),
        "32 MiB through the tunnel, changed"
    );
    sshd.child.kill().await.unwrap();
    f.d.stop().await;
}

#[tokio::test]
async fn a_restart_keeps_names_with_their_owners() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let owner = keygen(dir.path(), "owner");
    let other = keygen(dir.path(), "other");
    let authorized = format!(
        "permitlisten=\"mydevice:22\" {}\npermitlisten=\"mydevice:22\" {}\n",
        owner.public.trim(),
        other.public.trim()
    );
    std::fs::write(dir.path().join("authorized_keys"), authorized).unwrap();
    let echo = crate::support::echo_upstream().await;
    let cert = crate::support::TestCert::localhost();
    let extra = format!(
        "{}{TUNNELS}",
        crate::ssh::ssh_section(
            dir.path(),
            &state.join("hostkey"),
            &["mydevice:22".to_string()],
            &port_range(4).1,
            ""
        )
    );
    let spec = format!("mydevice:22:{echo}");
    let d = crate::support::Daemon::start_in(&state, &cert, &extra).await;
    let mut first = publish(d.addr.port(), &owner.private, &spec);
    until_reached(d.addr.port(), &other.private, "mydevice:22").await;
    first.kill().await.unwrap();
    first.wait().await.unwrap();
    d.stop().await;
    assert!(
        state.join("sluice.db").exists(),
        "no store in the state directory"
    );

    // Restarted: the other key, though permitlisten grants it the name too, cannot take it.
    let d = crate::support::Daemon::start_in(&state, &cert, &extra).await;
    let owned = counted(false, "owned");
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        publish(d.addr.port(), &other.private, &spec).wait(),
    )
    .await
    .expect("ssh -R with a refused name hung");
    assert!(
        !out.unwrap().success(),
        "a restart handed the name to another key"
    );
    assert!(
        counted(false, "owned") > owned,
        "refused as another key's name"
    );
    let _back = publish(d.addr.port(), &owner.private, &spec);
    until_reached(d.addr.port(), &other.private, "mydevice:22").await;
    d.stop().await;
}

/// The device's web service: answers `hello-from-device`, the path and the request headers
/// it received (so the forwarding headers can be checked); counts the connections it took.
async fn device_web() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let mut body = format!("hello-from-device\npath: {}\n", req.uri());
                        for (k, v) in req.headers() {
                            body.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                        }
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, conns)
}

/// `curl -si` to `https://HOST:PORT/PATH` (HOST resolved to 127.0.0.1), trusting the
/// fixture's certificate: (status, the whole answer, headers and body).
async fn curl(f: &Fixture, host: &str, path: &str, extra: &[&str]) -> (u16, String) {
    let port = f.d.addr.port();
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-i", "--max-time", "10", "--cacert"])
        .arg(&f.cert.cert)
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .args(extra)
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn https_visitors_reach_a_published_name_over_http1_and_h2() {
    need("curl", "curl");
    let dir = tempfile::tempdir().unwrap();
    let owner = keygen(dir.path(), "owner");
    let (device, conns) = device_web().await;
    let (_, range) = port_range(2);
    let f = Fixture::with(
        &format!(
            "permitlisten=\"myapp:80\",permitlisten=\"viasocket:80\" {}",
            owner.public.trim()
        ),
        &[],
        &range,
        TUNNELS,
    )
    .await;
    let host = "myapp.t.localhost";
    let authority = format!("{host}:{}", f.d.addr.port());
    // Before it is published: nobody owns the name.
    let (status, text) = curl(&f, host, "/", &[]).await;
    assert_eq!(status, 404, "{text}");
    let mut publisher = publish(
        f.d.addr.port(),
        &owner.private,
        &format!("myapp:80:{device}"),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        let (status, text) = curl(&f, host, "/a/b?q=1", &["-H", "X-Forwarded-For: 6.6.6.6"]).await;
        if status == 200 {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never served: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let lower = text.to_ascii_lowercase();
    assert!(
        lower.contains("hello-from-device\npath: /a/b?q=1\n"),
        "{text}"
    );
    // The visitor's own X-Forwarded-For is replaced, not trusted.
    assert!(lower.contains("x-forwarded-for: 127.0.0.1\n"), "{text}");
    assert!(!lower.contains("6.6.6.6"), "{text}");
    assert!(lower.contains("x-forwarded-proto: https\n"), "{text}");
    assert!(
        lower.contains(&format!("x-forwarded-host: {authority}\n")),
        "{text}"
    );
    assert!(lower.contains(&format!("host: {authority}\n")), "{text}");

    // h2 from the visitor, HTTP/1.1 through the tunnel.
    let (status, text) = curl(&f, host, "/h2", &["--http2"]).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.starts_with("HTTP/2 200"), "{text}");
    assert!(text.contains(&format!("host: {authority}\n")), "{text}");

    // Channels are pooled: sequential visitors reuse the channel the first one opened.
    let before = conns.load(Ordering::SeqCst);
    for _ in 0..5 {
        assert_eq!(curl(&f, host, "/again", &[]).await.0, 200);
    }
    let opened = conns.load(Ordering::SeqCst) - before;
    assert!(
        opened <= 1,
        "5 sequential requests opened {opened} channels"
    );

    // `-R /NAME:...` (streamlocal, as Preevy's clients publish) is tunnel NAME on port 80.
    let _by_socket = publish(
        f.d.addr.port(),
        &owner.private,
        &format!("/viasocket:{device}"),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, text) = curl(&f, "viasocket.t.localhost", "/s", &[]).await;
        if status == 200 {
            assert!(text.contains("hello-from-device\npath: /s\n"), "{text}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "-R /viasocket never served: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Plain http://NAME.<domain>/ on the same port: a 308 to https.
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-i", "--max-time", "10"])
        .arg(format!("http://{authority}/p?q=1"))
        .arg("--resolve")
        .arg(format!("{host}:{}:127.0.0.1", f.d.addr.port()))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 308"), "{text}");
    assert!(
        text.contains(&format!("Location: https://{authority}/p?q=1\r\n")),
        "{text}"
    );

    // Host must name what SNI named.
    let (status, text) = curl(&f, host, "/", &["-H", "Host: other.t.localhost"]).await;
    assert_eq!(status, 421, "{text}");
    // An unknown name: 404.
    let (status, text) = curl(&f, "nobody.t.localhost", "/", &[]).await;
    assert_eq!(status, 404, "{text}");
    let requests = sluice::metrics::get()
        .tunnel_requests
        .get_or_create(&sluice::metrics::TunnelRequestLabels {
            tunnel: "myapp".into(),
            class: "2xx",
        })
        .get();
    assert!(requests >= 7, "2xx requests counted: {requests}");

    // The publisher goes: a 502 that says so, with Retry-After.
    publisher.kill().await.unwrap();
    publisher.wait().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        // A request already on its way when the session ended may get "did not answer".
        let (status, text) = curl(&f, host, "/", &[]).await;
        if status == 502 && text.contains("not connected now") {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {status}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 5"),
        "{text}"
    );
    assert!(text.contains("tunnel myapp is not connected now"), "{text}");
    f.d.stop().await;
}

#[tokio::test]
async fn a_websocket_passes_through_a_tunnel() {
    need("curl", "curl");
    let py = "/usr/bin/python3";
    let has = std::process::Command::new(py)
        .args(["-c", "import websockets"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has,
        "python3-websockets is needed (apt-get install python3-websockets)"
    );
    let dir = tempfile::tempdir().unwrap();
    let owner = keygen(dir.path(), "owner");
    // The device: a real WebSocket echo server.
    let device_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = tokio::process::Command::new(py)
        .args(["-c", "import asyncio, sys, websockets\nasync def echo(ws, path):\n    async for m in ws:\n        await ws.send('echo:' + m)\nasync def main():\n    async with websockets.serve(echo, '127.0.0.1', int(sys.argv[1])):\n        print('ready', flush=True)\n        await asyncio.Future()\nasyncio.run(main())\n"])
        .arg(device_port.to_string())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        tokio::io::BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut line)
            .await
            .unwrap();
        assert_eq!(line.trim(), "ready");
    }
    let (_, range) = port_range(2);
    let f = Fixture::with(
        &format!("permitlisten=\"ws:80\" {}", owner.public.trim()),
        &[],
        &range,
        TUNNELS,
    )
    .await;
    let _publisher = publish(
        f.d.addr.port(),
        &owner.private,
        &format!("ws:80:127.0.0.1:{device_port}"),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // Published once the device answers (a plain GET gets its 426 Upgrade Required).
    loop {
        let (status, text) = curl(&f, "ws.t.localhost", "/", &[]).await;
        if status == 426 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never published: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The visitor: websockets' client over wss, three messages each way.
    let client = format!(
        "import asyncio, ssl, sys, websockets\nasync def main():\n    ctx = ssl.create_default_context(cafile=sys.argv[1])\n    async with websockets.connect('wss://ws.t.localhost:{p}/chat', ssl=ctx, host='127.0.0.1', port={p}, server_hostname='ws.t.localhost') as ws:\n        for i in range(3):\n            await ws.send('m%d' % i)\n            print(await ws.recv())\nasyncio.run(main())\n",
        p = f.d.addr.port()
    );
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(py)
            .args(["-c", &client])
            .arg(&f.cert.cert)
            .output(),
    )
    .await
    .expect("the websocket client hung")
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "echo:m0\necho:m1\necho:m2\n"
    );
    f.d.stop().await;
}

#[tokio::test]
async fn a_slow_visitor_is_cut_at_the_header_timeout_and_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    need("curl", "curl");
    let dir = tempfile::tempdir().unwrap();
    let owner = keygen(dir.path(), "owner");
    let (device, _) = device_web().await;
    let (_, range) = port_range(2);
    let f = Fixture::with(
        &format!("permitlisten=\"myapp:80\" {}", owner.public.trim()),
        &[],
        &range,
        "\n[tunnels]\ndomain = \"t.localhost\"\nheader_timeout = \"1s\"\n",
    )
    .await;
    let _publisher = publish(
        f.d.addr.port(),
        &owner.private,
        &format!("myapp:80:{device}"),
    );
    until_served(&f, "myapp.t.localhost").await;
    // Half a request head, then silence.
    let mut slow = tls_connect(f.d.addr, &f.cert, "myapp.t.localhost", &["http/1.1"]).await;
    slow.write_all(b"GET / HTTP/1.1\r\nHost: myapp.t.localhost\r\nX-Slow: ")
        .await
        .unwrap();
    assert_eq!(
        curl(&f, "myapp.t.localhost", "/", &[]).await.0,
        200,
        "others are served meanwhile"
    );
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the slow visitor was not cut");
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"), "{buf:?}");
    f.d.stop().await;
}

/// Waits until `https://HOST/` answers 200 through the tunnel (30 s).
async fn until_served(f: &Fixture, host: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, text) = curl(f, host, "/", &[]).await;
        if status == 200 {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{host} never served: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_reconnecting_owner_evicts_a_stale_holder_but_not_a_live_one() {
    need("curl", "curl");
    let dir = tempfile::tempdir().unwrap();
    let owner = keygen(dir.path(), "owner");
    let (first_device, first_conns) = device_web().await;
    let (second_device, second_conns) = device_web().await;
    let (_, range) = port_range(2);
    let f = Fixture::with(
        &format!("permitlisten=\"myapp:80\" {}", owner.public.trim()),
        &[],
        &range,
        TUNNELS,
    )
    .await;
    let port = f.d.addr.port();
    let mut first = publish(port, &owner.private, &format!("myapp:80:{first_device}"));
    until_served(&f, "myapp.t.localhost").await;
    assert!(first_conns.load(Ordering::SeqCst) >= 1);

    // A live holder keeps the name: the second session's -R is refused (ssh exits).
    let mut second = publish(port, &owner.private, &format!("myapp:80:{second_device}"));
    let status = tokio::time::timeout(Duration::from_secs(20), second.wait())
        .await
        .expect("the second publisher was neither refused nor evicted the live one")
        .unwrap();
    assert!(!status.success());
    until_served(&f, "myapp.t.localhost").await;
    assert_eq!(
        second_conns.load(Ordering::SeqCst),
        0,
        "served by the live holder"
    );

    // The first client stops answering (a dead link): the owner's next session evicts it.
    let pid = first.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let evicted = counted(false, "evicted");
    let _second = publish(port, &owner.private, &format!("myapp:80:{second_device}"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while second_conns.load(Ordering::SeqCst) == 0 {
        let _ = curl(&f, "myapp.t.localhost", "/", &[]).await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stale holder was not evicted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(counted(false, "evicted") > evicted, "eviction counted");
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
    first.kill().await.unwrap();
    f.d.stop().await;
}

#[tokio::test]
async fn a_tunnel_on_port_443_gets_the_visitors_tls_untouched() {
    need("curl", "curl");
    need("openssl", "openssl");
    let dir = tempfile::tempdir().unwrap();
    let owner = keygen(dir.path(), "owner");
    // The device holds its own certificate; sluice never sees its key.
    let device_cert = crate::support::TestCert::new(&["mysite.t.localhost"]);
    let device_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = tokio::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(device_port.to_string())
        .arg("-cert")
        .arg(&device_cert.cert)
        .arg("-key")
        .arg(&device_cert.key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (_, range) = port_range(2);
    let f = Fixture::with(
        &format!("permitlisten=\"mysite:443\" {}", owner.public.trim()),
        &[],
        &range,
        TUNNELS,
    )
    .await;
    let _publisher = publish(
        f.d.addr.port(),
        &owner.private,
        &format!("mysite:443:127.0.0.1:{device_port}"),
    );
    // Verified against the device's certificate, not sluice's: the TLS is the device's own.
    let port = f.d.addr.port();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = tokio::process::Command::new("curl")
            .args(["-s", "--max-time", "10", "--cacert"])
            .arg(&device_cert.cert)
            .arg("--resolve")
            .arg(format!("mysite.t.localhost:{port}:127.0.0.1"))
            .arg(format!("https://mysite.t.localhost:{port}/"))
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && text.contains("s_server") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "passthrough never served: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // openssl s_client sees the device's certificate and verifies it end to end.
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-brief", "-verify_return_error", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .args([
            "-servername",
            "mysite.t.localhost",
            "-verify_hostname",
            "mysite.t.localhost",
            "-CAfile",
        ])
        .arg(&device_cert.cert)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Verification: OK"), "{err}");
    f.d.stop().await;
}

#[test]
fn private_tunnels_need_a_client_certificate_or_basic_credentials() {
    need("curl", "curl");
    need("htpasswd", "apache2-utils");
    need("fail2ban-regex", "fail2ban");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let owner = keygen(dir.path(), "owner");
    std::fs::write(
        dir.path().join("authorized_keys"),
        format!(
            "permitlisten=\"staff:80\",permitlisten=\"admin-1:80\" {}\n",
            owner.public.trim()
        ),
    )
    .unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let st = std::process::Command::new("htpasswd")
        .args(["-cbB", "-C", "5"])
        .arg(&htpasswd)
        .args(["alice", "secret"])
        .output()
        .unwrap();
    assert!(st.status.success());
    let ca = crate::clients::ClientCa::new("visitors CA");
    let ca_path = dir.path().join("visitors-ca.pem");
    std::fs::write(&ca_path, ca.cert.pem()).unwrap();
    let laptop = ca.issue(
        dir.path(),
        "laptop",
        std::time::SystemTime::now() + Duration::from_secs(3600),
    );
    let cert = crate::support::TestCert::new(&["localhost", "*.t.localhost"]);
    let (_, range) = port_range(2);
    let ssh = crate::ssh::ssh_section(
        dir.path(),
        &dir.path().join("hostkey"),
        &[],
        &range,
        &format!(
            "[tunnels]\ndomain = \"t.localhost\"\n[[tunnels.private]]\nnames = [\"staff\"]\nhtpasswd = \"{}\"\n[[tunnels.private]]\nnames = [\"admin-*\"]\nclient_cert = true\n",
            htpasswd.display()
        ),
    );
    let mut d = crate::cli::serve_config(
        dir.path(),
        &format!(
            "listen = [\"127.0.0.1:0\"]\nshutdown_grace = \"1s\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n{ssh}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            cert.cert.display(),
            cert.key.display(),
            ca_path.display()
        ),
    );
    let port = d.addr.port();
    let admin = d.admin_addr().to_string();
    let (lines, _staff, _admin) = rt.block_on(async {
        let (device, _) = device_web().await;
        let staff = publish(port, &owner.private, &format!("staff:80:{device}"));
        let admin = publish(port, &owner.private, &format!("admin-1:80:{device}"));
        let curl = |host: &'static str, extra: Vec<String>| {
            let cacert = cert.cert.clone();
            async move {
                let out = tokio::process::Command::new("curl")
                    .args(["-s", "-i", "--max-time", "10", "--cacert"])
                    .arg(&cacert)
                    .arg("--resolve")
                    .arg(format!("{host}:{port}:127.0.0.1"))
                    .args(&extra)
                    .arg(format!("https://{host}:{port}/"))
                    .output()
                    .await
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            }
        };
        let creds = |u: &str| vec!["-u".to_string(), u.to_string()];
        // Published once the right credentials get through.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let text = loop {
            let text = curl("staff.t.localhost", creds("alice:secret")).await;
            if text.starts_with("HTTP/2 200") {
                break text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never served: {text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let lower = text.to_ascii_lowercase();
        assert!(lower.contains("x-forwarded-user: alice\n"), "{text}");
        assert!(
            !lower.contains("authorization:"),
            "the credentials reached the device: {text}"
        );
        let text = curl("staff.t.localhost", vec![]).await;
        assert!(text.starts_with("HTTP/2 401"), "{text}");
        assert!(
            text.contains("www-authenticate: Basic realm=\"staff\""),
            "{text}"
        );
        for wrong in ["alice:guess", "bob:secret"] {
            let text = curl("staff.t.localhost", creds(wrong)).await;
            assert!(text.starts_with("HTTP/2 401"), "{wrong}: {text}");
        }
        // The client-certificate tunnel: refused without one, served with one from the CA.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let with_cert = vec![
                "--cert".to_string(),
                laptop.0.display().to_string(),
                "--key".to_string(),
                laptop.1.display().to_string(),
            ];
            let text = curl("admin-1.t.localhost", with_cert).await;
            if text.starts_with("HTTP/2 200") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never served: {text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let text = curl("admin-1.t.localhost", creds("alice:secret")).await;
        assert!(text.starts_with("HTTP/2 403"), "{text}");
        // Two wrong passwords: two lines for fail2ban.
        let mut failed = Vec::new();
        while failed.len() < 2 {
            let l = d
                .log
                .recv_timeout(Duration::from_secs(10))
                .expect("no 'Failed password' lines for the wrong credentials");
            if l.contains("Failed password") {
                failed.push(l);
            }
        }
        (failed, staff, admin)
    });
    // `sluice tunnels` lists both, with the requests that reached them.
    let out = std::process::Command::new(crate::support::bin())
        .args(["tunnels", "--admin", &admin])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.starts_with("NAME"), "{table}");
    let out = std::process::Command::new(crate::support::bin())
        .args(["tunnels", "--json", "--admin", &admin])
        .output()
        .unwrap();
    let list: Vec<sluice::tunnel::LiveTunnel> = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<(&str, u16)> = list.iter().map(|t| (t.name.as_str(), t.port)).collect();
    assert_eq!(names, [("admin-1", 80), ("staff", 80)], "{table}");
    let staff = &list[1];
    assert!(staff.owner.starts_with("SHA256:"), "{staff:?}");
    assert!(
        staff.visits >= 1 && staff.bytes_to_visitors > 0,
        "only allowed requests reach it: {staff:?}"
    );
    assert!(
        table.contains("staff") && table.contains(&staff.owner),
        "{table}"
    );
    crate::cli::sigterm(&d.child);
    crate::cli::wait_exit(&mut d.child, Duration::from_secs(10));
    assert!(
        lines[0].contains("Failed password for alice from 127.0.0.1 tunnel staff"),
        "{lines:?}"
    );
    let log = dir.path().join("auth.log");
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let filter = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/fail2ban/filter.d/sluice.conf"
    );
    let out = std::process::Command::new("fail2ban-regex")
        .arg(&log)
        .arg(filter)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("Lines: 2 lines, 0 ignored, 2 matched"),
        "{report}"
    );
}
