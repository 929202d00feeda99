//! The chaos suite: a real cluster of `raftyard serve` processes under continuous load, faults
//! from a seeded schedule (kill -9, SIGSTOP, graceful restarts, partitions, one-way loss, slow
//! links through a proxy on every directed peer link), a history of every operation, and a
//! check after healing:
//!
//! - every acknowledged blob and manifest is readable, digest for digest, from every node;
//! - no read ever returned a blob or manifest other than the one its digest names (partial or
//!   corrupt content);
//! - nothing whose delete by digest was acknowledged is served again, during the run or after;
//! - every tag is a linearizable register ([`linear`]);
//! - at most one leader per term (from health polls during the run);
//! - every node converges to the same metadata state (`/v2/_raftyard/state-digest`);
//! - availability: after each fault, the time until a write succeeds again.
//!
//! See `docs/chaos.md`.

pub mod cluster;
pub mod faults;
pub mod linear;
pub mod proxy;
pub mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;
use serde::Serialize;

use crate::cluster::Cluster;
use crate::workload::{History, Kind as OpKind, Load, Op, Outcome, Stop};

pub struct Options {
    pub bin: PathBuf,
    pub seed: u64,
    pub duration: Duration,
    pub nodes: u64,
    pub clients: usize,
    pub keys: usize,
    pub faults: Vec<faults::Kind>,
    /// Start this node deliberately broken, and how (a `RAFTYARD_FAULT` value:
    /// `ack-before-commit`, `stale-reads`).
    pub broken: Option<(u64, String)>,
    /// Put a tunnel relay in front of the nodes; clients also go through its shared endpoint.
    pub relay: bool,
    /// Add a backup node: faults hit it too, and after healing it must hold every acknowledged
    /// blob and manifest and converge to the voters' state.
    pub backup: bool,
    /// A node whose peer links are delayed this much each way for the whole run (a member far
    /// away).
    pub distant: Option<(u64, Duration)>,
    /// Independent fault streams at once (1: one fault at a time). Stream 0 is the schedule of
    /// `seed` alone; a fault whose node another fault holds is skipped.
    pub concurrency: usize,
    /// Every node's `RUST_LOG` and extra settings.
    pub node: cluster::NodeSettings,
    /// Keep the run's directory (node logs; data of nodes not on a tmpfs) and say where.
    pub keep: bool,
}

#[derive(Debug, Serialize)]
pub struct FaultRecord {
    pub at_ms: u64,
    pub kind: faults::Kind,
    pub target: faults::Target,
    pub node: u64,
    pub healed_at_ms: u64,
    /// From the fault until the first acknowledgement of a write begun after it (by any node,
    /// to the availability probe that writes to every node every 50 ms).
    pub write_gap_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub duration_secs: u64,
    pub nodes: u64,
    pub clients: usize,
    pub ops: u64,
    pub tag_ops: usize,
    pub blob_ops: u64,
    pub acked_writes: usize,
    pub acked_blobs: usize,
    pub acked_deletes: usize,
    pub faults: Vec<FaultRecord>,
    pub terms_seen: usize,
    pub converged_after_ms: Option<u64>,
    /// Nodes that exited by themselves (and were started again, as a supervisor would).
    pub crashes: Vec<String>,
    pub linearizability_unknown_keys: Vec<String>,
    pub violations: Vec<String>,
}

