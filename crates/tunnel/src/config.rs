//! Configuration of the relay (`relay.toml`), of one agent's link to a relay (the node's
//! `[[tunnel.relay]]` sections) and of a standalone agent (`agent.toml`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::Error;

/// A token given inline or read from a file. Never printed.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    /// The token itself.
    pub token: Option<String>,
    /// A file holding the token (surrounding whitespace is ignored).
    pub token_file: Option<PathBuf>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

impl Token {
    /// The token's value; exactly one of `token` and `token_file` must be set.
    pub fn resolve(&self, what: &str) -> Result<String, Error> {
        let t = match (&self.token, &self.token_file) {
            (Some(t), None) => t.clone(),
            (None, Some(p)) => {
                std::fs::read_to_string(p).map_err(|e| Error::Io(p.display().to_string(), e))?.trim().to_string()
            }
            _ => return Err(Error::Config(format!("{what}: set exactly one of token and token_file"))),
        };
        if t.len() < 16 {
            return Err(Error::Config(format!("{what}: a token needs at least 16 characters")));
        }
        Ok(t)
    }
}

/// `relay.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// The relay's ports and timeouts.
    pub relay: RelaySection,
    /// Agents allowed to connect, each with its own token.
    #[serde(rename = "agent", default)]
    pub agents: Vec<AgentEntry>,
    /// Public services and the addresses they listen on.
    #[serde(rename = "service", default)]
    pub services: Vec<ServiceEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySection {
    /// Control port: agents' TLS control connections and their data channels.
    #[serde(default = "default_control")]
    pub listen: SocketAddr,
    /// Dashboard: HTML at `/`, JSON at `/api/status`, Prometheus at `/metrics`. Absent: off.
    #[serde(default = "default_dashboard")]
    pub dashboard: Option<SocketAddr>,
    /// The dashboard's user (HTTP Basic), with `dashboard_password_file`. Required when the
    /// dashboard listens beyond loopback.
    #[serde(default)]
    pub dashboard_user: Option<String>,
    /// A file holding the dashboard's password (first line, at least 12 characters). Never
    /// printed.
    #[serde(default)]
    pub dashboard_password_file: Option<PathBuf>,
    /// Certificate and key of the control port.
    pub tls: TlsFiles,
    /// How long a visitor waits for an agent's data channel before the relay tries another
    /// agent, milliseconds.
    #[serde(default = "default_open_timeout")]
    pub open_timeout_ms: u64,
    /// Time allowed for a TLS handshake and the agent's hello, or for a data channel's
    /// preamble, milliseconds.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_ms: u64,
    /// Handshakes in progress at once; connections beyond are closed and counted.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// Move bytes with splice(2) (Linux) instead of copying them through user space.
    #[serde(default = "yes")]
    pub splice: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Private key (PEM). Never printed.
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    /// The agent's name, as it presents itself (a node's is `node<id>` unless configured).
    pub name: String,
    /// Its token.
    #[serde(flatten)]
    pub token: Token,
    /// Services it may register. Absent: any configured service.
    pub services: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceEntry {
    /// Service name, as agents register it (`registry`, `registry-<node-id>`, ...).
    pub name: String,
    /// Public address visitors connect to.
    pub bind: SocketAddr,
}

/// One relay an agent keeps a control connection to (a node's `[[tunnel.relay]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayLink {
    /// The relay's control port, `host:port`.
    pub address: String,
    /// Name checked against the relay's certificate. Default: the host part of `address`.
    pub server_name: Option<String>,
    /// CA certificate (PEM) that signs the relay's certificate.
    pub ca: PathBuf,
    /// The agent's name at this relay. Default: `node<id>` inside a node.
    pub name: Option<String>,
    /// This agent's token at this relay.
    #[serde(flatten)]
    pub token: Token,
    /// Seconds between heartbeats.
    #[serde(default = "default_heartbeat_interval")]
    pub heartbeat_interval_secs: u64,
    /// Seconds without an answer after which the connection counts as dead, on both sides.
    #[serde(default = "default_heartbeat_timeout")]
    pub heartbeat_timeout_secs: u64,
    /// First reconnect delay, milliseconds; doubled (with jitter) on each failure.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, milliseconds.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_ms: u64,
    /// A connection that stayed up this long resets the reconnect delay, seconds.
    #[serde(default = "default_stable_after")]
    pub stable_after_secs: u64,
    /// Move bytes with splice(2) (Linux) instead of copying them through user space.
    #[serde(default = "yes")]
    pub splice: bool,
    /// Idle data channels kept open to this relay, so that a new visitor is forwarded without
    /// waiting for a channel to be dialled (one round trip to the relay saved per connection).
    /// 0: dial a channel per visitor. At most 64.
    #[serde(default = "default_pool")]
    pub pool: usize,
}

