//! The kubeconfig the webhook's identity uses (`iam-broker kubeconfig`, the stand-in's own), built
//! from `kube`'s typed [`Kubeconfig`] and serialized, so no value needs escaping by hand. It
//! holds a bearer token: print it to a file or an SSM SecureString, never to a log.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use kube::config::{
    AuthInfo, Cluster, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext,
};

/// Why a kubeconfig cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KubeconfigError(pub String);

/// A kubeconfig for one ServiceAccount token: one cluster, one user, one context, all named
/// `name`.
pub fn kubeconfig(
    server: &str,
    ca_pem: Option<&str>,
    token: &str,
    name: &str,
) -> Result<String, KubeconfigError> {
    if !server.starts_with("https://") || server.chars().any(|c| !c.is_ascii_graphic()) {
        return Err(KubeconfigError(format!(
            "the API server URL must be https:// without spaces, got {:?}",
            iam_broker_kernel::text::clip(server, iam_broker_kernel::text::MAX_ECHO)
        )));
    }
    iam_broker_kernel::name::validate_dns_subdomain("kubeconfig name", name)
        .map_err(|e| KubeconfigError(e.to_string()))?;
    if token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(KubeconfigError(
            "the token must be non-empty printable ASCII".to_owned(),
        ));
    }
    if let Some(pem) = ca_pem
        && !pem.contains("-----BEGIN CERTIFICATE-----")
    {
        return Err(KubeconfigError(
            "the CA is not a PEM certificate".to_owned(),
        ));
    }
    let config = Kubeconfig {
        api_version: Some("v1".to_owned()),
        kind: Some("Config".to_owned()),
        clusters: vec![NamedCluster {
            name: name.to_owned(),
            cluster: Some(Cluster {
                server: Some(server.to_owned()),
                certificate_authority_data: ca_pem.map(|pem| STANDARD.encode(pem)),
                ..Cluster::default()
            }),
            other: Default::default(),
        }],
        auth_infos: vec![NamedAuthInfo {
            name: name.to_owned(),
            auth_info: Some(AuthInfo {
                token: Some(token.to_owned().into()),
                ..AuthInfo::default()
            }),
            other: Default::default(),
        }],
        contexts: vec![NamedContext {
            name: name.to_owned(),
            context: Some(Context {
                cluster: name.to_owned(),
                user: Some(name.to_owned()),
                ..Context::default()
            }),
            other: Default::default(),
        }],
        current_context: Some(name.to_owned()),
        ..Kubeconfig::default()
    };
    let options =
        serde_saphyr::ser_options! { prefer_block_scalars: false, compact_list_indent: false };
    serde_saphyr::to_string_with_options(&config, options)
        .map_err(|e| KubeconfigError(format!("the kubeconfig does not serialize: {e}")))
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;

    #[test]
    fn kubeconfig_carries_server_ca_and_token() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let y = kubeconfig("https://api.example:6443", Some(pem), "eyJ.tok", "webhook").unwrap();
        let parsed = Kubeconfig::from_yaml(&y).unwrap();
        let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://api.example:6443"));
        let ca = cluster.certificate_authority_data.as_deref().unwrap();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(ca)
                .unwrap(),
            pem.as_bytes()
        );
        let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(user.token.as_ref().unwrap().expose_secret(), "eyJ.tok");
        assert_eq!(parsed.current_context.as_deref(), Some("webhook"));
        assert!(kubeconfig("http://x", None, "t", "n").is_err());
        assert!(kubeconfig("https://x", None, "", "n").is_err());
        assert!(kubeconfig("https://x", None, "a b", "n").is_err());
        assert!(kubeconfig("https://x", None, "t", "Bad Name").is_err());
    }

    #[test]
    fn values_yaml_would_misread_stay_values() {
        // A token that looks like YAML syntax is still one string after a round trip.
        let y = kubeconfig("https://x:1/#a", None, "\"q\":#x", "n").unwrap();
        let parsed = Kubeconfig::from_yaml(&y).unwrap();
        let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(user.token.as_ref().unwrap().expose_secret(), "\"q\":#x");
    }
}
