//! Blob store behaviour: chunked appends, digest verification, crash-safety of the layout.

use bytes::Bytes;
use futures::{stream, StreamExt as _};
use raftyard_blobstore::{BlobError, BlobStore, BlobStoreConfig};
use raftyard_types::{Algorithm, Digest, RepoName};

fn store(dir: &std::path::Path) -> BlobStore {
    BlobStore::open(BlobStoreConfig::new(dir.to_path_buf(), "n1")).unwrap()
}

fn body(chunks: Vec<Vec<u8>>) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Unpin + Send {
    stream::iter(chunks.into_iter().map(|c| Ok(Bytes::from(c))))
}

fn repo() -> RepoName {
    RepoName::parse("a/b").unwrap()
}

#[tokio::test]
async fn chunked_upload_verifies_and_commits() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let digest = Digest::sha256(&data);
    let id = s.start_upload(repo(), Algorithm::Sha256, None).unwrap();
    assert!(id.starts_with("n1-"));
    let n = s.append(&id, Some(0), Some(1_000_000), body(vec![data[..1_000_000].to_vec()])).await.unwrap();
    assert_eq!(n, 1_000_000);
    // out-of-order chunk is refused and changes nothing
    let e = s.append(&id, Some(5), None, body(vec![vec![1, 2, 3]])).await.unwrap_err();
    assert!(matches!(e, BlobError::RangeInvalid { size: 1_000_000 }));
    s.append(&id, Some(1_000_000), None, body(vec![data[1_000_000..].to_vec()])).await.unwrap();
    assert_eq!(s.upload_status(&id).unwrap().size, 3_000_000);
    assert!(s.stat(&digest).is_none(), "nothing visible before finish");
    let (r, size) = s.finish(&id, &digest).await.unwrap();
    assert_eq!((r, size), (repo(), 3_000_000));
    assert_eq!(std::fs::read(s.path_of(&digest)).unwrap(), data);
    assert!(matches!(s.upload_status(&id), Err(BlobError::UploadUnknown)));
}

#[tokio::test]
async fn wrong_digest_is_rejected_and_nothing_visible() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let wrong = Digest::sha256(b"something else");
    let e = s.put_stream(repo(), &wrong, None, body(vec![b"hello".to_vec()])).await.unwrap_err();
    assert!(matches!(e, BlobError::DigestInvalid { .. }));
    assert!(s.stat(&wrong).is_none());
    assert_eq!(std::fs::read_dir(dir.path().join("uploads")).unwrap().count(), 0);
}

#[tokio::test]
async fn sha512_and_algorithm_switch() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let d512 = Digest::of(Algorithm::Sha512, b"payload");
    s.put_stream(repo(), &d512, Some(7), body(vec![b"pay".to_vec(), b"load".to_vec()])).await.unwrap();
    assert_eq!(s.stat(&d512), Some(7));
    // session hashed sha256 but client finishes with sha512: verified by re-hashing
    let id = s.start_upload(repo(), Algorithm::Sha256, None).unwrap();
    s.append(&id, None, None, body(vec![b"other".to_vec()])).await.unwrap();
    let d = Digest::of(Algorithm::Sha512, b"other");
    s.finish(&id, &d).await.unwrap();
    assert_eq!(s.stat(&d), Some(5));
}

#[tokio::test]
async fn size_mismatch_and_body_error_keep_consistent_offset() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let id = s.start_upload(repo(), Algorithm::Sha256, None).unwrap();
    let failing = stream::iter(vec![Ok(Bytes::from_static(b"abc")), Err(std::io::Error::other("client went away"))]);
    let e = s.append(&id, Some(0), None, failing).await.unwrap_err();
    assert!(matches!(e, BlobError::Body(_)));
    assert_eq!(s.upload_status(&id).unwrap().size, 3, "received prefix is kept");
    s.append(&id, Some(3), None, body(vec![b"def".to_vec()])).await.unwrap();
    s.finish(&id, &Digest::sha256(b"abcdef")).await.unwrap();
}

#[tokio::test]
async fn reopening_discards_sessions_but_keeps_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let d = Digest::sha256(b"kept");
    let id = {
        let s = store(dir.path());
        s.put_stream(repo(), &d, None, body(vec![b"kept".to_vec()])).await.unwrap();
        let id = s.start_upload(repo(), Algorithm::Sha256, None).unwrap();
        s.append(&id, None, None, body(vec![b"partial".to_vec()])).await.unwrap();
        std::mem::forget(s); // simulate a crash: no destructors run
        id
    };
    let s = store(dir.path());
    assert_eq!(s.stat(&d), Some(4));
    assert!(matches!(s.upload_status(&id), Err(BlobError::UploadUnknown)));
    assert_eq!(std::fs::read_dir(dir.path().join("uploads")).unwrap().count(), 0);
}

