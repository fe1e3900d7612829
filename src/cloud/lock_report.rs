//! What the gateway tells the cloud about its locks: events from a lock's log on
//! `lockhub/v1/<gw>/events` (schema `docs/schemas/event.json`), and each lock's retained state
//! on `lockhub/v1/<gw>/lock/<lock>/state` (schema `docs/schemas/lock-state.json`).
//!
//! An event's id is `<lock>-<pairing epoch>-<seq>`: the lock's sequence numbers never repeat
//! while it is paired, and the epoch (when this gateway paired it) keeps a re-paired lock's
//! restarted log from colliding with old ids, so receivers can deduplicate on the id alone.

use serde::Serialize;

use crate::protocol::ids::LockId;
use crate::protocol::message::{Actor, Cause, DoorState, Event, LockState, LockStatus, LogEntry};

/// A bolt state's wire name (`locked`, `unlocking`, ...), as in events and lock states.
pub fn state_name(state: LockState) -> &'static str {
    match state {
        LockState::Locked => "locked",
        LockState::Unlocking => "unlocking",
        LockState::Unlocked => "unlocked",
        LockState::Locking => "locking",
        LockState::Jammed => "jammed",
    }
}

/// A door state's wire name (`closed`, `open`, `unknown`).
pub fn door_name(door: DoorState) -> &'static str {
    match door {
        DoorState::Closed => "closed",
        DoorState::Open => "open",
        DoorState::Unknown => "unknown",
    }
}

fn cause_name(cause: Cause) -> &'static str {
    match cause {
        Cause::Remote => "remote",
        Cause::Keypad => "keypad",
        Cause::Manual => "manual",
        Cause::AutoLock => "auto_lock",
    }
}

/// Who, on the wire.
#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum WireActor {
    Hub,
    Admin,
    Cloud { user: String },
    Local { user: String },
    Keypad { slot: u16 },
}

/// Lower-case hex, as user references appear in events and replies.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl From<Actor> for WireActor {
    fn from(actor: Actor) -> Self {
        match actor {
            Actor::Hub => WireActor::Hub,
            Actor::Admin => WireActor::Admin,
            Actor::Cloud(u) => WireActor::Cloud { user: hex(&u.0) },
            Actor::Local(u) => WireActor::Local { user: hex(&u.0) },
            Actor::Keypad(slot) => WireActor::Keypad { slot },
        }
    }
}

#[derive(Serialize)]
struct WireEvent<'a> {
    id: String,
    lock: String,
    seq: u64,
    /// The lock's clock when it happened, if it was set.
    at: Option<u64>,
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cause: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    door: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    battery: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    slot: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    actor: Option<WireActor>,
}

/// The id of event `seq` of `lock`, paired at `epoch` (Unix seconds).
pub fn event_id(lock: LockId, epoch: i64, seq: u64) -> String {
    format!("{lock}-{epoch}-{seq}")
}

/// The events-topic payload of one log entry.
pub fn event_payload(lock: LockId, epoch: i64, entry: &LogEntry) -> Vec<u8> {
    let mut wire = WireEvent {
        id: event_id(lock, epoch, entry.seq),
        lock: lock.to_string(),
        seq: entry.seq,
        at: entry.time,
        kind: "",
        state: None,
        cause: None,
        door: None,
        battery: None,
        slot: None,
        actor: entry.actor.map(WireActor::from),
    };
    wire.kind = match entry.event {
        Event::StateChanged { state, cause } => {
            wire.state = Some(state_name(state));
            wire.cause = Some(cause_name(cause));
            "state_changed"
        }
        Event::Unlatched => "unlatched",
        Event::Door(door) => {
            wire.door = Some(door_name(door));
            "door"
        }
        Event::Jammed => "jammed",
        Event::Tamper => "tamper",
        Event::BatteryLow { pct } => {
            wire.battery = Some(pct);
            "battery_low"
        }
        Event::KeypadRejected => "keypad_rejected",
        Event::KeypadLockout => "keypad_lockout",
        Event::ClockSet => "clock_set",
        Event::PasscodeAdded { slot } => {
            wire.slot = Some(slot);
            "passcode_added"
        }
        Event::PasscodeRemoved { slot } => {
            wire.slot = Some(slot);
            "passcode_removed"
        }
        Event::Paired => "paired",
        Event::Rebooted => "rebooted",
    };
    serde_json::to_vec(&wire).expect("events always serialise")
}

#[derive(Serialize)]
struct WireState<'a> {
    lock: String,
    state: &'a str,
    door: &'a str,
    battery: u8,
    connected: bool,
    /// When the gateway last heard from the lock (Unix seconds, the gateway's clock).
    last_seen: i64,
    /// The newest event's sequence number, so a reader knows which events the state reflects.
    last_seq: u64,
}

/// The retained lock-state payload.
pub fn state_payload(lock: LockId, status: &LockStatus, connected: bool, last_seen: i64) -> Vec<u8> {
    let wire = WireState {
        lock: lock.to_string(),
        state: state_name(status.state),
        door: door_name(status.door),
        battery: status.battery_pct.min(100),
        connected,
        last_seen,
        last_seq: status.last_seq,
    };
    serde_json::to_vec(&wire).expect("states always serialise")
}
