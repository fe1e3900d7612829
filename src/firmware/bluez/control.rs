//! `io.lockhub.Emulator1` at `/io/lockhub/Emulator`: what a test or a person does to the
//! emulated locks — add and remove them, move them in and out of range, press their buttons,
//! turn their fault knobs, read their state. Structured arguments and results are JSON strings.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;
use zbus::interface;

use super::{ADAPTER_PATH, LockSpec, Shared};
use crate::firmware::Faults;
use crate::protocol::message::LockStatus;

/// The control interface's name.
pub const EMULATOR_INTERFACE: &str = "io.lockhub.Emulator1";

/// The control object.
pub(super) struct Control {
    pub(super) shared: Arc<Shared>,
}

/// What `LockState` returns (as JSON).
#[derive(Serialize)]
struct LockStateReport {
    lock_id: String,
    address: String,
    setup_code: String,
    in_range: bool,
    rssi: i16,
    connected: bool,
    in_session: bool,
    pairing_mode: bool,
    paired_gateway: Option<String>,
    status: LockStatus,
    faults: Faults,
    passcode_slots: usize,
}

/// What `Counters` returns (as JSON).
#[derive(Serialize)]
struct CountersReport {
    connects: usize,
    active_links: usize,
    peak_active_links: usize,
}

fn invalid(e: impl std::fmt::Display) -> zbus::fdo::Error {
    zbus::fdo::Error::InvalidArgs(e.to_string())
}

#[interface(name = "io.lockhub.Emulator1")]
impl Control {
    /// Adds a lock from a JSON `LockSpec` (every field optional); returns its id.
    async fn add_lock(&self, spec_json: String) -> zbus::fdo::Result<String> {
        let spec: LockSpec = if spec_json.trim().is_empty() {
            LockSpec::default()
        } else {
            serde_json::from_str(&spec_json).map_err(invalid)?
        };
        let lock = self.shared.add_lock(spec).await.map_err(invalid)?;
        Ok(lock.lock_id.to_string())
    }

    /// Removes a lock (its state file stays).
    async fn remove_lock(&self, lock_id: String) -> zbus::fdo::Result<()> {
        let lock = self.shared.lock(&lock_id)?;
        self.shared.remove_lock(&lock).await;
        Ok(())
    }

    /// The ids of all locks.
    fn locks(&self) -> Vec<String> {
        self.shared.locks.lock().expect("lock table poisoned").keys().map(ToString::to_string).collect()
    }

    /// A lock's state as JSON, setup code included (it is on the label in the battery box).
    fn lock_state(&self, lock_id: String) -> zbus::fdo::Result<String> {
        let lock = self.shared.lock(&lock_id)?;
        let (in_range, rssi, connected) = {
            let r = lock.radio();
            (r.in_range, r.rssi, r.connected)
        };
        let report = lock.host.inspect(|fw, now| {
            let p = fw.persistent();
            LockStateReport {
                lock_id: lock.lock_id.to_string(),
                address: lock.address.clone(),
                setup_code: p.identity.setup_code.expose().to_owned(),
                in_range,
                rssi,
                connected,
                in_session: fw.in_session(),
                pairing_mode: p.pairing_mode,
                paired_gateway: p.pairing.as_ref().map(|g| g.gateway_id.to_string()),
                status: fw.status(now),
                faults: fw.faults(),
                passcode_slots: p.passcodes.list().len(),
            }
        });
        serde_json::to_string(&report).map_err(invalid)
    }

    /// Moves a lock into or out of radio range. Out of range drops its link and, as BlueZ
    /// does with devices that stop advertising, removes its device object; it reappears at
    /// the next discovery that sees it.
    async fn set_in_range(&self, lock_id: String, in_range: bool) -> zbus::fdo::Result<()> {
        let lock = self.shared.lock(&lock_id)?;
        lock.radio().in_range = in_range;
        if !in_range {
            self.shared.disconnect(&lock).await;
            self.shared.forget_device(&lock).await;
        }
        Ok(())
    }

    /// Moves the lock out of range (or back) while BlueZ still knows it: its `Device1` stays,
    /// as bluetoothd keeps a device it heard minutes ago, and a `Connect` to it waits for a
    /// lock that does not answer. (`set_in_range(false)` also forgets the device.)
    async fn set_quiet(&self, lock_id: String, quiet: bool) -> zbus::fdo::Result<()> {
        let lock = self.shared.lock(&lock_id)?;
        lock.radio().in_range = !quiet;
        if quiet {
            self.shared.disconnect(&lock).await;
        }
        Ok(())
    }

