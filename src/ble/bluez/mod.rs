//! The BLE transport over BlueZ, through bluer.
//!
//! Everything the gateway does on the radio goes through here: adapter choice, LE discovery
//! filtered by the LHP/1 service, connection, service resolution, the characteristics found
//! by UUID (and where they were found remembered per lock, see `GattLayout`),
//! `AcquireWrite` / `AcquireNotify` sockets, and disconnect detection. bluer's own
//! waits are long (120 s for service resolution), so every step here has its own bound. The
//! connection to the bus under it, and its replacement when the bus goes, is `connection`'s.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bluer::gatt::remote::Characteristic;
use bluer::gatt::{CharacteristicReader, CharacteristicWriter};
use bluer::{Address, DeviceEvent, DeviceProperty, DiscoveryFilter, DiscoveryTransport, ErrorKind};
use futures::{Stream, StreamExt};
use tokio::sync::watch;

mod connection;
mod listen;

use self::connection::{BUS_SILENCE, Bluez, BluezConnection, bus_silent};
use super::radios::Radios;
use super::{Advertisement, BleConfig, BleError, LockLink, LockTransport};
use crate::protocol::fragment::{MAX_FRAGMENT_LEN, MIN_FRAGMENT_LEN};
use crate::protocol::gatt::{INFO_CHAR_UUID, LockInfo, NOTIFY_CHAR_UUID, SERVICE_UUID, WRITE_CHAR_UUID};
use crate::protocol::ids::LockId;

pub(super) fn bus_error(e: bluer::Error) -> BleError {
    match e.kind {
        ErrorKind::NotReady => BleError::AdapterOff(e.message),
        _ => BleError::Bus(e.to_string()),
    }
}

/// The LHP/1 characteristics by UUID, in the order the transport hands them out: write,
/// notify, info.
const LHP_CHARACTERISTICS: [u128; 3] = [WRITE_CHAR_UUID, NOTIFY_CHAR_UUID, INFO_CHAR_UUID];

/// How long BlueZ may take to start a discovery (its filter set, the discovery started): a
/// hung bluetoothd would otherwise hold a scan, a pairing's search for the lock or the radio
/// watch for bluer's 120 s.
const DISCOVERY_START: Duration = Duration::from_secs(5);

/// What happened to BlueZ under a running transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BluezChange {
    /// The adapter in use appeared again: BlueZ restarted, or the adapter was reset. The
    /// discovery and the links made before are gone.
    AdapterBack,
}

/// BlueZ through bluer.
pub struct BluezTransport {
    /// The connection to BlueZ, replaced when the bus went away.
    bus: BluezConnection,
    resolve_timeout: Duration,
    /// Where each lock's characteristics were found (see [`GattLayout`]).
    layouts: std::sync::Mutex<HashMap<Address, GattLayout>>,
}

/// Where a lock's LHP/1 characteristics sit in BlueZ's object tree: the GATT handles of its
/// service and of the write, notify and info characteristics, as found on its first connection.
///
/// Finding them takes BlueZ's whole object tree, twice (bluer lists services, then
/// characteristics, each with `GetManagedObjects`): every adapter, every device BlueZ has
/// heard of and every attribute of every connected one, parsed into maps — most of a cold
/// connection's CPU, and growing with the radios around the house. A lock keeps its handles
/// from one connection to the next, so later connections name them directly and only ask the
/// three characteristics for their UUIDs; a lock whose handles moved (its firmware updated)
/// fails that check and is looked up again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GattLayout {
    service: u16,
    /// Write, notify, info.
    characteristics: [u16; 3],
}

impl std::fmt::Debug for BluezTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BluezTransport").field("adapter", &self.adapter_name()).finish()
    }
}

