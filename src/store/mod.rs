//! The gateway's local store: one SQLite database, with every secret sealed.
//!
//! What it holds, why, for how long and how it is deleted is in `docs/privacy.md`. The rules:
//! WAL with `synchronous=FULL` (a committed transaction survives power loss, and the gateway
//! acknowledges nothing before its commit), `secure_delete` (deleted rows are overwritten),
//! foreign keys (deleting a lock deletes everything about it), files readable by their owner
//! only. Secrets are sealed with AES-256-GCM under a master key ([`master_key`]) and bound to
//! their row ([`seal`]). People and locks appear in the audit chain only as keyed pseudonyms,
//! so deleting a pseudonym key makes the records unlinkable while the chain still verifies.
//!
//! Writes go through [`Store::transaction`]: a state change, the outbox records that report it
//! and its audit record commit together or not at all.

pub mod audit;
pub mod audit_budget;
pub mod checkpoint;
pub mod master_key;
mod outbox;
mod principals;
mod rekey;
pub mod schema;
pub mod seal;

mod locks;

pub use audit::{AuditEntry, AuditRecord, AuditVerification};
pub use locks::{PairedLock, UnbindReport};
pub use outbox::OutboxRecord;
pub use principals::{CommandSeen, StoredGrant};

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension};
use thiserror::Error;

use master_key::{KeyError, KeySource};
use seal::{MasterKey, Place, SealError, Sealer};

/// Where the store lives and how long it keeps things.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The database file.
    pub database: PathBuf,
    /// The master key file (used when no systemd credential is given).
    pub key_file: PathBuf,
    /// `$CREDENTIALS_DIRECTORY`, when systemd provides one.
    pub credentials_dir: Option<PathBuf>,
    /// Retention limits.
    pub retention: Retention,
}

impl StoreConfig {
    /// The usual layout in a state directory: `lockhub.db` and `master.key`, credentials from
    /// `$CREDENTIALS_DIRECTORY` when set.
    pub fn in_dir(dir: &Path) -> Self {
        StoreConfig {
            database: dir.join("lockhub.db"),
            key_file: dir.join("master.key"),
            credentials_dir: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
            retention: Retention::default(),
        }
    }
}

/// How long the store keeps what it does not need forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Audit records older than this many days are pruned (the chain stays verifiable from an
    /// anchor). Default 365.
    pub audit_days: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention { audit_days: 365 }
    }
}

/// Why the store failed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("database: {0}")]
    Sqlite(rusqlite::Error),
    /// The filesystem holding the store is full. The change was not made; nothing stored
    /// before is lost, and writes work again once there is room.
    #[error(
        "the filesystem holding the store is full: this change was not saved (nothing saved before is lost); \
         free some space on it and lockhub carries on"
    )]
    Full,
    /// The master key could not be had.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A sealed value did not open.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The master key does not open this database.
    #[error(
        "the master key from {key} does not open the database {database}: restore the key that created it \
         (from backup), or move the database aside to start afresh — every pairing would have to be redone"
    )]
    WrongKey {
        /// Where the key came from.
        key: PathBuf,
        /// The database.
        database: PathBuf,
    },
    /// The database was written by a newer lockhub.
    #[error("the database has schema version {found}, this lockhub knows up to {supported}: upgrade lockhub")]
    TooNew {
        /// The database's version.
        found: u32,
        /// This build's version.
        supported: u32,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// Something the caller named does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A value is out of range or malformed.
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// Rekeying needs the store to manage its key file.
    #[error("the master key is a systemd credential ({0}): rekey by providing a new credential, not here")]
    CredentialKey(PathBuf),
    /// Deleted rows could not be cleared from the write-ahead log: other connections to the
    /// database kept it in use. The deletion itself is committed.
    #[error(
        "deleted, but the database's write-ahead log still holds the deleted rows: other connections kept it \
         in use for {waited:?} (a `lockhub doctor` or a copy of the database left open?); {}",
        if *.emptied_later {
            "it is emptied as soon as they let go"
        } else {
            "it is emptied by the next deletion, or when the store is closed"
        }
    )]
    LogInUse {
        /// How long the compaction tried.
        waited: Duration,
        /// Whether the store's checkpointer keeps trying ([`Store::checkpoint_elsewhere`]).
        emptied_later: bool,
    },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        // A full disk is the caller's to report plainly (and to retry later), not an opaque
        // database failure.
        match &e {
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull => StoreError::Full,
            _ => StoreError::Sqlite(e),
        }
    }
}

const KEY_CHECK: &[u8] = b"lockhub key check v1";

/// How long the store's connection waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Store::compact`] keeps trying to empty the write-ahead log while other
/// connections are in the way (a try waits for readers up to the busy timeout), when nobody
/// would finish it later.
const LOG_EMPTIED_WITHIN: Duration = BUSY_TIMEOUT;

/// The same when a checkpointer finishes it later ([`Store::checkpoint_elsewhere`]): the
/// store's lock is held meanwhile, and in the daemon every command waits on it.
const LOG_EMPTIED_WITHIN_HANDED_OFF: Duration = Duration::from_secs(1);

