//! Broker benchmarks (run with `cargo bench -p iam-broker-tests --bench broker`, after
//! `cargo build --release --bins`):
//!
//! 1. overhead of the router + broker handler per request, with in-memory ports (no I/O), without
//!    and with Prometheus metrics;
//! 2. the same request through the real DynamoDB and STS adapters, with the AWS round trips
//!    served by a fast local endpoint that answers canned DynamoDB / STS responses;
//! 3. time from spawning `iam-broker serve` to the first credentials it serves;
//! 4. overhead of the router + admission webhook per CREATE (decision, token minting, patch and
//!    AdmissionReview encoding), with in-memory ports standing in for Kubernetes and DynamoDB.
//!
//! It prints a Markdown table for BENCHMARKS.md. Every loop is bounded; servers bind 127.0.0.1.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, header};
use axum::response::IntoResponse;
use iam_broker_admission::patch::{InjectSettings, InjectionMode, SidecarMode};
use iam_broker_admission::webhook::{Webhook, WebhookSettings};
use iam_broker_broker::broker::{Broker, BrokerSettings};
use iam_broker_kernel::allowance::Subject;
use iam_broker_kernel::ports::{AllowanceStore, ServiceAccount, TokenStore};
use iam_broker_kernel::{Config, SystemClock, Token, TokenRecord};
use iam_broker_router::{AppState, router};
use iam_broker_testkit::memory::{
    MemoryAllowanceStore, MemoryCluster, MemoryIssuer, MemoryTokenStore,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tower::ServiceExt as _;

const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";
/// A fixed token for the canned endpoint (exists only in this benchmark).
const TOKEN: &str = "iamb_AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA";

fn settings() -> BrokerSettings {
    BrokerSettings {
        credential_duration: Duration::from_secs(3600),
        token_ttl: Duration::from_secs(14 * 86_400),
        session_tags: false,
        source_identity: false,
        cluster_name: None,
    }
}

struct Stats {
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
    n: usize,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: samples[samples.len() - 1],
        n: samples.len(),
    }
}

fn row(name: &str, s: &Stats) {
    println!(
        "| {name} | {} | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs |",
        s.n,
        s.p50.as_secs_f64() * 1e6,
        s.p90.as_secs_f64() * 1e6,
        s.p99.as_secs_f64() * 1e6,
        s.max.as_secs_f64() * 1e6
    );
}

fn request() -> axum::http::Request<axum::body::Body> {
    axum::http::Request::get("/credentials")
        .header("authorization", TOKEN)
        .body(axum::body::Body::empty())
        .expect("a static request is valid")
}

async fn measure(app: axum::Router, warmup: usize, runs: usize) -> Stats {
    for _ in 0..warmup {
        let response = app.clone().oneshot(request()).await.expect("infallible");
        assert_eq!(
            response.status(),
            200,
            "the benchmark set-up must serve credentials"
        );
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let response = app.clone().oneshot(request()).await.expect("infallible");
        let _ = axum::body::to_bytes(response.into_body(), usize::MAX).await;
        samples.push(started.elapsed());
    }
    stats(samples)
}

async fn in_memory_router() -> axum::Router {
    in_memory_router_with(None).await
}

/// [`in_memory_router`], keeping Prometheus metrics as `serve --metrics-listen` does when given
/// (every request counted, every stage timed).
async fn in_memory_router_with(
    prometheus: Option<Arc<iam_broker_router::prometheus::Prometheus>>,
) -> axum::Router {
    let allowances = Arc::new(MemoryAllowanceStore::default());
    let tokens = Arc::new(MemoryTokenStore::default());
    let subject = Subject::service_account("team-a", "app").expect("valid");
    allowances
        .allow(&subject, ROLE, None)
        .await
        .expect("memory");
    let now = OffsetDateTime::now_utc().unix_timestamp();
    tokens
        .insert(&TokenRecord {
            token_hash: Token::parse(TOKEN).expect("valid").hash(),
            subject,
            role_arn: iam_broker_kernel::allowance::RoleArn::parse(ROLE).unwrap(),
            secret_name: None,
            pod_name: Some("web-1".into()),
            created_at: now,
            last_used: None,
            expires: now + 86_400,
            retracted_at: None,
        })
        .await
        .expect("memory");
    let broker = Broker::new(
        allowances,
        tokens,
        Arc::new(MemoryIssuer::new(Arc::new(SystemClock))),
        Arc::new(SystemClock),
        settings(),
    );
    let (broker, metrics) = match prometheus {
        Some(p) => (
            broker.with_observer(p.clone()),
            iam_broker_router::metrics::Metrics::off().with_prometheus(p),
        ),
        None => (broker, Default::default()),
    };
    router(AppState {
        broker: Arc::new(broker),
        webhook: Arc::new(memory_webhook(allowances_for_webhook().await)),
        metrics,
    })
}

