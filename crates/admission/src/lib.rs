//! The mutating admission webhook of iam-broker: the `POST` path, and the cleanup behind it.
//!
//! - [`review`]: the `AdmissionReview` envelope in and out;
//! - [`patch`]: the pure decision, pod in, JSON patch out (skip reasons, the sidecar, env);
//! - [`webhook`]: the steps around it (ServiceAccount, allowance, mint, store, Secret) and
//!   their undo;
//! - [`events`]: Kubernetes Events that tell an application team why;
//! - [`cleanup`]: pod `DELETE`, the table stream and the sweep;
//! - [`registration`]: the `MutatingWebhookConfiguration` that registers the webhook;
//! - [`scope`]: whether a registration sends a given pod to the webhook at all.
#![forbid(unsafe_code)]

pub mod cleanup;
pub mod events;
pub mod patch;
pub mod registration;
pub mod review;
pub mod scope;
pub mod webhook;

pub use webhook::Webhook;
