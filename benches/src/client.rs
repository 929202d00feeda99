//! A minimal OCI distribution API client for the operations being measured.
//!
//! Every request has a timeout, every non-2xx status is an error that carries
//! the response body, and upload `Location` headers (absolute or relative) are
//! resolved against the server's base URL and always followed.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Client, RequestBuilder, Response, Url};

use crate::bulk::{self, BulkResponse};
use sha2::{Digest, Sha256};

/// Longest part of an error response body included in an error message.
const MAX_ERROR_BODY: usize = 2048;

pub struct RegistryClient {
    http: Client,
    base: Url,
    request_timeout: Duration,
    transfer_timeout: Duration,
}

impl RegistryClient {
    pub fn new(base: Url, request_timeout: Duration, transfer_timeout: Duration) -> Result<Self> {
        Ok(RegistryClient { http: http_client(request_timeout)?, base, request_timeout, transfer_timeout })
    }

    /// Monolithic push: `POST` an upload, then a single `PUT ?digest=` carrying
    /// the whole blob.
    pub async fn push_blob_monolithic(&self, repo: &str, data: &Bytes, digest: &str) -> Result<()> {
        let location = self.start_upload(repo).await?;
        let url = with_digest(location, digest);
        let resp =
            self.bulk("PUT", url, vec![("Content-Type", "application/octet-stream".into())], data.clone()).await?;
        expect_status(&resp, 201, "monolithic blob PUT")?;
        check_bulk_digest(&resp, digest)
    }

    /// Single-request push of a small blob: `POST /v2/<repo>/blobs/uploads/?digest=`
    /// carrying the whole blob, answered 201.
    pub async fn push_blob_single_post(&self, repo: &str, data: Bytes, digest: &str) -> Result<()> {
        let url = with_digest(self.url(&format!("/v2/{repo}/blobs/uploads/"))?, digest);
        let req = self
            .http
            .post(url)
            .timeout(self.request_timeout)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, data.len())
            .body(data);
        let resp = send(req, "single-POST blob upload").await?;
        if resp.status() != reqwest::StatusCode::CREATED {
            bail!("single-POST blob upload: status {} (expected 201 Created)", resp.status());
        }
        check_digest_header(&resp, digest)
    }

    /// Chunked push: `POST`, one `PATCH` per `chunk` bytes with an inclusive
    /// `Content-Range`, then `PUT ?digest=` with an empty body.
    pub async fn push_blob_chunked(&self, repo: &str, data: &Bytes, digest: &str, chunk: usize) -> Result<()> {
        let mut location = self.start_upload(repo).await?;
        let mut start = 0;
        while start < data.len() {
            let end = (start + chunk).min(data.len());
            let headers = vec![
                ("Content-Type", "application/octet-stream".to_string()),
                ("Content-Range", format!("{}-{}", start, end - 1)),
            ];
            let what = format!("blob PATCH bytes {}-{}", start, end - 1);
            let resp = self.bulk("PATCH", location.clone(), headers, data.slice(start..end)).await?;
            expect_status(&resp, 202, &what)?;
            let loc = resp.header("location").ok_or_else(|| anyhow!("{what}: no Location header"))?;
            location = self.base.join(loc).with_context(|| format!("{what}: bad Location {loc:?}"))?;
            start = end;
        }
        let req = self
            .http
            .put(with_digest(location, digest))
            .timeout(self.request_timeout)
            .header(CONTENT_LENGTH, 0)
            .body(Bytes::new());
        let resp = send(req, "chunked blob final PUT").await?;
        check_digest_header(&resp, digest)
    }

    /// `GET` a blob, reading and discarding the body; returns the byte count.
    pub async fn pull_blob(&self, repo: &str, digest: &str) -> Result<u64> {
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"))?;
        let resp = self.bulk("GET", url, vec![], Bytes::new()).await?;
        expect_status(&resp, 200, "blob GET")?;
        Ok(resp.body_len)
    }

    /// One bulk transfer on a blocking thread (see [`crate::bulk`]).
    async fn bulk(
        &self,
        method: &'static str,
        url: Url,
        headers: Vec<(&'static str, String)>,
        body: Bytes,
    ) -> Result<BulkResponse> {
        let timeout = self.transfer_timeout;
        tokio::task::spawn_blocking(move || bulk::request(method, &url, &headers, &body, timeout))
            .await
            .context("bulk transfer task")?
    }

    /// `PUT` a manifest by tag; returns the digest the server reported (or
    /// the locally computed one if the server sent none).
    pub async fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, body: Bytes) -> Result<String> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"))?;
        let expected = sha256_digest(&body);
        let req = self.http.put(url).timeout(self.request_timeout).header(CONTENT_TYPE, media_type).body(body);
        let resp = send(req, "manifest PUT").await?;
        check_digest_header(&resp, &expected)?;
        Ok(expected)
    }

    /// `GET` a manifest with the given `Accept` type; returns the body.
    pub async fn get_manifest(&self, repo: &str, reference: &str, accept: &str) -> Result<Bytes> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"))?;
        let req = self.http.get(url).timeout(self.request_timeout).header(ACCEPT, accept);
        let resp = send(req, "manifest GET").await?;
        resp.bytes().await.context("reading manifest GET body")
    }

    async fn start_upload(&self, repo: &str) -> Result<Url> {
        let url = self.url(&format!("/v2/{repo}/blobs/uploads/"))?;
        let req = self.http.post(url).timeout(self.request_timeout).header(CONTENT_LENGTH, 0).body(Bytes::new());
        let resp = send(req, "blob upload POST").await?;
        self.location(&resp, "blob upload POST")
    }

    fn location(&self, resp: &Response, what: &str) -> Result<Url> {
        let value = resp
            .headers()
            .get(LOCATION)
            .ok_or_else(|| anyhow!("{what}: response {} has no Location header", resp.status()))?;
        let value = value.to_str().with_context(|| format!("{what}: Location header is not ASCII"))?;
        self.base.join(value).with_context(|| format!("{what}: cannot resolve Location {value:?}"))
    }

    fn url(&self, path: &str) -> Result<Url> {
        self.base.join(path).with_context(|| format!("building URL for {path}"))
    }
}

