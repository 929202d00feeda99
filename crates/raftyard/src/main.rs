//! The `raftyard` command line. Everything it runs lives in the `raftyard` library.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use anyhow::Context as _;
use raftyard::config::Config;
use raftyard::{access, admin, backup, certs, import, node, tunnel};
use raftyard_types::access::RepoGlob;
use raftyard_types::lifecycle::{Quota, RetentionPolicy};

/// jemalloc instead of the C library's allocator: glibc's per-thread arenas keep the memory a
/// burst of writes freed (a node's resident size stayed at three times what it used), while
/// jemalloc's background thread gives dirty pages back within seconds.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings (read before the first allocation): purging on a background thread,
/// dirty pages returned after a second, none kept as "muzzy".
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static _rjem_malloc_conf: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

#[derive(Parser)]
#[command(name = "raftyard", version, about = "A container registry cluster on Raft")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log lines as `text` or `json` (for `serve`, overrides `[telemetry] log_format`).
    #[arg(long, global = true)]
    log_format: Option<raftyard_telemetry::LogFormat>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node. Without a config file: a single-node registry on 127.0.0.1:5000 with data
    /// in ./raftyard-data.
    Serve {
        /// Node configuration (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Override `registry.listen`.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Override `node.data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Override `cluster.listen` (the peer port).
        #[arg(long)]
        peer_listen: Option<std::net::SocketAddr>,
    },
    /// Run a public tunnel relay: agents dial in over TLS, visitors connect to service ports.
    Relay {
        /// Relay configuration (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a standalone tunnel agent that offers local TCP services through relays (a node
    /// runs its own agent from `[[tunnel.relay]]`).
    Agent {
        /// Agent configuration (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Inspect and change the membership of a cluster.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
        #[command(flatten)]
        tls: PeerTlsArgs,
    },
    /// Collect garbage online: blob links no manifest references, and with --untagged the
    /// untagged manifests nothing refers to; every node then frees the files of blobs no
    /// repository links (docs/operations.md).
    Gc {
        /// Peer address (host:port) of any member.
        #[arg(long, default_value = "127.0.0.1:5100")]
        node: String,
        /// Report what would go; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also untagged manifests that no tag reaches (not index children, not referrers of a
        /// kept manifest).
        #[arg(long)]
        untagged: bool,
        /// Keep links and manifests younger than this many seconds (an image whose layers are
        /// uploaded but whose manifest is not pushed yet).
        #[arg(long, default_value_t = 3600)]
        grace: u64,
        /// Print the report as JSON, with every item.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        tls: PeerTlsArgs,
    },
    /// Retention policies: which tags and untagged manifests expire (docs/operations.md).
    Retention {
        #[command(subcommand)]
        cmd: RetentionCmd,
        #[command(flatten)]
        tls: PeerTlsArgs,
    },
    /// Storage quotas: how much the repositories a pattern matches may hold together
    /// (docs/operations.md).
    Quota {
        #[command(subcommand)]
        cmd: QuotaCmd,
        #[command(flatten)]
        tls: PeerTlsArgs,
    },
    /// What each repository holds: bytes (each blob counted once per repository, however many
    /// tags share it, plus its manifests), blobs and manifests, largest first.
    Usage {
        /// Only repositories this pattern matches (`team/*`, `team/**`, `ci/app`).
        #[arg(long, default_value = "**")]
        repos: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: AtNode,
        #[command(flatten)]
        tls: PeerTlsArgs,
    },
    /// What a stopped node's metadata holds, part by part (the Raft log, the state by key
    /// prefix, the snapshot, the files on disk), with bytes per manifest.
    MetaSize {
        /// The node's data directory (`node.data_dir`).
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Online backups to a directory: create, verify, restore (docs/recovery.md).
    Backup {
        #[command(subcommand)]
        cmd: BackupCmd,
        #[command(flatten)]
        tls: PeerTlsArgs,
    },
    /// Print the event journal of a node as JSON lines.
    Events {
        /// Registry URL of the node.
        #[arg(long, default_value = "http://127.0.0.1:5000")]
        node: String,
        /// First journal index to print.
        #[arg(long, default_value_t = 0)]
        since: u64,
        /// Keep waiting for new events.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        http: RegistryLogin,
    },
    /// Import every repository of another registry into a running raftyard through its API:
    /// from the storage directory of CNCF Distribution (docker-registry, registry:2), or from
    /// any registry through the distribution API. Idempotent: run it again to finish.
    Import {
        /// Distribution's `rootdirectory` (e.g. /var/lib/docker-registry), read directly.
        #[arg(long, required_unless_present = "from_url", conflicts_with = "from_url")]
        from_distribution: Option<PathBuf>,
        /// A registry's URL, read through the distribution API (catalog, tags, manifests, blobs).
        #[arg(long)]
        from_url: Option<String>,
        /// A user of the source registry (Basic, or the Bearer token flow it asks for).
        #[arg(long, requires_all = ["from_url", "from_password_file"])]
        from_user: Option<String>,
        /// The source user's password file.
        #[arg(long, requires = "from_user")]
        from_password_file: Option<PathBuf>,
        /// Trust this CA certificate (PEM) for an HTTPS source.
        #[arg(long, requires = "from_url")]
        from_ca: Option<PathBuf>,
        /// Registry URL of the raftyard node to import into.
        #[arg(long)]
        to: String,
        /// Only repositories matching this glob (`*` within a path segment, `**` across).
        #[arg(long)]
        repos: Option<String>,
        #[command(flatten)]
        http: RegistryLogin,
    },
    /// Make TLS certificates.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Users of the cluster (kept in its state; passwords hashed here, never sent).
    User {
        #[command(subcommand)]
        cmd: UserCmd,
        #[command(flatten)]
        tls: PeerTlsArgs,
    },
    /// Robot tokens: secrets for machines (CI) with grants of their own.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
        #[command(flatten)]
        tls: PeerTlsArgs,
    },
    /// Grants: who may pull, push or delete which repositories.
    Access {
        #[command(subcommand)]
        cmd: AccessCmd,
        #[command(flatten)]
        tls: PeerTlsArgs,
    },
}

