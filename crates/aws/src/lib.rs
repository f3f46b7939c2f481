//! AWS adapters of iam-broker: the Allowances and Authorizations tables on DynamoDB
//! ([`dynamodb`]) and its stream ([`stream`]), the cluster registry ([`clusters`]), temporary
//! credentials from STS ([`sts`]), roles' inline policies on IAM ([`iam`]), and the shared SDK set-up with deadlines on every call and
//! errors that name their fix ([`sdk`]).
#![forbid(unsafe_code)]

pub mod clusters;
pub mod dynamodb;
pub mod iam;
pub mod schema;
pub mod sdk;
pub mod stream;
pub mod sts;

pub use clusters::DynamoClusterRegistry;
pub use dynamodb::{DynamoAllowanceStore, DynamoTokenStore, MissingTable, TableRole};
pub use sdk::{AwsError, Endpoint, SdkFailure, Service, error_code, explain, load_sdk_config};
pub use sts::StsCredentialIssuer;
