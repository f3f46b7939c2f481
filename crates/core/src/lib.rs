//! Pure domain logic of iam-broker.
//!
//! Nothing in this crate talks to a network: it holds the domain types (tokens, allowances,
//! token records, credentials), the configuration, the broker decision and the ports
//! ([`ports`]) that the AWS and Kubernetes adapters implement. Most unit tests live here.
#![forbid(unsafe_code)]

pub mod admission;
pub mod allowance;
pub mod broker;
pub mod cleanup;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod credentials;
pub mod env;
pub mod events;
pub mod jwt;
pub mod manifest;
pub mod memory;
pub mod ports;
pub mod projected;
pub mod record;
pub mod review;
pub mod session;
pub mod text;
pub mod token;
pub mod webhook;

pub use allowance::{Allowance, Subject, WILDCARD_SERVICE_ACCOUNT};
pub use broker::{Broker, BrokerError};
pub use clock::{Clock, SystemClock};
pub use config::{Config, ConfigError, FailurePolicy};
pub use credentials::{Credentials, EcsCredentials};
pub use ports::{Cluster, ClusterError, ManagedSecret, ServiceAccount, TokenSecret};
pub use record::TokenRecord;
pub use token::{Token, TokenHash};