/// How a command reaches a registry node over HTTP (`--node`, `--to`): its CA and a user.
#[derive(clap::Args)]
struct RegistryLogin {
    /// Trust this CA certificate (PEM) for an HTTPS registry.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// A user, when the registry has auth on (the password from --password-file or stdin):
    /// an admin for `events`, one who may push for `import` and `backup restore --repo`.
    #[arg(long)]
    user: Option<String>,
    /// That user's password file (default with --user: stdin).
    #[arg(long, requires = "user")]
    password_file: Option<PathBuf>,
}

impl RegistryLogin {
    /// The user and its password, read now.
    fn login(&self) -> anyhow::Result<Option<(String, String)>> {
        login(self.user.clone(), self.password_file.as_deref())
    }
}

/// The node an access command talks to.
#[derive(clap::Args)]
struct AtNode {
    /// Peer address (host:port) of any member.
    #[arg(long, default_value = "127.0.0.1:5100")]
    node: String,
}

/// Where a new password comes from.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct PasswordFrom {
    /// Read the password from stdin (its first line).
    #[arg(long)]
    password_stdin: bool,
    /// Read the password from this file (its first line).
    #[arg(long)]
    password_file: Option<PathBuf>,
}

impl PasswordFrom {
    fn read(&self) -> anyhow::Result<String> {
        match &self.password_file {
            Some(p) => access::read_password(access::Secret::File(p)),
            None => access::read_password(access::Secret::Stdin),
        }
    }
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add a user.
    Add {
        name: String,
        /// May do everything, administer nothing else (users and grants go through the peer port).
        #[arg(long)]
        admin: bool,
        /// A group the user is in (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        #[command(flatten)]
        password: PasswordFrom,
        #[command(flatten)]
        at: AtNode,
    },
    /// Change a user's password.
    Passwd {
        name: String,
        #[command(flatten)]
        password: PasswordFrom,
        #[command(flatten)]
        at: AtNode,
    },
    /// Remove a user and its grants.
    Remove {
        name: String,
        #[command(flatten)]
        at: AtNode,
    },
    /// List the users.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: AtNode,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a robot token and print its secret (once): a password for `docker login`.
    Create {
        /// A name for it (`token revoke --name`).
        #[arg(long)]
        name: String,
        /// REPOS:ACTIONS, e.g. 'team/*:pull,push' (repeatable).
        #[arg(long = "grant")]
        grants: Vec<String>,
        /// Valid for this long: 30d, 12h, 90m.
        #[arg(long)]
        expires: Option<String>,
        #[command(flatten)]
        at: AtNode,
    },
    /// Revoke a robot token (by name or id) and its grants.
    Revoke {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        at: AtNode,
    },
    /// List the robot tokens (never their secrets) with their last use.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: AtNode,
    },
}

