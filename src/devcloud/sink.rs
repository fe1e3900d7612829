//! The bundled cloud's event sink: every event a gateway publishes, stored once.
//!
//! Gateways deliver at least once (an event leaves their outbox only when the broker
//! acknowledged it, so a crash or a broker restart can make them send it again); the sink
//! makes that exactly once in effect by keying each event on (gateway, event id). The bundled
//! broker records an event here *before* it acknowledges it to the gateway, so an event the
//! gateway saw acknowledged is on disk even if the broker is killed the next instant.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Deserialize;
use thiserror::Error;

/// Largest event accepted, in bytes.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// Longest event id, in bytes.
pub const MAX_EVENT_ID_LEN: usize = 128;

/// Why an event was not stored.
#[derive(Debug, Error)]
pub enum SinkError {
    /// The payload is not an event: too big, not JSON, or without a usable `id`.
    #[error("not an event: {0}")]
    Malformed(String),
    /// The database failed (disk full, I/O error): the event is not stored.
    #[error("event store: {0}")]
    Storage(#[from] rusqlite::Error),
}

/// What recording an event did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// First time this event was seen: stored.
    New,
    /// Already stored (a redelivery): nothing changed.
    Duplicate,
}

/// A stored event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    /// The gateway that sent it.
    pub gateway: String,
    /// Its id.
    pub id: String,
    /// Its payload, as received (first delivery).
    pub payload: Vec<u8>,
}

/// The only field the sink reads; the rest of an event is kept as received.
#[derive(Deserialize)]
struct EventId {
    id: String,
}

/// The event database.
pub struct EventSink {
    conn: Connection,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink").finish_non_exhaustive()
    }
}

