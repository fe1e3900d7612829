//! Ed25519 identities: public keys as they travel (base64url, 32 bytes) and key pairs as the
//! phone-app stand-in keeps them.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{SigningKey, VerifyingKey};
use thiserror::Error;

/// Why a key was refused.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error("not an Ed25519 public key (32 bytes, unpadded base64url)")]
pub struct KeyError;

/// An Ed25519 public key: who signed, who is granted.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// From its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PublicKey(bytes)
    }

    /// Parses the unpadded base64url form (43 characters).
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        if text.len() != 43 {
            return Err(KeyError);
        }
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| KeyError)?;
        Ok(PublicKey(bytes.try_into().map_err(|_| KeyError)?))
    }

    /// The unpadded base64url form.
    pub fn to_base64(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl From<VerifyingKey> for PublicKey {
    fn from(key: VerifyingKey) -> Self {
        PublicKey(key.to_bytes())
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        PublicKey::from_base64(&text).map_err(serde::de::Error::custom)
    }
}

/// A fresh signing key from the operating system's generator.
pub fn generate() -> SigningKey {
    SigningKey::generate(&mut rand_core::OsRng)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_keys_round_trip_and_bad_ones_are_refused() {
        let key = PublicKey::from(generate().verifying_key());
        assert_eq!(PublicKey::from_base64(&key.to_base64()).unwrap(), key);
        for bad in ["", "abc", &"A".repeat(44), &format!("{}=", &key.to_base64()[..42]), &"/".repeat(43)] {
            assert_eq!(PublicKey::from_base64(bad), Err(KeyError), "{bad}");
        }
    }
}
