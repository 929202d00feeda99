//! `raftyard backup create|verify|restore`: online backups to a directory.
//!
//! ```text
//! DIR/raftyard-backup.json        one record per snapshot taken (newest last)
//! DIR/snapshots/<term>-<index>.snap   the metadata state at that log index
//! DIR/blobs/sha256/<xx>/<hex>     every blob any snapshot references, stored once
//! ```
//!
//! A backup is incremental: blobs already in DIR are not copied again, so a daily backup copies
//! only the blobs pushed since the last one. Every blob is verified against its digest while it
//! streams in.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::import::bytes_bar;
use anyhow::{bail, Context};
use futures::StreamExt;
use indicatif::ProgressBar;
use raftyard_blobstore::{BlobStore, BlobStoreConfig};
use raftyard_cluster::pb::BackupRequest;
use raftyard_cluster::{BlobPeers, Peers};
use raftyard_raft::backup::BackupSnapshot;
use raftyard_raft::NodeAddr;
use raftyard_types::{Digest, RepoName};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::admin::TlsDir;

const MANIFEST: &str = "raftyard-backup.json";
/// Blobs copied at once.
const PARALLEL: usize = 4;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    snapshots: Vec<SnapshotRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotRecord {
    /// Relative to the backup directory.
    file: String,
    sha256: String,
    index: u64,
    term: u64,
    /// When it was taken, ms since the epoch.
    taken_ms: u64,
    /// The node it was taken from (peer address).
    node: String,
    blobs: u64,
    bytes: u64,
    /// Blobs (and bytes) this run copied; the others were in the directory already.
    copied_blobs: u64,
    copied_bytes: u64,
}

fn load_manifest(dir: &Path) -> anyhow::Result<Manifest> {
    let p = dir.join(MANIFEST);
    if !p.exists() {
        return Ok(Manifest { format: 1, snapshots: Vec::new() });
    }
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(&p)?).with_context(|| format!("reading {}", p.display()))?;
    anyhow::ensure!(m.format == 1, "{}: unknown format {}", p.display(), m.format);
    Ok(m)
}

/// Writes `bytes` to `path` durably: a temporary file, fsync, rename, fsync of the directory.
fn write_durably(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    rename_durably(&tmp, path)
}

/// Gives the durable file `tmp` its name `path`, and syncs the directory so the name stays.
fn rename_durably(tmp: &Path, path: &Path) -> anyhow::Result<()> {
    std::fs::rename(tmp, path)?;
    std::fs::File::open(path.parent().context("no parent directory")?)?.sync_all()?;
    Ok(())
}

fn store_at(dir: &Path) -> anyhow::Result<Arc<BlobStore>> {
    let cfg = BlobStoreConfig::new(dir.to_path_buf(), "backup");
    Ok(Arc::new(BlobStore::open(cfg).with_context(|| format!("opening the blobs of {}", dir.display()))?))
}

