//! One lock's link, kept by the gateway: connected on demand, inside the connection budget,
//! retried with backoff while connecting, bounded everywhere, dropped when idle (after the
//! keep-alive window, or by its owner between jobs when another lock waits for a slot).
//!
//! A command is sent at most once: if the link fails after the request went out, the caller
//! gets [`BleError::LinkLost`] (the lock may or may not have acted, and the lock's log will
//! say), and the next command starts a new connection.

use std::sync::Arc;
use std::time::Duration;

use rand_core::RngCore;
use tokio::time::Instant;

use super::budget::{ConnectionBudget, Slot};
use super::session::LockSession;
use super::{BleConfig, BleError, LockTransport};
use crate::protocol::ids::{GatewayId, LockId};
use crate::protocol::message::{Actor, LogEntry, Op, Response};
use crate::protocol::pairing::{PairingKey, SetupCode};

struct Live<L: super::LockLink> {
    session: LockSession<L>,
    _slot: Slot,
    last_used: Instant,
}

/// The gateway's handle on one paired lock.
pub struct LockClient<T: LockTransport> {
    transport: Arc<T>,
    budget: ConnectionBudget,
    config: BleConfig,
    gateway_id: GatewayId,
    lock_id: LockId,
    address: String,
    key: PairingKey,
    live: Option<Live<T::Link>>,
}

impl<T: LockTransport> std::fmt::Debug for LockClient<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockClient")
            .field("lock_id", &self.lock_id)
            .field("address", &self.address)
            .field("connected", &self.live.is_some())
            .finish_non_exhaustive()
    }
}

/// What a connection is made for.
enum Purpose<'a> {
    /// Open a session with the pairing key.
    Session(&'a PairingKey),
    /// Pair with the setup code.
    Pair(&'a SetupCode),
}

/// What a connection achieved.
enum Established<L: super::LockLink> {
    Session(Box<LockSession<L>>),
    Paired(PairingKey),
}

/// The peer a connection is for.
struct Peer<'a> {
    gateway_id: &'a GatewayId,
    lock_id: LockId,
    address: &'a str,
}

/// Connects to the lock and runs `purpose`, retrying transient failures with jittered
/// exponential backoff until `config.connect_timeout` runs out.
async fn connect_with_retries<T: LockTransport>(
    transport: &T,
    config: &BleConfig,
    peer: &Peer<'_>,
    purpose: Purpose<'_>,
) -> Result<Established<T::Link>, BleError> {
    let timeout = config.connect_timeout();
    let deadline = Instant::now() + timeout;
    let mut backoff = config.retry_backoff();
    let mut last: Option<BleError> = None;
    let address = peer.address;
    for attempt in 1..=config.connect_attempts.max(1) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break;
        }
        let result = match tokio::time::timeout(remaining, transport.connect(address)).await {
            Err(_) => Err(BleError::Timeout { during: "connecting", after: timeout }),
            // BlueZ no longer knows the lock (out of range for a while, or restarted): look
            // for it, then try again.
            Ok(Err(BleError::NotFound(_))) => match transport.find(address, remaining).await {
                Ok(()) => {
                    last = None;
                    continue;
                }
                Err(e) => Err(e),
            },
            Ok(Err(e)) => Err(e),
            Ok(Ok(link)) => {
                let remaining = deadline.saturating_duration_since(Instant::now());
                let (gateway_id, lock_id) = (peer.gateway_id.clone(), peer.lock_id);
                match purpose {
                    Purpose::Session(key) => LockSession::open(link, gateway_id, lock_id, key, remaining)
                        .await
                        .map(|s| Established::Session(Box::new(s))),
                    Purpose::Pair(code) => {
                        // Pairing runs SPAKE2 on both sides: give it the command bound at least.
                        let bound = remaining.max(config.command_timeout());
                        match LockSession::pair(link, gateway_id, lock_id, code, bound).await {
                            Ok((key, session)) => {
                                session.close().await;
                                Ok(Established::Paired(key))
                            }
                            Err(e) => Err(e),
                        }
                    }
                }
            }
        };
        match result {
            Ok(r) => return Ok(r),
            Err(e) if e.is_transient() => {
                tracing::debug!(address, attempt, error = %e, "connection attempt failed");
                // A timeout only says the time ran out: an earlier attempt's error says why.
                if !(matches!(e, BleError::Timeout { .. }) && last.is_some()) {
                    last = Some(e);
                }
                if attempt >= config.connect_attempts {
                    break;
                }
                let jitter = rand_core::OsRng.next_u64() % (backoff.as_millis() as u64 / 2 + 1);
                let pause = backoff + Duration::from_millis(jitter);
                if Instant::now() + pause >= deadline {
                    break;
                }
                tokio::time::sleep(pause).await;
                backoff = backoff.saturating_mul(2);
            }
            Err(e) => return Err(e),
        }
    }
    // Out of time or attempts: from the caller's view the lock cannot be reached.
    let detail = match last {
        Some(e) => format!("no session within {timeout:?} (last error: {e})"),
        None => format!("no session within {timeout:?}"),
    };
    Err(BleError::Unreachable { address: address.to_owned(), detail })
}

