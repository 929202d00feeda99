//! Replication while receiving: the bytes of an upload flow on to the peers as they arrive,
//! so that a blob write quorum costs one round trip at the end instead of a second transfer.
//!
//! A [`ReplicaSet`] holds one `Blobs.Replicate` stream per peer for one upload. A peer that
//! stalls (its stream does not accept a chunk within [`STALL`]) or fails is dropped from the
//! set; the upload goes on with the others, and whoever misses a blob gets it later from the
//! repair worker.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use raftyard_raft::NodeId;
use raftyard_types::{Algorithm, Digest, RepoName};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn, Instrument as _};

use crate::pb::blobs_client::BlobsClient;
use crate::pb::{replica_part::Part, ReplicaPart, ReplicaStart};
use crate::peers::Peers;

/// Longest a peer may take to accept a chunk before it is dropped from the upload.
const STALL: Duration = Duration::from_secs(5);
/// Longest a peer may take to verify and commit after the last byte.
const FINISH: Duration = Duration::from_secs(60);
/// Once a write quorum of peers has a copy, how much longer (beyond the time that took) the
/// others are waited for.
const GRACE: Duration = Duration::from_millis(50);
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
            // in the request's span: the call carries its trace
            let done = tokio::spawn(
                async move {
                    BlobsClient::new(channel)
                        .replicate(ReceiverStream::new(rx))
                        .await
                        .map(|r| r.into_inner().size)
                        .map_err(|s| s.message().to_string())
                }
                .in_current_span(),
            );
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

    /// Sends `chunk` to every live replica at once; a replica that does not take it within
    /// [`STALL`] is dropped (so a paused or dead peer delays the upload once, by `STALL`).
    async fn send_now(&mut self, chunk: Bytes) {
        let sends = self.replicas.iter().map(|r| {
            let chunk = chunk.clone();
            async move {
                let Some(tx) = &r.tx else { return true };
                let part = ReplicaPart { part: Some(Part::Data(chunk)) };
                matches!(tokio::time::timeout(STALL, tx.send(part)).await, Ok(Ok(())))
            }
        });
        let kept = futures::future::join_all(sends).await;
        for (r, ok) in self.replicas.iter_mut().zip(kept) {
            if !ok && r.tx.take().is_some() {
                debug!(node = r.node, "peer dropped from an upload's replication");
            }
        }
    }

    /// Sends the declared digest and waits until `enough` peers hold a verified, durable copy,
    /// then a little longer for the others ([`GRACE`]); returns the peers that answered with a
    /// copy. Peers still busy then finish in the background: a slow or paused peer does not
    /// hold up the acknowledgement.
    pub async fn finish(mut self, digest: &Digest, enough: usize) -> Vec<NodeId> {
        if !self.pending.is_empty() {
            let chunk = self.pending.split().freeze();
            self.send_now(chunk).await;
        }
        let finishing = self.replicas.into_iter().map(|r| {
            let digest = digest.to_string();
            async move {
                let Some(tx) = r.tx else {
                    r.done.abort();
                    return None;
                };
                let part = ReplicaPart { part: Some(Part::FinishDigest(digest)) };
                if tokio::time::timeout(STALL, tx.send(part)).await.is_err() {
                    r.done.abort();
                    return None;
                }
                drop(tx);
                match r.done.await {
                    Ok(Ok(_)) => Some(r.node),
                    Ok(Err(e)) => {
                        debug!(node = r.node, error = %e, "replica refused");
                        None
                    }
                    Err(_) => None,
                }
            }
        });
        let mut running: futures::stream::FuturesUnordered<_> = finishing.collect();
        let mut ok = Vec::new();
        let start = tokio::time::Instant::now();
        let mut deadline = start + FINISH;
        let mut quorum_at = None;
        loop {
            if quorum_at.is_none() && ok.len() >= enough {
                // healthy peers finish about together: give the others as long again (and
                // GRACE), so their copies are recorded too, but no longer
                let now = tokio::time::Instant::now();
                quorum_at = Some(now);
                deadline = deadline.min(now + (now - start) + GRACE);
            }
            match tokio::time::timeout_at(deadline, running.next()).await {
                Ok(Some(Some(node))) => ok.push(node),
                Ok(Some(None)) => {}
                Ok(None) | Err(_) => break,
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
