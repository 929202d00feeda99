//! `raftyard import`: a store written by the real CNCF Distribution (`docker-registry`, filled by
//! skopeo) moves into raftyard, read from its directory while it is stopped, and through its
//! API while it runs; skopeo pulls everything back digest for digest.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A `docker-registry` process (CNCF Distribution 2.8) on a free loopback port, storing under
/// `root`. Killed on drop.
struct Distribution {
    child: Child,
    addr: String,
}

impl Distribution {
    fn start(dir: &Path, root: &Path) -> Distribution {
        let addr = format!("127.0.0.1:{}", free_port());
        let config = dir.join(format!("config-{}.yml", addr.replace([':', '.'], "-")));
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n  secret: not-secret\n",
                root.display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (apt-get install docker-registry; the README's test command installs it)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Distribution { child, addr }
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn import(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_raftyard")).arg("import").args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "raftyard import {args:?}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Pulls `repo:v1` from `addr` with skopeo and checks the index digest and every blob.
fn pulled_whole(addr: &str, repo: &str, src: &Path, index: &str, into: &Path) {
    assert_eq!(skopeo_manifest_digest(&format!("docker://{addr}/{repo}:v1")), index, "{repo} on {addr}");
    skopeo_pull(&format!("docker://{addr}/{repo}:v1"), into);
    assert_eq!(blob_names(src), blob_names(into), "{repo}: every blob pulled from {addr}");
}

#[tokio::test]
async fn a_distribution_store_imports_from_its_directory_and_through_its_api() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("distribution");
    let (src_a, src_b) = (dir.path().join("src-a"), dir.path().join("src-b"));
    let index_a = write_layout(&src_a, 51);
    let index_b = write_layout(&src_b, 52);

    // the real docker-registry holds two repositories (one nested), filled by skopeo; one
    // manifest is tagged twice
    {
        let d = Distribution::start(dir.path(), &root);
        skopeo_push(&src_a, &format!("docker://{}/apps/web:v1", d.addr));
        skopeo_push(&src_b, &format!("docker://{}/team/tools/cli:v1", d.addr));
        run(Command::new("skopeo")
            .args(["copy", "--all", "--preserve-digests", "--src-tls-verify=false", "--dest-tls-verify=false"])
            .arg(format!("docker://{}/team/tools/cli:v1", d.addr))
            .arg(format!("docker://{}/team/tools/cli:stable", d.addr)));
    }

    eprintln!("from the stopped registry's directory");
    let n = Node::start(&dir.path().join("node-a"));
    let to = n.url("");
    let first = import(&["--from-distribution", root.to_str().unwrap(), "--to", &to]);
    eprintln!("{first}");
    assert!(first.contains("imported 2 repositories"), "{first}");
    assert!(first.contains("3 tags"), "{first}");
    pulled_whole(&n.addr, "apps/web", &src_a, &index_a, &dir.path().join("pull-a"));
    pulled_whole(&n.addr, "team/tools/cli", &src_b, &index_b, &dir.path().join("pull-b"));
    assert_eq!(skopeo_manifest_digest(&format!("docker://{}/team/tools/cli:stable", n.addr)), index_b);

    // again: nothing left to push
    let again = import(&["--from-distribution", root.to_str().unwrap(), "--to", &to]);
    assert!(again.contains("(0 pushed"), "a second import pushes no blob: {again}");

    // a damaged blob file is not imported as good content
    let layer = blob_names(&src_a)
        .into_iter()
        .find(|b| std::fs::metadata(src_a.join("blobs/sha256").join(b)).unwrap().len() > 1000);
    if let Some(hex) = layer {
        let n2 = Node::start(&dir.path().join("node-damaged"));
        let data = root.join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(&hex).join("data");
        let good = std::fs::read(&data).unwrap();
        let mut bad = good.clone();
        bad[10] ^= 0xff;
        std::fs::write(&data, &bad).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_raftyard"))
            .args(["import", "--from-distribution", root.to_str().unwrap(), "--to", &n2.url(""), "--repos", "apps/**"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(&hex), "a damaged blob stops the import, named: {err}");
        std::fs::write(&data, &good).unwrap();
    } else {
        panic!("the test layout has a layer over 1000 bytes");
    }

    eprintln!("through the API of the running registry");
    let d = Distribution::start(dir.path(), &root);
    let m = Node::start(&dir.path().join("node-b"));
    let out = import(&["--from-url", &format!("http://{}", d.addr), "--to", &m.url(""), "--repos", "team/**"]);
    eprintln!("{out}");
    assert!(out.contains("imported 1 repositories"), "only what --repos names: {out}");
    pulled_whole(&m.addr, "team/tools/cli", &src_b, &index_b, &dir.path().join("pull-c"));
    assert_eq!(skopeo_manifest_digest(&format!("docker://{}/team/tools/cli:stable", m.addr)), index_b);
    let r = client().get(m.url("/v2/apps/web/tags/list")).send().await.unwrap();
    assert_eq!(r.status(), 404, "apps/web was not asked for");
}
