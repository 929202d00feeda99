//! Real registry clients against one node: skopeo pushes an OCI image layout (a multi-platform
//! index) and pulls it back digest for digest; docker pushes and pulls an imported image.

mod common;

use std::process::Command;

use common::*;
use rand::{Rng, SeedableRng};

#[tokio::test]
async fn skopeo_pushes_and_pulls_a_multi_platform_image() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("data"));
    let src = dir.path().join("src");
    let index = write_layout(&src, 7);
    let dest = format!("docker://{}/skopeo/app:v1", node.addr);
    eprintln!("skopeo copy --all to {dest}");
    skopeo_push(&src, &dest);
    // the registry answers the same digest
    assert_eq!(skopeo_manifest_digest(&dest), index);
    let r = client().head(node.url("/v2/skopeo/app/manifests/v1")).header("accept", OCI_INDEX).send().await.unwrap();
    assert_eq!(r.headers()["docker-content-digest"], index.as_str());
    // pull back everything, digest for digest
    let back = dir.path().join("back");
    skopeo_pull(&dest, &back);
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
    skopeo_push(&src, &dest);
    for (i, n) in cl.nodes.iter().enumerate().skip(1) {
        let from = format!("docker://{}/multi/app:v1", n.addr);
        assert_eq!(skopeo_manifest_digest(&from), index, "index digest on node {}", i + 1);
        let back = dir.path().join(format!("back{i}"));
        skopeo_pull(&from, &back);
        assert_eq!(blob_names(&src), blob_names(&back), "pulled from node {}", i + 1);
    }
}
