//! LHP/1 messages: what travels inside sealed frames.
//!
//! Encoded with postcard (serde, varint integers, no field names), which a firmware team can
//! use on a microcontroller as it is. The gateway sends [`Request`]s; the lock answers each
//! with a [`Response`] carrying the same id and a typed result, and pushes [`LogEntry`]s as
//! things happen. Every request names its [`Actor`], so the lock's own log says who.
//! Decoding is strict: trailing bytes, unknown variants and out-of-range values are errors.

use serde::{Deserialize, Serialize};
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::session::MAX_PLAINTEXT_LEN;

/// Most log entries one [`Reply::Events`] page carries (it must fit one frame).
pub const MAX_EVENTS_PER_PAGE: u8 = 16;
/// Most keypad passcodes a lock holds.
pub const MAX_PASSCODES: usize = 32;

/// A gateway-assigned pseudonym for a person. Locks never see names, keys or addresses.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UserRef(pub [u8; 8]);

impl std::fmt::Debug for UserRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserRef(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
    }
}

/// Who asked for an operation, or who caused an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Actor {
    /// The gateway on its own behalf (setting the clock, reading the log).
    Hub,
    /// The hub's owner through the admin interface.
    Admin,
    /// A user through the cloud (a signed remote command).
    Cloud(UserRef),
    /// A user through local control (Home Assistant, local MQTT).
    Local(UserRef),
    /// Someone at the lock's keypad, by passcode slot. Only in events: the lock refuses it in
    /// requests.
    Keypad(u16),
}

/// A keypad passcode in transit to the lock: 4 to 12 digits. The lock stores only a salted
/// hash of it.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Passcode(String);

impl Passcode {
    /// Validates a passcode.
    pub fn new(code: &str) -> Result<Self, MessageError> {
        if !(4..=12).contains(&code.len()) || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(MessageError::BadPasscode);
        }
        Ok(Passcode(code.to_owned()))
    }

    /// The digits.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Passcode {
    type Error = MessageError;
    fn try_from(mut s: String) -> Result<Self, MessageError> {
        let r = Passcode::new(&s);
        s.zeroize();
        r
    }
}

impl From<Passcode> for String {
    fn from(p: Passcode) -> String {
        p.0.clone()
    }
}

impl std::fmt::Debug for Passcode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passcode(<redacted>)")
    }
}

/// What the gateway asks of the lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Report the current status.
    Status,
    /// Throw the bolt.
    Lock,
    /// Retract the bolt.
    Unlock,
    /// Retract the bolt and pull the latch (open the door), where the lock can.
    Unlatch,
    /// Set the real-time clock.
    SetTime {
        /// Seconds since the Unix epoch, UTC.
        unix_secs: u64,
    },
    /// Read log entries with a sequence number greater than `after`, oldest first.
    ReadEvents {
        /// Last sequence number already seen (0 for all).
        after: u64,
        /// Page size, 1 to [`MAX_EVENTS_PER_PAGE`].
        max: u8,
    },
    /// Add a keypad passcode valid in `[valid_from, valid_until)` (Unix seconds; open ends
    /// when absent).
    AddPasscode {
        /// The code.
        code: Passcode,
        /// Not valid before.
        valid_from: Option<u64>,
        /// Not valid from this time on.
        valid_until: Option<u64>,
    },
    /// Remove the passcode in `slot`.
    RemovePasscode {
        /// The slot returned by [`Reply::PasscodeAdded`].
        slot: u16,
    },
    /// List the passcode slots (metadata only, never hashes).
    ListPasscodes,
    /// Forget the gateway, its passcodes and the log contents; return to pairing mode.
    Unpair,
}

/// A request from the gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Correlates the response; chosen by the gateway.
    pub id: u32,
    /// On whose behalf.
    pub actor: Actor,
    /// What to do.
    pub op: Op,
}

/// Bolt state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockState {
    /// Bolt thrown.
    Locked,
    /// Motor retracting the bolt.
    Unlocking,
    /// Bolt retracted.
    Unlocked,
    /// Motor throwing the bolt.
    Locking,
    /// The motor could not finish; needs a person.
    Jammed,
}

