//! Pure policy pieces for the embedded SSH server: address patterns, CIDRs, `permit_open`
//! entries, `permitlisten` specs, port ranges and `expiry-time` values. No I/O.

use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
fn split_host_port(s: &str) -> Option<(&str, &str)> {
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
    fn parse(s: &str) -> Option<PortMatch> {
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

/// A key's `permitopen="host:port"`: the requested host string, literally (as OpenSSH does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPermitOpen {
    host: String,
    port: PortMatch,
}

impl KeyPermitOpen {
    /// Parses `host:port`, `[v6]:port`, port `*`.
    pub fn parse(s: &str) -> Option<KeyPermitOpen> {
        let (host, port) = split_host_port(s)?;
        let port = PortMatch::parse(port)?;
        (!host.is_empty()).then(|| KeyPermitOpen {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// Whether a request for `host:port` matches.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        self.port.matches(port)
            && (self.host == "*"
                || self
                    .host
                    .eq_ignore_ascii_case(host.trim_matches(|c| c == '[' || c == ']')))
    }
}

/// A key's `permitlisten="[host:]port"`, or (a sluice extension) `"/name-glob"` for
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

    /// Whether a unix-socket forward for the socket `name` matches a `/glob` entry.
    pub fn matches_socket(&self, name: &str) -> bool {
        self.socket.as_deref().is_some_and(|g| glob(g, name))
    }
}

/// A `from="..."` pattern list: CIDRs and globs over the client address, `!` negates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromList(Vec<(bool, FromPattern)>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum FromPattern {
    Cidr(Cidr),
    Glob(String),
}

impl FromList {
    /// Parses `192.0.2.0/24,!192.0.2.7,10.*`.
    pub fn parse(s: &str) -> Option<FromList> {
        let mut v = Vec::new();
        for p in s.split(',') {
            let p = p.trim();
            let (neg, p) = match p.strip_prefix('!') {
                Some(rest) => (true, rest),
                None => (false, p),
            };
            if p.is_empty() {
                return None;
            }
            let pat = if p.contains('/') {
                FromPattern::Cidr(Cidr::parse(p)?)
            } else {
                FromPattern::Glob(p.to_ascii_lowercase())
            };
            v.push((neg, pat));
        }
        (!v.is_empty()).then_some(FromList(v))
    }

    /// The negated patterns that are host names (`!evil.example.org`), not addresses: they
    /// never match (sluice does no reverse DNS), so they keep nobody out.
    pub fn negated_names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|(neg, p)| match p {
            FromPattern::Glob(g) if *neg && !address_glob(g) => Some(g.as_str()),
            _ => None,
        })
    }

    /// Whether `ip` is allowed: a negated match refuses, else any positive match allows.
    /// Host name patterns never match: sluice does no reverse DNS.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = unmap(ip);
        let text = ip.to_string();
        let mut allowed = false;
        for (neg, p) in &self.0 {
            let hit = match p {
                FromPattern::Cidr(c) => c.contains(ip),
                FromPattern::Glob(g) => glob(g, &text),
            };
            if hit && *neg {
                return false;
            }
            allowed |= hit;
        }
        allowed
    }
}

