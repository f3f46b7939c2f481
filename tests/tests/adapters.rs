//! The DynamoDB and STS adapters against moto over HTTP: the semantics the ports promise.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use iam_broker_aws::{DynamoAllowanceStore, DynamoTokenStore, StsCredentialIssuer};
use iam_broker_kernel::allowance::{RoleArn, Row, Subject};
use iam_broker_kernel::ports::{
    AllowanceStore, AssumeRoleRequest, CredentialIssuer, StoreError, TokenStore,
};
use iam_broker_kernel::record::{Grant, mint};
use iam_broker_tests::{Moto, Tables};
use time::OffsetDateTime;

const A: &str = "arn:aws:iam::123456789012:role/iam-broker/a";
const B: &str = "arn:aws:iam::123456789012:role/iam-broker/b";

async fn stores() -> (
    Moto,
    aws_sdk_dynamodb::Client,
    Tables,
    DynamoAllowanceStore,
    DynamoTokenStore,
) {
    let moto = Moto::start().await.unwrap();
    let sdk = moto.sdk_config().await;
    let tables = Tables::create(&sdk, "adapters").await.unwrap();
    let client = aws_sdk_dynamodb::Client::new(&sdk);
    let allowances = DynamoAllowanceStore::new(client.clone(), &tables.allowances);
    let tokens = DynamoTokenStore::new(client.clone(), &tables.authorizations);
    (moto, client, tables, allowances, tokens)
}

#[tokio::test]
async fn several_subjects_rows_come_back_from_one_batch_read_in_order() {
    let (_moto, _client, _tables, store, _) = stores().await;
    let app = Subject::service_account("ns", "app").unwrap();
    let east = app.clone().in_cluster(Some(
        iam_broker_kernel::cluster::ClusterName::parse("east").unwrap(),
    ));
    store.allow(&east, A, None).await.unwrap();
    store.allow(&app.wildcard(), B, None).await.unwrap();
    let rows = store
        .rows_for_all(&[east.clone(), app.clone(), app.clone()])
        .await
        .unwrap();
    // east's exact and `*`, then the default cluster's exact and `*`, twice (each distinct key
    // is asked once, in one BatchGetItem)
    assert_eq!(rows.len(), 6);
    assert_eq!(rows[0].allowance().unwrap().subject, east);
    assert_eq!(rows[1], Row::Absent);
    assert_eq!(rows[2], Row::Absent);
    assert!(rows[3].allowance().unwrap().allows(B));
    assert_eq!(rows[4..], rows[2..4]);
    assert_eq!(store.rows_for_all(&[]).await.unwrap(), []);
}

#[tokio::test]
async fn a_subjects_two_rows_come_back_from_one_batch_read() {
    let (_moto, _client, _tables, store, _) = stores().await;
    let app = Subject::service_account("ns", "app").unwrap();
    assert_eq!(
        store.rows_for(&app).await.unwrap(),
        [Row::Absent, Row::Absent]
    );

    store.allow(&app.wildcard(), B, None).await.unwrap();
    let [exact, wide] = store.rows_for(&app).await.unwrap();
    assert_eq!(exact, Row::Absent);
    assert_eq!(wide.allowance().unwrap().subject.service_account, "*");

    store.allow(&app, A, Some("ext-1")).await.unwrap();
    let [exact, wide] = store.rows_for(&app).await.unwrap();
    let exact = exact.allowance().unwrap().clone();
    assert_eq!(exact.subject, app);
    assert_eq!(exact.external_ids.get(A).map(String::as_str), Some("ext-1"));
    assert!(wide.allowance().unwrap().allows(B));

    // A cluster's rows are its own: the same names elsewhere read nothing.
    let east = app.clone().in_cluster(Some(
        iam_broker_kernel::cluster::ClusterName::parse("east").unwrap(),
    ));
    assert_eq!(
        store.rows_for(&east).await.unwrap(),
        [Row::Absent, Row::Absent]
    );
    // Each row equals what a single read gives.
    assert_eq!(
        store.rows_for(&app).await.unwrap(),
        [
            store.allowance(&app).await.unwrap().into(),
            store.allowance(&app.wildcard()).await.unwrap().into()
        ]
    );
}

