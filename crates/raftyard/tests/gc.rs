//! Online garbage collection over HTTP: a three-node cluster with a backup, images deleted,
//! collections run through `raftyard gc` while pushes continue. Every acknowledged image still
//! pulls digest for digest from every node, and every node's blob files come back to exactly
//! the live set.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// One pushed image: its tag, manifest digest, and blob digests.
#[derive(Debug, Clone)]
struct Pushed {
    repo: String,
    tag: String,
    digest: String,
    blobs: [String; 2],
}

/// Pushes config + layer + manifest of `seed`; a manifest refused because a collection took a
/// blob since it was uploaded (`MANIFEST_BLOB_UNKNOWN`) is pushed again, blobs first, as a
/// client does. Returns the image and how many times it was told to upload again.
async fn push(c: &reqwest::Client, n: &Node, repo: &str, tag: &str, seed: &str) -> (Pushed, u32) {
    let config = format!("{{\"seed\":\"{seed}\"}}").into_bytes();
    let layer = format!("layer of {seed}\n").repeat(100).into_bytes();
    for again in 0..10 {
        let cd = push_blob(c, n, repo, &config).await;
        let ld = push_blob(c, n, repo, &layer).await;
        let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())], serde_json::json!({}));
        let r = put_manifest(c, n, repo, tag, &m, OCI_MANIFEST).await;
        match r.status().as_u16() {
            201 => {
                let p = Pushed { repo: repo.into(), tag: tag.into(), digest: sha256(&m), blobs: [cd, ld] };
                return (p, again);
            }
            400 => assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN"),
            s => panic!("manifest PUT: {s} {}", r.text().await.unwrap()),
        }
    }
    panic!("{repo}:{tag} refused ten times");
}

/// The sha256 digests of the blob files under a node's data directory.
fn files(data: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for sub in std::fs::read_dir(data.join("blobs/sha256")).unwrap() {
        for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            out.insert(format!("sha256:{}", f.unwrap().file_name().to_string_lossy()));
        }
    }
    out
}

/// Makes every blob file of a node look written an hour ago (time passing, for the sweep's
/// minimum age).
fn age_files(data: &Path) {
    for sub in std::fs::read_dir(data.join("blobs/sha256")).unwrap() {
        for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            let f = std::fs::File::options().write(true).open(f.unwrap().path()).unwrap();
            f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600)).unwrap();
        }
    }
}

