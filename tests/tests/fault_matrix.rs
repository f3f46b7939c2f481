//! The fault matrix of RELIABILITY.md: for each external call of a Pod CREATE and a Pod DELETE
//! admission and each fault of the wire ([`WireFault`]), the fault is injected between the real
//! adapters and their servers (moto's DynamoDB behind a fault proxy, the Kubernetes API
//! stand-in), the admission runs through the real [`Webhook`], and then, once every held or late
//! request has landed, the test counts Secrets without a record and live records without a
//! Secret. Both must be 0 in every cell, and every admission must be answered within its budget.
//!
//! Budgets are scaled down from production (5 s forward, 2 s undo, 3 s per call) so the matrix
//! runs in about a minute; the relations between them are the production ones: each call's
//! timeout is shorter than the forward budget, and a late fault holds its request past
//! forward + undo. The table of measured outcomes is written to `target/fault-matrix.md`.

// Test code: a failed set-up step should panic with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::Credentials;
use axum::http::Method;
use iam_broker_admission::events::EVENT_BUDGET;
use iam_broker_admission::patch::{InjectSettings, InjectionMode, SidecarMode};
use iam_broker_admission::review::{self, AdmissionRequest};
use iam_broker_admission::webhook::{Decision, Outcome, Webhook, WebhookSettings};
use iam_broker_aws::{DynamoAllowanceStore, DynamoTokenStore};
use iam_broker_kernel::allowance::Subject;
use iam_broker_kernel::ports::{AllowanceStore, TokenStore};
use iam_broker_kernel::{FailurePolicy, SystemClock};
use iam_broker_kube::{ClientSource, KubeCluster};
use iam_broker_testkit::kube_api::{DEFAULT_TOKEN, Fault, KubeApi};
use iam_broker_testkit::wire::{DynamoCall, DynamoFaults, WireFault};
use iam_broker_tests::{MOTO_ACCESS_KEY, MOTO_SECRET_KEY, Moto, REGION, Tables};
use serde_json::{Value, json};

const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/reader";
const ANNOTATION: &str = "eks.amazonaws.com/role-arn";
/// Each AWS operation (retries included) and each Kubernetes call.
const CALL: Duration = Duration::from_millis(800);
const FORWARD: Duration = Duration::from_millis(2000);
const UNDO: Duration = Duration::from_millis(1500);
/// Past forward + undo: a late request lands after the admission was answered.
const HOLD: Duration = Duration::from_millis(4000);
/// Scheduling slack on a small, busy CI machine.
const SLACK: Duration = Duration::from_millis(500);

/// The external calls of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    ServiceAccountRead,
    AllowancesRead,
    SecretCreate,
    RecordWrite,
    UndoRetract,
    UndoSecretDelete,
    DeleteRecordRead,
    DeleteRecordRetract,
    DeleteSecretDelete,
}

impl Call {
    const ALL: [Self; 9] = [
        Self::ServiceAccountRead,
        Self::AllowancesRead,
        Self::SecretCreate,
        Self::RecordWrite,
        Self::UndoRetract,
        Self::UndoSecretDelete,
        Self::DeleteRecordRead,
        Self::DeleteRecordRetract,
        Self::DeleteSecretDelete,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::ServiceAccountRead => "CREATE: ServiceAccount read",
            Self::AllowancesRead => "CREATE: Allowances reads",
            Self::SecretCreate => "CREATE: Secret create",
            Self::RecordWrite => "CREATE: record write",
            Self::UndoRetract => "CREATE undo: record retraction (after a record write reset)",
            Self::UndoSecretDelete => "CREATE undo: Secret delete (after a record write 5xx)",
            Self::DeleteRecordRead => "DELETE: record read",
            Self::DeleteRecordRetract => "DELETE: record retraction",
            Self::DeleteSecretDelete => "DELETE: Secret delete",
        }
    }

    fn is_delete(self) -> bool {
        matches!(
            self,
            Self::DeleteRecordRead | Self::DeleteRecordRetract | Self::DeleteSecretDelete
        )
    }
}

