//! The `iam-broker` administration commands, run as a user would, against moto.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use iam_broker_tests::{Env, Moto, Tables, cli};

const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";

async fn env() -> (Moto, Env) {
    let moto = Moto::start().await.unwrap();
    let tables = Tables::create(&moto.sdk_config().await, "cli")
        .await
        .unwrap();
    let env = moto.env().tables(&tables);
    (moto, env)
}

#[tokio::test]
async fn allowances_round_trip_as_json() {
    let (_moto, env) = env().await;
    for sa in ["app", "*"] {
        let out = cli(
            &env,
            &[
                "allow",
                "--namespace",
                "team-a",
                "--service-account",
                sa,
                "--role",
                ROLE,
            ],
        )
        .await
        .unwrap();
        assert!(out.success, "{}", out.stderr);
        assert!(out.stdout.contains(ROLE));
    }
    let out = cli(&env, &["allowances", "--output", "json"])
        .await
        .unwrap();
    assert!(out.success, "{}", out.stderr);
    let rows: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        rows,
        serde_json::json!([
            {"namespace": "team-a", "service_account": "*", "allowed_roles": [ROLE]},
            {"namespace": "team-a", "service_account": "app", "allowed_roles": [ROLE]},
        ])
    );
    let table = cli(&env, &["allowances", "--namespace", "team-a"])
        .await
        .unwrap();
    assert!(table.success);
    assert_eq!(
        table.stdout.lines().count(),
        3,
        "header and two rows:\n{}",
        table.stdout
    );
    let none = cli(
        &env,
        &["allowances", "--namespace", "nobody", "--output", "json"],
    )
    .await
    .unwrap();
    assert_eq!(none.stdout.trim(), "[]");
}

#[tokio::test]
async fn tokens_are_listed_by_hash_and_revoked_by_hash() {
    let (_moto, env) = env().await;
    let created = cli(
        &env,
        &[
            "token",
            "create",
            "--namespace",
            "team-a",
            "--service-account",
            "app",
            "--role",
            ROLE,
        ],
    )
    .await
    .unwrap();
    assert!(created.success, "{}", created.stderr);
    let token = created.stdout.trim().to_owned();
    assert!(
        created.stderr.contains("warning: no allowance"),
        "creating a token nobody allows warns: {}",
        created.stderr
    );

    let listed = cli(&env, &["token", "list", "--output", "json"])
        .await
        .unwrap();
    assert!(listed.success, "{}", listed.stderr);
    assert!(
        !listed.stdout.contains(&token),
        "listings never show tokens"
    );
    let rows: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    let hash = rows[0]["token_hash"].as_str().unwrap().to_owned();
    assert_eq!(
        hash,
        iam_broker_kernel::Token::parse(&token)
            .unwrap()
            .hash()
            .as_str()
    );
    assert_eq!(rows[0]["role_arn"], ROLE);

    let revoked = cli(&env, &["token", "revoke", "--hash", &hash])
        .await
        .unwrap();
    assert!(revoked.success, "{}", revoked.stderr);
    let again = cli(&env, &["token", "revoke", "--hash", &hash])
        .await
        .unwrap();
    assert!(!again.success);
    assert!(
        again.stderr.contains("no token with hash"),
        "{}",
        again.stderr
    );
}

#[tokio::test]
async fn bad_input_gets_a_clear_message_and_writes_nothing() {
    let (_moto, env) = env().await;
    for (args, expected) in [
        (
            vec![
                "allow",
                "--namespace",
                "team-a",
                "--service-account",
                "app",
                "--role",
                "s3_reader",
            ],
            "role ARN \"s3_reader\" is not valid",
        ),
        (
            vec![
                "allow",
                "--namespace",
                "Team_A",
                "--service-account",
                "app",
                "--role",
                ROLE,
            ],
            "namespace \"Team_A\" is not valid",
        ),
        (
            vec![
                "token",
                "create",
                "--namespace",
                "a",
                "--service-account",
                "*",
                "--role",
                ROLE,
            ],
            "service account \"*\" is not valid",
        ),
        (
            vec!["token", "revoke", "--hash", "abc"],
            "is not a token hash",
        ),
    ] {
        let out = cli(&env, &args).await.unwrap();
        assert!(!out.success, "{args:?} should fail");
        assert!(out.stderr.contains(expected), "{args:?}: {}", out.stderr);
    }
    let rows = cli(&env, &["allowances", "--output", "json"])
        .await
        .unwrap();
    assert_eq!(rows.stdout.trim(), "[]");
    let tokens = cli(&env, &["token", "list", "--output", "json"])
        .await
        .unwrap();
    assert_eq!(tokens.stdout.trim(), "[]");
}

