//! The protocol classifier: a pure, incremental decision over the first bytes of a stream.
//!
//! It keeps every protocol whose signature is still consistent with the bytes seen so far and
//! answers as soon as one signature is complete (`Match`) or none is possible (`NoMatch`).
//! Signatures are short (at most [`MAX_SIGNATURE`] bytes), so a decision never needs more.

/// The longest signature the classifier looks at: the HTTP/2 connection preface.
pub const MAX_SIGNATURE: usize = H2_PREFACE.len();

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/1.x request methods, each followed by a space: "GET " is HTTP, "GETX" is not. Besides
/// RFC 9110's and PATCH, those of WebDAV (RFC 4918, 3253, 3648, 3744, 5323), CalDAV (RFC 4791)
/// and binding (RFC 5842), which file-sync and calendar clients send first on a connection.
const HTTP1_METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
    b"PROPFIND ",
    b"PROPPATCH ",
    b"MKCOL ",
    b"COPY ",
    b"MOVE ",
    b"LOCK ",
    b"UNLOCK ",
    b"REPORT ",
    b"MKCALENDAR ",
    b"SEARCH ",
    b"ACL ",
    b"ORDERPATCH ",
    b"BIND ",
    b"UNBIND ",
    b"REBIND ",
    b"VERSION-CONTROL ",
    b"CHECKOUT ",
    b"CHECKIN ",
    b"UNCHECKOUT ",
    b"MKWORKSPACE ",
    b"UPDATE ",
    b"LABEL ",
    b"MERGE ",
    b"BASELINE-CONTROL ",
    b"MKACTIVITY ",
];

/// A protocol the classifier can recognise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// A TLS record carrying a handshake message (`0x16 0x03 0x00..=0x04`).
    Tls,
    /// An SSH identification string (`SSH-`).
    Ssh,
    /// An HTTP/1.x request line (a known method and a space).
    Http1,
    /// The HTTP/2 connection preface (prior knowledge or after ALPN-less TLS).
    Http2,
}

impl Protocol {
    /// A short lowercase name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tls => "tls",
            Protocol::Ssh => "ssh",
            Protocol::Http1 => "http/1",
            Protocol::Http2 => "h2",
        }
    }
}

/// Which protocols a classification may answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidates {
    tls: bool,
    ssh: bool,
    http1: bool,
    http2: bool,
}

impl Candidates {
    /// Before TLS, on the raw TCP stream: a ClientHello, plain SSH or plain HTTP/1.x.
    pub const OUTER: Candidates = Candidates {
        tls: true,
        ssh: true,
        http1: true,
        http2: false,
    };
    /// After TLS, on the decrypted stream: SSH, HTTP/1.x or the HTTP/2 preface.
    pub const INNER: Candidates = Candidates {
        tls: false,
        ssh: true,
        http1: true,
        http2: true,
    };

    fn allows(self, p: Protocol) -> bool {
        match p {
            Protocol::Tls => self.tls,
            Protocol::Ssh => self.ssh,
            Protocol::Http1 => self.http1,
            Protocol::Http2 => self.http2,
        }
    }
}

/// The classifier's answer for a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The prefix is consistent with at least one protocol but completes none yet.
    NeedMore,
    /// The prefix completes this protocol's signature.
    Match(Protocol),
    /// No candidate protocol starts like this.
    NoMatch,
}

/// How a signature compares with a prefix.
enum Fit {
    Complete,
    Partial,
    Mismatch,
}

fn fit(buf: &[u8], sig: &[u8]) -> Fit {
    let n = buf.len().min(sig.len());
    if buf[..n] != sig[..n] {
        Fit::Mismatch
    } else if buf.len() >= sig.len() {
        Fit::Complete
    } else {
        Fit::Partial
    }
}

/// A TLS record header that starts a handshake: content type 22, major version 3, minor 0-4.
fn fit_tls(buf: &[u8]) -> Fit {
    match buf {
        [] => Fit::Partial,
        [0x16] | [0x16, 0x03] => Fit::Partial,
        [0x16, 0x03, minor, ..] if *minor <= 0x04 => Fit::Complete,
        _ => Fit::Mismatch,
    }
}

