//! Fail-stop: a node whose storage stops answering ends its process (and starts again clean on
//! its data) instead of staying up without committing; SIGTERM ends a node within its drain
//! deadline even then; readiness says whether a node can serve, and comes back when it can.
//!
//! The wedged disk is the deliberate fault `RAFTYARD_FAULT=hang-log-flush`: once the file
//! `hang-log-flush` exists in the node's data directory, its Raft log flushes never return.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Three members on fixed ports; node 3 runs with `env`, every node with `raft` in `[raft]`.
fn cluster_with(dir: &std::path::Path, raft: &str, env3: &[(&str, &str)]) -> Vec<Node> {
    let members: Vec<(u64, String, String)> =
        (1..=3).map(|id| (id, format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()))).collect();
    let mut nodes: Vec<Node> = members
        .iter()
        .rev()
        .map(|(id, peer, reg)| {
            let env = if *id == 3 { env3 } else { &[] };
            Node::start_member_with(dir, *id, reg, peer, &members, &Extra { raft, env, ..Extra::default() })
        })
        .collect();
    nodes.reverse();
    nodes
}

async fn wait_ready(n: &Node, want: bool, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let r = n.ready().await;
        if let Some((status, reason)) = &r {
            if (*status == 200) == want {
                return reason.clone();
            }
        }
        assert!(Instant::now() < deadline, "node {} not {} within {timeout:?}: {r:?}", n.addr, want);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn leader_of(nodes: &[Node]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for n in nodes.iter().filter(|n| n.child.is_some()) {
            if let Some(l) = n.health().await.and_then(|h| h["leader"].as_u64()) {
                if nodes[l as usize - 1].child.is_some() {
                    return l as usize - 1;
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The leader's index, once node 3 (the one to wedge) is a follower: while it leads, it is
/// restarted, and the others elect one of themselves.
async fn leader_not_3(nodes: &mut [Node]) -> usize {
    loop {
        let leader = leader_of(nodes).await;
        if leader != 2 {
            return leader;
        }
        nodes[2].kill9();
        let _ = leader_of(nodes).await;
        nodes[2].spawn();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_log_flush_hangs_exits_and_comes_back_clean() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster_with(dir.path(), "storage_deadline_ms = 2000\n", &[("RAFTYARD_FAULT", "hang-log-flush")]);
    let c = client();
    let leader = leader_not_3(&mut nodes).await;
    for n in &nodes {
        wait_ready(n, true, Duration::from_secs(20)).await;
    }
    let before = push_image(&c, &nodes[leader], "failstop/app", "before", b"before").await;

    // node 3's disk wedges: its next log flush never returns
    let wedge_at = Instant::now();
    std::fs::write(nodes[2].data.join("hang-log-flush"), b"").unwrap();
    // writes go on (the other two are a majority); they reach node 3 and wedge its flusher
    let mut during = Vec::new();
    for i in 0..3 {
        let tag = format!("during-{i}");
        during.push((tag.clone(), push_image(&c, &nodes[leader], "failstop/app", &tag, tag.as_bytes()).await));
    }

    // it stops by itself, with the storage named, instead of staying up
    let status = nodes[2].wait_exit(Duration::from_secs(20)).expect("the wedged node exits by itself");
    eprintln!("node 3 exited {:?} after the wedge", wedge_at.elapsed());
    assert_eq!(status.code(), Some(75), "exit status of a stuck storage");
    let log = std::fs::read_to_string(&nodes[2].log).unwrap();
    assert!(log.contains("storage operation") && log.contains("has not completed"), "{log}");

    // started again on its data (the disk works again), it catches up and serves everything
    std::fs::remove_file(nodes[2].data.join("hang-log-flush")).unwrap();
    nodes[2].spawn();
    wait_ready(&nodes[2], true, Duration::from_secs(30)).await;
    pull_image(&c, &nodes[2], "failstop/app", "before", &before).await;
    for (tag, d) in &during {
        pull_image(&c, &nodes[2], "failstop/app", tag, d).await;
    }
    let leader = leader_of(&nodes).await;
    let after = push_image(&c, &nodes[leader], "failstop/app", "after", b"after").await;
    pull_image(&c, &nodes[2], "failstop/app", "after", &after).await;

    // readiness follows the quorum: alone, a node is not ready; with a majority back, it is
    nodes[0].kill9();
    nodes[1].kill9();
    let reason = wait_ready(&nodes[2], false, Duration::from_secs(15)).await;
    assert!(reason.contains("barrier") || reason.contains("leader"), "{reason}");
    nodes[0].spawn();
    nodes[1].spawn();
    wait_ready(&nodes[2], true, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_ends_a_node_whose_storage_hangs() {
    let dir = tempfile::tempdir().unwrap();
    // a deadline far away: only SIGTERM can end it here
    let mut nodes = cluster_with(dir.path(), "storage_deadline_ms = 600000\n", &[("RAFTYARD_FAULT", "hang-log-flush")]);
    let c = client();
    let leader = leader_not_3(&mut nodes).await;
    wait_ready(&nodes[2], true, Duration::from_secs(20)).await;
    std::fs::write(nodes[2].data.join("hang-log-flush"), b"").unwrap();
    push_image(&c, &nodes[leader], "failstop/term", "a", b"a").await;
    push_image(&c, &nodes[leader], "failstop/term", "b", b"b").await;
    // its log flusher is stuck now; readiness says so
    let reason = wait_ready(&nodes[2], false, Duration::from_secs(15)).await;
    eprintln!("not ready: {reason}");
    let started = Instant::now();
    unsafe { libc::kill(nodes[2].pid() as i32, libc::SIGTERM) };
    let status = nodes[2].wait_exit(Duration::from_secs(60)).expect("SIGTERM ends the node");
    eprintln!("exited {status:?} {:?} after SIGTERM", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(55), "within the stop deadline: {:?}", started.elapsed());
}
