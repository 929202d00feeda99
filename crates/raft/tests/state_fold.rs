//! The event fold: what each event does to the state, and which commands are rejected.

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use raftyard_raft::state::StateMachine;
use raftyard_raft::{StorageWatch, TypeConfig};
use raftyard_types::event::VersionedCommand;
use raftyard_types::{Command, Digest, Event, Rejection, RepoName, Tag};

struct Fixture {
    _dir: tempfile::TempDir,
    sm: StateMachine,
    next: u64,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let sm = StateMachine::open(&db, dir.path(), StorageWatch::offline()).unwrap();
        Fixture { _dir: dir, sm, next: 1 }
    }

    async fn apply(&mut self, events: Vec<Event>) -> Result<(), Rejection> {
        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), self.next),
            payload: EntryPayload::Normal(VersionedCommand::V1(Command { time_ms: 1000 + self.next, events })),
        };
        self.next += 1;
        self.sm.apply([entry]).await.unwrap().remove(0)
    }
}

fn repo(s: &str) -> RepoName {
    RepoName::parse(s).unwrap()
}
fn tag(s: &str) -> Tag {
    Tag::parse(s).unwrap()
}
fn d(n: u8) -> Digest {
    Digest::sha256(&[n])
}
fn manifest(r: &str, digest: Digest, refs: Vec<Digest>, subject: Option<Digest>) -> Event {
    Event::ManifestPut {
        repo: repo(r),
        digest,
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        bytes: b"{}".to_vec(),
        refs,
        subject,
        artifact_type: None,
    }
}

#[tokio::test]
async fn manifest_needs_its_blobs_in_the_same_repo() {
    let mut f = Fixture::new();
    f.apply(vec![Event::BlobLinked { repo: repo("a"), digest: d(1), size: 1 }]).await.unwrap();
    // referenced blob linked in another repo only: rejected, nothing applied
    let r = f.apply(vec![manifest("b", d(10), vec![d(1)], None)]).await;
    assert_eq!(r, Err(Rejection::ManifestBlobUnknown(vec![d(1)])));
    let reader = f.sm.reader();
    assert!(reader.manifest(&repo("b"), &d(10)).unwrap().is_none());
    // in the right repo: accepted
    f.apply(vec![manifest("a", d(10), vec![d(1)], None)]).await.unwrap();
    assert!(reader.manifest(&repo("a"), &d(10)).unwrap().is_some());
    assert_eq!(reader.applied_index(), 3);
}

#[tokio::test]
async fn command_is_all_or_nothing() {
    let mut f = Fixture::new();
    let r = f
        .apply(vec![
            Event::BlobLinked { repo: repo("a"), digest: d(1), size: 1 },
            manifest("a", d(10), vec![d(2)], None),
        ])
        .await;
    assert!(r.is_err());
    let reader = f.sm.reader();
    assert_eq!(reader.blob_link(&repo("a"), &d(1)).unwrap(), None, "first event rolled back");
    assert!(reader.journal(0, 10).unwrap().is_empty(), "rejected commands are not journaled");
}