/// Writes an Allowances item as a console user might, attribute by attribute.
async fn put_row(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    namespace: &str,
    service_account: &str,
    extra: &[(&str, AttributeValue)],
) {
    let mut item = HashMap::from([
        (
            "namespace".to_owned(),
            AttributeValue::S(namespace.to_owned()),
        ),
        (
            "service_account".to_owned(),
            AttributeValue::S(service_account.to_owned()),
        ),
    ]);
    for (name, value) in extra {
        item.insert((*name).to_owned(), value.clone());
    }
    client
        .put_item()
        .table_name(table)
        .set_item(Some(item))
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn a_session_policy_is_written_with_its_role_in_one_write_and_read_back() {
    let (_moto, client, tables, store, _) = stores().await;
    let app = Subject::service_account("ns", "app").unwrap();
    let policy = iam_broker_kernel::allowance::SessionPolicy::parse(
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"*"}]}"#,
    )
    .unwrap();
    let terms = iam_broker_kernel::allowance::RoleTerms {
        external_id: Some("ext-1".into()),
        session_policy: Some(policy.clone()),
    };
    let row = store.allow_with(&app, A, &terms).await.unwrap();
    assert_eq!(
        row.session_policies.get(A).map(String::as_str),
        Some(policy.as_str())
    );
    let [exact, _] = store.rows_for(&app).await.unwrap();
    let permitted =
        iam_broker_kernel::allowance::permit(&[exact], Some(&RoleArn::parse(A).unwrap())).unwrap();
    assert_eq!(permitted.session_policy.as_deref(), Some(policy.as_str()));
    assert_eq!(permitted.external_id.as_deref(), Some("ext-1"));
    // Allowed again without one: the policy is gone (as the ExternalId is).
    let row = store.allow(&app, A, None).await.unwrap();
    assert!(row.session_policies.is_empty() && row.external_ids.is_empty());
    // Disallowing the role takes its policy along.
    store.allow_with(&app, A, &terms).await.unwrap();
    store.allow(&app, B, None).await.unwrap();
    let row = store.disallow(&app, Some(A)).await.unwrap().unwrap();
    assert!(row.session_policies.is_empty());
    // A session policy that is not a string makes its row unreadable, never a 503.
    put_row(
        &client,
        &tables.allowances,
        "ns",
        "bad",
        &[
            ("allowed_roles", AttributeValue::Ss(vec![A.into()])),
            (
                &format!("session_policy:{A}"),
                AttributeValue::N("1".into()),
            ),
        ],
    )
    .await;
    let bad = Subject::service_account("ns", "bad").unwrap();
    let [row, _] = store.rows_for(&bad).await.unwrap();
    assert!(matches!(row, Row::Unreadable(_)), "{row:?}");
}

