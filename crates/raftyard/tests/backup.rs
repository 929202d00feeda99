//! The backup node: added to a loaded three-node cluster, it follows the log and fetches every
//! blob, serves pulls, refuses pushes, and reports its lag. Then all three primaries are killed,
//! the backup is recovered into a cluster of one, and every image acknowledged before its lag
//! window is there, digest for digest; the recovered node takes pushes, and a new node joins it.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, RngCore, SeedableRng};

const REPO: &str = "backup/app";

/// An image a client pushed and got a `201` for.
#[derive(Clone)]
struct Acked {
    tag: String,
    digest: String,
    at: Instant,
}

/// One push of a fresh image (config + a 16–256 KiB layer + manifest); `None` on any refusal.
async fn try_push(c: &reqwest::Client, n: &Node, tag: &str, rng: &mut rand::rngs::StdRng) -> Option<String> {
    let mut layer = vec![0u8; rng.gen_range(16 << 10..256 << 10)];
    rng.fill_bytes(&mut layer);
    let config = format!("{{\"tag\":\"{tag}\"}}").into_bytes();
    let mut digests = Vec::new();
    for data in [&config, &layer] {
        let d = sha256(data);
        let r =
            c.post(n.url(&format!("/v2/{REPO}/blobs/uploads/?digest={d}"))).body(data.to_vec()).send().await.ok()?;
        if r.status() != 201 {
            return None;
        }
        digests.push(d);
    }
    let m = image_manifest((&digests[0], config.len()), &[(&digests[1], layer.len())], serde_json::json!({}));
    let r = c
        .put(n.url(&format!("/v2/{REPO}/manifests/{tag}")))
        .header("content-type", OCI_MANIFEST)
        .body(m.clone())
        .send()
        .await
        .ok()?;
    (r.status() == 201).then(|| sha256(&m))
}

/// Pushes to random primaries until `stop`.
async fn pusher(
    k: usize,
    nodes: Vec<Node>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
) -> Vec<Node> {
    let c = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(k as u64);
    let mut i = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        let tag = format!("p{k}-{i}");
        let n = &nodes[rng.gen_range(0..nodes.len())];
        if let Some(digest) = try_push(&c, n, &tag, &mut rng).await {
            acked.lock().unwrap().push(Acked { tag, digest, at: Instant::now() });
        }
    }
    nodes
}

