use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use raftyard_types::{Algorithm, Digest, Hasher, RepoName};
use tracing::{debug, warn};

use crate::upload::{write_stream, Session, SpaceCheck, UploadStatus};
use crate::{BlobError, Result};

/// Settings of the blob store.
#[derive(Debug, Clone)]
pub struct BlobStoreConfig {
    /// Directory holding `blobs/` and `uploads/`.
    pub root: PathBuf,
    /// Prefix of upload session ids: names the node that owns a session.
    pub owner: String,
    /// fsync files and directories before a blob is acknowledged. Only tests turn this off.
    pub fsync: bool,
    /// Upload data is refused while the filesystem has less free space than this: the reserve
    /// keeps room for the metadata log, so a disk filled by blobs does not stop the node.
    pub min_free_bytes: u64,
    /// Upload sessions of clients open at once on this node (0: no limit); past it a new one is
    /// refused with [`BlobError::TooManyUploads`]. Transfers between nodes are not counted.
    pub max_sessions: usize,
    /// The same, per client (0: no limit).
    pub max_sessions_per_client: usize,
}

impl BlobStoreConfig {
    /// A store under `root` whose session ids start with `owner`: fsync on, no reserve, no
    /// caps on sessions.
    pub fn new(root: PathBuf, owner: impl Into<String>) -> Self {
        BlobStoreConfig {
            root,
            owner: owner.into(),
            fsync: true,
            min_free_bytes: 0,
            max_sessions: 0,
            max_sessions_per_client: 0,
        }
    }
}

/// Content-addressed blob files plus the upload sessions of this node.
pub struct BlobStore {
    cfg: BlobStoreConfig,
    blobs: PathBuf,
    uploads: PathBuf,
    sessions: Mutex<HashMap<String, Entry>>,
    /// Held while a blob file is committed or touched, and while the sweep looks at a file and
    /// removes it: a file the sweep finds old cannot become a fresh commit under it.
    files: Arc<Mutex<()>>,
    /// Blobs this node committed and has not linked yet (see [`BlobStore::pin`]).
    pins: Arc<Mutex<HashMap<Digest, usize>>>,
    /// Copies taken from peers' uploads, until when they are kept (see [`BlobStore::hold`]).
    holds: Mutex<HashMap<Digest, Instant>>,
}

/// How long a copy taken from a peer's upload is kept from sweeps at most, waiting for its link
/// to apply here: far longer than any write quorum and proposal take.
pub const PEER_COPY_HOLD: Duration = Duration::from_secs(3600);

/// What a sweep of the blob files did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Files removed, and their bytes.
    pub removed: u64,
    pub bytes: u64,
    /// Unlinked files kept because they were written or used too recently (or are pinned or
    /// held).
    pub young: Vec<Digest>,
    /// Files looked at.
    pub files: u64,
}

/// Keeps a blob's file from any sweep while it lives (see [`BlobStore::pin`]).
pub struct BlobPin {
    pins: Arc<Mutex<HashMap<Digest, usize>>>,
    digest: Digest,
}

impl Drop for BlobPin {
    fn drop(&mut self) {
        let mut pins = self.pins.lock().unwrap();
        if let Some(n) = pins.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.digest);
            }
        }
    }
}

/// One upload session, the client that started it (`None`: a transfer between nodes), and
/// what its status needs, readable while a request writes to it.
struct Entry {
    session: Arc<tokio::sync::Mutex<Session>>,
    client: Option<String>,
    status: (RepoName, Algorithm, Arc<std::sync::atomic::AtomicU64>),
}

/// Bytes available to an unprivileged writer on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Size of the filesystem holding `path`: (total bytes, bytes free to an unprivileged writer,
/// bytes in use).
pub fn disk_space(path: &Path) -> io::Result<(u64, u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let f = st.f_frsize as u64;
    let total = st.f_blocks as u64 * f;
    Ok((total, st.f_bavail as u64 * f, total.saturating_sub(st.f_bfree as u64 * f)))
}

pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl BlobStore {
    /// Opens (creating if needed) the store. Upload sessions of a previous run are discarded:
    /// their hashing state lived in memory, and clients restart interrupted uploads.
    pub fn open(cfg: BlobStoreConfig) -> Result<Self> {
        let blobs = cfg.root.join("blobs");
        let uploads = cfg.root.join("uploads");
        fs::create_dir_all(&cfg.root)?;
        if uploads.exists() {
            fs::remove_dir_all(&uploads)?;
        }
        fs::create_dir_all(&uploads)?;
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            let a = blobs.join(alg.as_str());
            let fresh = !a.exists();
            for i in 0..=255u8 {
                fs::create_dir_all(a.join(format!("{i:02x}")))?;
            }
            if fresh && cfg.fsync {
                fsync_dir(&a)?;
            }
        }
        if cfg.fsync {
            fsync_dir(&blobs)?;
            fsync_dir(&cfg.root)?;
        }
        Ok(BlobStore {
            cfg,
            blobs,
            uploads,
            sessions: Mutex::new(HashMap::new()),
            files: Default::default(),
            pins: Default::default(),
            holds: Default::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.cfg.root
    }

    /// Where the blob with this digest lives (whether or not it exists).
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs.join(digest.algorithm().as_str()).join(&hex[..2]).join(hex)
    }

    /// Size of the blob if this node holds it.
    pub fn stat(&self, digest: &Digest) -> Option<u64> {
        fs::metadata(self.path_of(digest)).ok().map(|m| m.len())
    }

    /// The size of a held blob once it is durable: its directory entry is synced (its bytes
    /// were before it got its name), so a blob found present may be acknowledged as stored. The
    /// file counts as just written: a sweep leaves it alone while its link is on the way.
    pub fn durable_stat(&self, digest: &Digest) -> Result<Option<u64>> {
        let size = {
            let _files = self.files.lock().unwrap();
            let Some(size) = self.stat(digest) else { return Ok(None) };
            touch(&self.path_of(digest))?;
            size
        };
        if self.cfg.fsync {
            fsync_dir(self.path_of(digest).parent().expect("blob path has a parent"))?;
        }
        Ok(Some(size))
    }

    /// Opens a held blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<(File, u64)> {
        match File::open(self.path_of(digest)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok((f, len))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(BlobError::BlobUnknown),
            Err(e) => Err(e.into()),
        }
    }

    /// Keeps the file of `digest` from any sweep until the pin drops: taken before an upload
    /// commits a blob and held until its link is applied (a write quorum may take a while).
    pub fn pin(&self, digest: &Digest) -> BlobPin {
        *self.pins.lock().unwrap().entry(digest.clone()).or_insert(0) += 1;
        BlobPin { pins: self.pins.clone(), digest: digest.clone() }
    }

    /// Keeps the file of `digest` from any sweep until [`BlobStore::release`] or
    /// [`PEER_COPY_HOLD`] passes: a copy this node took from a peer's upload (a replica, a
    /// push), counted in the upload's write quorum before its link is applied here.
    pub fn hold(&self, digest: &Digest) {
        self.holds.lock().unwrap().insert(digest.clone(), Instant::now() + PEER_COPY_HOLD);
    }

    /// Ends [`BlobStore::hold`]: the blob is linked in this node's state now (what keeps a
    /// linked blob's file from any sweep).
    pub fn release(&self, digest: &Digest) {
        self.holds.lock().unwrap().remove(digest);
    }

    /// Removes the blob files that `linked` says no repository links, unless pinned, held, or
    /// written (or found present by a peer's push) less than `min_age` ago. Blocking: walks
    /// every file. `linked` is asked before the file is looked at: a blob linked after that
    /// comes from an upload, whose file is fresh (commits and the look at a file exclude each
    /// other). The report names the files kept young, for [`BlobStore::sweep_only`] later.
    pub fn sweep(&self, linked: impl Fn(&Digest) -> io::Result<bool>, min_age: Duration) -> Result<SweepReport> {
        let mut report = SweepReport::default();
        self.holds.lock().unwrap().retain(|_, until| *until > Instant::now());
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = self.blobs.join(alg.as_str());
            for i in 0..=255u8 {
                let sub = dir.join(format!("{i:02x}"));
                let entries = match fs::read_dir(&sub) {
                    Ok(e) => e,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                };
                let mut removed_here = false;
                for entry in entries {
                    let name = entry?.file_name();
                    let Ok(d) = Digest::parse(&format!("{}:{}", alg.as_str(), name.to_string_lossy())) else {
                        continue;
                    };
                    removed_here |= self.consider(&d, &linked, min_age, &mut report)?;
                }
                if removed_here && self.cfg.fsync {
                    fsync_dir(&sub)?;
                }
            }
        }
        Ok(report)
    }

    /// [`BlobStore::sweep`] of these blobs only (those an earlier sweep kept young).
    pub fn sweep_only(
        &self,
        digests: &[Digest],
        linked: impl Fn(&Digest) -> io::Result<bool>,
        min_age: Duration,
    ) -> Result<SweepReport> {
        let mut report = SweepReport::default();
        self.holds.lock().unwrap().retain(|_, until| *until > Instant::now());
        for d in digests {
            if self.consider(d, &linked, min_age, &mut report)? && self.cfg.fsync {
                fsync_dir(self.path_of(d).parent().expect("blob path has a parent"))?;
            }
        }
        Ok(report)
    }

    /// One file of a sweep: removed (true) if no repository links it and nothing keeps it.
    fn consider(
        &self,
        d: &Digest,
        linked: &impl Fn(&Digest) -> io::Result<bool>,
        min_age: Duration,
        report: &mut SweepReport,
    ) -> Result<bool> {
        let path = self.path_of(d);
        if !path.exists() {
            return Ok(false);
        }
        report.files += 1;
        if linked(d)? {
            return Ok(false);
        }
        let kept = self.pins.lock().unwrap().contains_key(d) || self.holds.lock().unwrap().contains_key(d);
        let _files = self.files.lock().unwrap();
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let age = meta.modified().ok().and_then(|t| t.elapsed().ok()).unwrap_or_default();
        if kept || age < min_age {
            report.young.push(d.clone());
            return Ok(false);
        }
        fs::remove_file(&path)?;
        report.removed += 1;
        report.bytes += meta.len();
        Ok(true)
    }

    /// The blob files this node holds: how many, and their bytes. Blocking: walks every file.
    pub fn usage(&self) -> Result<(u64, u64)> {
        let (mut files, mut bytes) = (0, 0);
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            for i in 0..=255u8 {
                let sub = self.blobs.join(alg.as_str()).join(format!("{i:02x}"));
                let Ok(entries) = fs::read_dir(&sub) else { continue };
                for entry in entries.flatten() {
                    if let Ok(m) = entry.metadata() {
                        files += 1;
                        bytes += m.len();
                    }
                }
            }
        }
        Ok((files, bytes))
    }

    /// Deletes the local copy of a blob (garbage collection). Missing is fine.
    pub fn remove_blob(&self, digest: &Digest) -> Result<()> {
        match fs::remove_file(self.path_of(digest)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Fails with [`BlobError::StorageFull`] while free space is below the reserve.
    pub fn check_space(&self) -> Result<()> {
        self.space_check().map_or(Ok(()), |c| c.check())
    }

    /// The free-space reserve writes must leave, if one is configured.
    fn space_check(&self) -> Option<SpaceCheck> {
        (self.cfg.min_free_bytes > 0)
            .then(|| SpaceCheck { root: self.cfg.root.clone(), min_free: self.cfg.min_free_bytes })
    }

    /// Starts an upload session for `repo`, hashing with `algorithm`, for `client` (a
    /// client's address; `None` for a transfer between nodes, which no cap counts). Past the
    /// caps of open client sessions, on the node or for this client, it is refused.
    pub fn start_upload(&self, repo: RepoName, algorithm: Algorithm, client: Option<&str>) -> Result<String> {
        self.check_space()?;
        let id = format!("{}-{}", self.cfg.owner, random_hex(16));
        let session = Session::new(repo, self.uploads.join(&id), algorithm);
        let mut sessions = self.sessions.lock().unwrap();
        if let Some(c) = client {
            let (mut all, mut mine) = (0, 0);
            for e in sessions.values() {
                if let Some(other) = &e.client {
                    all += 1;
                    mine += usize::from(other == c);
                }
            }
            let cap = |n: usize| n > 0;
            if cap(self.cfg.max_sessions) && all >= self.cfg.max_sessions {
                return Err(BlobError::TooManyUploads(format!(
                    "{all} upload sessions are open on this node, its limit"
                )));
            }
            if cap(self.cfg.max_sessions_per_client) && mine >= self.cfg.max_sessions_per_client {
                return Err(BlobError::TooManyUploads(format!(
                    "{mine} upload sessions of this client are open, its limit: finish or cancel some"
                )));
            }
        }
        let status = (session.repo.clone(), algorithm, session.received.clone());
        let entry =
            Entry { session: Arc::new(tokio::sync::Mutex::new(session)), client: client.map(str::to_string), status };
        sessions.insert(id.clone(), entry);
        debug!(upload = %id, "upload started");
        Ok(id)
    }

    fn session(&self, id: &str) -> Result<Arc<tokio::sync::Mutex<Session>>> {
        self.sessions.lock().unwrap().get(id).map(|e| e.session.clone()).ok_or(BlobError::UploadUnknown)
    }

    fn remove_session(&self, id: &str) -> Option<Arc<tokio::sync::Mutex<Session>>> {
        self.sessions.lock().unwrap().remove(id).map(|e| e.session)
    }

    fn lock(&self, id: &str) -> Result<tokio::sync::OwnedMutexGuard<Session>> {
        self.session(id)?.try_lock_owned().map_err(|_| BlobError::UploadBusy)
    }

    /// The repository, algorithm and bytes received of an upload session (also while a
    /// request writes to it).
    pub fn upload_status(&self, id: &str) -> Result<UploadStatus> {
        let sessions = self.sessions.lock().unwrap();
        let (repo, algorithm, received) = &sessions.get(id).ok_or(BlobError::UploadUnknown)?.status;
        Ok(UploadStatus {
            id: id.to_string(),
            repo: repo.clone(),
            algorithm: *algorithm,
            size: received.load(std::sync::atomic::Ordering::Acquire),
        })
    }

    /// Appends a request body to a session. `start`, when given (a `Content-Range`), must equal
    /// the bytes already received, else [`BlobError::RangeInvalid`]. `len`, when given, is the
    /// number of bytes the body must carry. On a body error the bytes received so far stay in the
    /// session (file and hash agree), and the status reports them.
    pub async fn append<S, E>(&self, id: &str, start: Option<u64>, len: Option<u64>, body: S) -> Result<u64>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        let mut s = self.lock(id)?;
        self.check_space()?;
        // waits for the disk thread of an earlier request that was dropped midway
        let w = s.written.clone().lock_owned().await;
        let before = w.size;
        if let Some(start) = start {
            if start != before {
                return Err(BlobError::RangeInvalid { size: before });
            }
        }
        s.last_active = Instant::now();
        let (written, result) = write_stream(s.path.clone(), w, s.received.clone(), self.space_check(), body).await;
        s.last_active = Instant::now();
        result?;
        if let Some(len) = len {
            if written != len {
                return Err(BlobError::SizeInvalid { expected: len, actual: written });
            }
        }
        debug!(upload = %id, from = before, to = before + written, "chunk appended");
        Ok(before + written)
    }

    /// Completes a session: verifies `expected` against what was hashed while streaming, then
    /// makes the blob durable under its digest. The session is gone afterwards, whatever the
    /// outcome (a digest mismatch discards the data).
    pub async fn finish(&self, id: &str, expected: &Digest) -> Result<(RepoName, u64)> {
        let session = self.lock(id)?;
        self.remove_session(id);
        let mut w = session.written.clone().lock_owned().await;
        let hasher = std::mem::replace(&mut w.hasher, session.algorithm.hasher());
        let size = w.size;
        let repo = session.repo.clone();
        let path = session.path.clone();
        let target = self.path_of(expected);
        let fsync = self.cfg.fsync;
        let expected = expected.clone();
        let files = self.files.clone();
        let res = tokio::task::spawn_blocking(move || -> Result<()> {
            // the session lives until the file is committed: dropping it removes the file, and
            // a request dropped meanwhile must not have it removed under this commit
            let _session = session;
            let file = match size {
                // an empty upload never wrote: its file is made here
                0 => crate::upload::open_for_write(&path, 0)?,
                // the file holds exactly the hashed bytes, or it is not committed
                _ => {
                    let f = File::options().write(true).open(&path)?;
                    let len = f.metadata()?.len();
                    if len != size {
                        return Err(BlobError::Io(io::Error::other(format!(
                            "upload file holds {len} bytes, {size} were hashed"
                        ))));
                    }
                    f
                }
            };
            let actual = if hasher.algorithm() == expected.algorithm() {
                hasher.finish()
            } else {
                // The client hashed with another algorithm than the session announced.
                hash_file(&path, expected.algorithm())?
            };
            if actual != expected {
                let _ = fs::remove_file(&path);
                return Err(BlobError::DigestInvalid { expected, actual });
            }
            commit_file(file, &path, &target, fsync, &files)
        })
        .await
        .map_err(|e| BlobError::Io(io::Error::other(e)))?;
        res.map(|()| (repo, size))
    }

    /// Stores a whole blob from one stream (monolithic upload, replication from a peer).
    pub async fn put_stream<S, E>(&self, repo: RepoName, expected: &Digest, len: Option<u64>, body: S) -> Result<u64>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        let id = self.start_upload(repo, expected.algorithm(), None)?;
        // a caller that gives up midway (a client timeout during a read-through fetch) leaves
        // no session behind: nobody else knows its id
        let guard = CancelOnDrop { store: self, id: &id };
        self.append(&id, None, len, body).await?;
        let size = self.finish(&id, expected).await?.1;
        std::mem::forget(guard);
        Ok(size)
    }

    /// Cancels a session and frees its space. Unknown ids are ignored.
    pub fn cancel(&self, id: &str) -> bool {
        if let Some(s) = self.remove_session(id) {
            if let Ok(s) = s.try_lock() {
                let _ = fs::remove_file(&s.path);
            } else {
                // A request is still writing; its temp file is removed when the session drops.
                debug!(upload = %id, "cancelled while busy");
            }
            true
        } else {
            false
        }
    }

    /// Number of open upload sessions.
    pub fn open_uploads(&self) -> usize {
        self.sessions.lock().unwrap().len()
    }

    /// Discards sessions idle for longer than `max_idle`. Returns how many were removed.
    pub fn expire_uploads(&self, max_idle: Duration) -> usize {
        let now = Instant::now();
        let ids: Vec<String> = {
            let map = self.sessions.lock().unwrap();
            map.iter()
                .filter(|(_, e)| {
                    e.session.try_lock().map(|s| now.duration_since(s.last_active) > max_idle).unwrap_or(false)
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in &ids {
            warn!(upload = %id, "upload session expired");
            self.cancel(id);
        }
        ids.len()
    }
}

/// Cancels an internal upload session when dropped (forgotten once the session finished).
struct CancelOnDrop<'a> {
    store: &'a BlobStore,
    id: &'a str,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        self.store.cancel(self.id);
    }
}

