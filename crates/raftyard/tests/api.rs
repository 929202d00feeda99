//! The OCI distribution API of one node, over HTTP against the real binary: every endpoint,
//! the error codes and statuses, sha256 and sha512.

mod common;

use common::*;
use serde_json::json;

/// What a test talks to: one node, or one follower of a three-node cluster.
struct Env {
    _dir: Option<tempfile::TempDir>,
    _cluster: Option<Cluster>,
    _relay: Option<RelayProc>,
    node: Option<Node>,
    target: usize,
    c: reqwest::Client,
    /// The `Authorization` value `c` sends, for tests that make their own connections.
    auth: Option<&'static str>,
}

impl Env {
    async fn get(&self, path: &str) -> reqwest::Response {
        self.c.get(self.n().url(path)).send().await.unwrap()
    }
    async fn head(&self, path: &str) -> reqwest::Response {
        self.c.head(self.n().url(path)).send().await.unwrap()
    }
    async fn delete(&self, path: &str) -> reqwest::Response {
        self.c.delete(self.n().url(path)).send().await.unwrap()
    }
    async fn post(&self, path: &str) -> reqwest::Response {
        self.c.post(self.n().url(path)).send().await.unwrap()
    }
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start(&dir.path().join("data"));
    Env { _dir: Some(dir), _cluster: None, _relay: None, node: Some(n), target: 0, c: client(), auth: None }
}

/// A three-node cluster; requests go to a follower.
async fn follower_env() -> Env {
    let cl = Cluster::start(3);
    let leader = cl.leader(std::time::Duration::from_secs(20)).await;
    Env { _dir: None, _cluster: Some(cl), _relay: None, node: None, target: (leader + 1) % 3, c: client(), auth: None }
}

/// `admin:the-admin-password`
const ADMIN_BASIC: &str = "Basic YWRtaW46dGhlLWFkbWluLXBhc3N3b3Jk";

/// One node with token auth on, and a client that sends an admin's Basic credentials with
/// every request: the whole API behaves the same behind the door.
fn auth_env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let peer = format!("127.0.0.1:{}", free_port());
    let extra = Extra { cluster: "[auth]\nmode = \"token\"\n", ..Extra::default() };
    let n = Node::start_member_with(dir.path(), 1, &addr, &peer, &[], &extra);
    let pw = dir.path().join("admin-password");
    std::fs::write(&pw, "the-admin-password\n").unwrap();
    cli(&["user", "add", "admin", "--admin", "--password-file", pw.to_str().unwrap(), "--node", &peer]);
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(reqwest::header::AUTHORIZATION, ADMIN_BASIC.parse().unwrap());
    let c = reqwest::Client::builder()
        .default_headers(h)
        .timeout(std::time::Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    Env { _dir: Some(dir), _cluster: None, _relay: None, node: Some(n), target: 0, c, auth: Some(ADMIN_BASIC) }
}

/// A three-node cluster behind a tunnel relay; requests go to the relay's shared endpoint,
/// which spreads connections over the nodes.
async fn relay_env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let (relay, cl, _) = behind_relay(dir.path(), |_| String::new()).await;
    let shared = Node::remote(relay.shared());
    Env {
        _dir: Some(dir),
        _cluster: Some(cl),
        _relay: Some(relay),
        node: Some(shared),
        target: 0,
        c: client(),
        auth: None,
    }
}

impl Env {
    fn n(&self) -> &Node {
        match (&self.node, &self._cluster) {
            (Some(n), _) => n,
            (None, Some(cl)) => &cl.nodes[self.target],
            _ => unreachable!("an env has a node or a cluster"),
        }
    }
}

/// Runs each API test four times: against a single node, against a follower of a three-node
/// cluster (every write forwarded to the leader, every read through a read index), through
/// a tunnel relay in front of a three-node cluster (connections of one test land on different
/// nodes, so upload sessions are forwarded to their owner), and against a node with auth on.
macro_rules! on_every_topology {
    ($($name:ident),* $(,)?) => {
        mod single_node {
            $( #[tokio::test] async fn $name() { super::$name(super::env()).await } )*
        }
        mod on_a_follower {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 4)] async fn $name() { super::$name(super::follower_env().await).await } )*
        }
        mod through_the_relay {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 4)] async fn $name() { super::$name(super::relay_env().await).await } )*
        }
        mod with_auth {
            $( #[tokio::test] async fn $name() { super::$name(super::auth_env()).await } )*
        }
    };
}