struct World {
    _moto: Moto,
    dynamo: DynamoFaults,
    kube: KubeApi,
    tables: Tables,
    /// Straight to moto, for set-up and counting (never through the faults).
    direct_tokens: DynamoTokenStore,
    direct_allowances: DynamoAllowanceStore,
    webhook: Webhook,
}

async fn world() -> World {
    let moto = Moto::start().await.unwrap();
    let sdk = moto.sdk_config().await;
    let tables = Tables::create(&sdk, "matrix").await.unwrap();
    let dynamo = DynamoFaults::start(&moto.endpoint).await.unwrap();
    let faulty = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(&dynamo.endpoint)
        .region(Region::new(REGION))
        .credentials_provider(Credentials::new(
            MOTO_ACCESS_KEY,
            MOTO_SECRET_KEY,
            None,
            None,
            "test",
        ))
        .timeout_config(iam_broker_aws::sdk::timeouts(CALL))
        .retry_config(RetryConfig::standard().with_max_attempts(2))
        .load()
        .await;
    let faulty = aws_sdk_dynamodb::Client::new(&faulty);
    let direct = aws_sdk_dynamodb::Client::new(&sdk);
    let kube = KubeApi::start().await.unwrap();
    let cluster = KubeCluster::new(
        ClientSource::Kubeconfig(kube.kubeconfig(DEFAULT_TOKEN)),
        CALL,
    );
    let settings = WebhookSettings {
        inject: InjectSettings {
            injection: InjectionMode::Sidecar,
            proxy_image: Some("proxy:1".to_owned()),
            port: 53080,
            mode: SidecarMode::Container,
            token_file: false,
            region: None,
            broker_ca_pem: None,
        },
        role_annotation: ANNOTATION.to_owned(),
        broker_url: Some("https://broker.example/Prod/".to_owned()),
        token_ttl: Duration::from_secs(86_400),
        failure_policy: FailurePolicy::Open,
        forward_budget: FORWARD,
        undo_budget: UNDO,
        path_secret: None,
        identity: iam_broker_admission::webhook::WebhookIdentity::Secret,
        scope: None,
        default_cluster: None,
        service_account_lookup: true,
    };
    let webhook = Webhook::new(
        Arc::new(cluster),
        Arc::new(DynamoAllowanceStore::new(
            faulty.clone(),
            &tables.allowances,
        )),
        Arc::new(DynamoTokenStore::new(faulty, &tables.authorizations)),
        Arc::new(SystemClock),
        settings,
    );
    World {
        direct_tokens: DynamoTokenStore::new(direct.clone(), &tables.authorizations),
        direct_allowances: DynamoAllowanceStore::new(direct, &tables.allowances),
        _moto: moto,
        dynamo,
        kube,
        tables,
        webhook,
    }
}

fn pod(namespace: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "app-1", "namespace": namespace },
        "spec": { "serviceAccountName": "app",
            "containers": [{ "name": "app", "image": "busybox" }] } })
}

fn review(operation: &str, namespace: &str, object: &Value) -> AdmissionRequest {
    let (object, old_object) = if operation == "DELETE" {
        (Value::Null, object.clone())
    } else {
        (object.clone(), Value::Null)
    };
    let body = json!({ "apiVersion": review::V1, "kind": "AdmissionReview", "request": {
        "uid": format!("uid-{namespace}"), "kind": { "group": "", "version": "v1", "kind": "Pod" },
        "namespace": namespace, "operation": operation, "object": object,
        "oldObject": old_object, "dryRun": false } });
    review::parse(&serde_json::to_vec(&body).unwrap())
        .unwrap()
        .request
}

fn apply(pod: &Value, outcome: &Outcome) -> Value {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(outcome.response.patch.as_ref().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    patched
}

/// What one namespace holds once everything has landed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Count {
    secrets_without_record: usize,
    live_records_without_secret: usize,
    live_pairs: usize,
    tombstones: usize,
}

