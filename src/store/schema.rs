//! The database schema, as numbered migrations applied in order at start-up.
//!
//! `PRAGMA user_version` holds the number of migrations applied. A migration is never edited
//! once released; changes come as new migrations. `docs/privacy.md` describes every table and
//! column, and a test checks that description against this schema.

use rusqlite::Connection;

/// Migration `i` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value BLOB NOT NULL
    ) STRICT;

    CREATE TABLE gateway (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        gateway_id  TEXT NOT NULL,
        claim_state BLOB,
        created_at  INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE locks (
        id             INTEGER PRIMARY KEY,
        lock_id        TEXT NOT NULL UNIQUE,
        address        TEXT NOT NULL,
        name           TEXT NOT NULL,
        pairing_key    BLOB NOT NULL,
        pseudonym_key  BLOB NOT NULL,
        last_event_seq INTEGER NOT NULL DEFAULT 0,
        paired_at      INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE owners (
        id         INTEGER PRIMARY KEY,
        public_key BLOB NOT NULL UNIQUE,
        pinned_at  INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE users (
        id            INTEGER PRIMARY KEY,
        public_key    BLOB NOT NULL UNIQUE,
        pseudonym_key BLOB NOT NULL,
        created_at    INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE grants (
        id          INTEGER PRIMARY KEY,
        grant_id    TEXT NOT NULL UNIQUE,
        lock        INTEGER NOT NULL REFERENCES locks(id) ON DELETE CASCADE,
        user        INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        statement   BLOB NOT NULL,
        valid_until INTEGER
    ) STRICT;
    CREATE INDEX grants_by_lock ON grants(lock);
    CREATE INDEX grants_by_user ON grants(user);

    CREATE TABLE revocations (
        id            INTEGER PRIMARY KEY,
        revocation_id TEXT NOT NULL UNIQUE,
        lock          INTEGER REFERENCES locks(id) ON DELETE CASCADE,
        statement     BLOB NOT NULL,
        revoked_at    INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE passcodes (
        id          INTEGER PRIMARY KEY,
        lock        INTEGER NOT NULL REFERENCES locks(id) ON DELETE CASCADE,
        user        INTEGER REFERENCES users(id) ON DELETE CASCADE,
        slot        INTEGER,
        hash        TEXT NOT NULL CHECK (hash LIKE '$argon2id$%'),
        valid_from  INTEGER,
        valid_until INTEGER
    ) STRICT;

    CREATE TABLE policies (
        scope  TEXT PRIMARY KEY,
        lock   INTEGER REFERENCES locks(id) ON DELETE CASCADE,
        policy TEXT NOT NULL
    ) STRICT;

    CREATE TABLE seen_commands (
        command_id TEXT PRIMARY KEY,
        lock       INTEGER REFERENCES locks(id) ON DELETE CASCADE,
        expires_at INTEGER NOT NULL,
        reply      BLOB
    ) STRICT;
    CREATE INDEX seen_commands_by_expiry ON seen_commands(expires_at);

    CREATE TABLE outbox (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        lock       INTEGER REFERENCES locks(id) ON DELETE CASCADE,
        topic      TEXT NOT NULL,
        payload    BLOB NOT NULL,
        retain     INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE retained_topics (
        topic TEXT PRIMARY KEY,
        lock  INTEGER NOT NULL REFERENCES locks(id) ON DELETE CASCADE
    ) STRICT;

    CREATE TABLE audit (
        seq       INTEGER PRIMARY KEY,
        at        INTEGER NOT NULL,
        action    TEXT NOT NULL,
        outcome   TEXT NOT NULL,
        actor     TEXT,
        subject   TEXT,
        detail    TEXT NOT NULL,
        prev_hash BLOB NOT NULL,
        hash      BLOB NOT NULL
    ) STRICT;
    "#,
    // 2: a digest of each seen command, to tell a redelivery (same bytes: answer again) from a
    // replay (same id, other bytes: refuse).
    r#"
    ALTER TABLE seen_commands ADD COLUMN digest BLOB;
    "#,
    // 3: local codes given by owner-signed statements live among the passcodes (no slot: the
    // hub checks them, not the lock), named by the statement's id so a revocation can remove
    // them.
    r#"
    ALTER TABLE passcodes ADD COLUMN code_id TEXT;
    CREATE UNIQUE INDEX passcodes_by_code_id ON passcodes(code_id);
    "#,
    // 4: the outbox's records that clear a retained topic, found without a scan: while one
    // may be pending, every acknowledgement asks whether any is left, and a scan made draining
    // an outage's backlog quadratic.
    r#"
    CREATE INDEX outbox_clearing ON outbox(id) WHERE retain AND length(payload) = 0;
    "#,
];

/// The schema version this build writes.
pub const VERSION: u32 = MIGRATIONS.len() as u32;

/// Applies the migrations the database lacks, each in its own transaction. Refuses a database
/// written by a newer lockhub.
pub fn migrate(conn: &mut Connection) -> Result<u32, super::StoreError> {
    let current: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if current > VERSION {
        return Err(super::StoreError::TooNew { found: current, supported: VERSION });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as u32)?;
        tx.commit()?;
    }
    Ok(VERSION)
}
