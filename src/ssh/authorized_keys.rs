//! A pure parser for OpenSSH `authorized_keys` lines and the options sluice enforces.
//!
//! russh hands options over as raw strings; sluice parses them itself. A line it cannot parse
//! (unknown option, bad value, bad key) is skipped with a warning naming file:line; the other
//! lines still load. Deny by default: an option whose meaning sluice cannot honour is an error.

use std::time::SystemTime;

use russh::keys::ssh_key::PublicKey;

use super::policy::{parse_expiry, FromList, KeyPermitOpen, LocalOffset, PermitListen};

/// What one authorized key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOptions {
    /// Port forwarding (`-L`, `-W`, `-J`, `-R`) allowed: off under `restrict` or
    /// `no-port-forwarding`, back on with `port-forwarding`.
    pub port_forwarding: bool,
    /// `permitopen=` entries; `None` means no per-key restriction.
    pub permit_open: Option<Vec<KeyPermitOpen>>,
    /// `permitlisten=` entries; `None` means no per-key restriction.
    pub permit_listen: Option<Vec<PermitListen>>,
    /// `from=`: client addresses allowed.
    pub from: Option<FromList>,
    /// `expiry-time=`: not accepted after this, and sessions end then.
    pub expiry: Option<SystemTime>,
    /// `cert-authority`: the key signs user certificates instead of logging in itself.
    pub cert_authority: bool,
    /// `principals=` (cert-authority lines only): names a certificate must carry one of.
    pub principals: Option<Vec<String>>,
}

impl Default for KeyOptions {
    fn default() -> Self {
        KeyOptions {
            port_forwarding: true,
            permit_open: None,
            permit_listen: None,
            from: None,
            expiry: None,
            cert_authority: false,
            principals: None,
        }
    }
}

/// One usable line.
#[derive(Debug, Clone)]
pub struct AuthorizedKey {
    /// The key.
    pub key: PublicKey,
    /// Its options.
    pub options: KeyOptions,
    /// `file:line`, for logs.
    pub origin: String,
}

/// A skipped line and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// `file:line`.
    pub origin: String,
    /// Why it was skipped.
    pub reason: String,
}

const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
];

/// Parses a whole file, as bytes; `name` is used in origins. A line that is not UTF-8 is
/// skipped like any other bad line (the rest still load): one stray Latin-1 byte must not keep
/// a whole file, and the keys it revokes, from loading. Comment lines are not decoded.
pub fn parse(bytes: &[u8], name: &str, tz: &dyn LocalOffset) -> (Vec<AuthorizedKey>, Vec<Skipped>) {
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    // As `str::lines`: lines end at `\n`, a `\r` before it is dropped, no empty last line.
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let origin = format!("{name}:{}", i + 1);
        let indent = raw.len() - raw.trim_ascii_start().len();
        let raw = raw.trim_ascii();
        if raw.is_empty() || raw.starts_with(b"#") {
            continue;
        }
        let line = match std::str::from_utf8(raw) {
            Ok(l) => l.trim(),
            Err(e) => {
                let at = e.valid_up_to();
                let byte = raw.get(at).copied().unwrap_or_default();
                skipped.push(Skipped {
                    origin,
                    reason: format!(
                        "not UTF-8 (byte 0x{byte:02X} at column {}): the line is skipped",
                        indent + at + 1
                    ),
                });
                continue;
            }
        };
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line, tz) {
            Ok((key, options)) => keys.push(AuthorizedKey {
                key,
                options,
                origin,
            }),
            Err(reason) => skipped.push(Skipped { origin, reason }),
        }
    }
    (keys, skipped)
}

