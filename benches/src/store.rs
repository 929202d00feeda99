//! `raftyard-store-bench`: how much disk the metadata state takes in sled, as a node keeps it
//! (plain, and compressed as with `raft.compress_metadata`), and in two candidate stores
//! (redb, a copy-on-write B-tree; fjall, a log-structured merge tree), written the way a node
//! applies it.
//!
//! The input is a snapshot data file of a real node (`<data>/meta/snapshot-*.data`, the whole
//! state at one index, for example after `raftyard-scale-bench --keep`). Its pairs are written
//! in commits of `--pairs-per-commit` (about one image's keys), visited in a scattered order so
//! that, like applies, consecutive commits land all over the key space; every
//! `--durable-every` commits is made durable (a node's state is durable through its log and
//! snapshots, not at each apply). Each store is then closed, opened again and given
//! `--settle-secs` for background work (compaction) before its files are measured, and a
//! tenth of the keys, in scattered order, is read back through it and timed.
//!
//! Each store is written in a child process of its own (`--only`) and reopened in another
//! (`--only --reopen`). Each child loads the pairs, notes its resident size, and samples it
//! while the store works (the benchmarks' own sampler): the memory figures are what the store adds on top of the
//! loaded pairs. Every store gets the same cache (`--cache-mib`, sled's default on a node).
//! docs/metadata-store.md has the figures and what they decide.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;

use crate::server::{dir_bytes, RunOptions};
use crate::workload::RssSampler;

#[derive(Parser, Debug)]
#[command(
    name = "raftyard-store-bench",
    about = "Disk taken by the metadata state in sled (plain and zstd), redb and fjall"
)]
pub struct Args {
    /// A node's snapshot data file (`<data>/meta/snapshot-*.data`).
    #[arg(long)]
    pub snapshot: PathBuf,
    /// Pairs written per commit (a small image is about 13 keys).
    #[arg(long, default_value_t = 13)]
    pub pairs_per_commit: usize,
    /// Every this many commits, one is made durable (flushed to disk).
    #[arg(long, default_value_t = 100)]
    pub durable_every: usize,
    /// Seconds each store is left open after reopening, before its files are measured.
    #[arg(long, default_value_t = 5)]
    pub settle_secs: u64,
    /// Also keep a Raft log beside the state, as a node does: every commit appends an entry
    /// (its pairs) and is durable, and the log is cut to its last 1,000 entries every 5,000.
    #[arg(long)]
    pub log: bool,
    /// MiB of cache for each store (the node's default for sled, `raft.cache_mib`): sled's
    /// cache, redb's cache, fjall's block cache and its write buffers (at least 1 MiB).
    #[arg(long, default_value_t = 8)]
    pub cache_mib: u64,
    /// Measure only this store, in this process, in `<work-dir>/<store>`, and print its result
    /// as one line of JSON (how the bench runs each store in a child process).
    #[arg(long, value_parser = ["sled", "sled-zstd", "redb", "fjall"])]
    pub only: Option<String>,
    /// With `--only`: open the store written by an earlier `--only` run instead of writing it.
    #[arg(long, requires = "only")]
    pub reopen: bool,
    #[command(flatten)]
    pub run: RunOptions,
}

/// What one store took.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct StoreResult {
    pub store: String,
    pub write_secs: f64,
    pub bytes_after_writes: u64,
    pub bytes_settled: u64,
    /// Resident bytes over the process's size before the store was opened (the pairs loaded):
    /// the most while writing, and, in a fresh process, after reopening, settling and the read
    /// pass.
    pub rss_peak_added: u64,
    pub rss_settled_added: u64,
    /// Mean time of one read in the read pass (a tenth of the keys, scattered), microseconds.
    pub read_us: f64,
}

const STORES: [&str; 4] = ["sled", "sled-zstd", "redb", "fjall"];

type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

