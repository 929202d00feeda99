//! A real three-node cluster of `raftyard` processes on loopback: push to a follower, pull from
//! another node, `kill -9` of the leader under traffic, restart and catch-up, membership
//! changes through `raftyard cluster`.

mod common;

use futures::StreamExt as _;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_push_anywhere_survive_leader_loss_and_change_membership() {
    let mut cl = Cluster::start(3);
    let c = client();
    let leader = cl.leader(Duration::from_secs(20)).await;
    eprintln!("leader is node {}", leader + 1);
    let f1 = (leader + 1) % 3;
    let f2 = (leader + 2) % 3;

    // push through a follower, read through the other follower at once
    let mut pushed = Vec::new();
    for i in 0..5 {
        let tag = format!("v{i}");
        let d = push_image(&c, &cl.nodes[f1], "team/app", &tag, format!("seed-{i}").as_bytes()).await;
        pull_image(&c, &cl.nodes[f2], "team/app", &tag, &d).await;
        pushed.push((tag, d));
    }
    // uploads were streamed to both peers while they arrived: every blob was committed with
    // three placements at once
    let journal = c.get(cl.nodes[f2].url("/v2/_raftyard/events?since=0")).send().await.unwrap().text().await.unwrap();
    let mut linked = 0;
    for line in journal.lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        let events = e["events"].as_array().unwrap();
        if events[0]["type"] == "BlobLinked" {
            linked += 1;
            let placed: Vec<u64> =
                events.iter().filter(|v| v["type"] == "BlobPlaced").map(|v| v["node"].as_u64().unwrap()).collect();
            assert_eq!(placed.len(), 3, "placements at commit: {e}");
        }
    }
    assert_eq!(linked, 10);
    let tags: serde_json::Value =
        c.get(cl.nodes[leader].url("/v2/team/app/tags/list")).send().await.unwrap().json().await.unwrap();
    assert_eq!(tags["tags"].as_array().unwrap().len(), 5);

    // status from the CLI
    let st: serde_json::Value =
        serde_json::from_str(&cli(&["cluster", "status", "--node", &cl.nodes[f2].peer, "--json"])).unwrap();
    assert_eq!(st["leader"], (leader + 1) as u64);
    let members = st["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    assert!(members.iter().all(|m| m["reachable"] == true && m["role"] == "voter"), "{st}");

    // kill -9 the leader while a writer pushes through a follower; measure the gap
    let writer_node = cl.nodes[f1].url("");
    let writer = tokio::spawn(async move {
        let c = client();
        let mut acked = Vec::new();
        let mut failures_since = None::<Instant>;
        let mut longest_gap = Duration::ZERO;
        let start = Instant::now();
        let mut i = 0;
        while start.elapsed() < Duration::from_secs(8) {
            let data = format!("during-failover-{i}").into_bytes();
            let d = sha256(&data);
            let ok = c
                .post(format!("{writer_node}/v2/failover/blobs/uploads/?digest={d}"))
                .body(data)
                .timeout(Duration::from_secs(15))
                .send()
                .await
                .map(|r| r.status() == 201)
                .unwrap_or(false);
            if ok {
                if let Some(t) = failures_since.take() {
                    longest_gap = longest_gap.max(t.elapsed());
                }
                acked.push(d);
            } else if failures_since.is_none() {
                failures_since = Some(Instant::now());
            }
            i += 1;
        }
        (acked, longest_gap)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = Instant::now();
    cl.nodes[leader].kill9();
    eprintln!("killed leader node {}", leader + 1);
    let new_leader = cl.leader(Duration::from_secs(10)).await;
    let election = killed_at.elapsed();
    assert_ne!(new_leader, leader);
    // a push right after the election
    let d = push_image(&c, &cl.nodes[f2], "team/app", "after", b"after-failover").await;
    let write_gap = killed_at.elapsed();
    eprintln!(
        "new leader node {} after {election:?}; first push acknowledged {write_gap:?} after the kill",
        new_leader + 1
    );
    assert!(write_gap < Duration::from_secs(5), "writes resumed only after {write_gap:?}");
    let (acked, longest_gap) = writer.await.unwrap();
    eprintln!("writer: {} blobs acknowledged, longest unavailability {longest_gap:?}", acked.len());
    assert!(!acked.is_empty());

    // every acknowledged write is on both survivors
    for n in [f1, f2] {
        for (tag, digest) in &pushed {
            pull_image(&c, &cl.nodes[n], "team/app", tag, digest).await;
        }
        pull_image(&c, &cl.nodes[n], "team/app", "after", &d).await;
        for b in &acked {
            let r = c.get(cl.nodes[n].url(&format!("/v2/failover/blobs/{b}"))).send().await.unwrap();
            assert_eq!(r.status(), 200, "acknowledged blob {b} missing on node {}", n + 1);
        }
    }

    // the killed node restarts and catches up
    cl.nodes[leader].spawn();
    let target = cl.nodes[new_leader].health().await.unwrap()["applied"].as_u64().unwrap();
    cl.nodes[leader].wait_applied(target, Duration::from_secs(20)).await;
    pull_image(&c, &cl.nodes[leader], "team/app", "after", &d).await;

    // a fourth node joins as a learner, catches up, becomes a voter; then it is removed
    let dir4 = tempfile::tempdir().unwrap();
    let (p4, r4) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let n4 = Node::start_member(dir4.path(), 4, &r4, &p4, &[], true);
    let out = cli(&["cluster", "add", "--node", &cl.nodes[f1].peer, "--id", "4", "--peer", &p4, "--registry", &r4]);
    assert!(out.contains("voter"), "{out}");
    pull_image(&c, &n4, "team/app", "v0", &pushed[0].1).await;
    let st: serde_json::Value = serde_json::from_str(&cli(&["cluster", "status", "--node", &p4, "--json"])).unwrap();
    assert_eq!(st["members"].as_array().unwrap().len(), 4);
    cli(&["cluster", "remove", "--node", &cl.nodes[f2].peer, "--id", "4"]);
    let st: serde_json::Value =
        serde_json::from_str(&cli(&["cluster", "status", "--node", &cl.nodes[f2].peer, "--json"])).unwrap();
    assert_eq!(st["members"].as_array().unwrap().len(), 3, "{st}");
}

/// SIGTERM on the leader hands leadership to an up-to-date follower before the node drains:
/// the followers know the new leader at once (an election on timeouts alone takes at least the
/// leader lease of 600 ms after the old leader's Raft stops, which is after its 2 s drain), and
/// a writer pushing through a follower meanwhile sees no failure and no long gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_of_the_leader_hands_leadership_over_without_a_write_gap() {
    let mut cl = Cluster::start(3);
    let leader = cl.leader(Duration::from_secs(20)).await;
    let (f1, f2) = ((leader + 1) % 3, (leader + 2) % 3);
    let writer_node = cl.nodes[f1].url("");
    let stop_writer = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn({
        let stop = stop_writer.clone();
        async move {
            let c = client();
            let (mut acked, mut failed, mut longest_gap, mut last_ok) = (0, 0, Duration::ZERO, Instant::now());
            let mut i = 0;
            while !stop.is_cancelled() {
                let data = format!("during-hand-over-{i}").into_bytes();
                let d = sha256(&data);
                let r = c
                    .post(format!("{writer_node}/v2/handover/blobs/uploads/?digest={d}"))
                    .body(data)
                    .timeout(Duration::from_secs(15))
                    .send()
                    .await;
                match r.map(|r| r.status().as_u16()) {
                    Ok(201) => {
                        acked += 1;
                        longest_gap = longest_gap.max(last_ok.elapsed());
                        last_ok = Instant::now();
                    }
                    other => {
                        eprintln!("push {i} failed: {other:?}");
                        failed += 1;
                    }
                }
                i += 1;
            }
            (acked, failed, longest_gap)
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let signalled = Instant::now();
    unsafe { libc::kill(cl.nodes[leader].pid() as i32, libc::SIGTERM) };
    let old = (leader + 1) as u64;
    let handed_to = loop {
        let (a, b) = (cl.nodes[f1].health().await, cl.nodes[f2].health().await);
        let (a, b) = (a.and_then(|h| h["leader"].as_u64()), b.and_then(|h| h["leader"].as_u64()));
        if let (Some(a), Some(b)) = (a, b) {
            if a == b && a != old {
                break a;
            }
        }
        assert!(signalled.elapsed() < Duration::from_secs(10), "no new leader after the leader's SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let took = signalled.elapsed();
    eprintln!("node {handed_to} leads {took:?} after node {old} was told to stop");
    assert!(took < Duration::from_millis(500), "the followers knew the new leader only after {took:?}");
    let status = cl.nodes[leader].wait_exit(Duration::from_secs(60)).expect("the old leader exits");
    assert!(status.success(), "{status:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_writer.cancel();
    let (acked, failed, longest_gap) = writer.await.unwrap();
    eprintln!("writer: {acked} pushes acknowledged, {failed} failed, longest gap {longest_gap:?}");
    assert_eq!(failed, 0);
    assert!(acked > 0);
    assert!(longest_gap < Duration::from_millis(500), "writes stopped for {longest_gap:?}");
    let log = std::fs::read_to_string(&cl.nodes[leader].log).unwrap();
    assert!(log.contains("leadership handed over"), "{log}");
}

/// A follower that was down while the log moved past what the leader keeps catches up from a
/// snapshot (manifests, tags, journal), then fetches the blobs it lacks from its peers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_follower_catches_up_from_a_snapshot() {
    let mut cl = Cluster::start_with(3, "snapshot_every = 20\nkeep_logs = 0");
    let c = client();
    let leader = cl.leader(Duration::from_secs(20)).await;
    let lagging = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    push_image(&c, &cl.nodes[leader], "snap/app", "before", b"before").await;
    let applied_at_stop = cl.nodes[lagging].health().await.unwrap()["applied"].as_u64().unwrap();
    cl.nodes[lagging].kill9();
    eprintln!("node {} stopped at applied index {applied_at_stop}", lagging + 1);
    let mut pushed = Vec::new();
    for i in 0..30 {
        let tag = format!("t{i}");
        pushed
            .push((tag.clone(), push_image(&c, &cl.nodes[other], "snap/app", &tag, format!("s{i}").as_bytes()).await));
    }
    // the leader has taken a snapshot and purged the log behind it
    let deadline = Instant::now() + Duration::from_secs(10);
    let h = loop {
        let h = cl.nodes[leader].health().await.unwrap();
        let purged = h["purged"].as_u64().unwrap_or(0);
        if purged > applied_at_stop {
            break h;
        }
        assert!(Instant::now() < deadline, "the leader still has the log the lagging node needs: {h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("leader health: {h}");
    cl.nodes[lagging].spawn();
    cl.nodes[lagging].wait_applied(h["applied"].as_u64().unwrap(), Duration::from_secs(30)).await;
    let log = std::fs::read_to_string(&cl.nodes[lagging].log).unwrap();
    assert!(log.contains("install") || log.contains("snapshot"), "expected a snapshot install in the log");
    // the repair worker fetches the blobs it missed, without any read asking for them
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st: serde_json::Value =
            serde_json::from_str(&cli(&["cluster", "status", "--node", &cl.nodes[lagging].peer, "--json"])).unwrap();
        let me = st["members"].as_array().unwrap().iter().find(|m| m["id"] == (lagging + 1) as u64).unwrap().clone();
        if me["blobs_missing"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "blobs still missing on the lagging node: {me}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (tag, d) in &pushed {
        pull_image(&c, &cl.nodes[lagging], "snap/app", tag, d).await;
    }
    // the journal came with the snapshot
    let text = c
        .get(cl.nodes[lagging].url("/v2/_raftyard/events?since=0&limit=10000"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.lines().count() >= 60, "journal on the caught-up node: {} entries", text.lines().count());
}

/// A node joining a registry of many blobs records their placements as it fetches them, in
/// proposals of at most 256: one entry with every placement (100,000 of them for a backup
/// joining a large registry) took the leader longer to commit than its followers waited
/// before electing another, for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_joining_node_records_its_blobs_in_bounded_proposals() {
    use futures::StreamExt as _;
    const BLOBS: usize = 700;
    let cl = Cluster::start(3);
    let c = client();
    let leader = cl.leader(Duration::from_secs(20)).await;
    let pushed: Vec<String> = futures::stream::iter(0..BLOBS)
        .map(|i| {
            let (c, n) = (c.clone(), &cl.nodes[leader]);
            async move { push_blob(&c, n, "many/blobs", format!("blob-{i}").as_bytes()).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert_eq!(pushed.len(), BLOBS);

    let dir4 = tempfile::tempdir().unwrap();
    let (p4, r4) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let n4 = Node::start_member(dir4.path(), 4, &r4, &p4, &[], true);
    cli(&["cluster", "add", "--node", &cl.nodes[leader].peer, "--id", "4", "--peer", &p4, "--registry", &r4]);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let st: serde_json::Value =
            serde_json::from_str(&cli(&["cluster", "status", "--node", &p4, "--json"])).unwrap();
        let me = st["members"].as_array().unwrap().iter().find(|m| m["id"] == 4).cloned().unwrap_or_default();
        if me["blobs_missing"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "blobs still missing on the new node: {me}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // every placement of node 4 is in the journal, in entries of at most 256
    let deadline = Instant::now() + Duration::from_secs(30);
    let sizes = loop {
        let text =
            c.get(n4.url("/v2/_raftyard/events?since=0&limit=100000")).send().await.unwrap().text().await.unwrap();
        let sizes: Vec<usize> = text
            .lines()
            .map(|l| {
                let e: serde_json::Value = serde_json::from_str(l).unwrap();
                e["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|ev| ev["type"] == "BlobPlaced" && ev["node"] == 4)
                    .count()
            })
            .filter(|n| *n > 0)
            .collect();
        if sizes.iter().sum::<usize>() >= BLOBS {
            break sizes;
        }
        assert!(Instant::now() < deadline, "placements of node 4 in the journal: {sizes:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("node 4's placements by entry: {sizes:?}");
    assert!(sizes.iter().all(|n| *n <= 256), "a proposal of more than 256 placements: {sizes:?}");
    assert!(sizes.len() >= BLOBS.div_ceil(256), "{sizes:?}");
    for d in pushed.iter().take(20) {
        let r = c.head(n4.url(&format!("/v2/many/blobs/blobs/{d}"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "{d} on node 4");
    }
}

/// A node that holds a blob its placement is not recorded for (it stopped between fetching the
/// blob and proposing the placement) records it when it starts again: its missing index sees
/// the file, so no repair would ever fetch it, and without the record no other node would
/// count it as a holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_records_blobs_it_holds_unrecorded_when_it_starts() {
    let mut cl = Cluster::start(3);
    let c = client();
    let leader = cl.leader(Duration::from_secs(20)).await;
    let down = (0..3).find(|i| *i != leader).unwrap();
    let id = (down + 1) as u64;
    cl.nodes[down].kill9();
    let d = push_blob(&c, &cl.nodes[leader], "un/recorded", b"fetched, then the node stopped").await;
    // the file where a fetch puts it, as if the node had stopped before recording it
    let path = |n: &Node| blob_path(&n.data, &d);
    std::fs::create_dir_all(path(&cl.nodes[down]).parent().unwrap()).unwrap();
    std::fs::copy(path(&cl.nodes[leader]), path(&cl.nodes[down])).unwrap();
    cl.nodes[down].spawn();

    let placed = |text: &str| {
        text.lines().any(|l| {
            let e: serde_json::Value = serde_json::from_str(l).unwrap();
            e["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|ev| ev["type"] == "BlobPlaced" && ev["node"] == id && ev["digest"] == d.as_str())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.get(cl.nodes[leader].url("/v2/_raftyard/events?since=0&limit=100000")).send().await.unwrap();
        if placed(&r.text().await.unwrap()) {
            break;
        }
        assert!(Instant::now() < deadline, "node {id}'s placement of {d} was never recorded");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One upload whose requests land on three different nodes (as through a load balancer): the
/// session lives on the node that started it, and the others stream the requests to it. When
/// the owner is gone, the session is unknown everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upload_requests_on_other_nodes_are_streamed_to_the_owner() {
    let mut cl = Cluster::start(3);
    let c = client();
    cl.leader(Duration::from_secs(20)).await;
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
    let d = sha256(&data);
    let r = c.post(cl.nodes[0].url("/v2/lb/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    // first chunk through node 2, status through node 3, second chunk through node 3, close through node 2
    let r = c
        .patch(cl.nodes[1].url(&loc))
        .header("content-range", "0-999999")
        .body(data[..1_000_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    assert_eq!(r.headers()["range"], "0-999999");
    let r = c.get(cl.nodes[2].url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["range"], "0-999999");
    // an out-of-order chunk through a non-owner gets the owner's 416
    let r = c.patch(cl.nodes[2].url(&loc)).header("content-range", "5-10").body(vec![0u8; 6]).send().await.unwrap();
    assert_eq!(r.status(), 416);
    let r = c.patch(cl.nodes[2].url(&loc)).body(data[1_000_000..2_000_000].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = c.put(cl.nodes[1].url(&format!("{loc}?digest={d}"))).body(data[2_000_000..].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    for n in &cl.nodes {
        let r = c.get(n.url(&format!("/v2/lb/app/blobs/{d}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(sha256(&r.bytes().await.unwrap()), d);
    }
    // a final PUT cut off mid-body on a non-owner: the owner sees a broken body, not a short
    // one taken for complete, so the session survives with what arrived and the upload goes on
    let r = c.post(cl.nodes[0].url("/v2/lb/app/blobs/uploads/")).send().await.unwrap();
    let cut = r.headers()["location"].to_str().unwrap().to_string();
    let head = bytes::Bytes::from(data[..200_000].to_vec());
    let broken = futures::stream::iter([Ok::<_, std::io::Error>(head)]).chain(futures::stream::once(async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        Err(std::io::Error::other("client cut off"))
    }));
    let r = c.put(cl.nodes[1].url(&format!("{cut}?digest={d}"))).body(reqwest::Body::wrap_stream(broken)).send().await;
    assert!(r.as_ref().map_or(true, |r| r.status() != 201), "{r:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        // (busy while the owner still takes in the broken request)
        let r = c.get(cl.nodes[0].url(&cut)).send().await.unwrap();
        let (status, range) = (r.status(), r.headers().get("range").cloned());
        let body = r.text().await.unwrap();
        assert!(status == 204 || body.contains("another request"), "the session lives on: {status} {body}");
        if range.as_ref().is_some_and(|r| r == "0-199999") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status} {body} {range:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = c.put(cl.nodes[2].url(&format!("{cut}?digest={d}"))).body(data[200_000..].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());

    // the owner dies: its sessions are unknown on the other nodes
    let r = c.post(cl.nodes[0].url("/v2/lb/app/blobs/uploads/")).send().await.unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    cl.nodes[0].kill9();
    let r = c.patch(cl.nodes[1].url(&loc)).body(vec![1u8; 10]).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
}

/// Peer ports with mutual TLS: the cluster works through them (forwarded writes, replicated
/// blobs, read indexes), and a client without a certificate of the cluster's CA is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peer_port_with_mutual_tls() {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path().to_str().unwrap().to_string();
    cli(&["certs", "cluster", "--node", "n1", "--node", "n2", "--node", "n3", "--out", &dir]);
    let cl = Cluster::start_tls(3, certs.path());
    let c = client();
    let leader = cl.leader(Duration::from_secs(20)).await;
    let (a, b) = ((leader + 1) % 3, (leader + 2) % 3);
    let d = push_image(&c, &cl.nodes[a], "tls/app", "v1", b"over mtls").await;
    pull_image(&c, &cl.nodes[b], "tls/app", "v1", &d).await;
    let tls_dir = format!("{dir}/n1");
    let st: serde_json::Value = serde_json::from_str(&cli(&[
        "cluster",
        "status",
        "--node",
        &cl.nodes[a].peer,
        "--json",
        "--tls-dir",
        &tls_dir,
    ]))
    .unwrap();
    assert!(st["members"].as_array().unwrap().iter().all(|m| m["reachable"] == true), "{st}");
    // no certificate, or one from another CA: refused
    cli_fails(&["cluster", "status", "--node", &cl.nodes[a].peer]);
    let other = tempfile::tempdir().unwrap();
    let other_dir = other.path().to_str().unwrap().to_string();
    cli(&["certs", "cluster", "--node", "n1", "--out", &other_dir]);
    cli_fails(&["cluster", "status", "--node", &cl.nodes[a].peer, "--tls-dir", &format!("{other_dir}/n1")]);
}

/// A push through a learner is acknowledged only once a write quorum of voters holds the blob:
/// the learner's own copy does not count. With one voter killed and another paused, only the
/// leader takes the learner's replica at once; the push must wait for the paused voter's copy
/// (two of three voters), not settle for the leader's plus the learner's. The command that
/// links the blob names its holders. Elections are slow here, so that the paused voter, back,
/// hears the leader before its own election timer (run out during the pause) would fire.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_through_a_learner_needs_a_quorum_of_voters() {
    let mut cl = Cluster::start_with(3, "election_timeout_min_ms = 4000\nelection_timeout_max_ms = 6000\n");
    let leader = cl.leader(Duration::from_secs(20)).await;
    let dir = tempfile::tempdir().unwrap();
    let (p4, r4) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let learner = Node::start_member(dir.path(), 4, &r4, &p4, &[], true);
    let out = cli(&[
        "cluster",
        "add",
        "--node",
        &cl.nodes[leader].peer,
        "--id",
        "4",
        "--peer",
        &p4,
        "--registry",
        &r4,
        "--learner",
    ]);
    assert!(out.contains("learner"), "{out}");
    let c = client();
    push_blob(&c, &learner, "learner/app", b"warm up").await;

    cl.nodes[(leader + 1) % 3].kill9();
    let paused = cl.nodes[(leader + 2) % 3].pid() as i32;
    unsafe { libc::kill(paused, libc::SIGSTOP) };
    let resume = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        unsafe { libc::kill(paused, libc::SIGCONT) };
    });
    let d = push_blob(&c, &learner, "learner/app", &vec![7u8; 256 << 10]).await;
    resume.await.unwrap();
    let text =
        c.get(learner.url("/v2/_raftyard/events?since=0&limit=10000")).send().await.unwrap().text().await.unwrap();
    let linked = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["events"].as_array().unwrap().iter().any(|ev| ev["type"] == "BlobLinked" && ev["digest"] == d))
        .expect("the command that linked the blob");
    let holders: Vec<u64> = linked["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|ev| ev["type"] == "BlobPlaced")
        .map(|ev| ev["node"].as_u64().unwrap())
        .collect();
    let voters = holders.iter().filter(|n| (1..=3).contains(*n)).count();
    assert!(voters >= 2, "blob {d} acknowledged with holders {holders:?}: {voters} voters");
}

/// A node short of disk space refuses blob writes, never reads: a blob it lacks is streamed
/// from a peer to the client, whole or by range, without a copy kept (node 3 here is set to
/// keep more free space than any disk has).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_short_of_space_serves_blobs_it_lacks_from_a_peer() {
    let cl = Cluster::start_each(3, |id| Extra {
        node: if id == 3 { "min_free_mb = 100000000" } else { "" },
        ..Extra::default()
    });
    let leader = cl.leader(Duration::from_secs(20)).await;
    let c = client();
    let writer = if leader == 2 { 0 } else { leader };
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let d = push_blob(&c, &cl.nodes[writer], "short/app", &data).await;
    let short = &cl.nodes[2];
    let r = c
        .post(short.url(&format!("/v2/short/app/blobs/uploads/?digest={}", sha256(b"x"))))
        .body(b"x".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 507, "uploads to the node short of space are refused");
    for _ in 0..2 {
        let r = c.get(short.url(&format!("/v2/short/app/blobs/{d}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(sha256(&r.bytes().await.unwrap()), d);
    }
    let r =
        c.get(short.url(&format!("/v2/short/app/blobs/{d}"))).header("range", "bytes=1000-1999").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), &data[1000..2000]);
    let r = c.head(short.url(&format!("/v2/short/app/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], data.len().to_string().as_str());
    assert!(!blob_path(&short.data, &d).exists(), "no copy kept");
}

/// Journal retention: the leader trims the event journal through the log, so every node drops
/// the same entries (their state digests stay equal), the state itself stays whole, and the
/// events endpoint says where the journal now starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn journal_retention_trims_the_same_entries_on_every_node() {
    let cl = Cluster::start_with(3, "journal_keep_entries = 30\njournal_trim_interval_secs = 1\n");
    let leader = cl.leader(Duration::from_secs(20)).await;
    let c = client();
    let mut digests = Vec::new();
    for i in 0..30 {
        digests.push(
            push_image(&c, &cl.nodes[leader], "kept/app", &format!("v{i}"), format!("image {i}").as_bytes()).await,
        );
    }
    // wait for a trim to pass the point where the images were pushed
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let h = cl.nodes[leader].health().await.unwrap();
        let first = h["journal_first"].as_u64().unwrap_or(0);
        let applied = h["applied"].as_u64().unwrap_or(0);
        if first > 0 && applied.saturating_sub(first) < 40 {
            break first;
        }
        assert!(Instant::now() < deadline, "no trim: journal_first {first}, applied {applied}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let r = c.get(cl.nodes[leader].url("/v2/_raftyard/events?since=0&limit=10000")).send().await.unwrap();
    let header: u64 = r.headers()["raftyard-journal-first"].to_str().unwrap().parse().unwrap();
    assert!(header >= first);
    let text = r.text().await.unwrap();
    let indexes: Vec<u64> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["index"].as_u64().unwrap())
        .collect();
    assert!(indexes.iter().all(|i| *i >= header), "an event before the journal's first index");
    assert!(text.contains("JournalTrimmed"), "the trim is an event itself");
    // every node dropped the same entries, and every image is still there
    let applied = cl.nodes[leader].health().await.unwrap()["applied"].as_u64().unwrap();
    for n in &cl.nodes {
        n.wait_applied(applied, Duration::from_secs(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut seen = std::collections::BTreeSet::new();
        for n in &cl.nodes {
            let v: serde_json::Value =
                c.get(n.url("/v2/_raftyard/state-digest")).send().await.unwrap().json().await.unwrap();
            seen.insert((v["applied"].as_u64(), v["digest"].as_str().map(str::to_string)));
        }
        if seen.len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "nodes differ after trimming: {seen:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (i, d) in digests.iter().enumerate() {
        for n in &cl.nodes {
            pull_image(&c, n, "kept/app", &format!("v{i}"), d).await;
        }
    }
}

/// A rolling upgrade from the release before proposal ids: while one member answers the
/// version call as that release did, proposals go without ids (it could not decode them), and
/// writes work; once it is upgraded, every node turns them on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proposal_ids_wait_until_every_member_reads_them() {
    let old = [("RAFTYARD_FAULT", "peer-protocol-1")];
    let mut cl = Cluster::start_each(3, |id| Extra { env: if id == 3 { &old } else { &[] }, ..Extra::default() });
    cl.leader(Duration::from_secs(20)).await;
    let ids = |cl: &Cluster| {
        let nodes: Vec<_> = cl.nodes.iter().map(|n| n.url("/v2/_raftyard/health")).collect();
        async move {
            let mut v = Vec::new();
            for u in nodes {
                let h: serde_json::Value = client().get(u).send().await.unwrap().json().await.unwrap();
                v.push(h["proposal_ids"].as_bool().unwrap());
            }
            v
        }
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ids(&cl).await[..2], [false, false], "node 3 answers as an older release");
    let c = client();
    let d = push_image(&c, &cl.nodes[1], "upgrade/app", "v1", b"before").await;
    pull_image(&c, &cl.nodes[2], "upgrade/app", "v1", &d).await;
    // no collection either (its entries are new to the older release), and mounts link as before
    pull_image(&c, &cl.nodes[0], "upgrade/app", "v1", &d).await;
    let err = cli_fails(&["gc", "--node", &cl.nodes[0].peer]);
    assert!(err.contains("older release") && err.contains("upgrade every node"), "{err}");
    let r = c
        .post(
            cl.nodes[0]
                .url(&format!("/v2/upgrade/other/blobs/uploads/?mount={}&from=upgrade/app", sha256(b"layer-before"))),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "mounted");

    cl.nodes[2].terminate();
    cl.nodes[2].respawn_plain();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = ids(&cl).await;
        if v.iter().all(|b| *b) {
            break;
        }
        assert!(Instant::now() < deadline, "proposal ids still off after the upgrade: {v:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let d = push_image(&c, &cl.nodes[2], "upgrade/app", "v2", b"after").await;
    pull_image(&c, &cl.nodes[0], "upgrade/app", "v2", &d).await;
    let out = cli(&["gc", "--dry-run", "--node", &cl.nodes[0].peer]);
    assert!(out.contains("dry run"), "{out}");

    // a node of the older release is not added: it could not read what the log holds
    let dir4 = tempfile::tempdir().unwrap();
    let (p4, r4) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let _n4 =
        Node::start_member_with(dir4.path(), 4, &r4, &p4, &[], &Extra { join: true, env: &old, ..Extra::default() });
    let err =
        cli_fails(&["cluster", "add", "--node", &cl.nodes[0].peer, "--id", "4", "--peer", &p4, "--registry", &r4]);
    assert!(err.contains("older release"), "{err}");
}
