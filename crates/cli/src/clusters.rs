//! `iam-broker cluster …`: the registry of clusters whose projected ServiceAccount tokens the
//! broker accepts (the Clusters table).
//!
//! A cluster's issuer and keys come from its API server (`/.well-known/openid-configuration`
//! and `/openid/v1/jwks`, which the built-in ClusterRole `system:service-account-issuer-discovery`
//! allows; see `deploy/components/issuer-discovery/25-issuer-discovery.yaml`) or from a JWKS file. Before
//! anything is stored, the keys are validated and checked against every other registered
//! cluster: two clusters of one issuer must not share a key, or their tokens could not be told
//! apart. A kubeconfig is read only to reach the API server: its contents and credentials are
//! never printed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{ArgGroup, Subcommand};
use iam_broker_kernel::cluster::{ClusterName, ClusterRegistrationError, RegisteredCluster};
use iam_broker_kernel::ports::{ClusterRegistry, StoreError};
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use serde_json::json;
use time::OffsetDateTime;

use crate::Output;
use iam_broker_kernel::clock::rfc3339;

/// How long one request to a cluster's API server may take.
const API_SERVER_TIMEOUT: Duration = Duration::from_secs(10);
/// The discovery document of the cluster's ServiceAccount issuer.
pub const OPENID_CONFIGURATION_PATH: &str = "/.well-known/openid-configuration";
/// The keys that verify the cluster's ServiceAccount tokens.
pub const JWKS_PATH: &str = "/openid/v1/jwks";

/// `iam-broker cluster …`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Register a cluster: its projected ServiceAccount tokens (audience PROJECTED_AUDIENCE)
    /// are then accepted by the broker. Issuer and keys come from the cluster's API server
    /// (--kubeconfig) or from a JWKS file (--jwks-file with --issuer).
    #[command(group = ArgGroup::new("keys").required(true).args(["kubeconfig", "jwks_file"]))]
    Add {
        /// The cluster's name (a DNS label): allowances for its pods are given with
        /// `allow --cluster NAME`; pods of the default cluster (CLUSTER_NAME) use unscoped
        /// allowances.
        name: String,
        /// Kubeconfig to reach the cluster's API server; its identity needs GET on
        /// /.well-known/openid-configuration and /openid/v1/jwks (the ClusterRole
        /// system:service-account-issuer-discovery).
        #[arg(long, value_name = "PATH")]
        kubeconfig: Option<PathBuf>,
        /// The kubeconfig context to use (default: its current context).
        #[arg(long, value_name = "CONTEXT", requires = "kubeconfig")]
        context: Option<String>,
        /// A JWKS document (`kubectl get --raw /openid/v1/jwks`), for a cluster this machine
        /// cannot reach.
        #[arg(long, value_name = "PATH", requires = "issuer")]
        jwks_file: Option<PathBuf>,
        /// The issuer (`iss`) of the cluster's ServiceAccount tokens, with --jwks-file
        /// (`kubectl get --raw /.well-known/openid-configuration` shows it).
        #[arg(long, value_name = "URL", requires = "jwks_file")]
        issuer: Option<String>,
    },
    /// List the registered clusters: name, issuer, key ids, where the keys came from, when.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table, conflicts_with = "json")]
        output: Output,
        /// Same as --output json.
        #[arg(long)]
        json: bool,
    },
    /// Unregister a cluster: its tokens are refused once brokers re-read the registry
    /// (CLUSTER_REGISTRY_TTL_SECONDS). Its allowances stay (`allowances --cluster NAME`).
    Remove {
        /// The cluster's name.
        name: String,
    },
    /// Replace a registered cluster's keys (after a key rotation) and, with --kubeconfig or
    /// --issuer, its issuer.
    #[command(group = ArgGroup::new("keys").required(true).args(["kubeconfig", "jwks_file"]))]
    Refresh {
        /// The cluster's name.
        name: String,
        /// Kubeconfig to reach the cluster's API server (as for `cluster add`).
        #[arg(long, value_name = "PATH")]
        kubeconfig: Option<PathBuf>,
        /// The kubeconfig context to use (default: its current context).
        #[arg(long, value_name = "CONTEXT", requires = "kubeconfig")]
        context: Option<String>,
        /// A JWKS document.
        #[arg(long, value_name = "PATH")]
        jwks_file: Option<PathBuf>,
        /// A new issuer, with --jwks-file (default: the registered one).
        #[arg(long, value_name = "URL", requires = "jwks_file")]
        issuer: Option<String>,
    },
}

/// Where a cluster's keys are read from.
enum KeySource {
    /// The API server a kubeconfig points at.
    ApiServer {
        kubeconfig: PathBuf,
        context: Option<String>,
    },
    /// A JWKS file; the issuer is given, or (refresh) the registered one.
    File {
        path: PathBuf,
        issuer: Option<String>,
    },
}

