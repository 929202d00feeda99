//! Robot token secrets: `ryt_<id>_<secret>`, where the id (16 hex digits) names the token's
//! record and the secret is 256 random bits. The state keeps only the SHA-256 of the whole
//! string; with that much entropy a fast hash is enough.

use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

pub const PREFIX: &str = "ryt_";

/// A new token: its id, the secret to print once, and the hash to store.
pub fn generate() -> (String, String, Vec<u8>) {
    let rng = SystemRandom::new();
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rng.fill(&mut id).expect("the system's random source works");
    rng.fill(&mut secret).expect("the system's random source works");
    let id = hex::encode(id);
    let full = format!("{PREFIX}{id}_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret));
    let hash = digest(&full);
    (id, full, hash)
}

pub fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// The id inside something that looks like a robot secret.
pub fn id_of(secret: &str) -> Option<&str> {
    let rest = secret.strip_prefix(PREFIX)?;
    let (id, s) = rest.split_once('_')?;
    (id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) && s.len() >= 43).then_some(id)
}

/// Whether `secret` hashes to `stored`, in constant time.
pub fn matches(secret: &str, stored: &[u8]) -> bool {
    digest(secret).ct_eq(stored).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let (id, secret, hash) = generate();
        assert_eq!(id_of(&secret), Some(id.as_str()));
        assert!(matches(&secret, &hash));
        let mut wrong = secret.clone();
        wrong.pop();
        wrong.push('A');
        assert!(!matches(&wrong, &hash) || secret.ends_with('A'));
        assert_eq!(id_of("password"), None);
        assert_eq!(id_of("ryt_zz_abc"), None);
    }
}
