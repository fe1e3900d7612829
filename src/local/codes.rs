//! Local codes: who may command a lock through local control (Home Assistant, the local
//! broker), checked against Argon2id hashes, with a lockout after repeated wrong codes.
//!
//! Codes come from two places: `[[local.codes]]` in the configuration (a user by name) and
//! owner-signed `lockhub.local_code` statements (a user by key, for one lock, for a window).
//! Only hashes are configured or stored; a code arrives, is checked against every hash that
//! could open the lock (so the time taken does not tell how many users there are before the
//! matching one) and is zeroized.
//!
//! Wrong codes count per source and lock, not per user: the code is what tells the users apart,
//! so a guesser has no user to be counted against. A guesser at one lock locks out that lock
//! from that source only (everyone else's way in stays open); one spreading guesses over locks
//! meets a ceiling that locks all local control out.

use std::collections::{HashMap, VecDeque};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use thiserror::Error;
use zeroize::Zeroizing;

use super::config::{LocalCodeEntry, LocalConfig};
use crate::auth::local_code::{CodeHolder, HashError, IssuedCode, validate_hash, well_formed};
use crate::protocol::ids::LockId;

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
    /// A ceiling below the lockout of one lock.
    #[error("lockout_ceiling ({ceiling}) is below lockout_failures ({failures})")]
    CeilingBelowFailures {
        /// `lockout_ceiling`.
        ceiling: u32,
        /// `lockout_failures`.
        failures: u32,
    },
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
    /// Codes for this lock from this source, or all local control, are locked out for this
    /// many more seconds; the code was not checked.
    LockedOut {
        /// Seconds left.
        for_s: i64,
    },
}

/// Where a code was typed and for which lock: what wrong codes are counted against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Attempt {
    /// The way in (`"local MQTT"`; each local interface names its own).
    pub source: &'static str,
    /// The lock commanded.
    pub lock: LockId,
}

/// Wrong codes within the window, and a lockout.
#[derive(Debug, Default)]
struct Counter {
    failures: VecDeque<i64>,
    locked_until: i64,
}

impl Counter {
    /// Counts a failure at `now`; true when it starts a lockout.
    fn fail(&mut self, now: i64, window_s: i64, limit: usize, lockout_s: i64) -> bool {
        self.forget_before(now.saturating_sub(window_s));
        self.failures.push_back(now);
        if self.failures.len() < limit {
            return false;
        }
        self.failures.clear();
        self.locked_until = now.saturating_add(lockout_s);
        true
    }

    fn forget_before(&mut self, cutoff: i64) {
        while self.failures.front().is_some_and(|t| *t <= cutoff) {
            self.failures.pop_front();
        }
    }

