//! Handlers: parse, call the domain, wrap the answer. No decisions are made here.

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use iam_broker_admission::review;
use iam_broker_broker::BrokerError;
use serde_json::json;

use crate::{ApiError, AppState, BasePath};

/// The broker's query string: `?role=<role ARN>` picks the role of a projected token (the
/// webhook writes it into the sidecar's `BROKER_URL`). Other parameters are ignored.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct CredentialsQuery {
    #[serde(default)]
    role: Option<String>,
}

/// `GET /`, `GET /credentials`: the broker.
pub(crate) async fn credentials(
    State(state): State<AppState>,
    Query(query): Query<CredentialsQuery>,
    headers: HeaderMap,
) -> Response {
    let started = std::time::Instant::now();
    // A header that is not UTF-8 cannot hold a token; pass it on as malformed, not as missing.
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("\u{fffd}"));
    match state
        .broker
        .credentials(authorization, query.role.as_deref())
        .await
    {
        Ok(answer) => {
            tracing::info!(
                decision = "served",
                cluster = answer.cluster.as_ref().map(|c| c.as_str()).unwrap_or(""),
                namespace = %answer.subject.namespace,
                service_account = %answer.subject.service_account,
                pod = answer.pod_name.as_deref().unwrap_or(""),
                role_arn = %answer.body.role_arn,
                expiration = %answer.body.expiration,
                "credentials served"
            );
            state.metrics.record(
                "CredentialsServed",
                ("Outcome", "served"),
                "BrokerLatency",
                started.elapsed(),
            );
            let mut response = Json(answer.body).into_response();
            if let Ok(value) = HeaderValue::from_str(&format!("max-age={}", answer.max_age)) {
                response.headers_mut().insert(header::CACHE_CONTROL, value);
            }
            response
        }
        Err(error) => {
            log_refusal(&error);
            if matches!(error, BrokerError::CorruptRecord { .. }) {
                state.metrics.record(
                    "CorruptTokenRecords",
                    ("Table", "Authorizations"),
                    "BrokerLatency",
                    started.elapsed(),
                );
            }
            state.metrics.record(
                "CredentialsDenied",
                ("Code", error.code()),
                "BrokerLatency",
                started.elapsed(),
            );
            ApiError::from(&error).into_response()
        }
    }
}

