//! The built-in tunnel: clients outside a private network reach the cluster through a public
//! **relay**, to which an **agent** inside every node dials out (like frp or rathole).
//!
//! - [`relay`]: accepts agents' TLS control connections (per-agent tokens, compared in
//!   constant time), listens on each service's public address and hands every visitor
//!   connection to a live agent of that service — the least busy one, skipping agents that
//!   failed to open a channel — and serves a dashboard (HTML, JSON, Prometheus).
//! - [`agent`]: keeps one control connection per configured relay (heartbeats, TCP keepalive,
//!   reconnect with jittered exponential backoff reset after stable uptime) and answers each
//!   `Open` with a fresh data channel joined to the local service.
//! - [`pump`]: raw byte forwarding (splice(2) on Linux), so TLS between a client and the
//!   registry stays end to end and the relay never sees content.
//! - [`proto`]: the frames on the control connection and the data-channel preamble.
//! - [`proxy`]: PROXY protocol v2 headers carrying each visitor's address to the agent, and on
//!   to a local service that asks for it.
//!
//! This crate depends on no other raftyard crate: it forwards TCP services by name.

pub mod agent;
pub mod config;
mod dashboard;
pub mod proto;
pub mod proxy;
pub mod pump;
pub mod relay;
mod tls;

pub use agent::{Agent, AgentStatus, Gate, LinkStatus};
pub use config::{AgentFile, LocalService, RelayConfig, RelayLink};
pub use relay::{Relay, RelayAddrs};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("configuration: {0}")]
    Config(String),
    #[error("TLS: {0}")]
    Tls(String),
}
