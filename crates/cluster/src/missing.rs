//! The blobs this node lacks, as an index kept up to date from the event journal instead of a
//! scan of every placement: one scan when the node starts, then each applied command's blob
//! events re-check the digests they name, and a scan again only when the journal's retention
//! dropped entries before they were read. Idle, keeping it costs one empty journal read and a
//! read of the journal's first index, the same at a thousand blobs as at a million. The repair
//! worker fetches from it; a backup's lag monitor reads its figures.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftyard_blobstore::BlobStore;
use raftyard_raft::MetaNode;
use raftyard_types::{Digest, Event};

/// Journal entries folded per step (a node catching up folds in steps, not in one long lock).
const STEP: usize = 1000;

/// One blob this node lacks.
#[derive(Debug, Clone, Copy)]
pub struct Want {
    pub size: u64,
    /// Since when this node has lacked the blob, at the latest: the proposal time of the command
    /// that made it known here (for those already missing at start-up: the start).
    pub since: Instant,
}

#[derive(Default)]
struct Inner {
    wants: HashMap<Digest, Want>,
    /// Blobs here whose placement on this node the state does not record (yet: one just
    /// fetched; or never: the node stopped between a fetch and its record, or the file came
    /// back with a restore), with their sizes: taken by the repair worker, which proposes the
    /// placements the state still lacks by then.
    unrecorded: HashMap<Digest, u64>,
    /// The last journal index folded in; `None` until the first scan.
    folded: Option<u64>,
}

/// The blobs this node lacks. Cheap to clone; clones share the index.
#[derive(Clone)]
pub struct Missing {
    meta: MetaNode,
    store: Arc<BlobStore>,
    inner: Arc<Mutex<Inner>>,
}

impl Missing {
    pub fn new(meta: MetaNode, store: Arc<BlobStore>) -> Self {
        Missing { meta, store, inner: Default::default() }
    }

    /// Brings the index up to the applied state: the first time, a scan of every placement;
    /// after that, the blob events of the journal entries applied since — or a scan again when
    /// the journal no longer holds them.
    pub fn refresh(&self) {
        let reader = self.meta.reader();
        let mut inner = self.inner.lock().unwrap();
        let Some(mut folded) = inner.folded else {
            self.scan(&mut inner);
            return;
        };
        loop {
            let Ok(entries) = reader.journal(folded + 1, STEP) else { return };
            // A trim (through the log, or in a snapshot installed from a leader that trimmed)
            // may have dropped entries after `folded` before they were read: this read then
            // started past them, and what they linked or removed would never be looked at
            // again (a blob this node lacks never fetched, one removed still counted as
            // missing). The first kept index only grows, so reading it after the entries
            // tells whether they started where they should.
            if reader.journal_first().is_ok_and(|first| first > folded + 1) {
                self.scan(&mut inner);
                return;
            }
            let Some(last) = entries.last().map(|e| e.index) else { return };
            let (now, now_ms) = (Instant::now(), raftyard_types::event::now_ms());
            for e in &entries {
                let at = now.checked_sub(Duration::from_millis(now_ms.saturating_sub(e.time_ms))).unwrap_or(now);
                for ev in &e.events {
                    for d in digests_of(ev) {
                        self.recheck(&mut inner, d, at);
                    }
                }
            }
            folded = last;
            inner.folded = Some(folded);
        }
    }

    /// Rebuilds the index from every placement (a blob still missing keeps the time it went
    /// missing). Entries applied during the scan are folded again after it: re-checks are
    /// idempotent, so nothing is lost and nothing counted twice.
    fn scan(&self, inner: &mut Inner) {
        let reader = self.meta.reader();
        let from = reader.applied_index();
        let Ok(all) = reader.blobs() else { return };
        let before = std::mem::take(&mut inner.wants);
        inner.unrecorded.clear();
        let now = Instant::now();
        for (d, info) in all {
            let since = before.get(&d).map_or(now, |w| w.since);
            self.classify(inner, &d, &info, since);
        }
        inner.folded = Some(from);
    }

