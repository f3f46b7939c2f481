//! The sidecar end to end: a request built from the bytes (method, path, `Authorization`) sent to
//! a real `iam_broker_proxy::serve` on loopback, in front of a stand-in broker whose answer
//! (status, `Cache-Control`, `Retry-After`, body, `Expiration`) also comes from the bytes. This
//! reaches the proxy's request routing and its reading of the broker's answer (both private to
//! the proxy crate) through its only public door.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use arbitrary::{Result, Unstructured};
use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use iam_broker_kernel::credentials::{cache_max_age, format_expiration};
use iam_broker_proxy::{Clock, ManualClock, ProxyConfig, ProxyHandle, serve};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Min validity the proxy is configured with.
const MIN_VALIDITY: i64 = 900;

/// What the stand-in broker answers next.
#[derive(Clone, Default)]
struct BrokerAnswer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

#[derive(Default)]
struct Broker {
    answer: BrokerAnswer,
    /// Every 200 body handed out, by the `Authorization` it was asked with.
    served: HashMap<Vec<u8>, HashSet<Vec<u8>>>,
    /// Calls that came without a token (must stay 0).
    tokenless: u64,
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    broker: Arc<Mutex<Broker>>,
    clock: Arc<ManualClock>,
    proxy: SocketAddr,
    _handle: ProxyHandle,
    runs: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn harness() -> &'static Mutex<Harness> {
    static HARNESS: OnceLock<Mutex<Harness>> = OnceLock::new();
    HARNESS.get_or_init(|| match start() {
        Ok(harness) => Mutex::new(harness),
        Err(e) => panic!("the sidecar target could not start: {e}"),
    })
}

fn start() -> std::result::Result<Harness, Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let broker = Arc::new(Mutex::new(Broker::default()));
    let clock = Arc::new(ManualClock::new(OffsetDateTime::from_unix_timestamp(
        1_800_000_000,
    )?));
    let (proxy, handle) = runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let broker_addr = listener.local_addr()?;
        let state = Arc::clone(&broker);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = Arc::clone(&state);
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let state = Arc::clone(&state);
                    async move { Ok::<_, std::convert::Infallible>(answer(&state, &request)) }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        let variables = HashMap::from([
            ("BROKER_URL", format!("http://{broker_addr}/Prod/")),
            ("LISTEN_ADDR", "127.0.0.1:0".to_owned()),
            ("MIN_VALIDITY_SECONDS", MIN_VALIDITY.to_string()),
            ("REFRESH_AHEAD_SECONDS", "300".to_owned()),
            ("BROKER_TIMEOUT_MS", "5000".to_owned()),
        ]);
        let config = ProxyConfig::from_lookup(|name| variables.get(name).cloned())?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let handle = serve(listener, config, Arc::clone(&clock) as Arc<dyn Clock>)?;
        Ok::<_, Box<dyn std::error::Error>>((handle.local_addr(), handle))
    })?;
    Ok(Harness {
        runtime,
        broker,
        clock,
        proxy,
        _handle: handle,
        runs: AtomicU64::new(0),
    })
}

