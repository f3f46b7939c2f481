//! The sidecar's configuration: typed, parsed once at start-up from a key/value source (the
//! environment in the binary, a map in tests), with one clear message naming the bad variable.

use std::net::SocketAddr;
use std::time::Duration;

use http::Uri;
use iam_broker_kernel::env::{self, Vars};

/// `BROKER_URL`: the broker's credentials URL (`https://` or `http://`). Required.
pub const ENV_BROKER_URL: &str = "BROKER_URL";
/// `LISTEN_ADDR`: loopback address the sidecar listens on.
pub const ENV_LISTEN_ADDR: &str = "LISTEN_ADDR";
/// `MIN_VALIDITY_SECONDS`: the least validity left on any credential the sidecar serves; for
/// credentials that live less than three times as long, a third of their lifetime (never under
/// a minute; see `policy::Policy::window`).
pub const ENV_MIN_VALIDITY_SECONDS: &str = "MIN_VALIDITY_SECONDS";
/// `REFRESH_AHEAD_SECONDS`: how long before the min-validity point a background refresh starts.
pub const ENV_REFRESH_AHEAD_SECONDS: &str = "REFRESH_AHEAD_SECONDS";
/// `BROKER_TIMEOUT_MS`: deadline of one broker call, connection and body included.
pub const ENV_BROKER_TIMEOUT_MS: &str = "BROKER_TIMEOUT_MS";
/// `CACHE_MAX_ENTRIES`: how many tokens' credentials the cache holds at most.
pub const ENV_CACHE_MAX_ENTRIES: &str = "CACHE_MAX_ENTRIES";
/// `HEADER_READ_TIMEOUT_MS`: a connection whose request head is not complete in this time is
/// closed.
pub const ENV_HEADER_READ_TIMEOUT_MS: &str = "HEADER_READ_TIMEOUT_MS";
/// `MAX_CONNECTIONS`: connections served at once.
pub const ENV_MAX_CONNECTIONS: &str = "MAX_CONNECTIONS";

/// `METRICS_ADDR`: where to serve Prometheus metrics (`GET /metrics`), e.g. `0.0.0.0:9464`;
/// unset, no metrics are kept or served. Any address: Prometheus scrapes the pod's IP.
pub const ENV_METRICS_ADDR: &str = "METRICS_ADDR";

/// Extra CA certificates (PEM text) the broker's certificate may chain to, besides the public
/// webpki roots: for an in-cluster broker with a private CA.
pub const ENV_BROKER_CA_PEM: &str = "BROKER_CA_PEM";
/// Default of [`ENV_LISTEN_ADDR`] (README, "Configuration": `PROXY_PORT` 53080 on 127.0.0.1).
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:53080";
/// Default of [`ENV_MIN_VALIDITY_SECONDS`]: botocore refreshes 15 minutes ahead of expiry.
pub const DEFAULT_MIN_VALIDITY_SECONDS: u64 =
    iam_broker_kernel::credentials::SDK_MIN_VALIDITY.as_secs();
/// Default of [`ENV_REFRESH_AHEAD_SECONDS`].
pub const DEFAULT_REFRESH_AHEAD_SECONDS: u64 =
    iam_broker_kernel::credentials::DEFAULT_REFRESH_AHEAD.as_secs();
/// Default of [`ENV_BROKER_TIMEOUT_MS`].
pub const DEFAULT_BROKER_TIMEOUT_MS: u64 = 5000;
/// Default of [`ENV_CACHE_MAX_ENTRIES`]: a pod rarely holds more than one token.
pub const DEFAULT_CACHE_MAX_ENTRIES: u64 = 64;
/// Default of [`ENV_HEADER_READ_TIMEOUT_MS`] (the same as `iam-broker serve`).
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Default of [`ENV_MAX_CONNECTIONS`] (the same as `iam-broker serve`).
pub const DEFAULT_MAX_CONNECTIONS: u64 = 1024;

pub use iam_broker_kernel::env::ConfigError;

/// Everything the sidecar reads from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The broker URL every credential request is forwarded to, whatever path the caller used.
    pub broker_url: Uri,
    /// Where to listen; always a loopback address.
    pub listen_addr: SocketAddr,
    /// The least validity left on anything served.
    pub min_validity: Duration,
    /// How long before `min_validity` is reached a background refresh starts.
    pub refresh_ahead: Duration,
    /// Deadline of one broker call.
    pub broker_timeout: Duration,
    /// Most tokens cached at once.
    pub cache_max_entries: usize,
    /// Extra trusted CA certificates (DER) from [`ENV_BROKER_CA_PEM`].
    pub broker_ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// A connection whose request head is not complete in this time is closed.
    pub header_read_timeout: Duration,
    /// Connections served at once; at the limit new clients wait in the listen backlog.
    pub max_connections: usize,
    /// Where Prometheus metrics are served, when they are ([`ENV_METRICS_ADDR`]).
    pub metrics_addr: Option<SocketAddr>,
}

