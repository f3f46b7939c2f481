//! The Lambda function's three event shapes through [`Dispatcher`] with the real adapters
//! (built by the composition root against moto, the kubeconfig read from SSM, the Kubernetes
//! API stand-in over HTTPS): an API Gateway admission request, an Authorizations stream batch
//! with `REMOVE` records (what TTL expiry produces; moto never expires items, so the batch is fed
//! in), and the scheduled sweep.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use iam_broker_aws::DynamoTokenStore;
use iam_broker_core::allowance::Subject;
use iam_broker_core::ports::{AllowanceStore as _, TokenStore};
use iam_broker_core::{Config, Token, TokenRecord};
use iam_broker_lambda::{Dispatcher, InvocationError};
use iam_broker_router::router;
use iam_broker_tests::kube_api::{DEFAULT_TOKEN, KubeApi};
use iam_broker_tests::{Moto, Tables, workspace_root};
use serde_json::{Value, json};

const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";
const PARAMETER: &str = "/iam-broker/webhook-kubeconfig";

struct World {
    _moto: Moto,
    api: KubeApi,
    tokens: DynamoTokenStore,
    dispatcher: Dispatcher,
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
    .allow(&Subject::service_account("team-a", "app").unwrap(), ROLE)
    .await
    .unwrap();
    World {
        tokens: DynamoTokenStore::new(aws_sdk_dynamodb::Client::new(&sdk), &tables.authorizations),
        dispatcher: Dispatcher::new(router(app.state), Some(app.cleanup)),
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
                "role_arn": { "S": record.role_arn },
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
    let answer = w
        .dispatcher
        .handle(event("admission-create.json"))
        .await
        .unwrap();
    assert_eq!(answer["statusCode"], 200, "{answer}");
    assert_eq!(answer["headers"]["content-type"], "application/json");
    let review: Value = serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
    assert_eq!(review["response"]["patchType"], "JSONPatch");
    let records = w.tokens.list().await.unwrap();
    assert_eq!(records.len(), 1);
    let secret_name = records[0].secret_name.clone().unwrap();
    assert!(w.api.secret("team-a", &secret_name).is_some());

    // WHEN the record expires and the stream delivers its REMOVE (plus junk)
    let batch = json!({ "Records": [remove(&records[0]),
        { "eventName": "MODIFY", "eventSource": "aws:dynamodb", "dynamodb": {} }] });
    let report = w.dispatcher.handle(batch.clone()).await.unwrap();

    // THEN the Secret is gone, and a redelivery is harmless
    assert_eq!(report["secretsDeleted"], 1, "{report}");
    assert_eq!(report["skipped"], 1);
    assert!(w.api.secret("team-a", &secret_name).is_none());
    let again = w.dispatcher.handle(batch).await.unwrap();
    assert_eq!(again["secretsAlreadyGone"], 1);
}

#[tokio::test]
async fn the_sweep_removes_orphans_on_both_sides() {
    let w = world().await;
    // a healthy pair made by the webhook
    w.dispatcher
        .handle(event("admission-create.json"))
        .await
        .unwrap();
    let healthy = w.tokens.list().await.unwrap()[0].clone();
    // a Secret whose record is gone, created an hour ago
    let orphan_token = Token::mint().unwrap();
    let orphan = iam_broker_core::admission::secret_name(orphan_token.hash().as_str());
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
            role_arn: ROLE.into(),
            secret_name: Some(iam_broker_core::admission::secret_name(
                lost.hash().as_str(),
            )),
            pod_name: Some("gone".into()),
            created_at: time::OffsetDateTime::now_utc().unix_timestamp() - 3600,
            last_used: None,
            expires: time::OffsetDateTime::now_utc().unix_timestamp() + 86_400,
        })
        .await
        .unwrap();

    // WHEN the schedule fires
    let report = w.dispatcher.handle(event("sweep.json")).await.unwrap();

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

#[tokio::test]
async fn unknown_events_are_refused() {
    let w = world().await;
    let result = w.dispatcher.handle(json!({ "hello": "world" })).await;
    assert!(
        matches!(result, Err(InvocationError::Unrecognised)),
        "{result:?}"
    );
    // and the sample events of events/ are all recognised
    for name in [
        "dynamodb-stream-remove.json",
        "sweep.json",
        "broker-get.json",
    ] {
        assert!(
            iam_broker_lambda::classify(&event(name)).is_some(),
            "{name}"
        );
    }
}
