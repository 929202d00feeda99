//! A raftyard cluster on loopback: configuring, starting, killing and restarting its nodes,
//! and reading who leads from their health endpoints.
//!
//! Every node has its own directory under the run directory (`node<ID>/` holding
//! `config.toml`, `data/` and `server.log`) and a registry and a peer port picked free on
//! 127.0.0.1. Every config lists all members, so the node with the lowest id initialises the
//! cluster (`docs/configuration.md`). Nodes are [`Server`]s, so each is stopped when the
//! cluster is dropped.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use reqwest::{Client, Url};
use serde_json::Value;

use crate::client::http_client;
use crate::server::{free_ports, Server};

/// Timeout of one health request; polls must keep their pace even if a node stalls.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Log lines per node included in an error.
const LOG_LINES: usize = 10;

/// What a node's `GET /v2/_raftyard/health` reports (the fields the benchmark uses).
#[derive(Clone, Debug, PartialEq)]
pub struct Health {
    pub node: u64,
    pub leader: Option<u64>,
    pub state: String,
    pub term: u64,
    pub applied: u64,
}

impl Health {
    fn parse(value: &Value) -> Result<Health> {
        let number = |key: &str| value.get(key).and_then(Value::as_u64).ok_or_else(|| anyhow!("no number {key:?}"));
        Ok(Health {
            node: number("node")?,
            leader: value.get("leader").and_then(Value::as_u64),
            state: value.get("state").and_then(Value::as_str).unwrap_or("?").to_string(),
            term: number("term")?,
            applied: number("applied")?,
        })
    }
}

/// The leader all running nodes agree on, and its Raft term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leadership {
    pub leader: u64,
    pub term: u64,
}

/// Which node does what during the workloads: writes go to one follower of the leader,
/// reads to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roles {
    pub leader: u64,
    pub writer: u64,
    pub reader: u64,
}

struct Node {
    id: u64,
    dir: PathBuf,
    config: PathBuf,
    registry_port: u16,
    peer_port: u16,
    server: Server,
    /// False after [`Cluster::kill`] until [`Cluster::restart`].
    running: bool,
}

impl Node {
    fn name(id: u64) -> String {
        format!("raftyard node {id}")
    }
}

pub struct Cluster {
    bin: PathBuf,
    nodes: Vec<Node>,
    http: Client,
}

impl Cluster {
    /// Writes the configs of `size` nodes (ids 1..=size) under `dir`, each with `extra` (TOML)
    /// appended, and starts them all.
    pub fn start(bin: &Path, dir: &Path, size: u32, extra: &str) -> Result<Cluster> {
        let ids: Vec<u64> = (1..=u64::from(size)).collect();
        let ports = free_ports(2 * ids.len())?;
        let (registry_ports, peer_ports) = ports.split_at(ids.len());
        let members: Vec<(u64, u16, u16)> =
            ids.iter().zip(registry_ports.iter().zip(peer_ports)).map(|(&id, (&reg, &peer))| (id, reg, peer)).collect();
        let mut nodes = Vec::with_capacity(ids.len());
        for &(id, registry_port, peer_port) in &members {
            let dir = dir.join(format!("node{id}"));
            let data_dir = dir.join("data");
            fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
            let config = dir.join("config.toml");
            fs::write(&config, node_config(id, &data_dir, registry_port, peer_port, &members) + "\n" + extra + "\n")
                .with_context(|| format!("writing {}", config.display()))?;
            let server = Server::start_raftyard_node(bin, Node::name(id), &config, &dir, registry_port)?;
            eprintln!("started {} (pid {}) at {}, peer port {peer_port}", server.name, server.pid(), server.base);
            nodes.push(Node { id, dir, config, registry_port, peer_port, server, running: true });
        }
        Ok(Cluster { bin: bin.to_path_buf(), nodes, http: http_client(HEALTH_TIMEOUT)? })
    }