impl BluezTransport {
    /// Connects to BlueZ on the system bus (`DBUS_SYSTEM_BUS_ADDRESS` when set) and picks the
    /// adapter: `config.adapter`, or the first powered one.
    pub async fn open(config: &BleConfig) -> Result<Self, BleError> {
        Ok(BluezTransport {
            bus: BluezConnection::open(config).await?,
            resolve_timeout: config.resolve_timeout(),
            layouts: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Opens a transport on each adapter the configuration names (`ble.adapters`, else
    /// `ble.adapter`), each with `max_links` links. An adapter that cannot be opened is left
    /// out with a warning while another can (the hub keeps working through those it has);
    /// when none can, the first one's error.
    pub async fn open_radios(config: &BleConfig) -> Result<Radios<BluezTransport>, BleError> {
        let mut opened = Vec::new();
        let mut first_error = None;
        for choice in config.adapter_choices() {
            match BluezTransport::open(&config.for_adapter(choice.clone())).await {
                Ok(transport) => opened.push((transport.adapter_name(), Arc::new(transport))),
                Err(e) => {
                    let adapter = choice.as_deref().unwrap_or("(first powered)");
                    tracing::warn!(adapter, error = %e, "cannot use this Bluetooth adapter: going on without it");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if opened.is_empty() => Err(e),
            _ => Ok(Radios::new(opened, config.max_links)),
        }
    }

    /// Gives up the connection to the bus if it is still the one of `generation` (what
    /// [`BluezTransport::replaced`] said when its user started on it): the bus went away under
    /// it (the D-Bus daemon restarted). The next use connects afresh and picks the adapter
    /// again; a connection someone already replaced is left alone.
    pub fn drop_connection(&self, generation: u64) {
        self.bus.drop_connection(generation);
    }

    /// Changes whenever the connection to the bus is replaced: what was started on the old
    /// one (discovery) is to be started again.
    pub fn replaced(&self) -> watch::Receiver<u64> {
        self.bus.replaced()
    }

    /// Whether the current connection to the bus still answers. One that does not (wedged,
    /// or dead without having said so) is dropped: the next use of the transport connects
    /// afresh, and [`BluezTransport::replaced`] changes when it has.
    pub async fn bus_answers(&self) -> bool {
        self.bus.bus_answers().await
    }

    /// The adapter in use.
    pub fn adapter_name(&self) -> String {
        self.bus.current().adapter.name().to_owned()
    }

    /// What happens to BlueZ from now on; the stream ends when the connection to the bus is
    /// lost (then [`BluezTransport::drop_connection`]).
    pub async fn changes(&self) -> Result<impl Stream<Item = BluezChange> + Send + use<>, BleError> {
        let bluez = self.bus.live().await?;
        let name = bluez.adapter.name().to_owned();
        let events = bluez.session.events().await.map_err(bus_error)?;
        Ok(events.filter_map(move |event| {
            let back = matches!(&event, bluer::SessionEvent::AdapterAdded(n) if *n == name);
            async move { back.then_some(BluezChange::AdapterBack) }
        }))
    }

    /// Starts LE discovery filtered by the LHP/1 service and yields every advertisement as it
    /// is seen (a lock appears again whenever its RSSI or manufacturer data change; see
    /// `ble::discovery`). Discovery stops when the stream is dropped.
    pub async fn discover(&self) -> Result<impl Stream<Item = Advertisement> + Send + use<>, BleError> {
        let bluez = self.bus.live().await?;
        let filter = DiscoveryFilter {
            uuids: HashSet::from([bluer::Uuid::from_u128(SERVICE_UUID)]),
            transport: DiscoveryTransport::Le,
            duplicate_data: true,
            ..DiscoveryFilter::default()
        };
        let start = async {
            match bluez.adapter.set_discovery_filter(filter).await {
                // Another discovery of this process runs, under this same filter: join it.
                Err(e) if e.kind == ErrorKind::DiscoveryActive => {}
                r => r.map_err(bus_error)?,
            }
            bluez.adapter.discover_devices().await.map_err(bus_error)
        };
        let events = tokio::time::timeout(DISCOVERY_START, start)
            .await
            .map_err(|_| BleError::BluezSilent { after: DISCOVERY_START })??;
        Ok(super::discovery::advertisements(bluez.adapter.clone(), events))
    }

    /// The lock's write, notify and info characteristics: where they were last time if they
    /// are still there, else looked up (see [`GattLayout`]); within the resolve timeout.
    async fn find_characteristics(&self, device: &bluer::Device) -> Result<[Characteristic; 3], BleError> {
        let bound = self.resolve_timeout;
        let address = device.address();
        let find = async {
            let known = self.layouts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&address).copied();
            if let Some(layout) = known {
                if let Some(found) = at_layout(device, layout).await {
                    return Ok(found);
                }
                tracing::debug!(%address, "the lock's characteristics are not where they were: looking them up again");
            }
            let found = look_up_characteristics(device).await?;
            let layout = GattLayout {
                service: found[0].service_id(),
                characteristics: [found[0].id(), found[1].id(), found[2].id()],
            };
            self.layouts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(address, layout);
            Ok(found)
        };
        tokio::time::timeout(bound, find)
            .await
            .map_err(|_| BleError::Timeout { during: "resolving GATT services", after: bound })?
    }
}

/// The characteristics at `layout`, if BlueZ has resolved the device's services and the three
/// objects there are LHP/1's (asked together: one round trip).
async fn at_layout(device: &bluer::Device, layout: GattLayout) -> Option<[Characteristic; 3]> {
    let service = device.service(layout.service).await.ok()?;
    let [w, n, i] = layout.characteristics;
    let chars = [
        service.characteristic(w).await.ok()?,
        service.characteristic(n).await.ok()?,
        service.characteristic(i).await.ok()?,
    ];
    let (resolved, uuids) =
        futures::join!(device.is_services_resolved(), futures::future::join_all(chars.iter().map(|c| c.uuid())));
    let all_there =
        uuids.into_iter().zip(LHP_CHARACTERISTICS).all(|(uuid, want)| uuid.is_ok_and(|u| u.as_u128() == want));
    (resolved.ok()? && all_there).then_some(chars)
}

/// The characteristics looked up in BlueZ's object tree, once it has resolved the device's
/// services.
async fn look_up_characteristics(device: &bluer::Device) -> Result<[Characteristic; 3], BleError> {
    let services = device.services().await.map_err(|e| match e.kind {
        ErrorKind::ServicesUnresolved => BleError::LinkLost,
        _ => bus_error(e),
    })?;
    let service_uuid = bluer::Uuid::from_u128(SERVICE_UUID);
    let mut service = None;
    for s in services {
        if s.uuid().await.map_err(bus_error)? == service_uuid {
            service = Some(s);
            break;
        }
    }
    let service = service.ok_or_else(|| BleError::NotALock("no LHP/1 service".into()))?;
    let mut found: [Option<Characteristic>; 3] = [None, None, None];
    for c in service.characteristics().await.map_err(bus_error)? {
        let uuid = c.uuid().await.map_err(bus_error)?.as_u128();
        let slot = LHP_CHARACTERISTICS.iter().position(|u| *u == uuid);
        if let Some(i) = slot {
            found[i] = Some(c);
        }
    }
    match found {
        [Some(w), Some(n), Some(i)] => Ok([w, n, i]),
        _ => Err(BleError::NotALock("LHP/1 service lacks a characteristic".into())),
    }
}

impl LockTransport for BluezTransport {
    type Link = BluezLink;

    async fn scan(&self, duration: Duration) -> Result<Vec<Advertisement>, BleError> {
        let mut seen = BTreeMap::new();
        let events = self.discover().await?;
        let mut events = std::pin::pin!(events);
        let until = tokio::time::Instant::now() + duration;
        while let Ok(Some(ad)) = tokio::time::timeout_at(until, events.next()).await {
            seen.insert(ad.address.clone(), ad);
        }
        let mut found: Vec<Advertisement> = seen.into_values().collect();
        Advertisement::sort_strongest_first(&mut found);
        Ok(found)
    }

    async fn locate(&self, lock_id: LockId, timeout: Duration) -> Result<Advertisement, BleError> {
        let events = self.discover().await?;
        let mut events = std::pin::pin!(events);
        let seen = async {
            while let Some(ad) = events.next().await {
                if ad.is_of(lock_id) {
                    return Some(ad);
                }
            }
            None
        };
        match tokio::time::timeout(timeout, seen).await {
            Ok(Some(ad)) => Ok(ad),
            _ => Err(BleError::NotFound(lock_id.to_string())),
        }
    }

    async fn find(&self, address: &str, timeout: Duration) -> Result<(), BleError> {
        let events = self.discover().await?;
        let mut events = std::pin::pin!(events);
        let seen = async {
            while let Some(ad) = events.next().await {
                if ad.address.eq_ignore_ascii_case(address) {
                    return true;
                }
            }
            false
        };
        match tokio::time::timeout(timeout, seen).await {
            Ok(true) => Ok(()),
            _ => Err(BleError::Unreachable {
                address: address.to_owned(),
                detail: format!("not seen in a scan within {timeout:?}"),
            }),
        }
    }

    async fn listen(
        self: Arc<Self>,
        silence: Duration,
        heard: impl FnMut(&Advertisement) + Send,
        shutdown: watch::Receiver<bool>,
    ) {
        listen::listen(self, silence, heard, shutdown).await;
    }

    fn remembers(&self, address: &str) -> bool {
        address.parse::<Address>().is_ok_and(|address| {
            self.layouts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains_key(&address)
        })
    }

    fn forget(&self, address: &str) {
        if let Ok(address) = address.parse::<Address>() {
            self.layouts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&address);
        }
    }

    async fn connect(&self, address: &str) -> Result<BluezLink, BleError> {
        let addr: Address = address.parse().map_err(|_| BleError::NotFound(format!("{address} (not an address)")))?;
        // Connecting to the bus again is part of setting the link up, as finding the lock is:
        // once per call, it does not use up one of the caller's attempts.
        let mut bus_tries = 2;
        loop {
            let bluez = self.bus.live().await?;
            tokio::select! {
                connected = self.connect_on(&bluez, address, addr) => return connected,
                () = bus_silent(&bluez) => {
                    bluez.gone.store(true, Ordering::Release);
                    bus_tries -= 1;
                    if bus_tries == 0 {
                        return Err(BleError::Bus(format!(
                            "the connection to the bus is dead (the D-Bus daemon restarted?) and a new one did not answer within {BUS_SILENCE:?}"
                        )));
                    }
                    tracing::info!("the connection to D-Bus is dead: connecting again");
                }
            }
        }
    }
}

impl BluezTransport {
    /// Connects to the lock at `address` over `bluez` and readies its characteristics.
    async fn connect_on(&self, bluez: &Bluez, address: &str, addr: Address) -> Result<BluezLink, BleError> {
        let device = bluez.adapter.device(addr).map_err(bus_error)?;
        // Until the link is handed over, giving up on it (a caller's timeout dropping this
        // future) cancels what BlueZ is doing for it.
        let attempt = Attempt { device: Some(device.clone()) };
        let mut connected = device.connect().await;
        if connected.as_ref().is_err_and(in_progress) {
            // An attempt nobody waits for any more (an earlier caller of ours that timed out
            // before the cancel reached BlueZ, or a process that died): cancel it, then ask
            // again. bluetoothd would otherwise refuse every Connect until it gives up.
            tracing::info!(address, "an earlier connection attempt was still pending: cancelling it");
            let _ = device.disconnect().await;
            connected = device.connect().await;
        }
        if connected.as_ref().is_err_and(|e| e.kind == ErrorKind::AlreadyConnected) {
            // BlueZ keeps a link when its client goes away: this one was left up by a gateway
            // process that died with it, and nobody holds its characteristics. Start clean;
            // the lock drops that session's state with the link.
            tracing::info!(address, "the lock was left connected by an earlier run: reconnecting");
            let _ = device.disconnect().await;
            connected = device.connect().await;
        }
        match connected {
            Ok(()) => {}
            Err(e) => {
                // BlueZ answered: its attempt is over, nothing to cancel.
                attempt.settled();
                return Err(match e.kind {
                    ErrorKind::NotFound | ErrorKind::DoesNotExist => BleError::NotFound(address.to_owned()),
                    ErrorKind::NotReady => BleError::AdapterOff(bluez.adapter.name().to_owned()),
                    ErrorKind::Failed
                    | ErrorKind::ConnectionAttemptFailed
                    | ErrorKind::NotAvailable
                    | ErrorKind::InProgress => BleError::Unreachable { address: address.to_owned(), detail: e.message },
                    _ => bus_error(e),
                });
            }
        }
        let stale_cache = std::sync::atomic::AtomicBool::new(false);
        let ready = async {
            // Subscribe after the connection is up (an earlier subscription can still receive
            // the previous connection's `Connected: false`), then check it is still up.
            let events = device.events().await.map_err(bus_error)?;
            if !device.is_connected().await.map_err(bus_error)? {
                return Err(BleError::LinkLost);
            }
            let [write, notify, info] = self.find_characteristics(&device).await?;
            // Four independent questions to BlueZ, asked together: one round trip, not four.
            // On a failure the sockets acquired meanwhile close as they drop.
            // Bounded too: bluetoothd answers AcquireNotify only once the lock acknowledged its
            // CCCD write, and a lock that restarted under a link BlueZ still believes in (its
            // GATT table registered anew) left this waiting for the caller's whole connect
            // bound, its late acquisition then refusing the next attempts ("Notify acquired").
            let bound = self.resolve_timeout;
            let (info, char_mtu, writer, reader) = tokio::time::timeout(bound, async {
                futures::join!(info.read(), write.mtu(), write.write_io(), notify.notify_io())
            })
            .await
            .map_err(|_| BleError::Timeout { during: "acquiring the lock's characteristics", after: bound })?;
            // The info record is readable by anyone, the write characteristic takes writes
            // without response and the notify one notifies: refused or "not supported", BlueZ
            // used a GATT table it cached before the lock's changed.
            let stale = |e: bluer::Error| {
                if matches!(e.kind, ErrorKind::NotPermitted | ErrorKind::NotSupported) {
                    stale_cache.store(true, Ordering::Release);
                }
                bus_error(e)
            };
            // The info record has one fixed form: anything else was read from another
            // attribute, where BlueZ's stale copy of the table put the info characteristic.
            let info = LockInfo::parse(&info.map_err(stale)?).map_err(|e| {
                stale_cache.store(true, Ordering::Release);
                BleError::Bus(format!(
                    "the lock's info record read wrong ({e}): BlueZ's copy of its GATT table is stale"
                ))
            })?;
            // bluer reports both sizes already reduced to what one write may carry.
            let (char_mtu, writer, reader) = (char_mtu.map_err(stale)?, writer.map_err(stale)?, reader.map_err(stale)?);
            let max_fragment = writer.mtu().min(char_mtu);
            if max_fragment < MIN_FRAGMENT_LEN {
                return Err(BleError::NotALock(format!("write size {max_fragment} below {MIN_FRAGMENT_LEN}")));
            }
            Ok((events, info, writer, reader, max_fragment.min(MAX_FRAGMENT_LEN)))
        };
        let result = ready.await;
        attempt.settled();
        match result {
            Ok((events, info, writer, reader, max_fragment)) => {
                Ok(BluezLink { device, writer, reader, events: Box::pin(events), down: false, max_fragment, info })
            }
            Err(e) => {
                let _ = device.disconnect().await;
                if stale_cache.load(Ordering::Acquire) {
                    // Seen when a lock's controller was reset and its GATT table registered
                    // anew (and after firmware updates that move it without saying so): only
                    // forgetting the device drops BlueZ's copy. The next attempt finds the
                    // lock again and reads its table afresh.
                    tracing::info!(address, "BlueZ's copy of the lock's GATT table is stale: forgetting the device");
                    let _ = bluez.adapter.remove_device(addr).await;
                    self.forget(address);
                }
                Err(e)
            }
        }
    }
}

/// A connection being set up. Dropped before [`Attempt::settled`] (its caller timed out), it
/// asks BlueZ to let go: a Connect call abandoned on our side is still pending in bluetoothd,
/// which then refuses every new one ("Operation already in progress") until its own attempt
/// gives up, tens of seconds later. `Device1.Disconnect` cancels a pending attempt as well as
/// a link made meanwhile that nobody will use.
struct Attempt {
    device: Option<bluer::Device>,
}

impl Attempt {
    /// The attempt ended on its own (link handed over, or an error already handled).
    fn settled(mut self) {
        self.device = None;
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(device) = self.device.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                tracing::debug!(address = %device.address(), "connection attempt abandoned: cancelling it");
                let _ = tokio::time::timeout(BUS_SILENCE, device.disconnect()).await;
            });
        }
    }
}

/// Whether BlueZ refused a Connect because an attempt to the same device is pending
/// (bluetoothd 5.66: `org.bluez.Error.Failed` "Operation already in progress"; later
/// versions `org.bluez.Error.InProgress`).
fn in_progress(e: &bluer::Error) -> bool {
    e.kind == ErrorKind::InProgress || (e.kind == ErrorKind::Failed && e.message.contains("already in progress"))
}

/// One BlueZ connection to a lock.
pub struct BluezLink {
    device: bluer::Device,
    writer: CharacteristicWriter,
    reader: CharacteristicReader,
    events: Pin<Box<dyn Stream<Item = DeviceEvent> + Send>>,
    /// BlueZ said the link is down: only what the notification socket still holds is left.
    down: bool,
    max_fragment: usize,
    info: LockInfo,
}

impl std::fmt::Debug for BluezLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BluezLink")
            .field("device", &self.device.address())
            .field("max_fragment", &self.max_fragment)
            .finish()
    }
}

