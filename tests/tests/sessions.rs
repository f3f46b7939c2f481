//! The kill switch, `iam-broker sessions revoke | list | restore`, as a real process against
//! moto with IAM enforced: new credentials stop at the broker, credentials already issued are
//! denied at "AWS" by the inline policy, a pod's revocation spares its neighbours, the operator
//! needs the IAM permissions README names, and every generated policy passes an IAM policy
//! linter (parliament).
//!
//! What moto cannot show: it evaluates no condition of an identity policy (`aws:TokenIssueTime`,
//! `aws:userid`, `aws:PrincipalTag/*`, `aws:SourceIdentity`), so here the deny hits every
//! session of the role, old or new. Which sessions the conditions select is shown by
//! `iam_broker_broker::revocation`'s unit tests, which evaluate them as IAM documents them.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use aws_config::{BehaviorVersion, Region};
use aws_credential_types::Credentials;
use iam_broker_tests::moto_iam::MotoIam;
use iam_broker_tests::{Env, Moto, REGION, Server, Tables, allow, cli, mint_token};
use serde_json::Value;

/// Credentials as the broker served them, used as a pod's SDK would: a DynamoDB call.
async fn list_tables(moto: &Moto, served: &Value) -> Result<(), String> {
    let credentials = Credentials::new(
        served["AccessKeyId"].as_str().unwrap(),
        served["SecretAccessKey"].as_str().unwrap(),
        served["Token"].as_str().map(str::to_owned),
        None,
        "broker",
    );
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(&moto.endpoint)
        .region(Region::new(REGION))
        .credentials_provider(credentials)
        .load()
        .await;
    aws_sdk_dynamodb::Client::new(&sdk)
        .list_tables()
        .send()
        .await
        .map(|_| ())
        .map_err(|e| {
            let body = e
                .raw_response()
                .and_then(|r| r.body().bytes())
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            format!("{e:?}: {body}")
        })
}

struct World {
    moto: Moto,
    operator: Env,
    /// An operator allowed DynamoDB and iam:GetRolePolicy, not iam:PutRolePolicy.
    reader: Env,
    broker: Env,
    role: String,
}

impl World {
    /// The role's revocations policy as IAM holds it, read with the AWS CLI as the operator.
    async fn revocations_policy(&self) -> Option<String> {
        let out = iam_broker_tests::run_program(
            &iam_broker_tests::proxy::aws_cli(),
            &self.operator.clone().set("AWS_DEFAULT_REGION", REGION),
            &[
                "iam",
                "get-role-policy",
                "--role-name",
                "app",
                "--policy-name",
                "iam-broker-revocations",
                "--output",
                "json",
            ],
            None,
        )
        .await
        .unwrap();
        if !out.success {
            assert!(out.stderr.contains("NoSuchEntity"), "{}", out.stderr);
            return None;
        }
        let answer: Value = serde_json::from_str(&out.stdout).unwrap();
        Some(answer["PolicyDocument"].to_string())
    }
}

async fn world(extra: &[(&str, &str)]) -> World {
    let moto = Moto::start().await.unwrap();
    let tables = Tables::create(&moto.sdk_config().await, "sessions")
        .await
        .unwrap();
    let iam = MotoIam::new(&moto.endpoint);
    let role = iam.role("app", &["dynamodb:ListTables"]).await.unwrap();
    let (broker_key, broker_secret) = iam
        .user(
            "broker",
            &[
                "dynamodb:*",
                "sts:AssumeRole",
                "sts:TagSession",
                "sts:SetSourceIdentity",
            ],
        )
        .await
        .unwrap();
    let (op_key, op_secret) = iam
        .user(
            "operator",
            &[
                "dynamodb:*",
                "iam:GetRolePolicy",
                "iam:PutRolePolicy",
                "iam:DeleteRolePolicy",
            ],
        )
        .await
        .unwrap();
    let (reader_key, reader_secret) = iam
        .user("reader", &["dynamodb:*", "iam:GetRolePolicy"])
        .await
        .unwrap();
    let mut base = moto.env().tables(&tables);
    for (k, v) in extra {
        base = base.set(k, v);
    }
    let operator = base
        .clone()
        .set("AWS_ACCESS_KEY_ID", &op_key)
        .set("AWS_SECRET_ACCESS_KEY", &op_secret);
    let reader = base
        .clone()
        .set("AWS_ACCESS_KEY_ID", &reader_key)
        .set("AWS_SECRET_ACCESS_KEY", &reader_secret);
    let broker = base
        .set("AWS_ACCESS_KEY_ID", &broker_key)
        .set("AWS_SECRET_ACCESS_KEY", &broker_secret);
    moto.enforce_iam().await.unwrap();
    World {
        moto,
        operator,
        reader,
        broker,
        role,
    }
}

