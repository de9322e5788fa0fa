//! SOCKS5 for `-D` (RFC 1928): version 5, no authentication, CONNECT only. The parsers are
//! pure (fuzzed); `accept` runs them on a socket with a deadline and a size bound.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::spec::Endpoint;

/// How long a SOCKS client gets to say where it goes.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a SOCKS handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocksError {
    /// Not SOCKS version 5 (a browser set to SOCKS4, or HTTP sent to the port).
    #[error("not SOCKS5 (first byte {0:#04x})")]
    Version(u8),
    /// The client offers only authentication methods this proxy lacks.
    #[error("the client offers no method this proxy takes (it takes \"no authentication\")")]
    NoMethod,
    /// BIND or UDP ASSOCIATE.
    #[error("command {0} is not supported (CONNECT only)")]
    Command(u8),
    /// An address type other than IPv4, a domain name or IPv6.
    #[error("address type {0} is not supported")]
    AddressType(u8),
    /// A domain name that is empty or not UTF-8.
    #[error("the domain name is empty or not text")]
    Name,
    /// A reserved byte that is not zero.
    #[error("malformed request")]
    Malformed,
}

impl SocksError {
    /// The reply code that tells the client (RFC 1928 section 6).
    pub fn reply_code(&self) -> u8 {
        match self {
            SocksError::Command(_) => 0x07,
            SocksError::AddressType(_) => 0x08,
            _ => 0x01,
        }
    }
}

/// A greeting: `Ok(None)` until it is complete, then the bytes it took.
pub fn parse_greeting(buf: &[u8]) -> Result<Option<usize>, SocksError> {
    let Some(&v) = buf.first() else {
        return Ok(None);
    };
    if v != 5 {
        return Err(SocksError::Version(v));
    }
    let Some(&n) = buf.get(1) else {
        return Ok(None);
    };
    let end = 2 + usize::from(n);
    let Some(methods) = buf.get(2..end) else {
        return Ok(None);
    };
    if !methods.contains(&0) {
        return Err(SocksError::NoMethod);
    }
    Ok(Some(end))
}

/// A CONNECT request: `Ok(None)` until it is complete, then where to and the bytes it took.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Endpoint, usize)>, SocksError> {
    let Some(head) = buf.get(..4) else {
        if let Some(&v) = buf.first() {
            if v != 5 {
                return Err(SocksError::Version(v));
            }
        }
        return Ok(None);
    };
    if head[0] != 5 {
        return Err(SocksError::Version(head[0]));
    }
    if head[2] != 0 {
        return Err(SocksError::Malformed);
    }
    let (host, at) = match head[3] {
        1 => match buf.get(4..8) {
            Some(a) => (Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string(), 8),
            None => return Ok(None),
        },
        4 => match buf.get(4..20) {
            Some(a) => {
                let mut b = [0u8; 16];
                b.copy_from_slice(a);
                (Ipv6Addr::from(b).to_string(), 20)
            }
            None => return Ok(None),
        },
        3 => {
            let Some(&n) = buf.get(4) else {
                return Ok(None);
            };
            let end = 5 + usize::from(n);
            let Some(name) = buf.get(5..end) else {
                return Ok(None);
            };
            let name = std::str::from_utf8(name).map_err(|_| SocksError::Name)?;
            if name.is_empty() || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(SocksError::Name);
            }
            (name.to_string(), end)
        }
        t => return Err(SocksError::AddressType(t)),
    };
    // The command is checked once the request is whole, so its bytes are all read.
    let Some(p) = buf.get(at..at + 2) else {
        return Ok(None);
    };
    if head[1] != 1 {
        return Err(SocksError::Command(head[1]));
    }
    let port = u16::from_be_bytes([p[0], p[1]]);
    Ok(Some((Endpoint { host, port }, at + 2)))
}

