//! Garbage collection decisions: what the state at one applied index holds that nothing needs.
//!
//! A plan is made on any node's state (after a read barrier, so it includes every acknowledged
//! write) and proposed as [`Event::Collected`] batches. The plan is only a proposal: when a
//! batch applies, the state machine keeps every item that is no longer garbage (a tag set, a
//! manifest pushed, a blob linked again since the plan). What counts as garbage:
//! - with `untagged`: manifests pushed before the cut that no tag reaches, directly, as a child
//!   of an index, or as a referrer of a manifest that is reached;
//! - blob links of a repository, made before the cut, that no remaining manifest of the
//!   repository references (an image whose layers are uploaded but whose manifest is not yet
//!   pushed is younger than the cut, and stays).
//!
//! A blob whose last link goes leaves the registry; every node removes its files after the
//! collection applies (the cluster crate's sweeper). Manifests whose bytes no longer parse are
//! kept, and so is every link of their repository: what they reference is not known.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use raftyard_types::{Digest, Event, RepoName};

use crate::keys;
use crate::state::{dec, manifest_refs, ManifestRecord, StateReader};

/// Items one [`Event::Collected`] carries at most: one log entry, and the sled batch it
/// applies as, stay small (a few hundred deletes; sled 0.34 keeps pages that a batch of
/// thousands touched: the test `a_large_collection_leaves_little_memory_behind`).
pub const COLLECT_BATCH: usize = 200;

/// What a collection would remove, decided on the state at `as_of`.
#[derive(Debug, Clone, Default)]
pub struct GcPlan {
    pub as_of: u64,
    /// Manifests and links younger than this (ms since the epoch) are kept.
    pub before_ms: u64,
    /// Untagged manifests that nothing reaches, parents and referrers before what they list.
    pub manifests: Vec<(RepoName, Digest)>,
    /// Blob links no manifest of their repository references, with the blob's size.
    pub links: Vec<(RepoName, Digest, u64)>,
    /// Blobs that leave the registry (every link of theirs goes): their files are freed.
    pub blobs: Vec<(Digest, u64)>,
}

impl GcPlan {
    /// Bytes of the blobs that leave the registry (each counted once).
    pub fn bytes(&self) -> u64 {
        self.blobs.iter().map(|(_, s)| s).sum()
    }

    /// The plan as log events: manifests first (their links are then unreferenced), at most
    /// [`COLLECT_BATCH`] items each.
    pub fn events(&self) -> Vec<Event> {
        let mut out = Vec::new();
        let event =
            |manifests, links| Event::Collected { as_of: self.as_of, before_ms: self.before_ms, manifests, links };
        for c in self.manifests.chunks(COLLECT_BATCH) {
            out.push(event(c.to_vec(), vec![]));
        }
        for c in self.links.chunks(COLLECT_BATCH) {
            out.push(event(vec![], c.iter().map(|(r, d, _)| (r.clone(), d.clone())).collect()));
        }
        out
    }
}

/// A repository's manifests: what each references (`None`: its bytes do not parse), its
/// subject, and when it was pushed.
pub(crate) type Manifests = BTreeMap<Digest, (Option<Vec<Digest>>, Option<Digest>, u64)>;

fn io<E: std::fmt::Display>(e: E) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// The prefix of a repository's keys under `prefix`.
fn repo_prefix(prefix: &[u8], repo: &str) -> Vec<u8> {
    let mut p = prefix.to_vec();
    p.extend_from_slice(repo.as_bytes());
    p.push(0);
    p
}

impl StateReader {
    /// What a collection would remove now: links (and, with `untagged`, manifests) made before
    /// `before_ms`. Reads one repository at a time.
    pub fn gc_plan(&self, before_ms: u64, untagged: bool) -> std::io::Result<GcPlan> {
        let mut plan = GcPlan { as_of: self.applied_index(), before_ms, ..Default::default() };
        let mut last: Option<String> = None;
        loop {
            let repos = self.repos(last.as_deref(), 1000)?;
            let Some(l) = repos.last().cloned() else { break };
            for r in repos {
                if let Ok(repo) = RepoName::parse(&r) {
                    self.plan_repo(&repo, before_ms, untagged, &mut plan)?;
                }
            }
            last = Some(l);
        }
        // a blob leaves the registry when each of its links is in the plan
        let mut planned: BTreeMap<&Digest, (usize, u64)> = BTreeMap::new();
        for (_, d, size) in &plan.links {
            planned.entry(d).or_insert((0, *size)).0 += 1;
        }
        let mut blobs = Vec::new();
        for (d, (n, size)) in planned {
            if self.tree().scan_prefix(keys::links_of(&d.to_string())).count() == n {
                blobs.push((d.clone(), size));
            }
        }
        plan.blobs = blobs;
        Ok(plan)
    }

    /// A repository's manifests: what each references, its subject, when it was pushed.
    pub(crate) fn repo_manifests(&self, r: &str) -> std::io::Result<Manifests> {
        let mut manifests = Manifests::new();
        let mp = repo_prefix(keys::MANIFESTS, r);
        for kv in self.tree().scan_prefix(&mp) {
            let (k, v) = kv.map_err(io)?;
            let (Ok(d), Some(rec)) = (Digest::parse(keys::suffix(&k, &mp)), dec::<ManifestRecord>(&v)) else {
                continue;
            };
            manifests.insert(d, (manifest_refs(&rec), rec.subject.clone(), rec.created_ms));
        }
        Ok(manifests)
    }

