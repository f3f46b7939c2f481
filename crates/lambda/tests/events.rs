//! Router tests through the Lambda adapter: API Gateway REST (v1 proxy) events from `events/`,
//! parsed by `lambda_http` exactly as the runtime does, sent through the router with `oneshot`.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt as _;
use iam_broker_admission::patch::{InjectSettings, InjectionMode, SidecarMode};
use iam_broker_admission::webhook::{Webhook, WebhookSettings};
use iam_broker_broker::broker::{Broker, BrokerSettings};
use iam_broker_kernel::allowance::Subject;
use iam_broker_kernel::ports::{
    AllowanceStore, Cluster as _, ServiceAccount, TokenSecret, TokenStore,
};
use iam_broker_kernel::{Token, TokenRecord};
use iam_broker_router::metrics::Metrics;
use iam_broker_router::{AppState, router};
use iam_broker_testkit::FixedClock;
use iam_broker_testkit::memory::{
    MemoryAllowanceStore, MemoryCluster, MemoryIssuer, MemoryTokenStore,
};
use time::OffsetDateTime;
use time::macros::datetime;
use tower::ServiceExt as _;

/// The token the fixtures carry (not secret: it exists only in these tests).
const FIXTURE_TOKEN: &str = "iamb_AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA";
const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";
const NOW: OffsetDateTime = datetime!(2026-11-22 06:00:00 UTC);

/// The ports behind the router, kept so tests can look at what the webhook wrote.
struct Fixture {
    state: AppState,
    cluster: Arc<MemoryCluster>,
    tokens: Arc<MemoryTokenStore>,
}

fn fixture_secret_name() -> String {
    iam_broker_admission::patch::secret_name(Token::parse(FIXTURE_TOKEN).unwrap().hash().as_str())
}

async fn fixture(mode: SidecarMode) -> Fixture {
    fixture_with(mode, Some(FIXTURE_PATH_SECRET)).await
}

/// The webhook path secret of the `events/admission-*.json` fixtures (fixtures only).
const FIXTURE_PATH_SECRET: &str = "fixture-path-secret-0123456789abcdef";

async fn fixture_with(mode: SidecarMode, path_secret: Option<&str>) -> Fixture {
    let allowances = Arc::new(MemoryAllowanceStore::default());
    let tokens = Arc::new(MemoryTokenStore::default());
    let cluster = Arc::new(MemoryCluster::default());
    let subject = Subject::service_account("team-a", "app").unwrap();
    allowances.allow(&subject, ROLE, None).await.unwrap();
    cluster.put_service_account(ServiceAccount {
        uid: None,
        namespace: "team-a".into(),
        name: "app".into(),
        annotations: [("eks.amazonaws.com/role-arn".to_owned(), ROLE.to_owned())].into(),
    });
    // The fixture token, as if the webhook had made it for pod web-1.
    let token = Token::parse(FIXTURE_TOKEN).unwrap();
    cluster
        .create_secret(&TokenSecret {
            namespace: "team-a".into(),
            name: fixture_secret_name(),
            labels: Default::default(),
            annotations: Default::default(),
            token: token.clone(),
        })
        .await
        .unwrap();
    tokens
        .insert(&TokenRecord {
            token_hash: token.hash(),
            subject,
            role_arn: iam_broker_kernel::allowance::RoleArn::parse(ROLE).unwrap(),
            secret_name: Some(fixture_secret_name()),
            pod_name: Some("web-1".into()),
            created_at: NOW.unix_timestamp(),
            last_used: None,
            expires: NOW.unix_timestamp() + 86_400,
            retracted_at: None,
        })
        .await
        .unwrap();
    let clock = Arc::new(FixedClock(NOW));
    let state = AppState {
        broker: Arc::new(Broker::new(
            allowances.clone(),
            tokens.clone(),
            Arc::new(MemoryIssuer::new(Arc::new(FixedClock(NOW)))),
            clock.clone(),
            BrokerSettings {
                credential_duration: Duration::from_secs(3600),
                token_ttl: Duration::from_secs(86_400),
                session_tags: false,
                source_identity: false,
                cluster_name: None,
            },
        )),
        webhook: Arc::new(Webhook::new(
            cluster.clone(),
            allowances,
            tokens.clone(),
            clock,
            WebhookSettings {
                inject: InjectSettings {
                    injection: InjectionMode::Sidecar,
                    proxy_image: Some("registry.example/iam-broker-proxy:0.1.0".to_owned()),
                    port: 53080,
                    mode,
                    token_file: false,
                    region: None,
                    broker_ca_pem: None,
                },
                role_annotation: "eks.amazonaws.com/role-arn".into(),
                broker_url: None,
                token_ttl: Duration::from_secs(86_400),
                failure_policy: Default::default(),
                forward_budget: iam_broker_admission::webhook::FORWARD_BUDGET,
                undo_budget: iam_broker_admission::webhook::UNDO_BUDGET,
                path_secret: path_secret.map(str::to_owned),
                identity: iam_broker_admission::webhook::WebhookIdentity::Secret,
                scope: None,
                default_cluster: None,
                service_account_lookup: true,
            },
        )),
        metrics: Metrics::off(),
    };
    Fixture {
        state,
        cluster,
        tokens,
    }
}

