//! One emulated lock as a real BLE peripheral, through bluer's GATT server and LE advertising.
//!
//! This lets a second board (a Raspberry Pi with the adapter free) stand in for a lock in
//! front of a gateway with real radios, and it is what the real-BlueZ test tier runs in its
//! virtual machine. It needs BlueZ and a Bluetooth adapter; `docs/emulator.md` says how to
//! use it.
//!
//! What real bluetoothd taught this module (each was a failure under it, none under our own
//! `org.bluez`; `docs/emulator.md` lists them):
//! - bluer answers `StartNotify` only when the notify callback's future ends, so the callback
//!   hands the subscription to the one task that sends notifications and returns at once.
//!   bluetoothd subscribes once for all centrals, possibly after a central's first write, and
//!   bluer stops the old subscription when a new one comes: fragments wait in one ordered
//!   queue for a live subscription, and only a subscription stopped without a successor ends
//!   the lock's session.
//! - An advertisement replaced while a central is connected comes back non-connectable after
//!   the disconnect: the advertisement changes only while nobody is connected.
//! - bluetoothd restarts, and adapters go and come back: the lock then registers its GATT
//!   application and advertisement again, with its state (pairing, counters) untouched. A new
//!   bluetoothd answers on the same object paths, so the lock watches who owns `org.bluez`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bluer::Address;
use bluer::adv::{Advertisement, AdvertisementHandle};
use bluer::gatt::local::{
    Application, ApplicationHandle, Characteristic, CharacteristicNotifier, CharacteristicNotify,
    CharacteristicNotifyMethod, CharacteristicRead, CharacteristicWrite, CharacteristicWriteMethod, ReqError, Service,
};
use futures::{FutureExt, StreamExt};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, watch};

use super::host::{HostedLock, Radio};
use super::{Mechanics, PersistentState};
use crate::protocol::gatt::{
    COMPANY_ID, Capabilities, INFO_CHAR_UUID, NOTIFY_CHAR_UUID, SERVICE_UUID, WRITE_CHAR_UUID,
};
use crate::protocol::ids::LockId;

/// How often the lock checks that BlueZ still answers and whether its advertisement is due
/// for a change.
const TICK: Duration = Duration::from_millis(250);

/// How long the lock waits before registering again after BlueZ or its adapter went.
const RETRY: Duration = Duration::from_millis(500);

/// Who the lock talks to. `link` numbers the central's sessions: it moves on when a new one
/// starts (the first write after none) and when BlueZ says the central went, and fragments are
/// delivered only within the session they were sent in.
struct Central {
    address: Mutex<Option<Address>>,
    link: watch::Sender<u64>,
}

impl Central {
    fn new() -> Arc<Self> {
        Arc::new(Central { address: Mutex::new(None), link: watch::Sender::new(0) })
    }

    /// A session ended or began: what is still queued for the old one is dropped.
    fn next_link(&self) {
        self.link.send_modify(|n| *n += 1);
    }
}

/// The most fragments queued for the central: a few frames' worth. A central that falls this
/// far behind is gone; its session fails and the next one starts clean.
const MAX_QUEUED: usize = 64;

struct PeripheralRadio {
    central: Arc<Central>,
    adapter: Arc<Mutex<Option<bluer::Adapter>>>,
    fragments: mpsc::Sender<(u64, Vec<u8>)>,
}

impl Radio for PeripheralRadio {
    async fn notify(&self, fragment: Vec<u8>) {
        let link = *self.central.link.borrow();
        if self.fragments.try_send((link, fragment)).is_err() {
            tracing::warn!("the central reads no notifications: one dropped");
        }
    }

    async fn disconnect(&self) {
        let address = self.central.address.lock().expect("central poisoned").take();
        self.central.next_link();
        let adapter = self.adapter.lock().expect("adapter poisoned").clone();
        if let Some(device) = address.zip(adapter).and_then(|(a, adapter)| adapter.device(a).ok()) {
            let _ = device.disconnect().await;
        }
    }
}