on_every_topology!(
    base_endpoint,
    blob_pull_head_range_and_errors,
    monolithic_single_post_and_digest_mismatch,
    chunked_upload_with_status_out_of_order_and_final_chunk_in_put,
    cancel_upload_and_unknown_sessions,
    sha512_blobs_and_manifests,
    cross_repository_mounts,
    manifests_push_pull_negotiate_and_validate,
    index_tags_by_query_and_tag_listing,
    referrers_api_with_subject_and_filter,
    deletes_of_tags_manifests_and_blobs,
    names_catalog_and_methods,
    one_connection_pipelined_then_handed_off,
    http2_prior_knowledge,
);

async fn base_endpoint(e: Env) {
    let r = e.get("/v2/").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-distribution-api-version"], "registry/2.0");
    let r = e.head("/v2/").await;
    assert_eq!(r.status(), 200);
    let r = e.get("/v3/").await;
    assert_eq!(r.status(), 404);
}

async fn blob_pull_head_range_and_errors(e: Env) {
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let d = push_blob(&e.c, e.n(), "a/b", &data).await;
    let r = e.get(&format!("/v2/a/b/blobs/{d}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], d.as_str());
    assert_eq!(r.bytes().await.unwrap().as_ref(), data.as_slice());
    let r = e.head(&format!("/v2/a/b/blobs/{d}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "100000");
    assert_eq!(r.headers()["docker-content-digest"], d.as_str());
    // ranges
    let r = e.c.get(e.n().url(&format!("/v2/a/b/blobs/{d}"))).header("range", "bytes=10-19").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/100000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[10..20]);
    let r = e.c.get(e.n().url(&format!("/v2/a/b/blobs/{d}"))).header("range", "bytes=-5").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[99_995..]);
    let r = e.c.get(e.n().url(&format!("/v2/a/b/blobs/{d}"))).header("range", "bytes=100000-").send().await.unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */100000");
    // unknown blob, blob of another repo, malformed and unsupported digests
    let unknown = sha256(b"nope");
    let r = e.get(&format!("/v2/a/b/blobs/{unknown}")).await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    let r = e.get(&format!("/v2/other/blobs/{d}")).await;
    assert_eq!(r.status(), 404);
    let r = e.head(&format!("/v2/a/b/blobs/{unknown}")).await;
    assert_eq!(r.status(), 404);
    for bad in ["sha256:abc", "sha256:ZZ", "nodigest", "md5:d41d8cd98f00b204e9800998ecf8427e"] {
        let r = e.get(&format!("/v2/a/b/blobs/{bad}")).await;
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(error_code(r).await, "DIGEST_INVALID");
    }
}

async fn monolithic_single_post_and_digest_mismatch(e: Env) {
    let data = b"single post blob".to_vec();
    let d = sha256(&data);
    let r = e.c.post(e.n().url(&format!("/v2/r/blobs/uploads/?digest={d}"))).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["location"], format!("/v2/r/blobs/{d}").as_str());
    assert_eq!(r.headers()["docker-content-digest"], d.as_str());
    // wrong digest: 400 DIGEST_INVALID, nothing stored
    let wrong = sha256(b"other");
    let r =
        e.c.post(e.n().url(&format!("/v2/r/blobs/uploads/?digest={wrong}"))).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = e.head(&format!("/v2/r/blobs/{wrong}")).await;
    assert_eq!(r.status(), 404);
    // POST then PUT with a wrong digest
    let r = e.post("/v2/r/blobs/uploads/").await;
    let loc = abs(e.n(), r.headers()["location"].to_str().unwrap());
    let r = e.c.put(format!("{loc}?digest={wrong}")).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    // PUT without digest
    let r = e.post("/v2/r/blobs/uploads/").await;
    let loc = abs(e.n(), r.headers()["location"].to_str().unwrap());
    let r = e.c.put(&loc).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    // Content-Length that disagrees with the body is refused by HTTP itself or as SIZE_INVALID
    let r = e.c.post(e.n().url(&format!("/v2/r/blobs/uploads/?digest={d}&x=1"))).body(Vec::new()).send().await.unwrap();
    assert_eq!(r.status(), 400);
}

async fn chunked_upload_with_status_out_of_order_and_final_chunk_in_put(e: Env) {
    let data: Vec<u8> = (0..30_000u32).map(|i| (i * 31 % 256) as u8).collect();
    let d = sha256(&data);
    let r = e.c.post(e.n().url("/v2/chunky/blobs/uploads/")).header("content-length", "0").send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert!(r.headers().contains_key("docker-upload-uuid"));
    let mut loc = abs(e.n(), r.headers()["location"].to_str().unwrap());
    // first chunk 0-9999
    let r =
        e.c.patch(&loc)
            .header("content-type", "application/octet-stream")
            .header("content-range", "0-9999")
            .body(data[..10_000].to_vec())
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["range"], "0-9999");
    loc = abs(e.n(), r.headers()["location"].to_str().unwrap());
    // out of order (gap), overlapping, and retried chunks: 416, state unchanged
    for cr in ["10001-19999", "5000-14999", "0-9999"] {
        let (a, b): (usize, usize) = {
            let (a, b) = cr.split_once('-').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        };
        let r = e.c.patch(&loc).header("content-range", cr).body(data[a..=b].to_vec()).send().await.unwrap();
        assert_eq!(r.status(), 416, "{cr}");
        assert_eq!(r.headers()["range"], "0-9999");
    }
    // status
    let r = e.c.get(&loc).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["range"], "0-9999");
    assert!(r.headers().contains_key("location"));
    // second chunk streamed without Content-Range
    let r = e.c.patch(&loc).body(data[10_000..20_000].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["range"], "0-19999");
    // last chunk in the closing PUT
    let r =
        e.c.put(format!("{loc}?digest={d}"))
            .header("content-range", "20000-29999")
            .body(data[20_000..].to_vec())
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let got = e.get(&format!("/v2/chunky/blobs/{d}")).await.bytes().await.unwrap();
    assert_eq!(got.as_ref(), data.as_slice());
    // the session is gone
    let r = e.c.get(&loc).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
}

