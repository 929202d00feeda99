//! `raftyard-auth-bench`: what authentication costs (see [`raftyard_bench::auth`]).

fn main() -> std::process::ExitCode {
    raftyard_bench::cli::main_of(raftyard_bench::auth::run)
}
