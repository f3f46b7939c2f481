//! A local stand-in for the Kubernetes API server (none can be installed here): the real REST
//! paths under `/api/v1`, real object JSON, `Status` errors, bearer-token authentication, and
//! HTTPS with a test CA that goes into the kubeconfig, so the real `kube` client talks to it
//! exactly as to a cluster. Faults (status codes, delays, and the [`WireFault`]s of the fault
//! matrix: resets, late answers, writes that land late) can be injected per method and path, and
//! every request is logged for assertions.
//!
//! It keeps ServiceAccounts, Secrets and Pods in memory, answers
//! `SelfSubjectAccessReview`s (allowed unless told otherwise), and binds 127.0.0.1 on a free
//! port; it stops when dropped.
//!
//! It is also a ServiceAccount token issuer like kube-apiserver: the TokenRequest API
//! (`POST .../serviceaccounts/{name}/token`) signs projected tokens (RS256 with an RSA 2048 key
//! by default, or ES256), and the discovery documents (`/.well-known/openid-configuration`,
//! `/openid/v1/jwks`) publish every key still trusted, so a verifier can be tested against it
//! exactly as against a cluster, key rotation included ([`KubeApi::rotate_signing_key`],
//! [`KubeApi::retire_previous_keys`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use ring::rand::{SecureRandom as _, SystemRandom};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tower::ServiceExt as _;

use crate::signer::Signer;
use crate::wire::WireFault;

/// Resources the stand-in keeps (the core group's plural names).
const RESOURCES: &[(&str, &str)] = &[
    ("serviceaccounts", "ServiceAccount"),
    ("secrets", "Secret"),
    ("pods", "Pod"),
    ("events", "Event"),
];

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An injected fault: requests matching `method` (any when `None`) whose path contains
/// `path_contains` get `status` (as a `Status` object) after `delay`; `times` limits how often
/// (`None`: until cleared).
#[derive(Debug, Clone)]
pub struct Fault {
    /// Only this method.
    pub method: Option<Method>,
    /// A substring of the request path.
    pub path_contains: String,
    /// The status to answer; `None` only delays and then serves normally.
    pub status: Option<u16>,
    /// Wait this long first.
    pub delay: Duration,
    /// How many more requests it applies to.
    pub times: Option<usize>,
    /// A fault of the wire instead of `status` / `delay`.
    pub wire: Option<WireFault>,
}

impl Fault {
    /// Answer `status` to `method` requests whose path contains `path_contains`, always.
    pub fn status(method: Method, path_contains: &str, status: u16) -> Self {
        Self {
            method: Some(method),
            path_contains: path_contains.to_owned(),
            status: Some(status),
            delay: Duration::ZERO,
            times: None,
            wire: None,
        }
    }

    /// Apply a [`WireFault`] to `method` requests whose path contains `path_contains`, always.
    pub fn wire(method: Method, path_contains: &str, fault: WireFault) -> Self {
        Self {
            method: Some(method),
            path_contains: path_contains.to_owned(),
            status: None,
            delay: Duration::ZERO,
            times: None,
            wire: Some(fault),
        }
    }

    /// Delay `method` requests whose path contains `path_contains`, always.
    pub fn delay(method: Method, path_contains: &str, delay: Duration) -> Self {
        Self {
            method: Some(method),
            path_contains: path_contains.to_owned(),
            status: None,
            delay,
            times: None,
            wire: None,
        }
    }

    /// Apply only to the next `n` matching requests.
    pub fn times(mut self, n: usize) -> Self {
        self.times = Some(n);
        self
    }
}

struct Inner {
    objects: Mutex<BTreeMap<(String, String, String), Value>>,
    tokens: Mutex<BTreeSet<String>>,
    faults: Mutex<Vec<Fault>>,
    log: Mutex<Vec<(Method, String)>>,
    denied: Mutex<BTreeSet<(String, String)>>,
    resource_version: AtomicU64,
    /// Requests held by a [`WireFault::LandsLate`], not yet processed.
    in_flight: AtomicUsize,
    /// The ServiceAccount token issuer and its keys.
    signer: TokenSigner,
    /// The bearer token of the stand-in's own kubelet ([`KubeApi::issue_token`]). A node has
    /// credentials of its own, so it is accepted whatever [`KubeApi::set_tokens`] says.
    kubelet_token: String,
}

impl Inner {
    fn new(signer: TokenSigner) -> anyhow::Result<Self> {
        Ok(Self {
            objects: Mutex::default(),
            tokens: Mutex::new(BTreeSet::from([DEFAULT_TOKEN.to_owned()])),
            faults: Mutex::default(),
            log: Mutex::default(),
            denied: Mutex::default(),
            resource_version: AtomicU64::default(),
            in_flight: AtomicUsize::default(),
            signer,
            kubelet_token: format!("stand-in-kubelet-{}", hex(&random_bytes::<16>()?)),
        })
    }
}

/// Set on a response to close the connection instead of sending it.
#[derive(Debug, Clone, Copy)]
struct ResetConnection;

/// A running stand-in API server.
pub struct KubeApi {
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// PEM of the CA that signed its certificate.
    pub ca_pem: String,
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The token the stand-in accepts unless told otherwise.
pub const DEFAULT_TOKEN: &str = "stand-in-token-a";

/// The issuer kubeadm gives a cluster (`--service-account-issuer`): the stand-in's default.
pub const DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A TokenRequest's lifetime when its `spec.expirationSeconds` is left out.
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;

/// The shortest lifetime the TokenRequest API grants (10 minutes); shorter is `Invalid`.
pub const MIN_EXPIRATION_SECONDS: i64 = 600;

/// The longest lifetime the TokenRequest API accepts (2^32 seconds).
pub const MAX_EXPIRATION_SECONDS: i64 = 1 << 32;

/// Where the API server serves its OpenID provider configuration.
pub const OPENID_CONFIGURATION_PATH: &str = "/.well-known/openid-configuration";

/// Where the API server serves the keys that verify ServiceAccount tokens.
pub const JWKS_PATH: &str = "/openid/v1/jwks";

/// Stand-in control (no API server has it): `POST` makes a new key sign from now on, the
/// previous ones still trusted ([`KubeApi::rotate_signing_key`]). Answers the new JWKS.
pub const ROTATE_SIGNING_KEY_PATH: &str = "/standin/v1/rotate-signing-key";

/// Stand-in control: `POST` drops every key but the current one from the JWKS
/// ([`KubeApi::retire_previous_keys`]). Answers the new JWKS.
pub const RETIRE_PREVIOUS_KEYS_PATH: &str = "/standin/v1/retire-previous-keys";

pub use crate::signer::SigningAlgorithm;

/// How [`KubeApi::start_with`] sets the stand-in up as a token issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandinOptions {
    /// `iss` of the tokens, and the audience of a TokenRequest that names none (the API
    /// server's default `--api-audiences`).
    pub issuer: String,
    /// What the signing key is.
    pub algorithm: SigningAlgorithm,
}

impl Default for StandinOptions {
    fn default() -> Self {
        Self {
            issuer: DEFAULT_ISSUER.to_owned(),
            algorithm: SigningAlgorithm::default(),
        }
    }
}

impl StandinOptions {
    /// These options with another issuer.
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = issuer.into();
        self
    }

    /// These options with another signing algorithm.
    pub fn algorithm(mut self, algorithm: SigningAlgorithm) -> Self {
        self.algorithm = algorithm;
        self
    }
}

