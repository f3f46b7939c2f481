//! Kubernetes adapter of iam-broker: the [`Cluster`] port over the `kube` client.
//!
//! The client comes from a kubeconfig held in an SSM SecureString (decrypted, built once per warm
//! container, rebuilt when the API server answers 401 so a rotated kubeconfig is picked up), from
//! kubeconfig text, or from the standard inference (`KUBECONFIG`, `~/.kube/config`, in-cluster
//! ServiceAccount). It is built on first use, so a process that never calls Kubernetes never
//! needs access to it. Every call runs under a deadline.
//!
//! RBAC the webhook's identity needs (and nothing more; see `deploy/components/rbac-secret/20-rbac.yaml`):
//!
//! | verb | resource | why |
//! |---|---|---|
//! | `get` | `serviceaccounts` | read the role annotation |
//! | `create` | `secrets` | the pod's token Secret |
//! | `delete` | `secrets` | pod DELETE, undo of a failed CREATE, cleanup |
//! | `list` (cluster-wide) | `secrets` | the sweep (metadata only is read) |
#![forbid(unsafe_code)]

mod kubeconfig;

pub use kubeconfig::{KubeconfigError, kubeconfig};

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_ssm::config::http::HttpResponse;
use aws_sdk_ssm::error::{ProvideErrorMetadata, SdkError};
use iam_broker_aws::{SdkFailure, Service, error_code, explain};
use iam_broker_kernel::ports::{
    BoxError, Cluster, ClusterError, ClusterEvent, ManagedSecret, ServiceAccount, TokenSecret,
};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Event, EventSource, ObjectReference, Secret, ServiceAccount as K8sServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use tokio::sync::Mutex;

/// Where the client's kubeconfig comes from.
#[derive(Clone)]
pub enum ClientSource {
    /// An SSM SecureString parameter holding kubeconfig YAML (read with decryption).
    SsmParameter {
        /// The SSM client (built once, by the composition root).
        ssm: aws_sdk_ssm::Client,
        /// Parameter name.
        name: String,
    },
    /// Kubeconfig YAML text.
    Kubeconfig(String),
    /// `KUBECONFIG`, `~/.kube/config`, or the in-cluster ServiceAccount.
    Infer,
}

impl std::fmt::Debug for ClientSource {
    // The kubeconfig holds a credential: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SsmParameter { name, .. } => write!(f, "SsmParameter({name})"),
            Self::Kubeconfig(_) => f.write_str("Kubeconfig(<redacted>)"),
            Self::Infer => f.write_str("Infer"),
        }
    }
}

/// Why no client could be built.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The SSM parameter does not exist (`ParameterNotFound`).
    #[error(
        "the kubeconfig parameter {name} does not exist in {region}: store it with `iam-broker \
         kubeconfig --from-secret NS/NAME --store {name}`, or set KUBECONFIG_PARAMETER to the \
         stack's KubeconfigParameterName"
    )]
    ParameterMissing {
        /// Parameter name.
        name: String,
        /// The region SSM was asked in.
        region: String,
        /// What SSM said.
        #[source]
        source: BoxError,
    },
    /// IAM (or the parameter's KMS key policy) refused this identity.
    #[error(
        "reading the kubeconfig parameter {name} was denied: this identity needs \
         ssm:GetParameter on it, and kms:Decrypt on its KMS key"
    )]
    ParameterDenied {
        /// Parameter name.
        name: String,
        /// What SSM said.
        #[source]
        source: BoxError,
    },
    /// The SSM parameter could not be read for another reason (region, credentials, endpoint).
    #[error("cannot read the kubeconfig parameter {name} from SSM")]
    Ssm {
        /// Parameter name.
        name: String,
        /// What went wrong, explained ([`iam_broker_aws::AwsError`]).
        #[source]
        source: BoxError,
    },
    /// The SSM parameter could not be written.
    #[error("cannot store the kubeconfig in SSM parameter {name}")]
    Store {
        /// Parameter name.
        name: String,
        /// What went wrong, explained ([`iam_broker_aws::AwsError`]).
        #[source]
        source: BoxError,
    },
    /// IAM (or the KMS key policy) refused the write.
    #[error(
        "storing the kubeconfig in SSM parameter {name} was denied: this identity needs \
         ssm:PutParameter on it, and kms:Encrypt on its KMS key"
    )]
    StoreDenied {
        /// Parameter name.
        name: String,
        /// What SSM said.
        #[source]
        source: BoxError,
    },
    /// The parameter exists but holds no value.
    #[error("the kubeconfig parameter {0} is empty")]
    Empty(String),
    /// The kubeconfig is not valid YAML or lacks a usable context.
    #[error("the kubeconfig is not usable: {0}")]
    Kubeconfig(String),
    /// No kubeconfig and not in a cluster.
    #[error("no Kubernetes configuration found: {0}")]
    Infer(String),
    /// The client could not be built (e.g. a bad CA).
    #[error("cannot build the Kubernetes client: {0}")]
    Client(String),
}