async fn metric(n: &Node, name: &str) -> Option<f64> {
    let text = client().get(n.url("/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_follows_a_loaded_cluster_and_recovers_it_alone() {
    let cl = Cluster::start(3);
    let leader = cl.leader(Duration::from_secs(20)).await;
    let c = client();
    let primaries: Vec<String> = cl.nodes.iter().map(|n| n.addr.clone()).collect();
    let peer0 = cl.nodes[leader].peer.clone();

    // load on the primaries, from 3 clients
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let remotes = |cl: &Cluster| cl.nodes.iter().map(|n| Node::remote(&n.addr)).collect::<Vec<_>>();
    let load: Vec<_> = (0..3).map(|k| tokio::spawn(pusher(k, remotes(&cl), stop.clone(), acked.clone()))).collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_backup = acked.lock().unwrap().len();
    assert!(before_backup > 5, "the load pushed {before_backup} images in 2 s");

    // the backup joins under load
    let dir = tempfile::tempdir().unwrap();
    let (p4, r4) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let extra = Extra { join: true, node: "role = \"backup\"", ..Extra::default() };
    let mut backup = Node::start_member_with(dir.path(), 4, &r4, &p4, &[], &extra);
    let out = cli(&["cluster", "add-backup", "--node", &peer0, "--id", "4", "--peer", &p4, "--registry", &r4]);
    assert!(out.contains("learner"), "{out}");

    // it serves pulls of what was pushed before it joined, and refuses pushes, naming the primaries
    tokio::time::sleep(Duration::from_secs(2)).await;
    let first = acked.lock().unwrap()[0].clone();
    pull_image(&c, &backup, REPO, &first.tag, &first.digest).await;
    let r = c.post(backup.url(&format!("/v2/{REPO}/blobs/uploads/"))).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "DENIED");
    let msg = body["errors"][0]["message"].as_str().unwrap();
    assert!(primaries.iter().all(|p| msg.contains(p.as_str())), "{msg}");
    let r = put_manifest(&c, &backup, REPO, "nope", b"{}", OCI_MANIFEST).await;
    assert_eq!(r.status(), 403);

    // its lag, as figures: in `cluster status` and in /metrics
    tokio::time::sleep(Duration::from_secs(2)).await;
    let st: serde_json::Value = serde_json::from_str(&cli(&["cluster", "status", "--node", &p4, "--json"])).unwrap();
    let me = st["members"].as_array().unwrap().iter().find(|m| m["id"] == 4).expect("backup in status").clone();
    assert_eq!(me["role"], "backup", "{st}");
    let lag = &me["lag"];
    assert_eq!(lag["leader_reachable"], true, "{st}");
    let rpo = lag["rpo_seconds"].as_f64().unwrap();
    assert!(rpo < 2.5, "metadata RPO under a light load on loopback: {rpo} s");
    assert!(lag["entries"].as_u64().unwrap() < 200, "{lag}");
    let m_rpo = metric(&backup, "raftyard_backup_rpo_seconds").await.expect("rpo metric");
    assert!(m_rpo < 2.5, "{m_rpo}");
    assert!(metric(&backup, "raftyard_backup_blobs_missing").await.is_some());
    let human = cli(&["cluster", "status", "--node", &p4]);
    assert!(human.contains("backup 4:") && human.contains("RPO"), "{human}");

    // a failover first, so that the log the backup holds is past term 1 when it is recovered
    let mut cl = cl;
    cl.nodes[leader].kill9();
    let new_leader = cl.leader(Duration::from_secs(20)).await;
    cl.nodes[leader].spawn();
    let term = cl.nodes[new_leader].health().await.and_then(|h| h["term"].as_u64()).unwrap();
    assert!(term > 1, "term {term} after the leader kill");
    tokio::time::sleep(Duration::from_secs(1)).await;

    // all three primaries die at once, under load
    let rpo_at_kill = metric(&backup, "raftyard_backup_rpo_seconds").await.unwrap();
    let blob_rpo_at_kill = metric(&backup, "raftyard_backup_blob_rpo_seconds").await.unwrap();
    let killed_at = Instant::now();
    for n in &mut cl.nodes {
        n.kill9();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        let _ = l.await;
    }
    let acked = acked.lock().unwrap().clone();
    eprintln!("{} images acknowledged; RPO at the kill {rpo_at_kill} s (blobs {blob_rpo_at_kill} s)", acked.len());

    // the backup keeps serving pulls, from its own state
    pull_image(&c, &backup, REPO, &first.tag, &first.digest).await;

    // recover: stop it, make it the only voter, start it on the same config
    assert!(backup.terminate().success());
    let out = cli(&["cluster", "recover", "--data-dir", backup.data.to_str().unwrap()]);
    assert!(out.contains("only voter"), "{out}");
    backup.spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    while backup.health().await.and_then(|h| h["leader"].as_u64()) != Some(4) {
        assert!(Instant::now() < deadline, "the recovered node did not elect itself");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // every image acknowledged before the lag window is there, digest for digest (the window:
    // the RPO measured up to a second before the kill, plus that second)
    let window = Duration::from_secs_f64(rpo_at_kill.max(blob_rpo_at_kill) + 1.0);
    let (mut checked, mut late_present, mut late_missing) = (0, 0, 0);
    for a in &acked {
        let must = a.at + window <= killed_at;
        if must {
            pull_image(&c, &backup, REPO, &a.tag, &a.digest).await;
            checked += 1;
        } else {
            let r = c.head(backup.url(&format!("/v2/{REPO}/manifests/{}", a.tag))).send().await.unwrap();
            if r.status() == 200 {
                late_present += 1;
            } else {
                late_missing += 1;
            }
        }
    }
    eprintln!("{checked} images verified; within the window: {late_present} present, {late_missing} missing");
    assert!(checked > before_backup, "images pushed after the backup joined were verified too");

    // the recovered cluster is writable
    let d = push_image(&c, &backup, REPO, "after-recovery", b"after").await;
    pull_image(&c, &backup, REPO, "after-recovery", &d).await;

    // and a new node joins it, as a voter, and gets everything
    let (p5, r5) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let n5 = Node::start_member(dir.path(), 5, &r5, &p5, &[], true);
    let out = cli(&["cluster", "add", "--node", &p4, "--id", "5", "--peer", &p5, "--registry", &r5]);
    assert!(out.contains("voter"), "{out}");
    pull_image(&c, &n5, REPO, "after-recovery", &d).await;
    pull_image(&c, &n5, REPO, &first.tag, &first.digest).await;
}

/// A backup on another network: every byte between it and the primaries (Raft, blob fetches,
/// lag measurements) goes through the tunnel relay's `peer-<id>` services, with mutual TLS end
/// to end; the primaries reach it the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_peer_traffic_goes_through_the_relay_with_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let certs_s = certs.to_str().unwrap().to_string();
    cli(&["certs", "cluster", "--node", "n1", "--node", "n2", "--node", "n3", "--node", "n4", "--out", &certs_s]);
    let relay = RelayProc::start_with(&dir.path().join("relay"), 4, true);
    let tls = |id: u64| peer_tls_section(&certs, id);
    let (p4, r4) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    // the primaries reach the backup's peer port only through the relay
    let via_relay = |addrs: &[(String, u64)]| {
        let pairs: Vec<String> =
            addrs.iter().map(|(a, id)| format!("\"{a}\" = \"{}\"", relay.services[&format!("peer-{id}")])).collect();
        format!("dial_via = {{ {} }}\n", pairs.join(", "))
    };
    let to_backup = via_relay(&[(p4.clone(), 4)]);
    let cl = Cluster::start_configured(3, "", |id| {
        format!("{to_backup}{}[tunnel]\npeer_service = true\n{}", tls(id), relay.link(id))
    });
    let leader = cl.leader(Duration::from_secs(20)).await;
    let c = client();
    let first = push_image(&c, &cl.nodes[leader], REPO, "before", b"before").await;

    let to_primaries =
        via_relay(&cl.nodes.iter().enumerate().map(|(i, n)| (n.peer.clone(), i as u64 + 1)).collect::<Vec<_>>());
    let cluster_extra = format!("{to_primaries}{}[tunnel]\npeer_service = true\n{}", tls(4), relay.link(4));
    let extra = Extra { join: true, node: "role = \"backup\"", cluster: &cluster_extra, ..Extra::default() };
    let backup = Node::start_member_with(dir.path(), 4, &r4, &p4, &[], &extra);
    let tls_dir = certs.join("n1");
    let tls_dir = tls_dir.to_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let st = loop {
        let st = relay.status().await;
        // registry-1..4 and peer-1..4: one agent each
        let up = st["services"].as_array().unwrap().iter().filter(|s| s["live_agents"] == 1).count();
        if up == 8 {
            break st;
        }
        assert!(Instant::now() < deadline, "agents not all up: {st:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // a backup does not serve the shared endpoint: pushes through it must reach a primary
    let shared = st["services"].as_array().unwrap().iter().find(|s| s["name"] == "registry").unwrap().clone();
    assert_eq!(shared["live_agents"], 3, "{shared}");

    let out = cli(&[
        "cluster",
        "add-backup",
        "--tls-dir",
        tls_dir,
        "--node",
        &cl.nodes[leader].peer,
        "--id",
        "4",
        "--peer",
        &p4,
        "--registry",
        &r4,
    ]);
    assert!(out.contains("learner"), "{out}");
    // a 16–256 KiB layer: the backup fetches it through the relay
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let second = try_push(&c, &cl.nodes[leader], "after", &mut rng).await.expect("push to a primary");
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&backup, "raftyard_backup_blobs_missing").await != Some(0.0)
        || metric(&backup, "raftyard_backup_leader_reachable").await != Some(1.0)
        || c.head(backup.url(&format!("/v2/{REPO}/manifests/after"))).send().await.unwrap().status() != 200
    {
        assert!(Instant::now() < deadline, "the backup did not catch up through the relay");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // it has the blobs themselves (pulls on a backup do not go to the primaries for a tag)
    pull_image(&c, &backup, REPO, "before", &first).await;
    pull_image(&c, &backup, REPO, "after", &second).await;

    // and the bytes went through the relay's peer services, both ways
    let st = relay.status().await;
    let bytes = |name: &str| {
        let s = st["services"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap();
        s["bytes_in"].as_u64().unwrap() + s["bytes_out"].as_u64().unwrap()
    };
    assert!(bytes("peer-4") > 0, "primaries → backup through the relay: {st:#}");
    let to_primaries: u64 = (1..=3).map(|i| bytes(&format!("peer-{i}"))).sum();
    assert!(to_primaries > 16 << 10, "backup → primaries through the relay (blobs): {to_primaries} bytes");
}

fn backup_record(dir: &std::path::Path) -> serde_json::Value {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("raftyard-backup.json")).unwrap()).unwrap();
    m["snapshots"].as_array().unwrap().last().unwrap().clone()
}

/// `raftyard backup create` on a running cluster (incremental on the second run), `verify`
/// (and a corrupted blob caught), `restore --data-dir` seeding a node (its metadata compressed)
/// that serves everything, and `restore --repo` pushing one repository into another registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn online_backup_create_verify_restore() {
    let mut cl = Cluster::start(3);
    let first_leader = cl.leader(Duration::from_secs(20)).await;
    let c = client();
    let a = push_image(&c, &cl.nodes[first_leader], REPO, "a", b"image-a").await;
    // a failover first, so that the snapshot's term is past the one a fresh node starts in
    cl.nodes[first_leader].kill9();
    let leader = cl.leader(Duration::from_secs(20)).await;
    cl.nodes[first_leader].spawn();
    let term = cl.nodes[leader].health().await.and_then(|h| h["term"].as_u64()).expect("term in health");
    assert!(term > 1, "a new leader after the kill: term {term}");
    let other = push_image(&c, &cl.nodes[(leader + 1) % 3], "backup/other", "x", b"other").await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("backup");
    let out_s = out.to_str().unwrap();
    // from a follower: its snapshot still holds every acknowledged write
    let follower = &cl.nodes[(leader + 2) % 3];
    let said = cli(&["backup", "create", "--node", &follower.peer, "--out", out_s]);
    assert!(said.contains("4 blobs"), "{said}");
    let first = backup_record(&out);
    assert_eq!((first["blobs"].as_u64(), first["copied_blobs"].as_u64()), (Some(4), Some(4)), "{first}");

    // incremental: only the new image's two blobs are copied
    let b = push_image(&c, &cl.nodes[leader], REPO, "b", b"image-b").await;
    cli(&["backup", "create", "--node", &follower.peer, "--out", out_s]);
    let second = backup_record(&out);
    assert_eq!((second["blobs"].as_u64(), second["copied_blobs"].as_u64()), (Some(6), Some(2)), "{second}");
    assert!(second["index"].as_u64() > first["index"].as_u64());
    let said = cli(&["backup", "verify", out_s]);
    assert!(said.contains("intact"), "{said}");

    // a new node seeded from it serves everything, as a cluster of one that takes pushes
    let data = dir.path().join("restored");
    let (p, r) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let said = cli(&[
        "backup",
        "restore",
        out_s,
        "--data-dir",
        data.to_str().unwrap(),
        "--peer",
        &p,
        "--registry",
        &r,
        "--compress-metadata",
    ]);
    assert!(said.contains("only voter"), "{said}");
    let conf = String::from_utf8_lossy(&std::fs::read(data.join("meta/conf")).unwrap()).into_owned();
    assert!(conf.contains("use_compression: true"), "{conf}");
    let mut n = Node::start_with(&data, &[]);
    pull_image(&c, &n, REPO, "a", &a).await;
    pull_image(&c, &n, REPO, "b", &b).await;
    pull_image(&c, &n, "backup/other", "x", &other).await;
    // it commits writes: its log moved past the snapshot's term
    let pushed = tokio::time::timeout(Duration::from_secs(20), push_image(&c, &n, REPO, "c", b"image-c")).await;
    let c_digest = pushed.expect("a push to the restored node is acknowledged");
    pull_image(&c, &n, REPO, "c", &c_digest).await;
    n.kill9();

    // one repository into another registry; again: nothing to push
    let fresh = Node::start(&dir.path().join("fresh"));
    let to = format!("http://{}", fresh.addr);
    let said = cli(&["backup", "restore", out_s, "--repo", REPO, "--to", &to]);
    assert!(said.contains("4 blobs (4 pushed"), "{said}");
    pull_image(&c, &fresh, REPO, "a", &a).await;
    pull_image(&c, &fresh, REPO, "b", &b).await;
    let r = c.get(fresh.url("/v2/backup/other/manifests/x")).send().await.unwrap();
    assert_eq!(r.status(), 404, "only the chosen repository");
    let said = cli(&["backup", "restore", out_s, "--repo", REPO, "--to", &to]);
    assert!(said.contains("(0 pushed"), "{said}");

    // a damaged blob is caught by verify, and restore refuses to seed from it
    let blob = walk_files(&out.join("blobs")).into_iter().next().expect("a blob file");
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let err = cli_fails(&["backup", "verify", out_s]);
    assert!(err.contains("corrupt"), "{err}");
    let err = cli_fails(&["backup", "restore", out_s, "--data-dir", dir.path().join("again").to_str().unwrap()]);
    assert!(err.contains("damaged"), "{err}");
}

fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// `cluster.fetch_limit_mib_per_sec` on a backup: 4 MiB of new blobs at 1 MiB/s take about
/// four seconds to arrive (unlimited, well under one; the lag is measured once a second), and
/// they all do.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_fetches_within_its_bandwidth_limit() {
    let cl = Cluster::start(1);
    cl.leader(Duration::from_secs(20)).await;
    let c = client();
    let dir = tempfile::tempdir().unwrap();
    let (p2, r2) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let extra =
        Extra { join: true, node: "role = \"backup\"", cluster: "fetch_limit_mib_per_sec = 1\n", ..Extra::default() };
    let backup = Node::start_member_with(dir.path(), 2, &r2, &p2, &[], &extra);
    // node 1 was started with a free peer port; ask it for its address
    let st: serde_json::Value =
        serde_json::from_str(&cli(&["cluster", "status", "--node", &cl.nodes[0].peer, "--json"]))
            .unwrap_or_else(|_| panic!("status of {}", cl.nodes[0].peer));
    assert_eq!(st["leader"], 1);
    cli(&["cluster", "add-backup", "--node", &cl.nodes[0].peer, "--id", "2", "--peer", &p2, "--registry", &r2]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut data = vec![0u8; 4 << 20];
    rng.fill_bytes(&mut data);
    push_blob(&c, &cl.nodes[0], REPO, &data).await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    loop {
        if metric(&backup, "raftyard_backup_blobs_missing").await == Some(0.0) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the backup never fetched the blob");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(3200), "4 MiB at 1 MiB/s arrived in {took:?}");
    let r = c.get(backup.url(&format!("/v2/{REPO}/blobs/{}", sha256(&data)))).send().await.unwrap();
    assert_eq!(sha256(&r.bytes().await.unwrap()), sha256(&data));
}

/// A backup that comes back after the journal was trimmed past what it had looked at (it was
/// paused while the cluster wrote, then applied the writes and their trims in one burst) still
/// fetches every blob written meanwhile: its repair index cannot learn of them from the
/// journal, so it looks at every placement again. A backup gets blobs only through repair, and
/// it is checked on its disk, not through reads (a read would fetch the blob itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_behind_a_journal_trim_still_fetches_every_blob() {
    let cl = Cluster::start_with(1, "journal_keep_entries = 10\njournal_trim_interval_secs = 1\n");
    cl.leader(Duration::from_secs(20)).await;
    let c = client();
    let dir = tempfile::tempdir().unwrap();
    let (p2, r2) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let extra = Extra { join: true, node: "role = \"backup\"", ..Extra::default() };
    let mut backup = Node::start_member_with(dir.path(), 2, &r2, &p2, &[], &extra);
    cli(&["cluster", "add-backup", "--node", &cl.nodes[0].peer, "--id", "2", "--peer", &p2, "--registry", &r2]);
    push_blob(&c, &cl.nodes[0], REPO, b"before the pause").await;
    let before = cl.nodes[0].health().await.unwrap()["applied"].as_u64().unwrap();
    backup.wait_applied(before, Duration::from_secs(20)).await;
    let started = Instant::now();
    while metric(&backup, "raftyard_backup_blobs_missing").await != Some(0.0) {
        assert!(started.elapsed() < Duration::from_secs(20), "the backup never fetched the first blob");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let pid = backup.pid() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let mut blobs = Vec::new();
    for i in 0..30 {
        blobs.push(
            push_blob(&c, &cl.nodes[0], REPO, format!("written while the backup was away: {i}").as_bytes()).await,
        );
    }
    // the journal no longer holds what the backup last looked at
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let first = cl.nodes[0].health().await.unwrap()["journal_first"].as_u64().unwrap_or(0);
        if first > before + 20 {
            break;
        }
        if Instant::now() > deadline {
            unsafe { libc::kill(pid, libc::SIGCONT) };
            panic!("no trim past index {before}: journal_first {first}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    unsafe { libc::kill(pid, libc::SIGCONT) };

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lacking = blobs.iter().filter(|d| !blob_path(&backup.data, d).exists()).count();
        let missing = metric(&backup, "raftyard_backup_blobs_missing").await;
        if lacking == 0 && missing == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the backup lacks {lacking} of the {} blobs written while it was away, and reports {missing:?} missing",
            blobs.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    backup.kill9();
}
