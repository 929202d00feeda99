//! Who is calling and what they may do: authentication and authorization of registry
//! requests.
//!
//! Owns the credential checks (HTTP Basic against the cluster's users, an htpasswd file and
//! robot tokens; bearer JWTs of the Docker token flow), the token issuing of the built-in
//! token endpoint, the cache of verified credentials, and the per-address lockout. What a
//! principal may do is decided by [`raftyard_types::access::AccessState::allowed`] over the
//! grants in the cluster state, which this crate reads through an [`AccessSource`] and caches
//! until the state's access version moves. It knows nothing of HTTP routing or Raft: the
//! registry says which action a request needs, and the binary wires the source up.
//!
//! Threat model and modes: `docs/security.md`.

pub mod external;
pub mod htpasswd;
pub mod ldap;
pub mod lockout;
pub mod password;
pub mod robot;
pub mod token;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use raftyard_types::access::{AccessState, Actions, Principal};
use ring::rand::SecureRandom;
use sha2::{Digest as _, Sha256};

pub use token::{Claims, Scope, TokenError};

/// How requests authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No authentication: every request may do everything.
    None,
    /// HTTP Basic on every request.
    Basic,
    /// The Docker token flow: bearer JWTs from the token endpoint.
    Token,
}

/// The settings of the auth layer (built from the node's `[auth]` section).
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    /// The Basic realm's name, or the token realm's URL. `None`: "raftyard", or for tokens the
    /// token endpoint of the host the request was sent to (so that it works through a relay).
    pub realm: Option<String>,
    /// The `service` of the token flow (the tokens' audience).
    pub service: String,
    /// The `iss` of the tokens this cluster issues.
    pub issuer: String,
    /// An htpasswd file of more users.
    pub htpasswd: Option<PathBuf>,
    /// A directory of more users and their groups.
    pub ldap: Option<ldap::LdapSettings>,
    /// An outside token issuer (`[auth.token]`): its realm and service go into challenges,
    /// and tokens it signed are accepted beside the cluster's own.
    pub external: Option<Arc<external::ExternalIssuer>>,
    /// Lifetime of an access token.
    pub token_ttl: Duration,
    /// Lifetime of a refresh token (`docker login`'s identity token).
    pub refresh_ttl: Duration,
    /// Failed attempts a minute from one address before it is locked out (0: never).
    pub lockout_threshold: u32,
    pub lockout_duration: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mode: Mode::None,
            realm: None,
            service: "raftyard".into(),
            issuer: "raftyard".into(),
            htpasswd: None,
            ldap: None,
            external: None,
            token_ttl: Duration::from_secs(300),
            refresh_ttl: Duration::from_secs(30 * 86400),
            lockout_threshold: 10,
            lockout_duration: Duration::from_secs(60),
        }
    }
}

/// Where the identities and grants come from: the applied cluster state.
pub trait AccessSource: Send + Sync + 'static {
    /// Bumped by every change of who may do what.
    fn version(&self) -> std::io::Result<u64>;
    fn load(&self) -> std::io::Result<(u64, AccessState)>;
}

/// A request's caller, once its credentials were checked.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    /// For a bearer token: its claims, which bound what the request may do.
    pub claims: Option<Claims>,
    /// Auth is off: everything is allowed.
    pub open: bool,
    /// The token came from the outside issuer: its `sub` names no user of this cluster, and
    /// only its claims say what it may do (never admin, no grants of the cluster).
    pub external: bool,
}

impl Caller {
    pub fn open() -> Caller {
        Caller { principal: Principal::Anonymous, claims: None, open: true, external: false }
    }

    /// A caller with no credentials (what a request gets where no door put a caller).
    pub fn anonymous() -> Caller {
        Caller { principal: Principal::Anonymous, claims: None, open: false, external: false }
    }

    /// What this request may do in `repo`: a bearer token's `access`, or the grants.
    pub fn allowed(&self, state: &AccessState, repo: &str) -> Actions {
        if self.open {
            return Actions::ALL;
        }
        match &self.claims {
            Some(c) => c.repository_actions(repo),
            None => state.allowed(&self.principal, repo),
        }
    }

