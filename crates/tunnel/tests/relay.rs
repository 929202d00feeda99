//! Relay and agents in one process, forwarding small TCP services on loopback: load spreading,
//! failover, authentication, restarts and hostile peers.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use raftyard_tunnel::config::{RelayConfig, RelaySection, ServiceEntry, TlsFiles, Token};
use raftyard_tunnel::{Agent, LocalService, Relay, RelayAddrs, RelayLink};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const TOKEN_A: &str = "token-of-agent-a-0123456789";
const TOKEN_B: &str = "token-of-agent-b-0123456789";

/// A CA and a relay certificate for 127.0.0.1, written to `dir`.
fn certs(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
}

fn relay_config(dir: &Path, control: SocketAddr, services: &[(&str, SocketAddr)]) -> RelayConfig {
    let agent = |name: &str, token: &str| raftyard_tunnel::config::AgentEntry {
        name: name.into(),
        token: Token { token: Some(token.into()), token_file: None },
        services: None,
    };
    RelayConfig {
        relay: RelaySection {
            listen: control,
            dashboard: Some("127.0.0.1:0".parse().unwrap()),
            tls: TlsFiles { cert: dir.join("cert.pem"), key: dir.join("key.pem") },
            open_timeout_ms: 1000,
            handshake_timeout_ms: 1000,
            max_handshakes: 64,
            splice: true,
            dashboard_user: None,
            dashboard_password_file: None,
        },
        agents: vec![agent("a", TOKEN_A), agent("b", TOKEN_B)],
        services: services.iter().map(|(n, b)| ServiceEntry { name: n.to_string(), bind: *b }).collect(),
    }
}

fn link(dir: &Path, relay: SocketAddr, name: &str, token: &str) -> RelayLink {
    RelayLink {
        address: relay.to_string(),
        server_name: None,
        ca: dir.join("ca.pem"),
        name: Some(name.into()),
        token: Token { token: Some(token.into()), token_file: None },
        heartbeat_interval_secs: 1,
        heartbeat_timeout_secs: 3,
        reconnect_min_ms: 50,
        reconnect_max_ms: 400,
        stable_after_secs: 5,
        splice: true,
        pool: 4,
    }
}

fn unpooled(mut l: RelayLink) -> RelayLink {
    l.pool = 0;
    l
}