    /// Sets the RSSI reported while in range.
    fn set_rssi(&self, lock_id: String, rssi: i16) -> zbus::fdo::Result<()> {
        self.shared.lock(&lock_id)?.radio().rssi = rssi;
        Ok(())
    }

    /// Replaces the lock's fault knobs with a JSON `Faults` (every field optional).
    fn set_faults(&self, lock_id: String, faults_json: String) -> zbus::fdo::Result<()> {
        let faults: Faults = serde_json::from_str(&faults_json).map_err(invalid)?;
        self.shared.lock(&lock_id)?.host.input(|fw, _| *fw.faults_mut() = faults);
        Ok(())
    }

    /// Moves the lock's GATT service to `service_handle` (its characteristics after it), from
    /// its next connection on: what a firmware update that rearranges the GATT table does.
    fn move_gatt_handles(&self, lock_id: String, service_handle: u16) -> zbus::fdo::Result<()> {
        if !(1..=super::gatt::LAST_SERVICE_HANDLE).contains(&service_handle) {
            return Err(invalid(format!(
                "service handle {service_handle:#06x} outside 0x0001..={:#06x}",
                super::gatt::LAST_SERVICE_HANDLE
            )));
        }
        self.shared.lock(&lock_id)?.radio().gatt_service_next = Some(service_handle);
        Ok(())
    }

    /// Makes BlueZ's copy of the lock's GATT table stale, as after the lock's controller was
    /// reset behind a link BlueZ kept: reading the info characteristic returns 2 bytes of
    /// another attribute until the device is removed (`RemoveDevice`), which is what drops
    /// bluetoothd's copy.
    fn set_stale_gatt_cache(&self, lock_id: String) -> zbus::fdo::Result<()> {
        self.shared.lock(&lock_id)?.radio().stale_gatt_cache = true;
        Ok(())
    }

    /// Drops the lock's link from the lock's side.
    async fn drop_link(&self, lock_id: String) -> zbus::fdo::Result<()> {
        let lock = self.shared.lock(&lock_id)?;
        self.shared.disconnect(&lock).await;
        Ok(())
    }

    /// Power-cycles the lock.
    async fn reboot(&self, lock_id: String) -> zbus::fdo::Result<()> {
        let lock = self.shared.lock(&lock_id)?;
        lock.host.input(|fw, now| fw.reboot(now));
        self.shared.disconnect(&lock).await;
        Ok(())
    }

    /// Factory reset.
    async fn factory_reset(&self, lock_id: String) -> zbus::fdo::Result<()> {
        let lock = self.shared.lock(&lock_id)?;
        lock.host.input(|fw, _| fw.factory_reset());
        self.shared.disconnect(&lock).await;
        Ok(())
    }

    /// Holds the pairing button.
    fn press_pairing_button(&self, lock_id: String) -> zbus::fdo::Result<()> {
        self.shared.lock(&lock_id)?.host.input(|fw, _| fw.press_pairing_button());
        Ok(())
    }

    /// Types a code on the keypad; returns whether the lock opened.
    fn enter_keypad_code(&self, lock_id: String, code: String) -> zbus::fdo::Result<bool> {
        Ok(self.shared.lock(&lock_id)?.host.input(|fw, now| fw.enter_keypad_code(&code, now)))
    }

    /// Turns the thumb-turn.
    fn turn_knob(&self, lock_id: String) -> zbus::fdo::Result<()> {
        self.shared.lock(&lock_id)?.host.input(|fw, now| fw.turn_knob(now));
        Ok(())
    }

    /// Opens or closes the door.
    fn set_door(&self, lock_id: String, open: bool) -> zbus::fdo::Result<()> {
        self.shared.lock(&lock_id)?.host.input(|fw, now| fw.set_door(open, now));
        Ok(())
    }

    /// Trips the tamper switch.
    fn tamper(&self, lock_id: String) -> zbus::fdo::Result<()> {
        self.shared.lock(&lock_id)?.host.input(|fw, now| fw.trigger_tamper(now));
        Ok(())
    }

    /// Sets the battery level, 0-100 %.
    fn set_battery(&self, lock_id: String, pct: u8) -> zbus::fdo::Result<()> {
        self.shared.lock(&lock_id)?.host.input(|fw, now| fw.set_battery(pct, now));
        Ok(())
    }

