//! The admin control socket (`/run/lockhub/control.sock`): how `lockhub status`, `locks`,
//! `audit`, `users`, `forget-user`, `unbind` and `rekey` reach the running daemon.
//!
//! - `protocol`: requests and answers, one JSON line each, size-bounded, strictly parsed.
//! - `peer`: who is on the other end (SO_PEERCRED) and whether they may administer the hub.
//! - `server`: the listener (mode 0660, group lockhub-admin) and the handlers.

pub mod peer;
pub mod protocol;
pub mod server;
