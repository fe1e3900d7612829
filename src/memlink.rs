//! An in-memory link: the gateway's protocol state machine wired to an emulated lock.
//!
//! No radio, no D-Bus, no wall clock: fragments move between a [`HubConnection`] and a
//! [`Firmware`] directly, and a virtual clock jumps to the next deadline whenever both sides
//! are waiting. That makes protocol tests deterministic and benchmarks measure the protocol
//! alone. A [`Tap`] sees (and may drop, repeat, reorder or alter) every fragment in flight,
//! which is how tests play the attacker on the radio.
//!
//! ```
//! use lockhub::firmware::{Firmware, Mechanics, PersistentState};
//! use lockhub::memlink::MemoryLink;
//! use lockhub::protocol::gatt::Capabilities;
//! use lockhub::protocol::ids::{GatewayId, LockId};
//! use lockhub::protocol::message::{Actor, LockState, Op, Reply};
//! use rand_core::OsRng;
//!
//! // A lock fresh from the factory; its setup code is printed inside the battery cover.
//! let lock = PersistentState::factory_new(LockId([1; 8]), Capabilities::default(), Mechanics::default(), &mut OsRng);
//! let code = lock.identity.setup_code.clone();
//! let mut link = MemoryLink::new(Firmware::boot(lock, Box::new(OsRng)), GatewayId::new("hub")?, 23, Box::new(OsRng));
//!
//! link.connect()?;
//! let key = link.pair(&code)?; // the gateway seals this away
//! link.open_session(&key)?;
//! let response = link.call(Actor::Hub, Op::Unlock)?;
//! assert!(matches!(response.result, Ok(Reply::Done(status)) if status.state == LockState::Unlocked));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use rand_core::CryptoRngCore;
use thiserror::Error;

use crate::firmware::{Firmware, Output};
use crate::protocol::hub::{HubConnection, HubEvent, ProtocolError};
use crate::protocol::ids::GatewayId;
use crate::protocol::message::{Actor, LogEntry, Op, Response};
use crate::protocol::pairing::{PairingKey, SetupCode};

/// Which way a fragment travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// A write from the gateway.
    ToLock,
    /// A notification from the lock.
    ToGateway,
}

/// Sees every fragment in flight and returns what is delivered instead (nothing, the same,
/// several).
pub type Tap = Box<dyn FnMut(Direction, Vec<u8>) -> Vec<Vec<u8>> + Send>;

/// Why an operation over the link failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LinkError {
    /// The gateway's protocol state machine failed (and closed the connection).
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The lock dropped the connection.
    #[error("the lock dropped the link")]
    LinkLost,
    /// Nothing is connected.
    #[error("not connected")]
    NotConnected,
    /// Both sides are idle and the awaited answer never came.
    #[error("no answer from the lock")]
    NoAnswer,
    /// The answer did not come within the virtual-time budget.
    #[error("timed out after {0} ms")]
    Timeout(u64),
}

/// Virtual-time budget for one operation (generous: motors are slow, links are not).
pub const OPERATION_TIMEOUT_MS: u64 = 30_000;

/// A gateway connection and an emulated lock joined in memory.
pub struct MemoryLink {
    firmware: Firmware,
    conn: Option<HubConnection>,
    gateway_id: GatewayId,
    mtu: u16,
    now_ms: u64,
    events: Vec<LogEntry>,
    rng: Box<dyn CryptoRngCore + Send>,
    tap: Option<Tap>,
}

impl std::fmt::Debug for MemoryLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryLink")
            .field("firmware", &self.firmware)
            .field("mtu", &self.mtu)
            .field("now_ms", &self.now_ms)
            .finish_non_exhaustive()
    }
}

impl MemoryLink {
    /// Joins a gateway named `gateway_id` to `firmware` at ATT MTU `mtu` (not yet connected).
    pub fn new(firmware: Firmware, gateway_id: GatewayId, mtu: u16, rng: Box<dyn CryptoRngCore + Send>) -> Self {
        MemoryLink { firmware, conn: None, gateway_id, mtu, now_ms: 0, events: Vec::new(), rng, tap: None }
    }

    /// Installs a tap on the radio.
    pub fn set_tap(&mut self, tap: Tap) {
        self.tap = Some(tap);
    }

    /// Removes the tap.
    pub fn clear_tap(&mut self) {
        self.tap = None;
    }

    /// The emulated lock.
    pub fn firmware(&self) -> &Firmware {
        &self.firmware
    }

    /// The emulated lock, to press its buttons and turn its fault knobs.
    pub fn firmware_mut(&mut self) -> &mut Firmware {
        &mut self.firmware
    }

    /// The virtual clock, in ms.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Whether a connection is up (from the gateway's view).
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Delivers whatever is in flight, then takes the log entries the lock pushed so far.
    pub fn take_events(&mut self) -> Result<Vec<LogEntry>, LinkError> {
        if self.conn.is_some() {
            self.exchange(&mut |_| false)?;
        }
        Ok(std::mem::take(&mut self.events))
    }

    /// Connects (a fresh BLE connection: new protocol state on both sides).
    pub fn connect(&mut self) -> Result<(), LinkError> {
        let max_fragment = crate::protocol::fragment::max_fragment_len(self.mtu).map_err(ProtocolError::from)?;
        self.conn = Some(HubConnection::new(self.gateway_id.clone(), self.firmware.lock_id(), max_fragment)?);
        self.firmware.connect(self.mtu, self.now_ms);
        Ok(())
    }

