//! Configuration: typed, parsed once at start-up from a key/value source (the environment in the
//! binaries, a map in tests), with one clear message naming the bad variable.

use std::collections::HashMap;
use std::time::Duration;

use crate::env::{self, Vars};

/// `ALLOWANCES_TABLE`: the Allowances table.
pub const ENV_ALLOWANCES_TABLE: &str = "ALLOWANCES_TABLE";
/// `AUTHORIZATIONS_TABLE`: the Authorizations table.
pub const ENV_AUTHORIZATIONS_TABLE: &str = "AUTHORIZATIONS_TABLE";
/// `KUBECONFIG_PARAMETER`: SSM SecureString holding the webhook's kubeconfig.
pub const ENV_KUBECONFIG_PARAMETER: &str = "KUBECONFIG_PARAMETER";
/// `ROLE_ARN_ANNOTATION`: ServiceAccount annotation naming the role.
pub const ENV_ROLE_ARN_ANNOTATION: &str = "ROLE_ARN_ANNOTATION";
/// `PROXY_IMAGE`: the sidecar image.
pub const ENV_PROXY_IMAGE: &str = "PROXY_IMAGE";
/// `PROXY_PORT`: the sidecar's port on 127.0.0.1.
pub const ENV_PROXY_PORT: &str = "PROXY_PORT";
/// `BROKER_URL`: the URL the sidecar calls.
pub const ENV_BROKER_URL: &str = "BROKER_URL";
/// `CREDENTIAL_DURATION_SECONDS`: `DurationSeconds` of `sts:AssumeRole`.
pub const ENV_CREDENTIAL_DURATION_SECONDS: &str = "CREDENTIAL_DURATION_SECONDS";
/// `TOKEN_TTL_DAYS`: sliding lifetime of token records.
pub const ENV_TOKEN_TTL_DAYS: &str = "TOKEN_TTL_DAYS";
/// `AWS_CALL_TIMEOUT_MS`: deadline of each AWS call, retries included.
pub const ENV_AWS_CALL_TIMEOUT_MS: &str = "AWS_CALL_TIMEOUT_MS";
/// `STS_SESSION_TAGS`: pass namespace / ServiceAccount / pod as session tags (`true`/`false`).
pub const ENV_STS_SESSION_TAGS: &str = "STS_SESSION_TAGS";
/// What the webhook does when a dependency fails: `open` (admit without a patch) or `closed`.
pub const ENV_FAILURE_POLICY: &str = "FAILURE_POLICY";
/// How the sidecar is injected: `container` (default) or `native` (Kubernetes ≥ 1.29).
pub const ENV_SIDECAR_MODE: &str = "SIDECAR_MODE";
/// Whether to also mount the token as a file (`AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`).
pub const ENV_INJECT_TOKEN_FILE: &str = "INJECT_TOKEN_FILE";
/// `AWS_REGION` / `AWS_DEFAULT_REGION` to set in injected containers that lack them.
pub const ENV_POD_AWS_REGION: &str = "POD_AWS_REGION";
/// Secret path segment of the webhook (`POST /mutate/<secret>`); when set, `POST /` and
/// `POST /mutate` no longer reach the webhook.
pub const ENV_WEBHOOK_PATH_SECRET: &str = "WEBHOOK_PATH_SECRET";
/// PEM of a private CA the sidecar must trust for the broker (in-cluster broker).
pub const ENV_PROXY_BROKER_CA_PEM: &str = "PROXY_BROKER_CA_PEM";
/// Whether to write CloudWatch Embedded Metric Format lines on stdout.
pub const ENV_EMF_METRICS: &str = "EMF_METRICS";
/// How old a token record or Secret must be before the sweep judges it an orphan.
pub const ENV_SWEEP_GRACE_SECONDS: &str = "SWEEP_GRACE_SECONDS";
/// `CLUSTERS_TABLE`: the cluster registry (projected mode).
pub const ENV_CLUSTERS_TABLE: &str = "CLUSTERS_TABLE";
/// `CLUSTER_NAME`: the default cluster's name (Secret mode's cluster; its Allowances rows carry
/// no cluster prefix).
pub const ENV_CLUSTER_NAME: &str = "CLUSTER_NAME";
/// `WEBHOOK_CLUSTER_NAME`: the registered cluster whose pods this webhook admits; its
/// Allowances rows are the ones the webhook checks. Defaults to [`ENV_CLUSTER_NAME`].
pub const ENV_WEBHOOK_CLUSTER_NAME: &str = "WEBHOOK_CLUSTER_NAME";
/// `IDENTITY_MODE`: what the webhook injects, `secret` (default) or `projected`.
pub const ENV_IDENTITY_MODE: &str = "IDENTITY_MODE";
/// `PROJECTED_AUDIENCE`: the audience of projected tokens (webhook and broker).
pub const ENV_PROJECTED_AUDIENCE: &str = "PROJECTED_AUDIENCE";
/// `PROJECTED_TOKEN_EXPIRATION_SECONDS`: `expirationSeconds` of the injected token volume.
pub const ENV_PROJECTED_TOKEN_EXPIRATION_SECONDS: &str = "PROJECTED_TOKEN_EXPIRATION_SECONDS";
/// `PROJECTED_MAX_TOKEN_LIFETIME_SECONDS`: the longest lifetime (`exp - iat`) of a projected
/// token the broker accepts.
pub const ENV_PROJECTED_MAX_TOKEN_LIFETIME_SECONDS: &str = "PROJECTED_MAX_TOKEN_LIFETIME_SECONDS";
/// `CLUSTER_REGISTRY_TTL_SECONDS`: how long the broker uses a snapshot of the registry.
pub const ENV_CLUSTER_REGISTRY_TTL_SECONDS: &str = "CLUSTER_REGISTRY_TTL_SECONDS";
/// `STS_SOURCE_IDENTITY`: send `SourceIdentity` with `sts:AssumeRole` (`true`/`false`).
pub const ENV_STS_SOURCE_IDENTITY: &str = "STS_SOURCE_IDENTITY";
/// `INJECTION`: how injected pods reach the broker, `sidecar` (default) or `direct`.
pub const ENV_INJECTION: &str = "INJECTION";
/// `SERVICE_ACCOUNT_LOOKUP`: whether the webhook reads the pod's ServiceAccount (its role
/// annotation) from the cluster (`true`/`false`). `secret` mode always does; in `projected`
/// mode it defaults to whether `KUBECONFIG_PARAMETER` is set: without it the webhook never calls
/// the cluster and decides from the pod and the Allowances rows alone.
pub const ENV_SERVICE_ACCOUNT_LOOKUP: &str = "SERVICE_ACCOUNT_LOOKUP";
/// `CREDENTIAL_CACHE_MAX_ENTRIES`: how many pods' credentials one broker instance keeps for
/// reuse (`0`: no cache).
pub const ENV_CREDENTIAL_CACHE_MAX_ENTRIES: &str = "CREDENTIAL_CACHE_MAX_ENTRIES";
/// Shortest accepted [`ENV_WEBHOOK_PATH_SECRET`].
pub const WEBHOOK_PATH_SECRET_MIN_LEN: usize = 32;

