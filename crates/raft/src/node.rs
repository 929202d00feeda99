//! [`MetaNode`]: one Raft member with its sled storage, and the propose/read API the registry
//! uses. A proposal returns once its command is committed by a majority and applied here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::RaftNetworkFactory;
use raftyard_types::event::VersionedCommand;
use raftyard_types::{Event, Outcome, Rejection};
use tracing::info;

use crate::log_store::LogStore;
use crate::state::{StateMachine, StateReader};
use crate::watchdog::StorageWatch;
use crate::{NodeAddr, NodeId, Raft, TypeConfig};

/// Settings of the metadata node.
#[derive(Debug, Clone)]
pub struct MetaNodeConfig {
    pub id: NodeId,
    /// Directory of the sled database.
    pub dir: PathBuf,
    /// This node's addresses, as recorded in the membership.
    pub addr: NodeAddr,
    /// Initialise a new cluster with these voters if this node has no Raft state yet. Exactly
    /// one node of a new cluster is given the list; the others join when it contacts them.
    pub initial_members: Option<BTreeMap<NodeId, NodeAddr>>,
    /// Interval of the leader's heartbeats.
    pub heartbeat_ms: u64,
    /// How long the leader waits for a follower's answer to an append (or heartbeat) before
    /// retrying: more than the round trip to the farthest member plus its log fsync.
    pub append_timeout_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// How long the leader waits for a member's answer to one chunk of a snapshot it sends.
    /// The last chunk's answer comes once the member has installed the snapshot, which takes
    /// time in proportion to the state (16 s at 100,000 images here): a shorter wait gives up
    /// on every install and sends the snapshot again and again. A link that is down is found
    /// by the HTTP/2 keep-alive (15 s) instead.
    pub snapshot_timeout: Duration,
    /// Build a snapshot (and allow log purge) after this many applied entries.
    pub snapshot_every: u64,
    /// Log entries kept behind the latest snapshot, so that a lagging follower can catch up
    /// from the log instead of a snapshot.
    pub keep_logs: u64,
    /// Started as a backup (`node.role = "backup"`): while it is a learner it serves reads from
    /// its local state without a read barrier (they may be as old as its lag, and go on when no
    /// leader can be reached). Once a voter (after `raftyard cluster recover`) it is like any.
    pub backup: bool,
    /// A storage operation (an append, a flush, an apply) that takes longer stops the node:
    /// its device is wedged, and waiting longer commits nothing.
    pub storage_deadline: Duration,
    /// The deliberate fault of the tests: once this file exists, log flushes never return.
    pub hang_log_flush_when: Option<PathBuf>,
    /// Bytes of sled's page cache (sled's own default is 1 GiB). Reads past it come from the
    /// operating system's page cache.
    pub cache_bytes: u64,
    /// Compress what the metadata database writes (zstd, sled's own): a new database only,
    /// one that exists keeps the setting it was made with ([`open_db`]).
    pub compress: bool,
    /// A stuck storage operation ends the whole process at once (the binary's choice; a node
    /// run inside a test process only reports it through [`MetaNode::failed`]).
    pub exit_on_stuck_storage: bool,
}

impl MetaNodeConfig {
    pub fn new(id: NodeId, dir: PathBuf, addr: NodeAddr) -> Self {
        MetaNodeConfig {
            id,
            dir,
            initial_members: Some(BTreeMap::from([(id, addr.clone())])),
            addr,
            heartbeat_ms: 100,
            append_timeout_ms: 150,
            election_timeout_min_ms: 200,
            election_timeout_max_ms: 400,
            snapshot_timeout: Duration::from_secs(600),
            snapshot_every: 5000,
            keep_logs: 1000,
            backup: false,
            storage_deadline: Duration::from_secs(20),
            hang_log_flush_when: None,
            cache_bytes: 8 << 20,
            compress: false,
            exit_on_stuck_storage: false,
        }
    }
}

/// Why a proposal or a linearizable read did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// Committed, but the state machine refused it (deterministically, on every node).
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// This node is not the leader; the caller may forward to `leader`.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<(NodeId, NodeAddr)> },
    /// No quorum, shutting down, or a storage failure.
    #[error("metadata unavailable: {0}")]
    Unavailable(String),
}

/// How a follower reaches the leader: forwards proposals and asks for read indexes. The
/// cluster crate implements it over the peer protocol; a node without peers has none.
#[async_trait::async_trait]
pub trait LeaderLink: Send + Sync + 'static {
    /// Proposes `cmd` on `leader`; returns the log index at which it applied there and its outcome.
    async fn propose(
        &self,
        from: NodeId,
        leader: &NodeAddr,
        cmd: VersionedCommand,
    ) -> Result<(u64, Outcome), ProposeError>;
    /// Asks `leader` for an index that makes a local read linearizable once applied.
    async fn read_index(&self, from: NodeId, leader: &NodeAddr) -> Result<u64, ProposeError>;
    /// Asks `leader` for its answer to a readiness probe ([`MetaNode::probe_local`]).
    async fn probe(&self, from: NodeId, leader: &NodeAddr) -> Result<u64, ProposeError>;
    /// Asks `leader` to send heartbeats (carrying its commit index) now.
    async fn nudge(&self, leader: &NodeAddr);
    /// Asks the voter `to` to stand for election now: `from`, the leader, is stopping and has
    /// replicated its log to it up to `last_index`.
    async fn campaign(&self, from: NodeId, to: &NodeAddr, last_index: u64) -> Result<(), String>;
}