/// Door position, from the door sensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DoorState {
    /// Closed.
    Closed,
    /// Open.
    Open,
    /// No sensor.
    Unknown,
}

/// A status snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockStatus {
    /// Bolt state.
    pub state: LockState,
    /// Door position.
    pub door: DoorState,
    /// Battery, 0 to 100.
    pub battery_pct: u8,
    /// The lock's clock in Unix seconds, if it has been set.
    pub clock: Option<u64>,
    /// Sequence number of the newest log entry (0 if none yet).
    pub last_seq: u64,
}

/// Metadata of one passcode slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasscodeSlot {
    /// Slot number.
    pub slot: u16,
    /// Not valid before.
    pub valid_from: Option<u64>,
    /// Not valid from this time on.
    pub valid_until: Option<u64>,
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Answer to [`Op::Status`].
    Status(LockStatus),
    /// A motor operation finished; the status after it.
    Done(LockStatus),
    /// The clock is set.
    ClockSet,
    /// A page of the log.
    Events {
        /// Entries, oldest first.
        entries: Vec<LogEntry>,
        /// More entries follow; ask again after the last one.
        more: bool,
    },
    /// The passcode is stored (hashed) in this slot.
    PasscodeAdded {
        /// Slot number.
        slot: u16,
    },
    /// The slot is empty now.
    PasscodeRemoved,
    /// All passcode slots in use.
    Passcodes(Vec<PasscodeSlot>),
    /// The lock forgot the gateway; the session ends.
    Unpaired,
}

/// Why the lock refused or failed an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum LockError {
    /// The motor jammed.
    #[error("the lock jammed")]
    Jammed,
    /// Another motor operation is in progress.
    #[error("the motor is busy")]
    Busy,
    /// Locking refused while the door stands open.
    #[error("the door is open")]
    DoorOpen,
    /// Not enough battery to run the motor.
    #[error("battery empty")]
    BatteryEmpty,
    /// The lock cannot do this (e.g. unlatch without a latch motor).
    #[error("not supported by this lock")]
    NotSupported,
    /// The operation needs the clock, which has not been set.
    #[error("the lock's clock is not set")]
    ClockNotSet,
    /// No passcode in that slot.
    #[error("no such passcode slot")]
    NoSuchSlot,
    /// All passcode slots are in use.
    #[error("passcode table full")]
    PasscodeTableFull,
    /// An argument is out of range.
    #[error("invalid argument")]
    InvalidArgument,
    /// This actor may not appear in a request.
    #[error("actor not allowed in a request")]
    BadActor,
}

/// A response to one request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The request's id.
    pub id: u32,
    /// The outcome.
    pub result: Result<Reply, LockError>,
}

/// What made the bolt move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cause {
    /// A request over the link (the entry's actor says whose).
    Remote,
    /// A keypad passcode.
    Keypad,
    /// The thumb-turn or a key.
    Manual,
    /// The auto-lock timer.
    AutoLock,
}

/// Something the lock records and reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The bolt state changed.
    StateChanged {
        /// New state.
        state: LockState,
        /// Why.
        cause: Cause,
    },
    /// The latch was pulled.
    Unlatched,
    /// The door opened or closed.
    Door(DoorState),
    /// The motor jammed.
    Jammed,
    /// Tamper switch triggered.
    Tamper,
    /// Battery below the warning threshold.
    BatteryLow {
        /// Battery level.
        pct: u8,
    },
    /// A wrong passcode was entered on the keypad.
    KeypadRejected,
    /// Too many wrong passcodes: the keypad is disabled for a while.
    KeypadLockout,
    /// The clock was set.
    ClockSet,
    /// A passcode was added.
    PasscodeAdded {
        /// Slot.
        slot: u16,
    },
    /// A passcode was removed.
    PasscodeRemoved {
        /// Slot.
        slot: u16,
    },
    /// A gateway paired.
    Paired,
    /// The lock restarted.
    Rebooted,
}

