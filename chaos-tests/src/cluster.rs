//! A cluster of real `raftyard serve` processes on loopback, every directed peer link through
//! its own fault-injecting proxy (`cluster.dial_via`), and the faults applied to it: kill,
//! SIGSTOP/SIGCONT, graceful restart, and link modes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::watch;

use crate::proxy::{self, LinkState};

pub struct Node {
    pub id: u64,
    pub registry: String,
    pub peer: String,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    pub paused: bool,
}

impl Node {
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.registry)
    }
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    /// (from, to) → that link's proxy state.
    links: BTreeMap<(u64, u64), watch::Sender<LinkState>>,
    bin: PathBuf,
    broken: Option<u64>,
    _dir: tempfile::TempDir,
}

fn free_addr() -> Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl Cluster {
    /// Starts `n` voters. With `broken = Some(id)`, node `id` acknowledges manifests before
    /// they commit (`RAFTYARD_FAULT_ACK_BEFORE_COMMIT`): the suite must catch it.
    pub async fn start(bin: &Path, n: u64, broken: Option<u64>) -> Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("raftyard-chaos-").tempdir()?;
        let ids: Vec<u64> = (1..=n).collect();
        let mut addrs = BTreeMap::new();
        for &id in &ids {
            addrs.insert(id, (free_addr()?.to_string(), free_addr()?.to_string()));
        }
        let mut links = BTreeMap::new();
        let mut via: BTreeMap<u64, Vec<(String, String)>> = BTreeMap::new();
        for &from in &ids {
            for &to in &ids {
                if from == to {
                    continue;
                }
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let proxy_addr = l.local_addr()?.to_string();
                let target: SocketAddr = addrs[&to].1.parse()?;
                links.insert((from, to), proxy::spawn(l, target));
                via.entry(from).or_default().push((addrs[&to].1.clone(), proxy_addr));
            }
        }
        let mut nodes = Vec::new();
        for &id in &ids {
            let (registry, peer) = addrs[&id].clone();
            let mut cfg = format!(
                "[node]\nid = {id}\ndata_dir = {:?}\n[registry]\nlisten = \"{registry}\"\n\
                 [raft]\nheartbeat_ms = 50\nelection_timeout_min_ms = 300\nelection_timeout_max_ms = 600\n\
                 [cluster]\nlisten = \"{peer}\"\n",
                dir.path().join(format!("node{id}"))
            );
            let dial: Vec<String> = via[&id].iter().map(|(a, p)| format!("\"{a}\" = \"{p}\"")).collect();
            cfg.push_str(&format!("dial_via = {{ {} }}\n", dial.join(", ")));
            for &m in &ids {
                cfg.push_str(&format!(
                    "[[cluster.members]]\nid = {m}\npeer = \"{}\"\nregistry = \"{}\"\n",
                    addrs[&m].1, addrs[&m].0
                ));
            }
            let config = dir.path().join(format!("node{id}.toml"));
            std::fs::write(&config, cfg)?;
            nodes.push(Node {
                id,
                registry,
                peer,
                config,
                log: dir.path().join(format!("node{id}.log")),
                child: None,
                paused: false,
            });
        }
        let mut c = Cluster { nodes, links, bin: bin.to_path_buf(), broken, _dir: dir };
        for id in ids.iter().rev() {
            c.spawn(*id)?;
        }
        for id in &ids {
            c.wait_serving(*id, Duration::from_secs(30)).await?;
        }
        Ok(c)
    }

    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[id as usize - 1]
    }

    fn node_mut(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[id as usize - 1]
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    fn spawn(&mut self, id: u64) -> Result<()> {
        let broken = self.broken == Some(id);
        let bin = self.bin.clone();
        let n = self.node_mut(id);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&n.log)?;
        let mut cmd = Command::new(&bin);
        cmd.args(["serve", "--config"]).arg(&n.config).env("RUST_LOG", "info").stdout(Stdio::null()).stderr(log);
        if broken {
            cmd.env("RAFTYARD_FAULT_ACK_BEFORE_COMMIT", "1");
        }
        n.child = Some(cmd.spawn().with_context(|| format!("starting {}", bin.display()))?);
        n.paused = false;
        Ok(())
    }

    async fn wait_serving(&mut self, id: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while tokio::net::TcpStream::connect(&self.node(id).registry).await.is_err() {
            if let Some(Ok(Some(st))) = self.node_mut(id).child.as_mut().map(|c| c.try_wait()) {
                bail!("node {id} exited with {st}; log:\n{}", self.log_tail(id));
            }
            if Instant::now() > deadline {
                bail!("node {id} did not start; log:\n{}", self.log_tail(id));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    pub fn log_tail(&self, id: u64) -> String {
        let text = std::fs::read_to_string(&self.node(id).log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn signal(&self, id: u64, sig: i32) {
        if let Some(c) = &self.node(id).child {
            // SAFETY: kill(2) on our own, not yet reaped child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    pub fn kill(&mut self, id: u64) {
        self.signal(id, libc::SIGCONT);
        if let Some(mut c) = self.node_mut(id).child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (the node drains), then start it again.
    pub async fn restart(&mut self, id: u64) -> Result<()> {
        self.signal(id, libc::SIGCONT);
        self.signal(id, libc::SIGTERM);
        if let Some(mut c) = self.node_mut(id).child.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.start_again(id).await
    }

    /// Starts a killed node on its data.
    pub async fn start_again(&mut self, id: u64) -> Result<()> {
        if !self.node(id).running() {
            self.spawn(id)?;
            self.wait_serving(id, Duration::from_secs(30)).await?;
        }
        Ok(())
    }

    pub fn pause(&mut self, id: u64) {
        self.signal(id, libc::SIGSTOP);
        self.node_mut(id).paused = true;
    }

    pub fn resume(&mut self, id: u64) {
        self.signal(id, libc::SIGCONT);
        self.node_mut(id).paused = false;
    }

    pub fn set_link(&self, from: u64, to: u64, state: LinkState) {
        if let Some(l) = self.links.get(&(from, to)) {
            let _ = l.send(state);
        }
    }

    /// Every link between `a` and the others, both ways, to `state`.
    pub fn set_links_of(&self, a: u64, state: LinkState) {
        for id in self.ids() {
            if id != a {
                self.set_link(a, id, state);
                self.set_link(id, a, state);
            }
        }
    }

    pub fn heal_links(&self) {
        for l in self.links.values() {
            let _ = l.send(LinkState::PASS);
        }
    }

    /// Health of node `id`, if it answers within a second.
    pub async fn health(&self, http: &reqwest::Client, id: u64) -> Option<serde_json::Value> {
        let r =
            http.get(self.node(id).url("/v2/_raftyard/health")).timeout(Duration::from_secs(1)).send().await.ok()?;
        r.json().await.ok()
    }

    /// The leader, as reported by a majority of the nodes that answer.
    pub async fn leader(&self, http: &reqwest::Client) -> Option<u64> {
        let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
        for id in self.ids() {
            if let Some(l) = self.health(http, id).await.and_then(|h| h["leader"].as_u64()) {
                *votes.entry(l).or_default() += 1;
            }
        }
        votes.into_iter().find(|(_, v)| *v > self.nodes.len() / 2).map(|(l, _)| l)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in self.ids() {
            self.kill(id);
        }
    }
}
