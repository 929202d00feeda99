//! Statistics, the results tables and the JSON output.

use std::time::Duration;

use serde_json::{json, Value};

use crate::cli::{Args, Target};
use crate::cluster::Roles;
use crate::failover::{self, FailoverRep};

/// Measurements of one registry. Per-repetition vectors hold one sample per
/// timed repetition, in repetition order, so the n-th samples of the two
/// registries come from the same interleaved repetition; the table shows
/// their medians.
#[derive(Debug)]
pub struct TargetResults {
    pub target: Target,
    /// Column heading and JSON key (`raftyard`, `raftyard x3`, `docker-registry`).
    pub label: String,
    pub push_monolithic_mbps: Vec<f64>,
    pub push_chunked_mbps: Vec<f64>,
    pub pull_mbps: Vec<f64>,
    pub manifest_put_p50_ms: Vec<f64>,
    pub manifest_put_p99_ms: Vec<f64>,
    pub manifest_get_p50_ms: Vec<f64>,
    pub manifest_get_p99_ms: Vec<f64>,
    pub rss_peak_push_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
}

impl TargetResults {
    pub fn new(target: Target, label: String) -> Self {
        TargetResults {
            target,
            label,
            push_monolithic_mbps: Vec::new(),
            push_chunked_mbps: Vec::new(),
            pull_mbps: Vec::new(),
            manifest_put_p50_ms: Vec::new(),
            manifest_put_p99_ms: Vec::new(),
            manifest_get_p50_ms: Vec::new(),
            manifest_get_p99_ms: Vec::new(),
            rss_peak_push_kib: None,
            rss_after_kib: None,
        }
    }
}

/// Whether a larger or a smaller value is better; decides the ratio's direction.
#[derive(Clone, Copy)]
enum Better {
    Higher,
    Lower,
}

struct Metric {
    key: &'static str,
    label: String,
    unit: &'static str,
    better: Better,
    decimals: usize,
    /// Whether the samples are per repetition, and so pair up into per-repetition ratios.
    per_rep: bool,
    samples: fn(&TargetResults) -> Vec<f64>,
}

fn metrics(args: &Args) -> Vec<Metric> {
    fn mib(kib: Option<u64>) -> Vec<f64> {
        kib.map(|k| vec![k as f64 / 1024.0]).unwrap_or_default()
    }
    let rss_unit = if args.cluster_mode() {
        format!("MiB; {}: sum of the {} nodes", args.label(Target::Raftyard), args.cluster)
    } else {
        "MiB".to_string()
    };
    vec![
        Metric {
            key: "blob_push_monolithic_mbps",
            label: format!("blob push, monolithic {} MiB (MB/s)", args.blob_mib),
            unit: "MB/s",
            better: Better::Higher,
            decimals: 1,
            per_rep: true,
            samples: |r| r.push_monolithic_mbps.clone(),
        },
        Metric {
            key: "blob_push_chunked_mbps",
            label: format!("blob push, chunked {} MiB PATCHes (MB/s)", args.chunk_mib),
            unit: "MB/s",
            better: Better::Higher,
            decimals: 1,
            per_rep: true,
            samples: |r| r.push_chunked_mbps.clone(),
        },
        Metric {
            key: "blob_pull_mbps",
            label: format!("blob pull {} MiB (MB/s)", args.blob_mib),
            unit: "MB/s",
            better: Better::Higher,
            decimals: 1,
            per_rep: true,
            samples: |r| r.pull_mbps.clone(),
        },
        Metric {
            key: "manifest_put_p50_ms",
            label: "manifest PUT p50 (ms)".into(),
            unit: "ms",
            better: Better::Lower,
            decimals: 3,
            per_rep: true,
            samples: |r| r.manifest_put_p50_ms.clone(),
        },
        Metric {
            key: "manifest_put_p99_ms",
            label: "manifest PUT p99 (ms)".into(),
            unit: "ms",
            better: Better::Lower,
            decimals: 3,
            per_rep: true,
            samples: |r| r.manifest_put_p99_ms.clone(),
        },
        Metric {
            key: "manifest_get_p50_ms",
            label: "manifest GET p50 (ms)".into(),
            unit: "ms",
            better: Better::Lower,
            decimals: 3,
            per_rep: true,
            samples: |r| r.manifest_get_p50_ms.clone(),
        },
        Metric {
            key: "manifest_get_p99_ms",
            label: "manifest GET p99 (ms)".into(),
            unit: "ms",
            better: Better::Lower,
            decimals: 3,
            per_rep: true,
            samples: |r| r.manifest_get_p99_ms.clone(),
        },
        Metric {
            key: "rss_peak_during_push_mib",
            label: format!("RSS peak during blob pushes ({rss_unit})"),
            unit: "MiB",
            better: Better::Lower,
            decimals: 1,
            per_rep: false,
            samples: |r| mib(r.rss_peak_push_kib),
        },
        Metric {
            key: "rss_after_workloads_mib",
            label: format!("RSS after workloads ({rss_unit})"),
            unit: "MiB",
            better: Better::Lower,
            decimals: 1,
            per_rep: false,
            samples: |r| mib(r.rss_after_kib),
        },
    ]
}