/// Runs the peripheral until interrupted (Ctrl-C or SIGTERM). The lock's flash lives in
/// `state_dir`. Standard input takes the physical world, a line at a time: `turn` (the thumb
/// turn), `door open` / `door closed`, `keypad CODE`, `pairing` (the pairing button), `wake`
/// (the wake button many locks have: it starts advertising anew, which scanners hear at once).
///
/// `refresh` registers the advertisement anew that often while no central is connected: an
/// emulated controller (btvirt) reports an advertisement to scanners only when it starts.
/// `motor_ms` is the motor time of a lock made now (a lock read from its flash keeps its own).
pub async fn run(
    adapter_name: Option<&str>,
    state_dir: &Path,
    refresh: Option<Duration>,
    motor_ms: u64,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let flash = state_dir.join("peripheral.json");
    let state = if flash.exists() {
        HostedLock::load(&flash)?
    } else {
        let mut id = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut id);
        let caps = Capabilities { unlatch: true, keypad: true, door_sensor: true };
        let mechanics = Mechanics { motor_ms, ..Mechanics::default() };
        PersistentState::factory_new(LockId(id), caps, mechanics, &mut rand_core::OsRng)
    };
    let (lock_id, setup_code) = (state.identity.lock_id, state.identity.setup_code.expose().to_owned());
    crate::errln!("lock {lock_id} — setup code {setup_code} (pairing mode: {})", state.pairing_mode);
    let lock = HostedLock::new(state, Some(flash));

    let central = Central::new();
    let adapter_slot = Arc::new(Mutex::new(None));
    let (fragments_tx, fragments) = mpsc::channel(MAX_QUEUED);
    let (subscriptions_tx, subscriptions) = mpsc::unbounded_channel();
    let radio = PeripheralRadio { central: central.clone(), adapter: adapter_slot.clone(), fragments: fragments_tx };
    let driver = tokio::spawn(lock.clone().run(radio));
    let forwarder = tokio::spawn(forward_notifications(lock.clone(), central.clone(), fragments, subscriptions));
    let wake = Arc::new(tokio::sync::Notify::new());
    let physical = tokio::spawn(physical_world(lock.clone(), wake.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let mut stop = std::pin::pin!(stop);
    loop {
        let served = serve(&lock, &central, &subscriptions_tx, &adapter_slot, &wake, refresh, adapter_name);
        tokio::select! {
            () = &mut stop => break,
            e = served => {
                // BlueZ went (restarted, or the adapter was removed): register again once it
                // is back. The lock's state is untouched meanwhile.
                tracing::warn!(error = %e, "lost BlueZ or the adapter: registering again");
                *adapter_slot.lock().expect("adapter poisoned") = None;
                tokio::select! {
                    () = &mut stop => break,
                    () = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
    physical.abort();
    forwarder.abort();
    driver.abort();
    lock.save()?;
    Ok(())
}

/// Registers the lock with BlueZ and keeps its advertisement current; returns why it stopped
/// (BlueZ or the adapter gone). Once registered it prints
/// `READY lock=ID setup=CODE adapter=NAME address=ADDRESS` on standard output (again after
/// each registration anew), then `STATE locked` (or `unlocking`, `unlocked`, `locking`,
/// `jammed`) whenever the bolt moves, and `LINK central=ADDRESS mtu=N` when a central starts a
/// session: what a test watching the lock from outside reads.
async fn serve(
    lock: &Arc<HostedLock>,
    central: &Arc<Central>,
    subscriptions: &mpsc::UnboundedSender<CharacteristicNotifier>,
    slot: &Arc<Mutex<Option<bluer::Adapter>>>,
    wake: &tokio::sync::Notify,
    refresh: Option<Duration>,
    adapter_name: Option<&str>,
) -> anyhow::Error {
    // Who serves org.bluez, watched from before we register: a bluetoothd restarted under us
    // answers on the same paths, but knows nothing of our GATT application, so a new owner is
    // a reason to register again.
    let mut owner_changes = match bluez_owner_changes().await {
        Ok(changes) => changes,
        Err(e) => return e,
    };
    let (session, adapter, _app) = match register(lock, central, subscriptions, adapter_name).await {
        Ok(registered) => registered,
        Err(e) => return e,
    };
    // An adapter removed and added back (a USB dongle replugged, btvirt restarted) has the
    // same name and path but none of our registrations.
    let mut adapters = match session.events().await {
        Ok(events) => Box::pin(events),
        Err(e) => return e.into(),
    };
    *slot.lock().expect("adapter poisoned") = Some(adapter.clone());
    let mut advertised: Option<(Vec<u8>, AdvertisementHandle)> = None;
    let mut tick = tokio::time::interval(TICK);
    let mut bolt = None;
    let mut registered = tokio::time::Instant::now();
    loop {
        // Woken (the wake button), the advertisement is registered anew: its start is news
        // to every scanner in range.
        let woken = tokio::select! {
            now = tick.tick() => refresh.is_some_and(|every| now.duration_since(registered) >= every),
            () = wake.notified() => true,
            _ = owner_changes.next() => return anyhow::anyhow!("bluetoothd restarted or went away"),
            event = adapters.next() => match event {
                Some(bluer::SessionEvent::AdapterRemoved(name)) if name == adapter.name() => {
                    return anyhow::anyhow!("adapter {name} removed");
                }
                Some(_) => continue,
                None => return anyhow::anyhow!("BlueZ's event stream ended"),
            },
        };
        let state = lock.inspect(|fw, now| fw.status(now).state);
        if advertised.is_some() && bolt != Some(state) {
            let _ = crate::outln!("STATE {}", format!("{state:?}").to_lowercase());
        }
        bolt = Some(state);
        // A question BlueZ must answer: an error means it or the adapter went away.
        match adapter.is_powered().await {
            Ok(true) => {}
            Ok(false) => {
                // Powered off under us: the registrations stay with bluetoothd, the
                // advertisement is sent again once it is back on.
                continue;
            }
            Err(e) => return e.into(),
        }
        let data = lock.inspect(|fw, _| fw.advertisement().encode().to_vec());
        if !woken && advertised.as_ref().is_some_and(|(d, _)| *d == data) {
            continue;
        }
        // An advertisement replaced while a central is connected comes back non-connectable
        // after the disconnect: change it only while nobody is connected.
        if advertised.is_some() && central_connected(&adapter).await {
            continue;
        }
        // BlueZ allows few advertisement instances: release the old one first.
        let first = advertised.take().is_none();
        let handle = match adapter.advertise(advertisement(data.clone())).await {
            Ok(handle) => handle,
            Err(e) => return anyhow::Error::new(e).context("registering the advertisement"),
        };
        advertised = Some((data, handle));
        registered = tokio::time::Instant::now();
        if first {
            let id = lock.inspect(|fw, _| fw.lock_id());
            let setup = lock.inspect(|fw, _| fw.persistent().identity.setup_code.expose().to_owned());
            let address = adapter.address().await.map(|a| a.to_string()).unwrap_or_default();
            let _ = crate::outln!("READY lock={id} setup={setup} adapter={} address={address}", adapter.name());
            bolt = None;
        } else {
            tracing::info!(adapter = adapter.name(), "advertising");
        }
    }
}

/// BlueZ's well-known name on the system bus.
const BLUEZ_NAME: &str = "org.bluez";

/// The bus daemon's word each time [`BLUEZ_NAME`] changes owner (bluetoothd gone, or a new
/// one started): a signal, where asking the owner at every tick cost a round trip each.
async fn bluez_owner_changes() -> Result<zbus::fdo::NameOwnerChangedStream, anyhow::Error> {
    let bus = zbus::Connection::system().await?;
    let dbus = zbus::fdo::DBusProxy::new(&bus).await?;
    Ok(dbus.receive_name_owner_changed_with_args(&[(0, BLUEZ_NAME)]).await?)
}

/// Opens a BlueZ session, powers the adapter and registers the GATT application.
async fn register(
    lock: &Arc<HostedLock>,
    central: &Arc<Central>,
    subscriptions: &mpsc::UnboundedSender<CharacteristicNotifier>,
    adapter_name: Option<&str>,
) -> Result<(bluer::Session, bluer::Adapter, ApplicationHandle), anyhow::Error> {
    let session = bluer::Session::new().await?;
    let adapter = match adapter_name {
        Some(name) => session.adapter(name)?,
        None => session.default_adapter().await?,
    };
    adapter.set_powered(true).await?;
    let app = adapter.serve_gatt_application(application(lock, central, subscriptions)).await?;
    Ok((session, adapter, app))
}

/// Whether a central is connected to this adapter, as BlueZ sees it.
async fn central_connected(adapter: &bluer::Adapter) -> bool {
    let Ok(addresses) = adapter.device_addresses().await else { return false };
    for address in addresses {
        if let Ok(device) = adapter.device(address)
            && device.is_connected().await.unwrap_or(false)
        {
            return true;
        }
    }
    false
}

/// The LE advertisement: the LHP/1 service UUID and the 6-byte record (`docs/protocol.md`);
/// the name goes in the scan response.
fn advertisement(record: Vec<u8>) -> Advertisement {
    Advertisement {
        service_uuids: BTreeSet::from([bluer::Uuid::from_u128(SERVICE_UUID)]),
        manufacturer_data: BTreeMap::from([(COMPANY_ID, record)]),
        discoverable: Some(true),
        local_name: Some("LHP lock".into()),
        ..Default::default()
    }
}

/// The lock's GATT service: write, notify and info characteristics.
fn application(
    lock: &Arc<HostedLock>,
    central: &Arc<Central>,
    subscriptions: &mpsc::UnboundedSender<CharacteristicNotifier>,
) -> Application {
    let (write_lock, write_central) = (lock.clone(), central.clone());
    let subscriptions = subscriptions.clone();
    let info_lock = lock.clone();
    Application {
        services: vec![Service {
            uuid: bluer::Uuid::from_u128(SERVICE_UUID),
            primary: true,
            characteristics: vec![
                Characteristic {
                    uuid: bluer::Uuid::from_u128(WRITE_CHAR_UUID),
                    write: Some(CharacteristicWrite {
                        write: true,
                        write_without_response: true,
                        method: CharacteristicWriteMethod::Fun(Box::new(move |value, req| {
                            let lock = write_lock.clone();
                            let central = write_central.clone();
                            async move {
                                let new_central = {
                                    let mut address = central.address.lock().expect("central poisoned");
                                    address.replace(req.device_address) != Some(req.device_address)
                                };
                                let (connected, reordered) = lock.input(|fw, now| {
                                    let connected = new_central || !fw.is_connected();
                                    let out_of_order = if connected { 0 } else { fw.fragments_out_of_order() };
                                    if connected {
                                        // A new session: what is queued belonged to the last
                                        // one. bluetoothd sends a notification to a central
                                        // that supports it (BlueZ does) as a Multiple Handle
                                        // Value Notification: 2 bytes of it are a length, and
                                        // a value of MTU - 3 bytes loses its last two.
                                        central.next_link();
                                        fw.connect_with_fragments(usize::from(req.mtu).saturating_sub(5), now);
                                    }
                                    fw.write(&value, now);
                                    (connected, fw.fragments_out_of_order() > out_of_order)
                                });
                                if connected {
                                    let _ = crate::outln!("LINK central={} mtu={}", req.device_address, req.mtu);
                                }
                                if reordered {
                                    // Several EATT bearers at work (docs/protocol.md §3).
                                    let _ = crate::outln!("REORDERED central={}", req.device_address);
                                }
                                Ok(())
                            }
                            .boxed()
                        })),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Characteristic {
                    uuid: bluer::Uuid::from_u128(NOTIFY_CHAR_UUID),
                    notify: Some(CharacteristicNotify {
                        notify: true,
                        method: CharacteristicNotifyMethod::Fun(Box::new(move |notifier| {
                            let _ = subscriptions.send(notifier);
                            // bluer answers StartNotify when this future ends: at once.
                            async {}.boxed()
                        })),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Characteristic {
                    uuid: bluer::Uuid::from_u128(INFO_CHAR_UUID),
                    read: Some(CharacteristicRead {
                        read: true,
                        fun: Box::new(move |_req| {
                            let info = info_lock.inspect(|fw, _| fw.info().encode().to_vec());
                            async move { Ok::<_, ReqError>(info) }.boxed()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Delivers the firmware's fragments, in order, through the current notification
/// subscription. bluetoothd subscribes once for all centrals (`StartNotify` when the first
/// enables notifications, `StopNotify` when the last leaves), and its `StartNotify` may arrive
/// after the central's first write (bluetoothd answers the CCCD write before asking us), so a
/// fragment with no live subscription waits for the next one rather than being lost; a
/// subscription bluer replaced fails its send and the fragment goes through the newer one.
/// Fragments of a session that has ended are dropped.
async fn forward_notifications(
    lock: Arc<HostedLock>,
    central: Arc<Central>,
    mut fragments: mpsc::Receiver<(u64, Vec<u8>)>,
    mut subscriptions: mpsc::UnboundedReceiver<CharacteristicNotifier>,
) {
    let mut link = central.link.subscribe();
    let mut current: Option<CharacteristicNotifier> = None;
    let mut held: Option<(u64, Vec<u8>)> = None;
    loop {
        if held.as_ref().is_some_and(|(n, _)| *n != *link.borrow()) {
            held = None;
        }
        if let (Some(notifier), Some((_, fragment))) = (current.as_mut(), held.as_ref()) {
            if notifier.notify(fragment.clone()).await.is_ok() {
                tracing::debug!(len = fragment.len(), head = fragment.first().copied(), "notified");
                held = None;
            } else {
                tracing::debug!("the subscription ended: the fragment waits for the next");
                current = None;
            }
            continue;
        }
        let stopped = current.as_ref().map(CharacteristicNotifier::stopped);
        let stopped = async {
            match stopped {
                Some(stopped) => stopped.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            notifier = subscriptions.recv() => match notifier {
                Some(notifier) => current = Some(notifier),
                None => return,
            },
            fragment = fragments.recv(), if held.is_none() => match fragment {
                Some(fragment) => held = Some(fragment),
                None => return,
            },
            () = stopped => {
                current = None;
                // bluer stops a subscription when bluetoothd starts a new one (and hands us
                // the new one at once, without yielding); else bluetoothd stopped it because
                // the last central left: the lock's end of the session ends with it.
                tokio::task::yield_now().await;
                match subscriptions.try_recv() {
                    Ok(notifier) => current = Some(notifier),
                    Err(_) => {
                        tracing::debug!("notifications stopped: the central left");
                        lock.input(|fw, now| fw.disconnect(now));
                        central.next_link();
                    }
                }
            }
            changed = link.changed() => if changed.is_err() { return },
        }
    }
}

/// Reads the physical world from standard input until it closes (see [`run`]).
async fn physical_world(lock: Arc<HostedLock>, wake: Arc<tokio::sync::Notify>) {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["turn"] => lock.input(|fw, now| fw.turn_knob(now)),
            ["door", "open"] => lock.input(|fw, now| fw.set_door(true, now)),
            ["door", "closed"] => lock.input(|fw, now| fw.set_door(false, now)),
            ["keypad", code] => {
                let opened = lock.input(|fw, now| fw.enter_keypad_code(code, now));
                tracing::info!(opened, "keypad code entered");
            }
            ["pairing"] => lock.input(|fw, _| fw.press_pairing_button()),
            ["wake"] => wake.notify_one(),
            [] => {}
            _ => tracing::warn!(line, "unknown input: turn, door open, door closed, keypad CODE, pairing or wake"),
        }
        let state = lock.inspect(|fw, now| fw.status(now).state);
        tracing::info!(?state, "lock state");
    }
}
