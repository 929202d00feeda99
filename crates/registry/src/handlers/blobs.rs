//! Blob reads (`GET`/`HEAD` with `Range`) and deletes.

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use raftyard_types::{Digest, Event, RepoName};

use super::{empty_response, header_str, HandlerResult};
use std::sync::Arc;

use crate::body::{empty, FileRange};
use crate::error::RegistryError;
use crate::placement::BlobSource;
use crate::Registry;

pub(crate) fn parse_digest(s: &str) -> Result<Digest, RegistryError> {
    Digest::parse(s).map_err(RegistryError::from)
}

/// A single byte range of a blob of `size` bytes, from a `Range` header.
/// `Ok(None)`: serve the whole blob (no header, or a form we ignore as RFC 9110 allows).
pub(crate) fn parse_range(h: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, RegistryError> {
    let Some(h) = h else { return Ok(None) };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(RegistryError::BlobRange { size })?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let suffix: u64 = b.parse().map_err(|_| RegistryError::BlobRange { size })?;
        if suffix == 0 || size == 0 {
            return Err(RegistryError::BlobRange { size });
        }
        (size.saturating_sub(suffix), size - 1)
    } else {
        let start: u64 = a.parse().map_err(|_| RegistryError::BlobRange { size })?;
        let end: u64 = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse().map_err(|_| RegistryError::BlobRange { size })?
        };
        if start >= size || end < start {
            return Err(RegistryError::BlobRange { size });
        }
        (start, end.min(size - 1))
    };
    Ok(Some(range))
}

/// Whether `digest` is linked in `name`, read linearizably: a blob pushed through another node
/// just before is found, and one deleted through another node just before is not. Without
/// deletes a link never goes away, so a local hit is served without the read barrier.
pub(crate) async fn linked_size(
    reg: &Registry,
    name: &RepoName,
    digest: &Digest,
) -> Result<Option<u64>, RegistryError> {
    if reg.local_digest_reads() {
        if let Some(s) = reg.meta.reader().blob_link(name, digest)? {
            return Ok(Some(s));
        }
    }
    reg.meta.read_barrier().await?;
    Ok(reg.meta.reader().blob_link(name, digest)?)
}

pub(crate) async fn get(
    reg: &Registry,
    name: &RepoName,
    digest: &str,
    headers: &HeaderMap,
    head: bool,
) -> HandlerResult {
    let digest = parse_digest(digest)?;
    let Some(size) = linked_size(reg, name, &digest).await? else {
        return Err(RegistryError::BlobUnknown);
    };
    let range = parse_range(header_str(headers, header::RANGE), size)?;
    let (status, start, len) = match range {
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        None => (StatusCode::OK, 0, size),
    };
    let mut resp = Response::new(empty());
    match reg.locate(name, &digest, size, (!head).then_some((start, len))).await? {
        BlobSource::Local => {
            let (file, stored) = reg.blobs.open_blob(&digest)?;
            if stored != size {
                return Err(RegistryError::Internal(format!("blob {digest}: {stored} bytes here, {size} linked")));
            }
            if !head {
                resp.extensions_mut().insert(FileRange { file: Arc::new(file), offset: start, len });
            }
        }
        BlobSource::Peer(body) => *resp.body_mut() = body,
    }
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let d = HeaderValue::from_str(&digest.to_string()).expect("digest is a valid header");
    h.insert(header::ETAG, HeaderValue::from_str(&format!("\"{digest}\"")).expect("valid header"));
    h.insert("Docker-Content-Digest", d);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=31536000"));
    if let Some((a, b)) = range {
        h.insert(header::CONTENT_RANGE, HeaderValue::from_str(&format!("bytes {a}-{b}/{size}")).expect("valid header"));
    }
    Ok(resp)
}

pub(crate) async fn delete(reg: &Registry, name: &RepoName, digest: &str) -> HandlerResult {
    let digest = parse_digest(digest)?;
    if !reg.cfg.delete_enabled {
        return Err(RegistryError::Unsupported("deletion is disabled".into()));
    }
    reg.meta.propose(vec![Event::BlobUnlinked { repo: name.clone(), digest: digest.clone() }]).await?;
    empty_response(StatusCode::ACCEPTED, &[("Docker-Content-Digest", digest.to_string())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10).unwrap(), None);
        assert_eq!(parse_range(Some("bytes=0-4"), 10).unwrap(), Some((0, 4)));
        assert_eq!(parse_range(Some("bytes=5-"), 10).unwrap(), Some((5, 9)));
        assert_eq!(parse_range(Some("bytes=-3"), 10).unwrap(), Some((7, 9)));
        assert_eq!(parse_range(Some("bytes=8-100"), 10).unwrap(), Some((8, 9)));
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10).unwrap(), None);
        assert_eq!(parse_range(Some("items=0-1"), 10).unwrap(), None);
        assert!(parse_range(Some("bytes=10-"), 10).is_err());
        assert!(parse_range(Some("bytes=5-2"), 10).is_err());
        assert!(parse_range(Some("bytes=x-2"), 10).is_err());
        assert!(parse_range(Some("bytes=-0"), 10).is_err());
        assert!(parse_range(Some("bytes=0-0"), 0).is_err());
    }
}
