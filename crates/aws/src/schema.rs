//! The tables of ARCHITECTURE.md ("Data"), for local set-ups and tests (production tables come from
//! `template.yaml`). Creating them is idempotent.

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::client::Waiters;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    TimeToLiveSpecification,
};

use iam_broker_kernel::ports::BoxError;

use crate::clusters::cluster_attributes as ca;
use crate::dynamodb::{TableRole, allowance_attributes as aa, table_error, token_attributes as ta};
use crate::sdk::{AwsError, Endpoint, Service, explain};

/// What went wrong creating a table.
#[derive(Debug, thiserror::Error)]
#[error("could not create DynamoDB table {table}")]
pub struct SchemaError {
    /// The table.
    pub table: String,
    /// The SDK error.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

fn key(name: &str, kind: KeyType) -> Result<KeySchemaElement, aws_sdk_dynamodb::error::BuildError> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
}

fn string_attribute(
    name: &str,
) -> Result<AttributeDefinition, aws_sdk_dynamodb::error::BuildError> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()
}

/// Creates the Allowances (`namespace` + `service_account`) and Authorizations (`token_hash`,
/// TTL on `expires`) tables, on-demand billing. Tables that already exist are left as they are.
pub async fn create_tables(
    client: &Client,
    allowances_table: &str,
    authorizations_table: &str,
) -> Result<(), SchemaError> {
    let fail = |table: &str| {
        let table = table.to_owned();
        move |source: Box<dyn std::error::Error + Send + Sync>| SchemaError { table, source }
    };
    let allowances = async {
        let keys = vec![
            key(aa::NAMESPACE, KeyType::Hash)?,
            key(aa::SERVICE_ACCOUNT, KeyType::Range)?,
        ];
        let attributes = vec![
            string_attribute(aa::NAMESPACE)?,
            string_attribute(aa::SERVICE_ACCOUNT)?,
        ];
        create(client, allowances_table, keys, attributes).await
    };
    allowances.await.map_err(fail(allowances_table))?;

    let authorizations = async {
        let keys = vec![key(ta::TOKEN_HASH, KeyType::Hash)?];
        let attributes = vec![string_attribute(ta::TOKEN_HASH)?];
        create(client, authorizations_table, keys, attributes).await?;
        client
            .update_time_to_live()
            .table_name(authorizations_table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .enabled(true)
                    .attribute_name(ta::EXPIRES)
                    .build()?,
            )
            .send()
            .await
            .map(|_| ())
            .or_else(|e| {
                // Enabling TTL twice is refused with "already enabled": that is the goal state.
                if e.message().is_some_and(|m| m.contains("already enabled")) {
                    Ok(())
                } else {
                    Err(
                        Box::new(explain(Service::DynamoDb, client.config().region(), e))
                            as BoxError,
                    )
                }
            })
    };
    authorizations.await.map_err(fail(authorizations_table))
}

/// Creates the Clusters table (the cluster registry, `cluster` hash key), on-demand billing.
/// A table that already exists is left as it is.
pub async fn create_clusters_table(client: &Client, table: &str) -> Result<(), SchemaError> {
    let clusters = async {
        let keys = vec![key(ca::CLUSTER, KeyType::Hash)?];
        let attributes = vec![string_attribute(ca::CLUSTER)?];
        create(client, table, keys, attributes).await
    };
    clusters.await.map_err(|source| SchemaError {
        table: table.to_owned(),
        source,
    })
}

async fn create(
    client: &Client,
    table: &str,
    keys: Vec<KeySchemaElement>,
    attributes: Vec<AttributeDefinition>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let created = client
        .create_table()
        .table_name(table)
        .set_key_schema(Some(keys))
        .set_attribute_definitions(Some(attributes))
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await;
    match created {
        Ok(_) => {}
        Err(SdkError::ServiceError(e)) if e.err().code() == Some("ResourceInUseException") => {}
        Err(e) => {
            return Err(Box::new(explain(
                Service::DynamoDb,
                client.config().region(),
                e,
            )));
        }
    }
    client
        .wait_until_table_exists()
        .table_name(table)
        .wait(std::time::Duration::from_secs(60))
        .await
        .map(|_| ())
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
}

/// Why a table does not match its design (ARCHITECTURE.md, "Data"), for `iam-broker doctor`.
#[derive(Debug, thiserror::Error)]
pub enum TableCheckError {
    /// `DescribeTable` failed (e.g. [`MissingTable`](crate::dynamodb::MissingTable), or an
    /// [`AwsError`](crate::sdk::AwsError) naming the region, credentials or endpoint at fault).
    #[error(transparent)]
    Call(BoxError),
    /// The endpoint answered `DescribeTable` without a table: it is not DynamoDB.
    #[error(
        "{endpoint} answered DescribeTable without a table description, which DynamoDB never \
         does: is it DynamoDB?"
    )]
    NoDescription {
        /// Where the call went.
        endpoint: Endpoint,
    },
    /// The table exists with other keys.
    #[error("its keys are {found}, expected {expected}")]
    WrongKeys {
        /// The table's key schema, e.g. `token_hash (HASH)`.
        found: String,
        /// The designed key schema (ARCHITECTURE.md, "Data").
        expected: String,
    },
}

impl TableCheckError {
    /// The explained SDK failure, when the check failed on a call.
    pub fn aws_error(&self) -> Option<&AwsError> {
        match self {
            Self::Call(source) => source.downcast_ref::<AwsError>(),
            _ => None,
        }
    }
}

fn describe_keys(keys: &[(String, KeyType)]) -> String {
    if keys.is_empty() {
        return "none".to_owned();
    }
    keys.iter()
        .map(|(name, kind)| format!("{name} ({})", kind.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks that the `role` table `table` exists with exactly the designed key schema (ARCHITECTURE.md, "Data")
/// (`DescribeTable`), for `iam-broker doctor`.
pub async fn check_table(
    client: &Client,
    table: &str,
    role: TableRole,
) -> Result<(), TableCheckError> {
    let described = client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .map_err(|e| TableCheckError::Call(table_error(client, table, role, e)))?;
    let Some(description) = described.table else {
        return Err(TableCheckError::NoDescription {
            endpoint: Endpoint::of(
                Service::DynamoDb,
                client.config().region().map(|r| r.as_ref()),
            ),
        });
    };
    let keys: Vec<(String, KeyType)> = description
        .key_schema
        .unwrap_or_default()
        .into_iter()
        .map(|k| (k.attribute_name, k.key_type))
        .collect();
    let want: Vec<(String, KeyType)> = match role {
        TableRole::Allowances => allowances_keys().to_vec(),
        TableRole::Authorizations => authorizations_keys().to_vec(),
        TableRole::Clusters => clusters_keys().to_vec(),
    }
    .into_iter()
    .map(|(name, kind)| (name.to_owned(), kind))
    .collect();
    if keys == want {
        Ok(())
    } else {
        Err(TableCheckError::WrongKeys {
            found: describe_keys(&keys),
            expected: describe_keys(&want),
        })
    }
}

/// The key schema of the Allowances table.
pub fn allowances_keys() -> [(&'static str, KeyType); 2] {
    [
        (aa::NAMESPACE, KeyType::Hash),
        (aa::SERVICE_ACCOUNT, KeyType::Range),
    ]
}

/// The key schema of the Authorizations table.
pub fn authorizations_keys() -> [(&'static str, KeyType); 1] {
    [(ta::TOKEN_HASH, KeyType::Hash)]
}

/// The key schema of the Clusters table.
pub fn clusters_keys() -> [(&'static str, KeyType); 1] {
    [(ca::CLUSTER, KeyType::Hash)]
}
