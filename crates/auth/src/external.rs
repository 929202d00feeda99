//! Tokens of an outside issuer, as CNCF Distribution accepts them (`REGISTRY_AUTH=token` with
//! `realm`, `service`, `issuer`, `rootcertbundle`): a JWT signed with RS256/384/512 or
//! ES256/384, whose key is named either by an `x5c` certificate chain that ends at a
//! certificate of the bundle, or by a `kid` that is the libtrust key id of a certificate's key
//! in the bundle. `iss` must be the issuer, `aud` the service, `exp`/`nbf` hold; the `access`
//! claim says what the token grants.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustls::pki_types::{CertificateDer, UnixTime};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::token::{map_error, Access, Claims, TokenError};

/// The configured outside issuer.
pub struct ExternalIssuer {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    roots: Vec<CertificateDer<'static>>,
    /// libtrust key id → the key of a bundle certificate.
    keys: HashMap<String, Key>,
}

#[derive(Clone)]
struct Key {
    rsa: bool,
    decoding: DecodingKey,
}

const RSA_OID: &str = "1.2.840.113549.1.1.1";
const EC_OID: &str = "1.2.840.10045.2.1";

/// The public key of a DER certificate, and its libtrust key id.
fn key_of(der: &[u8]) -> Result<(String, Key), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("certificate: {e}"))?;
    let spki = &cert.tbs_certificate.subject_pki;
    let bits = spki.subject_public_key.data.as_ref();
    let key = match spki.algorithm.algorithm.to_id_string().as_str() {
        RSA_OID => Key { rsa: true, decoding: DecodingKey::from_rsa_der(bits) },
        EC_OID => Key { rsa: false, decoding: DecodingKey::from_ec_der(bits) },
        other => return Err(format!("certificate key algorithm {other} is neither RSA nor EC")),
    };
    Ok((libtrust_kid(spki.raw), key))
}

/// The key id Distribution computes (docker/libtrust): the first 240 bits of the SHA-256 of
/// the DER public key, in base32, as 12 groups of 4 characters joined by `:`.
pub fn libtrust_kid(spki_der: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let h = Sha256::digest(spki_der);
    let mut out = String::new();
    let (mut acc, mut n) = (0u32, 0);
    for &b in &h[..30] {
        acc = (acc << 8) | b as u32;
        n += 8;
        while n >= 5 {
            n -= 5;
            out.push(ALPHABET[((acc >> n) & 31) as usize] as char);
        }
    }
    out.as_bytes().chunks(4).map(|c| std::str::from_utf8(c).expect("ascii")).collect::<Vec<_>>().join(":")
}

/// Claims as outside issuers write them: `aud` may be a string or a list, and some claims
/// may be missing.
#[derive(Deserialize)]
struct OutsideClaims {
    #[serde(default)]
    iss: String,
    #[serde(default)]
    sub: String,
    #[serde(default)]
    exp: u64,
    #[serde(default)]
    nbf: u64,
    #[serde(default)]
    iat: u64,
    #[serde(default)]
    jti: String,
    #[serde(default)]
    access: Vec<Access>,
}

impl ExternalIssuer {
    pub fn load(realm: &str, service: &str, issuer: &str, bundle: &Path) -> Result<ExternalIssuer, String> {
        let pem = std::fs::read(bundle).map_err(|e| format!("{}: {e}", bundle.display()))?;
        let mut roots = Vec::new();
        let mut keys = HashMap::new();
        for c in rustls_pemfile::certs(&mut pem.as_slice()) {
            let c = c.map_err(|e| format!("{}: {e}", bundle.display()))?;
            let (kid, key) = key_of(c.as_ref()).map_err(|e| format!("{}: {e}", bundle.display()))?;
            keys.insert(kid, key);
            roots.push(c.into_owned());
        }
        if roots.is_empty() {
            return Err(format!("{}: no certificate", bundle.display()));
        }
        Ok(ExternalIssuer { realm: realm.into(), service: service.into(), issuer: issuer.into(), roots, keys })
    }

    /// Whether a token names a key of this issuer (an `x5c` chain, or a `kid` of the bundle).
    pub fn claims_key(&self, token: &str) -> bool {
        match jsonwebtoken::decode_header(token) {
            Ok(h) => h.x5c.is_some() || h.kid.is_some_and(|k| self.keys.contains_key(&k)),
            Err(_) => false,
        }
    }

    /// The leaf key of an `x5c` chain that ends at a certificate of the bundle.
    fn chain_key(&self, x5c: &[String]) -> Result<Key, TokenError> {
        let ders: Vec<CertificateDer<'static>> = x5c
            .iter()
            .map(|c| base64::engine::general_purpose::STANDARD.decode(c).map(CertificateDer::from))
            .collect::<Result<_, _>>()
            .map_err(|_| TokenError::Malformed)?;
        let leaf = ders.first().ok_or(TokenError::Malformed)?;
        if !self.roots.iter().any(|r| r.as_ref() == leaf.as_ref()) {
            let anchors: Vec<_> = self.roots.iter().filter_map(|r| webpki::anchor_from_trusted_cert(r).ok()).collect();
            let ee = webpki::EndEntityCert::try_from(leaf).map_err(|_| TokenError::Malformed)?;
            ee.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &ders[1..],
                UnixTime::now(),
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .map_err(|_| TokenError::UnknownKey)?;
        }
        key_of(leaf.as_ref()).map(|(_, k)| k).map_err(|_| TokenError::UnknownKey)
    }

