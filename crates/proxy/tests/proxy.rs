//! The sidecar's promises (README, "The sidecar proxy"), end to end over loopback HTTP: a proxy started in-process
//! in front of a fake broker, both reading one manual clock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use iam_broker_proxy::{Clock, ManualClock};
use support::{FakeBroker, Harness, Mode, T0, config, start_proxy};

const TOKEN_A: &str = "iamb_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
const TOKEN_B: &str = "iamb_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";
const TOKEN_C: &str = "iamb_CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC";

/// With one-hour credentials, min validity 15 minutes and refresh-ahead 5 minutes, the refresh
/// window opens 40 minutes after the fetch.
const REFRESH_WINDOW_OPENS: u64 = 40 * 60;
/// ... and the credentials stop being servable one second after 45 minutes.
const BELOW_MIN_VALIDITY: u64 = 45 * 60 + 1;

#[tokio::test]
async fn healthz_answers_ok_without_a_token_or_a_broker_call() {
    let h = Harness::start(&[]).await;
    let reply = h.request(Method::GET, "/healthz", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), serde_json::json!({"status": "ok"}));
    assert_eq!(
        reply.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(h.broker.calls(), 0);
}

#[tokio::test]
async fn other_methods_get_a_405_json_error_without_a_broker_call() {
    let h = Harness::start(&[]).await;
    for (method, path) in [
        (Method::POST, "/"),
        (Method::PUT, "/credentials"),
        (Method::DELETE, "/"),
        (Method::POST, "/healthz"),
    ] {
        let reply = h.request(method.clone(), path, Some(TOKEN_A)).await;
        assert_eq!(
            reply.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}"
        );
        assert_eq!(reply.json()["Code"], "MethodNotAllowed");
        assert_eq!(reply.header("cache-control").as_deref(), Some("no-store"));
        assert_eq!(reply.header("allow").as_deref(), Some("GET"));
    }
    assert_eq!(h.broker.calls(), 0);
}

#[tokio::test]
async fn a_miss_asks_the_broker_and_a_hit_is_served_from_the_cache() {
    // GIVEN a proxy in front of a broker at /Prod/
    let h = Harness::start(&[]).await;
    // WHEN an SDK asks on whatever path its FULL_URI names
    let first = h
        .request(Method::GET, "/v2/credentials", Some(TOKEN_A))
        .await;
    // THEN the broker is asked once, at its own URL, with the caller's header as sent
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(h.broker.seen(), [("/Prod/".to_owned(), TOKEN_A.to_owned())]);
    assert_eq!(
        first.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        first.header("cache-control").as_deref(),
        Some("max-age=3300")
    );
    assert_eq!(first.seconds_left(T0), 3600);
    // WHEN ten minutes later the SDK asks again
    h.advance(600);
    let second = h.get(Some(TOKEN_A)).await;
    // THEN the cached body comes back byte for byte, with max-age recomputed
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.body, first.body);
    assert_eq!(
        second.header("cache-control").as_deref(),
        Some("max-age=2700")
    );
    assert_eq!(h.broker.calls(), 1);
}

#[tokio::test]
async fn fifty_concurrent_misses_for_one_token_make_one_broker_call() {
    let h = Arc::new(Harness::start(&[]).await);
    h.broker.set_latency(Duration::from_millis(100));
    let callers: Vec<_> = (0..50)
        .map(|_| {
            let h = Arc::clone(&h);
            tokio::spawn(async move { h.get(Some(TOKEN_A)).await })
        })
        .collect();
    let mut keys = Vec::new();
    for caller in callers {
        keys.push(caller.await.unwrap().access_key_id());
    }
    assert_eq!(h.broker.calls(), 1);
    keys.dedup();
    assert_eq!(keys.len(), 1, "every caller got the one answer");
    assert_eq!(h.proxy.stats().entries, 1);
}

#[tokio::test]
async fn an_entry_nearing_min_validity_is_refreshed_once_in_the_background() {
    // GIVEN cached one-hour credentials
    let h = Arc::new(Harness::start(&[]).await);
    let old = h.get(Some(TOKEN_A)).await.access_key_id();
    // ... and a slow broker, in the refresh-ahead window
    h.broker.set_latency(Duration::from_millis(500));
    h.advance(REFRESH_WINDOW_OPENS);
    // WHEN ten callers ask at once
    let started = Instant::now();
    let callers: Vec<_> = (0..10)
        .map(|_| {
            let h = Arc::clone(&h);
            tokio::spawn(async move { h.get(Some(TOKEN_A)).await })
        })
        .collect();
    for caller in callers {
        // THEN each gets the old, still-valid answer at once ...
        let reply = caller.await.unwrap();
        assert_eq!(reply.access_key_id(), old);
        assert!(reply.seconds_left(h.clock.now()) >= 900);
    }
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(h.broker.answered(), 1, "nobody waited for the refresh");
    // ... and exactly one refresh runs
    assert_eq!(h.proxy.stats().in_flight, 1);
    h.settle().await;
    assert_eq!(h.broker.calls(), 2);
    // THEN the refreshed credentials are served from the cache
    let new = h.get(Some(TOKEN_A)).await;
    assert_ne!(new.access_key_id(), old);
    assert_eq!(new.seconds_left(h.clock.now()), 3600);
    h.settle().await;
    assert_eq!(h.broker.calls(), 2);
}

