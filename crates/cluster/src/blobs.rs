//! Blob bytes between nodes: fetching a blob this node lacks from a node that holds it, and
//! pushing a blob to peers before an upload is acknowledged. Streams in chunks with
//! backpressure; the receiving side verifies the digest before the blob becomes visible.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use raftyard_blobstore::BlobStore;
use raftyard_raft::{NodeAddr, NodeId};
use raftyard_types::{Digest, RepoName};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn, Instrument as _};

use crate::pb::blobs_client::BlobsClient;
use crate::pb::{put_blob_part, BlobChunk, GetBlobRequest, PutBlobHeader, PutBlobPart};
use crate::peers::Peers;

/// Size of one chunk on the wire.
pub const CHUNK: usize = 1 << 20;
/// Chunks in flight per stream.
const DEPTH: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum PeerBlobError {
    #[error("no peer could provide blob {0}")]
    NoSource(Digest),
    #[error("peer {peer}: {msg}")]
    Peer { peer: String, msg: String },
    #[error("local store: {0}")]
    Store(#[from] raftyard_blobstore::BlobError),
}

impl PeerBlobError {
    /// Whether this node's own store refused the blob for want of space.
    pub fn is_local_space(&self) -> bool {
        matches!(self, PeerBlobError::Store(raftyard_blobstore::BlobError::StorageFull(_)))
    }
}

/// Moves `len` bytes of a peer's blob stream into a bounded channel (the registry's bodies must
/// be `Sync`, a gRPC stream is not), hashing them when `verify`.
fn pass_through(
    mut stream: tonic::Streaming<BlobChunk>,
    digest: Digest,
    len: u64,
    verify: bool,
) -> mpsc::Receiver<std::io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel(DEPTH);
    tokio::spawn(async move {
        let mut hasher = verify.then(|| digest.algorithm().hasher());
        let mut left = len;
        let fail = |msg: String| std::io::Error::other(format!("blob {digest} from a peer: {msg}"));
        while left > 0 {
            let item = match stream.message().await {
                Ok(Some(c)) if !c.data.is_empty() => {
                    let mut data = c.data;
                    data.truncate(left.min(data.len() as u64) as usize);
                    left -= data.len() as u64;
                    if let Some(h) = &mut hasher {
                        h.update(&data);
                    }
                    // the last chunk goes out only once the whole blob hashed right
                    match hasher.take_if(|_| left == 0).map(|h| h.finish()) {
                        Some(actual) if actual != digest => {
                            warn!(%digest, %actual, "a peer streamed other content than the digest names");
                            Err(fail(format!("content hashes to {actual}")))
                        }
                        _ => Ok(data),
                    }
                }
                Ok(_) => Err(fail(format!("ended {left} bytes early"))),
                Err(s) => Err(fail(s.message().to_string())),
            };
            let last = item.is_err();
            if tx.send(item).await.is_err() || last {
                return;
            }
        }
    });
    rx
}

/// Reads `[offset, offset+len)` of a file in chunks on a blocking thread into a bounded channel.
pub fn read_chunks(file: Arc<std::fs::File>, offset: u64, len: u64) -> mpsc::Receiver<std::io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel(DEPTH);
    tokio::task::spawn_blocking(move || {
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let mut buf = vec![0u8; ((end - pos) as usize).min(CHUNK)];
            let r = match file.read_at(&mut buf, pos) {
                Ok(0) => Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "blob shorter than expected")),
                Ok(n) => {
                    buf.truncate(n);
                    pos += n as u64;
                    Ok(Bytes::from(buf))
                }
                Err(e) => Err(e),
            };
            let stop = r.is_err();
            if tx.blocking_send(r).is_err() || stop {
                return;
            }
        }
    });
    rx
}

/// Peer addresses to fetch a blob from: the members that hold it first, then every other
/// member (placements may lag behind), never `me`.
pub fn fetch_sources(members: &[(NodeId, NodeAddr, bool)], me: NodeId, holders: &[NodeId]) -> Vec<String> {
    let others = members.iter().filter(|(id, _, _)| *id != me);
    let (held, rest): (Vec<_>, Vec<_>) = others.partition(|(id, _, _)| holders.contains(id));
    held.into_iter().chain(rest).map(|(_, a, _)| a.peer.clone()).collect()
}

