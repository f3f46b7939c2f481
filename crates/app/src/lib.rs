//! Composition root: the one place where configuration meets the real adapters. The Lambda
//! binary and `iam-broker serve` both build their state here, so they cannot drift apart.
#![forbid(unsafe_code)]

use std::sync::Arc;

use iam_broker_aws::{DynamoAllowanceStore, DynamoTokenStore};
use iam_broker_core::cleanup::Cleanup;
use iam_broker_core::ports::Cluster;
use iam_broker_core::webhook::{Webhook, WebhookSettings};
use iam_broker_core::{Config, SystemClock};
use iam_broker_kube::{ClientSource, KubeCluster};
use iam_broker_router::AppState;
use iam_broker_router::metrics::Metrics;

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
    let sdk = iam_broker_aws::load_sdk_config(config.aws_call_timeout).await;
    build_with(config, &sdk)
}

/// [`build`] with a given AWS configuration (tests point it at moto).
pub fn build_with(config: &Config, sdk: &aws_config::SdkConfig) -> App {
    let dynamodb = aws_sdk_dynamodb::Client::new(sdk);
    let allowances = Arc::new(DynamoAllowanceStore::new(
        dynamodb.clone(),
        &config.allowances_table,
    ));
    let tokens = Arc::new(DynamoTokenStore::new(
        dynamodb,
        &config.authorizations_table,
    ));
    let source = match &config.kubeconfig_parameter {
        Some(parameter) => ClientSource::SsmParameter {
            sdk: Box::new(sdk.clone()),
            name: parameter.clone(),
        },
        None => ClientSource::Infer,
    };
    let cluster: Arc<dyn Cluster> = Arc::new(KubeCluster::new(source, config.aws_call_timeout));
    let clock = Arc::new(SystemClock);
    let webhook = Webhook::new(
        cluster.clone(),
        allowances,
        tokens.clone(),
        clock.clone(),
        WebhookSettings::from(config),
    );
    let cleanup = Cleanup::new(cluster, tokens, clock, config.sweep_grace);
    App {
        state: AppState {
            broker: Arc::new(iam_broker_aws::broker(config, sdk)),
            webhook: Arc::new(webhook),
            metrics: if config.emf_metrics {
                Metrics::stdout()
            } else {
                Metrics::off()
            },
        },
        cleanup: Arc::new(cleanup),
    }
}
