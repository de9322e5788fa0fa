//! Pure policy pieces for the embedded SSH server: a key's `permitopen` and `permitlisten`,
//! `from=` lists and `expiry-time` values. No I/O.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use crate::net::PermitListen;
use crate::net::{glob, split_host_port, unmap, Cidr, PortMatch};

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
