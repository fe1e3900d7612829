//! Emulated locks behind a fake `org.bluez`, on any D-Bus bus.
//!
//! The gateway's real bluer code runs against this unchanged: the same object paths, methods,
//! properties, signals and file descriptors BlueZ uses for an LE adapter (`hci0`), remote
//! devices, GATT services and characteristics. Each lock is a [`HostedLock`] whose radio is
//! this emulation. A control interface (`io.lockhub.Emulator1` at `/io/lockhub/Emulator`)
//! lets a test or a person add locks, move them in and out of range, press their buttons and
//! turn their fault knobs.
//!
//! What is emulated, and how it differs from BlueZ, is in `docs/emulator.md`.

mod adapter;
pub mod control;
mod device;
mod gatt;

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::net::UnixDatagram;
use zbus::{Connection, OwnedObjectPath};

use super::host::{FlashError, HostedLock, Radio};
use super::{Mechanics, PersistentState};
use crate::protocol::gatt::Capabilities;
use crate::protocol::ids::LockId;

pub use control::EMULATOR_INTERFACE;

/// The adapter's object path.
pub const ADAPTER_PATH: &str = "/org/bluez/hci0";
/// The control object's path.
pub const CONTROL_PATH: &str = "/io/lockhub/Emulator";
/// The well-known name the emulator owns besides `org.bluez`.
pub const CONTROL_NAME: &str = "io.lockhub.Emulator";

/// How an emulated lock is built and where it sits on the radio.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LockSpec {
    /// Lock id as 16 hex digits; random when empty.
    pub lock_id: String,
    /// ATT MTU of the link (23 to 517).
    pub mtu: u16,
    /// Motor time in ms.
    pub motor_ms: u64,
    /// Auto-lock delay in ms.
    pub auto_lock_ms: Option<u64>,
    /// Signal strength reported while in range, dBm.
    pub rssi: i16,
    /// Whether the lock is in radio range.
    pub in_range: bool,
    /// Has a latch motor.
    pub unlatch: bool,
    /// Has a keypad.
    pub keypad: bool,
    /// Has a door sensor.
    pub door_sensor: bool,
    /// Enhanced ATT bearers on its links, as bluetoothd's `[GATT] Channels` (1 to 5; 3 by
    /// default, as there). With more than one, fragments sent back to back may leave on
    /// different bearers and arrive in another order: the emulator swaps each pair queued
    /// together, both ways, as bluetoothd 5.66 was seen to (docs/emulator.md).
    pub eatt_bearers: u8,
}

impl Default for LockSpec {
    fn default() -> Self {
        LockSpec {
            lock_id: String::new(),
            mtu: 247,
            motor_ms: 400,
            auto_lock_ms: None,
            rssi: -60,
            in_range: true,
            unlatch: true,
            keypad: true,
            door_sensor: true,
            eatt_bearers: 3,
        }
    }
}

