//! Storage quotas and usage over HTTP and the CLI: a real client (skopeo) refused over a
//! quota with its figures, usage equal on every node to what was pushed (each blob once per
//! repository), and a cluster upgraded from the release before quotas counting what it held.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Every file of an OCI layout: what pushing it into one repository adds (blobs and manifests
/// each once).
fn layout_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("blobs/sha256")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

/// `skopeo copy` of the layout to `dest`: its stderr if it failed.
fn skopeo_push_result(src: &Path, dest: &str) -> Result<(), String> {
    let out = Command::new("skopeo")
        .args(["copy", "--all", "--preserve-digests", "--dest-tls-verify=false", "--retry-times", "0"])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(dest)
        .output()
        .expect("skopeo (the README's test command installs it)");
    match out.status.success() {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// `/v2/_raftyard/usage` of a node: repository → (bytes, blobs, manifests).
async fn usage(c: &reqwest::Client, n: &Node, query: &str) -> Vec<(String, u64, u64, u64)> {
    let r = c.get(n.url(&format!("/v2/_raftyard/usage{query}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    let n = |u: &serde_json::Value, k: &str| u[k].as_u64().unwrap();
    v["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| (u["repository"].as_str().unwrap().to_string(), n(u, "bytes"), n(u, "blobs"), n(u, "manifests")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_over_its_quota_is_refused_with_the_figures() {
    let cl = Cluster::start(3);
    cl.leader(Duration::from_secs(20)).await;
    let c = client();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("layout");
    write_layout(&src, 41);
    let size = layout_bytes(&src);

    // a quota of half the image: skopeo is refused a blob, and says why (a refused manifest
    // list, skopeo would hide behind its attempts to convert it)
    let peer = &cl.nodes[0].peer;
    cli(&["quota", "set", "--repos", "team/**", "--bytes", &(size / 2).to_string(), "--node", peer]);
    let dest = |n: &Node, repo: &str| format!("docker://{}/{repo}:v1", n.url("").trim_start_matches("http://"));
    let err = skopeo_push_result(&src, &dest(&cl.nodes[1], "team/app")).unwrap_err();
    assert!(err.contains("denied") && err.contains("quota of team/**"), "{err}");
    // the refusal as a client sees it over HTTP: 403 DENIED with the figures
    let r = c.post(cl.nodes[2].url("/v2/team/app/blobs/uploads/")).send().await.unwrap();
    if r.status() == 403 {
        // (what skopeo got in before the refusal may already fill the quota)
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "DENIED");
        assert_eq!(body["errors"][0]["detail"]["limit"], size / 2);
    }
    let layer = vec![7u8; size as usize];
    let r = c
        .post(cl.nodes[2].url(&format!("/v2/team/app/blobs/uploads/?digest={}", sha256(&layer))))
        .body(layer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a blob larger than the quota");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "DENIED", "{body}");
    assert_eq!(body["errors"][0]["detail"]["quota"], "team/**", "{body}");
    assert_eq!(body["errors"][0]["detail"]["adds"], size, "{body}");

    // with room, the same push goes through, and counts each blob once
    cli(&["quota", "set", "--repos", "team/**", "--bytes", &(size + size / 2).to_string(), "--node", peer]);
    skopeo_push_result(&src, &dest(&cl.nodes[1], "team/app")).unwrap();
    skopeo_push_result(&src, &dest(&cl.nodes[1], "team/app")).unwrap(); // again: adds nothing
    let blobs = blob_names(&src).len() as u64; // 2 configs, 2 layers, 2 manifests, the index
    for n in &cl.nodes {
        assert_eq!(usage(&c, n, "?repos=team/**").await, [("team/app".to_string(), size, blobs - 3, 3)]);
    }
    // a second repository under the same quota counts the same blobs again: refused
    let err = skopeo_push_result(&src, &dest(&cl.nodes[0], "team/copy")).unwrap_err();
    assert!(err.contains("quota of team/**"), "{err}");
    // outside the quota, nothing is refused
    skopeo_push_result(&src, &dest(&cl.nodes[2], "other/app")).unwrap();

    let list = cli(&["quota", "list", "--json", "--node", peer]);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list[0]["quota"]["repos"], "team/**");
    assert!(list[0]["used"]["bytes"].as_u64().unwrap() >= size, "{list}");
    let metrics = c.get(cl.nodes[1].url("/metrics")).send().await.unwrap().text().await.unwrap();
    let limit = format!("raftyard_quota_limit_bytes{{repos=\"team/**\"}} {}", size + size / 2);
    assert!(metrics.contains(&limit) && metrics.contains("raftyard_quota_used_bytes{repos=\"team/**\"}"), "{metrics}");
    let text = cli(&["usage", "--node", &cl.nodes[2].peer]);
    assert!(text.contains("team/app") && text.contains("other/app") && text.contains("total"), "{text}");

    // deleting frees room: the index and its images go, a collection takes their blobs
    let index = skopeo_manifest_digest(&dest(&cl.nodes[0], "team/app"));
    let r = c.delete(cl.nodes[0].url(&format!("/v2/team/app/manifests/{index}"))).send().await.unwrap();
    assert_eq!(r.status(), 202);
    cli(&["gc", "--untagged", "--grace", "0", "--node", peer]);
    assert!(usage(&c, &cl.nodes[0], "?repos=team/**").await.is_empty(), "everything of team/app was collected");
    skopeo_push_result(&src, &dest(&cl.nodes[0], "team/copy")).unwrap();
    cli(&["quota", "remove", "--repos", "team/**", "--node", peer]);
    skopeo_push_result(&src, &dest(&cl.nodes[0], "team/app")).unwrap();
    let err = cli_fails(&["quota", "remove", "--repos", "team/**", "--node", peer]);
    assert!(err.contains("no quota"), "{err}");
}

/// A cluster with a member of the release before quotas refuses them, with the reason; once
/// it is upgraded, the log records protocol 4 and every node counts what was pushed before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quotas_wait_until_every_member_keeps_usage() {
    let old = [("RAFTYARD_FAULT", "peer-protocol-3")];
    let mut cl = Cluster::start_each(3, |id| Extra { env: if id == 3 { &old } else { &[] }, ..Extra::default() });
    cl.leader(Duration::from_secs(20)).await;
    let c = client();
    let before = push_image(&c, &cl.nodes[0], "old/app", "v1", b"pushed before the upgrade").await;
    let err = cli_fails(&["quota", "set", "--repos", "old/*", "--bytes", "1GB", "--node", &cl.nodes[0].peer]);
    assert!(err.contains("older release") && err.contains("upgrade every node"), "{err}");
    assert!(usage(&c, &cl.nodes[1], "").await.is_empty(), "usage starts with protocol 4");

    cl.nodes[2].terminate();
    cl.nodes[2].respawn_plain();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let h = cl.nodes[0].health().await.unwrap_or_default();
        if h["cluster_protocol"] == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "protocol 4 never recorded: {h}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cli(&["quota", "set", "--repos", "old/*", "--bytes", "1", "--node", &cl.nodes[2].peer]);
    for n in &cl.nodes {
        let u = usage(&c, n, "").await;
        assert_eq!(u.len(), 1, "{u:?}");
        assert_eq!((u[0].0.as_str(), u[0].2, u[0].3), ("old/app", 2, 1), "counted as the upgrade applied");
    }
    let r = c.post(cl.nodes[1].url("/v2/old/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 403, "over the quota set after the upgrade");
    pull_image(&c, &cl.nodes[2], "old/app", "v1", &before).await;
}
