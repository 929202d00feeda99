//! The OCI distribution API of a raftyard node.
//!
//! Owns the HTTP surface: the endpoint parser ([`endpoint`]), the handlers, the one mapping
//! from failures to OCI error responses ([`error`]), request metrics and the server loop with
//! TLS and graceful shutdown ([`server`]). It reads metadata through
//! [`raftyard_raft::StateReader`], changes it only by proposing events through
//! [`raftyard_raft::MetaNode`], and keeps bytes in [`raftyard_blobstore::BlobStore`]. It does
//! not parse configuration files or command lines: the binary wires it up.

pub mod access;
pub mod body;
pub mod endpoint;
pub mod error;
mod fastpath;
mod handlers;
pub mod metrics;
mod placement;
pub mod server;

use std::sync::Arc;
use std::time::Duration;

use raftyard_blobstore::BlobStore;
use raftyard_cluster::BlobPeers;
use raftyard_raft::MetaNode;

pub use error::RegistryError;
pub use handlers::handle;
pub use server::{serve, serve_metrics, TlsFiles};

/// Behaviour switches of the registry API.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Allow `DELETE` of manifests, tags and blobs.
    pub delete_enabled: bool,
    /// Upload sessions idle for longer are discarded.
    pub upload_idle_timeout: Duration,
    /// Nodes (this one included) that must hold a new blob durably before its upload is
    /// acknowledged. 0: a majority of the voters.
    pub blob_write_quorum: usize,
    /// A deliberately broken node, for the chaos suite to prove it catches one. Set only from
    /// the environment (`RAFTYARD_FAULT`), never from a config file.
    pub fault: Option<Fault>,
    /// The API is served over TLS (token realms built from the request's host say `https`).
    pub tls: bool,
}

/// The ways a node can be broken on purpose (`RAFTYARD_FAULT=<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `ack-before-commit`: manifest PUTs are acknowledged before their events are committed.
    AckBeforeCommit,
    /// `stale-reads`: blobs and manifests by digest are served from local state without a
    /// read barrier, even with deletes enabled.
    StaleReads,
}

impl Fault {
    pub const NAMES: &'static str = "ack-before-commit, stale-reads";

    pub fn parse(s: &str) -> Option<Fault> {
        match s {
            "ack-before-commit" => Some(Fault::AckBeforeCommit),
            "stale-reads" => Some(Fault::StaleReads),
            _ => None,
        }
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            delete_enabled: true,
            upload_idle_timeout: Duration::from_secs(3600),
            blob_write_quorum: 0,
            fault: None,
            tls: false,
        }
    }
}

/// A storage operation running longer makes a node not ready.
pub const SLOW_STORAGE: Duration = Duration::from_secs(3);
/// How long a readiness check waits for its read barrier.
pub const READY_BARRIER: Duration = Duration::from_secs(2);

/// Everything a request handler needs.
pub struct Registry {
    pub(crate) blobs: Arc<BlobStore>,
    pub(crate) meta: MetaNode,
    pub(crate) peers: BlobPeers,
    /// Replication streams of the upload sessions in progress, by session id.
    pub(crate) replicas: std::sync::Mutex<std::collections::HashMap<String, placement::Replicas>>,
    pub(crate) cfg: RegistryConfig,
    pub(crate) metrics: metrics::Metrics,
    /// This node's lag figures, if it is a backup.
    pub(crate) lag: raftyard_cluster::Lag,
    /// This node's collections and sweeps.
    pub(crate) gc: raftyard_cluster::GcStats,
    /// The blobs this node lacks (the repair worker's queue).
    pub(crate) missing: raftyard_cluster::Missing,
    /// The bytes of this node's blob files, walked at most once a minute for `/metrics`.
    pub(crate) disk: metrics::BlobBytes,
    /// Who may do what; `None`: everyone everything.
    pub(crate) auth: access::SharedAuth,
    /// Source addresses of the connections this node's own tunnel agent opened: each starts
    /// with a PROXY header naming the relay's visitor, the client address of its requests.
    pub(crate) proxied: Arc<raftyard_tunnel::proxy::Trusted>,
    /// This node's tunnel agent, once started: its figures on `/metrics`.
    agent: std::sync::OnceLock<raftyard_tunnel::AgentStatus>,
}

