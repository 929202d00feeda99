//! The Raft log and vote on sled. Appends are acknowledged to openraft only after sled has
//! flushed them to disk.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, ErrorSubject, ErrorVerb, RaftLogId, RaftLogReader, Vote};

use crate::watchdog::StorageWatch;
use crate::{storage_err, LogId, NodeId, StorageError, TypeConfig};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// Log entries in tree `log` (key: index BE), vote and bookkeeping in tree `raft`.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    raft: sled::Tree,
    flusher: std::sync::mpsc::Sender<LogFlushed<TypeConfig>>,
    watch: StorageWatch,
}

/// Group commit off Raft's core loop: appends queue their callback; one thread flushes sled
/// once for everything queued and then acknowledges those appends, in order. Awaiting the
/// flush inside `append` would stall Raft (heartbeats, votes, read-index checks) for the
/// length of every fsync. Each flush runs under the storage watchdog: one that never returns
/// stops the node instead of holding every append for ever.
fn spawn_flusher(
    db: sled::Db,
    watch: StorageWatch,
    hang_when: Option<std::path::PathBuf>,
) -> std::sync::mpsc::Sender<LogFlushed<TypeConfig>> {
    let (tx, rx) = std::sync::mpsc::channel::<LogFlushed<TypeConfig>>();
    std::thread::Builder::new()
        .name("raft-log-flush".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                batch.extend(rx.try_iter());
                let res = watch.run("raft log flush", || {
                    if hang_when.as_ref().is_some_and(|p| p.exists()) {
                        // the deliberate fault: a device that never completes the write
                        tracing::warn!("deliberate fault: the raft log flush hangs");
                        loop {
                            std::thread::park();
                        }
                    }
                    db.flush().map(|_| ())
                });
                for cb in batch {
                    cb.log_io_completed(res.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())));
                }
            }
        })
        .expect("spawn the raft log flusher");
    tx
}

fn idx_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

impl LogStore {
    /// Opens the log's trees; every blocking call runs under `watch`.
    pub fn open(db: &sled::Db, watch: StorageWatch) -> Result<Self, sled::Error> {
        Self::open_with_fault(db, watch, None)
    }

    /// The same, with the deliberate fault of the tests: once the file `hang_when` exists,
    /// log flushes never return (a wedged disk).
    pub fn open_with_fault(
        db: &sled::Db,
        watch: StorageWatch,
        hang_when: Option<std::path::PathBuf>,
    ) -> Result<Self, sled::Error> {
        Ok(LogStore {
            db: db.clone(),
            log: db.open_tree("log")?,
            raft: db.open_tree("raft")?,
            flusher: spawn_flusher(db.clone(), watch.clone(), hang_when),
            watch,
        })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        subject: ErrorSubject<NodeId>,
    ) -> Result<Option<T>, StorageError> {
        match self.raft.get(key).map_err(|e| storage_err(subject.clone(), ErrorVerb::Read, e))? {
            None => Ok(None),
            Some(v) => bincode::deserialize(&v).map(Some).map_err(|e| storage_err(subject, ErrorVerb::Read, e)),
        }
    }

    fn put_meta<T: serde::Serialize>(
        &self,
        key: &[u8],
        v: &T,
        subject: ErrorSubject<NodeId>,
    ) -> Result<(), StorageError> {
        let bytes = bincode::serialize(v).map_err(|e| storage_err(subject.clone(), ErrorVerb::Write, e))?;
        self.watch
            .run("raft metadata write", || self.raft.insert(key, bytes))
            .map_err(|e| storage_err(subject, ErrorVerb::Write, e))?;
        Ok(())
    }

    async fn flush(&self, subject: ErrorSubject<NodeId>) -> Result<(), StorageError> {
        let _g = self.watch.enter("raft log flush");
        self.db.flush_async().await.map_err(|e| storage_err(subject, ErrorVerb::Write, e))?;
        Ok(())
    }

