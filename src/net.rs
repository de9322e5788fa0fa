//! Addresses and address patterns, shared by the config, the SSH policy, the listener and the
//! client's NO_PROXY: CIDRs, host globs, `host:port` permit entries and port ranges. No I/O, and
//! no imports from the rest of sluice.

use std::net::IpAddr;
use std::ops::RangeInclusive;

/// An IP network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `2001:db8::/32` or a bare address (a /32 or /128).
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside (v4-mapped v6 addresses count as v4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = unmap(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), ip) => {
                // A v4 address against a v6 network: its mapped form (`::ffff:10.0.0.0/104`).
                let ip = match ip {
                    IpAddr::V6(v6) => v6,
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                };
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            (IpAddr::V4(_), IpAddr::V6(_)) => false,
        }
    }
}

/// A v4-mapped v6 address as the v4 address it is.
pub fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// OpenSSH-style glob: `*` any run, `?` any one character; case-insensitive.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (
        pattern.to_lowercase().chars().collect(),
        text.to_lowercase().chars().collect(),
    );
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        // A `*` is always a wildcard, even where the text has a `*` too (found by fuzzing:
        // taking it literally left no way back, and `*` did not match `*a`).
        if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Splits `host:port`, where host may be `[v6]` or `[v6/len]`.
pub(crate) fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?;
        Some((host, port))
    } else {
        let (host, port) = s.rsplit_once(':')?;
        (!host.contains(':')).then_some((host, port))
    }
}

/// A port or `*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortMatch {
    /// Any port.
    Any,
    /// This port.
    Port(u16),
}

impl PortMatch {
    /// `*` or a port from 1 to 65535.
    pub(crate) fn parse(s: &str) -> Option<PortMatch> {
        match s {
            "*" => Some(PortMatch::Any),
            p => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .map(PortMatch::Port),
        }
    }

    /// Whether `port` matches.
    pub fn matches(self, port: u16) -> bool {
        match self {
            PortMatch::Any => true,
            PortMatch::Port(p) => p == port,
        }
    }
}

/// The host half of a `permit_open` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// An address or network: matched against the address actually connected to.
    Net(Cidr),
    /// A name pattern (`db.internal`, `*.internal`, `*`): matched against the requested name.
    Name(String),
}

/// A key's `permitlisten="[host:]port"` (and `tunnels.permit_listen`), or (a sluice extension) `"/name-glob"` for
/// `ssh -R /name:...` unix sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermitListen {
    host: Option<String>,
    port: PortMatch,
    socket: Option<String>,
}

impl PermitListen {
    /// Parses `port`, `*`, `host:port`, `[v6]:port`, or `/socket-name-glob`.
    pub fn parse(s: &str) -> Option<PermitListen> {
        if let Some(name) = s.strip_prefix('/') {
            let ok = !name.is_empty() && !name.contains('/');
            return ok.then(|| PermitListen {
                host: None,
                port: PortMatch::Any,
                socket: Some(name.to_string()),
            });
        }
        if let Some(port) = PortMatch::parse(s) {
            return Some(PermitListen {
                host: None,
                port,
                socket: None,
            });
        }
        let (host, port) = split_host_port(s)?;
        let port = PortMatch::parse(port)?;
        (!host.is_empty()).then(|| PermitListen {
            host: Some(host.to_ascii_lowercase()),
            port,
            socket: None,
        })
    }

    /// Whether a TCP forward request for `address:port` matches; port 0 (allocate) needs a
    /// `*` port. Socket entries never match TCP requests.
    pub fn matches(&self, address: &str, port: u16) -> bool {
        if self.socket.is_some() {
            return false;
        }
        let port_ok = match (self.port, port) {
            (PortMatch::Any, _) => true,
            (PortMatch::Port(_), 0) => false,
            (PortMatch::Port(p), q) => p == q,
        };
        port_ok && self.host.as_deref().is_none_or(|h| glob(h, address))
    }

    /// Whether the key may publish tunnel `name` on `port`: only entries with a host part
    /// (read as a name glob, `preview-*:80`) grant names; a bare port grants none.
    pub fn matches_name(&self, name: &str, port: u16) -> bool {
        let port_ok = match self.port {
            PortMatch::Any => true,
            PortMatch::Port(p) => p == port,
        };
        self.socket.is_none() && port_ok && self.host.as_deref().is_some_and(|h| glob(h, name))
    }

    /// Whether this entry can grant tunnel names (it has a host part; not a socket).
    pub fn names(&self) -> bool {
        self.host.is_some() && self.socket.is_none()
    }

    /// Whether a unix-socket forward for the socket `name` matches a `/glob` entry.
    pub fn matches_socket(&self, name: &str) -> bool {
        self.socket.as_deref().is_some_and(|g| glob(g, name))
    }
}

/// One entry of the global `ssh.permit_open` list: `host:port`, `*` port, CIDR for addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermitOpen {
    /// Which hosts.
    pub host: HostMatch,
    /// Which ports.
    pub port: PortMatch,
}

