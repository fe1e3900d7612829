//! Unbinding a lock: the lock told to forget the gateway when it can be, its task stopped,
//! everything the store held of it deleted and compacted away, its retained topics cleared.

use super::core::Gateway;
use super::lock_worker::LockUpdate;
use crate::ble::LockTransport;
use crate::protocol::ids::LockId;
use crate::protocol::message::{Actor, Op};
use crate::store::StoreError;
use crate::store::audit::AuditActor;

impl<T: LockTransport> Gateway<T> {
    /// Unbinds a paired lock: asks it to forget the gateway (when it can be reached), stops
    /// its task, deletes everything the store held about it, clears its retained cloud
    /// topics, and announces it (so that the local bridge clears its own). Returns whether
    /// the lock itself was told; `None` if it was not paired.
    pub async fn unbind(&self, lock: LockId, actor: AuditActor) -> Result<Option<bool>, StoreError> {
        let Some(handle) = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&lock) else {
            return Ok(None);
        };
        let outcome = match handle.execute(Op::Unpair, Actor::Admin).await {
            Ok(executed) => {
                let _ = executed.recorded.send(false);
                executed.outcome.map(|_| ())
            }
            Err(failure) => Err(failure),
        };
        if let Err(f) = &outcome {
            // Unbound here all the same; the lock keeps its pairing until it is reset by hand.
            tracing::warn!(lock_id = %lock, reason = f.reason.as_str(), detail = %f.detail, "the lock could not be told to forget this gateway");
        }
        let told = outcome.is_ok();
        drop(handle);
        let now = (self.clock)().0;
        let store = self.store.clone();
        let report = tokio::task::spawn_blocking(move || {
            store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).delete_lock(lock, actor, now)
        })
        .await
        .map_err(|_| StoreError::Invalid("the store task failed"))??;
        self.radios.forget(&report.address);
        self.store().transaction(|tx| {
            for topic in &report.retained_topics {
                tx.append_outbox(None, topic, b"", true, now)?;
            }
            Ok(())
        })?;
        self.outbox_ready.notify_one();
        let _ = self.updates.send(LockUpdate::Unbound { lock });
        // Last, so that nothing above waits on it or is skipped if it fails: the files
        // rewritten and the log emptied, no byte of the lock left in them.
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).compact())
            .await
            .map_err(|_| StoreError::Invalid("the store task failed"))??;
        tracing::info!(lock_id = %lock, told, "lock unbound");
        Ok(Some(told))
    }
}