impl KeySource {
    fn from_args(
        kubeconfig: Option<PathBuf>,
        context: Option<String>,
        jwks_file: Option<PathBuf>,
        issuer: Option<String>,
    ) -> anyhow::Result<Self> {
        match (kubeconfig, jwks_file) {
            (Some(kubeconfig), None) => Ok(Self::ApiServer {
                kubeconfig,
                context,
            }),
            (None, Some(path)) => Ok(Self::File { path, issuer }),
            _ => bail!("give either --kubeconfig or --jwks-file"),
        }
    }
}

/// What was read: the issuer, the JWKS text and a description of where it came from.
struct Keys {
    issuer: String,
    jwks: String,
    source: String,
}

/// Runs a `cluster` command against `registry`; `default_cluster` is CLUSTER_NAME.
pub async fn run(
    command: ClusterCommand,
    registry: &dyn ClusterRegistry,
    default_cluster: Option<&ClusterName>,
) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Add {
            name,
            kubeconfig,
            context,
            jwks_file,
            issuer,
        } => {
            let name = ClusterName::parse(&name)?;
            let source = KeySource::from_args(kubeconfig, context, jwks_file, issuer)?;
            add(registry, &name, source).await
        }
        ClusterCommand::Refresh {
            name,
            kubeconfig,
            context,
            jwks_file,
            issuer,
        } => {
            let name = ClusterName::parse(&name)?;
            let source = KeySource::from_args(kubeconfig, context, jwks_file, issuer)?;
            refresh(registry, &name, source).await
        }
        ClusterCommand::List { output, json } => {
            let output = if json { Output::Json } else { output };
            list(registry, default_cluster, output).await
        }
        ClusterCommand::Remove { name } => {
            let name = ClusterName::parse(&name)?;
            remove(registry, &name).await
        }
    }
}

async fn add(
    registry: &dyn ClusterRegistry,
    name: &ClusterName,
    source: KeySource,
) -> anyhow::Result<()> {
    let others = registry.clusters().await?;
    if let Some(existing) = others.iter().find(|c| &c.name == name) {
        bail!(already_registered(existing));
    }
    let keys = read_keys(&source, None).await?;
    let cluster = validated(name, keys, &others)?;
    match registry.insert(&cluster).await {
        Ok(()) => {}
        Err(StoreError::AlreadyExists) => {
            // Registered meanwhile, or a row `cluster list` cannot read.
            bail!(
                "cluster {name} is already registered: use `iam-broker cluster refresh {name}` \
                 to replace its keys"
            )
        }
        Err(error) => return Err(error).context(format!("could not register cluster {name}")),
    }
    println!(
        "registered cluster {name}: issuer {}, keys {} (from {})",
        cluster.issuer,
        kids(&cluster),
        cluster.source
    );
    warn_skipped(&cluster);
    println!(
        "its pods' allowances: iam-broker allow --cluster {name} --namespace NS \
         --service-account SA --role ARN"
    );
    Ok(())
}

async fn refresh(
    registry: &dyn ClusterRegistry,
    name: &ClusterName,
    source: KeySource,
) -> anyhow::Result<()> {
    // A row that cannot be read is what a refresh repairs: go on without it.
    let previous = match registry.cluster(name).await {
        Ok(None) => bail!(not_registered(name)),
        Ok(Some(previous)) => Some(previous),
        Err(StoreError::Corrupt { message, .. }) => {
            eprintln!("warning: the stored registration cannot be read ({message}); replacing it");
            None
        }
        Err(error) => return Err(error).context(format!("could not read cluster {name}")),
    };
    let keys = read_keys(&source, previous.as_ref().map(|p| p.issuer.as_str())).await?;
    let others = registry.clusters().await?;
    let cluster = validated(name, keys, &others)?;
    match registry.update(&cluster).await {
        Ok(()) => {}
        Err(StoreError::NotFound) => bail!(not_registered(name)),
        Err(error) => return Err(error).context(format!("could not refresh cluster {name}")),
    }
    println!(
        "refreshed cluster {name}: issuer {}, keys {} (from {})",
        cluster.issuer,
        kids(&cluster),
        cluster.source
    );
    if let Some(previous) = previous {
        if previous.issuer != cluster.issuer {
            println!("  issuer was {}", previous.issuer);
        }
        let (added, retired) = key_changes(&previous, &cluster);
        if !added.is_empty() {
            println!("  new keys: {}", added.join(", "));
        }
        if !retired.is_empty() {
            println!(
                "  retired keys (tokens they signed are refused once brokers re-read the \
                 registry): {}",
                retired.join(", ")
            );
        }
        if added.is_empty() && retired.is_empty() && previous.issuer == cluster.issuer {
            println!("  no change of issuer or keys");
        }
    }
    warn_skipped(&cluster);
    Ok(())
}

