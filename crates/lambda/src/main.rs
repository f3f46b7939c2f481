//! `bootstrap`: iam-broker under the AWS Lambda runtime. API Gateway requests go through the
//! shared router; Authorizations stream batches and the scheduled sweep go to the cleanup.
#![forbid(unsafe_code)]

use iam_broker_core::Config;
use iam_broker_lambda::Dispatcher;
use iam_broker_router::{router, telemetry};
use lambda_http::lambda_runtime::{self, LambdaEvent, service_fn};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    telemetry::init_json_logging();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(variable = error.variable, error = %error, "bad configuration");
            return Err(error.into());
        }
    };
    let app = iam_broker_app::build(&config).await;
    let dispatcher = Dispatcher::new(router(app.state), Some(app.cleanup));
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let dispatcher = dispatcher.clone();
        async move {
            dispatcher
                .handle(event.payload)
                .await
                .map_err(lambda_runtime::Error::from)
        }
    }))
    .await
}
