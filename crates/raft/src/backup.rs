//! Online backups of the metadata: a consistent snapshot of the state at a log index, taken
//! on a running node, written to a file, read back to list the blobs it references, opened as
//! a read-only state, or used to seed a new node's storage.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{Membership, SnapshotMeta, StoredMembership, Vote};
use raftyard_types::Digest;

use crate::log_store::LogStore;
use crate::node::{MetaNode, ProposeError, StartError};
use crate::state::{dec, enc, BlobInfo, StateMachine, StoredSnapshot};
use crate::ManifestRecord;
use crate::{keys, NodeAddr, NodeId, StateReader, StorageWatch};

/// One key and value of the state.
type KeyValue = (Vec<u8>, Vec<u8>);

/// One repository's content in a snapshot.
#[derive(Debug, Default)]
pub struct Repository {
    pub blobs: Vec<(Digest, u64)>,
    pub manifests: Vec<(Digest, String, Vec<u8>)>,
    pub tags: Vec<(String, Digest)>,
}

/// A snapshot of the metadata state: what `raftyard backup create` stores.
pub struct BackupSnapshot(StoredSnapshot);

impl BackupSnapshot {
    /// The log index (and term) the state is at.
    pub fn index(&self) -> u64 {
        self.0.meta.last_log_id.map(|l| l.index).unwrap_or(0)
    }

    pub fn term(&self) -> u64 {
        self.0.meta.last_log_id.map(|l| l.leader_id.term).unwrap_or(0)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        enc(&self.0)
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        dec::<StoredSnapshot>(b).map(BackupSnapshot)
    }

    fn pairs(&self) -> Result<Vec<KeyValue>, StartError> {
        bincode::deserialize(&self.0.data).map_err(|e| StartError::Storage(format!("snapshot data: {e}")))
    }

    /// Every blob the state knows, with its size.
    pub fn blobs(&self) -> Result<Vec<(Digest, u64)>, StartError> {
        let prefix = keys::blob("");
        let mut out = Vec::new();
        for (k, v) in self.pairs()? {
            if let Some(rest) = k.strip_prefix(prefix.as_slice()) {
                if let (Ok(d), Some(info)) = (Digest::parse(&String::from_utf8_lossy(rest)), dec::<BlobInfo>(&v)) {
                    out.push((d, info.size));
                }
            }
        }
        Ok(out)
    }

    /// The voters and learners of the cluster it was taken from, with their addresses.
    pub fn members(&self) -> Vec<(NodeId, NodeAddr)> {
        self.0.meta.last_membership.membership().nodes().map(|(id, a)| (*id, a.clone())).collect()
    }

    /// What `repo` holds: its blobs (digest, size), manifests (digest, media type, bytes) and
    /// tags (tag, digest).
    pub fn repository(&self, repo: &str) -> Result<Repository, StartError> {
        let (lp, mp, tp) = (keys::link(repo, ""), keys::manifest(repo, ""), keys::tag(repo, ""));
        let mut r = Repository::default();
        let digest = |rest: &[u8]| Digest::parse(&String::from_utf8_lossy(rest)).ok();
        for (k, v) in self.pairs()? {
            if let Some(d) = k.strip_prefix(lp.as_slice()).and_then(digest) {
                let size = v.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
                r.blobs.push((d, size));
            } else if let Some(d) = k.strip_prefix(mp.as_slice()).and_then(digest) {
                if let Some(m) = dec::<ManifestRecord>(&v) {
                    r.manifests.push((d, m.media_type, m.bytes));
                }
            } else if let Some(t) = k.strip_prefix(tp.as_slice()) {
                if let Some(d) = digest(&v) {
                    r.tags.push((String::from_utf8_lossy(t).into_owned(), d));
                }
            }
        }
        Ok(r)
    }

    /// Installs the state in a new sled database under `dir` and returns a reader of it.
    pub async fn open(&self, dir: &Path) -> Result<StateReader, StartError> {
        let db = sled::Config::new().path(dir).open()?;
        let mut sm = StateMachine::open(&db, dir, StorageWatch::offline())?;
        let data = self.data_file(&sm)?;
        sm.install_snapshot(&self.0.meta, data).await?;
        Ok(sm.reader())
    }

    /// The snapshot's data in a file of the state machine's snapshot store, open, to install.
    fn data_file(&self, sm: &StateMachine) -> Result<Box<tokio::fs::File>, StartError> {
        use std::io::Write;
        let path = sm.snapshots().temp("restore");
        let mut f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        f.write_all(&self.0.data)?;
        Ok(Box::new(tokio::fs::File::from_std(f)))
    }