/// The HTTP client shared by readiness probes and workloads of one server.
pub fn http_client(request_timeout: Duration) -> Result<Client> {
    Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .timeout(request_timeout.max(Duration::from_secs(1)))
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .context("building HTTP client")
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Sends `req`; transport errors and non-2xx statuses become errors that
/// name the operation and, for statuses, include the response body.
async fn send(req: RequestBuilder, what: &str) -> Result<Response> {
    let resp = req.send().await.with_context(|| format!("{what} failed"))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let url = resp.url().clone();
    let body = match resp.text().await {
        Ok(text) if text.len() > MAX_ERROR_BODY => {
            let mut cut = MAX_ERROR_BODY;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            format!("{}… ({} bytes)", &text[..cut], text.len())
        }
        Ok(text) if text.trim().is_empty() => "(empty body)".to_string(),
        Ok(text) => text,
        Err(err) => format!("(body unreadable: {err})"),
    };
    bail!("{what} {url} answered {status}: {}", body.trim_end())
}

fn check_digest_header(resp: &Response, expected: &str) -> Result<()> {
    if let Some(got) = resp.headers().get("Docker-Content-Digest") {
        let got = got.to_str().unwrap_or("<non-ascii>");
        if got != expected {
            bail!("server reported digest {got}, expected {expected}");
        }
    }
    Ok(())
}

fn expect_status(resp: &BulkResponse, want: u16, what: &str) -> Result<()> {
    if resp.status != want {
        bail!(
            "{what}: status {} (expected {want}): {}",
            resp.status,
            String::from_utf8_lossy(&resp.body[..resp.body.len().min(MAX_ERROR_BODY)])
        );
    }
    Ok(())
}

fn check_bulk_digest(resp: &BulkResponse, expected: &str) -> Result<()> {
    match resp.header("docker-content-digest") {
        Some(d) if d != expected => bail!("server reported digest {d}, expected {expected}"),
        _ => Ok(()),
    }
}

fn with_digest(mut url: Url, digest: &str) -> Url {
    let query = match url.query() {
        Some(q) if !q.is_empty() => format!("{q}&digest={digest}"),
        _ => format!("digest={digest}"),
    };
    url.set_query(Some(&query));
    url
}