/// Error codes of SSM (and KMS behind it) that mean "not allowed".
const DENIED_CODES: &[&str] = &["AccessDeniedException", "AccessDenied"];

fn is_denied<E: ProvideErrorMetadata>(error: &SdkError<E, HttpResponse>) -> bool {
    error_code(error).is_some_and(|code| DENIED_CODES.contains(&code.as_str()))
}

/// Reads a kubeconfig from an SSM SecureString parameter (decrypted).
pub async fn kubeconfig_from_ssm(
    ssm: &aws_sdk_ssm::Client,
    name: &str,
) -> Result<String, SourceError> {
    let region = ssm.config().region();
    let output = ssm
        .get_parameter()
        .name(name)
        .with_decryption(true)
        .send()
        .await
        .map_err(|e| {
            let name = name.to_owned();
            if error_code(&e).as_deref() == Some("ParameterNotFound") {
                SourceError::ParameterMissing {
                    name,
                    region: region
                        .map_or_else(|| "the configured region".to_owned(), ToString::to_string),
                    source: Box::new(SdkFailure::new(e)),
                }
            } else if is_denied(&e) {
                SourceError::ParameterDenied {
                    name,
                    source: Box::new(SdkFailure::new(e)),
                }
            } else {
                SourceError::Ssm {
                    name,
                    source: Box::new(explain(Service::Ssm, region, e)),
                }
            }
        })?;
    output
        .parameter
        .and_then(|p| p.value)
        .filter(|v| !v.trim().is_empty())
        .ok_or_else(|| SourceError::Empty(name.to_owned()))
}

/// Stores a kubeconfig in an SSM SecureString parameter (overwriting), encrypted with `kms_key_id`
/// or the account's `alias/aws/ssm`.
pub async fn store_kubeconfig_in_ssm(
    ssm: &aws_sdk_ssm::Client,
    name: &str,
    kubeconfig: &str,
    kms_key_id: Option<&str>,
) -> Result<(), SourceError> {
    ssm.put_parameter()
        .name(name)
        .description("kubeconfig of the iam-broker webhook's ServiceAccount")
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .value(kubeconfig)
        .set_key_id(kms_key_id.map(str::to_owned))
        .overwrite(true)
        .send()
        .await
        .map_err(|e| {
            let name = name.to_owned();
            if is_denied(&e) {
                SourceError::StoreDenied {
                    name,
                    source: Box::new(SdkFailure::new(e)),
                }
            } else {
                SourceError::Store {
                    name,
                    source: Box::new(explain(Service::Ssm, ssm.config().region(), e)),
                }
            }
        })?;
    Ok(())
}

/// Builds a client from kubeconfig YAML (its current context), with `timeout` as the connect,
/// read and write timeout.
pub async fn client_from_kubeconfig(text: &str, timeout: Duration) -> Result<Client, SourceError> {
    ClientSource::Kubeconfig(text.to_owned())
        .build(timeout)
        .await
}

fn with_timeouts(config: &mut kube::Config, timeout: Duration) {
    config.connect_timeout = Some(timeout);
    config.read_timeout = Some(timeout);
    config.write_timeout = Some(timeout);
}

