//! [`AllowanceStore`] and [`TokenStore`] on DynamoDB (the cluster registry is in
//! [`crate::clusters`]). Items are converted next to the adapter;
//! SDK errors are explained ([`crate::sdk::AwsError`], [`MissingTable`]) and kept as the `source`
//! of [`StoreError`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes, ReturnValue};
use iam_broker_kernel::allowance::{Allowance, Revocation, RoleArn, RoleTerms, Row, Subject};
use iam_broker_kernel::cluster::ClusterName;
use iam_broker_kernel::config::{
    ENV_ALLOWANCES_TABLE, ENV_AUTHORIZATIONS_TABLE, ENV_CLUSTERS_TABLE,
};
use iam_broker_kernel::ports::{
    AllowanceStore, BoxError, RevocationChange, StoreError, TokenStore, as_row,
};
use iam_broker_kernel::text::quoted;
use iam_broker_kernel::{TokenHash, TokenRecord};

use crate::sdk::{SdkFailure, Service, error_code, explain};

pub(crate) type Item = HashMap<String, AttributeValue>;

/// How many times a `BatchGetItem` is sent while DynamoDB leaves keys unprocessed.
const BATCH_ATTEMPTS: u32 = 4;
/// The wait before the first re-send of unprocessed keys; doubled each time (10, 20, 40 ms).
const BATCH_BACKOFF: std::time::Duration = std::time::Duration::from_millis(10);

/// Attribute names of the Allowances table.
pub mod allowance_attributes {
    /// Hash key.
    pub const NAMESPACE: &str = "namespace";
    /// Range key.
    pub const SERVICE_ACCOUNT: &str = "service_account";
    /// String set of role ARNs.
    pub const ALLOWED_ROLES: &str = "allowed_roles";
    /// Prefix of the attributes holding a role's `ExternalId`: `external_id:<role ARN>` (one
    /// top-level attribute per role, so one `UpdateItem` adds a role and sets its id).
    pub const EXTERNAL_ID_PREFIX: &str = "external_id:";
    /// Prefix of the per-role session policy attributes (`session_policy:<role ARN>`).
    pub const SESSION_POLICY_PREFIX: &str = "session_policy:";
    /// Number: when the row's whole scope was revoked (`iam-broker sessions revoke`).
    pub const REVOKED_AT: &str = "revoked_at";
    /// String set: pods of the row's ServiceAccount revoked one by one.
    pub const REVOKED_PODS: &str = "revoked_pods";
    /// String set: roles whose inline deny holds a statement of this row's scope.
    pub const DENIED_ROLES: &str = "denied_roles";
}

/// Attribute names of the Authorizations table.
pub mod token_attributes {
    /// Hash key: lowercase hex SHA-256 of the token.
    pub const TOKEN_HASH: &str = "token_hash";
    /// Namespace of the ServiceAccount.
    pub const NAMESPACE: &str = "namespace";
    /// ServiceAccount name.
    pub const SERVICE_ACCOUNT: &str = "service_account";
    /// The role.
    pub const ROLE_ARN: &str = "role_arn";
    /// Secret holding the token.
    pub const SECRET_NAME: &str = "secret_name";
    /// Pod name or generateName prefix.
    pub const POD_NAME: &str = "pod_name";
    /// Epoch seconds.
    pub const CREATED_AT: &str = "created_at";
    /// Epoch seconds.
    pub const LAST_USED: &str = "last_used";
    /// Epoch seconds; the TTL attribute.
    pub const EXPIRES: &str = "expires";
    /// Epoch seconds; present only on a tombstone (a retracted record).
    pub const RETRACTED_AT: &str = "retracted_at";
}

use allowance_attributes as aa;
use token_attributes as ta;

/// A table that is not where the process looks for it: a wrong name, or the wrong region.
#[derive(Debug, thiserror::Error)]
#[error(
    "table {table} does not exist in {region}: set {variable} to the name of the {role} table, \
     or pass --stack <name> / set IAM_BROKER_STACK to read it from the stack's outputs"
)]
pub struct MissingTable {
    /// The table name.
    pub table: String,
    /// The region the client looked in.
    pub region: String,
    /// `ALLOWANCES_TABLE`, `AUTHORIZATIONS_TABLE` or `CLUSTERS_TABLE`.
    pub variable: &'static str,
    /// `Allowances`, `Authorizations` or `Clusters`.
    pub role: &'static str,
    /// The SDK's error (`ResourceNotFoundException`).
    #[source]
    pub source: BoxError,
}

