//! The format of a node's data directory: `<data_dir>/FORMAT` holds `raftyard-data <N>`.
//!
//! A binary opens the formats from [`OLDEST_DATA_FORMAT`] to [`DATA_FORMAT`], upgrading older
//! ones in place (the stamp is rewritten before anything is written in the new format), and
//! refuses a newer one with an error that says so: a directory written by a newer release may
//! hold encodings this binary would misread. Bump [`DATA_FORMAT`] whenever what is written to
//! the log, the state or the blob store changes so that an older binary could not read it, and
//! keep the test fixture of every format (`crates/raftyard/tests/fixtures/`) opening.
//!
//! | format | what it added |
//! |---|---|
//! | 1 | (no `FORMAT` file) everything before the stamp |
//! | 2 | log commands `VersionedCommand::V2` (a proposal id) |
//! | 3 | log events `BlobMounted` and `Collected`; state layout 3 (the `f/` index of what manifests reference, link times in `L/`) |
//! | 4 | log events `QuotaSet`, `QuotaRemoved`; rejections `QuotaExceeded`, `QuotaUnknown`, `NeedsProtocol` in remembered outcomes; state keys `u/` (usage) and `q/` (quotas) |

use std::path::Path;

use anyhow::{bail, Context as _};

/// The format this binary writes.
pub const DATA_FORMAT: u32 = 4;
/// The oldest format this binary opens.
pub const OLDEST_DATA_FORMAT: u32 = 1;
const FILE: &str = "FORMAT";
const PREFIX: &str = "raftyard-data ";

/// The format of the data directory `data`: 1 for one without a stamp that holds data, `None`
/// for a new (empty) one.
pub fn read(data: &Path) -> anyhow::Result<Option<u32>> {
    let path = data.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let n = s
                .trim()
                .strip_prefix(PREFIX)
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("{}: not a raftyard data format stamp: {:?}", path.display(), s.trim()))?;
            Ok(Some(n))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let used = ["meta", "blobs"].iter().any(|d| data.join(d).exists());
            Ok(used.then_some(1))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Checks that this binary can open `data` and stamps it with [`DATA_FORMAT`] (durably).
pub fn open(data: &Path) -> anyhow::Result<()> {
    match read(data)? {
        Some(n) if n > DATA_FORMAT => bail!(
            "{} is in data format {n}, written by a newer raftyard; this binary reads formats \
             {OLDEST_DATA_FORMAT} to {DATA_FORMAT}: run the newer release on it",
            data.display()
        ),
        Some(n) if n < OLDEST_DATA_FORMAT => bail!(
            "{} is in data format {n}, older than this binary reads ({OLDEST_DATA_FORMAT} to \
             {DATA_FORMAT}): open it with an intermediate release first",
            data.display()
        ),
        Some(n) if n == DATA_FORMAT => return Ok(()),
        Some(n) => tracing::info!(from = n, to = DATA_FORMAT, data = %data.display(), "upgrading the data format"),
        None => {}
    }
    let tmp = data.join(format!("{FILE}.tmp"));
    std::fs::write(&tmp, format!("{PREFIX}{DATA_FORMAT}\n"))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, data.join(FILE))?;
    std::fs::File::open(data)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_old_current_and_newer_directories() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()).unwrap(), None, "empty: new");
        open(d.path()).unwrap();
        assert_eq!(read(d.path()).unwrap(), Some(DATA_FORMAT));

        let old = tempfile::tempdir().unwrap();
        std::fs::create_dir(old.path().join("meta")).unwrap();
        assert_eq!(read(old.path()).unwrap(), Some(1), "data without a stamp: format 1");
        open(old.path()).unwrap();
        assert_eq!(read(old.path()).unwrap(), Some(DATA_FORMAT), "upgraded");

        let newer = tempfile::tempdir().unwrap();
        std::fs::write(newer.path().join(FILE), format!("{PREFIX}{}\n", DATA_FORMAT + 1)).unwrap();
        let e = open(newer.path()).unwrap_err().to_string();
        assert!(e.contains("written by a newer raftyard"), "{e}");
        assert_eq!(read(newer.path()).unwrap(), Some(DATA_FORMAT + 1), "left as it was");

        std::fs::write(newer.path().join(FILE), "something else").unwrap();
        assert!(open(newer.path()).unwrap_err().to_string().contains("not a raftyard data format stamp"));
    }
}