#[tokio::test]
async fn tags_cas_delete_and_listing() {
    let mut f = Fixture::new();
    f.apply(vec![manifest("a", d(10), vec![], None), manifest("a", d(11), vec![], None)]).await.unwrap();
    for t in ["v2", "v10", "latest", "V1"] {
        f.apply(vec![Event::TagSet { repo: repo("a"), tag: tag(t), digest: d(10), expect: None }]).await.unwrap();
    }
    let reader = f.sm.reader();
    assert_eq!(reader.tags(&repo("a"), None, 100).unwrap(), vec!["V1", "latest", "v10", "v2"]);
    assert_eq!(reader.tags(&repo("a"), Some("latest"), 1).unwrap(), vec!["v10"]);
    // compare-and-set
    let r = f
        .apply(vec![Event::TagSet { repo: repo("a"), tag: tag("v2"), digest: d(11), expect: Some(Some(d(11))) }])
        .await;
    assert_eq!(r, Err(Rejection::TagConflict { tag: tag("v2"), current: Some(d(10)) }));
    f.apply(vec![Event::TagSet { repo: repo("a"), tag: tag("v2"), digest: d(11), expect: Some(Some(d(10))) }])
        .await
        .unwrap();
    assert_eq!(reader.tag(&repo("a"), &tag("v2")).unwrap(), Some(d(11)));
    // tag on unknown manifest
    let r = f.apply(vec![Event::TagSet { repo: repo("a"), tag: tag("x"), digest: d(99), expect: None }]).await;
    assert_eq!(r, Err(Rejection::ManifestUnknown));
    // deleting a manifest removes the tags that point at it
    f.apply(vec![Event::ManifestDeleted { repo: repo("a"), digest: d(10) }]).await.unwrap();
    assert_eq!(reader.tags(&repo("a"), None, 100).unwrap(), vec!["v2"]);
    assert_eq!(
        f.apply(vec![Event::TagDeleted { repo: repo("a"), tag: tag("latest") }]).await,
        Err(Rejection::ManifestUnknown)
    );
    f.apply(vec![Event::TagDeleted { repo: repo("a"), tag: tag("v2") }]).await.unwrap();
    assert!(reader.tags(&repo("a"), None, 100).unwrap().is_empty());
}

#[tokio::test]
async fn referrers_index_and_journal() {
    let mut f = Fixture::new();
    f.apply(vec![manifest("a", d(20), vec![], Some(d(10)))]).await.unwrap();
    f.apply(vec![manifest("a", d(21), vec![], Some(d(10)))]).await.unwrap();
    f.apply(vec![manifest("b", d(22), vec![], Some(d(10)))]).await.unwrap();
    let reader = f.sm.reader();
    assert_eq!(
        reader.referrers(&repo("a"), &d(10)).unwrap(),
        vec![d(20), d(21)].into_iter().collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>()
    );
    f.apply(vec![Event::ManifestDeleted { repo: repo("a"), digest: d(20) }]).await.unwrap();
    assert_eq!(reader.referrers(&repo("a"), &d(10)).unwrap(), vec![d(21)]);
    let j = reader.journal(2, 10).unwrap();
    assert_eq!(j.iter().map(|e| e.index).collect::<Vec<_>>(), vec![2, 3, 4]);
    assert_eq!(j[0].time_ms, 1002);
    assert_eq!(reader.repos(None, 10).unwrap(), vec!["a", "b"]);
    assert_eq!(reader.repos(Some("a"), 10).unwrap(), vec!["b"]);
}

#[tokio::test]
async fn unlink_and_placement() {
    let mut f = Fixture::new();
    f.apply(vec![
        Event::BlobLinked { repo: repo("a"), digest: d(1), size: 5 },
        Event::BlobPlaced { digest: d(1), size: 5, node: 2 },
        Event::BlobPlaced { digest: d(1), size: 5, node: 1 },
    ])
    .await
    .unwrap();
    let reader = f.sm.reader();
    assert_eq!(reader.blob_info(&d(1)).unwrap().unwrap().holders, vec![1, 2]);
    assert_eq!(reader.blob_link(&repo("a"), &d(1)).unwrap(), Some(5));
    f.apply(vec![Event::BlobUnlinked { repo: repo("a"), digest: d(1) }]).await.unwrap();
    assert_eq!(reader.blob_link(&repo("a"), &d(1)).unwrap(), None);
    assert_eq!(
        f.apply(vec![Event::BlobUnlinked { repo: repo("a"), digest: d(1) }]).await,
        Err(Rejection::BlobUnknown(d(1)))
    );
}

