//! Wiring: opens the blob store and the metadata node, serves the peer port and the registry,
//! shuts everything down in order.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use raftyard_blobstore::{BlobStore, BlobStoreConfig, Reserve};
use raftyard_cluster::{
    BlobPeers, GrpcLeaderLink, Lag, LagMonitor, LocalHttpSlot, Missing, PeerNetwork, PeerServices, PeerTls, Peers,
    RepairWorker,
};
use raftyard_raft::{Failure, MetaNode, MetaNodeConfig, NodeAddr};
use raftyard_registry::{LocalRegistry, Registry, RegistryConfig, TlsFiles};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Config;

/// Who initialises a new cluster: a lone node itself; in a configured cluster only the member
/// with the lowest id; a joining node never.
fn initial_members(cfg: &Config, me: &NodeAddr) -> Option<BTreeMap<u64, NodeAddr>> {
    let c = &cfg.cluster;
    if c.join || cfg.node.role == crate::config::Role::Backup {
        return None;
    }
    if c.members.is_empty() {
        return Some(BTreeMap::from([(cfg.node.id, me.clone())]));
    }
    let lowest = c.members.iter().map(|m| m.id).min()?;
    (lowest == cfg.node.id).then(|| {
        c.members
            .iter()
            .map(|m| {
                let addr = if m.id == cfg.node.id {
                    me.clone()
                } else {
                    NodeAddr { peer: m.peer.clone(), registry: m.registry.clone() }
                };
                (m.id, addr)
            })
            .collect()
    })
}

/// A node running in this process.
pub struct RunningNode {
    /// Address the registry API is bound to.
    pub registry_addr: std::net::SocketAddr,
    /// Address the peer port is bound to.
    pub peer_addr: std::net::SocketAddr,
    /// This node's addresses as recorded in the membership.
    pub addr: NodeAddr,
    pub meta: MetaNode,
    stop: CancellationToken,
    /// Why the node stopped by itself, if it did.
    failure: Arc<OnceLock<Failure>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningNode {
    /// Why the node stopped by itself (its metadata storage failed or is stuck), if it did.
    pub fn failure(&self) -> Option<&Failure> {
        self.failure.get()
    }

    /// Stops accepting, drains in-flight requests, stops Raft and flushes storage.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await?
    }
}

/// How long a stopping node may take, from SIGTERM (or a failure) to the end of the process:
/// the registry's drain, then the peer port and Raft, each under its own deadline.
const STOP_DEADLINE: Duration = Duration::from_secs(50);

/// Runs a node until SIGTERM or Ctrl-C, or until it fails (then with an error, so that its
/// supervisor starts it again). The process always ends: within [`STOP_DEADLINE`] of the
/// signal, at once on a second signal, and at once when its storage is stuck (threads blocked
/// in it would hold an orderly stop for ever; what was acknowledged is on disk already).
pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    let node = start_node(cfg, true).await?;
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = node.stop.cancelled() => {}
    }
    if let Some(f @ Failure::Stuck(_)) = node.failure() {
        error!(failure = %f, "metadata storage is stuck: exiting now");
        std::process::exit(raftyard_raft::watchdog::EXIT_STORAGE_STUCK);
    }
    tokio::select! {
        r = tokio::time::timeout(STOP_DEADLINE, node.stop()) => match r {
            Ok(r) => r,
            Err(_) => {
                error!("the node did not stop within {STOP_DEADLINE:?}: exiting");
                std::process::exit(1);
            }
        },
        _ = shutdown_signal() => {
            warn!("second signal: exiting without finishing the drain");
            std::process::exit(1);
        }
    }
}

/// Opens storage, binds the ports and starts every part of a node; returns once it serves.
/// A stuck storage operation is reported by [`RunningNode::failure`] (the process goes on).
pub async fn start(cfg: Config) -> anyhow::Result<RunningNode> {
    start_node(cfg, false).await
}

