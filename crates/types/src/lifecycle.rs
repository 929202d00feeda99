//! Storage lifecycle rules kept in the cluster state: retention policies (which tags and
//! untagged manifests expire) and storage quotas (how much repositories may hold), with the
//! usage figures quotas are checked against.

use serde::{Deserialize, Serialize};

use crate::access::RepoGlob;

/// A retention policy for the repositories `repos` matches (`raftyard retention set`).
///
/// A tag is **kept** if its name matches `keep_pattern`, or it is among the `keep_last` most
/// recently pushed of the others, or it was pushed less than `max_age_days` ago; every other
/// tag expires. Without `keep_last` and `max_age_days` no tag expires. Untagged manifests
/// pushed more than `untagged_max_age_days` ago go too, unless a kept manifest refers to them
/// (index children, referrers of kept manifests). When several policies match a repository,
/// something goes only if every one of them lets it go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    pub repos: RepoGlob,
    pub keep_last: Option<u32>,
    pub max_age_days: Option<u32>,
    pub keep_pattern: Option<String>,
    pub untagged_max_age_days: Option<u32>,
}

/// Longest `keep_pattern` accepted.
pub const MAX_PATTERN_LEN: usize = 1024;

impl RetentionPolicy {
    /// Why the policy is not usable, if it is not: a bad pattern, or a policy that expires
    /// nothing.
    pub fn check(&self) -> Result<(), String> {
        if let Some(p) = &self.keep_pattern {
            if p.len() > MAX_PATTERN_LEN {
                return Err(format!("keep pattern longer than {MAX_PATTERN_LEN} bytes"));
            }
            regex::Regex::new(p).map_err(|e| format!("keep pattern {p:?}: {e}"))?;
        }
        if self.keep_last.is_none() && self.max_age_days.is_none() && self.untagged_max_age_days.is_none() {
            return Err("a policy needs --keep-last, --max-age or --untagged-max-age".into());
        }
        Ok(())
    }

    /// The keep pattern, compiled: `Ok(None)` without one, `Err` for one that no longer
    /// compiles (a policy stored by another release): such a policy keeps every tag, it is
    /// never more eager than what was checked.
    pub fn keeps(&self) -> Result<Option<regex::Regex>, regex::Error> {
        self.keep_pattern.as_deref().map(regex::Regex::new).transpose()
    }
}

/// What a repository holds: each blob it links counted once, however many manifests and tags
/// use it, plus the bytes of its manifests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub bytes: u64,
    pub blobs: u64,
    pub manifests: u64,
}

impl Usage {
    /// `self` with `d` added (`sign` < 0: taken away), never below zero.
    pub fn add(self, d: Usage, sign: i8) -> Usage {
        let f = |a: u64, b: u64| if sign < 0 { a.saturating_sub(b) } else { a.saturating_add(b) };
        Usage {
            bytes: f(self.bytes, d.bytes),
            blobs: f(self.blobs, d.blobs),
            manifests: f(self.manifests, d.manifests),
        }
    }
}

/// A storage quota (`raftyard quota set`): the repositories `repos` matches may hold at most
/// `bytes` together (one repository, when the pattern names it). A push that would take them
/// over is refused; one already over keeps what it has, and deletes are never refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    pub repos: RepoGlob,
    pub bytes: u64,
}

/// A quota with what the repositories it covers hold now, kept up to date as they change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaUsage {
    pub quota: Quota,
    pub used: Usage,
}

/// A repository's usage, for `raftyard usage` and `/v2/_raftyard/usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoUsage {
    pub repository: String,
    #[serde(flatten)]
    pub usage: Usage,
}
