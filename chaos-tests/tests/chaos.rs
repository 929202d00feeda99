//! The suite against real processes: a bounded scenario with every kind of fault must find no
//! violation, and a deliberately broken node (acknowledging manifests before they commit, or
//! serving reads by digest from stale local state) must be caught.

use std::path::PathBuf;
use std::time::Duration;

/// The `raftyard` binary built with these tests (`RAFTYARD_BIN` overrides).
fn raftyard() -> PathBuf {
    if let Ok(p) = std::env::var("RAFTYARD_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<this test> → target/<profile>/raftyard
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe.parent().and_then(|d| d.parent()).expect("target dir").join("raftyard");
    assert!(bin.exists(), "{} missing: build it (cargo build -p raftyard) or set RAFTYARD_BIN", bin.display());
    bin
}

fn options(
    seed: u64,
    secs: u64,
    faults: Vec<chaos_tests::faults::Kind>,
    broken: Option<(u64, &str)>,
    relay: bool,
    backup: bool,
) -> chaos_tests::Options {
    chaos_tests::Options {
        bin: raftyard(),
        seed,
        duration: Duration::from_secs(secs),
        nodes: 3,
        clients: 6,
        keys: 8,
        faults,
        broken: broken.map(|(id, how)| (id, how.to_string())),
        relay,
        backup,
        concurrency: 1,
        distant: None,
        node: Default::default(),
        keep: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_healthy_cluster_survives_every_kind_of_fault() {
    // with a relay in front: clients also go through its shared endpoint, and it is killed
    // too; and with a backup node, which must end up with everything
    let mut faults = chaos_tests::faults::Kind::ALL.to_vec();
    faults.push(chaos_tests::faults::Kind::Relay);
    let report = chaos_tests::run(&options(20261129, 45, faults, None, true, true)).await.unwrap();
    println!("{}", report.human());
    assert!(report.faults.len() >= 5, "faults were injected");
    assert!(report.acked_writes > 100 && report.acked_blobs > 20, "the load made progress");
    assert!(report.converged_after_ms.is_some(), "nodes converged");
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_acknowledges_before_committing_is_caught() {
    let report =
        chaos_tests::run(&options(7, 12, Vec::new(), Some((1, "ack-before-commit")), false, false)).await.unwrap();
    println!("{}", report.human());
    assert!(!report.violations.is_empty(), "the broken node went unnoticed");
    assert!(
        report.violations.iter().any(|v| v.contains("not linearizable")),
        "a read missed an acknowledged write: {:#?}",
        report.violations
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_serves_deleted_content_is_caught() {
    // the broken node is far away (10 ms each way): it applies every delete some 20 ms after
    // it was acknowledged through another node, and a read it serves meanwhile must be caught
    let mut o = options(8, 20, Vec::new(), Some((2, "stale-reads")), false, false);
    o.distant = Some((2, Duration::from_millis(10)));
    let report = chaos_tests::run(&o).await.unwrap();
    println!("{}", report.human());
    assert!(
        report.violations.iter().any(|v| v.contains("after its delete was acknowledged")),
        "a read after an acknowledged delete was served by the broken node: {:#?}",
        report.violations
    );
}
