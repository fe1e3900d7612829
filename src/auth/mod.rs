//! Who may do what, proven by signatures: Ed25519 identities, the JWS envelope every signed
//! statement travels in, the statements themselves, and the reason codes of refusals.
//!
//! The cloud relays these statements; it cannot make one. The owner's key is pinned when the
//! owner claims the gateway; grants and revocations are signed by the owner; commands by the
//! user who sends them. See `docs/mqtt-api.md` for the wire form.

pub mod jws;
pub mod keys;
pub mod local_code;
pub mod reason;
pub mod schedule;
pub mod statement;
