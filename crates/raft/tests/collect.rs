//! Garbage collection, retention and quotas at the state machine: what a plan finds, and every
//! interleaving of a push with the plan and its application (the state machine re-checks each
//! item, so what a push uses is kept, or the push is refused and uploads again); what each
//! repository holds, and pushes refused over a quota.

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use raftyard_raft::gc::GcPlan;
use raftyard_raft::state::StateMachine;
use raftyard_raft::{StorageWatch, TypeConfig};
use raftyard_types::access::RepoGlob;
use raftyard_types::event::VersionedCommand;
use raftyard_types::lifecycle::{Quota, RetentionPolicy, Usage};
use raftyard_types::manifest::{OCI_INDEX, OCI_MANIFEST};
use raftyard_types::{Command, Digest, Event, Rejection, RepoName, Tag};
use serde_json::json;

struct Fixture {
    _dir: tempfile::TempDir,
    sm: StateMachine,
    next: u64,
    /// Added to the time of each command.
    base: u64,
}

/// Each command is stamped `base` + 1000 + its log index: "now" is the time the next one gets.
impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let sm = StateMachine::open(&db, dir.path(), StorageWatch::offline()).unwrap();
        Fixture { _dir: dir, sm, next: 1, base: 0 }
    }

    /// A fixture whose log starts with every member at protocol 3.
    async fn upgraded() -> Self {
        Fixture::at(3).await
    }

    /// A fixture whose log starts with every member at `protocol`.
    async fn at(protocol: u32) -> Self {
        let mut f = Fixture::new();
        f.apply(vec![Event::ClusterUpgraded { protocol }]).await.unwrap();
        f
    }

    fn now(&self) -> u64 {
        self.base + 1000 + self.next
    }

    async fn apply(&mut self, events: Vec<Event>) -> Result<(), Rejection> {
        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), self.next),
            payload: EntryPayload::Normal(VersionedCommand::V1(Command { time_ms: self.now(), events })),
        };
        self.next += 1;
        self.sm.apply([entry]).await.unwrap().remove(0)
    }

    fn plan(&self, untagged: bool) -> GcPlan {
        self.sm.reader().gc_plan(self.now(), untagged).unwrap()
    }

    /// Applies a plan, one command per batch.
    async fn collect(&mut self, plan: &GcPlan) {
        for ev in plan.events() {
            self.apply(vec![ev]).await.unwrap();
        }
    }

    async fn link(&mut self, r: &str, digest: &Digest) {
        self.apply(vec![Event::BlobLinked { repo: repo(r), digest: digest.clone(), size: 10 }]).await.unwrap();
    }

    /// Pushes manifest bytes (refs as the registry parses them).
    async fn push(&mut self, r: &str, bytes: &[u8]) -> Result<Digest, Rejection> {
        let p = raftyard_types::manifest::parse_manifest(bytes, "").unwrap();
        let digest = Digest::sha256(bytes);
        let ev = Event::ManifestPut {
            repo: repo(r),
            digest: digest.clone(),
            media_type: p.media_type,
            bytes: bytes.to_vec(),
            refs: p.required,
            subject: p.subject,
            artifact_type: p.artifact_type,
        };
        self.apply(vec![ev]).await.map(|()| digest)
    }

    async fn tag(&mut self, r: &str, t: &str, digest: &Digest) {
        let ev = Event::TagSet { repo: repo(r), tag: Tag::parse(t).unwrap(), digest: digest.clone(), expect: None };
        self.apply(vec![ev]).await.unwrap();
    }

    fn has_manifest(&self, r: &str, digest: &Digest) -> bool {
        self.sm.reader().manifest(&repo(r), digest).unwrap().is_some()
    }

    fn linked(&self, r: &str, digest: &Digest) -> bool {
        self.sm.reader().blob_link(&repo(r), digest).unwrap().is_some()
    }

    fn in_registry(&self, digest: &Digest) -> bool {
        self.sm.reader().blob_info(digest).unwrap().is_some()
    }
}

