//! `raftyard import`: moves every repository, tag, manifest and blob of another registry into a
//! running raftyard through its API. The source is either the filesystem storage of CNCF
//! Distribution (`docker-registry`, `registry:2`: its `rootdirectory`), read directly, or any
//! registry reached through the distribution API (catalog, tags, manifests, blobs).
//!
//! Digests are verified on the way: a manifest here before it is sent, a blob by the receiving
//! registry while it streams (a wrong one is refused with `DIGEST_INVALID`, and the import
//! stops naming it). Blobs stream from the source file or response to the destination, never
//! whole in memory. What the destination already holds (a blob, a manifest, a tag naming the
//! same digest) is skipped, so an import is idempotent: run it again to finish one that was
//! interrupted. `backup restore --repo` pushes through the same code.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use futures::{StreamExt as _, TryStreamExt as _};
use indicatif::{ProgressBar, ProgressStyle};
use raftyard_blobstore::BlobStore;
use raftyard_types::access::RepoGlob;
use raftyard_types::Digest;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::StatusCode;

/// Every manifest type a source may hold, for `Accept`.
const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Blobs pushed at once.
const PARALLEL_BLOBS: usize = 4;

/// One repository as a source holds it.
#[derive(Default)]
pub struct Content {
    /// Blob digests and sizes.
    pub blobs: Vec<(Digest, u64)>,
    /// Manifests: digest, media type, bytes.
    pub manifests: Vec<(Digest, String, Vec<u8>)>,
    /// Tags and the digest each names.
    pub tags: Vec<(String, Digest)>,
}

/// Where blob bodies come from.
pub enum BlobSource {
    /// A raftyard blob store (a backup directory).
    Store(Arc<BlobStore>),
    /// Distribution's storage: `<root>/docker/registry/v2`.
    Distribution(PathBuf),
    /// A registry through its API.
    Registry(Arc<SourceRegistry>),
}

impl BlobSource {
    async fn body(&self, repo: &str, d: &Digest, size: u64) -> anyhow::Result<reqwest::Body> {
        let file = match self {
            BlobSource::Store(store) => store.path_of(d),
            BlobSource::Distribution(v2) => distribution_blob(v2, d),
            BlobSource::Registry(src) => {
                let resp = src.get(&format!("/v2/{repo}/blobs/{d}"), &pull_scope(repo), None).await?;
                anyhow::ensure!(resp.status() == StatusCode::OK, "source: blob {d} of {repo}: {}", resp.status());
                return Ok(reqwest::Body::wrap_stream(resp.bytes_stream()));
            }
        };
        let f = tokio::fs::File::open(&file).await.with_context(|| format!("blob {d}: {}", file.display()))?;
        let len = f.metadata().await?.len();
        anyhow::ensure!(len == size, "blob {d}: {} holds {len} bytes, {size} expected", file.display());
        Ok(reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(f, 1 << 20)))
    }
}

/// What pushing one repository did.
#[derive(Default, Debug)]
pub struct Pushed {
    pub blobs: usize,
    pub blobs_pushed: usize,
    pub bytes_pushed: u64,
    pub manifests: usize,
    pub tags: usize,
}