    /// A repository's tags: name, digest, and when it was set (the tag's own time if the state
    /// kept it, else its manifest's push time).
    pub(crate) fn repo_tags(&self, r: &str, manifests: &Manifests) -> std::io::Result<Vec<(String, Digest, u64)>> {
        let mut out = Vec::new();
        let prefix = keys::tags_of(r);
        for kv in self.tree().scan_prefix(&prefix) {
            let (k, v) = kv.map_err(io)?;
            let Some(d) = std::str::from_utf8(&v).ok().and_then(|s| Digest::parse(s).ok()) else { continue };
            let name = keys::suffix(&k, &prefix).to_string();
            let at = self
                .tree()
                .get(keys::tag_time(r, &name))
                .map_err(io)?
                .and_then(|t| t.as_ref().try_into().ok().map(u64::from_be_bytes))
                .or_else(|| manifests.get(&d).map(|m| m.2))
                .unwrap_or(0);
            out.push((name, d, at));
        }
        Ok(out)
    }

    fn plan_repo(&self, repo: &RepoName, before_ms: u64, untagged: bool, plan: &mut GcPlan) -> std::io::Result<()> {
        let r = repo.as_str();
        let tree = self.tree();
        let manifests = self.repo_manifests(r)?;
        let live: HashSet<Digest> = if untagged {
            let tagged: HashSet<Digest> = self.repo_tags(r, &manifests)?.into_iter().map(|t| t.1).collect();
            reachable(&manifests, &tagged, before_ms)
        } else {
            manifests.keys().cloned().collect()
        };
        if untagged {
            for d in apply_order(&manifests, &live) {
                plan.manifests.push((repo.clone(), d));
            }
        }
        // what the remaining manifests reference; an unreadable one keeps every link
        let mut referenced: HashSet<&Digest> = HashSet::new();
        for d in &live {
            match &manifests[d].0 {
                Some(refs) => referenced.extend(refs.iter()),
                None => return Ok(()),
            }
        }
        let lp = repo_prefix(keys::LINKS, r);
        for kv in tree.scan_prefix(&lp) {
            let (k, v) = kv.map_err(io)?;
            let Ok(d) = Digest::parse(keys::suffix(&k, &lp)) else { continue };
            if referenced.contains(&d) {
                continue;
            }
            let size = v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            let at = tree
                .get(keys::linked_by(&d.to_string(), r))
                .map_err(io)?
                .and_then(|t| t.as_ref().try_into().ok().map(u64::from_be_bytes))
                .unwrap_or(0);
            if at < before_ms {
                plan.links.push((repo.clone(), d, size));
            }
        }
        Ok(())
    }
}

/// Manifests a collection keeps: tagged ones, those younger than the cut or unreadable, and
/// everything they reach as index children or as referrers.
pub(crate) fn reachable(manifests: &Manifests, tagged: &HashSet<Digest>, before_ms: u64) -> HashSet<Digest> {
    let mut referrers: HashMap<&Digest, Vec<&Digest>> = HashMap::new();
    for (d, (_, subject, _)) in manifests {
        if let Some(s) = subject {
            referrers.entry(s).or_default().push(d);
        }
    }
    let mut live: HashSet<Digest> = HashSet::new();
    let mut queue: VecDeque<&Digest> = manifests
        .iter()
        .filter(|(d, (refs, _, at))| tagged.contains(*d) || *at >= before_ms || refs.is_none())
        .map(|(d, _)| d)
        .collect();
    while let Some(d) = queue.pop_front() {
        if !live.insert(d.clone()) {
            continue;
        }
        let children = manifests[d].0.iter().flatten().filter(|c| manifests.contains_key(*c));
        queue.extend(children);
        queue.extend(referrers.get(d).into_iter().flatten().copied());
    }
    live
}

/// The manifests not in `live`, each after every one that lists it or names it as subject (the
/// state machine removes a manifest only once nothing refers to it).
pub(crate) fn apply_order(manifests: &Manifests, live: &HashSet<Digest>) -> Vec<Digest> {
    let garbage: Vec<&Digest> = manifests.keys().filter(|d| !live.contains(*d)).collect();
    let set: HashSet<&Digest> = garbage.iter().copied().collect();
    // edges: a parent before each child it lists, a referrer before its subject
    let mut after: HashMap<&Digest, Vec<&Digest>> = HashMap::new();
    let mut waiting: HashMap<&Digest, usize> = garbage.iter().map(|d| (*d, 0)).collect();
    for d in &garbage {
        let (refs, subject, _) = &manifests[*d];
        let targets = refs.iter().flatten().chain(subject.iter()).filter(|t| set.contains(t));
        for t in targets.collect::<HashSet<_>>() {
            after.entry(*d).or_default().push(t);
            *waiting.get_mut(t).expect("in the garbage set") += 1;
        }
    }
    let mut ready: VecDeque<&Digest> = garbage.iter().copied().filter(|d| waiting[d] == 0).collect();
    let mut out = Vec::new();
    while let Some(d) = ready.pop_front() {
        out.push(d.clone());
        for t in after.get(d).into_iter().flatten() {
            let w = waiting.get_mut(t).expect("in the garbage set");
            *w -= 1;
            if *w == 0 {
                ready.push_back(t);
            }
        }
    }
    out
}
