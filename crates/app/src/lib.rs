//! Composition root: the one place where configuration meets the real adapters. The Lambda
//! binary, `iam-broker serve` and every CLI command build their clients and stores here, so
//! they cannot drift apart.
#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use iam_broker_admission::cleanup::Cleanup;
use iam_broker_admission::webhook::{Webhook, WebhookSettings};
use iam_broker_aws::{
    DynamoAllowanceStore, DynamoClusterRegistry, DynamoTokenStore, StsCredentialIssuer,
};
use iam_broker_broker::broker::{Broker, BrokerSettings};
use iam_broker_broker::cache::CredentialCache;
use iam_broker_broker::projected::{ProjectedIdentities, ProjectedSettings};
use iam_broker_kernel::config::PROJECTED_TOKEN_LEEWAY;
use iam_broker_kernel::ports::Cluster;
use iam_broker_kernel::{Config, SystemClock};
use iam_broker_kube::{ClientSource, KubeCluster};
use iam_broker_router::AppState;
use iam_broker_router::metrics::Metrics;
use iam_broker_router::prometheus::Prometheus;

/// Shortest time between two re-reads of the cluster registry caused by a token whose issuer or
/// key the broker's snapshot does not hold (capped by `CLUSTER_REGISTRY_TTL_SECONDS`). The first
/// such token of an interval reads the registry on its own path (a just-registered key works at
/// once); the others are refused at once and leave the read to the background, so a flood of
/// forged `kid`s costs at most one Scan of the small Clusters table per second per broker
/// instance, and holds at most one request per second for it.
pub const REGISTRY_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// The AWS side, built once from one SDK configuration: the clients and the stores over them.
#[derive(Clone)]
pub struct AwsAdapters {
    /// DynamoDB (every table).
    pub dynamodb: aws_sdk_dynamodb::Client,
    /// STS (AssumeRole for the broker, GetCallerIdentity for `doctor`).
    pub sts: aws_sdk_sts::Client,
    /// SSM (the webhook's kubeconfig parameter).
    pub ssm: aws_sdk_ssm::Client,
    /// The Allowances table.
    pub allowances: Arc<DynamoAllowanceStore>,
    /// The Authorizations table.
    pub tokens: Arc<DynamoTokenStore>,
    /// The Clusters table (the registry of clusters whose projected tokens the broker accepts).
    pub clusters: Arc<DynamoClusterRegistry>,
}

impl AwsAdapters {
    /// Clients and stores for `config`'s tables. Calls nothing.
    pub fn new(config: &Config, sdk: &aws_config::SdkConfig) -> Self {
        let dynamodb = aws_sdk_dynamodb::Client::new(sdk);
        Self {
            allowances: Arc::new(DynamoAllowanceStore::new(
                dynamodb.clone(),
                &config.allowances_table,
            )),
            tokens: Arc::new(DynamoTokenStore::new(
                dynamodb.clone(),
                &config.authorizations_table,
            )),
            clusters: Arc::new(DynamoClusterRegistry::new(
                dynamodb.clone(),
                &config.clusters_table,
            )),
            dynamodb,
            sts: aws_sdk_sts::Client::new(sdk),
            ssm: aws_sdk_ssm::Client::new(sdk),
        }
    }

    /// Loads the SDK configuration from the environment (deadlines from `config`) and builds
    /// the adapters.
    pub async fn load(config: &Config) -> Self {
        let sdk = iam_broker_aws::load_sdk_config(config.aws_call_timeout).await;
        Self::new(config, &sdk)
    }

    /// Where the webhook's Kubernetes client comes from: the SSM parameter
    /// `KUBECONFIG_PARAMETER`, else the standard kubeconfig / in-cluster inference.
    pub fn cluster_source(&self, config: &Config) -> ClientSource {
        match &config.kubeconfig_parameter {
            Some(parameter) => ClientSource::SsmParameter {
                ssm: self.ssm.clone(),
                name: parameter.clone(),
            },
            None => ClientSource::Infer,
        }
    }
}

