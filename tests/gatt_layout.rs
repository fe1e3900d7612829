//! Connecting again to a lock names its characteristics where they were found the first time,
//! instead of listing BlueZ's whole object tree; a lock whose handles moved is looked up again.
//!
//! A binary of its own: a monitor on the private bus counts every `GetManagedObjects`, and no
//! other test may add to the count.

mod support;

use std::sync::Arc;

use futures::StreamExt;
use lockhub::ble::budget::ConnectionBudget;
use lockhub::ble::{BleConfig, LockTransport};
use lockhub::protocol::message::{Actor, Op, Reply, UserRef};
use support::*;

const USER: Actor = Actor::Cloud(UserRef([0x0c; 8]));

/// The `GetManagedObjects` calls to BlueZ on the private bus, as its daemon routes them.
struct ObjectListings {
    monitor: zbus::MessageStream,
    /// A connection that pings the emulator to mark a point in the bus's order of messages.
    marker: zbus::Connection,
}

impl ObjectListings {
    async fn watch() -> Self {
        let monitor = zbus::connection::Builder::address(bed().bus.as_str()).build().await.unwrap();
        let rules = [
            "type='method_call',member='GetManagedObjects'",
            "type='method_call',interface='org.freedesktop.DBus.Peer',member='Ping'",
        ];
        monitor
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus.Monitoring"),
                "BecomeMonitor",
                &(&rules[..], 0u32),
            )
            .await
            .expect("becoming a monitor of the private bus");
        let marker = zbus::connection::Builder::address(bed().bus.as_str()).build().await.unwrap();
        ObjectListings { monitor: zbus::MessageStream::from(monitor), marker }
    }

    /// How many listings went to BlueZ since the last call: everything the bus routed before a
    /// ping sent now (the monitor sees messages in the order the bus routes them).
    async fn since_last(&mut self) -> usize {
        self.marker
            .call_method(Some("org.bluez"), "/", Some("org.freedesktop.DBus.Peer"), "Ping", &())
            .await
            .expect("pinging the emulator");
        let mut listings = 0;
        let counted = async {
            while let Some(message) = self.monitor.next().await {
                let message = message.expect("reading the monitor");
                let header = message.header();
                match header.member().map(|m| m.as_str()) {
                    Some("Ping") => return listings,
                    Some("GetManagedObjects") if header.destination().is_some_and(|d| d.as_str() == "org.bluez") => {
                        listings += 1
                    }
                    _ => {}
                }
            }
            panic!("the monitor's connection ended");
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), counted).await.expect("the ping reached the monitor")
    }
}

#[tokio::test]
async fn a_lock_is_connected_again_by_its_known_handles_until_they_move() {
    let ctl = control().await;
    let lock = add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    let transport = Arc::new(transport().await);
    let mut listings = ObjectListings::watch().await;
    let config = BleConfig::default();
    let budget = ConnectionBudget::new(config.max_links);
    let mut client = paired_client(transport.clone(), &lock, config.clone(), budget, "hub-gatt").await;
    assert!(listings.since_last().await >= 1, "the first connection (pairing) looks the characteristics up");

    let mut status = async || {
        let r = client.call(USER, Op::Status).await.expect("a status over a new connection");
        assert!(matches!(r.result, Ok(Reply::Status(_))), "{r:?}");
        client.disconnect().await;
    };
    status().await;
    assert_eq!(listings.since_last().await, 0, "connected again at the known handles");

    // As after a firmware update that rearranged the GATT table.
    ctl.move_gatt_handles(&lock.lock_id, 0x0040).await.unwrap();
    status().await;
    assert!(listings.since_last().await >= 1, "handles that moved are looked up again");
    status().await;
    assert_eq!(listings.since_last().await, 0, "and the new ones are known from then on");

    // What unbinding the lock asks of the transport: nothing of it is kept.
    transport.forget(&lock.address);
    status().await;
    assert!(listings.since_last().await >= 1, "a forgotten lock is looked up again");
}