fn repo(s: &str) -> RepoName {
    RepoName::parse(s).unwrap()
}

fn blob(name: &str) -> Digest {
    Digest::sha256(name.as_bytes())
}

fn desc(media_type: &str, d: &Digest) -> serde_json::Value {
    json!({"mediaType": media_type, "digest": d.to_string(), "size": 10})
}

/// An OCI image manifest of `config` and `layers`, optionally a referrer of `subject`.
fn image(config: &Digest, layers: &[&Digest], subject: Option<&Digest>) -> Vec<u8> {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc("application/vnd.oci.image.config.v1+json", config),
        "layers": layers.iter().map(|l| desc("application/vnd.oci.image.layer.v1.tar", l)).collect::<Vec<_>>(),
    });
    if let Some(s) = subject {
        m["subject"] = desc(OCI_MANIFEST, s);
    }
    serde_json::to_vec(&m).unwrap()
}

fn index(children: &[&Digest]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": children.iter().map(|c| desc(OCI_MANIFEST, c)).collect::<Vec<_>>(),
    }))
    .unwrap()
}

/// The registry of the first test: what a collection must keep and what it may take.
struct Scene {
    config: Digest,
    tagged: Digest,
    untagged: Digest,
    child: Digest,
    index: Digest,
    kept_sig: Digest,
    dead_sig: Digest,
    /// A layer only `untagged` uses, one uploaded without a manifest, one of `child`.
    only_untagged: Digest,
    orphan: Digest,
    child_layer: Digest,
}

async fn scene(f: &mut Fixture) -> Scene {
    let (config, l1, l2, l3, l5) = (blob("config"), blob("l1"), blob("l2"), blob("l3"), blob("l5"));
    for b in [&config, &l1, &l2, &l3, &l5] {
        f.link("a", b).await;
    }
    let tagged = f.push("a", &image(&config, &[&l1], None)).await.unwrap();
    f.tag("a", "v1", &tagged).await;
    let untagged = f.push("a", &image(&config, &[&l2], None)).await.unwrap();
    let child = f.push("a", &image(&config, &[&l5], None)).await.unwrap();
    let index = f.push("a", &index(&[&child])).await.unwrap();
    f.tag("a", "multi", &index).await;
    let kept_sig = f.push("a", &image(&config, &[], Some(&tagged))).await.unwrap();
    let dead_sig = f.push("a", &image(&config, &[&l1], Some(&untagged))).await.unwrap();
    Scene { config, tagged, untagged, child, index, kept_sig, dead_sig, only_untagged: l2, orphan: l3, child_layer: l5 }
}

#[tokio::test]
async fn a_collection_takes_what_nothing_references_and_keeps_index_children_and_referrers() {
    let mut f = Fixture::upgraded().await;
    let s = scene(&mut f).await;
    // a layer uploaded just now, its manifest not pushed yet: younger than the cut
    let young = blob("young");
    let plan_time = f.now();
    f.link("a", &young).await;
    let plan = f.sm.reader().gc_plan(plan_time, true).unwrap();

    // the untagged image and its referrer go, the referrer first
    assert_eq!(plan.manifests, vec![(repo("a"), s.dead_sig.clone()), (repo("a"), s.untagged.clone())]);
    let links: Vec<&Digest> = plan.links.iter().map(|(_, d, _)| d).collect();
    assert_eq!(links.len(), 2, "{links:?}");
    assert!(links.contains(&&s.only_untagged) && links.contains(&&s.orphan), "{links:?}");
    assert_eq!(plan.blobs.len(), 2);
    assert_eq!(plan.bytes(), 20);

    f.collect(&plan).await;
    for m in [&s.tagged, &s.child, &s.index, &s.kept_sig] {
        assert!(f.has_manifest("a", m), "{m} kept");
    }
    assert!(!f.has_manifest("a", &s.untagged) && !f.has_manifest("a", &s.dead_sig));
    for b in [&s.config, &blob("l1"), &s.child_layer, &young] {
        assert!(f.linked("a", b), "{b} kept");
    }
    assert!(!f.linked("a", &s.only_untagged) && !f.in_registry(&s.only_untagged));
    assert!(!f.linked("a", &s.orphan) && !f.in_registry(&s.orphan));
    // the journal says what was decided
    let last = f.sm.reader().last_journal_entry().unwrap().unwrap();
    assert!(matches!(last.events[0], Event::Collected { .. }));

    // nothing left to take: a second plan is empty (the young layer is still young)
    let again = f.sm.reader().gc_plan(plan_time, true).unwrap();
    assert!(again.manifests.is_empty() && again.links.is_empty(), "{again:?}");
}