async fn list(
    registry: &dyn ClusterRegistry,
    default_cluster: Option<&ClusterName>,
    output: Output,
) -> anyhow::Result<()> {
    let clusters = registry.clusters().await?;
    match output {
        Output::Json => {
            let rows: Vec<_> = clusters
                .iter()
                .map(|c| {
                    json!({
                        "name": c.name.as_str(),
                        "issuer": c.issuer,
                        "kids": c.keys.kids().collect::<Vec<_>>(),
                        "source": c.source,
                        "updated_at": rfc3339(c.updated_at),
                        "default": default_cluster == Some(&c.name),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Output::Table => {
            println!(
                "{:<20} {:<48} {:<24} {:<20} SOURCE",
                "NAME", "ISSUER", "KEYS", "UPDATED"
            );
            for c in &clusters {
                let name = if default_cluster == Some(&c.name) {
                    format!("{} (default)", c.name)
                } else {
                    c.name.to_string()
                };
                println!(
                    "{name:<20} {:<48} {:<24} {:<20} {}",
                    c.issuer,
                    kids(c),
                    rfc3339(c.updated_at),
                    c.source
                );
            }
        }
    }
    Ok(())
}

async fn remove(registry: &dyn ClusterRegistry, name: &ClusterName) -> anyhow::Result<()> {
    match registry.remove(name).await {
        Ok(Some(cluster)) => {
            println!(
                "removed cluster {name} (issuer {}, keys {}); brokers refuse its tokens once \
                 they re-read the registry; its allowances stay (`iam-broker allowances \
                 --cluster {name}`)",
                cluster.issuer,
                kids(&cluster)
            );
            Ok(())
        }
        Ok(None) => bail!(
            "cluster {name} is not registered: nothing was removed (`iam-broker cluster list` \
             shows the registered clusters)"
        ),
        Err(StoreError::Corrupt { message, .. }) => {
            println!("removed cluster {name}; {message}");
            Ok(())
        }
        Err(error) => Err(error).context(format!("could not remove cluster {name}")),
    }
}

/// Validates what was read and checks it against the other registered clusters.
fn validated(
    name: &ClusterName,
    keys: Keys,
    others: &[RegisteredCluster],
) -> anyhow::Result<RegisteredCluster> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let cluster =
        RegisteredCluster::new(name.as_str(), &keys.issuer, &keys.jwks, &keys.source, now)
            .with_context(|| format!("cannot register cluster {name} from {}", keys.source))?;
    match cluster.check_distinct(others) {
        Ok(()) => Ok(cluster),
        Err(ClusterRegistrationError::SharedKey { other, kid }) => bail!(
            "cannot register cluster {name}: cluster {other} has the same issuer ({}) and \
             already holds key {kid}, so their tokens could not be told apart. Is it the same \
             cluster? Then refresh {other} instead; otherwise give each cluster its own \
             service-account signing key",
            cluster.issuer
        ),
        Err(error) => Err(error).with_context(|| format!("cannot register cluster {name}")),
    }
}

/// Reads issuer and keys from `source`; `registered_issuer` is the fallback for a JWKS file
/// given without --issuer.
async fn read_keys(source: &KeySource, registered_issuer: Option<&str>) -> anyhow::Result<Keys> {
    match source {
        KeySource::File { path, issuer } => {
            let jwks = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the JWKS file {}", path.display()))?;
            let issuer = issuer
                .as_deref()
                .or(registered_issuer)
                .context("give the cluster's issuer with --issuer")?;
            Ok(Keys {
                issuer: issuer.to_owned(),
                jwks,
                source: format!("file {}", absolute(path).display()),
            })
        }
        KeySource::ApiServer {
            kubeconfig,
            context,
        } => from_api_server(kubeconfig, context.as_deref()).await,
    }
}

/// The issuer and JWKS the API server publishes.
async fn from_api_server(path: &Path, context: Option<&str>) -> anyhow::Result<Keys> {
    let (client, server) = api_server_client(path, context).await?;
    let discovery = get(&client, &server, OPENID_CONFIGURATION_PATH).await?;
    let issuer = serde_json::from_str::<serde_json::Value>(&discovery)
        .ok()
        .and_then(|document| document.get("issuer")?.as_str().map(str::to_owned))
        .with_context(|| {
            format!("{server}{OPENID_CONFIGURATION_PATH} answered without an issuer")
        })?;
    let jwks = get(&client, &server, JWKS_PATH).await?;
    Ok(Keys {
        issuer,
        jwks,
        source: format!("api-server {server}"),
    })
}

/// A client for the API server of `path`'s context, and that server's URL.
async fn api_server_client(
    path: &Path,
    context: Option<&str>,
) -> anyhow::Result<(kube::Client, String)> {
    // rustls cannot choose between the two crypto providers this binary links (ring for
    // rustls, aws-lc-rs through the AWS SDK): choose ring, as the rest of the workspace does.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let unusable =
        |why: String| anyhow::anyhow!("the kubeconfig {} is not usable: {why}", path.display());
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| unusable(kubeconfig_error(&e)))?;
    let options = KubeConfigOptions {
        context: context.map(str::to_owned),
        ..KubeConfigOptions::default()
    };
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|e| unusable(kubeconfig_error(&e)))?;
    config.connect_timeout = Some(API_SERVER_TIMEOUT);
    config.read_timeout = Some(API_SERVER_TIMEOUT);
    config.write_timeout = Some(API_SERVER_TIMEOUT);
    let server = config
        .cluster_url
        .to_string()
        .trim_end_matches('/')
        .to_owned();
    let client = kube::Client::try_from(config)
        .map_err(|e| unusable(format!("cannot build a client from it: {e}")))?;
    Ok((client, server))
}

/// What is wrong with a kubeconfig, without quoting it: a YAML error can echo a value, and a
/// kubeconfig's values include tokens and keys.
fn kubeconfig_error(error: &KubeconfigError) -> String {
    match error {
        KubeconfigError::Parse(_) => "it is not valid kubeconfig YAML".to_owned(),
        KubeconfigError::ReadConfig(source, _) => format!("cannot read it: {source}"),
        KubeconfigError::LoadClientCertificate(_) | KubeconfigError::LoadClientKey(_) => {
            "its client certificate or key cannot be loaded".to_owned()
        }
        other => other.to_string(),
    }
}

/// `GET path` on the API server, as text.
async fn get(client: &kube::Client, server: &str, path: &str) -> anyhow::Result<String> {
    let request = http::Request::get(path)
        .header(
            http::header::ACCEPT,
            "application/json, application/jwk-set+json",
        )
        .body(Vec::new())
        .context("cannot build the request")?;
    let answer = tokio::time::timeout(API_SERVER_TIMEOUT, client.request_text(request)).await;
    match answer {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(kube::Error::Api(status))) if status.code == 401 || status.code == 403 => bail!(
            "{server} refused GET {path} ({} {}): the kubeconfig's identity needs the ClusterRole \
             system:service-account-issuer-discovery (see \
             deploy/components/issuer-discovery/25-issuer-discovery.yaml)",
            status.code,
            status.reason
        ),
        Ok(Err(error)) => Err(error).with_context(|| format!("GET {server}{path} failed")),
        Err(_) => bail!(
            "GET {server}{path} did not answer within {} s",
            API_SERVER_TIMEOUT.as_secs()
        ),
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

fn kids(cluster: &RegisteredCluster) -> String {
    let kids: Vec<&str> = cluster.keys.kids().collect();
    let unnamed = cluster.keys.keys().len() - kids.len();
    let mut text = kids.join(",");
    if unnamed > 0 {
        if !text.is_empty() {
            text.push(',');
        }
        text.push_str(&format!("{unnamed} without kid"));
    }
    text
}

/// The `kid`s `now` has that `before` had not, and the other way round.
fn key_changes(before: &RegisteredCluster, now: &RegisteredCluster) -> (Vec<String>, Vec<String>) {
    let missing_from = |a: &RegisteredCluster, b: &RegisteredCluster| {
        a.keys
            .kids()
            .filter(|kid| !b.keys.kids().any(|k| k == *kid))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    (missing_from(now, before), missing_from(before, now))
}

fn warn_skipped(cluster: &RegisteredCluster) {
    let skipped = cluster.keys.skipped();
    if skipped > 0 {
        eprintln!(
            "warning: {skipped} key(s) of the JWKS were left out (not RS256 or ES256 signing \
             keys): tokens they sign will be refused"
        );
    }
}

fn already_registered(existing: &RegisteredCluster) -> String {
    format!(
        "cluster {} is already registered (issuer {}, keys {}, updated {}): use `iam-broker \
         cluster refresh {}` to replace its keys",
        existing.name,
        existing.issuer,
        kids(existing),
        rfc3339(existing.updated_at),
        existing.name
    )
}

fn not_registered(name: &ClusterName) -> String {
    format!(
        "cluster {name} is not registered: register it with `iam-broker cluster add {name} …` \
         (`iam-broker cluster list` shows the registered clusters)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_parse_errors_quote_nothing() {
        let secret = "users:\n- name: u\n  user: \"sk-very-secret-token\"\n";
        let error = Kubeconfig::from_yaml(secret).unwrap_err();
        let message = kubeconfig_error(&error);
        assert!(!message.contains("sk-very-secret-token"), "{message}");
    }
}
