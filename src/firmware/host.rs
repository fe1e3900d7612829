//! Runs one emulated lock in real time: a monotonic clock, a task that fires the firmware's
//! timers and hands its outputs to a radio front end, and the lock's flash kept as a file.
//!
//! Front ends (the fake `org.bluez`, the BLE peripheral) call [`HostedLock::input`] for
//! everything that happens to the lock and implement [`Radio`] to carry what it sends.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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
        let Some(path) = &self.flash else { return Ok(()) };
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let json = {
            let fw = self.firmware.lock().expect("firmware lock poisoned");
            serde_json::to_vec_pretty(fw.persistent()).expect("lock state serialises")
        };
        write_private(path, &json).map_err(|source| FlashError::Io { path: path.clone(), source })
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
            for o in outputs {
                match o {
                    Output::Notify(f) => radio.notify(f).await,
                    Output::Disconnect => radio.disconnect().await,
                }
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
                if let Err(e) = self.save() {
                    tracing::error!(error = %e, "could not save the emulated lock's state");
                }
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