/// The stand-in broker: the configured answer, and a note of what it handed to whom.
fn answer(
    state: &Mutex<Broker>,
    request: &hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let mut broker = lock(state);
    let answer = broker.answer.clone();
    let authorization = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default();
    if authorization.iter().all(u8::is_ascii_whitespace) {
        broker.tokenless += 1;
    }
    if answer.status == 200 {
        broker
            .served
            .entry(authorization)
            .or_default()
            .insert(answer.body.clone());
    }
    let mut response = hyper::Response::new(Full::new(Bytes::from(answer.body)));
    *response.status_mut() =
        http::StatusCode::from_u16(answer.status).unwrap_or(http::StatusCode::OK);
    for (name, value) in &answer.headers {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    response
}

/// Whether `bytes` is a JSON text (RFC 8259): UTF-8, and the JSON grammar. Numbers beyond what
/// an `f64` holds (`7e771`) are grammatical, so this is not `serde_json::Value`'s test.
fn is_json_text(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

/// A response as read off the wire.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn parse_reply(raw: &[u8]) -> Option<Reply> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Some(Reply {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

async fn send(proxy: SocketAddr, request: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(proxy).await?;
    stream.write_all(&request).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    Ok(raw)
}

/// One request of a run.
struct Step {
    method: &'static str,
    path: &'static str,
    authorization: Option<Vec<u8>>,
    answer: BrokerAnswer,
    advance: u32,
}

fn broker_answer(u: &mut Unstructured<'_>, now: OffsetDateTime) -> Result<BrokerAnswer> {
    let status = *u.choose(&[200, 200, 200, 200, 403, 404, 429, 500, 503, 302, 204, 418])?;
    let offset = match u.choose_index(3)? {
        0 => i64::from(u.int_in_range(-3600..=7200i32)?),
        1 => i64::from(u.int_in_range(800..=1000i32)?),
        _ => i64::from(u.arbitrary::<i32>()?),
    };
    let expiration = now
        .checked_add(time::Duration::seconds(offset))
        .map(format_expiration)
        .unwrap_or_default();
    let body = match u.choose_index(6)? {
        0..=2 => serde_json::to_vec(&json!({ "AccessKeyId": "ASIA", "SecretAccessKey": "s",
            "Token": u.arbitrary::<u32>()?.to_string(), "Expiration": expiration })),
        3 => serde_json::to_vec(&json!({ "Code": "InvalidToken", "Message": "unknown token" })),
        4 => serde_json::to_vec(&json!({ "Expiration": *u.choose(&[
            "2026-13-01T00:00:00Z", "yesterday", "", "2057-01-15T08:00:00+99:00"])? })),
        _ => Ok(u.arbitrary::<Vec<u8>>()?),
    }
    .unwrap_or_default();
    let mut headers = Vec::new();
    for _ in 0..u.int_in_range(0..=2u8)? {
        let value = match u.choose_index(4)? {
            0 => format!("max-age={}", u.arbitrary::<u32>()?),
            1 => (*u.choose(&[
                "no-store",
                "No-Store",
                "private, max-age=0",
                "max-age=\"60\"",
            ])?)
            .to_owned(),
            2 => format!("max-age={}, no-store", u.int_in_range(0..=4000u32)?),
            _ => u.arbitrary::<String>()?,
        };
        headers.push(("cache-control".to_owned(), value));
    }
    if u.arbitrary()? {
        headers.push(("retry-after".to_owned(), "5".to_owned()));
    }
    Ok(BrokerAnswer {
        status,
        headers,
        body,
    })
}

fn step(u: &mut Unstructured<'_>, run: u64, now: OffsetDateTime) -> Result<Step> {
    let method = *u.choose(&["GET", "GET", "GET", "POST", "HEAD", "DELETE"])?;
    let path = *u.choose(&["/", "/", "/credentials", "/healthz", "/x?y=1"])?;
    let authorization = match u.choose_index(6)? {
        // A token of this run, so runs do not share cache entries.
        0..=2 => Some(format!("tok-{run}-{}", u.int_in_range(0..=2u8)?).into_bytes()),
        3 => None,
        4 => Some(b"   ".to_vec()),
        _ => Some(
            u.arbitrary::<Vec<u8>>()?
                .into_iter()
                .filter(|b| (0x20..0x7f).contains(b))
                .collect(),
        ),
    };
    Ok(Step {
        method,
        path,
        authorization,
        answer: broker_answer(u, now)?,
        advance: *u.choose(&[0, 0, 1, 60, 600, 1800, 3600])?,
    })
}

/// Target: up to four requests to the sidecar, each with its own broker answer.
pub fn proxy_request(data: &[u8]) {
    let harness = lock(harness());
    let run = harness.runs.fetch_add(1, Ordering::Relaxed);
    let mut u = Unstructured::new(data);
    for _ in 0..u.int_in_range(1..=4u8).unwrap_or(1) {
        let Ok(step) = step(&mut u, run, harness.clock.now()) else {
            return;
        };
        check_step(&harness, &step);
        harness
            .clock
            .advance(Duration::from_secs(u64::from(step.advance)));
    }
}

fn check_step(harness: &Harness, step: &Step) {
    lock(&harness.broker).answer = step.answer.clone();
    let mut request = format!(
        "{} {} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n",
        step.method, step.path
    )
    .into_bytes();
    if let Some(authorization) = &step.authorization {
        request.extend_from_slice(b"Authorization: ");
        request.extend_from_slice(authorization);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    let sent = harness.runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), send(harness.proxy, request)).await
    });
    let raw = match sent {
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => panic!("the sidecar dropped the request: {e}"),
        Err(_) => panic!("the sidecar did not answer within 20 s"),
    };
    let Some(reply) = parse_reply(&raw) else {
        panic!("not an HTTP response: {:?}", String::from_utf8_lossy(&raw));
    };
    let now = harness.clock.now();
    let head = step.method == "HEAD";
    // Every answer is JSON with a Cache-Control.
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let cache_control = reply.header("cache-control").unwrap_or_default().to_owned();
    if !head {
        assert!(
            is_json_text(&reply.body),
            "a body that is not JSON: {:?}",
            String::from_utf8_lossy(&reply.body)
        );
    }
    let credentials_path = step.path.split('?').next() != Some("/healthz");
    let token = step
        .authorization
        .as_ref()
        .filter(|a| !a.iter().all(u8::is_ascii_whitespace));
    if step.method != "GET" {
        assert_eq!(reply.status, 405);
        assert_eq!(reply.header("allow"), Some("GET"));
    } else if !credentials_path {
        assert_eq!(reply.status, 200);
    } else if token.is_none() {
        assert_eq!(reply.status, 401);
    }
    // The broker is never asked without a token (a refresh started by an earlier request may
    // land during this one, so count what the broker saw, not calls).
    assert_eq!(
        lock(&harness.broker).tokenless,
        0,
        "the broker was asked without a token"
    );
    if reply.status != 200 {
        assert_eq!(cache_control, "no-store", "status {}", reply.status);
        return;
    }
    let (Some(token), true, false) = (token, credentials_path, head) else {
        return;
    };
    // Credentials: only ever ones the broker handed out for this very token…
    let broker = lock(&harness.broker);
    // HTTP drops the whitespace around a header value, so the broker saw the token trimmed.
    let served = broker.served.get(token.trim_ascii());
    assert!(
        served.is_some_and(|bodies| bodies.contains(&reply.body)),
        "credentials the broker never gave this token"
    );
    drop(broker);
    // …never expired, with a max-age that never promises past the expiry.
    let body: Value = serde_json::from_slice(&reply.body).unwrap_or_default();
    let expiration = body["Expiration"]
        .as_str()
        .and_then(|e| OffsetDateTime::parse(e, &Rfc3339).ok());
    let Some(expiration) = expiration else {
        panic!("credentials without a readable Expiration were served");
    };
    assert!(
        expiration > now,
        "expired credentials served ({expiration} at {now})"
    );
    assert_eq!(
        cache_control,
        format!("max-age={}", cache_max_age(expiration, now))
    );
}
