//! Connections to other nodes: one lazily connected tonic channel per peer address, shared by
//! every service client.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tonic::body::BoxBody;
use tonic::transport::{Channel, Endpoint};

use crate::tls::{host_of, PeerTls};

/// A connection to a peer whose calls carry the caller's trace context (W3C `traceparent`)
/// and whose failures are counted.
pub type PeerChannel = tonic::service::interceptor::InterceptedService<Counted, raftyard_telemetry::TraceContext>;

/// Failed peer calls, by peer and method (`/metrics`: `raftyard_peer_rpc_errors_total`).
pub type RpcErrors = Family<RpcLabels, Counter>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub peer: String,
    pub rpc: String,
}

/// A channel that counts the calls that fail: the transport's errors, answers whose status
/// is not OK in the response's headers (a call refused before any message, as a tonic
/// handler's error is), and streams that end in an error (a status in the trailers, or a
/// broken body).
#[derive(Clone)]
pub struct Counted {
    inner: Channel,
    peer: String,
    errors: RpcErrors,
}

impl tower_service::Service<http::Request<BoxBody>> for Counted {
    type Response = http::Response<BoxBody>;
    type Error = tonic::transport::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<BoxBody>) -> Self::Future {
        let rpc = req.uri().path().to_string();
        let (peer, errors) = (self.peer.clone(), self.errors.clone());
        let answer = self.inner.call(req);
        Box::pin(async move {
            let r = answer.await;
            let labels = RpcLabels { peer, rpc };
            match r {
                Ok(resp) if resp.headers().get("grpc-status").is_none_or(|s| s.as_bytes() == b"0") => {
                    Ok(resp.map(|inner| BoxBody::new(CountedBody { inner, count: Some((errors, labels)) })))
                }
                r => {
                    errors.get_or_create(&labels).inc();
                    r
                }
            }
        })
    }
}

