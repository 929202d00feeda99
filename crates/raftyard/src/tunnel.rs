//! `raftyard relay` (also the small `raftyard-relay` binary) and `raftyard agent`: the tunnel
//! crate's relay and agent as processes that run until SIGTERM or Ctrl-C.

use raftyard_tunnel::{Agent, AgentFile, Relay, RelayConfig};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub async fn relay(cfg: RelayConfig) -> anyhow::Result<()> {
    let relay = Relay::bind(&cfg).await?;
    let a = relay.addrs();
    info!(control = %a.control, dashboard = ?a.dashboard, services = ?a.services, "relay listening");
    let stop = CancellationToken::new();
    let run = tokio::spawn(relay.run(stop.clone()));
    crate::node::shutdown_signal().await;
    stop.cancel();
    run.await?;
    Ok(())
}

pub async fn agent(cfg: AgentFile) -> anyhow::Result<()> {
    let agent = Agent::start(&cfg.name, &cfg.relays, &cfg.services)?;
    info!(relays = cfg.relays.len(), services = cfg.services.len(), "agent running");
    crate::node::shutdown_signal().await;
    agent.stop().await;
    Ok(())
}

/// The relay and a standalone agent only move bytes (with splice, mostly in the kernel): one
/// worker per core. (A single-threaded runtime measured the same on two cores, but would cap a
/// busy relay at one core.)
pub fn small_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(cores).enable_all().build()?)
}
