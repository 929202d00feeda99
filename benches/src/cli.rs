//! Command-line arguments.

use std::path::{Path, PathBuf};

use clap::{Parser, ValueEnum};

/// Which registry implementation a server is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// The raftyard binary (`raftyard serve`).
    Raftyard,
    /// CNCF Distribution 2.8 as packaged by Debian (`docker-registry serve`).
    DockerRegistry,
}

impl Target {
    /// Both targets, in the order they run odd-numbered repetitions (even-numbered
    /// repetitions run them in reverse).
    pub const ALL: [Target; 2] = [Target::Raftyard, Target::DockerRegistry];

    /// Stable name used in the table, the JSON output and log lines.
    pub fn name(self) -> &'static str {
        match self {
            Target::Raftyard => "raftyard",
            Target::DockerRegistry => "docker-registry",
        }
    }
}

/// Side-by-side benchmark of raftyard against Distribution's `docker-registry`.
#[derive(Debug, Parser)]
#[command(name = "raftyard-bench", version, about, long_about = None)]
pub struct Args {
    /// Path of the raftyard binary [default: <workspace>/target/release/raftyard].
    #[arg(long, value_name = "PATH")]
    pub raftyard: Option<PathBuf>,

    /// Path of the CNCF Distribution `docker-registry` binary.
    #[arg(long, value_name = "PATH", default_value = "/usr/bin/docker-registry")]
    pub docker_registry: PathBuf,

    /// Start and measure only this registry.
    #[arg(long, value_enum, value_name = "TARGET")]
    pub only: Option<Target>,

    /// Run raftyard as a cluster of N nodes on loopback instead of a single node (0): pushes
    /// and manifest PUTs go to one follower, pulls and manifest GETs to another, and a
    /// leader-failover measurement follows the workloads. N is 0 or 3 to 7.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = parse_cluster_size)]
    pub cluster: u32,

    /// Cluster mode: how many times to stop the leader under a stream of small pushes and
    /// measure the recovery; 0 skips the failover measurement.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub failover_reps: u32,

    /// How the failover measurement stops the leader: `kill` (SIGKILL, a crash) or `term`
    /// (SIGTERM: the leader hands its leadership over, then drains).
    #[arg(long, value_enum, value_name = "HOW", default_value = "kill")]
    pub failover_signal: crate::failover::Signal,

    /// Timed repetitions of every workload, each run against both registries
    /// back to back in alternating order; medians are reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub reps: u32,

    /// Size of the blob pushed and pulled, in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub blob_mib: u64,

    /// Size of each PATCH in the chunked push, in MiB.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub chunk_mib: u64,

    /// Manifests PUT (and then GET) per repetition.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub manifests: u32,

    /// Untimed manifest PUT+GET pairs before the first timed repetition.
    #[arg(long, default_value_t = 20)]
    pub manifest_warmup: u32,

    /// Directory under which per-run data directories are created
    /// [default: <workspace>/target/bench-tmp].
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,

    /// TOML appended to each raftyard node's config file in cluster mode, to compare a
    /// setting side by side (e.g. `--node-config $'[raft]\ncompress_metadata = true'`).
    #[arg(long, value_name = "TOML", default_value = "")]
    pub node_config: String,

    /// Keep the run's data directories and server logs instead of deleting them.
    #[arg(long)]
    pub keep_data: bool,

    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,

    /// Seconds to wait for a server to answer `GET /v2/` with 200 and, in cluster mode, for
    /// the nodes to agree on a leader or a restarted node to catch up.
    #[arg(long, default_value_t = 30)]
    pub startup_timeout_secs: u64,

    /// Timeout for small requests (upload start, manifests, readiness), in seconds.
    #[arg(long, default_value_t = 30)]
    pub request_timeout_secs: u64,

    /// Timeout for a single blob transfer request (PUT, PATCH, GET), in seconds.
    #[arg(long, default_value_t = 600)]
    pub transfer_timeout_secs: u64,
}

impl Args {
    /// Whether raftyard runs as a cluster.
    pub fn cluster_mode(&self) -> bool {
        self.cluster > 0
    }

    /// How `target` is labelled in the table, the JSON output and log lines.
    pub fn label(&self, target: Target) -> String {
        match target {
            Target::Raftyard if self.cluster_mode() => format!("raftyard x{}", self.cluster),
            _ => target.name().to_string(),
        }
    }

    /// The registries to start and measure, in order.
    pub fn targets(&self) -> Vec<Target> {
        match self.only {
            Some(t) => vec![t],
            None => Target::ALL.to_vec(),
        }
    }

    pub fn raftyard_bin(&self) -> PathBuf {
        self.raftyard.clone().unwrap_or_else(|| workspace_root().join("target/release/raftyard"))
    }

    pub fn work_dir(&self) -> PathBuf {
        self.work_dir.clone().unwrap_or_else(|| workspace_root().join("target/bench-tmp"))
    }

    pub fn blob_bytes(&self) -> usize {
        usize::try_from(self.blob_mib << 20).expect("blob size fits in memory")
    }

    pub fn chunk_bytes(&self) -> usize {
        usize::try_from(self.chunk_mib << 20).expect("chunk size fits in memory")
    }
}

fn parse_cluster_size(value: &str) -> Result<u32, String> {
    let n: u32 = value.parse().map_err(|err| format!("{err}"))?;
    if n == 0 || (3..=7).contains(&n) {
        Ok(n)
    } else {
        Err("a cluster needs a leader and two followers: use 0 (single node) or 3 to 7".to_string())
    }
}

/// The workspace this crate was built from (the parent of `benches/`).
fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// The `main` of every benchmark binary: parses its arguments, runs it, and exits 0, or 1
/// after printing the error and its causes.
pub fn main_of<A: Parser>(run: fn(&A) -> anyhow::Result<()>) -> std::process::ExitCode {
    match run(&A::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_size_is_zero_or_three_to_seven() {
        assert_eq!(parse_cluster_size("0"), Ok(0));
        assert_eq!(parse_cluster_size("3"), Ok(3));
        assert_eq!(parse_cluster_size("7"), Ok(7));
        assert!(parse_cluster_size("1").is_err());
        assert!(parse_cluster_size("2").is_err());
        assert!(parse_cluster_size("8").is_err());
        assert!(parse_cluster_size("x").is_err());
    }

    #[test]
    fn labels_name_the_cluster_size() {
        let single = Args::parse_from(["raftyard-bench"]);
        assert_eq!(single.label(Target::Raftyard), "raftyard");
        let cluster = Args::parse_from(["raftyard-bench", "--cluster", "3"]);
        assert_eq!(cluster.label(Target::Raftyard), "raftyard x3");
        assert_eq!(cluster.label(Target::DockerRegistry), "docker-registry");
    }
}