/// `agent.toml` of `raftyard agent`: an agent outside a node, forwarding any local TCP service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// Default agent name for every relay.
    pub name: String,
    /// Relays to connect to, all at once.
    #[serde(rename = "relay")]
    pub relays: Vec<RelayLink>,
    /// Local services to offer.
    #[serde(rename = "service")]
    pub services: Vec<LocalService>,
}

/// A service the agent offers: the relay's name for it and the local address it forwards to.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LocalService {
    /// Name the relay knows the service by.
    pub name: String,
    /// Local `host:port` each visitor's connection is forwarded to.
    pub local: String,
    /// Start each local connection with a PROXY protocol v2 header naming the visitor (for a
    /// service that reads one: a node's own registry does, from its in-process agent).
    #[serde(default)]
    pub proxy_protocol: bool,
}

fn default_control() -> SocketAddr {
    "0.0.0.0:7000".parse().expect("valid address")
}
fn default_dashboard() -> Option<SocketAddr> {
    Some("127.0.0.1:7500".parse().expect("valid address"))
}
fn default_open_timeout() -> u64 {
    3000
}
fn default_handshake_timeout() -> u64 {
    10_000
}
fn default_max_handshakes() -> usize {
    256
}
fn yes() -> bool {
    true
}
fn default_heartbeat_interval() -> u64 {
    30
}
fn default_heartbeat_timeout() -> u64 {
    90
}
fn default_reconnect_min() -> u64 {
    500
}
fn default_reconnect_max() -> u64 {
    30_000
}
fn default_pool() -> usize {
    4
}
fn default_stable_after() -> u64 {
    60
}

fn load<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io(path.display().to_string(), e))?;
    toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

impl RelayConfig {
    pub fn load(path: &Path) -> Result<RelayConfig, Error> {
        let c: RelayConfig = load(path)?;
        c.validate()?;
        Ok(c)
    }