#[tokio::test]
async fn a_shorter_broker_max_age_brings_the_refresh_forward() {
    let h = Harness::start(&[]).await;
    h.broker.set_max_age(Some(60));
    let old = h.get(Some(TOKEN_A)).await.access_key_id();
    h.advance(59);
    assert_eq!(h.get(Some(TOKEN_A)).await.access_key_id(), old);
    h.settle().await;
    assert_eq!(h.broker.calls(), 1, "fresh for max-age seconds");
    h.advance(1);
    assert_eq!(h.get(Some(TOKEN_A)).await.access_key_id(), old);
    h.settle().await;
    assert_eq!(
        h.broker.calls(),
        2,
        "stale after max-age: refreshed in the background"
    );
    assert_ne!(h.get(Some(TOKEN_A)).await.access_key_id(), old);
}

#[tokio::test]
async fn while_the_broker_fails_valid_credentials_are_served_then_the_error_never_expired_ones() {
    // GIVEN cached one-hour credentials and a broker that now answers 503
    let h = Harness::start(&[]).await;
    let old = h.get(Some(TOKEN_A)).await.access_key_id();
    h.broker.set_mode(Mode::Error {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "ServiceUnavailable",
    });
    // WHEN the refresh window opens: the cached answer is served, the refresh fails
    h.advance(REFRESH_WINDOW_OPENS);
    assert_eq!(h.get(Some(TOKEN_A)).await.access_key_id(), old);
    h.settle().await;
    assert_eq!(h.broker.calls(), 2);
    // THEN the next refresh waits for its backoff, and serving goes on meanwhile
    assert_eq!(h.get(Some(TOKEN_A)).await.access_key_id(), old);
    h.settle().await;
    assert_eq!(h.broker.calls(), 2, "backing off");
    h.advance(1);
    assert_eq!(h.get(Some(TOKEN_A)).await.access_key_id(), old);
    h.settle().await;
    assert_eq!(h.broker.calls(), 3, "retried after the backoff");
    // THEN with exactly min validity left the old answer is still served
    h.clock.set(T0 + time::Duration::seconds(45 * 60));
    let last = h.get(Some(TOKEN_A)).await;
    assert_eq!(last.access_key_id(), old);
    assert_eq!(last.seconds_left(h.clock.now()), 900);
    h.settle().await;
    // WHEN less than min validity is left
    h.clock
        .set(T0 + time::Duration::seconds(BELOW_MIN_VALIDITY as i64));
    let calls = h.broker.calls();
    let reply = h.get(Some(TOKEN_A)).await;
    // THEN the broker's error is passed through
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["Code"], "ServiceUnavailable");
    assert_eq!(reply.header("retry-after").as_deref(), Some("2"));
    assert_eq!(reply.header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(h.broker.calls(), calls + 1);
    // ... and after expiry too: never the expired credentials
    h.advance(3600);
    let reply = h.get(Some(TOKEN_A)).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    // WHEN the broker recovers, new credentials are served
    h.broker.set_mode(Mode::Credentials);
    let new = h.get(Some(TOKEN_A)).await;
    assert_ne!(new.access_key_id(), old);
    assert_eq!(new.seconds_left(h.clock.now()), 3600);
}

#[tokio::test]
async fn short_lived_credentials_are_cached_for_a_third_of_their_life() {
    // STS's shortest credentials (CREDENTIAL_DURATION_SECONDS=900): before issue 12 they arrived
    // below the 15-minute min validity, were never cached, and every SDK request (botocore asks
    // at every call when under 15 minutes are left) became a broker call and an STS call.
    let h = Harness::start(&[]).await;
    h.broker.set_validity(time::Duration::minutes(15));
    let first = h.get(Some(TOKEN_A)).await;
    assert_eq!(first.seconds_left(T0), 900);
    assert_eq!(h.proxy.stats().entries, 1);
    for _ in 0..20 {
        let again = h.get(Some(TOKEN_A)).await;
        assert_eq!(again.access_key_id(), first.access_key_id());
    }
    assert_eq!(h.broker.calls(), 1, "20 requests, one broker call");
}

