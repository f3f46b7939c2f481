//! `bootstrap`: the iam-broker router under the AWS Lambda runtime.
#![forbid(unsafe_code)]

use std::sync::Arc;

use iam_broker_core::Config;
use iam_broker_router::{AppState, router, telemetry};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    telemetry::init_json_logging();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(variable = error.variable, error = %error, "bad configuration");
            return Err(error.into());
        }
    };
    let sdk = iam_broker_aws::load_sdk_config(config.aws_call_timeout).await;
    let state = AppState {
        broker: Arc::new(iam_broker_aws::broker(&config, &sdk)),
    };
    lambda_http::run(iam_broker_lambda::service(router(state))).await
}