impl KubeApi {
    /// Starts the stand-in, accepting [`DEFAULT_TOKEN`], issuing tokens as [`DEFAULT_ISSUER`]
    /// with a fresh RSA key.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(StandinOptions::default()).await
    }

    /// Starts the stand-in with this issuer and signing algorithm. The signing key is fresh
    /// (two stand-ins with the same issuer are two clusters that trust different keys) and
    /// made on first need: an RSA key takes a quarter of a second, which suites that never
    /// ask for a token should not pay.
    pub async fn start_with(options: StandinOptions) -> anyhow::Result<Self> {
        let (ca_pem, acceptor) = tls()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address: SocketAddr = listener.local_addr()?;
        let inner = Arc::new(Inner::new(TokenSigner::new(options))?);
        let app = Router::new()
            .route("/version", get(version))
            .route(
                "/api/v1/namespaces/{namespace}/{resource}",
                get(list_namespaced).post(create),
            )
            .route(
                "/api/v1/namespaces/{namespace}/{resource}/{name}",
                get(read).delete(delete),
            )
            .route(
                "/api/v1/namespaces/{namespace}/{resource}/{name}/{subresource}",
                post(create_subresource),
            )
            .route("/api/v1/{resource}", get(list_all))
            .route("/api/v1/namespaces/{namespace}", get(read_namespace))
            .route(
                "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}",
                get(read_mutating_webhook_configuration),
            )
            .route(
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                post(access_review),
            )
            .route(OPENID_CONFIGURATION_PATH, get(openid_configuration))
            .route(JWKS_PATH, get(jwks))
            .route(ROTATE_SIGNING_KEY_PATH, post(rotate_signing_key))
            .route(RETIRE_PREVIOUS_KEYS_PATH, post(retire_previous_keys))
            .fallback(|| async {
                status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                )
            })
            .layer(middleware::from_fn_with_state(inner.clone(), gate))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let app = app.clone();
                // A response marked `ResetConnection` becomes a service error, on which hyper
                // drops the connection without an answer.
                let service =
                    tower::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let app = app.clone();
                        async move {
                            let response =
                                app.oneshot(request).await.unwrap_or_else(|e| match e {});
                            if response.extensions().get::<ResetConnection>().is_some() {
                                return Err(std::io::Error::new(
                                    std::io::ErrorKind::ConnectionReset,
                                    "injected: connection reset",
                                ));
                            }
                            Ok(response)
                        }
                    });
                let service = TowerToHyperService::new(service);
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    }
                });
            }
        });
        Ok(Self {
            url: format!("https://{address}"),
            ca_pem,
            inner,
            task,
        })
    }

    /// A kubeconfig (YAML) for this server with `token`, trusting the test CA.
    pub fn kubeconfig(&self, token: &str) -> String {
        self.kubeconfig_with_ca(token, &self.ca_pem)
    }

    /// A kubeconfig trusting some other CA (to prove TLS is verified).
    pub fn kubeconfig_with_ca(&self, token: &str, ca_pem: &str) -> String {
        iam_broker_kube::kubeconfig(&self.url, Some(ca_pem), token, "stand-in").unwrap_or_default()
    }

    /// Writes [`Self::kubeconfig`] to `dir/kubeconfig` and returns the path.
    pub fn write_kubeconfig(&self, dir: &Path, token: &str) -> anyhow::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, self.kubeconfig(token)).context("writing the kubeconfig")?;
        Ok(path)
    }

    /// Replaces the accepted bearer tokens.
    pub fn set_tokens(&self, tokens: &[&str]) {
        *lock(&self.inner.tokens) = tokens.iter().map(|t| (*t).to_owned()).collect();
    }

    /// Adds a fault.
    pub fn inject(&self, fault: Fault) {
        lock(&self.inner.faults).push(fault);
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        lock(&self.inner.faults).clear();
    }

    /// Makes SelfSubjectAccessReviews for `verb` on `resource` answer `allowed: false`.
    /// `resource` names a subresource as `serviceaccounts/token` and a non-resource URL by
    /// its path (`/openid/v1/jwks`); the TokenRequest and discovery routes also answer such a
    /// denial with 403, as an API server whose RBAC does not grant them.
    pub fn deny(&self, verb: &str, resource: &str) {
        lock(&self.inner.denied).insert((verb.to_owned(), resource.to_owned()));
    }

    /// Every request so far: method and path (with query).
    pub fn requests(&self) -> Vec<(Method, String)> {
        lock(&self.inner.log).clone()
    }

    /// Waits until no request held by [`WireFault::LandsLate`] is still to be processed.
    pub async fn settled(&self) {
        while self.inner.in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every managed Secret (any namespace): `(namespace, name, token-hash annotation)`.
    pub fn managed_secrets(&self) -> Vec<(String, String, Option<String>)> {
        lock(&self.inner.objects)
            .iter()
            .filter(|((r, _, _), v)| {
                r == "secrets"
                    && v["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "iam-broker"
            })
            .map(|((_, ns, name), v)| {
                let hash = v["metadata"]["annotations"]["iam-broker.io/token-hash"]
                    .as_str()
                    .map(str::to_owned);
                (ns.clone(), name.clone(), hash)
            })
            .collect()
    }

    /// How many requests had this method and a path containing `path_contains`.
    pub fn count(&self, method: &Method, path_contains: &str) -> usize {
        lock(&self.inner.log)
            .iter()
            .filter(|(m, p)| m == method && p.contains(path_contains))
            .count()
    }

    /// Stores a ServiceAccount with annotations.
    pub fn put_service_account(&self, namespace: &str, name: &str, annotations: &[(&str, &str)]) {
        let annotations: serde_json::Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        let object = json!({ "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": { "name": name, "namespace": namespace, "annotations": annotations } });
        self.put("serviceaccounts", namespace, name, object);
    }

    /// Stores a Pod of `service_account` with this uid, as the scheduler would have.
    pub fn put_pod(&self, namespace: &str, name: &str, uid: &str, service_account: &str) {
        let object = json!({ "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": namespace, "uid": uid },
            "spec": { "serviceAccountName": service_account } });
        self.put("pods", namespace, name, object);
    }

    /// Stores an object as is (metadata completed like a create would).
    pub fn put(&self, resource: &str, namespace: &str, name: &str, mut object: Value) {
        stamp(&self.inner, &mut object, namespace, name);
        lock(&self.inner.objects).insert(
            (resource.to_owned(), namespace.to_owned(), name.to_owned()),
            object,
        );
    }

    /// Stores a namespace with these labels, plus `kubernetes.io/metadata.name` as the API
    /// server adds it to every namespace.
    pub fn put_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let mut labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        labels.insert("kubernetes.io/metadata.name".to_owned(), json!(name));
        let object = json!({ "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "labels": labels } });
        self.put_cluster_scoped("namespaces", name, object);
    }

    /// Stores a `MutatingWebhookConfiguration` (JSON, e.g. `render-webhook`'s output parsed),
    /// under its `metadata.name`.
    pub fn put_mutating_webhook_configuration(&self, object: Value) {
        let name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
        self.put_cluster_scoped("mutatingwebhookconfigurations", &name, object);
    }

    fn put_cluster_scoped(&self, resource: &str, name: &str, mut object: Value) {
        stamp(&self.inner, &mut object, "", name);
        if let Some(metadata) = object["metadata"].as_object_mut() {
            metadata.remove("namespace");
        }
        lock(&self.inner.objects).insert(
            (resource.to_owned(), String::new(), name.to_owned()),
            object,
        );
    }

    /// Sets an object's `metadata.creationTimestamp` (RFC 3339), e.g. to age it.
    pub fn set_creation_timestamp(&self, resource: &str, namespace: &str, name: &str, at: &str) {
        if let Some(object) = lock(&self.inner.objects).get_mut(&(
            resource.to_owned(),
            namespace.to_owned(),
            name.to_owned(),
        )) {
            object["metadata"]["creationTimestamp"] = json!(at);
        }
    }

    /// A stored Secret.
    pub fn secret(&self, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.inner.objects)
            .get(&("secrets".to_owned(), namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every stored Secret of a namespace.
    pub fn secrets(&self, namespace: &str) -> Vec<Value> {
        lock(&self.inner.objects)
            .iter()
            .filter(|((r, ns, _), _)| r == "secrets" && ns == namespace)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every stored Event of a namespace.
    pub fn events(&self, namespace: &str) -> Vec<Value> {
        lock(&self.inner.objects)
            .iter()
            .filter(|((r, ns, _), _)| r == "events" && ns == namespace)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The decoded `data.token` of a stored Secret.
    pub fn secret_token(&self, namespace: &str, name: &str) -> Option<String> {
        let secret = self.secret(namespace, name)?;
        let bytes = STANDARD.decode(secret["data"]["token"].as_str()?).ok()?;
        String::from_utf8(bytes).ok()
    }

    /// The issuer (`iss`) of the tokens this cluster signs.
    pub fn issuer(&self) -> String {
        self.inner.signer.issuer.clone()
    }

    /// The JWKS the cluster publishes at `/openid/v1/jwks`: every key still trusted. Like
    /// every key accessor, it makes the first key if none was needed yet.
    pub fn jwks(&self) -> anyhow::Result<Value> {
        self.inner.signer.jwks()
    }

    /// The `kid` of the key that signs from now on.
    pub fn signing_key_id(&self) -> anyhow::Result<String> {
        Ok(self.inner.signer.current()?.kid.clone())
    }

    /// Signs any claims with the current key, with the header the API server writes: for
    /// tokens it would never issue (expired, another audience, a forged subject).
    pub fn sign_claims(&self, claims: &Value) -> anyhow::Result<String> {
        self.inner.signer.sign(claims)
    }

    /// Signs any claims with the current key under a header of the caller's (without `kid`,
    /// with `crit`, ...): for tokens other signers might write.
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> anyhow::Result<String> {
        let signer = self.inner.signer.current()?;
        Ok(signer.try_sign_raw(header, claims.to_string().as_bytes())?)
    }

    /// A new key signs from now on; the previous ones stay in the JWKS (as a second
    /// `--service-account-key-file` keeps them trusted). Answers the new key's `kid`.
    pub fn rotate_signing_key(&self) -> anyhow::Result<String> {
        self.inner.signer.rotate()
    }

    /// Only the current key stays in the JWKS: tokens signed by earlier keys no longer verify.
    pub fn retire_previous_keys(&self) {
        self.inner.signer.retire_previous();
    }

    /// Requests a projected token for a Pod as kubelet does: a TokenRequest bound to the Pod,
    /// through the real route (authentication, faults and denials included), with the `kube`
    /// client and kubelet's own credentials. The Pod is stored first when the stand-in does not
    /// hold it (kubelet only asks for pods it runs); one it holds must match `pod_uid` and run
    /// as `service_account`, or the API server's answer is the error.
    pub async fn issue_token(
        &self,
        namespace: &str,
        service_account: &str,
        pod_name: &str,
        pod_uid: &str,
        audience: &str,
        expiration_seconds: i64,
    ) -> anyhow::Result<String> {
        use k8s_openapi::api::authentication::v1::BoundObjectReference;
        use kube::api::{Api, PostParams};
        if self.pod(namespace, pod_name).is_none() {
            self.put_pod(namespace, pod_name, pod_uid, service_account);
        }
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![audience.to_owned()]),
                expiration_seconds: Some(expiration_seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".to_owned()),
                    kind: Some("Pod".to_owned()),
                    name: Some(pod_name.to_owned()),
                    uid: Some(pod_uid.to_owned()),
                }),
                ..TokenRequestSpec::default()
            }),
            ..TokenRequest::default()
        };
        let client = self.client(&self.inner.kubelet_token).await?;
        let answer = Api::<ServiceAccount>::namespaced(client, namespace)
            .create_token_request(service_account, &PostParams::default(), &request)
            .await
            .with_context(|| format!("TokenRequest for {namespace}/{service_account}"))?;
        answer
            .status
            .and_then(|status| status.token)
            .filter(|token| !token.is_empty())
            .context("the TokenRequest answer carries no token")
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.inner.objects)
            .get(&("pods".to_owned(), namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// A `kube` client for this server with `token`.
    async fn client(&self, token: &str) -> anyhow::Result<kube::Client> {
        use kube::config::{KubeConfigOptions, Kubeconfig};
        // Two crypto providers are linked (ring, and aws-lc-rs through the AWS SDK): choose ring
        // as the rest of the workspace does. Installing twice is harmless.
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let kubeconfig = Kubeconfig::from_yaml(&self.kubeconfig(token))?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }
}

/// A test CA and a server certificate for 127.0.0.1 / localhost signed by it, as PEM:
/// `(ca, certificate, private key)`.
pub fn test_certificates() -> anyhow::Result<(String, String, String)> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "iam-broker test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;
    Ok((ca.pem(), cert.pem(), key.serialize_pem()))
}

/// A TLS acceptor for the certificate of [`test_certificates`], and its CA.
fn tls() -> anyhow::Result<(String, TlsAcceptor)> {
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    let (ca_pem, cert_pem, key_pem) = test_certificates()?;
    let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes())?];
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((ca_pem, TlsAcceptor::from(Arc::new(config))))
}

