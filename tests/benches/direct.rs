//! The broker's credential cache (run with `cargo bench -p iam-broker-tests --bench direct`):
//!
//! 1. its memory at 10,000 pods: 10,000 pods' credentials (AssumeRole-sized: a 20-character
//!    access key id, a 40-character secret, a session token of 1,100 characters, and of 2,048
//!    with session tags and `SourceIdentity`) go through `CredentialCache::get_or_issue`; the
//!    credential bytes it holds and the resident-memory growth (`VmRSS` before and after) are
//!    printed, per entry too. Each size is filled in a process of its own (this binary, run
//!    again with `fill`), so one fill's freed memory cannot hide the next one's;
//! 2. what a request costs the broker with the cache, in memory (memory stores and
//!    `MemoryIssuer`, so STS's own latency is left out): a hit, a miss, and no cache at all.
//!
//! It prints Markdown for BENCHMARKS.md ("Direct mode"). Every loop is bounded.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use iam_broker_broker::broker::{Broker, BrokerSettings};
use iam_broker_broker::cache::{CacheKey, CredentialCache, Holder};
use iam_broker_kernel::allowance::{RoleArn, Subject};
use iam_broker_kernel::credentials::Credentials;
use iam_broker_kernel::ports::{AllowanceStore, AssumeRoleRequest, TokenStore};
use iam_broker_kernel::record::{Grant, mint};
use iam_broker_kernel::{SystemClock, clock::Clock};
use iam_broker_testkit::memory::{MemoryAllowanceStore, MemoryIssuer, MemoryTokenStore};

const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";
const PODS: usize = 10_000;

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn request(pod: usize, tags: bool) -> AssumeRoleRequest {
    AssumeRoleRequest {
        role_arn: ROLE.to_owned(),
        session_name: format!("team-a_app_web-{pod}"),
        duration: Duration::from_secs(3600),
        tags: if tags {
            vec![
                ("kubernetes-namespace", "team-a".to_owned()),
                ("kubernetes-service-account", "app".to_owned()),
                ("kubernetes-pod-name", format!("web-{pod}")),
            ]
        } else {
            Vec::new()
        },
        source_identity: tags.then(|| "team-a_app".to_owned()),
        external_id: None,
        policy: None,
    }
}

async fn fill(token_len: usize, tags: bool) -> (usize, usize, u64) {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let cache = CredentialCache::new(PODS, clock.clone());
    let subject = Subject::service_account("team-a", "app").unwrap();
    let before = resident_kib();
    for pod in 0..PODS {
        let uid = format!("8d5c2b7e-0000-4000-8000-{pod:012}");
        let key = CacheKey::new(&subject, Holder::PodUid(&uid), &request(pod, tags));
        let expiration = clock.now() + time::Duration::hours(1);
        cache
            .get_or_issue(key, || async move {
                Ok(Credentials {
                    access_key_id: format!("ASIA{pod:016}"),
                    secret_access_key: "s".repeat(40),
                    session_token: "t".repeat(token_len),
                    expiration,
                })
            })
            .await
            .unwrap();
    }
    let after = resident_kib();
    let (len, bytes) = (cache.len(), cache.credential_bytes());
    drop(cache);
    (len, bytes, after.saturating_sub(before))
}

fn p50(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

async fn per_request(cache: Option<usize>, distinct_pods: bool) -> Duration {
    let allowances = Arc::new(MemoryAllowanceStore::default());
    let tokens = Arc::new(MemoryTokenStore::default());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let subject = Subject::service_account("team-a", "app").unwrap();
    allowances.allow(&subject, ROLE, None).await.unwrap();
    let mut broker = Broker::new(
        allowances,
        tokens.clone(),
        Arc::new(MemoryIssuer::new(clock.clone())),
        clock.clone(),
        BrokerSettings {
            credential_duration: Duration::from_secs(3600),
            token_ttl: Duration::from_secs(86_400),
            session_tags: false,
            source_identity: false,
            cluster_name: None,
        },
    );
    if let Some(entries) = cache {
        broker = broker.with_cache(CredentialCache::new(entries, clock.clone()));
    }
    let mut minted = Vec::new();
    for pod in 0..if distinct_pods { 4_000 } else { 1 } {
        let (token, record) = mint(
            Grant {
                subject: subject.clone(),
                role_arn: RoleArn::parse(ROLE).unwrap(),
                pod_name: Some(format!("web-{pod}")),
                secret_name: None,
            },
            clock.now(),
            Duration::from_secs(86_400),
        )
        .unwrap();
        tokens.insert(&record).await.unwrap();
        minted.push(token);
    }
    let mut samples = Vec::with_capacity(4_000);
    for i in 0..4_000 {
        let token = &minted[i % minted.len()];
        let started = Instant::now();
        broker
            .credentials(Some(token.expose()), None)
            .await
            .unwrap();
        samples.push(started.elapsed());
    }
    p50(samples)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let args: Vec<String> = std::env::args().collect();
    if let [_, command, len, tags] = &args[..]
        && command == "fill"
    {
        let (entries, bytes, kib) = runtime.block_on(fill(len.parse().unwrap(), tags == "tags"));
        println!("{entries} {bytes} {kib}");
        return;
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    println!(
        "Machine: {} vCPU ({cpu}), bench profile.\n",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    runtime.block_on(async {
        println!("Credential cache at {PODS} pods (one entry each):\n");
        println!("| session token | entries | credential bytes held | resident growth | per entry |");
        println!("|---|---|---|---|---|");
        for (label, len, tags) in [
            ("1,100 characters", "1100", "plain"),
            ("2,048 characters, tags and SourceIdentity", "2048", "tags"),
        ] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["fill", len, tags])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let figures: Vec<f64> = text
                .split_whitespace()
                .map(|n| n.parse().unwrap())
                .collect();
            let [entries, bytes, kib] = figures[..] else {
                panic!("the fill printed {text:?}");
            };
            println!(
                "| {label} | {entries} | {:.1} MiB | {:.1} MiB | {:.0} bytes |",
                bytes / 1_048_576.0,
                kib / 1024.0,
                kib * 1024.0 / entries
            );
        }
        println!("\nA request through `Broker::credentials` (secret-mode token, memory stores), p50 of 4,000:\n");
        println!("| cache | p50 |");
        println!("|---|---|");
        for (label, cache, distinct) in [
            ("none", None, false),
            ("hit (one pod, 4,000 fetches)", Some(10_000), false),
            ("miss (4,000 pods, one fetch each)", Some(10_000), true),
        ] {
            let took = per_request(cache, distinct).await;
            println!("| {label} | {:.1} µs |", took.as_secs_f64() * 1e6);
        }
    });
}
