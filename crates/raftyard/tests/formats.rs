//! Every data format a release has written opens and serves with this binary: each
//! `fixtures/data-format-<N>.tar.gz` (made by `fixtures/make-data-fixture.py` with the release
//! that introduced format N) is unpacked, started, read against its JSON, written to, and
//! restarted. This test fails the day a format changes without an upgrade path.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json";

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".tar.gz"))
        .collect();
    v.sort();
    v
}

/// Checks that `n` serves everything the fixture's JSON names.
async fn serves(n: &Node, expect: &serde_json::Value) {
    let c = client();
    for (name, digest) in expect["tags"].as_object().unwrap() {
        let (repo, tag) = name.rsplit_once(':').unwrap();
        let r = c.get(n.url(&format!("/v2/{repo}/manifests/{tag}"))).header("accept", ACCEPT).send().await.unwrap();
        assert_eq!(r.status(), 200, "{name}");
        assert_eq!(r.headers()["docker-content-digest"], digest.as_str().unwrap(), "{name}");
        assert_eq!(sha256(&r.bytes().await.unwrap()), digest.as_str().unwrap(), "{name}: the bytes");
    }
    for (repo, blobs) in expect["blobs"].as_object().unwrap() {
        for d in blobs.as_array().unwrap() {
            let r = c.get(n.url(&format!("/v2/{repo}/blobs/{}", d.as_str().unwrap()))).send().await.unwrap();
            assert_eq!(r.status(), 200, "{repo} blob {d}");
            assert_eq!(sha256(&r.bytes().await.unwrap()), d.as_str().unwrap());
        }
    }
    for (at, referrers) in expect["referrers"].as_object().unwrap() {
        let (repo, subject) = at.split_once('@').unwrap();
        let r = c.get(n.url(&format!("/v2/{repo}/referrers/{subject}"))).send().await.unwrap();
        let index: serde_json::Value = r.json().await.unwrap();
        let got: Vec<&str> =
            index["manifests"].as_array().unwrap().iter().map(|m| m["digest"].as_str().unwrap()).collect();
        let want: Vec<&str> = referrers.as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
        assert_eq!(got, want, "referrers of {at}");
    }
    for (repo, blobs) in expect.get("absent_blobs").and_then(|b| b.as_object()).into_iter().flatten() {
        for d in blobs.as_array().unwrap() {
            let r = c.head(n.url(&format!("/v2/{repo}/blobs/{}", d.as_str().unwrap()))).send().await.unwrap();
            assert_eq!(r.status(), 404, "{repo} blob {d} was collected");
        }
    }
    for name in expect["absent_tags"].as_array().unwrap() {
        let (repo, tag) = name.as_str().unwrap().rsplit_once(':').unwrap();
        let r = c.head(n.url(&format!("/v2/{repo}/manifests/{tag}"))).header("accept", ACCEPT).send().await.unwrap();
        assert_eq!(r.status(), 404, "{name} was deleted");
    }
    if let Some(usage) = expect.get("usage").and_then(|u| u.as_object()) {
        let got: serde_json::Value = c.get(n.url("/v2/_raftyard/usage")).send().await.unwrap().json().await.unwrap();
        for (repo, want) in usage {
            let found = got["repositories"].as_array().unwrap().iter().find(|r| r["repository"] == repo.as_str());
            let found = found.unwrap_or_else(|| panic!("usage of {repo}: {got}"));
            for k in ["bytes", "blobs", "manifests"] {
                assert_eq!(found[k], want[k], "usage of {repo}: {k}");
            }
        }
    }
    for repo in expect.get("full_quotas").and_then(|q| q.as_array()).into_iter().flatten() {
        let r = c.post(n.url(&format!("/v2/{}/blobs/uploads/", repo.as_str().unwrap()))).send().await.unwrap();
        assert_eq!(r.status(), 403, "{repo} is at its quota");
    }
    let events = c.get(n.url("/v2/_raftyard/events?since=0&limit=100000")).send().await.unwrap().text().await.unwrap();
    let entries = events.lines().filter(|l| !l.trim().is_empty()).count() as u64;
    assert!(entries >= expect["journal_entries"].as_u64().unwrap(), "the journal is whole: {entries}");
}

#[tokio::test]
async fn every_data_format_written_by_a_release_opens_and_serves() {
    let fixtures = fixtures();
    assert!(!fixtures.is_empty(), "no fixture in tests/fixtures");
    for tarball in fixtures {
        let name = tarball.file_name().unwrap().to_string_lossy().trim_end_matches(".tar.gz").to_string();
        eprintln!("{name}");
        let expect: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tarball.with_file_name(format!("{name}.json"))).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("tar").arg("-xzf").arg(&tarball).arg("-C").arg(dir.path()));
        let data = dir.path().join("data");
        let mut n = Node::start(&data);
        serves(&n, &expect).await;

        // it takes writes, and keeps everything across a restart
        let c = client();
        let d = push_image(&c, &n, "fixture/new", "v1", name.as_bytes()).await;
        n.terminate();
        n.spawn();
        serves(&n, &expect).await;
        pull_image(&c, &n, "fixture/new", "v1", &d).await;
        let stamp = std::fs::read_to_string(data.join("FORMAT")).unwrap();
        assert!(stamp.starts_with("raftyard-data "), "stamped with this binary's format: {stamp}");
    }
}

#[test]
fn a_data_directory_of_a_newer_format_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("FORMAT"), "raftyard-data 999\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_raftyard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused");
    assert!(err.contains("data format 999") && err.contains("newer raftyard"), "{err}");
    assert!(!data.join("meta").exists(), "nothing was written");
}
