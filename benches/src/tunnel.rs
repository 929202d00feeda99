//! The tunnel benchmark: raftyard's relay and agent against rathole and against no tunnel at
//! all, side by side in one run.
//!
//! Everything runs on loopback, started by the benchmark from its own binaries:
//!
//! * a **sink/echo server** (threads in this process) as the service behind the tunnels;
//! * **raftyard**: `raftyard-relay` (the relay alone, as on a public host) and a standalone
//!   `raftyard agent` forwarding the sink
//!   (splice(2) data path, 4 pooled data channels); a second relay+agent pair with
//!   `splice = false` (a copy through user-space buffers, the path a multiplexed design would
//!   have at best); a third with `pool = 0` (a data channel dialled per visitor);
//! * **rathole**: `rathole --server` and `rathole --client` (its default TCP transport),
//!   forwarding the same sink;
//! * a **raftyard registry node** whose built-in agent registers it with the raftyard relay,
//!   and which rathole forwards too.
//!
//! Routes: `direct` (the service's own port), `raftyard`, `raftyard-copy`, `raftyard-dial`,
//! `rathole`. Each
//! repetition runs every workload once per route, back to back, rotating which route goes
//! first; the table gives medians over repetitions and the median of per-repetition ratios.
//!
//! * **stream**: one connection sends `--stream-mib` to the sink, which answers with the byte
//!   count it received; Gbit/s from connect to answer.
//! * **parallel**: `--parallel` such connections at once; aggregate Gbit/s.
//! * **rtt**: 64-byte ping-pongs on one connection; p50/p99.
//! * **connect**: a new connection and its first 64-byte echo; p50/p99 (a tunnel adds the
//!   data-channel set-up here).
//! * **registry push / pull**: a `--blob-mib` blob pushed (POST + one PUT) and pulled through
//!   the route (direct, raftyard, rathole).
//! * **RSS** of the relay and the agent (raftyard: `raftyard-relay` + `raftyard agent`;
//!   rathole: server + client), idle after start and peak during the parallel streams.
//!
//! ```text
//! cargo build --release -p raftyard -p raftyard-bench
//! cargo install rathole        # without --locked
//! target/release/raftyard-tunnel-bench
//! ```

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use rand::RngCore;
use reqwest::Url;
use serde_json::{json, Value};

use crate::bulk;
use crate::report::{median, percentile};
use crate::server::{free_ports, rss_kib, spawn_logged, RunDir};

#[derive(Debug, Parser)]
#[command(name = "raftyard-tunnel-bench", version, about = "raftyard's tunnel against rathole and a direct connection")]
pub struct Args {
    /// Path of the raftyard binary [default: <workspace>/target/release/raftyard].
    #[arg(long)]
    pub raftyard: Option<PathBuf>,
    /// Path of the small relay binary [default: <workspace>/target/release/raftyard-relay].
    #[arg(long)]
    pub raftyard_relay: Option<PathBuf>,
    /// Path of the rathole binary [default: `rathole` on PATH, else ~/.cargo/bin/rathole].
    #[arg(long)]
    pub rathole: Option<PathBuf>,
    /// Repetitions of every workload on every route.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub reps: u32,
    /// MiB sent by the single-stream workload.
    #[arg(long, default_value_t = 2048)]
    pub stream_mib: u64,
    /// Connections of the parallel workload (each sends stream-mib / parallel).
    #[arg(long, default_value_t = 4)]
    pub parallel: u32,
    /// Round trips of the rtt workload.
    #[arg(long, default_value_t = 2000)]
    pub rtts: u32,
    /// New connections of the connect workload.
    #[arg(long, default_value_t = 200)]
    pub connects: u32,
    /// MiB of the blob pushed and pulled through each route.
    #[arg(long, default_value_t = 256)]
    pub blob_mib: u64,
    /// Directory for the run's configs, data and logs [default: <workspace>/target/bench-tmp].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Keep the run directory.
    #[arg(long)]
    pub keep_data: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn workspace_root() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    dir.parent().unwrap_or(dir).to_path_buf()
}

