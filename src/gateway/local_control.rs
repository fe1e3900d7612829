//! Local commands — Home Assistant and the local broker, their codes already checked by the
//! local bridge — carried out on the lock's task and audited like the cloud's.

use super::core::Gateway;
use super::lock_worker::Failure;
use super::user_refs::local_user_ref;
use crate::auth::local_code::CodeHolder;
use crate::auth::reason::Reason;
use crate::ble::LockTransport;
use crate::protocol::ids::LockId;
use crate::protocol::message::{Actor, LockStatus, Op, UserRef};
use crate::store::audit::AuditActor;
use crate::store::{AuditEntry, StoreError};

/// The audit name of an operation.
fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Lock => "lock",
        Op::Unlock => "unlock",
        Op::Unlatch => "unlatch",
        _ => "other",
    }
}

impl<T: LockTransport> Gateway<T> {
    /// Carries out a local command (Home Assistant, the local broker) for `user`, whose code
    /// the caller has checked, and audits it with its `source`. The inner error is the reason
    /// code of a command that did not complete (`jammed`, `lock_unreachable`, ...).
    pub async fn local_command(
        &self,
        lock: LockId,
        op: Op,
        user: &CodeHolder,
        source: &str,
    ) -> Result<Result<Option<LockStatus>, String>, StoreError> {
        let action = format!("local.{}", op_name(&op));
        // A user known by key is audited under their pseudonym (forget-user unlinks it); a
        // configured name is the hub owner's label.
        let (actor, user_ref) = match user {
            CodeHolder::Named(name) => (AuditActor::User(format!("local:{name}").into_bytes()), local_user_ref(name)),
            CodeHolder::Key(key) => {
                // The same keyed reference as their remote commands (an owner-given code names
                // a known user; one forgotten since reads as nobody).
                let reference = self.store().user_lock_ref(key.as_bytes())?.map_or(UserRef([0; 8]), UserRef);
                (AuditActor::User(key.as_bytes().to_vec()), reference)
            }
        };
        let outcome = match self.lock(lock) {
            None if *self.stopping.borrow() => {
                Err(Failure { reason: Reason::Failed, detail: "the gateway is stopping".into() })
            }
            None => Err(Failure { reason: Reason::UnknownLock, detail: "the lock is not paired".into() }),
            Some(handle) => {
                match handle.execute(op, Actor::Local(user_ref)).await {
                    // The lock's task records its own report: no reply shares its commit here.
                    Ok(executed) => {
                        let _ = executed.recorded.send(false);
                        executed.outcome
                    }
                    Err(failure) => Err(failure),
                }
            }
        };
        let (result, detail) = match &outcome {
            Ok(_) => ("ok", format!("from {source}")),
            Err(f) => (f.reason.as_str(), format!("from {source}: {}", f.detail)),
        };
        let now = (self.clock)().0;
        self.store().transaction(|tx| {
            tx.audit(AuditEntry { at: now, action: &action, outcome: result, actor, lock: Some(lock), detail: &detail })
        })?;
        tracing::info!(lock_id = %lock, action, decision = if outcome.is_ok() { "ok" } else { "failed" }, reason = result, "local command");
        Ok(outcome.map_err(|f| f.reason.as_str().to_owned()))
    }

    /// Audits a local command refused before it reached a lock (a wrong code, a lockout).
    pub fn local_refusal(
        &self,
        lock: Option<LockId>,
        action: &str,
        reason: &str,
        source: &str,
    ) -> Result<(), StoreError> {
        let now = (self.clock)().0;
        let detail = format!("from {source}");
        self.store().transaction(|tx| {
            tx.audit(AuditEntry { at: now, action, outcome: reason, actor: AuditActor::Unknown, lock, detail: &detail })
        })?;
        tracing::warn!(
            lock_id = lock.map(|l| l.to_string()),
            action,
            decision = "refused",
            reason,
            "local command refused"
        );
        Ok(())
    }
}
