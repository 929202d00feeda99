//! Parse, then dispatch: turns a request line into an [`Endpoint`] without touching state.
//!
//! Repository names contain `/`, so the path is split from the right at the last marker
//! (`/manifests/`, `/blobs/uploads/`, `/blobs/`, `/tags/list`, `/referrers/`) whose tail holds
//! no further `/`.

use http::Method;
use percent_encoding::percent_decode_str;
use raftyard_types::RepoName;

use crate::error::RegistryError;

/// What a request addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/_raftyard/events`: the event journal (raftyard extension).
    Events,
    /// `/v2/_raftyard/health`: liveness and Raft role (raftyard extension).
    Health,
    /// `/v2/_raftyard/ready`: whether this node should take traffic now (raftyard extension):
    /// 200, or 503 with the reason.
    Ready,
    /// `/v2/_raftyard/state-digest`: a digest of this node's applied metadata state, to compare
    /// nodes (raftyard extension).
    StateDigest,
    /// `/v2/_raftyard/usage`: what repositories hold and the quotas over them (raftyard
    /// extension).
    Usage,
    /// `/v2/<name>/manifests/<reference>`
    Manifest { name: RepoName, reference: String },
    /// `/v2/<name>/blobs/<digest>`
    Blob { name: RepoName, digest: String },
    /// `/v2/<name>/blobs/uploads/`
    UploadStart { name: RepoName },
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload { name: RepoName, id: String },
    /// `/v2/<name>/tags/list`
    Tags { name: RepoName },
    /// `/v2/<name>/referrers/<digest>`
    Referrers { name: RepoName, digest: String },
    /// `/metrics` (Prometheus text format)
    Metrics,
    /// `/auth/token`: the token endpoint of the Docker token flow (token auth mode).
    Token,
}

impl Endpoint {
    /// Whether `method` on this endpoint changes the registry (what a backup refuses).
    pub fn writes(&self, method: &http::Method) -> bool {
        match self {
            Endpoint::UploadStart { .. } | Endpoint::Upload { .. } => true,
            Endpoint::Manifest { .. } | Endpoint::Blob { .. } => {
                matches!(*method, http::Method::PUT | http::Method::POST | http::Method::PATCH | http::Method::DELETE)
            }
            _ => false,
        }
    }

    /// The repository and the reference (tag or digest) the request names, for its span.
    pub fn subject(&self) -> (Option<&str>, Option<&str>) {
        match self {
            Endpoint::Manifest { name, reference } => (Some(name.as_str()), Some(reference)),
            Endpoint::Blob { name, digest } | Endpoint::Referrers { name, digest } => {
                (Some(name.as_str()), Some(digest))
            }
            Endpoint::UploadStart { name } | Endpoint::Tags { name } => (Some(name.as_str()), None),
            Endpoint::Upload { name, id } => (Some(name.as_str()), Some(id)),
            _ => (None, None),
        }
    }

    /// A short route label for metrics and logs.
    pub fn route(&self) -> &'static str {
        match self {
            Endpoint::Base => "base",
            Endpoint::Catalog => "catalog",
            Endpoint::Events => "events",
            Endpoint::Health => "health",
            Endpoint::Ready => "ready",
            Endpoint::StateDigest => "state_digest",
            Endpoint::Usage => "usage",
            Endpoint::Manifest { .. } => "manifest",
            Endpoint::Blob { .. } => "blob",
            Endpoint::UploadStart { .. } => "upload_start",
            Endpoint::Upload { .. } => "upload",
            Endpoint::Tags { .. } => "tags",
            Endpoint::Referrers { .. } => "referrers",
            Endpoint::Metrics => "metrics",
            Endpoint::Token => "token",
        }
    }

    fn allows(&self, m: &Method) -> bool {
        let get_head = *m == Method::GET || *m == Method::HEAD;
        match self {
            Endpoint::Base
            | Endpoint::Catalog
            | Endpoint::Events
            | Endpoint::Health
            | Endpoint::Ready
            | Endpoint::StateDigest
            | Endpoint::Usage
            | Endpoint::Metrics => get_head,
            Endpoint::Token => get_head || *m == Method::POST,
            Endpoint::Tags { .. } | Endpoint::Referrers { .. } => get_head,
            Endpoint::Manifest { .. } => get_head || *m == Method::PUT || *m == Method::DELETE,
            Endpoint::Blob { .. } => get_head || *m == Method::DELETE,
            Endpoint::UploadStart { .. } => *m == Method::POST,
            Endpoint::Upload { .. } => get_head || *m == Method::PATCH || *m == Method::PUT || *m == Method::DELETE,
        }
    }
}

