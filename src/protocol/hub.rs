//! The gateway's end of one LHP/1 connection, as a sans-IO state machine.
//!
//! The caller (the BLE transport, or the in-memory link in tests) feeds in every notification
//! fragment with [`HubConnection::on_notification`], takes what happened from
//! [`HubConnection::poll_event`], writes out whatever [`HubConnection::poll_transmit`] yields,
//! and calls [`HubConnection::on_timeout`] at [`HubConnection::deadline`]. The first error of any kind closes the connection for good:
//! the caller disconnects and, if it wants, starts over on a new BLE connection.
//!
//! ```text
//!  Idle ──begin_pairing──▶ Pairing ──PairResponse──▶ Confirming ──PairDone──▶ Idle
//!  Idle ──begin_session──▶ Hello ──HelloReply──▶ Established ──(any error)──▶ Closed
//! ```

use std::collections::VecDeque;

use rand_core::{CryptoRng, RngCore};
use thiserror::Error;

use super::fragment::{FragmentError, Fragmenter, Reassembler};
use super::frame::{Frame, FrameError, HelloRejectReason, NONCE_LEN, PairRejectReason};
use super::ids::{GatewayId, LockId};
use super::message::{Actor, LockMessage, LogEntry, MessageError, Op, Request, Response};
use super::pairing::{PairingError, PairingInitiator, PairingKey, SetupCode};
use super::session::{Role, SecureChannel, SessionError, SessionKeys};

/// What a connection reports to its owner.
#[derive(Debug, PartialEq, Eq)]
pub enum HubEvent {
    /// Pairing finished: the lock stored this key. Seal it away; it is needed for every session.
    Paired(PairingKey),
    /// The session is open; requests may be sent.
    SessionOpened,
    /// The answer to a request.
    Response(Response),
    /// The lock pushed a log entry.
    Event(LogEntry),
}

/// Why a connection failed. Every variant closes it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// Fragment reassembly failed.
    #[error("fragment error: {0}")]
    Fragment(#[from] FragmentError),
    /// A frame could not be parsed.
    #[error("frame error: {0}")]
    Frame(#[from] FrameError),
    /// The sealed channel refused a frame.
    #[error("session error: {0}")]
    Session(#[from] SessionError),
    /// A sealed message did not decode.
    #[error("message error: {0}")]
    Message(#[from] MessageError),
    /// The pairing exchange failed.
    #[error("pairing failed: {0}")]
    Pairing(#[from] PairingError),
    /// The lock refused pairing.
    #[error("the lock refused pairing: {reason:?} ({attempts_left} attempts left)")]
    PairingRefused {
        /// Why.
        reason: PairRejectReason,
        /// Attempts left before the lock leaves pairing mode.
        attempts_left: u8,
    },
    /// The lock refused a session.
    #[error("the lock refused a session: {0:?}")]
    SessionRefused(HelloRejectReason),
    /// The lock's hello tag did not verify: it does not hold our pairing key (it was reset or
    /// re-paired, or it is not the lock we think).
    #[error("the lock could not prove it holds the pairing key")]
    LockNotAuthenticated,
    /// A frame arrived that does not belong in the current state.
    #[error("unexpected frame {frame:?} while {state}")]
    Unexpected {
        /// The state the connection was in.
        state: &'static str,
        /// The frame's type byte.
        frame: u8,
    },
    /// The call does not fit the current state (e.g. a request before the session is open).
    #[error("cannot {action} while {state}")]
    WrongState {
        /// What was attempted.
        action: &'static str,
        /// The state the connection was in.
        state: &'static str,
    },
}

enum State {
    Idle,
    Pairing(PairingInitiator),
    Confirming(PairingKey),
    Hello { key: PairingKey, nonce: [u8; NONCE_LEN] },
    Established(Box<SecureChannel>),
    Closed,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Pairing(_) => "pairing",
            State::Confirming(_) => "confirming pairing",
            State::Hello { .. } => "opening a session",
            State::Established(_) => "in session",
            State::Closed => "closed",
        }
    }
}

/// The gateway's end of one connection to one lock.
pub struct HubConnection {
    gateway_id: GatewayId,
    lock_id: LockId,
    state: State,
    fragmenter: Fragmenter,
    reassembler: Reassembler,
    transmit: VecDeque<Vec<u8>>,
    events: VecDeque<HubEvent>,
    next_request_id: u32,
}

impl std::fmt::Debug for HubConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConnection")
            .field("lock_id", &self.lock_id)
            .field("max_fragment", &self.fragmenter.max_len())
            .field("state", &self.state.name())
            .finish_non_exhaustive()
    }
}

impl HubConnection {
    /// A fresh connection whose writes carry at most `max_fragment` bytes (ATT MTU − 3 on a
    /// plain link, see [`super::fragment::max_fragment_len`]; less if the stack says so).
    pub fn new(gateway_id: GatewayId, lock_id: LockId, max_fragment: usize) -> Result<Self, ProtocolError> {
        Ok(HubConnection {
            gateway_id,
            lock_id,
            state: State::Idle,
            fragmenter: Fragmenter::new(max_fragment)?,
            reassembler: Reassembler::default(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            next_request_id: 1,
        })
    }

    /// The lock this connection talks to.
    pub fn lock_id(&self) -> LockId {
        self.lock_id
    }

    /// Whether requests can be sent.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established(_))
    }