/// Which of the tables (ARCHITECTURE.md, "Data") a name stands for, and the variable that sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableRole {
    /// The Allowances table (`ALLOWANCES_TABLE`).
    Allowances,
    /// The Authorizations table (`AUTHORIZATIONS_TABLE`).
    Authorizations,
    /// The cluster registry (`CLUSTERS_TABLE`).
    Clusters,
}

impl TableRole {
    /// `Allowances`, `Authorizations` or `Clusters`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Allowances => "Allowances",
            Self::Authorizations => "Authorizations",
            Self::Clusters => "Clusters",
        }
    }

    /// The variable that names the table.
    pub fn variable(self) -> &'static str {
        match self {
            Self::Allowances => ENV_ALLOWANCES_TABLE,
            Self::Authorizations => ENV_AUTHORIZATIONS_TABLE,
            Self::Clusters => ENV_CLUSTERS_TABLE,
        }
    }
}

/// Explains a failed call on `table`: [`MissingTable`] for `ResourceNotFoundException`, else
/// [`crate::sdk::AwsError`].
pub(crate) fn table_error<E>(
    client: &Client,
    table: &str,
    role: TableRole,
    error: SdkError<E, HttpResponse>,
) -> BoxError
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
{
    let region = client.config().region();
    if error_code(&error).as_deref() == Some("ResourceNotFoundException") {
        return Box::new(MissingTable {
            table: table.to_owned(),
            region: region.map_or_else(|| "the configured region".to_owned(), ToString::to_string),
            variable: role.variable(),
            role: role.name(),
            source: Box::new(SdkFailure::new(error)),
        });
    }
    Box::new(explain(Service::DynamoDb, region, error))
}

/// What every DynamoDB adapter holds: the client, the table's name and which table it is, with
/// the two ways a call on it fails (unreachable, or a row that cannot be read).
#[derive(Debug, Clone)]
pub(crate) struct Table {
    pub(crate) client: Client,
    pub(crate) name: String,
    role: TableRole,
}

impl Table {
    pub(crate) fn new(client: Client, name: impl Into<String>, role: TableRole) -> Self {
        Self {
            client,
            name: name.into(),
            role,
        }
    }

    /// A failed call as [`StoreError::Unavailable`], explained ([`table_error`]).
    pub(crate) fn unavailable<E>(&self, error: SdkError<E, HttpResponse>) -> StoreError
    where
        E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
    {
        StoreError::Unavailable {
            store: format!("DynamoDB table {}", self.name),
            maybe_written: may_have_written(&error),
            source: table_error(&self.client, &self.name, self.role, error),
        }
    }

    /// A row that cannot be read, as [`StoreError::Corrupt`].
    pub(crate) fn corrupt(&self, message: impl Into<String>) -> StoreError {
        corrupt(&self.name, message)
    }
}

/// Whether a write that failed with `error` may have landed: only a refusal that every attempt
/// (retries included) would meet for certain proves it did not. A throttled or 5xx final
/// attempt says nothing about an earlier attempt that timed out.
fn may_have_written<E: ProvideErrorMetadata, R>(error: &SdkError<E, R>) -> bool {
    const DETERMINISTIC: &[&str] = &[
        "ResourceNotFoundException",
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "MissingAuthenticationTokenException",
        "ValidationException",
    ];
    match error {
        SdkError::ConstructionFailure(_) => false,
        SdkError::ServiceError(e) => !e.err().code().is_some_and(|c| DETERMINISTIC.contains(&c)),
        _ => true,
    }
}

pub(crate) fn is_conditional_failure<E: ProvideErrorMetadata, R>(error: &SdkError<E, R>) -> bool {
    matches!(error, SdkError::ServiceError(e) if e.err().code() == Some("ConditionalCheckFailedException"))
}

pub(crate) fn corrupt(table: &str, message: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        store: format!("DynamoDB table {table}"),
        message: message.into(),
    }
}

