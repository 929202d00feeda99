//! `raftyard-auth-bench`: what authentication costs, side by side in one run.
//!
//! Four registries on loopback, each holding the same small image (`bench/app:v1`: a config
//! blob, a 4 KiB layer, a manifest):
//!
//! * `raftyard open` — no `[auth]`;
//! * `raftyard basic` — `mode = "basic"`, a user of the cluster (argon2id) with a grant on
//!   `bench/**`, HTTP Basic on every request;
//! * `raftyard token` — `mode = "token"`, the same user; the client fetches one bearer token
//!   from `/auth/token` and sends it on every request (as docker does);
//! * `docker-registry htpasswd` — CNCF Distribution with `auth: htpasswd` (bcrypt, the cost
//!   `htpasswd -B` uses), HTTP Basic on every request.
//!
//! Each repetition runs, against every registry in turn (the order rotates from one
//! repetition to the next), `--requests` sequential manifest GETs by tag and as many GETs of
//! the 4 KiB layer, over one keep-alive connection, and records p50 and p99 of each. The table
//! gives the median over repetitions and the ratios that matter: open/auth latency for raftyard
//! (≥ 0.9 means auth costs at most about 10 %), and docker-registry htpasswd / raftyard basic.
//!
//! ```text
//! cargo build --release -p raftyard -p raftyard-bench
//! target/release/raftyard-auth-bench --raftyard target/release/raftyard
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use serde_json::json;

use crate::client::sha256_digest;
use crate::report::{median, percentile};
use crate::server::{free_ports, Server};

#[derive(clap::Parser, Debug)]
#[command(
    name = "raftyard-auth-bench",
    about = "What authentication costs: raftyard open, basic and token, and docker-registry with htpasswd"
)]
pub struct Args {
    /// The raftyard binary.
    #[arg(long, default_value = "target/release/raftyard")]
    pub raftyard: PathBuf,
    /// The docker-registry binary (CNCF Distribution 2.8).
    #[arg(long, default_value = "/usr/bin/docker-registry")]
    pub docker_registry: PathBuf,
    /// Repetitions (medians are taken over them).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Sequential requests per workload, registry and repetition.
    #[arg(long, default_value_t = 1000)]
    pub requests: usize,
    #[command(flatten)]
    pub run: crate::server::RunOptions,
}

const USER: &str = "bench";
const PASSWORD: &str = "bench-password-1";
pub(crate) const REPO: &str = "bench/app";
/// bcrypt cost of `htpasswd -B` without `-C`.
const HTPASSWD_COST: u32 = 5;

struct Subject {
    label: &'static str,
    _server: Server,
    base: String,
    client: reqwest::Client,
    layer: String,
    /// Per repetition: p50 and p99 (ms) of manifest GETs and of blob GETs.
    manifest: Vec<(f64, f64)>,
    blob: Vec<(f64, f64)>,
}

pub(crate) fn client(auth: Option<String>) -> Result<reqwest::Client> {
    let mut h = HeaderMap::new();
    if let Some(a) = auth {
        h.insert(AUTHORIZATION, HeaderValue::from_str(&a)?);
    }
    Ok(reqwest::Client::builder()
        .default_headers(h)
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(30))
        .build()?)
}

fn basic() -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}")))
}

