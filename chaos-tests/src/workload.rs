//! The load: concurrent clients against random nodes, recording every operation.
//!
//! - tags `k0..kN` of repository `chaos/reg` are registers: a write PUTs a fresh manifest
//!   under the tag (the value is its digest), a delete DELETEs the tag, a read GETs it;
//! - blobs are pushed to `chaos/blobs` (random sizes, sha256 or sha512, monolithic or chunked)
//!   and pulled back; a pull that answers 200 with other bytes, or 404 for an acknowledged
//!   blob, is a violation on the spot. With collections in the mix (the `gc` fault), each blob
//!   is then referenced by a manifest pushed by digest, and counts as acknowledged once that
//!   manifest is: a blob no manifest references may be collected;
//! - blobs and manifests are pushed to `chaos/gone` and deleted by digest; a read of one,
//!   invoked after its delete was acknowledged, that answers 200 is a stale read (a violation
//!   on the spot), and each must be gone from every node at the end.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;
use sha2::Digest as _;

pub const REG_REPO: &str = "chaos/reg";
pub const BLOB_REPO: &str = "chaos/blobs";
pub const GONE_REPO: &str = "chaos/gone";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    Write,
    Delete,
    Read,
}

/// How an operation ended: `Ok` (acknowledged, or read with a value) or `Info` (any other
/// answer, a timeout or a reset: it may or may not have taken effect). Reads without an answer
/// are not recorded: they change nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    Ok,
    Info,
}

#[derive(Debug, Clone, Serialize)]
pub struct Op {
    pub client: usize,
    pub node: u64,
    pub kind: Kind,
    pub key: String,
    /// Written value, or the value read (`None`: absent).
    pub value: Option<String>,
    pub invoke_us: u64,
    pub complete_us: u64,
    pub outcome: Outcome,
}

/// A blob or manifest of [`GONE_REPO`] whose delete by digest was acknowledged.
#[derive(Debug, Clone, Serialize)]
pub struct Deleted {
    /// `blobs` or `manifests`: the path segment it is read under.
    pub what: &'static str,
    pub digest: String,
    /// When the delete was acknowledged (µs since the start).
    pub acked_us: u64,
    pub node: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AckedBlob {
    pub digest: String,
    pub size: usize,
    pub node: u64,
}

/// Everything the clients saw.
#[derive(Default)]
pub struct History {
    pub ops: Vec<Op>,
    pub blobs: Vec<AckedBlob>,
    /// Acknowledged manifests: digest → bytes.
    pub manifests: Vec<(String, Vec<u8>)>,
    pub deleted: Vec<Deleted>,
    /// Pushed to [`GONE_REPO`], to be deleted: (what, digest, acknowledged at µs).
    pub to_delete: Vec<(&'static str, String, u64)>,
    pub violations: Vec<String>,
    /// (invoke, completion) times (µs) of the availability probe's acknowledged writes.
    pub write_oks: Vec<(u64, u64)>,
    pub blob_ops: u64,
}

pub struct Load {
    /// Collections run during the load: blobs are kept by manifests (see the module doc).
    pub gc: bool,
    pub keys: usize,
    pub nodes: Vec<(u64, String)>,
    pub config_digest: String,
    pub config_len: usize,
}

impl Load {
    /// A fresh manifest (its own digest, thanks to the annotation `name = value`) whose config
    /// is the blob pushed by [`setup`].
    /// A manifest by digest whose one layer is the blob `digest` (`size` bytes).
    fn holding(&self, digest: &str, size: usize) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": self.config_digest, "size": self.config_len},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size}],
        }))
        .expect("json")
    }

    fn manifest(&self, name: &str, value: String) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": self.config_digest, "size": self.config_len},
            "layers": [],
            "annotations": {name: value}
        }))
        .expect("json")
    }
}

/// `sha512:…` or (anything else) `sha256:…` of `b`.
pub fn digest_of(alg: &str, b: &[u8]) -> String {
    match alg {
        "sha512" => format!("sha512:{}", hex::encode(sha2::Sha512::digest(b))),
        _ => format!("sha256:{}", hex::encode(sha2::Sha256::digest(b))),
    }
}

