//! Side-by-side benchmark of raftyard against CNCF Distribution 2.8
//! (Debian's `docker-registry` package).
//!
//! Both registries are started on loopback with their data directories in one
//! temporary directory (default `<workspace>/target/bench-tmp`, see
//! `--work-dir`), so they share a filesystem, and both keep running until the
//! benchmark ends. The same workloads are run against each, over HTTP/1.1:
//!
//! * **blob push, monolithic** — `POST /v2/<repo>/blobs/uploads/`, then one
//!   `PUT <location>?digest=` streaming the whole blob (256 MiB by default).
//! * **blob push, chunked** — `POST`, then `PATCH`es of 8 MiB with an
//!   inclusive `Content-Range`, then an empty `PUT <location>?digest=`.
//! * **blob pull** — `GET /v2/<repo>/blobs/<digest>`, body streamed and
//!   discarded, byte count verified; one untimed warm-up pull per registry first.
//! * **manifest PUT / GET latency** — N distinct OCI image manifests PUT to
//!   tags one after another, then each GET by tag; p50 and p99 per repetition,
//!   after untimed warm-up PUT+GET pairs per registry.
//! * **memory** — the server's `VmRSS`: the peak sampled every 50 ms during
//!   that server's blob pushes, and the value after all workloads.
//!
//! Disk and CPU throughput on a shared machine drift over minutes, so running
//! every workload against one registry and then against the other would let
//! that drift bias the comparison. Instead, each workload is repeated
//! `--reps` times (default 5) and every repetition runs once against each
//! registry, back to back, alternating which goes first (ABBA: repetition 1
//! raftyard first, repetition 2 docker-registry first, …). The two halves of
//! a repetition thus see nearly the same conditions, and neither registry is
//! systematically first.
//!
//! Blob content is random, generated once before any timing; every pushed
//! blob gets fresh leading bytes (and thus a fresh digest), so deduplication
//! cannot short-circuit a push. Dirty pages are written back (`sync(2)`,
//! untimed) before every timed repetition, so one registry's earlier writes
//! are not flushed during another's measurement.
//!
//! The table shows, per metric, each registry's median over repetitions, the
//! ratio of those medians, and the median of the per-repetition ratios (each
//! computed from the two halves of one repetition, so it is the figure least
//! affected by drift). Ratios are oriented so that a value above 1 means
//! raftyard did better (throughput: raftyard/docker-registry; latency and
//! memory: docker-registry/raftyard). RSS is one value per registry, so it has
//! no per-repetition ratio.
//!
//! Run it from the workspace root after building raftyard:
//!
//! ```text
//! cargo build --release -p raftyard
//! cargo run --release -p raftyard-bench -- --raftyard target/release/raftyard
//! ```
//!
//! `--only docker-registry` (or `--only raftyard`) measures one registry
//! (and prints no ratios), `--json PATH` also writes the results as JSON, and
//! `--blob-mib`, `--chunk-mib`, `--manifests` and `--reps` size the workloads.
//! The servers are stopped when the run ends, fails or is interrupted.
//!
//! # Cluster mode
//!
//! `--cluster 3` runs raftyard as a three-node Raft cluster on loopback (each
//! node with its own registry and peer port and data directory in the run
//! directory) instead of a single node, and compares it, labelled
//! `raftyard x3`, with one docker-registry, with the same workloads, ABBA
//! interleaving and table. Once all nodes agree on a leader, the client sends
//! blob pushes and manifest PUTs to one follower — the realistic path for a
//! write: forwarded to the leader, each blob replicated to a majority before
//! the `201` — and blob pulls and manifest GETs to the other follower, whose
//! tag reads pass a read index. The RSS rows then give the sum of the nodes'
//! RSS. The report says whether leadership changed during the workloads.
//!
//! After the workloads (docker-registry is stopped by then) the failover is
//! measured `--failover-reps` times (default 3; see [`failover`]): a writer
//! pushes 4 KiB blobs one after another to a follower (the followers take
//! turns from one repetition to the next), the leader is killed with SIGKILL
//! after 2 s, and three times are taken from the kill: until all live nodes
//! agree on a new leader, until the first push started after the kill
//! succeeds, and the longest gap between successful pushes. The killed node
//! is restarted with its config and data and must catch up before the next
//! repetition. A second table gives the median and maximum of each time.
//!
//! ```text
//! cargo build --release -p raftyard -p raftyard-bench
//! target/release/raftyard-bench --raftyard target/release/raftyard --cluster 3
//! ```

use std::fs;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use raftyard_bench::{failover, server, workload};
use tokio::signal::unix::{signal, SignalKind};

use raftyard_bench::cli::{Args, Target};
use raftyard_bench::client::http_client;
use raftyard_bench::cluster::Cluster;
use raftyard_bench::deployment::Deployment;
use raftyard_bench::failover::FailoverPlan;
use raftyard_bench::report::{command_line, ClusterSummary, Report, TargetResults};
use raftyard_bench::server::{RunDir, Server};
use raftyard_bench::workload::{BlobSource, Plan, Subject};

