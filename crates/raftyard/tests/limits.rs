//! Resource limits: a client that opens upload sessions without end gets `429 TOOMANYREQUESTS`
//! past its cap, holds no file descriptor for idle sessions, and another client pushes on.

mod common;

use std::time::Duration;

use common::*;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_upload_sessions_is_capped_and_another_client_pushes_on() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.toml");
    std::fs::write(&cfg, "[registry]\nmax_upload_sessions = 1000\nmax_upload_sessions_per_client = 300\n").unwrap();
    let n = Node::start_with(&dir.path().join("data"), &["--config", cfg.to_str().unwrap()]);
    let flood = client();
    let before = open_fds(n.pid());

    // one client (127.0.0.1) opens sessions on one connection until refused
    let (mut opened, mut last) = (0, String::new());
    let refusal = loop {
        let r = flood.post(n.url("/v2/flood/app/blobs/uploads/")).send().await.unwrap();
        if r.status() != 202 {
            break r;
        }
        last = r.headers()["location"].to_str().unwrap().to_string();
        opened += 1;
        assert!(opened <= 300, "no cap");
    };
    assert_eq!(opened, 300, "the per-client cap");
    assert_eq!(refusal.status(), 429);
    assert_eq!(refusal.headers()["retry-after"], "10");
    assert_eq!(error_code(refusal).await, "TOOMANYREQUESTS");
    let during = open_fds(n.pid());
    eprintln!("open files: {before} before, {during} with {opened} idle sessions");
    assert!(during < before + 20, "idle sessions hold no files: {before} → {during}");

    // another client (from 127.0.0.2) pushes an image meanwhile
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let d = push_image(&other, &n, "other/app", "v1", b"other").await;
    pull_image(&other, &n, "other/app", "v1", &d).await;

    // the other client is under its own cap; a cancelled session frees a place for the first
    let st = other.post(n.url("/v2/other/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(st.status(), 202);
    assert_eq!(flood.post(n.url("/v2/flood/app/blobs/uploads/")).send().await.unwrap().status(), 429);
    assert_eq!(flood.delete(n.url(&last)).send().await.unwrap().status(), 204);
    assert_eq!(flood.post(n.url("/v2/flood/app/blobs/uploads/")).send().await.unwrap().status(), 202);
}