/// A progress bar of bytes.
pub fn bytes_bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Pushes one repository to the registry at `base`: blobs it lacks (streamed from `source`),
/// then manifests (an index after the manifests it names), then tags. Advances `bar` by the
/// bytes of every blob, pushed or found there.
pub async fn push_repository(
    http: &reqwest::Client,
    base: &str,
    repo: &str,
    content: &Content,
    source: &BlobSource,
    bar: &ProgressBar,
) -> anyhow::Result<Pushed> {
    let mut out = Pushed { blobs: content.blobs.len(), ..Pushed::default() };
    let pushed: Vec<Option<u64>> = futures::stream::iter(content.blobs.iter())
        .map(|(d, size)| async move {
            let url = format!("{base}/v2/{repo}/blobs/{d}");
            if http.head(&url).send().await.is_ok_and(|r| r.status() == StatusCode::OK) {
                bar.inc(*size);
                return Ok(None);
            }
            let body = source.body(repo, d, *size).await?;
            let resp = http
                .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"))
                .header(CONTENT_TYPE, "application/octet-stream")
                .header("content-length", size.to_string())
                .body(body)
                .send()
                .await
                .with_context(|| format!("pushing blob {d} to {repo}"))?;
            if resp.status() != StatusCode::CREATED {
                bail!("pushing blob {d} to {repo}: {} {}", resp.status(), resp.text().await.unwrap_or_default());
            }
            bar.inc(*size);
            Ok(Some(*size))
        })
        .buffer_unordered(PARALLEL_BLOBS)
        .try_collect()
        .await?;
    for size in pushed.into_iter().flatten() {
        out.blobs_pushed += 1;
        out.bytes_pushed += size;
    }
    // manifests: one naming a manifest not pushed yet (400) waits for a later pass
    let mut left: Vec<&(Digest, String, Vec<u8>)> = content.manifests.iter().collect();
    while !left.is_empty() {
        let mut later = Vec::new();
        let before = left.len();
        for m in left {
            let (d, media_type, bytes) = m;
            let url = format!("{base}/v2/{repo}/manifests/{d}");
            if head_digest(http, &url).await.as_deref() == Some(d.to_string().as_str()) {
                out.manifests += 1;
                continue;
            }
            let resp = http.put(&url).header(CONTENT_TYPE, media_type).body(bytes.clone()).send().await?;
            match resp.status().as_u16() {
                201 => out.manifests += 1,
                400 => later.push(m),
                s => bail!("pushing manifest {d} to {repo}: {s} {}", resp.text().await.unwrap_or_default()),
            }
        }
        if later.len() == before {
            let names: Vec<String> = later.iter().map(|(d, ..)| d.to_string()).collect();
            bail!("{repo}: {} manifests refer to content the source does not hold: {}", later.len(), names.join(", "));
        }
        left = later;
    }
    let by_digest: HashMap<&Digest, (&String, &Vec<u8>)> =
        content.manifests.iter().map(|(d, t, b)| (d, (t, b))).collect();
    for (tag, d) in &content.tags {
        let (media_type, bytes) =
            by_digest.get(d).with_context(|| format!("{repo}: tag {tag} names {d}, which the source does not hold"))?;
        let url = format!("{base}/v2/{repo}/manifests/{tag}");
        if head_digest(http, &url).await.as_deref() != Some(d.to_string().as_str()) {
            let resp = http.put(&url).header(CONTENT_TYPE, *media_type).body((*bytes).clone()).send().await?;
            if resp.status() != StatusCode::CREATED {
                bail!("tagging {repo}:{tag}: {} {}", resp.status(), resp.text().await.unwrap_or_default());
            }
        }
        out.tags += 1;
    }
    Ok(out)
}

/// The digest the registry answers for a manifest, if it has it.
async fn head_digest(http: &reqwest::Client, url: &str) -> Option<String> {
    let r = http.head(url).header(ACCEPT, MANIFEST_TYPES).send().await.ok()?;
    if r.status() != StatusCode::OK {
        return None;
    }
    r.headers().get("docker-content-digest")?.to_str().ok().map(str::to_string)
}

/// What a manifest refers to: blobs (with sizes) and child manifests.
#[derive(Default)]
struct Refs {
    blobs: Vec<(Digest, u64)>,
    children: Vec<Digest>,
}

