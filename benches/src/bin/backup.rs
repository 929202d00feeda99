//! `raftyard-backup-bench`: RPO of a backup node under a push load, and time to recover from
//! it (see [`raftyard_bench::backup`]).

fn main() -> std::process::ExitCode {
    raftyard_bench::cli::main_of(raftyard_bench::backup::run)
}
