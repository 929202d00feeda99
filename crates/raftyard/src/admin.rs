//! `raftyard cluster …`: status, add and remove over a node's peer port.

use std::time::Duration;

use anyhow::Context;
use raftyard_cluster::pb::admin_client::AdminClient;
use raftyard_cluster::pb::{Member, RemoveMemberRequest, StatusReply, StatusRequest};
use raftyard_cluster::PeerTls;
use serde_json::json;
use tonic::transport::Channel;

/// TLS material for talking to a peer port with mutual TLS: a directory with `ca.pem`,
/// `cert.pem` and `key.pem` (one node's directory from `raftyard certs cluster`).
pub type TlsDir = Option<std::path::PathBuf>;

/// The peer TLS material of `tls`, if given.
pub(crate) fn peer_tls(tls: &TlsDir) -> anyhow::Result<Option<PeerTls>> {
    Ok(tls.as_deref().map(PeerTls::load_dir).transpose()?)
}

/// An admin client of the peer port at `addr`.
pub(crate) async fn client(addr: &str, tls: &TlsDir) -> anyhow::Result<AdminClient<Channel>> {
    let ch = raftyard_cluster::peers::endpoint(addr, peer_tls(tls)?.as_ref())?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(600))
        .connect()
        .await
        .with_context(|| format!("connecting to the peer port {addr}"))?;
    // reports name every item (a collection of 100,000 links is about 8 MB of JSON)
    Ok(AdminClient::new(ch).max_decoding_message_size(1 << 30))
}

async fn status_of(addr: &str, tls: &TlsDir) -> anyhow::Result<StatusReply> {
    Ok(client(addr, tls).await?.status(StatusRequest {}).await?.into_inner())
}

/// The peer address of the leader, as known by the node at `addr`.
async fn leader_peer(addr: &str, tls: &TlsDir) -> anyhow::Result<String> {
    let s = status_of(addr, tls).await?;
    anyhow::ensure!(s.leader != 0, "node {} knows no leader right now", s.node);
    let m = s.members.iter().find(|m| m.id == s.leader).context("the leader is not in the membership")?;
    Ok(m.peer.clone())
}

/// Prints the cluster as seen from `node`, with each member's own figures.
pub async fn status(node: &str, as_json: bool, tls: &TlsDir) -> anyhow::Result<()> {
    let view = status_of(node, tls).await?;
    let mut rows = Vec::new();
    for m in &view.members {
        let own = status_of(&m.peer, tls).await;
        rows.push(match own {
            Ok(s) => json!({
                "id": m.id, "role": if s.role.is_empty() { m.role.clone() } else { s.role.clone() },
                "peer": m.peer, "registry": m.registry, "reachable": true,
                "lag": if s.lag_measured { json!({
                    "leader_reachable": s.leader_reachable, "entries": s.lag_entries,
                    "rpo_seconds": if s.rpo_known { json!(s.rpo_ms as f64 / 1000.0) } else { json!(null) }, "blobs_missing": s.blobs_missing,
                    "blob_bytes_missing": s.blob_bytes_missing, "blob_rpo_seconds": s.blob_rpo_ms as f64 / 1000.0,
                }) } else { json!(null) },
                "state": s.state, "term": s.term, "last_log_index": s.last_log_index,
                "committed": if s.committed > 0 { json!(s.committed) } else { json!(null) },
                "applied": s.applied, "blobs_missing": s.blobs_missing,
                "matched": if view.leader == view.node { json!(m.matched) } else { json!(null) },
            }),
            Err(e) => json!({"id": m.id, "role": m.role, "peer": m.peer, "registry": m.registry, "reachable": false, "error": e.to_string()}),
        });
    }
    let out = json!({"leader": view.leader, "term": view.term, "members": rows});
    if as_json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "leader: {}   term: {}",
        if view.leader == 0 { "none".into() } else { view.leader.to_string() },
        view.term
    );
    println!(
        "{:<4} {:<8} {:<10} {:<22} {:<22} {:>9} {:>9} {:>9} {:>8}",
        "id", "role", "state", "peer", "registry", "last_log", "committed", "applied", "missing"
    );
    for r in out["members"].as_array().expect("array") {
        let n = |k: &str| r[k].as_u64().map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:<4} {:<8} {:<10} {:<22} {:<22} {:>9} {:>9} {:>9} {:>8}",
            r["id"].as_u64().unwrap_or(0),
            r["role"].as_str().unwrap_or(""),
            r["state"].as_str().unwrap_or("unreachable"),
            r["peer"].as_str().unwrap_or(""),
            r["registry"].as_str().unwrap_or(""),
            n("last_log_index"),
            n("committed"),
            n("applied"),
            n("blobs_missing"),
        );
    }
    for r in out["members"].as_array().expect("array") {
        let lag = &r["lag"];
        if lag.is_null() {
            continue;
        }
        let blobs = match lag["blobs_missing"].as_u64().unwrap_or(0) {
            0 => "no blobs to fetch".to_string(),
            n => format!(
                "{n} blobs ({} MiB) to fetch, oldest missing for {:.1} s",
                lag["blob_bytes_missing"].as_u64().unwrap_or(0) >> 20,
                lag["blob_rpo_seconds"].as_f64().unwrap_or(0.0)
            ),
        };
        println!(
            "backup {}: {} entries behind, RPO {} (metadata), {blobs}{}",
            r["id"],
            lag["entries"],
            lag["rpo_seconds"].as_f64().map(|s| format!("{s:.1} s")).unwrap_or_else(|| "unknown".into()),
            if lag["leader_reachable"].as_bool() == Some(true) { "" } else { "; the leader did not answer" },
        );
    }
    Ok(())
}

