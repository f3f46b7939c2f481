//! `iam-broker`: run the router as a plain HTTP server and administer allowances and tokens.
#![forbid(unsafe_code)]

mod admin;
mod clusters;
mod explain;
mod ops;
mod serve;
mod sessions;
mod stack;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// iam-broker: short-lived AWS IAM role credentials for Kubernetes pods, without static keys
/// and without an OIDC issuer.
///
/// Every command reads the same environment as the Lambda function (ALLOWANCES_TABLE,
/// AUTHORIZATIONS_TABLE, CLUSTERS_TABLE, CLUSTER_NAME, CREDENTIAL_DURATION_SECONDS, ...) plus the
/// standard AWS variables (AWS_REGION, AWS_ENDPOINT_URL, credentials).
#[derive(Debug, Parser)]
#[command(name = "iam-broker", version, propagate_version = true)]
struct Cli {
    /// The deployed CloudFormation stack (samconfig.toml's stack_name): its outputs supply the
    /// table names, the kubeconfig parameter, the sidecar image and the URLs. Variables set in
    /// the environment still win.
    #[arg(long, global = true, env = stack::ENV_STACK, value_name = "NAME")]
    stack: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the router (broker and webhook; the same router as the Lambda function) over HTTP,
    /// or HTTPS with --tls-cert and --tls-key (in-cluster deployment, see deploy/overlays/in-cluster).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// PEM certificate chain (leaf first) for HTTPS.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// PEM private key for HTTPS.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
        /// A connection whose request head is not complete within this many ms is closed.
        #[arg(long, env = "IAM_BROKER_HEADER_READ_TIMEOUT_MS", value_name = "MS",
              default_value_t = serve::DEFAULT_HEADER_READ_TIMEOUT_MS,
              value_parser = clap::value_parser!(u64).range(100..=600_000))]
        header_read_timeout_ms: u64,
        /// A request body not complete within this many ms of its head is answered 408 and its
        /// connection closed; a route that takes no body never waits for one.
        #[arg(long, env = "IAM_BROKER_BODY_READ_TIMEOUT_MS", value_name = "MS",
              default_value_t = serve::DEFAULT_BODY_READ_TIMEOUT_MS,
              value_parser = clap::value_parser!(u64).range(100..=600_000))]
        body_read_timeout_ms: u64,
        /// A TLS handshake not finished within this many ms is dropped.
        #[arg(long, env = "IAM_BROKER_TLS_HANDSHAKE_TIMEOUT_MS", value_name = "MS",
              default_value_t = serve::DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS,
              value_parser = clap::value_parser!(u64).range(100..=600_000))]
        tls_handshake_timeout_ms: u64,
        /// Connections served at once; at the limit new clients wait in the listen backlog.
        #[arg(long, env = "IAM_BROKER_MAX_CONNECTIONS", value_name = "N",
              default_value_t = serve::DEFAULT_MAX_CONNECTIONS as u64,
              value_parser = clap::value_parser!(u64).range(1..=65_536))]
        max_connections: u64,
        /// Serve Prometheus metrics (OpenMetrics text at GET /metrics) on this address, plain
        /// HTTP, apart from the broker's port: requests by route and outcome, latency per
        /// stage, STS errors by code, the registry and the credential cache.
        #[arg(long, env = "IAM_BROKER_METRICS_LISTEN", value_name = "ADDR")]
        metrics_listen: Option<SocketAddr>,
    },
    /// Allow a ServiceAccount (or `*`, every ServiceAccount of the namespace) to assume a role.
    Allow(AllowanceArgs),
    /// Withdraw a role from a ServiceAccount, or every role when --role is left out.
    Disallow(DisallowArgs),
    /// List allowances (every cluster's unless --cluster or --namespace narrows it).
    Allowances {
        /// Only this namespace (of --cluster, else of the default cluster).
        #[arg(long)]
        namespace: Option<String>,
        /// Only this registered cluster's allowances (CLUSTER_NAME, or none: the default
        /// cluster's, which carry no cluster prefix).
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Manage tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage the registered clusters whose projected ServiceAccount tokens the broker accepts
    /// (the Clusters table, CLUSTERS_TABLE).
    #[command(subcommand)]
    Cluster(clusters::ClusterCommand),
    /// Manage the DynamoDB tables (for local and test set-ups; production tables come from
    /// template.yaml).
    #[command(subcommand)]
    Tables(TablesCommand),
    /// Print the MutatingWebhookConfiguration that registers the webhook with the cluster
    /// (pipe it to `kubectl apply -f -`).
    RenderWebhook(ops::RenderWebhookArgs),
    /// Fetch credentials with a token, as a pod's SDK would (validates a deployed broker or a
    /// sidecar). Prints a summary without secrets unless --output json.
    Credentials(ops::CredentialsArgs),
    /// Remove token records whose Secret is gone and managed Secrets whose record is gone (the
    /// scheduled sweep, run by hand).
    Sweep(ops::SweepArgs),
    /// Build the webhook's kubeconfig from a ServiceAccount token, and print it or store it in
    /// SSM (replaces `oc sa create-kubeconfig` + the Parameter Store console).
    Kubeconfig(ops::KubeconfigArgs),
    /// The kill switch: revoke the sessions of a namespace, a ServiceAccount or a pod (no new
    /// credentials, and a deny at AWS on those already issued), list and restore.
    #[command(subcommand)]
    Sessions(sessions::SessionsCommand),
    /// Say what the webhook and the broker would do for a pod, a ServiceAccount or a token, and
    /// why, step by step (the registration's selectors, the pod checks, the ServiceAccount's
    /// annotation, the Allowances rows, the webhook's dry-run answer, the broker's decision).
    /// Writes nothing and calls no STS. Exits 0 when credentials would be given, 2 when not,
    /// 1 when it cannot tell.
    Explain(explain::ExplainArgs),
    /// Check the configuration end to end: tables and their keys, STS, the kubeconfig
    /// parameter, Kubernetes reachability and RBAC (SelfSubjectAccessReview), the sidecar image.
    /// Exits 1 when a check fails.
    Doctor,
}

