//! The `[local]` section of the configuration: the local MQTT broker Home Assistant uses, the
//! discovery prefix, and the local codes and their policy.

use std::path::PathBuf;

use serde::Deserialize;

/// An operation a local command can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalOperation {
    /// Throw the bolt.
    Lock,
    /// Retract the bolt.
    Unlock,
    /// Retract the bolt and pull the latch.
    Unlatch,
}

impl LocalOperation {
    /// The configuration's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            LocalOperation::Lock => "lock",
            LocalOperation::Unlock => "unlock",
            LocalOperation::Unlatch => "unlatch",
        }
    }
}

/// `[local]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// `[local.mqtt]`: the local broker; without it there is no local MQTT at all.
    pub mqtt: Option<LocalMqtt>,
    /// Home Assistant's discovery prefix.
    pub discovery_prefix: String,
    /// Operations that need a local code.
    pub code_required: Vec<LocalOperation>,
    /// Wrong codes for one lock from one source (within `lockout_window_s`) that lock out the
    /// codes for that lock from there.
    pub lockout_failures: u32,
    /// Wrong codes over all locks and sources (within `lockout_window_s`) that lock out all
    /// local control; at least `lockout_failures`.
    pub lockout_ceiling: u32,
    /// The window wrong codes are counted in, in seconds.
    pub lockout_window_s: i64,
    /// How long local control stays locked out, in seconds.
    pub lockout_s: i64,
    /// `[[local.codes]]`: who may command locally, by the Argon2id hash of their code.
    pub codes: Vec<LocalCodeEntry>,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            mqtt: None,
            discovery_prefix: "homeassistant".into(),
            code_required: vec![LocalOperation::Unlock, LocalOperation::Unlatch],
            lockout_failures: 5,
            lockout_ceiling: 20,
            lockout_window_s: 600,
            lockout_s: 300,
            codes: Vec::new(),
        }
    }
}

/// `[local.mqtt]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalMqtt {
    /// The broker's host name or address.
    pub host: String,
    /// Its port (1883 by default, 8883 with TLS).
    pub port: Option<u16>,
    /// Use TLS (server authentication against `ca`, or the system's roots without one).
    #[serde(default)]
    pub tls: bool,
    /// The CA that signs the local broker's certificate.
    pub ca: Option<PathBuf>,
    /// The user name, if the broker wants one.
    pub username: Option<String>,
    /// A file holding the password (first line), readable by lockhub only: the configuration
    /// file itself is world-readable.
    pub password_file: Option<PathBuf>,
}

impl LocalMqtt {
    /// The port, defaulted by `tls`.
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(if self.tls { 8883 } else { 1883 })
    }
}

/// One `[[local.codes]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalCodeEntry {
    /// Who (shown in the audit record and the last-event sensor).
    pub user: String,
    /// The Argon2id hash of the code, in PHC form (`lockhub hash-code` makes one).
    pub hash: String,
}
