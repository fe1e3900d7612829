//! `org.bluez.GattService1` and `org.bluez.GattCharacteristic1` of a connected lock: the
//! LHP/1 service with its write, notify and info characteristics, exported while connected.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use zbus::object_server::SignalEmitter;
use zbus::{ObjectServer, OwnedFd, OwnedObjectPath, OwnedVariant, interface};

use super::{BluezError, EmulatedLock, seqpacket_pair};
use crate::protocol::gatt::{INFO_CHAR_UUID, NOTIFY_CHAR_UUID, SERVICE_UUID, WRITE_CHAR_UUID, uuid_string};

/// Which characteristic an object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Write,
    Notify,
    Info,
}

/// The service's handle unless moved (`MoveGattHandles`), as on a lock fresh from the factory.
pub(super) const FACTORY_SERVICE_HANDLE: u16 = 0x000a;

/// Highest service handle `MoveGattHandles` takes: its characteristics follow it.
pub(super) const LAST_SERVICE_HANDLE: u16 = 0xfff0;

impl Role {
    const ALL: [Role; 3] = [Role::Write, Role::Notify, Role::Info];

    /// The characteristic's handle when the service sits at `service`: each after the
    /// previous one's value and its descriptor, as a GATT table is laid out.
    fn handle(self, service: u16) -> u16 {
        service
            + match self {
                Role::Write => 1,
                Role::Notify => 3,
                Role::Info => 5,
            }
    }

    fn uuid(self) -> u128 {
        match self {
            Role::Write => WRITE_CHAR_UUID,
            Role::Notify => NOTIFY_CHAR_UUID,
            Role::Info => INFO_CHAR_UUID,
        }
    }
}

/// Where the service sits for the current (or last) connection.
fn service_handle(lock: &EmulatedLock) -> u16 {
    lock.radio().gatt_service.unwrap_or(FACTORY_SERVICE_HANDLE)
}

fn service_path(lock: &EmulatedLock) -> String {
    format!("{}/service{:04x}", lock.path.as_str(), service_handle(lock))
}

fn char_path(lock: &EmulatedLock, role: Role) -> String {
    format!("{}/char{:04x}", service_path(lock), role.handle(service_handle(lock)))
}

/// Exports the service and its characteristics (on connect), where `MoveGattHandles` last
/// put them.
pub(super) async fn export(server: &ObjectServer, lock: &Arc<EmulatedLock>) -> zbus::Result<()> {
    let service = {
        let mut radio = lock.radio();
        if let Some(moved) = radio.gatt_service_next.take() {
            radio.gatt_service = Some(moved);
        }
        radio.gatt_service.unwrap_or(FACTORY_SERVICE_HANDLE)
    };
    server.at(service_path(lock), Service { lock: lock.clone(), handle: service }).await?;
    for role in Role::ALL {
        let ch =
            Characteristic { lock: lock.clone(), role, handle: role.handle(service), value: Mutex::new(Vec::new()) };
        server.at(char_path(lock, role), ch).await?;
    }
    Ok(())
}

/// Removes them again (on disconnect).
pub(super) async fn unexport(server: &ObjectServer, lock: &Arc<EmulatedLock>) {
    for role in Role::ALL {
        let _ = server.remove::<Characteristic, _>(char_path(lock, role)).await;
    }
    let _ = server.remove::<Service, _>(service_path(lock)).await;
}

/// Sends a notification as BlueZ does for `StartNotify` subscribers: the characteristic's
/// Value changes and `PropertiesChanged` carries it.
pub(super) async fn notify_value(lock: &Arc<EmulatedLock>, fragment: Vec<u8>) {
    let Some(shared) = lock.emulator.upgrade() else { return };
    let server = shared.conn.object_server();
    let Ok(iface) = server.interface::<_, Characteristic>(char_path(lock, Role::Notify)).await else {
        return;
    };
    let ch = iface.get().await;
    *ch.value.lock().expect("value poisoned") = fragment;
    let _ = ch.value_changed(iface.signal_emitter()).await;
}

/// The LHP/1 primary service.
pub(super) struct Service {
    lock: Arc<EmulatedLock>,
    handle: u16,
}

