//! Statistics, the results table and the JSON output.

use serde_json::{json, Value};

use crate::cli::{Args, Target};

/// Measurements of one registry. Per-repetition vectors hold one sample per
/// timed repetition, in repetition order, so the n-th samples of the two
/// registries come from the same interleaved repetition; the table shows
/// their medians.
#[derive(Debug)]
pub struct TargetResults {
    pub name: &'static str,
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
    pub fn new(name: &'static str) -> Self {
        TargetResults {
            name,
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
            label: "RSS peak during blob pushes (MiB)".into(),
            unit: "MiB",
            better: Better::Lower,
            decimals: 1,
            per_rep: false,
            samples: |r| mib(r.rss_peak_push_kib),
        },
        Metric {
            key: "rss_after_workloads_mib",
            label: "RSS after workloads (MiB)".into(),
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

pub struct Report<'a> {
    pub args: &'a Args,
    pub command: String,
    pub docker_registry_version: Option<String>,
    pub results: Vec<TargetResults>,
}

impl Report<'_> {
    fn find(&self, target: Target) -> Option<&TargetResults> {
        self.results.iter().find(|r| r.name == target.name())
    }

    fn both(&self) -> Option<(&TargetResults, &TargetResults)> {
        Some((self.find(Target::Raftyard)?, self.find(Target::DockerRegistry)?))
    }

    /// The results table, ready to print.
    pub fn table(&self) -> String {
        let mut header = vec!["metric".to_string()];
        header.extend(self.results.iter().map(|r| r.name.to_string()));
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

    /// Human-readable report: context lines and the table.
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
        if self.both().is_some() {
            out.push_str(
                "order: each rep runs both registries back to back, raftyard first in odd reps, \
                 docker-registry first in even reps\n",
            );
            out.push_str(&format!("ratio: {RATIO_DIRECTION}\n"));
            out.push_str(
                "per-rep ratio: computed within each rep from its two back-to-back runs; \
                 RSS is one value per registry, so it has none\n",
            );
        }
        out.push('\n');
        out.push_str(&self.table());
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
            targets.insert(r.name.to_string(), Value::Object(per_metric));
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
            },
            "docker_registry_version": self.docker_registry_version,
            "order": "each rep runs both registries back to back; raftyard first in odd reps, \
                      docker-registry first in even reps",
            "ratio_direction": RATIO_DIRECTION,
            "results": targets,
            "ratios": ratios,
        })
    }
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
