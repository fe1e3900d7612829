//! The cloud side on a clustered broker: three nodes of Debian's `nats-server` with MQTT over
//! mutual TLS, clustered on loopback, configured by `lockhub-cloud nats-config`'s renderer.
//! `lockhub run` (its broker list: node 1, 2, 3) is on node 1, the app on node 3: remote
//! unlocks cross the cluster; then node 1 is killed, the gateway moves to node 2, and nothing
//! is lost: every command gets its outcome and runs once, every lock event arrives.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use lockhub::auth::statement::{Operation, Permission, Statement};
use lockhub::cloud::reply::Outcome;
use lockhub::devcloud::app::{AppClient, AppKey, claim, command, grant, pair, remote_unlock};
use lockhub::devcloud::pki::Pki;
use lockhub::protocol::ids::{GatewayId, LockId};
use lockhub::store::unix_now;
use support::daemon::{Daemon, claim_code, until_online, write_config};
use support::nats::NatsCluster;

const GW: &str = "gw-nats";
const WAIT: Duration = Duration::from_secs(60);
/// Remote commands before and after node 1 dies.
const COMMANDS: usize = 20;
/// Thumb-turns while the gateway moves to node 2 (even: the bolt ends where it was, so that
/// every later command moves it).
const TURNS: usize = 6;

/// Sends `statement`'s bytes until a reply comes (a resend is answered from the gateway's
/// store, never run again), as an app does while the cloud side fails over.
async fn outcome(app: &AppClient, text: &str, id: &str) -> lockhub::cloud::reply::Reply {
    for _ in 0..30 {
        if let Ok(reply) = app.send_text(id, text.to_owned(), Duration::from_secs(2)).await {
            return reply;
        }
    }
    panic!("no outcome for {id}");
}

