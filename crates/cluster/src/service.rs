//! The peer port's services: Raft, Meta (forwarded proposals, read index), Blobs and Admin.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use raftyard_blobstore::BlobStore;
use raftyard_raft::MetaNode;
use raftyard_types::{Digest, RepoName};
use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::info;

use crate::codec;
use crate::pb::{self, put_blob_part};
use crate::peers::MAX_MESSAGE;

/// What the peer services act on.
#[derive(Clone)]
pub struct PeerServices {
    pub meta: MetaNode,
    pub blobs: Arc<BlobStore>,
    /// The local registry, for requests forwarded to this node's upload sessions.
    pub local: crate::forward::LocalHttpSlot,
    /// This node's lag figures, if it is a backup.
    pub lag: crate::lag::Lag,
    /// Connections to the other members (the version check of a node being added).
    pub peers: Arc<crate::peers::Peers>,
    /// What `Meta.Version` answers: this release's peer protocol and data format; `None`
    /// answers as a release before the call did (UNIMPLEMENTED), for the tests.
    pub version: Option<(u32, u32)>,
    /// This node's collection counters.
    pub gc: crate::gc::GcStats,
    /// The blobs this node lacks (what `status` reports).
    pub missing: crate::Missing,
}

/// Serves the peer protocol on `listener` until `shutdown` completes.
pub async fn serve(
    services: PeerServices,
    listener: TcpListener,
    tls: Option<crate::tls::PeerTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    info!(addr = ?listener.local_addr().ok(), tls = tls.is_some(), "peer port listening");
    let s = services;
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &tls {
        builder = builder.tls_config(t.server())?;
    }
    builder
        .tcp_nodelay(true)
        .trace_fn(raftyard_telemetry::peer_span)
        .initial_stream_window_size(crate::peers::STREAM_WINDOW)
        .initial_connection_window_size(crate::peers::CONNECTION_WINDOW)
        .add_service(
            pb::raft_server::RaftServer::new(s.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            pb::meta_server::MetaServer::new(s.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(pb::blobs_server::BlobsServer::new(s.clone()))
        .add_service(pb::uploads_server::UploadsServer::new(s.clone()))
        .add_service(pb::admin_server::AdminServer::new(s))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}

fn raft_reply<T: serde::Serialize>(r: &T) -> Result<Response<pb::RaftMessage>, Status> {
    Ok(Response::new(pb::RaftMessage { data: codec::encode(r)?.into() }))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for PeerServices {
    async fn append_entries(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        let rpc = codec::decode(&req.into_inner().data)?;
        raft_reply(&self.meta.raft().append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        let rpc = codec::decode(&req.into_inner().data)?;
        raft_reply(&self.meta.raft().vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        let rpc = codec::decode(&req.into_inner().data)?;
        raft_reply(&self.meta.raft().install_snapshot(rpc).await)
    }
}

#[tonic::async_trait]
impl pb::meta_server::Meta for PeerServices {
    async fn propose(&self, req: Request<pb::ProposeRequest>) -> Result<Response<pb::ProposeReply>, Status> {
        let req = req.into_inner();
        let cmd = codec::decode(&req.command)?;
        let (index, outcome) = self.meta.propose_local(cmd).await.map_err(codec::propose_error_to_status)?;
        let _ = req.from;
        let rejection = match outcome {
            Ok(()) => Bytes::new(),
            Err(r) => codec::encode(&r)?.into(),
        };
        Ok(Response::new(pb::ProposeReply { index, rejection }))
    }

    async fn heartbeat(&self, _: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatReply>, Status> {
        self.meta.heartbeat_now().await;
        Ok(Response::new(pb::HeartbeatReply {}))
    }

    async fn version(&self, _: Request<pb::VersionRequest>) -> Result<Response<pb::VersionReply>, Status> {
        let (protocol, data_format) = self.version.ok_or_else(|| Status::unimplemented("Meta.Version"))?;
        Ok(Response::new(pb::VersionReply { protocol, data_format }))
    }

    async fn read_index(&self, req: Request<pb::ReadIndexRequest>) -> Result<Response<pb::ReadIndexReply>, Status> {
        let index = match req.into_inner().probe {
            true => self.meta.probe_local(),
            false => self.meta.read_index_local().await,
        };
        let index = index.map_err(codec::propose_error_to_status)?;
        Ok(Response::new(pb::ReadIndexReply { index }))
    }

    async fn campaign(&self, req: Request<pb::CampaignRequest>) -> Result<Response<pb::CampaignReply>, Status> {
        let req = req.into_inner();
        self.meta.campaign(req.from, req.last_index).await.map_err(Status::failed_precondition)?;
        Ok(Response::new(pb::CampaignReply {}))
    }
}

fn digest(s: &str) -> Result<Digest, Status> {
    Digest::parse(s).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl pb::blobs_server::Blobs for PeerServices {
    type GetStream = ReceiverStream<Result<pb::BlobChunk, Status>>;

    async fn get(&self, req: Request<pb::GetBlobRequest>) -> Result<Response<Self::GetStream>, Status> {
        let req = req.into_inner();
        let d = digest(&req.digest)?;
        let (file, size) = self.blobs.open_blob(&d).map_err(|e| Status::not_found(e.to_string()))?;
        let offset = req.offset.min(size);
        let mut chunks = crate::blobs::read_chunks(Arc::new(file), offset, size - offset);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(c) = chunks.recv().await {
                let item = c.map(|data| pb::BlobChunk { data }).map_err(|e| Status::internal(e.to_string()));
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn has(&self, req: Request<pb::HasBlobRequest>) -> Result<Response<pb::HasBlobReply>, Status> {
        let d = digest(&req.into_inner().digest)?;
        let size = self.blobs.stat(&d);
        Ok(Response::new(pb::HasBlobReply { present: size.is_some(), size: size.unwrap_or(0) }))
    }

    async fn replicate(&self, req: Request<Streaming<pb::ReplicaPart>>) -> Result<Response<pb::PutBlobReply>, Status> {
        let (size, digest) = self.receive_replica(req.into_inner()).await?;
        // counted in the upload's write quorum: no sweep takes it before its link applies here
        self.blobs.hold(&digest);
        Ok(Response::new(pb::PutBlobReply { size }))
    }

    async fn put(&self, req: Request<Streaming<pb::PutBlobPart>>) -> Result<Response<pb::PutBlobReply>, Status> {
        let mut stream = req.into_inner();
        let header = match stream.next().await {
            Some(Ok(pb::PutBlobPart { part: Some(put_blob_part::Part::Header(h)) })) => h,
            _ => return Err(Status::invalid_argument("a blob push starts with its header")),
        };
        let d = digest(&header.digest)?;
        let repo = RepoName::parse(&header.repo).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (store, dd) = (self.blobs.clone(), d.clone());
        let present = tokio::task::spawn_blocking(move || store.durable_stat(&dd))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        if present == Some(header.size) {
            // Content addressing: the same digest is the same bytes. Counted in a write
            // quorum: held from sweeps until its link applies here.
            self.blobs.hold(&d);
            return Ok(Response::new(pb::PutBlobReply { size: header.size }));
        }
        let body = stream.map(|p| match p {
            Ok(pb::PutBlobPart { part: Some(put_blob_part::Part::Data(b)) }) => Ok(b),
            Ok(_) => Err("unexpected part in a blob push".to_string()),
            Err(s) => Err(s.message().to_string()),
        });
        let size = self
            .blobs
            .put_stream(repo, &d, Some(header.size), Box::pin(body))
            .await
            .map_err(|e| Status::aborted(e.to_string()))?;
        self.blobs.hold(&d);
        Ok(Response::new(pb::PutBlobReply { size }))
    }
}

#[tonic::async_trait]
impl pb::uploads_server::Uploads for PeerServices {
    type ForwardStream = ReceiverStream<Result<pb::HttpPart, Status>>;

    async fn forward(&self, req: Request<Streaming<pb::HttpPart>>) -> Result<Response<Self::ForwardStream>, Status> {
        crate::forward::serve_forwarded(&self.local, req.into_inner()).await.map(Response::new)
    }
}

impl PeerServices {
    /// Receives a replica of an upload in progress: bytes are hashed and written as they
    /// arrive; the copy becomes visible only once `finish_digest` matches.
    async fn receive_replica(&self, mut stream: Streaming<pb::ReplicaPart>) -> Result<(u64, Digest), Status> {
        use pb::replica_part::Part;
        let start = match stream.next().await {
            Some(Ok(pb::ReplicaPart { part: Some(Part::Start(s)) })) => s,
            _ => return Err(Status::invalid_argument("a replica starts with its start part")),
        };
        let repo = RepoName::parse(&start.repo).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let alg = start
            .algorithm
            .parse()
            .map_err(|e: raftyard_types::DigestError| Status::invalid_argument(e.to_string()))?;
        let id = self.blobs.start_upload(repo, alg, None).map_err(|e| Status::internal(e.to_string()))?;
        // Data parts feed one append; the finish part (or the end of the stream) ends it.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(4);
        let reader = tokio::spawn(async move {
            let mut finish = None;
            while let Some(p) = stream.next().await {
                match p {
                    Ok(pb::ReplicaPart { part: Some(Part::Data(d)) }) => {
                        if tx.send(Ok(d)).await.is_err() {
                            break;
                        }
                    }
                    Ok(pb::ReplicaPart { part: Some(Part::FinishDigest(d)) }) => {
                        finish = Some(d);
                        break;
                    }
                    Ok(_) => {
                        let _ = tx.send(Err("unexpected part in a replica".into())).await;
                        break;
                    }
                    Err(s) => {
                        let _ = tx.send(Err(s.message().to_string())).await;
                        break;
                    }
                }
            }
            finish
        });
        let appended = self.blobs.append(&id, None, None, ReceiverStream::new(rx)).await;
        let finish = reader.await.map_err(|e| Status::internal(e.to_string()))?;
        let result = match (appended, finish) {
            (Ok(_), Some(d)) => {
                let d = digest(&d)?;
                let size = self.blobs.finish(&id, &d).await.map(|(_, size)| size);
                size.map(|s| (s, d)).map_err(|e| Status::aborted(e.to_string()))
            }
            (Err(e), _) => Err(Status::aborted(e.to_string())),
            (Ok(_), None) => Err(Status::aborted("replica ended before its digest")),
        };
        if result.is_err() {
            self.blobs.cancel(&id);
        }
        result
    }
}
