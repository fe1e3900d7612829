//! Connecting again to a lock names its characteristics where they were found the first time,
//! instead of listing BlueZ's whole object tree; a lock whose handles moved is looked up again,
//! and the transport keeps nothing of a lock that failed to pair or was forgotten (unbound).
//!
//! A binary of its own: a monitor on the private bus counts every `GetManagedObjects`, and no
//! other test may add to the count.

mod support;

use std::sync::Arc;

use lockhub::ble::budget::ConnectionBudget;
use lockhub::ble::{BleConfig, LockTransport};
use lockhub::protocol::message::{Actor, Op, Reply, UserRef};
use support::*;

const USER: Actor = Actor::Cloud(UserRef([0x0c; 8]));

#[tokio::test]
async fn a_lock_is_reconnected_by_its_known_handles_and_nothing_is_kept_of_locks_not_ours() {
    crate::needs!(Dbus);
    let ctl = control().await;
    let lock = add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    let transport = Arc::new(transport().await);
    let mut listings = support::bus_calls::BusCalls::watch("GetManagedObjects").await;
    let config = BleConfig::default();
    let budget = ConnectionBudget::new(config.max_links);

    // Found by a scan first: starting a discovery lists the tree too (bluer enumerates the
    // devices BlueZ already knows), so the counts below start after it.
    scan_until_seen(&transport, std::slice::from_ref(&lock.lock_id)).await;
    listings.since_last().await;
    let gateway = lockhub::protocol::ids::GatewayId::new("hub-gatt").unwrap();
    let lock_id = lockhub::protocol::ids::LockId::parse(&lock.lock_id).unwrap();
    let pair = |code| lockhub::ble::client::pair(&*transport, &budget, &config, &gateway, lock_id, &lock.address, code);

    // A pairing that fails (a wrong setup code) leaves nothing of the lock in the transport.
    let wrong = wrong_setup_code(&lock.setup_code);
    let refused = pair(&wrong).await;
    assert!(refused.is_err(), "a wrong setup code pairs nothing");
    assert!(listings.since_last().await >= 1, "a lock's first connection looks the characteristics up");
    let code = lockhub::protocol::pairing::SetupCode::parse(&lock.setup_code).unwrap();
    let key = pair(&code).await.expect("pairing with the right code");
    assert!(listings.since_last().await >= 1, "and so does the next one after a failed pairing");
    let mut client = lockhub::ble::client::LockClient::new(
        lockhub::ble::radios::Radios::single("hci0", transport.clone(), budget.clone()),
        0,
        config.clone(),
        gateway.clone(),
        lock_id,
        lock.address.clone(),
        key,
    );

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

    // BlueZ's copy of the table gone stale (its info characteristic where another attribute
    // now sits, as bluetoothd showed after the lock's controller was reset): the hub forgets
    // the device, which drops the copy, finds the lock again and reads it afresh.
    ctl.set_stale_gatt_cache(&lock.lock_id).await.unwrap();
    let connects = support::connects(&ctl).await;
    status().await;
    assert!(support::connects(&ctl).await >= connects + 2, "a connection read the stale copy, the next one worked");
    status().await;
}

/// A setup code that is not `code`: its last digit changed.
fn wrong_setup_code(code: &str) -> lockhub::protocol::pairing::SetupCode {
    let mut digits: Vec<char> = code.chars().collect();
    let last = digits.iter().rposition(char::is_ascii_digit).expect("a setup code has digits");
    digits[last] = if digits[last] == '0' { '1' } else { '0' };
    lockhub::protocol::pairing::SetupCode::parse(&digits.into_iter().collect::<String>()).expect("still a setup code")
}