/// Waits until `GET /v2/` answers at all (200, or 401 with auth on).
async fn wait_answering(base: &str, timeout: Duration) -> Result<()> {
    let c = reqwest::Client::new();
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = c.get(format!("{base}/v2/")).send().await {
            if r.status() == 200 || r.status() == 401 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{base} did not answer within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cli(bin: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(bin).args(args).output().with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!("raftyard {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A one-node raftyard in `dir` whose config ends with `extra` (TOML sections), once it
/// answers: the server, its registry's base URL and its peer address.
pub(crate) async fn one_node(bin: &Path, dir: &Path, label: &str, extra: &str) -> Result<(Server, String, String)> {
    std::fs::create_dir_all(dir)?;
    let ports = free_ports(2)?;
    let (reg, peer) = (format!("127.0.0.1:{}", ports[0]), format!("127.0.0.1:{}", ports[1]));
    let cfg = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[node]\ndata_dir = {:?}\n[registry]\nlisten = \"{reg}\"\n[cluster]\nlisten = \"{peer}\"\n{extra}",
            dir.join("data")
        ),
    )?;
    let server = Server::start_raftyard_node(bin, label.to_string(), &cfg, dir, ports[0])?;
    let base = format!("http://{reg}");
    wait_answering(&base, Duration::from_secs(30)).await?;
    Ok((server, base, peer))
}

/// A one-node raftyard with `[auth] mode`, the bench user and its grant.
async fn raftyard_with(bin: &Path, dir: &Path, mode: &str) -> Result<(Server, String)> {
    let auth = format!("[auth]\nmode = \"{mode}\"\n");
    let (server, base, peer) = one_node(bin, dir, &format!("raftyard {mode}"), &auth).await?;
    let pw = dir.join("password");
    std::fs::write(&pw, format!("{PASSWORD}\n"))?;
    let pw = pw.to_string_lossy().into_owned();
    cli(bin, &["user", "add", USER, "--password-file", &pw, "--node", &peer])?;
    cli(bin, &["access", "grant", "--user", USER, "--repos", "bench/**", "--actions", "pull,push", "--node", &peer])?;
    Ok((server, base))
}

/// Pushes the image; returns the layer's digest.
pub(crate) async fn seed(c: &reqwest::Client, base: &str) -> Result<String> {
    let config = Bytes::from_static(b"{\"architecture\":\"amd64\",\"os\":\"linux\"}");
    let layer = Bytes::from((0..4096u32).map(|i| (i * 31 % 251) as u8).collect::<Vec<u8>>());
    for blob in [&config, &layer] {
        let d = sha256_digest(blob);
        let r = c.post(format!("{base}/v2/{REPO}/blobs/uploads/")).send().await?;
        if r.status() != 202 {
            bail!("starting an upload at {base}: {}", r.status());
        }
        let loc = r.headers().get("location").and_then(|v| v.to_str().ok()).context("no Location")?.to_string();
        let loc = if loc.starts_with("http") { loc } else { format!("{base}{loc}") };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let r = c.put(format!("{loc}{sep}digest={d}")).body(blob.clone()).send().await?;
        if r.status() != 201 {
            bail!("seeding a blob at {base}: {} {}", r.status(), r.text().await.unwrap_or_default());
        }
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256_digest(&layer), "size": layer.len()}],
    });
    let r = c
        .put(format!("{base}/v2/{REPO}/manifests/v1"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(serde_json::to_vec(&manifest)?)
        .send()
        .await?;
    if r.status() != 201 {
        bail!("seeding the manifest at {base}: {}", r.status());
    }
    Ok(sha256_digest(&layer))
}

/// p50 and p99 in ms of `n` sequential GETs of `url` (bodies read and checked for status 200).
pub(crate) async fn timed_gets(c: &reqwest::Client, url: &str, accept: &str, n: usize) -> Result<(f64, f64)> {
    let mut ms = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = c.get(url).header("accept", accept).send().await?;
        if r.status() != 200 {
            bail!("GET {url}: {}", r.status());
        }
        r.bytes().await?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((percentile(&ms, 50.0), percentile(&ms, 99.0)))
}

pub fn run(args: &Args) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(run_async(args))
}

