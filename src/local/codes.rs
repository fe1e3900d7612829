//! Local codes: who may command a lock through local control (Home Assistant, the local
//! broker), checked against Argon2id hashes, with a lockout after repeated wrong codes.
//!
//! Codes come from two places: `[[local.codes]]` in the configuration (a user by name) and
//! owner-signed `lockhub.local_code` statements (a user by key, for one lock, for a window).
//! Only hashes are configured or stored; a code arrives, is checked against every hash that
//! could open the lock (so the time taken does not tell how many users there are before the
//! matching one) and is zeroized.
//! Wrong codes count for local control as a whole, not per user: the code is what tells the
//! users apart, so a guesser has no user to be counted against.

use std::collections::VecDeque;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use thiserror::Error;
use zeroize::Zeroizing;

use super::config::{LocalCodeEntry, LocalConfig};
use crate::auth::local_code::{CodeHolder, HashError, IssuedCode, validate_hash, well_formed};

/// Why a configured code entry is unusable.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodeError {
    /// Not a usable hash.
    #[error("the hash for {user:?} is {source}; make one with `lockhub hash-code`")]
    BadHash {
        /// Whose.
        user: String,
        /// What is wrong with it.
        source: HashError,
    },
    /// The same user twice.
    #[error("{user:?} appears twice")]
    Duplicate {
        /// Whose.
        user: String,
    },
    /// A code to hash that is not 4 to 12 digits.
    #[error("a local code is 4 to 12 digits")]
    BadCode,
}

/// What checking a code found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CodeCheck {
    /// The code is this user's.
    Accepted {
        /// Who.
        user: CodeHolder,
    },
    /// Nobody's code (it counts toward the lockout).
    Wrong,
    /// Local control is locked out for this many more seconds; the code was not checked.
    LockedOut {
        /// Seconds left.
        for_s: i64,
    },
}

/// The Argon2id parameters for new hashes: 19 MiB, 2 passes, 1 lane (OWASP's minimum for
/// Argon2id). Stored hashes carry their own parameters, so these can grow.
fn hasher() -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::new(19 * 1024, 2, 1, None).expect("constant parameters"))
}

/// Hashes a code for the configuration (`lockhub hash-code`).
pub fn hash_code(code: &str) -> Result<String, CodeError> {
    if !well_formed(code) {
        return Err(CodeError::BadCode);
    }
    let salt = SaltString::generate(&mut rand_core::OsRng);
    Ok(hasher().hash_password(code.as_bytes(), &salt).map_err(|_| CodeError::BadCode)?.to_string())
}

/// The configured codes and the lockout state.
#[derive(Debug)]
pub struct CodeBook {
    entries: Vec<LocalCodeEntry>,
    lockout_failures: usize,
    lockout_window_s: i64,
    lockout_s: i64,
    failures: VecDeque<i64>,
    locked_until: i64,
}

impl CodeBook {
    /// Checks the configured entries and builds the book.
    pub fn new(config: &LocalConfig) -> Result<Self, CodeError> {
        for (i, entry) in config.codes.iter().enumerate() {
            validate_hash(&entry.hash).map_err(|source| CodeError::BadHash { user: entry.user.clone(), source })?;
            if config.codes[..i].iter().any(|e| e.user == entry.user) {
                return Err(CodeError::Duplicate { user: entry.user.clone() });
            }
        }
        Ok(CodeBook {
            entries: config.codes.clone(),
            lockout_failures: config.lockout_failures.max(1) as usize,
            lockout_window_s: config.lockout_window_s,
            lockout_s: config.lockout_s,
            failures: VecDeque::new(),
            locked_until: 0,
        })
    }

