//! Where blob copies live: streaming an upload to peers while it arrives, making a new blob
//! durable on a write quorum before its upload is acknowledged, and fetching a blob this node
//! lacks from a node that holds it.

use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use raftyard_cluster::ReplicaSet;
use raftyard_raft::NodeId;
use raftyard_types::{Algorithm, Digest, Event, RepoName};
use tracing::{debug, info, warn};

use crate::error::RegistryError;
use crate::Registry;

/// The replicas of one upload, shared by the requests of its session.
pub(crate) type Replicas = Arc<tokio::sync::Mutex<ReplicaSet>>;

impl Registry {
    /// Copies (this node's included) a new blob needs before its upload is acknowledged.
    fn write_quorum(&self, voters: usize) -> usize {
        match self.cfg.blob_write_quorum {
            0 => voters / 2 + 1,
            n => n,
        }
    }

    /// Copies on other voters that a new blob needs before its upload is acknowledged: the
    /// write quorum counts voters' copies only, this node's only if it votes (a learner that
    /// takes a push does not make up for a voter's copy).
    fn replicas_needed(&self) -> usize {
        let voters = self.meta.members().iter().filter(|(_, _, v)| *v).count().max(1);
        self.write_quorum(voters).saturating_sub(usize::from(self.meta.is_voter()))
    }

    /// The other voters: where new blobs go. Learners (backups) fetch theirs afterwards, so a
    /// remote backup never slows a push down.
    fn targets(&self) -> Vec<(NodeId, String)> {
        let me = self.meta.id();
        self.meta
            .members()
            .into_iter()
            .filter(|(id, _, voter)| *id != me && *voter)
            .map(|(id, a, _)| (id, a.peer))
            .collect()
    }

    /// Starts streaming a new upload to the peers (none on a node without peers).
    pub(crate) fn new_replicas(&self, repo: &RepoName, algorithm: Algorithm) -> Option<Replicas> {
        let targets = self.targets();
        if targets.is_empty() {
            return None;
        }
        Some(Arc::new(tokio::sync::Mutex::new(ReplicaSet::open(self.peers.peers(), targets, repo, algorithm))))
    }

    /// The replicas of a session, opened with its first data (a session that never gets any
    /// costs its peers nothing).
    pub(crate) fn session_replicas(&self, id: &str, repo: &RepoName) -> Result<Option<Replicas>, RegistryError> {
        if let Some(r) = self.replicas.lock().unwrap().get(id).cloned() {
            return Ok(Some(r));
        }
        let st = self.blobs.upload_status(id)?;
        if st.size > 0 {
            // data came before without replicas (they were dropped after a local failure):
            // the write quorum is reached by copying the finished blob
            return Ok(None);
        }
        let Some(r) = self.new_replicas(repo, st.algorithm) else { return Ok(None) };
        Ok(Some(self.replicas.lock().unwrap().entry(id.to_string()).or_insert(r).clone()))
    }

    /// Forgets a session's replicas; the peers discard what they received.
    pub(crate) async fn abort_replicas(&self, id: &str) {
        let r = self.replicas.lock().unwrap().remove(id);
        if let Some(r) = r {
            r.lock().await.take().abort();
        }
    }

    /// Drops the replicas of sessions that no longer exist (expired).
    pub(crate) async fn prune_replicas(&self) {
        let gone: Vec<String> = {
            let map = self.replicas.lock().unwrap();
            map.keys()
                .filter(|id| matches!(self.blobs.upload_status(id), Err(raftyard_blobstore::BlobError::UploadUnknown)))
                .cloned()
                .collect()
        };
        for id in gone {
            self.abort_replicas(&id).await;
        }
    }

    /// Ends the replication of an upload whose blob is now committed here; returns the peers
    /// that hold a verified copy.
    pub(crate) async fn finish_replicas(&self, replicas: Option<Replicas>, digest: &Digest) -> Vec<NodeId> {
        match replicas {
            Some(r) => {
                let started = std::time::Instant::now();
                let set = r.lock().await.take();
                let acked = set.finish(digest, self.replicas_needed()).await;
                self.metrics.quorum_wait(started.elapsed());
                acked
            }
            None => Vec::new(),
        }
    }

