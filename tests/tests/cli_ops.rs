//! The operations commands of `iam-broker`, run as a real process against moto and the
//! Kubernetes API stand-in: render-webhook, credentials, sweep, kubeconfig, doctor.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine as _;
use iam_broker_testkit::kube_api::{DEFAULT_TOKEN, KubeApi};
use iam_broker_tests::{
    CliOutput, Env, Moto, Server, Tables, allow, cli, cli_with_stdin, mint_token, workspace_root,
};
use serde_json::json;

const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";
const EXAMPLE_URL: &str = "https://API_ID.execute-api.REGION.amazonaws.com/Prod/mutate/YOUR_WEBHOOK_PATH_SECRET_OF_43_CHARACTERS";

fn ok(out: &CliOutput) {
    assert!(
        out.success,
        "stdout: {}\nstderr: {}",
        out.stdout, out.stderr
    );
}

#[tokio::test]
async fn render_webhook_matches_the_committed_example_and_refuses_plain_http() {
    let out = cli(&Env::new(), &["render-webhook", "--url", EXAMPLE_URL])
        .await
        .unwrap();
    ok(&out);
    let example = std::fs::read_to_string(
        workspace_root().join("deploy/overlays/secret/30-mutatingwebhook.example.yaml"),
    )
    .unwrap();
    let body: String = example
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        out.stdout, body,
        "deploy/overlays/secret/30-mutatingwebhook.example.yaml is stale"
    );

    let fail = cli(
        &Env::new(),
        &[
            "render-webhook",
            "--url",
            "https://iam-broker.iam-broker.svc/mutate",
            "--failure-policy",
            "fail",
            "--timeout-seconds",
            "5",
            "--exclude-namespace",
            "ops",
        ],
    )
    .await
    .unwrap();
    ok(&fail);
    assert!(fail.stdout.contains("failurePolicy: Fail"));
    assert!(fail.stdout.contains("timeoutSeconds: 5"));
    assert!(
        fail.stdout.contains("values:\n            - ops\n"),
        "{}",
        fail.stdout
    );

    let plain = cli(&Env::new(), &["render-webhook", "--url", "http://x/"])
        .await
        .unwrap();
    assert!(!plain.success);
    assert!(
        plain.stderr.contains("must be https://"),
        "{}",
        plain.stderr
    );
}

async fn broker_world() -> (Moto, Env, String) {
    let moto = Moto::start().await.unwrap();
    let tables = Tables::create(&moto.sdk_config().await, "ops")
        .await
        .unwrap();
    let env = moto.env().tables(&tables);
    allow(&env, "a", "b", ROLE).await.unwrap();
    let token = mint_token(&env, "a", "b", ROLE).await.unwrap();
    (moto, env, token)
}

