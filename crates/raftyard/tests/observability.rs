//! What an operator pages on: the metrics of a node and of the relay pass `promtool check
//! metrics`; the rules and their unit tests in `cluster/prometheus/` pass `promtool`; and a real
//! Prometheus, loading `cluster/prometheus/` pointed at a three-node cluster behind a relay,
//! scrapes every target, evaluates every rule, and holds a member-down alert once a node is
//! killed.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn prometheus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../cluster/prometheus")
}

/// `promtool check metrics` on `text`: its complaints (empty when clean).
fn promtool_lint(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus; the README's test command installs it)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() || !said.is_empty(), "promtool failed without a word");
    said
}

#[test]
fn the_rules_and_their_unit_tests_pass_promtool() {
    let dir = prometheus_dir();
    let config = run(Command::new("promtool").arg("check").arg("config").arg(dir.join("prometheus.yml")));
    assert!(config.contains("SUCCESS"), "{config}");
    let tests = run(Command::new("promtool").arg("test").arg("rules").arg(dir.join("alerts.test.yml")));
    assert!(tests.contains("SUCCESS"), "{tests}");
}

/// Waits until `query` (PromQL) answers a non-empty vector; its samples' values by their
/// `instance` (or `""`).
async fn query(prom: &str, q: &str, timeout: Duration) -> Vec<(String, f64)> {
    let deadline = Instant::now() + timeout;
    let c = client();
    loop {
        let r = c.get(format!("http://{prom}/api/v1/query")).query(&[("query", q)]).send().await;
        if let Ok(r) = r {
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
            if !result.is_empty() {
                return result
                    .iter()
                    .map(|s| {
                        let inst = s["metric"]["instance"].as_str().unwrap_or("").to_string();
                        (inst, s["value"][1].as_str().unwrap().parse().unwrap())
                    })
                    .collect();
            }
        }
        assert!(Instant::now() < deadline, "no answer to {q}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_scrapes_the_cluster_and_evaluates_the_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, mut cl, leader) = behind_relay(dir.path(), |_| String::new()).await;
    let c = client();
    let d = push_image(&c, &cl.nodes[leader], "obs/app", "v1", b"observed").await;
    pull_image(&c, &cl.nodes[(leader + 1) % 3], "obs/app", "v1", &d).await;

    // what each target serves is clean OpenMetrics/Prometheus text
    for n in &cl.nodes {
        let text = c.get(n.url("/metrics")).send().await.unwrap().text().await.unwrap();
        assert_eq!(promtool_lint(&text), "", "node metrics:\n{text}");
        for name in ["raftyard_ready 1", "process_resident_memory_bytes", "raftyard_disk_free_bytes"] {
            assert!(text.contains(name), "{name} in\n{text}");
        }
    }
    let text = c.get(format!("http://{}/metrics", relay.dashboard)).send().await.unwrap().text().await.unwrap();
    assert_eq!(promtool_lint(&text), "", "relay metrics:\n{text}");

    // cluster/prometheus as shipped, pointed at this cluster and scraping every second
    let src = prometheus_dir();
    let conf = std::fs::read_to_string(src.join("prometheus.yml")).unwrap();
    let nodes: Vec<String> = cl.nodes.iter().map(|n| format!("\"{}\"", n.addr)).collect();
    let conf = conf
        .replace(r#""127.0.0.1:5001", "127.0.0.1:5002", "127.0.0.1:5003""#, &nodes.join(", "))
        .replace("127.0.0.1:7500", &relay.dashboard)
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
        .replace("evaluation_interval: 15s", "evaluation_interval: 1s");
    assert!(conf.contains(&nodes[0]) && conf.contains(&relay.dashboard), "the shipped targets moved:\n{conf}");
    let pdir = dir.path().join("prometheus");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::write(pdir.join("prometheus.yml"), conf).unwrap();
    std::fs::copy(src.join("alerts.yml"), pdir.join("alerts.yml")).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(pdir.join("log")).unwrap();
    let prom = Command::new("prometheus")
        .arg(format!("--config.file={}", pdir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", pdir.join("data").display()))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("prometheus (Debian's prometheus; the README's test command installs it)");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prom = Kill(prom);

    let t = Duration::from_secs(30);
    let up = query(&listen, "sum(up)", t).await;
    let deadline = Instant::now() + t;
    let mut up = up[0].1;
    while up < 4.0 {
        assert!(Instant::now() < deadline, "targets up: {up} of 4");
        tokio::time::sleep(Duration::from_millis(250)).await;
        up = query(&listen, "sum(up)", t).await[0].1;
    }
    assert_eq!(query(&listen, "sum(raftyard_raft_is_leader)", t).await[0].1, 1.0);
    assert_eq!(query(&listen, "raftyard:available", t).await[0].1, 1.0, "the recording rule");
    let agents = query(&listen, r#"raftyard_relay_service_agents{service="registry"}"#, t).await;
    assert_eq!(agents[0].1, 3.0);
    let ok = query(&listen, "sum(raftyard_http_requests_total{route=\"manifest\"})", t).await;
    assert!(ok[0].1 >= 2.0, "the push and the pull were counted: {ok:?}");

    // every rule loads and evaluates
    let rules: serde_json::Value =
        c.get(format!("http://{listen}/api/v1/rules")).send().await.unwrap().json().await.unwrap();
    let all: Vec<&serde_json::Value> =
        rules["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    assert_eq!(all.len(), 14, "{rules}");
    let deadline = Instant::now() + t;
    loop {
        let rules: serde_json::Value =
            c.get(format!("http://{listen}/api/v1/rules")).send().await.unwrap().json().await.unwrap();
        let bad: Vec<String> = rules["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{} {} {}", r["name"], r["health"], r["lastError"]))
            .collect();
        if bad.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "rules not evaluated cleanly: {bad:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // a follower killed: its target goes down and the alert is pending (it fires after 1 m)
    let victim = (leader + 1) % 3;
    cl.nodes[victim].kill9();
    let down = query(&listen, r#"up{job="raftyard"} == 0"#, t).await;
    assert_eq!(down[0].0, cl.nodes[victim].addr);
    let deadline = Instant::now() + t;
    loop {
        let alerts: serde_json::Value =
            c.get(format!("http://{listen}/api/v1/alerts")).send().await.unwrap().json().await.unwrap();
        let member_down = alerts["data"]["alerts"].as_array().unwrap().iter().any(|a| {
            a["labels"]["alertname"] == "RaftyardMemberDown"
                && a["labels"]["instance"] == cl.nodes[victim].addr.as_str()
        });
        if member_down {
            break;
        }
        assert!(Instant::now() < deadline, "no RaftyardMemberDown alert: {alerts}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
