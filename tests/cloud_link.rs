//! The cloud link over mutual TLS, against the bundled broker and Debian's Mosquitto alike: the
//! outbox drained and deleted only once acknowledged, online / offline status (graceful, by
//! last will, and after SIGKILL), inbound commands, oversized input that does not stop the
//! link, broker restarts in the middle of a stream of events, a store that fails to delete
//! what the broker acknowledged, and acknowledged records deleted when the link stops or moves
//! to another broker.

mod support;

on_both_brokers!(
    the_outbox_is_delivered_and_deleted_only_once_acknowledged,
    status_is_online_then_offline_on_shutdown_and_by_last_will_on_a_crash,
    commands_arrive_and_oversized_ones_do_not_stop_the_link,
    a_command_of_two_mib_is_refused_at_the_broker_and_the_link_goes_on,
    the_broker_restarted_while_events_flow_loses_nothing,
    gateway_killed_with_sigkill_turns_offline,
    malformed_oversized_and_wrong_schema_payloads_get_typed_errors,
    records_the_store_cannot_delete_are_not_sent_again_meanwhile,
    acknowledged_records_are_deleted_when_the_link_stops_without_its_broker,
    acknowledged_records_are_deleted_before_the_link_moves_to_another_broker,
    records_the_store_cannot_delete_are_not_sent_to_the_next_broker_either,
);

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockhub::cloud::link::{CloudConfig, CloudLink, InboundCommand, LinkReports, LinkState, MAX_COMMAND_BYTES};
use lockhub::cloud::tls::client_config;
use lockhub::devcloud::pki::{Pki, RELAY_IDENTITY};
use lockhub::protocol::ids::GatewayId;
use lockhub::store::{Store, StoreConfig};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};
use support::broker::{Kind, TestBroker};
use tokio::sync::{Notify, mpsc, watch};

const GW: &str = "gw-link";

struct Rig {
    _dir: tempfile::TempDir,
    pki: Pki,
    broker: TestBroker,
    store: Arc<Mutex<Store>>,
    outbox_ready: Arc<Notify>,
}

fn rig(kind: Kind) -> Rig {
    rig_with(kind, false)
}

fn rig_with(kind: Kind, persistent_broker: bool) -> Rig {
    rig_on(|pki| TestBroker::start(kind, pki, persistent_broker))
}

fn rig_on(broker: impl FnOnce(&Pki) -> TestBroker) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), &[GW]).unwrap();
    let broker = broker(&pki);
    let store =
        Store::open(StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(&dir.path().join("state")) }).unwrap();
    Rig { _dir: dir, pki, broker, store: Arc::new(Mutex::new(store)), outbox_ready: Arc::new(Notify::new()) }
}

impl Rig {
    fn link(&self) -> (CloudLink, LinkReports, mpsc::Receiver<InboundCommand>) {
        self.link_to(&[self.broker.port()], Duration::from_millis(100))
    }

    /// A link to the brokers on `ports`, in that order, backing off from `min_backoff`.
    fn link_to(
        &self,
        ports: &[u16],
        min_backoff: Duration,
    ) -> (CloudLink, LinkReports, mpsc::Receiver<InboundCommand>) {
        let config = CloudConfig {
            keep_alive: Duration::from_secs(5),
            inflight: 8,
            min_backoff,
            max_backoff: Duration::from_secs(2),
            ..CloudConfig::new(
                ports.iter().map(|port| format!("mqtts://localhost:{port}")).collect(),
                self.pki.ca_cert(),
                self.pki.client_cert(GW),
                self.pki.client_key(GW),
            )
        };
        let (tx, rx) = mpsc::channel(16);
        let (link, reports) =
            CloudLink::new(config, GatewayId::new(GW).unwrap(), self.store.clone(), self.outbox_ready.clone(), tx)
                .unwrap();
        (link, reports, rx)
    }

    /// A second connection to the gateway's database, through which a trigger now refuses
    /// every deletion from the outbox (a failing disk) until `DROP TRIGGER refuse_deletes`.
    fn refuse_deletes(&self) -> rusqlite::Connection {
        let db = rusqlite::Connection::open(self._dir.path().join("state").join("lockhub.db")).unwrap();
        db.execute_batch(
            "CREATE TRIGGER refuse_deletes BEFORE DELETE ON outbox BEGIN SELECT RAISE(ABORT, 'the disk says no'); END",
        )
        .unwrap();
        db
    }

