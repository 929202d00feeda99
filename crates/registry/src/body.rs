//! Response bodies: small in-memory bodies and blob files streamed in large chunks from a
//! blocking reader (bounded channel: memory does not grow with blob size).

use std::fs::File;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;

pub type Body = BoxBody<Bytes, std::io::Error>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A byte range of a blob file to send as a response body. Handlers attach it as a response
/// extension (with an empty body) so that each transport sends it its own way: the plain
/// HTTP/1.1 fast path with `sendfile(2)`, hyper connections as a stream ([`materialize`]).
#[derive(Clone)]
pub struct FileRange {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: u64,
}

/// Turns a [`FileRange`] extension into a streamed body.
pub fn materialize(mut resp: http::Response<Body>) -> http::Response<Body> {
    if let Some(r) = resp.extensions_mut().remove::<FileRange>() {
        *resp.body_mut() = file_range(r.file, r.offset, r.len);
    }
    resp
}

/// Streams `len` bytes of `file` from `offset`, read in chunks on a blocking thread.
pub fn file_range(file: Arc<File>, offset: u64, len: u64) -> Body {
    channel(raftyard_cluster::blobs::read_chunks(file, offset, len))
}

/// A body fed by a channel of chunks (an error ends it abruptly: the client sees a broken
/// transfer, never a short one taken for complete).
pub fn channel(rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>) -> Body {
    let stream = tokio_stream_from(rx).map(|r| r.map(Frame::data));
    BodyExt::boxed(StreamBody::new(stream))
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
