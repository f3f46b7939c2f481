//! Router tests through the Lambda adapter: API Gateway REST (v1 proxy) events from `events/`,
//! parsed by `lambda_http` exactly as the runtime does, sent through the router with `oneshot`.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::BodyExt as _;
use iam_broker_core::allowance::Subject;
use iam_broker_core::broker::{Broker, BrokerSettings};
use iam_broker_core::clock::FixedClock;
use iam_broker_core::memory::{MemoryAllowanceStore, MemoryTokenStore};
use iam_broker_core::ports::{
    AllowanceStore, AssumeRoleRequest, CredentialIssuer, IssueError, TokenStore,
};
use iam_broker_core::{Credentials, Token, TokenRecord};
use iam_broker_router::{AppState, router};
use time::OffsetDateTime;
use time::macros::datetime;
use tower::ServiceExt as _;

/// The token the fixtures carry (not secret: it exists only in these tests).
const FIXTURE_TOKEN: &str = "iamb_AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA";
const ROLE: &str = "arn:aws:iam::123456789012:role/s3_reader";
const NOW: OffsetDateTime = datetime!(2026-11-22 06:00:00 UTC);

/// Issues fixed credentials valid for the requested duration: the port's contract, no network.
struct FixedIssuer;

#[async_trait]
impl CredentialIssuer for FixedIssuer {
    async fn assume_role(&self, request: &AssumeRoleRequest) -> Result<Credentials, IssueError> {
        Ok(Credentials {
            access_key_id: "ASIAFIXTURE".into(),
            secret_access_key: "fixture-secret".into(),
            session_token: "fixture-session".into(),
            expiration: NOW + time::Duration::seconds(request.duration.as_secs() as i64),
        })
    }
}

async fn state() -> AppState {
    let allowances = Arc::new(MemoryAllowanceStore::default());
    let tokens = Arc::new(MemoryTokenStore::default());
    let subject = Subject::new("team-a", "app", false).unwrap();
    allowances.allow(&subject, ROLE).await.unwrap();
    tokens
        .insert(&TokenRecord {
            token_hash: Token::parse(FIXTURE_TOKEN).unwrap().hash(),
            subject,
            role_arn: ROLE.into(),
            secret_name: None,
            pod_name: Some("web-1".into()),
            created_at: NOW.unix_timestamp(),
            last_used: None,
            expires: NOW.unix_timestamp() + 86_400,
        })
        .await
        .unwrap();
    AppState {
        broker: Arc::new(Broker::new(
            allowances,
            tokens,
            Arc::new(FixedIssuer),
            Arc::new(FixedClock(NOW)),
            BrokerSettings {
                credential_duration: Duration::from_secs(3600),
                token_ttl: Duration::from_secs(86_400),
                session_tags: false,
            },
        )),
    }
}

async fn invoke(event: &str) -> (u16, http::HeaderMap, serde_json::Value) {
    let path = format!("{}/../../events/{event}", env!("CARGO_MANIFEST_DIR"));
    let json = std::fs::read_to_string(&path).unwrap();
    let request = lambda_http::request::from_str(&json).unwrap();
    let service = iam_broker_lambda::service(router(state().await));
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
    assert_eq!(body["AccessKeyId"], "ASIAFIXTURE");
    assert_eq!(body["Expiration"], "2026-11-22T07:00:00Z");
    assert_eq!(body["RoleArn"], ROLE);
    assert_eq!(body["AccountId"], "123456789012");
}

#[tokio::test]
async fn get_credentials_with_a_bearer_token() {
    let (status, _, body) = invoke("broker-get-credentials-bearer.json").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["Token"], "fixture-session");
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

#[tokio::test]
async fn post_says_the_webhook_is_not_in_this_build() {
    let (status, headers, body) = invoke("webhook-post.json").await;
    assert_eq!(status, 501);
    assert_eq!(body["Code"], "WebhookNotAvailable");
    assert_eq!(headers["cache-control"], "no-store");
}

#[test]
fn the_stage_is_stripped_only_when_it_leads_the_path() {
    let strip = |path: &str, stage: &str| {
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
        iam_broker_lambda::strip_stage(request)
            .uri()
            .path()
            .to_owned()
    };
    assert_eq!(strip("/healthz", "Prod"), "/healthz");
    assert_eq!(strip("/", "Prod"), "/");
    assert_eq!(strip("/Production/x", "Prod"), "/Production/x");
    assert_eq!(strip("/credentials", "$default"), "/credentials");
}
