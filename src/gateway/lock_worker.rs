//! One task per paired lock: it owns the lock's BLE client, runs its commands one at a time
//! from a bounded queue (so back-to-back commands wait their turn instead of failing "busy"),
//! and reports what the lock says.
//!
//! Reporting is driven by the lock, never by polling: after every exchange the worker takes the
//! events the lock pushed, reads whatever part of its log it has not seen (on connect, after a
//! command, and when the lock advertises new events), and writes, in one transaction, each new
//! event to the outbox (exactly once: the lock's newest sequence number is stored with them),
//! the lock's retained state, and the sequence number reached.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc, oneshot};

use crate::auth::reason::Reason;
use crate::ble::budget::ConnectionBudget;
use crate::ble::client::LockClient;
use crate::ble::{BleError, LockTransport};
use crate::cloud::lock_report::{event_payload, state_payload};
use crate::cloud::topics::Topics;
use crate::protocol::ids::LockId;
use crate::protocol::message::{Actor, LockError, LockStatus, LogEntry, MAX_EVENTS_PER_PAGE, Op, Reply as LockReply};
use crate::store::Store;

/// Commands waiting for one lock, at most: far more than people send to one door, small
/// enough that a flood is turned away (`overloaded`) instead of piling up past deadlines.
pub const QUEUE: usize = 64;

/// Why a command did not complete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The reason code for the reply and the audit record.
    pub reason: Reason,
    /// What happened, for people.
    pub detail: String,
}

/// Work for a lock's task.
#[derive(Debug)]
enum Job {
    Execute { op: Op, actor: Actor, done: oneshot::Sender<Result<LockStatus, Failure>> },
    Sync { done: Option<oneshot::Sender<()>> },
}

/// The handle the gateway keeps per lock.
#[derive(Clone, Debug)]
pub struct LockHandle {
    jobs: mpsc::Sender<Job>,
    /// A sync is queued: advertisements repeat, and must not fill the queue with syncs.
    sync_queued: Arc<AtomicBool>,
}

