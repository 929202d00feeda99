//! Retention decisions: which tags and untagged manifests the stored policies let go
//! (see [`RetentionPolicy`] for the rules).
//!
//! Like a garbage collection, a run is planned on a node's state after a read barrier and
//! proposed as events the state machine checks again as they apply: [`Event::TagExpired`]
//! removes a tag only if it still points where the plan saw it, and the untagged manifests go
//! as [`Event::Collected`] (kept if tagged or referred to since). Blobs they leave unreferenced
//! are the next garbage collection's.

use std::collections::HashSet;

use raftyard_types::lifecycle::RetentionPolicy;
use raftyard_types::{Digest, Event, RepoName, Tag};

use crate::gc::{apply_order, reachable, COLLECT_BATCH};
use crate::keys;
use crate::state::{dec, StateReader};

const DAY_MS: u64 = 86_400_000;

/// What a retention run would remove, decided on the state at `as_of`.
#[derive(Debug, Clone, Default)]
pub struct RetentionPlan {
    pub as_of: u64,
    /// Tags that expire, with the manifest each points at.
    pub tags: Vec<(RepoName, Tag, Digest)>,
    /// Per repository: the cut its untagged manifests were judged by (pushed before it), and
    /// the manifests that go, parents and referrers first.
    pub manifests: Vec<(RepoName, u64, Vec<Digest>)>,
}

impl RetentionPlan {
    /// The plan as log events: expired tags first (the manifests they leave may then go), at
    /// most [`COLLECT_BATCH`] items each.
    pub fn events(&self) -> Vec<Vec<Event>> {
        let mut out: Vec<Vec<Event>> = self
            .tags
            .chunks(COLLECT_BATCH)
            .map(|c| {
                c.iter()
                    .map(|(repo, tag, digest)| Event::TagExpired {
                        repo: repo.clone(),
                        tag: tag.clone(),
                        digest: digest.clone(),
                    })
                    .collect()
            })
            .collect();
        for (repo, before_ms, digests) in &self.manifests {
            for c in digests.chunks(COLLECT_BATCH) {
                out.push(vec![Event::Collected {
                    as_of: self.as_of,
                    before_ms: *before_ms,
                    manifests: c.iter().map(|d| (repo.clone(), d.clone())).collect(),
                    links: vec![],
                }]);
            }
        }
        out
    }

    /// `repository:tag` of each expired tag, and `repository@digest` of each manifest.
    pub fn lines(&self) -> (Vec<String>, Vec<String>) {
        let tags = self.tags.iter().map(|(r, t, _)| format!("{r}:{t}")).collect();
        let manifests =
            self.manifests.iter().flat_map(|(r, _, ds)| ds.iter().map(move |d| format!("{r}@{d}"))).collect();
        (tags, manifests)
    }
}

/// The tags of one repository `policy` lets go (`tags`: name, digest, time set).
fn expired_by(policy: &RetentionPolicy, tags: &[(String, Digest, u64)], now_ms: u64) -> HashSet<String> {
    if policy.keep_last.is_none() && policy.max_age_days.is_none() {
        return HashSet::new();
    }
    // a pattern that no longer compiles keeps everything
    let Ok(keep) = policy.keeps() else { return HashSet::new() };
    let mut candidates: Vec<&(String, Digest, u64)> =
        tags.iter().filter(|t| !keep.as_ref().is_some_and(|re| re.is_match(&t.0))).collect();
    // newest first; the same time: by name, so that every node orders alike
    candidates.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    let young_from = policy.max_age_days.map(|d| now_ms.saturating_sub(u64::from(d) * DAY_MS));
    candidates
        .into_iter()
        .enumerate()
        .filter(|(i, t)| {
            let among_last = policy.keep_last.is_some_and(|n| *i < n as usize);
            let young = young_from.is_some_and(|from| t.2 >= from);
            !(among_last || young)
        })
        .map(|(_, t)| t.0.clone())
        .collect()
}

impl StateReader {
    /// Every stored retention policy, by pattern.
    pub fn retention_policies(&self) -> std::io::Result<Vec<RetentionPolicy>> {
        let mut out = Vec::new();
        for kv in self.tree().scan_prefix(keys::RETENTION) {
            let (_, v) = kv.map_err(std::io::Error::other)?;
            if let Some(p) = dec::<RetentionPolicy>(&v) {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// What the stored policies let go at `now_ms`.
    pub fn retention_plan(&self, now_ms: u64) -> std::io::Result<RetentionPlan> {
        let mut plan = RetentionPlan { as_of: self.applied_index(), ..Default::default() };
        let policies = self.retention_policies()?;
        if policies.is_empty() {
            return Ok(plan);
        }
        let mut last: Option<String> = None;
        loop {
            let repos = self.repos(last.as_deref(), 1000)?;
            let Some(l) = repos.last().cloned() else { break };
            for r in repos {
                let matching: Vec<&RetentionPolicy> = policies.iter().filter(|p| p.repos.matches(&r)).collect();
                if let (false, Ok(repo)) = (matching.is_empty(), RepoName::parse(&r)) {
                    self.plan_retention(&repo, &matching, now_ms, &mut plan)?;
                }
            }
            last = Some(l);
        }
        Ok(plan)
    }

    fn plan_retention(
        &self,
        repo: &RepoName,
        policies: &[&RetentionPolicy],
        now_ms: u64,
        plan: &mut RetentionPlan,
    ) -> std::io::Result<()> {
        let manifests = self.repo_manifests(repo.as_str())?;
        let tags = self.repo_tags(repo.as_str(), &manifests)?;
        // a tag goes only if every matching policy lets it go
        let mut expired: Option<HashSet<String>> = None;
        for p in policies {
            let e = expired_by(p, &tags, now_ms);
            expired = Some(match expired {
                None => e,
                Some(prev) => prev.intersection(&e).cloned().collect(),
            });
        }
        let expired = expired.unwrap_or_default();
        let mut kept_digests = HashSet::new();
        for (name, d, _) in &tags {
            if expired.contains(name) {
                if let Ok(t) = Tag::parse(name) {
                    plan.tags.push((repo.clone(), t, d.clone()));
                }
            } else {
                kept_digests.insert(d.clone());
            }
        }
        // untagged manifests: only if every matching policy says how old they may get (the
        // strictest, i.e. the longest, age wins)
        let ages: Option<Vec<u32>> = policies.iter().map(|p| p.untagged_max_age_days).collect();
        if let Some(days) = ages.and_then(|a| a.into_iter().max()) {
            let before_ms = now_ms.saturating_sub(u64::from(days) * DAY_MS);
            let live = reachable(&manifests, &kept_digests, before_ms);
            let gone = apply_order(&manifests, &live);
            if !gone.is_empty() {
                plan.manifests.push((repo.clone(), before_ms, gone));
            }
        }
        Ok(())
    }
}
