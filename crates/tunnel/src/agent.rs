//! The agent: one control connection per configured relay, each in its own task, and a data
//! channel per visitor, joined to the local service the relay asked for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{LocalService, RelayLink};
use crate::proto::{self, AgentMsg, Nonce, RelayMsg};
use crate::pump::{self, Meter};
use crate::Error;

/// Time allowed to reach the relay, finish TLS and get the relay's answer to the hello, and
/// to connect a data channel or the local service.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What an agent knows about one of its relays.
#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    pub relay: String,
    pub connected: bool,
    /// The relay's id for the current connection.
    pub session: Option<u64>,
    /// Successful connections since start (1 + reconnects).
    pub connects: u64,
    pub last_error: Option<String>,
}

struct Link {
    cfg: RelayLink,
    name: String,
    token: String,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    services: Arc<Services>,
    status: Arc<Mutex<LinkStatus>>,
    meter: Arc<Meter>,
}

/// Services whose visitors are turned away while a readiness signal is false: the relay hears
/// at once that the service is down here and takes the visitor to another agent. A node uses
/// it for its shared registry service, so that a node that cannot serve (no leader reachable,
/// far behind after a restart, storage stalled) gets no traffic through the relay.
pub struct Gate {
    pub services: Vec<String>,
    pub ready: tokio::sync::watch::Receiver<bool>,
}

/// The local services by name, the gate some of them are behind, and where the source
/// addresses of connections to services that read a PROXY header are registered.
struct Services {
    local: HashMap<String, LocalService>,
    gate: Option<Gate>,
    trusted: Option<Arc<crate::proxy::Trusted>>,
}

impl Services {
    /// Connects to the local service; for one that reads a PROXY header, from a source address
    /// registered as this agent's before the connection is made.
    async fn dial(&self, svc: &LocalService) -> std::io::Result<TcpStream> {
        let Some(trusted) = self.trusted.as_ref().filter(|_| svc.proxy_protocol) else {
            return dial(&svc.local).await;
        };
        let target = tokio::net::lookup_host(&svc.local)
            .await?
            .next()
            .ok_or_else(|| std::io::Error::other(format!("{} resolves to nothing", svc.local)))?;
        let socket = if target.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        // the service is on this machine (the agent runs inside the node): its own address is a
        // local one, and the source address is known before the connection exists
        socket.bind(std::net::SocketAddr::new(target.ip(), 0))?;
        let source = socket.local_addr()?;
        trusted.insert(source);
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(target)).await;
        match connected {
            Ok(Ok(s)) => {
                pump::tune(&s);
                Ok(s)
            }
            Ok(Err(e)) => {
                trusted.take(&source);
                Err(e)
            }
            Err(_) => {
                trusted.take(&source);
                Err(std::io::Error::from(std::io::ErrorKind::TimedOut))
            }
        }
    }

    /// Where a visitor of `service` goes now, or why it cannot.
    fn target(&self, service: &str) -> std::io::Result<&LocalService> {
        let Some(local) = self.local.get(service) else {
            return Err(std::io::Error::other(format!("no service {service:?}")));
        };
        match &self.gate {
            Some(g) if !*g.ready.borrow() && g.services.iter().any(|s| s == service) => {
                Err(std::io::Error::other(format!("service {service:?} is not ready here")))
            }
            _ => Ok(local),
        }
    }
}

/// What a running agent knows of its relays and the bytes it relayed, readable from elsewhere.
#[derive(Clone)]
pub struct AgentStatus {
    links: Vec<Arc<Mutex<LinkStatus>>>,
    meter: Arc<Meter>,
}

impl AgentStatus {
    pub fn links(&self) -> Vec<LinkStatus> {
        self.links.iter().map(|s| s.lock().unwrap().clone()).collect()
    }

    /// Bytes relayed from visitors to the local services, and back.
    pub fn bytes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.meter.a_to_b.load(Relaxed), self.meter.b_to_a.load(Relaxed))
    }
}

