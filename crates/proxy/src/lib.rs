//! The iam-broker sidecar proxy: serves AWS container credentials on loopback from a per-token
//! cache in front of the broker.
//!
//! AWS SDKs in the pod read `AWS_CONTAINER_CREDENTIALS_FULL_URI` (this proxy) and send
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN` as the raw `Authorization` header; the proxy forwards
//! misses to `BROKER_URL` with the same header. README, "The sidecar proxy":
//! per-token caching, at least [`ProxyConfig::min_validity`] left on anything served, refresh ahead
//! in the background, still-valid credentials kept while the broker fails, never an expired
//! credential, one broker call for concurrent misses. The rules are pure functions in
//! [`policy`]; [`serve`] runs them behind a hyper server.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use iam_broker_proxy::{ProxyConfig, SystemClock, serve};
//!
//! let config = ProxyConfig::from_env()?;
//! let listener = tokio::net::TcpListener::bind(config.listen_addr).await?;
//! let proxy = serve(listener, config, Arc::new(SystemClock))?;
//! // ... until asked to stop:
//! proxy.shutdown().await;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod answer;
mod broker;
mod cache;
pub mod clock;
pub mod config;
pub mod metrics;
pub mod policy;
mod server;

pub use cache::CacheStats;
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{ConfigError, ProxyConfig};
pub use server::{HEALTH_PATH, ProxyHandle, ServeError, serve, serve_with_metrics};

pub use iam_broker_kernel::telemetry;
