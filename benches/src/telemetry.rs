//! `raftyard-telemetry-bench`: what tracing costs, side by side in one run.
//!
//! Two one-node raftyards on loopback, holding the same small image:
//!
//! * `raftyard` — no `[telemetry]`: no exporter, no trace context read or written;
//! * `raftyard traced` — spans exported over OTLP/gRPC to a receiver in this process (which
//!   counts them), with the default sampler (`parentbased_traceidratio`, 0.1: one request in
//!   ten is a trace) and JSON log lines (`--sampler`, `--sampler-arg` and `--log-format` change
//!   those; `--sampler parentbased_always_on` traces every request).
//!
//! Each repetition runs, against each registry in turn (the order alternates), `--requests`
//! sequential manifest GETs by tag over one keep-alive connection (p50, p99), and `--pushes`
//! monolithic pushes of a `--blob-mib` MiB blob with fresh content (MB/s over all of them).
//! The table gives the medians over repetitions and traced/off ratios (the target: tracing
//! costs under 5 %, i.e. GET p50 off/traced ≥ 0.95 and push MB/s traced/off ≥ 0.95).
//!
//! ```text
//! cargo build --release -p raftyard -p raftyard-bench
//! target/release/raftyard-telemetry-bench --raftyard target/release/raftyard
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use serde_json::json;

use crate::auth::{client, one_node, seed, timed_gets, MkDir as _, REPO};
use crate::client::RegistryClient;
use crate::report::median;
use crate::server::{free_ports, Server};
use crate::workload::BlobSource;

#[derive(clap::Parser, Debug)]
#[command(name = "raftyard-telemetry-bench", about = "What tracing costs: raftyard with and without OTLP export")]
pub struct Args {
    /// The raftyard binary.
    #[arg(long, default_value = "target/release/raftyard")]
    pub raftyard: PathBuf,
    /// Repetitions (medians are taken over them).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Sequential manifest GETs per registry and repetition.
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Blob pushes per registry and repetition.
    #[arg(long, default_value_t = 4)]
    pub pushes: usize,
    /// Size of each pushed blob, MiB.
    #[arg(long, default_value_t = 64)]
    pub blob_mib: usize,
    /// The traced registry's sampler (`[telemetry] sampler`); default: raftyard's default.
    #[arg(long)]
    pub sampler: Option<String>,
    /// The traced registry's log lines: `json` (default) or `text`.
    #[arg(long, default_value = "json")]
    pub log_format: String,
    /// With `--sampler`'s `*traceidratio`: the ratio.
    #[arg(long)]
    pub sampler_arg: Option<f64>,
    #[command(flatten)]
    pub run: crate::server::RunOptions,
}

/// Counts the spans exported to it.
#[derive(Clone, Default)]
struct Receiver(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = req.into_inner().resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

struct Subject {
    label: &'static str,
    _server: Server,
    base: String,
    http: reqwest::Client,
    pusher: RegistryClient,
    /// Per repetition: manifest GET p50 and p99 (ms), push MB/s.
    gets: Vec<(f64, f64)>,
    push: Vec<f64>,
}

pub fn run(args: &Args) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(run_async(args))
}

