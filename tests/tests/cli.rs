//! The `iam-broker` administration commands, run as a user would, against moto.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use iam_broker_tests::{Env, Moto, Tables, cli};

const ROLE: &str = "arn:aws:iam::123456789012:role/s3_reader";

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
        iam_broker_core::Token::parse(&token)
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
