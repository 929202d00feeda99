//! The relay: control port, public service ports, pairing of visitors with data channels.
//!
//! Every accepted connection is handled in its own task under a deadline, and at most
//! `max_handshakes` handshakes run at once, so a slow or hostile peer never blocks the accept
//! loop or anyone else.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::RelayConfig;
use crate::proto::{self, AgentMsg, Nonce, RelayMsg};
use crate::pump::{self, Meter};
use crate::Error;

/// Why a connection to the control port was turned away (the label of the refusal counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    BadToken,
    UnknownAgent,
    ServiceNotAllowed,
    BadHello,
    Timeout,
    UnknownNonce,
    UnknownSession,
    /// A pooled data channel whose proof of its session does not verify.
    BadProof,
    Busy,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::BadToken => "bad_token",
            Refusal::UnknownAgent => "unknown_agent",
            Refusal::ServiceNotAllowed => "service_not_allowed",
            Refusal::BadHello => "bad_hello",
            Refusal::Timeout => "timeout",
            Refusal::UnknownNonce => "unknown_nonce",
            Refusal::UnknownSession => "unknown_session",
            Refusal::BadProof => "bad_proof",
            Refusal::Busy => "busy",
        }
    }
}

/// A public service and its counters.
pub(crate) struct Service {
    pub name: String,
    pub bind: SocketAddr,
    /// Visitor connections open now.
    pub open: AtomicU64,
    /// Visitor connections accepted since start.
    pub accepted: AtomicU64,
    /// Visitors closed because no agent could take them.
    pub unserved: AtomicU64,
    /// Bytes visitor → agent and agent → visitor.
    pub bytes: Meter,
    rr: AtomicUsize,
}

/// One agent's control connection.
pub(crate) struct Session {
    pub id: u64,
    pub agent: String,
    pub peer: SocketAddr,
    pub services: Vec<String>,
    pub since: Instant,
    pub open: AtomicU64,
    tx: mpsc::Sender<RelayMsg>,
    pool_key: [u8; 16],
    /// Idle pooled data channels, ready to be activated.
    pub pool: Mutex<Vec<TcpStream>>,
    /// Set when an `Open` failed: the agent is passed over while others are available, until
    /// it proves alive with a frame.
    suspect: Mutex<bool>,
    pub last_seen: Mutex<Instant>,
    closed: CancellationToken,
    /// The agent speaks version 3 or later: its data channels start with the visitor's address.
    proxy_header: bool,
}

impl Session {
    pub fn is_suspect(&self) -> bool {
        *self.suspect.lock().unwrap()
    }
}

struct Auth {
    token_hash: [u8; 32],
    services: Option<HashSet<String>>,
}

pub(crate) struct State {
    auth: HashMap<String, Auth>,
    pub services: BTreeMap<String, Arc<Service>>,
    pub sessions: Mutex<HashMap<String, Arc<Session>>>,
    pending: Mutex<HashMap<Nonce, oneshot::Sender<TcpStream>>>,
    agent_joined: Notify,
    next_session: AtomicU64,
    pub refused: Mutex<BTreeMap<Refusal, u64>>,
    /// Open attempts that an agent failed or let time out.
    pub failed_opens: AtomicU64,
    pub started: Instant,
    pub control: SocketAddr,
    open_timeout: Duration,
    handshake_timeout: Duration,
    splice: bool,
    /// SHA-256 of `user:password` of the dashboard's login, if it has one.
    pub dashboard_login: Option<[u8; 32]>,
}

/// Addresses a relay is bound to (port 0 in the config becomes a real port here).
#[derive(Debug, Clone)]
pub struct RelayAddrs {
    pub control: SocketAddr,
    pub dashboard: Option<SocketAddr>,
    pub services: BTreeMap<String, SocketAddr>,
}

/// A relay with its ports bound; [`Relay::run`] serves them.
pub struct Relay {
    state: Arc<State>,
    tls: TlsAcceptor,
    control: TcpListener,
    services: Vec<(Arc<Service>, TcpListener)>,
    dashboard: Option<TcpListener>,
    max_handshakes: usize,
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|e| Error::Io(format!("binding {what} {addr}"), e))
}

