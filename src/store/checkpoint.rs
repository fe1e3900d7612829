//! Checkpoints of the write-ahead log, taken off the commits that carry commands.
//!
//! Left to itself, SQLite copies the log back into the database file inside whichever commit
//! leaves it at 1,000 pages or more: every eighty-odd commands here, a command's commit also
//! copied the log and flushed the database file — a millisecond on this machine's disk, tens
//! of milliseconds on an SD card, on an unlock somebody is waiting for. A store handed to
//! [`Store::checkpoint_elsewhere`] instead says when its log has grown past
//! [`WalLimits::hand_off_at`], and the daemon checkpoints from a [`Checkpointer`], a
//! connection of its own, on the blocking pool. SQLite's passive checkpoint does not hold the
//! writer up, and once it has caught up the writer starts the log over at its next commit, so
//! the log stays as small as before. Should nobody checkpoint (the checkpointer failing), a
//! commit that finds the log past [`WalLimits::inline_at`] checkpoints itself: the log never
//! grows without bound.
//!
//! The same task empties the log after deletions that could not, or did not, do it
//! themselves. A deletion ([`Store::compact`]) ends by emptying the log, which another
//! connection holding an old snapshot can prevent for as long as it likes; the compaction then
//! reports [`StoreError::LogInUse`] and records a [`LogDebt`]. So does the outbox when the
//! broker acknowledged a record that clears a retained topic (it names what was deleted, and
//! outlives the deletion's compaction). [`Checkpoints`] empties the log at once and, while it
//! cannot, every [`RETRY_OWED`] — so the deleted rows leave the files once the other
//! connection lets go, not at the next deletion.

use std::ffi::c_int;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::hooks::Wal;
use rusqlite::wal::CheckpointMode;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{Notify, watch};

use super::{Store, StoreError};

/// How often [`Checkpoints`] tries to empty a log that still holds deleted rows.
pub const RETRY_OWED: Duration = Duration::from_secs(2);

/// When a store whose checkpoints are taken elsewhere asks for one, and when it takes one
/// itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalLimits {
    /// Pages in the log from which each commit asks for a checkpoint (SQLite's own default
    /// line for checkpointing inside the commit).
    pub hand_off_at: u32,
    /// Pages in the log from which a commit checkpoints itself, as SQLite would.
    pub inline_at: u32,
}

impl Default for WalLimits {
    fn default() -> Self {
        // 64 MiB of 4 KiB pages before a commit steps in: far past anything a working
        // checkpointer lets the log reach.
        WalLimits { hand_off_at: 1_000, inline_at: 16_384 }
    }
}

impl Store {
    /// From now on, leaves the log's checkpoints to the holder of `hand_off`: a commit that
    /// leaves the log at `limits.hand_off_at` pages or more asks it for one (inside the commit,
    /// so it only signals), and one that leaves it at `limits.inline_at` or more checkpoints
    /// there and then. A deletion that leaves its rows in the log records a [`LogDebt`] with it.
    pub fn checkpoint_elsewhere(&mut self, limits: WalLimits, hand_off: &HandOff) -> Result<(), StoreError> {
        let (hand_off_at, inline_at) = (to_pages(limits.hand_off_at), to_pages(limits.inline_at));
        let asker = hand_off.clone();
        // SQLite's own checkpoints inside commits are a log hook too: this one replaces them.
        self.conn.wal_hook(Some(move |wal: &mut Wal, pages: c_int| {
            if pages >= inline_at {
                wal.checkpoint_v2(CheckpointMode::PASSIVE)?;
            } else if pages >= hand_off_at {
                asker.ask();
            }
            Ok(())
        }))?;
        self.handed_off = Some(hand_off.clone());
        Ok(())
    }
}

/// What a store hands to whoever takes its checkpoints: its requests for one, and the
/// deletions whose rows the log may still hold. Clones share it.
#[derive(Clone, Debug)]
pub struct HandOff {
    wanted: Arc<Notify>,
    asked: Arc<AtomicU64>,
    debt: Arc<watch::Sender<LogDebt>>,
}

impl Default for HandOff {
    fn default() -> Self {
        HandOff { wanted: Arc::default(), asked: Arc::default(), debt: Arc::new(watch::channel(LogDebt::default()).0) }
    }
}

impl HandOff {
    /// How many times the store has asked for a checkpoint.
    pub fn requests(&self) -> u64 {
        self.asked.load(Ordering::Relaxed)
    }

    /// Returns once the store has asked for a checkpoint since the last return (a request
    /// made while nobody waits is kept).
    pub async fn wanted(&self) {
        self.wanted.notified().await;
    }

