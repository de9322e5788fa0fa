//! Micro-benchmarks of the pure parts on the connection path: the classifier and the PROXY
//! header encoder. Run: `cargo bench --bench detect`.
// Test and benchmark code: a panic (unwrap) is the failure report, and wall-clock time is
// what a benchmark or an end-to-end test against real processes measures.
#![allow(clippy::unwrap_used, clippy::disallowed_types, missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice::detect::{classify, Candidates};
use sluice::proxy_protocol::{self, ProxyVersion};

fn classifier(c: &mut Criterion) {
    let samples: [(&str, &[u8], Candidates); 5] = [
        (
            "ssh-banner",
            b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n",
            Candidates::INNER,
        ),
        (
            "http1-get",
            b"GET /index.html HTTP/1.1\r\nHost: example.com\r\n\r\n",
            Candidates::INNER,
        ),
        (
            "h2-preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            Candidates::INNER,
        ),
        (
            "client-hello",
            &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01],
            Candidates::OUTER,
        ),
        ("junk", b"\xff\xfe random bytes", Candidates::OUTER),
    ];
    let mut g = c.benchmark_group("classify");
    g.throughput(Throughput::Elements(1));
    for (name, bytes, cands) in samples {
        g.bench_function(name, |b| b.iter(|| classify(black_box(bytes), cands)));
    }
    g.finish();
}

fn proxy_header(c: &mut Criterion) {
    let src = "192.0.2.1:56324".parse().unwrap();
    let dst = "198.51.100.7:443".parse().unwrap();
    let src6 = "[2001:db8::1]:56324".parse().unwrap();
    let dst6 = "[2001:db8::2]:443".parse().unwrap();
    let mut g = c.benchmark_group("proxy_header");
    let mut out = Vec::with_capacity(128);
    for (name, v, s, d) in [
        ("v1-ipv4", ProxyVersion::V1, src, dst),
        ("v2-ipv4", ProxyVersion::V2, src, dst),
        ("v2-ipv6", ProxyVersion::V2, src6, dst6),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                proxy_protocol::encode(v, black_box(s), black_box(d), &mut out);
                out.len()
            });
        });
        // Decoding the same header, as sluice does for trusted_proxies.
        let mut header = Vec::new();
        proxy_protocol::encode(v, s, d, &mut header);
        g.bench_function(format!("decode-{name}"), |b| {
            b.iter(|| proxy_protocol::decode(black_box(&header)));
        });
    }
    g.finish();
}

criterion_group!(benches, classifier, proxy_header);
criterion_main!(benches);
