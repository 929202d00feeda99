//! `raftyard-scale-bench`: how the costs of a cluster grow with the registry it holds.
//!
//! A three-node cluster runs on loopback. It is filled through the registry API, in steps, to
//! each of `--sizes` images (one small blob and one manifest each, tagged `t<i % 100>` in
//! repository `scale/r<i / 100>`, so a size of N has N / 100 repositories of 100 tags; pushes
//! go to every node in turn). At each size, through a follower and one request at a time:
//!
//! - **manifest PUT** and **tag GET** latency (median and p99 of `--samples` requests; the
//!   PUTs are new manifests under new tags of one repository, the GETs random filled tags);
//! - **catalog** page times: the first page and one from the middle (`n=100`, `last=`), and
//!   a **tags list** of 100 tags;
//! - **snapshot build**: the last `snapshot built` of the leader's log (copying the state to a
//!   file while applies wait);
//! - **catch-up**: a new node joins (`cluster add-backup`) and the time until it has applied
//!   what the leader had; its `snapshot installed` line gives the install time, and the peak
//!   resident size of the new node (`VmHWM`) and of the leader (sampled) meanwhile. The node is
//!   then removed and stopped, and `raftyard meta-size` reads its metadata part by part (a
//!   node built from a snapshot: state, journal and a short log);
//! - **idle** CPU time of every node over `--idle-secs` (from `/proc`), after the cluster has
//!   been quiet for 5 s; resident size; bytes of `meta/` per image.
//!
//! Each figure is also given as a ratio to the smallest size: latency should stay within 1.2×
//! and idle CPU and memory flat as the registry grows.
//!
//! With `--direct-from SIZE`, sizes from `SIZE` up are reached by a direct fill instead: the
//! cluster is stopped while idle, the same images are applied by each node's own state
//! machine and their blob files written ([`crate::direct`]), and the cluster starts again. The
//! snapshot build of such a size is the one made right after the fill, offline.
//!
//! ```text
//! cargo build --release -p raftyard -p raftyard-bench
//! target/release/raftyard-scale-bench --sizes 10000,100000
//! target/release/raftyard-scale-bench --sizes 10000,100000,1000000 --direct-from 1000000
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::client::{http_client, sha256_digest, RegistryClient};
use crate::cluster::Cluster;
use crate::direct;
use crate::report::{median, percentile};
use crate::server::{dir_bytes, peak_rss_kib, rss_kib};
use crate::workload::RssSampler;

const MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const TAGS_PER_REPO: u64 = 100;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(
    name = "raftyard-scale-bench",
    about = "How a cluster's latency, idle cost, memory and metadata grow with the registry"
)]
pub struct Args {
    /// The raftyard binary.
    #[arg(long, default_value = "target/release/raftyard")]
    pub raftyard: PathBuf,
    /// Registry sizes to measure at, in images, ascending (filled through the API, or
    /// directly from `--direct-from` up).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    pub sizes: Vec<u64>,
    /// Sizes from this one up are reached by a direct fill of the stopped nodes' storage
    /// instead of through the API (the same commands, applied by each node's state machine;
    /// see `direct`), and reported as such.
    #[arg(long)]
    pub direct_from: Option<u64>,
    /// Concurrent pushers while filling.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u64,
    /// Requests per latency figure.
    #[arg(long, default_value_t = 500)]
    pub samples: usize,
    /// Seconds over which idle CPU is measured.
    #[arg(long, default_value_t = 10)]
    pub idle_secs: u64,
    #[command(flatten)]
    pub run: crate::server::RunOptions,
}

pub fn run(args: &Args) -> Result<()> {
    if args.sizes.is_empty() || args.sizes.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--sizes must be ascending");
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run_async(args))
}

fn image(i: u64) -> (String, String, Bytes, String) {
    let blob = Bytes::from(format!("layer-{i}"));
    let digest = sha256_digest(&blob);
    (format!("scale/r{}", i / TAGS_PER_REPO), format!("t{}", i % TAGS_PER_REPO), blob, digest)
}

fn manifest(config: &str, config_len: usize, note: &str) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": MEDIA_TYPE,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_len},
            "layers": [], "annotations": {"scale": note}
        }))
        .expect("json"),
    )
}