fn event_json(event: &str) -> String {
    let path = format!("{}/../../events/{event}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap()
}

async fn invoke(event: &str) -> (u16, http::HeaderMap, serde_json::Value) {
    invoke_on(&fixture(SidecarMode::Container).await, event).await
}

async fn invoke_on(fixture: &Fixture, event: &str) -> (u16, http::HeaderMap, serde_json::Value) {
    let request = lambda_http::request::from_str(&event_json(event)).unwrap();
    let service = iam_broker_lambda::service(router(fixture.state.clone()));
    let response = service.oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or_default(),
    )
}

#[tokio::test]
async fn get_root_with_a_raw_token_serves_credentials_despite_the_stage_prefix() {
    let (status, headers, body) = invoke("broker-get.json").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["cache-control"], "max-age=3300");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(body["AccessKeyId"], "ASIAMEMORYISSUER");
    assert_eq!(body["Expiration"], "2026-11-22T07:00:00Z");
    assert_eq!(body["RoleArn"], ROLE);
    assert_eq!(body["AccountId"], "123456789012");
}

#[tokio::test]
async fn get_credentials_with_a_bearer_token() {
    let (status, _, body) = invoke("broker-get-credentials-bearer.json").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["Token"], "memory-session");
}

#[tokio::test]
async fn missing_authorization_is_401() {
    let (status, headers, body) = invoke("broker-missing-authorization.json").await;
    assert_eq!(status, 401);
    assert_eq!(body["Code"], "MissingAuthorization");
    assert_eq!(headers["cache-control"], "no-store");
}

#[tokio::test]
async fn unknown_token_is_403() {
    let (status, _, body) = invoke("broker-unknown-token.json").await;
    assert_eq!(status, 403);
    assert_eq!(body["Code"], "InvalidToken");
}

#[tokio::test]
async fn healthz_and_unknown_routes() {
    let (status, _, body) = invoke("healthz.json").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, _, body) = invoke("unknown-route.json").await;
    assert_eq!((status, body["Code"].as_str()), (404, Some("NotFound")));
}

/// The AdmissionReview inside an event, and the pod it carries.
fn review_of(event: &str) -> serde_json::Value {
    let outer: serde_json::Value = serde_json::from_str(&event_json(event)).unwrap();
    serde_json::from_str(outer["body"].as_str().unwrap()).unwrap()
}

/// Applies the answer's patch (RFC 6902) to the exact pod the event sent.
fn patched_pod(event: &str, answer: &serde_json::Value) -> serde_json::Value {
    use base64::Engine as _;
    let review = review_of(event);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().expect("a patch"))
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    pod
}

