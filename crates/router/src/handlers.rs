//! Handlers: parse, call the domain, wrap the answer. No decisions are made here.

use axum::Extension;
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use iam_broker_admission::review;
use iam_broker_broker::BrokerError;
use iam_broker_kernel::text::{MAX_ECHO, MAX_MESSAGE, clip};
use serde_json::json;

/// The most bytes of one client-chosen value (a name, a uid) a log line carries: the longest
/// Kubernetes name (253) fits.
const MAX_LOGGED_FIELD: usize = 256;

/// A client-chosen value for a log field, clipped to [`MAX_LOGGED_FIELD`].
fn field(value: &str) -> String {
    clip(value, MAX_LOGGED_FIELD)
}

use crate::{
    ApiError, AppState, BasePath, BodyReadTimeout, DEFAULT_BODY_READ_TIMEOUT, MAX_BODY_BYTES,
    ServedOverTls,
};

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
                pod = %field(answer.pod_name.as_deref().unwrap_or("")),
                role_arn = %answer.body.role_arn,
                expiration = %answer.body.expiration,
                cache = answer.lookup.as_str(),
                "credentials served"
            );
            state.metrics.record(
                "CredentialsServed",
                ("Outcome", "served"),
                "BrokerLatency",
                started.elapsed(),
            );
            if let Some(p) = state.metrics.prometheus() {
                p.request("credentials", "served", started.elapsed());
                p.cache_lookup(answer.lookup.as_str());
            }
            let mut response = Json(answer.body).into_response();
            if let Ok(value) = HeaderValue::from_str(&format!("max-age={}", answer.max_age)) {
                response.headers_mut().insert(header::CACHE_CONTROL, value);
            }
            response
        }
        Err(error) => {
            log_refusal(&error);
            let corrupt_table = match error {
                BrokerError::CorruptRecord { .. } => {
                    Some(("CorruptTokenRecords", "Authorizations"))
                }
                BrokerError::AllowanceUnreadable { .. } => {
                    Some(("CorruptAllowanceRows", "Allowances"))
                }
                _ => None,
            };
            if let Some((metric, table)) = corrupt_table {
                state
                    .metrics
                    .record(metric, ("Table", table), "BrokerLatency", started.elapsed());
            }
            if let Some(code) = error.sts_error_code() {
                state.metrics.record(
                    "StsErrors",
                    ("AwsCode", &clip(code, MAX_ECHO)),
                    "BrokerLatency",
                    started.elapsed(),
                );
                if let Some(p) = state.metrics.prometheus() {
                    p.sts_error(&clip(code, MAX_ECHO));
                }
            }
            state.metrics.record(
                "CredentialsDenied",
                ("Code", error.code()),
                "BrokerLatency",
                started.elapsed(),
            );
            if let Some(p) = state.metrics.prometheus() {
                p.request("credentials", error.code(), started.elapsed());
            }
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
        BrokerError::AllowanceUnreadable {
            subject,
            role_arn,
            row,
        } => tracing::error!(
            decision = "denied",
            code = error.code(),
            corrupt_row = true,
            store = %row.store,
            row_namespace = %row.partition,
            row_service_account = %row.service_account,
            problem = %row.problem,
            cluster = subject.cluster.as_ref().map(|c| c.as_str()).unwrap_or(""),
            namespace = %subject.namespace,
            service_account = %subject.service_account,
            role_arn = %role_arn,
            "credentials not served: an Allowances row is unreadable; fix it, or rewrite it \
             with iam-broker allow / disallow"
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
        BrokerError::SessionsRevoked { subject, revoked } => tracing::warn!(
            decision = "denied",
            code = error.code(),
            cluster = subject.cluster.as_ref().map(|c| c.as_str()).unwrap_or(""),
            namespace = %subject.namespace,
            service_account = %subject.service_account,
            revoked_row = %revoked.row,
            revoked_pod = revoked.pod.as_deref().unwrap_or(""),
            "credentials not served: sessions revoked by an operator"
        ),
        _ => {
            tracing::info!(decision = "denied", code = error.code(), error = %error, "credentials not served")
        }
    }
}

/// `POST /`, `POST /mutate`: the admission webhook. A well-formed AdmissionReview always gets
/// `200` with a response in the request's `apiVersion`; anything else is a `400 BadRequest`.
///
/// With `WEBHOOK_PATH_SECRET` set these routes answer `404` like any unknown path, before the
/// body is read: the webhook is then only at `POST /mutate/<secret>` ([`admission_with_secret`]).
pub(crate) async fn admission(
    State(state): State<AppState>,
    base_path: Option<Extension<BasePath>>,
    tls: Option<Extension<ServedOverTls>>,
    deadline: Option<Extension<BodyReadTimeout>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if state.webhook.requires_path_secret() {
        return not_found().await.into_response();
    }
    match read_body(body, deadline).await {
        Ok(body) => review(state, base_path, tls.is_some(), headers, body).await,
        Err(refusal) => refusal,
    }
}

/// `POST /mutate/{secret}`: the webhook behind its secret path segment (compared in constant
/// time, before the body is read); a wrong or unconfigured secret is a plain `404`.
pub(crate) async fn admission_with_secret(
    State(state): State<AppState>,
    Path(secret): Path<String>,
    base_path: Option<Extension<BasePath>>,
    tls: Option<Extension<ServedOverTls>>,
    deadline: Option<Extension<BodyReadTimeout>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !state.webhook.path_secret_matches(&secret) {
        return not_found().await.into_response();
    }
    match read_body(body, deadline).await {
        Ok(body) => review(state, base_path, tls.is_some(), headers, body).await,
        Err(refusal) => refusal,
    }
}

