//! Retention on a node: storing policies, and running them (a plan on the state after a read
//! barrier, proposed as `TagExpired` and `Collected` batches; see `raftyard_raft::retention`).
//! A dry run plans the same way and proposes nothing, so it names exactly what a run at the
//! same moment removes.

use std::time::Duration;

use raftyard_raft::{MetaNode, ProposeError};
use raftyard_types::event::now_ms;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What a retention run removed (or, dry, would remove).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RetentionReport {
    pub as_of: u64,
    pub dry_run: bool,
    /// `repository:tag` of each expired tag, `repository@digest` of each untagged manifest.
    pub tags: Vec<String>,
    pub manifests: Vec<String>,
    /// Of those, how many went (the rest changed since the plan: pushed again, tagged).
    pub tags_removed: usize,
    pub manifests_removed: usize,
}

/// Runs the stored policies once through `meta`.
pub async fn run(meta: &MetaNode, dry_run: bool) -> Result<RetentionReport, ProposeError> {
    meta.read_barrier().await?;
    crate::gc::require_collections(meta).await?;
    let reader = meta.reader().clone();
    let now = now_ms();
    let plan = tokio::task::spawn_blocking(move || reader.retention_plan(now))
        .await
        .map_err(|e| ProposeError::Unavailable(e.to_string()))?
        .map_err(|e| ProposeError::Unavailable(format!("reading the state: {e}")))?;
    let (tags, manifests) = plan.lines();
    let mut report = RetentionReport { as_of: plan.as_of, dry_run, tags, manifests, ..Default::default() };
    if dry_run {
        return Ok(report);
    }
    for events in plan.events() {
        meta.propose(events).await?;
    }
    let reader = meta.reader();
    for (repo, tag, digest) in &plan.tags {
        let now = reader.tag(repo, tag).map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        report.tags_removed += usize::from(now.as_ref() != Some(digest));
    }
    for (repo, _, digests) in &plan.manifests {
        for d in digests {
            let m = reader.manifest(repo, d).map_err(|e| ProposeError::Unavailable(e.to_string()))?;
            report.manifests_removed += usize::from(m.is_none());
        }
    }
    if report.tags_removed + report.manifests_removed > 0 {
        info!(
            as_of = report.as_of,
            tags = report.tags_removed,
            manifests = report.manifests_removed,
            "retention applied"
        );
    }
    Ok(report)
}

/// Runs the policies every `every` while this node leads, until `stop` (a cluster without
/// policies costs one read of an empty range).
pub fn spawn_schedule(meta: MetaNode, every: Duration, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
            let leads = meta.is_leader();
            if !leads || meta.reader().retention_policies().map(|p| p.is_empty()).unwrap_or(true) {
                continue;
            }
            if let Err(e) = run(&meta, false).await {
                warn!(error = %e, "scheduled retention run failed");
            }
        }
    })
}
