use std::net::SocketAddr;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// The bytes of a real rustls ClientHello.
fn client_hello(cert: &TestCert) -> Vec<u8> {
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(client_config(cert, &["ssh"]), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    assert!(out.len() > 100 && out[0] == 0x16);
    out
}

/// Whether a TLS client with ALPN `ssh` gets the fake sshd's banner through `addr` (within
/// 5 s); `false` when the connection is refused or closed instead.
async fn serves_banner(addr: SocketAddr, cert: &TestCert) -> bool {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.ok()?;
        let connector = tokio_rustls::TlsConnector::from(client_config(cert, &["ssh"]));
        let name = ServerName::try_from("localhost").ok()?;
        let mut tls = connector.connect(name, tcp).await.ok()?;
        let mut got = vec![0u8; BANNER.len()];
        tls.read_exact(&mut got).await.ok()?;
        Some(got == BANNER)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), attempt).await,
        Ok(Some(true))
    )
}

/// The daemon still answers a normal TLS client.
async fn still_serves(d: &Daemon, cert: &TestCert) {
    let mut tls = tls_connect(d.addr, cert, "localhost", &["ssh"]).await;
    assert_eq!(read_n(&mut tls, BANNER.len()).await, BANNER);
}

/// Waits (up to `limit`) until the daemon closes one of `conns`; returns which.
async fn first_closed(conns: &mut [TcpStream], limit: Duration) -> usize {
    let deadline = std::time::Instant::now() + limit;
    loop {
        for (i, s) in conns.iter_mut().enumerate() {
            let mut b = [0u8; 64];
            // A read cut short by the timeout loses nothing: tokio's read is cancel-safe.
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(10), s.read(&mut b)).await
            {
                return i;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "none of {} connections closed within {limit:?}",
            conns.len()
        );
    }
}

async fn start(cert: &TestCert) -> Daemon {
    Daemon::start(
        cert,
        &format!("[routes.ssh]\nupstream = \"{}\"\n", banner_upstream().await),
    )
    .await
}

#[tokio::test]
async fn random_bytes_are_closed_and_nobody_else_notices() {
    let cert = TestCert::localhost();
    let d = start(&cert).await;
    for seed in 1..20u64 {
        let mut s = TcpStream::connect(d.addr).await.unwrap();
        let mut junk = pattern(seed, 4096);
        if matches!(
            junk[0],
            0x16 | b'S' | b'G' | b'H' | b'P' | b'D' | b'C' | b'O' | b'T'
        ) {
            junk[0] = 0xff;
        }
        let _ = s.write_all(&junk).await;
        closed_within(&mut s, Duration::from_secs(5)).await;
    }
    still_serves(&d, &cert).await;
    d.stop().await;
}

#[tokio::test]
async fn junk_after_a_tls_record_header_fails_the_handshake() {
    let cert = TestCert::localhost();
    let d = start(&cert).await;
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    let mut junk = vec![0x16, 0x03, 0x01, 0x00, 0x40];
    junk.extend_from_slice(&pattern(7, 64));
    s.write_all(&junk).await.unwrap();
    closed_within(&mut s, Duration::from_secs(5)).await;
    still_serves(&d, &cert).await;
    d.stop().await;
}

#[tokio::test]
async fn truncated_client_hello_then_close() {
    let cert = TestCert::localhost();
    let d = start(&cert).await;
    let hello = client_hello(&cert);
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    s.write_all(&hello[..hello.len() / 2]).await.unwrap();
    s.shutdown().await.unwrap();
    closed_within(&mut s, Duration::from_secs(5)).await;
    still_serves(&d, &cert).await;
    d.stop().await;
}

#[tokio::test]
async fn client_stalling_mid_handshake_hits_the_deadline() {
    let cert = TestCert::localhost();
    let d = start(&cert).await; // handshake_timeout = 3s in the test config
    let hello = client_hello(&cert);
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    s.write_all(&hello[..hello.len() / 2]).await.unwrap();
    // Meanwhile others are served.
    still_serves(&d, &cert).await;
    let took = closed_within(&mut s, Duration::from_secs(10)).await;
    assert!(
        took >= Duration::from_secs(2),
        "closed before the handshake deadline: {took:?}"
    );
    d.stop().await;
}

