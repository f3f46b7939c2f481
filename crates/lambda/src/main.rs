//! `bootstrap`: iam-broker under the AWS Lambda runtime. The function's `Handler` setting picks
//! what it runs: `http` (the broker and the webhook behind API Gateway) or `cleanup` (the
//! Authorizations stream and the scheduled sweep).
#![forbid(unsafe_code)]

use iam_broker_kernel::Config;
use iam_broker_kernel::telemetry;
use iam_broker_lambda::{CleanupEvent, Handler, check_environment, report_json, service};
use iam_broker_router::router;
use lambda_http::lambda_runtime::{self, LambdaEvent, service_fn};

/// One thread: Lambda hands an instance one invocation at a time, so worker threads would only
/// add start-up time, memory and cross-thread wake-ups (BENCHMARKS.md, "Cold start").
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    // Lambda starts `bootstrap` without arguments; `--version` is for people and release checks.
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("bootstrap (iam-broker) {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    telemetry::init_json_logging();
    let handler = match Handler::from_setting(std::env::var("_HANDLER").ok().as_deref()) {
        Ok(handler) => handler,
        Err(error) => {
            tracing::error!(error = %error, "bad configuration");
            return Err(error.into());
        }
    };
    if let Err(error) = check_environment(handler, |name| std::env::var(name).ok()) {
        tracing::error!(variable = error.0, error = %error, "bad configuration");
        return Err(error.into());
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(variable = error.variable, error = %error, "bad configuration");
            return Err(error.into());
        }
    };
    let app = iam_broker_app::build(&config).await;
    match handler {
        Handler::Http => lambda_http::run(service(router(app.state))).await,
        Handler::Cleanup => {
            let cleanup = app.cleanup;
            lambda_runtime::run(service_fn(move |event: LambdaEvent<CleanupEvent>| {
                let cleanup = cleanup.clone();
                async move {
                    iam_broker_lambda::cleanup(&cleanup, event.payload)
                        .await
                        .map(|report| report_json(&report))
                }
            }))
            .await
        }
    }
}
