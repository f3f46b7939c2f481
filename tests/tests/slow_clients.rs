//! End to end: `iam-broker serve` (HTTP and HTTPS) against slow and abusive clients, and the
//! JSON shape of the HTTP layer's own rejections (body, URI and header limits).
//!
//! Each slow-client test opens connections that never finish their request head (or their TLS
//! handshake), checks that the server keeps answering `/healthz` meanwhile, and that it cuts
//! every one of them after its header-read (handshake) timeout, shortened here to one second by
//! `IAM_BROKER_HEADER_READ_TIMEOUT_MS` / `IAM_BROKER_TLS_HANDSHAKE_TIMEOUT_MS`.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iam_broker_tests::{Env, Moto, Server, Tables};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// The shortened timeouts the servers under test run with.
const TIMEOUT: Duration = Duration::from_secs(1);
/// How long after its timeout a slow connection may still be open before the test fails
/// (generous: two cores, moto and other suites share the machine).
const SLACK: Duration = Duration::from_secs(4);
/// Slow connections per kind.
const PER_KIND: usize = 20;

struct World {
    _moto: Moto,
    env: Env,
}

async fn world(extra: &[(&str, &str)]) -> World {
    let moto = Moto::start().await.unwrap();
    let tables = Tables::create(&moto.sdk_config().await, "slow")
        .await
        .unwrap();
    let mut env = moto
        .env()
        .tables(&tables)
        .set(
            "IAM_BROKER_HEADER_READ_TIMEOUT_MS",
            TIMEOUT.as_millis().to_string(),
        )
        .set(
            "IAM_BROKER_TLS_HANDSHAKE_TIMEOUT_MS",
            TIMEOUT.as_millis().to_string(),
        );
    for (name, value) in extra {
        env = env.set(name, value);
    }
    World { _moto: moto, env }
}

fn address(server: &Server) -> SocketAddr {
    let authority = server
        .url
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    authority.parse().unwrap()
}