/// The ways from client to service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Direct,
    Raftyard,
    RaftyardCopy,
    RaftyardDial,
    Rathole,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Raftyard => "raftyard",
            Route::RaftyardCopy => "raftyard-copy",
            Route::RaftyardDial => "raftyard-dial",
            Route::Rathole => "rathole",
        }
    }
}

/// A child process, killed on drop.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn start(name: &'static str, dir: &Path, cmd: &mut Command) -> Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let child = spawn_logged(cmd, &log).with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc { name, child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited with {st}; log:\n{}", self.name, std::fs::read_to_string(&self.log).unwrap_or_default());
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sink/echo service: first byte `S` → count everything until EOF and answer with the
/// count (8 bytes, big endian); `E` → echo 64-byte messages until EOF.
fn serve_sink(l: TcpListener) {
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut mode = [0u8; 1];
            if s.read_exact(&mut mode).is_err() {
                return;
            }
            if mode[0] == b'S' {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(k) => n += k as u64,
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(&n.to_be_bytes());
            } else {
                let mut m = [0u8; 64];
                while s.read_exact(&mut m).is_ok() {
                    if s.write_all(&m).is_err() {
                        return;
                    }
                }
            }
        });
    }
}

/// Sends `bytes` to the sink at `addr`; returns the seconds until the sink confirmed them.
fn stream(addr: SocketAddr, bytes: u64, buf: &[u8]) -> Result<f64> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.write_all(b"S")?;
    let mut left = bytes;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..k])?;
        left -= k as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut n = [0u8; 8];
    s.read_exact(&mut n).context("reading the sink's count")?;
    let got = u64::from_be_bytes(n);
    if got != bytes {
        bail!("the sink got {got} of {bytes} bytes");
    }
    Ok(t.elapsed().as_secs_f64())
}

fn parallel(addr: SocketAddr, bytes: u64, k: u32, buf: &Arc<Vec<u8>>) -> Result<f64> {
    let t = Instant::now();
    let each = bytes / k as u64;
    let handles: Vec<_> = (0..k)
        .map(|_| {
            let buf = buf.clone();
            std::thread::spawn(move || stream(addr, each, &buf))
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("stream thread panicked"))??;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Round trips of 64 bytes on one connection, in microseconds.
fn rtts(addr: SocketAddr, n: u32) -> Result<Vec<f64>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"E")?;
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    // the first exchange also sets the tunnel up: not counted
    s.write_all(&msg)?;
    s.read_exact(&mut back)?;
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(out)
}

/// New connection + first 64-byte echo, in microseconds.
fn connects(addr: SocketAddr, n: u32) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut msg = [7u8; 65];
        msg[0] = b'E';
        s.write_all(&msg)?;
        let mut back = [0u8; 64];
        s.read_exact(&mut back)?;
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(out)
}

/// Pushes `blob` (POST, then one PUT with the digest) through `base`; returns seconds.
fn push(base: &Url, blob: &[u8], digest: &str) -> Result<f64> {
    let t = Instant::now();
    let timeout = Duration::from_secs(600);
    let r = bulk::request("POST", &base.join("/v2/bench/tunnel/blobs/uploads/")?, &[], &[], timeout)?;
    if r.status != 202 {
        bail!("upload start: {} {}", r.status, String::from_utf8_lossy(&r.body));
    }
    let loc = r.header("location").context("no Location")?;
    let mut url = base.join(loc)?;
    url.query_pairs_mut().append_pair("digest", digest);
    let r = bulk::request("PUT", &url, &[("Content-Type", "application/octet-stream".into())], blob, timeout)?;
    if r.status != 201 {
        bail!("upload PUT: {} {}", r.status, String::from_utf8_lossy(&r.body));
    }
    Ok(t.elapsed().as_secs_f64())
}

