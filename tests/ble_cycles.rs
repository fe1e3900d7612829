//! 200 connect / disconnect cycles over the real D-Bus path leave nothing behind: no tokio
//! tasks, no D-Bus match rules, no file descriptors. In a binary of its own, so that the
//! counts are this test's alone.

mod support;

use std::collections::HashMap;
use std::sync::Arc;

use lockhub::ble::BleConfig;
use lockhub::ble::budget::ConnectionBudget;
use lockhub::protocol::message::{Actor, Op};
use support::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Footprint {
    tasks: usize,
    match_rules: usize,
    fds: usize,
}

async fn footprint(bus: &zbus::Connection) -> Footprint {
    let reply = bus
        .call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus.Debug.Stats"),
            "GetAllMatchRules",
            &(),
        )
        .await
        .expect("dbus-daemon's Debug.Stats interface");
    let rules: HashMap<String, Vec<String>> = reply.body().deserialize().expect("a{sas}");
    Footprint {
        tasks: tokio::runtime::Handle::current().metrics().num_alive_tasks(),
        match_rules: rules.values().map(Vec::len).sum(),
        fds: std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count(),
    }
}

/// Waits (bounded, by yielding and asking the bus, never by sleeping) for clean-up that
/// finishes asynchronously after a disconnect, then reports the footprint.
async fn settled(bus: &zbus::Connection, baseline: Footprint) -> Footprint {
    let mut now = footprint(bus).await;
    for _ in 0..200 {
        if now.tasks <= baseline.tasks && now.match_rules <= baseline.match_rules && now.fds <= baseline.fds {
            break;
        }
        tokio::task::yield_now().await;
        now = footprint(bus).await;
    }
    now
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_connect_disconnect_cycles_leave_no_growth() {
    crate::needs!(Dbus);
    let ctl = control().await;
    let lock = add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    let transport = Arc::new(transport().await);
    let config = BleConfig::default();
    let budget = ConnectionBudget::new(config.max_links);
    let mut client = paired_client(transport, &lock, config, budget, "hub-cycles").await;
    let bus = bus().await;

    let mut cycle = async || {
        client.call(Actor::Hub, Op::Status).await.unwrap();
        client.disconnect().await;
    };
    for _ in 0..10 {
        cycle().await;
    }
    let before = footprint(&bus).await;
    for _ in 0..200 {
        cycle().await;
    }
    let after = settled(&bus, before).await;
    println!("footprint before: {before:?}, after 200 cycles: {after:?}");
    assert!(after.tasks <= before.tasks, "tasks grew: {before:?} -> {after:?}");
    assert!(after.match_rules <= before.match_rules, "match rules grew: {before:?} -> {after:?}");
    assert!(after.fds <= before.fds, "file descriptors grew: {before:?} -> {after:?}");
    let counters = ctl.counters().await.unwrap();
    assert!(counters.contains(r#""active_links":0"#), "{counters}");
}
