//! The loopback HTTP/1 server: hyper directly, one task per connection, graceful shutdown.
//!
//! Routes: `GET /healthz` for probes; `GET` on any other path is a credentials request for the
//! caller's `Authorization`; any other method is a 405. Request bodies are never read.
//!
//! Limits (README "Limits"): the request head must arrive within the header-read timeout; at
//! most `MAX_CONNECTIONS` connections are served at once (more wait in the listen backlog);
//! a URI over [`MAX_URI_BYTES`] is a JSON `414`, headers over [`MAX_HEADER_BYTES`] a JSON `431`;
//! a head beyond hyper's buffer ([`MAX_HEAD_BYTES`]) gets hyper's own `431` with an empty body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use iam_broker_kernel::text::clip;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::answer::{self, ProxyError};
use crate::broker::BrokerClient;
use crate::cache::{Cache, CacheStats, Source, TokenKey};
use crate::clock::Clock;
use crate::config::ProxyConfig;
use crate::policy::Policy;

/// The liveness route.
pub const HEALTH_PATH: &str = "/healthz";
/// The largest request head hyper buffers; beyond it hyper answers `431` itself, empty-bodied.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The longest path and query answered; a longer one is a JSON `414`.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// The most header bytes (names, values, separators) answered; more is a JSON `431`.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// The most bytes of a request path a log line carries (the path is the client's to choose).
const MAX_LOGGED_PATH: usize = 128;
/// The most bytes of a request method a log line carries.
const MAX_LOGGED_METHOD: usize = 16;
/// On shutdown, open connections get this long to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed `accept` (e.g. out of file descriptors), wait before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listener has no local address.
    #[error("reading the listener's address")]
    LocalAddr(#[source] std::io::Error),
    /// The TLS client configuration was refused.
    #[error("setting up TLS for the broker client")]
    Tls(#[source] rustls::Error),
}

/// A running proxy. Dropping it stops accepting connections; [`ProxyHandle::shutdown`] also
/// waits for open connections to finish.
pub struct ProxyHandle {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    stop: watch::Sender<()>,
    task: JoinHandle<()>,
    metrics_task: Option<JoinHandle<()>>,
    cache: Arc<Cache>,
}

impl ProxyHandle {
    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address metrics are served on, when they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Cache counts (entries, broker calls under way).
    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Stops accepting connections and waits (up to a few seconds) for open ones to finish.
    pub async fn shutdown(self) {
        let Self {
            stop,
            task,
            metrics_task,
            ..
        } = self;
        drop(stop);
        for task in std::iter::once(task).chain(metrics_task) {
            if let Err(error) = task.await {
                warn!(%error, "the accept loop ended abnormally");
            }
        }
    }
}

/// Starts the proxy on `listener` (already bound; `config.listen_addr` is not used here) and
/// returns at once. Must be called within a Tokio runtime; the server runs as spawned tasks.
/// `clock` is the wall clock the cache policy reads (tests pass a manual one).
pub fn serve(
    listener: TcpListener,
    config: ProxyConfig,
    clock: Arc<dyn Clock>,
) -> Result<ProxyHandle, ServeError> {
    serve_with_metrics(listener, None, config, clock)
}

/// [`serve`], with Prometheus metrics kept and served on `metrics` (bound from
/// `config.metrics_addr`) when it is given.
pub fn serve_with_metrics(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    config: ProxyConfig,
    clock: Arc<dyn Clock>,
) -> Result<ProxyHandle, ServeError> {
    let local_addr = listener.local_addr().map_err(ServeError::LocalAddr)?;
    let broker = BrokerClient::new(
        config.broker_url.clone(),
        config.broker_timeout,
        &config.broker_ca,
    )
    .map_err(ServeError::Tls)?;
    let policy = Policy {
        min_validity: config.min_validity,
        refresh_ahead: config.refresh_ahead,
    };
    let cache = Arc::new(Cache::new(
        policy,
        config.cache_max_entries,
        Arc::clone(&clock),
        broker,
    ));
    let kept = metrics
        .as_ref()
        .map(|_| Arc::new(crate::metrics::ProxyMetrics::new()));
    let proxy = Arc::new(Proxy {
        cache: Arc::clone(&cache),
        clock: Arc::clone(&clock),
        metrics: kept.clone(),
        serves: Serves::Credentials,
    });
    let (stop, stopped) = watch::channel(());
    let limits = Limits {
        header_read_timeout: config.header_read_timeout,
        max_connections: config.max_connections,
    };
    let (metrics_addr, metrics_task) = match metrics {
        Some(listener) => {
            let address = listener.local_addr().map_err(ServeError::LocalAddr)?;
            let scraped = Arc::new(Proxy {
                cache: Arc::clone(&cache),
                clock,
                metrics: kept,
                serves: Serves::Metrics,
            });
            info!(metrics_addr = %address, "metrics listening");
            let task = tokio::spawn(accept_loop(listener, scraped, limits, stopped.clone()));
            (Some(address), Some(task))
        }
        None => (None, None),
    };
    let task = tokio::spawn(accept_loop(listener, proxy, limits, stopped));
    info!(%local_addr, broker_url = %config.broker_url, "iam-broker-proxy listening");
    Ok(ProxyHandle {
        local_addr,
        metrics_addr,
        stop,
        task,
        metrics_task,
        cache,
    })
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Serves {
    /// Credentials (and `/healthz`): the loopback port SDKs call.
    Credentials,
    /// `GET /metrics` only: the metrics port Prometheus scrapes.
    Metrics,
}

/// What every connection shares.
struct Proxy {
    cache: Arc<Cache>,
    clock: Arc<dyn Clock>,
    metrics: Option<Arc<crate::metrics::ProxyMetrics>>,
    serves: Serves,
}

impl Proxy {
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if self.serves == Serves::Metrics {
            return self.metrics(&request);
        }
        let started = Instant::now();
        let (response, source, token_hash) = self.route(&request).await;
        if let Some(metrics) = &self.metrics {
            metrics.request(source, response.status().as_u16(), started.elapsed());
        }
        let path = clip(request.uri().path(), MAX_LOGGED_PATH);
        // An extension method is any token the client likes.
        let method = clip(request.method().as_str(), MAX_LOGGED_METHOD);
        let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        // A cache hit or a probe is the steady state: at debug, so a busy pod's log stays small.
        // Misses, refreshes and errors are logged by the cache at info or warn.
        macro_rules! request_line {
            ($level:ident) => {
                $level!(
                    method = %method,
                    path = %path,
                    status = response.status().as_u16(),
                    source,
                    token_hash = token_hash.as_deref(),
                    latency_us,
                    "request"
                )
            };
        }
        if quiet(source, response.status()) {
            request_line!(debug);
        } else {
            request_line!(info);
        }
        response
    }

    /// The metrics listener's one route.
    fn metrics(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let now = self.clock.now();
        let text = match (&self.metrics, request.method(), request.uri().path()) {
            (Some(metrics), &Method::GET, "/metrics") => metrics.encode(self.cache.stats()).ok(),
            _ => None,
        };
        match text {
            Some(text) => {
                let mut response = Response::new(Full::new(Bytes::from(text)));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
                );
                response
            }
            None => ProxyError::not_found().into_answer().into_response(now),
        }
    }

    async fn route(
        &self,
        request: &Request<Incoming>,
    ) -> (Response<Full<Bytes>>, &'static str, Option<String>) {
        let now = || self.clock.now();
        if let Some(error) = over_limits(request) {
            return (error.into_answer().into_response(now()), "proxy", None);
        }
        if request.method() != Method::GET {
            let answer = ProxyError::method_not_allowed().into_answer();
            return (answer.into_response(now()), "proxy", None);
        }
        if request.uri().path() == HEALTH_PATH {
            return (answer::health(), "proxy", None);
        }
        let authorization = request
            .headers()
            .get(AUTHORIZATION)
            .filter(|value| !value.as_bytes().iter().all(u8::is_ascii_whitespace));
        let Some(authorization) = authorization else {
            let answer = ProxyError::missing_authorization().into_answer();
            return (answer.into_response(now()), "proxy", None);
        };
        let key = TokenKey::of(authorization);
        let (answer, source) = self.cache.credentials(authorization.clone(), key).await;
        let source = match (source, answer.status().is_success()) {
            (Source::Cache, _) | (Source::Broker, true) => source.as_str(),
            (Source::Broker, false) => "broker-error",
        };
        (answer.into_response(now()), source, Some(key.short()))
    }
}

