//! The Lambda side of iam-broker: the shared router behind API Gateway.
//!
//! API Gateway REST events carry the stage (`/Prod`) in the path `lambda_http` builds; the
//! routes of DESIGN.md do not include it, so [`service`] strips it before routing.
//!
//! One function may also receive the Authorizations stream and the scheduled sweep:
//! [`Dispatcher`] tells the shapes apart ([`classify`]) and answers each.
#![forbid(unsafe_code)]

use std::sync::Arc;

use axum::Router;
use iam_broker_core::cleanup::{Cleanup, Report};
use lambda_http::request::RequestContext;
use lambda_http::{Request, RequestExt};
use serde_json::Value;
use tower::ServiceBuilder;
use tower::ServiceExt as _;
use tower::util::MapRequest;

/// The router, wrapped so that API Gateway's stage prefix is not part of the route.
pub fn service(router: Router) -> MapRequest<Router, fn(Request) -> Request> {
    ServiceBuilder::new()
        .map_request(strip_stage as fn(Request) -> Request)
        .service(router)
}

/// Removes a leading `/<stage>` from the path when the event names a stage, and records the stage
/// as the request's [`iam_broker_router::BasePath`] and API Gateway's request id as its
/// [`iam_broker_router::RequestId`].
pub fn strip_stage(mut request: Request) -> Request {
    let (stage, request_id) = match request.request_context_ref() {
        Some(RequestContext::ApiGatewayV1(context)) => {
            (context.stage.clone(), context.request_id.clone())
        }
        Some(RequestContext::ApiGatewayV2(context)) => {
            (context.stage.clone(), context.request_id.clone())
        }
        _ => (None, None),
    };
    if let Some(id) = request_id {
        request
            .extensions_mut()
            .insert(iam_broker_router::RequestId(id));
    }
    let Some(stage) = stage.filter(|s| !s.is_empty() && s != "$default") else {
        return request;
    };
    let prefix = format!("/{stage}");
    // The webhook tells the sidecar where the broker is: this API's URL, stage included.
    request
        .extensions_mut()
        .insert(iam_broker_router::BasePath(prefix.clone()));
    let path = request.uri().path();
    let rest = match path.strip_prefix(&prefix) {
        Some("") => "/",
        Some(rest) if rest.starts_with('/') => rest,
        _ => return request,
    };
    let path_and_query = match request.uri().query() {
        Some(query) => format!("{rest}?{query}"),
        None => rest.to_owned(),
    };
    let mut parts = request.uri().clone().into_parts();
    if let Ok(pq) = path_and_query.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
    request
}

/// What one Lambda invocation carries: the function is wired to API Gateway, to the
/// Authorizations table's stream and to a schedule, and tells them apart by shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invocation {
    /// An API Gateway (REST or HTTP API) request.
    Http,
    /// A DynamoDB stream batch (`Records[].eventSource == "aws:dynamodb"`).
    Stream,
    /// The scheduled sweep (`{"iam-broker": "sweep"}`, or an EventBridge scheduled event).
    Sweep,
}

/// Tells the event shapes apart; `None` for anything else.
pub fn classify(event: &Value) -> Option<Invocation> {
    if event.get("httpMethod").is_some() || event.get("requestContext").is_some() {
        return Some(Invocation::Http);
    }
    if event
        .get("Records")
        .and_then(Value::as_array)
        .and_then(|r| r.first())
        .and_then(|r| r.get("eventSource"))
        .and_then(Value::as_str)
        == Some("aws:dynamodb")
    {
        return Some(Invocation::Stream);
    }
    if event.get("iam-broker").and_then(Value::as_str) == Some("sweep")
        || event.get("detail-type").and_then(Value::as_str) == Some("Scheduled Event")
    {
        return Some(Invocation::Sweep);
    }
    None
}

/// The function's handlers: the shared router for HTTP, and the cleanup for stream batches and
/// the sweep (absent in a function that has no Kubernetes access).
#[derive(Clone)]
pub struct Dispatcher {
    router: Router,
    cleanup: Option<Arc<Cleanup>>,
}

