//! [`TestCluster`]: N real raftyard nodes inside the test process, on 127.0.0.1 ports picked
//! by the OS, built the way an operator builds a cluster (a first node, then `add` of each
//! other one: learner, catch-up, voter), with hooks to stop and restart nodes.
//!
//! In-process nodes make tests fast and debuggable; crash tests (`kill -9`) need separate
//! processes and live in the `raftyard` crate's tests.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use openraft::ChangeMembers;
use raftyard::config::Config;
use raftyard::node::{self, RunningNode};

pub mod ports;

/// A cluster of in-process nodes. Node `i` (0-based) has Raft id `i + 1`.
pub struct TestCluster {
    dir: tempfile::TempDir,
    nodes: Vec<Option<RunningNode>>,
    configs: Vec<Config>,
}

fn config(dir: &std::path::Path, id: u64, join: bool) -> Config {
    let mut c = Config::default();
    c.node.id = id;
    c.node.data_dir = dir.join(format!("node{id}"));
    // not port 0: a restart binds the same ports again, and a port from the ephemeral range
    // can be taken meanwhile by some outgoing connection
    c.registry.listen = ([127, 0, 0, 1], ports::free_port()).into();
    c.cluster.listen = ([127, 0, 0, 1], ports::free_port()).into();
    c.cluster.join = join;
    c.raft.election_timeout_min_ms = 300;
    c.raft.election_timeout_max_ms = 600;
    c
}

impl TestCluster {
    /// Starts node 1 as a cluster of one, then adds nodes 2..=n as voters.
    pub async fn start(n: u64) -> anyhow::Result<TestCluster> {
        let dir = tempfile::tempdir()?;
        let mut tc = TestCluster { dir, nodes: Vec::new(), configs: Vec::new() };
        tc.launch(config(tc.dir.path(), 1, false)).await?;
        for id in 2..=n {
            tc.launch(config(tc.dir.path(), id, true)).await?;
            tc.add_voter(id).await?;
        }
        Ok(tc)
    }

    async fn launch(&mut self, mut cfg: Config) -> anyhow::Result<()> {
        let running = node::start(cfg.clone()).await?;
        // a restart binds the same ports and never initialises again
        cfg.registry.listen = running.registry_addr;
        cfg.cluster.listen = running.peer_addr;
        cfg.cluster.join = true;
        self.configs.push(cfg);
        self.nodes.push(Some(running));
        Ok(())
    }

    /// Adds a started node: learner, wait until it has caught up, then voter.
    async fn add_voter(&self, id: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let leader = loop {
            let l = self.nodes.iter().flatten().position(|n| n.meta.raft().metrics().borrow().state.is_leader());
            match l {
                Some(l) => break l,
                None if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                None => anyhow::bail!("no leader to add node {id} to"),
            }
        };
        let raft = self.nodes.iter().flatten().nth(leader).expect("found above").meta.raft().clone();
        let addr = self.node(id as usize - 1).addr.clone();
        raft.add_learner(id, addr, true).await.context("add learner")?;
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false).await.context("promote")?;
        Ok(())
    }

    /// The running node `i`. Panics if it is stopped.
    pub fn node(&self, i: usize) -> &RunningNode {
        self.nodes[i].as_ref().expect("node is running")
    }

    pub fn registry(&self, i: usize) -> SocketAddr {
        self.configs[i].registry.listen
    }

    pub fn url(&self, i: usize, path: &str) -> String {
        format!("http://{}{}", self.registry(i), path)
    }

    /// Index of the node all running nodes agree is the leader.
    pub async fn leader(&self, timeout: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen: Vec<Option<u64>> =
                self.nodes.iter().flatten().map(|n| n.meta.raft().metrics().borrow().current_leader).collect();
            if let Some(Some(l)) = seen.first() {
                let i = *l as usize - 1;
                if seen.iter().all(|s| *s == Some(*l)) && self.nodes.get(i).is_some_and(|n| n.is_some()) {
                    return Ok(i);
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "no agreed leader: {seen:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops node `i` gracefully (drain, Raft shutdown, flush).
    pub async fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(n) = self.nodes[i].take() {
            n.stop().await?;
        }
        Ok(())
    }

    /// Starts node `i` again on its ports and data directory.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        anyhow::ensure!(self.nodes[i].is_none(), "node {i} is running");
        self.nodes[i] = Some(node::start(self.configs[i].clone()).await?);
        Ok(())
    }

    /// Stops every node.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.stop(i).await?;
        }
        Ok(())
    }
}
