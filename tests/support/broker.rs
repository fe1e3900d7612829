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
