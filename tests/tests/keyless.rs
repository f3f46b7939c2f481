//! Keyless in-cluster mode: `iam-broker serve` without static AWS keys, its credentials from a
//! `credential_process` profile (what IAM Roles Anywhere's `aws_signing_helper
//! credential-process` is), which the AWS SDK for Rust really runs. moto enforces IAM, so the
//! broker works only with the credentials the process printed.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use iam_broker_tests::moto_iam::MotoIam;
use iam_broker_tests::{Env, Moto, Server, Tables, allow, mint_token};

const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";

/// A `credential_process` that counts its runs in `runs` and prints these credentials in the
/// process-credentials format (`Version: 1`), as `aws_signing_helper credential-process` does.
fn credential_process(dir: &Path, key: &str, secret: &str) -> std::path::PathBuf {
    let runs = dir.join("runs");
    let script = dir.join("signing-helper.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho run >> '{}'\n\
             printf '{{\"Version\":1,\"AccessKeyId\":\"%s\",\"SecretAccessKey\":\"%s\",\
             \"Expiration\":\"%s\"}}' '{key}' '{secret}' \"$(date -u -d '+1 hour' +%Y-%m-%dT%H:%M:%SZ)\"\n",
            runs.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
    let config = dir.join("config");
    std::fs::write(
        &config,
        format!(
            "[profile roles-anywhere]\ncredential_process = {}\n",
            script.display()
        ),
    )
    .unwrap();
    config
}

fn runs(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("runs"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// `serve`'s environment: the profile, and no key of any kind.
fn keyless(env: &Env, config: &Path) -> Env {
    env.clone()
        .without("AWS_ACCESS_KEY_ID")
        .without("AWS_SECRET_ACCESS_KEY")
        .set("AWS_CONFIG_FILE", config.to_string_lossy())
        .set("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .set("AWS_PROFILE", "roles-anywhere")
}

#[tokio::test]
async fn serve_runs_on_credentials_from_a_credential_process_and_needs_no_static_key() {
    let moto = Moto::start().await.unwrap();
    let tables = Tables::create(&moto.sdk_config().await, "keyless")
        .await
        .unwrap();
    let env = moto.env().tables(&tables);
    allow(&env, "team-a", "app", ROLE).await.unwrap();
    let token = mint_token(&env, "team-a", "app", ROLE).await.unwrap();
    let iam = MotoIam::new(&moto.endpoint);
    let (key, secret) = iam
        .user("broker", &["dynamodb:*", "sts:AssumeRole"])
        .await
        .unwrap();
    moto.enforce_iam().await.unwrap();

    // GIVEN serve with a credential_process profile printing the broker user's credentials
    let good = tempfile::tempdir().unwrap();
    let config = credential_process(good.path(), &key, &secret);
    let server = Server::start(&keyless(&env, &config)).await.unwrap();
    // WHEN a pod fetches THEN it is served, with credentials only the process could give
    let answer = server.get("/", Some(&token)).await.unwrap();
    assert_eq!(answer.status, 200, "{:?}\n{}", answer.json, server.log());
    assert!(runs(good.path()) >= 1, "the SDK ran the credential process");
    assert!(
        !server.log().contains(&secret),
        "the process's secret is never logged"
    );
    drop(server);

    // The same with a process that prints credentials IAM does not know: no access at all.
    let bad = tempfile::tempdir().unwrap();
    let config = credential_process(bad.path(), "AKIAUNKNOWN000000000", "wrong");
    let server = Server::start(&keyless(&env, &config)).await.unwrap();
    let answer = server.get("/", Some(&token)).await.unwrap();
    assert_ne!(answer.status, 200, "{:?}", answer.json);
    assert!(runs(bad.path()) >= 1);
}