/// A reply with `code` and an unspecified bound address.
pub(super) fn reply(code: u8) -> [u8; 10] {
    [5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// Why `accept` gave up.
#[derive(Debug, thiserror::Error)]
pub(super) enum AcceptError {
    /// The client broke the protocol (it was told, if the protocol has a way).
    #[error(transparent)]
    Socks(#[from] SocksError),
    /// The socket failed or closed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Nothing complete within [`HANDSHAKE_TIMEOUT`].
    #[error("no complete request within {0:?}")]
    Timeout(Duration),
}

/// Reads until `parse` has a whole message; the buffer never grows past 263 bytes (the largest
/// greeting or request).
async fn read_msg<S, T>(
    s: &mut S,
    buf: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> Result<Option<T>, SocksError>,
) -> Result<T, AcceptError>
where
    S: tokio::io::AsyncRead + Unpin,
{
    loop {
        if let Some(t) = parse(buf)? {
            return Ok(t);
        }
        let mut chunk = [0u8; 263];
        let room = 263usize.saturating_sub(buf.len());
        if room == 0 {
            return Err(SocksError::Malformed.into());
        }
        let n = s.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Runs the server side of the handshake up to the CONNECT request; the caller replies with
/// [`reply`] once it knows whether the target answered.
pub(super) async fn accept<S>(s: &mut S) -> Result<Endpoint, AcceptError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let steps = async {
        let mut buf = Vec::with_capacity(263);
        let used = match read_msg(s, &mut buf, parse_greeting).await {
            Err(AcceptError::Socks(SocksError::NoMethod)) => {
                let _ = s.write_all(&[5, 0xff]).await;
                return Err(SocksError::NoMethod.into());
            }
            r => r?,
        };
        buf.drain(..used);
        s.write_all(&[5, 0]).await?;
        match read_msg(s, &mut buf, parse_request).await {
            Ok((to, _)) => Ok(to),
            Err(AcceptError::Socks(e)) => {
                let _ = s.write_all(&reply(e.reply_code())).await;
                Err(e.into())
            }
            Err(e) => Err(e),
        }
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, steps).await {
        Ok(r) => r,
        Err(_) => Err(AcceptError::Timeout(HANDSHAKE_TIMEOUT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings() {
        assert_eq!(parse_greeting(b""), Ok(None));
        assert_eq!(parse_greeting(b"\x05"), Ok(None));
        assert_eq!(parse_greeting(b"\x05\x02\x02"), Ok(None));
        assert_eq!(parse_greeting(b"\x05\x02\x02\x00"), Ok(Some(4)));
        assert_eq!(parse_greeting(b"\x05\x01\x02"), Err(SocksError::NoMethod));
        assert_eq!(parse_greeting(b"\x04\x01"), Err(SocksError::Version(4)));
        assert_eq!(
            parse_greeting(b"GET / HTTP/1.1"),
            Err(SocksError::Version(b'G'))
        );
    }

    #[test]
    fn requests() {
        let ep = |h: &str, p| Endpoint {
            host: h.into(),
            port: p,
        };
        assert_eq!(
            parse_request(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x1f\x90"),
            Ok(Some((ep("127.0.0.1", 8080), 10)))
        );
        let mut name = b"\x05\x01\x00\x03\x0bexample.org\x01\xbb".to_vec();
        assert_eq!(parse_request(&name), Ok(Some((ep("example.org", 443), 18))));
        for cut in 0..name.len() {
            assert_eq!(parse_request(&name[..cut]), Ok(None), "{cut}");
        }
        name[1] = 2;
        assert_eq!(parse_request(&name), Err(SocksError::Command(2)));
        let mut v6 = b"\x05\x01\x00\x04".to_vec();
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0, 22]);
        assert_eq!(parse_request(&v6), Ok(Some((ep("::1", 22), 22))));
        assert_eq!(
            parse_request(b"\x05\x01\x00\x05"),
            Err(SocksError::AddressType(5))
        );
        assert_eq!(
            parse_request(b"\x05\x01\x01\x01"),
            Err(SocksError::Malformed)
        );
        assert_eq!(
            parse_request(b"\x05\x01\x00\x03\x00\x00\x50"),
            Err(SocksError::Name)
        );
        assert_eq!(
            parse_request(b"\x05\x01\x00\x03\x02\xff\xfe\x00\x50"),
            Err(SocksError::Name)
        );
        assert_eq!(parse_request(b"\x04"), Err(SocksError::Version(4)));
        assert_eq!(SocksError::Command(3).reply_code(), 7);
    }
}
