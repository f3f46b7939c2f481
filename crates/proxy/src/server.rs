//! The loopback HTTP/1 server: hyper directly, one task per connection, graceful shutdown.
//!
//! Routes: `GET /healthz` for probes; `GET` on any other path is a credentials request for the
//! caller's `Authorization`; any other method is a 405.

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
use tokio::net::TcpListener;
use tokio::sync::watch;
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
/// A client must send its request head within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
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
    stop: watch::Sender<()>,
    task: JoinHandle<()>,
    cache: Arc<Cache>,
}

impl ProxyHandle {
    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Cache counts (entries, broker calls under way).
    pub fn stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Stops accepting connections and waits (up to a few seconds) for open ones to finish.
    pub async fn shutdown(self) {
        let Self { stop, task, .. } = self;
        drop(stop);
        if let Err(error) = task.await {
            warn!(%error, "the accept loop ended abnormally");
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
    let proxy = Arc::new(Proxy {
        cache: Arc::clone(&cache),
        clock,
    });
    let (stop, stopped) = watch::channel(());
    let task = tokio::spawn(accept_loop(listener, proxy, stopped));
    info!(%local_addr, broker_url = %config.broker_url, "iam-broker-proxy listening");
    Ok(ProxyHandle {
        local_addr,
        stop,
        task,
        cache,
    })
}

/// What every connection shares.
struct Proxy {
    cache: Arc<Cache>,
    clock: Arc<dyn Clock>,
}

impl Proxy {
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let (response, source, token_hash) = self.route(&request).await;
        info!(
            method = %request.method(),
            path = request.uri().path(),
            status = response.status().as_u16(),
            source,
            token_hash = token_hash.as_deref(),
            latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "request"
        );
        response
    }

    async fn route(
        &self,
        request: &Request<Incoming>,
    ) -> (Response<Full<Bytes>>, &'static str, Option<String>) {
        let now = || self.clock.now();
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

async fn accept_loop(listener: TcpListener, proxy: Arc<Proxy>, mut stopped: watch::Receiver<()>) {
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
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
