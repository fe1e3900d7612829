//! The emulated lock firmware, as a deterministic sans-IO state machine.
//!
//! It behaves like the firmware of a real LHP/1 lock: a bolt driven by a motor that takes time,
//! a door sensor, a battery that drains per operation, a real-time clock the gateway sets, an
//! event log, keypad passcodes, pairing mode and factory reset. Time and randomness are
//! injected (every input carries the caller's monotonic milliseconds; the random source is
//! given at boot), so a test can run it step by step and get the same result every time.
//!
//! The front end (the in-memory link, the D-Bus `org.bluez` emulation, a BLE peripheral)
//! calls [`Firmware::connect`], [`Firmware::write`] and [`Firmware::disconnect`] as the radio
//! does, sends whatever [`Firmware::poll_output`] yields, and calls [`Firmware::on_timeout`]
//! at [`Firmware::deadline`]. [`Faults`] makes the firmware misbehave on purpose.

pub mod bluez;
mod event_log;
pub mod host;
mod passcodes;
pub mod peripheral;

pub use event_log::{EventLog, LOG_CAPACITY};
pub use passcodes::PasscodeTable;

use std::collections::VecDeque;

use rand_core::CryptoRngCore;
use serde::{Deserialize, Serialize};

use crate::protocol::fragment::{self, Fragmenter, Reassembler};
use crate::protocol::frame::{Frame, HelloRejectReason, NONCE_LEN, PairRejectReason};
use crate::protocol::gatt::{Capabilities, LockInfo, ManufacturerData, PROTOCOL_VERSION};
use crate::protocol::ids::{GatewayId, LockId};
use crate::protocol::message::{
    Actor, Cause, DoorState, Event, LockError, LockMessage, LockState, LockStatus, MAX_EVENTS_PER_PAGE, Op, Reply,
    Request, Response,
};
use crate::protocol::pairing::{MAX_PAIRING_ATTEMPTS, PairingKey, PairingResponder, SetupCode};
use crate::protocol::session::{Role, SecureChannel, SessionKeys};

/// Battery level (per mille) under which the lock reports [`Event::BatteryLow`].
pub const BATTERY_LOW_PERMILLE: u16 = 150;
/// Wrong keypad entries in a row that disable the keypad.
pub const KEYPAD_MAX_FAILURES: u8 = 5;
/// How long the keypad stays disabled after too many wrong entries.
pub const KEYPAD_LOCKOUT_MS: u64 = 60_000;

/// Firmware version the emulator reports.
pub const EMULATED_FIRMWARE_VERSION: (u8, u8, u8) = (1, 0, 0);

/// What a lock is, fixed at manufacture.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identity {
    /// The lock's id.
    pub lock_id: LockId,
    /// The setup code printed on the label.
    pub setup_code: SetupCode,
    /// Firmware version.
    pub firmware: (u8, u8, u8),
    /// What the hardware can do.
    pub capabilities: Capabilities,
}

/// Mechanical and power characteristics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mechanics {
    /// How long the motor takes to move the bolt, in ms (0: instantly).
    pub motor_ms: u64,
    /// Lock again this long after unlocking while the door is closed (none: never).
    pub auto_lock_ms: Option<u64>,
    /// Battery drained per motor operation, per mille.
    pub drain_per_op_permille: u16,
}

impl Default for Mechanics {
    fn default() -> Self {
        Mechanics { motor_ms: 400, auto_lock_ms: None, drain_per_op_permille: 1 }
    }
}

/// The gateway a lock is paired with.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pairing {
    /// Its id, as sent in the pairing request.
    pub gateway_id: GatewayId,
    /// The shared key.
    pub key: PairingKey,
}

