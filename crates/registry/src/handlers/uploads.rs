//! Blob uploads: sessions (`POST`), chunks (`PATCH`), completion (`PUT`), status (`GET`),
//! cancel (`DELETE`), monolithic `POST ?digest=` and cross-repository mounts.

use futures::TryStreamExt;
use http::{header, Request, StatusCode};
use http_body_util::BodyDataStream;
use raftyard_blobstore::BlobError;
use raftyard_types::{Algorithm, Digest, RepoName};

use super::blobs::parse_digest;
use super::{content_length, empty_response, header_str, query, HandlerResult, ReqBody};
use crate::error::RegistryError;
use crate::placement::tee;
use crate::Registry;

fn upload_location(name: &RepoName, id: &str) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

fn blob_location(name: &RepoName, digest: &Digest) -> String {
    format!("/v2/{name}/blobs/{digest}")
}

fn accepted(name: &RepoName, id: &str, size: u64, status: StatusCode) -> HandlerResult {
    empty_response(
        status,
        &[
            ("Location", upload_location(name, id)),
            ("Range", super::range_header(size).to_str().unwrap_or("0-0").to_string()),
            ("Docker-Upload-UUID", id.to_string()),
        ],
    )
}

fn created(name: &RepoName, digest: &Digest) -> HandlerResult {
    empty_response(
        StatusCode::CREATED,
        &[("Location", blob_location(name, digest)), ("Docker-Content-Digest", digest.to_string())],
    )
}

fn body_stream<B: ReqBody>(
    req: Request<B>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, B::Error>> + Send + Unpin {
    BodyDataStream::new(req.into_body()).into_stream()
}

/// `Content-Range: <start>-<end>` (also accepts `bytes <start>-<end>/<total>`).
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let v = v.trim();
    let v = v.strip_prefix("bytes ").unwrap_or(v);
    let v = v.split('/').next()?;
    let (a, b) = v.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (b >= a).then_some((a, b))
}

/// Checks a chunk's `Content-Range` against the session; returns the expected start and length.
fn chunk_bounds<B: ReqBody>(
    req: &Request<B>,
    name: &RepoName,
    id: &str,
    current: u64,
) -> Result<(Option<u64>, Option<u64>), RegistryError> {
    let len = content_length(req.headers())?;
    let Some(cr) = header_str(req.headers(), header::CONTENT_RANGE) else {
        return Ok((None, len));
    };
    let range_err = || RegistryError::UploadRange { location: upload_location(name, id), size: current };
    let (a, b) = parse_content_range(cr).ok_or_else(range_err)?;
    if a != current {
        return Err(range_err());
    }
    let chunk_len = b - a + 1;
    if len.is_some_and(|l| l != chunk_len) {
        return Err(range_err());
    }
    Ok((Some(a), Some(chunk_len)))
}

/// The node that owns an upload session: ids are `n<node>-<random>`.
pub(crate) fn owner(id: &str) -> Option<u64> {
    id.strip_prefix('n')?.split_once('-')?.0.parse().ok()
}

/// Streams a request for another node's upload session to that node and relays its answer.
/// If the owner is gone the session is gone with it: `BLOB_UPLOAD_UNKNOWN`, and the client
/// starts over.
pub(crate) async fn forward_to_owner<B: ReqBody>(reg: &Registry, id: &str, req: Request<B>) -> HandlerResult {
    let owner = owner(id).ok_or(RegistryError::BlobUploadUnknown)?;
    let peer = reg
        .meta
        .members()
        .into_iter()
        .find(|(n, _, _)| *n == owner)
        .map(|(_, a, _)| a.peer)
        .ok_or(RegistryError::BlobUploadUnknown)?;
    raftyard_cluster::forward(reg.peers.peers(), &peer, req).await.map_err(|s| {
        tracing::debug!(upload = %id, owner, error = %s, "forwarding to the session owner failed");
        RegistryError::BlobUploadUnknown
    })
}

fn session_of(reg: &Registry, name: &RepoName, id: &str) -> Result<u64, RegistryError> {
    let st = reg.blobs.upload_status(id)?;
    if &st.repo != name {
        return Err(RegistryError::BlobUploadUnknown);
    }
    Ok(st.size)
}

