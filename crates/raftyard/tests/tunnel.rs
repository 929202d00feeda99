//! A three-node cluster behind `raftyard relay`, used by real clients (skopeo, docker) through
//! the shared public endpoint and the per-node ones, while nodes and relays die and come back.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// skopeo pulls the whole index through `endpoint` and checks every blob against the source.
fn pull_all(src: &std::path::Path, endpoint: &str, repo: &str, into: &std::path::Path) {
    run(Command::new("skopeo")
        .args(["copy", "--all", "--preserve-digests", "--src-tls-verify=false"])
        .arg(format!("docker://{endpoint}/{repo}"))
        .arg(format!("oci:{}:v1", into.display())));
    assert_eq!(blob_names(src), blob_names(into), "everything pulled through {endpoint}");
}

fn index_digest(endpoint: &str, repo: &str) -> String {
    sha256(
        run(Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{endpoint}/{repo}"),
        ]))
        .as_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_through_the_shared_endpoint_while_nodes_die() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProc::start(&dir.path().join("relay"), 3);
    let mut cl = Cluster::start_configured(3, "", |id| relay.link(id));
    cl.leader(Duration::from_secs(20)).await;
    relay.wait_agents(3, Duration::from_secs(20)).await;
    let shared = relay.shared().to_string();

    // visitors that connect and never send a byte take nothing from anyone else
    let silent: Vec<_> = (0..50).map(|_| std::net::TcpStream::connect(&shared).unwrap()).collect();

    eprintln!("skopeo pushes a two-platform index through {shared}");
    let src = dir.path().join("src");
    let index = write_layout(&src, 41);
    run(Command::new("skopeo")
        .args(["copy", "--all", "--preserve-digests", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(format!("docker://{shared}/tunnel/app:v1")));
    for id in 1..=3 {
        let per_node = &relay.services[&format!("registry-{id}")];
        assert_eq!(index_digest(per_node, "tunnel/app:v1"), index, "node {id} through its own endpoint");
    }

    eprintln!("docker pushes and pulls through {shared}");
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    std::fs::write(rootfs.join("payload"), (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect::<Vec<_>>())
        .unwrap();
    let tar = dir.path().join("rootfs.tar");
    run(Command::new("tar").arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg("."));
    let image = format!("{shared}/tunnel/docker:t{}", std::process::id());
    run(Command::new("docker").arg("import").arg(&tar).arg(&image));
    let push = run(Command::new("docker").args(["push", &image]));
    let digest = push.split_whitespace().find(|w| w.starts_with("sha256:")).expect("digest in push output").to_string();
    run(Command::new("docker").args(["rmi", &image]));
    assert!(run(Command::new("docker").args(["pull", &image])).contains(&digest));
    run(Command::new("docker").args(["rmi", &image]));

    // kill -9 a follower: the relay hears its agent go and no later connection goes there
    let leader = cl.leader(Duration::from_secs(10)).await;
    let follower = (leader + 1) % 3;
    eprintln!("kill -9 node {}; pulls go on at once", follower + 1);
    cl.nodes[follower].kill9();
    for i in 0..3 {
        pull_all(&src, &shared, "tunnel/app:v1", &dir.path().join(format!("after-follower-{i}")));
    }
    assert!(run(Command::new("docker").args(["pull", &image])).contains(&digest));
    run(Command::new("docker").args(["rmi", &image]));
    relay.wait_agents(2, Duration::from_secs(5)).await;

    eprintln!("node {} back; then kill -9 the leader, node {}", follower + 1, leader + 1);
    cl.nodes[follower].spawn();
    relay.wait_agents(3, Duration::from_secs(20)).await;
    cl.nodes[leader].kill9();
    let t = Instant::now();
    let new_leader = cl.leader(Duration::from_secs(20)).await;
    eprintln!("node {} leads after {:?}", new_leader + 1, t.elapsed());
    pull_all(&src, &shared, "tunnel/app:v1", &dir.path().join("after-leader"));
    // and a new push through the shared endpoint lands on the survivors
    let src2 = dir.path().join("src2");
    let index2 = write_layout(&src2, 42);
    run(Command::new("skopeo")
        .args(["copy", "--all", "--preserve-digests", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", src2.display()))
        .arg(format!("docker://{shared}/tunnel/after:v1")));
    for n in cl.nodes.iter().filter(|n| n.child.is_some()) {
        assert_eq!(index_digest(&n.addr, "tunnel/after:v1"), index2, "on node {}", n.addr);
    }
    let st = relay.status().await;
    let svc = st["services"].as_array().unwrap().iter().find(|s| s["name"] == "registry").unwrap().clone();
    eprintln!("relay: {svc}");
    let pushed: u64 = [&src, &src2]
        .iter()
        .flat_map(|d| std::fs::read_dir(d.join("blobs/sha256")).unwrap())
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(svc["bytes_in"].as_u64().unwrap() >= pushed, "the relay counted at least the {pushed} bytes pushed: {svc}");
    assert_eq!(svc["unserved_total"], 0, "every visitor found a node: {svc}");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_at_once_and_a_relay_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = RelayProc::start(&dir.path().join("relay-a"), 3);
    let b = RelayProc::start(&dir.path().join("relay-b"), 3);
    let cl = Cluster::start_configured(3, "", |id| format!("{}{}", a.link(id), b.link(id)));
    cl.leader(Duration::from_secs(20)).await;
    a.wait_agents(3, Duration::from_secs(20)).await;
    b.wait_agents(3, Duration::from_secs(20)).await;

    let src = dir.path().join("src");
    let index = write_layout(&src, 43);
    run(Command::new("skopeo")
        .args(["copy", "--all", "--preserve-digests", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(format!("docker://{}/two/app:v1", a.shared())));
    pull_all(&src, b.shared(), "two/app:v1", &dir.path().join("via-b"));

    eprintln!("kill -9 relay a; b serves meanwhile; a comes back and the agents find it");
    a.kill9();
    assert_eq!(index_digest(b.shared(), "two/app:v1"), index);
    a.spawn();
    let t = Instant::now();
    a.wait_agents(3, Duration::from_secs(20)).await;
    eprintln!("all three agents back on relay a after {:?}", t.elapsed());
    pull_all(&src, a.shared(), "two/app:v1", &dir.path().join("via-a-again"));
}