#[derive(Debug, Args)]
struct AllowanceArgs {
    /// Kubernetes namespace.
    #[arg(long)]
    namespace: String,
    /// ServiceAccount name, or `*` for every ServiceAccount of the namespace.
    #[arg(long)]
    service_account: String,
    /// IAM role ARN.
    #[arg(long)]
    role: String,
    /// The registered cluster whose pods this allows (`cluster add`): NAME's rows; left out, the
    /// default cluster's unprefixed rows (the default cluster, named by CLUSTER_NAME, reads both).
    #[arg(long, value_name = "NAME")]
    cluster: Option<String>,
    /// The ExternalId to send when assuming this role (a role in another account whose trust
    /// policy requires sts:ExternalId). Left out, any ExternalId stored for the role is removed.
    #[arg(long, value_name = "ID")]
    external_id: Option<String>,
    /// A session policy (a JSON IAM policy file, or - for stdin) sent as Policy with
    /// sts:AssumeRole: the pods' sessions get the intersection of the role's permissions and
    /// this. At most 2,048 characters once compacted; checked before anything is written. Left
    /// out, any session policy stored for the role is removed.
    #[arg(long, value_name = "FILE")]
    session_policy: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
struct DisallowArgs {
    /// Kubernetes namespace.
    #[arg(long)]
    namespace: String,
    /// ServiceAccount name, or `*`.
    #[arg(long)]
    service_account: String,
    /// IAM role ARN; all roles of the ServiceAccount when left out.
    #[arg(long)]
    role: Option<String>,
    /// The registered cluster; left out, or CLUSTER_NAME: the default cluster.
    #[arg(long, value_name = "NAME")]
    cluster: Option<String>,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Mint a token for a namespace / ServiceAccount / role, record its hash and print the
    /// token once on stdout.
    Create {
        /// Kubernetes namespace.
        #[arg(long)]
        namespace: String,
        /// ServiceAccount name.
        #[arg(long)]
        service_account: String,
        /// IAM role ARN.
        #[arg(long)]
        role: String,
        /// Pod name, recorded and used in the STS session name.
        #[arg(long)]
        pod: Option<String>,
    },
    /// List token records (hashes only; tokens are never stored).
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Revoke a token by its hash (as `token list` shows it, or the prefix `token create`
    /// prints) or by the token itself on stdin.
    Revoke {
        /// The token's hash: all 64 hex characters, or a prefix of at least 12 (as `token
        /// create` prints it) that matches one token only.
        #[arg(
            long,
            value_name = "HASH_OR_PREFIX",
            conflicts_with = "stdin",
            required_unless_present = "stdin"
        )]
        hash: Option<String>,
        /// Read the token itself from stdin.
        #[arg(long)]
        stdin: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TablesCommand {
    /// Create the Allowances, Authorizations and Clusters tables if they do not exist.
    Create,
}

/// Output format of listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for programs.
    Json,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    iam_broker_kernel::telemetry::init_json_logging();
    let environment = match &cli.command {
        Command::Serve { .. } => Ok(stack::Environment::default()),
        _ => stack::Environment::load(cli.stack).await,
    };
    let environment = match environment {
        Ok(environment) => environment,
        Err(error) => {
            eprintln!("iam-broker: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve {
            listen,
            tls_cert,
            tls_key,
            header_read_timeout_ms,
            body_read_timeout_ms,
            tls_handshake_timeout_ms,
            max_connections,
            metrics_listen,
        } => {
            let tls = tls_cert
                .zip(tls_key)
                .map(|(cert, key)| serve::Tls { cert, key });
            let limits = serve::Limits {
                header_read_timeout: Duration::from_millis(header_read_timeout_ms),
                body_read_timeout: Duration::from_millis(body_read_timeout_ms),
                tls_handshake_timeout: Duration::from_millis(tls_handshake_timeout_ms),
                max_connections: usize::try_from(max_connections)
                    .unwrap_or(serve::DEFAULT_MAX_CONNECTIONS),
            };
            serve::run(listen, tls, limits, metrics_listen).await
        }
        Command::RenderWebhook(args) => ops::render(args, &environment),
        Command::Credentials(args) => ops::credentials(args, &environment).await,
        Command::Sweep(args) => ops::sweep(args, &environment).await,
        Command::Kubeconfig(args) => ops::kubeconfig(args, &environment).await,
        Command::Sessions(command) => sessions::run(command, &environment).await,
        Command::Explain(args) => match explain::explain(args, &environment).await {
            Ok(code) => return ExitCode::from(code),
            Err(error) => Err(error),
        },
        Command::Doctor => match ops::doctor(&environment).await {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(error) => Err(error),
        },
        command => admin::run(command, &environment).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("iam-broker: {error:#}");
            ExitCode::FAILURE
        }
    }
}