impl ProxyConfig {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(&env::process())
    }

    /// Reads any key/value source. Unset and empty variables take their defaults.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::from_vars(&Vars::new(lookup))
    }

    fn from_vars(v: &Vars<impl Fn(&str) -> Option<String>>) -> Result<Self, ConfigError> {
        use env::integer_in;
        Ok(Self {
            broker_url: v
                .parse(ENV_BROKER_URL, broker_url)?
                .ok_or_else(|| ConfigError {
                    variable: ENV_BROKER_URL,
                    message: "required, e.g. https://broker.example.com/".to_owned(),
                })?,
            listen_addr: v.parse_or(
                ENV_LISTEN_ADDR,
                loopback(DEFAULT_LISTEN_ADDR).map_err(|message| ConfigError {
                    variable: ENV_LISTEN_ADDR,
                    message,
                })?,
                loopback,
            )?,
            min_validity: Duration::from_secs(v.parse_or(
                ENV_MIN_VALIDITY_SECONDS,
                DEFAULT_MIN_VALIDITY_SECONDS,
                integer_in(60..=3300, "seconds"),
            )?),
            refresh_ahead: Duration::from_secs(v.parse_or(
                ENV_REFRESH_AHEAD_SECONDS,
                DEFAULT_REFRESH_AHEAD_SECONDS,
                integer_in(0..=3300, "seconds"),
            )?),
            broker_timeout: Duration::from_millis(v.parse_or(
                ENV_BROKER_TIMEOUT_MS,
                DEFAULT_BROKER_TIMEOUT_MS,
                integer_in(50..=60_000, "milliseconds"),
            )?),
            cache_max_entries: usize::try_from(v.parse_or(
                ENV_CACHE_MAX_ENTRIES,
                DEFAULT_CACHE_MAX_ENTRIES,
                integer_in(1..=100_000, "entries"),
            )?)
            .unwrap_or(usize::MAX),
            broker_ca: v.parse_or(ENV_BROKER_CA_PEM, Vec::new(), broker_ca)?,
            header_read_timeout: Duration::from_millis(v.parse_or(
                ENV_HEADER_READ_TIMEOUT_MS,
                DEFAULT_HEADER_READ_TIMEOUT_MS,
                integer_in(100..=600_000, "milliseconds"),
            )?),
            max_connections: usize::try_from(v.parse_or(
                ENV_MAX_CONNECTIONS,
                DEFAULT_MAX_CONNECTIONS,
                integer_in(1..=65_536, "connections"),
            )?)
            .unwrap_or(usize::MAX),
            metrics_addr: v.parse(ENV_METRICS_ADDR, |value: &str| {
                value
                    .parse::<SocketAddr>()
                    .map_err(|_| format!("{value:?} is not an IP:port address"))
            })?,
        })
    }
}

/// `BROKER_CA_PEM`: one or more PEM certificates.
fn broker_ca(text: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject as _;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".to_owned());
    }
    Ok(certs)
}

/// `BROKER_URL` must be an absolute `http://` or `https://` URL with a host.
fn broker_url(value: &str) -> Result<Uri, String> {
    let uri: Uri = value
        .parse()
        .map_err(|e| format!("{value:?} is not a URL: {e}"))?;
    let scheme_ok = matches!(uri.scheme_str(), Some("https" | "http"));
    if !scheme_ok || uri.host().is_none_or(str::is_empty) {
        return Err(format!(
            "{value:?} is not an http:// or https:// URL with a host"
        ));
    }
    // The URL is logged at start-up; it must not carry a password.
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("must not contain user information (user:password@)".into());
    }
    Ok(uri)
}

