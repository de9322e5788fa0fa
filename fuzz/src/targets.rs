//! The bodies of sluice's fuzz targets, one plain function per target, each taking the raw
//! input. They feed the bytes to the parsers that read what outside peers send (clients, load
//! balancers, proxies, key and config files) and check properties beyond "does not panic".
//!
//! This file is compiled twice: as `sluice_fuzz::targets` for `cargo fuzz`, and as a module of
//! sluice's integration tests (`tests/it/fuzz_replay.rs`), which replay the committed corpus
//! on stable. So it uses only `sluice`, its dependencies (`tokio`, `russh`, `serde_json`) and
//! std.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use sluice::builtin::{self, MAX_HEAD};
use sluice::client::{self, ConnectReply, Proxy};
use sluice::config::{Config, ConfigError};
use sluice::detect::{self, Candidates, Protocol, Verdict, MAX_SIGNATURE};
use sluice::net::{self, Cidr, PermitOpen};
use sluice::proxy_protocol::{
    self, decode_v2, Decoded, DecodedV2, ProxyVersion, MAX_HEADER as MAX_PROXY_HEADER, V2_SIGNATURE,
};
use sluice::ssh::authorized_keys;
use sluice::ssh::policy::{self, FromList, KeyPermitOpen, LocalOffset, PermitListen};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

// === open bugs ===

thread_local! {
    static CHECK_OPEN_BUGS: Cell<bool> = const { Cell::new(false) };
}

/// Turns on (for this thread) the checks of bugs that fuzzing found and that are still open.
/// Off by default, so the fuzzers explore past them and `cargo test` replays their inputs
/// without failing; `tests/it/fuzz_replay.rs`'s ignored `open_bugs` test turns them on, and so
/// does `SLUICE_FUZZ_OPEN_BUGS=1` in a fuzzer's environment.
pub fn check_open_bugs(on: bool) {
    CHECK_OPEN_BUGS.with(|c| c.set(on));
}

/// Whether to check the open bug `_what` (its input is in `fuzz/regressions/`). When the bug
/// is fixed, drop the `if open(...)` around its check: then every replay enforces it. (None is
/// open now; kept for the next one.)
#[allow(dead_code)]
fn open(_what: &str) -> bool {
    static ENV: OnceLock<bool> = OnceLock::new();
    CHECK_OPEN_BUGS.with(Cell::get)
        || *ENV.get_or_init(|| std::env::var_os("SLUICE_FUZZ_OPEN_BUGS").is_some())
}

// === classify ===

/// `detect::classify` on the input with each candidate set, and on every prefix of it: a
/// decided verdict (`Match` or `NoMatch`) on a prefix is the verdict on the whole input, and
/// [`MAX_SIGNATURE`] bytes always decide.
pub fn classify(data: &[u8]) {
    for c in [Candidates::OUTER, Candidates::INNER] {
        let whole = detect::classify(data, c);
        for n in 0..=data.len() {
            let v = detect::classify(&data[..n], c);
            if v != Verdict::NeedMore {
                assert_eq!(v, whole, "{c:?}: prefix of {n} bytes decided {v:?}");
            } else {
                assert!(n < MAX_SIGNATURE, "{c:?}: still NeedMore after {n} bytes");
            }
        }
        match whole {
            Verdict::Match(Protocol::Tls) => assert_eq!(c, Candidates::OUTER, "TLS inside TLS"),
            Verdict::Match(Protocol::Http2) => assert_eq!(c, Candidates::INNER, "h2 before TLS"),
            _ => {}
        }
    }
    // SSH and HTTP/1 are candidates on both sides, recognised by the same bytes.
    let (outer, inner) = (
        detect::classify(data, Candidates::OUTER),
        detect::classify(data, Candidates::INNER),
    );
    for p in [Protocol::Ssh, Protocol::Http1] {
        assert_eq!(
            outer == Verdict::Match(p),
            inner == Verdict::Match(p),
            "{p:?}"
        );
    }
}

