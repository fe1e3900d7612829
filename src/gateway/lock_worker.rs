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

use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};

use crate::auth::reason::Reason;
use crate::ble::client::LockClient;
use crate::ble::{BleError, LockTransport};
use crate::cloud::lock_report::{event_payload, state_payload};
use crate::cloud::topics::Topics;
use crate::protocol::gatt::LockInfo;
use crate::protocol::ids::LockId;
use crate::protocol::message::{Actor, LockError, LockStatus, LogEntry, MAX_EVENTS_PER_PAGE, Op, Reply as LockReply};
use crate::store::{Store, StoreError, Tx};

/// How far the lock's clock may drift from the gateway's before the gateway sets it, seconds.
const MAX_CLOCK_DRIFT_S: i64 = 2;

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

/// What local consumers (the Home Assistant bridge) hear about a lock, after the store has
/// recorded it.
#[derive(Clone, Debug)]
pub enum LockUpdate {
    /// News from the lock, or about its link.
    Report {
        /// The lock.
        lock: LockId,
        /// The gateway's epoch for this lock (event ids).
        epoch: i64,
        /// Its status, when it sent one.
        status: Option<LockStatus>,
        /// Whether a link is up.
        connected: bool,
        /// Whether the last attempt to reach it worked.
        reachable: bool,
        /// New log entries, oldest first.
        entries: Vec<LogEntry>,
        /// Its info record (firmware, capabilities), once a link has read it.
        info: Option<LockInfo>,
    },
    /// The lock was unbound: everything about it is gone.
    Unbound {
        /// The lock.
        lock: LockId,
    },
}

/// Work for a lock's task.
#[derive(Debug)]
enum Job {
    Execute { op: Op, actor: Actor, done: oneshot::Sender<Executed> },
    Sync,
}

/// What the lock said about itself after an exchange: new log entries and its status, to be
/// written to the outbox with the sequence number reached, in one transaction.
#[derive(Clone, Debug)]
pub struct Report {
    lock: LockId,
    epoch: i64,
    entries: Vec<LogEntry>,
    status: Option<LockStatus>,
    connected: bool,
    newest: u64,
    now: i64,
    events_topic: String,
    state_topic: String,
}

impl Report {
    /// Writes the events, the retained state and the sequence number reached.
    pub fn write(&self, tx: &mut Tx<'_>) -> Result<(), StoreError> {
        let lock = self.lock;
        for entry in &self.entries {
            tx.append_outbox(Some(lock), &self.events_topic, &event_payload(lock, self.epoch, entry), false, self.now)?;
        }
        if let Some(status) = &self.status {
            let state = state_payload(lock, status, self.connected, self.now);
            tx.append_outbox(Some(lock), &self.state_topic, &state, true, self.now)?;
            tx.note_retained_topic(lock, &self.state_topic)?;
        }
        tx.set_last_event_seq(lock, self.newest)
    }
}

/// The outcome of a command, with the report to record alongside the reply. The caller writes
/// `report` in the transaction of its reply and says on `recorded` whether that committed;
/// otherwise (or if the caller is gone) the lock's task records the report itself.
#[derive(Debug)]
pub struct Executed {
    /// What the lock did: its status after a motor operation, `None` for other operations.
    pub outcome: Result<Option<LockStatus>, Failure>,
    /// What to record about the lock.
    pub report: Option<Report>,
    /// `true` once `report` is committed.
    pub recorded: oneshot::Sender<bool>,
    /// When the lock's task took the command, and when the lock's answer reached it.
    pub ran: (std::time::Instant, std::time::Instant),
}

/// The handle the gateway keeps per lock.
#[derive(Clone, Debug)]
pub struct LockHandle {
    jobs: mpsc::Sender<Job>,
    /// A sync is queued: advertisements repeat, and must not fill the queue with syncs.
    sync_queued: Arc<AtomicBool>,
    /// The lock's home adapter (its index in the hub's adapters).
    home: Arc<std::sync::atomic::AtomicUsize>,
}

impl LockHandle {
    /// The lock's home adapter, as an index in the hub's adapters.
    pub fn home(&self) -> usize {
        self.home.load(Ordering::Acquire)
    }

    /// Queues an operation and waits for its outcome (see [`Executed`]). A full queue is
    /// refused at once (`overloaded`) rather than making the caller wait past its deadline.
    pub async fn execute(&self, op: Op, actor: Actor) -> Result<Executed, Failure> {
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
        outcome.await.map_err(|_| gone())
    }

