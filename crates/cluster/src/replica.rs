//! Replication while receiving: the bytes of an upload flow on to the peers as they arrive,
//! so that a blob write quorum costs one round trip at the end instead of a second transfer.
//!
//! A [`ReplicaSet`] holds one `Blobs.Replicate` stream per peer for one upload. A peer that
//! stalls (its stream does not accept a chunk within [`STALL`]) or fails is dropped from the
//! set; the upload goes on with the others, and whoever misses a blob gets it later from the
//! repair worker.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use raftyard_raft::NodeId;
use raftyard_types::{Algorithm, Digest, RepoName};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

use crate::pb::blobs_client::BlobsClient;
use crate::pb::{replica_part::Part, ReplicaPart, ReplicaStart};
use crate::peers::Peers;

/// Longest a peer may take to accept a chunk before it is dropped from the upload.
const STALL: Duration = Duration::from_secs(5);
/// Longest a peer may take to verify and commit after the last byte.
const FINISH: Duration = Duration::from_secs(60);
/// Bytes gathered before a chunk is sent on.
const BATCH: usize = 1 << 20;
/// Chunks in flight per peer.
const DEPTH: usize = 4;

struct Replica {
    node: NodeId,
    tx: Option<mpsc::Sender<ReplicaPart>>,
    done: JoinHandle<Result<u64, String>>,
}

/// The peers receiving one upload as it arrives.
pub struct ReplicaSet {
    replicas: Vec<Replica>,
    pending: BytesMut,
}

impl ReplicaSet {
    /// Opens a replica stream to each target.
    pub fn open(peers: &Peers, targets: Vec<(NodeId, String)>, repo: &RepoName, algorithm: Algorithm) -> Self {
        let mut replicas = Vec::new();
        for (node, addr) in targets {
            let channel = match peers.channel(&addr) {
                Ok(c) => c,
                Err(e) => {
                    warn!(node, error = %e, "no channel to peer for replication");
                    continue;
                }
            };
            let (tx, rx) = mpsc::channel(DEPTH);
            let start = ReplicaPart {
                part: Some(Part::Start(ReplicaStart { repo: repo.to_string(), algorithm: algorithm.to_string() })),
            };
            if tx.try_send(start).is_err() {
                continue;
            }
            let done = tokio::spawn(async move {
                BlobsClient::new(channel)
                    .replicate(ReceiverStream::new(rx))
                    .await
                    .map(|r| r.into_inner().size)
                    .map_err(|s| s.message().to_string())
            });
            replicas.push(Replica { node, tx: Some(tx), done });
        }
        ReplicaSet { replicas, pending: BytesMut::new() }
    }

    /// Moves the replicas out, leaving an empty set.
    pub fn take(&mut self) -> ReplicaSet {
        std::mem::replace(self, ReplicaSet { replicas: Vec::new(), pending: BytesMut::new() })
    }

    /// Peers still receiving.
    pub fn live(&self) -> usize {
        self.replicas.iter().filter(|r| r.tx.is_some()).count()
    }

    /// Passes bytes on (batched to [`BATCH`]).
    pub async fn send(&mut self, bytes: &Bytes) {
        if self.pending.is_empty() && bytes.len() >= BATCH {
            self.send_now(bytes.clone()).await;
            return;
        }
        self.pending.extend_from_slice(bytes);
        if self.pending.len() >= BATCH {
            let chunk = self.pending.split().freeze();
            self.send_now(chunk).await;
        }
    }

    async fn send_now(&mut self, chunk: Bytes) {
        for r in &mut self.replicas {
            let Some(tx) = &r.tx else { continue };
            let part = ReplicaPart { part: Some(Part::Data(chunk.clone())) };
            match tokio::time::timeout(STALL, tx.send(part)).await {
                Ok(Ok(())) => {}
                _ => {
                    debug!(node = r.node, "peer dropped from an upload's replication");
                    r.tx = None;
                }
            }
        }
    }

    /// Sends the declared digest and waits for the peers' verdicts; returns the nodes that
    /// hold a verified, durable copy.
    pub async fn finish(mut self, digest: &Digest) -> Vec<NodeId> {
        if !self.pending.is_empty() {
            let chunk = self.pending.split().freeze();
            self.send_now(chunk).await;
        }
        for r in &mut self.replicas {
            if let Some(tx) = r.tx.take() {
                let part = ReplicaPart { part: Some(Part::FinishDigest(digest.to_string())) };
                if tokio::time::timeout(STALL, tx.send(part)).await.is_err() {
                    r.done.abort();
                }
            } else {
                r.done.abort();
            }
        }
        let mut ok = Vec::new();
        for r in self.replicas {
            match tokio::time::timeout(FINISH, r.done).await {
                Ok(Ok(Ok(_))) => ok.push(r.node),
                Ok(Ok(Err(e))) => debug!(node = r.node, error = %e, "replica refused"),
                _ => debug!(node = r.node, "replica did not finish"),
            }
        }
        ok
    }

    /// Abandons the upload on every peer (they discard what they received).
    pub fn abort(self) {
        for r in self.replicas {
            r.done.abort();
        }
    }
}