/// How long a proposal or read barrier keeps trying while no leader is known or the leader
/// changes under it.
const LEADER_DEADLINE: Duration = Duration::from_secs(10);

/// Largest command a proposal may carry (its encoding): a manifest at the 4 MiB limit with its
/// events fits. openraft 0.9 sends an entry whole and gives each append one
/// `append_timeout_ms`; an entry that cannot reach a follower and be made durable there in
/// that time is never acknowledged, and every leader elected after fails the same way (seen
/// with 100,000 blob placements in one entry). Larger work goes in several proposals.
pub const MAX_COMMAND_BYTES: u64 = 6 << 20;

/// Refuses a command over [`MAX_COMMAND_BYTES`], with the reason.
fn fits_one_entry(cmd: &VersionedCommand) -> Result<(), ProposeError> {
    let size = bincode::serialized_size(cmd).unwrap_or(u64::MAX);
    if size > MAX_COMMAND_BYTES {
        return Err(ProposeError::Unavailable(format!(
            "a command of {size} bytes is over the {MAX_COMMAND_BYTES} one log entry may carry"
        )));
    }
    Ok(())
}
/// How long a committed proposal may still take to apply on this node after the deadline.
const APPLY_AFTER_COMMIT: Duration = Duration::from_secs(2);

/// A failed attempt at a proposal or read index, and whether a leader failed to answer it.
struct Retry {
    error: ProposeError,
    /// The leader the attempt was forwarded to, when the failure was there (unreachable, dead,
    /// replaced, or no longer the leader).
    failed_leader: Option<NodeId>,
}

impl Retry {
    fn after(error: ProposeError, failed_leader: Option<NodeId>) -> Self {
        Retry { error, failed_leader }
    }

    /// No leader here yet, or a leader elsewhere that failed to answer: another leader may.
    /// A rejection is final, and so is this node's own Raft failing (stopped, storage).
    fn worth_it(&self) -> bool {
        match &self.error {
            ProposeError::NotLeader { .. } => true,
            ProposeError::Unavailable(_) => self.failed_leader.is_some(),
            ProposeError::Rejected(_) => false,
        }
    }
}

/// The first peer protocol whose nodes read proposal ids (`VersionedCommand::V2`).
pub const PROTOCOL_PROPOSAL_IDS: u32 = 2;
/// The first peer protocol whose nodes apply [`Event::BlobMounted`] and [`Event::Collected`].
pub const PROTOCOL_COLLECTIONS: u32 = 3;
/// The first peer protocol whose nodes keep usage figures and apply [`Event::QuotaSet`].
pub const PROTOCOL_QUOTAS: u32 = 4;

/// One member of the metadata Raft group.
#[derive(Clone)]
pub struct MetaNode {
    id: NodeId,
    raft: Raft,
    reader: StateReader,
    db: sled::Db,
    link: Option<Arc<dyn LeaderLink>>,
    backup: bool,
    watch: StorageWatch,
    snapshots: crate::state::SnapshotStore,
    /// The oldest peer protocol among the members (0: not known yet). Entries a member's
    /// release cannot decode (proposal ids, new events) are only proposed once every member can.
    cluster_protocol: Arc<std::sync::atomic::AtomicU32>,
    counters: RaftCounters,
    /// Held shared by each proposal made here, exclusively while this node hands its
    /// leadership over: the hand-over waits for proposals in flight, later ones wait for it
    /// (and then go to the new leader).
    leadership: Arc<tokio::sync::RwLock<()>>,
    /// Set while a hand-over holds this leader's heartbeats back, so that the other voters'
    /// leader leases run out and they vote for the successor.
    quiet: Arc<std::sync::atomic::AtomicBool>,
    /// How long a voter that heard from its leader refuses to vote for anyone else.
    leader_lease: Duration,
    /// The runtime Raft's tasks run on.
    _runtime: Arc<RaftRuntime>,
}

/// The runtime of one node's Raft: openraft's core, its replication and state-machine tasks,
/// the leader's heartbeat timer, and the connections Raft's messages travel on (the network
/// given to [`MetaNode::start`] dials them from these tasks). One worker thread.
///
/// An idle leader's work is its heartbeats: every 100 ms a message passes from the timer to the
/// core, to a replication task per follower, to that follower's HTTP/2 connection, and the
/// answers back the same way. On the node's main runtime each of those hand-overs could wake
/// another of its workers (measured on two cores: an empty cluster's leader 88–90 ms of CPU per
/// 10 s with four workers, 78–83 with two, 63–66 with one). On a runtime of its own with one
/// worker they stay on one thread, and the requests of the registry keep every worker of the
/// main runtime. Long storage work of the state machine (a snapshot's copy or install) leaves
/// the worker with [`blocking`], so that heartbeats and votes go on meanwhile.
struct RaftRuntime(Option<tokio::runtime::Runtime>);