#[tokio::test]
async fn without_untagged_only_unreferenced_links_go() {
    let mut f = Fixture::upgraded().await;
    let s = scene(&mut f).await;
    let plan = f.plan(false);
    assert!(plan.manifests.is_empty());
    assert_eq!(plan.links.iter().map(|(_, d, _)| d.clone()).collect::<Vec<_>>(), vec![s.orphan.clone()]);
    f.collect(&plan).await;
    assert!(f.has_manifest("a", &s.untagged) && f.linked("a", &s.only_untagged));
    assert!(!f.linked("a", &s.orphan));
}

/// A manifest tagged, a manifest pushed, a blob uploaded again between the plan and its
/// application: each keeps what it uses.
#[tokio::test]
async fn pushes_between_the_plan_and_its_application_keep_what_they_use() {
    let mut f = Fixture::upgraded().await;
    let s = scene(&mut f).await;
    let plan = f.plan(true);
    // the untagged image is tagged again
    f.tag("a", "back", &s.untagged).await;
    // a new image uses the orphan layer
    let new = f.push("a", &image(&s.config, &[&s.orphan], None)).await.unwrap();
    f.collect(&plan).await;
    assert!(f.has_manifest("a", &s.untagged), "tagged since the plan");
    assert!(f.linked("a", &s.only_untagged), "its layer stays");
    assert!(f.linked("a", &s.orphan) && f.has_manifest("a", &new), "referenced since the plan");
    // and so is its referrer: its subject is in use again
    assert!(f.has_manifest("a", &s.dead_sig));

    // a referrer pushed since the plan keeps its subject
    let mut f = Fixture::upgraded().await;
    let s = scene(&mut f).await;
    let plan = f.plan(true);
    let sig = f.push("a", &image(&s.config, &[], Some(&s.untagged))).await.unwrap();
    f.collect(&plan).await;
    assert!(f.has_manifest("a", &s.untagged) && f.has_manifest("a", &sig), "the subject of a new referrer");
    assert!(f.linked("a", &s.only_untagged));

    // a layer uploaded again after the plan is young again
    let mut f = Fixture::upgraded().await;
    let s = scene(&mut f).await;
    let plan = f.plan(false);
    f.link("a", &s.orphan).await;
    f.collect(&plan).await;
    assert!(f.linked("a", &s.orphan), "linked again since the plan: young");
}

/// After a collection applied, a push that relies on a collected blob is refused (the client
/// uploads again), and a mount of it finds nothing to mount.
#[tokio::test]
async fn after_the_collection_a_push_of_a_collected_blob_uploads_again() {
    let mut f = Fixture::upgraded().await;
    let s = scene(&mut f).await;
    let plan = f.plan(true);
    f.collect(&plan).await;
    let r = f.push("a", &image(&s.config, &[&s.orphan], None)).await;
    assert_eq!(r, Err(Rejection::ManifestBlobUnknown(vec![s.orphan.clone()])));
    let mount = Event::BlobMounted { repo: repo("b"), digest: s.orphan.clone(), size: 10 };
    assert_eq!(f.apply(vec![mount]).await, Err(Rejection::BlobUnknown(s.orphan.clone())));
    assert!(!f.in_registry(&s.orphan), "a refused mount brings nothing back");
    // a mount of a blob still in the registry links it
    let mount = Event::BlobMounted { repo: repo("b"), digest: s.config.clone(), size: 10 };
    f.apply(vec![mount]).await.unwrap();
    assert!(f.linked("b", &s.config));
    // uploaded again, it is back
    f.link("a", &s.orphan).await;
    f.push("a", &image(&s.config, &[&s.orphan], None)).await.unwrap();
}

