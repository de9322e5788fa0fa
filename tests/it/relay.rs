use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const BIG: usize = 64 << 20;

/// An upstream that sends `BIG` bytes of pattern 2 while hashing everything it receives.
async fn hashing_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(usize, Vec<u8>)>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = serve_upstream(move |s| {
        let tx = tx.clone();
        async move {
            let (mut r, mut w) = s.into_split();
            let send = tokio::spawn(async move {
                w.write_all(&pattern(2, BIG)).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut got = Vec::with_capacity(BIG);
            r.read_to_end(&mut got).await.unwrap();
            send.await.unwrap();
            tx.send((got.len(), sha256(&got))).unwrap();
        }
    })
    .await;
    (addr, rx)
}

#[tokio::test]
async fn sixty_four_mib_each_way_over_tls() {
    let cert = TestCert::localhost();
    let (up, mut rx) = hashing_upstream().await;
    let d = Daemon::start(&cert, &format!("[routes.http]\nupstream = \"{up}\"\n")).await;
    let tls = tls_connect(d.addr, &cert, "localhost", &["http/1.1"]).await;
    let sent = pattern(1, BIG);
    let got = tokio::time::timeout(Duration::from_secs(120), exchange(tls, &sent))
        .await
        .expect("64 MiB each way in 2 minutes");
    assert_eq!(got.len(), BIG);
    assert_eq!(
        sha256(&got),
        sha256(&pattern(2, BIG)),
        "upstream -> client intact"
    );
    let (n, h) = rx.recv().await.unwrap();
    assert_eq!((n, h), (BIG, sha256(&sent)), "client -> upstream intact");
    d.stop().await;
}

#[tokio::test]
async fn sixty_four_mib_each_way_plaintext() {
    let cert = TestCert::localhost();
    let (up, mut rx) = hashing_upstream().await;
    let d = Daemon::start(&cert, &format!("[routes.ssh]\nupstream = \"{up}\"\n")).await;
    let mut s = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    let mut sent = b"SSH-2.0-bulk\r\n".to_vec();
    sent.extend_from_slice(&pattern(3, BIG - sent.len()));
    s.write_all(&sent[..4]).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(120), exchange(s, &sent[4..]))
        .await
        .unwrap();
    assert_eq!(sha256(&got), sha256(&pattern(2, BIG)));
    let (n, h) = rx.recv().await.unwrap();
    assert_eq!((n, h), (BIG, sha256(&sent)));
    d.stop().await;
}

/// An upstream that reads to EOF, then replies with how many bytes it got.
async fn reply_after_eof_upstream() -> std::net::SocketAddr {
    serve_upstream(|mut s| async move {
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(format!("got {} bytes after EOF", got.len()).as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn half_close_tls_client() {
    let cert = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &format!(
            "[routes.http]\nupstream = \"{}\"\n",
            reply_after_eof_upstream().await
        ),
    )
    .await;
    let mut tls = tls_connect(d.addr, &cert, "localhost", &["http/1.1"]).await;
    tls.write_all(b"0123456789").await.unwrap();
    // close_notify + FIN on our write side; the reply must still arrive.
    tls.shutdown().await.unwrap();
    assert_eq!(read_all(&mut tls).await, b"got 10 bytes after EOF");
    d.stop().await;
}

#[tokio::test]
async fn half_close_without_close_notify_counts_as_eof() {
    let cert = TestCert::localhost();
    let d = Daemon::start(
        &cert,
        &format!(
            "[routes.http]\nupstream = \"{}\"\n",
            reply_after_eof_upstream().await
        ),
    )
    .await;
    let mut tls = tls_connect(d.addr, &cert, "localhost", &["http/1.1"]).await;
    tls.write_all(b"abc").await.unwrap();
    tls.flush().await.unwrap();
    // FIN without close_notify, as curl and browsers do.
    socket2::SockRef::from(tls.get_ref().0)
        .shutdown(std::net::Shutdown::Write)
        .unwrap();
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out))
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out),
        "got 3 bytes after EOF",
        "{r:?}"
    );
    d.stop().await;
}

#[tokio::test]
async fn half_close_from_upstream() {
    // The upstream speaks first and closes its side; the client can still send afterwards.
    let cert = TestCert::localhost();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let up = serve_upstream(move |s| {
        let tx = tx.clone();
        async move {
            let (mut r, mut w) = s.into_split();
            w.write_all(b"SSH-2.0-bye\r\n").await.unwrap();
            w.shutdown().await.unwrap();
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            tx.send(got).unwrap();
        }
    })
    .await;
    let d = Daemon::start(&cert, &format!("[routes.ssh]\nupstream = \"{up}\"\n")).await;
    let mut tls = tls_connect(d.addr, &cert, "localhost", &["ssh"]).await;
    assert_eq!(read_all(&mut tls).await, b"SSH-2.0-bye\r\n");
    tls.write_all(b"late words").await.unwrap();
    tls.shutdown().await.unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap(),
        b"late words"
    );
    d.stop().await;
}

