//! `raftyard relay` and `raftyard agent`: the tunnel crate's relay and agent as processes that
//! run until SIGTERM or Ctrl-C.

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
