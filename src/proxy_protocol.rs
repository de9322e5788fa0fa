//! PROXY protocol headers (HAProxy's spec, versions 1 and 2): encoding for upstreams,
//! decoding from trusted load balancers. Pure, no I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature that opens every version 2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Which PROXY protocol version to send to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum ProxyVersion {
    /// The text form: `PROXY TCP4 1.2.3.4 5.6.7.8 1234 443\r\n`.
    #[serde(rename = "v1")]
    V1,
    /// The binary form.
    #[serde(rename = "v2")]
    V2,
}

impl ProxyVersion {
    /// The name used in the config file and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyVersion::V1 => "v1",
            ProxyVersion::V2 => "v2",
        }
    }
}

/// Appends a PROXY header for a TCP connection from `src` (the client) to `dst` (the address
/// the client connected to) onto `out`.
pub fn encode(version: ProxyVersion, src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) {
    // A v4-mapped v6 address is a v4 client on a dual-stack socket: say so plainly.
    let (src_ip, dst_ip) = (unmap(src.ip()), unmap(dst.ip()));
    match version {
        ProxyVersion::V1 => encode_v1(src_ip, dst_ip, src.port(), dst.port(), out),
        ProxyVersion::V2 => encode_v2(src_ip, dst_ip, src.port(), dst.port(), out),
    }
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn encode_v1(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, out: &mut Vec<u8>) {
    use std::io::Write;
    let line = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => format!("PROXY TCP4 {s} {d} {sport} {dport}\r\n"),
        (s, d) => format!("PROXY TCP6 {} {} {sport} {dport}\r\n", to_v6(s), to_v6(d)),
    };
    let _ = out.write_all(line.as_bytes());
}

fn encode_v2(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21); // version 2, command PROXY
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11); // AF_INET, STREAM
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push(0x21); // AF_INET6, STREAM
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&to_v6(s).octets());
            out.extend_from_slice(&to_v6(d).octets());
        }
    }
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
}

/// A decoded version 2 header with addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodedV2 {
    /// The client address the header carries.
    pub src: SocketAddr,
    /// The destination address the header carries.
    pub dst: SocketAddr,
    /// Total header length in bytes.
    pub len: usize,
}

/// Decodes a version 2 PROXY/TCP header at the start of `buf`; `None` if it is not one, is
/// incomplete or carries no addresses.
pub fn decode_v2(buf: &[u8]) -> Option<DecodedV2> {
    if !buf.starts_with(&V2_SIGNATURE) {
        return None;
    }
    match decode(buf) {
        Ok(Decoded::Header {
            addrs: Some((src, dst)),
            len,
        }) => Some(DecodedV2 { src, dst, len }),
        _ => None,
    }
}

/// The longest header accepted: a v1 line is at most 107 bytes; v2 addresses plus the TLVs
/// load balancers add (AWS, GCP, Azure) fit well within this.
pub const MAX_HEADER: usize = 16 + 1024;

/// What the first bytes of a connection from a trusted proxy are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// Too few bytes to tell yet.
    Incomplete,
    /// Not a PROXY header: the client's own bytes.
    NotProxy,
    /// A header of `len` bytes. `addrs` is (client, address it connected to), or `None` for
    /// a `LOCAL`/`UNKNOWN` header (the proxy's own health check): use the socket's addresses.
    Header {
        /// Source and destination carried by the header.
        addrs: Option<(SocketAddr, SocketAddr)>,
        /// Header length; the client's bytes follow.
        len: usize,
    },
}

/// Decodes a PROXY v1 or v2 header at the start of `buf`, incrementally.
pub fn decode(buf: &[u8]) -> Result<Decoded, &'static str> {
    const V1: &[u8] = b"PROXY ";
    if buf.len() < V1.len().min(V2_SIGNATURE.len()) {
        let n = buf.len();
        if V1[..n] == *buf || V2_SIGNATURE[..n] == *buf {
            return Ok(Decoded::Incomplete);
        }
        return Ok(Decoded::NotProxy);
    }
    if buf.starts_with(V1) {
        return decode_v1(buf);
    }
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Ok(Decoded::NotProxy);
    }
    decode_v2_header(buf)
}