/// A byte rate shared by concurrent transfers: each chunk waits for its turn on a virtual
/// clock that advances by `len / rate` per chunk.
#[derive(Clone)]
pub struct Throttle {
    bytes_per_sec: f64,
    next: Arc<std::sync::Mutex<tokio::time::Instant>>,
}

impl Throttle {
    pub fn new(bytes_per_sec: u64) -> Self {
        Throttle {
            bytes_per_sec: bytes_per_sec.max(1) as f64,
            next: Arc::new(std::sync::Mutex::new(tokio::time::Instant::now())),
        }
    }

    /// Waits until `len` more bytes fit in the rate.
    pub async fn take(&self, len: usize) {
        let start = {
            let mut next = self.next.lock().unwrap();
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + std::time::Duration::from_secs_f64(len as f64 / self.bytes_per_sec);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

/// Blob transfers with peers for one node.
#[derive(Clone)]
pub struct BlobPeers {
    peers: Arc<Peers>,
    store: Arc<BlobStore>,
    /// Limits the rate of fetches (see [`BlobPeers::throttled`]).
    throttle: Option<Throttle>,
}

impl BlobPeers {
    pub fn new(peers: Arc<Peers>, store: Arc<BlobStore>) -> Self {
        BlobPeers { peers, store, throttle: None }
    }

    /// The failed calls to peers so far (every client of these peers, not only blobs').
    pub fn rpc_errors(&self) -> crate::peers::RpcErrors {
        self.peers.rpc_errors()
    }

    /// The same, with fetches limited to `bytes_per_sec` altogether (0: unlimited).
    pub fn throttled(mut self, bytes_per_sec: u64) -> Self {
        self.throttle = (bytes_per_sec > 0).then(|| Throttle::new(bytes_per_sec));
        self
    }

    /// The connections to peers.
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// Fetches `digest` into the local store from the first of `sources` (peer addresses) that
    /// delivers it completely and correctly. Returns its size.
    /// A local store that refuses the blob (short of space: [`PeerBlobError::is_local_space`])
    /// ends the attempt at once: no other source would fare better.
    pub async fn fetch(&self, repo: &RepoName, digest: &Digest, sources: &[String]) -> Result<u64, PeerBlobError> {
        for addr in sources {
            match self.fetch_from(repo, digest, addr).await {
                Ok(size) => return Ok(size),
                Err(e) if e.is_local_space() => return Err(e),
                Err(e) => warn!(%digest, peer = %addr, error = %e, "fetching blob from peer failed"),
            }
        }
        Err(PeerBlobError::NoSource(digest.clone()))
    }

    /// Streams `len` bytes of `digest` from `offset`, from the first of `sources` that starts
    /// sending it, without keeping a copy: how a node short of disk space still serves a blob
    /// it lacks. A whole blob (`offset` 0, `len` its size) is verified on the way: a body that
    /// does not hash to `digest` ends in an error instead of its last chunk, so the client
    /// never takes it for complete. Memory stays bounded (a channel of a few chunks).
    pub async fn stream(
        &self,
        digest: &Digest,
        sources: &[String],
        offset: u64,
        len: u64,
        size: u64,
    ) -> Result<mpsc::Receiver<std::io::Result<Bytes>>, PeerBlobError> {
        for addr in sources {
            let ch = match self.peers.channel(addr) {
                Ok(ch) => ch,
                Err(e) => {
                    warn!(%digest, peer = %addr, error = %e, "no channel to peer");
                    continue;
                }
            };
            let req = GetBlobRequest { digest: digest.to_string(), offset };
            match BlobsClient::new(ch).get(req).await {
                Ok(r) => return Ok(pass_through(r.into_inner(), digest.clone(), len, offset == 0 && len == size)),
                Err(s) => warn!(%digest, peer = %addr, error = %s.message(), "streaming blob from peer failed"),
            }
        }
        Err(PeerBlobError::NoSource(digest.clone()))
    }

    async fn fetch_from(&self, repo: &RepoName, digest: &Digest, addr: &str) -> Result<u64, PeerBlobError> {
        let perr = |msg: String| PeerBlobError::Peer { peer: addr.to_string(), msg };
        let ch = self.peers.channel(addr).map_err(|e| perr(e.to_string()))?;
        let stream = BlobsClient::new(ch)
            .get(GetBlobRequest { digest: digest.to_string(), offset: 0 })
            .await
            .map_err(|s| perr(s.message().to_string()))?
            .into_inner();
        let throttle = self.throttle.clone();
        let body = stream.then(move |r| {
            let throttle = throttle.clone();
            async move {
                let r = r.map(|c: BlobChunk| c.data).map_err(|s| s.message().to_string());
                if let (Ok(data), Some(t)) = (&r, &throttle) {
                    t.take(data.len()).await;
                }
                r
            }
        });
        let size = self.store.put_stream(repo.clone(), digest, None, Box::pin(body)).await?;
        debug!(%digest, peer = %addr, size, "blob fetched from peer");
        Ok(size)
    }

    /// Sends the local copy of `digest` to `targets` in parallel and returns the ids of the
    /// first `needed` that stored it durably (waiting for all of them if fewer succeed). The
    /// transfers that are still running go on in the background.
    pub async fn replicate(
        &self,
        repo: &RepoName,
        digest: &Digest,
        targets: Vec<(NodeId, String)>,
        needed: usize,
    ) -> Vec<NodeId> {
        let mut running = futures::stream::FuturesUnordered::new();
        for (id, addr) in targets {
            let this = self.clone();
            let (repo, digest) = (repo.clone(), digest.clone());
            running.push(tokio::spawn(
                async move {
                    let r = this.push_to(&repo, &digest, &addr).await;
                    if let Err(e) = &r {
                        warn!(%digest, peer = %addr, error = %e, "replicating blob to peer failed");
                    }
                    (id, r.is_ok())
                }
                .in_current_span(),
            ));
        }
        let mut done = Vec::new();
        while done.len() < needed {
            match running.next().await {
                Some(Ok((id, true))) => done.push(id),
                Some(_) => {}
                None => break,
            }
        }
        done
    }

    async fn push_to(&self, repo: &RepoName, digest: &Digest, addr: &str) -> Result<(), PeerBlobError> {
        let perr = |msg: String| PeerBlobError::Peer { peer: addr.to_string(), msg };
        let (file, size) = self.store.open_blob(digest)?;
        let mut chunks = read_chunks(Arc::new(file), 0, size);
        let (tx, rx) = mpsc::channel::<PutBlobPart>(DEPTH);
        let header = PutBlobPart {
            part: Some(put_blob_part::Part::Header(PutBlobHeader {
                digest: digest.to_string(),
                size,
                repo: repo.to_string(),
            })),
        };
        tokio::spawn(async move {
            if tx.send(header).await.is_err() {
                return;
            }
            while let Some(Ok(data)) = chunks.recv().await {
                let part = PutBlobPart { part: Some(put_blob_part::Part::Data(data)) };
                if tx.send(part).await.is_err() {
                    return;
                }
            }
        });
        let ch = self.peers.channel(addr).map_err(|e| perr(e.to_string()))?;
        let reply =
            BlobsClient::new(ch).put(ReceiverStream::new(rx)).await.map_err(|s| perr(s.message().to_string()))?;
        let got = reply.into_inner().size;
        if got != size {
            return Err(perr(format!("stored {got} bytes of {size}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn throttle_holds_concurrent_transfers_to_the_rate() {
        let t = Throttle::new(4 << 20);
        let started = tokio::time::Instant::now();
        // 2 MiB in 64 KiB chunks from two tasks at 4 MiB/s: about 0.5 s
        let tasks: Vec<_> = (0..2)
            .map(|_| {
                let t = t.clone();
                tokio::spawn(async move {
                    for _ in 0..16 {
                        t.take(64 << 10).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let took = started.elapsed();
        assert!(took >= std::time::Duration::from_millis(450), "{took:?}");
        assert!(took < std::time::Duration::from_millis(1500), "{took:?}");
    }
}
