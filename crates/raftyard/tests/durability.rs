//! Crash safety: `kill -9` at arbitrary instants during concurrent uploads and manifest pushes
//! loses nothing that was acknowledged and never exposes a partial blob; SIGTERM drains
//! in-flight requests.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};
use sha2::Digest as _;

#[derive(Default, Clone)]
struct Acked {
    /// (repo, digest) of blobs answered 201.
    blobs: Vec<(String, String)>,
    /// (repo, tag, manifest digest, bytes) of manifests answered 201.
    manifests: Vec<(String, String, String, Vec<u8>)>,
}

/// One client: pushes blobs in the three upload styles and manifests over them, recording
/// what was acknowledged, until a request fails (the node died).
async fn writer(n_url: String, id: usize, cycle: usize, seed: u64, acked: Arc<Mutex<Acked>>) {
    let c = client();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let repo = format!("crash/w{id}");
    let mut mine: Vec<(String, usize)> = Vec::new();
    for i in 0.. {
        let size = rng.gen_range(1..2_000_000usize);
        let mut data = vec![0u8; size];
        rng.fill(&mut data[..]);
        let d = sha256(&data);
        let style = rng.gen_range(0..3);
        let ok = async {
            match style {
                0 => {
                    let r = c
                        .post(format!("{n_url}/v2/{repo}/blobs/uploads/?digest={d}"))
                        .body(data.clone())
                        .send()
                        .await
                        .ok()?;
                    (r.status() == 201).then_some(())
                }
                1 => {
                    let r = c.post(format!("{n_url}/v2/{repo}/blobs/uploads/")).send().await.ok()?;
                    let loc = r.headers().get("location")?.to_str().ok()?.to_string();
                    let r = c.put(format!("{n_url}{loc}?digest={d}")).body(data.clone()).send().await.ok()?;
                    (r.status() == 201).then_some(())
                }
                _ => {
                    let r = c.post(format!("{n_url}/v2/{repo}/blobs/uploads/")).send().await.ok()?;
                    let mut loc = r.headers().get("location")?.to_str().ok()?.to_string();
                    let third = size / 3;
                    for (a, b) in [(0, third), (third, 2 * third)] {
                        if b > a {
                            let r = c
                                .patch(format!("{n_url}{loc}"))
                                .header("content-range", format!("{a}-{}", b - 1))
                                .body(data[a..b].to_vec())
                                .send()
                                .await
                                .ok()?;
                            if r.status() != 202 {
                                return None;
                            }
                            loc = r.headers().get("location")?.to_str().ok()?.to_string();
                        }
                    }
                    let r =
                        c.put(format!("{n_url}{loc}?digest={d}")).body(data[2 * third..].to_vec()).send().await.ok()?;
                    (r.status() == 201).then_some(())
                }
            }
        }
        .await;
        if ok.is_none() {
            return;
        }
        acked.lock().unwrap().blobs.push((repo.clone(), d.clone()));
        mine.push((d, size));
        if mine.len() >= 2 && i % 2 == 1 {
            let (cd, cs) = &mine[mine.len() - 2];
            let (ld, ls) = &mine[mine.len() - 1];
            let m = image_manifest((cd, *cs), &[(ld, *ls)], serde_json::json!({"annotations": {"i": i.to_string()}}));
            let tag = format!("c{cycle}-{i}");
            let r = c
                .put(format!("{n_url}/v2/{repo}/manifests/{tag}"))
                .header("content-type", OCI_MANIFEST)
                .body(m.clone())
                .send()
                .await;
            match r {
                Ok(r) if r.status() == 201 => acked.lock().unwrap().manifests.push((repo.clone(), tag, sha256(&m), m)),
                _ => return,
            }
        }
    }
}