// === proxy_header ===

/// PROXY v1/v2 `decode` and `decode_v2` on the input (with the same every-prefix rule as
/// `classify`), then an encode/decode roundtrip of addresses built from the input.
pub fn proxy_header(data: &[u8]) {
    let whole = proxy_protocol::decode(data);
    if let Ok(Decoded::Header { len, .. }) = &whole {
        assert!(
            *len <= data.len() && *len <= MAX_PROXY_HEADER,
            "header of {len} bytes"
        );
    }
    if data.len() > MAX_PROXY_HEADER {
        assert_ne!(whole, Ok(Decoded::Incomplete), "waits past MAX_HEADER");
    }
    // Incomplete is the only answer a longer input may change.
    for n in 0..data.len().min(MAX_PROXY_HEADER + 1) {
        let v = proxy_protocol::decode(&data[..n]);
        if v != Ok(Decoded::Incomplete) {
            assert_eq!(v, whole, "prefix of {n} bytes");
        }
    }
    match decode_v2(data) {
        Some(d) => {
            assert!(data.starts_with(&V2_SIGNATURE));
            let want = Decoded::Header {
                addrs: Some((d.src, d.dst)),
                len: d.len,
            };
            assert_eq!(whole, Ok(want));
        }
        None => assert!(
            !(data.starts_with(&V2_SIGNATURE)
                && matches!(whole, Ok(Decoded::Header { addrs: Some(_), .. }))),
            "decode_v2 missed a v2 header that decode read: {whole:?}"
        ),
    }

    let mut b = Bytes(data);
    let sel = b.u8();
    let src = socket_addr(&mut b, sel & 1 != 0, sel & 4 != 0);
    let dst = socket_addr(&mut b, sel & 2 != 0, sel & 8 != 0);
    // What the header says: v4-mapped addresses as v4; mixed families both as v6.
    let want = match (net::unmap(src.ip()), net::unmap(dst.ip())) {
        (s @ IpAddr::V4(_), d @ IpAddr::V4(_)) => (s, d),
        (s, d) => (IpAddr::V6(to_v6(s)), IpAddr::V6(to_v6(d))),
    };
    let want = (
        SocketAddr::new(want.0, src.port()),
        SocketAddr::new(want.1, dst.port()),
    );
    for v in [ProxyVersion::V1, ProxyVersion::V2] {
        let mut out = Vec::new();
        proxy_protocol::encode(v, src, dst, &mut out);
        let len = out.len();
        for cut in 0..len {
            let d = proxy_protocol::decode(&out[..cut]);
            assert_eq!(d, Ok(Decoded::Incomplete), "{v:?} cut at {cut} of {out:?}");
        }
        // The client's own bytes follow the header.
        out.extend_from_slice(data);
        let d = proxy_protocol::decode(&out);
        let header = Decoded::Header {
            addrs: Some(want),
            len,
        };
        assert_eq!(d, Ok(header), "{v:?} {src} -> {dst}: {out:?}");
        if v == ProxyVersion::V2 {
            let d = decode_v2(&out);
            let (src, dst) = want;
            assert_eq!(d, Some(DecodedV2 { src, dst, len }));
        }
    }
}

fn socket_addr(b: &mut Bytes<'_>, v6: bool, mapped: bool) -> SocketAddr {
    let ip = if v6 && mapped {
        IpAddr::V6(Ipv4Addr::from(b.array::<4>()).to_ipv6_mapped())
    } else if v6 {
        IpAddr::V6(Ipv6Addr::from(b.array::<16>()))
    } else {
        IpAddr::V4(Ipv4Addr::from(b.array::<4>()))
    };
    SocketAddr::new(ip, u16::from_be_bytes(b.array::<2>()))
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// The input as a source of numbers; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
}

// === http_head ===