/// A running agent. Dropping it does not stop it; call [`Agent::stop`].
pub struct Agent {
    links: Vec<Arc<Mutex<LinkStatus>>>,
    /// Bytes relay → local service (`a_to_b`) and back (`b_to_a`), all relays together.
    pub meter: Arc<Meter>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Agent {
    /// Starts one connection task per relay. `default_name` names the agent where a link does
    /// not set `name`.
    pub fn start(default_name: &str, links: &[RelayLink], services: &[LocalService]) -> Result<Agent, Error> {
        Self::start_gated(default_name, links, services, None, None)
    }

    /// The same, with some services turned away while `gate` says not ready.
    pub fn start_gated(
        default_name: &str,
        links: &[RelayLink],
        services: &[LocalService],
        gate: Option<Gate>,
        trusted: Option<Arc<crate::proxy::Trusted>>,
    ) -> Result<Agent, Error> {
        let services =
            Arc::new(Services { local: services.iter().map(|s| (s.name.clone(), s.clone())).collect(), gate, trusted });
        let stop = CancellationToken::new();
        let meter = Arc::new(Meter::default());
        let mut statuses = Vec::new();
        let mut prepared = Vec::new();
        for cfg in links {
            cfg.validate()?;
            let server_name = ServerName::try_from(cfg.server_name())
                .map_err(|e| Error::Config(format!("relay {}: server name: {e}", cfg.address)))?;
            let status = Arc::new(Mutex::new(LinkStatus {
                relay: cfg.address.clone(),
                connected: false,
                session: None,
                connects: 0,
                last_error: None,
            }));
            statuses.push(status.clone());
            prepared.push(Link {
                name: cfg.name.clone().unwrap_or_else(|| default_name.to_string()),
                token: cfg.token.resolve(&format!("relay {}", cfg.address))?,
                server_name,
                tls: crate::tls::connector(&cfg.ca)?,
                services: services.clone(),
                status,
                meter: meter.clone(),
                cfg: cfg.clone(),
            });
        }
        let tasks = prepared.into_iter().map(|l| tokio::spawn(run_link(l, stop.clone()))).collect();
        Ok(Agent { links: statuses, meter, stop, tasks })
    }

    pub fn status(&self) -> Vec<LinkStatus> {
        self.links.iter().map(|s| s.lock().unwrap().clone()).collect()
    }

    /// A handle on this agent's figures that outlives the agent (for a node's `/metrics`).
    pub fn status_handle(&self) -> AgentStatus {
        AgentStatus { links: self.links.clone(), meter: self.meter.clone() }
    }

    /// Closes every control connection, so relays stop sending new visitors at once.
    /// Connections being forwarded go on until one of their ends closes them (a draining
    /// registry does, after its in-flight requests).
    pub async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Reconnects forever: jittered exponential backoff, reset after a connection that stayed up
/// `stable_after_secs`.
async fn run_link(link: Link, stop: CancellationToken) {
    let min = Duration::from_millis(link.cfg.reconnect_min_ms);
    let max = Duration::from_millis(link.cfg.reconnect_max_ms);
    let stable = Duration::from_secs(link.cfg.stable_after_secs);
    let mut delay = min;
    loop {
        let started = Instant::now();
        let r = tokio::select! {
            r = session(&link) => r,
            _ = stop.cancelled() => Ok(()),
        };
        {
            let mut st = link.status.lock().unwrap();
            st.connected = false;
            st.session = None;
            if let Err(e) = &r {
                st.last_error = Some(e.clone());
            }
        }
        if stop.is_cancelled() {
            break;
        }
        if started.elapsed() >= stable {
            delay = min;
        }
        // "equal jitter": half the delay fixed, half random, so agents that lost the same relay
        // do not all come back in the same instant
        let wait = delay / 2 + delay.mul_f64(rand::thread_rng().gen_range(0.0..0.5));
        warn!(relay = %link.cfg.address, error = ?r.err(), retry_in = ?wait, "tunnel link down");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => break,
        }
        delay = (delay * 2).min(max);
    }
}

/// One control connection, from dial to loss.
async fn session(link: &Link) -> Result<(), String> {
    let addr = &link.cfg.address;
    let tcp = dial(addr).await.map_err(|e| format!("connect: {e}"))?;
    let handshake = async {
        let mut tls = link.tls.connect(link.server_name.clone(), tcp).await.map_err(|e| format!("TLS: {e}"))?;
        let hello = AgentMsg::Hello {
            version: proto::VERSION,
            agent: link.name.clone(),
            token: link.token.clone(),
            services: link.services.local.keys().cloned().collect(),
            heartbeat_timeout_ms: link.cfg.heartbeat_timeout().as_millis() as u64,
        };
        proto::write_frame(&mut tls, &hello).await.map_err(|e| format!("hello: {e}"))?;
        let answer: RelayMsg = proto::read_frame(&mut tls).await.map_err(|e| format!("answer: {e}"))?;
        Ok::<_, String>((tls, answer))
    };
    let (tls, answer) =
        tokio::time::timeout(CONNECT_TIMEOUT, handshake).await.map_err(|_| "handshake timed out".to_string())??;
    let (session, pool_key) = match answer {
        RelayMsg::Welcome { session, pool_key } => (session, pool_key),
        RelayMsg::Refused { reason } => return Err(format!("refused by the relay: {reason}")),
        other => return Err(format!("unexpected answer {other:?}")),
    };
    {
        let mut st = link.status.lock().unwrap();
        st.connected = true;
        st.session = Some(session);
        st.connects += 1;
        st.last_error = None;
    }
    info!(relay = %addr, agent = %link.name, session, "tunnel link up");
    // idle channels of this session close with it (those carrying a visitor go on)
    let pool_stop = CancellationToken::new();
    let _pool_guard = pool_stop.clone().drop_guard();
    let pool = Arc::new(Pool { ctx: link_ctx(link), session, key: pool_key });
    for _ in 0..link.cfg.pool {
        tokio::spawn(pooled_channel(pool.clone(), pool_stop.clone()));
    }

    let (mut rd, mut wr) = tokio::io::split(tls);
    let (tx, mut rx) = mpsc::channel::<AgentMsg>(256);
    let writer = async {
        while let Some(m) = rx.recv().await {
            proto::write_frame(&mut wr, &m).await.map_err(|e| format!("write: {e}"))?;
        }
        Ok::<_, String>(())
    };
    let pinger = async {
        let mut tick = tokio::time::interval(link.cfg.heartbeat_interval());
        for seq in 0u64.. {
            tick.tick().await;
            if tx.send(AgentMsg::Ping(seq)).await.is_err() {
                break;
            }
        }
        Err::<(), String>("pinger stopped".into())
    };
    let timeout = link.cfg.heartbeat_timeout();
    let reader = async {
        loop {
            // a live relay answers every ping, so silence longer than the timeout means dead
            let msg: RelayMsg = match tokio::time::timeout(timeout, proto::read_frame(&mut rd)).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => return Err(format!("connection lost: {e}")),
                Err(_) => return Err(format!("no heartbeat answer for {timeout:?}")),
            };
            match msg {
                RelayMsg::Pong(_) => {}
                RelayMsg::Open { nonce, service } => {
                    tokio::spawn(data_channel(link_ctx(link), nonce, service, tx.clone()));
                }
                other => return Err(format!("unexpected message {other:?}")),
            }
        }
    };
    tokio::select! {
        r = writer => r,
        r = pinger => r,
        r = reader => r,
    }
}

