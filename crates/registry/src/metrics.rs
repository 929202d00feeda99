//! Request metrics and the Prometheus text exposition at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use http::{header, HeaderValue, Response};

use crate::body::{full, Body};
use crate::Registry;

const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

#[derive(Default)]
struct Series {
    count: u64,
    sum: f64,
    buckets: [u64; BUCKETS.len()],
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

/// Counters by route, method and status, with latency histograms.
#[derive(Default)]
pub struct Metrics {
    series: Mutex<BTreeMap<(&'static str, String, u16), Series>>,
    auth_failures: Mutex<BTreeMap<&'static str, u64>>,
    auth_denied: std::sync::atomic::AtomicU64,
}

impl Metrics {
    /// A failed authentication, by reason.
    pub fn auth_failure(&self, reason: &'static str) {
        *self.auth_failures.lock().unwrap().entry(reason).or_default() += 1;
    }

    /// An authenticated request refused for want of a grant.
    pub fn auth_denied(&self) {
        self.auth_denied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn observe(&self, route: &'static str, method: &str, status: u16, took: Duration) {
        let secs = took.as_secs_f64();
        let mut m = self.series.lock().unwrap();
        let s = m.entry((route, method.to_string(), status)).or_default();
        s.count += 1;
        s.sum += secs;
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                s.buckets[i] += 1;
            }
        }
    }