/// The media type of a manifest (from its `mediaType`, else from its shape) and what it names.
fn inspect(bytes: &[u8]) -> anyhow::Result<(String, Refs)> {
    let v: serde_json::Value = serde_json::from_slice(bytes).context("not JSON")?;
    if v["schemaVersion"].as_u64() == Some(1) {
        bail!("a schema 1 manifest (deprecated, refused by the OCI distribution spec)");
    }
    let media_type = match v["mediaType"].as_str() {
        Some(t) => t.to_string(),
        None if v.get("manifests").is_some() => OCI_INDEX.to_string(),
        None => OCI_MANIFEST.to_string(),
    };
    let desc = |d: &serde_json::Value| -> Option<(Digest, u64)> {
        // a non-distributable layer is fetched by clients from its urls, not the registry
        if d.get("urls").is_some()
            && d["mediaType"].as_str().is_some_and(|t| t.contains("foreign") || t.contains("nondistributable"))
        {
            return None;
        }
        Some((Digest::parse(d["digest"].as_str()?).ok()?, d["size"].as_u64()?))
    };
    let mut refs = Refs::default();
    if let Some(c) = v.get("config").and_then(desc) {
        refs.blobs.push(c);
    }
    for l in v["layers"].as_array().into_iter().flatten() {
        refs.blobs.extend(desc(l));
    }
    for m in v["manifests"].as_array().into_iter().flatten() {
        if let Some((d, _)) = desc(m) {
            refs.children.push(d);
        }
    }
    Ok((media_type, refs))
}

/// `<root>/docker/registry/v2/blobs/<alg>/<2 hex>/<hex>/data`.
fn distribution_blob(v2: &Path, d: &Digest) -> PathBuf {
    v2.join("blobs").join(d.algorithm().as_str()).join(&d.hex()[..2]).join(d.hex()).join("data")
}

/// The digest in a Distribution `link` file.
fn read_link(path: &Path) -> anyhow::Result<Digest> {
    let s = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Digest::parse(s.trim()).with_context(|| format!("{}: not a digest", path.display()))
}

/// The digests linked under `dir/<alg>/<hex>/link`.
fn links_under(dir: &Path) -> anyhow::Result<Vec<Digest>> {
    let mut out = Vec::new();
    let Ok(algs) = std::fs::read_dir(dir) else { return Ok(out) };
    for alg in algs {
        for e in std::fs::read_dir(alg?.path())? {
            let link = e?.path().join("link");
            if link.exists() {
                out.push(read_link(&link)?);
            }
        }
    }
    Ok(out)
}

/// Distribution's storage under `root` (its `rootdirectory`).
pub struct DistributionDir {
    v2: PathBuf,
}

impl DistributionDir {
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        let v2 = root.join("docker/registry/v2");
        anyhow::ensure!(
            v2.join("repositories").is_dir() || v2.join("blobs").is_dir(),
            "{} holds no Distribution storage (no docker/registry/v2 inside)",
            root.display()
        );
        Ok(DistributionDir { v2 })
    }

    /// Every repository: the directories under `repositories/` that hold `_manifests`.
    pub fn repositories(&self) -> anyhow::Result<Vec<String>> {
        let top = self.v2.join("repositories");
        let mut out = Vec::new();
        let mut dirs = vec![top.clone()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries {
                let p = e?.path();
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if !p.is_dir() || name.starts_with('_') {
                    continue;
                }
                if p.join("_manifests").is_dir() {
                    out.push(p.strip_prefix(&top)?.to_string_lossy().into_owned());
                }
                dirs.push(p);
            }
        }
        out.sort();
        Ok(out)
    }

    /// One repository: its manifests (every revision, read from the blob store and verified),
    /// the blobs it links and its manifests name, and its tags.
    pub fn repository(&self, repo: &str) -> anyhow::Result<(Content, Vec<String>)> {
        let dir = self.v2.join("repositories").join(repo);
        let mut warnings = Vec::new();
        let mut blobs: BTreeMap<Digest, u64> = BTreeMap::new();
        for d in links_under(&dir.join("_layers"))? {
            match std::fs::metadata(distribution_blob(&self.v2, &d)) {
                Ok(m) => {
                    blobs.insert(d, m.len());
                }
                Err(_) => warnings.push(format!("{repo}: blob {d} is linked but not stored; left out")),
            }
        }
        let mut content = Content::default();
        let mut kept = BTreeSet::new();
        for d in links_under(&dir.join("_manifests/revisions"))? {
            let path = distribution_blob(&self.v2, &d);
            let Ok(bytes) = std::fs::read(&path) else {
                warnings.push(format!("{repo}: manifest {d} is linked but not stored; left out"));
                continue;
            };
            anyhow::ensure!(
                Digest::of(d.algorithm(), &bytes) == d,
                "{repo}: manifest {d} is damaged ({} does not hash to its name)",
                path.display()
            );
            match inspect(&bytes) {
                Ok((media_type, refs)) => {
                    for (b, size) in refs.blobs {
                        blobs.entry(b).or_insert(size);
                    }
                    kept.insert(d.clone());
                    content.manifests.push((d, media_type, bytes));
                }
                Err(e) => warnings.push(format!("{repo}: manifest {d} left out: {e:#}")),
            }
        }
        let tags = dir.join("_manifests/tags");
        if let Ok(entries) = std::fs::read_dir(&tags) {
            for e in entries {
                let e = e?;
                let tag = e.file_name().to_string_lossy().into_owned();
                let link = e.path().join("current/link");
                if !link.exists() {
                    continue; // a deleted tag leaves its directory
                }
                let d = read_link(&link)?;
                if kept.contains(&d) {
                    content.tags.push((tag, d));
                } else {
                    warnings.push(format!("{repo}: tag {tag} names {d}, which is left out; tag left out"));
                }
            }
        }
        content.tags.sort();
        content.blobs = blobs.into_iter().collect();
        Ok((content, warnings))
    }

    pub fn blobs(&self) -> BlobSource {
        BlobSource::Distribution(self.v2.clone())
    }
}

