//! What the bundled broker (`lockhub-cloud serve`) enforces beyond the ACL tests it shares with
//! Mosquitto (`cloud_acl.rs`): client ids bound to certificates, wills confined to the
//! client's subtree, QoS 2 and malformed packets refused without disturbing other clients; a
//! gateway's events stored before their PUBACK, every PUBACK in publish order; a full event
//! store ending the gateway's connection with nothing it acknowledged lost; the relay's
//! session outlasting a broker that turns it away at first; a dropped app client closing its
//! connection; and `lockhub-cloud mosquitto-config`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use lockhub::cloud::tls::client_config;
use lockhub::devcloud::app::AppClient;
use lockhub::devcloud::pki::{Pki, RELAY_IDENTITY};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, Incoming, LastWill, MqttOptions, QoS, TlsConfiguration,
    Transport,
};
use support::bundled::Bundled;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tls(pki: &Pki, name: &str) -> Arc<rustls::ClientConfig> {
    client_config(&pki.ca_cert(), &pki.client_cert(name), &pki.client_key(name)).unwrap()
}

fn options(pki: &Pki, identity: &str, client_id: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "localhost", port);
    o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls(pki, identity))));
    o
}

/// The first outcome of connecting: the CONNACK's code, or the error.
async fn connect_outcome(o: MqttOptions) -> Result<(AsyncClient, rumqttc::EventLoop), ConnectionError> {
    let (client, mut eventloop) = AsyncClient::new(o, 8);
    match tokio::time::timeout(Duration::from_secs(20), eventloop.poll()).await.expect("no answer within 20 s") {
        Ok(Event::Incoming(Incoming::ConnAck(_))) => Ok((client, eventloop)),
        Ok(other) => panic!("unexpected first event {other:?}"),
        Err(e) => Err(e),
    }
}

/// A relay round trip works: the broker is still serving.
async fn still_serving(pki: &Pki, port: u16) {
    let (client, mut eventloop) = connect_outcome(options(pki, RELAY_IDENTITY, "lockhub-relay-probe", port))
        .await
        .expect("the broker stopped serving");
    client.subscribe("lockhub/v1/probe/x", QoS::AtLeastOnce).await.unwrap();
    client.publish("lockhub/v1/probe/x", QoS::AtLeastOnce, false, b"ping".to_vec()).await.unwrap();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), eventloop.poll()).await.unwrap().unwrap();
        if let Event::Incoming(Incoming::Publish(p)) = event {
            assert_eq!(p.payload.as_ref(), b"ping");
            return;
        }
    }
}

fn setup() -> (tempfile::TempDir, Pki, Bundled) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(dir.path(), &["gw-a", "gw-b"]).unwrap();
    let broker = Bundled::start(&pki);
    (dir, pki, broker)
}

#[tokio::test]
async fn events_are_stored_before_their_puback_and_pubacks_keep_publish_order() {
    let (_dir, pki, broker) = setup();
    let (client, mut eventloop) = connect_outcome(options(&pki, "gw-a", "gw-a", broker.port)).await.unwrap();
    // Events (held until the sink has them) interleaved with other publishes (routed at once):
    // the others' PUBACKs must still wait for the events before them.
    const N: usize = 60;
    let kinds: Vec<bool> = (0..N).map(|i| i % 3 != 2).collect();
    let to_publish = kinds.clone();
    // Published by a task while this one polls the event loop (which takes them in).
    tokio::spawn(async move {
        for (i, event) in to_publish.into_iter().enumerate() {
            let topic = if event { "lockhub/v1/gw-a/events" } else { "lockhub/v1/gw-a/lock/1/state" };
            client
                .publish(topic, QoS::AtLeastOnce, false, format!("{{\"id\":\"e{i}\",\"n\":{i}}}").into_bytes())
                .await
                .unwrap();
        }
    });
    let (mut published, mut acked) = (Vec::new(), Vec::new());
    let sink = broker.events();
    let mut events_acked = 0;
    while acked.len() < N {
        let event = tokio::time::timeout(Duration::from_secs(20), eventloop.poll()).await.unwrap().unwrap();
        match event {
            Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => published.push(pkid),
            Event::Incoming(Incoming::PubAck(ack)) => {
                let at = published.iter().position(|p| *p == ack.pkid).expect("a PUBACK for a publish sent");
                if kinds[at] {
                    events_acked += 1;
                }
                acked.push(ack.pkid);
                // Acknowledged: the sink has it (and every event before it).
                let stored = sink.events("gw-a", 0, 1_000).unwrap().len();
                assert!(stored >= events_acked, "{events_acked} events acknowledged, {stored} stored");
            }
            _ => {}
        }
    }
    assert_eq!(acked, published, "PUBACKs in publish order");
    assert_eq!(sink.events("gw-a", 0, 1_000).unwrap().len(), kinds.iter().filter(|e| **e).count());
}