/// Reads a request body of at most [`MAX_BODY_BYTES`] within its deadline ([`BodyReadTimeout`],
/// set by `iam-broker serve`; under Lambda the body is already in memory and the default never
/// matters). Too slow is `408 RequestTimeout` with `Connection: close`; too large `413`; a body
/// the connection broke off `400`.
async fn read_body(
    body: Body,
    deadline: Option<Extension<BodyReadTimeout>>,
) -> Result<Bytes, Response> {
    let timeout = deadline.map_or(DEFAULT_BODY_READ_TIMEOUT, |Extension(BodyReadTimeout(t))| t);
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(error)) => {
            let too_large = iam_broker_kernel::text::sources(&error)
                .any(|e| e.is::<http_body_util::LengthLimitError>());
            Err(if too_large {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "PayloadTooLarge",
                    format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
                )
                .into_response()
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the request body could not be read to its end",
                )
                .into_response()
            })
        }
        Err(_) => {
            let mut response = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "RequestTimeout",
                format!(
                    "the request body did not arrive within {} ms",
                    timeout.as_millis()
                ),
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(response)
        }
    }
}

async fn review(
    state: AppState,
    base_path: Option<Extension<BasePath>>,
    tls: bool,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = std::time::Instant::now();
    let review = match review::parse(&body) {
        Ok(review) => review,
        Err(e) => {
            tracing::info!(decision = "bad_request", error = %clip(&e.to_string(), MAX_MESSAGE), "admission refused");
            return ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", e.0).into_response();
        }
    };
    let origin = origin(&headers, base_path.as_ref().map(|b| b.0.0.as_str()), tls);
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
    // Every field is the client's to choose (mutating admission runs before validation, so a
    // name of any length reaches the webhook): each is clipped.
    tracing::info!(
        decision = outcome.decision.as_str(),
        operation = %request.operation,
        namespace = %field(request.namespace.as_deref().unwrap_or("")),
        service_account = %field(outcome.service_account.as_deref().unwrap_or("")),
        pod = %field(pod),
        dry_run = request.dry_run,
        uid = %field(&request.uid),
        reason = %clip(&outcome.reason, MAX_MESSAGE),
        "admission"
    );
    state.metrics.record(
        "Admissions",
        ("Decision", outcome.decision.as_str()),
        "AdmissionLatency",
        started.elapsed(),
    );
    if let Some(p) = state.metrics.prometheus() {
        p.request("admission", outcome.decision.as_str(), started.elapsed());
    }
    Json(outcome.response.into_review(review.api_version)).into_response()
}

/// The URL this request came in on (`https://host/Stage/`), which the sidecar calls unless
/// `BROKER_URL` is set. `None` when the Host header is missing or not a plain host name.
fn origin(headers: &HeaderMap, base_path: Option<&str>, tls: bool) -> Option<String> {
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
        .filter(|_| !tls)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::trim)
    {
        Some("https") => "https",
        Some("http") | None if !tls => "http",
        None => "https",
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

/// `GET /metrics` of the metrics listener: the Prometheus exposition.
pub(crate) async fn prometheus_metrics(State(state): State<AppState>) -> Response {
    let Some(prometheus) = state.metrics.prometheus() else {
        return not_found().await.into_response();
    };
    match prometheus.encode(&state.broker).await {
        Ok(text) => (
            [(header::CONTENT_TYPE, crate::prometheus::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
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
            origin(&h, Some("/Prod"), false).as_deref(),
            Some("https://abc.execute-api.us-east-1.amazonaws.com/Prod/")
        );
        assert_eq!(
            origin(&h, None, false).as_deref(),
            Some("https://abc.execute-api.us-east-1.amazonaws.com/")
        );
        // the first of several forwarded protocols; no header means plain http (serve)
        let h = headers(&[
            ("host", "127.0.0.1:8080"),
            ("x-forwarded-proto", "http, https"),
        ]);
        assert_eq!(
            origin(&h, None, false).as_deref(),
            Some("http://127.0.0.1:8080/")
        );
        let h = headers(&[("host", "[::1]:8080")]);
        assert_eq!(
            origin(&h, None, false).as_deref(),
            Some("http://[::1]:8080/")
        );
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
                assert_eq!(origin(&h, None, false), None, "{host:?}");
            }
        }
        assert_eq!(
            origin(&HeaderMap::new(), None, false),
            None,
            "no Host header"
        );
        let h = headers(&[("host", "ok.example"), ("x-forwarded-proto", "gopher")]);
        assert_eq!(origin(&h, None, false), None);
        // a base path with anything but name characters is left out, not copied
        let h = headers(&[("host", "ok.example")]);
        assert_eq!(
            origin(&h, Some("/Prod/../x?y"), false).as_deref(),
            Some("http://ok.example/")
        );
        assert_eq!(
            origin(&h, Some("/"), false).as_deref(),
            Some("http://ok.example/")
        );
    }

    #[test]
    fn a_server_that_terminates_tls_itself_answers_https_whatever_the_headers_say() {
        // `serve --tls`: the sidecar, or a direct pod's SDK, must call https.
        for forwarded in [None, Some("http"), Some("https")] {
            let mut pairs = vec![("host", "iam-broker.iam-broker.svc")];
            pairs.extend(forwarded.map(|f| ("x-forwarded-proto", f)));
            assert_eq!(
                origin(&headers(&pairs), None, true).as_deref(),
                Some("https://iam-broker.iam-broker.svc/"),
                "{forwarded:?}"
            );
        }
    }
}