async fn run_async(args: &Args) -> Result<()> {
    let run_dir = args.run.run_dir()?;
    let dir = &run_dir.path;
    let receiver = Receiver::default();
    let port = free_ports(1)?[0];
    let addr = format!("127.0.0.1:{port}").parse()?;
    tokio::spawn(
        tonic::transport::Server::builder().add_service(TraceServiceServer::new(receiver.clone())).serve(addr),
    );

    let mut traced = format!(
        "[telemetry]\nlog_format = {:?}\notlp_endpoint = \"http://127.0.0.1:{port}\"\notlp_protocol = \"grpc\"\n",
        args.log_format
    );
    if let Some(s) = &args.sampler {
        traced.push_str(&format!("sampler = {s:?}\n"));
    }
    if let Some(a) = args.sampler_arg {
        traced.push_str(&format!("sampler_arg = {a}\n"));
    }
    let mut subjects = Vec::new();
    for (label, telemetry) in [("raftyard", String::new()), ("raftyard traced", traced)] {
        let d = dir.join(label.replace(' ', "-")).tap_mkdir()?;
        let (server, base, _) = one_node(&args.raftyard, &d, label, &telemetry).await?;
        let http = client(None)?;
        seed(&http, &base).await.with_context(|| format!("seeding {label}"))?;
        let url = format!("{base}/v2/{REPO}/manifests/v1");
        timed_gets(&http, &url, "application/vnd.oci.image.manifest.v1+json", 100).await?; // warm-up
        let pusher =
            RegistryClient::new(format!("{base}/").parse()?, Duration::from_secs(30), Duration::from_secs(600))?;
        subjects.push(Subject { label, _server: server, base, http, pusher, gets: vec![], push: vec![] });
    }
    let source = BlobSource::new(args.blob_mib << 20);
    for rep in 0..args.reps {
        for k in 0..subjects.len() {
            let s = &mut subjects[(rep + k) % 2];
            let url = format!("{}/v2/{REPO}/manifests/v1", s.base);
            let g = timed_gets(&s.http, &url, "application/vnd.oci.image.manifest.v1+json", args.requests)
                .await
                .with_context(|| format!("manifest GETs on {}", s.label))?;
            let mut took = Duration::ZERO;
            for _ in 0..args.pushes {
                let (data, digest) = source.fresh();
                // written back before the timing, so that one registry's pages are not flushed in the
                // other's measurement
                unsafe { libc::sync() };
                let t = Instant::now();
                s.pusher.push_blob_monolithic("bench/push", &data, &digest).await?;
                took += t.elapsed();
            }
            s.gets.push(g);
            s.push.push((args.pushes * source.size()) as f64 / 1e6 / took.as_secs_f64());
        }
        eprintln!("repetition {}/{} done", rep + 1, args.reps);
    }
    // the exporter sends a batch when it is full or every 5 s: wait for the last one
    tokio::time::sleep(Duration::from_secs(6)).await;
    let spans = receiver.0.load(Ordering::Relaxed);
    if spans == 0 && args.sampler.is_none() {
        bail!("the traced registry exported no span: the comparison would be of nothing");
    }

    let med = |v: Vec<f64>| median(&v).unwrap_or(0.0);
    let rows: Vec<(&str, [f64; 3])> = subjects
        .iter()
        .map(|s| {
            let r = [
                med(s.gets.iter().map(|g| g.0).collect()),
                med(s.gets.iter().map(|g| g.1).collect()),
                med(s.push.clone()),
            ];
            (s.label, r)
        })
        .collect();
    println!(
        "\n{} sequential manifest GETs and {} pushes of {} MiB per registry and repetition, {} repetitions, medians\n",
        args.requests, args.pushes, args.blob_mib, args.reps
    );
    println!("| registry | manifest GET p50 (ms) | manifest GET p99 (ms) | blob push (MB/s) |");
    println!("|---|---|---|---|");
    for (l, r) in &rows {
        println!("| {l} | {:.3} | {:.3} | {:.1} |", r[0], r[1], r[2]);
    }
    let (off, on) = (rows[0].1, rows[1].1);
    // per-repetition ratios: each from the two halves of one repetition
    let per = |f: &dyn Fn(&Subject, usize) -> f64, inv: bool| {
        med((0..args.reps)
            .map(|i| {
                let (a, b) = (f(&subjects[0], i), f(&subjects[1], i));
                if inv {
                    a / b
                } else {
                    b / a
                }
            })
            .collect())
    };
    let get_ratio = per(&|s, i| s.gets[i].0, true);
    let push_ratio = per(&|s, i| s.push[i], false);
    println!("\ntraced vs off (1: no cost; target ≥ 0.95), median of per-repetition ratios\n");
    println!("| manifest GET p50 (off / traced) | blob push MB/s (traced / off) | spans received |");
    println!("|---|---|---|");
    println!("| {get_ratio:.3} | {push_ratio:.3} | {spans} |");
    if let Some(p) = &args.run.json {
        let out = json!({
            "requests": args.requests, "pushes": args.pushes, "blob_mib": args.blob_mib, "reps": args.reps,
            "rows": rows.iter().map(|(l, r)| json!({"registry": l, "manifest_p50_ms": r[0], "manifest_p99_ms": r[1],
                                                      "push_mb_s": r[2]})).collect::<Vec<_>>(),
            "ratios": {"manifest_get_p50": get_ratio, "push_mb_s": push_ratio, "medians_get_p50": off[0] / on[0],
                       "medians_push": on[2] / off[2]},
            "spans_received": spans,
        });
        std::fs::write(p, serde_json::to_vec_pretty(&out)?)?;
    }
    Ok(())
}
