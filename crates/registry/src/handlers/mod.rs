//! Request handlers. [`handle`] parses the endpoint and dispatches; every handler returns
//! `Result<Response, RegistryError>` and errors are rendered in one place.

mod blobs;
mod discovery;
mod manifests;
mod uploads;

use std::sync::Arc;

use bytes::Bytes;
use std::time::Instant;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use tracing::{debug, info_span, Instrument};

use crate::body::{empty, full, Body};
use crate::endpoint::{parse_endpoint, parse_query, Endpoint};
use crate::error::RegistryError;
use crate::Registry;

pub(crate) type HandlerResult = Result<Response<Body>, RegistryError>;

/// Longest query string accepted.
const MAX_QUERY: usize = 8 * 1024;

/// A request body the handlers can consume: hyper's, or an empty one from the HTTP/1.1 fast
/// path.
pub trait ReqBody: http_body::Body<Data = Bytes, Error: std::fmt::Display + Send> + Send + Unpin + 'static {}
impl<T> ReqBody for T where T: http_body::Body<Data = Bytes, Error: std::fmt::Display + Send> + Send + Unpin + 'static {}

/// Serves one request for a hyper connection: blob bodies are streamed.
pub async fn handle(reg: Arc<Registry>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    crate::body::materialize(respond(&reg, req).await)
}

/// Serves one request. A blob body is left as a [`crate::body::FileRange`] response extension
/// for the transport to send.
pub(crate) async fn respond<B: ReqBody>(reg: &Registry, req: Request<B>) -> Response<Body> {
    let started = Instant::now();
    let _in_flight = reg.metrics.in_flight();
    let method = req.method().clone();
    let head = method == Method::HEAD;
    let path = req.uri().path().to_string();
    let ep = parse_endpoint(&method, &path);
    let route = ep.as_ref().map(|e| e.route()).unwrap_or("unknown");
    let (repository, reference) = ep.as_ref().map(|e| e.subject()).unwrap_or_default();
    let request_bytes = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok());
    // what log lines within the request show; the status and response size go to the trace
    // only (recording them would format the span's fields again for the log lines)
    let span = info_span!("request",
        otel.name = %format_args!("{method} {route}"), otel.kind = "server",
        %method, path = %path, route, repository, reference, request_bytes);
    raftyard_telemetry::continue_trace(&span, req.headers());
    let result = async {
        match ep {
            Ok(ep) => dispatch(reg, ep, req).await,
            Err(e) => Err(e),
        }
    }
    .instrument(span.clone())
    .await;
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            if e.status().is_server_error() {
                tracing::warn!(%method, %path, error = %e, "request failed");
            } else {
                debug!(%method, %path, error = %e, "request refused");
            }
            e.into_response(head)
        }
    };
    resp.headers_mut().insert("Docker-Distribution-API-Version", HeaderValue::from_static("registry/2.0"));
    raftyard_telemetry::set_attribute(&span, "http.response.status_code", resp.status().as_u16().into());
    if let Some(n) = resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<i64>().ok()) {
        raftyard_telemetry::set_attribute(&span, "http.response.body.size", n);
    }
    reg.metrics.observe(route, method.as_str(), resp.status().as_u16(), started.elapsed());
    resp
}