    /// Starts node `id` as a backup (`node.role = "backup"`) and adds it to the cluster with
    /// `raftyard cluster add-backup`; it then counts as a node of this cluster (not as a voter:
    /// wait for leaders with the voters only).
    pub async fn add_backup(&mut self, id: u64, dir: &Path) -> Result<()> {
        let ports = free_ports(2)?;
        let (registry_port, peer_port) = (ports[0], ports[1]);
        let dir = dir.join(format!("node{id}"));
        let data_dir = dir.join("data");
        fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        let config = dir.join("config.toml");
        let mut text = node_config(id, &data_dir, registry_port, peer_port, &[]);
        text = text.replacen("[node]\n", "[node]\nrole = \"backup\"\n", 1);
        fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let server =
            Server::start_raftyard_node(&self.bin, format!("raftyard backup {id}"), &config, &dir, registry_port)?;
        eprintln!("started {} (pid {}) at {}, peer port {peer_port}", server.name, server.pid(), server.base);
        self.nodes.push(Node { id, dir, config, registry_port, peer_port, server, running: true });
        let http = self.http.clone();
        self.node_mut(id)?.server.wait_ready(&http, Duration::from_secs(30)).await?;
        let voter = self.nodes.iter().find(|n| n.id != id && n.running).context("no running voter")?;
        let out = std::process::Command::new(&self.bin)
            .args([
                "cluster",
                "add-backup",
                "--node",
                &format!("127.0.0.1:{}", voter.peer_port),
                "--id",
                &id.to_string(),
            ])
            .args(["--peer", &format!("127.0.0.1:{peer_port}"), "--registry", &format!("127.0.0.1:{registry_port}")])
            .output()?;
        anyhow::ensure!(out.status.success(), "cluster add-backup: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// Removes node `id` from the membership (`raftyard cluster remove`, through another
    /// running node), stops it and forgets it; returns its data directory, which stays.
    pub fn remove(&mut self, id: u64) -> Result<PathBuf> {
        let other = self.nodes.iter().find(|n| n.id != id && n.running).context("no other running node")?;
        let out = std::process::Command::new(&self.bin)
            .args(["cluster", "remove", "--node", &format!("127.0.0.1:{}", other.peer_port), "--id", &id.to_string()])
            .output()?;
        anyhow::ensure!(out.status.success(), "cluster remove: {}", String::from_utf8_lossy(&out.stderr));
        let at = self.nodes.iter().position(|n| n.id == id).ok_or_else(|| anyhow!("no node {id} in the cluster"))?;
        let mut node = self.nodes.remove(at);
        node.server.terminate()?;
        node.server.wait_exit(Duration::from_secs(60))?;
        Ok(node.dir.join("data"))
    }

    /// Process id of node `id`.
    pub fn pid(&self, id: u64) -> Result<u32> {
        Ok(self.node(id)?.server.pid())
    }

    /// Path of node `id`'s log.
    pub fn log_path(&self, id: u64) -> Result<PathBuf> {
        Ok(self.node(id)?.server.log_path.clone())
    }

    /// Node `id`'s data directory.
    pub fn data_dir(&self, id: u64) -> Result<PathBuf> {
        Ok(self.node(id)?.dir.join("data"))
    }

    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// Base URL of node `id`'s registry API.
    pub fn base(&self, id: u64) -> Result<Url> {
        Ok(self.node(id)?.server.base.clone())
    }

    /// Process ids of the running nodes.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter(|n| n.running).map(|n| n.server.pid()).collect()
    }

    fn node(&self, id: u64) -> Result<&Node> {
        self.nodes.iter().find(|n| n.id == id).ok_or_else(|| anyhow!("no node {id} in the cluster"))
    }

    fn node_mut(&mut self, id: u64) -> Result<&mut Node> {
        self.nodes.iter_mut().find(|n| n.id == id).ok_or_else(|| anyhow!("no node {id} in the cluster"))
    }

    fn live_ids(&self) -> Vec<u64> {
        self.nodes.iter().filter(|n| n.running).map(|n| n.id).collect()
    }

    /// Waits until every running node answers `GET /v2/` with 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        for node in self.nodes.iter_mut().filter(|n| n.running) {
            node.server.wait_ready(&self.http, timeout).await?;
        }
        Ok(())
    }

    /// Polls every `interval` until all running nodes name the same running node as leader.
    /// Fails after `timeout` or if a running node exits.
    pub async fn wait_for_leader(&mut self, timeout: Duration, interval: Duration) -> Result<Leadership> {
        let started = Instant::now();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let polled = self.poll_health().await;
            if let Some(leadership) = leadership(&polled, &self.live_ids()) {
                return Ok(leadership);
            }
            self.ensure_running()?;
            if started.elapsed() > timeout {
                bail!(
                    "the nodes did not agree on a leader within {timeout:?} ({}); {}",
                    describe(&polled),
                    self.log_tails()
                );
            }
        }
    }

    /// The leadership right now; fails if the nodes do not agree on a leader.
    pub async fn leadership(&self) -> Result<Leadership> {
        let polled = self.poll_health().await;
        leadership(&polled, &self.live_ids())
            .ok_or_else(|| anyhow!("the nodes do not agree on a leader ({})", describe(&polled)))
    }

    /// The running nodes other than `leader`, in id order.
    pub fn followers(&self, leader: u64) -> Vec<u64> {
        self.live_ids().into_iter().filter(|&id| id != leader).collect()
    }

    /// The followers of `leader` in id order: the first takes the writes, the second the reads.
    pub fn roles(&self, leader: u64) -> Result<Roles> {
        match self.followers(leader)[..] {
            [writer, reader, ..] => Ok(Roles { leader, writer, reader }),
            _ => bail!("leader node {leader} has fewer than two running followers"),
        }
    }

    /// Kills node `id` with SIGKILL.
    pub fn kill(&mut self, id: u64) -> Result<()> {
        let node = self.node_mut(id)?;
        node.server.kill()?;
        node.running = false;
        Ok(())
    }

    /// Sends SIGTERM to node `id` and counts it out of the live nodes at once (it drains
    /// meanwhile); [`Cluster::restart`] waits for it to exit.
    pub fn terminate(&mut self, id: u64) -> Result<()> {
        let node = self.node_mut(id)?;
        node.server.terminate()?;
        node.running = false;
        Ok(())
    }

    /// Sends SIGTERM to node `id` and waits until it has exited cleanly (its storage may then
    /// be opened by another process); [`Cluster::restart`] starts it again.
    pub fn stop(&mut self, id: u64) -> Result<()> {
        self.terminate(id)?;
        let status = self.node_mut(id)?.server.wait_exit(Duration::from_secs(60))?;
        ensure!(status.success(), "node {id} exited with {status} after SIGTERM");
        Ok(())
    }

    /// Starts killed node `id` again with its config and data directory.
    ///
    /// Must run on the benchmark's main task (see [`Server::start_raftyard_node`]).
    pub fn restart(&mut self, id: u64) -> Result<()> {
        let bin = self.bin.clone();
        let node = self.node_mut(id)?;
        if node.running {
            bail!("node {id} is still running");
        }
        let status = node.server.wait_exit(Duration::from_secs(60))?;
        if !status.success() && status.code().is_some() {
            bail!("node {id} exited with {status} after SIGTERM");
        }
        node.server = Server::start_raftyard_node(&bin, Node::name(id), &node.config, &node.dir, node.registry_port)?;
        node.running = true;
        eprintln!("restarted {} (pid {})", node.server.name, node.server.pid());
        Ok(())
    }

    /// Waits until node `id` answers, agrees with the others on the leader, and has applied
    /// at least as much of the log as the leader.
    pub async fn wait_caught_up(&mut self, id: u64, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        let http = self.http.clone();
        self.node_mut(id)?.server.wait_ready(&http, timeout).await?;
        loop {
            let polled = self.poll_health().await;
            if caught_up(&polled, &self.live_ids(), id) {
                return Ok(());
            }
            self.ensure_running()?;
            if started.elapsed() > timeout {
                bail!("node {id} did not catch up within {timeout:?} ({}); {}", describe(&polled), self.log_tails());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fails if a node that should be running has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        for node in self.nodes.iter_mut().filter(|n| n.running) {
            node.server.ensure_running()?;
        }
        Ok(())
    }

    /// The last lines of every node's log, for error messages.
    pub fn log_tails(&self) -> String {
        let tails: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("last lines of {}:\n{}", n.server.log_path.display(), n.server.log_tail(LOG_LINES)))
            .collect();
        tails.join("\n")
    }

    /// The health of every running node, polled concurrently.
    async fn poll_health(&self) -> Vec<(u64, Result<Health>)> {
        let polls = self.nodes.iter().filter(|n| n.running).map(|n| async {
            let health = fetch_health(&self.http, &n.server.base).await;
            (n.id, health)
        });
        futures::future::join_all(polls).await
    }
}

