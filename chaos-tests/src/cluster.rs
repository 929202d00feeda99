//! A cluster of real `raftyard serve` processes on loopback, every directed peer link through
//! its own fault-injecting proxy (`cluster.dial_via`), and the faults applied to it: kill,
//! SIGSTOP/SIGCONT, graceful restart, link modes, and full disks (each node's data directory
//! on its own size-limited tmpfs, filled up on demand).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::watch;

use crate::proxy::{self, LinkState, Mode};

/// What the `gc` fault collects: links (blobs uploaded without a manifest) older than this.
pub const GC_GRACE: Duration = Duration::from_secs(2);

pub struct Node {
    pub id: u64,
    pub registry: String,
    pub peer: String,
    data: PathBuf,
    /// The data directory is a tmpfs mounted by the cluster.
    mounted: bool,
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

/// A `raftyard relay` in front of the nodes: every node's agent dials it, and its shared
/// endpoint spreads visitors over them.
pub struct Relay {
    /// The shared public endpoint (`registry`).
    pub shared: String,
    control: String,
    ca: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub relay: Option<Relay>,
    /// (from, to) → that link's proxy state.
    links: BTreeMap<(u64, u64), watch::Sender<LinkState>>,
    bin: PathBuf,
    broken: Option<(u64, String)>,
    /// The backup node's id, if there is one.
    pub backup: Option<u64>,
    /// A node whose links are always delayed, and by how much.
    distant: Option<(u64, Duration)>,
    /// Nodes that exited by themselves and were started again, with their last log lines.
    pub crashes: Vec<(u64, String)>,
    /// Nodes that exited during every one of their last [`STARTS`] starts, with why.
    pub unstartable: Vec<(u64, String)>,
    /// `RUST_LOG` of the nodes and the relay.
    log_level: String,
    dir: tempfile::TempDir,
}

/// How every node of a run is set up beyond the cluster's shape.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// `RUST_LOG` of the nodes and the relay (`info`; `info,raftyard_cluster=debug` to see
    /// every repair).
    pub log_level: String,
    /// Lines added to every node's `[raft]` section (`compress_metadata = true`).
    pub raft: Vec<String>,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings { log_level: "info".into(), raft: Vec::new() }
    }
}

/// Starts in a row a node gets before it is recorded as unable to start.
const STARTS: u32 = 5;

/// The name of the file that fills a node's disk.
const FILLER: &str = "chaos-filler";

/// Hands out distinct free loopback addresses: every probe socket stays bound until the
/// whole batch is handed out, so no address comes twice within a cluster.
struct FreeAddrs(Vec<std::net::TcpListener>);

impl FreeAddrs {
    fn new() -> Self {
        FreeAddrs(Vec::new())
    }

    fn next(&mut self) -> Result<SocketAddr> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let a = l.local_addr()?;
        self.0.push(l);
        Ok(a)
    }
}