impl BluezLink {
    /// The lock's info record, read on connect.
    pub fn info(&self) -> &LockInfo {
        &self.info
    }
}

impl LockLink for BluezLink {
    fn info(&self) -> LockInfo {
        self.info
    }

    fn max_fragment(&self) -> usize {
        self.max_fragment
    }

    async fn write(&mut self, fragment: &[u8]) -> Result<(), BleError> {
        self.writer.send(fragment).await.map_err(|_| BleError::LinkLost)
    }

    async fn recv(&mut self) -> Result<Vec<u8>, BleError> {
        let reader = &self.reader;
        let fragment = next_fragment(|| reader.recv(), &mut self.events, &mut self.down).await;
        if let Ok(f) = &fragment {
            tracing::trace!(len = f.len(), head = f.first().copied(), "fragment from the lock");
        }
        fragment
    }

    async fn close(self) {
        let BluezLink { device, writer, reader, events, .. } = self;
        drop((writer, reader, events));
        // Disconnecting an already-gone device fails harmlessly.
        let _ = device.disconnect().await;
    }
}

/// How long, once BlueZ has said a link is down, what the lock sent before it went may take to
/// be read. BlueZ closes the notification socket with the link, so this bounds only a socket
/// left open.
const DRAIN_AFTER_DOWN: Duration = Duration::from_millis(500);

