//! Prometheus metrics of `iam-broker serve --metrics-listen`, scraped over HTTP and read with the
//! Prometheus project's own OpenMetrics parser (Python `prometheus_client`): requests by route
//! and outcome, stage latencies, STS errors by code (throttling visible), the credential cache
//! and the cluster registry.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Stdio;

use iam_broker_tests::{Moto, Server, Tables, allow, free_port, mint_token};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";

/// One sample: metric family, sample name, labels, value.
#[derive(Debug)]
struct Sample {
    family: String,
    family_type: String,
    family_unit: String,
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses an OpenMetrics exposition with `prometheus_client.openmetrics.parser` (fails the test
/// on any text the parser refuses).
async fn parse(text: &str) -> Vec<Sample> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append({"family": family.name, "type": family.type, "unit": family.unit,
                    "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (the .venv of scripts/test.sh)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let output = child.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "the OpenMetrics parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let list: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    list.into_iter()
        .map(|s| Sample {
            family: s["family"].as_str().unwrap().to_owned(),
            family_type: s["type"].as_str().unwrap().to_owned(),
            family_unit: s["unit"].as_str().unwrap_or("").to_owned(),
            name: s["name"].as_str().unwrap().to_owned(),
            labels: serde_json::from_value(s["labels"].clone()).unwrap(),
            value: s["value"].as_f64().unwrap(),
        })
        .collect()
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

async fn scrape(port: u16) -> (String, String) {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    (content_type, response.text().await.unwrap())
}

/// A stand-in STS that answers every call `Throttling`, as STS does past its request rate.
async fn throttling_sts() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(|| async {
        (
            axum::http::StatusCode::BAD_REQUEST,
            [("content-type", "text/xml")],
            "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error>\
             <Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message>\
             </Error><RequestId>1</RequestId></ErrorResponse>",
        )
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, task)
}

#[tokio::test]
async fn serve_exposes_requests_stages_sts_errors_cache_and_registry() {
    let moto = Moto::start().await.unwrap();
    let tables = Tables::create(&moto.sdk_config().await, "metrics")
        .await
        .unwrap();
    let env = moto.env().tables(&tables);
    allow(&env, "team-a", "app", ROLE).await.unwrap();
    let token = mint_token(&env, "team-a", "app", ROLE).await.unwrap();
    let port = free_port().unwrap();
    let server = Server::start(
        &env.clone()
            .set("IAM_BROKER_METRICS_LISTEN", format!("127.0.0.1:{port}")),
    )
    .await
    .unwrap();

    // GIVEN two fetches of one token (a miss, then a cache hit), a forged token, a projected
    // token (the registry is read), and an admission review that is not a pod
    for _ in 0..2 {
        assert_eq!(server.get("/", Some(&token)).await.unwrap().status, 200);
    }
    let forged = format!("iamb_{}", "A".repeat(43));
    assert_eq!(server.get("/", Some(&forged)).await.unwrap().status, 403);
    let jwt = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJpc3MiOiJodHRwczovL3giLCJzdWIiOiJ4In0.c2ln";
    assert_eq!(server.get("/", Some(jwt)).await.unwrap().status, 403);
    let review = json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": { "uid": "u1", "kind": { "group": "apps", "version": "v1", "kind": "Deployment" },
            "namespace": "team-a", "operation": "CREATE", "object": {} } });
    assert_eq!(server.post("/", &review).await.unwrap().status, 200);
    // The broker's own port does not expose metrics.
    assert_eq!(server.get("/metrics", None).await.unwrap().status, 404);

    // WHEN Prometheus scrapes the metrics listener
    let (content_type, text) = scrape(port).await;
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let samples = parse(&text).await;

    // THEN each request is counted by route and outcome
    let count = |outcome: &str, route: &str| {
        value(
            &samples,
            "iam_broker_requests_total",
            &[("route", route), ("outcome", outcome)],
        )
    };
    assert_eq!(count("served", "credentials"), Some(2.0), "{text}");
    assert_eq!(count("InvalidToken", "credentials"), Some(2.0), "{text}");
    assert_eq!(count("skipped", "admission"), Some(1.0), "{text}");
    let family = samples
        .iter()
        .find(|s| s.family == "iam_broker_requests")
        .unwrap();
    assert_eq!(family.family_type, "counter");
    // AND the latency histograms are in seconds, per route and per stage
    assert_eq!(
        value(
            &samples,
            "iam_broker_request_duration_seconds_count",
            &[("route", "credentials")]
        ),
        Some(4.0)
    );
    let duration = samples
        .iter()
        .find(|s| s.family == "iam_broker_request_duration_seconds")
        .unwrap();
    assert_eq!(
        (duration.family_type.as_str(), duration.family_unit.as_str()),
        ("histogram", "seconds")
    );
    // three token-record reads (the forged token's too), one Allowances read per served fetch
    // (a fresh token's expiry is not slid), one AssumeRole (one miss)
    assert_eq!(
        value(
            &samples,
            "iam_broker_stage_duration_seconds_count",
            &[("stage", "dynamodb")]
        ),
        Some(3.0 + 2.0),
        "{text}"
    );
    assert_eq!(
        value(
            &samples,
            "iam_broker_stage_duration_seconds_count",
            &[("stage", "sts")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "iam_broker_stage_duration_seconds_count",
            &[("stage", "token_verification")]
        ),
        Some(1.0)
    );
    // AND the cache's hits and misses, and its size
    assert_eq!(
        value(
            &samples,
            "iam_broker_credential_cache_lookups_total",
            &[("result", "miss")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "iam_broker_credential_cache_lookups_total",
            &[("result", "hit")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "iam_broker_credential_cache_entries", &[]),
        Some(1.0)
    );
    // AND the registry was read once (the projected token), successfully, and is fresh
    assert_eq!(
        value(
            &samples,
            "iam_broker_registry_reads_total",
            &[("result", "ok")]
        ),
        Some(1.0),
        "{text}"
    );
    let age = value(&samples, "iam_broker_registry_snapshot_age_seconds", &[]).unwrap();
    assert!((0.0..60.0).contains(&age), "{age}");
    // AND a second scrape does not count the registry's reads twice
    let (_, again) = scrape(port).await;
    let again = parse(&again).await;
    assert_eq!(
        value(
            &again,
            "iam_broker_registry_reads_total",
            &[("result", "ok")]
        ),
        Some(1.0)
    );
    drop(server);

    // GIVEN an STS that throttles
    let (sts, _task) = throttling_sts().await;
    let port = free_port().unwrap();
    let throttled = Server::start(
        &env.clone()
            .set("AWS_ENDPOINT_URL_STS", &sts)
            .set("IAM_BROKER_METRICS_LISTEN", format!("127.0.0.1:{port}")),
    )
    .await
    .unwrap();
    // WHEN a pod fetches, THEN it is told to retry later
    assert_eq!(throttled.get("/", Some(&token)).await.unwrap().status, 503);
    // AND the throttling is visible by its STS code
    let (_, text) = scrape(port).await;
    let samples = parse(&text).await;
    assert_eq!(
        value(
            &samples,
            "iam_broker_sts_errors_total",
            &[("code", "Throttling")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(count_of(&samples, "ServiceUnavailable"), Some(1.0));
}

fn count_of(samples: &[Sample], outcome: &str) -> Option<f64> {
    value(
        samples,
        "iam_broker_requests_total",
        &[("route", "credentials"), ("outcome", outcome)],
    )
}

#[tokio::test]
async fn the_sidecar_exposes_its_requests_and_cache_when_metrics_addr_is_set() {
    use iam_broker_tests::proxy::Proxy;
    let moto = Moto::start().await.unwrap();
    let tables = Tables::create(&moto.sdk_config().await, "pmetrics")
        .await
        .unwrap();
    let env = moto.env().tables(&tables);
    allow(&env, "team-a", "app", ROLE).await.unwrap();
    let token = mint_token(&env, "team-a", "app", ROLE).await.unwrap();
    let server = Server::start(&env).await.unwrap();
    let port = free_port().unwrap();
    let proxy = Proxy::start_with(
        &format!("{}/", server.url),
        iam_broker_tests::Env::new().set("METRICS_ADDR", format!("127.0.0.1:{port}")),
    )
    .await
    .unwrap();

    // GIVEN a miss, a hit, and a request without a token
    let client = reqwest::Client::new();
    for _ in 0..2 {
        let answer = client
            .get(&proxy.url)
            .header("authorization", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    assert_eq!(client.get(&proxy.url).send().await.unwrap().status(), 401);
    // The credentials port does not serve metrics.
    let on_loopback = client
        .get(format!("{}metrics", proxy.url))
        .header("authorization", &token)
        .send()
        .await
        .unwrap();
    assert!(
        !on_loopback
            .text()
            .await
            .unwrap()
            .contains("iam_broker_proxy_")
    );

    // WHEN Prometheus scrapes METRICS_ADDR
    let (content_type, text) = scrape(port).await;
    assert!(content_type.starts_with("application/openmetrics-text"));
    let samples = parse(&text).await;
    let count = |source: &str, status: &str| {
        value(
            &samples,
            "iam_broker_proxy_requests_total",
            &[("source", source), ("status", status)],
        )
    };
    // THEN the miss, the hit and the refusal are counted where they were answered
    assert_eq!(count("broker", "200"), Some(1.0), "{text}");
    assert_eq!(
        count("cache", "200"),
        Some(2.0),
        "the hit and the /metrics probe: {text}"
    );
    assert_eq!(count("proxy", "401"), Some(1.0), "{text}");
    assert_eq!(
        value(
            &samples,
            "iam_broker_proxy_request_duration_seconds_count",
            &[("source", "cache")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(&samples, "iam_broker_proxy_cache_entries", &[]),
        Some(1.0)
    );
    assert_eq!(
        value(&samples, "iam_broker_proxy_broker_calls_in_flight", &[]),
        Some(0.0)
    );
    proxy.stop().await;
}

#[tokio::test]
async fn the_sidecar_keeps_no_metrics_unless_asked() {
    let moto = Moto::start().await.unwrap();
    let tables = Tables::create(&moto.sdk_config().await, "pnometrics")
        .await
        .unwrap();
    let server = Server::start(&moto.env().tables(&tables)).await.unwrap();
    let proxy = iam_broker_tests::proxy::Proxy::start(&format!("{}/", server.url))
        .await
        .unwrap();
    let log = proxy.stop().await;
    assert!(log.contains("iam-broker-proxy listening"), "{log}");
    assert!(!log.contains("metrics listening"), "{log}");
}
