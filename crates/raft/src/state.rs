//! The event-sourced state machine: folds committed [`Command`]s into the `state` tree, and
//! answers reads from it ([`StateReader`]).
//!
//! Each log entry is applied as one sled batch holding the command's writes, its journal entry
//! and `last_applied`, so a crash leaves the state at an entry boundary and openraft re-applies
//! from there. Validation happens here, at apply time, so that it is deterministic and cannot
//! race: a manifest whose references vanished before it was applied is rejected on every node.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{Entry, EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, SnapshotMeta, StoredMembership};
use raftyard_types::event::VersionedJournalEntry;
use raftyard_types::{Command, Digest, Event, JournalEntry, Outcome, Rejection, RepoName, Tag};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::keys;
use crate::watchdog::StorageWatch;
use crate::{storage_err, LogId, NodeAddr, NodeId, StorageError, TypeConfig};

/// A stored manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub media_type: String,
    pub bytes: Vec<u8>,
    pub subject: Option<Digest>,
    pub artifact_type: Option<String>,
    /// Proposer time of the push, ms since the epoch.
    pub created_ms: u64,
}

/// Which nodes hold a blob.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobInfo {
    pub size: u64,
    pub holders: Vec<NodeId>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct StoredSnapshot {
    pub(crate) meta: SnapshotMeta<NodeId, NodeAddr>,
    pub(crate) data: Vec<u8>,
}

type Membership = StoredMembership<NodeId, NodeAddr>;
/// Key/value pairs of the state tree.
type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

pub(crate) fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("in-memory values always encode")
}

pub(crate) fn dec<T: serde::de::DeserializeOwned>(v: &[u8]) -> Option<T> {
    bincode::deserialize(v).ok()
}

/// Pending writes of one entry over the committed tree.
struct Tx<'a> {
    tree: &'a sled::Tree,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> Tx<'a> {
    fn new(tree: &'a sled::Tree) -> Self {
        Tx { tree, writes: BTreeMap::new() }
    }
    fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, sled::Error> {
        match self.writes.get(k) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.tree.get(k)?.map(|v| v.to_vec())),
        }
    }
    fn has(&self, k: &[u8]) -> Result<bool, sled::Error> {
        Ok(self.get(k)?.is_some())
    }
    fn put(&mut self, k: Vec<u8>, v: Vec<u8>) {
        self.writes.insert(k, Some(v));
    }
    fn del(&mut self, k: Vec<u8>) {
        self.writes.insert(k, None);
    }
    fn scan(&self, prefix: &[u8]) -> Result<Pairs, sled::Error> {
        let mut out: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for kv in self.tree.scan_prefix(prefix) {
            let (k, v) = kv?;
            out.insert(k.to_vec(), v.to_vec());
        }
        for (k, v) in self.writes.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(v) => out.insert(k.clone(), v.clone()),
                None => out.remove(k),
            };
        }
        Ok(out.into_iter().collect())
    }
    fn into_batch(self) -> sled::Batch {
        let mut b = sled::Batch::default();
        for (k, v) in self.writes {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        b
    }
}