fn decode_v1(buf: &[u8]) -> Result<Decoded, &'static str> {
    const MAX_V1: usize = 107;
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= MAX_V1 {
            Err("PROXY v1 line longer than 107 bytes")
        } else {
            Ok(Decoded::Incomplete)
        };
    };
    if end + 2 > MAX_V1 {
        return Err("PROXY v1 line longer than 107 bytes");
    }
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| "PROXY v1 line is not text")?;
    let f: Vec<&str> = line.split(' ').collect();
    let len = end + 2;
    match f.get(1).copied() {
        Some("UNKNOWN") => Ok(Decoded::Header { addrs: None, len }),
        Some(proto @ ("TCP4" | "TCP6")) if f.len() == 6 => {
            let ip = |s: &str| -> Result<IpAddr, &'static str> {
                let ip: IpAddr = s.parse().map_err(|_| "PROXY v1 address does not parse")?;
                match (proto, ip) {
                    ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_)) => Ok(ip),
                    _ => Err("PROXY v1 address does not match its family"),
                }
            };
            let port = |s: &str| -> Result<u16, &'static str> {
                // No sign, no leading zeros: the spec's form, nothing looser.
                if s.is_empty()
                    || s.len() > 5
                    || !s.bytes().all(|b| b.is_ascii_digit())
                    || (s.len() > 1 && s.starts_with('0'))
                {
                    return Err("PROXY v1 port does not parse");
                }
                s.parse().map_err(|_| "PROXY v1 port does not parse")
            };
            let src = SocketAddr::new(ip(f[2])?, port(f[4])?);
            let dst = SocketAddr::new(ip(f[3])?, port(f[5])?);
            Ok(Decoded::Header {
                addrs: Some((src, dst)),
                len,
            })
        }
        _ => Err("PROXY v1 line is malformed"),
    }
}

