//! The plain-HTTP/1.1 fast path: bodiless requests (every pull, most of a push's control
//! requests) are parsed here and answered through the same handlers, and blob bodies are sent
//! with `sendfile(2)` straight from the page cache to the socket, without copies through user
//! space. The first request that carries a body (or anything unusual: HTTP/1.0, HTTP/2,
//! `Expect`, `Upgrade`, an oversized or malformed head) hands the connection, with the bytes
//! already read, to hyper for the rest of its life.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::body::{Body, FileRange};
use crate::Registry;

/// Longest request head handled here; longer ones go to hyper (which refuses them).
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
/// Bytes handed to one `sendfile` call (bounds how long one call can block on disk reads).
const SENDFILE_CHUNK: usize = 8 << 20;

/// How the fast path ended.
pub(crate) enum Outcome {
    /// The connection is finished (closed by the client, `Connection: close`, an error, shutdown).
    Done,
    /// Continue with hyper on this stream, replaying `buffered` first.
    HandOff(Box<Prefixed<TcpStream>>),
}

/// A parsed request the fast path answers itself.
struct Simple {
    req: Request<Empty<Bytes>>,
    head_len: usize,
    close: bool,
}

#[allow(clippy::large_enum_variant)] // lives for one parse; boxing would cost an allocation per request
enum Parse {
    Partial,
    Simple(Simple),
    HandOff,
}

fn parse(buf: &[u8]) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut headers);
    let head_len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parse::Partial,
        _ => return Parse::HandOff,
    };
    if r.version != Some(1) {
        return Parse::HandOff;
    }
    let (Some(method), Some(path)) = (r.method, r.path) else {
        return Parse::HandOff;
    };
    let mut builder = Request::builder().method(method).uri(path).version(http::Version::HTTP_11);
    let mut close = false;
    for h in r.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
            || (name.eq_ignore_ascii_case("content-length") && h.value.iter().any(|&b| b != b'0' && b != b' '))
        {
            return Parse::HandOff;
        }
        if name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close") {
            close = true;
        }
        builder = builder.header(name, h.value);
    }
    match builder.body(Empty::new()) {
        Ok(req) => Parse::Simple(Simple { req, head_len, close }),
        Err(_) => Parse::HandOff,
    }
}