/// Everything the lock keeps in flash: serialise it to survive a restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersistentState {
    /// Factory identity.
    pub identity: Identity,
    /// Mechanics.
    pub mechanics: Mechanics,
    /// The paired gateway, if any.
    pub pairing: Option<Pairing>,
    /// Whether pairing is accepted.
    pub pairing_mode: bool,
    /// Pairing attempts begun and not (yet) successful.
    pub failed_pairing_attempts: u8,
    /// Keypad passcodes (hashes only).
    pub passcodes: PasscodeTable,
    /// Event log.
    pub log: EventLog,
    /// Newest sequence number the gateway has been given.
    pub reported_seq: u64,
    /// Settled bolt state.
    pub bolt: LockState,
    /// Door position.
    pub door: DoorState,
    /// Battery level, per mille.
    pub battery_permille: u16,
}

impl PersistentState {
    /// A lock fresh from the factory: random setup code, unpaired, in pairing mode, locked.
    pub fn factory_new(
        lock_id: LockId,
        capabilities: Capabilities,
        mechanics: Mechanics,
        rng: &mut impl CryptoRngCore,
    ) -> Self {
        PersistentState {
            identity: Identity {
                lock_id,
                setup_code: SetupCode::random(rng),
                firmware: EMULATED_FIRMWARE_VERSION,
                capabilities,
            },
            mechanics,
            pairing: None,
            pairing_mode: true,
            failed_pairing_attempts: 0,
            passcodes: PasscodeTable::default(),
            log: EventLog::default(),
            reported_seq: 0,
            bolt: LockState::Locked,
            door: if capabilities.door_sensor { DoorState::Closed } else { DoorState::Unknown },
            battery_permille: 1000,
        }
    }
}

/// Misbehaviour on demand, for fault-injection tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Drop the link on receiving the n-th complete frame from now (1: the next one), before
    /// acting on it.
    pub drop_link_after_frames: Option<u32>,
    /// Hold every outgoing notification back this long.
    pub response_delay_ms: u64,
    /// Flip a bit in the next sealed frame sent.
    pub corrupt_next_frame: bool,
    /// The next motor operation jams.
    pub jam_next_operation: bool,
}

/// What the firmware asks its radio front end to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send this fragment as a notification on the notify characteristic.
    Notify(Vec<u8>),
    /// Drop the connection.
    Disconnect,
}

enum Phase {
    Idle,
    AwaitingPairConfirm(Box<PairingResponder>),
    Session(Box<SecureChannel>),
}

struct Link {
    fragmenter: Fragmenter,
    reassembler: Reassembler,
    phase: Phase,
}

#[derive(Clone, Copy, Debug)]
struct Motion {
    from: LockState,
    target: LockState,
    unlatch: bool,
    done_at: u64,
    cause: Cause,
    actor: Option<Actor>,
    request: Option<u32>,
}

/// Which way a motor operation goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Movement {
    Lock,
    Unlock,
    Unlatch,
}

/// The emulated lock.
pub struct Firmware {
    state: PersistentState,
    rng: Box<dyn CryptoRngCore + Send>,
    link: Option<Link>,
    motion: Option<Motion>,
    /// (Unix seconds, monotonic ms) when the clock was last set.
    clock: Option<(u64, u64)>,
    auto_lock_at: Option<u64>,
    keypad_failures: u8,
    keypad_locked_until: Option<u64>,
    faults: Faults,
    outbox: VecDeque<(u64, Output)>,
}

impl std::fmt::Debug for Firmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Firmware")
            .field("lock_id", &self.state.identity.lock_id)
            .field("bolt", &self.state.bolt)
            .field("connected", &self.link.is_some())
            .finish_non_exhaustive()
    }
}

impl Firmware {
    /// Boots the firmware from its persistent state.
    pub fn boot(state: PersistentState, rng: Box<dyn CryptoRngCore + Send>) -> Self {
        let mut fw = Firmware {
            state,
            rng,
            link: None,
            motion: None,
            clock: None,
            auto_lock_at: None,
            keypad_failures: 0,
            keypad_locked_until: None,
            faults: Faults::default(),
            outbox: VecDeque::new(),
        };
        // A reboot in the middle of a failed attempt still counts toward the limit.
        if fw.state.failed_pairing_attempts >= MAX_PAIRING_ATTEMPTS {
            fw.leave_pairing_mode();
        }
        fw
    }