async fn fetch_health(http: &Client, base: &Url) -> Result<Health> {
    let url = base.join("/v2/_raftyard/health")?;
    let resp = http.get(url).timeout(HEALTH_TIMEOUT).send().await?.error_for_status()?;
    let value: Value = resp.json().await?;
    Health::parse(&value)
}

/// The leader every node in `live` names, if they all answered, all name the same node,
/// and that node is one of `live`.
fn agreed_leader(polled: &[(u64, Result<Health>)], live: &[u64]) -> Option<u64> {
    let mut leaders = live.iter().map(|&id| health_of(polled, id).and_then(|h| h.leader));
    let first = leaders.next()??;
    (leaders.all(|l| l == Some(first)) && live.contains(&first)).then_some(first)
}

/// The agreed leader (see [`agreed_leader`]) and the term it reports.
fn leadership(polled: &[(u64, Result<Health>)], live: &[u64]) -> Option<Leadership> {
    let leader = agreed_leader(polled, live)?;
    let term = health_of(polled, leader)?.term;
    Some(Leadership { leader, term })
}

fn health_of(polled: &[(u64, Result<Health>)], id: u64) -> Option<&Health> {
    polled.iter().find(|(polled_id, _)| *polled_id == id).and_then(|(_, h)| h.as_ref().ok())
}

