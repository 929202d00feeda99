//! Upload sessions and the streaming writer that hashes and writes on a blocking thread.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use raftyard_types::{Algorithm, Hasher, RepoName};

use crate::{BlobError, Result};

/// Bytes gathered before one write+hash step: large writes, few syscalls.
const WRITE_BUF: usize = 1 << 20;
/// Buffers in flight between the network task and the disk thread (backpressure bound).
const PIPELINE_DEPTH: usize = 4;
/// Dirty bytes after which writeback of the written range is started, so that the final
/// fsync of a large blob has little left to do (disk writes overlap the transfer).
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Starts asynchronous writeback of `[offset, offset+len)` (Linux `sync_file_range`); this
/// is only a head start for the fsync that follows, so errors are ignored.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open descriptor; no memory is passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// What a client can learn about its upload session.
#[derive(Debug, Clone)]
pub struct UploadStatus {
    pub id: String,
    pub repo: RepoName,
    /// Bytes received so far.
    pub size: u64,
    /// The algorithm the session hashes with.
    pub algorithm: Algorithm,
}

/// What a session has written: the bytes in its file and their running hash, always in step.
pub(crate) struct Written {
    pub hasher: Hasher,
    pub size: u64,
}

/// A write in progress holds this; its disk thread lets go when it is done.
pub(crate) type WrittenGuard = tokio::sync::OwnedMutexGuard<Written>;

pub(crate) struct Session {
    pub repo: RepoName,
    pub path: PathBuf,
    pub algorithm: Algorithm,
    /// Held by the write in progress, and by its disk thread until that thread is done: a
    /// request dropped midway (a client timeout, an HTTP/2 stream reset) leaves the thread to
    /// finish what it was given and hand the state back, so file and hash never part.
    pub written: Arc<tokio::sync::Mutex<Written>>,
    /// Bytes received, as of the last chunk written (readable while a write runs).
    pub received: Arc<AtomicU64>,
    pub last_active: Instant,
}

impl Session {
    /// A session whose file is created by its first write (an idle session holds no file
    /// descriptor, and no file at all until data comes).
    pub fn new(repo: RepoName, path: PathBuf, algorithm: Algorithm) -> Self {
        Session {
            repo,
            path,
            algorithm,
            written: Arc::new(tokio::sync::Mutex::new(Written { hasher: algorithm.hasher(), size: 0 })),
            received: Arc::new(AtomicU64::new(0)),
            last_active: Instant::now(),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Finished sessions renamed their file away; others leave garbage we remove here.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The free-space reserve a write must leave: checked every [`WRITEBACK_EVERY`] bytes.
pub(crate) struct SpaceCheck {
    pub root: PathBuf,
    pub min_free: u64,
}

impl SpaceCheck {
    pub(crate) fn check(&self) -> Result<()> {
        let free = crate::store::free_bytes(&self.root)?;
        if free < self.min_free {
            return Err(BlobError::StorageFull(format!(
                "{} MiB free, below the reserve of {} MiB",
                free >> 20,
                self.min_free >> 20
            )));
        }
        Ok(())
    }
}

/// Opens a session's file for its next write: created by the first, cut back to what the
/// hash covers (nothing past it can be there but the tail of a failed write), positioned at
/// its end.
pub(crate) fn open_for_write(path: &std::path::Path, size: u64) -> std::io::Result<File> {
    use std::io::Seek;
    let mut f = File::options().create(true).write(true).truncate(false).open(path)?;
    if f.metadata()?.len() != size {
        f.set_len(size)?;
    }
    f.seek(std::io::SeekFrom::Start(size))?;
    Ok(f)
}

/// Streams `body` into the session's file at `path`, hashing every byte exactly once, on a
/// blocking thread fed through a bounded channel (so network receive, hashing and writing
/// overlap, and memory stays bounded). The thread holds `written` (the bytes so far and their
/// hash) and updates it as it goes; it opens the file itself and closes it when done, so no
/// descriptor outlives a write. Returns the bytes that reached both the file and the hash.
pub(crate) async fn write_stream<S, E>(
    path: PathBuf,
    mut written: WrittenGuard,
    received: Arc<AtomicU64>,
    space: Option<SpaceCheck>,
    mut body: S,
) -> (u64, Result<()>)
where
    S: Stream<Item = std::result::Result<Bytes, E>> + Send + Unpin,
    E: std::fmt::Display,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(PIPELINE_DEPTH);
    let disk = tokio::task::spawn_blocking(move || {
        let start = written.size;
        let mut file = match open_for_write(&path, start) {
            Ok(f) => f,
            Err(e) => return (0, Err(BlobError::from(e))),
        };
        let mut n = 0u64;
        let mut flushed = 0u64;
        while let Some(buf) = rx.blocking_recv() {
            if let Err(e) = file.write_all(&buf) {
                // The file may now hold a prefix of buf; cut it back so file and hash agree.
                let _ = file.set_len(start + n);
                return (n, Err(e.into()));
            }
            written.hasher.update(&buf);
            n += buf.len() as u64;
            written.size = start + n;
            received.store(start + n, Ordering::Release);
            if n - flushed >= WRITEBACK_EVERY {
                start_writeback(&file, start + flushed, n - flushed);
                flushed = n;
                // a long write stops at the reserve too, not only a write that starts below it
                if let Some(Err(e)) = space.as_ref().map(SpaceCheck::check) {
                    return (n, Err(e));
                }
            }
        }
        (n, Ok(()))
    });

    let mut body_err = None;
    let mut pending = BytesMut::new();
    loop {
        match body.next().await {
            Some(Ok(chunk)) => {
                if pending.is_empty() && chunk.len() >= WRITE_BUF {
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                    continue;
                }
                if pending.capacity() < WRITE_BUF {
                    pending.reserve(WRITE_BUF);
                }
                pending.extend_from_slice(&chunk);
                if pending.len() >= WRITE_BUF && tx.send(pending.split().freeze()).await.is_err() {
                    break;
                }
            }
            Some(Err(e)) => {
                body_err = Some(BlobError::Body(e.to_string()));
                break;
            }
            None => break,
        }
    }
    // Bytes that arrived before a body error are kept: the session reports them as received.
    if !pending.is_empty() {
        let _ = tx.send(pending.split().freeze()).await;
    }
    drop(tx);
    match disk.await {
        Ok((n, disk_result)) => {
            let result = match (disk_result, body_err) {
                (Err(e), _) => Err(e),
                (Ok(()), Some(e)) => Err(e),
                (Ok(()), None) => Ok(()),
            };
            (n, result)
        }
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk while writing a blob is `StorageFull` (507 at the API), not a generic I/O
    /// error (500): `/dev/full` answers every write with ENOSPC.
    #[tokio::test]
    async fn a_full_disk_while_writing_is_storage_full() {
        let written = Arc::new(tokio::sync::Mutex::new(Written { hasher: Algorithm::Sha256.hasher(), size: 0 }));
        let body = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(vec![7u8; 1 << 20]))]);
        let received = Arc::new(AtomicU64::new(0));
        let (n, r) = write_stream("/dev/full".into(), written.lock_owned().await, received, None, body).await;
        assert_eq!(n, 0);
        assert!(matches!(r, Err(BlobError::StorageFull(_))), "{r:?}");
    }
}
