//! `raftyard-relay --config relay.toml`: the tunnel relay on its own, for a public host. It is
//! `raftyard relay` without the registry, storage and consensus code linked in, so the binary
//! and its resident memory stay small.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(name = "raftyard-relay", version, about = "The raftyard tunnel relay")]
struct Cli {
    /// Relay configuration (TOML).
    #[arg(long, short)]
    config: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    raftyard::init_logging();
    let cfg = raftyard_tunnel::RelayConfig::load(&cli.config)?;
    raftyard::tunnel::small_runtime()?.block_on(raftyard::tunnel::relay(cfg))
}