/// Pushes images `from..to`, `concurrency` at a time, each to the next node in turn; a push
/// that fails is tried twice more before the fill fails.
async fn fill(clients: &Arc<Vec<RegistryClient>>, from: u64, to: u64, concurrency: u64) -> Result<Duration> {
    let started = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for k in 0..concurrency {
        let (clients, done) = (clients.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = from + k;
            while i < to {
                let client = &clients[(i % clients.len() as u64) as usize];
                let img = filled_image(i);
                let digest = sha256_digest(&img.blob);
                let mut tries = 0;
                loop {
                    let r = async {
                        client.push_blob_single_post(&img.repo, img.blob.clone(), &digest).await?;
                        client.put_manifest(&img.repo, &img.tag, &img.media_type, img.manifest.clone()).await
                    }
                    .await;
                    match r {
                        Ok(_) => break,
                        Err(e) if tries >= 2 => return Err(e.context(format!("pushing image {i}"))),
                        Err(_) => tries += 1,
                    }
                }
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n % 10_000 == 0 {
                    eprintln!("filled {} of {}", from + n, to);
                }
                i += concurrency;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed())
}

/// Milliseconds of each of `n` runs of `op`, one at a time.
async fn timed<F, Fut>(n: usize, mut op: F) -> Result<Vec<f64>>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let t = Instant::now();
        op(k).await?;
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

fn stats(v: &[f64]) -> Value {
    json!({"p50": median(v), "p99": percentile(v, 99.0), "n": v.len()})
}

async fn get_ok(http: &reqwest::Client, url: reqwest::Url) -> Result<()> {
    let resp = http.get(url.clone()).send().await.with_context(|| format!("GET {url}"))?;
    if !resp.status().is_success() {
        bail!("GET {url}: {}", resp.status());
    }
    resp.bytes().await?;
    Ok(())
}

/// CPU time (user + system) of a process, in milliseconds.
fn cpu_ms(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // the command name (field 2) may hold spaces: count from the closing parenthesis
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks * 1000.0 / hz)
}

/// The last line of `log` holding `message`, without colour codes.
fn last_line(log: &Path, message: &str) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().rev().map(strip_ansi).find(|l| l.contains(message))
}