/// Why the emulator refused something.
#[derive(Debug, Error)]
pub enum EmulatorError {
    /// D-Bus failed.
    #[error("D-Bus: {0}")]
    Bus(#[from] zbus::Error),
    /// A lock's state file could not be used.
    #[error(transparent)]
    Flash(#[from] FlashError),
    /// The state directory could not be read.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// A lock spec is invalid.
    #[error("invalid lock spec: {0}")]
    Spec(String),
}

/// BlueZ's errors, under their real D-Bus names (`org.bluez.Error.*`), so that bluer maps
/// them as it maps BlueZ's.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.bluez.Error")]
enum BluezError {
    #[zbus(error)]
    ZBus(zbus::Error),
    Failed(String),
    NotReady(String),
    InProgress(String),
    AlreadyConnected(String),
    NotConnected(String),
    NotPermitted(String),
    NotSupported(String),
    DoesNotExist(String),
    InvalidArguments(String),
}

/// The Bluetooth address an emulated lock uses: a static random address (top bits 11)
/// made from the last five bytes of its id.
pub fn address_for(lock_id: LockId) -> String {
    let b = lock_id.0;
    format!("C0:{:02X}:{:02X}:{:02X}:{:02X}:{:02X}", b[3], b[4], b[5], b[6], b[7])
}

/// The object path of the emulated device at `address`, named as bluetoothd names its own.
pub fn device_path(address: &str) -> OwnedObjectPath {
    OwnedObjectPath::try_from(format!("{ADAPTER_PATH}/dev_{}", address.replace(':', "_")))
        .expect("address-derived path is valid")
}

/// Radio-side state of one lock, as BlueZ would see it.
#[derive(Default)]
struct RadioState {
    in_range: bool,
    rssi: i16,
    /// A Device1 object exists (the lock was seen in a discovery).
    exported: bool,
    connected: bool,
    /// A connection attempt BlueZ is making (the lock out of range): `Disconnect` cancels it
    /// through this, and another `Connect` meanwhile is refused, as bluetoothd does.
    connecting: Option<tokio::sync::oneshot::Sender<()>>,
    /// The connection, while it is up. Dropped when the link goes, which ends its acquired
    /// sockets: BlueZ closes them with the link, so a central reads what was sent before and
    /// then the end, and its writes fail.
    link: Option<tokio::sync::watch::Sender<()>>,
    /// Centrals subscribed through StartNotify.
    notify_subscribers: usize,
    notify_socket: Option<Arc<UnixDatagram>>,
    write_acquired: bool,
    /// Manufacturer data last published, to emit changes only.
    advertised: Vec<u8>,
    /// The GATT service's handle while connected (and after): `None` where the factory put it.
    gatt_service: Option<u16>,
    /// Where the next connection exports it (`MoveGattHandles`, as a firmware update would).
    gatt_service_next: Option<u16>,
    /// BlueZ's copy of the lock's GATT table no longer matches the lock (`SetStaleGattCache`):
    /// reading the info characteristic reads whatever sits at its old handle now, until the
    /// device is removed.
    stale_gatt_cache: bool,
}

/// One emulated lock on the fake bus.
pub struct EmulatedLock {
    host: Arc<HostedLock>,
    lock_id: LockId,
    address: String,
    path: OwnedObjectPath,
    spec: LockSpec,
    radio: Mutex<RadioState>,
    emulator: Weak<Shared>,
    driver: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for EmulatedLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatedLock").field("lock_id", &self.lock_id).field("address", &self.address).finish()
    }
}

impl EmulatedLock {
    /// The hosted firmware.
    pub fn host(&self) -> &Arc<HostedLock> {
        &self.host
    }

    fn radio(&self) -> std::sync::MutexGuard<'_, RadioState> {
        self.radio.lock().expect("radio state poisoned")
    }

    fn manufacturer_data(&self) -> Vec<u8> {
        self.host.inspect(|fw, _| fw.advertisement().encode().to_vec())
    }
}

/// What the emulator counts, for tests that check the gateway's behaviour from the lock side.
#[derive(Debug, Default)]
struct Counters {
    connects: AtomicUsize,
    active: AtomicUsize,
    peak_active: AtomicUsize,
}

/// State shared by every object the emulator serves.
struct Shared {
    conn: Connection,
    locks: Mutex<BTreeMap<LockId, Arc<EmulatedLock>>>,
    /// Discovery sessions by client (unique bus name), with each client's UUID filter.
    discovery: Mutex<HashMap<String, Vec<String>>>,
    filters: Mutex<HashMap<String, Vec<String>>>,
    powered: Mutex<bool>,
    state_dir: Option<PathBuf>,
    counters: Counters,
    self_ref: Weak<Shared>,
}

impl Shared {
    fn lock(&self, id: &str) -> zbus::fdo::Result<Arc<EmulatedLock>> {
        let lock_id = LockId::parse(id).map_err(|e| zbus::fdo::Error::InvalidArgs(e.to_string()))?;
        self.locks
            .lock()
            .expect("lock table poisoned")
            .get(&lock_id)
            .cloned()
            .ok_or_else(|| zbus::fdo::Error::InvalidArgs(format!("no emulated lock {id}")))
    }

    fn lock_by_path(&self, path: &str) -> Option<Arc<EmulatedLock>> {
        self.locks.lock().expect("lock table poisoned").values().find(|l| l.path.as_str() == path).cloned()
    }

    fn is_discovering(&self) -> bool {
        !self.discovery.lock().expect("discovery poisoned").is_empty()
    }

    fn is_powered(&self) -> bool {
        *self.powered.lock().expect("power poisoned")
    }

    /// Whether a lock passes the union of the active discovery filters.
    fn passes_filters(&self, _lock: &EmulatedLock) -> bool {
        let service = crate::protocol::gatt::uuid_string(crate::protocol::gatt::SERVICE_UUID);
        let discovery = self.discovery.lock().expect("discovery poisoned");
        discovery.values().any(|uuids| uuids.is_empty() || uuids.iter().any(|u| u.eq_ignore_ascii_case(&service)))
    }

