//! Real registry clients against one node: skopeo pushes an OCI image layout (a multi-platform
//! index) and pulls it back digest for digest; docker pushes and pulls an imported image.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Writes an OCI image layout with an index of two single-layer images; returns the index digest.
fn write_layout(dir: &Path, seed: u64) -> String {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| -> (String, usize) {
        let d = sha256(b);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), b).unwrap();
        (d, b.len())
    };
    let mut manifests = Vec::new();
    for arch in ["amd64", "arm64"] {
        let mut layer = vec![0u8; rng.gen_range(100_000..3_000_000)];
        rng.fill(&mut layer[..]);
        let (ld, ls) = put(&layer);
        let config = serde_json::to_vec(
            &json!({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": [ld]}}),
        )
        .unwrap();
        let (cd, cs) = put(&config);
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": ls}]
        }))
        .unwrap();
        let (md, ms) = put(&m);
        manifests.push(json!({"mediaType": OCI_MANIFEST, "digest": md, "size": ms, "platform": {"architecture": arch, "os": "linux"}}));
    }
    let index =
        serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})).unwrap();
    let (id, is) = put(&index);
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [{"mediaType": OCI_INDEX, "digest": id, "size": is, "annotations": {"org.opencontainers.image.ref.name": "v1"}}]})).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    id
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is it installed? the README's test command installs it)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn blob_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn skopeo_pushes_and_pulls_a_multi_platform_image() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"));
    let src = dir.path().join("src");
    let index = write_layout(&src, 7);
    let dest = format!("docker://{}/skopeo/app:v1", node.addr);
    eprintln!("skopeo copy --all to {dest}");
    // --preserve-digests: skopeo would otherwise compress the uncompressed layers on the way
    run(Command::new("skopeo")
        .args(["copy", "--all", "--preserve-digests", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(&dest));
    // the registry answers the same digest
    let inspect = run(Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false", &dest]));
    assert_eq!(sha256(inspect.as_bytes()), index);
    let r = client().head(node.url("/v2/skopeo/app/manifests/v1")).header("accept", OCI_INDEX).send().await.unwrap();
    assert_eq!(r.headers()["docker-content-digest"], index.as_str());
    // pull back everything, digest for digest
    let back = dir.path().join("back");
    run(Command::new("skopeo")
        .args(["copy", "--all", "--preserve-digests", "--src-tls-verify=false", &dest])
        .arg(format!("oci:{}:v1", back.display())));
    assert_eq!(blob_names(&src), blob_names(&back));
    // and a pull of one platform by digest through a second repository (cross-repo mount path)
    let dest2 = format!("docker://{}/skopeo/copy:v1", node.addr);
    run(Command::new("skopeo").args([
        "copy",
        "--all",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &dest,
        &dest2,
    ]));
    let tags = run(Command::new("skopeo").args([
        "list-tags",
        "--tls-verify=false",
        &format!("docker://{}/skopeo/copy", node.addr),
    ]));
    assert!(tags.contains("\"v1\""), "{tags}");
}

#[tokio::test]
async fn docker_pushes_and_pulls_an_imported_image() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"));
    // a root file system tarball made here: no base image is needed
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut junk = vec![0u8; 1_500_000];
    rng.fill(&mut junk[..]);
    std::fs::write(rootfs.join("etc/payload.bin"), &junk).unwrap();
    std::fs::write(rootfs.join("etc/hello"), format!("raftyard {}\n", node.addr)).unwrap();
    let tar = dir.path().join("rootfs.tar");
    run(Command::new("tar").arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg("."));
    let image = format!("{}/docker/imported:t{}", node.addr, std::process::id());
    run(Command::new("docker").args(["import"]).arg(&tar).arg(&image));
    let push = run(Command::new("docker").args(["push", &image]));
    let pushed_digest =
        push.split_whitespace().find(|w| w.starts_with("sha256:")).expect("digest in docker push output").to_string();
    run(Command::new("docker").args(["rmi", &image]));
    let pull = run(Command::new("docker").args(["pull", &image]));
    assert!(pull.contains(&pushed_digest), "pulled digest differs:\n{pull}");
    let inspect = run(Command::new("docker").args(["image", "inspect", "--format", "{{json .RepoDigests}}", &image]));
    assert!(inspect.contains(&pushed_digest), "{inspect}");
    let r = client()
        .get(node.url(&format!("/v2/docker/imported/manifests/{pushed_digest}")))
        .header("accept", "application/vnd.docker.distribution.manifest.v2+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    run(Command::new("docker").args(["rmi", &image]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skopeo_pushes_to_one_node_and_pulls_from_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let cl = Cluster::start(3);
    cl.leader(std::time::Duration::from_secs(20)).await;
    let src = dir.path().join("src");
    let index = write_layout(&src, 21);
    let dest = format!("docker://{}/multi/app:v1", cl.nodes[0].addr);
    run(Command::new("skopeo")
        .args(["copy", "--all", "--preserve-digests", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(&dest));
    for (i, n) in cl.nodes.iter().enumerate().skip(1) {
        let from = format!("docker://{}/multi/app:v1", n.addr);
        let raw = run(Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false", &from]));
        assert_eq!(sha256(raw.as_bytes()), index, "index digest on node {}", i + 1);
        let back = dir.path().join(format!("back{i}"));
        run(Command::new("skopeo")
            .args(["copy", "--all", "--preserve-digests", "--src-tls-verify=false", &from])
            .arg(format!("oci:{}:v1", back.display())));
        assert_eq!(blob_names(&src), blob_names(&back), "pulled from node {}", i + 1);
    }
}