#[interface(name = "org.bluez.GattService1")]
impl Service {
    #[zbus(property, name = "UUID")]
    fn uuid(&self) -> String {
        uuid_string(SERVICE_UUID)
    }

    #[zbus(property)]
    fn primary(&self) -> bool {
        true
    }

    #[zbus(property)]
    fn device(&self) -> OwnedObjectPath {
        self.lock.path.clone()
    }

    #[zbus(property)]
    fn includes(&self) -> Vec<OwnedObjectPath> {
        Vec::new()
    }

    #[zbus(property)]
    fn handle(&self) -> u16 {
        self.handle
    }
}

/// One of the three characteristics.
pub(super) struct Characteristic {
    lock: Arc<EmulatedLock>,
    role: Role,
    handle: u16,
    value: Mutex<Vec<u8>>,
}

impl Characteristic {
    fn mtu(&self) -> u16 {
        self.lock.spec.mtu
    }

    fn connected(&self) -> Result<(), BluezError> {
        if self.lock.radio().connected { Ok(()) } else { Err(BluezError::NotConnected("Not Connected".into())) }
    }
}

#[interface(name = "org.bluez.GattCharacteristic1")]
impl Characteristic {
    async fn read_value(&self, _options: HashMap<String, OwnedVariant>) -> Result<Vec<u8>, BluezError> {
        self.connected()?;
        match self.role {
            // As bluetoothd 5.66 did through the real-BlueZ tier after the lock's controller
            // was reset: its cached table put the info characteristic where a 2-byte
            // attribute of the lock's new table sits.
            Role::Info if self.lock.radio().stale_gatt_cache => Ok(vec![0, 0]),
            Role::Info => Ok(self.lock.host.inspect(|fw, _| fw.info().encode().to_vec())),
            _ => Err(BluezError::NotPermitted("Read not permitted".into())),
        }
    }

    async fn write_value(&self, value: Vec<u8>, _options: HashMap<String, OwnedVariant>) -> Result<(), BluezError> {
        self.connected()?;
        if self.role != Role::Write {
            return Err(BluezError::NotPermitted("Write not permitted".into()));
        }
        if self.lock.radio().write_acquired {
            return Err(BluezError::NotPermitted("Write acquired".into()));
        }
        if value.len() > usize::from(self.mtu()) - 3 {
            return Err(BluezError::Failed("Invalid length".into()));
        }
        self.lock.host.input(|fw, now| fw.write(&value, now));
        Ok(())
    }

