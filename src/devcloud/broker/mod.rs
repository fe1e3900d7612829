//! The bundled MQTT 3.1.1 broker: mutual TLS, per-gateway topic ACLs, and the event sink.
//!
//! Why our own: rumqttd embeds with TLS and client certificates but has no topic ACLs (an
//! authenticated client that subscribes to `#` sees every tenant), and the brokers that have
//! them are not libraries. A broker for lockhub's needs is small when the packet codec comes
//! from rumqttc (`mqttbytes`): [`router`] is the sans-IO routing state machine, [`topic`] the
//! topic rules, `connection` the per-client I/O, and [`crate::devcloud::acl`] the rules it
//! enforces. QoS 0 and 1, retained messages, last wills and persistent sessions (in memory) are
//! supported; QoS 2 is refused.
//!
//! Every client presents a certificate from the PKI's CA; its common name is its identity, and
//! a gateway's client id must be that identity. Events a gateway publishes on its `events`
//! topic are stored in the [`EventSink`] before the PUBACK.

mod connection;
pub mod router;
pub mod topic;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::mqttbytes::v4::Packet;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};

use self::router::{Action, ConnId, Limits, Router};
use crate::cloud::tls::{TlsError, server_config};
use crate::devcloud::pki::Pki;
use crate::devcloud::sink::{EventSink, SinkError};

/// How the broker runs.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Address to listen on (port 0: any free port).
    pub listen: SocketAddr,
    /// The CA whose client certificates are accepted.
    pub ca_file: PathBuf,
    /// The broker's certificate.
    pub cert_file: PathBuf,
    /// Its key.
    pub key_file: PathBuf,
    /// Where to store gateways' events; none: events are routed, not stored.
    pub events_db: Option<PathBuf>,
    /// Per-session bounds.
    pub limits: Limits,
    /// Largest packet accepted, in bytes.
    pub max_packet: usize,
    /// Most clients connected at once.
    pub max_connections: usize,
}

impl BrokerConfig {
    /// The broker of a development PKI, with the default bounds: packets up to
    /// [`crate::cloud::link::MAX_BROKER_PACKET`] (256 KiB), 1,024 connections.
    pub fn from_pki(pki: &Pki, listen: SocketAddr, events_db: Option<PathBuf>) -> Self {
        BrokerConfig {
            listen,
            ca_file: pki.ca_cert(),
            cert_file: pki.broker_cert(),
            key_file: pki.broker_key(),
            events_db,
            limits: Limits::default(),
            max_packet: crate::cloud::link::MAX_BROKER_PACKET,
            max_connections: 1024,
        }
    }
}

/// Why the broker could not start.
#[derive(Debug, Error)]
pub enum BrokerError {
    /// The TLS files are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The listening socket could not be opened.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The event database could not be opened.
    #[error("opening the event database: {0}")]
    Sink(#[from] SinkError),
}

/// The routing state and the connections' outbound queues, under one lock.
struct Hub {
    router: Router,
    outbound: HashMap<ConnId, mpsc::Sender<Packet>>,
}

impl Hub {
    fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send(conn, packet) => {
                    let Some(tx) = self.outbound.get(&conn) else { continue };
                    // A client that does not read its queue is dropped (its task sees the queue
                    // closed) rather than letting it hold the broker's memory.
                    if tx.try_send(packet).is_err() {
                        tracing::warn!(conn, "client too slow to read: disconnecting it");
                        self.outbound.remove(&conn);
                    }
                }
                Action::Close(conn) => {
                    self.outbound.remove(&conn);
                }
            }
        }
    }
}

/// What connections share.
struct Shared {
    hub: Mutex<Hub>,
    sink: Option<Arc<Mutex<EventSink>>>,
    max_packet: usize,
}

impl Shared {
    /// Runs `f` on the hub and carries out the actions it returns.
    fn with_hub(&self, f: impl FnOnce(&mut Hub) -> Vec<Action>) {
        let mut hub = self.hub.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let actions = f(&mut hub);
        hub.apply(actions);
    }
}

/// A bound broker, ready to run.
pub struct Broker {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("addr", &self.listener.local_addr().ok()).finish_non_exhaustive()
    }
}

impl Broker {
    /// Loads the TLS configuration, opens the event database and binds the listening socket.
    pub async fn bind(config: BrokerConfig) -> Result<Self, BrokerError> {
        let tls = server_config(&config.ca_file, &config.cert_file, &config.key_file)?;
        let sink = match &config.events_db {
            Some(path) => Some(Arc::new(Mutex::new(EventSink::open(path)?))),
            None => None,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| BrokerError::Listen { addr: config.listen, source })?;
        let hub = Hub { router: Router::new(config.limits), outbound: HashMap::new() };
        Ok(Broker {
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(tls),
            shared: Arc::new(Shared { hub: Mutex::new(hub), sink, max_packet: config.max_packet }),
            slots: Arc::new(Semaphore::new(config.max_connections)),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    /// Serves clients until `shutdown` turns true, then closes every connection (no wills:
    /// the clients did nothing wrong).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        static NEXT_CONN: AtomicU64 = AtomicU64::new(1);
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let (tcp, _peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors and the like: wait a moment, keep serving.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                        tracing::warn!("connection limit reached: refusing a client");
                        continue;
                    };
                    let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
                    let (shared, acceptor, stop) = (self.shared.clone(), self.acceptor.clone(), shutdown.clone());
                    connections.spawn(async move {
                        connection::serve(shared, acceptor, tcp, conn, stop).await;
                        drop(slot);
                    });
                    // Reap finished connections as we go.
                    while connections.try_join_next().is_some() {}
                }
                () = crate::stop::requested(&mut shutdown) => break,
            }
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(5), async { while connections.join_next().await.is_some() {} })
                .await;
    }
}
