//! Online backups of the metadata: a consistent snapshot of the state at a log index, taken
//! on a running node, written to a file, read back to list the blobs it references, opened as
//! a read-only state, or used to seed a new node's storage.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{Membership, SnapshotMeta, StoredMembership, Vote};
use raftyard_types::Digest;

use crate::log_store::LogStore;
use crate::node::{MetaNode, ProposeError, StartError};
use crate::state::{dec, enc, BlobInfo, PairReader, StateMachine};
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

/// A snapshot of the metadata state in a file, as `raftyard backup create` stores it (the
/// bincode of the snapshot's meta, the data's length, then the data: the layout of the bincode
/// of a `StoredSnapshot`). Read from the file as needed, never whole.
pub struct BackupSnapshot {
    meta: SnapshotMeta<NodeId, NodeAddr>,
    path: PathBuf,
    /// Where the data starts in the file, and its length.
    data_at: u64,
    len: u64,
}

impl BackupSnapshot {
    /// Opens a backup's snapshot file, checking that its layout adds up to the file's length.
    pub fn open_file(path: &Path) -> std::io::Result<Self> {
        use bincode::Options as _;
        use std::io::Read;
        let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        let file = std::fs::File::open(path)?;
        let total = file.metadata()?.len();
        let mut r = std::io::BufReader::new(file);
        // the layout of bincode::serialize, with a bound on what a damaged length could ask for
        let opts = bincode::DefaultOptions::new().with_fixint_encoding().allow_trailing_bytes().with_limit(16 << 20);
        let meta: SnapshotMeta<NodeId, NodeAddr> =
            opts.deserialize_from(&mut r).map_err(|e| bad(format!("snapshot meta: {e}")))?;
        let mut l = [0u8; 8];
        r.read_exact(&mut l).map_err(|_| bad("cut short after the meta".into()))?;
        let len = u64::from_le_bytes(l);
        let data_at = opts.serialized_size(&meta).map_err(|e| bad(e.to_string()))? + 8;
        if data_at.checked_add(len) != Some(total) {
            return Err(bad(format!("{total} bytes, but the layout says {data_at} + {len}")));
        }
        Ok(BackupSnapshot { meta, path: path.to_path_buf(), data_at, len })
    }

    /// The log index (and term) the state is at.
    pub fn index(&self) -> u64 {
        self.meta.last_log_id.map(|l| l.index).unwrap_or(0)
    }

    pub fn term(&self) -> u64 {
        self.meta.last_log_id.map(|l| l.leader_id.term).unwrap_or(0)
    }

    /// The data, positioned at its start and limited to its length.
    fn data(&self) -> std::io::Result<std::io::Take<std::fs::File>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&self.path)?;
        f.seek(SeekFrom::Start(self.data_at))?;
        Ok(f.take(self.len))
    }

    /// The state's keys and values, one at a time.
    fn pairs(&self) -> Result<impl Iterator<Item = std::io::Result<KeyValue>>, StartError> {
        let data = std::io::BufReader::with_capacity(1 << 20, self.data()?);
        Ok(PairReader::new(data, self.len)?)
    }

    /// Every blob the state knows, with its size.
    pub fn blobs(&self) -> Result<Vec<(Digest, u64)>, StartError> {
        let prefix = keys::blob("");
        let mut out = Vec::new();
        for kv in self.pairs()? {
            let (k, v) = kv?;
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
        self.meta.last_membership.membership().nodes().map(|(id, a)| (*id, a.clone())).collect()
    }

    /// What `repo` holds: its blobs (digest, size), manifests (digest, media type, bytes) and
    /// tags (tag, digest).
    pub fn repository(&self, repo: &str) -> Result<Repository, StartError> {
        let (lp, mp, tp) = (keys::link(repo, ""), keys::manifest(repo, ""), keys::tag(repo, ""));
        let mut r = Repository::default();
        let digest = |rest: &[u8]| Digest::parse(&String::from_utf8_lossy(rest)).ok();
        for kv in self.pairs()? {
            let (k, v) = kv?;
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
        let db = crate::node::open_offline_db(dir, false)?;
        let mut sm = StateMachine::open(&db, dir, StorageWatch::offline())?;
        let data = self.data_file(&sm)?;
        sm.install_snapshot(&self.meta, data).await?;
        Ok(sm.reader())
    }

    /// The snapshot's data copied into a file of the state machine's snapshot store, open, to
    /// install.
    fn data_file(&self, sm: &StateMachine) -> Result<Box<tokio::fs::File>, StartError> {
        let path = sm.snapshots().copy_to_temp("restore", self.data()?)?;
        Ok(Box::new(tokio::fs::File::from_std(std::fs::File::open(path)?)))
    }

    /// Seeds the metadata storage of a new node under `dir` (which must not hold any): the
    /// state of this snapshot, with node `id` (at `addr`) the only voter. The node then starts
    /// as a cluster of one at the snapshot's index. With `compress`, the new database
    /// compresses what it writes (as `raft.compress_metadata` makes a node's).
    pub async fn seed(&self, dir: &Path, id: NodeId, addr: NodeAddr, compress: bool) -> Result<(), StartError> {
        if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
            return Err(StartError::Storage(format!("{} is not empty", dir.display())));
        }
        let db = crate::node::open_offline_db(dir, compress)?;
        let watch = StorageWatch::offline();
        let (mut log, mut sm) = (LogStore::open(&db, watch.clone())?, StateMachine::open(&db, dir, watch)?);
        let last = self.meta.last_log_id;
        let membership = Membership::new(vec![BTreeSet::from([id])], BTreeMap::from([(id, addr)]));
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: StoredMembership::new(last, membership),
            snapshot_id: format!("restored-{}", self.meta.snapshot_id),
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
    /// data's length (the layout of the bincode of a `StoredSnapshot`).
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
    use crate::state::StoredSnapshot;

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
        let backup = dir.path().join("backup.snap");
        std::fs::write(&backup, &streamed).unwrap();
        let back = BackupSnapshot::open_file(&backup).unwrap();
        assert_eq!((back.index(), back.term()), (77, 4));
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut back.data().unwrap(), &mut data).unwrap();
        assert_eq!(data, b"some snapshot data");
        // a file cut short, or with bytes after the data, is refused
        std::fs::write(&backup, &streamed[..streamed.len() - 1]).unwrap();
        assert!(BackupSnapshot::open_file(&backup).is_err());
        streamed.push(0);
        streamed.push(0);
        std::fs::write(&backup, &streamed).unwrap();
        assert!(BackupSnapshot::open_file(&backup).is_err());
    }
}