/// Signs `statement` with `key` and sends it until a reply comes.
async fn send(app: &AppClient, statement: &Statement, key: &AppKey) -> lockhub::cloud::reply::Reply {
    outcome(app, &statement.sign(&key.key), statement.id().as_str()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_unlocks_cross_the_cluster_and_survive_the_death_of_the_gateways_node() {
    crate::needs!(Dbus, Nats);
    let bed = support::test_bed();
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayId::new(GW).unwrap();
    let pki = Pki::init(&dir.path().join("pki"), &[GW]).unwrap();
    let mut cluster = NatsCluster::start(&pki, &[GW]);
    let urls = cluster.urls();
    let config = write_config(dir.path(), &pki, cluster.nodes[0].mqtt_port, GW);
    let text = std::fs::read_to_string(&config).unwrap();
    let brokers: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    let text = text.replace(&format!("brokers = [{}]", brokers[0]), &format!("brokers = [{}]", brokers.join(", ")));
    assert!(text.contains(&brokers[2]), "{text}");
    // Forty commands of one user within a minute: above the default rate limit.
    std::fs::write(&config, format!("{text}\n[policy]\nrate_commands = 1000\n")).unwrap();

    // The app as the cloud's relay is: a persistent session, so that nothing published while
    // its own node is busy failing over is lost to it.
    let app = AppClient::connect_persistent(&urls[2], &pki, &gw, "nats-test").await.unwrap();
    let mut seen = app.watch();
    let daemon = Daemon::spawn(&config, &bed.bus);
    until_online(&mut seen, GW, WAIT).await;

    // Claimed, a lock paired, a user granted: all through node 3 to the gateway on node 1.
    let code = claim_code(&config);
    let keys = dir.path().join("keys");
    let (owner, user) =
        (AppKey::generate(&keys, "owner", false).unwrap(), AppKey::generate(&keys, "user", false).unwrap());
    let ok = |r: lockhub::cloud::reply::Reply| assert_eq!(r.result, Outcome::Ok, "{r:?}");
    ok(send(&app, &claim(&gw, &code, unix_now()), &owner).await);
    let ctl = support::control().await;
    let lock = support::add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    let lock_id = LockId::parse(&lock.lock_id).unwrap();
    ok(send(&app, &pair(&gw, lock_id, &lock.setup_code, unix_now()), &owner).await);
    ok(send(&app, &remote_unlock(&gw, lock_id, true, unix_now()), &owner).await);
    let perms = vec![Permission::Lock, Permission::Unlock, Permission::Remote];
    let g = grant(&gw, user.public(), lock_id, perms, None, 1, unix_now());
    ok(send(&app, &Statement::Grant(g), &owner).await);

    // A 2 MiB command, far past any statement. NATS 2.9 acknowledges the MQTT publish but
    // keeps nothing over max_payload in JetStream, so the gateway never sees it; the commands
    // below go through as before (seen with NATS 2.9.10).
    let cmd_topic = format!("lockhub/v1/{GW}/cmd");
    let taken = support::broker::publish_once(&pki, cluster.nodes[2].mqtt_port, &cmd_topic, vec![b'x'; 2 << 20]).await;
    println!("NATS {} a 2 MiB command", if taken { "took" } else { "refused" });

    let mut n = 0usize;
    let mut next_command = || {
        n += 1;
        let op = if n % 2 == 1 { Operation::Unlock } else { Operation::Lock };
        let c = Statement::Command(command(&gw, lock_id, op, unix_now(), 60));
        (c.id().as_str().to_owned(), c.sign(&user.key))
    };
    let mut across = Vec::new();
    for _ in 0..COMMANDS {
        let (id, text) = next_command();
        let sent = Instant::now();
        ok(outcome(&app, &text, &id).await);
        across.push(sent.elapsed());
    }

    // Node 1 dies. The lock goes on living: its thumb-turn is turned while the gateway moves.
    cluster.kill(0);
    let killed = Instant::now();
    for _ in 0..TURNS {
        ctl.turn_knob(&lock.lock_id).await.unwrap();
    }
    let (id, text) = next_command();
    ok(outcome(&app, &text, &id).await);
    let failover = killed.elapsed();
    let mut after = Vec::new();
    for _ in 1..COMMANDS {
        let (id, text) = next_command();
        let sent = Instant::now();
        ok(outcome(&app, &text, &id).await);
        after.push(sent.elapsed());
    }

    // Nothing lost: every turn and every command is in the lock's log as the app received it,
    // each command exactly once.
    let events_topic = format!("lockhub/v1/{GW}/events");
    let (mut turns, mut moves, mut all) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    while turns.len() < TURNS || moves.len() < 2 * COMMANDS {
        let m = tokio::time::timeout(WAIT, seen.recv())
            .await
            .unwrap_or_else(|_| {
                let missing: Vec<u64> = all
                    .first()
                    .map_or(Vec::new(), |f| (*f..=*all.last().unwrap()).filter(|s| !all.contains(s)).collect());
                panic!(
                    "events missing: {} turns, {} remote moves; sequence numbers missing: {missing:?}",
                    turns.len(),
                    moves.len()
                )
            })
            .unwrap();
        if m.topic != events_topic {
            continue;
        }
        let e: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let seq = e["seq"].as_u64().unwrap();
        all.insert(seq);
        match e["cause"].as_str() {
            Some("manual") => {
                turns.insert(seq);
            }
            Some("remote") if e["state"] == "locked" || e["state"] == "unlocked" => {
                moves.insert(seq);
            }
            _ => {}
        }
    }
    assert_eq!(moves.len(), 2 * COMMANDS, "each command moved the bolt once");
    across.sort();
    after.sort();
    println!(
        "NATS cluster, gateway on node 1, app on node 3: remote unlock p50 {:.1?} (n = {COMMANDS}); \
         node 1 killed: first outcome after {failover:.1?}, then p50 {:.1?} on node 2; {TURNS} turns during the move, none lost",
        across[across.len() / 2],
        after[after.len() / 2],
    );
    drop(daemon);
}
