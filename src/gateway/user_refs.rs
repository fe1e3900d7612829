//! How people appear in a lock's own log: an 8-byte reference per user, never a key or a name.

use sha2::Digest;

use crate::auth::keys::PublicKey;
use crate::protocol::message::UserRef;

/// A user's 8-byte reference in the lock's log: the start of SHA-256 of their public key.
pub fn user_ref(key: &PublicKey) -> UserRef {
    reference(key.as_bytes())
}

/// A local user's reference in the lock's log, from their name in `[[local.codes]]`.
pub fn local_user_ref(name: &str) -> UserRef {
    reference(format!("local:{name}").as_bytes())
}

fn reference(bytes: &[u8]) -> UserRef {
    let digest = sha2::Sha256::digest(bytes);
    UserRef(digest[..8].try_into().expect("8 bytes"))
}
