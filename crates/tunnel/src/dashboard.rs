//! The relay's dashboard: `/` (HTML), `/api/status` (JSON) and `/metrics` (OpenMetrics, or the
//! Prometheus text format).

use std::convert::Infallible;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::relay::State;

#[derive(Serialize)]
pub struct Status {
    pub control: String,
    pub uptime_secs: u64,
    pub agents: Vec<AgentStatus>,
    pub services: Vec<ServiceStatus>,
    pub refused: std::collections::BTreeMap<&'static str, u64>,
    pub failed_opens: u64,
}

#[derive(Serialize)]
pub struct AgentStatus {
    pub name: String,
    pub peer: String,
    pub session: u64,
    pub connected_secs: u64,
    pub last_seen_ms: u64,
    pub services: Vec<String>,
    pub open_connections: u64,
    /// Pooled data channels waiting for a visitor.
    pub idle_channels: usize,
    pub suspect: bool,
}

#[derive(Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub bind: String,
    pub live_agents: usize,
    pub open_connections: u64,
    pub connections_total: u64,
    pub unserved_total: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

pub fn status(state: &State) -> Status {
    let mut agents: Vec<AgentStatus> = state
        .sessions
        .lock()
        .unwrap()
        .values()
        .map(|s| AgentStatus {
            name: s.agent.clone(),
            peer: s.peer.to_string(),
            session: s.id,
            connected_secs: s.since.elapsed().as_secs(),
            last_seen_ms: s.last_seen.lock().unwrap().elapsed().as_millis() as u64,
            services: s.services.clone(),
            open_connections: s.open.load(Ordering::Relaxed),
            idle_channels: s.pool.lock().unwrap().len(),
            suspect: s.is_suspect(),
        })
        .collect();
    agents.sort_by(|a, b| a.name.cmp(&b.name));
    let services = state
        .services
        .values()
        .map(|s| ServiceStatus {
            name: s.name.clone(),
            bind: s.bind.to_string(),
            live_agents: agents.iter().filter(|a| a.services.contains(&s.name)).count(),
            open_connections: s.open.load(Ordering::Relaxed),
            connections_total: s.accepted.load(Ordering::Relaxed),
            unserved_total: s.unserved.load(Ordering::Relaxed),
            bytes_in: s.bytes.a_to_b.load(Ordering::Relaxed),
            bytes_out: s.bytes.b_to_a.load(Ordering::Relaxed),
        })
        .collect();
    Status {
        control: state.control.to_string(),
        uptime_secs: state.started.elapsed().as_secs(),
        agents,
        services,
        refused: state.refused.lock().unwrap().iter().map(|(k, v)| (k.label(), *v)).collect(),
        failed_opens: state.failed_opens.load(Ordering::Relaxed),
    }
}

/// A sample's labels, in order (`agent`, `service`, `reason`, `direction`).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Labels(Vec<(&'static str, String)>);

