//! The gateway's transport to locks over Bluetooth LE.
//!
//! [`LockTransport`] finds locks and connects to them; a [`LockLink`] carries raw LHP/1
//! fragments over one connection. [`bluez::BluezTransport`] implements both over BlueZ with
//! bluer. Above the transport, [`session::LockSession`] runs the protocol over one link, and
//! [`client::LockClient`] keeps one lock's session: it connects on demand within the
//! [`budget::ConnectionBudget`], retries what is worth retrying, bounds every wait and drops
//! the link when idle.

pub mod bluez;
pub mod budget;
pub mod client;
mod discovery;
#[cfg(feature = "devtools")]
pub mod memory;
pub mod radios;
pub mod session;

use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::protocol::gatt::ManufacturerData;
use crate::protocol::hub::ProtocolError;
use crate::protocol::ids::{LockId, LockTag};

/// A lock seen in a scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advertisement {
    /// Its Bluetooth address, `AA:BB:CC:DD:EE:FF`.
    pub address: String,
    /// The tag it advertises: its lock id's digest prefix (see [`LockTag`]).
    pub tag: LockTag,
    /// Signal strength, dBm.
    pub rssi: i16,
    /// Whether it accepts pairing now.
    pub pairing_mode: bool,
    /// Whether it has logged events the gateway has not read.
    pub new_events: bool,
}

impl Advertisement {
    /// Builds an advertisement from what a scan reports; `None` unless the manufacturer data
    /// is an LHP/1 record.
    pub fn from_scan(address: String, rssi: i16, manufacturer_data: &[u8]) -> Option<Self> {
        let m = ManufacturerData::parse(manufacturer_data).ok()?;
        Some(Advertisement { address, tag: m.tag, rssi, pairing_mode: m.pairing_mode, new_events: m.new_events })
    }

    /// Orders `ads` as a scan reports them: strongest first, then by address.
    pub(crate) fn sort_strongest_first(ads: &mut [Advertisement]) {
        ads.sort_by(|a, b| b.rssi.cmp(&a.rssi).then_with(|| a.address.cmp(&b.address)));
    }

    /// Whether this is (by its tag) lock `lock_id`.
    pub fn is_of(&self, lock_id: LockId) -> bool {
        self.tag == LockTag::of(lock_id)
    }
}

/// Why talking to a lock failed. [`BleError::code`] is the stable name used in replies,
/// audit records and logs.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BleError {
    /// The adapter is powered off (or blocked).
    #[error("Bluetooth adapter {0} is powered off: power it on (`bluetoothctl power on`) and check `rfkill list`")]
    AdapterOff(String),
    /// No adapter at all, or not the one configured.
    #[error("no Bluetooth adapter{0}: check that BlueZ runs (`systemctl status bluetooth`) and the adapter is present")]
    NoAdapter(String),
    /// BlueZ does not know the lock: it has not been seen in a scan.
    #[error("lock at {0} not found: it has not been seen in a scan (is it in range, with batteries?)")]
    NotFound(String),
    /// The lock did not answer a connection attempt.
    #[error("lock at {address} unreachable: {detail}")]
    Unreachable {
        /// The lock's address.
        address: String,
        /// Why: the bound or the attempts ran out, and the most telling error of the
        /// attempts (a final timeout does not hide an earlier attempt's reason).
        detail: String,
    },
    /// A bounded wait ran out.
    #[error("timed out after {after:?} while {during}")]
    Timeout {
        /// What was being waited for.
        during: &'static str,
        /// The bound.
        after: Duration,
    },
    /// The connection dropped.
    #[error("the link to the lock was lost")]
    LinkLost,
    /// The lock broke the protocol, or refused it.
    #[error("lock protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The lock is not what it should be (wrong service, wrong id, wrong version).
    #[error("not an LHP/1 lock: {0}")]
    NotALock(String),
    /// BlueZ or D-Bus failed in a way the others do not cover.
    #[error("BlueZ: {0}")]
    Bus(String),
    /// The bus took a new connection, but BlueZ (`org.bluez` on it) did not answer: bluetoothd
    /// is hung, or busy starting.
    #[error(
        "BlueZ is not answering: no reply from org.bluez within {after:?}, though the D-Bus system bus is up (is bluetoothd hung? `systemctl status bluetooth`)"
    )]
    BluezSilent {
        /// How long it was given.
        after: Duration,
    },
}

impl BleError {
    /// The stable, machine-readable name of the error.
    pub fn code(&self) -> &'static str {
        match self {
            BleError::AdapterOff(_) | BleError::NoAdapter(_) => "adapter_off",
            BleError::NotFound(_) => "not_found",
            BleError::Unreachable { .. } => "unreachable",
            BleError::Timeout { .. } => "timeout",
            BleError::LinkLost => "link_lost",
            BleError::Protocol(_) | BleError::NotALock(_) => "protocol",
            BleError::Bus(_) => "bus",
            BleError::BluezSilent { .. } => "bluez_silent",
        }
    }

    /// Whether trying again soon may succeed (while connecting; a command is never retried
    /// once sent, because it may have run).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            BleError::Timeout { .. }
                | BleError::LinkLost
                | BleError::Bus(_)
                | BleError::BluezSilent { .. }
                | BleError::Unreachable { .. }
        )
    }
}

