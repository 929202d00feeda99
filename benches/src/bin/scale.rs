//! `raftyard-scale-bench`: how a cluster's costs grow with the registry
//! (see [`raftyard_bench::scale`]).

fn main() -> std::process::ExitCode {
    raftyard_bench::cli::main_of(raftyard_bench::scale::run)
}
