//! Identifiers of the two ends of an LHP/1 link: the lock's id and the gateway's id.
//!
//! Both are public names, never secrets. Both parsers are strict because both arrive from
//! outside (a radio advertisement, a pairing request, a configuration file).

use thiserror::Error;

/// An 8-byte lock identifier, assigned at manufacture, printed on the label, public.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct LockId(pub [u8; 8]);

impl LockId {
    /// Parses the 16-hex-digit form produced by `Display`.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let s = s.trim();
        if s.len() != 16 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(IdError::LockId);
        }
        let mut out = [0u8; 8];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| IdError::LockId)?;
        }
        Ok(LockId(out))
    }
}

impl std::fmt::Display for LockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for LockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LockId({self})")
    }
}

/// The short name a lock advertises in place of its id: the first five bytes of
/// SHA-256("LHP/1 lock tag" || lock id).
///
/// A legacy advertisement has 31 bytes, 28 once the controller adds its flags; the 128-bit
/// service UUID takes 18 of them, which leaves six for the LHP record (`docs/protocol.md`).
/// The tag is a hint, not an identity: a gateway that finds a lock by it checks the full id
/// in the info record, and the session's keys prove it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockTag(pub [u8; 5]);

impl LockTag {
    /// The tag of `lock`.
    pub fn of(lock: LockId) -> Self {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new().chain_update(b"LHP/1 lock tag").chain_update(lock.0).finalize();
        let mut tag = [0u8; 5];
        tag.copy_from_slice(&digest[..5]);
        LockTag(tag)
    }
}

impl std::fmt::Display for LockTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for LockTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LockTag({self})")
    }
}

/// A gateway's identifier: 1 to 32 bytes of `[A-Za-z0-9._-]`. It names the gateway in pairing
/// (it is bound into the SPAKE2 transcript), in MQTT topics and in client certificates.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GatewayId(String);

impl GatewayId {
    /// Longest gateway id, in bytes.
    pub const MAX_LEN: usize = 32;

    /// Validates a gateway id.
    pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        let ok_char = |c: u8| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-');
        if s.is_empty() || s.len() > Self::MAX_LEN || !s.bytes().all(ok_char) {
            return Err(IdError::GatewayId);
        }
        Ok(GatewayId(s))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for GatewayId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        GatewayId::new(s)
    }
}

impl From<GatewayId> for String {
    fn from(g: GatewayId) -> String {
        g.0
    }
}

impl std::fmt::Display for GatewayId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for GatewayId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GatewayId({})", self.0)
    }
}

/// Why an identifier was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum IdError {
    /// A lock id is not 16 hexadecimal digits.
    #[error("a lock id is 16 hexadecimal digits")]
    LockId,
    /// A gateway id is not 1-32 characters of letters, digits, '.', '_' or '-'.
    #[error("a gateway id is 1 to 32 characters of letters, digits, '.', '_' or '-'")]
    GatewayId,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_id_text_round_trips() {
        let id = LockId([0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3]);
        assert_eq!(LockId::parse(&id.to_string()).unwrap(), id);
        assert!(LockId::parse("xyz").is_err());
    }

    /// Pinned so that a lock built elsewhere advertises what gateways look for
    /// (`docs/protocol.md` gives the same vector).
    #[test]
    fn a_lock_tag_is_the_digest_prefix() {
        let id = LockId::parse("4c48000000000001").unwrap();
        assert_eq!(LockTag::of(id).to_string(), LOCK_TAG_VECTOR);
        assert_ne!(LockTag::of(id), LockTag::of(LockId::parse("4c48000000000002").unwrap()));
    }

    const LOCK_TAG_VECTOR: &str = "dc75a2600f";

    #[test]
    fn gateway_ids_are_bounded_and_plain() {
        assert!(GatewayId::new("hub-01.home").is_ok());
        assert!(GatewayId::new("").is_err());
        assert!(GatewayId::new("a/b").is_err());
        assert!(GatewayId::new("x".repeat(33)).is_err());
    }
}
