//! The event-sourced state machine: folds committed [`Command`]s into the `state` tree, and
//! answers reads from it ([`StateReader`]).
//!
//! Each log entry is applied as one sled batch holding the command's writes, its journal entry
//! and `last_applied`, so a crash leaves the state at an entry boundary and openraft re-applies
//! from there. Validation happens here, at apply time, so that it is deterministic and cannot
//! race: a manifest whose references vanished before it was applied is rejected on every node.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{Entry, EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, SnapshotMeta, StoredMembership};
use raftyard_types::access::{
    AccessState, Actions, Grant, RepoGlob, RobotRecord, SigningKey, Subject, UserRecord, KEYS_KEPT,
};
use raftyard_types::event::VersionedJournalEntry;
use raftyard_types::lifecycle::{QuotaUsage, Usage};
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
    /// Whether any key starts with `prefix`.
    fn any(&self, prefix: &[u8]) -> Result<bool, sled::Error> {
        for kv in self.tree.scan_prefix(prefix) {
            let (k, _) = kv?;
            if !matches!(self.writes.get(k.as_ref()), Some(None)) {
                return Ok(true);
            }
        }
        Ok(self.writes.range(prefix.to_vec()..).take_while(|(k, _)| k.starts_with(prefix)).any(|(_, v)| v.is_some()))
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

/// At most this many expired proposal ids are forgotten per applied command: the work of an
/// apply stays bounded, and ids expire at most at the rate they are made.
const FORGET_PER_APPLY: usize = 4;
/// An id is kept for at least this many log entries after its own, whatever the clocks say:
/// a proposer whose clock is far ahead (its cutoff in the future) or far behind (its ids
/// stamped in the past) cannot make an id be forgotten while its proposer may still retry.
const PROPOSAL_MEMORY_ENTRIES: u64 = 10_000;

/// Records the outcome of proposal `id` (see `VersionedCommand::V2`) applied at `index`, and
/// forgets the oldest ids both older than `PROPOSAL_MEMORY_MS` before `time_ms` and more than
/// [`PROPOSAL_MEMORY_ENTRIES`] entries before `index`. Deterministic: it depends only on the
/// state and the entry.
fn remember_proposal(tx: &mut Tx, id: u64, time_ms: u64, index: u64, outcome: &Outcome) -> Result<(), sled::Error> {
    tx.put(keys::proposal(id), enc(&(time_ms, outcome)));
    tx.put(keys::proposal_at(time_ms, id), index.to_be_bytes().to_vec());
    let cutoff = time_ms.saturating_sub(raftyard_types::event::PROPOSAL_MEMORY_MS);
    for kv in tx.tree.scan_prefix(keys::PROPOSALS_BY_TIME).take(FORGET_PER_APPLY) {
        let (k, v) = kv?;
        let rest = &k[keys::PROPOSALS_BY_TIME.len()..];
        let word = |i: usize| rest.get(i..i + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
        let (Some(at), Some(old)) = (word(0), word(8)) else {
            tx.del(k.to_vec());
            continue;
        };
        if at >= cutoff {
            break;
        }
        let applied_at = v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
        if applied_at.saturating_add(PROPOSAL_MEMORY_ENTRIES) > index {
            continue; // old by its clock, but recent in the log
        }
        tx.del(k.to_vec());
        tx.del(keys::proposal(old));
    }
    Ok(())
}

/// Applies one event to the pending writes. Returns a rejection if the event cannot apply.
fn apply_event(tx: &mut Tx, ev: &Event, time_ms: u64) -> Result<Result<(), Rejection>, sled::Error> {
    match ev {
        Event::BlobLinked { repo, digest, size } => return link_blob(tx, repo, digest, *size, time_ms),
        Event::BlobMounted { repo, digest, size } => {
            // the blob must still be in the registry: once no repository links it, a collection
            // may remove its files at any time
            if !tx.has(&keys::blob(&digest.to_string()))? {
                return Ok(Err(Rejection::BlobUnknown(digest.clone())));
            }
            return link_blob(tx, repo, digest, *size, time_ms);
        }
        Event::BlobUnlinked { repo, digest } => {
            let ds = digest.to_string();
            if !tx.has(&keys::link(repo.as_str(), &ds))? {
                return Ok(Err(Rejection::BlobUnknown(digest.clone())));
            }
            unlink_blob(tx, repo.as_str(), &ds)?;
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
            if !tx.has(&keys::manifest(r, &ds))? {
                let adds = Usage { bytes: bytes.len() as u64, blobs: 0, manifests: 1 };
                if let Err(rej) = account(tx, r, adds, 1)? {
                    return Ok(Err(rej));
                }
            }
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
            if protocol(tx)?.0 >= PROTOCOL_INDEXES {
                for d in refs {
                    tx.put(keys::reference(r, &d.to_string(), &ds), vec![]);
                }
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
            if protocol(tx)?.0 >= PROTOCOL_INDEXES {
                tx.put(keys::tag_time(r, tag.as_str()), time_ms.to_be_bytes().to_vec());
            }
        }
        Event::TagDeleted { repo, tag } => {
            let tk = keys::tag(repo.as_str(), tag.as_str());
            if !tx.has(&tk)? {
                return Ok(Err(Rejection::ManifestUnknown));
            }
            tx.del(tk);
            tx.del(keys::tag_time(repo.as_str(), tag.as_str()));
        }
        Event::TagExpired { repo, tag, digest } => {
            let (r, t) = (repo.as_str(), tag.as_str());
            if tx.get(&keys::tag(r, t))?.is_some_and(|v| v == digest.to_string().as_bytes()) {
                tx.del(keys::tag(r, t));
                tx.del(keys::tag_time(r, t));
            }
        }
        Event::ClusterUpgraded { protocol } => upgrade(tx, *protocol, time_ms)?,
        Event::RetentionSet(p) => tx.put(keys::retention(p.repos.as_str()), enc(p)),
        Event::RetentionRemoved { repos } => {
            let k = keys::retention(repos.as_str());
            if !tx.has(&k)? {
                return Ok(Err(Rejection::RetentionUnknown(repos.as_str().to_string())));
            }
            tx.del(k);
        }
        Event::QuotaSet(q) => {
            if protocol(tx)?.0 < PROTOCOL_USAGE {
                return Ok(Err(Rejection::NeedsProtocol(PROTOCOL_USAGE)));
            }
            let mut used = Usage::default();
            for (k, v) in tx.scan(keys::USAGE)? {
                if q.repos.matches(keys::suffix(&k, keys::USAGE)) {
                    used = used.add(dec(&v).unwrap_or_default(), 1);
                }
            }
            tx.put(keys::quota(q.repos.as_str()), enc(&QuotaUsage { quota: q.clone(), used }));
        }
        Event::QuotaRemoved { repos } => {
            let k = keys::quota(repos.as_str());
            if !tx.has(&k)? {
                return Ok(Err(Rejection::QuotaUnknown(repos.as_str().to_string())));
            }
            tx.del(k);
        }
        Event::ManifestDeleted { repo, digest } => {
            let r = repo.as_str();
            let ds = digest.to_string();
            let Some(rec) = tx.get(&keys::manifest(r, &ds))?.and_then(|v| dec::<ManifestRecord>(&v)) else {
                return Ok(Err(Rejection::ManifestUnknown));
            };
            let prefix = keys::tags_of(r);
            for (k, v) in tx.scan(&prefix)? {
                if v == ds.as_bytes() {
                    tx.del(keys::tag_time(r, keys::suffix(&k, &prefix)));
                    tx.del(k);
                }
            }
            delete_manifest(tx, r, &ds, &rec)?;
        }
        Event::Collected { before_ms, manifests, links, .. } => collect(tx, *before_ms, manifests, links)?,
        Event::BlobsSwept { digests, .. } => {
            for d in digests {
                tx.del(keys::blob(&d.to_string()));
            }
        }
        Event::JournalTrimmed { before } => {
            let first = journal_first(tx)?;
            let upto = (*before).min(first.saturating_add(raftyard_types::event::JOURNAL_TRIM_BATCH));
            if upto > first {
                for kv in tx.tree.range(keys::journal(first)..keys::journal(upto)) {
                    let (k, _) = kv?;
                    tx.del(k.to_vec());
                }
                tx.put(keys::JOURNAL_FIRST.to_vec(), upto.to_be_bytes().to_vec());
            }
        }
        ev => return apply_access_event(tx, ev),
    }
    Ok(Ok(()))
}

/// The peer protocol every member speaks, as recorded by `ClusterUpgraded` (2: none recorded),
/// and when it was recorded.
fn protocol(tx: &Tx) -> Result<(u32, u64), sled::Error> {
    Ok(tx.get(keys::PROTOCOL)?.and_then(|v| dec(&v)).unwrap_or((2, 0)))
}

/// The first protocol whose nodes keep link and tag times and the `f/` index.
const PROTOCOL_INDEXES: u32 = 3;
/// The first protocol whose nodes keep what each repository holds (`u/`) and quotas (`q/`).
const PROTOCOL_USAGE: u32 = crate::node::PROTOCOL_QUOTAS;

/// Counts `d` into (`sign` > 0) or out of what repository `r` and the quotas covering it hold,
/// from protocol 4. Adding bytes is refused if it would take a quota over its limit.
fn account(tx: &mut Tx, r: &str, d: Usage, sign: i8) -> Result<Result<(), Rejection>, sled::Error> {
    if protocol(tx)?.0 < PROTOCOL_USAGE {
        return Ok(Ok(()));
    }
    let mut quotas = Vec::new();
    for (k, v) in tx.scan(keys::QUOTAS)? {
        let Some(mut q) = dec::<QuotaUsage>(&v) else { continue };
        if !q.quota.repos.matches(r) {
            continue;
        }
        if sign > 0 && d.bytes > 0 && q.used.bytes.saturating_add(d.bytes) > q.quota.bytes {
            return Ok(Err(Rejection::QuotaExceeded {
                repos: q.quota.repos.as_str().to_string(),
                limit: q.quota.bytes,
                used: q.used.bytes,
                adds: d.bytes,
            }));
        }
        q.used = q.used.add(d, sign);
        quotas.push((k, q));
    }
    for (k, q) in quotas {
        tx.put(k, enc(&q));
    }
    let uk = keys::usage(r);
    let u = tx.get(&uk)?.and_then(|v| dec::<Usage>(&v)).unwrap_or_default().add(d, sign);
    match u == Usage::default() {
        true => tx.del(uk),
        false => tx.put(uk, enc(&u)),
    }
    Ok(Ok(()))
}

/// Records that every member speaks `to`; crossing into protocol 3, builds the `f/` index of
/// what each manifest references, from the manifests stored so far.
fn upgrade(tx: &mut Tx, to: u32, time_ms: u64) -> Result<(), sled::Error> {
    let (from, _) = protocol(tx)?;
    if to <= from {
        return Ok(());
    }
    tx.put(keys::PROTOCOL.to_vec(), enc(&(to, time_ms)));
    if from < PROTOCOL_INDEXES && to >= PROTOCOL_INDEXES {
        // streamed from the tree (this entry writes neither prefix before): no copy of every
        // manifest in memory
        for kv in tx.tree.scan_prefix(keys::REFERENCES) {
            tx.del(kv?.0.to_vec());
        }
        for kv in tx.tree.scan_prefix(keys::MANIFESTS) {
            let (k, v) = kv?;
            let Some((repo, digest)) = keys::suffix(&k, keys::MANIFESTS).split_once('\0') else { continue };
            for d in dec::<ManifestRecord>(&v).as_ref().and_then(manifest_refs).unwrap_or_default() {
                tx.put(keys::reference(repo, &d.to_string(), digest), vec![]);
            }
        }
    }
    if from < PROTOCOL_USAGE && to >= PROTOCOL_USAGE {
        // what each repository holds, from its links and manifests (one figure per
        // repository in memory)
        let mut usage: BTreeMap<String, Usage> = BTreeMap::new();
        for kv in tx.tree.scan_prefix(keys::USAGE) {
            tx.del(kv?.0.to_vec());
        }
        for kv in tx.tree.scan_prefix(keys::LINKS) {
            let (k, v) = kv?;
            let Some((repo, _)) = keys::suffix(&k, keys::LINKS).split_once('\0') else { continue };
            let size = v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            let u = usage.entry(repo.to_string()).or_default();
            *u = u.add(Usage { bytes: size, blobs: 1, manifests: 0 }, 1);
        }
        for kv in tx.tree.scan_prefix(keys::MANIFESTS) {
            let (k, v) = kv?;
            let Some((repo, _)) = keys::suffix(&k, keys::MANIFESTS).split_once('\0') else { continue };
            let bytes = dec::<ManifestRecord>(&v).map_or(0, |m| m.bytes.len() as u64);
            let u = usage.entry(repo.to_string()).or_default();
            *u = u.add(Usage { bytes, blobs: 0, manifests: 1 }, 1);
        }
        for (repo, u) in usage {
            tx.put(keys::usage(&repo), enc(&u));
        }
    }
    Ok(())
}

/// Links a blob into a repository, recording when from protocol 3 (a collection keeps young
/// links; before, every node records nothing, as older releases did).
fn link_blob(
    tx: &mut Tx,
    repo: &RepoName,
    digest: &Digest,
    size: u64,
    time_ms: u64,
) -> Result<Result<(), Rejection>, sled::Error> {
    let ds = digest.to_string();
    if !tx.has(&keys::link(repo.as_str(), &ds))? {
        if let Err(rej) = account(tx, repo.as_str(), Usage { bytes: size, blobs: 1, manifests: 0 }, 1)? {
            return Ok(Err(rej));
        }
    }
    let at = match protocol(tx)?.0 >= PROTOCOL_INDEXES {
        true => time_ms.to_be_bytes().to_vec(),
        false => vec![],
    };
    tx.put(keys::link(repo.as_str(), &ds), size.to_be_bytes().to_vec());
    tx.put(keys::linked_by(&ds, repo.as_str()), at);
    tx.put(keys::repo(repo.as_str()), vec![]);
    let bk = keys::blob(&ds);
    if !tx.has(&bk)? {
        tx.put(bk, enc(&BlobInfo { size, holders: vec![] }));
    }
    Ok(Ok(()))
}

/// Removes a blob's link from a repository. Unlinked everywhere, the blob is gone from the
/// registry (no mount finds it, no node fetches it any more) and its files are garbage.
fn unlink_blob(tx: &mut Tx, repo: &str, ds: &str) -> Result<(), sled::Error> {
    if let Some(v) = tx.get(&keys::link(repo, ds))? {
        let size = v.as_slice().try_into().map(u64::from_be_bytes).unwrap_or(0);
        let _ = account(tx, repo, Usage { bytes: size, blobs: 1, manifests: 0 }, -1)?;
    }
    tx.del(keys::link(repo, ds));
    tx.del(keys::linked_by(ds, repo));
    if !tx.any(&keys::links_of(ds))? {
        tx.del(keys::blob(ds));
    }
    Ok(())
}

/// The blobs and manifests a stored manifest references (what its `ManifestPut` listed).
pub(crate) fn manifest_refs(rec: &ManifestRecord) -> Option<Vec<Digest>> {
    raftyard_types::manifest::parse_manifest(&rec.bytes, &rec.media_type).ok().map(|p| p.required)
}

/// Removes a manifest with its referrers entry and its references (not its tags).
fn delete_manifest(tx: &mut Tx, r: &str, ds: &str, rec: &ManifestRecord) -> Result<(), sled::Error> {
    let _ = account(tx, r, Usage { bytes: rec.bytes.len() as u64, blobs: 0, manifests: 1 }, -1)?;
    tx.del(keys::manifest(r, ds));
    if let Some(s) = &rec.subject {
        tx.del(keys::referrer(r, &s.to_string(), ds));
    }
    match manifest_refs(rec) {
        Some(refs) => {
            for d in refs {
                tx.del(keys::reference(r, &d.to_string(), ds));
            }
        }
        // stored bytes always parse (they did when pushed); should a later release read them
        // otherwise, the repository's references are searched instead
        None => {
            let mut p = keys::REFERENCES.to_vec();
            p.extend_from_slice(r.as_bytes());
            p.push(0);
            for (k, _) in tx.scan(&p)? {
                if k.ends_with(ds.as_bytes()) && k[..k.len() - ds.len()].ends_with(&[0]) {
                    tx.del(k);
                }
            }
        }
    }
    Ok(())
}

/// Whether manifest `d` of repository `r` is in use now: tagged, younger than the cut, listed
/// by a manifest, or a referrer of a manifest in use (followed `depth` subjects deep; deeper
/// counts as in use).
fn in_use(
    tx: &Tx,
    r: &str,
    d: &Digest,
    tagged: &std::collections::HashSet<Vec<u8>>,
    before_ms: u64,
    depth: u32,
) -> Result<bool, sled::Error> {
    let ds = d.to_string();
    let Some(rec) = tx.get(&keys::manifest(r, &ds))?.and_then(|v| dec::<ManifestRecord>(&v)) else {
        return Ok(false);
    };
    if tagged.contains(ds.as_bytes()) || rec.created_ms >= before_ms || tx.any(&keys::references_to(r, &ds))? {
        return Ok(true);
    }
    match &rec.subject {
        Some(s) if depth == 0 => Ok(tx.has(&keys::manifest(r, &s.to_string()))?),
        Some(s) => in_use(tx, r, s, tagged, before_ms, depth - 1),
        None => Ok(false),
    }
}

/// Applies a collection (see [`Event::Collected`]): each listed manifest and link goes only if
/// it is garbage now.
fn collect(
    tx: &mut Tx,
    before_ms: u64,
    manifests: &[(RepoName, Digest)],
    links: &[(RepoName, Digest)],
) -> Result<(), sled::Error> {
    let mut tagged: std::collections::HashMap<&str, std::collections::HashSet<Vec<u8>>> = Default::default();
    for (repo, d) in manifests {
        let (r, ds) = (repo.as_str(), d.to_string());
        let Some(rec) = tx.get(&keys::manifest(r, &ds))?.and_then(|v| dec::<ManifestRecord>(&v)) else { continue };
        if rec.created_ms >= before_ms {
            continue;
        }
        if !tagged.contains_key(r) {
            let digests = tx.scan(&keys::tags_of(r))?.into_iter().map(|(_, v)| v).collect();
            tagged.insert(r, digests);
        }
        if tagged[r].contains(ds.as_bytes()) {
            continue;
        }
        // still listed by a manifest, or still the subject of a referrer
        if tx.any(&keys::references_to(r, &ds))? || tx.any(&keys::referrers_of(r, &ds))? {
            continue;
        }
        // a referrer of a manifest that is in use again (tagged, pushed, listed since the plan)
        if let Some(subject) = &rec.subject {
            if in_use(tx, r, subject, &tagged[r], before_ms, 8)? {
                continue;
            }
        }
        delete_manifest(tx, r, &ds, &rec)?;
    }
    for (repo, d) in links {
        let (r, ds) = (repo.as_str(), d.to_string());
        let Some(at) = tx.get(&keys::linked_by(&ds, r))? else { continue };
        let at = <[u8; 8]>::try_from(at.as_slice()).map(u64::from_be_bytes).unwrap_or(0);
        if at >= before_ms || tx.any(&keys::references_to(r, &ds))? {
            continue;
        }
        unlink_blob(tx, r, &ds)?;
    }
    Ok(())
}

fn journal_first(tx: &Tx) -> Result<u64, sled::Error> {
    Ok(tx
        .get(keys::JOURNAL_FIRST)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

/// Applies a change of who may do what, and bumps the access version that caches watch.
fn apply_access_event(tx: &mut Tx, ev: &Event) -> Result<Result<(), Rejection>, sled::Error> {
    match ev {
        Event::UserPut { name, record, replace } => {
            let k = keys::user(name);
            if !replace && tx.has(&k)? {
                return Ok(Err(Rejection::UserExists(name.clone())));
            }
            tx.put(k, enc(record));
        }
        Event::UserPassword { name, password_hash } => {
            let k = keys::user(name);
            let Some(mut u) = tx.get(&k)?.and_then(|v| dec::<UserRecord>(&v)) else {
                return Ok(Err(Rejection::UserUnknown(name.clone())));
            };
            u.password_hash = password_hash.clone();
            tx.put(k, enc(&u));
        }
        Event::UserRemoved { name } => {
            let k = keys::user(name);
            if !tx.has(&k)? {
                return Ok(Err(Rejection::UserUnknown(name.clone())));
            }
            tx.del(k);
            for (k, _) in tx.scan(&keys::grants_of(&Subject::User(name.clone()).key()))? {
                tx.del(k);
            }
        }
        Event::GrantAdded(g) => {
            let k = keys::grant(&g.subject.key(), g.repos.as_str());
            let had = tx.get(&k)?.and_then(|v| dec::<Actions>(&v)).unwrap_or_default();
            tx.put(k, enc(&had.union(g.actions)));
        }
        Event::GrantRevoked { subject, repos, actions } => {
            let k = keys::grant(&subject.key(), repos.as_str());
            let Some(had) = tx.get(&k)?.and_then(|v| dec::<Actions>(&v)) else {
                return Ok(Err(Rejection::GrantUnknown));
            };
            let left = had.without(*actions);
            if left.is_empty() {
                tx.del(k);
            } else {
                tx.put(k, enc(&left));
            }
        }
        Event::RobotAdded { id, record } => {
            tx.put(keys::robot(id), enc(record));
        }
        Event::RobotRevoked { id } => {
            let k = keys::robot(id);
            if !tx.has(&k)? {
                return Ok(Err(Rejection::RobotUnknown(id.clone())));
            }
            tx.del(k);
            for (k, _) in tx.scan(&keys::grants_of(&Subject::Robot(id.clone()).key()))? {
                tx.del(k);
            }
        }
        Event::RobotUsed { id, at_ms } => {
            // bookkeeping only: does not change what anyone may do, so no version bump
            let k = keys::robot(id);
            if let Some(mut r) = tx.get(&k)?.and_then(|v| dec::<RobotRecord>(&v)) {
                if r.last_used_ms.is_none_or(|t| t < *at_ms) {
                    r.last_used_ms = Some(*at_ms);
                    tx.put(k, enc(&r));
                }
            }
            return Ok(Ok(()));
        }
        Event::SigningKeyAdded { key, only_if_none } => {
            let mut all: Vec<SigningKey> = tx.get(keys::SIGNING_KEYS)?.and_then(|v| dec(&v)).unwrap_or_default();
            if *only_if_none && !all.is_empty() {
                return Ok(Ok(()));
            }
            all.push(key.clone());
            let drop = all.len().saturating_sub(KEYS_KEPT);
            all.drain(..drop);
            tx.put(keys::SIGNING_KEYS.to_vec(), enc(&all));
        }
        _ => unreachable!("apply_event handles every other event"),
    }
    let v = tx.get(keys::ACCESS_VERSION)?.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok()).map(u64::from_be_bytes);
    tx.put(keys::ACCESS_VERSION.to_vec(), (v.unwrap_or(0) + 1).to_be_bytes().to_vec());
    Ok(Ok(()))
}

/// Read access to the applied state. Cheap to clone; reads see whole applied entries.
#[derive(Clone)]
pub struct StateReader {
    tree: StateTree,
    applied: watch::Receiver<u64>,
    collected: watch::Receiver<u64>,
}

fn io<E: std::fmt::Display>(e: E) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl StateReader {
    /// The tree the state is in now (a snapshot install replaces it).
    pub(crate) fn tree(&self) -> Arc<sled::Tree> {
        self.tree.get()
    }

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
        for kv in self.tree().iter() {
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

    /// The peer protocol every member speaks as the state records it (`ClusterUpgraded`; 2
    /// when none is recorded), and when it was recorded (ms since the epoch).
    pub fn protocol(&self) -> std::io::Result<(u32, u64)> {
        Ok(self.tree().get(keys::PROTOCOL).map_err(io)?.and_then(|v| dec(&v)).unwrap_or((2, 0)))
    }

    /// Changes when a collection applied (its log index) or a snapshot was installed: then the
    /// blob files of this node that no repository links any more may go.
    pub fn collections(&self) -> watch::Receiver<u64> {
        self.collected.clone()
    }

    /// Waits until the state has applied at least `index`.
    pub async fn wait_applied(&self, index: u64) {
        let mut rx = self.applied.clone();
        let _ = rx.wait_for(|a| *a >= index).await;
    }

    pub fn blob_link(&self, repo: &RepoName, digest: &Digest) -> std::io::Result<Option<u64>> {
        Ok(self
            .tree()
            .get(keys::link(repo.as_str(), &digest.to_string()))
            .map_err(io)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// Up to `n` repositories linking this blob.
    pub fn linked_in(&self, digest: &Digest, n: usize) -> std::io::Result<Vec<String>> {
        let prefix = keys::links_of(&digest.to_string());
        let mut out = Vec::new();
        for kv in self.tree().scan_prefix(&prefix).take(n) {
            let (k, _) = kv.map_err(io)?;
            out.push(keys::suffix(&k, &prefix).to_string());
        }
        Ok(out)
    }

    /// Any repository linking this blob (for mounts without `from`).
    pub fn blob_info(&self, digest: &Digest) -> std::io::Result<Option<BlobInfo>> {
        Ok(self.tree().get(keys::blob(&digest.to_string())).map_err(io)?.and_then(|v| dec(&v)))
    }

    pub fn manifest(&self, repo: &RepoName, digest: &Digest) -> std::io::Result<Option<ManifestRecord>> {
        Ok(self.tree().get(keys::manifest(repo.as_str(), &digest.to_string())).map_err(io)?.and_then(|v| dec(&v)))
    }

    pub fn tag(&self, repo: &RepoName, tag: &Tag) -> std::io::Result<Option<Digest>> {
        Ok(self
            .tree()
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
        for kv in self.tree().range(start..) {
            let (k, _) = kv.map_err(io)?;
            if !k.starts_with(&prefix) || out.len() >= n {
                break;
            }
            out.push(keys::suffix(&k, &prefix).to_string());
        }
        Ok(out)
    }

    pub fn repo_exists(&self, repo: &RepoName) -> std::io::Result<bool> {
        self.tree().contains_key(keys::repo(repo.as_str())).map_err(io)
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
        for kv in self.tree().range(start..) {
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
        self.blobs_iter().collect()
    }

    /// Every blob the registry knows, one at a time, in the order of their digests' text (a
    /// walk of a million placements holds one at a time, not a million).
    pub fn blobs_iter(&self) -> impl Iterator<Item = std::io::Result<(Digest, BlobInfo)>> {
        let prefix = keys::blob("");
        self.tree().scan_prefix(&prefix).filter_map(move |kv| match kv {
            Err(e) => Some(Err(io(e))),
            Ok((k, v)) => match (Digest::parse(keys::suffix(&k, &prefix)), dec::<BlobInfo>(&v)) {
                (Ok(d), Some(info)) => Some(Ok((d, info))),
                _ => None,
            },
        })
    }

    /// Digests of the manifests in `repo` whose subject is `subject`.
    pub fn referrers(&self, repo: &RepoName, subject: &Digest) -> std::io::Result<Vec<Digest>> {
        let prefix = keys::referrers_of(repo.as_str(), &subject.to_string());
        let mut out = Vec::new();
        for kv in self.tree().scan_prefix(&prefix) {
            let (k, _) = kv.map_err(io)?;
            if let Ok(d) = Digest::parse(keys::suffix(&k, &prefix)) {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Bumped by every applied change of who may do what: a cache of [`Self::access`] is
    /// current while this has not moved.
    pub fn access_version(&self) -> std::io::Result<u64> {
        Ok(self
            .tree()
            .get(keys::ACCESS_VERSION)
            .map_err(io)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    /// Every user, robot token, grant and signing key, with the access version they are at.
    pub fn access(&self) -> std::io::Result<(u64, AccessState)> {
        // one consistent view: re-read if an apply moved the version meanwhile
        loop {
            let v = self.access_version()?;
            let mut s = AccessState::default();
            for kv in self.tree().scan_prefix(keys::USERS) {
                let (k, val) = kv.map_err(io)?;
                if let Some(u) = dec::<UserRecord>(&val) {
                    s.users.insert(keys::suffix(&k, keys::USERS).to_string(), u);
                }
            }
            for kv in self.tree().scan_prefix(keys::ROBOTS) {
                let (k, val) = kv.map_err(io)?;
                if let Some(r) = dec::<RobotRecord>(&val) {
                    s.robots.insert(keys::suffix(&k, keys::ROBOTS).to_string(), r);
                }
            }
            for kv in self.tree().scan_prefix(keys::GRANTS) {
                let (k, val) = kv.map_err(io)?;
                let Some((subject, repos)) = keys::suffix(&k, keys::GRANTS).split_once('\0') else { continue };
                if let (Some(subject), Ok(repos), Some(actions)) =
                    (Subject::parse_key(subject), RepoGlob::parse(repos), dec::<Actions>(&val))
                {
                    s.grants.push(Grant { subject, repos, actions });
                }
            }
            s.keys = self.tree().get(keys::SIGNING_KEYS).map_err(io)?.and_then(|v| dec(&v)).unwrap_or_default();
            if self.access_version()? == v {
                return Ok((v, s));
            }
        }
    }

    /// The first index the journal still holds (0: nothing was ever trimmed).
    pub fn journal_first(&self) -> std::io::Result<u64> {
        Ok(self
            .tree()
            .get(keys::JOURNAL_FIRST)
            .map_err(io)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// The index of the first journal entry at or after `time_ms` (the applied index + 1 when
    /// none is): where an age-based retention cuts. Entries are in index order, and their
    /// times, stamped by proposers, nearly so; the first one that is new enough decides.
    pub fn journal_index_at(&self, time_ms: u64) -> std::io::Result<u64> {
        // read first: an entry applied during the scan is newer than the cut, never under it
        let applied = self.applied_index();
        for kv in self.tree().range(keys::journal(self.journal_first()?)..keys::journal(applied + 1)) {
            let (k, v) = kv.map_err(io)?;
            if !k.starts_with(keys::JOURNAL) {
                break;
            }
            if let Some(e) = dec::<VersionedJournalEntry>(&v).map(JournalEntry::from) {
                if e.time_ms >= time_ms {
                    return Ok(e.index);
                }
            }
        }
        Ok(applied + 1)
    }

    /// The latest journal entry (the last command applied here), if any.
    pub fn last_journal_entry(&self) -> std::io::Result<Option<JournalEntry>> {
        let Some(kv) = self.tree().range(keys::journal(0)..keys::journal(u64::MAX)).next_back() else {
            return Ok(None);
        };
        let (_, v) = kv.map_err(io)?;
        Ok(dec::<VersionedJournalEntry>(&v).map(Into::into))
    }

    /// Journal entries with index ≥ `since`, at most `limit`.
    pub fn journal(&self, since: u64, limit: usize) -> std::io::Result<Vec<JournalEntry>> {
        let mut out = Vec::new();
        for kv in self.tree().range(keys::journal(since)..) {
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

/// The tree holding the state, shared by the state machine and every reader. A snapshot
/// install fills a new tree and then points this at it, so a reader sees the state before the
/// install or after it, never a mix; the tree it replaced is dropped once no reader holds it.
#[derive(Clone)]
pub(crate) struct StateTree(Arc<std::sync::RwLock<Arc<sled::Tree>>>);

impl StateTree {
    fn new(tree: sled::Tree) -> Self {
        StateTree(Arc::new(std::sync::RwLock::new(Arc::new(tree))))
    }

    pub(crate) fn get(&self) -> Arc<sled::Tree> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Points every reader at `tree`; returns the tree it replaces.
    fn replace(&self, tree: sled::Tree) -> Arc<sled::Tree> {
        std::mem::replace(&mut *self.0.write().unwrap_or_else(|e| e.into_inner()), Arc::new(tree))
    }
}

/// The trees that hold a state: `state`, and the `state.<n>` a snapshot install fills.
pub(crate) fn is_state_tree(name: &[u8]) -> bool {
    name == b"state" || name.starts_with(b"state.")
}

/// Drops a state tree an install replaced, once the readers that took it before the switch
/// are done with it (the reference the [`StateTree`] held is then the only one).
fn retire(db: sled::Db, old: Arc<sled::Tree>) {
    let spawned = std::thread::Builder::new().name("state-retire".into()).spawn(move || {
        while Arc::strong_count(&old) > 1 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let name = old.name();
        drop(old);
        if let Err(e) = db.drop_tree(&name) {
            // the next start drops every state tree but the current one
            tracing::warn!(error = %e, "dropping the state tree a snapshot replaced");
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "dropping the state tree a snapshot replaced");
    }
}

/// A name no earlier file or tree of this process had (a counter and the time).
fn unique() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{t}-{n}")
}

/// The openraft state machine over the current state tree ([`StateTree`]).
pub struct StateMachine {
    db: sled::Db,
    state: StateTree,
    snap: SnapshotStore,
    applied_tx: Arc<watch::Sender<u64>>,
    /// The index of the last collection applied (or snapshot installed, which may stand for
    /// collections this node never applied): each node removes unlinked blob files then.
    collected_tx: Arc<watch::Sender<u64>>,
    watch: StorageWatch,
}

/// The current version of the state's layout.
const LAYOUT: u32 = 2;

/// Brings a state written by an earlier version to the current layout, in one batch; derived
/// keys only, so every node that does it ends with the same state.
/// - 1 → 2: the `L/` index of the repositories linking each blob, built from `b/`.
///
/// (What protocol 3 adds is built by `ClusterUpgraded` as it applies, at the same entry on
/// every node: a node of an older release cannot keep such an index up to date, so it must
/// not start before every member maintains it.)
fn migrate(state: &sled::Tree) -> Result<(), sled::Error> {
    let version = state.get(keys::LAYOUT)?.and_then(|v| v.as_ref().try_into().ok().map(u32::from_be_bytes));
    if version.unwrap_or(1) >= LAYOUT {
        return Ok(());
    }
    // One insert at a time (a batch of a whole registry's links would stay in memory, see
    // `install_from`); the layout is written last, so an interrupted migration runs again.
    for kv in state.scan_prefix(keys::LINKS) {
        let (k, _) = kv?;
        if let Some((repo, digest)) = keys::suffix(&k, keys::LINKS).split_once('\0') {
            state.insert(keys::linked_by(digest, repo), vec![])?;
        }
    }
    state.insert(keys::LAYOUT, LAYOUT.to_be_bytes().to_vec())?;
    tracing::info!(layout = LAYOUT, "metadata state migrated to the current layout");
    Ok(())
}

impl StateMachine {
    /// Opens the state's trees (migrating an earlier layout) of the database at `dir`, where
    /// snapshot files live too; every blocking write runs under `watch`.
    pub fn open(db: &sled::Db, dir: &Path, watch: StorageWatch) -> Result<Self, sled::Error> {
        let snap = SnapshotStore::open(db, dir)?;
        let name = snap.state_tree()?;
        // an install a crash interrupted leaves a tree that never became the state
        for t in db.tree_names() {
            if is_state_tree(&t) && *t != *name.as_bytes() {
                db.drop_tree(&t)?;
            }
        }
        let state = db.open_tree(&name)?;
        migrate(&state)?;
        let applied: Option<LogId> = state.get(keys::APPLIED)?.and_then(|v| dec(&v));
        let (tx, _) = watch::channel(applied.map(|l| l.index).unwrap_or(0));
        let collected_tx = Arc::new(watch::channel(0).0);
        Ok(StateMachine {
            db: db.clone(),
            state: StateTree::new(state),
            snap,
            applied_tx: Arc::new(tx),
            collected_tx,
            watch,
        })
    }

    /// Where the latest snapshot is kept.
    pub(crate) fn snapshots(&self) -> SnapshotStore {
        self.snap.clone()
    }

    pub fn reader(&self) -> StateReader {
        StateReader {
            tree: self.state.clone(),
            applied: self.applied_tx.subscribe(),
            collected: self.collected_tx.subscribe(),
        }
    }

    fn read_applied(&self) -> Result<(Option<LogId>, Membership), StorageError> {
        let err = |e| storage_err(ErrorSubject::StateMachine, ErrorVerb::Read, e);
        let state = self.state.get();
        let applied = state.get(keys::APPLIED).map_err(err)?.and_then(|v| dec(&v));
        let membership = state.get(keys::MEMBERSHIP).map_err(err)?.and_then(|v| dec(&v)).unwrap_or_default();
        Ok((applied, membership))
    }

    fn apply_entry(&self, entry: &Entry<TypeConfig>) -> Result<Option<Outcome>, sled::Error> {
        let state = self.state.get();
        let mut tx = Tx::new(&state);
        let log_id = entry.log_id;
        let outcome = match &entry.payload {
            EntryPayload::Blank => None,
            EntryPayload::Membership(m) => {
                tx.put(keys::MEMBERSHIP.to_vec(), enc(&Membership::new(Some(log_id), m.clone())));
                None
            }
            EntryPayload::Normal(cmd) => {
                let id = cmd.id();
                // a proposal proposed again (its proposer lost track of it): the first outcome
                if let Some(seen) = id.map(|id| tx.get(&keys::proposal(id))).transpose()?.flatten() {
                    let (_, outcome): (u64, Outcome) = dec(&seen).unwrap_or((0, Ok(())));
                    Some(outcome)
                } else {
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
                    if let Some(id) = id {
                        remember_proposal(&mut tx, id, cmd.time_ms, log_id.index, &outcome)?;
                    }
                    Some(outcome)
                }
            }
        };
        tx.put(keys::APPLIED.to_vec(), enc(&log_id));
        let batch = tx.into_batch();
        self.watch.run("state apply", || state.apply_batch(batch))?;
        Ok(outcome)
    }

    /// Fills a new tree with the state of snapshot data `file` (at `meta`), durably, and names
    /// it the state together with the snapshot; readers switch to it at once.
    async fn install_from(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeAddr>,
        mut file: std::fs::File,
    ) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom};
        // seconds to minutes for a large state: off Raft's worker, which goes on meanwhile
        let (tmp, name, tree) = crate::node::blocking(|| -> std::io::Result<_> {
            file.sync_all()?;
            // the data's own file: the temporary file it was received into, else a copy
            let tmp = match self.snap.temp_path_of(&file)? {
                Some(p) => p,
                None => {
                    file.seek(SeekFrom::Start(0))?;
                    self.snap.copy_to_temp("install", &file)?
                }
            };
            let len = file.metadata()?.len();
            file.seek(SeekFrom::Start(0))?;
            let name = format!("state.{}", unique());
            let tree = self.db.open_tree(&name).map_err(io)?;
            // One insert at a time, not in batches: nothing reads this tree before the snapshot
            // store names it, so it needs no atomicity, and sled 0.34 keeps in memory what a
            // batch of thousands of writes touched (the test `an_install_takes_memory_…`: 760 MiB
            // more in 4 MiB batches, 70 one at a time). The 1,000,000-image install ran out of
            // memory so.
            for kv in PairReader::new(std::io::BufReader::with_capacity(1 << 20, &file), len)? {
                let (k, v) = kv?;
                tree.insert(k, v).map_err(io)?;
            }
            if let Some(l) = meta.last_log_id {
                tree.insert(keys::APPLIED, enc(&l)).map_err(io)?;
            }
            tree.insert(keys::MEMBERSHIP, enc(&meta.last_membership)).map_err(io)?;
            // a snapshot taken by an earlier version
            migrate(&tree).map_err(io)?;
            Ok((tmp, name, tree))
        })?;
        // durable before the snapshot store names it the state
        self.db.flush_async().await.map_err(io)?;
        self.snap.store(meta, &tmp, Some(&name), false)?;
        retire(self.db.clone(), self.state.replace(tree));
        Ok(())
    }
}

/// Where the latest snapshot is kept: its meta in the `snapshot` tree, its data in a file of
/// its own beside the database (named in the tree), so that neither sled nor memory ever holds
/// a value the size of the whole state. The tree also names the state tree that goes with it
/// (an install fills a new one). Earlier versions kept the data in the tree (`data`, or both in
/// one bincode `current`); those are moved to a file when opened.
#[derive(Clone)]
pub(crate) struct SnapshotStore {
    tree: sled::Tree,
    dir: PathBuf,
    /// Held while the stored snapshot is compared and replaced.
    lock: Arc<std::sync::Mutex<()>>,
}

const SNAP_META: &[u8] = b"meta";
const SNAP_FILE: &[u8] = b"file";
const SNAP_DATA: &[u8] = b"data";
const SNAP_LEGACY: &[u8] = b"current";
/// The name of the tree holding the state (absent: `state`).
const SNAP_STATE: &[u8] = b"state_tree";
/// Files being written (a build, a receive) start so; a start removes those it finds.
const TMP_PREFIX: &str = "tmp-snapshot-";

impl SnapshotStore {
    pub(crate) fn open(db: &sled::Db, dir: &Path) -> Result<Self, sled::Error> {
        let store = SnapshotStore { tree: db.open_tree("snapshot")?, dir: dir.to_path_buf(), lock: Default::default() };
        for e in std::fs::read_dir(dir)?.flatten() {
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                std::fs::remove_file(e.path())?;
            }
        }
        store.move_legacy()?;
        Ok(store)
    }

    /// An earlier version's snapshot, kept in the tree, moves to a file of its own.
    fn move_legacy(&self) -> std::io::Result<()> {
        if self.tree.get(SNAP_FILE).map_err(io)?.is_some() {
            return Ok(());
        }
        let meta = self.tree.get(SNAP_META).map_err(io)?.and_then(|m| dec::<SnapshotMeta<NodeId, NodeAddr>>(&m));
        let old = match (meta, self.tree.get(SNAP_DATA).map_err(io)?) {
            (Some(meta), Some(data)) => Some(StoredSnapshot { meta, data: data.to_vec() }),
            _ => self.tree.get(SNAP_LEGACY).map_err(io)?.and_then(|v| dec::<StoredSnapshot>(&v)),
        };
        let Some(old) = old else { return Ok(()) };
        let tmp = self.copy_to_temp("legacy", &old.data[..])?;
        self.store(&old.meta, &tmp, None, false)?;
        Ok(())
    }

    /// A new temporary file's path (`kind`: what it is for).
    pub(crate) fn temp(&self, kind: &str) -> PathBuf {
        self.dir.join(format!("{TMP_PREFIX}{kind}-{}", unique()))
    }

    /// Removes the temporary files of `kind` (their readers and writers keep what is open).
    fn remove_temps(&self, kind: &str) -> std::io::Result<()> {
        let prefix = format!("{TMP_PREFIX}{kind}-");
        for e in std::fs::read_dir(&self.dir)?.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                std::fs::remove_file(e.path())?;
            }
        }
        Ok(())
    }

    /// A new temporary file holding what `from` reads, durable; its path.
    pub(crate) fn copy_to_temp(&self, kind: &str, mut from: impl std::io::Read) -> std::io::Result<PathBuf> {
        let path = self.temp(kind);
        let mut f = std::fs::File::create(&path)?;
        std::io::copy(&mut from, &mut f)?;
        f.sync_all()?;
        Ok(path)
    }

    /// The temporary file of this store that `file` is open on, if it is one.
    fn temp_path_of(&self, file: &std::fs::File) -> std::io::Result<Option<PathBuf>> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        for e in std::fs::read_dir(&self.dir)?.flatten() {
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                if let Ok(em) = e.metadata() {
                    if (em.dev(), em.ino()) == (m.dev(), m.ino()) {
                        return Ok(Some(e.path()));
                    }
                }
            }
        }
        Ok(None)
    }

    /// The name of the tree that holds the state.
    fn state_tree(&self) -> Result<String, sled::Error> {
        Ok(self
            .tree
            .get(SNAP_STATE)?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_else(|| "state".into()))
    }

    /// The latest snapshot, if any: its meta and its data file, open (it stays readable when a
    /// newer snapshot replaces it).
    pub(crate) fn open_current(&self) -> std::io::Result<Option<(SnapshotMeta<NodeId, NodeAddr>, std::fs::File)>> {
        // not while a snapshot is being stored: meta and file name belong together
        let _l = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let meta = self.tree.get(SNAP_META).map_err(io)?.and_then(|m| dec::<SnapshotMeta<NodeId, NodeAddr>>(&m));
        match (meta, self.tree.get(SNAP_FILE).map_err(io)?) {
            (Some(meta), Some(file)) => {
                Ok(Some((meta, std::fs::File::open(self.dir.join(String::from_utf8_lossy(&file).as_ref()))?)))
            }
            _ => Ok(None),
        }
    }

    /// The log id of the latest snapshot, read without its data.
    fn log_id(&self) -> std::io::Result<Option<LogId>> {
        let meta = self.tree.get(SNAP_META).map_err(io)?;
        Ok(meta.and_then(|m| dec::<SnapshotMeta<NodeId, NodeAddr>>(&m)).and_then(|m| m.last_log_id))
    }

    /// Stores the data in `tmp` (durable already) as the latest snapshot, with `state_tree` as
    /// the tree of the state when given. With `only_if_newer`, not over a newer one (a snapshot
    /// installed from the leader while this one was built): then `tmp` is removed and false
    /// returned. The tree is flushed before the files of earlier snapshots go.
    fn store(
        &self,
        meta: &SnapshotMeta<NodeId, NodeAddr>,
        tmp: &Path,
        state_tree: Option<&str>,
        only_if_newer: bool,
    ) -> std::io::Result<bool> {
        let _l = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if only_if_newer && self.log_id()? > meta.last_log_id {
            std::fs::remove_file(tmp)?;
            return Ok(false);
        }
        let name = match meta.last_log_id {
            Some(l) => format!("snapshot-{}-{}.data", l.leader_id.term, l.index),
            None => "snapshot-0-0.data".to_string(),
        };
        std::fs::rename(tmp, self.dir.join(&name))?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        let mut batch = sled::Batch::default();
        batch.insert(SNAP_META, enc(meta));
        batch.insert(SNAP_FILE, name.as_bytes());
        if let Some(t) = state_tree {
            batch.insert(SNAP_STATE, t.as_bytes());
        }
        batch.remove(SNAP_DATA);
        batch.remove(SNAP_LEGACY);
        self.tree.apply_batch(batch).map_err(io)?;
        // durable before the earlier files go: a crash must not leave the tree naming a file
        // that is gone
        self.tree.flush().map_err(io)?;
        for e in std::fs::read_dir(&self.dir)?.flatten() {
            let f = e.file_name().to_string_lossy().into_owned();
            if f.starts_with("snapshot-") && f != name {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(true)
    }
}

/// Writes pairs in the snapshot data format (the bincode of `Vec<(Vec<u8>, Vec<u8>)>`: a u64
/// count, then each key and value as a u64 length and its bytes, little endian) to a new file
/// at `path`, streamed from the iterator, and makes it durable. Returns the file's length.
fn write_pairs(
    path: &Path,
    pairs: impl Iterator<Item = Result<(sled::IVec, sled::IVec), sled::Error>>,
) -> Result<u64, sled::Error> {
    use std::io::{Seek, SeekFrom, Write};
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    out.write_all(&[0; 8])?;
    let (mut n, mut len) = (0u64, 8u64);
    for kv in pairs {
        let (k, v) = kv?;
        for part in [&k[..], &v[..]] {
            out.write_all(&(part.len() as u64).to_le_bytes())?;
            out.write_all(part)?;
            len += 8 + part.len() as u64;
        }
        n += 1;
    }
    let mut f = out.into_inner().map_err(|e| e.into_error())?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&n.to_le_bytes())?;
    f.sync_all()?;
    Ok(len)
}

/// The key-value pairs of a snapshot data file (`<data>/meta/snapshot-*.data`): the whole state
/// at the snapshot's index, in key order. For tools that study the state (`raftyard-store-bench`).
pub fn snapshot_pairs(path: &Path) -> std::io::Result<impl Iterator<Item = std::io::Result<(Vec<u8>, Vec<u8>)>>> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    PairReader::new(std::io::BufReader::with_capacity(1 << 20, file), len)
}

/// The pairs of snapshot data, read one at a time. Every length read is checked against what
/// is left of the data (`len` bytes): damaged or cut-short data is an error, never an
/// allocation of what a corrupt length says.
pub(crate) struct PairReader<R> {
    inp: R,
    pairs_left: u64,
    bytes_left: u64,
}

impl<R: std::io::Read> PairReader<R> {
    pub(crate) fn new(mut inp: R, len: u64) -> std::io::Result<Self> {
        let mut n = [0u8; 8];
        inp.read_exact(&mut n).map_err(|_| truncated())?;
        Ok(PairReader { inp, pairs_left: u64::from_le_bytes(n), bytes_left: len.saturating_sub(8) })
    }

    fn part(&mut self) -> std::io::Result<Vec<u8>> {
        let mut l = [0u8; 8];
        self.inp.read_exact(&mut l).map_err(|_| truncated())?;
        let l = u64::from_le_bytes(l);
        if self.bytes_left < 8 || l > self.bytes_left - 8 {
            return Err(truncated());
        }
        self.bytes_left -= 8 + l;
        let mut v = vec![0; l as usize];
        self.inp.read_exact(&mut v).map_err(|_| truncated())?;
        Ok(v)
    }
}

fn truncated() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, "snapshot data is truncated")
}

impl<R: std::io::Read> Iterator for PairReader<R> {
    type Item = std::io::Result<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pairs_left == 0 {
            return None;
        }
        self.pairs_left -= 1;
        let pair = self.part().and_then(|k| Ok((k, self.part()?)));
        if pair.is_err() {
            self.pairs_left = 0;
        }
        Some(pair)
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
        let (mut last, mut collected) = (None, None);
        for entry in entries {
            let r = self
                .apply_entry(&entry)
                .map_err(|e| storage_err(ErrorSubject::Apply(entry.log_id), ErrorVerb::Write, e))?;
            let collection = matches!(&entry.payload, EntryPayload::Normal(c)
                if c.command().events.iter().any(|e| matches!(e, Event::Collected { .. })));
            if collection && matches!(r, Some(Ok(()))) {
                collected = Some(entry.log_id.index);
            }
            out.push(r.unwrap_or(Ok(())));
            last = Some(entry.log_id.index);
        }
        if let Some(i) = last {
            self.applied_tx.send_replace(i);
        }
        if let Some(i) = collected {
            self.collected_tx.send_replace(i);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        // Copy the state to a file now, while no entry is being applied: the snapshot is
        // consistent. A read error fails the build (a snapshot missing keys would be installed
        // as the whole state).
        let _g = self.watch.enter_bulk("snapshot read");
        let started = std::time::Instant::now();
        let tmp = self.snap.temp("build");
        // seconds for a large state: off Raft's worker, which goes on meanwhile (no entry
        // applies until this returns)
        let copy = crate::node::blocking(|| {
            write_pairs(&tmp, self.state.get().iter())
                .map_err(|e| storage_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))
                .and_then(|len| {
                    self.read_applied().map(|(applied, membership)| (tmp.clone(), len, applied, membership))
                })
        });
        if copy.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        SnapshotBuilder {
            db: self.db.clone(),
            snap: self.snap.clone(),
            copy: Some(copy),
            copied_in: started.elapsed(),
            watch: self.watch.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let werr = |e| storage_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e);
        // A new stream replaces any earlier one (openraft receives one at a time): the files
        // of streams that never finished, a whole snapshot each at worst, go now, not at the
        // next start.
        self.snap.remove_temps("receive").map_err(werr)?;
        let tmp = self.snap.temp("receive");
        let f = tokio::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&tmp).await.map_err(werr)?;
        Ok(Box::new(f))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeAddr>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let werr = |e| storage_err(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Write, e);
        let _g = self.watch.enter_bulk("snapshot install");
        let started = std::time::Instant::now();
        let file = snapshot.into_std().await;
        let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        self.install_from(meta, file).await.map_err(werr)?;
        // the installed file has its name now; what is left of streams that never finished goes
        self.snap.remove_temps("receive").map_err(werr)?;
        let applied = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        tracing::info!(index = applied, bytes, took_ms = started.elapsed().as_millis() as u64, "snapshot installed");
        self.applied_tx.send_replace(applied);
        self.collected_tx.send_replace(applied);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current =
            self.snap.open_current().map_err(|e| storage_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e))?;
        Ok(current.map(|(meta, f)| Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(f)) }))
    }
}

/// A copy of the state taken for a snapshot: the temporary file of its pairs (snapshot data)
/// and the file's length, the applied log id and the membership.
type StateCopy = (PathBuf, u64, Option<LogId>, Membership);

/// Builds a snapshot from a copy of the state taken by `get_snapshot_builder`.
pub struct SnapshotBuilder {
    db: sled::Db,
    snap: SnapshotStore,
    /// The copy of the state, or why it could not be taken.
    copy: Option<Result<StateCopy, StorageError>>,
    /// How long taking the copy held the state machine.
    copied_in: std::time::Duration,
    watch: StorageWatch,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (tmp, len, applied, membership) = self
            .copy
            .take()
            .unwrap_or_else(|| Err(storage_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, "built twice")))?;
        let snapshot_id = match applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, len),
            None => format!("0-0-{len}"),
        };
        let meta = SnapshotMeta { last_log_id: applied, last_membership: membership, snapshot_id };
        let werr = |e: std::io::Error| storage_err(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Write, e);
        let _g = self.watch.enter_bulk("snapshot write");
        // open before it is stored: the handle reads the data whatever name it ends under
        let file = std::fs::File::open(&tmp).map_err(werr)?;
        // A snapshot installed from the leader while this one was being built may be newer:
        // the stored snapshot only ever moves forward.
        self.snap.store(&meta, &tmp, None, true).map_err(werr)?;
        // The state machine is flushed too, so logs purged after this snapshot are never needed.
        self.db.flush_async().await.map_err(|e| werr(io(e)))?;
        tracing::info!(
            index = applied.map(|l| l.index).unwrap_or(0),
            bytes = len,
            copy_ms = self.copied_in.as_millis() as u64,
            "snapshot built"
        );
        Ok(Snapshot { meta, snapshot: Box::new(tokio::fs::File::from_std(file)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, RaftSnapshotBuilder};
    use std::collections::{BTreeMap, BTreeSet};

    fn snapshot_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|f| f.starts_with("snapshot-") || f.starts_with(TMP_PREFIX))
            .collect();
        v.sort();
        v
    }

    async fn data_of(s: Snapshot<TypeConfig>) -> Vec<u8> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut f = *s.snapshot;
        f.seek(std::io::SeekFrom::Start(0)).await.unwrap();
        let mut v = Vec::new();
        f.read_to_end(&mut v).await.unwrap();
        v
    }

    fn entry(index: u64, payload: EntryPayload<TypeConfig>) -> Entry<TypeConfig> {
        Entry { log_id: LogId::new(CommittedLeaderId::new(3, 1), index), payload }
    }

    fn membership() -> EntryPayload<TypeConfig> {
        let addr = NodeAddr { peer: "127.0.0.1:1".into(), registry: "127.0.0.1:2".into() };
        EntryPayload::Membership(openraft::Membership::new(vec![BTreeSet::from([1])], BTreeMap::from([(1, addr)])))
    }

    /// A built snapshot's data is a file beside the database (the tree holds its meta and the
    /// file's name); earlier snapshots' files go; a snapshot kept the earlier way, whole in the
    /// tree, moves to a file when the store opens.
    #[tokio::test]
    async fn snapshots_live_in_files_and_earlier_ones_move_to_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let mut sm = StateMachine::open(&db, dir.path(), StorageWatch::offline()).unwrap();
        let mut last = Vec::new();
        for index in [1u64, 2] {
            sm.apply([entry(index, EntryPayload::Blank)]).await.unwrap();
            let built = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
            assert_eq!(snapshot_files(dir.path()), vec![format!("snapshot-3-{index}.data")]);
            let current = sm.get_current_snapshot().await.unwrap().unwrap();
            assert_eq!(current.meta, built.meta);
            let (a, b) = (data_of(current).await, data_of(built).await);
            assert_eq!(a, b);
            assert!(a.len() > 8);
            last = a;
        }
        assert!(sm.snap.tree.get(SNAP_DATA).unwrap().is_none());

        // the way earlier versions kept it: meta and data whole in the tree
        let (meta, _) = sm.snap.open_current().unwrap().unwrap();
        sm.snap.tree.remove(SNAP_META).unwrap();
        sm.snap.tree.remove(SNAP_FILE).unwrap();
        sm.snap.tree.insert(SNAP_LEGACY, enc(&StoredSnapshot { meta: meta.clone(), data: last.clone() })).unwrap();
        std::fs::remove_file(dir.path().join("snapshot-3-2.data")).unwrap();
        drop(sm);
        let mut sm = StateMachine::open(&db, dir.path(), StorageWatch::offline()).unwrap();
        assert_eq!(snapshot_files(dir.path()), vec!["snapshot-3-2.data".to_string()]);
        assert!(sm.snap.tree.get(SNAP_LEGACY).unwrap().is_none());
        let loaded = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(loaded.meta, meta);
        assert_eq!(data_of(loaded).await, last);
    }

    /// An install fills a tree of its own and switches readers to it at once: a reader taken
    /// before sees exactly the snapshot's state after, the replaced tree goes, and the state
    /// is the same after a restart. A tree an interrupted install left is dropped on open.
    #[tokio::test]
    async fn an_install_switches_to_a_tree_of_its_own() {
        let (da, db_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a_db = sled::Config::new().path(da.path()).open().unwrap();
        let mut a = StateMachine::open(&a_db, da.path(), StorageWatch::offline()).unwrap();
        a.apply([entry(1, membership())]).await.unwrap();
        for i in 0..3000u32 {
            a.state.get().insert(format!("x/{i:05}"), vec![7u8; 100]).unwrap();
        }
        a.apply([entry(2, EntryPayload::Blank)]).await.unwrap();
        let snap = a.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let want = a.reader().digest().unwrap();

        let b_db = sled::Config::new().path(db_dir.path()).open().unwrap();
        let mut b = StateMachine::open(&b_db, db_dir.path(), StorageWatch::offline()).unwrap();
        b.state.get().insert("only/in/b", vec![1]).unwrap();
        let reader = b.reader();
        // a stream the leader gave up on (a chunk timed out): openraft starts another
        {
            use tokio::io::AsyncWriteExt;
            let mut abandoned = b.begin_receiving_snapshot().await.unwrap();
            abandoned.write_all(&[0u8; 4096]).await.unwrap();
        }
        // received the way openraft receives it: into the file begin_receiving_snapshot gives
        let mut recv = b.begin_receiving_snapshot().await.unwrap();
        {
            use tokio::io::AsyncWriteExt;
            recv.write_all(&data_of(Snapshot { meta: snap.meta.clone(), snapshot: snap.snapshot }).await)
                .await
                .unwrap();
            recv.shutdown().await.unwrap();
        }
        b.install_snapshot(&snap.meta, recv).await.unwrap();
        assert_eq!(reader.digest().unwrap(), want);
        assert_eq!(reader.applied_index(), 2);
        assert!(reader.tree().get("only/in/b").unwrap().is_none());
        let state_trees = |db: &sled::Db| db.tree_names().into_iter().filter(|t| is_state_tree(t)).count();
        for _ in 0..100 {
            if state_trees(&b_db) == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(state_trees(&b_db), 1, "the replaced tree is dropped");
        // the received file became the stored snapshot; nothing temporary is left, not even
        // the abandoned stream's file
        assert_eq!(snapshot_files(db_dir.path()), vec!["snapshot-3-2.data".to_string()]);

        // a crash in the middle of an install leaves a tree that never became the state
        b_db.open_tree("state.1-1").unwrap().insert("half", vec![]).unwrap();
        drop((b, reader));
        let b = StateMachine::open(&b_db, db_dir.path(), StorageWatch::offline()).unwrap();
        assert_eq!(b.reader().digest().unwrap(), want);
        assert_eq!(state_trees(&b_db), 1);
    }

    /// The resident size of this process, and its peak since [`reset_peak_rss`], in MiB.
    fn rss_mib() -> (u64, u64) {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let field = |name: &str| {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap();
            line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    fn reset_peak_rss() {
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
    }

    /// A state machine in a database opened as a node opens it (8 MiB of sled cache).
    fn node_state_machine() -> (tempfile::TempDir, StateMachine) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::node::open_db(dir.path(), 8 << 20, false).unwrap();
        let sm = StateMachine::open(&db, dir.path(), StorageWatch::offline()).unwrap();
        (dir, sm)
    }

    /// The meta of a snapshot taken at log index `index`, with the test membership.
    fn snapshot_meta(index: u64) -> SnapshotMeta<NodeId, NodeAddr> {
        let applied = LogId::new(CommittedLeaderId::new(3, 1), index);
        let EntryPayload::Membership(m) = membership() else { unreachable!() };
        SnapshotMeta {
            last_log_id: Some(applied),
            last_membership: Membership::new(Some(applied), m),
            snapshot_id: format!("3-{index}-test"),
        }
    }

    /// Applies `events` as the command of log entry `index` (stamped `1000 + index`), which
    /// must succeed.
    async fn apply_ok(sm: &mut StateMachine, index: u64, events: Vec<Event>) {
        let cmd = raftyard_types::event::VersionedCommand::V1(Command { time_ms: 1000 + index, events });
        assert_eq!(sm.apply([entry(index, EntryPayload::Normal(cmd))]).await.unwrap(), vec![Ok(())]);
    }

    /// Installing a snapshot does not hold the snapshot in memory: 600,000 pairs shaped like
    /// the state's (126 MiB, 46,000 small images) go into a database opened as a node opens
    /// it (8 MiB cache), and the process's peak grows by less than 150 MiB (measured: 70; what
    /// grows with the data is sled's table of its pages, 15 MiB per 600,000 pairs). Written in
    /// 4 MiB batches, the same install peaked at 760 MiB more.
    #[tokio::test]
    async fn an_install_takes_memory_independent_of_the_snapshot_size() {
        let (_dir, mut sm) = node_state_machine();
        let path = sm.snap.temp("receive");
        let value = [7u8; 120];
        let pairs = (0..600_000u64).map(|i| {
            let key = format!("m/repo{:07}/sha256:{i:064x}", i / 13);
            Ok((sled::IVec::from(key.as_bytes()), sled::IVec::from(&value[..])))
        });
        let len = write_pairs(&path, pairs).unwrap();
        assert!(len > 110 << 20, "{len}");
        let meta = snapshot_meta(700_000);
        let file = tokio::fs::File::open(&path).await.unwrap();
        reset_peak_rss();
        let (before, _) = rss_mib();
        sm.install_snapshot(&meta, Box::new(file)).await.unwrap();
        let (_, peak) = rss_mib();
        assert_eq!(sm.reader().applied_index(), 700_000);
        let last = format!("m/repo{:07}/sha256:{:064x}", 599_999 / 13, 599_999);
        assert_eq!(sm.reader().tree().get(last).unwrap().as_deref(), Some(&value[..]));
        assert!(peak - before < 150, "an install of {} MiB grew the peak from {before} to {peak} MiB", len >> 20);
    }

    /// Journal retention drops old entries without keeping memory: 300,000 journal entries
    /// trimmed as the retention asks (`journal_trim_next`, 256 per event) grow the process's
    /// peak by less than 15 MiB (measured: 0–2). At 10,000 per event (the retention until
    /// then), the same trim grew it by 32–42 MiB, kept by sled.
    #[tokio::test]
    async fn a_journal_trim_takes_memory_independent_of_the_journal_size() {
        const ENTRIES: u64 = 300_000;
        let (_dir, mut sm) = node_state_machine();
        // a state with a long journal, installed as a snapshot (the quickest way to make one)
        let path = sm.snap.temp("receive");
        let value = [7u8; 200];
        let first =
            std::iter::once(Ok((sled::IVec::from(keys::JOURNAL_FIRST), sled::IVec::from(&1u64.to_be_bytes()[..]))));
        let journal = (1..=ENTRIES).map(|i| Ok((sled::IVec::from(keys::journal(i)), sled::IVec::from(&value[..]))));
        write_pairs(&path, first.chain(journal)).unwrap();
        let file = tokio::fs::File::open(&path).await.unwrap();
        sm.install_snapshot(&snapshot_meta(ENTRIES), Box::new(file)).await.unwrap();
        assert_eq!(sm.reader().journal_first().unwrap(), 1);

        reset_peak_rss();
        let (before, _) = rss_mib();
        let mut index = ENTRIES;
        while let Some(first) = sm.reader().journal_first().ok().filter(|f| *f <= ENTRIES) {
            index += 1;
            let trim = Event::JournalTrimmed { before: raftyard_types::event::journal_trim_next(first, ENTRIES + 1) };
            apply_ok(&mut sm, index, vec![trim]).await;
        }
        let (_, peak) = rss_mib();
        assert!(sm.reader().journal_first().unwrap() > ENTRIES);
        assert!(sm.reader().journal(1, 10).unwrap().iter().all(|e| e.index > ENTRIES), "the old entries are gone");
        assert!(peak - before < 15, "a trim of {ENTRIES} entries grew the peak from {before} to {peak} MiB");
    }

    /// A large collection leaves little memory behind: 20,000 untagged images (a manifest, a
    /// config and a layer each, in 100 repositories) collected as `raftyard gc` proposes it, in
    /// a database opened as a node opens it, grow the process's peak by less than 17 MiB
    /// (measured: 10–11, sled's table of the pages the deletes wrote; 22 at 40,000 images).
    /// sled 0.34 also keeps pages that a batch of thousands of deletes touched: at 1,000 items
    /// per event (the plan until then), 23 MiB at 20,000 images and 35 at 40,000.
    #[tokio::test]
    async fn a_large_collection_leaves_little_memory_behind() {
        const IMAGES: usize = 20_000;
        let (_dir, mut sm) = node_state_machine();
        let mut index = 1;
        apply_ok(&mut sm, index, vec![Event::ClusterUpgraded { protocol: 4 }]).await;
        let desc = |media_type: &str, d: &Digest| serde_json::json!({"mediaType": media_type, "digest": d.to_string(), "size": 10});
        let mut events = Vec::new();
        for i in 0..IMAGES {
            let repo = RepoName::parse(&format!("many/r{}", i % 100)).unwrap();
            let (config, layer) =
                (Digest::sha256(format!("config {i}").as_bytes()), Digest::sha256(format!("layer {i}").as_bytes()));
            let bytes = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2, "mediaType": raftyard_types::manifest::OCI_MANIFEST,
                "config": desc("application/vnd.oci.image.config.v1+json", &config),
                "layers": [desc("application/vnd.oci.image.layer.v1.tar", &layer)],
            }))
            .unwrap();
            let p = raftyard_types::manifest::parse_manifest(&bytes, "").unwrap();
            events.push(Event::BlobLinked { repo: repo.clone(), digest: config, size: 10 });
            events.push(Event::BlobLinked { repo: repo.clone(), digest: layer, size: 10 });
            events.push(Event::ManifestPut {
                repo,
                digest: Digest::sha256(&bytes),
                media_type: p.media_type,
                bytes,
                refs: p.required,
                subject: p.subject,
                artifact_type: p.artifact_type,
            });
            if events.len() >= 60 {
                index += 1;
                apply_ok(&mut sm, index, std::mem::take(&mut events)).await;
            }
        }
        index += 1;
        apply_ok(&mut sm, index, events).await;
        let plan = sm.reader().gc_plan(1000 + index + 1, true).unwrap();
        assert_eq!((plan.manifests.len(), plan.links.len()), (IMAGES, 2 * IMAGES));

        reset_peak_rss();
        let (before, _) = rss_mib();
        for ev in plan.events() {
            index += 1;
            apply_ok(&mut sm, index, vec![ev]).await;
        }
        let (_, peak) = rss_mib();
        assert!(sm.reader().blobs().unwrap().is_empty(), "every blob left the registry");
        assert!(peak - before < 17, "a collection of {IMAGES} images grew the peak from {before} to {peak} MiB");
    }

    /// The streamed encoding is the bincode of the pairs that earlier versions wrote (and that
    /// backups hold), both ways; data cut short is an error.
    #[test]
    fn snapshot_data_is_the_bincode_of_the_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pairs");
        let pairs: Pairs = vec![(b"a".to_vec(), vec![]), (b"b/x\0y".to_vec(), vec![1, 2, 3]), (vec![], b"z".to_vec())];
        let ivecs = pairs.iter().map(|(k, v)| Ok((sled::IVec::from(k.as_slice()), sled::IVec::from(v.as_slice()))));
        let len = write_pairs(&path, ivecs).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert_eq!(len, data.len() as u64);
        assert_eq!(data, bincode::serialize(&pairs).unwrap());
        let back: Vec<(Vec<u8>, Vec<u8>)> = PairReader::new(&data[..], len).unwrap().map(|p| p.unwrap()).collect();
        assert_eq!(back, pairs);
        let cut = &data[..data.len() - 1];
        assert!(PairReader::new(cut, cut.len() as u64).unwrap().any(|p| p.is_err()));
        // a length larger than the data is refused before anything is allocated for it
        let mut huge = data.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(PairReader::new(&huge[..], huge.len() as u64).unwrap().next().unwrap().is_err());
    }
}