#[tokio::test]
async fn bad_configuration_names_the_variable() {
    let (_moto, env) = env().await;
    for (name, value) in [
        ("CREDENTIAL_DURATION_SECONDS", "7200"),
        ("TOKEN_TTL_DAYS", "zero"),
        ("ALLOWANCES_TABLE", "has space"),
    ] {
        let out = cli(&env.clone().set(name, value), &["allowances"])
            .await
            .unwrap();
        assert!(!out.success);
        assert!(
            out.stderr
                .contains(&format!("invalid configuration: {name}:")),
            "{name}: {}",
            out.stderr
        );
        let served = cli(
            &env.clone().set(name, value),
            &["serve", "--listen", "127.0.0.1:0"],
        )
        .await
        .unwrap();
        assert!(!served.success, "serve refuses to start with bad {name}");
        assert!(served.stderr.contains(name), "{}", served.stderr);
    }
}

#[tokio::test]
async fn help_describes_every_command() {
    let out = cli(&Env::new(), &["--help"]).await.unwrap();
    assert!(out.success);
    for command in [
        "serve",
        "allow",
        "disallow",
        "allowances",
        "token",
        "tables",
        "render-webhook",
        "credentials",
        "sweep",
        "kubeconfig",
        "doctor",
    ] {
        assert!(
            out.stdout.contains(command),
            "{command} missing from --help"
        );
        if command != "token" && command != "tables" {
            let sub = cli(&Env::new(), &[command, "--help"]).await.unwrap();
            assert!(
                sub.success && sub.stdout.contains("Usage"),
                "{command} --help"
            );
        }
    }
}

// ---- Errors that name the fix (issue 13, item 7) ----

/// Every line of an error reads once: no `Debug` dump, and no part of anyhow's `a: b: c` chain
/// twice.
fn assert_reads_once(stderr: &str) {
    for dump in ["{ ", "Some(", "ServiceError", "DispatchFailure"] {
        assert!(!stderr.contains(dump), "a Debug dump ({dump}) in: {stderr}");
    }
    for line in stderr.lines() {
        let parts: Vec<&str> = line.split(": ").collect();
        for (i, part) in parts.iter().enumerate() {
            assert!(
                !parts[i + 1..].contains(part),
                "{part:?} is said twice in: {line}"
            );
        }
    }
}

/// AWS credentials and nothing else: no region, no profile (no HOME), no instance metadata.
fn keys_only() -> Env {
    Env::new()
        .set("AWS_ACCESS_KEY_ID", iam_broker_tests::MOTO_ACCESS_KEY)
        .set("AWS_SECRET_ACCESS_KEY", iam_broker_tests::MOTO_SECRET_KEY)
        .set("AWS_EC2_METADATA_DISABLED", "true")
}

#[tokio::test]
async fn no_region_says_set_aws_region() {
    let out = cli(&keys_only(), &["allowances"]).await.unwrap();
    assert!(!out.success);
    assert!(
        out.stderr
            .contains("no AWS region is set: set AWS_REGION (for example AWS_REGION=us-east-1)"),
        "{}",
        out.stderr
    );
    assert_eq!(
        out.stderr.matches("AWS_REGION=").count(),
        1,
        "{}",
        out.stderr
    );
    assert_reads_once(&out.stderr);
}

