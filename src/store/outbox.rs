//! The outbox: what the gateway owes the broker — events, replies, retained state — kept until
//! the broker acknowledges it.
//!
//! A record is appended in the same transaction as the change it reports, so a crash either
//! loses both or keeps both; it is deleted only when its PUBACK arrives. Ids increase, so the
//! sender drains in order.

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError, Tx};
use crate::protocol::ids::LockId;

/// Largest payload the outbox takes (MQTT brokers commonly cap messages far above this; our
/// messages are small, so anything bigger is a bug upstream).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// A record waiting for the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRecord {
    /// Its id; increasing.
    pub id: i64,
    /// MQTT topic.
    pub topic: String,
    /// MQTT payload.
    pub payload: Vec<u8>,
    /// Publish with the retain flag.
    pub retain: bool,
    /// When it was appended (Unix seconds).
    pub created_at: i64,
}

impl Tx<'_> {
    /// Appends a record; `lock` ties it to a lock so that unbinding deletes it.
    pub fn append_outbox(
        &mut self,
        lock: Option<LockId>,
        topic: &str,
        payload: &[u8],
        retain: bool,
        now: i64,
    ) -> Result<i64, StoreError> {
        if payload.len() > MAX_PAYLOAD || topic.is_empty() || topic.len() > 512 {
            return Err(StoreError::Invalid("outbox record (topic or payload size)"));
        }
        let lock_row = lock.map(|l| self.lock_rowid(l)).transpose()?;
        self.clearing_appended |= retain && payload.is_empty();
        self.tx
            .prepare_cached(
                "INSERT INTO outbox (lock, topic, payload, retain, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![lock_row, topic, payload, retain, now])?;
        Ok(self.tx.last_insert_rowid())
    }
}

const PENDING: &str = "SELECT id, topic, payload, retain, created_at FROM outbox ORDER BY id LIMIT ?1";

/// Whether record `?1` clears a retained topic (retained, empty).
const CLEARS: &str = "SELECT retain AND length(payload) = 0 FROM outbox WHERE id = ?1";

/// Whether any record clears a retained topic.
const ANY_CLEARING: &str = "SELECT EXISTS (SELECT 1 FROM outbox WHERE retain AND length(payload) = 0)";

