//! The admission webhook end to end: the real `iam-broker serve` binary, moto for DynamoDB and
//! SSM, and the Kubernetes API stand-in over HTTPS (reached through a kubeconfig file, or the
//! kubeconfig in SSM). Every multi-step write completes or is undone.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use axum::http::Method;
use base64::Engine as _;
use iam_broker_aws::DynamoTokenStore;
use iam_broker_kernel::Token;
use iam_broker_kernel::ports::TokenStore;
use iam_broker_testkit::kube_api::{DEFAULT_TOKEN, Fault, KubeApi};
use iam_broker_tests::{Env, Moto, Server, Tables, allow};
use serde_json::{Value, json};

const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";

struct World {
    moto: Moto,
    api: KubeApi,
    tables: Tables,
    tokens: DynamoTokenStore,
    env: Env,
    _dir: tempfile::TempDir,
}

async fn world() -> World {
    let moto = Moto::start().await.unwrap();
    let sdk = moto.sdk_config().await;
    let tables = Tables::create(&sdk, "hook").await.unwrap();
    let api = KubeApi::start().await.unwrap();
    api.put_service_account("team-a", "app", &[("eks.amazonaws.com/role-arn", ROLE)]);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), DEFAULT_TOKEN).unwrap();
    let env = moto
        .env()
        .tables(&tables)
        .set("KUBECONFIG", kubeconfig.to_string_lossy())
        .set("PROXY_IMAGE", "registry.example/iam-broker-proxy:0.1.0");
    allow(&env, "team-a", "app", ROLE).await.unwrap();
    World {
        tokens: DynamoTokenStore::new(aws_sdk_dynamodb::Client::new(&sdk), &tables.authorizations),
        moto,
        api,
        tables,
        env,
        _dir: dir,
    }
}

fn pod(name: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "team-a" },
        "spec": { "serviceAccountName": "app",
            "containers": [{ "name": "app", "image": "app:1", "env": [{ "name": "X", "value": "1" }] }] } })
}

fn review(operation: &str, pod: &Value, dry_run: bool) -> Value {
    let (object, old) = if operation == "DELETE" {
        (Value::Null, pod.clone())
    } else {
        (pod.clone(), Value::Null)
    };
    json!({ "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "uid-e2e", "kind": { "group": "", "version": "v1", "kind": "Pod" },
        "resource": { "group": "", "version": "v1", "resource": "pods" },
        "namespace": "team-a", "operation": operation, "userInfo": { "username": "e2e" },
        "object": object, "oldObject": old, "dryRun": dry_run } })
}

/// The pod with the answer's patch applied (RFC 6902), or `None` when there is no patch.
fn apply(pod: &Value, answer: &Value) -> Option<Value> {
    let patch = answer["response"]["patch"].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    Some(patched)
}

impl World {
    /// Live token records (tombstones grant nothing and are not counted).
    async fn records(&self) -> usize {
        let all = self.tokens.list().await.unwrap();
        all.iter().filter(|r| !r.is_retracted()).count()
    }
}

#[tokio::test]
async fn log_bytes_per_admission_are_bounded_even_for_huge_values() {
    // GIVEN the webhook, and a ServiceAccount whose role annotation is 100 kB
    let w = world().await;
    let huge = format!("arn:aws:iam::123456789012:role/{}", "x".repeat(100_000));
    w.api
        .put_service_account("team-a", "huge", &[("eks.amazonaws.com/role-arn", &huge)]);
    let server = Server::start(&w.env).await.unwrap();
    let mut huge_pod = pod("web-h");
    huge_pod["spec"]["serviceAccountName"] = json!("huge");
    // warm-up: start-up lines are not the admissions' cost
    server
        .post("/", &review("CREATE", &pod("warm"), false))
        .await
        .unwrap();
    let before = server.log().len();

    // WHEN 10 ordinary CREATEs and 10 with the huge annotation are admitted
    for i in 0..10 {
        let ok = server
            .post("/", &review("CREATE", &pod(&format!("web-{i}")), false))
            .await
            .unwrap();
        assert!(ok.json["response"]["patch"].is_string());
        let skipped = server
            .post("/", &review("CREATE", &huge_pod, false))
            .await
            .unwrap();
        let warnings = skipped.json["response"]["warnings"].as_array().unwrap();
        assert!(warnings.iter().all(|w| w.as_str().unwrap().len() <= 600));
    }

    // THEN the log grew by at most 2 kB per admission: the annotation is clipped, not echoed
    let grown = server.log().len() - before;
    assert!(grown <= 20 * 2048, "{grown} bytes of log for 20 admissions");
    assert!(!server.log().contains(&"x".repeat(1000)));

    // WHEN reviews carry a 100 kB pod name, request namespace, request uid or Secret annotation
    // (mutating admission runs before validation, so such names reach the webhook)
    let before = server.log().len();
    let long = "n".repeat(100_000);
    let mut reviews = Vec::new();
    let mut named = pod(&long);
    reviews.push(review("CREATE", &named, false));
    named["metadata"]["namespace"] = json!(long);
    let mut in_long_namespace = review("CREATE", &named, false);
    in_long_namespace["request"]["namespace"] = json!(long);
    reviews.push(in_long_namespace);
    let mut long_uid = review("CREATE", &pod("web-u"), false);
    long_uid["request"]["uid"] = json!(long);
    reviews.push(long_uid);
    let mut deleted = pod(&long);
    deleted["metadata"]["annotations"] = json!({
        "iam-broker.io/secret-name": long,
        "iam-broker.io/token-hash": "0".repeat(64),
    });
    let mut delete = review("DELETE", &deleted, false);
    delete["request"]["namespace"] = json!(long);
    reviews.push(delete);
    for body in &reviews {
        let answer = server.post("/", body).await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.json);
    }

    // THEN no log line carries any of them whole: each admission costs at most 2 kB of log
    let log = server.log();
    let grown = log.len() - before;
    assert!(
        grown <= reviews.len() * 2048,
        "{grown} bytes of log for {} admissions",
        reviews.len()
    );
    assert!(!log.contains(&"n".repeat(1000)));
}

