//! Test doubles of iam-broker, for tests, fuzz targets and benchmarks; never linked into a
//! product binary (the one exception is the `kube-api-standin` binary of the local run).
//!
//! - [`memory`]: an in-memory adapter of every port of the kernel, with failure injection;
//! - [`clock`]: a clock that always says the same time;
//! - [`signer`]: the one JWT signer (RS256 / ES256, Kubernetes key ids);
//! - [`kube_api`]: the Kubernetes API stand-in (real REST paths, `Status` errors, TokenRequest
//!   and issuer discovery over HTTPS), with [`wire`] faults and [`kubelet`]-style token files.
#![forbid(unsafe_code)]

pub mod clock;
pub mod kube_api;
pub mod kubelet;
pub mod memory;
pub mod signer;
pub mod wire;

pub use clock::FixedClock;
pub use signer::{Signer, SigningAlgorithm, pod_claims};

/// A reqwest client (10 s timeout) that also trusts `ca_pem`.
pub fn client_trusting(ca_pem: Option<&str>) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(10));
    if let Some(pem) = ca_pem {
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes())?);
    }
    Ok(builder.build()?)
}