pub(crate) fn string(item: &Item, name: &str) -> Option<String> {
    item.get(name).and_then(|v| v.as_s().ok()).cloned()
}

pub(crate) fn number(item: &Item, name: &str) -> Option<i64> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse().ok())
}

/// The Allowances table.
#[derive(Debug, Clone)]
pub struct DynamoAllowanceStore {
    table: Table,
}

impl DynamoAllowanceStore {
    /// Wraps a client and the table name.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            table: Table::new(client, table, TableRole::Allowances),
        }
    }

    fn key(subject: &Subject) -> Item {
        HashMap::from([
            (
                aa::NAMESPACE.to_owned(),
                AttributeValue::S(subject.partition()),
            ),
            (
                aa::SERVICE_ACCOUNT.to_owned(),
                AttributeValue::S(subject.service_account.clone()),
            ),
        ])
    }

    fn read_item(&self, item: &Item) -> Result<Allowance, StoreError> {
        let (Some(partition), Some(service_account)) = (
            string(item, aa::NAMESPACE),
            string(item, aa::SERVICE_ACCOUNT),
        ) else {
            return Err(self.table.corrupt("an allowance without its keys"));
        };
        // `<cluster>/<namespace>` outside the default cluster (see `Subject::partition`).
        let (cluster, namespace) = match partition.split_once('/') {
            Some((cluster, namespace)) => (
                Some(ClusterName::parse(cluster).map_err(|e| {
                    self.table
                        .corrupt(format!("the namespace key's cluster: {e}"))
                })?),
                namespace.to_owned(),
            ),
            None => (None, partition),
        };
        let mut external_ids = BTreeMap::new();
        let mut session_policies = BTreeMap::new();
        for (name, value) in item {
            let (map, role) = if let Some(role) = name.strip_prefix(aa::EXTERNAL_ID_PREFIX) {
                (&mut external_ids, role)
            } else if let Some(role) = name.strip_prefix(aa::SESSION_POLICY_PREFIX) {
                (&mut session_policies, role)
            } else {
                continue;
            };
            let text = value
                .as_s()
                .map_err(|_| self.table.corrupt(format!("{name} is not a string")))?;
            map.insert(role.to_owned(), text.clone());
        }
        let allowed_roles = item
            .get(aa::ALLOWED_ROLES)
            .map(|v| match v {
                AttributeValue::Ss(roles) => Ok(roles.iter().cloned().collect::<BTreeSet<_>>()),
                // A plain string is accepted too: hand-made rows from the console often are.
                AttributeValue::S(role) => Ok(BTreeSet::from([role.clone()])),
                AttributeValue::L(list) => {
                    Ok(list.iter().filter_map(|v| v.as_s().ok().cloned()).collect())
                }
                _ => Err(self.table.corrupt("allowed_roles is not a string set")),
            })
            .transpose()?
            .unwrap_or_default();
        let string_set = |name: &str| {
            item.get(name)
                .map(|v| match v {
                    AttributeValue::Ss(values) => Ok(values.iter().cloned().collect()),
                    _ => Err(self.table.corrupt(format!("{name} is not a string set"))),
                })
                .transpose()
                .map(Option::unwrap_or_default)
        };
        let revocation = Revocation {
            at: item
                .get(aa::REVOKED_AT)
                .map(|v| {
                    v.as_n()
                        .ok()
                        .and_then(|n| n.parse::<i64>().ok())
                        .ok_or_else(|| self.table.corrupt("revoked_at is not a number"))
                })
                .transpose()?,
            pods: string_set(aa::REVOKED_PODS)?,
            denied_roles: string_set(aa::DENIED_ROLES)?,
        };
        Ok(Allowance {
            subject: Subject {
                cluster,
                namespace,
                service_account,
            },
            allowed_roles,
            external_ids,
            session_policies,
            revocation,
        })
    }
}

impl DynamoAllowanceStore {
    /// Sends an `UpdateItem` (`ReturnValues: ALL_NEW`) and reads the row it left; `None` when
    /// its condition did not hold.
    async fn updated(
        &self,
        update: aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder,
    ) -> Result<Option<Allowance>, StoreError> {
        let output = match update.return_values(ReturnValue::AllNew).send().await {
            Ok(output) => output,
            Err(e) if is_conditional_failure(&e) => return Ok(None),
            Err(e) => return Err(self.table.unavailable(e)),
        };
        output
            .attributes
            .as_ref()
            .map(|item| self.read_item(item))
            .transpose()
    }