    /// [`Missing::refresh`] on a blocking thread: the first one stats every blob the registry
    /// knows, and any one reads the journal from disk.
    pub async fn refresh_off_runtime(&self) {
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || this.refresh()).await;
    }

    /// Re-checks one blob after this node fetched it (or failed to). The repair worker
    /// records the placements of what it fetched itself, so a blob it fetched is not noted as
    /// unrecorded (that would cost it a state read per blob to find it recorded after all).
    pub fn resolve(&self, d: &Digest) {
        let mut inner = self.inner.lock().unwrap();
        self.recheck(&mut inner, d, Instant::now());
        inner.unrecorded.remove(d);
    }

    /// Whether the registry knows `d` and this node lacks it (since `since`, if newly).
    fn recheck(&self, inner: &mut Inner, d: &Digest, since: Instant) {
        let info = self.meta.reader().blob_info(d).ok().flatten();
        if info.is_some() {
            // linked here now: that keeps its file from sweeps, a hold no longer needs to
            self.store.release(d);
        }
        match info {
            Some(info) => self.classify(inner, d, &info, since),
            None => {
                inner.wants.remove(d);
                inner.unrecorded.remove(d);
            }
        }
    }

    /// Files a blob the registry knows: wanted if its file is not here, unrecorded if it is
    /// and the state does not list this node as its holder.
    fn classify(&self, inner: &mut Inner, d: &Digest, info: &raftyard_raft::state::BlobInfo, since: Instant) {
        match self.store.stat(d) {
            None => {
                inner.wants.entry(d.clone()).or_insert(Want { size: info.size, since });
            }
            Some(size) => {
                inner.wants.remove(d);
                if !info.holders.contains(&self.meta.id()) {
                    inner.unrecorded.insert(d.clone(), size);
                }
            }
        }
    }

    /// The blobs here that the state did not record here when last looked at (see
    /// `Inner::unrecorded`), once.
    pub fn take_unrecorded(&self) -> Vec<(Digest, u64)> {
        std::mem::take(&mut self.inner.lock().unwrap().unrecorded).into_iter().collect()
    }

    /// The blobs this node lacks now.
    pub fn wants(&self) -> Vec<(Digest, Want)> {
        self.inner.lock().unwrap().wants.iter().map(|(d, w)| (d.clone(), *w)).collect()
    }

    /// How many blobs this node lacks, their bytes, and since when the oldest has been missing.
    pub fn figures(&self) -> (u64, u64, Option<Instant>) {
        let inner = self.inner.lock().unwrap();
        let bytes = inner.wants.values().map(|w| w.size).sum();
        (inner.wants.len() as u64, bytes, inner.wants.values().map(|w| w.since).min())
    }
}

/// The blobs an event can change the presence or placement of.
fn digests_of(ev: &Event) -> Vec<&Digest> {
    match ev {
        Event::BlobLinked { digest, .. }
        | Event::BlobUnlinked { digest, .. }
        | Event::BlobPlaced { digest, .. }
        | Event::BlobDropped { digest, .. }
        | Event::BlobMounted { digest, .. } => vec![digest],
        Event::BlobsSwept { digests, .. } => digests.iter().collect(),
        Event::Collected { links, .. } => links.iter().map(|(_, d)| d).collect(),
        Event::ManifestPut { .. } | Event::TagSet { .. } | Event::TagDeleted { .. } | Event::ManifestDeleted { .. } => {
            vec![]
        }
        Event::UserPut { .. }
        | Event::UserPassword { .. }
        | Event::UserRemoved { .. }
        | Event::GrantAdded(_)
        | Event::GrantRevoked { .. }
        | Event::RobotAdded { .. }
        | Event::RobotRevoked { .. }
        | Event::RobotUsed { .. }
        | Event::SigningKeyAdded { .. }
        | Event::JournalTrimmed { .. }
        | Event::ClusterUpgraded { .. }
        | Event::RetentionSet(_)
        | Event::RetentionRemoved { .. }
        | Event::TagExpired { .. }
        | Event::QuotaSet(_)
        | Event::QuotaRemoved { .. } => vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftyard_blobstore::BlobStoreConfig;
    use raftyard_raft::node::MetaNodeConfig;
    use raftyard_raft::NodeAddr;
    use raftyard_types::RepoName;

    /// An index that did not read the journal while its retention dropped entries (a node
    /// paused, or installing a snapshot) still ends up right: a blob it wanted that was removed
    /// in the gap is no longer wanted, and one linked in the gap is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entries_trimmed_before_they_were_read_are_not_lost_to_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let addr = NodeAddr { peer: "127.0.0.1:1".into(), registry: "127.0.0.1:2".into() };
        let cfg = MetaNodeConfig::new(1, dir.path().join("meta"), addr);
        let node = MetaNode::start(cfg, raftyard_raft::network::NoNetwork, None).await.unwrap();
        let store = BlobStore::open(BlobStoreConfig::new(dir.path().join("blobs"), "1")).unwrap();
        let missing = Missing::new(node.clone(), Arc::new(store));
        let repo = RepoName::parse("gap/app").unwrap();
        let (gone, linked) = (Digest::sha256(b"removed in the gap"), Digest::sha256(b"linked in the gap"));
        let link = |d: &Digest| Event::BlobLinked { repo: repo.clone(), digest: d.clone(), size: 1 };
        node.wait_for_leader(Duration::from_secs(10)).await.expect("a leader");
        node.propose(vec![link(&gone)]).await.unwrap();
        missing.refresh_off_runtime().await;
        assert!(missing.wants().iter().any(|(d, _)| *d == gone), "a linked blob with no file here is wanted");

        node.propose(vec![Event::BlobUnlinked { repo: repo.clone(), digest: gone.clone() }]).await.unwrap();
        node.propose(vec![link(&linked)]).await.unwrap();
        let before = node.reader().applied_index() + 1;
        node.propose(vec![Event::JournalTrimmed { before }]).await.unwrap();
        assert!(node.reader().journal_first().unwrap() >= before, "the journal was trimmed");

        missing.refresh_off_runtime().await;
        let wants: Vec<Digest> = missing.wants().into_iter().map(|(d, _)| d).collect();
        assert_eq!(wants, vec![linked], "after the gap");
    }
}
