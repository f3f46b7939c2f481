//! The `MutatingWebhookConfiguration` that registers the webhook (`iam-broker render-webhook`),
//! built from k8s-openapi's typed objects and serialized, so no value needs escaping by hand.

use std::collections::BTreeMap;

use iam_broker_kernel::config::IdentityMode;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations,
    WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};

use crate::patch::{LABEL_INJECTED, LABEL_INJECTED_VALUE};

/// The `timeoutSeconds` `render-webhook` writes: longer than the webhook's worst case
/// (`webhook::FORWARD_BUDGET` + `UNDO_BUDGET` + `events::EVENT_BUDGET` = 8 s), so the API
/// server hears every answer, the undo's included.
pub const DEFAULT_TIMEOUT_SECONDS: u8 = 10;
/// Namespaces the webhook never mutates by default: its own and the control plane's.
pub const DEFAULT_EXCLUDED_NAMESPACES: &[&str] = &[
    "iam-broker",
    "kube-system",
    "kube-public",
    "kube-node-lease",
];

/// What the API server does when the webhook cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WebhookFailurePolicy {
    /// Admit the pod unmodified (it starts without AWS credentials).
    #[default]
    Ignore,
    /// Reject the pod.
    Fail,
}

impl WebhookFailurePolicy {
    fn as_str(self) -> &'static str {
        match self {
            Self::Ignore => "Ignore",
            Self::Fail => "Fail",
        }
    }
}

/// Namespace prefixes of the control plane (Kubernetes `kube-*`, OpenShift `openshift-*`) that the
/// registration leaves out with a `matchConditions` expression, since a selector cannot match
/// prefixes.
pub const SYSTEM_NAMESPACE_PREFIXES: &[&str] = &["kube-", "openshift-"];

/// Shortest secret path segment accepted in a webhook URL (README, "Security": ≥ 32 URL-safe characters).
pub const MIN_PATH_SECRET_LEN: usize = 32;

/// Which namespaces the webhook sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceScope {
    /// Namespaces never mutated, by name.
    pub excluded: Vec<String>,
    /// Opt-in mode: only namespaces carrying this label (`key`, `value`) are intercepted.
    pub opt_in_label: Option<(String, String)>,
    /// Leave out [`SYSTEM_NAMESPACE_PREFIXES`] with `matchConditions` (Kubernetes ≥ 1.28,
    /// OpenShift ≥ 4.15); off for older API servers, which reject the field.
    pub skip_system_prefixes: bool,
}

impl Default for NamespaceScope {
    fn default() -> Self {
        Self {
            excluded: DEFAULT_EXCLUDED_NAMESPACES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            opt_in_label: None,
            skip_system_prefixes: true,
        }
    }
}

/// The `matchConditions` expression that leaves out [`SYSTEM_NAMESPACE_PREFIXES`] (what
/// [`render_webhook`] writes, and what `iam-broker explain` recognises and evaluates).
pub fn system_namespace_condition() -> String {
    SYSTEM_NAMESPACE_PREFIXES
        .iter()
        .map(|p| format!("!request.namespace.startsWith('{p}')"))
        .collect::<Vec<_>>()
        .join(" && ")
}

/// Options of [`render_webhook`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookManifest {
    /// Object and webhook name prefix.
    pub name: String,
    /// The webhook's URL, secret path segment included (`https://…/Prod/mutate/<secret>`).
    pub url: String,
    /// PEM of the CA that signed the webhook's certificate (in-cluster `serve --tls-*`); `None`
    /// for API Gateway (publicly trusted).
    pub ca_bundle_pem: Option<String>,
    /// `failurePolicy`.
    pub failure_policy: WebhookFailurePolicy,
    /// `timeoutSeconds` (1..=30); [`DEFAULT_TIMEOUT_SECONDS`] unless told otherwise.
    pub timeout_seconds: u8,
    /// Which namespaces are intercepted.
    pub namespaces: NamespaceScope,
    /// The webhook's identity mode: `projected` registers CREATE only, with `sideEffects: None`.
    pub identity: IdentityMode,
}

/// Why a manifest cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ManifestError(pub String);

fn plain(what: &str, value: &str) -> Result<(), ManifestError> {
    let ok = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '\'' | '\\' | '#' | '`'));
    if ok {
        Ok(())
    } else {
        Err(ManifestError(format!(
            "{what} {value:?} must be non-empty printable ASCII without quotes, backslashes or #"
        )))
    }
}

