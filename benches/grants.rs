//! What a grant costs: `Grants::issue` end to end (validation, an Ed25519 key pair, the
//! certificate, the store's write transaction with its port allotment), with sluice making
//! the key and with the device's own; then the store's size per grant. Run:
//! `cargo bench --bench grants`; with `GRANTS_BENCH_REDIS=redis://127.0.0.1:6379/0`, the same
//! against that Redis (its keys under a fresh prefix; the size is Redis's `used_memory` growth).
// Test and benchmark code: a panic (unwrap) is the failure report, and wall-clock time is
// what a benchmark measures.
#![allow(clippy::unwrap_used, clippy::disallowed_types, missing_docs)]

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, Criterion};
use sluice::config::Config;
use sluice::grant::{Grants, IssueRequest};

/// The config of a grants server with a port range wide enough for every iteration.
fn open(dir: &Path) -> Grants {
    let store = match std::env::var("GRANTS_BENCH_REDIS") {
        Ok(url) => {
            let n = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            format!("[store]\nredis = \"{url}\"\nprefix = \"bench{n}:\"\n")
        }
        Err(_) => String::new(),
    };
    let cfg = Config::parse(
        &format!("listen = [\"127.0.0.1:8443\"]\n[routes.ssh]\n[ssh]\nlisten_ports = \"1024-65535\"\n[tunnels]\ndomain = \"t.example.org\"\n[grants]\nmax_ttl = \"1h\"\n{store}"),
        None,
        dir,
    )
    .unwrap();
    Grants::open(
        cfg.grants.as_ref().unwrap(),
        &cfg.embedded_ssh,
        cfg.tunnels.as_ref(),
        std::sync::Arc::new(sluice::store::Store::open_with(&cfg.store, dir).unwrap()),
        dir,
        cfg.listen[0],
        vec!["SHA256:bench".into()],
    )
    .unwrap()
}

fn issue(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let grants = open(dir.path());
    let n = AtomicU64::new(0);
    // Revoked right after, so the live set (and the port scan) stays small: what an issue
    // costs on a store that has seen many grants.
    let mut g = c.benchmark_group("grant_issue");
    g.bench_function("sluice_makes_the_key", |b| {
        b.iter(|| {
            let i = n.fetch_add(1, Ordering::Relaxed);
            let req = IssueRequest {
                device: format!("dev-{i}"),
                ..IssueRequest::default()
            };
            let issued = grants.issue(&req, "bench").unwrap();
            grants.revoke(&issued.grant.id).unwrap();
        });
    });
    let own =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDrmWEmAMbbhwrpqzm4CRwHu2yS0hqcObBoMgCDvVRNz device";
    g.bench_function("device_key", |b| {
        b.iter(|| {
            let i = n.fetch_add(1, Ordering::Relaxed);
            let req = IssueRequest {
                device: format!("dev-{i}"),
                public_key: Some(own.into()),
                ..IssueRequest::default()
            };
            let issued = grants.issue(&req, "bench").unwrap();
            grants.revoke(&issued.grant.id).unwrap();
        });
    });
    g.finish();
    // The store's size per grant, over 10,000 more (live ones: a port each).
    let size = |p: &Path| {
        ["", "-wal"]
            .iter()
            .map(|s| std::fs::metadata(format!("{}{s}", p.display())).map_or(0, |m| m.len()))
            .sum::<u64>()
    };
    let fresh = tempfile::tempdir().unwrap();
    let grants = open(fresh.path());
    let db = fresh.path().join("sluice.db");
    let redis_memory = || -> Option<u64> {
        let url = std::env::var("GRANTS_BENCH_REDIS").ok()?;
        let mut c = redis::Client::open(url).ok()?.get_connection().ok()?;
        let info: String = redis::cmd("INFO").arg("memory").query(&mut c).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
    };
    let size = |p: &Path| redis_memory().unwrap_or_else(|| size(p));
    let before = size(&db);
    let count = 10_000u64;
    for i in 0..count {
        let req = IssueRequest {
            device: format!(
                "00:1b:44:{:02x}:{:02x}:{:02x}",
                i >> 16 & 0xff,
                i >> 8 & 0xff,
                i & 0xff
            ),
            public_key: Some(own.into()),
            ..IssueRequest::default()
        };
        grants.issue(&req, "bench").unwrap();
    }
    let after = size(&db);
    println!(
        "store size: {count} live grants (MAC-address device ids, names, a port each): {} KiB, {:.0} bytes per grant ({})",
        (after - before) / 1024,
        (after - before) as f64 / count as f64,
        if redis_memory().is_some() {
            "Redis used_memory"
        } else {
            "sluice.db and its WAL"
        }
    );
}

criterion_group!(benches, issue);
criterion_main!(benches);
