//! `iam-broker explain`, run as a real process against moto and the Kubernetes API stand-in:
//! one answer per skip reason the webhook has, the registration's selectors, the broker's
//! decision for a token and for a ServiceAccount, and exit codes scripts can use.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use aws_sdk_dynamodb::types::AttributeValue;
use iam_broker_testkit::kube_api::{DEFAULT_TOKEN, KubeApi};
use iam_broker_tests::{CliOutput, Env, Moto, Tables, allow, cli, cli_with_stdin, mint_token};
use serde_json::{Value, json};

const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";
const OTHER: &str = "arn:aws:iam::123456789012:role/iam-broker/other";
const ANNOTATION: &str = "eks.amazonaws.com/role-arn";

struct World {
    _moto: Moto,
    api: KubeApi,
    env: Env,
    tables: Tables,
    dynamodb: aws_sdk_dynamodb::Client,
    _dir: tempfile::TempDir,
}

async fn world() -> World {
    let moto = Moto::start().await.unwrap();
    let sdk = moto.sdk_config().await;
    let tables = Tables::create(&sdk, "explain").await.unwrap();
    let api = KubeApi::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path(), DEFAULT_TOKEN).unwrap();
    let env = moto
        .env()
        .tables(&tables)
        .set("KUBECONFIG", kubeconfig.to_string_lossy())
        .set("PROXY_IMAGE", "registry.example/iam-broker-proxy:1")
        .set("BROKER_URL", "https://broker.example/Prod/");
    // The registration exactly as render-webhook writes it.
    let rendered = cli(
        &Env::new(),
        &[
            "render-webhook",
            "--url",
            "https://broker.example/Prod/mutate/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ],
    )
    .await
    .unwrap();
    assert!(rendered.success, "{}", rendered.stderr);
    let registration: Value = serde_saphyr::from_str(&rendered.stdout).unwrap();
    api.put_mutating_webhook_configuration(registration);
    for namespace in ["team-a", "kube-system"] {
        api.put_namespace(namespace, &[]);
    }
    api.put_service_account("team-a", "app", &[(ANNOTATION, ROLE)]);
    api.put_service_account("team-a", "plain", &[]);
    api.put_service_account("team-a", "bad-arn", &[(ANNOTATION, "s3_reader")]);
    api.put_service_account("team-a", "denied", &[(ANNOTATION, OTHER)]);
    api.put_service_account("team-a", "broken", &[(ANNOTATION, ROLE)]);
    api.put_service_account("team-a", "revoked", &[(ANNOTATION, ROLE)]);
    api.put_service_account("kube-system", "app", &[(ANNOTATION, ROLE)]);
    allow(&env, "team-a", "app", ROLE).await.unwrap();
    allow(&env, "kube-system", "app", ROLE).await.unwrap();
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    World {
        _moto: moto,
        api,
        env,
        tables,
        dynamodb,
        _dir: dir,
    }
}

fn pod(namespace: &str, service_account: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "web-1", "namespace": namespace },
        "spec": { "serviceAccountName": service_account,
                  "containers": [{ "name": "app", "image": "app:1" }] }
    })
}

async fn explain(w: &World, pod: &Value, extra: &[&str]) -> (CliOutput, Value) {
    let mut args = vec!["explain", "-", "--output", "json"];
    args.extend_from_slice(extra);
    let out = cli_with_stdin(&w.env, &args, Some(&pod.to_string()))
        .await
        .unwrap();
    let json = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: stdout {} stderr {}", out.stdout, out.stderr));
    (out, json)
}

fn exit_code(out: &CliOutput) -> i32 {
    out.code.expect("exited")
}

