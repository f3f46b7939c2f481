//! The Kubernetes adapter against the HTTPS API stand-in, through a real kubeconfig and the real
//! `kube` client: reads, creates and deletes, `Status` error mapping, deadlines, TLS
//! verification, and the client rebuilt from SSM (moto) when the API answers 401.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use axum::http::Method;
use iam_broker_kernel::ports::{Cluster, ClusterError, ClusterEvent, ObjectRef, TokenSecret};
use iam_broker_kernel::{Token, TokenHash};
use iam_broker_kube::{ClientSource, KubeCluster, store_kubeconfig_in_ssm};
use iam_broker_testkit::kube_api::{DEFAULT_TOKEN, Fault, KubeApi};
use iam_broker_tests::Moto;

/// Generous: CI machines are small and busy; the hung-server test only needs it below 30 s.
const TIMEOUT: Duration = Duration::from_secs(5);
const PARAMETER: &str = "/iam-broker/webhook-kubeconfig";

async fn cluster(api: &KubeApi) -> KubeCluster {
    KubeCluster::new(
        ClientSource::Kubeconfig(api.kubeconfig(DEFAULT_TOKEN)),
        TIMEOUT,
    )
}

fn secret(namespace: &str, name: &str, token: &Token) -> TokenSecret {
    TokenSecret {
        namespace: namespace.into(),
        name: name.into(),
        labels: [(
            "app.kubernetes.io/managed-by".to_owned(),
            "iam-broker".to_owned(),
        )]
        .into(),
        annotations: [(
            "iam-broker.io/token-hash".to_owned(),
            token.hash().as_str().to_owned(),
        )]
        .into(),
        token: token.clone(),
    }
}

#[tokio::test]
async fn reads_service_accounts() {
    let api = KubeApi::start().await.unwrap();
    api.put_service_account("team-a", "app", &[("eks.amazonaws.com/role-arn", "arn:x")]);
    let c = cluster(&api).await;
    let sa = c.service_account("team-a", "app").await.unwrap().unwrap();
    assert_eq!(sa.annotations["eks.amazonaws.com/role-arn"], "arn:x");
    assert_eq!((sa.namespace.as_str(), sa.name.as_str()), ("team-a", "app"));
    assert!(
        sa.uid.is_some_and(|uid| !uid.is_empty()),
        "the uid Events refer to"
    );
    assert!(
        c.service_account("team-a", "nobody")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        api.count(
            &Method::GET,
            "/api/v1/namespaces/team-a/serviceaccounts/app"
        ),
        1
    );
}

#[tokio::test]
async fn creates_an_opaque_secret_holding_exactly_the_token() {
    let api = KubeApi::start().await.unwrap();
    let c = cluster(&api).await;
    let token = Token::mint().unwrap();
    c.create_secret(&secret("team-a", "iam-broker-token-1", &token))
        .await
        .unwrap();
    let stored = api.secret("team-a", "iam-broker-token-1").unwrap();
    assert_eq!(stored["type"], "Opaque");
    assert_eq!(
        stored["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "iam-broker"
    );
    // the value, byte for byte: no trailing newline
    assert_eq!(
        api.secret_token("team-a", "iam-broker-token-1").unwrap(),
        token.expose()
    );
    // the same name again is AlreadyExists
    let again = c
        .create_secret(&secret("team-a", "iam-broker-token-1", &token))
        .await;
    assert!(
        matches!(again, Err(ClusterError::AlreadyExists)),
        "{again:?}"
    );
}

#[tokio::test]
async fn deletes_and_tolerates_already_gone() {
    let api = KubeApi::start().await.unwrap();
    let c = cluster(&api).await;
    let token = Token::mint().unwrap();
    c.create_secret(&secret("team-a", "s", &token))
        .await
        .unwrap();
    assert!(c.delete_secret("team-a", "s").await.unwrap());
    assert!(api.secret("team-a", "s").is_none());
    assert!(!c.delete_secret("team-a", "s").await.unwrap());
}

#[tokio::test]
async fn lists_managed_secrets_by_label_without_their_data() {
    let api = KubeApi::start().await.unwrap();
    let c = cluster(&api).await;
    let token = Token::mint().unwrap();
    c.create_secret(&secret("a", "managed", &token))
        .await
        .unwrap();
    api.put(
        "secrets",
        "b",
        "unmanaged",
        serde_json::json!({ "metadata": { "labels": { "app": "other" } } }),
    );
    api.set_creation_timestamp("secrets", "a", "managed", "2026-01-02T03:04:05Z");
    let listed = c
        .managed_secrets("app.kubernetes.io/managed-by=iam-broker")
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].namespace.as_str(), listed[0].name.as_str()),
        ("a", "managed")
    );
    assert_eq!(listed[0].created_at, Some(1_767_323_045));
    assert_eq!(
        TokenHash::parse(&listed[0].annotations["iam-broker.io/token-hash"]),
        Some(token.hash())
    );
    // it asked for metadata only, cluster-wide
    assert!(
        api.requests()
            .iter()
            .any(|(m, p)| *m == Method::GET && p.starts_with("/api/v1/secrets?"))
    );
}

#[tokio::test]
async fn status_errors_map_to_the_port() {
    let api = KubeApi::start().await.unwrap();
    let c = cluster(&api).await;
    api.inject(Fault::status(Method::GET, "/serviceaccounts/", 403).times(1));
    assert!(matches!(
        c.service_account("a", "b").await,
        Err(ClusterError::Forbidden(_))
    ));
    api.inject(Fault::status(Method::GET, "/serviceaccounts/", 500).times(1));
    assert!(matches!(
        c.service_account("a", "b").await,
        Err(ClusterError::Unavailable(_))
    ));
    api.inject(Fault::status(Method::POST, "/secrets", 422).times(1));
    let token = Token::mint().unwrap();
    assert!(matches!(
        c.create_secret(&secret("a", "s", &token)).await,
        Err(ClusterError::Rejected { status: 422, .. })
    ));
    // faults were one-shot: the next call works
    assert!(c.service_account("a", "b").await.unwrap().is_none());
}

