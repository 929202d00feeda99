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

/// Waits until `query` (PromQL) answers a non-empty vector whose samples `ok` accepts (the
/// rules and scrapes run every second: an early answer may predate them); the samples' values
/// by their `instance` (or `""`).
async fn query_until(
    prom: &str,
    q: &str,
    ok: impl Fn(&[(String, f64)]) -> bool,
    timeout: Duration,
) -> Vec<(String, f64)> {
    let deadline = Instant::now() + timeout;
    let c = client();
    let mut last = Vec::new();
    loop {
        let r = c.get(format!("http://{prom}/api/v1/query")).query(&[("query", q)]).send().await;
        if let Ok(r) = r {
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            last = v["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|s| {
                    let inst = s["metric"]["instance"].as_str().unwrap_or("").to_string();
                    (inst, s["value"][1].as_str().unwrap().parse().unwrap())
                })
                .collect();
            if !last.is_empty() && ok(&last) {
                return last;
            }
        }
        assert!(Instant::now() < deadline, "{q} never answered as expected; last: {last:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The single value of `q` once it equals `want`.
async fn query_value(prom: &str, q: &str, want: f64, timeout: Duration) {
    query_until(prom, q, |v| v.len() == 1 && v[0].1 == want, timeout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_scrapes_the_cluster_and_evaluates_the_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let (relay, mut cl, leader) = behind_relay(dir.path(), |_| String::new()).await;
    let c = client();
    let d = push_image(&c, &cl.nodes[leader], "obs/app", "v1", b"observed").await;
    pull_image(&c, &cl.nodes[(leader + 1) % 3], "obs/app", "v1", &d).await;

    // what each target serves is clean OpenMetrics/Prometheus text
    for (i, n) in cl.nodes.iter().enumerate() {
        let text = c.get(n.url("/metrics")).send().await.unwrap().text().await.unwrap();
        assert_eq!(promtool_lint(&text), "", "node metrics:\n{text}");
        for name in [
            "raftyard_ready 1",
            "process_resident_memory_bytes",
            "raftyard_disk_free_bytes",
            "raftyard_http_requests_in_flight 1", // this scrape
            "raftyard_raft_leader_changes_total",
            "raftyard_raft_proposal_duration_seconds_count",
        ] {
            assert!(text.contains(name), "{name} in\n{text}");
        }
        // its tunnel agent is connected to the relay, and says so
        let connected = text.lines().find(|l| l.starts_with("raftyard_tunnel_agent_connected{relay="));
        assert!(connected.is_some_and(|l| l.ends_with(" 1")), "{text}");
        assert!(text.contains("raftyard_tunnel_agent_connections_total{relay="), "{text}");
        assert!(text.contains("raftyard_tunnel_agent_bytes_total{direction=\"in\"}"), "{text}");
        if i == leader {
            assert!(text.contains("raftyard_raft_follower_lag_entries{node="), "{text}");
            // the push went to the leader: its uploads waited for their copies
            let waits = text
                .lines()
                .find_map(|l| l.strip_prefix("raftyard_blob_quorum_wait_seconds_count "))
                .and_then(|v| v.parse::<u64>().ok());
            assert!(waits.is_some_and(|w| w >= 2), "{text}");
        }
    }
    let om = c
        .get(cl.nodes[0].url("/metrics"))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .unwrap();
    assert!(om.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    assert!(om.text().await.unwrap().ends_with("# EOF\n"));
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
    query_value(&listen, "sum(up)", 4.0, t).await;
    query_value(&listen, "sum(raftyard_raft_is_leader)", 1.0, t).await;
    query_value(&listen, "raftyard:available", 1.0, t).await; // the recording rule
    query_value(&listen, r#"raftyard_relay_service_agents{service="registry"}"#, 3.0, t).await;
    // the push and the pull were counted
    query_until(&listen, r#"sum(raftyard_http_requests_total{route="manifest"})"#, |v| v[0].1 >= 2.0, t).await;

    // every rule loads and evaluates
    let rules: serde_json::Value =
        c.get(format!("http://{listen}/api/v1/rules")).send().await.unwrap().json().await.unwrap();
    let all: Vec<&serde_json::Value> =
        rules["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    assert_eq!(all.len(), 15, "{rules}");
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
    let down = query_until(&listen, r#"up{job="raftyard"} == 0"#, |_| true, t).await;
    assert_eq!(down[0].0, cl.nodes[victim].addr);
    // the leader's calls to it fail, and are counted
    let victim_peer = cl.nodes[victim].peer.clone();
    let leader_url = cl.nodes[leader].url("/metrics");
    let deadline = Instant::now() + t;
    loop {
        let text = c.get(&leader_url).send().await.unwrap().text().await.unwrap();
        let errors = format!("raftyard_peer_rpc_errors_total{{peer=\"{victim_peer}\"");
        if text.contains(&errors) {
            break;
        }
        assert!(Instant::now() < deadline, "no failed call to {victim_peer} counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
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

mod otlp {
    //! An OTLP/gRPC trace receiver of the test's own: every span exported to it, with the
    //! `service.instance.id` of the node that sent it.
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
    use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::trace::v1::Span;

    #[derive(Default, Clone)]
    pub struct Receiver(pub Arc<Mutex<Vec<(String, Span)>>>);

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(
            &self,
            req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            for rs in req.into_inner().resource_spans {
                let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
                let instance = attrs
                    .iter()
                    .find(|a| a.key == "service.instance.id")
                    .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(s) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for s in ss.spans {
                        self.0.lock().unwrap().push((instance.clone(), s));
                    }
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
        }
    }

    /// Serves on `addr` until the test ends.
    pub fn start(addr: std::net::SocketAddr) -> Receiver {
        let r = Receiver::default();
        let svc = TraceServiceServer::new(r.clone());
        tokio::spawn(tonic::transport::Server::builder().add_service(svc).serve(addr));
        r
    }
}

/// A push through a follower, carrying the client's `traceparent`, is one trace: the
/// follower's request span is a child of the client's span, and the calls it makes to the
/// leader and to the peers holding the blob's copies are spans of the same trace on those
/// nodes. The nodes' log lines are JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_through_a_follower_is_one_trace_across_nodes() {
    let port = free_port();
    let receiver = otlp::start(format!("127.0.0.1:{port}").parse().unwrap());
    let telemetry = format!(
        "[telemetry]\nlog_format = \"json\"\notlp_endpoint = \"http://127.0.0.1:{port}\"\notlp_protocol = \"grpc\"\n"
    );
    let env = [("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let cl = Cluster::start_each(3, |_| Extra { cluster: &telemetry, env: &env, ..Extra::default() });
    let leader = cl.leader(Duration::from_secs(20)).await;
    let follower = (leader + 1) % 3;

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    // the client's own span: the follower's request spans are its children
    let mut h = reqwest::header::HeaderMap::new();
    h.insert("traceparent", format!("00-{trace}-{parent}-01").parse().unwrap());
    let c = reqwest::Client::builder().default_headers(h).timeout(Duration::from_secs(30)).build().unwrap();
    let d = push_image(&c, &cl.nodes[follower], "traced/app", "v1", b"traced").await;
    pull_image(&client(), &cl.nodes[leader], "traced/app", "v1", &d).await;

    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (follower_id, leader_id) = ((follower + 1).to_string(), (leader + 1).to_string());
    loop {
        let spans: Vec<(String, String, String, String)> = receiver
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| hex(&s.trace_id) == trace)
            .map(|(i, s)| (i.clone(), s.name.clone(), hex(&s.span_id), hex(&s.parent_span_id)))
            .collect();
        let put = spans.iter().find(|(i, n, _, p)| *i == follower_id && n == "PUT manifest" && p == parent);
        // the write forwarded to the leader
        let on_leader = put.and_then(|put| {
            spans.iter().find(|(i, n, _, p)| *i == leader_id && *p == put.2 && n.ends_with("/Propose"))
        });
        let instances: std::collections::BTreeSet<&String> = spans.iter().map(|s| &s.0).collect();
        if put.is_some() && on_leader.is_some() {
            // the blob's copies went to the other nodes inside the same trace
            // and the blob's copies went to both other nodes within the same trace
            let replicated = spans.iter().filter(|(i, n, ..)| *i != follower_id && n.ends_with("/Replicate")).count();
            assert!(instances.len() == 3 && replicated >= 2, "{spans:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no cross-node trace yet: {spans:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let log = std::fs::read_to_string(&cl.nodes[follower].log).unwrap();
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{line}");
        lines += 1;
    }
    assert!(lines > 0, "the follower logged nothing");
}