impl RaftRuntime {
    fn new(id: NodeId) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("raft-{id}"))
            .enable_all()
            .build()?;
        Ok(RaftRuntime(Some(rt)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("the runtime lives as long as its node").handle()
    }
}

impl Drop for RaftRuntime {
    fn drop(&mut self) {
        // the last clone of a node may go inside another runtime's task, where a runtime
        // cannot wait for its own to end
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs `f`, a long piece of blocking storage work, so that the other tasks of a multi-threaded
/// runtime (Raft's: [`RaftRuntime`]) keep running meanwhile; inline elsewhere (a test's runtime).
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// What this node counts of its Raft group, for `/metrics`.
#[derive(Clone, Debug)]
pub struct RaftCounters {
    /// Time from a proposal to its outcome applied here (forwarding and retries included).
    pub proposal_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Times the leader this node knows changed (to another node or to none).
    pub leader_changes: prometheus_client::metrics::counter::Counter,
}

impl Default for RaftCounters {
    fn default() -> Self {
        let buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        RaftCounters {
            proposal_seconds: prometheus_client::metrics::histogram::Histogram::new(buckets.into_iter()),
            leader_changes: Default::default(),
        }
    }
}

/// Counts the changes of the leader this node knows, until Raft stops.
///
/// Long-lived waits watch `server_metrics` (vote, state, leader, membership), not `metrics`:
/// openraft sends the latter at every turn of its core, that is several times per heartbeat,
/// and each send wakes every waiter.
async fn count_leader_changes(raft: Raft, changes: prometheus_client::metrics::counter::Counter) {
    let mut metrics = raft.server_metrics();
    let mut last = metrics.borrow_and_update().current_leader;
    while metrics.changed().await.is_ok() {
        let now = metrics.borrow_and_update().current_leader;
        if now != last {
            changes.inc();
            last = now;
        }
    }
}

/// Sends the leader's heartbeats every `every` while this node leads and no hand-over holds
/// them back (`quiet`); ends when Raft stops. A node that does not lead waits for a change of
/// its role instead of waking at every interval.
async fn drive_heartbeats(raft: Raft, every: Duration, quiet: Arc<std::sync::atomic::AtomicBool>) {
    let mut server = raft.server_metrics();
    loop {
        while server.borrow_and_update().state != openraft::ServerState::Leader {
            if server.changed().await.is_err() {
                return; // Raft stopped: its metrics sender is gone
            }
        }
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match server.has_changed() {
                Err(_) => return,
                Ok(true) if server.borrow_and_update().state != openraft::ServerState::Leader => break,
                Ok(_) => {}
            }
            if !quiet.load(std::sync::atomic::Ordering::Relaxed) && raft.trigger().heartbeat().await.is_err() {
                return;
            }
        }
    }
}

/// Opens the metadata database at `dir` as a node does, with `cache_bytes` of sled cache, its
/// writes compressed if `compress` and the database is new.
///
/// No background flusher. Every write that must be durable is flushed where it is made (a log
/// append, a vote, a snapshot switch), so the flusher adds nothing to durability; what it adds
/// is sled 0.34's segment cleaning, which can fall into relocating the same pages for ever on an
/// idle node: measured after a 20k-image fill, a segment (512 KiB) written every half second
/// and a fsync every 500 ms on every node, a quarter of the leader's idle CPU, until a restart.
/// Without it the file holds the same size under a steady working set (docs/architecture.md,
/// "Metadata storage").
///
/// sled refuses to open a database with another compression setting than it was made with, so
/// an existing database keeps its own: `compress` applies to databases made from now on (a new
/// node, or one emptied and filled again from a snapshot).
pub fn open_db(dir: &std::path::Path, cache_bytes: u64, compress: bool) -> Result<sled::Db, sled::Error> {
    sled_config(dir, compress)?.mode(sled::Mode::HighThroughput).cache_capacity(cache_bytes).flush_every_ms(None).open()
}

/// Opens the metadata database at `dir` for a tool (a stopped node's storage, or a new one it
/// fills), with sled's own defaults; compressed if it was made so, or if it is new and
/// `compress`.
pub fn open_offline_db(dir: &std::path::Path, compress: bool) -> Result<sled::Db, sled::Error> {
    sled_config(dir, compress)?.open()
}

/// A sled config for the database at `dir` with its compression setting: the one it was made
/// with, read from the storage parameters sled keeps beside it (`conf`: lines `key: value`,
/// then a checksum), or `compress` when there are none yet (a new database).
fn sled_config(dir: &std::path::Path, compress: bool) -> Result<sled::Config, sled::Error> {
    let made = match std::fs::read(dir.join("conf")) {
        Ok(bytes) => String::from_utf8_lossy(&bytes)
            .lines()
            .find_map(|l| l.strip_prefix("use_compression: "))
            .map(|v| v.trim() == "true"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    Ok(sled::Config::new().path(dir).use_compression(made.unwrap_or(compress)))
}

impl MetaNode {
    /// Opens storage under `cfg.dir` and starts Raft with the given network.
    pub async fn start<N: RaftNetworkFactory<TypeConfig>>(
        cfg: MetaNodeConfig,
        network: N,
        link: Option<Arc<dyn LeaderLink>>,
    ) -> Result<Self, StartError> {
        std::fs::create_dir_all(&cfg.dir)?;
        // watched from the start: opening the database can hang on a wedged disk too
        let watch = match cfg.exit_on_stuck_storage {
            true => StorageWatch::exiting(cfg.storage_deadline),
            false => StorageWatch::new(cfg.storage_deadline),
        };
        let opening = watch.enter_bulk("metadata database open");
        let db = open_db(&cfg.dir, cfg.cache_bytes, cfg.compress)?;
        drop(opening);
        let log = LogStore::open_with_fault(&db, watch.clone(), cfg.hang_log_flush_when.clone())?;
        let sm = StateMachine::open(&db, &cfg.dir, watch.clone())?;
        let snapshots = sm.snapshots();
        let reader = sm.reader();
        // openraft 0.9 uses its heartbeat interval as the timeout of every append: a follower
        // further away than that (or with a slower fsync) would never acknowledge anything. So
        // openraft's interval is the append timeout, its own heartbeats are off, and
        // `drive_heartbeats` sends them at `heartbeat_ms` instead.
        let raft_cfg = openraft::Config {
            cluster_name: "raftyard".into(),
            heartbeat_interval: cfg.append_timeout_ms,
            enable_heartbeat: false,
            election_timeout_min: cfg.election_timeout_min_ms,
            election_timeout_max: cfg.election_timeout_max_ms,
            install_snapshot_timeout: cfg.snapshot_timeout.as_millis() as u64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
            max_in_snapshot_log_to_keep: cfg.keep_logs,
            ..Default::default()
        }
        .validate()
        .map_err(raft_err)?;
        let runtime = Arc::new(RaftRuntime::new(cfg.id).map_err(|e| raft_err(format!("its runtime: {e}")))?);
        // openraft spawns its tasks where it is created
        let raft = runtime
            .handle()
            .spawn(Raft::new(cfg.id, Arc::new(raft_cfg), network, log, sm))
            .await
            .map_err(raft_err)?
            .map_err(raft_err)?;
        let quiet = Arc::new(std::sync::atomic::AtomicBool::new(false));
        runtime.handle().spawn(drive_heartbeats(raft.clone(), Duration::from_millis(cfg.heartbeat_ms), quiet.clone()));
        let counters = RaftCounters::default();
        tokio::spawn(count_leader_changes(raft.clone(), counters.leader_changes.clone()));
        let node = MetaNode {
            id: cfg.id,
            raft,
            reader,
            db,
            link,
            backup: cfg.backup,
            watch,
            snapshots,
            cluster_protocol: Default::default(),
            counters,
            leadership: Default::default(),
            quiet,
            // openraft's leader lease is its election_timeout_max
            leader_lease: Duration::from_millis(cfg.election_timeout_max_ms),
            _runtime: runtime,
        };
        if let Some(members) = cfg.initial_members.filter(|m| !m.is_empty()) {
            if !node.raft.is_initialized().await.map_err(raft_err)? {
                info!(id = cfg.id, members = ?members.keys().collect::<Vec<_>>(), "initialising a new cluster");
                node.raft.initialize(members).await.map_err(raft_err)?;
            }
        }
        Ok(node)
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Where the latest snapshot is kept.
    pub(crate) fn snapshots(&self) -> &crate::state::SnapshotStore {
        &self.snapshots
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    pub fn reader(&self) -> &StateReader {
        &self.reader
    }

    /// The deadlines on this node's storage operations.
    pub fn storage(&self) -> &StorageWatch {
        &self.watch
    }

    /// Members of the current membership: id, addresses, and whether it votes.
    pub fn members(&self) -> Vec<(NodeId, NodeAddr, bool)> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let voters: std::collections::BTreeSet<NodeId> = m.membership().voter_ids().collect();
        m.membership().nodes().map(|(id, a)| (*id, a.clone(), voters.contains(id))).collect()
    }

    /// Whether this node is a backup now: started as one and not a voter.
    pub fn is_backup(&self) -> bool {
        self.backup && !self.is_voter()
    }

    /// The oldest peer protocol every member speaks (0 until known); set by whoever knows the
    /// members' versions (the cluster crate's version check).
    pub fn cluster_protocol(&self) -> u32 {
        self.cluster_protocol.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_cluster_protocol(&self, p: u32) {
        self.cluster_protocol.store(p, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether proposals carry an id: every member reads `VersionedCommand::V2`.
    pub fn proposal_ids(&self) -> bool {
        self.cluster_protocol() >= PROTOCOL_PROPOSAL_IDS
    }

    /// Whether this node is the leader, as far as it knows.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.id)
    }

    /// Whether this node votes in the current membership.
    pub fn is_voter(&self) -> bool {
        self.raft.metrics().borrow().membership_config.membership().voter_ids().any(|v| v == self.id)
    }

    /// Waits until some node is leader (and this node knows it), up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<NodeId> {
        let mut rx = self.raft.metrics();
        let r = tokio::time::timeout(timeout, rx.wait_for(|m| m.current_leader.is_some())).await;
        match r {
            Ok(Ok(m)) => m.current_leader,
            _ => None,
        }
    }

    /// Proposes events as one atomic command; returns once it is committed by a majority and
    /// applied on this node. A follower forwards to the leader.
    ///
    /// While there is no leader, or the leader dies or is replaced under a forwarded proposal,
    /// it waits for the next leader and proposes again, up to [`LEADER_DEADLINE`]. Proposing
    /// again is safe even when the first attempt was committed after all: the command carries a
    /// proposal id, and the state machine applies an id once (`VersionedCommand::V2`).
    pub async fn propose(&self, events: Vec<Event>) -> Result<(), ProposeError> {
        let started = tokio::time::Instant::now();
        let r = self.propose_until_applied(events).await;
        self.counters.proposal_seconds.observe(started.elapsed().as_secs_f64());
        r
    }

    /// What this node counts of its Raft group.
    pub fn counters(&self) -> &RaftCounters {
        &self.counters
    }

    async fn propose_until_applied(&self, events: Vec<Event>) -> Result<(), ProposeError> {
        let cmd = match self.proposal_ids() {
            true => VersionedCommand::with_id(rand::random::<u64>().max(1), events),
            false => VersionedCommand::V1(raftyard_types::Command::new(events)),
        };
        // refused here, not by the leader after a forward (which would be tried again)
        fits_one_entry(&cmd)?;
        let has_id = cmd.id().is_some();
        let deadline = tokio::time::Instant::now() + LEADER_DEADLINE;
        loop {
            let (r, via) = match (self.propose_local(cmd.clone()).await, &self.link) {
                (Err(ProposeError::NotLeader { leader: Some((id, addr)) }), Some(link)) => {
                    // A leader that stops answering (paused, cut off) would hold the request
                    // until the call's timeout; once another leader is known, propose there.
                    let r = tokio::select! {
                        r = tokio::time::timeout_at(deadline, link.propose(self.id, &addr, cmd.clone())) => {
                            r.unwrap_or_else(|_| Err(ProposeError::Unavailable(format!(
                                "leader {id} did not answer in time; the write's outcome is unknown"
                            ))))
                        }
                        _ = self.leader_moved_from(id) => Err(match has_id {
                            true => ProposeError::NotLeader { leader: None },
                            false => ProposeError::Unavailable(format!(
                                "leader {id} was replaced while the write was forwarded to it; its outcome is unknown"
                            )),
                        }),
                    };
                    // without an id, a command the leader may have received is not proposed
                    // again: it could apply twice
                    let failed = has_id.then_some(id);
                    (r.map_err(|e| Retry::after(e, failed)), Some(addr))
                }
                (r, _) => (r.map_err(|e| Retry::after(e, None)), None),
            };
            match r {
                Ok((index, outcome)) => {
                    // committed: a late answer still gets a moment to apply here, rather than
                    // being reported as a failure the client would repeat
                    let apply_by = deadline.max(tokio::time::Instant::now() + APPLY_AFTER_COMMIT);
                    self.wait_applied_until(index, apply_by, via.as_ref()).await?;
                    return outcome.map_err(ProposeError::Rejected);
                }
                Err(retry) => self.before_retry(retry, deadline).await?,
            }
        }
    }

    /// Waits before a proposal or read index is tried again, or gives up with the error once
    /// the deadline has passed. After a leader failed to answer, waits until another leader
    /// is known (or briefly, in case the same one answers again).
    async fn before_retry(&self, retry: Retry, deadline: tokio::time::Instant) -> Result<(), ProposeError> {
        let now = tokio::time::Instant::now();
        if now >= deadline || !retry.worth_it() {
            return Err(retry.error);
        }
        let pause = match retry.failed_leader {
            Some(_) => Duration::from_millis(100),
            None => Duration::from_millis(20),
        };
        let until = (now + pause).min(deadline);
        match retry.failed_leader {
            Some(old) => {
                let _ = tokio::time::timeout_at(until, self.leader_moved_from(old)).await;
            }
            None => tokio::time::sleep_until(until).await,
        }
        Ok(())
    }

    /// Proposes on this node, which must be the leader. Returns the applied index and outcome.
    pub async fn propose_local(&self, cmd: VersionedCommand) -> Result<(u64, Outcome), ProposeError> {
        fits_one_entry(&cmd)?;
        let _leading = self.leadership.read().await;
        match self.raft.client_write(cmd).await {
            Ok(resp) => Ok((resp.log_id.index, resp.data)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(ProposeError::NotLeader { leader: f.leader_id.zip(f.leader_node) })
            }
            Err(e) => Err(ProposeError::Unavailable(e.to_string())),
        }
    }

    /// Linearizable read barrier: after it returns, this node's state includes every write
    /// acknowledged before the call. On a backup it returns at once.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        if self.is_backup() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + LEADER_DEADLINE;
        loop {
            let (r, via) = match (self.read_index_local().await, &self.link) {
                (Err(ProposeError::NotLeader { leader: Some((id, addr)) }), Some(link)) => {
                    // a read index is safe to ask again: if the leader changes meanwhile, ask
                    // the new one
                    let r = tokio::select! {
                        r = tokio::time::timeout_at(deadline, link.read_index(self.id, &addr)) => {
                            r.unwrap_or_else(|_| Err(ProposeError::Unavailable(format!("leader {id} did not answer in time"))))
                        }
                        _ = self.leader_moved_from(id) => Err(ProposeError::NotLeader { leader: None }),
                    };
                    (r.map_err(|e| Retry::after(e, Some(id))), Some(addr))
                }
                (r, _) => (r.map_err(|e| Retry::after(e, None)), None),
            };
            match r {
                Ok(index) => return self.wait_applied_until(index, deadline, via.as_ref()).await,
                Err(retry) => self.before_retry(retry, deadline).await?,
            }
        }
    }

    /// Sends heartbeats now if this node leads (a follower waiting to apply asks for them),
    /// unless a hand-over holds them back.
    pub async fn heartbeat_now(&self) {
        if !self.quiet.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = self.raft.trigger().heartbeat().await;
        }
    }

    /// Hands this node's leadership to an up-to-date voter before it stops, so that no write
    /// waits for an election timeout: proposals in flight here finish and later ones wait, a
    /// voter whose log matches the leader's is asked to stand for election, and the leader's
    /// heartbeats pause so that the other voters' leader leases run out (openraft 0.9 has no
    /// transfer of its own: a voter refuses to vote while its lease runs). The old leader's
    /// own lease dates from its election, so once it has led for longer than a lease it grants
    /// the vote: with three voters that is the majority at once. With more voters, or a leader
    /// elected less than a lease ago, the successor asks again once the leases have run out.
    ///
    /// Returns the new leader, or `None` when this node does not lead, has no voter to hand
    /// over to, or the hand-over did not finish `within`: the cluster then elects a leader on
    /// its own timeout, as after a kill. Raft decides every election; this only chooses when
    /// one starts and who stands first, so it cannot cost safety.
    pub async fn hand_over(&self, within: Duration) -> Option<NodeId> {
        let others = {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.membership_config.membership().voter_ids().filter(|v| *v != self.id).count()
        };
        if !self.is_leader() || others == 0 {
            return None;
        }
        let link = self.link.as_ref()?;
        let deadline = tokio::time::Instant::now() + within;
        let held = tokio::time::timeout_at(deadline, self.leadership.write()).await;
        let Ok(_held) = held else {
            tracing::warn!("proposals in flight did not finish in time: no hand-over");
            return None;
        };
        // heartbeats resume whatever happens, even if this future is dropped
        let _loud = Loud(&self.quiet);
        self.hand_over_held(link.as_ref(), deadline).await
    }

    async fn hand_over_held(&self, link: &dyn LeaderLink, deadline: tokio::time::Instant) -> Option<NodeId> {
        let mut metrics = self.raft.metrics();
        // a voter with all of this leader's log: only it can win at once
        let pick = tokio::time::timeout_at(deadline, async {
            loop {
                let found = {
                    let m = metrics.borrow_and_update();
                    if m.state != openraft::ServerState::Leader {
                        return None;
                    }
                    let last = m.last_log_index.unwrap_or(0);
                    let matched = |id: &NodeId| -> u64 {
                        let r = m.replication.as_ref().and_then(|r| r.get(id).cloned().flatten());
                        r.map(|l| l.index).unwrap_or(0)
                    };
                    let membership = m.membership_config.membership();
                    let up_to_date: Vec<(NodeId, NodeAddr)> = membership
                        .voter_ids()
                        .filter(|v| *v != self.id && matched(v) == last)
                        .filter_map(|id| membership.get_node(&id).map(|a| (id, a.clone())))
                        .collect();
                    (!up_to_date.is_empty()).then_some((up_to_date, last))
                };
                if found.is_some() {
                    return found;
                }
                if metrics.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        let Some((candidates, last)) = pick.ok().flatten() else {
            tracing::warn!("no voter has this leader's whole log: no hand-over");
            return None;
        };
        self.quiet.store(true, std::sync::atomic::Ordering::Relaxed);
        // the first up-to-date voter that agrees to stand (one of an older release cannot)
        let mut standing = None;
        for (to, addr) in candidates {
            match tokio::time::timeout_at(deadline, link.campaign(self.id, &addr, last)).await {
                Ok(Ok(())) => {
                    standing = Some((to, addr));
                    break;
                }
                Ok(Err(e)) => tracing::warn!(to, error = %e, "a successor did not stand"),
                Err(_) => break,
            }
        }
        let Some((to, addr)) = standing else {
            tracing::warn!("no successor stood: the cluster elects on its own");
            return None;
        };
        tracing::info!(to, last_index = last, "handing leadership over");
        // the other voters' leases run out a lease after the last heartbeat they received (one
        // in flight lands a round trip later): then the successor asks again, and so on
        let mut round = tokio::time::Instant::now() + self.leader_lease + Duration::from_millis(30);
        loop {
            let this_round = round.min(deadline);
            round = tokio::time::Instant::now().max(round) + self.leader_lease;
            let elected = metrics.wait_for(|m| m.current_leader.is_some_and(|l| l != self.id));
            // matched at once: the metrics guard is gone before the next call
            match tokio::time::timeout_at(this_round, elected).await {
                Ok(Ok(m)) => return m.current_leader,
                Ok(Err(_)) => return None,
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!(to, "no new leader in time: the cluster elects on its own");
                    return None;
                }
                Err(_) => {}
            }
            let ask = tokio::time::timeout_at(deadline, link.campaign(self.id, &addr, last)).await;
            if let Ok(Err(e)) = ask {
                tracing::warn!(to, error = %e, "the successor did not stand again");
            }
        }
    }

    /// Stands for election at the request of `from`, this node's leader, which is stopping and
    /// has replicated its log here up to `last_index` ([`MetaNode::hand_over`]).
    pub async fn campaign(&self, from: NodeId, last_index: u64) -> Result<(), String> {
        let (leader, last) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (m.current_leader, m.last_log_index.unwrap_or(0))
        };
        if self.is_leader() {
            return Ok(()); // elected already: the old leader has not heard yet
        }
        if !self.is_voter() {
            return Err(format!("node {} cannot stand for election", self.id));
        }
        if leader.is_some_and(|l| l != from) {
            return Err(format!("node {from} is not the leader node {} follows", self.id));
        }
        if last < last_index {
            return Err(format!("node {} has the log up to {last}, not {last_index}", self.id));
        }
        tracing::info!(from, "standing for election: the leader hands over");
        self.raft.trigger().elect().await.map_err(|e| e.to_string())
    }

    /// The leader's answer to a readiness probe: its applied index, if a quorum acknowledged
    /// it within [`PROBE_FRESH`]. Read from Raft's metrics, so without a round of heartbeats:
    /// readiness asks whether a leader is in touch with a quorum and how far it got, not for a
    /// linearizable read (that takes [`MetaNode::read_barrier`]).
    pub fn probe_local(&self) -> Result<u64, ProposeError> {
        let m = self.raft.metrics();
        let m = m.borrow();
        if m.state != openraft::ServerState::Leader {
            let leader =
                m.current_leader.and_then(|id| m.membership_config.membership().get_node(&id).map(|a| (id, a.clone())));
            return Err(ProposeError::NotLeader { leader });
        }
        match m.millis_since_quorum_ack {
            Some(ms) if ms < PROBE_FRESH.as_millis() as u64 => Ok(self.reader.applied_index()),
            Some(ms) => Err(ProposeError::Unavailable(format!("no quorum acknowledged the leader for {ms} ms"))),
            None => Err(ProposeError::Unavailable("no quorum acknowledged the leader yet".into())),
        }
    }

    /// Whether this node could serve now: its leader (itself, or the one it asks) was
    /// acknowledged by a quorum within [`PROBE_FRESH`], and this node applies up to the
    /// leader's applied index `within`. The readiness check of `/v2/_raftyard/ready` and the
    /// relay's gate; a leader of an older release answers the probe with a read barrier.
    pub async fn probe(&self, within: Duration) -> Result<(), ProposeError> {
        let deadline = tokio::time::Instant::now() + within;
        let (index, via) = match (self.probe_local(), &self.link) {
            (Ok(index), _) => (index, None),
            (Err(ProposeError::NotLeader { leader: Some((id, addr)) }), Some(link)) => {
                let asked = tokio::time::timeout_at(deadline, link.probe(self.id, &addr)).await;
                let index =
                    asked.map_err(|_| ProposeError::Unavailable(format!("leader {id} did not answer in time")))??;
                (index, Some(addr))
            }
            (Err(e), _) => return Err(e),
        };
        self.wait_applied_until(index, deadline, via.as_ref()).await
    }

    /// Resolves once this node knows a leader other than `old`.
    async fn leader_moved_from(&self, old: NodeId) {
        let mut m = self.raft.metrics();
        let _ = m.wait_for(|m| m.current_leader.is_some_and(|l| l != old)).await;
    }

    /// The read index of this node, which must be the leader. Waits while a hand-over is under
    /// way: its round of heartbeats would renew the voters' leases the hand-over waits out.
    pub async fn read_index_local(&self) -> Result<u64, ProposeError> {
        let _leading = self.leadership.read().await;
        match self.raft.ensure_linearizable().await {
            Ok(log_id) => Ok(log_id.map(|l| l.index).unwrap_or(0)),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(ProposeError::NotLeader { leader: f.leader_id.zip(f.leader_node) })
            }
            Err(e) => Err(ProposeError::Unavailable(e.to_string())),
        }
    }

    /// Waits until this node has applied `index`. A follower learns that an index is committed
    /// from the leader's next append or heartbeat; openraft skips the heartbeat to a follower
    /// whose previous append is still in flight, which can leave it waiting for a whole
    /// heartbeat interval. So, when `leader` is given, a wait longer than a few milliseconds
    /// asks the leader for a heartbeat, with growing pauses.
    async fn wait_applied_until(
        &self,
        index: u64,
        deadline: tokio::time::Instant,
        leader: Option<&NodeAddr>,
    ) -> Result<(), ProposeError> {
        let late = || ProposeError::Unavailable(format!("log index {index} not applied here in time"));
        let (Some(leader), Some(link)) = (leader, &self.link) else {
            return tokio::time::timeout_at(deadline, self.reader.wait_applied(index)).await.map_err(|_| late());
        };
        let mut pause = Duration::from_millis(2);
        loop {
            let until = (tokio::time::Instant::now() + pause).min(deadline);
            if tokio::time::timeout_at(until, self.reader.wait_applied(index)).await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(late());
            }
            link.nudge(leader).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Resolves when Raft stops on its own because of an error (its storage failed: a full
    /// disk, an I/O error), or a storage operation outlived its deadline; never after a normal
    /// shutdown. Such a node can no longer take part and must stop, to be started again on its
    /// data once the cause is fixed.
    pub async fn failed(&self) -> Failure {
        tokio::select! {
            e = self.raft_failed() => Failure::Error(e),
            e = self.watch.stuck() => Failure::Stuck(e),
        }
    }

    async fn raft_failed(&self) -> String {
        // The core sets `running_state` as it ends, and its metrics senders go with it: wait
        // for that on the server metrics, which change seldom (see `count_leader_changes`).
        let mut server = self.raft.server_metrics();
        while server.changed().await.is_ok() {}
        // Raft's final metrics stay readable after their sender is gone
        let failed = match &self.raft.metrics().borrow().running_state {
            Err(openraft::error::Fatal::Stopped) | Ok(()) => None,
            Err(e) => Some(e.to_string()),
        };
        match failed {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }

    /// Stops Raft and flushes storage, within `SHUTDOWN_DEADLINE`: a core or a flush stuck on
    /// a wedged device is left behind (the process is about to end; what was acknowledged is
    /// on disk already).
    pub async fn shutdown(&self) {
        let r = tokio::time::timeout(SHUTDOWN_DEADLINE, async {
            let _ = self.raft.shutdown().await;
            let _ = self.db.flush_async().await;
        })
        .await;
        if r.is_err() {
            tracing::error!("Raft or its storage did not stop within {SHUTDOWN_DEADLINE:?}; leaving it behind");
        }
    }
}

/// How recently a quorum must have acknowledged a leader for it to pass a readiness probe:
/// the 2 s a read barrier had to complete its round in, before probes replaced it. A busy
/// leader skips heartbeats to followers whose appends are in flight, so the age of its last
/// quorum acknowledgement can exceed a second while it commits.
const PROBE_FRESH: Duration = Duration::from_secs(2);

/// How long [`MetaNode::shutdown`] waits for Raft and the final flush.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// Clears a hand-over's hold on heartbeats when dropped.
struct Loud<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for Loud<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Why a metadata node can no longer take part.
#[derive(Debug, Clone)]
pub enum Failure {
    /// Raft stopped on a storage error (the process may stop in order).
    Error(String),
    /// A storage operation never completed: threads are blocked in it, and an orderly stop
    /// would wait on them. The process should end at once.
    Stuck(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Error(e) => write!(f, "{e}"),
            Failure::Stuck(e) => write!(f, "storage stuck: {e}"),
        }
    }
}

/// Why a metadata node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("metadata storage: {0}")]
    Storage(String),
    #[error("raft: {0}")]
    Raft(String),
}

impl From<std::io::Error> for StartError {
    fn from(e: std::io::Error) -> Self {
        StartError::Storage(e.to_string())
    }
}

impl From<crate::StorageError> for StartError {
    fn from(e: crate::StorageError) -> Self {
        StartError::Storage(e.to_string())
    }
}

impl From<sled::Error> for StartError {
    fn from(e: sled::Error) -> Self {
        StartError::Storage(e.to_string())
    }
}

fn raft_err(e: impl std::fmt::Display) -> StartError {
    StartError::Raft(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftyard_types::Digest;

    /// A command too large for one log entry is refused before it reaches the log, with the
    /// reason; the node goes on committing what fits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_command_over_the_entry_limit_is_refused_before_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let addr = NodeAddr { peer: "127.0.0.1:1".into(), registry: "127.0.0.1:2".into() };
        let node =
            MetaNode::start(MetaNodeConfig::new(1, dir.path().to_path_buf(), addr), crate::network::NoNetwork, None)
                .await
                .unwrap();
        let placed = |n: u64| Event::BlobPlaced { digest: Digest::sha256(&n.to_le_bytes()), size: n, node: 1 };
        node.wait_for_leader(Duration::from_secs(10)).await.expect("a leader");
        node.propose(vec![placed(0)]).await.unwrap();
        let applied = node.reader().applied_index();
        let huge: Vec<Event> = (1..100_000).map(placed).collect();
        let err = node.propose(huge).await.unwrap_err().to_string();
        assert!(err.contains("one log entry may carry"), "{err}");
        assert_eq!(node.reader().applied_index(), applied, "nothing reached the log");
        let fits: Vec<Event> = (1..1_000).map(placed).collect();
        node.propose(fits).await.unwrap();
        assert!(node.reader().applied_index() > applied);
    }
}
