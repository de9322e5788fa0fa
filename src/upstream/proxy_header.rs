//! PROXY protocol header encoding (HAProxy's spec, versions 1 and 2): pure, no I/O.

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

/// A decoded version 2 header, for tests and (later) for PROXY input from load balancers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodedV2 {
    /// The client address the header carries.
    pub src: SocketAddr,
    /// The destination address the header carries.
    pub dst: SocketAddr,
    /// Total header length in bytes.
    pub len: usize,
}

/// Decodes a version 2 PROXY/TCP header at the start of `buf`; `None` if it is not one or is
/// incomplete.
pub fn decode_v2(buf: &[u8]) -> Option<DecodedV2> {
    if buf.len() < 16 || buf[..12] != V2_SIGNATURE || buf[12] != 0x21 {
        return None;
    }
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let body = buf.get(16..16 + len)?;
    let (src, dst) = match buf[13] {
        0x11 if len >= 12 => {
            let ip = |o: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    body[o],
                    body[o + 1],
                    body[o + 2],
                    body[o + 3],
                ))
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            (
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
            )
        }
        0x21 if len >= 36 => {
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&body[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(a))
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            (
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
            )
        }
        _ => return None,
    };
    Some(DecodedV2 {
        src,
        dst,
        len: 16 + len,
    })
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
}