    pub async fn render(&self, reg: &Registry) -> Response<Body> {
        let blob_files = reg.disk.get(&reg.blobs).await;
        let ready = reg.not_ready().await.is_none();
        let mut out = String::new();
        out.push_str("# HELP raftyard_http_requests_total HTTP requests by route, method and status.\n");
        out.push_str("# TYPE raftyard_http_requests_total counter\n");
        let m = self.series.lock().unwrap();
        for ((route, method, status), s) in m.iter() {
            let _ = writeln!(
                out,
                "raftyard_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {}",
                s.count
            );
        }
        out.push_str("# HELP raftyard_http_request_duration_seconds Request latency.\n");
        out.push_str("# TYPE raftyard_http_request_duration_seconds histogram\n");
        for ((route, method, status), s) in m.iter() {
            let l = format!("route=\"{route}\",method=\"{method}\",status=\"{status}\"");
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ =
                    writeln!(out, "raftyard_http_request_duration_seconds_bucket{{{l},le=\"{b}\"}} {}", s.buckets[i]);
            }
            let _ = writeln!(out, "raftyard_http_request_duration_seconds_bucket{{{l},le=\"+Inf\"}} {}", s.count);
            let _ = writeln!(out, "raftyard_http_request_duration_seconds_sum{{{l}}} {}", s.sum);
            let _ = writeln!(out, "raftyard_http_request_duration_seconds_count{{{l}}} {}", s.count);
        }
        drop(m);
        let rm = reg.meta.raft().metrics().borrow().clone();
        let mut gauges = vec![
            ("raftyard_raft_term", "Current Raft term.", rm.current_term as f64),
            ("raftyard_raft_last_log_index", "Last Raft log index.", rm.last_log_index.unwrap_or(0) as f64),
            (
                "raftyard_raft_applied_index",
                "Last applied Raft log index.",
                rm.last_applied.map(|l| l.index).unwrap_or(0) as f64,
            ),
            ("raftyard_raft_leader", "Id of the current leader (0: none).", rm.current_leader.unwrap_or(0) as f64),
            (
                "raftyard_raft_is_leader",
                "1 if this node is the leader.",
                (rm.current_leader == Some(reg.meta.id())) as u8 as f64,
            ),
            ("raftyard_open_uploads", "Open upload sessions on this node.", reg.blobs.open_uploads() as f64),
        ];
        let lag = reg.lag.get();
        if lag.measured && reg.meta.is_backup() {
            gauges.extend([
                (
                    "raftyard_backup_leader_reachable",
                    "1 if the leader answered the last lag measurement.",
                    lag.leader_reachable as u8 as f64,
                ),
                (
                    "raftyard_backup_lag_entries",
                    "Committed log entries not yet applied on this backup.",
                    lag.entries_behind as f64,
                ),
                ("raftyard_backup_blobs_missing", "Blobs this backup has yet to fetch.", lag.blobs_missing as f64),
                (
                    "raftyard_backup_blob_bytes_missing",
                    "Bytes of blobs this backup has yet to fetch.",
                    lag.blob_bytes_missing as f64,
                ),
                (
                    "raftyard_backup_blob_rpo_seconds",
                    "For how long the oldest blob this backup lacks has been missing here.",
                    lag.blob_rpo_ms as f64 / 1000.0,
                ),
            ]);
            // unknown until the leader first answered or a command was applied here
            if lag.rpo_known {
                gauges.push((
                    "raftyard_backup_rpo_seconds",
                    "Seconds of acknowledged metadata writes this backup could be missing.",
                    lag.rpo_ms as f64 / 1000.0,
                ));
            }
        }
        if let Ok((total, free, used)) = raftyard_blobstore::disk_space(reg.blobs.root()) {
            gauges.extend([
                ("raftyard_disk_total_bytes", "Size of the filesystem holding this node's data.", total as f64),
                ("raftyard_disk_free_bytes", "Bytes free on it (to an unprivileged writer).", free as f64),
                ("raftyard_disk_used_bytes", "Bytes in use on it.", used as f64),
            ]);
        }
        if let Some((files, bytes)) = blob_files {
            gauges.extend([
                ("raftyard_blob_files", "Blob files on this node (walked at most once a minute).", files as f64),
                ("raftyard_blob_bytes", "Bytes of the blob files on this node.", bytes as f64),
            ]);
        }
        let gc = reg.gc.get();
        let gc_counters = [
            ("raftyard_gc_runs_total", "Collections this node ran.", gc.runs),
            ("raftyard_gc_failures_total", "Collections this node started that failed.", gc.failures),
            (
                "raftyard_gc_manifests_removed_total",
                "Untagged manifests its collections removed.",
                gc.manifests_removed,
            ),
            ("raftyard_gc_links_removed_total", "Blob links its collections removed.", gc.links_removed),
            ("raftyard_gc_blobs_removed_total", "Blobs its collections took out of the registry.", gc.blobs_removed),
            ("raftyard_gc_sweeps_total", "Sweeps of this node's blob files.", gc.sweeps),
            ("raftyard_gc_files_removed_total", "Blob files its sweeps removed.", gc.files_removed),
            ("raftyard_gc_bytes_reclaimed_total", "Bytes its sweeps freed on this node's disk.", gc.bytes_reclaimed),
        ];
        for (name, help, v) in gc_counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        gauges.extend([
            (
                "raftyard_gc_last_run_timestamp_seconds",
                "When this node's last collection finished (0: never).",
                gc.last_run_ms as f64 / 1000.0,
            ),
            (
                "raftyard_gc_last_sweep_timestamp_seconds",
                "When this node's last sweep finished (0: never).",
                gc.last_sweep_ms as f64 / 1000.0,
            ),
        ]);
        // the quotas, as this node's state holds them (no read barrier: a scrape never waits)
        let quotas = reg.meta.reader().quotas().unwrap_or_default();
        if !quotas.is_empty() {
            out.push_str("# HELP raftyard_quota_limit_bytes Storage quota of the repositories a pattern matches.\n");
            out.push_str("# TYPE raftyard_quota_limit_bytes gauge\n");
            for q in &quotas {
                let _ = writeln!(
                    out,
                    "raftyard_quota_limit_bytes{{repos=\"{}\"}} {}",
                    q.quota.repos.as_str(),
                    q.quota.bytes
                );
            }
            out.push_str("# HELP raftyard_quota_used_bytes Bytes the repositories of a quota hold together.\n");
            out.push_str("# TYPE raftyard_quota_used_bytes gauge\n");
            for q in &quotas {
                let _ =
                    writeln!(out, "raftyard_quota_used_bytes{{repos=\"{}\"}} {}", q.quota.repos.as_str(), q.used.bytes);
            }
        }
        // the answer of /v2/_raftyard/ready (a read barrier, bounded by its deadline)
        gauges.push((
            "raftyard_ready",
            "1 if this node is ready to take traffic (GET /v2/_raftyard/ready says why not).",
            ready as u8 as f64,
        ));
        if let Some(p) = process_figures() {
            let _ = writeln!(
                out,
                "# HELP process_cpu_seconds_total User and system CPU time of this process.\n\
                 # TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}",
                p.cpu_seconds
            );
            gauges.extend([
                ("process_resident_memory_bytes", "Resident memory size.", p.resident_bytes as f64),
                ("process_virtual_memory_bytes", "Virtual memory size.", p.virtual_bytes as f64),
                ("process_open_fds", "Open file descriptors.", p.open_fds as f64),
                ("process_max_fds", "Most file descriptors this process may open.", p.max_fds as f64),
                ("process_start_time_seconds", "Start time, seconds since the epoch.", p.start_time_seconds),
            ]);
        }
        if let Some(auth) = &reg.auth {
            out.push_str("# HELP raftyard_auth_failures_total Failed authentications, by reason.\n");
            out.push_str("# TYPE raftyard_auth_failures_total counter\n");
            for (reason, n) in self.auth_failures.lock().unwrap().iter() {
                let _ = writeln!(out, "raftyard_auth_failures_total{{reason=\"{reason}\"}} {n}");
            }
            let counters = [
                (
                    "raftyard_auth_denied_total",
                    "Authenticated requests refused for want of a grant.",
                    self.auth_denied.load(std::sync::atomic::Ordering::Relaxed),
                ),
                (
                    "raftyard_auth_lockouts_total",
                    "Client addresses locked out after too many failed authentications.",
                    auth.lockout.lockouts.load(std::sync::atomic::Ordering::Relaxed),
                ),
            ];
            for (name, help, v) in counters {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
            }
            gauges.push((
                "raftyard_auth_locked_addresses",
                "Client addresses locked out now.",
                auth.lockout.locked_count() as f64,
            ));
        }
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let mut r = Response::new(full(out));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
        r
    }
}
