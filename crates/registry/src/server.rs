//! The HTTP(S) server loop: takes a bound listener and a shutdown signal, serves HTTP/1.1 and
//! HTTP/2, optional TLS (handshakes happen off the accept loop, with a deadline), and drains
//! in-flight requests on shutdown.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::{fastpath, Registry};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Deadline for a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for a client to send request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an idle keep-alive connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long shutdown waits for in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long, at shutdown, open connections are still read from, each request answered with
/// `Connection: close`, before the idle ones are closed. A client that sends on a keep-alive
/// connection at the moment the server closes it sees an error it cannot tell from a lost
/// request; this way a busy client learns to reconnect from an answer instead.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// PEM files of the registry's TLS certificate chain and key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Loads the files into a rustls acceptor (HTTP/2 and HTTP/1.1 via ALPN).
    pub fn acceptor(&self) -> std::io::Result<TlsAcceptor> {
        use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| std::io::Error::other(format!("{}: {e}", self.cert.display())))?;
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| std::io::Error::other(format!("{}: {e}", self.key.display())))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(std::io::Error::other)?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(cfg)))
    }
}

/// Serves the registry on `listener` until `shutdown` completes, then drains.
pub async fn serve(
    reg: Arc<Registry>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(1 << 20);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(64 * 1024);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    // Fast-path connections are tracked here; hyper connections by `graceful`. `closing`: answer
    // with `Connection: close`; `stop`: close idle connections.
    let closing = CancellationToken::new();
    let stop = CancellationToken::new();
    let fast = TaskTracker::new();
    tokio::pin!(shutdown);
    info!(addr = %listener.local_addr()?, tls = tls.is_some(), "registry listening");
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let reg = reg.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let (stop, closing) = (stop.clone(), closing.clone());
        fast.spawn(async move {
            let mut stream = stream;
            // a connection of this node's own tunnel agent: the relay's visitor is the client
            let peer = if reg.proxied.take(&peer) {
                match tokio::time::timeout(HEADER_READ_TIMEOUT, raftyard_tunnel::proxy::read(&mut stream)).await {
                    Ok(Ok(visitor)) => visitor.map(|v| std::net::SocketAddr::new(v.ip(), peer.port())).unwrap_or(peer),
                    Ok(Err(e)) => return debug!(%peer, error = %e, "bad PROXY header from the agent"),
                    Err(_) => return debug!(%peer, "no PROXY header from the agent in time"),
                }
            } else {
                peer
            };
            let svc = {
                let (reg, closing) = (reg.clone(), closing.clone());
                service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(crate::ClientAddr(peer.ip()));
                    let (reg, closing) = (reg.clone(), closing.clone());
                    let http1 = req.version() <= http::Version::HTTP_11;
                    async move {
                        let mut resp = crate::handle(reg, req).await;
                        if http1 && closing.is_cancelled() {
                            resp.headers_mut()
                                .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                })
            };
            let res = match tls {
                None => match fastpath::serve(&reg, stream, peer, HEADER_READ_TIMEOUT, IDLE_TIMEOUT, &closing, &stop)
                    .await
                {
                    fastpath::Outcome::Done => return,
                    fastpath::Outcome::HandOff(io) => {
                        watcher.watch(builder.serve_connection(TokioIo::new(*io), svc).into_owned()).await
                    }
                },
                Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => watcher.watch(builder.serve_connection(TokioIo::new(s), svc).into_owned()).await,
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
            };
            if let Err(e) = res {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    // Close the socket now: new connections are refused while in-flight requests drain.
    drop(listener);
    info!("registry stops accepting; open connections are answered with Connection: close");
    closing.cancel();
    let grace_end = tokio::time::Instant::now() + DRAIN_GRACE;
    while tokio::time::Instant::now() < grace_end && !fast.is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    info!("draining in-flight requests");
    stop.cancel();
    fast.close();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        tokio::join!(graceful.shutdown(), fast.wait());
    })
    .await;
    if drained.is_err() {
        warn!("drain timed out; closing remaining connections");
    }
    Ok(())
}

/// Serves `GET /metrics` only, without authentication, on a listener of its own (for a
/// Prometheus on a private network while the registry port has auth on), until `shutdown`.
pub async fn serve_metrics(reg: Arc<Registry>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    info!(addr = ?listener.local_addr().ok(), "metrics listening");
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let reg = reg.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let reg = reg.clone();
                async move {
                    let r = if req.uri().path() == "/metrics" && req.method() == http::Method::GET {
                        crate::body::materialize(
                            reg.metrics.render(&reg, req.headers().get(http::header::ACCEPT)).await,
                        )
                    } else {
                        crate::body::materialize(crate::error::RegistryError::NotFound.into_response(false))
                    };
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(IDLE_TIMEOUT, conn).await;
        });
    }
}