/// Applies one event to the pending writes. Returns a rejection if the event cannot apply.
fn apply_event(tx: &mut Tx, ev: &Event, time_ms: u64) -> Result<Result<(), Rejection>, sled::Error> {
    match ev {
        Event::BlobLinked { repo, digest, size } => {
            tx.put(keys::link(repo.as_str(), &digest.to_string()), size.to_be_bytes().to_vec());
            tx.put(keys::linked_by(&digest.to_string(), repo.as_str()), vec![]);
            tx.put(keys::repo(repo.as_str()), vec![]);
            let bk = keys::blob(&digest.to_string());
            if !tx.has(&bk)? {
                tx.put(bk, enc(&BlobInfo { size: *size, holders: vec![] }));
            }
        }
        Event::BlobUnlinked { repo, digest } => {
            let ds = digest.to_string();
            let k = keys::link(repo.as_str(), &ds);
            if !tx.has(&k)? {
                return Ok(Err(Rejection::BlobUnknown(digest.clone())));
            }
            tx.del(k);
            tx.del(keys::linked_by(&ds, repo.as_str()));
            // unlinked everywhere: the blob is gone from the registry (no mount finds it, no
            // node fetches it any more); its files are garbage for collection
            if tx.scan(&keys::links_of(&ds))?.is_empty() {
                tx.del(keys::blob(&ds));
            }
        }
        Event::BlobPlaced { digest, size, node } => {
            let bk = keys::blob(&digest.to_string());
            // a placement arriving after the blob's last link went (a late repair) records
            // nothing: it must not bring the blob back
            let Some(mut info) = tx.get(&bk)?.and_then(|v| dec::<BlobInfo>(&v)) else {
                return Ok(Ok(()));
            };
            info.size = *size;
            if !info.holders.contains(node) {
                info.holders.push(*node);
                info.holders.sort();
            }
            tx.put(bk, enc(&info));
        }
        Event::BlobDropped { digest, node } => {
            let bk = keys::blob(&digest.to_string());
            if let Some(mut info) = tx.get(&bk)?.and_then(|v| dec::<BlobInfo>(&v)) {
                info.holders.retain(|n| n != node);
                tx.put(bk, enc(&info));
            }
        }
        Event::ManifestPut { repo, digest, media_type, bytes, refs, subject, artifact_type } => {
            let r = repo.as_str();
            let mut missing = Vec::new();
            for d in refs {
                let ds = d.to_string();
                if !tx.has(&keys::link(r, &ds))? && !tx.has(&keys::manifest(r, &ds))? {
                    missing.push(d.clone());
                }
            }
            if !missing.is_empty() {
                return Ok(Err(Rejection::ManifestBlobUnknown(missing)));
            }
            let ds = digest.to_string();
            let rec = ManifestRecord {
                media_type: media_type.clone(),
                bytes: bytes.clone(),
                subject: subject.clone(),
                artifact_type: artifact_type.clone(),
                created_ms: time_ms,
            };
            tx.put(keys::manifest(r, &ds), enc(&rec));
            tx.put(keys::repo(r), vec![]);
            if let Some(s) = subject {
                tx.put(keys::referrer(r, &s.to_string(), &ds), vec![]);
            }
        }
        Event::TagSet { repo, tag, digest, expect } => {
            let r = repo.as_str();
            if !tx.has(&keys::manifest(r, &digest.to_string()))? {
                return Ok(Err(Rejection::ManifestUnknown));
            }
            let tk = keys::tag(r, tag.as_str());
            if let Some(expect) = expect {
                let current = tx.get(&tk)?.and_then(|v| Digest::parse(std::str::from_utf8(&v).ok()?).ok());
                if &current != expect {
                    return Ok(Err(Rejection::TagConflict { tag: tag.clone(), current }));
                }
            }
            tx.put(tk, digest.to_string().into_bytes());
        }
        Event::TagDeleted { repo, tag } => {
            let tk = keys::tag(repo.as_str(), tag.as_str());
            if !tx.has(&tk)? {
                return Ok(Err(Rejection::ManifestUnknown));
            }
            tx.del(tk);
        }
        Event::ManifestDeleted { repo, digest } => {
            let r = repo.as_str();
            let ds = digest.to_string();
            let mk = keys::manifest(r, &ds);
            let Some(rec) = tx.get(&mk)?.and_then(|v| dec::<ManifestRecord>(&v)) else {
                return Ok(Err(Rejection::ManifestUnknown));
            };
            tx.del(mk);
            for (k, v) in tx.scan(&keys::tags_of(r))? {
                if v == ds.as_bytes() {
                    tx.del(k);
                }
            }
            if let Some(s) = rec.subject {
                tx.del(keys::referrer(r, &s.to_string(), &ds));
            }
        }
        Event::BlobsSwept { digests, .. } => {
            for d in digests {
                tx.del(keys::blob(&d.to_string()));
            }
        }
    }
    Ok(Ok(()))
}

/// Read access to the applied state. Cheap to clone; reads see whole applied entries.
#[derive(Clone)]
pub struct StateReader {
    tree: sled::Tree,
    applied: watch::Receiver<u64>,
}

