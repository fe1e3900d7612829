//! The emulated lock keeps its flash in its state directory: a pairing made before the
//! emulator restarts still opens a session after it. In a binary of its own, because it
//! restarts the emulator every test of the binary shares.

mod support;

use std::sync::Arc;

use lockhub::ble::BleConfig;
use lockhub::ble::budget::ConnectionBudget;
use lockhub::protocol::message::{Actor, LockState, Op, Reply};
use support::*;

#[tokio::test]
async fn pairings_and_lock_state_survive_an_emulator_restart() {
    crate::needs!(Dbus);
    let ctl = control().await;
    let lock = add_lock(&ctl, r#"{"motor_ms": 0, "mtu": 23}"#).await;
    let transport = Arc::new(transport().await);
    let config = BleConfig::default();
    let budget = ConnectionBudget::new(config.max_links);
    let mut client = paired_client(transport, &lock, config, budget, "hub-restart").await;
    client.call(Actor::Hub, Op::Unlock).await.unwrap();
    let seq_before = report(&ctl, &lock.lock_id).await.status.last_seq;

    test_bed().restart_emulator();

    let ctl = control().await;
    let after = report(&ctl, &lock.lock_id).await;
    assert!(!after.pairing_mode, "the lock is still paired");
    assert_eq!(after.status.state, LockState::Unlocked);
    assert_eq!(after.setup_code, lock.setup_code);
    // The link was up when org.bluez went away: the gateway is told so, truthfully.
    let err = client.call(Actor::Hub, Op::Status).await.unwrap_err();
    assert_eq!(err.code(), "link_lost", "{err}");
    // The restarted BlueZ knows no devices until it sees them again, as after a real restart:
    // the client finds the lock by itself.
    let r = client.call(Actor::Hub, Op::Status).await.unwrap();
    let Ok(Reply::Status(status)) = r.result else { panic!("{r:?}") };
    assert_eq!(status.state, LockState::Unlocked);
    assert!(status.last_seq >= seq_before, "sequence numbers carry on");
}
