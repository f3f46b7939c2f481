//! The broker client: one `GET BROKER_URL` with the caller's `Authorization`, over HTTPS (rustls
//! with the `ring` provider and the webpki roots, so a `scratch` image needs no CA bundle) or
//! plain HTTP, under one deadline, and the answer read into what the cache needs.

use iam_broker_kernel::text::error_chain;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CACHE_CONTROL, RETRY_AFTER, USER_AGENT};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde::de::IgnoredAny;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Largest broker answer read; a credentials answer is about 1.5 KiB.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Idle connections to the broker are kept this long, so a refresh can skip the TLS handshake.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const USER_AGENT_VALUE: &str = concat!("iam-broker-proxy/", env!("CARGO_PKG_VERSION"));

/// What the broker answered.
#[derive(Clone)]
pub(crate) enum BrokerReply {
    /// `200` with a credentials body.
    Credentials {
        /// The body as received (it holds secrets: never logged, no `Debug`).
        body: Bytes,
        /// Its `Expiration`.
        expiration: OffsetDateTime,
        /// `Cache-Control: max-age`, when sent.
        max_age: Option<u64>,
        /// `Cache-Control: no-store` was sent.
        no_store: bool,
    },
    /// A 4xx or 5xx answer, passed through to the caller.
    Refused {
        /// Its status.
        status: StatusCode,
        /// Its body when it is JSON; `None` otherwise.
        body: Option<Bytes>,
        /// Its `Retry-After`, when sent.
        retry_after: Option<HeaderValue>,
    },
}

/// Why there is no broker answer to pass on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BrokerCallError {
    /// Connecting, sending or reading failed.
    #[error("the broker could not be reached: {0}")]
    Unreachable(String),
    /// No complete answer within the deadline.
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
    /// The answer makes no sense (a 200 without credentials, a redirect, an oversized body).
    #[error("the broker's answer is unusable: {0}")]
    Invalid(String),
}

/// The fields of a credentials answer the sidecar checks; the secrets are only required to be
/// present, never copied.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialsBody {
    #[serde(rename = "AccessKeyId")]
    _access_key_id: IgnoredAny,
    #[serde(rename = "SecretAccessKey")]
    _secret_access_key: IgnoredAny,
    #[serde(rename = "Token")]
    _token: IgnoredAny,
    expiration: String,
}

/// A client for `BROKER_URL`, built once at start-up.
#[derive(Clone)]
pub(crate) struct BrokerClient {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    url: Uri,
    timeout: Duration,
}

impl BrokerClient {
    /// A client for `url` whose calls end after `timeout`, trusting the webpki roots plus
    /// `extra_roots`.
    pub(crate) fn new(
        url: Uri,
        timeout: Duration,
        extra_roots: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Result<Self, rustls::Error> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        for cert in extra_roots {
            roots.add(cert.clone())?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(4)
            .build(connector);
        Ok(Self {
            client,
            url,
            timeout,
        })
    }

    /// Asks the broker for the credentials of `authorization` (the caller's header, as sent).
    pub(crate) async fn fetch(
        &self,
        authorization: HeaderValue,
    ) -> Result<BrokerReply, BrokerCallError> {
        match tokio::time::timeout(self.timeout, self.call(authorization)).await {
            Ok(result) => result,
            Err(_) => Err(BrokerCallError::Timeout(self.timeout)),
        }
    }

    async fn call(&self, mut authorization: HeaderValue) -> Result<BrokerReply, BrokerCallError> {
        authorization.set_sensitive(true);
        let request = Request::get(self.url.clone())
            .header(AUTHORIZATION, authorization)
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, USER_AGENT_VALUE)
            .body(Empty::new())
            .map_err(|e| BrokerCallError::Invalid(format!("building the request: {e}")))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| BrokerCallError::Unreachable(error_chain(&e)))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<LengthLimitError>() {
                    BrokerCallError::Invalid(format!(
                        "the body is larger than {MAX_ANSWER_BYTES} bytes"
                    ))
                } else {
                    BrokerCallError::Unreachable(format!(
                        "reading the answer: {}",
                        error_chain(&*e)
                    ))
                }
            })?
            .to_bytes();
        read_reply(parts.status, &parts.headers, body)
    }
}