/// The request head reader of the built-in answers and the admin endpoint
/// (`builtin::read_head`), fed the input in different splits between the bytes already read
/// (the detection prefix) and reads of different sizes; the same head (or the same kind of
/// error) comes out of every split. Then `request_line`, `header` and `https_location` on the
/// head, and the whole `redirect` and `status_page` answers.
pub fn http_head(data: &[u8]) {
    // read_head searches the whole head again after every read: small reads of long inputs
    // would spend the fuzzer's time there.
    let small = if data.len() <= 128 { 1 } else { 13 };
    let splits = [
        (0, small),
        (0, 2048),
        (data.len().min(MAX_SIGNATURE), 7),
        (data.len(), 1),
    ];
    for (prefix, chunk) in splits {
        check_read_head(data, prefix, chunk);
    }
    // The bound: the input behind filler already read, so its first blank line (if any)
    // lands around MAX_HEAD.
    let mut b = Bytes(data);
    let shift = usize::from(u16::from_be_bytes(b.array::<2>())) % 4096;
    let mut long = vec![b'a'; MAX_HEAD - 2048 + shift];
    let prefix = long.len();
    long.extend_from_slice(data);
    check_read_head(&long, prefix, 2048);

    check_head_parsers(data);
    if let Some(end) = find(data, b"\r\n\r\n").filter(|e| e + 4 <= MAX_HEAD) {
        check_head_parsers(&data[..end + 4]);
        check_answers(data, &data[..end + 4]);
    }
}

fn check_read_head(stream: &[u8], prefix: usize, chunk: usize) {
    let (pre, rest) = stream.split_at(prefix);
    let mut r = Chunked::new(rest, chunk);
    let got = block_on(builtin::read_head(&mut r, pre, far_deadline()));
    let end = find(stream, b"\r\n\r\n").map(|i| i + 4);
    let what = format!("prefix {prefix}, reads of {chunk}, {} bytes", stream.len());
    match (got, end) {
        (Ok(head), Some(e)) => {
            assert_eq!(head, &stream[..e], "{what}");
            assert!(
                e <= prefix.max(MAX_HEAD + 2047),
                "{what}: read a {e}-byte head"
            );
        }
        (Ok(head), None) => panic!("{what}: a head without a blank line: {head:?}"),
        (Err(err), end) => match err.kind() {
            io::ErrorKind::UnexpectedEof => {
                assert!(end.is_none() && stream.len() < MAX_HEAD, "{what}: {err}");
            }
            io::ErrorKind::InvalidData => {
                let first_bound = prefix.max(MAX_HEAD);
                assert!(end.is_none_or(|e| e > first_bound), "{what}: {err}");
            }
            _ => panic!("{what}: unexpected error {err}"),
        },
    }
}

fn check_head_parsers(head: &[u8]) {
    if let Some((method, target)) = builtin::request_line(head) {
        for part in [method, target] {
            assert!(!part.contains([' ', '\n']), "request line part {part:?}");
        }
    }
    for name in ["host", "HOST", "content-length", ""] {
        let _ = builtin::header(head, name);
    }
    if let Some(loc) = builtin::https_location(head) {
        assert!(loc.starts_with("https://"), "{loc:?}");
        // It goes into a Location header: nothing that could end or split that line.
        assert!(loc.bytes().all(|b| b.is_ascii_graphic()), "{loc:?}");
    }
}

/// The redirect and status page answers: one well-formed response head, whatever was asked.
fn check_answers(stream: &[u8], head: &[u8]) {
    let mut s = Chunked::new(stream, 2048);
    block_on(builtin::redirect(&mut s, b"", far_deadline())).expect("redirect answers");
    let status = if builtin::https_location(head).is_some() {
        "308 Permanent Redirect"
    } else {
        "400 Bad Request"
    };
    check_response(&s.written, status, false);

    let mut s = Chunked::new(stream, 2048);
    block_on(builtin::status_page(&mut s, b"", far_deadline())).expect("status page answers");
    let head_only = builtin::request_line(head).is_some_and(|(m, _)| m == "HEAD");
    check_response(&s.written, "200 OK", head_only);
}

