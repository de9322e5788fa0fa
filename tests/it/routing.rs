use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

fn routes(http: std::net::SocketAddr, ssh: std::net::SocketAddr, detect: &str) -> String {
    format!("[detect]\n{detect}\n[routes.http]\nupstream = \"{http}\"\n[routes.ssh]\nupstream = \"{ssh}\"\n")
}

#[tokio::test]
async fn alpn_ssh_routes_without_waiting() {
    let cert = TestCert::localhost();
    // A detection timeout far longer than the read timeout: only ALPN can route this in time.
    let d = Daemon::start(
        &cert,
        &routes(
            echo_upstream().await,
            banner_upstream().await,
            "timeout = \"60s\"",
        ),
    )
    .await;
    let mut tls = tls_connect(d.addr, &cert, "localhost", &["ssh"]).await;
    assert_eq!(read_n(&mut tls, BANNER.len()).await, BANNER);
    d.stop().await;
}

#[tokio::test]
async fn alpn_http_routes_to_http_upstream() {
    let cert = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &routes(
            echo_upstream().await,
            banner_upstream().await,
            "timeout = \"60s\"",
        ),
    )
    .await;
    let tls = tls_connect(d.addr, &cert, "localhost", &["http/1.1"]).await;
    // The echo upstream returns exactly what it got: even bytes that are not HTTP, since ALPN decided.
    assert_eq!(exchange(tls, b"not even http").await, b"not even http");
    d.stop().await;
}

#[tokio::test]
async fn peek_routes_ssh_and_http_and_replays_bytes() {
    let cert = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &routes(
            echo_upstream().await,
            banner_upstream().await,
            "timeout = \"60s\"",
        ),
    )
    .await;

    let tls = tls_connect(d.addr, &cert, "localhost", &[]).await;
    let req = b"GET /index.html HTTP/1.1\r\nHost: localhost\r\n\r\n";
    assert_eq!(
        exchange(tls, req).await,
        req,
        "the peeked request reaches the upstream intact"
    );

    // The SSH banner in two pieces: the classifier waits for "SSH-", then routes; no byte lost.
    let mut tls = tls_connect(d.addr, &cert, "localhost", &[]).await;
    tls.write_all(b"SS").await.unwrap();
    tls.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    tls.write_all(b"H-2.0-test\r\n").await.unwrap();
    tls.flush().await.unwrap();
    let got = read_n(&mut tls, BANNER.len() + 14).await;
    assert_eq!(&got[..BANNER.len()], BANNER);
    assert_eq!(&got[BANNER.len()..], b"SSH-2.0-test\r\n");
    d.stop().await;
}

#[tokio::test]
async fn silent_client_routed_at_timeout() {
    let cert = TestCert::localhost();
    let timeout = Duration::from_millis(800);
    let d = Daemon::start(
        &cert,
        &routes(
            echo_upstream().await,
            banner_upstream().await,
            "timeout = \"800ms\"\non_timeout = \"ssh\"",
        ),
    )
    .await;
    let mut tls = tls_connect(d.addr, &cert, "localhost", &[]).await;
    let t0 = Instant::now();
    assert_eq!(read_n(&mut tls, BANNER.len()).await, BANNER);
    let waited = t0.elapsed();
    assert!(
        waited >= timeout - Duration::from_millis(20),
        "routed before the timeout: {waited:?}"
    );
    assert!(
        waited < timeout + Duration::from_millis(700),
        "routed long after the timeout: {waited:?}"
    );
    d.stop().await;
}

#[tokio::test]
async fn on_timeout_close_and_on_unknown_route() {
    let cert = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &routes(
            echo_upstream().await,
            banner_upstream().await,
            "timeout = \"300ms\"\non_timeout = \"close\"\non_unknown = \"http\"",
        ),
    )
    .await;
    let mut tls = tls_connect(d.addr, &cert, "localhost", &[]).await;
    assert_eq!(
        read_all(&mut tls).await,
        b"",
        "a silent client is closed when on_timeout = close"
    );
    let tls = tls_connect(d.addr, &cert, "localhost", &[]).await;
    assert_eq!(
        exchange(tls, b"\x00\x01binary junk").await,
        b"\x00\x01binary junk",
        "unknown bytes go to on_unknown, intact"
    );
    d.stop().await;
}

#[tokio::test]
async fn unknown_bytes_closed_by_default() {
    let cert = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &routes(
            echo_upstream().await,
            banner_upstream().await,
            "timeout = \"5s\"",
        ),
    )
    .await;
    let tls = tls_connect(d.addr, &cert, "localhost", &[]).await;
    assert_eq!(exchange(tls, b"HELLO? anyone").await, b"");
    d.stop().await;
}

