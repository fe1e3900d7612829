//! The LHP/1 protocol over one live link: the async twin of the in-memory link's driver.
//!
//! A [`LockSession`] owns a [`LockLink`] and a [`HubConnection`]; it writes what the state
//! machine queues, feeds it what the lock notifies, honours its reassembly deadline, and bounds
//! every wait. Log entries the lock pushes while a caller waits for something else are kept
//! for [`LockSession::take_events`], up to [`MAX_PENDING_EVENTS`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand_core::OsRng;

use super::{BleError, LockLink};
use crate::protocol::hub::{HubConnection, HubEvent};
use crate::protocol::ids::{GatewayId, LockId};
use crate::protocol::message::{Actor, LogEntry, Op, Response};
use crate::protocol::pairing::{PairingKey, SetupCode};

/// The log entries a session keeps while its caller waits for something else. A lock pushes a
/// few per operation; the entries of one pushing more within one wait (a flood, a fault) are
/// dropped past this bound rather than held without end. Nothing is lost by it: they stay in
/// the lock's log, and the gateway reads the log on from the last entry of an unbroken run.
pub const MAX_PENDING_EVENTS: usize = 256;

/// An established (or establishing) protocol session over one link.
pub struct LockSession<L: LockLink> {
    link: L,
    conn: HubConnection,
    epoch: Instant,
    events: VecDeque<LogEntry>,
}

impl<L: LockLink> std::fmt::Debug for LockSession<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockSession").field("conn", &self.conn).finish_non_exhaustive()
    }
}

impl<L: LockLink> LockSession<L> {
    /// The lock's info record, as read when the link was made.
    pub fn info(&self) -> crate::protocol::gatt::LockInfo {
        self.link.info()
    }

    fn new(link: L, gateway_id: GatewayId, lock_id: LockId) -> Result<Self, BleError> {
        // A lock is found by the tag it advertises, a digest prefix of its id: the info
        // record holds the whole id, so another lock with the same tag is told apart here.
        let found = link.info().lock_id;
        if found != lock_id {
            return Err(BleError::NotALock(format!("the lock at this address is {found}, not {lock_id}")));
        }
        let conn = HubConnection::new(gateway_id, lock_id, link.max_fragment())?;
        Ok(LockSession { link, conn, epoch: Instant::now(), events: VecDeque::new() })
    }

    /// Pairs over `link` with the lock's setup code; returns the pairing key. The link stays
    /// usable for [`LockSession::open`]-style use only after a new hello, so callers usually
    /// close it.
    pub async fn pair(
        link: L,
        gateway_id: GatewayId,
        lock_id: LockId,
        code: &SetupCode,
        timeout: Duration,
    ) -> Result<(PairingKey, Self), BleError> {
        let mut s = Self::new(link, gateway_id, lock_id)?;
        s.conn.begin_pairing(code, &mut OsRng)?;
        match s.run_until(timeout, "pairing", |e| matches!(e, HubEvent::Paired(_))).await {
            Ok(HubEvent::Paired(key)) => Ok((key, s)),
            Ok(_) => unreachable!("run_until returns the awaited event"),
            Err(e) => {
                s.link.close().await;
                Err(e)
            }
        }
    }

    /// Opens a session over `link` with the pairing key.
    pub async fn open(
        link: L,
        gateway_id: GatewayId,
        lock_id: LockId,
        key: &PairingKey,
        timeout: Duration,
    ) -> Result<Self, BleError> {
        let mut s = Self::new(link, gateway_id, lock_id)?;
        s.conn.begin_session(key.clone(), &mut OsRng)?;
        match s.run_until(timeout, "opening a session", |e| matches!(e, HubEvent::SessionOpened)).await {
            Ok(_) => Ok(s),
            Err(e) => {
                s.link.close().await;
                Err(e)
            }
        }
    }

    /// Sends a request and waits for its response, at most `timeout`.
    pub async fn call(&mut self, actor: Actor, op: Op, timeout: Duration) -> Result<Response, BleError> {
        let id = self.conn.request(actor, op)?;
        match self
            .run_until(timeout, "waiting for the lock's answer", |e| matches!(e, HubEvent::Response(r) if r.id == id))
            .await?
        {
            HubEvent::Response(r) => Ok(r),
            _ => unreachable!("run_until returns the awaited event"),
        }
    }