/// `head_only`: an answer to HEAD, whose Content-Length is the body it leaves out.
fn check_response(out: &[u8], status: &str, head_only: bool) {
    let text = std::str::from_utf8(out).expect("answers are text");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.split("\r\n");
    assert_eq!(lines.next(), Some(format!("HTTP/1.1 {status}").as_str()));
    for l in lines {
        let (name, value) = l.split_once(": ").unwrap_or_else(|| panic!("header {l:?}"));
        assert!(
            [
                "Server",
                "Content-Type",
                "Content-Length",
                "Connection",
                "Cache-Control",
                "Location"
            ]
            .contains(&name),
            "header {l:?}"
        );
        if name == "Content-Length" && !head_only {
            assert_eq!(value.parse::<usize>().ok(), Some(body.len()), "{text:?}");
        }
    }
    if head_only {
        assert_eq!(body, "", "a body in an answer to HEAD");
    }
}

// === authorized_keys ===

/// `authorized_keys::parse` on the input as a file, read with several time zones; every
/// line either loads or is skipped with a reason, in file order.
pub fn authorized_keys(data: &[u8]) {
    let zones: [&dyn LocalOffset; 4] = [
        &FixedTz(0),
        &FixedTz(14 * 3600),
        &FixedTz(-12 * 3600),
        &sluice::ssh::SystemTz,
    ];
    let lines = data.split(|&b| b == b'\n').count();
    for tz in zones {
        let (keys, skipped) = authorized_keys::parse(data, "f", tz);
        let mut origins: Vec<usize> = keys
            .iter()
            .map(|k| &k.origin)
            .chain(skipped.iter().map(|s| &s.origin))
            .map(|o| {
                let n = o.strip_prefix("f:").expect("origin names the file");
                n.parse().expect("origin names the line")
            })
            .collect();
        origins.sort_unstable();
        assert!(
            origins.windows(2).all(|w| w[0] < w[1]),
            "one answer per line"
        );
        assert!(origins.iter().all(|&n| n >= 1 && n <= lines), "{origins:?}");
        for s in &skipped {
            assert!(!s.reason.is_empty(), "{s:?}");
        }
        for k in &keys {
            let o = &k.options;
            if o.principals.is_some() {
                assert!(
                    o.cert_authority,
                    "principals= without cert-authority: {o:?}"
                );
            }
            assert!(o.principals.iter().flatten().all(|p| !p.is_empty()));
            exercise_key_options(o);
        }
    }
}

struct FixedTz(i64);

impl LocalOffset for FixedTz {
    fn offset_secs(&self, _: i64) -> i64 {
        self.0
    }
}

const PORTS: [u16; 5] = [0, 1, 22, 443, 65535];

fn sample_ips() -> [IpAddr; 5] {
    [
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped()),
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    ]
}

fn exercise_key_options(o: &authorized_keys::KeyOptions) {
    for ip in sample_ips() {
        if let Some(f) = &o.from {
            let _ = f.allows(ip);
        }
    }
    for port in PORTS {
        for p in o.permit_open.iter().flatten() {
            let _ = p.matches("localhost", port);
        }
        for p in o.permit_listen.iter().flatten() {
            let _ = p.matches("localhost", port);
            let _ = p.matches_socket("preview-1.sock");
        }
    }
}

// === cert_options ===