/// What the pooled channels of one session share.
struct Pool {
    ctx: Ctx,
    session: u64,
    key: [u8; 16],
}

/// One idle channel: dialled ahead of need, activated by the relay for a visitor, then
/// forwarded; on activation (or loss while idle) a replacement is dialled, so the relay keeps
/// `pool` channels ready while the session lives.
fn pooled_channel(
    pool: Arc<Pool>,
    stop: CancellationToken,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        let ready = async {
            let mut s = dial(&pool.ctx.relay).await?;
            s.write_all(&proto::pool_preamble(pool.session)).await?;
            let mut challenge: proto::Challenge = [0; 16];
            tokio::time::timeout(CONNECT_TIMEOUT, s.read_exact(&mut challenge))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            s.write_all(&proto::pool_proof(&pool.key, pool.session, &challenge)).await?;
            let service = proto::read_activation(&mut s).await?;
            Ok::<_, std::io::Error>((s, service))
        };
        let (mut ch, service) = tokio::select! {
            r = ready => match r {
                Ok(x) => x,
                Err(e) => {
                    // the relay closed it (restart, session gone) or could not be reached:
                    // try again later, while the session lives
                    debug!(relay = %pool.ctx.relay, error = %e, "pooled channel lost");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {
                            tokio::spawn(pooled_channel(pool, stop));
                        }
                        _ = stop.cancelled() => {}
                    }
                    return;
                }
            },
            _ = stop.cancelled() => return,
        };
        if !stop.is_cancelled() {
            tokio::spawn(pooled_channel(pool.clone(), stop));
        }
        let target = pool.ctx.services.target(&service).cloned();
        let local = match &target {
            Ok(t) => pool.ctx.services.dial(t).await,
            Err(e) => Err(std::io::Error::other(e.to_string())),
        };
        let (local, target) = match (local, target) {
            (Ok(l), Ok(t)) => (l, t),
            (Err(e), _) | (_, Err(e)) => {
                warn!(%service, error = %e, "local service unreachable");
                let _ = ch.write_all(&[proto::NOT_ACTIVATED]).await;
                return;
            }
        };
        if ch.write_all(&[proto::ACTIVATED]).await.is_err() {
            return;
        }
        pool.ctx.forward(ch, local, &target).await;
    })
}