/// A `metav1.Status` failure, as the API server sends it.
fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({ "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code });
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn reason_of(code: u16) -> &'static str {
    match code {
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "AlreadyExists",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        _ => "InternalError",
    }
}

/// Logging, faults and bearer-token authentication, in that order.
async fn gate(State(inner): State<Arc<Inner>>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    lock(&inner.log).push((method.clone(), path.clone()));
    let fault = {
        let mut faults = lock(&inner.faults);
        let found = faults.iter_mut().find(|f| {
            f.method.as_ref().is_none_or(|m| *m == method)
                && path.contains(&f.path_contains)
                && f.times != Some(0)
        });
        found.map(|f| {
            if let Some(n) = f.times.as_mut() {
                *n -= 1;
            }
            f.clone()
        })
    };
    if let Some(wire) = fault.as_ref().and_then(|f| f.wire) {
        return wire_fault(&inner, wire, request, next).await;
    }
    if let Some(fault) = fault {
        tokio::time::sleep(fault.delay).await;
        if let Some(code) = fault.status {
            return status(code, reason_of(code), "injected failure");
        }
    }
    if !authenticated(&inner, &request) {
        return status(401, "Unauthorized", "Unauthorized");
    }
    next.run(request).await
}

fn reset_connection() -> Response {
    let mut response = StatusCode::INTERNAL_SERVER_ERROR.into_response();
    response.extensions_mut().insert(ResetConnection);
    response
}

/// Applies a [`WireFault`]; the request is processed (authentication included) where the
/// fault says it is.
async fn wire_fault(
    inner: &Arc<Inner>,
    fault: WireFault,
    request: Request,
    next: Next,
) -> Response {
    let process = |request: Request, next: Next| processed(inner.clone(), request, next);
    match fault {
        WireFault::Refused => reset_connection(),
        WireFault::ServerError => status(500, "InternalError", "injected failure"),
        WireFault::Throttled => {
            let mut response = status(429, "TooManyRequests", "injected: too many requests");
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            response
        }
        WireFault::ResetAfterSent => {
            let _ = process(request, next).await;
            reset_connection()
        }
        WireFault::AnsweredLate(hold) => {
            let response = process(request, next).await;
            tokio::time::sleep(hold).await;
            response
        }
        WireFault::LandsLate(hold) => {
            // Detached, so the write lands even after the client hangs up.
            inner.in_flight.fetch_add(1, Ordering::SeqCst);
            let done = inner.clone();
            let late = tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                let response = processed(done.clone(), request, next).await;
                done.in_flight.fetch_sub(1, Ordering::SeqCst);
                response
            });
            late.await
                .unwrap_or_else(|_| status(500, "InternalError", "the held request failed"))
        }
    }
}

async fn processed(inner: Arc<Inner>, request: Request, next: Next) -> Response {
    if !authenticated(&inner, &request) {
        return status(401, "Unauthorized", "Unauthorized");
    }
    next.run(request).await
}

fn authenticated(inner: &Inner, request: &Request) -> bool {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    token.is_some_and(|t| t == inner.kubelet_token || lock(&inner.tokens).contains(t))
}

fn kind_of(resource: &str) -> Option<&'static str> {
    RESOURCES
        .iter()
        .find(|(r, _)| *r == resource)
        .map(|(_, k)| *k)
}

fn stamp(inner: &Inner, object: &mut Value, namespace: &str, name: &str) {
    let rv = inner.resource_version.fetch_add(1, Ordering::SeqCst) + 1;
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
    let created = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let metadata = &mut object["metadata"];
    metadata["name"] = json!(name);
    metadata["namespace"] = json!(namespace);
    metadata["resourceVersion"] = json!(rv.to_string());
    if metadata.get("uid").is_none() {
        metadata["uid"] = json!(format!("00000000-0000-4000-8000-{rv:012}"));
    }
    if metadata.get("creationTimestamp").is_none() {
        metadata["creationTimestamp"] = json!(created);
    }
}

async fn version() -> Response {
    axum::Json(json!({ "major": "1", "minor": "32", "gitVersion": "v1.32.0-iam-broker-stand-in" }))
        .into_response()
}

async fn read(
    State(inner): State<Arc<Inner>>,
    UrlPath((namespace, resource, name)): UrlPath<(String, String, String)>,
) -> Response {
    if kind_of(&resource).is_none() {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    match lock(&inner.objects).get(&(resource.clone(), namespace, name.clone())) {
        Some(object) => axum::Json(object.clone()).into_response(),
        None => status(404, "NotFound", &format!("{resource} \"{name}\" not found")),
    }
}

/// Cluster-scoped objects are kept under namespace `""`.
fn read_cluster_scoped(inner: &Inner, resource: &str, name: &str) -> Response {
    match lock(&inner.objects).get(&(resource.to_owned(), String::new(), name.to_owned())) {
        Some(object) => axum::Json(object.clone()).into_response(),
        None => status(404, "NotFound", &format!("{resource} \"{name}\" not found")),
    }
}

/// `GET /api/v1/namespaces/{name}`: a namespace put with [`KubeApi::put_namespace`].
async fn read_namespace(
    State(inner): State<Arc<Inner>>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    read_cluster_scoped(&inner, "namespaces", &name)
}

/// `GET .../mutatingwebhookconfigurations/{name}`: one put with
/// [`KubeApi::put_mutating_webhook_configuration`].
async fn read_mutating_webhook_configuration(
    State(inner): State<Arc<Inner>>,
    UrlPath(name): UrlPath<String>,
) -> Response {
    read_cluster_scoped(&inner, "mutatingwebhookconfigurations", &name)
}

async fn create(
    State(inner): State<Arc<Inner>>,
    UrlPath((namespace, resource)): UrlPath<(String, String)>,
    body: Bytes,
) -> Response {
    let Some(kind) = kind_of(&resource) else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let Ok(mut object) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "the body is not JSON");
    };
    let Some(name) = object["metadata"]["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
    else {
        return status(
            422,
            "Invalid",
            &format!("{kind} \"\" is invalid: metadata.name: Required value"),
        );
    };
    if object["metadata"]["namespace"]
        .as_str()
        .is_some_and(|ns| ns != namespace)
    {
        return status(
            400,
            "BadRequest",
            "the namespace of the object does not match the namespace on the request",
        );
    }
    let key = (resource.clone(), namespace.clone(), name.clone());
    let mut objects = lock(&inner.objects);
    if objects.contains_key(&key) {
        return status(
            409,
            "AlreadyExists",
            &format!("{resource} \"{name}\" already exists"),
        );
    }
    object["apiVersion"] = json!("v1");
    object["kind"] = json!(kind);
    stamp(&inner, &mut object, &namespace, &name);
    objects.insert(key, object.clone());
    (StatusCode::CREATED, axum::Json(object)).into_response()
}

