//! The two tables of DESIGN.md, for local set-ups and tests (production tables come from
//! `template.yaml`). Creating them is idempotent.

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::client::Waiters;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    TimeToLiveSpecification,
};

use crate::dynamodb::{allowance_attributes as aa, token_attributes as ta};

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
                    Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                }
            })
    };
    authorizations.await.map_err(fail(authorizations_table))
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
        Err(e) => return Err(Box::new(e)),
    }
    client
        .wait_until_table_exists()
        .table_name(table)
        .wait(std::time::Duration::from_secs(60))
        .await
        .map(|_| ())
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
}

/// Checks that a table exists with exactly the key schema of DESIGN.md (`DescribeTable`), for
/// `iam-broker doctor`. `Err` says what is wrong in words.
pub async fn check_table(
    client: &Client,
    table: &str,
    expect: &[(&str, KeyType)],
) -> Result<(), String> {
    let described = client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .map_err(|e| match &e {
            SdkError::ServiceError(service)
                if service.err().code() == Some("ResourceNotFoundException") =>
            {
                format!("table {table} does not exist")
            }
            _ => format!(
                "cannot describe table {table}: {}",
                aws_sdk_dynamodb::error::DisplayErrorContext(&e)
            ),
        })?;
    let keys: Vec<(String, KeyType)> = described
        .table
        .and_then(|t| t.key_schema)
        .unwrap_or_default()
        .into_iter()
        .map(|k| (k.attribute_name, k.key_type))
        .collect();
    let want: Vec<(String, KeyType)> = expect
        .iter()
        .map(|(name, kind)| ((*name).to_owned(), kind.clone()))
        .collect();
    if keys == want {
        Ok(())
    } else {
        Err(format!(
            "table {table} has keys {keys:?}, expected {want:?}"
        ))
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