impl Relay {
    pub async fn bind(cfg: &RelayConfig) -> Result<Relay, Error> {
        cfg.validate()?;
        let tls = crate::tls::acceptor(&cfg.relay.tls.cert, &cfg.relay.tls.key)?;
        let mut auth = HashMap::new();
        for a in &cfg.agents {
            let token = a.token.resolve(&format!("agent {:?}", a.name))?;
            auth.insert(
                a.name.clone(),
                Auth { token_hash: hash(&token), services: a.services.as_ref().map(|s| s.iter().cloned().collect()) },
            );
        }
        let control = bind(cfg.relay.listen, "the control port").await?;
        let dashboard = match cfg.relay.dashboard {
            Some(a) => Some(bind(a, "the dashboard").await?),
            None => None,
        };
        let mut services = Vec::new();
        for s in &cfg.services {
            let l = bind(s.bind, &format!("service {}", s.name)).await?;
            let svc = Arc::new(Service {
                name: s.name.clone(),
                bind: l.local_addr().map_err(|e| Error::Io(s.name.clone(), e))?,
                open: AtomicU64::new(0),
                accepted: AtomicU64::new(0),
                unserved: AtomicU64::new(0),
                bytes: Meter::default(),
                rr: AtomicUsize::new(0),
            });
            services.push((svc, l));
        }
        let state = Arc::new(State {
            auth,
            services: services.iter().map(|(s, _)| (s.name.clone(), s.clone())).collect(),
            sessions: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            agent_joined: Notify::new(),
            next_session: AtomicU64::new(1),
            refused: Mutex::new(BTreeMap::new()),
            failed_opens: AtomicU64::new(0),
            started: Instant::now(),
            control: control.local_addr().map_err(|e| Error::Io("control".into(), e))?,
            open_timeout: Duration::from_millis(cfg.relay.open_timeout_ms),
            handshake_timeout: Duration::from_millis(cfg.relay.handshake_timeout_ms),
            splice: cfg.relay.splice,
            dashboard_login: cfg.dashboard_login()?.map(|l| hash(&l)),
        });
        Ok(Relay { state, tls, control, services, dashboard, max_handshakes: cfg.relay.max_handshakes })
    }

    pub fn addrs(&self) -> RelayAddrs {
        RelayAddrs {
            control: self.state.control,
            dashboard: self.dashboard.as_ref().and_then(|l| l.local_addr().ok()),
            services: self.state.services.iter().map(|(n, s)| (n.clone(), s.bind)).collect(),
        }
    }

    /// Serves until `shutdown` is cancelled; then closes every port and every connection.
    pub async fn run(self, shutdown: CancellationToken) {
        let Relay { state, tls, control, services, dashboard, max_handshakes } = self;
        let mut tasks = tokio::task::JoinSet::new();
        for (svc, l) in services {
            tasks.spawn(accept_visitors(state.clone(), svc, l, shutdown.clone()));
        }
        if let Some(l) = dashboard {
            tasks.spawn(crate::dashboard::serve(state.clone(), l, shutdown.clone()));
        }
        tasks.spawn(accept_control(
            state.clone(),
            tls,
            control,
            Arc::new(Semaphore::new(max_handshakes)),
            shutdown.clone(),
        ));
        info!(control = %state.control, "relay ready");
        shutdown.cancelled().await;
        for s in state.sessions.lock().unwrap().values() {
            s.closed.cancel();
        }
        tasks.shutdown().await;
    }
}

impl State {
    fn refuse(&self, why: Refusal, peer: SocketAddr, detail: &str) {
        warn!(%peer, reason = why.label(), "refused: {detail}");
        *self.refused.lock().unwrap().entry(why).or_default() += 1;
    }

    /// Live agents of a service, best first: not suspect, fewest open connections, then
    /// round-robin among equals.
    fn candidates(&self, svc: &Service) -> Vec<Arc<Session>> {
        let mut c: Vec<Arc<Session>> = self
            .sessions
            .lock()
            .unwrap()
            .values()
            .filter(|s| !s.closed.is_cancelled() && s.services.contains(&svc.name))
            .cloned()
            .collect();
        c.sort_by_key(|s| s.id);
        if !c.is_empty() {
            let k = svc.rr.fetch_add(1, Ordering::Relaxed) % c.len();
            c.rotate_left(k);
        }
        c.sort_by_key(|s| (s.is_suspect(), s.open.load(Ordering::Relaxed)));
        c
    }

    fn remove_session(&self, s: &Session) {
        s.closed.cancel();
        s.pool.lock().unwrap().clear();
        let mut m = self.sessions.lock().unwrap();
        if m.get(&s.agent).is_some_and(|cur| cur.id == s.id) {
            m.remove(&s.agent);
        }
    }
}