/// The scope of pulling `repo`, in a token request.
fn pull_scope(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

/// A registry read through the distribution API, with Basic credentials or the Bearer token
/// flow (`WWW-Authenticate: Bearer realm=…,service=…`) when it asks for one.
pub struct SourceRegistry {
    base: String,
    http: reqwest::Client,
    login: Option<(String, String)>,
    /// Bearer tokens by scope.
    tokens: Mutex<HashMap<String, String>>,
}

impl SourceRegistry {
    pub fn new(base: &str, ca: Option<&Path>, login: Option<(String, String)>) -> anyhow::Result<Self> {
        let http = crate::http_client_as(Duration::from_secs(3600), ca, None)?;
        Ok(SourceRegistry { base: base.trim_end_matches('/').to_string(), http, login, tokens: Mutex::default() })
    }

    /// GET `path` (or an absolute URL), authenticating as the registry asks.
    async fn get(&self, path: &str, scope: &str, accept: Option<&str>) -> anyhow::Result<reqwest::Response> {
        let url = if path.starts_with("http") { path.to_string() } else { format!("{}{path}", self.base) };
        let send = |auth: Option<String>| {
            let mut req = self.http.get(&url);
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            if let Some(a) = auth {
                req = req.header(AUTHORIZATION, a);
            }
            req.send()
        };
        let cached = self.tokens.lock().unwrap().get(scope).cloned();
        let first = match cached {
            Some(t) => Some(format!("Bearer {t}")),
            None => self.basic(),
        };
        let resp = send(first).await.with_context(|| format!("source: GET {url}"))?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let Some(params) = challenge.strip_prefix("Bearer ") else {
            bail!(
                "source: {url}: 401 ({})",
                if self.login.is_some() { "credentials refused" } else { "credentials needed: --from-user" }
            );
        };
        let token = self.token(params, scope).await?;
        self.tokens.lock().unwrap().insert(scope.to_string(), token.clone());
        let resp = send(Some(format!("Bearer {token}"))).await?;
        anyhow::ensure!(resp.status() != StatusCode::UNAUTHORIZED, "source: {url}: 401 with a token for {scope}");
        Ok(resp)
    }

    fn basic(&self) -> Option<String> {
        use base64::Engine as _;
        self.login
            .as_ref()
            .map(|(u, p)| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))))
    }

    /// A token from the realm of a Bearer challenge.
    async fn token(&self, params: &str, scope: &str) -> anyhow::Result<String> {
        let mut realm = None;
        let mut query = vec![("scope".to_string(), scope.to_string())];
        for part in params.split(',') {
            let Some((k, v)) = part.trim().split_once('=') else { continue };
            let v = v.trim_matches('"').to_string();
            match k {
                "realm" => realm = Some(v),
                "service" => query.push(("service".into(), v)),
                _ => {}
            }
        }
        let realm = realm.context("source: a Bearer challenge without a realm")?;
        let mut req = self.http.get(&realm).query(&query);
        if let Some(b) = self.basic() {
            req = req.header(AUTHORIZATION, b);
        }
        let resp = req.send().await.with_context(|| format!("source: token from {realm}"))?;
        anyhow::ensure!(resp.status() == StatusCode::OK, "source: token from {realm}: {}", resp.status());
        let v: serde_json::Value = resp.json().await?;
        v["token"].as_str().or(v["access_token"].as_str()).map(str::to_string).context("source: no token in the answer")
    }

    /// Every item of a paginated list (`_catalog` or `tags/list`), following `Link` headers.
    async fn list(&self, path: &str, field: &str, scope: &str) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        let mut next = Some(path.to_string());
        while let Some(p) = next.take() {
            let resp = self.get(&p, scope, None).await?;
            if resp.status() == StatusCode::NOT_FOUND && field == "tags" {
                break;
            }
            anyhow::ensure!(resp.status() == StatusCode::OK, "source: {p}: {}", resp.status());
            next = resp
                .headers()
                .get("link")
                .and_then(|v| v.to_str().ok())
                .and_then(|l| Some(l.split_once('<')?.1.split_once('>')?.0.to_string()));
            let v: serde_json::Value = resp.json().await?;
            out.extend(v[field].as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)));
        }
        Ok(out)
    }

    pub async fn repositories(&self) -> anyhow::Result<Vec<String>> {
        self.list("/v2/_catalog?n=1000", "repositories", "registry:catalog:*").await
    }

    /// One repository: every tag, the manifests they name (an index's children too), and the
    /// blobs those name. Untagged manifests are not listed by the API and stay behind.
    pub async fn repository(&self, repo: &str) -> anyhow::Result<(Content, Vec<String>)> {
        let scope = pull_scope(repo);
        let mut content = Content::default();
        let mut warnings = Vec::new();
        let mut blobs: BTreeMap<Digest, u64> = BTreeMap::new();
        // fetched, and of those the manifests imported (not left out with a warning)
        let (mut seen, mut kept): (BTreeSet<Digest>, BTreeSet<Digest>) = Default::default();
        let tags = self.list(&format!("/v2/{repo}/tags/list?n=1000"), "tags", &scope).await?;
        let mut queue: Vec<(String, Option<String>)> = tags.into_iter().map(|t| (t.clone(), Some(t))).collect();
        while let Some((reference, tag)) = queue.pop() {
            let resp = self.get(&format!("/v2/{repo}/manifests/{reference}"), &scope, Some(MANIFEST_TYPES)).await?;
            if resp.status() != StatusCode::OK {
                warnings.push(format!("{repo}: manifest {reference}: {}; left out", resp.status()));
                continue;
            }
            let bytes = resp.bytes().await?.to_vec();
            let d = match Digest::parse(&reference) {
                Ok(d) => {
                    anyhow::ensure!(
                        Digest::of(d.algorithm(), &bytes) == d,
                        "{repo}: manifest {d} does not hash to its digest"
                    );
                    d
                }
                Err(_) => Digest::sha256(&bytes),
            };
            if let Some(t) = tag {
                content.tags.push((t, d.clone()));
            }
            if !seen.insert(d.clone()) {
                continue;
            }
            match inspect(&bytes) {
                Ok((media_type, refs)) => {
                    for (b, size) in refs.blobs {
                        blobs.entry(b).or_insert(size);
                    }
                    for c in refs.children {
                        queue.push((c.to_string(), None));
                    }
                    kept.insert(d.clone());
                    content.manifests.push((d, media_type, bytes));
                }
                Err(e) => warnings.push(format!("{repo}: manifest {d} left out: {e:#}")),
            }
        }
        content.tags.retain(|(t, d)| {
            let ok = kept.contains(d);
            if !ok {
                warnings.push(format!("{repo}: tag {t} left out with its manifest"));
            }
            ok
        });
        content.tags.sort();
        content.blobs = blobs.into_iter().collect();
        Ok((content, warnings))
    }
}