impl EventSink {
    /// Opens (creating if needed) the event database at `path`.
    pub fn open(path: &Path) -> Result<Self, SinkError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // An acknowledgement to the gateway depends on this commit.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS events (
                 seq INTEGER PRIMARY KEY,
                 gateway TEXT NOT NULL,
                 id TEXT NOT NULL,
                 payload BLOB NOT NULL,
                 UNIQUE (gateway, id)
             );",
        )?;
        Ok(EventSink { conn })
    }

    /// Stores an event from `gateway`, unless it is already stored.
    pub fn record(&mut self, gateway: &str, payload: &[u8]) -> Result<Recorded, SinkError> {
        let id = event_id(payload)?;
        let inserted = self.conn.execute(
            "INSERT OR IGNORE INTO events (gateway, id, payload) VALUES (?1, ?2, ?3)",
            params![gateway, id, payload],
        )?;
        Ok(if inserted == 1 { Recorded::New } else { Recorded::Duplicate })
    }

    /// Stores a batch of events from `gateway` in one transaction (one durable commit for all
    /// of them). Each payload gets its own answer: stored, already stored, or not an event
    /// (the reason); a storage failure fails the whole batch and stores none of it.
    pub fn record_all<'a>(
        &mut self,
        gateway: &str,
        payloads: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Vec<Result<Recorded, String>>, SinkError> {
        let tx = self.conn.transaction()?;
        let mut answers = Vec::new();
        {
            let mut insert =
                tx.prepare_cached("INSERT OR IGNORE INTO events (gateway, id, payload) VALUES (?1, ?2, ?3)")?;
            for payload in payloads {
                answers.push(match event_id(payload) {
                    Ok(id) => {
                        let inserted = insert.execute(params![gateway, id, payload])?;
                        Ok(if inserted == 1 { Recorded::New } else { Recorded::Duplicate })
                    }
                    Err(SinkError::Malformed(why)) => Err(why),
                    Err(e) => return Err(e),
                });
            }
        }
        tx.commit()?;
        Ok(answers)
    }

    /// How many events are stored for `gateway` (all gateways with `None`).
    pub fn count(&self, gateway: Option<&str>) -> Result<u64, SinkError> {
        let n: i64 = match gateway {
            Some(g) => self.conn.query_row("SELECT count(*) FROM events WHERE gateway = ?1", [g], |r| r.get(0))?,
            None => self.conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?,
        };
        Ok(n as u64)
    }

    /// The events of `gateway` in arrival order, from the `after`-th on, at most `limit`.
    pub fn events(&self, gateway: &str, after: u64, limit: u32) -> Result<Vec<StoredEvent>, SinkError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT gateway, id, payload FROM events WHERE gateway = ?1 ORDER BY seq LIMIT ?2 OFFSET ?3",
        )?;
        let rows = stmt.query_map(params![gateway, limit, after as i64], |r| {
            Ok(StoredEvent { gateway: r.get(0)?, id: r.get(1)?, payload: r.get(2)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The event `id` of `gateway`, if stored.
    pub fn get(&self, gateway: &str, id: &str) -> Result<Option<StoredEvent>, SinkError> {
        Ok(self
            .conn
            .query_row(
                "SELECT gateway, id, payload FROM events WHERE gateway = ?1 AND id = ?2",
                params![gateway, id],
                |r| Ok(StoredEvent { gateway: r.get(0)?, id: r.get(1)?, payload: r.get(2)? }),
            )
            .optional()?)
    }
}

/// The id of an event payload, checked: a JSON object of at most [`MAX_EVENT_BYTES`] with a
/// string `id` of 1 to [`MAX_EVENT_ID_LEN`] printable ASCII characters.
pub fn event_id(payload: &[u8]) -> Result<String, SinkError> {
    if payload.len() > MAX_EVENT_BYTES {
        return Err(SinkError::Malformed(format!("{} bytes (at most {MAX_EVENT_BYTES})", payload.len())));
    }
    let EventId { id } = serde_json::from_slice(payload)
        .map_err(|e| SinkError::Malformed(format!("expected a JSON object with an id: {e}")))?;
    if id.is_empty() || id.len() > MAX_EVENT_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(SinkError::Malformed(format!("event id: 1 to {MAX_EVENT_ID_LEN} printable ASCII characters")));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_stored_once_per_gateway_and_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = EventSink::open(&dir.path().join("events.db")).unwrap();
        assert_eq!(sink.record("gw-a", br#"{"id":"e1","kind":"x"}"#).unwrap(), Recorded::New);
        assert_eq!(sink.record("gw-a", br#"{"id":"e1","kind":"x"}"#).unwrap(), Recorded::Duplicate);
        assert_eq!(sink.record("gw-b", br#"{"id":"e1"}"#).unwrap(), Recorded::New, "ids are per gateway");
        assert_eq!(sink.count(Some("gw-a")).unwrap(), 1);
        assert_eq!(sink.count(None).unwrap(), 2);
        assert_eq!(sink.events("gw-a", 0, 10).unwrap()[0].payload, br#"{"id":"e1","kind":"x"}"#);
        assert!(sink.get("gw-b", "e1").unwrap().is_some());
    }

    #[test]
    fn a_batch_is_stored_in_one_go_with_an_answer_per_payload() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = EventSink::open(&dir.path().join("events.db")).unwrap();
        sink.record("gw", br#"{"id":"e0"}"#).unwrap();
        let batch: [&[u8]; 4] = [br#"{"id":"e1"}"#, br#"{"id":"e0"}"#, b"not an event", br#"{"id":"e1"}"#];
        let answers = sink.record_all("gw", batch).unwrap();
        assert_eq!(answers[0], Ok(Recorded::New));
        assert_eq!(answers[1], Ok(Recorded::Duplicate));
        assert!(answers[2].as_ref().unwrap_err().contains("JSON"), "{answers:?}");
        assert_eq!(answers[3], Ok(Recorded::Duplicate), "a repeat within the batch");
        assert_eq!(sink.count(Some("gw")).unwrap(), 2);
    }

    #[test]
    fn malformed_events_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = EventSink::open(&dir.path().join("events.db")).unwrap();
        for bad in [&b"not json"[..], b"[1]", br#"{"no":"id"}"#, br#"{"id":""}"#, br#"{"id":7}"#, br#"{"id":"a b"}"#] {
            let err = sink.record("gw", bad).unwrap_err();
            assert!(matches!(err, SinkError::Malformed(_)), "{err}");
        }
        let big = format!(r#"{{"id":"x","pad":"{}"}}"#, "a".repeat(MAX_EVENT_BYTES));
        assert!(matches!(sink.record("gw", big.as_bytes()), Err(SinkError::Malformed(_))));
        assert_eq!(sink.count(None).unwrap(), 0);
    }
}
