//! What a node's metadata storage holds, part by part: the Raft log, the state by key prefix
//! (tags, manifests, links, journal, ...), the snapshot, and the files on disk, so that bytes
//! per image can be told apart by where they go. Reads a stopped node's storage (sled takes
//! its directory's lock: a running node's is refused).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::node::StartError;

/// Entries and bytes (keys and values) of one part.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Part {
    pub part: String,
    pub what: &'static str,
    pub entries: u64,
    pub key_bytes: u64,
    pub value_bytes: u64,
}

/// The parts, the files on disk and the number of manifests held.
#[derive(Debug, Clone, Serialize)]
pub struct MetaSize {
    pub parts: Vec<Part>,
    /// Files under the storage directory (the sled database, snapshot data), bytes.
    pub files: BTreeMap<String, u64>,
    /// Manifests in the state (`M/` entries).
    pub manifests: u64,
}

impl MetaSize {
    /// Bytes of keys and values of every part.
    pub fn logical_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.key_bytes + p.value_bytes).sum()
    }

    /// Bytes of every file.
    pub fn file_bytes(&self) -> u64 {
        self.files.values().sum()
    }
}

/// What each prefix of the state tree holds (`keys.rs` has the layout).
fn state_part(key: &[u8]) -> (String, &'static str) {
    let named: &[(&[u8], &str)] = &[
        (b"a/u/", "users"),
        (b"a/r/", "robot tokens"),
        (b"a/g/", "grants"),
        (b"a/", "access: keys and version"),
        (b"m/", "applied index, membership, versions"),
        (b"b/", "blob links by repository"),
        (b"B/", "blobs: size and holders"),
        (b"L/", "blob links by blob, with link times"),
        (b"M/", "manifests"),
        (b"t/", "tags"),
        (b"T/", "tag times"),
        (b"y/", "retention policies"),
        (b"u/", "repository usage"),
        (b"q/", "quotas"),
        (b"r/", "referrers index"),
        (b"f/", "reference index"),
        (b"R/", "repositories"),
        (b"j/", "journal"),
        (b"p/", "proposal ids"),
        (b"P/", "proposal ids by time"),
    ];
    match named.iter().find(|(p, _)| key.starts_with(p)) {
        Some((p, what)) => (format!("state {}", String::from_utf8_lossy(p)), *what),
        None => ("state (other)".into(), "keys of no known prefix"),
    }
}

fn tree_part(name: &str) -> &'static str {
    match name {
        "log" => "Raft log entries not yet purged",
        "raft" => "Raft vote, committed and purged ids",
        "snapshot" => "the latest snapshot's metadata",
        _ => "other tree",
    }
}

/// Measures the storage under `dir` (a node's `<data>/meta`), which must not be in use.
pub fn measure(dir: &Path) -> Result<MetaSize, StartError> {
    if !dir.join("conf").exists() && !dir.join("db").exists() {
        return Err(StartError::Storage(format!("{} holds no metadata storage", dir.display())));
    }
    let mut files = BTreeMap::new();
    for entry in walk(dir)? {
        let (path, len) = entry;
        let rel = path.strip_prefix(dir).unwrap_or(&path).display().to_string();
        files.insert(rel, len);
    }
    let db = crate::node::open_offline_db(dir, false)?;
    let mut parts: BTreeMap<String, Part> = BTreeMap::new();
    let mut manifests = 0;
    for name in db.tree_names() {
        let name = String::from_utf8_lossy(&name).to_string();
        if name == "__sled__default" {
            continue;
        }
        let tree = db.open_tree(&name)?;
        for kv in tree.iter() {
            let (k, v) = kv?;
            let is_state = crate::state::is_state_tree(name.as_bytes());
            let (part, what) = match name.as_str() {
                _ if is_state => state_part(&k),
                other => (format!("tree {other}"), tree_part(other)),
            };
            if k.starts_with(crate::keys::MANIFESTS) && is_state {
                manifests += 1;
            }
            let p = parts.entry(part.clone()).or_insert_with(|| Part { part, what, ..Part::default() });
            p.entries += 1;
            p.key_bytes += k.len() as u64;
            p.value_bytes += v.len() as u64;
        }
    }
    let mut parts: Vec<Part> = parts.into_values().collect();
    parts.sort_by_key(|p| std::cmp::Reverse(p.key_bytes + p.value_bytes));
    Ok(MetaSize { parts, files, manifests })
}

/// Every file under `dir` with its length.
fn walk(dir: &Path) -> std::io::Result<Vec<(std::path::PathBuf, u64)>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let meta = e.metadata()?;
            if meta.is_dir() {
                todo.push(e.path());
            } else {
                out.push((e.path(), meta.len()));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_keys_go_to_their_part() {
        assert_eq!(state_part(b"M/team/app\0sha256:ab").0, "state M/");
        assert_eq!(state_part(b"a/u/alice").0, "state a/u/");
        assert_eq!(state_part(b"a/keys").0, "state a/");
        assert_eq!(state_part(b"j/\0\0\0\0\0\0\0\x01").1, "journal");
        assert_eq!(state_part(b"zz").0, "state (other)");
    }
}
