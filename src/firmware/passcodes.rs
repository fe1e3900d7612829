//! Keypad passcodes, kept as salted Argon2id hashes only.
//!
//! A keypad code is short, so no hash makes it unguessable to someone holding the flash dump;
//! what the hash buys is that the code itself is never stored, so a dump does not hand out
//! working codes without a brute-force run per slot, and reused codes are not revealed. The
//! parameters are sized for a lock's microcontroller (256 KiB, 2 passes); the PHC string
//! records them, so they can grow without breaking stored hashes.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};

use crate::protocol::message::{LockError, MAX_PASSCODES, Passcode, PasscodeSlot};

/// One stored passcode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StoredPasscode {
    slot: u16,
    /// Argon2id PHC string: parameters, salt, hash.
    hash: String,
    valid_from: Option<u64>,
    valid_until: Option<u64>,
}

/// The passcode table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasscodeTable {
    slots: Vec<StoredPasscode>,
}

fn hasher() -> Argon2<'static> {
    let params = Params::new(256, 2, 1, None).expect("constant Argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

impl PasscodeTable {
    /// Hashes and stores a passcode; returns its slot.
    pub fn add(
        &mut self,
        code: &Passcode,
        valid_from: Option<u64>,
        valid_until: Option<u64>,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<u16, LockError> {
        if let (Some(from), Some(until)) = (valid_from, valid_until)
            && from >= until
        {
            return Err(LockError::InvalidArgument);
        }
        if self.slots.len() >= MAX_PASSCODES {
            return Err(LockError::PasscodeTableFull);
        }
        let slot = (1..=MAX_PASSCODES as u16)
            .find(|s| self.slots.iter().all(|p| p.slot != *s))
            .ok_or(LockError::PasscodeTableFull)?;
        let salt = SaltString::generate(&mut *rng);
        let hash = hasher()
            .hash_password(code.expose().as_bytes(), &salt)
            .map_err(|_| LockError::InvalidArgument)?
            .to_string();
        self.slots.push(StoredPasscode { slot, hash, valid_from, valid_until });
        Ok(slot)
    }

    /// Removes a slot.
    pub fn remove(&mut self, slot: u16) -> Result<(), LockError> {
        let before = self.slots.len();
        self.slots.retain(|p| p.slot != slot);
        if self.slots.len() == before { Err(LockError::NoSuchSlot) } else { Ok(()) }
    }

    /// Slot metadata, never the hashes.
    pub fn list(&self) -> Vec<PasscodeSlot> {
        self.slots
            .iter()
            .map(|p| PasscodeSlot { slot: p.slot, valid_from: p.valid_from, valid_until: p.valid_until })
            .collect()
    }

    /// The slot whose code matches `entry` and is valid at `now` (Unix seconds, if the clock
    /// is set; a code with a validity window never matches while the clock is unknown).
    pub fn verify(&self, entry: &str, now: Option<u64>) -> Option<u16> {
        let valid = |p: &StoredPasscode| match (p.valid_from, p.valid_until, now) {
            (None, None, _) => true,
            (_, _, None) => false,
            (from, until, Some(t)) => from.is_none_or(|f| t >= f) && until.is_none_or(|u| t < u),
        };
        // Every valid slot is checked, match or not, so timing says nothing about which slot.
        let mut found = None;
        for p in self.slots.iter().filter(|p| valid(p)) {
            let ok = PasswordHash::new(&p.hash).is_ok_and(|h| hasher().verify_password(entry.as_bytes(), &h).is_ok());
            if ok && found.is_none() {
                found = Some(p.slot);
            }
        }
        found
    }

    /// Drops every passcode.
    pub fn clear(&mut self) {
        self.slots.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    #[test]
    fn verifies_within_the_window_only() {
        let mut t = PasscodeTable::default();
        let code = Passcode::new("246810").unwrap();
        let slot = t.add(&code, Some(100), Some(200), &mut OsRng).unwrap();
        assert_eq!(t.verify("246810", Some(150)), Some(slot));
        assert_eq!(t.verify("246810", Some(200)), None);
        assert_eq!(t.verify("246810", None), None);
        assert_eq!(t.verify("246811", Some(150)), None);
        assert_eq!(t.add(&code, Some(5), Some(5), &mut OsRng), Err(LockError::InvalidArgument));
        t.remove(slot).unwrap();
        assert_eq!(t.remove(slot), Err(LockError::NoSuchSlot));
    }
}
