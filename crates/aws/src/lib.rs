//! AWS adapters of iam-broker: the Allowances and Authorizations tables on DynamoDB
//! ([`dynamodb`]), temporary credentials from STS ([`sts`]), and the shared SDK set-up with
//! deadlines on every call and errors that name their fix ([`sdk`]).
#![forbid(unsafe_code)]

pub mod dynamodb;
pub mod schema;
pub mod sdk;
pub mod sts;

pub use dynamodb::{DynamoAllowanceStore, DynamoTokenStore, MissingTable, TableRole};
pub use sdk::{AwsError, Endpoint, SdkFailure, Service, error_code, explain, load_sdk_config};
pub use sts::StsCredentialIssuer;

use std::sync::Arc;

use iam_broker_core::broker::{Broker, BrokerSettings};
use iam_broker_core::{Config, SystemClock};

/// Assembles the production broker: DynamoDB stores and STS from one SDK configuration.
pub fn broker(config: &Config, sdk: &aws_config::SdkConfig) -> Broker {
    let dynamodb = aws_sdk_dynamodb::Client::new(sdk);
    Broker::new(
        Arc::new(DynamoAllowanceStore::new(
            dynamodb.clone(),
            &config.allowances_table,
        )),
        Arc::new(DynamoTokenStore::new(
            dynamodb,
            &config.authorizations_table,
        )),
        Arc::new(StsCredentialIssuer::new(aws_sdk_sts::Client::new(sdk))),
        Arc::new(SystemClock),
        BrokerSettings::from(config),
    )
}
