//! `raftyard-store-bench`: disk taken by the metadata state in sled and in candidate stores
//! (see [`raftyard_bench::store`]).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = raftyard_bench::store::Args::parse();
    match raftyard_bench::store::run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