/// Median; the mean of the two middle values for an even count.
pub fn median(samples: &[f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 { sorted[mid] } else { (sorted[mid - 1] + sorted[mid]) / 2.0 })
}

/// Nearest-rank percentile (`p` in 0..=100); 0 for no samples.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Ratio oriented so that a value above 1 means raftyard did better.
fn ratio(better: Better, raftyard: Option<f64>, docker: Option<f64>) -> Option<f64> {
    let (r, d) = (raftyard?, docker?);
    let value = match better {
        Better::Higher => r / d,
        Better::Lower => d / r,
    };
    value.is_finite().then_some(value)
}

/// How the two registries compare on one metric.
struct Comparison {
    /// Ratio of the two registries' medians.
    of_medians: Option<f64>,
    /// Ratios of the two registries' samples within each repetition (empty
    /// when the metric is not per repetition).
    per_rep: Vec<f64>,
}

impl Comparison {
    fn new(m: &Metric, raftyard: &TargetResults, docker: &TargetResults) -> Self {
        let (r, d) = ((m.samples)(raftyard), (m.samples)(docker));
        let per_rep = if m.per_rep { per_rep_ratios(m.better, &r, &d) } else { Vec::new() };
        Comparison { of_medians: ratio(m.better, median(&r), median(&d)), per_rep }
    }

    fn median_per_rep(&self) -> Option<f64> {
        median(&self.per_rep)
    }
}

/// The ratio of the n-th raftyard sample to the n-th docker-registry sample,
/// for every repetition that has a finite ratio.
fn per_rep_ratios(better: Better, raftyard: &[f64], docker: &[f64]) -> Vec<f64> {
    raftyard.iter().zip(docker).filter_map(|(&r, &d)| ratio(better, Some(r), Some(d))).collect()
}

/// How ratios are oriented, for the printed report and the JSON output.
const RATIO_DIRECTION: &str = "raftyard/docker-registry for throughput, docker-registry/raftyard for latency \
                               and RSS; >1 means raftyard is better";

/// How the cluster was used (cluster mode only).
pub struct ClusterSummary {
    pub nodes: usize,
    /// Roles when the workloads started.
    pub roles: Roles,
    /// Raft term when the workloads started.
    pub term_before: u64,
    /// Leader and term when the workloads had ended.
    pub leader_after: u64,
    pub term_after: u64,
}

pub struct Report<'a> {
    pub args: &'a Args,
    pub command: String,
    pub docker_registry_version: Option<String>,
    pub results: Vec<TargetResults>,
    pub cluster: Option<ClusterSummary>,
    /// Failover repetitions (empty unless measured).
    pub failover: Vec<FailoverRep>,
}