    /// Whether `repo` appears in this caller's catalog: it may pull it under the grants; an
    /// outside issuer's token that reached the catalog carries `registry:catalog:*`, and the
    /// issuer decided (as Distribution lets it).
    pub fn in_catalog(&self, state: &AccessState, repo: &str) -> bool {
        self.open || self.external || state.allowed(&self.principal, repo).contains(Actions::PULL)
    }

    /// Whether the caller may read `repo` (a mount's source): by its token, or its grants.
    pub fn may_pull(&self, state: &AccessState, repo: &str) -> bool {
        if self.open {
            return true;
        }
        if self.external {
            return self.allowed(state, repo).contains(Actions::PULL);
        }
        self.allowed(state, repo).contains(Actions::PULL)
            || state.allowed(&self.principal, repo).contains(Actions::PULL)
    }

    pub fn is_admin(&self, state: &AccessState) -> bool {
        self.open || (!self.external && state.is_admin(&self.principal))
    }

    /// Whether the caller may scrape `/metrics`: an admin, or a grant of `pull` on exactly
    /// [`METRICS_GRANT`].
    pub fn may_scrape(&self, state: &AccessState) -> bool {
        self.is_admin(state) || (!self.external && state.has_exact_grant(&self.principal, METRICS_GRANT, Actions::PULL))
    }

    pub fn is_anonymous(&self) -> bool {
        !self.open && self.principal == Principal::Anonymous
    }
}

/// Why credentials were refused. The reason goes to metrics and the audit log; the client only
/// learns that it is unauthorized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("malformed Authorization header")]
    Malformed,
    #[error("unknown user or wrong password")]
    BadPassword,
    #[error("unknown, revoked or wrong robot token")]
    BadRobot,
    #[error("robot token expired")]
    RobotExpired,
    #[error("{0}")]
    Token(TokenError),
    #[error("this mode does not accept {0} credentials")]
    WrongScheme(&'static str),
    #[error("the directory could not check the credentials")]
    Unavailable,
}

impl Failure {
    /// Whether the failure looks like a guess (a wrong password or secret, a forged token),
    /// which counts toward an address's lockout. An expired token, a clock out of step or a
    /// directory that cannot answer does not: many honest clients behind one address could
    /// lock it out.
    pub fn is_guess(&self) -> bool {
        matches!(
            self,
            Failure::BadPassword
                | Failure::BadRobot
                | Failure::Malformed
                | Failure::Token(TokenError::Signature)
                | Failure::Token(TokenError::Malformed)
        )
    }

    /// A short label for `raftyard_auth_failures_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::Malformed => "malformed",
            Failure::BadPassword => "bad_password",
            Failure::BadRobot => "bad_robot_token",
            Failure::RobotExpired => "robot_token_expired",
            Failure::Token(TokenError::Expired) => "token_expired",
            Failure::Token(_) => "bad_token",
            Failure::WrongScheme(_) => "wrong_scheme",
            Failure::Unavailable => "directory_unavailable",
        }
    }
}

/// Credentials as a request carries them.
#[derive(Clone)]
pub enum Credentials {
    None,
    Basic { user: String, password: String },
    Bearer(String),
}

impl std::fmt::Debug for external::ExternalIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalIssuer").field("realm", &self.realm).field("issuer", &self.issuer).finish()
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::Basic { user, .. } => write!(f, "Basic({user:?}, <password>)"),
            Credentials::Bearer(_) => f.write_str("Bearer(<token>)"),
        }
    }
}

impl Credentials {
    /// Reads the `Authorization` header.
    pub fn from_headers(h: &http::HeaderMap) -> Result<Credentials, Failure> {
        let Some(v) = h.get(http::header::AUTHORIZATION) else {
            return Ok(Credentials::None);
        };
        let v = v.to_str().map_err(|_| Failure::Malformed)?.trim();
        let (scheme, rest) = v.split_once(' ').ok_or(Failure::Malformed)?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let raw = base64::engine::general_purpose::STANDARD.decode(rest).map_err(|_| Failure::Malformed)?;
            let s = String::from_utf8(raw).map_err(|_| Failure::Malformed)?;
            let (user, password) = s.split_once(':').ok_or(Failure::Malformed)?;
            Ok(Credentials::Basic { user: user.to_string(), password: password.to_string() })
        } else if scheme.eq_ignore_ascii_case("bearer") {
            Ok(Credentials::Bearer(rest.to_string()))
        } else {
            Err(Failure::Malformed)
        }
    }
}