#[tokio::test]
async fn explain_answers_every_skip_reason_of_the_webhook() {
    let w = world().await;
    // An Allowances row the store cannot read (allowed_roles of the wrong type).
    w.dynamodb
        .put_item()
        .table_name(&w.tables.allowances)
        .set_item(Some(std::collections::HashMap::from([
            ("namespace".to_owned(), AttributeValue::S("team-a".into())),
            (
                "service_account".to_owned(),
                AttributeValue::S("broken".into()),
            ),
            ("allowed_roles".to_owned(), AttributeValue::N("7".into())),
        ])))
        .send()
        .await
        .unwrap();
    // A ServiceAccount allowed the role whose sessions an operator revoked (`sessions revoke`).
    w.dynamodb
        .put_item()
        .table_name(&w.tables.allowances)
        .set_item(Some(std::collections::HashMap::from([
            ("namespace".to_owned(), AttributeValue::S("team-a".into())),
            (
                "service_account".to_owned(),
                AttributeValue::S("revoked".into()),
            ),
            (
                "allowed_roles".to_owned(),
                AttributeValue::Ss(vec![ROLE.into()]),
            ),
            (
                "revoked_at".to_owned(),
                AttributeValue::N("1764930000".into()),
            ),
        ])))
        .send()
        .await
        .unwrap();

    let with = |f: &dyn Fn(&mut Value)| {
        let mut p = pod("team-a", "app");
        f(&mut p);
        p
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "a Deployment",
            json!({"kind": "Deployment", "metadata": {"namespace": "team-a"}}),
            "not a Pod",
        ),
        (
            "an unreadable pod",
            with(&|p| p["spec"]["containers"] = json!("x")),
            "not a readable Pod",
        ),
        (
            "already injected",
            with(&|p| {
                p["spec"]["containers"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "iam-broker-proxy"}))
            }),
            "already carries",
        ),
        (
            "hostNetwork",
            with(&|p| p["spec"]["hostNetwork"] = json!(true)),
            "hostNetwork pods get no sidecar",
        ),
        (
            "no eligible container",
            with(&|p| {
                p["spec"]["containers"][0]["env"] =
                    json!([{"name": "AWS_ACCESS_KEY_ID", "value": "x"}])
            }),
            "no container needs credentials",
        ),
        (
            "a name in use",
            with(&|p| p["spec"]["volumes"] = json!([{"name": "iam-broker-token", "emptyDir": {}}])),
            "already uses",
        ),
        (
            "an invalid ServiceAccount name",
            pod("team-a", "Not_Valid"),
            "service account",
        ),
        (
            "a missing ServiceAccount",
            pod("team-a", "ghost"),
            "the ServiceAccount does not exist",
        ),
        (
            "no annotation",
            pod("team-a", "plain"),
            "has no role annotation",
        ),
        (
            "an annotation that is not an ARN",
            pod("team-a", "bad-arn"),
            "is not a role ARN",
        ),
        (
            "a role not allowed",
            pod("team-a", "denied"),
            "is not allowed for team-a/denied",
        ),
        (
            "an unreadable row",
            pod("team-a", "broken"),
            "cannot be read",
        ),
        (
            "revoked sessions",
            pod("team-a", "revoked"),
            "sessions of team-a/revoked are revoked by an operator",
        ),
        (
            "a system namespace",
            pod("kube-system", "app"),
            "registration does not send this pod",
        ),
    ];
    for (case, pod, expected) in cases {
        let (out, json) = explain(&w, &pod, &[]).await;
        assert_eq!(exit_code(&out), 2, "{case}: {}", out.stdout);
        assert_eq!(json["credentials"], false, "{case}");
        let answer = json["answer"].as_str().unwrap();
        assert!(
            answer.contains(expected),
            "{case}: {answer}\n{}",
            out.stdout
        );
        assert!(
            json["steps"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["verdict"] == "fail"),
            "{case}: a step says why: {}",
            out.stdout
        );
    }

    // The table output of the same question, for people.
    let out = cli_with_stdin(
        &w.env,
        &["explain", "-"],
        Some(&pod("team-a", "plain").to_string()),
    )
    .await
    .unwrap();
    assert_eq!(exit_code(&out), 2);
    assert!(
        out.stdout.contains("[NO] service account"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("=> NO CREDENTIALS: not injected: the ServiceAccount has no role annotation"),
        "{}",
        out.stdout
    );
    // Nothing was written: no Secret, no Event, no token record.
    assert!(w.api.secrets("team-a").is_empty());
    assert!(w.api.events("team-a").is_empty());
    let records = w
        .dynamodb
        .scan()
        .table_name(&w.tables.authorizations)
        .send()
        .await
        .unwrap();
    assert_eq!(records.count(), 0);
}