    /// Adds a lock: boots its firmware (from its state file when there is one) and starts its
    /// driver. It becomes visible to centrals at the next discovery.
    async fn add_lock(self: &Arc<Self>, spec: LockSpec) -> Result<Arc<EmulatedLock>, EmulatorError> {
        if !(crate::protocol::fragment::MIN_MTU..=crate::protocol::fragment::MAX_MTU).contains(&spec.mtu) {
            return Err(EmulatorError::Spec(format!("MTU {} outside 23..=517", spec.mtu)));
        }
        if !(1..=5).contains(&spec.eatt_bearers) {
            return Err(EmulatorError::Spec(format!("{} EATT bearers: bluetoothd allows 1 to 5", spec.eatt_bearers)));
        }
        let lock_id = if spec.lock_id.is_empty() {
            let mut id = [0u8; 8];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut id);
            LockId(id)
        } else {
            LockId::parse(&spec.lock_id).map_err(|e| EmulatorError::Spec(e.to_string()))?
        };
        if self.locks.lock().expect("lock table poisoned").contains_key(&lock_id) {
            return Err(EmulatorError::Spec(format!("lock {lock_id} exists already")));
        }
        let flash = self.state_dir.as_ref().map(|d| d.join(format!("{lock_id}.json")));
        let state = match &flash {
            Some(path) if path.exists() => HostedLock::load(path)?,
            _ => {
                let caps = Capabilities { unlatch: spec.unlatch, keypad: spec.keypad, door_sensor: spec.door_sensor };
                let mechanics =
                    Mechanics { motor_ms: spec.motor_ms, auto_lock_ms: spec.auto_lock_ms, ..Mechanics::default() };
                PersistentState::factory_new(lock_id, caps, mechanics, &mut rand_core::OsRng)
            }
        };
        if let Some(dir) = &self.state_dir {
            let spec_file = dir.join(format!("{lock_id}.spec.json"));
            let json = serde_json::to_vec_pretty(&LockSpec { lock_id: lock_id.to_string(), ..spec.clone() })
                .expect("spec serialises");
            super::host::write_private(&spec_file, &json)
                .map_err(|source| FlashError::Io { path: spec_file.clone(), source })?;
        }
        let address = address_for(lock_id);
        let lock = Arc::new(EmulatedLock {
            host: HostedLock::new(state, flash),
            lock_id,
            path: device_path(&address),
            address,
            radio: Mutex::new(RadioState { in_range: spec.in_range, rssi: spec.rssi, ..RadioState::default() }),
            spec,
            emulator: self.self_ref.clone(),
            driver: Mutex::new(None),
        });
        let radio = LockRadio { lock: Arc::downgrade(&lock) };
        let task = tokio::spawn(lock.host.clone().run(radio));
        *lock.driver.lock().expect("driver poisoned") = Some(task);
        self.locks.lock().expect("lock table poisoned").insert(lock_id, lock.clone());
        if self.is_discovering() {
            self.advertise(&lock).await;
        }
        Ok(lock)
    }

    async fn remove_lock(&self, lock: &Arc<EmulatedLock>) {
        self.disconnect(lock).await;
        if let Some(task) = lock.driver.lock().expect("driver poisoned").take() {
            task.abort();
        }
        if let Err(e) = lock.host.save() {
            tracing::warn!(error = %e, "could not save a removed lock's state");
        }
        self.locks.lock().expect("lock table poisoned").remove(&lock.lock_id);
        self.forget_device(lock).await;
    }

    /// Removes a lock's Device1 object (InterfacesRemoved), as BlueZ drops a device it no
    /// longer hears; the next discovery that sees the lock exports it again.
    async fn forget_device(&self, lock: &Arc<EmulatedLock>) {
        let exported = {
            let mut r = lock.radio();
            r.advertised.clear();
            // What BlueZ cached of the device goes with it.
            r.stale_gatt_cache = false;
            std::mem::take(&mut r.exported)
        };
        if exported {
            let _ = self.conn.object_server().remove::<device::Device, _>(lock.path.as_str()).await;
        }
    }

    /// Makes a lock seen by an ongoing discovery: exports its Device1 object the first time,
    /// refreshes RSSI and manufacturer data afterwards.
    async fn advertise(&self, lock: &Arc<EmulatedLock>) {
        if !self.is_powered() || !self.passes_filters(lock) {
            return;
        }
        let data = lock.manufacturer_data();
        let (in_range, newly, changed) = {
            let mut r = lock.radio();
            let newly = r.in_range && !r.exported;
            let changed = r.in_range && r.advertised != data;
            if r.in_range {
                r.exported = true;
                r.advertised = data;
            }
            (r.in_range, newly, changed)
        };
        if !in_range {
            return;
        }
        let server = self.conn.object_server();
        if newly {
            let dev = device::Device { lock: lock.clone() };
            if let Err(e) = server.at(lock.path.as_str(), dev).await {
                tracing::warn!(error = %e, "could not export a device");
            }
            return;
        }
        if let Ok(iface) = server.interface::<_, device::Device>(lock.path.as_str()).await {
            let emitter = iface.signal_emitter();
            let dev = iface.get().await;
            // Every advertisement, even at the same strength: under a discovery filter BlueZ
            // signals RSSI with no change threshold (`device_set_rssi_with_delta(.., 0)`).
            let _ = dev.r_s_s_i_changed(emitter).await;
            if changed {
                let _ = dev.manufacturer_data_changed(emitter).await;
            }
        }
    }

    /// Drops a lock's link from the lock's side (out of range, firmware decision, test).
    async fn disconnect(&self, lock: &Arc<EmulatedLock>) {
        let was_connected = {
            let mut r = lock.radio();
            if let Some(cancel) = r.connecting.take() {
                let _ = cancel.send(());
            }
            let was = std::mem::take(&mut r.connected);
            r.link = None;
            r.notify_subscribers = 0;
            r.notify_socket = None;
            r.write_acquired = false;
            was
        };
        if !was_connected {
            return;
        }
        self.counters.active.fetch_sub(1, Ordering::AcqRel);
        lock.host.input(|fw, now| fw.disconnect(now));
        let server = self.conn.object_server();
        if let Ok(iface) = server.interface::<_, device::Device>(lock.path.as_str()).await {
            let emitter = iface.signal_emitter();
            let dev = iface.get().await;
            let _ = dev.services_resolved_changed(emitter).await;
            let _ = dev.connected_changed(emitter).await;
        }
        gatt::unexport(&server.clone(), lock).await;
    }
}