#[derive(clap::Args)]
struct GrantWho {
    #[arg(long)]
    user: Option<String>,
    #[arg(long)]
    group: Option<String>,
    /// A robot token, by name or id.
    #[arg(long)]
    token: Option<String>,
    /// Everyone, without credentials.
    #[arg(long)]
    anonymous: bool,
}

impl From<GrantWho> for access::Who {
    fn from(w: GrantWho) -> Self {
        access::Who { user: w.user, group: w.group, token: w.token, anonymous: w.anonymous }
    }
}

#[derive(Subcommand)]
enum AccessCmd {
    /// Let a user, group, robot token or everyone pull, push or delete in the repositories
    /// a pattern matches (`*` within a path segment, `**` across segments).
    Grant {
        #[command(flatten)]
        who: GrantWho,
        #[arg(long)]
        repos: String,
        /// pull, push, delete (comma-separated) or *.
        #[arg(long)]
        actions: String,
        #[command(flatten)]
        at: AtNode,
    },
    /// Take actions (default: all) away from a grant on exactly this pattern.
    Revoke {
        #[command(flatten)]
        who: GrantWho,
        #[arg(long)]
        repos: String,
        #[arg(long)]
        actions: Option<String>,
        #[command(flatten)]
        at: AtNode,
    },
    /// List the grants.
    List {
        #[arg(long)]
        json: bool,
        /// Everything as JSON: users, robot tokens, grants and the signing keys' ids (never a
        /// hash or a key).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        at: AtNode,
    },
    /// Make a new token signing key the current one.
    RotateKey {
        #[command(flatten)]
        at: AtNode,
    },
}

#[derive(clap::Args)]
struct PeerTlsArgs {
    /// For peer ports with mutual TLS: a directory with ca.pem, cert.pem and key.pem.
    #[arg(long, global = true)]
    tls_dir: Option<PathBuf>,
}

