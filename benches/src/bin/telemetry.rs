//! `raftyard-telemetry-bench`: what tracing costs (see [`raftyard_bench::telemetry`]).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = raftyard_bench::telemetry::Args::parse();
    match raftyard_bench::telemetry::run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
