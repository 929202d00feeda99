//! Forwarding of upload-session requests to the node that owns the session: the request
//! (head, then body bytes as they arrive) is streamed over the peer port and answered by the
//! owner's registry handlers; the response streams back the same way. Memory stays bounded:
//! both directions go through bounded channels.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt, StreamBody};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::pb::{self, http_part};
use crate::peers::Peers;

/// An HTTP body as the registry produces and consumes it.
pub type HttpBody = BoxBody<Bytes, std::io::Error>;

/// The registry of this node, answering requests forwarded by other nodes.
#[async_trait::async_trait]
pub trait LocalHttp: Send + Sync + 'static {
    async fn serve(&self, req: Request<HttpBody>) -> Response<HttpBody>;
}

/// Set once the registry exists (after the peer port already serves Raft).
pub type LocalHttpSlot = Arc<OnceLock<Arc<dyn LocalHttp>>>;

/// Headers that describe one hop, not the message.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "transfer-encoding" | "te" | "trailer" | "upgrade" | "proxy-connection"
    )
}

fn head_of(headers: &http::HeaderMap) -> Vec<pb::HttpHeader> {
    headers
        .iter()
        .filter(|(k, _)| !hop_by_hop(k))
        .map(|(k, v)| pb::HttpHeader { name: k.as_str().to_string(), value: Bytes::copy_from_slice(v.as_bytes()) })
        .collect()
}

fn apply_headers(target: &mut http::HeaderMap, headers: Vec<pb::HttpHeader>) {
    for h in headers {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_bytes(&h.value)) {
            target.append(k, v);
        }
    }
}

/// The body parts of a gRPC stream as an HTTP body. A task moves the parts into a bounded
/// channel: the gRPC stream is not `Sync`, the registry's body type must be.
fn body_from_parts(mut parts: Streaming<pb::HttpPart>) -> HttpBody {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    tokio::spawn(async move {
        while let Some(p) = parts.next().await {
            let item = match p {
                Ok(pb::HttpPart { part: Some(http_part::Part::Data(d)) }) => Ok(Frame::data(d)),
                Ok(pb::HttpPart { part: Some(http_part::Part::Abort(why)) }) => {
                    Err(std::io::Error::other(format!("the forwarded body broke: {why}")))
                }
                Ok(_) => continue,
                Err(s) => Err(std::io::Error::other(s.message().to_string())),
            };
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx)))
}

/// Sends `head` then the frames of `body` into `tx`.
async fn pump<B>(tx: mpsc::Sender<Result<pb::HttpPart, Status>>, head: pb::HttpHead, mut body: B)
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display + Send,
{
    if tx.send(Ok(pb::HttpPart { part: Some(http_part::Part::Head(head)) })).await.is_err() {
        return;
    }
    while let Some(frame) = body.frame().await {
        let item = match frame {
            Ok(f) => match f.into_data() {
                Ok(d) => Ok(pb::HttpPart { part: Some(http_part::Part::Data(d)) }),
                Err(_) => continue,
            },
            Err(e) => Err(Status::aborted(e.to_string())),
        };
        let stop = item.is_err();
        if tx.send(item).await.is_err() || stop {
            return;
        }
    }
}

/// Server side: answers one forwarded request with the local registry.
pub async fn serve_forwarded(
    local: &LocalHttpSlot,
    mut incoming: Streaming<pb::HttpPart>,
) -> Result<ReceiverStream<Result<pb::HttpPart, Status>>, Status> {
    let handler = local.get().cloned().ok_or_else(|| Status::unavailable("registry not ready"))?;
    let head = match incoming.next().await {
        Some(Ok(pb::HttpPart { part: Some(http_part::Part::Head(h)) })) => h,
        _ => return Err(Status::invalid_argument("a forwarded request starts with its head")),
    };
    let mut req = Request::builder()
        .method(head.method.as_str())
        .uri(head.uri.as_str())
        .body(body_from_parts(incoming))
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    apply_headers(req.headers_mut(), head.headers);
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let resp = handler.serve(req).await;
        let (parts, body) = resp.into_parts();
        let head = pb::HttpHead {
            method: String::new(),
            uri: String::new(),
            status: parts.status.as_u16() as u32,
            headers: head_of(&parts.headers),
        };
        pump(tx, head, body).await;
    });
    Ok(ReceiverStream::new(rx))
}

/// Client side: streams `req` to the node at `peer` and returns its answer.
pub async fn forward<B>(peers: &Peers, peer: &str, req: Request<B>) -> Result<Response<HttpBody>, Status>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display + Send,
{
    let channel = peers.channel(peer).map_err(|e| Status::unavailable(e.to_string()))?;
    let (parts, body) = req.into_parts();
    let uri = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    let head =
        pb::HttpHead { method: parts.method.as_str().to_string(), uri, status: 0, headers: head_of(&parts.headers) };
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(pump(tx, head, body));
    // A request stream has no error item, and ending it would tell the owner the body is
    // complete: a body error travels as an abort part instead.
    let requests = ReceiverStream::new(rx)
        .map(|r| r.unwrap_or_else(|s| pb::HttpPart { part: Some(http_part::Part::Abort(s.message().to_string())) }));
    let mut replies = pb::uploads_client::UploadsClient::new(channel).forward(requests).await?.into_inner();
    let head = match replies.next().await {
        Some(Ok(pb::HttpPart { part: Some(http_part::Part::Head(h)) })) => h,
        Some(Err(s)) => return Err(s),
        _ => return Err(Status::internal("a forwarded response starts with its head")),
    };
    let mut resp = Response::new(body_from_parts(replies));
    *resp.status_mut() = http::StatusCode::from_u16(head.status as u16).map_err(|e| Status::internal(e.to_string()))?;
    apply_headers(resp.headers_mut(), head.headers);
    Ok(resp)
}
