//! End to end with real SDK consumers: moto + `iam-broker serve` + `iam-broker-proxy`, and an
//! application that knows nothing but the container-credentials variables — the AWS CLI
//! (botocore's container provider) and the AWS SDK for Rust (`sdk-whoami`) — each reporting the
//! assumed role through `sts:GetCallerIdentity`.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use iam_broker_tests::proxy::{Proxy, arn_of, aws_cli, container_env, run};
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