impl LockHandle {
    /// Queues an operation and waits for its outcome. A full queue is refused at once
    /// (`overloaded`) rather than making the caller wait past its deadline.
    pub async fn execute(&self, op: Op, actor: Actor) -> Result<LockStatus, Failure> {
        let (done, outcome) = oneshot::channel();
        match self.jobs.try_send(Job::Execute { op, actor, done }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(Failure {
                    reason: Reason::Overloaded,
                    detail: format!("{QUEUE} commands already wait for this lock"),
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(gone()),
        }
        outcome.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Asks the task to read the lock's new events (it advertised some). Returns at once.
    pub fn sync(&self) {
        if !self.sync_queued.swap(true, Ordering::AcqRel) && self.jobs.try_send(Job::Sync { done: None }).is_err() {
            self.sync_queued.store(false, Ordering::Release);
        }
    }

    /// Reads the lock's new events and state, and waits until that is done.
    pub async fn sync_now(&self) {
        let (done, finished) = oneshot::channel();
        if self.jobs.send(Job::Sync { done: Some(done) }).await.is_ok() {
            let _ = finished.await;
        }
    }
}

fn gone() -> Failure {
    Failure { reason: Reason::Failed, detail: "the lock's task stopped".into() }
}

/// What a lock's task needs.
pub struct LockWorker<T: LockTransport> {
    /// The lock's client.
    pub client: LockClient<T>,
    /// The link budget it shares with the other locks (to make way when idle).
    pub budget: ConnectionBudget,
    /// When this gateway paired it (the event ids' epoch).
    pub epoch: i64,
    /// The newest log entry already reported.
    pub last_seq: u64,
    /// The store (events, state, sequence numbers).
    pub store: Arc<Mutex<Store>>,
    /// The gateway's topics.
    pub topics: Topics,
    /// Notified after each outbox write.
    pub outbox_ready: Arc<Notify>,
    /// The gateway's clock: Unix seconds, and whether it was ever synchronised.
    pub clock: Arc<dyn Fn() -> (i64, bool) + Send + Sync>,
    /// The lock's latest status, to republish its state when only the link changes.
    pub last_status: Option<LockStatus>,
    /// Whether the published state said connected.
    pub published_connected: Option<bool>,
}

impl<T: LockTransport> LockWorker<T> {
    /// Starts the task; it syncs with the lock first (clock, log, state).
    pub fn spawn(self) -> LockHandle {
        let (jobs, queue) = mpsc::channel(QUEUE);
        let handle = LockHandle { jobs, sync_queued: Arc::new(AtomicBool::new(false)) };
        handle.sync();
        tokio::spawn(self.run(queue, handle.sync_queued.clone()));
        handle
    }

    fn lock(&self) -> LockId {
        self.client.lock_id()
    }

    async fn run(mut self, mut queue: mpsc::Receiver<Job>, sync_queued: Arc<AtomicBool>) {
        loop {
            let idle = self.client.idle_deadline();
            let connected = self.client.is_connected();
            let job = tokio::select! {
                job = queue.recv() => match job {
                    Some(job) => job,
                    None => break,
                },
                // While a link is up, the lock may push events (a keypad, the thumb-turn), and
                // the link may die (out of range, reboot): both are reported as they happen.
                // Another lock waits for a link slot: an idle link makes way at once.
                () = self.budget.someone_waits(), if connected => {
                    self.client.disconnect().await;
                    self.report(Vec::new(), None).await;
                    continue;
                }
                pushed = self.client.next_event(), if connected => {
                    match pushed {
                        Ok(entry) => {
                            self.report(vec![entry], None).await;
                            let _ = self.sync().await;
                        }
                        Err(e) => {
                            tracing::info!(lock = %self.lock(), error = %e, "the link to the lock dropped");
                            self.report(Vec::new(), None).await;
                        }
                    }
                    continue;
                }
                () = async {
                    match idle {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if self.client.disconnect_if_idle().await {
                        self.report(Vec::new(), None).await;
                    }
                    continue;
                }
            };
            match job {
                Job::Execute { op, actor, done } => {
                    let outcome = self.execute(op, actor).await;
                    let _ = done.send(outcome);
                }
                Job::Sync { done } => {
                    sync_queued.store(false, Ordering::Release);
                    if let Err(e) = self.sync().await {
                        tracing::info!(lock = %self.lock(), error = %e, "could not read the lock's news");
                    }
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
            }
        }
        self.client.disconnect().await;
    }

    async fn execute(&mut self, op: Op, actor: Actor) -> Result<LockStatus, Failure> {
        let result = self.client.call(actor, op).await;
        let pushed = self.client.take_events();
        match result {
            Ok(response) => match response.result {
                Ok(LockReply::Done(status) | LockReply::Status(status)) => {
                    self.report(pushed, Some(status)).await;
                    Ok(status)
                }
                Ok(other) => {
                    self.report(pushed, None).await;
                    Err(Failure { reason: Reason::Failed, detail: format!("unexpected answer {other:?}") })
                }
                Err(LockError::Jammed) => {
                    self.report(pushed, None).await;
                    let _ = self.sync().await;
                    Err(Failure { reason: Reason::Jammed, detail: "the lock jammed: someone must look at it".into() })
                }
                Err(e) => {
                    self.report(pushed, None).await;
                    Err(Failure { reason: Reason::Failed, detail: e.to_string() })
                }
            },
            Err(e) => {
                self.report(pushed, None).await;
                Err(ble_failure(&e))
            }
        }
    }

    /// Sets the lock's clock (when ours is trustworthy), reads its status and new events.
    async fn sync(&mut self) -> Result<(), BleError> {
        let (now, synced) = (self.clock)();
        if synced && now > 0 {
            self.client.call(Actor::Hub, Op::SetTime { unix_secs: now as u64 }).await?;
        }
        let response = self.client.call(Actor::Hub, Op::Status).await?;
        let pushed = self.client.take_events();
        let status = match response.result {
            Ok(LockReply::Status(s)) => Some(s),
            _ => None,
        };
        self.report(pushed, status).await;
        Ok(())
    }

    /// Reads the log entries after `last_seq` that `pushed` does not hold, then records them
    /// and the state in one transaction.
    async fn report(&mut self, mut entries: Vec<LogEntry>, status: Option<LockStatus>) {
        if let Some(status) = status {
            let mut after = self.last_seq;
            // The lock has more than it pushed (events while we were away): read them.
            while status.last_seq > after && self.client.is_connected() {
                let max = MAX_EVENTS_PER_PAGE;
                let page = match self.client.call(Actor::Hub, Op::ReadEvents { after, max }).await {
                    Ok(r) => r.result,
                    Err(e) => {
                        tracing::info!(lock = %self.lock(), error = %e, "could not read the lock's log");
                        break;
                    }
                };
                match page {
                    Ok(LockReply::Events { entries: page, more }) => {
                        after = page.last().map_or(after, |e| e.seq);
                        entries.extend(page);
                        if !more {
                            break;
                        }
                    }
                    _ => break,
                }
            }
            entries.extend(self.client.take_events());
        }
        entries.sort_by_key(|e| e.seq);
        entries.dedup_by_key(|e| e.seq);
        entries.retain(|e| e.seq > self.last_seq);
        let connected = self.client.is_connected();
        // Without a fresh status, the state is republished only when the link came or went.
        let status = status.or(self.last_status.filter(|_| self.published_connected != Some(connected)));
        if entries.is_empty() && status.is_none() {
            return;
        }
        let lock = self.lock();
        let (now, _) = (self.clock)();
        let events_topic = self.topics.events();
        let state_topic = self.topics.lock_state(lock);
        let newest = entries.last().map_or(self.last_seq, |e| e.seq);
        let epoch = self.epoch;
        let store = self.store.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut store = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            store.transaction(|tx| {
                for entry in &entries {
                    tx.append_outbox(Some(lock), &events_topic, &event_payload(lock, epoch, entry), false, now)?;
                }
                if let Some(status) = status {
                    tx.append_outbox(
                        Some(lock),
                        &state_topic,
                        &state_payload(lock, &status, connected, now),
                        true,
                        now,
                    )?;
                    tx.note_retained_topic(lock, &state_topic)?;
                }
                tx.set_last_event_seq(lock, newest)?;
                Ok(())
            })
        })
        .await;
        match written {
            Ok(Ok(())) => {
                self.last_seq = newest;
                if status.is_some() {
                    self.last_status = status;
                    self.published_connected = Some(connected);
                }
                self.outbox_ready.notify_one();
            }
            // Not recorded: the entries stay unread (last_seq unchanged) and are read again.
            Ok(Err(e)) => tracing::error!(lock = %lock, error = %e, "could not record the lock's events"),
            Err(e) => tracing::error!(lock = %lock, error = %e, "the store task failed"),
        }
    }
}

/// The reply for a BLE failure: unreachable when no command reached the lock; failed (with the
/// stable code) when the link broke after it was sent — the lock's own log says whether it ran.
fn ble_failure(e: &BleError) -> Failure {
    let reason = match e {
        BleError::Unreachable { .. } | BleError::NotFound(_) | BleError::AdapterOff(_) | BleError::NoAdapter(_) => {
            Reason::LockUnreachable
        }
        _ => Reason::Failed,
    };
    Failure { reason, detail: format!("{} ({})", e, e.code()) }
}
