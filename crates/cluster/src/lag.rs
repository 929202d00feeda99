//! How far a backup is behind the primaries, as figures: log entries behind the leader's
//! commit index, the metadata RPO (how many seconds of acknowledged writes it could be
//! missing), and the blobs it still has to fetch. Measured once a second on backups, shown by
//! `raftyard cluster status` and in `/metrics`.
//!
//! The metadata RPO is `now − t_safe`, where `t_safe` is the latest time up to which this node
//! provably holds every acknowledged write:
//! - when the leader's commit index, asked at time `t`, is already applied here: `t` (every
//!   write acknowledged before `t` was committed, so has an index ≤ that commit index);
//! - otherwise, or when no leader answers: the proposal time of the last command applied here
//!   (every command is stamped by the leader that proposed it), if that is later.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use raftyard_raft::MetaNode;
use raftyard_types::event::now_ms;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::missing::Missing;
use crate::pb;
use crate::peers::Peers;

/// How often the figures are measured.
pub const EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Default, Serialize)]
pub struct LagFigures {
    /// This node is a backup and has been measured at least once.
    pub measured: bool,
    /// The leader answered the last measurement.
    pub leader_reachable: bool,
    /// The leader's commit index at the last answer.
    pub leader_committed: u64,
    pub applied: u64,
    /// Committed entries not yet applied here (at the last answer).
    pub entries_behind: u64,
    /// Seconds of acknowledged metadata writes this node could be missing (see the module).
    pub rpo_ms: u64,
    /// Whether `rpo_ms` means anything: false until the leader first answered or a command
    /// was applied here.
    pub rpo_known: bool,
    /// Blobs linked in some repository that this node does not hold, and their bytes.
    pub blobs_missing: u64,
    pub blob_bytes_missing: u64,
    /// For how long the oldest missing blob has been missing here (an upper bound: a blob
    /// first found missing counts from the previous measurement).
    pub blob_rpo_ms: u64,
}

/// The latest figures, shared by the monitor, the peer status service and `/metrics`.
#[derive(Clone, Default)]
pub struct Lag(Arc<Mutex<LagFigures>>);

impl Lag {
    pub fn get(&self) -> LagFigures {
        self.0.lock().unwrap().clone()
    }
}

pub struct LagMonitor {
    meta: MetaNode,
    missing: Missing,
    peers: Arc<Peers>,
    lag: Lag,
    t_safe_ms: u64,
}

impl LagMonitor {
    pub fn new(meta: MetaNode, missing: Missing, peers: Arc<Peers>, lag: Lag) -> Self {
        LagMonitor { meta, missing, peers, lag, t_safe_ms: 0 }
    }

    /// Measures every [`EVERY`] while this node is a backup, until `stop`.
    pub fn spawn(mut self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if self.meta.is_backup() {
                    let f = self.measure().await;
                    *self.lag.0.lock().unwrap() = f;
                }
            }
        })
    }

    /// The leader's commit index, asked over the peer port.
    async fn leader_committed(&self) -> Option<u64> {
        let m = self.meta.raft().metrics().borrow().clone();
        let leader = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&leader)?.peer.clone();
        let ch = self.peers.channel(&addr).ok()?;
        let mut c = pb::admin_client::AdminClient::new(ch);
        let r = tokio::time::timeout(Duration::from_secs(2), c.status(pb::StatusRequest {})).await.ok()?.ok()?;
        let s = r.into_inner();
        (s.node == leader && s.leader == leader).then_some(if s.committed > 0 { s.committed } else { s.last_log_index })
    }

    pub async fn measure(&mut self) -> LagFigures {
        let asked_ms = now_ms();
        let committed = self.leader_committed().await;
        let reader = self.meta.reader();
        let applied = reader.applied_index();
        let last_time = reader.last_journal_entry().ok().flatten().map(|e| e.time_ms).unwrap_or(0);
        self.t_safe_ms = self.t_safe_ms.max(last_time);
        let mut f = LagFigures { measured: true, applied, ..Default::default() };
        if let Some(c) = committed {
            f.leader_reachable = true;
            f.leader_committed = c;
            f.entries_behind = c.saturating_sub(applied);
            if applied >= c {
                self.t_safe_ms = self.t_safe_ms.max(asked_ms);
            }
        }
        f.rpo_known = self.t_safe_ms > 0;
        f.rpo_ms = if f.rpo_known { now_ms().saturating_sub(self.t_safe_ms) } else { 0 };

        // the blobs still to fetch, from the index (no scan of every placement)
        self.missing.refresh_off_runtime().await;
        let (count, bytes, oldest) = self.missing.figures();
        f.blobs_missing = count;
        f.blob_bytes_missing = bytes;
        f.blob_rpo_ms = oldest.map_or(0, |since| since.elapsed().as_millis() as u64);
        f
    }
}