async fn allowances_for_webhook() -> Arc<MemoryAllowanceStore> {
    let allowances = Arc::new(MemoryAllowanceStore::default());
    let subject = Subject::service_account("team-a", "app").expect("valid");
    allowances
        .allow(&subject, ROLE, None)
        .await
        .expect("memory");
    allowances
}

/// A webhook over in-memory ports: team-a/app is annotated with ROLE and allowed.
fn memory_webhook(allowances: Arc<MemoryAllowanceStore>) -> Webhook {
    let cluster = Arc::new(MemoryCluster::default());
    cluster.put_service_account(ServiceAccount {
        uid: None,
        namespace: "team-a".into(),
        name: "app".into(),
        annotations: [("eks.amazonaws.com/role-arn".to_owned(), ROLE.to_owned())].into(),
    });
    Webhook::new(
        cluster,
        allowances,
        Arc::new(MemoryTokenStore::default()),
        Arc::new(SystemClock),
        WebhookSettings {
            inject: InjectSettings {
                injection: InjectionMode::Sidecar,
                proxy_image: Some("registry.example/iam-broker-proxy:0.1.0".to_owned()),
                port: 53080,
                mode: SidecarMode::Container,
                token_file: true,
                region: Some("us-east-1".into()),
                broker_ca_pem: None,
            },
            ..WebhookSettings::from(&Config::default())
        },
    )
}

/// The body of `events/admission-create.json`.
fn admission_body() -> String {
    let path = iam_broker_tests::workspace_root().join("events/admission-create.json");
    let event: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the fixture")).expect("json");
    event["body"].as_str().expect("a body").to_owned()
}

async fn measure_admission(warmup: usize, runs: usize) -> Stats {
    let app = router(AppState {
        broker: Arc::new(Broker::new(
            Arc::new(MemoryAllowanceStore::default()),
            Arc::new(MemoryTokenStore::default()),
            Arc::new(MemoryIssuer::new(Arc::new(SystemClock))),
            Arc::new(SystemClock),
            settings(),
        )),
        webhook: Arc::new(memory_webhook(allowances_for_webhook().await)),
        metrics: Default::default(),
    });
    let body = admission_body();
    let post = || {
        axum::http::Request::post("/")
            .header("host", "broker.example")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.clone()))
            .expect("a static request is valid")
    };
    let mut samples = Vec::with_capacity(runs);
    for i in 0..warmup + runs {
        let started = Instant::now();
        let response = app.clone().oneshot(post()).await.expect("infallible");
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        let elapsed = started.elapsed();
        let answer: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(
            answer["response"]["patchType"], "JSONPatch",
            "the benchmark set-up must patch: {answer}"
        );
        if i >= warmup {
            samples.push(elapsed);
        }
    }
    stats(samples)
}

/// Answers DynamoDB GetItem / UpdateItem and STS AssumeRole with canned bodies, as fast as
/// a local HTTP server can.
async fn canned_aws(headers: HeaderMap, body: Bytes) -> axum::response::Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    let json = |body: String| {
        ([(header::CONTENT_TYPE, "application/x-amz-json-1.0")], body).into_response()
    };
    match target {
        "DynamoDB_20120810.GetItem" if text.contains("token_hash") => {
            let hash = Token::parse(TOKEN).expect("valid").hash();
            let expires = OffsetDateTime::now_utc().unix_timestamp() + 86_400;
            json(format!(
                r#"{{"Item":{{"token_hash":{{"S":"{hash}"}},"namespace":{{"S":"team-a"}},"service_account":{{"S":"app"}},"role_arn":{{"S":"{ROLE}"}},"pod_name":{{"S":"web-1"}},"created_at":{{"N":"1"}},"expires":{{"N":"{expires}"}}}}}}"#
            ))
        }
        "DynamoDB_20120810.GetItem" if text.contains(r#""S":"*""#) => json("{}".into()),
        "DynamoDB_20120810.GetItem" => json(format!(
            r#"{{"Item":{{"namespace":{{"S":"team-a"}},"service_account":{{"S":"app"}},"allowed_roles":{{"SS":["{ROLE}"]}}}}}}"#
        )),
        // The Allowances rows, in one BatchGetItem: the exact row allows ROLE, no `*` row.
        "DynamoDB_20120810.BatchGetItem" => {
            let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let table = request["RequestItems"]
                .as_object()
                .and_then(|tables| tables.keys().next().cloned())
                .unwrap_or_default();
            json(format!(
                r#"{{"Responses":{{"{table}":[{{"namespace":{{"S":"team-a"}},"service_account":{{"S":"app"}},"allowed_roles":{{"SS":["{ROLE}"]}}}}]}},"UnprocessedKeys":{{}}}}"#
            ))
        }
        "DynamoDB_20120810.UpdateItem" => json("{}".into()),
        _ if text.contains("Action=AssumeRole") => {
            let expiration = (OffsetDateTime::now_utc() + time::Duration::hours(1))
                .replace_nanosecond(0)
                .expect("0 is a valid nanosecond")
                .format(&Rfc3339)
                .expect("formattable");
            (
                [(header::CONTENT_TYPE, "text/xml")],
                format!(
                    r#"<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleResult><Credentials><AccessKeyId>ASIABENCH</AccessKeyId><SecretAccessKey>bench-secret</SecretAccessKey><SessionToken>bench-session</SessionToken><Expiration>{expiration}</Expiration></Credentials><AssumedRoleUser><AssumedRoleId>AROABENCH:team-a_app_web-1</AssumedRoleId><Arn>arn:aws:sts::123456789012:assumed-role/s3_reader/team-a_app_web-1</Arn></AssumedRoleUser></AssumeRoleResult><ResponseMetadata><RequestId>bench</RequestId></ResponseMetadata></AssumeRoleResponse>"#
                ),
            )
                .into_response()
        }
        _ => (axum::http::StatusCode::BAD_REQUEST, "unexpected request").into_response(),
    }
}