/// A mount decided before a collection, applied after it: refused, so no repository links a
/// blob whose files are being removed.
#[tokio::test]
async fn a_mount_racing_the_collection_of_its_blob_is_refused() {
    let mut f = Fixture::upgraded().await;
    let s = scene(&mut f).await;
    // the mount checked that `a` links the orphan layer; then the collection applies
    let plan = f.plan(false);
    f.collect(&plan).await;
    let mount = Event::BlobMounted { repo: repo("b"), digest: s.orphan.clone(), size: 10 };
    assert_eq!(f.apply(vec![mount]).await, Err(Rejection::BlobUnknown(s.orphan.clone())));
}

/// An untagged index and its untagged child both go, the index first, even when each is in a
/// batch of its own; a referrer's subject goes after the referrer.
#[tokio::test]
async fn untagged_chains_go_parents_first_across_batches() {
    let mut f = Fixture::upgraded().await;
    let (c, l) = (blob("c"), blob("l"));
    f.link("a", &c).await;
    f.link("a", &l).await;
    let child = f.push("a", &image(&c, &[&l], None)).await.unwrap();
    let idx = f.push("a", &index(&[&child])).await.unwrap();
    let sig = f.push("a", &image(&c, &[], Some(&idx))).await.unwrap();
    let plan = f.plan(true);
    let order: Vec<Digest> = plan.manifests.iter().map(|(_, d)| d.clone()).collect();
    assert_eq!(order, vec![sig.clone(), idx.clone(), child.clone()]);
    // one manifest per command, in the plan's order
    for (r, d) in &plan.manifests {
        let ev = Event::Collected {
            as_of: plan.as_of,
            before_ms: plan.before_ms,
            manifests: vec![(r.clone(), d.clone())],
            links: vec![],
        };
        f.apply(vec![ev]).await.unwrap();
    }
    for m in [&sig, &idx, &child] {
        assert!(!f.has_manifest("a", m), "{m} collected");
    }
    // in the wrong order nothing goes: the child is still listed by the index
    let mut f = Fixture::upgraded().await;
    f.link("a", &c).await;
    f.link("a", &l).await;
    let child = f.push("a", &image(&c, &[&l], None)).await.unwrap();
    let idx = f.push("a", &index(&[&child])).await.unwrap();
    let ev =
        Event::Collected { as_of: 0, before_ms: f.now(), manifests: vec![(repo("a"), child.clone())], links: vec![] };
    f.apply(vec![ev]).await.unwrap();
    assert!(f.has_manifest("a", &child), "listed by an index");
    let ev = Event::Collected { as_of: 0, before_ms: f.now(), manifests: vec![], links: vec![(repo("a"), l.clone())] };
    f.apply(vec![ev]).await.unwrap();
    assert!(f.linked("a", &l), "referenced by a manifest");
    assert!(f.has_manifest("a", &idx));
}

/// A blob linked in two repositories stays in the registry until both links go.
#[tokio::test]
async fn a_blob_leaves_the_registry_with_its_last_link() {
    let mut f = Fixture::upgraded().await;
    let x = blob("x");
    f.link("a", &x).await;
    f.link("b", &x).await;
    let c = blob("c");
    f.link("b", &c).await;
    let m = f.push("b", &image(&c, &[&x], None)).await.unwrap();
    f.tag("b", "t", &m).await;
    let plan = f.plan(false);
    assert_eq!(plan.links.len(), 1, "only a's link is unreferenced");
    assert!(plan.blobs.is_empty(), "b still links it");
    f.collect(&plan).await;
    assert!(!f.linked("a", &x) && f.linked("b", &x) && f.in_registry(&x));
}

