//! Remote unlock through the real stack: the app stand-in signs statements, the bundled broker
//! (mutual TLS, ACLs) relays them, the gateway opens, judges and carries them out over bluer →
//! private dbus-daemon → emulated lock, and answers with typed replies; events and the lock's
//! retained state come back the same way.

mod support;

use sha2::Digest;

use std::sync::atomic::Ordering;
use std::time::Duration;

use lockhub::auth::statement::{Operation, Permission, Statement};
use lockhub::cloud::reply::{Outcome, Reply};
use lockhub::devcloud::app::{AppClient, Seen, claim, command, grant, pair, remote_unlock, revoke};
use lockhub::gateway::policy::PolicyLimits;
use lockhub::protocol::ids::{GatewayId, LockId};
use lockhub::store::unix_now;
use support::stack::{Stack, WAIT, assert_reply, claim_pair_grant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_pair_grant_and_unlock_remotely_with_every_refusal_on_the_way() {
    crate::needs!(Dbus);
    let stack = Stack::start("gw-remote").await;
    let app = stack.app().await;
    let mut seen = app.watch();
    let (owner, user) = (stack.key("owner"), stack.key("user"));
    let now = unix_now();
    let gw = stack.gw.clone();

    // Claim with the code the gateway shows.
    let code = lockhub::gateway::claim::claim_code(&mut stack.store.lock().unwrap()).unwrap().unwrap();
    assert_reply(&app.send(&claim(&gw, code.as_str(), now), &owner, WAIT).await.unwrap(), Outcome::Ok, None);

    // Pair a lock with its setup code.
    let ctl = support::control().await;
    let lock = support::add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    let lock_id = LockId::parse(&lock.lock_id).unwrap();
    assert_reply(&app.send(&pair(&gw, lock_id, &lock.setup_code, now), &owner, WAIT).await.unwrap(), Outcome::Ok, None);

    let unlock = |op| Statement::Command(command(&gw, lock_id, op, unix_now(), 30));
    // Nobody has granted the user anything.
    assert_reply(
        &app.send(&unlock(Operation::Unlock), &user, WAIT).await.unwrap(),
        Outcome::Refused,
        Some("unknown_key"),
    );

    let perms = vec![Permission::Lock, Permission::Unlock, Permission::Remote];
    let granted = grant(&gw, user.public(), lock_id, perms, None, 1, now);
    let grant_id = granted.jti.clone();
    assert_reply(&app.send(&Statement::Grant(granted), &owner, WAIT).await.unwrap(), Outcome::Ok, None);
    // A user cannot grant.
    let self_grant = Statement::Grant(grant(&gw, user.public(), lock_id, vec![Permission::Unlatch], None, 1, now));
    assert_reply(&app.send(&self_grant, &user, WAIT).await.unwrap(), Outcome::Refused, Some("unknown_key"));

    // Remote unlock is off until the owner turns it on.
    assert_reply(
        &app.send(&unlock(Operation::Unlock), &user, WAIT).await.unwrap(),
        Outcome::Refused,
        Some("remote_disabled"),
    );
    assert_reply(&app.send(&remote_unlock(&gw, lock_id, true, now), &owner, WAIT).await.unwrap(), Outcome::Ok, None);

    // The unlock.
    let first = unlock(Operation::Unlock);
    let text = first.sign(&user.key);
    let reply = app.send_text(first.id().as_str(), text.clone(), WAIT).await.unwrap();
    assert_reply(&reply, Outcome::Ok, None);
    assert_eq!(reply.detail.as_deref(), Some("unlocked"));
    // The reply tells the user how the lock's log and the events name them: keyed by the
    // gateway, not the start of SHA-256 of their key that anyone holding it could compute.
    let actor = reply.actor.clone().expect("a user's command's reply names its actor");
    let unkeyed: String =
        sha2::Sha256::digest(user.public().as_bytes())[..8].iter().map(|b| format!("{b:02x}")).collect();
    assert!(actor.len() == 16 && actor != unkeyed, "{actor}");
    let status = support::report(&ctl, &lock.lock_id).await.status;
    assert_eq!(status.state, lockhub::protocol::message::LockState::Unlocked);

    // The lock's own log reaches the cloud, and its retained state follows.
    let events_topic = format!("lockhub/v1/{gw}/events");
    let state_topic = format!("lockhub/v1/{gw}/lock/{lock_id}/state");
    let mut saw_event = false;
    let mut saw_state = false;
    while !(saw_event && saw_state) {
        let msg = tokio::time::timeout(WAIT, seen.recv()).await.unwrap().unwrap();
        let json: serde_json::Value = match serde_json::from_slice(&msg.payload) {
            Ok(j) => j,
            Err(_) => continue,
        };
        if msg.topic == events_topic && json["kind"] == "state_changed" && json["state"] == "unlocked" {
            assert_eq!(json["actor"]["kind"], "cloud", "{json}");
            assert_eq!(json["actor"]["user"], actor.as_str(), "the event names the user as the reply said: {json}");
            saw_event = true;
        }
        if msg.topic == state_topic && json["state"] == "unlocked" {
            saw_state = true;
        }
    }

    // The same delivery again: the stored reply, and the lock does not move again.
    let again = app.send_text(first.id().as_str(), text.clone(), WAIT).await.unwrap();
    assert_eq!(again, reply, "a redelivery gets the stored reply");
    assert_eq!(support::report(&ctl, &lock.lock_id).await.status.last_seq, status.last_seq, "not executed twice");
    // The same id with other bytes: a replay.
    let replay = match &first {
        Statement::Command(c) => {
            Statement::Command(lockhub::auth::statement::Command { nonce: "another-nonce-0000".into(), ..c.clone() })
        }
        _ => unreachable!(),
    };
    assert_reply(&app.send(&replay, &user, WAIT).await.unwrap(), Outcome::Refused, Some("replayed"));
    // The replay's refusal is not kept in the command's stead: the original, delivered once
    // more, still gets its own reply.
    let again = app.send_text(first.id().as_str(), text, WAIT).await.unwrap();
    assert_eq!(again, reply, "a redelivery after a replay gets the stored reply");

    // Expired; not granted (no unlatch); the clock never synchronised.
    let stale = Statement::Command(command(&gw, lock_id, Operation::Lock, unix_now() - 120, 30));
    assert_reply(&app.send(&stale, &user, WAIT).await.unwrap(), Outcome::Refused, Some("expired"));
    assert_reply(
        &app.send(&unlock(Operation::Unlatch), &user, WAIT).await.unwrap(),
        Outcome::Refused,
        Some("not_granted"),
    );
    stack.clock.synced.store(false, Ordering::SeqCst);
    assert_reply(
        &app.send(&unlock(Operation::Lock), &user, WAIT).await.unwrap(),
        Outcome::Refused,
        Some("clock_unsynchronised"),
    );
    stack.clock.synced.store(true, Ordering::SeqCst);

    // Lock again, then revoke: refused from then on.
    assert_reply(&app.send(&unlock(Operation::Lock), &user, WAIT).await.unwrap(), Outcome::Ok, None);
    assert_reply(&app.send(&revoke(&gw, grant_id, now), &owner, WAIT).await.unwrap(), Outcome::Ok, None);
    assert_reply(&app.send(&unlock(Operation::Unlock), &user, WAIT).await.unwrap(), Outcome::Refused, Some("revoked"));

    // Every decision is in the audit chain with its reason, and the chain verifies.
    let expected = [
        "unknown_key",
        "remote_disabled",
        "ok",
        "replayed",
        "expired",
        "not_granted",
        "clock_unsynchronised",
        "revoked",
    ];
    let outcomes = stack.audited("command.", &expected).await;
    for expected in expected {
        assert!(outcomes.iter().any(|o| o == expected), "no audit record {expected} in {outcomes:?}");
    }
    let verified = stack.store.lock().unwrap().verify_audit().unwrap();
    assert!(matches!(verified, lockhub::store::AuditVerification::Intact { .. }), "{verified:?}");
}

fn other_day_than_today() -> &'static str {
    let today = (unix_now() / 86_400 + 3) % 7; // 0 = Monday (1970-01-01 was a Thursday)
    ["mon", "tue", "wed", "thu", "fri", "sat", "sun"][((today + 3) % 7) as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_the_schedule_then_locked_out_after_repeated_refusals() {
    crate::needs!(Dbus);
    let limits = PolicyLimits { lockout_failures: 3, ..PolicyLimits::default() };
    let stack = Stack::start_with("gw-schedule", limits).await;
    let schedule = lockhub::auth::statement::Schedule {
        tz: "UTC".into(),
        days: vec![other_day_than_today().into()],
        from: "00:00".into(),
        to: "23:59".into(),
    };
    let p = claim_pair_grant(&stack, &[Permission::Lock, Permission::Remote], Some(schedule)).await;
    let cmd = |op| Statement::Command(command(&stack.gw, p.lock_id, op, unix_now(), 30));
    let reply = p.app.send(&cmd(Operation::Lock), &p.user, WAIT).await.unwrap();
    assert_reply(&reply, Outcome::Refused, Some("outside_schedule"));
    for _ in 0..2 {
        let reply = p.app.send(&cmd(Operation::Unlatch), &p.user, WAIT).await.unwrap();
        assert_reply(&reply, Outcome::Refused, Some("not_granted"));
    }
    // Three refusals: even a request the grant would allow is refused for a while.
    let reply = p.app.send(&cmd(Operation::Lock), &p.user, WAIT).await.unwrap();
    assert_reply(&reply, Outcome::Refused, Some("locked_out"));
    // The owner is not affected by the user's lockout.
    assert_reply(&p.app.send(&cmd(Operation::Lock), &p.owner, WAIT).await.unwrap(), Outcome::Ok, None);
    let outcomes = stack.audited("command.", &["locked_out", "outside_schedule"]).await;
    assert!(outcomes.iter().any(|o| o == "locked_out") && outcomes.iter().any(|o| o == "outside_schedule"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_beyond_the_rate_limit_are_refused() {
    crate::needs!(Dbus);
    let limits = PolicyLimits { rate_commands: 3, ..PolicyLimits::default() };
    let stack = Stack::start_with("gw-rate", limits).await;
    let p = claim_pair_grant(&stack, &[Permission::Lock, Permission::Remote], None).await;
    let cmd = || Statement::Command(command(&stack.gw, p.lock_id, Operation::Lock, unix_now(), 30));
    for _ in 0..3 {
        assert_reply(&p.app.send(&cmd(), &p.user, WAIT).await.unwrap(), Outcome::Ok, None);
    }
    assert_reply(&p.app.send(&cmd(), &p.user, WAIT).await.unwrap(), Outcome::Refused, Some("rate_limited"));
    let outcomes = stack.audited("command.", &["ok", "ok", "ok", "rate_limited"]).await;
    assert_eq!(outcomes.iter().filter(|o| *o == "rate_limited").count(), 1, "{outcomes:?}");
}

/// Whoever can publish on the command topic (the cloud, which is not trusted) sends a flood of
/// garbage: the audit log takes a burst of it one by one and counts the rest, written as one
/// summary before the next record — so the flood is on the record without filling the disk —
/// and the gateway serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_garbage_is_counted_not_recorded_one_by_one() {
    crate::needs!(Dbus);
    use lockhub::store::audit_budget::{BURST, SUMMARY_ACTION};
    let stack = Stack::start("gw-garbage").await;
    let p = claim_pair_grant(&stack, &[Permission::Lock, Permission::Remote], None).await;
    let over = 50;
    for i in 0..BURST as usize + over {
        p.app.publish_text(format!("not a statement {i}")).await.unwrap();
    }
    // Taken in order after the flood: by its reply, all of the flood was handled. The reply
    // leaves while its record commits: await the record.
    assert_reply(&p.send(&stack, Operation::Lock).await, Outcome::Ok, None);
    stack.audited("command.lock", &["ok"]).await;
    let store = stack.store.lock().unwrap();
    let records = store.audit_records(0, 1000).unwrap();
    let one_by_one = records.iter().filter(|r| r.action == "cloud.statement" && r.outcome == "malformed").count();
    assert_eq!(one_by_one, BURST as usize, "recorded one by one");
    let summaries: Vec<_> = records.iter().filter(|r| r.action == SUMMARY_ACTION).collect();
    assert_eq!(summaries.len(), 1, "{summaries:?}");
    let summary = summaries[0];
    assert!(summary.detail.starts_with(&format!("{over} refusals")), "{}", summary.detail);
    assert!(summary.detail.ends_with(&format!(": malformed {over}")), "{}", summary.detail);
    let command = records.iter().find(|r| r.action == "command.lock").unwrap();
    assert!(summary.seq < command.seq, "the summary goes before the next record");
    assert!(matches!(store.verify_audit().unwrap(), lockhub::store::audit::AuditVerification::Intact { .. }));
}

/// A stranger's statements are refused without anything of theirs being remembered (beyond the
/// budgeted audit records): a remembered id stays until its statement expires, and a stranger
/// picks the expiry — here a grant to themselves valid for ten years, or a claim of a gateway
/// that has its owner. A replay is refused like the first delivery; a known user's ids are
/// remembered as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strangers_statements_are_refused_without_being_remembered() {
    crate::needs!(Dbus);
    let stack = Stack::start("gw-stranger").await;
    let p = claim_pair_grant(&stack, &[Permission::Lock, Permission::Remote], None).await;
    let stranger = stack.key("stranger");
    // The set-up's ids forgotten, so that what follows is counted from nothing.
    stack.store.lock().unwrap().expire_commands(i64::MAX).unwrap();
    let now = unix_now();
    let self_grant =
        Statement::Grant(grant(&stack.gw, stranger.public(), p.lock_id, vec![Permission::Unlock], None, 3650, now));
    for _ in 0..2 {
        assert_reply(&p.app.send(&self_grant, &stranger, WAIT).await.unwrap(), Outcome::Refused, Some("unknown_key"));
    }
    let unlock = Statement::Command(command(&stack.gw, p.lock_id, Operation::Unlock, now, 30));
    assert_reply(&p.app.send(&unlock, &stranger, WAIT).await.unwrap(), Outcome::Refused, Some("unknown_key"));
    // A claim of a gateway that has its owner is a stranger's statement too.
    let reply = p.app.send(&claim(&stack.gw, "000000", now), &stranger, WAIT).await.unwrap();
    assert_eq!(reply.result, Outcome::Refused, "{reply:?}");
    assert_reply(&p.send(&stack, Operation::Lock).await, Outcome::Ok, None);
    let remembered = stack.store.lock().unwrap().expire_commands(i64::MAX).unwrap();
    assert_eq!(remembered, 1, "only the known user's command id was remembered");
    let outcomes = stack.audited("statement", &["unknown_key", "unknown_key"]).await;
    assert_eq!(outcomes.iter().filter(|o| *o == "unknown_key").count(), 2, "each delivery audited: {outcomes:?}");
}

/// An owner's statement is guarded against replay as a command is: its id again with other
/// bytes is refused as replayed and changes nothing (a grant replayed wider stays as granted).
/// And the audit chain names who acted: the owner as `admin`, a granted user by pseudonym, a
/// key nobody granted as `unknown` — never a pseudonym of a stranger's key —, each claim once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_owner_statement_changes_nothing_and_the_audit_names_who_acted() {
    crate::needs!(Dbus);
    let stack = Stack::start("gw-owner-replay").await;
    let p = claim_pair_grant(&stack, &[Permission::Unlock, Permission::Remote], None).await;
    let now = unix_now();
    let perms = vec![Permission::Unlock, Permission::Unlatch, Permission::Remote];
    let wider = grant(&stack.gw, p.user.public(), p.lock_id, perms, None, 1, now);
    let wider = Statement::Grant(lockhub::auth::statement::Grant { jti: p.grant.clone(), ..wider });
    assert_reply(&p.app.send(&wider, &p.owner, WAIT).await.unwrap(), Outcome::Refused, Some("replayed"));
    assert_reply(&p.send(&stack, Operation::Unlatch).await, Outcome::Refused, Some("not_granted"));
    assert_reply(&p.send(&stack, Operation::Unlock).await, Outcome::Ok, None);
    // A second claim by the owner (the gateway has its owner), then its id with another code.
    let second = claim(&stack.gw, "000000", now);
    assert_reply(&p.app.send(&second, &p.owner, WAIT).await.unwrap(), Outcome::Refused, Some("claim_state"));
    let Statement::Claim(second) = second else { unreachable!() };
    let again = Statement::Claim(lockhub::auth::statement::Claim { code: "111111".into(), ..second });
    assert_reply(&p.app.send(&again, &p.owner, WAIT).await.unwrap(), Outcome::Refused, Some("replayed"));
    let stranger = stack.key("stranger");
    let unlock = Statement::Command(command(&stack.gw, p.lock_id, Operation::Unlock, unix_now(), 30));
    assert_reply(&p.app.send(&unlock, &stranger, WAIT).await.unwrap(), Outcome::Refused, Some("unknown_key"));

    stack.audited("command.", &["not_granted", "ok", "unknown_key"]).await;
    stack.audited("statement", &["replayed", "replayed"]).await;
    let records = stack.store.lock().unwrap().audit_records(0, 100_000).unwrap();
    let actors = |action: &str, outcome: &str| -> Vec<String> {
        let mut actors: Vec<String> = records
            .iter()
            .filter(|r| r.action == action && r.outcome == outcome)
            .map(|r| r.actor.clone().unwrap_or_default())
            .collect();
        actors.sort();
        actors
    };
    assert_eq!(actors("gateway.claim", "ok"), ["owner"], "the claim, audited once");
    assert_eq!(actors("gateway.claim", "claim_state"), ["unknown"], "the second claim, audited once");
    assert_eq!(actors("statement", "replayed"), ["owner", "owner"], "the replayed grant and claim");
    assert_eq!(actors("grant.add", "ok"), ["owner"], "the wider grant was not carried out");
    let user = actors("command.unlock", "ok");
    assert!(user.len() == 1 && user[0].starts_with("user:"), "{user:?}");
    assert_eq!(actors("command.unlatch", "not_granted"), user, "the same user, by the same pseudonym");
    assert_eq!(actors("command.unlock", "unknown_key"), ["unknown"], "a stranger is nobody in the chain");
}

/// Refusals that name what is wrong with the statement rather than with its signer: an owner's
/// statement past its expiry is `expired` (not carried out), and a granted user's command for a
/// lock this gateway has not paired is `unknown_lock` — the user is known, the lock is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_owner_statement_and_a_command_for_an_unpaired_lock_are_refused_by_name() {
    crate::needs!(Dbus);
    let stack = Stack::start("gw-refused-by-name").await;
    let p = claim_pair_grant(&stack, &[Permission::Unlock, Permission::Unlatch, Permission::Remote], None).await;
    let yesterday = unix_now() - 2 * 86_400;
    let stale = grant(&stack.gw, stack.key("late").public(), p.lock_id, vec![Permission::Unlock], None, 1, yesterday);
    assert_reply(
        &p.app.send(&Statement::Grant(stale), &p.owner, WAIT).await.unwrap(),
        Outcome::Refused,
        Some("expired"),
    );
    let elsewhere = LockId::parse("00000000000000ff").unwrap();
    assert_ne!(elsewhere, p.lock_id);
    let unpaired = Statement::Command(command(&stack.gw, elsewhere, Operation::Unlock, unix_now(), 30));
    assert_reply(&p.app.send(&unpaired, &p.user, WAIT).await.unwrap(), Outcome::Refused, Some("unknown_lock"));
    stack.audited("statement", &["expired"]).await;
    stack.audited("command.unlock", &["unknown_lock"]).await;
    assert_eq!(stack.audit_outcomes("grant.add"), ["ok"], "only the set-up's grant was added");
}

/// Before the gateway has its owner anyone may send a claim, with any expiry: a claim's id is
/// remembered two hours at most (an hour past an expiry capped at an hour), not until an
/// expiry ten years away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claims_id_is_remembered_two_hours_at_most() {
    crate::needs!(Dbus);
    let stack = Stack::start("gw-claims").await;
    let app = stack.app().await;
    let now = unix_now();
    let Statement::Claim(mut far) = claim(&stack.gw, "000000", now) else { unreachable!() };
    far.exp = now + 10 * 365 * 86_400;
    let reply = app.send(&Statement::Claim(far), &stack.key("anyone"), WAIT).await.unwrap();
    assert_eq!(reply.result, Outcome::Refused, "{reply:?}");
    let mut store = stack.store.lock().unwrap();
    assert_eq!(store.expire_commands(now + 2 * 3600 - 60).unwrap(), 0, "forgotten too early");
    assert_eq!(store.expire_commands(now + 2 * 3600 + 60).unwrap(), 1, "remembered past two hours");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jam_and_an_unreachable_lock_are_reported_truthfully() {
    crate::needs!(Dbus);
    let stack = Stack::start("gw-faults").await;
    let p = claim_pair_grant(&stack, &[Permission::Lock, Permission::Unlock, Permission::Remote], None).await;
    let cmd = |op| Statement::Command(command(&stack.gw, p.lock_id, op, unix_now(), 30));
    let ctl = support::control().await;
    let state_topic = format!("lockhub/v1/{}/lock/{}/state", stack.gw, p.lock_id);
    let mut seen = p.app.watch();
    ctl.set_faults(&p.lock.lock_id, r#"{"jam_next_operation": true}"#).await.unwrap();
    assert_reply(&p.app.send(&cmd(Operation::Unlock), &p.user, WAIT).await.unwrap(), Outcome::Failed, Some("jammed"));
    ctl.set_faults(&p.lock.lock_id, "{}").await.unwrap();
    assert_reply(&p.app.send(&cmd(Operation::Lock), &p.user, WAIT).await.unwrap(), Outcome::Ok, None);
    // The link drops while the gateway reads the lock's news after a thumb-turn (its status
    // request is the next frame the lock receives), not during a command: the retained state
    // still says the link is gone.
    while seen.try_recv().is_ok() {}
    ctl.set_faults(&p.lock.lock_id, r#"{"drop_link_after_frames": 1}"#).await.unwrap();
    ctl.turn_knob(&p.lock.lock_id).await.unwrap();
    next_connected(&mut seen, &state_topic, false).await;
    ctl.set_faults(&p.lock.lock_id, "{}").await.unwrap();
    assert_reply(&p.app.send(&cmd(Operation::Lock), &p.user, WAIT).await.unwrap(), Outcome::Ok, None);
    next_connected(&mut seen, &state_topic, true).await;
    // Out of range: the gateway sees the link drop (its retained state says so), no command
    // reaches the lock, and the reply says so before the deadline.
    ctl.set_in_range(&p.lock.lock_id, false).await.unwrap();
    next_connected(&mut seen, &state_topic, false).await;
    let reply = p.app.send(&cmd(Operation::Unlock), &p.user, WAIT).await.unwrap();
    assert_reply(&reply, Outcome::Failed, Some("lock_unreachable"));
    ctl.set_in_range(&p.lock.lock_id, true).await.unwrap();
    let outcomes = stack.audited("command.", &["jammed", "lock_unreachable"]).await;
    assert!(outcomes.iter().any(|o| o == "jammed") && outcomes.iter().any(|o| o == "lock_unreachable"), "{outcomes:?}");
}

/// Waits for the next retained state of the lock on `topic` saying whether its link is up.
async fn next_connected(seen: &mut tokio::sync::broadcast::Receiver<Seen>, topic: &str, connected: bool) {
    loop {
        let msg = tokio::time::timeout(WAIT, seen.recv()).await.expect("no state with the link's change").unwrap();
        if msg.topic == topic {
            let state: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
            if state["connected"] == connected {
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_is_refused_across_a_gateway_restart() {
    crate::needs!(Dbus);
    let stack = Stack::start("gw-restart").await;
    let p = claim_pair_grant(&stack, &[Permission::Lock, Permission::Remote], None).await;
    let first = Statement::Command(command(&stack.gw, p.lock_id, Operation::Lock, unix_now(), 30));
    let text = first.sign(&p.user.key);
    let reply = p.app.send_text(first.id().as_str(), text.clone(), WAIT).await.unwrap();
    assert_reply(&reply, Outcome::Ok, None);

    let ctl = support::control().await;
    // A command the old gateway noted but never answered (as if it stopped while running it):
    // the new gateway answers it at start, as interrupted.
    let interrupted = format!("{}:c-interrupted", p.user.public());
    stack
        .store
        .lock()
        .unwrap()
        .transaction(|tx| tx.note_command(&interrupted, None, unix_now() + 60, &[7; 32]))
        .unwrap();
    let mut restarted = p.app.watch();
    let mut answers = p.app.watch();
    let stack = stack.restart_gateway().await;
    let replies_topic = format!("lockhub/v1/{}/reply", stack.gw);
    loop {
        let msg =
            tokio::time::timeout(WAIT, answers.recv()).await.expect("no answer to the interrupted command").unwrap();
        if msg.topic != replies_topic {
            continue;
        }
        let answer: Reply = serde_json::from_slice(&msg.payload).unwrap();
        if answer.id == "c-interrupted" {
            assert_reply(&answer, Outcome::Failed, Some("failed"));
            assert!(answer.detail.as_deref().is_some_and(|d| d.contains("interrupted")), "{answer:?}");
            break;
        }
    }
    // The new gateway syncs with the lock (setting its clock, a log entry of its own) and
    // publishes the state it found: from then on, the lock's log must not grow.
    let state_topic = format!("lockhub/v1/{}/lock/{}/state", stack.gw, p.lock_id);
    loop {
        let msg = tokio::time::timeout(WAIT, restarted.recv()).await.expect("no state after the restart").unwrap();
        if msg.topic == state_topic {
            break;
        }
    }
    let seq_before = support::report(&ctl, &p.lock.lock_id).await.status.last_seq;
    // The broker may deliver the first command again to the new gateway (its session was
    // resumed): either way, every answer to this id is the stored one until the replay below.
    let mut replies = p.app.watch();
    assert_eq!(p.app.send_text(first.id().as_str(), text, WAIT).await.unwrap(), reply, "the stored reply");
    // The same id, other bytes: a replay, also after the restart.
    let replay = match &first {
        Statement::Command(c) => {
            Statement::Command(lockhub::auth::statement::Command { nonce: "another-nonce-1111".into(), ..c.clone() })
        }
        _ => unreachable!(),
    };
    let _ = p.app.send(&replay, &p.user, WAIT).await.unwrap();
    loop {
        let msg = tokio::time::timeout(WAIT, replies.recv()).await.expect("no replayed refusal").unwrap();
        if msg.topic != replies_topic {
            continue;
        }
        let answer: Reply = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(answer.id, reply.id);
        match answer.reason {
            None => assert_eq!(answer, reply, "only the stored reply may come again"),
            Some(reason) => {
                assert_eq!(reason.as_str(), "replayed", "{answer:?}");
                break;
            }
        }
    }
    assert_eq!(support::report(&ctl, &p.lock.lock_id).await.status.last_seq, seq_before, "the lock did not move again");
    let _ = (&p.owner, &p.lock, &p.grant);
}

/// A stopping gateway, once its commands are done, stops its locks' tasks in order: each ends
/// what it was doing and lets go of its lock (a real lock is then free for a phone at once),
/// and none starts afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_gateway_lets_go_of_its_locks() {
    crate::needs!(Dbus);
    let stack = Stack::start("gw-stopping").await;
    let p = claim_pair_grant(&stack, &[Permission::Unlock, Permission::Lock, Permission::Remote], None).await;
    assert_reply(&p.send(&stack, Operation::Unlock).await, Outcome::Ok, None);
    let ctl = support::control().await;
    assert!(support::report(&ctl, &p.lock.lock_id).await.connected, "the command left the link up");
    // A second lock paired after it: its task starts while the first one's runs, and both
    // let go of their locks.
    let second = support::add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    let second_id = LockId::parse(&second.lock_id).unwrap();
    let pairing = pair(&stack.gw, second_id, &second.setup_code, unix_now());
    assert_reply(&p.app.send(&pairing, &p.owner, WAIT).await.unwrap(), Outcome::Ok, None);
    assert_eq!(stack.gateway.lock_count(), 2);
    // Before stopping, a local command for a lock nobody paired is just that.
    let holder = lockhub::auth::local_code::CodeHolder::Named("hallway".into());
    let nowhere = LockId::parse("00000000000000ff").unwrap();
    let outcome = stack.gateway.local_command(nowhere, lockhub::protocol::message::Op::Unlatch, &holder, "a test");
    assert_eq!(outcome.await.unwrap(), Err("unknown_lock".to_owned()));
    assert_eq!(stack.audit_outcomes("local.unlatch"), ["unknown_lock"]);

    // Busy when told to stop: reading the lock's news, as after an advertisement. And a handle
    // to the lock's task still held elsewhere (a control-socket request, say) does not keep
    // the task running.
    let held = stack.gateway.lock(p.lock_id).unwrap();
    held.sync();
    assert!(stack.gateway.stop_locks(WAIT).await, "every lock's task ended");
    drop(held);
    for lock in [&p.lock.lock_id, &second.lock_id] {
        assert!(!support::report(&ctl, lock).await.connected, "the gateway still holds {lock}'s link");
    }
    assert!(stack.gateway.lock(p.lock_id).is_none());
    assert_eq!(stack.gateway.lock_count(), 0);

    // Nothing starts a lock's task again; a local command meanwhile is told why it cannot run.
    stack.gateway.start_locks().unwrap();
    assert_eq!(stack.gateway.lock_count(), 0);
    let outcome = stack.gateway.local_command(p.lock_id, lockhub::protocol::message::Op::Unlock, &holder, "a test");
    assert_eq!(outcome.await.unwrap(), Err("failed".to_owned()), "not `unknown_lock`: the lock is still paired");
    assert_eq!(stack.audit_outcomes("local.unlock"), ["failed"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_broker_cannot_command_each_others_locks() {
    crate::needs!(Dbus);
    // Gateway A as usual; gateway B on the same broker, with its own state.
    let a = Stack::start("gw-a-iso").await;
    a.pki.issue_client("gw-b-iso").unwrap();
    let b_gw = GatewayId::new("gw-b-iso").unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let _b = Stack::start_hub(&support::stack::config(b_dir.path(), &a.pki, &b_gw, a.broker.port), &a.clock).await;
    let p = claim_pair_grant(&a, &[Permission::Lock, Permission::Unlock, Permission::Remote], None).await;
    let ctl = support::control().await;
    let seq = support::report(&ctl, &p.lock.lock_id).await.status.last_seq;

    // A command for A's lock, correctly signed by A's user, published to B: B refuses it.
    let b_app = AppClient::connect(&format!("mqtts://localhost:{}", a.broker.port), &a.pki, &b_gw).await.unwrap();
    let for_a = Statement::Command(command(&a.gw, p.lock_id, Operation::Unlock, unix_now(), 30));
    assert_reply(&b_app.send(&for_a, &p.user, WAIT).await.unwrap(), Outcome::Refused, Some("wrong_gateway"));
    // Addressed to B (so B opens it): B has no such lock and no such user.
    let for_b = Statement::Command(command(&b_gw, p.lock_id, Operation::Unlock, unix_now(), 30));
    assert_reply(&b_app.send(&for_b, &p.user, WAIT).await.unwrap(), Outcome::Refused, Some("unknown_key"));

    // Gateway B's own identity cannot even write into A's command topic: the broker drops it.
    let tls = lockhub::cloud::tls::client_config(
        &a.pki.ca_cert(),
        &a.pki.client_cert("gw-b-iso"),
        &a.pki.client_key("gw-b-iso"),
    )
    .unwrap();
    let mut o = rumqttc::MqttOptions::new("gw-b-iso-probe", "localhost", a.broker.port);
    o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(tls)));
    // (A client id other than its identity is refused by the bundled broker, so use its own
    // after B's gateway is stopped.)
    drop(_b);
    let mut o2 = o.clone();
    o2.set_client_id("gw-b-iso".into());
    let (probe, mut events) = rumqttc::AsyncClient::new(o2, 8);
    let forged = Statement::Command(command(&a.gw, p.lock_id, Operation::Unlock, unix_now(), 30)).sign(&p.user.key);
    probe.publish(format!("lockhub/v1/{}/cmd", a.gw), rumqttc::QoS::AtLeastOnce, false, forged).await.unwrap();
    loop {
        match tokio::time::timeout(WAIT, events.poll()).await.unwrap() {
            Ok(rumqttc::Event::Incoming(rumqttc::Incoming::PubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
    // A marker through A's own path: once its reply is back, anything B sent before it was
    // handled, and A's lock has not moved.
    let marker = Statement::Command(command(&a.gw, p.lock_id, Operation::Lock, unix_now(), 30));
    assert_reply(&p.app.send(&marker, &p.user, WAIT).await.unwrap(), Outcome::Ok, None);
    let after = support::report(&ctl, &p.lock.lock_id).await.status;
    assert_eq!(after.state, lockhub::protocol::message::LockState::Locked, "B's forged unlock never ran");
    assert!(after.last_seq >= seq);
    let _ = (&p.owner, &p.grant);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_locks_times_fifty_commands_get_one_outcome_each() {
    crate::needs!(Dbus);
    const LOCKS: usize = 20;
    const PER_LOCK: usize = 50;
    let limits = PolicyLimits { rate_commands: 10_000, ..PolicyLimits::default() };
    let stack = Stack::start_with("gw-load", limits).await;
    let p = claim_pair_grant(&stack, &[Permission::Lock, Permission::Unlock, Permission::Remote], None).await;
    let ctl = support::control().await;
    let now = unix_now();
    let mut locks = vec![p.lock_id];
    for _ in 1..LOCKS {
        let lock = support::add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
        let lock_id = LockId::parse(&lock.lock_id).unwrap();
        let perms = vec![Permission::Lock, Permission::Unlock, Permission::Remote];
        for statement in [
            pair(&stack.gw, lock_id, &lock.setup_code, now),
            remote_unlock(&stack.gw, lock_id, true, now),
            Statement::Grant(grant(&stack.gw, p.user.public(), lock_id, perms, None, 1, now)),
        ] {
            assert_reply(&p.app.send(&statement, &p.owner, WAIT).await.unwrap(), Outcome::Ok, None);
        }
        locks.push(lock_id);
    }
    // 1,000 commands at once, each delivered twice.
    let mut seen = p.app.watch();
    let mut texts = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..PER_LOCK {
        for lock in &locks {
            let op = if i % 2 == 0 { Operation::Unlock } else { Operation::Lock };
            let c = Statement::Command(command(&stack.gw, *lock, op, unix_now(), 60));
            ids.insert(c.id().to_string());
            texts.push(c.sign(&p.user.key));
        }
    }
    for text in &texts {
        p.app.publish_text(text.clone()).await.unwrap();
        p.app.publish_text(text.clone()).await.unwrap();
    }
    let replies_topic = format!("lockhub/v1/{}/reply", stack.gw);
    let mut answers: std::collections::BTreeMap<String, Reply> = std::collections::BTreeMap::new();
    while answers.len() < ids.len() {
        let msg = tokio::time::timeout(Duration::from_secs(120), seen.recv()).await.expect("replies stopped").unwrap();
        if msg.topic != replies_topic {
            continue;
        }
        let reply: Reply = serde_json::from_slice(&msg.payload).unwrap();
        if !ids.contains(&reply.id) {
            continue;
        }
        if let Some(first) = answers.get(&reply.id) {
            assert_eq!(first, &reply, "two different outcomes for one command");
        } else {
            answers.insert(reply.id.clone(), reply);
        }
    }
    // One decision per command in the audit chain: it ran (or was refused) once. A reply leaves
    // while its outcome (audit record included) commits: each commit is followed by its reply's
    // outbox record being deleted, so read again after each deletion until all are there.
    let decisions = stack.audited_until("command.", |outcomes| outcomes.len() >= ids.len()).await.len();
    let ok = answers.values().filter(|r| r.result == Outcome::Ok).count();
    let overloaded = answers.values().filter(|r| r.reason.map(|x| x.as_str()) == Some("overloaded")).count();
    println!(
        "{} commands: {ok} ok, {overloaded} overloaded (queue bound), {} other",
        ids.len(),
        ids.len() - ok - overloaded
    );
    assert_eq!(decisions, ids.len(), "exactly one audited decision per command");
    assert_eq!(ok, ids.len(), "50 commands per lock fit the queue: every one ran, none was turned away");
}

/// `lockhub-cloud app …` as a person would type it.
fn app_command(stack: &Stack, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_lockhub-cloud"));
    command
        .arg("app")
        .arg("--dir")
        .arg(stack.dir.path().join("cli-keys"))
        .arg("--pki")
        .arg(stack.pki.dir())
        .arg("--broker")
        .arg(format!("mqtts://localhost:{}", stack.broker.port))
        .args(args);
    command
}

/// [`app_command`] run to its end: whether it succeeded, its stdout and its stderr.
fn app_cli(stack: &Stack, args: &[&str]) -> (bool, String, String) {
    let out = app_command(stack, args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_command_line_claims_pairs_grants_and_unlocks() {
    crate::needs!(Dbus);
    let stack = Stack::start("gw-cli").await;
    let gw = stack.gw.to_string();
    let ok = |r: (bool, String, String)| {
        assert!(r.0, "failed:\n{}\n{}", r.1, r.2);
        r.1
    };
    ok(app_cli(&stack, &["--key", "owner", "keygen"]));
    let user = ok(app_cli(&stack, &["--key", "user", "keygen"])).trim().to_owned();
    assert_eq!(ok(app_cli(&stack, &["--key", "user", "whoami"])).trim(), user);
    let code = lockhub::gateway::claim::claim_code(&mut stack.store.lock().unwrap()).unwrap().unwrap();
    ok(app_cli(&stack, &["claim", "--gateway", &gw, "--code", code.as_str()]));
    let ctl = support::control().await;
    let lock = support::add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    ok(app_cli(&stack, &["pair", "--gateway", &gw, "--lock", &lock.lock_id, "--setup", &lock.setup_code]));
    let granted = ok(app_cli(
        &stack,
        &["grant", "--gateway", &gw, "--lock", &lock.lock_id, "--user", &user, "--perms", "unlock,lock,remote"],
    ));
    assert!(granted.contains("grant id: g-"), "{granted}");
    ok(app_cli(&stack, &["policy", "--gateway", &gw, "--lock", &lock.lock_id, "--remote-unlock"]));
    let unlocked = ok(app_cli(&stack, &["--key", "user", "unlock", "--gateway", &gw, "--lock", &lock.lock_id]));
    assert!(unlocked.contains("\"result\": \"ok\""), "{unlocked}");
    assert_eq!(
        support::report(&ctl, &lock.lock_id).await.status.state,
        lockhub::protocol::message::LockState::Unlocked
    );
    // A refusal exits non-zero and says why.
    let (success, stdout, stderr) =
        app_cli(&stack, &["--key", "user", "unlatch", "--gateway", &gw, "--lock", &lock.lock_id]);
    assert!(!success && stdout.contains("not_granted") && stderr.contains("not_granted"), "{stdout}\n{stderr}");
    // The retained status and the lock's state, without any key.
    let status = ok(app_cli(&stack, &["--key", "nobody", "status", "--gateway", &gw]));
    assert!(
        status.contains("/status {\"status\":\"online\"") && status.contains(&format!("/lock/{}/state", lock.lock_id)),
        "{status}"
    );
    // Its reader gone before the listing (`… status | head -0`): a quiet, successful end.
    support::assert_quiet_with_reader_gone(&mut app_command(&stack, &["--key", "nobody", "status", "--gateway", &gw]));
    // Bad input: a clear error, no panic.
    let (success, _, stderr) = app_cli(&stack, &["unlock", "--gateway", &gw, "--lock", "not-a-lock"]);
    assert!(!success && stderr.contains("16 hex digits"), "{stderr}");
}

/// The gateway's clock jumps a day ahead, comes back, then falls a day behind. While it is off,
/// commands signed on true time are refused truthfully (`expired`, `not_yet_valid`) and the
/// store's housekeeping forgets nothing it must remember, so a command captured before the jump
/// does not run again when the clock comes back; once the clock is right, commands work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clock_jumping_ahead_and_back_neither_replays_nor_wedges() {
    crate::needs!(Dbus);
    use lockhub::gateway::maintenance::{SafeClock, tidy};
    use std::time::Instant;

    let stack = Stack::start("gw-clock").await;
    let p = claim_pair_grant(&stack, &[Permission::Lock, Permission::Unlock, Permission::Remote], None).await;
    let mut safe = SafeClock::default();
    let mut housekeeping = || {
        let cutoff = safe.now(stack.clock.now(), Instant::now()).expect("the clock is trusted");
        tidy(&stack.store, cutoff).unwrap();
    };
    housekeeping();
    let captured = Statement::Command(command(&stack.gw, p.lock_id, Operation::Unlock, unix_now(), 60));
    let text = captured.sign(&p.user.key);
    let reply = p.app.send_text(captured.id().as_str(), text.clone(), WAIT).await.unwrap();
    assert_reply(&reply, Outcome::Ok, None);
    let shift = |s: i64| stack.clock.offset_s.store(s, Ordering::SeqCst);

    shift(86_400);
    let lock = || Statement::Command(command(&stack.gw, p.lock_id, Operation::Lock, unix_now(), 30));
    assert_reply(&p.app.send(&lock(), &p.user, WAIT).await.unwrap(), Outcome::Refused, Some("expired"));
    housekeeping();

    shift(0);
    // The captured command, still inside its window: the stored reply, not a second unlock.
    assert_eq!(p.app.send_text(captured.id().as_str(), text, WAIT).await.unwrap(), reply);

    shift(-86_400);
    assert_reply(&p.app.send(&lock(), &p.user, WAIT).await.unwrap(), Outcome::Refused, Some("not_yet_valid"));
    housekeeping();

    shift(0);
    assert_reply(&p.app.send(&lock(), &p.user, WAIT).await.unwrap(), Outcome::Ok, None);
    assert_eq!(stack.audited("command.unlock", &["ok"]).await, ["ok"], "the unlock ran once");
    let expected = ["expired", "not_yet_valid", "ok"];
    assert_eq!(stack.audited("command.lock", &expected).await, expected);
}

/// A redelivery is answered before any check: after its command has expired, while the gateway
/// remembers the id (until an hour past `exp`), it gets the stored reply and does not run
/// again; once housekeeping has forgotten the id, it is judged afresh and is `expired`
/// (docs/mqtt-api.md, "Before any check: a redelivery").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_redelivery_gets_the_stored_reply_until_its_id_is_forgotten() {
    crate::needs!(Dbus);
    let stack = Stack::start("gw-late").await;
    let p = claim_pair_grant(&stack, &[Permission::Lock, Permission::Unlock, Permission::Remote], None).await;
    let first = Statement::Command(command(&stack.gw, p.lock_id, Operation::Unlock, unix_now(), 30));
    let text = first.sign(&p.user.key);
    let reply = p.app.send_text(first.id().as_str(), text.clone(), WAIT).await.unwrap();
    assert_reply(&reply, Outcome::Ok, None);

    // Two minutes on: expired, still remembered.
    stack.clock.offset_s.store(120, Ordering::SeqCst);
    assert_eq!(p.app.send_text(first.id().as_str(), text.clone(), WAIT).await.unwrap(), reply);

    // Two hours on, after housekeeping: forgotten, so judged like a first delivery.
    stack.clock.offset_s.store(7_200, Ordering::SeqCst);
    lockhub::gateway::maintenance::tidy(&stack.store, stack.clock.now().0).unwrap();
    let late = p.app.send_text(first.id().as_str(), text, WAIT).await.unwrap();
    assert_reply(&late, Outcome::Refused, Some("expired"));
    assert_eq!(stack.audited("command.unlock", &["ok", "expired"]).await, ["ok", "expired"], "it ran once");
}
