//! The repair worker: converges this node's blob holdings to the placement policy (every node
//! holds every blob). Its work list is the [`Missing`] index — blobs the registry knows that
//! this node lacks — derived from the replicated state and kept up to date from the journal,
//! so it survives restarts without a queue of its own and costs nothing while nothing is
//! missing; failed fetches back off exponentially per blob. It also records the blobs a node
//! found at start-up that the state does not list it for (it stopped between a fetch and its
//! record): nothing else would, since the index sees their files and never wants them.

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
use crate::missing::Missing;

/// Longest pause when there is nothing to do: new entries and backoff expiries wake the worker
/// sooner.
const IDLE: Duration = Duration::from_secs(30);
/// Shortest pause between rounds: new entries wake the worker at most this often.
const MIN_PAUSE: Duration = Duration::from_millis(100);
/// Blobs fetched at once.
const PARALLEL: usize = 4;
/// Most blobs fetched in one round, and most placements in one proposal. A node joining a
/// large registry lacks every blob: fetching them all before recording any put 100,000
/// placements in one log entry, which the leader could not commit before its followers'
/// election timeouts (the cluster changed leaders over and over, and the proposal was tried
/// again for ever). Rounds this size record their progress as they go.
pub const ROUND_MAX: usize = 256;
/// Backoff bounds for a blob whose fetch failed (its holders down or cut off: they come back
/// within seconds to minutes, and a node must not stay without a blob much longer than that).
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub struct RepairWorker {
    meta: MetaNode,
    missing: Missing,
    store: Arc<BlobStore>,
    peers: BlobPeers,
    /// Per blob: when to try again, and the current backoff.
    failed: HashMap<Digest, (Instant, Duration)>,
    /// Placements of blobs fetched here whose proposal failed: proposed again next round (the
    /// blob is here now, so no scan would find it missing again).
    unrecorded: Vec<Event>,
}

impl RepairWorker {
    pub fn new(meta: MetaNode, store: Arc<BlobStore>, peers: BlobPeers, missing: Missing) -> Self {
        RepairWorker { meta, missing, store, peers, failed: HashMap::new(), unrecorded: Vec::new() }
    }

    /// Runs until `stop` is cancelled.
    pub fn spawn(mut self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let applied = self.meta.reader().applied_index();
                self.missing.refresh_off_runtime().await;
                self.take_unrecorded();
                let worked = self.round().await;
                // the next backoff expiry, if sooner than the idle pause
                let now = Instant::now();
                let retry = self.failed.values().map(|(at, _)| at.saturating_duration_since(now)).min();
                let pause = if worked { Duration::from_millis(50) } else { retry.unwrap_or(IDLE).min(IDLE) };
                // new entries may link blobs this node lacks: look again soon (cheap: the
                // index folds in only the new entries)
                let reader = self.meta.reader().clone();
                let newer = async move {
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

    /// Adds the blobs here that the state does not list this node for, as the state is now:
    /// those this worker just fetched have been recorded since (and drop out); the others were
    /// fetched before a stop that came before their record, or restored by hand.
    fn take_unrecorded(&mut self) {
        let noted = self.missing.take_unrecorded();
        if noted.is_empty() {
            return;
        }
        let me = self.meta.id();
        let reader = self.meta.reader();
        // already waiting here to be proposed again
        let pending: std::collections::HashSet<Digest> = self
            .unrecorded
            .iter()
            .filter_map(|e| match e {
                Event::BlobPlaced { digest, .. } => Some(digest.clone()),
                _ => None,
            })
            .collect();
        let found: Vec<Event> = noted
            .into_iter()
            .filter(|(d, _)| !pending.contains(d))
            .filter(|(d, _)| reader.blob_info(d).ok().flatten().is_some_and(|i| !i.holders.contains(&me)))
            .map(|(digest, size)| Event::BlobPlaced { digest, size, node: me })
            .collect();
        if !found.is_empty() {
            info!(blobs = found.len(), "blobs held here but not recorded as here: recording them");
            self.unrecorded.extend(found);
        }
    }

    /// Blobs the registry knows that this node lacks and may try now, with their holders: at
    /// most [`ROUND_MAX`] of them.
    fn due(&mut self) -> Vec<(Digest, Vec<String>)> {
        let me = self.meta.id();
        let members = self.meta.members();
        let now = Instant::now();
        // backoffs of blobs no longer missing (fetched by a read, deleted) are forgotten
        let missing = &self.missing;
        missing.retain_wanted(&mut self.failed);
        let failed = &self.failed;
        let reader = self.meta.reader();
        let mut removed = Vec::new();
        let due = missing.pick(ROUND_MAX, |d| {
            if failed.get(d).is_some_and(|(at, _)| *at > now) {
                return None;
            }
            match reader.blob_info(d) {
                // no peer known yet (a node that has not learnt the membership): not a failure
                Ok(Some(info)) => {
                    Some((d.clone(), fetch_sources(&members, me, &info.holders))).filter(|(_, s)| !s.is_empty())
                }
                // removed since the index looked: it must not stay counted as missing
                Ok(None) => {
                    removed.push(d.clone());
                    None
                }
                Err(_) => None,
            }
        });
        for d in removed {
            missing.resolve(&d);
        }
        due
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
            self.missing.resolve(&d);
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
    /// before), up to [`ROUND_MAX`] per proposal: a backup catching up fetches hundreds of
    /// blobs a second. What is not recorded is tried again next round. Returns whether there
    /// was anything to record.
    async fn record(&mut self, mut placed: Vec<Event>) -> bool {
        placed.append(&mut self.unrecorded);
        if placed.is_empty() {
            return false;
        }
        while !placed.is_empty() {
            let rest = placed.split_off(placed.len().min(ROUND_MAX));
            let n = placed.len();
            match self.meta.propose(placed.clone()).await {
                Ok(()) => info!(blobs = n, "blobs repaired from peers"),
                Err(e) => {
                    warn!(blobs = n, error = %e, "blobs repaired but their placement not recorded: trying again");
                    placed.extend(rest);
                    self.unrecorded = placed;
                    break;
                }
            }
            placed = rest;
        }
        true
    }
}
