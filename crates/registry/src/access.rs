//! The door of every registry request: who is calling ([`raftyard_auth`]), what the endpoint
//! needs, and the one place that answers `401` (with the challenge), `403 DENIED` or `429`
//! for a locked-out address. Also the token endpoint of the Docker token flow
//! (`GET`/`POST /auth/token`), served by every node.
//!
//! Refusals say why without saying what exists: a caller who may not pull a repository gets
//! the same answer whether it exists or not.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::BodyExt;
use raftyard_auth::{Auth, Caller, Credentials, Failure, Identity, Mode, Scope, Source};
use raftyard_types::access::{AccessState, Actions, Principal};
use raftyard_types::{Event, RepoName};
use serde_json::json;

use crate::endpoint::Endpoint;
use crate::error::RegistryError;
use crate::handlers::{json_response, HandlerResult, ReqBody};
use crate::{ClientAddr, Registry};

/// The cluster state as the auth layer reads it.
pub struct StateAccess(pub raftyard_raft::StateReader);

impl raftyard_auth::AccessSource for StateAccess {
    fn version(&self) -> std::io::Result<u64> {
        self.0.access_version()
    }
    fn load(&self) -> std::io::Result<(u64, AccessState)> {
        self.0.access()
    }
}

/// A request another node forwarded (to the owner of an upload session): that node checked
/// it already.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded;

/// What an endpoint asks of its caller.
#[derive(Debug)]
enum Need {
    /// Anyone: health, readiness, the state digest, the token endpoint.
    Nothing,
    /// Any caller whose credentials were checked (the `/v2/` base a login probes).
    Known,
    /// These actions in the repository.
    Repo(RepoName, Actions),
    /// The catalog: any known caller; it lists only what the caller may pull.
    Catalog,
    Admin,
    Metrics,
}

fn need(ep: &Endpoint, m: &Method) -> Need {
    let read = *m == Method::GET || *m == Method::HEAD;
    match ep {
        Endpoint::Health | Endpoint::Ready | Endpoint::StateDigest | Endpoint::Token => Need::Nothing,
        // the repositories listed are those the caller may pull
        Endpoint::Base | Endpoint::Usage => Need::Known,
        Endpoint::Catalog => Need::Catalog,
        Endpoint::Events => Need::Admin,
        Endpoint::Metrics => Need::Metrics,
        Endpoint::Tags { name } | Endpoint::Referrers { name, .. } => Need::Repo(name.clone(), Actions::PULL),
        Endpoint::Manifest { name, .. } | Endpoint::Blob { name, .. } => Need::Repo(
            name.clone(),
            if read {
                Actions::PULL
            } else if *m == Method::DELETE {
                Actions::DELETE
            } else {
                Actions::PUSH
            },
        ),
        // uploads need push; pushing clients check blobs with HEAD first, so ask for both
        Endpoint::UploadStart { name } | Endpoint::Upload { name, .. } => Need::Repo(name.clone(), Actions::PUSH),
    }
}

/// One JSON line for every refusal and every change of who may do what (target
/// `raftyard::audit`): never a password, token or hash.
pub fn audit(line: serde_json::Value) {
    tracing::info!(target: "raftyard::audit", "{line}");
}

fn client_of<B>(req: &Request<B>) -> Option<IpAddr> {
    req.extensions().get::<ClientAddr>().map(|c| c.0)
}

/// The scheme a client used to reach us (as the realm URL needs it).
fn scheme(reg: &Registry) -> &'static str {
    if reg.cfg.tls {
        "https"
    } else {
        "http"
    }
}

