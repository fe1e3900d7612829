//! The gateway on its worst days, over the real stack (bundled broker over TLS, BlueZ stand-in
//! on a private bus, the store on disk):
//! - the broker killed and restarted ten times while remote commands flow: every command gets
//!   exactly one outcome, and the lock's own log shows each ran exactly once.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use lockhub::auth::statement::{Operation, Permission, Statement};
use lockhub::cloud::reply::{Outcome, Reply};
use lockhub::devcloud::app::command;
use lockhub::gateway::policy::PolicyLimits;
use lockhub::store::unix_now;
use support::stack::{Stack, claim_pair_grant};

/// How long the app waits for a reply before sending the same bytes again, as a phone app
/// does when its connection comes back: a resend is answered from the store, never run again.
const RESEND_AFTER: Duration = Duration::from_secs(3);
/// Resends before the test gives up on a command.
const MAX_SENDS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_restarted_ten_times_during_remote_commands_each_runs_once_with_one_outcome() {
    const COMMANDS: usize = 40;
    const RESTARTS: usize = 10;
    let limits = PolicyLimits { rate_commands: 1_000, ..PolicyLimits::default() };
    let mut stack = Stack::start_with("gw-restarts", limits).await;
    let p = claim_pair_grant(&stack, &[Permission::Lock, Permission::Unlock, Permission::Remote], None).await;
    let mut replies = p.app.watch();
    let replies_topic = format!("lockhub/v1/{}/reply", stack.gw);

    let mut ids = Vec::new();
    let mut restarts = 0;
    for i in 0..COMMANDS {
        // Alternate, so that every command moves the bolt and leaves an entry in the lock's log.
        let op = if i % 2 == 0 { Operation::Unlock } else { Operation::Lock };
        let statement = Statement::Command(command(&stack.gw, p.lock_id, op, unix_now(), 60));
        let id = statement.id().as_str().to_owned();
        let text = statement.sign(&p.user.key);
        p.app.publish_text(text.clone()).await.unwrap();
        // Every fourth command, the broker dies while the command is on its way.
        if i % 4 == 1 && restarts < RESTARTS {
            tokio::task::block_in_place(|| stack.broker.restart());
            restarts += 1;
        }
        let mut sends = 1;
        let reply = loop {
            match p.app.send_text(&id, text.clone(), RESEND_AFTER).await {
                Ok(reply) => break reply,
                Err(_) if sends < MAX_SENDS => sends += 1,
                Err(e) => panic!("no outcome for command {i} ({id}) after {sends} sends: {e}"),
            }
        };
        assert_eq!(reply.result, Outcome::Ok, "command {i}: {reply:?}");
        ids.push(id);
    }
    assert_eq!(restarts, RESTARTS);

    // Everything the gateway sent reaches the broker: then the sink holds every event.
    while stack.store.lock().unwrap().outbox_len().unwrap() > 0 {
        let delivered = tokio::time::timeout(Duration::from_secs(60), stack.delivered.changed()).await;
        assert!(delivered.is_ok(), "the outbox stopped draining");
    }

    // One outcome per command: every reply seen for an id is the same reply.
    let mut outcomes: HashMap<String, Vec<Reply>> = HashMap::new();
    while let Ok(seen) = replies.try_recv() {
        if seen.topic == replies_topic {
            let reply: Reply = serde_json::from_slice(&seen.payload).unwrap();
            outcomes.entry(reply.id.clone()).or_default().push(reply);
        }
    }
    for id in &ids {
        let seen = &outcomes[id];
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{id} had different outcomes: {seen:?}");
    }
    // Audited once each.
    let audited = stack.audit_outcomes("command.");
    assert_eq!(audited.len(), COMMANDS, "{audited:?}");
    assert!(audited.iter().all(|o| o == "ok"), "{audited:?}");
    // The lock's own log, as the cloud stored it: each command moved the bolt exactly once.
    let sink = stack.broker.events();
    let remote_moves = sink
        .events(stack.gw.as_str(), 0, 100_000)
        .unwrap()
        .into_iter()
        .map(|e| serde_json::from_slice::<serde_json::Value>(&e.payload).unwrap())
        .filter(|e| {
            e["kind"] == "state_changed"
                && e["cause"] == "remote"
                && (e["state"] == "locked" || e["state"] == "unlocked")
        })
        .count();
    assert_eq!(remote_moves, COMMANDS, "the lock's log");
    println!(
        "broker killed {RESTARTS} times during {COMMANDS} remote commands: {} replies seen, each command once in the lock's log",
        outcomes.values().map(Vec::len).sum::<usize>()
    );
}