fn pod_token_args<'a>(role: &'a str, pod: &'a str) -> Vec<&'a str> {
    vec![
        "token",
        "create",
        "--namespace",
        "team-a",
        "--service-account",
        "app",
        "--role",
        role,
        "--pod",
        pod,
    ]
}

#[tokio::test]
async fn revoke_stops_new_credentials_denies_issued_ones_and_restore_lifts_the_block() {
    let w = world(&[]).await;
    allow(&w.operator, "team-a", "app", &w.role).await.unwrap();
    let token = mint_token(&w.operator, "team-a", "app", &w.role)
        .await
        .unwrap();
    let server = Server::start(&w.broker).await.unwrap();

    // GIVEN credentials a pod already holds, which work
    let issued = server.get("/", Some(&token)).await.unwrap();
    assert_eq!(issued.status, 200, "{:?}", issued.json);
    list_tables(&w.moto, &issued.json).await.unwrap();

    // WHEN the operator revokes the ServiceAccount's sessions
    let revoked = cli(
        &w.operator,
        &[
            "sessions",
            "revoke",
            "--namespace",
            "team-a",
            "--service-account",
            "app",
            "--output",
            "json",
        ],
    )
    .await
    .unwrap();
    assert!(revoked.success, "{}\n{}", revoked.stdout, revoked.stderr);
    let report: Value = serde_json::from_str(&revoked.stdout).unwrap();
    assert_eq!(report["roles"][0]["denied"], true, "{report}");
    // (no tags, no SourceIdentity: the session name is what tells the sessions apart)
    assert_eq!(report["identity"], "session name");
    assert_eq!(report["exact"], false, "session names carry no cluster");

    // THEN the credentials already issued are refused by AWS (the role's inline deny)
    let denied = list_tables(&w.moto, &issued.json).await.unwrap_err();
    assert!(denied.contains("AccessDenied"), "{denied}");
    let document = w.revocations_policy().await.unwrap();
    assert!(document.contains("aws:TokenIssueTime"), "{document}");
    assert!(document.contains("*:team-a_app_*"), "{document}");
    // AND the broker serves no new ones: 403 AllowanceRevoked, from the cache too
    let refused = server.get("/", Some(&token)).await.unwrap();
    assert_eq!(
        (refused.status, refused.code()),
        (403, "AllowanceRevoked"),
        "{:?}",
        refused.json
    );
    assert!(
        refused.json["Message"]
            .as_str()
            .unwrap()
            .contains("revoked by an operator"),
        "{:?}",
        refused.json
    );
    // AND explain says why
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), &token).unwrap();
    let explained = cli(
        &w.operator,
        &[
            "explain",
            "--token-file",
            token_file.path().to_str().unwrap(),
        ],
    )
    .await
    .unwrap();
    assert!(
        explained
            .stdout
            .contains("sessions of team-a/app are revoked"),
        "{}",
        explained.stdout
    );

    // AND list shows it, with how long the deny must stay
    let listed = cli(&w.operator, &["sessions", "list"]).await.unwrap();
    assert!(listed.success, "{}", listed.stderr);
    assert!(listed.stdout.contains("team-a/app"), "{}", listed.stdout);
    assert!(
        listed
            .stdout
            .contains(&format!("deny on {} needed until", w.role)),
        "{}",
        listed.stdout
    );

    // WHEN the operator restores it
    let restored = cli(
        &w.operator,
        &[
            "sessions",
            "restore",
            "--namespace",
            "team-a",
            "--service-account",
            "app",
        ],
    )
    .await
    .unwrap();
    assert!(restored.success, "{}", restored.stderr);
    // THEN the broker serves again, and the deny stays until the old sessions have expired
    let again = server.get("/", Some(&token)).await.unwrap();
    assert_eq!(again.status, 200, "{:?}", again.json);
    assert!(
        restored
            .stdout
            .contains(&format!("the deny on {} stays until", w.role)),
        "{}",
        restored.stdout
    );
    assert!(w.revocations_policy().await.is_some());
    // (moto ignores the deny's aws:TokenIssueTime condition, so here it also denies the new
    // credentials; at AWS they are issued after the revocation and are not denied)
    let listed = cli(&w.operator, &["sessions", "list", "--output", "json"])
        .await
        .unwrap();
    let entries: Value = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(entries[0]["revoked_at"], Value::Null, "{entries}");
    assert_eq!(entries[0]["denies"][0]["role_arn"], w.role.as_str());
}

