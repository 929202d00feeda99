//! `raftyard-backup-bench`: the RPO of a backup node under a sustained push load, measured
//! from outside and compared with what the backup reports, and the time to recover a cluster
//! from it.
//!
//! A three-node cluster and a backup node (`cluster add-backup`) run on loopback. For
//! `--secs`, clients push random blobs at `--blob-mib-per-sec` (in `--blob-kib` pieces, one
//! `POST ?digest=` each) and image manifests at `--manifests-per-sec` to random primaries. From
//! outside the backup:
//!
//! - **metadata lag**: every acknowledged manifest's tag is polled on the backup's registry API
//!   (every 10 ms, oldest first) until it answers 200: the delay from the `201` to then;
//! - **blob lag**: every acknowledged blob's file is looked for in the backup's data directory
//!   (every 20 ms): the delay from the `201` to its appearance (the backup writes it under its
//!   digest only once verified and fsynced);
//! - **reported**: the backup's `raftyard_backup_rpo_seconds` and
//!   `raftyard_backup_blob_rpo_seconds`, sampled every 250 ms.
//!
//! Then the three primaries are killed (SIGKILL) at once, under load, and the cluster is
//! recovered from the backup alone: the backup is stopped, `raftyard cluster recover` run on
//! its data, and it is started again; the time to recover runs from the kill until a push to
//! the recovered node is acknowledged. Every acknowledged manifest is looked up on it: the
//! ones missing must all be younger than the RPO the backup reported just before the kill.
//!
//! ```text
//! cargo build --release -p raftyard -p raftyard-bench
//! target/release/raftyard-backup-bench --raftyard target/release/raftyard
//! ```

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;
use sha2::Digest as _;

use crate::client::RegistryClient;
use crate::cluster::Cluster;
use crate::report::{median, percentile};

const REPO: &str = "bench/backup";
const BACKUP_ID: u64 = 4;

#[derive(Parser, Debug)]
#[command(
    name = "raftyard-backup-bench",
    about = "RPO of a backup node under a push load, and time to recover from it"
)]
pub struct Args {
    /// The raftyard binary.
    #[arg(long, default_value = "target/release/raftyard")]
    pub raftyard: PathBuf,
    /// Seconds of load.
    #[arg(long, default_value_t = 30)]
    pub secs: u64,
    /// Target blob push rate, MiB/s (the table gives what was achieved).
    #[arg(long, default_value_t = 100.0)]
    pub blob_mib_per_sec: f64,
    /// Size of each blob, KiB.
    #[arg(long, default_value_t = 1024)]
    pub blob_kib: usize,
    /// Concurrent blob pushers sharing the rate.
    #[arg(long, default_value_t = 4)]
    pub pushers: u64,
    /// Target manifest push rate, per second.
    #[arg(long, default_value_t = 50.0)]
    pub manifests_per_sec: f64,
    #[command(flatten)]
    pub run: crate::server::RunOptions,
}

pub fn run(args: &Args) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run_async(args))
}

/// Acknowledged writes not yet seen on the backup, oldest first, and the delays of those seen.
#[derive(Default)]
struct Lags {
    pending: VecDeque<(String, Instant)>,
    seen: Vec<f64>,
}

#[derive(Default)]
struct Acked {
    manifests: Vec<(String, String, Instant)>,
    blob_bytes: u64,
    blobs: u64,
}

fn stats(v: &[f64]) -> serde_json::Value {
    if v.is_empty() {
        return json!(null);
    }
    json!({"median": median(v), "p99": percentile(v, 99.0), "max": v.iter().cloned().fold(0.0, f64::max), "n": v.len()})
}

fn fmt(v: &serde_json::Value, unit: &str) -> String {
    if v.is_null() {
        return "-".into();
    }
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    format!(
        "median {:.3} {unit}, p99 {:.3} {unit}, max {:.3} {unit} ({} samples)",
        f("median"),
        f("p99"),
        f("max"),
        v["n"]
    )
}

