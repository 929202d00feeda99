//! Manifests: `GET`/`HEAD` by tag or digest with `Accept` negotiation, `PUT` (with `?tag=`),
//! `DELETE` by tag or digest.

use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use raftyard_raft::ManifestRecord;
use raftyard_types::manifest::{bare_media_type, parse_manifest, MAX_MANIFEST_BYTES};
use raftyard_types::{Algorithm, Digest, Event, Reference, RepoName, Tag};

use super::{content_length, empty_response, header_str, HandlerResult, ReqBody};
use crate::body::{empty, full};
use crate::error::RegistryError;
use crate::Registry;

/// Parses a manifest reference. A malformed digest is a 400; an invalid tag can name no
/// manifest, so reads answer 404 and writes 400.
fn reference(s: &str, for_write: bool) -> Result<Reference, RegistryError> {
    if Digest::looks_like(s) {
        return Ok(Reference::Digest(Digest::parse(s)?));
    }
    Tag::parse(s).map(Reference::Tag).map_err(|_| {
        if for_write {
            RegistryError::ManifestInvalid(format!("invalid tag {s:?}"))
        } else {
            RegistryError::ManifestUnknown
        }
    })
}

/// Resolves a reference to a stored manifest. Tags are read linearizably. A manifest under a
/// digest never changes, but with deletes enabled it can disappear: then digests are read
/// linearizably too; without deletes a local hit is served as is and only a miss waits for a
/// read barrier.
pub(crate) async fn resolve(
    reg: &Registry,
    name: &RepoName,
    r: &Reference,
) -> Result<(Digest, ManifestRecord), RegistryError> {
    let reader = reg.meta.reader();
    match r {
        Reference::Tag(t) => {
            reg.meta.read_barrier().await?;
            let d = reader.tag(name, t)?.ok_or(RegistryError::ManifestUnknown)?;
            let rec = reader.manifest(name, &d)?.ok_or(RegistryError::ManifestUnknown)?;
            Ok((d, rec))
        }
        Reference::Digest(d) => {
            if reg.local_digest_reads() {
                if let Some(rec) = reader.manifest(name, d)? {
                    return Ok((d.clone(), rec));
                }
            }
            reg.meta.read_barrier().await?;
            let rec = reader.manifest(name, d)?.ok_or(RegistryError::ManifestUnknown)?;
            Ok((d.clone(), rec))
        }
    }
}

/// Whether the `Accept` headers admit `media_type`. No `Accept` admits everything.
fn acceptable(headers: &HeaderMap, media_type: &str) -> bool {
    let mut any = false;
    for v in headers.get_all(header::ACCEPT) {
        let Ok(v) = v.to_str() else { continue };
        for t in v.split(',') {
            let t = bare_media_type(t);
            if t.is_empty() {
                continue;
            }
            any = true;
            if t == media_type || t == "*/*" || t == "application/*" {
                return true;
            }
        }
    }
    !any
}

pub(crate) async fn get(reg: &Registry, name: &RepoName, r: &str, headers: &HeaderMap, head: bool) -> HandlerResult {
    let r = reference(r, false)?;
    let (digest, rec) = resolve(reg, name, &r).await?;
    if !acceptable(headers, &rec.media_type) {
        return Err(RegistryError::ManifestUnknown);
    }
    let etag = format!("\"{digest}\"");
    if header_str(headers, header::IF_NONE_MATCH).is_some_and(|v| v.split(',').any(|t| t.trim() == etag)) {
        return empty_response(
            StatusCode::NOT_MODIFIED,
            &[("Docker-Content-Digest", digest.to_string()), ("ETag", etag)],
        );
    }
    let len = rec.bytes.len();
    let mut resp = Response::new(if head { empty() } else { full(rec.bytes) });
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&rec.media_type).map_err(|e| RegistryError::Internal(e.to_string()))?,
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert("Docker-Content-Digest", HeaderValue::from_str(&digest.to_string()).expect("valid header"));
    h.insert(header::ETAG, HeaderValue::from_str(&etag).expect("valid header"));
    Ok(resp)
}

