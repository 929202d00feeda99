//! The metrics of a node, through `prometheus-client`: counted as requests go (requests,
//! latency, requests in flight, authentication), and read at each scrape from the parts that
//! keep their own figures (Raft, readiness, disk, collections, quotas, backup lag, lockouts,
//! the process). Served as OpenMetrics to a scraper that asks for it (Prometheus does), else in
//! the Prometheus text format (what `promtool check metrics` and older scrapers read).
//! docs/observability.md says what each one means.

use std::sync::Mutex;
use std::time::Duration;

use http::{header, HeaderValue, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;

use crate::body::{full, Body};
use crate::Registry;

const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReposLabel {
    repos: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RelayLabel {
    relay: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

/// The bytes of this node's blob files, walked at most once a minute (a walk reads every
/// file's metadata).
#[derive(Default)]
pub struct BlobBytes(Mutex<Option<(std::time::Instant, u64, u64)>>);

const BLOB_WALK_EVERY: Duration = Duration::from_secs(60);

impl BlobBytes {
    /// (files, bytes), walking again if the last walk is older than a minute.
    async fn get(&self, store: &std::sync::Arc<raftyard_blobstore::BlobStore>) -> Option<(u64, u64)> {
        if let Some((at, f, b)) = *self.0.lock().unwrap() {
            if at.elapsed() < BLOB_WALK_EVERY {
                return Some((f, b));
            }
        }
        let store = store.clone();
        let (f, b) = tokio::task::spawn_blocking(move || store.usage()).await.ok()?.ok()?;
        *self.0.lock().unwrap() = Some((std::time::Instant::now(), f, b));
        Some((f, b))
    }
}

/// What the kernel says of this process (Linux `/proc/self`): CPU seconds, resident and
/// virtual bytes, open and allowed file descriptors, start time (seconds since the epoch).
struct ProcessFigures {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    open_fds: u64,
    max_fds: u64,
    start_time_seconds: f64,
}

fn process_figures() -> Option<ProcessFigures> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // the fields after the command name, which is in parentheses and may hold spaces
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    // SAFETY: sysconf reads a constant of the system
    let (tick, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    let (tick, page) = (tick.max(1) as f64, page.max(1) as u64);
    // fields 14, 15 (utime, stime), 22 (starttime, ticks after boot), 23 (vsize), 24 (rss
    // pages), counted from 1 with the pid and the name: here from 0 after the name
    let cpu_seconds = (num(11)? + num(12)?) as f64 / tick;
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<u64>().ok()))?;
    let start_time_seconds = boot as f64 + num(19)? as f64 / tick;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given
    let max_fds = match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } {
        0 => lim.rlim_cur,
        _ => 0,
    };
    Some(ProcessFigures {
        cpu_seconds,
        resident_bytes: num(21)? * page,
        virtual_bytes: num(20)?,
        open_fds,
        max_fds,
        start_time_seconds,
    })
}

/// What a node counts as it serves.
pub struct Metrics {
    requests: Family<RouteLabels, Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    in_flight: Gauge,
    auth_failures: Family<ReasonLabel, Counter>,
    auth_denied: Counter,
    quorum_wait: Histogram,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: u64,
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS.into_iter())
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(histogram),
            in_flight: Gauge::default(),
            auth_failures: Family::default(),
            auth_denied: Counter::default(),
            quorum_wait: histogram(),
        }
    }
}

/// A request being served: counted in `raftyard_http_requests_in_flight` until dropped.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A scrape's registry, with the helpers that register figures read at that moment.
struct Scrape(prometheus_client::registry::Registry);

impl Scrape {
    fn gauge(&mut self, name: &str, help: &str, v: i64) {
        self.0.register(name, help, ConstGauge::new(v));
    }
    fn gauge_f(&mut self, name: &str, help: &str, v: f64) {
        self.0.register(name, help, ConstGauge::new(v));
    }
    /// `name` without `_total` (the encoding adds it).
    fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.0.register(name, help, ConstCounter::new(v));
    }
    fn counter_f(&mut self, name: &str, help: &str, v: f64) {
        self.0.register(name, help, ConstCounter::new(v));
    }
}

impl Metrics {
    /// A failed authentication, by reason.
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// An authenticated request refused for want of a grant.
    pub fn auth_denied(&self) {
        self.auth_denied.inc();
    }

    /// Time an upload waited, after its bytes were stored here, for the copies of its write
    /// quorum.
    pub fn quorum_wait(&self, took: Duration) {
        self.quorum_wait.observe(took.as_secs_f64());
    }