const MARKERS: [&str; 4] = ["/manifests/", "/blobs/uploads/", "/blobs/", "/referrers/"];

/// Parses the method and path (without query) of a request.
pub fn parse_endpoint(method: &Method, raw_path: &str) -> Result<Endpoint, RegistryError> {
    let decoded = percent_decode_str(raw_path).decode_utf8().map_err(|_| RegistryError::NotFound)?;
    let path: &str = &decoded;
    let ep = if path == "/metrics" {
        Endpoint::Metrics
    } else if path == raftyard_auth::TOKEN_PATH {
        Endpoint::Token
    } else {
        let rest = match path {
            "/v2" => "",
            p => p.strip_prefix("/v2/").ok_or(RegistryError::NotFound)?,
        };
        match rest {
            "" => Endpoint::Base,
            "_catalog" => Endpoint::Catalog,
            "_raftyard/events" => Endpoint::Events,
            "_raftyard/health" => Endpoint::Health,
            "_raftyard/ready" => Endpoint::Ready,
            "_raftyard/state-digest" => Endpoint::StateDigest,
            "_raftyard/usage" => Endpoint::Usage,
            _ => parse_repo_path(rest)?,
        }
    };
    if !ep.allows(method) {
        return Err(RegistryError::MethodNotAllowed);
    }
    Ok(ep)
}

fn name(s: &str) -> Result<RepoName, RegistryError> {
    RepoName::parse(s).map_err(|_| RegistryError::NameInvalid(s.to_string()))
}

fn parse_repo_path(rest: &str) -> Result<Endpoint, RegistryError> {
    if let Some(n) = rest.strip_suffix("/tags/list") {
        return Ok(Endpoint::Tags { name: name(n)? });
    }
    // rightmost marker whose tail has no '/'
    let mut best: Option<(usize, &str)> = None;
    for m in MARKERS {
        if let Some(i) = rest.rfind(m) {
            let tail = &rest[i + m.len()..];
            if !tail.contains('/') && best.is_none_or(|(j, _)| i > j || (i == j && m.len() > best.unwrap().1.len())) {
                best = Some((i, m));
            }
        }
    }
    let Some((i, marker)) = best else {
        return Err(RegistryError::NotFound);
    };
    let n = &rest[..i];
    let tail = rest[i + marker.len()..].to_string();
    if n.is_empty() {
        return Err(RegistryError::NotFound);
    }
    let name = name(n)?;
    Ok(match marker {
        "/manifests/" if !tail.is_empty() => Endpoint::Manifest { name, reference: tail },
        "/blobs/uploads/" if tail.is_empty() => Endpoint::UploadStart { name },
        "/blobs/uploads/" => Endpoint::Upload { name, id: tail },
        "/blobs/" if !tail.is_empty() => Endpoint::Blob { name, digest: tail },
        "/referrers/" if !tail.is_empty() => Endpoint::Referrers { name, digest: tail },
        _ => return Err(RegistryError::NotFound),
    })
}