#[tokio::test]
async fn credentials_with_under_a_minute_left_are_served_once_and_not_cached() {
    let h = Harness::start(&[]).await;
    h.broker.set_validity(time::Duration::seconds(50));
    let first = h.get(Some(TOKEN_A)).await;
    assert_eq!(first.seconds_left(T0), 50);
    assert_eq!(h.proxy.stats().entries, 0);
    let second = h.get(Some(TOKEN_A)).await;
    assert_ne!(second.access_key_id(), first.access_key_id());
    assert_eq!(h.broker.calls(), 2, "every request asks the broker again");
}

#[tokio::test]
async fn expired_credentials_from_the_broker_are_never_served() {
    let h = Harness::start(&[]).await;
    h.broker.set_validity(time::Duration::seconds(-1));
    let reply = h.get(Some(TOKEN_A)).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.json()["Code"], "BrokerExpiredCredentials");
    assert_eq!(reply.header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(h.proxy.stats().entries, 0);
}

#[tokio::test]
async fn each_token_gets_only_its_own_credentials() {
    let h = Harness::start(&[]).await;
    let a = h.get(Some(TOKEN_A)).await;
    assert_eq!(
        a.json()["RoleArn"],
        format!("arn:aws:iam::123456789012:role/for-{TOKEN_A}")
    );
    // A different token is never served A's cached credentials.
    let b = h.get(Some(TOKEN_B)).await;
    assert_eq!(b.status, StatusCode::OK);
    assert_eq!(
        b.json()["RoleArn"],
        format!("arn:aws:iam::123456789012:role/for-{TOKEN_B}")
    );
    assert_ne!(b.access_key_id(), a.access_key_id());
    assert_eq!(h.broker.calls(), 2);
    let bearer = h.get(Some(&format!("Bearer {TOKEN_A}"))).await;
    assert_ne!(
        bearer.access_key_id(),
        a.access_key_id(),
        "keys are exact headers"
    );
    // No token, or an empty one: 401 from the proxy itself, no broker call.
    let calls = h.broker.calls();
    for token in [None, Some("")] {
        let reply = h.get(token).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(reply.json()["Code"], "MissingAuthorization");
        assert_eq!(reply.header("cache-control").as_deref(), Some("no-store"));
    }
    assert_eq!(h.broker.calls(), calls);
    assert_eq!(h.get(Some(TOKEN_A)).await.body, a.body);
}

#[tokio::test]
async fn a_refusal_in_a_background_refresh_evicts_the_entry() {
    // GIVEN cached credentials whose allowance is then revoked
    let h = Harness::start(&[]).await;
    let old = h.get(Some(TOKEN_A)).await.access_key_id();
    h.broker.set_mode(Mode::Error {
        status: StatusCode::FORBIDDEN,
        code: "AllowanceRevoked",
    });
    // WHEN the refresh window opens
    h.advance(REFRESH_WINDOW_OPENS);
    assert_eq!(h.get(Some(TOKEN_A)).await.access_key_id(), old);
    h.settle().await;
    // THEN the refresh's 403 evicts the entry and the next caller gets the 403 as sent
    assert_eq!(h.proxy.stats().entries, 0);
    let reply = h.get(Some(TOKEN_A)).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(
        reply.json(),
        serde_json::json!({"Code": "AllowanceRevoked", "Message": "fake AllowanceRevoked"})
    );
    assert_eq!(reply.header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(h.broker.calls(), 3);
}

#[tokio::test]
async fn a_refusal_on_a_miss_is_passed_through_and_nothing_is_cached() {
    let h = Harness::start(&[]).await;
    h.get(Some(TOKEN_A)).await.access_key_id();
    h.advance(BELOW_MIN_VALIDITY);
    for (status, code) in [
        (StatusCode::UNAUTHORIZED, "MissingAuthorization"),
        (StatusCode::FORBIDDEN, "InvalidToken"),
    ] {
        h.broker.set_mode(Mode::Error { status, code });
        let reply = h.get(Some(TOKEN_A)).await;
        assert_eq!(reply.status, status);
        assert_eq!(reply.json()["Code"], code);
        assert_eq!(h.proxy.stats().entries, 0);
    }
    // A broker error page that is not JSON keeps its status and gets a JSON body.
    h.broker.set_mode(Mode::Html(StatusCode::BAD_GATEWAY));
    let reply = h.get(Some(TOKEN_A)).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.json()["Code"], "BrokerError");
    assert_eq!(h.broker.calls(), 4);
}

