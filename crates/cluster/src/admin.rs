//! Membership and status over the peer port: what `raftyard cluster status|add|remove` use.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::ChangeMembers;
use raftyard_raft::{NodeAddr, NodeId, ProposeError};
use raftyard_types::access::RepoGlob;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::codec;
use crate::pb;
use crate::service::PeerServices;

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, NodeAddr>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            codec::propose_error_to_status(ProposeError::NotLeader { leader: f.leader_id.zip(f.leader_node) })
        }
        e => Status::unavailable(e.to_string()),
    }
}

impl PeerServices {
    /// This node's view of the cluster.
    ///
    /// The blobs it lacks come from the index the repair worker keeps ([`crate::Missing`]),
    /// brought up to the applied state on a blocking thread, never from a scan on the
    /// runtime: at a million blobs, stat-ing every file here held a runtime worker for 13 s,
    /// heartbeats went unanswered, and the cluster changed leader three times.
    pub async fn status(&self) -> pb::StatusReply {
        self.missing.refresh_off_runtime().await;
        let blobs_missing = self.missing.figures().0;
        let m = self.meta.raft().metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let matched = |id: &NodeId| -> u64 {
            m.replication.as_ref().and_then(|r| r.get(id).cloned().flatten()).map(|l| l.index).unwrap_or(0)
        };
        let members: Vec<pb::MemberStatus> = membership
            .nodes()
            .map(|(id, addr)| pb::MemberStatus {
                id: *id,
                peer: addr.peer.clone(),
                registry: addr.registry.clone(),
                role: if voters.contains(id) { "voter" } else { "learner" }.into(),
                matched: matched(id),
            })
            .collect();
        // The commit index is what a majority of voters has (known on the leader only).
        let committed = if m.replication.is_some() {
            let mut v: Vec<u64> = voters.iter().map(matched).collect();
            v.sort_unstable();
            v.get((v.len().saturating_sub(1)) / 2).copied().unwrap_or(0)
        } else {
            0
        };
        let lag = self.lag.get();
        let backup = self.meta.is_backup();
        let role = if backup {
            "backup"
        } else if voters.contains(&m.id) {
            "voter"
        } else {
            "learner"
        };
        pb::StatusReply {
            node: m.id,
            state: format!("{:?}", m.state),
            term: m.current_term,
            leader: m.current_leader.unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            committed,
            applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            members,
            blobs_missing,
            role: role.into(),
            lag_measured: backup && lag.measured,
            leader_reachable: lag.leader_reachable,
            lag_entries: lag.entries_behind,
            rpo_ms: lag.rpo_ms,
            blob_bytes_missing: lag.blob_bytes_missing,
            blob_rpo_ms: lag.blob_rpo_ms,
            rpo_known: lag.rpo_known,
        }
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for PeerServices {
    type BackupStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;
    type GcStream = tokio_stream::wrappers::ReceiverStream<Result<pb::GcProgress, Status>>;

    async fn retention(&self, req: Request<pb::RetentionRequest>) -> Result<Response<pb::RetentionReply>, Status> {
        let remote = req.remote_addr();
        let req = req.into_inner();
        let err = codec::propose_error_to_status;
        if req.list {
            self.meta.read_barrier().await.map_err(err)?;
            let all = self.meta.reader().retention_policies().map_err(|e| Status::internal(e.to_string()))?;
            return Ok(Response::new(pb::RetentionReply { json: serde_json::to_string(&all).expect("json") }));
        }
        let (what, result) = if req.run {
            let r = crate::retention::run(&self.meta, req.dry_run).await;
            let what = match &r {
                Ok(rep) => serde_json::json!({"run": {"dry_run": rep.dry_run, "tags": rep.tags_removed,
                    "manifests": rep.manifests_removed}}),
                Err(_) => serde_json::json!({"run": {"dry_run": req.dry_run}}),
            };
            (what, r.map(|rep| serde_json::to_string(&rep).expect("json")))
        } else {
            self.meta.read_barrier().await.map_err(err)?;
            crate::gc::require_collections(&self.meta).await.map_err(err)?;
            let event = if !req.set.is_empty() {
                let p: raftyard_types::lifecycle::RetentionPolicy =
                    bincode::deserialize(&req.set).map_err(|e| Status::invalid_argument(format!("policy: {e}")))?;
                p.check().map_err(Status::invalid_argument)?;
                raftyard_types::Event::RetentionSet(p)
            } else if !req.remove.is_empty() {
                let repos = raftyard_types::access::RepoGlob::parse(&req.remove)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                raftyard_types::Event::RetentionRemoved { repos }
            } else {
                return Err(Status::invalid_argument("set, remove, list or run"));
            };
            let what = event.to_json();
            (what, self.meta.propose(vec![event]).await.map(|()| String::new()))
        };
        let line = serde_json::json!({
            "audit": "retention", "node": self.meta.id(), "actor": req.actor,
            "from": remote.map(|a| a.to_string()), "what": what,
            "result": match &result { Ok(_) => "applied".to_string(), Err(e) => e.to_string() },
        });
        tracing::info!(target: "raftyard::audit", "{line}");
        match result {
            Ok(json) => Ok(Response::new(pb::RetentionReply { json })),
            Err(raftyard_raft::ProposeError::Rejected(rej)) => Err(Status::failed_precondition(rej.to_string())),
            Err(e) => Err(err(e)),
        }
    }

    async fn quota(&self, req: Request<pb::QuotaRequest>) -> Result<Response<pb::QuotaReply>, Status> {
        let remote = req.remote_addr();
        let req = req.into_inner();
        let err = codec::propose_error_to_status;
        let io = |e: std::io::Error| Status::internal(e.to_string());
        self.meta.read_barrier().await.map_err(err)?;
        let reader = self.meta.reader();
        if req.list {
            let all = reader.quotas().map_err(io)?;
            return Ok(Response::new(pb::QuotaReply { json: serde_json::to_string(&all).expect("json") }));
        }
        if !req.usage.is_empty() {
            let glob = RepoGlob::parse(&req.usage).map_err(|e| Status::invalid_argument(e.to_string()))?;
            let mut all = Vec::new();
            loop {
                let last = all.last().map(|u: &raftyard_types::lifecycle::RepoUsage| u.repository.clone());
                let page = reader.usage(Some(&glob), last.as_deref(), 10_000).map_err(io)?;
                if page.is_empty() {
                    break;
                }
                all.extend(page);
            }
            return Ok(Response::new(pb::QuotaReply { json: serde_json::to_string(&all).expect("json") }));
        }
        crate::versions::require_protocol(&self.meta, raftyard_raft::node::PROTOCOL_QUOTAS, Duration::ZERO)
            .await
            .map_err(err)?;
        let event = if !req.set.is_empty() {
            let q: raftyard_types::lifecycle::Quota =
                bincode::deserialize(&req.set).map_err(|e| Status::invalid_argument(format!("quota: {e}")))?;
            raftyard_types::Event::QuotaSet(q)
        } else if !req.remove.is_empty() {
            let repos = RepoGlob::parse(&req.remove).map_err(|e| Status::invalid_argument(e.to_string()))?;
            raftyard_types::Event::QuotaRemoved { repos }
        } else {
            return Err(Status::invalid_argument("set, remove, list or usage"));
        };
        let what = event.to_json();
        let result = self.meta.propose(vec![event]).await;
        let line = serde_json::json!({
            "audit": "quota", "node": self.meta.id(), "actor": req.actor,
            "from": remote.map(|a| a.to_string()), "what": what,
            "result": match &result { Ok(_) => "applied".to_string(), Err(e) => e.to_string() },
        });
        tracing::info!(target: "raftyard::audit", "{line}");
        match result {
            Ok(()) => Ok(Response::new(pb::QuotaReply { json: String::new() })),
            Err(raftyard_raft::ProposeError::Rejected(rej)) => Err(Status::failed_precondition(rej.to_string())),
            Err(e) => Err(err(e)),
        }
    }

    async fn gc(&self, req: Request<pb::GcRequest>) -> Result<Response<Self::GcStream>, Status> {
        let remote = req.remote_addr();
        let req = req.into_inner();
        let opts = crate::gc::GcOptions {
            untagged: req.untagged,
            grace: std::time::Duration::from_secs(req.grace_seconds),
            dry_run: req.dry_run,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (meta, stats) = (self.meta.clone(), self.gc.clone());
        tokio::spawn(async move {
            let progress = tx.clone();
            let r = crate::gc::collect(&meta, opts, &stats, |done, total| {
                let p = pb::GcProgress { done: done as u64, total: total as u64, report: String::new() };
                let _ = progress.try_send(Ok(p));
            })
            .await;
            let line = serde_json::json!({
                "audit": "gc", "node": meta.id(), "actor": req.actor, "from": remote.map(|a| a.to_string()),
                "dry_run": opts.dry_run, "untagged": opts.untagged, "grace_seconds": req.grace_seconds,
                "result": match &r {
                    Ok(rep) => serde_json::json!({"as_of": rep.as_of, "manifests": rep.manifests_removed,
                        "links": rep.links_removed, "blobs": rep.blobs_removed, "bytes": rep.bytes}),
                    Err(e) => serde_json::json!(e.to_string()),
                },
            });
            tracing::info!(target: "raftyard::audit", "{line}");
            let last = match r {
                Ok(rep) => Ok(pb::GcProgress { done: 0, total: 0, report: serde_json::to_string(&rep).expect("json") }),
                Err(e) => Err(codec::propose_error_to_status(e)),
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn backup(&self, _: Request<pb::BackupRequest>) -> Result<Response<Self::BackupStream>, Status> {
        use futures::StreamExt as _;
        let snap = self.meta.backup_snapshot().await.map_err(codec::propose_error_to_status)?;
        info!(index = snap.index(), bytes = snap.len, "backup snapshot taken");
        // streamed from the snapshot's file: the node never holds the whole state in memory
        let header = futures::stream::once(futures::future::ready(Ok(pb::BackupChunk { data: snap.header().into() })));
        let file = tokio::fs::File::from_std(snap.file);
        let data = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).map(|c| {
            c.map(|data| pb::BackupChunk { data }).map_err(|e| Status::internal(format!("reading the snapshot: {e}")))
        });
        Ok(Response::new(Box::pin(header.chain(data))))
    }

    async fn access(&self, req: Request<pb::AccessRequest>) -> Result<Response<pb::AccessReply>, Status> {
        let remote = req.remote_addr();
        Ok(Response::new(PeerServices::access(self, req.into_inner(), remote).await?))
    }

    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        Ok(Response::new(PeerServices::status(self).await))
    }

    async fn add_member(&self, req: Request<pb::Member>) -> Result<Response<pb::AdminReply>, Status> {
        let m = req.into_inner();
        let addr = NodeAddr { peer: m.peer.clone(), registry: m.registry.clone() };
        info!(id = m.id, peer = %m.peer, "adding a learner");
        // A leader just elected has not committed the membership it started with yet; a change
        // waits for that (a read index on the leader does) instead of failing.
        let _ = self.meta.read_index_local().await;
        // A release that cannot read this one's entries would stop on the first it receives: a
        // node joins if it speaks at least what every current member speaks.
        let recorded = self.meta.reader().protocol().map(|p| p.0).unwrap_or(u32::MAX);
        let needed = self.meta.cluster_protocol().max(recorded).max(crate::versions::PROPOSAL_IDS);
        match crate::versions::protocol_of(&self.peers, &m.peer).await {
            Some(p) if p >= needed => {}
            Some(p) => {
                return Err(Status::failed_precondition(format!(
                    "node {} at {} runs an older release (peer protocol {p}; this cluster's entries need {needed}): \
                     upgrade it before adding it",
                    m.id, m.peer,
                )))
            }
            None => {
                return Err(Status::unavailable(format!("node {} does not answer on its peer port {}", m.id, m.peer)))
            }
        }
        // Blocks until the learner has caught up with the log (or a snapshot).
        self.meta.raft().add_learner(m.id, addr, true).await.map_err(write_error)?;
        if m.learner_only {
            return Ok(Response::new(pb::AdminReply { message: format!("node {} added as a learner", m.id) }));
        }
        info!(id = m.id, "promoting to voter");
        self.meta
            .raft()
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([m.id])), false)
            .await
            .map_err(write_error)?;
        Ok(Response::new(pb::AdminReply { message: format!("node {} added as a voter", m.id) }))
    }

    async fn remove_member(&self, req: Request<pb::RemoveMemberRequest>) -> Result<Response<pb::AdminReply>, Status> {
        let id = req.into_inner().id;
        let m = self.meta.raft().metrics().borrow().clone();
        let is_voter = m.membership_config.membership().voter_ids().any(|v| v == id);
        let change = if is_voter {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        info!(id, is_voter, "removing a member");
        let _ = self.meta.read_index_local().await;
        self.meta.raft().change_membership(change, false).await.map_err(write_error)?;
        Ok(Response::new(pb::AdminReply { message: format!("node {id} removed") }))
    }
}

/// The access state as `raftyard user|token|access list` print it: no hash, no key.
pub fn access_json(s: &raftyard_types::access::AccessState) -> serde_json::Value {
    use serde_json::json;
    json!({
        "users": s.users.iter().map(|(n, u)| json!({
            "name": n, "admin": u.admin, "groups": u.groups, "created_ms": u.created_ms,
        })).collect::<Vec<_>>(),
        "robots": s.robots.iter().map(|(id, r)| json!({
            "id": id, "name": r.name, "created_ms": r.created_ms, "expires_ms": r.expires_ms,
            "last_used_ms": r.last_used_ms,
        })).collect::<Vec<_>>(),
        "grants": s.grants.iter().map(|g| json!({
            "subject": g.subject.key(), "repos": g.repos, "actions": g.actions.names(),
        })).collect::<Vec<_>>(),
        "signing_keys": s.keys.iter().map(|k| json!({"kid": k.kid, "created_ms": k.created_ms})).collect::<Vec<_>>(),
    })
}

impl PeerServices {
    /// Applies a change of who may do what (access events only), or lists the access state.
    pub async fn access(
        &self,
        req: pb::AccessRequest,
        remote: Option<std::net::SocketAddr>,
    ) -> Result<pb::AccessReply, Status> {
        if req.list {
            self.meta.read_barrier().await.map_err(codec::propose_error_to_status)?;
            let (_, s) = self.meta.reader().access().map_err(|e| Status::internal(e.to_string()))?;
            return Ok(pb::AccessReply { index: 0, json: access_json(&s).to_string() });
        }
        let events: Vec<raftyard_types::Event> =
            bincode::deserialize(&req.events).map_err(|e| Status::invalid_argument(format!("events: {e}")))?;
        if events.is_empty() || !events.iter().all(|e| e.is_access()) {
            return Err(Status::invalid_argument("only changes of users, tokens, grants and keys go through here"));
        }
        let summary: Vec<serde_json::Value> = events.iter().map(|e| e.to_json()).collect();
        let r = self.meta.propose(events).await;
        let line = serde_json::json!({
            "audit": "access_change", "node": self.meta.id(), "actor": req.actor,
            "from": remote.map(|a| a.to_string()), "events": summary,
            "result": match &r { Ok(()) => "applied".to_string(), Err(e) => e.to_string() },
        });
        tracing::info!(target: "raftyard::audit", "{line}");
        match r {
            Ok(()) => Ok(pb::AccessReply { index: self.meta.reader().applied_index(), json: String::new() }),
            Err(raftyard_raft::ProposeError::Rejected(rej)) => Err(Status::failed_precondition(rej.to_string())),
            Err(e) => Err(codec::propose_error_to_status(e)),
        }
    }
}
