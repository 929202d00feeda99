//! Metadata events: the only way metadata changes. Every node applies the same committed
//! [`Command`]s in the same order, so state = fold(events).
//!
//! Events are kept for ever in the journal, so their encoding is versioned: the log and the
//! journal store [`VersionedCommand`]/[`VersionedJournalEntry`], and decoding upgrades old
//! versions to the current types (there is only `V1` so far).

use serde::{Deserialize, Serialize};

use crate::access::{Grant, RepoGlob, RobotRecord, SigningKey, Subject, UserRecord};
use crate::digest::Digest;
use crate::lifecycle::{Quota, RetentionPolicy};
use crate::name::{RepoName, Tag};

/// Raft node id.
pub type NodeId = u64;

/// One metadata change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A finished upload or a mount makes a blob visible in a repository.
    BlobLinked {
        repo: RepoName,
        digest: Digest,
        size: u64,
    },
    /// A blob is removed from a repository (`DELETE /v2/<name>/blobs/<digest>`).
    BlobUnlinked {
        repo: RepoName,
        digest: Digest,
    },
    /// A node holds a verified copy of the blob.
    BlobPlaced {
        digest: Digest,
        size: u64,
        node: NodeId,
    },
    /// A node no longer holds the blob.
    BlobDropped {
        digest: Digest,
        node: NodeId,
    },
    /// A manifest is stored; its bytes travel inside the event.
    ManifestPut {
        repo: RepoName,
        digest: Digest,
        media_type: String,
        bytes: Vec<u8>,
        /// Blobs and manifests that must exist in `repo` when this event applies.
        refs: Vec<Digest>,
        subject: Option<Digest>,
        artifact_type: Option<String>,
    },
    /// Points a tag at a manifest. With `expect`, only if the tag currently points at
    /// `expect` (`Some(None)`: only if the tag does not exist).
    TagSet {
        repo: RepoName,
        tag: Tag,
        digest: Digest,
        expect: Option<Option<Digest>>,
    },
    TagDeleted {
        repo: RepoName,
        tag: Tag,
    },
    /// Removes a manifest and every tag that points at it.
    ManifestDeleted {
        repo: RepoName,
        digest: Digest,
    },
    /// The outcome of a garbage collection at an applied index.
    BlobsSwept {
        digests: Vec<Digest>,
        as_of: u64,
    },
    /// A user of the cluster state is created (`replace`: or replaced; otherwise rejected if
    /// it exists).
    UserPut {
        name: String,
        record: UserRecord,
        replace: bool,
    },
    /// A user's password hash changes.
    UserPassword {
        name: String,
        password_hash: String,
    },
    /// A user goes, and every grant naming it.
    UserRemoved {
        name: String,
    },
    /// Adds actions to what a subject may do on the repositories a pattern matches.
    GrantAdded(Grant),
    /// Takes actions away from a subject's grant on exactly this pattern (the grant goes when
    /// none are left).
    GrantRevoked {
        subject: Subject,
        repos: RepoGlob,
        actions: crate::access::Actions,
    },
    /// A robot token is created (its grants travel as `GrantAdded` in the same command).
    RobotAdded {
        id: String,
        record: RobotRecord,
    },
    /// A robot token goes, and every grant naming it.
    RobotRevoked {
        id: String,
    },
    /// A robot token was used (recorded at most about once a minute per node).
    RobotUsed {
        id: String,
        at_ms: u64,
    },
    /// A new token signing key becomes the current one; only the newest
    /// [`crate::access::KEYS_KEPT`] are kept. With `only_if_none`, applies only while the
    /// cluster has no key (the first one, made by whichever leader gets there first).
    SigningKeyAdded {
        key: SigningKey,
        only_if_none: bool,
    },
    /// Journal retention: entries below `before` are dropped from the journal (at most
    /// [`JOURNAL_TRIM_BATCH`] of them per event; the retention asks for
    /// [`JOURNAL_TRIM_STEP`] at a time, so one apply stays small); the state itself is
    /// untouched.
    JournalTrimmed {
        before: u64,
    },
    /// A blob the registry holds is linked into another repository (a cross-repository mount).
    /// Unlike [`Event::BlobLinked`] it is rejected ([`Rejection::BlobUnknown`]) when no
    /// repository links the blob any more as it applies: its files may be collected by then.
    BlobMounted {
        repo: RepoName,
        digest: Digest,
        size: u64,
    },
    /// A garbage collection decided on the state at log index `as_of`. Each item goes only if it
    /// is still garbage as this applies, so a push since the decision keeps what it uses:
    /// - `manifests`: untagged manifests pushed before `before_ms` that no manifest lists and no
    ///   referrer names as its subject (after those listed before them went). Listed parents
    ///   and referrers first.
    /// - `links`: blob links that no manifest of their repository references, made before
    ///   `before_ms`. A blob whose last link goes is no longer in the registry; each node
    ///   removes the files of such blobs after applying a collection.
    Collected {
        as_of: u64,
        before_ms: u64,
        manifests: Vec<(RepoName, Digest)>,
        links: Vec<(RepoName, Digest)>,
    },
    /// Every member speaks peer protocol `protocol` (proposed by the leader once it has heard so
    /// from each): from this entry on, every node applies what that protocol adds (for 3: link
    /// and tag times, the index of what manifests reference, built when this applies), and
    /// nodes propose its events (`BlobMounted`, `Collected`, retention). Recorded in the state,
    /// so every node switches at the same entry, whatever it knew of the others' versions.
    ClusterUpgraded {
        protocol: u32,
    },
    /// A retention policy is stored for its pattern (replacing any other for it).
    RetentionSet(RetentionPolicy),
    /// The retention policy of exactly this pattern goes.
    RetentionRemoved {
        repos: RepoGlob,
    },
    /// A retention run expires a tag: it goes only if it still points at `digest` (a tag
    /// pushed again since the run decided is kept).
    TagExpired {
        repo: RepoName,
        tag: Tag,
        digest: Digest,
    },
    /// A storage quota is stored for its pattern (replacing any other for it), with what the
    /// repositories it covers hold as it applies. From protocol 4 (rejected before).
    QuotaSet(Quota),
    /// The quota of exactly this pattern goes.
    QuotaRemoved {
        repos: RepoGlob,
    },
}