/// The radio a hosted lock sends through: notifications go to the acquired socket or out as
/// `PropertiesChanged(Value)`; a disconnect drops the link.
struct LockRadio {
    lock: Weak<EmulatedLock>,
}

impl Radio for LockRadio {
    async fn notify(&self, fragment: Vec<u8>) {
        let Some(lock) = self.lock.upgrade() else { return };
        let (socket, subscribed) = {
            let r = lock.radio();
            (r.notify_socket.clone(), r.connected && r.notify_subscribers > 0)
        };
        if let Some(socket) = socket {
            // A full or closed socket means the central is gone: the link is lost.
            if socket.send(&fragment).await.is_err()
                && let Some(shared) = lock.emulator.upgrade()
            {
                shared.disconnect(&lock).await;
            }
        } else if subscribed {
            gatt::notify_value(&lock, fragment).await;
        }
    }

    async fn notify_burst(&self, mut fragments: Vec<Vec<u8>>) {
        if self.lock.upgrade().is_some_and(|lock| lock.spec.eatt_bearers > 1) {
            eatt_order(&mut fragments);
        }
        for fragment in fragments {
            self.notify(fragment).await;
        }
    }

    async fn disconnect(&self) {
        let Some(lock) = self.lock.upgrade() else { return };
        if let Some(shared) = lock.emulator.upgrade() {
            shared.disconnect(&lock).await;
        }
    }
}

/// The order in which fragments queued together arrive over several EATT bearers, as
/// bluetoothd 5.66 sends them: each one free takes the next, so neighbours may swap. The
/// emulator swaps every pair, which keeps each fragment within one place of where it was sent.
pub(super) fn eatt_order(fragments: &mut [Vec<u8>]) {
    for pair in fragments.chunks_exact_mut(2) {
        pair.swap(0, 1);
    }
}

/// A running emulator: the fake `org.bluez` and the control interface on one connection.
pub struct BluezEmulator {
    shared: Arc<Shared>,
    ticker: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for BluezEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BluezEmulator").finish_non_exhaustive()
    }
}