    /// Seeds the metadata storage of a new node under `dir` (which must not hold any): the
    /// state of this snapshot, with node `id` (at `addr`) the only voter. The node then starts
    /// as a cluster of one at the snapshot's index.
    pub async fn seed(&self, dir: &Path, id: NodeId, addr: NodeAddr) -> Result<(), StartError> {
        if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
            return Err(StartError::Storage(format!("{} is not empty", dir.display())));
        }
        let db = sled::Config::new().path(dir).open()?;
        let watch = StorageWatch::offline();
        let (mut log, mut sm) = (LogStore::open(&db, watch.clone())?, StateMachine::open(&db, dir, watch)?);
        let last = self.0.meta.last_log_id;
        let membership = Membership::new(vec![BTreeSet::from([id])], BTreeMap::from([(id, addr)]));
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: StoredMembership::new(last, membership),
            snapshot_id: format!("restored-{}", self.0.meta.snapshot_id),
        };
        let data = self.data_file(&sm)?;
        sm.install_snapshot(&meta, data).await?;
        if let Some(last) = last {
            // the log starts after the snapshot
            log.purge(last).await?;
            // Raft orders log ids by term first: a node that started in term 1 would append
            // after (T, N) at (1, N + 1), which sorts below it, and never commit anything. A vote
            // in the snapshot's term makes its first election move past it.
            log.save_vote(&Vote::new(last.leader_id.term, id)).await?;
        }
        db.flush_async().await?;
        Ok(())
    }
}

/// A snapshot taken on a running node for a backup: its meta and its data file, open (it
/// stays readable when a newer snapshot replaces it). Sent as a stream: [`Self::header`] and
/// then the file, which together are the bytes of a [`BackupSnapshot`].
pub struct SnapshotFile {
    meta: SnapshotMeta<NodeId, NodeAddr>,
    pub file: std::fs::File,
    pub len: u64,
}

impl SnapshotFile {
    /// The log index the state is at.
    pub fn index(&self) -> u64 {
        self.meta.last_log_id.map(|l| l.index).unwrap_or(0)
    }

    /// What comes before the data in a backup's bytes: the bincode of the meta, then the
    /// data's length (the layout of the bincode of a [`StoredSnapshot`]).
    pub fn header(&self) -> Vec<u8> {
        let mut h = enc(&self.meta);
        h.extend_from_slice(&self.len.to_le_bytes());
        h
    }
}

impl MetaNode {
    /// A consistent snapshot of the state including every write acknowledged before the call:
    /// after a read barrier, Raft builds a snapshot at (or after) the applied index.
    pub async fn backup_snapshot(&self) -> Result<SnapshotFile, ProposeError> {
        self.read_barrier().await?;
        let target = self.reader().applied_index();
        let unavailable = |e: String| ProposeError::Unavailable(format!("backup snapshot: {e}"));
        self.raft().trigger().snapshot().await.map_err(|e| unavailable(e.to_string()))?;
        let mut m = self.raft().metrics();
        tokio::time::timeout(Duration::from_secs(120), m.wait_for(|m| m.snapshot.is_some_and(|s| s.index >= target)))
            .await
            .map_err(|_| unavailable("not built within 120 s".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
        let (meta, file) = self
            .snapshots()
            .open_current()
            .map_err(|e| unavailable(e.to_string()))?
            .ok_or_else(|| unavailable("no snapshot stored".into()))?;
        let len = file.metadata().map_err(|e| unavailable(e.to_string()))?.len();
        Ok(SnapshotFile { meta, file, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backup streamed as header and data file has the bytes of the whole snapshot's bincode.
    #[test]
    fn a_streamed_backup_is_the_bincode_of_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, b"some snapshot data").unwrap();
        let meta = SnapshotMeta::<NodeId, NodeAddr> {
            last_log_id: Some(crate::LogId::new(openraft::CommittedLeaderId::new(4, 2), 77)),
            last_membership: StoredMembership::default(),
            snapshot_id: "4-77-18".into(),
        };
        let f = SnapshotFile { meta: meta.clone(), file: std::fs::File::open(&path).unwrap(), len: 18 };
        let mut streamed = f.header();
        streamed.extend_from_slice(&std::fs::read(&path).unwrap());
        assert_eq!(streamed, enc(&StoredSnapshot { meta, data: b"some snapshot data".to_vec() }));
        let back = BackupSnapshot::from_bytes(&streamed).unwrap();
        assert_eq!((back.index(), back.term()), (77, 4));
    }
}