/// [`start`]; with `exit_on_stuck_storage`, a stuck storage operation ends the process at
/// once, even while the node is still starting (the binary's way).
async fn start_node(cfg: Config, exit_on_stuck_storage: bool) -> anyhow::Result<RunningNode> {
    let data = cfg.node.data_dir.clone();
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    crate::format::open(&data)?;
    let blobs = Arc::new(
        BlobStore::open(BlobStoreConfig {
            min_free_bytes: cfg.node.min_free_mb << 20,
            max_sessions: cfg.registry.max_upload_sessions,
            max_sessions_per_client: cfg.registry.max_upload_sessions_per_client,
            ..BlobStoreConfig::new(data.clone(), format!("n{}", cfg.node.id))
        })
        .context("opening the blob store")?,
    );

    let peer_listener = tokio::net::TcpListener::bind(cfg.cluster.listen)
        .await
        .with_context(|| format!("binding the peer port {}", cfg.cluster.listen))?;
    let listener = tokio::net::TcpListener::bind(cfg.registry.listen)
        .await
        .with_context(|| format!("binding {}", cfg.registry.listen))?;
    let metrics_listener = match cfg.registry.metrics_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a).await.with_context(|| format!("binding registry.metrics_listen {a}"))?,
        ),
        None => None,
    };
    let peer_bound = peer_listener.local_addr()?;
    let me = NodeAddr {
        peer: cfg.cluster.advertise_peer.clone().unwrap_or(peer_listener.local_addr()?.to_string()),
        registry: cfg.cluster.advertise_registry.clone().unwrap_or(listener.local_addr()?.to_string()),
    };

    // the metadata's reserve first: released now if the disk is full (this node may have
    // stopped on it), so that the metadata opens and the node catches up
    let reserve = Arc::new(Reserve::new(data.join(META_RESERVE), cfg.node.meta_reserve_mb << 20, RESERVE_LOW));
    if let Err(e) = reserve.adjust() {
        warn!(error = %e, "could not adjust the metadata reserve");
    }
    let mut meta_cfg = MetaNodeConfig::new(cfg.node.id, data.join("meta"), me.clone());
    meta_cfg.initial_members = initial_members(&cfg, &me);
    meta_cfg.heartbeat_ms = cfg.raft.heartbeat_ms;
    meta_cfg.append_timeout_ms = cfg.raft.append_timeout_ms;
    meta_cfg.election_timeout_min_ms = cfg.raft.election_timeout_min_ms;
    meta_cfg.election_timeout_max_ms = cfg.raft.election_timeout_max_ms;
    meta_cfg.snapshot_timeout = Duration::from_secs(cfg.raft.snapshot_timeout_secs);
    meta_cfg.snapshot_every = cfg.raft.snapshot_every;
    meta_cfg.keep_logs = cfg.raft.keep_logs;
    meta_cfg.backup = cfg.node.role == crate::config::Role::Backup;
    meta_cfg.storage_deadline = Duration::from_millis(cfg.raft.storage_deadline_ms);
    meta_cfg.cache_bytes = cfg.raft.cache_mib << 20;
    meta_cfg.compress = cfg.raft.compress_metadata;
    meta_cfg.exit_on_stuck_storage = exit_on_stuck_storage;
    let fault = deliberate_fault()?;
    if fault == Some(DeliberateFault::HangLogFlush) {
        meta_cfg.hang_log_flush_when = Some(data.join(HANG_LOG_FLUSH_MARKER));
    }
    let peer_tls = match &cfg.cluster.tls {
        Some(t) => Some(PeerTls::load(&t.ca, &t.cert, &t.key).context("loading the peer TLS files")?),
        None => None,
    };
    let peers = Arc::new(Peers::with_tls(peer_tls.clone()).dialling_via(cfg.cluster.dial_via.clone()));
    let link = Arc::new(GrpcLeaderLink::new(peers.clone()));
    let meta = MetaNode::start(meta_cfg, PeerNetwork::new(Arc::new(peers.own_connections())), Some(link))
        .await
        .context("starting the metadata node")?;

    let stop = CancellationToken::new();
    let local_registry: LocalHttpSlot = Arc::new(OnceLock::new());
    let lag = Lag::default();
    // The peer port stays up until the registry has drained: a request in flight here may
    // wait for an entry to apply, which the leader sends over it, and peers may be streaming
    // an upload's replica to this node.
    let peer_stop = CancellationToken::new();
    let gc_stats = raftyard_cluster::GcStats::default();
    let missing = Missing::new(meta.clone(), blobs.clone());
    let peer_server = tokio::spawn(raftyard_cluster::serve(
        PeerServices {
            meta: meta.clone(),
            blobs: blobs.clone(),
            local: local_registry.clone(),
            lag: lag.clone(),
            peers: peers.clone(),
            version: match fault {
                Some(DeliberateFault::PeerProtocol(1)) => None,
                Some(DeliberateFault::PeerProtocol(p)) => Some((p, p.min(crate::format::DATA_FORMAT))),
                _ => Some((raftyard_cluster::versions::PEER_PROTOCOL, crate::format::DATA_FORMAT)),
            },
            gc: gc_stats.clone(),
            missing: missing.clone(),
        },
        peer_listener,
        peer_tls,
        peer_stop.clone().cancelled_owned(),
    ));
    raftyard_cluster::versions::spawn(meta.clone(), peers.clone(), stop.clone());
    let backup = cfg.node.role == crate::config::Role::Backup;
    let lone = cfg.cluster.members.len() <= 1 && !cfg.cluster.join && !backup;
    if lone {
        meta.wait_for_leader(Duration::from_secs(10)).await.context("no Raft leader was elected")?;
    } else {
        let m = meta.clone();
        tokio::spawn(async move {
            match m.wait_for_leader(Duration::from_secs(3600)).await {
                Some(l) => info!(leader = l, "cluster has a leader"),
                None => warn!("no leader known after an hour"),
            }
        });
    }

    let tls = match &cfg.registry.tls {
        Some(t) => Some(TlsFiles { cert: t.cert.clone(), key: t.key.clone() }.acceptor()?),
        None => None,
    };
    let lag_monitor = LagMonitor::new(meta.clone(), missing.clone(), peers.clone(), lag.clone()).spawn(stop.clone());
    let blob_peers = BlobPeers::new(peers, blobs.clone());
    let fetches = blob_peers.clone().throttled(cfg.cluster.fetch_limit_mib_per_sec << 20);
    let repair = RepairWorker::new(meta.clone(), blobs.clone(), fetches, missing.clone()).spawn(stop.clone());
    let sweeper = raftyard_cluster::gc::spawn_sweeper(meta.clone(), blobs.clone(), gc_stats.clone(), stop.clone());
    if cfg.gc.interval_secs > 0 {
        let opts = raftyard_cluster::gc::GcOptions {
            untagged: cfg.gc.untagged,
            grace: Duration::from_secs(cfg.gc.grace_secs),
            dry_run: false,
        };
        let every = Duration::from_secs(cfg.gc.interval_secs);
        raftyard_cluster::gc::spawn_schedule(meta.clone(), every, opts, gc_stats.clone(), stop.clone());
    }
    if cfg.retention.interval_secs > 0 {
        let every = Duration::from_secs(cfg.retention.interval_secs);
        raftyard_cluster::retention::spawn_schedule(meta.clone(), every, stop.clone());
    }
    let auth = match &cfg.auth {
        Some(a) if a.mode != crate::config::AuthMode::None => {
            let auth = raftyard_auth::Auth::new(
                a.settings()?,
                Box::new(raftyard_registry::access::StateAccess(meta.reader().clone())),
            )
            .map_err(|e| anyhow::anyhow!("[auth]: {e}"))?;
            info!(mode = ?a.mode, htpasswd = ?a.htpasswd, "authentication on");
            Some(Arc::new(auth))
        }
        Some(_) => {
            warn!("authentication is off ([auth] mode = \"none\"): anyone who reaches this node may push, delete and read");
            None
        }
        None => {
            warn!("authentication is off: this registry listens on loopback only; configure [auth] before exposing it");
            None
        }
    };
    let reg = Registry::new(
        blobs.clone(),
        meta.clone(),
        blob_peers,
        raftyard_registry::NodeFigures { lag, gc: gc_stats, missing },
        RegistryConfig {
            delete_enabled: cfg.registry.delete_enabled,
            upload_idle_timeout: cfg.upload_idle_timeout(),
            blob_write_quorum: cfg.cluster.blob_write_quorum,
            fault: match fault {
                Some(DeliberateFault::Registry(f)) => Some(f),
                _ => None,
            },
            tls: tls.is_some(),
        },
        auth,
    );
    let _ = local_registry.set(Arc::new(LocalRegistry(reg.clone())));
    let upkeep = reg.spawn_upkeep();
    let reserve_keeper = tokio::spawn(keep_reserve(reserve));
    if cfg.raft.journal_keep_days > 0 || cfg.raft.journal_keep_entries > 0 {
        tokio::spawn(journal_retention(meta.clone(), cfg.raft.clone(), stop.clone()));
    }
    if cfg.auth.as_ref().is_some_and(|a| a.mode == crate::config::AuthMode::Token) {
        tokio::spawn(first_signing_key(meta.clone(), stop.clone()));
    }
    let agent = start_agent(&cfg, listener.local_addr()?, peer_bound, &reg, &stop)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    info!(node = cfg.node.id, peer = %me.peer, data = %data.display(), "raftyard registry ready at {scheme}://{}", listener.local_addr()?);
    let registry_addr = listener.local_addr()?;
    let peer_addr = peer_bound;
    // a node whose metadata storage failed or is stuck stops (crash-only): started again on
    // its data, it recovers from its log like after a kill
    let failure: Arc<OnceLock<Failure>> = Arc::new(OnceLock::new());
    tokio::spawn({
        let (meta, stop, failure) = (meta.clone(), stop.clone(), failure.clone());
        async move {
            tokio::select! {
                e = meta.failed() => {
                    error!(error = %e, "metadata storage failed: this node stops");
                    let _ = failure.set(e);
                    stop.cancel();
                }
                _ = stop.cancelled() => {}
            }
        }
    });
    let task = {
        let stop = stop.clone();
        let meta = meta.clone();
        let failure = failure.clone();
        tokio::spawn(async move {
            // a leader hands over at once, while its peer port still takes the proposals that
            // followers forward, so that writes go on before the drain ends
            let hand_over = tokio::spawn({
                let (stop, meta, failure) = (stop.clone(), meta.clone(), failure.clone());
                async move {
                    stop.cancelled().await;
                    if failure.get().is_none() {
                        if let Some(to) = meta.hand_over(HAND_OVER_WITHIN).await {
                            info!(to, "leadership handed over");
                        }
                    }
                }
            });
            if let Some(agent) = agent {
                // leave the relays first, so no new visitor arrives while the registry drains
                let stop = stop.clone();
                tokio::spawn(async move {
                    stop.cancelled().await;
                    agent.stop().await;
                });
            }
            if let Some(l) = metrics_listener {
                tokio::spawn(raftyard_registry::serve_metrics(reg.clone(), l, stop.clone().cancelled_owned()));
            }
            let served = raftyard_registry::serve(reg, listener, tls, stop.clone().cancelled_owned()).await;
            upkeep.abort();
            reserve_keeper.abort();
            stop.cancel();
            let _ = repair.await;
            let _ = lag_monitor.await;
            let _ = sweeper.await;
            // the hand-over ends within its own bound (a call to the successor may add its
            // timeout): the peer port and Raft stay up for it
            let abort = hand_over.abort_handle();
            if tokio::time::timeout(HAND_OVER_WITHIN + Duration::from_secs(1), hand_over).await.is_err() {
                abort.abort();
            }
            peer_stop.cancel();
            if let Ok(Err(e)) =
                tokio::time::timeout(Duration::from_secs(5), peer_server).await.map(|r| r.unwrap_or(Ok(())))
            {
                warn!(error = %e, "peer port stopped with an error");
            }
            meta.shutdown().await;
            info!("stopped");
            if let Some(e) = failure.get() {
                anyhow::bail!("metadata storage failed: {e}");
            }
            served.map_err(Into::into)
        })
    };
    Ok(RunningNode { registry_addr, peer_addr, addr: me, meta, stop, failure, task })
}

