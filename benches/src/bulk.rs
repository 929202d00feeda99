//! Bulk transfers over plain HTTP/1.1 on a dedicated blocking socket, with large writes and
//! a reused read buffer. A general-purpose async client spends more CPU per byte than the
//! servers under test once they stream at several GB/s, which would make the client, not
//! the registry, the measured bottleneck; both registries are measured with this same path.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use reqwest::Url;

/// Size of one `write` of a request body.
const WRITE_PIECE: usize = 8 << 20;
/// Size of the reused response read buffer.
const READ_BUF: usize = 1 << 20;

/// The parts of a response the benchmark needs.
pub struct BulkResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body when it is small (errors, empty answers); bulk bodies are only counted.
    pub body: Vec<u8>,
    pub body_len: u64,
}

impl BulkResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Sends one request with `body` on a new connection and reads the whole response.
pub fn request(
    method: &str,
    url: &Url,
    headers: &[(&str, String)],
    body: &[u8],
    timeout: Duration,
) -> Result<BulkResponse> {
    let host = url.host_str().ok_or_else(|| anyhow!("URL without host: {url}"))?;
    let port = url.port_or_known_default().unwrap_or(80);
    let mut s = TcpStream::connect((host, port)).with_context(|| format!("connecting to {host}:{port}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let path = match url.query() {
        Some(q) => format!("{}?{}", url.path(), q),
        None => url.path().to_string(),
    };
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    for piece in body.chunks(WRITE_PIECE) {
        s.write_all(piece).context("writing request body")?;
    }
    read_response(&mut s, method == "HEAD")
}

fn read_response(s: &mut TcpStream, head_only: bool) -> Result<BulkResponse> {
    let mut buf = vec![0u8; READ_BUF];
    let mut filled = 0;
    let (status, headers, head_len) = loop {
        let n = s.read(&mut buf[filled..]).context("reading response head")?;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        filled += n;
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Response::new(&mut hs);
        if let httparse::Status::Complete(len) = r.parse(&buf[..filled]).context("parsing response head")? {
            let headers: Vec<(String, String)> =
                r.headers.iter().map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned())).collect();
            break (r.code.unwrap_or(0), headers, len);
        }
        if filled == buf.len() {
            bail!("response head too large");
        }
    };
    let content_length: Option<u64> =
        headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")).and_then(|(_, v)| v.trim().parse().ok());
    let mut resp = BulkResponse { status, headers, body: Vec::new(), body_len: 0 };
    if head_only || status == 204 || status == 304 {
        return Ok(resp);
    }
    let already = (filled - head_len) as u64;
    let keep_small = |resp: &mut BulkResponse, bytes: &[u8]| {
        if resp.body.len() < 64 * 1024 {
            resp.body.extend_from_slice(&bytes[..bytes.len().min(64 * 1024 - resp.body.len())]);
        }
    };
    keep_small(&mut resp, &buf[head_len..filled]);
    resp.body_len = already;
    let want = content_length;
    while want.is_none_or(|w| resp.body_len < w) {
        let n = s.read(&mut buf).context("reading response body")?;
        if n == 0 {
            if let Some(w) = want {
                bail!("connection closed after {} of {w} body bytes", resp.body_len);
            }
            break;
        }
        resp.body_len += n as u64;
        keep_small(&mut resp, &buf[..n]);
    }
    Ok(resp)
}
