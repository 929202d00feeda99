//! Who may do what: the identities and grants kept in the cluster state, and the one policy
//! that turns them into allowed actions.
//!
//! Everything here is data and pure functions. Verifying a password or a token is the `auth`
//! crate's job; it ends with a [`Principal`], and [`AccessState::allowed`] says what that
//! principal may do in a repository. Identity sources outside the log (an htpasswd file,
//! LDAP) only say *who* someone is: what they may do is always a grant in the log.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A set of repository actions.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Actions(u8);

impl Actions {
    pub const NONE: Actions = Actions(0);
    pub const PULL: Actions = Actions(1);
    pub const PUSH: Actions = Actions(2);
    pub const DELETE: Actions = Actions(4);
    pub const ALL: Actions = Actions(7);

    pub fn contains(self, other: Actions) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn union(self, other: Actions) -> Actions {
        Actions(self.0 | other.0)
    }
    pub fn intersect(self, other: Actions) -> Actions {
        Actions(self.0 & other.0)
    }
    pub fn without(self, other: Actions) -> Actions {
        Actions(self.0 & !other.0)
    }

    /// `pull,push,delete` (any order, any subset) or `*` for all; unknown words are an error.
    pub fn parse(s: &str) -> Result<Actions, AccessError> {
        let mut a = Actions::NONE;
        for w in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            a = a.union(match w {
                "pull" => Actions::PULL,
                "push" => Actions::PUSH,
                "delete" => Actions::DELETE,
                "*" => Actions::ALL,
                _ => return Err(AccessError::Action(w.to_string())),
            });
        }
        Ok(a)
    }

    /// As the token `access` claim and scopes spell them, in a fixed order.
    pub fn names(self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.contains(Actions::PULL) {
            v.push("pull");
        }
        if self.contains(Actions::PUSH) {
            v.push("push");
        }
        if self.contains(Actions::DELETE) {
            v.push("delete");
        }
        v
    }

    /// Actions named in a token scope or `access` claim; unknown names are ignored (they grant
    /// nothing), as Distribution does.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Actions {
        names.into_iter().fold(Actions::NONE, |a, n| a.union(Actions::parse(n).unwrap_or(Actions::NONE)))
    }
}

impl fmt::Display for Actions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.names();
        if n.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&n.join(","))
        }
    }
}

impl fmt::Debug for Actions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error("unknown action {0:?} (pull, push, delete or *)")]
    Action(String),
    #[error("invalid repository pattern {0:?}: segments of a-z 0-9 . _ - and *, or a whole segment **")]
    Glob(String),
    #[error("invalid name {0:?}: 1-64 characters of a-z A-Z 0-9 . _ - @")]
    Name(String),
}

/// Users, groups and robot token names: short, printable, no separators of the key layout.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

/// A repository pattern: `/`-separated segments where `*` matches within one segment and a
/// whole segment `**` matches any number of segments (none included). `team/*` matches
/// `team/app` but not `team/a/b`; `team/**` matches both and `team` itself.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoGlob(String);