#[tokio::test]
async fn sni_binds_route_and_selects_certificate() {
    let cert = TestCert::localhost();
    let other = TestCert::new(&["ssh.test"]);
    let extra = format!(
        "[[tls.sni]]\nnames = [\"ssh.test\"]\ncert = \"{}\"\nkey = \"{}\"\n{}",
        other.cert.display(),
        other.key.display(),
        routes(
            echo_upstream().await,
            banner_upstream().await,
            "timeout = \"60s\""
        )
        .replace("[routes.ssh]\n", "[routes.ssh]\nsni = [\"ssh.test\"]\n")
    );
    let d = Daemon::start(&cert, &extra).await;
    // Verified against the second certificate only: the right one was served.
    let mut tls = tls_connect(d.addr, &other, "ssh.test", &[]).await;
    assert_eq!(tls.get_ref().1.peer_certificates().unwrap()[0], other.der);
    assert_eq!(
        read_n(&mut tls, BANNER.len()).await,
        BANNER,
        "SNI routed to ssh without waiting"
    );
    // The default name still gets the default certificate and the peek.
    let tls = tls_connect(d.addr, &cert, "localhost", &[]).await;
    assert_eq!(tls.get_ref().1.peer_certificates().unwrap()[0], cert.der);
    d.stop().await;
}

#[tokio::test]
async fn plain_ssh_and_plain_http_on_the_same_port() {
    let cert = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &routes(
            http_upstream().await,
            banner_upstream().await,
            "timeout = \"60s\"",
        ),
    )
    .await;
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    s.write_all(b"SSH-2.0-plain\r\n").await.unwrap();
    let got = read_n(&mut s, BANNER.len() + 15).await;
    assert_eq!(&got[..BANNER.len()], BANNER);
    assert_eq!(&got[BANNER.len()..], b"SSH-2.0-plain\r\n");

    let mut s = TcpStream::connect(d.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let reply = String::from_utf8(read_all(&mut s).await).unwrap();
    assert!(reply.contains("hello-from-upstream"), "{reply}");
    d.stop().await;
}

#[tokio::test]
async fn plain_silent_client_goes_to_on_timeout() {
    let cert = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &routes(
            http_upstream().await,
            banner_upstream().await,
            "timeout = \"300ms\"",
        ),
    )
    .await;
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    assert_eq!(read_n(&mut s, BANNER.len()).await, BANNER);
    d.stop().await;
}

#[tokio::test]
async fn plaintext_redirect_and_reject() {
    let cert = TestCert::localhost();
    let extra = format!(
        "[routes.http]\nupstream = \"{}\"\nplaintext = \"redirect\"\n[routes.ssh]\nupstream = \"{}\"\nplaintext = \"reject\"\n",
        http_upstream().await,
        banner_upstream().await
    );
    let d = Daemon::start(&cert, &extra).await;
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    s.write_all(b"GET /a?b=c HTTP/1.1\r\nHost: localhost:8443\r\n\r\n")
        .await
        .unwrap();
    let reply = String::from_utf8(read_all(&mut s).await).unwrap();
    assert!(reply.starts_with("HTTP/1.1 308 "), "{reply}");
    assert!(
        reply.contains("\r\nLocation: https://localhost:8443/a?b=c\r\n"),
        "{reply}"
    );

    let mut s = TcpStream::connect(d.addr).await.unwrap();
    s.write_all(b"SSH-2.0-plain\r\n").await.unwrap();
    assert_eq!(read_all(&mut s).await, b"", "plain SSH refused");
    // TLS still reaches both routes.
    let mut tls = tls_connect(d.addr, &cert, "localhost", &["ssh"]).await;
    assert_eq!(read_n(&mut tls, BANNER.len()).await, BANNER);
    d.stop().await;
}

