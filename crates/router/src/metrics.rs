//! CloudWatch metrics in Embedded Metric Format: one JSON object per line on stdout, which
//! CloudWatch Logs turns into metrics without any API call (no extra latency, no extra IAM).
//!
//! Namespace `iam-broker`; metrics `CredentialsServed` (dimension `Outcome`), `CredentialsDenied`
//! (dimension `Code`), `StsErrors` (dimension `AwsCode`: STS's error code, or `Unreachable`),
//! `CorruptTokenRecords` / `CorruptAllowanceRows` (dimension `Table`), `Admissions` (dimension
//! `Decision`), and the latencies `BrokerLatency` / `AdmissionLatency` (with each count).

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

/// CloudWatch namespace of every metric.
pub const NAMESPACE: &str = "iam-broker";

type Sink = Arc<dyn Fn(&str) + Send + Sync>;

/// Where metric lines go: nowhere (the default for `serve`), stdout (Lambda), or a test's sink;
/// and, with [`Metrics::with_prometheus`], Prometheus counters and histograms too.
#[derive(Clone, Default)]
pub struct Metrics {
    sink: Option<Sink>,
    prometheus: Option<Arc<crate::prometheus::Prometheus>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("enabled", &self.sink.is_some())
            .field("prometheus", &self.prometheus.is_some())
            .finish()
    }
}

impl Metrics {
    /// No metrics.
    pub fn off() -> Self {
        Self::default()
    }

    /// EMF lines on stdout (what CloudWatch Logs reads in Lambda).
    pub fn stdout() -> Self {
        Self::to(|line| println!("{line}"))
    }

    /// EMF lines to any sink.
    pub fn to(sink: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self {
            sink: Some(Arc::new(sink)),
            prometheus: None,
        }
    }

    /// These metrics, counted in `prometheus` as well.
    pub fn with_prometheus(mut self, prometheus: Arc<crate::prometheus::Prometheus>) -> Self {
        self.prometheus = Some(prometheus);
        self
    }

    /// The Prometheus metrics, when kept.
    pub fn prometheus(&self) -> Option<&crate::prometheus::Prometheus> {
        self.prometheus.as_deref()
    }

    /// One count (and the latency) under one dimension.
    pub fn record(
        &self,
        count_metric: &str,
        dimension: (&str, &str),
        latency_metric: &str,
        latency: Duration,
    ) {
        let Some(sink) = &self.sink else { return };
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let (dimension_name, dimension_value) = dimension;
        let mut line = json!({
            "_aws": {
                "Timestamp": timestamp,
                "CloudWatchMetrics": [{
                    "Namespace": NAMESPACE,
                    "Dimensions": [[dimension_name]],
                    "Metrics": [
                        { "Name": count_metric, "Unit": "Count" },
                        { "Name": latency_metric, "Unit": "Milliseconds" },
                    ],
                }],
            },
        });
        if let Some(object) = line.as_object_mut() {
            object.insert(dimension_name.to_owned(), json!(dimension_value));
            object.insert(count_metric.to_owned(), json!(1));
            object.insert(
                latency_metric.to_owned(),
                json!((latency.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0),
            );
        }
        sink(&line.to_string());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn writes_one_emf_object_per_record() {
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = lines.clone();
        let metrics = Metrics::to(move |l| seen.lock().unwrap().push(l.to_owned()));
        metrics.record(
            "CredentialsDenied",
            ("Code", "InvalidToken"),
            "BrokerLatency",
            Duration::from_micros(1500),
        );
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 1);
        let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        let directive = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "iam-broker");
        assert_eq!(directive["Dimensions"], json!([["Code"]]));
        assert_eq!(v["Code"], "InvalidToken");
        assert_eq!(v["CredentialsDenied"], 1);
        assert_eq!(v["BrokerLatency"], 1.5);
        assert!(v["_aws"]["Timestamp"].as_u64().unwrap() > 1_700_000_000_000);
        Metrics::off().record("X", ("D", "v"), "L", Duration::ZERO);
    }
}