impl RepoGlob {
    pub fn parse(s: &str) -> Result<RepoGlob, AccessError> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.split('/').all(|seg| {
                !seg.is_empty()
                    && (seg == "**"
                        || seg.bytes().all(|b| {
                            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-' | b'*')
                        }) && !seg.contains("**"))
            });
        if ok {
            Ok(RepoGlob(s.to_string()))
        } else {
            Err(AccessError::Glob(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the pattern matches the repository name. Time is bounded by the product of the
    /// numbers of segments (and, within a segment, of characters): no backtracking blow-up,
    /// whatever the pattern and the name.
    pub fn matches(&self, repo: &str) -> bool {
        let pat: Vec<&str> = self.0.split('/').collect();
        let name: Vec<&str> = repo.split('/').collect();
        // reach[j]: the pattern's first i segments can match the name's first j segments
        let mut reach = vec![false; name.len() + 1];
        reach[0] = true;
        for p in &pat {
            let mut next = vec![false; name.len() + 1];
            if *p == "**" {
                // zero or more segments: everything at or after the first reachable point
                let mut any = false;
                for j in 0..=name.len() {
                    any |= reach[j];
                    next[j] = any;
                }
            } else {
                for j in 0..name.len() {
                    if reach[j] && match_segment(p.as_bytes(), name[j].as_bytes()) {
                        next[j + 1] = true;
                    }
                }
            }
            reach = next;
        }
        reach[name.len()]
    }
}

/// `*` matches any run of characters within the segment: the greedy algorithm with one
/// backtrack point, linear in practice and O(len(p)·len(n)) at worst.
fn match_segment(p: &[u8], n: &[u8]) -> bool {
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && p[i] == n[j] {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    while i < p.len() && p[i] == b'*' {
        i += 1;
    }
    i == p.len()
}

impl TryFrom<String> for RepoGlob {
    type Error = AccessError;
    fn try_from(s: String) -> Result<Self, AccessError> {
        RepoGlob::parse(&s)
    }
}

impl From<RepoGlob> for String {
    fn from(g: RepoGlob) -> String {
        g.0
    }
}

impl fmt::Display for RepoGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Whom a grant is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Subject {
    /// A user, whoever vouches for it: the cluster's users, the htpasswd file, LDAP.
    User(String),
    /// Every member of a group (cluster user groups, LDAP groups).
    Group(String),
    /// A robot token, by id.
    Robot(String),
    /// Everyone, credentials or not.
    Anonymous,
}

impl Subject {
    /// The subject as the key layout and the CLI spell it: `user:alice`, `group:devs`,
    /// `robot:<id>`, `anonymous`.
    pub fn key(&self) -> String {
        match self {
            Subject::User(n) => format!("user:{n}"),
            Subject::Group(n) => format!("group:{n}"),
            Subject::Robot(n) => format!("robot:{n}"),
            Subject::Anonymous => "anonymous".into(),
        }
    }

    pub fn parse_key(s: &str) -> Option<Subject> {
        if s == "anonymous" {
            return Some(Subject::Anonymous);
        }
        let (kind, name) = s.split_once(':')?;
        if !valid_name(name) {
            return None;
        }
        Some(match kind {
            "user" => Subject::User(name.into()),
            "group" => Subject::Group(name.into()),
            "robot" => Subject::Robot(name.into()),
            _ => return None,
        })
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// Actions on the repositories a pattern matches, for a subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub subject: Subject,
    pub repos: RepoGlob,
    pub actions: Actions,
}

/// A user kept in the cluster state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// A PHC string (argon2id) or a bcrypt hash; never the password.
    pub password_hash: String,
    pub admin: bool,
    pub groups: Vec<String>,
    pub created_ms: u64,
}

/// A robot token: a secret for machines (CI), with grants of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RobotRecord {
    pub name: String,
    /// SHA-256 of the secret. The secret is 256 random bits, so a fast hash is enough: there
    /// is nothing to guess.
    pub secret_sha256: Vec<u8>,
    pub expires_ms: Option<u64>,
    pub created_ms: u64,
    /// Recorded at most about once a minute per node that sees it used.
    pub last_used_ms: Option<u64>,
}

/// A key the cluster signs its tokens with: a PKCS#8 ECDSA P-256 private key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningKey {
    pub kid: String,
    pub pkcs8: Vec<u8>,
    pub created_ms: u64,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("kid", &self.kid).field("created_ms", &self.created_ms).finish()
    }
}

/// Signing keys kept: the current one and the one before it (tokens it signed stay valid for
/// their few minutes after a rotation).
pub const KEYS_KEPT: usize = 2;

/// Who made a request, once their credentials were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Anonymous,
    /// A user of the cluster state, the htpasswd file or LDAP, with the groups its source
    /// names (LDAP groups; the state's user record adds its own).
    User {
        name: String,
        groups: Vec<String>,
    },
    Robot {
        id: String,
        name: String,
    },
}