#[tokio::test]
async fn create_injects_and_the_token_from_the_secret_gets_credentials() {
    // GIVEN an annotated, allowed ServiceAccount and the webhook served by `iam-broker serve`
    let w = world().await;
    let server = Server::start(&w.env).await.unwrap();

    // WHEN the API server sends a Pod CREATE
    let answer = server
        .post("/", &review("CREATE", &pod("web-1"), false))
        .await
        .unwrap();

    // THEN the patch applies to the pod as sent and adds the sidecar and the variables
    assert_eq!(answer.status, 200, "{}", answer.json);
    assert_eq!(answer.json["response"]["uid"], "uid-e2e");
    let patched = apply(&pod("web-1"), &answer.json).expect("a patch");
    let app = &patched["spec"]["containers"][0];
    assert_eq!(app["env"][0], json!({ "name": "X", "value": "1" }));
    assert_eq!(app["env"][1]["value"], "http://127.0.0.1:53080/");
    let secret_name = patched["metadata"]["annotations"]["iam-broker.io/secret-name"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        app["env"][2]["valueFrom"]["secretKeyRef"]["name"],
        secret_name
    );
    let sidecar = &patched["spec"]["containers"][1];
    assert_eq!(sidecar["name"], "iam-broker-proxy");
    assert_eq!(sidecar["env"][0]["value"], format!("{}/", server.url));

    // AND the Secret holds a token whose hash is the record's key
    let token = w.api.secret_token("team-a", &secret_name).unwrap();
    let record = w
        .tokens
        .record(&Token::parse(&token).unwrap().hash())
        .await
        .unwrap()
        .expect("a record");
    assert_eq!(record.secret_name.as_deref(), Some(secret_name.as_str()));
    assert_eq!(record.pod_name.as_deref(), Some("web-1"));

    // AND that token gets credentials from the broker
    let credentials = server.get("/", Some(&token)).await.unwrap();
    assert_eq!(credentials.status, 200, "{}", credentials.json);
    assert_eq!(credentials.json["RoleArn"], ROLE);

    // AND the token is in neither the admission answer nor any log line
    assert!(!answer.json.to_string().contains(&token));
    let log = server.stop().await;
    assert!(!log.contains(&token), "the log holds the token");
    // the decision line names the namespace and ServiceAccount and carries the request id
    let decision = log
        .lines()
        .find(|l| l.contains("\"decision\":\"patched\""))
        .unwrap_or_else(|| panic!("no decision line in {log}"));
    for field in [
        "\"request_id\"",
        "\"namespace\":\"team-a\"",
        "\"service_account\":\"app\"",
    ] {
        assert!(decision.contains(field), "{field} missing from {decision}");
    }
}

#[tokio::test]
async fn the_patched_pod_is_not_patched_again_and_dry_run_writes_nothing() {
    let w = world().await;
    let server = Server::start(&w.env).await.unwrap();
    let answer = server
        .post("/", &review("CREATE", &pod("web-1"), false))
        .await
        .unwrap();
    let patched = apply(&pod("web-1"), &answer.json).unwrap();
    let creates = w.api.count(&Method::POST, "/secrets");

    // reinvocation: the API server sends the already patched pod again
    let again = server
        .post("/", &review("CREATE", &patched, false))
        .await
        .unwrap();
    assert_eq!(again.json["response"]["allowed"], true);
    assert!(again.json["response"].get("patch").is_none());
    // dry run: the same patch shape, nothing written
    let dry = server
        .post("/", &review("CREATE", &pod("web-2"), true))
        .await
        .unwrap();
    assert!(apply(&pod("web-2"), &dry.json).is_some());
    assert_eq!(w.api.count(&Method::POST, "/secrets"), creates);
    assert_eq!(w.records().await, 1);
}

