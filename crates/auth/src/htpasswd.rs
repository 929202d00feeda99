//! An htpasswd file (`user:hash` lines, bcrypt as `htpasswd -B` writes them; argon2 PHC
//! strings too), reloaded when it changes. Other hash formats (MD5, SHA-1, crypt) are refused
//! at load, as Distribution refuses them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// How often the file's modification time is looked at.
const RECHECK: Duration = Duration::from_secs(1);

pub struct Htpasswd {
    path: PathBuf,
    inner: Mutex<Loaded>,
}

struct Loaded {
    users: HashMap<String, String>,
    stamp: Option<(SystemTime, u64)>,
    checked: Instant,
}

/// Parses the file's text; lines that are empty or start with `#` are skipped.
pub fn parse(text: &str) -> Result<HashMap<String, String>, String> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            return Err(format!("line {}: not user:hash", i + 1));
        };
        if !crate::password::well_formed(hash) {
            return Err(format!(
                "line {} (user {user:?}): only bcrypt (htpasswd -B) or argon2 hashes are accepted",
                i + 1
            ));
        }
        users.insert(user.to_string(), hash.to_string());
    }
    Ok(users)
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Htpasswd {
    /// Loads the file; a missing or malformed file is an error at start.
    pub fn open(path: &Path) -> Result<Htpasswd, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let users = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Htpasswd {
            path: path.to_path_buf(),
            inner: Mutex::new(Loaded { users, stamp: stamp(path), checked: Instant::now() }),
        })
    }

    /// The stored hash of `user`, reloading the file first if it changed. A file that became
    /// unreadable or malformed keeps the last good contents (and says so in the log).
    /// Returns whether the file was reloaded too (verified credentials must be forgotten).
    pub fn lookup(&self, user: &str) -> (Option<String>, bool) {
        let mut l = self.inner.lock().expect("htpasswd lock");
        let mut reloaded = false;
        if l.checked.elapsed() >= RECHECK {
            l.checked = Instant::now();
            let now = stamp(&self.path);
            if now != l.stamp {
                match std::fs::read_to_string(&self.path).map_err(|e| e.to_string()).and_then(|t| parse(&t)) {
                    Ok(users) => {
                        tracing::info!(path = %self.path.display(), users = users.len(), "htpasswd file reloaded");
                        l.users = users;
                        l.stamp = now;
                        reloaded = true;
                    }
                    Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "htpasswd file not reloaded"),
                }
            }
        }
        (l.users.get(user).cloned(), reloaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("htpasswd");
        let h = bcrypt::hash("pw", 4).unwrap();
        std::fs::write(&p, format!("# users\nalice:{h}\n")).unwrap();
        let f = Htpasswd::open(&p).unwrap();
        assert_eq!(f.lookup("alice").0.as_deref(), Some(h.as_str()));
        assert!(f.lookup("bob").0.is_none());
        std::fs::write(&p, format!("bob:{h}\nalice2:{h}\n")).unwrap();
        f.inner.lock().unwrap().checked -= RECHECK;
        let (bob, reloaded) = f.lookup("bob");
        assert!(bob.is_some() && reloaded);
        assert!(f.lookup("alice").0.is_none());
        assert!(parse("carol:{SHA}abc").is_err(), "SHA-1 entries are refused");
        assert!(parse("no-colon").is_err());
    }
}
