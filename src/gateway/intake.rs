//! The gateway's front door for the cloud: every payload that arrives on the command topic is
//! opened strictly here, before anything acts on it.
//!
//! A payload that is not a well-formed, correctly signed statement for this gateway is
//! refused: one transaction writes its audit record and, when the statement's id could be
//! read, a typed reply to the outbox. Only then is the payload acknowledged to the broker, so a
//! crash in between means the broker delivers it again, and the refusal is recorded again
//! (at least once). What passes goes on to the policy.

use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};

use crate::auth::reason::Reason;
use sha2::Digest;

use super::statements::Accepted;
use super::timing::{Stage, Timing};
use crate::auth::statement::{Refusal, Signed, open};
use crate::cloud::link::InboundCommand;
use crate::cloud::reply::Reply;
use crate::cloud::topics::Topics;
use crate::protocol::ids::GatewayId;
use crate::store::AuditEntry;
use crate::store::audit::AuditActor;
use crate::store::{Store, StoreError};

/// Opens inbound payloads for one gateway.
#[derive(Debug, Clone)]
pub struct Intake {
    store: Arc<Mutex<Store>>,
    gateway: GatewayId,
    topics: Topics,
    outbox_ready: Arc<Notify>,
}

impl Intake {
    /// The intake of `gateway`; refusals' replies go through the outbox (`outbox_ready` is
    /// notified).
    pub fn new(store: Arc<Mutex<Store>>, gateway: GatewayId, outbox_ready: Arc<Notify>) -> Self {
        let topics = Topics::new(&gateway);
        Intake { store, gateway, topics, outbox_ready }
    }

    /// Opens one payload: a well-formed statement for this gateway, correctly signed, or why
    /// not (to record with [`Intake::refuse`]). No I/O: a signature check, tens of microseconds.
    pub fn open(&self, payload: &[u8]) -> Result<Signed, Refusal> {
        let text = std::str::from_utf8(payload).map_err(|_| Refusal {
            id: None,
            signer: None,
            reason: Reason::Malformed,
            detail: "not UTF-8 text".into(),
        })?;
        let signed = open(text.trim_end())?;
        if signed.statement.gateway() != &self.gateway {
            return Err(Refusal {
                id: Some(signed.statement.id().clone()),
                signer: Some(signed.signer),
                reason: Reason::WrongGateway,
                detail: format!("addressed to {}", signed.statement.gateway()),
            });
        }
        Ok(signed)
    }

    /// Records a refusal: the audit record and, if the id is known, the reply, atomically —
    /// or, beyond the audit budget, only counts it (see [`crate::store::audit_budget`]).
    pub fn refuse(&self, refusal: &Refusal, action: &str, now: i64) -> Result<(), StoreError> {
        let mut store = self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let recorded = store.transaction(|tx| {
            let recorded = tx.audit(AuditEntry {
                at: now,
                action,
                outcome: refusal.reason.as_str(),
                // A signer whose signature did not verify (or was not checked) is nobody we know.
                actor: AuditActor::Unknown,
                lock: None,
                detail: &refusal.detail,
            })?;
            // Beyond the audit budget (a flood), nobody is answered either: a reply is a
            // durable record too, and whoever floods is not waiting for one.
            if recorded && let Some(id) = &refusal.id {
                let reply = Reply::refused(id.as_str(), refusal.reason, &refusal.detail, now);
                tx.append_outbox(None, &self.topics.replies(), &reply.to_json(), false, now)?;
            }
            Ok(recorded)
        })?;
        drop(store);
        let id = refusal.id.as_ref().map(|i| i.as_str());
        if recorded {
            tracing::warn!(id, reason = %refusal.reason, detail = %refusal.detail, "statement refused");
            self.outbox_ready.notify_one();
        } else {
            tracing::debug!(id, reason = %refusal.reason, "statement refused; counted, not recorded (a flood)");
        }
        Ok(())
    }
}

/// Takes the cloud link's inbound payloads through the intake until the link goes away:
/// refusals are recorded and acknowledged here; accepted statements go to `accepted`, which
/// acknowledges them once it has noted them.
pub async fn serve(
    intake: Intake,
    mut inbound: mpsc::Receiver<InboundCommand>,
    accepted: mpsc::Sender<Accepted>,
    clock: impl Fn() -> i64,
) {
    while let Some(mut command) = inbound.recv().await {
        let payload = std::mem::take(&mut command.payload);
        // Opened here, on the way: a hop to another thread would cost as much as the check.
        match intake.open(&payload) {
            Ok(signed) => {
                let digest = sha2::Sha256::digest(&payload).into();
                // `open` checked it is UTF-8; trailing whitespace is not part of the statement.
                let text = String::from_utf8_lossy(&payload).trim_end().to_owned();
                let mut timing = Timing::starting(command.received);
                timing.mark(Stage::Opened);
                if accepted.send(Accepted { signed, text, digest, delivery: command, timing }).await.is_err() {
                    return;
                }
            }
            Err(refusal) => {
                // Recording it is a durable commit: on the blocking pool.
                let (intake, now) = (intake.clone(), clock());
                let recorded =
                    tokio::task::spawn_blocking(move || intake.refuse(&refusal, "cloud.statement", now)).await;
                match recorded {
                    Ok(Ok(())) => {
                        let _ = command.stored.send(());
                    }
                    // Not recorded: left unacknowledged, so the broker delivers it again.
                    Ok(Err(e)) => tracing::error!(error = %e, "could not record a refusal"),
                    Err(e) if e.is_cancelled() => tracing::debug!("stopping: a refusal left unrecorded, to come again"),
                    Err(e) => tracing::error!(error = %e, "the intake task failed"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::statement::StatementId;
    use crate::store::StoreConfig;
    use crate::store::audit_budget::BURST;

    /// A refusal that names its statement is answered while the audit budget records it one by
    /// one, and neither recorded nor answered beyond it: the flood is only counted.
    #[test]
    fn beyond_the_audit_budget_a_refusal_is_counted_and_not_answered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(dir.path()) }).unwrap();
        let store = Arc::new(Mutex::new(store));
        let intake = Intake::new(store.clone(), GatewayId::new("gw-intake").unwrap(), Arc::new(Notify::new()));
        let refusal = Refusal {
            id: Some(StatementId::new("c-1").unwrap()),
            signer: None,
            reason: Reason::BadSignature,
            detail: "bad signature".into(),
        };
        let t = 1_700_000_000;
        for _ in 0..BURST {
            intake.refuse(&refusal, "cloud.statement", t).unwrap();
        }
        let counts = |store: &Store| (store.outbox_len().unwrap(), store.audit_records(0, 1000).unwrap().len());
        assert_eq!(counts(&store.lock().unwrap()), (u64::from(BURST), BURST as usize), "answered and recorded");
        intake.refuse(&refusal, "cloud.statement", t).unwrap();
        assert_eq!(counts(&store.lock().unwrap()), (u64::from(BURST), BURST as usize), "beyond the budget");
    }
}