fn io<E: std::fmt::Display>(e: E) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl StateReader {
    /// Index of the last applied log entry.
    pub fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    /// The applied index and a SHA-256 (hex) over every key and value of the state, read in
    /// one pass. Nodes that applied the same log have the same digest.
    pub fn digest(&self) -> std::io::Result<(u64, String)> {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        let mut applied = 0;
        for kv in self.tree.iter() {
            let (k, v) = kv.map_err(io)?;
            if &*k == crate::keys::APPLIED {
                applied = dec::<LogId>(&v).map_or(0, |l| l.index);
            }
            h.update((k.len() as u64).to_be_bytes());
            h.update(&k);
            h.update((v.len() as u64).to_be_bytes());
            h.update(&v);
        }
        Ok((applied, hex::encode(h.finalize())))
    }

    /// Waits until the state has applied at least `index`.
    pub async fn wait_applied(&self, index: u64) {
        let mut rx = self.applied.clone();
        let _ = rx.wait_for(|a| *a >= index).await;
    }

    pub fn blob_link(&self, repo: &RepoName, digest: &Digest) -> std::io::Result<Option<u64>> {
        Ok(self
            .tree
            .get(keys::link(repo.as_str(), &digest.to_string()))
            .map_err(io)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// Any repository linking this blob (for mounts without `from`).
    pub fn blob_info(&self, digest: &Digest) -> std::io::Result<Option<BlobInfo>> {
        Ok(self.tree.get(keys::blob(&digest.to_string())).map_err(io)?.and_then(|v| dec(&v)))
    }

    pub fn manifest(&self, repo: &RepoName, digest: &Digest) -> std::io::Result<Option<ManifestRecord>> {
        Ok(self.tree.get(keys::manifest(repo.as_str(), &digest.to_string())).map_err(io)?.and_then(|v| dec(&v)))
    }

    pub fn tag(&self, repo: &RepoName, tag: &Tag) -> std::io::Result<Option<Digest>> {
        Ok(self
            .tree
            .get(keys::tag(repo.as_str(), tag.as_str()))
            .map_err(io)?
            .and_then(|v| Digest::parse(std::str::from_utf8(&v).ok()?).ok()))
    }

    /// Tags in ASCII order, strictly after `last`, at most `n`.
    pub fn tags(&self, repo: &RepoName, last: Option<&str>, n: usize) -> std::io::Result<Vec<String>> {
        let prefix = keys::tags_of(repo.as_str());
        let start = match last {
            Some(l) => {
                let mut k = keys::tag(repo.as_str(), l);
                k.push(0); // strictly after
                k
            }
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        for kv in self.tree.range(start..) {
            let (k, _) = kv.map_err(io)?;
            if !k.starts_with(&prefix) || out.len() >= n {
                break;
            }
            out.push(keys::suffix(&k, &prefix).to_string());
        }
        Ok(out)
    }

    pub fn repo_exists(&self, repo: &RepoName) -> std::io::Result<bool> {
        self.tree.contains_key(keys::repo(repo.as_str())).map_err(io)
    }

    /// Repositories in ASCII order, strictly after `last`, at most `n`.
    pub fn repos(&self, last: Option<&str>, n: usize) -> std::io::Result<Vec<String>> {
        let start = match last {
            Some(l) => {
                let mut k = keys::repo(l);
                k.push(0);
                k
            }
            None => keys::REPOS.to_vec(),
        };
        let mut out = Vec::new();
        for kv in self.tree.range(start..) {
            let (k, _) = kv.map_err(io)?;
            if !k.starts_with(keys::REPOS) || out.len() >= n {
                break;
            }
            out.push(keys::suffix(&k, keys::REPOS).to_string());
        }
        Ok(out)
    }

    /// Every blob the registry knows, with its placement.
    pub fn blobs(&self) -> std::io::Result<Vec<(Digest, BlobInfo)>> {
        let prefix = keys::blob("");
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, v) = kv.map_err(io)?;
            if let (Ok(d), Some(info)) = (Digest::parse(keys::suffix(&k, &prefix)), dec::<BlobInfo>(&v)) {
                out.push((d, info));
            }
        }
        Ok(out)
    }

    /// Digests of the manifests in `repo` whose subject is `subject`.
    pub fn referrers(&self, repo: &RepoName, subject: &Digest) -> std::io::Result<Vec<Digest>> {
        let prefix = keys::referrers_of(repo.as_str(), &subject.to_string());
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, _) = kv.map_err(io)?;
            if let Ok(d) = Digest::parse(keys::suffix(&k, &prefix)) {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// The latest journal entry (the last command applied here), if any.
    pub fn last_journal_entry(&self) -> std::io::Result<Option<JournalEntry>> {
        let Some(kv) = self.tree.range(keys::journal(0)..keys::journal(u64::MAX)).next_back() else {
            return Ok(None);
        };
        let (_, v) = kv.map_err(io)?;
        Ok(dec::<VersionedJournalEntry>(&v).map(Into::into))
    }

    /// Journal entries with index ≥ `since`, at most `limit`.
    pub fn journal(&self, since: u64, limit: usize) -> std::io::Result<Vec<JournalEntry>> {
        let mut out = Vec::new();
        for kv in self.tree.range(keys::journal(since)..) {
            let (k, v) = kv.map_err(io)?;
            if !k.starts_with(keys::JOURNAL) || out.len() >= limit {
                break;
            }
            if let Some(e) = dec::<VersionedJournalEntry>(&v) {
                out.push(e.into());
            }
        }
        Ok(out)
    }
}

/// The openraft state machine over the `state` tree.
pub struct StateMachine {
    db: sled::Db,
    state: sled::Tree,
    snap: sled::Tree,
    applied_tx: Arc<watch::Sender<u64>>,
    watch: StorageWatch,
    /// Held while the stored snapshot is compared and replaced.
    snap_lock: Arc<std::sync::Mutex<()>>,
}

/// The current version of the state's layout.
const LAYOUT: u32 = 2;

/// Brings a state written by an earlier version to the current layout, in one batch; derived
/// keys only, so every node that does it ends with the same state.
/// - 1 → 2: the `L/` index of the repositories linking each blob, built from `b/`.
fn migrate(state: &sled::Tree) -> Result<(), sled::Error> {
    let version = state.get(keys::LAYOUT)?.and_then(|v| v.as_ref().try_into().ok().map(u32::from_be_bytes));
    if version.unwrap_or(1) >= LAYOUT {
        return Ok(());
    }
    let mut batch = sled::Batch::default();
    for kv in state.scan_prefix(keys::LINKS) {
        let (k, _) = kv?;
        if let Some((repo, digest)) = keys::suffix(&k, keys::LINKS).split_once('\0') {
            batch.insert(keys::linked_by(digest, repo), vec![]);
        }
    }
    batch.insert(keys::LAYOUT, LAYOUT.to_be_bytes().to_vec());
    state.apply_batch(batch)?;
    tracing::info!(layout = LAYOUT, "metadata state migrated to the current layout");
    Ok(())
}

impl StateMachine {
    /// Opens the state's trees (migrating an earlier layout); every blocking write runs under
    /// `watch`.
    pub fn open(db: &sled::Db, watch: StorageWatch) -> Result<Self, sled::Error> {
        let state = db.open_tree("state")?;
        migrate(&state)?;
        let snap = db.open_tree("snapshot")?;
        let applied: Option<LogId> = state.get(keys::APPLIED)?.and_then(|v| dec(&v));
        let (tx, _) = watch::channel(applied.map(|l| l.index).unwrap_or(0));
        Ok(StateMachine { db: db.clone(), state, snap, applied_tx: Arc::new(tx), watch, snap_lock: Default::default() })
    }

    pub fn reader(&self) -> StateReader {
        StateReader { tree: self.state.clone(), applied: self.applied_tx.subscribe() }
    }

    fn read_applied(&self) -> Result<(Option<LogId>, Membership), StorageError> {
        let err = |e| storage_err(ErrorSubject::StateMachine, ErrorVerb::Read, e);
        let applied = self.state.get(keys::APPLIED).map_err(err)?.and_then(|v| dec(&v));
        let membership = self.state.get(keys::MEMBERSHIP).map_err(err)?.and_then(|v| dec(&v)).unwrap_or_default();
        Ok((applied, membership))
    }

    fn apply_entry(&self, entry: &Entry<TypeConfig>) -> Result<Option<Outcome>, sled::Error> {
        let mut tx = Tx::new(&self.state);
        let log_id = entry.log_id;
        let outcome = match &entry.payload {
            EntryPayload::Blank => None,
            EntryPayload::Membership(m) => {
                tx.put(keys::MEMBERSHIP.to_vec(), enc(&Membership::new(Some(log_id), m.clone())));
                None
            }
            EntryPayload::Normal(cmd) => {
                let cmd: Command = cmd.clone().into();
                let mut outcome = Ok(());
                for ev in &cmd.events {
                    if let Err(rej) = apply_event(&mut tx, ev, cmd.time_ms)? {
                        outcome = Err(rej);
                        break;
                    }
                }
                if outcome.is_ok() {
                    let je = JournalEntry { index: log_id.index, time_ms: cmd.time_ms, events: cmd.events };
                    tx.put(keys::journal(log_id.index), enc(&VersionedJournalEntry::V1(je)));
                } else {
                    // All or nothing: drop the partial writes of a rejected command.
                    tx.writes.clear();
                }
                Some(outcome)
            }
        };
        tx.put(keys::APPLIED.to_vec(), enc(&log_id));
        let batch = tx.into_batch();
        self.watch.run("state apply", || self.state.apply_batch(batch))?;
        Ok(outcome)
    }

    fn load_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError> {
        load_stored_snapshot(&self.snap).map_err(|e| storage_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))
    }
}

/// Keys of the `snapshot` tree: the latest snapshot's meta and its data, written in one batch.
/// (`current`, a bincode [`StoredSnapshot`] of both, is what earlier versions wrote.)
const SNAP_META: &[u8] = b"meta";
const SNAP_DATA: &[u8] = b"data";
const SNAP_LEGACY: &[u8] = b"current";

/// The stored snapshot of a `snapshot` tree, if any.
pub(crate) fn load_stored_snapshot(snap: &sled::Tree) -> Result<Option<StoredSnapshot>, sled::Error> {
    if let (Some(meta), Some(data)) = (snap.get(SNAP_META)?, snap.get(SNAP_DATA)?) {
        return Ok(dec(&meta).map(|meta| StoredSnapshot { meta, data: data.to_vec() }));
    }
    Ok(snap.get(SNAP_LEGACY)?.and_then(|v| dec(&v)))
}

/// The log id of the stored snapshot, read without its data.
fn stored_snapshot_log_id(snap: &sled::Tree) -> Result<Option<LogId>, sled::Error> {
    if let Some(meta) = snap.get(SNAP_META)? {
        return Ok(dec::<SnapshotMeta<NodeId, NodeAddr>>(&meta).and_then(|m| m.last_log_id));
    }
    // an earlier version's: the meta comes first in its encoding
    Ok(snap.get(SNAP_LEGACY)?.and_then(|v| dec::<SnapshotMeta<NodeId, NodeAddr>>(&v)).and_then(|m| m.last_log_id))
}

/// Stores a snapshot as the latest one.
fn store_snapshot(snap: &sled::Tree, meta: &SnapshotMeta<NodeId, NodeAddr>, data: &[u8]) -> Result<(), sled::Error> {
    let mut batch = sled::Batch::default();
    batch.insert(SNAP_META, enc(meta));
    batch.insert(SNAP_DATA, data);
    batch.remove(SNAP_LEGACY);
    snap.apply_batch(batch)
}

/// The state's pairs in the snapshot data format (the bincode of `Vec<(Vec<u8>, Vec<u8>)>`:
/// a u64 count, then each key and value as a u64 length and its bytes, little endian),
/// written straight from the iterator: no copy of the pairs besides the encoding itself.
fn encode_pairs(
    pairs: impl Iterator<Item = Result<(sled::IVec, sled::IVec), sled::Error>>,
) -> Result<Vec<u8>, sled::Error> {
    let mut out = vec![0u8; 8];
    let mut n: u64 = 0;
    for kv in pairs {
        let (k, v) = kv?;
        for part in [&k[..], &v[..]] {
            out.extend_from_slice(&(part.len() as u64).to_le_bytes());
            out.extend_from_slice(part);
        }
        n += 1;
    }
    out[..8].copy_from_slice(&n.to_le_bytes());
    Ok(out)
}

/// The pairs of snapshot data, borrowed from it.
fn decode_pairs(data: &[u8]) -> Result<Vec<(&[u8], &[u8])>, String> {
    let bad = || "snapshot data is truncated".to_string();
    let mut rest = data;
    let mut take = |len: usize| -> Result<&[u8], String> {
        let (a, b) = rest.split_at_checked(len).ok_or_else(bad)?;
        rest = b;
        Ok(a)
    };
    let n = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
    let mut out = Vec::new();
    for _ in 0..n {
        let klen = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")) as usize;
        let k = take(klen)?;
        let vlen = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")) as usize;
        let v = take(vlen)?;
        out.push((k, v));
    }
    Ok(out)
}

/// Gives memory freed after a snapshot (the size of the whole state, for a moment) back to the
/// operating system, so that it does not stay in the process's resident size.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        self.read_applied()
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let mut last = None;
        for entry in entries {
            let r = self
                .apply_entry(&entry)
                .map_err(|e| storage_err(ErrorSubject::Apply(entry.log_id), ErrorVerb::Write, e))?;
            out.push(r.unwrap_or(Ok(())));
            last = Some(entry.log_id.index);
        }
        if let Some(i) = last {
            self.applied_tx.send_replace(i);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        // Copy the state now, while no entry is being applied: the snapshot is consistent. A read
        // error fails the build (a snapshot missing keys would be installed as the whole state).
        let _g = self.watch.enter("snapshot read");
        let copy = encode_pairs(self.state.iter())
            .map_err(|e| storage_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))
            .and_then(|data| self.read_applied().map(|(applied, membership)| (data, applied, membership)));
        SnapshotBuilder {
            db: self.db.clone(),
            snap: self.snap.clone(),
            copy: Some(copy),
            watch: self.watch.clone(),
            lock: self.snap_lock.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeAddr>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let sig = Some(meta.signature());
        let data = snapshot.into_inner();
        let werr = |e| storage_err(ErrorSubject::Snapshot(sig.clone()), ErrorVerb::Write, e);
        let _g = self.watch.enter("snapshot install");
        {
            let pairs = decode_pairs(&data)
                .map_err(|e| storage_err(ErrorSubject::Snapshot(sig.clone()), ErrorVerb::Read, e))?;
            let mut batch = sled::Batch::default();
            for kv in self.state.iter() {
                batch.remove(kv.map_err(werr)?.0);
            }
            for (k, v) in pairs {
                batch.insert(k, v);
            }
            if let Some(l) = meta.last_log_id {
                batch.insert(keys::APPLIED, enc(&l));
            }
            batch.insert(keys::MEMBERSHIP, enc(&meta.last_membership));
            self.state.apply_batch(batch).map_err(werr)?;
        }
        // a snapshot taken by an earlier version
        migrate(&self.state).map_err(werr)?;
        {
            let _l = self.snap_lock.lock().unwrap();
            store_snapshot(&self.snap, meta, &data).map_err(werr)?;
        }
        drop(data);
        self.db.flush_async().await.map_err(werr)?;
        self.applied_tx.send_replace(meta.last_log_id.map(|l| l.index).unwrap_or(0));
        release_freed_memory();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.load_snapshot()?.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

/// A copy of the state: its pairs (encoded as snapshot data), applied log id and membership.
type StateCopy = (Vec<u8>, Option<LogId>, Membership);

/// Builds a snapshot from a copy of the state taken by `get_snapshot_builder`.
pub struct SnapshotBuilder {
    db: sled::Db,
    snap: sled::Tree,
    /// The state's pairs, applied log id and membership, or why they could not be read.
    copy: Option<Result<StateCopy, StorageError>>,
    watch: StorageWatch,
    /// Held while the stored snapshot is compared and replaced.
    lock: Arc<std::sync::Mutex<()>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (data, applied, membership) = self
            .copy
            .take()
            .unwrap_or_else(|| Err(storage_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, "built twice")))?;
        let snapshot_id = match applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, data.len()),
            None => format!("0-0-{}", data.len()),
        };
        let meta = SnapshotMeta { last_log_id: applied, last_membership: membership, snapshot_id };
        let werr = |e| storage_err(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Write, e);
        let _g = self.watch.enter("snapshot write");
        {
            // A snapshot installed from the leader while this one was being built may be
            // newer: the stored snapshot only ever moves forward.
            let _l = self.lock.lock().unwrap();
            if stored_snapshot_log_id(&self.snap).map_err(werr)? <= applied {
                store_snapshot(&self.snap, &meta, &data).map_err(werr)?;
            }
        }
        // The state machine is flushed too, so logs purged after this snapshot are never needed.
        self.db.flush_async().await.map_err(werr)?;
        release_freed_memory();
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streamed encoding is the bincode of the pairs that earlier versions wrote (and that
    /// backups hold), both ways.
    #[test]
    fn snapshot_data_is_the_bincode_of_the_pairs() {
        let pairs: Pairs = vec![(b"a".to_vec(), vec![]), (b"b/x\0y".to_vec(), vec![1, 2, 3]), (vec![], b"z".to_vec())];
        let ivecs = pairs.iter().map(|(k, v)| Ok((sled::IVec::from(k.as_slice()), sled::IVec::from(v.as_slice()))));
        let data = encode_pairs(ivecs).unwrap();
        assert_eq!(data, bincode::serialize(&pairs).unwrap());
        let back: Vec<(Vec<u8>, Vec<u8>)> =
            decode_pairs(&data).unwrap().into_iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        assert_eq!(back, pairs);
        assert!(decode_pairs(&data[..data.len() - 1]).is_err());
    }
}