/// Whether all of `live` agree on a leader and node `id` has applied as much as it has.
fn caught_up(polled: &[(u64, Result<Health>)], live: &[u64], id: u64) -> bool {
    let applied = |node: u64| health_of(polled, node).map(|h| h.applied);
    match agreed_leader(polled, live) {
        Some(leader) => matches!((applied(id), applied(leader)), (Some(mine), Some(theirs)) if mine >= theirs),
        None => false,
    }
}

/// One line per poll for error messages: `node 1: Leader (leader 1, term 2, applied 9)`.
fn describe(polled: &[(u64, Result<Health>)]) -> String {
    let parts: Vec<String> = polled
        .iter()
        .map(|(id, h)| match h {
            Ok(h) => format!(
                "node {id}: {} (leader {}, term {}, applied {})",
                h.state,
                h.leader.map_or("none".to_string(), |l| l.to_string()),
                h.term,
                h.applied
            ),
            Err(err) => format!("node {id}: {err:#}"),
        })
        .collect();
    parts.join("; ")
}

/// The TOML config of node `id`; `members` are `(id, registry port, peer port)` of all nodes.
fn node_config(id: u64, data_dir: &Path, registry_port: u16, peer_port: u16, members: &[(u64, u16, u16)]) -> String {
    let data_dir = serde_json::to_string(&data_dir.to_string_lossy()).expect("string serializes");
    let mut config = format!(
        "[node]\nid = {id}\ndata_dir = {data_dir}\n\n\
         [registry]\nlisten = \"127.0.0.1:{registry_port}\"\n\n\
         [cluster]\nlisten = \"127.0.0.1:{peer_port}\"\n"
    );
    for (member, registry, peer) in members {
        config.push_str(&format!(
            "\n[[cluster.members]]\nid = {member}\npeer = \"127.0.0.1:{peer}\"\nregistry = \"127.0.0.1:{registry}\"\n"
        ));
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(node: u64, leader: Option<u64>, applied: u64) -> (u64, Result<Health>) {
        (node, Ok(Health { node, leader, state: "Follower".into(), term: 1, applied }))
    }

    #[test]
    fn leader_needs_agreement_of_all_live_nodes() {
        let all = [1, 2, 3];
        assert_eq!(
            agreed_leader(&[health(1, Some(1), 5), health(2, Some(1), 5), health(3, Some(1), 5)], &all),
            Some(1)
        );
        assert_eq!(agreed_leader(&[health(1, Some(1), 5), health(2, Some(1), 5), health(3, Some(2), 5)], &all), None);
        assert_eq!(agreed_leader(&[health(1, None, 5), health(2, None, 5), health(3, None, 5)], &all), None);
        let unreachable = (3, Err(anyhow!("connection refused")));
        assert_eq!(agreed_leader(&[health(1, Some(1), 5), health(2, Some(1), 5), unreachable], &all), None);
    }

    #[test]
    fn a_killed_leader_does_not_count() {
        let live = [2, 3];
        assert_eq!(agreed_leader(&[health(2, Some(1), 5), health(3, Some(1), 5)], &live), None);
        assert_eq!(agreed_leader(&[health(2, Some(3), 6), health(3, Some(3), 6)], &live), Some(3));
    }

    #[test]
    fn catching_up_compares_with_the_leader() {
        let all = [1, 2, 3];
        assert!(!caught_up(&[health(1, Some(3), 4), health(2, Some(3), 9), health(3, Some(3), 9)], &all, 1));
        assert!(caught_up(&[health(1, Some(3), 9), health(2, Some(3), 9), health(3, Some(3), 9)], &all, 1));
        assert!(!caught_up(&[health(1, Some(1), 9), health(2, Some(3), 9), health(3, Some(3), 9)], &all, 1));
    }

    #[test]
    fn health_parses_the_endpoint_json() {
        let value = serde_json::json!({
            "applied": 3, "last_log_index": 3, "leader": 3, "node": 2, "open_uploads": 0,
            "purged": null, "snapshot": null, "state": "Follower", "term": 2
        });
        let h = Health::parse(&value).unwrap();
        assert_eq!(h, Health { node: 2, leader: Some(3), state: "Follower".into(), term: 2, applied: 3 });
        let no_leader = serde_json::json!({ "applied": 0, "leader": null, "node": 1, "state": "Candidate", "term": 1 });
        assert_eq!(Health::parse(&no_leader).unwrap().leader, None);
    }

    #[test]
    fn config_lists_every_member() {
        let members = [(1, 5001, 5101), (2, 5002, 5102), (3, 5003, 5103)];
        let config = node_config(2, Path::new("/tmp/x/node2/data"), 5002, 5102, &members);
        assert!(config.contains("[node]\nid = 2\ndata_dir = \"/tmp/x/node2/data\"\n"));
        assert!(config.contains("[registry]\nlisten = \"127.0.0.1:5002\"\n"));
        assert!(config.contains("[cluster]\nlisten = \"127.0.0.1:5102\"\n"));
        assert_eq!(config.matches("[[cluster.members]]").count(), 3);
        assert!(config.contains("id = 3\npeer = \"127.0.0.1:5103\"\nregistry = \"127.0.0.1:5003\"\n"));
    }
}