async fn start_canned_aws() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let app = axum::Router::new()
        .route("/", axum::routing::post(canned_aws))
        .route("/ping", axum::routing::get(|| async { "pong" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

fn aws_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_owned()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "bench".into()),
        ("AWS_SECRET_ACCESS_KEY", "bench".into()),
    ]
}

async fn adapter_router(endpoint: &str) -> axum::Router {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new(
            "bench", "bench", None, None, "bench",
        ))
        .load()
        .await;
    // the production broker, built by the composition root; the webhook stays in memory
    let app = iam_broker_app::build_with(&Config::default(), &sdk);
    router(AppState {
        broker: app.state.broker,
        webhook: Arc::new(memory_webhook(allowances_for_webhook().await)),
        metrics: Default::default(),
    })
}

async fn loopback_round_trip(endpoint: &str, runs: usize) -> Stats {
    let client = reqwest::Client::new();
    let url = format!("{endpoint}/ping");
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs + 100 {
        let started = Instant::now();
        let _ = client.get(&url).send().await.expect("ping").bytes().await;
        if i >= 100 {
            samples.push(started.elapsed());
        }
    }
    stats(samples)
}

async fn start_to_first_credentials(endpoint: &str, runs: usize) -> Option<Stats> {
    let binary = iam_broker_tests::binary("iam-broker").ok()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let port = iam_broker_tests::free_port().ok()?;
        let url = format!("http://127.0.0.1:{port}/credentials");
        let mut command = tokio::process::Command::new(&binary);
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env_clear()
            .envs(aws_env(endpoint))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = command.spawn().ok()?;
        let deadline = started + Duration::from_secs(10);
        let elapsed = loop {
            if let Ok(response) = client.get(&url).header("authorization", TOKEN).send().await
                && response.status() == 200
            {
                break started.elapsed();
            }
            if Instant::now() > deadline {
                let _ = child.kill().await;
                return None;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        };
        samples.push(elapsed);
        let _ = child.kill().await;
    }
    Some(stats(samples))
}

#[tokio::main]
async fn main() {
    println!("| measurement | requests | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|---|");
    let overhead = measure(in_memory_router().await, 2_000, 50_000).await;
    row(
        "router + broker handler, in-memory ports (own overhead)",
        &overhead,
    );

    let prometheus = Arc::new(iam_broker_router::prometheus::Prometheus::new());
    let counted = measure(
        in_memory_router_with(Some(prometheus.clone())).await,
        2_000,
        50_000,
    )
    .await;
    row(
        "the same, with Prometheus metrics kept (`serve --metrics-listen`)",
        &counted,
    );

    let admission = measure_admission(1_000, 20_000).await;
    row(
        "router + admission webhook per CREATE, in-memory ports (own overhead)",
        &admission,
    );

    let endpoint = start_canned_aws().await;
    let rtt = loopback_round_trip(&endpoint, 2_000).await;
    row(
        "one loopback HTTP round trip to the canned endpoint (floor)",
        &rtt,
    );
    let adapters = measure(adapter_router(&endpoint).await, 200, 5_000).await;
    row(
        "router + handler + DynamoDB/STS SDK adapters, canned local endpoint (GetItem, BatchGetItem, AssumeRole: 3 sequential round trips)",
        &adapters,
    );
    match start_to_first_credentials(&endpoint, 20).await {
        Some(startup) => row(
            "process start to first credentials (`iam-broker serve`)",
            &startup,
        ),
        None => println!(
            "| process start to first credentials | skipped: build `iam-broker` in this profile first (cargo build --release --bins) | | | | |"
        ),
    }
}
