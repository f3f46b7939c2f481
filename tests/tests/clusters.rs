//! The cluster registry and the cluster-scoped allowances on DynamoDB, against moto: what the
//! broker reads when a projected token arrives, and what `iam-broker cluster` / `allow
//! --cluster --external-id` write.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;
use iam_broker_aws::schema::create_clusters_table;
use iam_broker_aws::{DynamoAllowanceStore, DynamoClusterRegistry};
use iam_broker_kernel::allowance::Subject;
use iam_broker_kernel::cluster::{ClusterName, RegisteredCluster};
use iam_broker_kernel::ports::{AllowanceStore, ClusterRegistry, StoreError};
use iam_broker_testkit::Signer;
use iam_broker_tests::{Moto, Tables};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const A: &str = "arn:aws:iam::123456789012:role/iam-broker/a";
const B: &str = "arn:aws:iam::210987654321:role/iam-broker/b";

/// A JWKS of fresh P-256 keys with these `kid`s.
fn jwks(kids: &[&str]) -> String {
    let signers: Vec<Signer> = kids.iter().map(|kid| Signer::new(kid)).collect();
    Signer::jwks(&signers.iter().collect::<Vec<_>>())
}

fn cluster(name: &str, kids: &[&str], updated_at: i64) -> RegisteredCluster {
    RegisteredCluster::new(name, ISSUER, &jwks(kids), "file test.json", updated_at).unwrap()
}

fn name(value: &str) -> ClusterName {
    ClusterName::parse(value).unwrap()
}

async fn registry(prefix: &str) -> (Moto, Client, String, DynamoClusterRegistry) {
    let moto = Moto::start().await.unwrap();
    let client = Client::new(&moto.sdk_config().await);
    let table = format!("{prefix}-clusters");
    create_clusters_table(&client, &table).await.unwrap();
    // Creating it again is a no-op, as `iam-broker tables create` relies on.
    create_clusters_table(&client, &table).await.unwrap();
    let registry = DynamoClusterRegistry::new(client.clone(), &table);
    (moto, client, table, registry)
}

#[tokio::test]
async fn clusters_are_inserted_updated_and_removed_by_name() {
    let (_moto, _client, _table, registry) = registry("lifecycle").await;
    assert_eq!(registry.clusters().await.unwrap(), vec![]);

    // GIVEN east is registered
    let east = cluster("east", &["k1"], 1_800_000_000);
    registry.insert(&east).await.unwrap();
    assert_eq!(
        registry.cluster(&name("east")).await.unwrap(),
        Some(east.clone())
    );

    // WHEN it is registered again, or an unknown cluster is updated
    let again = registry.insert(&cluster("east", &["k9"], 1)).await;
    let unknown = registry.update(&cluster("west", &["k2"], 1)).await;
    // THEN neither writes anything
    assert!(matches!(again, Err(StoreError::AlreadyExists)), "{again:?}");
    assert!(matches!(unknown, Err(StoreError::NotFound)), "{unknown:?}");
    assert_eq!(registry.cluster(&name("west")).await.unwrap(), None);
    assert_eq!(registry.clusters().await.unwrap(), vec![east.clone()]);

    // WHEN east's keys are rotated
    let rotated = cluster("east", &["k1", "k2"], 1_800_000_100);
    registry.update(&rotated).await.unwrap();
    // THEN the JWKS is stored verbatim and read back whole
    assert_eq!(
        registry.cluster(&name("east")).await.unwrap(),
        Some(rotated.clone())
    );
    let west = cluster("west", &["k3"], 1_800_000_200);
    registry.insert(&west).await.unwrap();
    assert_eq!(
        registry.clusters().await.unwrap(),
        vec![rotated.clone(), west.clone()],
        "sorted by name"
    );

    // WHEN east is removed, twice
    assert_eq!(registry.remove(&name("east")).await.unwrap(), Some(rotated));
    assert_eq!(registry.remove(&name("east")).await.unwrap(), None);
    assert_eq!(registry.clusters().await.unwrap(), vec![west]);
}