impl Cluster {
    /// Starts `n` voters. With `broken = Some(id)`, node `id` acknowledges manifests before
    /// they commit, or otherwise as `RAFTYARD_FAULT` says: the suite must catch it.
    ///
    /// `node` sets up every node beyond the cluster's shape (its `RUST_LOG`, extra settings).
    ///
    /// With `disk = Some(bytes)`, each node's data directory is a tmpfs of that size (mounting
    /// needs root), so [`Cluster::fill_disk`] can fill it. With `backup`, node `n + 1` is
    /// started as a backup (its links through proxies too); [`Cluster::add_backup`] adds it.
    pub async fn start(
        bin: &Path,
        n: u64,
        broken: Option<(u64, String)>,
        with_relay: bool,
        disk: Option<u64>,
        backup: bool,
        node: &NodeSettings,
    ) -> Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("raftyard-chaos-").tempdir()?;
        let mut free = FreeAddrs::new();
        let relay = if with_relay { Some(Relay::configure(bin, dir.path(), n, &mut free)?) } else { None };
        let voters: Vec<u64> = (1..=n).collect();
        let backup = backup.then_some(n + 1);
        let ids: Vec<u64> = (1..=n + backup.is_some() as u64).collect();
        let mut addrs = BTreeMap::new();
        for &id in &ids {
            addrs.insert(id, (free.next()?.to_string(), free.next()?.to_string()));
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
            let data = dir.path().join(format!("node{id}"));
            if let Some(size) = disk {
                std::fs::create_dir_all(&data)?;
                let out = Command::new("mount")
                    .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                    .arg(&data)
                    .output()
                    .context("running mount")?;
                anyhow::ensure!(
                    out.status.success(),
                    "the disk fault needs a tmpfs per node, and mount failed (it needs root): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let role = if Some(id) == backup { "role = \"backup\"\n" } else { "" };
            let mut cfg = format!(
                "[node]\nid = {id}\n{role}data_dir = {:?}\n[registry]\nlisten = \"{registry}\"\n\
                 [raft]\nheartbeat_ms = 50\nelection_timeout_min_ms = 300\nelection_timeout_max_ms = 600\n\
                 journal_keep_entries = 3000\njournal_trim_interval_secs = 5\n{}\
                 [cluster]\nlisten = \"{peer}\"\n",
                data,
                node.raft.iter().map(|l| format!("{l}\n")).collect::<String>()
            );
            let dial: Vec<String> = via[&id].iter().map(|(a, p)| format!("\"{a}\" = \"{p}\"")).collect();
            cfg.push_str(&format!("dial_via = {{ {} }}\n", dial.join(", ")));
            for &m in voters.iter().filter(|_| Some(id) != backup) {
                cfg.push_str(&format!(
                    "[[cluster.members]]\nid = {m}\npeer = \"{}\"\nregistry = \"{}\"\n",
                    addrs[&m].1, addrs[&m].0
                ));
            }
            if let Some(r) = relay.as_ref().filter(|_| Some(id) != backup) {
                cfg.push_str(&r.link(id));
                // the suite's clients are anonymous: run open behind the relay, on purpose
                cfg.push_str("[auth]\nmode = \"none\"\n");
            }
            let config = dir.path().join(format!("node{id}.toml"));
            std::fs::write(&config, cfg)?;
            nodes.push(Node {
                id,
                registry,
                peer,
                data,
                mounted: disk.is_some(),
                config,
                log: dir.path().join(format!("node{id}.log")),
                child: None,
                paused: false,
            });
        }
        drop(free);
        let mut c = Cluster {
            nodes,
            relay,
            links,
            bin: bin.to_path_buf(),
            broken,
            backup,
            distant: None,
            crashes: Vec::new(),
            unstartable: Vec::new(),
            log_level: node.log_level.clone(),
            dir,
        };
        c.start_relay().await?;
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

    /// The voters.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).filter(|&id| Some(id) != self.backup).collect()
    }

    /// The voters and the backup.
    pub fn all_ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Starts a garbage collection through node `id` (`raftyard gc --grace <grace>`) in the
    /// background: it may fail (the node is down, cut off or paused), which is no violation; it
    /// is given up on after 30 s.
    pub fn collect(&self, id: u64, grace: Duration) {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(["gc", "--json", "--node", &self.node(id).peer, "--grace", &grace.as_secs().to_string()]);
        cmd.kill_on_drop(true).stdin(Stdio::null());
        tokio::spawn(async move {
            match tokio::time::timeout(Duration::from_secs(30), cmd.output()).await {
                Ok(Ok(out)) if out.status.success() => {
                    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                    eprintln!(
                        "        collection through node {id}: {} links, {} blobs removed",
                        r["links_removed"], r["blobs_removed"]
                    );
                }
                Ok(Ok(out)) => eprintln!(
                    "        collection through node {id} failed: {}",
                    String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("")
                ),
                Ok(Err(e)) => eprintln!("        collection through node {id}: {e}"),
                Err(_) => eprintln!("        collection through node {id} given up after 30 s"),
            }
        });
    }