#[tokio::test]
async fn an_allowed_pod_is_injected_and_its_token_served_until_disallowed() {
    let w = world().await;
    let (out, json) = explain(&w, &pod("team-a", "app"), &[]).await;
    assert_eq!(exit_code(&out), 0, "{}", out.stdout);
    assert_eq!(json["webhook"]["decision"], "patched");
    assert_eq!(json["webhook"]["credentialed_containers"], json!(["app"]));
    assert_eq!(json["webhook"]["sidecar"], true);
    let steps = json["steps"].as_array().unwrap();
    let detail = |name: &str| {
        steps
            .iter()
            .filter(|s| s["step"] == name)
            .map(|s| s["detail"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert!(
        detail("registration namespaceSelector")[0].contains("selects namespace team-a"),
        "{steps:?}"
    );
    assert!(
        detail("allowances")
            .iter()
            .any(|d| d.contains("row team-a app: allows ") && d.contains(ROLE)),
        "{steps:?}"
    );
    assert!(
        detail("allowances")
            .iter()
            .any(|d| d == "row team-a *: none"),
        "{steps:?}"
    );
    assert!(
        w.api.secrets("team-a").is_empty(),
        "a dry run writes no Secret"
    );

    // With the pod's token the broker decides too, without STS.
    let token = mint_token(&w.env, "team-a", "app", ROLE).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token).unwrap();
    let token_arg = token_file.to_string_lossy().into_owned();
    let (out, json) = explain(&w, &pod("team-a", "app"), &["--token-file", &token_arg]).await;
    assert_eq!(exit_code(&out), 0, "{}", out.stdout);
    assert_eq!(json["broker"]["role_arn"], ROLE);
    assert_eq!(json["broker"]["credential"], "secret");
    assert_eq!(json["broker"]["session_name"], "team-a_app_web-1");
    assert!(!out.stdout.contains(&token), "the token is never printed");

    // The ServiceAccount alone: which rows, and the broker's own decision.
    let sa = cli(
        &w.env,
        &[
            "explain",
            "--namespace",
            "team-a",
            "--service-account",
            "app",
        ],
    )
    .await
    .unwrap();
    assert_eq!(exit_code(&sa), 0, "{}", sa.stdout);
    assert!(
        sa.stdout
            .contains(&format!("=> CREDENTIALS: team-a/app gets {ROLE}")),
        "{}",
        sa.stdout
    );
    let other = cli(
        &w.env,
        &[
            "explain",
            "--namespace",
            "team-a",
            "--service-account",
            "app",
            "--role",
            OTHER,
        ],
    )
    .await
    .unwrap();
    assert_eq!(exit_code(&other), 2, "{}", other.stdout);
    assert!(
        other.stdout.contains("AllowanceRevoked"),
        "{}",
        other.stdout
    );

    // Disallowed: the webhook skips, and the broker refuses the token it issued before.
    iam_broker_tests::disallow(&w.env, "team-a", "app")
        .await
        .unwrap();
    let (out, json) = explain(&w, &pod("team-a", "app"), &[]).await;
    assert_eq!(exit_code(&out), 2);
    assert_eq!(json["webhook"]["decision"], "skipped");
    let refused = cli(
        &w.env,
        &["explain", "--token-file", &token_arg, "--output", "json"],
    )
    .await
    .unwrap();
    assert_eq!(exit_code(&refused), 2, "{}", refused.stdout);
    let json: Value = serde_json::from_str(&refused.stdout).unwrap();
    assert_eq!(json["broker"]["code"], "AllowanceRevoked");

    // Bad input and an unreachable cluster are errors, exit 1, not answers.
    let missing = cli(&w.env, &["explain"]).await.unwrap();
    assert_eq!(exit_code(&missing), 1);
    assert!(missing.stderr.contains("name a pod"), "{}", missing.stderr);
}

#[tokio::test]
async fn an_unreachable_dependency_is_exit_1_not_a_no() {
    let w = world().await;
    let env = w.env.clone().set("ALLOWANCES_TABLE", "no-such-table");
    let out = cli_with_stdin(
        &env,
        &["explain", "-", "--output", "json"],
        Some(&pod("team-a", "app").to_string()),
    )
    .await
    .unwrap();
    assert_eq!(exit_code(&out), 1, "{}\n{}", out.stdout, out.stderr);
    let json: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json["credentials"], Value::Null);
    assert!(
        json["answer"]
            .as_str()
            .unwrap()
            .contains("the webhook fails"),
        "{json}"
    );
}