#[tokio::test]
async fn a_pod_is_revoked_alone_and_the_operator_needs_iam_permissions() {
    let w = world(&[]).await;
    allow(&w.operator, "team-a", "app", &w.role).await.unwrap();
    let mint = |pod: &'static str| {
        let env = w.operator.clone();
        let role = w.role.clone();
        async move {
            let out = cli(&env, &pod_token_args(&role, pod)).await.unwrap();
            assert!(out.success, "{}", out.stderr);
            out.stdout.trim().to_owned()
        }
    };
    let (one, two) = (mint("web-1").await, mint("web-2").await);
    let server = Server::start(&w.broker).await.unwrap();

    // An operator without iam:PutRolePolicy: the block is written, the deny is not, and it says so.
    let weak = w.reader.clone();
    let args = [
        "sessions",
        "revoke",
        "--namespace",
        "team-a",
        "--service-account",
        "app",
        "--pod",
        "web-1",
    ];
    let partial = cli(&weak, &args).await.unwrap();
    assert!(!partial.success);
    assert!(
        partial
            .stdout
            .contains(&format!("NOT denied on {}", w.role)),
        "{}",
        partial.stdout
    );
    assert!(
        partial.stderr.contains("run the same command again"),
        "{}",
        partial.stderr
    );
    assert_eq!(
        server.get("/", Some(&one)).await.unwrap().code(),
        "AllowanceRevoked"
    );
    // The same command with the permissions completes it.
    let complete = cli(&w.operator, &args).await.unwrap();
    assert!(complete.success, "{}\n{}", complete.stdout, complete.stderr);
    let document = w.revocations_policy().await.unwrap();
    assert!(
        document.contains("*:team-a_app_web-1\""),
        "exact pod session name: {document}"
    );

    // The revoked pod gets nothing; its neighbour of the same ServiceAccount still does.
    assert_eq!(server.get("/", Some(&one)).await.unwrap().status, 403);
    assert_eq!(server.get("/", Some(&two)).await.unwrap().status, 200);

    // Nothing granted and no --role: refused before anything is written.
    let nothing = cli(
        &w.operator,
        &["sessions", "revoke", "--namespace", "team-b"],
    )
    .await
    .unwrap();
    assert!(!nothing.success);
    assert!(nothing.stderr.contains("--role ARN"), "{}", nothing.stderr);
}

#[tokio::test]
async fn generated_policies_pass_an_iam_policy_linter_for_every_identity_basis() {
    let lint = |document: &str| {
        let output = std::process::Command::new("parliament")
            .args(["--string", document, "--json"])
            .output()
            .expect("parliament (requirements-dev.txt) on PATH");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    };
    // The linter is live: a policy with a malformed date is a finding.
    let (ok, findings) = lint(
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Action":"*","Resource":"*","Condition":{"DateLessThan":{"aws:TokenIssueTime":"yesterday"}}}]}"#,
    );
    assert!(!ok && findings.contains("MISMATCHED_TYPE"), "{findings}");

    for (basis, extra) in [
        (
            "session tags",
            vec![("STS_SESSION_TAGS", "true"), ("CLUSTER_NAME", "alpha")],
        ),
        (
            "SourceIdentity",
            vec![("STS_SOURCE_IDENTITY", "true"), ("CLUSTER_NAME", "alpha")],
        ),
        ("session name", vec![]),
    ] {
        let w = world(&extra).await;
        allow(&w.operator, "team-a", "app", &w.role).await.unwrap();
        for scope in [
            vec!["--namespace", "team-a"],
            vec!["--namespace", "team-a", "--service-account", "app"],
            vec![
                "--namespace",
                "team-a",
                "--service-account",
                "app",
                "--pod",
                "web-1",
            ],
        ] {
            let mut args = vec!["sessions", "revoke", "--output", "json"];
            args.extend(scope.iter());
            let out = cli(&w.operator, &args).await.unwrap();
            assert!(
                out.success,
                "{basis} {scope:?}: {}\n{}",
                out.stdout, out.stderr
            );
            let report: Value = serde_json::from_str(&out.stdout).unwrap();
            assert_eq!(report["identity"], basis);
        }
        let document = w.revocations_policy().await.unwrap();
        let statements: Value = serde_json::from_str(&document).unwrap();
        assert_eq!(
            statements["Statement"].as_array().unwrap().len(),
            3,
            "{document}"
        );
        let (ok, findings) = lint(&document);
        assert!(
            ok && findings.trim().is_empty(),
            "{basis}: {findings}\n{document}"
        );
    }
}