/// How often an ongoing discovery sees the locks in range advertise.
const ADVERTISING_INTERVAL: std::time::Duration = std::time::Duration::from_millis(300);

impl BluezEmulator {
    /// Serves on the bus at `address` (a D-Bus address string), owning `org.bluez` and
    /// [`CONTROL_NAME`]; lock state is kept in `state_dir` when given.
    pub async fn serve(address: &str, state_dir: Option<PathBuf>) -> Result<Self, EmulatorError> {
        if let Some(dir) = &state_dir {
            std::fs::create_dir_all(dir).map_err(|source| EmulatorError::StateDir { path: dir.clone(), source })?;
        }
        let conn = zbus::connection::Builder::address(address).build().await?;
        let shared = Arc::new_cyclic(|me| Shared {
            conn: conn.clone(),
            locks: Mutex::new(BTreeMap::new()),
            discovery: Mutex::new(HashMap::new()),
            filters: Mutex::new(HashMap::new()),
            powered: Mutex::new(true),
            state_dir,
            counters: Counters::default(),
            self_ref: me.clone(),
        });
        let server = conn.object_server();
        server.at("/", zbus::fdo::ObjectManager).await?;
        server.at(CONTROL_PATH, control::Control { shared: shared.clone() }).await?;
        conn.request_name("org.bluez").await?;
        // As bluetoothd does: the name first, then the adapter, announced with InterfacesAdded
        // to whoever already listens to org.bluez (a gateway that saw BlueZ restart).
        server.at(ADAPTER_PATH, adapter::Adapter { shared: shared.clone() }).await?;
        conn.request_name(CONTROL_NAME).await?;
        let weak = Arc::downgrade(&shared);
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(ADVERTISING_INTERVAL);
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                if shared.is_discovering() {
                    let locks: Vec<_> = shared.locks.lock().expect("lock table poisoned").values().cloned().collect();
                    for lock in locks {
                        shared.advertise(&lock).await;
                    }
                }
            }
        });
        Ok(BluezEmulator { shared, ticker })
    }

    /// Restores every lock found in the state directory.
    pub async fn restore(&self) -> Result<Vec<LockId>, EmulatorError> {
        let Some(dir) = self.shared.state_dir.clone() else {
            return Ok(Vec::new());
        };
        let entries =
            std::fs::read_dir(&dir).map_err(|source| EmulatorError::StateDir { path: dir.clone(), source })?;
        let mut restored = Vec::new();
        for entry in entries {
            let path = entry.map_err(|source| EmulatorError::StateDir { path: dir.clone(), source })?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(id) = name.strip_suffix(".spec.json") else {
                continue;
            };
            let Ok(lock_id) = LockId::parse(id) else { continue };
            if self.shared.locks.lock().expect("lock table poisoned").contains_key(&lock_id) {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(|source| FlashError::Io { path: path.clone(), source })?;
            let spec: LockSpec =
                serde_json::from_slice(&bytes).map_err(|source| FlashError::Corrupt { path: path.clone(), source })?;
            self.shared.add_lock(spec).await?;
            restored.push(lock_id);
        }
        Ok(restored)
    }

    /// Adds a lock.
    pub async fn add_lock(&self, spec: LockSpec) -> Result<LockId, EmulatorError> {
        Ok(self.shared.add_lock(spec).await?.lock_id)
    }

    /// The ids of all locks served.
    pub fn lock_ids(&self) -> Vec<LockId> {
        self.shared.locks.lock().expect("lock table poisoned").keys().copied().collect()
    }

    /// Saves every lock's state and stops serving.
    pub async fn shutdown(self) {
        self.ticker.abort();
        let locks: Vec<_> = self.shared.locks.lock().expect("lock table poisoned").values().cloned().collect();
        for lock in locks {
            self.shared.remove_lock(&lock).await;
        }
        let _ = self.shared.conn.release_name("org.bluez").await;
    }
}

/// Makes a SOCK_SEQPACKET pair, as BlueZ does for AcquireWrite / AcquireNotify: our end for
/// tokio, theirs to pass over D-Bus.
fn seqpacket_pair() -> std::io::Result<(UnixDatagram, OwnedFd)> {
    let (ours, theirs) = socket2::Socket::pair(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None)?;
    ours.set_nonblocking(true)?;
    let ours = UnixDatagram::from_std(std::os::unix::net::UnixDatagram::from(OwnedFd::from(ours)))?;
    Ok((ours, OwnedFd::from(theirs)))
}
