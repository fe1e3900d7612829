//! One emulated lock as a real BLE peripheral, through bluer's GATT server and LE advertising.
//!
//! This lets a second board (a Raspberry Pi with the adapter free) stand in for a lock in
//! front of a gateway with real radios. It needs BlueZ and a Bluetooth adapter, so it builds
//! everywhere but runs only on such hardware; `docs/emulator.md` says how to use it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bluer::Address;
use bluer::adv::Advertisement;
use bluer::gatt::local::{
    Application, Characteristic, CharacteristicNotifier, CharacteristicNotify, CharacteristicNotifyMethod,
    CharacteristicRead, CharacteristicWrite, CharacteristicWriteMethod, ReqError, Service,
};
use futures::FutureExt;
use tokio::sync::mpsc;

use super::host::{HostedLock, Radio};
use super::{Mechanics, PersistentState};
use crate::protocol::gatt::{
    COMPANY_ID, Capabilities, INFO_CHAR_UUID, NOTIFY_CHAR_UUID, SERVICE_UUID, WRITE_CHAR_UUID,
};
use crate::protocol::ids::LockId;

/// The radio side of the peripheral: who is connected, and where notifications go.
#[derive(Default)]
struct Central {
    address: Option<Address>,
    notifications: Option<mpsc::Sender<Vec<u8>>>,
}

struct PeripheralRadio {
    central: Arc<Mutex<Central>>,
    adapter: bluer::Adapter,
}

impl Radio for PeripheralRadio {
    async fn notify(&self, fragment: Vec<u8>) {
        let tx = self.central.lock().expect("central poisoned").notifications.clone();
        if let Some(tx) = tx {
            let _ = tx.send(fragment).await;
        }
    }

    async fn disconnect(&self) {
        let address = {
            let mut c = self.central.lock().expect("central poisoned");
            c.notifications = None;
            c.address.take()
        };
        if let Some(device) = address.and_then(|a| self.adapter.device(a).ok()) {
            let _ = device.disconnect().await;
        }
    }
}

/// Runs the peripheral until interrupted. The lock's flash lives in `state_dir`.
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
    crate::errln!(
        "lock {} — setup code {} (pairing mode: {})",
        state.identity.lock_id,
        state.identity.setup_code.expose(),
        state.pairing_mode
    );
    let lock = HostedLock::new(state, Some(flash));
    let session = bluer::Session::new().await?;
    let adapter = match adapter_name {
        Some(name) => session.adapter(name)?,
        None => session.default_adapter().await?,
    };
    adapter.set_powered(true).await?;

    let central = Arc::new(Mutex::new(Central::default()));
    let radio = PeripheralRadio { central: central.clone(), adapter: adapter.clone() };
    let driver = tokio::spawn(lock.clone().run(radio));

    let write_lock = lock.clone();
    let write_central = central.clone();
    let notify_lock = lock.clone();
    let notify_central = central.clone();
    let info_lock = lock.clone();
    let app = Application {
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
                                lock.input(|fw, now| {
                                    if new_central || !fw.is_connected() {
                                        fw.connect(req.mtu, now);
                                    }
                                    fw.write(&value, now);
                                });
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
                            let lock = notify_lock.clone();
                            let central = notify_central.clone();
                            forward_notifications(lock, central, notifier).boxed()
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
    };
    let _app = adapter.serve_gatt_application(app).await?;

    // Re-advertise whenever the advertised flags change (pairing mode, new events).
    let mut advertised = Vec::new();
    let mut handle = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {
                let data = lock.inspect(|fw, _| fw.advertisement().encode().to_vec());
                if data != advertised {
                    // BlueZ allows few advertisement instances: release the old one first.
                    drop(handle.take());
                    let adv = Advertisement {
                        service_uuids: BTreeSet::from([bluer::Uuid::from_u128(SERVICE_UUID)]),
                        manufacturer_data: BTreeMap::from([(COMPANY_ID, data.clone())]),
                        discoverable: Some(true),
                        local_name: Some("LHP lock".into()),
                        ..Default::default()
                    };
                    handle = Some(adapter.advertise(adv).await?);
                    advertised = data;
                }
            }
        }
    }
    drop(handle);
    driver.abort();
    lock.save()?;
    Ok(())
}

/// Serves one notification subscription until the central stops it; stopping counts as the
/// central going away.
async fn forward_notifications(
    lock: Arc<HostedLock>,
    central: Arc<Mutex<Central>>,
    mut notifier: CharacteristicNotifier,
) {
    let (tx, mut rx) = mpsc::channel(64);
    central.lock().expect("central poisoned").notifications = Some(tx);
    while let Some(fragment) = rx.recv().await {
        if notifier.notify(fragment).await.is_err() {
            break;
        }
    }
    central.lock().expect("central poisoned").notifications = None;
    lock.input(|fw, now| fw.disconnect(now));
}
