//! Operations commands: render the webhook registration, check a broker with a token.

use iam_broker_kernel::text::error_chain;
use std::io::Read as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use iam_broker_admission::registration::{
    NamespaceScope, WebhookFailurePolicy, WebhookManifest, render_webhook,
};
use iam_broker_kernel::config::{ENV_WEBHOOK_PATH_SECRET, InjectionMode};

use crate::Output;
use crate::stack::{
    Environment, OUTPUT_BROKER_ROLE, OUTPUT_BROKER_URL, OUTPUT_KUBECONFIG_PARAMETER,
    OUTPUT_WEBHOOK_URL,
};

/// `render-webhook` arguments.
#[derive(Debug, Args)]
pub struct RenderWebhookArgs {
    /// The webhook URL, secret path segment included (https://…/Prod/mutate/<secret>). Without
    /// it: the stack's WebhookUrlWithoutSecret followed by WEBHOOK_PATH_SECRET (--stack).
    #[arg(long)]
    url: Option<String>,
    /// Name of the MutatingWebhookConfiguration.
    #[arg(long, default_value = "iam-broker")]
    name: String,
    /// What the API server does when the webhook cannot be reached: ignore admits the pod
    /// without credentials, fail rejects it.
    #[arg(long, value_enum, default_value_t = FailurePolicyArg::Ignore)]
    failure_policy: FailurePolicyArg,
    /// How long the API server waits for the webhook (1..=30 s; the webhook answers within 8).
    #[arg(long, default_value_t = iam_broker_admission::registration::DEFAULT_TIMEOUT_SECONDS)]
    timeout_seconds: u8,
    /// PEM file of the CA that signed the webhook's certificate (in-cluster `serve --tls-*`
    /// only; API Gateway's certificate is publicly trusted).
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
    /// A namespace never intercepted (repeat for more); defaults to iam-broker, kube-system,
    /// kube-public and kube-node-lease.
    #[arg(long = "exclude-namespace")]
    exclude_namespaces: Vec<String>,
    /// Opt-in mode: intercept only namespaces carrying this label, e.g.
    /// iam-broker.io/inject=enabled.
    #[arg(long, value_name = "KEY=VALUE")]
    namespace_label: Option<String>,
    /// Leave out the matchConditions that skip kube-* and openshift-* namespaces (for API
    /// servers older than Kubernetes 1.28 / OpenShift 4.15, which reject the field).
    #[arg(long)]
    no_match_conditions: bool,
    /// The webhook's IDENTITY_MODE: projected registers Pod CREATE only, with
    /// `sideEffects: None` (admission writes nothing); secret adds the DELETE cleanup webhook
    /// (keep it while moving from secret to projected, until no secret-mode pod is left). Left
    /// out: IDENTITY_MODE, or the stack's IdentityMode output (--stack), else secret.
    #[arg(long, value_enum)]
    identity_mode: Option<IdentityModeArg>,
}

/// `--identity-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IdentityModeArg {
    /// A minted token in a Secret per pod.
    Secret,
    /// A projected ServiceAccount token; nothing written at admission.
    Projected,
}

/// `--failure-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailurePolicyArg {
    /// Admit the pod unmodified.
    Ignore,
    /// Reject the pod.
    Fail,
}

/// The webhook URL: `--url` as given, or the stack's URL followed by the path secret.
fn webhook_url(args: &RenderWebhookArgs, environment: &Environment) -> anyhow::Result<String> {
    if let Some(url) = &args.url {
        return Ok(url.clone());
    }
    let base = environment.require_output(OUTPUT_WEBHOOK_URL, "--url https://…/mutate/<secret>")?;
    let secret = std::env::var(ENV_WEBHOOK_PATH_SECRET).unwrap_or_default();
    if secret.trim().is_empty() {
        bail!(
            "set {ENV_WEBHOOK_PATH_SECRET} to the WebhookPathSecret you deployed the stack with \
             (README, Deploy), or pass --url; without it the webhook would answer 404 to every pod"
        );
    }
    Ok(format!("{base}{}", secret.trim()))
}

