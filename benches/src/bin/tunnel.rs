//! `raftyard-tunnel-bench`: raftyard's tunnel against rathole and a direct connection (see
//! [`raftyard_bench::tunnel`]).

fn main() -> std::process::ExitCode {
    raftyard_bench::cli::main_of(raftyard_bench::tunnel::run)
}