pub fn run(args: &Args) -> Result<()> {
    anyhow::ensure!(args.pairs_per_commit > 0 && args.durable_every > 0, "commit sizes must be positive");
    if let Some(store) = &args.only {
        let r = one_store(args, store)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let (mut pairs, mut live, mut manifests) = (0u64, 0u64, 0u64);
    for kv in raftyard_raft::state::snapshot_pairs(&args.snapshot)
        .with_context(|| format!("opening {}", args.snapshot.display()))?
    {
        let (k, v) = kv.with_context(|| format!("reading {}", args.snapshot.display()))?;
        pairs += 1;
        live += (k.len() + v.len()) as u64;
        manifests += k.starts_with(raftyard_raft::keys::MANIFESTS) as u64;
    }
    anyhow::ensure!(pairs > 0, "{} holds no pairs", args.snapshot.display());
    let dir = args.run.run_dir()?;
    let mut results = Vec::new();
    for store in STORES {
        eprintln!("{store}: writing {pairs} pairs, then reopening, each in a process of its own");
        let mut phases = Vec::new();
        for reopen in [false, true] {
            let mut child = std::process::Command::new(std::env::current_exe()?);
            child.arg("--snapshot").arg(&args.snapshot).arg("--only").arg(store).arg("--work-dir").arg(&dir.path);
            for (flag, v) in [
                ("--pairs-per-commit", args.pairs_per_commit as u64),
                ("--durable-every", args.durable_every as u64),
                ("--settle-secs", args.settle_secs),
                ("--cache-mib", args.cache_mib),
            ] {
                child.arg(flag).arg(v.to_string());
            }
            if args.log {
                child.arg("--log");
            }
            if reopen {
                child.arg("--reopen");
            }
            let out = child.stderr(std::process::Stdio::inherit()).output().context("starting the child")?;
            anyhow::ensure!(out.status.success(), "{store}: the child failed ({})", out.status);
            let line = String::from_utf8_lossy(&out.stdout);
            let r: StoreResult =
                serde_json::from_str(line.trim()).with_context(|| format!("{store}: reading {line:?}"))?;
            phases.push(r);
        }
        let (w, o) = (&phases[0], &phases[1]);
        results.push(StoreResult {
            store: store.to_string(),
            write_secs: w.write_secs,
            bytes_after_writes: w.bytes_after_writes,
            rss_peak_added: w.rss_peak_added,
            bytes_settled: o.bytes_settled,
            rss_settled_added: o.rss_settled_added,
            read_us: o.read_us,
        });
    }
    println!("command: {}", std::env::args().collect::<Vec<_>>().join(" "));
    println!(
        "state: {pairs} pairs, {live} bytes of keys and values ({:.0} per manifest, {manifests} manifests); \
         {} pairs per commit, {}",
        live as f64 / manifests.max(1) as f64,
        args.pairs_per_commit,
        match args.log {
            true => "a Raft log entry appended and made durable at each commit".to_string(),
            false => format!("one durable commit in {}, no Raft log", args.durable_every),
        }
    );
    println!();
    println!(
        "| store | write (s) | on disk after writes (MB) | settled (MB) | settled / live bytes | settled bytes per manifest \
         | RSS added, peak (MiB) | RSS added, settled (MiB) | read (µs) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    for r in &results {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.2}x | {:.0} | {:.1} | {:.1} | {:.1} |",
            r.store,
            r.write_secs,
            r.bytes_after_writes as f64 / 1e6,
            r.bytes_settled as f64 / 1e6,
            r.bytes_settled as f64 / live as f64,
            r.bytes_settled as f64 / manifests.max(1) as f64,
            mib(r.rss_peak_added),
            mib(r.rss_settled_added),
            r.read_us
        );
    }
    if let Some(p) = &args.run.json {
        let doc = serde_json::json!({ "pairs": pairs, "live_bytes": live, "manifests": manifests, "stores": results });
        std::fs::write(p, serde_json::to_vec_pretty(&doc)?)?;
    }
    Ok(())
}

