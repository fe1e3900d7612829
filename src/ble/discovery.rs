//! What an ongoing BlueZ discovery hears, as [`Advertisement`]s.
//!
//! BlueZ reports a device once (`InterfacesAdded`, or already known when discovery starts) and
//! then each change of its properties in a `PropertiesChanged` signal that carries the new
//! values. Under a discovery filter it signals every change of RSSI, however small, so a lock
//! in range is heard at about its advertising interval. A device's first sighting is read from
//! BlueZ, RSSI and manufacturer data asked together (one round trip); after that each
//! advertisement is built from the signal and what was heard before, without asking BlueZ
//! anything: a hub with ten locks around hears tens of advertisements a second, and each used
//! to cost two calls to bluetoothd, which commands then queued behind on the hub's one thread.

use std::collections::HashMap;
use std::pin::Pin;

use bluer::{Adapter, AdapterEvent, Address, DeviceEvent, DeviceProperty};
use futures::stream::{BoxStream, SelectAll};
use futures::{Stream, StreamExt};
use tokio::sync::oneshot;

use super::Advertisement;
use crate::protocol::gatt::COMPANY_ID;

/// What discovery last heard of one device.
struct Heard {
    rssi: Option<i16>,
    /// The LHP/1 manufacturer record.
    record: Option<Vec<u8>>,
    /// Dropped when the device goes (or is reported anew): ends the watch on its properties.
    _watching: oneshot::Sender<()>,
}

impl Heard {
    fn advertisement(&self, address: Address) -> Option<Advertisement> {
        Advertisement::from_scan(address.to_string(), self.rssi?, self.record.as_deref()?)
    }
}

/// The manufacturer record a lock advertises: LHP/1's company id, or else the only one there.
fn lhp_record(data: &HashMap<u16, Vec<u8>>) -> Option<Vec<u8>> {
    data.get(&COMPANY_ID).or_else(|| data.values().next()).cloned()
}

/// One thing discovery reports.
enum Heeded {
    Device(AdapterEvent),
    Changed(Address, DeviceEvent),
}

/// The advertisements in `devices` (bluer's discovery events, which hold discovery on while
/// they are read): a device's first report and every change of its RSSI or manufacturer data
/// that leaves it a lock in range. Ends when `devices` does.
pub(super) fn advertisements(
    adapter: Adapter,
    devices: impl Stream<Item = AdapterEvent> + Send + 'static,
) -> impl Stream<Item = Advertisement> + Send {
    struct State {
        adapter: Adapter,
        devices: Pin<Box<dyn Stream<Item = AdapterEvent> + Send>>,
        changes: SelectAll<BoxStream<'static, (Address, DeviceEvent)>>,
        heard: HashMap<Address, Heard>,
    }
    let state = State { adapter, devices: Box::pin(devices), changes: SelectAll::new(), heard: HashMap::new() };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            let heeded = tokio::select! {
                device = s.devices.next() => Heeded::Device(device?),
                Some((address, change)) = s.changes.next(), if !s.changes.is_empty() => Heeded::Changed(address, change),
            };
            let ad = match heeded {
                Heeded::Device(AdapterEvent::DeviceAdded(address)) => {
                    let Ok(device) = s.adapter.device(address) else { continue };
                    // Watched before it is read: a change in between is not lost.
                    let (watching, unwatched) = oneshot::channel();
                    if let Ok(changes) = device.events().await {
                        s.changes.push(changes.map(move |c| (address, c)).take_until(unwatched).boxed());
                    }
                    let (rssi, data) = futures::join!(device.rssi(), device.manufacturer_data());
                    let heard = Heard {
                        rssi: rssi.ok().flatten(),
                        record: data.ok().flatten().as_ref().and_then(lhp_record),
                        _watching: watching,
                    };
                    let ad = heard.advertisement(address);
                    s.heard.insert(address, heard);
                    ad
                }
                Heeded::Device(AdapterEvent::DeviceRemoved(address)) => {
                    s.heard.remove(&address);
                    None
                }
                Heeded::Device(AdapterEvent::PropertyChanged(_)) => None,
                Heeded::Changed(address, DeviceEvent::PropertyChanged(change)) => {
                    let Some(heard) = s.heard.get_mut(&address) else { continue };
                    match change {
                        DeviceProperty::Rssi(rssi) => heard.rssi = Some(rssi),
                        DeviceProperty::ManufacturerData(data) => heard.record = lhp_record(&data),
                        _ => continue,
                    }
                    heard.advertisement(address)
                }
            };
            if let Some(ad) = ad {
                return Some((ad, s));
            }
        }
    })
}