/// An OpenSSH certificate blob, as a client presents it in `publickey` authentication (the
/// base64 part of a `-cert.pub` line): decoded the way russh decodes it for the embedded
/// server, then read the way `ssh/handler.rs` (`auth_openssh_certificate`) reads it: validity,
/// principals, the `source-address` critical option through `Cidr`, the extensions.
pub fn cert_options(data: &[u8]) {
    use russh::keys::ssh_encoding::{Decode, Encode};
    use russh::keys::{Certificate, HashAlg};

    // russh refuses blobs with more than 8 nested certificates before decoding (its
    // `check_cert_nesting`, crate-private), so deeper nesting never reaches ssh-key.
    const MARKER: &[u8] = b"-cert-v01@";
    if data.windows(MARKER.len()).filter(|w| *w == MARKER).count() > 8 {
        return;
    }
    let mut reader = data;
    let Ok(cert) = Certificate::decode(&mut reader) else {
        return;
    };
    let again = cert.encode_vec().expect("a decoded certificate encodes");
    let mut r = again.as_slice();
    assert_eq!(
        Certificate::decode(&mut r).ok().as_ref(),
        Some(&cert),
        "encode/decode roundtrip"
    );

    let ca_fp = cert.signature_key().fingerprint(HashAlg::Sha256);
    let _ = (
        cert.key_id(),
        cert.serial(),
        cert.cert_type(),
        cert.signature(),
    );
    let _ = cert.validate([&ca_fp]);
    let _ = cert.valid_principals().join(",");
    if let (Some(a), Some(b)) = (cert.valid_after_time(), cert.valid_before_time()) {
        let _ = a.min(b);
    }
    // What handler.rs does with each critical option.
    // TODO: call the handler's own check once it is a pure function in ssh/policy.rs.
    for (name, value) in cert.critical_options().iter() {
        if name.as_str() == "source-address" {
            for ip in sample_ips() {
                let _ = value
                    .split(',')
                    .filter_map(|c| Cidr::parse(c.trim()))
                    .any(|c| c.contains(ip));
            }
        }
    }
    let _ = cert.extensions().contains_key("permit-port-forwarding");
}

// === policy ===

/// The pure policy parsers of the SSH server: global `permit_open` entries, key
/// `permitopen=`/`permitlisten=` values, `from=` lists, CIDRs, `expiry-time`, port ranges and
/// globs. The input is a value, then after the first newline, text to match it against.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (spec, subject) = text.split_once('\n').unwrap_or((text, ""));
    let subject_ip: Option<IpAddr> = subject.trim_matches(|c| c == '[' || c == ']').parse().ok();
    let mut ips = sample_ips().to_vec();
    ips.extend(subject_ip);

    if let Ok(p) = PermitOpen::parse(spec) {
        for port in PORTS {
            let _ = p.allows_name(subject, port);
            for &ip in &ips {
                let _ = p.allows_addr(ip, port);
            }
        }
    }
    if let Some(p) = KeyPermitOpen::parse(spec) {
        for port in PORTS {
            let _ = p.matches(subject, port);
        }
    }
    if let Some(p) = PermitListen::parse(spec) {
        for port in PORTS {
            let _ = p.matches(subject, port);
        }
        let _ = p.matches_socket(subject);
    }
    if let Some(f) = FromList::parse(spec) {
        for &ip in &ips {
            let _ = f.allows(ip);
        }
    }
    if let Some(c) = Cidr::parse(spec) {
        for &ip in &ips {
            let _ = c.contains(ip);
        }
    }
    if let Ok(ip) = spec.parse::<IpAddr>() {
        let c = Cidr::parse(spec).expect("an address is a CIDR");
        // regressions/policy/open-cidr-v4-mapped: a v4-mapped network (`::ffff:10.0.0.1`)
        // contained nothing.
        assert!(c.contains(ip), "{spec} does not contain itself");
    }
    let at = |offset: i64| policy::parse_expiry(spec, &FixedTz(offset));
    let (utc, east) = (at(0), at(3600));
    if let (Some(utc), Some(east)) = (utc, east) {
        if spec.ends_with(['Z', 'z']) {
            assert_eq!(utc, east, "a Z time depends on the zone");
        } else {
            assert_eq!(
                utc.duration_since(east).ok(),
                Some(Duration::from_secs(3600))
            );
        }
    }
    if let Some(r) = net::parse_port_range(spec) {
        assert!(*r.start() >= 1 && r.start() <= r.end(), "{r:?}");
    }
    let _ = net::glob(spec, subject);
    assert!(net::glob(spec, spec), "{spec:?} does not match itself");
    // regressions/policy/crash-ba0ebf5d...: a `*` in the pattern was taken as the literal `*`
    // of the text when both had one there, with no way back: glob("*", "*a") was false.
    assert!(net::glob("*", subject), "`*` does not match {subject:?}");
}