    /// The emptyings of the log owed, as they change.
    pub fn debt(&self) -> watch::Receiver<LogDebt> {
        self.debt.subscribe()
    }

    fn ask(&self) {
        self.asked.fetch_add(1, Ordering::Relaxed);
        self.wanted.notify_one();
    }

    /// Deleted rows may be in the log: it is to be emptied.
    pub(super) fn owe(&self) {
        self.debt.send_modify(|d| d.owed += 1);
        self.wanted.notify_one();
    }

    /// The log was emptied after the first `owed` debts were recorded.
    pub(super) fn settle(&self, owed: u64) {
        self.debt.send_if_modified(|d| {
            let before = d.paid;
            d.paid = d.paid.max(owed);
            d.paid != before
        });
    }

    /// The log was emptied: everything owed so far is paid.
    pub(super) fn settle_all(&self) {
        let owed = self.owed();
        self.settle(owed);
    }

    fn owed(&self) -> u64 {
        self.debt.borrow().owed
    }
}

/// Deletions that left their rows in the log, counted since the store was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogDebt {
    /// Deletions that left their rows in the log (a compaction that could not empty it; a
    /// delivered record that cleared a retained topic).
    pub owed: u64,
    /// Of those, how many a later emptying of the log has finished.
    pub paid: u64,
}

impl LogDebt {
    /// Whether the log may still hold deleted rows.
    pub fn outstanding(&self) -> bool {
        self.paid < self.owed
    }
}

fn to_pages(n: u32) -> c_int {
    c_int::try_from(n).unwrap_or(c_int::MAX)
}

/// What one checkpoint did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpointed {
    /// Pages in the log.
    pub log: u32,
    /// Of those, pages now in the database file.
    pub copied: u32,
}

/// A connection of its own to a store's database, that only checkpoints its log: it reads
/// nothing sealed, so it needs no key.
#[derive(Debug)]
pub struct Checkpointer {
    conn: Connection,
}

impl Checkpointer {
    /// Opens the existing database at `database` (a store opened it first: it is in WAL mode).
    pub fn open(database: &Path) -> Result<Self, StoreError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(database, flags)?;
        // Never wait for the others: an emptying of the log that waits holds up every writer
        // (the commands' commits) while it does. The passive checkpoint never waits anyway.
        conn.busy_timeout(Duration::ZERO)?;
        Ok(Checkpointer { conn })
    }

    /// Copies what it can of the log into the database without waiting for anyone
    /// (SQLite's passive checkpoint); what a reader still needs stays for the next one.
    pub fn checkpoint(&mut self) -> Result<Checkpointed, StoreError> {
        let (log, copied): (i64, i64) =
            self.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get(1)?, r.get(2)?)))?;
        let pages = |n: i64| u32::try_from(n).unwrap_or(0);
        Ok(Checkpointed { log: pages(log), copied: pages(copied) })
    }

    /// Copies the whole log into the database and empties it, if no other connection is in
    /// the way at this moment (a writer, or a reader of an older snapshot): `false` if one is.
    pub fn empty_log(&mut self) -> Result<bool, StoreError> {
        truncate_log(&self.conn)
    }
}

