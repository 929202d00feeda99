//! Metadata consensus of raftyard: the openraft type configuration, the sled-backed Raft log
//! store, and the event-sourced state machine that folds [`Command`]s into repository state
//! (manifests, tags, blob links and placements) and keeps the event journal; consistent
//! snapshots for online backups and seeding a node from one ([`backup`]), and the offline
//! recovery of a backup into a cluster of one ([`recover`]); garbage collection and retention plans ([`gc`], [`retention`]); what repositories hold and
//! the quotas over them ([`quota`]).
//!
//! Owns the `meta/` sled database under the data directory. It never touches blob files and
//! never speaks HTTP; the network between nodes is supplied from outside through openraft's
//! [`openraft::RaftNetworkFactory`] ([`network::NoNetwork`] for a cluster of one).

// openraft's StorageError is large by design; every storage method returns it.
#![allow(clippy::result_large_err)]

pub mod backup;
pub mod gc;
pub mod keys;
pub mod log_store;
pub mod network;
pub mod node;
pub mod quota;
pub mod recover;
pub mod retention;
pub mod size;
pub mod state;
pub mod watchdog;

use raftyard_types::event::VersionedCommand;
use raftyard_types::Outcome;
use serde::{Deserialize, Serialize};

pub use node::{Failure, LeaderLink, MetaNode, MetaNodeConfig, ProposeError, StartError};
pub use state::{ManifestRecord, StateReader};
pub use watchdog::StorageWatch;

pub use raftyard_types::event::NodeId;

/// Addresses of one member, carried in the Raft membership.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    /// Peer (gRPC) address.
    pub peer: String,
    /// Registry (HTTP) address.
    pub registry: String,
}

impl std::fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer={} registry={}", self.peer, self.registry)
    }
}

openraft::declare_raft_types!(
    /// The Raft type configuration of raftyard.
    pub TypeConfig:
        D = VersionedCommand,
        R = Outcome,
        NodeId = NodeId,
        Node = NodeAddr,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type LogId = openraft::LogId<NodeId>;

pub(crate) fn storage_err(
    subject: openraft::ErrorSubject<NodeId>,
    verb: openraft::ErrorVerb,
    e: impl std::fmt::Display,
) -> StorageError {
    openraft::StorageError::from_io_error(subject, verb, std::io::Error::other(e.to_string()))
}