pub use crate::env::ConfigError;

/// How the sidecar is added to the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SidecarMode {
    /// A regular container, appended to `spec.containers` (works on every Kubernetes version;
    /// init containers run before it starts, so they cannot reach it).
    #[default]
    Container,
    /// A native sidecar: the first init container, with `restartPolicy: Always` (Kubernetes ≥
    /// 1.29), so init containers get credentials too.
    Native,
}

/// How an injected pod's SDKs reach the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InjectionMode {
    /// Through the `iam-broker-proxy` sidecar on `http://127.0.0.1:<port>/`, which caches.
    #[default]
    Sidecar,
    /// Straight to the broker's https URL: no sidecar, no proxy image, nothing but two
    /// environment variables and the token. Needs an https broker URL, since SDKs fetch over
    /// plain http only from loopback and the ECS/EKS link-local addresses.
    Direct,
}

impl InjectionMode {
    /// The configuration and annotation value: `sidecar` or `direct`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sidecar => "sidecar",
            Self::Direct => "direct",
        }
    }

    /// Reads `sidecar` or `direct` (exactly; annotation values are case-sensitive).
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "sidecar" => Some(Self::Sidecar),
            "direct" => Some(Self::Direct),
            _ => None,
        }
    }
}

/// Default of [`ENV_CREDENTIAL_CACHE_MAX_ENTRIES`]: ten thousand pods' credentials, a few MiB
/// (BENCHMARKS.md, "Direct mode").
pub const DEFAULT_CREDENTIAL_CACHE_MAX_ENTRIES: u64 = 10_000;

