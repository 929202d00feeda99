//! Reading what repositories hold and the quotas over them (`u/`, `q/`; kept by the state
//! machine from protocol 4, see `state::account`).

use raftyard_types::access::RepoGlob;
use raftyard_types::lifecycle::{QuotaUsage, RepoUsage, Usage};

use crate::keys;
use crate::state::{dec, StateReader};

impl StateReader {
    /// Every stored quota with what its repositories hold, by pattern.
    pub fn quotas(&self) -> std::io::Result<Vec<QuotaUsage>> {
        let mut out = Vec::new();
        for kv in self.tree().scan_prefix(keys::QUOTAS) {
            let (_, v) = kv.map_err(std::io::Error::other)?;
            out.extend(dec::<QuotaUsage>(&v));
        }
        Ok(out)
    }

    /// What one repository holds.
    pub fn repo_usage(&self, repo: &str) -> std::io::Result<Usage> {
        let v = self.tree().get(keys::usage(repo)).map_err(std::io::Error::other)?;
        Ok(v.and_then(|v| dec(&v)).unwrap_or_default())
    }

    /// Up to `n` repositories after `last` (by name) that hold something, with what they hold;
    /// only those `repos` matches, if given.
    pub fn usage(&self, repos: Option<&RepoGlob>, last: Option<&str>, n: usize) -> std::io::Result<Vec<RepoUsage>> {
        let start = match last {
            Some(l) => {
                let mut k = keys::usage(l);
                k.push(0);
                k
            }
            None => keys::USAGE.to_vec(),
        };
        let mut out = Vec::new();
        for kv in self.tree().range(start..) {
            let (k, v) = kv.map_err(std::io::Error::other)?;
            if !k.starts_with(keys::USAGE) || out.len() >= n {
                break;
            }
            let repository = keys::suffix(&k, keys::USAGE);
            if repos.is_some_and(|g| !g.matches(repository)) {
                continue;
            }
            out.push(RepoUsage { repository: repository.to_string(), usage: dec(&v).unwrap_or_default() });
        }
        Ok(out)
    }

    /// The first quota covering `repo` that has no room left, if any: a push into `repo` that
    /// adds bytes will be refused.
    pub fn quota_full(&self, repo: &str) -> std::io::Result<Option<QuotaUsage>> {
        Ok(self.quotas()?.into_iter().find(|q| q.quota.repos.matches(repo) && q.used.bytes >= q.quota.bytes))
    }
}
