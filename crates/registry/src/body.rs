//! Response bodies: small in-memory bodies and blob files streamed in large chunks from a
//! blocking reader (bounded channel: memory does not grow with blob size).

use std::fs::File;
use std::os::unix::fs::FileExt;

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

/// Streams `len` bytes of `file` from `offset`.
pub fn file_range(file: File, offset: u64, len: u64) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = ((end - pos) as usize).min(READ_CHUNK);
            let mut buf = BytesMut::zeroed(n);
            let r = match file.read_at(&mut buf, pos) {
                Ok(0) => Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "blob file shorter than expected",
                )),
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