/// Default of [`ENV_ALLOWANCES_TABLE`].
pub const DEFAULT_ALLOWANCES_TABLE: &str = "iam-broker-allowances";
/// Default of [`ENV_AUTHORIZATIONS_TABLE`].
pub const DEFAULT_AUTHORIZATIONS_TABLE: &str = "iam-broker-authorizations";
/// Default of [`ENV_ROLE_ARN_ANNOTATION`] (the EKS / IRSA annotation, so existing ServiceAccounts
/// work unchanged).
pub const DEFAULT_ROLE_ARN_ANNOTATION: &str = "eks.amazonaws.com/role-arn";
/// Default of [`ENV_PROXY_PORT`].
pub const DEFAULT_PROXY_PORT: u16 = 53080;
/// Default of [`ENV_CREDENTIAL_DURATION_SECONDS`]: role chaining's one-hour cap.
pub const DEFAULT_CREDENTIAL_DURATION_SECONDS: u64 = 3600;
/// Default of [`ENV_TOKEN_TTL_DAYS`].
pub const DEFAULT_TOKEN_TTL_DAYS: u64 = 14;
/// Default of [`ENV_AWS_CALL_TIMEOUT_MS`].
pub const DEFAULT_AWS_CALL_TIMEOUT_MS: u64 = 3000;
/// Default of [`ENV_SWEEP_GRACE_SECONDS`].
pub const DEFAULT_SWEEP_GRACE_SECONDS: u64 = 600;
/// Default of [`ENV_CLUSTERS_TABLE`].
pub const DEFAULT_CLUSTERS_TABLE: &str = "iam-broker-clusters";
/// Default of [`ENV_PROJECTED_AUDIENCE`].
pub const DEFAULT_PROJECTED_AUDIENCE: &str = "iam-broker";
/// Default of [`ENV_PROJECTED_TOKEN_EXPIRATION_SECONDS`] (kubelet refreshes the file at 80 %).
pub const DEFAULT_PROJECTED_TOKEN_EXPIRATION_SECONDS: u64 = 3600;
/// Default of [`ENV_PROJECTED_MAX_TOKEN_LIFETIME_SECONDS`]: the ceiling of
/// [`ENV_PROJECTED_TOKEN_EXPIRATION_SECONDS`], one day.
pub const DEFAULT_PROJECTED_MAX_TOKEN_LIFETIME_SECONDS: u64 = 86_400;
/// Default of [`ENV_CLUSTER_REGISTRY_TTL_SECONDS`]: a removed cluster or retired key stops
/// working within a minute.
pub const DEFAULT_CLUSTER_REGISTRY_TTL_SECONDS: u64 = 60;
/// Clock skew tolerated on a projected token's `exp`, `nbf` and `iat`.
pub const PROJECTED_TOKEN_LEEWAY: Duration = Duration::from_secs(60);

/// Which identity the webhook gives pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdentityMode {
    /// A minted `iamb_` token in a Secret, with a record in the Authorizations table.
    #[default]
    Secret,
    /// A projected ServiceAccount token the kubelet rotates; admission writes nothing.
    Projected,
}

/// Everything iam-broker reads from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Allowances table name.
    pub allowances_table: String,
    /// Authorizations table name.
    pub authorizations_table: String,
    /// SSM parameter with the webhook's kubeconfig, when set.
    pub kubeconfig_parameter: Option<String>,
    /// ServiceAccount annotation naming the role.
    pub role_arn_annotation: String,
    /// Sidecar image (required by the webhook only).
    pub proxy_image: Option<String>,
    /// Sidecar port on 127.0.0.1.
    pub proxy_port: u16,
    /// URL the sidecar calls; the request's own origin when unset.
    pub broker_url: Option<String>,
    /// `DurationSeconds` for `sts:AssumeRole` (900..=3600).
    pub credential_duration: Duration,
    /// Sliding lifetime of token records.
    pub token_ttl: Duration,
    /// Deadline of each AWS call.
    pub aws_call_timeout: Duration,
    /// Whether to send session tags with `sts:AssumeRole`.
    pub session_tags: bool,
    /// The webhook's answer when a dependency fails.
    pub failure_policy: FailurePolicy,
    /// Regular container or native sidecar.
    pub sidecar_mode: SidecarMode,
    /// Also mount the token as a file.
    pub inject_token_file: bool,
    /// Region to set in injected containers that lack one.
    pub pod_aws_region: Option<String>,
    /// Secret path segment of the webhook route.
    pub webhook_path_secret: Option<String>,
    /// Grace period of the sweep.
    pub sweep_grace: Duration,
    /// CloudWatch EMF metrics on stdout.
    pub emf_metrics: bool,
    /// Private CA (PEM) the sidecar trusts for the broker.
    pub proxy_broker_ca_pem: Option<String>,
    /// Cluster registry table name.
    pub clusters_table: String,
    /// The default cluster's name.
    pub cluster_name: Option<crate::cluster::ClusterName>,
    /// The cluster the webhook serves (`None`: the default cluster).
    pub webhook_cluster: Option<crate::cluster::ClusterName>,
    /// What the webhook injects.
    pub identity_mode: IdentityMode,
    /// Audience of projected tokens.
    pub projected_audience: String,
    /// `expirationSeconds` of the projected token volume.
    pub projected_token_expiration: Duration,
    /// The longest projected-token lifetime (`exp - iat`) the broker accepts.
    pub projected_max_token_lifetime: Duration,
    /// How long the broker uses a registry snapshot.
    pub cluster_registry_ttl: Duration,
    /// Whether to send `SourceIdentity`.
    pub source_identity: bool,
    /// How injected pods reach the broker (a pod annotation may override it).
    pub injection: InjectionMode,
    /// Entries of the broker's credential cache (`0`: none).
    pub credential_cache_entries: usize,
    /// Whether the webhook reads the pod's ServiceAccount from the cluster
    /// ([`ENV_SERVICE_ACCOUNT_LOOKUP`]).
    pub service_account_lookup: bool,
}

