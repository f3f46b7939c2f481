//! Projected-mode benchmarks (run with `cargo bench -p iam-broker-tests --bench projected`):
//! what verifying a projected ServiceAccount token costs the broker per request.
//!
//! 1. `identity::identify` (parse, key lookup, signature, claims) of a token issued by the
//!    Kubernetes API stand-in through a real TokenRequest, RS256 as kube-apiserver signs by
//!    default, against a registry of 1 cluster and of 20 clusters sharing its issuer (the
//!    signing cluster last, so the key lookup walks all of them);
//! 2. the same with ES256;
//! 3. a whole in-memory `Broker::credentials` for a projected token and for a Secret-mode
//!    `iamb_` token (memory stores and `MemoryIssuer`), so the verification's share of a request
//!    shows.
//!
//! The cases run in interleaved rounds, so a neighbour's build slows them alike. It prints a
//! Markdown table for BENCHMARKS.md. Every loop is bounded; the stand-ins bind 127.0.0.1.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iam_broker_broker::broker::{Broker, BrokerSettings};
use iam_broker_broker::identity::{Verification, identify};
use iam_broker_broker::projected::ProjectedIdentities;
use iam_broker_kernel::allowance::{RoleArn, Subject};
use iam_broker_kernel::cluster::RegisteredCluster;
use iam_broker_kernel::ports::{AllowanceStore, ClusterRegistry, TokenStore};
use iam_broker_kernel::{Config, SystemClock, Token, TokenRecord};
use iam_broker_testkit::kube_api::{KubeApi, SigningAlgorithm, StandinOptions};
use iam_broker_testkit::memory::{
    MemoryAllowanceStore, MemoryClusterRegistry, MemoryIssuer, MemoryTokenStore,
};
use time::OffsetDateTime;

const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";
/// A fixed Secret-mode token (exists only in this benchmark).
const SECRET_TOKEN: &str = "iamb_AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA";
const NAMESPACE: &str = "team-a";
const SERVICE_ACCOUNT: &str = "app";
/// Registered clusters in the larger registry, all with the stand-ins' (kubeadm's) issuer.
const CLUSTERS: usize = 20;
const WARMUP: usize = 500;
const ROUNDS: usize = 5;
const PER_ROUND: usize = 4_000;

