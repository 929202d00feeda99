//! Garbage collection on a node: running a collection, and sweeping this node's blob files.
//!
//! A **collection** reads the state after a read barrier (so it sees every acknowledged write),
//! plans what is garbage ([`raftyard_raft::gc`]) and proposes the plan as `Collected` batches.
//! The state machine re-checks every item as a batch applies, so a push racing the collection
//! keeps what it uses, or is refused (`MANIFEST_BLOB_UNKNOWN`) and uploads again; never is a
//! manifest acknowledged whose blob is gone. Any node may run one; two at once are harmless.
//!
//! The **sweeper** runs on every node, the backup included. After a collection applies here
//! (or a snapshot is installed, which may stand for collections this node never applied: it
//! was down or far behind), it removes the blob files that no repository links in this node's
//! state. A file is kept while young ([`FILE_GRACE`]: an upload or a peer's copy whose link is
//! on its way) or pinned (an upload of this node reaching its write quorum), and a blob is
//! mounted only while still linked somewhere (`BlobMounted`), so nothing that is about to be
//! linked loses its file. Young files are swept again once they are old enough.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use raftyard_blobstore::{BlobStore, SweepReport};
use raftyard_raft::gc::GcPlan;
use raftyard_raft::node::PROTOCOL_COLLECTIONS;
use raftyard_raft::{MetaNode, ProposeError};
use raftyard_types::event::now_ms;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Unlinked blob files younger than this are kept by a sweep: far longer than an upload's file
/// waits for its link (a proposal waits at most a few seconds for a leader).
pub const FILE_GRACE: Duration = Duration::from_secs(60);
/// A sweep waits this long after the collection that woke it, so the batches of one
/// collection lead to one sweep.
const SETTLE: Duration = Duration::from_secs(1);

/// What to collect.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Also untagged manifests that nothing refers to.
    pub untagged: bool,
    /// Links and manifests younger than this are kept.
    pub grace: Duration,
    /// Plan only.
    pub dry_run: bool,
}

/// The outcome of a collection.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcReport {
    /// The applied index the plan was made at.
    pub as_of: u64,
    pub dry_run: bool,
    /// Garbage found: untagged manifests, blob links, and blobs that leave the registry.
    pub manifests: usize,
    pub links: usize,
    pub blobs: usize,
    /// Bytes of those blobs (each once): what the nodes free, each on its own disk.
    pub bytes: u64,
    /// Of those, gone once the collection applied (the rest changed since the plan: tagged,
    /// referenced or linked again).
    pub manifests_removed: usize,
    pub links_removed: usize,
    pub blobs_removed: usize,
    /// `repo@digest` of the manifests and links found, and the blobs' digests.
    pub manifest_list: Vec<String>,
    pub link_list: Vec<String>,
    pub blob_list: Vec<String>,
}

impl GcReport {
    fn of(plan: &GcPlan, dry_run: bool) -> Self {
        GcReport {
            as_of: plan.as_of,
            dry_run,
            manifests: plan.manifests.len(),
            links: plan.links.len(),
            blobs: plan.blobs.len(),
            bytes: plan.bytes(),
            manifest_list: plan.manifests.iter().map(|(r, d)| format!("{r}@{d}")).collect(),
            link_list: plan.links.iter().map(|(r, d, _)| format!("{r}@{d}")).collect(),
            blob_list: plan.blobs.iter().map(|(d, _)| d.to_string()).collect(),
            ..Default::default()
        }
    }
}

/// Counters of this node's collections and sweeps, for `/metrics`. Cheap to clone.
#[derive(Clone, Default)]
pub struct GcStats(Arc<StatsInner>);

#[derive(Default)]
struct StatsInner {
    runs: AtomicU64,
    failures: AtomicU64,
    last_run_ms: AtomicU64,
    manifests: AtomicU64,
    links: AtomicU64,
    blobs: AtomicU64,
    sweeps: AtomicU64,
    files: AtomicU64,
    bytes: AtomicU64,
    last_sweep_ms: AtomicU64,
}

