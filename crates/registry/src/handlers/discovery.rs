//! Content discovery: tag lists, the catalog, the referrers API, and raftyard's extensions
//! (event journal, health).

use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};
use raftyard_types::manifest::OCI_INDEX;
use raftyard_types::RepoName;
use serde_json::json;

use super::blobs::parse_digest;
use super::{json_response, query, HandlerResult};
use crate::body::{empty, full};
use crate::error::RegistryError;
use crate::Registry;

/// Page size when the client gives no `n`.
const DEFAULT_PAGE: usize = 1000;
/// Largest page served.
const MAX_PAGE: usize = 10_000;

fn page_size(q: &[(String, String)]) -> Result<usize, RegistryError> {
    match query(q, "n") {
        None | Some("") => Ok(DEFAULT_PAGE),
        Some(n) => n
            .parse::<usize>()
            .map(|n| n.min(MAX_PAGE))
            .map_err(|_| RegistryError::PaginationInvalid(format!("n={n:?}"))),
    }
}

/// Adds `Link: <path?n=N&last=L>; rel="next"` when `items` holds one more than the page
/// (`path` may carry query parameters of its own: `?a=b`).
fn paginate(items: &mut Vec<String>, n: usize, path: &str) -> Option<HeaderValue> {
    if items.len() <= n {
        return None;
    }
    items.truncate(n);
    let last = items.last()?;
    let enc = percent_encoding::utf8_percent_encode(last, percent_encoding::NON_ALPHANUMERIC);
    let sep = if path.contains('?') { '&' } else { '?' };
    HeaderValue::from_str(&format!("<{path}{sep}n={n}&last={enc}>; rel=\"next\"")).ok()
}

pub(crate) async fn tags(reg: &Registry, name: &RepoName, q: &[(String, String)], head: bool) -> HandlerResult {
    reg.meta.read_barrier().await?;
    let reader = reg.meta.reader();
    if !reader.repo_exists(name)? {
        return Err(RegistryError::NameUnknown);
    }
    let n = page_size(q)?;
    let last = query(q, "last").filter(|l| !l.is_empty());
    let mut tags = if n == 0 { vec![] } else { reader.tags(name, last, n + 1)? };
    let link = paginate(&mut tags, n, &format!("/v2/{name}/tags/list"));
    let body = serde_json::to_vec(&json!({"name": name, "tags": tags})).expect("json");
    let mut resp = json_response(StatusCode::OK, body, head);
    if let Some(l) = link {
        resp.headers_mut().insert(header::LINK, l);
    }
    Ok(resp)
}

/// The catalog lists only the repositories the caller may pull.
pub(crate) async fn catalog(reg: &Registry, q: &[(String, String)], caller: &raftyard_auth::Caller) -> HandlerResult {
    reg.meta.read_barrier().await?;
    let n = page_size(q)?;
    let mut last = query(q, "last").filter(|l| !l.is_empty()).map(str::to_string);
    let mut repos = Vec::new();
    while n > 0 && repos.len() <= n {
        let batch = reg.meta.reader().repos(last.as_deref(), n + 1)?;
        let done = batch.len() <= n;
        last = batch.last().cloned();
        repos.extend(crate::access::in_catalog(reg, caller, batch));
        if done {
            break;
        }
    }
    let link = paginate(&mut repos, n, "/v2/_catalog");
    let body = serde_json::to_vec(&json!({"repositories": repos})).expect("json");
    let mut resp = json_response(StatusCode::OK, body, false);
    if let Some(l) = link {
        resp.headers_mut().insert(header::LINK, l);
    }
    Ok(resp)
}

/// `GET /v2/_raftyard/usage?repos=GLOB&n=N&last=L`: what each repository the caller may pull
/// holds (bytes, blobs counted once per repository, manifests), by name and paginated like the
/// catalog, and the quotas over them: every quota for an administrator (or without access
/// control), else those covering a repository of the page.
pub(crate) async fn usage(reg: &Registry, q: &[(String, String)], caller: &raftyard_auth::Caller) -> HandlerResult {
    let glob = match query(q, "repos").filter(|g| !g.is_empty()) {
        Some(g) => Some(
            raftyard_types::access::RepoGlob::parse(g)
                .map_err(|_| RegistryError::NameInvalid(format!("repository pattern {g:?}")))?,
        ),
        None => None,
    };
    reg.meta.read_barrier().await?;
    let reader = reg.meta.reader();
    let n = page_size(q)?;
    let mut last = query(q, "last").filter(|l| !l.is_empty()).map(str::to_string);
    let mut repos = Vec::new();
    while n > 0 && repos.len() <= n {
        let batch = reader.usage(glob.as_ref(), last.as_deref(), n + 1)?;
        let done = batch.len() <= n;
        last = batch.last().map(|u| u.repository.clone());
        let visible = crate::access::in_catalog(reg, caller, batch.iter().map(|u| u.repository.clone()).collect());
        repos.extend(batch.into_iter().filter(|u| visible.contains(&u.repository)));
        if done {
            break;
        }
    }
    let mut names: Vec<String> = repos.iter().map(|u| u.repository.clone()).collect();
    let path = match &glob {
        Some(g) => format!("/v2/_raftyard/usage?repos={}", g.as_str()),
        None => "/v2/_raftyard/usage".to_string(),
    };
    let link = paginate(&mut names, n, &path);
    repos.truncate(names.len());
    let all = crate::access::sees_all(reg, caller);
    let quotas: Vec<_> = reader
        .quotas()?
        .into_iter()
        .filter(|qu| all || repos.iter().any(|u| qu.quota.repos.matches(&u.repository)))
        .map(|qu| json!({"repos": qu.quota.repos, "bytes": qu.quota.bytes, "used": qu.used}))
        .collect();
    let body = serde_json::to_vec(&json!({"repositories": repos, "quotas": quotas})).expect("json");
    let mut resp = json_response(StatusCode::OK, body, false);
    if let Some(l) = link {
        resp.headers_mut().insert(header::LINK, l);
    }
    Ok(resp)
}

