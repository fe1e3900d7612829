//! The gateway's connection to D-Bus wedged: open, but never answering again (a bus daemon
//! stuck, a connection the library will never report lost). A command that needs a new link
//! must notice within its bound, connect to the bus afresh and go through; discovery must
//! follow to the new connection, and notice by itself when no command comes. And the bus
//! daemon hung (new connections silent too): the reply must say so within its bound, and the
//! attempts to connect must not pile up; a new connection that wedges too (every connection
//! wedging at the lock's Connect call) must end the attempt. In a binary of its own: the
//! process's bus address is the relay's.

mod support;

use lockhub::auth::statement::{Operation, Permission};
use lockhub::cloud::reply::Outcome;
use support::bus_proxy::BusProxy;
use support::stack::{Stack, assert_reply, claim_pair_grant, next_state};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_and_discovery_get_past_a_wedged_bus_connection() {
    crate::needs!(Dbus);
    let bed = support::test_bed();
    let proxy = BusProxy::start(&bed.bus);
    // SAFETY: before any bluer session exists in this process (libdbus reads the address
    // when the first one connects), as the test bed itself sets it.
    unsafe { std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", &proxy.address) };
    let stack = Stack::start("gw-wedged").await;
    let p = claim_pair_grant(&stack, &[Permission::Lock, Permission::Unlock, Permission::Remote], None).await;
    // Through the relay, descriptors and all (the GATT sockets come over the bus).
    assert_eq!(p.send(&stack, Operation::Unlock).await.result, Outcome::Ok);

    // The link down, so that the next command must ask the bus for a new one.
    let ctl = support::control().await;
    let state_topic = p.state_topic(&stack);
    let mut seen = p.app.watch();
    p.link_down(&stack, &ctl, &mut seen).await;

    let before = proxy.connections();
    proxy.wedge();
    let reply = p.send(&stack, Operation::Lock).await;
    assert_eq!(reply.result, Outcome::Ok, "the first command on a wedged bus connection: {reply:?}");
    assert!(proxy.connections() > before, "the gateway connected to the bus again");

    // Discovery moved to the new connection: with the link down, only an advertisement tells
    // the gateway of a thumb-turn.
    p.link_down(&stack, &ctl, &mut seen).await;
    ctl.turn_knob(&p.lock.lock_id).await.unwrap();
    next_state(&mut seen, &state_topic, |s| s["state"] == "unlocked").await;

    // Wedged again with no command coming: discovery hears nothing, asks whether the bus is
    // still there, and starts again on a new connection; the next thumb-turn still gets out.
    // (The thumb-turn's sync brought the link up: down again, so that only an advertisement
    // can tell.)
    p.link_down(&stack, &ctl, &mut seen).await;
    let before = proxy.connections();
    proxy.wedge();
    ctl.turn_knob(&p.lock.lock_id).await.unwrap();
    next_state(&mut seen, &state_topic, |s| s["state"] == "locked").await;
    assert!(proxy.connections() > before, "the gateway connected to the bus again");

    // The bus daemon itself hung: new connections get no answer either. The command's reply
    // says it is the bus (not BlueZ, not a bare timeout), within its bound. The commands that
    // follow share the one connection attempt still waiting in libdbus (which cannot be
    // interrupted) instead of each leaving a thread blocked behind it. Once the bus answers
    // again, the next command works.
    p.link_down(&stack, &ctl, &mut seen).await;
    let frozen = bed.freeze_bus();
    let reply = p.send(&stack, Operation::Unlock).await;
    assert_reply(&reply, Outcome::Failed, Some("lock_unreachable"));
    let detail = reply.detail.as_deref().unwrap_or("");
    assert!(detail.contains("D-Bus system bus did not accept a connection"), "the reply names the bus: {detail}");
    let threads_then = threads();
    for _ in 0..5 {
        let reply = p.send(&stack, Operation::Unlock).await;
        assert_reply(&reply, Outcome::Failed, Some("lock_unreachable"));
    }
    let threads_now = threads();
    assert!(
        threads_now <= threads_then + 2,
        "five more commands on a hung bus took the process from {threads_then} to {threads_now} threads"
    );
    frozen.thaw();
    let r = p.send(&stack, Operation::Unlock).await;
    assert_eq!(r.result, Outcome::Ok, "a command once the bus answers again: {r:?}");

    // Every connection wedges as it asks BlueZ to connect to the lock, the new one too: the
    // gateway gives up once the new connection is silent as well (not trying ever more), and
    // the reply says so.
    p.link_down(&stack, &ctl, &mut seen).await;
    proxy.wedge_on_call("Connect");
    let before = proxy.connections();
    let reply = p.send(&stack, Operation::Lock).await;
    assert_reply(&reply, Outcome::Failed, Some("lock_unreachable"));
    let detail = reply.detail.as_deref().unwrap_or("");
    assert!(
        detail.contains("the connection to the bus is dead") && detail.contains("a new one did not answer"),
        "{detail}"
    );
    let opened = proxy.connections() - before;
    assert!((1..=4).contains(&opened), "{opened} new bus connections for one command");
}

/// The threads of this process.
fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find_map(|l| l.strip_prefix("Threads:")).expect("a Threads line");
    line.trim().parse().expect("a thread count")
}
