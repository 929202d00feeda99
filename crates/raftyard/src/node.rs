//! Wiring: opens the blob store and the metadata node, serves the registry, shuts down.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use raftyard_blobstore::{BlobStore, BlobStoreConfig};
use raftyard_raft::network::NoNetwork;
use raftyard_raft::{MetaNode, MetaNodeConfig, NodeAddr};
use raftyard_registry::{Registry, RegistryConfig, TlsFiles};
use tracing::info;

use crate::config::Config;

pub async fn serve(cfg: Config) -> anyhow::Result<()> {
    let data = cfg.node.data_dir.clone();
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let blobs = Arc::new(
        BlobStore::open(BlobStoreConfig {
            root: data.clone(),
            owner: format!("n{}", cfg.node.id),
            fsync: true,
        })
        .context("opening the blob store")?,
    );
    let mut meta_cfg = MetaNodeConfig::new(
        cfg.node.id,
        data.join("meta"),
        NodeAddr {
            peer: String::new(),
            registry: cfg.registry.listen.to_string(),
        },
    );
    meta_cfg.heartbeat_ms = cfg.raft.heartbeat_ms;
    meta_cfg.election_timeout_min_ms = cfg.raft.election_timeout_min_ms;
    meta_cfg.election_timeout_max_ms = cfg.raft.election_timeout_max_ms;
    meta_cfg.snapshot_every = cfg.raft.snapshot_every;
    let meta = MetaNode::start(meta_cfg, NoNetwork)
        .await
        .context("starting the metadata node")?;
    meta.wait_for_leader(Duration::from_secs(10))
        .await
        .context("no Raft leader was elected")?;

    let tls = match &cfg.registry.tls {
        Some(t) => Some(
            TlsFiles {
                cert: t.cert.clone(),
                key: t.key.clone(),
            }
            .acceptor()?,
        ),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(cfg.registry.listen)
        .await
        .with_context(|| format!("binding {}", cfg.registry.listen))?;
    let reg = Registry::new(
        blobs,
        meta.clone(),
        RegistryConfig {
            delete_enabled: cfg.registry.delete_enabled,
            upload_idle_timeout: cfg.upload_idle_timeout(),
        },
    );
    let upkeep = reg.spawn_upkeep();
    let scheme = if tls.is_some() { "https" } else { "http" };
    info!(node = cfg.node.id, data = %data.display(), "raftyard registry ready at {scheme}://{}", listener.local_addr()?);
    raftyard_registry::serve(reg, listener, tls, shutdown_signal()).await?;
    upkeep.abort();
    meta.shutdown().await;
    info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("interrupt received"),
        _ = term.recv() => info!("SIGTERM received"),
    }
}

pub async fn print_events(node: &str, mut since: u64, follow: bool, ca: Option<PathBuf>) -> anyhow::Result<()> {
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(90));
    if let Some(ca) = ca {
        let pem = std::fs::read(&ca).with_context(|| format!("reading {}", ca.display()))?;
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    let client = builder.build()?;
    let base = node.trim_end_matches('/');
    loop {
        let wait = if follow { 30 } else { 0 };
        let url = format!("{base}/v2/_raftyard/events?since={since}&limit=1000&wait={wait}");
        let resp = client.get(&url).send().await.with_context(|| format!("GET {url}"))?;
        anyhow::ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
        let text = resp.text().await?;
        let mut n = 0;
        for line in text.lines().filter(|l| !l.is_empty()) {
            println!("{line}");
            let v: serde_json::Value = serde_json::from_str(line)?;
            since = v["index"].as_u64().unwrap_or(since) + 1;
            n += 1;
        }
        if n == 0 && !follow {
            return Ok(());
        }
    }
}
