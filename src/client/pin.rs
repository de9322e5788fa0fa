//! Certificate pins: the SHA-256 of the server's certificate, in the spellings people already
//! have. Pure, no I/O.

/// Parses a pin: `sha256:BASE64`, `sha256//BASE64`, bare base64, colon-separated hex as
/// `openssl x509 -fingerprint -sha256` prints it (with or without its `sha256 Fingerprint=`
/// prefix), or `sha256:HEX`.
pub fn parse_pin(s: &str) -> Result<[u8; 32], String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = if let Some(rest) = lower.strip_prefix("sha256 fingerprint=") {
        &t[t.len() - rest.len()..]
    } else if let Some(rest) = lower.strip_prefix("sha256//") {
        &t[t.len() - rest.len()..]
    } else if let Some(rest) = lower.strip_prefix("sha256:") {
        &t[t.len() - rest.len()..]
    } else {
        t
    };
    let bad = || {
        format!(
            "`{s}` is not a SHA-256 fingerprint (sha256:BASE64, sha256//BASE64 or AB:CD:... hex)"
        )
    };
    let hex: String = body.chars().filter(|c| *c != ':').collect();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        return Ok(out);
    }
    let bytes = base64_decode(body).ok_or_else(bad)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| bad())
}

/// The pin spelling sluice prints: `sha256:BASE64` (what OpenSSH users know from ssh-keygen).
pub fn format_pin(digest: &[u8; 32]) -> String {
    format!("sha256:{}", base64_encode(digest))
}

/// Colon-separated uppercase hex, as `openssl x509 -fingerprint -sha256` and `sluice serve` print.
pub fn format_hex(digest: &[u8]) -> String {
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub(crate) fn base64(data: &[u8]) -> String {
    base64_encode(data)
}

fn base64_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard or URL-safe base64, padding optional.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(v);
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    (n < 6 && bits == 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // SHA-256 of "abc".
    const D: [u8; 32] = [
        0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d, 0xae, 0x22,
        0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00,
        0x15, 0xad,
    ];

    #[test]
    fn every_spelling() {
        let b64 = "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=";
        let hex = "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD";
        for s in [
            format!("sha256:{b64}"),
            format!("sha256//{b64}"),
            format!("SHA256:{}", b64.trim_end_matches('=')),
            b64.to_string(),
            hex.to_string(),
            hex.to_lowercase(),
            hex.replace(':', ""),
            format!("sha256:{hex}"),
            format!("sha256 Fingerprint={hex}"),
            "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0".to_string(),
        ] {
            assert_eq!(parse_pin(&s), Ok(D), "{s}");
        }
        assert_eq!(format_pin(&D), format!("sha256:{b64}"));
        assert_eq!(format_hex(&D), hex);
    }

    #[test]
    fn wrong_lengths_and_junk() {
        for s in [
            "",
            "sha256:",
            "sha256:AAAA",
            "xyz",
            "BA:78",
            "sha256:!!!!",
            &"A".repeat(45),
        ] {
            assert!(parse_pin(s).is_err(), "{s}");
        }
    }
}
