//! Handlers: parse, call the domain, wrap the answer. No decisions are made here.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use iam_broker_core::BrokerError;
use serde_json::json;

use crate::{ApiError, AppState};

/// `GET /`, `GET /credentials`: the broker.
pub(crate) async fn credentials(State(state): State<AppState>, headers: HeaderMap) -> Response {
    // A header that is not UTF-8 cannot hold a token; pass it on as malformed, not as missing.
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("\u{fffd}"));
    match state.broker.credentials(authorization).await {
        Ok(answer) => {
            tracing::info!(
                decision = "served",
                namespace = %answer.subject.namespace,
                service_account = %answer.subject.service_account,
                pod = answer.pod_name.as_deref().unwrap_or(""),
                role_arn = %answer.body.role_arn,
                expiration = %answer.body.expiration,
                "credentials served"
            );
            let mut response = Json(answer.body).into_response();
            if let Ok(value) = HeaderValue::from_str(&format!("max-age={}", answer.max_age)) {
                response.headers_mut().insert(header::CACHE_CONTROL, value);
            }
            response
        }
        Err(error) => {
            log_refusal(&error);
            ApiError::from(&error).into_response()
        }
    }
}

fn log_refusal(error: &BrokerError) {
    match error {
        BrokerError::Unavailable { source, .. } => {
            let mut chain = source.to_string();
            let mut cause = source.source();
            while let Some(inner) = cause {
                chain.push_str(": ");
                chain.push_str(&inner.to_string());
                cause = inner.source();
            }
            tracing::warn!(decision = "unavailable", code = error.code(), error = %error, cause = %chain, "credentials not served");
        }
        BrokerError::AllowanceRevoked { subject, role_arn } => tracing::info!(
            decision = "denied",
            code = error.code(),
            namespace = %subject.namespace,
            service_account = %subject.service_account,
            role_arn = %role_arn,
            "credentials not served"
        ),
        _ => {
            tracing::info!(decision = "denied", code = error.code(), error = %error, "credentials not served")
        }
    }
}

/// `POST /`, `POST /mutate`: the admission webhook is not part of this build yet; say so
/// plainly rather than admit pods without doing the work.
pub(crate) async fn admission() -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "WebhookNotAvailable",
        "the admission webhook is not available in this build of iam-broker",
    )
}

/// `GET /healthz`.
pub(crate) async fn healthz() -> Response {
    let mut response = Json(json!({"status": "ok"})).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Any other path.
pub(crate) async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NotFound",
        "no such route; the broker is GET / or GET /credentials, the webhook POST / or POST /mutate",
    )
}

/// A known path with the wrong method.
pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "this route does not take that method",
    )
}