/// One connection to one lock, carrying raw LHP/1 fragments.
pub trait LockLink: Send + 'static {
    /// The lock's info record (firmware version, capabilities), read when the link was made.
    fn info(&self) -> crate::protocol::gatt::LockInfo;
    /// The largest fragment one write may carry.
    fn max_fragment(&self) -> usize;
    /// Writes one fragment to the lock's write characteristic.
    fn write(&mut self, fragment: &[u8]) -> impl Future<Output = Result<(), BleError>> + Send;
    /// The next notification fragment; [`BleError::LinkLost`] once the link is down.
    /// Cancel-safe: dropping the future loses nothing.
    fn recv(&mut self) -> impl Future<Output = Result<Vec<u8>, BleError>> + Send;
    /// Disconnects.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// Finds locks and connects to them.
pub trait LockTransport: Send + Sync + 'static {
    /// The link type.
    type Link: LockLink;
    /// Scans for `duration`; returns every LHP/1 lock in range, strongest first.
    fn scan(&self, duration: Duration) -> impl Future<Output = Result<Vec<Advertisement>, BleError>> + Send;
    /// Scans until the lock at `address` is seen (so that the stack knows it again, e.g.
    /// after it was out of range or BlueZ restarted), at most `timeout`.
    fn find(&self, address: &str, timeout: Duration) -> impl Future<Output = Result<(), BleError>> + Send;
    /// Scans until the lock `lock_id` is seen, at most `timeout`; returns its advertisement.
    fn locate(
        &self,
        lock_id: LockId,
        timeout: Duration,
    ) -> impl Future<Output = Result<Advertisement, BleError>> + Send;
    /// Connects to the lock at `address` and readies its characteristics.
    fn connect(&self, address: &str) -> impl Future<Output = Result<Self::Link, BleError>> + Send;
    /// Forgets what connecting to the lock at `address` taught the transport (it was unbound,
    /// or did not pair: nothing of it is kept).
    fn forget(&self, address: &str);
    /// Whether the transport keeps anything about the lock at `address` (what connecting to
    /// it taught): false once forgotten.
    fn remembers(&self, address: &str) -> bool;
    /// Listens for advertisements until `shutdown` turns true, handing each to `heard`, and
    /// keeps listening through the stack's outages (said in the log). After `silence` without
    /// an advertisement it checks that the stack under it still answers.
    fn listen(
        self: std::sync::Arc<Self>,
        silence: Duration,
        heard: impl FnMut(&Advertisement) + Send,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send;
}

/// Transport settings, from the `[ble]` section of the configuration.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BleConfig {
    /// Adapter name (`hci0`) or address; the first powered adapter when absent.
    pub adapter: Option<String>,
    /// Several adapters (names or addresses), instead of `adapter`: locks are spread over
    /// them, and a lock one of them cannot reach goes through another (`ble::radios`).
    pub adapters: Vec<String>,
    /// Most links up at once on each adapter (BLE controllers handle few; 3 is safe on a Pi).
    pub max_links: usize,
    /// Bound on establishing a session, retries included, in ms.
    pub connect_timeout_ms: u64,
    /// Bound on one command, motor time included, in ms.
    pub command_timeout_ms: u64,
    /// Bound on GATT service resolution after a connection, in ms (bluer's own is 120 s).
    pub resolve_timeout_ms: u64,
    /// Bound on waiting for a free link slot, in ms.
    pub slot_timeout_ms: u64,
    /// An idle link is dropped after this many ms.
    pub keep_alive_ms: u64,
    /// First retry delay in ms; doubles per attempt, with jitter.
    pub retry_backoff_ms: u64,
    /// Connection attempts per session, at most.
    pub connect_attempts: u32,
}

impl Default for BleConfig {
    fn default() -> Self {
        BleConfig {
            adapter: None,
            adapters: Vec::new(),
            max_links: 3,
            connect_timeout_ms: 10_000,
            command_timeout_ms: 10_000,
            resolve_timeout_ms: 5_000,
            slot_timeout_ms: 30_000,
            keep_alive_ms: 20_000,
            retry_backoff_ms: 200,
            connect_attempts: 4,
        }
    }
}

impl BleConfig {
    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// The adapters to open, each as `adapter` would name it: those of `adapters`, else the
    /// one `adapter` names (or the first powered one, `None`).
    pub fn adapter_choices(&self) -> Vec<Option<String>> {
        if self.adapters.is_empty() {
            vec![self.adapter.clone()]
        } else {
            self.adapters.iter().cloned().map(Some).collect()
        }
    }

    /// This configuration with `adapter` as its only adapter.
    pub fn for_adapter(&self, adapter: Option<String>) -> BleConfig {
        BleConfig { adapter, adapters: Vec::new(), ..self.clone() }
    }

    /// [`BleConfig::connect_timeout_ms`] as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Self::ms(self.connect_timeout_ms)
    }

    /// [`BleConfig::command_timeout_ms`] as a duration.
    pub fn command_timeout(&self) -> Duration {
        Self::ms(self.command_timeout_ms)
    }

    /// [`BleConfig::resolve_timeout_ms`] as a duration.
    pub fn resolve_timeout(&self) -> Duration {
        Self::ms(self.resolve_timeout_ms)
    }

    /// [`BleConfig::slot_timeout_ms`] as a duration.
    pub fn slot_timeout(&self) -> Duration {
        Self::ms(self.slot_timeout_ms)
    }

    /// [`BleConfig::keep_alive_ms`] as a duration.
    pub fn keep_alive(&self) -> Duration {
        Self::ms(self.keep_alive_ms)
    }

    /// [`BleConfig::retry_backoff_ms`] as a duration.
    pub fn retry_backoff(&self) -> Duration {
        Self::ms(self.retry_backoff_ms)
    }
}