    /// Whether an error closed the connection.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Starts pairing with the lock's setup code.
    pub fn begin_pairing(
        &mut self,
        code: &SetupCode,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(), ProtocolError> {
        self.require_idle("pair")?;
        let (init, frame) = PairingInitiator::start(code, self.gateway_id.clone(), self.lock_id, rng);
        self.queue(&frame.encode())?;
        self.state = State::Pairing(init);
        Ok(())
    }

    /// Opens a session with the pairing key.
    pub fn begin_session(
        &mut self,
        key: PairingKey,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(), ProtocolError> {
        self.require_idle("open a session")?;
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        self.queue(&Frame::Hello { nonce }.encode())?;
        self.state = State::Hello { key, nonce };
        Ok(())
    }

    /// Sends a request; returns its id, which the [`Response`] will carry.
    pub fn request(&mut self, actor: Actor, op: Op) -> Result<u32, ProtocolError> {
        let id = self.next_request_id;
        let State::Established(channel) = &mut self.state else {
            return Err(ProtocolError::WrongState { action: "send a request", state: self.state.name() });
        };
        let plain = zeroize::Zeroizing::new(Request { id, actor, op }.encode()?);
        let sealed = channel.seal(&plain);
        let frame = self.fail_on_err(sealed)?;
        self.queue(&frame)?;
        self.next_request_id = self.next_request_id.wrapping_add(1).max(1);
        Ok(id)
    }

    /// The next fragment to write to the lock's write characteristic.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    /// When [`HubConnection::on_timeout`] must be called (a partial frame is pending).
    pub fn deadline(&self) -> Option<u64> {
        self.reassembler.deadline()
    }

    /// Expires a partial frame that outlived the reassembly timeout.
    pub fn on_timeout(&mut self, now_ms: u64) -> Result<(), ProtocolError> {
        let r = self.reassembler.check_timeout(now_ms).map_err(ProtocolError::from);
        self.fail_on_err(r)
    }

    /// Feeds one notification fragment from the lock. What the frames it completes mean comes
    /// out of [`HubConnection::poll_event`]; a fragment may complete none, or several that
    /// arrived out of order. On an error, the events of frames taken before it still come out.
    pub fn on_notification(&mut self, fragment: &[u8], now_ms: u64) -> Result<(), ProtocolError> {
        if self.is_closed() {
            return Err(ProtocolError::WrongState { action: "receive", state: "closed" });
        }
        let r = self.reassembler.push(fragment, now_ms).map_err(ProtocolError::from);
        for frame in self.fail_on_err(r)? {
            let r = self.on_frame(&frame);
            if let Some(event) = self.fail_on_err(r)? {
                self.events.push_back(event);
            }
        }
        Ok(())
    }

    /// How many of the lock's fragments on this connection arrived out of order and were put
    /// back (see [`Reassembler::out_of_order`]).
    pub fn fragments_out_of_order(&self) -> u64 {
        self.reassembler.out_of_order()
    }

    /// The next thing the lock's frames brought about, in the order the lock sent them.
    pub fn poll_event(&mut self) -> Option<HubEvent> {
        self.events.pop_front()
    }

    fn on_frame(&mut self, bytes: &[u8]) -> Result<Option<HubEvent>, ProtocolError> {
        if let State::Established(channel) = &mut self.state {
            let plain = channel.open(bytes)?;
            return Ok(Some(match LockMessage::decode(&plain)? {
                LockMessage::Response(r) => HubEvent::Response(r),
                LockMessage::Event(e) => HubEvent::Event(e),
            }));
        }
        let frame = Frame::parse(bytes)?;
        let state_name = self.state.name();
        match (std::mem::replace(&mut self.state, State::Closed), frame) {
            (State::Pairing(init), Frame::PairResponse { spake, confirm }) => {
                let (key, confirm_frame) = init.on_response(&spake, &confirm)?;
                self.queue(&confirm_frame.encode())?;
                self.state = State::Confirming(key);
                Ok(None)
            }
            (State::Pairing(_) | State::Confirming(_), Frame::PairReject { reason, attempts_left }) => {
                Err(ProtocolError::PairingRefused { reason, attempts_left })
            }
            (State::Confirming(key), Frame::PairDone) => {
                self.state = State::Idle;
                Ok(Some(HubEvent::Paired(key)))
            }
            (State::Hello { key, nonce }, Frame::HelloReply { nonce: lock_nonce, confirm }) => {
                let keys = SessionKeys::derive(&key, self.lock_id, &nonce, &lock_nonce);
                if !keys.verify_hello_tag(&nonce, &lock_nonce, &confirm) {
                    return Err(ProtocolError::LockNotAuthenticated);
                }
                self.state = State::Established(Box::new(SecureChannel::new(&keys, Role::Gateway)));
                Ok(Some(HubEvent::SessionOpened))
            }
            (State::Hello { .. }, Frame::HelloReject { reason }) => Err(ProtocolError::SessionRefused(reason)),
            (_, frame) => Err(ProtocolError::Unexpected { state: state_name, frame: frame.kind() }),
        }
    }

    fn require_idle(&self, action: &'static str) -> Result<(), ProtocolError> {
        match self.state {
            State::Idle => Ok(()),
            _ => Err(ProtocolError::WrongState { action, state: self.state.name() }),
        }
    }

    fn queue(&mut self, frame: &[u8]) -> Result<(), ProtocolError> {
        let frags = self.fragmenter.cut(frame);
        let frags = self.fail_on_err(frags.map_err(ProtocolError::from))?;
        self.transmit.extend(frags);
        Ok(())
    }

    fn fail_on_err<T, E>(&mut self, r: Result<T, E>) -> Result<T, E> {
        if r.is_err() {
            self.state = State::Closed;
            self.transmit.clear();
        }
        r
    }
}