impl Principal {
    /// The name audit lines and tokens carry.
    pub fn name(&self) -> String {
        match self {
            Principal::Anonymous => "anonymous".into(),
            Principal::User { name, .. } => name.clone(),
            Principal::Robot { name, .. } => format!("robot:{name}"),
        }
    }
}

/// Every identity and grant of the cluster, as applied at one log index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessState {
    pub users: BTreeMap<String, UserRecord>,
    pub robots: BTreeMap<String, RobotRecord>,
    pub grants: Vec<Grant>,
    /// Oldest first; the last one signs.
    pub keys: Vec<SigningKey>,
}

impl AccessState {
    /// Whether the principal has the admin role (users of the cluster state only).
    pub fn is_admin(&self, p: &Principal) -> bool {
        match p {
            Principal::User { name, .. } => self.users.get(name).is_some_and(|u| u.admin),
            _ => false,
        }
    }

    /// The subjects whose grants apply to the principal: itself, its groups, and anonymous.
    pub fn subjects(&self, p: &Principal) -> Vec<Subject> {
        let mut s = vec![Subject::Anonymous];
        match p {
            Principal::Anonymous => {}
            Principal::User { name, groups } => {
                s.push(Subject::User(name.clone()));
                let own = self.users.get(name).map(|u| u.groups.as_slice()).unwrap_or(&[]);
                for g in groups.iter().chain(own) {
                    s.push(Subject::Group(g.clone()));
                }
            }
            Principal::Robot { id, .. } => s.push(Subject::Robot(id.clone())),
        }
        s
    }

    /// What the principal may do in `repo`: everything for an admin, otherwise the union of
    /// the grants of its subjects whose pattern matches.
    pub fn allowed(&self, p: &Principal, repo: &str) -> Actions {
        if self.is_admin(p) {
            return Actions::ALL;
        }
        let subjects = self.subjects(p);
        self.grants
            .iter()
            .filter(|g| subjects.contains(&g.subject) && g.repos.matches(repo))
            .fold(Actions::NONE, |a, g| a.union(g.actions))
    }

    /// Whether a grant on exactly the pattern `name` (not a wider one that matches it) gives
    /// the principal `action`: how reserved names like `_raftyard/metrics` are granted.
    pub fn has_exact_grant(&self, p: &Principal, name: &str, action: Actions) -> bool {
        let subjects = self.subjects(p);
        self.grants
            .iter()
            .any(|g| g.repos.as_str() == name && g.actions.contains(action) && subjects.contains(&g.subject))
    }