impl Report<'_> {
    fn find(&self, target: Target) -> Option<&TargetResults> {
        self.results.iter().find(|r| r.target == target)
    }

    fn both(&self) -> Option<(&TargetResults, &TargetResults)> {
        Some((self.find(Target::Raftyard)?, self.find(Target::DockerRegistry)?))
    }

    /// The results table, ready to print.
    pub fn table(&self) -> String {
        let mut header = vec!["metric".to_string()];
        header.extend(self.results.iter().map(|r| r.label.clone()));
        let both = self.both();
        if both.is_some() {
            header.push("ratio of medians".to_string());
            header.push("median of per-rep ratios".to_string());
        }
        let mut rows = vec![header];
        for m in metrics(self.args) {
            let mut row = vec![m.label.clone()];
            for r in &self.results {
                row.push(fmt(median(&(m.samples)(r)), m.decimals, ""));
            }
            if let Some((raftyard, docker)) = both {
                let c = Comparison::new(&m, raftyard, docker);
                row.push(fmt(c.of_medians, 2, "x"));
                row.push(fmt(c.median_per_rep(), 2, "x"));
            }
            rows.push(row);
        }
        layout(&rows)
    }

    /// The failover table: median and maximum of each time, and every repetition's value.
    pub fn failover_table(&self) -> String {
        let first = match self.args.failover_signal {
            failover::Signal::Kill => "failover, ms from the leader's kill",
            failover::Signal::Term => "failover, ms from the leader's SIGTERM",
        };
        let header = [first, "median", "max", "per rep"];
        let mut rows = vec![header.map(String::from).to_vec()];
        for m in failover_metrics() {
            let samples: Vec<f64> = self.failover.iter().map(|r| millis((m.sample)(r))).collect();
            let max = samples.iter().copied().reduce(f64::max);
            let per_rep: Vec<String> = samples.iter().map(|v| format!("{v:.0}")).collect();
            rows.push(vec![m.label.to_string(), fmt(median(&samples), 0, ""), fmt(max, 0, ""), per_rep.join(", ")]);
        }
        layout(&rows)
    }

    /// Context lines about the cluster's roles and leadership during the workloads.
    fn cluster_lines(&self, c: &ClusterSummary) -> String {
        let label = self.args.label(Target::Raftyard);
        let mut out = format!(
            "{label}: {} nodes on loopback, leader node {}; pushes and manifest PUTs to follower node {}, \
             pulls and manifest GETs to follower node {}; RSS is the sum of the {} nodes\n",
            c.nodes, c.roles.leader, c.roles.writer, c.roles.reader, c.nodes
        );
        if c.term_after == c.term_before && c.leader_after == c.roles.leader {
            out.push_str(&format!(
                "leadership: node {} led throughout the workloads (term {})\n",
                c.leader_after, c.term_after
            ));
        } else {
            out.push_str(&format!(
                "leadership CHANGED during the workloads: term {} -> {}, leader node {} -> node {}\n",
                c.term_before, c.term_after, c.roles.leader, c.leader_after
            ));
        }
        out
    }

    /// Context lines and the table of the failover measurement.
    fn render_failover(&self) -> String {
        let ok: usize = self.failover.iter().map(|r| r.pushes_ok).sum();
        let failed: usize = self.failover.iter().map(|r| r.pushes_failed).sum();
        let mut out = format!(
            "failover: {} rep(s); {}; pushes: {ok} ok, {failed} failed\n",
            self.failover.len(),
            failover_method(self.args.failover_signal)
        );
        for (i, r) in self.failover.iter().enumerate() {
            let writer_role = if r.writer == r.new_leader { "became the leader" } else { "stayed a follower" };
            out.push_str(&format!(
                "  rep {}: stopped node {}, node {} elected; the writer's node {} {writer_role}; {} ok, {} failed pushes; \
                 node {} caught up {:.1} s after restart\n",
                i + 1,
                r.killed,
                r.new_leader,
                r.writer,
                r.pushes_ok,
                r.pushes_failed,
                r.killed,
                r.catch_up.as_secs_f64()
            ));
        }
        out.push('\n');
        out.push_str(&self.failover_table());
        out
    }

    /// Human-readable report: context lines and the table(s).
    pub fn render(&self) -> String {
        let a = self.args;
        let mut out = String::new();
        out.push_str(&format!("command: {}\n", self.command));
        out.push_str(&format!(
            "medians of {} rep(s); blob {} MiB, chunk {} MiB, {} manifests per rep; MB = 10^6 bytes\n",
            a.reps, a.blob_mib, a.chunk_mib, a.manifests
        ));
        if let Some(v) = &self.docker_registry_version {
            out.push_str(&format!("docker-registry: {v}\n"));
        }
        if let Some(c) = &self.cluster {
            out.push_str(&self.cluster_lines(c));
        }
        if let Some((raftyard, docker)) = self.both() {
            out.push_str(&format!(
                "order: each rep runs both registries back to back, {} first in odd reps, {} first in even reps\n",
                raftyard.label, docker.label
            ));
            out.push_str(&format!("ratio: {RATIO_DIRECTION}\n"));
            out.push_str(
                "per-rep ratio: computed within each rep from its two back-to-back runs; \
                 RSS is one value per registry, so it has none\n",
            );
        }
        out.push('\n');
        out.push_str(&self.table());
        if !self.failover.is_empty() {
            out.push('\n');
            out.push_str(&self.render_failover());
        }
        out
    }

    pub fn to_json(&self) -> Value {
        let a = self.args;
        let metrics = metrics(a);
        let mut targets = serde_json::Map::new();
        for r in &self.results {
            let mut per_metric = serde_json::Map::new();
            for m in &metrics {
                let samples = (m.samples)(r);
                per_metric.insert(
                    m.key.to_string(),
                    json!({ "unit": m.unit, "median": median(&samples), "samples": samples }),
                );
            }
            targets.insert(r.label.clone(), Value::Object(per_metric));
        }
        let mut ratios = serde_json::Map::new();
        if let Some((raftyard, docker)) = self.both() {
            for m in &metrics {
                let c = Comparison::new(m, raftyard, docker);
                ratios.insert(
                    m.key.to_string(),
                    json!({
                        "ratio_of_medians": c.of_medians,
                        "median_of_per_rep_ratios": c.median_per_rep(),
                        "per_rep_ratios": c.per_rep,
                    }),
                );
            }
        }
        json!({
            "command": self.command,
            "config": {
                "reps": a.reps,
                "blob_mib": a.blob_mib,
                "chunk_mib": a.chunk_mib,
                "manifests": a.manifests,
                "manifest_warmup": a.manifest_warmup,
                "cluster": a.cluster,
                "failover_reps": a.failover_reps,
                "failover_signal": format!("{:?}", a.failover_signal).to_lowercase(),
            },
            "cluster": self.cluster.as_ref().map(cluster_json),
            "failover": (!self.failover.is_empty()).then(|| self.failover_json()),
            "docker_registry_version": self.docker_registry_version,
            "order": self.both().map(|(raftyard, docker)| format!(
                "each rep runs both registries back to back; {} first in odd reps, {} first in even reps",
                raftyard.label, docker.label
            )),
            "ratio_direction": RATIO_DIRECTION,
            "results": targets,
            "ratios": ratios,
        })
    }

    fn failover_json(&self) -> Value {
        let mut out = serde_json::Map::new();
        out.insert("method".into(), json!(failover_method(self.args.failover_signal)));
        for m in failover_metrics() {
            let samples: Vec<f64> = self.failover.iter().map(|r| millis((m.sample)(r))).collect();
            let max = samples.iter().copied().reduce(f64::max);
            out.insert(
                m.key.into(),
                json!({ "label": m.label, "unit": "ms", "median": median(&samples), "max": max, "samples": samples }),
            );
        }
        let reps: Vec<Value> = self
            .failover
            .iter()
            .map(|r| {
                json!({
                    "killed_leader": r.killed,
                    "new_leader": r.new_leader,
                    "writer_node": r.writer,
                    "leader_elected_ms": millis(r.election),
                    "first_push_after_kill_ms": millis(r.first_push),
                    "longest_push_gap_ms": millis(r.longest_gap),
                    "pushes_ok": r.pushes_ok,
                    "pushes_failed": r.pushes_failed,
                    "first_error_after_kill": r.first_error,
                    "catch_up_after_restart_ms": millis(r.catch_up),
                })
            })
            .collect();
        out.insert("reps".into(), Value::Array(reps));
        Value::Object(out)
    }
}

