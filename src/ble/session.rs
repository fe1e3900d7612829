//! The LHP/1 protocol over one live link: the async twin of the in-memory link's driver.
//!
//! A [`LockSession`] owns a [`LockLink`] and a [`HubConnection`]; it writes what the state
//! machine queues, feeds it what the lock notifies, honours its reassembly deadline, and bounds
//! every wait. Log entries the lock pushes while a caller waits for something else are kept
//! for [`LockSession::take_events`].

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand_core::OsRng;

use super::{BleError, LockLink};
use crate::protocol::hub::{HubConnection, HubEvent};
use crate::protocol::ids::{GatewayId, LockId};
use crate::protocol::message::{Actor, LogEntry, Op, Response};
use crate::protocol::pairing::{PairingKey, SetupCode};

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
                    let now = self.now_ms();
                    match self.conn.on_notification(&fragment?, now)? {
                        Some(HubEvent::Event(e)) if !done(&HubEvent::Event(e)) => self.events.push_back(e),
                        Some(ev) if done(&ev) => return Ok(ev),
                        _ => {}
                    }
                }
                () = tokio::time::sleep_until(wake) => {
                    if wake >= deadline {
                        return Err(BleError::Timeout { during, after: timeout });
                    }
                    let now = self.now_ms();
                    self.conn.on_timeout(now)?;
                }
            }
        }
    }
}
