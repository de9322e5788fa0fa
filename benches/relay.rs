//! Loopback throughput of the two relay cores: the buffered copy relay (used for TLS legs) and
//! splice(2) (plain legs). Each iteration moves 64 MiB client -> upstream through the relay
//! over fresh loopback TCP connections. Run: `cargo bench --bench relay`.
// Test and benchmark code: a panic (unwrap) is the failure report, and wall-clock time is
// what a benchmark or an end-to-end test against real processes measures.
#![allow(clippy::unwrap_used, clippy::disallowed_types, missing_docs)]

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice::relay::{self, splice::PipePool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const SIZE: usize = 64 << 20;

async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}

/// Moves SIZE bytes through one relay; returns the time the transfer took.
async fn once(splice: bool, pool: &std::sync::Arc<PipePool>) -> Duration {
    let (mut client_peer, mut client) = pair().await;
    let (mut upstream, mut upstream_peer) = pair().await;
    let stop = CancellationToken::new();
    let pool = pool.clone();
    let start = Instant::now();
    let relay = tokio::spawn(async move {
        if splice {
            relay::splice::relay(
                &pool,
                &client,
                &upstream,
                relay::Idle::new(Duration::from_secs(60)),
                &stop,
            )
            .await
            .expect("pipes");
        } else {
            relay::relay(
                &mut client,
                &mut upstream,
                relay::Idle::new(Duration::from_secs(60)),
                &stop,
            )
            .await;
        }
    });
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..SIZE / chunk.len() {
            client_peer.write_all(&chunk).await.unwrap();
        }
        client_peer.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = client_peer.read_to_end(&mut rest).await;
    });
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    loop {
        let n = upstream_peer.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, SIZE);
    let took = start.elapsed();
    drop(upstream_peer);
    writer.await.unwrap();
    relay.await.unwrap();
    took
}

fn relays(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pool = PipePool::new(2);
    let mut g = c.benchmark_group("relay_64MiB_loopback");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.sample_size(10);
    for (name, splice) in [("copy", false), ("splice", true)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += rt.block_on(once(splice, &pool));
                }
                total
            });
        });
    }
    g.finish();
}

criterion_group!(benches, relays);
criterion_main!(benches);