    /// `user:password` of the dashboard, if it has a login.
    pub fn dashboard_login(&self) -> Result<Option<String>, Error> {
        match (&self.relay.dashboard_user, &self.relay.dashboard_password_file) {
            (None, None) => Ok(None),
            (Some(u), Some(p)) => {
                let text = std::fs::read_to_string(p).map_err(|e| Error::Io(p.display().to_string(), e))?;
                let pw = text.lines().next().unwrap_or("");
                if pw.chars().count() < 12 {
                    return Err(Error::Config(
                        "dashboard_password_file: the password needs at least 12 characters".into(),
                    ));
                }
                if u.is_empty() || u.contains(':') {
                    return Err(Error::Config("dashboard_user: not empty, no ':'".into()));
                }
                Ok(Some(format!("{u}:{pw}")))
            }
            _ => Err(Error::Config("set both dashboard_user and dashboard_password_file, or neither".into())),
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        if let Some(d) = self.relay.dashboard {
            if self.dashboard_login()?.is_none() && !d.ip().is_loopback() {
                return Err(Error::Config(format!(
                    "the dashboard listens on {d}, beyond loopback: set dashboard_user and dashboard_password_file"
                )));
            }
        }
        let mut names = std::collections::HashSet::new();
        for s in &self.services {
            if !names.insert(&s.name) {
                return Err(Error::Config(format!("service {:?} is configured twice", s.name)));
            }
        }
        let mut agents = std::collections::HashSet::new();
        for a in &self.agents {
            if !agents.insert(&a.name) {
                return Err(Error::Config(format!("agent {:?} is configured twice", a.name)));
            }
            a.token.resolve(&format!("agent {:?}", a.name))?;
            for s in a.services.iter().flatten() {
                if !names.contains(s) {
                    return Err(Error::Config(format!(
                        "agent {:?} allows service {s:?}, which is not configured",
                        a.name
                    )));
                }
            }
        }
        if self.relay.open_timeout_ms == 0 || self.relay.handshake_timeout_ms == 0 || self.relay.max_handshakes == 0 {
            return Err(Error::Config("relay timeouts and max_handshakes must be > 0".into()));
        }
        Ok(())
    }
}

impl RelayLink {
    pub fn validate(&self) -> Result<(), Error> {
        self.token.resolve(&format!("relay {}", self.address))?;
        if self.heartbeat_interval_secs == 0 || self.heartbeat_timeout_secs <= self.heartbeat_interval_secs {
            return Err(Error::Config(format!(
                "relay {}: heartbeat_timeout_secs must exceed heartbeat_interval_secs > 0",
                self.address
            )));
        }
        if self.pool > crate::proto::MAX_POOL {
            return Err(Error::Config(format!("relay {}: pool is at most {}", self.address, crate::proto::MAX_POOL)));
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            return Err(Error::Config(format!(
                "relay {}: need 0 < reconnect_min_ms <= reconnect_max_ms",
                self.address
            )));
        }
        Ok(())
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(self.heartbeat_interval_secs)
    }

    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_secs(self.heartbeat_timeout_secs)
    }

    /// The name to verify the relay's certificate against.
    pub fn server_name(&self) -> String {
        self.server_name.clone().unwrap_or_else(|| match self.address.rsplit_once(':') {
            Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']').to_string(),
            None => self.address.clone(),
        })
    }
}

impl AgentFile {
    pub fn load(path: &Path) -> Result<AgentFile, Error> {
        let c: AgentFile = load(path)?;
        for r in &c.relays {
            r.validate()?;
        }
        if c.services.is_empty() {
            return Err(Error::Config(format!("{}: no [[service]]", path.display())));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_file_with_defaults_and_checks() {
        let c: RelayConfig = toml::from_str(
            r#"
            [relay]
            tls = { cert = "c.pem", key = "k.pem" }
            [[agent]]
            name = "node1"
            token = "0123456789abcdef0123"
            services = ["registry"]
            [[service]]
            name = "registry"
            bind = "0.0.0.0:6000"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.relay.listen.port(), 7000);
        assert_eq!(c.relay.dashboard.unwrap().port(), 7500);
        assert!(!format!("{c:?}").contains("0123456789abcdef0123"), "tokens are never printed");

        let short = r#"
            [relay]
            tls = { cert = "c.pem", key = "k.pem" }
            [[agent]]
            name = "node1"
            token = "short"
            "#;
        assert!(toml::from_str::<RelayConfig>(short).unwrap().validate().is_err());
        assert!(toml::from_str::<RelayConfig>("[relay]\ntls = { cert = \"c\", key = \"k\" }\nlisten2 = 1\n").is_err());
    }

    #[test]
    fn link_defaults_and_server_name() {
        let l: RelayLink =
            toml::from_str("address = \"relay.example.org:7000\"\nca = \"ca.pem\"\ntoken_file = \"/t\"\n").unwrap();
        assert_eq!(l.heartbeat_interval_secs, 30);
        assert_eq!(l.heartbeat_timeout_secs, 90);
        assert_eq!(l.server_name(), "relay.example.org");
        let l: RelayLink = toml::from_str("address = \"[::1]:7000\"\nca = \"ca.pem\"\ntoken = \"x\"\n").unwrap();
        assert_eq!(l.server_name(), "::1");
        assert!(l.validate().is_err(), "a short token is refused");
    }
}
