//! What end-to-end latency is compared with, measured the same way by every benchmark: the MQTT
//! round trip through a broker, the GATT round trip over D-Bus, one durable SQLite commit; and
//! percentiles of samples.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lockhub::ble::BleConfig;
use lockhub::ble::budget::ConnectionBudget;
use lockhub::cloud::tls::client_config;
use lockhub::devcloud::pki::{Pki, RELAY_IDENTITY};
use lockhub::protocol::message::{Actor, Op};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};
use tokio::sync::mpsc;

/// The sample at quantile `p` (0 to 1) of sorted `samples`.
pub fn at(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// `p50 … p95 … p99 … (n = …)` of `samples`.
pub fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    format!(
        "p50 {:>9.1?}  p95 {:>9.1?}  p99 {:>9.1?}  (n = {})",
        at(&samples, 0.50),
        at(&samples, 0.95),
        at(&samples, 0.99),
        samples.len()
    )
}

/// The median of `samples`.
pub fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    at(&samples, 0.5)
}

/// `n` QoS 1 round trips (publish → delivered back to the same client) through the broker on
/// `port`, as the relay, on `lockhub/v1/<gateway>/rt`, after 100 to warm up.
pub async fn mqtt_round_trips(pki: &Pki, port: u16, gateway: &str, n: usize) -> Vec<Duration> {
    let (client, mut rx) = relay_client(pki, port, "rtt");
    let topic = format!("lockhub/v1/{gateway}/rt");
    client.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
    rx.recv().await.unwrap();
    timed(&client, &topic, &mut rx, n).await
}

/// `n` timings of a publish by `client` on `topic` until the next publish arrives on `rx`,
/// after 100 to warm up.
async fn timed(
    client: &AsyncClient,
    topic: &str,
    rx: &mut mpsc::UnboundedReceiver<Option<bytes::Bytes>>,
    n: usize,
) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 100 {
        let t = Instant::now();
        client.publish(topic, QoS::AtLeastOnce, false, i.to_string()).await.unwrap();
        while rx.recv().await.unwrap().is_none() {}
        if i >= 100 {
            samples.push(t.elapsed());
        }
    }
    samples
}

/// A TLS client of the broker on `port` as the relay (client id `<relay>-<name>`), Nagle off as
/// the gateway has it; what it receives comes on the channel: `None` for a SUBACK, the payload
/// for a publish.
fn relay_client(pki: &Pki, port: u16, name: &str) -> (AsyncClient, mpsc::UnboundedReceiver<Option<bytes::Bytes>>) {
    let tls = client_config(&pki.ca_cert(), &pki.client_cert(RELAY_IDENTITY), &pki.client_key(RELAY_IDENTITY)).unwrap();
    let mut o = MqttOptions::new(format!("{RELAY_IDENTITY}-{name}"), "localhost", port);
    o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
    let (client, mut eventloop) = AsyncClient::new(o, 16);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(ev) = eventloop.poll().await {
            match ev {
                Event::Incoming(Incoming::SubAck(_)) => {
                    let _ = tx.send(None);
                }
                Event::Incoming(Incoming::Publish(p)) => {
                    let _ = tx.send(Some(p.payload));
                }
                _ => {}
            }
        }
    });
    (client, rx)
}

/// `n` QoS 1 request/reply round trips through the broker on `port`, after 100 to warm up: a
/// request published to a responder (a second client, which publishes its reply the moment
/// the request arrives) and the reply delivered back — the four TLS hops of a remote command
/// (app → broker → gateway → broker → app) with nothing done in between. Both clients are the
/// relay, on `lockhub/v1/<gateway>/rt/…`.
pub async fn mqtt_request_replies(pki: &Pki, port: u16, gateway: &str, n: usize) -> Vec<Duration> {
    let (request, reply) = (format!("lockhub/v1/{gateway}/rt/req"), format!("lockhub/v1/{gateway}/rt/resp"));
    let (responder, mut requests) = relay_client(pki, port, "echo");
    responder.subscribe(&request, QoS::AtLeastOnce).await.unwrap();
    requests.recv().await.unwrap();
    let echo = {
        let reply = reply.clone();
        tokio::spawn(async move {
            while let Some(got) = requests.recv().await {
                if let Some(payload) = got {
                    responder.publish(&reply, QoS::AtLeastOnce, false, payload).await.unwrap();
                }
            }
        })
    };
    let (client, mut replies) = relay_client(pki, port, "req");
    client.subscribe(&reply, QoS::AtLeastOnce).await.unwrap();
    replies.recv().await.unwrap();
    let samples = timed(&client, &request, &mut replies, n).await;
    echo.abort();
    samples
}

/// `n` GATT round trips (a Status request written, its answer notified back) to a fresh
/// emulated lock with `mtu`, over bluer and the test bus, on a warm link; and the first
/// command's time including connection and session set-up.
pub async fn gatt_round_trips(mtu: u16, n: usize) -> (Vec<Duration>, Duration) {
    gatt_exchanges(mtu, n, |_| Op::Status).await
}

/// `n` motor operations (unlock, lock, in turn; zero motor time) over GATT, as
/// [`gatt_round_trips`]: each answer comes after the two log entries the lock pushes (three
/// notifications where a status request has one). Not part of the floor: it is what the
/// lock itself costs a remote unlock beyond it.
pub async fn gatt_motor_round_trips(n: usize) -> Vec<Duration> {
    gatt_exchanges(247, n, |i| if i % 2 == 0 { Op::Unlock } else { Op::Lock }).await.0
}

async fn gatt_exchanges(mtu: u16, n: usize, op: impl Fn(usize) -> Op) -> (Vec<Duration>, Duration) {
    let ctl = super::control().await;
    let lock = super::add_lock(&ctl, &format!(r#"{{"motor_ms": 0, "mtu": {mtu}}}"#)).await;
    let transport = Arc::new(super::transport().await);
    let config = BleConfig::default();
    let budget = ConnectionBudget::new(config.max_links);
    let mut client = super::paired_client(transport, &lock, config, budget, "hub-bench").await;
    let connect_started = Instant::now();
    client.call(Actor::Hub, Op::Status).await.unwrap();
    let cold = connect_started.elapsed();
    for i in 0..100 {
        client.call(Actor::Hub, op(i)).await.unwrap();
        let _ = client.take_events();
    }
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        client.call(Actor::Hub, op(i)).await.unwrap();
        samples.push(t.elapsed());
        // Pushed log entries are the lock worker's to report; here they are only dropped.
        let _ = client.take_events();
    }
    client.disconnect().await;
    (samples, cold)
}

/// `n` durable commits of one audit record each, in a store in `dir`.
pub fn durable_commits(dir: &std::path::Path, n: usize) -> Vec<Duration> {
    use lockhub::store::{AuditEntry, Store, StoreConfig, audit::AuditActor};
    let mut store = Store::open(StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(dir) }).unwrap();
    (0..n)
        .map(|i| {
            let t = Instant::now();
            store
                .transaction(|tx| {
                    tx.audit(AuditEntry {
                        at: i as i64,
                        action: "bench",
                        outcome: "ok",
                        actor: AuditActor::Hub,
                        lock: None,
                        detail: "",
                    })
                })
                .unwrap();
            t.elapsed()
        })
        .collect()
}
