//! Test support: a fake broker with expiry control, error and latency injection and call
//! counting; a proxy started in-process on a manual clock; a small HTTP client.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use iam_broker_kernel::credentials::{cache_max_age, format_expiration};
use iam_broker_proxy::{Clock, ManualClock, ProxyConfig, ProxyHandle, serve};
use time::OffsetDateTime;
use time::macros::datetime;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Where every test's clock starts.
pub const T0: OffsetDateTime = datetime!(2026-11-22 06:00:00 UTC);

/// How the fake broker answers.
#[derive(Debug, Clone)]
pub enum Mode {
    /// `200` with credentials expiring `validity` after the clock's now.
    Credentials,
    /// An error in the contract's shape (`{"Code","Message"}`).
    Error {
        /// HTTP status.
        status: StatusCode,
        /// `Code`.
        code: &'static str,
    },
    /// An error status with an HTML body.
    Html(StatusCode),
}

/// What the fake broker is told to do and what it saw.
pub struct BrokerState {
    clock: Arc<ManualClock>,
    mode: Mutex<Mode>,
    validity: Mutex<time::Duration>,
    latency: Mutex<Duration>,
    max_age: Mutex<Option<u64>>,
    calls: AtomicUsize,
    answered: AtomicUsize,
    seen: Mutex<Vec<(String, String)>>,
}

/// A broker stand-in on 127.0.0.1, port 0. Stops when dropped.
pub struct FakeBroker {
    /// Its address.
    pub addr: SocketAddr,
    state: Arc<BrokerState>,
    task: JoinHandle<()>,
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeBroker {
    /// Starts a broker answering one-hour credentials without delay.
    pub async fn start(clock: Arc<ManualClock>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(BrokerState {
            clock,
            mode: Mutex::new(Mode::Credentials),
            validity: Mutex::new(time::Duration::hours(1)),
            latency: Mutex::new(Duration::ZERO),
            max_age: Mutex::new(None),
            calls: AtomicUsize::new(0),
            answered: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
        });
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&shared);
                let service = service_fn(move |request| {
                    let state = Arc::clone(&state);
                    async move { Ok::<_, Infallible>(state.answer(request).await) }
                });
                tokio::spawn(async move {
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, state, task }
    }

    /// Answers from now on with `mode`.
    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }

    /// Credentials from now on expire `validity` after the clock's now.
    pub fn set_validity(&self, validity: time::Duration) {
        *self.state.validity.lock().unwrap() = validity;
    }

    /// Every answer from now on waits `latency` first.
    pub fn set_latency(&self, latency: Duration) {
        *self.state.latency.lock().unwrap() = latency;
    }

    /// Sends this `max-age` instead of the broker's expiry minus five minutes.
    pub fn set_max_age(&self, max_age: Option<u64>) {
        *self.state.max_age.lock().unwrap() = max_age;
    }

    /// Requests received.
    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Requests answered.
    pub fn answered(&self) -> usize {
        self.state.answered.load(Ordering::SeqCst)
    }

    /// `(path, Authorization)` of every request received.
    pub fn seen(&self) -> Vec<(String, String)> {
        self.state.seen.lock().unwrap().clone()
    }
}

impl BrokerState {
    async fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let token = request
            .headers()
            .get("authorization")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        self.seen
            .lock()
            .unwrap()
            .push((request.uri().path().to_owned(), token.clone()));
        let latency = *self.latency.lock().unwrap();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mode = self.mode.lock().unwrap().clone();
        let response = match mode {
            Mode::Credentials => {
                let now = self.clock.now();
                let expiration = now + *self.validity.lock().unwrap();
                let max_age = self
                    .max_age
                    .lock()
                    .unwrap()
                    .unwrap_or_else(|| cache_max_age(expiration, now));
                let body = serde_json::json!({
                    "AccessKeyId": format!("ASIA{call:012}"),
                    "SecretAccessKey": format!("secret-{call}"),
                    "Token": format!("session-{call}"),
                    "Expiration": format_expiration(expiration),
                    "AccountId": "123456789012",
                    "RoleArn": format!("arn:aws:iam::123456789012:role/for-{token}"),
                });
                Response::builder()
                    .header("content-type", "application/json")
                    .header("cache-control", format!("max-age={max_age}"))
                    .body(Full::new(Bytes::from(body.to_string())))
                    .unwrap()
            }
            Mode::Error { status, code } => {
                let body = serde_json::json!({"Code": code, "Message": format!("fake {code}")});
                let mut builder = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .header("cache-control", "no-store");
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    builder = builder.header("retry-after", "2");
                }
                builder
                    .body(Full::new(Bytes::from(body.to_string())))
                    .unwrap()
            }
            Mode::Html(status) => Response::builder()
                .status(status)
                .header("content-type", "text/html")
                .body(Full::new(Bytes::from_static(b"<html>oops</html>")))
                .unwrap(),
        };
        self.answered.fetch_add(1, Ordering::SeqCst);
        response
    }
}