#[tokio::test]
async fn expire_and_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let id = s.start_upload(repo(), Algorithm::Sha256, None).unwrap();
    assert_eq!(s.expire_uploads(std::time::Duration::from_secs(3600)), 0);
    assert_eq!(s.expire_uploads(std::time::Duration::ZERO), 1);
    assert!(!s.cancel(&id));
    let id = s.start_upload(repo(), Algorithm::Sha256, None).unwrap();
    assert!(s.cancel(&id));
    assert_eq!(s.open_uploads(), 0);
}

#[tokio::test]
async fn uploads_are_refused_below_the_free_space_reserve() {
    let dir = tempfile::tempdir().unwrap();
    let free = raftyard_blobstore::free_bytes(dir.path()).unwrap();
    assert!(free > 0);
    let open = |reserve| {
        BlobStore::open(BlobStoreConfig {
            min_free_bytes: reserve,
            ..BlobStoreConfig::new(dir.path().to_path_buf(), "n1")
        })
        .unwrap()
    };
    let full = open(free + (1 << 40));
    match full.start_upload(repo(), Algorithm::Sha256, None) {
        Err(BlobError::StorageFull(m)) => assert!(m.contains("reserve"), "{m}"),
        other => panic!("expected StorageFull, got {other:?}"),
    }
    let roomy = open(1);
    let id = roomy.start_upload(repo(), Algorithm::Sha256, None).unwrap();
    roomy.append(&id, None, None, body(vec![vec![1, 2, 3]])).await.unwrap();
}

/// Client sessions are capped on the node and per client; transfers between nodes are not
/// counted; a finished or cancelled session frees its place. An idle session holds no file.
#[tokio::test]
async fn upload_sessions_are_capped_per_node_and_per_client() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = BlobStoreConfig {
        max_sessions: 5,
        max_sessions_per_client: 3,
        ..BlobStoreConfig::new(dir.path().to_path_buf(), "n1")
    };
    let s = BlobStore::open(cfg).unwrap();
    let a: Vec<String> = (0..3).map(|_| s.start_upload(repo(), Algorithm::Sha256, Some("10.0.0.1")).unwrap()).collect();
    assert!(matches!(s.start_upload(repo(), Algorithm::Sha256, Some("10.0.0.1")), Err(BlobError::TooManyUploads(_))));
    // idle sessions hold no file until their first data
    assert_eq!(std::fs::read_dir(dir.path().join("uploads")).unwrap().count(), 0);
    let _b: Vec<String> =
        (0..2).map(|_| s.start_upload(repo(), Algorithm::Sha256, Some("10.0.0.2")).unwrap()).collect();
    let e = s.start_upload(repo(), Algorithm::Sha256, Some("10.0.0.3")).unwrap_err();
    assert!(matches!(&e, BlobError::TooManyUploads(m) if m.contains("node")), "{e:?}");
    // transfers between nodes go on
    let peer = s.start_upload(repo(), Algorithm::Sha256, None).unwrap();
    s.cancel(&peer);
    // a finished and a cancelled session free two places
    s.append(&a[0], None, None, body(vec![b"x".to_vec()])).await.unwrap();
    s.finish(&a[0], &Digest::sha256(b"x")).await.unwrap();
    s.cancel(&a[1]);
    s.start_upload(repo(), Algorithm::Sha256, Some("10.0.0.3")).unwrap();
    s.start_upload(repo(), Algorithm::Sha256, Some("10.0.0.1")).unwrap();
}