fn key_check_place() -> Place<'static> {
    Place { table: "meta", column: "value", row: b"key_check" }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// The store.
pub struct Store {
    conn: Connection,
    sealer: Sealer,
    key_source: KeySource,
    config: StoreConfig,
    principals: PrincipalsVersion,
    /// Set by [`Store::checkpoint_elsewhere`]: who takes the log's checkpoints, and empties
    /// it after deletions that could not.
    handed_off: Option<checkpoint::HandOff>,
    /// The outbox may hold a record that clears a retained topic ([`Store::outbox_ack`]).
    clearing_pending: bool,
    /// How many records of refusals attributed to nobody the audit log still takes.
    audit_budget: audit_budget::AuditBudget,
}

/// A count of the changes to who may do what: owners, users, grants, revocations, policies,
/// and which locks exist. It moves (at least) whenever one of them changes through the store,
/// so a reader may keep what it read from them for as long as the count stays the same.
///
/// SQLite reports every row a statement changes (cascaded deletions included) to the
/// connection's update hook, which counts those of these tables: no write path has to
/// remember to. A rolled-back change is counted too; that only costs a reader a fresh read.
#[derive(Clone, Debug, Default)]
pub struct PrincipalsVersion(Arc<AtomicU64>);

impl PrincipalsVersion {
    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn changed(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// Whether a row change in `table` can change who may do what. A lock's row is updated with
/// every event it reports (its sequence number); only its coming and going count.
fn changes_principals(action: rusqlite::hooks::Action, table: &str) -> bool {
    match table {
        "owners" | "users" | "grants" | "revocations" | "policies" => true,
        "locks" => !matches!(action, rusqlite::hooks::Action::SQLITE_UPDATE),
        _ => false,
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("database", &self.config.database).finish_non_exhaustive()
    }
}

/// Creates `path` empty with mode 0600 if missing, and tightens it to 0600 if it is looser.
fn private_file(path: &Path) -> Result<(), StoreError> {
    let io = |source| StoreError::Io { path: path.to_owned(), source };
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:04o}"), "tightening to 0600");
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
            }
            Ok(())
        }
        Err(e) => Err(io(e)),
    }
}