/// The next connection on `l`, or `None` once `shutdown` is cancelled. Accept errors (EMFILE
/// and friends) are logged and retried after a pause instead of spinning.
pub(crate) async fn accept(
    l: &TcpListener,
    shutdown: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = l.accept() => match r {
                Ok(x) => return Some(x),
                Err(e) => {
                    warn!(error = %e, "accept on the {what} failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

async fn accept_visitors(state: Arc<State>, svc: Arc<Service>, l: TcpListener, shutdown: CancellationToken) {
    let what = format!("{} port", svc.name);
    while let Some((stream, peer)) = accept(&l, &shutdown, &what).await {
        pump::tune(&stream);
        svc.accepted.fetch_add(1, Ordering::Relaxed);
        let (state, svc, shutdown) = (state.clone(), svc.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = visitor(&state, &svc, stream, peer) => {}
            }
        });
    }
}

/// Finds a data channel for one visitor, trying each live agent once, and forwards.
async fn visitor(state: &State, svc: &Service, stream: TcpStream, peer: SocketAddr) {
    let wait_until = Instant::now() + state.open_timeout;
    let mut tried = HashSet::new();
    loop {
        let next = state.candidates(svc).into_iter().find(|s| !tried.contains(&s.id));
        let Some(session) = next else {
            // No agent (left) to try: wait a little for one to (re)connect, as after a relay
            // restart, rather than dropping the visitor at once.
            let now = Instant::now();
            if now >= wait_until {
                svc.unserved.fetch_add(1, Ordering::Relaxed);
                debug!(service = %svc.name, %peer, "no live agent; closing the visitor");
                return;
            }
            let _ = tokio::time::timeout(wait_until - now, state.agent_joined.notified()).await;
            continue;
        };
        tried.insert(session.id);
        match open(state, svc, &session).await {
            Some(mut data) => {
                if session.proxy_header {
                    let dst = stream.local_addr().unwrap_or(svc.bind);
                    if data.write_all(&crate::proxy::encode(peer, dst)).await.is_err() {
                        state.failed_opens.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
                svc.open.fetch_add(1, Ordering::Relaxed);
                session.open.fetch_add(1, Ordering::Relaxed);
                let r = pump::join(stream, data, state.splice, &svc.bytes).await;
                svc.open.fetch_sub(1, Ordering::Relaxed);
                session.open.fetch_sub(1, Ordering::Relaxed);
                if let Err(e) = r {
                    debug!(service = %svc.name, %peer, error = %e, "visitor connection ended with an error");
                }
                return;
            }
            None => {
                state.failed_opens.fetch_add(1, Ordering::Relaxed);
                *session.suspect.lock().unwrap() = true;
                warn!(service = %svc.name, agent = %session.agent, "agent did not open a data channel; trying another");
            }
        }
    }
}

/// A data channel from `session`'s agent: a pooled one activated for `svc`, or else one
/// asked for with an `Open`.
async fn open(state: &State, svc: &Service, session: &Session) -> Option<TcpStream> {
    loop {
        let pooled = session.pool.lock().unwrap().pop();
        let Some(mut ch) = pooled else { break };
        let activated = async {
            ch.write_all(&proto::activation(&svc.name)).await?;
            let mut answer = [0u8; 1];
            ch.read_exact(&mut answer).await?;
            Ok::<_, std::io::Error>(answer[0] == proto::ACTIVATED)
        };
        match tokio::time::timeout(state.open_timeout, activated).await {
            Ok(Ok(true)) => return Some(ch),
            // the agent cannot reach its service, or does not answer: another agent's turn
            Ok(Ok(false)) | Err(_) => return None,
            // a channel that died while idle: the next one
            Ok(Err(_)) => continue,
        }
    }
    let nonce: Nonce = rand::random();
    let (tx, rx) = oneshot::channel();
    state.pending.lock().unwrap().insert(nonce, tx);
    let sent = session.tx.try_send(RelayMsg::Open { nonce, service: svc.name.clone() }).is_ok();
    let got = if sent {
        tokio::select! {
            r = tokio::time::timeout(state.open_timeout, rx) => r.ok().and_then(|r| r.ok()),
            _ = session.closed.cancelled() => None,
        }
    } else {
        None
    };
    state.pending.lock().unwrap().remove(&nonce);
    got
}

async fn accept_control(
    state: Arc<State>,
    tls: TlsAcceptor,
    l: TcpListener,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    while let Some((stream, peer)) = accept(&l, &shutdown, "control port").await {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            state.refuse(Refusal::Busy, peer, "too many handshakes in progress");
            continue;
        };
        pump::tune(&stream);
        let (state, tls, shutdown) = (state.clone(), tls.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = incoming(&state, tls, stream, peer, permit) => {}
            }
        });
    }
}

/// A new connection on the control port: a data channel or a TLS control connection.
async fn incoming(
    state: &Arc<State>,
    tls: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let deadline = state.handshake_timeout;
    let mut first = [0u8; 1];
    match tokio::time::timeout(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        Ok(_) => return,
        Err(_) => return state.refuse(Refusal::Timeout, peer, "nothing sent"),
    }
    if first[0] == proto::DATA_MAGIC[0] {
        return data_channel(state, stream, peer, permit).await;
    }
    if first[0] != proto::TLS_HANDSHAKE {
        return state.refuse(Refusal::BadHello, peer, "neither TLS nor a data channel");
    }
    let handshake = async {
        let mut tls = tls.accept(stream).await.map_err(|e| (Refusal::BadHello, format!("TLS: {e}")))?;
        let hello: AgentMsg =
            proto::read_frame(&mut tls).await.map_err(|e| (Refusal::BadHello, format!("hello: {e}")))?;
        Ok::<_, (Refusal, String)>((tls, hello))
    };
    let (mut tls, hello) = match tokio::time::timeout(deadline, handshake).await {
        Ok(Ok(x)) => x,
        Ok(Err((why, detail))) => return state.refuse(why, peer, &detail),
        Err(_) => return state.refuse(Refusal::Timeout, peer, "handshake too slow"),
    };
    drop(permit);
    let AgentMsg::Hello { version, agent, token, services, heartbeat_timeout_ms } = hello else {
        return state.refuse(Refusal::BadHello, peer, "first frame is not a hello");
    };
    if let Err((why, reason)) = check_hello(state, version, &agent, &token, &services) {
        state.refuse(why, peer, &format!("agent {agent:?}: {reason}"));
        let _ = tokio::time::timeout(deadline, proto::write_frame(&mut tls, &RelayMsg::Refused { reason })).await;
        return;
    }
    let id = state.next_session.fetch_add(1, Ordering::Relaxed);
    let pool_key: [u8; 16] = rand::random();
    if proto::write_frame(&mut tls, &RelayMsg::Welcome { session: id, pool_key }).await.is_err() {
        return;
    }
    let (tx, mut rx) = mpsc::channel::<RelayMsg>(1024);
    let session = Arc::new(Session {
        id,
        agent: agent.clone(),
        peer,
        services,
        since: Instant::now(),
        open: AtomicU64::new(0),
        tx,
        pool_key,
        pool: Mutex::new(Vec::new()),
        suspect: Mutex::new(false),
        last_seen: Mutex::new(Instant::now()),
        closed: CancellationToken::new(),
        proxy_header: version >= 3,
    });
    if let Some(old) = state.sessions.lock().unwrap().insert(agent.clone(), session.clone()) {
        // the same agent again: its old connection is dead or about to be
        old.closed.cancel();
    }
    state.agent_joined.notify_waiters();
    info!(agent = %agent, %peer, session = id, services = ?session.services, "agent connected");

    let timeout = Duration::from_millis(heartbeat_timeout_ms.clamp(1000, 3_600_000));
    let (mut rd, mut wr) = tokio::io::split(tls);
    let closed = session.closed.clone();
    let writer = async {
        while let Some(m) = rx.recv().await {
            proto::write_frame(&mut wr, &m).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    let reader = async {
        loop {
            let msg: AgentMsg = match tokio::time::timeout(timeout, proto::read_frame(&mut rd)).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => return format!("connection lost: {e}"),
                Err(_) => return format!("no heartbeat for {timeout:?}"),
            };
            *session.last_seen.lock().unwrap() = Instant::now();
            *session.suspect.lock().unwrap() = false;
            match msg {
                AgentMsg::Ping(seq) => {
                    if session.tx.try_send(RelayMsg::Pong(seq)).is_err() {
                        return "control connection backed up".into();
                    }
                }
                AgentMsg::OpenFailed(nonce) => {
                    // dropping the waiter makes the visitor try the next agent now
                    state.pending.lock().unwrap().remove(&nonce);
                    *session.suspect.lock().unwrap() = true;
                }
                AgentMsg::Hello { .. } => return "a second hello".into(),
            }
        }
    };
    let why = tokio::select! {
        w = reader => w,
        r = writer => format!("write failed: {:?}", r.err()),
        _ = closed.cancelled() => "replaced or shut down".into(),
    };
    state.remove_session(&session);
    info!(agent = %agent, session = id, "agent disconnected: {why}");
}

/// A data channel arriving on the control port: for a pending visitor (nonce), or a pooled
/// one for a session (session id and pool key).
async fn data_channel(
    state: &State,
    mut stream: TcpStream,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let deadline = state.handshake_timeout;
    let started = tokio::time::Instant::now();
    let preamble = async {
        let mut magic = [0u8; 4];
        stream.read_exact(&mut magic).await?;
        let mut rest = vec![0u8; if magic == proto::POOL_MAGIC { 8 } else { 16 }];
        stream.read_exact(&mut rest).await?;
        Ok::<_, std::io::Error>((magic, rest))
    };
    let (magic, rest) = match tokio::time::timeout(deadline, preamble).await {
        Ok(Ok(x)) => x,
        Ok(Err(_)) => return state.refuse(Refusal::BadHello, peer, "data channel closed in its preamble"),
        Err(_) => return state.refuse(Refusal::Timeout, peer, "data-channel preamble too slow"),
    };
    if magic == proto::DATA_MAGIC {
        drop(permit);
        let nonce: Nonce = rest[..].try_into().expect("16 bytes");
        let waiter = state.pending.lock().unwrap().remove(&nonce);
        match waiter {
            Some(tx) => {
                let _ = tx.send(stream);
            }
            None => state.refuse(Refusal::UnknownNonce, peer, "data channel for no pending visitor"),
        }
    } else if magic == proto::POOL_MAGIC {
        let id = u64::from_be_bytes(rest[..8].try_into().expect("8 bytes"));
        let session = state.sessions.lock().unwrap().values().find(|s| s.id == id).cloned();
        let Some(s) = session.filter(|s| !s.closed.is_cancelled()) else {
            return state.refuse(Refusal::UnknownSession, peer, "pooled channel for no live session");
        };
        // the channel proves it belongs to the session: a fresh challenge, answered with an
        // HMAC under the session's pool key (which never crosses this plain connection)
        let challenge: proto::Challenge = rand::random();
        let proved = async {
            stream.write_all(&challenge).await?;
            let mut proof = [0u8; 32];
            stream.read_exact(&mut proof).await?;
            Ok::<_, std::io::Error>(proof)
        };
        let proof = match tokio::time::timeout_at(started + deadline, proved).await {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return state.refuse(Refusal::BadHello, peer, "pooled channel closed before its proof"),
            Err(_) => return state.refuse(Refusal::Timeout, peer, "pooled channel's proof too slow"),
        };
        drop(permit);
        if !bool::from(proto::pool_proof(&s.pool_key, id, &challenge).ct_eq(&proof)) {
            return state.refuse(Refusal::BadProof, peer, "pooled channel with a wrong proof");
        }
        let mut pool = s.pool.lock().unwrap();
        if pool.len() < proto::MAX_POOL {
            pool.push(stream);
        }
    } else {
        state.refuse(Refusal::BadHello, peer, "bad data-channel preamble");
    }
}

fn check_hello(
    state: &State,
    version: u16,
    agent: &str,
    token: &str,
    services: &[String],
) -> Result<(), (Refusal, String)> {
    if !(proto::MIN_VERSION..=proto::VERSION).contains(&version) {
        return Err((
            Refusal::BadHello,
            format!("protocol version {version}, expected {} to {}", proto::MIN_VERSION, proto::VERSION),
        ));
    }
    // compare digests in constant time; an unknown agent costs the same as a wrong token
    let presented = hash(token);
    let known = state.auth.get(agent);
    let expected = known.map(|a| a.token_hash).unwrap_or([0u8; 32]);
    let ok: bool = presented.ct_eq(&expected).into();
    match known {
        // the agent learns only that it failed; the log says which way
        None => return Err((Refusal::UnknownAgent, "authentication failed".into())),
        Some(_) if !ok => return Err((Refusal::BadToken, "authentication failed".into())),
        Some(a) => {
            for s in services {
                if !state.services.contains_key(s) || a.services.as_ref().is_some_and(|allowed| !allowed.contains(s)) {
                    return Err((Refusal::ServiceNotAllowed, format!("service {s:?} is not allowed")));
                }
            }
        }
    }
    Ok(())
}