    /// The persistent state, to save.
    pub fn persistent(&self) -> &PersistentState {
        &self.state
    }

    /// The lock's id.
    pub fn lock_id(&self) -> LockId {
        self.state.identity.lock_id
    }

    /// The fault knobs' current settings.
    pub fn faults(&self) -> Faults {
        self.faults
    }

    /// The fault knobs.
    pub fn faults_mut(&mut self) -> &mut Faults {
        &mut self.faults
    }

    /// The info characteristic's value.
    pub fn info(&self) -> LockInfo {
        LockInfo {
            protocol_version: PROTOCOL_VERSION,
            lock_id: self.state.identity.lock_id,
            firmware: self.state.identity.firmware,
            pairing_mode: self.state.pairing_mode,
            capabilities: self.state.identity.capabilities,
        }
    }

    /// The manufacturer data to advertise.
    pub fn advertisement(&self) -> ManufacturerData {
        ManufacturerData::new(
            self.state.identity.lock_id,
            self.state.pairing_mode,
            self.state.pairing.is_some() && self.state.log.last_seq() > self.state.reported_seq,
        )
    }

    /// The current status.
    pub fn status(&self, now_ms: u64) -> LockStatus {
        LockStatus {
            state: self.bolt_state(),
            door: self.state.door,
            battery_pct: (self.state.battery_permille / 10) as u8,
            clock: self.clock_now(now_ms),
            last_seq: self.state.log.last_seq(),
        }
    }

    /// Whether a central is connected.
    pub fn is_connected(&self) -> bool {
        self.link.is_some()
    }

    /// Whether a session is established on the current connection.
    pub fn in_session(&self) -> bool {
        matches!(self.link, Some(Link { phase: Phase::Session(_), .. }))
    }

    fn bolt_state(&self) -> LockState {
        match self.motion {
            Some(m) if m.target == LockState::Locked => LockState::Locking,
            Some(_) => LockState::Unlocking,
            None => self.state.bolt,
        }
    }

    fn clock_now(&self, now_ms: u64) -> Option<u64> {
        self.clock.map(|(unix, at)| unix.saturating_add(now_ms.saturating_sub(at) / 1000))
    }

    fn rng(&mut self) -> &mut (dyn CryptoRngCore + Send) {
        self.rng.as_mut()
    }

    // ---- radio ----

    /// A central connected with this ATT MTU. A second central replaces the first, as a
    /// single-connection peripheral does.
    pub fn connect(&mut self, mtu: u16, now_ms: u64) {
        let mtu = mtu.clamp(fragment::MIN_MTU, fragment::MAX_MTU);
        self.connect_with_fragments(usize::from(mtu) - 3, now_ms);
    }

    /// A central connected over a stack that carries at most `max_fragment` bytes per
    /// notification (clamped to what LHP/1 allows): BlueZ serving the lock sends
    /// notifications as Multiple Handle Value Notifications, whose length field leaves
    /// `MTU - 5` bytes, where a plain notification carries `MTU - 3`.
    pub fn connect_with_fragments(&mut self, max_fragment: usize, _now_ms: u64) {
        self.drop_link_quietly();
        // Whatever was queued belonged to the previous connection.
        self.outbox.clear();
        let max_fragment = max_fragment.clamp(fragment::MIN_FRAGMENT_LEN, fragment::MAX_FRAGMENT_LEN);
        let Ok(fragmenter) = Fragmenter::new(max_fragment) else { return };
        self.link = Some(Link { fragmenter, reassembler: Reassembler::default(), phase: Phase::Idle });
    }

