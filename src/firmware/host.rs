//! Runs one emulated lock in real time: a monotonic clock, a task that fires the firmware's
//! timers and hands its outputs to a radio front end, and the lock's flash kept as a file.
//!
//! Front ends (the fake `org.bluez`, the BLE peripheral) call [`HostedLock::input`] for
//! everything that happens to the lock and implement [`Radio`] to carry what it sends.
//!
//! The flash file is written off the lock's task and outside the firmware's mutex: a copy of
//! the state is taken under the mutex (microseconds), then serialised, written and flushed on
//! the blocking pool. Writing inside the task held every notification of every lock the task's
//! thread serves behind a serialisation of the whole event log and an `fsync` — the
//! remote-unlock benchmark's slowest lock exchanges (p99 2.3 ms against 0.45 ms without).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand_chacha::ChaCha20Rng;
use rand_core::{OsRng, SeedableRng};
use thiserror::Error;
use tokio::sync::Notify;

use super::{Firmware, Output, PersistentState};

/// How long changes may sit in memory before the flash file is rewritten.
const SAVE_DEBOUNCE: Duration = Duration::from_millis(200);

/// Where a hosted lock's outputs go.
pub trait Radio: Send + Sync + 'static {
    /// Sends one notification fragment to the connected central.
    fn notify(&self, fragment: Vec<u8>) -> impl Future<Output = ()> + Send;
    /// Sends fragments the firmware queued together; a radio with several bearers may
    /// deliver them in another order.
    fn notify_burst(&self, fragments: Vec<Vec<u8>>) -> impl Future<Output = ()> + Send {
        async move {
            for fragment in fragments {
                self.notify(fragment).await;
            }
        }
    }
    /// Drops the connection.
    fn disconnect(&self) -> impl Future<Output = ()> + Send;
}

/// Why a lock's flash file could not be read or written.
#[derive(Debug, Error)]
pub enum FlashError {
    /// I/O on the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The file does not hold a lock's state.
    #[error("{path}: not an emulated lock's state: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse failure.
        source: serde_json::Error,
    },
}

/// One emulated lock running on the wall clock.
pub struct HostedLock {
    firmware: Mutex<Firmware>,
    epoch: Instant,
    flash: Option<PathBuf>,
    wake: Notify,
    dirty: AtomicBool,
    /// Numbers the copies of the state taken for the file, in the order of the states.
    copies: AtomicU64,
    /// The number of the copy the file holds: writes run one at a time, and a copy older than
    /// the file's (a slow background write overtaken by the save at shutdown) is dropped.
    written: Mutex<u64>,
}

impl std::fmt::Debug for HostedLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostedLock").field("flash", &self.flash).finish_non_exhaustive()
    }
}

impl HostedLock {
    /// Hosts a lock booted from `state`; `flash` is the file its state is saved to.
    pub fn new(state: PersistentState, flash: Option<PathBuf>) -> Arc<Self> {
        let rng = ChaCha20Rng::from_rng(OsRng).expect("the OS random source works");
        Arc::new(HostedLock {
            firmware: Mutex::new(Firmware::boot(state, Box::new(rng))),
            epoch: Instant::now(),
            flash,
            wake: Notify::new(),
            dirty: AtomicBool::new(true),
            copies: AtomicU64::new(0),
            written: Mutex::new(0),
        })
    }

    /// Loads a lock's state from its flash file.
    pub fn load(path: &Path) -> Result<PersistentState, FlashError> {
        let bytes = std::fs::read(path).map_err(|source| FlashError::Io { path: path.into(), source })?;
        serde_json::from_slice(&bytes).map_err(|source| FlashError::Corrupt { path: path.into(), source })
    }

    /// Milliseconds since this lock was hosted (the firmware's monotonic clock).
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Applies an input to the firmware (a write, a button, a fault knob) and wakes the task
    /// that delivers what it produced.
    pub fn input<R>(&self, f: impl FnOnce(&mut Firmware, u64) -> R) -> R {
        let now = self.now_ms();
        let r = f(&mut self.firmware.lock().expect("firmware lock poisoned"), now);
        self.dirty.store(true, Ordering::Release);
        self.wake.notify_one();
        r
    }

    /// Reads the firmware without changing it.
    pub fn inspect<R>(&self, f: impl FnOnce(&Firmware, u64) -> R) -> R {
        f(&self.firmware.lock().expect("firmware lock poisoned"), self.now_ms())
    }