// === config ===

/// TOML text to a validated `Config`: never a panic, and every error says where (line and
/// column, 1-based, inside the text).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, None, Path::new("/etc/sluice")) {
        Ok(c) => {
            let _ = c.describe();
            let _ = c.alpn_offered();
        }
        Err(e @ ConfigError::Invalid { .. }) => {
            let shown = e.to_string();
            let ConfigError::Invalid { at, message, .. } = e else {
                unreachable!()
            };
            assert!(!message.is_empty(), "{shown}");
            assert!(
                at.line >= 1 && at.col >= 1,
                "error without a location: {shown}"
            );
            assert!(
                at.line <= text.split('\n').count(),
                "line out of range: {shown}"
            );
        }
        Err(e) => panic!("parse reported a non-parse error: {e}"),
    }
}

// === pin ===

/// `sluice connect --pin`: whatever parses round-trips through both printed spellings, and
/// so does any 32-byte digest.
pub fn pin(data: &[u8]) {
    let check = |d: [u8; 32]| {
        assert_eq!(client::parse_pin(&client::format_pin(&d)), Ok(d));
        assert_eq!(client::parse_pin(&client::format_hex(&d)), Ok(d));
    };
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(d) = client::parse_pin(s) {
            check(d);
        }
    }
    if let Some(d) = data.get(..32) {
        check(d.try_into().expect("32 bytes"));
    }
}

// === proxy_url ===

/// `sluice connect --proxy`/`HTTPS_PROXY` and `NO_PROXY`, and the `HOST[:PORT]` target. The
/// input is three lines: a proxy URL (also parsed as a target), a `NO_PROXY` list, a target.
pub fn proxy_url(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.splitn(3, '\n');
    let (url, list, target) = (
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
    );
    if let Ok(p) = Proxy::parse(url) {
        assert!(!p.host.is_empty() && !p.host.contains('/'), "{p:?}");
        assert!(p.port != 0, "{p:?}");
        assert!(sane_host(&p.host), "proxy host {:?} from {url:?}", p.host);
    }
    for t in [url, target] {
        let Ok((host, port)) = client::parse_target(t) else {
            continue;
        };
        assert!(port != 0 && sane_host(&host), "{t:?} -> {host:?}:{port}");
        let again = client::parse_target(&format!("[{host}]:{port}")).ok();
        assert_eq!(again, Some((host.clone(), port)), "{t:?}");
        let _ = client::no_proxy_matches(list, &host, port);
        assert!(client::no_proxy_matches("*", &host, port));
        let own = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        assert!(
            client::no_proxy_matches(&own, &host, port),
            "NO_PROXY={own:?} does not cover {host:?}"
        );
    }
    let _ = client::no_proxy_matches(list, target, 443);
}

/// What `parse_target` lets through: a name or address, nothing that ends a line.
fn sane_host(h: &str) -> bool {
    !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:%".contains(&b))
}

// === connect_reply ===

/// The proxy's answer to `sluice connect`'s CONNECT, read as `via_proxy` reads it
/// (`client::read_connect_reply`) in reads of several sizes: every split gives the answer
/// `parse_connect_reply` gives for the head.
pub fn connect_reply(data: &[u8]) {
    let end = find(data, b"\r\n\r\n").map(|i| i + 4);
    let direct = end.map(|e| client::parse_connect_reply(&data[..e]));
    let small = if data.len() <= 128 { 1 } else { 17 };
    for chunk in [small, 5, 2048] {
        let mut r = Chunked::new(data, chunk);
        let got = block_on(client::read_connect_reply(&mut r, far_deadline()));
        match (got, &direct) {
            (Ok(reply), Some(want)) => assert_eq!(&reply, want, "reads of {chunk}"),
            (Ok(reply), None) => panic!("reads of {chunk}: {reply:?} without a whole head"),
            (Err(e), Some(_)) => panic!("reads of {chunk}: {e} for a whole head"),
            (Err(_), None) => {}
        }
    }
    let reply = client::parse_connect_reply(data);
    if let ConnectReply::Refused(line) = &reply {
        // It ends up in a one-line error message.
        assert!(!line.contains('\n') && line.trim() == line, "{line:?}");
    }
}

