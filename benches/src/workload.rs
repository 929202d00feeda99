//! The workloads, run identically against each registry.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use rand::RngCore;
use tokio::task::JoinHandle;

use crate::client::{sha256_digest, RegistryClient};
use crate::report::{percentile, TargetResults};
use crate::server::{rss_kib, Server};

const REPO_MONOLITHIC: &str = "bench/blob-monolithic";
const REPO_CHUNKED: &str = "bench/blob-chunked";
const REPO_MANIFESTS: &str = "bench/manifests";

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// How often the RSS sampler polls `/proc/<pid>/status`.
const RSS_POLL: Duration = Duration::from_millis(50);

/// Workload parameters shared by all targets.
pub struct Plan {
    pub reps: u32,
    pub chunk_bytes: usize,
    pub manifests: u32,
    pub manifest_warmup: u32,
}

/// Random blob content, generated once. Each [`BlobSource::fresh`] call
/// returns a copy whose first 8 bytes are new random bytes, so every pushed
/// blob has a distinct digest and no registry can deduplicate it.
pub struct BlobSource {
    base: Vec<u8>,
}

impl BlobSource {
    pub fn new(len: usize) -> Self {
        let mut base = vec![0u8; len];
        rand::thread_rng().fill_bytes(&mut base);
        BlobSource { base }
    }

    pub fn len(&self) -> usize {
        self.base.len()
    }

    pub fn fresh(&self) -> (Bytes, String) {
        let mut data = self.base.clone();
        let prefix = data.len().min(8);
        rand::thread_rng().fill_bytes(&mut data[..prefix]);
        let digest = sha256_digest(&data);
        (Bytes::from(data), digest)
    }
}

/// Runs every workload against one server and collects the measurements.
pub async fn run_all(
    server: &mut Server,
    client: &RegistryClient,
    source: &BlobSource,
    plan: &Plan,
) -> Result<TargetResults> {
    let name = server.target.name();
    let pid = server.pid();
    let mut results = TargetResults::new(name);

    let sampler = RssSampler::start(pid);
    let pushed = push_blobs(name, client, source, plan, &mut results).await;
    results.rss_peak_push_kib = Some(sampler.stop().await);
    let last_digest = pushed?;
    server.ensure_running()?;

    pull_blobs(name, client, &last_digest, source.len(), plan, &mut results).await?;
    server.ensure_running()?;

    manifests(name, client, plan, &mut results).await?;
    server.ensure_running()?;

    results.rss_after_kib = rss_kib(pid);
    Ok(results)
}

/// Monolithic then chunked pushes; returns the digest of the last monolithic blob.
async fn push_blobs(
    name: &str,
    client: &RegistryClient,
    source: &BlobSource,
    plan: &Plan,
    results: &mut TargetResults,
) -> Result<String> {
    let mut last_digest = String::new();
    for rep in 1..=plan.reps {
        let (data, digest) = source.fresh();
        flush_page_cache().await;
        let started = Instant::now();
        client
            .push_blob_monolithic(REPO_MONOLITHIC, &data, &digest)
            .await
            .with_context(|| format!("{name}: monolithic push, rep {rep}"))?;
        let mbps = mb_per_s(data.len() as u64, started.elapsed());
        eprintln!("[{name}] blob push monolithic rep {rep}/{}: {mbps:.1} MB/s", plan.reps);
        results.push_monolithic_mbps.push(mbps);
        last_digest = digest;
    }
    for rep in 1..=plan.reps {
        let (data, digest) = source.fresh();
        flush_page_cache().await;
        let started = Instant::now();
        client
            .push_blob_chunked(REPO_CHUNKED, &data, &digest, plan.chunk_bytes)
            .await
            .with_context(|| format!("{name}: chunked push, rep {rep}"))?;
        let mbps = mb_per_s(data.len() as u64, started.elapsed());
        eprintln!("[{name}] blob push chunked rep {rep}/{}: {mbps:.1} MB/s", plan.reps);
        results.push_chunked_mbps.push(mbps);
    }
    Ok(last_digest)
}

/// One untimed warm-up pull, then timed pulls of the same blob.
async fn pull_blobs(
    name: &str,
    client: &RegistryClient,
    digest: &str,
    expected_len: usize,
    plan: &Plan,
    results: &mut TargetResults,
) -> Result<()> {
    let expected = expected_len as u64;
    let got = client
        .pull_blob(REPO_MONOLITHIC, digest)
        .await
        .with_context(|| format!("{name}: warm-up pull"))?;
    if got != expected {
        bail!("{name}: warm-up pull of {digest} returned {got} bytes, expected {expected}");
    }
    for rep in 1..=plan.reps {
        flush_page_cache().await;
        let started = Instant::now();
        let got = client
            .pull_blob(REPO_MONOLITHIC, digest)
            .await
            .with_context(|| format!("{name}: pull, rep {rep}"))?;
        let elapsed = started.elapsed();
        if got != expected {
            bail!("{name}: pull of {digest} returned {got} bytes, expected {expected}");
        }
        let mbps = mb_per_s(got, elapsed);
        eprintln!("[{name}] blob pull rep {rep}/{}: {mbps:.1} MB/s", plan.reps);
        results.pull_mbps.push(mbps);
    }
    Ok(())
}

