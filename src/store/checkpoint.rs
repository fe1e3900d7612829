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

use std::ffi::c_int;
use std::path::Path;

use rusqlite::hooks::Wal;
use rusqlite::wal::CheckpointMode;
use rusqlite::{Connection, OpenFlags};

use super::{Store, StoreError};

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
    /// From now on, leaves the log's checkpoints to the caller: a commit that leaves the log
    /// at `limits.hand_off_at` pages or more calls `wanted` (inside the commit: it must only
    /// signal, such as notifying a task that runs a [`Checkpointer`]), and one that leaves it
    /// at `limits.inline_at` or more checkpoints there and then.
    pub fn checkpoint_elsewhere(
        &mut self,
        limits: WalLimits,
        wanted: impl Fn() + Send + 'static,
    ) -> Result<(), StoreError> {
        let (hand_off_at, inline_at) = (to_pages(limits.hand_off_at), to_pages(limits.inline_at));
        // SQLite's own checkpoints inside commits are a log hook too: this one replaces them.
        self.conn.wal_hook(Some(move |wal: &mut Wal, pages: c_int| {
            if pages >= inline_at {
                wal.checkpoint_v2(CheckpointMode::PASSIVE)?;
            } else if pages >= hand_off_at {
                wanted();
            }
            Ok(())
        }))?;
        Ok(())
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
        Ok(Checkpointer { conn: Connection::open_with_flags(database, flags)? })
    }

    /// Copies what it can of the log into the database without waiting for anyone
    /// (SQLite's passive checkpoint); what a reader still needs stays for the next one.
    pub fn checkpoint(&mut self) -> Result<Checkpointed, StoreError> {
        let (log, copied): (i64, i64) =
            self.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get(1)?, r.get(2)?)))?;
        let pages = |n: i64| u32::try_from(n).unwrap_or(0);
        Ok(Checkpointed { log: pages(log), copied: pages(copied) })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

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
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        let limits = WalLimits { hand_off_at: 20, inline_at: 100_000 };
        store.checkpoint_elsewhere(limits, move || _ = counter.fetch_add(1, Ordering::Relaxed)).unwrap();
        let mut checkpointer = Checkpointer::open(store.database_path()).unwrap();
        // Everything so far in the database file: what follows is measured from here.
        checkpointer.checkpoint().unwrap();
        audit(&mut store, 0);
        let before = database_file(&store);

        let mut at = 1;
        while asked.load(Ordering::Relaxed) == 0 {
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
        assert!(asked.load(Ordering::Relaxed) > 1_200, "each commit past the line asks");
        assert_eq!(database_file(&store), before, "no commit checkpointed by itself");

        let done = checkpointer.checkpoint().unwrap();
        assert!(done.log > 1_000 && done.copied == done.log, "the checkpointer copied the whole log back: {done:?}");
        assert_ne!(database_file(&store), before);
        // The writer starts the log over: the next commits are below the line again.
        let asked_then = asked.load(Ordering::Relaxed);
        audit(&mut store, at);
        assert_eq!(asked.load(Ordering::Relaxed), asked_then, "the log started over");
    }

    #[test]
    fn a_log_nobody_checkpoints_is_checkpointed_by_the_commit_that_finds_it_too_long() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(dir.path()) }).unwrap();
        store.checkpoint_elsewhere(WalLimits { hand_off_at: 5, inline_at: 40 }, || {}).unwrap();
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
