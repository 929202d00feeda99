//! What the other members speak: each node asks every member for its peer protocol
//! (`Meta.Version`; a release before the call answers UNIMPLEMENTED, protocol 1) and records the
//! oldest one in [`MetaNode::set_cluster_protocol`]: proposals carry ids, mounts and collections
//! use their own events, only once every member reads them. So a cluster upgraded one node at
//! a time never sends an entry to a node that cannot decode it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use raftyard_raft::{MetaNode, NodeId, ProposeError};
use raftyard_types::event::now_ms;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::pb::meta_client::MetaClient;
use crate::pb::VersionRequest;
use crate::peers::Peers;

/// The peer protocol this release speaks: 2 adds proposal ids in log entries and forwarded
/// proposals (`VersionedCommand::V2`); 3 the `BlobMounted` and `Collected` events; 4 usage
/// figures and the quota events.
pub const PEER_PROTOCOL: u32 = 4;
/// The first protocol with proposal ids: a member below it cannot read entries that carry them.
pub(crate) const PROPOSAL_IDS: u32 = raftyard_raft::node::PROTOCOL_PROPOSAL_IDS;

/// Fails unless the log records that every member speaks peer protocol `want`
/// (`ClusterUpgraded`), recorded at least `settle` ago; waits for that up to 30 s (a cluster
/// just started, or just upgraded), unless a member is known to speak an older protocol.
/// Call after a read barrier.
pub(crate) async fn require_protocol(meta: &MetaNode, want: u32, settle: Duration) -> Result<(), ProposeError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (p, at) = meta.reader().protocol().map_err(|e| ProposeError::Unavailable(e.to_string()))?;
        let age = Duration::from_millis(now_ms().saturating_sub(at));
        if p >= want && age >= settle {
            return Ok(());
        }
        // a member known to run an older release will not change its mind within the wait
        let known_older = (1..want).contains(&meta.cluster_protocol()) && p < want;
        if known_older || tokio::time::Instant::now() >= deadline {
            return Err(ProposeError::Unavailable(match (p >= want, meta.cluster_protocol()) {
                (true, _) => "the cluster was upgraded a moment ago: try again in a few seconds".into(),
                (false, 0) => "the versions of the members are not known yet (is every member up?)".into(),
                (false, c) if c < want => {
                    format!("a member runs an older release (peer protocol {c} < {want}): upgrade every node first")
                }
                (false, _) => {
                    format!("every member speaks protocol {want}, the leader has not recorded it yet: try again")
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        meta.read_barrier().await?;
    }
}

/// Asks one peer for its protocol: `None` if it could not be reached.
pub(crate) async fn protocol_of(peers: &Peers, addr: &str) -> Option<u32> {
    let ch = peers.channel(addr).ok()?;
    let mut req = tonic::Request::new(VersionRequest {});
    req.set_timeout(Duration::from_secs(2));
    match MetaClient::new(ch).version(req).await {
        Ok(r) => Some(r.into_inner().protocol),
        Err(s) if s.code() == tonic::Code::Unimplemented => Some(1),
        Err(_) => None,
    }
}

/// Checks the members until `stop`: every 0.5 s until each has answered once, then every 10 s.
/// A member that cannot be reached counts with what it last answered; one never heard from
/// keeps proposal ids off.
pub fn spawn(meta: MetaNode, peers: Arc<Peers>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut known: HashMap<NodeId, u32> = HashMap::new();
        loop {
            let all_members = meta.members();
            // a node not in a membership yet (waiting to be contacted) knows nobody's version
            let joined = all_members.iter().any(|(id, ..)| *id == meta.id());
            let members: Vec<_> = all_members.into_iter().filter(|(id, ..)| *id != meta.id()).collect();
            for (id, addr, _) in &members {
                match protocol_of(&peers, &addr.peer).await {
                    Some(p) if known.insert(*id, p) != Some(p) => {
                        if p > PEER_PROTOCOL {
                            warn!(
                                member = id,
                                protocol = p,
                                ours = PEER_PROTOCOL,
                                "a member speaks a newer peer protocol: upgrade this node"
                            );
                        } else if p < PROPOSAL_IDS {
                            warn!(
                                member = id,
                                protocol = p,
                                "a member runs an older release: writes go without proposal ids until it is upgraded"
                            );
                        }
                    }
                    _ => {}
                }
            }
            known.retain(|id, _| members.iter().any(|(m, ..)| m == id));
            // the oldest protocol of all, this node's included; 0 while any is unknown
            let oldest =
                members.iter().map(|(id, ..)| known.get(id).copied().unwrap_or(0)).fold(PEER_PROTOCOL, u32::min);
            let oldest = if joined { oldest } else { 0 };
            // the leader records in the log that every member speaks this protocol: from that
            // entry on, every node applies and proposes what it adds
            let recorded = meta.reader().protocol().map(|p| p.0).unwrap_or(u32::MAX);
            let leads = meta.is_leader();
            let unrecorded = oldest > recorded && oldest >= raftyard_raft::node::PROTOCOL_COLLECTIONS;
            if leads && unrecorded {
                let ev = raftyard_types::Event::ClusterUpgraded { protocol: oldest };
                match meta.propose(vec![ev]).await {
                    Ok(()) => info!(protocol = oldest, "every member speaks this peer protocol: recorded in the log"),
                    Err(e) => warn!(error = %e, "recording the members' peer protocol failed; trying again"),
                }
            }
            if oldest != meta.cluster_protocol() {
                meta.set_cluster_protocol(oldest);
                info!(
                    protocol = oldest,
                    proposal_ids = meta.proposal_ids(),
                    "the oldest peer protocol of the members (proposal ids make retries of forwarded writes safe)"
                );
            }
            let every = if !joined {
                // waiting for the first membership: nothing to ask, so look again soon
                Duration::from_millis(100)
            } else if !unrecorded && members.iter().all(|(id, ..)| known.contains_key(id)) {
                // (while the protocol waits to be recorded, whoever leads next records it soon)
                Duration::from_secs(10)
            } else {
                Duration::from_millis(500)
            };
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
        }
    })
}
