//! Test support: runs the real `raftyard` binary on a free loopback port and talks to it with
//! an HTTP client.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::json;
use sha2::Digest as _;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Extra settings of a cluster member's config file.
#[derive(Default)]
pub struct Extra<'a> {
    /// Wait to be added instead of initialising.
    pub join: bool,
    /// Lines for the `[raft]` section.
    pub raft: &'a str,
    /// TOML right after the `[cluster]` keys: more of its keys (`dial_via`), then tables
    /// (`[cluster.tls]`, `[tunnel]`, …).
    pub cluster: &'a str,
    /// Lines for the `[node]` section (e.g. `role = "backup"`).
    pub node: &'a str,
    /// Environment of the process (e.g. `RAFTYARD_FAULT`).
    pub env: &'a [(&'a str, &'a str)],
}

/// A running `raftyard serve` process. Killed (SIGKILL) on drop.
pub struct Node {
    pub child: Option<Child>,
    pub addr: String,
    /// Peer port address; port 0 lets the node pick one.
    pub peer: String,
    pub data: PathBuf,
    pub log: PathBuf,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

/// Starts `cmd` (logging to `log`) and waits until `addr` accepts connections; panics with the
/// log if the process exits first or `timeout` passes.
fn start_listening(cmd: &mut Command, log: &Path, addr: &str, timeout: Duration) -> Child {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut child = cmd.env("RUST_LOG", "info").stdout(Stdio::null()).stderr(out).spawn().expect("spawn raftyard");
    let deadline = Instant::now() + timeout;
    let log = || std::fs::read_to_string(log).unwrap_or_default();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{cmd:?} exited with {st}; log:\n{}", log());
        }
        if std::net::TcpStream::connect(addr).is_ok() {
            return child;
        }
        assert!(Instant::now() < deadline, "{cmd:?} did not start listening on {addr}; log:\n{}", log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

// The testkit's own file, so that both kinds of test pick ports one way.
#[path = "../../../testkit/src/ports.rs"]
mod ports;
pub use ports::free_port;

impl Node {
    pub fn start(data: &Path) -> Node {
        Self::start_with(data, &[])
    }

    /// A registry endpoint this test does not run (a relay's public port): no process.
    pub fn remote(addr: &str) -> Node {
        Node {
            child: None,
            addr: addr.to_string(),
            peer: String::new(),
            data: PathBuf::new(),
            log: PathBuf::new(),
            extra: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn start_with(data: &Path, extra: &[&str]) -> Node {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut n = Node {
            child: None,
            addr,
            peer: "127.0.0.1:0".into(),
            data: data.to_path_buf(),
            log: data.with_extension("log"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
        };
        n.spawn();
        n
    }

    /// Starts (again) the process on the same address and data directory, without the
    /// environment it was given (a deliberate fault, say).
    pub fn respawn_plain(&mut self) {
        self.env.clear();
        self.spawn();
    }

    /// Starts (again) the process on the same address and data directory.
    pub fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_raftyard"));
        cmd.args(["serve", "--listen", &self.addr, "--peer-listen", &self.peer, "--data-dir"])
            .arg(&self.data)
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        self.child = Some(start_listening(&mut cmd, &self.log, &self.addr, Duration::from_secs(30)));
    }

    /// A member of a cluster: fixed registry and peer addresses, a config file with the
    /// initial members (or `join = true`).
    pub fn start_member(
        dir: &Path,
        id: u64,
        addr: &str,
        peer: &str,
        members: &[(u64, String, String)],
        join: bool,
    ) -> Node {
        Self::start_member_with(dir, id, addr, peer, members, &Extra { join, ..Extra::default() })
    }

    /// [`Node::start_member`] with extra settings.
    pub fn start_member_with(
        dir: &Path,
        id: u64,
        addr: &str,
        peer: &str,
        members: &[(u64, String, String)],
        extra: &Extra,
    ) -> Node {
        let Extra { join, raft: raft_extra, cluster: cluster_extra, node: node_extra, env } = extra;
        let cfg = dir.join(format!("node{id}.toml"));
        // quick elections unless the test sets its own timeouts
        let elections = if raft_extra.contains("election_timeout") {
            ""
        } else {
            "election_timeout_min_ms = 300\nelection_timeout_max_ms = 600\n"
        };
        let mut text = format!("[node]\nid = {id}\n{node_extra}\n[raft]\nheartbeat_ms = 50\n{elections}{raft_extra}\n[cluster]\njoin = {join}\n");
        // the extra TOML first: its leading keys belong to [cluster]; tables after it are fine
        text.push_str(cluster_extra);
        for (mid, mpeer, mreg) in members {
            text.push_str(&format!("[[cluster.members]]\nid = {mid}\npeer = \"{mpeer}\"\nregistry = \"{mreg}\"\n"));
        }
        // a node behind a relay must say how it authenticates; tests of auth say it themselves
        if text.contains("[[tunnel.relay]]") && !text.contains("[auth]") {
            text.push_str("[auth]\nmode = \"none\"\n");
        }
        std::fs::write(&cfg, text).unwrap();
        let data = dir.join(format!("node{id}"));
        let mut n = Node {
            child: None,
            addr: addr.to_string(),
            peer: peer.to_string(),
            data: data.clone(),
            log: data.with_extension("log"),
            extra: vec!["--config".into(), cfg.to_string_lossy().into_owned()],
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        n.spawn();
        n
    }

    /// Waits until this node has applied at least `target`.
    pub async fn wait_applied(&self, target: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let applied = self.health().await.and_then(|h| h["applied"].as_u64()).unwrap_or(0);
            if applied >= target {
                return;
            }
            assert!(Instant::now() < deadline, "node {} stuck at applied index {applied} < {target}", self.addr);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// This node's `/v2/_raftyard/health` answer, if it answers.
    pub async fn health(&self) -> Option<serde_json::Value> {
        let r = client().get(self.url("/v2/_raftyard/health")).timeout(Duration::from_secs(2)).send().await.ok()?;
        r.json().await.ok()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap()
    }

    /// Waits up to `timeout` for the process to exit by itself; its exit status, or `None`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let c = self.child.as_mut().expect("running");
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET /v2/_raftyard/ready`: the status and the reason given, if it answers.
    pub async fn ready(&self) -> Option<(u16, String)> {
        let r = client().get(self.url("/v2/_raftyard/ready")).timeout(Duration::from_secs(5)).send().await.ok()?;
        let status = r.status().as_u16();
        let v: serde_json::Value = r.json().await.ok()?;
        Some((status, v["reason"].as_str().unwrap_or_default().to_string()))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

pub fn sha512(b: &[u8]) -> String {
    format!("sha512:{}", hex::encode(sha2::Sha512::digest(b)))
}

/// Absolute URL for a `Location` header that may be relative.
pub fn abs(node: &Node, loc: &str) -> String {
    if loc.starts_with("http") {
        loc.to_string()
    } else {
        node.url(loc)
    }
}

/// Pushes a blob with POST + PUT; returns its digest.
pub async fn push_blob(c: &reqwest::Client, n: &Node, repo: &str, data: &[u8]) -> String {
    let d = sha256(data);
    let r = c.post(n.url(&format!("/v2/{repo}/blobs/uploads/"))).send().await.unwrap();
    assert_eq!(r.status(), 202, "POST upload");
    let loc = abs(n, r.headers()["location"].to_str().unwrap());
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{loc}{sep}digest={d}"))
        .header("content-type", "application/octet-stream")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "PUT upload: {}", r.text().await.unwrap());
    d
}

/// An OCI image manifest for the given config and layers (digest, size).
pub fn image_manifest(config: (&str, usize), layers: &[(&str, usize)], extra: serde_json::Value) -> Vec<u8> {
    let mut m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1},
        "layers": layers.iter().map(|(d, s)| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": s})).collect::<Vec<_>>(),
    });
    if let serde_json::Value::Object(e) = extra {
        for (k, v) in e {
            m[k] = v;
        }
    }
    serde_json::to_vec(&m).unwrap()
}

pub async fn put_manifest(
    c: &reqwest::Client,
    n: &Node,
    repo: &str,
    reference: &str,
    body: &[u8],
    ct: &str,
) -> reqwest::Response {
    c.put(n.url(&format!("/v2/{repo}/manifests/{reference}")))
        .header("content-type", ct)
        .body(body.to_vec())
        .send()
        .await
        .unwrap()
}

/// The `errors[0].code` of an error response.
pub async fn error_code(r: reqwest::Response) -> String {
    let v: serde_json::Value = r.json().await.expect("JSON error body");
    v["errors"][0]["code"].as_str().expect("code").to_string()
}

/// Pushes config + one layer + manifest under `tag`; returns the manifest digest.
pub async fn push_image(c: &reqwest::Client, n: &Node, repo: &str, tag: &str, seed: &[u8]) -> String {
    let config = [b"{\"seed\":\"".as_slice(), seed, b"\"}"].concat();
    let layer = [b"layer-".as_slice(), seed].concat();
    let cd = push_blob(c, n, repo, &config).await;
    let ld = push_blob(c, n, repo, &layer).await;
    let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())], serde_json::json!({}));
    let r = put_manifest(c, n, repo, tag, &m, OCI_MANIFEST).await;
    assert_eq!(r.status(), 201, "manifest PUT: {}", r.text().await.unwrap());
    sha256(&m)
}

/// Runs the `raftyard` command; panics with its stderr if it fails, returns its stdout.
pub fn cli(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_raftyard")).args(args).output().unwrap();
    assert!(out.status.success(), "raftyard {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the `raftyard` command, which must fail; returns its stderr.
pub fn cli_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_raftyard")).args(args).output().unwrap();
    assert!(!out.status.success(), "raftyard {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Pulls `repo:tag`, checks its digest, and every blob it names, digest for digest.
pub async fn pull_image(c: &reqwest::Client, n: &Node, repo: &str, tag: &str, digest: &str) {
    let r = c.get(n.url(&format!("/v2/{repo}/manifests/{tag}"))).header("accept", OCI_MANIFEST).send().await.unwrap();
    assert_eq!(r.status(), 200, "manifest {repo}:{tag} on {}", n.addr);
    assert_eq!(r.headers()["docker-content-digest"], digest);
    let m: serde_json::Value = r.json().await.unwrap();
    let mut blobs = vec![m["config"]["digest"].as_str().unwrap().to_string()];
    blobs.extend(m["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()));
    for b in blobs {
        let r = c.get(n.url(&format!("/v2/{repo}/blobs/{b}"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "blob {b} on {}", n.addr);
        assert_eq!(sha256(&r.bytes().await.unwrap()), b);
    }
}

/// The `[cluster.tls]` section of node `id`, with the files of `certs/n<id>/` (from
/// `raftyard certs cluster --node n1 …`).
pub fn peer_tls_section(certs: &Path, id: u64) -> String {
    let d = certs.join(format!("n{id}"));
    format!(
        "[cluster.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        d.join("ca.pem"),
        d.join("cert.pem"),
        d.join("key.pem")
    )
}

/// A cluster of `raftyard` processes on loopback ports.
pub struct Cluster {
    _dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Members 1..=n on fixed loopback ports, each started with what `extra(id)` gives (the
    /// lowest id last, so that it initialises the cluster once the others listen).
    pub fn start_each<'a>(n: u64, extra: impl Fn(u64) -> Extra<'a>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<(u64, String, String)> = (1..=n)
            .map(|id| (id, format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port())))
            .collect();
        let mut nodes: Vec<Node> = members
            .iter()
            .rev()
            .map(|(id, peer, reg)| Node::start_member_with(dir.path(), *id, reg, peer, &members, &extra(*id)))
            .collect();
        nodes.reverse();
        Cluster { _dir: dir, nodes }
    }

    pub fn start(n: u64) -> Cluster {
        Self::start_with(n, "")
    }

    pub fn start_with(n: u64, raft_extra: &str) -> Cluster {
        Self::start_configured(n, raft_extra, |_| String::new())
    }

    /// Peer ports with mutual TLS, node `id` using `certs/n<id>/` (from `raftyard certs cluster`).
    pub fn start_tls(n: u64, certs: &Path) -> Cluster {
        let certs = certs.to_path_buf();
        Self::start_configured(n, "", move |id| peer_tls_section(&certs, id))
    }

    pub fn start_configured(n: u64, raft_extra: &str, cluster_extra: impl Fn(u64) -> String) -> Cluster {
        let extras: Vec<String> = (1..=n).map(cluster_extra).collect();
        Self::start_each(n, |id| Extra { raft: raft_extra, cluster: &extras[id as usize - 1], ..Extra::default() })
    }

    /// Waits until every running node answers `/v2/_raftyard/ready` with 200 (and so takes the
    /// relay's shared traffic a moment later).
    pub async fn ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            loop {
                let r = n.ready().await;
                if r.as_ref().is_some_and(|(status, _)| *status == 200) {
                    break;
                }
                assert!(Instant::now() < deadline, "node {} not ready: {r:?}", n.addr);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // the agent's gate follows readiness within its check interval
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// Index (0-based) of the node every live node agrees is the leader.
    pub async fn leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let mut seen = Vec::new();
            for n in self.nodes.iter().filter(|n| n.child.is_some()) {
                seen.push(n.health().await.and_then(|h| h["leader"].as_u64()));
            }
            if let Some(Some(l)) = seen.first() {
                if seen.iter().all(|s| *s == Some(*l)) && self.nodes[*l as usize - 1].child.is_some() {
                    return *l as usize - 1;
                }
            }
            if Instant::now() > deadline {
                let logs: Vec<String> =
                    self.nodes.iter().map(|n| std::fs::read_to_string(&n.log).unwrap_or_default()).collect();
                panic!("no agreed leader: {seen:?}\n{}", logs.join("\n-----\n"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Three members behind a relay started in `dir/relay`, each with `extra(id)` before its
/// relay settings; returns once they agree on a leader (its index is returned), every agent
/// is connected and every node is ready.
pub async fn behind_relay(dir: &Path, extra: impl Fn(u64) -> String) -> (RelayProc, Cluster, usize) {
    let relay = RelayProc::start(&dir.join("relay"), 3);
    let cl = Cluster::start_configured(3, "", |id| format!("{}{}", extra(id), relay.link(id)));
    let leader = cl.leader(Duration::from_secs(20)).await;
    relay.wait_agents(3, Duration::from_secs(20)).await;
    cl.ready(Duration::from_secs(20)).await;
    (relay, cl, leader)
}

/// Writes an OCI image layout with an index of two single-layer images; returns the index digest.
pub fn write_layout(dir: &Path, seed: u64) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| -> (String, usize) {
        let d = sha256(b);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), b).unwrap();
        (d, b.len())
    };
    let mut manifests = Vec::new();
    for arch in ["amd64", "arm64"] {
        let mut layer = vec![0u8; rng.gen_range(100_000..3_000_000)];
        rng.fill(&mut layer[..]);
        let (ld, ls) = put(&layer);
        let config = serde_json::to_vec(
            &json!({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": [ld]}}),
        )
        .unwrap();
        let (cd, cs) = put(&config);
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": ls}]
        }))
        .unwrap();
        let (md, ms) = put(&m);
        manifests.push(json!({"mediaType": OCI_MANIFEST, "digest": md, "size": ms, "platform": {"architecture": arch, "os": "linux"}}));
    }
    let index =
        serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})).unwrap();
    let (id, is) = put(&index);
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [{"mediaType": OCI_INDEX, "digest": id, "size": is, "annotations": {"org.opencontainers.image.ref.name": "v1"}}]})).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    id
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is it installed? the README's test command installs it)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// skopeo copies the OCI layout `src` (tag v1, every platform, digests kept) to `dest`
/// (`docker://host:port/repo:tag`) over plain HTTP.
pub fn skopeo_push(src: &Path, dest: &str) {
    // --preserve-digests: skopeo would otherwise compress the uncompressed layers on the way
    run(Command::new("skopeo")
        .args(["copy", "--all", "--preserve-digests", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(dest));
}

/// skopeo copies `from` (`docker://…`, every platform, digests kept) into the OCI layout `into`.
pub fn skopeo_pull(from: &str, into: &Path) {
    run(Command::new("skopeo")
        .args(["copy", "--all", "--preserve-digests", "--src-tls-verify=false", from])
        .arg(format!("oci:{}:v1", into.display())));
}

/// The sha256 digest of the manifest `skopeo inspect --raw` fetches from `reference`
/// (`docker://…`).
pub fn skopeo_manifest_digest(reference: &str) -> String {
    sha256(run(Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false", reference])).as_bytes())
}

/// Where a node with data directory `data` keeps the file of the sha256 blob `digest`.
pub fn blob_path(data: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    data.join("blobs/sha256").join(&hex[..2]).join(hex)
}

pub fn blob_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A `raftyard relay` process on free loopback ports, with a certificate made by
/// `raftyard certs self-signed` and a token per node. Killed (SIGKILL) on drop.
pub struct RelayProc {
    pub child: Option<Child>,
    pub control: String,
    pub dashboard: String,
    /// Public address per service: `registry`, `registry-<id>` (and `peer-<id>`).
    pub services: std::collections::BTreeMap<String, String>,
    pub dir: PathBuf,
    log: PathBuf,
}

impl RelayProc {
    /// A relay for nodes `1..=nodes` in `dir` (which it creates).
    pub fn start(dir: &Path, nodes: u64) -> RelayProc {
        Self::start_with(dir, nodes, false)
    }

    /// With `peers`, also a service `peer-<id>` per node (each node's peer port).
    pub fn start_with(dir: &Path, nodes: u64, peers: bool) -> RelayProc {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new(env!("CARGO_BIN_EXE_raftyard"))
            .args(["certs", "self-signed", "--host", "127.0.0.1", "--out"])
            .arg(dir.join("tls")));
        let port = || format!("127.0.0.1:{}", free_port());
        let (control, dashboard) = (port(), port());
        let mut services = std::collections::BTreeMap::new();
        services.insert("registry".to_string(), port());
        let mut text = format!(
            "[relay]\nlisten = \"{control}\"\ndashboard = \"{dashboard}\"\nopen_timeout_ms = 2000\nhandshake_timeout_ms = 2000\ntls = {{ cert = {:?}, key = {:?} }}\n",
            dir.join("tls/cert.pem"),
            dir.join("tls/key.pem")
        );
        for id in 1..=nodes {
            services.insert(format!("registry-{id}"), port());
            let mut allowed = format!("\"registry\", \"registry-{id}\"");
            if peers {
                services.insert(format!("peer-{id}"), port());
                allowed.push_str(&format!(", \"peer-{id}\""));
            }
            text.push_str(&format!(
                "[[agent]]\nname = \"node{id}\"\ntoken = \"{}\"\nservices = [{allowed}]\n",
                Self::token(id)
            ));
        }
        for (name, bind) in &services {
            text.push_str(&format!("[[service]]\nname = \"{name}\"\nbind = \"{bind}\"\n"));
        }
        std::fs::write(dir.join("relay.toml"), text).unwrap();
        let mut r =
            RelayProc { child: None, control, dashboard, services, dir: dir.to_path_buf(), log: dir.join("relay.log") };
        r.spawn();
        r
    }

    pub fn token(id: u64) -> String {
        format!("test-token-of-node{id}-0123456789")
    }

    /// (Re)starts the process on the same ports.
    pub fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_raftyard"));
        cmd.args(["relay", "--config"]).arg(self.dir.join("relay.toml"));
        self.child = Some(start_listening(&mut cmd, &self.log, &self.dashboard, Duration::from_secs(20)));
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The `[[tunnel.relay]]` section of node `id`: fast heartbeats and reconnects for tests.
    pub fn link(&self, id: u64) -> String {
        format!(
            "[[tunnel.relay]]\naddress = \"{}\"\nca = {:?}\ntoken = \"{}\"\nheartbeat_interval_secs = 1\nheartbeat_timeout_secs = 3\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\n",
            self.control,
            self.dir.join("tls/ca.pem"),
            Self::token(id)
        )
    }

    /// The shared endpoint's address.
    pub fn shared(&self) -> &str {
        &self.services["registry"]
    }

    pub async fn status(&self) -> serde_json::Value {
        client().get(format!("http://{}/api/status", self.dashboard)).send().await.unwrap().json().await.unwrap()
    }

    /// Waits until `n` agents serve the shared service.
    pub async fn wait_agents(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status().await;
            let live = st["services"].as_array().unwrap().iter().find(|s| s["name"] == "registry").unwrap()
                ["live_agents"]
                .as_u64()
                .unwrap();
            if live == n {
                return;
            }
            assert!(Instant::now() < deadline, "{live} agents behind the relay, want {n}: {st:#}\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        self.kill9();
    }
}