/// The address of the client a request came from (a request extension set by the server): the
/// connection's peer, or behind the relay the visitor's address that this node's own agent
/// passed on in a PROXY header. A request forwarded by another node has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::IpAddr);

/// This node's registry answering requests other nodes forward to its upload sessions.
pub struct LocalRegistry(pub Arc<Registry>);

#[async_trait::async_trait]
impl raftyard_cluster::LocalHttp for LocalRegistry {
    async fn serve(
        &self,
        req: http::Request<raftyard_cluster::HttpBody>,
    ) -> http::Response<raftyard_cluster::HttpBody> {
        let mut req = req;
        req.extensions_mut().insert(access::Forwarded);
        body::materialize(handlers::respond(&self.0, req).await)
    }
}

/// Figures other parts of the node keep, which the registry reports (`/metrics`).
pub struct NodeFigures {
    /// The lag of this node, if it is a backup.
    pub lag: raftyard_cluster::Lag,
    /// Its collections and sweeps.
    pub gc: raftyard_cluster::GcStats,
    /// The blobs it lacks.
    pub missing: raftyard_cluster::Missing,
}

impl Registry {
    pub fn new(
        blobs: Arc<BlobStore>,
        meta: MetaNode,
        peers: BlobPeers,
        figures: NodeFigures,
        cfg: RegistryConfig,
        auth: Option<Arc<raftyard_auth::Auth>>,
    ) -> Arc<Self> {
        let NodeFigures { lag, gc, missing } = figures;
        Arc::new(Registry {
            blobs,
            meta,
            peers,
            replicas: Default::default(),
            cfg,
            metrics: metrics::Metrics::default(),
            lag,
            gc,
            missing,
            auth,
            proxied: Default::default(),
            agent: Default::default(),
            disk: Default::default(),
        })
    }

    /// Whether a blob or manifest found by digest in the local state may be served without a
    /// read barrier: only while nothing is ever deleted (content under a digest never changes
    /// then), or on a node broken on purpose (`Fault::StaleReads`).
    pub(crate) fn local_digest_reads(&self) -> bool {
        !self.cfg.delete_enabled || self.cfg.fault == Some(Fault::StaleReads)
    }

    /// Why this node should not take traffic now, or `None` when it should: its Raft stopped,
    /// a storage operation has been running for over [`SLOW_STORAGE`], or (on a voter) a
    /// readiness probe does not complete within [`READY_BARRIER`] — no leader that a quorum
    /// acknowledged within the last 2 s can be reached, or this node is too far behind to
    /// apply the leader's applied index in time ([`MetaNode::probe`]: the same question as a
    /// read barrier, without its round of heartbeats to every member). A backup serves from its
    /// own state, so only its own health counts.
    pub async fn not_ready(&self) -> Option<String> {
        if let Err(e) = &self.meta.raft().metrics().borrow().running_state {
            return Some(format!("raft stopped: {e}"));
        }
        if let Some((what, age)) = self.meta.storage().oldest().filter(|(_, age)| *age > SLOW_STORAGE) {
            return Some(format!("storage operation {what:?} running for {:.1} s", age.as_secs_f64()));
        }
        if self.meta.is_backup() {
            return None;
        }
        match tokio::time::timeout(READY_BARRIER, self.meta.probe(READY_BARRIER)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("readiness probe failed: {e}")),
            Err(_) => Some(format!("readiness probe not done within {READY_BARRIER:?}: no leader, or far behind")),
        }
    }

    /// Where this node's tunnel agent registers the connections it opens to the registry.
    pub fn proxied(&self) -> Arc<raftyard_tunnel::proxy::Trusted> {
        self.proxied.clone()
    }

    /// Publishes the figures of this node's tunnel agent on `/metrics`.
    pub fn set_agent(&self, status: raftyard_tunnel::AgentStatus) {
        let _ = self.agent.set(status);
    }

    pub fn meta(&self) -> &MetaNode {
        &self.meta
    }

    pub fn blobs(&self) -> &Arc<BlobStore> {
        &self.blobs
    }

    /// Background upkeep: expires idle upload sessions. Runs until the registry is dropped.
    pub fn spawn_upkeep(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let Some(reg) = weak.upgrade() else { return };
                reg.blobs.expire_uploads(reg.cfg.upload_idle_timeout);
                reg.prune_replicas().await;
            }
        })
    }
}