    /// Disconnects.
    pub fn disconnect(&mut self) {
        self.conn = None;
        self.firmware.disconnect(self.now_ms);
    }

    /// Pairs with the lock's setup code; the connection stays up for a session.
    pub fn pair(&mut self, code: &SetupCode) -> Result<PairingKey, LinkError> {
        let MemoryLink { conn, rng, .. } = self;
        conn.as_mut().ok_or(LinkError::NotConnected)?.begin_pairing(code, &mut rng.as_mut())?;
        match self.run_until(|e| matches!(e, HubEvent::Paired(_)))? {
            HubEvent::Paired(key) => Ok(key),
            _ => unreachable!("run_until returns the awaited event"),
        }
    }

    /// Opens a session with the pairing key.
    pub fn open_session(&mut self, key: &PairingKey) -> Result<(), LinkError> {
        let MemoryLink { conn, rng, .. } = self;
        conn.as_mut().ok_or(LinkError::NotConnected)?.begin_session(key.clone(), &mut rng.as_mut())?;
        self.run_until(|e| matches!(e, HubEvent::SessionOpened)).map(drop)
    }

    /// Connects and opens a session in one go.
    pub fn connect_session(&mut self, key: &PairingKey) -> Result<(), LinkError> {
        self.connect()?;
        self.open_session(key)
    }

    /// Sends a request and waits (in virtual time) for its response.
    pub fn call(&mut self, actor: Actor, op: Op) -> Result<Response, LinkError> {
        let id = self.conn.as_mut().ok_or(LinkError::NotConnected)?.request(actor, op)?;
        match self.run_until(|e| matches!(e, HubEvent::Response(r) if r.id == id))? {
            HubEvent::Response(r) => Ok(r),
            _ => unreachable!("run_until returns the awaited event"),
        }
    }

    /// Sends a request without waiting.
    pub fn send(&mut self, actor: Actor, op: Op) -> Result<u32, LinkError> {
        Ok(self.conn.as_mut().ok_or(LinkError::NotConnected)?.request(actor, op)?)
    }

    /// Lets `ms` of virtual time pass, delivering whatever happens meanwhile.
    pub fn advance(&mut self, ms: u64) -> Result<(), LinkError> {
        let end = self.now_ms.saturating_add(ms);
        loop {
            self.exchange(&mut |_| false)?;
            match self.next_deadline() {
                Some(at) if at <= end => self.tick(at.max(self.now_ms))?,
                _ => {
                    self.tick(end)?;
                    return Ok(());
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<u64> {
        let hub = self.conn.as_ref().and_then(HubConnection::deadline);
        [self.firmware.deadline(), hub].into_iter().flatten().min()
    }

    fn tick(&mut self, at: u64) -> Result<(), LinkError> {
        self.now_ms = at;
        self.firmware.on_timeout(at);
        if let Some(conn) = self.conn.as_mut() {
            conn.on_timeout(at)?;
        }
        Ok(())
    }

    fn run_until(&mut self, mut done: impl FnMut(&HubEvent) -> bool) -> Result<HubEvent, LinkError> {
        let start = self.now_ms;
        loop {
            if let Some(ev) = self.exchange(&mut done)? {
                return Ok(ev);
            }
            match self.next_deadline() {
                Some(at) if at.saturating_sub(start) > OPERATION_TIMEOUT_MS => {
                    return Err(LinkError::Timeout(OPERATION_TIMEOUT_MS));
                }
                Some(at) => self.tick(at.max(self.now_ms))?,
                None => return Err(LinkError::NoAnswer),
            }
        }
    }

    /// Moves fragments both ways until neither side has anything due now. Returns the first
    /// event `done` accepts; other pushed events are kept for [`MemoryLink::take_events`].
    fn exchange(&mut self, done: &mut dyn FnMut(&HubEvent) -> bool) -> Result<Option<HubEvent>, LinkError> {
        loop {
            let mut progressed = false;
            while let Some(frag) = self.conn.as_mut().and_then(HubConnection::poll_transmit) {
                progressed = true;
                for f in self.through_tap(Direction::ToLock, frag) {
                    self.firmware.write(&f, self.now_ms);
                }
            }
            while let Some(out) = self.firmware.poll_output(self.now_ms) {
                progressed = true;
                let frag = match out {
                    Output::Notify(frag) => frag,
                    Output::Disconnect => {
                        self.conn = None;
                        return Err(LinkError::LinkLost);
                    }
                };
                for f in self.through_tap(Direction::ToGateway, frag) {
                    let Some(conn) = self.conn.as_mut() else {
                        return Err(LinkError::NotConnected);
                    };
                    let fed = conn.on_notification(&f, self.now_ms);
                    let mut awaited = None;
                    while let Some(ev) = conn.poll_event() {
                        match ev {
                            ev if awaited.is_none() && done(&ev) => awaited = Some(ev),
                            HubEvent::Event(e) => self.events.push(e),
                            _ => {}
                        }
                    }
                    if let Err(e) = fed {
                        // The gateway gives up on a broken connection: it disconnects.
                        self.disconnect();
                        return Err(e.into());
                    }
                    if awaited.is_some() {
                        return Ok(awaited);
                    }
                }
            }
            if !progressed {
                return Ok(None);
            }
        }
    }

    fn through_tap(&mut self, dir: Direction, frag: Vec<u8>) -> Vec<Vec<u8>> {
        match self.tap.as_mut() {
            Some(tap) => tap(dir, frag),
            None => vec![frag],
        }
    }
}
