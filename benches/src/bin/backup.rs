//! `raftyard-backup-bench`: RPO of a backup node under a push load, and time to recover from
//! it (see [`raftyard_bench::backup`]).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = raftyard_bench::backup::Args::parse();
    match raftyard_bench::backup::run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
