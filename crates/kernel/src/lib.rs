//! The kernel of iam-broker, below both products (the broker and the admission webhook).
//!
//! Nothing here talks to a network: it holds the domain types (tokens and their minting, token
//! records, allowances, cluster names), the ports ([`ports`]) that the AWS and Kubernetes
//! adapters implement, JWT verification, credentials, the configuration, and small helpers for
//! text, time and logs. ARCHITECTURE.md draws the crates around it.
#![forbid(unsafe_code)]

pub mod allowance;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod credentials;
pub mod env;
pub mod jwt;
pub mod name;
pub mod ports;
pub mod record;
pub mod telemetry;
pub mod text;
pub mod token;

pub use allowance::{Allowance, Subject, WILDCARD_SERVICE_ACCOUNT};
pub use clock::{Clock, SystemClock};
pub use config::{Config, ConfigError, FailurePolicy, SidecarMode};
pub use credentials::{Credentials, EcsCredentials};
pub use ports::{Cluster, ClusterError, ManagedSecret, ServiceAccount, TokenSecret};
pub use record::{Grant, TokenRecord, mint};
pub use token::{Token, TokenHash};
