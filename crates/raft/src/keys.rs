//! Key layout of the `state` tree. One tree, so that one sled batch applies a whole command
//! atomically together with `last_applied`.
//!
//! | prefix | key rest | value |
//! |---|---|---|
//! | `m/` | `applied`, `membership` | bincode of LogId / StoredMembership |
//! | `b/` | repo `\0` digest | blob size (u64 BE): the blob is linked in the repo |
//! | `B/` | digest | [`crate::state::BlobInfo`] (size, holders): present while a repo links it |
//! | `L/` | digest `\0` repo | link time, ms (u64 BE; empty for links made before protocol 3): the repositories linking a blob (reverse of `b/`) |
//! | `M/` | repo `\0` digest | [`crate::state::ManifestRecord`] |
//! | `t/` | repo `\0` tag | digest string |
//! | `T/` | repo `\0` tag | when the tag was last set, ms (u64 BE); absent for tags set before protocol 3 |
//! | `y/` | repository pattern | [`raftyard_types::lifecycle::RetentionPolicy`] |
//! | `u/` | repo | [`raftyard_types::lifecycle::Usage`]: what the repository holds (from protocol 4; absent: nothing) |
//! | `q/` | repository pattern | [`raftyard_types::lifecycle::QuotaUsage`]: a quota and what its repositories hold |
//! | `r/` | repo `\0` subject `\0` referrer | empty: referrers index |
//! | `f/` | repo `\0` digest `\0` manifest | empty: a manifest of the repo references the blob or child manifest (from protocol 3) |
//! | `R/` | repo | empty: the repository exists (catalog) |
//! | `j/` | index (u64 BE) | versioned journal entry |
//! | `a/u/` | user name | [`raftyard_types::access::UserRecord`] |
//! | `a/r/` | robot token id | [`raftyard_types::access::RobotRecord`] |
//! | `a/g/` | subject key `\0` pattern | [`raftyard_types::access::Actions`] |
//! | `a/keys` | | token signing keys, oldest first |
//! | `a/version` | | u64 BE: bumped by every change of who may do what |
//! | `p/` | proposal id (u64 BE) | bincode of (time_ms, outcome): a `V2` command applied |
//! | `P/` | time_ms (u64 BE), proposal id (u64 BE) | log index (u64 BE): the same ids, oldest first, to forget them |

pub const APPLIED: &[u8] = b"m/applied";
/// Version of the state's layout (u32 BE); absent: 1, before the `L/` index.
pub const LAYOUT: &[u8] = b"m/layout";
pub const MEMBERSHIP: &[u8] = b"m/membership";
/// bincode of (u32, u64): the peer protocol every member speaks and when that was recorded
/// (`ClusterUpgraded`); absent: 2 or older.
pub const PROTOCOL: &[u8] = b"m/protocol";

fn join(prefix: &[u8], parts: &[&str]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p.as_bytes());
    }
    k
}

pub fn link(repo: &str, digest: &str) -> Vec<u8> {
    join(b"b/", &[repo, digest])
}
pub fn blob(digest: &str) -> Vec<u8> {
    join(b"B/", &[digest])
}
pub fn linked_by(digest: &str, repo: &str) -> Vec<u8> {
    join(b"L/", &[digest, repo])
}
/// Prefix of the repositories linking a blob.
pub fn links_of(digest: &str) -> Vec<u8> {
    let mut k = join(b"L/", &[digest]);
    k.push(0);
    k
}
/// Prefix of every blob link.
pub const LINKS: &[u8] = b"b/";
pub fn manifest(repo: &str, digest: &str) -> Vec<u8> {
    join(b"M/", &[repo, digest])
}
pub fn tag(repo: &str, tag: &str) -> Vec<u8> {
    join(b"t/", &[repo, tag])
}
pub fn tag_time(repo: &str, tag: &str) -> Vec<u8> {
    join(b"T/", &[repo, tag])
}
pub const RETENTION: &[u8] = b"y/";
pub fn retention(repos: &str) -> Vec<u8> {
    join(RETENTION, &[repos])
}
pub const USAGE: &[u8] = b"u/";
pub fn usage(repo: &str) -> Vec<u8> {
    join(USAGE, &[repo])
}
pub const QUOTAS: &[u8] = b"q/";
pub fn quota(repos: &str) -> Vec<u8> {
    join(QUOTAS, &[repos])
}
/// Prefix of all tags of a repository.
pub fn tags_of(repo: &str) -> Vec<u8> {
    let mut k = join(b"t/", &[repo]);
    k.push(0);
    k
}
pub fn referrer(repo: &str, subject: &str, digest: &str) -> Vec<u8> {
    join(b"r/", &[repo, subject, digest])
}
pub fn referrers_of(repo: &str, subject: &str) -> Vec<u8> {
    let mut k = join(b"r/", &[repo, subject]);
    k.push(0);
    k
}
pub fn reference(repo: &str, target: &str, manifest: &str) -> Vec<u8> {
    join(REFERENCES, &[repo, target, manifest])
}
/// Prefix of the manifests of `repo` that reference `target`.
pub fn references_to(repo: &str, target: &str) -> Vec<u8> {
    let mut k = join(REFERENCES, &[repo, target]);
    k.push(0);
    k
}
pub const REFERENCES: &[u8] = b"f/";
pub const MANIFESTS: &[u8] = b"M/";
pub const TAGS: &[u8] = b"t/";
pub const REFERRERS: &[u8] = b"r/";
pub fn repo(repo: &str) -> Vec<u8> {
    join(b"R/", &[repo])
}
pub const REPOS: &[u8] = b"R/";
pub fn journal(index: u64) -> Vec<u8> {
    let mut k = b"j/".to_vec();
    k.extend_from_slice(&index.to_be_bytes());
    k
}
pub const JOURNAL: &[u8] = b"j/";
/// The first index the journal still holds (u64 BE); absent: 0, nothing trimmed.
pub const JOURNAL_FIRST: &[u8] = b"m/journal_first";

pub fn proposal(id: u64) -> Vec<u8> {
    let mut k = b"p/".to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}
pub fn proposal_at(time_ms: u64, id: u64) -> Vec<u8> {
    let mut k = PROPOSALS_BY_TIME.to_vec();
    k.extend_from_slice(&time_ms.to_be_bytes());
    k.extend_from_slice(&id.to_be_bytes());
    k
}
/// Prefix of the proposal ids in the order of their time.
pub const PROPOSALS_BY_TIME: &[u8] = b"P/";

pub const USERS: &[u8] = b"a/u/";
pub fn user(name: &str) -> Vec<u8> {
    join(USERS, &[name])
}
pub const ROBOTS: &[u8] = b"a/r/";
pub fn robot(id: &str) -> Vec<u8> {
    join(ROBOTS, &[id])
}
pub const GRANTS: &[u8] = b"a/g/";
pub fn grant(subject: &str, repos: &str) -> Vec<u8> {
    join(GRANTS, &[subject, repos])
}
/// Prefix of the grants of one subject.
pub fn grants_of(subject: &str) -> Vec<u8> {
    let mut k = join(GRANTS, &[subject]);
    k.push(0);
    k
}
pub const SIGNING_KEYS: &[u8] = b"a/keys";
pub const ACCESS_VERSION: &[u8] = b"a/version";

/// The part of `key` after `prefix`, as UTF-8.
pub fn suffix<'a>(key: &'a [u8], prefix: &[u8]) -> &'a str {
    std::str::from_utf8(&key[prefix.len()..]).unwrap_or("")
}
