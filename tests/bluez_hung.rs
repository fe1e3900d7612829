//! BlueZ hung: the bus up, `org.bluez` owned but never answering (bluetoothd stuck, as it gets
//! on a wedged controller). The emulator stopped with SIGSTOP plays it. A scan and a command
//! must get their answers within their bounds, saying that BlueZ is not answering (not a bare
//! timeout, not the bus); when BlueZ answers again, commands and advertised events flow
//! without a restart. In a binary of its own: it freezes the emulator every test of a binary
//! shares.

mod support;

use lockhub::auth::statement::{Operation, Permission};
use lockhub::ble::BleConfig;
use lockhub::ble::bluez::BluezTransport;
use lockhub::cloud::reply::Outcome;
use std::time::Duration;

use support::stack::{Stack, WAIT, assert_reply, claim_pair_grant, next_state};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_bluez_is_named_in_the_reply_and_the_gateway_recovers_when_it_answers() {
    crate::needs!(Dbus);
    let bed = support::test_bed();
    let stack = Stack::start("gw-hung").await;
    let p = claim_pair_grant(&stack, &[Permission::Lock, Permission::Unlock, Permission::Remote], None).await;
    assert_eq!(p.send(&stack, Operation::Unlock).await.result, Outcome::Ok);

    // The link down, so that the next command must ask BlueZ for a new one.
    let ctl = support::control().await;
    let mut seen = p.app.watch();
    p.link_down(&stack, &ctl, &mut seen).await;

    let frozen = bed.freeze_emulator();
    // A scan (the control socket's, a pairing's search) gets an answer too, naming BlueZ.
    let scanned = tokio::time::timeout(WAIT, stack.gateway.scan(Duration::from_secs(1))).await.expect("a scan ends");
    let err = scanned.expect_err("nothing can be seen while BlueZ does not answer");
    assert_eq!(err.code(), "bluez_silent", "{err}");
    // A gateway starting now (the daemon, `lockhub doctor`) is told so too, within its
    // start-up bound, rather than waiting for bluer's two minutes.
    let opened = tokio::time::timeout(WAIT, BluezTransport::open(&BleConfig::default())).await.expect("opening ends");
    let err = opened.expect_err("no transport while BlueZ does not answer");
    assert_eq!(err.code(), "bluez_silent", "{err}");
    let reply = p.send(&stack, Operation::Lock).await;
    // No command reached the lock: unreachable, and why.
    assert_reply(&reply, Outcome::Failed, Some("lock_unreachable"));
    let detail = reply.detail.as_deref().unwrap_or("");
    assert!(detail.contains("BlueZ is not answering"), "the reply names BlueZ: {detail}");
    assert!(detail.contains("bus is up"), "and says the bus itself works: {detail}");
    // Audited with its reason (this waits for it).
    stack.audited("command.", &["lock_unreachable"]).await;

    frozen.thaw();
    // BlueZ answers again: the next command gets a new connection and goes through.
    assert_eq!(p.send(&stack, Operation::Lock).await.result, Outcome::Ok, "a command after BlueZ answers again");
    // And discovery came back by itself: with the link down, only an advertisement tells the
    // gateway of a thumb-turn.
    p.link_down(&stack, &ctl, &mut seen).await;
    ctl.turn_knob(&p.lock.lock_id).await.unwrap();
    next_state(&mut seen, &p.state_topic(&stack), |s| s["state"] == "unlocked").await;
}