// === helpers ===

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One current-thread runtime for the whole run, with timers (the readers take deadlines).
fn block_on<F: Future>(f: F) -> F::Output {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a tokio runtime")
    })
    .block_on(f)
}

/// A deadline no in-memory read comes near.
fn far_deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(3600)
}

/// An in-memory peer: reads hand out `data` at most `chunk` bytes at a time, then EOF;
/// writes are kept in `written`.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
    written: Vec<u8>,
}

impl<'a> Chunked<'a> {
    fn new(data: &'a [u8], chunk: usize) -> Self {
        Chunked {
            data,
            chunk,
            written: Vec::new(),
        }
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let n = this.chunk.min(this.data.len()).min(buf.remaining());
        buf.put_slice(&this.data[..n]);
        this.data = &this.data[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Chunked<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

// === tunnel_inputs ===

/// What tunnel visitors and publishers send: an `Authorization` header, an SNI, a bind
/// address, a socket path, and an htpasswd file. The input is split at the first byte 0: the
/// part before is a domain candidate, the rest the text. Names that come out are DNS labels,
/// and name the host they came from; Basic credentials re-encode to what they were read from.
pub fn tunnel_inputs(data: &[u8]) {
    use sluice::tunnel::{access, name};
    let (domain, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"t.example.org"[..], data),
    };
    if let Some((user, password)) = access::basic(rest) {
        assert!(!user.contains(':'), "the user ends at the first colon");
        let again = format!("{user}:{password}");
        let enc = {
            // Standard base64, to check the round trip without a second implementation's quirks.
            const T: &[u8; 64] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let b = again.as_bytes();
            let mut out = String::new();
            for c in b.chunks(3) {
                let n = (u32::from(c[0]) << 16)
                    | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                    | u32::from(*c.get(2).unwrap_or(&0));
                for i in 0..4 {
                    if i <= c.len() {
                        out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                    } else {
                        out.push('=');
                    }
                }
            }
            out
        };
        assert_eq!(
            access::basic(format!("Basic {enc}").as_bytes()),
            Some((user, password))
        );
    }
    let (Ok(domain), Ok(text)) = (std::str::from_utf8(domain), std::str::from_utf8(rest)) else {
        return;
    };
    let domain = domain.to_ascii_lowercase();
    if let Some(n) = name::from_sni(text, &domain) {
        assert!(name::is_label(&n), "{n:?}");
        assert_eq!(
            format!("{n}.{domain}"),
            text.trim_end_matches('.').to_ascii_lowercase()
        );
    }
    if let Some(n) = name::from_host(text, &domain) {
        assert!(name::is_label(&n), "{n:?}");
    }
    if let Some(n) = name::from_socket_path(text) {
        assert!(name::is_label(&n), "{n:?}");
        assert_eq!(format!("/{n}"), text.to_ascii_lowercase());
    }
    if let Ok(h) = access::Htpasswd::parse(text) {
        for u in h.users() {
            assert!(!u.is_empty() && !u.contains(':'));
        }
    }
}

/// What the control API and `sluice audit` read from outside: a lock request and a grant request
/// (JSON bodies), and audit trail lines (`verify`, `search`). Never a panic; a lock request that
/// validates names exactly one kind of target, with a value.
pub fn control_inputs(data: &[u8]) {
    if let Ok(r) = serde_json::from_slice::<sluice::lock::LockRequest>(data) {
        if let Ok((kind, value, _, reason)) = sluice::lock::validate(&r) {
            assert!(
                matches!(kind.as_str(), "key" | "grant" | "device" | "source"),
                "{kind}"
            );
            assert!(!value.is_empty());
            assert!(!reason.contains('\n'), "{reason:?}");
        }
    }
    let _ = serde_json::from_slice::<sluice::grant::IssueRequest>(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let filter = sluice::audit::Filter {
        since: Some(std::time::UNIX_EPOCH),
        identity: Some("SHA256:".into()),
        device: Some("d".into()),
        grant: Some("g-1".into()),
        session: Some(1),
        events: vec!["session_killed".into()],
        ..Default::default()
    };
    let mut chain = sluice::audit::Chain::default();
    for line in text.lines() {
        let _ = filter.matches(line);
        if chain.follow(line).is_err() {
            chain = sluice::audit::Chain::default();
        }
    }
}

/// What `sluice tunnel` reads from outside: a SOCKS5 client's bytes (every prefix, as they
/// arrive), `-L/-R/-D` specifications, a known_hosts file and a grant bundle. A SOCKS message
/// once whole stays the same whole message as more bytes come; a forward that parses prints
/// as what parses back to it; a known_hosts file never both knows and revokes a key.
pub fn tunnel_client_inputs(data: &[u8]) {
    use sluice::client::tunnel::{self, Forward};
    for parse in [
        |b: &[u8]| tunnel::parse_greeting(b).map(|r| r.map(|n| (None, n))),
        |b: &[u8]| tunnel::parse_request(b).map(|r| r.map(|(e, n)| (Some(e), n))),
    ] {
        let mut whole = None;
        for end in 0..=data.len().min(300) {
            match (parse(&data[..end]), &whole) {
                (Ok(Some(got)), None) => {
                    assert!(got.1 <= end);
                    whole = Some(got);
                }
                (r, Some(w)) => assert_eq!(r.as_ref().ok().and_then(|x| x.as_ref()), Some(w)),
                (Ok(None) | Err(_), None) => {}
            }
        }
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.lines() {
        for (flag, parse) in [
            ("-L ", Forward::local as fn(&str) -> Result<Forward, String>),
            ("-R ", Forward::remote),
            ("-D ", Forward::dynamic),
        ] {
            let Ok(f) = parse(line) else { continue };
            let shown = f.to_string();
            let spec = shown.strip_prefix(flag).expect("printed with its flag");
            let plain = |e: &tunnel::Endpoint| !e.host.contains(['[', ']']);
            let ends = match &f {
                Forward::Local { listen, target } | Forward::Remote { listen, target } => {
                    plain(listen) && plain(target)
                }
                Forward::Dynamic { listen } => plain(listen),
            };
            if ends {
                assert_eq!(
                    parse(spec).as_ref(),
                    Ok(&f),
                    "{line:?} printed as {shown:?}"
                );
            }
        }
    }
    static KEY: OnceLock<russh::keys::PublicKey> = OnceLock::new();
    let key = KEY.get_or_init(|| {
        russh::keys::PublicKey::from_openssh(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILIG2T/B0l0gaqj3puu510tu9N1OkQ4znY3LYuEm5zCF",
        )
        .expect("a valid key")
    });
    for label in ["example.com", "[sluice.example.org]:443"] {
        match tunnel::check_known_hosts(text, label, key) {
            tunnel::Verdict::Changed { lines } => {
                let n = text.lines().count();
                assert!(!lines.is_empty() && lines.iter().all(|&l| l >= 1 && l <= n));
            }
            tunnel::Verdict::Revoked { line } => assert!(line >= 1 && line <= text.lines().count()),
            tunnel::Verdict::Known | tunnel::Verdict::Unknown => {}
        }
    }
    if let Ok(b) = tunnel::Bundle::parse(text, "fuzz") {
        assert!(!b.host_keys.is_empty());
        assert!(b
            .forwards
            .iter()
            .all(|f| matches!(f, Forward::Remote { .. })));
    }
}
