//! `iam-broker-proxy`: the sidecar. Reads its configuration from the environment, listens on
//! `LISTEN_ADDR` and serves until SIGTERM or SIGINT. Its only arguments are `--help` and
//! `--version`, parsed by hand to keep the binary small.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;

use iam_broker_proxy::config::{
    DEFAULT_BROKER_TIMEOUT_MS, DEFAULT_CACHE_MAX_ENTRIES, DEFAULT_HEADER_READ_TIMEOUT_MS,
    DEFAULT_LISTEN_ADDR, DEFAULT_MAX_CONNECTIONS, DEFAULT_MIN_VALIDITY_SECONDS,
    DEFAULT_REFRESH_AHEAD_SECONDS, ENV_BROKER_CA_PEM, ENV_BROKER_TIMEOUT_MS, ENV_BROKER_URL,
    ENV_CACHE_MAX_ENTRIES, ENV_HEADER_READ_TIMEOUT_MS, ENV_LISTEN_ADDR, ENV_MAX_CONNECTIONS,
    ENV_METRICS_ADDR, ENV_MIN_VALIDITY_SECONDS, ENV_REFRESH_AHEAD_SECONDS,
};
use iam_broker_proxy::{ProxyConfig, SystemClock, serve_with_metrics, telemetry};

/// Exit status of a bad command line (as clap and most Unix tools use).
const USAGE_ERROR: u8 = 2;

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Invocation {
    Serve,
    Help,
    Version,
    Unexpected(String),
}

fn invocation(mut args: impl Iterator<Item = String>) -> Invocation {
    match (args.next(), args.next()) {
        (None, _) => Invocation::Serve,
        (Some(arg), None) if arg == "--help" || arg == "-h" => Invocation::Help,
        (Some(arg), None) if arg == "--version" || arg == "-V" => Invocation::Version,
        (Some(arg), _) => Invocation::Unexpected(arg),
    }
}

fn usage() -> String {
    format!(
        "iam-broker-proxy: the iam-broker sidecar. Serves AWS container credentials on a loopback
port from a per-token cache in front of the broker: an SDK in the pod sends GET with its
token (AWS_CONTAINER_CREDENTIALS_FULL_URI + AWS_CONTAINER_AUTHORIZATION_TOKEN), the proxy
forwards it to BROKER_URL and caches the answer per token, refreshing ahead of expiry.

Usage: iam-broker-proxy [--help | --version]

Configured by environment variables only:
  {ENV_BROKER_URL:<22} the broker's credentials URL, http:// or https:// (required)
  {ENV_LISTEN_ADDR:<22} loopback address to listen on (default {DEFAULT_LISTEN_ADDR})
  {ENV_MIN_VALIDITY_SECONDS:<22} least validity left on any credential served (a third of a shorter lifetime), 60..=3300 (default {DEFAULT_MIN_VALIDITY_SECONDS})
  {ENV_REFRESH_AHEAD_SECONDS:<22} seconds before that point a background refresh starts, 0..=3300 (default {DEFAULT_REFRESH_AHEAD_SECONDS})
  {ENV_BROKER_TIMEOUT_MS:<22} deadline of one broker call in ms, 50..=60000 (default {DEFAULT_BROKER_TIMEOUT_MS})
  {ENV_CACHE_MAX_ENTRIES:<22} most tokens cached at once, 1..=100000 (default {DEFAULT_CACHE_MAX_ENTRIES})
  {ENV_HEADER_READ_TIMEOUT_MS:<22} ms a client has to send its request head, 100..=600000 (default {DEFAULT_HEADER_READ_TIMEOUT_MS})
  {ENV_MAX_CONNECTIONS:<22} connections served at once; more wait, 1..=65536 (default {DEFAULT_MAX_CONNECTIONS})
  {ENV_BROKER_CA_PEM:<22} extra PEM CA certificates for the broker's TLS (default: public roots only)
  {ENV_METRICS_ADDR:<22} IP:port to serve Prometheus metrics on (GET /metrics), apart from LISTEN_ADDR (default: none)
  {:<22} log level (default info); logs are JSON lines on stderr

It serves until SIGTERM or SIGINT. GET /healthz answers without a token or a broker call.
",
        "RUST_LOG"
    )
}

fn main() -> ExitCode {
    match invocation(std::env::args().skip(1)) {
        Invocation::Serve => {}
        Invocation::Help => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Invocation::Version => {
            println!("iam-broker-proxy {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Invocation::Unexpected(arg) => {
            eprintln!(
                "iam-broker-proxy: unexpected argument {arg:?}: the proxy takes no arguments, \
                 only environment variables (see --help)"
            );
            return ExitCode::from(USAGE_ERROR);
        }
    }
    telemetry::init_json_logging();
    let config = match ProxyConfig::from_env() {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(variable = error.variable, error = %error, "bad configuration");
            return ExitCode::FAILURE;
        }
    };
    // One thread is plenty for a loopback sidecar and keeps its memory to a few MiB.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "could not start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "iam-broker-proxy stopped");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: ProxyConfig) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use tokio::signal::unix::{SignalKind, signal};

    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("listening on {}", config.listen_addr))?;
    let metrics = match config.metrics_addr {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("listening for metrics on {address}"))?,
        ),
        None => None,
    };
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let proxy = serve_with_metrics(listener, metrics, config, Arc::new(SystemClock))?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
    proxy.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Invocation, invocation};

    fn parse(args: &[&str]) -> Invocation {
        invocation(args.iter().map(|a| (*a).to_owned()))
    }

    #[test]
    fn only_help_and_version_are_arguments() {
        assert_eq!(parse(&[]), Invocation::Serve);
        assert_eq!(parse(&["--help"]), Invocation::Help);
        assert_eq!(parse(&["-h"]), Invocation::Help);
        assert_eq!(parse(&["--version"]), Invocation::Version);
        assert_eq!(
            parse(&["--listen", "x"]),
            Invocation::Unexpected("--listen".to_owned())
        );
        assert_eq!(
            parse(&["--help", "extra"]),
            Invocation::Unexpected("--help".to_owned())
        );
    }
}
