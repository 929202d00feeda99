//! `raftyard retention set|list|remove|run`: retention policies through a node's peer port.

use raftyard_cluster::pb::RetentionRequest;
use raftyard_cluster::retention::RetentionReport;
use raftyard_types::access::RepoGlob;
use raftyard_types::lifecycle::RetentionPolicy;

use crate::admin::{client, TlsDir};

fn actor() -> String {
    std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into())
}

async fn call(node: &str, tls: &TlsDir, req: RetentionRequest) -> anyhow::Result<String> {
    let r = client(node, tls).await?.retention(req).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    Ok(r.into_inner().json)
}

/// Stores a policy (checked here first, and again by the node).
pub async fn set(node: &str, tls: &TlsDir, policy: RetentionPolicy) -> anyhow::Result<()> {
    policy.check().map_err(|e| anyhow::anyhow!(e))?;
    let req = RetentionRequest { set: bincode::serialize(&policy)?.into(), actor: actor(), ..Default::default() };
    call(node, tls, req).await?;
    println!("retention policy for {} stored", policy.repos.as_str());
    Ok(())
}

pub async fn remove(node: &str, tls: &TlsDir, repos: &RepoGlob) -> anyhow::Result<()> {
    let req = RetentionRequest { remove: repos.as_str().to_string(), actor: actor(), ..Default::default() };
    call(node, tls, req).await?;
    println!("retention policy for {} removed", repos.as_str());
    Ok(())
}

pub async fn list(node: &str, tls: &TlsDir, json: bool) -> anyhow::Result<()> {
    let out = call(node, tls, RetentionRequest { list: true, actor: actor(), ..Default::default() }).await?;
    let all: Vec<RetentionPolicy> = serde_json::from_str(&out)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let opt = |v: Option<u32>| v.map_or("-".to_string(), |n| n.to_string());
    println!(
        "{:<32} {:>9} {:>13} {:>22} KEEP PATTERN",
        "REPOSITORIES", "KEEP LAST", "MAX AGE DAYS", "UNTAGGED MAX AGE DAYS"
    );
    for p in all {
        println!(
            "{:<32} {:>9} {:>13} {:>22} {}",
            p.repos.as_str(),
            opt(p.keep_last),
            opt(p.max_age_days),
            opt(p.untagged_max_age_days),
            p.keep_pattern.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

/// Runs the policies (or, dry, says what would go): one `repository:tag` or
/// `repository@digest` per line on stdout, the summary on stderr.
pub async fn run(node: &str, tls: &TlsDir, dry_run: bool, json: bool) -> anyhow::Result<()> {
    let req = RetentionRequest { run: true, dry_run, actor: actor(), ..Default::default() };
    let r: RetentionReport = serde_json::from_str(&call(node, tls, req).await?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    for line in r.tags.iter().chain(&r.manifests) {
        println!("{line}");
    }
    if dry_run {
        eprintln!(
            "dry run at log index {}: {} tags and {} untagged manifests would go",
            r.as_of,
            r.tags.len(),
            r.manifests.len()
        );
    } else {
        eprintln!(
            "at log index {}: {} of {} tags and {} of {} untagged manifests removed (the rest changed since); \
             `raftyard gc` frees their blobs",
            r.as_of,
            r.tags_removed,
            r.tags.len(),
            r.manifests_removed,
            r.manifests.len()
        );
    }
    Ok(())
}
