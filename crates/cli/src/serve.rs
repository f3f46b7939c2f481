//! `iam-broker serve`: the shared router as a plain HTTP server, with graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use iam_broker_core::Config;
use iam_broker_router::{AppState, router};

/// Serves until SIGINT or SIGTERM.
pub async fn run(listen: SocketAddr) -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let sdk = iam_broker_aws::load_sdk_config(config.aws_call_timeout).await;
    let state = AppState {
        broker: Arc::new(iam_broker_aws::broker(&config, &sdk)),
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    tracing::info!(address = %address, "listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown())
        .await
        .context("the server failed")?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