#[tokio::test]
async fn no_credentials_names_the_sources_tried_and_how_to_provide_them() {
    let env = Env::new()
        .set("AWS_REGION", iam_broker_tests::REGION)
        .set("AWS_EC2_METADATA_DISABLED", "true")
        .set("AWS_ENDPOINT_URL", "http://127.0.0.1:9");
    let out = cli(&env, &["token", "list"]).await.unwrap();
    assert!(!out.success);
    for words in [
        "no AWS credentials found",
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "instance metadata",
    ] {
        assert!(out.stderr.contains(words), "{words}: {}", out.stderr);
    }
    assert_reads_once(&out.stderr);
}

#[tokio::test]
async fn an_endpoint_that_is_down_or_not_aws_is_named_with_its_variable() {
    use axum::response::Html;
    // A port nobody listens on, and a web server that answers every call with a page.
    let closed = format!(
        "http://127.0.0.1:{}",
        iam_broker_tests::free_port().unwrap()
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web = format!("http://{}", listener.local_addr().unwrap());
    let page = axum::Router::new().fallback(|| async { Html("<html>It works!</html>") });
    let server = tokio::spawn(async move { axum::serve(listener, page).await });
    let env = keys_only().set("AWS_REGION", iam_broker_tests::REGION);

    for variable in ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_DYNAMODB"] {
        let down = cli(&env.clone().set(variable, &closed), &["allowances"])
            .await
            .unwrap();
        assert!(!down.success);
        assert!(
            down.stderr.contains(&format!(
                "cannot reach DynamoDB at {closed} (from {variable}): check {variable}"
            )),
            "{}",
            down.stderr
        );
        assert_reads_once(&down.stderr);

        let html = cli(&env.clone().set(variable, &web), &["allowances"])
            .await
            .unwrap();
        assert!(!html.success);
        assert!(
            html.stderr.contains(&format!(
                "{web} (from {variable}) answered HTTP 200 (text/html), which is not DynamoDB: \
                 {variable} must name an AWS endpoint"
            )),
            "{}",
            html.stderr
        );
        assert_reads_once(&html.stderr);
    }
    server.abort();
}

#[tokio::test]
async fn a_missing_table_names_the_table_its_variable_and_the_stack_option() {
    let (_moto, env) = env().await;
    let allowances = cli(
        &env.clone().set("ALLOWANCES_TABLE", "no-such-allowances"),
        &["allowances"],
    )
    .await
    .unwrap();
    assert!(!allowances.success);
    assert!(
        allowances.stderr.contains(
            "table no-such-allowances does not exist in us-east-1: set ALLOWANCES_TABLE to the \
             name of the Allowances table, or pass --stack <name> / set IAM_BROKER_STACK"
        ),
        "{}",
        allowances.stderr
    );
    assert_reads_once(&allowances.stderr);

    let tokens = cli(
        &env.clone().set("AUTHORIZATIONS_TABLE", "no-such-tokens"),
        &["token", "list"],
    )
    .await
    .unwrap();
    assert!(!tokens.success);
    assert!(
        tokens
            .stderr
            .contains("table no-such-tokens does not exist in us-east-1: set AUTHORIZATIONS_TABLE"),
        "{}",
        tokens.stderr
    );
    assert_reads_once(&tokens.stderr);
}

#[tokio::test]
async fn a_missing_table_is_still_a_503_for_the_broker_and_its_log_names_the_variable() {
    let (_moto, env) = env().await;
    let token = iam_broker_tests::mint_token(&env, "team-a", "app", ROLE)
        .await
        .unwrap();
    let server =
        iam_broker_tests::Server::start(&env.clone().set("AUTHORIZATIONS_TABLE", "no-such-tokens"))
            .await
            .unwrap();
    let answer = server.get("/", Some(&token)).await.unwrap();
    assert_eq!((answer.status, answer.code()), (503, "ServiceUnavailable"));
    let log = server.stop().await;
    assert!(log.contains("set AUTHORIZATIONS_TABLE"), "{log}");
}

async fn disallow(
    env: &Env,
    service_account: &str,
    role: Option<&str>,
) -> iam_broker_tests::CliOutput {
    let mut args = vec![
        "disallow",
        "--namespace",
        "team-a",
        "--service-account",
        service_account,
    ];
    if let Some(role) = role {
        args.extend(["--role", role]);
    }
    cli(env, &args).await.unwrap()
}

