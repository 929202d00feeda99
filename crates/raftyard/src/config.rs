//! The one configuration struct of a node, read from TOML. Every field has a default, so an
//! empty file (or none) is the embedded single-node registry on 127.0.0.1:5000.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Identity and storage of this node.
    pub node: NodeSection,
    /// The OCI distribution API.
    pub registry: RegistrySection,
    /// Raft timing.
    pub raft: RaftSection,
    /// Peers, the peer port and replication.
    pub cluster: ClusterSection,
    /// Tunnel relays this node's agent dials out to.
    pub tunnel: TunnelSection,
    /// Who may do what (docs/security.md). Absent: no authentication, which only a node
    /// listening on loopback without a relay may run with; anywhere else `mode = "none"` must
    /// be written out.
    pub auth: Option<AuthSection>,
    /// Scheduled garbage collection (docs/operations.md).
    pub gc: GcSection,
    /// Scheduled retention runs (docs/operations.md).
    pub retention: RetentionSection,
    /// Log format and trace export (docs/observability.md).
    pub telemetry: raftyard_telemetry::TelemetryConfig,
}

/// How often the leader applies the stored retention policies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSection {
    /// Seconds between runs; 0: only `raftyard retention run`. Default 3600.
    pub interval_secs: u64,
}

impl Default for RetentionSection {
    fn default() -> Self {
        RetentionSection { interval_secs: 3600 }
    }
}

/// Scheduled garbage collection: the leader runs `raftyard gc` on its own every `interval`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcSection {
    /// Seconds between collections; 0: none scheduled (the default; `raftyard gc` runs one).
    pub interval_secs: u64,
    /// Blob links (and, with `untagged`, manifests) younger than this many seconds are kept:
    /// an image whose layers are uploaded but whose manifest is not yet pushed survives.
    pub grace_secs: u64,
    /// Also collect untagged manifests that nothing refers to.
    pub untagged: bool,
}