/// How long a stopping leader tries to hand its leadership over before it leaves the
/// election to the cluster's timeout; the peer port and Raft stay up until it ends.
const HAND_OVER_WITHIN: Duration = Duration::from_millis(1800);

/// The metadata's reserve of disk space, in the data directory.
const META_RESERVE: &str = "meta-reserve";
/// Free space below which the reserve is released.
const RESERVE_LOW: u64 = 32 << 20;

/// Adjusts the metadata reserve to the free space every 2 s (released when the disk is nearly
/// full, made again when there is room).
async fn keep_reserve(reserve: Arc<Reserve>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let r = reserve.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || r.adjust()).await {
            warn!(error = %e, "could not adjust the metadata reserve");
        }
    }
}

/// A node broken on purpose, for the tests and the chaos suite to prove they catch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeliberateFault {
    /// One of the registry's (see `RegistryConfig::fault`).
    Registry(raftyard_registry::Fault),
    /// `hang-log-flush`: once the file [`HANG_LOG_FLUSH_MARKER`] exists in the data directory,
    /// Raft log flushes never return (a wedged disk).
    HangLogFlush,
    /// `peer-protocol-1`: answers the peer port's version call as a release before it did;
    /// `peer-protocol-3`: as the release before quotas (an older member, for the upgrade tests).
    PeerProtocol(u32),
}

