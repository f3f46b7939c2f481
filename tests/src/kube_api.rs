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
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tower::ServiceExt as _;

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

#[derive(Default)]
struct Inner {
    objects: Mutex<BTreeMap<(String, String, String), Value>>,
    tokens: Mutex<BTreeSet<String>>,
    faults: Mutex<Vec<Fault>>,
    log: Mutex<Vec<(Method, String)>>,
    denied: Mutex<BTreeSet<(String, String)>>,
    resource_version: AtomicU64,
    /// Requests held by a [`WireFault::LandsLate`], not yet processed.
    in_flight: AtomicUsize,
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

impl KubeApi {
    /// Starts the stand-in, accepting [`DEFAULT_TOKEN`].
    pub async fn start() -> anyhow::Result<Self> {
        let (ca_pem, acceptor) = tls()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address: SocketAddr = listener.local_addr()?;
        let inner = Arc::new(Inner::default());
        lock(&inner.tokens).insert(DEFAULT_TOKEN.to_owned());
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
            .route("/api/v1/{resource}", get(list_all))
            .route(
                "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                post(access_review),
            )
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
        iam_broker_core::manifest::kubeconfig(&self.url, Some(ca_pem), token, "stand-in")
            .unwrap_or_default()
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

    /// Stores an object as is (metadata completed like a create would).
    pub fn put(&self, resource: &str, namespace: &str, name: &str, mut object: Value) {
        stamp(&self.inner, &mut object, namespace, name);
        lock(&self.inner.objects).insert(
            (resource.to_owned(), namespace.to_owned(), name.to_owned()),
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
    token.is_some_and(|t| lock(&inner.tokens).contains(t))
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
    let attributes = &review["spec"]["resourceAttributes"];
    let verb = attributes["verb"].as_str().unwrap_or_default().to_owned();
    let resource = attributes["resource"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let allowed = !lock(&inner.denied).contains(&(verb, resource));
    review["status"] = json!({ "allowed": allowed });
    (StatusCode::CREATED, axum::Json(review)).into_response()
}