async fn count(w: &World, namespace: &str) -> Count {
    let secrets: Vec<_> = w
        .kube
        .managed_secrets()
        .into_iter()
        .filter(|(ns, _, _)| ns == namespace)
        .collect();
    let records: Vec<_> = w
        .direct_tokens
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.subject.namespace == namespace)
        .collect();
    let hashes: BTreeSet<&str> = records.iter().map(|r| r.token_hash.as_str()).collect();
    let names: BTreeSet<&str> = secrets.iter().map(|(_, n, _)| n.as_str()).collect();
    let now = time::OffsetDateTime::now_utc();
    let live: Vec<_> = records
        .iter()
        .filter(|r| !r.is_retracted() && !r.is_expired(now))
        .collect();
    Count {
        secrets_without_record: secrets
            .iter()
            .filter(|(_, _, hash)| !hash.as_deref().is_some_and(|h| hashes.contains(h)))
            .count(),
        live_records_without_secret: live
            .iter()
            .filter(|r| !r.secret_name.as_deref().is_some_and(|n| names.contains(n)))
            .count(),
        live_pairs: live
            .iter()
            .filter(|r| r.secret_name.as_deref().is_some_and(|n| names.contains(n)))
            .count(),
        tombstones: records.iter().filter(|r| r.is_retracted()).count(),
    }
}

/// Installs the fault of one cell; every rule is scoped to the cell's namespace (or its token
/// hash), so the cells of a row run side by side without touching each other.
fn inject(w: &World, call: Call, fault: WireFault, namespace: &str, hash: Option<&str>) {
    let (allowances, authorizations) = (&w.tables.allowances, &w.tables.authorizations);
    let secrets = format!("/namespaces/{namespace}/secrets");
    let insert = DynamoCall::new("PutItem", &[authorizations, namespace]).lacking("retracted_at");
    let retract = DynamoCall::new("PutItem", &[authorizations, namespace, "retracted_at"]);
    match call {
        Call::ServiceAccountRead => w.kube.inject(Fault::wire(
            Method::GET,
            &format!("/namespaces/{namespace}/serviceaccounts/"),
            fault,
        )),
        Call::AllowancesRead => w.dynamo.inject(
            DynamoCall::new("BatchGetItem", &[allowances, &format!("\"{namespace}\"")]),
            fault,
        ),
        Call::SecretCreate => w.kube.inject(Fault::wire(Method::POST, &secrets, fault)),
        Call::RecordWrite => w.dynamo.inject(insert, fault),
        Call::UndoRetract => {
            w.dynamo.inject(insert, WireFault::ResetAfterSent);
            w.dynamo.inject(retract, fault);
        }
        Call::UndoSecretDelete => {
            w.dynamo.inject(insert, WireFault::ServerError);
            w.kube.inject(Fault::wire(Method::DELETE, &secrets, fault));
        }
        Call::DeleteRecordRead => w.dynamo.inject(
            DynamoCall::new("GetItem", &[authorizations, hash.unwrap_or("-")]),
            fault,
        ),
        Call::DeleteRecordRetract => w.dynamo.inject(retract, fault),
        Call::DeleteSecretDelete => w.kube.inject(Fault::wire(Method::DELETE, &secrets, fault)),
    }
}

/// The measured outcome of one cell.
struct Cell {
    decision: Decision,
    elapsed: Duration,
    count: Count,
}

impl Cell {
    fn text(&self) -> String {
        let mut text = format!(
            "{} in {:.2} s; orphans {}/{}",
            self.decision.as_str(),
            self.elapsed.as_secs_f64(),
            self.count.secrets_without_record,
            self.count.live_records_without_secret
        );
        if self.count.live_pairs > 0 {
            text.push_str(&format!("; {} live pair", self.count.live_pairs));
        }
        if self.count.tombstones > 0 {
            text.push_str("; tombstone");
        }
        text
    }
}

