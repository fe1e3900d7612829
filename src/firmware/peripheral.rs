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
//!   hands the subscription to a task of its own and returns at once; a subscription ends on
//!   `StopNotify` or when a newer one replaces it, and an old one never clears a newer one.
//! - An advertisement replaced while a central is connected comes back non-connectable after
//!   the disconnect: the advertisement changes only while nobody is connected.
//! - bluetoothd restarts, and adapters go and come back: the lock then registers its GATT
//!   application and advertisement again, with its state (pairing, counters) untouched.

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
use futures::FutureExt;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

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

/// The radio side of the peripheral: who is connected, and where notifications go.
#[derive(Default)]
struct Central {
    address: Option<Address>,
    /// The current notification subscription: its number and where its fragments go.
    notifications: Option<(u64, mpsc::Sender<Vec<u8>>)>,
    /// Subscriptions numbered so far.
    subscriptions: u64,
    /// Fragments the firmware sent while nobody was subscribed, for the subscription that
    /// comes: bluetoothd answers the central's CCCD write before our `StartNotify` call has
    /// arrived, so the central may write (and the lock answer) first. Cleared when a new
    /// connection starts; bounded.
    pending: Vec<Vec<u8>>,
}

/// The most fragments kept for a subscription still to come: a few frames' worth.
const MAX_PENDING: usize = 64;

struct PeripheralRadio {
    central: Arc<Mutex<Central>>,
    adapter: Arc<Mutex<Option<bluer::Adapter>>>,
}

impl Radio for PeripheralRadio {
    async fn notify(&self, fragment: Vec<u8>) {
        let tx = {
            let mut c = self.central.lock().expect("central poisoned");
            match c.notifications.as_ref() {
                Some((_, tx)) => tx.clone(),
                None => {
                    if c.pending.len() < MAX_PENDING {
                        c.pending.push(fragment);
                    }
                    return;
                }
            }
        };
        let _ = tx.send(fragment).await;
    }

    async fn disconnect(&self) {
        let address = {
            let mut c = self.central.lock().expect("central poisoned");
            c.notifications = None;
            c.address.take()
        };
        let adapter = self.adapter.lock().expect("adapter poisoned").clone();
        if let Some(device) = address.zip(adapter).and_then(|(a, adapter)| adapter.device(a).ok()) {
            let _ = device.disconnect().await;
        }
    }
}