#[tokio::test]
async fn upstream_down_closes_promptly() {
    let cert = TestCert::localhost();
    let dead = dead_port();
    let extra =
        format!("[routes.http]\nupstream = \"{dead}\"\n[routes.ssh]\nupstream = \"{dead}\"\n");
    let d = Daemon::start(&cert, &extra).await;
    // HTTP gets a 502 it can show.
    let mut tls = tls_connect(d.addr, &cert, "localhost", &["http/1.1"]).await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let reply = String::from_utf8(read_all(&mut tls).await).unwrap();
    assert!(reply.starts_with("HTTP/1.1 502 "), "{reply}");
    // SSH is closed.
    let mut tls = tls_connect(d.addr, &cert, "localhost", &["ssh"]).await;
    assert_eq!(read_all(&mut tls).await, b"");
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    s.write_all(b"SSH-2.0-x\r\n").await.unwrap();
    closed_within(&mut s, Duration::from_secs(5)).await;
    d.stop().await;
}

#[tokio::test]
async fn unresolvable_upstream_is_reported_not_fatal() {
    let cert = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        "[routes.ssh]\nupstream = \"no-such-host.invalid:22\"\nconnect_timeout = \"2s\"\n",
    )
    .await;
    let mut tls = tls_connect(d.addr, &cert, "localhost", &["ssh"]).await;
    assert_eq!(read_all(&mut tls).await, b"");
    d.stop().await;
}

#[tokio::test]
async fn unrouted_connections_per_ip_are_capped() {
    let cert = TestCert::localhost();
    let up = banner_upstream().await;
    let extra = format!("[detect]\ntimeout = \"30s\"\n[limits]\nmax_unrouted_per_ip = 3\n[routes.ssh]\nupstream = \"{up}\"\n");
    let d = Daemon::start(&cert, &extra).await;
    // Four silent clients for three slots. Which one is turned away depends on the order the
    // workers accept them: exactly one of the four is closed, the other three are held.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(d.addr).await.unwrap());
    }
    let refused = first_closed(&mut silent, Duration::from_secs(5)).await;
    silent.remove(refused);
    for s in &mut silent {
        let mut b = [0u8; 16];
        assert!(
            tokio::time::timeout(Duration::from_millis(20), s.read(&mut b))
                .await
                .is_err(),
            "more than one client turned away"
        );
    }
    // Once one of them leaves, a new client gets through.
    drop(silent.pop());
    until(
        "a freed slot takes a new client",
        Duration::from_secs(5),
        || serves_banner(d.addr, &cert),
    )
    .await;
    d.stop().await;
}

#[tokio::test]
async fn max_connections_refuses_the_excess() {
    let cert = TestCert::localhost();
    let up = banner_upstream().await;
    let extra = format!("[limits]\nmax_connections = 2\n[routes.ssh]\nupstream = \"{up}\"\n");
    let d = Daemon::start(&cert, &extra).await;
    let mut a = tls_connect(d.addr, &cert, "localhost", &["ssh"]).await;
    let mut b = tls_connect(d.addr, &cert, "localhost", &["ssh"]).await;
    assert_eq!(read_n(&mut a, BANNER.len()).await, BANNER);
    assert_eq!(read_n(&mut b, BANNER.len()).await, BANNER);
    let mut c = TcpStream::connect(d.addr).await.unwrap();
    closed_within(&mut c, Duration::from_secs(5)).await;
    drop(a);
    until(
        "a freed slot takes a new client",
        Duration::from_secs(5),
        || serves_banner(d.addr, &cert),
    )
    .await;
    drop(b);
    d.stop().await;
}

#[tokio::test]
async fn connections_per_client_are_capped_after_routing_too() {
    let cert = TestCert::localhost();
    let up = banner_upstream().await;
    let extra =
        format!("[limits]\nmax_connections_per_ip = 2\n[routes.ssh]\nupstream = \"{up}\"\n");
    let d = Daemon::start(&cert, &extra).await;
    let mut a = tls_connect(d.addr, &cert, "localhost", &["ssh"]).await;
    let mut b = tls_connect(d.addr, &cert, "localhost", &["ssh"]).await;
    assert_eq!(read_n(&mut a, BANNER.len()).await, BANNER);
    assert_eq!(read_n(&mut b, BANNER.len()).await, BANNER);
    let mut c = TcpStream::connect(d.addr).await.unwrap();
    closed_within(&mut c, Duration::from_secs(5)).await;
    drop(a);
    until(
        "a freed slot takes a new client",
        Duration::from_secs(5),
        || serves_banner(d.addr, &cert),
    )
    .await;
    drop(b);
    d.stop().await;
}

#[tokio::test]
async fn a_502_survives_an_unread_request_body() {
    let cert = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &format!("[routes.http]\nupstream = \"{}\"\n", dead_port()),
    )
    .await;
    let mut tls = tls_connect(d.addr, &cert, "localhost", &["http/1.1"]).await;
    tls.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 32768\r\n\r\n")
        .await
        .unwrap();
    tls.write_all(&vec![b'a'; 32768]).await.unwrap();
    tls.flush().await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(
        out.starts_with(b"HTTP/1.1 502 "),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    d.stop().await;
}