/// Parses one non-empty, non-comment line.
pub fn parse_line(line: &str, tz: &dyn LocalOffset) -> Result<(PublicKey, KeyOptions), String> {
    let first = line.split_whitespace().next().unwrap_or("");
    let (opts_text, key_text) = if KEY_TYPES.contains(&first) {
        ("", line)
    } else {
        let end = options_end(line).ok_or("unterminated quote in the options")?;
        (&line[..end], line[end..].trim_start())
    };
    let options = parse_options(opts_text, tz)?;
    let key_type = key_text.split_whitespace().next().unwrap_or("");
    if !KEY_TYPES.contains(&key_type) {
        return Err(format!("`{key_type}` is not a known key type"));
    }
    if key_type == "ssh-dss" {
        return Err("DSA keys are not accepted".into());
    }
    if key_type.starts_with("sk-") {
        // russh checks the signature but not the user-presence flag: a token would sign
        // without a touch. Refuse rather than weaken what OpenSSH would enforce.
        return Err("security-key (sk-) keys are not supported".into());
    }
    let key = PublicKey::from_openssh(key_text).map_err(|e| format!("bad key: {e}"))?;
    Ok((key, options))
}

/// Where the options part ends: the first whitespace outside double quotes.
fn options_end(line: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// Splits options at commas outside quotes; unquotes values.
fn split_options(s: &str) -> Result<Vec<(String, Option<String>)>, String> {
    let mut out = Vec::new();
    let mut name = String::new();
    let mut value: Option<String> = None;
    let mut chars = s.chars().peekable();
    loop {
        match chars.next() {
            None | Some(',') => {
                if name.is_empty() {
                    return Err("empty option".into());
                }
                out.push((std::mem::take(&mut name).to_ascii_lowercase(), value.take()));
                if chars.peek().is_none() && s.ends_with(',') {
                    return Err("trailing comma in the options".into());
                }
                if chars.peek().is_none() {
                    return Ok(out);
                }
            }
            Some('=') if value.is_none() => {
                if chars.next() != Some('"') {
                    return Err(format!("option `{name}` needs a quoted value"));
                }
                let mut v = String::new();
                loop {
                    match chars.next() {
                        None => return Err(format!("unterminated value for `{name}`")),
                        Some('\\') if chars.peek() == Some(&'"') => {
                            chars.next();
                            v.push('"');
                        }
                        Some('"') => break,
                        Some(c) => v.push(c),
                    }
                }
                if !matches!(chars.peek(), None | Some(',')) {
                    return Err(format!("junk after the value of `{name}`"));
                }
                value = Some(v);
            }
            Some(c) if value.is_none() && (c.is_ascii_alphanumeric() || c == '-') => name.push(c),
            Some(c) => return Err(format!("unexpected `{c}` in the options")),
        }
    }
}

fn parse_options(text: &str, tz: &dyn LocalOffset) -> Result<KeyOptions, String> {
    let mut o = KeyOptions::default();
    if text.is_empty() {
        return Ok(o);
    }
    // Applied in order, as OpenSSH does: `port-forwarding,restrict` ends up restricted.
    let mut forwarding = true;
    for (name, value) in split_options(text)? {
        let need = |v: &Option<String>| {
            v.clone()
                .ok_or_else(|| format!("option `{name}` needs a value"))
        };
        let flag = |v: &Option<String>| {
            if v.is_some() {
                Err(format!("option `{name}` takes no value"))
            } else {
                Ok(())
            }
        };
        match name.as_str() {
            "restrict" => {
                flag(&value)?;
                forwarding = false;
            }
            "port-forwarding" => {
                flag(&value)?;
                forwarding = true;
            }
            "no-port-forwarding" => {
                flag(&value)?;
                forwarding = false;
            }
            "permitopen" => {
                let v = need(&value)?;
                let p = KeyPermitOpen::parse(&v)
                    .ok_or_else(|| format!("permitopen=\"{v}\" is not host:port"))?;
                o.permit_open.get_or_insert_with(Vec::new).push(p);
            }
            "permitlisten" => {
                let v = need(&value)?;
                let p = PermitListen::parse(&v)
                    .ok_or_else(|| format!("permitlisten=\"{v}\" is not [host:]port"))?;
                o.permit_listen.get_or_insert_with(Vec::new).push(p);
            }
            "from" => {
                let v = need(&value)?;
                if o.from.is_some() {
                    return Err("more than one from= option".into());
                }
                let list = FromList::parse(&v)
                    .ok_or_else(|| format!("from=\"{v}\" is not a pattern list"))?;
                o.from = Some(list);
            }
            "expiry-time" => {
                let v = need(&value)?;
                let t = parse_expiry(&v, tz)
                    .ok_or_else(|| format!("expiry-time=\"{v}\" is not YYYYMMDD[HHMM[SS]][Z]"))?;
                // Several: the earliest wins.
                o.expiry = Some(o.expiry.map_or(t, |e| e.min(t)));
            }
            "cert-authority" => {
                flag(&value)?;
                o.cert_authority = true;
            }
            "principals" => {
                let v = need(&value)?;
                let list: Vec<String> = v
                    .split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect();
                if list.is_empty() {
                    return Err("principals=\"\" lists no principal".into());
                }
                if o.principals.is_some() {
                    return Err("more than one principals= option".into());
                }
                o.principals = Some(list);
            }
            // sluice runs no commands, shells, agents or X11: these restrict nothing it offers.
            "command" | "environment" => {
                need(&value)?;
            }
            "no-pty"
            | "pty"
            | "no-agent-forwarding"
            | "agent-forwarding"
            | "no-x11-forwarding"
            | "x11-forwarding"
            | "no-user-rc"
            | "user-rc"
            | "no-touch-required" => flag(&value)?,
            other => return Err(format!("unsupported option `{other}`")),
        }
    }
    o.port_forwarding = forwarding;
    if o.principals.is_some() && !o.cert_authority {
        return Err("principals= is only valid on a cert-authority line".into());
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    struct Utc;
    impl LocalOffset for Utc {
        fn offset_secs(&self, _: i64) -> i64 {
            0
        }
    }

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMJKXfAJmlQlR0x7EOP6gqW/yzdmwWIDcovSSfECidw1 user@host";

    fn opts(o: &str) -> Result<KeyOptions, String> {
        parse_line(&format!("{o} {KEY}"), &Utc).map(|(_, o)| o)
    }

    #[test]
    fn bare_key() {
        let (k, o) = parse_line(KEY, &Utc).unwrap();
        assert_eq!(AsRef::<str>::as_ref(k.comment()), "user@host");
        assert_eq!(o, KeyOptions::default());
    }

    #[test]
    fn restrict_and_forwarding() {
        assert!(!opts("restrict").unwrap().port_forwarding);
        assert!(opts("restrict,port-forwarding").unwrap().port_forwarding);
        assert!(
            !opts("port-forwarding,restrict").unwrap().port_forwarding,
            "applied in order"
        );
        assert!(!opts("no-port-forwarding").unwrap().port_forwarding);
        assert!(!opts("NO-PORT-FORWARDING,no-pty").unwrap().port_forwarding);
    }

    #[test]
    fn valued_options() {
        let o = opts(
            r#"restrict,port-forwarding,permitlisten="localhost:21234",permitopen="127.0.0.1:9",permitopen="db:5432",from="198.51.100.0/24",expiry-time="202611231500Z",command="/usr/bin/false""#,
        )
        .unwrap();
        assert!(o.port_forwarding);
        assert_eq!(o.permit_open.as_ref().unwrap().len(), 2);
        assert!(o.permit_open.as_ref().unwrap()[1].matches("db", 5432));
        assert!(o.permit_listen.as_ref().unwrap()[0].matches("localhost", 21234));
        assert!(o
            .from
            .as_ref()
            .unwrap()
            .allows("198.51.100.9".parse().unwrap()));
        assert_eq!(
            o.expiry,
            Some(UNIX_EPOCH + Duration::from_secs(1_795_392_000 + 15 * 3600))
        );
    }

    #[test]
    fn earliest_expiry_wins() {
        let o = opts(r#"expiry-time="20300101Z",expiry-time="20290101Z""#).unwrap();
        assert_eq!(o.expiry, parse_expiry("20290101Z", &Utc));
    }

    #[test]
    fn cert_authority_lines() {
        let o = opts(r#"cert-authority,principals="alice,deploy""#).unwrap();
        assert!(o.cert_authority);
        assert_eq!(
            o.principals,
            Some(vec!["alice".to_string(), "deploy".to_string()])
        );
        assert!(opts(r#"principals="alice""#).is_err());
    }

    #[test]
    fn quoted_commas_and_spaces() {
        let o = opts(r#"command="echo a, b c",from="10.0.0.0/8,!10.0.0.1""#).unwrap();
        assert!(!o.from.as_ref().unwrap().allows("10.0.0.1".parse().unwrap()));
        assert!(o.from.as_ref().unwrap().allows("10.0.0.2".parse().unwrap()));
    }

    #[test]
    fn bad_lines_are_reasons_not_panics() {
        for (line, why) in [
            (format!("tunnel=\"1\" {KEY}"), "unsupported option `tunnel`"),
            (format!("permitopen=\"x:0\" {KEY}"), "not host:port"),
            (format!("permitopen=x:1 {KEY}"), "needs a quoted value"),
            (format!("from=\"10.0.0.0/99\" {KEY}"), "not a pattern list"),
            (format!("expiry-time=\"2026\" {KEY}"), "not YYYYMMDD"),
            (format!("restrict=\"x\" {KEY}"), "takes no value"),
            (format!("command=\"x {KEY}"), "unterminated"),
            ("ssh-ed25519 AAAAnotbase64!! x".to_string(), "bad key"),
            ("ssh-foo AAAA".to_string(), "`ssh-foo`"),
            (
                "restrict ssh-foo AAAA".to_string(),
                "`ssh-foo` is not a known key type",
            ),
            (format!("restrict,,port-forwarding {KEY}"), "empty option"),
            (
                format!("from=\"10.0.0.1\",from=\"*\" {KEY}"),
                "more than one from=",
            ),
            (
                format!("cert-authority,principals=\"a\",principals=\"b\" {KEY}"),
                "more than one principals=",
            ),
            (
                "sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29tAAAAIA== x"
                    .to_string(),
                "security-key",
            ),
        ] {
            let e = parse_line(&line, &Utc).unwrap_err();
            assert!(e.contains(why), "{line}: {e}");
        }
    }

    #[test]
    fn file_skips_bad_lines_and_keeps_the_rest() {
        let text = format!("# comment\n\n{KEY}\nbogus-option {KEY}\n  restrict {KEY}\n");
        let (keys, skipped) = parse(text.as_bytes(), "/etc/sluice/authorized_keys", &Utc);
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].origin, "/etc/sluice/authorized_keys:3");
        assert_eq!(keys[1].origin, "/etc/sluice/authorized_keys:5");
        assert_eq!(
            skipped,
            vec![Skipped {
                origin: "/etc/sluice/authorized_keys:4".into(),
                reason: "unsupported option `bogus-option`".into()
            }]
        );
    }

    #[test]
    fn a_line_that_is_not_utf8_is_skipped_and_named_the_rest_load() {
        // A Latin-1 comment on one key (é is 0xE9), a Latin-1 comment line, CRLF endings.
        let mut text = format!("{KEY}\r\n").into_bytes();
        text.extend_from_slice(b"  restrict ");
        text.extend_from_slice(KEY.as_bytes());
        text.extend_from_slice(b" Jos\xe9\r\n# Jos\xe9 left\n");
        text.extend_from_slice(format!("no-pty {KEY}").as_bytes());
        let (keys, skipped) = parse(&text, "f", &Utc);
        let origins: Vec<&str> = keys.iter().map(|k| k.origin.as_str()).collect();
        assert_eq!(origins, ["f:1", "f:4"], "the other lines load");
        let col = 2 + "restrict ".len() + KEY.len() + " Jos".len() + 1;
        assert_eq!(
            skipped,
            vec![Skipped {
                origin: "f:2".into(),
                reason: format!("not UTF-8 (byte 0xE9 at column {col}): the line is skipped"),
            }]
        );
    }

    #[test]
    fn line_numbers_match_str_lines() {
        for text in ["", "\n", "a\n\nb", "a\r\nb\r\n", "\n\n\nx\n"] {
            let (keys, skipped) = parse(text.as_bytes(), "f", &Utc);
            let mut got: Vec<String> = skipped.into_iter().map(|s| s.origin).collect();
            got.extend(keys.into_iter().map(|k| k.origin));
            got.sort();
            let want: Vec<String> = text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, _)| format!("f:{}", i + 1))
                .collect();
            assert_eq!(got, want, "{text:?}");
        }
    }
}
