//! `org.bluez.Device1` for each emulated lock: connection, advertisement data, RSSI.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use zbus::object_server::SignalEmitter;
use zbus::{OwnedObjectPath, OwnedVariant, Variant, interface};

use super::{ADAPTER_PATH, BluezError, EmulatedLock, gatt};
use crate::protocol::gatt::{COMPANY_ID, SERVICE_UUID, uuid_string};

/// How long a connection attempt to a lock out of range takes to fail, like BlueZ's LE
/// connection attempt that gives up.
pub(super) const CONNECT_FAILURE_DELAY: Duration = Duration::from_secs(2);

/// A remote device as BlueZ exports it.
pub(super) struct Device {
    pub(super) lock: Arc<EmulatedLock>,
}

#[interface(name = "org.bluez.Device1")]
impl Device {
    async fn connect(&self, #[zbus(signal_emitter)] emitter: SignalEmitter<'_>) -> Result<(), BluezError> {
        let lock = &self.lock;
        let Some(shared) = lock.emulator.upgrade() else {
            return Err(BluezError::Failed("emulator stopped".into()));
        };
        if !shared.is_powered() {
            return Err(BluezError::NotReady("Resource Not Ready".into()));
        }
        let cancelled = {
            let mut r = lock.radio();
            if r.connected {
                return Err(BluezError::AlreadyConnected("Already Connected".into()));
            }
            // bluetoothd 5.66 makes one LE connection attempt at a time per device, and its
            // attempt outlives the D-Bus call that asked for it (a caller that gave up).
            if r.connecting.is_some() {
                return Err(BluezError::Failed("Operation already in progress".into()));
            }
            if r.in_range {
                None
            } else {
                let (cancel, cancelled) = tokio::sync::oneshot::channel();
                r.connecting = Some(cancel);
                Some(cancelled)
            }
        };
        if let Some(cancelled) = cancelled {
            let outcome = tokio::select! {
                () = tokio::time::sleep(CONNECT_FAILURE_DELAY) => {
                    // Still this attempt's: another Connect is refused while it is there.
                    lock.radio().connecting = None;
                    "le-connection-abort-by-local"
                }
                // Device1.Disconnect while connecting (it took the attempt): bluetoothd fails
                // the attempt so.
                _ = cancelled => "br-connection-canceled",
            };
            return Err(BluezError::Failed(outcome.into()));
        }
        lock.host.input(|fw, now| fw.connect(lock.spec.mtu, now));
        {
            let mut r = lock.radio();
            r.connected = true;
            r.link = Some(tokio::sync::watch::channel(()).0);
        }
        let c = &shared.counters;
        c.connects.fetch_add(1, Ordering::AcqRel);
        let active = c.active.fetch_add(1, Ordering::AcqRel) + 1;
        c.peak_active.fetch_max(active, Ordering::AcqRel);
        gatt::export(&shared.conn.object_server().clone(), lock).await?;
        self.connected_changed(&emitter).await?;
        self.services_resolved_changed(&emitter).await?;
        Ok(())
    }

    async fn disconnect(&self) -> Result<(), BluezError> {
        if let Some(shared) = self.lock.emulator.upgrade() {
            shared.disconnect(&self.lock).await;
        }
        Ok(())
    }

    async fn connect_profile(&self, _uuid: String) -> Result<(), BluezError> {
        Err(BluezError::NotSupported("Operation is not supported".into()))
    }

    async fn disconnect_profile(&self, _uuid: String) -> Result<(), BluezError> {
        Err(BluezError::NotSupported("Operation is not supported".into()))
    }

    /// LHP/1 pairs in its own protocol; the lock offers no Bluetooth bonding.
    async fn pair(&self) -> Result<(), BluezError> {
        Err(BluezError::NotSupported("Operation is not supported".into()))
    }

    async fn cancel_pairing(&self) -> Result<(), BluezError> {
        Err(BluezError::DoesNotExist("Does Not Exist".into()))
    }

    #[zbus(property)]
    fn address(&self) -> String {
        self.lock.address.clone()
    }

    #[zbus(property)]
    fn address_type(&self) -> String {
        "random".into()
    }

    #[zbus(property)]
    fn name(&self) -> String {
        format!("LHP lock {}", self.lock.lock_id)
    }

    #[zbus(property)]
    fn alias(&self) -> String {
        format!("LHP lock {}", self.lock.lock_id)
    }

    #[zbus(property)]
    fn paired(&self) -> bool {
        false
    }

    #[zbus(property)]
    fn bonded(&self) -> bool {
        false
    }

    #[zbus(property)]
    fn trusted(&self) -> bool {
        false
    }

    #[zbus(property)]
    fn blocked(&self) -> bool {
        false
    }

    #[zbus(property)]
    fn legacy_pairing(&self) -> bool {
        false
    }

    #[zbus(property)]
    fn connected(&self) -> bool {
        self.lock.radio().connected
    }

    #[zbus(property)]
    fn services_resolved(&self) -> bool {
        self.lock.radio().connected
    }

    #[zbus(property)]
    fn adapter(&self) -> OwnedObjectPath {
        OwnedObjectPath::try_from(ADAPTER_PATH).expect("constant path is valid")
    }

    #[zbus(property, name = "UUIDs")]
    fn uuids(&self) -> Vec<String> {
        vec![uuid_string(SERVICE_UUID)]
    }

    /// Present only while the lock is in range (BlueZ drops RSSI when a device goes quiet).
    #[zbus(property, name = "RSSI")]
    fn rssi(&self) -> zbus::fdo::Result<i16> {
        let r = self.lock.radio();
        if r.in_range { Ok(r.rssi) } else { Err(zbus::fdo::Error::InvalidArgs("No such property 'RSSI'".into())) }
    }

    #[zbus(property)]
    fn manufacturer_data(&self) -> zbus::fdo::Result<HashMap<u16, OwnedVariant>> {
        let data = self.lock.manufacturer_data();
        let value = Variant::new(data).try_to_owned().map_err(|e| zbus::fdo::Error::Failed(e.to_string()))?;
        Ok(HashMap::from([(COMPANY_ID, value)]))
    }
}
