//! How people named in `[[local.codes]]` appear in a lock's own log: an 8-byte reference from
//! their configured name. (People known by key appear under a reference keyed with their
//! pseudonym key: `Store::user_lock_ref`.)

use sha2::Digest;

use crate::protocol::message::UserRef;

/// A local user's reference in the lock's log, from their name in `[[local.codes]]`.
pub fn local_user_ref(name: &str) -> UserRef {
    reference(format!("local:{name}").as_bytes())
}

fn reference(bytes: &[u8]) -> UserRef {
    let digest = sha2::Sha256::digest(bytes);
    UserRef(digest[..8].try_into().expect("8 bytes"))
}
