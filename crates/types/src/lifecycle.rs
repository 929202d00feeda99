//! Storage lifecycle rules kept in the cluster state: retention policies (which tags and
//! untagged manifests expire).

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