#[tokio::test]
async fn a_damaged_row_is_left_out_of_the_list_and_can_still_be_removed() {
    let (_moto, client, table, registry) = registry("damaged").await;
    let east = cluster("east", &["k1"], 10);
    let west = cluster("west", &["k2"], 20);
    registry.insert(&east).await.unwrap();
    registry.insert(&west).await.unwrap();
    // GIVEN rows edited by hand: a JWKS without keys, a row without its issuer, a bad key
    let s = |v: &str| AttributeValue::S(v.to_owned());
    let damaged: [HashMap<String, AttributeValue>; 3] = [
        HashMap::from([
            ("cluster".to_owned(), s("broken-jwks")),
            ("issuer".to_owned(), s(ISSUER)),
            ("jwks".to_owned(), s("{\"keys\":[]}")),
        ]),
        HashMap::from([
            ("cluster".to_owned(), s("no-issuer")),
            ("jwks".to_owned(), s(&jwks(&["k4"]))),
        ]),
        HashMap::from([
            ("cluster".to_owned(), s("Not_A_Name")),
            ("issuer".to_owned(), s(ISSUER)),
            ("jwks".to_owned(), s(&jwks(&["k5"]))),
        ]),
    ];
    for item in damaged {
        client
            .put_item()
            .table_name(&table)
            .set_item(Some(item))
            .send()
            .await
            .unwrap();
    }

    // THEN the broker's read keeps every readable cluster
    assert_eq!(registry.clusters().await.unwrap(), vec![east, west]);
    // and a read of the damaged row by name says what is wrong with it
    let read = registry.cluster(&name("no-issuer")).await;
    match read {
        Err(StoreError::Corrupt { message, .. }) => {
            assert!(message.contains("no issuer attribute"), "{message}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // and removing it works (that is how it is fixed), saying it was removed
    match registry.remove(&name("no-issuer")).await {
        Err(StoreError::Corrupt { message, .. }) => {
            assert!(message.contains("was removed"), "{message}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(registry.cluster(&name("no-issuer")).await.unwrap(), None);
    // and an update replaces a damaged row
    registry
        .update(&cluster("broken-jwks", &["k6"], 30))
        .await
        .unwrap();
    assert_eq!(registry.clusters().await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_missing_clusters_table_names_its_variable() {
    let moto = Moto::start().await.unwrap();
    let client = Client::new(&moto.sdk_config().await);
    let registry = DynamoClusterRegistry::new(client, "no-such-clusters");
    let error = registry.clusters().await.unwrap_err();
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    let message = format!("{:#}", anyhow::Error::new(error));
    assert!(
        message.contains("table no-such-clusters does not exist")
            && message.contains("set CLUSTERS_TABLE to the name of the Clusters table"),
        "{message}"
    );
}

async fn allowances() -> (Moto, Client, Tables, DynamoAllowanceStore) {
    let moto = Moto::start().await.unwrap();
    let sdk = moto.sdk_config().await;
    let tables = Tables::create(&sdk, "scoped").await.unwrap();
    let client = Client::new(&sdk);
    let store = DynamoAllowanceStore::new(client.clone(), &tables.allowances);
    (moto, client, tables, store)
}

async fn raw_item(
    client: &Client,
    tables: &Tables,
    partition: &str,
    service_account: &str,
) -> Option<HashMap<String, AttributeValue>> {
    client
        .get_item()
        .table_name(&tables.allowances)
        .key("namespace", AttributeValue::S(partition.to_owned()))
        .key(
            "service_account",
            AttributeValue::S(service_account.to_owned()),
        )
        .send()
        .await
        .unwrap()
        .item
}

#[tokio::test]
async fn scoped_and_unscoped_rows_of_one_namespace_are_distinct() {
    let (_moto, client, tables, store) = allowances().await;
    let default = Subject::allowance_row("team", "app").unwrap();
    let east = default.clone().in_cluster(Some(name("east")));
    // GIVEN the default cluster's team/app may assume A, and east's team/app may assume B
    store.allow(&default, A, None).await.unwrap();
    store.allow(&east, B, None).await.unwrap();

    // THEN each row holds its own role
    let row = store.allowance(&default).await.unwrap().unwrap();
    assert_eq!(row.allowed_roles.iter().collect::<Vec<_>>(), [A]);
    let row = store.allowance(&east).await.unwrap().unwrap();
    assert_eq!(row.allowed_roles.iter().collect::<Vec<_>>(), [B]);
    assert_eq!(row.subject, east);
    // and east's row is stored under the partition key east/team
    assert!(
        raw_item(&client, &tables, "east/team", "app")
            .await
            .is_some()
    );
    assert!(store.allowance(&east.wildcard()).await.unwrap().is_none());

    // and listings by partition see one row each, the whole table both
    let listed = store.list(Some("team")).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].subject, default);
    let listed = store.list(Some(&east.partition())).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].subject, east);
    let all: Vec<Subject> = store
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.subject)
        .collect();
    assert_eq!(all, vec![default.clone(), east.clone()]);

    // WHEN east's row is withdrawn, the default cluster's is untouched
    assert_eq!(store.disallow(&east, None).await.unwrap(), None);
    assert!(store.allowance(&default).await.unwrap().is_some());
}

#[tokio::test]
async fn external_ids_belong_to_their_role() {
    let (_moto, client, tables, store) = allowances().await;
    let subject = Subject::allowance_row("team", "app")
        .unwrap()
        .in_cluster(Some(name("east")));

    // GIVEN A is allowed with ExternalId X-1 and B with Y-2
    store.allow(&subject, A, Some("X-1")).await.unwrap();
    let row = store.allow(&subject, B, Some("Y-2")).await.unwrap();
    assert_eq!(
        row.external_ids,
        BTreeMap::from([
            (A.to_owned(), "X-1".to_owned()),
            (B.to_owned(), "Y-2".to_owned())
        ])
    );
    let item = raw_item(&client, &tables, "east/team", "app")
        .await
        .unwrap();
    assert_eq!(
        item.get(&format!("external_id:{A}")),
        Some(&AttributeValue::S("X-1".to_owned())),
        "one top-level attribute per role: {item:?}"
    );

    // WHEN A is allowed again without an id
    let row = store.allow(&subject, A, None).await.unwrap();
    // THEN A's id is gone, B's stays
    assert!(row.allows(A));
    assert_eq!(
        row.external_ids,
        BTreeMap::from([(B.to_owned(), "Y-2".to_owned())])
    );

    // WHEN B is disallowed
    let row = store.disallow(&subject, Some(B)).await.unwrap().unwrap();
    // THEN its id goes with it
    assert!(!row.allows(B));
    assert!(row.external_ids.is_empty(), "{:?}", row.external_ids);
    let item = raw_item(&client, &tables, "east/team", "app")
        .await
        .unwrap();
    assert!(
        !item.keys().any(|k| k.starts_with("external_id:")),
        "{item:?}"
    );

    // WHEN an id is set again and the last role goes, the row goes with its ids
    store.allow(&subject, A, Some("X-3")).await.unwrap();
    assert_eq!(store.disallow(&subject, Some(A)).await.unwrap(), None);
    assert!(
        raw_item(&client, &tables, "east/team", "app")
            .await
            .is_none()
    );
}