/// Journal entries one [`Event::JournalTrimmed`] drops at most when it applies (the bound every
/// release applies by, whatever proposed the event).
pub const JOURNAL_TRIM_BATCH: u64 = 10_000;

/// Journal entries the retention asks one [`Event::JournalTrimmed`] to drop: a few hundred.
/// Each applied entry is one sled batch, and sled 0.34 keeps in memory, for good, pages that a
/// batch of thousands of deletes touched (the test `a_journal_trim_takes_memory_…` in
/// raftyard-raft: 300,000 entries trimmed 10,000 at a time grew the peak by 32–42 MiB, 256 at
/// a time by 0–2).
pub const JOURNAL_TRIM_STEP: u64 = 256;

/// The `before` of the next [`Event::JournalTrimmed`] that brings the journal, whose first
/// kept index is `first`, towards dropping everything before `before`.
pub fn journal_trim_next(first: u64, before: u64) -> u64 {
    before.min(first.saturating_add(JOURNAL_TRIM_STEP))
}

impl Event {
    /// The repository the event concerns, if any.
    pub fn repo(&self) -> Option<&RepoName> {
        match self {
            Event::BlobLinked { repo, .. }
            | Event::BlobUnlinked { repo, .. }
            | Event::ManifestPut { repo, .. }
            | Event::TagSet { repo, .. }
            | Event::TagDeleted { repo, .. }
            | Event::ManifestDeleted { repo, .. }
            | Event::BlobMounted { repo, .. }
            | Event::TagExpired { repo, .. } => Some(repo),
            _ => None,
        }
    }

    /// Whether the event changes who may do what (users, grants, tokens, keys).
    pub fn is_access(&self) -> bool {
        matches!(
            self,
            Event::UserPut { .. }
                | Event::UserPassword { .. }
                | Event::UserRemoved { .. }
                | Event::GrantAdded(_)
                | Event::GrantRevoked { .. }
                | Event::RobotAdded { .. }
                | Event::RobotRevoked { .. }
                | Event::SigningKeyAdded { .. }
        )
    }