/// Pushes the config blob every manifest refers to (to the tag and the delete repositories);
/// returns (digest, length).
pub async fn setup(http: &reqwest::Client, node: &str) -> anyhow::Result<(String, usize)> {
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
    let d = digest_of("sha256", &config);
    for repo in [REG_REPO, GONE_REPO, BLOB_REPO] {
        let mut pushed = false;
        for _ in 0..100 {
            if push_blob(http, node, repo, &config, &d, false).await == Some(true) {
                pushed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::ensure!(pushed, "could not push the config blob to {node}/{repo}");
    }
    Ok((d, config.len()))
}

/// `Some(true)`: 201; `Some(false)`: refused; `None`: no answer.
async fn push_blob(
    http: &reqwest::Client,
    node: &str,
    repo: &str,
    data: &[u8],
    digest: &str,
    chunked: bool,
) -> Option<bool> {
    let r = http.post(format!("http://{node}/v2/{repo}/blobs/uploads/")).timeout(TIMEOUT).send().await.ok()?;
    if r.status() != 202 {
        return Some(false);
    }
    let mut loc = r.headers().get("location")?.to_str().ok()?.to_string();
    let abs = |l: &str| if l.starts_with("http") { l.to_string() } else { format!("http://{node}{l}") };
    let mut body = data;
    if chunked && data.len() > 1 {
        let mut off = 0;
        for piece in data.chunks(data.len().div_ceil(3)) {
            let r = http
                .patch(abs(&loc))
                .header("content-range", format!("{}-{}", off, off + piece.len() - 1))
                .header("content-type", "application/octet-stream")
                .body(piece.to_vec())
                .timeout(TIMEOUT)
                .send()
                .await
                .ok()?;
            if r.status() != 202 {
                return Some(false);
            }
            loc = r.headers().get("location")?.to_str().ok()?.to_string();
            off += piece.len();
        }
        body = &[];
    }
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = http
        .put(format!("{}{sep}digest={digest}", abs(&loc)))
        .header("content-type", "application/octet-stream")
        .body(body.to_vec())
        .timeout(TIMEOUT)
        .send()
        .await
        .ok()?;
    Some(r.status() == 201)
}

/// Reads `g` (invoked at `invoke` µs) through `addr`: a violation if it is served although its
/// delete was acknowledged before the read began.
async fn read_deleted(http: &reqwest::Client, node: u64, addr: &str, g: &Deleted, invoke: u64) -> Option<String> {
    let r = http
        .get(format!("http://{addr}/v2/{GONE_REPO}/{}/{}", g.what, g.digest))
        .header("accept", OCI_MANIFEST)
        .timeout(TIMEOUT)
        .send()
        .await;
    // (a delete acknowledged after this read was invoked is concurrent with it)
    (r.is_ok_and(|r| r.status() == 200) && g.acked_us < invoke).then(|| {
        format!(
            "node {node}: {} {} answered 200 at {invoke} µs, after its delete was acknowledged at {} µs (via node {})",
            g.what, g.digest, g.acked_us, g.node
        )
    })
}

/// Runs client `c` until `stop`; records into `history`.
pub async fn client(
    c: usize,
    seed: u64,
    load: Arc<Load>,
    http: reqwest::Client,
    start: Instant,
    stop: Stop,
    history: Arc<Mutex<History>>,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let now = || start.elapsed().as_micros() as u64;
    let mut n = 0u64;
    while !stop.is_set() {
        n += 1;
        let (node, addr) = load.nodes[rng.gen_range(0..load.nodes.len())].clone();
        let key = format!("k{}", rng.gen_range(0..load.keys));
        let roll: u32 = rng.gen_range(0..100);
        let url = format!("http://{addr}/v2/{REG_REPO}/manifests/{key}");
        let invoke = now();
        let op = |kind, value, outcome| Op {
            client: c,
            node,
            kind,
            key: key.clone(),
            value,
            invoke_us: invoke,
            complete_us: now(),
            outcome,
        };
        if roll < 40 {
            let m = load.manifest("chaos.op", format!("c{c}-{n}-{seed}"));
            let d = digest_of("sha256", &m);
            let r = http.put(&url).header("content-type", OCI_MANIFEST).body(m.clone()).timeout(TIMEOUT).send().await;
            let outcome = match &r {
                Ok(r) if r.status() == 201 => Outcome::Ok,
                // refused by a node that could not commit: it may still have been proposed
                Ok(_) | Err(_) => Outcome::Info,
            };
            let mut h = history.lock().unwrap();
            if outcome == Outcome::Ok {
                h.manifests.push((d.clone(), m));
            }
            h.ops.push(op(Kind::Write, Some(d), outcome));
        } else if roll < 75 {
            let r = http.get(&url).header("accept", OCI_MANIFEST).timeout(TIMEOUT).send().await;
            let seen = match r {
                Ok(r) if r.status() == 200 => {
                    let header =
                        r.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(String::from);
                    match r.bytes().await {
                        Ok(b) => {
                            let d = digest_of("sha256", &b);
                            if header.as_deref() != Some(d.as_str()) {
                                history.lock().unwrap().violations.push(format!(
                                    "node {node}: manifest of tag {key} has digest {d} but Docker-Content-Digest {header:?}"
                                ));
                            }
                            Some(Some(d))
                        }
                        Err(_) => None,
                    }
                }
                Ok(r) if r.status() == 404 => Some(None),
                _ => None,
            };
            if let Some(v) = seen {
                history.lock().unwrap().ops.push(op(Kind::Read, v, Outcome::Ok));
            }
        } else if roll < 85 {
            let r = http.delete(&url).timeout(TIMEOUT).send().await;
            let o = match &r {
                Ok(r) if r.status() == 202 => op(Kind::Delete, None, Outcome::Ok),
                // 404: the delete found the tag absent — an observation, like a read of nothing
                Ok(r) if r.status() == 404 => op(Kind::Read, None, Outcome::Ok),
                _ => op(Kind::Delete, None, Outcome::Info),
            };
            history.lock().unwrap().ops.push(o);
        } else if roll < 91 {
            let size = if rng.gen_ratio(1, 10) { rng.gen_range(1..4 << 20) } else { rng.gen_range(0..256 << 10) };
            let mut data = vec![0u8; size];
            rng.fill_bytes(&mut data);
            let alg = if rng.gen_bool(0.3) { "sha512" } else { "sha256" };
            let d = digest_of(alg, &data);
            let chunked = rng.gen_bool(0.4);
            let mut acked = push_blob(&http, &addr, BLOB_REPO, &data, &d, chunked).await == Some(true);
            if acked && load.gc {
                let m = load.holding(&d, size);
                let md = digest_of("sha256", &m);
                let r = http
                    .put(format!("http://{addr}/v2/{BLOB_REPO}/manifests/{md}"))
                    .header("content-type", OCI_MANIFEST)
                    .body(m)
                    .timeout(TIMEOUT)
                    .send()
                    .await;
                acked = r.is_ok_and(|r| r.status() == 201);
            }
            let mut h = history.lock().unwrap();
            h.blob_ops += 1;
            if acked {
                h.blobs.push(AckedBlob { digest: d, size, node });
            }
        } else if roll < 93 {
            // push a blob or a manifest to GONE_REPO; or delete one pushed at least 300 ms ago
            // (so that every node has it) by digest, then read it through another node
            let old = {
                let mut h = history.lock().unwrap();
                let ripe = h.to_delete.iter().position(|p| p.2 + 300_000 <= invoke);
                ripe.filter(|_| rng.gen_bool(0.6)).map(|i| h.to_delete.swap_remove(i))
            };
            if let Some((what, d, _)) = old {
                let r = http.delete(format!("http://{addr}/v2/{GONE_REPO}/{what}/{d}")).timeout(TIMEOUT).send().await;
                let mut ops = 1;
                if r.is_ok_and(|r| r.status() == 202) {
                    let g = Deleted { what, digest: d, acked_us: now(), node };
                    history.lock().unwrap().deleted.push(g.clone());
                    // at once, through another node: the likeliest stale read
                    let (other, addr) = load.nodes[rng.gen_range(0..load.nodes.len())].clone();
                    ops += 1;
                    if let Some(v) = read_deleted(&http, other, &addr, &g, now()).await {
                        history.lock().unwrap().violations.push(v);
                    }
                }
                history.lock().unwrap().blob_ops += ops;
                continue;
            }
            let manifest = rng.gen_bool(0.5);
            let (what, pushed, d) = if manifest {
                let m = load.manifest("chaos.gone", format!("c{c}-{n}-{seed}"));
                let d = digest_of("sha256", &m);
                let r = http
                    .put(format!("http://{addr}/v2/{GONE_REPO}/manifests/{d}"))
                    .header("content-type", OCI_MANIFEST)
                    .body(m)
                    .timeout(TIMEOUT)
                    .send()
                    .await;
                ("manifests", r.is_ok_and(|r| r.status() == 201), d)
            } else {
                let mut data = vec![0u8; rng.gen_range(1..64 << 10)];
                rng.fill_bytes(&mut data);
                let d = digest_of(if rng.gen_bool(0.3) { "sha512" } else { "sha256" }, &data);
                ("blobs", push_blob(&http, &addr, GONE_REPO, &data, &d, rng.gen_bool(0.4)).await == Some(true), d)
            };
            let mut h = history.lock().unwrap();
            h.blob_ops += 1;
            if pushed {
                let at = now();
                h.to_delete.push((what, d, at));
            }
        } else if roll < 96 {
            // read something whose delete was acknowledged: it must be gone
            let pick = {
                let h = history.lock().unwrap();
                (!h.deleted.is_empty()).then(|| h.deleted[rng.gen_range(0..h.deleted.len())].clone())
            };
            let Some(g) = pick else { continue };
            let v = read_deleted(&http, node, &addr, &g, invoke).await;
            let mut h = history.lock().unwrap();
            h.blob_ops += 1;
            h.violations.extend(v);
        } else {
            let pick = {
                let h = history.lock().unwrap();
                (!h.blobs.is_empty()).then(|| h.blobs[rng.gen_range(0..h.blobs.len())].clone())
            };
            let Some(b) = pick else { continue };
            let r = http.get(format!("http://{addr}/v2/{BLOB_REPO}/blobs/{}", b.digest)).timeout(TIMEOUT).send().await;
            let violation = match r {
                Ok(r) if r.status() == 200 => match r.bytes().await {
                    Ok(body) => {
                        let alg = b.digest.split(':').next().unwrap_or("sha256");
                        (digest_of(alg, &body) != b.digest).then(|| {
                            format!(
                                "node {node}: blob {} read back as {} bytes with another digest",
                                b.digest,
                                body.len()
                            )
                        })
                    }
                    Err(_) => None,
                },
                Ok(r) if r.status() == 404 => Some(format!(
                    "node {node}: acknowledged blob {} (pushed via node {}) answered 404",
                    b.digest, b.node
                )),
                _ => None,
            };
            let mut h = history.lock().unwrap();
            h.blob_ops += 1;
            h.violations.extend(violation);
        }
    }
}

/// Writes tag `probe` of `chaos/reg` on every node every 50 ms (1 s timeout, each node on
/// its own), recording when writes are acknowledged: the availability after a fault is the
/// first acknowledgement after it, whichever node gives it.
pub async fn probe(load: Arc<Load>, http: reqwest::Client, start: Instant, stop: Stop, history: Arc<Mutex<History>>) {
    let mut tasks = Vec::new();
    for (_, addr) in load.nodes.clone() {
        let (load, http, stop, history) = (load.clone(), http.clone(), stop.clone(), history.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_set() {
                n += 1;
                let m = load.manifest("chaos.probe", format!("{addr}-{n}"));
                let invoke = start.elapsed().as_micros() as u64;
                let r = http
                    .put(format!("http://{addr}/v2/{REG_REPO}/manifests/probe"))
                    .header("content-type", OCI_MANIFEST)
                    .body(m)
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await;
                if r.is_ok_and(|r| r.status() == 201) {
                    history.lock().unwrap().write_oks.push((invoke, start.elapsed().as_micros() as u64));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// A stop flag shared by the clients.
#[derive(Clone, Default)]
pub struct Stop(Arc<std::sync::atomic::AtomicBool>);

impl Stop {
    pub fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}