#[tokio::test]
async fn client_drops_without_close_notify_after_receiving_everything() {
    let cert = TestCert::localhost();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let up = serve_upstream(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut b = [0u8; 64];
            let n = s.read(&mut b).await.unwrap();
            s.write_all(&pattern(5, 1 << 20)).await.unwrap();
            // Then wait for the client's end: a clean EOF, not a reset.
            let mut rest = Vec::new();
            let r = s.read_to_end(&mut rest).await.map(|_| n);
            tx.send(r.map_err(|e| e.kind())).unwrap();
        }
    })
    .await;
    let d = Daemon::start(&cert, &format!("[routes.http]\nupstream = \"{up}\"\n")).await;
    let mut tls = tls_connect(d.addr, &cert, "localhost", &["http/1.1"]).await;
    tls.write_all(b"GET /big HTTP/1.1\r\n\r\n").await.unwrap();
    tls.flush().await.unwrap();
    assert_eq!(read_n(&mut tls, 1 << 20).await, pattern(5, 1 << 20));
    let (tcp, _) = tls.into_inner();
    drop(tcp);
    let r = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(r.is_ok(), "the upstream saw {r:?} instead of a clean EOF");
    // And the daemon serves the next client.
    let tls = tls_connect(d.addr, &cert, "localhost", &["http/1.1"]).await;
    drop(tls);
    d.stop().await;
}

#[tokio::test]
async fn idle_timeout_closes_both_sides() {
    let cert = TestCert::localhost();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let up = serve_upstream(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            tx.send(rest).unwrap();
        }
    })
    .await;
    let d = Daemon::start(
        &cert,
        &format!("[routes.ssh]\nupstream = \"{up}\"\nidle_timeout = \"500ms\"\n"),
    )
    .await;
    let mut tls = tls_connect(d.addr, &cert, "localhost", &["ssh"]).await;
    tls.write_all(b"hello").await.unwrap();
    tls.flush().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("idle connection closed")
        .unwrap();
    assert_eq!(got, b"hello");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out))
        .await
        .expect("client side closed too");
    d.stop().await;
}

#[tokio::test]
async fn upstream_refusing_an_upload_still_gets_its_answer_through() {
    let cert = TestCert::localhost();
    let up = serve_upstream(|mut s| async move {
        let mut b = [0u8; 4096];
        let _ = s.read(&mut b).await;
        // Answer early and close with the upload unread (the kernel sends a reset).
        s.write_all(b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        drop(s);
    })
    .await;
    let d = Daemon::start(&cert, &format!("[routes.http]\nupstream = \"{up}\"\n")).await;
    let tls = tls_connect(d.addr, &cert, "localhost", &["http/1.1"]).await;
    let (mut r, mut w) = tokio::io::split(tls);
    let upload = tokio::spawn(async move {
        let _ = w
            .write_all(b"POST /up HTTP/1.1\r\nContent-Length: 67108864\r\n\r\n")
            .await;
        let _ = w.write_all(&vec![0u8; 64 << 20]).await;
        w
    });
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut reply))
        .await
        .expect("reply in time");
    assert!(
        reply.starts_with(b"HTTP/1.1 413 "),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
    upload.abort();
    d.stop().await;
}

#[tokio::test]
async fn plain_legs_splice_and_fall_back_to_copy_when_pipes_run_out() {
    let cert = TestCert::localhost();
    let (up, mut rx) = {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let addr = serve_upstream(move |s| {
            let tx = tx.clone();
            async move {
                let (mut r, mut w) = s.into_split();
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap();
                // Half-close carried: the reply goes out after the client's EOF.
                w.write_all(&pattern(got.len() as u64, 4 << 20))
                    .await
                    .unwrap();
                w.shutdown().await.unwrap();
                tx.send(sha256(&got)).unwrap();
            }
        })
        .await;
        (addr, rx)
    };
    // Two pipes: one connection splices, the others must fall back to the copy relay.
    let d = Daemon::start(
        &cert,
        &format!("[limits]\nsplice_pipes = 2\n[routes.ssh]\nupstream = \"{up}\"\n"),
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..3u64 {
        let addr = d.addr;
        tasks.push(tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut sent = b"SSH-2.0-bulk\r\n".to_vec();
            sent.extend_from_slice(&pattern(100 + i, 4 << 20));
            let got = exchange(s, &sent).await;
            (sha256(&sent), sent.len(), got)
        }));
    }
    let mut sent_hashes = Vec::new();
    for t in tasks {
        let (sent_hash, sent_len, got) = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            sha256(&got),
            sha256(&pattern(sent_len as u64, 4 << 20)),
            "reply after EOF intact"
        );
        sent_hashes.push(sent_hash);
    }
    let mut received = Vec::new();
    for _ in 0..3 {
        received.push(rx.recv().await.unwrap());
    }
    sent_hashes.sort();
    received.sort();
    assert_eq!(
        received, sent_hashes,
        "every upload intact, spliced or copied"
    );
    d.stop().await;
}