#[tokio::test]
async fn proxy_v2_header_carries_the_client_address() {
    let cert = TestCert::localhost();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let up = serve_upstream(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut buf = vec![0u8; 28];
            s.read_exact(&mut buf).await.unwrap();
            let h = sluice::proxy_protocol::decode_v2(&buf).expect("a PROXY v2 header first");
            let mut rest = vec![0u8; 6];
            s.read_exact(&mut rest).await.unwrap();
            tx.send((h, rest)).unwrap();
            let _ = s.write_all(b"ok").await;
        }
    })
    .await;
    let extra = format!("[routes.http]\nupstream = \"{up}\"\nproxy_protocol = \"v2\"\n");
    let d = Daemon::start(&cert, &extra).await;
    let mut tls = tls_connect(d.addr, &cert, "localhost", &["http/1.1"]).await;
    let client_addr = tls.get_ref().0.local_addr().unwrap();
    tls.write_all(b"GET / ").await.unwrap();
    tls.flush().await.unwrap();
    assert_eq!(read_n(&mut tls, 2).await, b"ok");
    let (h, rest) = rx.recv().await.unwrap();
    assert_eq!(h.src, client_addr, "the real client address");
    assert_eq!(h.dst, d.addr);
    assert_eq!(rest, b"GET / ");
    d.stop().await;
}

#[tokio::test]
async fn proxy_v1_header_before_plain_ssh() {
    let cert = TestCert::localhost();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let up = serve_upstream(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut got = Vec::new();
            let mut b = [0u8; 256];
            while !got.ends_with(b"SSH-2.0-x\r\n") {
                let n = s.read(&mut b).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&b[..n]);
            }
            tx.send(got).unwrap();
        }
    })
    .await;
    let d = Daemon::start(
        &cert,
        &format!("[routes.ssh]\nupstream = \"{up}\"\nproxy_protocol = \"v1\"\n"),
    )
    .await;
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    let me = s.local_addr().unwrap();
    s.write_all(b"SSH-2.0-x\r\n").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let want = format!(
        "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\nSSH-2.0-x\r\n",
        me.port(),
        d.addr.port()
    );
    assert_eq!(String::from_utf8(got).unwrap(), want);
    d.stop().await;
}

#[tokio::test]
async fn status_page_without_http_upstream() {
    let cert = TestCert::localhost();
    let d = Daemon::start(&cert, "").await;
    let mut tls = tls_connect(d.addr, &cert, "localhost", &["http/1.1"]).await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let reply = String::from_utf8(read_all(&mut tls).await).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.contains("sluice"), "{reply}");
    d.stop().await;
}

#[tokio::test]
async fn listens_on_ipv6_and_ipv4() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        panic!("this test needs IPv6 on loopback (::1)");
    }
    let cert = TestCert::new(&["localhost"]);
    let up = banner_upstream().await;
    let text = format!(
        "listen = [\"127.0.0.1:0\", \"[::1]:0\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[routes.ssh]\nupstream = \"{up}\"\n",
        cert.cert.display(),
        cert.key.display()
    );
    let d = Daemon::start_raw(&text).await;
    assert_eq!(d.addrs.len(), 2);
    for a in d.addrs.clone() {
        let mut tls = tls_connect(a, &cert, "localhost", &["ssh"]).await;
        assert_eq!(read_n(&mut tls, BANNER.len()).await, BANNER, "via {a}");
    }
    d.stop().await;
}

#[tokio::test]
async fn h2_preface_routed_only_when_the_upstream_speaks_h2() {
    let cert = TestCert::localhost();
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let up = echo_upstream().await;
    let d = Daemon::start(
        &cert,
        &format!("[routes.http]\nupstream = \"{up}\"\nh2 = true\n"),
    )
    .await;
    let tls = tls_connect(d.addr, &cert, "localhost", &[]).await;
    assert_eq!(exchange(tls, preface).await, preface);
    // With ALPN: h2 is offered and chosen.
    let tls = tls_connect(d.addr, &cert, "localhost", &["h2", "http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    d.stop().await;

    let d = Daemon::start(&cert, &format!("[routes.http]\nupstream = \"{up}\"\n")).await;
    let tls = tls_connect(d.addr, &cert, "localhost", &[]).await;
    assert_eq!(
        exchange(tls, preface).await,
        b"",
        "no h2 upstream: the preface is unknown and closed"
    );
    let tls = tls_connect(d.addr, &cert, "localhost", &["h2", "http/1.1"]).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "h2 is not offered"
    );
    d.stop().await;
}

#[tokio::test]
async fn client_alpn_matching_none_of_ours_falls_back_to_the_bytes() {
    let cert = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &routes(
            echo_upstream().await,
            banner_upstream().await,
            "timeout = \"60s\"",
        ),
    )
    .await;
    // Offers only h2 (not enabled) and a private id: no handshake failure, no ALPN chosen.
    let tls = tls_connect(d.addr, &cert, "localhost", &["h2", "x-custom"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    let req = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
    assert_eq!(exchange(tls, req).await, req);
    d.stop().await;
}