/// The webhook's answer when a dependency (Kubernetes, DynamoDB) fails or times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Admit the pod without credentials, log why and warn the client (the default: a broker
    /// outage never blocks deployments).
    #[default]
    Open,
    /// Deny the pod with a message (pods that need credentials never start without them).
    Closed,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            allowances_table: DEFAULT_ALLOWANCES_TABLE.to_owned(),
            authorizations_table: DEFAULT_AUTHORIZATIONS_TABLE.to_owned(),
            kubeconfig_parameter: None,
            role_arn_annotation: DEFAULT_ROLE_ARN_ANNOTATION.to_owned(),
            proxy_image: None,
            proxy_port: DEFAULT_PROXY_PORT,
            broker_url: None,
            credential_duration: Duration::from_secs(DEFAULT_CREDENTIAL_DURATION_SECONDS),
            token_ttl: days(DEFAULT_TOKEN_TTL_DAYS),
            aws_call_timeout: Duration::from_millis(DEFAULT_AWS_CALL_TIMEOUT_MS),
            session_tags: false,
            failure_policy: FailurePolicy::Open,
            sidecar_mode: SidecarMode::Container,
            inject_token_file: false,
            pod_aws_region: None,
            webhook_path_secret: None,
            sweep_grace: Duration::from_secs(DEFAULT_SWEEP_GRACE_SECONDS),
            emf_metrics: false,
            proxy_broker_ca_pem: None,
            clusters_table: DEFAULT_CLUSTERS_TABLE.to_owned(),
            cluster_name: None,
            webhook_cluster: None,
            identity_mode: IdentityMode::Secret,
            projected_audience: DEFAULT_PROJECTED_AUDIENCE.to_owned(),
            projected_token_expiration: Duration::from_secs(
                DEFAULT_PROJECTED_TOKEN_EXPIRATION_SECONDS,
            ),
            projected_max_token_lifetime: Duration::from_secs(
                DEFAULT_PROJECTED_MAX_TOKEN_LIFETIME_SECONDS,
            ),
            cluster_registry_ttl: Duration::from_secs(DEFAULT_CLUSTER_REGISTRY_TTL_SECONDS),
            source_identity: false,
            injection: InjectionMode::Sidecar,
            credential_cache_entries: 10_000,
            service_account_lookup: true,
        }
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(&env::process())
    }

    /// Reads a map (tests).
    pub fn from_map(map: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::from_vars(&env::map(map))
    }

    /// Reads any key/value source. Unset and empty variables take their defaults.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        Self::from_vars(&Vars::new(lookup))
    }

    fn from_vars(v: &Vars<impl Fn(&str) -> Option<String>>) -> Result<Self, ConfigError> {
        use env::{boolean, http_url, integer_in, one_of};
        let seconds = Duration::from_secs;
        let config = Self {
            allowances_table: v.parse_or(
                ENV_ALLOWANCES_TABLE,
                DEFAULT_ALLOWANCES_TABLE.to_owned(),
                table_name,
            )?,
            authorizations_table: v.parse_or(
                ENV_AUTHORIZATIONS_TABLE,
                DEFAULT_AUTHORIZATIONS_TABLE.to_owned(),
                table_name,
            )?,
            kubeconfig_parameter: v.text(ENV_KUBECONFIG_PARAMETER),
            role_arn_annotation: v
                .text(ENV_ROLE_ARN_ANNOTATION)
                .unwrap_or_else(|| DEFAULT_ROLE_ARN_ANNOTATION.to_owned()),
            proxy_image: v.text(ENV_PROXY_IMAGE),
            proxy_port: v.parse_or(ENV_PROXY_PORT, DEFAULT_PROXY_PORT, port)?,
            broker_url: v.parse(ENV_BROKER_URL, http_url)?,
            credential_duration: seconds(v.parse_or(
                ENV_CREDENTIAL_DURATION_SECONDS,
                DEFAULT_CREDENTIAL_DURATION_SECONDS,
                integer_in(900..=3600, "seconds; AWS caps role chaining at one hour"),
            )?),
            token_ttl: days(v.parse_or(
                ENV_TOKEN_TTL_DAYS,
                DEFAULT_TOKEN_TTL_DAYS,
                integer_in(1..=3650, "days"),
            )?),
            aws_call_timeout: Duration::from_millis(v.parse_or(
                ENV_AWS_CALL_TIMEOUT_MS,
                DEFAULT_AWS_CALL_TIMEOUT_MS,
                integer_in(50..=60_000, "milliseconds"),
            )?),
            session_tags: v.parse_or(ENV_STS_SESSION_TAGS, false, boolean)?,
            failure_policy: v.parse_or(
                ENV_FAILURE_POLICY,
                FailurePolicy::default(),
                one_of(&[
                    ("open", FailurePolicy::Open),
                    ("closed", FailurePolicy::Closed),
                ]),
            )?,
            sidecar_mode: v.parse_or(
                ENV_SIDECAR_MODE,
                SidecarMode::Container,
                one_of(&[
                    ("container", SidecarMode::Container),
                    ("native", SidecarMode::Native),
                ]),
            )?,
            inject_token_file: v.parse_or(ENV_INJECT_TOKEN_FILE, false, boolean)?,
            pod_aws_region: v.parse(ENV_POD_AWS_REGION, region)?,
            webhook_path_secret: v.parse(ENV_WEBHOOK_PATH_SECRET, path_secret)?,
            sweep_grace: seconds(v.parse_or(
                ENV_SWEEP_GRACE_SECONDS,
                DEFAULT_SWEEP_GRACE_SECONDS,
                integer_in(60..=86_400, "seconds"),
            )?),
            emf_metrics: v.parse_or(ENV_EMF_METRICS, false, boolean)?,
            proxy_broker_ca_pem: v.parse(ENV_PROXY_BROKER_CA_PEM, pem)?,
            clusters_table: v.parse_or(
                ENV_CLUSTERS_TABLE,
                DEFAULT_CLUSTERS_TABLE.to_owned(),
                table_name,
            )?,
            cluster_name: v.parse(ENV_CLUSTER_NAME, |value| {
                crate::cluster::ClusterName::parse(value).map_err(|e| e.to_string())
            })?,
            webhook_cluster: v.parse(ENV_WEBHOOK_CLUSTER_NAME, |value| {
                crate::cluster::ClusterName::parse(value).map_err(|e| e.to_string())
            })?,
            identity_mode: v.parse_or(
                ENV_IDENTITY_MODE,
                IdentityMode::Secret,
                one_of(&[
                    ("secret", IdentityMode::Secret),
                    ("projected", IdentityMode::Projected),
                ]),
            )?,
            projected_audience: v.parse_or(
                ENV_PROJECTED_AUDIENCE,
                DEFAULT_PROJECTED_AUDIENCE.to_owned(),
                audience,
            )?,
            projected_token_expiration: seconds(v.parse_or(
                ENV_PROJECTED_TOKEN_EXPIRATION_SECONDS,
                DEFAULT_PROJECTED_TOKEN_EXPIRATION_SECONDS,
                integer_in(
                    600..=86_400,
                    "seconds; Kubernetes' minimum is 600, kubelet refreshes at 80 %",
                ),
            )?),
            projected_max_token_lifetime: seconds(v.parse_or(
                ENV_PROJECTED_MAX_TOKEN_LIFETIME_SECONDS,
                DEFAULT_PROJECTED_MAX_TOKEN_LIFETIME_SECONDS,
                integer_in(
                    600..=2_592_000,
                    "seconds; at least Kubernetes' minimum token lifetime (600), at most 30 days",
                ),
            )?),
            cluster_registry_ttl: seconds(v.parse_or(
                ENV_CLUSTER_REGISTRY_TTL_SECONDS,
                DEFAULT_CLUSTER_REGISTRY_TTL_SECONDS,
                integer_in(1..=3600, "seconds"),
            )?),
            source_identity: v.parse_or(ENV_STS_SOURCE_IDENTITY, false, boolean)?,
            injection: v.parse_or(
                ENV_INJECTION,
                InjectionMode::Sidecar,
                one_of(&[
                    ("sidecar", InjectionMode::Sidecar),
                    ("direct", InjectionMode::Direct),
                ]),
            )?,
            credential_cache_entries: v
                .parse_or(
                    ENV_CREDENTIAL_CACHE_MAX_ENTRIES,
                    DEFAULT_CREDENTIAL_CACHE_MAX_ENTRIES,
                    integer_in(0..=1_000_000, "entries; 0 turns the cache off"),
                )?
                .try_into()
                .unwrap_or(usize::MAX),
            service_account_lookup: false,
        };
        let mut config = config;
        let lookup_default =
            config.identity_mode == IdentityMode::Secret || config.kubeconfig_parameter.is_some();
        config.service_account_lookup =
            v.parse_or(ENV_SERVICE_ACCOUNT_LOOKUP, lookup_default, boolean)?;
        if config.identity_mode == IdentityMode::Secret && !config.service_account_lookup {
            return Err(ConfigError {
                variable: ENV_SERVICE_ACCOUNT_LOOKUP,
                message: "secret mode reads the ServiceAccount's role annotation and writes \
                          Secrets in the cluster: it cannot be false there (IDENTITY_MODE=projected \
                          decides without the cluster)"
                    .to_owned(),
            });
        }
        if config.injection == InjectionMode::Direct
            && let Some(url) = config.broker_url.as_deref()
            && !url.starts_with("https://")
        {
            return Err(ConfigError {
                variable: ENV_INJECTION,
                message: format!(
                    "direct needs an https {ENV_BROKER_URL} (it is {url:?}): SDKs fetch container \
                     credentials over plain http only from loopback and the ECS/EKS link-local \
                     addresses. Set {ENV_BROKER_URL} to the broker's https URL (API Gateway's, \
                     or iam-broker serve --tls), or use {ENV_INJECTION}=sidecar"
                ),
            });
        }
        if config.projected_token_expiration > config.projected_max_token_lifetime {
            return Err(ConfigError {
                variable: ENV_PROJECTED_MAX_TOKEN_LIFETIME_SECONDS,
                message: format!(
                    "{} s is shorter than {ENV_PROJECTED_TOKEN_EXPIRATION_SECONDS} ({} s): the \
                     broker would refuse the tokens the webhook injects",
                    config.projected_max_token_lifetime.as_secs(),
                    config.projected_token_expiration.as_secs()
                ),
            });
        }
        Ok(config)
    }
}