/// A TCP service that greets with `tag\n`, then echoes.
async fn echo(tag: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if s.write_all(format!("{tag}\n").as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

struct Running {
    addrs: RelayAddrs,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start_relay(cfg: &RelayConfig) -> Running {
    let relay = Relay::bind(cfg).await.unwrap();
    let addrs = relay.addrs();
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run(stop.clone()));
    Running { addrs, stop, task }
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }

    async fn status(&self) -> serde_json::Value {
        let url = format!("http://{}/api/status", self.addrs.dashboard.unwrap());
        let body = http_get(&url).await;
        serde_json::from_str(&body).unwrap()
    }

    /// Waits until `n` agents serve `service`.
    async fn wait_agents(&self, service: &str, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = self.status().await;
            let live = st["services"].as_array().unwrap().iter().find(|s| s["name"] == service).unwrap()["live_agents"]
                .as_u64()
                .unwrap();
            if live == n {
                return;
            }
            assert!(Instant::now() < deadline, "{service} has {live} live agents, want {n}: {st:#}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A bare HTTP/1.0 GET (the dashboard closes after answering).
async fn http_get(url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = TcpStream::connect(host).await.unwrap();
    s.write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// Connects to a service through the relay; returns the greeting tag, after checking that
/// 1 MB echoes back intact.
async fn visit(service: SocketAddr) -> String {
    let s = TcpStream::connect(service).await.unwrap();
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut tag = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut tag)).await.expect("greeting in time").unwrap();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let d = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&d).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert!(back == data, "echo intact: {} of {} bytes back", back.len(), data.len());
    tag.trim().to_string()
}

fn local(name: &str, addr: SocketAddr) -> LocalService {
    LocalService { name: name.into(), local: addr.to_string(), proxy_protocol: false }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_service_spreads_over_agents_and_fails_over() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let cfg = relay_config(
        dir.path(),
        "127.0.0.1:0".parse().unwrap(),
        &[("shared", "127.0.0.1:0".parse().unwrap()), ("only-a", "127.0.0.1:0".parse().unwrap())],
    );
    let relay = start_relay(&cfg).await;
    let ctl = relay.addrs.control;
    let (ea, eb) = (echo("A").await, echo("B").await);
    let a =
        Agent::start("a", &[link(dir.path(), ctl, "a", TOKEN_A)], &[local("shared", ea), local("only-a", ea)]).unwrap();
    let b = Agent::start("b", &[link(dir.path(), ctl, "b", TOKEN_B)], &[local("shared", eb)]).unwrap();
    relay.wait_agents("shared", 2).await;
    let shared = relay.addrs.services["shared"];

    // new connections go to both agents
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..8 {
        *seen.entry(visit(shared).await).or_insert(0) += 1;
    }
    println!("shared service, 8 visits: {seen:?}");
    // each agent keeps its pool of idle channels full as visitors use them
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = relay.status().await;
        let idle: Vec<u64> =
            st["agents"].as_array().unwrap().iter().map(|a| a["idle_channels"].as_u64().unwrap()).collect();
        if idle == [4, 4] {
            break;
        }
        assert!(Instant::now() < deadline, "idle channels {idle:?}: {st:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen.len(), 2, "both agents served: {seen:?}");
    assert_eq!(visit(relay.addrs.services["only-a"]).await, "A", "the per-agent service reaches its agent");

    // agent a leaves: from the next connection on, everything goes to b, without a failure
    a.stop().await;
    relay.wait_agents("shared", 1).await;
    for _ in 0..4 {
        assert_eq!(visit(shared).await, "B");
    }
    let st = relay.status().await;
    let svc = st["services"].as_array().unwrap().iter().find(|s| s["name"] == "shared").unwrap().clone();
    assert!(svc["bytes_in"].as_u64().unwrap() >= 12_000_000, "bytes counted: {svc}");
    assert_eq!(svc["connections_total"], 12);
    assert_eq!(svc["unserved_total"], 0);
    let metrics = http_get(&format!("http://{}/metrics", relay.addrs.dashboard.unwrap())).await;
    assert!(metrics.contains("raftyard_relay_connections_total{service=\"shared\"} 12"), "{metrics}");
    assert!(metrics.contains("raftyard_relay_agents 1"), "{metrics}");
    let html = http_get(&format!("http://{}/", relay.addrs.dashboard.unwrap())).await;
    assert!(html.contains("<td>shared</td>") && html.contains("<td>b</td>"), "{html}");

    b.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_local_service_is_down_hands_visitors_to_another() {
    for pooled in [true, false] {
        println!("pooled channels: {pooled}");
        local_service_down(pooled).await;
    }
}

async fn local_service_down(pooled: bool) {
    let pool = |l: RelayLink| if pooled { l } else { unpooled(l) };
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let cfg = relay_config(dir.path(), "127.0.0.1:0".parse().unwrap(), &[("shared", "127.0.0.1:0".parse().unwrap())]);
    let relay = start_relay(&cfg).await;
    let ctl = relay.addrs.control;
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap() // closed when `l` drops: connections are refused
    };
    let eb = echo("B").await;
    let a = Agent::start("a", &[pool(link(dir.path(), ctl, "a", TOKEN_A))], &[local("shared", dead)]).unwrap();
    let b = Agent::start("b", &[pool(link(dir.path(), ctl, "b", TOKEN_B))], &[local("shared", eb)]).unwrap();
    relay.wait_agents("shared", 2).await;
    let t = Instant::now();
    for _ in 0..6 {
        assert_eq!(visit(relay.addrs.services["shared"]).await, "B");
    }
    // OpenFailed comes back at once: no visitor waited for the open timeout (1 s)
    assert!(t.elapsed() < Duration::from_millis(900), "took {:?}", t.elapsed());
    a.stop().await;
    b.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_unknown_agents_are_refused_logged_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let cfg = relay_config(dir.path(), "127.0.0.1:0".parse().unwrap(), &[("shared", "127.0.0.1:0".parse().unwrap())]);
    let relay = start_relay(&cfg).await;
    let ctl = relay.addrs.control;
    let e = echo("X").await;
    // a's name with b's token; an agent the relay does not know
    let wrong = Agent::start("a", &[link(dir.path(), ctl, "a", TOKEN_B)], &[local("shared", e)]).unwrap();
    let stranger =
        Agent::start("zed", &[link(dir.path(), ctl, "zed", "a-token-nobody-configured")], &[local("shared", e)])
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = relay.status().await;
        if st["refused"]["bad_token"].as_u64() >= Some(2) && st["refused"]["unknown_agent"].as_u64() >= Some(2) {
            assert_eq!(st["agents"].as_array().unwrap().len(), 0, "nobody got in: {st:#}");
            break;
        }
        assert!(Instant::now() < deadline, "refusals not counted: {st:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = wrong.status();
    assert!(!s[0].connected && s[0].last_error.as_deref().unwrap().contains("authentication failed"), "{s:?}");
    assert_eq!(s[0].connects, 0);
    // no agent: a visitor is closed after the open timeout, and counted
    let mut v = TcpStream::connect(relay.addrs.services["shared"]).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), v.read(&mut buf)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)));
    wrong.stop().await;
    stranger.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reconnect_after_a_relay_restart_and_use_two_relays_at_once() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let cfg1 = relay_config(dir.path(), "127.0.0.1:0".parse().unwrap(), &[("shared", "127.0.0.1:0".parse().unwrap())]);
    let cfg2 = relay_config(dir.path(), "127.0.0.1:0".parse().unwrap(), &[("shared", "127.0.0.1:0".parse().unwrap())]);
    let r1 = start_relay(&cfg1).await;
    let r2 = start_relay(&cfg2).await;
    let e = echo("A").await;
    let a = Agent::start(
        "a",
        // relay 2 with channels dialled per visitor, relay 1 with a pool
        &[link(dir.path(), r1.addrs.control, "a", TOKEN_A), unpooled(link(dir.path(), r2.addrs.control, "a", TOKEN_A))],
        &[local("shared", e)],
    )
    .unwrap();
    r1.wait_agents("shared", 1).await;
    r2.wait_agents("shared", 1).await;
    assert_eq!(visit(r1.addrs.services["shared"]).await, "A");
    assert_eq!(visit(r2.addrs.services["shared"]).await, "A");

    // restart relay 1 on the same ports; relay 2 keeps serving meanwhile
    let same = relay_config(dir.path(), r1.addrs.control, &[("shared", r1.addrs.services["shared"])]);
    r1.stop().await;
    assert_eq!(visit(r2.addrs.services["shared"]).await, "A");
    let r1 = start_relay(&same).await;
    let t = Instant::now();
    r1.wait_agents("shared", 1).await;
    println!("agent back on the restarted relay after {:?}", t.elapsed());
    assert_eq!(visit(r1.addrs.services["shared"]).await, "A");
    let st = a.status();
    assert!(st.iter().all(|l| l.connected), "{st:?}");
    assert_eq!(st[0].connects, 2, "relay 1 saw a reconnect: {st:?}");
    assert_eq!(st[1].connects, 1, "relay 2 never dropped: {st:?}");
    a.stop().await;
    r1.stop().await;
    r2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peers_block_neither_the_accept_loop_nor_other_visitors() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let cfg = relay_config(dir.path(), "127.0.0.1:0".parse().unwrap(), &[("shared", "127.0.0.1:0".parse().unwrap())]);
    let relay = start_relay(&cfg).await;
    // 40 connections to the control port that never say a word, and 40 visitors that connect
    // and send nothing
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(TcpStream::connect(relay.addrs.control).await.unwrap());
    }
    let e = echo("A").await;
    let t = Instant::now();
    let a = Agent::start("a", &[link(dir.path(), relay.addrs.control, "a", TOKEN_A)], &[local("shared", e)]).unwrap();
    relay.wait_agents("shared", 1).await;
    assert!(t.elapsed() < Duration::from_millis(900), "agent got in behind silent peers: {:?}", t.elapsed());
    for _ in 0..40 {
        silent.push(TcpStream::connect(relay.addrs.services["shared"]).await.unwrap());
    }
    for _ in 0..3 {
        assert_eq!(visit(relay.addrs.services["shared"]).await, "A");
    }
    // the silent control connections time out (handshake_timeout 1 s) and are counted
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = relay.status().await;
    assert!(st["refused"]["timeout"].as_u64() >= Some(40), "{st:#}");
    a.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stops_answering_is_skipped_then_dropped() {
    use raftyard_tunnel::proto::{read_frame, write_frame, AgentMsg, RelayMsg};
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let cfg = relay_config(dir.path(), "127.0.0.1:0".parse().unwrap(), &[("shared", "127.0.0.1:0".parse().unwrap())]);
    let relay = start_relay(&cfg).await;
    // a hand-made agent "a": says hello, then neither opens channels nor pings (a paused node)
    let tcp = TcpStream::connect(relay.addrs.control).await.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut std::fs::read(dir.path().join("ca.pem")).unwrap().as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let tls_cfg =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let mut frozen = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls_cfg))
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let hello = AgentMsg::Hello {
        version: raftyard_tunnel::proto::VERSION,
        agent: "a".into(),
        token: TOKEN_A.into(),
        services: vec!["shared".into()],
        heartbeat_timeout_ms: 3000,
    };
    write_frame(&mut frozen, &hello).await.unwrap();
    assert!(matches!(read_frame::<_, RelayMsg>(&mut frozen).await.unwrap(), RelayMsg::Welcome { .. }));
    let e = echo("B").await;
    let b = Agent::start("b", &[link(dir.path(), relay.addrs.control, "b", TOKEN_B)], &[local("shared", e)]).unwrap();
    relay.wait_agents("shared", 2).await;

    // every visit succeeds; at most one waits out the open timeout on the frozen agent, which
    // is then passed over
    let t = Instant::now();
    for _ in 0..6 {
        assert_eq!(visit(relay.addrs.services["shared"]).await, "B");
    }
    assert!(t.elapsed() < Duration::from_millis(2500), "took {:?}", t.elapsed());
    let st = relay.status().await;
    assert_eq!(st["failed_opens"], 1, "{st:#}");
    // and after its heartbeat timeout (3 s) it is gone
    relay.wait_agents("shared", 1).await;
    b.stop().await;
    relay.stop().await;
}

