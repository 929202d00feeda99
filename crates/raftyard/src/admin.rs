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

async fn client(addr: &str, tls: &TlsDir) -> anyhow::Result<AdminClient<Channel>> {
    let tls = match tls {
        Some(d) => Some(PeerTls::load_dir(d)?),
        None => None,
    };
    let ch = raftyard_cluster::peers::endpoint(addr, tls.as_ref())?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(600))
        .connect()
        .await
        .with_context(|| format!("connecting to the peer port {addr}"))?;
    Ok(AdminClient::new(ch))
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
                "id": m.id, "role": m.role, "peer": m.peer, "registry": m.registry, "reachable": true,
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
    Ok(())
}

/// Adds a node: it joins as a learner, catches up, then becomes a voter (unless `learner`).
pub async fn add(
    node: &str,
    id: u64,
    peer: String,
    registry: String,
    learner: bool,
    tls: &TlsDir,
) -> anyhow::Result<()> {
    let leader = leader_peer(node, tls).await?;
    let reply = client(&leader, tls)
        .await?
        .add_member(Member { id, peer, registry, learner_only: learner })
        .await
        .context("adding the member")?;
    println!("{}", reply.into_inner().message);
    Ok(())
}

pub async fn remove(node: &str, id: u64, tls: &TlsDir) -> anyhow::Result<()> {
    let leader = leader_peer(node, tls).await?;
    let reply =
        client(&leader, tls).await?.remove_member(RemoveMemberRequest { id }).await.context("removing the member")?;
    println!("{}", reply.into_inner().message);
    Ok(())
}