fn host<B>(req: &Request<B>) -> Option<String> {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(req.uri().authority().map(|a| a.as_str()))
        .filter(|h| h.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
}

/// Why [`check`] refused a request.
enum Refusal {
    /// Credentials were given and are wrong (counted, may lock the address out).
    Failed(Failure, RegistryError),
    /// Valid credentials without the grant the request needs.
    Denied(String, RegistryError),
    /// Anything else (no credentials yet, a locked-out address).
    Other(RegistryError),
}

/// Checks the request against the endpoint's need; the caller goes into the request's
/// extensions for the handlers that filter by it (catalog, mounts).
///
/// A refusal of credentials or of a grant is checked once more after a read barrier when that
/// barrier brought new users, grants or keys: a user added (or a key made) through another
/// node a moment ago is known here as soon as the change is committed, not only once this node
/// applies it.
pub(crate) async fn gate<B: ReqBody>(reg: &Registry, ep: &Endpoint, req: &mut Request<B>) -> Result<(), RegistryError> {
    let Some(auth) = reg.auth.as_ref().filter(|a| a.mode() != Mode::None) else {
        req.extensions_mut().insert(Caller::open());
        return Ok(());
    };
    if req.extensions().get::<Forwarded>().is_some() {
        req.extensions_mut().insert(Caller::open());
        return Ok(());
    }
    let need = need(ep, req.method());
    if matches!(need, Need::Nothing) {
        return Ok(());
    }
    let addr = client_of(req);
    if let Some(left) = addr.and_then(|a| auth.lockout.locked(a)) {
        return Err(RegistryError::LockedOut(left.as_secs().max(1)));
    }
    let before = auth.state().0;
    let mut r = check(reg, auth, &need, req).await;
    if matches!(r, Err(Refusal::Failed(..) | Refusal::Denied(..)))
        && reg.meta.read_barrier().await.is_ok()
        && auth.state().0 != before
    {
        r = check(reg, auth, &need, req).await;
    }
    match r {
        Ok(caller) => {
            note_robot_use(reg, auth, &caller);
            req.extensions_mut().insert(caller);
            Ok(())
        }
        Err(Refusal::Failed(f, e)) => {
            refused(reg, auth, addr, req, None, &f);
            Err(e)
        }
        Err(Refusal::Denied(what, e)) => {
            let user = req.extensions().get::<Caller>().map(|c| c.principal.name());
            audit(json!({"audit": "denied", "node": reg.meta.id(), "client": addr.map(|a| a.to_string()),
                         "user": user, "method": req.method().as_str(), "path": req.uri().path(),
                         "need": what}));
            reg.metrics.auth_denied();
            Err(e)
        }
        Err(Refusal::Other(e)) => Err(e),
    }
}

async fn check<B: ReqBody>(reg: &Registry, auth: &Auth, need: &Need, req: &mut Request<B>) -> Result<Caller, Refusal> {
    let challenge =
        |req: &Request<B>, scope: Option<Scope>| auth.challenge(scheme(reg), host(req).as_deref(), scope.as_ref());
    let unauthorized = |req: &Request<B>, scope: Option<Scope>, message: String| RegistryError::Unauthorized {
        challenge: challenge(req, scope),
        message,
    };
    let caller = match Credentials::from_headers(req.headers()) {
        Ok(c) => auth.identify(c).await,
        Err(f) => Err(f),
    };
    let caller = match caller {
        Ok(c) => c,
        Err(f) => {
            let scope = match need {
                Need::Repo(name, a) => Some(Scope::repository(name.as_str(), wanted(*a))),
                _ => None,
            };
            let e = unauthorized(req, scope, f.to_string());
            return Err(Refusal::Failed(f, e));
        }
    };
    let st = auth.state();
    let state = &st.1;
    let ok = match need {
        Need::Nothing => true,
        Need::Known | Need::Catalog if caller.is_anonymous() => {
            let scope = matches!(need, Need::Catalog).then(|| Scope::parse("registry:catalog:*").expect("valid"));
            return Err(Refusal::Other(unauthorized(req, scope, "credentials required".into())));
        }
        Need::Known => true,
        Need::Catalog => match &caller.claims {
            // a token must carry the catalog scope, as Distribution requires
            Some(c) if !c.grants("registry", "catalog", "*") => {
                let scope = Scope::parse("registry:catalog:*").expect("valid");
                return Err(Refusal::Other(unauthorized(req, Some(scope), "token lacks the catalog scope".into())));
            }
            _ => true,
        },
        Need::Repo(name, a) => {
            if caller.allowed(state, name.as_str()).contains(*a) {
                true
            } else if caller.is_anonymous()
                || caller.external
                || (caller.claims.is_some() && state.allowed(&caller.principal, name.as_str()).contains(*a))
            {
                // no credentials, or a token that lacks a scope its holder may get: ask for one
                let scope = Scope::repository(name.as_str(), wanted(*a));
                let message = format!("{a} access to the repository needs credentials");
                return Err(Refusal::Other(unauthorized(req, Some(scope), message)));
            } else {
                false
            }
        }
        Need::Admin | Need::Metrics if caller.is_anonymous() => {
            return Err(Refusal::Other(unauthorized(req, None, "credentials required".into())));
        }
        Need::Admin => caller.is_admin(state),
        Need::Metrics => caller.may_scrape(state),
    };
    if !ok {
        let what = match need {
            Need::Repo(name, a) => format!("{a} on {name}"),
            Need::Admin => "admin".into(),
            _ => "metrics".into(),
        };
        let e = RegistryError::Denied(match need {
            Need::Repo(_, a) => format!("requested access to the resource is denied: {a} not granted"),
            _ => "requested access to the resource is denied".into(),
        });
        req.extensions_mut().insert(caller);
        return Err(Refusal::Denied(what, e));
    }
    Ok(caller)
}

/// The scope a challenge names for an action: Docker asks `pull,push` for a push, so a
/// challenge for push does too.
fn wanted(a: Actions) -> Actions {
    if a.contains(Actions::PUSH) {
        a.union(Actions::PULL)
    } else {
        a
    }
}

/// Counts and logs a failed authentication, and locks the address out past the threshold.
fn refused<B>(reg: &Registry, auth: &Auth, addr: Option<IpAddr>, req: &Request<B>, user: Option<&str>, f: &Failure) {
    reg.metrics.auth_failure(f.reason());
    // only what looks like a guess counts (not an expired token or a directory that is down)
    let locked = f.is_guess() && addr.is_some_and(|a| auth.lockout.failure(a));
    audit(json!({"audit": "auth_failed", "node": reg.meta.id(), "client": addr.map(|a| a.to_string()),
                 "user": user, "reason": f.reason(), "method": req.method().as_str(), "path": req.uri().path(),
                 "locked_out": locked}));
    if locked {
        tracing::warn!(client = ?addr, "address locked out after repeated authentication failures");
    }
}

/// Records a robot token's use in the log, at most once a minute per node, in the background.
fn note_robot_use(reg: &Registry, auth: &Auth, caller: &Caller) {
    if let Principal::Robot { id, .. } = &caller.principal {
        if auth.robot_use_due(id) {
            let meta = reg.meta.clone();
            let ev = Event::RobotUsed { id: id.clone(), at_ms: raftyard_types::event::now_ms() };
            tokio::spawn(async move {
                if let Err(e) = meta.propose(vec![ev]).await {
                    tracing::debug!(error = %e, "recording a robot token's use failed");
                }
            });
        }
    }
}

/// A password check that, when it fails, is tried once more after a read barrier that brought
/// new users (one added through another node a moment ago).
async fn password_fresh(reg: &Registry, auth: &Auth, user: &str, pw: &str) -> Result<Identity, Failure> {
    let before = auth.state().0;
    let r = auth.authenticate(user, pw).await;
    if r.is_err() && reg.meta.read_barrier().await.is_ok() && auth.state().0 != before {
        return auth.authenticate(user, pw).await;
    }
    r
}

/// Longest token request body (a form of a few fields).
const MAX_FORM: usize = 16 * 1024;

/// `GET /auth/token` (Basic or anonymous, `scope`, `offline_token`) and `POST /auth/token`
/// (the OAuth2 form: `grant_type=password` or `refresh_token`).
pub(crate) async fn token_endpoint<B: ReqBody>(reg: &Registry, req: Request<B>) -> HandlerResult {
    let Some(auth) = reg.auth.as_ref().filter(|a| a.mode() == Mode::Token) else {
        return Err(RegistryError::NotFound);
    };
    let addr = client_of(&req);
    if let Some(left) = addr.and_then(|a| auth.lockout.locked(a)) {
        return Err(RegistryError::LockedOut(left.as_secs().max(1)));
    }
    let basic_challenge = || format!("Basic realm=\"{}\"", auth.settings().service.replace('"', ""));
    let mut scopes = Vec::new();
    let (identity, offline) = if req.method() == Method::POST {
        let (parts, body) = req.into_parts();
        let bytes = collect_limited(body, MAX_FORM).await?;
        let form: Vec<(String, String)> = url_form(&bytes);
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        for s in form.iter().filter(|(k, _)| k == "scope") {
            scopes.extend(s.1.split(' ').filter_map(Scope::parse));
        }
        let r = match get("grant_type") {
            Some("password") => password_fresh(reg, auth, get("username").unwrap_or(""), get("password").unwrap_or(""))
                .await
                .map(|i| (i, get("access_type") == Some("offline"))),
            // a refresh grant gets no new refresh token: the one it holds keeps its end
            Some("refresh_token") => auth.refresh(get("refresh_token").unwrap_or("")).await.map(|i| (i, false)),
            grant => {
                return Err(RegistryError::OAuth {
                    error: if grant.is_none() { "invalid_request" } else { "unsupported_grant_type" },
                    description: "grant_type must be password or refresh_token".into(),
                })
            }
        };
        let req = Request::from_parts(parts, ());
        match r {
            Ok(x) => x,
            Err(f @ Failure::Unavailable) => {
                refused(reg, auth, addr, &req, get("username"), &f);
                return Err(RegistryError::Unavailable(f.to_string()));
            }
            Err(f) => {
                refused(reg, auth, addr, &req, get("username"), &f);
                return Err(RegistryError::OAuth { error: "invalid_grant", description: f.to_string() });
            }
        }
    } else {
        let q = crate::endpoint::parse_query(req.uri().query());
        for (k, v) in &q {
            if k == "scope" {
                scopes.extend(v.split(' ').filter_map(Scope::parse));
            }
        }
        let offline = q.iter().any(|(k, v)| k == "offline_token" && v == "true");
        match Credentials::from_headers(req.headers()) {
            Ok(Credentials::None) => (Identity { principal: Principal::Anonymous, source: Source::Anonymous }, false),
            Ok(Credentials::Basic { user, password }) => match password_fresh(reg, auth, &user, &password).await {
                Ok(i) => (i, offline),
                Err(f) => {
                    refused(reg, auth, addr, &req, Some(&user), &f);
                    return Err(RegistryError::Unauthorized { challenge: basic_challenge(), message: f.to_string() });
                }
            },
            Ok(Credentials::Bearer(_)) | Err(_) => {
                let f = Failure::Malformed;
                refused(reg, auth, addr, &req, None, &f);
                return Err(RegistryError::Unauthorized { challenge: basic_challenge(), message: f.to_string() });
            }
        }
    };
    let caller = Caller { principal: identity.principal.clone(), ..Caller::anonymous() };
    note_robot_use(reg, auth, &caller);
    let reply = match auth.issue(&identity, &scopes, offline) {
        Some(r) => r,
        None => {
            // no signing key yet (the leader makes one at start): make it now; whichever node
            // gets there first wins, the others' proposals apply as no-ops
            let key = raftyard_auth::token::new_signing_key(raftyard_types::event::now_ms());
            reg.meta.propose(vec![Event::SigningKeyAdded { key, only_if_none: true }]).await?;
            auth.issue(&identity, &scopes, offline).ok_or_else(|| RegistryError::Internal("no signing key".into()))?
        }
    };
    let body = serde_json::to_vec(&reply).expect("json");
    let mut r = json_response(StatusCode::OK, body, false);
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

async fn collect_limited<B: ReqBody>(mut body: B, limit: usize) -> Result<Bytes, RegistryError> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| RegistryError::BlobUploadInvalid(format!("reading the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(RegistryError::TooLarge);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// `application/x-www-form-urlencoded` pairs.
fn url_form(b: &[u8]) -> Vec<(String, String)> {
    let s = String::from_utf8_lossy(b);
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec =
                |x: &str| percent_encoding::percent_decode_str(&x.replace('+', " ")).decode_utf8_lossy().into_owned();
            (dec(k), dec(v))
        })
        .collect()
}

/// The caller the door put into a request (an anonymous one, which may do nothing a grant
/// does not allow, where there was none).
pub(crate) fn caller_of<B>(req: &Request<B>) -> Caller {
    req.extensions().get::<Caller>().cloned().unwrap_or_else(Caller::anonymous)
}

/// Whether `caller` may pull any of `repos` (a mount's sources), reading the access state once.
pub(crate) fn may_pull_any<'a>(reg: &Registry, caller: &Caller, mut repos: impl Iterator<Item = &'a str>) -> bool {
    if caller.open {
        return true;
    }
    let Some(st) = reg.auth.as_ref().map(|a| a.state()) else { return false };
    repos.any(|r| caller.may_pull(&st.1, r))
}

/// Whether `caller` sees every repository and quota (the usage endpoint).
pub(crate) fn sees_all(reg: &Registry, caller: &Caller) -> bool {
    caller.open || reg.auth.as_ref().is_some_and(|a| caller.is_admin(&a.state().1))
}

/// The repositories of `repos` that belong in `caller`'s catalog, reading the access state once.
pub(crate) fn in_catalog(reg: &Registry, caller: &Caller, repos: Vec<String>) -> Vec<String> {
    if caller.open {
        return repos;
    }
    let Some(st) = reg.auth.as_ref().map(|a| a.state()) else { return vec![] };
    repos.into_iter().filter(|r| caller.in_catalog(&st.1, r)).collect()
}

pub(crate) type SharedAuth = Option<Arc<Auth>>;