/// Every file under blobs/ must hash to its own name.
fn check_no_partial_blobs(data: &std::path::Path) -> usize {
    let mut n = 0;
    for alg in ["sha256", "sha512"] {
        let dir = data.join("blobs").join(alg);
        for sub in std::fs::read_dir(&dir).unwrap() {
            for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
                let f = f.unwrap();
                let bytes = std::fs::read(f.path()).unwrap();
                let hex = match alg {
                    "sha256" => hex::encode(sha2::Sha256::digest(&bytes)),
                    _ => hex::encode(sha2::Sha512::digest(&bytes)),
                };
                assert_eq!(hex, f.file_name().to_string_lossy(), "blob file content does not match its digest");
                n += 1;
            }
        }
    }
    n
}

async fn verify(n: &Node, acked: &Acked) {
    let c = client();
    for (repo, d) in &acked.blobs {
        let r = c.get(n.url(&format!("/v2/{repo}/blobs/{d}"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "acknowledged blob {repo}@{d} lost");
        let body = r.bytes().await.unwrap();
        assert_eq!(&sha256(&body), d, "acknowledged blob {repo}@{d} corrupt");
    }
    for (repo, tag, d, bytes) in &acked.manifests {
        let r = c.get(n.url(&format!("/v2/{repo}/manifests/{tag}"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "acknowledged tag {repo}:{tag} lost");
        assert_eq!(r.headers()["docker-content-digest"], d.as_str());
        assert_eq!(r.bytes().await.unwrap().as_ref(), bytes.as_slice());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_dash_nine_during_uploads_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut node = Node::start(&data);
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for cycle in 0..4 {
        let writers: Vec<_> =
            (0..4).map(|w| tokio::spawn(writer(node.url(""), w, cycle, rng.gen(), acked.clone()))).collect();
        let delay = rng.gen_range(400..1500);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        eprintln!("cycle {cycle}: kill -9 after {delay} ms");
        node.kill9();
        for w in writers {
            w.await.unwrap();
        }
        let files = check_no_partial_blobs(&data);
        node.spawn();
        let a = acked.lock().unwrap().clone();
        eprintln!(
            "cycle {cycle}: {} blobs and {} manifests acknowledged so far; {files} blob files",
            a.blobs.len(),
            a.manifests.len()
        );
        verify(&node, &a).await;
    }
    let a = acked.lock().unwrap();
    assert!(a.blobs.len() > 20 && !a.manifests.is_empty(), "the load did not get going");
    // nothing from the interrupted sessions survives
    assert_eq!(std::fs::read_dir(data.join("uploads")).unwrap().count(), 0);
}

#[tokio::test]
async fn sigterm_finishes_in_flight_upload() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut node = Node::start(&data);
    let c = client();
    let payload: Vec<u8> = (0..4_000_000u32).map(|i| (i % 199) as u8).collect();
    let d = sha256(&payload);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let body =
        reqwest::Body::wrap_stream(futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|x| (x, rx)) },
        ));
    let url = node.url(&format!("/v2/drain/blobs/uploads/?digest={d}"));
    let len = payload.len().to_string();
    let req = tokio::spawn(async move { c.post(url).header("content-length", len).body(body).send().await });
    tx.send(Ok(bytes::Bytes::copy_from_slice(&payload[..1_000_000]))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = node.pid();
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // new connections are refused while the upload drains
    assert!(std::net::TcpStream::connect(&node.addr).is_err(), "listener still open after SIGTERM");
    for chunk in payload[1_000_000..].chunks(1_000_000) {
        tx.send(Ok(bytes::Bytes::copy_from_slice(chunk))).await.unwrap();
    }
    drop(tx);
    let r = req.await.unwrap().unwrap();
    assert_eq!(r.status(), 201, "in-flight upload completes during shutdown");
    let status = node.child.as_mut().unwrap().wait().unwrap();
    node.child = None;
    assert!(status.success(), "clean exit after SIGTERM: {status}");
    node.spawn();
    let got = client().get(node.url(&format!("/v2/drain/blobs/{d}"))).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(sha256(&got.bytes().await.unwrap()), d);
}

/// `raftyard meta-size` reads a stopped node's metadata part by part (a running node holds the
/// storage's lock, and is refused): every manifest pushed is counted, the journal and the
/// manifests are parts of their own, and the files on disk are at least what the parts hold.
#[tokio::test]
async fn meta_size_tells_the_parts_of_a_stopped_node() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let mut n = Node::start(&data);
    let c = client();
    for i in 0..3 {
        push_image(&c, &n, "size/app", &format!("v{i}"), format!("size-{i}").as_bytes()).await;
    }
    let refused = cli_fails(&["meta-size", "--data-dir", data.to_str().unwrap()]);
    assert!(refused.contains("is the node stopped"), "{refused}");
    assert!(n.terminate().success());
    let m: serde_json::Value =
        serde_json::from_str(&cli(&["meta-size", "--data-dir", data.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(m["manifests"], 3, "{m}");
    let part = |name: &str| m["parts"].as_array().unwrap().iter().find(|p| p["part"] == name).cloned();
    let entries = |name: &str| part(name).map(|p| p["entries"].as_u64().unwrap()).unwrap_or(0);
    assert_eq!(entries("state M/"), 3, "{m}");
    assert_eq!(entries("state t/"), 3, "{m}");
    assert!(entries("state j/") >= 3, "{m}");
    assert!(entries("tree log") > 0, "{m}");
    let logical: u64 = m["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key_bytes"].as_u64().unwrap() + p["value_bytes"].as_u64().unwrap())
        .sum();
    let on_disk: u64 = m["files"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert!(on_disk >= logical, "{on_disk} bytes on disk for {logical} bytes of parts");
}

/// `raft.compress_metadata` applies to the database a node makes. In a cluster whose nodes 2
/// and 3 compress and node 1 does not, every image is served by every node, also by a
/// compressed node killed and started again; node 1, restarted with the setting on, keeps its
/// database as it was made (sled cannot change it) and serves as before; `meta-size` reads a
/// stopped compressed node.
#[tokio::test]
async fn compressed_metadata_serves_like_plain_and_an_existing_database_keeps_its_format() {
    let mut cl = Cluster::start_each(3, |id| Extra {
        raft: if id == 1 { "" } else { "compress_metadata = true" },
        ..Extra::default()
    });
    cl.ready(Duration::from_secs(30)).await;
    let c = client();
    let mut pushed = Vec::new();
    for i in 0..6 {
        let tag = format!("v{i}");
        let d = push_image(&c, &cl.nodes[i % 3], "zstd/app", &tag, format!("zstd-{i}").as_bytes()).await;
        pushed.push((tag, d));
    }
    let made_compressed = |n: &Node| {
        let conf = String::from_utf8_lossy(&std::fs::read(n.data.join("meta/conf")).unwrap()).into_owned();
        assert!(conf.contains("use_compression: "), "{conf}");
        conf.contains("use_compression: true")
    };
    assert!(!made_compressed(&cl.nodes[0]));
    assert!(made_compressed(&cl.nodes[1]) && made_compressed(&cl.nodes[2]));

    cl.nodes[1].kill9();
    cl.nodes[1].spawn();
    let cfg = cl.nodes[0].data.with_extension("toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replacen("[raft]\n", "[raft]\ncompress_metadata = true\n", 1);
    std::fs::write(&cfg, text).unwrap();
    assert!(cl.nodes[0].terminate().success());
    cl.nodes[0].spawn();
    cl.ready(Duration::from_secs(30)).await;
    assert!(!made_compressed(&cl.nodes[0]), "an existing database changed its format");
    for n in &cl.nodes {
        for (tag, d) in &pushed {
            pull_image(&c, n, "zstd/app", tag, d).await;
        }
    }

    assert!(cl.nodes[2].terminate().success());
    let data = cl.nodes[2].data.to_str().unwrap().to_string();
    let m: serde_json::Value = serde_json::from_str(&cli(&["meta-size", "--data-dir", &data, "--json"])).unwrap();
    assert_eq!(m["manifests"], 6, "{m}");
}
