//! A three-node cluster inside the test process: writes through a follower, reads through
//! another, a stopped leader, a restarted node catching up.

use std::time::{Duration, Instant};

use raftyard_testkit::TestCluster;
use sha2::Digest as _;

fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

async fn push(c: &reqwest::Client, url: &str, repo: &str, data: &[u8]) -> String {
    let d = sha256(data);
    let r = c.post(format!("{url}/v2/{repo}/blobs/uploads/?digest={d}")).body(data.to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_process_cluster_serves_writes_and_reads_on_any_node() {
    let mut tc = TestCluster::start(3).await.unwrap();
    let c = reqwest::Client::new();
    let leader = tc.leader(Duration::from_secs(20)).await.unwrap();
    let (a, b) = ((leader + 1) % 3, (leader + 2) % 3);
    eprintln!("leader {leader}, writing through {a}, reading through {b}");
    let mut digests = Vec::new();
    for i in 0..10 {
        let d = push(&c, &tc.url(a, ""), "ip/app", format!("blob {i}").as_bytes()).await;
        let r = c.get(tc.url(b, &format!("/v2/ip/app/blobs/{d}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(sha256(&r.bytes().await.unwrap()), d);
        digests.push(d);
    }
    // a stopped leader is replaced and writes go on
    tc.stop(leader).await.unwrap();
    let next = tc.leader(Duration::from_secs(10)).await.unwrap();
    assert_ne!(next, leader);
    let d = push(&c, &tc.url(a, ""), "ip/app", b"after").await;
    digests.push(d);
    // the old leader comes back and has everything
    tc.restart(leader).await.unwrap();
    tc.leader(Duration::from_secs(10)).await.unwrap();
    for d in &digests {
        let r = c.get(tc.url(leader, &format!("/v2/ip/app/blobs/{d}"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "{d} on the restarted node");
        assert_eq!(&sha256(&r.bytes().await.unwrap()), d);
    }
    tc.shutdown().await.unwrap();
}

/// The readiness probe asks what a read barrier would (a leader in touch with a quorum, this
/// node caught up), from Raft's figures: it passes on every node of a healthy cluster, fails
/// on a leader whose followers are gone (openraft 0.9 does not step down; no quorum
/// acknowledges it any more), and on any node left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readiness_probe_follows_the_quorum() {
    async fn fails_soon(tc: &TestCluster, i: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match tc.node(i).meta.probe(Duration::from_secs(2)).await {
                Err(e) => return e.to_string(),
                Ok(()) => {
                    assert!(Instant::now() < deadline, "node {} alone still passes the probe", i + 1);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let mut tc = TestCluster::start(3).await.unwrap();
    let leader = tc.leader(Duration::from_secs(20)).await.unwrap();
    for i in 0..3 {
        tc.node(i).meta.probe(Duration::from_secs(2)).await.unwrap();
    }
    let (f1, f2) = ((leader + 1) % 3, (leader + 2) % 3);
    tc.stop(f1).await.unwrap();
    tc.node(f2).meta.probe(Duration::from_secs(2)).await.unwrap();
    tc.stop(f2).await.unwrap();
    let e = fails_soon(&tc, leader).await;
    assert!(e.contains("quorum"), "{e}");
    // with a majority back, every node passes again
    tc.restart(f1).await.unwrap();
    tc.restart(f2).await.unwrap();
    let leader = tc.leader(Duration::from_secs(20)).await.unwrap();
    for i in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = tc.node(i).meta.probe(Duration::from_secs(2)).await {
            assert!(Instant::now() < deadline, "node {} not ready again: {e}", i + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // a follower left alone (its leader hands over to it as it stops, or not)
    let (f1, f2) = ((leader + 1) % 3, (leader + 2) % 3);
    tc.stop(f2).await.unwrap();
    tc.stop(leader).await.unwrap();
    let e = fails_soon(&tc, f1).await;
    eprintln!("node {} alone: {e}", f1 + 1);
    tc.shutdown().await.unwrap();
}
