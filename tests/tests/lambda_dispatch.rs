//! The `bootstrap` binary's two handlers with the real adapters (built by the composition root
//! against moto, the kubeconfig read from SSM, the Kubernetes API stand-in over HTTPS): `http`
//! with an API Gateway admission request, and `cleanup` with an Authorizations stream batch of
//! `REMOVE` records (what TTL expiry produces; moto never expires items, so the batch is fed in)
//! and the scheduled sweep, both as the typed events the runtime hands it.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use iam_broker_aws::DynamoTokenStore;
use iam_broker_kernel::allowance::Subject;
use iam_broker_kernel::ports::{AllowanceStore as _, TokenStore};
use iam_broker_kernel::{Config, Token, TokenRecord};
use std::sync::Arc;

use http_body_util::BodyExt as _;
use iam_broker_admission::cleanup::Cleanup;
use iam_broker_lambda::{CleanupEvent, CleanupFailure, Handler, UnknownHandler};
use iam_broker_router::router;
use iam_broker_testkit::kube_api::{DEFAULT_TOKEN, KubeApi};
use iam_broker_tests::{Moto, Tables, workspace_root};
use serde_json::{Value, json};
use tower::ServiceExt as _;

const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";
const PARAMETER: &str = "/iam-broker/webhook-kubeconfig";

struct World {
    _moto: Moto,
    api: KubeApi,
    tokens: DynamoTokenStore,
    router: axum::Router,
    cleanup: Arc<Cleanup>,
}