/// Whether a glob can match an address as sluice writes it (`192.0.2.*`, `2001:db8::?`):
/// IPv4 digits and dots, or IPv6 hex digits and colons (dots for a v4 tail), and wildcards.
fn address_glob(g: &str) -> bool {
    let wild = |b: u8| b == b'*' || b == b'?';
    g.bytes()
        .all(|b| b.is_ascii_digit() || b == b'.' || wild(b))
        || (g.contains(':')
            && g.bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.' || wild(b)))
}

/// Parses a port range `20000-25000` (or one port).
pub fn parse_port_range(s: &str) -> Option<RangeInclusive<u16>> {
    let (a, b) = s.trim().split_once('-').unwrap_or((s.trim(), s.trim()));
    let (a, b) = (a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?);
    (a >= 1 && a <= b).then_some(a..=b)
}

/// How to read an `expiry-time` without a `Z`: in the local time zone, as OpenSSH does.
pub trait LocalOffset {
    /// Seconds east of UTC in force at that local wall-clock time.
    fn offset_secs(&self, naive_utc_secs: i64) -> i64;
}

/// Parses `YYYYMMDD[Z]` or `YYYYMMDDHHMM[SS][Z]`; without `Z`, `tz` gives the local offset.
pub fn parse_expiry(s: &str, tz: &dyn LocalOffset) -> Option<SystemTime> {
    let (digits, utc) = match s.strip_suffix(['Z', 'z']) {
        Some(d) => (d, true),
        None => (s, false),
    };
    if !digits.bytes().all(|b| b.is_ascii_digit()) || ![8, 12, 14].contains(&digits.len()) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| digits.get(r).map_or(Some(0), |v| v.parse::<i64>().ok());
    let (y, mo, d) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let (h, mi, sec) = (n(8..10)?, n(10..12)?, n(12..14)?);
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || sec > 59
    {
        return None;
    }
    let naive = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec;
    let secs = if utc {
        naive
    } else {
        naive - tz.offset_secs(naive)
    };
    let secs = u64::try_from(secs).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(i64);
    impl LocalOffset for Fixed {
        fn offset_secs(&self, _: i64) -> i64 {
            self.0
        }
    }

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
    fn key_permits() {
        let k = KeyPermitOpen::parse("localhost:5432").unwrap();
        assert!(k.matches("LOCALHOST", 5432) && !k.matches("127.0.0.1", 5432));
        let k = KeyPermitOpen::parse("[::1]:*").unwrap();
        assert!(k.matches("::1", 9));
        assert_eq!(KeyPermitOpen::parse("x:0"), None);

        let l = PermitListen::parse("21234").unwrap();
        assert!(
            l.matches("localhost", 21234) && l.matches("", 21234) && !l.matches("localhost", 0)
        );
        let l = PermitListen::parse("localhost:*").unwrap();
        assert!(l.matches("localhost", 0) && !l.matches("127.0.0.1", 5));
        assert!(PermitListen::parse("*").unwrap().matches("x", 0));
        assert_eq!(PermitListen::parse("0"), None);
        let s = PermitListen::parse("/preview-*.sock").unwrap();
        assert!(s.matches_socket("preview-42.sock") && !s.matches_socket("other.sock"));
        assert!(
            !s.matches("localhost", 0),
            "a socket entry allows no TCP port"
        );
        assert!(
            !PermitListen::parse("*").unwrap().matches_socket("x.sock"),
            "a port entry allows no socket"
        );
    }

    #[test]
    fn from_lists() {
        let f = FromList::parse("192.0.2.0/24,!192.0.2.7,10.1.*").unwrap();
        assert!(f.allows(ip("192.0.2.1")) && !f.allows(ip("192.0.2.7")));
        assert!(f.allows(ip("10.1.200.3")) && !f.allows(ip("10.2.0.1")));
        assert!(f.allows(ip("::ffff:192.0.2.9")));
        assert!(!FromList::parse("*.example.com")
            .unwrap()
            .allows(ip("192.0.2.1")));
        assert_eq!(FromList::parse(""), None);
        assert_eq!(FromList::parse("10.0.0.0/40"), None);
    }

    #[test]
    fn negated_host_names_are_found() {
        let f = FromList::parse(
            "!evil.example.org,*.example.org,!10.1.*,!fe80::*,!*,!192.0.2.0/24,!?,!db1,!cafe.beef",
        )
        .unwrap();
        let names: Vec<&str> = f.negated_names().collect();
        assert_eq!(names, ["evil.example.org", "db1", "cafe.beef"]);
        // What the warning says: the negation keeps nobody out.
        let f = FromList::parse("!evil.example.org,127.0.0.0/8").unwrap();
        assert!(f.allows(ip("127.0.0.1")));
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_port_range("20000-25000"), Some(20000..=25000));
        assert_eq!(parse_port_range("22"), Some(22..=22));
        assert_eq!(parse_port_range("0-10"), None);
        assert_eq!(parse_port_range("30-20"), None);
    }

    #[test]
    fn expiry_times() {
        let at = |s: &str, tz: i64| {
            parse_expiry(s, &Fixed(tz)).map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs())
        };
        assert_eq!(at("19700101Z", 0), Some(0));
        assert_eq!(at("20261123Z", 0), Some(1_795_392_000));
        assert_eq!(at("202611231500Z", 0), Some(1_795_392_000 + 15 * 3600));
        assert_eq!(
            at("20261123150030", 0),
            Some(1_795_392_000 + 15 * 3600 + 30)
        );
        // Local time one hour east of UTC is one hour earlier in UTC.
        assert_eq!(at("202611231500", 3600), Some(1_795_392_000 + 14 * 3600));
        assert!(at("20240229Z", 0).is_some());
        for bad in [
            "20230229Z",
            "2026112",
            "202611231",
            "20261323",
            "202611232460",
            "2026-11-23",
            "",
        ] {
            assert_eq!(at(bad, 0), None, "{bad}");
        }
    }
}
