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

/// Pause between scans when there was nothing to do (on a backup: unless new entries are
/// applied).
const IDLE_SCAN: Duration = Duration::from_secs(2);
/// Shortest pause between scans: new entries wake the worker at most this often.
const MIN_PAUSE: Duration = Duration::from_millis(100);
/// Blobs fetched at once.
const PARALLEL: usize = 4;
/// Backoff bounds for a blob whose fetch failed (its holders down or cut off: they come back
/// within seconds to minutes, and a node must not stay without a blob much longer than that).
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub struct RepairWorker {
    meta: MetaNode,
    store: Arc<BlobStore>,
    peers: BlobPeers,
    /// Per blob: when to try again, and the current backoff.
    failed: HashMap<Digest, (Instant, Duration)>,
    /// Placements of blobs fetched here whose proposal failed: proposed again next round (the
    /// blob is here now, so no scan would find it missing again).
    unrecorded: Vec<Event>,
}

impl RepairWorker {
    pub fn new(meta: MetaNode, store: Arc<BlobStore>, peers: BlobPeers) -> Self {
        RepairWorker { meta, store, peers, failed: HashMap::new(), unrecorded: Vec::new() }
    }

    /// Runs until `stop` is cancelled.
    pub fn spawn(mut self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let applied = self.meta.reader().applied_index();
                let worked = self.round().await;
                let pause = if worked { Duration::from_millis(50) } else { IDLE_SCAN };
                // on a backup, new entries may link new blobs: look again soon. (Voters get new
                // blobs with the push; a scan reads every blob's placement, so they do not
                // scan after every entry.)
                let reader = self.meta.reader().clone();
                let backup = self.meta.is_backup();
                let newer = async move {
                    if !backup {
                        return std::future::pending().await;
                    }
                    reader.wait_applied(applied + 1).await;
                    tokio::time::sleep(MIN_PAUSE).await;
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                    _ = newer => {}
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
            // no peer known yet (a node that has not learnt the membership): not a failure
            .filter(|(_, sources)| !sources.is_empty())
            .collect()
    }

    /// One pass over the missing blobs; returns whether anything was fetched.
    async fn round(&mut self) -> bool {
        if let Err(e) = self.store.check_space() {
            // not the sources' fault: no per-blob backoff; look again once space comes back
            debug!(error = %e, "repair waits for free space");
            return false;
        }
        let due = self.due();
        if due.is_empty() {
            return self.record(Vec::new()).await;
        }
        debug!(missing = due.len(), "repair round");
        let repo = RepoName::parse("raftyard-repair").expect("valid name");
        let results: Vec<(Digest, Result<u64, crate::blobs::PeerBlobError>)> = futures::stream::iter(due)
            .map(|(d, sources)| {
                let peers = self.peers.clone();
                let repo = repo.clone();
                async move {
                    let r = peers.fetch(&repo, &d, &sources).await;
                    (d, r)
                }
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        let mut placed = Vec::new();
        for (d, r) in results {
            match r {
                Ok(size) => {
                    self.failed.remove(&d);
                    debug!(digest = %d, size, "blob repaired from a peer");
                    placed.push(Event::BlobPlaced { digest: d, size, node: self.meta.id() });
                }
                Err(e) if e.is_local_space() => debug!(digest = %d, "repair waits for free space"),
                Err(e) => {
                    let backoff = self.failed.get(&d).map(|(_, b)| (*b * 2).min(BACKOFF_MAX)).unwrap_or(BACKOFF_MIN);
                    debug!(digest = %d, error = %e, ?backoff, "blob repair failed");
                    self.failed.insert(d, (Instant::now() + backoff, backoff));
                }
            }
        }
        self.record(placed).await
    }

    /// Proposes the placements of blobs fetched here (with those whose proposal failed
    /// before), in one proposal: a backup catching up fetches hundreds of blobs a second.
    /// Returns whether there was anything to record.
    async fn record(&mut self, mut placed: Vec<Event>) -> bool {
        placed.append(&mut self.unrecorded);
        if placed.is_empty() {
            return false;
        }
        let n = placed.len();
        match self.meta.propose(placed.clone()).await {
            Ok(()) => info!(blobs = n, "blobs repaired from peers"),
            Err(e) => {
                warn!(blobs = n, error = %e, "blobs repaired but their placement not recorded: trying again");
                self.unrecorded = placed;
            }
        }
        true
    }
}
