//! `raftyard-store-bench`: how much disk the metadata state takes in sled, as a node keeps it,
//! and in two candidate stores (redb, a copy-on-write B-tree; fjall, a log-structured merge
//! tree), written the way a node applies it.
//!
//! The input is a snapshot data file of a real node (`<data>/meta/snapshot-*.data`, the whole
//! state at one index, for example after `raftyard-scale-bench --keep`). Its pairs are written
//! in commits of `--pairs-per-commit` (about one image's keys), visited in a scattered order so
//! that, like applies, consecutive commits land all over the key space; every
//! `--durable-every` commits is made durable (a node's state is durable through its log and
//! snapshots, not at each apply). Each store is then closed, opened again and given
//! `--settle-secs` for background work (compaction) before its files are measured.
//! docs/metadata-store.md has the figures and what they decide.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;

use crate::server::RunOptions;

#[derive(Parser, Debug)]
#[command(name = "raftyard-store-bench", about = "Disk taken by the metadata state in sled, redb and fjall")]
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
    /// MiB of cache for sled (the node's default, `raft.cache_mib`).
    #[arg(long, default_value_t = 8)]
    pub sled_cache_mib: u64,
    #[command(flatten)]
    pub run: RunOptions,
}

/// What one store took.
#[derive(Debug, serde::Serialize)]
pub struct StoreResult {
    pub store: &'static str,
    pub write_secs: f64,
    pub bytes_after_writes: u64,
    pub bytes_settled: u64,
}

type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

pub fn run(args: &Args) -> Result<()> {
    anyhow::ensure!(args.pairs_per_commit > 0 && args.durable_every > 0, "commit sizes must be positive");
    let pairs: Pairs = raftyard_raft::state::snapshot_pairs(&args.snapshot)
        .with_context(|| format!("opening {}", args.snapshot.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", args.snapshot.display()))?;
    anyhow::ensure!(!pairs.is_empty(), "{} holds no pairs", args.snapshot.display());
    let live: u64 = pairs.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
    let manifests = pairs.iter().filter(|(k, _)| k.starts_with(raftyard_raft::keys::MANIFESTS)).count() as u64;
    let order = scattered(pairs.len());
    let dir = args.run.run_dir()?;
    let mut results = Vec::new();
    for store in ["sled", "redb", "fjall"] {
        let at = dir.path.join(store);
        std::fs::create_dir_all(&at)?;
        eprintln!("writing {} pairs into {store}", pairs.len());
        let r = match store {
            "sled" => with_sled(args, &at, &pairs, &order),
            "redb" => with_redb(args, &at, &pairs, &order),
            _ => with_fjall(args, &at, &pairs, &order),
        }
        .context(store)?;
        results.push(r);
    }
    println!("command: {}", std::env::args().collect::<Vec<_>>().join(" "));
    println!(
        "state: {} pairs, {} bytes of keys and values ({:.0} per manifest, {manifests} manifests); \
         {} pairs per commit, {}",
        pairs.len(),
        live,
        live as f64 / manifests.max(1) as f64,
        args.pairs_per_commit,
        match args.log {
            true => "a Raft log entry appended and made durable at each commit".to_string(),
            false => format!("one durable commit in {}, no Raft log", args.durable_every),
        }
    );
    println!();
    println!("| store | write (s) | on disk after writes (MB) | settled (MB) | settled / live bytes | settled bytes per manifest |");
    println!("|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.2}x | {:.0} |",
            r.store,
            r.write_secs,
            r.bytes_after_writes as f64 / 1e6,
            r.bytes_settled as f64 / 1e6,
            r.bytes_settled as f64 / live as f64,
            r.bytes_settled as f64 / manifests.max(1) as f64
        );
    }
    if let Some(p) = &args.run.json {
        let doc =
            serde_json::json!({ "pairs": pairs.len(), "live_bytes": live, "manifests": manifests, "stores": results });
        std::fs::write(p, serde_json::to_vec_pretty(&doc)?)?;
    }
    Ok(())
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
}

/// Writes every pair through `open()`'d store, reopens it and lets it settle.
fn measure<S: Store>(
    name: &'static str,
    args: &Args,
    at: &Path,
    pairs: &Pairs,
    order: &[usize],
    open: impl Fn() -> Result<S>,
) -> Result<StoreResult> {
    let started = Instant::now();
    {
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
    }
    let write_secs = started.elapsed().as_secs_f64();
    let bytes_after_writes = dir_bytes(at)?;
    let mut s = open()?;
    std::thread::sleep(Duration::from_secs(args.settle_secs));
    s.sync()?;
    drop(s);
    let bytes_settled = dir_bytes(at)?;
    Ok(StoreResult { store: name, write_secs, bytes_after_writes, bytes_settled })
}

fn dir_bytes(p: &Path) -> Result<u64> {
    let mut sum = 0;
    for e in std::fs::read_dir(p)? {
        let e = e?;
        let m = e.metadata()?;
        sum += if m.is_dir() { dir_bytes(&e.path())? } else { m.len() };
    }
    Ok(sum)
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
}

fn with_sled(args: &Args, at: &Path, pairs: &Pairs, order: &[usize]) -> Result<StoreResult> {
    measure("sled", args, at, pairs, order, || {
        let db = raftyard_raft::node::open_db(at, args.sled_cache_mib << 20)?;
        Ok(Sled { log: db.open_tree("log")?, state: db.open_tree("state")?, db })
    })
}

fn with_redb(args: &Args, at: &Path, pairs: &Pairs, order: &[usize]) -> Result<StoreResult> {
    measure("redb", args, at, pairs, order, || Ok(Redb(redb::Database::create(at.join("meta.redb"))?)))
}

fn with_fjall(args: &Args, at: &Path, pairs: &Pairs, order: &[usize]) -> Result<StoreResult> {
    measure("fjall", args, at, pairs, order, || {
        let ks = fjall::Config::new(at).open()?;
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