/// Prints the MutatingWebhookConfiguration.
pub fn render(args: RenderWebhookArgs, environment: &Environment) -> anyhow::Result<()> {
    let url = webhook_url(&args, environment)?;
    let ca_bundle_pem = args
        .ca_bundle
        .as_ref()
        .map(|path| {
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the CA bundle {}", path.display()))
        })
        .transpose()?;
    let mut namespaces = NamespaceScope::default();
    if !args.exclude_namespaces.is_empty() {
        namespaces.excluded = args.exclude_namespaces;
    }
    namespaces.skip_system_prefixes = !args.no_match_conditions;
    if let Some(label) = &args.namespace_label {
        let (key, value) = label
            .split_once('=')
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            .with_context(|| format!("--namespace-label must be KEY=VALUE, got {label:?}"))?;
        namespaces.opt_in_label = Some((key.to_owned(), value.to_owned()));
    }
    let yaml = render_webhook(&WebhookManifest {
        name: args.name,
        url,
        ca_bundle_pem,
        failure_policy: match args.failure_policy {
            FailurePolicyArg::Ignore => WebhookFailurePolicy::Ignore,
            FailurePolicyArg::Fail => WebhookFailurePolicy::Fail,
        },
        timeout_seconds: args.timeout_seconds,
        namespaces,
        identity: match args.identity_mode {
            Some(IdentityModeArg::Secret) => iam_broker_kernel::config::IdentityMode::Secret,
            Some(IdentityModeArg::Projected) => iam_broker_kernel::config::IdentityMode::Projected,
            None => match environment
                .var(iam_broker_kernel::config::ENV_IDENTITY_MODE)
                .as_deref()
            {
                None | Some("secret") => iam_broker_kernel::config::IdentityMode::Secret,
                Some("projected") => iam_broker_kernel::config::IdentityMode::Projected,
                Some(other) => bail!(
                    "IDENTITY_MODE is {other:?}, not secret or projected; pass --identity-mode"
                ),
            },
        },
    })?;
    print!("{yaml}");
    Ok(())
}

