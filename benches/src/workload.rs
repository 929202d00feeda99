//! The workloads, run identically against each registry, with the timed
//! repetitions of the registries interleaved. Pushes and manifest PUTs go to a
//! deployment's write endpoint, pulls and manifest GETs to its read endpoint
//! (the same server unless it is a cluster).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use rand::RngCore;
use tokio::task::JoinHandle;

use crate::client::{sha256_digest, RegistryClient};
use crate::deployment::Deployment;
use crate::report::{percentile, TargetResults};
use crate::server::rss_kib;

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

    /// Bytes per blob.
    pub fn size(&self) -> usize {
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

/// One registry under test: its server(s), clients for it, and what it has measured so far.
pub struct Subject {
    deployment: Deployment,
    /// Client for blob pushes and manifest PUTs.
    writer: RegistryClient,
    /// Client for blob pulls and manifest GETs.
    reader: RegistryClient,
    results: TargetResults,
    /// Digest of the last blob pushed monolithically; the pull workload reads it.
    pull_digest: Option<String>,
    /// Source of manifests, available once the blobs they reference are pushed.
    manifest_template: Option<ManifestTemplate>,
}

impl Subject {
    /// `label` names the subject in log lines, the table and the JSON output.
    pub fn new(
        deployment: Deployment,
        label: String,
        request_timeout: Duration,
        transfer_timeout: Duration,
    ) -> Result<Self> {
        let writer = RegistryClient::new(deployment.write_base()?, request_timeout, transfer_timeout)?;
        let reader = RegistryClient::new(deployment.read_base()?, request_timeout, transfer_timeout)?;
        Ok(Subject {
            results: TargetResults::new(deployment.target(), label),
            deployment,
            writer,
            reader,
            pull_digest: None,
            manifest_template: None,
        })
    }

    /// The measurements, and the deployment (still running) they were taken on.
    pub fn finish(self) -> (TargetResults, Deployment) {
        (self.results, self.deployment)
    }

    fn name(&self) -> String {
        self.results.label.clone()
    }

    /// Adds the servers' log tails to a failed step, then checks the servers are still running.
    fn check(&mut self, outcome: Result<()>) -> Result<()> {
        outcome.map_err(|err| {
            err.context(format!("benchmarking {} failed; {}", self.name(), self.deployment.log_tails()))
        })?;
        self.deployment.ensure_running()
    }

    async fn timed_rep(&mut self, workload: Workload, rep: u32, source: &BlobSource, plan: &Plan) -> Result<()> {
        match workload {
            Workload::PushMonolithic => self.push_monolithic_rep(rep, source, plan).await,
            Workload::PushChunked => self.push_chunked_rep(rep, source, plan).await,
            Workload::Pull => self.pull_rep(rep, source.size() as u64, plan).await,
            Workload::Manifests => self.manifests_rep(rep, plan).await,
        }
    }

    async fn push_monolithic_rep(&mut self, rep: u32, source: &BlobSource, plan: &Plan) -> Result<()> {
        let name = self.name();
        let (data, digest) = source.fresh();
        flush_page_cache().await;
        let push = self.writer.push_blob_monolithic(REPO_MONOLITHIC, &data, &digest);
        let elapsed = timed_with_rss_peak(self.deployment.pids(), &mut self.results.rss_peak_push_kib, push)
            .await
            .with_context(|| format!("{name}: monolithic push, rep {rep}"))?;
        let mbps = mb_per_s(data.len() as u64, elapsed);
        eprintln!("[{name}] blob push monolithic rep {rep}/{}: {mbps:.1} MB/s", plan.reps);
        self.results.push_monolithic_mbps.push(mbps);
        self.pull_digest = Some(digest);
        Ok(())
    }

    async fn push_chunked_rep(&mut self, rep: u32, source: &BlobSource, plan: &Plan) -> Result<()> {
        let name = self.name();
        let (data, digest) = source.fresh();
        flush_page_cache().await;
        let push = self.writer.push_blob_chunked(REPO_CHUNKED, &data, &digest, plan.chunk_bytes);
        let elapsed = timed_with_rss_peak(self.deployment.pids(), &mut self.results.rss_peak_push_kib, push)
            .await
            .with_context(|| format!("{name}: chunked push, rep {rep}"))?;
        let mbps = mb_per_s(data.len() as u64, elapsed);
        eprintln!("[{name}] blob push chunked rep {rep}/{}: {mbps:.1} MB/s", plan.reps);
        self.results.push_chunked_mbps.push(mbps);
        Ok(())
    }

    fn pull_digest(&self) -> Result<String> {
        self.pull_digest.clone().with_context(|| format!("{}: no monolithic blob was pushed to pull", self.name()))
    }

    /// One untimed pull of the blob the timed pulls read.
    async fn warm_up_pull(&mut self, expected: u64) -> Result<()> {
        let name = self.name();
        let digest = self.pull_digest()?;
        let got =
            self.reader.pull_blob(REPO_MONOLITHIC, &digest).await.with_context(|| format!("{name}: warm-up pull"))?;
        if got != expected {
            bail!("{name}: warm-up pull of {digest} returned {got} bytes, expected {expected}");
        }
        Ok(())
    }

    async fn pull_rep(&mut self, rep: u32, expected: u64, plan: &Plan) -> Result<()> {
        let name = self.name();
        let digest = self.pull_digest()?;
        flush_page_cache().await;
        let started = Instant::now();
        let got = self
            .reader
            .pull_blob(REPO_MONOLITHIC, &digest)
            .await
            .with_context(|| format!("{name}: pull, rep {rep}"))?;
        let elapsed = started.elapsed();
        if got != expected {
            bail!("{name}: pull of {digest} returned {got} bytes, expected {expected}");
        }
        let mbps = mb_per_s(got, elapsed);
        eprintln!("[{name}] blob pull rep {rep}/{}: {mbps:.1} MB/s", plan.reps);
        self.results.pull_mbps.push(mbps);
        Ok(())
    }

    /// Pushes the config and layer blobs the manifests reference, then runs
    /// the untimed warm-up PUT+GET pairs.
    async fn prepare_manifests(&mut self, plan: &Plan) -> Result<()> {
        let name = self.name();
        let template = push_manifest_blobs(&name, &self.writer).await?;
        for i in 0..plan.manifest_warmup {
            let tag = format!("warmup-{i}");
            self.writer
                .put_manifest(REPO_MANIFESTS, &tag, OCI_MANIFEST, template.render(&tag))
                .await
                .with_context(|| format!("{name}: warm-up manifest PUT {tag}"))?;
            self.reader
                .get_manifest(REPO_MANIFESTS, &tag, OCI_MANIFEST)
                .await
                .with_context(|| format!("{name}: warm-up manifest GET {tag}"))?;
        }
        self.manifest_template = Some(template);
        Ok(())
    }

    async fn manifests_rep(&mut self, rep: u32, plan: &Plan) -> Result<()> {
        let name = self.name();
        let template =
            self.manifest_template.as_ref().with_context(|| format!("{name}: manifest blobs were not pushed"))?;
        flush_page_cache().await;
        let clients = (&self.writer, &self.reader);
        let (put_ms, get_ms) = manifest_latencies(&name, clients, template, rep, plan.manifests).await?;
        let (put50, put99) = (percentile(&put_ms, 50.0), percentile(&put_ms, 99.0));
        let (get50, get99) = (percentile(&get_ms, 50.0), percentile(&get_ms, 99.0));
        eprintln!(
            "[{name}] manifests rep {rep}/{}: PUT p50 {put50:.2} ms p99 {put99:.2} ms, GET p50 {get50:.2} ms p99 {get99:.2} ms",
            plan.reps
        );
        self.results.manifest_put_p50_ms.push(put50);
        self.results.manifest_put_p99_ms.push(put99);
        self.results.manifest_get_p50_ms.push(get50);
        self.results.manifest_get_p99_ms.push(get99);
        Ok(())
    }

    fn record_rss_after(&mut self) {
        self.results.rss_after_kib = total_rss_kib(&self.deployment.pids());
    }
}

/// A workload whose repetitions are timed and interleaved across registries.
#[derive(Clone, Copy)]
enum Workload {
    PushMonolithic,
    PushChunked,
    Pull,
    Manifests,
}

/// Runs every workload against every subject. Each workload's repetitions
/// are interleaved (see [`rep_order`]); untimed warm-ups run per subject
/// before the workload they warm up.
pub async fn run_all(subjects: &mut [Subject], source: &BlobSource, plan: &Plan) -> Result<()> {
    interleave(subjects, Workload::PushMonolithic, source, plan).await?;
    interleave(subjects, Workload::PushChunked, source, plan).await?;
    for subject in subjects.iter_mut() {
        let outcome = subject.warm_up_pull(source.size() as u64).await;
        subject.check(outcome)?;
    }
    interleave(subjects, Workload::Pull, source, plan).await?;
    for subject in subjects.iter_mut() {
        let outcome = subject.prepare_manifests(plan).await;
        subject.check(outcome)?;
    }
    interleave(subjects, Workload::Manifests, source, plan).await?;
    for subject in subjects.iter_mut() {
        subject.record_rss_after();
    }
    Ok(())
}

/// Runs repetition 1, 2, … of `workload` on every subject, in [`rep_order`].
async fn interleave(subjects: &mut [Subject], workload: Workload, source: &BlobSource, plan: &Plan) -> Result<()> {
    for rep in 1..=plan.reps {
        for i in rep_order(rep, subjects.len()) {
            let subject = &mut subjects[i];
            let outcome = subject.timed_rep(workload, rep, source, plan).await;
            subject.check(outcome)?;
        }
    }
    Ok(())
}

/// Indices of the subjects in the order they run repetition `rep` (1-based):
/// as given for odd repetitions, reversed for even ones (ABBA), so that
/// neither registry is systematically measured first.
fn rep_order(rep: u32, count: usize) -> Vec<usize> {
    if rep % 2 == 1 {
        (0..count).collect()
    } else {
        (0..count).rev().collect()
    }
}

/// Awaits `push` and returns how long it took, sampling the summed RSS of
/// `pids` meanwhile and raising `peak` to the highest value seen.
async fn timed_with_rss_peak(
    pids: Vec<u32>,
    peak: &mut Option<u64>,
    push: impl Future<Output = Result<()>>,
) -> Result<Duration> {
    let sampler = RssSampler::start(pids);
    let started = Instant::now();
    let outcome = push.await;
    let elapsed = started.elapsed();
    *peak = (*peak).max(Some(sampler.stop().await));
    outcome.map(|()| elapsed)
}

/// Pushes a random layer blob and a config blob referencing it; returns the
/// template for manifests that reference both.
async fn push_manifest_blobs(name: &str, client: &RegistryClient) -> Result<ManifestTemplate> {
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
    Ok(ManifestTemplate {
        nonce: rand::thread_rng().next_u64(),
        config: (config_digest, config.len()),
        layer: (layer_digest, layer.len()),
    })
}

/// PUTs `count` distinct manifests to tags one after another with the first
/// client, then GETs each back by tag with the second and verifies it; returns
/// the PUT and GET latencies in ms.
async fn manifest_latencies(
    name: &str,
    (writer, reader): (&RegistryClient, &RegistryClient),
    template: &ManifestTemplate,
    rep: u32,
    count: u32,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mut put_ms = Vec::with_capacity(count as usize);
    let mut tags = Vec::with_capacity(count as usize);
    for i in 0..count {
        let tag = format!("r{rep}-{i:06}");
        let body = template.render(&tag);
        let started = Instant::now();
        let digest = writer
            .put_manifest(REPO_MANIFESTS, &tag, OCI_MANIFEST, body)
            .await
            .with_context(|| format!("{name}: manifest PUT {tag}"))?;
        put_ms.push(millis(started.elapsed()));
        tags.push((tag, digest));
    }
    let mut get_ms = Vec::with_capacity(tags.len());
    for (tag, digest) in &tags {
        let started = Instant::now();
        let body = reader
            .get_manifest(REPO_MANIFESTS, tag, OCI_MANIFEST)
            .await
            .with_context(|| format!("{name}: manifest GET {tag}"))?;
        get_ms.push(millis(started.elapsed()));
        let got = sha256_digest(&body);
        if &got != digest {
            bail!("{name}: manifest GET {tag} returned content {got}, expected {digest}");
        }
    }
    Ok((put_ms, get_ms))
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

/// Sum of the `VmRSS` of the processes that have one; `None` if none has.
fn total_rss_kib(pids: &[u32]) -> Option<u64> {
    pids.iter().filter_map(|&pid| rss_kib(pid)).reduce(|a, b| a + b)
}

/// Background task recording the peak of the summed `VmRSS` of processes.
pub(crate) struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl RssSampler {
    pub(crate) fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(total_rss_kib(&pids).unwrap_or(0)));
        let task = tokio::spawn({
            let (stop, peak) = (stop.clone(), peak.clone());
            async move {
                let mut tick = tokio::time::interval(RSS_POLL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    if let Some(kib) = total_rss_kib(&pids) {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                }
            }
        });
        RssSampler { stop, peak, task }
    }

    pub(crate) async fn stop(self) -> u64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rep_order_alternates_abba() {
        assert_eq!(rep_order(1, 2), vec![0, 1]);
        assert_eq!(rep_order(2, 2), vec![1, 0]);
        assert_eq!(rep_order(3, 2), vec![0, 1]);
        assert_eq!(rep_order(4, 2), vec![1, 0]);
        assert_eq!(rep_order(1, 1), vec![0]);
        assert_eq!(rep_order(2, 1), vec![0]);
    }
}