pub(crate) async fn referrers(
    reg: &Registry,
    name: &RepoName,
    digest: &str,
    q: &[(String, String)],
    head: bool,
) -> HandlerResult {
    let subject = parse_digest(digest)?;
    reg.meta.read_barrier().await?;
    let reader = reg.meta.reader();
    let filter = query(q, "artifactType").filter(|t| !t.is_empty());
    let mut manifests = Vec::new();
    for d in reader.referrers(name, &subject)? {
        let Some(rec) = reader.manifest(name, &d)? else {
            continue;
        };
        if filter.is_some() && rec.artifact_type.as_deref() != filter {
            continue;
        }
        let annotations = serde_json::from_slice::<serde_json::Value>(&rec.bytes)
            .ok()
            .and_then(|v| v.get("annotations").cloned())
            .filter(|a| a.is_object());
        let mut desc = json!({"mediaType": rec.media_type, "size": rec.bytes.len(), "digest": d});
        if let Some(t) = &rec.artifact_type {
            desc["artifactType"] = json!(t);
        }
        if let Some(a) = annotations {
            desc["annotations"] = a;
        }
        manifests.push(desc);
    }
    let body =
        serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})).expect("json");
    let len = body.len();
    let mut resp = Response::new(if head { empty() } else { full(body) });
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(OCI_INDEX));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if filter.is_some() {
        h.insert("OCI-Filters-Applied", HeaderValue::from_static("artifactType"));
    }
    Ok(resp)
}

/// `GET /v2/_raftyard/events?since=N&limit=M&wait=S`: journal entries with index ≥ N as JSON
/// lines. With `wait`, an empty answer is held up to S seconds for new entries (long poll).
/// Resume with `since` = last index + 1.
pub(crate) async fn events(reg: &Registry, q: &[(String, String)]) -> HandlerResult {
    let num = |k: &str, d: u64| -> Result<u64, RegistryError> {
        query(q, k)
            .filter(|v| !v.is_empty())
            .map_or(Ok(d), |v| v.parse().map_err(|_| RegistryError::PaginationInvalid(format!("{k}={v:?}"))))
    };
    let since = num("since", 0)?;
    let limit = num("limit", 1000)?.clamp(1, 10_000) as usize;
    let wait = Duration::from_secs(num("wait", 0)?.min(60));
    let reader = reg.meta.reader();
    // before the entries: every entry answered is at or after it, even if a trim runs meanwhile
    let first = reader.journal_first()?;
    let mut entries = reader.journal(since, limit)?;
    if entries.is_empty() && !wait.is_zero() {
        let target = reader.applied_index().max(since.saturating_sub(1)) + 1;
        let _ = tokio::time::timeout(wait, reader.wait_applied(target)).await;
        entries = reader.journal(since, limit)?;
    }
    let mut out = Vec::new();
    for e in entries {
        serde_json::to_writer(&mut out, &e.to_json()).expect("json");
        out.push(b'\n');
    }
    let len = out.len();
    let mut resp = Response::new(full(out));
    // with journal retention, where the journal now starts (earlier events are gone)
    resp.headers_mut().insert("Raftyard-Journal-First", HeaderValue::from(first));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    Ok(resp)
}

/// This node's applied index and a SHA-256 over its whole metadata state (local, no read
/// index): equal on every node that applied the same log.
pub(crate) async fn state_digest(reg: &Registry) -> HandlerResult {
    let reader = reg.meta.reader().clone();
    let (applied, digest) = tokio::task::spawn_blocking(move || reader.digest())
        .await
        .map_err(|e| RegistryError::Internal(e.to_string()))??;
    let body = json!({ "applied": applied, "digest": digest });
    Ok(json_response(StatusCode::OK, serde_json::to_vec(&body).expect("json"), false))
}

pub(crate) async fn health(reg: &Registry) -> HandlerResult {
    let m = reg.meta.raft().metrics().borrow().clone();
    let body = json!({
        "node": reg.meta.id(),
        "state": format!("{:?}", m.state),
        "term": m.current_term,
        "leader": m.current_leader,
        "last_log_index": m.last_log_index,
        "applied": m.last_applied.map(|l| l.index),
        "snapshot": m.snapshot.map(|l| l.index),
        "purged": m.purged.map(|l| l.index),
        "open_uploads": reg.blobs.open_uploads(),
        "journal_first": reg.meta.reader().journal_first().ok(),
        "proposal_ids": reg.meta.proposal_ids(),
        "cluster_protocol": reg.meta.cluster_protocol(),
    });
    Ok(json_response(StatusCode::OK, serde_json::to_vec(&body).expect("json"), false))
}

/// `GET /v2/_raftyard/ready`: 200 while this node should take traffic, else 503 with the
/// reason (see [`Registry::not_ready`]). For load balancers and the relay's agent.
pub(crate) async fn ready(reg: &Registry) -> HandlerResult {
    let (status, body) = match reg.not_ready().await {
        None => (StatusCode::OK, json!({ "ready": true })),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, json!({ "ready": false, "reason": reason })),
    };
    Ok(json_response(status, serde_json::to_vec(&body).expect("json"), false))
}
