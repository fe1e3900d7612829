//! `org.bluez.Adapter1` at `/org/bluez/hci0`: power, discovery sessions and filters.

use std::collections::HashMap;
use std::sync::Arc;

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{OwnedObjectPath, OwnedVariant, interface};

use super::{BluezError, Shared};
use crate::firmware::bluez::ADAPTER_PATH;

/// The emulated adapter.
pub(super) struct Adapter {
    pub(super) shared: Arc<Shared>,
}

fn sender(hdr: &Header<'_>) -> String {
    hdr.sender().map(|s| s.to_string()).unwrap_or_default()
}

#[interface(name = "org.bluez.Adapter1")]
impl Adapter {
    async fn start_discovery(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), BluezError> {
        if !self.shared.is_powered() {
            return Err(BluezError::NotReady("Resource Not Ready".into()));
        }
        let client = sender(&hdr);
        let filter = self.shared.filters.lock().expect("filters poisoned").get(&client).cloned().unwrap_or_default();
        let first = {
            let mut d = self.shared.discovery.lock().expect("discovery poisoned");
            let first = d.is_empty();
            d.insert(client, filter);
            first
        };
        if first {
            let shared = self.shared.clone();
            let emitter = emitter.to_owned();
            // Property changes and device announcements follow the method's reply, as in BlueZ.
            tokio::spawn(async move {
                if let Ok(iface) = shared.conn.object_server().interface::<_, Adapter>(ADAPTER_PATH).await {
                    let _ = iface.get().await.discovering_changed(&emitter).await;
                }
                let locks: Vec<_> = shared.locks.lock().expect("lock table poisoned").values().cloned().collect();
                for lock in locks {
                    shared.advertise(&lock).await;
                }
            });
        }
        Ok(())
    }

    async fn stop_discovery(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), BluezError> {
        let now_empty = {
            let mut d = self.shared.discovery.lock().expect("discovery poisoned");
            if d.remove(&sender(&hdr)).is_none() {
                return Err(BluezError::Failed("No discovery started".into()));
            }
            d.is_empty()
        };
        if now_empty {
            self.discovering_changed(&emitter).await?;
        }
        Ok(())
    }

    async fn set_discovery_filter(
        &self,
        filter: HashMap<String, OwnedVariant>,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), BluezError> {
        let mut uuids = Vec::new();
        for (key, value) in &filter {
            match key.as_str() {
                "UUIDs" => {
                    uuids = Vec::<String>::try_from(value.try_clone()?)
                        .map_err(|_| BluezError::InvalidArguments("UUIDs must be an array of strings".into()))?;
                }
                "RSSI" | "Pathloss" | "DuplicateData" | "Discoverable" | "Pattern" => {}
                "Transport" => {
                    let t = String::try_from(value.try_clone()?)
                        .map_err(|_| BluezError::InvalidArguments("Transport must be a string".into()))?;
                    if !matches!(t.as_str(), "auto" | "le" | "bredr") {
                        return Err(BluezError::InvalidArguments(format!("unknown transport {t}")));
                    }
                }
                other => return Err(BluezError::InvalidArguments(format!("unknown filter key {other}"))),
            }
        }
        self.shared.filters.lock().expect("filters poisoned").insert(sender(&hdr), uuids);
        Ok(())
    }

    fn get_discovery_filters(&self) -> Vec<String> {
        ["UUIDs", "RSSI", "Pathloss", "Transport", "DuplicateData", "Discoverable", "Pattern"]
            .map(String::from)
            .to_vec()
    }

    async fn remove_device(&self, device: OwnedObjectPath) -> Result<(), BluezError> {
        let lock = self
            .shared
            .lock_by_path(device.as_str())
            .ok_or_else(|| BluezError::DoesNotExist("Does Not Exist".into()))?;
        self.shared.disconnect(&lock).await;
        self.shared.forget_device(&lock).await;
        Ok(())
    }

    #[zbus(property)]
    fn address(&self) -> String {
        "00:1B:DC:00:00:01".into()
    }

    #[zbus(property)]
    fn address_type(&self) -> String {
        "public".into()
    }

    #[zbus(property)]
    fn name(&self) -> String {
        "lockhub-emulator".into()
    }

    #[zbus(property)]
    fn alias(&self) -> String {
        "lockhub-emulator".into()
    }

    #[zbus(property)]
    fn class(&self) -> u32 {
        0
    }

    #[zbus(property)]
    fn powered(&self) -> bool {
        self.shared.is_powered()
    }

    #[zbus(property)]
    fn discoverable(&self) -> bool {
        false
    }

    #[zbus(property)]
    fn pairable(&self) -> bool {
        false
    }

    #[zbus(property)]
    fn pairable_timeout(&self) -> u32 {
        0
    }

    #[zbus(property)]
    fn discoverable_timeout(&self) -> u32 {
        180
    }

    #[zbus(property)]
    fn discovering(&self) -> bool {
        self.shared.is_discovering()
    }

    #[zbus(property, name = "UUIDs")]
    fn uuids(&self) -> Vec<String> {
        Vec::new()
    }

    #[zbus(property)]
    fn modalias(&self) -> zbus::fdo::Result<String> {
        Err(zbus::fdo::Error::InvalidArgs("No such property 'Modalias'".into()))
    }
}
