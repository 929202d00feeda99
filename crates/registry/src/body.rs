//! Response bodies: small in-memory bodies and blob files streamed in large chunks from a
//! blocking reader (bounded channel: memory does not grow with blob size).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;

pub type Body = BoxBody<Bytes, std::io::Error>;

/// Size of one read from a blob file.
const READ_CHUNK: usize = 1 << 20;

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

/// Streams `len` bytes of `file` from `offset`.
pub fn file_range(file: Arc<File>, offset: u64, len: u64) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = ((end - pos) as usize).min(READ_CHUNK);
            let mut buf = BytesMut::zeroed(n);
            let r = match file.read_at(&mut buf, pos) {
                Ok(0) => Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "blob file shorter than expected")),
                Ok(k) => {
                    buf.truncate(k);
                    pos += k as u64;
                    Ok(buf.freeze())
                }
                Err(e) => Err(e),
            };
            let stop = r.is_err();
            if tx.blocking_send(r).is_err() || stop {
                return;
            }
        }
    });
    let stream = tokio_stream_from(rx).map(|r| r.map(Frame::data));
    BodyExt::boxed(StreamBody::new(stream))
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
