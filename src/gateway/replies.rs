//! Replies and how an outcome is recorded: the reply to the outbox (sent ahead through the
//! express lane), the lock's report, the audit record and the reply kept for redeliveries, in
//! one transaction; and the three kinds of reply.

use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Notify;

use crate::auth::reason::Reason;
use crate::cloud::express::{ExpressLane, ExpressRecord};
use crate::cloud::reply::{Outcome, Reply};
use crate::cloud::topics::Topics;
use crate::protocol::ids::LockId;
use crate::store::audit::AuditActor;
use crate::store::{AuditEntry, Store, StoreError};

/// A command's report, waiting to be written with its reply.
pub(super) struct Pending {
    pub(super) report: Option<super::lock_worker::Report>,
    pub(super) recorded: tokio::sync::oneshot::Sender<bool>,
}

/// Where the gateway's replies go, and how their outcomes are recorded.
pub(super) struct Replies {
    store: Arc<Mutex<Store>>,
    topic: String,
    outbox_ready: Arc<Notify>,
    /// Replies go out through it ahead of their commit, once the cloud link is wired in.
    express: OnceLock<ExpressLane>,
}

impl Replies {
    pub(super) fn new(store: Arc<Mutex<Store>>, topics: &Topics, outbox_ready: Arc<Notify>) -> Self {
        Replies { store, topic: topics.replies(), outbox_ready, express: OnceLock::new() }
    }

    /// Sends replies through the cloud link's express lane from now on.
    pub(super) fn send_through(&self, lane: ExpressLane) {
        let _ = self.express.set(lane);
    }

    /// Records an outcome: the reply to the outbox, the lock's report if the command produced
    /// one, the audit record, and (for the first delivery) the reply kept for redeliveries —
    /// one transaction, so a command costs one durable commit after it ran. The reply itself
    /// leaves first, through the express lane; the commit runs on the blocking pool, so that
    /// this worker is free for the link to send it meanwhile.
    pub(super) async fn finish(&self, record: OutcomeRecord, reply: &Reply) -> Result<(), StoreError> {
        let (action, lock) = (record.action.clone(), record.lock);
        let store = self.store.clone();
        let committed = tokio::task::spawn_blocking(move || record_outcome(&store, record))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        self.decided(reply, &action, lock, committed)
    }

    /// [`Replies::finish`] on this thread: for the gateway's start, before anything waits on it.
    pub(super) fn finish_now(&self, record: OutcomeRecord, reply: &Reply) -> Result<(), StoreError> {
        let (action, lock) = (record.action.clone(), record.lock);
        let committed = record_outcome(&self.store, record);
        self.decided(reply, &action, lock, committed)
    }

    /// What [`record_outcome`] writes, with the reply handed to the express lane.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn record(
        &self,
        key: &str,
        reply: &Reply,
        action: &str,
        actor: Option<AuditActor>,
        lock: Option<LockId>,
        keep: bool,
        pending: Option<Pending>,
    ) -> OutcomeRecord {
        let payload = reply.to_json();
        let (report, recorded) = match pending {
            Some(Pending { report, recorded }) => (report, Some(recorded)),
            None => (None, None),
        };
        let topic = self.topic.clone();
        // The reply leaves now; the link learns which outbox record is this one when committed.
        let express = self.express.get().and_then(|lane| lane.send(topic.clone(), payload.clone()));
        OutcomeRecord {
            key: key.to_owned(),
            topic,
            payload,
            at: reply.at,
            action: action.to_owned(),
            outcome: reply.reason.map_or("ok", Reason::as_str),
            detail: reply.detail.clone().unwrap_or_default(),
            actor,
            lock,
            keep,
            report,
            recorded,
            express,
        }
    }

    /// Logs a recorded decision and wakes the link.
    fn decided(
        &self,
        reply: &Reply,
        action: &str,
        lock: Option<LockId>,
        committed: Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        committed?;
        // Field names chosen for the journal (LOCK_ID, COMMAND_ID, DECISION, REASON).
        tracing::info!(
            command_id = %reply.id,
            lock_id = lock.map(|l| l.to_string()),
            action,
            decision = reply.result.as_str(),
            reason = reply.reason.map_or("ok", Reason::as_str),
            "statement decided"
        );
        self.outbox_ready.notify_one();
        Ok(())
    }
}

/// An outcome to record in one transaction (see [`Replies::finish`]).
pub(super) struct OutcomeRecord {
    key: String,
    topic: String,
    payload: Vec<u8>,
    at: i64,
    action: String,
    outcome: &'static str,
    detail: String,
    actor: Option<AuditActor>,
    lock: Option<LockId>,
    /// Keep the reply for redeliveries (first deliveries only).
    keep: bool,
    report: Option<super::lock_worker::Report>,
    /// Told whether `report` was committed (the lock's task records it otherwise).
    recorded: Option<tokio::sync::oneshot::Sender<bool>>,
    /// Told which outbox record holds the reply.
    express: Option<ExpressRecord>,
}

/// Writes an outcome in one transaction; blocking (a durable commit).
fn record_outcome(store: &Mutex<Store>, r: OutcomeRecord) -> Result<(), StoreError> {
    let mut store = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let committed = store.transaction(|tx| {
        // The reply first: it leaves the outbox ahead of the lock's reports.
        let record = tx.append_outbox(None, &r.topic, &r.payload, false, r.at)?;
        if let Some(report) = &r.report {
            report.write(tx)?;
        }
        if let Some(actor) = r.actor.clone() {
            let (action, outcome, lock, detail) = (r.action.as_str(), r.outcome, r.lock, r.detail.as_str());
            tx.audit(AuditEntry { at: r.at, action, outcome, actor, lock, detail })?;
        }
        if r.keep {
            tx.set_command_reply(&r.key, &r.payload)?;
        }
        Ok(record)
    });
    // Still under the store's lock: see `ExpressRecord`.
    if let Some(express) = r.express {
        express.committed(committed.as_ref().ok().copied());
    }
    drop(store);
    if let Some(recorded) = r.recorded {
        let _ = recorded.send(committed.is_ok());
    }
    committed.map(|_| ())
}

pub(super) fn ok(id: &str, detail: &str, at: i64) -> Reply {
    Reply { id: id.to_owned(), result: Outcome::Ok, reason: None, detail: Some(detail.to_owned()), at, actor: None }
}

pub(super) fn refused(id: &str, reason: Reason, detail: &str, at: i64) -> Reply {
    Reply::refused(id, reason, detail, at)
}

pub(super) fn failed(id: &str, reason: Reason, detail: &str, at: i64) -> Reply {
    Reply { result: Outcome::Failed, ..Reply::refused(id, reason, detail, at) }
}
