//! The credential broker of iam-broker: the `GET` path. From an `Authorization` header (a token
//! the webhook minted, or a projected ServiceAccount token) to the pod's identity, its
//! allowance re-checked, `AssumeRole`, and the ECS container-credentials answer.
//!
//! - [`broker`]: the decision, step by step ([`Broker::credentials`]);
//! - [`cache`]: the credentials it reuses per pod and role, so `AssumeRole` is not called on
//!   every fetch;
//! - [`identity`]: which registered cluster signed a projected token, and for which pod;
//! - [`projected`]: the cluster-registry snapshot the broker verifies against;
//! - [`session`]: session names, `SourceIdentity` and session tags for CloudTrail.
#![forbid(unsafe_code)]

pub mod broker;
pub mod cache;
pub mod identity;
pub mod projected;
pub mod revocation;
pub mod session;

pub use broker::{Broker, BrokerAnswer, BrokerError, BrokerSettings, SLIDE_STEP};