/// Turns a complete broker answer into a [`BrokerReply`].
fn read_reply(
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<BrokerReply, BrokerCallError> {
    // JSON is UTF-8 (RFC 8259), and serde_json checks it only in the strings it keeps: a body
    // with other bytes in a string it skips is not JSON, and is never passed on as JSON.
    let utf8 = std::str::from_utf8(&body).ok();
    if status == StatusCode::OK {
        let text = utf8
            .ok_or_else(|| BrokerCallError::Invalid("a 200 whose body is not UTF-8".to_owned()))?;
        let parsed: CredentialsBody = serde_json::from_str(text).map_err(|e| {
            // serde_json's message names the field and position, never the value.
            BrokerCallError::Invalid(format!("a 200 without a credentials body ({e})"))
        })?;
        let expiration = OffsetDateTime::parse(&parsed.expiration, &Rfc3339).map_err(|_| {
            BrokerCallError::Invalid(format!(
                "Expiration {:?} is not an RFC 3339 instant",
                iam_broker_kernel::text::clip(&parsed.expiration, 64)
            ))
        })?;
        let (max_age, no_store) = cache_control(headers);
        Ok(BrokerReply::Credentials {
            body,
            expiration,
            max_age,
            no_store,
        })
    } else if status.is_client_error() || status.is_server_error() {
        let is_json = utf8.is_some_and(|text| serde_json::from_str::<IgnoredAny>(text).is_ok());
        Ok(BrokerReply::Refused {
            status,
            body: is_json.then_some(body),
            retry_after: headers.get(RETRY_AFTER).cloned(),
        })
    } else {
        Err(BrokerCallError::Invalid(format!(
            "unexpected status {status}"
        )))
    }
}

/// `max-age` and `no-store` of the `Cache-Control` headers.
fn cache_control(headers: &HeaderMap) -> (Option<u64>, bool) {
    let mut max_age = None;
    let mut no_store = false;
    let directives = headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim);
    for directive in directives {
        match directive.split_once('=') {
            Some((name, value)) if name.trim().eq_ignore_ascii_case("max-age") => {
                let seconds = value.trim().trim_matches('"').parse::<u64>().ok();
                // Several max-age directives: the smallest is the safe reading.
                max_age = match (max_age, seconds) {
                    (Some(a), Some(b)) => Some(u64::min(a, b)),
                    (a, b) => a.or(b),
                };
            }
            None if directive.eq_ignore_ascii_case("no-store") => no_store = true,
            _ => {}
        }
    }
    (max_age, no_store)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    const BODY: &str = r#"{"AccessKeyId":"ASIAEXAMPLE","SecretAccessKey":"s","Token":"t","Expiration":"2026-11-22T07:00:00Z","AccountId":"123456789012","RoleArn":"arn:aws:iam::123456789012:role/iam-broker/r"}"#;

    #[test]
    fn a_credentials_answer_is_read_with_its_expiry_and_cache_control() {
        let reply = read_reply(
            StatusCode::OK,
            &headers(&[("cache-control", "max-age=3300")]),
            Bytes::from_static(BODY.as_bytes()),
        )
        .unwrap();
        let BrokerReply::Credentials {
            body,
            expiration,
            max_age,
            no_store,
        } = reply
        else {
            panic!("credentials expected");
        };
        assert_eq!(body, BODY.as_bytes(), "the body is kept byte for byte");
        assert_eq!(expiration, time::macros::datetime!(2026-11-22 07:00:00 UTC));
        assert_eq!(max_age, Some(3300));
        assert!(!no_store);
    }

    #[test]
    fn a_200_without_credentials_is_unusable() {
        for body in [
            "",
            "{}",
            r#"{"AccessKeyId":"A","SecretAccessKey":"s","Expiration":"2026-11-22T07:00:00Z"}"#,
            r#"{"AccessKeyId":"A","SecretAccessKey":"s","Token":"t","Expiration":"tomorrow"}"#,
        ] {
            let result = read_reply(StatusCode::OK, &HeaderMap::new(), Bytes::from(body));
            assert!(
                matches!(result, Err(BrokerCallError::Invalid(_))),
                "{body:?}"
            );
        }
    }

    #[test]
    fn bodies_that_are_not_utf8_are_never_passed_on_as_json() {
        // serde_json skips an unknown member's string without checking its bytes
        let credentials = b"{\"AccessKeyId\":\"A\",\"SecretAccessKey\":\"s\",\"Token\":\"t\",\
\"Expiration\":\"2026-11-22T07:00:00Z\",\"X\":\"\xff\"}";
        let result = read_reply(
            StatusCode::OK,
            &HeaderMap::new(),
            Bytes::from_static(credentials),
        );
        assert!(matches!(result, Err(BrokerCallError::Invalid(_))));
        let error = b"{\"Code\":\"\xff\xfe\"}";
        let reply = read_reply(
            StatusCode::FORBIDDEN,
            &HeaderMap::new(),
            Bytes::from_static(error),
        )
        .unwrap();
        assert!(matches!(reply, BrokerReply::Refused { body: None, .. }));
    }

    #[test]
    fn errors_keep_status_json_body_and_retry_after() {
        let body = r#"{"Code":"ServiceUnavailable","Message":"throttled"}"#;
        let reply = read_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &headers(&[("retry-after", "2")]),
            Bytes::from(body),
        )
        .unwrap();
        let BrokerReply::Refused {
            status,
            body: Some(passed),
            retry_after,
        } = reply
        else {
            panic!("a refusal with its body expected");
        };
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(passed, body.as_bytes());
        assert_eq!(retry_after, Some(HeaderValue::from_static("2")));

        let html = read_reply(
            StatusCode::BAD_GATEWAY,
            &HeaderMap::new(),
            Bytes::from("<html>bad gateway</html>"),
        )
        .unwrap();
        assert!(matches!(html, BrokerReply::Refused { body: None, .. }));
        assert!(matches!(
            read_reply(StatusCode::FOUND, &HeaderMap::new(), Bytes::new()),
            Err(BrokerCallError::Invalid(_))
        ));
    }

    #[test]
    fn cache_control_directives() {
        assert_eq!(cache_control(&HeaderMap::new()), (None, false));
        assert_eq!(
            cache_control(&headers(&[("cache-control", "private, Max-Age=60")])),
            (Some(60), false)
        );
        assert_eq!(
            cache_control(&headers(&[("cache-control", "no-store")])),
            (None, true)
        );
        assert_eq!(
            cache_control(&headers(&[("cache-control", "max-age=60, max-age=30")])),
            (Some(30), false)
        );
        assert_eq!(
            cache_control(&headers(&[("cache-control", "max-age=soon")])),
            (None, false)
        );
    }
}