    async fn acquire_write(
        &self,
        _options: HashMap<String, OwnedVariant>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(OwnedFd, u16), BluezError> {
        self.connected()?;
        if self.role != Role::Write {
            return Err(BluezError::NotSupported("Operation is not supported".into()));
        }
        let mut link_gone = {
            let mut r = self.lock.radio();
            let link = r.link.as_ref().ok_or_else(|| BluezError::NotConnected("Not Connected".into()))?.subscribe();
            if std::mem::replace(&mut r.write_acquired, true) {
                return Err(BluezError::NotPermitted("Write acquired".into()));
            }
            link
        };
        let (ours, theirs) = seqpacket_pair().map_err(|e| BluezError::Failed(e.to_string()))?;
        let lock = self.lock.clone();
        let max = usize::from(self.mtu());
        tokio::spawn(async move {
            let mut buf = vec![0u8; max];
            let mut next = vec![0u8; max];
            loop {
                tokio::select! {
                    r = ours.recv(&mut buf) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            // Two writes queued together may leave on different EATT
                            // bearers and arrive swapped (see `eatt_order`).
                            let swapped = (lock.spec.eatt_bearers > 1)
                                .then(|| ours.try_recv(&mut next).ok().filter(|&m| m > 0))
                                .flatten();
                            lock.host.input(|fw, now| {
                                if let Some(m) = swapped {
                                    fw.write(&next[..m], now);
                                }
                                fw.write(&buf[..n], now);
                            });
                        }
                    },
                    // The link went: the socket closes with it (the central's writes fail).
                    _ = link_gone.changed() => break,
                }
            }
            if link_gone.has_changed().is_ok() {
                lock.radio().write_acquired = false;
            }
        });
        self.write_acquired_changed(&emitter).await?;
        Ok((OwnedFd::from(theirs), self.mtu()))
    }

    async fn acquire_notify(
        &self,
        _options: HashMap<String, OwnedVariant>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(OwnedFd, u16), BluezError> {
        self.connected()?;
        if self.role != Role::Notify {
            return Err(BluezError::NotSupported("Operation is not supported".into()));
        }
        let (ours, theirs) = seqpacket_pair().map_err(|e| BluezError::Failed(e.to_string()))?;
        let ours = Arc::new(ours);
        let mut link_gone = {
            let mut r = self.lock.radio();
            let link = r.link.as_ref().ok_or_else(|| BluezError::NotConnected("Not Connected".into()))?.subscribe();
            if r.notify_socket.is_some() || r.notify_subscribers > 0 {
                return Err(BluezError::NotPermitted("Notify acquired".into()));
            }
            r.notify_socket = Some(ours.clone());
            link
        };
        // The central releases the notification by closing its end; the link going closes
        // ours (what was sent before stays readable on theirs, then the end).
        let lock = self.lock.clone();
        tokio::spawn(async move {
            let mut probe = [0u8; 1];
            tokio::select! {
                _ = ours.recv(&mut probe) => {}
                _ = link_gone.changed() => {}
            }
            let mut r = lock.radio();
            if r.notify_socket.as_ref().is_some_and(|s| Arc::ptr_eq(s, &ours)) {
                r.notify_socket = None;
            }
        });
        self.notify_acquired_changed(&emitter).await?;
        Ok((OwnedFd::from(theirs), self.mtu()))
    }

    async fn start_notify(&self) -> Result<(), BluezError> {
        self.connected()?;
        if self.role != Role::Notify {
            return Err(BluezError::NotSupported("Operation is not supported".into()));
        }
        let mut r = self.lock.radio();
        if r.notify_socket.is_some() {
            return Err(BluezError::NotPermitted("Notify acquired".into()));
        }
        r.notify_subscribers += 1;
        Ok(())
    }

    async fn stop_notify(&self) -> Result<(), BluezError> {
        let mut r = self.lock.radio();
        if r.notify_subscribers == 0 {
            return Err(BluezError::Failed("No notify session started".into()));
        }
        r.notify_subscribers -= 1;
        Ok(())
    }

    #[zbus(property, name = "UUID")]
    fn uuid(&self) -> String {
        uuid_string(self.role.uuid())
    }

    #[zbus(property)]
    fn service(&self) -> OwnedObjectPath {
        OwnedObjectPath::try_from(service_path(&self.lock)).expect("service path is valid")
    }

    #[zbus(property)]
    fn value(&self) -> Vec<u8> {
        self.value.lock().expect("value poisoned").clone()
    }

    #[zbus(property)]
    fn flags(&self) -> Vec<String> {
        match self.role {
            Role::Write => vec!["write-without-response".into(), "write".into()],
            Role::Notify => vec!["notify".into()],
            Role::Info => vec!["read".into()],
        }
    }

    #[zbus(property, name = "MTU")]
    fn mtu_property(&self) -> u16 {
        self.mtu()
    }

    #[zbus(property)]
    fn notifying(&self) -> zbus::fdo::Result<bool> {
        match self.role {
            Role::Notify => {
                let r = self.lock.radio();
                Ok(r.notify_subscribers > 0 || r.notify_socket.is_some())
            }
            _ => Err(zbus::fdo::Error::InvalidArgs("No such property 'Notifying'".into())),
        }
    }

    #[zbus(property)]
    fn write_acquired(&self) -> zbus::fdo::Result<bool> {
        match self.role {
            Role::Write => Ok(self.lock.radio().write_acquired),
            _ => Err(zbus::fdo::Error::InvalidArgs("No such property 'WriteAcquired'".into())),
        }
    }

    #[zbus(property)]
    fn notify_acquired(&self) -> zbus::fdo::Result<bool> {
        match self.role {
            Role::Notify => Ok(self.lock.radio().notify_socket.is_some()),
            _ => Err(zbus::fdo::Error::InvalidArgs("No such property 'NotifyAcquired'".into())),
        }
    }

    #[zbus(property)]
    fn handle(&self) -> u16 {
        self.handle
    }
}
