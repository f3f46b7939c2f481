//! [`Answer`]: what the sidecar sends back, and [`ProxyError`], its own errors in the broker's
//! `{"Code","Message"}` shape.

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use time::OffsetDateTime;

use crate::broker::BrokerCallError;

/// An answer to a credentials request, before it is stamped with the time it is sent.
#[derive(Clone)]
pub(crate) enum Answer {
    /// Credentials: the broker's body as received and its `Expiration`.
    Credentials {
        /// The JSON body (holds secrets: never logged, no `Debug`).
        body: Bytes,
        /// When the credentials expire.
        expiration: OffsetDateTime,
    },
    /// An error: the broker's, passed through, or the sidecar's own.
    Error {
        /// HTTP status.
        status: StatusCode,
        /// `{"Code","Message"}` JSON.
        body: Bytes,
        /// `Retry-After`, when the broker sent one.
        retry_after: Option<HeaderValue>,
    },
}

impl Answer {
    /// The status it is sent with.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::Credentials { .. } => StatusCode::OK,
            Self::Error { status, .. } => *status,
        }
    }

    /// The HTTP response sent at `now`.
    ///
    /// Credentials carry `Cache-Control: max-age=N` recomputed for `now`, the seconds left until
    /// `Expiration` minus five minutes, never negative (the broker's own rule, so a cached answer
    /// never promises more than a fresh one would). Errors carry `Cache-Control: no-store`.
    pub(crate) fn into_response(self, now: OffsetDateTime) -> Response<Full<Bytes>> {
        match self {
            Self::Credentials { body, expiration } => {
                let max_age = iam_broker_kernel::credentials::cache_max_age(expiration, now);
                let cache_control = HeaderValue::try_from(format!("max-age={max_age}"))
                    .unwrap_or(HeaderValue::from_static("no-store"));
                json_response(StatusCode::OK, body, cache_control)
            }
            Self::Error {
                status,
                body,
                retry_after,
            } => {
                let mut response =
                    json_response(status, body, HeaderValue::from_static("no-store"));
                if let Some(retry_after) = retry_after {
                    response.headers_mut().insert(RETRY_AFTER, retry_after);
                }
                if status == StatusCode::METHOD_NOT_ALLOWED {
                    response
                        .headers_mut()
                        .insert(ALLOW, HeaderValue::from_static("GET"));
                }
                response
            }
        }
    }
}

/// `{"status":"ok"}` for probes.
pub(crate) fn health() -> Response<Full<Bytes>> {
    json_response(
        StatusCode::OK,
        Bytes::from_static(br#"{"status":"ok"}"#),
        HeaderValue::from_static("no-store"),
    )
}

fn json_response(
    status: StatusCode,
    body: Bytes,
    cache_control: HeaderValue,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, cache_control);
    response
}

/// An error the sidecar answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProxyError {
    /// HTTP status.
    pub(crate) status: StatusCode,
    /// Machine-readable code.
    pub(crate) code: &'static str,
    /// Human-readable message.
    pub(crate) message: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Body<'a> {
    code: &'a str,
    message: &'a str,
}

impl ProxyError {
    /// Builds an error.
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// No or an empty `Authorization` header: answered without asking the broker.
    pub(crate) fn missing_authorization() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "MissingAuthorization",
            "no Authorization header was sent; set AWS_CONTAINER_AUTHORIZATION_TOKEN",
        )
    }

    /// Anything but `GET /metrics` on the metrics listener.
    pub(crate) fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the metrics listener only answers GET /metrics",
        )
    }

    /// Anything but `GET`.
    pub(crate) fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the credentials sidecar only answers GET",
        )
    }

    /// A request URI longer than `max` bytes.
    pub(crate) fn uri_too_long(max: usize) -> Self {
        Self::new(
            StatusCode::URI_TOO_LONG,
            "UriTooLong",
            format!("the request URI is longer than {max} bytes"),
        )
    }

    /// Request headers larger than `max` bytes.
    pub(crate) fn headers_too_large(max: usize) -> Self {
        Self::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "RequestHeaderFieldsTooLarge",
            format!("the request headers are larger than {max} bytes"),
        )
    }

    /// The broker returned credentials that have already expired.
    pub(crate) fn expired_credentials() -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "BrokerExpiredCredentials",
            "the broker returned credentials that have already expired",
        )
    }

    /// A broker error status without a JSON body (e.g. a load balancer's HTML page).
    pub(crate) fn broker_status(status: StatusCode) -> Self {
        Self::new(
            status,
            "BrokerError",
            format!("the broker answered {status} without a JSON body"),
        )
    }

    /// An internal failure (a broker call that ended without an answer).
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", message)
    }

    /// The `{"Code","Message"}` JSON body.
    pub(crate) fn body(&self) -> Bytes {
        serde_json::to_vec(&Body {
            code: self.code,
            message: &self.message,
        })
        .map(Bytes::from)
        .unwrap_or_else(|_| Bytes::from_static(br#"{"Code":"InternalError","Message":""}"#))
    }

    /// The answer that carries this error.
    pub(crate) fn into_answer(self) -> Answer {
        Answer::Error {
            status: self.status,
            body: self.body(),
            retry_after: None,
        }
    }
}

impl From<&BrokerCallError> for ProxyError {
    fn from(error: &BrokerCallError) -> Self {
        match error {
            BrokerCallError::Unreachable(_) => Self::new(
                StatusCode::BAD_GATEWAY,
                "BrokerUnreachable",
                error.to_string(),
            ),
            BrokerCallError::Timeout(_) => Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "BrokerTimeout",
                error.to_string(),
            ),
            BrokerCallError::Invalid(_) => Self::new(
                StatusCode::BAD_GATEWAY,
                "BrokerInvalidResponse",
                error.to_string(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn credentials_get_max_age_recomputed_for_the_time_they_are_sent() {
        let answer = Answer::Credentials {
            body: Bytes::from_static(b"{}"),
            expiration: datetime!(2026-11-22 07:00:00 UTC),
        };
        let at = |now| answer.clone().into_response(now);
        let response = at(datetime!(2026-11-22 06:00:00 UTC));
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(response.headers()[CACHE_CONTROL], "max-age=3300");
        let response = at(datetime!(2026-11-22 06:50:00 UTC));
        assert_eq!(response.headers()[CACHE_CONTROL], "max-age=300");
        let response = at(datetime!(2026-11-22 06:56:00 UTC));
        assert_eq!(response.headers()[CACHE_CONTROL], "max-age=0");
    }

    #[test]
    fn errors_are_code_and_message_json_and_never_stored() {
        let response = ProxyError::method_not_allowed()
            .into_answer()
            .into_response(datetime!(2026-11-22 06:00:00 UTC));
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
        assert_eq!(response.headers()[ALLOW], "GET");
        let Answer::Error { body, .. } = ProxyError::missing_authorization().into_answer() else {
            panic!("an error answer expected");
        };
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["Code"], "MissingAuthorization");
        assert!(json["Message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}