/// Publishes events `ids` (about 48 KiB each) as gw-a; returns those the broker acknowledged,
/// and whether the connection ended before all were.
async fn publish_events(pki: &Pki, port: u16, ids: &[usize]) -> (Vec<usize>, bool) {
    let mut o = options(pki, "gw-a", "gw-a", port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = connect_outcome(o).await.unwrap();
    let to_publish = ids.to_vec();
    tokio::spawn(async move {
        for i in to_publish {
            let event = format!("{{\"id\":\"e{i}\",\"pad\":\"{}\"}}", "x".repeat(48 * 1024));
            if client.publish("lockhub/v1/gw-a/events", QoS::AtLeastOnce, false, event.into_bytes()).await.is_err() {
                return;
            }
        }
    });
    let (mut published, mut acked) = (Vec::new(), Vec::new());
    while acked.len() < ids.len() {
        match tokio::time::timeout(Duration::from_secs(20), eventloop.poll()).await.expect("no event within 20 s") {
            Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => published.push(pkid),
            Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                acked.push(ids[published.iter().position(|p| *p == ack.pkid).unwrap()]);
            }
            Ok(_) => {}
            Err(_) => return (acked, true),
        }
    }
    (acked, false)
}

#[tokio::test]
async fn a_full_event_store_ends_the_gateways_connection_and_loses_nothing_acknowledged() {
    crate::needs!(Root);
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(dir.path(), &["gw-a"]).unwrap();
    let fs = support::small_fs::SmallFilesystem::mount("1m");
    let broker = Bundled::start_in(&pki, fs.path());
    // 40 events of 48 KiB into 1 MiB: the sink fills up on the way.
    let all: Vec<usize> = (0..40).collect();
    let (acked, ended) = publish_events(&pki, broker.port, &all).await;
    assert!(
        ended && acked.len() < all.len(),
        "{} of {} acknowledged, connection ended: {ended}",
        acked.len(),
        all.len()
    );
    // Everything acknowledged is stored; the broker serves on.
    let stored = |sink: &lockhub::devcloud::sink::EventSink| -> Vec<String> {
        sink.events("gw-a", 0, 1_000).unwrap().into_iter().map(|e| e.id).collect()
    };
    let sink = broker.events();
    for i in &acked {
        assert!(stored(&sink).contains(&format!("e{i}")), "event {i} acknowledged but not stored");
    }
    still_serving(&pki, broker.port).await;
    // Room again: the gateway sends what was not acknowledged, and the sink has each event once.
    fs.resize("64m");
    let rest: Vec<usize> = all.iter().copied().filter(|i| !acked.contains(i)).collect();
    let (acked_now, ended) = publish_events(&pki, broker.port, &rest).await;
    assert!(
        !ended && acked_now.len() == rest.len(),
        "{} of {} acknowledged after the resize",
        acked_now.len(),
        rest.len()
    );
    let mut ids = stored(&sink);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), all.len(), "each event stored once");
    assert_eq!(stored(&sink).len(), all.len());
    println!(
        "the sink filled up after {} of {} events were acknowledged; the rest stored after the resize",
        acked.len(),
        all.len()
    );
}

#[tokio::test]
async fn the_relays_session_outlasts_a_broker_that_turns_it_away_at_first() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(dir.path(), &["gw-a"]).unwrap();
    let gw = lockhub::protocol::ids::GatewayId::new("gw-a").unwrap();

    // A one-off app (the CLI) reports the broker's refusal at once.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("mqtts://localhost:{}", listener.local_addr().unwrap().port());
    let (p, g) = (pki.clone(), gw.clone());
    tokio::spawn(async move {
        let _ = tx.send(AppClient::connect(&url, &p, &g).await.map(|_| ()));
    });
    drop(listener.accept().await.unwrap());
    let err = rx.await.unwrap().expect_err("the refusal is reported");
    assert!(err.to_string().contains("tls handshake eof"), "{err}");

    // The relay's persistent session tries again, and has its subscription once a broker serves.
    // (The stand-in takes one connection and drops it, as a clustered broker does with a
    // session it cannot place yet; then the real broker takes over its port.)
    let (tx, rx) = tokio::sync::oneshot::channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (p, g) = (pki.clone(), gw.clone());
    tokio::spawn(async move {
        let url = format!("mqtts://localhost:{port}");
        let _ = tx.send(AppClient::connect_persistent(&url, &p, &g, "retry-test").await.map(|_| ()));
    });
    drop(listener.accept().await.unwrap());
    drop(listener);
    let _broker = Bundled::start_on(&pki, port);
    rx.await.unwrap().expect("the relay connects once the broker serves");
}

#[tokio::test]
async fn a_dropped_app_client_closes_its_connection() {
    let (_dir, pki, broker) = setup();
    let gw = lockhub::protocol::ids::GatewayId::new("gw-a").unwrap();
    // A transparent relay between the app and the broker, to see the app's side close.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("mqtts://localhost:{}", proxy.local_addr().unwrap().port());
    let broker_port = broker.port;
    let (closed_tx, closed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut app_side, _) = proxy.accept().await.unwrap();
        let mut broker_side = tokio::net::TcpStream::connect(("127.0.0.1", broker_port)).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut app_side, &mut broker_side).await;
        let _ = closed_tx.send(());
    });
    let app = AppClient::connect(&url, &pki, &gw).await.unwrap();
    drop(app);
    tokio::time::timeout(Duration::from_secs(20), closed).await.expect("the connection outlived its client").unwrap();
}