/// Deletion means gone: a blob unlinked from its last repository leaves the registry (no
/// placement, so no node fetches it and no mount finds it), while a blob still linked
/// elsewhere stays; a late placement does not bring a deleted blob back.
#[tokio::test]
async fn unlinking_the_last_link_removes_the_blob() {
    let mut f = Fixture::new();
    f.apply(vec![
        Event::BlobLinked { repo: repo("a"), digest: d(1), size: 5 },
        Event::BlobLinked { repo: repo("b"), digest: d(1), size: 5 },
        Event::BlobPlaced { digest: d(1), size: 5, node: 1 },
    ])
    .await
    .unwrap();
    let reader = f.sm.reader();
    f.apply(vec![Event::BlobUnlinked { repo: repo("a"), digest: d(1) }]).await.unwrap();
    assert_eq!(reader.blob_info(&d(1)).unwrap().unwrap().holders, vec![1], "still linked in b");
    assert_eq!(reader.blobs().unwrap().len(), 1);
    f.apply(vec![Event::BlobUnlinked { repo: repo("b"), digest: d(1) }]).await.unwrap();
    assert_eq!(reader.blob_info(&d(1)).unwrap(), None, "unlinked everywhere");
    assert!(reader.blobs().unwrap().is_empty());
    f.apply(vec![Event::BlobPlaced { digest: d(1), size: 5, node: 2 }]).await.unwrap();
    assert_eq!(reader.blob_info(&d(1)).unwrap(), None, "a late placement records nothing");
    // pushed again: known again, with its new placements
    f.apply(vec![
        Event::BlobLinked { repo: repo("c"), digest: d(1), size: 5 },
        Event::BlobPlaced { digest: d(1), size: 5, node: 3 },
    ])
    .await
    .unwrap();
    assert_eq!(reader.blob_info(&d(1)).unwrap().unwrap().holders, vec![3]);
}

/// A state written before the `L/` index existed gets it when opened: unlinking then still
/// knows which other repositories link a blob.
#[tokio::test]
async fn an_earlier_layout_is_migrated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let sm = StateMachine::open(&db, dir.path(), StorageWatch::offline()).unwrap();
        drop(sm);
        // what version 1 wrote: links and placements, no reverse index, no layout marker
        let state = db.open_tree("state").unwrap();
        let ds = d(1).to_string();
        for k in state.iter().keys() {
            state.remove(k.unwrap()).unwrap();
        }
        for r in ["a", "b"] {
            let mut k = format!("b/{r}").into_bytes();
            k.push(0);
            k.extend_from_slice(ds.as_bytes());
            state.insert(k, 5u64.to_be_bytes().to_vec()).unwrap();
        }
        let info = bincode::serialize(&raftyard_raft::state::BlobInfo { size: 5, holders: vec![1] }).unwrap();
        state.insert(format!("B/{ds}").into_bytes(), info).unwrap();
        db.flush().unwrap();
    }
    // sled's threads let go of the database's file lock a moment after the last handle drops
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let db = loop {
        match sled::Config::new().path(dir.path()).open() {
            Ok(db) => break db,
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("could not acquire lock") => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => panic!("reopening: {e}"),
        }
    };
    let sm = StateMachine::open(&db, dir.path(), StorageWatch::offline()).unwrap();
    let mut f = Fixture { _dir: dir, sm, next: 1 };
    f.apply(vec![Event::BlobUnlinked { repo: repo("a"), digest: d(1) }]).await.unwrap();
    assert!(f.sm.reader().blob_info(&d(1)).unwrap().is_some(), "b still links it");
    f.apply(vec![Event::BlobUnlinked { repo: repo("b"), digest: d(1) }]).await.unwrap();
    assert!(f.sm.reader().blob_info(&d(1)).unwrap().is_none());
}

impl Fixture {
    /// Applies a command with a proposal id, stamped `time_ms`.
    async fn apply_with_id(&mut self, id: u64, time_ms: u64, events: Vec<Event>) -> Result<(), Rejection> {
        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), self.next),
            payload: EntryPayload::Normal(VersionedCommand::V2 { id, command: Command { time_ms, events } }),
        };
        self.next += 1;
        self.sm.apply([entry]).await.unwrap().remove(0)
    }
}