/// One truncating checkpoint on `conn` (waiting as its busy timeout says): whether it emptied
/// the log. SQLite answers "busy" rather than fail when another connection is in the way.
pub(super) fn truncate_log(conn: &Connection) -> Result<bool, StoreError> {
    match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0)) {
        Ok(busy) => Ok(busy == 0),
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::DatabaseBusy => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The checkpoints and emptyings of the log a store handed off, taken on the blocking pool by
/// [`Checkpoints::run`].
#[derive(Debug)]
pub struct Checkpoints {
    checkpointer: Checkpointer,
    hand_off: HandOff,
}

impl Checkpoints {
    /// Takes `store`'s checkpoints off its commits (at [`WalLimits::default`]). Until
    /// [`Checkpoints::run`] starts, a request waits (one is kept).
    pub fn hand_off(store: &mut Store) -> Result<Self, StoreError> {
        let checkpointer = Checkpointer::open(store.database_path())?;
        let hand_off = HandOff::default();
        store.checkpoint_elsewhere(WalLimits::default(), &hand_off)?;
        Ok(Checkpoints { checkpointer, hand_off })
    }

    /// The emptyings of the log owed, as they change (see the module's doc).
    pub fn debt(&self) -> watch::Receiver<LogDebt> {
        self.hand_off.debt()
    }

    /// Checkpoints whenever the store asks, and empties the log while an emptying is owed,
    /// until `stopped` changes. Requests made while one runs make one more.
    pub async fn run(self, mut stopped: watch::Receiver<bool>) {
        let Checkpoints { mut checkpointer, hand_off } = self;
        let mut debt = hand_off.debt();
        let mut failing = false;
        loop {
            let owing = debt.borrow_and_update().outstanding();
            tokio::select! {
                () = hand_off.wanted() => {}
                () = tokio::time::sleep(RETRY_OWED), if owing => {}
                () = crate::stop::requested(&mut stopped) => return,
            }
            // Read before the try: a debt recorded during it is owed afterwards.
            let now = *debt.borrow_and_update();
            let owed = now.outstanding().then_some(now.owed);
            let Ok((back, done)) = tokio::task::spawn_blocking(move || {
                let done = match owed {
                    Some(_) => checkpointer.empty_log().map(Done::Emptied),
                    None => checkpointer.checkpoint().map(Done::Copied),
                };
                (checkpointer, done)
            })
            .await
            else {
                tracing::error!(
                    "the checkpoint task failed; commits checkpoint the store's log themselves from now on"
                );
                return;
            };
            checkpointer = back;
            match done {
                Ok(Done::Copied(done)) => {
                    failing = false;
                    tracing::debug!(log_pages = done.log, copied = done.copied, "store log checkpointed");
                }
                Ok(Done::Emptied(true)) => {
                    failing = false;
                    hand_off.settle(owed.unwrap_or(0));
                    tracing::info!("the store's log is emptied: no deleted row is left in the database's files");
                }
                Ok(Done::Emptied(false)) => {
                    failing = false;
                    tracing::debug!("the store's log still holds deleted rows: another connection is in the way");
                }
                // Said once while it keeps failing: each commit past the line asks again, and an
                // emptying owed is tried again on the timer.
                Err(e) if !failing => {
                    failing = true;
                    let again = if owed.is_some() { format!("in {RETRY_OWED:?}") } else { "at the next commit".into() };
                    tracing::warn!(error = %e, "could not checkpoint the store's log; trying again {again}");
                }
                Err(_) => {}
            }
        }
    }
}

enum Done {
    Copied(Checkpointed),
    Emptied(bool),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;
    use crate::store::audit::{AuditActor, AuditEntry};

    fn audit(store: &mut Store, at: i64) {
        store
            .transaction(|tx| {
                tx.audit(AuditEntry {
                    at,
                    action: "test",
                    outcome: "ok",
                    actor: AuditActor::Hub,
                    lock: None,
                    detail: "",
                })
            })
            .unwrap();
    }

    fn database_file(store: &Store) -> Vec<u8> {
        std::fs::read(store.database_path()).unwrap()
    }

    #[test]
    fn commits_ask_for_checkpoints_and_leave_the_database_file_alone_until_one_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(dir.path()) }).unwrap();
        let asked = HandOff::default();
        let limits = WalLimits { hand_off_at: 20, inline_at: 100_000 };
        store.checkpoint_elsewhere(limits, &asked).unwrap();
        let mut checkpointer = Checkpointer::open(store.database_path()).unwrap();
        // Everything so far in the database file: what follows is measured from here.
        checkpointer.checkpoint().unwrap();
        audit(&mut store, 0);
        let before = database_file(&store);

        let mut at = 1;
        while asked.requests() == 0 {
            audit(&mut store, at);
            at += 1;
            assert!(at < 100, "no commit asked for a checkpoint");
        }
        // Past the line, commits keep asking and still copy nothing back themselves, well past
        // SQLite's own line of 1,000 pages (each of these commits writes at least one).
        for _ in 0..1_200 {
            audit(&mut store, at);
            at += 1;
        }
        assert!(asked.requests() > 1_200, "each commit past the line asks");
        assert_eq!(database_file(&store), before, "no commit checkpointed by itself");

        let done = checkpointer.checkpoint().unwrap();
        assert!(done.log > 1_000 && done.copied == done.log, "the checkpointer copied the whole log back: {done:?}");
        assert_ne!(database_file(&store), before);
        // The writer starts the log over: the next commits are below the line again.
        let asked_then = asked.requests();
        audit(&mut store, at);
        assert_eq!(asked.requests(), asked_then, "the log started over");
    }

    #[test]
    fn a_log_nobody_checkpoints_is_checkpointed_by_the_commit_that_finds_it_too_long() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(dir.path()) }).unwrap();
        store.checkpoint_elsewhere(WalLimits { hand_off_at: 5, inline_at: 40 }, &HandOff::default()).unwrap();
        Checkpointer::open(store.database_path()).unwrap().checkpoint().unwrap();
        audit(&mut store, 0);
        let before = database_file(&store);
        let mut at = 1;
        while database_file(&store) == before {
            audit(&mut store, at);
            at += 1;
            assert!(at < 1_000, "the log grew past its bound and nobody checkpointed it");
        }
    }
}