    /// The key new tokens are signed with.
    pub fn signing_key(&self) -> Option<&SigningKey> {
        self.keys.last()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> RepoGlob {
        RepoGlob::parse(s).unwrap()
    }

    #[test]
    fn globs() {
        assert!(g("team/*").matches("team/app"));
        assert!(!g("team/*").matches("team/a/b"));
        assert!(!g("team/*").matches("team"));
        assert!(g("team/**").matches("team"));
        assert!(g("team/**").matches("team/a/b"));
        assert!(!g("team/**").matches("teams/a"));
        assert!(g("**").matches("x/y/z"));
        assert!(g("*/app").matches("team/app"));
        assert!(!g("*/app").matches("team/x/app"));
        assert!(g("**/app").matches("team/x/app"));
        assert!(g("app-*").matches("app-1"));
        assert!(!g("app-*").matches("app"));
        assert!(g("a*b*c").matches("axxbyyc"));
        assert!(!g("a*b*c").matches("axxbyy"));
        assert!(g("exact/name").matches("exact/name"));
        assert!(!g("exact/name").matches("exact/name2"));
        assert!(g("**/**/x").matches("x"));
        assert!(g("a/**/b/**/c").matches("a/1/b/2/3/c"));
        assert!(!g("a/**/b/**/c").matches("a/1/c"));
        assert!(g("*a*").matches("banana") && !g("*z*").matches("banana"));
        // adversarial: many stars against a long name finish at once
        let name = format!("{}b", "a".repeat(250));
        let t = std::time::Instant::now();
        assert!(!g("*a*a*a*a*a*a*a*a*a*a*c").matches(&name));
        let deep = vec!["a"; 120].join("/");
        assert!(!g("**/**/**/**/**/**/**/**/b").matches(&deep));
        assert!(t.elapsed() < std::time::Duration::from_millis(50), "{:?}", t.elapsed());
        for bad in ["", "team//x", "Team", "a/***", "a/b**", "/a", "a/"] {
            assert!(RepoGlob::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn actions() {
        assert_eq!(Actions::parse("pull,push").unwrap(), Actions::PULL.union(Actions::PUSH));
        assert_eq!(Actions::parse("*").unwrap(), Actions::ALL);
        assert!(Actions::parse("pull,write").is_err());
        assert_eq!(Actions::from_names(["pull", "bogus"]), Actions::PULL);
        assert_eq!(Actions::ALL.to_string(), "pull,push,delete");
        assert_eq!(Actions::NONE.to_string(), "none");
    }

    #[test]
    fn policy() {
        let mut s = AccessState::default();
        let user = |admin: bool, groups: &[&str]| UserRecord {
            password_hash: String::new(),
            admin,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            created_ms: 0,
        };
        s.users.insert("root".into(), user(true, &[]));
        s.users.insert("alice".into(), user(false, &["devs"]));
        s.grants.push(Grant { subject: Subject::User("alice".into()), repos: g("team/**"), actions: Actions::PUSH });
        s.grants.push(Grant { subject: Subject::Group("devs".into()), repos: g("team/*"), actions: Actions::PULL });
        s.grants.push(Grant { subject: Subject::Anonymous, repos: g("public/*"), actions: Actions::PULL });
        s.grants.push(Grant { subject: Subject::Robot("r1".into()), repos: g("ci/*"), actions: Actions::ALL });
        let alice = Principal::User { name: "alice".into(), groups: vec![] };
        let bob = Principal::User { name: "bob".into(), groups: vec!["devs".into()] };
        let root = Principal::User { name: "root".into(), groups: vec![] };
        let robot = Principal::Robot { id: "r1".into(), name: "ci".into() };
        assert_eq!(s.allowed(&alice, "team/app"), Actions::PULL.union(Actions::PUSH));
        assert_eq!(s.allowed(&alice, "team/a/b"), Actions::PUSH);
        assert_eq!(s.allowed(&alice, "public/x"), Actions::PULL);
        assert_eq!(s.allowed(&alice, "other"), Actions::NONE);
        // an LDAP user named bob in group devs: no record, the group's grant applies
        assert_eq!(s.allowed(&bob, "team/app"), Actions::PULL);
        assert_eq!(s.allowed(&root, "anything/at/all"), Actions::ALL);
        assert_eq!(s.allowed(&robot, "ci/x"), Actions::ALL);
        assert_eq!(s.allowed(&robot, "team/app"), Actions::NONE);
        assert_eq!(s.allowed(&Principal::Anonymous, "team/app"), Actions::NONE);
        assert_eq!(s.allowed(&Principal::Anonymous, "public/x"), Actions::PULL);
        assert!(!s.is_admin(&robot));
        // a wide grant does not reach a reserved name; a grant on exactly that name does
        s.grants.push(Grant { subject: Subject::User("alice".into()), repos: g("**"), actions: Actions::PULL });
        assert!(!s.has_exact_grant(&alice, "_raftyard/metrics", Actions::PULL));
        s.grants.push(Grant {
            subject: Subject::Group("devs".into()),
            repos: g("_raftyard/metrics"),
            actions: Actions::PULL,
        });
        assert!(s.has_exact_grant(&alice, "_raftyard/metrics", Actions::PULL), "through the group devs");
    }

    #[test]
    fn subject_keys_round_trip() {
        for s in [
            Subject::User("alice".into()),
            Subject::Group("devs".into()),
            Subject::Robot("0a1b".into()),
            Subject::Anonymous,
        ] {
            assert_eq!(Subject::parse_key(&s.key()), Some(s));
        }
        assert_eq!(Subject::parse_key("user:a\0b"), None);
        assert_eq!(Subject::parse_key("role:x"), None);
    }
}