#[tokio::test]
async fn an_unreachable_broker_is_a_502_json_error() {
    // A port that was just free: nothing listens there.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let clock = Arc::new(ManualClock::new(T0));
    let proxy = start_proxy(config(&format!("http://{addr}/"), &[]), clock).await;
    let reply = support::request(
        &support::client(),
        proxy.local_addr(),
        Method::GET,
        "/",
        Some(TOKEN_A),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.json()["Code"], "BrokerUnreachable");
    assert!(reply.json()["Message"].as_str().unwrap().len() > 10);
    assert_eq!(reply.header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(proxy.stats().in_flight, 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_hanging_broker_is_a_504_json_error_within_the_timeout() {
    let h = Harness::start(&[("BROKER_TIMEOUT_MS", "300")]).await;
    h.broker.set_latency(Duration::from_secs(30));
    let started = Instant::now();
    let reply = h.get(Some(TOKEN_A)).await;
    let elapsed = started.elapsed();
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.json()["Code"], "BrokerTimeout");
    assert_eq!(reply.header("cache-control").as_deref(), Some("no-store"));
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    assert_eq!(h.proxy.stats().in_flight, 0);
}

#[tokio::test]
async fn the_cache_is_bounded_and_drops_the_least_recently_used_token() {
    let h = Harness::start(&[("CACHE_MAX_ENTRIES", "2")]).await;
    h.get(Some(TOKEN_A)).await.access_key_id();
    h.get(Some(TOKEN_B)).await.access_key_id();
    h.get(Some(TOKEN_A)).await.access_key_id();
    h.get(Some(TOKEN_C)).await.access_key_id();
    assert_eq!(h.proxy.stats().entries, 2);
    assert_eq!(h.broker.calls(), 3);
    // A was used after B, so B was dropped.
    h.get(Some(TOKEN_A)).await.access_key_id();
    assert_eq!(h.broker.calls(), 3);
    h.get(Some(TOKEN_B)).await.access_key_id();
    assert_eq!(h.broker.calls(), 4);
}

#[tokio::test]
async fn shutdown_stops_accepting_connections() {
    let clock = Arc::new(ManualClock::new(T0));
    let broker = FakeBroker::start(Arc::clone(&clock)).await;
    let proxy = start_proxy(config(&format!("http://{}/", broker.addr), &[]), clock).await;
    let addr = proxy.local_addr();
    proxy.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// One request written raw on a fresh connection; status, lower-cased head, body.
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The proxy may answer and close before the whole request is written.
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

#[tokio::test]
async fn a_long_uri_or_large_headers_get_json_errors_without_a_broker_call() {
    let h = Harness::start(&[]).await;
    let addr = h.proxy.local_addr();
    let uri = format!("/{}", "u".repeat(9000));
    let long_uri = format!(
        "GET {uri} HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN_A}\r\nConnection: close\r\n\r\n"
    );
    let mut big_headers =
        format!("GET / HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN_A}\r\nConnection: close\r\n");
    for i in 0..10 {
        big_headers.push_str(&format!("X-Big-{i}: {}\r\n", "b".repeat(4000)));
    }
    big_headers.push_str("\r\n");
    for (request, status, code) in [
        (long_uri, 414, "UriTooLong"),
        (big_headers, 431, "RequestHeaderFieldsTooLarge"),
    ] {
        let (got, head, body) = raw(addr, request.as_bytes()).await;
        assert_eq!(got, status, "{head}\n{body}");
        assert!(head.contains("cache-control: no-store"), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["Code"], code);
    }
    assert_eq!(h.broker.calls(), 0);
}

#[tokio::test]
async fn silent_connections_are_cut_and_at_the_limit_new_clients_wait_for_a_slot() {
    use tokio::io::AsyncReadExt as _;
    // GIVEN a proxy serving at most 4 connections, with a 500 ms header-read timeout
    let h = Harness::start(&[("MAX_CONNECTIONS", "4"), ("HEADER_READ_TIMEOUT_MS", "500")]).await;
    let addr = h.proxy.local_addr();
    // WHEN 4 clients connect and send nothing
    let opened = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // THEN a fifth client is served once the timeout frees a slot: late, not refused
    let (status, _, _) = raw(
        addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let waited = opened.elapsed();
    assert_eq!(status, 200);
    assert!(
        waited >= Duration::from_millis(300),
        "no limit: served after {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    // AND every silent connection was closed by the proxy
    for mut stream in silent {
        let mut buffer = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await;
        assert!(matches!(read, Ok(Ok(0) | Err(_))), "still open: {read:?}");
    }
}