fn decode_v2_header(buf: &[u8]) -> Result<Decoded, &'static str> {
    if buf.len() < 16 {
        return Ok(Decoded::Incomplete);
    }
    let (ver_cmd, fam) = (buf[12], buf[13]);
    if ver_cmd >> 4 != 2 {
        return Err("PROXY v2 header has an unknown version");
    }
    let body = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let len = 16 + body;
    if len > MAX_HEADER {
        return Err("PROXY v2 header too long");
    }
    if buf.len() < len {
        return Ok(Decoded::Incomplete);
    }
    let a = &buf[16..len];
    let addrs = match (ver_cmd & 0x0f, fam) {
        (0, _) => None,
        (1, 0x11) if a.len() >= 12 => {
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Some((
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
            ))
        }
        (1, 0x21) if a.len() >= 36 => {
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Some((
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
            ))
        }
        (1, 0x11 | 0x21) => return Err("PROXY v2 address block too short"),
        // UNSPEC, UDP or unix sockets: nothing usable, treat like LOCAL.
        (1, _) => None,
        _ => return Err("PROXY v2 header has an unknown command"),
    };
    Ok(Decoded::Header { addrs, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_ipv4() {
        let mut out = Vec::new();
        encode(
            ProxyVersion::V1,
            sa("192.0.2.1:56324"),
            sa("198.51.100.7:443"),
            &mut out,
        );
        assert_eq!(out, b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n");
    }

    #[test]
    fn v1_ipv6_and_mapped() {
        let mut out = Vec::new();
        encode(
            ProxyVersion::V1,
            sa("[2001:db8::1]:1000"),
            sa("[::ffff:127.0.0.1]:443"),
            &mut out,
        );
        assert_eq!(out, b"PROXY TCP6 2001:db8::1 ::ffff:127.0.0.1 1000 443\r\n");
        out.clear();
        encode(
            ProxyVersion::V1,
            sa("[::ffff:10.1.2.3]:1000"),
            sa("[::ffff:127.0.0.1]:443"),
            &mut out,
        );
        assert_eq!(out, b"PROXY TCP4 10.1.2.3 127.0.0.1 1000 443\r\n");
    }

    #[test]
    fn v2_ipv4_bytes() {
        let mut out = Vec::new();
        encode(
            ProxyVersion::V2,
            sa("192.0.2.1:256"),
            sa("198.51.100.7:443"),
            &mut out,
        );
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[
            0x21, 0x11, 0, 12, 192, 0, 2, 1, 198, 51, 100, 7, 1, 0, 1, 0xbb,
        ]);
        assert_eq!(out, want);
        let d = decode_v2(&out).unwrap();
        assert_eq!(
            (d.src, d.dst, d.len),
            (sa("192.0.2.1:256"), sa("198.51.100.7:443"), 28)
        );
    }

    #[test]
    fn v2_ipv6_roundtrip() {
        let mut out = Vec::new();
        encode(
            ProxyVersion::V2,
            sa("[2001:db8::1]:4000"),
            sa("[::1]:443"),
            &mut out,
        );
        assert_eq!(out.len(), 16 + 36);
        let d = decode_v2(&out).unwrap();
        assert_eq!((d.src, d.dst), (sa("[2001:db8::1]:4000"), sa("[::1]:443")));
        // Truncated headers are not decoded.
        assert_eq!(decode_v2(&out[..out.len() - 1]), None);
    }

    #[test]
    fn decodes_what_it_encodes() {
        for (src, dst) in [
            ("203.0.113.7:51234", "192.0.2.1:443"),
            ("[2001:db8::7]:51234", "[2001:db8::1]:443"),
        ] {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            for v in [ProxyVersion::V1, ProxyVersion::V2] {
                let mut buf = Vec::new();
                encode(v, src, dst, &mut buf);
                let len = buf.len();
                buf.extend_from_slice(b"SSH-2.0-x\r\n");
                assert_eq!(
                    decode(&buf),
                    Ok(Decoded::Header {
                        addrs: Some((src, dst)),
                        len
                    }),
                    "{v:?}"
                );
                // Every proper prefix is incomplete, never an error or a wrong verdict.
                for cut in 0..len {
                    assert_eq!(decode(&buf[..cut]), Ok(Decoded::Incomplete), "{v:?} {cut}");
                }
            }
        }
    }

    #[test]
    fn tells_client_bytes_from_headers() {
        assert_eq!(decode(b"\x16\x03\x01"), Ok(Decoded::NotProxy));
        assert_eq!(decode(b"SSH-2.0-"), Ok(Decoded::NotProxy));
        assert_eq!(decode(b"GET / HTTP/1.1\r\n"), Ok(Decoded::NotProxy));
        assert_eq!(decode(b"PRO"), Ok(Decoded::Incomplete));
        assert_eq!(
            decode(b"PROXY UNKNOWN\r\n"),
            Ok(Decoded::Header {
                addrs: None,
                len: 15
            })
        );
        // v2 LOCAL (a load balancer's health check).
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(
            decode(&local),
            Ok(Decoded::Header {
                addrs: None,
                len: 16
            })
        );
    }

    #[test]
    fn refuses_malformed_headers() {
        assert!(decode(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 443\r\n").is_err());
        assert!(decode(b"PROXY TCP4 ::1 5.6.7.8 1 443\r\n").is_err());
        assert!(decode(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 443\r\n").is_err());
        assert!(decode(b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 443\r\n").is_err());
        assert!(decode(b"PROXY TCP9 a b c d\r\n").is_err());
        assert!(decode(&[b"PROXY ".as_slice(), &[b'x'; 120]].concat()).is_err());
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x31, 0x11, 0, 12]);
        assert!(decode(&v2).is_err(), "version 3");
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(decode(&v2).is_err(), "short address block");
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(decode(&v2).is_err(), "too long");
    }
}
