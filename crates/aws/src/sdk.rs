//! One SDK configuration for every client: standard credential and region chain (with
//! `AWS_ENDPOINT_URL*` honoured), a deadline on every operation, and few retries, so a dead
//! dependency turns into a quick 503 instead of a hang.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};

/// Loads the shared SDK configuration. `call_timeout` bounds each operation, retries included.
pub async fn load_sdk_config(call_timeout: Duration) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(timeouts(call_timeout))
        .retry_config(RetryConfig::standard().with_max_attempts(2))
        .load()
        .await
}

/// The timeout settings for a given per-call deadline: the whole operation within the deadline,
/// each attempt within half of it (so one retry fits), connecting within a second at most.
pub fn timeouts(call_timeout: Duration) -> TimeoutConfig {
    TimeoutConfig::builder()
        .operation_timeout(call_timeout)
        .operation_attempt_timeout(call_timeout / 2)
        .connect_timeout(call_timeout.min(Duration::from_secs(1)))
        .build()
}