async fn cancel_upload_and_unknown_sessions(e: Env) {
    let r = e.post("/v2/c/blobs/uploads/").await;
    let loc = abs(e.n(), r.headers()["location"].to_str().unwrap());
    let r = e.c.patch(&loc).body(vec![1u8; 100]).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = e.c.delete(&loc).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let r = e.c.get(&loc).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    let r = e.c.delete(&loc).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = e.c.patch(e.n().url("/v2/c/blobs/uploads/n1-doesnotexist")).body(vec![1u8]).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    // a session used through another repository is unknown there
    let r = e.post("/v2/c/blobs/uploads/").await;
    let loc = r.headers()["location"].to_str().unwrap().replace("/v2/c/", "/v2/d/");
    let r = e.c.get(e.n().url(&loc)).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

async fn sha512_blobs_and_manifests(e: Env) {
    let data = b"sha512 content".to_vec();
    let d = sha512(&data);
    // session announced as sha512
    let r = e.post("/v2/s/blobs/uploads/?digest-algorithm=sha512").await;
    assert_eq!(r.status(), 202);
    let loc = abs(e.n(), r.headers()["location"].to_str().unwrap());
    let r = e.c.put(format!("{loc}?digest={d}")).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let r = e.get(&format!("/v2/s/blobs/{d}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], d.as_str());
    assert_eq!(r.bytes().await.unwrap().as_ref(), data.as_slice());
    // single POST with a sha512 digest
    let data2 = b"second sha512".to_vec();
    let d2 = sha512(&data2);
    let r = e.c.post(e.n().url(&format!("/v2/s/blobs/uploads/?digest={d2}"))).body(data2.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    // session without digest-algorithm, finished with sha512
    let data3 = b"third".to_vec();
    let d3 = sha512(&data3);
    let r = e.post("/v2/s/blobs/uploads/").await;
    let loc = abs(e.n(), r.headers()["location"].to_str().unwrap());
    let r = e.c.put(format!("{loc}?digest={d3}")).body(data3.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    // unsupported algorithm
    let r = e.post("/v2/s/blobs/uploads/?digest-algorithm=md5").await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    // a manifest referencing sha512 blobs, pushed by its sha512 digest
    let m = image_manifest((&d, data.len()), &[(&d2, data2.len())], json!({}));
    let md = sha512(&m);
    let r = put_manifest(&e.c, e.n(), "s", &md, &m, OCI_MANIFEST).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    assert_eq!(r.headers()["docker-content-digest"], md.as_str());
    let r = e.get(&format!("/v2/s/manifests/{md}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), m.as_slice());
}

async fn cross_repository_mounts(e: Env) {
    let data = b"mount me".to_vec();
    let d = push_blob(&e.c, e.n(), "src/repo", &data).await;
    let r = e.post(&format!("/v2/dst/blobs/uploads/?mount={d}&from=src/repo")).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["location"], format!("/v2/dst/blobs/{d}").as_str());
    assert_eq!(r.headers()["docker-content-digest"], d.as_str());
    assert_eq!(e.get(&format!("/v2/dst/blobs/{d}")).await.status(), 200);
    // without from
    let r = e.post(&format!("/v2/dst2/blobs/uploads/?mount={d}")).await;
    assert_eq!(r.status(), 201);
    // from a repository that does not have it: an ordinary session instead
    let r = e.post(&format!("/v2/dst3/blobs/uploads/?mount={d}&from=nothere")).await;
    assert_eq!(r.status(), 202);
    assert!(r.headers().contains_key("location"));
    let unknown = sha256(b"unknown");
    let r = e.post(&format!("/v2/dst3/blobs/uploads/?mount={unknown}&from=src/repo")).await;
    assert_eq!(r.status(), 202);
    // deleted from every repository that linked it, a blob is gone: a mount without `from`
    // does not bring it back
    let gone = push_blob(&e.c, e.n(), "src/once", b"deleted everywhere").await;
    let r = e.c.delete(e.n().url(&format!("/v2/src/once/blobs/{gone}"))).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = e.post(&format!("/v2/dst4/blobs/uploads/?mount={gone}")).await;
    assert_eq!(r.status(), 202, "an ordinary session, not a mount");
    assert_eq!(e.get(&format!("/v2/dst4/blobs/{gone}")).await.status(), 404);
}

async fn manifests_push_pull_negotiate_and_validate(e: Env) {
    let cfg = b"{}".to_vec();
    let layer = b"layer".to_vec();
    let cd = push_blob(&e.c, e.n(), "m", &cfg).await;
    let ld = push_blob(&e.c, e.n(), "m", &layer).await;
    let m = image_manifest(
        (&cd, cfg.len()),
        &[(&ld, layer.len())],
        json!({"annotations": {"x": "y"}, "customField": {"k": [1, 2]}}),
    );
    let md = sha256(&m);
    let r = put_manifest(&e.c, e.n(), "m", "v1", &m, OCI_MANIFEST).await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["location"], format!("/v2/m/manifests/{md}").as_str());
    assert_eq!(r.headers()["docker-content-digest"], md.as_str());
    for reference in ["v1", md.as_str()] {
        let r =
            e.c.get(e.n().url(&format!("/v2/m/manifests/{reference}")))
                .header("accept", OCI_MANIFEST)
                .send()
                .await
                .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
        assert_eq!(r.headers()["docker-content-digest"], md.as_str());
        assert_eq!(r.bytes().await.unwrap().as_ref(), m.as_slice(), "byte-exact");
        let r = e.head(&format!("/v2/m/manifests/{reference}")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-length"], m.len().to_string().as_str());
    }
    // Accept that excludes the type
    let r = e.c.get(e.n().url("/v2/m/manifests/v1")).header("accept", OCI_INDEX).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // unknown manifest, invalid tag, malformed digest, unknown repository
    let r = e.get("/v2/m/manifests/nope").await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let r = e.get("/v2/m/manifests/sha256:1234").await;
    assert_eq!(r.status(), 400);
    let r = e.get("/v2/nothere/manifests/v1").await;
    assert_eq!(r.status(), 404);
    // missing blob
    let missing = sha256(b"missing");
    let bad = image_manifest((&cd, cfg.len()), &[(&missing, 7)], json!({}));
    let r = put_manifest(&e.c, e.n(), "m", "v2", &bad, OCI_MANIFEST).await;
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "MANIFEST_BLOB_UNKNOWN");
    assert_eq!(body["errors"][0]["detail"]["digests"][0], missing.as_str());
    // blobs of another repository do not count
    let r = put_manifest(&e.c, e.n(), "other", "v1", &m, OCI_MANIFEST).await;
    assert_eq!(r.status(), 400);
    // invalid manifests
    for (body, ct) in [
        (b"not json".to_vec(), OCI_MANIFEST),
        (b"{\"schemaVersion\":1}".to_vec(), OCI_MANIFEST),
        (m.clone(), OCI_INDEX),
    ] {
        let r = put_manifest(&e.c, e.n(), "m", "bad", &body, ct).await;
        assert_eq!(r.status(), 400);
        assert_eq!(error_code(r).await, "MANIFEST_INVALID");
    }
    // digest in URL that does not match the body
    let r = put_manifest(&e.c, e.n(), "m", &sha256(b"x"), &m, OCI_MANIFEST).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    // invalid tag on PUT
    let r = put_manifest(&e.c, e.n(), "m", "-bad", &m, OCI_MANIFEST).await;
    assert_eq!(r.status(), 400);
    // over 4 MiB: 413
    let huge = image_manifest((&cd, cfg.len()), &[], json!({"annotations": {"pad": "x".repeat(4 * 1024 * 1024)}}));
    let r = put_manifest(&e.c, e.n(), "m", "huge", &huge, OCI_MANIFEST).await;
    assert_eq!(r.status(), 413);
    // Docker schema 2 with a foreign layer that is not in the registry
    let dm = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": cd, "size": cfg.len()},
        "layers": [
            {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "digest": sha256(b"foreign"), "size": 7, "urls": ["https://example.com/layer"]},
            {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": ld, "size": layer.len()}
        ]
    })).unwrap();
    let r = put_manifest(&e.c, e.n(), "m", "docker", &dm, "application/vnd.docker.distribution.manifest.v2+json").await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let r =
        e.c.get(e.n().url("/v2/m/manifests/docker"))
            .header("accept", "application/vnd.docker.distribution.manifest.v2+json")
            .send()
            .await
            .unwrap();
    assert_eq!(r.headers()["content-type"], "application/vnd.docker.distribution.manifest.v2+json");
}

async fn index_tags_by_query_and_tag_listing(e: Env) {
    let m1 = push_image(&e.c, e.n(), "idx", "amd64", b"1").await;
    let m2 = push_image(&e.c, e.n(), "idx", "arm64", b"2").await;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": m1, "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": OCI_MANIFEST, "digest": m2, "size": 1, "platform": {"os": "linux", "architecture": "arm64"}}
        ]
    }))
    .unwrap();
    let id = sha256(&index);
    let r =
        e.c.put(e.n().url(&format!("/v2/idx/manifests/{id}?tag=1.0.0&tag=1.0&tag=latest")))
            .header("content-type", OCI_INDEX)
            .body(index.clone())
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 201);
    let tags: Vec<String> = r
        .headers()
        .get_all("oci-tag")
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(", ").map(String::from).collect::<Vec<_>>())
        .collect();
    assert_eq!(tags, vec!["1.0.0", "1.0", "latest"]);
    let r = e.get("/v2/idx/manifests/latest").await;
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    // an index referencing an unknown manifest
    let bad = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha256(b"q"), "size": 1}]})).unwrap();
    let r = put_manifest(&e.c, e.n(), "idx", "bad", &bad, OCI_INDEX).await;
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    // tag list: ASCII order, n/last pagination, Link
    let list = |q: &'static str| {
        let c = e.c.clone();
        let url = e.n().url(&format!("/v2/idx/tags/list{q}"));
        async move { c.get(url).send().await.unwrap() }
    };
    let r = list("").await;
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v, json!({"name": "idx", "tags": ["1.0", "1.0.0", "amd64", "arm64", "latest"]}));
    let r = list("?n=2").await;
    assert_eq!(r.headers()["link"], "</v2/idx/tags/list?n=2&last=1%2E0%2E0>; rel=\"next\"");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], json!(["1.0", "1.0.0"]));
    let v: serde_json::Value = list("?n=2&last=1.0.0").await.json().await.unwrap();
    assert_eq!(v["tags"], json!(["amd64", "arm64"]));
    let r = list("?n=2&last=arm64").await;
    assert!(r.headers().get("link").is_none());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], json!(["latest"]));
    let r = list("?n=0").await;
    assert!(r.headers().get("link").is_none());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], json!([]));
    let v: serde_json::Value = list("?last=amd64").await.json().await.unwrap();
    assert_eq!(v["tags"], json!(["arm64", "latest"]));
    // a page size that is not a number is a bad request, not an unsupported method
    for bad in ["?n=x", "?n=-1"] {
        let r = list(bad).await;
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(error_code(r).await, "PAGINATION_NUMBER_INVALID", "{bad}");
    }
    let r = e.get("/v2/unknown/tags/list").await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
}