fn hash_file(path: &Path, alg: Algorithm) -> Result<Digest> {
    use std::io::Read;
    let mut f = File::open(path)?;
    let mut h: Hasher = alg.hasher();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

/// Marks a blob file as just written (sweeps keep young files).
fn touch(path: &Path) -> io::Result<()> {
    File::options().write(true).open(path)?.set_modified(std::time::SystemTime::now())
}

/// fsync the file, rename it under its digest, fsync the directory. If the digest already
/// exists the new copy is dropped: content addressing makes them identical. Either way the
/// committed file counts as just written, under `files` (see [`BlobStore::sweep`]).
fn commit_file(file: File, tmp: &Path, target: &Path, fsync: bool, files: &Mutex<()>) -> Result<()> {
    if fsync {
        file.sync_all()?;
    }
    {
        let _files = files.lock().unwrap();
        if target.exists() {
            drop(file);
            touch(target)?;
            fs::remove_file(tmp)?;
        } else {
            file.set_modified(std::time::SystemTime::now())?;
            drop(file);
            fs::rename(tmp, target)?;
        }
    }
    // also when the file was there already: a concurrent commit of the same digest may have
    // renamed it without its directory synced yet, and this commit is about to be acknowledged
    if fsync {
        fsync_dir(target.parent().expect("blob path has a parent"))?;
    }
    Ok(())
}

pub(crate) fn random_hex(bytes: usize) -> String {
    use rand::RngCore;
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}
