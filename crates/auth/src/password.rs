//! Password hashes: argon2id (PHC strings) for the cluster's users, bcrypt for htpasswd files
//! (`htpasswd -B`, what Distribution reads). Verifying is deliberately slow; callers cache
//! what they verified.

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Hashes a new password with argon2id and its default cost (19 MiB, 2 passes).
pub fn hash(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("argon2 with default parameters hashes any password")
        .to_string()
}

/// Whether `password` matches `stored`: an argon2 PHC string or a bcrypt hash (`$2a$`, `$2b$`,
/// `$2y$`). Anything else never matches.
pub fn verify(password: &str, stored: &str) -> bool {
    if stored.starts_with("$2") {
        return bcrypt::verify(password, stored).unwrap_or(false);
    }
    match PasswordHash::new(stored) {
        Ok(h) => Argon2::default().verify_password(password.as_bytes(), &h).is_ok(),
        Err(_) => false,
    }
}

/// A hash in a known format, so that a bad `--hash` never locks a user out silently.
pub fn well_formed(stored: &str) -> bool {
    if stored.starts_with("$2") {
        return stored.len() == 60;
    }
    PasswordHash::new(stored).is_ok_and(|h| h.algorithm.as_str().starts_with("argon2"))
}

/// A hash to verify against when the user does not exist, so that an unknown user costs the
/// same time as a wrong password.
pub fn decoy() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash("raftyard decoy password"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2_and_bcrypt() {
        let h = hash("s3cret");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify("s3cret", &h));
        assert!(!verify("s3cret ", &h));
        let b = bcrypt::hash("s3cret", 4).unwrap();
        assert!(verify("s3cret", &b));
        assert!(!verify("other", &b));
        assert!(!verify("s3cret", "s3cret"), "a clear-text 'hash' never matches");
        assert!(well_formed(&h) && well_formed(&b) && !well_formed("plain"));
    }
}