/// Where an import reads from.
pub enum ImportFrom {
    Distribution(PathBuf),
    Registry { url: String, ca: Option<PathBuf>, login: Option<(String, String)> },
}

/// `raftyard import`: every repository of the source matching `only` into the registry at `to`.
pub async fn import(
    from: ImportFrom,
    to: &str,
    ca: Option<&Path>,
    login: Option<(String, String)>,
    only: Option<RepoGlob>,
) -> anyhow::Result<()> {
    let http = crate::http_client_as(Duration::from_secs(3600), ca, login.as_ref())?;
    let base = to.trim_end_matches('/');
    let r = http.get(format!("{base}/v2/")).send().await.with_context(|| format!("reaching {base}"))?;
    anyhow::ensure!(r.status() == StatusCode::OK, "{base}/v2/ answers {}: check --to and --user", r.status());

    // read every repository's content first: the bar then knows the bytes to move
    let scan = ProgressBar::new_spinner();
    scan.set_message("reading the source");
    let (source, repos): (BlobSource, Vec<(String, Content)>) = match from {
        ImportFrom::Distribution(root) => {
            let dir = DistributionDir::open(&root)?;
            let mut repos = Vec::new();
            for repo in dir.repositories()? {
                if only.as_ref().is_some_and(|g| !g.matches(&repo)) {
                    continue;
                }
                scan.set_message(format!("reading {repo}"));
                let (content, warnings) = dir.repository(&repo)?;
                warnings.iter().for_each(|w| scan.println(format!("warning: {w}")));
                repos.push((repo, content));
            }
            (dir.blobs(), repos)
        }
        ImportFrom::Registry { url, ca, login } => {
            let src = Arc::new(SourceRegistry::new(&url, ca.as_deref(), login)?);
            let mut repos = Vec::new();
            for repo in src.repositories().await? {
                if only.as_ref().is_some_and(|g| !g.matches(&repo)) {
                    continue;
                }
                scan.set_message(format!("reading {repo}"));
                let (content, warnings) = src.repository(&repo).await?;
                warnings.iter().for_each(|w| scan.println(format!("warning: {w}")));
                repos.push((repo, content));
            }
            (BlobSource::Registry(src), repos)
        }
    };
    scan.finish_and_clear();
    let total: u64 = repos.iter().flat_map(|(_, c)| c.blobs.iter().map(|(_, s)| *s)).sum();
    let bar = bytes_bar(total, &format!("{} repositories", repos.len()));
    let started = std::time::Instant::now();
    let mut sum = Pushed::default();
    for (repo, content) in &repos {
        bar.set_message(repo.clone());
        let p = push_repository(&http, base, repo, content, &source, &bar).await?;
        sum.blobs += p.blobs;
        sum.blobs_pushed += p.blobs_pushed;
        sum.bytes_pushed += p.bytes_pushed;
        sum.manifests += p.manifests;
        sum.tags += p.tags;
    }
    bar.finish_and_clear();
    println!(
        "imported {} repositories into {base} in {:.1} s: {} manifests, {} tags, {} blobs ({} pushed, {} MiB; the rest were there)",
        repos.len(),
        started.elapsed().as_secs_f64(),
        sum.manifests,
        sum.tags,
        sum.blobs,
        sum.blobs_pushed,
        sum.bytes_pushed >> 20
    );
    Ok(())
}