fn days(n: u64) -> Duration {
    Duration::from_secs(n.saturating_mul(86_400))
}

fn port(value: &str) -> Result<u16, String> {
    value
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{value:?} is not a port number (1..=65535)"))
}

/// DynamoDB table names: 3..=255 of `[a-zA-Z0-9_.-]`.
fn table_name(value: &str) -> Result<String, String> {
    let ok = (3..=255).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "{value:?} is not a DynamoDB table name (3-255 of a-z A-Z 0-9 _ . -)"
        ))
    }
}

fn region(value: &str) -> Result<String, String> {
    if value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        Ok(value.to_owned())
    } else {
        Err(format!("{value:?} is not an AWS region name"))
    }
}

fn path_secret(value: &str) -> Result<String, String> {
    let ok = value.len() >= WEBHOOK_PATH_SECRET_MIN_LEN
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(value.to_owned())
    } else {
        // Never echo the value: it is a secret.
        Err(format!(
            "must be at least {WEBHOOK_PATH_SECRET_MIN_LEN} characters of A-Z, a-z, 0-9, - and _"
        ))
    }
}

/// A token audience: 1–256 printable ASCII characters without spaces.
fn audience(value: &str) -> Result<String, String> {
    let ok = (1..=256).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "{} is not an audience (1-256 printable characters, no spaces)",
            crate::text::quoted(value)
        ))
    }
}