#[tokio::test]
async fn disallow_of_what_is_not_allowed_fails_and_says_so() {
    const OTHER: &str = "arn:aws:iam::123456789012:role/iam-broker/other";
    let (_moto, env) = env().await;
    iam_broker_tests::allow(&env, "team-a", "app", ROLE)
        .await
        .unwrap();
    iam_broker_tests::allow(&env, "team-a", "*", OTHER)
        .await
        .unwrap();

    // a role the row does not hold; the namespace-wide row holds it
    let out = disallow(&env, "app", Some(OTHER)).await;
    assert!(!out.success, "{}", out.stdout);
    assert!(
        out.stderr.contains(&format!(
            "team-a/app is not allowed to assume {OTHER}; it may assume: {ROLE}"
        )),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("--service-account '*'"),
        "{}",
        out.stderr
    );

    // a subject without a row, with and without --role
    let out = disallow(&env, "nobody", Some(ROLE)).await;
    assert!(!out.success);
    assert!(
        out.stderr.contains(&format!(
            "team-a/nobody has no allowance: it is not allowed to assume {ROLE}"
        )),
        "{}",
        out.stderr
    );
    let out = disallow(&env, "nobody", None).await;
    assert!(!out.success);
    assert!(
        out.stderr
            .contains("team-a/nobody has no allowance: there is nothing to disallow"),
        "{}",
        out.stderr
    );

    // nothing changed, and disallowing what is allowed still works
    let rows = cli(&env, &["allowances", "--output", "json"])
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&rows.stdout).unwrap(),
        serde_json::json!([
            {"namespace": "team-a", "service_account": "*", "allowed_roles": [OTHER]},
            {"namespace": "team-a", "service_account": "app", "allowed_roles": [ROLE]},
        ])
    );
    let out = disallow(&env, "app", Some(ROLE)).await;
    assert!(out.success, "{}", out.stderr);
}