impl Store {
    /// Opens (creating if needed) the store: key, files, pragmas, migrations, key check.
    pub fn open(config: StoreConfig) -> Result<Self, StoreError> {
        if let Some(dir) = config.database.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io { path: dir.to_owned(), source })?;
        }
        let (key, key_source) = master_key::load(config.credentials_dir.as_deref(), &config.key_file)?;
        private_file(&config.database)?;
        let mut conn = Connection::open(&config.database)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "secure_delete", "ON")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // A hub's database is small and its reads are few: SQLite's default 2 MiB page cache
        // would only grow the daemon's memory as the audit log grows. 512 KiB (negative: KiB).
        conn.pragma_update(None, "cache_size", -512)?;
        // The statements of the command path, prepared once (rusqlite keeps 16 by default).
        conn.set_prepared_statement_cache_capacity(32);
        // One plan per statement, whatever its parameters: otherwise SQLite marks a statement
        // whose plan could depend on a bound value (a `LIMIT ?`) for re-compiling whenever its
        // bindings are cleared, which the statement cache does after every use. The store's
        // queries are simple enough that a value-specific plan gains nothing.
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
        let principals = PrincipalsVersion::default();
        let counter = principals.clone();
        conn.update_hook(Some(move |action, _db: &str, table: &str, _row| {
            if changes_principals(action, table) {
                counter.changed();
            }
        }))?;
        schema::migrate(&mut conn)?;
        for suffix in ["-wal", "-shm"] {
            let mut p = config.database.as_os_str().to_owned();
            p.push(suffix);
            let p = PathBuf::from(p);
            if p.exists() {
                private_file(&p)?;
            }
        }
        let mut store = Store {
            conn,
            sealer: Sealer::new(&key),
            key_source,
            config,
            principals,
            handed_off: None,
            clearing_pending: false,
            audit_budget: audit_budget::AuditBudget::default(),
        };
        store.check_key(key)?;
        // Left from before a restart, an unbound lock's clearing records still name it.
        store.clearing_pending = store.outbox_holds_clearing()?;
        Ok(store)
    }

    /// Where the master key came from.
    pub fn key_source(&self) -> &KeySource {
        &self.key_source
    }

    /// The count of changes to who may do what (see [`PrincipalsVersion`]); the handle reads
    /// the current count without the store.
    pub fn principals_version(&self) -> PrincipalsVersion {
        self.principals.clone()
    }

    /// Rows inserted, updated or deleted through this store since it was opened: it stands
    /// still exactly while nothing is recorded.
    pub fn changes_so_far(&self) -> u64 {
        self.conn.total_changes()
    }

    /// The database file.
    pub fn database_path(&self) -> &Path {
        &self.config.database
    }

    /// Makes sure the key opens this store (sealing a check value on first use), finishing an
    /// interrupted rekey if one is found.
    fn check_key(&mut self, key: MasterKey) -> Result<(), StoreError> {
        let sealed: Option<Vec<u8>> =
            self.conn.query_row("SELECT value FROM meta WHERE key = 'key_check'", [], |r| r.get(0)).optional()?;
        let Some(sealed) = sealed else {
            let value = self.sealer.seal(key_check_place(), KEY_CHECK);
            self.conn.execute("INSERT INTO meta (key, value) VALUES ('key_check', ?1)", [value])?;
            return Ok(());
        };
        if self.sealer.open(key_check_place(), &sealed).is_ok() {
            rekey::discard_staged(&self.key_source);
            return Ok(());
        }
        if let Some(staged) = rekey::staged_key_opening(&self.key_source, &sealed)? {
            self.sealer = Sealer::new(&staged);
            drop(key);
            return Ok(());
        }
        Err(StoreError::WrongKey { key: self.key_source.path().to_owned(), database: self.config.database.clone() })
    }

    /// Runs `f` in one transaction: everything it does commits together (durably) or not at all.
    pub fn transaction<R>(&mut self, f: impl FnOnce(&mut Tx<'_>) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let audit_budget = self.audit_budget.clone();
        let tx = self.conn.transaction()?;
        let mut wrapped = Tx { tx, sealer: &self.sealer, clearing_appended: false, audit_budget };
        let r = f(&mut wrapped)?;
        let Tx { tx, clearing_appended, audit_budget, .. } = wrapped;
        tx.commit()?;
        self.clearing_pending |= clearing_appended;
        // What the transaction wrote or counted holds only once it committed.
        self.audit_budget = audit_budget;
        Ok(r)
    }

    /// SQLite's own consistency check; `Ok` when it answers "ok".
    pub fn integrity_check(&self) -> Result<(), StoreError> {
        let answer: String = self.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if answer == "ok" { Ok(()) } else { Err(StoreError::Invalid("database (integrity_check failed)")) }
    }

    /// Rewrites the database without free pages and empties the WAL, so that deleted data
    /// leaves no bytes in any file.
    pub fn compact(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch("VACUUM")?;
        // Only an empty log holds no deleted row, and SQLite says "busy" rather than fail when
        // it could not empty it: while a reader still uses an older snapshot (it waits for
        // that one, with the busy handler), and at once while another connection is
        // checkpointing (the daemon's checkpointer, asked by the VACUUM just committed).
        let patience = if self.handed_off.is_some() { LOG_EMPTIED_WITHIN_HANDED_OFF } else { LOG_EMPTIED_WITHIN };
        self.conn.busy_timeout(patience)?;
        let emptied = self.empty_log_within(patience);
        self.conn.busy_timeout(BUSY_TIMEOUT)?;
        match emptied? {
            None => {
                if let Some(handed_off) = &self.handed_off {
                    handed_off.settle_all();
                }
                Ok(())
            }
            Some(waited) => {
                if let Some(handed_off) = &self.handed_off {
                    handed_off.owe();
                }
                Err(StoreError::LogInUse { waited, emptied_later: self.handed_off.is_some() })
            }
        }
    }

    /// Rows were deleted whose bytes must leave the log too, with no compaction of their
    /// own: the checkpointer empties it; a store without one tries once here, waiting for
    /// nobody (if another connection is in the way, the rows stay until the next compaction).
    pub(crate) fn empty_log_soon(&mut self) -> Result<(), StoreError> {
        if let Some(handed_off) = &self.handed_off {
            handed_off.owe();
            return Ok(());
        }
        self.conn.busy_timeout(Duration::ZERO)?;
        let tried = checkpoint::truncate_log(&self.conn);
        self.conn.busy_timeout(BUSY_TIMEOUT)?;
        tried.map(|_| ())
    }

    /// Tries to empty the log until it is empty (`None`) or `patience` has passed (how long it
    /// tried).
    fn empty_log_within(&self, patience: Duration) -> Result<Option<Duration>, StoreError> {
        let started = std::time::Instant::now();
        loop {
            if checkpoint::truncate_log(&self.conn)? {
                return Ok(None);
            }
            if started.elapsed() >= patience {
                return Ok(Some(started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The names of every column of every table, for the privacy inventory check.
    pub fn schema_columns(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut tables = self.conn.prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")?;
        let names: Vec<String> = tables.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for table in names {
            let mut cols = self.conn.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?;
            for col in cols.query_map([], |r| r.get::<_, String>(0))? {
                out.push((table.clone(), col?));
            }
        }
        Ok(out)
    }
}

/// One open transaction, with the sealer.
pub struct Tx<'a> {
    tx: rusqlite::Transaction<'a>,
    sealer: &'a Sealer,
    /// An outbox record that clears a retained topic was appended ([`Store::outbox_ack`]).
    clearing_appended: bool,
    /// The store's audit budget as this transaction leaves it ([`audit_budget`]).
    audit_budget: audit_budget::AuditBudget,
}

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tx")
    }
}
