//! End to end: the sidecar's log stays bounded under load. A cache hit is not an info line
//! (misses, refreshes and errors are), and a value the client chooses (the path, the method)
//! is logged only up to a bounded length.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use iam_broker_tests::proxy::Proxy;
use iam_broker_tests::{Env, Moto, Server, Tables, allow, mint_token};

const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";
/// Cached requests sent after the first (the miss).
const HITS: usize = 1000;
/// What the log may grow by for all of them together.
const MAX_LOG_BYTES_FOR_HITS: usize = 300;

#[tokio::test]
async fn a_thousand_cache_hits_add_almost_nothing_to_the_log_and_paths_are_truncated() {
    // GIVEN the sidecar in front of `iam-broker serve` (moto behind it), at its default level
    let moto = Moto::start().await.unwrap();
    let tables = Tables::create(&moto.sdk_config().await, "logs")
        .await
        .unwrap();
    let env = moto.env().tables(&tables);
    allow(&env, "team-a", "app", ROLE).await.unwrap();
    let token = mint_token(&env, "team-a", "app", ROLE).await.unwrap();
    let server = Server::start(&env).await.unwrap();
    let proxy = Proxy::start_with(&format!("{}/", server.url), Env::new())
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let get = |path: &str, authorization: Option<&str>| {
        let mut request = client.get(format!("{}{path}", proxy.url.trim_end_matches('/')));
        if let Some(value) = authorization {
            request = request.header("Authorization", value);
        }
        request.send()
    };

    // WHEN one request misses (the broker is asked) ...
    let miss = get("/", Some(&token)).await.unwrap();
    assert_eq!(miss.status(), 200);
    let after_miss = proxy.log();
    assert!(
        after_miss.contains("credentials cached"),
        "a miss is an info line: {after_miss}"
    );
    // ... and a thousand more are served from the cache
    for _ in 0..HITS {
        let hit = get("/", Some(&token)).await.unwrap();
        assert_eq!(hit.status(), 200);
    }

    // THEN the log grew by less than MAX_LOG_BYTES_FOR_HITS for all of them
    let after_hits = proxy.log();
    let grown = after_hits.len() - after_miss.len();
    eprintln!(
        "{HITS} cache hits added {grown} log bytes ({:.3} per hit); the miss {} bytes",
        grown as f64 / HITS as f64,
        after_miss.len()
    );
    assert!(
        grown < MAX_LOG_BYTES_FOR_HITS,
        "{HITS} cache hits added {grown} bytes of log:\n{}",
        &after_hits[after_miss.len()..after_miss.len() + grown.min(2000)]
    );

    // WHEN a request that is logged (no token: a 401) has a 6000-character path
    let long_path = format!("/{}", "p".repeat(6000));
    let refused = get(&long_path, None).await.unwrap();
    assert_eq!(refused.status(), 401);
    // AND a request with a 3000-character method (a 405, logged)
    let method = reqwest::Method::from_bytes("M".repeat(3000).as_bytes()).unwrap();
    let odd = client.request(method, &proxy.url).send().await.unwrap();
    assert_eq!(odd.status(), 405);
    // THEN their log lines carry only bounded prefixes of the path and the method
    let log = proxy.stop().await;
    assert!(
        !log.contains(&"M".repeat(100)),
        "the whole method was logged"
    );
    let line = log
        .lines()
        .find(|l| l.contains("\"status\":401"))
        .expect("the refusal is logged");
    assert!(line.len() < 600, "{} bytes: {line}", line.len());
    assert!(!log.contains(&"p".repeat(200)), "the whole path was logged");
    assert!(!log.contains(&token), "the token was logged");
}