    fn append_events(&self, range: std::ops::Range<u32>) {
        let mut store = self.store.lock().unwrap();
        store
            .transaction(|tx| {
                for i in range {
                    tx.append_outbox(
                        None,
                        &format!("lockhub/v1/{GW}/events"),
                        format!(r#"{{"id":"ev-{i}"}}"#).as_bytes(),
                        false,
                        0,
                    )?;
                }
                Ok(())
            })
            .unwrap();
        drop(store);
        self.outbox_ready.notify_one();
    }

    /// The relay: sees everything under lockhub/v1/<GW>/.
    async fn relay(&self) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>) {
        self.relay_with(false).await
    }

    /// The relay; with `persistent`, a persistent session that rides out broker restarts.
    async fn relay_with(&self, persistent: bool) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>) {
        self.relay_on(self.broker.port(), persistent).await
    }

    /// The relay on the broker at `port`.
    async fn relay_on(
        &self,
        port: u16,
        persistent: bool,
    ) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>) {
        let tls = client_config(
            &self.pki.ca_cert(),
            &self.pki.client_cert(RELAY_IDENTITY),
            &self.pki.client_key(RELAY_IDENTITY),
        )
        .unwrap();
        let mut o = MqttOptions::new(RELAY_IDENTITY, "localhost", port);
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
        // Big enough to send an oversized command on purpose.
        o.set_max_packet_size(4 << 20, 4 << 20);
        o.set_clean_session(!persistent);
        let (client, mut eventloop) = AsyncClient::new(o, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (subscribed_tx, mut subscribed) = mpsc::channel(1);
        tokio::spawn(async move {
            loop {
                let event = match eventloop.poll().await {
                    Ok(event) => event,
                    // A persistent relay reconnects (rumqttc does on the next poll), after a pause.
                    Err(_) if persistent => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(_) => return,
                };
                match event {
                    Event::Incoming(Incoming::SubAck(_)) => {
                        let _ = subscribed_tx.send(()).await;
                    }
                    Event::Incoming(Incoming::Publish(p)) => {
                        let _ = tx.send((p.topic, p.payload.to_vec(), p.retain));
                    }
                    _ => {}
                }
            }
        });
        client.subscribe(format!("lockhub/v1/{GW}/#"), QoS::AtLeastOnce).await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), subscribed.recv()).await.unwrap();
        (client, rx)
    }
}

/// The audit records of statements the link or the intake refused, in order.
fn statement_audits(rig: &Rig) -> Vec<lockhub::store::audit::AuditRecord> {
    let records = rig.store.lock().unwrap().audit_records(0, 100).unwrap();
    records.into_iter().filter(|r| r.action == "cloud.statement").collect()
}

async fn next_on(rx: &mut mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>, topic_suffix: &str) -> Vec<u8> {
    loop {
        let (topic, payload, _) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("nothing within 20 s")
            .expect("relay gone");
        if topic.ends_with(topic_suffix) {
            return payload;
        }
    }
}

async fn the_outbox_is_delivered_and_deleted_only_once_acknowledged(kind: Kind) {
    let rig = rig(kind);
    let (_relay, mut seen) = rig.relay().await;
    rig.append_events(0..60);
    let (link, mut reports, _commands) = rig.link();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(link.run(stopped));
    let mut ids = BTreeSet::new();
    while ids.len() < 60 {
        let payload = next_on(&mut seen, "/events").await;
        ids.insert(String::from_utf8(payload).unwrap());
    }
    // More while connected: the notification wakes the drain.
    rig.append_events(60..100);
    while ids.len() < 100 {
        ids.insert(String::from_utf8(next_on(&mut seen, "/events").await).unwrap());
    }
    reports.delivered.wait_for(|n| *n >= 100).await.unwrap();
    assert_eq!(rig.store.lock().unwrap().outbox_len().unwrap(), 0);
    stop.send(true).unwrap();
    task.await.unwrap();
}