    /// Deletes the row unless it carries a revocation (which must outlive its roles) or, with
    /// `only_without_roles`, a role (one re-added meanwhile). Whether it was deleted.
    async fn delete_bare(
        &self,
        subject: &Subject,
        only_without_roles: bool,
    ) -> Result<bool, StoreError> {
        let mut condition = "attribute_not_exists(#rev) AND attribute_not_exists(#pods) AND \
                             attribute_not_exists(#denied)"
            .to_owned();
        let mut delete = self
            .table
            .client
            .delete_item()
            .table_name(&self.table.name)
            .set_key(Some(Self::key(subject)))
            .expression_attribute_names("#rev", aa::REVOKED_AT)
            .expression_attribute_names("#pods", aa::REVOKED_PODS)
            .expression_attribute_names("#denied", aa::DENIED_ROLES);
        if only_without_roles {
            condition.push_str(" AND attribute_not_exists(#roles)");
            delete = delete.expression_attribute_names("#roles", aa::ALLOWED_ROLES);
        }
        match delete.condition_expression(condition).send().await {
            Ok(_) => Ok(true),
            Err(e) if is_conditional_failure(&e) => Ok(false),
            Err(e) => Err(self.table.unavailable(e)),
        }
    }

    /// Removes `row`'s roles (with their `ExternalId`s and session policies), keeping the rest.
    async fn remove_roles(
        &self,
        subject: &Subject,
        row: &Allowance,
    ) -> Result<Option<Allowance>, StoreError> {
        let mut update = self
            .table
            .client
            .update_item()
            .table_name(&self.table.name)
            .set_key(Some(Self::key(subject)))
            .expression_attribute_names("#roles", aa::ALLOWED_ROLES);
        let mut names = vec!["#roles".to_owned()];
        for (i, role) in row.allowed_roles.iter().enumerate() {
            update = update
                .expression_attribute_names(
                    format!("#e{i}"),
                    format!("{}{role}", aa::EXTERNAL_ID_PREFIX),
                )
                .expression_attribute_names(
                    format!("#p{i}"),
                    format!("{}{role}", aa::SESSION_POLICY_PREFIX),
                );
            names.push(format!("#e{i}"));
            names.push(format!("#p{i}"));
        }
        self.updated(update.update_expression(format!("REMOVE {}", names.join(", "))))
            .await
    }
}