/// Puts a token record with a chosen hash straight into the Authorizations table.
async fn put_record(moto: &Moto, table: &str, hash: &str) {
    use aws_sdk_dynamodb::types::AttributeValue;
    use iam_broker_aws::dynamodb::token_attributes as ta;
    let s = |v: &str| AttributeValue::S(v.to_owned());
    let n = |v: i64| AttributeValue::N(v.to_string());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    aws_sdk_dynamodb::Client::new(&moto.sdk_config().await)
        .put_item()
        .table_name(table)
        .item(ta::TOKEN_HASH, s(hash))
        .item(ta::NAMESPACE, s("team-a"))
        .item(ta::SERVICE_ACCOUNT, s("app"))
        .item(ta::ROLE_ARN, s(ROLE))
        .item(ta::CREATED_AT, n(now))
        .item(ta::EXPIRES, n(now + 3600))
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn token_revoke_accepts_the_hash_prefix_token_create_prints() {
    let moto = Moto::start().await.unwrap();
    let tables = Tables::create(&moto.sdk_config().await, "prefix")
        .await
        .unwrap();
    let env = moto.env().tables(&tables);

    // GIVEN a token made by `token create`, which prints its hash prefix
    let created = cli(
        &env,
        &[
            "token",
            "create",
            "--namespace",
            "team-a",
            "--service-account",
            "app",
            "--role",
            ROLE,
        ],
    )
    .await
    .unwrap();
    assert!(created.success, "{}", created.stderr);
    let hash = iam_broker_kernel::Token::parse(created.stdout.trim())
        .unwrap()
        .hash();
    let short = hash.short().to_owned();
    assert!(
        created.stderr.contains(&format!("recorded token {short} ")),
        "{}",
        created.stderr
    );

    // WHEN it is revoked by that prefix THEN it is gone; a second time there is no such token
    let revoked = cli(&env, &["token", "revoke", "--hash", &short])
        .await
        .unwrap();
    assert!(revoked.success, "{}", revoked.stderr);
    assert!(revoked.stdout.contains(&format!("revoked token {short}")));
    let again = cli(&env, &["token", "revoke", "--hash", &short])
        .await
        .unwrap();
    assert!(!again.success);
    assert!(
        again
            .stderr
            .contains(&format!("no token with hash prefix {short}")),
        "{}",
        again.stderr
    );

    // AND a prefix two records share is refused with both candidates listed
    let first = format!("abcdef012345{}", "0".repeat(52));
    let second = format!("abcdef012345{}", "1".repeat(52));
    for hash in [&first, &second] {
        put_record(&moto, &tables.authorizations, hash).await;
    }
    let ambiguous = cli(&env, &["token", "revoke", "--hash", "abcdef012345"])
        .await
        .unwrap();
    assert!(!ambiguous.success);
    assert!(
        ambiguous
            .stderr
            .contains("hash prefix abcdef012345 matches 2 tokens")
            && ambiguous.stderr.contains(&first)
            && ambiguous.stderr.contains(&second),
        "{}",
        ambiguous.stderr
    );

    // AND one more character makes it unique; prefixes shorter than the printed one are refused
    let unique = cli(&env, &["token", "revoke", "--hash", "ABCDEF0123451"])
        .await
        .unwrap();
    assert!(unique.success, "{}", unique.stderr);
    let short_prefix = cli(&env, &["token", "revoke", "--hash", "abcdef01234"])
        .await
        .unwrap();
    assert!(!short_prefix.success);
    assert!(
        short_prefix.stderr.contains("at least the first 12"),
        "{}",
        short_prefix.stderr
    );
    let listed = cli(&env, &["token", "list", "--output", "json"])
        .await
        .unwrap();
    let rows: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_eq!(rows[0]["token_hash"], first.as_str());
}

/// Runs a script of `scripts/` with bash; its exit code, stdout and stderr.
fn script(name: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new("bash")
        .arg(
            iam_broker_tests::workspace_root()
                .join("scripts")
                .join(name),
        )
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn scripts_print_their_usage_on_help_and_refuse_unknown_arguments() {
    for (name, first_line, option) in [
        (
            "test.sh",
            "Runs every check and test.",
            "SKIP_LAMBDA_BUILD=1",
        ),
        ("run-local.sh", "Runs the whole system locally", "--once"),
    ] {
        for flag in ["--help", "-h"] {
            let (code, stdout, _) = script(name, &[flag]);
            assert_eq!(code, Some(0), "{name} {flag}");
            assert!(stdout.starts_with(first_line), "{name} {flag}: {stdout}");
            assert!(stdout.contains(option), "{name} {flag}: {stdout}");
            assert!(
                !stdout.contains("#"),
                "{name}: comment marks left in {stdout}"
            );
        }
        let (code, stdout, stderr) = script(name, &["--no-such-option"]);
        assert_eq!(code, Some(2), "{name}");
        assert!(stdout.is_empty(), "{name}: {stdout}");
        assert!(
            stderr.contains("unknown argument --no-such-option") && stderr.contains(first_line),
            "{name}: {stderr}"
        );
    }
}

/// The newest released version in CHANGELOG.md (`## [x.y.z] - date`).
fn changelog_version() -> String {
    let text =
        std::fs::read_to_string(iam_broker_tests::workspace_root().join("CHANGELOG.md")).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("## ["))
        .filter_map(|l| l.split_once(']').map(|(v, _)| v))
        .find(|v| v.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .expect("a released version in CHANGELOG.md")
        .to_owned()
}

#[tokio::test]
async fn every_shipped_binary_prints_the_version_in_the_changelog() {
    let version = changelog_version();
    assert_eq!(
        version,
        env!("CARGO_PKG_VERSION"),
        "Cargo.toml and CHANGELOG.md"
    );
    for (binary, expected) in [
        ("iam-broker", format!("iam-broker {version}")),
        ("iam-broker-proxy", format!("iam-broker-proxy {version}")),
        ("bootstrap", format!("bootstrap (iam-broker) {version}")),
    ] {
        let out = iam_broker_tests::run_program(
            &iam_broker_tests::binary(binary).unwrap(),
            &Env::new(),
            &["--version"],
            None,
        )
        .await
        .unwrap();
        assert!(out.success, "{binary}: {}", out.stderr);
        assert_eq!(out.stdout.trim(), expected, "{binary}");
    }
}
