//! `iam-broker serve`: the shared router as a plain HTTP server, or HTTPS with `--tls-cert` /
//! `--tls-key` (in-cluster deployment, where the API server calls the webhook directly), with
//! graceful shutdown on SIGINT / SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use iam_broker_kernel::Config;
use iam_broker_router::{BodyReadTimeout, ServedOverTls, router};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// How long in-flight requests may take to finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);
/// After a failed `accept` (e.g. out of file descriptors), wait before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// The largest request head (request line and headers) hyper buffers; a longer one is answered
/// `431` by hyper itself, with an empty body, before the router runs (README "Limits"). The
/// router's own, smaller URI and header limits answer in JSON below this.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Default of `--header-read-timeout-ms`: a client must send its whole request head in this time.
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Default of `--body-read-timeout-ms`: a client must send its whole request body in this time.
pub const DEFAULT_BODY_READ_TIMEOUT_MS: u64 = 10_000;
/// Default of `--tls-handshake-timeout-ms`: a TLS handshake slower than this is dropped.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Default of `--max-connections`: connections served at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// The certificate and key of `--tls-cert` / `--tls-key`.
#[derive(Debug, Clone)]
pub struct Tls {
    /// PEM certificate chain (leaf first).
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// What one client may hold of the server, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A connection whose request head is not complete this long after the server started
    /// reading it is closed (a slow or silent client cannot hold a connection).
    pub header_read_timeout: Duration,
    /// A request body not complete this long after the handler started reading it (right after
    /// the head, and only on routes that take a body, after the webhook's path secret is
    /// checked) is answered `408` and its connection closed.
    pub body_read_timeout: Duration,
    /// A TLS handshake not finished within this is dropped.
    pub tls_handshake_timeout: Duration,
    /// Connections served at once. At the limit the server stops accepting: new clients wait in
    /// the kernel's listen backlog (they are served, late, not refused) until a connection ends,
    /// which the header-read timeout guarantees for clients that send nothing.
    pub max_connections: usize,
}

/// Serves until SIGINT or SIGTERM.
pub async fn run(
    listen: SocketAddr,
    tls: Option<Tls>,
    limits: Limits,
    metrics_listen: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let acceptor = tls.as_ref().map(tls_acceptor).transpose()?;
    let state = match metrics_listen {
        Some(_) => {
            let prometheus = Arc::new(iam_broker_router::prometheus::Prometheus::new());
            iam_broker_app::build_with_prometheus(&config, prometheus)
                .await
                .state
        }
        None => iam_broker_app::build(&config).await.state,
    };
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    if let Some(metrics_listen) = metrics_listen {
        // Plain HTTP on a port of its own (what Prometheus scrapes), with the same connection
        // limits and deadlines; it stops with the process.
        let metrics = TcpListener::bind(metrics_listen)
            .await
            .with_context(|| format!("--metrics-listen: cannot listen on {metrics_listen}"))?;
        tracing::info!(address = %metrics.local_addr()?, "metrics listening");
        let app = iam_broker_router::metrics_router(state.clone());
        tokio::spawn(serve(metrics, None, app, limits));
    }
    let address = listener.local_addr()?;
    tracing::info!(
        address = %address,
        tls = acceptor.is_some(),
        header_read_timeout_ms = u64::try_from(limits.header_read_timeout.as_millis()).unwrap_or(u64::MAX),
        body_read_timeout_ms = u64::try_from(limits.body_read_timeout.as_millis()).unwrap_or(u64::MAX),
        tls_handshake_timeout_ms = u64::try_from(limits.tls_handshake_timeout.as_millis()).unwrap_or(u64::MAX),
        max_connections = limits.max_connections,
        "listening"
    );
    let mut app = router(state).layer(axum::Extension(BodyReadTimeout(limits.body_read_timeout)));
    if acceptor.is_some() {
        app = app.layer(axum::Extension(ServedOverTls));
    }
    serve(listener, acceptor, app, limits).await;
    tracing::info!("stopped");
    Ok(())
}

/// Loads the certificate chain and key into a TLS acceptor (HTTP/1.1 only, TLS 1.2 and 1.3).
pub fn tls_acceptor(tls: &Tls) -> anyhow::Result<TlsAcceptor> {
    let certs = read_certs(&tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).with_context(|| {
        format!(
            "--tls-key {}: no PEM private key could be read",
            tls.key.display()
        )
    })?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("--tls-cert and --tls-key do not form a usable certificate")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("--tls-cert {}: cannot read", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("--tls-cert {}: not PEM certificates", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "--tls-cert {}: no certificate in the file",
        path.display()
    );
    Ok(certs)
}

/// The one connection loop of HTTP and HTTPS: a slot from the connection limit, then accept, then
/// (HTTPS) the handshake under its timeout, then hyper's HTTP/1 with the header-read timeout.
async fn serve(listener: TcpListener, acceptor: Option<TlsAcceptor>, app: Router, limits: Limits) {
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let stop = shutdown();
    tokio::pin!(stop);
    loop {
        // Take a slot before accepting: at the limit, new clients wait in the backlog.
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut stop => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "could not set TCP_NODELAY");
        }
        let connection = Connection {
            builder: builder.clone(),
            service: TowerToHyperService::new(app.clone()),
            watcher: graceful.watcher(),
            peer,
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                None => connection.serve(stream).await,
                Some(acceptor) => connection.serve_tls(stream, acceptor, limits).await,
            }
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN) => tracing::warn!("connections still open after the drain period"),
    }
}

/// One accepted connection and what it is served with.
struct Connection {
    builder: http1::Builder,
    service: TowerToHyperService<Router>,
    watcher: Watcher,
    peer: SocketAddr,
}

impl Connection {
    async fn serve_tls(self, stream: TcpStream, acceptor: TlsAcceptor, limits: Limits) {
        let peer = self.peer;
        match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => self.serve(tls).await,
            Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
        }
    }

    async fn serve<S>(self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let connection = self
            .builder
            .serve_connection(TokioIo::new(stream), self.service);
        if let Err(error) = self.watcher.watch(connection).await {
            tracing::debug!(peer = %self.peer, %error, "connection ended with an error");
        }
    }
}

async fn shutdown() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