#[tokio::test]
async fn an_unreadable_row_is_a_row_not_an_outage_and_its_neighbour_still_reads() {
    // GIVEN a valid exact row, and a `*` row whose allowed_roles is a number
    let (_moto, client, tables, store, _) = stores().await;
    let app = Subject::service_account("ns", "app").unwrap();
    store.allow(&app, A, None).await.unwrap();
    put_row(
        &client,
        &tables.allowances,
        "ns",
        "*",
        &[("allowed_roles", AttributeValue::N("7".into()))],
    )
    .await;

    // WHEN both rows are read in one batch
    let [exact, wide] = store.rows_for(&app).await.unwrap();

    // THEN the exact row reads, and the `*` row is unreadable, named by table and key
    assert!(exact.allowance().unwrap().allows(A));
    let Row::Unreadable(row) = wide else {
        panic!("{wide:?}")
    };
    assert_eq!(
        (row.partition.as_str(), row.service_account.as_str()),
        ("ns", "*")
    );
    assert!(row.store.contains(&tables.allowances), "{row}");
    assert!(row.problem.contains("allowed_roles"), "{row}");

    // AND an external id that is not a string makes its row unreadable too (single read)
    let other = Subject::service_account("ns", "other").unwrap();
    put_row(
        &client,
        &tables.allowances,
        "ns",
        "other",
        &[
            ("allowed_roles", AttributeValue::Ss(vec![A.to_owned()])),
            (&format!("external_id:{A}"), AttributeValue::N("1".into())),
        ],
    )
    .await;
    let [exact, _] = store.rows_for(&other).await.unwrap();
    assert!(
        matches!(&exact, Row::Unreadable(row) if row.service_account == "other" && row.problem.contains("external_id")),
        "{exact:?}"
    );
    assert!(matches!(
        store.allowance(&other).await,
        Err(StoreError::Corrupt { .. })
    ));
    // AND a listing that meets an unreadable row says which one
    match store.list(Some("ns")).await {
        Err(StoreError::Corrupt { message, .. }) => {
            assert!(message.contains(r#"namespace "ns""#), "{message}");
            assert!(message.contains("service_account"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn allowances_add_remove_and_list() {
    let (_moto, client, tables, store, _) = stores().await;
    let app = Subject::service_account("ns", "app").unwrap();
    let all = Subject::allowance_row("ns", "*").unwrap();
    let other = Subject::service_account("other", "app").unwrap();

    assert_eq!(store.allowance(&app).await.unwrap(), None);
    store.allow(&app, A, None).await.unwrap();
    let row = store.allow(&app, B, None).await.unwrap();
    assert_eq!(row.allowed_roles.len(), 2);
    store.allow(&app, B, None).await.unwrap(); // idempotent
    store.allow(&all, A, None).await.unwrap();
    store.allow(&other, A, None).await.unwrap();

    // The item has the shape ARCHITECTURE.md ("Data") fixes: a string set named allowed_roles.
    let item = client
        .get_item()
        .table_name(&tables.allowances)
        .key("namespace", AttributeValue::S("ns".into()))
        .key("service_account", AttributeValue::S("app".into()))
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    let mut roles = item["allowed_roles"].as_ss().unwrap().clone();
    roles.sort();
    assert_eq!(roles, vec![A.to_owned(), B.to_owned()]);

    let in_ns = store.list(Some("ns")).await.unwrap();
    assert_eq!(
        in_ns
            .iter()
            .map(|r| r.subject.service_account.as_str())
            .collect::<Vec<_>>(),
        vec!["*", "app"]
    );
    assert_eq!(store.list(None).await.unwrap().len(), 3);

    // Removing one role keeps the row; removing the last one deletes it.
    let left = store.disallow(&app, Some(A)).await.unwrap().unwrap();
    assert!(left.allows(B) && !left.allows(A));
    assert_eq!(store.disallow(&app, Some(B)).await.unwrap(), None);
    assert_eq!(
        store.allowance(&app).await.unwrap(),
        None,
        "the empty row is gone"
    );
    // Withdrawing from a row that does not exist creates nothing.
    assert_eq!(store.disallow(&app, Some(A)).await.unwrap(), None);
    assert_eq!(store.allowance(&app).await.unwrap(), None);
    // Withdrawing everything deletes the row.
    assert_eq!(store.disallow(&all, None).await.unwrap(), None);
    assert_eq!(store.allowance(&all).await.unwrap(), None);
}

#[tokio::test]
async fn hand_made_rows_with_a_plain_string_are_read() {
    let (_moto, client, tables, store, _) = stores().await;
    client
        .put_item()
        .table_name(&tables.allowances)
        .item("namespace", AttributeValue::S("ns".into()))
        .item("service_account", AttributeValue::S("app".into()))
        .item("allowed_roles", AttributeValue::S(A.into()))
        .send()
        .await
        .unwrap();
    let row = store
        .allowance(&Subject::service_account("ns", "app").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(row.allows(A));
}

#[tokio::test]
async fn token_records_insert_once_touch_never_creates_and_delete_returns_the_old_row() {
    let (_moto, client, tables, _, store) = stores().await;
    let now = OffsetDateTime::now_utc();
    let (token, record) = mint(
        Grant {
            subject: Subject::service_account("ns", "app").unwrap(),
            role_arn: RoleArn::parse(A).unwrap(),
            pod_name: Some("web-1".into()),
            secret_name: Some("iam-broker-web-1".into()),
        },
        now,
        Duration::from_secs(86_400),
    )
    .unwrap();
    store.insert(&record).await.unwrap();
    assert!(matches!(
        store.insert(&record).await,
        Err(StoreError::AlreadyExists)
    ));
    assert_eq!(store.record(&token.hash()).await.unwrap().unwrap(), record);

    // Stored under the hash, with the attributes of ARCHITECTURE.md ("Data") and never the token.
    let scan = client
        .scan()
        .table_name(&tables.authorizations)
        .send()
        .await
        .unwrap();
    let item: &HashMap<String, AttributeValue> = &scan.items()[0];
    assert_eq!(item["token_hash"].as_s().unwrap(), token.hash().as_str());
    for name in [
        "namespace",
        "service_account",
        "role_arn",
        "secret_name",
        "pod_name",
    ] {
        assert!(item[name].as_s().is_ok(), "{name}");
    }
    for name in ["created_at", "expires"] {
        assert!(item[name].as_n().is_ok(), "{name}");
    }
    assert!(!format!("{item:?}").contains(token.expose()));

    store
        .touch(
            &token.hash(),
            now.unix_timestamp() + 5,
            now.unix_timestamp() + 99,
        )
        .await
        .unwrap();
    let touched = store.record(&token.hash()).await.unwrap().unwrap();
    assert_eq!(touched.last_used, Some(now.unix_timestamp() + 5));
    assert_eq!(touched.expires, now.unix_timestamp() + 99);

    let stranger = iam_broker_kernel::Token::mint().unwrap().hash();
    assert!(matches!(
        store.touch(&stranger, 1, 2).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        store.record(&stranger).await.unwrap(),
        None,
        "touch never creates"
    );

    assert_eq!(store.list().await.unwrap(), vec![touched.clone()]);
    assert_eq!(store.delete(&token.hash()).await.unwrap(), Some(touched));
    assert_eq!(store.delete(&token.hash()).await.unwrap(), None);
}

#[tokio::test]
async fn an_unreadable_record_is_reported_not_served() {
    let (_moto, client, tables, _, store) = stores().await;
    let hash = iam_broker_kernel::Token::mint().unwrap().hash();
    client
        .put_item()
        .table_name(&tables.authorizations)
        .item("token_hash", AttributeValue::S(hash.as_str().into()))
        .send()
        .await
        .unwrap();
    assert!(matches!(
        store.record(&hash).await,
        Err(StoreError::Corrupt { .. })
    ));
}

#[tokio::test]
async fn a_missing_table_is_unavailable() {
    let (moto, ..) = stores().await;
    let client = aws_sdk_dynamodb::Client::new(&moto.sdk_config().await);
    let store = DynamoTokenStore::new(client, "no-such-table");
    let hash = iam_broker_kernel::Token::mint().unwrap().hash();
    assert!(matches!(
        store.record(&hash).await,
        Err(StoreError::Unavailable { .. })
    ));
}

#[tokio::test]
async fn sts_issues_credentials_with_the_requested_duration() {
    let moto = Moto::start().await.unwrap();
    let issuer = StsCredentialIssuer::new(aws_sdk_sts::Client::new(&moto.sdk_config().await));
    let before = OffsetDateTime::now_utc();
    let creds = issuer
        .assume_role(&AssumeRoleRequest {
            role_arn: A.into(),
            session_name: "ns_app_web-1".into(),
            duration: Duration::from_secs(900),
            tags: vec![("kubernetes-namespace", "ns".into())],
            source_identity: Some("ns_app".into()),
            external_id: Some("tenant-42".into()),
            policy: Some(
                r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"*"}]}"#
                    .into(),
            ),
        })
        .await
        .unwrap();
    assert!(creds.access_key_id.starts_with("ASIA"));
    assert!(!creds.secret_access_key.is_empty() && !creds.session_token.is_empty());
    let lifetime = (creds.expiration - before).whole_seconds();
    assert!((895..=905).contains(&lifetime), "{lifetime}");
}

#[tokio::test]
async fn revocations_live_on_their_row_outlive_its_roles_and_go_when_lifted() {
    use iam_broker_kernel::ports::RevocationChange as C;
    let (_moto, _client, _tables, store, _) = stores().await;
    let app = Subject::service_account("ns", "app").unwrap();
    let other = Subject::service_account("ns", "other").unwrap();

    // A revocation of a ServiceAccount no row names creates its row, with no role.
    let row = store
        .revise(
            &other,
            &C::Scope {
                at: 7,
                denied_roles: vec![A.to_owned()],
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert!(row.allowed_roles.is_empty());
    assert_eq!(row.revocation.at, Some(7));
    assert!(row.revocation.denied_roles.contains(A));

    // On an allowed row: roles and revocation side by side, each written alone.
    store.allow(&app, A, None).await.unwrap();
    store
        .revise(
            &app,
            &C::Pod {
                pod: "web-1".to_owned(),
                denied_roles: vec![A.to_owned()],
            },
        )
        .await
        .unwrap();
    store.allow(&app, B, None).await.unwrap();
    let row = store.allowance(&app).await.unwrap().unwrap();
    assert_eq!(row.allowed_roles.len(), 2);
    assert!(row.revocation.pods.contains("web-1"));
    // Read back through the batch path the broker uses.
    let rows = store.rows_for(&app).await.unwrap();
    assert!(iam_broker_kernel::allowance::revoked(&rows, Some("web-1")).is_some());
    assert!(iam_broker_kernel::allowance::revoked(&rows, Some("web-2")).is_none());

    // Every role withdrawn: the roles go, the revocation stays.
    let left = store.disallow(&app, None).await.unwrap().unwrap();
    assert!(left.allowed_roles.is_empty() && left.external_ids.is_empty());
    assert!(left.revocation.pods.contains("web-1"));
    // Lifting the pod keeps the row while a deny is recorded; forgetting the deny removes it.
    let lifted = store
        .revise(&app, &C::LiftPod("web-1".to_owned()))
        .await
        .unwrap()
        .unwrap();
    assert!(lifted.revocation.pods.is_empty());
    assert!(
        store
            .revise(&app, &C::Undenied(vec![A.to_owned()]))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store.allowance(&app).await.unwrap(),
        None,
        "nothing left: no row"
    );

    // Lifting what no row holds changes nothing.
    let ghost = Subject::service_account("ns", "ghost").unwrap();
    assert_eq!(store.revise(&ghost, &C::LiftScope).await.unwrap(), None);
    assert_eq!(store.allowance(&ghost).await.unwrap(), None);
    // A lifted scope with its deny still recorded keeps the row.
    let row = store.revise(&other, &C::LiftScope).await.unwrap().unwrap();
    assert_eq!(row.revocation.at, None);
    assert!(row.revocation.denied_roles.contains(A));
}

#[tokio::test]
async fn a_mistyped_revocation_makes_its_row_unreadable_not_an_outage() {
    let (_moto, client, tables, store, _) = stores().await;
    client
        .put_item()
        .table_name(&tables.allowances)
        .set_item(Some(HashMap::from([
            ("namespace".to_owned(), AttributeValue::S("ns".into())),
            (
                "service_account".to_owned(),
                AttributeValue::S("app".into()),
            ),
            (
                "allowed_roles".to_owned(),
                AttributeValue::Ss(vec![A.into()]),
            ),
            (
                "revoked_at".to_owned(),
                AttributeValue::S("yesterday".into()),
            ),
        ])))
        .send()
        .await
        .unwrap();
    let app = Subject::service_account("ns", "app").unwrap();
    let rows = store.rows_for(&app).await.unwrap();
    assert!(
        matches!(&rows[0], Row::Unreadable(u) if u.problem.contains("revoked_at")),
        "{rows:?}"
    );
}