/// The node `cluster add` and `cluster add-backup` add.
#[derive(clap::Args)]
struct NewMember {
    /// Peer address of any member.
    #[arg(long, default_value = "127.0.0.1:5100")]
    node: String,
    /// Id of the new node.
    #[arg(long)]
    id: u64,
    /// Peer address of the new node.
    #[arg(long)]
    peer: String,
    /// Registry address of the new node.
    #[arg(long)]
    registry: String,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Leader, term, members and roles, log/commit/applied index and missing blobs per node.
    Status {
        /// Peer address (host:port) of any member.
        #[arg(long, default_value = "127.0.0.1:5100")]
        node: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a node (started with `cluster.join = true`): learner, catch up, then voter.
    Add {
        #[command(flatten)]
        new: NewMember,
        /// Keep it a learner (never a voter).
        #[arg(long)]
        learner: bool,
    },
    /// Add a backup node (started with `node.role = "backup"`): a learner that is never
    /// promoted, follows the whole log and fetches every blob.
    AddBackup {
        #[command(flatten)]
        new: NewMember,
    },
    /// After the primaries are lost: turn a STOPPED backup's data into a cluster with that node
    /// as its only voter. `raftyard serve` with its config then runs it writable; add nodes
    /// back with `cluster add`. See docs/recovery.md.
    Recover {
        /// The backup's data directory (`node.data_dir`).
        #[arg(long)]
        data_dir: PathBuf,
        /// The backup's node id (default: the only learner in its membership).
        #[arg(long)]
        id: Option<u64>,
    },
    /// Remove a node from the membership.
    Remove {
        /// Peer address of any member.
        #[arg(long, default_value = "127.0.0.1:5100")]
        node: String,
        /// Id of the node to remove.
        #[arg(long)]
        id: u64,
    },
}

#[derive(Subcommand)]
enum RetentionCmd {
    /// Store the policy of the repositories a pattern matches (replacing its earlier one). A
    /// tag is kept if it matches --keep-pattern, is among the --keep-last most recently pushed
    /// of the others, or was pushed less than --max-age days ago; other tags expire. Untagged
    /// manifests older than --untagged-max-age days go too.
    Set {
        /// Repository pattern (`team/*`, `team/**`, `ci/app`).
        #[arg(long)]
        repos: String,
        #[arg(long)]
        keep_last: Option<u32>,
        /// Days.
        #[arg(long)]
        max_age: Option<u32>,
        /// Tags matching this regular expression are always kept (e.g. '^v\d+\.\d+').
        #[arg(long)]
        keep_pattern: Option<String>,
        /// Days.
        #[arg(long)]
        untagged_max_age: Option<u32>,
        #[command(flatten)]
        at: AtNode,
    },
    /// The stored policies.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: AtNode,
    },
    /// Remove the policy of exactly this pattern.
    Remove {
        #[arg(long)]
        repos: String,
        #[command(flatten)]
        at: AtNode,
    },
    /// Apply the policies now (the leader also does every `[retention] interval_secs`): prints
    /// each `repository:tag` and `repository@digest` that goes.
    Run {
        /// Only print what would go.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: AtNode,
    },
}

#[derive(Subcommand)]
enum QuotaCmd {
    /// Store the quota of the repositories a pattern matches (replacing its earlier one): a
    /// push that would take them over it together is refused (403 DENIED, with the figures).
    Set {
        /// Repository pattern (`team/*`, `team/**`, `ci/app`).
        #[arg(long)]
        repos: String,
        /// Bytes: `5000000000`, `5GB`, `5GiB`.
        #[arg(long)]
        bytes: String,
        #[command(flatten)]
        at: AtNode,
    },
    /// The stored quotas with what their repositories hold now.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        at: AtNode,
    },
    /// Remove the quota of exactly this pattern.
    Remove {
        #[arg(long)]
        repos: String,
        #[command(flatten)]
        at: AtNode,
    },
}

