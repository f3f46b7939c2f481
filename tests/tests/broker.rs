//! End to end: moto + the real `iam-broker` binary. Every row of the broker's error table (ARCHITECTURE.md, "Error contract")
//! is pinned here, along with the success answer and what must never reach a log.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use aws_config::SdkConfig;
use iam_broker_aws::DynamoTokenStore;
use iam_broker_kernel::allowance::{RoleArn, Subject};
use iam_broker_kernel::ports::TokenStore;
use iam_broker_kernel::record::{Grant, mint};
use iam_broker_tests::{ACCOUNT_ID, Env, Moto, Server, Tables, cli, cli_with_stdin};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";
const OTHER_ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/other";

struct World {
    moto: Moto,
    sdk: SdkConfig,
    tables: Tables,
    env: Env,
}

async fn world() -> World {
    let moto = Moto::start().await.unwrap();
    let sdk = moto.sdk_config().await;
    let tables = Tables::create(&sdk, "e2e").await.unwrap();
    let env = moto.env().tables(&tables);
    World {
        moto,
        sdk,
        tables,
        env,
    }
}

impl World {
    fn token_store(&self) -> DynamoTokenStore {
        DynamoTokenStore::new(
            aws_sdk_dynamodb::Client::new(&self.sdk),
            &self.tables.authorizations,
        )
    }

    async fn allow(&self, namespace: &str, service_account: &str, role: &str) {
        let out = cli(
            &self.env,
            &[
                "allow",
                "--namespace",
                namespace,
                "--service-account",
                service_account,
                "--role",
                role,
            ],
        )
        .await
        .unwrap();
        assert!(out.success, "allow failed: {}", out.stderr);
    }

    async fn token(&self, namespace: &str, service_account: &str, role: &str) -> (String, String) {
        let out = cli(
            &self.env,
            &[
                "token",
                "create",
                "--namespace",
                namespace,
                "--service-account",
                service_account,
                "--role",
                role,
                "--pod",
                "web-1",
            ],
        )
        .await
        .unwrap();
        assert!(out.success, "token create failed: {}", out.stderr);
        (out.stdout.trim().to_owned(), out.stderr)
    }
}

#[tokio::test]
async fn serves_ecs_credentials_that_sts_accepts_and_never_logs_secrets() {
    // GIVEN an allowed ServiceAccount and a token minted for it
    let w = world().await;
    w.allow("team-a", "app", ROLE).await;
    let (token, cli_stderr) = w.token("team-a", "app", ROLE).await;
    assert!(token.starts_with("iamb_") && token.len() == 48, "{token}");
    let server = Server::start(&w.env).await.unwrap();

    // WHEN the raw token asks for credentials
    let answer = server.get("/credentials", Some(&token)).await.unwrap();
    let now = OffsetDateTime::now_utc();

    // THEN every field of the ECS answer is there
    assert_eq!(answer.status, 200, "{:?}", answer.json);
    assert_eq!(answer.header("content-type"), "application/json");
    let body = &answer.json;
    for field in ["AccessKeyId", "SecretAccessKey", "Token", "Expiration"] {
        assert!(
            body[field].as_str().is_some_and(|v| !v.is_empty()),
            "{field}"
        );
    }
    assert_eq!(body["AccountId"], ACCOUNT_ID);
    assert_eq!(body["RoleArn"], ROLE);
    let expiration = body["Expiration"].as_str().unwrap();
    assert!(expiration.ends_with('Z'), "{expiration}");
    let expires_at = OffsetDateTime::parse(expiration, &Rfc3339).unwrap();
    // AND max-age is expiry - now - 300 (within 2 s)
    let max_age: i64 = answer
        .header("cache-control")
        .strip_prefix("max-age=")
        .unwrap()
        .parse()
        .unwrap();
    let expected = (expires_at - now).whole_seconds() - 300;
    assert!(
        (max_age - expected).abs() <= 2,
        "max-age {max_age}, expected {expected}"
    );
    assert!(expected > 3000, "one hour credentials by default");

    // AND STS accepts them: the caller is the assumed role, with a session naming the pod
    let creds = aws_credential_types::Credentials::new(
        body["AccessKeyId"].as_str().unwrap(),
        body["SecretAccessKey"].as_str().unwrap(),
        body["Token"].as_str().map(str::to_owned),
        None,
        "broker",
    );
    let sts = aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::config::Builder::from(&w.sdk)
            .credentials_provider(creds)
            .build(),
    );
    let identity = sts.get_caller_identity().send().await.unwrap();
    let arn = identity.arn().unwrap();
    assert_eq!(
        arn,
        "arn:aws:sts::123456789012:assumed-role/s3_reader/team-a_app_web-1"
    );
    assert!(
        !arn.contains(&token[5..]),
        "the session name never holds the token"
    );

    // AND `Bearer <token>` on GET / works as well
    let bearer = server
        .get("/", Some(&format!("Bearer {token}")))
        .await
        .unwrap();
    assert_eq!(bearer.status, 200);

    // AND a use that would move the expiry by less than the slide step (an hour) does not
    // write the record: a token just minted keeps its record as written
    let store = w.token_store();
    let hash = iam_broker_kernel::Token::parse(&token).unwrap().hash();
    let record = store.record(&hash).await.unwrap().unwrap();
    assert_eq!(record.last_used, None);
    // AND once a use moves it a full step, the record slides forward
    let behind = record.expires - 2 * 3600;
    store.touch(&hash, record.created_at, behind).await.unwrap();
    assert_eq!(server.get("/", Some(&token)).await.unwrap().status, 200);
    let record = store.record(&hash).await.unwrap().unwrap();
    assert!(record.last_used.is_some_and(|t| t >= now.unix_timestamp()));
    assert!(record.expires > behind + 3600);

    // AND no log line holds the token or a secret
    let log = server.stop().await;
    assert!(
        log.contains("credentials served"),
        "the server logs its decisions:\n{log}"
    );
    for secret in [
        token.as_str(),
        &token[5..],
        body["SecretAccessKey"].as_str().unwrap(),
        body["Token"].as_str().unwrap(),
    ] {
        assert!(!log.contains(secret), "server log leaks a secret");
        assert!(!cli_stderr.contains(secret), "CLI stderr leaks a secret");
    }
    w.moto.stop().await;
}