/// Loads the pairs, then writes, reopens and reads one store in `<work-dir>/<store>`.
fn one_store(args: &Args, store: &str) -> Result<StoreResult> {
    let pairs: Pairs = raftyard_raft::state::snapshot_pairs(&args.snapshot)
        .with_context(|| format!("opening {}", args.snapshot.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", args.snapshot.display()))?;
    let order = scattered(pairs.len());
    let at = args.run.work_dir.join(store);
    if !args.reopen {
        std::fs::create_dir_all(&at)?;
    }
    // the benchmarks' sampler, on a runtime of its own while this thread works on the store
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_time().build()?;
    let me = std::process::id();
    let rss_kib = || crate::server::rss_kib(me).context("reading /proc/self/status");
    let base = rss_kib()?;
    let sampler = rt.block_on(async { RssSampler::start(vec![me]) });
    let mut r = match store {
        "sled" => with_sled(args, &at, &pairs, &order),
        "sled-zstd" => with_sled_zstd(args, &at, &pairs, &order),
        "redb" => with_redb(args, &at, &pairs, &order),
        _ => with_fjall(args, &at, &pairs, &order),
    }
    .context(store.to_string())?;
    let now = rss_kib()?;
    let peak = rt.block_on(sampler.stop()).max(now);
    match args.reopen {
        false => r.rss_peak_added = peak.saturating_sub(base) << 10,
        true => r.rss_settled_added = now.saturating_sub(base) << 10,
    }
    Ok(r)
}

/// Every index of `0..n` once, in steps of a stride prime to `n`.
fn scattered(n: usize) -> Vec<usize> {
    let mut stride = 7919 % n.max(1);
    while stride == 0 || gcd(stride, n) != 1 {
        stride += 1;
    }
    (0..n).map(|i| (i * stride) % n).collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One store under test: a state written in commits, beside a Raft log that is appended to,
/// made durable at every commit, and cut behind.
trait Store {
    /// Appends log entry `index`, writes `pairs` to the state; durable when `durable` (the log
    /// entry is durable at every commit, as a node's append is).
    fn commit(&mut self, index: u64, entry: &[u8], pairs: &[&(Vec<u8>, Vec<u8>)], durable: bool) -> Result<()>;
    /// Removes log entries up to `index` (a node's purge after a snapshot).
    fn purge(&mut self, upto: u64) -> Result<()>;
    /// Makes everything durable.
    fn sync(&mut self) -> Result<()>;
    /// Reads one key of the state; its value's length.
    fn get(&self, key: &[u8]) -> Result<Option<usize>>;
}

/// Writes every pair through an `open()`ed store; or, with `--reopen`, opens the written store,
/// lets it settle, measures its files and reads a tenth of the keys back.
fn measure<S: Store>(
    name: &'static str,
    args: &Args,
    at: &Path,
    pairs: &Pairs,
    order: &[usize],
    open: impl Fn() -> Result<S>,
) -> Result<StoreResult> {
    let mut r = StoreResult { store: name.to_string(), ..Default::default() };
    if !args.reopen {
        let started = Instant::now();
        let mut s = open()?;
        for (n, chunk) in order.chunks(args.pairs_per_commit).enumerate() {
            let commit: Vec<_> = chunk.iter().map(|&i| &pairs[i]).collect();
            let index = n as u64 + 1;
            let entry: Vec<u8> = match args.log {
                true => commit.iter().flat_map(|(k, v)| k.iter().chain(v.iter()).copied()).collect(),
                false => Vec::new(),
            };
            let durable = args.log || n % args.durable_every == args.durable_every - 1;
            s.commit(index, &entry, &commit, durable)?;
            // a snapshot every 5,000 entries, keeping the last 1,000 (the node's defaults)
            if args.log && index.is_multiple_of(5000) {
                s.purge(index - 1000)?;
            }
        }
        s.sync()?;
        drop(s);
        r.write_secs = started.elapsed().as_secs_f64();
        r.bytes_after_writes = dir_bytes(at);
        return Ok(r);
    }
    let mut s = open()?;
    std::thread::sleep(Duration::from_secs(args.settle_secs));
    s.sync()?;
    r.bytes_settled = dir_bytes(at);
    let reads: Vec<usize> = order.iter().step_by(10).copied().collect();
    let started = Instant::now();
    for &i in &reads {
        let (k, v) = &pairs[i];
        anyhow::ensure!(s.get(k)? == Some(v.len()), "{name}: a key read back wrong");
    }
    r.read_us = started.elapsed().as_secs_f64() * 1e6 / reads.len().max(1) as f64;
    Ok(r)
}

struct Sled {
    db: sled::Db,
    log: sled::Tree,
    state: sled::Tree,
}

impl Store for Sled {
    fn commit(&mut self, index: u64, entry: &[u8], pairs: &[&(Vec<u8>, Vec<u8>)], durable: bool) -> Result<()> {
        if !entry.is_empty() {
            self.log.insert(index.to_be_bytes(), entry)?;
        }
        let mut batch = sled::Batch::default();
        for (k, v) in pairs {
            batch.insert(k.as_slice(), v.as_slice());
        }
        batch.insert(raftyard_raft::keys::APPLIED, &index.to_be_bytes());
        self.state.apply_batch(batch)?;
        if durable {
            self.db.flush()?;
        }
        Ok(())
    }

    fn purge(&mut self, upto: u64) -> Result<()> {
        let mut batch = sled::Batch::default();
        for k in self.log.range(..=upto.to_be_bytes()).keys() {
            batch.remove(k?);
        }
        Ok(self.log.apply_batch(batch)?)
    }

    fn sync(&mut self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    fn get(&self, key: &[u8]) -> Result<Option<usize>> {
        Ok(self.state.get(key)?.map(|v| v.len()))
    }
}

const REDB_LOG: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("log");
const REDB_STATE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("state");

struct Redb(redb::Database);

impl Store for Redb {
    fn commit(&mut self, index: u64, entry: &[u8], pairs: &[&(Vec<u8>, Vec<u8>)], durable: bool) -> Result<()> {
        let mut tx = self.0.begin_write()?;
        tx.set_durability(if durable { redb::Durability::Immediate } else { redb::Durability::None });
        {
            if !entry.is_empty() {
                tx.open_table(REDB_LOG)?.insert(index, entry)?;
            }
            let mut t = tx.open_table(REDB_STATE)?;
            for (k, v) in pairs {
                t.insert(k.as_slice(), v.as_slice())?;
            }
            t.insert(raftyard_raft::keys::APPLIED, index.to_be_bytes().as_slice())?;
        }
        Ok(tx.commit()?)
    }

    fn purge(&mut self, upto: u64) -> Result<()> {
        let mut tx = self.0.begin_write()?;
        tx.set_durability(redb::Durability::None);
        tx.open_table(REDB_LOG)?.retain_in(..=upto, |_, _| false)?;
        Ok(tx.commit()?)
    }

    fn sync(&mut self) -> Result<()> {
        let mut tx = self.0.begin_write()?;
        tx.set_durability(redb::Durability::Immediate);
        Ok(tx.commit()?)
    }

    fn get(&self, key: &[u8]) -> Result<Option<usize>> {
        let tx = self.0.begin_read()?;
        let t = tx.open_table(REDB_STATE)?;
        Ok(t.get(key)?.map(|v| v.value().len()))
    }
}

struct Fjall {
    ks: fjall::Keyspace,
    log: fjall::PartitionHandle,
    state: fjall::PartitionHandle,
}

impl Store for Fjall {
    fn commit(&mut self, index: u64, entry: &[u8], pairs: &[&(Vec<u8>, Vec<u8>)], durable: bool) -> Result<()> {
        let mut batch = self.ks.batch();
        if !entry.is_empty() {
            batch.insert(&self.log, index.to_be_bytes(), entry);
        }
        for (k, v) in pairs {
            batch.insert(&self.state, k.as_slice(), v.as_slice());
        }
        batch.insert(&self.state, raftyard_raft::keys::APPLIED, index.to_be_bytes());
        batch.commit()?;
        if durable {
            self.ks.persist(fjall::PersistMode::SyncData)?;
        }
        Ok(())
    }

    fn purge(&mut self, upto: u64) -> Result<()> {
        let mut batch = self.ks.batch();
        for kv in self.log.range(..=upto.to_be_bytes()) {
            batch.remove(&self.log, kv?.0);
        }
        Ok(batch.commit()?)
    }

    fn sync(&mut self) -> Result<()> {
        Ok(self.ks.persist(fjall::PersistMode::SyncAll)?)
    }

    fn get(&self, key: &[u8]) -> Result<Option<usize>> {
        Ok(self.state.get(key)?.map(|v| v.len()))
    }
}

fn with_sled(args: &Args, at: &Path, pairs: &Pairs, order: &[usize]) -> Result<StoreResult> {
    measure("sled", args, at, pairs, order, || {
        let db = raftyard_raft::node::open_db(at, args.cache_mib << 20, false)?;
        Ok(Sled { log: db.open_tree("log")?, state: db.open_tree("state")?, db })
    })
}

/// sled as a node opens it with `raft.compress_metadata` on: every page fragment it writes is
/// compressed with zstd.
fn with_sled_zstd(args: &Args, at: &Path, pairs: &Pairs, order: &[usize]) -> Result<StoreResult> {
    measure("sled-zstd", args, at, pairs, order, || {
        let db = raftyard_raft::node::open_db(at, args.cache_mib << 20, true)?;
        Ok(Sled { log: db.open_tree("log")?, state: db.open_tree("state")?, db })
    })
}

fn with_redb(args: &Args, at: &Path, pairs: &Pairs, order: &[usize]) -> Result<StoreResult> {
    measure("redb", args, at, pairs, order, || {
        let db = redb::Builder::new().set_cache_size((args.cache_mib << 20) as usize).create(at.join("meta.redb"))?;
        Ok(Redb(db))
    })
}

fn with_fjall(args: &Args, at: &Path, pairs: &Pairs, order: &[usize]) -> Result<StoreResult> {
    measure("fjall", args, at, pairs, order, || {
        let bytes = args.cache_mib << 20;
        let ks = fjall::Config::new(at).cache_size(bytes).max_write_buffer_size(bytes.max(1 << 20)).open()?;
        let opts = fjall::PartitionCreateOptions::default;
        Ok(Fjall { log: ks.open_partition("log", opts())?, state: ks.open_partition("state", opts())?, ks })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scattered_order_visits_every_index_once() {
        for n in [1, 2, 13, 7919, 7920, 15838] {
            let mut o = scattered(n);
            o.sort_unstable();
            assert_eq!(o, (0..n).collect::<Vec<_>>(), "n = {n}");
        }
    }
}