/// Everything a runner needs.
pub struct App {
    /// The router's state.
    pub state: AppState,
    /// Stream and sweep cleanup (same Kubernetes access as the webhook).
    pub cleanup: Arc<Cleanup>,
}

/// Builds the state from configuration. Nothing here calls the network: AWS clients are built
/// from the environment, and the Kubernetes client is built on first use (from the SSM
/// parameter `KUBECONFIG_PARAMETER`, else the standard kubeconfig / in-cluster inference), so
/// a broker-only function starts fast and never needs Kubernetes access.
pub async fn build(config: &Config) -> App {
    build_from(config, AwsAdapters::load(config).await, None)
}

/// [`build`], counting requests and timing each stage in `prometheus` as well (`serve
/// --metrics-listen`).
pub async fn build_with_prometheus(config: &Config, prometheus: Arc<Prometheus>) -> App {
    build_from(config, AwsAdapters::load(config).await, Some(prometheus))
}

/// [`build`] with a given AWS configuration (tests point it at moto).
pub fn build_with(config: &Config, sdk: &aws_config::SdkConfig) -> App {
    build_from(config, AwsAdapters::new(config, sdk), None)
}

fn build_from(config: &Config, aws: AwsAdapters, prometheus: Option<Arc<Prometheus>>) -> App {
    let cluster: Arc<dyn Cluster> = Arc::new(KubeCluster::new(
        aws.cluster_source(config),
        config.aws_call_timeout,
    ));
    let clock = Arc::new(SystemClock);
    // Always on: the registry is read only when a projected token arrives, so a Secret-only
    // stack never reads it (nor needs the table to exist).
    let projected = ProjectedIdentities::new(
        aws.clusters.clone(),
        clock.clone(),
        projected_settings(config),
    );
    let broker = Broker::new(
        aws.allowances.clone(),
        aws.tokens.clone(),
        Arc::new(StsCredentialIssuer::new(aws.sts.clone())),
        clock.clone(),
        BrokerSettings::from(config),
    )
    .with_projected(projected)
    .with_cache(CredentialCache::new(
        config.credential_cache_entries,
        clock.clone(),
    ));
    let broker = match &prometheus {
        Some(p) => broker.with_observer(p.clone()),
        None => broker,
    };
    let metrics = if config.emf_metrics {
        Metrics::stdout()
    } else {
        Metrics::off()
    };
    let webhook = Webhook::new(
        cluster.clone(),
        aws.allowances,
        aws.tokens.clone(),
        clock.clone(),
        WebhookSettings::from(config),
    );
    let cleanup = Cleanup::new(cluster, aws.tokens, clock, config.sweep_grace);
    App {
        state: AppState {
            broker: Arc::new(broker),
            webhook: Arc::new(webhook),
            metrics: match prometheus {
                Some(p) => metrics.with_prometheus(p),
                None => metrics,
            },
        },
        cleanup: Arc::new(cleanup),
    }
}

/// How the broker verifies projected tokens and keeps its registry snapshot fresh.
pub fn projected_settings(config: &Config) -> ProjectedSettings {
    ProjectedSettings {
        audience: config.projected_audience.clone(),
        leeway: PROJECTED_TOKEN_LEEWAY,
        max_lifetime: config.projected_max_token_lifetime,
        registry_ttl: config.cluster_registry_ttl,
        refresh_interval: REGISTRY_REFRESH_INTERVAL.min(config.cluster_registry_ttl),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projected_settings_follow_the_configuration() {
        let mut config = Config::default();
        let settings = projected_settings(&config);
        assert_eq!(settings.registry_ttl, Duration::from_secs(60));
        assert_eq!(settings.refresh_interval, Duration::from_secs(1));
        assert_eq!(settings.audience, "iam-broker");
        assert_eq!(settings.leeway, Duration::from_secs(60));
        config.cluster_registry_ttl = Duration::from_secs(1);
        config.projected_audience = "sts.example".to_owned();
        let settings = projected_settings(&config);
        assert_eq!(settings.registry_ttl, Duration::from_secs(1));
        assert_eq!(settings.audience, "sts.example");
    }
}