/// What protocol 3 keeps (link times, the reference index) starts at the `ClusterUpgraded`
/// entry, on every node alike: manifests pushed before it are indexed as it applies, links made
/// before it count as old.
#[tokio::test]
async fn the_upgrade_entry_indexes_what_was_pushed_before_it() {
    let mut f = Fixture::new();
    let (c, l, orphan) = (blob("c"), blob("l"), blob("orphan"));
    for b in [&c, &l, &orphan] {
        f.link("a", b).await;
    }
    let m = f.push("a", &image(&c, &[&l], None)).await.unwrap();
    f.tag("a", "t", &m).await;
    assert_eq!(f.sm.reader().protocol().unwrap().0, 2, "nothing recorded yet");
    f.apply(vec![Event::ClusterUpgraded { protocol: 3 }]).await.unwrap();
    assert_eq!(f.sm.reader().protocol().unwrap().0, 3);
    let fresh = blob("fresh");
    f.link("a", &fresh).await;
    // a collection that lists every link, with a cut older than any command: it keeps those
    // the manifest references and the one linked with a time; the others have none
    let all = [&c, &l, &orphan, &fresh].iter().map(|d| (repo("a"), (*d).clone())).collect();
    let ev = Event::Collected { as_of: 0, before_ms: 1, manifests: vec![], links: all };
    f.apply(vec![ev]).await.unwrap();
    assert!(f.linked("a", &c) && f.linked("a", &l), "referenced by the tagged manifest");
    assert!(f.linked("a", &fresh), "linked after the upgrade: its time is known");
    assert!(!f.linked("a", &orphan), "linked before: no time, old");
    assert!(f.has_manifest("a", &m));
    // an older protocol recorded again changes nothing
    f.apply(vec![Event::ClusterUpgraded { protocol: 2 }]).await.unwrap();
    assert_eq!(f.sm.reader().protocol().unwrap().0, 3);
}

const DAY: u64 = 86_400_000;

fn policy(repos: &str) -> RetentionPolicy {
    RetentionPolicy {
        repos: RepoGlob::parse(repos).unwrap(),
        keep_last: None,
        max_age_days: None,
        keep_pattern: None,
        untagged_max_age_days: None,
    }
}

impl Fixture {
    /// Pushes a one-layer image tagged `t` in `r` (its own blobs), a day after the last command.
    async fn tagged(&mut self, r: &str, t: &str) -> Digest {
        self.base += DAY;
        let (c, l) = (blob(&format!("{r}:{t}:c")), blob(&format!("{r}:{t}:l")));
        self.link(r, &c).await;
        self.link(r, &l).await;
        let m = self.push(r, &image(&c, &[&l], None)).await.unwrap();
        self.tag(r, t, &m).await;
        m
    }

    fn tags(&self, r: &str) -> Vec<String> {
        self.sm.reader().tags(&repo(r), None, 100).unwrap()
    }

    async fn apply_retention(&mut self, plan: &raftyard_raft::retention::RetentionPlan) {
        for events in plan.events() {
            self.apply(events).await.unwrap();
        }
    }
}

