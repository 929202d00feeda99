//! A direct fill of stopped nodes: the images a fill through the API would push, written
//! straight into each node's storage, for registry sizes an API fill cannot reach in a
//! benchmark's time (a million images take about 80 minutes through the API here, a few
//! minutes this way).
//!
//! Each image is the two commands its push commits: the blob's (`BlobLinked` and a
//! `BlobPlaced` for every voter, as a push that reached every voter) and the manifest's
//! (`ManifestPut` with the fields the registry parses from the bytes, and `TagSet`). They are
//! applied by the node's own state machine as log entries after its last applied one, in the
//! term and leader of that entry; the log is then purged up to the last one (the entries
//! exist only as applied state, as after a snapshot) and a snapshot is built, so a node that
//! joins later is sent the whole state. Blob files are written into the node's blob store
//! (or hard-linked from a node filled before).
//!
//! Every node of the cluster must get the same fill, stopped, with everything in its log
//! applied: they then hold the same state at the same log index.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use openraft::storage::{RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{Entry, EntryPayload};
use raftyard_blobstore::{BlobStore, BlobStoreConfig};
use raftyard_raft::log_store::LogStore;
use raftyard_raft::state::StateMachine;
use raftyard_raft::{StorageWatch, TypeConfig};
use raftyard_types::event::VersionedCommand;
use raftyard_types::manifest::parse_manifest;
use raftyard_types::{Command, Digest, Event, RepoName, Tag};

/// Entries applied in one call to the state machine.
const BATCH: usize = 1024;

/// One image as a push makes it: repository, tag, blob, and manifest bytes with their media type.
pub struct Image {
    pub repo: String,
    pub tag: String,
    pub blob: Bytes,
    pub manifest: Bytes,
    pub media_type: String,
}

/// What filling one node took.
#[derive(Debug, Clone)]
pub struct Filled {
    /// The log index the node's state is at afterwards.
    pub index: u64,
    pub apply_s: f64,
    pub blobs_s: f64,
    /// The snapshot built after the fill: its time and its data file's length.
    pub snapshot_build_ms: u64,
    pub snapshot_bytes: u64,
}

/// Fills the stopped node whose data directory is `data` with images `from..to`, stamped with
/// `time_ms`: every node given the same arguments gets the same commands (their proposal ids
/// are derived from the image's number), so the same state. Blob files are hard-linked from
/// `link_from` (the data directory of a node filled before) when given, otherwise written.
pub async fn fill_node(
    data: &Path,
    from: u64,
    to: u64,
    time_ms: u64,
    image: impl Fn(u64) -> Image,
    link_from: Option<&Path>,
) -> Result<Filled> {
    let meta = data.join("meta");
    let db = raftyard_raft::node::open_offline_db(&meta, false).with_context(|| format!("{}", meta.display()))?;
    let watch = StorageWatch::offline();
    let mut log = LogStore::open(&db, watch.clone())?;
    let mut sm = StateMachine::open(&db, &meta, watch)?;
    let (applied, membership) = sm.applied_state().await?;
    let last_log = log.get_log_state().await?.last_log_id;
    let Some(applied) = applied else { bail!("{}: nothing applied yet", data.display()) };
    ensure!(
        last_log <= Some(applied),
        "{}: its log reaches {last_log:?} but only {applied:?} is applied; stop the cluster while it is idle",
        data.display()
    );
    let voters: Vec<u64> = membership.membership().voter_ids().collect();

    let started = Instant::now();
    let mut index = applied.index;
    let mut batch = Vec::with_capacity(BATCH);
    for i in from..to {
        let img = image(i);
        let repo = RepoName::parse(&img.repo)?;
        let digest = Digest::of(raftyard_types::Algorithm::Sha256, &img.blob);
        let size = img.blob.len() as u64;
        let mut blob = vec![Event::BlobLinked { repo: repo.clone(), digest: digest.clone(), size }];
        blob.extend(voters.iter().map(|&node| Event::BlobPlaced { digest: digest.clone(), size, node }));
        let parsed = parse_manifest(&img.manifest, &img.media_type)?;
        let manifest_digest = Digest::of(raftyard_types::Algorithm::Sha256, &img.manifest);
        let manifest = vec![
            Event::ManifestPut {
                repo: repo.clone(),
                digest: manifest_digest.clone(),
                media_type: parsed.media_type.clone(),
                bytes: img.manifest.to_vec(),
                refs: parsed.required.clone(),
                subject: parsed.subject.clone(),
                artifact_type: parsed.artifact_type.clone(),
            },
            Event::TagSet { repo, tag: Tag::parse(&img.tag)?, digest: manifest_digest, expect: None },
        ];
        for (k, events) in [blob, manifest].into_iter().enumerate() {
            index += 1;
            let id = proposal_id(2 * i + k as u64);
            batch.push(Entry::<TypeConfig> {
                log_id: openraft::LogId::new(applied.leader_id, index),
                payload: EntryPayload::Normal(VersionedCommand::V2 { id, command: Command { time_ms, events } }),
            });
        }
        if batch.len() >= BATCH || i + 1 == to {
            let outcomes = sm.apply(std::mem::take(&mut batch)).await?;
            if let Some(rejected) = outcomes.iter().find_map(|o| o.as_ref().err()) {
                bail!("{}: the state machine rejected a filled image: {rejected:?}", data.display());
            }
        }
    }
    let apply_s = started.elapsed().as_secs_f64();
    let last = openraft::LogId::new(applied.leader_id, index);
    if index > applied.index {
        log.purge(last).await?;
    }

    let started = Instant::now();
    let store = BlobStore::open(BlobStoreConfig { fsync: false, ..BlobStoreConfig::new(data.to_path_buf(), "fill") })?;
    let source = link_from
        .map(|d| BlobStore::open(BlobStoreConfig { fsync: false, ..BlobStoreConfig::new(d.to_path_buf(), "fill") }))
        .transpose()?;
    for i in from..to {
        let blob = image(i).blob;
        let digest = Digest::of(raftyard_types::Algorithm::Sha256, &blob);
        let path: PathBuf = store.path_of(&digest);
        match &source {
            Some(s) => std::fs::hard_link(s.path_of(&digest), &path),
            None => std::fs::write(&path, &blob),
        }
        .with_context(|| format!("{}", path.display()))?;
    }
    let blobs_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let snapshot = sm.get_snapshot_builder().await.build_snapshot().await?;
    let snapshot_build_ms = started.elapsed().as_millis() as u64;
    let snapshot_bytes = snapshot.snapshot.metadata().await?.len();
    db.flush_async().await?;
    drop((snapshot, sm, log, db));
    wait_unlocked(&meta.join("db"))?;
    Ok(Filled { index, apply_s, blobs_s, snapshot_build_ms, snapshot_bytes })
}

/// A proposal id for the `n`th command of a fill: spread like a random one (splitmix64),
/// never zero, and the same on every node.
fn proposal_id(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).max(1)
}

/// Waits until sled's lock on its database file is released: sled's threads let go of the
/// database a little after its last handle is dropped, and the node cannot open it before.
fn wait_unlocked(db: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(db).with_context(|| format!("{}", db.display()))?;
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    loop {
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(()); // closing the file releases it
        }
        ensure!(Instant::now() < deadline, "{} is still locked 60 s after the fill", db.display());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