fn pull(base: &Url, digest: &str, len: u64) -> Result<f64> {
    let t = Instant::now();
    let r = bulk::request(
        "GET",
        &base.join(&format!("/v2/bench/tunnel/blobs/{digest}"))?,
        &[],
        &[],
        Duration::from_secs(600),
    )?;
    if r.status != 200 || r.body_len != len {
        bail!("pull: {} with {} of {len} bytes", r.status, r.body_len);
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Waits until `addr` answers a connect-and-echo (i.e. the whole route works).
fn wait_route(addr: SocketAddr, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if connects(addr, 1).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} at {addr} did not come up in 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_registry(base: &Url, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = bulk::request("GET", &base.join("/v2/")?, &[], &[], Duration::from_secs(5)) {
            if r.status == 200 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{what} at {base} did not answer /v2/ in 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// User + system CPU seconds used so far by `pids` (from `/proc/<pid>/stat`).
fn cpu_secs(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|st| {
            // fields after the parenthesised command name: state is field 3, utime 14, stime 15
            let rest = st.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        / hz
}

fn rss_mib(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| rss_kib(*p)).sum::<u64>() as f64 / 1024.0
}

/// Samples the summed RSS of `pids` every 20 ms while `f` runs; returns f's result and the peak.
fn with_peak_rss<T>(pids: &[u32], f: impl FnOnce() -> T) -> (T, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, pids) = (stop.clone(), pids.to_vec());
        std::thread::spawn(move || {
            let mut peak: f64 = 0.0;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(rss_mib(&pids));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let r = f();
    stop.store(true, Ordering::Relaxed);
    (r, sampler.join().unwrap_or(0.0))
}

/// Everything running for one benchmark run.
struct Setup {
    /// Sink through each route (Direct: the sink itself).
    sink_via: Vec<(Route, SocketAddr)>,
    /// Registry through each route that carries it.
    registry_via: Vec<(Route, Url)>,
    /// Tunnel processes per route, for RSS.
    pids: Vec<(Route, Vec<u32>)>,
    procs: Vec<Proc>,
}

fn rathole_bin(args: &Args) -> Result<PathBuf> {
    if let Some(p) = &args.rathole {
        return Ok(p.clone());
    }
    if let Ok(out) = Command::new("which").arg("rathole").output() {
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !p.is_empty() {
            return Ok(PathBuf::from(p));
        }
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = PathBuf::from(home).join(".cargo/bin/rathole");
    if p.exists() {
        return Ok(p);
    }
    bail!("rathole not found: `cargo install rathole` (without --locked), or pass --rathole PATH")
}

fn setup(args: &Args, dir: &Path) -> Result<Setup> {
    let bin = args.raftyard.clone().unwrap_or_else(|| workspace_root().join("target/release/raftyard"));
    let relay_bin =
        args.raftyard_relay.clone().unwrap_or_else(|| workspace_root().join("target/release/raftyard-relay"));
    let rathole = rathole_bin(args)?;
    let sink_l = TcpListener::bind("127.0.0.1:0")?;
    let sink = sink_l.local_addr()?;
    std::thread::spawn(move || serve_sink(sink_l));

    let p = free_ports(16)?;
    let at = |i: usize| -> SocketAddr { SocketAddr::from(([127, 0, 0, 1], p[i])) };
    let (reg, ctl, ctl_copy, rh_ctl) = (at(0), at(1), at(2), at(3));
    let (sink_ry, sink_copy, sink_rh, reg_ry, reg_rh) = (at(4), at(5), at(6), at(7), at(8));
    let (dash, dash_copy, reg_node_ry) = (at(9), at(10), at(11));
    let (ctl_dial, dash_dial, sink_dial) = (at(12), at(13), at(14));

    let out = Command::new(&bin)
        .args(["certs", "self-signed", "--host", "127.0.0.1", "--out"])
        .arg(dir.join("tls"))
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!("raftyard certs: {}", String::from_utf8_lossy(&out.stderr));
    }
    let token = "bench-token-0123456789abcdef";
    let tls = format!("tls = {{ cert = {:?}, key = {:?} }}", dir.join("tls/cert.pem"), dir.join("tls/key.pem"));
    let link = |ctl: SocketAddr, splice: bool, pool: usize| {
        format!(
            "address = \"{ctl}\"\nca = {:?}\ntoken = \"{token}\"\nsplice = {splice}\npool = {pool}\n",
            dir.join("tls/ca.pem")
        )
    };
    let mut procs = Vec::new();
    let mut pids = Vec::new();
    for (route, ctl, dash, sink_pub, splice, pool) in [
        (Route::Raftyard, ctl, dash, sink_ry, true, 4),
        (Route::RaftyardCopy, ctl_copy, dash_copy, sink_copy, false, 4),
        (Route::RaftyardDial, ctl_dial, dash_dial, sink_dial, true, 0),
    ] {
        let name = route.name();
        let mut relay = format!(
            "[relay]\nlisten = \"{ctl}\"\ndashboard = \"{dash}\"\nsplice = {splice}\n{tls}\n\
             [[agent]]\nname = \"bench\"\ntoken = \"{token}\"\n\
             [[service]]\nname = \"sink\"\nbind = \"{sink_pub}\"\n"
        );
        if route == Route::Raftyard {
            relay.push_str(&format!(
                "[[agent]]\nname = \"node1\"\ntoken = \"{token}\"\n\
                 [[service]]\nname = \"registry\"\nbind = \"{reg_ry}\"\n\
                 [[service]]\nname = \"registry-1\"\nbind = \"{reg_node_ry}\"\n"
            ));
        }
        let rc = dir.join(format!("{name}-relay.toml"));
        std::fs::write(&rc, relay)?;
        let ac = dir.join(format!("{name}-agent.toml"));
        std::fs::write(
            &ac,
            format!(
                "name = \"bench\"\n[[relay]]\n{}[[service]]\nname = \"sink\"\nlocal = \"{sink}\"\n",
                link(ctl, splice, pool)
            ),
        )?;
        let names: (&'static str, &'static str) = match route {
            Route::Raftyard => ("raftyard-relay", "raftyard-agent"),
            Route::RaftyardCopy => ("raftyard-copy-relay", "raftyard-copy-agent"),
            _ => ("raftyard-dial-relay", "raftyard-dial-agent"),
        };
        let r = Proc::start(names.0, dir, Command::new(&relay_bin).arg("--config").arg(&rc))?;
        std::thread::sleep(Duration::from_millis(200));
        let a = Proc::start(names.1, dir, Command::new(&bin).args(["agent", "--config"]).arg(&ac))?;
        pids.push((route, vec![r.pid(), a.pid()]));
        procs.push(r);
        procs.push(a);
    }

    // the registry node, with its built-in agent on the raftyard relay
    let node_cfg = dir.join("node.toml");
    std::fs::write(
        &node_cfg,
        format!(
            "[node]\nid = 1\ndata_dir = {:?}\n[registry]\nlisten = \"{reg}\"\n[cluster]\nlisten = \"127.0.0.1:0\"\n[auth]\nmode = \"none\"\n[[tunnel.relay]]\n{}",
            dir.join("node-data"),
            link(ctl, true, 4)
        ),
    )?;
    procs.push(Proc::start("raftyard-node", dir, Command::new(&bin).args(["serve", "--config"]).arg(&node_cfg))?);

    // rathole: server and client, default TCP transport
    let rs = dir.join("rathole-server.toml");
    std::fs::write(
        &rs,
        format!(
            "[server]\nbind_addr = \"{rh_ctl}\"\n[server.services.sink]\ntoken = \"{token}\"\nbind_addr = \"{sink_rh}\"\n\
             [server.services.registry]\ntoken = \"{token}\"\nbind_addr = \"{reg_rh}\"\n"
        ),
    )?;
    let rcl = dir.join("rathole-client.toml");
    std::fs::write(
        &rcl,
        format!(
            "[client]\nremote_addr = \"{rh_ctl}\"\n[client.services.sink]\ntoken = \"{token}\"\nlocal_addr = \"{sink}\"\n\
             [client.services.registry]\ntoken = \"{token}\"\nlocal_addr = \"{reg}\"\n"
        ),
    )?;
    let s = Proc::start("rathole-server", dir, Command::new(&rathole).arg("--server").arg(&rs))?;
    std::thread::sleep(Duration::from_millis(200));
    let c = Proc::start("rathole-client", dir, Command::new(&rathole).arg("--client").arg(&rcl))?;
    pids.push((Route::Rathole, vec![s.pid(), c.pid()]));
    procs.push(s);
    procs.push(c);

    let registry = Url::parse(&format!("http://{reg}/"))?;
    let sink_via = vec![
        (Route::Direct, sink),
        (Route::Raftyard, sink_ry),
        (Route::RaftyardCopy, sink_copy),
        (Route::RaftyardDial, sink_dial),
        (Route::Rathole, sink_rh),
    ];
    let registry_via = vec![
        (Route::Direct, registry),
        (Route::Raftyard, Url::parse(&format!("http://{reg_ry}/"))?),
        (Route::Rathole, Url::parse(&format!("http://{reg_rh}/"))?),
    ];
    let mut setup = Setup { sink_via, registry_via, pids, procs };
    for (route, addr) in &setup.sink_via {
        wait_route(*addr, route.name())?;
    }
    for (route, base) in &setup.registry_via {
        wait_registry(base, &format!("the registry via {}", route.name()))?;
    }
    for p in &mut setup.procs {
        p.check()?;
    }
    Ok(setup)
}

/// Samples of one metric per route, one per repetition.
#[derive(Default)]
struct Samples(Vec<(Route, Vec<f64>)>);

impl Samples {
    fn push(&mut self, route: Route, v: f64) {
        match self.0.iter_mut().find(|(r, _)| *r == route) {
            Some((_, s)) => s.push(v),
            None => self.0.push((route, vec![v])),
        }
    }

    fn get(&self, route: Route) -> Option<&Vec<f64>> {
        self.0.iter().find(|(r, _)| *r == route).map(|(_, s)| s)
    }

    fn median(&self, route: Route) -> Option<f64> {
        self.get(route).and_then(|s| median(s))
    }

    /// Median over repetitions of a/b (higher_is_better) or b/a.
    fn ratio(&self, a: Route, b: Route, higher_is_better: bool) -> Option<f64> {
        let (x, y) = (self.get(a)?, self.get(b)?);
        let r: Vec<f64> = x.iter().zip(y).map(|(x, y)| if higher_is_better { x / y } else { y / x }).collect();
        median(&r)
    }
}

struct Metric {
    name: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    samples: Samples,
}

impl Metric {
    fn new(name: &'static str, unit: &'static str, higher_is_better: bool) -> Metric {
        Metric { name, unit, higher_is_better, samples: Samples::default() }
    }
}

pub fn run(args: &Args) -> Result<()> {
    let work = args.work_dir.clone().unwrap_or_else(|| workspace_root().join("target/bench-tmp"));
    let run_dir = RunDir::create(&work, args.keep_data)?;
    let dir = run_dir.path.clone();
    eprintln!("run directory: {}", dir.display());
    let mut setup = setup(args, &dir)?;
    std::thread::sleep(Duration::from_secs(1));
    // [relay, agent] of each route
    let each = |pids: &[u32]| pids.iter().map(|p| rss_mib(&[*p])).collect::<Vec<f64>>();
    let idle: Vec<(Route, Vec<f64>)> = setup.pids.iter().map(|(r, p)| (*r, each(p))).collect();
    eprintln!("idle RSS: {idle:?}");

    let mut buf = vec![0u8; 1 << 20];
    rand::thread_rng().fill_bytes(&mut buf);
    let buf = Arc::new(buf);
    let stream_bytes = args.stream_mib << 20;
    for (route, addr) in &setup.sink_via {
        stream(*addr, 64 << 20, &buf).with_context(|| format!("warm-up via {}", route.name()))?;
    }
    let mut blob = vec![0u8; (args.blob_mib << 20) as usize];
    rand::thread_rng().fill_bytes(&mut blob);

    let mut m_stream = Metric::new("stream, 1 connection", "Gbit/s", true);
    let mut m_cpu = Metric::new("tunnel CPU per GiB streamed", "ms", false);
    let mut m_par = Metric::new("stream, parallel", "Gbit/s", true);
    let mut m_rtt50 = Metric::new("round trip p50", "µs", false);
    let mut m_rtt99 = Metric::new("round trip p99", "µs", false);
    let mut m_con50 = Metric::new("new connection + echo p50", "µs", false);
    let mut m_con99 = Metric::new("new connection + echo p99", "µs", false);
    let mut m_push = Metric::new("registry push", "MB/s", true);
    let mut m_pull = Metric::new("registry pull", "MB/s", true);
    let mut peak = Samples::default();
    let gbit = |bytes: u64, secs: f64| bytes as f64 * 8.0 / secs / 1e9;

    for rep in 0..args.reps {
        let mut order = setup.sink_via.clone();
        let k = rep as usize % order.len();
        order.rotate_left(k);
        eprintln!(
            "repetition {}/{}: {:?}",
            rep + 1,
            args.reps,
            order.iter().map(|(r, _)| r.name()).collect::<Vec<_>>()
        );
        for (route, addr) in &order {
            let pids = setup.pids.iter().find(|(r, _)| r == route).map(|(_, p)| p.clone()).unwrap_or_default();
            let cpu = cpu_secs(&pids);
            let t = stream(*addr, stream_bytes, &buf)?;
            m_stream.samples.push(*route, gbit(stream_bytes, t));
            if !pids.is_empty() {
                m_cpu
                    .samples
                    .push(*route, (cpu_secs(&pids) - cpu) * 1000.0 / (stream_bytes as f64 / (1u64 << 30) as f64));
            }
            let (t, p) = with_peak_rss(&pids, || parallel(*addr, stream_bytes, args.parallel, &buf));
            m_par.samples.push(*route, gbit(stream_bytes, t?));
            if !pids.is_empty() {
                peak.push(*route, p);
            }
            let r = rtts(*addr, args.rtts)?;
            m_rtt50.samples.push(*route, percentile(&r, 50.0));
            m_rtt99.samples.push(*route, percentile(&r, 99.0));
            let c = connects(*addr, args.connects)?;
            m_con50.samples.push(*route, percentile(&c, 50.0));
            m_con99.samples.push(*route, percentile(&c, 99.0));
        }
        let mut reg_order = setup.registry_via.clone();
        let k = rep as usize % reg_order.len();
        reg_order.rotate_left(k);
        for (route, base) in &reg_order {
            // fresh leading bytes: a new digest, so nothing is deduplicated
            blob[..8].copy_from_slice(&(rep as u64 * 16 + *route as u64).to_be_bytes());
            let digest = crate::client::sha256_digest(&blob);
            let t = push(base, &blob, &digest).with_context(|| format!("push via {}", route.name()))?;
            m_push.samples.push(*route, blob.len() as f64 / t / 1e6);
            let t = pull(base, &digest, blob.len() as u64).with_context(|| format!("pull via {}", route.name()))?;
            m_pull.samples.push(*route, blob.len() as f64 / t / 1e6);
        }
        for p in &mut setup.procs {
            p.check()?;
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let after: Vec<(Route, Vec<f64>)> = setup.pids.iter().map(|(r, p)| (*r, each(p))).collect();

    let metrics = [m_stream, m_cpu, m_par, m_rtt50, m_rtt99, m_con50, m_con99, m_push, m_pull];
    let mut out = String::new();
    out.push_str(&format!(
        "{:<28} {:>8} {:>10} {:>10} {:>14} {:>14} {:>10} {:>16} {:>16}\n",
        "metric (median)",
        "unit",
        "direct",
        "raftyard",
        "raftyard-copy",
        "raftyard-dial",
        "rathole",
        "raftyard/rathole",
        "raftyard/direct"
    ));
    let cell = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
    let ratio = |v: Option<f64>| v.map(|v| format!("{v:.2}x")).unwrap_or_else(|| "-".into());
    for m in &metrics {
        let s = &m.samples;
        out.push_str(&format!(
            "{:<28} {:>8} {:>10} {:>10} {:>14} {:>14} {:>10} {:>16} {:>16}\n",
            m.name,
            m.unit,
            cell(s.median(Route::Direct)),
            cell(s.median(Route::Raftyard)),
            cell(s.median(Route::RaftyardCopy)),
            cell(s.median(Route::RaftyardDial)),
            cell(s.median(Route::Rathole)),
            ratio(s.ratio(Route::Raftyard, Route::Rathole, m.higher_is_better)),
            ratio(s.ratio(Route::Raftyard, Route::Direct, m.higher_is_better)),
        ));
    }
    let rss_row = |name: &str, v: &dyn Fn(Route) -> Option<f64>| {
        format!(
            "{:<28} {:>8} {:>10} {:>10} {:>14} {:>14} {:>10}\n",
            name,
            "MiB",
            "-",
            cell(v(Route::Raftyard)),
            cell(v(Route::RaftyardCopy)),
            cell(v(Route::RaftyardDial)),
            cell(v(Route::Rathole))
        )
    };
    let find = |l: &Vec<(Route, Vec<f64>)>, r: Route, i: usize| l.iter().find(|(x, _)| *x == r).map(|(_, v)| v[i]);
    out.push_str(&rss_row("RSS relay, idle", &|r| find(&idle, r, 0)));
    out.push_str(&rss_row("RSS agent, idle", &|r| find(&idle, r, 1)));
    out.push_str(&rss_row("RSS relay+agent, peak", &|r| peak.get(r).map(|v| v.iter().cloned().fold(0.0, f64::max))));
    out.push_str(&rss_row("RSS relay, after", &|r| find(&after, r, 0)));
    out.push_str(&rss_row("RSS agent, after", &|r| find(&after, r, 1)));
    let mut split = String::new();
    for (route, pids) in &setup.pids {
        let names: Vec<String> = setup
            .procs
            .iter()
            .filter(|p| pids.contains(&p.pid()))
            .map(|p| format!("{} {:.1} MiB", p.name, rss_kib(p.pid()).unwrap_or(0) as f64 / 1024.0))
            .collect();
        split.push_str(&format!("  {}: {}\n", route.name(), names.join(", ")));
    }
    println!(
        "tunnel benchmark: {} reps, stream {} MiB, {} parallel, blob {} MiB\n\n{out}\nRSS per process after the run:\n{split}",
        args.reps, args.stream_mib, args.parallel, args.blob_mib
    );
    if let Some(path) = &args.json {
        let j: Value = json!({
            "args": format!("{args:?}"),
            "metrics": metrics.iter().map(|m| json!({
                "name": m.name, "unit": m.unit, "higher_is_better": m.higher_is_better,
                "samples": m.samples.0.iter().map(|(r, s)| (r.name().to_string(), json!(s))).collect::<serde_json::Map<_, _>>(),
            })).collect::<Vec<_>>(),
            "rss_idle_mib": idle.iter().map(|(r, v)| (r.name().to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "rss_peak_mib": peak.0.iter().map(|(r, v)| (r.name().to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&j)? + "\n")?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