/// Checks a webhook URL the way the routes will treat it: `https://`, and when it goes through
/// the secret path (`…/mutate/<secret>`, always the case behind API Gateway) the secret segment
/// is there, at least [`MIN_PATH_SECRET_LEN`] URL-safe characters, and last. A URL that fails
/// here would be registered and then answer 404 or 403 on every pod, hidden by
/// `failurePolicy: Ignore`.
pub fn check_webhook_url(url: &str) -> Result<(), ManifestError> {
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(ManifestError(format!(
            "the webhook URL must be https:// (the API server requires TLS), got {url:?}"
        )));
    };
    plain("URL", url)?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let secret = match path.split_once("mutate/") {
        Some((before, secret)) if before.is_empty() || before.ends_with('/') => Some(secret),
        _ => None,
    };
    match secret {
        Some(secret) => {
            let url_safe = secret
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if secret.is_empty() {
                Err(ManifestError(format!(
                    "the webhook URL {url:?} ends in /mutate/ without its secret path segment: \
                     append the stack's WebhookPathSecret (or use --stack with WEBHOOK_PATH_SECRET set)"
                )))
            } else if !url_safe {
                Err(ManifestError(
                    "the webhook URL's secret path segment must be the last segment and only \
                     A-Z, a-z, 0-9, - and _"
                        .to_owned(),
                ))
            } else if secret.len() < MIN_PATH_SECRET_LEN {
                Err(ManifestError(format!(
                    "the webhook URL's secret path segment has {} characters; the webhook needs \
                     at least {MIN_PATH_SECRET_LEN} (WebhookPathSecret)",
                    secret.len()
                )))
            } else {
                Ok(())
            }
        }
        None if host.contains(".execute-api.") => Err(ManifestError(format!(
            "API Gateway routes the webhook only at …/mutate/<WebhookPathSecret>, got {url:?}"
        ))),
        None => Ok(()),
    }
}

/// Renders the `admissionregistration.k8s.io/v1` `MutatingWebhookConfiguration` with two
/// webhooks on one URL: Pod CREATE for every pod of the intercepted namespaces
/// (`reinvocationPolicy: IfNeeded`), and Pod DELETE only for pods labelled
/// [`crate::patch::LABEL_INJECTED`] (an `objectSelector`), so pods that never had
/// credentials cost no invocation when they go. Both: `sideEffects: NoneOnDryRun`,
/// `admissionReviewVersions: [v1, v1beta1]`.
///
/// In `projected` mode admission writes nothing: only the CREATE webhook, with
/// `sideEffects: None`. (A cluster moving from `secret` mode keeps its old registration's
/// DELETE webhook until the pods admitted in `secret` mode are gone.)
pub fn render_webhook(m: &WebhookManifest) -> Result<String, ManifestError> {
    check_webhook_url(&m.url)?;
    let name_ok = !m.name.is_empty()
        && m.name.len() <= 200
        && m.name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if !name_ok {
        return Err(ManifestError(format!(
            "name {:?} must be a DNS subdomain (a-z, 0-9, - and .)",
            m.name
        )));
    }
    if !(1..=30).contains(&m.timeout_seconds) {
        return Err(ManifestError(format!(
            "timeoutSeconds {} must be from 1 to 30",
            m.timeout_seconds
        )));
    }
    for ns in &m.namespaces.excluded {
        plain("excluded namespace", ns)?;
    }
    if let Some((key, value)) = &m.namespaces.opt_in_label {
        plain("namespace label key", key)?;
        plain("namespace label value", value)?;
    }
    if let Some(pem) = &m.ca_bundle_pem
        && !pem.contains("-----BEGIN CERTIFICATE-----")
    {
        return Err(ManifestError(
            "the CA bundle is not a PEM certificate".to_owned(),
        ));
    }
    let webhooks = if m.identity == IdentityMode::Projected {
        vec![webhook(m, "pods", "CREATE", "IfNeeded", "None")]
    } else {
        let mut cleanup = webhook(m, "cleanup", "DELETE", "Never", "NoneOnDryRun");
        cleanup.object_selector = Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                LABEL_INJECTED.to_owned(),
                LABEL_INJECTED_VALUE.to_owned(),
            )])),
            ..LabelSelector::default()
        });
        vec![
            webhook(m, "pods", "CREATE", "IfNeeded", "NoneOnDryRun"),
            cleanup,
        ]
    };
    let registration = MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(m.name.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/name".to_owned(),
                "iam-broker".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        webhooks: Some(webhooks),
    };
    let options =
        serde_saphyr::ser_options! { prefer_block_scalars: false, compact_list_indent: false };
    serde_saphyr::to_string_with_options(&registration, options)
        .map_err(|e| ManifestError(format!("the registration does not serialize: {e}")))
}