/// Classifies `buf`, the first bytes of a stream, among `candidates`.
///
/// Pure and incremental: call it again with the longer buffer when more bytes arrive. The
/// answer for a prefix never contradicts the answer for a longer one.
pub fn classify(buf: &[u8], candidates: Candidates) -> Verdict {
    let mut partial = false;
    let mut consider = |p: Protocol, f: Fit| -> Option<Verdict> {
        if !candidates.allows(p) {
            return None;
        }
        match f {
            Fit::Complete => Some(Verdict::Match(p)),
            Fit::Partial => {
                partial = true;
                None
            }
            Fit::Mismatch => None,
        }
    };
    if let Some(v) = consider(Protocol::Tls, fit_tls(buf)) {
        return v;
    }
    if let Some(v) = consider(Protocol::Ssh, fit(buf, b"SSH-")) {
        return v;
    }
    // The h2 preface begins with "PRI ", which no HTTP/1 method in the list begins with.
    if let Some(v) = consider(Protocol::Http2, fit(buf, H2_PREFACE)) {
        return v;
    }
    for m in HTTP1_METHODS {
        if let Some(v) = consider(Protocol::Http1, fit(buf, m)) {
            return v;
        }
    }
    if partial {
        Verdict::NeedMore
    } else {
        Verdict::NoMatch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT_HELLO_START: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];

    /// Every strict prefix of `full` must be `NeedMore` (or, once the signature is complete,
    /// the final answer), and the full sample must be `expect`.
    fn check_all_prefixes(full: &[u8], c: Candidates, expect: Verdict, sig_len: usize) {
        for n in 0..=full.len() {
            let v = classify(&full[..n], c);
            if n < sig_len {
                assert_eq!(
                    v,
                    Verdict::NeedMore,
                    "prefix {:?} of {:?}",
                    &full[..n],
                    full
                );
            } else {
                assert_eq!(v, expect, "prefix {:?} of {:?}", &full[..n], full);
            }
        }
    }

    #[test]
    fn ssh_banner_every_prefix() {
        let b = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n";
        check_all_prefixes(b, Candidates::OUTER, Verdict::Match(Protocol::Ssh), 4);
        check_all_prefixes(b, Candidates::INNER, Verdict::Match(Protocol::Ssh), 4);
    }

    #[test]
    fn http1_methods_every_prefix() {
        for m in HTTP1_METHODS {
            let mut req = m.to_vec();
            req.extend_from_slice(b"/index.html HTTP/1.1\r\nHost: example.com\r\n\r\n");
            let sig = m.len();
            for c in [Candidates::OUTER, Candidates::INNER] {
                for n in 0..=req.len() {
                    let v = classify(&req[..n], c);
                    if n >= sig {
                        assert_eq!(v, Verdict::Match(Protocol::Http1), "{:?}", &req[..n]);
                    } else {
                        assert_eq!(v, Verdict::NeedMore, "{:?}", &req[..n]);
                    }
                }
            }
        }
    }

    #[test]
    fn h2_preface_every_prefix() {
        let mut p = H2_PREFACE.to_vec();
        p.extend_from_slice(&[0, 0, 0x12, 0x04, 0, 0, 0, 0, 0]);
        check_all_prefixes(&p, Candidates::INNER, Verdict::Match(Protocol::Http2), 24);
        // Before TLS the preface is not a candidate: "PRI" starts no HTTP/1 method ("PR"
        // may still be PROPFIND).
        assert_eq!(classify(b"P", Candidates::OUTER), Verdict::NeedMore);
        assert_eq!(classify(b"PR", Candidates::OUTER), Verdict::NeedMore);
        assert_eq!(classify(b"PRI", Candidates::OUTER), Verdict::NoMatch);
    }

    #[test]
    fn client_hello_every_prefix() {
        check_all_prefixes(
            CLIENT_HELLO_START,
            Candidates::OUTER,
            Verdict::Match(Protocol::Tls),
            3,
        );
        for minor in 0..=4u8 {
            assert_eq!(
                classify(&[0x16, 3, minor], Candidates::OUTER),
                Verdict::Match(Protocol::Tls)
            );
        }
        assert_eq!(classify(&[0x16, 3, 5], Candidates::OUTER), Verdict::NoMatch);
        assert_eq!(classify(&[0x16, 2], Candidates::OUTER), Verdict::NoMatch);
        // TLS inside TLS is not routed.
        assert_eq!(classify(&[0x16], Candidates::INNER), Verdict::NoMatch);
    }

    #[test]
    fn webdav_and_caldav_requests_are_http() {
        for req in [
            &b"PROPFIND /dav/ HTTP/1.1\r\nDepth: 1\r\n"[..],
            b"PROPPATCH /dav/a HTTP/1.1\r\n",
            b"MKCOL /dav/new/ HTTP/1.1\r\n",
            b"COPY /a HTTP/1.1\r\n",
            b"MOVE /a HTTP/1.1\r\n",
            b"LOCK /a HTTP/1.1\r\n",
            b"UNLOCK /a HTTP/1.1\r\n",
            b"REPORT /cal/ HTTP/1.1\r\n",
            b"MKCALENDAR /cal/home/ HTTP/1.1\r\n",
            b"SEARCH / HTTP/1.1\r\n",
            b"ACL /a HTTP/1.1\r\n",
        ] {
            for c in [Candidates::OUTER, Candidates::INNER] {
                assert_eq!(
                    classify(req, c),
                    Verdict::Match(Protocol::Http1),
                    "{}",
                    String::from_utf8_lossy(req)
                );
            }
        }
        // Still decided at the first impossible byte.
        assert_eq!(classify(b"PROPX", Candidates::INNER), Verdict::NoMatch);
        assert_eq!(
            classify(b"MKCALENDAR", Candidates::INNER),
            Verdict::NeedMore
        );
    }

    #[test]
    fn decides_at_first_impossible_byte() {
        assert_eq!(classify(b"", Candidates::OUTER), Verdict::NeedMore);
        assert_eq!(classify(b"X", Candidates::OUTER), Verdict::NoMatch);
        assert_eq!(classify(b"SSX", Candidates::OUTER), Verdict::NoMatch);
        assert_eq!(classify(b"GETX", Candidates::INNER), Verdict::NoMatch);
        assert_eq!(classify(b"get ", Candidates::INNER), Verdict::NoMatch);
        assert_eq!(classify(b"\r\n", Candidates::INNER), Verdict::NoMatch);
        // "P" could still be POST, PUT, PATCH, PROPFIND, PROPPATCH or the h2 preface.
        assert_eq!(classify(b"P", Candidates::INNER), Verdict::NeedMore);
        assert_eq!(classify(b"PU", Candidates::INNER), Verdict::NeedMore);
        assert_eq!(classify(b"PX", Candidates::INNER), Verdict::NoMatch);
        // sslh's rule of "HTTP anywhere" is not ours.
        assert_eq!(classify(b"xxHTTP/1.1", Candidates::INNER), Verdict::NoMatch);
    }

    #[test]
    fn monotonic_over_random_inputs() {
        // A longer prefix never turns a Match or NoMatch into something else.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"SH-GETPOSUIR *\x16\x03\x01\r\nACD";
        for _ in 0..20_000 {
            let len = (next() % 30) as usize;
            let buf: Vec<u8> = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            for c in [Candidates::OUTER, Candidates::INNER] {
                let mut settled = None;
                for n in 0..=buf.len() {
                    let v = classify(&buf[..n], c);
                    if let Some(s) = settled {
                        assert_eq!(v, s, "{:?}", &buf[..n]);
                    } else if v != Verdict::NeedMore {
                        settled = Some(v);
                    }
                }
                if buf.len() >= MAX_SIGNATURE {
                    assert_ne!(classify(&buf, c), Verdict::NeedMore);
                }
            }
        }
    }
}