/// How long a verified password stays trusted without a new check (a change of the state's
/// users, or a reloaded htpasswd file, forgets it at once).
const CRED_TTL: Duration = Duration::from_secs(300);
const CRED_MAX: usize = 10_000;
/// Password hashes computed at once: each costs tens of MiB and milliseconds of a core.
const KDF_AT_ONCE: usize = 2;
/// A robot token's use is recorded this often at most (per node).
pub const ROBOT_USE_EVERY: Duration = Duration::from_secs(60);

struct CachedCred {
    identity: Identity,
    version: u64,
    at: Instant,
}

/// The auth layer of one node.
pub struct Auth {
    settings: Settings,
    source: Box<dyn AccessSource>,
    state: Mutex<Arc<(u64, AccessState)>>,
    htpasswd: Option<htpasswd::Htpasswd>,
    creds: Mutex<HashMap<[u8; 32], CachedCred>>,
    /// Bearer tokens whose signature was verified, with the access version they were verified
    /// at (a key rotation or removal forgets them); their validity is checked on every use.
    tokens: Mutex<HashMap<[u8; 32], (Claims, u64, bool)>>,
    /// Keys the credential cache, so that it is no dictionary for anyone reading memory.
    cache_key: [u8; 32],
    kdf: tokio::sync::Semaphore,
    robots_seen: Mutex<HashMap<String, Instant>>,
    pub lockout: lockout::Lockout,
}