    /// Waits for the lock to push a log entry, at most `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<LogEntry, BleError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        match self.run_until(timeout, "waiting for an event", |e| matches!(e, HubEvent::Event(_))).await? {
            HubEvent::Event(e) => Ok(e),
            _ => unreachable!("run_until returns the awaited event"),
        }
    }

    /// Log entries the lock pushed while the session waited for something else.
    pub fn take_events(&mut self) -> Vec<LogEntry> {
        self.events.drain(..).collect()
    }

    /// Closes the link.
    pub async fn close(self) {
        self.link.close().await;
    }

    fn keep(&mut self, entry: LogEntry) {
        if self.events.len() < MAX_PENDING_EVENTS {
            self.events.push_back(entry);
        } else {
            tracing::debug!(seq = entry.seq, "more pushed log entries than a wait keeps; left in the lock's log");
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn run_until(
        &mut self,
        timeout: Duration,
        during: &'static str,
        mut done: impl FnMut(&HubEvent) -> bool,
    ) -> Result<HubEvent, BleError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            while let Some(fragment) = self.conn.poll_transmit() {
                tokio::time::timeout_at(deadline, self.link.write(&fragment))
                    .await
                    .map_err(|_| BleError::Timeout { during, after: timeout })??;
            }
            let reassembly = self.conn.deadline().map(|at| self.epoch + Duration::from_millis(at));
            let wake = reassembly.map_or(deadline, |r| tokio::time::Instant::from_std(r).min(deadline));
            tokio::select! {
                fragment = self.link.recv() => {
                    if let Some(event) = self.on_fragment(&fragment?, &mut done)? {
                        return Ok(event);
                    }
                }
                () = tokio::time::sleep_until(wake) => {
                    if wake >= deadline {
                        return self.last_look(&mut done).ok_or(BleError::Timeout { during, after: timeout })?;
                    }
                    let now = self.now_ms();
                    self.conn.on_timeout(now)?;
                }
            }
        }
    }

    /// Feeds one notification to the state machine: the awaited event, if this completed it
    /// (a log entry pushed meanwhile is kept). An event that came before an error is still
    /// taken: the error ends the link, and comes out at the next call.
    fn on_fragment(
        &mut self,
        fragment: &[u8],
        done: &mut impl FnMut(&HubEvent) -> bool,
    ) -> Result<Option<HubEvent>, BleError> {
        let now = self.now_ms();
        let out_of_order = self.conn.fragments_out_of_order();
        let fed = self.conn.on_notification(fragment, now);
        if self.conn.fragments_out_of_order() > out_of_order {
            // Several EATT bearers at work (docs/protocol.md §3): worth seeing, not a fault.
            tracing::debug!(total = self.conn.fragments_out_of_order(), "a fragment arrived out of order; put back");
        }
        let mut awaited = None;
        while let Some(event) = self.conn.poll_event() {
            match event {
                event if awaited.is_none() && done(&event) => awaited = Some(event),
                HubEvent::Event(e) => self.keep(e),
                _ => {}
            }
        }
        match (awaited, fed) {
            (Some(event), _) => Ok(Some(event)),
            (None, fed) => fed.map(|()| None).map_err(BleError::from),
        }
    }

    /// At the deadline, what the lock had already sent: an answer that arrived at the same
    /// instant as the deadline (the two branches of the wait were ready together, and the
    /// deadline's was picked) is taken, not reported missing. Only fragments ready now, and
    /// at most those of two whole frames, so that a lock notifying without pause cannot hold
    /// the deadline off.
    fn last_look(&mut self, done: &mut impl FnMut(&HubEvent) -> bool) -> Option<Result<HubEvent, BleError>> {
        use futures::FutureExt;
        let fragments = 2 * crate::protocol::fragment::MAX_FRAME_LEN.div_ceil(self.link.max_fragment().max(1));
        for _ in 0..fragments {
            let fragment = match self.link.recv().now_or_never()? {
                Ok(fragment) => fragment,
                Err(e) => return Some(Err(e)),
            };
            match self.on_fragment(&fragment, done) {
                Ok(Some(event)) => return Some(Ok(event)),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
        }
        None
    }
}

