//! One lock's link, kept by the gateway: connected on demand, inside the connection budget,
//! retried with backoff while connecting, bounded everywhere, dropped when idle (after the
//! keep-alive window, or by its owner between jobs when another lock waits for a slot).
//!
//! A command is sent at most once: if the link fails after the request went out, the caller
//! gets [`BleError::LinkLost`] (the lock may or may not have acted, and the lock's log will
//! say), and the next command starts a new connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rand_core::RngCore;
use tokio::time::Instant;

use super::budget::{ConnectionBudget, Slot};
use super::radios::Radios;
use super::session::LockSession;
use super::{BleConfig, BleError, LockTransport};
use crate::protocol::ids::{GatewayId, LockId};
use crate::protocol::message::{Actor, LogEntry, Op, Response};
use crate::protocol::pairing::{PairingKey, SetupCode};

struct Live<L: super::LockLink> {
    session: LockSession<L>,
    _slot: Slot,
    last_used: Instant,
    /// The adapter it goes through.
    radio: usize,
}

/// The gateway's handle on one paired lock.
pub struct LockClient<T: LockTransport> {
    radios: Radios<T>,
    /// The adapter tried first (see `ble::radios`), an index into `radios`; shared so that
    /// the gateway can say where each lock is without asking its task.
    home: Arc<AtomicUsize>,
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
            .field("adapter", &self.adapter())
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

/// Pairs with the lock at `address` using its setup code, through `transport` (an adapter
/// that heard it); returns the key to keep sealed.
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
    /// A client for a paired lock on the hub's adapters, at home on `home` (an index into
    /// them); nothing connects until the first command.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        radios: Radios<T>,
        home: usize,
        config: BleConfig,
        gateway_id: GatewayId,
        lock_id: LockId,
        address: String,
        key: PairingKey,
    ) -> Self {
        let home = Arc::new(AtomicUsize::new(home));
        LockClient { radios, home, config, gateway_id, lock_id, address, key, live: None }
    }

    /// The adapter the lock goes through: the live link's, else its home.
    pub fn adapter(&self) -> &str {
        self.radios.get(self.live.as_ref().map_or_else(|| self.home(), |l| l.radio)).name()
    }

    /// Its home adapter's index in the hub's adapters, kept current as the home moves.
    pub fn home_index(&self) -> Arc<AtomicUsize> {
        self.home.clone()
    }

    fn home(&self) -> usize {
        self.home.load(Ordering::Acquire)
    }

    /// The budget of the live link's adapter, if a link is up: its owner makes way on it
    /// between jobs when another lock waits.
    pub fn link_budget(&self) -> Option<ConnectionBudget> {
        self.live.as_ref().map(|l| self.radios.get(l.radio).budget().clone())
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

    /// Opens a session through the lock's home adapter, else through the others in turn (the
    /// first that reaches it becomes its home).
    async fn ensure_session(&mut self) -> Result<(), BleError> {
        if self.live.is_some() {
            return Ok(());
        }
        let mut failures: Vec<(usize, BleError)> = Vec::new();
        let home = self.home();
        for index in self.radios.order_from(home).collect::<Vec<_>>() {
            let peer = Peer { gateway_id: &self.gateway_id, lock_id: self.lock_id, address: &self.address };
            match session_through(&self.radios, index, &self.config, &peer, &self.key).await {
                Ok(live) => {
                    if index != home {
                        let (from, to) = (self.radios.get(home).name(), self.radios.get(index).name());
                        let why = failures.first().map(|(_, e)| e.to_string()).unwrap_or_default();
                        tracing::info!(lock_id = %self.lock_id, from, to, error = why, "the lock is reached through another adapter now");
                        self.home.store(index, Ordering::Release);
                    }
                    self.live = Some(live);
                    return Ok(());
                }
                // The lock itself refused or is not what it should be: another adapter reaches
                // the same lock.
                Err(e @ (BleError::Protocol(_) | BleError::NotALock(_))) => return Err(e),
                Err(e) => failures.push((index, e)),
            }
        }
        Err(self.unreachable_through_all(failures))
    }

    /// What to answer when no adapter reached the lock: with one adapter its error; with
    /// several, the lock unreachable, saying what each adapter met.
    fn unreachable_through_all(&self, mut failures: Vec<(usize, BleError)>) -> BleError {
        if failures.len() == 1 {
            return failures.pop().expect("one failure").1;
        }
        let detail = failures
            .iter()
            .map(|(i, e)| {
                let name = self.radios.get(*i).name();
                match e {
                    // Already "lock at … unreachable": its reason alone.
                    BleError::Unreachable { detail, .. } => format!("through {name}: {detail}"),
                    e => format!("through {name}: {e}"),
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        BleError::Unreachable { address: self.address.clone(), detail }
    }
}

/// A session with `peer` through adapter `index`, within that adapter's budget.
async fn session_through<T: LockTransport>(
    radios: &Radios<T>,
    index: usize,
    config: &BleConfig,
    peer: &Peer<'_>,
    key: &PairingKey,
) -> Result<Live<T::Link>, BleError> {
    let radio = radios.get(index);
    let slot = radio.budget().acquire(config.slot_timeout()).await?;
    let session = match connect_with_retries(&**radio.transport(), config, peer, Purpose::Session(key)).await? {
        Established::Session(session) => *session,
        Established::Paired(_) => unreachable!("a session purpose yields a session"),
    };
    Ok(Live { session, _slot: slot, last_used: Instant::now(), radio: index })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::ble::{Advertisement, LockLink};
    use crate::protocol::gatt::LockInfo;

    /// A link that cannot exist: the transports below never make one.
    enum NoLink {}

    impl LockLink for NoLink {
        fn info(&self) -> LockInfo {
            match *self {}
        }
        fn max_fragment(&self) -> usize {
            match *self {}
        }
        async fn write(&mut self, _: &[u8]) -> Result<(), BleError> {
            match *self {}
        }
        async fn recv(&mut self) -> Result<Vec<u8>, BleError> {
            match *self {}
        }
        async fn close(self) {
            match self {}
        }
    }

    /// An adapter whose every connection fails with `error`; it notes each attempt, by its
    /// name, in `asked`.
    struct Failing {
        name: &'static str,
        error: BleError,
        asked: Arc<Mutex<Vec<&'static str>>>,
    }

    impl LockTransport for Failing {
        type Link = NoLink;
        async fn scan(&self, _: Duration) -> Result<Vec<Advertisement>, BleError> {
            Ok(Vec::new())
        }
        async fn find(&self, _: &str, _: Duration) -> Result<(), BleError> {
            Ok(())
        }
        async fn locate(&self, _: LockId, _: Duration) -> Result<Advertisement, BleError> {
            Err(self.error.clone())
        }
        async fn connect(&self, _: &str) -> Result<NoLink, BleError> {
            self.asked.lock().unwrap().push(self.name);
            Err(self.error.clone())
        }
        fn forget(&self, _: &str) {}
        fn remembers(&self, _: &str) -> bool {
            false
        }
        async fn listen(
            self: Arc<Self>,
            _: Duration,
            _: impl FnMut(&Advertisement) + Send,
            mut shutdown: tokio::sync::watch::Receiver<bool>,
        ) {
            crate::stop::requested(&mut shutdown).await;
        }
    }

    fn client(errors: [BleError; 2], home: usize) -> (LockClient<Failing>, Arc<Mutex<Vec<&'static str>>>) {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let [a, b] = errors;
        let radios = Radios::new(
            vec![
                ("hci0".into(), Arc::new(Failing { name: "hci0", error: a, asked: asked.clone() })),
                ("hci1".into(), Arc::new(Failing { name: "hci1", error: b, asked: asked.clone() })),
            ],
            1,
        );
        let config = BleConfig { connect_attempts: 1, ..BleConfig::default() };
        let gateway = GatewayId::new("hub").unwrap();
        let key = PairingKey::from_bytes([9; 32]);
        let client = LockClient::new(radios, home, config, gateway, LockId([1; 8]), "AA:BB".into(), key);
        (client, asked)
    }

    #[tokio::test]
    async fn a_lock_its_home_adapter_cannot_reach_is_tried_through_the_other_and_both_reasons_told() {
        let off = BleError::AdapterOff("hci1".into());
        let gone = BleError::NoAdapter(" hci0 (found: hci1)".into());
        let (mut client, asked) = client([gone, off], 1);
        assert_eq!(client.adapter(), "hci1");
        let e = client.call(Actor::Hub, Op::Status).await.unwrap_err();
        assert_eq!(*asked.lock().unwrap(), ["hci1", "hci0"], "its home first, then the other");
        assert_eq!(e.code(), "unreachable", "{e}");
        let text = e.to_string();
        assert!(text.contains("through hci1: Bluetooth adapter hci1 is powered off"), "{text}");
        assert!(text.contains("through hci0: no Bluetooth adapter hci0"), "{text}");
        assert_eq!(text.matches("unreachable").count(), 1, "said once: {text}");
        assert_eq!(client.adapter(), "hci1", "no adapter reached it: its home stays");
        assert!(client.radios.iter().all(|r| r.budget().in_use() == 0), "no slot is kept");
    }

    #[tokio::test]
    async fn a_lock_neither_adapter_reaches_is_said_unreachable_once_with_each_reason() {
        let far = |why: &str| BleError::Unreachable { address: "AA:BB".into(), detail: why.into() };
        let (mut client, _) = client([far("no answer"), far("connection aborted")], 0);
        let text = client.call(Actor::Hub, Op::Status).await.unwrap_err().to_string();
        assert!(text.starts_with("lock at AA:BB unreachable: through hci0: no session within "), "{text}");
        assert!(text.contains("no answer); through hci1: no session within "), "{text}");
        assert!(text.ends_with("connection aborted)"), "{text}");
    }

    #[tokio::test]
    async fn a_lock_that_refuses_is_not_tried_through_another_adapter() {
        let refused = BleError::NotALock("no LHP/1 service".into());
        let off = BleError::AdapterOff("hci1".into());
        let (mut client, asked) = client([refused.clone(), off], 0);
        let e = client.call(Actor::Hub, Op::Status).await.unwrap_err();
        assert_eq!(e, refused, "the lock's own answer, as it is");
        assert_eq!(*asked.lock().unwrap(), ["hci0"]);
    }

    #[tokio::test]
    async fn with_one_adapter_its_error_is_told_as_it_is() {
        let asked = Arc::new(Mutex::new(Vec::new()));
        let off = BleError::AdapterOff("hci0".into());
        let transport = Arc::new(Failing { name: "hci0", error: off.clone(), asked });
        let key = PairingKey::from_bytes([9; 32]);
        let gateway = GatewayId::new("hub").unwrap();
        let config = BleConfig::default();
        let radios = Radios::single("hci0", transport, ConnectionBudget::new(1));
        let mut client = LockClient::new(radios, 0, config, gateway, LockId([1; 8]), "AA:BB".into(), key);
        assert_eq!(client.call(Actor::Hub, Op::Status).await.unwrap_err(), off);
    }
}