fn webhook(
    m: &WebhookManifest,
    prefix: &str,
    operation: &str,
    reinvoke: &str,
    side_effects: &str,
) -> MutatingWebhook {
    let match_labels = m
        .namespaces
        .opt_in_label
        .as_ref()
        .map(|(key, value)| BTreeMap::from([(key.clone(), value.clone())]));
    let match_expressions = (!m.namespaces.excluded.is_empty()).then(|| {
        vec![LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".to_owned(),
            operator: "NotIn".to_owned(),
            values: Some(m.namespaces.excluded.clone()),
        }]
    });
    let match_conditions = m.namespaces.skip_system_prefixes.then(|| {
        vec![MatchCondition {
            name: "not-a-system-namespace".to_owned(),
            expression: system_namespace_condition(),
        }]
    });
    MutatingWebhook {
        name: format!("{prefix}.{}.iam-broker.io", m.name),
        admission_review_versions: vec!["v1".to_owned(), "v1beta1".to_owned()],
        side_effects: side_effects.to_owned(),
        failure_policy: Some(m.failure_policy.as_str().to_owned()),
        timeout_seconds: Some(i32::from(m.timeout_seconds)),
        reinvocation_policy: Some(reinvoke.to_owned()),
        match_policy: Some("Equivalent".to_owned()),
        client_config: WebhookClientConfig {
            url: Some(m.url.clone()),
            ca_bundle: m
                .ca_bundle_pem
                .as_ref()
                .map(|pem| ByteString(pem.as_bytes().to_vec())),
            service: None,
        },
        rules: Some(vec![RuleWithOperations {
            operations: Some(vec![operation.to_owned()]),
            api_groups: Some(vec![String::new()]),
            api_versions: Some(vec!["v1".to_owned()]),
            resources: Some(vec!["pods".to_owned()]),
            scope: Some("Namespaced".to_owned()),
        }]),
        namespace_selector: Some(LabelSelector {
            match_labels,
            match_expressions,
        }),
        object_selector: None,
        match_conditions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "https://abc.execute-api.us-east-1.amazonaws.com/Prod/mutate/0123456789abcdefghijABCDEFGHIJ-_xy";

    fn manifest() -> WebhookManifest {
        WebhookManifest {
            name: "iam-broker".into(),
            url: URL.into(),
            ca_bundle_pem: None,
            identity: iam_broker_kernel::config::IdentityMode::Secret,
            failure_policy: WebhookFailurePolicy::Ignore,
            timeout_seconds: 10,
            namespaces: NamespaceScope::default(),
        }
    }

    fn parse(y: &str) -> serde_json::Value {
        serde_saphyr::from_str(y).unwrap()
    }

    #[test]
    fn renders_the_registration() {
        let y = render_webhook(&manifest()).unwrap();
        let doc = parse(&y);
        assert_eq!(doc["kind"], "MutatingWebhookConfiguration");
        let hooks = doc["webhooks"].as_array().unwrap();
        assert_eq!(hooks.len(), 2);
        for hook in hooks {
            assert_eq!(hook["sideEffects"], "NoneOnDryRun");
            assert_eq!(
                hook["admissionReviewVersions"],
                serde_json::json!(["v1", "v1beta1"])
            );
            assert_eq!(hook["failurePolicy"], "Ignore");
            assert_eq!(hook["timeoutSeconds"], 10);
            assert_eq!(hook["clientConfig"]["url"], URL);
            assert!(hook["clientConfig"].get("caBundle").is_none());
            assert_eq!(
                hook["namespaceSelector"]["matchExpressions"][0]["values"],
                serde_json::json!([
                    "iam-broker",
                    "kube-system",
                    "kube-public",
                    "kube-node-lease"
                ])
            );
            let condition = hook["matchConditions"][0]["expression"].as_str().unwrap();
            assert!(condition.contains("!request.namespace.startsWith('openshift-')"));
            assert!(condition.contains("!request.namespace.startsWith('kube-')"));
        }
        // CREATE for every pod, re-invoked when another webhook changes it
        assert_eq!(
            hooks[0]["rules"][0]["operations"],
            serde_json::json!(["CREATE"])
        );
        assert_eq!(hooks[0]["reinvocationPolicy"], "IfNeeded");
        assert!(hooks[0].get("objectSelector").is_none());
        // DELETE only for pods the webhook injected
        assert_eq!(
            hooks[1]["rules"][0]["operations"],
            serde_json::json!(["DELETE"])
        );
        assert_eq!(
            hooks[1]["objectSelector"]["matchLabels"][crate::patch::LABEL_INJECTED],
            "true"
        );
    }

    #[test]
    fn opt_in_mode_selects_labelled_namespaces_and_old_clusters_get_no_match_conditions() {
        let mut m = manifest();
        m.namespaces.opt_in_label = Some(("iam-broker.io/inject".into(), "enabled".into()));
        m.namespaces.skip_system_prefixes = false;
        let doc = parse(&render_webhook(&m).unwrap());
        for hook in doc["webhooks"].as_array().unwrap() {
            assert_eq!(
                hook["namespaceSelector"]["matchLabels"]["iam-broker.io/inject"],
                "enabled"
            );
            assert!(hook.get("matchConditions").is_none());
        }
    }

    #[test]
    fn refuses_what_the_api_server_would() {
        let mut m = manifest();
        m.url = "http://plain/".into();
        assert!(render_webhook(&m).unwrap_err().0.contains("https"));
        let mut m = manifest();
        m.timeout_seconds = 31;
        assert!(render_webhook(&m).is_err());
        let mut m = manifest();
        m.name = "Bad Name".into();
        assert!(render_webhook(&m).is_err());
        let mut m = manifest();
        m.url = "https://x/\"; rm -rf".into();
        assert!(render_webhook(&m).is_err());
        let mut m = manifest();
        m.ca_bundle_pem = Some("not a pem".into());
        assert!(render_webhook(&m).is_err());
    }

    #[test]
    fn a_webhook_url_without_its_secret_is_refused() {
        let base = "https://abc.execute-api.us-east-1.amazonaws.com/Prod/mutate/";
        // the README's old trap: an unset $SECRET
        assert!(
            check_webhook_url(base)
                .unwrap_err()
                .0
                .contains("without its secret")
        );
        let short = format!("{base}{}", "a".repeat(MIN_PATH_SECRET_LEN - 1));
        assert!(
            check_webhook_url(&short)
                .unwrap_err()
                .0
                .contains("at least 32")
        );
        let long_enough = format!("{base}{}", "a".repeat(MIN_PATH_SECRET_LEN));
        assert_eq!(check_webhook_url(&long_enough), Ok(()));
        let not_last = format!("{base}{}/more", "a".repeat(MIN_PATH_SECRET_LEN));
        assert!(check_webhook_url(&not_last).is_err());
        // API Gateway has no route without the secret
        assert!(
            check_webhook_url("https://abc.execute-api.us-east-1.amazonaws.com/Prod/mutate")
                .is_err()
        );
        assert!(
            check_webhook_url("https://abc.execute-api.us-east-1.amazonaws.com/Prod/").is_err()
        );
        // in-cluster mode serves POST /mutate without a secret
        assert_eq!(
            check_webhook_url("https://iam-broker.iam-broker.svc/mutate"),
            Ok(())
        );
        assert_eq!(
            check_webhook_url("https://iam-broker.iam-broker.svc:8443/"),
            Ok(())
        );
    }

    #[test]
    fn projected_mode_registers_create_only_without_side_effects() {
        let yaml = render_webhook(&WebhookManifest {
            identity: iam_broker_kernel::config::IdentityMode::Projected,
            ..manifest()
        })
        .unwrap();
        let doc = parse(&yaml);
        let hooks = doc["webhooks"].as_array().unwrap();
        assert_eq!(hooks.len(), 1, "one webhook: {yaml}");
        assert_eq!(hooks[0]["sideEffects"], "None");
        assert_eq!(
            hooks[0]["rules"][0]["operations"],
            serde_json::json!(["CREATE"])
        );
    }
}
