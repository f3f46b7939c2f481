//! The stable smoke of every fuzz target: a few thousand random and generated inputs each, on
//! the same functions libFuzzer drives in `fuzz/`. CI runs it (`cargo test -p
//! iam-broker-fuzz-targets`); the long runs are `scripts/fuzz.sh` on nightly.

use arbitrary::Unstructured;
use iam_broker_fuzz_targets::{admission, jwks, jwt, proxy, record, token};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn admission_review_raw(data in bytes(256)) {
        admission::review(&data);
    }

    #[test]
    fn admission_review_generated(data in bytes(1024)) {
        if let Ok(body) = admission::arbitrary_review(&mut Unstructured::new(&data)) {
            admission::review(&body);
        }
    }

    #[test]
    fn admission_pod(data in bytes(1024)) {
        admission::pod(&data);
    }

    #[test]
    fn authorization_raw(data in bytes(64)) {
        token::authorization(&data);
    }

    #[test]
    fn authorization_shaped(
        prefix in "[ \t]{0,2}((?i:bearer)[ ]{1,2})?",
        body in "iamb_[A-Za-z0-9_-]{42,44}",
        suffix in "[ \t]{0,2}",
    ) {
        token::authorization(format!("{prefix}{body}{suffix}").as_bytes());
    }

    #[test]
    fn projected_token(data in bytes(512)) {
        jwt::projected_token(&data);
    }

    #[test]
    fn jwks_raw(data in bytes(512)) {
        jwks::jwks(&data);
    }

    #[test]
    fn jwks_built(data in bytes(256)) {
        // mode byte not 0 mod 4: a document built from the rest
        let mut data = data;
        if let Some(mode) = data.first_mut() {
            *mode |= 1;
        }
        jwks::jwks(&data);
    }

    #[test]
    fn cache_policy(data in bytes(512)) {
        proxy::cache_policy(&data);
    }

    #[test]
    fn stream_event_generated(data in bytes(1024)) {
        if let Ok(body) = record::arbitrary_stream_event(&mut Unstructured::new(&data)) {
            record::stream_event(&body);
        }
    }
}

proptest! {
    // Each case is one or two calls through the AWS SDK (answered in memory).
    #![proptest_config(config(1000))]

    #[test]
    fn token_record(data in bytes(512)) {
        record::token_record(&data);
    }
}

/// The oracle of the token target agrees with minted tokens (so it can tell a good one).
#[test]
fn minted_tokens_have_the_documented_shape() {
    for _ in 0..200 {
        let minted = match iam_broker_kernel::Token::mint() {
            Ok(token) => token,
            Err(e) => panic!("{e}"),
        };
        assert!(token::documented_shape(minted.expose()));
        token::authorization(minted.expose().as_bytes());
    }
}

/// Each header shape of the signed-claims mode, over a valid token's claims (no bytes after
/// the mode): with and without `kid` the token is accepted and named after the cluster that
/// signed it (the target checks that against its oracle); with `crit`, or under the other
/// cluster's `kid`, it is refused. These are also the seeds in `fuzz/seeds/projected_token`.
#[test]
fn every_header_shape_of_a_signed_token() {
    // mode % 3 == 2; then (mode / 3) % 2 picks east or west, (mode / 6) % 4 the header.
    for mode in [2u8, 5, 8, 11, 14, 17, 20, 23] {
        jwt::projected_token(&[mode]);
    }
}

/// The built key sets reach both verdicts for both key types: RSA and P-256 keys accepted
/// (so valid moduli and on-curve points are generated, and the oracle's "must accept" is
/// exercised), and documents refused.
#[test]
fn built_key_sets_are_accepted_and_refused() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut rsa, mut ec, mut refused, mut built) = (0, 0, 0, 0);
    for _ in 0..1000 {
        let data = bytes(256)
            .new_tree(&mut runner)
            .map(|t| t.current())
            .unwrap_or_default();
        if let Some((r, e)) = jwks::built_and_accepted(&data) {
            built += 1;
            rsa += r;
            ec += e;
            refused += usize::from(r + e == 0);
        }
    }
    assert!(
        rsa > 20,
        "only {rsa} RSA keys accepted in {built} documents"
    );
    assert!(ec > 20, "only {ec} EC keys accepted in {built} documents");
    assert!(refused > 100, "only {refused} of {built} documents refused");
}

/// The generated inputs reach the decisions they are for, so the smoke is not vacuous.
#[test]
fn generated_inputs_reach_the_patch_and_the_record() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut patched, mut records) = (0, 0);
    for _ in 0..1000 {
        let data = bytes(1024)
            .new_tree(&mut runner)
            .map(|t| t.current())
            .unwrap_or_default();
        if let Ok(body) = admission::arbitrary_review(&mut Unstructured::new(&data)) {
            patched += usize::from(admission::patches(&body));
        }
        records += usize::from(record::decodes(&data));
    }
    assert!(
        patched > 100,
        "only {patched} of 1000 generated reviews got a patch"
    );
    assert!(
        records > 20,
        "only {records} of 1000 generated items decoded to a record"
    );
}

proptest! {
    // Each case is one to four HTTP requests to a real sidecar on loopback.
    #![proptest_config(config(300))]

    #[test]
    fn proxy_request(data in bytes(256)) {
        iam_broker_fuzz_targets::sidecar::proxy_request(&data);
    }
}

/// Found by the `proxy_request` fuzz target: a broker error whose body is a JSON string holding
/// bytes that are not UTF-8 (`"\xff…"`) is passed on by the sidecar as `application/json`,
/// though it is not JSON (RFC 8259 requires UTF-8). The sidecar's `read_reply`
/// (`crates/proxy/src/broker.rs`) decides "is JSON" with `serde_json::from_slice::<IgnoredAny>`,
/// which skipped strings without checking their UTF-8; it now checks the whole body first.
#[test]
fn a_broker_error_body_that_is_not_utf8_is_not_passed_on_as_json() {
    let input = include_bytes!(
        "../../../fuzz/regressions/proxy_request/crash-a6e50422251ec8db8f295b43cc29fccc3fa91aaf"
    );
    iam_broker_fuzz_targets::sidecar::proxy_request(input);
}
