//! Upload sessions and the streaming writer that hashes and writes on a blocking thread.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use raftyard_types::{Hasher, RepoName};

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
}

pub(crate) struct Session {
    pub id: String,
    pub repo: RepoName,
    pub path: PathBuf,
    writer: Option<(File, Hasher)>,
    pub size: u64,
    pub last_active: Instant,
}

impl Session {
    pub fn new(id: String, repo: RepoName, path: PathBuf, file: File, hasher: Hasher) -> Self {
        Session { id, repo, path, writer: Some((file, hasher)), size: 0, last_active: Instant::now() }
    }

    pub fn status(&self) -> UploadStatus {
        UploadStatus { id: self.id.clone(), repo: self.repo.clone(), size: self.size }
    }

    pub fn take_writer(&mut self) -> Result<(File, Hasher)> {
        self.last_active = Instant::now();
        // A writer is missing only if an earlier request panicked mid-write.
        self.writer.take().ok_or(BlobError::UploadUnknown)
    }

    pub fn put_writer(&mut self, file: File, hasher: Hasher, written: u64) {
        self.writer = Some((file, hasher));
        self.size += written;
        self.last_active = Instant::now();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Finished sessions renamed their file away; others leave garbage we remove here.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Streams `body` into `file`, hashing every byte exactly once, on a blocking thread fed through
/// a bounded channel (so network receive, hashing and writing overlap, and memory stays bounded).
/// Returns the writer back with the number of bytes that reached both the file and the hash.
pub(crate) async fn write_stream<S, E>(file: File, hasher: Hasher, mut body: S) -> (File, Hasher, u64, Result<()>)
where
    S: Stream<Item = std::result::Result<Bytes, E>> + Send + Unpin,
    E: std::fmt::Display,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(PIPELINE_DEPTH);
    let disk = tokio::task::spawn_blocking(move || {
        let mut file = file;
        let mut hasher = hasher;
        let mut written = 0u64;
        let start = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut flushed = 0u64;
        while let Some(buf) = rx.blocking_recv() {
            if let Err(e) = file.write_all(&buf) {
                // The file may now hold a prefix of buf; cut it back so file and hash agree.
                let _ = file.set_len(start + written);
                let _ = std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(start + written));
                return (file, hasher, written, Err(e.into()));
            }
            hasher.update(&buf);
            written += buf.len() as u64;
            if written - flushed >= WRITEBACK_EVERY {
                start_writeback(&file, start + flushed, written - flushed);
                flushed = written;
            }
        }
        (file, hasher, written, Ok(()))
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
        Ok((file, hasher, written, disk_result)) => {
            let result = match (disk_result, body_err) {
                (Err(e), _) => Err(e),
                (Ok(()), Some(e)) => Err(e),
                (Ok(()), None) => Ok(()),
            };
            (file, hasher, written, result)
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
        let file = File::options().write(true).open("/dev/full").expect("/dev/full");
        let hasher = raftyard_types::Algorithm::Sha256.hasher();
        let body = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(vec![7u8; 1 << 20]))]);
        let (_, _, written, r) = write_stream(file, hasher, body).await;
        assert_eq!(written, 0);
        assert!(matches!(r, Err(BlobError::StorageFull(_))), "{r:?}");
    }
}
