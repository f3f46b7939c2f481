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
