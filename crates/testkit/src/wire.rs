//! Faults at the wire: what a dependency's network can do to one call, and a fault-injecting
//! HTTP proxy in front of moto's DynamoDB ([`DynamoFaults`]). The Kubernetes API stand-in
//! ([`crate::kube_api`]) takes the same [`WireFault`]s.
//!
//! Every fault keeps its promise about whether the call was *processed*: a fault that says the
//! request was processed forwards it to the real server first, so the write really lands, and
//! the client is the one left without an answer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;

/// One fault of one call, as the fault matrix names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFault {
    /// The connection closes before the request is processed: what a refused connection looks
    /// like to a client that pools connections (nothing was done).
    Refused,
    /// The request is processed, then the connection is reset before any answer.
    ResetAfterSent,
    /// `500` (DynamoDB `InternalServerError`, Kubernetes `InternalError`); not processed.
    ServerError,
    /// Throttled (DynamoDB `ThrottlingException`, Kubernetes `429` with `Retry-After`); not
    /// processed.
    Throttled,
    /// Processed at once; the answer is held this long (past the caller's deadline).
    AnsweredLate(Duration),
    /// Held this long, then processed and answered: the write lands after the deadline.
    LandsLate(Duration),
}

impl WireFault {
    /// The six faults of the matrix, with `hold` for the two late ones.
    pub fn all(hold: Duration) -> [Self; 6] {
        [
            Self::Refused,
            Self::ResetAfterSent,
            Self::ServerError,
            Self::Throttled,
            Self::AnsweredLate(hold),
            Self::LandsLate(hold),
        ]
    }

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::ResetAfterSent => "reset after sent",
            Self::ServerError => "5xx",
            Self::Throttled => "throttled",
            Self::AnsweredLate(_) => "answered after deadline",
            Self::LandsLate(_) => "success after deadline",
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Which DynamoDB calls a fault applies to: the operation (`X-Amz-Target` suffix, e.g.
/// `PutItem`), strings the JSON body must contain (a table name, a namespace) and strings it
/// must not (e.g. `retracted_at`, to tell an insert from a retraction).
#[derive(Debug, Clone, Default)]
pub struct DynamoCall {
    /// `GetItem`, `PutItem`, `DeleteItem`, …
    pub operation: String,
    /// Every one of these is in the body.
    pub contains: Vec<String>,
    /// None of these is in the body.
    pub lacks: Vec<String>,
}

impl DynamoCall {
    /// Calls of `operation` whose body contains every string of `contains`.
    pub fn new(operation: &str, contains: &[&str]) -> Self {
        Self {
            operation: operation.to_owned(),
            contains: contains.iter().map(|s| (*s).to_owned()).collect(),
            lacks: Vec::new(),
        }
    }

    /// And whose body does not contain `text`.
    pub fn lacking(mut self, text: &str) -> Self {
        self.lacks.push(text.to_owned());
        self
    }

    fn matches(&self, operation: &str, body: &str) -> bool {
        operation == self.operation
            && self.contains.iter().all(|c| body.contains(c.as_str()))
            && !self.lacks.iter().any(|l| body.contains(l.as_str()))
    }
}

#[derive(Default)]
struct Shared {
    rules: Mutex<Vec<(DynamoCall, WireFault)>>,
    /// Requests held or processed after their caller may have given up, not yet done.
    in_flight: AtomicUsize,
    /// How many requests a rule hit.
    hits: AtomicUsize,
}

/// A DynamoDB endpoint that forwards to moto and applies [`WireFault`]s to matching calls.
/// Plain HTTP on 127.0.0.1; stops when dropped.
pub struct DynamoFaults {
    /// `http://127.0.0.1:<port>`: point the SDK here.
    pub endpoint: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for DynamoFaults {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DynamoFaults {
    /// Starts the proxy in front of `upstream` (moto's endpoint).
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the DynamoDB fault proxy")?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(Shared::default());
        let client = reqwest::Client::builder().no_proxy().build()?;
        let upstream = upstream.trim_end_matches('/').to_owned();
        let state = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (state, client, upstream) = (state.clone(), client.clone(), upstream.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        handle(request, state.clone(), client.clone(), upstream.clone())
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            endpoint,
            shared,
            task,
        })
    }

    /// Applies `fault` to every call matching `call` until [`Self::clear`].
    pub fn inject(&self, call: DynamoCall, fault: WireFault) {
        lock(&self.shared.rules).push((call, fault));
    }

    /// Removes every fault.
    pub fn clear(&self) {
        lock(&self.shared.rules).clear();
    }

    /// How many requests a fault applied to so far.
    pub fn hits(&self) -> usize {
        self.shared.hits.load(Ordering::SeqCst)
    }

    /// Waits until no held or late request is still on its way to moto.
    pub async fn settled(&self) {
        while self.shared.in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

type Answer = Result<Response<Full<Bytes>>, std::io::Error>;

/// Closing the connection without an answer: hyper drops a connection whose service fails.
fn reset() -> Answer {
    Err(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "injected: connection reset",
    ))
}

fn dynamo_error(status: StatusCode, kind: &str) -> Answer {
    let body = serde_json::json!({
        "__type": format!("com.amazonaws.dynamodb.v20120810#{kind}"),
        "message": "injected fault",
    });
    Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.0")
        .header("x-amzn-requestid", "injected")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(std::io::Error::other)
}

/// Sends one request to moto and brings its answer back.
async fn forward(
    client: reqwest::Client,
    upstream: String,
    parts: http::request::Parts,
    body: Bytes,
) -> Answer {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut call = client.request(parts.method.clone(), format!("{upstream}{path}"));
    for (name, value) in &parts.headers {
        if name != http::header::HOST && name != http::header::CONTENT_LENGTH {
            call = call.header(name, value);
        }
    }
    let answer = call
        .body(body)
        .send()
        .await
        .map_err(std::io::Error::other)?;
    let status = answer.status();
    let headers = answer.headers().clone();
    let bytes = answer.bytes().await.map_err(std::io::Error::other)?;
    let mut response = Response::new(Full::new(bytes));
    *response.status_mut() = status;
    for (name, value) in &headers {
        if name != http::header::CONTENT_LENGTH && name != http::header::TRANSFER_ENCODING {
            response.headers_mut().insert(name, value.clone());
        }
    }
    Ok(response)
}

async fn handle(
    request: Request<Incoming>,
    shared: Arc<Shared>,
    client: reqwest::Client,
    upstream: String,
) -> Answer {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let operation = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit('.').next())
        .unwrap_or_default()
        .to_owned();
    let text = String::from_utf8_lossy(&body);
    let fault = lock(&shared.rules)
        .iter()
        .find(|(call, _)| call.matches(&operation, &text))
        .map(|(_, fault)| *fault);
    let Some(fault) = fault else {
        return forward(client, upstream, parts, body).await;
    };
    shared.hits.fetch_add(1, Ordering::SeqCst);
    match fault {
        WireFault::Refused => reset(),
        WireFault::ServerError => {
            dynamo_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError")
        }
        WireFault::Throttled => dynamo_error(StatusCode::BAD_REQUEST, "ThrottlingException"),
        WireFault::ResetAfterSent => {
            let _ = forward(client, upstream, parts, body).await;
            reset()
        }
        WireFault::AnsweredLate(hold) => {
            let answer = forward(client, upstream, parts, body).await;
            tokio::time::sleep(hold).await;
            answer
        }
        WireFault::LandsLate(hold) => {
            // Detached, so the write lands even after the caller hangs up.
            shared.in_flight.fetch_add(1, Ordering::SeqCst);
            let done = shared.clone();
            let late = tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                let answer = forward(client, upstream, parts, body).await;
                done.in_flight.fetch_sub(1, Ordering::SeqCst);
                answer
            });
            late.await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
        }
    }
}
