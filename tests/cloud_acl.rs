//! Mutual TLS and per-gateway topic ACLs, the same tests against the bundled broker
//! (`lockhub-cloud serve`) and Debian's Mosquitto (configured as `lockhub-cloud
//! mosquitto-config` says), with the development PKI (`lockhub::devcloud::pki`) and the
//! gateway TLS configuration (`lockhub::cloud::tls`); and the app stand-in's marker, which
//! tells it every retained message of a gateway's subtree has arrived (and its own error
//! where a broker drops the marker).

mod support;

on_both_brokers!(
    a_client_without_a_certificate_or_with_another_cas_is_refused,
    gateway_a_can_neither_read_nor_write_gateway_bs_subtree,
    every_retained_message_arrives_before_the_apps_marker
);

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use lockhub::cloud::tls::client_config;
use lockhub::devcloud::app::{AppClient, AppError};
use lockhub::devcloud::pki::{Pki, RELAY_IDENTITY};
use lockhub::protocol::ids::GatewayId;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};
use support::broker::{Kind, TestBroker};
use tokio::sync::mpsc;

/// What a test client sees.
#[derive(Debug)]
enum Seen {
    Connected,
    SubAck(Vec<rumqttc::SubscribeReasonCode>),
    Message(String, Vec<u8>),
    PubAck,
    Failed(String),
}

fn options(name: &str, port: u16, tls: Option<Arc<rustls::ClientConfig>>) -> MqttOptions {
    let mut o = MqttOptions::new(name, "localhost", port);
    o.set_keep_alive(Duration::from_secs(5));
    if let Some(tls) = tls {
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
    }
    o
}

fn start_client(opts: MqttOptions) -> (AsyncClient, mpsc::UnboundedReceiver<Seen>) {
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let seen = match eventloop.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => Seen::Connected,
                Ok(Event::Incoming(Incoming::SubAck(s))) => Seen::SubAck(s.return_codes),
                Ok(Event::Incoming(Incoming::Publish(p))) => Seen::Message(p.topic, p.payload.to_vec()),
                Ok(Event::Incoming(Incoming::PubAck(_))) => Seen::PubAck,
                Ok(_) => continue,
                Err(e) => {
                    let _ = tx.send(Seen::Failed(e.to_string()));
                    return;
                }
            };
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    (client, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("no event within 20 s").expect("client gone")
}

async fn connected(pki: &Pki, broker: &TestBroker, name: &str) -> (AsyncClient, mpsc::UnboundedReceiver<Seen>) {
    let tls = client_config(&pki.ca_cert(), &pki.client_cert(name), &pki.client_key(name)).unwrap();
    let (client, mut rx) = start_client(options(name, broker.port(), Some(tls)));
    match next(&mut rx).await {
        Seen::Connected => (client, rx),
        other => panic!("{name} did not connect: {other:?}"),
    }
}

async fn subscribe(client: &AsyncClient, rx: &mut mpsc::UnboundedReceiver<Seen>, topic: &str) -> bool {
    client.subscribe(topic, QoS::AtLeastOnce).await.unwrap();
    match next(rx).await {
        Seen::SubAck(codes) => codes.iter().all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
        other => panic!("expected a SUBACK, got {other:?}"),
    }
}

fn pki(dir: &Path) -> Pki {
    Pki::init(dir, &["gw-a", "gw-b"]).unwrap()
}

async fn a_client_without_a_certificate_or_with_another_cas_is_refused(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let broker = TestBroker::start(kind, &pki, false);

    // No client certificate: the TLS handshake fails.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut std::fs::read(pki.ca_cert()).unwrap().as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (_c, mut rx) = start_client(options("intruder", broker.port(), Some(Arc::new(anonymous))));
    let refused = next(&mut rx).await;
    assert!(matches!(&refused, Seen::Failed(e) if e.contains("CertificateRequired")), "{refused:?}");

    // A certificate from another CA, for a real gateway's name.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Pki::init(other_dir.path(), &["gw-a"]).unwrap();
    let tls = client_config(&pki.ca_cert(), &other.client_cert("gw-a"), &other.client_key("gw-a")).unwrap();
    let (_c, mut rx) = start_client(options("gw-a", broker.port(), Some(tls)));
    let refused = next(&mut rx).await;
    // The broker cannot verify the signature: a fatal TLS alert.
    assert!(matches!(&refused, Seen::Failed(e) if e.contains("alert")), "{refused:?}");

    // Plain TCP: nothing.
    let (_c, mut rx) = start_client(options("plain", broker.port(), None));
    assert!(matches!(next(&mut rx).await, Seen::Failed(_)), "a plaintext client got in");

    // And the broker itself is checked: a gateway trusting another CA refuses it.
    let tls = client_config(&other.ca_cert(), &pki.client_cert("gw-a"), &pki.client_key("gw-a")).unwrap();
    let (_c, mut rx) = start_client(options("gw-a", broker.port(), Some(tls)));
    let refused = next(&mut rx).await;
    assert!(matches!(&refused, Seen::Failed(e) if e.contains("invalid peer certificate")), "{refused:?}");
}

