//! Local control without the cloud: Home Assistant over a local MQTT broker, with local codes.
//!
//! - `config`: the `[local]` section.
//! - `home_assistant`: discovery payloads, topics and state values (no I/O).
//! - `command`: the local command payloads, strictly parsed.
//! - `codes`: local codes as Argon2id hashes, and the lockout after wrong ones.
//! - `bridge`: the connection to the local broker, independent of the cloud link.

pub mod bridge;
pub mod codes;
pub mod command;
pub mod config;
pub mod home_assistant;