/// The kube client asks rustls for the process-wide crypto provider, and this process links
/// two (ring, and aws-lc-rs through the AWS SDK), so rustls cannot pick one by itself: choose
/// ring, as the rest of the workspace does. Installing twice is harmless.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl ClientSource {
    /// The client configuration this source describes (reads SSM for a parameter).
    async fn config(&self) -> Result<kube::Config, SourceError> {
        install_crypto_provider();
        let from_text = |text: String| async move {
            let kubeconfig =
                Kubeconfig::from_yaml(&text).map_err(|e| SourceError::Kubeconfig(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| SourceError::Kubeconfig(e.to_string()))
        };
        match self {
            Self::SsmParameter { ssm, name } => {
                from_text(kubeconfig_from_ssm(ssm, name).await?).await
            }
            Self::Kubeconfig(text) => from_text(text.clone()).await,
            Self::Infer => kube::Config::infer()
                .await
                .map_err(|e| SourceError::Infer(e.to_string())),
        }
    }

    async fn build(&self, timeout: Duration) -> Result<Client, SourceError> {
        let mut config = self.config().await?;
        with_timeouts(&mut config, timeout);
        Client::try_from(config).map_err(|e| SourceError::Client(e.to_string()))
    }
}

/// The [`Cluster`] port over a lazily built, cached `kube` client.
pub struct KubeCluster {
    source: ClientSource,
    timeout: Duration,
    client: Mutex<Option<Client>>,
}

impl KubeCluster {
    /// A cluster whose client is built from `source` on first use; every call is bounded by
    /// `timeout` (a slow API server gives [`ClusterError::Unavailable`], not a hang).
    pub fn new(source: ClientSource, timeout: Duration) -> Self {
        Self {
            source,
            timeout,
            client: Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<Client, ClusterError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let client = tokio::time::timeout(self.timeout, self.source.build(self.timeout))
            .await
            .map_err(|_| {
                ClusterError::Unavailable("building the Kubernetes client timed out".into())
            })?
            .map_err(|e| ClusterError::Unavailable(Box::new(e)))?;
        *slot = Some(client.clone());
        Ok(client)
    }

    async fn forget(&self) {
        *self.client.lock().await = None;
    }

    /// Runs `call` with the cached client; on 401 rebuilds the client from its source (a rotated
    /// kubeconfig) and tries once more.
    async fn run<T, F, Fut>(&self, call: F) -> Result<T, ClusterError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let first = self.attempt(&call).await;
        match first {
            Err(ClusterError::Unauthorized(_)) => {
                tracing::warn!("the Kubernetes API answered 401; rebuilding the client");
                self.forget().await;
                self.attempt(&call).await
            }
            other => other,
        }
    }

    async fn attempt<T, F, Fut>(&self, call: &F) -> Result<T, ClusterError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let client = self.client().await?;
        match tokio::time::timeout(self.timeout, call(client)).await {
            Ok(result) => result.map_err(map_error),
            Err(_) => Err(ClusterError::Unavailable(
                format!(
                    "the Kubernetes API did not answer within {:?}",
                    self.timeout
                )
                .into(),
            )),
        }
    }
}

/// Maps a `kube` error to the port's error.
pub fn map_error(error: kube::Error) -> ClusterError {
    match error {
        kube::Error::Api(status) => match status.code {
            401 => ClusterError::Unauthorized(status),
            403 => ClusterError::Forbidden(status.message.clone()),
            409 if status.is_already_exists() => ClusterError::AlreadyExists,
            429 | 500..=599 => ClusterError::Unavailable(status),
            code => ClusterError::Rejected {
                status: code,
                message: status.message.clone(),
            },
        },
        other => ClusterError::Unavailable(Box::new(other)),
    }
}

fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