fn fix_range(e: BlobError, name: &RepoName, id: &str) -> RegistryError {
    match e {
        BlobError::RangeInvalid { size } => RegistryError::UploadRange { location: upload_location(name, id), size },
        e => e.into(),
    }
}

/// How many of the repositories linking a blob a mount without `from` looks at for one the
/// caller may pull (bounds the work of a request; a blob in more repositories than this, none
/// of them the caller's among the first, is uploaded again).
const MOUNT_SOURCES_CHECKED: usize = 256;

pub(crate) async fn start<B: ReqBody>(
    reg: &Registry,
    name: RepoName,
    q: &[(String, String)],
    req: Request<B>,
) -> HandlerResult {
    let client = req.extensions().get::<crate::ClientAddr>().map(|c| c.0.to_string());
    if let Some(mount) = query(q, "mount") {
        // a caller may mount only from a repository it may pull (without `from`: one of the
        // repositories linking the blob); otherwise it uploads as if the blob were not there,
        // and learns nothing
        let caller = crate::access::caller_of(&req);
        let from = query(q, "from");
        let parsed = Digest::parse(mount);
        let may = match (from, &parsed) {
            (Some(f), _) => crate::access::may_pull_any(reg, &caller, std::iter::once(f)),
            (None, _) if caller.open => true,
            (None, Ok(d)) => {
                reg.meta.read_barrier().await?;
                let repos = reg.meta.reader().linked_in(d, MOUNT_SOURCES_CHECKED)?;
                crate::access::may_pull_any(reg, &caller, repos.iter().map(String::as_str))
            }
            (None, Err(_)) => false,
        };
        if let (true, Ok(digest)) = (may, parsed) {
            if let Some(r) = try_mount(reg, &name, &digest, from).await? {
                return Ok(r);
            }
        }
        // Not mountable: the spec says to open an ordinary session instead.
        room_for(reg, &name, 0)?;
        let id = reg.blobs.start_upload(name.clone(), Algorithm::Sha256, client.as_deref())?;
        return accepted(&name, &id, 0, StatusCode::ACCEPTED);
    }
    if let Some(d) = query(q, "digest") {
        let digest = parse_digest(d)?;
        let len = content_length(req.headers())?;
        room_for(reg, &name, len.unwrap_or(0))?;
        let replicas = reg.new_replicas(&name, digest.algorithm());
        let _pin = reg.blobs.pin(&digest);
        let stored = reg.blobs.put_stream(name.clone(), &digest, len, tee(body_stream(req), replicas.clone())).await;
        let size = match stored {
            Ok(size) => size,
            Err(e) => {
                if let Some(r) = replicas {
                    r.lock().await.take().abort();
                }
                return Err(e.into());
            }
        };
        let acked = reg.finish_replicas(replicas, &digest).await;
        reg.commit_new_blob(&name, &digest, size, acked).await?;
        return created(&name, &digest);
    }
    let algorithm = match query(q, "digest-algorithm") {
        None | Some("") => Algorithm::Sha256,
        Some(a) => a.parse::<Algorithm>().map_err(RegistryError::from)?,
    };
    room_for(reg, &name, 0)?;
    let id = reg.blobs.start_upload(name.clone(), algorithm, client.as_deref())?;
    accepted(&name, &id, 0, StatusCode::ACCEPTED)
}

/// Refuses an upload into `name` at once when a quota covering it is already full, rather
/// than after the client sent the bytes. (This node's view, without a read barrier: the
/// state machine decides when the blob is linked.)
fn room_for(reg: &Registry, name: &RepoName, adds: u64) -> Result<(), RegistryError> {
    match reg.meta.reader().quota_full(name.as_str())? {
        Some(q) => Err(RegistryError::QuotaExceeded {
            repos: q.quota.repos.as_str().to_string(),
            limit: q.quota.bytes,
            used: q.used.bytes,
            adds,
        }),
        None => Ok(()),
    }
}

