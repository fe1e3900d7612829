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
    timed(&client, &topic, &mut rx, 100, n).await
}

/// `n` timings of a publish by `client` on `topic` until the next publish arrives on `rx`,
/// after `warm_up` untimed.
async fn timed(
    client: &AsyncClient,
    topic: &str,
    rx: &mut mpsc::UnboundedReceiver<Option<bytes::Bytes>>,
    warm_up: usize,
    n: usize,
) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..warm_up + n {
        let t = Instant::now();
        client.publish(topic, QoS::AtLeastOnce, false, i.to_string()).await.unwrap();
        while rx.recv().await.unwrap().is_none() {}
        if i >= warm_up {
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

/// The floor's MQTT request/reply through the broker on `port`: a request published to a
/// responder (a second client, which publishes its reply the moment the request arrives) and
/// the reply delivered back — the four TLS hops of a remote command (app → broker → gateway →
/// broker → app) with nothing done in between. Both clients are the relay, on
/// `lockhub/v1/<gateway>/rt/…`. Set up once, sampled as often as wanted: a benchmark can take
/// its samples in turns with what it compares them with.
pub struct MqttRequestReply {
    client: AsyncClient,
    replies: mpsc::UnboundedReceiver<Option<bytes::Bytes>>,
    request: String,
    echo: tokio::task::JoinHandle<()>,
}

impl MqttRequestReply {
    /// Connects and subscribes both clients.
    pub async fn start(pki: &Pki, port: u16, gateway: &str) -> Self {
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
        MqttRequestReply { client, replies, request, echo }
    }

    /// `n` QoS 1 request/replies, after 100 to warm up.
    pub async fn sample(&mut self, n: usize) -> Vec<Duration> {
        timed(&self.client, &self.request, &mut self.replies, 100, n).await
    }

    /// One QoS 1 request/reply, with no warm-up: one link of a chain of the floor's parts.
    pub async fn once(&mut self) -> Duration {
        timed(&self.client, &self.request, &mut self.replies, 0, 1).await[0]
    }
}

impl Drop for MqttRequestReply {
    fn drop(&mut self) {
        self.echo.abort();
    }
}

/// `n` GATT round trips (a Status request written, its answer notified back) to a fresh
/// emulated lock with `mtu`, over bluer and the test bus, on a warm link; and the first
/// command's time including connection and session set-up.
pub async fn gatt_round_trips(mtu: u16, n: usize) -> (Vec<Duration>, Duration) {
    let (mut exchanges, cold) = GattExchanges::start(mtu, GattOp::Status).await;
    let samples = exchanges.sample(n).await;
    exchanges.finish().await;
    (samples, cold)
}

/// `n` motor operations (unlock, lock, in turn; zero motor time) over GATT, as
/// [`gatt_round_trips`]: each answer comes after the two log entries the lock pushes (three
/// notifications where a status request has one). Not part of the floor: it is what the
/// lock itself costs a remote unlock beyond it.
pub async fn gatt_motor_round_trips(n: usize) -> Vec<Duration> {
    let (mut exchanges, _) = GattExchanges::start(247, GattOp::UnlockThenLock).await;
    let samples = exchanges.sample(n).await;
    exchanges.finish().await;
    samples
}

/// What [`GattExchanges`] asks the lock.
#[derive(Clone, Copy, Debug)]
pub enum GattOp {
    /// Its status: one request, one notification back (the floor's GATT round trip).
    Status,
    /// Unlock, then lock, in turn (zero motor time).
    UnlockThenLock,
}

/// Exchanges with a fresh emulated lock over bluer and the test bus, on a link kept warm: set
/// up once (paired, connected, 100 exchanges to warm up), sampled as often as wanted.
pub struct GattExchanges {
    client: lockhub::ble::client::LockClient<lockhub::ble::bluez::BluezTransport>,
    op: GattOp,
    done: usize,
}

impl GattExchanges {
    /// A lock with `mtu`, paired and connected; the first command's time including connection
    /// and session set-up.
    pub async fn start(mtu: u16, op: GattOp) -> (Self, Duration) {
        let ctl = super::control().await;
        let lock = super::add_lock(&ctl, &format!(r#"{{"motor_ms": 0, "mtu": {mtu}}}"#)).await;
        let transport = Arc::new(super::transport().await);
        let config = BleConfig::default();
        let budget = ConnectionBudget::new(config.max_links);
        let client = super::paired_client(transport, &lock, config, budget, "hub-bench").await;
        let mut exchanges = GattExchanges { client, op, done: 0 };
        let connect_started = Instant::now();
        exchanges.client.call(Actor::Hub, Op::Status).await.unwrap();
        let cold = connect_started.elapsed();
        for _ in 0..100 {
            exchanges.exchange().await;
        }
        (exchanges, cold)
    }

    /// `n` timed exchanges.
    pub async fn sample(&mut self, n: usize) -> Vec<Duration> {
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            self.exchange().await;
            samples.push(t.elapsed());
        }
        samples
    }

    async fn exchange(&mut self) {
        let op = match self.op {
            GattOp::Status => Op::Status,
            GattOp::UnlockThenLock if self.done.is_multiple_of(2) => Op::Unlock,
            GattOp::UnlockThenLock => Op::Lock,
        };
        self.client.call(Actor::Hub, op).await.unwrap();
        self.done += 1;
        // Pushed log entries are the lock worker's to report; here they are only dropped.
        let _ = self.client.take_events();
    }

    /// Disconnects.
    pub async fn finish(mut self) {
        self.client.disconnect().await;
    }
}

/// Durable commits of one audit record each, in a store of its own: opened once, sampled as
/// often as wanted.
pub struct DurableCommits {
    store: lockhub::store::Store,
    done: i64,
}

impl DurableCommits {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &std::path::Path) -> Self {
        use lockhub::store::{Store, StoreConfig};
        let store = Store::open(StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(dir) }).unwrap();
        DurableCommits { store, done: 0 }
    }

    /// `n` timed commits.
    pub fn sample(&mut self, n: usize) -> Vec<Duration> {
        use lockhub::store::{AuditEntry, audit::AuditActor};
        (0..n)
            .map(|_| {
                self.done += 1;
                let at = self.done;
                let t = Instant::now();
                self.store
                    .transaction(|tx| {
                        tx.audit(AuditEntry {
                            at,
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
}