/// The file whose creation wedges the log flushes of a node started with
/// `RAFTYARD_FAULT=hang-log-flush`.
pub const HANG_LOG_FLUSH_MARKER: &str = "hang-log-flush";

/// `RAFTYARD_FAULT`, if set.
fn deliberate_fault() -> anyhow::Result<Option<DeliberateFault>> {
    let Ok(name) = std::env::var("RAFTYARD_FAULT") else { return Ok(None) };
    let fault = match name.as_str() {
        "hang-log-flush" => DeliberateFault::HangLogFlush,
        "peer-protocol-1" => DeliberateFault::PeerProtocol(1),
        "peer-protocol-3" => DeliberateFault::PeerProtocol(3),
        _ => DeliberateFault::Registry(raftyard_registry::Fault::parse(&name).ok_or_else(|| {
            anyhow::anyhow!(
                "RAFTYARD_FAULT={name:?}: not one of hang-log-flush, peer-protocol-1, peer-protocol-3, {}",
                raftyard_registry::Fault::NAMES
            )
        })?),
    };
    warn!(?fault, "RAFTYARD_FAULT: this node is deliberately BROKEN");
    Ok(Some(fault))
}

/// Readiness checks fail for this long in a row before the relay's visitors are turned away:
/// a leader election is shorter, and must not turn every node away at once.
const UNREADY_AFTER: Duration = Duration::from_secs(3);

