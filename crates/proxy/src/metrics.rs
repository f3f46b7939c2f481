//! Prometheus metrics of the sidecar, off unless `METRICS_ADDR` names a listener of their own
//! (the pod's IP, for Prometheus to scrape; never the credentials port). OpenMetrics text from
//! the Prometheus project's crate:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `iam_broker_proxy_requests_total` | counter | `source` (`cache`, `broker`, `broker-error`, `proxy`), `status` (HTTP) |
//! | `iam_broker_proxy_request_duration_seconds` | histogram | `source` |
//! | `iam_broker_proxy_cache_entries` | gauge | |
//! | `iam_broker_proxy_broker_calls_in_flight` | gauge | |

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::cache::CacheStats;

/// The content type of [`ProxyMetrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    source: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

/// 100 µs (a cache hit) to about 6.5 s (a slow broker), doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// The sidecar's metrics.
pub struct ProxyMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<SourceLabels, Histogram, fn() -> Histogram>,
    cache_entries: Gauge,
    in_flight: Gauge,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyMetrics {
    /// Every metric, under the prefix `iam_broker_proxy`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("iam_broker_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by where the answer came from and HTTP status",
            requests.clone(),
        );
        let duration: Family<SourceLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "request_duration",
            "Time to answer a request, by where the answer came from",
            Unit::Seconds,
            duration.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register(
            "cache_entries",
            "Tokens with cached credentials",
            cache_entries.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "broker_calls_in_flight",
            "Broker calls under way",
            in_flight.clone(),
        );
        Self {
            registry,
            requests,
            duration,
            cache_entries,
            in_flight,
        }
    }

    /// One request answered from `source` with `status` after `elapsed`.
    pub(crate) fn request(&self, source: &'static str, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels { source, status })
            .inc();
        self.duration
            .get_or_create(&SourceLabels { source })
            .observe(elapsed.as_secs_f64());
    }

    /// The exposition, with the cache's gauges as of now.
    pub(crate) fn encode(&self, stats: CacheStats) -> Result<String, std::fmt::Error> {
        self.cache_entries
            .set(i64::try_from(stats.entries).unwrap_or(i64::MAX));
        self.in_flight
            .set(i64::try_from(stats.in_flight).unwrap_or(i64::MAX));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}