#[tokio::test]
async fn missing_or_empty_authorization_is_401() {
    let w = world().await;
    let server = Server::start(&w.env).await.unwrap();
    for header in [None, Some(""), Some("   "), Some("Bearer ")] {
        let answer = server.get("/", header).await.unwrap();
        assert_eq!(answer.status, 401, "{header:?}");
        assert_eq!(answer.code(), "MissingAuthorization");
        assert!(
            answer.json["Message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert_eq!(answer.header("cache-control"), "no-store");
    }
}

#[tokio::test]
async fn unknown_malformed_and_expired_tokens_are_403_and_write_nothing() {
    // GIVEN an allowed subject, one live token and one that expired yesterday
    let w = world().await;
    w.allow("team-a", "app", ROLE).await;
    let (live, _) = w.token("team-a", "app", ROLE).await;
    let store = w.token_store();
    let (expired, record) = mint(
        Grant {
            subject: Subject::service_account("team-a", "app").unwrap(),
            role_arn: RoleArn::parse(ROLE).unwrap(),
            pod_name: None,
            secret_name: None,
        },
        OffsetDateTime::now_utc() - time::Duration::days(3),
        Duration::from_secs(2 * 86_400),
    )
    .unwrap();
    store.insert(&record).await.unwrap();
    let before = store.list().await.unwrap();
    let server = Server::start(&w.env).await.unwrap();
    let unknown = iam_broker_kernel::Token::mint().unwrap();

    // WHEN each bad token is tried
    for (label, value) in [
        ("unknown", unknown.expose().to_owned()),
        ("malformed", "not-a-token".to_owned()),
        ("truncated", live[..40].to_owned()),
        ("expired", expired.expose().to_owned()),
    ] {
        let answer = server.get("/credentials", Some(&value)).await.unwrap();
        // THEN 403 InvalidToken, not cacheable
        assert_eq!(answer.status, 403, "{label}");
        assert_eq!(answer.code(), "InvalidToken", "{label}");
        assert_eq!(answer.header("cache-control"), "no-store", "{label}");
    }

    // AND nothing was written: no row created, the expired one not revived
    assert_eq!(store.list().await.unwrap(), before);
}

#[tokio::test]
async fn unreadable_or_retracted_records_are_403_invalid_token_never_503() {
    use aws_sdk_dynamodb::types::AttributeValue;
    // GIVEN an allowed subject and four tokens whose records are damaged in different ways
    // (written straight to the table, as a bad migration or a hand edit would), and one that a
    // pod's DELETE retracted
    let w = world().await;
    w.allow("team-a", "app", ROLE).await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&w.sdk);
    let future = (OffsetDateTime::now_utc().unix_timestamp() + 86_400).to_string();
    let damaged: [(&str, Vec<(&str, AttributeValue)>); 4] = [
        ("missing attributes", vec![]),
        (
            "role not an ARN",
            vec![("role_arn", AttributeValue::S("not-an-arn".into()))],
        ),
        (
            "mistyped namespace",
            vec![("namespace", AttributeValue::N("7".into()))],
        ),
        (
            "mistyped retraction",
            vec![("retracted_at", AttributeValue::S("soon".into()))],
        ),
    ];
    let mut tokens = Vec::new();
    for (label, attributes) in damaged {
        let token = iam_broker_kernel::Token::mint().unwrap();
        let mut item = std::collections::HashMap::from([
            (
                "token_hash".to_owned(),
                AttributeValue::S(token.hash().as_str().to_owned()),
            ),
            ("expires".to_owned(), AttributeValue::N(future.clone())),
        ]);
        if !attributes.is_empty() {
            for (name, value) in [
                ("namespace", AttributeValue::S("team-a".into())),
                ("service_account", AttributeValue::S("app".into())),
                ("role_arn", AttributeValue::S(ROLE.into())),
            ] {
                item.insert(name.to_owned(), value);
            }
            for (name, value) in attributes {
                item.insert(name.to_owned(), value);
            }
        }
        dynamodb
            .put_item()
            .table_name(&w.tables.authorizations)
            .set_item(Some(item))
            .send()
            .await
            .unwrap();
        tokens.push((label, token.expose().to_owned()));
    }
    let (retracted, _) = w.token("team-a", "app", ROLE).await;
    let store = w.token_store();
    let hash = iam_broker_kernel::Token::parse(&retracted).unwrap().hash();
    let record = store.record(&hash).await.unwrap().unwrap();
    store
        .retract(&record.retracted(OffsetDateTime::now_utc().unix_timestamp()))
        .await
        .unwrap();
    tokens.push(("retracted", retracted));
    let server = Server::start(&w.env).await.unwrap();

    // WHEN each is presented
    for (label, token) in &tokens {
        let answer = server.get("/credentials", Some(token)).await.unwrap();
        // THEN 403 InvalidToken: a permanent data problem is not an outage (no 503, no
        // Retry-After), and no credentials come back
        assert_eq!(answer.status, 403, "{label}: {:?}", answer.json);
        assert_eq!(answer.code(), "InvalidToken", "{label}");
        assert_eq!(answer.header("retry-after"), "", "{label}");
        assert_eq!(answer.header("cache-control"), "no-store", "{label}");
    }
    // AND the damaged ones are logged as errors naming the record (never the token), the
    // retracted one is not
    let log = server.stop().await;
    let corrupt: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"corrupt_record\":true"))
        .collect();
    assert_eq!(corrupt.len(), 4, "{log}");
    assert!(
        corrupt.iter().all(|l| l.contains("\"level\":\"ERROR\"")),
        "{log}"
    );
    for (_, token) in &tokens {
        assert!(!log.contains(&token[5..]), "a token reached the log");
    }
    assert!(
        !log.contains("credentials served"),
        "nothing was served: {log}"
    );
}

