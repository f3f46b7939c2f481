//! Operations commands: render the webhook registration, check a broker with a token.

use std::io::Read as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use iam_broker_core::manifest::{
    DEFAULT_EXCLUDED_NAMESPACES, WebhookFailurePolicy, WebhookManifest, render_webhook,
};

use crate::Output;

/// `render-webhook` arguments.
#[derive(Debug, Args)]
pub struct RenderWebhookArgs {
    /// The webhook URL, secret path segment included: the stack's WebhookUrlWithoutSecret output
    /// followed by the WebhookPathSecret parameter (https://…/Prod/mutate/<secret>).
    #[arg(long)]
    url: String,
    /// Name of the MutatingWebhookConfiguration.
    #[arg(long, default_value = "iam-broker")]
    name: String,
    /// What the API server does when the webhook cannot be reached: ignore admits the pod
    /// without credentials, fail rejects it.
    #[arg(long, value_enum, default_value_t = FailurePolicyArg::Ignore)]
    failure_policy: FailurePolicyArg,
    /// How long the API server waits for the webhook (1..=30 s; the webhook answers within 8).
    #[arg(long, default_value_t = 10)]
    timeout_seconds: u8,
    /// PEM file of the CA that signed the webhook's certificate (in-cluster `serve --tls-*`
    /// only; API Gateway's certificate is publicly trusted).
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
    /// A namespace never mutated (repeat for more); defaults to iam-broker, kube-system,
    /// kube-public and kube-node-lease.
    #[arg(long = "exclude-namespace")]
    exclude_namespaces: Vec<String>,
}

/// `--failure-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailurePolicyArg {
    /// Admit the pod unmodified.
    Ignore,
    /// Reject the pod.
    Fail,
}

/// Prints the MutatingWebhookConfiguration.
pub fn render(args: RenderWebhookArgs) -> anyhow::Result<()> {
    let ca_bundle_pem = args
        .ca_bundle
        .as_ref()
        .map(|path| {
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the CA bundle {}", path.display()))
        })
        .transpose()?;
    let excluded_namespaces = if args.exclude_namespaces.is_empty() {
        DEFAULT_EXCLUDED_NAMESPACES
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    } else {
        args.exclude_namespaces
    };
    let yaml = render_webhook(&WebhookManifest {
        name: args.name,
        url: args.url,
        ca_bundle_pem,
        failure_policy: match args.failure_policy {
            FailurePolicyArg::Ignore => WebhookFailurePolicy::Ignore,
            FailurePolicyArg::Fail => WebhookFailurePolicy::Fail,
        },
        timeout_seconds: args.timeout_seconds,
        excluded_namespaces,
    })?;
    print!("{yaml}");
    Ok(())
}

/// `credentials` arguments.
#[derive(Debug, Args)]
pub struct CredentialsArgs {
    /// The broker URL (stack output BrokerUrl, or http://127.0.0.1:<port>/ for a sidecar).
    #[arg(long)]
    url: String,
    /// Read the token from stdin (keeps it out of the shell history and the process list).
    #[arg(long, conflicts_with = "token_env")]
    token_stdin: bool,
    /// Name of an environment variable holding the token.
    #[arg(long, default_value = "IAM_BROKER_TOKEN")]
    token_env: String,
    /// table: a summary without secrets; json: the broker's answer as is (it holds the secret
    /// key and session token).
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// Fetches credentials with a token, as a pod's SDK would, and reports what came back.
pub async fn credentials(args: CredentialsArgs) -> anyhow::Result<()> {
    let token = if args.token_stdin {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the token from stdin")?;
        text.trim().to_owned()
    } else {
        std::env::var(&args.token_env)
            .map(|t| t.trim().to_owned())
            .with_context(|| format!("no token: set {} or pass --token-stdin", args.token_env))?
    };
    if token.is_empty() {
        bail!("the token is empty");
    }
    if !args.url.starts_with("https://") && !args.url.starts_with("http://") {
        bail!(
            "--url must be an http:// or https:// URL, got {:?}",
            args.url
        );
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()?;
    let response = client
        .get(&args.url)
        .header("Authorization", &token)
        .send()
        .await
        .with_context(|| format!("cannot reach {}", args.url))?;
    let status = response.status();
    let cache_control = response
        .headers()
        .get("cache-control")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = response.text().await.context("cannot read the answer")?;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    if !status.is_success() {
        bail!(
            "{} answered {}: {} {}",
            args.url,
            status.as_u16(),
            json["Code"].as_str().unwrap_or("(no Code)"),
            json["Message"].as_str().unwrap_or(body.trim())
        );
    }
    match args.output {
        Output::Json => println!("{body}"),
        Output::Table => {
            for field in ["RoleArn", "AccountId", "AccessKeyId", "Expiration"] {
                println!(
                    "{field:<14} {}",
                    json[field].as_str().unwrap_or("(missing)")
                );
            }
            println!("{:<14} {cache_control}", "Cache-Control");
        }
    }
    Ok(())
}