/// Why an invocation failed (the Lambda runtime reports it; a stream batch is then retried).
#[derive(Debug, thiserror::Error)]
pub enum InvocationError {
    /// Not an event this function knows.
    #[error("unrecognised event: not an API Gateway request, a DynamoDB stream batch or the sweep")]
    Unrecognised,
    /// An API Gateway event `lambda_http` could not read.
    #[error("unreadable API Gateway event: {0}")]
    BadHttpEvent(String),
    /// The event needs the cleanup, which this function does not have.
    #[error("this function has no Kubernetes access for cleanup (KUBECONFIG_PARAMETER unset)")]
    NoCleanup,
    /// Some deletes failed; the report says how many. Failing makes the stream retry the batch.
    #[error("cleanup incomplete: {0:?}")]
    Incomplete(Report),
    /// The sweep could not list what it sweeps.
    #[error(transparent)]
    Sweep(#[from] iam_broker_core::cleanup::CleanupError),
}

impl Dispatcher {
    /// A dispatcher over the router and, when the function has Kubernetes access, the cleanup.
    pub fn new(router: Router, cleanup: Option<Arc<Cleanup>>) -> Self {
        Self { router, cleanup }
    }

    /// Handles one invocation's payload.
    pub async fn handle(&self, event: Value) -> Result<Value, InvocationError> {
        match classify(&event).ok_or(InvocationError::Unrecognised)? {
            Invocation::Http => self.http(&event).await,
            Invocation::Stream => {
                let cleanup = self.cleanup.as_ref().ok_or(InvocationError::NoCleanup)?;
                let report = cleanup.removed(&event).await;
                tracing::info!(
                    decision = "stream_cleanup",
                    secrets_deleted = report.secrets_deleted,
                    already_gone = report.secrets_already_gone,
                    skipped = report.skipped,
                    failures = report.failures,
                    "token records removed"
                );
                if report.failures > 0 {
                    return Err(InvocationError::Incomplete(report));
                }
                Ok(report_json(&report))
            }
            Invocation::Sweep => {
                let cleanup = self.cleanup.as_ref().ok_or(InvocationError::NoCleanup)?;
                let report = cleanup.sweep().await?;
                tracing::info!(
                    decision = "sweep",
                    secrets_deleted = report.secrets_deleted,
                    records_deleted = report.records_deleted,
                    skipped = report.skipped,
                    failures = report.failures,
                    "sweep done"
                );
                Ok(report_json(&report))
            }
        }
    }

    async fn http(&self, event: &Value) -> Result<Value, InvocationError> {
        let request = lambda_http::request::from_str(&event.to_string())
            .map_err(|e| InvocationError::BadHttpEvent(e.to_string()))?;
        // The router's error type is Infallible.
        let response = match service(self.router.clone()).oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        Ok(gateway_response(response).await)
    }
}

fn report_json(report: &Report) -> Value {
    serde_json::json!({
        "secretsDeleted": report.secrets_deleted,
        "secretsAlreadyGone": report.secrets_already_gone,
        "recordsDeleted": report.records_deleted,
        "skipped": report.skipped,
        "failures": report.failures,
    })
}

/// An API Gateway proxy response (REST v1 and HTTP API both accept this shape).
pub async fn gateway_response(response: axum::response::Response) -> Value {
    use http_body_util::BodyExt as _;
    let (parts, body) = response.into_parts();
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            tracing::error!(%error, "could not read the response body");
            Default::default()
        }
    };
    let mut headers = serde_json::Map::new();
    let mut multi = serde_json::Map::new();
    for name in parts.headers.keys() {
        let values: Vec<Value> = parts
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(|v| Value::String(v.to_owned()))
            .collect();
        if let Some(last) = values.last() {
            headers.insert(name.as_str().to_owned(), last.clone());
        }
        multi.insert(name.as_str().to_owned(), Value::Array(values));
    }
    let (body, base64) = match std::str::from_utf8(&bytes) {
        Ok(text) => (text.to_owned(), false),
        Err(_) => {
            use base64::Engine as _;
            (
                base64::engine::general_purpose::STANDARD.encode(&bytes),
                true,
            )
        }
    };
    serde_json::json!({
        "statusCode": parts.status.as_u16(),
        "headers": headers,
        "multiValueHeaders": multi,
        "body": body,
        "isBase64Encoded": base64,
    })
}