impl Report {
    pub fn human(&self) -> String {
        let mut s = format!(
            "seed {} · {} s · {} nodes · {} clients\n{} tag ops ({} writes acknowledged), {} blob ops ({} blobs, {} deletes by digest acknowledged), {} terms seen\n",
            self.seed,
            self.duration_secs,
            self.nodes,
            self.clients,
            self.tag_ops,
            self.acked_writes,
            self.blob_ops,
            self.acked_blobs,
            self.acked_deletes,
            self.terms_seen
        );
        for f in &self.faults {
            s.push_str(&format!(
                "  {:>6} ms  {:?} {:?} (node {}) healed at {} ms, writes back after {}\n",
                f.at_ms,
                f.kind,
                f.target,
                f.node,
                f.healed_at_ms,
                f.write_gap_ms.map(|g| format!("{g} ms")).unwrap_or_else(|| "-".into())
            ));
        }
        for c in &self.crashes {
            s.push_str(&format!("  node exited by itself: {c}\n"));
        }
        match self.converged_after_ms {
            Some(ms) => s.push_str(&format!("converged {ms} ms after healing\n")),
            None => s.push_str("did not converge\n"),
        }
        if !self.linearizability_unknown_keys.is_empty() {
            s.push_str(&format!(
                "linearizability search gave up (not a violation) on: {:?}\n",
                self.linearizability_unknown_keys
            ));
        }
        for v in &self.violations {
            s.push_str(&format!("VIOLATION: {v}\n"));
        }
        s.push_str(&format!(
            "chaos: {} ops, {} faults, {} violations",
            self.ops,
            self.faults.len(),
            self.violations.len()
        ));
        s
    }
}

/// The size of each node's disk when the `disk` fault is in the mix: room for what the run
/// writes (every node holds every blob; the workload writes about 0.45 MiB per client and
/// second here, so a MiB is counted) above the nodes' free-space reserve (256 MiB by
/// default), and at least 1 GiB. A disk the run outgrows would leave every node below its
/// reserve at the end: blob writes refused and repairs waiting, which is what a full disk
/// must do, but then the backup cannot hold everything and the check of it means nothing.
/// tmpfs takes memory only for what is written, the `disk` fault's filler included.
pub fn disk_bytes(duration: Duration, clients: usize) -> u64 {
    ((512 << 20) + duration.as_secs() * clients as u64 * (1 << 20)).max(1 << 30)
}