async fn run_async(args: &Args) -> Result<()> {
    if !args.docker_registry.exists() {
        bail!(
            "{} not found: apt-get install -y docker-registry, or --docker-registry PATH",
            args.docker_registry.display()
        );
    }
    let run_dir = args.run.run_dir()?;
    let dir = &run_dir.path;
    let mut subjects = Vec::new();

    let open = Server::start_raftyard(&args.raftyard, &dir.join("open").tap_mkdir()?)?;
    let open_base = open.base.as_str().trim_end_matches('/').to_string();
    wait_answering(&open_base, Duration::from_secs(30)).await?;
    subjects.push(("raftyard open", open, open_base, client(None)?));

    let (s, base) = raftyard_with(&args.raftyard, &dir.join("basic"), "basic").await?;
    subjects.push(("raftyard basic", s, base, client(Some(basic()))?));

    let (s, base) = raftyard_with(&args.raftyard, &dir.join("token"), "token").await?;
    let v: serde_json::Value = client(Some(basic()))?
        .get(format!("{base}/auth/token?service=raftyard&scope=repository:{REPO}:pull,push"))
        .send()
        .await?
        .json()
        .await?;
    let token = v["token"].as_str().context("no token from /auth/token")?.to_string();
    subjects.push(("raftyard token", s, base, client(Some(format!("Bearer {token}")))?));

    let dr_dir = dir.join("docker-registry").tap_mkdir()?;
    let htpasswd = dr_dir.join("htpasswd");
    std::fs::write(&htpasswd, format!("{USER}:{}\n", bcrypt::hash(PASSWORD, HTPASSWD_COST)?))?;
    let dr = Server::start_docker_registry_htpasswd(&args.docker_registry, &dr_dir, &htpasswd)?;
    let dr_base = dr.base.as_str().trim_end_matches('/').to_string();
    wait_answering(&dr_base, Duration::from_secs(30)).await?;
    subjects.push(("docker-registry htpasswd", dr, dr_base, client(Some(basic()))?));

    let mut seeded = Vec::new();
    for (label, server, base, c) in subjects {
        let layer = seed(&c, &base).await.with_context(|| format!("seeding {label}"))?;
        // warm-up, untimed
        timed_gets(&c, &format!("{base}/v2/{REPO}/manifests/v1"), "application/vnd.oci.image.manifest.v1+json", 50)
            .await?;
        seeded.push(Subject { label, _server: server, base, client: c, layer, manifest: vec![], blob: vec![] });
    }
    let n = seeded.len();
    for rep in 0..args.reps {
        for k in 0..n {
            let s = &mut seeded[(rep + k) % n];
            let m = timed_gets(
                &s.client,
                &format!("{}/v2/{REPO}/manifests/v1", s.base),
                "application/vnd.oci.image.manifest.v1+json",
                args.requests,
            )
            .await
            .with_context(|| format!("manifest GETs on {}", s.label))?;
            let b = timed_gets(&s.client, &format!("{}/v2/{REPO}/blobs/{}", s.base, s.layer), "*/*", args.requests)
                .await
                .with_context(|| format!("blob GETs on {}", s.label))?;
            s.manifest.push(m);
            s.blob.push(b);
        }
        eprintln!("repetition {}/{} done", rep + 1, args.reps);
    }

    let med = |v: &[(f64, f64)], p99: bool| {
        median(&v.iter().map(|x| if p99 { x.1 } else { x.0 }).collect::<Vec<_>>()).unwrap_or(0.0)
    };
    println!("\n{} sequential requests per workload, {} repetitions, medians (ms)\n", args.requests, args.reps);
    println!("| registry | manifest GET p50 | manifest GET p99 | 4 KiB blob GET p50 | 4 KiB blob GET p99 |");
    println!("|---|---|---|---|---|");
    let mut rows = Vec::new();
    for s in &seeded {
        let r = [med(&s.manifest, false), med(&s.manifest, true), med(&s.blob, false), med(&s.blob, true)];
        println!("| {} | {:.3} | {:.3} | {:.3} | {:.3} |", s.label, r[0], r[1], r[2], r[3]);
        rows.push((s.label, r));
    }
    let row = |l: &str| rows.iter().find(|(x, _)| *x == l).map(|(_, r)| *r).expect("every subject has a row");
    let (open, basic_r, token_r, dr) =
        (row("raftyard open"), row("raftyard basic"), row("raftyard token"), row("docker-registry htpasswd"));
    println!("\nratios (above 1: the second is faster; target for auth on: ≥ 0.9 of open)\n");
    println!("| ratio | manifest GET p50 | manifest GET p99 | blob GET p50 | blob GET p99 |");
    println!("|---|---|---|---|---|");
    let ratio = |a: [f64; 4], b: [f64; 4]| -> [f64; 4] { [a[0] / b[0], a[1] / b[1], a[2] / b[2], a[3] / b[3]] };
    let lines = [
        ("raftyard basic vs open (open / basic)", ratio(open, basic_r)),
        ("raftyard token vs open (open / token)", ratio(open, token_r)),
        ("raftyard basic vs docker-registry htpasswd", ratio(dr, basic_r)),
        ("raftyard token vs docker-registry htpasswd", ratio(dr, token_r)),
    ];
    for (l, r) in &lines {
        println!("| {l} | {:.2} | {:.2} | {:.2} | {:.2} |", r[0], r[1], r[2], r[3]);
    }
    if let Some(p) = &args.run.json {
        let out = json!({
            "requests": args.requests, "reps": args.reps,
            "rows": rows.iter().map(|(l, r)| json!({"registry": l, "manifest_p50_ms": r[0], "manifest_p99_ms": r[1],
                                                      "blob_p50_ms": r[2], "blob_p99_ms": r[3]})).collect::<Vec<_>>(),
            "ratios": lines.iter().map(|(l, r)| json!({"ratio": l, "values": r})).collect::<Vec<_>>(),
        });
        std::fs::write(p, serde_json::to_vec_pretty(&out)?)?;
    }
    Ok(())
}

pub(crate) trait MkDir {
    fn tap_mkdir(self) -> Result<PathBuf>;
}

impl MkDir for PathBuf {
    fn tap_mkdir(self) -> Result<PathBuf> {
        std::fs::create_dir_all(&self).with_context(|| format!("creating {}", self.display()))?;
        Ok(self)
    }
}