#[tokio::test]
async fn a_client_id_must_be_the_certificates_identity() {
    let (_dir, pki, broker) = setup();
    // gw-a's certificate, gw-b's client id: it would take over gw-b's session.
    let refused = connect_outcome(options(&pki, "gw-a", "gw-b", broker.port)).await.err();
    assert!(matches!(refused, Some(ConnectionError::ConnectionRefused(ConnectReturnCode::BadClientId))), "{refused:?}");
    let refused = connect_outcome(options(&pki, "gw-a", RELAY_IDENTITY, broker.port)).await.err();
    assert!(matches!(refused, Some(ConnectionError::ConnectionRefused(ConnectReturnCode::BadClientId))));
    assert!(connect_outcome(options(&pki, "gw-a", "gw-a", broker.port)).await.is_ok());
    still_serving(&pki, broker.port).await;
}

#[tokio::test]
async fn a_will_outside_the_clients_subtree_is_refused() {
    let (_dir, pki, broker) = setup();
    let mut o = options(&pki, "gw-a", "gw-a", broker.port);
    o.set_last_will(LastWill::new("lockhub/v1/gw-b/status", "forged offline", QoS::AtLeastOnce, true));
    let refused = connect_outcome(o).await.err();
    assert!(
        matches!(refused, Some(ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized))),
        "{refused:?}"
    );
}

#[tokio::test]
async fn qos_2_and_garbage_end_only_the_offending_connection() {
    let (_dir, pki, broker) = setup();

    // QoS 2: not supported; the connection is closed.
    let (client, mut eventloop) = connect_outcome(options(&pki, "gw-a", "gw-a", broker.port)).await.unwrap();
    client.publish("lockhub/v1/gw-a/events", QoS::ExactlyOnce, false, b"{}".to_vec()).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Err(e) = eventloop.poll().await {
                return e;
            }
        }
    })
    .await
    .unwrap();
    assert!(matches!(ended, ConnectionError::Io(_) | ConnectionError::MqttState(_)), "{ended:?}");

    // Bytes that are no MQTT packet, a PUBLISH before CONNECT, a CONNECT without a protocol
    // name: after a valid TLS handshake.
    let connector = tokio_rustls::TlsConnector::from(tls(&pki, "gw-b"));
    for garbage in [&[0xff_u8, 0xff, 0xff, 0xff, 0xff][..], &[0x30, 0x03, 0x00, 0x01, b'a'], &[0x10, 0x02, 0x00, 0x00]]
    {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", broker.port)).await.unwrap();
        let mut stream = connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap();
        stream.write_all(garbage).await.unwrap();
        let mut rest = Vec::new();
        // The broker closes the connection; it says nothing it should not.
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut rest)).await.unwrap();
        assert!(n.is_err() || rest.is_empty(), "answered garbage with {rest:?}");
    }

    // A packet larger than the broker's limit (1 MiB): announced, then refused.
    let mut o = options(&pki, "gw-a", "gw-a", broker.port);
    o.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut eventloop) = connect_outcome(o).await.unwrap();
    client.publish("lockhub/v1/gw-a/events", QoS::AtLeastOnce, false, vec![b'x'; 2 << 20]).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match eventloop.poll().await {
                Err(e) => return Some(e),
                Ok(Event::Incoming(Incoming::PubAck(_))) => return None,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap();
    assert!(ended.is_some(), "an oversized publish was acknowledged");

    still_serving(&pki, broker.port).await;
}

#[test]
fn mosquitto_config_prints_tls_identity_and_acl_settings() {
    let dir = tempfile::tempdir().unwrap();
    Pki::init(dir.path(), &[]).unwrap();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lockhub-cloud"))
            .args(["mosquitto-config", "--pki"])
            .arg(dir.path())
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let conf = run(&["--port", "8884"]);
    for line in
        ["listener 8884 0.0.0.0", "require_certificate true", "use_identity_as_username true", "allow_anonymous false"]
    {
        assert!(conf.lines().any(|l| l == line), "missing {line:?} in\n{conf}");
    }
    assert!(conf.contains(&format!("cafile {}", dir.path().join("ca.pem").display())));
    let acl = run(&["--acl"]);
    assert!(acl.lines().any(|l| l == "pattern readwrite lockhub/v1/%u/#"), "{acl}");
    assert!(acl.lines().any(|l| l == format!("user {RELAY_IDENTITY}")), "{acl}");

    // Without a PKI: a clear error, not a panic.
    let empty = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lockhub-cloud"))
        .args(["mosquitto-config", "--pki"])
        .arg(empty.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds no PKI"), "{}", String::from_utf8_lossy(&out.stderr));
}
