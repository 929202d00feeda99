//! The `raftyard` program as a library: the one configuration struct ([`config`]), the wiring
//! of the crates into a running node with ordered shutdown ([`node`]), the admin client behind
//! `raftyard cluster …` ([`admin`]) and `raftyard user|token|access …` ([`access`]), online backups to a directory (`raftyard backup …`,
//! [`backup`]), certificate generation ([`certs`]) and the `raftyard relay`
//! and `raftyard agent` processes ([`tunnel`]). The binary
//! (`main.rs`) is only the command line over these; tests start nodes in-process with
//! [`node::start`]. No registry, storage or consensus logic lives here.

/// An HTTP client for the registry API, trusting `ca` (PEM) too if given.
pub fn http_client(timeout: std::time::Duration, ca: Option<&std::path::Path>) -> anyhow::Result<reqwest::Client> {
    http_client_as(timeout, ca, None)
}

/// The same, sending `login` (user, password) as HTTP Basic with every request.
pub fn http_client_as(
    timeout: std::time::Duration,
    ca: Option<&std::path::Path>,
    login: Option<&(String, String)>,
) -> anyhow::Result<reqwest::Client> {
    use anyhow::Context;
    let mut builder = reqwest::Client::builder().timeout(timeout);
    if let Some((user, pw)) = login {
        use base64::Engine as _;
        let v = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}")));
        let mut value = reqwest::header::HeaderValue::from_str(&v)?;
        value.set_sensitive(true);
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::AUTHORIZATION, value);
        builder = builder.default_headers(h);
    }
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    Ok(builder.build()?)
}

pub mod access;
pub mod admin;
pub mod backup;
pub mod certs;
pub mod config;
pub mod format;
pub mod gc;
pub mod import;
pub mod node;
pub mod quota;
pub mod retention;
pub mod tunnel;

/// Log lines to stderr, filtered by `RUST_LOG` (default: info, with openraft and sled quieter),
/// for the commands other than `serve` (which installs `[telemetry]`).
pub fn init_logging() {
    raftyard_telemetry::init_logging();
}
