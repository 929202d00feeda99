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

    /// Keep the run's data directories and server logs instead of deleting them.
    #[arg(long)]
    pub keep_data: bool,

    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,

    /// Seconds to wait for a server to answer `GET /v2/` with 200.
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

/// The workspace this crate was built from (the parent of `benches/`).
fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}