/// Serves requests on `stream` until it closes or needs hyper.
pub(crate) async fn serve(
    reg: &Registry,
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    first_timeout: Duration,
    idle_timeout: Duration,
    closing: &tokio_util::sync::CancellationToken,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Outcome {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut wait = first_timeout;
    loop {
        let simple = match read_head(&mut stream, &mut buf, wait, first_timeout, shutdown).await {
            Head::Simple(s) => s,
            Head::HandOff => return Outcome::HandOff(Box::new(Prefixed::new(buf.freeze(), stream))),
            Head::Done => return Outcome::Done,
        };
        buf.advance(simple.head_len);
        let head = simple.req.method() == http::Method::HEAD;
        let mut req = simple.req;
        req.extensions_mut().insert(crate::ClientAddr(peer.ip()));
        let mut resp = crate::handlers::respond(reg, req).await;
        if closing.is_cancelled() {
            // the last answer: it says `Connection: close`, then the sending side ends and what
            // the client may already have sent is taken, so that closing does not reset it away
            resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            let ok = write_response(&mut stream, resp, head).await.is_ok();
            if ok && stream.shutdown().await.is_ok() {
                let mut sink = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
            }
            return Outcome::Done;
        }
        if write_response(&mut stream, resp, head).await.is_err() || simple.close || shutdown.is_cancelled() {
            return Outcome::Done;
        }
        wait = idle_timeout;
    }
}

/// What reading a request head gave.
#[allow(clippy::large_enum_variant)] // lives for one request
enum Head {
    Simple(Simple),
    HandOff,
    Done,
}

/// Reads one request head into `buf`: its first byte within `wait` (a new connection's, or an
/// idle one's between requests), and the whole head within `head_timeout` of that first byte,
/// however the bytes trickle in (a deadline, not a timeout per read).
async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    wait: Duration,
    head_timeout: Duration,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Head {
    let now = tokio::time::Instant::now();
    let mut deadline = if buf.is_empty() { now + wait } else { now + head_timeout };
    loop {
        if !buf.is_empty() {
            match parse(buf) {
                Parse::Simple(s) => return Head::Simple(s),
                Parse::HandOff => return Head::HandOff,
                Parse::Partial => {}
            }
        }
        let was_empty = buf.is_empty();
        let read = tokio::select! {
            r = tokio::time::timeout_at(deadline, stream.read_buf(buf)) => r,
            _ = shutdown.cancelled(), if buf.is_empty() => return Head::Done,
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Head::Done,
            Ok(Ok(_)) if was_empty => deadline = tokio::time::Instant::now() + head_timeout,
            Ok(Ok(_)) => {}
        }
    }
}

async fn write_response(stream: &mut TcpStream, mut resp: Response<Body>, head: bool) -> io::Result<()> {
    let file = resp.extensions_mut().remove::<FileRange>();
    let has_len = resp.headers().contains_key(http::header::CONTENT_LENGTH);
    // a body of declared length is streamed after the head (a blob relayed from a peer may be
    // gigabytes); one without (small, built in memory) is gathered to give its length
    let stream_body = !head && file.is_none() && has_len;
    let body = if head || file.is_some() || stream_body {
        Bytes::new()
    } else {
        resp.body_mut().collect().await.map_err(io::Error::other)?.to_bytes()
    };
    let mut out = Vec::with_capacity(256);
    let status = resp.status();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (k, v) in resp.headers() {
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !has_len && status != http::StatusCode::NO_CONTENT && status != http::StatusCode::NOT_MODIFIED {
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    if !head {
        out.extend_from_slice(&body);
    }
    stream.write_all(&out).await?;
    if let Some(f) = file {
        send_file(stream, &f).await?;
    }
    if stream_body {
        // an error mid-body ends the connection: the client sees fewer bytes than declared
        while let Some(frame) = resp.body_mut().frame().await {
            if let Ok(data) = frame.map_err(io::Error::other)?.into_data() {
                stream.write_all(&data).await?;
            }
        }
    }
    Ok(())
}

/// Sends the range with `sendfile(2)`, waiting for socket writability between calls.
async fn send_file(stream: &TcpStream, f: &FileRange) -> io::Result<()> {
    let sock = stream.as_raw_fd();
    let fd = f.file.as_raw_fd();
    let mut off = f.offset as libc::off_t;
    let mut left = f.len as usize;
    while left > 0 {
        stream.writable().await?;
        let r = stream.try_io(Interest::WRITABLE, || {
            let n = left.min(SENDFILE_CHUNK);
            // SAFETY: both descriptors are open for the duration of the call; `off` is a valid
            // pointer to an off_t that the kernel advances.
            let r = unsafe { libc::sendfile(sock, fd, &mut off, n) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as usize)
            }
        });
        match r {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "blob file shorter than expected")),
            Ok(n) => left -= n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A stream that first yields bytes already read from it.
pub(crate) struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, b)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, b)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head trickled in a byte at a time does not hold the connection past the head
    /// deadline; a head that comes in time is read.
    #[tokio::test]
    async fn a_trickled_head_meets_its_deadline() {
        let stop = tokio_util::sync::CancellationToken::new();
        let (mut client, mut server) = tokio::io::duplex(1024);
        let trickle = tokio::spawn(async move {
            for b in b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: yes\r\n\r\n".iter() {
                if client.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let started = std::time::Instant::now();
        let mut buf = BytesMut::new();
        let head = read_head(&mut server, &mut buf, Duration::from_secs(5), Duration::from_millis(300), &stop).await;
        assert!(matches!(head, Head::Done));
        let took = started.elapsed();
        assert!(took < Duration::from_millis(600), "the trickle held the connection for {took:?}");
        trickle.abort();

        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = BytesMut::new();
        let head = read_head(&mut server, &mut buf, Duration::from_secs(5), Duration::from_millis(300), &stop).await;
        assert!(matches!(head, Head::Simple(s) if s.req.uri().path() == "/v2/"));
    }

    #[test]
    fn parses_bodiless_requests_and_hands_off_the_rest() {
        let head = b"GET /v2/a/blobs/sha256:x HTTP/1.1\r\nHost: h\r\nRange: bytes=0-1\r\n\r\n";
        match parse(&[head.as_slice(), b"GET /next"].concat()) {
            Parse::Simple(s) => {
                assert_eq!(s.req.uri().path(), "/v2/a/blobs/sha256:x");
                assert_eq!(s.req.headers()["range"], "bytes=0-1");
                assert_eq!(s.head_len, head.len());
                assert!(!s.close);
            }
            _ => panic!("expected a simple request"),
        }
        assert!(matches!(parse(b"GET /v2/ HTTP/1.1\r\nHost"), Parse::Partial));
        assert!(matches!(
            parse(b"GET /v2/ HTTP/1.1\r\nConnection: close\r\n\r\n"),
            Parse::Simple(Simple { close: true, .. })
        ));
        assert!(matches!(parse(b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"), Parse::HandOff));
        assert!(matches!(parse(b"PUT /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n"), Parse::Simple(_)));
        assert!(matches!(parse(b"PATCH /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), Parse::HandOff));
        assert!(matches!(parse(b"GET / HTTP/1.0\r\n\r\n"), Parse::HandOff));
        assert!(matches!(parse(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Parse::HandOff));
        assert!(matches!(parse(b"\x16\x03\x01 garbage"), Parse::HandOff));
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert!(matches!(parse(huge.as_bytes()), Parse::HandOff));
    }
}