/// Adds a node: it joins as a learner, catches up, then becomes a voter (unless `learner`:
/// then it stays a learner, as a backup does).
pub async fn add(
    node: &str,
    id: u64,
    peer: String,
    registry: String,
    learner: bool,
    tls: &TlsDir,
) -> anyhow::Result<()> {
    // Leadership can move while the member catches up (a large snapshot takes a while): the
    // new leader is asked again. Adding a member that is already one is a no-op, so the second
    // request finishes what the first began.
    let deadline = std::time::Instant::now() + ADD_RETRY_FOR;
    let mut asked = false;
    loop {
        let leader = match leader_peer(node, tls).await {
            Ok(l) => l,
            // a wrong address fails at once; a cluster between leaders is asked again
            Err(e) if asked && std::time::Instant::now() < deadline => {
                eprintln!("{e:#}; asking again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let member = Member { id, peer: peer.clone(), registry: registry.clone(), learner_only: learner };
        asked = true;
        match client(&leader, tls).await?.add_member(member).await {
            Ok(reply) => {
                println!("{}", reply.into_inner().message);
                return Ok(());
            }
            Err(s) if raftyard_cluster::codec::is_not_leader(&s) && std::time::Instant::now() < deadline => {
                eprintln!("{leader} is no longer the leader; asking the new one to add node {id}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => return Err(s).context("adding the member"),
        }
    }
}

/// How long `cluster add` keeps following leadership changes.
const ADD_RETRY_FOR: Duration = Duration::from_secs(120);

/// `cluster recover`: the stopped node whose data is under `data_dir` becomes the only voter.
pub async fn recover(data_dir: &std::path::Path, id: Option<u64>) -> anyhow::Result<()> {
    let meta = data_dir.join("meta");
    anyhow::ensure!(meta.is_dir(), "{} has no meta/ directory: not a raftyard data directory", data_dir.display());
    let r = raftyard_raft::recover::single_voter(&meta, id)
        .await
        .with_context(|| format!("recovering {}", data_dir.display()))?;
    println!(
        "node {} (peer {}, registry {}) is now the only voter (was: {:?}); {} entries applied, \
         the rest of its log is committed when it starts.\nStart it with `raftyard serve` and its config; \
         add nodes back with `raftyard cluster add`.",
        r.id, r.addr.peer, r.addr.registry, r.old_voters, r.applied
    );
    Ok(())
}

pub async fn remove(node: &str, id: u64, tls: &TlsDir) -> anyhow::Result<()> {
    let leader = leader_peer(node, tls).await?;
    let reply =
        client(&leader, tls).await?.remove_member(RemoveMemberRequest { id }).await.context("removing the member")?;
    println!("{}", reply.into_inner().message);
    Ok(())
}

/// `raftyard meta-size`: what a stopped node's metadata holds, part by part, and bytes per
/// manifest of each.
pub fn meta_size(data_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let meta = data_dir.join("meta");
    anyhow::ensure!(meta.is_dir(), "{} has no meta/ directory: not a raftyard data directory", data_dir.display());
    let m = raftyard_raft::size::measure(&meta)
        .with_context(|| format!("reading {} (is the node stopped?)", meta.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    let per = |b: u64| if m.manifests == 0 { "-".to_string() } else { format!("{:.0}", b as f64 / m.manifests as f64) };
    println!("{} manifests; bytes per manifest in the last column", m.manifests);
    println!("{:<16} {:>10} {:>14} {:>10}  what", "part", "entries", "bytes", "/manifest");
    for p in &m.parts {
        let b = p.key_bytes + p.value_bytes;
        println!("{:<16} {:>10} {:>14} {:>10}  {}", p.part, p.entries, b, per(b), p.what);
    }
    let (logical, files) = (m.logical_bytes(), m.file_bytes());
    println!("{:<16} {:>10} {:>14} {:>10}  keys and values of every part", "all parts", "", logical, per(logical));
    for (name, len) in &m.files {
        println!("{:<16} {:>10} {:>14} {:>10}  file", name, "", len, per(*len));
    }
    println!("{:<16} {:>10} {:>14} {:>10}  every file on disk", "on disk", "", files, per(files));
    Ok(())
}