/// Runs the peripheral until interrupted (Ctrl-C or SIGTERM). The lock's flash lives in
/// `state_dir`. Standard input takes the physical world, a line at a time: `turn` (the thumb
/// turn), `door open` / `door closed`, `keypad CODE`, `pairing` (the pairing button).
pub async fn run(adapter_name: Option<&str>, state_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let flash = state_dir.join("peripheral.json");
    let state = if flash.exists() {
        HostedLock::load(&flash)?
    } else {
        let mut id = [0u8; 8];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut id);
        let caps = Capabilities { unlatch: true, keypad: true, door_sensor: true };
        PersistentState::factory_new(LockId(id), caps, Mechanics::default(), &mut rand_core::OsRng)
    };
    let (lock_id, setup_code) = (state.identity.lock_id, state.identity.setup_code.expose().to_owned());
    crate::errln!("lock {lock_id} — setup code {setup_code} (pairing mode: {})", state.pairing_mode);
    let lock = HostedLock::new(state, Some(flash));

    let central = Arc::new(Mutex::new(Central::default()));
    let adapter_slot = Arc::new(Mutex::new(None));
    let radio = PeripheralRadio { central: central.clone(), adapter: adapter_slot.clone() };
    let driver = tokio::spawn(lock.clone().run(radio));
    let physical = tokio::spawn(physical_world(lock.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let mut stop = std::pin::pin!(stop);
    loop {
        let served = serve(&lock, &central, &adapter_slot, adapter_name);
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
    central: &Arc<Mutex<Central>>,
    slot: &Arc<Mutex<Option<bluer::Adapter>>>,
    adapter_name: Option<&str>,
) -> anyhow::Error {
    let (adapter, _app) = match register(lock, central, adapter_name).await {
        Ok(registered) => registered,
        Err(e) => return e,
    };
    *slot.lock().expect("adapter poisoned") = Some(adapter.clone());
    let mut advertised: Option<(Vec<u8>, AdvertisementHandle)> = None;
    let mut tick = tokio::time::interval(TICK);
    let mut bolt = None;
    loop {
        tick.tick().await;
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
        if advertised.as_ref().is_some_and(|(d, _)| *d == data) {
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

/// Opens a BlueZ session, powers the adapter and registers the GATT application.
async fn register(
    lock: &Arc<HostedLock>,
    central: &Arc<Mutex<Central>>,
    adapter_name: Option<&str>,
) -> Result<(bluer::Adapter, ApplicationHandle), anyhow::Error> {
    let session = bluer::Session::new().await?;
    let adapter = match adapter_name {
        Some(name) => session.adapter(name)?,
        None => session.default_adapter().await?,
    };
    adapter.set_powered(true).await?;
    let app = adapter.serve_gatt_application(application(lock, central)).await?;
    Ok((adapter, app))
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
fn application(lock: &Arc<HostedLock>, central: &Arc<Mutex<Central>>) -> Application {
    let (write_lock, write_central) = (lock.clone(), central.clone());
    let (notify_lock, notify_central) = (lock.clone(), central.clone());
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
                                    let mut c = central.lock().expect("central poisoned");
                                    let new = c.address != Some(req.device_address);
                                    c.address = Some(req.device_address);
                                    new
                                };
                                let starts = new_central || lock.inspect(|fw, _| !fw.is_connected());
                                if starts {
                                    // What was held for a subscription belonged to the last link.
                                    central.lock().expect("central poisoned").pending.clear();
                                }
                                let connected = lock.input(|fw, now| {
                                    let connected = new_central || !fw.is_connected();
                                    if connected {
                                        // bluetoothd sends a notification to a central that
                                        // supports it (BlueZ does) as a Multiple Handle Value
                                        // Notification: 2 bytes of it are a length, and a value
                                        // of MTU - 3 bytes loses its last two.
                                        fw.connect_with_fragments(usize::from(req.mtu).saturating_sub(5), now);
                                    }
                                    fw.write(&value, now);
                                    connected
                                });
                                if connected {
                                    let _ = crate::outln!("LINK central={} mtu={}", req.device_address, req.mtu);
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
                            subscribe(&notify_lock, &notify_central, notifier);
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

/// Starts forwarding notifications to a new subscriber, the fragments held for it first.
/// bluetoothd subscribes once for all centrals (`StartNotify` when the first enables
/// notifications, `StopNotify` when the last leaves); a newer subscription takes over from an
/// older one, whose end then changes nothing.
fn subscribe(lock: &Arc<HostedLock>, central: &Arc<Mutex<Central>>, notifier: CharacteristicNotifier) {
    let (tx, rx) = mpsc::channel(MAX_PENDING);
    let number = {
        let mut c = central.lock().expect("central poisoned");
        c.subscriptions += 1;
        // Sent before the subscription arrived: first in line (the channel holds them all).
        for fragment in std::mem::take(&mut c.pending) {
            let _ = tx.try_send(fragment);
        }
        c.notifications = Some((c.subscriptions, tx));
        c.subscriptions
    };
    tokio::spawn(forward_notifications(lock.clone(), central.clone(), number, rx, notifier));
}

/// Serves subscription `number` until the central stops it or a newer one replaces it;
/// stopping counts as the central going away.
async fn forward_notifications(
    lock: Arc<HostedLock>,
    central: Arc<Mutex<Central>>,
    number: u64,
    mut rx: mpsc::Receiver<Vec<u8>>,
    mut notifier: CharacteristicNotifier,
) {
    let stopped = notifier.stopped();
    let mut stopped = std::pin::pin!(stopped);
    loop {
        tokio::select! {
            fragment = rx.recv() => match fragment {
                Some(fragment) => {
                    if notifier.notify(fragment).await.is_err() {
                        break;
                    }
                }
                // Replaced by a newer subscription, which owns the firmware's connection now.
                None => return,
            },
            () = &mut stopped => break,
        }
    }
    let ours = {
        let mut c = central.lock().expect("central poisoned");
        let ours = c.notifications.as_ref().is_some_and(|(n, _)| *n == number);
        if ours {
            c.notifications = None;
        }
        ours
    };
    if ours {
        lock.input(|fw, now| fw.disconnect(now));
    }
}

/// Reads the physical world from standard input until it closes (see [`run`]).
async fn physical_world(lock: Arc<HostedLock>) {
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
            [] => {}
            _ => tracing::warn!(line, "unknown input: turn, door open, door closed, keypad CODE or pairing"),
        }
        let state = lock.inspect(|fw, now| fw.status(now).state);
        tracing::info!(?state, "lock state");
    }
}