async fn delete(
    State(inner): State<Arc<Inner>>,
    UrlPath((namespace, resource, name)): UrlPath<(String, String, String)>,
) -> Response {
    match lock(&inner.objects).remove(&(resource.clone(), namespace, name.clone())) {
        Some(object) => axum::Json(object).into_response(),
        None => status(404, "NotFound", &format!("{resource} \"{name}\" not found")),
    }
}

fn matches_selector(object: &Value, selector: Option<&String>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    selector.split(',').all(|term| {
        let (key, value) = term.split_once('=').unwrap_or((term, ""));
        let label = &object["metadata"]["labels"][key.trim()];
        label
            .as_str()
            .is_some_and(|v| value.is_empty() || v == value.trim())
    })
}

fn list(
    inner: &Inner,
    headers: &HeaderMap,
    resource: &str,
    namespace: Option<&str>,
    query: &BTreeMap<String, String>,
) -> Response {
    let Some(kind) = kind_of(resource) else {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    let metadata_only = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("as=PartialObjectMetadataList"));
    let items: Vec<Value> = lock(&inner.objects)
        .iter()
        .filter(|((r, ns, _), object)| {
            r == resource
                && namespace.is_none_or(|n| n == ns)
                && matches_selector(object, query.get("labelSelector"))
        })
        .map(|(_, object)| {
            if metadata_only {
                json!({ "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                    "metadata": object["metadata"] })
            } else {
                object.clone()
            }
        })
        .collect();
    let rv = inner.resource_version.load(Ordering::SeqCst).to_string();
    let body = if metadata_only {
        json!({ "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
            "metadata": { "resourceVersion": rv }, "items": items })
    } else {
        json!({ "apiVersion": "v1", "kind": format!("{kind}List"),
            "metadata": { "resourceVersion": rv }, "items": items })
    };
    axum::Json(body).into_response()
}

async fn list_namespaced(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath((namespace, resource)): UrlPath<(String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    list(&inner, &headers, &resource, Some(&namespace), &query)
}

async fn list_all(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    UrlPath(resource): UrlPath<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    list(&inner, &headers, &resource, None, &query)
}

async fn access_review(State(inner): State<Arc<Inner>>, body: Bytes) -> Response {
    let Ok(mut review) = serde_json::from_slice::<Value>(&body) else {
        return status(400, "BadRequest", "the body is not JSON");
    };
    let (verb, resource) = reviewed_permission(&review["spec"]);
    let allowed = !lock(&inner.denied).contains(&(verb, resource));
    review["status"] = json!({ "allowed": allowed });
    (StatusCode::CREATED, axum::Json(review)).into_response()
}

/// The `(verb, resource)` a SelfSubjectAccessReview asks about, in [`KubeApi::deny`]'s words:
/// `resource/subresource` for a subresource, the path for a non-resource URL.
fn reviewed_permission(spec: &Value) -> (String, String) {
    let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
    let attributes = &spec["resourceAttributes"];
    if attributes.is_object() {
        let resource = text(&attributes["resource"]);
        let resource = match attributes["subresource"].as_str() {
            Some(subresource) if !subresource.is_empty() => format!("{resource}/{subresource}"),
            _ => resource,
        };
        return (text(&attributes["verb"]), resource);
    }
    let attributes = &spec["nonResourceAttributes"];
    (text(&attributes["verb"]), text(&attributes["path"]))
}

// ServiceAccount tokens: keys, signing, the TokenRequest API and discovery.

/// A Pod-bound TokenRequest for exactly this lifetime and the API server's own audience gets a
/// year-long token that warns after this lifetime (kubelet's `kube-api-access` volume, while
/// `--service-account-extend-token-expiration` is on, its default).
const WARN_ONLY_BOUND_TOKEN_EXPIRATION_SECONDS: i64 = 60 * 60 + 7;

/// How long such an extended token lives.
const EXPIRATION_EXTENSION_SECONDS: i64 = 24 * 365 * 60 * 60;

/// How long clients may cache the discovery documents (kube-apiserver's `max-age`).
const DISCOVERY_MAX_AGE_SECONDS: u32 = 3600;

/// Whom a denial's message names (the stand-in authenticates tokens, not users).
const STANDIN_USER: &str = "system:serviceaccount:iam-broker:stand-in-client";

/// The keys of an issuer: one signs, all verify.
#[derive(Debug)]
struct KeyRing {
    current: Arc<Signer>,
    /// Earlier signing keys still trusted, newest first.
    previous: Vec<Arc<Signer>>,
}

impl KeyRing {
    fn trusted(&self) -> impl Iterator<Item = &Arc<Signer>> {
        std::iter::once(&self.current).chain(&self.previous)
    }
}

/// The ServiceAccount token issuer of a stand-in.
#[derive(Debug)]
struct TokenSigner {
    issuer: String,
    algorithm: SigningAlgorithm,
    /// `None` until a key is first needed.
    keys: Mutex<Option<KeyRing>>,
}

impl TokenSigner {
    fn new(options: StandinOptions) -> Self {
        Self {
            issuer: options.issuer,
            algorithm: options.algorithm,
            keys: Mutex::new(None),
        }
    }

    /// `f` over the keys, the first one made now if none was needed yet (under the lock, so
    /// concurrent first requests wait for the one key rather than make several).
    fn with_keys<T>(&self, f: impl FnOnce(&mut KeyRing) -> T) -> anyhow::Result<T> {
        let mut keys = lock(&self.keys);
        let ring = match keys.take() {
            Some(ring) => ring,
            None => KeyRing {
                current: Arc::new(Signer::generate(self.algorithm)?),
                previous: Vec::new(),
            },
        };
        Ok(f(keys.insert(ring)))
    }

    fn current(&self) -> anyhow::Result<Arc<Signer>> {
        self.with_keys(|keys| keys.current.clone())
    }

    /// A compact JWS of `claims`, with kube-apiserver's header (`alg` and `kid`, no `typ`).
    fn sign(&self, claims: &Value) -> anyhow::Result<String> {
        Ok(self.current()?.try_sign(claims)?)
    }

    fn jwks(&self) -> anyhow::Result<Value> {
        let jwks: Vec<Value> =
            self.with_keys(|keys| keys.trusted().map(|key| key.jwk()).collect())?;
        Ok(json!({ "keys": jwks }))
    }

    /// The OpenID provider configuration kube-apiserver serves for its issuer.
    fn openid_configuration(&self) -> anyhow::Result<Value> {
        let algorithms: BTreeSet<&'static str> =
            self.with_keys(|keys| keys.trusted().map(|key| key.algorithm().name()).collect())?;
        Ok(json!({
            "issuer": self.issuer,
            "jwks_uri": format!("{}{JWKS_PATH}", self.issuer.trim_end_matches('/')),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": algorithms,
        }))
    }

    /// Generates a new signing key (outside the lock: RSA is slow) and keeps the old one
    /// trusted. Answers the new `kid`.
    fn rotate(&self) -> anyhow::Result<String> {
        // The first key, so that there is one to keep trusting.
        self.current()?;
        let next = Arc::new(Signer::generate(self.algorithm)?);
        let kid = next.kid.clone();
        self.with_keys(|keys| {
            let previous = std::mem::replace(&mut keys.current, next);
            keys.previous.insert(0, previous);
        })?;
        Ok(kid)
    }

    fn retire_previous(&self) {
        if let Some(keys) = lock(&self.keys).as_mut() {
            keys.previous.clear();
        }
    }
}

/// A `metav1.Status` failure, decided before it is sent.
#[derive(Debug)]
struct Failure {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl Failure {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn not_found(resource: &str, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{resource} \"{name}\" not found"))
            .with_details(json!({ "name": name, "kind": resource }))
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut body = json!({ "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason,
            "code": self.code });
        if let Some(details) = self.details {
            body["details"] = details;
        }
        (
            StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

/// 403 when [`KubeApi::deny`] took `verb` on `resource` away; `on` names the object in the
/// message as the API server does (`serviceaccounts "app" is forbidden: ...`), or is empty for
/// a non-resource URL.
fn forbidden(
    inner: &Inner,
    verb: &str,
    resource: &str,
    on: &str,
    namespace: Option<&str>,
) -> Option<Failure> {
    if !lock(&inner.denied).contains(&(verb.to_owned(), resource.to_owned())) {
        return None;
    }
    let message = match namespace {
        Some(namespace) => format!(
            "{on} is forbidden: User \"{STANDIN_USER}\" cannot {verb} resource \"{resource}\" in API group \"\" in the namespace \"{namespace}\""
        ),
        None => format!("forbidden: User \"{STANDIN_USER}\" cannot {verb} path \"{resource}\""),
    };
    Some(Failure::new(403, "Forbidden", message))
}

/// What a bound token names its object as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BoundKind {
    Pod,
    Secret,
}

/// The object a token is bound to, as stored.
#[derive(Debug, Clone)]
struct BoundObject {
    kind: BoundKind,
    name: String,
    uid: String,
}

/// What a TokenRequest is granted, once checked against the stored objects.
#[derive(Debug, Clone)]
struct Grant {
    namespace: String,
    service_account: String,
    service_account_uid: String,
    bound: Option<BoundObject>,
    audiences: Vec<String>,
    /// Seconds the token itself lives.
    lifetime: i64,
    /// Seconds reported in `status.expirationTimestamp`: the requested lifetime, which the
    /// token's own can exceed ([`WARN_ONLY_BOUND_TOKEN_EXPIRATION_SECONDS`]).
    requested_lifetime: i64,
    /// `kubernetes.io.warnafter`, in seconds from issue, for an extended token.
    warn_after: Option<i64>,
}

/// The lifetime a spec asks for, validated as `ValidateTokenRequest` does (422 `Invalid`).
fn requested_lifetime(spec: &TokenRequestSpec) -> Result<i64, Failure> {
    let seconds = spec
        .expiration_seconds
        .unwrap_or(DEFAULT_EXPIRATION_SECONDS);
    let problem = if seconds < MIN_EXPIRATION_SECONDS {
        "may not specify a duration less than 10 minutes"
    } else if seconds > MAX_EXPIRATION_SECONDS {
        "may not specify a duration larger than 2^32 seconds"
    } else {
        return Ok(seconds);
    };
    let field = "spec.expirationSeconds";
    let cause = format!("Invalid value: {seconds}: {problem}");
    Err(Failure::new(
        422,
        "Invalid",
        format!("TokenRequest.authentication.k8s.io \"\" is invalid: {field}: {cause}"),
    )
    .with_details(
        json!({ "group": "authentication.k8s.io", "kind": "TokenRequest",
        "causes": [{ "reason": "FieldValueInvalid", "message": cause, "field": field }] }),
    ))
}

/// The object `reference` binds the token to, checked as the API server does: a Pod or a
/// Secret of the core group that exists, a Pod running as the ServiceAccount, and the uid of
/// the reference (when given) the stored one.
fn bound_object(
    objects: &BTreeMap<(String, String, String), Value>,
    namespace: &str,
    service_account: &str,
    reference: &k8s_openapi::api::authentication::v1::BoundObjectReference,
) -> Result<BoundObject, Failure> {
    let api_version = reference.api_version.as_deref().unwrap_or_default();
    let kind = reference.kind.as_deref().unwrap_or_default();
    let name = reference.name.as_deref().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let (bound_kind, resource) = match (group, kind) {
        ("", "Pod") => (BoundKind::Pod, "pods"),
        ("", "Secret") => (BoundKind::Secret, "secrets"),
        _ => {
            return Err(Failure::bad_request(format!(
                "cannot bind token to object of type {group}/{version}, Kind={kind}"
            )));
        }
    };
    let object = objects
        .get(&(resource.to_owned(), namespace.to_owned(), name.to_owned()))
        .ok_or_else(|| Failure::not_found(resource, name))?;
    if bound_kind == BoundKind::Pod {
        let runs_as = object["spec"]["serviceAccountName"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        if runs_as != service_account {
            return Err(Failure::bad_request(format!(
                "cannot bind token for serviceaccount \"{service_account}\" to pod running with different serviceaccount name."
            )));
        }
    }
    let uid = object["metadata"]["uid"].as_str().unwrap_or_default();
    if let Some(expected) = reference.uid.as_deref().filter(|u| !u.is_empty())
        && expected != uid
    {
        return Err(Failure::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {kind} \"{name}\": the UID in the bound object reference ({expected}) does not match the UID in record. The object might have been deleted and then recreated"
            ),
        )
        .with_details(json!({ "name": name, "kind": kind })));
    }
    Ok(BoundObject {
        kind: bound_kind,
        name: name.to_owned(),
        uid: uid.to_owned(),
    })
}

/// Decides a TokenRequest for `namespace/service_account` in kube-apiserver's order:
/// validation, the ServiceAccount, the bound object, the default audience, the extension.
fn grant(
    objects: &BTreeMap<(String, String, String), Value>,
    namespace: &str,
    service_account: &str,
    spec: &TokenRequestSpec,
    api_audiences: &[String],
) -> Result<Grant, Failure> {
    let requested = requested_lifetime(spec)?;
    let account = objects
        .get(&(
            "serviceaccounts".to_owned(),
            namespace.to_owned(),
            service_account.to_owned(),
        ))
        .ok_or_else(|| Failure::not_found("serviceaccounts", service_account))?;
    let bound = spec
        .bound_object_ref
        .as_ref()
        .map(|reference| bound_object(objects, namespace, service_account, reference))
        .transpose()?;
    let audiences = match spec.audiences.as_deref() {
        Some(audiences) if !audiences.is_empty() => audiences.to_vec(),
        _ => api_audiences.to_vec(),
    };
    let extended = requested == WARN_ONLY_BOUND_TOKEN_EXPIRATION_SECONDS
        && bound.as_ref().is_some_and(|b| b.kind == BoundKind::Pod)
        && audiences.iter().all(|a| api_audiences.contains(a));
    Ok(Grant {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        service_account_uid: account["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        bound,
        audiences,
        lifetime: if extended {
            EXPIRATION_EXTENSION_SECONDS
        } else {
            requested
        },
        requested_lifetime: requested,
        warn_after: extended.then_some(requested),
    })
}

/// The claims of a projected ServiceAccount token, as `serviceaccount.Claims` writes them.
fn claims(issuer: &str, grant: &Grant, now: i64, jti: &str) -> Value {
    let mut kubernetes = json!({
        "namespace": grant.namespace,
        "serviceaccount": { "name": grant.service_account, "uid": grant.service_account_uid },
    });
    if let Some(bound) = &grant.bound {
        let key = match bound.kind {
            BoundKind::Pod => "pod",
            BoundKind::Secret => "secret",
        };
        kubernetes[key] = json!({ "name": bound.name, "uid": bound.uid });
    }
    if let Some(after) = grant.warn_after {
        kubernetes["warnafter"] = json!(now + after);
    }
    json!({
        "aud": grant.audiences,
        "exp": now + grant.lifetime,
        "iat": now,
        "iss": issuer,
        "jti": jti,
        "kubernetes.io": kubernetes,
        "nbf": now,
        "sub": format!("system:serviceaccount:{}:{}", grant.namespace, grant.service_account),
    })
}

fn rfc3339(unix_seconds: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_seconds)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut bytes = [0_u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random (version 4) UUID, for `jti`.
fn random_uuid() -> anyhow::Result<String> {
    let mut bytes = random_bytes::<16>()?;
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let (a, rest) = bytes.split_at(4);
    let (b, rest) = rest.split_at(2);
    let (c, rest) = rest.split_at(2);
    let (d, e) = rest.split_at(2);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        hex(a),
        hex(b),
        hex(c),
        hex(d),
        hex(e)
    ))
}

/// `POST /api/v1/namespaces/{namespace}/{resource}/{name}/{subresource}`: of the
/// subresources, the stand-in has the TokenRequest API (`serviceaccounts/token`).
async fn create_subresource(
    State(inner): State<Arc<Inner>>,
    UrlPath((namespace, resource, name, subresource)): UrlPath<(String, String, String, String)>,
    body: Bytes,
) -> Response {
    if (resource.as_str(), subresource.as_str()) != ("serviceaccounts", "token") {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    blocking(move || {
        token_request(&inner, &namespace, &name, &body).unwrap_or_else(IntoResponse::into_response)
    })
    .await
}

/// Runs `answer` off the runtime: it may make the first signing key, which takes a while.
async fn blocking(answer: impl FnOnce() -> Response + Send + 'static) -> Response {
    tokio::task::spawn_blocking(answer)
        .await
        .unwrap_or_else(|_| status(500, "InternalError", "the request failed"))
}

/// The TokenRequest API: RBAC, the request read, the grant decided, the token signed.
fn token_request(
    inner: &Inner,
    namespace: &str,
    name: &str,
    body: &[u8],
) -> Result<Response, Failure> {
    if let Some(denied) = forbidden(
        inner,
        "create",
        "serviceaccounts/token",
        &format!("serviceaccounts \"{name}\""),
        Some(namespace),
    ) {
        return Err(denied);
    }
    let request: TokenRequest = serde_json::from_slice(body)
        .map_err(|e| Failure::bad_request(format!("the body is not a TokenRequest: {e}")))?;
    let spec = request.spec.clone().unwrap_or_default();
    let grant = grant(
        &lock(&inner.objects),
        namespace,
        name,
        &spec,
        std::slice::from_ref(&inner.signer.issuer),
    )?;
    let internal = |e: anyhow::Error| {
        Failure::new(
            500,
            "InternalError",
            format!("failed to generate token: {e:#}"),
        )
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let jti = random_uuid().map_err(internal)?;
    let token = inner
        .signer
        .sign(&claims(&inner.signer.issuer, &grant, now, &jti))
        .map_err(internal)?;
    let mut answer = serde_json::to_value(&request).unwrap_or_else(|_| json!({}));
    answer["apiVersion"] = json!("authentication.k8s.io/v1");
    answer["kind"] = json!("TokenRequest");
    answer["metadata"]["creationTimestamp"] = Value::Null;
    answer["spec"]["audiences"] = json!(grant.audiences);
    answer["spec"]["expirationSeconds"] = json!(grant.requested_lifetime);
    answer["status"] = json!({ "token": token,
        "expirationTimestamp": rfc3339(now + grant.requested_lifetime) });
    Ok((StatusCode::CREATED, axum::Json(answer)).into_response())
}

/// A discovery document as kube-apiserver serves it: cacheable, behind RBAC's
/// `system:service-account-issuer-discovery` (here: unless [`KubeApi::deny`]).
fn discovery(
    inner: &Inner,
    path: &str,
    content_type: &'static str,
    document: impl FnOnce(&TokenSigner) -> anyhow::Result<Value>,
) -> Response {
    if let Some(denied) = forbidden(inner, "get", path, "", None) {
        return denied.into_response();
    }
    let body = match document(&inner.signer) {
        Ok(body) => body,
        Err(e) => return status(500, "InternalError", &format!("{e:#}")),
    };
    (
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (
                header::CACHE_CONTROL,
                format!("public, max-age={DISCOVERY_MAX_AGE_SECONDS}"),
            ),
        ],
        body.to_string(),
    )
        .into_response()
}

async fn openid_configuration(State(inner): State<Arc<Inner>>) -> Response {
    blocking(move || {
        discovery(
            &inner,
            OPENID_CONFIGURATION_PATH,
            "application/json",
            TokenSigner::openid_configuration,
        )
    })
    .await
}

async fn jwks(State(inner): State<Arc<Inner>>) -> Response {
    blocking(move || {
        discovery(
            &inner,
            JWKS_PATH,
            "application/jwk-set+json",
            TokenSigner::jwks,
        )
    })
    .await
}

/// The JWKS after `change`, or the failure.
fn changed_keys(
    inner: &Inner,
    change: impl FnOnce(&TokenSigner) -> anyhow::Result<()>,
) -> Response {
    match change(&inner.signer).and_then(|()| inner.signer.jwks()) {
        Ok(jwks) => axum::Json(jwks).into_response(),
        Err(e) => status(500, "InternalError", &format!("{e:#}")),
    }
}

async fn rotate_signing_key(State(inner): State<Arc<Inner>>) -> Response {
    blocking(move || changed_keys(&inner, |signer| signer.rotate().map(drop))).await
}

async fn retire_previous_keys(State(inner): State<Arc<Inner>>) -> Response {
    blocking(move || {
        changed_keys(&inner, |signer| {
            signer.retire_previous();
            Ok(())
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ring::signature::{
        ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents,
        UnparsedPublicKey,
    };
    use sha2::{Digest as _, Sha256};

    const POD_UID: &str = "0b6d3c1e-7a51-4d2e-9f0a-5c8e1d2b3a4f";

    /// A token taken apart: header, claims, signing input, signature.
    struct Jws {
        header: Value,
        claims: Value,
        signing_input: String,
        signature: Vec<u8>,
    }

    fn decode(token: &str) -> Jws {
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3, "a compact JWS");
        let json = |part: &str| -> Value {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
        };
        Jws {
            header: json(parts[0]),
            claims: json(parts[1]),
            signing_input: format!("{}.{}", parts[0], parts[1]),
            signature: URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
        }
    }

    fn b64(value: &Value) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(value.as_str().unwrap()).unwrap()
    }

    /// Whether a key of `jwks` with the token's `kid` verifies its signature (with ring, not
    /// the code that signed).
    fn verifies(jwks: &Value, token: &str) -> bool {
        let jws = decode(token);
        let Some(key) = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|key| key["kid"] == jws.header["kid"])
        else {
            return false;
        };
        let message = jws.signing_input.as_bytes();
        match key["kty"].as_str().unwrap() {
            "RSA" => RsaPublicKeyComponents {
                n: b64(&key["n"]),
                e: b64(&key["e"]),
            }
            .verify(&RSA_PKCS1_2048_8192_SHA256, message, &jws.signature)
            .is_ok(),
            "EC" => UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, ec_point(key))
                .verify(message, &jws.signature)
                .is_ok(),
            other => panic!("unexpected kty {other}"),
        }
    }

    fn ec_point(key: &Value) -> Vec<u8> {
        [vec![0x04], b64(&key["x"]), b64(&key["y"])].concat()
    }

    /// DER, by hand, to check the kid independently of the encoders the stand-in uses.
    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if content.len() < 0x80 {
            out.push(content.len() as u8);
        } else {
            let length = content.len().to_be_bytes();
            let length: Vec<u8> = length.iter().copied().skip_while(|b| *b == 0).collect();
            out.push(0x80 | length.len() as u8);
            out.extend(length);
        }
        out.extend(content);
        out
    }

    fn der_unsigned(bytes: &[u8]) -> Vec<u8> {
        let trimmed: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
        let padded = if trimmed.first().is_some_and(|b| b & 0x80 != 0) {
            [vec![0], trimmed].concat()
        } else {
            trimmed
        };
        der(0x02, &padded)
    }

    /// The PKIX SubjectPublicKeyInfo of a JWK (RFC 3279 / RFC 5480).
    fn spki(key: &Value) -> Vec<u8> {
        let (algorithm, public_key) = match key["kty"].as_str().unwrap() {
            "RSA" => {
                let rsa_encryption = der(0x06, &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 1, 1, 1]);
                let algorithm = [rsa_encryption, vec![0x05, 0x00]].concat();
                let public_key = der(
                    0x30,
                    &[der_unsigned(&b64(&key["n"])), der_unsigned(&b64(&key["e"]))].concat(),
                );
                (algorithm, public_key)
            }
            "EC" => {
                let ec_public_key = der(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]);
                let prime256v1 = der(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]);
                ([ec_public_key, prime256v1].concat(), ec_point(key))
            }
            other => panic!("unexpected kty {other}"),
        };
        der(
            0x30,
            &[
                der(0x30, &algorithm),
                der(0x03, &[vec![0x00], public_key].concat()),
            ]
            .concat(),
        )
    }

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    async fn cluster(options: StandinOptions) -> KubeApi {
        let api = KubeApi::start_with(options).await.unwrap();
        api.put_service_account("team-a", "app", &[]);
        api
    }

    /// `POST` the TokenRequest `body` for `team-a/{account}` over plain HTTP.
    async fn token_request_raw(api: &KubeApi, account: &str, body: &Value) -> (u16, Value) {
        let url = format!(
            "{}/api/v1/namespaces/team-a/serviceaccounts/{account}/token",
            api.url
        );
        let response = crate::client_trusting(Some(&api.ca_pem))
            .unwrap()
            .post(url)
            .bearer_auth(DEFAULT_TOKEN)
            .json(body)
            .send()
            .await
            .unwrap();
        (
            response.status().as_u16(),
            response.json().await.unwrap_or(Value::Null),
        )
    }

    async fn get_raw(api: &KubeApi, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = crate::client_trusting(Some(&api.ca_pem))
            .unwrap()
            .get(format!("{}{path}", api.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    async fn post_raw(api: &KubeApi, path: &str) -> (u16, Value) {
        let response = crate::client_trusting(Some(&api.ca_pem))
            .unwrap()
            .post(format!("{}{path}", api.url))
            .bearer_auth(DEFAULT_TOKEN)
            .send()
            .await
            .unwrap();
        (
            response.status().as_u16(),
            response.json().await.unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn a_projected_token_has_the_header_and_claims_of_the_api_servers() {
        let api = cluster(StandinOptions::default()).await;
        let sa_uid = lock(&api.inner.objects)[&(
            "serviceaccounts".to_owned(),
            "team-a".to_owned(),
            "app".to_owned(),
        )]["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_owned();

        let token = api
            .issue_token("team-a", "app", "web-1", POD_UID, "iam-broker", 3600)
            .await
            .unwrap();

        let jws = decode(&token);
        assert_eq!(
            jws.header,
            json!({ "alg": "RS256", "kid": api.signing_key_id().unwrap() })
        );
        let claims = jws.claims.as_object().unwrap();
        let names: Vec<&str> = claims.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "aud",
                "exp",
                "iat",
                "iss",
                "jti",
                "kubernetes.io",
                "nbf",
                "sub"
            ]
        );
        assert_eq!(claims["aud"], json!(["iam-broker"]));
        assert_eq!(claims["iss"], json!(DEFAULT_ISSUER));
        assert_eq!(claims["sub"], json!("system:serviceaccount:team-a:app"));
        let iat = claims["iat"].as_i64().unwrap();
        assert!((iat - now()).abs() <= 5);
        assert_eq!(claims["nbf"].as_i64(), Some(iat));
        assert_eq!(claims["exp"].as_i64(), Some(iat + 3600));
        let jti = claims["jti"].as_str().unwrap();
        let groups: Vec<usize> = jti.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{jti} is a UUID");
        assert_eq!(
            claims["kubernetes.io"],
            json!({
                "namespace": "team-a",
                "serviceaccount": { "name": "app", "uid": sa_uid },
                "pod": { "name": "web-1", "uid": POD_UID },
            })
        );
        assert!(verifies(&api.jwks().unwrap(), &token));
        let other = api
            .issue_token("team-a", "app", "web-1", POD_UID, "iam-broker", 3600)
            .await
            .unwrap();
        assert_ne!(decode(&other).claims["jti"], claims["jti"]);
    }

    #[tokio::test]
    async fn the_jwks_key_verifies_and_its_kid_is_the_sha256_of_its_spki() {
        for algorithm in [SigningAlgorithm::Rs256, SigningAlgorithm::Es256] {
            let api = cluster(StandinOptions::default().algorithm(algorithm)).await;
            let token = api
                .issue_token("team-a", "app", "web-1", POD_UID, "iam-broker", 3600)
                .await
                .unwrap();

            let jwks = api.jwks().unwrap();
            let keys = jwks["keys"].as_array().unwrap();
            assert_eq!(keys.len(), 1);
            let key = &keys[0];
            assert_eq!(key["use"], "sig");
            assert_eq!(key["alg"], algorithm.name());
            assert_eq!(decode(&token).header["alg"], algorithm.name());
            assert_eq!(
                key["kid"],
                URL_SAFE_NO_PAD.encode(Sha256::digest(spki(key)))
            );
            assert!(verifies(&jwks, &token), "{algorithm} verifies");
            let mut tampered = decode(&token).claims;
            tampered["sub"] = json!("system:serviceaccount:team-a:admin");
            let forged = format!(
                "{}.{}.{}",
                token.split('.').next().unwrap(),
                URL_SAFE_NO_PAD.encode(tampered.to_string()),
                token.split('.').nth(2).unwrap()
            );
            assert!(!verifies(&jwks, &forged), "{algorithm} rejects a forgery");
        }
    }

    #[tokio::test]
    async fn es256_keys_are_p256_points() {
        let api = cluster(StandinOptions::default().algorithm(SigningAlgorithm::Es256)).await;
        let jwks = api.jwks().unwrap();
        let key = &jwks["keys"][0];
        assert_eq!(key["kty"], "EC");
        assert_eq!(key["crv"], "P-256");
        assert_eq!(b64(&key["x"]).len(), 32);
        assert_eq!(b64(&key["y"]).len(), 32);
        let token = api.sign_claims(&json!({ "sub": "x" })).unwrap();
        assert_eq!(decode(&token).signature.len(), 64, "r || s, not DER");
        assert!(verifies(&jwks, &token));
    }

    #[tokio::test]
    async fn the_answer_is_the_token_request_with_its_status() {
        let api = cluster(StandinOptions::default().issuer("https://issuer.example")).await;
        api.put_pod("team-a", "web-1", POD_UID, "app");

        // GIVEN a request naming no audience and no lifetime
        let (code, answer) = token_request_raw(
            &api,
            "app",
            &json!({ "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": { "boundObjectRef": { "kind": "Pod", "apiVersion": "v1",
                    "name": "web-1", "uid": POD_UID } } }),
        )
        .await;

        // THEN the API server's audience and an hour
        assert_eq!(code, 201, "{answer}");
        assert_eq!(answer["kind"], "TokenRequest");
        assert_eq!(answer["apiVersion"], "authentication.k8s.io/v1");
        assert_eq!(
            answer["spec"]["audiences"],
            json!(["https://issuer.example"])
        );
        assert_eq!(answer["spec"]["expirationSeconds"], 3600);
        let claims = decode(answer["status"]["token"].as_str().unwrap()).claims;
        assert_eq!(claims["aud"], json!(["https://issuer.example"]));
        assert_eq!(claims["iss"], "https://issuer.example");
        let exp = claims["exp"].as_i64().unwrap();
        assert_eq!(
            answer["status"]["expirationTimestamp"],
            json!(rfc3339(exp)),
            "RFC 3339, as the token's exp"
        );
        assert!(
            answer["status"]["expirationTimestamp"]
                .as_str()
                .unwrap()
                .ends_with('Z')
        );
    }

    #[tokio::test]
    async fn a_token_bound_to_nothing_or_to_a_secret_says_so() {
        let api = cluster(StandinOptions::default()).await;
        api.put(
            "secrets",
            "team-a",
            "app-token",
            json!({ "apiVersion": "v1", "kind": "Secret", "metadata": {} }),
        );

        let (code, unbound) =
            token_request_raw(&api, "app", &json!({ "spec": { "audiences": ["x"] } })).await;
        assert_eq!(code, 201, "{unbound}");
        let claims = decode(unbound["status"]["token"].as_str().unwrap()).claims;
        assert!(claims["kubernetes.io"].get("pod").is_none());

        let (code, bound) = token_request_raw(
            &api,
            "app",
            &json!({ "spec": { "audiences": ["x"], "boundObjectRef":
                { "kind": "Secret", "apiVersion": "v1", "name": "app-token" } } }),
        )
        .await;
        assert_eq!(code, 201, "{bound}");
        let claims = decode(bound["status"]["token"].as_str().unwrap()).claims;
        assert_eq!(claims["kubernetes.io"]["secret"]["name"], "app-token");
        assert!(claims["kubernetes.io"].get("pod").is_none());
    }

    #[tokio::test]
    async fn a_lifetime_under_ten_minutes_is_invalid() {
        let api = cluster(StandinOptions::default()).await;

        let error = api
            .issue_token("team-a", "app", "web-1", POD_UID, "iam-broker", 599)
            .await
            .unwrap_err();

        let Some(kube::Error::Api(status)) = error.downcast_ref::<kube::Error>() else {
            panic!("not an API error: {error:#}");
        };
        assert_eq!(status.code, 422);
        assert_eq!(status.reason, "Invalid");
        assert!(
            status
                .message
                .contains("spec.expirationSeconds: Invalid value: 599: may not specify a duration less than 10 minutes"),
            "{}",
            status.message
        );
        let (code, body) = token_request_raw(
            &api,
            "app",
            &json!({ "spec": { "expirationSeconds": 599 } }),
        )
        .await;
        assert_eq!((code, body["kind"].as_str()), (422, Some("Status")));
        assert_eq!(
            body["details"]["causes"][0]["field"],
            "spec.expirationSeconds"
        );
        assert!(
            api.issue_token("team-a", "app", "web-1", POD_UID, "iam-broker", 600)
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn an_unknown_service_account_is_not_found() {
        let api = cluster(StandinOptions::default()).await;

        let (code, body) = token_request_raw(&api, "ghost", &json!({ "spec": {} })).await;

        assert_eq!(code, 404);
        assert_eq!(body["kind"], "Status");
        assert_eq!(body["reason"], "NotFound");
        assert_eq!(body["message"], "serviceaccounts \"ghost\" not found");
    }

    #[tokio::test]
    async fn the_bound_pod_must_be_the_one_on_record() {
        let api = cluster(StandinOptions::default()).await;
        api.put_service_account("team-a", "other", &[]);
        api.put_pod("team-a", "web-1", POD_UID, "app");
        let bound = |name: &str, uid: &str| {
            json!({ "spec": { "audiences": ["iam-broker"], "boundObjectRef":
                { "kind": "Pod", "apiVersion": "v1", "name": name, "uid": uid } } })
        };

        let (recreated, body) =
            token_request_raw(&api, "app", &bound("web-1", "another-uid")).await;
        assert_eq!(
            (recreated, body["reason"].as_str()),
            (409, Some("Conflict"))
        );

        let (other_account, body) =
            token_request_raw(&api, "other", &bound("web-1", POD_UID)).await;
        assert_eq!(
            (other_account, body["reason"].as_str()),
            (400, Some("BadRequest"))
        );

        let (gone, body) = token_request_raw(&api, "app", &bound("web-2", POD_UID)).await;
        assert_eq!(
            (gone, body["message"].as_str()),
            (404, Some("pods \"web-2\" not found"))
        );

        let (node, body) = token_request_raw(
            &api,
            "app",
            &json!({ "spec": { "boundObjectRef": { "kind": "Deployment", "apiVersion": "apps/v1", "name": "web" } } }),
        )
        .await;
        assert_eq!(node, 400);
        assert_eq!(
            body["message"],
            "cannot bind token to object of type apps/v1, Kind=Deployment"
        );
    }

    #[tokio::test]
    async fn kubelets_default_token_is_extended_with_warnafter() {
        // GIVEN kubelet's kube-api-access request: 3607 s, the API server's own audience
        let api = cluster(StandinOptions::default()).await;
        api.put_pod("team-a", "web-1", POD_UID, "app");
        let (code, answer) = token_request_raw(
            &api,
            "app",
            &json!({ "spec": { "expirationSeconds": 3607, "boundObjectRef":
                { "kind": "Pod", "apiVersion": "v1", "name": "web-1", "uid": POD_UID } } }),
        )
        .await;
        assert_eq!(code, 201, "{answer}");

        // THEN the token lives a year and warns after the requested hour
        let claims = decode(answer["status"]["token"].as_str().unwrap()).claims;
        let iat = claims["iat"].as_i64().unwrap();
        assert_eq!(
            claims["exp"].as_i64(),
            Some(iat + EXPIRATION_EXTENSION_SECONDS)
        );
        assert_eq!(
            claims["kubernetes.io"]["warnafter"].as_i64(),
            Some(iat + 3607)
        );
        assert_eq!(
            answer["status"]["expirationTimestamp"],
            json!(rfc3339(iat + 3607))
        );

        // AND a token for another audience is not extended
        let token = api
            .issue_token("team-a", "app", "web-1", POD_UID, "iam-broker", 3607)
            .await
            .unwrap();
        let claims = decode(&token).claims;
        assert_eq!(
            claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
            3607
        );
        assert!(claims["kubernetes.io"].get("warnafter").is_none());
    }

    #[tokio::test]
    async fn the_token_route_goes_through_faults_and_rbac() {
        let api = cluster(StandinOptions::default()).await;

        api.inject(Fault::status(Method::POST, "/serviceaccounts/app/token", 503).times(1));
        let (code, _) = token_request_raw(&api, "app", &json!({ "spec": {} })).await;
        assert_eq!(code, 503);
        let (code, _) = token_request_raw(&api, "app", &json!({ "spec": {} })).await;
        assert_eq!(code, 201);

        api.deny("create", "serviceaccounts/token");
        let (code, body) = token_request_raw(&api, "app", &json!({ "spec": {} })).await;
        assert_eq!((code, body["reason"].as_str()), (403, Some("Forbidden")));
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .starts_with("serviceaccounts \"app\" is forbidden: User ")
        );
        assert_eq!(api.count(&Method::POST, "/serviceaccounts/app/token"), 3);
    }

    #[tokio::test]
    async fn access_reviews_know_subresources_and_paths() {
        let api = cluster(StandinOptions::default()).await;
        api.deny("create", "serviceaccounts/token");
        api.deny("get", JWKS_PATH);
        let review = |attributes: Value| {
            let api = &api;
            async move {
                let response = crate::client_trusting(Some(&api.ca_pem))
                    .unwrap()
                    .post(format!(
                        "{}/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                        api.url
                    ))
                    .bearer_auth(DEFAULT_TOKEN)
                    .json(&json!({ "spec": attributes }))
                    .send()
                    .await
                    .unwrap();
                response.json::<Value>().await.unwrap()["status"]["allowed"].as_bool()
            }
        };

        let token = review(json!({ "resourceAttributes":
            { "verb": "create", "resource": "serviceaccounts", "subresource": "token" } }));
        assert_eq!(token.await, Some(false));
        let accounts = review(json!({ "resourceAttributes":
            { "verb": "create", "resource": "serviceaccounts" } }));
        assert_eq!(accounts.await, Some(true));
        let jwks = review(json!({ "nonResourceAttributes": { "verb": "get", "path": JWKS_PATH } }));
        assert_eq!(jwks.await, Some(false));
        assert_eq!(
            get_raw(&api, JWKS_PATH, Some(DEFAULT_TOKEN)).await.status(),
            403
        );
    }

    #[tokio::test]
    async fn discovery_serves_the_issuer_and_every_trusted_key() {
        let api = cluster(StandinOptions::default().issuer("https://oidc.example/cluster-1")).await;
        api.rotate_signing_key().unwrap();

        let response = get_raw(&api, OPENID_CONFIGURATION_PATH, Some(DEFAULT_TOKEN)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()[header::CACHE_CONTROL],
            "public, max-age=3600"
        );
        let configuration: Value = response.json().await.unwrap();
        assert_eq!(
            configuration,
            json!({
                "issuer": "https://oidc.example/cluster-1",
                "jwks_uri": "https://oidc.example/cluster-1/openid/v1/jwks",
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            })
        );

        let response = get_raw(&api, JWKS_PATH, Some(DEFAULT_TOKEN)).await;
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/jwk-set+json"
        );
        let jwks: Value = response.json().await.unwrap();
        assert_eq!(jwks, api.jwks().unwrap());
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
        let mut key_names: Vec<&str> = jwks["keys"][0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        key_names.sort_unstable();
        assert_eq!(key_names, ["alg", "e", "kid", "kty", "n", "use"]);

        assert_eq!(get_raw(&api, JWKS_PATH, None).await.status(), 401);
        assert_eq!(
            get_raw(&api, OPENID_CONFIGURATION_PATH, Some("nope"))
                .await
                .status(),
            401
        );
    }

    #[tokio::test]
    async fn rotation_keeps_old_tokens_verifiable_until_the_old_keys_are_retired() {
        // GIVEN a token signed before the rotation
        let api = cluster(StandinOptions::default()).await;
        let before = api
            .issue_token("team-a", "app", "web-1", POD_UID, "iam-broker", 3600)
            .await
            .unwrap();
        let old_kid = api.signing_key_id().unwrap();

        // WHEN the key rotates
        let new_kid = api.rotate_signing_key().unwrap();

        // THEN new tokens carry the new kid, and both verify
        assert_ne!(new_kid, old_kid);
        assert_eq!(api.signing_key_id().unwrap(), new_kid);
        let after = api
            .issue_token("team-a", "app", "web-1", POD_UID, "iam-broker", 3600)
            .await
            .unwrap();
        assert_eq!(decode(&after).header["kid"], json!(new_kid));
        let jwks = api.jwks().unwrap();
        let kids: Vec<&Value> = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| &k["kid"])
            .collect();
        assert_eq!(kids, [&json!(new_kid), &json!(old_kid)]);
        assert!(verifies(&jwks, &before));
        assert!(verifies(&jwks, &after));

        // AND once the old keys are retired, only the new token verifies
        api.retire_previous_keys();
        let jwks = api.jwks().unwrap();
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
        assert!(!verifies(&jwks, &before));
        assert!(verifies(&jwks, &after));
    }

    #[tokio::test]
    async fn the_control_endpoints_rotate_and_retire() {
        let api = cluster(StandinOptions::default().algorithm(SigningAlgorithm::Es256)).await;
        let first = api.signing_key_id().unwrap();

        let (code, jwks) = post_raw(&api, ROTATE_SIGNING_KEY_PATH).await;
        assert_eq!(code, 200);
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
        assert_eq!(jwks["keys"][1]["kid"], json!(first));
        assert_ne!(api.signing_key_id().unwrap(), first);

        let (code, jwks) = post_raw(&api, RETIRE_PREVIOUS_KEYS_PATH).await;
        assert_eq!(code, 200);
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
        assert_eq!(jwks["keys"][0]["kid"], json!(api.signing_key_id().unwrap()));

        let unauthenticated = crate::client_trusting(Some(&api.ca_pem))
            .unwrap()
            .post(format!("{}{ROTATE_SIGNING_KEY_PATH}", api.url))
            .send()
            .await
            .unwrap();
        assert_eq!(unauthenticated.status(), 401);
    }

    #[tokio::test]
    async fn two_clusters_with_one_issuer_trust_different_keys() {
        let (a, b) = tokio::join!(
            cluster(StandinOptions::default()),
            cluster(StandinOptions::default())
        );
        assert_eq!(a.issuer(), b.issuer());
        assert_ne!(a.signing_key_id().unwrap(), b.signing_key_id().unwrap());
        let token = a
            .issue_token("team-a", "app", "web-1", POD_UID, "iam-broker", 3600)
            .await
            .unwrap();
        assert!(verifies(&a.jwks().unwrap(), &token));
        assert!(!verifies(&b.jwks().unwrap(), &token));
    }

    #[tokio::test]
    async fn sign_claims_signs_what_the_api_server_never_would() {
        let api = cluster(StandinOptions::default()).await;
        let expired = json!({ "aud": ["iam-broker"], "exp": now() - 60, "iss": api.issuer(),
            "sub": "system:serviceaccount:team-a:app" });

        let token = api.sign_claims(&expired).unwrap();

        let jws = decode(&token);
        assert_eq!(jws.claims, expired);
        assert_eq!(
            jws.header,
            json!({ "alg": "RS256", "kid": api.signing_key_id().unwrap() })
        );
        assert!(verifies(&api.jwks().unwrap(), &token));
    }

    #[tokio::test]
    async fn kubelets_credentials_survive_set_tokens() {
        let api = cluster(StandinOptions::default()).await;
        api.set_tokens(&[]);
        assert!(
            api.issue_token("team-a", "app", "web-1", POD_UID, "iam-broker", 3600)
                .await
                .is_ok()
        );
        let (code, _) = token_request_raw(&api, "app", &json!({ "spec": {} })).await;
        assert_eq!(code, 401);
    }

    #[test]
    fn algorithms_parse_by_their_jose_names() {
        assert_eq!(
            "RS256".parse::<SigningAlgorithm>().unwrap(),
            SigningAlgorithm::Rs256
        );
        assert_eq!(
            "ES256".parse::<SigningAlgorithm>().unwrap(),
            SigningAlgorithm::Es256
        );
        assert!("HS256".parse::<SigningAlgorithm>().is_err());
    }
}