#[async_trait]
impl AllowanceStore for DynamoAllowanceStore {
    async fn allowance(&self, subject: &Subject) -> Result<Option<Allowance>, StoreError> {
        let output = self
            .table
            .client
            .get_item()
            .table_name(&self.table.name)
            .set_key(Some(Self::key(subject)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.table.unavailable(e))?;
        output
            .item
            .as_ref()
            .map(|item| self.read_item(item))
            .transpose()
    }

    /// Both rows in one consistent `BatchGetItem` (one round trip and one signature instead of
    /// two); see [`Self::rows_for_all`].
    async fn rows_for(&self, subject: &Subject) -> Result<[Row; 2], StoreError> {
        let rows = self.rows_for_all(std::slice::from_ref(subject)).await?;
        match <[Row; 2]>::try_from(rows) {
            Ok(rows) => Ok(rows),
            Err(rows) => Err(StoreError::Unavailable {
                store: self.table.name.clone(),
                maybe_written: false,
                source: format!("{} rows read for one subject", rows.len()).into(),
            }),
        }
    }

    /// Every subject's exact and `*` rows in one consistent `BatchGetItem` (one round trip and
    /// one signature however many subjects; each distinct key asked once). Keys DynamoDB leaves
    /// unprocessed (partial throttling) are asked again a few times, with a short backoff,
    /// within the call's deadline.
    async fn rows_for_all(&self, subjects: &[Subject]) -> Result<Vec<Row>, StoreError> {
        // The rows in answer order: each subject's exact row, then its namespace's `*` row.
        let wanted: Vec<Subject> = subjects
            .iter()
            .flat_map(|s| [s.clone(), s.wildcard()])
            .collect();
        let mut distinct: Vec<&Subject> = Vec::new();
        for subject in &wanted {
            if !distinct.contains(&subject) {
                distinct.push(subject);
            }
        }
        if distinct.is_empty() {
            return Ok(Vec::new());
        }
        let mut keys = KeysAndAttributes::builder().consistent_read(true);
        for subject in &distinct {
            keys = keys.keys(Self::key(subject));
        }
        let keys = keys.build().map_err(|e| StoreError::Unavailable {
            store: self.table.name.clone(),
            maybe_written: false,
            source: Box::new(e),
        })?;
        let mut request = HashMap::from([(self.table.name.clone(), keys)]);
        let mut found: HashMap<(String, String), Row> = HashMap::new();
        for attempt in 0..BATCH_ATTEMPTS {
            let output = self
                .table
                .client
                .batch_get_item()
                .set_request_items(Some(request))
                .send()
                .await
                .map_err(|e| self.table.unavailable(e))?;
            for item in output
                .responses
                .and_then(|mut tables| tables.remove(&self.table.name))
                .unwrap_or_default()
            {
                // The answer holds only keys asked for: its two key attributes say which.
                let key = (
                    string(&item, aa::NAMESPACE).unwrap_or_default(),
                    string(&item, aa::SERVICE_ACCOUNT).unwrap_or_default(),
                );
                let Some(subject) = distinct
                    .iter()
                    .find(|s| (s.partition(), s.service_account.clone()) == key)
                else {
                    continue;
                };
                found.insert(key, as_row(subject, self.read_item(&item).map(Some))?);
            }
            match output.unprocessed_keys.filter(|keys| !keys.is_empty()) {
                None => {
                    return Ok(wanted
                        .iter()
                        .map(|s| {
                            found
                                .get(&(s.partition(), s.service_account.clone()))
                                .cloned()
                                .unwrap_or(Row::Absent)
                        })
                        .collect());
                }
                Some(unprocessed) => {
                    request = unprocessed;
                    tokio::time::sleep(BATCH_BACKOFF * 2u32.pow(attempt)).await;
                }
            }
        }
        Err(StoreError::Unavailable {
            store: self.table.name.clone(),
            maybe_written: false,
            source: format!(
                "BatchGetItem left keys unprocessed {BATCH_ATTEMPTS} times (throttled)"
            )
            .into(),
        })
    }

    async fn allow_with(
        &self,
        subject: &Subject,
        role_arn: &str,
        terms: &RoleTerms,
    ) -> Result<Allowance, StoreError> {
        let mut update = self
            .table
            .client
            .update_item()
            .table_name(&self.table.name)
            .set_key(Some(Self::key(subject)))
            .expression_attribute_names("#roles", aa::ALLOWED_ROLES)
            .expression_attribute_names("#ext", format!("{}{role_arn}", aa::EXTERNAL_ID_PREFIX))
            .expression_attribute_names("#pol", format!("{}{role_arn}", aa::SESSION_POLICY_PREFIX))
            .expression_attribute_values(":role", AttributeValue::Ss(vec![role_arn.to_owned()]));
        // One write: the role, its ExternalId and its session policy land together or not at all.
        let (mut set, mut remove) = (Vec::new(), Vec::new());
        match &terms.external_id {
            Some(id) => {
                set.push("#ext = :ext");
                update = update.expression_attribute_values(":ext", AttributeValue::S(id.clone()));
            }
            None => remove.push("#ext"),
        }
        match &terms.session_policy {
            Some(policy) => {
                set.push("#pol = :pol");
                update = update.expression_attribute_values(
                    ":pol",
                    AttributeValue::S(policy.as_str().to_owned()),
                );
            }
            None => remove.push("#pol"),
        }
        let mut expression = "ADD #roles :role".to_owned();
        if !set.is_empty() {
            expression.push_str(&format!(" SET {}", set.join(", ")));
        }
        if !remove.is_empty() {
            expression.push_str(&format!(" REMOVE {}", remove.join(", ")));
        }
        update = update.update_expression(expression);
        let output = update
            .return_values(ReturnValue::AllNew)
            .send()
            .await
            .map_err(|e| self.table.unavailable(e))?;
        let item = output
            .attributes
            .ok_or_else(|| self.table.corrupt("UpdateItem returned no attributes"))?;
        self.read_item(&item)
    }

    async fn disallow(
        &self,
        subject: &Subject,
        role_arn: Option<&str>,
    ) -> Result<Option<Allowance>, StoreError> {
        if let Some(role_arn) = role_arn {
            let update = self
                .table
                .client
                .update_item()
                .table_name(&self.table.name)
                .set_key(Some(Self::key(subject)))
                .update_expression("DELETE #roles :role REMOVE #ext, #pol")
                .condition_expression("attribute_exists(#ns)")
                .expression_attribute_names("#roles", aa::ALLOWED_ROLES)
                .expression_attribute_names("#ext", format!("{}{role_arn}", aa::EXTERNAL_ID_PREFIX))
                .expression_attribute_names(
                    "#pol",
                    format!("{}{role_arn}", aa::SESSION_POLICY_PREFIX),
                )
                .expression_attribute_names("#ns", aa::NAMESPACE)
                .expression_attribute_values(
                    ":role",
                    AttributeValue::Ss(vec![role_arn.to_owned()]),
                );
            // `None`: there was no row.
            let Some(remaining) = self.updated(update).await? else {
                return Ok(None);
            };
            if !remaining.allowed_roles.is_empty() {
                return Ok(Some(remaining));
            }
        }
        // Remove the row: all roles were asked for, or the last one just went. A role someone
        // re-added in between stays, and so does a row that carries a revocation.
        if self.delete_bare(subject, role_arn.is_some()).await? {
            return Ok(None);
        }
        match (role_arn, self.allowance(subject).await?) {
            // Every role withdrawn from a revoked row: the roles go, the revocation stays.
            (None, Some(row)) if !row.allowed_roles.is_empty() => {
                self.remove_roles(subject, &row).await
            }
            (_, row) => Ok(row),
        }
    }

    async fn revise(
        &self,
        subject: &Subject,
        change: &RevocationChange,
    ) -> Result<Option<Allowance>, StoreError> {
        use RevocationChange as C;
        let set = |values: &[String]| AttributeValue::Ss(values.to_vec());
        let mut update = self
            .table
            .client
            .update_item()
            .table_name(&self.table.name)
            .set_key(Some(Self::key(subject)));
        let with_roles = |expression: &str, roles: &[String]| {
            if roles.is_empty() {
                expression.to_owned()
            } else {
                format!("{expression} ADD #denied :roles")
            }
        };
        let (expression, roles): (String, &[String]) = match change {
            C::Scope { at, denied_roles } => {
                update = update
                    .expression_attribute_names("#rev", aa::REVOKED_AT)
                    .expression_attribute_values(":at", AttributeValue::N(at.to_string()));
                (with_roles("SET #rev = :at", denied_roles), denied_roles)
            }
            C::Pod { pod, denied_roles } => {
                update = update
                    .expression_attribute_names("#pods", aa::REVOKED_PODS)
                    .expression_attribute_values(":pod", set(std::slice::from_ref(pod)));
                let expression = if denied_roles.is_empty() {
                    "ADD #pods :pod".to_owned()
                } else {
                    "ADD #pods :pod, #denied :roles".to_owned()
                };
                (expression, denied_roles)
            }
            C::LiftScope => {
                update = update
                    .expression_attribute_names("#rev", aa::REVOKED_AT)
                    .condition_expression("attribute_exists(#ns)")
                    .expression_attribute_names("#ns", aa::NAMESPACE);
                ("REMOVE #rev".to_owned(), &[][..])
            }
            C::LiftPod(pod) => {
                update = update
                    .expression_attribute_names("#pods", aa::REVOKED_PODS)
                    .expression_attribute_values(":pod", set(std::slice::from_ref(pod)))
                    .condition_expression("attribute_exists(#ns)")
                    .expression_attribute_names("#ns", aa::NAMESPACE);
                ("DELETE #pods :pod".to_owned(), &[][..])
            }
            C::Undenied(roles) if roles.is_empty() => return self.allowance(subject).await,
            C::Undenied(roles) => {
                update = update
                    .expression_attribute_names("#denied", aa::DENIED_ROLES)
                    .expression_attribute_values(":roles", set(roles))
                    .condition_expression("attribute_exists(#ns)")
                    .expression_attribute_names("#ns", aa::NAMESPACE);
                ("DELETE #denied :roles".to_owned(), &[][..])
            }
        };
        if !roles.is_empty() {
            update = update
                .expression_attribute_names("#denied", aa::DENIED_ROLES)
                .expression_attribute_values(":roles", set(roles));
        }
        let row = self.updated(update.update_expression(expression)).await?;
        // A row that only held a lifted revocation goes, as `disallow` leaves none behind; one
        // that got roles or a revocation meanwhile stays.
        match row {
            Some(row) if row.allowed_roles.is_empty() && row.revocation.is_empty() => {
                if self.delete_bare(subject, true).await? {
                    Ok(None)
                } else {
                    self.allowance(subject).await
                }
            }
            other => Ok(other),
        }
    }

    async fn list(&self, partition: Option<&str>) -> Result<Vec<Allowance>, StoreError> {
        let pages: Vec<Item> = match partition {
            Some(namespace) => self
                .table
                .client
                .query()
                .table_name(&self.table.name)
                .key_condition_expression("#ns = :ns")
                .expression_attribute_names("#ns", aa::NAMESPACE)
                .expression_attribute_values(":ns", AttributeValue::S(namespace.to_owned()))
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .map_err(|e| self.table.unavailable(e))?,
            None => self
                .table
                .client
                .scan()
                .table_name(&self.table.name)
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .map_err(|e| self.table.unavailable(e))?,
        };
        // A listing names the row it cannot read (a single read's caller knows its key).
        let mut rows = pages
            .iter()
            .map(|item| {
                self.read_item(item).map_err(|error| match error {
                    StoreError::Corrupt { store, message } => StoreError::Corrupt {
                        store,
                        message: format!(
                            "the row (namespace {}, service_account {}): {message}",
                            quoted(&string(item, aa::NAMESPACE).unwrap_or_default()),
                            quoted(&string(item, aa::SERVICE_ACCOUNT).unwrap_or_default()),
                        ),
                    },
                    other => other,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        rows.sort_by(|a, b| a.subject.cmp(&b.subject));
        Ok(rows)
    }
}

/// The Authorizations table.
#[derive(Debug, Clone)]
pub struct DynamoTokenStore {
    table: Table,
}

impl DynamoTokenStore {
    /// Wraps a client and the table name.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            table: Table::new(client, table, TableRole::Authorizations),
        }
    }

    fn key(hash: &TokenHash) -> Item {
        HashMap::from([(
            ta::TOKEN_HASH.to_owned(),
            AttributeValue::S(hash.as_str().to_owned()),
        )])
    }

    fn to_item(record: &TokenRecord) -> Item {
        let mut item = Self::key(&record.token_hash);
        let s = |v: &str| AttributeValue::S(v.to_owned());
        let n = |v: i64| AttributeValue::N(v.to_string());
        item.insert(ta::NAMESPACE.to_owned(), s(&record.subject.namespace));
        item.insert(
            ta::SERVICE_ACCOUNT.to_owned(),
            s(&record.subject.service_account),
        );
        item.insert(ta::ROLE_ARN.to_owned(), s(record.role_arn.as_str()));
        if let Some(secret) = &record.secret_name {
            item.insert(ta::SECRET_NAME.to_owned(), s(secret));
        }
        if let Some(pod) = &record.pod_name {
            item.insert(ta::POD_NAME.to_owned(), s(pod));
        }
        item.insert(ta::CREATED_AT.to_owned(), n(record.created_at));
        if let Some(last_used) = record.last_used {
            item.insert(ta::LAST_USED.to_owned(), n(last_used));
        }
        item.insert(ta::EXPIRES.to_owned(), n(record.expires));
        if let Some(at) = record.retracted_at {
            item.insert(ta::RETRACTED_AT.to_owned(), n(at));
        }
        item
    }

    fn read_item(&self, item: &Item) -> Result<TokenRecord, StoreError> {
        let required = |name: &str| {
            string(item, name)
                .ok_or_else(|| self.table.corrupt(format!("a token record without {name}")))
        };
        let token_hash = TokenHash::parse(&required(ta::TOKEN_HASH)?).ok_or_else(|| {
            self.table
                .corrupt("token_hash is not lowercase hex SHA-256")
        })?;
        Ok(TokenRecord {
            token_hash,
            subject: Subject {
                cluster: None,
                namespace: required(ta::NAMESPACE)?,
                service_account: required(ta::SERVICE_ACCOUNT)?,
            },
            role_arn: RoleArn::parse(&required(ta::ROLE_ARN)?)
                .map_err(|e| self.table.corrupt(format!("role_arn: {e}")))?,
            secret_name: string(item, ta::SECRET_NAME),
            pod_name: string(item, ta::POD_NAME),
            created_at: number(item, ta::CREATED_AT).unwrap_or_default(),
            last_used: number(item, ta::LAST_USED),
            // A record without a readable expiry is treated as already expired.
            expires: number(item, ta::EXPIRES).unwrap_or(0),
            // A tombstone marker that cannot be read must not pass for a live record.
            retracted_at: match item.get(ta::RETRACTED_AT) {
                None => None,
                Some(_) => Some(number(item, ta::RETRACTED_AT).ok_or_else(|| {
                    self.table
                        .corrupt("retracted_at is not a number of seconds")
                })?),
            },
        })
    }
}

#[async_trait]
impl TokenStore for DynamoTokenStore {
    async fn record(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        let output = self
            .table
            .client
            .get_item()
            .table_name(&self.table.name)
            .set_key(Some(Self::key(hash)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.table.unavailable(e))?;
        output
            .item
            .as_ref()
            .map(|item| self.read_item(item))
            .transpose()
    }

    async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError> {
        match self
            .table
            .client
            .put_item()
            .table_name(&self.table.name)
            .set_item(Some(Self::to_item(record)))
            .condition_expression("attribute_not_exists(#hash)")
            .expression_attribute_names("#hash", ta::TOKEN_HASH)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conditional_failure(&e) => Err(StoreError::AlreadyExists),
            Err(e) => Err(self.table.unavailable(e)),
        }
    }

    async fn touch(
        &self,
        hash: &TokenHash,
        last_used: i64,
        expires: i64,
    ) -> Result<(), StoreError> {
        match self
            .table
            .client
            .update_item()
            .table_name(&self.table.name)
            .set_key(Some(Self::key(hash)))
            .update_expression("SET #used = :used, #expires = :expires")
            // A tombstone is never slid forward (a broker that read the record just before the
            // pod's DELETE retracted it must not keep the tombstone alive for TOKEN_TTL).
            .condition_expression("attribute_exists(#hash) AND attribute_not_exists(#retracted)")
            .expression_attribute_names("#retracted", ta::RETRACTED_AT)
            .expression_attribute_names("#used", ta::LAST_USED)
            .expression_attribute_names("#expires", ta::EXPIRES)
            .expression_attribute_names("#hash", ta::TOKEN_HASH)
            .expression_attribute_values(":used", AttributeValue::N(last_used.to_string()))
            .expression_attribute_values(":expires", AttributeValue::N(expires.to_string()))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conditional_failure(&e) => Err(StoreError::NotFound),
            Err(e) => Err(self.table.unavailable(e)),
        }
    }

    async fn retract(&self, tombstone: &TokenRecord) -> Result<(), StoreError> {
        // Unconditional: whatever is under the hash (nothing, a live record, a record whose
        // insert is still in flight) becomes this tombstone.
        self.table
            .client
            .put_item()
            .table_name(&self.table.name)
            .set_item(Some(Self::to_item(tombstone)))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.table.unavailable(e))
    }

    async fn delete(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        let output = self
            .table
            .client
            .delete_item()
            .table_name(&self.table.name)
            .set_key(Some(Self::key(hash)))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| self.table.unavailable(e))?;
        output
            .attributes
            .as_ref()
            .map(|item| self.read_item(item))
            .transpose()
    }

    async fn list(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let items: Vec<Item> = self
            .table
            .client
            .scan()
            .table_name(&self.table.name)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| self.table.unavailable(e))?;
        let mut records = items
            .iter()
            .map(|item| self.read_item(item))
            .collect::<Result<Vec<_>, _>>()?;
        records.sort_by_key(|r| (r.subject.clone(), r.created_at));
        Ok(records)
    }
}