/// A tag is kept if it matches the pattern, is among the last N of the others, or is younger
/// than the age; the rest expire, and the journal says so.
#[tokio::test]
async fn retention_keeps_the_pattern_the_newest_and_the_young() {
    let mut f = Fixture::upgraded().await;
    for t in ["v1.0", "a", "b", "c", "d", "e"] {
        f.tagged("ci/app", t).await;
    }
    let other = f.tagged("ci/other", "a").await;
    let mut p = policy("ci/app");
    p.keep_last = Some(2);
    p.keep_pattern = Some(r"^v\d+\.\d+".into());
    p.max_age_days = Some(4);
    f.apply(vec![Event::RetentionSet(p.clone())]).await.unwrap();
    assert_eq!(f.sm.reader().retention_policies().unwrap(), vec![p.clone()]);

    // "c" is three days old (younger than four), "d" and "e" the two newest: "a" and "b" expire
    let plan = f.sm.reader().retention_plan(f.now()).unwrap();
    let (tags, manifests) = plan.lines();
    assert_eq!(tags, vec!["ci/app:a", "ci/app:b"]);
    assert!(manifests.is_empty(), "no untagged rule");
    // a day later "c" is too old as well
    let later = f.sm.reader().retention_plan(f.now() + DAY).unwrap().lines().0;
    assert_eq!(later, vec!["ci/app:a", "ci/app:b", "ci/app:c"]);

    f.apply_retention(&plan).await;
    assert_eq!(f.tags("ci/app"), vec!["c", "d", "e", "v1.0"]);
    assert_eq!(f.tags("ci/other"), vec!["a"], "another repository");
    assert!(f.has_manifest("ci/other", &other));
    let last = f.sm.reader().last_journal_entry().unwrap().unwrap();
    assert!(last.events.iter().all(|e| matches!(e, Event::TagExpired { .. })) && last.events.len() == 2);

    // removed, the policy expires nothing more
    f.apply(vec![Event::RetentionRemoved { repos: p.repos.clone() }]).await.unwrap();
    assert!(f.sm.reader().retention_plan(f.now() + 10 * DAY).unwrap().tags.is_empty());
    let again = f.apply(vec![Event::RetentionRemoved { repos: p.repos.clone() }]).await;
    assert_eq!(again, Err(Rejection::RetentionUnknown("ci/app".into())));
}

/// A tag pushed again between the plan and its application is kept; so is a tag whose every
/// matching policy does not let it go.
#[tokio::test]
async fn retention_keeps_what_changed_since_the_plan_and_what_any_policy_keeps() {
    let mut f = Fixture::upgraded().await;
    for t in ["a", "b", "c", "d"] {
        f.tagged("ci/app", t).await;
    }
    let mut wide = policy("ci/**");
    wide.keep_last = Some(1);
    let mut narrow = policy("ci/app");
    narrow.keep_last = Some(2);
    f.apply(vec![Event::RetentionSet(wide), Event::RetentionSet(narrow)]).await.unwrap();
    let plan = f.sm.reader().retention_plan(f.now()).unwrap();
    assert_eq!(plan.lines().0, vec!["ci/app:a", "ci/app:b"], "the narrow policy keeps c");
    // "a" is pushed again, to a new image, before the plan applies
    let newer = f.tagged("ci/app", "e").await;
    f.tag("ci/app", "a", &newer).await;
    f.apply_retention(&plan).await;
    assert_eq!(f.tags("ci/app"), vec!["a", "c", "d", "e"], "a points elsewhere since the plan");
    assert_eq!(f.sm.reader().tag(&repo("ci/app"), &Tag::parse("a").unwrap()).unwrap(), Some(newer));
}

/// Untagged manifests older than the age go, the ones a tag expired by the same run included
/// (the dry run names them), but not children of a kept index.
#[tokio::test]
async fn retention_takes_old_untagged_manifests_with_the_expired_tags() {
    let mut f = Fixture::upgraded().await;
    let old = f.tagged("ci/app", "old").await;
    let kept = f.tagged("ci/app", "kept").await;
    f.base += DAY;
    let (c, l) = (blob("child-c"), blob("child-l"));
    f.link("ci/app", &c).await;
    f.link("ci/app", &l).await;
    let child = f.push("ci/app", &image(&c, &[&l], None)).await.unwrap();
    let idx = f.push("ci/app", &index(&[&child])).await.unwrap();
    f.tag("ci/app", "multi", &idx).await;
    let loose = f.push("ci/app", &image(&c, &[], None)).await.unwrap();
    f.base += 5 * DAY;
    let mut p = policy("ci/app");
    p.keep_pattern = Some("^(kept|multi)$".into());
    p.keep_last = Some(0);
    p.untagged_max_age_days = Some(2);
    f.apply(vec![Event::RetentionSet(p)]).await.unwrap();
    let plan = f.sm.reader().retention_plan(f.now()).unwrap();
    let (tags, manifests) = plan.lines();
    assert_eq!(tags, vec!["ci/app:old"]);
    let mut want = vec![format!("ci/app@{old}"), format!("ci/app@{loose}")];
    want.sort();
    let mut got = manifests.clone();
    got.sort();
    assert_eq!(got, want);
    f.apply_retention(&plan).await;
    assert!(!f.has_manifest("ci/app", &old) && !f.has_manifest("ci/app", &loose));
    for m in [&kept, &idx, &child] {
        assert!(f.has_manifest("ci/app", m), "{m} kept");
    }
    // what is left for the next run: nothing
    let next = f.sm.reader().retention_plan(f.now()).unwrap();
    assert!(next.tags.is_empty() && next.manifests.is_empty(), "{next:?}");
}