async fn metric(http: &reqwest::Client, base: &reqwest::Url, name: &str) -> Option<f64> {
    let text = http.get(base.join("/metrics").ok()?).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
}

fn manifest(config: &str, config_len: usize, tag: &str) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_len},
            "layers": [], "annotations": {"bench": tag}
        }))
        .expect("json"),
    )
}

async fn run_async(args: &Args) -> Result<()> {
    let run_dir = args.run.run_dir()?;
    let mut cluster = Cluster::start(&args.raftyard, &run_dir.path, 3, "")?;
    cluster.wait_ready(Duration::from_secs(30)).await?;
    cluster.wait_for_leader(Duration::from_secs(30), Duration::from_millis(50)).await?;
    cluster.add_backup(BACKUP_ID, &run_dir.path).await?;
    let backup = cluster.base(BACKUP_ID)?;
    let backup_blobs = cluster.data_dir(BACKUP_ID)?.join("blobs");
    let primaries: Vec<reqwest::Url> = (1..=3).map(|id| cluster.base(id)).collect::<Result<_>>()?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;

    let clients: Vec<Arc<RegistryClient>> = primaries
        .iter()
        .map(|b| RegistryClient::new(b.clone(), Duration::from_secs(30), Duration::from_secs(120)).map(Arc::new))
        .collect::<Result<_>>()?;
    let config =
        Bytes::from_static(br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#);
    let config_digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&config)));
    clients[0].push_blob_single_post(REPO, config.clone(), &config_digest).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Acked::default()));
    let meta_lags = Arc::new(Mutex::new(Lags::default()));
    let blob_lags = Arc::new(Mutex::new(Lags::default()));
    let reported: Arc<Mutex<(Vec<f64>, Vec<f64>)>> = Arc::default();
    let started = Instant::now();
    let mut tasks = Vec::new();

    // blobs: pushers sharing the byte rate
    let piece = args.blob_kib << 10;
    let per_pusher = args.blob_mib_per_sec * 1048576.0 / args.pushers as f64;
    for k in 0..args.pushers {
        let (clients, stop, acked, blob_lags) = (clients.clone(), stop.clone(), acked.clone(), blob_lags.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(k);
            let mut data = vec![0u8; piece];
            rng.fill_bytes(&mut data);
            let mut sent = 0f64;
            let t0 = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                data[..16].copy_from_slice(&[k.to_be_bytes(), n.to_be_bytes()].concat());
                let bytes = Bytes::from(data.clone());
                let hexd = hex::encode(sha2::Sha256::digest(&bytes));
                let c = &clients[rng.gen_range(0..clients.len())];
                if c.push_blob_single_post(REPO, bytes, &format!("sha256:{hexd}")).await.is_ok() {
                    let now = Instant::now();
                    let mut a = acked.lock().unwrap();
                    a.blobs += 1;
                    a.blob_bytes += piece as u64;
                    blob_lags.lock().unwrap().pending.push_back((hexd, now));
                }
                sent += piece as f64;
                let due = t0 + Duration::from_secs_f64(sent / per_pusher);
                tokio::time::sleep_until(due.into()).await;
            }
        }));
    }
    // manifests at a steady rate, each PUT on its own (a slow one does not delay the next)
    {
        let (clients, stop, acked, meta_lags) = (clients.clone(), stop.clone(), acked.clone(), meta_lags.clone());
        let (every, config_digest, config_len) =
            (Duration::from_secs_f64(1.0 / args.manifests_per_sec), config_digest.clone(), config.len());
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut i = 0u64;
            let mut rng = rand::rngs::StdRng::seed_from_u64(9);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                i += 1;
                let tag = format!("m{i}");
                let m = manifest(&config_digest, config_len, &tag);
                let d = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&m)));
                let c = clients[rng.gen_range(0..clients.len())].clone();
                let (acked, meta_lags) = (acked.clone(), meta_lags.clone());
                tokio::spawn(async move {
                    if c.put_manifest(REPO, &tag, "application/vnd.oci.image.manifest.v1+json", m).await.is_ok() {
                        let now = Instant::now();
                        acked.lock().unwrap().manifests.push((tag.clone(), d, now));
                        meta_lags.lock().unwrap().pending.push_back((tag, now));
                    }
                });
            }
        }));
    }
    // outside: tags on the backup, oldest first
    {
        let (http, backup, stop, meta_lags) = (http.clone(), backup.clone(), stop.clone(), meta_lags.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                loop {
                    let Some((tag, at)) = meta_lags.lock().unwrap().pending.front().cloned() else { break };
                    let url = backup.join(&format!("/v2/{REPO}/manifests/{tag}")).expect("url");
                    let seen =
                        http.head(url).header("accept", "application/vnd.oci.image.manifest.v1+json").send().await;
                    if !seen.is_ok_and(|r| r.status() == 200) {
                        break;
                    }
                    let mut l = meta_lags.lock().unwrap();
                    l.pending.pop_front();
                    l.seen.push(at.elapsed().as_secs_f64());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    // outside: blob files in the backup's data directory
    {
        let (stop, blob_lags, dir) = (stop.clone(), blob_lags.clone(), backup_blobs.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                {
                    let now = Instant::now();
                    let mut l = blob_lags.lock().unwrap();
                    let mut still = VecDeque::new();
                    while let Some((hexd, at)) = l.pending.pop_front() {
                        if dir.join("sha256").join(&hexd[..2]).join(&hexd).exists() {
                            l.seen.push(now.duration_since(at).as_secs_f64());
                        } else {
                            still.push_back((hexd, at));
                        }
                    }
                    l.pending = still;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // what the backup says
    {
        let (http, backup, stop, reported) = (http.clone(), backup.clone(), stop.clone(), reported.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let rpo = metric(&http, &backup, "raftyard_backup_rpo_seconds").await;
                let blob = metric(&http, &backup, "raftyard_backup_blob_rpo_seconds").await;
                if let (Some(a), Some(b)) = (rpo, blob) {
                    let mut r = reported.lock().unwrap();
                    r.0.push(a);
                    r.1.push(b);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    // the RPO the backup reports just before the primaries die
    let rpo_at_kill = metric(&http, &backup, "raftyard_backup_rpo_seconds").await.context("backup RPO metric")?;
    let blob_rpo_at_kill = metric(&http, &backup, "raftyard_backup_blob_rpo_seconds").await.unwrap_or(0.0);
    let killed_at = Instant::now();
    for id in 1..=3 {
        cluster.kill(id)?;
    }
    let load_secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }

    // recover from the backup alone
    cluster.kill(BACKUP_ID)?;
    let recover_started = Instant::now();
    let out = std::process::Command::new(&args.raftyard)
        .args(["cluster", "recover", "--data-dir"])
        .arg(cluster.data_dir(BACKUP_ID)?)
        .output()?;
    if !out.status.success() {
        bail!("cluster recover: {}", String::from_utf8_lossy(&out.stderr));
    }
    cluster.restart(BACKUP_ID)?;
    let recovered = RegistryClient::new(backup.clone(), Duration::from_secs(5), Duration::from_secs(30))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = manifest(&config_digest, config.len(), "after-recovery");
        if recovered.put_manifest(REPO, "after-recovery", "application/vnd.oci.image.manifest.v1+json", m).await.is_ok()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the recovered node took no push within 60 s; {}", cluster.log_tails());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let writable_after_kill = killed_at.elapsed().as_secs_f64();
    let recover_secs = recover_started.elapsed().as_secs_f64();

    // every acknowledged manifest: there, or younger than the reported RPO
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let (mut lost, mut lost_max_age, mut violations) = (0u64, 0f64, 0u64);
    for (tag, digest, at) in &acked.manifests {
        let url = backup.join(&format!("/v2/{REPO}/manifests/{tag}"))?;
        let r = http.head(url).header("accept", "application/vnd.oci.image.manifest.v1+json").send().await?;
        let there = r.status() == 200
            && r.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()) == Some(digest.as_str());
        if !there {
            lost += 1;
            let age = killed_at.saturating_duration_since(*at).as_secs_f64();
            lost_max_age = lost_max_age.max(age);
            // the reported figure may be up to one measurement (1 s) old
            if age > rpo_at_kill + 1.0 {
                violations += 1;
            }
        }
    }

    let meta = meta_lags.lock().unwrap();
    let blobs = blob_lags.lock().unwrap();
    let rep = reported.lock().unwrap();
    let result = json!({
        "command": crate::report::command_line(),
        "load": {
            "secs": load_secs,
            "blob_mib_per_sec": acked.blob_bytes as f64 / 1048576.0 / load_secs,
            "blobs": acked.blobs,
            "manifests_per_sec": acked.manifests.len() as f64 / load_secs,
            "manifests": acked.manifests.len(),
            "target_blob_mib_per_sec": args.blob_mib_per_sec,
            "target_manifests_per_sec": args.manifests_per_sec,
        },
        "metadata_lag_outside_s": stats(&meta.seen),
        "metadata_not_seen_at_kill": meta.pending.len(),
        "blob_lag_outside_s": stats(&blobs.seen),
        "blobs_not_seen_at_kill": blobs.pending.len(),
        "reported_rpo_s": stats(&rep.0),
        "reported_blob_rpo_s": stats(&rep.1),
        "reported_at_kill": {"rpo_s": rpo_at_kill, "blob_rpo_s": blob_rpo_at_kill},
        "recovery": {"recover_and_restart_s": recover_secs, "writable_after_kill_s": writable_after_kill},
        "manifests_lost": lost,
        "manifests_lost_max_age_s": lost_max_age,
        "manifests_lost_older_than_reported_rpo": violations,
    });
    println!("raftyard backup bench: {}", crate::report::command_line());
    println!(
        "load: {:.1} MiB/s of blobs ({} × {} KiB; target {}), {:.1} manifests/s (target {}), {:.1} s",
        result["load"]["blob_mib_per_sec"].as_f64().unwrap_or(0.0),
        acked.blobs,
        args.blob_kib,
        args.blob_mib_per_sec,
        result["load"]["manifests_per_sec"].as_f64().unwrap_or(0.0),
        args.manifests_per_sec,
        load_secs
    );
    println!("metadata lag, measured outside: {}", fmt(&result["metadata_lag_outside_s"], "s"));
    println!("metadata RPO, reported:         {}", fmt(&result["reported_rpo_s"], "s"));
    println!("blob lag, measured outside:     {}", fmt(&result["blob_lag_outside_s"], "s"));
    println!("blob RPO, reported:             {}", fmt(&result["reported_blob_rpo_s"], "s"));
    println!(
        "at the kill: reported RPO {rpo_at_kill:.3} s (blobs {blob_rpo_at_kill:.3} s); not yet seen outside: {} manifests, {} blobs",
        meta.pending.len(),
        blobs.pending.len()
    );
    println!(
        "recovery: recover + restart + first push {recover_secs:.2} s; writable {writable_after_kill:.2} s after the primaries died"
    );
    println!(
        "acknowledged manifests missing after recovery: {lost} (the oldest {lost_max_age:.3} s old at the kill); older than the reported RPO: {violations}"
    );
    if let Some(p) = &args.run.json {
        std::fs::write(p, serde_json::to_string_pretty(&result)? + "\n")?;
    }
    if violations > 0 {
        bail!("{violations} acknowledged manifests older than the reported RPO were lost");
    }
    Ok(())
}