fn log_refusal(error: &BrokerError) {
    match error {
        BrokerError::Unavailable { source, .. } => {
            let chain = iam_broker_kernel::text::error_chain(source.as_ref());
            tracing::warn!(decision = "unavailable", code = error.code(), error = %error, cause = %chain, "credentials not served");
        }
        BrokerError::CorruptRecord { token, source } => tracing::error!(
            decision = "denied",
            code = error.code(),
            corrupt_record = true,
            token = %token,
            cause = %source,
            "credentials not served: the token record is unreadable; fix or revoke it \
             (iam-broker token revoke --hash)"
        ),
        BrokerError::AllowanceRevoked { subject, role_arn } => tracing::info!(
            decision = "denied",
            code = error.code(),
            cluster = subject.cluster.as_ref().map(|c| c.as_str()).unwrap_or(""),
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

/// `POST /`, `POST /mutate`: the admission webhook. A well-formed AdmissionReview always gets
/// `200` with a response in the request's `apiVersion`; anything else is a `400 BadRequest`.
///
/// With `WEBHOOK_PATH_SECRET` set these routes answer `404` like any unknown path: the webhook
/// is then only at `POST /mutate/<secret>` ([`admission_with_secret`]).
pub(crate) async fn admission(
    State(state): State<AppState>,
    base_path: Option<Extension<BasePath>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if state.webhook.requires_path_secret() {
        return not_found().await.into_response();
    }
    review(state, base_path, headers, body).await
}

/// `POST /mutate/{secret}`: the webhook behind its secret path segment (compared in constant
/// time); a wrong or unconfigured secret is a plain `404`.
pub(crate) async fn admission_with_secret(
    State(state): State<AppState>,
    Path(secret): Path<String>,
    base_path: Option<Extension<BasePath>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !state.webhook.path_secret_matches(&secret) {
        return not_found().await.into_response();
    }
    review(state, base_path, headers, body).await
}

async fn review(
    state: AppState,
    base_path: Option<Extension<BasePath>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = std::time::Instant::now();
    let review = match review::parse(&body) {
        Ok(review) => review,
        Err(e) => {
            tracing::info!(decision = "bad_request", error = %e, "admission refused");
            return ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", e.0).into_response();
        }
    };
    let origin = origin(&headers, base_path.as_ref().map(|b| b.0.0.as_str()));
    let request = &review.request;
    let outcome = state.webhook.admit(request, origin.as_deref()).await;
    let pod = request
        .object
        .as_ref()
        .or(request.old_object.as_ref())
        .and_then(|o| {
            o["metadata"]["name"]
                .as_str()
                .filter(|n| !n.is_empty())
                .or_else(|| o["metadata"]["generateName"].as_str())
        })
        .unwrap_or(&request.name);
    tracing::info!(
        decision = outcome.decision.as_str(),
        operation = %request.operation,
        namespace = request.namespace.as_deref().unwrap_or(""),
        service_account = outcome.service_account.as_deref().unwrap_or(""),
        pod = pod,
        dry_run = request.dry_run,
        uid = %request.uid,
        reason = %outcome.reason,
        "admission"
    );
    state.metrics.record(
        "Admissions",
        ("Decision", outcome.decision.as_str()),
        "AdmissionLatency",
        started.elapsed(),
    );
    Json(outcome.response.into_review(review.api_version)).into_response()
}

/// The URL this request came in on (`https://host/Stage/`), which the sidecar calls unless
/// `BROKER_URL` is set. `None` when the Host header is missing or not a plain host name.
fn origin(headers: &HeaderMap, base_path: Option<&str>) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let plain = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
    };
    if !plain(host) {
        return None;
    }
    let scheme = match headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::trim)
    {
        Some("https") => "https",
        Some("http") | None => "http",
        Some(_) => return None,
    };
    let base = base_path.map(|p| p.trim_matches('/')).filter(|p| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/'))
    });
    Some(match base {
        Some(base) => format!("{scheme}://{host}/{base}/"),
        None => format!("{scheme}://{host}/"),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn the_origin_is_scheme_host_and_stage() {
        let h = headers(&[
            ("host", "abc.execute-api.us-east-1.amazonaws.com"),
            ("x-forwarded-proto", "https"),
        ]);
        assert_eq!(
            origin(&h, Some("/Prod")).as_deref(),
            Some("https://abc.execute-api.us-east-1.amazonaws.com/Prod/")
        );
        assert_eq!(
            origin(&h, None).as_deref(),
            Some("https://abc.execute-api.us-east-1.amazonaws.com/")
        );
        // the first of several forwarded protocols; no header means plain http (serve)
        let h = headers(&[
            ("host", "127.0.0.1:8080"),
            ("x-forwarded-proto", "http, https"),
        ]);
        assert_eq!(origin(&h, None).as_deref(), Some("http://127.0.0.1:8080/"));
        let h = headers(&[("host", "[::1]:8080")]);
        assert_eq!(origin(&h, None).as_deref(), Some("http://[::1]:8080/"));
    }

    #[test]
    fn an_origin_a_client_could_bend_is_refused() {
        // the sidecar would call whatever this says: nothing but a plain host gets through
        for host in [
            "",
            "evil.example/path",
            "a@b",
            "host\u{7f}",
            "x y",
            "h?x=1",
            "h#f",
        ] {
            if let Ok(value) = HeaderValue::from_str(host) {
                let mut h = HeaderMap::new();
                h.insert(header::HOST, value);
                assert_eq!(origin(&h, None), None, "{host:?}");
            }
        }
        assert_eq!(origin(&HeaderMap::new(), None), None, "no Host header");
        let h = headers(&[("host", "ok.example"), ("x-forwarded-proto", "gopher")]);
        assert_eq!(origin(&h, None), None);
        // a base path with anything but name characters is left out, not copied
        let h = headers(&[("host", "ok.example")]);
        assert_eq!(
            origin(&h, Some("/Prod/../x?y")).as_deref(),
            Some("http://ok.example/")
        );
        assert_eq!(origin(&h, Some("/")).as_deref(), Some("http://ok.example/"));
    }
}
