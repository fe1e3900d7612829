//! Pairing a lock: found on the radio by whichever adapter hears it first (its home from
//! then on), LHP/1 pairing with its setup code, its key stored and its task started.

use std::time::Duration;

use super::core::Gateway;
use super::replies::{failed, ok, refused};
use crate::auth::reason::Reason;
use crate::ble::LockTransport;
use crate::ble::client::pair;
use crate::cloud::reply::Reply;
use crate::protocol::ids::LockId;
use crate::protocol::pairing::SetupCode;
use crate::store::audit::AuditActor;
use crate::store::{AuditEntry, StoreError};

impl<T: LockTransport> Gateway<T> {
    /// Pairs `lock` with the setup code `setup`, for statement `id`; the reply says how it went.
    pub(super) async fn pair(&self, id: &str, lock: LockId, setup: &str) -> Result<Reply, StoreError> {
        let (now, _) = (self.clock)();
        let Ok(code) = SetupCode::parse(setup) else {
            return Ok(refused(id, Reason::Malformed, "the setup code is 8 digits", now));
        };
        // Find the lock on the radio (it must be in pairing mode to accept), for as long as a
        // connection may take: a lock advertises every few hundred ms, but a scan hears it
        // only as often as the stack reports (under btvirt, once per scan restart, ~10 s).
        // Every adapter looks; the first to hear it pairs it and becomes its home.
        let bound = self.ble.connect_timeout().max(Duration::from_secs(10));
        let (heard_by, ad) = match self.radios.locate(lock, bound).await {
            Ok(found) => found,
            Err(e) => return Ok(failed(id, Reason::LockUnreachable, &format!("the lock was not seen: {e}"), now)),
        };
        let radio = self.radios.get(heard_by);
        let paired = pair(&**radio.transport(), radio.budget(), &self.ble, &self.id, lock, &ad.address, &code).await;
        let key = match paired {
            Ok(key) => key,
            Err(e) => return Ok(failed(id, Reason::Failed, &format!("pairing failed: {e} ({})", e.code()), now)),
        };
        self.store().transaction(|tx| tx.add_lock(lock, &ad.address, &lock.to_string(), &key, now))?;
        self.start_lock(lock, ad.address.clone(), key, now, 0, Some(heard_by));
        tracing::info!(lock_id = %lock, adapter = radio.name(), "lock paired");
        Ok(ok(id, "paired", now))
    }

    /// Pairs a lock for the hub's administrator (the control socket) with the setup code on
    /// its label; audited as the admin's. The reply says how it went.
    pub async fn admin_pair(&self, lock: LockId, setup: &str) -> Result<Reply, StoreError> {
        let reply = self.pair("admin", lock, setup).await?;
        let outcome = reply.reason.map_or("ok", Reason::as_str);
        let detail = reply.detail.clone().unwrap_or_default();
        self.store().transaction(|tx| {
            tx.audit(AuditEntry {
                at: reply.at,
                action: "lock.pair",
                outcome,
                actor: AuditActor::Admin,
                lock: Some(lock),
                detail: &detail,
            })
        })?;
        Ok(reply)
    }
}