/// Pairs with the lock at `address` using its setup code; returns the key to keep sealed.
pub async fn pair<T: LockTransport>(
    transport: &T,
    budget: &ConnectionBudget,
    config: &BleConfig,
    gateway_id: &GatewayId,
    lock_id: LockId,
    address: &str,
    code: &SetupCode,
) -> Result<PairingKey, BleError> {
    let _slot = budget.acquire(config.slot_timeout()).await?;
    let peer = Peer { gateway_id, lock_id, address };
    let paired = connect_with_retries(transport, config, &peer, Purpose::Pair(code)).await;
    if paired.is_err() {
        // A lock that did not pair is not ours: the transport keeps nothing of it.
        transport.forget(address);
    }
    match paired? {
        Established::Paired(key) => Ok(key),
        Established::Session(_) => unreachable!("pairing yields a key"),
    }
}

impl<T: LockTransport> LockClient<T> {
    /// A client for a paired lock; nothing connects until the first command.
    pub fn new(
        transport: Arc<T>,
        budget: ConnectionBudget,
        config: BleConfig,
        gateway_id: GatewayId,
        lock_id: LockId,
        address: String,
        key: PairingKey,
    ) -> Self {
        LockClient { transport, budget, config, gateway_id, lock_id, address, key, live: None }
    }

    /// The lock's id.
    pub fn lock_id(&self) -> LockId {
        self.lock_id
    }

    /// Whether a link is up.
    pub fn is_connected(&self) -> bool {
        self.live.is_some()
    }

    /// The lock's info record (firmware version, capabilities) while a link is up.
    pub fn info(&self) -> Option<crate::protocol::gatt::LockInfo> {
        self.live.as_ref().map(|l| l.session.info())
    }

    /// Sends one command and waits for its answer, connecting first if needed.
    pub async fn call(&mut self, actor: Actor, op: Op) -> Result<Response, BleError> {
        self.ensure_session().await?;
        let timeout = self.config.command_timeout();
        let live = self.live.as_mut().expect("ensure_session leaves a live session");
        match live.session.call(actor, op, timeout).await {
            Ok(response) => {
                // The link stays up even if another lock waits for a slot: a caller's next call
                // (a sync is several) would otherwise reconnect, and two locks sharing one slot
                // would trade it back and forth. The owner makes way between its jobs.
                live.last_used = Instant::now();
                Ok(response)
            }
            Err(e) => {
                // The protocol closed the connection, or the link is gone: start over next time.
                self.disconnect().await;
                Err(e)
            }
        }
    }

    /// Waits for the lock to push a log entry over the idle link; never returns while no link
    /// is up. A link that dies meanwhile is dropped (`is_connected` turns false) and its error
    /// returned, so the caller learns of the loss as it happens rather than at the next command.
    pub async fn next_event(&mut self) -> Result<LogEntry, BleError> {
        let Some(live) = self.live.as_mut() else { return std::future::pending().await };
        // Bounded only by the link: the session returns as soon as the link reports anything.
        match live.session.next_event(Duration::from_secs(24 * 3600)).await {
            Ok(entry) => Ok(entry),
            Err(e) => {
                self.disconnect().await;
                Err(e)
            }
        }
    }

    /// Log entries the lock pushed during earlier commands.
    pub fn take_events(&mut self) -> Vec<LogEntry> {
        self.live.as_mut().map(|l| l.session.take_events()).unwrap_or_default()
    }

    /// When the link becomes idle enough to drop, if one is up.
    pub fn idle_deadline(&self) -> Option<Instant> {
        self.live.as_ref().map(|l| l.last_used + self.config.keep_alive())
    }

    /// Drops the link if it has been idle for the keep-alive window; returns whether it did.
    pub async fn disconnect_if_idle(&mut self) -> bool {
        match self.idle_deadline() {
            Some(at) if at <= Instant::now() => {
                self.disconnect().await;
                true
            }
            _ => false,
        }
    }

    /// Drops the link now.
    pub async fn disconnect(&mut self) {
        if let Some(live) = self.live.take() {
            live.session.close().await;
        }
    }

    async fn ensure_session(&mut self) -> Result<(), BleError> {
        if self.live.is_some() {
            return Ok(());
        }
        let slot = self.budget.acquire(self.config.slot_timeout()).await?;
        let peer = Peer { gateway_id: &self.gateway_id, lock_id: self.lock_id, address: &self.address };
        let session =
            match connect_with_retries(&*self.transport, &self.config, &peer, Purpose::Session(&self.key)).await? {
                Established::Session(session) => *session,
                Established::Paired(_) => unreachable!("a session purpose yields a session"),
            };
        self.live = Some(Live { session, _slot: slot, last_used: Instant::now() });
        Ok(())
    }
}
