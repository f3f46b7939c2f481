//! Cluster-side documents iam-broker writes for its operators: the
//! `MutatingWebhookConfiguration` that registers the webhook, and the kubeconfig the webhook
//! uses. Pure text; the CLI prints or stores them.

use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

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
    /// `timeoutSeconds` (1..=30).
    pub timeout_seconds: u8,
    /// Namespaces never mutated.
    pub excluded_namespaces: Vec<String>,
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

/// Renders the `admissionregistration.k8s.io/v1` `MutatingWebhookConfiguration`: Pod CREATE and
/// DELETE, `sideEffects: NoneOnDryRun`, `admissionReviewVersions: [v1, v1beta1]`,
/// `reinvocationPolicy: IfNeeded`, and a namespace selector that leaves out the excluded
/// namespaces.
pub fn render_webhook(m: &WebhookManifest) -> Result<String, ManifestError> {
    if !m.url.starts_with("https://") {
        return Err(ManifestError(format!(
            "the webhook URL must be https:// (the API server requires TLS), got {:?}",
            m.url
        )));
    }
    plain("URL", &m.url)?;
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
    for ns in &m.excluded_namespaces {
        plain("excluded namespace", ns)?;
    }
    let mut y = String::new();
    let _ = writeln!(y, "apiVersion: admissionregistration.k8s.io/v1");
    let _ = writeln!(y, "kind: MutatingWebhookConfiguration");
    let _ = writeln!(y, "metadata:");
    let _ = writeln!(y, "  name: {}", m.name);
    let _ = writeln!(y, "  labels:");
    let _ = writeln!(y, "    app.kubernetes.io/name: iam-broker");
    let _ = writeln!(y, "webhooks:");
    let _ = writeln!(y, "  - name: pods.{}.iam-broker.io", m.name);
    let _ = writeln!(y, "    admissionReviewVersions: [v1, v1beta1]");
    let _ = writeln!(y, "    sideEffects: NoneOnDryRun");
    let _ = writeln!(y, "    failurePolicy: {}", m.failure_policy.as_str());
    let _ = writeln!(y, "    timeoutSeconds: {}", m.timeout_seconds);
    let _ = writeln!(y, "    reinvocationPolicy: IfNeeded");
    let _ = writeln!(y, "    matchPolicy: Equivalent");
    let _ = writeln!(y, "    clientConfig:");
    let _ = writeln!(y, "      url: \"{}\"", m.url);
    if let Some(pem) = &m.ca_bundle_pem {
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(ManifestError(
                "the CA bundle is not a PEM certificate".to_owned(),
            ));
        }
        let _ = writeln!(y, "      caBundle: {}", STANDARD.encode(pem.as_bytes()));
    }
    let _ = writeln!(y, "    rules:");
    let _ = writeln!(y, "      - operations: [CREATE, DELETE]");
    let _ = writeln!(y, "        apiGroups: [\"\"]");
    let _ = writeln!(y, "        apiVersions: [v1]");
    let _ = writeln!(y, "        resources: [pods]");
    let _ = writeln!(y, "        scope: Namespaced");
    let _ = writeln!(y, "    namespaceSelector:");
    let _ = writeln!(y, "      matchExpressions:");
    let _ = writeln!(y, "        - key: kubernetes.io/metadata.name");
    let _ = writeln!(y, "          operator: NotIn");
    let _ = writeln!(
        y,
        "          values: [{}]",
        m.excluded_namespaces.join(", ")
    );
    Ok(y)
}

/// A kubeconfig for one ServiceAccount token: one cluster, one user, one context.
pub fn kubeconfig(
    server: &str,
    ca_pem: Option<&str>,
    token: &str,
    name: &str,
) -> Result<String, ManifestError> {
    if !server.starts_with("https://") {
        return Err(ManifestError(format!(
            "the API server URL must be https://, got {server:?}"
        )));
    }
    plain("server", server)?;
    plain("name", name)?;
    if token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ManifestError(
            "the token must be non-empty printable ASCII".to_owned(),
        ));
    }
    let mut y = String::new();
    let _ = writeln!(y, "apiVersion: v1");
    let _ = writeln!(y, "kind: Config");
    let _ = writeln!(y, "clusters:");
    let _ = writeln!(y, "  - name: {name}");
    let _ = writeln!(y, "    cluster:");
    let _ = writeln!(y, "      server: \"{server}\"");
    if let Some(pem) = ca_pem {
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(ManifestError("the CA is not a PEM certificate".to_owned()));
        }
        let _ = writeln!(
            y,
            "      certificate-authority-data: {}",
            STANDARD.encode(pem.as_bytes())
        );
    }
    let _ = writeln!(y, "users:");
    let _ = writeln!(y, "  - name: {name}");
    let _ = writeln!(y, "    user:");
    let _ = writeln!(y, "      token: \"{token}\"");
    let _ = writeln!(y, "contexts:");
    let _ = writeln!(y, "  - name: {name}");
    let _ = writeln!(y, "    context:");
    let _ = writeln!(y, "      cluster: {name}");
    let _ = writeln!(y, "      user: {name}");
    let _ = writeln!(y, "current-context: {name}");
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> WebhookManifest {
        WebhookManifest {
            name: "iam-broker".into(),
            url: "https://abc.execute-api.us-east-1.amazonaws.com/Prod/mutate/s3cr3t".into(),
            ca_bundle_pem: None,
            failure_policy: WebhookFailurePolicy::Ignore,
            timeout_seconds: 10,
            excluded_namespaces: DEFAULT_EXCLUDED_NAMESPACES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        }
    }

    #[test]
    fn renders_the_registration() {
        let y = render_webhook(&manifest()).unwrap();
        for line in [
            "kind: MutatingWebhookConfiguration",
            "sideEffects: NoneOnDryRun",
            "admissionReviewVersions: [v1, v1beta1]",
            "reinvocationPolicy: IfNeeded",
            "failurePolicy: Ignore",
            "timeoutSeconds: 10",
            "operations: [CREATE, DELETE]",
            "values: [iam-broker, kube-system, kube-public, kube-node-lease]",
            "url: \"https://abc.execute-api.us-east-1.amazonaws.com/Prod/mutate/s3cr3t\"",
        ] {
            assert!(y.contains(line), "missing {line:?} in\n{y}");
        }
        assert!(!y.contains("caBundle"));
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
    fn kubeconfig_carries_server_ca_and_token() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let y = kubeconfig("https://api.example:6443", Some(pem), "eyJ.tok", "webhook").unwrap();
        assert!(y.contains("server: \"https://api.example:6443\""));
        assert!(y.contains(&format!(
            "certificate-authority-data: {}",
            STANDARD.encode(pem)
        )));
        assert!(y.contains("token: \"eyJ.tok\""));
        assert!(y.contains("current-context: webhook"));
        assert!(kubeconfig("http://x", None, "t", "n").is_err());
        assert!(kubeconfig("https://x", None, "", "n").is_err());
        assert!(kubeconfig("https://x", None, "a b", "n").is_err());
    }
}
