//! A reserve of disk space for the metadata log: a ballast file, allocated while there is
//! room and released when the disk is nearly full, so that the metadata can still be written
//! (and a node that stopped on a full disk can start again and catch up) while blob writes are
//! refused. Blobs are refused first, from `min_free_bytes` (see [`crate::BlobStoreConfig`]);
//! the reserve is the last room on the disk, and only the metadata uses it.

use std::fs::File;
use std::io;
use std::path::PathBuf;

use tracing::{info, warn};

use crate::store::free_bytes;

/// What to do with the reserve, given the free space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Keep,
    /// Free space is below `low`: give the reserve's room to the metadata.
    Release,
    /// The reserve is gone and there is room again: allocate it.
    Make,
}

/// The policy, on its own: release the reserve below `low` free bytes; make it again once the
/// free space would stay above `low + size` after it (room came back, with a margin so that
/// it does not flap).
pub fn decide(free: u64, present: bool, size: u64, low: u64) -> Action {
    match present {
        true if free < low => Action::Release,
        false if free >= low.saturating_mul(2).saturating_add(size) => Action::Make,
        _ => Action::Keep,
    }
}

/// The ballast file of one data directory.
pub struct Reserve {
    path: PathBuf,
    size: u64,
    low: u64,
}

impl Reserve {
    /// A reserve of `size` bytes at `path`, released when the filesystem has fewer than `low`
    /// bytes free. `size` 0 keeps none.
    pub fn new(path: PathBuf, size: u64, low: u64) -> Self {
        Reserve { path, size, low }
    }

    /// Whether the reserve is allocated now.
    pub fn present(&self) -> bool {
        self.path.exists()
    }

    /// Applies the policy to the current free space; returns what it did.
    pub fn adjust(&self) -> io::Result<Action> {
        if self.size == 0 {
            return Ok(Action::Keep);
        }
        let dir = self.path.parent().expect("the reserve lives in a directory");
        let action = decide(free_bytes(dir)?, self.present(), self.size, self.low);
        match action {
            Action::Keep => {}
            Action::Release => {
                std::fs::remove_file(&self.path)?;
                warn!(
                    path = %self.path.display(),
                    mib = self.size >> 20,
                    "the disk is nearly full: released the metadata reserve"
                );
            }
            Action::Make => {
                if let Err(e) = allocate(&self.path, self.size) {
                    let _ = std::fs::remove_file(&self.path);
                    return Err(e);
                }
                info!(path = %self.path.display(), mib = self.size >> 20, "metadata reserve in place");
            }
        }
        Ok(action)
    }
}

/// Allocates `size` bytes of real blocks (not a sparse file) at `path`, durably.
fn allocate(path: &std::path::Path, size: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let tmp = path.with_extension("new");
    let f = File::create(&tmp)?;
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, size as libc::off_t) };
    if r != 0 {
        let _ = std::fs::remove_file(&tmp);
        return Err(io::Error::from_raw_os_error(r));
    }
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    crate::store::fsync_dir(path.parent().expect("a parent"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_when_short_made_again_with_room_to_spare() {
        let (size, low) = (64, 16);
        assert_eq!(decide(100, true, size, low), Action::Keep);
        assert_eq!(decide(15, true, size, low), Action::Release);
        // just above low: not yet made again (it would take the room back at once)
        assert_eq!(decide(20, false, size, low), Action::Keep);
        assert_eq!(decide(95, false, size, low), Action::Keep);
        assert_eq!(decide(96, false, size, low), Action::Make);
    }

    #[test]
    fn the_reserve_takes_real_blocks_and_goes_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta-reserve");
        let r = Reserve::new(path.clone(), 4 << 20, 1 << 20);
        assert_eq!(r.adjust().unwrap(), Action::Make);
        assert!(r.present());
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.len(), 4 << 20);
        assert!(m.blocks() * 512 >= 4 << 20, "allocated, not sparse: {} blocks", m.blocks());
        assert_eq!(r.adjust().unwrap(), Action::Keep);
        // a reserve larger than the disk is never made
        let huge = Reserve::new(dir.path().join("huge"), u64::MAX / 4, 1 << 20);
        assert_eq!(huge.adjust().unwrap(), Action::Keep);
        assert!(!huge.present());
    }
}
