//! A three-node cluster behind `raftyard relay`, used by real clients (skopeo, docker) through
//! the shared public endpoint and the per-node ones, while nodes and relays die and come back.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// skopeo pulls the whole index through `endpoint` and checks every blob against the source.
fn pull_all(src: &std::path::Path, endpoint: &str, repo: &str, into: &std::path::Path) {
    skopeo_pull(&format!("docker://{endpoint}/{repo}"), into);
    assert_eq!(blob_names(src), blob_names(into), "everything pulled through {endpoint}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_through_the_shared_endpoint_while_nodes_die() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, mut cl, _) = behind_relay(dir.path(), |_| String::new()).await;
    let shared = relay.shared().to_string();

    // visitors that connect and never send a byte take nothing from anyone else
    let silent: Vec<_> = (0..50).map(|_| std::net::TcpStream::connect(&shared).unwrap()).collect();

    eprintln!("skopeo pushes a two-platform index through {shared}");
    let src = dir.path().join("src");
    let index = write_layout(&src, 41);
    skopeo_push(&src, &format!("docker://{shared}/tunnel/app:v1"));
    for id in 1..=3 {
        let per_node = &relay.services[&format!("registry-{id}")];
        assert_eq!(
            skopeo_manifest_digest(&format!("docker://{per_node}/tunnel/app:v1")),
            index,
            "node {id} through its own endpoint"
        );
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
    skopeo_push(&src2, &format!("docker://{shared}/tunnel/after:v1"));
    for n in cl.nodes.iter().filter(|n| n.child.is_some()) {
        assert_eq!(
            skopeo_manifest_digest(&format!("docker://{}/tunnel/after:v1", n.addr)),
            index2,
            "on node {}",
            n.addr
        );
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
    cl.ready(Duration::from_secs(20)).await;

    let src = dir.path().join("src");
    let index = write_layout(&src, 43);
    skopeo_push(&src, &format!("docker://{}/two/app:v1", a.shared()));
    pull_all(&src, b.shared(), "two/app:v1", &dir.path().join("via-b"));

    eprintln!("kill -9 relay a; b serves meanwhile; a comes back and the agents find it");
    a.kill9();
    assert_eq!(skopeo_manifest_digest(&format!("docker://{}/two/app:v1", b.shared())), index);
    a.spawn();
    let t = Instant::now();
    a.wait_agents(3, Duration::from_secs(20)).await;
    eprintln!("all three agents back on relay a after {:?}", t.elapsed());
    pull_all(&src, a.shared(), "two/app:v1", &dir.path().join("via-a-again"));
}

/// What one push-then-pull step through the relay ended in.
enum Step {
    /// Pushed (manifest 201) and read back right: the tag and its digest.
    Acked(String, String),
    /// Broken by a kill: a connection reset, or an upload session whose owner died
    /// (`BLOB_UPLOAD_UNKNOWN`, after which a client starts over). Retried.
    Casualty(String),
}

/// Pushes a small image under `tag` through `base` and reads it back; any wrong answer panics.
async fn push_and_check(c: &reqwest::Client, base: &str, tag: &str) -> Step {
    macro_rules! send {
        ($req:expr) => {
            match $req.send().await {
                Ok(r) => r,
                Err(e) => return Step::Casualty(format!("connection: {e}")),
            }
        };
    }
    let layer: Vec<u8> = tag.bytes().cycle().take(200_000).collect();
    let config = format!("{{\"tag\":\"{tag}\"}}").into_bytes();
    let mut digests = Vec::new();
    for blob in [&config, &layer] {
        let r = send!(c.post(format!("{base}/v2/chaos/app/blobs/uploads/")));
        assert_eq!(r.status(), 202, "upload start");
        let loc = r.headers()["location"].to_str().unwrap().to_string();
        let d = sha256(blob);
        let r = send!(c.put(format!("{base}{loc}?digest={d}")).body(blob.clone()));
        if r.status() == 404 {
            let body = r.text().await.unwrap_or_default();
            assert!(body.contains("BLOB_UPLOAD_UNKNOWN"), "upload PUT: 404 {body}");
            return Step::Casualty("upload session lost with its node".into());
        }
        assert_eq!(r.status(), 201, "upload PUT: {}", r.text().await.unwrap_or_default());
        digests.push((d, blob.len()));
    }
    let m = image_manifest((&digests[0].0, digests[0].1), &[(&digests[1].0, digests[1].1)], serde_json::json!({}));
    let md = sha256(&m);
    let r = send!(c.put(format!("{base}/v2/chaos/app/manifests/{tag}")).header("content-type", OCI_MANIFEST).body(m));
    assert_eq!(r.status(), 201, "manifest PUT: {}", r.text().await.unwrap_or_default());
    // read back through the relay: possibly another node, which must see the write
    let r = send!(c.get(format!("{base}/v2/chaos/app/manifests/{tag}")).header("accept", OCI_MANIFEST));
    assert_eq!(r.status(), 200, "manifest GET after its PUT");
    let Ok(body) = r.bytes().await else { return Step::Casualty("connection during a read".into()) };
    assert_eq!(sha256(&body), md, "the manifest read back is the one pushed");
    let r = send!(c.get(format!("{base}/v2/chaos/app/blobs/{}", digests[1].0)));
    assert_eq!(r.status(), 200, "layer GET");
    let Ok(body) = r.bytes().await else { return Step::Casualty("connection during a read".into()) };
    assert!(body == layer, "the layer read back is the one pushed");
    Step::Acked(tag.to_string(), md)
}

/// What a load client ended with: the tags it pushed and read back, with their digests, and
/// the requests broken by a node's death.
type Outcome = (Vec<(String, String)>, Vec<String>);

/// `n` clients pushing and reading back one image after another through `base` (tags
/// `<prefix><client>-<i>`) until `stop`; an HTTP error panics the client.
fn load_clients(
    n: usize,
    base: &str,
    prefix: &'static str,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Outcome>> {
    (0..n)
        .map(|w| {
            let (base, stop) = (base.to_string(), stop.clone());
            tokio::spawn(async move {
                let c = client();
                let (mut acked, mut casualties) = (Vec::new(), Vec::new());
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    match push_and_check(&c, &base, &format!("{prefix}{w}-{i}")).await {
                        Step::Acked(tag, d) => acked.push((tag, d)),
                        Step::Casualty(why) => casualties.push(why),
                    }
                }
                (acked, casualties)
            })
        })
        .collect()
}

async fn join_clients(clients: Vec<tokio::task::JoinHandle<Outcome>>) -> Outcome {
    let (mut acked, mut casualties) = (Vec::new(), Vec::new());
    for c in clients {
        let (a, x) = c.await.expect("a client got an HTTP error");
        acked.extend(a);
        casualties.extend(x);
    }
    (acked, casualties)
}

/// Every acknowledged push is on every node, digest for digest.
async fn on_every_node(cl: &Cluster, acked: &[(String, String)]) {
    let c = client();
    for n in &cl.nodes {
        for (tag, d) in acked {
            let r = c
                .head(n.url(&format!("/v2/chaos/app/manifests/{tag}")))
                .header("accept", OCI_MANIFEST)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{tag} on {} ({} acknowledged)", n.addr, acked.len());
            assert_eq!(r.headers()["docker-content-digest"], d.as_str(), "{tag} on {}", n.addr);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_and_pulls_through_the_relay_while_followers_are_killed_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, cl, leader) = behind_relay(dir.path(), |_| String::new()).await;
    let base = format!("http://{}", relay.shared());
    let cl = std::sync::Arc::new(std::sync::Mutex::new(cl));

    // kill -9 a follower, restart it, the other follower, ...: four cycles
    let killer = {
        let cl = cl.clone();
        tokio::task::spawn_blocking(move || {
            for cycle in 0..4 {
                let victim = (leader + 1 + cycle % 2) % 3;
                std::thread::sleep(Duration::from_millis(700));
                eprintln!("cycle {cycle}: kill -9 node {}", victim + 1);
                cl.lock().unwrap().nodes[victim].kill9();
                std::thread::sleep(Duration::from_millis(700));
                eprintln!("cycle {cycle}: restart node {}", victim + 1);
                cl.lock().unwrap().nodes[victim].spawn();
            }
        })
    };
    let c = client();
    let (mut acked, mut casualties) = (Vec::new(), Vec::new());
    let mut i = 0;
    while !killer.is_finished() {
        i += 1;
        match push_and_check(&c, &base, &format!("t{i}")).await {
            Step::Acked(tag, d) => acked.push((tag, d)),
            Step::Casualty(why) => casualties.push(why),
        }
    }
    killer.await.unwrap();
    eprintln!("{} steps acknowledged and read back, {} broken by kills: {casualties:?}", acked.len(), casualties.len());
    assert!(acked.len() >= 10, "the relay kept serving while nodes died: {} steps", acked.len());
    // each kill breaks at most the requests in flight on that node's connections
    assert!(casualties.len() <= 8, "{casualties:?}");

    // every acknowledged push is on every node, digest for digest
    relay.wait_agents(3, Duration::from_secs(20)).await;
    let cl = std::sync::Arc::into_inner(cl).expect("the killer is done").into_inner().unwrap();
    on_every_node(&cl, &acked).await;
}

/// Issue: a leader killed under load made every request that needed it fail with 503 until the
/// next election. Now only requests in flight on the killed node's own connections may fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kills_under_load_through_the_relay_fail_only_requests_on_the_killed_node() {
    const CLIENTS: usize = 3;
    const KILLS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let (relay, mut cl, _) = behind_relay(dir.path(), |_| String::new()).await;
    let base = format!("http://{}", relay.shared());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // writes carry proposal ids once every node has seen the others' versions
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in &cl.nodes {
        while !n.health().await.is_some_and(|h| h["proposal_ids"] == true) {
            assert!(Instant::now() < deadline, "proposal ids not on at {}", n.addr);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // each client pushes and reads back one image after another; any HTTP error panics there
    let clients = load_clients(CLIENTS, &base, "w", &stop);
    for k in 0..KILLS {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let leader = cl.leader(Duration::from_secs(20)).await;
        eprintln!("kill {k}: kill -9 the leader, node {}", leader + 1);
        cl.nodes[leader].kill9();
        // the two others elect a leader and serve meanwhile
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cl.nodes[leader].spawn();
        cl.ready(Duration::from_secs(30)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, casualties) = join_clients(clients).await;
    eprintln!(
        "{} images acknowledged and read back, {} requests broken by kills: {casualties:?}",
        acked.len(),
        casualties.len()
    );
    assert!(acked.len() >= 30, "the relay kept serving while leaders died: {}", acked.len());
    // a kill breaks at most what each client had in flight on the killed node: a request, or
    // an upload session it owned
    assert!(casualties.len() <= 2 * CLIENTS * KILLS, "{casualties:?}");

    on_every_node(&cl, &acked).await;
}

/// A rolling restart: each node in turn gets SIGTERM, is started again and catches up, under
/// pushes and pulls through the relay. No client request fails: a stopping node leaves the
/// relay first and finishes what it has (its peer port stays up for that), and a restarted one
/// takes traffic only once it is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_of_each_node_in_turn_under_load_through_the_relay_fails_nothing() {
    const CLIENTS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let (relay, mut cl, leader) = behind_relay(dir.path(), |_| String::new()).await;
    let base = format!("http://{}", relay.shared());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = load_clients(CLIENTS, &base, "r", &stop);
    // the followers first, the leader last (one election), as cluster/local/rolling-restart.sh
    let order: Vec<usize> = (1..=3).map(|k| (leader + k) % 3).collect();
    for i in order {
        tokio::time::sleep(Duration::from_millis(700)).await;
        eprintln!("SIGTERM node {}", i + 1);
        let status = cl.nodes[i].terminate();
        assert!(status.success(), "node {} stopped with {status}", i + 1);
        cl.nodes[i].spawn();
        cl.ready(Duration::from_secs(30)).await;
        relay.wait_agents(3, Duration::from_secs(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, casualties) = join_clients(clients).await;
    eprintln!("{} images acknowledged and read back; failed: {casualties:?}", acked.len());
    assert!(casualties.is_empty(), "requests failed during the rolling restart: {casualties:?}");
    assert!(acked.len() >= 20, "{}", acked.len());
    on_every_node(&cl, &acked).await;
}
