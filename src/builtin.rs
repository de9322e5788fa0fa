//! sluice's own small HTTP/1.1 answers: the status page (http route without upstream), the
//! redirect to https (plaintext policy `redirect`) and a 502 when the upstream is down.
//! Each reads at most one bounded request head and answers; the caller closes.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

/// The largest request head read before answering.
pub const MAX_HEAD: usize = 16 * 1024;

/// Reads up to the end of the request head (`\r\n\r\n`), starting from `prefix`.
pub async fn read_head<S: AsyncRead + Unpin>(
    s: &mut S,
    prefix: &[u8],
    deadline: Instant,
) -> io::Result<Vec<u8>> {
    let mut head = prefix.to_vec();
    let len = read_until_head(s, &mut head, deadline).await?;
    head.truncate(len);
    Ok(head)
}

/// Reads into `buf` until it holds a whole request head; returns the head's length. Bytes
/// read past the head (a body, a pipelined request) stay in `buf`.
pub async fn read_until_head<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> io::Result<usize> {
    let head = buf;
    // On the heap: an array here would enlarge every connection task for its whole life.
    let mut chunk = vec![0u8; 2048];
    // Where the search resumes: bytes before it were searched already (less the 3 that may
    // begin a terminator split across reads), so a head sent byte by byte costs linear time.
    let mut searched = 0;
    loop {
        if let Some(end) = find(&head[searched..], b"\r\n\r\n") {
            return Ok(searched + end + 4);
        }
        searched = head.len().saturating_sub(3);
        if head.len() >= MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let n = timeout_at(deadline, s.read(&mut chunk))
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "request head not complete in time")
            })??;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed before the request head ended",
            ));
        }
        head.extend_from_slice(&chunk[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The method and request target of a request head.
pub fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    Some((method, target))
}

/// The value of the first header named `name` (case-insensitive).
pub fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(head).ok()?;
    text.split("\r\n").skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The https URL for a plain HTTP request, if its Host and target are sane.
pub fn https_location(head: &[u8]) -> Option<String> {
    let (_, target) = request_line(head)?;
    let host = header(head, "host")?;
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    let target_ok = target.starts_with('/') && target.bytes().all(|b| b.is_ascii_graphic());
    (host_ok && target_ok).then(|| format!("https://{host}{target}"))
}

/// The content type of sluice's own answers.
pub const TEXT: &str = "text/plain; charset=utf-8";

/// Writes one complete answer (`extra`: more header lines, each ending in CRLF); with
/// `head_only`, the headers alone (an answer to HEAD).
pub async fn respond<S: AsyncWrite + Unpin>(
    s: &mut S,
    status: &str,
    content_type: &str,
    extra: &str,
    body: &str,
    head_only: bool,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nServer: sluice\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n{extra}\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    s.write_all(out.as_bytes()).await?;
    s.flush().await
}

/// Answers one request with the status page.
pub async fn status_page<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    prefix: &[u8],
    deadline: Instant,
) -> io::Result<()> {
    let head = read_head(s, prefix, deadline).await?;
    let head_only = request_line(&head).is_some_and(|(m, _)| m == "HEAD");
    let body = concat!(
        "sluice ",
        env!("CARGO_PKG_VERSION"),
        "\nThis port carries HTTPS and SSH over one TLS listener.\nNo HTTP upstream is configured: set [routes.http] upstream.\n"
    );
    respond(s, "200 OK", TEXT, "", body, head_only).await
}

/// Answers one plain HTTP request with a 308 to the same URL over https.
pub async fn redirect<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    prefix: &[u8],
    deadline: Instant,
) -> io::Result<()> {
    let head = read_head(s, prefix, deadline).await?;
    match https_location(&head) {
        Some(loc) => {
            respond(
                s,
                "308 Permanent Redirect",
                TEXT,
                &format!("Location: {loc}\r\n"),
                &format!("{loc}\n"),
                false,
            )
            .await
        }
        None => {
            respond(
                s,
                "400 Bad Request",
                TEXT,
                "",
                "a Host header is needed to redirect to https\n",
                false,
            )
            .await
        }
    }
}

/// Tells an HTTP client that the upstream could not be reached, then closes.
pub async fn bad_gateway<S: AsyncWrite + Unpin>(s: &mut S) -> io::Result<()> {
    respond(
        s,
        "502 Bad Gateway",
        TEXT,
        "",
        "the upstream HTTP server is not reachable\n",
        false,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_from_head() {
        let h = b"GET /a/b?c=d HTTP/1.1\r\nHost: example.com:8443\r\nAccept: */*\r\n\r\n";
        assert_eq!(
            https_location(h).as_deref(),
            Some("https://example.com:8443/a/b?c=d")
        );
        let h = b"GET /x HTTP/1.1\r\nhost: [::1]:8443\r\n\r\n";
        assert_eq!(https_location(h).as_deref(), Some("https://[::1]:8443/x"));
        assert_eq!(https_location(b"GET /x HTTP/1.0\r\n\r\n"), None);
        assert_eq!(
            https_location(b"GET /x HTTP/1.1\r\nHost: evil\r\n\x0d\nLocation: x\r\n\r\n")
                .as_deref(),
            Some("https://evil/x")
        );
        assert_eq!(
            https_location(b"GET /x HTTP/1.1\r\nHost: a b\r\n\r\n"),
            None
        );
        assert_eq!(
            https_location(b"GET http://x/ HTTP/1.1\r\nHost: a\r\n\r\n"),
            None
        );
    }

    #[tokio::test]
    async fn head_is_bounded() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let junk = vec![b'a'; MAX_HEAD + 10];
        b.write_all(&junk).await.unwrap();
        let e = read_head(
            &mut a,
            b"GET / HTTP/1.1\r\n",
            Instant::now() + std::time::Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_terminator_split_across_reads_is_found() {
        // One byte per read: every split of "\r\n\r\n" between reads, and what follows
        // the head is not part of it.
        let (mut a, mut b) = tokio::io::duplex(1);
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nBODY".to_vec();
        let writer = tokio::spawn(async move { b.write_all(&req).await });
        let head = read_head(
            &mut a,
            b"",
            Instant::now() + std::time::Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(head, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        drop(a);
        let _ = writer.await;
        // A terminator that ends in the prefix, or straddles the prefix and the first read.
        for (prefix, rest) in [
            (&b"GET / HTTP/1.1\r\n\r\n"[..], &b""[..]),
            (b"GET / HTTP/1.1\r\n\r", b"\nX"),
        ] {
            let (mut a, mut b) = tokio::io::duplex(64);
            b.write_all(rest).await.unwrap();
            let head = read_head(
                &mut a,
                prefix,
                Instant::now() + std::time::Duration::from_secs(5),
            )
            .await
            .unwrap();
            assert_eq!(head, b"GET / HTTP/1.1\r\n\r\n");
        }
    }
}
