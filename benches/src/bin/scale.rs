//! `raftyard-scale-bench`: how a cluster's costs grow with the registry
//! (see [`raftyard_bench::scale`]).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = raftyard_bench::scale::Args::parse();
    match raftyard_bench::scale::run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