    /// Writes the flash file (atomically, mode 0600) if anything changed since the last save.
    pub fn save(&self) -> Result<(), FlashError> {
        match self.copy_if_changed() {
            Some(copy) => self.write(copy),
            None => Ok(()),
        }
    }

    /// A numbered copy of the state, if it changed since the last copy and there is a file.
    fn copy_if_changed(&self) -> Option<(u64, PersistentState)> {
        self.flash.as_ref()?;
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return None;
        }
        let fw = self.firmware.lock().expect("firmware lock poisoned");
        // Numbered under the firmware's mutex, so that a higher number is a newer state.
        Some((self.copies.fetch_add(1, Ordering::AcqRel) + 1, fw.persistent().clone()))
    }

    /// Writes a copy taken by [`HostedLock::copy_if_changed`], unless the file holds a newer one.
    fn write(&self, (number, state): (u64, PersistentState)) -> Result<(), FlashError> {
        let Some(path) = &self.flash else { return Ok(()) };
        let mut written = self.written.lock().expect("flash writer poisoned");
        if *written >= number {
            return Ok(());
        }
        let json = serde_json::to_vec(&state).expect("lock state serialises");
        if let Err(source) = write_private(path, &json) {
            // Tried again at the next save, changed or not.
            self.dirty.store(true, Ordering::Release);
            return Err(FlashError::Io { path: path.clone(), source });
        }
        *written = number;
        Ok(())
    }

    /// Saves in the background (see the module's doc); a failure is logged.
    fn save_in_background(self: &Arc<Self>) {
        let Some(copy) = self.copy_if_changed() else { return };
        let host = self.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = host.write(copy) {
                tracing::error!(error = %e, "could not save the emulated lock's state");
            }
        });
    }

    /// Fires timers and delivers outputs until the task is dropped. Saves the flash file a
    /// little after changes.
    pub async fn run(self: Arc<Self>, radio: impl Radio) {
        let mut save_at: Option<tokio::time::Instant> = None;
        loop {
            let (outputs, deadline) = {
                let now = self.now_ms();
                let mut fw = self.firmware.lock().expect("firmware lock poisoned");
                fw.on_timeout(now);
                let mut outputs = Vec::new();
                while let Some(o) = fw.poll_output(now) {
                    outputs.push(o);
                }
                (outputs, fw.deadline())
            };
            let mut burst = Vec::new();
            for o in outputs {
                match o {
                    Output::Notify(f) => burst.push(f),
                    Output::Disconnect => {
                        radio.notify_burst(std::mem::take(&mut burst)).await;
                        radio.disconnect().await;
                    }
                }
            }
            if !burst.is_empty() {
                radio.notify_burst(burst).await;
            }
            if self.dirty.load(Ordering::Acquire) && save_at.is_none() {
                save_at = Some(tokio::time::Instant::now() + SAVE_DEBOUNCE);
            }
            let timer = deadline.map(|d| self.epoch + Duration::from_millis(d));
            let sleep_until = [timer.map(tokio::time::Instant::from_std), save_at].into_iter().flatten().min();
            tokio::select! {
                () = self.wake.notified() => {}
                () = sleep_or_forever(sleep_until) => {}
            }
            if save_at.is_some_and(|at| at <= tokio::time::Instant::now()) {
                save_at = None;
                self.save_in_background();
            }
        }
    }
}

async fn sleep_or_forever(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, readable by the owner only.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firmware::{Capabilities, Mechanics};
    use crate::protocol::ids::LockId;
    use crate::protocol::message::LockState;

    #[test]
    fn a_copy_older_than_the_file_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock.json");
        let state =
            PersistentState::factory_new(LockId([7; 8]), Capabilities::default(), Mechanics::default(), &mut OsRng);
        let lock = HostedLock::new(state, Some(path.clone()));
        // A background write's copy, overtaken before it reaches the file.
        let older = lock.copy_if_changed().expect("a new lock is unsaved");
        assert_eq!(older.1.bolt, LockState::Locked);
        lock.input(|fw, now| fw.turn_knob(now));
        lock.save().unwrap();
        lock.write(older).unwrap();
        assert_eq!(HostedLock::load(&path).unwrap().bolt, LockState::Unlocked);
        // Nothing changed since: nothing to copy.
        assert!(lock.copy_if_changed().is_none());
    }
}