/// Pooled data channels are bound to their session by a proof, not by a key sent in clear:
/// someone who learnt a live session's id (it crosses the plain path) and answers the relay's
/// challenge with anything but an HMAC under the session's pool key is refused and counted, and
/// gets no visitor; the agent's own channels keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_channel_without_the_sessions_proof_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let cfg = relay_config(dir.path(), "127.0.0.1:0".parse().unwrap(), &[("shared", "127.0.0.1:0".parse().unwrap())]);
    let relay = start_relay(&cfg).await;
    let ctl = relay.addrs.control;
    let a = Agent::start("a", &[link(dir.path(), ctl, "a", TOKEN_A)], &[local("shared", echo("A").await)]).unwrap();
    relay.wait_agents("shared", 1).await;
    let session = loop {
        if let Some(s) = a.status()[0].session {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for (i, proof) in [[0u8; 32], raftyard_tunnel::proto::pool_proof(&[9; 16], session, &[0; 16])].iter().enumerate() {
        let mut s = TcpStream::connect(ctl).await.unwrap();
        s.write_all(&raftyard_tunnel::proto::pool_preamble(session)).await.unwrap();
        let mut challenge = [0u8; 16];
        s.read_exact(&mut challenge).await.unwrap();
        s.write_all(proof).await.unwrap();
        // refused: closed without an activation
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "attempt {i}: {n:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = relay.status().await;
        if st["refused"]["bad_proof"].as_u64() == Some(2) {
            break;
        }
        assert!(Instant::now() < deadline, "refusals not counted: {st:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..6 {
        assert_eq!(visit(relay.addrs.services["shared"]).await, "A");
    }
    a.stop().await;
    relay.stop().await;
}

/// The dashboard behind a user and password (FRP's dashboard_user/dashboard_pwd): refused
/// without them or with wrong ones; one listening beyond loopback without a login is refused
/// at start.
#[tokio::test]
async fn dashboard_login() {
    let dir = tempfile::tempdir().unwrap();
    certs(dir.path());
    let pw = dir.path().join("dashboard-password");
    std::fs::write(&pw, "a-dashboard-password\n").unwrap();
    let mut cfg = relay_config(dir.path(), "127.0.0.1:0".parse().unwrap(), &[]);
    cfg.relay.dashboard_user = Some("ops".into());
    cfg.relay.dashboard_password_file = Some(pw.clone());
    let relay = raftyard_tunnel::Relay::bind(&cfg).await.unwrap();
    let dash = relay.addrs().dashboard.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(relay.run(stop.clone()));
    let get = |auth: Option<&str>| {
        let auth = auth.map(|a| {
            use base64::Engine as _;
            format!("Authorization: Basic {}\r\n", base64::engine::general_purpose::STANDARD.encode(a))
        });
        async move {
            let mut s = TcpStream::connect(dash).await.unwrap();
            let req = format!("GET /api/status HTTP/1.0\r\nHost: x\r\n{}\r\n", auth.unwrap_or_default());
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    assert!(get(None).await.starts_with("HTTP/1.0 401"));
    assert!(get(Some("ops:wrong-password")).await.starts_with("HTTP/1.0 401"));
    let ok = get(Some("ops:a-dashboard-password")).await;
    assert!(ok.starts_with("HTTP/1.0 200") && ok.contains("\"agents\""), "{ok}");
    stop.cancel();
    let mut open = relay_config(dir.path(), "127.0.0.1:0".parse().unwrap(), &[]);
    open.relay.dashboard = Some("0.0.0.0:0".parse().unwrap());
    let e = open.validate().unwrap_err().to_string();
    assert!(e.contains("dashboard_user"), "{e}");
    open.relay.dashboard_user = Some("ops".into());
    open.relay.dashboard_password_file = Some(pw);
    open.validate().unwrap();
}