impl Default for GcSection {
    fn default() -> Self {
        GcSection { interval_secs: 0, grace_secs: 3600, untagged: false }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Everyone may do everything.
    None,
    /// HTTP Basic on every request: the cluster's users, `htpasswd`, robot tokens.
    Basic,
    /// The Docker token flow: every node serves `/auth/token` and accepts its tokens.
    Token,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    pub mode: AuthMode,
    /// The Basic realm's name, or the token realm's URL. Default: `raftyard`, or for tokens
    /// the token endpoint of the host a request was sent to (so it works through a relay).
    #[serde(default)]
    pub realm: Option<String>,
    /// The token flow's `service` (the tokens' audience).
    #[serde(default = "default_service")]
    pub service: String,
    /// The `iss` of the tokens the cluster issues.
    #[serde(default = "default_service")]
    pub issuer: String,
    /// More users from an htpasswd file (bcrypt, `htpasswd -B`), reloaded when it changes.
    #[serde(default)]
    pub htpasswd: Option<PathBuf>,
    /// Lifetime of an access token, seconds.
    #[serde(default = "default_token_ttl")]
    pub token_ttl_secs: u64,
    /// Lifetime of a refresh token (`docker login`'s identity token), seconds.
    #[serde(default = "default_refresh_ttl")]
    pub refresh_ttl_secs: u64,
    /// More users and their groups from an LDAP directory.
    #[serde(default)]
    pub ldap: Option<LdapSection>,
    /// An outside token issuer, as Distribution's `REGISTRY_AUTH=token` (token mode only).
    #[serde(default)]
    pub token: Option<ExternalTokenSection>,
    /// Failed authentications a minute from one address before it gets `429` (0: never).
    #[serde(default = "default_lockout")]
    pub lockout_threshold: u32,
    /// How long a locked-out address waits, seconds.
    #[serde(default = "default_lockout_secs")]
    pub lockout_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalTokenSection {
    /// Where clients get tokens (the challenge's realm).
    pub realm: String,
    /// The tokens' audience (the challenge's service).
    pub service: String,
    /// The tokens' `iss`.
    pub issuer: String,
    /// Certificates (PEM): a token's `x5c` chain must end at one, or its `kid` name one's key.
    pub rootcertbundle: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapSection {
    /// `ldap://host:port` (with `start_tls = true` to upgrade) or `ldaps://host:port`.
    pub url: String,
    #[serde(default)]
    pub start_tls: bool,
    /// CA certificates (PEM) of the directory's TLS certificate.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The service account that searches users and groups.
    pub bind_dn: String,
    /// A file holding the service account's password (first line). Never printed.
    pub bind_password_file: PathBuf,
    pub user_base_dn: String,
    /// `{username}` is the escaped user name. Default `(uid={username})`.
    #[serde(default = "default_user_filter")]
    pub user_filter: String,
    /// Where groups are searched; absent: users have no LDAP groups.
    #[serde(default)]
    pub group_base_dn: Option<String>,
    /// `{dn}` is the user's escaped DN, `{username}` its escaped name; a group's `cn` is its
    /// name in grants. Default `(member={dn})`.
    #[serde(default = "default_group_filter")]
    pub group_filter: String,
    /// Seconds for each connection to the directory.
    #[serde(default = "default_ldap_timeout")]
    pub timeout_secs: u64,
}

fn default_user_filter() -> String {
    "(uid={username})".into()
}
fn default_group_filter() -> String {
    "(member={dn})".into()
}
fn default_ldap_timeout() -> u64 {
    5
}

fn default_service() -> String {
    "raftyard".into()
}
fn default_token_ttl() -> u64 {
    300
}
fn default_refresh_ttl() -> u64 {
    30 * 86400
}
fn default_lockout() -> u32 {
    10
}
fn default_lockout_secs() -> u64 {
    60
}

impl AuthSection {
    /// The settings of the auth layer (reads the LDAP bind password file).
    pub fn settings(&self) -> anyhow::Result<raftyard_auth::Settings> {
        let ldap = match &self.ldap {
            None => None,
            Some(l) => {
                let text = std::fs::read_to_string(&l.bind_password_file).with_context(|| {
                    format!("reading auth.ldap.bind_password_file {}", l.bind_password_file.display())
                })?;
                Some(raftyard_auth::ldap::LdapSettings {
                    url: l.url.clone(),
                    start_tls: l.start_tls,
                    ca: l.ca.clone(),
                    bind_dn: l.bind_dn.clone(),
                    bind_password: text.lines().next().unwrap_or("").to_string(),
                    user_base_dn: l.user_base_dn.clone(),
                    user_filter: l.user_filter.clone(),
                    group_base_dn: l.group_base_dn.clone(),
                    group_filter: l.group_filter.clone(),
                    timeout: Duration::from_secs(l.timeout_secs.max(1)),
                })
            }
        };
        let external = match &self.token {
            None => None,
            Some(t) => Some(std::sync::Arc::new(
                raftyard_auth::external::ExternalIssuer::load(&t.realm, &t.service, &t.issuer, &t.rootcertbundle)
                    .map_err(|e| anyhow::anyhow!("[auth.token]: {e}"))?,
            )),
        };
        Ok(raftyard_auth::Settings {
            ldap,
            external,
            mode: match self.mode {
                AuthMode::None => raftyard_auth::Mode::None,
                AuthMode::Basic => raftyard_auth::Mode::Basic,
                AuthMode::Token => raftyard_auth::Mode::Token,
            },
            realm: self.realm.clone(),
            service: self.service.clone(),
            issuer: self.issuer.clone(),
            htpasswd: self.htpasswd.clone(),
            token_ttl: Duration::from_secs(self.token_ttl_secs),
            refresh_ttl: Duration::from_secs(self.refresh_ttl_secs),
            lockout_threshold: self.lockout_threshold,
            lockout_duration: Duration::from_secs(self.lockout_secs),
        })
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelSection {
    /// One `[[tunnel.relay]]` per relay; the agent keeps a connection to each and registers
    /// the shared service `registry` (not on a backup: it refuses pushes) and this node's own
    /// `registry-<node.id>`.
    pub relay: Vec<raftyard_tunnel::RelayLink>,
    /// Also register `peer-<node.id>` for this node's peer port, so that a node on another
    /// network (a backup) reaches it, and it that node, through the relay (with
    /// `cluster.dial_via` mapping advertised peer addresses to the relay's ports, and
    /// `[cluster.tls]` end to end).
    pub peer_service: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// Address of the peer (gRPC) port: Raft, forwarding and blob streams between nodes.
    /// Port 0 picks a free port (single nodes and tests).
    pub listen: SocketAddr,
    /// Address other nodes use to reach this peer port. Default: `listen` (as bound).
    pub advertise_peer: Option<String>,
    /// Address clients and peers use for this node's registry API. Default: `registry.listen`.
    pub advertise_registry: Option<String>,
    /// The voters of a new cluster, this node included. The member with the lowest id
    /// initialises the cluster; the others wait to be contacted. Empty: a cluster of one.
    /// A node added later with `raftyard cluster add` leaves this empty and sets `join`.
    pub members: Vec<Member>,
    /// Start without initialising anything and wait to be added to an existing cluster.
    pub join: bool,
    /// Nodes (this one included) that must hold a new blob durably before an upload is
    /// acknowledged. 0: a majority of the voters.
    pub blob_write_quorum: usize,
    /// Limit of the repair worker's fetches (how a backup gets every blob, how a node that was
    /// down catches up), MiB/s for all of them together. 0: unlimited.
    pub fetch_limit_mib_per_sec: u64,
    /// Mutual TLS on the peer port (`raftyard certs cluster` makes the files). Absent: plain
    /// gRPC, for peer ports that only listen on loopback or a private, trusted network.
    pub tls: Option<PeerTlsSection>,
    /// Reach some peers through another address than the one they advertise (NAT, an SSH
    /// tunnel, a proxy): advertised peer address → address to dial. TLS still checks the
    /// advertised host name.
    pub dial_via: std::collections::HashMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerTlsSection {
    /// The cluster CA that signs every node's certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate (PEM).
    pub cert: PathBuf,
    /// This node's private key (PEM). Never printed.
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// Raft node id.
    pub id: u64,
    /// Its peer port address.
    pub peer: String,
    /// Its registry API address.
    pub registry: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// Raft node id, unique in the cluster, never reused.
    pub id: u64,
    /// Directory holding blobs, upload sessions and the metadata database.
    pub data_dir: PathBuf,
    /// Blob uploads are refused (507) while the data directory's filesystem has less free
    /// space than this, so the metadata log always has room.
    pub min_free_mb: u64,
    /// MiB kept in reserve for the metadata log (a ballast file in the data directory): released
    /// when the filesystem has less than 32 MiB free, so that the metadata can still be written
    /// while blob writes are refused, and a node stopped by a full disk starts again; allocated
    /// again once there is room. 0: none.
    pub meta_reserve_mb: u64,
    /// `voter` (default) or `backup`: a non-voting follower with a full copy that serves
    /// pulls from its local state, refuses pushes, fetches every blob, and never initialises
    /// a cluster (it waits for `raftyard cluster add-backup`).
    pub role: Role,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Voter,
    Backup,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySection {
    /// Address the registry HTTP(S) API listens on.
    pub listen: SocketAddr,
    /// Allow deleting manifests, tags and blobs.
    pub delete_enabled: bool,
    /// Seconds after which an idle upload session is discarded.
    pub upload_idle_timeout_secs: u64,
    /// Upload sessions open at once on this node; past it a new one gets `429 TOOMANYREQUESTS`.
    /// 0: no limit. A session holds no file descriptor while idle.
    pub max_upload_sessions: usize,
    /// The same per client address (0: no limit). Behind the relay the client address is the
    /// visitor's, which the relay passes on.
    pub max_upload_sessions_per_client: usize,
    /// Serve HTTPS with this certificate and key (PEM). Absent: plain HTTP.
    pub tls: Option<TlsSection>,
    /// Also serve `GET /metrics`, without authentication, on this address (for a Prometheus on
    /// a private network while the API has auth on). Absent: only on the API port, where
    /// auth applies.
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Private key (PEM). Never printed.
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSection {
    /// Leader heartbeat interval, milliseconds. Each heartbeat is a call to every member, most
    /// of an idle cluster's CPU time; a follower stands for election only after
    /// `election_timeout_max_ms` plus its election timeout without one (600 ms or more by
    /// default), so 100 ms leaves six heartbeats to lose before that.
    pub heartbeat_ms: u64,
    /// How long the leader waits for a member's answer to an append before retrying,
    /// milliseconds: more than the round trip to the farthest member (a remote backup node
    /// included) plus its log fsync. Must be below `election_timeout_min_ms`.
    pub append_timeout_ms: u64,
    /// Lower bound of the randomised election timeout, milliseconds.
    pub election_timeout_min_ms: u64,
    /// Upper bound of the randomised election timeout, milliseconds.
    pub election_timeout_max_ms: u64,
    /// How long the leader waits for a member to take one chunk of a snapshot, seconds; the
    /// last chunk is answered once the member has installed the whole snapshot.
    pub snapshot_timeout_secs: u64,
    /// Take a state snapshot (allowing log compaction) every this many entries.
    pub snapshot_every: u64,
    /// Log entries kept behind the latest snapshot for lagging followers.
    pub keep_logs: u64,
    /// A metadata storage operation (a log append or flush, an apply) that has not completed
    /// after this many milliseconds stops the node with an error (a wedged device): it is
    /// started again on its data by its supervisor, instead of staying up without committing.
    pub storage_deadline_ms: u64,
    /// MiB of memory for the metadata database's own cache (sled's page cache); what does not
    /// fit is read through the operating system's page cache.
    pub cache_mib: u64,
    /// Compress the metadata database's writes (sled's zstd): about 2.6 times less disk for
    /// the metadata, for a manifest PUT about 1.4 times as long (docs/metadata-store.md).
    /// Applies to a database the node makes (a new node, or one emptied and joined again); an
    /// existing one keeps the setting it was made with.
    pub compress_metadata: bool,
    /// Journal retention by age: entries older than this many days are dropped from the event
    /// journal (the state is untouched). 0: keep every event (the default).
    pub journal_keep_days: u64,
    /// Journal retention by count: only the last this many log indexes keep their journal
    /// entries. 0: no limit. With both set, the stricter one cuts.
    pub journal_keep_entries: u64,
    /// How often the leader applies the retention, seconds.
    pub journal_trim_interval_secs: u64,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            id: 1,
            data_dir: PathBuf::from("./raftyard-data"),
            min_free_mb: 256,
            meta_reserve_mb: 64,
            role: Role::Voter,
        }
    }
}

impl Default for RegistrySection {
    fn default() -> Self {
        RegistrySection {
            listen: "127.0.0.1:5000".parse().expect("valid address"),
            delete_enabled: true,
            upload_idle_timeout_secs: 3600,
            max_upload_sessions: 4096,
            max_upload_sessions_per_client: 256,
            tls: None,
            metrics_listen: None,
        }
    }
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            listen: "127.0.0.1:5100".parse().expect("valid address"),
            advertise_peer: None,
            advertise_registry: None,
            members: Vec::new(),
            join: false,
            blob_write_quorum: 0,
            fetch_limit_mib_per_sec: 0,
            tls: None,
            dial_via: Default::default(),
        }
    }
}

impl Default for RaftSection {
    fn default() -> Self {
        RaftSection {
            heartbeat_ms: 100,
            append_timeout_ms: 150,
            election_timeout_min_ms: 200,
            election_timeout_max_ms: 400,
            snapshot_timeout_secs: 600,
            snapshot_every: 5000,
            keep_logs: 1000,
            storage_deadline_ms: 20_000,
            cache_mib: 8,
            compress_metadata: false,
            journal_keep_days: 0,
            journal_keep_entries: 0,
            journal_trim_interval_secs: 60,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Config = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.node.id > 0, "node.id must be > 0");
        anyhow::ensure!(self.raft.heartbeat_ms > 0, "raft.heartbeat_ms must be > 0");
        anyhow::ensure!(self.raft.snapshot_timeout_secs > 0, "raft.snapshot_timeout_secs must be > 0");
        anyhow::ensure!(
            self.node.meta_reserve_mb == 0 || self.node.min_free_mb > self.node.meta_reserve_mb,
            "node.min_free_mb must exceed node.meta_reserve_mb: blob writes must stop before the metadata's reserve is used"
        );
        anyhow::ensure!(
            self.raft.storage_deadline_ms >= 1000,
            "raft.storage_deadline_ms must be at least 1000: a busy disk's fsync can take a second"
        );
        anyhow::ensure!(
            self.raft.election_timeout_min_ms > self.raft.heartbeat_ms.max(self.raft.append_timeout_ms)
                && self.raft.election_timeout_max_ms > self.raft.election_timeout_min_ms,
            "raft timeouts must satisfy heartbeat_ms and append_timeout_ms < election_timeout_min_ms < election_timeout_max_ms"
        );
        for r in &self.tunnel.relay {
            r.validate()?;
        }
        self.validate_auth()?;
        self.validate_cluster()
    }

    /// A node reachable from beyond this machine runs with auth unless told otherwise in
    /// writing.
    fn validate_auth(&self) -> anyhow::Result<()> {
        let public = !self.registry.listen.ip().is_loopback();
        match &self.auth {
            None => {
                anyhow::ensure!(
                    !public && self.tunnel.relay.is_empty(),
                    "the registry is reachable from other machines ({}) without authentication: \
                     configure [auth] (mode = \"basic\" or \"token\"), or write mode = \"none\" in [auth] \
                     to run it open on purpose",
                    if public {
                        format!("registry.listen = {}", self.registry.listen)
                    } else {
                        "through a relay".into()
                    }
                );
            }
            Some(a) if a.mode != AuthMode::None => {
                anyhow::ensure!(
                    self.cluster.listen.ip().is_loopback() || self.cluster.tls.is_some(),
                    "with [auth] on, a peer port on a non-loopback address ({}) needs [cluster.tls]: \
                     the peer port administers users and grants",
                    self.cluster.listen
                );
                anyhow::ensure!(a.token_ttl_secs >= 10, "auth.token_ttl_secs must be at least 10");
                anyhow::ensure!(
                    a.token.is_none() || a.mode == AuthMode::Token,
                    "[auth.token] (an outside token issuer) needs mode = \"token\""
                );
                if let Some(l) = &a.ldap {
                    anyhow::ensure!(
                        l.url.starts_with("ldap://") || l.url.starts_with("ldaps://"),
                        "auth.ldap.url must start with ldap:// or ldaps://"
                    );
                    anyhow::ensure!(
                        l.user_filter.contains("{username}"),
                        "auth.ldap.user_filter must contain {{username}}"
                    );
                }
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// Checks that only make sense for a cluster.
    fn validate_cluster(&self) -> anyhow::Result<()> {
        let c = &self.cluster;
        if !c.members.is_empty() {
            anyhow::ensure!(!c.join, "cluster.join and cluster.members exclude each other");
            anyhow::ensure!(
                c.members.iter().any(|m| m.id == self.node.id),
                "cluster.members must include this node (id {})",
                self.node.id
            );
            let mut ids: Vec<u64> = c.members.iter().map(|m| m.id).collect();
            ids.sort_unstable();
            ids.dedup();
            anyhow::ensure!(ids.len() == c.members.len(), "cluster.members has duplicate ids");
            anyhow::ensure!(
                c.blob_write_quorum <= c.members.len(),
                "cluster.blob_write_quorum = {} exceeds the {} members: no upload could ever be acknowledged",
                c.blob_write_quorum,
                c.members.len()
            );
        }
        anyhow::ensure!(
            !self.tunnel.peer_service || c.tls.is_some(),
            "tunnel.peer_service publishes the peer port (Raft, blob transfers, admin) through the relay: \
             it needs [cluster.tls] (mutual TLS), or anyone reaching the relay could act as a member"
        );
        Ok(())
    }

    pub fn upload_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.registry.upload_idle_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_embedded_default() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.registry.listen.to_string(), "127.0.0.1:5000");
        assert_eq!(c.node.data_dir, PathBuf::from("./raftyard-data"));
        c.validate().unwrap();
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        let members = "[[cluster.members]]\nid = 1\npeer = \"a:1\"\nregistry = \"a:2\"\n\
                       [[cluster.members]]\nid = 2\npeer = \"b:1\"\nregistry = \"b:2\"\n";
        let c: Config = toml::from_str(&format!("[cluster]\nblob_write_quorum = 3\n{members}")).unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("blob_write_quorum"), "{e}");
        let c: Config = toml::from_str(&format!("[cluster]\nblob_write_quorum = 2\n{members}")).unwrap();
        c.validate().unwrap();
        let c: Config = toml::from_str("[tunnel]\npeer_service = true\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("cluster.tls"), "{e}");
    }

    #[test]
    fn a_public_node_needs_auth_written_out() {
        let c: Config = toml::from_str("[registry]\nlisten = \"0.0.0.0:5000\"\n").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("[auth]"), "{e}");
        let c: Config = toml::from_str("[registry]\nlisten = \"0.0.0.0:5000\"\n[auth]\nmode = \"none\"\n").unwrap();
        c.validate().unwrap();
        let relay =
            "[[tunnel.relay]]\naddress = \"relay:7000\"\nca = \"/ca.pem\"\ntoken = \"a-token-of-at-least-16-chars\"\n";
        let c: Config = toml::from_str(relay).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("relay"));
        let c: Config = toml::from_str(&format!("[auth]\nmode = \"basic\"\n{relay}")).unwrap();
        c.validate().unwrap();
        // auth on, and the peer port (which administers users) open to the network without TLS
        let c: Config = toml::from_str("[auth]\nmode = \"token\"\n[cluster]\nlisten = \"0.0.0.0:5100\"\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("cluster.tls"));
        assert!(toml::from_str::<Config>("[auth]\nmode = \"ldapish\"\n").is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(toml::from_str::<Config>("[registry]\nlisten = \"0.0.0.0:5000\"\nlisen = 1\n").is_err());
        assert!(toml::from_str::<Config>("[nod]\n").is_err());
    }

    #[test]
    fn full_file() {
        let c: Config = toml::from_str(
            r#"
            [node]
            id = 3
            data_dir = "/var/lib/raftyard"
            [registry]
            listen = "0.0.0.0:443"
            delete_enabled = false
            [registry.tls]
            cert = "/etc/raftyard/cert.pem"
            key = "/etc/raftyard/key.pem"
            [raft]
            heartbeat_ms = 100
            election_timeout_min_ms = 300
            election_timeout_max_ms = 600
            snapshot_every = 100
            [auth]
            mode = "token"
            htpasswd = "/etc/raftyard/htpasswd"
            [[tunnel.relay]]
            address = "relay.example.org:7000"
            ca = "/etc/raftyard/relay-ca.pem"
            token = "a-token-of-at-least-16-chars"
            heartbeat_interval_secs = 10
            heartbeat_timeout_secs = 30
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.node.id, 3);
        assert!(c.registry.tls.is_some());
        assert!(!c.registry.delete_enabled);
        assert_eq!(c.tunnel.relay[0].heartbeat_timeout_secs, 30);
    }
}