    /// Asks the task to read the lock's new events (it advertised some). Returns at once.
    pub fn sync(&self) {
        if !self.sync_queued.swap(true, Ordering::AcqRel) && self.jobs.try_send(Job::Sync).is_err() {
            self.sync_queued.store(false, Ordering::Release);
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
    /// Where recorded reports are announced (to the local bridge).
    pub updates: broadcast::Sender<LockUpdate>,
    /// Whether the last attempt to reach the lock worked.
    pub reachable: bool,
}

impl<T: LockTransport> LockWorker<T> {
    /// Starts the task; it syncs with the lock first (clock, log, state). The task ends once
    /// `stop` turns true or every handle is gone: it takes no new job then, finishes those
    /// queued before, records what they read and lets go of the lock. (A handle someone still
    /// holds does not keep it running.)
    pub fn spawn(self, stop: watch::Receiver<bool>) -> (LockHandle, tokio::task::JoinHandle<()>) {
        let (jobs, queue) = mpsc::channel(QUEUE);
        let home = self.client.home_index();
        let handle = LockHandle { jobs, sync_queued: Arc::new(AtomicBool::new(false)), home };
        handle.sync();
        let task = tokio::spawn(self.run(queue, handle.sync_queued.clone(), stop));
        (handle, task)
    }

    fn lock(&self) -> LockId {
        self.client.lock_id()
    }

    async fn run(
        mut self,
        mut queue: mpsc::Receiver<Job>,
        sync_queued: Arc<AtomicBool>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut closed = false;
        loop {
            self.report_lost_link().await;
            let idle = self.client.idle_deadline();
            let connected = self.client.is_connected();
            // The live link's adapter: another lock waiting there makes this link, idle
            // between jobs, make way.
            let link_budget = self.client.link_budget();
            let job = tokio::select! {
                job = queue.recv() => match job {
                    Some(job) => job,
                    None => break,
                },
                // Told to stop: no new job; those already queued are still taken.
                () = crate::stop::requested(&mut stop), if !closed => {
                    queue.close();
                    closed = true;
                    continue;
                }
                // While a link is up, the lock may push events (a keypad, the thumb-turn), and
                // the link may die (out of range, reboot): both are reported as they happen.
                // Another lock waits for a link slot: an idle link makes way at once.
                () = async {
                    match &link_budget {
                        Some(budget) => budget.someone_waits().await,
                        None => std::future::pending().await,
                    }
                }, if connected => {
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
                            tracing::info!(lock_id = %self.lock(), error = %e, "the link to the lock dropped");
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
                    let taken = std::time::Instant::now();
                    let (outcome, pushed, status) = self.execute(op, actor).await;
                    let ran = (taken, std::time::Instant::now());
                    self.note_reachable(!matches!(&outcome, Err(f) if f.reason == Reason::LockUnreachable));
                    let report = self.collect(pushed, status).await;
                    let (recorded_tx, recorded) = oneshot::channel();
                    let jammed = matches!(&outcome, Err(f) if f.reason == Reason::Jammed);
                    let handed =
                        done.send(Executed { outcome, report: report.clone(), recorded: recorded_tx, ran }).is_ok();
                    let recorded = handed && recorded.await.unwrap_or(false);
                    if let Some(report) = report {
                        if recorded {
                            self.applied(&report);
                        } else {
                            self.commit(report).await;
                        }
                    }
                    if jammed {
                        let _ = self.sync().await;
                    }
                }
                Job::Sync => {
                    sync_queued.store(false, Ordering::Release);
                    let synced = self.sync().await;
                    if let Err(e) = &synced {
                        tracing::info!(lock_id = %self.lock(), error = %e, "could not read the lock's news");
                    }
                    self.note_reachable(
                        !matches!(synced, Err(ref e) if ble_failure(e).reason == Reason::LockUnreachable),
                    );
                }
            }
        }
        self.client.disconnect().await;
    }

    /// Republishes the state when the link went and nothing reported it (a sync broken off
    /// half-way, after a command or a pushed event): the loop only watches a live link, so
    /// without this the retained state would say connected until the next command.
    async fn report_lost_link(&mut self) {
        if self.published_connected == Some(true) && !self.client.is_connected() {
            self.report(Vec::new(), None).await;
        }
    }

    /// Runs one operation; returns its outcome, the events the lock pushed meanwhile and its
    /// status if it gave one.
    async fn execute(
        &mut self,
        op: Op,
        actor: Actor,
    ) -> (Result<Option<LockStatus>, Failure>, Vec<LogEntry>, Option<LockStatus>) {
        let result = self.client.call(actor, op).await;
        let pushed = self.client.take_events();
        match result {
            Ok(response) => match response.result {
                Ok(LockReply::Done(status) | LockReply::Status(status)) => (Ok(Some(status)), pushed, Some(status)),
                Ok(
                    LockReply::PasscodeAdded { .. }
                    | LockReply::PasscodeRemoved
                    | LockReply::ClockSet
                    | LockReply::Unpaired,
                ) => (Ok(None), pushed, None),
                Ok(other) => (
                    Err(Failure { reason: Reason::Failed, detail: format!("unexpected answer {other:?}") }),
                    pushed,
                    None,
                ),
                Err(LockError::Jammed) => (
                    Err(Failure { reason: Reason::Jammed, detail: "the lock jammed: someone must look at it".into() }),
                    pushed,
                    None,
                ),
                Err(e) => (Err(Failure { reason: Reason::Failed, detail: e.to_string() }), pushed, None),
            },
            Err(e) => (Err(ble_failure(&e)), pushed, None),
        }
    }

    /// Sets the lock's clock (when ours is trustworthy), reads its status and new events.
    async fn sync(&mut self) -> Result<(), BleError> {
        let response = self.client.call(Actor::Hub, Op::Status).await?;
        let mut status = match response.result {
            Ok(LockReply::Status(s)) => Some(s),
            _ => None,
        };
        // The lock's clock stamps its log and bounds its passcodes: set it from ours when ours
        // is trustworthy and the two disagree (each setting is an entry in the lock's log).
        let (now, synced) = (self.clock)();
        if synced && now > 0 && clock_is_off(status.and_then(|s| s.clock), now) {
            self.client.call(Actor::Hub, Op::SetTime { unix_secs: now as u64 }).await?;
            if let Ok(LockReply::Status(s)) = self.client.call(Actor::Hub, Op::Status).await?.result {
                status = Some(s);
            }
        }
        let pushed = self.client.take_events();
        self.report(pushed, status).await;
        Ok(())
    }

    /// Collects a report and records it.
    async fn report(&mut self, entries: Vec<LogEntry>, status: Option<LockStatus>) {
        if let Some(report) = self.collect(entries, status).await {
            self.commit(report).await;
        }
    }

    /// Reads the log entries after `last_seq` that `entries` does not hold (when the status
    /// says there are more), and makes the report of what is new; `None` if nothing is.
    ///
    /// Only an unbroken run of sequence numbers after `last_seq` is reported: a pushed entry
    /// beyond a gap (the lock logged more while we were away) waits until the log has been
    /// read up to it, or `last_seq` would pass over the entries in between. A gap the log
    /// itself has (the lock's ring overwrote entries never read) is reported as such and
    /// passed over.
    async fn collect(&mut self, mut entries: Vec<LogEntry>, status: Option<LockStatus>) -> Option<Report> {
        // Where the lock's own log has been read up to: nothing before it remains to fetch.
        let mut read_to = self.last_seq;
        if let Some(status) = status {
            let mut after = run_end(self.last_seq, entries.iter().map(|e| e.seq));
            read_to = after;
            // The lock has more than it pushed (events while we were away): read them.
            while status.last_seq > after && self.client.is_connected() {
                let max = MAX_EVENTS_PER_PAGE;
                let page = match self.client.call(Actor::Hub, Op::ReadEvents { after, max }).await {
                    Ok(r) => r.result,
                    Err(e) => {
                        tracing::info!(lock_id = %self.lock(), error = %e, "could not read the lock's log");
                        break;
                    }
                };
                match page {
                    Ok(LockReply::Events { entries: page, more }) => {
                        if let Some(first) = page.first()
                            && first.seq > after + 1
                        {
                            tracing::warn!(
                                lock_id = %self.lock(),
                                lost = first.seq - after - 1,
                                "the lock overwrote log entries before they could be read"
                            );
                        }
                        after = page.last().map_or(after, |e| e.seq);
                        read_to = after;
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
        // `read_to` never falls below `last_seq`: it starts there and only moves on.
        let end = run_end(read_to, entries.iter().map(|e| e.seq));
        entries.retain(|e| e.seq <= end);
        let connected = self.client.is_connected();
        // Without a fresh status, the state is republished only when the link came or went.
        let status = status.or(self.last_status.filter(|_| self.published_connected != Some(connected)));
        if entries.is_empty() && status.is_none() {
            return None;
        }
        let lock = self.lock();
        let newest = entries.last().map_or(self.last_seq, |e| e.seq);
        Some(Report {
            lock,
            epoch: self.epoch,
            entries,
            status,
            connected,
            newest,
            now: (self.clock)().0,
            events_topic: self.topics.events(),
            state_topic: self.topics.lock_state(lock),
        })
    }

    /// Records a report in its own transaction.
    async fn commit(&mut self, report: Report) {
        let store = self.store.clone();
        let lock = report.lock;
        let written = tokio::task::spawn_blocking(move || {
            let mut store = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            store.transaction(|tx| report.write(tx)).map(|()| report)
        })
        .await;
        match written {
            Ok(Ok(report)) => {
                self.applied(&report);
                self.outbox_ready.notify_one();
            }
            // The lock was unbound meanwhile (its last words after an unpair, its link going):
            // nothing of it may be written any more, and the transaction wrote nothing.
            Ok(Err(StoreError::NotFound(_))) => {
                tracing::debug!(lock_id = %lock, "the lock was unbound: its news is dropped");
            }
            // Not recorded: the entries stay unread (last_seq unchanged) and are read again.
            Ok(Err(e)) => tracing::error!(lock_id = %lock, error = %e, "could not record the lock's events"),
            // Cancelled before it ran: the runtime is going (a stop that did not wait for this
            // task). Not recorded, so read again at the next start, as above.
            Err(e) if e.is_cancelled() => {
                tracing::debug!(lock_id = %lock, "stopping: the lock's news is left to the next start")
            }
            Err(e) => tracing::error!(lock_id = %lock, error = %e, "the store task failed"),
        }
    }

    /// Takes note that a report was recorded, and announces it.
    fn applied(&mut self, report: &Report) {
        self.last_seq = report.newest;
        if report.status.is_some() {
            self.last_status = report.status;
            self.published_connected = Some(report.connected);
            self.reachable = true;
        }
        // Nobody listening (no local bridge) is fine.
        let _ = self.updates.send(LockUpdate::Report {
            lock: report.lock,
            epoch: report.epoch,
            status: report.status,
            connected: report.connected,
            reachable: self.reachable,
            entries: report.entries.clone(),
            info: self.client.info(),
        });
    }

    /// Announces a change in whether the lock can be reached.
    fn note_reachable(&mut self, reachable: bool) {
        if reachable != self.reachable {
            self.reachable = reachable;
            let _ = self.updates.send(LockUpdate::Report {
                lock: self.lock(),
                epoch: self.epoch,
                status: None,
                connected: self.client.is_connected(),
                reachable,
                entries: Vec::new(),
                info: self.client.info(),
            });
        }
    }
}

/// Whether the lock's clock (`None`: never set) is more than [`MAX_CLOCK_DRIFT_S`] from `now`.
/// The lock's value is whatever its frame carried: any u64, compared without a cast that
/// could wrap or overflow.
fn clock_is_off(lock_clock: Option<u64>, now: i64) -> bool {
    let now = u64::try_from(now).unwrap_or(0);
    lock_clock.is_none_or(|c| c.abs_diff(now) > MAX_CLOCK_DRIFT_S.unsigned_abs())
}

/// The reply for a BLE failure: unreachable when no command reached the lock; failed (with the
/// stable code) when the link broke after it was sent — the lock's own log says whether it ran.
fn ble_failure(e: &BleError) -> Failure {
    let reason = match e {
        BleError::Unreachable { .. }
        | BleError::NotFound(_)
        | BleError::AdapterOff(_)
        | BleError::NoAdapter(_)
        | BleError::BluezSilent { .. } => Reason::LockUnreachable,
        _ => Reason::Failed,
    };
    Failure { reason, detail: format!("{} ({})", e, e.code()) }
}

/// The end of the unbroken run of sequence numbers in `seqs` that continues `from`: `from`
/// itself when `from + 1` is missing.
fn run_end(from: u64, seqs: impl Iterator<Item = u64>) -> u64 {
    let mut seqs: Vec<u64> = seqs.filter(|s| *s > from).collect();
    seqs.sort_unstable();
    seqs.dedup();
    let mut end = from;
    for s in seqs {
        if s != end + 1 {
            break;
        }
        end = s;
    }
    end
}

#[cfg(test)]
mod run_tests {
    use super::run_end;

    #[test]
    fn a_run_stops_at_the_first_gap() {
        assert_eq!(run_end(5, [6, 7, 9].into_iter()), 7);
        assert_eq!(run_end(5, [9, 10].into_iter()), 5, "a push beyond a gap waits for the log");
        assert_eq!(run_end(5, [3, 5, 7, 6, 6].into_iter()), 7);
        assert_eq!(run_end(0, std::iter::empty()), 0);
    }

    /// The lock's clock comes from its frame: any u64. At 2^63 and above, the old cast to i64
    /// wrapped negative and the subtraction overflowed (a panic in a debug build).
    #[test]
    fn a_lock_clock_anywhere_in_u64_is_compared_without_overflow() {
        use super::clock_is_off;
        let now = 1_700_000_000;
        assert!(!clock_is_off(Some(1_700_000_002), now));
        assert!(!clock_is_off(Some(1_699_999_998), now));
        assert!(clock_is_off(Some(1_700_000_003), now));
        assert!(clock_is_off(None, now), "a clock never set is set");
        for extreme in [0, 1 << 63, u64::MAX] {
            assert!(clock_is_off(Some(extreme), now), "{extreme}");
        }
    }
}