/// `credentials` arguments.
#[derive(Debug, Args)]
pub struct CredentialsArgs {
    /// The broker URL (http://127.0.0.1:<port>/ for a sidecar); default: the stack's BrokerUrl.
    #[arg(long)]
    url: Option<String>,
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
pub async fn credentials(args: CredentialsArgs, environment: &Environment) -> anyhow::Result<()> {
    let url = match &args.url {
        Some(url) => url.clone(),
        None => environment
            .require_output(OUTPUT_BROKER_URL, "--url")?
            .to_owned(),
    };
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
    if !url.starts_with("https://") && !url.starts_with("http://") {
        bail!("--url must be an http:// or https:// URL, got {:?}", url);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()?;
    let response = client
        .get(&url)
        .header("Authorization", &token)
        .send()
        .await
        .with_context(|| format!("cannot reach {}", url))?;
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
            url,
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
pub async fn sweep(args: SweepArgs, environment: &Environment) -> anyhow::Result<()> {
    let mut config = environment.config()?;
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
    /// Store it in this SSM SecureString parameter instead of printing it; without a value,
    /// KUBECONFIG_PARAMETER or the stack's KubeconfigParameterName (--stack).
    #[arg(long, value_name = "PARAM", num_args = 0..=1, default_missing_value = "")]
    store: Option<String>,
    /// KMS key for the parameter (default: the account's alias/aws/ssm).
    #[arg(long, requires = "store")]
    kms_key_id: Option<String>,
}

/// Builds the webhook's kubeconfig from a ServiceAccount token; prints it or stores it in SSM.
pub async fn kubeconfig(args: KubeconfigArgs, environment: &Environment) -> anyhow::Result<()> {
    let config = environment.config()?;
    let store = match args.store.as_deref() {
        None => None,
        Some("") => Some(match &config.kubeconfig_parameter {
            Some(parameter) => parameter.clone(),
            None => environment
                .require_output(OUTPUT_KUBECONFIG_PARAMETER, "--store PARAM")?
                .to_owned(),
        }),
        Some(parameter) => Some(parameter.to_owned()),
    };
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
    let text = iam_broker_kube::kubeconfig(&server, ca_pem.as_deref(), &token, &args.name)?;
    match &store {
        None => print!("{text}"),
        Some(parameter) => {
            let aws = iam_broker_app::AwsAdapters::load(&config).await;
            iam_broker_kube::store_kubeconfig_in_ssm(
                &aws.ssm,
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
///
/// Each cause is printed once: a check that cannot pass because of a failure it shares with an
/// earlier one (no region, no credentials, an endpoint that is down or not AWS, an unreadable
/// kubeconfig, an API server that cannot be asked) is marked `skip` and points back to it.
pub async fn doctor(environment: &Environment) -> anyhow::Result<bool> {
    use iam_broker_aws::schema::{TableCheckError, check_table};
    use iam_broker_aws::{Endpoint, Service, TableRole};
    let mut checks = Checks::new();
    let config = match environment.config() {
        Ok(config) => {
            checks.ok("configuration", "every variable parses");
            config
        }
        Err(error) => {
            checks.fail("configuration", error.to_string());
            return Ok(false);
        }
    };
    let sdk = iam_broker_aws::load_sdk_config(config.aws_call_timeout).await;
    let aws = iam_broker_app::AwsAdapters::new(&config, &sdk);
    let region = sdk.region().map(|r| r.as_ref().to_owned());
    let endpoint = |service| Endpoint::of(service, region.as_deref());

    // STS first: who the process is, and, when that fails, usually why every AWS check fails.
    let sts = endpoint(Service::Sts);
    if checks.runs("STS", &[Scope::Aws, Scope::endpoint(&sts)]) {
        match iam_broker_aws::sts::caller_arn(&aws.sts).await {
            Ok(arn) => checks.ok("STS", format!("running as {arn}")),
            Err(error) => checks.aws_failure("STS", &error, &error),
        }
    }
    if let Some(role) = environment.output(OUTPUT_BROKER_ROLE) {
        checks.ok(
            "brokered roles",
            format!("each must trust {role} (sts:AssumeRole) and match AllowedRoleArnPattern"),
        );
    }
    let dynamodb_endpoint = endpoint(Service::DynamoDb);
    let mut tables = vec![
        (TableRole::Allowances, &config.allowances_table),
        (TableRole::Authorizations, &config.authorizations_table),
    ];
    // The registry matters in projected mode, and a stack always has one (its output names
    // it); a Secret-only local set-up is not told to create it.
    let registry_in_use = config.identity_mode
        == iam_broker_kernel::config::IdentityMode::Projected
        || environment
            .output(crate::stack::OUTPUT_CLUSTERS_TABLE)
            .is_some();
    if registry_in_use {
        tables.push((TableRole::Clusters, &config.clusters_table));
    }
    for (role, table) in tables {
        let name = format!("{} table", role.name());
        if !checks.runs(&name, &[Scope::Aws, Scope::endpoint(&dynamodb_endpoint)]) {
            continue;
        }
        match check_table(&aws.dynamodb, table, role).await {
            Ok(()) => checks.ok(&name, format!("{table} has the right keys")),
            Err(error) => match (&error, error.aws_error()) {
                (_, Some(aws)) => checks.aws_failure(&name, aws, &error),
                // A missing table names itself.
                (TableCheckError::Call(_), None) => checks.fail(&name, error_chain(&error)),
                _ => checks.fail(&name, format!("table {table}: {}", error_chain(&error))),
            },
        }
    }
    if config.identity_mode == iam_broker_kernel::config::IdentityMode::Projected {
        registration(&mut checks, &config, &aws, &dynamodb_endpoint).await;
    }
    let (permissions, rbac_file) = match (config.identity_mode, config.service_account_lookup) {
        (iam_broker_kernel::config::IdentityMode::Secret, _) => (
            iam_broker_kube::REQUIRED_PERMISSIONS,
            "deploy/components/rbac-secret/20-rbac.yaml",
        ),
        (_, true) => (
            iam_broker_kube::PROJECTED_PERMISSIONS,
            "deploy/components/rbac-projected/20-rbac.projected.yaml",
        ),
        (_, false) => (&[][..], ""),
    };
    if permissions.is_empty() {
        checks.ok(
            "Kubernetes",
            "not called: IDENTITY_MODE=projected without SERVICE_ACCOUNT_LOOKUP (the webhook \
             needs no kubeconfig and no RBAC)",
        );
        return Ok(finish_image_check(checks, &config));
    }
    let source = match &config.kubeconfig_parameter {
        Some(parameter) => {
            let name = "kubeconfig parameter";
            let ssm = endpoint(Service::Ssm);
            if checks.runs(name, &[Scope::Aws, Scope::endpoint(&ssm)]) {
                match iam_broker_kube::kubeconfig_from_ssm(&aws.ssm, parameter).await {
                    Ok(_) => checks.ok(name, format!("{parameter} decrypts")),
                    Err(error) => {
                        match std::error::Error::source(&error)
                            .and_then(|s| s.downcast_ref::<iam_broker_aws::AwsError>())
                        {
                            Some(aws) => checks.aws_failure(name, aws, &error),
                            None => checks.fail(name, error_chain(&error)),
                        }
                        checks.shares(
                            Scope::Kubernetes,
                            format!("the kubeconfig parameter {parameter} cannot be read"),
                        );
                    }
                }
            } else {
                checks.shares(
                    Scope::Kubernetes,
                    format!("the kubeconfig parameter {parameter} was not read"),
                );
            }
            aws.cluster_source(&config)
        }
        None => iam_broker_kube::ClientSource::Infer,
    };
    let cluster = iam_broker_kube::KubeCluster::new(source, config.aws_call_timeout);
    for permission in permissions {
        let name = format!(
            "Kubernetes RBAC {} {}",
            permission.verb, permission.resource
        );
        if !checks.runs(&name, &[Scope::Kubernetes]) {
            continue;
        }
        match cluster.can(*permission).await {
            Ok(true) => checks.ok(&name, "allowed"),
            Ok(false) => checks.fail(&name, format!("denied: apply {rbac_file}")),
            Err(error) => {
                checks.fail(
                    &name,
                    format!("cannot ask the API server: {}", error_chain(&error)),
                );
                checks.shares(
                    Scope::Kubernetes,
                    "the Kubernetes API server cannot be asked".to_owned(),
                );
            }
        }
    }
    Ok(finish_image_check(checks, &config))
}

/// The sidecar image check, last; whether every check passed.
fn finish_image_check(mut checks: Checks, config: &iam_broker_kernel::Config) -> bool {
    match (&config.proxy_image, config.injection) {
        (Some(image), _) => checks.ok("sidecar image", image),
        (None, InjectionMode::Direct) => checks.ok(
            "sidecar image",
            "none needed: INJECTION=direct (pods annotated iam-broker.io/injection: sidecar \
             would get nothing)",
        ),
        (None, InjectionMode::Sidecar) => checks.fail(
            "sidecar image",
            "PROXY_IMAGE is not set: the webhook will inject nothing (or set INJECTION=direct)",
        ),
    }
    checks.healthy
}

/// Projected mode: the webhook's cluster has a name, and that name is registered (else the
/// broker refuses every token its pods get).
async fn registration(
    checks: &mut Checks,
    config: &iam_broker_kernel::Config,
    aws: &iam_broker_app::AwsAdapters,
    dynamodb: &iam_broker_aws::Endpoint,
) {
    use iam_broker_kernel::ports::ClusterRegistry as _;
    let name = "cluster registration";
    let Some(cluster) = config
        .webhook_cluster
        .as_ref()
        .or(config.cluster_name.as_ref())
    else {
        checks.fail(
            name,
            "IDENTITY_MODE=projected needs CLUSTER_NAME (the stack's ClusterName): the broker \
             knows pods by the registered cluster whose key signed their token",
        );
        return;
    };
    if !checks.runs(name, &[Scope::Aws, Scope::endpoint(dynamodb)]) {
        return;
    }
    match aws.clusters.cluster(cluster).await {
        Ok(Some(registered)) => checks.ok(
            name,
            format!(
                "{cluster} is registered (issuer {}, {} keys)",
                registered.issuer,
                registered.keys.keys().len()
            ),
        ),
        Ok(None) => checks.fail(
            name,
            format!(
                "{cluster} is not registered, so the broker refuses its pods' tokens: \
                 `iam-broker cluster add {cluster} --kubeconfig ...` before registering the webhook"
            ),
        ),
        Err(error) => checks.fail(name, format!("cannot read the Clusters table: {error}")),
    }
}

/// What a failure can take down with it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    /// Every AWS call (region, credentials).
    Aws,
    /// Every call to one URL set by a variable.
    Endpoint(String),
    /// Every call to AWS's own endpoints (no variable): when one cannot be reached, the network
    /// is the cause, not the service.
    AwsOwn,
    /// Every Kubernetes check.
    Kubernetes,
}

impl Scope {
    fn endpoint(endpoint: &iam_broker_aws::Endpoint) -> Self {
        match endpoint.variable {
            Some(_) => Self::Endpoint(endpoint.url.clone()),
            None => Self::AwsOwn,
        }
    }
}

/// The doctor's report: one line per check, each cause printed once.
struct Checks {
    healthy: bool,
    /// Causes already printed, with what they take down and a short summary.
    shared: Vec<(Scope, String)>,
}

impl Checks {
    fn new() -> Self {
        Self {
            healthy: true,
            shared: Vec::new(),
        }
    }

    fn ok(&self, name: &str, detail: impl std::fmt::Display) {
        println!("ok    {name}: {detail}");
    }

    fn fail(&mut self, name: &str, detail: impl std::fmt::Display) {
        self.healthy = false;
        println!("FAIL  {name}: {detail}");
    }

    /// `false` (and a `skip` line) when a cause already printed takes this check down.
    fn runs(&mut self, name: &str, scopes: &[Scope]) -> bool {
        let Some((_, summary)) = self.shared.iter().find(|(scope, _)| scopes.contains(scope))
        else {
            return true;
        };
        self.healthy = false;
        println!("skip  {name}: because {summary} (see above)");
        false
    }

    /// Records that later checks in `scope` cannot pass either.
    fn shares(&mut self, scope: Scope, summary: String) {
        self.shared.push((scope, summary));
    }

    /// Prints a failed AWS check (`error` whole, `aws` being its explained SDK failure) and
    /// records what else it takes down.
    fn aws_failure(
        &mut self,
        name: &str,
        aws: &iam_broker_aws::AwsError,
        error: &(dyn std::error::Error + 'static),
    ) {
        use iam_broker_aws::AwsError;
        self.fail(name, error_chain(error));
        let shared = match aws {
            AwsError::NoRegion(_) => Some((Scope::Aws, "no AWS region is set".to_owned())),
            AwsError::NoCredentials(_) => {
                Some((Scope::Aws, "no AWS credentials were found".to_owned()))
            }
            AwsError::CredentialsUnusable(_) => Some((
                Scope::Aws,
                "the AWS credentials could not be loaded".to_owned(),
            )),
            AwsError::CredentialsRejected { .. } => {
                Some((Scope::Aws, "AWS does not accept the credentials".to_owned()))
            }
            AwsError::Unreachable { endpoint, .. } | AwsError::TimedOut { endpoint, .. } => Some((
                Scope::endpoint(endpoint),
                format!("AWS is unreachable at {}", endpoint.url),
            )),
            AwsError::NotAws { endpoint, .. } => Some((
                Scope::endpoint(endpoint),
                format!("{} is not AWS", endpoint.url),
            )),
            AwsError::BadEndpoint { endpoint, .. } => Some((
                Scope::endpoint(endpoint),
                format!("{:?} is not a URL", endpoint.url),
            )),
            _ => None,
        };
        if let Some((scope, summary)) = shared {
            self.shares(scope, summary);
        }
    }
}
