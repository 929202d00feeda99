//! Connections to other nodes: one lazily connected tonic channel per peer address, shared by
//! every service client.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// A connection to a peer whose calls carry the caller's trace context (W3C `traceparent`).
pub type PeerChannel = tonic::service::interceptor::InterceptedService<Channel, raftyard_telemetry::TraceContext>;

use crate::tls::{host_of, PeerTls};

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
        Ok(tonic::service::interceptor::InterceptedService::new(ch, raftyard_telemetry::TraceContext))
    }
}