#[tokio::test]
async fn a_proposal_proposed_again_applies_once_and_answers_the_first_outcome() {
    let mut f = Fixture::new();
    let link = Event::BlobLinked { repo: repo("a"), digest: d(1), size: 1 };
    f.apply_with_id(7, 5_000, vec![link.clone(), manifest("a", d(10), vec![d(1)], None)]).await.unwrap();
    let delete = vec![Event::ManifestDeleted { repo: repo("a"), digest: d(10) }];
    f.apply_with_id(8, 5_001, delete.clone()).await.unwrap();
    // the same delete again (a retry after the leader died): not "manifest unknown", and no
    // second journal entry
    assert_eq!(f.apply_with_id(8, 5_001, delete.clone()).await, Ok(()));
    // without the id, a second delete is rejected: what the id saves a retry from
    assert_eq!(f.apply(delete.clone()).await, Err(Rejection::ManifestUnknown));
    // a rejected proposal answers its rejection again, and changes nothing then either
    let bad = vec![manifest("a", d(11), vec![d(2)], None)];
    assert_eq!(f.apply_with_id(9, 5_002, bad.clone()).await, Err(Rejection::ManifestBlobUnknown(vec![d(2)])));
    f.apply(vec![Event::BlobLinked { repo: repo("a"), digest: d(2), size: 1 }]).await.unwrap();
    assert_eq!(f.apply_with_id(9, 5_002, bad).await, Err(Rejection::ManifestBlobUnknown(vec![d(2)])));
    let reader = f.sm.reader();
    assert!(reader.manifest(&repo("a"), &d(11)).unwrap().is_none());
    let journal = reader.journal(0, 100).unwrap();
    let indexes: Vec<u64> = journal.iter().map(|j| j.index).collect();
    assert_eq!(indexes, vec![1, 2, 6], "one entry per applied proposal: {indexes:?}");
}

#[tokio::test]
async fn proposal_ids_are_forgotten_after_their_time() {
    let mut f = Fixture::new();
    let window = raftyard_types::event::PROPOSAL_MEMORY_MS;
    for id in 1..=3 {
        f.apply_with_id(id, 1_000 + id, vec![Event::BlobLinked { repo: repo("a"), digest: d(id as u8), size: 1 }])
            .await
            .unwrap();
    }
    // within the window: still remembered
    let unlink = |n: u8| vec![Event::BlobUnlinked { repo: repo("a"), digest: d(n) }];
    f.apply_with_id(1, 1_001, unlink(1)).await.unwrap();
    assert!(f.sm.reader().blob_link(&repo("a"), &d(1)).unwrap().is_some(), "id 1 applied once");
    // a clock far ahead (a command stamped past the window) forgets nothing of the last
    // 10,000 entries: id 1 is still a no-op
    f.apply_with_id(99, 1_004 + window, vec![]).await.unwrap();
    f.apply_with_id(1, 1_004 + window, unlink(1)).await.unwrap();
    assert!(f.sm.reader().blob_link(&repo("a"), &d(1)).unwrap().is_some(), "id 1 remembered: too few entries since");
    // old both by the clock and in the log: ids 1..=3 are forgotten; id 1 then applies as new
    f.next += 10_000;
    f.apply_with_id(100, 1_004 + window, vec![]).await.unwrap();
    f.apply_with_id(1, 1_004 + window, unlink(1)).await.unwrap();
    assert!(f.sm.reader().blob_link(&repo("a"), &d(1)).unwrap().is_none(), "id 1 forgotten");
    // an id still inside the window of the newest command stays remembered
    f.apply_with_id(100, 1_004 + window, unlink(2)).await.unwrap();
    assert!(f.sm.reader().blob_link(&repo("a"), &d(2)).unwrap().is_some(), "id 100 applied once");
}
