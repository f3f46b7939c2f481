//! [`ClusterRegistry`] on DynamoDB: the Clusters table, one item per registered cluster.
//!
//! The broker reads the table whole (a paginated, consistent `Scan`) and only when a projected
//! token arrives, so its role needs `dynamodb:Scan` and nothing else here; the administration
//! commands also get, put and delete single items. A row this version cannot read is left out
//! of [`ClusterRegistry::clusters`] with one error line naming it: one damaged row must not take
//! every cluster's pods down.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use iam_broker_kernel::cluster::{ClusterName, RegisteredCluster};
use iam_broker_kernel::ports::{ClusterRegistry, StoreError};
use iam_broker_kernel::text::{MAX_ECHO, clip};

use crate::dynamodb::{Item, Table, TableRole, is_conditional_failure, number, string};

/// Attribute names of the Clusters table.
pub mod cluster_attributes {
    /// Hash key: the cluster's name (a DNS label).
    pub const CLUSTER: &str = "cluster";
    /// The `iss` of the cluster's ServiceAccount tokens.
    pub const ISSUER: &str = "issuer";
    /// The JWKS document, verbatim as fetched or read from a file.
    pub const JWKS: &str = "jwks";
    /// Where the keys came from: `api-server <URL>` or `file <path>`.
    pub const SOURCE: &str = "source";
    /// When the keys were stored, epoch seconds.
    pub const UPDATED_AT: &str = "updated_at";
}

use cluster_attributes as ca;

/// The Clusters table.
#[derive(Debug, Clone)]
pub struct DynamoClusterRegistry {
    table: Table,
}

impl DynamoClusterRegistry {
    /// Wraps a client and the table name.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            table: Table::new(client, table, TableRole::Clusters),
        }
    }

    fn key(name: &ClusterName) -> Item {
        HashMap::from([(
            ca::CLUSTER.to_owned(),
            AttributeValue::S(name.as_str().to_owned()),
        )])
    }

    /// The item of a cluster: every attribute, the JWKS verbatim.
    pub fn to_item(cluster: &RegisteredCluster) -> Item {
        let mut item = Self::key(&cluster.name);
        let s = |v: &str| AttributeValue::S(v.to_owned());
        item.insert(ca::ISSUER.to_owned(), s(&cluster.issuer));
        item.insert(ca::JWKS.to_owned(), s(&cluster.jwks));
        item.insert(ca::SOURCE.to_owned(), s(&cluster.source));
        item.insert(
            ca::UPDATED_AT.to_owned(),
            AttributeValue::N(cluster.updated_at.to_string()),
        );
        item
    }

    /// Reads an item back, validating it as a registration is validated; the error says what is
    /// wrong with it. `source` and `updated_at` only describe the row: a hand-made row may leave
    /// them out, but not give them the wrong type.
    pub fn from_item(item: &Item) -> Result<RegisteredCluster, String> {
        let required = |name: &str| match item.get(name) {
            None => Err(format!("it has no {name} attribute")),
            Some(value) => value
                .as_s()
                .cloned()
                .map_err(|_| format!("{name} is not a string")),
        };
        let name = required(ca::CLUSTER)?;
        let issuer = required(ca::ISSUER)?;
        let jwks = required(ca::JWKS)?;
        let source = match item.get(ca::SOURCE) {
            None => String::new(),
            Some(_) => string(item, ca::SOURCE).ok_or("source is not a string")?,
        };
        let updated_at = match item.get(ca::UPDATED_AT) {
            None => 0,
            Some(_) => number(item, ca::UPDATED_AT).ok_or("updated_at is not a number")?,
        };
        RegisteredCluster::new(&name, &issuer, &jwks, &source, updated_at)
            .map_err(|e| e.to_string())
    }

    /// [`Self::from_item`] as a store error.
    fn read_item(&self, item: &Item) -> Result<RegisteredCluster, StoreError> {
        Self::from_item(item).map_err(|why| {
            self.table
                .corrupt(format!("the row of cluster {}: {why}", row_name(item)))
        })
    }

    async fn put(&self, cluster: &RegisteredCluster, condition: &str) -> Result<(), SdkFailure> {
        self.table
            .client
            .put_item()
            .table_name(&self.table.name)
            .set_item(Some(Self::to_item(cluster)))
            .condition_expression(condition)
            .expression_attribute_names("#cluster", ca::CLUSTER)
            .send()
            .await
            .map(|_| ())
    }
}

type SdkFailure = SdkError<aws_sdk_dynamodb::operation::put_item::PutItemError, HttpResponse>;

/// The name of a row, for messages: its key, clipped (a hand-made key may be anything).
fn row_name(item: &Item) -> String {
    string(item, ca::CLUSTER).map_or_else(
        || "(without a cluster key)".to_owned(),
        |name| format!("{:?}", clip(&name, MAX_ECHO)),
    )
}