    /// Checks `code` at `now` (Unix seconds) against the configured codes and `issued`, the
    /// codes statements gave for the lock commanded (valid now). A malformed code is a wrong one.
    pub fn check(&mut self, code: Zeroizing<String>, now: i64, issued: &[IssuedCode]) -> CodeCheck {
        if self.locked_until > now {
            return CodeCheck::LockedOut { for_s: self.locked_until - now };
        }
        let matches = |hash: &str| {
            // A stored hash that fails validation is skipped, never tried at any cost.
            validate_hash(hash).is_ok()
                && PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(code.as_bytes(), &h).is_ok())
        };
        let mut found = None;
        if well_formed(&code) {
            // Every hash is tried, whichever matches.
            for entry in &self.entries {
                if matches(&entry.hash) && found.is_none() {
                    found = Some(CodeHolder::Named(entry.user.clone()));
                }
            }
            for issued in issued {
                if matches(&issued.hash) && found.is_none() {
                    found = Some(CodeHolder::Key(issued.user));
                }
            }
        }
        match found {
            Some(user) => CodeCheck::Accepted { user },
            None => {
                while self.failures.front().is_some_and(|t| *t <= now.saturating_sub(self.lockout_window_s)) {
                    self.failures.pop_front();
                }
                self.failures.push_back(now);
                if self.failures.len() >= self.lockout_failures {
                    self.failures.clear();
                    self.locked_until = now.saturating_add(self.lockout_s);
                    tracing::warn!(for_s = self.lockout_s, "too many wrong local codes: local control locked out");
                }
                CodeCheck::Wrong
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::keys::PublicKey;

    fn book(codes: &[(&str, &str)], failures: u32) -> CodeBook {
        let codes =
            codes.iter().map(|(u, c)| LocalCodeEntry { user: (*u).into(), hash: hash_code(c).unwrap() }).collect();
        CodeBook::new(&LocalConfig { codes, lockout_failures: failures, ..LocalConfig::default() }).unwrap()
    }

    fn code(s: &str) -> Zeroizing<String> {
        Zeroizing::new(s.into())
    }

    fn named(user: &str) -> CodeCheck {
        CodeCheck::Accepted { user: CodeHolder::Named(user.into()) }
    }

    #[test]
    fn the_right_code_names_its_user_and_hashes_are_salted() {
        let mut book = book(&[("alice", "2468"), ("bob", "13579")], 5);
        assert_eq!(book.check(code("13579"), 100, &[]), named("bob"));
        assert_eq!(book.check(code("2468"), 100, &[]), named("alice"));
        assert_ne!(hash_code("2468").unwrap(), hash_code("2468").unwrap());
        assert!(hash_code("2468").unwrap().starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
    }

    #[test]
    fn wrong_codes_lock_local_control_out_for_a_while() {
        let mut book = book(&[("alice", "2468")], 3);
        assert_eq!(book.check(code("0000"), 100, &[]), CodeCheck::Wrong);
        assert_eq!(book.check(code("not digits"), 101, &[]), CodeCheck::Wrong);
        assert_eq!(book.check(code("1111"), 102, &[]), CodeCheck::Wrong);
        // Locked out: even the right code is not checked.
        assert_eq!(book.check(code("2468"), 103, &[]), CodeCheck::LockedOut { for_s: 299 });
        assert_eq!(book.check(code("2468"), 402, &[]), named("alice"));
    }

    #[test]
    fn old_failures_leave_the_window() {
        let mut book = book(&[("alice", "2468")], 2);
        assert_eq!(book.check(code("0000"), 100, &[]), CodeCheck::Wrong);
        assert_eq!(book.check(code("0000"), 100 + 601, &[]), CodeCheck::Wrong);
        assert_eq!(book.check(code("2468"), 100 + 602, &[]), named("alice"));
    }

    #[test]
    fn configured_hashes_must_be_argon2id_and_users_unique() {
        let entry = |user: &str, hash: &str| LocalCodeEntry { user: user.into(), hash: hash.into() };
        let config = |codes| LocalConfig { codes, ..LocalConfig::default() };
        let err = CodeBook::new(&config(vec![entry("a", "2468")])).unwrap_err();
        assert_eq!(err, CodeError::BadHash { user: "a".into(), source: HashError::NotArgon2id });
        let h = hash_code("2468").unwrap();
        let err = CodeBook::new(&config(vec![entry("a", &h), entry("a", &h)])).unwrap_err();
        assert_eq!(err, CodeError::Duplicate { user: "a".into() });
        assert_eq!(hash_code("12"), Err(CodeError::BadCode));
    }

    #[test]
    fn issued_codes_name_their_key_and_costly_hashes_are_refused() {
        let mut book = book(&[("alice", "2468")], 5);
        let carol = PublicKey::from_bytes([7; 32]);
        let issued = [IssuedCode { user: carol, hash: hash_code("97531").unwrap() }];
        assert_eq!(book.check(code("97531"), 100, &issued), CodeCheck::Accepted { user: CodeHolder::Key(carol) });
        assert_eq!(book.check(code("97531"), 100, &[]), CodeCheck::Wrong);
        assert_eq!(book.check(code("2468"), 100, &issued), named("alice"));

        let costly = hash_code("2468").unwrap().replace("m=19456", "m=1048576");
        assert_eq!(validate_hash(&costly), Err(HashError::TooCostly));
        assert_eq!(
            validate_hash("$argon2i$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"),
            Err(HashError::NotArgon2id)
        );
        assert_eq!(validate_hash(&"x".repeat(300)), Err(HashError::NotArgon2id));
        // A costly hash that reached the store is never tried.
        let bad = [IssuedCode { user: carol, hash: costly }];
        assert_eq!(book.check(code("2468"), 100, &bad), named("alice"));
    }
}