/// Query parameters in order, percent-decoded (`+` is a space).
pub fn parse_query(query: Option<&str>) -> Vec<(String, String)> {
    let Some(q) = query else { return vec![] };
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let dec = |s: &str| percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned();
            (dec(k), dec(v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(m: Method, path: &str) -> Result<Endpoint, RegistryError> {
        parse_endpoint(&m, path)
    }
    fn n(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    #[test]
    fn base_and_catalog() {
        assert_eq!(p(Method::GET, "/v2/").unwrap(), Endpoint::Base);
        assert_eq!(p(Method::GET, "/v2").unwrap(), Endpoint::Base);
        assert_eq!(p(Method::GET, "/v2/_catalog").unwrap(), Endpoint::Catalog);
        assert_eq!(p(Method::GET, "/v2/_raftyard/events").unwrap(), Endpoint::Events);
        assert_eq!(p(Method::GET, "/v2/_raftyard/ready").unwrap(), Endpoint::Ready);
        assert_eq!(p(Method::GET, "/v2/_raftyard/usage").unwrap(), Endpoint::Usage);
        assert!(matches!(p(Method::POST, "/v2/"), Err(RegistryError::MethodNotAllowed)));
        assert!(matches!(p(Method::GET, "/v1/"), Err(RegistryError::NotFound)));
    }

    #[test]
    fn names_with_slashes_and_marker_words() {
        assert_eq!(
            p(Method::GET, "/v2/a/b/c/manifests/latest").unwrap(),
            Endpoint::Manifest { name: n("a/b/c"), reference: "latest".into() }
        );
        // a repository called "manifests" or "blobs"
        assert_eq!(
            p(Method::GET, "/v2/x/manifests/manifests/v1").unwrap(),
            Endpoint::Manifest { name: n("x/manifests"), reference: "v1".into() }
        );
        assert_eq!(
            p(Method::GET, "/v2/blobs/blobs/sha256:abc").unwrap(),
            Endpoint::Blob { name: n("blobs"), digest: "sha256:abc".into() }
        );
        assert_eq!(
            p(Method::GET, "/v2/a/manifests/x/blobs/sha256:abc").unwrap(),
            Endpoint::Blob { name: n("a/manifests/x"), digest: "sha256:abc".into() }
        );
        assert_eq!(p(Method::GET, "/v2/a/tags/list").unwrap(), Endpoint::Tags { name: n("a") });
        assert_eq!(p(Method::GET, "/v2/a/tags/list/tags/list").unwrap(), Endpoint::Tags { name: n("a/tags/list") });
    }

    #[test]
    fn uploads() {
        assert_eq!(p(Method::POST, "/v2/a/b/blobs/uploads/").unwrap(), Endpoint::UploadStart { name: n("a/b") });
        assert_eq!(
            p(Method::PATCH, "/v2/a/b/blobs/uploads/n1-abc").unwrap(),
            Endpoint::Upload { name: n("a/b"), id: "n1-abc".into() }
        );
        assert!(matches!(p(Method::GET, "/v2/a/blobs/uploads/"), Err(RegistryError::MethodNotAllowed)));
        assert!(matches!(p(Method::POST, "/v2/a/blobs/sha256:x"), Err(RegistryError::MethodNotAllowed)));
    }

    #[test]
    fn referrers_and_percent_encoding() {
        assert_eq!(
            p(Method::GET, "/v2/a/referrers/sha256%3Aabc").unwrap(),
            Endpoint::Referrers { name: n("a"), digest: "sha256:abc".into() }
        );
    }

    #[test]
    fn invalid_names() {
        assert!(matches!(p(Method::GET, "/v2/A/manifests/x"), Err(RegistryError::NameInvalid(_))));
        assert!(matches!(p(Method::GET, "/v2/a//b/manifests/x"), Err(RegistryError::NameInvalid(_))));
        assert!(matches!(p(Method::GET, "/v2/a/manifests/"), Err(RegistryError::NotFound)));
        assert!(matches!(p(Method::GET, "/v2/a/nothing"), Err(RegistryError::NotFound)));
    }

    #[test]
    fn query() {
        let q = parse_query(Some("tag=a&tag=b&digest=sha256%3Ax&n=&x"));
        assert_eq!(q[0], ("tag".into(), "a".into()));
        assert_eq!(q[1], ("tag".into(), "b".into()));
        assert_eq!(q[2], ("digest".into(), "sha256:x".into()));
        assert_eq!(q[3], ("n".into(), "".into()));
        assert_eq!(q[4], ("x".into(), "".into()));
    }
}
