//! Listening to the radio costs no calls to BlueZ: discovery reads a lock's RSSI and
//! manufacturer data when it first reports the lock, and builds every later advertisement
//! from the signal that carries it. Under a discovery filter BlueZ signals each advertisement
//! it hears (the emulator, as BlueZ, every 300 ms for each lock in range), so a gateway that
//! called back for each would keep bluetoothd and its own thread busy all day, and its
//! commands would queue behind those calls.
//!
//! A binary of its own: a monitor on the private bus counts every property `Get`, and no
//! other test may add to the count.

mod support;

use futures::StreamExt;
use lockhub::ble::Advertisement;
use support::*;

/// The next advertisement of `lock_id` (bounded: a lock not heard fails the test).
async fn heard(stream: &mut (impl futures::Stream<Item = Advertisement> + Unpin), lock_id: &str) -> Advertisement {
    let next = async {
        loop {
            let ad = stream.next().await.expect("discovery goes on");
            if ad.is_of(lockhub::protocol::ids::LockId::parse(lock_id).unwrap()) {
                return ad;
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), next).await.expect("the lock advertises")
}

#[tokio::test]
async fn advertisements_after_the_first_ask_bluez_nothing_and_carry_what_changed() {
    crate::needs!(Dbus);
    let ctl = control().await;
    let lock = add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    let transport = std::sync::Arc::new(transport().await);
    // Paired (out of pairing mode, which the pairing button then changes), the link dropped,
    // as a gateway's is between commands.
    let config = lockhub::ble::BleConfig::default();
    let budget = lockhub::ble::budget::ConnectionBudget::new(config.max_links);
    let mut client = paired_client(transport.clone(), &lock, config, budget, "hub-discovery").await;
    client.disconnect().await;

    let mut gets = support::bus_calls::BusCalls::watch("Get").await;
    let stream = transport.discover().await.expect("discovery");
    let mut stream = std::pin::pin!(stream);

    let first = heard(&mut stream, &lock.lock_id).await;
    assert_eq!(
        (first.rssi, first.address.as_str(), first.pairing_mode),
        (-60, lock.address.as_str(), false),
        "{first:?}"
    );
    let asked = gets.since_last().await;
    assert!((1..=2).contains(&asked), "the first report reads RSSI and manufacturer data: {asked} calls");

    for _ in 0..5 {
        heard(&mut stream, &lock.lock_id).await;
    }
    assert_eq!(gets.since_last().await, 0, "five more advertisements asked BlueZ nothing");

    // What changes comes in the signal: a new strength, and the lock's record (here its
    // pairing mode, as its flag of unread events would).
    ctl.set_rssi(&lock.lock_id, -75).await.unwrap();
    let weaker = loop {
        let ad = heard(&mut stream, &lock.lock_id).await;
        if ad.rssi == -75 {
            break ad;
        }
    };
    assert!(!weaker.pairing_mode, "{weaker:?}");
    ctl.press_pairing_button(&lock.lock_id).await.unwrap();
    loop {
        let ad = heard(&mut stream, &lock.lock_id).await;
        if ad.pairing_mode {
            assert_eq!(ad.rssi, -75, "the strength heard last stays with the lock: {ad:?}");
            break;
        }
    }
    assert_eq!(gets.since_last().await, 0, "changes came in the signals, not by asking");

    // Out of range, BlueZ drops the device; back in, it is a new report, read afresh once,
    // and what it advertises from then on comes in the signals again.
    ctl.set_in_range(&lock.lock_id, false).await.unwrap();
    ctl.set_rssi(&lock.lock_id, -50).await.unwrap();
    ctl.set_in_range(&lock.lock_id, true).await.unwrap();
    loop {
        if heard(&mut stream, &lock.lock_id).await.rssi == -50 {
            break;
        }
    }
    let asked = gets.since_last().await;
    assert!((1..=2).contains(&asked), "a device back in range is read again: {asked} calls");
    for _ in 0..3 {
        assert_eq!(heard(&mut stream, &lock.lock_id).await.rssi, -50);
    }
    assert_eq!(gets.since_last().await, 0, "and not again");

    // And watched once: had the watch on its earlier report outlived it, each signal would
    // come out twice. Between two strengths that mark where to start and stop counting, the
    // stream yields one advertisement for each change the bus carried.
    let mut signals = DeviceSignals::watch(&lock.address).await;
    ctl.set_rssi(&lock.lock_id, -51).await.unwrap();
    let mut yielded = 0;
    while yielded < 3 {
        match heard(&mut stream, &lock.lock_id).await.rssi {
            -51 => yielded += 1,
            -50 => {}
            other => panic!("a strength nobody set: {other}"),
        }
    }
    ctl.set_rssi(&lock.lock_id, -52).await.unwrap();
    loop {
        match heard(&mut stream, &lock.lock_id).await.rssi {
            -51 => yielded += 1,
            -52 => break,
            other => panic!("a strength out of order: {other}"),
        }
    }
    assert_eq!(yielded, signals.between(-51, -52).await, "one advertisement per change signalled");
}

/// The `PropertiesChanged` signals BlueZ sends for one device, as a monitor on the bus sees
/// them: in the order the bus routes them, which is the order the gateway receives them in.
struct DeviceSignals {
    monitor: zbus::MessageStream,
    path: String,
}

impl DeviceSignals {
    async fn watch(address: &str) -> Self {
        let path = lockhub::firmware::bluez::device_path(address).to_string();
        let rule = format!(
            "type='signal',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged',path='{path}'"
        );
        DeviceSignals { monitor: support::bus_calls::monitor(&[rule.as_str()]).await, path }
    }

    /// The changes that make an advertisement (RSSI or manufacturer data) in the signals from
    /// the first carrying RSSI `from` up to the first carrying RSSI `to`, that one left out.
    async fn between(&mut self, from: i16, to: i16) -> usize {
        use std::collections::HashMap;
        use zbus::OwnedVariant;
        let mut counting = false;
        let mut count = 0;
        let counted = async {
            while let Some(message) = self.monitor.next().await {
                let message = message.expect("reading the monitor");
                if message.header().path().is_none_or(|p| p.as_str() != self.path) {
                    continue;
                }
                let (interface, changed, _): (String, HashMap<String, OwnedVariant>, Vec<String>) =
                    message.body().deserialize().expect("a PropertiesChanged body");
                if interface != "org.bluez.Device1" {
                    continue;
                }
                let rssi = changed.get("RSSI").map(|v| i16::try_from(v).expect("RSSI is an int16"));
                match rssi {
                    Some(r) if r == to && counting => return count,
                    Some(r) if r == from => counting = true,
                    _ => {}
                }
                if counting {
                    // bluer hands on each property a signal carries as an event of its own (the
                    // emulator signals one at a time; BlueZ may batch RSSI and the record).
                    count += usize::from(rssi.is_some()) + usize::from(changed.contains_key("ManufacturerData"));
                }
            }
            panic!("the monitor's connection ended");
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), counted)
            .await
            .expect("the signals reached the monitor")
    }
}