/// `LISTEN_ADDR` must be a loopback socket address: the SDKs only accept plain-HTTP credential
/// URIs on loopback, and the answers carry credentials that must not leave the pod.
fn loopback(value: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = value
        .parse()
        .map_err(|_| format!("{value:?} is not an IP:port address"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{value:?} is not a loopback address; credentials must not leave the pod"
        ));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(pairs: &[(&str, &str)]) -> Result<ProxyConfig, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        ProxyConfig::from_lookup(|name| map.get(name).cloned())
    }

    const URL: (&str, &str) = (ENV_BROKER_URL, "https://broker.example.com/Prod/");

    #[test]
    fn defaults_apply_when_only_the_broker_url_is_set() {
        let config = parse(&[URL]).unwrap();
        assert_eq!(config.broker_url, "https://broker.example.com/Prod/");
        assert_eq!(config.listen_addr, "127.0.0.1:53080".parse().unwrap());
        assert_eq!(config.min_validity, Duration::from_secs(900));
        assert_eq!(config.refresh_ahead, Duration::from_secs(300));
        assert_eq!(config.broker_timeout, Duration::from_millis(5000));
        assert_eq!(config.cache_max_entries, 64);
        assert_eq!(config.header_read_timeout, Duration::from_secs(10));
        assert_eq!(config.max_connections, 1024);
    }

    #[test]
    fn empty_values_take_defaults_and_set_values_are_used() {
        let config = parse(&[
            (ENV_BROKER_URL, " http://127.0.0.1:8080/ "),
            (ENV_LISTEN_ADDR, "[::1]:9000"),
            (ENV_MIN_VALIDITY_SECONDS, "600"),
            (ENV_REFRESH_AHEAD_SECONDS, ""),
            (ENV_BROKER_TIMEOUT_MS, "250"),
            (ENV_CACHE_MAX_ENTRIES, "2"),
            (ENV_HEADER_READ_TIMEOUT_MS, "1000"),
            (ENV_MAX_CONNECTIONS, "8"),
        ])
        .unwrap();
        assert_eq!(config.broker_url, "http://127.0.0.1:8080/");
        assert_eq!(config.listen_addr, "[::1]:9000".parse().unwrap());
        assert_eq!(config.min_validity, Duration::from_secs(600));
        assert_eq!(config.refresh_ahead, Duration::from_secs(300));
        assert_eq!(config.broker_timeout, Duration::from_millis(250));
        assert_eq!(config.cache_max_entries, 2);
        assert_eq!(config.header_read_timeout, Duration::from_secs(1));
        assert_eq!(config.max_connections, 8);
    }

    #[test]
    fn a_missing_broker_url_is_named() {
        let error = parse(&[]).unwrap_err();
        assert_eq!(error.variable, ENV_BROKER_URL);
        assert!(
            error
                .to_string()
                .starts_with("invalid configuration: BROKER_URL: "),
            "{error}"
        );
        assert_eq!(
            parse(&[(ENV_BROKER_URL, "  ")]).unwrap_err().variable,
            ENV_BROKER_URL
        );
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        let cases: &[(&str, &str)] = &[
            (ENV_BROKER_URL, "ftp://broker.example.com/"),
            (ENV_BROKER_URL, "broker.example.com"),
            (ENV_BROKER_URL, "https://"),
            (ENV_BROKER_URL, "not a url"),
            (ENV_BROKER_URL, "https://user:secret@broker.example.com/"),
            (ENV_LISTEN_ADDR, "localhost:53080"),
            (ENV_LISTEN_ADDR, "0.0.0.0:53080"),
            (ENV_LISTEN_ADDR, "127.0.0.1"),
            (ENV_MIN_VALIDITY_SECONDS, "fifteen"),
            (ENV_MIN_VALIDITY_SECONDS, "59"),
            (ENV_MIN_VALIDITY_SECONDS, "-900"),
            (ENV_REFRESH_AHEAD_SECONDS, "3301"),
            (ENV_REFRESH_AHEAD_SECONDS, "1.5"),
            (ENV_BROKER_TIMEOUT_MS, "0"),
            (ENV_BROKER_TIMEOUT_MS, "60001"),
            (ENV_CACHE_MAX_ENTRIES, "0"),
            (ENV_CACHE_MAX_ENTRIES, "many"),
            (ENV_HEADER_READ_TIMEOUT_MS, "99"),
            (ENV_MAX_CONNECTIONS, "0"),
            (ENV_BROKER_CA_PEM, "not a certificate"),
            (
                ENV_BROKER_CA_PEM,
                "-----BEGIN CERTIFICATE-----\n%%%\n-----END CERTIFICATE-----",
            ),
        ];
        for (variable, value) in cases {
            let mut pairs = vec![URL];
            pairs.retain(|(k, _)| k != variable);
            pairs.push((variable, value));
            let error = parse(&pairs).expect_err(value);
            assert_eq!(error.variable, *variable, "{value:?}: {error}");
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("invalid configuration: {variable}: ")),
                "{error}"
            );
        }
    }
}
