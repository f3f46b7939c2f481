//! End to end with real SDK consumers: moto + `iam-broker serve` + `iam-broker-proxy`, and an
//! application that knows nothing but the container-credentials variables — the AWS CLI
//! (botocore's container provider), the AWS SDK for Rust (`sdk-whoami`) and the AWS SDK for
//! JavaScript v3 (`tests/js/whoami.mjs`) — each reporting the assumed role through
//! `sts:GetCallerIdentity`.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines};

use iam_broker_tests::proxy::{Proxy, arn_of, aws_cli, container_env, node_whoami, run};
use iam_broker_tests::{CliOutput, Env, Moto, Server, Tables, allow, binary, mint_token};

const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";
/// What moto's GetCallerIdentity reports for a session of ROLE.
const ASSUMED: &str = "arn:aws:sts::123456789012:assumed-role/s3_reader/";

struct World {
    moto: Moto,
    server: Server,
    proxy: Proxy,
    token: String,
    dir: tempfile::TempDir,
}

async fn world() -> World {
    world_with(Env::new()).await
}

/// [`world`] with extra broker settings.
async fn world_with(extra: Env) -> World {
    let moto = Moto::start().await.unwrap();
    let tables = Tables::create(&moto.sdk_config().await, "sdk")
        .await
        .unwrap();
    let mut env = moto.env().tables(&tables);
    for (name, value) in extra.pairs() {
        env = env.set(name, value);
    }
    allow(&env, "team-a", "app", ROLE).await.unwrap();
    let token = mint_token(&env, "team-a", "app", ROLE).await.unwrap();
    let server = Server::start(&env).await.unwrap();
    let proxy = Proxy::start(&server.url).await.unwrap();
    World {
        moto,
        server,
        proxy,
        token,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl World {
    /// The environment of an injected container, the token given either way.
    fn app_env(&self, token_as_file: bool) -> Env {
        let env = container_env(&self.moto.endpoint, &self.proxy.url);
        if token_as_file {
            // As the Secret volume mounts it: the value, no trailing newline.
            let path = self.dir.path().join("token");
            std::fs::write(&path, &self.token).unwrap();
            env.set(
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                path.to_string_lossy(),
            )
        } else {
            env.set("AWS_CONTAINER_AUTHORIZATION_TOKEN", &self.token)
        }
    }

    /// Nothing any process logged holds the token or a secret key.
    async fn assert_logs_clean(self, outputs: &[&CliOutput]) {
        let proxy_log = self.proxy.stop().await;
        let server_log = self.server.stop().await;
        for (name, text) in [("proxy", &proxy_log), ("server", &server_log)] {
            assert!(!text.contains(&self.token), "{name} log holds the token");
            assert!(
                !text.contains("SecretAccessKey"),
                "{name} log holds a secret"
            );
        }
        for out in outputs {
            assert!(!out.stderr.contains(&self.token));
        }
    }
}

#[tokio::test]
async fn aws_cli_gets_the_assumed_role_through_the_proxy() {
    // GIVEN an allowed token, the broker and the sidecar proxy
    let w = world().await;
    let args = ["sts", "get-caller-identity", "--output", "json"];

    // WHEN the AWS CLI runs with the token in AWS_CONTAINER_AUTHORIZATION_TOKEN
    let with_env = run(&aws_cli(), &w.app_env(false), &args).await.unwrap();
    // THEN it is the assumed role, with a session naming the pod
    let arn = arn_of(&with_env);
    assert!(arn.starts_with(ASSUMED), "{arn}");
    assert!(arn.ends_with("team-a_app_web-1"), "{arn}");

    // WHEN it runs with the token in a file (AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE)
    let with_file = run(&aws_cli(), &w.app_env(true), &args).await.unwrap();
    assert!(arn_of(&with_file).starts_with(ASSUMED));

    // AND without any token it gets nothing (the proxy's cache is per token)
    let anonymous = run(
        &aws_cli(),
        &container_env(&w.moto.endpoint, &w.proxy.url),
        &args,
    )
    .await
    .unwrap();
    assert!(!anonymous.success, "{}", anonymous.stdout);
    w.assert_logs_clean(&[&with_env, &with_file, &anonymous])
        .await;
}

#[tokio::test]
async fn aws_sdk_for_rust_gets_the_assumed_role_through_the_proxy() {
    let w = world().await;
    let whoami = binary("sdk-whoami").unwrap();
    for token_as_file in [false, true] {
        // WHEN an application on the Rust SDK's default chain starts in the container
        let out = run(&whoami, &w.app_env(token_as_file), &[]).await.unwrap();
        // THEN the container provider fetched credentials of the assumed role via the proxy
        let arn = arn_of(&out);
        assert!(arn.starts_with(ASSUMED), "{arn}");
        let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert!(json["AccessKeyId"].as_str().unwrap().starts_with("ASIA"));
        // with an expiry the SDK parsed from the RFC 3339 `Z` timestamp, about an hour away
        let expiry = json["Expiry"].as_u64().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            expiry > now + 3000 && expiry <= now + 3600,
            "{expiry} vs {now}"
        );
    }
    // AND a wrong token is refused (no cached credentials leak to it)
    let wrong = run(
        &whoami,
        &container_env(&w.moto.endpoint, &w.proxy.url).set(
            "AWS_CONTAINER_AUTHORIZATION_TOKEN",
            "iamb_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ),
        &[],
    )
    .await
    .unwrap();
    assert!(!wrong.success, "{}", wrong.stdout);
    w.assert_logs_clean(&[&wrong]).await;
}

#[tokio::test]
async fn in_cluster_broker_over_https_with_a_private_ca() {
    // GIVEN `iam-broker serve --tls-cert --tls-key` with a certificate from a private CA
    let moto = Moto::start().await.unwrap();
    let tables = Tables::create(&moto.sdk_config().await, "tls")
        .await
        .unwrap();
    let env = moto.env().tables(&tables);
    allow(&env, "team-a", "app", ROLE).await.unwrap();
    let token = mint_token(&env, "team-a", "app", ROLE).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = iam_broker_testkit::kube_api::test_certificates().unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let server = Server::start_tls(&env, &cert_path, &key_path, &ca)
        .await
        .unwrap();
    assert!(server.url.starts_with("https://"));

    // WHEN the sidecar trusts the private CA (BROKER_CA_PEM, as the webhook injects it)
    let proxy = Proxy::start_with(&server.url, Env::new().set("BROKER_CA_PEM", &ca))
        .await
        .unwrap();
    let app =
        container_env(&moto.endpoint, &proxy.url).set("AWS_CONTAINER_AUTHORIZATION_TOKEN", &token);
    let out = run(
        &aws_cli(),
        &app,
        &["sts", "get-caller-identity", "--output", "json"],
    )
    .await
    .unwrap();
    // THEN the AWS CLI gets the assumed role over HTTPS end to end
    assert!(arn_of(&out).starts_with(ASSUMED));

    // AND a sidecar that does not trust the CA refuses the broker (502, nothing served)
    let untrusting = Proxy::start(&server.url).await.unwrap();
    let refused = run(
        &aws_cli(),
        &container_env(&moto.endpoint, &untrusting.url)
            .set("AWS_CONTAINER_AUTHORIZATION_TOKEN", &token),
        &["sts", "get-caller-identity"],
    )
    .await
    .unwrap();
    assert!(!refused.success);
    let log = untrusting.stop().await;
    assert!(log.contains("broker call failed"), "{log}");
}

#[tokio::test]
async fn fifteen_minute_credentials_do_not_send_every_boto3_call_to_sts() {
    // CREDENTIAL_DURATION_SECONDS=900, STS's shortest: botocore, seeing under 15 minutes left,
    // refreshes before every call. Before issue 12 the sidecar never cached such credentials and
    // each of those refreshes became a broker call and an AssumeRole (20 calls: 21).
    let w = world_with(Env::new().set("CREDENTIAL_DURATION_SECONDS", "900")).await;
    let python = iam_broker_tests::workspace_root().join(".venv/bin/python");
    let script = r#"
import boto3
sts = boto3.client("sts")
arns = {sts.get_caller_identity()["Arn"] for _ in range(20)}
print(len(arns), sorted(arns)[0])
"#;
    let out = run(&python, &w.app_env(false), &["-c", script])
        .await
        .unwrap();
    assert!(out.success, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .starts_with("1 arn:aws:sts::123456789012:assumed-role/s3_reader/")
    );
    let served = w.server.log().matches("credentials served").count();
    assert_eq!(
        served, 1,
        "20 boto3 calls, one broker call (one AssumeRole)"
    );
    w.assert_logs_clean(&[&out]).await;
}

#[tokio::test]
async fn aws_sdk_for_js_gets_the_assumed_role_through_the_proxy() {
    // GIVEN an allowed token, the broker and the sidecar proxy
    let w = world().await;
    let (node, whoami) = node_whoami();
    let mut outputs = Vec::new();
    for token_as_file in [false, true] {
        // WHEN an application on the JavaScript SDK's default chain starts in the container
        let out = run(&node, &w.app_env(token_as_file), &[whoami.as_str()])
            .await
            .unwrap();
        // THEN its HTTP provider fetched credentials of the assumed role via the proxy
        let arn = arn_of(&out);
        assert!(arn.starts_with(ASSUMED), "{arn}");
        let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert!(json["AccessKeyId"].as_str().unwrap().starts_with("ASIA"));
        outputs.push(out);
    }

    // WHEN one process has fetched, its token file is replaced by a token nobody issued, and it
    // fetches again past the SDK's cache
    let mut command = tokio::process::Command::new(&node);
    command.args([whoami.as_str(), "twice"]);
    w.app_env(true).apply(&mut command);
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = next_line(&mut stdout).await;
    assert!(first.starts_with("first ASIA"), "{first}");
    let refusals = || {
        w.proxy
            .log()
            .matches("the broker refused the token")
            .count()
    };
    let refused_before = refusals();
    std::fs::write(
        w.dir.path().join("token"),
        "iamb_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    )
    .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    drop(stdin);
    let second = next_line(&mut stdout).await;
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let twice = CliOutput {
        success: output.status.success(),
        stdout: format!("{first}\n{second}"),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        code: output.status.code(),
    };
    // THEN the second fetch read the file again and sent its token, which the broker refused
    // (the SDK's chain reports only that no provider answered)
    assert!(!twice.success && second.is_empty(), "{second}");
    assert!(
        twice.stderr.contains("Could not load credentials"),
        "{}",
        twice.stderr
    );
    // (its HTTP provider tries four times, a second apart, a 403 as any failure)
    assert!(refusals() > refused_before, "{}", w.proxy.log());
    outputs.push(twice);
    w.assert_logs_clean(&outputs.iter().collect::<Vec<_>>())
        .await;
}

#[tokio::test]
async fn aws_sdk_for_js_fetches_from_the_broker_over_https_with_a_private_ca() {
    // GIVEN `iam-broker serve` over HTTPS with a certificate from a private CA, and no sidecar
    let moto = Moto::start().await.unwrap();
    let tables = Tables::create(&moto.sdk_config().await, "js-tls")
        .await
        .unwrap();
    let env = moto.env().tables(&tables);
    allow(&env, "team-a", "app", ROLE).await.unwrap();
    let token = mint_token(&env, "team-a", "app", ROLE).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = iam_broker_testkit::kube_api::test_certificates().unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    std::fs::write(&ca_path, &ca).unwrap();
    let server = Server::start_tls(&env, &cert_path, &key_path, &ca)
        .await
        .unwrap();
    assert!(server.url.starts_with("https://"));
    let (node, whoami) = node_whoami();
    // The container-credentials variables name the broker itself: the SDK fetches over HTTPS.
    let app =
        container_env(&moto.endpoint, &server.url).set("AWS_CONTAINER_AUTHORIZATION_TOKEN", &token);

    // WHEN the application trusts the private CA through NODE_EXTRA_CA_CERTS
    let trusting = app
        .clone()
        .set("NODE_EXTRA_CA_CERTS", ca_path.to_string_lossy());
    let out = run(&node, &trusting, &[whoami.as_str()]).await.unwrap();
    // THEN the JavaScript SDK gets the assumed role straight from the broker
    let arn = arn_of(&out);
    assert!(arn.starts_with(ASSUMED), "{arn}");

    // AND without the CA it refuses the broker's certificate and gets nothing
    let refused = run(&node, &app, &[whoami.as_str()]).await.unwrap();
    assert!(!refused.success, "{}", refused.stdout);
    assert!(refused.stderr.contains("certificate"), "{}", refused.stderr);
    let log = server.stop().await;
    for text in [&log, &out.stderr, &refused.stderr] {
        assert!(!text.contains(&token), "{text}");
    }
}

/// The next line a child printed (empty at its end), within a minute.
async fn next_line(lines: &mut Lines<impl AsyncBufRead + Unpin>) -> String {
    tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap_or_default()
}
