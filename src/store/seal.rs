//! Sealing: AES-256-GCM for every secret the store keeps.
//!
//! A sealed value is `01 || nonce (12 random bytes) || ciphertext || tag (16)`. The associated
//! data names where the value lives — table, column and the row's natural key — so a sealed
//! value copied into another row or column does not open: it is an error, never wrong data.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand_core::{OsRng, RngCore};
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// The store's master key. Zeroized on drop; never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// Key length in bytes.
    pub const LEN: usize = 32;

    /// A fresh random key.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        OsRng.fill_bytes(&mut k);
        MasterKey(k)
    }

    /// Wraps key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MasterKey(bytes)
    }

    /// The key bytes (to write the key file).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Where a sealed value lives: bound into the AEAD as associated data.
#[derive(Clone, Copy, Debug)]
pub struct Place<'a> {
    /// Table name.
    pub table: &'a str,
    /// Column name.
    pub column: &'a str,
    /// The row's natural key (a lock id, a public key, a statement id).
    pub row: &'a [u8],
}

impl Place<'_> {
    fn aad(&self) -> Vec<u8> {
        let mut aad = Vec::with_capacity(32 + self.table.len() + self.column.len() + self.row.len());
        aad.extend_from_slice(b"lockhub seal v1\0");
        for part in [self.table.as_bytes(), self.column.as_bytes(), self.row] {
            aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
            aad.extend_from_slice(part);
        }
        aad
    }
}

/// Why a sealed value did not open.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SealError {
    /// Too short, or an unknown format version.
    #[error("sealed value in {table}.{column} is malformed")]
    Malformed {
        /// Table.
        table: String,
        /// Column.
        column: String,
    },
    /// The tag did not verify: altered, moved from another row, or sealed under another key.
    #[error("sealed value in {table}.{column} does not open: altered, moved from another row, or another key")]
    Rejected {
        /// Table.
        table: String,
        /// Column.
        column: String,
    },
}

/// Seals and opens values under one master key.
pub struct Sealer {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<key redacted>)")
    }
}

impl Sealer {
    /// A sealer for `key`.
    pub fn new(key: &MasterKey) -> Self {
        Sealer { cipher: Aes256Gcm::new(key.as_bytes().into()) }
    }

    /// Seals `plaintext` for `place`.
    pub fn seal(&self, place: Place<'_>, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let aad = place.aad();
        let body = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: &aad })
            .expect("AES-GCM sealing of a bounded value cannot fail");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + body.len());
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        out
    }

    /// Opens a value sealed for `place`.
    pub fn open(&self, place: Place<'_>, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let malformed = || SealError::Malformed { table: place.table.into(), column: place.column.into() };
        if sealed.len() < 1 + NONCE_LEN + TAG_LEN || sealed[0] != VERSION {
            return Err(malformed());
        }
        let aad = place.aad();
        self.cipher
            .decrypt(Nonce::from_slice(&sealed[1..1 + NONCE_LEN]), Payload { msg: &sealed[1 + NONCE_LEN..], aad: &aad })
            .map(Zeroizing::new)
            .map_err(|_| SealError::Rejected { table: place.table.into(), column: place.column.into() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(row: &[u8]) -> Place<'_> {
        Place { table: "locks", column: "pairing_key", row }
    }

    #[test]
    fn the_key_is_never_printed() {
        let key = MasterKey::from_bytes([0xab; 32]);
        // Debug output is what `{:?}` in a log line or an error would show.
        assert_eq!(format!("{key:?}"), "MasterKey(<redacted>)");
        assert_eq!(format!("{:?}", Sealer::new(&key)), "Sealer(<key redacted>)");
    }

    #[test]
    fn round_trip_and_every_binding_holds() {
        let s = Sealer::new(&MasterKey::generate());
        let sealed = s.seal(place(b"lock-a"), b"secret");
        assert_eq!(&s.open(place(b"lock-a"), &sealed).unwrap()[..], b"secret");
        assert!(matches!(s.open(place(b"lock-b"), &sealed), Err(SealError::Rejected { .. })), "another row");
        let other_col = Place { column: "pseudonym_key", ..place(b"lock-a") };
        assert!(s.open(other_col, &sealed).is_err(), "another column");
        let mut flipped = sealed.clone();
        flipped[20] ^= 0x04;
        assert!(s.open(place(b"lock-a"), &flipped).is_err(), "a flipped bit");
        assert!(Sealer::new(&MasterKey::generate()).open(place(b"lock-a"), &sealed).is_err(), "another key");
        assert!(matches!(s.open(place(b"lock-a"), &sealed[..10]), Err(SealError::Malformed { .. })));
        assert_ne!(s.seal(place(b"lock-a"), b"secret"), sealed, "fresh nonce every time");
    }

    #[test]
    fn the_shortest_sealed_value_is_version_nonce_and_tag() {
        let s = Sealer::new(&MasterKey::generate());
        // An empty plaintext seals to exactly the minimum and opens again.
        let empty = s.seal(place(b"r"), b"");
        assert_eq!(empty.len(), 1 + NONCE_LEN + TAG_LEN);
        assert!(s.open(place(b"r"), &empty).unwrap().is_empty());
        // Anything shorter is malformed, not a failed tag; so is another version.
        for len in 0..empty.len() {
            assert!(matches!(s.open(place(b"r"), &empty[..len]), Err(SealError::Malformed { .. })), "{len} bytes");
        }
        let mut other_version = empty.clone();
        other_version[0] = VERSION + 1;
        assert!(matches!(s.open(place(b"r"), &other_version), Err(SealError::Malformed { .. })));
    }
}