#[async_trait]
impl ClusterRegistry for DynamoClusterRegistry {
    async fn clusters(&self) -> Result<Vec<RegisteredCluster>, StoreError> {
        // Consistent: a cluster registered a moment ago is seen by the next unknown-key re-read.
        let items: Vec<Item> = self
            .table
            .client
            .scan()
            .table_name(&self.table.name)
            .consistent_read(true)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| self.table.unavailable(e))?;
        let mut clusters: Vec<RegisteredCluster> = items
            .iter()
            .filter_map(|item| match Self::from_item(item) {
                Ok(cluster) => Some(cluster),
                Err(why) => {
                    tracing::error!(
                        table = %self.table.name,
                        cluster = %row_name(item),
                        reason = %why,
                        "a row of the cluster registry cannot be read; its cluster is left out \
                         (fix it with `iam-broker cluster refresh`, or remove it)"
                    );
                    None
                }
            })
            .collect();
        clusters.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(clusters)
    }

    async fn cluster(&self, name: &ClusterName) -> Result<Option<RegisteredCluster>, StoreError> {
        let output = self
            .table
            .client
            .get_item()
            .table_name(&self.table.name)
            .set_key(Some(Self::key(name)))
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

    async fn insert(&self, cluster: &RegisteredCluster) -> Result<(), StoreError> {
        match self.put(cluster, "attribute_not_exists(#cluster)").await {
            Ok(()) => Ok(()),
            Err(e) if is_conditional_failure(&e) => Err(StoreError::AlreadyExists),
            Err(e) => Err(self.table.unavailable(e)),
        }
    }

    async fn update(&self, cluster: &RegisteredCluster) -> Result<(), StoreError> {
        match self.put(cluster, "attribute_exists(#cluster)").await {
            Ok(()) => Ok(()),
            Err(e) if is_conditional_failure(&e) => Err(StoreError::NotFound),
            Err(e) => Err(self.table.unavailable(e)),
        }
    }

    /// Removes the row whatever it holds. A damaged row is removed too (that is how it gets
    /// fixed), and then answers [`StoreError::Corrupt`] saying it was removed.
    async fn remove(&self, name: &ClusterName) -> Result<Option<RegisteredCluster>, StoreError> {
        let output = self
            .table
            .client
            .delete_item()
            .table_name(&self.table.name)
            .set_key(Some(Self::key(name)))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| self.table.unavailable(e))?;
        match output.attributes.as_ref().filter(|item| !item.is_empty()) {
            None => Ok(None),
            Some(item) => Self::from_item(item).map(Some).map_err(|why| {
                self.table.corrupt(format!(
                    "the row of cluster {name} was removed; it could not be read: {why}"
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","use":"sig","alg":"ES256",
        "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
        "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

    #[test]
    fn items_round_trip_with_the_jwks_verbatim() {
        let cluster = RegisteredCluster::new(
            "east",
            "https://kubernetes.default.svc.cluster.local",
            JWKS,
            "file jwks.json",
            1_800_000_000,
        )
        .unwrap();
        let item = DynamoClusterRegistry::to_item(&cluster);
        assert_eq!(item[ca::JWKS], AttributeValue::S(JWKS.to_owned()));
        assert_eq!(
            item[ca::UPDATED_AT],
            AttributeValue::N("1800000000".to_owned())
        );
        assert_eq!(DynamoClusterRegistry::from_item(&item), Ok(cluster));
    }

    #[test]
    fn damaged_rows_say_what_is_wrong() {
        let cluster = RegisteredCluster::new("east", "https://issuer", JWKS, "", 0).unwrap();
        let item = DynamoClusterRegistry::to_item(&cluster);
        let mut without_jwks = item.clone();
        without_jwks.remove(ca::JWKS);
        assert_eq!(
            DynamoClusterRegistry::from_item(&without_jwks),
            Err("it has no jwks attribute".to_owned())
        );
        let mut bad_jwks = item.clone();
        bad_jwks.insert(ca::JWKS.to_owned(), AttributeValue::S("{}".to_owned()));
        assert!(DynamoClusterRegistry::from_item(&bad_jwks).is_err());
        let mut mistyped = item.clone();
        mistyped.insert(
            ca::UPDATED_AT.to_owned(),
            AttributeValue::S("now".to_owned()),
        );
        assert_eq!(
            DynamoClusterRegistry::from_item(&mistyped),
            Err("updated_at is not a number".to_owned())
        );
        let mut bare = item;
        bare.remove(ca::SOURCE);
        bare.remove(ca::UPDATED_AT);
        let read = DynamoClusterRegistry::from_item(&bare).unwrap();
        assert_eq!((read.source.as_str(), read.updated_at), ("", 0));
        assert_eq!(row_name(&HashMap::new()), "(without a cluster key)");
    }
}