/// A copy of [`GcStats`].
#[derive(Debug, Clone, Copy, Default)]
pub struct GcFigures {
    /// Collections this node ran, failed, and when the last one finished (ms; 0: never).
    pub runs: u64,
    pub failures: u64,
    pub last_run_ms: u64,
    /// What they removed from the state.
    pub manifests_removed: u64,
    pub links_removed: u64,
    pub blobs_removed: u64,
    /// Sweeps of this node's files, what they freed, and when the last one finished.
    pub sweeps: u64,
    pub files_removed: u64,
    pub bytes_reclaimed: u64,
    pub last_sweep_ms: u64,
}

impl GcStats {
    pub fn get(&self) -> GcFigures {
        let s = &self.0;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        GcFigures {
            runs: l(&s.runs),
            failures: l(&s.failures),
            last_run_ms: l(&s.last_run_ms),
            manifests_removed: l(&s.manifests),
            links_removed: l(&s.links),
            blobs_removed: l(&s.blobs),
            sweeps: l(&s.sweeps),
            files_removed: l(&s.files),
            bytes_reclaimed: l(&s.bytes),
            last_sweep_ms: l(&s.last_sweep_ms),
        }
    }
}

/// Runs one collection through `meta`; `progress(done, total)` after each batch.
pub async fn collect(
    meta: &MetaNode,
    opts: GcOptions,
    stats: &GcStats,
    mut progress: impl FnMut(usize, usize),
) -> Result<GcReport, ProposeError> {
    let r = run(meta, opts, &mut progress).await;
    let s = &stats.0;
    match &r {
        Ok(rep) if !rep.dry_run => {
            s.runs.fetch_add(1, Ordering::Relaxed);
            s.last_run_ms.store(now_ms(), Ordering::Relaxed);
            s.manifests.fetch_add(rep.manifests_removed as u64, Ordering::Relaxed);
            s.links.fetch_add(rep.links_removed as u64, Ordering::Relaxed);
            s.blobs.fetch_add(rep.blobs_removed as u64, Ordering::Relaxed);
        }
        Ok(_) => {}
        Err(_) => {
            s.failures.fetch_add(1, Ordering::Relaxed);
        }
    }
    r
}

async fn run(
    meta: &MetaNode,
    opts: GcOptions,
    progress: &mut impl FnMut(usize, usize),
) -> Result<GcReport, ProposeError> {
    meta.read_barrier().await?;
    require_collections(meta).await?;
    let reader = meta.reader().clone();
    let before_ms = now_ms().saturating_sub(opts.grace.as_millis() as u64);
    let plan = tokio::task::spawn_blocking(move || reader.gc_plan(before_ms, opts.untagged))
        .await
        .map_err(|e| ProposeError::Unavailable(e.to_string()))?
        .map_err(|e| ProposeError::Unavailable(format!("reading the state: {e}")))?;
    let mut report = GcReport::of(&plan, opts.dry_run);
    if opts.dry_run {
        return Ok(report);
    }
    let events = plan.events();
    let total = events.len();
    progress(0, total);
    for (i, ev) in events.into_iter().enumerate() {
        meta.propose(vec![ev]).await?;
        progress(i + 1, total);
    }
    // what went: the state after the last batch (an item kept was in use again)
    let reader = meta.reader().clone();
    let plan2 = plan.clone();
    let gone = tokio::task::spawn_blocking(move || -> std::io::Result<(usize, usize, usize)> {
        let mut m = 0;
        for (r, d) in &plan2.manifests {
            m += usize::from(reader.manifest(r, d)?.is_none());
        }
        let mut l = 0;
        for (r, d, _) in &plan2.links {
            l += usize::from(reader.blob_link(r, d)?.is_none());
        }
        let mut b = 0;
        for (d, _) in &plan2.blobs {
            b += usize::from(reader.blob_info(d)?.is_none());
        }
        Ok((m, l, b))
    })
    .await
    .map_err(|e| ProposeError::Unavailable(e.to_string()))?
    .map_err(|e| ProposeError::Unavailable(format!("reading the state: {e}")))?;
    (report.manifests_removed, report.links_removed, report.blobs_removed) = gone;
    info!(
        as_of = report.as_of,
        manifests = report.manifests_removed,
        links = report.links_removed,
        blobs = report.blobs_removed,
        bytes = report.bytes,
        "collection applied"
    );
    Ok(report)
}