/// Links an existing blob into `name` if it is mountable: held by this node and linked in
/// `from` (or, without `from`, known anywhere in the registry).
async fn try_mount(
    reg: &Registry,
    name: &RepoName,
    digest: &Digest,
    from: Option<&str>,
) -> Result<Option<http::Response<crate::body::Body>>, RegistryError> {
    let size = match from.map(RepoName::parse) {
        Some(Ok(from)) => super::blobs::linked_size(reg, &from, digest).await?,
        Some(Err(_)) => None,
        None => {
            reg.meta.read_barrier().await?;
            reg.meta.reader().blob_info(digest)?.map(|i| i.size)
        }
    };
    let Some(size) = size else { return Ok(None) };
    if reg.blobs.stat(digest) != Some(size) {
        return Ok(None);
    }
    if !reg.link_existing(name, digest, size).await? {
        return Ok(None);
    }
    created(name, digest).map(Some)
}

/// Appends a request body to a session, passing the bytes on to the session's replicas as
/// they arrive. A local storage failure leaves the replicas out of step: they are dropped
/// (the write quorum is then reached by copying the finished blob).
async fn append<B: ReqBody>(
    reg: &Registry,
    name: &RepoName,
    id: &str,
    start: Option<u64>,
    len: Option<u64>,
    req: Request<B>,
) -> Result<u64, RegistryError> {
    let replicas = reg.session_replicas(id, name)?;
    let r = reg.blobs.append(id, start, len, tee(body_stream(req), replicas)).await;
    if let Err(BlobError::Io(_) | BlobError::StorageFull(_)) = &r {
        reg.abort_replicas(id).await;
    }
    r.map_err(|e| fix_range(e, name, id))
}

pub(crate) async fn patch<B: ReqBody>(reg: &Registry, name: &RepoName, id: &str, req: Request<B>) -> HandlerResult {
    let current = session_of(reg, name, id)?;
    let (start, len) = chunk_bounds(&req, name, id, current)?;
    let size = append(reg, name, id, start, len, req).await?;
    accepted(name, id, size, StatusCode::ACCEPTED)
}

pub(crate) async fn put<B: ReqBody>(
    reg: &Registry,
    name: &RepoName,
    id: &str,
    q: &[(String, String)],
    req: Request<B>,
) -> HandlerResult {
    let current = session_of(reg, name, id)?;
    let digest = parse_digest(
        query(q, "digest").ok_or_else(|| RegistryError::DigestInvalid("the digest parameter is required".into()))?,
    )?;
    let (start, len) = chunk_bounds(&req, name, id, current)?;
    let has_body = len != Some(0) && !http_body::Body::is_end_stream(req.body());
    if has_body {
        append(reg, name, id, start, len, req).await?;
    }
    // no sweep takes the file while its write quorum and link are on the way
    let _pin = reg.blobs.pin(&digest);
    let size = match reg.blobs.finish(id, &digest).await {
        Ok((_, size)) => size,
        Err(e) => {
            reg.abort_replicas(id).await;
            return Err(e.into());
        }
    };
    let replicas = reg.replicas.lock().unwrap().remove(id);
    let acked = reg.finish_replicas(replicas, &digest).await;
    reg.commit_new_blob(name, &digest, size, acked).await?;
    created(name, &digest)
}

pub(crate) fn status(reg: &Registry, name: &RepoName, id: &str) -> HandlerResult {
    let size = session_of(reg, name, id)?;
    accepted(name, id, size, StatusCode::NO_CONTENT)
}

pub(crate) async fn cancel(reg: &Registry, name: &RepoName, id: &str) -> HandlerResult {
    session_of(reg, name, id)?;
    reg.blobs.cancel(id);
    reg.abort_replicas(id).await;
    empty_response(StatusCode::NO_CONTENT, &[])
}

#[cfg(test)]
mod tests {
    use super::parse_content_range;

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range("0-99"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes 100-199/1000"), Some((100, 199)));
        assert_eq!(parse_content_range("bytes 100-199/*"), Some((100, 199)));
        assert_eq!(parse_content_range("5-4"), None);
        assert_eq!(parse_content_range("a-b"), None);
    }
}