/// Connects to `addr` within [`CONNECT_TIMEOUT`], with the tunnel's socket options.
async fn dial(addr: &str) -> std::io::Result<TcpStream> {
    let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    pump::tune(&s);
    Ok(s)
}

/// What a data-channel task needs from its link, owned.
struct Ctx {
    relay: String,
    services: Arc<Services>,
    splice: bool,
    meter: Arc<Meter>,
}

impl Ctx {
    /// Reads the visitor's address the relay puts first on a paired channel, passes it on to
    /// a local service that wants it, then forwards the channel and its local connection until
    /// both are done.
    async fn forward(&self, mut channel: TcpStream, mut local: TcpStream, svc: &LocalService) {
        let service = &svc.name;
        let visitor = match tokio::time::timeout(CONNECT_TIMEOUT, crate::proxy::read(&mut channel)).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return debug!(%service, error = %e, "no visitor header on a data channel"),
            Err(_) => return debug!(%service, "no visitor header on a data channel in time"),
        };
        if svc.proxy_protocol {
            let header = match (visitor, local.peer_addr()) {
                (Some(v), Ok(dst)) => crate::proxy::encode(v, dst),
                _ => crate::proxy::encode_local(),
            };
            if let Err(e) = local.write_all(&header).await {
                return debug!(%service, error = %e, "local service closed before the visitor header");
            }
        }
        if let Err(e) = pump::join(channel, local, self.splice, &self.meter).await {
            debug!(%service, error = %e, "forwarded connection ended with an error");
        }
    }
}

fn link_ctx(link: &Link) -> Ctx {
    Ctx {
        relay: link.cfg.address.clone(),
        services: link.services.clone(),
        splice: link.cfg.splice,
        meter: link.meter.clone(),
    }
}

/// Connects the local service and a data channel to the relay (at the same time), then
/// forwards. If the local service cannot be reached the relay hears so at once and tries
/// another agent.
async fn data_channel(ctx: Ctx, nonce: Nonce, service: String, tx: mpsc::Sender<AgentMsg>) {
    let svc = match ctx.services.target(&service) {
        Ok(t) => t.clone(),
        Err(e) => {
            debug!(%service, error = %e, "visitor turned away");
            let _ = tx.try_send(AgentMsg::OpenFailed(nonce));
            return;
        }
    };
    let target = svc.local.as_str();
    let (local, data) = tokio::join!(ctx.services.dial(&svc), dial(&ctx.relay));
    // the preamble goes out only once the local side is up: a channel the relay pairs with a
    // visitor must lead somewhere
    let data = match (&local, data) {
        (Ok(_), Ok(mut d)) => d.write_all(&proto::data_preamble(&nonce)).await.map(|_| d),
        (_, d) => d,
    };
    let (local, data) = match (local, data) {
        (Ok(l), Ok(d)) => (l, d),
        (Err(e), _) => {
            warn!(%service, %target, error = %e, "local service unreachable");
            let _ = tx.try_send(AgentMsg::OpenFailed(nonce));
            return;
        }
        (_, Err(e)) => {
            warn!(relay = %ctx.relay, error = %e, "data channel failed");
            return;
        }
    };
    drop(tx);
    ctx.forward(data, local, &svc).await;
}
