//! Docker registry tokens: scopes, the JWT claims, signing with the cluster's key (ES256) and
//! verifying.
//!
//! A token names its issuer (`iss`), its audience (`aud`, the service), its validity (`nbf`,
//! `exp`) and what it grants (`access`: type, name, actions), as Distribution's token auth
//! does. Verification accepts ES256 only, with a key found by `kid` among the cluster's keys:
//! `alg: none`, HMAC algorithms and unknown keys are refused before any claim is read.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use raftyard_types::access::{Actions, SigningKey};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// What a client asks for: `repository:team/app:pull,push`, `registry:catalog:*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

impl Scope {
    /// Parses one scope; several may be given space-separated in one `scope` parameter.
    pub fn parse(s: &str) -> Option<Scope> {
        let (kind, rest) = s.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        // `repository(plugin):name:pull`: the class is not part of the type
        let kind = kind.split_once('(').map_or(kind, |(k, _)| k);
        if kind.is_empty() || name.is_empty() {
            return None;
        }
        Some(Scope {
            kind: kind.to_string(),
            name: name.to_string(),
            actions: actions.split(',').filter(|a| !a.is_empty()).map(str::to_string).collect(),
        })
    }

    pub fn repository(name: &str, actions: Actions) -> Scope {
        Scope {
            kind: "repository".into(),
            name: name.into(),
            actions: actions.names().into_iter().map(str::to_string).collect(),
        }
    }

    pub fn to_header(&self) -> String {
        format!("{}:{}:{}", self.kind, self.name, self.actions.join(","))
    }
}

/// One entry of the `access` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub actions: Vec<String>,
}

/// The claims of a token this cluster issues (and the subset an external issuer's carry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    pub nbf: u64,
    pub iat: u64,
    pub jti: String,
    #[serde(default)]
    pub access: Vec<Access>,
    /// raftyard: groups an outside source (LDAP) named at issue time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grp: Vec<String>,
    /// raftyard: the robot token's id, for a token issued to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rid: Option<String>,
    /// raftyard: `refresh` for a refresh token (never accepted as an access token).
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "use")]
    pub token_use: Option<String>,
    /// raftyard, refresh tokens: where the identity came from (`state`, `htpasswd`, `ldap`,
    /// `robot`), looked up there again on every refresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<String>,
    /// raftyard, refresh tokens: a digest of the password hash at issue; a changed password
    /// ends the refresh token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen: Option<String>,
}

impl Claims {
    /// The actions this token grants on a repository.
    pub fn repository_actions(&self, repo: &str) -> Actions {
        self.access
            .iter()
            .filter(|a| a.kind == "repository" && a.name == repo)
            .fold(Actions::NONE, |acc, a| acc.union(Actions::from_names(a.actions.iter().map(String::as_str))))
    }

    /// Whether the token grants `action` on `kind:name` (for `registry:catalog:*`).
    pub fn grants(&self, kind: &str, name: &str, action: &str) -> bool {
        self.access
            .iter()
            .any(|a| a.kind == kind && a.name == name && a.actions.iter().any(|x| x == action || x == "*"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token signed by an unknown key")]
    UnknownKey,
    #[error("token signature or algorithm refused")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("token issued by another issuer")]
    Issuer,
    #[error("token issued for another service")]
    Audience,
    #[error("refresh token used as an access token")]
    WrongUse,
}

/// A new signing key: a random P-256 key pair, as PKCS#8, with its key id.
pub fn new_signing_key(now_ms: u64) -> SigningKey {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .expect("P-256 key generation works")
        .as_ref()
        .to_vec();
    let kid = kid_of(&pkcs8).expect("a key just generated parses");
    SigningKey { kid, pkcs8, created_ms: now_ms }
}

fn public_point(pkcs8: &[u8]) -> Option<Vec<u8>> {
    let rng = SystemRandom::new();
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8, &rng)
        .ok()
        .map(|k| k.public_key().as_ref().to_vec())
}

/// The key id: the first 16 bytes of the SHA-256 of the public point, hex.
fn kid_of(pkcs8: &[u8]) -> Option<String> {
    let p = public_point(pkcs8)?;
    Some(hex::encode(&Sha256::digest(&p)[..16]))
}

/// Signs the claims with the key (ES256, `kid` in the header).
pub fn sign(key: &SigningKey, claims: &Claims) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&h, claims, &EncodingKey::from_ec_der(&key.pkcs8)).expect("an ES256 key from the state signs")
}

/// Verifies a token of this cluster: ES256 by one of `keys`, issuer and audience as given,
/// within its validity (30 s of clock skew allowed). A refresh token is refused unless
/// `refresh` is set (and then only a refresh token passes).
pub fn verify(
    keys: &[SigningKey],
    token: &str,
    issuer: &str,
    audience: &str,
    refresh: bool,
) -> Result<Claims, TokenError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
    if header.alg != Algorithm::ES256 {
        return Err(TokenError::Signature);
    }
    let kid = header.kid.ok_or(TokenError::UnknownKey)?;
    let key = keys.iter().find(|k| k.kid == kid).ok_or(TokenError::UnknownKey)?;
    let point = public_point(&key.pkcs8).ok_or(TokenError::UnknownKey)?;
    let mut v = Validation::new(Algorithm::ES256);
    v.leeway = 30;
    v.validate_nbf = true;
    v.set_issuer(&[issuer]);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
    let data = jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_ec_der(&point), &v).map_err(map_error)?;
    let is_refresh = data.claims.token_use.as_deref() == Some("refresh");
    if is_refresh != refresh {
        return Err(TokenError::WrongUse);
    }
    Ok(data.claims)
}

