//! `raftyard gc`: a garbage collection through a node's peer port, with a progress bar and a
//! report (see `raftyard_cluster::gc` for what is collected and how it stays safe).

use indicatif::{ProgressBar, ProgressStyle};
use raftyard_cluster::gc::GcReport;
use raftyard_cluster::pb::GcRequest;

use crate::admin::{client, TlsDir};

/// Bytes as a person reads them (binary units: `1.5 KiB`).
pub(crate) fn human(b: u64) -> String {
    bytesize::ByteSize(b).display().iec().to_string()
}

/// Runs one collection through `node` and prints its report (`json`: the whole report as JSON,
/// with every item).
pub async fn run(
    node: &str,
    tls: &TlsDir,
    dry_run: bool,
    untagged: bool,
    grace_secs: u64,
    json: bool,
) -> anyhow::Result<()> {
    let actor = std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into());
    let req = GcRequest { dry_run, untagged, grace_seconds: grace_secs, actor };
    let mut stream =
        client(node, tls).await?.gc(req).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?.into_inner();
    let bar = ProgressBar::hidden();
    let mut report: Option<GcReport> = None;
    while let Some(p) = stream.message().await.map_err(|s| anyhow::anyhow!("{}", s.message()))? {
        if !p.report.is_empty() {
            report = Some(serde_json::from_str(&p.report)?);
            continue;
        }
        if bar.is_hidden() && p.total > 0 && !json {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("collecting [{bar:30}] {pos}/{len} batches")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
        }
        bar.set_length(p.total);
        bar.set_position(p.done);
    }
    bar.finish_and_clear();
    let r = report.ok_or_else(|| anyhow::anyhow!("the node ended the collection without a report"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let what = if r.dry_run { "would go" } else { "went" };
    println!("collection at log index {}{}", r.as_of, if r.dry_run { " (dry run: nothing removed)" } else { "" });
    println!("{:<28} {:>10} {:>10}", "", "garbage", what);
    println!(
        "{:<28} {:>10} {:>10}",
        "untagged manifests",
        r.manifests,
        if r.dry_run { r.manifests } else { r.manifests_removed }
    );
    println!("{:<28} {:>10} {:>10}", "blob links", r.links, if r.dry_run { r.links } else { r.links_removed });
    println!(
        "{:<28} {:>10} {:>10}",
        "blobs leaving the registry",
        r.blobs,
        if r.dry_run { r.blobs } else { r.blobs_removed }
    );
    println!("bytes each node frees: {} ({} bytes)", human(r.bytes), r.bytes);
    if !r.dry_run {
        let kept = (r.manifests - r.manifests_removed) + (r.links - r.links_removed);
        if kept > 0 {
            println!("{kept} items were in use again when the collection applied, and were kept");
        }
        println!("every node removes the files of those blobs within a minute (raftyard_gc_bytes_reclaimed_total)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_read_as_people_write_them() {
        assert_eq!(super::human(0), "0 B");
        assert_eq!(super::human(1536), "1.5 KiB");
        assert_eq!(super::human(10 << 30), "10.0 GiB");
    }
}