    /// Counts a request in flight until the guard is dropped.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    pub fn observe(&self, route: &'static str, method: &str, status: u16, took: Duration) {
        let labels = RouteLabels { route, method: method.to_string(), status };
        self.requests.get_or_create(&labels).inc();
        self.latency.get_or_create(&labels).observe(took.as_secs_f64());
    }

    /// The `/metrics` answer: OpenMetrics when `accept` asks for it, else the text format.
    pub async fn render(&self, reg: &Registry, accept: Option<&HeaderValue>) -> Response<Body> {
        let openmetrics =
            accept.and_then(|a| a.to_str().ok()).is_some_and(|a| a.contains("application/openmetrics-text"));
        let blob_files = reg.disk.get(&reg.blobs).await;
        let ready = reg.not_ready().await.is_none();
        let mut s = Scrape(prometheus_client::registry::Registry::default());
        s.0.register("raftyard_http_requests", "HTTP requests by route, method and status", self.requests.clone());
        s.0.register(
            "raftyard_http_request_duration_seconds",
            "Time until a response's head is ready, by route, method and status",
            self.latency.clone(),
        );
        s.0.register("raftyard_http_requests_in_flight", "Requests being served now", self.in_flight.clone());
        s.gauge(
            "raftyard_ready",
            "1 if this node is ready to take traffic (GET /v2/_raftyard/ready says why not)",
            ready.into(),
        );

        let rm = reg.meta.raft().metrics().borrow().clone();
        s.gauge("raftyard_raft_term", "Current Raft term", rm.current_term as i64);
        s.gauge("raftyard_raft_last_log_index", "Last Raft log index", rm.last_log_index.unwrap_or(0) as i64);
        s.gauge(
            "raftyard_raft_applied_index",
            "Last applied Raft log index",
            rm.last_applied.map(|l| l.index).unwrap_or(0) as i64,
        );
        s.gauge("raftyard_raft_leader", "Id of the current leader (0: none)", rm.current_leader.unwrap_or(0) as i64);
        s.gauge(
            "raftyard_raft_is_leader",
            "1 if this node is the leader",
            (rm.current_leader == Some(reg.meta.id())).into(),
        );
        s.gauge("raftyard_open_uploads", "Open upload sessions on this node", reg.blobs.open_uploads() as i64);
        let counters = reg.meta.counters();
        s.0.register(
            "raftyard_raft_proposal_duration_seconds",
            "Time from a proposal on this node to its outcome applied here",
            counters.proposal_seconds.clone(),
        );
        s.0.register(
            "raftyard_raft_leader_changes",
            "Changes of the leader this node knows",
            counters.leader_changes.clone(),
        );
        if let Some(replication) = &rm.replication {
            // on the leader: how far each follower's log is behind its own
            let behind = Family::<NodeLabel, Gauge>::default();
            let last = rm.last_log_index.unwrap_or(0);
            for (node, matched) in replication.iter().filter(|(n, _)| **n != reg.meta.id()) {
                let m = matched.as_ref().map(|l| l.index).unwrap_or(0);
                behind.get_or_create(&NodeLabel { node: *node }).set(last.saturating_sub(m) as i64);
            }
            s.0.register(
                "raftyard_raft_follower_lag_entries",
                "On the leader: log entries each member has yet to receive",
                behind,
            );
        }
        s.0.register("raftyard_peer_rpc_errors", "Failed calls to peers, by peer and method", reg.peers.rpc_errors());
        s.0.register(
            "raftyard_blob_quorum_wait_seconds",
            "Time an upload waited, its bytes stored here, for the copies of its write quorum",
            self.quorum_wait.clone(),
        );

        let (blobs, bytes, since) = reg.missing.figures();
        s.gauge(
            "raftyard_blobs_missing",
            "Blobs this node lacks and fetches from peers (the repair queue)",
            blobs as i64,
        );
        s.gauge("raftyard_blob_bytes_missing", "Bytes of the blobs this node lacks", bytes as i64);
        s.gauge_f(
            "raftyard_blob_missing_oldest_seconds",
            "For how long the blob this node has lacked longest has been missing (0: none)",
            since.map_or(0.0, |t| t.elapsed().as_secs_f64()),
        );
        let lag = reg.lag.get();
        if lag.measured && reg.meta.is_backup() {
            s.gauge(
                "raftyard_backup_leader_reachable",
                "1 if the leader answered the last lag measurement",
                lag.leader_reachable.into(),
            );
            s.gauge(
                "raftyard_backup_lag_entries",
                "Committed log entries not yet applied on this backup",
                lag.entries_behind as i64,
            );
            s.gauge("raftyard_backup_blobs_missing", "Blobs this backup has yet to fetch", lag.blobs_missing as i64);
            s.gauge(
                "raftyard_backup_blob_bytes_missing",
                "Bytes of blobs this backup has yet to fetch",
                lag.blob_bytes_missing as i64,
            );
            s.gauge_f(
                "raftyard_backup_blob_rpo_seconds",
                "For how long the oldest blob this backup lacks has been missing here",
                lag.blob_rpo_ms as f64 / 1000.0,
            );
            // unknown until the leader first answered or a command was applied here
            if lag.rpo_known {
                s.gauge_f(
                    "raftyard_backup_rpo_seconds",
                    "Seconds of acknowledged metadata writes this backup could be missing",
                    lag.rpo_ms as f64 / 1000.0,
                );
            }
        }
        if let Ok((total, free, used)) = raftyard_blobstore::disk_space(reg.blobs.root()) {
            s.gauge("raftyard_disk_total_bytes", "Size of the filesystem holding this node's data", total as i64);
            s.gauge("raftyard_disk_free_bytes", "Bytes free on it (to an unprivileged writer)", free as i64);
            s.gauge("raftyard_disk_used_bytes", "Bytes in use on it", used as i64);
        }
        if let Some((files, bytes)) = blob_files {
            s.gauge("raftyard_blob_files", "Blob files on this node (walked at most once a minute)", files as i64);
            s.gauge("raftyard_blob_bytes", "Bytes of the blob files on this node", bytes as i64);
        }

        let gc = reg.gc.get();
        s.counter("raftyard_gc_runs", "Collections this node ran", gc.runs);
        s.counter("raftyard_gc_failures", "Collections this node started that failed", gc.failures);
        s.counter("raftyard_gc_manifests_removed", "Untagged manifests its collections removed", gc.manifests_removed);
        s.counter("raftyard_gc_links_removed", "Blob links its collections removed", gc.links_removed);
        s.counter("raftyard_gc_blobs_removed", "Blobs its collections took out of the registry", gc.blobs_removed);
        s.counter("raftyard_gc_sweeps", "Sweeps of this node's blob files", gc.sweeps);
        s.counter("raftyard_gc_files_removed", "Blob files its sweeps removed", gc.files_removed);
        s.counter("raftyard_gc_bytes_reclaimed", "Bytes its sweeps freed on this node's disk", gc.bytes_reclaimed);
        s.gauge_f(
            "raftyard_gc_last_run_timestamp_seconds",
            "When this node's last collection finished (0: never)",
            gc.last_run_ms as f64 / 1000.0,
        );
        s.gauge_f(
            "raftyard_gc_last_sweep_timestamp_seconds",
            "When this node's last sweep finished (0: never)",
            gc.last_sweep_ms as f64 / 1000.0,
        );

        if let Some(agent) = reg.agent.get() {
            let (connected, connects) =
                (Family::<RelayLabel, Gauge>::default(), Family::<RelayLabel, Counter>::default());
            for l in agent.links() {
                let label = RelayLabel { relay: l.relay };
                connected.get_or_create(&label).set(l.connected as i64);
                connects.get_or_create(&label).inc_by(l.connects);
            }
            s.0.register(
                "raftyard_tunnel_agent_connected",
                "Whether this node's tunnel agent is connected to a relay (1) or not (0)",
                connected,
            );
            s.0.register(
                "raftyard_tunnel_agent_connections",
                "Connections this node's agent made to a relay (the first and each reconnect)",
                connects,
            );
            let (inbound, outbound) = agent.bytes();
            let bytes = Family::<DirectionLabel, Counter>::default();
            bytes.get_or_create(&DirectionLabel { direction: "in" }).inc_by(inbound);
            bytes.get_or_create(&DirectionLabel { direction: "out" }).inc_by(outbound);
            s.0.register(
                "raftyard_tunnel_agent_bytes",
                "Bytes relayed between visitors and this node (in: to the node, out: back)",
                bytes,
            );
        }

        // the quotas, as this node's state holds them (no read barrier: a scrape never waits)
        let quotas = reg.meta.reader().quotas().unwrap_or_default();
        if !quotas.is_empty() {
            let (limit, used) = (Family::<ReposLabel, Gauge>::default(), Family::<ReposLabel, Gauge>::default());
            for q in &quotas {
                let l = ReposLabel { repos: q.quota.repos.as_str().to_string() };
                limit.get_or_create(&l).set(q.quota.bytes as i64);
                used.get_or_create(&l).set(q.used.bytes as i64);
            }
            s.0.register("raftyard_quota_limit_bytes", "Storage quota of the repositories a pattern matches", limit);
            s.0.register("raftyard_quota_used_bytes", "Bytes the repositories of a quota hold together", used);
        }

        if let Some(auth) = &reg.auth {
            s.0.register("raftyard_auth_failures", "Failed authentications, by reason", self.auth_failures.clone());
            s.0.register(
                "raftyard_auth_denied",
                "Authenticated requests refused for want of a grant",
                self.auth_denied.clone(),
            );
            s.counter(
                "raftyard_auth_lockouts",
                "Client addresses locked out after too many failed authentications",
                auth.lockout.lockouts.load(std::sync::atomic::Ordering::Relaxed),
            );
            s.gauge(
                "raftyard_auth_locked_addresses",
                "Client addresses locked out now",
                auth.lockout.locked_count() as i64,
            );
        }

        if let Some(p) = process_figures() {
            s.counter_f("process_cpu_seconds", "User and system CPU time of this process", p.cpu_seconds);
            s.gauge("process_resident_memory_bytes", "Resident memory size", p.resident_bytes as i64);
            s.gauge("process_virtual_memory_bytes", "Virtual memory size", p.virtual_bytes as i64);
            s.gauge("process_open_fds", "Open file descriptors", p.open_fds as i64);
            s.gauge("process_max_fds", "Most file descriptors this process may open", p.max_fds as i64);
            s.gauge_f("process_start_time_seconds", "Start time, seconds since the epoch", p.start_time_seconds);
        }

        let (body, content_type) = raftyard_telemetry::encode_metrics(&s.0, openmetrics);
        let mut r = Response::new(full(body));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        r
    }
}