async fn dispatch<B: ReqBody>(reg: &Registry, ep: Endpoint, mut req: Request<B>) -> HandlerResult {
    if req.uri().query().is_some_and(|q| q.len() > MAX_QUERY) {
        return Err(RegistryError::TooLarge);
    }
    crate::access::gate(reg, &ep, &mut req).await?;
    let q = parse_query(req.uri().query());
    let method = req.method().clone();
    if reg.meta.is_backup() && ep.writes(&method) {
        return Err(backup_refusal(reg));
    }
    match ep {
        Endpoint::Base => Ok(json_response(StatusCode::OK, b"{}".to_vec(), method == Method::HEAD)),
        Endpoint::Health => discovery::health(reg).await,
        Endpoint::Ready => discovery::ready(reg).await,
        Endpoint::StateDigest => discovery::state_digest(reg).await,
        Endpoint::Metrics => Ok(reg.metrics.render(reg, req.headers().get(header::ACCEPT)).await),
        Endpoint::Token => crate::access::token_endpoint(reg, req).await,
        Endpoint::Catalog => discovery::catalog(reg, &q, &crate::access::caller_of(&req)).await,
        Endpoint::Events => discovery::events(reg, &q).await,
        Endpoint::Usage => discovery::usage(reg, &q, &crate::access::caller_of(&req)).await,
        Endpoint::Tags { name } => discovery::tags(reg, &name, &q, method == Method::HEAD).await,
        Endpoint::Referrers { name, digest } => {
            discovery::referrers(reg, &name, &digest, &q, method == Method::HEAD).await
        }
        Endpoint::Blob { name, digest } => match method {
            Method::DELETE => blobs::delete(reg, &name, &digest).await,
            _ => blobs::get(reg, &name, &digest, req.headers(), method == Method::HEAD).await,
        },
        Endpoint::UploadStart { name } => uploads::start(reg, name, &q, req).await,
        Endpoint::Upload { id, .. } if uploads::owner(&id).is_some_and(|o| o != reg.meta.id()) => {
            uploads::forward_to_owner(reg, &id, req).await
        }
        Endpoint::Upload { name, id } => match method {
            Method::PATCH => uploads::patch(reg, &name, &id, req).await,
            Method::PUT => uploads::put(reg, &name, &id, &q, req).await,
            Method::DELETE => uploads::cancel(reg, &name, &id).await,
            _ => uploads::status(reg, &name, &id),
        },
        Endpoint::Manifest { name, reference } => match method {
            Method::PUT => manifests::put(reg, name, &reference, &q, req).await,
            Method::DELETE => manifests::delete(reg, name, &reference).await,
            _ => manifests::get(reg, &name, &reference, req.headers(), method == Method::HEAD).await,
        },
    }
}

/// A push to a backup: refused, naming the nodes that take pushes.
fn backup_refusal(reg: &Registry) -> RegistryError {
    let primaries: Vec<String> =
        reg.meta.members().into_iter().filter(|(_, _, voter)| *voter).map(|(_, a, _)| a.registry).collect();
    RegistryError::Denied(format!(
        "node {} is a read-only backup; push to a primary: {}",
        reg.meta.id(),
        if primaries.is_empty() { "none known".to_string() } else { primaries.join(", ") }
    ))
}

pub(crate) fn json_response(status: StatusCode, bytes: Vec<u8>, head: bool) -> Response<Body> {
    let len = bytes.len();
    let mut r = Response::new(if head { empty() } else { full(bytes) });
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r
}

/// An empty response with the given status and headers.
pub(crate) fn empty_response(status: StatusCode, headers: &[(&str, String)]) -> HandlerResult {
    let mut r = Response::new(empty());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    for (k, v) in headers {
        let v = HeaderValue::from_str(v).map_err(|e| RegistryError::Internal(e.to_string()))?;
        h.append(http::HeaderName::from_bytes(k.as_bytes()).map_err(|e| RegistryError::Internal(e.to_string()))?, v);
    }
    Ok(r)
}

/// `Range: 0-<last byte>` of an upload holding `size` bytes (`0-0` when empty, as clients expect).
pub(crate) fn range_header(size: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("0-{}", size.saturating_sub(1))).expect("digits and '-' are valid in a header")
}

pub(crate) fn query<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

pub(crate) fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

pub(crate) fn content_length(h: &HeaderMap) -> Result<Option<u64>, RegistryError> {
    match header_str(h, header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => {
            v.trim().parse().map(Some).map_err(|_| RegistryError::SizeInvalid(format!("bad Content-Length {v:?}")))
        }
    }
}
