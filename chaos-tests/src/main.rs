//! `chaos-tests --seed N --duration SECONDS`: one scenario against a fresh cluster, a report
//! (human on stdout, JSON with `--json`), exit status 1 on any violation. The last line is
//! `chaos: <ops> ops, <faults> faults, <violations> violations`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

#[derive(Parser)]
#[command(name = "chaos-tests", about = "Seeded faults against a raftyard cluster under load, and a history checker")]
struct Cli {
    /// Seed of the fault schedule and of the clients' choices; the same seed replays the same schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds of load and faults (the checks come after).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Voters in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 6)]
    clients: usize,
    /// Tags used as registers.
    #[arg(long, default_value_t = 8)]
    keys: usize,
    /// Fault mix, comma-separated: kill, pause, restart, isolate, oneway, slow, disk, relay
    /// (default: all; relay only with --relay); `none` for a run without faults.
    #[arg(long)]
    faults: Option<String>,
    /// Start this node deliberately broken (see --broken-how), to see the suite catch it.
    #[arg(long)]
    broken_node: Option<u64>,
    /// How the broken node is broken: ack-before-commit (manifests acknowledged before they
    /// commit) or stale-reads (reads by digest without a read barrier).
    #[arg(long, default_value = "ack-before-commit")]
    broken_how: String,
    /// Put a tunnel relay in front of the nodes: clients also go through its shared endpoint,
    /// and the `relay` fault (kill -9 of the relay) joins the default mix.
    #[arg(long)]
    relay: bool,
    /// Add a backup node (`cluster add-backup`): faults hit it too, and after healing it must
    /// hold every acknowledged blob and manifest and converge to the voters' state.
    #[arg(long)]
    backup: bool,
    /// ID:MS — node ID's peer links are delayed MS milliseconds each way for the whole run (a
    /// member far away).
    #[arg(long, value_parser = parse_distant)]
    distant: Option<(u64, Duration)>,
    /// Independent fault streams at once: 2 or more overlap faults (a majority can be lost for
    /// a while); a fault whose node another fault holds is skipped.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// The raftyard binary [default: target/release/raftyard next to this workspace].
    #[arg(long)]
    raftyard: Option<PathBuf>,
    /// RUST_LOG of the nodes and the relay (their logs are in the run's directory).
    #[arg(long, default_value = "info")]
    node_log: String,
    /// A line for every node's `[raft]` section (`compress_metadata = true`). Repeatable.
    #[arg(long, value_name = "KEY = VALUE")]
    raft: Vec<String>,
    /// Keep the run's directory (node logs, and data except a disk fault's tmpfs) and print
    /// its path.
    #[arg(long)]
    keep: bool,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn parse_distant(s: &str) -> Result<(u64, Duration), String> {
    let (id, ms) = s.split_once(':').ok_or("expected ID:MS")?;
    Ok((id.parse().map_err(|_| "bad node id")?, Duration::from_millis(ms.parse().map_err(|_| "bad milliseconds")?)))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let faults = match cli.faults.as_deref() {
        None => {
            let mut all = chaos_tests::faults::Kind::ALL.to_vec();
            if cli.relay {
                all.push(chaos_tests::faults::Kind::Relay);
            }
            all
        }
        Some("none") => Vec::new(),
        Some(list) => match list.split(',').map(|s| chaos_tests::faults::Kind::parse(s.trim())).collect() {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
    };
    if faults.contains(&chaos_tests::faults::Kind::Relay) && !cli.relay {
        eprintln!("error: the relay fault needs --relay");
        return ExitCode::from(2);
    }
    let bin = cli.raftyard.unwrap_or_else(|| {
        let ws = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf();
        ws.join("target/release/raftyard")
    });
    let opts = chaos_tests::Options {
        bin,
        seed: cli.seed,
        duration: Duration::from_secs(cli.duration),
        nodes: cli.nodes,
        clients: cli.clients,
        keys: cli.keys,
        faults,
        broken: cli.broken_node.map(|id| (id, cli.broken_how.clone())),
        relay: cli.relay,
        backup: cli.backup,
        concurrency: cli.concurrency,
        distant: cli.distant,
        node: chaos_tests::cluster::NodeSettings { log_level: cli.node_log.clone(), raft: cli.raft.clone() },
        keep: cli.keep,
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    match rt.block_on(chaos_tests::run(&opts)) {
        Ok(report) => {
            if let Some(p) = &cli.json {
                if let Err(e) = std::fs::write(p, serde_json::to_string_pretty(&report).expect("json") + "\n") {
                    eprintln!("error: writing {}: {e}", p.display());
                }
            }
            println!("{}", report.human());
            if report.violations.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