    /// The central went away.
    pub fn disconnect(&mut self, _now_ms: u64) {
        self.drop_link_quietly();
    }

    /// How many fragments on the current link arrived out of order and were put back (see
    /// [`Reassembler::out_of_order`]).
    pub fn fragments_out_of_order(&self) -> u64 {
        self.link.as_ref().map_or(0, |l| l.reassembler.out_of_order())
    }

    /// A fragment was written to the write characteristic.
    pub fn write(&mut self, fragment: &[u8], now_ms: u64) {
        let Some(link) = self.link.as_mut() else { return };
        let Ok(frames) = link.reassembler.push(fragment, now_ms) else {
            self.drop_link();
            return;
        };
        for frame in frames {
            if let Some(n) = self.faults.drop_link_after_frames.as_mut() {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.faults.drop_link_after_frames = None;
                    self.drop_link();
                    return;
                }
            }
            self.on_frame(&frame, now_ms);
            if self.link.is_none() {
                return;
            }
        }
    }

    /// The next thing to do on the radio, once its (delayed) time has come.
    pub fn poll_output(&mut self, now_ms: u64) -> Option<Output> {
        match self.outbox.front() {
            Some((at, _)) if *at <= now_ms => self.outbox.pop_front().map(|(_, o)| o),
            _ => None,
        }
    }

    /// The earliest time [`Firmware::on_timeout`] or [`Firmware::poll_output`] has work.
    pub fn deadline(&self) -> Option<u64> {
        [
            self.motion.map(|m| m.done_at),
            self.auto_lock_at,
            self.link.as_ref().and_then(|l| l.reassembler.deadline()),
            self.outbox.front().map(|(at, _)| *at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs whatever is due: motor completion, auto-lock, reassembly timeout.
    pub fn on_timeout(&mut self, now_ms: u64) {
        if self.motion.is_some_and(|m| m.done_at <= now_ms) {
            self.finish_motion(now_ms);
        }
        if self.auto_lock_at.is_some_and(|at| at <= now_ms) {
            self.auto_lock_at = None;
            if self.state.bolt == LockState::Unlocked && self.motion.is_none() && self.state.door != DoorState::Open {
                // A refusal (battery empty) is already visible in the status; nothing to answer.
                let _ = self.start_motion(Movement::Lock, Cause::AutoLock, None, None, now_ms);
            }
        }
        if let Some(link) = self.link.as_mut()
            && link.reassembler.check_timeout(now_ms).is_err()
        {
            self.drop_link();
        }
    }

    // ---- the physical world ----

    /// The pairing button was held: accept pairing again.
    pub fn press_pairing_button(&mut self) {
        self.state.pairing_mode = true;
        self.state.failed_pairing_attempts = 0;
    }

    /// Someone typed `code` on the keypad and pressed enter. Returns whether it opened.
    pub fn enter_keypad_code(&mut self, code: &str, now_ms: u64) -> bool {
        if !self.state.identity.capabilities.keypad {
            return false;
        }
        if self.keypad_locked_until.is_some_and(|until| now_ms < until) {
            return false;
        }
        self.keypad_locked_until = None;
        match self.state.passcodes.verify(code, self.clock_now(now_ms)) {
            Some(slot) => {
                self.keypad_failures = 0;
                self.start_motion(Movement::Unlock, Cause::Keypad, Some(Actor::Keypad(slot)), None, now_ms).is_ok()
            }
            None => {
                self.keypad_failures += 1;
                self.record(Event::KeypadRejected, None, now_ms);
                if self.keypad_failures >= KEYPAD_MAX_FAILURES {
                    self.keypad_failures = 0;
                    self.keypad_locked_until = Some(now_ms.saturating_add(KEYPAD_LOCKOUT_MS));
                    self.record(Event::KeypadLockout, None, now_ms);
                }
                false
            }
        }
    }

    /// Someone turned the thumb-turn (or a key): the bolt flips without the motor.
    pub fn turn_knob(&mut self, now_ms: u64) {
        if self.motion.is_some() {
            return;
        }
        let target = if self.state.bolt == LockState::Locked { LockState::Unlocked } else { LockState::Locked };
        self.settle(target, Cause::Manual, None, now_ms);
    }

    /// The door opened or closed.
    pub fn set_door(&mut self, open: bool, now_ms: u64) {
        if !self.state.identity.capabilities.door_sensor {
            return;
        }
        let door = if open { DoorState::Open } else { DoorState::Closed };
        if door == self.state.door {
            return;
        }
        self.state.door = door;
        self.record(Event::Door(door), None, now_ms);
        if !open && self.state.bolt == LockState::Unlocked {
            self.arm_auto_lock(now_ms);
        }
    }

    /// The tamper switch tripped.
    pub fn trigger_tamper(&mut self, now_ms: u64) {
        self.record(Event::Tamper, None, now_ms);
    }

    /// Sets the battery level (0-100 %).
    pub fn set_battery(&mut self, pct: u8, now_ms: u64) {
        let before = self.state.battery_permille;
        self.state.battery_permille = u16::from(pct.min(100)) * 10;
        self.report_battery(before, now_ms);
    }

    /// Power-cycles the lock: the link drops, a motor operation in progress is abandoned (the
    /// bolt stays where it was), the clock is lost; flash survives.
    pub fn reboot(&mut self, now_ms: u64) {
        self.drop_link();
        self.outbox.retain(|(_, o)| *o == Output::Disconnect);
        if let Some(m) = self.motion.take() {
            self.state.bolt = m.from;
        }
        self.clock = None;
        self.auto_lock_at = None;
        self.keypad_failures = 0;
        self.keypad_locked_until = None;
        self.record(Event::Rebooted, None, now_ms);
    }

    /// Factory reset: forgets the gateway, the passcodes and the log contents (not the
    /// sequence counter) and enters pairing mode.
    pub fn factory_reset(&mut self) {
        self.drop_link();
        self.forget_binding();
    }

    // ---- protocol ----

    fn on_frame(&mut self, bytes: &[u8], now_ms: u64) {
        let Some(link) = self.link.as_mut() else { return };
        let phase = std::mem::replace(&mut link.phase, Phase::Idle);
        match phase {
            Phase::Session(mut channel) => {
                let request = match channel.open(bytes) {
                    Ok(plain) => Request::decode(&plain),
                    Err(_) => return self.drop_link(),
                };
                if let Some(link) = self.link.as_mut() {
                    link.phase = Phase::Session(channel);
                }
                match request {
                    Ok(request) => self.handle_request(request, now_ms),
                    // Authentic but undecodable: a broken peer. Nothing to answer to.
                    Err(_) => self.drop_link(),
                }
            }
            Phase::AwaitingPairConfirm(responder) => match Frame::parse(bytes) {
                Ok(Frame::PairConfirm { confirm }) => match responder.on_confirm(&confirm) {
                    Ok((gateway_id, key)) => {
                        self.state.pairing = Some(Pairing { gateway_id, key });
                        self.state.pairing_mode = false;
                        self.state.failed_pairing_attempts = 0;
                        self.send_frame(&Frame::PairDone, now_ms);
                        self.record(Event::Paired, Some(Actor::Hub), now_ms);
                    }
                    Err(_) => self.pairing_failed(now_ms),
                },
                _ => {
                    self.pairing_failed(now_ms);
                    self.drop_link();
                }
            },
            Phase::Idle => match Frame::parse(bytes) {
                Ok(Frame::PairRequest { gateway_id, spake }) => self.on_pair_request(gateway_id, &spake, now_ms),
                Ok(Frame::Hello { nonce }) => self.on_hello(&nonce, now_ms),
                _ => {
                    self.send_frame(&Frame::HelloReject { reason: HelloRejectReason::Unexpected }, now_ms);
                    self.drop_link();
                }
            },
        }
    }

    fn on_pair_request(&mut self, gateway_id: GatewayId, spake: &[u8; 33], now_ms: u64) {
        if !self.state.pairing_mode {
            let reject = Frame::PairReject { reason: PairRejectReason::NotInPairingMode, attempts_left: 0 };
            return self.send_frame(&reject, now_ms);
        }
        self.state.failed_pairing_attempts += 1;
        let code = self.state.identity.setup_code.clone();
        let lock_id = self.state.identity.lock_id;
        match PairingResponder::respond(&code, lock_id, gateway_id, spake, &mut self.rng()) {
            Ok((responder, frame)) => {
                self.send_frame(&frame, now_ms);
                if let Some(link) = self.link.as_mut() {
                    link.phase = Phase::AwaitingPairConfirm(Box::new(responder));
                }
            }
            Err(_) => self.pairing_failed(now_ms),
        }
    }

    fn pairing_failed(&mut self, now_ms: u64) {
        let reject = if self.state.failed_pairing_attempts >= MAX_PAIRING_ATTEMPTS {
            self.leave_pairing_mode();
            Frame::PairReject { reason: PairRejectReason::AttemptsExhausted, attempts_left: 0 }
        } else {
            Frame::PairReject {
                reason: PairRejectReason::ConfirmationFailed,
                attempts_left: MAX_PAIRING_ATTEMPTS - self.state.failed_pairing_attempts,
            }
        };
        self.send_frame(&reject, now_ms);
    }

    fn leave_pairing_mode(&mut self) {
        self.state.pairing_mode = false;
        self.state.failed_pairing_attempts = 0;
    }

    fn on_hello(&mut self, gateway_nonce: &[u8; NONCE_LEN], now_ms: u64) {
        let Some(pairing) = &self.state.pairing else {
            return self.send_frame(&Frame::HelloReject { reason: HelloRejectReason::NotPaired }, now_ms);
        };
        let key = pairing.key.clone();
        let mut lock_nonce = [0u8; NONCE_LEN];
        self.rng().fill_bytes(&mut lock_nonce);
        let keys = SessionKeys::derive(&key, self.state.identity.lock_id, gateway_nonce, &lock_nonce);
        let confirm = keys.hello_tag(gateway_nonce, &lock_nonce);
        self.send_frame(&Frame::HelloReply { nonce: lock_nonce, confirm }, now_ms);
        if let Some(link) = self.link.as_mut() {
            link.phase = Phase::Session(Box::new(SecureChannel::new(&keys, Role::Lock)));
        }
    }

    fn handle_request(&mut self, request: Request, now_ms: u64) {
        let Request { id, actor, op } = request;
        if matches!(actor, Actor::Keypad(_)) {
            return self.respond(id, Err(LockError::BadActor), now_ms);
        }
        let result = match op {
            Op::Status => Ok(Reply::Status(self.status(now_ms))),
            Op::Lock | Op::Unlock | Op::Unlatch => {
                let movement = match op {
                    Op::Lock => Movement::Lock,
                    Op::Unlock => Movement::Unlock,
                    _ => Movement::Unlatch,
                };
                // On success the response follows when the motor stops.
                match self.start_motion(movement, Cause::Remote, Some(actor), Some(id), now_ms) {
                    Ok(()) => return,
                    Err(e) => Err(e),
                }
            }
            Op::SetTime { unix_secs } => {
                self.clock = Some((unix_secs, now_ms));
                self.record(Event::ClockSet, Some(actor), now_ms);
                Ok(Reply::ClockSet)
            }
            Op::ReadEvents { after, max } => {
                if max == 0 || max > MAX_EVENTS_PER_PAGE {
                    Err(LockError::InvalidArgument)
                } else {
                    let (entries, more) = self.state.log.read_after(after, usize::from(max));
                    if let Some(last) = entries.last() {
                        self.state.reported_seq = self.state.reported_seq.max(last.seq);
                    }
                    Ok(Reply::Events { entries, more })
                }
            }
            Op::AddPasscode { code, valid_from, valid_until } => {
                if !self.state.identity.capabilities.keypad {
                    Err(LockError::NotSupported)
                } else {
                    let Firmware { state, rng, .. } = self;
                    match state.passcodes.add(&code, valid_from, valid_until, &mut rng.as_mut()) {
                        Ok(slot) => {
                            self.record(Event::PasscodeAdded { slot }, Some(actor), now_ms);
                            Ok(Reply::PasscodeAdded { slot })
                        }
                        Err(e) => Err(e),
                    }
                }
            }
            Op::RemovePasscode { slot } => self.state.passcodes.remove(slot).map(|()| {
                self.record(Event::PasscodeRemoved { slot }, Some(actor), now_ms);
                Reply::PasscodeRemoved
            }),
            Op::ListPasscodes => Ok(Reply::Passcodes(self.state.passcodes.list())),
            Op::Unpair => {
                self.respond(id, Ok(Reply::Unpaired), now_ms);
                self.forget_binding();
                self.queue_output(Output::Disconnect, now_ms);
                self.link = None;
                return;
            }
        };
        self.respond(id, result, now_ms);
    }

    fn forget_binding(&mut self) {
        self.state.pairing = None;
        self.state.passcodes.clear();
        self.state.log.clear();
        self.state.reported_seq = self.state.log.last_seq();
        self.state.pairing_mode = true;
        self.state.failed_pairing_attempts = 0;
    }

    fn start_motion(
        &mut self,
        movement: Movement,
        cause: Cause,
        actor: Option<Actor>,
        request: Option<u32>,
        now_ms: u64,
    ) -> Result<(), LockError> {
        if self.motion.is_some() {
            return Err(LockError::Busy);
        }
        let unlatch = movement == Movement::Unlatch;
        if unlatch && !self.state.identity.capabilities.unlatch {
            return Err(LockError::NotSupported);
        }
        let target = if movement == Movement::Lock { LockState::Locked } else { LockState::Unlocked };
        if target == LockState::Locked && self.state.door == DoorState::Open {
            return Err(LockError::DoorOpen);
        }
        if target == self.state.bolt && !unlatch {
            if let Some(id) = request {
                self.respond(id, Ok(Reply::Done(self.status(now_ms))), now_ms);
            }
            return Ok(());
        }
        if self.state.battery_permille == 0 {
            return Err(LockError::BatteryEmpty);
        }
        let before = self.state.battery_permille;
        self.state.battery_permille = before.saturating_sub(self.state.mechanics.drain_per_op_permille);
        let m = Motion {
            from: self.state.bolt,
            target,
            unlatch,
            done_at: now_ms.saturating_add(self.state.mechanics.motor_ms),
            cause,
            actor,
            request,
        };
        self.motion = Some(m);
        self.auto_lock_at = None;
        self.record(Event::StateChanged { state: self.bolt_state(), cause }, actor, now_ms);
        self.report_battery(before, now_ms);
        if self.state.mechanics.motor_ms == 0 {
            self.finish_motion(now_ms);
        }
        Ok(())
    }

    fn finish_motion(&mut self, now_ms: u64) {
        let Some(m) = self.motion.take() else { return };
        if std::mem::take(&mut self.faults.jam_next_operation) {
            self.state.bolt = LockState::Jammed;
            self.record(Event::Jammed, m.actor, now_ms);
            self.record(Event::StateChanged { state: LockState::Jammed, cause: m.cause }, m.actor, now_ms);
            if let Some(id) = m.request {
                self.respond(id, Err(LockError::Jammed), now_ms);
            }
            return;
        }
        self.settle(m.target, m.cause, m.actor, now_ms);
        if m.unlatch {
            self.record(Event::Unlatched, m.actor, now_ms);
        }
        if let Some(id) = m.request {
            self.respond(id, Ok(Reply::Done(self.status(now_ms))), now_ms);
        }
    }

    fn settle(&mut self, target: LockState, cause: Cause, actor: Option<Actor>, now_ms: u64) {
        self.state.bolt = target;
        self.record(Event::StateChanged { state: target, cause }, actor, now_ms);
        if target == LockState::Unlocked {
            self.arm_auto_lock(now_ms);
        } else {
            self.auto_lock_at = None;
        }
    }

    fn arm_auto_lock(&mut self, now_ms: u64) {
        self.auto_lock_at = self.state.mechanics.auto_lock_ms.map(|ms| now_ms.saturating_add(ms));
    }

    fn report_battery(&mut self, before: u16, now_ms: u64) {
        let now = self.state.battery_permille;
        if before >= BATTERY_LOW_PERMILLE && now < BATTERY_LOW_PERMILLE {
            self.record(Event::BatteryLow { pct: (now / 10) as u8 }, None, now_ms);
        }
    }

    /// Logs an event and pushes it to the gateway if a session is open.
    fn record(&mut self, event: Event, actor: Option<Actor>, now_ms: u64) {
        let entry = self.state.log.append(self.clock_now(now_ms), event, actor);
        if self.in_session() {
            self.state.reported_seq = entry.seq;
            self.send_sealed(&LockMessage::Event(entry), now_ms);
        }
    }

    fn respond(&mut self, id: u32, result: Result<Reply, LockError>, now_ms: u64) {
        self.send_sealed(&LockMessage::Response(Response { id, result }), now_ms);
    }

    fn send_sealed(&mut self, message: &LockMessage, now_ms: u64) {
        let Some(Link { phase: Phase::Session(channel), .. }) = self.link.as_mut() else {
            return;
        };
        // Messages are bounded by construction (pages are capped), so encoding cannot fail.
        let Ok(plain) = message.encode().map(zeroize::Zeroizing::new) else {
            return;
        };
        let Ok(mut frame) = channel.seal(&plain) else {
            return self.drop_link();
        };
        if std::mem::take(&mut self.faults.corrupt_next_frame) {
            let last = frame.len() - 1;
            frame[last] ^= 0x01;
        }
        self.send_bytes(&frame, now_ms);
    }

    fn send_frame(&mut self, frame: &Frame, now_ms: u64) {
        self.send_bytes(&frame.encode(), now_ms);
    }

    fn send_bytes(&mut self, frame: &[u8], now_ms: u64) {
        let Some(link) = self.link.as_mut() else { return };
        match link.fragmenter.cut(frame) {
            Ok(frags) => frags.into_iter().for_each(|f| self.queue_output(Output::Notify(f), now_ms)),
            Err(_) => self.drop_link(),
        }
    }

    fn queue_output(&mut self, output: Output, now_ms: u64) {
        // Delayed outputs keep their order: nothing overtakes what was queued before it.
        let at = now_ms.saturating_add(self.faults.response_delay_ms).max(self.outbox.back().map_or(0, |(at, _)| *at));
        self.outbox.push_back((at, output));
    }

    /// Drops the link and tells the radio to disconnect.
    fn drop_link(&mut self) {
        if self.link.is_some() {
            self.drop_link_quietly();
            self.outbox.push_back((0, Output::Disconnect));
        }
    }

    /// Forgets the link (the central already left). A pairing attempt cut short counts as
    /// failed.
    fn drop_link_quietly(&mut self) {
        if let Some(link) = self.link.take() {
            if matches!(link.phase, Phase::AwaitingPairConfirm(_))
                && self.state.failed_pairing_attempts >= MAX_PAIRING_ATTEMPTS
            {
                self.leave_pairing_mode();
            }
            self.outbox.retain(|(_, o)| *o == Output::Disconnect);
        }
    }
}