    /// A collection through node `id` with the load stopped, waited for: its report.
    pub async fn collect_now(&self, id: u64, grace: Duration, dry_run: bool) -> Result<serde_json::Value> {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(["gc", "--json", "--node", &self.node(id).peer, "--grace", &grace.as_secs().to_string()]);
        if dry_run {
            cmd.arg("--dry-run");
        }
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.kill_on_drop(true).output()).await??;
        anyhow::ensure!(out.status.success(), "raftyard gc: {}", String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Adds the backup node (`raftyard cluster add-backup` through node 1).
    pub async fn add_backup(&self) -> Result<()> {
        let Some(id) = self.backup else { return Ok(()) };
        let n = self.node(id);
        let out = Command::new(&self.bin)
            .args(["cluster", "add-backup", "--node", &self.node(1).peer, "--id", &id.to_string()])
            .args(["--peer", &n.peer, "--registry", &n.registry])
            .output()?;
        anyhow::ensure!(out.status.success(), "cluster add-backup: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    fn spawn(&mut self, id: u64) -> Result<()> {
        let broken = self.broken.as_ref().filter(|b| b.0 == id).map(|b| b.1.clone());
        let bin = self.bin.clone();
        let log_level = self.log_level.clone();
        let n = self.node_mut(id);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&n.log)?;
        let mut cmd = Command::new(&bin);
        cmd.args(["serve", "--config"]).arg(&n.config).env("RUST_LOG", &log_level).stdout(Stdio::null()).stderr(log);
        if let Some(how) = broken {
            cmd.env("RAFTYARD_FAULT", how);
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

    /// Fills node `id`'s disk: a file grows until the filesystem answers ENOSPC.
    pub fn fill_disk(&self, id: u64) -> Result<()> {
        use std::io::Write;
        let n = self.node(id);
        anyhow::ensure!(n.mounted, "the disk fault needs the cluster started with small disks");
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(n.data.join(FILLER))?;
        let chunk = vec![0u8; 1 << 20];
        loop {
            match f.write(&chunk) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Frees what [`Cluster::fill_disk`] took.
    pub fn free_disk(&self, id: u64) {
        let _ = std::fs::remove_file(self.node(id).data.join(FILLER));
    }

    /// Starts a killed node on its data; a node that exited by itself is recorded in
    /// `crashes` and started again, as a supervisor would: up to [`STARTS`] times a second
    /// apart while it exits during its start. A node that never starts is recorded in
    /// `unstartable` (a violation by name: the run goes on to its verdict) and tried again at
    /// the next heal.
    pub async fn start_again(&mut self, id: u64) -> Result<()> {
        for attempt in 1..=STARTS {
            let exited = match self.node_mut(id).child.as_mut() {
                Some(c) => c.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                let why = self.last_error(id);
                eprintln!("node {id} exited by itself ({status}); starting it again: {why}");
                self.crashes.push((id, format!("{status}: {why}")));
                self.node_mut(id).child = None;
            }
            if self.node(id).running() {
                return Ok(());
            }
            self.spawn(id)?;
            match self.wait_serving(id, Duration::from_secs(30)).await {
                Ok(()) => {
                    self.unstartable.retain(|(n, _)| *n != id);
                    return Ok(());
                }
                Err(e) if attempt == STARTS => {
                    eprintln!("node {id} did not start {STARTS} times in a row: {e:#}");
                    let why = self.last_error(id);
                    self.unstartable.retain(|(n, _)| *n != id);
                    self.unstartable.push((id, why));
                }
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
        Ok(())
    }

    /// Keeps the run's directory (node logs, and the data of nodes not on a tmpfs) after the
    /// run; its path.
    pub fn keep_dir(&mut self) -> PathBuf {
        self.dir.disable_cleanup(true);
        self.dir.path().to_path_buf()
    }

    /// The last `Error:` line of a node's log (or its last line).
    fn last_error(&self, id: u64) -> String {
        let log = std::fs::read_to_string(&self.node(id).log).unwrap_or_default();
        log.lines().rev().find(|l| l.starts_with("Error: ")).or(log.lines().last()).unwrap_or("").to_string()
    }

    /// Starts the relay if there is one and it is not running; returns once it accepts.
    pub async fn start_relay(&mut self) -> Result<()> {
        let bin = self.bin.clone();
        let Some(r) = self.relay.as_mut().filter(|r| r.child.is_none()) else { return Ok(()) };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&r.log)?;
        let child = Command::new(&bin)
            .args(["relay", "--config"])
            .arg(&r.config)
            .env("RUST_LOG", &self.log_level)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        r.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(&r.shared).await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "the relay did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// `kill -9` of the relay.
    pub fn kill_relay(&mut self) {
        if let Some(mut c) = self.relay.as_mut().and_then(|r| r.child.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
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
        for id in self.all_ids() {
            if id != a {
                self.set_link(a, id, state);
                self.set_link(id, a, state);
            }
        }
    }

    /// Every link passes again, but those of the distant node (see [`Cluster::set_distant`]).
    pub fn heal_links(&self) {
        for l in self.links.values() {
            let _ = l.send(LinkState::PASS);
        }
        if let Some((id, delay)) = self.distant {
            self.set_links_of(id, LinkState { forward: Mode::Delay(delay), backward: Mode::Delay(delay) });
        }
    }

    /// Node `id`'s peer links are delayed by `delay` each way for the whole run (a member far
    /// away), faults' healing included.
    pub fn set_distant(&mut self, id: u64, delay: Duration) {
        self.distant = Some((id, delay));
        self.heal_links();
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
        votes.into_iter().find(|(_, v)| *v > self.ids().len() / 2).map(|(l, _)| l)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in self.all_ids() {
            self.kill(id);
        }
        self.kill_relay();
        for n in &self.nodes {
            if n.mounted {
                let _ = Command::new("umount").arg(&n.data).status();
            }
        }
    }
}

impl Relay {
    /// Certificates (`raftyard certs self-signed`), a token per node and `relay.toml`.
    fn configure(bin: &Path, dir: &Path, nodes: u64, free: &mut FreeAddrs) -> Result<Relay> {
        let out = Command::new(bin)
            .args(["certs", "self-signed", "--host", "127.0.0.1", "--out"])
            .arg(dir.join("relay-tls"))
            .output()?;
        anyhow::ensure!(out.status.success(), "raftyard certs: {}", String::from_utf8_lossy(&out.stderr));
        let (control, dashboard, shared) = (free.next()?, free.next()?, free.next()?);
        let mut cfg = format!(
            "[relay]\nlisten = \"{control}\"\ndashboard = \"{dashboard}\"\nopen_timeout_ms = 1000\n\
             tls = {{ cert = {:?}, key = {:?} }}\n[[service]]\nname = \"registry\"\nbind = \"{shared}\"\n",
            dir.join("relay-tls/cert.pem"),
            dir.join("relay-tls/key.pem")
        );
        for id in 1..=nodes {
            cfg.push_str(&format!(
                "[[service]]\nname = \"registry-{id}\"\nbind = \"{}\"\n[[agent]]\nname = \"node{id}\"\ntoken = \"{}\"\n",
                free.next()?,
                Self::token(id)
            ));
        }
        let config = dir.join("relay.toml");
        std::fs::write(&config, cfg)?;
        Ok(Relay {
            shared: shared.to_string(),
            control: control.to_string(),
            ca: dir.join("relay-tls/ca.pem"),
            config,
            log: dir.join("relay.log"),
            child: None,
        })
    }

    fn token(id: u64) -> String {
        format!("chaos-token-of-node{id}-0123456789")
    }

    /// Node `id`'s `[[tunnel.relay]]` section.
    fn link(&self, id: u64) -> String {
        format!(
            "[[tunnel.relay]]\naddress = \"{}\"\nca = {:?}\ntoken = \"{}\"\n\
             heartbeat_interval_secs = 1\nheartbeat_timeout_secs = 3\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\n",
            self.control,
            self.ca,
            Self::token(id)
        )
    }
}