/// Checks every second until `stop` whether this node should take the relay's shared traffic,
/// and publishes it for the tunnel agent's gate: it must be a voter (a learner's copies do not
/// count toward a push's quorum) and ready ([`Registry::not_ready`]). It takes traffic once a
/// check passes (a restarted node only after it caught up), and stops after checks failed for
/// [`UNREADY_AFTER`].
fn spawn_readiness(reg: Arc<Registry>, stop: CancellationToken) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut failing_since: Option<tokio::time::Instant> = None;
        loop {
            let reason = match reg.meta().is_voter() {
                true => reg.not_ready().await,
                false => Some("not a voter".to_string()),
            };
            match reason {
                None => {
                    failing_since = None;
                    if !tx.send_replace(true) {
                        info!("ready: taking traffic from the relay");
                    }
                }
                Some(reason) => {
                    let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                    if *tx.borrow() && since.elapsed() >= UNREADY_AFTER {
                        warn!(%reason, "not ready: the relay's visitors go to other nodes");
                        tx.send_replace(false);
                    }
                }
            }
            // a node that is not taking traffic looks again soon, so that it does once it can
            let every = if *tx.borrow() { Duration::from_secs(1) } else { Duration::from_millis(100) };
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
        }
    });
    rx
}

/// The tunnel agent, if relays are configured: the shared service `registry` and this node's
/// `registry-<id>`, both forwarded to the registry port.
fn start_agent(
    cfg: &Config,
    registry: std::net::SocketAddr,
    peer: std::net::SocketAddr,
    reg: &Arc<Registry>,
    stop: &CancellationToken,
) -> anyhow::Result<Option<raftyard_tunnel::Agent>> {
    if cfg.tunnel.relay.is_empty() {
        return Ok(None);
    }
    let ready = spawn_readiness(reg.clone(), stop.clone());
    let local = |mut a: std::net::SocketAddr| {
        if a.ip().is_unspecified() {
            a.set_ip(match a {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        a.to_string()
    };
    let id = cfg.node.id;
    // the registry learns each visitor's address from a PROXY header, read only on connections
    // this agent opened (`trusted`)
    let registry_service =
        |name: String| raftyard_tunnel::LocalService { name, local: local(registry), proxy_protocol: true };
    let mut services = vec![registry_service(format!("registry-{id}"))];
    if cfg.node.role != crate::config::Role::Backup {
        services.push(registry_service("registry".into()));
    }
    if cfg.tunnel.peer_service {
        services.push(raftyard_tunnel::LocalService {
            name: format!("peer-{id}"),
            local: local(peer),
            proxy_protocol: false,
        });
    }
    // the shared service only takes visitors while this node is ready, so the relay sends them
    // to nodes that can serve; this node's own services always do (its own endpoint is how an
    // operator reaches it, and a node catching up needs its peer service)
    let gate = raftyard_tunnel::Gate { services: vec!["registry".into()], ready };
    let trusted = reg.proxied();
    let agent = raftyard_tunnel::Agent::start_gated(
        &format!("node{}", cfg.node.id),
        &cfg.tunnel.relay,
        &services,
        Some(gate),
        Some(trusted),
    )
    .context("starting the tunnel agent")?;
    reg.set_agent(agent.status_handle());
    info!(relays = cfg.tunnel.relay.len(), "tunnel agent started");
    Ok(Some(agent))
}

/// Journal retention: on the leader, every `journal_trim_interval_secs`, drops the journal
/// entries older than `journal_keep_days` or before the last `journal_keep_entries` log
/// indexes, through `JournalTrimmed` events so that every node drops the same ones.
async fn journal_retention(meta: MetaNode, raft: crate::config::RaftSection, stop: CancellationToken) {
    let every = Duration::from_secs(raft.journal_trim_interval_secs.max(1));
    let work = async {
        loop {
            tokio::time::sleep(every).await;
            if meta.raft().metrics().borrow().current_leader != Some(meta.id()) {
                continue;
            }
            let r = meta.reader();
            let mut before = 0;
            if raft.journal_keep_entries > 0 {
                before = (r.applied_index() + 1).saturating_sub(raft.journal_keep_entries);
            }
            if raft.journal_keep_days > 0 {
                let cut = raftyard_types::event::now_ms().saturating_sub(raft.journal_keep_days * 86_400_000);
                match r.journal_index_at(cut) {
                    Ok(i) => before = before.max(i),
                    Err(e) => warn!(error = %e, "journal retention: reading the journal failed"),
                }
            }
            // a trim is a journal entry itself: with a count, cut only once the point has moved by
            // a tenth of what is kept, or trims would follow trims for ever on an idle cluster
            let margin = (raft.journal_keep_entries / 10).max(1);
            if r.journal_first().map_or(true, |f| before < f.saturating_add(margin)) {
                continue;
            }
            // a few hundred entries per event, so that each apply stays small
            while let Some(first) = r.journal_first().ok().filter(|f| *f < before) {
                let before = raftyard_types::event::journal_trim_next(first, before);
                let ev = raftyard_types::Event::JournalTrimmed { before };
                if let Err(e) = meta.propose(vec![ev]).await {
                    warn!(error = %e, "journal retention: trimming failed; trying again later");
                    break;
                }
            }
        }
    };
    tokio::select! {
        _ = work => {}
        _ = stop.cancelled() => {}
    }
}

/// In token mode, the cluster's first token signing key: made by the leader once one is
/// elected, if the state has none (the event applies only while there is none, so two nodes
/// that both try leave one key). A token request before that makes it too.
async fn first_signing_key(meta: MetaNode, stop: CancellationToken) {
    let work = async {
        loop {
            if meta.reader().access().is_ok_and(|(_, s)| !s.keys.is_empty()) {
                return;
            }
            if meta.is_leader() {
                let key = raftyard_auth::token::new_signing_key(raftyard_types::event::now_ms());
                match meta.propose(vec![raftyard_types::Event::SigningKeyAdded { key, only_if_none: true }]).await {
                    Ok(()) => info!("token signing key made"),
                    Err(e) => warn!(error = %e, "making the token signing key failed; trying again"),
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    tokio::select! {
        _ = work => {}
        _ = stop.cancelled() => {}
    }
}

pub(crate) async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("interrupt received"),
        _ = term.recv() => info!("SIGTERM received"),
    }
}

/// With auth on, the journal is for admins: `login` is an admin's user name and password.
pub async fn print_events(
    node: &str,
    mut since: u64,
    follow: bool,
    ca: Option<PathBuf>,
    login: Option<(String, String)>,
) -> anyhow::Result<()> {
    let client = crate::http_client_as(Duration::from_secs(90), ca.as_deref(), login.as_ref())?;
    let base = node.trim_end_matches('/');
    loop {
        let wait = if follow { 30 } else { 0 };
        let url = format!("{base}/v2/_raftyard/events?since={since}&limit=1000&wait={wait}");
        let resp = client.get(&url).send().await.with_context(|| format!("GET {url}"))?;
        anyhow::ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
        let text = resp.text().await?;
        let mut n = 0;
        for line in text.lines().filter(|l| !l.is_empty()) {
            println!("{line}");
            let v: serde_json::Value = serde_json::from_str(line)?;
            since = v["index"].as_u64().unwrap_or(since) + 1;
            n += 1;
        }
        if n == 0 && !follow {
            return Ok(());
        }
    }
}
