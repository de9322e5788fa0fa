//! Property tests: the incremental parsers of outside bytes give the same verdict however the
//! bytes are split, i.e. a decision taken on a prefix never changes when more bytes arrive, and
//! waiting ("need more") never hides a decision the whole input would give at that point.
// Test and benchmark code: a panic (unwrap) is the failure report, and wall-clock time is
// what a benchmark or an end-to-end test against real processes measures.
#![allow(clippy::unwrap_used, clippy::disallowed_types, unreachable_pub)]

use proptest::prelude::*;
use sluice::detect::{classify, Candidates, Verdict, MAX_SIGNATURE};
use sluice::proxy_protocol::{self, Decoded};

/// Bytes that often form signatures: fragments of TLS, SSH, HTTP and PROXY headers.
fn protocolish() -> impl Strategy<Value = Vec<u8>> {
    let pieces = prop::sample::select(vec![
        &b"SSH-2.0-"[..],
        b"GET ",
        b"PROPFIND ",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x16\x03\x01",
        b"PROXY TCP4 ",
        b"PROXY TCP6 ",
        b"PROXY UNKNOWN\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n",
        b"203.0.113.9 192.0.2.1 5555 443\r\n",
        b"\x21\x11\x00\x0c",
        b"\x20\x00\x00\x00",
        b"\x7f\x00\x00\x01",
        b" ",
        b"\r\n",
    ]);
    prop::collection::vec(
        prop_oneof![
            pieces.prop_map(<[u8]>::to_vec),
            prop::collection::vec(any::<u8>(), 0..4)
        ],
        0..8,
    )
    .prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn classify_is_the_same_wherever_the_input_is_split(buf in protocolish(), at in 0usize..64) {
        let at = at.min(buf.len());
        for c in [Candidates::OUTER, Candidates::INNER] {
            let early = classify(&buf[..at], c);
            if early != Verdict::NeedMore {
                prop_assert_eq!(classify(&buf, c), early, "{:?} split at {}", buf, at);
            }
            if buf.len() >= MAX_SIGNATURE {
                prop_assert_ne!(classify(&buf, c), Verdict::NeedMore);
            }
        }
    }

    #[test]
    fn proxy_header_is_the_same_wherever_the_input_is_split(buf in protocolish(), at in 0usize..128) {
        let at = at.min(buf.len());
        let early = proxy_protocol::decode(&buf[..at]);
        let whole = proxy_protocol::decode(&buf);
        match early {
            Ok(Decoded::Incomplete) => {}
            Ok(Decoded::NotProxy) => prop_assert!(matches!(whole, Ok(Decoded::NotProxy))),
            Ok(Decoded::Header { addrs, len }) => {
                prop_assert!(len <= at);
                prop_assert!(
                    matches!(whole, Ok(Decoded::Header { addrs: a, len: l }) if a == addrs && l == len),
                    "{:?} split at {}: {:?} then {:?}", buf, at, early, whole
                );
            }
            Err(_) => prop_assert!(whole.is_err(), "{:?} split at {}", buf, at),
        }
    }
}