#[tokio::test]
async fn delete_removes_secret_and_record_and_the_token_stops_working() {
    let w = world().await;
    let server = Server::start(&w.env).await.unwrap();
    let answer = server
        .post("/", &review("CREATE", &pod("web-1"), false))
        .await
        .unwrap();
    let patched = apply(&pod("web-1"), &answer.json).unwrap();
    let secret_name = patched["metadata"]["annotations"]["iam-broker.io/secret-name"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = w.api.secret_token("team-a", &secret_name).unwrap();
    assert_eq!(server.get("/", Some(&token)).await.unwrap().status, 200);

    let deleted = server
        .post("/", &review("DELETE", &patched, false))
        .await
        .unwrap();
    assert_eq!(deleted.json["response"]["allowed"], true);
    assert!(
        deleted.json["response"].get("patch").is_none(),
        "never a patch on DELETE"
    );
    assert!(w.api.secret("team-a", &secret_name).is_none());
    assert_eq!(w.records().await, 0);
    let refused = server.get("/", Some(&token)).await.unwrap();
    assert_eq!((refused.status, refused.code()), (403, "InvalidToken"));
}

#[tokio::test]
async fn a_failed_secret_create_leaves_no_record() {
    let w = world().await;
    let server = Server::start(&w.env).await.unwrap();
    w.api.inject(Fault::status(Method::POST, "/secrets", 500));
    let answer = server
        .post("/", &review("CREATE", &pod("web-1"), false))
        .await
        .unwrap();
    // fail open (the default): allowed, no patch, a warning for kubectl
    assert_eq!(answer.json["response"]["allowed"], true);
    assert!(answer.json["response"].get("patch").is_none());
    assert!(
        answer.json["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("no AWS credentials injected")
    );
    assert_eq!(w.records().await, 0);
    assert!(w.api.secrets("team-a").is_empty());
}

#[tokio::test]
async fn a_failed_record_write_removes_the_secret() {
    // GIVEN an Authorizations table that does not exist (every write fails)
    let w = world().await;
    let env = w.env.clone().set("AUTHORIZATIONS_TABLE", "missing-table");
    let server = Server::start(&env).await.unwrap();
    let answer = server
        .post("/", &review("CREATE", &pod("web-1"), false))
        .await
        .unwrap();
    assert_eq!(answer.json["response"]["allowed"], true);
    assert!(answer.json["response"].get("patch").is_none());
    // THEN the Secret that was created first has been deleted again
    assert_eq!(w.api.count(&Method::POST, "/secrets"), 1);
    assert_eq!(w.api.count(&Method::DELETE, "/secrets/"), 1);
    assert!(
        w.api.secrets("team-a").is_empty(),
        "no Secret without a record"
    );
}

#[tokio::test]
async fn closed_policy_denies_and_a_hung_cluster_still_gets_an_answer_in_time() {
    let w = world().await;
    let env = w.env.clone().set("FAILURE_POLICY", "closed");
    let server = Server::start(&env).await.unwrap();
    w.api.inject(Fault::delay(
        Method::GET,
        "/serviceaccounts/",
        Duration::from_secs(30),
    ));
    let started = Instant::now();
    let answer = server
        .post("/", &review("CREATE", &pod("web-1"), false))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(answer.json["response"]["allowed"], false, "{}", answer.json);
    assert_eq!(answer.json["response"]["status"]["code"], 503);
    // the API server's default timeout is 10 s; the webhook promises an answer within 8 s
    assert!(
        elapsed < Duration::from_secs(8),
        "answered after {elapsed:?}"
    );
    assert_eq!(w.records().await, 0);
}

#[tokio::test]
async fn the_kubeconfig_can_come_from_ssm() {
    let w = world().await;
    let sdk = w.moto.sdk_config().await;
    iam_broker_kube::store_kubeconfig_in_ssm(
        &aws_sdk_ssm::Client::new(&sdk),
        "/iam-broker/kubeconfig",
        &w.api.kubeconfig(DEFAULT_TOKEN),
        None,
    )
    .await
    .unwrap();
    // no KUBECONFIG file this time: only the parameter
    let env = w
        .moto
        .env()
        .tables(&w.tables)
        .set("KUBECONFIG", "/nonexistent/kubeconfig")
        .set("KUBECONFIG_PARAMETER", "/iam-broker/kubeconfig")
        .set("PROXY_IMAGE", "registry.example/iam-broker-proxy:0.1.0");
    let server = Server::start(&env).await.unwrap();
    let answer = server
        .post("/", &review("CREATE", &pod("web-1"), false))
        .await
        .unwrap();
    assert!(
        apply(&pod("web-1"), &answer.json).is_some(),
        "{}",
        answer.json
    );
    assert_eq!(w.records().await, 1);
    let log = server.stop().await;
    assert!(
        !log.contains("certificate-authority-data"),
        "the kubeconfig is never logged"
    );
}