#[tokio::test]
async fn unreadable_allowance_rows_are_a_permanent_403_naming_the_row_never_503() {
    use aws_sdk_dynamodb::types::AttributeValue;
    // GIVEN tokens of three ServiceAccounts of one namespace, and hand-edited Allowances rows:
    // `app` has a valid row, `ext` a row whose external id is a number, and the namespace's `*`
    // row has an allowed_roles that is a number
    let w = world().await;
    w.allow("team-a", "app", ROLE).await;
    let (app, _) = w.token("team-a", "app", ROLE).await;
    let (ext, _) = w.token("team-a", "ext", ROLE).await;
    let (other, _) = w.token("team-a", "other", ROLE).await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&w.sdk);
    let rows: [(&str, Vec<(String, AttributeValue)>); 2] = [
        (
            "*",
            vec![("allowed_roles".to_owned(), AttributeValue::N("7".into()))],
        ),
        (
            "ext",
            vec![
                (
                    "allowed_roles".to_owned(),
                    AttributeValue::Ss(vec![ROLE.into()]),
                ),
                (
                    format!("external_id:{ROLE}"),
                    AttributeValue::N("42".into()),
                ),
            ],
        ),
    ];
    for (service_account, attributes) in rows {
        let mut item = std::collections::HashMap::from([
            ("namespace".to_owned(), AttributeValue::S("team-a".into())),
            (
                "service_account".to_owned(),
                AttributeValue::S(service_account.into()),
            ),
        ]);
        item.extend(attributes);
        dynamodb
            .put_item()
            .table_name(&w.tables.allowances)
            .set_item(Some(item))
            .send()
            .await
            .unwrap();
    }
    let server = Server::start(&w.env).await.unwrap();

    // WHEN each token asks for credentials
    // THEN the valid exact row still works beside the unreadable `*` row
    let served = server.get("/credentials", Some(&app)).await.unwrap();
    assert_eq!(served.status, 200, "{:?}", served.json);
    // AND the others are a permanent 403 AllowanceUnreadable (no 503, no Retry-After) whose
    // message names the table and the row
    for (token, row) in [(&ext, "ext"), (&other, "*")] {
        let answer = server.get("/credentials", Some(token)).await.unwrap();
        assert_eq!(answer.status, 403, "{row}: {:?}", answer.json);
        assert_eq!(answer.code(), "AllowanceUnreadable", "{row}");
        assert_eq!(answer.header("retry-after"), "", "{row}");
        let message = answer.json["Message"].as_str().unwrap();
        assert!(message.contains(&w.tables.allowances), "{message}");
        assert!(
            message.contains(&format!(r#"service_account "{row}""#)),
            "{message}"
        );
    }
    // AND the log says so at ERROR level, naming the table and the row, and never the token
    let log = server.stop().await;
    let corrupt: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"corrupt_row\":true"))
        .collect();
    assert_eq!(corrupt.len(), 2, "{log}");
    for line in &corrupt {
        assert!(line.contains("\"level\":\"ERROR\""), "{line}");
        assert!(line.contains(&w.tables.allowances), "{line}");
        assert!(line.contains("\"row_namespace\":\"team-a\""), "{line}");
    }
    assert!(!log.contains("the token store"), "{log}");
    for token in [&app, &ext, &other] {
        assert!(!log.contains(&token[5..]), "a token reached the log");
    }
}

