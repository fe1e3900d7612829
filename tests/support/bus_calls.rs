//! Counting the calls clients make to BlueZ on the private bus: a monitor connection sees
//! every method call the bus daemon routes, in the order it routes them. A test that counts
//! must be the only one in its binary: the bus is the process's. [`monitor`] makes such a
//! connection for any match rules (signals too).

use futures::StreamExt;

use super::test_bed;

/// The calls of one method to `org.bluez`, counted as the bus routes them.
pub struct BusCalls {
    member: &'static str,
    monitor: zbus::MessageStream,
    /// A connection that pings the emulator to mark a point in the bus's order of messages.
    marker: zbus::Connection,
}

impl BusCalls {
    /// Starts counting the calls of `member` (a method's name, such as `GetManagedObjects`).
    pub async fn watch(member: &'static str) -> Self {
        let counted = format!("type='method_call',member='{member}'");
        let monitor =
            monitor(&[counted.as_str(), "type='method_call',interface='org.freedesktop.DBus.Peer',member='Ping'"])
                .await;
        let marker = zbus::connection::Builder::address(test_bed().bus.as_str()).build().await.unwrap();
        BusCalls { member, monitor, marker }
    }

    /// How many calls went to BlueZ since the last count: everything the bus routed before a
    /// ping sent now.
    pub async fn since_last(&mut self) -> usize {
        self.marker
            .call_method(Some("org.bluez"), "/", Some("org.freedesktop.DBus.Peer"), "Ping", &())
            .await
            .expect("pinging the emulator");
        let member = self.member;
        let mut calls = 0;
        let counted = async {
            while let Some(message) = self.monitor.next().await {
                let message = message.expect("reading the monitor");
                let header = message.header();
                match header.member().map(|m| m.as_str()) {
                    Some("Ping") => return calls,
                    Some(m) if m == member && header.destination().is_some_and(|d| d.as_str() == "org.bluez") => {
                        calls += 1
                    }
                    _ => {}
                }
            }
            panic!("the monitor's connection ended");
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), counted).await.expect("the ping reached the monitor")
    }
}

/// A connection turned monitor of the private bus: every message matching one of `rules`, in
/// the order the bus routes them.
pub async fn monitor(rules: &[&str]) -> zbus::MessageStream {
    let monitor = zbus::connection::Builder::address(test_bed().bus.as_str()).build().await.unwrap();
    monitor
        .call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus.Monitoring"),
            "BecomeMonitor",
            &(rules, 0u32),
        )
        .await
        .expect("becoming a monitor of the private bus");
    zbus::MessageStream::from(monitor)
}