impl Store {
    /// The oldest `limit` records waiting, in order.
    pub fn outbox_pending(&self, limit: u32) -> Result<Vec<OutboxRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(PENDING)?;
        let rows = stmt.query_map([limit], |r| {
            Ok(OutboxRecord {
                id: r.get(0)?,
                topic: r.get(1)?,
                payload: r.get(2)?,
                retain: r.get(3)?,
                created_at: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes records the broker acknowledged.
    ///
    /// Not worth an fsync of its own: if power fails before the next durable commit, the
    /// records come back and are sent again, which receivers dedupe anyway. So the deletion
    /// commits with `synchronous=NORMAL` (WAL: atomic, durable at the next sync) and the
    /// connection returns to `FULL` at once.
    ///
    /// A record that clears a retained topic (retained, empty) is what is left of something
    /// deleted — an unbound lock, whose id its topic names — and it outlives the deletion's
    /// compaction until the broker has it: once it is gone, the log is emptied too.
    pub fn outbox_ack(&mut self, ids: &[i64]) -> Result<(), StoreError> {
        // Looked for only while one may be there (after an unbind, or found at start-up), so
        // that the acknowledgements of every command pay nothing for it.
        let look = self.clearing_pending;
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        let deleted = (|| {
            let tx = self.conn.transaction()?;
            let mut cleared = false;
            {
                let mut del = tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
                for id in ids {
                    if look {
                        cleared |= tx
                            .prepare_cached(CLEARS)?
                            .query_row([id], |r| r.get::<_, bool>(0))
                            .optional()?
                            .unwrap_or(false);
                    }
                    del.execute([id])?;
                }
            }
            let left = look && tx.query_row(ANY_CLEARING, [], |r| r.get::<_, bool>(0))?;
            tx.commit()?;
            Ok::<_, rusqlite::Error>((cleared, left))
        })();
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        let (cleared, left) = deleted?;
        self.clearing_pending = left;
        if cleared {
            self.empty_log_soon()?;
        }
        Ok(())
    }

    /// Whether the outbox holds a record that clears a retained topic (at start-up).
    pub(crate) fn outbox_holds_clearing(&self) -> Result<bool, StoreError> {
        Ok(self.conn.query_row(ANY_CLEARING, [], |r| r.get(0))?)
    }

    /// Records waiting.
    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        Ok(self.conn.query_row("SELECT count(*) FROM outbox", [], |r| r.get::<_, i64>(0))? as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    /// A bound `LIMIT` is one of the places where SQLite would re-plan a statement when its
    /// value changes, and the statement cache clears bindings after every use: without the
    /// store's query-planner stability setting, every read of the outbox compiled its SQL again.
    #[test]
    fn reading_the_outbox_reuses_its_compiled_statement() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(dir.path()) }).unwrap();
        store.transaction(|tx| tx.append_outbox(None, "t", b"{}", false, 1).map(|_| ())).unwrap();
        for limit in [16, 16, 1, 16] {
            assert_eq!(store.outbox_pending(limit).unwrap().len(), 1);
        }
        let stmt = store.conn.prepare_cached(PENDING).unwrap();
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
    }

    /// While a clearing record may be pending every acknowledgement asks whether one is left:
    /// answered from an index, so draining an outage's backlog stays linear in its length
    /// (`cargo bench --bench store` drains one either way).
    #[test]
    fn asking_whether_a_clearing_record_is_left_reads_an_index_not_the_outbox() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(dir.path()) }).unwrap();
        let mut plan = store.conn.prepare(&format!("EXPLAIN QUERY PLAN {ANY_CLEARING}")).unwrap();
        let steps: Vec<String> = plan.query_map([], |r| r.get(3)).unwrap().collect::<Result<_, _>>().unwrap();
        // A partial index holds only the rows its condition picks: "SCAN … USING INDEX" walks
        // those, not the table.
        assert!(steps.iter().any(|s| s.ends_with("USING INDEX outbox_clearing")), "{steps:?}");
    }

    /// The record clearing an unbound lock's topic may be delivered after a restart: the
    /// reopened store still empties the log once it is gone, and stops looking after that.
    #[test]
    fn a_clearing_record_left_from_before_a_restart_still_empties_the_log_when_delivered() {
        use crate::store::checkpoint::HandOff;
        let dir = tempfile::tempdir().unwrap();
        let config = || StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(dir.path()) };
        let mut store = Store::open(config()).unwrap();
        let report = store.transaction(|tx| tx.append_outbox(None, "gw/lock/1/state", b"{}", true, 1)).unwrap();
        assert!(!store.clearing_pending, "a retained state is no clearing");
        let clearing = store.transaction(|tx| tx.append_outbox(None, "gw/lock/2/state", b"", true, 1)).unwrap();
        assert!(store.clearing_pending);
        drop(store);

        let mut store = Store::open(config()).unwrap();
        assert!(store.clearing_pending, "found at start-up");
        let hand_off = HandOff::default();
        store.checkpoint_elsewhere(super::super::checkpoint::WalLimits::default(), &hand_off).unwrap();
        store.outbox_ack(&[report]).unwrap();
        assert_eq!(hand_off.debt().borrow().owed, 0, "only a clearing record's delivery empties the log");
        assert!(store.clearing_pending);
        store.outbox_ack(&[clearing]).unwrap();
        assert_eq!(hand_off.debt().borrow().owed, 1);
        assert!(!store.clearing_pending, "none left: acknowledgements stop looking");
    }

    /// A store with no checkpointer empties the log itself once a clearing record is gone.
    #[test]
    fn without_a_checkpointer_the_store_empties_the_log_itself() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(dir.path()) }).unwrap();
        let wal = || std::fs::metadata(dir.path().join("lockhub.db-wal")).unwrap().len();
        let report = store.transaction(|tx| tx.append_outbox(None, "gw/lock/1/state", b"{}", true, 1)).unwrap();
        let clearing = store.transaction(|tx| tx.append_outbox(None, "gw/lock/2/state", b"", true, 1)).unwrap();
        store.outbox_ack(&[report]).unwrap();
        assert!(wal() > 0, "an ordinary acknowledgement leaves the log alone");
        store.outbox_ack(&[clearing]).unwrap();
        assert_eq!(wal(), 0, "the log still holds the clearing record's pages");
    }
}
