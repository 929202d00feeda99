//! The blobs this node lacks, as an index kept up to date from the event journal instead of a
//! scan of every placement: one scan when the node starts, then each applied command's blob
//! events re-check the digests they name, and a scan again only when the journal's retention
//! dropped entries before they were read. Idle, keeping it costs one empty journal read and a
//! read of the journal's first index, the same at a thousand blobs as at a million. The repair
//! worker fetches from it; a backup's lag monitor reads its figures.
//!
//! Its memory is bounded: it holds at most [`HELD`] blobs (about 150 bytes each). A node that
//! lacks more — a new node or backup of a large registry lacks every blob — holds a window of
//! them and only counts the others. A scan takes the next window, in digest order from where
//! the last one ended and round again, once the repair worker has fetched half of the window,
//! and at least every [`RESCAN_EVERY`] (so that blobs no source has cannot hold the window for
//! ever, and blobs linked since, which the index does not take while it lacks room, are
//! found). Until then, the figures of the blobs outside the window are those of the last scan;
//! if the index ran out of room as entries were folded in (a node replaying a long log), they
//! count the blobs newly lacked since, and the next refresh scans. As soon as a scan finds no
//! more than it can hold, the index is exact again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftyard_blobstore::BlobStore;
use raftyard_raft::MetaNode;
use raftyard_types::{Digest, Event};

/// Journal entries folded per step (a node catching up folds in steps, not in one long lock).
const STEP: usize = 1000;
/// Most blobs the index holds, wanted and unrecorded each: a few MiB.
pub const HELD: usize = 50_000;
/// Least time between two scans for the next window (each reads every placement).
const RESCAN_MIN: Duration = Duration::from_secs(5);
/// Longest time between two scans while the node lacks more than the index holds.
pub const RESCAN_EVERY: Duration = Duration::from_secs(60);

/// One blob this node lacks.
#[derive(Debug, Clone, Copy)]
pub struct Want {
    pub size: u64,
    /// Since when this node has lacked the blob, at the latest: the proposal time of the command
    /// that made it known here (for those already missing at start-up: the start).
    pub since: Instant,
}

/// The blobs lacked here outside the window the index holds, as the last scan counted them.
#[derive(Debug, Clone)]
struct Beyond {
    count: u64,
    bytes: u64,
    /// Since when the oldest of them has been lacked, at the latest.
    since: Instant,
    /// The last digest of the window: the next scan holds those after it first.
    cursor: Option<Digest>,
    /// Whether a scan counted them; if not (the index ran out of room as entries were
    /// folded in), `count` is the blobs newly lacked since and the next refresh scans.
    counted: bool,
}

struct Inner {
    wants: BTreeMap<Digest, Want>,
    /// Blobs here whose placement on this node the state does not record (yet: one just
    /// fetched; or never: the node stopped between a fetch and its record, or the file came
    /// back with a restore), with their sizes: taken by the repair worker, which proposes the
    /// placements the state still lacks by then.
    unrecorded: HashMap<Digest, u64>,
    /// The last journal index folded in; `None` until the first scan.
    folded: Option<u64>,
    /// Set while this node lacks more than the index holds (or has more unrecorded blobs).
    beyond: Option<Beyond>,
    /// When the last scan started.
    scanned: Option<Instant>,
}

/// The blobs this node lacks. Cheap to clone; clones share the index.
#[derive(Clone)]
pub struct Missing {
    meta: MetaNode,
    store: Arc<BlobStore>,
    held: usize,
    /// Least and longest time between two scans for the next window.
    rescan: (Duration, Duration),
    inner: Arc<Mutex<Inner>>,
    /// Held by the one refresh running: others skip theirs (the figures they read are then a
    /// moment old) rather than wait behind a scan.
    refreshing: Arc<Mutex<()>>,
}

impl Missing {
    pub fn new(meta: MetaNode, store: Arc<BlobStore>) -> Self {
        Self::holding(meta, store, HELD, (RESCAN_MIN, RESCAN_EVERY))
    }