    /// Makes a blob that was just stored here durable on a write quorum of nodes — `acked`
    /// already hold it from replication while receiving; others get a copy now if the quorum
    /// needs them — then commits its link in `repo` and its placements.
    pub(crate) async fn commit_new_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        acked: Vec<NodeId>,
    ) -> Result<(), RegistryError> {
        let me = self.meta.id();
        let voters = self.meta.members().iter().filter(|(_, _, v)| *v).count();
        if self.cfg.blob_write_quorum > voters {
            return Err(RegistryError::Unavailable(format!(
                "cluster.blob_write_quorum = {} exceeds the {voters} voters: no upload can be acknowledged",
                self.cfg.blob_write_quorum
            )));
        }
        let needed = self.replicas_needed();
        // other voters holding a verified copy (replication goes to voters only)
        let mut others = acked;
        if others.len() < needed {
            let rest: Vec<_> = self.targets().into_iter().filter(|(id, _)| !others.contains(id)).collect();
            debug!(%digest, have = others.len(), needed, "pushing the blob to other voters to reach the write quorum");
            let started = std::time::Instant::now();
            others.extend(self.peers.replicate(repo, digest, rest, needed - others.len()).await);
            self.metrics.quorum_wait(started.elapsed());
            if others.len() < needed {
                return Err(RegistryError::Unavailable(format!(
                    "blob {digest} reached {} of the {needed} other voters the write quorum needs",
                    others.len()
                )));
            }
        }
        let mut events = vec![Event::BlobLinked { repo: repo.clone(), digest: digest.clone(), size }];
        let holders = std::iter::once(me).chain(others);
        events.extend(holders.map(|node| Event::BlobPlaced { digest: digest.clone(), size, node }));
        self.meta.propose(events).await?;
        Ok(())
    }

    /// Links a blob the registry already holds into another repository (a mount). `false`:
    /// no repository links the blob any more (its files may be collected), so it is not
    /// mountable. Until the log records that every member speaks protocol 3, it links the
    /// blob as older releases did (no collection runs before then).
    pub(crate) async fn link_existing(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<bool, RegistryError> {
        let (repo, digest) = (repo.clone(), digest.clone());
        let recorded = self.meta.reader().protocol()?.0;
        let ev = match recorded >= raftyard_raft::node::PROTOCOL_COLLECTIONS {
            true => Event::BlobMounted { repo, digest, size },
            false => Event::BlobLinked { repo, digest, size },
        };
        match self.meta.propose(vec![ev]).await {
            Ok(()) => Ok(true),
            Err(raftyard_raft::ProposeError::Rejected(raftyard_types::Rejection::BlobUnknown(_))) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Where the bytes of a blob this node serves come from: its own copy, fetched first from
    /// a holder if it lacks one (and the placement recorded); or, when this node is short of
    /// disk space, straight from a peer without a copy kept — a full disk refuses writes, never
    /// reads. `range` is the part to serve (start, length) of the blob's `size` bytes; `None`
    /// for a `HEAD`, which needs no bytes (and opens no stream to a peer).
    pub(crate) async fn locate(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        range: Option<(u64, u64)>,
    ) -> Result<BlobSource, RegistryError> {
        if self.blobs.stat(digest).is_some() {
            return Ok(BlobSource::Local);
        }
        let me = self.meta.id();
        let holders: Vec<u64> = self.meta.reader().blob_info(digest)?.map(|i| i.holders).unwrap_or_default();
        let sources = raftyard_cluster::blobs::fetch_sources(&self.meta.members(), me, &holders);
        if self.blobs.check_space().is_ok() {
            match self.peers.fetch(repo, digest, &sources).await {
                Ok(size) => {
                    info!(%digest, size, "blob fetched from a peer");
                    // the copy is here and verified: serve it even if the placement cannot be
                    // recorded now (placements are a hint; every member is a fetch source)
                    if let Err(e) =
                        self.meta.propose(vec![Event::BlobPlaced { digest: digest.clone(), size, node: me }]).await
                    {
                        warn!(%digest, error = %e, "blob fetched, its placement not recorded");
                    }
                    return Ok(BlobSource::Local);
                }
                Err(e) if e.is_local_space() => {}
                Err(e) => return Err(RegistryError::Unavailable(e.to_string())),
            }
        }
        let Some((start, len)) = range else { return Ok(BlobSource::Peer(crate::body::empty())) };
        debug!(%digest, "short of disk space: serving the blob from a peer without keeping it");
        let rx = self
            .peers
            .stream(digest, &sources, start, len, size)
            .await
            .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        Ok(BlobSource::Peer(crate::body::channel(rx)))
    }
}

/// Where the bytes of one blob read come from.
pub(crate) enum BlobSource {
    /// This node's own file.
    Local,
    /// A peer's, streamed through.
    Peer(crate::body::Body),
}

/// Passes every chunk of `body` to `replicas` before the local store gets it.
pub(crate) fn tee<S, E>(body: S, replicas: Option<Replicas>) -> impl Stream<Item = Result<Bytes, E>> + Send + Unpin
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: Send + 'static,
{
    Box::pin(body.then(move |item| {
        let replicas = replicas.clone();
        async move {
            if let (Ok(b), Some(r)) = (&item, &replicas) {
                r.lock().await.send(b).await;
            }
            item
        }
    }))
}