    /// Verifies an outside token; its claims as this crate's.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let rsa = match header.alg {
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => true,
            Algorithm::ES256 | Algorithm::ES384 => false,
            _ => return Err(TokenError::Signature),
        };
        let key = match (&header.x5c, &header.kid) {
            (Some(chain), _) => self.chain_key(chain)?,
            (None, Some(kid)) => self.keys.get(kid).cloned().ok_or(TokenError::UnknownKey)?,
            (None, None) => return Err(TokenError::UnknownKey),
        };
        if key.rsa != rsa {
            return Err(TokenError::Signature);
        }
        let mut v = Validation::new(header.alg);
        v.leeway = 30;
        v.validate_nbf = true;
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.service]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let c = jsonwebtoken::decode::<OutsideClaims>(token, &key.decoding, &v).map_err(map_error)?.claims;
        Ok(Claims {
            iss: c.iss,
            sub: c.sub,
            aud: self.service.clone(),
            exp: c.exp,
            nbf: c.nbf,
            iat: c.iat,
            jti: c.jti,
            access: c.access,
            grp: vec![],
            rid: None,
            token_use: None,
            src: None,
            gen: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use rcgen::{CertificateParams, KeyPair};

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    fn claims(aud: serde_json::Value, exp_in: i64) -> serde_json::Value {
        let n = now() as i64;
        serde_json::json!({"iss": "auth.example", "sub": "ext-user", "aud": aud, "exp": n + exp_in, "nbf": n - 5,
                           "iat": n, "jti": "x",
                           "access": [{"type": "repository", "name": "team/app", "actions": ["pull"]}]})
    }

    fn b64(d: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(d)
    }

    #[test]
    fn x5c_chains_kids_and_negatives() {
        let dir = tempfile::tempdir().unwrap();
        // a CA in the bundle; a leaf signed by it (x5c); a second key whose own cert is in the bundle (kid)
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(vec![]).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf =
            CertificateParams::new(vec!["auth.example".into()]).unwrap().signed_by(&leaf_key, &ca, &ca_key).unwrap();
        let kid_key = KeyPair::generate().unwrap();
        let kid_cert = CertificateParams::new(vec!["signer".into()]).unwrap().self_signed(&kid_key).unwrap();
        let bundle = dir.path().join("bundle.pem");
        std::fs::write(&bundle, format!("{}{}", ca.pem(), kid_cert.pem())).unwrap();
        let ext = ExternalIssuer::load("https://auth.example/token", "registry", "auth.example", &bundle).unwrap();

        let sign = |key: &KeyPair, h: Header, c: &serde_json::Value| {
            jsonwebtoken::encode(&h, c, &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap()).unwrap()
        };
        let mut h = Header::new(Algorithm::ES256);
        h.x5c = Some(vec![b64(leaf.der()), b64(ca.der())]);
        let t = sign(&leaf_key, h.clone(), &claims(serde_json::json!("registry"), 300));
        let c = ext.verify(&t).unwrap();
        assert_eq!(c.sub, "ext-user");
        assert_eq!(c.repository_actions("team/app"), raftyard_types::access::Actions::PULL);
        // aud as a list, as some issuers write it
        let t = sign(&leaf_key, h.clone(), &claims(serde_json::json!(["other", "registry"]), 300));
        assert!(ext.verify(&t).is_ok());
        // kid of a bundle certificate
        let mut hk = Header::new(Algorithm::ES256);
        let spki = {
            let (_, parsed) = x509_parser::parse_x509_certificate(kid_cert.der()).unwrap();
            parsed.tbs_certificate.subject_pki.raw.to_vec()
        };
        hk.kid = Some(libtrust_kid(&spki));
        assert!(ext.claims_key(&sign(&kid_key, hk.clone(), &claims(serde_json::json!("registry"), 300))));
        assert!(ext.verify(&sign(&kid_key, hk.clone(), &claims(serde_json::json!("registry"), 300))).is_ok());
        // negatives: a self-made chain, a wrong audience, an expired token, an unknown kid,
        // the leaf's key signing under the kid of another key
        let rogue_key = KeyPair::generate().unwrap();
        let rogue = CertificateParams::new(vec!["auth.example".into()]).unwrap().self_signed(&rogue_key).unwrap();
        let mut hr = Header::new(Algorithm::ES256);
        hr.x5c = Some(vec![b64(rogue.der())]);
        let t = sign(&rogue_key, hr, &claims(serde_json::json!("registry"), 300));
        assert_eq!(ext.verify(&t).unwrap_err(), TokenError::UnknownKey);
        let t = sign(&leaf_key, h.clone(), &claims(serde_json::json!("elsewhere"), 300));
        assert_eq!(ext.verify(&t).unwrap_err(), TokenError::Audience);
        let t = sign(&leaf_key, h.clone(), &claims(serde_json::json!("registry"), -100));
        assert_eq!(ext.verify(&t).unwrap_err(), TokenError::Expired);
        let mut hu = Header::new(Algorithm::ES256);
        hu.kid = Some("AAAA:BBBB".into());
        assert_eq!(
            ext.verify(&sign(&kid_key, hu, &claims(serde_json::json!("registry"), 300))).unwrap_err(),
            TokenError::UnknownKey
        );
        assert_eq!(
            ext.verify(&sign(&leaf_key, hk, &claims(serde_json::json!("registry"), 300))).unwrap_err(),
            TokenError::Signature
        );
        let mut wrong_iss = claims(serde_json::json!("registry"), 300);
        wrong_iss["iss"] = "someone".into();
        assert_eq!(ext.verify(&sign(&leaf_key, h, &wrong_iss)).unwrap_err(), TokenError::Issuer);
    }

    #[test]
    fn libtrust_kid_shape() {
        let k = libtrust_kid(b"any key");
        assert_eq!(k.len(), 12 * 4 + 11);
        assert!(k
            .split(':')
            .all(|g| g.len() == 4 && g.bytes().all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))));
    }
}