/// How long after the log records protocol 3 collections may start: a mount decided before
/// that entry proposes the older, unchecked `BlobLinked`, and must have applied by then.
const UPGRADE_SETTLE: Duration = Duration::from_secs(10);

/// Fails unless the log records that every member applies `Collected`, `BlobMounted` and the
/// retention events, and has for [`UPGRADE_SETTLE`] (see [`crate::versions::require_protocol`]).
pub(crate) async fn require_collections(meta: &MetaNode) -> Result<(), ProposeError> {
    crate::versions::require_protocol(meta, PROTOCOL_COLLECTIONS, UPGRADE_SETTLE).await
}

/// Sweeps this node's blob files after each collection, until `stop`.
pub fn spawn_sweeper(
    meta: MetaNode,
    store: Arc<BlobStore>,
    stats: GcStats,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut collections = meta.reader().collections();
        // files the last sweep kept young: looked at again (only they) once old enough
        let mut young: Vec<raftyard_types::Digest> = Vec::new();
        loop {
            let again = !young.is_empty();
            let wait = if again { FILE_GRACE } else { Duration::from_secs(86_400) };
            let full = tokio::select! {
                r = collections.changed() => { if r.is_err() { return } true }
                _ = tokio::time::sleep(wait) => { if !again { continue } false }
                _ = stop.cancelled() => return,
            };
            tokio::select! {
                _ = tokio::time::sleep(SETTLE) => {}
                _ = stop.cancelled() => return,
            }
            collections.borrow_and_update();
            let only = (!full).then(|| std::mem::take(&mut young));
            match sweep(&meta, &store, only).await {
                Ok(r) => {
                    let s = &stats.0;
                    s.sweeps.fetch_add(1, Ordering::Relaxed);
                    s.files.fetch_add(r.removed, Ordering::Relaxed);
                    s.bytes.fetch_add(r.bytes, Ordering::Relaxed);
                    s.last_sweep_ms.store(now_ms(), Ordering::Relaxed);
                    info!(
                        removed = r.removed,
                        bytes = r.bytes,
                        kept_young = r.young.len(),
                        files = r.files,
                        full,
                        "blob files swept"
                    );
                    young = r.young;
                }
                Err(e) => {
                    warn!(error = %e, "sweeping blob files failed; a full sweep comes with the next collection");
                }
            }
        }
    })
}

/// One sweep of this node's blob files against its applied state: every file, or `only` these.
pub async fn sweep(
    meta: &MetaNode,
    store: &Arc<BlobStore>,
    only: Option<Vec<raftyard_types::Digest>>,
) -> Result<SweepReport, raftyard_blobstore::BlobError> {
    let reader = meta.reader().clone();
    let store = store.clone();
    let linked = move |d: &raftyard_types::Digest| Ok(reader.blob_info(d)?.is_some());
    tokio::task::spawn_blocking(move || match only {
        None => store.sweep(linked, FILE_GRACE),
        Some(ds) => store.sweep_only(&ds, linked, FILE_GRACE),
    })
    .await
    .map_err(|e| raftyard_blobstore::BlobError::Io(std::io::Error::other(e)))?
}

/// Runs a collection every `every` while this node leads, until `stop`.
pub fn spawn_schedule(
    meta: MetaNode,
    every: Duration,
    opts: GcOptions,
    stats: GcStats,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
            let leads = meta.is_leader();
            if !leads {
                continue;
            }
            match collect(&meta, opts, &stats, |_, _| {}).await {
                Ok(r) => info!(
                    manifests = r.manifests_removed,
                    links = r.links_removed,
                    blobs = r.blobs_removed,
                    "scheduled collection done"
                ),
                Err(e) => warn!(error = %e, "scheduled collection failed"),
            }
        }
    })
}