async fn referrers_api_with_subject_and_filter(e: Env) {
    let subject = push_image(&e.c, e.n(), "ref", "app", b"s").await;
    let cfg = b"{}".to_vec();
    let cd = push_blob(&e.c, e.n(), "ref", &cfg).await;
    let mk = |t: &str, ann: &str| {
        image_manifest(
            (&cd, cfg.len()),
            &[],
            json!({"artifactType": t, "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": 10}, "annotations": {"note": ann}}),
        )
    };
    let sbom = mk("application/vnd.example.sbom", "s1");
    let sig = mk("application/vnd.example.sig", "s2");
    for a in [&sbom, &sig] {
        let r = put_manifest(&e.c, e.n(), "ref", &sha256(a), a, OCI_MANIFEST).await;
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["oci-subject"], subject.as_str());
    }
    // a referrer pushed before its subject exists is accepted
    let ghost = sha256(b"not yet");
    let early = image_manifest(
        (&cd, cfg.len()),
        &[],
        json!({"subject": {"mediaType": OCI_MANIFEST, "digest": ghost, "size": 1}}),
    );
    let r = put_manifest(&e.c, e.n(), "ref", &sha256(&early), &early, OCI_MANIFEST).await;
    assert_eq!(r.status(), 201);
    let r = e.get(&format!("/v2/ref/referrers/{subject}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["mediaType"], OCI_INDEX);
    let ms = v["manifests"].as_array().unwrap();
    assert_eq!(ms.len(), 2);
    let sbom_desc = ms.iter().find(|m| m["digest"] == sha256(&sbom).as_str()).unwrap();
    assert_eq!(sbom_desc["artifactType"], "application/vnd.example.sbom");
    assert_eq!(sbom_desc["annotations"]["note"], "s1");
    assert_eq!(sbom_desc["size"], sbom.len());
    // filter
    let r =
        e.c.get(e.n().url(&format!("/v2/ref/referrers/{subject}?artifactType=application/vnd.example.sig")))
            .send()
            .await
            .unwrap();
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(v["manifests"][0]["digest"], sha256(&sig).as_str());
    // artifactType falls back to the config media type
    let r = e.get(&format!("/v2/ref/referrers/{ghost}")).await;
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"][0]["artifactType"], "application/vnd.oci.image.config.v1+json");
    // unknown subject and unknown repository: empty index, never 404
    for url in [format!("/v2/ref/referrers/{}", sha256(b"none")), format!("/v2/none/referrers/{subject}")] {
        let r = e.c.get(e.n().url(&url)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["manifests"], json!([]));
    }
    let r = e.get("/v2/ref/referrers/sha256:bad").await;
    assert_eq!(r.status(), 400);
    // deleting a referrer removes it from the list
    let r = e.c.delete(e.n().url(&format!("/v2/ref/manifests/{}", sha256(&sig)))).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let v: serde_json::Value = e.get(&format!("/v2/ref/referrers/{subject}")).await.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
}

async fn deletes_of_tags_manifests_and_blobs(e: Env) {
    let md = push_image(&e.c, e.n(), "del", "t1", b"x").await;
    let r = put_manifest(
        &e.c,
        e.n(),
        "del",
        "t2",
        &e.get("/v2/del/manifests/t1").await.bytes().await.unwrap(),
        OCI_MANIFEST,
    )
    .await;
    assert_eq!(r.status(), 201);
    // delete a tag
    let r = e.delete("/v2/del/manifests/t1").await;
    assert_eq!(r.status(), 202);
    assert_eq!(e.get("/v2/del/manifests/t1").await.status(), 404);
    assert_eq!(e.get("/v2/del/manifests/t2").await.status(), 200);
    assert_eq!(e.delete("/v2/del/manifests/t1").await.status(), 404);
    // delete the manifest: digest and remaining tags are gone
    let r = e.delete(&format!("/v2/del/manifests/{md}")).await;
    assert_eq!(r.status(), 202);
    assert_eq!(e.get(&format!("/v2/del/manifests/{md}")).await.status(), 404);
    assert_eq!(e.get("/v2/del/manifests/t2").await.status(), 404);
    let r = e.delete(&format!("/v2/del/manifests/{md}")).await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    // blobs
    let d = push_blob(&e.c, e.n(), "del", b"blob").await;
    assert_eq!(e.delete(&format!("/v2/del/blobs/{d}")).await.status(), 202);
    assert_eq!(e.get(&format!("/v2/del/blobs/{d}")).await.status(), 404);
    let r = e.delete(&format!("/v2/del/blobs/{d}")).await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    assert_eq!(e.delete("/v2/del/blobs/sha256:zz").await.status(), 400);
}

async fn names_catalog_and_methods(e: Env) {
    for name in ["UPPER", "a//b", "-a", "a..b", &"x".repeat(256)] {
        let r = e.get(&format!("/v2/{name}/tags/list")).await;
        assert_eq!(r.status(), 400, "{name}");
        assert_eq!(error_code(r).await, "NAME_INVALID");
        let r = e.post(&format!("/v2/{name}/blobs/uploads/")).await;
        assert_eq!(r.status(), 400);
    }
    for repo in ["b/x", "a", "c", "b"] {
        push_blob(&e.c, e.n(), repo, repo.as_bytes()).await;
    }
    let v: serde_json::Value = e.get("/v2/_catalog").await.json().await.unwrap();
    assert_eq!(v, json!({"repositories": ["a", "b", "b/x", "c"]}));
    let r = e.get("/v2/_catalog?n=2").await;
    assert_eq!(r.headers()["link"], "</v2/_catalog?n=2&last=b>; rel=\"next\"");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["repositories"], json!(["a", "b"]));
    let v: serde_json::Value = e.get("/v2/_catalog?n=2&last=b").await.json().await.unwrap();
    assert_eq!(v["repositories"], json!(["b/x", "c"]));
    // methods
    let r = e.post("/v2/a/manifests/x").await;
    assert_eq!(r.status(), 405);
    assert_eq!(error_code(r).await, "UNSUPPORTED");
}