/// One entry of the lock's event log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Sequence number: starts at 1, increases by one per entry, survives reboots.
    pub seq: u64,
    /// The lock's clock when it happened (Unix seconds), if set.
    pub time: Option<u64>,
    /// What happened.
    pub event: Event,
    /// Who, where known.
    pub actor: Option<Actor>,
}

/// What the lock sends inside sealed frames.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockMessage {
    /// The answer to a request.
    Response(Response),
    /// Something just happened (also written to the log).
    Event(LogEntry),
}

/// Why a message could not be encoded or decoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MessageError {
    /// The bytes are not a valid message of the expected type.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A valid message followed by extra bytes.
    #[error("{0} unexpected bytes after the message")]
    TrailingBytes(usize),
    /// The encoded message does not fit one frame.
    #[error("message of {0} bytes exceeds one frame")]
    TooLarge(usize),
    /// A passcode is not 4 to 12 digits.
    #[error("a passcode is 4 to 12 digits")]
    BadPasscode,
    /// An events page holds more entries than allowed.
    #[error("events page of {0} entries exceeds {MAX_EVENTS_PER_PAGE}")]
    PageTooLarge(usize),
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, MessageError> {
    let bytes = postcard::to_stdvec(value).map_err(|e| MessageError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_PLAINTEXT_LEN {
        return Err(MessageError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, MessageError> {
    if bytes.len() > MAX_PLAINTEXT_LEN {
        return Err(MessageError::TooLarge(bytes.len()));
    }
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| MessageError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(MessageError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

impl Request {
    /// Encodes the request.
    pub fn encode(&self) -> Result<Vec<u8>, MessageError> {
        encode(self)
    }

    /// Decodes a request strictly.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        decode(bytes)
    }
}

impl LockMessage {
    /// Encodes the message.
    pub fn encode(&self) -> Result<Vec<u8>, MessageError> {
        encode(self)
    }

    /// Decodes a message strictly.
    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        let msg: LockMessage = decode(bytes)?;
        if let LockMessage::Response(Response { result: Ok(Reply::Events { entries, .. }), .. }) = &msg
            && entries.len() > usize::from(MAX_EVENTS_PER_PAGE)
        {
            return Err(MessageError::PageTooLarge(entries.len()));
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_refuse_trailing_bytes() {
        let r = Request {
            id: 7,
            actor: Actor::Cloud(UserRef([1; 8])),
            op: Op::AddPasscode { code: Passcode::new("123456").unwrap(), valid_from: None, valid_until: Some(9) },
        };
        let mut bytes = r.encode().unwrap();
        assert_eq!(Request::decode(&bytes).unwrap(), r);
        bytes.push(0);
        assert_eq!(Request::decode(&bytes), Err(MessageError::TrailingBytes(1)));
    }

    #[test]
    fn a_full_page_of_worst_case_entries_fits_one_frame() {
        let entry = LogEntry {
            seq: u64::MAX,
            time: Some(u64::MAX),
            event: Event::StateChanged { state: LockState::Unlocked, cause: Cause::Remote },
            actor: Some(Actor::Cloud(UserRef([0xff; 8]))),
        };
        let msg = LockMessage::Response(Response {
            id: u32::MAX,
            result: Ok(Reply::Events { entries: vec![entry; MAX_EVENTS_PER_PAGE.into()], more: true }),
        });
        let bytes = msg.encode().unwrap();
        assert_eq!(LockMessage::decode(&bytes).unwrap(), msg);
    }

    #[test]
    fn passcodes_are_validated_on_decode() {
        let ok = Request {
            id: 1,
            actor: Actor::Hub,
            op: Op::AddPasscode { code: Passcode::new("1234").unwrap(), valid_from: None, valid_until: None },
        };
        let mut bytes = ok.encode().unwrap();
        // The passcode string is encoded as varint length + ASCII; turn a digit into a letter.
        let pos = bytes.iter().position(|&b| b == b'1').unwrap();
        bytes[pos] = b'x';
        assert!(matches!(Request::decode(&bytes), Err(MessageError::Malformed(_))));
        assert!(!format!("{ok:?}").contains("1234"));
    }
}