    /// An index that holds at most `held` blobs of each kind and scans for the next window
    /// no sooner than `rescan.0` after the last and no later than `rescan.1`.
    pub fn holding(meta: MetaNode, store: Arc<BlobStore>, held: usize, rescan: (Duration, Duration)) -> Self {
        let inner =
            Inner { wants: BTreeMap::new(), unrecorded: HashMap::new(), folded: None, beyond: None, scanned: None };
        Missing {
            meta,
            store,
            held: held.max(2),
            rescan,
            inner: Arc::new(Mutex::new(inner)),
            refreshing: Default::default(),
        }
    }

    /// Brings the index up to the applied state: the first time, a scan of every placement;
    /// after that, the blob events of the journal entries applied since — or a scan again when
    /// the journal no longer holds them, or for the next window (see the module). Returns at
    /// once if another refresh is running, unless the index has not been filled yet (its
    /// figures would say nothing is missing).
    pub fn refresh(&self) {
        let filled = self.inner.lock().unwrap().folded.is_some();
        let _running = match self.refreshing.try_lock() {
            Ok(running) => running,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) if filled => return,
            Err(std::sync::TryLockError::WouldBlock) => self.refreshing.lock().unwrap_or_else(|p| p.into_inner()),
        };
        let reader = self.meta.reader();
        let rescan = {
            let inner = self.inner.lock().unwrap();
            let since = inner.scanned.map(|at| at.elapsed());
            inner.folded.is_none()
                || inner.beyond.as_ref().is_some_and(|b| {
                    since.is_none_or(|s| s >= self.rescan.0)
                        && (inner.wants.len() < self.held / 2 || !b.counted || since.is_none_or(|s| s >= self.rescan.1))
                })
        };
        if rescan {
            self.scan();
        }
        loop {
            let Some(folded) = self.inner.lock().unwrap().folded else { return };
            let Ok(entries) = reader.journal(folded + 1, STEP) else { return };
            // A trim (through the log, or in a snapshot installed from a leader that trimmed)
            // may have dropped entries after `folded` before they were read: this read then
            // started past them, and what they linked or removed would never be looked at
            // again (a blob this node lacks never fetched, one removed still counted as
            // missing). The first kept index only grows, so reading it after the entries
            // tells whether they started where they should.
            if reader.journal_first().is_ok_and(|first| first > folded + 1) {
                self.scan();
                return;
            }
            let Some(last) = entries.last().map(|e| e.index) else { return };
            let (now, now_ms) = (Instant::now(), raftyard_types::event::now_ms());
            let mut inner = self.inner.lock().unwrap();
            for e in &entries {
                let at = now.checked_sub(Duration::from_millis(now_ms.saturating_sub(e.time_ms))).unwrap_or(now);
                for ev in &e.events {
                    for d in digests_of(ev) {
                        self.recheck(&mut inner, d, at);
                    }
                }
            }
            inner.folded = Some(last);
        }
    }

    /// Rebuilds the index from every placement, holding at most `held` blobs of each kind —
    /// the lacked ones from the last window's end on, round again — and counting the rest (a
    /// blob still missing keeps the time it went missing). Runs without the index's lock, so
    /// that its figures stay readable during a scan of a million placements. Entries applied
    /// during the scan are folded again after it: re-checks are idempotent, so nothing is lost
    /// and nothing counted twice.
    fn scan(&self) {
        let reader = self.meta.reader();
        let started = Instant::now();
        let from = reader.applied_index();
        let (before, before_beyond, cursor) = {
            let inner = self.inner.lock().unwrap();
            let since: HashMap<Digest, Instant> = inner.wants.iter().map(|(d, w)| (d.clone(), w.since)).collect();
            let b = inner.beyond.as_ref();
            (since, b.map(|b| b.since), b.and_then(|b| b.cursor.clone()))
        };
        let me = self.meta.id();
        // the window: first those after the cursor, then from the start (`head`)
        let (mut wants, mut head) = (BTreeMap::new(), Vec::new());
        let mut unrecorded = HashMap::new();
        let (mut lacked, mut lacked_bytes, mut more_unrecorded) = (0u64, 0u64, false);
        for item in reader.blobs_iter() {
            let Ok((d, info)) = item else { return };
            match self.store.stat(&d) {
                None => {
                    lacked += 1;
                    lacked_bytes += info.size;
                    let want = Want { size: info.size, since: before.get(&d).copied().unwrap_or(started) };
                    if cursor.as_ref().is_none_or(|c| d > *c) {
                        if wants.len() < self.held {
                            wants.insert(d, want);
                        }
                    } else if head.len() < self.held {
                        head.push((d, want));
                    }
                }
                Some(size) if !info.holders.contains(&me) => {
                    if unrecorded.len() < self.held {
                        unrecorded.insert(d, size);
                    } else {
                        more_unrecorded = true;
                    }
                }
                Some(_) => {}
            }
        }
        // where this window ends: after its last blob past the cursor, or, if it went round,
        // its last blob from the start
        let mut next = wants.keys().next_back().cloned();
        for (d, w) in head.into_iter().take(self.held - wants.len()) {
            next = Some(d.clone());
            wants.insert(d, w);
        }
        let beyond = (lacked > wants.len() as u64 || more_unrecorded).then(|| {
            let held_bytes: u64 = wants.values().map(|w| w.size).sum();
            Beyond {
                count: lacked - wants.len() as u64,
                bytes: lacked_bytes.saturating_sub(held_bytes),
                since: before_beyond.unwrap_or(started),
                cursor: next,
                counted: true,
            }
        });
        let mut inner = self.inner.lock().unwrap();
        // a blob fetched while the scan ran, after it looked: its file is here now
        wants.retain(|d, _| self.store.stat(d).is_none());
        inner.wants = wants;
        inner.unrecorded = unrecorded;
        inner.beyond = beyond;
        inner.folded = Some(from);
        inner.scanned = Some(started);
    }

    /// [`Missing::refresh`] on a blocking thread: a scan stats every blob the registry knows,
    /// and any refresh reads the journal from disk.
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
    /// and the state does not list this node as its holder. While the index lacks room, a
    /// blob newly wanted is left to the next scan: counted now only if the index ran out of
    /// room since the last scan (after a scan, the figures cannot tell it from those it
    /// counted).
    fn classify(&self, inner: &mut Inner, d: &Digest, info: &raftyard_raft::state::BlobInfo, since: Instant) {
        match self.store.stat(d) {
            None if inner.wants.contains_key(d) => {}
            None if inner.wants.len() < self.held && inner.beyond.is_none() => {
                inner.wants.insert(d.clone(), Want { size: info.size, since });
            }
            None => {
                let cursor = inner.wants.keys().next_back().cloned();
                let b = inner.beyond.get_or_insert(Beyond { count: 0, bytes: 0, since, cursor, counted: false });
                if !b.counted {
                    b.count += 1;
                    b.bytes += info.size;
                    b.since = b.since.min(since);
                }
            }
            Some(size) => {
                inner.wants.remove(d);
                if !info.holders.contains(&self.meta.id()) {
                    if inner.unrecorded.len() < self.held {
                        inner.unrecorded.insert(d.clone(), size);
                    } else if inner.beyond.is_none() {
                        let cursor = inner.wants.keys().next_back().cloned();
                        inner.beyond = Some(Beyond { count: 0, bytes: 0, since, cursor, counted: false });
                    }
                }
            }
        }
    }

    /// The blobs here that the state did not record here when last looked at (see
    /// `Inner::unrecorded`), once.
    pub fn take_unrecorded(&self) -> Vec<(Digest, u64)> {
        std::mem::take(&mut self.inner.lock().unwrap().unrecorded).into_iter().collect()
    }

    /// What `f` makes of the blobs this node lacks, in digest order, for at most `limit` of
    /// them it accepts (`Some`). `f` runs under the index's lock.
    pub fn pick<T>(&self, limit: usize, f: impl FnMut(&Digest) -> Option<T>) -> Vec<T> {
        self.inner.lock().unwrap().wants.keys().filter_map(f).take(limit).collect()
    }

    /// Whether the index holds `d` as lacked here.
    #[cfg(test)]
    fn wants(&self, d: &Digest) -> bool {
        self.inner.lock().unwrap().wants.contains_key(d)
    }

    /// Keeps in `map` the blobs the index holds as lacked here, under one hold of its lock.
    pub fn retain_wanted<V>(&self, map: &mut std::collections::HashMap<Digest, V>) {
        let inner = self.inner.lock().unwrap();
        map.retain(|d, _| inner.wants.contains_key(d));
    }

    /// How many blobs the index holds as lacked here (at most [`HELD`]).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.inner.lock().unwrap().wants.len()
    }

    /// How many blobs this node lacks, their bytes, and since when the oldest has been missing.
    pub fn figures(&self) -> (u64, u64, Option<Instant>) {
        let inner = self.inner.lock().unwrap();
        let mut count = inner.wants.len() as u64;
        let mut bytes: u64 = inner.wants.values().map(|w| w.size).sum();
        let mut oldest = inner.wants.values().map(|w| w.since).min();
        if let Some(b) = inner.beyond.as_ref().filter(|b| b.count > 0) {
            count += b.count;
            bytes += b.bytes;
            oldest = Some(oldest.map_or(b.since, |o| o.min(b.since)));
        }
        (count, bytes, oldest)
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
        assert!(missing.wants(&gone), "a linked blob with no file here is wanted");

        node.propose(vec![Event::BlobUnlinked { repo: repo.clone(), digest: gone.clone() }]).await.unwrap();
        node.propose(vec![link(&linked)]).await.unwrap();
        let before = node.reader().applied_index() + 1;
        node.propose(vec![Event::JournalTrimmed { before }]).await.unwrap();
        assert!(node.reader().journal_first().unwrap() >= before, "the journal was trimmed");

        missing.refresh_off_runtime().await;
        let wants: Vec<Digest> = missing.pick(usize::MAX, |d| Some(d.clone()));
        assert_eq!(wants, vec![linked], "after the gap");
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        node: MetaNode,
        store: Arc<BlobStore>,
        repo: RepoName,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let addr = NodeAddr { peer: "127.0.0.1:1".into(), registry: "127.0.0.1:2".into() };
        let cfg = MetaNodeConfig::new(1, dir.path().join("meta"), addr);
        let node = MetaNode::start(cfg, raftyard_raft::network::NoNetwork, None).await.unwrap();
        let store = Arc::new(BlobStore::open(BlobStoreConfig::new(dir.path().join("blobs"), "1")).unwrap());
        node.wait_for_leader(Duration::from_secs(10)).await.expect("a leader");
        Fixture { _dir: dir, node, store, repo: RepoName::parse("many/app").unwrap() }
    }

    impl Fixture {
        /// Links `n` blobs this node has no file of, of sizes 1..=n; returns them.
        async fn link(&self, tag: &str, n: u64) -> Vec<Digest> {
            let blobs: Vec<(Digest, u64)> =
                (1..=n).map(|i| (Digest::sha256(format!("{tag} {i}").as_bytes()), i)).collect();
            let events = blobs
                .iter()
                .map(|(d, size)| Event::BlobLinked { repo: self.repo.clone(), digest: d.clone(), size: *size })
                .collect();
            self.node.propose(events).await.unwrap();
            blobs.into_iter().map(|(d, _)| d).collect()
        }

        /// Puts a file for `d` where the store looks for it, as a fetch would.
        fn fetch(&self, d: &Digest) {
            let path = self.store.path_of(d);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"x").unwrap();
        }
    }

    /// A node that lacks more blobs than the index holds (a new node of a large registry)
    /// holds only a window of them but counts them all, and reaches every one of them as the
    /// windows it holds are fetched.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_lacking_more_than_the_index_holds_counts_them_all_and_reaches_each() {
        let f = fixture().await;
        let missing = Missing::holding(f.node.clone(), f.store.clone(), 4, (Duration::ZERO, Duration::from_secs(3600)));
        let all = f.link("first", 10).await;
        missing.refresh_off_runtime().await;
        let (count, bytes, oldest) = missing.figures();
        assert_eq!((count, bytes), (10, 55), "every blob lacked is counted, held or not");
        assert!(oldest.is_some());
        assert_eq!(missing.held(), 4, "no more than the index holds");

        // linked while the index is full: not held, found by a later scan
        let more = f.link("second", 3).await;
        missing.refresh_off_runtime().await;
        assert_eq!(missing.held(), 4, "still no more than the index holds");

        let mut fetched = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let window: Vec<Digest> = missing.pick(usize::MAX, |d| Some(d.clone()));
            assert!(window.len() <= 4, "a window of {}", window.len());
            for d in window {
                f.fetch(&d);
                missing.resolve(&d);
                assert!(fetched.insert(d), "a blob fetched once is not wanted again");
            }
            missing.refresh_off_runtime().await;
            if missing.figures().0 == 0 {
                break;
            }
        }
        let expected: std::collections::BTreeSet<Digest> = all.into_iter().chain(more).collect();
        assert_eq!(fetched, expected, "every blob lacked was handed out, once");
        assert_eq!(missing.figures(), (0, 0, None));
        assert_eq!(missing.held(), 0);

        // exact again: a blob linked now is held at once
        let last = f.link("third", 1).await;
        missing.refresh_off_runtime().await;
        assert_eq!(missing.pick(usize::MAX, |d| Some(d.clone())), last);
    }

    /// An index that runs out of room as it folds in new entries (a node replaying a long log)
    /// still counts every blob lacked and their bytes (a scan makes the figures exact later).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_index_that_runs_out_of_room_while_folding_keeps_counting() {
        let f = fixture().await;
        let missing = Missing::holding(
            f.node.clone(),
            f.store.clone(),
            4,
            (Duration::from_secs(3600), Duration::from_secs(3600)),
        );
        f.link("before", 3).await;
        missing.refresh_off_runtime().await;
        assert_eq!(missing.figures().0, 3);
        f.link("after", 5).await;
        missing.refresh_off_runtime().await;
        assert_eq!(missing.held(), 4, "no more than the index holds");
        assert_eq!(missing.figures().0, 8, "counted as they were folded in");
        assert_eq!(missing.figures().1, 6 + 15, "and their bytes");
    }

    /// Blobs that no fetch brings (no source has them) do not keep the index from handing
    /// out the others: the window moves on past them, and comes round to them again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blobs_that_cannot_be_fetched_do_not_hold_the_window() {
        let f = fixture().await;
        let missing = Missing::holding(f.node.clone(), f.store.clone(), 4, (Duration::ZERO, Duration::ZERO));
        let all = f.link("lost or not", 12).await;
        missing.refresh_off_runtime().await;
        // the whole first window is lost for good
        let lost: Vec<Digest> = missing.pick(usize::MAX, |d| Some(d.clone()));
        assert_eq!(lost.len(), 4);
        let mut seen_lost_again = false;
        for round in 0..30 {
            let window: Vec<Digest> = missing.pick(usize::MAX, |d| Some(d.clone()));
            assert!(window.len() <= 4);
            if round > 0 && window.iter().any(|d| lost.contains(d)) {
                seen_lost_again = true;
            }
            for d in window.iter().filter(|d| !lost.contains(d)) {
                f.fetch(d);
                missing.resolve(d);
            }
            missing.refresh_off_runtime().await;
            if missing.figures().0 == lost.len() as u64 && seen_lost_again {
                break;
            }
        }
        let left: Vec<Digest> = all.iter().filter(|d| f.store.stat(d).is_none()).cloned().collect();
        assert_eq!(left.len(), lost.len(), "every blob but the lost ones was handed out");
        assert_eq!(missing.figures().0, 4, "the lost ones are still counted");
        assert!(seen_lost_again, "the window came round to the lost ones again");
    }
}