fn usage(f: &Fixture, r: &str) -> Usage {
    f.sm.reader().repo_usage(r).unwrap()
}

fn quota(repos: &str, bytes: u64) -> Event {
    Event::QuotaSet(Quota { repos: RepoGlob::parse(repos).unwrap(), bytes })
}

/// A repository holds each blob it links once, however many manifests and tags use it, plus
/// its manifests; deletes and collections take their bytes away again.
#[tokio::test]
async fn usage_counts_each_blob_once_per_repository() {
    let mut f = Fixture::at(4).await;
    let (c, l) = (blob("c"), blob("l"));
    f.link("x", &c).await;
    f.link("x", &l).await;
    f.link("x", &l).await; // linked again: still once
    let bytes = image(&c, &[&l], None);
    let m = f.push("x", &bytes).await.unwrap();
    f.push("x", &bytes).await.unwrap(); // the same manifest again
    f.tag("x", "a", &m).await;
    f.tag("x", "b", &m).await;
    let mounted = Event::BlobMounted { repo: repo("y"), digest: l.clone(), size: 10 };
    f.apply(vec![mounted]).await.unwrap();
    let mlen = bytes.len() as u64;
    assert_eq!(usage(&f, "x"), Usage { bytes: 20 + mlen, blobs: 2, manifests: 1 });
    assert_eq!(usage(&f, "y"), Usage { bytes: 10, blobs: 1, manifests: 0 }, "counted in each repository");
    let listed = f.sm.reader().usage(None, None, 10).unwrap();
    assert_eq!(listed.iter().map(|u| u.repository.as_str()).collect::<Vec<_>>(), ["x", "y"]);
    let only_y = f.sm.reader().usage(Some(&RepoGlob::parse("y").unwrap()), None, 10).unwrap();
    assert_eq!(only_y.len(), 1);

    f.apply(vec![Event::ManifestDeleted { repo: repo("x"), digest: m.clone() }]).await.unwrap();
    assert_eq!(usage(&f, "x"), Usage { bytes: 20, blobs: 2, manifests: 0 });
    f.base += DAY;
    let plan = f.plan(false);
    f.collect(&plan).await;
    assert_eq!(usage(&f, "x"), Usage::default(), "collected");
    // (y's mount, which no manifest of y references, went with them)
    assert_eq!(usage(&f, "y"), Usage::default());
    assert!(f.sm.reader().usage(None, None, 10).unwrap().is_empty(), "an empty repository is not listed");
}

