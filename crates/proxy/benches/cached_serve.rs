//! `cargo bench -p iam-broker-proxy --bench cached_serve`: the proxy in-process over loopback
//! HTTP in front of the fake broker of the tests. Prints latency percentiles of a cached serve
//! (one keep-alive connection), of a miss (a broker round trip), and how many broker calls a
//! burst of concurrent misses for one token costs (single flight). Load against the release
//! binary, side by side with nginx, is `scripts/bench-proxy.sh` (wrk).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::Harness;

const CACHED_REQUESTS: usize = 20_000;
const MISS_REQUESTS: usize = 2_000;
const BURST: usize = 200;

fn percentiles(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:<44} n={:<6} p50={:>7.1?} p90={:>7.1?} p99={:>7.1?} max={:>7.1?}",
        samples.len(),
        at(0.50),
        at(0.90),
        at(0.99),
        at(1.0)
    );
}

fn token(i: usize) -> String {
    // 43 base64url characters after the prefix, distinct per i.
    format!("iamb_{:0>43}", i)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let h = Harness::start(&[]).await;

    // Cached: one token, fetched once, then served from the cache.
    let cached = token(0);
    assert_eq!(h.get(Some(&cached)).await.status, StatusCode::OK);
    for _ in 0..1_000 {
        h.get(Some(&cached)).await;
    }
    let mut samples = Vec::with_capacity(CACHED_REQUESTS);
    for _ in 0..CACHED_REQUESTS {
        let started = Instant::now();
        let reply = h.get(Some(&cached)).await;
        samples.push(started.elapsed());
        assert_eq!(reply.status, StatusCode::OK);
    }
    let calls_before = h.broker.calls();
    percentiles("cached serve (hit), 1 connection", samples);
    assert_eq!(calls_before, 1, "every measured request was a hit");

    // Misses: a new token each time, so each request is a broker round trip.
    let mut samples = Vec::with_capacity(MISS_REQUESTS);
    for i in 1..=MISS_REQUESTS {
        let t = token(i);
        let started = Instant::now();
        let reply = h.get(Some(&t)).await;
        samples.push(started.elapsed());
        assert_eq!(reply.status, StatusCode::OK);
    }
    percentiles("miss (proxy + loopback broker round trip)", samples);

    // Single flight: a burst of concurrent misses for one token while the broker is slow.
    h.broker.set_latency(Duration::from_millis(50));
    let burst = token(MISS_REQUESTS + 1);
    let before = h.broker.calls();
    let started = Instant::now();
    let replies = futures::future::join_all((0..BURST).map(|_| h.get(Some(&burst)))).await;
    let elapsed = started.elapsed();
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    println!(
        "single flight: {BURST} concurrent misses for one token -> {} broker call(s), all served in {elapsed:.1?}",
        h.broker.calls() - before
    );
}