/// What the token endpoint answers (no `Debug`: it is all secrets).
#[derive(Clone, serde::Serialize)]
pub struct TokenReply {
    pub token: String,
    pub access_token: String,
    pub expires_in: u64,
    pub issued_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub scope: String,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Auth {
    pub fn new(settings: Settings, source: Box<dyn AccessSource>) -> Result<Auth, String> {
        let htpasswd = settings.htpasswd.as_deref().map(htpasswd::Htpasswd::open).transpose()?;
        let loaded = source.load().map_err(|e| format!("reading users and grants: {e}"))?;
        let mut cache_key = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut cache_key).map_err(|_| "no random source".to_string())?;
        Ok(Auth {
            lockout: lockout::Lockout::new(settings.lockout_threshold, settings.lockout_duration),
            settings,
            source,
            state: Mutex::new(Arc::new(loaded)),
            htpasswd,
            creds: Mutex::default(),
            tokens: Mutex::default(),
            cache_key,
            kdf: tokio::sync::Semaphore::new(KDF_AT_ONCE),
            robots_seen: Mutex::default(),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn mode(&self) -> Mode {
        self.settings.mode
    }

    /// Identities and grants as applied now (reloaded when the access version moved).
    pub fn state(&self) -> Arc<(u64, AccessState)> {
        let cur = self.state.lock().expect("auth state lock").clone();
        match self.source.version() {
            Ok(v) if v == cur.0 => cur,
            Ok(_) => match self.source.load() {
                Ok(fresh) => {
                    let fresh = Arc::new(fresh);
                    *self.state.lock().expect("auth state lock") = fresh.clone();
                    fresh
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading users and grants failed; using the last copy");
                    cur
                }
            },
            Err(_) => cur,
        }
    }

    /// Checks the credentials. No credentials: the anonymous caller (what anonymous may do is
    /// up to the grants). Basic credentials are accepted in every mode (the token endpoint and
    /// admin endpoints need them); bearer tokens only in token mode.
    pub async fn identify(&self, creds: Credentials) -> Result<Caller, Failure> {
        if self.settings.mode == Mode::None {
            return Ok(Caller::open());
        }
        match creds {
            Credentials::None => Ok(Caller::anonymous()),
            Credentials::Basic { user, password } => {
                let principal = self.check_password(&user, &password).await?;
                Ok(Caller { principal, claims: None, open: false, external: false })
            }
            Credentials::Bearer(t) => {
                if self.settings.mode != Mode::Token {
                    return Err(Failure::WrongScheme("bearer"));
                }
                let (claims, external) = self.bearer(&t)?;
                Ok(Caller { principal: principal_of(&claims), claims: Some(claims), open: false, external })
            }
        }
    }

    /// The claims of a bearer token (the cluster's or the outside issuer's). A signature is
    /// checked once (tens of microseconds); the token is then remembered, and each later use
    /// only checks its time window.
    fn bearer(&self, t: &str) -> Result<(Claims, bool), Failure> {
        let key = self.cred_key("\0bearer", t);
        let version = self.state().0;
        let now = unix_now();
        if let Some((c, v, external)) = self.tokens.lock().expect("token cache").get(&key) {
            if *v == version && c.exp + 30 > now && c.nbf <= now + 30 {
                return Ok((c.clone(), *external));
            }
        }
        let (claims, external) = match &self.settings.external {
            Some(ext) if ext.claims_key(t) => (ext.verify(t).map_err(Failure::Token)?, true),
            _ => (self.verify_token(t, false)?, false),
        };
        let mut cache = self.tokens.lock().expect("token cache");
        if cache.len() >= CRED_MAX {
            cache.retain(|_, (c, _, _)| c.exp + 30 > now);
            if cache.len() >= CRED_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (claims.clone(), version, external));
        Ok((claims, external))
    }

    /// A token of this cluster, with its claims.
    pub fn verify_token(&self, t: &str, refresh: bool) -> Result<Claims, Failure> {
        let st = self.state();
        token::verify(&st.1.keys, t, &self.settings.issuer, &self.settings.service, refresh).map_err(Failure::Token)
    }

    /// Checks a user name and password (or robot token) against, in order: robot tokens, the
    /// cluster's users, the htpasswd file, LDAP (the first that knows the name decides).
    pub async fn check_password(&self, user: &str, password: &str) -> Result<Principal, Failure> {
        self.authenticate(user, password).await.map(|i| i.principal)
    }

    /// [`Self::check_password`], saying where the identity came from.
    pub async fn authenticate(&self, user: &str, password: &str) -> Result<Identity, Failure> {
        let st = self.state();
        let (version, state) = (&st.0, &st.1);
        if let Some(id) = robot::id_of(password) {
            let Some(r) = state.robots.get(id) else { return Err(Failure::BadRobot) };
            if !robot::matches(password, &r.secret_sha256) {
                return Err(Failure::BadRobot);
            }
            if r.expires_ms.is_some_and(|e| e <= raftyard_types::event::now_ms()) {
                return Err(Failure::RobotExpired);
            }
            return Ok(Identity {
                principal: Principal::Robot { id: id.to_string(), name: r.name.clone() },
                source: Source::Robot,
            });
        }
        let key = self.cred_key(user, password);
        let from_file = self.file_lookup(user);
        if let Some(c) = self.creds.lock().expect("cred cache").get(&key) {
            if c.version == *version && c.at.elapsed() < CRED_TTL {
                return Ok(c.identity.clone());
            }
        }
        let (stored, source) = match (state.users.get(user), from_file) {
            (Some(u), _) => (Some(u.password_hash.clone()), Some(Source::State { gen: generation(&u.password_hash) })),
            (None, Some(h)) => {
                let gen = generation(&h);
                (Some(h), Some(Source::Htpasswd { gen }))
            }
            (None, None) => (None, None),
        };
        if stored.is_none() {
            if let Some(l) = &self.settings.ldap {
                let principal = match ldap::verify(l, user, password).await {
                    Ok(ldap::Verdict::Valid { groups }) => Principal::User { name: user.to_string(), groups },
                    Ok(ldap::Verdict::Invalid) => return Err(Failure::BadPassword),
                    Err(e) => {
                        tracing::warn!(error = %e, "LDAP could not check a login");
                        return Err(Failure::Unavailable);
                    }
                };
                let identity = Identity { principal, source: Source::Ldap };
                self.remember(key, &identity, *version);
                return Ok(identity);
            }
        }
        let ok = {
            let _permit = self.kdf.acquire().await.expect("the semaphore is never closed");
            let (password, target) =
                (password.to_string(), stored.clone().unwrap_or_else(|| password::decoy().to_string()));
            tokio::task::spawn_blocking(move || password::verify(&password, &target)).await.unwrap_or(false)
        };
        let (true, Some(source)) = (ok, source) else {
            return Err(Failure::BadPassword);
        };
        let identity = Identity { principal: Principal::User { name: user.to_string(), groups: vec![] }, source };
        self.remember(key, &identity, *version);
        Ok(identity)
    }

    /// The htpasswd file's hash for `user`; a reload of the file forgets every remembered
    /// password (whichever check notices it first).
    fn file_lookup(&self, user: &str) -> Option<String> {
        let (hash, reloaded) = self.htpasswd.as_ref()?.lookup(user);
        if reloaded {
            self.creds.lock().expect("cred cache").clear();
        }
        hash
    }

    fn remember(&self, key: [u8; 32], identity: &Identity, version: u64) {
        let mut cache = self.creds.lock().expect("cred cache");
        if cache.len() >= CRED_MAX {
            cache.clear();
        }
        cache.insert(key, CachedCred { identity: identity.clone(), version, at: Instant::now() });
    }

    fn cred_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cache_key);
        h.update((user.len() as u64).to_be_bytes());
        h.update(user.as_bytes());
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// Whether a use of this robot token should be recorded in the log now (at most once per
    /// [`ROBOT_USE_EVERY`] per node).
    pub fn robot_use_due(&self, id: &str) -> bool {
        let mut seen = self.robots_seen.lock().expect("robot use lock");
        let now = Instant::now();
        match seen.get(id) {
            Some(t) if now.duration_since(*t) < ROBOT_USE_EVERY => false,
            _ => {
                if seen.len() > 10_000 {
                    seen.clear();
                }
                seen.insert(id.to_string(), now);
                true
            }
        }
    }

    /// The `WWW-Authenticate` challenge for a request to `host` (its `Host` header) over
    /// `scheme`, naming the scope the request needed.
    pub fn challenge(&self, scheme: &str, host: Option<&str>, scope: Option<&Scope>) -> String {
        match self.settings.mode {
            Mode::Token => {
                let realm = match (&self.settings.external, &self.settings.realm, host) {
                    (Some(ext), _, _) => ext.realm.clone(),
                    (None, Some(r), _) => r.clone(),
                    (None, None, Some(h)) => format!("{scheme}://{h}{TOKEN_PATH}"),
                    (None, None, None) => TOKEN_PATH.to_string(),
                };
                let service = self.settings.external.as_ref().map_or(&self.settings.service, |e| &e.service);
                let mut c = format!("Bearer realm=\"{}\",service=\"{}\"", quote(&realm), quote(service));
                if let Some(s) = scope {
                    c.push_str(&format!(",scope=\"{}\"", quote(&s.to_header())));
                }
                c
            }
            _ => format!("Basic realm=\"{}\"", quote(self.settings.realm.as_deref().unwrap_or("raftyard"))),
        }
    }

    /// A token for `principal` granting what it asked for and may do (the intersection), with
    /// a refresh token when `offline`. `None` when the cluster has no signing key yet.
    pub fn issue(&self, identity: &Identity, scopes: &[Scope], offline: bool) -> Option<TokenReply> {
        let principal = &identity.principal;
        let st = self.state();
        let state = &st.1;
        let key = state.signing_key()?;
        let now = unix_now();
        let mut access = Vec::new();
        for s in scopes {
            let granted: Vec<String> = match s.kind.as_str() {
                "repository" => {
                    let allowed = state.allowed(principal, &s.name);
                    let asked = Actions::from_names(s.actions.iter().map(String::as_str));
                    allowed.intersect(asked).names().into_iter().map(str::to_string).collect()
                }
                // the catalog is filtered by the grants, so any known caller may list it
                "registry" if s.name == "catalog" && *principal != Principal::Anonymous => {
                    s.actions.iter().filter(|a| *a == "*").cloned().collect()
                }
                _ => vec![],
            };
            access.push(token::Access { kind: s.kind.clone(), name: s.name.clone(), actions: granted });
        }
        let (sub, grp, rid) = match principal {
            Principal::Anonymous => (String::new(), vec![], None),
            Principal::User { name, groups } => (name.clone(), groups.clone(), None),
            Principal::Robot { id, name } => (name.clone(), vec![], Some(id.clone())),
        };
        let claims = Claims {
            iss: self.settings.issuer.clone(),
            sub: sub.clone(),
            aud: self.settings.service.clone(),
            exp: now + self.settings.token_ttl.as_secs(),
            nbf: now.saturating_sub(1),
            iat: now,
            jti: token::jti(),
            access,
            grp: grp.clone(),
            rid: rid.clone(),
            token_use: None,
            src: None,
            gen: None,
        };
        let scope = scopes.iter().map(Scope::to_header).collect::<Vec<_>>().join(" ");
        let t = token::sign(key, &claims);
        let refresh_token = (offline && *principal != Principal::Anonymous).then(|| {
            let (src, gen) = identity.source.claims();
            token::sign(
                key,
                &Claims {
                    exp: now + self.settings.refresh_ttl.as_secs(),
                    access: vec![],
                    jti: token::jti(),
                    token_use: Some("refresh".into()),
                    src,
                    gen,
                    ..claims.clone()
                },
            )
        });
        Some(TokenReply {
            token: t.clone(),
            access_token: t,
            expires_in: self.settings.token_ttl.as_secs(),
            issued_at: rfc3339(now),
            refresh_token,
            scope,
        })
    }

    /// The identity a refresh token stands for, looked up again where it came from: a robot
    /// token still there and not expired; a user of the state or the htpasswd file still there
    /// with the same password (and, for the file, not shadowed by a user of the state); an
    /// LDAP user still in the directory (with its groups now, and shadowed by neither).
    pub async fn refresh(&self, t: &str) -> Result<Identity, Failure> {
        let c = self.verify_token(t, true)?;
        let st = self.state();
        let state = &st.1;
        let user = |groups: Vec<String>| Principal::User { name: c.sub.clone(), groups };
        let from_file = || self.file_lookup(&c.sub);
        match c.src.as_deref() {
            Some("robot") => {
                let id = c.rid.clone().ok_or(Failure::BadRobot)?;
                let r = state.robots.get(&id).ok_or(Failure::BadRobot)?;
                if r.expires_ms.is_some_and(|e| e <= raftyard_types::event::now_ms()) {
                    return Err(Failure::RobotExpired);
                }
                Ok(Identity { principal: Principal::Robot { id, name: r.name.clone() }, source: Source::Robot })
            }
            Some("state") => {
                let u = state.users.get(&c.sub).ok_or(Failure::BadPassword)?;
                let gen = generation(&u.password_hash);
                if c.gen.as_deref() != Some(gen.as_str()) {
                    return Err(Failure::BadPassword);
                }
                Ok(Identity { principal: user(vec![]), source: Source::State { gen } })
            }
            Some("htpasswd") if !state.users.contains_key(&c.sub) => {
                let gen = generation(&from_file().ok_or(Failure::BadPassword)?);
                if c.gen.as_deref() != Some(gen.as_str()) {
                    return Err(Failure::BadPassword);
                }
                Ok(Identity { principal: user(vec![]), source: Source::Htpasswd { gen } })
            }
            Some("ldap") if !state.users.contains_key(&c.sub) && from_file().is_none() => {
                let l = self.settings.ldap.as_ref().ok_or(Failure::BadPassword)?;
                match ldap::lookup(l, &c.sub).await {
                    Ok(ldap::Verdict::Valid { groups }) => {
                        Ok(Identity { principal: user(groups), source: Source::Ldap })
                    }
                    Ok(ldap::Verdict::Invalid) => Err(Failure::BadPassword),
                    Err(e) => {
                        tracing::warn!(error = %e, "LDAP could not check a refresh");
                        Err(Failure::Unavailable)
                    }
                }
            }
            _ => Err(Failure::BadPassword),
        }
    }
}

/// Where every node serves the token endpoint.
pub const TOKEN_PATH: &str = "/auth/token";

/// The reserved name a grant of `pull` on which (exactly that pattern) lets a subject scrape
/// `/metrics`.
pub const METRICS_GRANT: &str = "_raftyard/metrics";

/// Where a verified identity came from: a refresh token records it, and each refresh looks
/// the identity up there again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// No credentials.
    Anonymous,
    Robot,
    /// A user of the cluster state; `gen` digests its password hash.
    State {
        gen: String,
    },
    /// A user of the htpasswd file; `gen` digests its hash.
    Htpasswd {
        gen: String,
    },
    Ldap,
}

impl Source {
    fn claims(&self) -> (Option<String>, Option<String>) {
        match self {
            Source::Anonymous => (None, None),
            Source::Robot => (Some("robot".into()), None),
            Source::State { gen } => (Some("state".into()), Some(gen.clone())),
            Source::Htpasswd { gen } => (Some("htpasswd".into()), Some(gen.clone())),
            Source::Ldap => (Some("ldap".into()), None),
        }
    }
}

/// A digest of a stored password hash, for refresh tokens.
fn generation(hash: &str) -> String {
    hex::encode(&Sha256::digest(hash.as_bytes())[..8])
}

/// A principal and where it was verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub principal: Principal,
    pub source: Source,
}