/// The next notification fragment of a link, read with `read`; [`BleError::LinkLost`] once
/// the link is down and nothing is left.
///
/// The lock's last words and the news of the link's end travel apart — the socket, and a
/// D-Bus signal — and the signal can be seen first: a lock answers an unpair, then drops the
/// link, and a busy gateway finds both waiting. So once `events` says the link is down
/// (`down` remembers it across calls), what the socket still holds is read until it closes,
/// instead of the answer being taken for lost.
async fn next_fragment<F>(
    mut read: impl FnMut() -> F,
    events: &mut (impl Stream<Item = DeviceEvent> + Unpin),
    down: &mut bool,
) -> Result<Vec<u8>, BleError>
where
    F: Future<Output = std::io::Result<Vec<u8>>>,
{
    // A closed notification socket reads as an empty datagram.
    let fragment = |r: std::io::Result<Vec<u8>>| match r {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => Err(BleError::LinkLost),
    };
    while !*down {
        tokio::select! {
            r = read() => return fragment(r),
            ev = events.next() => match ev {
                None | Some(DeviceEvent::PropertyChanged(DeviceProperty::Connected(false))) => *down = true,
                Some(_) => {}
            },
        }
    }
    match tokio::time::timeout(DRAIN_AFTER_DOWN, read()).await {
        Ok(r) => fragment(r),
        Err(_) => Err(BleError::LinkLost),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A notification socket pair (SOCK_SEQPACKET, as BlueZ hands out): the lock's end, and
    /// the gateway's for tokio.
    fn notify_pair() -> (std::os::unix::net::UnixDatagram, tokio::net::UnixDatagram) {
        let (lock, ours) = socket2::Socket::pair(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None).unwrap();
        ours.set_nonblocking(true).unwrap();
        let ours = std::os::unix::net::UnixDatagram::from(std::os::fd::OwnedFd::from(ours));
        (
            std::os::unix::net::UnixDatagram::from(std::os::fd::OwnedFd::from(lock)),
            tokio::net::UnixDatagram::from_std(ours).unwrap(),
        )
    }

    async fn recv_on(socket: &tokio::net::UnixDatagram) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0; 64];
        let n = socket.recv(&mut buf).await?;
        buf.truncate(n);
        Ok(buf)
    }

    fn link_down() -> futures::stream::Iter<std::vec::IntoIter<DeviceEvent>> {
        futures::stream::iter(vec![
            DeviceEvent::PropertyChanged(DeviceProperty::Rssi(-40)),
            DeviceEvent::PropertyChanged(DeviceProperty::Connected(false)),
        ])
    }

    /// The lock answered and dropped the link before the gateway looked: the answer is read,
    /// whichever of the two the gateway sees first, and then the link is lost.
    #[tokio::test]
    async fn what_the_lock_sent_before_the_link_went_is_read_first() {
        for _ in 0..32 {
            let (lock, ours) = notify_pair();
            lock.send(b"last words").unwrap();
            lock.send(b"and more").unwrap();
            drop(lock);
            let (mut events, mut down) = (link_down(), false);
            assert_eq!(next_fragment(|| recv_on(&ours), &mut events, &mut down).await.unwrap(), b"last words");
            assert_eq!(next_fragment(|| recv_on(&ours), &mut events, &mut down).await.unwrap(), b"and more");
            assert_eq!(next_fragment(|| recv_on(&ours), &mut events, &mut down).await, Err(BleError::LinkLost));
        }
    }

    /// A link that goes with nothing in flight is lost as soon as its socket closes — and
    /// within the drain bound if BlueZ were to leave the socket open.
    #[tokio::test(start_paused = true)]
    async fn a_link_gone_quiet_is_lost_at_once_or_within_the_bound() {
        let (lock, ours) = notify_pair();
        drop(lock);
        let (mut events, mut down) = (link_down(), false);
        let started = tokio::time::Instant::now();
        assert_eq!(next_fragment(|| recv_on(&ours), &mut events, &mut down).await, Err(BleError::LinkLost));
        assert!(started.elapsed() < DRAIN_AFTER_DOWN, "a closed socket is not waited out");

        let (_open, ours) = notify_pair();
        let (mut events, mut down) = (link_down(), false);
        assert_eq!(next_fragment(|| recv_on(&ours), &mut events, &mut down).await, Err(BleError::LinkLost));
        assert!(down);
    }
}