impl World {
    /// The `http` handler: an API Gateway event through `lambda_http` and the router.
    async fn http(&self, event: Value) -> (u16, Value) {
        let request = lambda_http::request::from_str(&event.to_string()).unwrap();
        let response = iam_broker_lambda::service(self.router.clone())
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    /// The `cleanup` handler: the payload as the runtime deserializes it, then the report.
    async fn cleanup(&self, event: Value) -> Result<Value, CleanupFailure> {
        let event: CleanupEvent = serde_json::from_value(event).unwrap();
        iam_broker_lambda::cleanup(&self.cleanup, event)
            .await
            .map(|report| iam_broker_lambda::report_json(&report))
    }
}

async fn world() -> World {
    let moto = Moto::start().await.unwrap();
    let sdk = moto.sdk_config().await;
    let tables = Tables::create(&sdk, "fn").await.unwrap();
    let api = KubeApi::start().await.unwrap();
    api.put_service_account("team-a", "app", &[("eks.amazonaws.com/role-arn", ROLE)]);
    iam_broker_kube::store_kubeconfig_in_ssm(
        &aws_sdk_ssm::Client::new(&sdk),
        PARAMETER,
        &api.kubeconfig(DEFAULT_TOKEN),
        None,
    )
    .await
    .unwrap();
    let config = Config {
        allowances_table: tables.allowances.clone(),
        authorizations_table: tables.authorizations.clone(),
        kubeconfig_parameter: Some(PARAMETER.into()),
        proxy_image: Some("registry.example/iam-broker-proxy:0.1.0".into()),
        // the secret path the events/ admissions arrive at
        webhook_path_secret: Some("fixture-path-secret-0123456789abcdef".into()),
        ..Config::default()
    };
    let app = iam_broker_app::build_with(&config, &sdk);
    iam_broker_aws::DynamoAllowanceStore::new(
        aws_sdk_dynamodb::Client::new(&sdk),
        &tables.allowances,
    )
    .allow(
        &Subject::service_account("team-a", "app").unwrap(),
        ROLE,
        None,
    )
    .await
    .unwrap();
    World {
        tokens: DynamoTokenStore::new(aws_sdk_dynamodb::Client::new(&sdk), &tables.authorizations),
        router: router(app.state),
        cleanup: app.cleanup,
        _moto: moto,
        api,
    }
}

fn event(name: &str) -> Value {
    let path = workspace_root().join("events").join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A stream `REMOVE` record with the record's old image, as DynamoDB sends it after TTL expiry.
fn remove(record: &TokenRecord) -> Value {
    json!({ "eventID": "1", "eventName": "REMOVE", "eventVersion": "1.1",
        "eventSource": "aws:dynamodb", "awsRegion": "us-east-1",
        "userIdentity": { "type": "Service", "principalId": "dynamodb.amazonaws.com" },
        "dynamodb": { "ApproximateCreationDateTime": 1_795_000_000,
            "Keys": { "token_hash": { "S": record.token_hash.as_str() } },
            "OldImage": {
                "token_hash": { "S": record.token_hash.as_str() },
                "namespace": { "S": record.subject.namespace },
                "service_account": { "S": record.subject.service_account },
                "role_arn": { "S": record.role_arn.as_str() },
                "secret_name": { "S": record.secret_name.clone().unwrap_or_default() },
                "created_at": { "N": record.created_at.to_string() },
                "expires": { "N": record.expires.to_string() } },
            "SequenceNumber": "1", "SizeBytes": 200, "StreamViewType": "OLD_IMAGE" },
        "eventSourceARN": "arn:aws:dynamodb:us-east-1:123456789012:table/x/stream/2026" })
}

#[tokio::test]
async fn admission_then_stream_removal_deletes_the_secret() {
    // GIVEN a pod admitted through the function (an API Gateway event)
    let w = world().await;
    let (status, review) = w.http(event("admission-create.json")).await;
    assert_eq!(status, 200, "{review}");
    assert_eq!(review["response"]["patchType"], "JSONPatch");
    let records = w.tokens.list().await.unwrap();
    assert_eq!(records.len(), 1);
    let secret_name = records[0].secret_name.clone().unwrap();
    assert!(w.api.secret("team-a", &secret_name).is_some());

    // WHEN the record expires and the stream delivers its REMOVE (plus a MODIFY)
    let mut modify = remove(&records[0]);
    modify["eventName"] = json!("MODIFY");
    let batch = json!({ "Records": [remove(&records[0]), modify] });
    let report = w.cleanup(batch.clone()).await.unwrap();

    // THEN the Secret is gone, and a redelivery is harmless
    assert_eq!(report["secretsDeleted"], 1, "{report}");
    assert_eq!(report["skipped"], 1);
    assert!(w.api.secret("team-a", &secret_name).is_none());
    let again = w.cleanup(batch).await.unwrap();
    assert_eq!(again["secretsAlreadyGone"], 1);
}

#[tokio::test]
async fn the_sweep_removes_orphans_on_both_sides() {
    let w = world().await;
    // a healthy pair made by the webhook
    assert_eq!(w.http(event("admission-create.json")).await.0, 200);
    let healthy = w.tokens.list().await.unwrap()[0].clone();
    // a Secret whose record is gone, created an hour ago
    let orphan_token = Token::mint().unwrap();
    let orphan = iam_broker_admission::patch::secret_name(orphan_token.hash().as_str());
    w.api.put(
        "secrets",
        "team-b",
        &orphan,
        json!({ "type": "Opaque",
            "metadata": { "labels": { "app.kubernetes.io/managed-by": "iam-broker" },
                "annotations": { "iam-broker.io/token-hash": orphan_token.hash().as_str() },
                "creationTimestamp": "2020-01-01T00:00:00Z" } }),
    );
    // a record whose Secret is gone, created an hour ago
    let lost = Token::mint().unwrap();
    w.tokens
        .insert(&TokenRecord {
            token_hash: lost.hash(),
            subject: Subject::service_account("team-c", "app").unwrap(),
            role_arn: iam_broker_kernel::allowance::RoleArn::parse(ROLE).unwrap(),
            secret_name: Some(iam_broker_admission::patch::secret_name(
                lost.hash().as_str(),
            )),
            pod_name: Some("gone".into()),
            created_at: time::OffsetDateTime::now_utc().unix_timestamp() - 3600,
            last_used: None,
            expires: time::OffsetDateTime::now_utc().unix_timestamp() + 86_400,
            retracted_at: None,
        })
        .await
        .unwrap();

    // WHEN the schedule fires
    let report = w.cleanup(event("sweep.json")).await.unwrap();

    // THEN both orphans are gone and the healthy pair stays
    assert_eq!(report["secretsDeleted"], 1, "{report}");
    assert_eq!(report["recordsDeleted"], 1, "{report}");
    assert!(w.api.secret("team-b", &orphan).is_none());
    let left = w.tokens.list().await.unwrap();
    assert_eq!(left, vec![healthy.clone()]);
    assert!(
        w.api
            .secret("team-a", healthy.secret_name.as_deref().unwrap())
            .is_some()
    );
}

#[test]
fn the_handler_comes_from_the_function_setting_and_events_are_typed() {
    assert_eq!(Handler::from_setting(Some("http")), Ok(Handler::Http));
    assert_eq!(Handler::from_setting(Some("cleanup")), Ok(Handler::Cleanup));
    assert_eq!(Handler::from_setting(None), Ok(Handler::Http), "local runs");
    assert_eq!(
        Handler::from_setting(Some("bootstrap")),
        Err(UnknownHandler("bootstrap".into()))
    );
    // the cleanup function's sample events are what the runtime will hand it
    assert!(matches!(
        serde_json::from_value::<CleanupEvent>(event("dynamodb-stream-remove.json")),
        Ok(CleanupEvent::Stream(_))
    ));
    assert!(matches!(
        serde_json::from_value::<CleanupEvent>(event("sweep.json")),
        Ok(CleanupEvent::Sweep(_))
    ));
    // anything else is refused by the runtime before the handler runs
    for other in [
        json!({ "hello": "world" }),
        json!({ "iam-broker": "reboot" }),
        event("broker-get.json"),
    ] {
        assert!(
            serde_json::from_value::<CleanupEvent>(other.clone()).is_err(),
            "{other}"
        );
    }
}