fn principal_of(c: &Claims) -> Principal {
    if let Some(id) = &c.rid {
        return Principal::Robot { id: id.clone(), name: c.sub.clone() };
    }
    if c.sub.is_empty() {
        return Principal::Anonymous;
    }
    Principal::User { name: c.sub.clone(), groups: c.grp.clone() }
}

fn quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Seconds since the epoch as RFC 3339 UTC.
fn rfc3339(secs: u64) -> String {
    let days = secs / 86400;
    let rem = secs % 86400;
    // civil from days (Howard Hinnant's algorithm)
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftyard_types::access::{Grant, RepoGlob, RobotRecord, Subject, UserRecord};

    struct Fixed(Mutex<(u64, AccessState)>);
    impl AccessSource for Arc<Fixed> {
        fn version(&self) -> std::io::Result<u64> {
            Ok(self.0.lock().unwrap().0)
        }
        fn load(&self) -> std::io::Result<(u64, AccessState)> {
            Ok(self.0.lock().unwrap().clone())
        }
    }

    fn setup(mode: Mode) -> (Auth, Arc<Fixed>, String) {
        let mut s = AccessState::default();
        s.users.insert(
            "alice".into(),
            UserRecord { password_hash: password::hash("pw"), admin: false, groups: vec![], created_ms: 0 },
        );
        s.grants.push(Grant {
            subject: Subject::User("alice".into()),
            repos: RepoGlob::parse("team/**").unwrap(),
            actions: Actions::PULL.union(Actions::PUSH),
        });
        let (id, secret, hash) = robot::generate();
        s.robots.insert(
            id.clone(),
            RobotRecord { name: "ci".into(), secret_sha256: hash, expires_ms: None, created_ms: 0, last_used_ms: None },
        );
        s.grants.push(Grant {
            subject: Subject::Robot(id),
            repos: RepoGlob::parse("ci/*").unwrap(),
            actions: Actions::PULL,
        });
        s.keys.push(token::new_signing_key(0));
        let src = Arc::new(Fixed(Mutex::new((1, s))));
        let auth = Auth::new(Settings { mode, ..Settings::default() }, Box::new(src.clone())).unwrap();
        (auth, src, secret)
    }

    fn basic(u: &str, p: &str) -> Credentials {
        Credentials::Basic { user: u.into(), password: p.into() }
    }

    #[tokio::test]
    async fn passwords_robots_and_cache() {
        let (auth, src, secret) = setup(Mode::Basic);
        let c = auth.identify(basic("alice", "pw")).await.unwrap();
        assert_eq!(c.allowed(&auth.state().1, "team/app"), Actions::PULL.union(Actions::PUSH));
        assert_eq!(auth.identify(basic("alice", "nope")).await.unwrap_err(), Failure::BadPassword);
        assert_eq!(auth.identify(basic("mallory", "pw")).await.unwrap_err(), Failure::BadPassword);
        let r = auth.identify(basic("anything", &secret)).await.unwrap();
        assert!(matches!(r.principal, Principal::Robot { ref name, .. } if name == "ci"));
        assert_eq!(r.allowed(&auth.state().1, "ci/x"), Actions::PULL);
        let mut bad = secret.clone();
        bad.replace_range(secret.len() - 4.., "AAAA");
        assert_eq!(auth.identify(basic("x", &bad)).await.unwrap_err(), Failure::BadRobot);
        // a password change (a new access version) forgets the cached credential at once
        {
            let mut g = src.0.lock().unwrap();
            g.0 += 1;
            g.1.users.get_mut("alice").unwrap().password_hash = password::hash("new");
        }
        assert_eq!(auth.identify(basic("alice", "pw")).await.unwrap_err(), Failure::BadPassword);
        assert!(auth.identify(basic("alice", "new")).await.is_ok());
        assert!(auth.identify(Credentials::None).await.unwrap().is_anonymous());
        assert_eq!(auth.identify(Credentials::Bearer("x".into())).await.unwrap_err(), Failure::WrongScheme("bearer"));
    }

    #[tokio::test]
    async fn issued_tokens_grant_the_intersection() {
        let (auth, src, _) = setup(Mode::Token);
        let alice = Principal::User { name: "alice".into(), groups: vec![] };
        let scopes = vec![
            Scope::parse("repository:team/app:pull,push,delete").unwrap(),
            Scope::parse("repository:other:pull").unwrap(),
        ];
        let alice_id = auth.authenticate("alice", "pw").await.unwrap();
        assert_eq!(alice_id.principal, alice);
        let reply = auth.issue(&alice_id, &scopes, true).unwrap();
        let c = auth.identify(Credentials::Bearer(reply.token.clone())).await.unwrap();
        let st = auth.state();
        assert_eq!(c.allowed(&st.1, "team/app"), Actions::PULL.union(Actions::PUSH), "delete was not granted");
        assert_eq!(c.allowed(&st.1, "other"), Actions::NONE);
        assert_eq!(c.allowed(&st.1, "team/b"), Actions::NONE, "only what the token names");
        let refresh = reply.refresh_token.unwrap();
        assert_eq!(auth.refresh(&refresh).await.unwrap(), alice_id);
        assert!(auth.identify(Credentials::Bearer(refresh)).await.is_err(), "a refresh token is no access token");
        assert!(auth.challenge("https", Some("reg.example:443"), Some(&scopes[0])).starts_with(
            "Bearer realm=\"https://reg.example:443/auth/token\",service=\"raftyard\",scope=\"repository:team/app:pull,push,delete\""
        ));
        // a remembered token is forgotten when its key leaves the cluster (two rotations)
        assert!(auth.identify(Credentials::Bearer(reply.token.clone())).await.is_ok());
        {
            let mut g = src.0.lock().unwrap();
            g.0 += 1;
            for _ in 0..raftyard_types::access::KEYS_KEPT {
                g.1.keys.push(token::new_signing_key(1));
            }
            let drop = g.1.keys.len() - raftyard_types::access::KEYS_KEPT;
            g.1.keys.drain(..drop);
        }
        assert_eq!(
            auth.identify(Credentials::Bearer(reply.token)).await.unwrap_err(),
            Failure::Token(TokenError::UnknownKey)
        );
    }

    #[tokio::test]
    async fn refresh_tokens_follow_their_source() {
        let (auth, src, secret) = setup(Mode::Token);
        let robot = auth.authenticate("ci", &secret).await.unwrap();
        let refresh = auth.issue(&robot, &[], true).unwrap().refresh_token.unwrap();
        assert_eq!(auth.refresh(&refresh).await.unwrap(), robot);
        // the robot token expires: so do the refresh tokens it was given
        {
            let mut g = src.0.lock().unwrap();
            g.0 += 1;
            for r in g.1.robots.values_mut() {
                r.expires_ms = Some(1);
            }
        }
        assert_eq!(auth.refresh(&refresh).await.unwrap_err(), Failure::RobotExpired);
        // a user removed from the state
        let alice = auth.authenticate("alice", "pw").await.unwrap();
        let refresh = auth.issue(&alice, &[], true).unwrap().refresh_token.unwrap();
        {
            let mut g = src.0.lock().unwrap();
            g.0 += 1;
            g.1.users.remove("alice");
        }
        assert_eq!(auth.refresh(&refresh).await.unwrap_err(), Failure::BadPassword);
    }

    #[test]
    fn only_guesses_count_toward_a_lockout() {
        assert!(Failure::BadPassword.is_guess() && Failure::BadRobot.is_guess());
        assert!(Failure::Token(TokenError::Signature).is_guess());
        for honest in [
            Failure::Token(TokenError::Expired),
            Failure::Token(TokenError::NotYetValid),
            Failure::Token(TokenError::UnknownKey),
            Failure::RobotExpired,
            Failure::Unavailable,
            Failure::WrongScheme("bearer"),
        ] {
            assert!(!honest.is_guess(), "{honest:?}");
        }
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_996_800), "2026-11-30T00:00:00Z");
        assert_eq!(rfc3339(951_782_400 + 3661), "2000-02-29T01:01:01Z");
    }
}