    /// Applies a batch to the log tree under the watchdog.
    fn apply_log_batch(&self, batch: sled::Batch, verb: ErrorVerb) -> Result<(), StorageError> {
        self.watch
            .run("raft log write", || self.log.apply_batch(batch))
            .map_err(|e| storage_err(ErrorSubject::Logs, verb, e))
    }

    fn decode(v: &[u8]) -> Result<Entry<TypeConfig>, StorageError> {
        bincode::deserialize(v).map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Read, e))
    }

    /// Appends `entry` outside of Raft (offline recovery; see [`crate::recover`]); the caller
    /// flushes the database.
    pub fn append_offline(&self, entry: &Entry<TypeConfig>) -> Result<(), sled::Error> {
        let bytes = bincode::serialize(entry).map_err(|e| sled::Error::Unsupported(e.to_string()))?;
        self.log.insert(idx_key(entry.get_log_id().index), bytes)?;
        Ok(())
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        match self.log.last().map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Read, e))? {
            None => Ok(None),
            Some((_, v)) => Ok(Some(*Self::decode(&v)?.get_log_id())),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => Bound::Included(idx_key(i)),
            Bound::Excluded(&i) => Bound::Excluded(idx_key(i)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for kv in self.log.range((Bound::Included(idx_key(start)), end)) {
            let (_, v) = kv.map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            out.push(Self::decode(&v)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.get_meta(LAST_PURGED, ErrorSubject::Logs)?;
        let last = self.last_entry_id()?.or(last_purged);
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(VOTE, vote, ErrorSubject::Vote)?;
        self.flush(ErrorSubject::Vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(VOTE, ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed on its own: it is an optimisation for restart, not a safety property.
        self.put_meta(COMMITTED, &committed, ErrorSubject::Store)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(COMMITTED, ErrorSubject::Store)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut writes = Vec::new();
        for e in entries {
            let bytes = bincode::serialize(&e)
                .map_err(|err| storage_err(ErrorSubject::Log(*e.get_log_id()), ErrorVerb::Write, err))?;
            writes.push((idx_key(e.get_log_id().index), bytes));
        }
        // One entry (the usual case of a write at a time) is one sled insert: a batch would
        // make sled seal and write its buffer twice more (before and after the batch
        // marker), about a tenth of a forwarded manifest PUT's latency. An insert is atomic by
        // itself, and sled recovers a prefix of its log, as it does across batches.
        if let [(k, v)] = &mut writes[..] {
            let (k, v) = (*k, std::mem::take(v));
            self.watch
                .run("raft log write", || self.log.insert(k, v))
                .map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        } else {
            let mut batch = sled::Batch::default();
            for (k, v) in writes {
                batch.insert(&k, v);
            }
            self.apply_log_batch(batch, ErrorVerb::Write)?;
        }
        // Entries are readable now; durability is acknowledged by the flusher.
        if let Err(std::sync::mpsc::SendError(callback)) = self.flusher.send(callback) {
            callback.log_io_completed(Err(std::io::Error::other("log flusher stopped")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for kv in self.log.range(idx_key(log_id.index)..) {
            let (k, _) = kv.map_err(|e| storage_err(ErrorSubject::Logs, ErrorVerb::Delete, e))?;
            batch.remove(k);
        }
        self.apply_log_batch(batch, ErrorVerb::Delete)?;
        self.flush(ErrorSubject::Logs).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first: a crash in between leaves extra entries, never a hole.
        self.put_meta(LAST_PURGED, &log_id, ErrorSubject::Logs)?;
        self.flush(ErrorSubject::Logs).await?;
        // Oldest first, one at a time: a crash leaves a suffix of them, still no hole. A batch
        // of the thousands of entries a purge removes would keep what it touched in memory
        // (sled 0.34; see the snapshot install, `state.rs`).
        let delete = |e| storage_err(ErrorSubject::Logs, ErrorVerb::Delete, e);
        for kv in self.log.range(..=idx_key(log_id.index)) {
            let (k, _) = kv.map_err(delete)?;
            self.watch.run("raft log write", || self.log.remove(k)).map_err(delete)?;
        }
        Ok(())
    }
}