impl prometheus_client::encoding::EncodeLabelSet for Labels {
    fn encode(&self, mut encoder: prometheus_client::encoding::LabelSetEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeLabel as _;
        for (k, v) in &self.0 {
            (*k, v.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// The dashboard's metrics, through `prometheus-client`: a registry made of the status.
fn metrics(st: &Status, openmetrics: bool) -> (String, &'static str) {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    let mut r = prometheus_client::registry::Registry::default();
    let labels = |pairs: &[(&'static str, &str)]| Labels(pairs.iter().map(|(k, v)| (*k, v.to_string())).collect());
    let gauges = |samples: Vec<(Labels, u64)>| {
        let f = Family::<Labels, Gauge>::default();
        for (l, v) in samples {
            f.get_or_create(&l).set(v as i64);
        }
        f
    };
    let counters = |samples: Vec<(Labels, u64)>| {
        let f = Family::<Labels, Counter>::default();
        for (l, v) in samples {
            f.get_or_create(&l).inc_by(v);
        }
        f
    };
    let by_service = |f: fn(&ServiceStatus) -> u64| -> Vec<(Labels, u64)> {
        st.services.iter().map(|s| (labels(&[("service", &s.name)]), f(s))).collect()
    };
    use prometheus_client::metrics::{counter::ConstCounter, gauge::ConstGauge};
    r.register("raftyard_relay_agents", "Agents connected", ConstGauge::new(st.agents.len() as i64));
    r.register(
        "raftyard_relay_agent_open_connections",
        "Visitor connections open, by agent",
        gauges(st.agents.iter().map(|a| (labels(&[("agent", &a.name)]), a.open_connections)).collect()),
    );
    r.register(
        "raftyard_relay_service_agents",
        "Live agents, by service",
        gauges(by_service(|s| s.live_agents as u64)),
    );
    r.register(
        "raftyard_relay_open_connections",
        "Visitor connections open, by service",
        gauges(by_service(|s| s.open_connections)),
    );
    r.register(
        "raftyard_relay_connections",
        "Visitor connections accepted, by service",
        counters(by_service(|s| s.connections_total)),
    );
    r.register(
        "raftyard_relay_unserved",
        "Visitors closed because no agent took them",
        counters(by_service(|s| s.unserved_total)),
    );
    r.register(
        "raftyard_relay_bytes",
        "Bytes forwarded, by service and direction (in: visitor to agent)",
        counters(
            st.services
                .iter()
                .flat_map(|s| {
                    [
                        (labels(&[("service", &s.name), ("direction", "in")]), s.bytes_in),
                        (labels(&[("service", &s.name), ("direction", "out")]), s.bytes_out),
                    ]
                })
                .collect(),
        ),
    );
    r.register(
        "raftyard_relay_refused",
        "Connections refused on the control port, by reason",
        counters(st.refused.iter().map(|(k, v)| (labels(&[("reason", k)]), *v)).collect()),
    );
    r.register(
        "raftyard_relay_failed_opens",
        "Data channels an agent failed to open in time",
        ConstCounter::new(st.failed_opens),
    );
    raftyard_telemetry::encode_metrics(&r, openmetrics)
}

fn html(st: &Status) -> String {
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5>\
         <title>raftyard relay</title><style>body{font-family:sans-serif;margin:2em}\
         table{border-collapse:collapse;margin-bottom:2em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}\
         </style></head><body><h1>raftyard relay</h1>",
    );
    let _ =
        write!(h, "<p>control {} · up {} s · failed opens {}</p>", esc(&st.control), st.uptime_secs, st.failed_opens);
    h.push_str("<h2>Services</h2><table><tr><th>service</th><th>public address</th><th>live agents</th><th>open</th><th>total</th><th>unserved</th><th>bytes in</th><th>bytes out</th></tr>");
    for s in &st.services {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&s.name),
            esc(&s.bind),
            s.live_agents,
            s.open_connections,
            s.connections_total,
            s.unserved_total,
            s.bytes_in,
            s.bytes_out
        );
    }
    h.push_str("</table><h2>Agents</h2><table><tr><th>agent</th><th>from</th><th>services</th><th>connected</th><th>last seen</th><th>open</th><th>idle channels</th><th>state</th></tr>");
    for a in &st.agents {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} s</td><td>{} ms ago</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&a.name),
            esc(&a.peer),
            esc(&a.services.join(", ")),
            a.connected_secs,
            a.last_seen_ms,
            a.open_connections,
            a.idle_channels,
            if a.suspect { "suspect" } else { "live" }
        );
    }
    h.push_str("</table><h2>Refused handshakes</h2><table>");
    for (k, v) in &st.refused {
        let _ = write!(h, "<tr><td>{k}</td><td>{v}</td></tr>");
    }
    h.push_str("</table><p><a href=/api/status>JSON</a> · <a href=/metrics>metrics</a></p></body></html>");
    h
}

/// Whether the request carries the dashboard's login (compared as SHA-256 digests, in constant
/// time), or the dashboard has none.
fn authorized(state: &State, req: &Request<hyper::body::Incoming>) -> bool {
    use base64::Engine as _;
    use subtle::ConstantTimeEq as _;
    let Some(expected) = state.dashboard_login else { return true };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic ").or_else(|| v.strip_prefix("basic ")))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
        .unwrap_or_default();
    let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&given).into();
    digest.ct_eq(&expected).into()
}

fn respond(state: &State, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if !authorized(state, req) {
        let mut r = Response::new(Full::new(Bytes::from_static(b"unauthorized\n")));
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Basic realm=\"raftyard relay\""));
        return r;
    }
    let st = status(state);
    let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (ctype, body) = match req.uri().path() {
        "/" => ("text/html; charset=utf-8", html(&st)),
        "/api/status" => ("application/json", serde_json::to_string_pretty(&st).unwrap_or_default()),
        "/metrics" => {
            let (body, ctype) = metrics(&st, raftyard_telemetry::wants_openmetrics(accept));
            (ctype, body)
        }
        _ => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
            *r.status_mut() = StatusCode::NOT_FOUND;
            return r;
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ctype));
    r
}

pub async fn serve(state: Arc<State>, l: TcpListener, shutdown: CancellationToken) {
    while let Some((stream, _)) = crate::relay::accept(&l, &shutdown, "dashboard").await {
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let r = respond(&state, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}