/// `backup create`: a snapshot from `node` (a peer address) and the blobs it references.
pub async fn create(node: &str, out: &Path, tls: &TlsDir) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(format!("taking a snapshot on {node}"));
    spinner.enable_steady_tick(Duration::from_millis(120));
    let mut stream = crate::admin::client(node, tls)
        .await?
        .max_decoding_message_size(64 << 20)
        .backup(BackupRequest {})
        .await
        .with_context(|| format!("asking {node} for a snapshot"))?
        .into_inner();
    // written to a file as it arrives: the snapshot is never whole in memory
    std::fs::create_dir_all(out.join("snapshots"))?;
    let tmp = out.join("snapshots/receiving.tmp");
    let (mut f, mut hash, mut received) = (std::fs::File::create(&tmp)?, sha2::Sha256::new(), 0u64);
    while let Some(chunk) = stream.next().await {
        use std::io::Write;
        let data = chunk.context("receiving the snapshot")?.data;
        hash.update(&data);
        f.write_all(&data)?;
        received += data.len() as u64;
        spinner.set_message(format!("receiving the snapshot from {node}: {} MiB", received >> 20));
    }
    f.sync_all()?;
    drop(f);
    spinner.finish_and_clear();
    let snap = BackupSnapshot::open_file(&tmp).context("the node sent an unreadable snapshot")?;
    let file = format!("snapshots/{}-{}.snap", snap.term(), snap.index());
    rename_durably(&tmp, &out.join(&file))?;
    let snap = BackupSnapshot::open_file(&out.join(&file))?;
    let sha256 = hex::encode(hash.finalize());

    let store = store_at(out)?;
    let blobs = snap.blobs()?;
    let missing: Vec<(Digest, u64)> = blobs.iter().filter(|(d, _)| store.stat(d).is_none()).cloned().collect();
    let total: u64 = blobs.iter().map(|(_, s)| s).sum();
    let to_copy: u64 = missing.iter().map(|(_, s)| s).sum();
    // the node first, then the other members of its cluster
    let mut sources = vec![node.to_string()];
    sources.extend(snap.members().into_iter().map(|(_, a)| a.peer).filter(|p| p != node));
    let fetcher = BlobPeers::new(Arc::new(Peers::with_tls(crate::admin::peer_tls(tls)?)), store.clone());
    let repo = RepoName::parse("raftyard-backup").expect("valid name");
    let bar = bytes_bar(to_copy, &format!("{} blobs", missing.len()));
    let failed: Vec<String> = futures::stream::iter(missing.iter().cloned())
        .map(|(d, size)| {
            let (fetcher, repo, sources, bar) = (fetcher.clone(), repo.clone(), sources.clone(), bar.clone());
            async move {
                let r = fetcher.fetch(&repo, &d, &sources).await;
                bar.inc(size);
                r.err().map(|e| format!("{d}: {e}"))
            }
        })
        .buffer_unordered(PARALLEL)
        .filter_map(|f| async move { f })
        .collect()
        .await;
    bar.finish_and_clear();
    if !failed.is_empty() {
        bail!(
            "{} of {} blobs could not be copied (the snapshot is kept; run again):\n{}",
            failed.len(),
            missing.len(),
            failed.join("\n")
        );
    }

    let mut m = load_manifest(out)?;
    let rec = SnapshotRecord {
        file: file.clone(),
        sha256,
        index: snap.index(),
        term: snap.term(),
        taken_ms: raftyard_types::event::now_ms(),
        node: node.to_string(),
        blobs: blobs.len() as u64,
        bytes: total,
        copied_blobs: missing.len() as u64,
        copied_bytes: to_copy,
    };
    m.snapshots.retain(|s| s.file != rec.file);
    m.snapshots.push(rec);
    write_durably(&out.join(MANIFEST), &serde_json::to_vec_pretty(&m)?)?;
    println!(
        "backup of {node} at log index {} in {}: {} blobs ({} MiB), {} copied ({} MiB) in {:.1} s",
        snap.index(),
        out.display(),
        blobs.len(),
        total >> 20,
        missing.len(),
        to_copy >> 20,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The record and snapshot of `index` in `dir` (the newest without it), its checksum verified.
fn open_snapshot(dir: &Path, index: Option<u64>) -> anyhow::Result<(SnapshotRecord, BackupSnapshot)> {
    let m = load_manifest(dir)?;
    let rec = match index {
        Some(i) => {
            m.snapshots.iter().rev().find(|s| s.index == i).with_context(|| format!("no snapshot at index {i}"))?
        }
        None => m.snapshots.last().with_context(|| format!("{} holds no backup", dir.display()))?,
    }
    .clone();
    let path = dir.join(&rec.file);
    let sum = sha256_of(&path).with_context(|| format!("reading {}", rec.file))?;
    anyhow::ensure!(sum == rec.sha256, "{} is corrupt: sha256 {sum}, recorded {}", rec.file, rec.sha256);
    let snap = BackupSnapshot::open_file(&path).with_context(|| format!("{} is unreadable", rec.file))?;
    Ok((rec, snap))
}

/// The SHA-256 (hex) of a file, read in pieces.
fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Hashes the file of `d` in `store`: `Ok(())` if it is there with that digest and size.
fn check_blob(store: &BlobStore, d: &Digest, size: u64) -> Result<(), String> {
    use std::io::Read;
    let mut f = std::fs::File::open(store.path_of(d)).map_err(|e| format!("{d}: missing ({e})"))?;
    let mut h = d.algorithm().hasher();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(|e| format!("{d}: {e}"))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    let got = h.finish();
    if &got != d || n != size {
        return Err(format!("{d}: corrupt ({n} bytes hashing to {got})"));
    }
    Ok(())
}

/// `backup verify`: the snapshot's checksum, and every blob it references, hashed.
pub async fn verify(dir: &Path, index: Option<u64>) -> anyhow::Result<()> {
    let (rec, snap) = open_snapshot(dir, index)?;
    let store = store_at(dir)?;
    let blobs = snap.blobs()?;
    let bar = bytes_bar(blobs.iter().map(|(_, s)| s).sum(), &format!("verifying {} blobs", blobs.len()));
    let mut bad = Vec::new();
    for (d, size) in &blobs {
        if let Err(e) = check_blob(&store, d, *size) {
            bad.push(e);
        }
        bar.inc(*size);
    }
    bar.finish_and_clear();
    if !bad.is_empty() {
        bail!("{} of {} blobs are missing or corrupt:\n{}", bad.len(), blobs.len(), bad.join("\n"));
    }
    println!(
        "{}: snapshot at log index {} and its {} blobs ({} MiB) are intact",
        dir.display(),
        rec.index,
        blobs.len(),
        rec.bytes >> 20
    );
    Ok(())
}

/// `backup restore --data-dir`: a new node's data directory holding the backup: the metadata
/// state with node `id` the only voter, and every blob. `raftyard serve` on it runs a cluster
/// of one; add nodes with `raftyard cluster add`.
pub async fn restore(
    dir: &Path,
    index: Option<u64>,
    data_dir: &Path,
    id: u64,
    addr: NodeAddr,
    compress: bool,
) -> anyhow::Result<()> {
    let (rec, snap) = open_snapshot(dir, index)?;
    let meta = data_dir.join("meta");
    anyhow::ensure!(
        !meta.exists(),
        "{} already holds a node's metadata: restore into a new directory",
        data_dir.display()
    );
    let from = store_at(dir)?;
    let to = store_at(data_dir)?;
    let blobs = snap.blobs()?;
    let bar = bytes_bar(blobs.iter().map(|(_, s)| s).sum(), &format!("restoring {} blobs", blobs.len()));
    let mut bad = Vec::new();
    for (d, size) in &blobs {
        match check_blob(&from, d, *size) {
            Ok(()) => {
                let (src, dst) = (from.path_of(d), to.path_of(d));
                if std::fs::hard_link(&src, &dst).is_err() {
                    std::fs::copy(&src, &dst).with_context(|| format!("copying {d}"))?;
                    std::fs::File::open(&dst)?.sync_all()?;
                }
            }
            Err(e) => bad.push(e),
        }
        bar.inc(*size);
    }
    bar.finish_and_clear();
    if !bad.is_empty() {
        bail!("the backup is damaged, nothing was seeded:\n{}", bad.join("\n"));
    }
    for alg in ["sha256", "sha512"] {
        for i in 0..=255u8 {
            std::fs::File::open(data_dir.join("blobs").join(alg).join(format!("{i:02x}")))?.sync_all()?;
        }
    }
    snap.seed(&meta, id, addr.clone(), compress).await.context("seeding the metadata")?;
    println!(
        "{} now holds the backup at log index {} ({} blobs, {} MiB) as node {id}, the only voter \
         (peer {}, registry {}).\nStart it with `raftyard serve` (node.id = {id}); add nodes with `raftyard cluster add`.",
        data_dir.display(),
        rec.index,
        blobs.len(),
        rec.bytes >> 20,
        addr.peer,
        addr.registry
    );
    Ok(())
}

/// `backup restore --repo NAME --to URL`: pushes one repository of the backup to a running
/// registry through its API (blobs it already has are skipped), manifests before the indexes
/// that name them, then the tags.
pub async fn restore_repo(
    dir: &Path,
    index: Option<u64>,
    repo: &str,
    to: &str,
    ca: Option<PathBuf>,
    login: Option<(String, String)>,
) -> anyhow::Result<()> {
    let (_, snap) = open_snapshot(dir, index)?;
    let r = snap.repository(repo)?;
    anyhow::ensure!(!r.manifests.is_empty() || !r.blobs.is_empty(), "repository {repo} is not in this backup");
    let store = store_at(dir)?;
    let http = crate::http_client_as(Duration::from_secs(3600), ca.as_deref(), login.as_ref())?;
    let base = to.trim_end_matches('/');
    let content = crate::import::Content { blobs: r.blobs, manifests: r.manifests, tags: r.tags };
    let bar = bytes_bar(content.blobs.iter().map(|(_, s)| s).sum(), &format!("{repo}: {} blobs", content.blobs.len()));
    let source = crate::import::BlobSource::Store(store);
    let p = crate::import::push_repository(&http, base, repo, &content, &source, &bar).await?;
    bar.finish_and_clear();
    println!(
        "{repo} restored to {base}: {} blobs ({} pushed, the rest were there), {} manifests, {} tags",
        p.blobs, p.blobs_pushed, p.manifests, p.tags
    );
    Ok(())
}