async fn run_cell(w: &World, call: Call, fault: WireFault, namespace: String) -> Cell {
    w.kube
        .put_service_account(&namespace, "app", &[(ANNOTATION, ROLE)]);
    let subject = Subject::service_account(&namespace, "app").unwrap();
    w.direct_allowances
        .allow(&subject, ROLE, None)
        .await
        .unwrap();
    let pod = pod(&namespace);
    let (request, hash) = if call.is_delete() {
        // A pod admitted without faults (a busy machine may miss a scaled-down budget once:
        // that admission undoes itself, and the next try starts afresh), then deleted under one.
        let create = review("CREATE", &namespace, &pod);
        let admit = || w.webhook.admit(&create, None);
        let mut created = admit().await;
        for _ in 0..2 {
            if created.decision == Decision::Patched {
                break;
            }
            created = admit().await;
        }
        assert_eq!(created.decision, Decision::Patched, "{}", created.reason);
        let running = apply(&pod, &created);
        let hash = running["metadata"]["annotations"]["iam-broker.io/token-hash"]
            .as_str()
            .unwrap()
            .to_owned();
        (review("DELETE", &namespace, &running), Some(hash))
    } else {
        (review("CREATE", &namespace, &pod), None)
    };
    inject(w, call, fault, &namespace, hash.as_deref());
    let started = Instant::now();
    let outcome = w.webhook.admit(&request, None).await;
    let elapsed = started.elapsed();
    // Everything held or answered late lands before the count.
    tokio::time::sleep(HOLD + SLACK).await;
    w.kube.settled().await;
    w.dynamo.settled().await;
    let count = count(w, &namespace).await;
    if outcome.decision == Decision::Patched {
        let patched = apply(&pod, &outcome);
        let name = patched["metadata"]["annotations"]["iam-broker.io/secret-name"]
            .as_str()
            .unwrap();
        assert!(
            w.kube.secret(&namespace, name).is_some(),
            "{}/{}: a patched pod's Secret exists",
            call.name(),
            fault.name()
        );
    }
    Cell {
        decision: outcome.decision,
        elapsed,
        count,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_orphans_under_any_single_fault_of_the_wire() {
    let w = world().await;
    let budget = FORWARD + UNDO + EVENT_BUDGET + SLACK;
    let mut table = String::from(
        "| call | refused | reset after sent | 5xx | throttled | answered after deadline | success after deadline |\n|---|---|---|---|---|---|---|\n",
    );
    let mut failures = Vec::new();
    for (row, call) in Call::ALL.into_iter().enumerate() {
        let cells = futures::future::join_all(
            WireFault::all(HOLD)
                .into_iter()
                .enumerate()
                .map(|(column, fault)| run_cell(&w, call, fault, format!("r{row}-f{column}"))),
        )
        .await;
        table.push_str(&format!("| {} |", call.name()));
        for (cell, fault) in cells.iter().zip(WireFault::all(HOLD)) {
            table.push_str(&format!(" {} |", cell.text()));
            let orphans =
                cell.count.secrets_without_record + cell.count.live_records_without_secret;
            if orphans > 0 || cell.elapsed > budget {
                failures.push(format!(
                    "{} / {}: {}",
                    call.name(),
                    fault.name(),
                    cell.text()
                ));
            }
            if call.is_delete() && cell.decision == Decision::CleanedUp {
                assert_eq!(
                    cell.count.live_pairs, 0,
                    "a cleaned-up pod leaves no live pair"
                );
            }
        }
        table.push('\n');
    }
    assert!(w.dynamo.hits() > 0, "the DynamoDB faults were applied");
    let path = iam_broker_tests::workspace_root().join("target/fault-matrix.md");
    std::fs::write(&path, &table).unwrap();
    println!("{table}");
    assert!(
        failures.is_empty(),
        "cells with orphans or over the {budget:?} budget:\n{}\n\n{table}",
        failures.join("\n")
    );
}
