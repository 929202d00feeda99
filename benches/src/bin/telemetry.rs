//! `raftyard-telemetry-bench`: what tracing costs (see [`raftyard_bench::telemetry`]).

fn main() -> std::process::ExitCode {
    raftyard_bench::cli::main_of(raftyard_bench::telemetry::run)
}