impl PermitOpen {
    /// Parses `127.0.0.1:5432`, `10.0.0.0/8:22`, `[fd00::/8]:*`, `*.internal:443`.
    pub fn parse(s: &str) -> Result<PermitOpen, String> {
        let bad = || {
            format!("`{s}` is not host:port (port or *; host a name, *.pattern, address or CIDR)")
        };
        let (host, port) = split_host_port(s.trim()).ok_or_else(bad)?;
        let port = PortMatch::parse(port).ok_or_else(bad)?;
        if host.is_empty() {
            return Err(bad());
        }
        let host = match Cidr::parse(host) {
            Some(c) => HostMatch::Net(c),
            None if host.contains('/') => return Err(bad()),
            // `192.168.1.*` would be a name pattern that `192.168.1.evil.example` matches.
            None if host != "*"
                && host
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b"*?.".contains(&b)) =>
            {
                return Err(format!(
                    "`{s}`: write address ranges as CIDR (e.g. 192.168.1.0/24), not globs"
                ))
            }
            None if host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.*?_".contains(&b)) =>
            {
                HostMatch::Name(host.to_ascii_lowercase())
            }
            None => return Err(bad()),
        };
        Ok(PermitOpen { host, port })
    }

    /// Whether a request for `name:port` is allowed before resolving it (name entries, and
    /// address entries when the name is an address literal).
    pub fn allows_name(&self, name: &str, port: u16) -> bool {
        self.port.matches(port)
            && match &self.host {
                HostMatch::Name(p) => glob(p, name),
                HostMatch::Net(c) => name
                    .trim_matches(|c| c == '[' || c == ']')
                    .parse()
                    .is_ok_and(|ip| c.contains(ip)),
            }
    }

    /// Whether connecting to `ip:port` is allowed by an address entry.
    pub fn allows_addr(&self, ip: IpAddr, port: u16) -> bool {
        self.port.matches(port) && matches!(&self.host, HostMatch::Net(c) if c.contains(ip))
    }
}

/// Parses a port range `20000-25000` (or one port).
pub fn parse_port_range(s: &str) -> Option<RangeInclusive<u16>> {
    let (a, b) = s.trim().split_once('-').unwrap_or((s.trim(), s.trim()));
    let (a, b) = (a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?);
    (a >= 1 && a <= b).then_some(a..=b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.255.1.2")) && !c.contains(ip("11.0.0.1")));
        assert!(c.contains(ip("::ffff:10.1.1.1")));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains(ip("203.0.113.9")));
        let c = Cidr::parse("2001:db8::/32").unwrap();
        assert!(c.contains(ip("2001:db8:1::5")) && !c.contains(ip("2001:db9::1")));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        assert_eq!(Cidr::parse("10.0.0.0/33"), None);
        assert_eq!(Cidr::parse("nope/8"), None);
    }

    #[test]
    fn globs() {
        assert!(glob("*.internal", "db.INTERNAL"));
        assert!(!glob("*.internal", "internal"));
        assert!(glob("192.168.?.*", "192.168.1.20"));
        assert!(glob("*", ""));
        assert!(!glob("a*b", "acbd"));
        assert!(glob("a*b*", "acbd"));
        // Found by fuzzing: a `*` facing a literal `*` in the text is still a wildcard.
        assert!(glob("*", "*a"));
        assert!(glob("*b", "*ab"));
        assert!(!glob("a*", "*a"));
    }

    #[test]
    fn v4_mapped_networks_contain_their_v4_addresses() {
        // Found by fuzzing: `::ffff:10.0.0.1` contained nothing, not even itself.
        let c = Cidr::parse("::ffff:10.0.0.1").unwrap();
        assert!(c.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(c.contains("10.0.0.1".parse().unwrap()));
        assert!(!c.contains("10.0.0.2".parse().unwrap()));
        let c = Cidr::parse("::ffff:10.0.0.0/104").unwrap();
        assert!(c.contains("10.9.8.7".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        // And v4 networks keep matching v4-mapped clients, but no other v6 address.
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("::a00:1".parse().unwrap()));
    }

    #[test]
    fn permit_open_entries() {
        let p = PermitOpen::parse("127.0.0.1:5432").unwrap();
        assert!(p.allows_name("127.0.0.1", 5432) && !p.allows_name("127.0.0.1", 5433));
        assert!(p.allows_addr(ip("127.0.0.1"), 5432));
        assert!(!p.allows_name("localhost", 5432), "names are not addresses");
        let p = PermitOpen::parse("10.0.0.0/8:22").unwrap();
        assert!(p.allows_addr(ip("10.2.3.4"), 22) && !p.allows_addr(ip("10.2.3.4"), 23));
        assert!(p.allows_name("10.9.9.9", 22));
        assert!(
            !p.allows_name("db.internal", 22),
            "a name is checked by the address it resolves to"
        );
        let p = PermitOpen::parse("*.internal:*").unwrap();
        assert!(p.allows_name("db.internal", 1) && !p.allows_addr(ip("10.0.0.1"), 1));
        let p = PermitOpen::parse("[fd00::/8]:443").unwrap();
        assert!(p.allows_addr(ip("fd12::1"), 443));
        assert!(p.allows_name("[fd12::1]", 443));
        assert!(PermitOpen::parse("*:22").is_ok());
        assert!(PermitOpen::parse("192.168.1.*:22").is_err());
        assert!(PermitOpen::parse("10.?.0.1:*").is_err());
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            ":22",
            "10.0.0.0/99:22",
            "a b:22",
            "::1:22",
            "h:x",
        ] {
            assert!(PermitOpen::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_port_range("20000-25000"), Some(20000..=25000));
        assert_eq!(parse_port_range("22"), Some(22..=22));
        assert_eq!(parse_port_range("0-10"), None);
        assert_eq!(parse_port_range("30-20"), None);
    }
}