#[cfg(all(test, feature = "devtools"))]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::firmware::{Firmware, Mechanics, Output, PersistentState};
    use crate::protocol::gatt::Capabilities;
    use crate::protocol::message::Reply;

    const WAIT: Duration = Duration::from_secs(10);

    /// A link straight to emulated firmware (no radio, no D-Bus), which can make the lock's
    /// thumb-turn move many times as the next request reaches it, and hold what the lock
    /// sends back until a given instant.
    struct FirmwareLink {
        lock: Arc<Mutex<Firmware>>,
        inbox: VecDeque<Vec<u8>>,
        turns_before_answer: usize,
        hold_until: Option<tokio::time::Instant>,
    }

    impl FirmwareLink {
        fn new(lock: &Arc<Mutex<Firmware>>) -> Self {
            lock.lock().unwrap().connect(23, 0);
            FirmwareLink { lock: lock.clone(), inbox: VecDeque::new(), turns_before_answer: 0, hold_until: None }
        }
    }

    impl LockLink for FirmwareLink {
        fn info(&self) -> crate::protocol::gatt::LockInfo {
            self.lock.lock().unwrap().info()
        }

        fn max_fragment(&self) -> usize {
            20
        }

        async fn write(&mut self, fragment: &[u8]) -> Result<(), BleError> {
            let mut lock = self.lock.lock().unwrap();
            for _ in 0..std::mem::take(&mut self.turns_before_answer) {
                lock.turn_knob(0);
            }
            lock.write(fragment, 0);
            while let Some(output) = lock.poll_output(0) {
                if let Output::Notify(fragment) = output {
                    self.inbox.push_back(fragment);
                }
            }
            Ok(())
        }

        async fn recv(&mut self) -> Result<Vec<u8>, BleError> {
            if let Some(at) = self.hold_until
                && tokio::time::Instant::now() < at
            {
                tokio::time::sleep_until(at).await;
            }
            match self.inbox.pop_front() {
                Some(fragment) => Ok(fragment),
                None => std::future::pending().await,
            }
        }

        async fn close(self) {
            self.lock.lock().unwrap().disconnect(0);
        }
    }

    /// A lock and an open session with it.
    async fn session() -> LockSession<FirmwareLink> {
        let lock_id = LockId([7; 8]);
        let state = PersistentState::factory_new(lock_id, Capabilities::default(), Mechanics::default(), &mut OsRng);
        let code = state.identity.setup_code.clone();
        let lock = Arc::new(Mutex::new(Firmware::boot(state, Box::new(OsRng))));
        let gateway = GatewayId::new("gw-session").unwrap();
        let (key, paired) =
            LockSession::pair(FirmwareLink::new(&lock), gateway.clone(), lock_id, &code, WAIT).await.unwrap();
        paired.close().await;
        LockSession::open(FirmwareLink::new(&lock), gateway, lock_id, &key, WAIT).await.unwrap()
    }

    /// An answer that arrives at the very instant of the deadline is taken, not reported as a
    /// timeout: the wait's two branches are ready together and either may be picked. Twenty
    /// times, as the pick is random (a deadline that won half the time would pass this once
    /// in a million runs).
    #[tokio::test(start_paused = true)]
    async fn an_answer_arriving_at_the_deadline_is_taken() {
        let mut session = session().await;
        for _ in 0..20 {
            let at = tokio::time::Instant::now() + WAIT;
            session.link.hold_until = Some(at);
            let response = session.call(Actor::Hub, Op::Status, WAIT).await;
            assert!(matches!(&response, Ok(r) if matches!(r.result, Ok(Reply::Status(_)))), "{response:?}");
            assert_eq!(tokio::time::Instant::now(), at, "the answer came at the deadline, no later");
        }
    }

    /// At the deadline, a lock with ten thousand log entries queued ahead of its answer does
    /// not hold the deadline off: the last look reads a bounded number of fragments and the
    /// call ends as a timeout (without the bound it would read them all, and the answer).
    #[tokio::test(start_paused = true)]
    async fn a_flood_waiting_at_the_deadline_does_not_hold_it_off() {
        let mut session = session().await;
        session.link.hold_until = Some(tokio::time::Instant::now() + WAIT);
        session.link.turns_before_answer = 10_000;
        let response = session.call(Actor::Hub, Op::Status, WAIT).await;
        assert!(matches!(response, Err(BleError::Timeout { .. })), "{response:?}");
        assert!(session.link.inbox.len() > 10_000, "{} fragments left unread", session.link.inbox.len());
    }

    /// A lock pushing a thousand log entries while the session waits for one answer: the
    /// answer comes, and the session holds the first entries (an unbroken run), at most
    /// [`MAX_PENDING_EVENTS`], not all of them.
    #[tokio::test]
    async fn a_lock_flooding_log_entries_during_a_call_is_kept_to_the_bound() {
        let mut session = session().await;
        session.link.turns_before_answer = 1000;
        let response = session.call(Actor::Hub, Op::Status, WAIT).await.unwrap();
        let Ok(Reply::Status(status)) = response.result else { panic!("{response:?}") };
        let kept = session.take_events();
        assert_eq!(kept.len(), MAX_PENDING_EVENTS, "the lock logged up to {}", status.last_seq);
        assert!(status.last_seq >= kept[0].seq + 999, "the lock logged all thousand: {}", status.last_seq);
        assert!(kept.windows(2).all(|w| w[1].seq == w[0].seq + 1), "an unbroken run from the first");
    }
}
