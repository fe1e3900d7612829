//! Paired locks, and unbinding one: every row about it gone, and no byte of it left in any
//! file of the store.

use rusqlite::{OptionalExtension, params};

use super::audit::{AuditActor, AuditEntry};
use super::seal::Place;
use super::{Store, StoreError, Tx};
use crate::protocol::ids::LockId;
use crate::protocol::pairing::PairingKey;

/// A paired lock, as the gateway needs it to connect.
#[derive(Clone, Debug)]
pub struct PairedLock {
    /// The lock's id.
    pub lock_id: LockId,
    /// Its Bluetooth address.
    pub address: String,
    /// The name the owner gave it.
    pub name: String,
    /// The newest log entry the gateway has read from it.
    pub last_event_seq: u64,
    /// When it was paired (Unix seconds).
    pub paired_at: i64,
}

/// What an unbind removed, and what the caller must clear elsewhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnbindReport {
    /// The lock's Bluetooth address, for the transport to forget it too.
    pub address: String,
    /// Retained MQTT topics the gateway had published about the lock: publish empty retained
    /// messages to clear them.
    pub retained_topics: Vec<String>,
}

fn key_place(id: &str) -> Place<'_> {
    Place { table: "locks", column: "pairing_key", row: id.as_bytes() }
}

fn pseudonym_place(id: &str) -> Place<'_> {
    Place { table: "locks", column: "pseudonym_key", row: id.as_bytes() }
}

impl Tx<'_> {
    /// Stores a newly paired lock (replacing an earlier pairing of the same lock).
    pub fn add_lock(
        &mut self,
        lock_id: LockId,
        address: &str,
        name: &str,
        key: &PairingKey,
        now: i64,
    ) -> Result<(), StoreError> {
        if address.len() > 64 || name.len() > 128 {
            return Err(StoreError::Invalid("lock address or name (too long)"));
        }
        let id = lock_id.to_string();
        let mut pseudonym_key = zeroize::Zeroizing::new([0u8; 32]);
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, pseudonym_key.as_mut());
        let sealed_key = self.sealer.seal(key_place(&id), key.as_bytes());
        let sealed_pseudonym = self.sealer.seal(pseudonym_place(&id), pseudonym_key.as_ref());
        self.tx.execute(
            "INSERT INTO locks (lock_id, address, name, pairing_key, pseudonym_key, paired_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
             ON CONFLICT (lock_id) DO UPDATE SET address = ?2, name = ?3, pairing_key = ?4, paired_at = ?6",
            params![id, address, name, sealed_key, sealed_pseudonym, now],
        )?;
        Ok(())
    }

    /// Records the newest log entry read from a lock.
    pub fn set_last_event_seq(&mut self, lock_id: LockId, seq: u64) -> Result<(), StoreError> {
        let n = self
            .tx
            .prepare_cached("UPDATE locks SET last_event_seq = ?2 WHERE lock_id = ?1")?
            .execute(params![lock_id.to_string(), seq as i64])?;
        if n == 0 { Err(StoreError::NotFound(format!("lock {lock_id}"))) } else { Ok(()) }
    }

    /// Notes a retained MQTT topic published about a lock, so that unbinding can clear it.
    pub fn note_retained_topic(&mut self, lock_id: LockId, topic: &str) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(
                "INSERT OR IGNORE INTO retained_topics (topic, lock) SELECT ?2, id FROM locks WHERE lock_id = ?1",
            )?
            .execute(params![lock_id.to_string(), topic])?;
        Ok(())
    }

    pub(super) fn lock_rowid(&self, lock_id: LockId) -> Result<i64, StoreError> {
        self.tx
            .prepare_cached("SELECT id FROM locks WHERE lock_id = ?1")?
            .query_row([lock_id.to_string()], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("lock {lock_id}")))
    }
}

impl Store {
    /// Every paired lock.
    pub fn locks(&self) -> Result<Vec<PairedLock>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT lock_id, address, name, last_event_seq, paired_at FROM locks ORDER BY lock_id")?;
        let rows =
            stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get::<_, i64>(3)?, r.get(4)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, address, name, seq, paired_at) = row?;
            let lock_id = LockId::parse(&id).map_err(|_| StoreError::Invalid("lock id in the database"))?;
            out.push(PairedLock { lock_id, address, name, last_event_seq: seq as u64, paired_at });
        }
        Ok(out)
    }

    /// A paired lock's key, unsealed.
    pub fn pairing_key(&self, lock_id: LockId) -> Result<PairingKey, StoreError> {
        let id = lock_id.to_string();
        let sealed: Vec<u8> = self
            .conn
            .query_row("SELECT pairing_key FROM locks WHERE lock_id = ?1", [&id], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("lock {lock_id}")))?;
        let plain = self.sealer.open(key_place(&id), &sealed)?;
        let bytes: [u8; 32] = plain.as_slice().try_into().map_err(|_| StoreError::Invalid("pairing key length"))?;
        Ok(PairingKey::from_bytes(bytes))
    }

    /// Unbinds a lock: deletes every row about it (its pairing, grants, passcodes, policies,
    /// pending outbox records, remembered commands, retained-topic notes) in one transaction
    /// with an audit record naming it by pseudonym only, then rewrites the database and
    /// empties the WAL so no byte of it remains in any file ([`Store::compact`]).
    pub fn unbind(&mut self, lock_id: LockId, actor: AuditActor, now: i64) -> Result<UnbindReport, StoreError> {
        let report = self.delete_lock(lock_id, actor, now)?;
        self.compact()?;
        Ok(report)
    }

    /// The deletion of [`Store::unbind`] without the compaction, for a caller with more to do
    /// before it (and whatever happens to the compaction): every byte of the lock stays in
    /// the files until [`Store::compact`] has run.
    pub fn delete_lock(&mut self, lock_id: LockId, actor: AuditActor, now: i64) -> Result<UnbindReport, StoreError> {
        self.transaction(|tx| {
            let rowid = tx.lock_rowid(lock_id)?;
            let address: String = tx.tx.query_row("SELECT address FROM locks WHERE id = ?1", [rowid], |r| r.get(0))?;
            let mut stmt = tx.tx.prepare("SELECT topic FROM retained_topics WHERE lock = ?1 ORDER BY topic")?;
            let retained_topics = stmt.query_map([rowid], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
            drop(stmt);
            tx.audit(AuditEntry {
                at: now,
                action: "lock.unbound",
                outcome: "ok",
                actor,
                lock: Some(lock_id),
                detail: "",
            })?;
            tx.tx.execute("DELETE FROM locks WHERE id = ?1", [rowid])?;
            Ok(UnbindReport { address, retained_topics })
        })
    }
}
