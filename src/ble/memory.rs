//! Locks in memory, reached with no D-Bus and no BlueZ: the emulated firmware on the wall
//! clock (`firmware::host`) behind a [`LockTransport`].
//!
//! For tests of what sits above the radio — a lock's client, the hub's adapters, the gateway —
//! that need no `dbus-daemon`. A [`MemoryAir`] holds the locks; each [`MemoryAdapter`] on it is
//! one of the hub's adapters, which can be powered off or have a lock out of its range. What
//! is about BlueZ itself is tested through the emulator's `org.bluez` and the real-BlueZ tier.
//!
//! A lock serves one central at a time, as a real one does: a new connection (through any
//! adapter) ends the previous one, whose link then reports [`BleError::LinkLost`].

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Advertisement, BleError, LockLink, LockTransport};
use crate::firmware::PersistentState;
use crate::firmware::host::{HostedLock, Radio};
use crate::protocol::gatt::LockInfo;
use crate::protocol::ids::LockId;

/// The signal strength every in-memory lock is heard at.
const RSSI: i16 = -50;

/// How often an in-memory lock advertises (a lock's fast advertising interval).
pub const ADVERTISING_INTERVAL: Duration = Duration::from_millis(100);

/// Where in-memory locks live; every adapter on it hears those in its range.
#[derive(Debug, Default)]
pub struct MemoryAir {
    locks: Mutex<BTreeMap<String, Arc<AirLock>>>,
    /// Numbers the connections, so that a link knows whether it is still the lock's.
    connections: AtomicU64,
}

#[derive(Debug)]
struct AirLock {
    host: Arc<HostedLock>,
    mtu: u16,
    central: Mutex<Option<Central>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AirLock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The central a lock is connected to.
#[derive(Debug)]
struct Central {
    connection: u64,
    adapter: String,
    notifications: mpsc::UnboundedSender<Vec<u8>>,
}

impl AirLock {
    fn central(&self) -> std::sync::MutexGuard<'_, Option<Central>> {
        self.central.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ends connection `connection` (any, if `None`) from the hub's side, if it is the lock's.
    fn drop_central(&self, connection: Option<u64>) {
        let mut central = self.central();
        if central.as_ref().is_some_and(|c| connection.is_none_or(|n| n == c.connection)) {
            *central = None;
            drop(central);
            self.host.input(|fw, now| fw.disconnect(now));
        }
    }
}

/// Carries a hosted lock's notifications to its central.
struct AirRadio(Weak<AirLock>);

impl Radio for AirRadio {
    async fn notify(&self, fragment: Vec<u8>) {
        if let Some(lock) = self.0.upgrade()
            && let Some(central) = lock.central().as_ref()
        {
            let _ = central.notifications.send(fragment);
        }
    }

    async fn disconnect(&self) {
        if let Some(lock) = self.0.upgrade() {
            // The lock dropped the link: its central's channel closes.
            *lock.central() = None;
        }
    }
}

impl MemoryAir {
    /// An empty air.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Boots a lock from `state` (no flash file) with ATT MTU `mtu`; returns its address.
    /// Needs a tokio runtime: the lock's timers run on a task of its own.
    pub fn add_lock(&self, state: PersistentState, mtu: u16) -> String {
        let mut locks = self.locks();
        let address = format!("0A:00:00:00:{:02X}:{:02X}", locks.len() / 256, locks.len() % 256);
        let host = HostedLock::new(state, None);
        let lock = Arc::new_cyclic(|me: &Weak<AirLock>| AirLock {
            host: host.clone(),
            mtu,
            central: Mutex::new(None),
            task: tokio::spawn(host.clone().run(AirRadio(me.clone()))),
        });
        locks.insert(address.clone(), lock);
        address
    }

    /// The lock at `address`, to act on it (its buttons, its faults) as its owner would.
    pub fn lock(&self, address: &str) -> Option<Arc<HostedLock>> {
        self.locks().get(address).map(|l| l.host.clone())
    }