/// A request dropped while it writes (a client timeout, an HTTP/2 stream reset) leaves the
/// session whole: the bytes its disk thread wrote and their hash stay together, and the upload
/// goes on from there.
#[tokio::test]
async fn a_write_dropped_midway_keeps_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(store(dir.path()));
    let id = s.start_upload(repo(), Algorithm::Sha256, None).unwrap();
    let first = vec![5u8; 3 << 20];
    // a body that delivers 3 MiB, then never ends
    let stalled = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(first.clone()))])
        .chain(futures::stream::pending());
    let write = {
        let (s, id) = (s.clone(), id.clone());
        tokio::spawn(async move { s.append(&id, Some(0), None, Box::pin(stalled)).await })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while s.upload_status(&id).map(|st| st.size).unwrap_or(0) < first.len() as u64 {
        assert!(std::time::Instant::now() < deadline, "the first bytes never arrived");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    write.abort();
    let _ = write.await;
    // the session is there, with what was written, and takes the rest
    let size = s.upload_status(&id).unwrap().size;
    assert_eq!(size, first.len() as u64);
    let rest = b"and the rest".to_vec();
    s.append(&id, Some(size), None, body(vec![rest.clone()])).await.unwrap();
    let mut all = first;
    all.extend(rest);
    s.finish(&id, &Digest::sha256(&all)).await.unwrap();
    assert_eq!(s.stat(&Digest::sha256(&all)), Some(all.len() as u64));
}

/// A whole-blob write whose caller gives up midway (a client timeout during a read-through
/// fetch) leaves no session and no file behind.
#[tokio::test]
async fn an_abandoned_put_stream_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(store(dir.path()));
    let data = vec![3u8; 2 << 20];
    let stalled = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(data.clone()))])
        .chain(futures::stream::pending());
    let put = {
        let s = s.clone();
        tokio::spawn(async move { s.put_stream(repo(), &Digest::sha256(&data), None, Box::pin(stalled)).await })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while s.open_uploads() == 0 || std::fs::read_dir(dir.path().join("uploads")).unwrap().count() == 0 {
        assert!(std::time::Instant::now() < deadline, "the write never started");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    put.abort();
    let _ = put.await;
    assert_eq!(s.open_uploads(), 0, "no session left");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::fs::read_dir(dir.path().join("uploads")).unwrap().count() > 0 {
        assert!(std::time::Instant::now() < deadline, "the partial file stays");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Makes a blob file look written `secs` ago.
fn age(s: &BlobStore, d: &Digest, secs: u64) {
    let f = std::fs::File::options().write(true).open(s.path_of(d)).unwrap();
    f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(secs)).unwrap();
}

async fn put(s: &BlobStore, data: &[u8]) -> Digest {
    let d = Digest::sha256(data);
    s.put_stream(repo(), &d, None, body(vec![data.to_vec()])).await.unwrap();
    d
}

/// A sweep removes old unlinked files only: linked, young and pinned ones stay, and a file
/// committed again (an upload of a blob already here) or found present by a peer's push is
/// young again.
#[tokio::test]
async fn a_sweep_removes_old_unlinked_files_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let [linked, old, young, pinned, recommitted, peer] =
        [b"linked".as_slice(), b"old", b"young", b"pinned", b"recommitted", b"peer"];
    let linked = put(&s, linked).await;
    let old = put(&s, old).await;
    let young = put(&s, young).await;
    let pinned = put(&s, pinned).await;
    let recommitted_d = put(&s, recommitted).await;
    let peer = put(&s, peer).await;
    for d in [&linked, &old, &pinned, &recommitted_d, &peer] {
        age(&s, d, 3600);
    }
    let _pin = s.pin(&pinned);
    assert_eq!(put(&s, recommitted).await, recommitted_d);
    assert_eq!(s.durable_stat(&peer).unwrap(), Some(4));
    let is_linked = |d: &Digest| Ok(d == &linked);
    let r = s.sweep(is_linked, std::time::Duration::from_secs(60)).unwrap();
    assert_eq!((r.files, r.removed, r.bytes, r.young.len()), (6, 1, 3, 4), "{r:?}");
    assert_eq!(s.stat(&old), None);
    for d in [&linked, &young, &pinned, &recommitted_d, &peer] {
        assert!(s.stat(d).is_some(), "{d} kept");
    }
    assert_eq!(s.usage().unwrap(), (5, 6 + 5 + 6 + 11 + 4));
    // pins are counted: the file goes once the last one drops and it is old
    let second = s.pin(&pinned);
    drop(_pin);
    assert_eq!(s.sweep(is_linked, std::time::Duration::from_secs(60)).unwrap().removed, 0);
    drop(second);
    let r = s.sweep_only(std::slice::from_ref(&pinned), is_linked, std::time::Duration::from_secs(60)).unwrap();
    assert_eq!((r.files, r.removed), (1, 1));
    assert_eq!(s.stat(&pinned), None);
    // a copy taken from a peer is held until released, however old its file
    let held = put(&s, b"held").await;
    age(&s, &held, 7200);
    s.hold(&held);
    assert_eq!(
        s.sweep_only(std::slice::from_ref(&held), is_linked, std::time::Duration::from_secs(60)).unwrap().removed,
        0
    );
    s.release(&held);
    assert_eq!(
        s.sweep_only(std::slice::from_ref(&held), is_linked, std::time::Duration::from_secs(60)).unwrap().removed,
        1
    );
}