pub(crate) fn map_error(e: jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => TokenError::Expired,
        K::ImmatureSignature => TokenError::NotYetValid,
        K::InvalidIssuer => TokenError::Issuer,
        K::InvalidAudience => TokenError::Audience,
        K::InvalidSignature | K::InvalidAlgorithm | K::InvalidAlgorithmName | K::InvalidKeyFormat => {
            TokenError::Signature
        }
        _ => TokenError::Malformed,
    }
}

/// A token id: 128 random bits, hex.
pub fn jti() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    SystemRandom::new().fill(&mut b).expect("the system's random source works");
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    fn claims(exp_in: i64, nbf_in: i64) -> Claims {
        let n = now() as i64;
        Claims {
            iss: "raftyard".into(),
            sub: "alice".into(),
            aud: "registry".into(),
            exp: (n + exp_in) as u64,
            nbf: (n + nbf_in) as u64,
            iat: n as u64,
            jti: jti(),
            access: vec![Access { kind: "repository".into(), name: "team/app".into(), actions: vec!["pull".into()] }],
            grp: vec![],
            rid: None,
            token_use: None,
            src: None,
            gen: None,
        }
    }

    fn b64(v: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
    }

    #[test]
    fn sign_verify_and_negatives() {
        let key = new_signing_key(0);
        let other = new_signing_key(0);
        let keys = vec![key.clone()];
        let good = sign(&key, &claims(300, 0));
        let c = verify(&keys, &good, "raftyard", "registry", false).unwrap();
        assert_eq!(c.repository_actions("team/app"), Actions::PULL);
        assert_eq!(c.repository_actions("team/other"), Actions::NONE, "a token for another repository");
        assert_eq!(
            verify(&keys, &sign(&key, &claims(-120, -400)), "raftyard", "registry", false),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verify(&keys, &sign(&key, &claims(900, 300)), "raftyard", "registry", false),
            Err(TokenError::NotYetValid)
        );
        assert_eq!(verify(&keys, &good, "raftyard", "other", false), Err(TokenError::Audience));
        assert_eq!(verify(&keys, &good, "someone", "registry", false), Err(TokenError::Issuer));
        // signed by a key the cluster does not have (under its own kid, then under ours)
        assert_eq!(
            verify(&keys, &sign(&other, &claims(300, 0)), "raftyard", "registry", false),
            Err(TokenError::UnknownKey)
        );
        let forged = SigningKey { kid: key.kid.clone(), ..other.clone() };
        assert_eq!(
            verify(&keys, &sign(&forged, &claims(300, 0)), "raftyard", "registry", false),
            Err(TokenError::Signature)
        );
        // alg none
        let body = b64(&serde_json::to_vec(&claims(300, 0)).unwrap());
        let none = format!("{}.{}.", b64(format!(r#"{{"alg":"none","kid":"{}"}}"#, key.kid).as_bytes()), body);
        assert_eq!(verify(&keys, &none, "raftyard", "registry", false), Err(TokenError::Malformed));
        // HS256 with the public key as the HMAC secret (algorithm confusion)
        let public = public_point(&key.pkcs8).unwrap();
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(key.kid.clone());
        let hs = jsonwebtoken::encode(&h, &claims(300, 0), &EncodingKey::from_secret(&public)).unwrap();
        assert_eq!(verify(&keys, &hs, "raftyard", "registry", false), Err(TokenError::Signature));
        // a tampered payload
        let mut parts: Vec<&str> = good.split('.').collect();
        let mut c2 = claims(300, 0);
        c2.access[0].actions.push("push".into());
        let tampered_body = b64(&serde_json::to_vec(&c2).unwrap());
        parts[1] = &tampered_body;
        assert_eq!(verify(&keys, &parts.join("."), "raftyard", "registry", false), Err(TokenError::Signature));
        // refresh tokens are not access tokens, and the other way round
        let mut r = claims(3600, 0);
        r.token_use = Some("refresh".into());
        let refresh = sign(&key, &r);
        assert_eq!(verify(&keys, &refresh, "raftyard", "registry", false), Err(TokenError::WrongUse));
        assert!(verify(&keys, &refresh, "raftyard", "registry", true).is_ok());
        assert_eq!(verify(&keys, &good, "raftyard", "registry", true), Err(TokenError::WrongUse));
        assert_eq!(verify(&keys, "garbage", "raftyard", "registry", false), Err(TokenError::Malformed));
    }

    #[test]
    fn scopes() {
        let s = Scope::parse("repository:team/app:pull,push").unwrap();
        assert_eq!((s.kind.as_str(), s.name.as_str()), ("repository", "team/app"));
        assert_eq!(s.actions, vec!["pull", "push"]);
        let s = Scope::parse("repository(plugin):x:pull").unwrap();
        assert_eq!(s.kind, "repository");
        assert_eq!(Scope::parse("registry:catalog:*").unwrap().actions, vec!["*"]);
        assert!(Scope::parse("nonsense").is_none());
        assert_eq!(Scope::repository("a/b", Actions::ALL).to_header(), "repository:a/b:pull,push,delete");
    }
}