#[tokio::test]
async fn credentials_checks_a_broker_without_printing_secrets() {
    let (_moto, env, token) = broker_world().await;
    let server = Server::start(&env).await.unwrap();
    let with_token = Env::new().set("IAM_BROKER_TOKEN", &token);
    let out = cli(&with_token, &["credentials", "--url", &server.url])
        .await
        .unwrap();
    ok(&out);
    assert!(out.stdout.contains(ROLE), "{}", out.stdout);
    assert!(out.stdout.contains("max-age="));
    assert!(!out.stdout.contains("SecretAccessKey"));
    // the token on stdin, JSON out: the broker's answer as is
    let json = cli_with_stdin(
        &Env::new(),
        &[
            "credentials",
            "--url",
            &server.url,
            "--token-stdin",
            "--output",
            "json",
        ],
        Some(&token),
    )
    .await
    .unwrap();
    ok(&json);
    let body: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(body["RoleArn"], ROLE);
    // a wrong token is a clear error
    let wrong = cli(
        &Env::new().set(
            "IAM_BROKER_TOKEN",
            "iamb_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ),
        &["credentials", "--url", &server.url],
    )
    .await
    .unwrap();
    assert!(!wrong.success);
    assert!(
        wrong.stderr.contains("403") && wrong.stderr.contains("InvalidToken"),
        "{}",
        wrong.stderr
    );
    let none = cli(&Env::new(), &["credentials", "--url", &server.url])
        .await
        .unwrap();
    assert!(
        !none.success && none.stderr.contains("IAM_BROKER_TOKEN"),
        "{}",
        none.stderr
    );
}

#[tokio::test]
async fn sweep_removes_a_secret_whose_record_is_gone() {
    let (_moto, env, _token) = broker_world().await;
    let api = KubeApi::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), DEFAULT_TOKEN).unwrap();
    api.put(
        "secrets",
        "a",
        "iam-broker-token-0123456789abcdef",
        json!({ "metadata": { "labels": { "app.kubernetes.io/managed-by": "iam-broker" },
            "annotations": { "iam-broker.io/token-hash": "0".repeat(64) },
            "creationTimestamp": "2020-01-01T00:00:00Z" } }),
    );
    let env = env.set("KUBECONFIG", kubeconfig.to_string_lossy());
    let out = cli(&env, &["sweep"]).await.unwrap();
    ok(&out);
    assert!(out.stdout.contains("secrets deleted: 1"), "{}", out.stdout);
    assert!(
        api.secret("a", "iam-broker-token-0123456789abcdef")
            .is_none()
    );
    // the CLI-made token (no Secret) is not an orphan
    let tokens = cli(&env, &["token", "list", "--output", "json"])
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&tokens.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn kubeconfig_is_built_from_the_service_account_secret_and_stored_in_ssm() {
    // GIVEN the webhook's token Secret in the cluster and an admin kubeconfig
    let moto = Moto::start().await.unwrap();
    let api = KubeApi::start().await.unwrap();
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    api.put(
        "secrets",
        "iam-broker",
        "iam-broker-webhook-token",
        json!({ "type": "kubernetes.io/service-account-token",
            "metadata": { "annotations": { "kubernetes.io/service-account.name": "iam-broker-webhook" } },
            "data": { "token": b64("webhook-sa-token"), "ca.crt": b64(&api.ca_pem) } }),
    );
    let dir = tempfile::tempdir().unwrap();
    let admin = api.write_kubeconfig(dir.path(), DEFAULT_TOKEN).unwrap();
    let env = moto.env().set("KUBECONFIG", admin.to_string_lossy());

    // WHEN it is built and stored
    let out = cli(
        &env,
        &[
            "kubeconfig",
            "--from-secret",
            "iam-broker/iam-broker-webhook-token",
            "--store",
            "/iam-broker/webhook-kubeconfig",
        ],
    )
    .await
    .unwrap();
    ok(&out);
    assert!(
        !out.stdout.contains("webhook-sa-token"),
        "the token is not printed when stored"
    );

    // THEN the stored kubeconfig reaches the API server as the webhook's ServiceAccount
    let stored = iam_broker_kube::kubeconfig_from_ssm(
        &aws_sdk_ssm::Client::new(&moto.sdk_config().await),
        "/iam-broker/webhook-kubeconfig",
    )
    .await
    .unwrap();
    assert!(stored.contains("token: webhook-sa-token\n"), "{stored}");
    assert!(stored.contains(&api.url));
    api.set_tokens(&["webhook-sa-token"]);
    let cluster = iam_broker_kube::KubeCluster::new(
        iam_broker_kube::ClientSource::Kubeconfig(stored),
        std::time::Duration::from_secs(3),
    );
    use iam_broker_kernel::ports::Cluster as _;
    assert!(cluster.service_account("a", "b").await.unwrap().is_none());

    // AND without --store it prints; a missing source is a usage error
    let missing = cli(&env, &["kubeconfig"]).await.unwrap();
    assert!(
        !missing.success && missing.stderr.contains("--from-secret"),
        "{}",
        missing.stderr
    );
}

#[tokio::test]
async fn doctor_reports_each_check_and_fails_on_missing_rbac() {
    let moto = Moto::start().await.unwrap();
    let tables = Tables::create(&moto.sdk_config().await, "doc")
        .await
        .unwrap();
    let api = KubeApi::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), DEFAULT_TOKEN).unwrap();
    let env = moto
        .env()
        .tables(&tables)
        .set("KUBECONFIG", kubeconfig.to_string_lossy())
        .set("PROXY_IMAGE", "registry.example/iam-broker-proxy:1");
    let healthy = cli(&env, &["doctor"]).await.unwrap();
    ok(&healthy);
    assert_eq!(
        healthy.stdout.matches("ok    ").count(),
        5 + iam_broker_kube::REQUIRED_PERMISSIONS.len(),
        "{}",
        healthy.stdout
    );

    api.deny("list", "secrets");
    let broken = cli(&env.clone().set("ALLOWANCES_TABLE", "nope"), &["doctor"])
        .await
        .unwrap();
    assert!(!broken.success);
    assert!(
        broken
            .stdout
            .contains("FAIL  Allowances table: table nope does not exist"),
        "{}",
        broken.stdout
    );
    assert!(
        broken.stdout.contains("FAIL  Kubernetes RBAC list secrets"),
        "{}",
        broken.stdout
    );
    assert!(
        broken
            .stdout
            .contains("ok    Kubernetes RBAC get serviceaccounts")
    );
}

#[tokio::test]
async fn tables_create_is_idempotent_and_makes_the_designed_keys() {
    use iam_broker_aws::TableRole;
    use iam_broker_aws::schema::check_table;
    let moto = Moto::start().await.unwrap();
    let env = moto
        .env()
        .set("ALLOWANCES_TABLE", "t-allowances")
        .set("AUTHORIZATIONS_TABLE", "t-authorizations");
    for _ in 0..2 {
        ok(&cli(&env, &["tables", "create"]).await.unwrap());
    }
    let dynamodb = aws_sdk_dynamodb::Client::new(&moto.sdk_config().await);
    check_table(&dynamodb, "t-allowances", TableRole::Allowances)
        .await
        .unwrap();
    check_table(&dynamodb, "t-authorizations", TableRole::Authorizations)
        .await
        .unwrap();
    // and the check itself notices a wrong schema
    let wrong = check_table(&dynamodb, "t-allowances", TableRole::Authorizations).await;
    assert_eq!(
        wrong.unwrap_err().to_string(),
        "its keys are namespace (HASH), service_account (RANGE), expected token_hash (HASH)"
    );
}