fn pem(value: &str) -> Result<String, String> {
    if value.contains("-----BEGIN CERTIFICATE-----") {
        Ok(value.to_owned())
    } else {
        Err("holds no PEM certificate".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_map(&map)
    }

    #[test]
    fn defaults_follow_the_design() {
        let config = parse(&[]).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.allowances_table, "iam-broker-allowances");
        assert_eq!(config.authorizations_table, "iam-broker-authorizations");
        assert_eq!(config.role_arn_annotation, "eks.amazonaws.com/role-arn");
        assert_eq!(config.proxy_port, 53080);
        assert_eq!(config.credential_duration, Duration::from_secs(3600));
        assert_eq!(config.token_ttl, Duration::from_secs(14 * 86_400));
    }

    #[test]
    fn values_are_read() {
        let config = parse(&[
            ("ALLOWANCES_TABLE", "a-table"),
            ("AUTHORIZATIONS_TABLE", "b.table"),
            ("CREDENTIAL_DURATION_SECONDS", "900"),
            ("TOKEN_TTL_DAYS", "1"),
            ("PROXY_PORT", "8080"),
            ("BROKER_URL", "https://x.example/Prod"),
            ("STS_SESSION_TAGS", "true"),
            ("KUBECONFIG_PARAMETER", " "),
            ("FAILURE_POLICY", "closed"),
            ("SIDECAR_MODE", "native"),
            ("INJECT_TOKEN_FILE", "true"),
            ("POD_AWS_REGION", "eu-west-1"),
            (
                "WEBHOOK_PATH_SECRET",
                "abcdefghijklmnopqrstuvwxyz-_0123456789",
            ),
        ])
        .unwrap();
        assert_eq!(
            config.webhook_path_secret.as_deref(),
            Some("abcdefghijklmnopqrstuvwxyz-_0123456789")
        );
        assert_eq!(config.failure_policy, FailurePolicy::Closed);
        assert_eq!(config.sidecar_mode, SidecarMode::Native);
        assert!(config.inject_token_file);
        assert_eq!(config.pod_aws_region.as_deref(), Some("eu-west-1"));
        assert_eq!(config.allowances_table, "a-table");
        assert_eq!(config.authorizations_table, "b.table");
        assert_eq!(config.credential_duration, Duration::from_secs(900));
        assert_eq!(config.token_ttl, Duration::from_secs(86_400));
        assert_eq!(config.proxy_port, 8080);
        assert_eq!(config.broker_url.as_deref(), Some("https://x.example/Prod"));
        assert!(config.session_tags);
        assert_eq!(config.kubeconfig_parameter, None, "blank means unset");
    }

    #[test]
    fn projected_mode_settings_are_read() {
        let config = parse(&[
            ("IDENTITY_MODE", "projected"),
            ("CLUSTER_NAME", "east"),
            ("CLUSTERS_TABLE", "my-clusters"),
            ("PROJECTED_AUDIENCE", "sts.example"),
            ("PROJECTED_TOKEN_EXPIRATION_SECONDS", "7200"),
            ("CLUSTER_REGISTRY_TTL_SECONDS", "5"),
            ("STS_SOURCE_IDENTITY", "true"),
        ])
        .unwrap();
        assert_eq!(config.identity_mode, IdentityMode::Projected);
        assert_eq!(
            config.cluster_name.as_ref().map(|c| c.as_str()),
            Some("east")
        );
        assert_eq!(config.clusters_table, "my-clusters");
        assert_eq!(config.projected_audience, "sts.example");
        assert_eq!(config.projected_token_expiration, Duration::from_secs(7200));
        assert_eq!(
            config.projected_max_token_lifetime,
            Duration::from_secs(86_400),
            "the default maximum is the ceiling of the expiration"
        );
        assert_eq!(config.cluster_registry_ttl, Duration::from_secs(5));
        assert!(config.source_identity);
        let defaults = Config::default();
        assert_eq!(defaults.identity_mode, IdentityMode::Secret);
        assert_eq!(defaults.projected_audience, "iam-broker");
        assert_eq!(
            defaults.projected_token_expiration,
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn the_maximum_lifetime_is_never_below_the_injected_expiration() {
        let err = parse(&[
            ("PROJECTED_TOKEN_EXPIRATION_SECONDS", "7200"),
            ("PROJECTED_MAX_TOKEN_LIFETIME_SECONDS", "3600"),
        ])
        .unwrap_err();
        assert_eq!(err.variable, "PROJECTED_MAX_TOKEN_LIFETIME_SECONDS");
        assert!(err.to_string().contains("would refuse"), "{err}");
        let config = parse(&[("PROJECTED_MAX_TOKEN_LIFETIME_SECONDS", "3600")]).unwrap();
        assert_eq!(
            config.projected_max_token_lifetime,
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (name, value) in [
            ("CREDENTIAL_DURATION_SECONDS", "3601"),
            ("CREDENTIAL_DURATION_SECONDS", "899"),
            ("CREDENTIAL_DURATION_SECONDS", "1h"),
            ("TOKEN_TTL_DAYS", "0"),
            ("PROXY_PORT", "0"),
            ("PROXY_PORT", "70000"),
            ("BROKER_URL", "ftp://x"),
            ("ALLOWANCES_TABLE", "a b"),
            ("AUTHORIZATIONS_TABLE", "ab"),
            ("STS_SESSION_TAGS", "yes"),
            ("AWS_CALL_TIMEOUT_MS", "10"),
            ("FAILURE_POLICY", "ignore"),
            ("SIDECAR_MODE", "sidecar"),
            ("INJECT_TOKEN_FILE", "1"),
            ("POD_AWS_REGION", "EU West"),
            ("WEBHOOK_PATH_SECRET", "short"),
            ("SWEEP_GRACE_SECONDS", "5"),
            ("EMF_METRICS", "on"),
            ("PROXY_BROKER_CA_PEM", "not pem"),
            ("CLUSTERS_TABLE", "x"),
            ("CLUSTER_NAME", "East_1"),
            ("WEBHOOK_CLUSTER_NAME", "-west"),
            ("IDENTITY_MODE", "oidc"),
            ("PROJECTED_AUDIENCE", "has space"),
            ("PROJECTED_TOKEN_EXPIRATION_SECONDS", "599"),
            ("PROJECTED_TOKEN_EXPIRATION_SECONDS", "86401"),
            ("PROJECTED_MAX_TOKEN_LIFETIME_SECONDS", "599"),
            ("PROJECTED_MAX_TOKEN_LIFETIME_SECONDS", "2592001"),
            ("CLUSTER_REGISTRY_TTL_SECONDS", "0"),
            ("STS_SOURCE_IDENTITY", "maybe"),
            (
                "WEBHOOK_PATH_SECRET",
                "has/slash/has/slash/has/slash/has/slash/",
            ),
        ] {
            let err = parse(&[(name, value)]).unwrap_err();
            assert_eq!(err.variable, name);
            if name == "WEBHOOK_PATH_SECRET" {
                assert!(!err.to_string().contains(value), "a secret is never echoed");
            }
            assert!(
                err.to_string()
                    .starts_with(&format!("invalid configuration: {name}: "))
            );
        }
    }

    #[test]
    fn direct_injection_needs_an_https_broker_url_and_says_how_to_fix_it() {
        let direct = parse(&[
            ("INJECTION", "direct"),
            ("BROKER_URL", "https://x.example/Prod/"),
        ])
        .unwrap();
        assert_eq!(direct.injection, InjectionMode::Direct);
        // Unset, the request's own URL is used; the webhook checks it per admission.
        assert_eq!(
            parse(&[("INJECTION", "direct")]).unwrap().injection,
            InjectionMode::Direct
        );
        let err = parse(&[
            ("INJECTION", "direct"),
            ("BROKER_URL", "http://broker.iam-broker.svc:8080/"),
        ])
        .unwrap_err();
        assert_eq!(err.variable, "INJECTION");
        assert!(err.message.contains("https BROKER_URL"), "{}", err.message);
        assert!(err.message.contains("INJECTION=sidecar"), "{}", err.message);
        // The sidecar may call an http broker (in-cluster, through a Service).
        assert_eq!(
            parse(&[("BROKER_URL", "http://broker.iam-broker.svc:8080/")])
                .unwrap()
                .injection,
            InjectionMode::Sidecar
        );
        assert!(parse(&[("INJECTION", "Direct")]).is_err());
    }

    #[test]
    fn the_credential_cache_is_sized_by_entries_and_can_be_turned_off() {
        assert_eq!(parse(&[]).unwrap().credential_cache_entries, 10_000);
        let off = parse(&[("CREDENTIAL_CACHE_MAX_ENTRIES", "0")]).unwrap();
        assert_eq!(off.credential_cache_entries, 0);
        assert!(parse(&[("CREDENTIAL_CACHE_MAX_ENTRIES", "1000001")]).is_err());
    }
}
