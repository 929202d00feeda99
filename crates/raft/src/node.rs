//! [`MetaNode`]: one Raft member with its sled storage, and the propose/read API the registry
//! uses. A proposal returns once its command is committed by a majority and applied here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::RaftNetworkFactory;
use raftyard_types::event::VersionedCommand;
use raftyard_types::{Command, Event, Rejection};
use tracing::info;

use crate::log_store::LogStore;
use crate::state::{StateMachine, StateReader};
use crate::{NodeAddr, NodeId, Raft, TypeConfig};

/// Settings of the metadata node.
#[derive(Debug, Clone)]
pub struct MetaNodeConfig {
    pub id: NodeId,
    /// Directory of the sled database.
    pub dir: PathBuf,
    /// This node's addresses, as recorded in the membership.
    pub addr: NodeAddr,
    /// Initialise a new cluster with this node as its only voter if it has no state yet.
    pub bootstrap_single: bool,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and allow log purge) after this many applied entries.
    pub snapshot_every: u64,
}

impl MetaNodeConfig {
    pub fn new(id: NodeId, dir: PathBuf, addr: NodeAddr) -> Self {
        MetaNodeConfig {
            id,
            dir,
            addr,
            bootstrap_single: true,
            heartbeat_ms: 50,
            election_timeout_min_ms: 200,
            election_timeout_max_ms: 400,
            snapshot_every: 5000,
        }
    }
}

/// Why a proposal or a linearizable read did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// Committed, but the state machine refused it (deterministically, on every node).
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// This node is not the leader; the caller may forward to `leader`.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<(NodeId, NodeAddr)> },
    /// No quorum, shutting down, or a storage failure.
    #[error("metadata unavailable: {0}")]
    Unavailable(String),
}

/// One member of the metadata Raft group.
#[derive(Clone)]
pub struct MetaNode {
    id: NodeId,
    raft: Raft,
    reader: StateReader,
    db: sled::Db,
}

impl MetaNode {
    /// Opens storage under `cfg.dir` and starts Raft with the given network.
    pub async fn start<N: RaftNetworkFactory<TypeConfig>>(cfg: MetaNodeConfig, network: N) -> Result<Self, StartError> {
        std::fs::create_dir_all(&cfg.dir)?;
        let db = sled::Config::new()
            .path(&cfg.dir)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let log = LogStore::open(&db)?;
        let sm = StateMachine::open(&db)?;
        let reader = sm.reader();
        let raft_cfg = openraft::Config {
            cluster_name: "raftyard".into(),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_timeout_min_ms,
            election_timeout_max: cfg.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
            max_in_snapshot_log_to_keep: 1000,
            ..Default::default()
        }
        .validate()
        .map_err(raft_err)?;
        let raft = Raft::new(cfg.id, Arc::new(raft_cfg), network, log, sm)
            .await
            .map_err(raft_err)?;
        let node = MetaNode {
            id: cfg.id,
            raft,
            reader,
            db,
        };
        if cfg.bootstrap_single && !node.raft.is_initialized().await.map_err(raft_err)? {
            info!(id = cfg.id, "initialising a new cluster of one");
            let members = BTreeMap::from([(cfg.id, cfg.addr.clone())]);
            node.raft.initialize(members).await.map_err(raft_err)?;
        }
        Ok(node)
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    pub fn reader(&self) -> &StateReader {
        &self.reader
    }

    /// Waits until some node is leader (and this node knows it), up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<NodeId> {
        let mut rx = self.raft.metrics();
        let r = tokio::time::timeout(timeout, rx.wait_for(|m| m.current_leader.is_some())).await;
        match r {
            Ok(Ok(m)) => m.current_leader,
            _ => None,
        }
    }

    /// Proposes events as one atomic command; returns once committed and applied on this node.
    pub async fn propose(&self, events: Vec<Event>) -> Result<(), ProposeError> {
        let cmd = VersionedCommand::V1(Command::new(events));
        match self.raft.client_write(cmd).await {
            Ok(resp) => {
                // client_write returns after apply on the leader; make it visible to readers too.
                self.reader.wait_applied(resp.log_id.index).await;
                resp.data.map_err(ProposeError::Rejected)
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(ProposeError::NotLeader {
                leader: f.leader_id.zip(f.leader_node),
            }),
            Err(e) => Err(ProposeError::Unavailable(e.to_string())),
        }
    }

    /// Linearizable read barrier: after it returns, this node's state includes every write
    /// acknowledged before the call.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        match self.raft.ensure_linearizable().await {
            Ok(Some(log_id)) => {
                self.reader.wait_applied(log_id.index).await;
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(ProposeError::NotLeader {
                    leader: f.leader_id.zip(f.leader_node),
                })
            }
            Err(e) => Err(ProposeError::Unavailable(e.to_string())),
        }
    }

    /// Stops Raft and flushes storage.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
        let _ = self.db.flush_async().await;
    }
}

/// Why a metadata node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("metadata storage: {0}")]
    Storage(String),
    #[error("raft: {0}")]
    Raft(String),
}

impl From<std::io::Error> for StartError {
    fn from(e: std::io::Error) -> Self {
        StartError::Storage(e.to_string())
    }
}

impl From<sled::Error> for StartError {
    fn from(e: sled::Error) -> Self {
        StartError::Storage(e.to_string())
    }
}

fn raft_err(e: impl std::fmt::Display) -> StartError {
    StartError::Raft(e.to_string())
}