/// A quota covers every repository its pattern matches, together: what would take them over
/// it is refused with the figures, whole commands at once; what adds nothing, deletes, and
/// repositories outside it are not.
#[tokio::test]
async fn a_quota_refuses_what_would_take_its_repositories_over() {
    let mut f = Fixture::at(4).await;
    f.link("team/a", &blob("1")).await;
    f.apply(vec![quota("team/**", 25)]).await.unwrap();
    let q = &f.sm.reader().quotas().unwrap()[0];
    assert_eq!((q.quota.bytes, q.used.bytes), (25, 10), "counts what was there before it");
    f.link("team/b", &blob("2")).await;
    let over = Event::BlobLinked { repo: repo("team/a"), digest: blob("3"), size: 10 };
    let refused = f.apply(vec![over.clone()]).await;
    assert_eq!(refused, Err(Rejection::QuotaExceeded { repos: "team/**".into(), limit: 25, used: 20, adds: 10 }));
    assert!(!f.linked("team/a", &blob("3")));
    // all or nothing: a command whose second link goes over links neither
    let small = Event::BlobLinked { repo: repo("team/a"), digest: blob("4"), size: 5 };
    assert!(f.apply(vec![small.clone(), over.clone()]).await.is_err());
    assert!(!f.linked("team/a", &blob("4")));
    assert!(f.sm.reader().quota_full("team/a").unwrap().is_none(), "5 bytes left");
    // linking again what is linked adds nothing; other repositories are not covered
    f.link("team/a", &blob("1")).await;
    f.link("other", &blob("3")).await;
    // a manifest's bytes count too
    let m = image(&blob("1"), &[], None);
    assert!(matches!(f.push("team/a", &m).await, Err(Rejection::QuotaExceeded { .. })));
    f.apply(vec![small]).await.unwrap();
    assert!(f.sm.reader().quota_full("team/b").unwrap().is_some(), "25 of 25");
    // deletes free room
    f.apply(vec![Event::BlobUnlinked { repo: repo("team/b"), digest: blob("2") }]).await.unwrap();
    assert_eq!(f.sm.reader().quotas().unwrap()[0].used.bytes, 15);
    f.apply(vec![over.clone()]).await.unwrap();
    // a quota lowered below what is held keeps what is there and refuses more; deletes go on
    f.apply(vec![quota("team/**", 5)]).await.unwrap();
    assert_eq!(f.sm.reader().quotas().unwrap()[0].used.bytes, 25);
    assert!(matches!(f.push("team/a", &m).await, Err(Rejection::QuotaExceeded { .. })));
    f.apply(vec![Event::BlobUnlinked { repo: repo("team/a"), digest: blob("3") }]).await.unwrap();
    // two quotas over one repository: both must have room
    f.apply(vec![quota("team/**", 1000), quota("team/a", 20)]).await.unwrap();
    assert!(matches!(
        f.apply(vec![Event::BlobLinked { repo: repo("team/a"), digest: blob("5"), size: 6 }]).await,
        Err(Rejection::QuotaExceeded { repos, .. }) if repos == "team/a"
    ));
    f.apply(vec![Event::QuotaRemoved { repos: RepoGlob::parse("team/a").unwrap() }]).await.unwrap();
    f.apply(vec![Event::BlobLinked { repo: repo("team/a"), digest: blob("5"), size: 6 }]).await.unwrap();
    let gone = f.apply(vec![Event::QuotaRemoved { repos: RepoGlob::parse("team/a").unwrap() }]).await;
    assert_eq!(gone, Err(Rejection::QuotaUnknown("team/a".into())));
    assert_eq!(f.sm.reader().quotas().unwrap()[0].used, usage(&f, "team/a").add(usage(&f, "team/b"), 1));
}

/// Usage figures and quotas start at the entry recording protocol 4, which counts what was
/// pushed before it; a quota proposed before it is refused on every node alike.
#[tokio::test]
async fn the_upgrade_to_protocol_4_counts_what_was_there() {
    let mut f = Fixture::upgraded().await;
    let (c, l) = (blob("c"), blob("l"));
    f.link("a", &c).await;
    f.link("a", &l).await;
    let bytes = image(&c, &[&l], None);
    f.push("a", &bytes).await.unwrap();
    f.link("b", &l).await;
    assert_eq!(usage(&f, "a"), Usage::default(), "not kept before protocol 4");
    assert_eq!(f.apply(vec![quota("a", 1000)]).await, Err(Rejection::NeedsProtocol(4)));
    f.apply(vec![Event::ClusterUpgraded { protocol: 4 }]).await.unwrap();
    assert_eq!(usage(&f, "a"), Usage { bytes: 20 + bytes.len() as u64, blobs: 2, manifests: 1 });
    assert_eq!(usage(&f, "b"), Usage { bytes: 10, blobs: 1, manifests: 0 });
    f.apply(vec![quota("*", 1000)]).await.unwrap();
    assert_eq!(f.sm.reader().quotas().unwrap()[0].used.bytes, 30 + bytes.len() as u64);
}
