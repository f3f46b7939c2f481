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

/// `sweep` arguments.
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// Leave records and Secrets younger than this alone (default: SWEEP_GRACE_SECONDS, 600).
    #[arg(long)]
    grace_seconds: Option<u64>,
}

/// Runs the sweep once, as the schedule does.
pub async fn sweep(args: SweepArgs) -> anyhow::Result<()> {
    let mut config = iam_broker_core::Config::from_env()?;
    if let Some(seconds) = args.grace_seconds {
        config.sweep_grace = Duration::from_secs(seconds);
    }
    let app = iam_broker_app::build(&config).await;
    let report = app.cleanup.sweep().await?;
    println!(
        "secrets deleted: {}, token records deleted: {}, left for a later run: {}, failures: {}",
        report.secrets_deleted, report.records_deleted, report.skipped, report.failures
    );
    if report.failures > 0 {
        bail!(
            "{} deletes failed (see the log); run again",
            report.failures
        );
    }
    Ok(())
}

/// `kubeconfig` arguments.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("token_source").required(true).args(["from_secret", "token_stdin"])))]
pub struct KubeconfigArgs {
    /// Read server, token and CA from this `kubernetes.io/service-account-token` Secret
    /// (NAMESPACE/NAME, e.g. iam-broker/iam-broker-webhook-token), using your current
    /// kubeconfig.
    #[arg(long)]
    from_secret: Option<String>,
    /// Read the ServiceAccount token from stdin instead (then --server is required).
    #[arg(long, requires = "server")]
    token_stdin: bool,
    /// API server URL (https://…), when not read from the Secret.
    #[arg(long)]
    server: Option<String>,
    /// PEM file of the API server's CA, when not read from the Secret.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Name of the cluster, user and context inside the kubeconfig.
    #[arg(long, default_value = "iam-broker-webhook")]
    name: String,
    /// Store it in this SSM SecureString parameter (the stack's KubeconfigParameterName)
    /// instead of printing it.
    #[arg(long)]
    store: Option<String>,
    /// KMS key for the parameter (default: the account's alias/aws/ssm).
    #[arg(long, requires = "store")]
    kms_key_id: Option<String>,
}

/// Builds the webhook's kubeconfig from a ServiceAccount token; prints it or stores it in SSM.
pub async fn kubeconfig(args: KubeconfigArgs) -> anyhow::Result<()> {
    let config = iam_broker_core::Config::from_env()?;
    let (server, token, ca_pem) = match &args.from_secret {
        Some(reference) => {
            let (namespace, name) = reference
                .split_once('/')
                .context("--from-secret must be NAMESPACE/NAME")?;
            let cluster = iam_broker_kube::KubeCluster::new(
                iam_broker_kube::ClientSource::Infer,
                config.aws_call_timeout,
            );
            let (server, token, ca) = cluster
                .service_account_token(namespace, name)
                .await
                .with_context(|| format!("cannot read the token Secret {reference}"))?;
            (args.server.clone().unwrap_or(server), token, ca)
        }
        None => {
            let mut token = String::new();
            std::io::stdin()
                .read_to_string(&mut token)
                .context("cannot read the token from stdin")?;
            (
                args.server.clone().unwrap_or_default(),
                token.trim().to_owned(),
                None,
            )
        }
    };
    let ca_pem = match &args.ca_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --ca-file {}", path.display()))?,
        ),
        None => ca_pem,
    };
    let text =
        iam_broker_core::manifest::kubeconfig(&server, ca_pem.as_deref(), &token, &args.name)?;
    match &args.store {
        None => print!("{text}"),
        Some(parameter) => {
            let sdk = iam_broker_aws::load_sdk_config(config.aws_call_timeout).await;
            iam_broker_kube::store_kubeconfig_in_ssm(
                &sdk,
                parameter,
                &text,
                args.kms_key_id.as_deref(),
            )
            .await?;
            println!(
                "stored the kubeconfig for {server} in SSM parameter {parameter} (SecureString)"
            );
        }
    }
    Ok(())
}

/// Checks the deployment's configuration end to end; `Ok(false)` when a check failed.
pub async fn doctor() -> anyhow::Result<bool> {
    use iam_broker_aws::schema::{allowances_keys, authorizations_keys, check_table};
    let mut healthy = true;
    let mut report = |name: &str, result: Result<String, String>| match result {
        Ok(detail) => println!("ok    {name}: {detail}"),
        Err(detail) => {
            healthy = false;
            println!("FAIL  {name}: {detail}");
        }
    };
    let config = match iam_broker_core::Config::from_env() {
        Ok(config) => {
            report("configuration", Ok("every variable parses".to_owned()));
            config
        }
        Err(error) => {
            report("configuration", Err(error.to_string()));
            return Ok(false);
        }
    };
    let sdk = iam_broker_aws::load_sdk_config(config.aws_call_timeout).await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
    report(
        "Allowances table",
        check_table(&dynamodb, &config.allowances_table, &allowances_keys())
            .await
            .map(|()| format!("{} has the right keys", config.allowances_table)),
    );
    report(
        "Authorizations table",
        check_table(
            &dynamodb,
            &config.authorizations_table,
            &authorizations_keys(),
        )
        .await
        .map(|()| format!("{} has the right keys", config.authorizations_table)),
    );
    report(
        "STS",
        iam_broker_aws::sts::caller_arn(&sdk)
            .await
            .map(|arn| format!("running as {arn}")),
    );
    let source = match &config.kubeconfig_parameter {
        Some(parameter) => {
            let read = iam_broker_kube::kubeconfig_from_ssm(&sdk, parameter).await;
            report(
                "kubeconfig parameter",
                read.as_ref()
                    .map(|_| format!("{parameter} decrypts"))
                    .map_err(|e| e.to_string()),
            );
            iam_broker_kube::ClientSource::SsmParameter {
                sdk: Box::new(sdk.clone()),
                name: parameter.clone(),
            }
        }
        None => iam_broker_kube::ClientSource::Infer,
    };
    let cluster = iam_broker_kube::KubeCluster::new(source, config.aws_call_timeout);
    for permission in iam_broker_kube::REQUIRED_PERMISSIONS {
        let name = format!(
            "Kubernetes RBAC {} {}",
            permission.verb, permission.resource
        );
        let result = match cluster.can(*permission).await {
            Ok(true) => Ok("allowed".to_owned()),
            Ok(false) => Err("denied: apply deploy/20-rbac.yaml".to_owned()),
            Err(error) => Err(format!("cannot ask the API server: {error}")),
        };
        report(&name, result);
    }
    report(
        "sidecar image",
        config
            .proxy_image
            .clone()
            .ok_or_else(|| "PROXY_IMAGE is not set: the webhook will inject nothing".to_owned()),
    );
    Ok(healthy)
}