async fn metric(n: &Node, name: &str) -> Option<f64> {
    let text = client().get(n.url("/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
}

/// Waits until `cond` holds, up to `secs`.
async fn eventually(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn collections_under_pushes_free_every_disk_and_lose_nothing_acknowledged() {
    let cl = Cluster::start(3);
    let leader = cl.leader(Duration::from_secs(20)).await;
    let c = client();
    let dir = tempfile::tempdir().unwrap();
    let (p4, r4) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let extra = Extra { join: true, node: "role = \"backup\"", ..Extra::default() };
    let backup = Node::start_member_with(dir.path(), 4, &r4, &p4, &[], &extra);
    cli(&["cluster", "add-backup", "--node", &cl.nodes[leader].peer, "--id", "4", "--peer", &p4, "--registry", &r4]);
    let all: Vec<&Node> = cl.nodes.iter().chain([&backup]).collect();

    // twenty images, ten of them deleted again
    let mut kept = Vec::new();
    let mut deleted = Vec::new();
    for i in 0..20 {
        let n = &cl.nodes[i % 3];
        let (p, _) = push(&c, n, "gc/app", &format!("t{i}"), &format!("app-{i}")).await;
        if i % 2 == 0 {
            kept.push(p);
        } else {
            let r = c.delete(n.url(&format!("/v2/gc/app/manifests/{}", p.digest))).send().await.unwrap();
            assert_eq!(r.status(), 202);
            deleted.push(p);
        }
    }
    let pushed: BTreeSet<String> = kept.iter().chain(&deleted).flat_map(|p| p.blobs.clone()).collect();
    for n in &all {
        eventually(30, &format!("{} holds every blob", n.addr), || files(&n.data).is_superset(&pushed)).await;
        age_files(&n.data);
    }

    // pushes go on, to every node, while collections run
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let told_again = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let load: Vec<_> = (0..3)
        .map(|k| {
            let nodes: Vec<Node> = cl.nodes.iter().map(|n| Node::remote(&n.addr)).collect();
            let (stop, acked, told_again) = (stop.clone(), acked.clone(), told_again.clone());
            tokio::spawn(async move {
                let c = client();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = &nodes[(k + i) % 3];
                    let (p, again) = push(&c, n, "gc/live", &format!("c{k}-{i}"), &format!("live-{k}-{i}")).await;
                    told_again.fetch_add(again, std::sync::atomic::Ordering::Relaxed);
                    acked.lock().unwrap().push(p);
                    i += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // a dry run names the deleted images' blobs, and removes nothing
    let dry: serde_json::Value =
        serde_json::from_str(&cli(&["gc", "--dry-run", "--grace", "0", "--json", "--node", &cl.nodes[0].peer]))
            .unwrap();
    let listed: BTreeSet<String> =
        dry["link_list"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_string()).collect();
    for p in &deleted {
        for b in &p.blobs {
            assert!(listed.contains(&format!("gc/app@{b}")), "{b} in the dry run: {dry}");
        }
    }
    assert_eq!(dry["links_removed"], 0);
    let r = c.head(cl.nodes[0].url(&format!("/v2/gc/app/blobs/{}", deleted[0].blobs[1]))).send().await.unwrap();
    assert_eq!(r.status(), 200, "a dry run removes nothing");

    // the collection, through a follower, with no grace: racing pushes may be told to upload again
    let follower = (leader + 1) % 3;
    let out = cli(&["gc", "--grace", "0", "--json", "--node", &cl.nodes[follower].peer]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(report["links_removed"].as_u64().unwrap() >= 20, "{report}");
    assert!(report["blobs_removed"].as_u64().unwrap() >= 20, "{report}");
    let human = cli(&["gc", "--grace", "3600", "--node", &cl.nodes[leader].peer]);
    assert!(human.contains("blob links") && human.contains("bytes each node frees"), "{human}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 5, "pushes went on: {}", acked.len());

    // every acknowledged image pulls from every node; the deleted ones' blobs are gone
    let live: Vec<Pushed> = kept.iter().chain(&acked).cloned().collect();
    let applied = cl.nodes[leader].health().await.unwrap()["applied"].as_u64().unwrap();
    for n in &all {
        n.wait_applied(applied, Duration::from_secs(30)).await;
        for p in &live {
            pull_image(&c, n, &p.repo, &p.tag, &p.digest).await;
        }
        for p in &deleted {
            for b in &p.blobs {
                let r = c.head(n.url(&format!("/v2/gc/app/blobs/{b}"))).send().await.unwrap();
                assert_eq!(r.status(), 404, "{b} collected, on {}", n.addr);
            }
        }
    }

    // once the files the racing pushes left are old too, one more collection brings every
    // node's disk back to exactly the live set, the backup's included
    let live_blobs: BTreeSet<String> = live.iter().flat_map(|p| p.blobs.clone()).collect();
    for n in &all {
        eventually(30, &format!("{} holds every live blob", n.addr), || files(&n.data).is_superset(&live_blobs)).await;
        age_files(&n.data);
    }
    cli(&["gc", "--grace", "0", "--node", &cl.nodes[leader].peer]);
    for n in &all {
        eventually(20, &format!("{} swept to the live set", n.addr), || files(&n.data) == live_blobs).await;
        let freed = metric(n, "raftyard_gc_bytes_reclaimed_total").await.unwrap();
        assert!(freed > 0.0, "{} reports what it freed", n.addr);
    }
    eprintln!(
        "{} images acknowledged under collections, {} pushes told to upload again",
        acked.len(),
        told_again.load(std::sync::atomic::Ordering::Relaxed)
    );
}

async fn tags(c: &reqwest::Client, n: &Node, repo: &str) -> Vec<String> {
    let v: serde_json::Value =
        c.get(n.url(&format!("/v2/{repo}/tags/list"))).send().await.unwrap().json().await.unwrap();
    v["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect()
}

/// Retention through the command line: the dry run names exactly what the run removes, every
/// removal is in the journal, and a collection then frees the expired images' blobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_names_what_goes_and_the_run_removes_exactly_that() {
    let cl = Cluster::start(1);
    let n = &cl.nodes[0];
    cl.leader(Duration::from_secs(20)).await;
    let c = client();
    let mut pushed = Vec::new();
    for t in ["v1.0", "a", "b", "c"] {
        pushed.push(push(&c, n, "ci/app", t, &format!("ci-{t}")).await.0);
    }
    let other = push(&c, n, "keep/app", "a", "keep-a").await.0;
    let peer = n.peer.as_str();
    let err =
        cli_fails(&["retention", "set", "--repos", "ci/*", "--keep-last", "1", "--keep-pattern", "(", "--node", peer]);
    assert!(err.contains("keep pattern"), "{err}");
    cli(&["retention", "set", "--repos", "ci/*", "--keep-last", "1", "--keep-pattern", r"^v\d+\.\d+", "--node", peer]);
    let list: serde_json::Value = serde_json::from_str(&cli(&["retention", "list", "--json", "--node", peer])).unwrap();
    assert_eq!(list[0]["repos"], "ci/*");
    assert_eq!(list[0]["keep_last"], 1);

    let dry = cli(&["retention", "run", "--dry-run", "--node", peer]);
    let mut lines: Vec<&str> = dry.lines().collect();
    lines.sort();
    assert_eq!(lines, vec!["ci/app:a", "ci/app:b"], "{dry}");
    assert_eq!(tags(&c, n, "ci/app").await, vec!["a", "b", "c", "v1.0"], "a dry run removes nothing");
    let real = cli(&["retention", "run", "--node", peer]);
    assert_eq!(real, dry, "the run removes what the dry run named");
    assert_eq!(tags(&c, n, "ci/app").await, vec!["c", "v1.0"]);
    assert_eq!(tags(&c, n, "keep/app").await, vec!["a"]);
    let events = c.get(n.url("/v2/_raftyard/events?since=0&limit=10000")).send().await.unwrap().text().await.unwrap();
    assert_eq!(events.matches("\"TagExpired\"").count(), 2, "{events}");

    // the expired images are untagged manifests now: a collection takes them and their blobs
    let report: serde_json::Value =
        serde_json::from_str(&cli(&["gc", "--untagged", "--grace", "0", "--json", "--node", peer])).unwrap();
    assert_eq!(report["manifests_removed"], 2, "{report}");
    assert_eq!(report["blobs_removed"], 4, "{report}");
    for p in &pushed[1..3] {
        for b in &p.blobs {
            let r = c.head(n.url(&format!("/v2/ci/app/blobs/{b}"))).send().await.unwrap();
            assert_eq!(r.status(), 404, "{b}");
        }
    }
    for p in [&pushed[0], &pushed[3], &other] {
        pull_image(&c, n, &p.repo, &p.tag, &p.digest).await;
    }

    cli(&["retention", "remove", "--repos", "ci/*", "--node", peer]);
    assert_eq!(cli(&["retention", "list", "--json", "--node", peer]).trim(), "[]");
    let err = cli_fails(&["retention", "remove", "--repos", "ci/*", "--node", peer]);
    assert!(err.contains("no retention policy"), "{err}");
}