    fn locks(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<AirLock>>> {
        self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One of the hub's adapters on a [`MemoryAir`].
#[derive(Debug)]
pub struct MemoryAdapter {
    air: Arc<MemoryAir>,
    name: String,
    powered: AtomicBool,
    /// Locks out of its range, by address.
    out_of_range: Mutex<HashSet<String>>,
}

impl MemoryAdapter {
    /// Adapter `name`, powered, hearing every lock on `air`.
    pub fn new(air: &Arc<MemoryAir>, name: &str) -> Self {
        MemoryAdapter {
            air: air.clone(),
            name: name.to_owned(),
            powered: AtomicBool::new(true),
            out_of_range: Mutex::new(HashSet::new()),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Powers it on or off; powering off drops its links.
    pub fn set_powered(&self, on: bool) {
        self.powered.store(on, Ordering::Release);
        if !on {
            let locks: Vec<_> = self.air.locks().values().cloned().collect();
            for lock in locks {
                self.drop_link_to(&lock);
            }
        }
    }

    /// Puts the lock at `address` in or out of its range (out: it is not heard, and its link
    /// through this adapter drops).
    pub fn set_in_range(&self, address: &str, in_range: bool) {
        let mut out = self.out_of_range.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if in_range {
            out.remove(address);
        } else {
            out.insert(address.to_owned());
            drop(out);
            if let Some(lock) = self.air.locks().get(address).cloned() {
                self.drop_link_to(&lock);
            }
        }
    }

    /// Ends `lock`'s link if it goes through this adapter.
    fn drop_link_to(&self, lock: &AirLock) {
        let through_me = lock.central().as_ref().is_some_and(|c| c.adapter == self.name);
        if through_me {
            lock.drop_central(None);
        }
    }

    fn powered(&self) -> Result<(), BleError> {
        if self.powered.load(Ordering::Acquire) { Ok(()) } else { Err(BleError::AdapterOff(self.name.clone())) }
    }

    fn hears(&self, address: &str) -> bool {
        !self.out_of_range.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(address)
    }

    /// What it hears now.
    fn heard(&self) -> Result<Vec<Advertisement>, BleError> {
        self.powered()?;
        let locks: Vec<_> = self.air.locks().iter().map(|(a, l)| (a.clone(), l.clone())).collect();
        Ok(locks
            .into_iter()
            .filter(|(address, _)| self.hears(address))
            .filter_map(|(address, lock)| {
                let data = lock.host.inspect(|fw, _| fw.advertisement().encode().to_vec());
                Advertisement::from_scan(address, RSSI, &data)
            })
            .collect())
    }
}

impl LockTransport for MemoryAdapter {
    type Link = MemoryLink;

    /// What it hears, at once: in memory there is nothing to wait for.
    async fn scan(&self, _duration: Duration) -> Result<Vec<Advertisement>, BleError> {
        let mut heard = self.heard()?;
        Advertisement::sort_strongest_first(&mut heard);
        Ok(heard)
    }

    async fn find(&self, address: &str, _timeout: Duration) -> Result<(), BleError> {
        self.powered()?;
        if self.hears(address) && self.air.locks().contains_key(address) {
            Ok(())
        } else {
            Err(BleError::NotFound(address.to_owned()))
        }
    }

    async fn locate(&self, lock_id: LockId, timeout: Duration) -> Result<Advertisement, BleError> {
        self.heard()?
            .into_iter()
            .find(|ad| ad.is_of(lock_id))
            .ok_or(BleError::Timeout { during: "looking for the lock", after: timeout })
    }

    async fn connect(&self, address: &str) -> Result<MemoryLink, BleError> {
        self.powered()?;
        let lock = self.air.locks().get(address).cloned().filter(|_| self.hears(address));
        let Some(lock) = lock else { return Err(BleError::NotFound(address.to_owned())) };
        let connection = self.air.connections.fetch_add(1, Ordering::AcqRel);
        let (tx, notifications) = mpsc::unbounded_channel();
        lock.host.input(|fw, now| fw.connect(lock.mtu, now));
        *lock.central() = Some(Central { connection, adapter: self.name.clone(), notifications: tx });
        let info = lock.host.inspect(|fw, _| fw.info());
        Ok(MemoryLink { lock, connection, notifications, info })
    }

    fn forget(&self, _address: &str) {}

    /// Hears every lock in range once per [`ADVERTISING_INTERVAL`], as a discovery that
    /// reports every advertisement does; nothing is heard while powered off.
    async fn listen(
        self: Arc<Self>,
        _silence: Duration,
        mut heard: impl FnMut(&Advertisement) + Send,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut interval = tokio::time::interval(ADVERTISING_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {
                    for ad in self.heard().unwrap_or_default() {
                        heard(&ad);
                    }
                }
                () = crate::stop::requested(&mut shutdown) => return,
            }
        }
    }

    fn remembers(&self, _address: &str) -> bool {
        false
    }
}

/// A link to an in-memory lock.
#[derive(Debug)]
pub struct MemoryLink {
    lock: Arc<AirLock>,
    connection: u64,
    notifications: mpsc::UnboundedReceiver<Vec<u8>>,
    info: LockInfo,
}

impl MemoryLink {
    fn is_current(&self) -> bool {
        self.lock.central().as_ref().is_some_and(|c| c.connection == self.connection)
    }
}

impl LockLink for MemoryLink {
    fn info(&self) -> LockInfo {
        self.info
    }

    fn max_fragment(&self) -> usize {
        usize::from(self.lock.mtu) - 3
    }

    async fn write(&mut self, fragment: &[u8]) -> Result<(), BleError> {
        if !self.is_current() {
            return Err(BleError::LinkLost);
        }
        self.lock.host.input(|fw, now| fw.write(fragment, now));
        Ok(())
    }

    async fn recv(&mut self) -> Result<Vec<u8>, BleError> {
        self.notifications.recv().await.ok_or(BleError::LinkLost)
    }

    async fn close(self) {
        self.lock.drop_central(Some(self.connection));
    }
}