/// A store that cannot delete what the broker acknowledged (a failing disk, here a trigger that
/// refuses): the records are not sent again meanwhile — they used to be, acknowledged and
/// failed again as fast as the broker answered — and are deleted once the store can.
async fn records_the_store_cannot_delete_are_not_sent_again_meanwhile(kind: Kind) {
    let rig = rig(kind);
    let (_relay, mut seen) = rig.relay().await;
    let db = rig.refuse_deletes();
    rig.append_events(0..3);
    let (link, mut reports, _commands) = rig.link();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(link.run(stopped));
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(String::from_utf8(next_on(&mut seen, "/events").await).unwrap());
    }
    // One more while deletions still fail: by its arrival the first three were acknowledged,
    // and their deletion failed at least once.
    rig.append_events(3..4);
    loop {
        let event = String::from_utf8(next_on(&mut seen, "/events").await).unwrap();
        got.push(event.clone());
        if event.contains("ev-3") {
            break;
        }
    }
    assert_eq!(rig.store.lock().unwrap().outbox_len().unwrap(), 4, "nothing could be deleted");
    db.execute_batch("DROP TRIGGER refuse_deletes").unwrap();
    rig.append_events(4..5);
    reports.delivered.wait_for(|n| *n >= 5).await.unwrap();
    assert_eq!(rig.store.lock().unwrap().outbox_len().unwrap(), 0);
    while let Ok((topic, payload, _)) = seen.try_recv() {
        if topic.ends_with("/events") {
            got.push(String::from_utf8(payload).unwrap());
        }
    }
    for i in 0..5 {
        let id = format!(r#"{{"id":"ev-{i}"}}"#);
        let times = got.iter().filter(|e| **e == id).count();
        assert!(times <= 1, "{id} sent {times} times: {got:?}");
    }
    stop.send(true).unwrap();
    task.await.unwrap();
}

/// A running link to the brokers on `ports` whose first broker acknowledged ev-0..2 and went
/// away (killed) while the store refused to delete them (until `DROP TRIGGER refuse_deletes`
/// through the connection returned).
async fn acknowledged_then_gone(
    rig: &mut Rig,
    ports: &[u16],
    min_backoff: Duration,
) -> (LinkReports, watch::Sender<bool>, tokio::task::JoinHandle<()>, rusqlite::Connection) {
    let db = rig.refuse_deletes();
    rig.append_events(0..3);
    let (link, mut reports, _commands) = rig.link_to(ports, min_backoff);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(link.run(stopped));
    reports.acknowledged.wait_for(|n| *n >= 3).await.unwrap();
    rig.broker.kill();
    reports.state.wait_for(|s| matches!(s, LinkState::Connecting)).await.unwrap();
    (reports, stop, task, db)
}

/// A second broker of `kind` beside the rig's, with a relay on it: the broker, the relay and
/// what it sees, and the two brokers' ports in order.
async fn second_broker(
    rig: &Rig,
    kind: Kind,
) -> (TestBroker, AsyncClient, mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>, [u16; 2]) {
    let second = TestBroker::start(kind, &rig.pki, false);
    let (relay, seen) = rig.relay_on(second.port(), false).await;
    let ports = [rig.broker.port(), second.port()];
    (second, relay, seen, ports)
}

/// Every event the relay sees until `last` (inclusive).
async fn events_until(seen: &mut mpsc::UnboundedReceiver<(String, Vec<u8>, bool)>, last: &str) -> Vec<String> {
    let mut got = Vec::new();
    loop {
        let event = String::from_utf8(next_on(seen, "/events").await).unwrap();
        let done = event == last;
        got.push(event);
        if done {
            return got;
        }
    }
}

/// A link stopped while its broker is away still deletes what the broker acknowledged before
/// it went: no drain follows to do it, and each record left would be sent again after the
/// restart.
async fn acknowledged_records_are_deleted_when_the_link_stops_without_its_broker(kind: Kind) {
    let mut rig = rig(kind);
    let port = rig.broker.port();
    let (reports, stop, task, db) = acknowledged_then_gone(&mut rig, &[port], Duration::from_millis(100)).await;
    db.execute_batch("DROP TRIGGER refuse_deletes").unwrap();
    stop.send(true).unwrap();
    task.await.unwrap();
    assert_eq!(rig.store.lock().unwrap().outbox_len().unwrap(), 0, "acknowledged records left for the next start");
    assert_eq!(*reports.delivered.borrow(), 3);
}