async fn gateway_a_can_neither_read_nor_write_gateway_bs_subtree(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let broker = TestBroker::start(kind, &pki, false);
    let (a, mut a_rx) = connected(&pki, &broker, "gw-a").await;
    let (b, mut b_rx) = connected(&pki, &broker, "gw-b").await;
    let (relay, mut relay_rx) = connected(&pki, &broker, RELAY_IDENTITY).await;

    assert!(subscribe(&a, &mut a_rx, "lockhub/v1/gw-a/cmd").await, "a gateway reads its own subtree");
    assert!(subscribe(&b, &mut b_rx, "lockhub/v1/gw-b/cmd").await);
    // Whatever the SUBACK says, nothing of B's may reach A.
    subscribe(&a, &mut a_rx, "lockhub/v1/gw-b/#").await;
    subscribe(&a, &mut a_rx, "#").await;

    // B publishes in its subtree; the broker has it once B's PUBACK arrives.
    b.publish("lockhub/v1/gw-b/events", QoS::AtLeastOnce, false, b"b's secret".to_vec()).await.unwrap();
    assert!(matches!(next(&mut b_rx).await, Seen::PubAck));
    // A writes into B's command topic.
    a.publish("lockhub/v1/gw-b/cmd", QoS::AtLeastOnce, false, b"a forged command".to_vec()).await.unwrap();
    assert!(matches!(next(&mut a_rx).await, Seen::PubAck | Seen::Message(..)));

    // Markers from the relay, published after both: whatever was going to be delivered before
    // them has been.
    relay.publish("lockhub/v1/gw-a/cmd", QoS::AtLeastOnce, false, b"marker-a".to_vec()).await.unwrap();
    relay.publish("lockhub/v1/gw-b/cmd", QoS::AtLeastOnce, false, b"marker-b".to_vec()).await.unwrap();
    loop {
        match next(&mut a_rx).await {
            Seen::Message(topic, payload) => {
                assert!(
                    topic.starts_with("lockhub/v1/gw-a/"),
                    "A received {topic}: {:?}",
                    String::from_utf8_lossy(&payload)
                );
                if payload == b"marker-a" {
                    break;
                }
            }
            Seen::Failed(e) => panic!("{e}"),
            _ => {}
        }
    }
    loop {
        match next(&mut b_rx).await {
            Seen::Message(_, payload) => {
                assert_ne!(payload, b"a forged command", "A wrote into B's command topic");
                if payload == b"marker-b" {
                    break;
                }
            }
            Seen::Failed(e) => panic!("{e}"),
            _ => {}
        }
    }
    drop(relay_rx.try_recv());
}

/// `AppClient::retained` (what `lockhub-cloud app status` prints) returns every retained
/// message of a gateway's subtree, however many: the broker delivers them before the marker
/// the app publishes after subscribing. Sixty of them: Mosquitto sends at most twenty QoS 1
/// messages at a time, so they take several rounds while the marker waits behind them.
async fn every_retained_message_arrives_before_the_apps_marker(kind: Kind) {
    const STATES: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let broker = TestBroker::start(kind, &pki, false);
    let (gateway, mut gateway_rx) = connected(&pki, &broker, "gw-a").await;
    for i in 0..STATES {
        let topic = format!("lockhub/v1/gw-a/lock/{i:016x}/state");
        gateway.publish(topic, QoS::AtLeastOnce, true, format!("{{\"n\":{i}}}").into_bytes()).await.unwrap();
    }
    let mut acknowledged = 0;
    while acknowledged < STATES {
        match next(&mut gateway_rx).await {
            Seen::PubAck => acknowledged += 1,
            Seen::Failed(e) => panic!("{e}"),
            _ => {}
        }
    }
    let url = format!("mqtts://localhost:{}", broker.port());
    let app = AppClient::connect(&url, &pki, &GatewayId::new("gw-a").unwrap()).await.unwrap();
    let retained = app.retained(Duration::from_secs(30)).await.unwrap();
    assert_eq!(retained.len(), STATES, "{:?}", retained.iter().map(|(topic, _)| topic).collect::<Vec<_>>());
}

/// A broker that drops the app's marker — here Mosquitto with an ACL that lets the relay's
/// clients publish commands and nothing else, which Mosquitto acknowledges and discards —
/// ends `AppClient::retained` with its own error at the deadline: never a list that may be
/// missing messages, never a wait without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_drops_the_apps_marker_ends_the_wait_with_its_own_error() {
    crate::needs!(Mosquitto);
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let acl = format!(
        "user {RELAY_IDENTITY}\ntopic read lockhub/v1/#\ntopic write lockhub/v1/+/cmd\n\npattern readwrite lockhub/v1/%u/#\n"
    );
    let broker = TestBroker::Mosquitto(support::mosquitto::Mosquitto::start_with_acl(&pki, &acl));
    let (gateway, mut gateway_rx) = connected(&pki, &broker, "gw-a").await;
    gateway.publish("lockhub/v1/gw-a/status", QoS::AtLeastOnce, true, b"{}".to_vec()).await.unwrap();
    loop {
        match next(&mut gateway_rx).await {
            Seen::PubAck => break,
            Seen::Failed(e) => panic!("{e}"),
            _ => {}
        }
    }
    let url = format!("mqtts://localhost:{}", broker.port());
    let app = AppClient::connect(&url, &pki, &GatewayId::new("gw-a").unwrap()).await.unwrap();
    let wait = Duration::from_millis(500);
    match app.retained(wait).await {
        Err(e @ AppError::RetainedTimeout(d)) => {
            assert_eq!(d, wait);
            assert_eq!(e.to_string(), "the broker did not deliver the gateway's retained messages within 500ms");
        }
        other => panic!("expected the marker's own timeout, got {other:?}"),
    }
}
