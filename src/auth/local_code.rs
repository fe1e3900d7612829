//! A local code as authorization knows it: whose it is, and the form its stored hash must
//! have (Argon2id, at a cost a hub can pay on every check).
//!
//! Owner-signed `lockhub.local_code` statements carry such hashes; the gateway checks and keeps
//! them. Checking a code typed at a keypad or sent through local control, with its lockout, is
//! `local::codes`'s.

use argon2::Params;
use argon2::password_hash::PasswordHash;
use thiserror::Error;

use crate::auth::keys::PublicKey;

/// Shortest and longest code, in digits (Home Assistant's `code_format` says the same).
pub const CODE_DIGITS: std::ops::RangeInclusive<usize> = 4..=12;

/// Most memory a stored hash may ask of each check, in KiB: a hash is attacker-influenced
/// input (a configuration typo, a statement), and each wrong code tries every hash.
const MAX_MEMORY_KIB: u32 = 64 * 1024;
/// Most passes a stored hash may ask for.
const MAX_PASSES: u32 = 8;
/// Most lanes a stored hash may ask for.
const MAX_LANES: u32 = 4;
/// Longest PHC string accepted.
pub const MAX_HASH_LEN: usize = 256;

/// Why a hash cannot be a local code's.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum HashError {
    /// Not an Argon2id PHC string.
    #[error("not an Argon2id PHC string ($argon2id$v=19$m=...,t=...,p=...$salt$hash)")]
    NotArgon2id,
    /// Its parameters would make every check too slow.
    #[error("its Argon2id parameters exceed 64 MiB, 8 passes or 4 lanes")]
    TooCostly,
}

/// Checks that `hash` is an Argon2id PHC string whose cost a hub can afford on every check.
pub fn validate_hash(hash: &str) -> Result<(), HashError> {
    if hash.len() > MAX_HASH_LEN {
        return Err(HashError::NotArgon2id);
    }
    let parsed = PasswordHash::new(hash).map_err(|_| HashError::NotArgon2id)?;
    if parsed.algorithm.as_str() != "argon2id" || parsed.hash.is_none() {
        return Err(HashError::NotArgon2id);
    }
    let params = Params::try_from(&parsed).map_err(|_| HashError::NotArgon2id)?;
    if params.m_cost() > MAX_MEMORY_KIB || params.t_cost() > MAX_PASSES || params.p_cost() > MAX_LANES {
        return Err(HashError::TooCostly);
    }
    Ok(())
}

/// Whose a local code is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CodeHolder {
    /// A `[[local.codes]]` entry, by its user name.
    Named(String),
    /// A user the owner gave the code to in a `lockhub.local_code` statement.
    Key(PublicKey),
}

/// A code an owner-signed statement gave a user for a lock, as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCode {
    /// The user.
    pub user: PublicKey,
    /// Its Argon2id hash.
    pub hash: String,
}

/// Whether `code` has the shape of a local code.
pub fn well_formed(code: &str) -> bool {
    CODE_DIGITS.contains(&code.len()) && code.bytes().all(|b| b.is_ascii_digit())
}
