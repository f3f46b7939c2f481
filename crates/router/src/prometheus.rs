//! Prometheus metrics of `iam-broker serve` (in-cluster mode), exposed in the OpenMetrics text
//! format by the Prometheus project's own crate on a listener of their own
//! (`serve --metrics-listen`), never on the broker's port.
//!
//! Names follow the Prometheus conventions (base units, `_total` counters, `_seconds`):
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `iam_broker_requests_total` | counter | `route` (`credentials`, `admission`), `outcome` (`served`, an error `Code`, or the admission decision) |
//! | `iam_broker_request_duration_seconds` | histogram | `route` |
//! | `iam_broker_stage_duration_seconds` | histogram | `stage` (`token_verification`, `dynamodb`, `sts`) |
//! | `iam_broker_sts_errors_total` | counter | `code` (STS's error code, `Throttling` among them, or `Unreachable`) |
//! | `iam_broker_credential_cache_lookups_total` | counter | `result` (`hit`, `miss`) |
//! | `iam_broker_credential_cache_entries` | gauge | |
//! | `iam_broker_registry_reads_total` | counter | `result` (`ok`, `error`) |
//! | `iam_broker_registry_snapshot_age_seconds` | gauge | (absent before the first read) |
//! | `iam_broker_registry_clusters` | gauge | |

use std::sync::Mutex;
use std::time::Duration;

use iam_broker_broker::Broker;
use iam_broker_kernel::ports::{Stage, StageObserver};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// The content type of [`Prometheus::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Latency buckets: 1 ms to about 16 s, doubling (STS and DynamoDB answer in tens of ms; the
/// webhook's budget is 8 s).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// The metrics of one process. Requests are counted as they are answered; the gauges and the
/// registry's counters are read from the broker at each scrape.
pub struct Prometheus {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    stage_duration: Family<StageLabels, Histogram, fn() -> Histogram>,
    sts_errors: Family<CodeLabels, Counter>,
    cache_lookups: Family<ResultLabels, Counter>,
    cache_entries: Gauge,
    registry_reads: Family<ResultLabels, Counter>,
    registry_snapshot_age: Gauge,
    registry_clusters: Gauge,
    /// What the registry counters last showed (they are read, not counted, here).
    registry_seen: Mutex<(u64, u64)>,
}

impl std::fmt::Debug for Prometheus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prometheus").finish_non_exhaustive()
    }
}

impl Default for Prometheus {
    fn default() -> Self {
        Self::new()
    }
}

impl Prometheus {
    /// Every metric, registered under the prefix `iam_broker`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("iam_broker");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route and outcome (served, the error Code, or the admission decision)",
            requests.clone(),
        );
        let request_duration: Family<RouteLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "request_duration",
            "Time to answer a request, by route",
            Unit::Seconds,
            request_duration.clone(),
        );
        let stage_duration: Family<StageLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "stage_duration",
            "Time of each stage of serving credentials: token verification, DynamoDB, STS",
            Unit::Seconds,
            stage_duration.clone(),
        );
        let sts_errors = Family::<CodeLabels, Counter>::default();
        registry.register(
            "sts_errors",
            "sts:AssumeRole failures by STS error code (Throttling: slow down), or Unreachable",
            sts_errors.clone(),
        );
        let cache_lookups = Family::<ResultLabels, Counter>::default();
        registry.register(
            "credential_cache_lookups",
            "Credential cache lookups of served requests: hit (no AssumeRole) or miss",
            cache_lookups.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register(
            "credential_cache_entries",
            "Credentials held by the broker's cache",
            cache_entries.clone(),
        );
        let registry_reads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "registry_reads",
            "Reads of the cluster registry (Clusters table), by result",
            registry_reads.clone(),
        );
        let registry_snapshot_age = Gauge::default();
        registry.register_with_unit(
            "registry_snapshot_age",
            "Time since the cluster registry was last read successfully",
            Unit::Seconds,
            registry_snapshot_age.clone(),
        );
        let registry_clusters = Gauge::default();
        registry.register(
            "registry_clusters",
            "Registered clusters in the broker's registry snapshot",
            registry_clusters.clone(),
        );
        Self {
            registry,
            requests,
            request_duration,
            stage_duration,
            sts_errors,
            cache_lookups,
            cache_entries,
            registry_reads,
            registry_snapshot_age,
            registry_clusters,
            registry_seen: Mutex::new((0, 0)),
        }
    }

    /// One request answered on `route` with `outcome`, after `elapsed`.
    pub fn request(&self, route: &'static str, outcome: &str, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                outcome: outcome.to_owned(),
            })
            .inc();
        self.request_duration
            .get_or_create(&RouteLabels { route })
            .observe(elapsed.as_secs_f64());
    }

    /// A served request's cache lookup (`hit` or `miss`).
    pub fn cache_lookup(&self, result: &'static str) {
        self.cache_lookups
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// An STS failure with this code.
    pub fn sts_error(&self, code: &str) {
        self.sts_errors
            .get_or_create(&CodeLabels {
                code: code.to_owned(),
            })
            .inc();
    }

    /// The text exposition, after reading the gauges from `broker`.
    pub async fn encode(&self, broker: &Broker) -> Result<String, std::fmt::Error> {
        if let Some(cache) = broker.cache() {
            self.cache_entries
                .set(i64::try_from(cache.len()).unwrap_or(i64::MAX));
        }
        if let Some(identities) = broker.projected_identities() {
            let stats = identities.stats().await;
            {
                let mut seen = self
                    .registry_seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let (ok, failed) = *seen;
                self.registry_reads
                    .get_or_create(&ResultLabels { result: "ok" })
                    .inc_by(stats.reads_ok.saturating_sub(ok));
                self.registry_reads
                    .get_or_create(&ResultLabels { result: "error" })
                    .inc_by(stats.reads_failed.saturating_sub(failed));
                *seen = (stats.reads_ok.max(ok), stats.reads_failed.max(failed));
            }
            if let Some(age) = stats.snapshot_age_seconds {
                self.registry_snapshot_age.set(age);
            }
            self.registry_clusters
                .set(i64::try_from(stats.clusters).unwrap_or(i64::MAX));
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

impl StageObserver for Prometheus {
    fn observe(&self, stage: Stage, elapsed: Duration) {
        self.stage_duration
            .get_or_create(&StageLabels {
                stage: stage.as_str(),
            })
            .observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_units_and_labels_follow_the_conventions() {
        let p = Prometheus::new();
        p.request("credentials", "served", Duration::from_millis(3));
        p.sts_error("Throttling");
        p.cache_lookup("hit");
        p.observe(Stage::Sts, Duration::from_millis(20));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &p.registry).unwrap();
        for line in [
            "iam_broker_requests_total{route=\"credentials\",outcome=\"served\"} 1",
            "iam_broker_sts_errors_total{code=\"Throttling\"} 1",
            "iam_broker_credential_cache_lookups_total{result=\"hit\"} 1",
            "# UNIT iam_broker_stage_duration_seconds seconds",
            "iam_broker_stage_duration_seconds_count{stage=\"sts\"} 1",
            "iam_broker_request_duration_seconds_bucket{le=\"0.004\",route=\"credentials\"} 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