/// Interval of the health polls while waiting for a cluster to elect its first leader.
const LEADER_POLL: Duration = Duration::from_millis(50);

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let outcome = tokio::select! {
        res = run(&args) => res,
        sig = interrupted() => Err(anyhow!("interrupted by {sig}; stopping servers")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM, naming the signal.
async fn interrupted() -> &'static str {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

async fn run(args: &Args) -> Result<()> {
    let command = command_line();
    let targets = args.targets();
    let request_timeout = Duration::from_secs(args.request_timeout_secs);
    let transfer_timeout = Duration::from_secs(args.transfer_timeout_secs);
    let startup_timeout = Duration::from_secs(args.startup_timeout_secs);

    if args.cluster_mode() && !targets.contains(&Target::Raftyard) {
        bail!("--cluster runs raftyard as a cluster, so it cannot be combined with --only docker-registry");
    }
    if targets.contains(&Target::DockerRegistry) && !args.docker_registry.exists() {
        bail!(
            "{} not found; install it with `apt-get install -y docker-registry`, pass \
             --docker-registry PATH, or run with --only raftyard",
            args.docker_registry.display()
        );
    }
    let docker_registry_version = targets
        .contains(&Target::DockerRegistry)
        .then(|| server::docker_registry_version(&args.docker_registry))
        .flatten();

    // Declared before the servers so it is dropped (and deleted) after them.
    let run_dir = RunDir::create(&args.work_dir(), args.keep_data)?;
    eprintln!("run directory: {}", run_dir.path.display());

    let mut deployments = Vec::new();
    for &target in &targets {
        deployments.push(start(args, target, &run_dir.path, startup_timeout, request_timeout).await?);
    }
    let term_before = match deployments.iter_mut().find_map(Deployment::cluster_mut) {
        Some(cluster) => Some(cluster.wait_for_leader(startup_timeout, LEADER_POLL).await?.term),
        None => None,
    };

    let generated = Instant::now();
    let source = BlobSource::new(args.blob_bytes());
    eprintln!("generated {} MiB of random blob data in {:.2?}", args.blob_mib, generated.elapsed());
    let plan = Plan {
        reps: args.reps,
        chunk_bytes: args.chunk_bytes(),
        manifests: args.manifests,
        manifest_warmup: args.manifest_warmup,
    };

    let mut subjects = deployments
        .into_iter()
        .map(|d| {
            let label = args.label(d.target());
            Subject::new(d, label, request_timeout, transfer_timeout)
        })
        .collect::<Result<Vec<_>>>()?;
    workload::run_all(&mut subjects, &source, &plan).await?;
    let (results, deployments): (Vec<TargetResults>, Vec<Deployment>) =
        subjects.into_iter().map(Subject::finish).unzip();

    // Every server but the cluster's stops here, before the failover measurement.
    let mut cluster = None;
    for deployment in deployments {
        if let Deployment::Cluster { cluster: c, roles } = deployment {
            cluster = Some((c, roles));
        }
    }
    let mut summary = None;
    let mut failover = Vec::new();
    if let (Some((cluster, roles)), Some(term_before)) = (&mut cluster, term_before) {
        let after = cluster.wait_for_leader(startup_timeout, LEADER_POLL).await?;
        summary = Some(ClusterSummary {
            nodes: cluster.size(),
            roles: *roles,
            term_before,
            leader_after: after.leader,
            term_after: after.term,
        });
        if args.failover_reps > 0 {
            let plan = FailoverPlan {
                reps: args.failover_reps,
                signal: args.failover_signal,
                recovery_timeout: startup_timeout,
                request_timeout,
            };
            failover = failover::measure(cluster, &plan).await?;
        }
    }

    let report = Report { args, command, docker_registry_version, results, cluster: summary, failover };
    println!("{}", report.render());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report.to_json())?;
        fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Starts `target` in `run_dir/<target>/` — raftyard as a cluster in cluster mode —
/// and waits until it serves (and a cluster has a leader).
async fn start(
    args: &Args,
    target: Target,
    run_dir: &Path,
    startup_timeout: Duration,
    request_timeout: Duration,
) -> Result<Deployment> {
    let dir = run_dir.join(target.name());
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let label = args.label(target);
    if target == Target::Raftyard && args.cluster_mode() {
        let mut cluster = Cluster::start(&args.raftyard_bin(), &dir, args.cluster, &args.node_config)?;
        cluster.wait_ready(startup_timeout).await?;
        let leadership = cluster.wait_for_leader(startup_timeout, LEADER_POLL).await?;
        let roles = cluster.roles(leadership.leader)?;
        eprintln!(
            "{label} is ready: leader node {}, writes to node {}, reads from node {}",
            roles.leader, roles.writer, roles.reader
        );
        return Ok(Deployment::Cluster { cluster, roles });
    }
    let mut server = match target {
        Target::Raftyard => Server::start_raftyard(&args.raftyard_bin(), &dir)?,
        Target::DockerRegistry => Server::start_docker_registry(&args.docker_registry, &dir)?,
    };
    eprintln!("started {label} (pid {}) at {}", server.pid(), server.base);
    server.wait_ready(&http_client(request_timeout)?, startup_timeout).await?;
    eprintln!("{label} is ready");
    Ok(Deployment::Single(server))
}