/// Reads until the peer closes (EOF or reset) and returns how long that took from `since`, or
/// `None` if the connection is still open at `deadline`.
async fn closed_by<S: AsyncRead + Unpin>(
    stream: &mut S,
    since: Instant,
    deadline: Instant,
) -> Option<Duration> {
    let mut buffer = [0u8; 1024];
    loop {
        let read = tokio::time::timeout_at(deadline.into(), stream.read(&mut buffer)).await;
        match read {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(since.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// `GET /healthz` on a fresh connection (never a pooled one), answered within 5 s.
async fn health<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> anyhow::Result<String> {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    anyhow::ensure!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    Ok(answer)
}

fn tls_connector(ca_pem: &str) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn tls_connect(
    connector: &TlsConnector,
    address: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(address).await.unwrap();
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// How long a new client waits for its `GET /healthz` (in the listen backlog, when every slot
/// is taken).
async fn health_wait(address: SocketAddr) -> Duration {
    let started = Instant::now();
    health(TcpStream::connect(address).await.unwrap())
        .await
        .unwrap();
    started.elapsed()
}

/// A client that sends one byte of its request head every 100 ms, forever.
fn drip<S: AsyncWrite + Unpin + Send + 'static>(mut stream: S) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let head = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ";
        if stream.write_all(head).await.is_err() {
            return;
        }
        while stream.write_all(b"a").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

const PARTIAL_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: 1";

/// Waits until every stream is closed; returns the slowest cut, or the count still open.
async fn all_closed<S: AsyncRead + Unpin>(
    streams: &mut [S],
    since: Instant,
) -> Result<Duration, usize> {
    let deadline = since + TIMEOUT + SLACK;
    let mut slowest = Duration::ZERO;
    let mut open = 0;
    for stream in streams {
        match closed_by(stream, since, deadline).await {
            Some(after) => slowest = slowest.max(after),
            None => open += 1,
        }
    }
    if open == 0 { Ok(slowest) } else { Err(open) }
}

#[tokio::test]
async fn slow_request_heads_over_http_are_cut_while_health_keeps_answering() {
    // GIVEN `iam-broker serve` over plain HTTP with a 1 s header-read timeout
    let w = world(&[]).await;
    let server = Server::start(&w.env).await.unwrap();
    let address = address(&server);

    // WHEN clients open connections and send nothing, a partial head, or one byte at a time
    let opened = Instant::now();
    let mut silent = Vec::new();
    let mut partial = Vec::new();
    let mut drips = Vec::new();
    for _ in 0..PER_KIND {
        silent.push(TcpStream::connect(address).await.unwrap());
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(PARTIAL_HEAD).await.unwrap();
        partial.push(stream);
        let (read, write) = TcpStream::connect(address).await.unwrap().into_split();
        drips.push((read, drip(write)));
    }

    // ... or keep a connection idle after one answered request (keep-alive)
    let mut idle = TcpStream::connect(address).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answered = Vec::new();
    while !String::from_utf8_lossy(&answered).contains(r#"{"status":"ok"}"#) {
        let mut buffer = [0u8; 1024];
        let n = idle.read(&mut buffer).await.unwrap();
        assert!(n > 0, "closed before the answer");
        answered.extend_from_slice(&buffer[..n]);
    }
    let idle_since = Instant::now();

    // THEN the server keeps answering meanwhile
    health(TcpStream::connect(address).await.unwrap())
        .await
        .unwrap();

    // AND cuts every slow or idle connection after about its timeout
    let idle_cut = all_closed(std::slice::from_mut(&mut idle), idle_since).await;
    assert!(
        idle_cut.is_ok(),
        "an idle keep-alive connection stayed open"
    );
    let silent_cut = all_closed(&mut silent, opened).await;
    let partial_cut = all_closed(&mut partial, opened).await;
    let mut readers: Vec<_> = drips.iter_mut().map(|(read, _)| read).collect();
    let drip_cut = all_closed(&mut readers, opened).await;
    for (_, task) in &drips {
        task.abort();
    }
    eprintln!(
        "HTTP: {PER_KIND} silent, {PER_KIND} partial, {PER_KIND} drip, 1 idle keep-alive; slowest \
         cut after {silent_cut:?} / {partial_cut:?} / {drip_cut:?} / {idle_cut:?}"
    );
    assert!(
        silent_cut.is_ok() && partial_cut.is_ok() && drip_cut.is_ok(),
        "still open {} s after the timeout (silent / partial / drip): {silent_cut:?} / \
         {partial_cut:?} / {drip_cut:?}",
        SLACK.as_secs()
    );
    assert!(
        partial_cut.unwrap() >= TIMEOUT.mul_f32(0.8),
        "cut too early"
    );
    // AND it still answers afterwards
    health(TcpStream::connect(address).await.unwrap())
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn stalled_handshakes_and_slow_heads_over_tls_are_cut_while_health_keeps_answering() {
    // GIVEN `iam-broker serve --tls-cert --tls-key` with 1 s handshake and header-read timeouts
    let w = world(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = iam_broker_testkit::kube_api::test_certificates().unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let server = Server::start_tls(&w.env, &cert_path, &key_path, &ca)
        .await
        .unwrap();
    let address = address(&server);
    let connector = tls_connector(&ca);

    // WHEN clients stall their handshake (nothing sent, or half a ClientHello record) or finish
    // it and then send a partial request head
    let opened = Instant::now();
    let mut stalled = Vec::new();
    let mut half_hello = Vec::new();
    let mut slow_heads = Vec::new();
    for _ in 0..PER_KIND {
        stalled.push(TcpStream::connect(address).await.unwrap());
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream
            .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap();
        half_hello.push(stream);
    }
    for _ in 0..PER_KIND {
        let mut tls = tls_connect(&connector, address).await;
        tls.write_all(PARTIAL_HEAD).await.unwrap();
        tls.flush().await.unwrap();
        slow_heads.push(tls);
    }
    let heads_opened = Instant::now();

    // THEN the server keeps answering meanwhile
    health(tls_connect(&connector, address).await)
        .await
        .unwrap();

    // AND cuts every one of them after about its timeout
    let stalled_cut = all_closed(&mut stalled, opened).await;
    let half_hello_cut = all_closed(&mut half_hello, opened).await;
    let slow_head_cut = all_closed(&mut slow_heads, heads_opened).await;
    eprintln!(
        "TLS: {PER_KIND} stalled handshakes, {PER_KIND} half ClientHellos, {PER_KIND} slow heads; \
         slowest cut after {stalled_cut:?} / {half_hello_cut:?} / {slow_head_cut:?}"
    );
    assert!(
        stalled_cut.is_ok() && half_hello_cut.is_ok() && slow_head_cut.is_ok(),
        "still open {} s after the timeout (stalled / half hello / slow head): {stalled_cut:?} / \
         {half_hello_cut:?} / {slow_head_cut:?}",
        SLACK.as_secs()
    );
    health(tls_connect(&connector, address).await)
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn at_the_connection_limit_a_new_client_waits_for_a_slot_instead_of_failing() {
    // GIVEN serve limited to 8 connections, with a 1 s header-read timeout
    let w = world(&[("IAM_BROKER_MAX_CONNECTIONS", "8")]).await;
    let server = Server::start(&w.env).await.unwrap();
    let address = address(&server);

    // WHEN 8 connections sit there without sending anything
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(address).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // THEN a ninth client is not served while they hold every slot, but is served (not
    // refused) as soon as the header-read timeout frees one
    let waited = health_wait(address).await;
    eprintln!("limit 8: the ninth client waited {waited:?}");
    assert!(
        waited >= TIMEOUT / 2,
        "served after {waited:?}: no connection limit"
    );
    assert!(waited < TIMEOUT + SLACK, "waited {waited:?}");
    server.stop().await;
}

/// A webhook request that declares a 100 kB body, sends its head and one byte of the body, then
/// one more byte every 100 ms, forever.
fn drip_body<S: AsyncWrite + Unpin + Send + 'static>(
    mut stream: S,
    path: &str,
) -> tokio::task::JoinHandle<()> {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: 100000\r\n\r\n{{"
    );
    tokio::spawn(async move {
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        while stream.write_all(b" ").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Reads a connection to its end (or 10 s) and returns what came.
async fn read_answer<S: AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline.into(), stream.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buffer[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn slow_request_bodies_are_cut_and_cannot_lock_the_server_out() {
    // GIVEN serve with a webhook path secret, 1 s head and body deadlines, and 8 connection slots
    let secret = "p".repeat(40);
    let w = world(&[
        ("WEBHOOK_PATH_SECRET", secret.as_str()),
        ("IAM_BROKER_BODY_READ_TIMEOUT_MS", "1000"),
        ("IAM_BROKER_MAX_CONNECTIONS", "8"),
    ])
    .await;
    let server = Server::start(&w.env).await.unwrap();
    let address = address(&server);

    // WHEN a client declares a body on a path with the wrong secret (or on `POST /`) and
    // sends it slowly
    for path in ["/mutate/wrong-secret", "/"] {
        let (mut read, write) = TcpStream::connect(address).await.unwrap().into_split();
        let started = Instant::now();
        let task = drip_body(write, path);
        let answer = read_answer(&mut read).await;
        task.abort();
        // THEN it is refused 404 before the body is read: no wait for the body's deadline
        assert!(answer.starts_with("HTTP/1.1 404"), "{path}: {answer}");
        assert!(
            started.elapsed() < TIMEOUT / 2,
            "{path}: waited {:?} for a body it should not read",
            started.elapsed()
        );
    }

    // WHEN 8 clients (every slot) send bodies to the right path one byte every 100 ms
    let opened = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..8 {
        let (read, write) = TcpStream::connect(address).await.unwrap().into_split();
        slow.push((read, drip_body(write, &format!("/mutate/{secret}"))));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // (a refused connection above may keep its slot until its head-read timeout, so one of
    // these may start a deadline late: every bound below is one deadline plus the slack)
    // THEN a ninth client is served as soon as the body deadline frees a slot
    let waited = health_wait(address).await;

    // AND every slow body is answered 408 in JSON and its connection closed, within the deadline
    let mut slowest = Duration::ZERO;
    for (read, task) in &mut slow {
        let answer = read_answer(read).await;
        slowest = slowest.max(opened.elapsed());
        task.abort();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains(r#""Code":"RequestTimeout""#), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    eprintln!(
        "slow bodies: a ninth client waited {waited:?}; the slowest of 8 was cut after {slowest:?}"
    );
    assert!(waited < TIMEOUT + SLACK, "locked out for {waited:?}");
    assert!(
        slowest < TIMEOUT + SLACK,
        "a slow body held on for {slowest:?}"
    );
    assert!(
        slowest >= TIMEOUT.mul_f32(0.8),
        "cut too early: {slowest:?}"
    );
    server.stop().await;
}

/// One request written raw (so nothing client-side trims it); returns status, headers, body.
async fn raw(address: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    // The server may answer and close before the whole request is written.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn assert_json_error(what: &str, (status, head, body): &(u16, String, String), want: u16) {
    assert_eq!(*status, want, "{what}: {head}\n{body}");
    assert!(
        head.contains("cache-control: no-store"),
        "{what}: no no-store: {head}"
    );
    assert!(
        head.contains("content-type: application/json"),
        "{what}: {head}"
    );
    let json: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {body:?}"));
    assert!(
        json["Code"].as_str().is_some_and(|c| !c.is_empty()),
        "{what}: {json}"
    );
    assert!(json["Message"].is_string(), "{what}: {json}");
}

#[tokio::test]
async fn the_http_layers_own_rejections_are_json_and_never_stored() {
    // GIVEN `iam-broker serve`
    let w = world(&[]).await;
    let server = Server::start(&w.env).await.unwrap();
    let address = address(&server);

    // WHEN a body is larger than the limit (3 MiB to the webhook)
    let body = vec![b'x'; 3 << 20];
    let mut request = format!(
        "POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    // THEN 413, JSON, no-store
    assert_json_error("body", &raw(address, &request).await, 413);

    // AND the same without a Content-Length (chunked)
    let mut request = b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\
                        Connection: close\r\n\r\n"
        .to_vec();
    for _ in 0..48 {
        request.extend_from_slice(format!("{:x}\r\n", 1 << 16).as_bytes());
        request.extend_from_slice(&vec![b'x'; 1 << 16]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    assert_json_error("chunked body", &raw(address, &request).await, 413);

    // WHEN the URI is too long: 414, JSON
    let uri = format!("/{}", "a".repeat(9000));
    let request = format!("GET {uri} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    assert_json_error("URI", &raw(address, request.as_bytes()).await, 414);

    // WHEN the headers are too large: 431, JSON
    let mut request = "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n".to_owned();
    for i in 0..10 {
        request.push_str(&format!("X-Big-{i}: {}\r\n", "b".repeat(4000)));
    }
    request.push_str("\r\n");
    assert_json_error("headers", &raw(address, request.as_bytes()).await, 431);

    // WHEN a path segment is not UTF-8 (axum's own path rejection): 400, JSON
    let request = "POST /mutate/%FF%FE HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\
                   Connection: close\r\n\r\n{}";
    let answer = raw(address, request.as_bytes()).await;
    assert!(
        answer.0 == 400 || answer.0 == 404,
        "{}: {}",
        answer.0,
        answer.2
    );
    assert_json_error("path", &answer, answer.0);

    // WHEN the head is far beyond hyper's own buffer (64 KiB): hyper answers 431 with an empty
    // body before any service runs (README "Limits" says so); the connection is closed
    let mut request = "GET / HTTP/1.1\r\nHost: localhost\r\n".to_owned();
    for i in 0..50 {
        request.push_str(&format!("X-Huge-{i}: {}\r\n", "h".repeat(4000)));
    }
    request.push_str("\r\n");
    let (status, _, body) = raw(address, request.as_bytes()).await;
    assert_eq!(status, 431);
    assert!(body.is_empty(), "{body}");

    // WHEN the method is a 3000-character extension token: a JSON 405, logged only in part
    let request = format!(
        "{} / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        "M".repeat(3000)
    );
    assert_json_error("method", &raw(address, request.as_bytes()).await, 405);

    // WHEN the request cannot be parsed at all: hyper's own 400, empty body (README "Limits")
    let (status, _, body) = raw(address, b"NOT HTTP AT ALL\r\n\r\n").await;
    assert_eq!(status, 400);
    assert!(body.is_empty(), "{body}");

    // AND the server still answers
    health(TcpStream::connect(address).await.unwrap())
        .await
        .unwrap();
    let log = server.stop().await;
    assert!(!log.contains(&"b".repeat(200)), "a header value was logged");
    assert!(
        !log.contains(&"M".repeat(200)),
        "the whole method was logged"
    );
    assert!(!log.contains(&"a".repeat(300)), "the whole path was logged");
}
