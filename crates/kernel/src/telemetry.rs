//! Logging set-up shared by every binary (the Lambda function, `iam-broker`, the sidecar): one
//! JSON object per line on stderr, level from `RUST_LOG` (default `info`). What is logged never
//! carries a token, a secret, credentials or a kubeconfig (ARCHITECTURE.md, "Invariants").

use tracing_subscriber::EnvFilter;

/// Installs the JSON log subscriber. Safe to call more than once per process: a second
/// installation (e.g. from a test) is ignored.
pub fn init_json_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