/// Whether a request's line is a debug one: a successful cache hit or a probe.
fn quiet(source: &str, status: http::StatusCode) -> bool {
    status.is_success() && (source == "cache" || source == "proxy")
}

/// A URI or headers beyond the limits, as the JSON error that answers them.
fn over_limits(request: &Request<Incoming>) -> Option<ProxyError> {
    let uri_bytes = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if uri_bytes > MAX_URI_BYTES {
        return Some(ProxyError::uri_too_long(MAX_URI_BYTES));
    }
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    (header_bytes > MAX_HEADER_BYTES).then(|| ProxyError::headers_too_large(MAX_HEADER_BYTES))
}

/// How long a client may take with its request head, and how many connections are served.
#[derive(Debug, Clone, Copy)]
struct Limits {
    header_read_timeout: Duration,
    max_connections: usize,
}

async fn accept_loop(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limits: Limits,
    mut stopped: watch::Receiver<()>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        // Take a slot before accepting: at the limit, new clients wait in the listen backlog
        // (served late, not refused) until a connection ends.
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = stopped.changed() => break,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    if let Err(error) = stream.set_nodelay(true) {
                        debug!(%error, "could not set TCP_NODELAY");
                    }
                    let proxy = Arc::clone(&proxy);
                    let service = service_fn(move |request| {
                        let proxy = Arc::clone(&proxy);
                        async move { Ok::<_, Infallible>(proxy.handle(request).await) }
                    });
                    let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                    tokio::spawn(async move {
                        if let Err(error) = connection.await {
                            debug!(%error, "connection ended with an error");
                        }
                        drop(slot);
                    });
                }
                Err(error) => {
                    warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("connections still open after the drain timeout");
    }
}