#[tokio::test]
async fn changing_or_deleting_the_allowance_revokes_at_the_next_fetch() {
    let w = world().await;
    w.allow("team-a", "app", ROLE).await;
    w.allow("team-a", "app", OTHER_ROLE).await;
    let (token, _) = w.token("team-a", "app", ROLE).await;
    let server = Server::start(&w.env).await.unwrap();
    assert_eq!(server.get("/", Some(&token)).await.unwrap().status, 200);

    // WHEN the role is withdrawn but the row keeps another role
    let out = cli(
        &w.env,
        &[
            "disallow",
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
    assert!(out.success, "{}", out.stderr);
    let answer = server.get("/", Some(&token)).await.unwrap();
    assert_eq!((answer.status, answer.code()), (403, "AllowanceRevoked"));
    assert_eq!(answer.header("cache-control"), "no-store");

    // WHEN it is granted again, then the whole row deleted
    w.allow("team-a", "app", ROLE).await;
    assert_eq!(server.get("/", Some(&token)).await.unwrap().status, 200);
    iam_broker_tests::disallow(&w.env, "team-a", "app")
        .await
        .unwrap();
    let answer = server.get("/", Some(&token)).await.unwrap();
    assert_eq!((answer.status, answer.code()), (403, "AllowanceRevoked"));
}

#[tokio::test]
async fn a_namespace_wildcard_allows_every_service_account() {
    let w = world().await;
    w.allow("team-b", "*", ROLE).await;
    let (token, _) = w.token("team-b", "any-sa", ROLE).await;
    let (other_ns, _) = w.token("team-c", "any-sa", ROLE).await;
    let server = Server::start(&w.env).await.unwrap();
    assert_eq!(server.get("/", Some(&token)).await.unwrap().status, 200);
    let answer = server.get("/", Some(&other_ns)).await.unwrap();
    assert_eq!((answer.status, answer.code()), (403, "AllowanceRevoked"));
}

#[tokio::test]
async fn a_revoked_token_is_403() {
    let w = world().await;
    w.allow("team-a", "app", ROLE).await;
    let (token, _) = w.token("team-a", "app", ROLE).await;
    let server = Server::start(&w.env).await.unwrap();
    assert_eq!(server.get("/", Some(&token)).await.unwrap().status, 200);
    let out = cli_with_stdin(&w.env, &["token", "revoke", "--stdin"], Some(&token))
        .await
        .unwrap();
    assert!(out.success, "{}", out.stderr);
    let answer = server.get("/", Some(&token)).await.unwrap();
    assert_eq!((answer.status, answer.code()), (403, "InvalidToken"));
}

#[tokio::test]
async fn sts_refusal_is_502_with_its_code() {
    // GIVEN moto enforcing IAM and a broker identity that may use DynamoDB but not sts:AssumeRole
    let w = world().await;
    let iam = iam_broker_tests::moto_iam::MotoIam::new(&w.moto.endpoint);
    let (access_key, secret_key) = iam.user("broker", &["dynamodb:*"]).await.unwrap();
    w.allow("team-a", "app", ROLE).await;
    let (token, _) = w.token("team-a", "app", ROLE).await;
    w.moto.enforce_iam().await.unwrap();
    let env = w
        .env
        .clone()
        .set("AWS_ACCESS_KEY_ID", &access_key)
        .set("AWS_SECRET_ACCESS_KEY", &secret_key);
    let server = Server::start(&env).await.unwrap();

    // WHEN the pod asks
    let answer = server.get("/", Some(&token)).await.unwrap();

    // THEN 502 AssumeRoleFailed naming STS's error code
    assert_eq!(answer.status, 502, "{:?}", answer.json);
    assert_eq!(answer.code(), "AssumeRoleFailed");
    assert!(
        answer.json["Message"]
            .as_str()
            .unwrap()
            .contains("AccessDenied"),
        "{:?}",
        answer.json
    );
    assert_eq!(answer.header("cache-control"), "no-store");
}

#[tokio::test]
async fn dynamodb_down_is_a_quick_503() {
    let w = world().await;
    w.allow("team-a", "app", ROLE).await;
    let (token, _) = w.token("team-a", "app", ROLE).await;

    // A port nobody listens on, and one that accepts connections but never answers.
    let closed = iam_broker_tests::free_port().unwrap();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });

    for port in [closed, silent_port] {
        let env = w
            .env
            .clone()
            .set(
                "AWS_ENDPOINT_URL_DYNAMODB",
                format!("http://127.0.0.1:{port}"),
            )
            .set("AWS_CALL_TIMEOUT_MS", "400");
        let server = Server::start(&env).await.unwrap();
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            server.get("/credentials", Some(&token)),
        )
        .await
        .expect("a dead DynamoDB must not hang the broker")
        .unwrap();
        assert_eq!(answer.status, 503, "port {port}: {:?}", answer.json);
        assert_eq!(answer.code(), "ServiceUnavailable");
        assert!(answer.header("retry-after").parse::<u32>().is_ok());
        assert_eq!(answer.header("cache-control"), "no-store");
        let log = server.stop().await;
        assert!(!log.contains(&token[5..]));
    }
    hold.abort();
}

#[tokio::test]
async fn other_routes_answer_json_errors() {
    let w = world().await;
    let server = Server::start(&w.env).await.unwrap();
    let health = server.get("/healthz", None).await.unwrap();
    assert_eq!(health.status, 200);
    assert_eq!(health.json["status"], "ok");

    let missing = server.get("/nope", None).await.unwrap();
    assert_eq!((missing.status, missing.code()), (404, "NotFound"));

    let client = reqwest::Client::new();
    for path in ["/", "/mutate"] {
        let response = client
            .post(format!("{}{path}", server.url))
            .header("content-type", "application/json")
            .body(r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#)
            .send()
            .await
            .unwrap();
        // A review without a request is not a well-formed AdmissionReview.
        assert_eq!(response.status().as_u16(), 400);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["Code"], "BadRequest");
        assert!(body["Message"].as_str().unwrap().contains("no request"));
    }
    let put = client.put(format!("{}/", server.url)).send().await.unwrap();
    assert_eq!(put.status().as_u16(), 405);
    let body: serde_json::Value = put.json().await.unwrap();
    assert_eq!(body["Code"], "MethodNotAllowed");
}