    /// A JSON view for the event stream: manifest bytes are summarised by their size.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Event::BlobLinked { repo, digest, size } => {
                json!({"type":"BlobLinked","repo":repo,"digest":digest,"size":size})
            }
            Event::BlobUnlinked { repo, digest } => {
                json!({"type":"BlobUnlinked","repo":repo,"digest":digest})
            }
            Event::BlobPlaced { digest, size, node } => {
                json!({"type":"BlobPlaced","digest":digest,"size":size,"node":node})
            }
            Event::BlobDropped { digest, node } => {
                json!({"type":"BlobDropped","digest":digest,"node":node})
            }
            Event::ManifestPut { repo, digest, media_type, bytes, refs, subject, artifact_type } => {
                json!({"type":"ManifestPut","repo":repo,"digest":digest,"mediaType":media_type,
                       "size":bytes.len(),"refs":refs,"subject":subject,"artifactType":artifact_type})
            }
            Event::TagSet { repo, tag, digest, expect } => {
                json!({"type":"TagSet","repo":repo,"tag":tag,"digest":digest,"expect":expect})
            }
            Event::TagDeleted { repo, tag } => json!({"type":"TagDeleted","repo":repo,"tag":tag}),
            Event::ManifestDeleted { repo, digest } => {
                json!({"type":"ManifestDeleted","repo":repo,"digest":digest})
            }
            Event::BlobsSwept { digests, as_of } => {
                json!({"type":"BlobsSwept","digests":digests,"asOf":as_of})
            }
            // secrets (password hashes, token hashes, keys) never leave through the journal view
            Event::UserPut { name, record, replace } => {
                json!({"type":"UserPut","user":name,"admin":record.admin,"groups":record.groups,"replace":replace})
            }
            Event::UserPassword { name, .. } => json!({"type":"UserPassword","user":name}),
            Event::UserRemoved { name } => json!({"type":"UserRemoved","user":name}),
            Event::GrantAdded(g) => {
                json!({"type":"GrantAdded","subject":g.subject.key(),"repos":g.repos,"actions":g.actions.names()})
            }
            Event::GrantRevoked { subject, repos, actions } => {
                json!({"type":"GrantRevoked","subject":subject.key(),"repos":repos,"actions":actions.names()})
            }
            Event::RobotAdded { id, record } => {
                json!({"type":"RobotAdded","id":id,"name":record.name,"expires":record.expires_ms})
            }
            Event::RobotRevoked { id } => json!({"type":"RobotRevoked","id":id}),
            Event::RobotUsed { id, at_ms } => json!({"type":"RobotUsed","id":id,"at":at_ms}),
            Event::SigningKeyAdded { key, .. } => json!({"type":"SigningKeyAdded","kid":key.kid}),
            Event::JournalTrimmed { before } => json!({"type":"JournalTrimmed","before":before}),
            Event::BlobMounted { repo, digest, size } => {
                json!({"type":"BlobMounted","repo":repo,"digest":digest,"size":size})
            }
            Event::Collected { as_of, before_ms, manifests, links } => {
                let pairs = |v: &Vec<(RepoName, Digest)>| -> Vec<String> {
                    v.iter().map(|(r, d)| format!("{r}@{d}")).collect()
                };
                json!({"type":"Collected","asOf":as_of,"before":before_ms,
                       "manifests":pairs(manifests),"links":pairs(links)})
            }
            Event::ClusterUpgraded { protocol } => json!({"type":"ClusterUpgraded","protocol":protocol}),
            Event::RetentionSet(p) => json!({"type":"RetentionSet","policy":p}),
            Event::RetentionRemoved { repos } => json!({"type":"RetentionRemoved","repos":repos}),
            Event::TagExpired { repo, tag, digest } => {
                json!({"type":"TagExpired","repo":repo,"tag":tag,"digest":digest})
            }
            Event::QuotaSet(q) => json!({"type":"QuotaSet","repos":q.repos,"bytes":q.bytes}),
            Event::QuotaRemoved { repos } => json!({"type":"QuotaRemoved","repos":repos}),
        }
    }
}

