//! Either broker behind one face, so that the same tests run against the bundled broker and
//! Debian's Mosquitto.

use lockhub::devcloud::pki::Pki;

use super::bundled::Bundled;
use super::mosquitto::Mosquitto;

/// Which broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `lockhub-cloud serve`.
    Bundled,
    /// Debian's mosquitto, configured as `lockhub-cloud mosquitto-config` says.
    Mosquitto,
}

/// A running broker of either kind.
pub enum TestBroker {
    /// The bundled one.
    Bundled(Bundled),
    /// Mosquitto.
    Mosquitto(Mosquitto),
}

impl TestBroker {
    /// Starts a broker of `kind` for `pki`. Mosquitto keeps sessions across restarts when
    /// `persistent`; the bundled broker keeps its event sink on disk either way.
    pub fn start(kind: Kind, pki: &Pki, persistent: bool) -> Self {
        match kind {
            Kind::Bundled => TestBroker::Bundled(Bundled::start(pki)),
            Kind::Mosquitto => TestBroker::Mosquitto(Mosquitto::start_with(pki, persistent)),
        }
    }

    /// Its TLS port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        match self {
            TestBroker::Bundled(b) => b.port,
            TestBroker::Mosquitto(m) => m.port,
        }
    }

    /// Restarts it on the same port: the bundled broker is killed (SIGKILL), Mosquitto stopped
    /// with SIGTERM (it saves its state).
    pub fn restart(&mut self) {
        match self {
            TestBroker::Bundled(b) => b.restart(),
            TestBroker::Mosquitto(m) => m.restart(),
        }
    }

    /// Kills it (SIGKILL): its port refuses connections from now on.
    pub fn kill(&mut self) {
        match self {
            TestBroker::Bundled(b) => b.kill(),
            TestBroker::Mosquitto(m) => m.kill(),
        }
    }
}

/// Publishes `payload` to `topic` at QoS 1 as the relay, on a connection of its own, to the
/// broker on `port`: whether the broker acknowledged it (true) or ended the connection instead
/// (false), as a broker does with a packet over its limit.
pub async fn publish_once(pki: &Pki, port: u16, topic: &str, payload: Vec<u8>) -> bool {
    use lockhub::devcloud::pki::RELAY_IDENTITY;
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};
    let tls = lockhub::cloud::tls::client_config(
        &pki.ca_cert(),
        &pki.client_cert(RELAY_IDENTITY),
        &pki.client_key(RELAY_IDENTITY),
    )
    .unwrap();
    let mut o = MqttOptions::new(RELAY_IDENTITY, "localhost", port);
    o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
    // Room for the oversized packet on our side: the broker is what is tested.
    o.set_max_packet_size(4 << 20, 4 << 20);
    let (client, mut eventloop) = AsyncClient::new(o, 4);
    client.publish(topic, QoS::AtLeastOnce, false, payload).await.unwrap();
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Incoming::PubAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .expect("the broker answers or closes within 20 s");
    let _ = client.try_disconnect();
    outcome
}

/// Generates one `#[tokio::test]` per broker for each listed `async fn name(kind: Kind)`.
#[macro_export]
macro_rules! on_both_brokers {
    ($($name:ident),* $(,)?) => {
        mod bundled {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::broker::Kind::Bundled).await
                }
            )*
        }
        mod mosquitto {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    $crate::needs!(Mosquitto);
                    super::$name($crate::support::broker::Kind::Mosquitto).await
                }
            )*
        }
    };
}