/// The numeric field `key` of a log line.
fn field(line: Option<&str>, key: &str) -> Option<u64> {
    let line = line?;
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Image `i` of a fill, through the API or direct.
fn filled_image(i: u64) -> direct::Image {
    let (repo, tag, blob, digest) = image(i);
    let manifest = manifest(&digest, blob.len(), "fill");
    direct::Image { repo, tag, blob, manifest, media_type: MEDIA_TYPE.into() }
}

/// Stops the idle cluster (followers first, so no new leader appends an entry the others
/// have not applied), fills every node with images `from..to` directly, and starts them again.
async fn fill_directly(cluster: &mut Cluster, from: u64, to: u64) -> Result<(Duration, direct::Filled)> {
    let leadership = cluster.wait_for_leader(Duration::from_secs(30), Duration::from_millis(100)).await?;
    let mut ids = cluster.followers(leadership.leader);
    for &id in &ids {
        cluster.wait_caught_up(id, Duration::from_secs(120)).await?;
    }
    ids.push(leadership.leader);
    for &id in &ids {
        cluster.stop(id)?;
    }
    let started = Instant::now();
    let (mut first, mut filled): (Option<PathBuf>, Option<direct::Filled>) = (None, None);
    let time_ms = raftyard_types::event::now_ms();
    for &id in &ids {
        let data = cluster.data_dir(id)?;
        let f = direct::fill_node(&data, from, to, time_ms, filled_image, first.as_deref()).await?;
        eprintln!(
            "node {id}: applied {} images in {:.1} s, blob files in {:.1} s, snapshot of {} bytes built in {} ms",
            to - from,
            f.apply_s,
            f.blobs_s,
            f.snapshot_bytes,
            f.snapshot_build_ms
        );
        if let Some(prev) = &filled {
            anyhow::ensure!(
                (prev.index, prev.snapshot_bytes) == (f.index, f.snapshot_bytes),
                "node {id} was filled to index {} ({} snapshot bytes), another to {} ({})",
                f.index,
                f.snapshot_bytes,
                prev.index,
                prev.snapshot_bytes
            );
        }
        first.get_or_insert(data);
        filled = Some(f);
    }
    let took = started.elapsed();
    for &id in &ids {
        cluster.restart(id)?;
    }
    cluster.wait_ready(Duration::from_secs(600)).await?;
    // every node serves what was filled: manifests by tag, byte for byte, and their blobs
    let mut rng = rand::rngs::StdRng::seed_from_u64(to);
    for &id in &ids {
        let client = RegistryClient::new(cluster.base(id)?, REQUEST_TIMEOUT, REQUEST_TIMEOUT)?;
        for _ in 0..20 {
            let img = filled_image(rng.gen_range(from..to));
            let got = client.get_manifest(&img.repo, &img.tag, MEDIA_TYPE).await?;
            anyhow::ensure!(got == img.manifest, "node {id} serves other bytes for {}:{}", img.repo, img.tag);
            let len = client.pull_blob(&img.repo, &sha256_digest(&img.blob)).await?;
            anyhow::ensure!(
                len == img.blob.len() as u64,
                "node {id}: blob of {}:{} has {len} bytes",
                img.repo,
                img.tag
            );
        }
    }
    // then until the nodes' start-up work (the repair index's first scan, sled's cache) is done
    let settled = Instant::now();
    loop {
        let pids = cluster.pids();
        let before: Vec<f64> = pids.iter().map(|&p| cpu_ms(p)).collect::<Result<_>>()?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let busy = pids.iter().zip(before).map(|(&p, b)| Ok(cpu_ms(p)? - b)).collect::<Result<Vec<f64>>>()?;
        if busy.iter().all(|&ms| ms < 100.0) || settled.elapsed() > Duration::from_secs(600) {
            eprintln!(
                "settled {:.0} s after the restart (CPU ms over the last 2 s: {busy:?})",
                settled.elapsed().as_secs_f64()
            );
            break;
        }
    }
    Ok((took, filled.context("no node to fill")?))
}

async fn measure(
    args: &Args,
    cluster: &mut Cluster,
    size: u64,
    step: usize,
    bin: &Path,
    offline: Option<&direct::Filled>,
) -> Result<Value> {
    let leadership = cluster.wait_for_leader(Duration::from_secs(30), Duration::from_millis(100)).await?;
    let reader = cluster.followers(leadership.leader)[0];
    let base = cluster.base(reader)?;
    let client = RegistryClient::new(base.clone(), REQUEST_TIMEOUT, REQUEST_TIMEOUT)?;
    let http = http_client(REQUEST_TIMEOUT)?;

    // manifest PUT through the follower: new manifests under new tags of one repository
    let repo = format!("scale/probe{step}");
    let (blob, digest) = (Bytes::from(format!("probe-{step}")), sha256_digest(format!("probe-{step}").as_bytes()));
    client.push_blob_single_post(&repo, blob.clone(), &digest).await?;
    let put = timed(args.samples, |k| {
        let (client, repo, body) = (&client, &repo, manifest(&digest, blob.len(), &format!("{size}-{k}")));
        async move { client.put_manifest(repo, &format!("p{k}"), MEDIA_TYPE, body).await.map(|_| ()) }
    })
    .await?;

    // tag GET through the follower, random filled images
    let mut rng = rand::rngs::StdRng::seed_from_u64(size);
    let picks: Vec<u64> = (0..args.samples).map(|_| rng.gen_range(0..size)).collect();
    let get = timed(args.samples, |k| {
        let (client, (repo, tag, _, _)) = (&client, image(picks[k]));
        async move { client.get_manifest(&repo, &tag, MEDIA_TYPE).await.map(|_| ()) }
    })
    .await?;

    // catalog and tags-list pages
    let pages = (args.samples / 10).max(5);
    let first = base.join("/v2/_catalog?n=100")?;
    let catalog_first = timed(pages, |_| get_ok(&http, first.clone())).await?;
    // repositories sort as strings: start the page from the name of the middle one
    let middle = base.join(&format!("/v2/_catalog?n=100&last=scale/r{}", size / TAGS_PER_REPO / 2))?;
    let catalog_middle = timed(pages, |_| get_ok(&http, middle.clone())).await?;
    let tags = base.join(&format!("/v2/scale/r{}/tags/list", size / TAGS_PER_REPO / 2))?;
    let tags_list = timed(pages, |_| get_ok(&http, tags.clone())).await?;

    // the leader's last build; after a direct fill, the one built then (the same code, offline)
    let (snapshot_build_ms, snapshot_bytes) = match offline {
        Some(f) => (Some(f.snapshot_build_ms), Some(f.snapshot_bytes)),
        None => {
            let built = last_line(&cluster.log_path(leadership.leader)?, "snapshot built");
            (field(built.as_deref(), "copy_ms"), field(built.as_deref(), "bytes"))
        }
    };

    // idle: every node caught up, 5 s of quiet, then CPU over the window
    for id in cluster.followers(leadership.leader) {
        cluster.wait_caught_up(id, Duration::from_secs(120)).await?;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let voters: Vec<u64> = {
        let mut v = cluster.followers(leadership.leader);
        v.insert(0, leadership.leader);
        v
    };
    let before: Vec<f64> = voters.iter().map(|id| cpu_ms(cluster.pid(*id)?)).collect::<Result<_>>()?;
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let mut nodes = Vec::new();
    for (id, b) in voters.iter().zip(before) {
        let pid = cluster.pid(*id)?;
        let cpu = (cpu_ms(pid)? - b) * 10.0 / args.idle_secs as f64;
        let meta = dir_bytes(&cluster.data_dir(*id)?.join("meta"));
        nodes.push(json!({
            "node": id, "leader": *id == leadership.leader, "idle_cpu_ms_per_10s": cpu,
            "rss_mib": rss_kib(pid).unwrap_or(0) as f64 / 1024.0,
            "meta_bytes": meta, "meta_bytes_per_image": meta as f64 / size as f64,
        }));
    }

    let mut r = json!({
        "images": size,
        "reader": reader,
        "manifest_put_ms": stats(&put),
        "tag_get_ms": stats(&get),
        "catalog_first_page_ms": stats(&catalog_first),
        "catalog_middle_page_ms": stats(&catalog_middle),
        "tags_list_ms": stats(&tags_list),
        "snapshot_build_ms": snapshot_build_ms,
        "snapshot_bytes": snapshot_bytes,
        "nodes": nodes,
    });
    // what is measured so far, in case the catch-up does not finish
    eprintln!("{size} images, before the catch-up: {r}");

    // a new node's catch-up, then what its metadata holds
    let new_id = 10 + step as u64;
    let started = Instant::now();
    let run_dir =
        cluster.data_dir(leadership.leader)?.parent().and_then(Path::parent).context("run dir")?.to_path_buf();
    let leader_rss = RssSampler::start(vec![cluster.pid(leadership.leader)?]);
    cluster.add_backup(new_id, &run_dir).await?;
    cluster.wait_caught_up(new_id, Duration::from_secs(1800)).await?;
    let catch_up_s = started.elapsed().as_secs_f64();
    let leader_peak_kib = leader_rss.stop().await;
    let new_peak_kib = peak_rss_kib(cluster.pid(new_id)?).unwrap_or(0);
    let install_ms = field(last_line(&cluster.log_path(new_id)?, "snapshot installed").as_deref(), "took_ms");
    let new_dir = cluster.remove(new_id)?;
    let parts = std::process::Command::new(bin)
        .args(["meta-size", "--json", "--data-dir"])
        .arg(&new_dir)
        .output()
        .context("raftyard meta-size")?;
    let parts: Value = if parts.status.success() {
        serde_json::from_slice(&parts.stdout).context("meta-size output")?
    } else {
        bail!("meta-size: {}", String::from_utf8_lossy(&parts.stderr))
    };
    let _ = std::fs::remove_dir_all(new_dir.parent().unwrap_or(&new_dir));

    r["snapshot_install_ms"] = json!(install_ms);
    r["catch_up_s"] = json!(catch_up_s);
    r["catch_up_peak_rss_mib"] =
        json!({"new_node": new_peak_kib as f64 / 1024.0, "leader": leader_peak_kib as f64 / 1024.0});
    r["meta_parts"] = parts;
    Ok(r)
}

async fn run_async(args: &Args) -> Result<()> {
    let bin = args.raftyard.canonicalize().with_context(|| format!("{}", args.raftyard.display()))?;
    let run = args.run.run_dir()?;
    let mut cluster = Cluster::start(&bin, &run.path, 3, "")?;
    cluster.wait_ready(Duration::from_secs(60)).await?;
    cluster.wait_for_leader(Duration::from_secs(30), Duration::from_millis(100)).await?;
    let clients: Vec<RegistryClient> = (1..=3u64)
        .map(|id| RegistryClient::new(cluster.base(id)?, REQUEST_TIMEOUT, REQUEST_TIMEOUT))
        .collect::<Result<_>>()?;
    let clients = Arc::new(clients);

    let mut results = Vec::new();
    let mut filled = 0;
    for (step, &size) in args.sizes.iter().enumerate() {
        let direct = args.direct_from.is_some_and(|d| size >= d);
        let (took, offline) = if direct {
            let (took, f) = fill_directly(&mut cluster, filled, size).await?;
            (took, Some(f))
        } else {
            (fill(&clients, filled, size, args.concurrency).await?, None)
        };
        let rate = (size - filled) as f64 / took.as_secs_f64();
        let how = if direct { "directly" } else { "through the API" };
        eprintln!("filled to {size} images {how} ({rate:.0} images/s)");
        filled = size;
        let mut r = measure(args, &mut cluster, size, step, &bin, offline.as_ref()).await?;
        r["fill_images_per_s"] = json!(rate);
        r["filled"] = json!(if direct { "direct" } else { "api" });
        print_size(&r, results.first());
        results.push(r);
    }
    let out = json!({"sizes": results, "samples": args.samples, "idle_secs": args.idle_secs});
    if let Some(path) = &args.run.json {
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)?;
    }
    Ok(())
}

/// One size's figures, each with its ratio to the first size's.
fn print_size(r: &Value, first: Option<&Value>) {
    let ratio = |path: &[&str]| -> String {
        let get = |v: &Value| path.iter().try_fold(v, |v, k| v.get(*k)).and_then(Value::as_f64);
        match (get(r), first.and_then(get)) {
            (Some(a), Some(b)) if b > 0.0 => format!(" ({:.2}×)", a / b),
            _ => String::new(),
        }
    };
    let lat = |k: &str| {
        let v = &r[k];
        format!(
            "p50 {:.2} ms{} p99 {:.2} ms{}",
            v["p50"].as_f64().unwrap_or(0.0),
            ratio(&[k, "p50"]),
            v["p99"].as_f64().unwrap_or(0.0),
            ratio(&[k, "p99"])
        )
    };
    println!("== {} images (filled {})", r["images"], r["filled"].as_str().unwrap_or("?"));
    println!("  manifest PUT (follower)   {}", lat("manifest_put_ms"));
    println!("  tag GET (follower)        {}", lat("tag_get_ms"));
    println!("  catalog, first page       {}", lat("catalog_first_page_ms"));
    println!("  catalog, middle page      {}", lat("catalog_middle_page_ms"));
    println!("  tags list (100 tags)      {}", lat("tags_list_ms"));
    println!(
        "  snapshot build {} ms, {} bytes; install on a new node {} ms; catch-up {:.1} s",
        r["snapshot_build_ms"],
        r["snapshot_bytes"],
        r["snapshot_install_ms"],
        r["catch_up_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  peak RSS during the catch-up: new node {:.0} MiB, leader {:.0} MiB",
        r["catch_up_peak_rss_mib"]["new_node"].as_f64().unwrap_or(0.0),
        r["catch_up_peak_rss_mib"]["leader"].as_f64().unwrap_or(0.0)
    );
    for n in r["nodes"].as_array().into_iter().flatten() {
        println!(
            "  node {}{}: idle CPU {:.0} ms per 10 s, RSS {:.0} MiB, meta {:.0} bytes per image",
            n["node"],
            if n["leader"].as_bool() == Some(true) { " (leader)" } else { "" },
            n["idle_cpu_ms_per_10s"].as_f64().unwrap_or(0.0),
            n["rss_mib"].as_f64().unwrap_or(0.0),
            n["meta_bytes_per_image"].as_f64().unwrap_or(0.0),
        );
    }
    let images = r["images"].as_f64().unwrap_or(1.0);
    for p in r["meta_parts"]["parts"].as_array().into_iter().flatten() {
        let b = p["key_bytes"].as_f64().unwrap_or(0.0) + p["value_bytes"].as_f64().unwrap_or(0.0);
        println!(
            "  part {:<14} {:>8.0} bytes per image  {}",
            p["part"].as_str().unwrap_or("?"),
            b / images,
            p["what"].as_str().unwrap_or("")
        );
    }
    for (name, len) in r["meta_parts"]["files"].as_object().into_iter().flatten() {
        println!("  file {:<14} {:>8.0} bytes per image (new node)", name, len.as_f64().unwrap_or(0.0) / images);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_field_is_read_from_the_last_matching_line_through_colours() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::write(
            &log,
            "x snapshot built index=5 bytes=10 copy_ms=3\n\
             \u{1b}[2mt\u{1b}[0m snapshot built \u{1b}[3mindex\u{1b}[0m\u{1b}[2m=\u{1b}[0m9 \u{1b}[3mbytes\u{1b}[0m\u{1b}[2m=\u{1b}[0m2048 \u{1b}[3mcopy_ms\u{1b}[0m\u{1b}[2m=\u{1b}[0m41\n\
             other line copy_ms=7\n",
        )
        .unwrap();
        let built = last_line(&log, "snapshot built");
        assert_eq!(field(built.as_deref(), "copy_ms"), Some(41));
        assert_eq!(field(built.as_deref(), "bytes"), Some(2048));
        assert_eq!(field(last_line(&log, "snapshot installed").as_deref(), "took_ms"), None);
    }

    #[test]
    fn images_fill_repositories_of_a_hundred_tags() {
        assert_eq!(image(0).0, "scale/r0");
        assert_eq!(image(199).0, "scale/r1");
        assert_eq!(image(199).1, "t99");
        assert_ne!(image(1).3, image(2).3);
    }
}
