//! The radio side failing under a running gateway, which must recover by itself and say
//! truthfully what happened: a link dropped mid-command, the lock rebooting, `org.bluez`
//! restarting, the D-Bus daemon restarting; and the transport itself once a hung bus daemon
//! was restarted under its connection attempt. In a binary of its own, because it restarts
//! the bus and the emulator every test of a binary shares.

mod support;

use lockhub::auth::statement::{Operation, Permission};
use lockhub::ble::{LockLink, LockTransport};
use lockhub::cloud::reply::{Outcome, Reply};
use support::stack::{Paired, Stack, claim_pair_grant, next_state};

/// Whether a failed reply says what happened on the radio: the lock out of reach, or the link
/// lost while the command was out (whether the lock acted is then unknown: never `ok`).
fn says_the_link_failed(reply: &Reply) -> bool {
    reply.result == Outcome::Failed
        && (reply.reason.map(|r| r.as_str()) == Some("lock_unreachable")
            || reply.detail.as_deref().is_some_and(|d| d.contains("link_lost")))
}

/// The first command after a fault may fail (truthfully); the gateway recovers by itself: the
/// next one works.
async fn recovered(stack: &Stack, p: &Paired, op: Operation, what: &str) -> Option<Reply> {
    let first = p.send(stack, op).await;
    if first.result == Outcome::Ok {
        println!("after {what}: the first command worked");
        return None;
    }
    let second = p.send(stack, op).await;
    assert_eq!(second.result, Outcome::Ok, "no recovery after {what}: {first:?} then {second:?}");
    println!(
        "after {what}: the first command failed ({:?}: {}), the next one worked",
        first.reason,
        first.detail.as_deref().unwrap_or("")
    );
    Some(first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_recovers_from_link_drops_reboots_and_bluez_and_dbus_restarts() {
    crate::needs!(Dbus);
    let stack = Stack::start("gw-radio").await;
    let p = claim_pair_grant(&stack, &[Permission::Lock, Permission::Unlock, Permission::Remote], None).await;
    let ctl = support::control().await;
    assert_eq!(p.send(&stack, Operation::Unlock).await.result, Outcome::Ok);

    // The link drops as the command reaches the lock, before it acts: reported as the link
    // lost (not as done), and the bolt did not move.
    ctl.set_faults(&p.lock.lock_id, r#"{"drop_link_after_frames": 1}"#).await.unwrap();
    let reply = p.send(&stack, Operation::Lock).await;
    assert!(says_the_link_failed(&reply), "{reply:?}");
    let state = support::report(&ctl, &p.lock.lock_id).await.status.state;
    assert_eq!(state, lockhub::protocol::message::LockState::Unlocked, "the lock did not act");
    assert_eq!(p.send(&stack, Operation::Lock).await.result, Outcome::Ok, "the next command reconnects");

    // The lock reboots while the link is up.
    ctl.reboot(&p.lock.lock_id).await.unwrap();
    let after_reboot = recovered(&stack, &p, Operation::Unlock, "a reboot").await;

    // BlueZ (the emulator serving org.bluez) restarts.
    tokio::task::block_in_place(|| support::test_bed().restart_emulator());
    let after_bluez = recovered(&stack, &p, Operation::Lock, "an org.bluez restart").await;

    // The D-Bus daemon restarts (and BlueZ with it). The gateway's connection to the bus is
    // dead, and no command comes to find that out: the radio watch must, and connect to the
    // bus again and start discovery there by itself. With the link gone with BlueZ, only an
    // advertisement tells the gateway of a thumb-turn.
    let mut seen = p.app.watch();
    tokio::task::block_in_place(|| support::test_bed().restart_bus());
    let ctl = support::control().await;
    next_state(&mut seen, &p.state_topic(&stack), |s| s["connected"] == false).await;
    ctl.turn_knob(&p.lock.lock_id).await.unwrap();
    next_state(&mut seen, &p.state_topic(&stack), |s| s["state"] == "unlocked").await;
    // And commands go through on the new connection.
    let first = p.send(&stack, Operation::Lock).await;
    assert_eq!(first.result, Outcome::Ok, "the first command after a D-Bus restart: {first:?}");

    // Every failure on the way said what happened on the radio (never a false success, never
    // a stall), and the gateway ran throughout: the same task, the same store.
    for first in [after_reboot, after_bluez].into_iter().flatten() {
        assert!(says_the_link_failed(&first), "{first:?}");
    }
    let state = support::report(&ctl, &p.lock.lock_id).await.status.state;
    assert_eq!(state, lockhub::protocol::message::LockState::Locked);

    // The bus daemon hangs, and is then restarted under the connection attempt a caller gave
    // up waiting for: that attempt fails once the hung daemon is gone. Its failure was the
    // answer of those who waited; the next caller connects afresh instead of being handed
    // it. On a transport of its own (no radio watch beside it to come first), with a lock of
    // its own.
    let spare = support::add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    let transport = support::transport().await;
    support::scan_until_seen(&transport, std::slice::from_ref(&spare.lock_id)).await;
    transport.connect(&spare.address).await.expect("a link before the bus hangs").close().await;
    let frozen = support::test_bed().freeze_bus();
    let Err(hung) = transport.connect(&spare.address).await else { panic!("a link through a hung bus") };
    assert!(hung.to_string().contains("did not accept a connection"), "the error names the bus: {hung}");
    tokio::task::block_in_place(|| support::test_bed().restart_bus());
    drop(frozen); // its process is gone: nothing to let run again
    transport
        .find(&spare.address, std::time::Duration::from_secs(30))
        .await
        .expect("the first use after the bus came back connects to it afresh");
    transport.connect(&spare.address).await.expect("a link on the new connection").close().await;
}