struct Stats {
    n: usize,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    mean: Duration,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    let total: Duration = samples.iter().sum();
    Stats {
        n: samples.len(),
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        mean: total / u32::try_from(samples.len()).expect("few samples"),
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn row(name: &str, s: &Stats) {
    println!(
        "| {name} | {} | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs |",
        s.n,
        micros(s.p50),
        micros(s.p90),
        micros(s.p99),
        micros(s.mean)
    );
}

/// The registered clusters of one algorithm and a token of the last one.
struct Fleet {
    clusters: Vec<RegisteredCluster>,
    token: String,
}

/// `count` stand-ins of one issuer, each with its own fresh key (as `count` kubeadm clusters),
/// registered as `c01`…; the token is a TokenRequest answer of the last one.
async fn fleet(algorithm: SigningAlgorithm, count: usize) -> Fleet {
    let mut clusters = Vec::with_capacity(count);
    let mut token = String::new();
    let now = OffsetDateTime::now_utc().unix_timestamp();
    for index in 1..=count {
        let api = KubeApi::start_with(StandinOptions::default().algorithm(algorithm))
            .await
            .expect("stand-in");
        let jwks = api.jwks().expect("jwks").to_string();
        let cluster = RegisteredCluster::new(
            &format!("c{index:02}"),
            &api.issuer(),
            &jwks,
            "file bench",
            now,
        )
        .expect("a valid registration");
        cluster.check_distinct(&clusters).expect("distinct keys");
        clusters.push(cluster);
        if index == count {
            api.put_service_account(NAMESPACE, SERVICE_ACCOUNT, &[]);
            token = api
                .issue_token(
                    NAMESPACE,
                    SERVICE_ACCOUNT,
                    "web-1",
                    "6f1c2a34-0d7e-4c59-9d0b-3f8a1e2b4c5d",
                    &Config::default().projected_audience,
                    3600,
                )
                .await
                .expect("a TokenRequest answer");
        }
    }
    Fleet { clusters, token }
}

/// The production verification settings (audience, leeway, maximum lifetime).
fn verification() -> Verification {
    let settings = iam_broker_app::projected_settings(&Config::default());
    Verification {
        audience: settings.audience,
        leeway: i64::try_from(settings.leeway.as_secs()).expect("small"),
        max_lifetime: i64::try_from(settings.max_lifetime.as_secs()).expect("small"),
    }
}

/// Forgeries of a valid token, each refused as `InvalidToken`: another `kid` (no registered key),
/// another issuer (no registered cluster), one bit of the signature flipped (a registered key
/// that does not verify it). The first two spend one decoy verification, the third one real one.
fn forgeries(token: &str) -> [(&'static str, String); 3] {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    let json = |part: &str| -> serde_json::Value {
        serde_json::from_slice(&b64.decode(part).expect("base64url")).expect("JSON")
    };
    let mut header = json(parts[0]);
    header["kid"] = serde_json::json!("forged-kid");
    let mut claims = json(parts[1]);
    claims["iss"] = serde_json::json!("https://forged.example");
    let mut signature = b64.decode(parts[2]).expect("base64url");
    signature[10] ^= 1;
    [
        (
            "unknown key",
            format!(
                "{}.{}.{}",
                b64.encode(header.to_string()),
                parts[1],
                parts[2]
            ),
        ),
        (
            "unknown issuer",
            format!(
                "{}.{}.{}",
                parts[0],
                b64.encode(claims.to_string()),
                parts[2]
            ),
        ),
        (
            "bad signature",
            format!("{}.{}.{}", parts[0], parts[1], b64.encode(signature)),
        ),
    ]
}

fn settings(cluster: &RegisteredCluster) -> BrokerSettings {
    BrokerSettings {
        credential_duration: Duration::from_secs(3600),
        token_ttl: Duration::from_secs(14 * 86_400),
        session_tags: false,
        source_identity: false,
        // The signing cluster is the default one: its allowances carry no cluster prefix, so
        // both modes read the same rows.
        cluster_name: Some(cluster.name.clone()),
    }
}

/// A broker over memory ports that accepts `cluster`'s projected tokens and SECRET_TOKEN.
async fn memory_broker(cluster: &RegisteredCluster) -> Broker {
    let allowances = Arc::new(MemoryAllowanceStore::default());
    let subject = Subject::service_account(NAMESPACE, SERVICE_ACCOUNT).expect("valid");
    allowances
        .allow(&subject, ROLE, None)
        .await
        .expect("memory");
    let tokens = Arc::new(MemoryTokenStore::default());
    let now = OffsetDateTime::now_utc().unix_timestamp();
    tokens
        .insert(&TokenRecord {
            token_hash: Token::parse(SECRET_TOKEN).expect("valid").hash(),
            subject,
            role_arn: RoleArn::parse(ROLE).expect("valid"),
            secret_name: None,
            pod_name: Some("web-1".into()),
            created_at: now,
            last_used: None,
            expires: now + 86_400,
            retracted_at: None,
        })
        .await
        .expect("memory");
    let registry = Arc::new(MemoryClusterRegistry::default());
    registry.insert(cluster).await.expect("memory");
    let identities = ProjectedIdentities::new(
        registry,
        Arc::new(SystemClock),
        iam_broker_app::projected_settings(&Config::default()),
    );
    Broker::new(
        allowances,
        tokens,
        Arc::new(MemoryIssuer::new(Arc::new(SystemClock))),
        Arc::new(SystemClock),
        settings(cluster),
    )
    .with_projected(identities)
}

/// A named case: a closure timed per call.
type SyncCase = (&'static str, Box<dyn Fn()>);

fn measure_sync(cases: &[SyncCase]) -> Vec<Stats> {
    for (_, call) in cases {
        for _ in 0..WARMUP {
            call();
        }
    }
    let mut samples: Vec<Vec<Duration>> = cases
        .iter()
        .map(|_| Vec::with_capacity(ROUNDS * PER_ROUND))
        .collect();
    for _ in 0..ROUNDS {
        for ((_, call), samples) in cases.iter().zip(&mut samples) {
            for _ in 0..PER_ROUND {
                let started = Instant::now();
                call();
                samples.push(started.elapsed());
            }
        }
    }
    samples.into_iter().map(stats).collect()
}

async fn time_async<F: Future<Output = ()>>(call: impl Fn() -> F, runs: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        call().await;
        samples.push(started.elapsed());
    }
    samples
}

/// A timed call of `identify` that must verify.
fn identify_case(
    token: &'static str,
    clusters: &'static [RegisteredCluster],
    verification: &Verification,
    now: i64,
) -> Box<dyn Fn()> {
    let verification = verification.clone();
    Box::new(move || {
        let pod = identify(token, clusters, &verification, now);
        std::hint::black_box(pod).expect("verifies");
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let started = Instant::now();
    let rs = fleet(SigningAlgorithm::Rs256, CLUSTERS).await;
    let es = fleet(SigningAlgorithm::Es256, CLUSTERS).await;
    eprintln!(
        "set-up: {CLUSTERS} RS256 and {CLUSTERS} ES256 stand-ins in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let verification = verification();
    let now = OffsetDateTime::now_utc().unix_timestamp();
    // Leaked once: the timed closures borrow them for the rest of the run.
    let leak = |clusters: &[RegisteredCluster]| -> &'static [RegisteredCluster] {
        clusters.to_vec().leak()
    };
    let rs_all = leak(&rs.clusters);
    let es_all = leak(&es.clusters);
    let rs_one = leak(&rs.clusters[CLUSTERS - 1..]);
    let es_one = leak(&es.clusters[CLUSTERS - 1..]);
    let rs_token: &'static str = rs.token.leak();
    let es_token: &'static str = es.token.leak();
    for (token, clusters) in [
        (rs_token, rs_one),
        (rs_token, rs_all),
        (es_token, es_one),
        (es_token, es_all),
    ] {
        let pod = identify(token, clusters, &verification, now).expect("the token verifies");
        assert_eq!(pod.cluster, clusters[clusters.len() - 1].name);
    }

    let cases: Vec<SyncCase> = vec![
        (
            "`identity::identify`, RS256, 1 cluster",
            identify_case(rs_token, rs_one, &verification, now),
        ),
        (
            "`identity::identify`, RS256, 20 clusters of one issuer (signer last)",
            identify_case(rs_token, rs_all, &verification, now),
        ),
        (
            "`identity::identify`, ES256, 1 cluster",
            identify_case(es_token, es_one, &verification, now),
        ),
        (
            "`identity::identify`, ES256, 20 clusters of one issuer (signer last)",
            identify_case(es_token, es_all, &verification, now),
        ),
    ];
    let identified = measure_sync(&cases);

    // The whole broker decision: Secret-mode token, projected RS256, projected ES256.
    let brokers = [
        (memory_broker(&rs_one[0]).await, None, SECRET_TOKEN),
        (memory_broker(&rs_one[0]).await, Some(ROLE), rs_token),
        (memory_broker(&es_one[0]).await, Some(ROLE), es_token),
    ];
    for (broker, role, token) in &brokers {
        let answer = broker
            .credentials(Some(*token), *role)
            .await
            .expect("the benchmark set-up must serve credentials");
        assert_eq!(answer.body.role_arn, ROLE);
        for _ in 0..WARMUP {
            let _ = broker.credentials(Some(*token), *role).await;
        }
    }
    let mut broker_samples = vec![Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for ((broker, role, token), samples) in brokers.iter().zip(&mut broker_samples) {
            samples.extend(
                time_async(
                    move || async move {
                        let answer = broker.credentials(Some(*token), *role).await;
                        std::hint::black_box(answer).expect("served");
                    },
                    PER_ROUND,
                )
                .await,
            );
        }
    }
    let served: Vec<Stats> = broker_samples.into_iter().map(stats).collect();

    // Forged tokens through the whole broker: refused at once (no registry wait), each for one
    // signature check, so a forgery costs about what a served request's verification costs.
    let mut forged_cases = Vec::new();
    for (algorithm, token, broker) in [
        ("RS256", rs_token, &brokers[1].0),
        ("ES256", es_token, &brokers[2].0),
    ] {
        for (what, forged) in forgeries(token) {
            let refused = broker.credentials(Some(&forged), Some(ROLE)).await;
            assert_eq!(
                refused.as_ref().map(|_| ()).map_err(|e| e.code()),
                Err("InvalidToken"),
                "{what}"
            );
            forged_cases.push((
                format!("`Broker::credentials`, forged {algorithm} token: {what}"),
                broker,
                forged,
            ));
        }
    }
    let mut forged_samples: Vec<Vec<Duration>> = forged_cases.iter().map(|_| Vec::new()).collect();
    for _ in 0..ROUNDS {
        for ((_, broker, forged), samples) in forged_cases.iter().zip(&mut forged_samples) {
            samples.extend(
                time_async(
                    move || async move {
                        let answer = broker.credentials(Some(forged), Some(ROLE)).await;
                        assert!(std::hint::black_box(answer).is_err());
                    },
                    PER_ROUND / 4,
                )
                .await,
            );
        }
    }
    let forged: Vec<Stats> = forged_samples.into_iter().map(stats).collect();

    println!("| measurement | calls | p50 | p90 | p99 | mean |");
    println!("|---|---|---|---|---|---|");
    for ((name, _), s) in cases.iter().zip(&identified) {
        row(name, s);
    }
    row(
        "`Broker::credentials`, Secret-mode `iamb_` token, memory ports",
        &served[0],
    );
    row(
        "`Broker::credentials`, projected RS256 token, memory ports",
        &served[1],
    );
    row(
        "`Broker::credentials`, projected ES256 token, memory ports",
        &served[2],
    );
    for ((name, _, _), s) in forged_cases.iter().zip(&forged) {
        row(name, s);
    }
    // Measured apart, `identify` and the whole request drift with the machine; the difference
    // between the two modes' requests is the verification's cost inside a request.
    let extra = |projected: &Stats| micros(projected.mean) - micros(served[0].mean);
    let share = |projected: &Stats| 100.0 * extra(projected) / micros(projected.mean);
    println!();
    println!(
        "Projected minus Secret mode per request (mean): RS256 {:+.1} µs ({:.0} % of the \
         projected request), ES256 {:+.1} µs ({:.0} %).",
        extra(&served[1]),
        share(&served[1]),
        extra(&served[2]),
        share(&served[2]),
    );
}
