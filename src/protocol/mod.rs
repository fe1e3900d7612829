//! LHP/1, the lockhub lock protocol, without any I/O.
//!
//! Shared by the gateway and the emulated lock firmware. Layers, bottom up:
//! [`gatt`] (what a lock exposes before any key is involved), [`fragment`] (frames cut to the
//! ATT MTU), [`frame`] (typed frames), [`pairing`] (SPAKE2 over the setup code),
//! [`session`] (per-connection keys and the sealed channel), [`message`] (what travels sealed),
//! and [`hub`], the gateway's state machine tying them together. The byte layouts, state
//! machines, threat list and test vectors are in `docs/protocol.md`.

pub mod fragment;
pub mod frame;
pub mod gatt;
pub mod hub;
pub mod ids;
pub mod message;
pub mod pairing;
pub mod session;
