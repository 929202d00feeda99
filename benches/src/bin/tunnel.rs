//! `raftyard-tunnel-bench`: raftyard's tunnel against rathole and a direct connection (see
//! [`raftyard_bench::tunnel`]).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = raftyard_bench::tunnel::Args::parse();
    match raftyard_bench::tunnel::run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