/// An HTTP answer as a test sees it.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body bytes.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// `AccessKeyId` of a credentials answer.
    pub fn access_key_id(&self) -> String {
        assert_eq!(self.status, StatusCode::OK, "{:?}", self.body);
        self.json()["AccessKeyId"].as_str().unwrap().to_owned()
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }

    /// Seconds left on the answer's `Expiration` at `now`.
    pub fn seconds_left(&self, now: OffsetDateTime) -> i64 {
        let expiration = self.json()["Expiration"].as_str().unwrap().to_owned();
        let expiration =
            OffsetDateTime::parse(&expiration, &time::format_description::well_known::Rfc3339)
                .unwrap();
        (expiration - now).whole_seconds()
    }
}

/// A proxy in front of a fake broker, both on loopback, both on one manual clock.
pub struct Harness {
    /// The clock both read.
    pub clock: Arc<ManualClock>,
    /// The fake broker.
    pub broker: FakeBroker,
    /// The proxy.
    pub proxy: ProxyHandle,
    client: Client<HttpConnector, Empty<Bytes>>,
}

/// Configuration for a proxy in front of `broker_url`, plus `extra` variables.
pub fn config(broker_url: &str, extra: &[(&str, &str)]) -> ProxyConfig {
    let mut map: HashMap<String, String> = HashMap::new();
    map.insert("BROKER_URL".into(), broker_url.into());
    map.insert("LISTEN_ADDR".into(), "127.0.0.1:0".into());
    for (k, v) in extra {
        map.insert((*k).into(), (*v).into());
    }
    ProxyConfig::from_lookup(|name| map.get(name).cloned()).unwrap()
}

/// A proxy started in-process on `listener`'s port 0.
pub async fn start_proxy(config: ProxyConfig, clock: Arc<ManualClock>) -> ProxyHandle {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve(listener, config, clock).unwrap()
}

impl Harness {
    /// Starts a fake broker and a proxy in front of it (`BROKER_URL` ends in `/Prod/`).
    pub async fn start(extra: &[(&str, &str)]) -> Self {
        let clock = Arc::new(ManualClock::new(T0));
        let broker = FakeBroker::start(Arc::clone(&clock)).await;
        let url = format!("http://{}/Prod/", broker.addr);
        let proxy = start_proxy(config(&url, extra), Arc::clone(&clock)).await;
        Self {
            clock,
            broker,
            proxy,
            client: client(),
        }
    }

    /// `GET /` with `token` as the raw `Authorization` header (none when `None`).
    pub async fn get(&self, token: Option<&str>) -> Reply {
        request(
            &self.client,
            self.proxy.local_addr(),
            Method::GET,
            "/",
            token,
        )
        .await
    }

    /// Any request to the proxy.
    pub async fn request(&self, method: Method, path: &str, token: Option<&str>) -> Reply {
        request(&self.client, self.proxy.local_addr(), method, path, token).await
    }

    /// Moves both clocks forward.
    pub fn advance(&self, seconds: u64) {
        self.clock.advance(Duration::from_secs(seconds));
    }

    /// Waits until no broker call is under way (background refreshes included).
    pub async fn settle(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.proxy.stats().in_flight > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "broker calls still under way"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// A plain HTTP client.
pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// Sends one request.
pub async fn request(
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> Reply {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if let Some(token) = token {
        builder = builder.header("authorization", HeaderValue::from_str(token).unwrap());
    }
    let response = client
        .request(builder.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}
