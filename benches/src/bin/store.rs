//! `raftyard-store-bench`: disk taken by the metadata state in sled and in candidate stores
//! (see [`raftyard_bench::store`]).

fn main() -> std::process::ExitCode {
    raftyard_bench::cli::main_of(raftyard_bench::store::run)
}
