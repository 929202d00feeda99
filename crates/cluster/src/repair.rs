//! The repair worker: converges this node's blob holdings to the placement policy (every node
//! holds every blob). Its work list is derived from the replicated state — blobs the registry
//! knows that this node lacks — so it survives restarts without a queue of its own; failed
//! fetches back off exponentially per blob.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use raftyard_blobstore::BlobStore;
use raftyard_raft::MetaNode;
use raftyard_types::{Digest, Event, RepoName};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::blobs::{fetch_sources, BlobPeers};

/// Pause between scans when there was nothing to do.
const IDLE_SCAN: Duration = Duration::from_secs(2);
/// Blobs fetched at once.
const PARALLEL: usize = 2;
/// Backoff bounds for a blob whose fetch failed.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

pub struct RepairWorker {
    meta: MetaNode,
    store: Arc<BlobStore>,
    peers: BlobPeers,
    /// Per blob: when to try again, and the current backoff.
    failed: HashMap<Digest, (Instant, Duration)>,
}

impl RepairWorker {
    pub fn new(meta: MetaNode, store: Arc<BlobStore>, peers: BlobPeers) -> Self {
        RepairWorker { meta, store, peers, failed: HashMap::new() }
    }

    /// Runs until `stop` is cancelled.
    pub fn spawn(mut self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let worked = self.round().await;
                let pause = if worked { Duration::from_millis(50) } else { IDLE_SCAN };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        })
    }

    /// Blobs the registry knows that this node lacks and may try now, with their holders.
    fn due(&self) -> Vec<(Digest, Vec<String>)> {
        let Ok(all) = self.meta.reader().blobs() else {
            return vec![];
        };
        let me = self.meta.id();
        let members = self.meta.members();
        let now = Instant::now();
        all.into_iter()
            .filter(|(d, _)| self.store.stat(d).is_none())
            .filter(|(d, _)| self.failed.get(d).is_none_or(|(at, _)| *at <= now))
            .map(|(d, info)| {
                let sources = fetch_sources(&members, me, &info.holders);
                (d, sources)
            })
            .collect()
    }

    /// One pass over the missing blobs; returns whether anything was fetched.
    async fn round(&mut self) -> bool {
        let due = self.due();
        if due.is_empty() {
            return false;
        }
        debug!(missing = due.len(), "repair round");
        let repo = RepoName::parse("raftyard-repair").expect("valid name");
        let results: Vec<(Digest, Result<u64, String>)> = futures::stream::iter(due)
            .map(|(d, sources)| {
                let peers = self.peers.clone();
                let repo = repo.clone();
                async move {
                    let r = peers.fetch(&repo, &d, &sources).await.map_err(|e| e.to_string());
                    (d, r)
                }
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        let mut worked = false;
        for (d, r) in results {
            match r {
                Ok(size) => {
                    self.failed.remove(&d);
                    worked = true;
                    let placed = Event::BlobPlaced { digest: d.clone(), size, node: self.meta.id() };
                    if let Err(e) = self.meta.propose(vec![placed]).await {
                        warn!(digest = %d, error = %e, "blob repaired but its placement not recorded");
                    } else {
                        info!(digest = %d, size, "blob repaired from a peer");
                    }
                }
                Err(e) => {
                    let backoff = self.failed.get(&d).map(|(_, b)| (*b * 2).min(BACKOFF_MAX)).unwrap_or(BACKOFF_MIN);
                    debug!(digest = %d, error = %e, ?backoff, "blob repair failed");
                    self.failed.insert(d, (Instant::now() + backoff, backoff));
                }
            }
        }
        worked
    }
}