/// Pushes a config and a layer blob once, then per repetition PUTs
/// `plan.manifests` distinct OCI manifests to tags and GETs each back by tag.
async fn manifests(name: &str, client: &RegistryClient, plan: &Plan, results: &mut TargetResults) -> Result<()> {
    let mut layer = vec![0u8; 4096];
    rand::thread_rng().fill_bytes(&mut layer);
    let layer = Bytes::from(layer);
    let layer_digest = sha256_digest(&layer);
    let config = Bytes::from(serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))?);
    let config_digest = sha256_digest(&config);
    for (what, data, digest) in [("layer", &layer, &layer_digest), ("config", &config, &config_digest)] {
        client
            .push_blob_monolithic(REPO_MANIFESTS, data, digest)
            .await
            .with_context(|| format!("{name}: pushing manifest {what} blob"))?;
    }
    let template = ManifestTemplate {
        nonce: rand::thread_rng().next_u64(),
        config: (config_digest, config.len()),
        layer: (layer_digest, layer.len()),
    };

    for i in 0..plan.manifest_warmup {
        let tag = format!("warmup-{i}");
        let body = template.render(&tag);
        client
            .put_manifest(REPO_MANIFESTS, &tag, OCI_MANIFEST, body)
            .await
            .with_context(|| format!("{name}: warm-up manifest PUT {tag}"))?;
        client
            .get_manifest(REPO_MANIFESTS, &tag, OCI_MANIFEST)
            .await
            .with_context(|| format!("{name}: warm-up manifest GET {tag}"))?;
    }

    for rep in 1..=plan.reps {
        flush_page_cache().await;
        let mut put_ms = Vec::with_capacity(plan.manifests as usize);
        let mut tags = Vec::with_capacity(plan.manifests as usize);
        for i in 0..plan.manifests {
            let tag = format!("r{rep}-{i:06}");
            let body = template.render(&tag);
            let started = Instant::now();
            let digest = client
                .put_manifest(REPO_MANIFESTS, &tag, OCI_MANIFEST, body)
                .await
                .with_context(|| format!("{name}: manifest PUT {tag}"))?;
            put_ms.push(millis(started.elapsed()));
            tags.push((tag, digest));
        }
        let mut get_ms = Vec::with_capacity(tags.len());
        for (tag, digest) in &tags {
            let started = Instant::now();
            let body = client
                .get_manifest(REPO_MANIFESTS, tag, OCI_MANIFEST)
                .await
                .with_context(|| format!("{name}: manifest GET {tag}"))?;
            get_ms.push(millis(started.elapsed()));
            let got = sha256_digest(&body);
            if &got != digest {
                bail!("{name}: manifest GET {tag} returned content {got}, expected {digest}");
            }
        }
        let (put50, put99) = (percentile(&put_ms, 50.0), percentile(&put_ms, 99.0));
        let (get50, get99) = (percentile(&get_ms, 50.0), percentile(&get_ms, 99.0));
        eprintln!(
            "[{name}] manifests rep {rep}/{}: PUT p50 {put50:.2} ms p99 {put99:.2} ms, GET p50 {get50:.2} ms p99 {get99:.2} ms",
            plan.reps
        );
        results.manifest_put_p50_ms.push(put50);
        results.manifest_put_p99_ms.push(put99);
        results.manifest_get_p50_ms.push(get50);
        results.manifest_get_p99_ms.push(get99);
    }
    Ok(())
}

/// Produces distinct, valid OCI image manifests that differ only in an annotation.
struct ManifestTemplate {
    nonce: u64,
    config: (String, usize),
    layer: (String, usize),
}

impl ManifestTemplate {
    fn render(&self, tag: &str) -> Bytes {
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": { "mediaType": OCI_CONFIG, "digest": self.config.0, "size": self.config.1 },
            "layers": [ { "mediaType": OCI_LAYER, "digest": self.layer.0, "size": self.layer.1 } ],
            "annotations": { "dev.raftyard.bench.id": format!("{:016x}-{tag}", self.nonce) },
        });
        Bytes::from(serde_json::to_vec(&manifest).expect("manifest serializes"))
    }
}

/// Background task recording the peak `VmRSS` of a process.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kib(pid).unwrap_or(0)));
        let task = tokio::spawn({
            let (stop, peak) = (stop.clone(), peak.clone());
            async move {
                let mut tick = tokio::time::interval(RSS_POLL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    if let Some(kib) = rss_kib(pid) {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                }
            }
        });
        RssSampler { stop, peak, task }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.peak.load(Ordering::Relaxed)
    }
}

/// Writes back dirty pages system-wide (`sync(2)`) so that earlier writes,
/// by either registry, are not flushed during a timed repetition.
async fn flush_page_cache() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    let _ = tokio::task::spawn_blocking(|| unsafe { libc::sync() }).await;
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