#[derive(Subcommand)]
enum BackupCmd {
    /// Take a consistent snapshot on a running node (every write acknowledged before is in
    /// it) and copy the blobs it references that DIR does not hold yet.
    Create {
        /// Peer address (host:port) of any member.
        #[arg(long, default_value = "127.0.0.1:5100")]
        node: String,
        /// The backup directory (created if needed; earlier backups in it are kept).
        #[arg(long)]
        out: PathBuf,
    },
    /// Check the snapshot's checksum and hash every blob it references.
    Verify {
        dir: PathBuf,
        /// The snapshot at this log index (default: the newest).
        #[arg(long)]
        index: Option<u64>,
    },
    /// Seed a new node's data directory from the backup (a cluster of one), or, with --repo and
    /// --to, push one repository back into a running registry.
    Restore {
        dir: PathBuf,
        /// The snapshot at this log index (default: the newest).
        #[arg(long)]
        index: Option<u64>,
        /// The new node's data directory (must hold no metadata yet).
        #[arg(long, required_unless_present = "repo", conflicts_with = "repo")]
        data_dir: Option<PathBuf>,
        /// The new node's id.
        #[arg(long, default_value_t = 1)]
        id: u64,
        /// The new node's peer address, as it will advertise it.
        #[arg(long, default_value = "127.0.0.1:5100")]
        peer: String,
        /// The new node's registry address, as it will advertise it.
        #[arg(long, default_value = "127.0.0.1:5000")]
        registry: String,
        /// Make the new node's metadata database compressed (as `raft.compress_metadata` does
        /// for a database a node makes; it cannot be changed later).
        #[arg(long, conflicts_with = "repo")]
        compress_metadata: bool,
        /// Restore only this repository, through the registry API of --to.
        #[arg(long, requires = "to")]
        repo: Option<String>,
        /// Registry base URL to push the repository to (http://host:port).
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        http: RegistryLogin,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// A cluster CA and one certificate per node for mutual TLS on the peer port:
    /// DIR/ca.pem, DIR/ca-key.pem and DIR/<node>/{ca.pem,cert.pem,key.pem}.
    Cluster {
        /// A node: its name (also a host name in its certificate), optionally followed by
        /// more host names or IPs after '=' (`node1=10.0.0.1,node1.example.org`). Repeatable.
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// A new CA and a server certificate signed by it: ca.pem, cert.pem, key.pem in DIR.
    SelfSigned {
        /// Host name or IP address the certificate is valid for (repeatable).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Serve { .. }) {
        raftyard_telemetry::init_logging_as(cli.log_format.unwrap_or_default());
    }
    match cli.cmd {
        Cmd::Serve { config, listen, data_dir, peer_listen } => {
            let mut cfg = match &config {
                Some(p) => Config::load(p)?,
                None => Config::default(),
            };
            if let Some(l) = listen {
                cfg.registry.listen = l;
            }
            if let Some(d) = data_dir {
                cfg.node.data_dir = d;
            }
            if let Some(p) = peer_listen {
                cfg.cluster.listen = p;
            }
            if let Some(f) = cli.log_format {
                cfg.telemetry.log_format = f;
            }
            cfg.validate()?;
            runtime()?.block_on(async move {
                let telemetry = raftyard_telemetry::init(&cfg.telemetry, &cfg.node.id.to_string())?;
                let served = node::serve(cfg).await;
                let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
                served
            })
        }
        Cmd::Relay { config } => {
            let cfg = raftyard_tunnel::RelayConfig::load(&config)?;
            tunnel::small_runtime()?.block_on(tunnel::relay(cfg))
        }
        Cmd::Agent { config } => {
            let cfg = raftyard_tunnel::AgentFile::load(&config)?;
            tunnel::small_runtime()?.block_on(tunnel::agent(cfg))
        }
        Cmd::Import { from_distribution, from_url, from_user, from_password_file, from_ca, to, repos, http } => {
            let only = repos
                .map(|g| raftyard_types::access::RepoGlob::parse(&g))
                .transpose()
                .map_err(|e| anyhow::anyhow!("--repos: {e}"))?;
            let from = match (from_distribution, from_url) {
                (Some(dir), _) => import::ImportFrom::Distribution(dir),
                (None, Some(url)) => {
                    let login = match (from_user, from_password_file) {
                        (Some(u), Some(f)) => Some((u, access::read_password(access::Secret::File(&f))?)),
                        _ => None,
                    };
                    import::ImportFrom::Registry { url, ca: from_ca, login }
                }
                (None, None) => anyhow::bail!("--from-distribution or --from-url"),
            };
            let login = http.login()?;
            runtime()?.block_on(import::import(from, &to, http.ca.as_deref(), login, only))
        }
        Cmd::Events { node, since, follow, http } => {
            let login = http.login()?;
            runtime()?.block_on(node::print_events(&node, since, follow, http.ca, login))
        }
        Cmd::Cluster { cmd, tls } => runtime()?.block_on(async {
            let tls = tls.tls_dir;
            match cmd {
                ClusterCmd::Status { node, json } => admin::status(&node, json, &tls).await,
                ClusterCmd::Add { new: NewMember { node, id, peer, registry }, learner } => {
                    admin::add(&node, id, peer, registry, learner, &tls).await
                }
                ClusterCmd::AddBackup { new: NewMember { node, id, peer, registry } } => {
                    admin::add(&node, id, peer, registry, true, &tls).await
                }
                ClusterCmd::Recover { data_dir, id } => admin::recover(&data_dir, id).await,
                ClusterCmd::Remove { node, id } => admin::remove(&node, id, &tls).await,
            }
        }),
        Cmd::Gc { node, dry_run, untagged, grace, json, tls } => {
            runtime()?.block_on(async { raftyard::gc::run(&node, &tls.tls_dir, dry_run, untagged, grace, json).await })
        }
        Cmd::Retention { cmd, tls } => runtime()?.block_on(async {
            let tls = tls.tls_dir;
            match cmd {
                RetentionCmd::Set { repos, keep_last, max_age, keep_pattern, untagged_max_age, at } => {
                    let repos = RepoGlob::parse(&repos).map_err(|e| anyhow::anyhow!("--repos: {e}"))?;
                    let policy = RetentionPolicy {
                        repos,
                        keep_last,
                        max_age_days: max_age,
                        keep_pattern,
                        untagged_max_age_days: untagged_max_age,
                    };
                    raftyard::retention::set(&at.node, &tls, policy).await
                }
                RetentionCmd::List { json, at } => raftyard::retention::list(&at.node, &tls, json).await,
                RetentionCmd::Remove { repos, at } => {
                    let repos = RepoGlob::parse(&repos).map_err(|e| anyhow::anyhow!("--repos: {e}"))?;
                    raftyard::retention::remove(&at.node, &tls, &repos).await
                }
                RetentionCmd::Run { dry_run, json, at } => {
                    raftyard::retention::run(&at.node, &tls, dry_run, json).await
                }
            }
        }),
        Cmd::Quota { cmd, tls } => runtime()?.block_on(async {
            let tls = tls.tls_dir;
            let glob = |r: &str| RepoGlob::parse(r).map_err(|e| anyhow::anyhow!("--repos: {e}"));
            match cmd {
                QuotaCmd::Set { repos, bytes, at } => {
                    let quota = Quota { repos: glob(&repos)?, bytes: raftyard::quota::parse_bytes(&bytes)? };
                    raftyard::quota::set(&at.node, &tls, quota).await
                }
                QuotaCmd::List { json, at } => raftyard::quota::list(&at.node, &tls, json).await,
                QuotaCmd::Remove { repos, at } => raftyard::quota::remove(&at.node, &tls, &glob(&repos)?).await,
            }
        }),
        Cmd::Usage { repos, json, at, tls } => runtime()?.block_on(async {
            let repos = RepoGlob::parse(&repos).map_err(|e| anyhow::anyhow!("--repos: {e}"))?;
            raftyard::quota::usage(&at.node, &tls.tls_dir, &repos, json).await
        }),
        Cmd::MetaSize { data_dir, json } => admin::meta_size(&data_dir, json),
        Cmd::Backup { cmd, tls } => runtime()?.block_on(async {
            let tls = tls.tls_dir;
            match cmd {
                BackupCmd::Create { node, out } => backup::create(&node, &out, &tls).await,
                BackupCmd::Verify { dir, index } => backup::verify(&dir, index).await,
                BackupCmd::Restore { dir, index, repo: Some(repo), to: Some(to), http, .. } => {
                    let login = http.login()?;
                    backup::restore_repo(&dir, index, &repo, &to, http.ca, login).await
                }
                BackupCmd::Restore { dir, index, data_dir, id, peer, registry, compress_metadata, .. } => {
                    let data_dir = data_dir.context("--data-dir")?;
                    let addr = raftyard_raft::NodeAddr { peer, registry };
                    backup::restore(&dir, index, &data_dir, id, addr, compress_metadata).await
                }
            }
        }),
        Cmd::User { cmd, tls } => {
            let tls = tls.tls_dir;
            // read the password before any network work, so a prompt-less pipe is consumed once
            let pw = match &cmd {
                UserCmd::Add { password, .. } | UserCmd::Passwd { password, .. } => Some(password.read()?),
                _ => None,
            };
            runtime()?.block_on(async {
                match cmd {
                    UserCmd::Add { name, admin, groups, at, .. } => {
                        access::user_add(&at.node, &tls, &name, admin, groups, pw.as_deref().unwrap_or_default()).await
                    }
                    UserCmd::Passwd { name, at, .. } => {
                        access::user_passwd(&at.node, &tls, &name, pw.as_deref().unwrap_or_default()).await
                    }
                    UserCmd::Remove { name, at } => access::user_remove(&at.node, &tls, &name).await,
                    UserCmd::List { json, at } => access::print(&at.node, &tls, "users", json).await,
                }
            })
        }
        Cmd::Token { cmd, tls } => runtime()?.block_on(async {
            let tls = tls.tls_dir;
            match cmd {
                TokenCmd::Create { name, grants, expires, at } => {
                    access::token_create(&at.node, &tls, &name, &grants, expires.as_deref()).await
                }
                TokenCmd::Revoke { name, at } => access::token_revoke(&at.node, &tls, &name).await,
                TokenCmd::List { json, at } => access::print(&at.node, &tls, "robots", json).await,
            }
        }),
        Cmd::Access { cmd, tls } => runtime()?.block_on(async {
            let tls = tls.tls_dir;
            match cmd {
                AccessCmd::Grant { who, repos, actions, at } => {
                    access::grant(&at.node, &tls, who.into(), &repos, &actions).await
                }
                AccessCmd::Revoke { who, repos, actions, at } => {
                    access::revoke(&at.node, &tls, who.into(), &repos, actions.as_deref()).await
                }
                AccessCmd::List { all: true, at, .. } => {
                    println!("{}", serde_json::to_string_pretty(&access::list(&at.node, &tls).await?)?);
                    Ok(())
                }
                AccessCmd::List { json, at, .. } => access::print(&at.node, &tls, "grants", json).await,
                AccessCmd::RotateKey { at } => access::rotate_key(&at.node, &tls).await,
            }
        }),
        Cmd::Certs { cmd: CertsCmd::Cluster { nodes, out } } => {
            certs::cluster(&nodes, &out)?;
            println!("wrote {0}/ca.pem and {0}/<node>/{{ca.pem,cert.pem,key.pem}}", out.display());
            Ok(())
        }
        Cmd::Certs { cmd: CertsCmd::SelfSigned { hosts, out } } => {
            certs::self_signed(&hosts, &out)?;
            println!("wrote {0}/ca.pem, {0}/cert.pem, {0}/key.pem", out.display());
            Ok(())
        }
    }
}

/// A user and its password (from the file, or stdin), for a registry with auth on.
fn login(user: Option<String>, password_file: Option<&std::path::Path>) -> anyhow::Result<Option<(String, String)>> {
    let Some(u) = user else { return Ok(None) };
    let from = match password_file {
        Some(p) => access::Secret::File(p),
        None => access::Secret::Stdin,
    };
    Ok(Some((u, access::read_password(from)?)))
}

/// sled's calls block their thread (on a concurrent fsync, for example); with one worker per
/// core a small machine could have every worker stuck in sled while Raft heartbeats wait.
/// Twice as many workers as cores (at least four) keep the event loop moving.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads((cores * 2).max(4)).enable_all().build()?)
}