#[tokio::test]
async fn event_journal_over_http_and_cli() {
    let e = env();
    // the leader records the members' protocol on its own, soon after it starts: after that,
    // only this test writes
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !e.get("/v2/_raftyard/events?since=0").await.text().await.unwrap().contains("ClusterUpgraded") {
        assert!(std::time::Instant::now() < deadline, "ClusterUpgraded recorded");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let md = push_image(&e.c, e.n(), "ev", "v1", b"e").await;
    e.delete("/v2/ev/manifests/v1").await;
    let r = e.get("/v2/_raftyard/events?since=yesterday").await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "PAGINATION_NUMBER_INVALID");
    let text = e.get("/v2/_raftyard/events?since=0").await.text().await.unwrap();
    let entries: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let kinds: Vec<String> = entries
        .iter()
        .flat_map(|e| e["events"].as_array().unwrap().iter().map(|v| v["type"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            "ClusterUpgraded",
            "BlobLinked",
            "BlobPlaced",
            "BlobLinked",
            "BlobPlaced",
            "ManifestPut",
            "TagSet",
            "TagDeleted"
        ]
    );
    let put = entries.iter().find(|e| e["events"][0]["type"] == "ManifestPut").unwrap();
    assert_eq!(put["events"][0]["digest"], md.as_str());
    assert_eq!(put["events"][1]["tag"], "v1");
    // resumable by index
    let last = entries.last().unwrap()["index"].as_u64().unwrap();
    let text = e.get(&format!("/v2/_raftyard/events?since={last}")).await.text().await.unwrap();
    assert_eq!(text.lines().count(), 1);
    let text = e.get(&format!("/v2/_raftyard/events?since={}", last + 1)).await.text().await.unwrap();
    assert_eq!(text, "");
    // long poll wakes up on a new event
    let c = e.c.clone();
    let url = e.n().url(&format!("/v2/_raftyard/events?since={}&wait=10", last + 1));
    let poll = tokio::spawn(async move { c.get(url).send().await.unwrap().text().await.unwrap() });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    push_blob(&e.c, e.n(), "ev", b"later").await;
    let got = tokio::time::timeout(std::time::Duration::from_secs(5), poll).await.unwrap().unwrap();
    assert!(got.contains("BlobLinked"), "{got}");
    // the CLI prints the same journal
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_raftyard"))
        .args(["events", "--node", &e.n().url(""), "--since", "0"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let cli = String::from_utf8(out.stdout).unwrap();
    assert_eq!(cli.lines().count(), entries.len() + 1);
    assert!(cli.contains(&md));
}

#[tokio::test]
async fn tls_with_generated_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_raftyard"))
        .args(["certs", "self-signed", "--host", "registry.test", "--out"])
        .arg(&certs)
        .status()
        .unwrap();
    assert!(st.success());
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        format!("[registry.tls]\ncert = {:?}\nkey = {:?}\n", certs.join("cert.pem"), certs.join("key.pem")),
    )
    .unwrap();
    let n = Node::start_with(&dir.path().join("data"), &["--config", cfg.to_str().unwrap()]);
    let ca = reqwest::Certificate::from_pem(&std::fs::read(certs.join("ca.pem")).unwrap()).unwrap();
    let c = reqwest::Client::builder().add_root_certificate(ca).build().unwrap();
    let r = c.get(format!("https://{}/v2/", n.addr)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-distribution-api-version"], "registry/2.0");
    // plain HTTP on the TLS port does not get a registry answer
    assert!(client().get(n.url("/v2/")).send().await.map(|r| r.status() != 200).unwrap_or(true));
    // key file is private
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(certs.join("key.pem")).unwrap().permissions().mode() & 0o777, 0o600);
}

/// Raw HTTP/1.1 on one connection: pipelined bodiless requests are answered in order by the
/// fast path, a request with a body hands the connection over to hyper mid-stream, and the
/// connection keeps working afterwards.
async fn one_connection_pipelined_then_handed_off(e: Env) {
    use std::io::{Read, Write};
    let data = b"pipelined blob".to_vec();
    let d = push_blob(&e.c, e.n(), "pipe", &data).await;
    let mut s = std::net::TcpStream::connect(&e.n().addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let a = e.auth.map(|v| format!("Authorization: {v}\r\n")).unwrap_or_default();
    let req = format!(
        "GET /v2/ HTTP/1.1\r\nHost: x\r\n{a}\r\n\
         GET /v2/pipe/blobs/{d} HTTP/1.1\r\nHost: x\r\n{a}Range: bytes=0-8\r\n\r\n\
         POST /v2/pipe/blobs/uploads/?digest={d2} HTTP/1.1\r\nHost: x\r\n{a}Content-Length: 5\r\n\r\nhello\
         HEAD /v2/pipe/blobs/{d} HTTP/1.1\r\nHost: x\r\n{a}Connection: close\r\n\r\n",
        d2 = sha256(b"hello")
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out);
    let statuses: Vec<&str> = text.match_indices("HTTP/1.1 ").map(|(i, _)| &text[i..i + 12]).collect();
    assert_eq!(statuses.len(), 4, "{text}");
    assert!(statuses[0].starts_with("HTTP/1.1 200"));
    assert!(statuses[1].starts_with("HTTP/1.1 206"));
    assert!(text.contains("\r\n\r\npipelinedHTTP/1.1 201"), "range body, then the next response: {text}");
    assert!(statuses[2].starts_with("HTTP/1.1 201"));
    assert!(statuses[3].starts_with("HTTP/1.1 200"));
    assert_eq!(e.c.get(e.n().url(&format!("/v2/pipe/blobs/{}", sha256(b"hello")))).send().await.unwrap().status(), 200);
}

/// HTTP/2 with prior knowledge (h2c) is served too.
async fn http2_prior_knowledge(e: Env) {
    let mut h = reqwest::header::HeaderMap::new();
    if let Some(a) = e.auth {
        h.insert(reqwest::header::AUTHORIZATION, a.parse().unwrap());
    }
    let c = reqwest::Client::builder().http2_prior_knowledge().default_headers(h).build().unwrap();
    let r = c.get(e.n().url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let data = b"over h2".to_vec();
    let d = sha256(&data);
    let r = c.post(e.n().url(&format!("/v2/h2/blobs/uploads/?digest={d}"))).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let r = c.get(e.n().url(&format!("/v2/h2/blobs/{d}"))).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), data.as_slice());
}