// ---- doctor: each cause once; the kubeconfig parameter missing vs denied (issue 13, item 7) ----

#[tokio::test]
async fn doctor_says_an_unreachable_aws_once_and_skips_what_depends_on_it() {
    let closed = format!(
        "http://127.0.0.1:{}",
        iam_broker_tests::free_port().unwrap()
    );
    let env = Env::new()
        .set("AWS_ENDPOINT_URL", &closed)
        .set("AWS_REGION", iam_broker_tests::REGION)
        .set("AWS_ACCESS_KEY_ID", iam_broker_tests::MOTO_ACCESS_KEY)
        .set("AWS_SECRET_ACCESS_KEY", iam_broker_tests::MOTO_SECRET_KEY)
        .set("KUBECONFIG_PARAMETER", "/iam-broker/kubeconfig")
        .set("PROXY_IMAGE", "registry.example/iam-broker-proxy:1");
    let out = cli(&env, &["doctor"]).await.unwrap();
    assert!(!out.success);
    assert!(
        out.stdout.contains(&format!(
            "FAIL  STS: cannot reach STS at {closed} (from AWS_ENDPOINT_URL): check AWS_ENDPOINT_URL"
        )),
        "{}",
        out.stdout
    );
    assert_eq!(
        out.stdout.matches("cannot reach").count(),
        1,
        "{}",
        out.stdout
    );
    for check in [
        "Allowances table",
        "Authorizations table",
        "kubeconfig parameter",
    ] {
        assert!(
            out.stdout.contains(&format!(
                "skip  {check}: because AWS is unreachable at {closed} (see above)"
            )),
            "{check}: {}",
            out.stdout
        );
    }
    assert_eq!(
        out.stdout.matches("(see above)").count(),
        3 + iam_broker_kube::REQUIRED_PERMISSIONS.len(),
        "three AWS checks and every RBAC check are skipped: {}",
        out.stdout
    );
    assert!(
        out.stdout.contains(
            "skip  Kubernetes RBAC list secrets: because the kubeconfig parameter \
             /iam-broker/kubeconfig was not read (see above)"
        ),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("ok    sidecar image"), "{}", out.stdout);
}

#[tokio::test]
async fn doctor_tells_a_missing_kubeconfig_parameter_from_a_denied_one() {
    let moto = Moto::start().await.unwrap();
    let sdk = moto.sdk_config().await;
    let tables = Tables::create(&sdk, "kcp").await.unwrap();
    let env = moto
        .env()
        .tables(&tables)
        .set("PROXY_IMAGE", "registry.example/iam-broker-proxy:1");

    // GIVEN no parameter at all
    let missing = cli(
        &env.clone()
            .set("KUBECONFIG_PARAMETER", "/iam-broker/missing"),
        &["doctor"],
    )
    .await
    .unwrap();
    assert!(!missing.success);
    assert!(
        missing.stdout.contains(
            "FAIL  kubeconfig parameter: the kubeconfig parameter /iam-broker/missing does not \
             exist in us-east-1: store it with `iam-broker kubeconfig --from-secret NS/NAME \
             --store /iam-broker/missing`"
        ),
        "{}",
        missing.stdout
    );
    assert!(
        missing.stdout.contains(
            "skip  Kubernetes RBAC get serviceaccounts: because the kubeconfig parameter \
             /iam-broker/missing cannot be read (see above)"
        ),
        "{}",
        missing.stdout
    );
    assert!(!missing.stdout.contains("denied"), "{}", missing.stdout);

    // GIVEN the parameter, and an identity that may use DynamoDB but not SSM
    aws_sdk_ssm::Client::new(&sdk)
        .put_parameter()
        .name("/iam-broker/kubeconfig")
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .value("apiVersion: v1")
        .send()
        .await
        .unwrap();
    let (key, secret) = iam_broker_tests::moto_iam::MotoIam::new(&moto.endpoint)
        .user("doctor", &["dynamodb:*", "sts:GetCallerIdentity"])
        .await
        .unwrap();
    moto.enforce_iam().await.unwrap();
    let denied = cli(
        &env.clone()
            .set("KUBECONFIG_PARAMETER", "/iam-broker/kubeconfig")
            .set("AWS_ACCESS_KEY_ID", &key)
            .set("AWS_SECRET_ACCESS_KEY", &secret),
        &["doctor"],
    )
    .await
    .unwrap();
    assert!(!denied.success);
    assert!(
        denied.stdout.contains(
            "FAIL  kubeconfig parameter: reading the kubeconfig parameter /iam-broker/kubeconfig \
             was denied: this identity needs ssm:GetParameter on it, and kms:Decrypt on its KMS key"
        ),
        "{}",
        denied.stdout
    );
    assert!(
        denied.stdout.contains("ok    Allowances table"),
        "{}",
        denied.stdout
    );
    assert!(
        !denied.stdout.contains("does not exist"),
        "{}",
        denied.stdout
    );
}