fn cluster_json(c: &ClusterSummary) -> Value {
    json!({
        "nodes": c.nodes,
        "leader": c.roles.leader,
        "write_node": c.roles.writer,
        "read_node": c.roles.reader,
        "term_before_workloads": c.term_before,
        "leader_after_workloads": c.leader_after,
        "term_after_workloads": c.term_after,
    })
}

/// One row of the failover table.
struct FailoverMetric {
    key: &'static str,
    label: &'static str,
    sample: fn(&FailoverRep) -> Duration,
}

fn failover_metrics() -> [FailoverMetric; 3] {
    [
        FailoverMetric {
            key: "leader_elected_ms",
            label: "(a) all live nodes agree on a new leader",
            sample: |r| r.election,
        },
        FailoverMetric {
            key: "first_push_after_kill_ms",
            label: "(b) first push started after the signal succeeds",
            sample: |r| r.first_push,
        },
        FailoverMetric {
            key: "longest_push_gap_ms",
            label: "(c) longest gap between successful pushes",
            sample: |r| r.longest_gap,
        },
    ]
}

/// How the failover is provoked and observed, for the report and the JSON output.
fn failover_method(signal: failover::Signal) -> String {
    let how = match signal {
        failover::Signal::Kill => "killed with SIGKILL",
        failover::Signal::Term => "stopped with SIGTERM (it hands over, then drains)",
    };
    format!(
        "a writer pushes {} KiB blobs (one POST ?digest= each, sequential, one connection, {} ms pause after a \
         failure) to a follower, each rep the next one in id order; the leader is {how} after {} s; the live nodes' health is polled \
         every {} ms",
        failover::BLOB_BYTES / 1024,
        failover::RETRY_PAUSE.as_millis(),
        failover::KILL_AFTER.as_secs(),
        failover::HEALTH_POLL.as_millis()
    )
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Lays out `rows` (the first is the header) as a Markdown-style table,
/// the first column left-aligned and the others right-aligned.
fn layout(rows: &[Vec<String>]) -> String {
    let columns = rows[0].len();
    let widths: Vec<usize> =
        (0..columns).map(|c| rows.iter().map(|row| row[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(
                |(c, cell)| {
                    if c == 0 {
                        format!("{cell:<w$}", w = widths[c])
                    } else {
                        format!("{cell:>w$}", w = widths[c])
                    }
                },
            )
            .collect();
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            out.push_str(&format!("|-{}-|\n", rule.join("-|-")));
        }
    }
    out
}

fn fmt(value: Option<f64>, decimals: usize, suffix: &str) -> String {
    match value {
        Some(v) => format!("{v:.decimals$}{suffix}"),
        None => "-".to_string(),
    }
}

/// The command line, quoted so it can be pasted into a POSIX shell.
pub fn command_line() -> String {
    std::env::args()
        .map(|arg| {
            let plain = !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain {
                arg
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_and_even() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn nearest_rank_percentile() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&samples, 50.0), 50.0);
        assert_eq!(percentile(&samples, 99.0), 99.0);
        assert_eq!(percentile(&samples, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }

    #[test]
    fn ratio_direction() {
        assert_eq!(ratio(Better::Higher, Some(200.0), Some(100.0)), Some(2.0));
        assert_eq!(ratio(Better::Lower, Some(1.0), Some(2.0)), Some(2.0));
        assert_eq!(ratio(Better::Lower, Some(0.0), Some(2.0)), None);
    }

    #[test]
    fn per_rep_ratios_pair_samples_by_rep() {
        let raftyard = [200.0, 90.0, 300.0];
        let docker = [100.0, 30.0, 300.0];
        assert_eq!(per_rep_ratios(Better::Higher, &raftyard, &docker), vec![2.0, 3.0, 1.0]);
        assert_eq!(per_rep_ratios(Better::Lower, &[1.0, 0.0], &[2.0, 5.0]), vec![2.0]);
    }
}