#[async_trait]
impl Cluster for KubeCluster {
    async fn service_account(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<ServiceAccount>, ClusterError> {
        let found = self
            .run(|client| async move {
                Api::<K8sServiceAccount>::namespaced(client, namespace)
                    .get_opt(name)
                    .await
            })
            .await?;
        Ok(found.map(|sa| ServiceAccount {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            annotations: sa.metadata.annotations.unwrap_or_default(),
            uid: sa.metadata.uid,
        }))
    }

    async fn record_event(&self, event: &ClusterEvent) -> Result<(), ClusterError> {
        let object = core_event(event);
        let object = &object;
        let namespace = event.involved.namespace.as_str();
        self.run(|client| async move {
            Api::<Event>::namespaced(client, namespace)
                .create(&PostParams::default(), object)
                .await
        })
        .await?;
        Ok(())
    }

    async fn create_secret(&self, secret: &TokenSecret) -> Result<(), ClusterError> {
        let object = Secret {
            metadata: ObjectMeta {
                name: Some(secret.name.clone()),
                namespace: Some(secret.namespace.clone()),
                labels: Some(secret.labels.clone()),
                annotations: Some(secret.annotations.clone()),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_owned()),
            data: Some(BTreeMap::from([(
                iam_broker_kernel::ports::SECRET_TOKEN_KEY.to_owned(),
                ByteString(secret.token.expose().as_bytes().to_vec()),
            )])),
            ..Secret::default()
        };
        let object = &object;
        self.run(|client| async move {
            Api::<Secret>::namespaced(client, &secret.namespace)
                .create(&PostParams::default(), object)
                .await
        })
        .await?;
        Ok(())
    }

    async fn delete_secret(&self, namespace: &str, name: &str) -> Result<bool, ClusterError> {
        self.run(|client| async move {
            match Api::<Secret>::namespaced(client, namespace)
                .delete(name, &DeleteParams::default())
                .await
            {
                Ok(_) => Ok(true),
                Err(e) if is_not_found(&e) => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn managed_secrets(
        &self,
        label_selector: &str,
    ) -> Result<Vec<ManagedSecret>, ClusterError> {
        // Metadata only: the sweep never needs (or pulls) the tokens themselves.
        let mut secrets = Vec::new();
        let mut continue_token: Option<String> = None;
        loop {
            let mut params = ListParams::default().labels(label_selector).limit(500);
            if let Some(token) = &continue_token {
                params = params.continue_token(token);
            }
            let params = &params;
            let page = self
                .run(|client| async move { Api::<Secret>::all(client).list_metadata(params).await })
                .await?;
            for item in page.items {
                let meta = item.metadata;
                let (Some(namespace), Some(name)) = (meta.namespace, meta.name) else {
                    continue;
                };
                secrets.push(ManagedSecret {
                    namespace,
                    name,
                    annotations: meta.annotations.unwrap_or_default(),
                    created_at: meta.creation_timestamp.map(|t| t.0.as_second()),
                });
            }
            continue_token = page.metadata.continue_.filter(|t| !t.is_empty());
            if continue_token.is_none() {
                return Ok(secrets);
            }
        }
    }
}

/// One permission the webhook needs, as a `SelfSubjectAccessReview` asks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permission {
    /// Verb, e.g. `create`.
    pub verb: &'static str,
    /// Resource (core group), e.g. `secrets`.
    pub resource: &'static str,
}

/// The core/v1 `Event` for a [`ClusterEvent`]: `type: Warning`, reported by `iam-broker`, named
/// like client-go's recorder names them (`<object>.<nanoseconds in hex>`).
fn core_event(event: &ClusterEvent) -> Event {
    let time = k8s_openapi::jiff::Timestamp::from_second(event.at)
        .ok()
        .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let involved = &event.involved;
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{}.{nanos:x}", involved.name)),
            namespace: Some(involved.namespace.clone()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some(involved.api_version.clone()),
            kind: Some(involved.kind.clone()),
            name: Some(involved.name.clone()),
            namespace: Some(involved.namespace.clone()),
            uid: involved.uid.clone(),
            ..ObjectReference::default()
        },
        reason: Some(event.reason.to_owned()),
        message: Some(event.message.clone()),
        type_: Some("Warning".to_owned()),
        count: Some(1),
        first_timestamp: time.clone(),
        last_timestamp: time,
        source: Some(EventSource {
            component: Some("iam-broker".to_owned()),
            host: None,
        }),
        reporting_component: Some("iam-broker".to_owned()),
        reporting_instance: Some("iam-broker-webhook".to_owned()),
        ..Event::default()
    }
}

/// Exactly the permissions of the RBAC table in this crate's documentation.
pub const REQUIRED_PERMISSIONS: &[Permission] = &[
    Permission {
        verb: "get",
        resource: "serviceaccounts",
    },
    Permission {
        verb: "create",
        resource: "secrets",
    },
    Permission {
        verb: "delete",
        resource: "secrets",
    },
    Permission {
        verb: "create",
        resource: "events",
    },
    Permission {
        verb: "list",
        resource: "secrets",
    },
];

/// What a `projected` webhook that reads ServiceAccounts (`SERVICE_ACCOUNT_LOOKUP`) calls:
/// `deploy/components/rbac-projected/20-rbac.projected.yaml`. Without the lookup it calls nothing.
pub const PROJECTED_PERMISSIONS: &[Permission] = &[Permission {
    verb: "get",
    resource: "serviceaccounts",
}];

impl KubeCluster {
    /// Whether the client's identity may do `permission` in every namespace
    /// (`SelfSubjectAccessReview`), for `iam-broker doctor`.
    pub async fn can(&self, permission: Permission) -> Result<bool, ClusterError> {
        use k8s_openapi::api::authorization::v1::{
            ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
        };
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(permission.verb.to_owned()),
                    resource: Some(permission.resource.to_owned()),
                    group: Some(String::new()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let review = &review;
        let answer = self
            .run(|client| async move {
                Api::<SelfSubjectAccessReview>::all(client)
                    .create(&PostParams::default(), review)
                    .await
            })
            .await?;
        Ok(answer.status.is_some_and(|s| s.allowed))
    }

    /// A namespace's labels (`None`: no such namespace), for `iam-broker explain` (RBAC: get
    /// namespaces; the API server labels each with `kubernetes.io/metadata.name`).
    pub async fn namespace_labels(
        &self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, ClusterError> {
        let found = self
            .run(|client| async move {
                Api::<k8s_openapi::api::core::v1::Namespace>::all(client)
                    .get_opt(name)
                    .await
            })
            .await?;
        Ok(found.map(|ns| ns.metadata.labels.unwrap_or_default()))
    }

    /// A `MutatingWebhookConfiguration` by name (`None`: not registered), for `iam-broker
    /// explain` (RBAC: get mutatingwebhookconfigurations).
    pub async fn mutating_webhook_configuration(
        &self,
        name: &str,
    ) -> Result<
        Option<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>,
        ClusterError,
    > {
        self.run(|client| async move {
            Api::<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>::all(
                client,
            )
            .get_opt(name)
            .await
        })
        .await
    }

    /// The API server URL, the token and the CA (PEM) held by a
    /// `kubernetes.io/service-account-token` Secret, for `iam-broker kubeconfig --from-secret`.
    /// The server is the one this client talks to.
    pub async fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<(String, String, Option<String>), ClusterError> {
        let secret =
            self.run(|client| async move {
                Api::<Secret>::namespaced(client, namespace).get(name).await
            })
            .await?;
        let data = secret.data.unwrap_or_default();
        let text = |key: &str| {
            data.get(key)
                .map(|b| String::from_utf8_lossy(&b.0).trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let token = text("token").ok_or_else(|| ClusterError::Rejected {
            status: 404,
            message: format!(
                "Secret {namespace}/{name} has no token yet (is it a kubernetes.io/service-account-token Secret?)"
            ),
        })?;
        let url = self.server_url().await?;
        Ok((url, token, text("ca.crt")))
    }

    async fn server_url(&self) -> Result<String, ClusterError> {
        let config = self
            .source
            .config()
            .await
            .map_err(|e| ClusterError::Unavailable(Box::new(e)))?;
        Ok(config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_owned())
    }
}