/// A batch of events proposed together and applied atomically: all or none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Wall-clock time at the proposer, milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub events: Vec<Event>,
}

/// Wall-clock time, milliseconds since the Unix epoch: the clock commands are stamped with.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Command {
    pub fn new(events: Vec<Event>) -> Self {
        Command { time_ms: now_ms(), events }
    }
}

/// The versioned encoding of a command inside the Raft log.
///
/// `V2` carries a proposal id, random per proposal: the state machine remembers the outcome of
/// each id for [`PROPOSAL_MEMORY_MS`] and applies a second entry with the same id as a no-op
/// answering the first outcome. So a proposer that lost track of its proposal (the leader died
/// or was replaced while the write was forwarded to it) can propose it again without the risk
/// of applying it twice. New variants go at the end: the variant index is the encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VersionedCommand {
    V1(Command),
    V2 { id: u64, command: Command },
}

/// How long the state machine remembers a proposal id, in the proposers' clock: far longer than
/// any proposer keeps retrying one proposal, and than the clock skew between nodes.
pub const PROPOSAL_MEMORY_MS: u64 = 10 * 60 * 1000;

impl VersionedCommand {
    /// A command with a proposal id of its own (`id` must be random and non-zero).
    pub fn with_id(id: u64, events: Vec<Event>) -> Self {
        VersionedCommand::V2 { id, command: Command::new(events) }
    }

    /// The command, whatever its version.
    pub fn command(&self) -> &Command {
        match self {
            VersionedCommand::V1(c) | VersionedCommand::V2 { command: c, .. } => c,
        }
    }

    /// The proposal id, for commands that carry one.
    pub fn id(&self) -> Option<u64> {
        match self {
            VersionedCommand::V1(_) => None,
            VersionedCommand::V2 { id, .. } => Some(*id),
        }
    }
}

impl From<VersionedCommand> for Command {
    fn from(v: VersionedCommand) -> Command {
        match v {
            VersionedCommand::V1(c) | VersionedCommand::V2 { command: c, .. } => c,
        }
    }
}

/// Why a command was not applied. Deterministic: every node reaches the same verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("blob {0} unknown to the repository")]
    BlobUnknown(Digest),
    #[error("manifest references blobs or manifests unknown to the repository: {0:?}")]
    ManifestBlobUnknown(Vec<Digest>),
    #[error("manifest unknown")]
    ManifestUnknown,
    #[error("tag {tag} does not point at the expected manifest (now {current:?})")]
    TagConflict { tag: Tag, current: Option<Digest> },
    #[error("no user {0:?}")]
    UserUnknown(String),
    #[error("user {0:?} exists")]
    UserExists(String),
    #[error("no robot token {0:?}")]
    RobotUnknown(String),
    #[error("no such grant")]
    GrantUnknown,
    #[error("no retention policy for {0:?}")]
    RetentionUnknown(String),
    #[error("no quota for {0:?}")]
    QuotaUnknown(String),
    /// The change would take the repositories of a quota over it.
    #[error("storage quota of {repos} exceeded: {used} of {limit} bytes used, this push adds {adds}")]
    QuotaExceeded { repos: String, limit: u64, used: u64, adds: u64 },
    /// The event needs every member to speak this peer protocol, and the log does not record
    /// that yet.
    #[error("every member must run a release with peer protocol {0} first: upgrade every node")]
    NeedsProtocol(u32),
}

/// The result of applying one command.
pub type Outcome = Result<(), Rejection>;

/// One applied command in the event journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Raft log index of the command.
    pub index: u64,
    pub time_ms: u64,
    pub events: Vec<Event>,
}

impl JournalEntry {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "index": self.index,
            "time": self.time_ms,
            "events": self.events.iter().map(Event::to_json).collect::<Vec<_>>(),
        })
    }
}

/// The versioned encoding of a journal entry on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VersionedJournalEntry {
    V1(JournalEntry),
}

impl From<VersionedJournalEntry> for JournalEntry {
    fn from(v: VersionedJournalEntry) -> JournalEntry {
        match v {
            VersionedJournalEntry::V1(e) => e,
        }
    }
}