    fn locked_for(&self, now: i64) -> Option<i64> {
        (self.locked_until > now).then(|| self.locked_until - now)
    }
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
    lockout_ceiling: usize,
    lockout_window_s: i64,
    lockout_s: i64,
    /// Per source and lock. Only keys with failures in the window or a lockout running are
    /// kept, so there are never more than the ceiling's worth.
    attempts: HashMap<Attempt, Counter>,
    all: Counter,
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
        if config.lockout_ceiling < config.lockout_failures {
            return Err(CodeError::CeilingBelowFailures {
                ceiling: config.lockout_ceiling,
                failures: config.lockout_failures,
            });
        }
        Ok(CodeBook {
            entries: config.codes.clone(),
            lockout_failures: config.lockout_failures.max(1) as usize,
            lockout_ceiling: config.lockout_ceiling.max(1) as usize,
            lockout_window_s: config.lockout_window_s,
            lockout_s: config.lockout_s,
            attempts: HashMap::new(),
            all: Counter::default(),
        })
    }

    /// Checks `code` at `now` (Unix seconds), typed at `attempt`, against the configured codes
    /// and `issued`, the codes statements gave for the lock commanded (valid now). A malformed
    /// code is a wrong one.
    pub fn check(&mut self, code: Zeroizing<String>, now: i64, attempt: Attempt, issued: &[IssuedCode]) -> CodeCheck {
        let cutoff = now.saturating_sub(self.lockout_window_s);
        self.attempts.retain(|_, c| {
            c.forget_before(cutoff);
            !c.failures.is_empty() || c.locked_until > now
        });
        let locked = [self.all.locked_for(now), self.attempts.get(&attempt).and_then(|c| c.locked_for(now))];
        if let Some(for_s) = locked.into_iter().flatten().max() {
            return CodeCheck::LockedOut { for_s };
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
        if let Some(user) = found {
            return CodeCheck::Accepted { user };
        }
        let (window, lockout) = (self.lockout_window_s, self.lockout_s);
        if self.attempts.entry(attempt).or_default().fail(now, window, self.lockout_failures, lockout) {
            tracing::warn!(
                lock_id = %attempt.lock,
                source = attempt.source,
                for_s = lockout,
                "too many wrong local codes for this lock: its local codes locked out"
            );
        }
        if self.all.fail(now, window, self.lockout_ceiling, lockout) {
            tracing::warn!(for_s = lockout, "too many wrong local codes over all locks: local control locked out");
        }
        CodeCheck::Wrong
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

    const FRONT: Attempt = Attempt { source: "local MQTT", lock: LockId([1; 8]) };
    const BACK: Attempt = Attempt { source: "local MQTT", lock: LockId([2; 8]) };

    fn code(s: &str) -> Zeroizing<String> {
        Zeroizing::new(s.into())
    }

    fn named(user: &str) -> CodeCheck {
        CodeCheck::Accepted { user: CodeHolder::Named(user.into()) }
    }

    #[test]
    fn the_right_code_names_its_user_and_hashes_are_salted() {
        let mut book = book(&[("alice", "2468"), ("bob", "13579")], 5);
        assert_eq!(book.check(code("13579"), 100, FRONT, &[]), named("bob"));
        assert_eq!(book.check(code("2468"), 100, FRONT, &[]), named("alice"));
        assert_ne!(hash_code("2468").unwrap(), hash_code("2468").unwrap());
        assert!(hash_code("2468").unwrap().starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
    }

    #[test]
    fn wrong_codes_lock_local_control_out_for_a_while() {
        let mut book = book(&[("alice", "2468")], 3);
        assert_eq!(book.check(code("0000"), 100, FRONT, &[]), CodeCheck::Wrong);
        assert_eq!(book.check(code("not digits"), 101, FRONT, &[]), CodeCheck::Wrong);
        assert_eq!(book.check(code("1111"), 102, FRONT, &[]), CodeCheck::Wrong);
        // Locked out: even the right code is not checked.
        assert_eq!(book.check(code("2468"), 103, FRONT, &[]), CodeCheck::LockedOut { for_s: 299 });
        assert_eq!(book.check(code("2468"), 402, FRONT, &[]), named("alice"));
    }

    /// A guesser at one lock shuts that lock's codes only: the right code still opens another
    /// lock meanwhile. Spreading guesses over locks meets the ceiling, and then all local
    /// control waits out the lockout.
    #[test]
    fn a_lockout_is_per_lock_under_a_ceiling_over_all() {
        let mut book = book(&[("alice", "2468")], 3);
        for t in 100..103 {
            assert_eq!(book.check(code("0000"), t, FRONT, &[]), CodeCheck::Wrong);
        }
        assert_eq!(book.check(code("2468"), 103, FRONT, &[]), CodeCheck::LockedOut { for_s: 299 });
        assert_eq!(book.check(code("2468"), 103, BACK, &[]), named("alice"));
        let other_source = Attempt { source: "control socket", ..FRONT };
        assert_eq!(book.check(code("2468"), 103, other_source, &[]), named("alice"));
        // Under a ceiling of 6, two wrong codes at each of three locks lock everything out.
        let mut book = book_with_ceiling(3, 6);
        let lock = |n: u8| Attempt { source: "local MQTT", lock: LockId([n; 8]) };
        for (t, n) in (200..206).zip([1, 1, 2, 2, 3, 3]) {
            assert_eq!(book.check(code("0000"), t, lock(n), &[]), CodeCheck::Wrong);
        }
        assert_eq!(book.check(code("2468"), 206, lock(9), &[]), CodeCheck::LockedOut { for_s: 299 });
        assert_eq!(book.check(code("2468"), 505, lock(9), &[]), named("alice"));
        // Only keys with failures in the window or a lockout running are kept.
        assert!(book.attempts.len() <= 6, "{}", book.attempts.len());
        let e = CodeBook::new(&LocalConfig { lockout_failures: 5, lockout_ceiling: 4, ..LocalConfig::default() });
        assert_eq!(e.unwrap_err(), CodeError::CeilingBelowFailures { ceiling: 4, failures: 5 });
    }

    fn book_with_ceiling(failures: u32, ceiling: u32) -> CodeBook {
        let codes = vec![LocalCodeEntry { user: "alice".into(), hash: hash_code("2468").unwrap() }];
        let config =
            LocalConfig { codes, lockout_failures: failures, lockout_ceiling: ceiling, ..LocalConfig::default() };
        CodeBook::new(&config).unwrap()
    }

    #[test]
    fn old_failures_leave_the_window() {
        let mut book = book(&[("alice", "2468")], 2);
        assert_eq!(book.check(code("0000"), 100, FRONT, &[]), CodeCheck::Wrong);
        assert_eq!(book.check(code("0000"), 100 + 601, FRONT, &[]), CodeCheck::Wrong);
        assert_eq!(book.check(code("2468"), 100 + 602, FRONT, &[]), named("alice"));
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
        assert_eq!(
            book.check(code("97531"), 100, FRONT, &issued),
            CodeCheck::Accepted { user: CodeHolder::Key(carol) }
        );
        assert_eq!(book.check(code("97531"), 100, FRONT, &[]), CodeCheck::Wrong);
        assert_eq!(book.check(code("2468"), 100, FRONT, &issued), named("alice"));

        let costly = hash_code("2468").unwrap().replace("m=19456", "m=1048576");
        assert_eq!(validate_hash(&costly), Err(HashError::TooCostly));
        assert_eq!(
            validate_hash("$argon2i$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"),
            Err(HashError::NotArgon2id)
        );
        assert_eq!(validate_hash(&"x".repeat(300)), Err(HashError::NotArgon2id));
        // A costly hash that reached the store is never tried.
        let bad = [IssuedCode { user: carol, hash: costly }];
        assert_eq!(book.check(code("2468"), 100, FRONT, &bad), named("alice"));
    }
}