/// A DNS server on 127.0.0.1 (UDP): A queries for names under `sluice.test` get 127.0.0.1,
/// others no data; every query is counted. A silent one never answers.
async fn dns_server(silent: bool) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if silent || n < 12 {
                continue;
            }
            // The question: labels from byte 12 to a zero, then type and class.
            let mut i = 12;
            let mut labels = Vec::new();
            while i < n && buf[i] != 0 {
                let len = buf[i] as usize;
                labels.push(
                    String::from_utf8_lossy(&buf[i + 1..(i + 1 + len).min(n)]).to_lowercase(),
                );
                i += 1 + len;
            }
            let q_end = i + 5;
            if q_end > n {
                continue;
            }
            let qtype = u16::from_be_bytes([buf[i + 1], buf[i + 2]]);
            let ours = labels.ends_with(&["sluice".to_string(), "test".to_string()]);
            let answer = ours && qtype == 1;
            let mut out = Vec::new();
            out.extend_from_slice(&buf[..2]); // id
            out.extend_from_slice(&[0x81, 0x80]); // response, recursion desired and available
            out.extend_from_slice(&[0, 1, 0, answer as u8, 0, 0, 0, 0]);
            out.extend_from_slice(&buf[12..q_end]);
            if answer {
                // A pointer to the question's name, A, IN, TTL 300, 127.0.0.1.
                out.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 127, 0, 0, 1]);
            }
            let _ = sock.send_to(&out, from).await;
        }
    });
    (addr, count)
}

/// `sluice serve` with `[routes.http] upstream = "NAME:PORT"` and `[dns] servers = [dns]`, on
/// one thread (each thread keeps its own resolver cache).
fn serve_with_dns(
    dir: &std::path::Path,
    cert: &TestCert,
    upstream: &str,
    dns: SocketAddr,
    dns_timeout: &str,
) -> crate::cli::Child2 {
    crate::cli::serve_config(
        dir,
        &format!(
            "listen = [\"127.0.0.1:0\"]\nthreads = 1\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[routes.http]\nupstream = \"{upstream}\"\nconnect_timeout = \"5s\"\n[dns]\nservers = [\"{dns}\"]\ntimeout = \"{dns_timeout}\"\n",
            cert.cert.display(),
            cert.key.display()
        ),
    )
}

async fn get(d: SocketAddr, cert: &TestCert) -> String {
    let mut tls = tls_connect(d, cert, "localhost", &["http/1.1"]).await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    String::from_utf8(read_all(&mut tls).await).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_names_resolve_through_dns_and_are_cached() {
    let cert = TestCert::localhost();
    let dir = tempfile::tempdir().unwrap();
    let (dns, queries) = dns_server(false).await;
    let up = http_upstream().await;
    let mut d = serve_with_dns(
        dir.path(),
        &cert,
        &format!("app.sluice.test:{}", up.port()),
        dns,
        "2s",
    );
    let reply = get(d.addr, &cert).await;
    assert!(reply.contains("hello-from-upstream"), "{reply}");
    let after_first = queries.load(std::sync::atomic::Ordering::SeqCst);
    assert!(after_first >= 1, "the configured DNS server was not asked");
    for _ in 0..3 {
        let reply = get(d.addr, &cert).await;
        assert!(reply.contains("hello-from-upstream"), "{reply}");
    }
    assert_eq!(
        queries.load(std::sync::atomic::Ordering::SeqCst),
        after_first,
        "answers were not cached"
    );
    crate::cli::sigterm(&d.child);
    crate::cli::wait_exit(&mut d.child, Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_dns_server_fails_the_lookup_at_its_timeout() {
    let cert = TestCert::localhost();
    let dir = tempfile::tempdir().unwrap();
    let (dns, queries) = dns_server(true).await;
    let mut d = serve_with_dns(dir.path(), &cert, "app.sluice.test:80", dns, "300ms");
    // Two attempts of 300 ms, well inside connect_timeout (5 s): the lookup's own timeout
    // ended it, with a 502 the client can show.
    let t0 = std::time::Instant::now();
    let reply = get(d.addr, &cert).await;
    assert!(reply.starts_with("HTTP/1.1 502 "), "{reply}");
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "the lookup waited for connect_timeout"
    );
    assert!(queries.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let line = d
        .log
        .iter()
        .find(|l| l.contains("connection closed"))
        .unwrap();
    assert!(line.contains("cannot resolve app.sluice.test:80"), "{line}");
    assert!(
        line.contains(r#" end="error" side="upstream" "#),
        "the failure is the upstream's: {line}"
    );
    crate::cli::sigterm(&d.child);
    crate::cli::wait_exit(&mut d.child, Duration::from_secs(10));
}