/// A response body that counts its call as failed once if the stream ends in an error, or
/// without the trailers that carry gRPC's status (the headers had none either).
struct CountedBody {
    inner: BoxBody,
    count: Option<(RpcErrors, RpcLabels)>,
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        let failed = match &r {
            Poll::Ready(Some(Err(_))) => true,
            Poll::Ready(Some(Ok(frame))) => match frame.trailers_ref() {
                Some(t) => {
                    let ok = t.get("grpc-status").is_some_and(|s| s.as_bytes() == b"0");
                    if ok {
                        self.count = None; // a status was given: nothing more to count
                    }
                    !ok
                }
                None => false,
            },
            Poll::Ready(None) => true, // ended without a status
            Poll::Pending => false,
        };
        if failed {
            if let Some((errors, labels)) = self.count.take() {
                errors.get_or_create(&labels).inc();
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Largest peer message (a Raft append or a snapshot chunk). Blob bytes travel in much smaller
/// chunks.
pub const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// HTTP/2 flow-control windows of peer connections. The default 64 KiB window allows one
/// window of blob bytes per round trip, which throttled replication to ~70 MB/s.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Deadline of unary peer calls that do not carry bulk data.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Channels to peers by address.
#[derive(Default)]
pub struct Peers {
    channels: Mutex<HashMap<String, Channel>>,
    tls: Option<PeerTls>,
    /// Advertised peer address → the address actually dialled (NAT, a tunnel, a proxy).
    dial_via: HashMap<String, String>,
    errors: RpcErrors,
}

/// An endpoint for the peer port at `addr`, with mutual TLS when `tls` is given.
pub fn endpoint(addr: &str, tls: Option<&PeerTls>) -> Result<Endpoint, tonic::transport::Error> {
    endpoint_via(addr, addr, tls)
}

/// An endpoint that dials `dial` for the peer advertised as `addr` (whose host name TLS checks).
fn endpoint_via(addr: &str, dial: &str, tls: Option<&PeerTls>) -> Result<Endpoint, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut e = Endpoint::from_shared(format!("{scheme}://{dial}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if let Some(t) = tls {
        e = e.tls_config(t.client(host_of(addr)))?;
    }
    Ok(e)
}

impl Peers {
    /// Connections without TLS (a node whose peer port is on loopback only).
    pub fn new() -> Self {
        Peers::default()
    }

    /// Connections with mutual TLS.
    pub fn with_tls(tls: Option<PeerTls>) -> Self {
        Peers { tls, ..Peers::default() }
    }

    /// Dial `dial_via[addr]` instead of `addr` for the peers listed.
    pub fn dialling_via(mut self, dial_via: HashMap<String, String>) -> Self {
        self.dial_via = dial_via;
        self
    }

    /// The same peers over connections of their own, whose failures count with these. Raft's
    /// messages go so ([`crate::network::PeerNetwork`]): their connections live on Raft's
    /// runtime, where they are first used, and its heartbeats do not queue behind blob bytes.
    pub fn own_connections(&self) -> Peers {
        Peers {
            channels: Default::default(),
            tls: self.tls.clone(),
            dial_via: self.dial_via.clone(),
            errors: self.errors.clone(),
        }
    }

    /// A channel to `addr` (`host:port`), connected on first use and reconnected by tonic
    /// after failures. Every call on it carries the caller's trace context.
    pub fn channel(&self, addr: &str) -> Result<PeerChannel, tonic::transport::Error> {
        let mut map = self.channels.lock().unwrap();
        let ch = match map.get(addr) {
            Some(c) => c.clone(),
            None => {
                let dial = self.dial_via.get(addr).map_or(addr, String::as_str);
                let ch = endpoint_via(addr, dial, self.tls.as_ref())?.connect_lazy();
                map.insert(addr.to_string(), ch.clone());
                ch
            }
        };
        let counted = Counted { inner: ch, peer: addr.to_string(), errors: self.errors.clone() };
        Ok(tonic::service::interceptor::InterceptedService::new(counted, raftyard_telemetry::TraceContext))
    }

    /// The failed calls to peers so far.
    pub fn rpc_errors(&self) -> RpcErrors {
        self.errors.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn counted(frames: Vec<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>, errors: &RpcErrors) -> CountedBody {
        let inner = BoxBody::new(http_body_util::StreamBody::new(futures::stream::iter(frames)));
        let labels = RpcLabels { peer: "p:1".into(), rpc: "/raftyard.peer.v1.Blobs/Get".into() };
        CountedBody { inner, count: Some((errors.clone(), labels)) }
    }

    fn trailers(status: &'static str) -> http_body::Frame<bytes::Bytes> {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static(status));
        http_body::Frame::trailers(t)
    }

    fn count(errors: &RpcErrors) -> u64 {
        let labels = RpcLabels { peer: "p:1".into(), rpc: "/raftyard.peer.v1.Blobs/Get".into() };
        errors.get_or_create(&labels).get()
    }

    #[tokio::test]
    async fn a_stream_that_ends_in_an_error_counts_once() {
        let errors = RpcErrors::default();
        let data = || Ok(http_body::Frame::data(bytes::Bytes::from_static(b"chunk")));
        // OK trailers: not a failure
        let _ = counted(vec![data(), Ok(trailers("0"))], &errors).collect().await;
        assert_eq!(count(&errors), 0);
        // a status in the trailers after messages
        let _ = counted(vec![data(), data(), Ok(trailers("13"))], &errors).collect().await;
        assert_eq!(count(&errors), 1);
        // a broken body: counted once however far it is read
        let mut b = counted(
            vec![data(), Err(tonic::Status::unavailable("reset")), Err(tonic::Status::unavailable("again"))],
            &errors,
        );
        while let Some(f) = b.frame().await {
            let _ = f;
        }
        assert_eq!(count(&errors), 2);
        // a stream that ends without a status
        let _ = counted(vec![data()], &errors).collect().await;
        assert_eq!(count(&errors), 3);
    }
}