/// Runs one scenario and checks it.
pub async fn run(o: &Options) -> Result<Report> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(4).build()?;
    // ports are picked free and then bound by the nodes: another process can take one in
    // between (tests run in parallel), so a failed start is tried again on other ports
    let mut tries = 0;
    let disk = o.faults.contains(&faults::Kind::Disk).then_some(disk_bytes(o.duration, o.clients));
    let mut cluster = loop {
        match Cluster::start(&o.bin, o.nodes, o.broken.clone(), o.relay, disk, o.backup, &o.node).await {
            Ok(c) => break c,
            Err(e) if tries < 2 => {
                tries += 1;
                eprintln!("starting the cluster failed, trying other ports: {e:#}");
            }
            Err(e) => return Err(e),
        }
    };
    if o.keep {
        eprintln!("the run's directory is kept: {}", cluster.keep_dir().display());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.leader(&http).await.is_none() {
        if Instant::now() > deadline {
            let logs: Vec<String> =
                cluster.ids().into_iter().map(|id| format!("node {id}:\n{}", cluster.log_tail(id))).collect();
            anyhow::bail!("no leader after 30 s\n{}", logs.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.add_backup().await?;
    if let Some((id, delay)) = o.distant {
        cluster.set_distant(id, delay);
    }
    // the voters take the load; the backup is checked after healing
    let nodes: Vec<(u64, String)> =
        cluster.ids().into_iter().map(|id| (id, cluster.node(id).registry.clone())).collect();
    let everyone: Vec<(u64, String)> =
        cluster.all_ids().into_iter().map(|id| (id, cluster.node(id).registry.clone())).collect();
    let (config_digest, config_len) = workload::setup(&http, &nodes[0].1).await?;
    // where clients go: every node, and (as "node 0") the relay's shared endpoint
    let mut targets = nodes.clone();
    if let Some(r) = &cluster.relay {
        wait_relay(r, o.nodes).await?;
        targets.push((0, r.shared.clone()));
    }
    let gc = o.faults.contains(&faults::Kind::Gc);
    let load = Arc::new(Load { gc, keys: o.keys, nodes: targets, config_digest, config_len });

    let start = Instant::now();
    let history = Arc::new(Mutex::new(History::default()));
    let stop = Stop::default();
    let mut clients = Vec::new();
    for c in 0..o.clients {
        clients.push(tokio::spawn(workload::client(
            c,
            o.seed,
            load.clone(),
            http.clone(),
            start,
            stop.clone(),
            history.clone(),
        )));
    }
    clients.push(tokio::spawn(workload::probe(load.clone(), http.clone(), start, stop.clone(), history.clone())));
    // who claims leadership of which term, polled from every node
    let leaders: Arc<Mutex<BTreeMap<u64, BTreeSet<u64>>>> = Arc::default();
    let monitor = {
        let (leaders, stop, http, nodes) = (leaders.clone(), stop.clone(), http.clone(), nodes.clone());
        tokio::spawn(async move {
            while !stop.is_set() {
                for (id, addr) in &nodes {
                    let h = http
                        .get(format!("http://{addr}/v2/_raftyard/health"))
                        .timeout(Duration::from_millis(300))
                        .send()
                        .await;
                    let Ok(h) = h else { continue };
                    let Ok(h) = h.json::<serde_json::Value>().await else { continue };
                    if h["state"] == "Leader" {
                        if let Some(t) = h["term"].as_u64() {
                            leaders.lock().unwrap().entry(t).or_default().insert(*id);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // the schedule: `concurrency` independent streams of faults, merged by time
    let steps: Vec<faults::Step> = (0..o.concurrency.max(1) as u64)
        .flat_map(|k| {
            faults::schedule(o.seed.wrapping_add(k.wrapping_mul(0x9E37_79B9)), o.duration, &o.faults, o.backup)
        })
        .collect();
    let mut events: Vec<(Duration, bool, usize)> = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        events.push((s.at, true, i));
        events.push((s.at + s.hold, false, i));
    }
    events.sort();
    let mut records: Vec<Option<FaultRecord>> = steps.iter().map(|_| None).collect();
    let mut active: BTreeMap<usize, u64> = BTreeMap::new();
    for (when, begin, i) in events {
        tokio::time::sleep_until((start + when).into()).await;
        let step = &steps[i];
        if !begin {
            if let Some(node) = active.remove(&i) {
                faults::heal_one(
                    &mut cluster,
                    step,
                    node,
                    &active.iter().map(|(&j, &n)| (&steps[j], n)).collect::<Vec<_>>(),
                )
                .await?;
                if let Some(r) = records[i].as_mut() {
                    r.healed_at_ms = start.elapsed().as_millis() as u64;
                }
            }
            continue;
        }
        let leader = cluster.leader(&http).await;
        // the relay fault hits the relay, reported as node 0
        let node = if step.kind == faults::Kind::Relay {
            0
        } else {
            faults::resolve(step.target, leader, &cluster.ids(), cluster.backup)
        };
        // a collection holds nothing: it runs through a node whatever else befalls it
        let holds = step.kind != faults::Kind::Gc;
        if holds && active.values().any(|&n| n == node) {
            eprintln!(
                "{:>6} ms: {:?} on node {node} skipped: a fault already holds it",
                start.elapsed().as_millis(),
                step.kind
            );
            continue;
        }
        faults::apply(&mut cluster, step, node).await?;
        // from when the fault is in place (filling a disk takes a moment)
        let at = start.elapsed();
        eprintln!("{:>6} ms: {:?} on node {node} ({:?}) for {:?}", at.as_millis(), step.kind, step.target, step.hold);
        if holds {
            active.insert(i, node);
        }
        records[i] = Some(FaultRecord {
            at_ms: at.as_millis() as u64,
            kind: step.kind,
            target: step.target,
            node,
            healed_at_ms: if holds { 0 } else { at.as_millis() as u64 },
            write_gap_ms: None,
        });
    }
    let mut records: Vec<FaultRecord> = records.into_iter().flatten().collect();
    records.sort_by_key(|r| r.at_ms);
    tokio::time::sleep_until((start + o.duration).into()).await;
    stop.set();
    for c in clients {
        let _ = c.await;
    }
    let _ = monitor.await;
    faults::heal(&mut cluster).await?;
    let healed = Instant::now();
    eprintln!("{:>6} ms: load stopped, all healed; checking", start.elapsed().as_millis());

    let mut h = std::mem::take(&mut *history.lock().unwrap());
    let mut violations = std::mem::take(&mut h.violations);
    for (id, why) in &cluster.unstartable {
        violations.push(format!("node {id} exited during each of its last starts after healing: {why}"));
    }

    // availability: the first acknowledged write after each fault
    // (a write begun before the fault may still be acknowledged after it: it does not count)
    for r in &mut records {
        let at_us = r.at_ms * 1000;
        r.write_gap_ms = h.write_oks.iter().filter(|w| w.0 >= at_us).map(|w| (w.1 - at_us) / 1000).min();
    }

    // one leader per term
    for (term, ls) in leaders.lock().unwrap().iter() {
        if ls.len() > 1 {
            violations.push(format!("term {term} had {} leaders: {ls:?}", ls.len()));
        }
    }
    let terms_seen = leaders.lock().unwrap().len();

    let converged = converge(&http, &everyone, Duration::from_secs(60)).await;
    let converged_after_ms = match &converged {
        Ok(()) => Some(healed.elapsed().as_millis() as u64),
        Err(e) => {
            violations.push(format!("nodes did not converge within 60 s of healing: {e}"));
            None
        }
    };
    if gc {
        // one more collection, of everything unreferenced, before the acknowledged reads:
        // it takes nothing they need, and leaves nothing a second one would find
        let via = cluster.leader(&http).await.unwrap_or(cluster.ids()[0]);
        match cluster.collect_now(via, Duration::ZERO, false).await {
            Ok(r) => eprintln!("final collection: {} links, {} blobs removed", r["links_removed"], r["blobs_removed"]),
            Err(e) => violations.push(format!("the final collection failed: {e:#}")),
        }
        match cluster.collect_now(via, Duration::ZERO, true).await {
            Ok(r) if r["links"] == 0 && r["manifests"] == 0 => {}
            Ok(r) => violations.push(format!("garbage left after the final collection: {r}")),
            Err(e) => violations.push(format!("the dry run after the final collection failed: {e:#}")),
        }
    }

    eprintln!("converged after {:?}", healed.elapsed());
    // the backup holds every blob itself (a read could be served by fetching from a peer)
    if let Some(b) = cluster.backup {
        let addr = cluster.node(b).registry.clone();
        if let Err(e) = backup_complete(&http, &addr, Duration::from_secs(60)).await {
            violations.push(format!("backup node {b}: {e}"));
        }
    }
    // final reads of every key on every node join the history
    let now_us = |t: Instant| t.duration_since(start).as_micros() as u64;
    for (id, addr) in &nodes {
        for k in 0..o.keys {
            let invoke = now_us(Instant::now());
            let r = http
                .get(format!("http://{addr}/v2/{}/manifests/k{k}", workload::REG_REPO))
                .header("accept", workload::OCI_MANIFEST)
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            let value = match r {
                Ok(r) if r.status() == 200 => match r.bytes().await {
                    Ok(b) => Some(workload::digest_of("sha256", &b)),
                    Err(e) => {
                        violations.push(format!("node {id}: final read of k{k} failed: {e}"));
                        continue;
                    }
                },
                Ok(r) if r.status() == 404 => None,
                Ok(r) => {
                    violations.push(format!("node {id}: final read of k{k} answered {}", r.status()));
                    continue;
                }
                Err(e) => {
                    violations.push(format!("node {id}: final read of k{k} failed: {e}"));
                    continue;
                }
            };
            h.ops.push(Op {
                client: usize::MAX,
                node: *id,
                kind: OpKind::Read,
                key: format!("k{k}"),
                value,
                invoke_us: invoke,
                complete_us: now_us(Instant::now()),
                outcome: Outcome::Ok,
            });
        }
    }

    eprintln!("final reads done after {:?}", healed.elapsed());
    // every acknowledged blob and manifest on every node (16 reads at a time)
    let mut reads = Vec::new();
    for (id, addr) in &everyone {
        for b in &h.blobs {
            let url = format!("http://{addr}/v2/{}/blobs/{}", workload::BLOB_REPO, b.digest);
            reads.push((*id, url, b.digest.clone(), None));
        }
        for (d, bytes) in &h.manifests {
            let url = format!("http://{addr}/v2/{}/manifests/{d}", workload::REG_REPO);
            reads.push((*id, url, d.clone(), Some(bytes)));
        }
    }
    // every acknowledged delete holds on every node (and the backup)
    for (id, addr) in &everyone {
        for g in &h.deleted {
            let url = format!("http://{addr}/v2/{}/{}/{}", workload::GONE_REPO, g.what, g.digest);
            match http.get(&url).header("accept", workload::OCI_MANIFEST).timeout(Duration::from_secs(10)).send().await
            {
                Ok(r) if r.status() == 404 => {}
                Ok(r) => violations.push(format!(
                    "node {id}: deleted {} {} answered {} after healing",
                    g.what,
                    g.digest,
                    r.status()
                )),
                Err(e) => violations.push(format!("node {id}: read of deleted {} {} failed: {e}", g.what, g.digest)),
            }
        }
    }
    // a node that stops answering is given up on after a few timeouts (one violation naming
    // it), so that the run reaches a verdict instead of waiting out every read
    let unresponsive: Arc<Mutex<BTreeMap<u64, usize>>> = Default::default();
    let checked = futures::stream::iter(reads)
        .map(|(id, url, digest, manifest)| {
            let http = http.clone();
            let unresponsive = unresponsive.clone();
            async move {
                let what = if manifest.is_some() { "manifest" } else { "blob" };
                if unresponsive.lock().unwrap().get(&id).is_some_and(|n| *n >= GIVE_UP_AFTER_TIMEOUTS) {
                    return None;
                }
                let r = fetch(&http, &url).await;
                if let Err(e) = &r {
                    if e.downcast_ref::<reqwest::Error>().is_some_and(|e| e.is_timeout() || e.is_connect()) {
                        let mut u = unresponsive.lock().unwrap();
                        let n = u.entry(id).or_default();
                        *n += 1;
                        if *n > GIVE_UP_AFTER_TIMEOUTS {
                            return None;
                        }
                        if *n == GIVE_UP_AFTER_TIMEOUTS {
                            return Some(format!(
                                "node {id}: stopped answering after healing ({n} reads timed out or refused); \
                                 its remaining reads were not made"
                            ));
                        }
                    }
                }
                match r {
                    Ok(body) => match manifest {
                        Some(bytes) if &body == bytes => None,
                        None if workload::digest_of(digest.split(':').next().unwrap_or(""), &body) == digest => None,
                        _ => Some(format!("node {id}: acknowledged {what} {digest} has other content")),
                    },
                    Err(e) => Some(format!("node {id}: acknowledged {what} {digest} unreadable: {e}")),
                }
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    violations.extend(checked.into_iter().flatten());

    eprintln!("{} acknowledged objects read back after {:?}", h.blobs.len() + h.manifests.len(), healed.elapsed());
    // linearizability, key by key
    let mut unknown = Vec::new();
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in &h.ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    for (k, ops) in &by_key {
        match linear::check(ops, 2_000_000) {
            linear::Verdict::Linearizable => {}
            linear::Verdict::Unknown => unknown.push(k.to_string()),
            linear::Verdict::Violation { longest_prefix } => violations.push(format!(
                "tag {k}: {} operations are not linearizable (the longest valid order explains {longest_prefix})",
                ops.len()
            )),
        }
    }

    eprintln!("linearizability checked after {:?}", healed.elapsed());
    let tag_ops = h.ops.len();
    Ok(Report {
        seed: o.seed,
        duration_secs: o.duration.as_secs(),
        nodes: o.nodes,
        clients: o.clients,
        ops: tag_ops as u64 + h.blob_ops,
        tag_ops,
        blob_ops: h.blob_ops,
        acked_writes: h.ops.iter().filter(|o| o.kind != OpKind::Read && o.outcome == Outcome::Ok).count(),
        acked_blobs: h.blobs.len(),
        acked_deletes: h.deleted.len(),
        faults: records,
        terms_seen,
        converged_after_ms,
        crashes: cluster.crashes.iter().map(|(id, why)| format!("node {id}: {why}")).collect(),
        linearizability_unknown_keys: unknown,
        violations,
    })
}

/// Waits until every node's agent is behind the relay (each node answers through it).
async fn wait_relay(relay: &cluster::Relay, nodes: u64) -> Result<()> {
    // a new connection per request: the relay picks a node per connection
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = BTreeSet::new();
    while (seen.len() as u64) < nodes {
        anyhow::ensure!(Instant::now() < deadline, "only nodes {seen:?} answered through the relay");
        let r = http
            .get(format!("http://{}/v2/_raftyard/health", relay.shared))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if let Ok(r) = r {
            if let Ok(h) = r.json::<serde_json::Value>().await {
                seen.extend(h["node"].as_u64());
            }
        }
    }
    Ok(())
}

/// Reads of acknowledged objects from one node that time out (or are refused) before the node
/// is given up on.
const GIVE_UP_AFTER_TIMEOUTS: usize = 3;

async fn fetch(http: &reqwest::Client, url: &str) -> Result<Vec<u8>> {
    let r = http.get(url).header("accept", workload::OCI_MANIFEST).timeout(Duration::from_secs(30)).send().await?;
    anyhow::ensure!(r.status() == 200, "{}", r.status());
    Ok(r.bytes().await?.to_vec())
}

/// The value of the unlabelled metric `name` in a Prometheus text exposition.
fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits until the backup at `addr` reports no blob missing.
async fn backup_complete(http: &reqwest::Client, addr: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = match http.get(format!("http://{addr}/metrics")).timeout(Duration::from_secs(5)).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let missing = gauge(&text, "raftyard_backup_blobs_missing");
        if missing == Some(0.0) {
            return Ok(());
        }
        if Instant::now() > deadline {
            // a full disk explains it (the node waits for space): say so
            let free = gauge(&text, "raftyard_disk_free_bytes")
                .map(|b| format!(" ({} MiB free on its disk)", b as u64 >> 20))
                .unwrap_or_default();
            anyhow::bail!("still missing {missing:?} blobs {} s after healing{free}", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until every node reports the same applied index and state digest twice in a row.
async fn converge(http: &reqwest::Client, nodes: &[(u64, String)], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let mut seen = Vec::new();
        for (_, addr) in nodes {
            let r = http
                .get(format!("http://{addr}/v2/_raftyard/state-digest"))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            let v = match r {
                Ok(r) => r.json::<serde_json::Value>().await.ok(),
                Err(_) => None,
            };
            seen.push(v.map(|v| (v["applied"].as_u64().unwrap_or(0), v["digest"].as_str().unwrap_or("").to_string())));
        }
        let all_same = seen.iter().all(|s| s.is_some() && *s == seen[0]);
        if all_same && last.as_ref() == Some(&seen) {
            return Ok(());
        }
        if Instant::now() > deadline {
            // name the nodes apart from the most common answer
            let mut counts: BTreeMap<&Option<(u64, String)>, usize> = BTreeMap::new();
            for v in &seen {
                *counts.entry(v).or_default() += 1;
            }
            let common = counts.iter().filter(|(v, _)| v.is_some()).max_by_key(|(_, n)| **n).map(|(v, _)| *v);
            let apart: Vec<String> = nodes
                .iter()
                .zip(&seen)
                .filter(|(_, v)| Some(*v) != common || v.is_none())
                .map(|((id, _), v)| match v {
                    Some((applied, d)) => {
                        format!("node {id} at applied {applied} with state {}", &d[..d.len().min(12)])
                    }
                    None => format!("node {id} did not answer"),
                })
                .collect();
            anyhow::bail!("{} (the others: {common:?})", apart.join(", "));
        }
        last = Some(seen);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
