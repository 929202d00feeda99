//! `raftyard quota set|list|remove` and `raftyard usage`: storage quotas and what
//! repositories hold, through a node's peer port.

use raftyard_cluster::pb::QuotaRequest;
use raftyard_types::access::RepoGlob;
use raftyard_types::lifecycle::{Quota, QuotaUsage, RepoUsage};

use crate::admin::{client, TlsDir};
use crate::gc::human;

fn actor() -> String {
    std::env::var("USER").or_else(|_| std::env::var("LOGNAME")).unwrap_or_else(|_| "unknown".into())
}

async fn call(node: &str, tls: &TlsDir, req: QuotaRequest) -> anyhow::Result<String> {
    let r = client(node, tls).await?.quota(req).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    Ok(r.into_inner().json)
}

/// A size as people write it: `5000000000`, `5GB` (10⁹), `5GiB` (2³⁰), `1.5 TiB`.
pub fn parse_bytes(s: &str) -> anyhow::Result<u64> {
    s.trim().parse::<bytesize::ByteSize>().map(|b| b.0).map_err(|e| anyhow::anyhow!("size {s:?}: {e}"))
}

pub async fn set(node: &str, tls: &TlsDir, quota: Quota) -> anyhow::Result<()> {
    let req = QuotaRequest { set: bincode::serialize(&quota)?.into(), actor: actor(), ..Default::default() };
    call(node, tls, req).await?;
    println!("quota for {} stored: {}", quota.repos.as_str(), human(quota.bytes));
    Ok(())
}

pub async fn remove(node: &str, tls: &TlsDir, repos: &RepoGlob) -> anyhow::Result<()> {
    let req = QuotaRequest { remove: repos.as_str().to_string(), actor: actor(), ..Default::default() };
    call(node, tls, req).await?;
    println!("quota for {} removed", repos.as_str());
    Ok(())
}

pub async fn list(node: &str, tls: &TlsDir, json: bool) -> anyhow::Result<()> {
    let out = call(node, tls, QuotaRequest { list: true, actor: actor(), ..Default::default() }).await?;
    let all: Vec<QuotaUsage> = serde_json::from_str(&out)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    println!("{:<32} {:>12} {:>12} {:>6}", "REPOSITORIES", "QUOTA", "USED", "USE%");
    for q in all {
        let pct = match q.quota.bytes {
            0 => "-".to_string(),
            b => format!("{:.0}", q.used.bytes as f64 * 100.0 / b as f64),
        };
        println!("{:<32} {:>12} {:>12} {pct:>6}", q.quota.repos.as_str(), human(q.quota.bytes), human(q.used.bytes));
    }
    Ok(())
}

/// What each repository `repos` matches holds, largest first, and the total.
pub async fn usage(node: &str, tls: &TlsDir, repos: &RepoGlob, json: bool) -> anyhow::Result<()> {
    let req = QuotaRequest { usage: repos.as_str().to_string(), actor: actor(), ..Default::default() };
    let mut all: Vec<RepoUsage> = serde_json::from_str(&call(node, tls, req).await?)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    all.sort_by(|a, b| b.usage.bytes.cmp(&a.usage.bytes).then_with(|| a.repository.cmp(&b.repository)));
    println!("{:<48} {:>12} {:>8} {:>10}", "REPOSITORY", "BYTES", "BLOBS", "MANIFESTS");
    let total = all.iter().fold(raftyard_types::lifecycle::Usage::default(), |t, u| t.add(u.usage, 1));
    for u in &all {
        println!("{:<48} {:>12} {:>8} {:>10}", u.repository, human(u.usage.bytes), u.usage.blobs, u.usage.manifests);
    }
    println!(
        "{:<48} {:>12} {:>8} {:>10}",
        format!("total ({} repositories)", all.len()),
        human(total.bytes),
        total.blobs,
        total.manifests
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes_parse_as_written() {
        assert_eq!(parse_bytes("123").unwrap(), 123);
        assert_eq!(parse_bytes("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_bytes("5 GiB").unwrap(), 5 << 30);
        assert_eq!(parse_bytes("1.5KiB").unwrap(), 1536);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("-5").is_err());
    }
}