fn env_names(container: &serde_json::Value) -> Vec<&str> {
    container["env"]
        .as_array()
        .map(|e| e.iter().filter_map(|v| v["name"].as_str()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn create_patches_the_pod_and_writes_secret_and_record() {
    let f = fixture(SidecarMode::Container).await;
    let (status, _, answer) = invoke_on(&f, "admission-create.json").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(
        answer["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    let pod = patched_pod("admission-create.json", &answer);
    let sidecar = &pod["spec"]["containers"][1];
    assert_eq!(sidecar["name"], "iam-broker-proxy");
    // the broker URL is this API's own URL, stage included
    assert_eq!(
        sidecar["env"][0]["value"],
        "https://abcdef1234.execute-api.us-east-1.amazonaws.com/Prod/"
    );
    assert_eq!(
        env_names(&pod["spec"]["containers"][0]),
        [
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN"
        ]
    );
    // a second Secret (besides the fixture's) and a second record, tied together
    let secret_name = pod["metadata"]["annotations"]["iam-broker.io/secret-name"]
        .as_str()
        .unwrap();
    let secret = f.cluster.secret("team-a", secret_name).unwrap();
    let record = f
        .tokens
        .record(&secret.token.hash())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.pod_name.as_deref(), Some("web-1"));
    assert_eq!(record.secret_name.as_deref(), Some(secret_name));
    // the token itself is nowhere in the answer
    assert!(!answer.to_string().contains(secret.token.expose()));
}

#[tokio::test]
async fn generate_name_pods_are_recorded_by_their_prefix() {
    let f = fixture(SidecarMode::Container).await;
    let (_, _, answer) = invoke_on(&f, "admission-create-generate-name.json").await;
    let pod = patched_pod("admission-create-generate-name.json", &answer);
    let secret_name = pod["metadata"]["annotations"]["iam-broker.io/secret-name"]
        .as_str()
        .unwrap();
    let secret = f.cluster.secret("team-a", secret_name).unwrap();
    let record = f
        .tokens
        .record(&secret.token.hash())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.pod_name.as_deref(), Some("web-7d9f8b6c4-"));
}

#[tokio::test]
async fn dry_run_patches_and_writes_nothing() {
    let f = fixture(SidecarMode::Container).await;
    let (_, _, answer) = invoke_on(&f, "admission-create-dry-run.json").await;
    let pod = patched_pod("admission-create-dry-run.json", &answer);
    assert_eq!(pod["spec"]["containers"][1]["name"], "iam-broker-proxy");
    assert_eq!(f.cluster.secrets().len(), 1, "only the fixture's Secret");
    assert_eq!(f.tokens.list().await.unwrap().len(), 1);
}

#[tokio::test]
async fn v1beta1_is_answered_in_kind() {
    let (status, _, answer) = invoke("admission-create-v1beta1.json").await;
    assert_eq!(status, 200);
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1beta1");
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
}

#[tokio::test]
async fn native_sidecar_serves_init_containers_and_keeps_their_restart_policy() {
    let f = fixture(SidecarMode::Native).await;
    let (_, _, answer) = invoke_on(&f, "admission-create-init-containers.json").await;
    let pod = patched_pod("admission-create-init-containers.json", &answer);
    let init = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init[0]["name"], "iam-broker-proxy");
    assert_eq!(init[0]["restartPolicy"], "Always");
    assert_eq!(init[1]["name"], "migrate");
    assert!(env_names(&init[1]).contains(&"AWS_CONTAINER_CREDENTIALS_FULL_URI"));
    assert_eq!(init[2]["restartPolicy"], "Always");
    assert_eq!(pod["spec"]["containers"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn skipped_and_preconfigured_containers_are_left_alone() {
    let (_, _, answer) = invoke("admission-create-skip-containers.json").await;
    let pod = patched_pod("admission-create-skip-containers.json", &answer);
    let sent = review_of("admission-create-skip-containers.json");
    assert_eq!(
        pod["spec"]["containers"][1],
        sent["request"]["object"]["spec"]["containers"][1]
    );
    assert!(
        env_names(&pod["spec"]["containers"][0]).contains(&"AWS_CONTAINER_AUTHORIZATION_TOKEN")
    );

    let (_, _, answer) = invoke("admission-create-preset-aws-env.json").await;
    let pod = patched_pod("admission-create-preset-aws-env.json", &answer);
    let sent = review_of("admission-create-preset-aws-env.json");
    for i in [1, 2] {
        assert_eq!(
            pod["spec"]["containers"][i],
            sent["request"]["object"]["spec"]["containers"][i]
        );
    }
    assert!(
        env_names(&pod["spec"]["containers"][0]).contains(&"AWS_CONTAINER_CREDENTIALS_FULL_URI")
    );
}

#[tokio::test]
async fn host_network_and_reinvoked_pods_get_no_patch() {
    for event in [
        "admission-create-host-network.json",
        "admission-create-reinvocation.json",
    ] {
        let f = fixture(SidecarMode::Container).await;
        let (status, _, answer) = invoke_on(&f, event).await;
        assert_eq!(status, 200);
        assert_eq!(answer["response"]["allowed"], true, "{event}");
        assert!(answer["response"].get("patch").is_none(), "{event}");
        assert_eq!(f.cluster.secrets().len(), 1, "{event}: nothing written");
    }
}

#[tokio::test]
async fn delete_removes_the_secret_and_the_record_and_returns_no_patch() {
    let f = fixture(SidecarMode::Container).await;
    let (status, _, answer) = invoke_on(&f, "admission-delete.json").await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());
    assert!(f.cluster.secret("team-a", &fixture_secret_name()).is_none());
    // the record is retracted (a tombstone that grants nothing), not live
    let records = f.tokens.list().await.unwrap();
    assert!(records.iter().all(|r| r.is_retracted()), "{records:?}");
    // and the broker no longer serves the token
    let (status, _, body) = invoke_on(&f, "broker-get.json").await;
    assert_eq!((status, body["Code"].as_str()), (403, Some("InvalidToken")));
}

#[tokio::test]
async fn a_body_that_is_not_an_admission_review_is_400() {
    let (status, headers, body) = invoke("admission-bad-request.json").await;
    assert_eq!(status, 400);
    assert_eq!(body["Code"], "BadRequest");
    assert!(
        body["Message"]
            .as_str()
            .unwrap()
            .contains("AdmissionReview")
    );
    assert_eq!(headers["cache-control"], "no-store");
}

#[tokio::test]
async fn with_a_path_secret_only_the_secret_path_reaches_the_webhook() {
    // GIVEN a webhook configured with WEBHOOK_PATH_SECRET
    let f = fixture_with(SidecarMode::Container, Some(FIXTURE_PATH_SECRET)).await;
    // WHEN a stranger posts to the plain routes or guesses a secret
    for event in [
        "admission-create-root-path.json",
        "admission-create-wrong-secret-path.json",
    ] {
        let (status, _, body) = invoke_on(&f, event).await;
        // THEN it is an ordinary 404 and nothing is written
        assert_eq!(
            (status, body["Code"].as_str()),
            (404, Some("NotFound")),
            "{event}"
        );
    }
    assert_eq!(f.cluster.secrets().len(), 1, "only the fixture's Secret");
    // AND the API server, which knows the secret, gets its patch
    let (status, _, answer) = invoke_on(&f, "admission-create-secret-path.json").await;
    assert_eq!(status, 200, "{answer}");
    let pod = patched_pod("admission-create-secret-path.json", &answer);
    // the sidecar calls the broker at the API's root, not at the secret path
    assert_eq!(
        pod["spec"]["containers"][1]["env"][0]["value"],
        "https://abcdef1234.execute-api.us-east-1.amazonaws.com/Prod/"
    );
    assert_eq!(f.cluster.secrets().len(), 2);
}

#[tokio::test]
async fn without_a_path_secret_the_secret_route_is_404() {
    let f = fixture_with(SidecarMode::Container, None).await;
    let (status, _, _) = invoke_on(&f, "admission-create-secret-path.json").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn every_answer_is_counted_in_emf_metrics() {
    let lines = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut f = fixture(SidecarMode::Container).await;
    let seen = lines.clone();
    f.state.metrics = Metrics::to(move |line| seen.lock().unwrap().push(line.to_owned()));
    invoke_on(&f, "broker-get.json").await;
    invoke_on(&f, "broker-unknown-token.json").await;
    invoke_on(&f, "admission-create.json").await;
    let lines: Vec<serde_json::Value> = lines
        .lock()
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["CredentialsServed"], 1);
    assert_eq!(lines[1]["Code"], "InvalidToken");
    assert_eq!(lines[2]["Decision"], "patched");
    assert!(lines[2]["AdmissionLatency"].as_f64().unwrap() >= 0.0);
    // no metric line carries the token
    assert!(lines.iter().all(|l| !l.to_string().contains(FIXTURE_TOKEN)));
}

#[test]
fn the_stage_never_reaches_the_router_and_becomes_the_base_path() {
    // lambda_http with AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH (template.yaml sets it; so does
    // .cargo/config.toml for these in-process tests) routes on the event's own path.
    let route = |path: &str, stage: &str| {
        let mut json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!(
                "{}/../../events/healthz.json",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap(),
        )
        .unwrap();
        json["path"] = path.into();
        json["requestContext"]["stage"] = stage.into();
        let request = lambda_http::request::from_str(&json.to_string()).unwrap();
        let request = iam_broker_lambda::gateway_context(request);
        let base = request
            .extensions()
            .get::<iam_broker_router::BasePath>()
            .map(|b| b.0.clone());
        (request.uri().path().to_owned(), base)
    };
    assert_eq!(
        route("/healthz", "Prod"),
        ("/healthz".to_owned(), Some("/Prod".to_owned()))
    );
    assert_eq!(
        route("/", "Prod"),
        ("/".to_owned(), Some("/Prod".to_owned()))
    );
    assert_eq!(
        route("/credentials", "$default"),
        ("/credentials".to_owned(), None)
    );
}

#[test]
fn an_http_function_without_the_stage_setting_refuses_to_start() {
    use iam_broker_lambda::{ENV_IGNORE_STAGE_IN_PATH, Handler, check_environment};
    let error = check_environment(Handler::Http, |_| None).unwrap_err();
    assert!(error.to_string().contains(ENV_IGNORE_STAGE_IN_PATH));
    assert!(check_environment(Handler::Http, |_| Some("true".to_owned())).is_ok());
    // The cleanup function takes no HTTP events.
    assert!(check_environment(Handler::Cleanup, |_| None).is_ok());
}
