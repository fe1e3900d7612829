//! The gateway on its worst days, over the real stack (bundled broker over TLS, BlueZ stand-in
//! on a private bus, the store on disk):
//! - the broker killed and restarted ten times while remote commands flow: every command gets
//!   exactly one outcome, and the lock's own log shows each ran exactly once;
//! - `lockhub run` killed with SIGKILL in the middle of a burst of 1,000 lock events, and
//!   started again: every event reaches the cloud, exactly once after deduplication;
//! - the store's filesystem full (a small tmpfs): a typed, plain error, nothing already
//!   stored lost or corrupted, writes working again once there is room; a refusal that cannot
//!   be recorded is not acknowledged to the broker, so it comes again.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use lockhub::auth::statement::{Operation, Permission, Statement};
use lockhub::cloud::reply::{Outcome, Reply};
use lockhub::devcloud::app::command;
use lockhub::gateway::policy::PolicyLimits;
use lockhub::store::unix_now;
use support::small_fs::SmallFilesystem;
use support::stack::{Stack, claim_pair_grant};

/// How long the app waits for a reply before sending the same bytes again, as a phone app
/// does when its connection comes back: a resend is answered from the store, never run again.
const RESEND_AFTER: Duration = Duration::from_secs(3);
/// Resends before the test gives up on a command.
const MAX_SENDS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_restarted_ten_times_during_remote_commands_each_runs_once_with_one_outcome() {
    crate::needs!(Dbus);
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

    // The outbox drains: everything the gateway stored reaches the broker.
    stack
        .after_deliveries(|| match stack.store.lock().unwrap().outbox_len().unwrap() {
            0 => Ok(()),
            n => Err(format!("{n} records still in the outbox")),
        })
        .await;

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
    let audited = stack.audited_until("command.", |outcomes| outcomes.len() >= COMMANDS).await;
    assert_eq!(audited.len(), COMMANDS, "{audited:?}");
    assert!(audited.iter().all(|o| o == "ok"), "{audited:?}");
    // The lock's own log, as the cloud stored it: each command moved the bolt exactly once.
    // The last moves may still be on their way from the lock (the gateway reads its log when
    // it advertises new events) when the outbox is empty: read again after each delivery.
    let sink = stack.broker.events();
    let remote_moves = || {
        sink.events(stack.gw.as_str(), 0, 100_000)
            .unwrap()
            .into_iter()
            .map(|e| serde_json::from_slice::<serde_json::Value>(&e.payload).unwrap())
            .filter(|e| {
                e["kind"] == "state_changed"
                    && e["cause"] == "remote"
                    && (e["state"] == "locked" || e["state"] == "unlocked")
            })
            .count()
    };
    let remote_moves = stack
        .after_deliveries(|| match remote_moves() {
            moves if moves >= COMMANDS => Ok(moves),
            moves => Err(format!("{moves} of {COMMANDS} moves in the cloud")),
        })
        .await;
    assert_eq!(remote_moves, COMMANDS, "the lock's log");
    println!(
        "broker killed {RESTARTS} times during {COMMANDS} remote commands: {} replies seen, each command once in the lock's log",
        outcomes.values().map(Vec::len).sum::<usize>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_killed_during_a_burst_of_a_thousand_lock_events_delivers_each_once() {
    crate::needs!(Dbus);
    use lockhub::devcloud::app::{AppClient, AppKey, claim, pair};
    use lockhub::devcloud::pki::Pki;
    use lockhub::protocol::ids::{GatewayId, LockId};
    use std::collections::BTreeSet;
    use support::daemon::{Daemon, claim_code, until_online, write_config};

    const EVENTS: usize = 1_000;
    const WAIT: Duration = Duration::from_secs(60);
    let bed = support::test_bed();
    let dir = tempfile::tempdir().unwrap();
    let gw_name = "gw-killed";
    let gw = GatewayId::new(gw_name).unwrap();
    let pki = Pki::init(&dir.path().join("pki"), &[gw_name]).unwrap();
    let broker = support::bundled::Bundled::start(&pki);
    let config = write_config(dir.path(), &pki, broker.port, gw_name);
    let app = AppClient::connect(&format!("mqtts://localhost:{}", broker.port), &pki, &gw).await.unwrap();
    let mut seen = app.watch();
    let mut daemon = Daemon::spawn(&config, &bed.bus);

    // Claimed and paired through the cloud, like any hub.
    until_online(&mut seen, gw_name, WAIT).await;
    let code = claim_code(&config);
    let owner = AppKey::generate(&dir.path().join("keys"), "owner", false).unwrap();
    let reply = app.send(&claim(&gw, &code, unix_now()), &owner, WAIT).await.unwrap();
    assert_eq!(reply.result, Outcome::Ok, "{reply:?}");
    let ctl = support::control().await;
    let lock = support::add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    let lock_id = LockId::parse(&lock.lock_id).unwrap();
    let reply = app.send(&pair(&gw, lock_id, &lock.setup_code, unix_now()), &owner, WAIT).await.unwrap();
    assert_eq!(reply.result, Outcome::Ok, "{reply:?}");

    // The burst: a thousand turns of the thumb-turn. A third of the way in, the daemon is
    // killed; two thirds in, it is back.
    for i in 0..EVENTS {
        ctl.turn_knob(&lock.lock_id).await.unwrap();
        if i == EVENTS / 3 {
            daemon.kill();
        }
        if i == 2 * EVENTS / 3 {
            daemon = Daemon::spawn(&config, &bed.bus);
        }
    }

    // Every turn reaches the cloud: the app sees each of the lock's log entries at least
    // once, in one unbroken run of its sequence numbers (the hub's own entries, such as the
    // clock being set, among them)...
    let events_topic = format!("lockhub/v1/{gw_name}/events");
    let mut seqs = BTreeSet::new();
    let mut turns = BTreeSet::new();
    let mut deliveries = 0;
    while turns.len() < EVENTS {
        let m = tokio::time::timeout(WAIT, seen.recv())
            .await
            .unwrap_or_else(|_| panic!("events stopped at {} of {EVENTS}: {}", turns.len(), gaps(&seqs)))
            .unwrap();
        if m.topic != events_topic {
            continue;
        }
        let event: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let seq = event["seq"].as_u64().unwrap();
        seqs.insert(seq);
        if event["cause"] == "manual" {
            deliveries += 1;
            turns.insert(seq);
        }
    }
    let (first, last) = (*turns.first().unwrap(), *turns.last().unwrap());
    assert!((first..=last).all(|s| seqs.contains(&s)), "a gap in the lock's log: {}", gaps(&seqs));
    // ...and the cloud's store, which deduplicates on the id, holds each exactly once.
    let sink = broker.events();
    let stored: Vec<serde_json::Value> = sink
        .events(gw_name, 0, 100_000)
        .unwrap()
        .into_iter()
        .map(|e| serde_json::from_slice(&e.payload).unwrap())
        .filter(|e: &serde_json::Value| e["cause"] == "manual")
        .collect();
    assert_eq!(stored.len(), EVENTS, "events in the cloud's store");
    println!(
        "lockhub run killed during {EVENTS} lock events: {EVENTS} in the cloud once each; {} duplicate deliveries before dedupe",
        deliveries - EVENTS
    );
    drop(daemon);
}

/// The sequence numbers missing between the first and the last of `seqs`, and the range seen.
fn gaps(seqs: &std::collections::BTreeSet<u64>) -> String {
    let (Some(first), Some(last)) = (seqs.first(), seqs.last()) else { return "none seen".into() };
    let missing: Vec<u64> = (*first..=*last).filter(|s| !seqs.contains(s)).collect();
    format!("seen {first}..={last}, missing inside: {missing:?}")
}

#[test]
fn a_full_filesystem_is_a_plain_error_loses_nothing_and_passes() {
    crate::needs!(Root);
    use lockhub::store::{Store, StoreConfig, StoreError};

    let fs = SmallFilesystem::mount("1m");
    let config = || StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(&fs.path().join("state")) };
    let mut store = Store::open(config()).unwrap();

    // Events pile up in the outbox until the disk is full.
    let payload = vec![b'e'; 4096];
    let append = |store: &mut Store, i: usize| {
        store.transaction(|tx| tx.append_outbox(None, &format!("lockhub/v1/gw/events/{i}"), &payload, false, 0))
    };
    let mut stored = 0;
    let error = loop {
        match append(&mut store, stored) {
            Ok(_) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 10_000, "the filesystem never filled");
    };
    assert!(matches!(error, StoreError::Full), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("full") && message.contains("nothing saved before is lost"), "{message}");
    assert!(stored > 0, "some events fitted first");
    // Nothing accepted is lost, and the database is intact.
    assert_eq!(store.outbox_len().unwrap(), stored as u64);
    store.integrity_check().unwrap();
    // Still full: still a plain error, still nothing lost.
    assert!(matches!(append(&mut store, stored), Err(StoreError::Full)));
    assert_eq!(store.outbox_len().unwrap(), stored as u64);

    // Room again (the filesystem grown, as an operator would): writes work without a
    // restart, and everything survives reopening.
    fs.resize("16m");
    append(&mut store, stored).unwrap();
    drop(store);
    let store = Store::open(config()).unwrap();
    assert_eq!(store.outbox_len().unwrap(), stored as u64 + 1);
    store.integrity_check().unwrap();
    println!("filesystem full after {stored} events of 4 KiB: a plain error, none lost, writes resumed");
}

/// A refusal is acknowledged to the broker only once it is recorded: with the store's disk
/// full, garbage from the cloud cannot be recorded and its delivery is left unacknowledged
/// (the broker delivers it again); once there is room, the same delivery is recorded and
/// acknowledged.
#[tokio::test]
async fn a_refusal_the_full_store_cannot_record_is_left_unacknowledged() {
    crate::needs!(Root);
    use lockhub::cloud::link::InboundCommand;
    use lockhub::gateway::intake::{self, Intake};
    use lockhub::protocol::ids::GatewayId;
    use lockhub::store::{Store, StoreConfig, StoreError};
    use std::sync::{Arc, Mutex};
    use tokio::sync::{Notify, mpsc, oneshot};

    let fs = SmallFilesystem::mount("1m");
    let mut store =
        Store::open(StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(&fs.path().join("state")) }).unwrap();
    // Fill the disk, with ever smaller records so that no room is left for a small one.
    for size in [4096, 256, 16] {
        let payload = vec![b'e'; size];
        let mut i = 0;
        loop {
            match store.transaction(|tx| tx.append_outbox(None, &format!("fill/{size}/{i}"), &payload, false, 0)) {
                Ok(_) => i += 1,
                Err(StoreError::Full) => break,
                Err(e) => panic!("{e}"),
            }
            assert!(i < 100_000, "the filesystem never filled");
        }
    }
    let records = |store: &Mutex<Store>| store.lock().unwrap().audit_records(0, 100).unwrap().len();
    let store = Arc::new(Mutex::new(store));
    let before = records(&store);
    let intake = Intake::new(store.clone(), GatewayId::new("gw-full").unwrap(), Arc::new(Notify::new()));
    let (inbound, inbound_rx) = mpsc::channel(4);
    let (accepted, _accepted_rx) = mpsc::channel(4);
    tokio::spawn(intake::serve(intake, inbound_rx, accepted, unix_now));
    let deliver = |inbound: mpsc::Sender<InboundCommand>| async move {
        let (stored, acknowledged) = oneshot::channel();
        let payload = b"not a statement".to_vec();
        inbound.send(InboundCommand { payload, received: std::time::Instant::now(), stored }).await.unwrap();
        acknowledged.await
    };

    assert!(deliver(inbound.clone()).await.is_err(), "acknowledged though the refusal was not recorded");
    assert_eq!(records(&store), before, "recorded on a full disk");
    fs.resize("16m");
    deliver(inbound).await.expect("not acknowledged once there was room to record it");
    assert_eq!(records(&store), before + 1, "the refusal is on the record");
}