/// A link that gives up on its broker for the next one first deletes what the first
/// acknowledged: the next broker does not get it again.
async fn acknowledged_records_are_deleted_before_the_link_moves_to_another_broker(kind: Kind) {
    let mut rig = rig(kind);
    let (_second, _relay, mut seen, ports) = second_broker(&rig, kind).await;
    // Backing off from 250 ms, three failures take at least 1.3 s: the trigger goes well before.
    let (mut reports, stop, task, db) = acknowledged_then_gone(&mut rig, &ports, Duration::from_millis(250)).await;
    db.execute_batch("DROP TRIGGER refuse_deletes").unwrap();
    reports.state.wait_for(|s| matches!(s, LinkState::Connected(1))).await.unwrap();
    // The outbox goes out in order: anything left of the first three would come before this.
    rig.append_events(3..4);
    let first = String::from_utf8(next_on(&mut seen, "/events").await).unwrap();
    assert_eq!(first, r#"{"id":"ev-3"}"#, "the second broker got a record the first had acknowledged");
    reports.delivered.wait_for(|n| *n >= 4).await.unwrap();
    assert_eq!(rig.store.lock().unwrap().outbox_len().unwrap(), 0);
    stop.send(true).unwrap();
    task.await.unwrap();
}

/// Acknowledged records the store still cannot delete when the link moves to another broker go
/// with it, still to be deleted: the next broker does not get them again either.
async fn records_the_store_cannot_delete_are_not_sent_to_the_next_broker_either(kind: Kind) {
    let mut rig = rig(kind);
    let (_second, _relay, mut seen, ports) = second_broker(&rig, kind).await;
    let (mut reports, stop, task, db) = acknowledged_then_gone(&mut rig, &ports, Duration::from_millis(100)).await;
    reports.state.wait_for(|s| matches!(s, LinkState::Connected(1))).await.unwrap();
    rig.append_events(3..4);
    let mut got = events_until(&mut seen, r#"{"id":"ev-3"}"#).await;
    assert_eq!(rig.store.lock().unwrap().outbox_len().unwrap(), 4, "nothing could be deleted");
    db.execute_batch("DROP TRIGGER refuse_deletes").unwrap();
    rig.append_events(4..5);
    got.extend(events_until(&mut seen, r#"{"id":"ev-4"}"#).await);
    assert_eq!(got, [r#"{"id":"ev-3"}"#, r#"{"id":"ev-4"}"#], "the second broker got what the first acknowledged");
    reports.delivered.wait_for(|n| *n >= 5).await.unwrap();
    assert_eq!(rig.store.lock().unwrap().outbox_len().unwrap(), 0);
    stop.send(true).unwrap();
    task.await.unwrap();
}

async fn status_is_online_then_offline_on_shutdown_and_by_last_will_on_a_crash(kind: Kind) {
    let rig = rig(kind);
    let (_relay, mut seen) = rig.relay().await;

    let (link, _reports, _commands) = rig.link();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(link.run(stopped));
    let online = next_on(&mut seen, "/status").await;
    assert!(String::from_utf8_lossy(&online).contains(r#""status":"online""#));
    stop.send(true).unwrap();
    task.await.unwrap();
    assert_eq!(next_on(&mut seen, "/status").await, br#"{"status":"offline"}"#);

    // A crash: the connection drops without DISCONNECT, and the broker publishes the will.
    let (link, mut reports, _commands) = rig.link();
    let (_stop, stopped) = watch::channel(false);
    let task = tokio::spawn(link.run(stopped));
    reports.state.wait_for(|s| matches!(s, LinkState::Connected(_))).await.unwrap();
    let status = next_on(&mut seen, "/status").await;
    assert!(String::from_utf8_lossy(&status).contains("online"), "{}", String::from_utf8_lossy(&status));
    task.abort();
    let _ = task.await;
    assert_eq!(next_on(&mut seen, "/status").await, br#"{"status":"offline"}"#);
}

async fn commands_arrive_and_oversized_ones_do_not_stop_the_link(kind: Kind) {
    let rig = rig(kind);
    let (relay, _seen) = rig.relay().await;
    let (link, mut reports, mut commands) = rig.link();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(link.run(stopped));
    reports.state.wait_for(|s| matches!(s, LinkState::Connected(_))).await.unwrap();
    let cmd_topic = format!("lockhub/v1/{GW}/cmd");
    // Connected means subscribed.
    relay.publish(&cmd_topic, QoS::AtLeastOnce, false, b"first".to_vec()).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(20), commands.recv()).await.unwrap().unwrap();
    assert_eq!(first.payload, b"first");
    first.stored.send(()).unwrap();
    relay.publish(&cmd_topic, QoS::AtLeastOnce, false, vec![b'x'; MAX_COMMAND_BYTES + 1]).await.unwrap();
    relay.publish(&cmd_topic, QoS::AtLeastOnce, false, b"after".to_vec()).await.unwrap();
    loop {
        let c = tokio::time::timeout(Duration::from_secs(20), commands.recv()).await.unwrap().unwrap();
        assert!(c.payload.len() <= MAX_COMMAND_BYTES, "an oversized command reached the handler");
        if c.payload == b"after" {
            c.stored.send(()).unwrap();
            break;
        }
    }
    assert!(matches!(*reports.state.borrow(), LinkState::Connected(_)), "the link kept serving");
    stop.send(true).unwrap();
    task.await.unwrap();
}

/// A 2 MiB command, far past any statement, on the brokers we configure: their limit
/// (`MAX_BROKER_PACKET`, in what `lockhub-cloud` writes) refuses it at the door, its publisher
/// is disconnected, and the hub never sees it: one connection, and the next command arrives.
/// (Mosquitto had no limit: the hub's client failed on the size, reconnected and was handed the
/// same message again, forever, the next command queued behind it.)
async fn a_command_of_two_mib_is_refused_at_the_broker_and_the_link_goes_on(kind: Kind) {
    two_mib_then_a_command(&rig(kind), false).await;
}

/// The same through a Mosquitto configured by someone else, with no packet limit: the message
/// reaches the hub, which reads it, acknowledges it, audits it once and drops it; one
/// connection, no loop, and the next command arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_of_two_mib_through_a_broker_without_a_limit_is_acknowledged_audited_once_and_dropped() {
    crate::needs!(Mosquitto);
    let rig = rig_on(|pki| TestBroker::Mosquitto(support::mosquitto::Mosquitto::start_without_packet_limit(pki)));
    two_mib_then_a_command(&rig, true).await;
}

async fn two_mib_then_a_command(rig: &Rig, reaches_the_hub: bool) {
    const TWO_MIB: usize = 2 << 20;
    let (link, reports, mut commands) = rig.link();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(link.run(stopped));
    reports.state.clone().wait_for(|s| matches!(s, LinkState::Connected(_))).await.unwrap();
    let cmd_topic = format!("lockhub/v1/{GW}/cmd");
    // The broker either acknowledges it (then it is queued for the hub ahead of what follows)
    // or ends the publisher's connection.
    let taken = support::broker::publish_once(&rig.pki, rig.broker.port(), &cmd_topic, vec![b'x'; TWO_MIB]).await;
    assert_eq!(taken, reaches_the_hub, "a broker with a limit refuses 2 MiB, one without takes it");
    let (relay, _seen) = rig.relay().await;
    relay.publish(&cmd_topic, QoS::AtLeastOnce, false, b"after".to_vec()).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(20), commands.recv())
        .await
        .expect("the next command arrives")
        .unwrap();
    assert_eq!(next.payload, b"after", "nothing oversized reached the handler");
    next.stored.send(()).unwrap();
    let audited =
        statement_audits(rig).into_iter().filter(|r| r.detail.starts_with(&format!("{TWO_MIB} bytes"))).count();
    assert_eq!(audited, usize::from(reaches_the_hub), "audited once where it arrived, nowhere else");
    assert_eq!(*reports.connections.borrow(), 1, "the link was never lost");
    stop.send(true).unwrap();
    task.await.unwrap();
}

/// Garbage, non-UTF-8, oversized, wrong-schema, forged and misaddressed payloads on the
/// command topic: each is refused with an audit record and, where its id is readable, a typed
/// reply that matches the reply schema; a good statement still gets through afterwards.
async fn malformed_oversized_and_wrong_schema_payloads_get_typed_errors(kind: Kind) {
    use lockhub::auth::statement::{Command, Operation, Statement, StatementId, typ};
    use lockhub::gateway::intake::{self, Intake};
    let rig = rig(kind);
    let (relay, mut seen) = rig.relay().await;
    let (link, mut reports, commands) = rig.link();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(link.run(stopped));
    let intake = Intake::new(rig.store.clone(), GatewayId::new(GW).unwrap(), rig.outbox_ready.clone());
    let (accepted_tx, mut accepted) = mpsc::channel(4);
    tokio::spawn(intake::serve(intake, commands, accepted_tx, || 1_000));
    reports.state.wait_for(|s| matches!(s, LinkState::Connected(_))).await.unwrap();

    let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let command = |id: &str, gw: &str| Command {
        jti: StatementId::new(id).unwrap(),
        gw: GatewayId::new(gw).unwrap(),
        lock: lockhub::protocol::ids::LockId([1; 8]),
        op: Operation::Unlock,
        iat: 1_000,
        exp: 1_030,
        nonce: "abcdefghijklmnop".into(),
    };
    let mut wrong_schema = serde_json::to_value(command("bad-schema", GW)).unwrap();
    wrong_schema["op"] = "explode".into();
    let wrong_schema =
        lockhub::auth::jws::sign(typ::COMMAND, &serde_json::to_vec(&wrong_schema).unwrap(), &key).into_bytes();
    let forged = {
        let good = Statement::Command(command("forged", GW)).sign(&key);
        let other = Statement::Command(Command { op: Operation::Unlatch, ..command("forged", GW) }).sign(&key);
        let (g, o): (Vec<&str>, Vec<&str>) = (good.split('.').collect(), other.split('.').collect());
        format!("{}.{}.{}", g[0], o[1], g[2]).into_bytes()
    };
    let elsewhere = Statement::Command(command("elsewhere", "gw-other")).sign(&key).into_bytes();
    let cmd_topic = format!("lockhub/v1/{GW}/cmd");
    for payload in [
        b"garbage".to_vec(),
        vec![0xff, 0xfe, 0x00],
        vec![b'x'; MAX_COMMAND_BYTES + 1],
        wrong_schema,
        forged,
        elsewhere,
        Statement::Command(command("good", GW)).sign(&key).into_bytes(),
    ] {
        relay.publish(&cmd_topic, QoS::AtLeastOnce, false, payload).await.unwrap();
    }
    let reply_schema = {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schemas/reply.json");
        jsonschema::validator_for(&serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()).unwrap()
    };
    for (id, reason) in [("bad-schema", "malformed"), ("forged", "bad_signature"), ("elsewhere", "wrong_gateway")] {
        let reply: serde_json::Value = serde_json::from_slice(&next_on(&mut seen, "/reply").await).unwrap();
        assert!(reply_schema.is_valid(&reply), "{reply}");
        assert_eq!((reply["id"].as_str(), reply["result"].as_str()), (Some(id), Some("refused")), "{reply}");
        assert_eq!(reply["reason"].as_str(), Some(reason), "{reply}");
    }
    // The good one passes the intake, after every refusal before it.
    let good = tokio::time::timeout(Duration::from_secs(20), accepted.recv()).await.unwrap().unwrap();
    assert_eq!(good.signed.statement.id().as_str(), "good");
    good.delivery.stored.send(()).unwrap();
    let outcomes: Vec<String> = statement_audits(&rig).into_iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        ["malformed", "malformed", "malformed", "malformed", "bad_signature", "wrong_gateway"],
        "one audit record per refusal, in order"
    );
    assert!(matches!(*reports.state.borrow(), LinkState::Connected(_)), "the link kept serving");
    stop.send(true).unwrap();
    task.await.unwrap();
}

/// How long delivery may make no progress before the test says so (instead of hanging).
const STALL: Duration = Duration::from_secs(60);

/// What a stalled delivery looked like.
fn stalled(rig: &Rig, reports: &lockhub::cloud::link::LinkReports) -> String {
    format!(
        "{} delivered, {} still in the outbox, link {:?}",
        *reports.delivered.borrow(),
        rig.store.lock().unwrap().outbox_len().unwrap(),
        *reports.state.borrow()
    )
}

/// The broker restarted three times in the middle of a stream of 300 events. The bundled broker
/// is killed with SIGKILL and its event sink must hold every event once; Mosquitto is stopped
/// and started (it saves its sessions), and a persistent relay session must see every event.
async fn the_broker_restarted_while_events_flow_loses_nothing(kind: Kind) {
    let mut rig = rig_with(kind, true);
    let mut relay = match kind {
        Kind::Mosquitto => Some(rig.relay_with(true).await),
        Kind::Bundled => None,
    };
    let (link, mut reports, _commands) = rig.link();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(link.run(stopped));
    let rounds = 3u32;
    let total = (rounds * 100) as usize;
    for round in 0..rounds {
        rig.append_events(round * 100..round * 100 + 100);
        // Restart in the middle of the stream.
        let want = u64::from(round * 100 + 20);
        let waited = tokio::time::timeout(STALL, reports.delivered.wait_for(|n| *n >= want)).await.is_ok();
        assert!(waited, "delivery stalled in round {round}: {}", stalled(&rig, &reports));
        tokio::task::block_in_place(|| rig.broker.restart());
    }
    // Every record leaves the outbox, each only after its acknowledgement.
    while rig.store.lock().unwrap().outbox_len().unwrap() > 0 {
        let waited = tokio::time::timeout(STALL, reports.delivered.changed()).await.is_ok();
        assert!(waited, "delivery stalled after the restarts: {}", stalled(&rig, &reports));
    }
    let stored = match (&rig.broker, &mut relay) {
        (TestBroker::Bundled(broker), _) => {
            // Acknowledged means stored: the sink has them all, once each.
            let sink = broker.events();
            let ids: BTreeSet<String> = sink.events(GW, 0, 10_000).unwrap().into_iter().map(|e| e.id).collect();
            assert_eq!(sink.count(Some(GW)).unwrap() as usize, ids.len(), "an event stored twice");
            println!("bundled broker killed {rounds} times: {} events in the sink, each once", ids.len());
            ids.len()
        }
        (TestBroker::Mosquitto(_), Some((_relay, seen))) => {
            let mut ids = BTreeSet::new();
            let mut received = 0;
            while ids.len() < total {
                ids.insert(String::from_utf8(next_on(seen, "/events").await).unwrap());
                received += 1;
            }
            println!(
                "mosquitto restarted {rounds} times: {} events delivered; {} duplicates before dedupe",
                ids.len(),
                received - ids.len()
            );
            ids.len()
        }
        (TestBroker::Mosquitto(_), None) => unreachable!("the Mosquitto run has a relay"),
    };
    assert_eq!(stored, total);
    stop.send(true).unwrap();
    task.await.unwrap();
}

/// Helper for the SIGKILL test, run as a child process: runs a cloud link with the PKI, broker
/// port and state directory given in `LOCKHUB_LINK_CHILD` (`<pki dir>|<port>|<state dir>`) and
/// says `CONNECTED` once it is.
#[tokio::test]
#[ignore = "a child process of the gateway_killed_with_sigkill_turns_offline test"]
async fn link_child() {
    let Ok(spec) = std::env::var("LOCKHUB_LINK_CHILD") else { return };
    let mut parts = spec.split('|');
    let (pki, port, state) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
    let pki = Pki::open(std::path::Path::new(pki));
    let store =
        Store::open(StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(std::path::Path::new(state)) }).unwrap();
    let config = CloudConfig::new(
        vec![format!("mqtts://localhost:{port}")],
        pki.ca_cert(),
        pki.client_cert(GW),
        pki.client_key(GW),
    );
    let (tx, _rx) = mpsc::channel(4);
    let (link, mut reports) =
        CloudLink::new(config, GatewayId::new(GW).unwrap(), Arc::new(Mutex::new(store)), Arc::new(Notify::new()), tx)
            .unwrap();
    let (_stop, stopped) = watch::channel(false);
    tokio::spawn(link.run(stopped));
    reports.state.wait_for(|s| matches!(s, LinkState::Connected(_))).await.unwrap();
    println!("CONNECTED");
    std::future::pending::<()>().await;
}

async fn gateway_killed_with_sigkill_turns_offline(kind: Kind) {
    use std::io::BufRead;
    let rig = rig(kind);
    let (_relay, mut seen) = rig.relay().await;
    let state = rig._dir.path().join("child-state");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "link_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(
            "LOCKHUB_LINK_CHILD",
            format!("{}|{}|{}", rig._dir.path().join("pki").display(), rig.broker.port(), state.display()),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let connected = tokio::task::spawn_blocking(move || {
        // libtest may print "test link_child ... " on the same line first.
        std::io::BufReader::new(stdout).lines().map_while(Result::ok).any(|l| l.ends_with("CONNECTED"))
    });
    let connected = tokio::time::timeout(Duration::from_secs(60), connected).await;
    if !matches!(connected, Ok(Ok(true))) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the child gateway did not connect");
    }
    assert!(String::from_utf8_lossy(&next_on(&mut seen, "/status").await).contains("online"));
    child.kill().unwrap(); // SIGKILL: no DISCONNECT, no goodbye.
    child.wait().unwrap();
    assert_eq!(next_on(&mut seen, "/status").await, br#"{"status":"offline"}"#);
}

/// Reads one MQTT packet with rumqttc's codec, as the bundled broker does.
async fn read_packet(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut bytes::BytesMut,
) -> rumqttc::mqttbytes::v4::Packet {
    use tokio::io::AsyncReadExt;
    loop {
        match rumqttc::mqttbytes::v4::Packet::read(buf, 64 * 1024) {
            Ok(packet) => return packet,
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => panic!("malformed packet from the link: {e:?}"),
        }
        assert!(stream.read_buf(buf).await.unwrap() > 0, "the link closed the connection");
    }
}

/// "online" tells the app it can send commands now: the subscription to them must already be
/// in place. A broker handles one connection's packets in order, so the order the link sends
/// them in is what counts; a scripted TLS server reads it. (Found under callgrind, which
/// slowed the gateway enough for a command sent on "online" to be routed before the
/// subscription existed, and dropped.)
/// A link whose owner drops the stop signal's sender without a word stops as if told: `offline`,
/// then the end of its task (it used to spin on the closed signal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_whose_stop_signal_goes_away_stops_cleanly() {
    let rig = rig(Kind::Bundled);
    let (_relay, mut seen) = rig.relay().await;
    let (link, _reports, _commands) = rig.link();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(link.run(stopped));
    assert!(String::from_utf8_lossy(&next_on(&mut seen, "/status").await).contains(r#""status":"online""#));
    drop(stop);
    tokio::time::timeout(Duration::from_secs(20), task).await.expect("the link runs on").unwrap();
    assert_eq!(next_on(&mut seen, "/status").await, br#"{"status":"offline"}"#);
}

#[tokio::test]
async fn the_command_subscription_goes_out_before_online() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), &[GW]).unwrap();
    let server = lockhub::cloud::tls::server_config(&pki.ca_cert(), &pki.broker_cert(), &pki.broker_key()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = CloudConfig::new(
        vec![format!("mqtts://localhost:{}", listener.local_addr().unwrap().port())],
        pki.ca_cert(),
        pki.client_cert(GW),
        pki.client_key(GW),
    );
    let store =
        Store::open(StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(&dir.path().join("state")) }).unwrap();
    let (tx, _commands) = mpsc::channel(16);
    let (link, _reports) =
        CloudLink::new(config, GatewayId::new(GW).unwrap(), Arc::new(Mutex::new(store)), Arc::new(Notify::new()), tx)
            .unwrap();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(link.run(stopped));

    let (tcp, _) = listener.accept().await.unwrap();
    let mut tls = tokio_rustls::TlsAcceptor::from(server).accept(tcp).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet};
    assert!(matches!(read_packet(&mut tls, &mut buf).await, Packet::Connect(_)), "CONNECT first");
    let mut connack = bytes::BytesMut::new();
    // No session: the link must subscribe afresh.
    Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)).write(&mut connack, 64).unwrap();
    tls.write_all(&connack).await.unwrap();
    let (first, second) = (read_packet(&mut tls, &mut buf).await, read_packet(&mut tls, &mut buf).await);
    match (&first, &second) {
        (Packet::Subscribe(subscribe), Packet::Publish(status)) => {
            assert_eq!(subscribe.filters[0].path, format!("lockhub/v1/{GW}/cmd"));
            assert_eq!(status.topic, format!("lockhub/v1/{GW}/status"));
        }
        _ => panic!("SUBSCRIBE to commands first, then the status; got {first:?} then {second:?}"),
    }
    stop.send(true).unwrap();
    drop(tls);
    task.await.unwrap();
}