#[tokio::test]
async fn a_hung_api_server_is_unavailable_within_the_deadline() {
    let api = KubeApi::start().await.unwrap();
    let c = cluster(&api).await;
    // warm the client, then make the API server hang
    assert!(c.service_account("a", "b").await.unwrap().is_none());
    api.inject(Fault::delay(
        Method::GET,
        "/serviceaccounts/",
        Duration::from_secs(30),
    ));
    let started = Instant::now();
    let result = c.service_account("a", "b").await;
    assert!(
        matches!(result, Err(ClusterError::Unavailable(_))),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn tls_is_verified_against_the_kubeconfig_ca() {
    let api = KubeApi::start().await.unwrap();
    let other = KubeApi::start().await.unwrap();
    // a kubeconfig that trusts another CA cannot talk to this server
    let c = KubeCluster::new(
        ClientSource::Kubeconfig(api.kubeconfig_with_ca(DEFAULT_TOKEN, &other.ca_pem)),
        TIMEOUT,
    );
    let result = c.service_account("a", "b").await;
    assert!(
        matches!(result, Err(ClusterError::Unavailable(_))),
        "{result:?}"
    );
    assert!(
        api.requests().is_empty(),
        "no request got through the handshake"
    );
}

#[tokio::test]
async fn a_rotated_kubeconfig_in_ssm_is_picked_up_on_401() {
    // GIVEN the kubeconfig in SSM (moto) and a client built from it
    let moto = Moto::start().await.unwrap();
    let sdk = moto.sdk_config().await;
    let api = KubeApi::start().await.unwrap();
    store_kubeconfig_in_ssm(
        &aws_sdk_ssm::Client::new(&sdk),
        PARAMETER,
        &api.kubeconfig("token-a"),
        None,
    )
    .await
    .unwrap();
    api.set_tokens(&["token-a"]);
    let c = KubeCluster::new(
        ClientSource::SsmParameter {
            ssm: aws_sdk_ssm::Client::new(&sdk),
            name: PARAMETER.into(),
        },
        TIMEOUT,
    );
    assert!(c.service_account("a", "b").await.unwrap().is_none());

    // WHEN the token is rotated: the API server only accepts token-b ...
    api.set_tokens(&["token-b"]);
    // ... and SSM still has token-a: the call is Unauthorized (after one rebuild)
    assert!(matches!(
        c.service_account("a", "b").await,
        Err(ClusterError::Unauthorized(_))
    ));
    // THEN once SSM holds token-b, the next call rebuilds the client and succeeds
    store_kubeconfig_in_ssm(
        &aws_sdk_ssm::Client::new(&sdk),
        PARAMETER,
        &api.kubeconfig("token-b"),
        None,
    )
    .await
    .unwrap();
    assert!(c.service_account("a", "b").await.unwrap().is_none());
}

#[tokio::test]
async fn a_missing_ssm_parameter_is_unavailable_not_a_panic() {
    let moto = Moto::start().await.unwrap();
    let c = KubeCluster::new(
        ClientSource::SsmParameter {
            ssm: aws_sdk_ssm::Client::new(&moto.sdk_config().await),
            name: "/does/not/exist".into(),
        },
        TIMEOUT,
    );
    let result = c.service_account("a", "b").await;
    let Err(ClusterError::Unavailable(error)) = result else {
        panic!("{result:?}");
    };
    assert!(error.to_string().contains("/does/not/exist"), "{error}");
}

#[tokio::test]
async fn records_warning_events_that_kubectl_describe_finds() {
    // GIVEN the webhook's view of a pod's controller
    let api = KubeApi::start().await.unwrap();
    let c = cluster(&api).await;
    let event = ClusterEvent {
        involved: ObjectRef {
            api_version: "apps/v1".into(),
            kind: "ReplicaSet".into(),
            namespace: "team-a".into(),
            name: "web-7d9f8b6c4".into(),
            uid: Some("rs-uid".into()),
        },
        reason: "RoleNotAllowed",
        message: "iam-broker: no AWS credentials injected: role … is not allowed".into(),
        at: 1_795_000_000,
    };
    // WHEN it is recorded twice (two instances, say)
    c.record_event(&event).await.unwrap();
    c.record_event(&event).await.unwrap();
    // THEN the API server holds two core/v1 Warning Events about exactly that object
    let events = api.events("team-a");
    assert_eq!(events.len(), 2, "names must not clash: {events:?}");
    let e = &events[0];
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["reason"], "RoleNotAllowed");
    assert_eq!(e["involvedObject"]["kind"], "ReplicaSet");
    assert_eq!(e["involvedObject"]["name"], "web-7d9f8b6c4");
    assert_eq!(e["involvedObject"]["uid"], "rs-uid");
    assert_eq!(e["involvedObject"]["apiVersion"], "apps/v1");
    assert_eq!(e["source"]["component"], "iam-broker");
    assert_eq!(e["lastTimestamp"], "2026-11-18T11:06:40Z");
    assert!(
        e["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("web-7d9f8b6c4.")
    );
    // AND a refusal is an error the webhook can log
    api.inject(Fault::status(Method::POST, "/events", 403));
    assert!(c.record_event(&event).await.is_err());
}