    /// Powers the adapter on or off.
    async fn set_powered(&self, powered: bool) -> zbus::fdo::Result<()> {
        *self.shared.powered.lock().expect("power poisoned") = powered;
        if !powered {
            let locks: Vec<_> = self.shared.locks.lock().expect("lock table poisoned").values().cloned().collect();
            for lock in locks {
                self.shared.disconnect(&lock).await;
            }
        }
        let server = self.shared.conn.object_server();
        if let Ok(iface) = server.interface::<_, super::adapter::Adapter>(ADAPTER_PATH).await {
            let _ = iface.get().await.powered_changed(iface.signal_emitter()).await;
        }
        Ok(())
    }

    /// Link counters as JSON: connections made, links up now, the most links up at once.
    fn counters(&self) -> String {
        let c = &self.shared.counters;
        let report = CountersReport {
            connects: c.connects.load(Ordering::Acquire),
            active_links: c.active.load(Ordering::Acquire),
            peak_active_links: c.peak_active.load(Ordering::Acquire),
        };
        serde_json::to_string(&report).expect("counters serialise")
    }

    /// Resets the peak-links counter.
    fn reset_peak(&self) {
        let c = &self.shared.counters;
        c.peak_active.store(c.active.load(Ordering::Acquire), Ordering::Release);
    }
}

/// The client side of `io.lockhub.Emulator1`, for tests and the demo: the same operations,
/// called over the bus (`EmulatorProxy`).
#[zbus::proxy(
    interface = "io.lockhub.Emulator1",
    default_service = "io.lockhub.Emulator",
    default_path = "/io/lockhub/Emulator"
)]
pub trait Emulator {
    /// Adds a lock from a JSON `LockSpec`; returns its id.
    fn add_lock(&self, spec_json: &str) -> zbus::Result<String>;
    /// Removes a lock.
    fn remove_lock(&self, lock_id: &str) -> zbus::Result<()>;
    /// A lock's state as JSON (its setup code included: the label on the box).
    fn lock_state(&self, lock_id: &str) -> zbus::Result<String>;
    /// Moves a lock into or out of range.
    fn set_in_range(&self, lock_id: &str, in_range: bool) -> zbus::Result<()>;
    /// Moves a lock out of range (or back), its `Device1` kept.
    fn set_quiet(&self, lock_id: &str, quiet: bool) -> zbus::Result<()>;
    /// Sets a lock's signal strength.
    fn set_rssi(&self, lock_id: &str, rssi: i16) -> zbus::Result<()>;
    /// Sets a lock's fault knobs (JSON `Faults`).
    fn set_faults(&self, lock_id: &str, faults_json: &str) -> zbus::Result<()>;
    /// Moves a lock's GATT service (and characteristics) from its next connection on.
    fn move_gatt_handles(&self, lock_id: &str, service_handle: u16) -> zbus::Result<()>;
    /// Makes BlueZ's copy of a lock's GATT table stale until the device is removed.
    fn set_stale_gatt_cache(&self, lock_id: &str) -> zbus::Result<()>;
    /// Drops a lock's link.
    fn drop_link(&self, lock_id: &str) -> zbus::Result<()>;
    /// Reboots a lock.
    fn reboot(&self, lock_id: &str) -> zbus::Result<()>;
    /// Factory-resets a lock.
    fn factory_reset(&self, lock_id: &str) -> zbus::Result<()>;
    /// Presses a lock's pairing button.
    fn press_pairing_button(&self, lock_id: &str) -> zbus::Result<()>;
    /// Types a code on a lock's keypad; returns whether it opened.
    fn enter_keypad_code(&self, lock_id: &str, code: &str) -> zbus::Result<bool>;
    /// Turns a lock's thumb-turn.
    fn turn_knob(&self, lock_id: &str) -> zbus::Result<()>;
    /// Opens or closes the door.
    fn set_door(&self, lock_id: &str, open: bool) -> zbus::Result<()>;
    /// Sets the battery level, 0-100 %.
    fn set_battery(&self, lock_id: &str, pct: u8) -> zbus::Result<()>;
    /// Powers the emulated adapter on or off.
    fn set_powered(&self, powered: bool) -> zbus::Result<()>;
    /// Resource counters as JSON.
    fn counters(&self) -> zbus::Result<String>;
    /// Resets the peak counters.
    fn reset_peak(&self) -> zbus::Result<()>;
}
