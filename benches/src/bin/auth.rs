//! `raftyard-auth-bench`: what authentication costs (see [`raftyard_bench::auth`]).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = raftyard_bench::auth::Args::parse();
    match raftyard_bench::auth::run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
