//! The connection budget over the real D-Bus path, and the adapter switched off. In a binary
//! of its own: it reads the emulator's global link counters and powers the adapter off.

mod support;

use std::sync::Arc;

use lockhub::ble::bluez::BluezTransport;
use lockhub::ble::budget::ConnectionBudget;
use lockhub::ble::client::{LockClient, pair};
use lockhub::ble::radios::Radios;
use lockhub::ble::{BleConfig, BleError};
use lockhub::protocol::ids::{GatewayId, LockId};
use lockhub::protocol::message::{Actor, LockState, Op, Reply, UserRef};
use lockhub::protocol::pairing::SetupCode;
use serde::Deserialize;
use support::*;

/// The tests of this binary share one adapter and its counters: they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Deserialize)]
struct Counters {
    peak_active_links: usize,
    active_links: usize,
}

#[tokio::test]
async fn ten_locks_commanded_at_once_stay_within_the_budget_and_all_complete() {
    crate::needs!(Dbus);
    let _serial = SERIAL.lock().await;
    let ctl = control().await;
    let mut locks = Vec::new();
    for _ in 0..10 {
        locks.push(add_lock(&ctl, r#"{"motor_ms": 150}"#).await);
    }
    let transport = Arc::new(transport().await);
    let ids: Vec<String> = locks.iter().map(|l| l.lock_id.clone()).collect();
    scan_until_seen(&transport, &ids).await;

    let config = BleConfig::default();
    let budget = ConnectionBudget::new(config.max_links);
    let gateway = GatewayId::new("hub-budget").unwrap();
    let mut clients = Vec::new();
    for lock in &locks {
        let id = LockId::parse(&lock.lock_id).unwrap();
        let code = SetupCode::parse(&lock.setup_code).unwrap();
        let key = pair(&*transport, &budget, &config, &gateway, id, &lock.address, &code).await.unwrap();
        clients.push(LockClient::new(
            Radios::single("hci0", transport.clone(), budget.clone()),
            0,
            config.clone(),
            gateway.clone(),
            id,
            lock.address.clone(),
            key,
        ));
    }
    ctl.reset_peak().await.unwrap();

    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let r = client.call(Actor::Cloud(UserRef([1; 8])), Op::Unlock).await;
                client.disconnect().await;
                r
            })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert!(matches!(r.result, Ok(Reply::Done(s)) if s.state == LockState::Unlocked), "{r:?}");
    }
    let counters: Counters = serde_json::from_str(&ctl.counters().await.unwrap()).unwrap();
    assert!(budget.peak() <= config.max_links, "gateway held {} slots", budget.peak());
    assert!(
        counters.peak_active_links <= config.max_links,
        "the emulator saw {} links at once",
        counters.peak_active_links
    );
    assert_eq!(budget.peak(), config.max_links, "the budget was used in full");
    assert_eq!(counters.active_links, 0);
    for lock in &locks {
        assert_eq!(report(&ctl, &lock.lock_id).await.status.state, LockState::Unlocked);
    }
}

#[tokio::test]
async fn a_powered_off_adapter_is_reported_as_such() {
    crate::needs!(Dbus);
    let _serial = SERIAL.lock().await;
    let ctl = control().await;
    let _ = transport().await;
    ctl.set_powered(false).await.unwrap();
    let err = BluezTransport::open(&lockhub::ble::BleConfig::default()).await.unwrap_err();
    ctl.set_powered(true).await.unwrap();
    assert!(matches!(err, BleError::AdapterOff(_)), "{err}");
    assert_eq!(err.code(), "adapter_off");
    assert!(err.to_string().contains("power it on"), "the message says what to do: {err}");
}

/// A client keeps its link through a run of calls while another lock waits for the only slot:
/// making way is decided between jobs (by the lock's worker), not after every call, or a sync of
/// several calls would reconnect once per call and two locks would trade the slot back and forth
/// (seen through real bluetoothd: 12 connections in 45 s and a command waiting 27 s).
#[tokio::test]
async fn a_run_of_calls_keeps_its_link_while_another_lock_waits() {
    crate::needs!(Dbus);
    let _serial = SERIAL.lock().await;
    let ctl = control().await;
    let first = add_lock(&ctl, r#"{"motor_ms": 50}"#).await;
    let second = add_lock(&ctl, r#"{"motor_ms": 50}"#).await;
    let transport = Arc::new(transport().await);
    let config = BleConfig { max_links: 1, ..BleConfig::default() };
    let budget = ConnectionBudget::new(1);
    let mut a = paired_client(transport.clone(), &first, config.clone(), budget.clone(), "hub-run").await;
    let mut b = paired_client(transport.clone(), &second, config, budget.clone(), "hub-run").await;

    a.call(Actor::Hub, Op::Status).await.unwrap();
    let before = support::connects(&ctl).await;
    let waiting = tokio::spawn(async move {
        let r = b.call(Actor::Hub, Op::Status).await.map(drop);
        b.disconnect().await;
        r
    });
    tokio::time::timeout(std::time::Duration::from_secs(10), budget.someone_waits())
        .await
        .expect("the second lock asks for the slot");
    // As a sync does: read the status, set the clock, read again.
    for op in [Op::Status, Op::SetTime { unix_secs: 1_800_000_000 }, Op::Status] {
        a.call(Actor::Hub, op).await.unwrap();
        assert!(a.is_connected(), "the link stays up between calls while another lock waits");
    }
    assert_eq!(support::connects(&ctl).await, before, "three more calls, no new connection");
    a.disconnect().await;
    waiting.await.unwrap().unwrap();
}