pub(crate) async fn put<B: ReqBody>(
    reg: &Registry,
    name: RepoName,
    r: &str,
    q: &[(String, String)],
    req: Request<B>,
) -> HandlerResult {
    let r = reference(r, true)?;
    let mut tags: Vec<Tag> = Vec::new();
    for (k, v) in q {
        if k == "tag" {
            tags.push(Tag::parse(v).map_err(|_| RegistryError::ManifestInvalid(format!("invalid tag {v:?}")))?);
        }
    }
    if tags.len() > 100 {
        return Err(RegistryError::TooLarge);
    }
    let content_type = header_str(req.headers(), header::CONTENT_TYPE).unwrap_or("").to_string();
    let bytes = read_manifest_body(req).await?;
    let parsed = parse_manifest(&bytes, &content_type)?;
    let digest = match &r {
        Reference::Digest(d) => {
            let actual = Digest::of(d.algorithm(), &bytes);
            if &actual != d {
                return Err(RegistryError::DigestInvalid(format!("manifest digest is {actual}, not {d}")));
            }
            actual
        }
        Reference::Tag(t) => {
            tags.insert(0, t.clone());
            Digest::of(Algorithm::Sha256, &bytes)
        }
    };
    let mut events = vec![Event::ManifestPut {
        repo: name.clone(),
        digest: digest.clone(),
        media_type: parsed.media_type.clone(),
        bytes: bytes.to_vec(),
        refs: parsed.required.clone(),
        subject: parsed.subject.clone(),
        artifact_type: parsed.artifact_type.clone(),
    }];
    for t in &tags {
        events.push(Event::TagSet { repo: name.clone(), tag: t.clone(), digest: digest.clone(), expect: None });
    }
    if reg.cfg.fault == Some(crate::Fault::AckBeforeCommit) {
        let meta = reg.meta.clone();
        tokio::spawn(async move { meta.propose(events).await });
    } else {
        reg.meta.propose(events).await?;
    }
    let mut headers =
        vec![("Location", format!("/v2/{name}/manifests/{digest}")), ("Docker-Content-Digest", digest.to_string())];
    if let Some(s) = &parsed.subject {
        headers.push(("OCI-Subject", s.to_string()));
    }
    if matches!(r, Reference::Digest(_)) && !tags.is_empty() {
        headers.push(("OCI-Tag", tags.iter().map(Tag::as_str).collect::<Vec<_>>().join(", ")));
    }
    empty_response(StatusCode::CREATED, &headers)
}

/// Reads a manifest body of at most [`MAX_MANIFEST_BYTES`]. A larger body is read to its end
/// (up to [`DRAIN_LIMIT`]) before the 413, so that the client sees the answer instead of a reset.
async fn read_manifest_body<B: ReqBody>(req: Request<B>) -> Result<bytes::Bytes, RegistryError> {
    let declared = content_length(req.headers())?;
    let mut body = req.into_body();
    if declared.is_some_and(|l| l > MAX_MANIFEST_BYTES as u64) {
        drain(&mut body).await;
        return Err(RegistryError::ManifestTooLarge(MAX_MANIFEST_BYTES));
    }
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| RegistryError::ManifestInvalid(format!("reading body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > MAX_MANIFEST_BYTES {
                drain(&mut body).await;
                return Err(RegistryError::ManifestTooLarge(MAX_MANIFEST_BYTES));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// Most bytes read and discarded from an oversized request before answering it.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

async fn drain<B: ReqBody>(body: &mut B) {
    let mut seen = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        seen += frame.data_ref().map_or(0, |d| d.len());
        if seen > DRAIN_LIMIT {
            return;
        }
    }
}

pub(crate) async fn delete(reg: &Registry, name: RepoName, r: &str) -> HandlerResult {
    if !reg.cfg.delete_enabled {
        return Err(RegistryError::Unsupported("deletion is disabled".into()));
    }
    let ev = match reference(r, false)? {
        Reference::Digest(digest) => Event::ManifestDeleted { repo: name, digest },
        Reference::Tag(tag) => Event::TagDeleted { repo: name, tag },
    };
    reg.meta.propose(vec![ev]).await?;
    empty_response(StatusCode::ACCEPTED, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        let mut h = HeaderMap::new();
        assert!(acceptable(&h, "x/y"));
        h.append(header::ACCEPT, HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json; q=0.9, a/b"));
        assert!(acceptable(&h, "application/vnd.oci.image.manifest.v1+json"));
        assert!(acceptable(&h, "a/b"));
        assert!(!acceptable(&h, "application/vnd.oci.image.index.v1+json"));
        h.append(header::ACCEPT, HeaderValue::from_static("*/*"));
        assert!(acceptable(&h, "application/vnd.oci.image.index.v1+json"));
    }

    #[test]
    fn references() {
        assert!(matches!(reference("latest", false), Ok(Reference::Tag(_))));
        assert!(matches!(reference("bad tag!", false), Err(RegistryError::ManifestUnknown)));
        assert!(matches!(reference("bad tag!", true), Err(RegistryError::ManifestInvalid(_))));
        assert!(matches!(reference("sha256:123", false), Err(RegistryError::DigestInvalid(_))));
    }
}
