//! The cloud session: one MQTT connection over mutual TLS, kept up for the life of the daemon.
//!
//! - Broker URLs are tried in order, with jittered exponential backoff; each state change is
//!   logged once, not per retry.
//! - The session is persistent (`clean_session = false`): QoS 1 messages in flight survive a
//!   reconnect. The subscription is renewed after every CONNACK without a session, and the
//!   records that were in flight are read from the outbox again (rumqttc drops them then).
//! - Last will: a retained `offline` status; `online` is published on every connect.
//! - The outbox is drained with a bounded in-flight window; a record is deleted only when its
//!   PUBACK arrives. After a restart, unacknowledged records are sent again (at least once on
//!   the wire; receivers dedupe by id).
//! - A reply someone waits for can take the express lane: handed to the link before its
//!   outbox commit and published at once; the writer then says which outbox record holds it,
//!   and from there it is that record (not sent twice, deleted on its PUBACK, sent again from
//!   the outbox if the connection drops first). The commit is then off the reply's path.
//! - Inbound commands are acknowledged to the broker only once the handler says it stored
//!   them (manual acks). Oversized ones (and anything on another topic) are dropped unread
//!   with an audit record, and the link carries on.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Incoming, LastWill, MqttOptions, Outgoing, QoS, TlsConfiguration, Transport};
use thiserror::Error;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::broker_url::{BadBrokerUrl, BrokerUrl};
use super::express::{Express, ExpressLane};
use super::in_flight::{InFlight, Tag, resolve, send_express};
use super::tls::{TlsError, client_config};
use super::topics::Topics;
use crate::auth::reason::Reason;
use crate::protocol::ids::GatewayId;
use crate::store::audit::AuditActor;
use crate::store::{AuditEntry, OutboxRecord, Store, StoreError};

/// How long a stopping link keeps sending the outbox.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest inbound command accepted; bigger ones are dropped unread.
pub const MAX_COMMAND_BYTES: usize = 16 * 1024;
/// The largest MQTT packet the brokers we configure carry: the bundled broker's default,
/// `max_packet_size` in `lockhub-cloud mosquitto-config`, `max_payload` for NATS. Far above any
/// command or event, so that a bigger one is refused at the broker, before any hub sees it.
pub const MAX_BROKER_PACKET: usize = 256 * 1024;
/// The largest packet the hub reads. A broker someone else configured may let a bigger
/// command through than [`MAX_BROKER_PACKET`]: up to this size it is still read, acknowledged,
/// audited and dropped; only a larger one costs the connection (and is named in the log).
/// rumqttc reads a packet whole, so this also bounds what one message can make a hub hold.
pub const MAX_READ_PACKET: usize = 16 * 1024 * 1024;

/// Where the cloud is and how to reach it.
#[derive(Clone, Debug)]
pub struct CloudConfig {
    /// Brokers, tried in order: `mqtts://host[:port]` (port 8883 by default).
    pub brokers: Vec<String>,
    /// The CA that signs the brokers' certificates (pinned; no system roots).
    pub ca_file: PathBuf,
    /// This gateway's client certificate.
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Outbox records in flight at once.
    pub inflight: u16,
    /// First reconnect delay; doubles per failure up to `max_backoff`, with jitter.
    pub min_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
}

impl CloudConfig {
    /// A configuration with the defaults: keep-alive 30 s, 32 records in flight, reconnect
    /// backoff from 0.5 s to 60 s.
    pub fn new(brokers: Vec<String>, ca_file: PathBuf, cert_file: PathBuf, key_file: PathBuf) -> Self {
        CloudConfig {
            brokers,
            ca_file,
            cert_file,
            key_file,
            keep_alive: Duration::from_secs(30),
            inflight: 32,
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
        }
    }
}

/// Why the cloud link could not start.
#[derive(Debug, Error)]
pub enum CloudError {
    /// A broker URL is not `mqtts://host[:port]`.
    #[error(transparent)]
    BadUrl(#[from] BadBrokerUrl),
    /// No broker configured.
    #[error("no broker configured")]
    NoBroker,
    /// The TLS files are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A command received from the cloud. Drop `stored` (or send on it) once it is durably
/// stored: only then is it acknowledged to the broker.
#[derive(Debug)]
pub struct InboundCommand {
    /// The raw payload (at most [`MAX_COMMAND_BYTES`]).
    pub payload: Vec<u8>,
    /// When the link took it from the broker: where a command's time in the gateway starts.
    pub received: std::time::Instant,
    /// Send `()` once the command is stored; dropping without sending leaves it
    /// unacknowledged, so the broker delivers it again.
    pub stored: oneshot::Sender<()>,
}

/// What the link reports about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// No cloud is configured: the hub runs local only.
    NotConfigured,
    /// Trying to connect.
    Connecting,
    /// Connected and subscribed to commands (to the broker at this index of the list).
    Connected(usize),
}

/// The cloud link.
pub struct CloudLink {
    brokers: Vec<BrokerUrl>,
    tls: Arc<rustls::ClientConfig>,
    config: CloudConfig,
    topics: Topics,
    gateway_id: GatewayId,
    store: Arc<Mutex<Store>>,
    outbox_ready: Arc<Notify>,
    commands: mpsc::Sender<InboundCommand>,
    state: watch::Sender<LinkState>,
    delivered: watch::Sender<u64>,
    acknowledged: watch::Sender<u64>,
    connections: watch::Sender<u64>,
    express: mpsc::Receiver<Express>,
    express_lane: ExpressLane,
}

/// What a running link tells its owner.
#[derive(Debug)]
pub struct LinkReports {
    /// Connecting or connected.
    pub state: watch::Receiver<LinkState>,
    /// Outbox records the broker acknowledged (and the store deleted) since the link started.
    pub delivered: watch::Receiver<u64>,
    /// Outbox records the broker acknowledged since the link started, deleted yet or not: the
    /// difference from `delivered` is what waits for a deletion (or failed one).
    pub acknowledged: watch::Receiver<u64>,
    /// How many times the link has come up (CONNACKs) since it started: more than the brokers
    /// it went through means it was lost and made again.
    pub connections: watch::Receiver<u64>,
}

impl std::fmt::Debug for CloudLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudLink").field("brokers", &self.brokers).finish_non_exhaustive()
    }
}

/// A drain's store work, on the blocking pool while the link's loop goes on: acknowledged
/// records deleted, express publishes' records learnt, pending records read — under one lock
/// of the store. Learning before reading, under the lock, is what keeps an express publish
/// from being read back as pending: its writer announces the record before unlocking.
struct Drained {
    /// The acknowledged records' deletion.
    deleted: Deletion,
    /// Express publishes' records learnt.
    resolved: Vec<(u64, Option<i64>)>,
    /// Express publishes still waiting for their transactions.
    unresolved: Vec<(u64, oneshot::Receiver<Option<i64>>)>,
    /// Records waiting to be sent (none asked for when the window had no room).
    pending: Result<Vec<OutboxRecord>, StoreError>,
    /// How many were asked for.
    want: usize,
}

/// The drain running beside the link's loop, if any, and whether another was asked for
/// meanwhile.
#[derive(Default)]
struct Draining {
    job: Option<tokio::task::JoinHandle<Drained>>,
    again: bool,
}

impl Draining {
    /// The running drain's result, awaited; `None` when none runs (unlike [`Draining::finished`],
    /// which then never returns, for `select!`).
    async fn finished_now(&mut self) -> Option<Drained> {
        match self.job.take() {
            Some(job) => job.await.ok(),
            None => None,
        }
    }

    /// The running drain's result, once it is done; never, while none runs.
    async fn finished(&mut self) -> Option<Drained> {
        let drained = match &mut self.job {
            Some(job) => job.await.ok(),
            None => std::future::pending().await,
        };
        self.job = None;
        drained
    }
}

impl CloudLink {
    /// Builds the link. `outbox_ready` is notified by whoever appends to the outbox;
    /// commands go to `commands`.
    pub fn new(
        config: CloudConfig,
        gateway_id: GatewayId,
        store: Arc<Mutex<Store>>,
        outbox_ready: Arc<Notify>,
        commands: mpsc::Sender<InboundCommand>,
    ) -> Result<(Self, LinkReports), CloudError> {
        let brokers = config.brokers.iter().map(|u| BrokerUrl::parse(u)).collect::<Result<Vec<_>, _>>()?;
        if brokers.is_empty() {
            return Err(CloudError::NoBroker);
        }
        let tls = client_config(&config.ca_file, &config.cert_file, &config.key_file)?;
        let (state, state_rx) = watch::channel(LinkState::Connecting);
        let (delivered, delivered_rx) = watch::channel(0);
        let (acknowledged, acknowledged_rx) = watch::channel(0);
        let (connections, connections_rx) = watch::channel(0);
        let topics = Topics::new(&gateway_id);
        let (express_lane, express) = super::express::lane();
        let link = CloudLink {
            brokers,
            tls,
            config,
            topics,
            gateway_id,
            store,
            outbox_ready,
            commands,
            state,
            delivered,
            acknowledged,
            connections,
            express,
            express_lane,
        };
        let reports = LinkReports {
            state: state_rx,
            delivered: delivered_rx,
            acknowledged: acknowledged_rx,
            connections: connections_rx,
        };
        Ok((link, reports))
    }

    /// The lane for publishes ahead of their outbox commit (take it before [`CloudLink::run`]).
    pub fn express_lane(&self) -> ExpressLane {
        self.express_lane.clone()
    }

    fn options(&self, broker: &BrokerUrl) -> MqttOptions {
        let mut o = MqttOptions::new(self.gateway_id.as_str(), &broker.host, broker.port);
        o.set_keep_alive(self.config.keep_alive);
        o.set_clean_session(false);
        o.set_manual_acks(true);
        // Packet ids cycle through rumqttc's window: make it far larger than ours, so that a new
        // publish never lands on an id still awaiting its PUBACK (rumqttc would stall on it).
        o.set_inflight(self.config.inflight.max(1).saturating_mul(4).max(16));
        // rumqttc drops the connection on a packet over its limit, and the broker hands the
        // same QoS 1 message over again at every reconnection: read anything a broker may
        // carry up to a bound, so that an oversized command is acknowledged, audited and
        // dropped (`on_event`) rather than looped on.
        o.set_max_packet_size(MAX_READ_PACKET, MAX_BROKER_PACKET);
        o.set_last_will(LastWill::new(self.topics.status(), offline_payload(), QoS::AtLeastOnce, true));
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(self.tls.clone())));
        o
    }

    /// Runs until `shutdown` turns true; then publishes `offline` and disconnects.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut index = 0;
        let mut backoff = self.config.min_backoff;
        let mut failures_here = 0u32;
        // Acknowledged records the store could not delete yet, carried from one broker to the
        // next: read again as pending, the next broker would get them again.
        let mut undeleted = Vec::new();
        loop {
            let broker = self.brokers[index].clone();
            let (client, mut eventloop) = AsyncClient::new(self.options(&broker), 128);
            // Small pipelined writes (QoS 1 publishes in flight) must not wait for Nagle.
            let mut network = rumqttc::NetworkOptions::new();
            network.set_tcp_nodelay(true);
            eventloop.set_network_options(network);
            let mut flight = InFlight { acked: std::mem::take(&mut undeleted), ..InFlight::default() };
            let mut draining = Draining::default();
            let mut connected = false;
            let mut logged_down = false;
            loop {
                tokio::select! {
                    event = eventloop.poll() => match event {
                        Ok(event) => {
                            match &event {
                                Event::Incoming(Incoming::ConnAck(ack)) => {
                                    connected = true;
                                    self.connections.send_modify(|n| *n += 1);
                                    failures_here = 0;
                                    backoff = self.config.min_backoff;
                                    tracing::info!(broker = %broker.host, port = broker.port, session = ack.session_present, "cloud link up");
                                    self.on_connected(&client, &mut flight, ack.session_present);
                                    // With a session the subscription is still there; without
                                    // one, ready means subscribed (below).
                                    if ack.session_present {
                                        let _ = self.state.send(LinkState::Connected(index));
                                    }
                                }
                                Event::Incoming(Incoming::SubAck(_)) => {
                                    let _ = self.state.send(LinkState::Connected(index));
                                }
                                _ => {}
                            }
                            // Only a new connection or an acknowledgement can make room in the
                            // window; other events (pings, deliveries) must not cost a store read.
                            let room = matches!(&event, Event::Incoming(Incoming::ConnAck(_) | Incoming::PubAck(_)));
                            self.on_event(&client, &mut flight, event).await;
                            // Deletions wait for a batch, or for the window to empty.
                            let window = usize::from(self.config.inflight.max(2));
                            let delete = flight.acked.len() >= window / 2 || flight.outbox.is_empty();
                            if connected && room && (flight.unsent || delete) {
                                self.drain(&mut flight, &mut draining);
                            }
                        }
                        Err(e) => {
                            // What rumqttc read before the connection failed (acknowledgements,
                            // publishes it wrote) is still queued in its state, and would be
                            // handed out after the next CONNACK, where its packet ids would be
                            // taken for the new connection's: one record acknowledged in
                            // another's name, another never. It belongs to the old
                            // connection's bookkeeping: take it in now.
                            let stale: Vec<Event> = eventloop.state.events.drain(..).collect();
                            for event in stale {
                                self.on_event(&client, &mut flight, event).await;
                            }
                            if let rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
                                rumqttc::Error::PayloadSizeLimitExceeded(len),
                            )) = &e
                            {
                                // Nothing read, nothing to acknowledge: the broker will hand it
                                // over again. Only the broker's limit ends this.
                                tracing::error!(
                                    broker = %broker.host,
                                    bytes = len,
                                    "a message of {len} bytes waits at the broker for this hub, more than the \
                                     {MAX_READ_PACKET} it reads: limit the broker's packet size to \
                                     {MAX_BROKER_PACKET} bytes (docs/deployment.md); retrying with backoff"
                                );
                            }
                            if connected || !logged_down {
                                tracing::warn!(broker = %broker.host, error = %e, "cloud link down; reconnecting with backoff");
                                logged_down = true;
                            }
                            connected = false;
                            let _ = self.state.send(LinkState::Connecting);
                            failures_here += 1;
                            let pause = jittered(backoff);
                            backoff = (backoff * 2).min(self.config.max_backoff);
                            tokio::select! {
                                () = tokio::time::sleep(pause) => {}
                                () = crate::stop::requested(&mut shutdown) => {
                                    self.leave(&client, &mut flight, &mut draining).await;
                                    return;
                                }
                            }
                            if self.brokers.len() > 1 && failures_here >= 3 {
                                self.leave(&client, &mut flight, &mut draining).await;
                                undeleted = std::mem::take(&mut flight.acked);
                                // This broker stays away: try the next one, with a fresh session.
                                index = (index + 1) % self.brokers.len();
                                failures_here = 0;
                                break;
                            }
                        }
                    },
                    () = self.outbox_ready.notified(), if connected => {
                        flight.unsent = true;
                        self.drain(&mut flight, &mut draining);
                    }
                    drained = draining.finished() => {
                        if let Some(drained) = drained {
                            self.drained(&client, &mut flight, drained, connected);
                        }
                        if std::mem::take(&mut draining.again) && connected {
                            self.drain(&mut flight, &mut draining);
                        }
                    }
                    Some(express) = self.express.recv() => {
                        // Disconnected: the outbox carries it once the link is back.
                        if connected {
                            send_express(&client, &mut flight, express);
                        }
                    }
                    () = crate::stop::requested(&mut shutdown) => {
                        self.finish_drain(&client, &mut flight, &mut draining, connected).await;
                        if connected {
                            self.flush(&client, &mut eventloop, &mut flight).await;
                        }
                        self.delete_acked(&mut flight).await;
                        let _ = client.try_publish(self.topics.status(), QoS::AtLeastOnce, true, offline_payload());
                        let _ = client.try_disconnect();
                        // Let the offline status and the DISCONNECT go out: the broker closes
                        // the connection once it has the DISCONNECT (bounded wait). Closing
                        // first would make it publish the will as well.
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while eventloop.poll().await.is_ok() {}
                        })
                        .await;
                        return;
                    }
                }
            }
        }
    }

    fn on_connected(&self, client: &AsyncClient, flight: &mut InFlight, session_present: bool) {
        if !session_present {
            // A broker without our session (restarted without persistence, or another broker):
            // rumqttc drops what was in flight instead of sending it again, so those records
            // are pending once more and the next drain reads them back from the outbox.
            // (Acknowledged ones stay in `acked`, to be deleted.)
            flight.unassigned.clear();
            flight.by_pkid.clear();
            flight.outbox.clear();
            // Express publishes are lost with the session too: their records, once committed,
            // are pending records like the others.
            flight.express.clear();
            flight.unresolved.clear();
        }
        // Whatever the outbox holds is to be sent (again) on this connection.
        flight.unsent = true;
        // Subscribed before saying online: an app that answers "online" with a command must
        // find the subscription there (a broker takes one connection's packets in order).
        if !session_present {
            let _ = client.try_subscribe(self.topics.commands(), QoS::AtLeastOnce);
        }
        if client.try_publish(self.topics.status(), QoS::AtLeastOnce, true, online_payload()).is_ok() {
            flight.unassigned.push_back(Tag::Status);
        }
    }

    async fn on_event(&self, client: &AsyncClient, flight: &mut InFlight, event: Event) {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                // A replay after a reconnect keeps its packet id, which is still mapped.
                if let std::collections::hash_map::Entry::Vacant(slot) = flight.by_pkid.entry(pkid)
                    && let Some(tag) = flight.unassigned.pop_front()
                {
                    slot.insert(tag);
                }
            }
            Event::Incoming(Incoming::PubAck(ack)) => {
                let tag = flight.by_pkid.remove(&ack.pkid);
                if matches!(tag, Some(Tag::Outbox(_) | Tag::Express(_))) {
                    self.acknowledged.send_modify(|n| *n += 1);
                }
                let id = tag.and_then(|tag| flight.acknowledged(tag));
                // Deleted by the next drain (each PUBACK asks for one), in batches: a crash
                // before a batch commits only means those records are sent again.
                if let Some(id) = id {
                    flight.outbox.remove(&id);
                    flight.acked.push(id);
                }
            }
            Event::Incoming(Incoming::Publish(publish)) => {
                if publish.topic != self.topics.commands() || publish.payload.len() > MAX_COMMAND_BYTES {
                    let topic = crate::outside_text::Outside::new(&publish.topic);
                    tracing::warn!(%topic, bytes = publish.payload.len(), "dropping an unexpected or oversized message");
                    // Unread, so nobody to answer; but the attempt is on the record.
                    let detail = format!(
                        "{} bytes on {topic} (at most {MAX_COMMAND_BYTES} on the command topic)",
                        publish.payload.len(),
                    );
                    let store = self.store.clone();
                    let audited = tokio::task::spawn_blocking(move || {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs() as i64);
                        let mut store = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        store.transaction(|tx| {
                            tx.audit(AuditEntry {
                                at: now,
                                action: "cloud.statement",
                                outcome: Reason::Malformed.as_str(),
                                actor: AuditActor::Unknown,
                                lock: None,
                                detail: &detail,
                            })
                        })
                    })
                    .await;
                    if !matches!(audited, Ok(Ok(_))) {
                        tracing::error!("could not audit a dropped message");
                    }
                    let _ = client.try_ack(&publish);
                    return;
                }
                let (stored, was_stored) = oneshot::channel();
                let command =
                    InboundCommand { payload: publish.payload.to_vec(), received: std::time::Instant::now(), stored };
                if self.commands.send(command).await.is_err() {
                    return;
                }
                let client = client.clone();
                tokio::spawn(async move {
                    if was_stored.await.is_ok() {
                        let _ = client.ack(&publish).await;
                    }
                });
            }
            _ => {}
        }
    }

    /// Sends what the outbox holds and waits for the broker's acknowledgements, for at most
    /// [`FLUSH_TIMEOUT`]: a stopping gateway's last replies should not wait for its restart.
    /// What is left stays in the outbox for the next start.
    async fn flush(&mut self, client: &AsyncClient, eventloop: &mut rumqttc::EventLoop, flight: &mut InFlight) {
        // One bound around all of it: handing a late command to a full, no longer read
        // channel must not hold the stop up either.
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, async {
            self.drain_now(client, flight).await;
            while !flight.outbox.is_empty() {
                let Ok(event) = eventloop.poll().await else { return };
                let room = matches!(&event, Event::Incoming(Incoming::PubAck(_)));
                self.on_event(client, flight, event).await;
                if room {
                    self.drain_now(client, flight).await;
                }
            }
        })
        .await;
    }

    /// Takes in a deletion of acknowledged records. The ids of a failed one stay acknowledged,
    /// to be deleted with the next batch: read again as pending, they would be sent again,
    /// acknowledged again and fail again, as fast as the broker answers, for as long as the
    /// store fails. They go with the link to the next broker; a stop tries them once more,
    /// and what still fails is sent again after the restart, as any record not deleted.
    fn after_deletion(&self, flight: &mut InFlight, deleted: Deletion) {
        match deleted {
            Ok(0) => {}
            Ok(n) => {
                flight.deletions_failing = false;
                self.delivered.send_modify(|d| *d += n);
            }
            Err((error, undeleted)) => {
                if !flight.deletions_failing {
                    tracing::error!(%error, "could not delete acknowledged outbox records; trying again with the next batch");
                }
                flight.deletions_failing = true;
                flight.acked.extend(undeleted);
            }
        }
    }

    /// Takes in a drain still running beside the loop, without starting another (at a broker
    /// switch or a stop). `connected`: whether what it read may still be sent.
    async fn finish_drain(
        &mut self,
        client: &AsyncClient,
        flight: &mut InFlight,
        draining: &mut Draining,
        connected: bool,
    ) {
        if let Some(drained) = draining.finished_now().await {
            self.drained(client, flight, drained, connected);
        }
    }

    /// Leaves a broker that is away, for another or for good: a running drain taken in and
    /// what the broker acknowledged deleted — each record left would be sent again, to the
    /// next broker or after the restart.
    async fn leave(&mut self, client: &AsyncClient, flight: &mut InFlight, draining: &mut Draining) {
        self.finish_drain(client, flight, draining, false).await;
        self.delete_acked(flight).await;
    }

    /// Deletes the acknowledged records on the blocking pool and awaits it (at a broker switch
    /// or a stop, where no drain follows).
    async fn delete_acked(&self, flight: &mut InFlight) {
        if flight.acked.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut flight.acked);
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || {
            delete_acknowledged(&mut store.lock().unwrap_or_else(std::sync::PoisonError::into_inner), ids)
        })
        .await
        {
            Ok(deleted) => self.after_deletion(flight, deleted),
            // Cancelled before it ran: the runtime is going; the records are sent again.
            Err(e) if e.is_cancelled() => tracing::debug!("stopping: acknowledged records left for the next start"),
            Err(e) => tracing::error!(error = %e, "the store task failed"),
        }
    }

    /// Starts a drain beside the loop (see [`Drained`]), or asks for another once the running
    /// one is done.
    fn drain(&self, flight: &mut InFlight, draining: &mut Draining) {
        if draining.job.is_some() {
            draining.again = true;
        } else {
            draining.job = self.start_drain(flight);
        }
    }

    /// A drain, awaited (when stopping: nothing else is served meanwhile).
    async fn drain_now(&mut self, client: &AsyncClient, flight: &mut InFlight) {
        let mut draining = Draining { job: self.start_drain(flight), again: false };
        if let Some(drained) = draining.finished_now().await {
            self.drained(client, flight, drained, true);
        }
    }

    /// Hands a drain's store work to the blocking pool; `None` if there is none to do. Pending
    /// records are read only once half the window is free, so that the outbox is read in
    /// batches.
    fn start_drain(&self, flight: &mut InFlight) -> Option<tokio::task::JoinHandle<Drained>> {
        let window = usize::from(self.config.inflight.max(1));
        let read = flight.unsent && flight.outbox.len() <= window / 2;
        if !read && flight.acked.is_empty() && flight.unresolved.is_empty() {
            return None;
        }
        if read {
            // Set again by an append meanwhile, or by this read stopping at the window.
            flight.unsent = false;
        }
        // Acknowledged records are deleted before the read: they must not come back as pending.
        let acked = std::mem::take(&mut flight.acked);
        let mut unresolved = std::mem::take(&mut flight.unresolved);
        let want = if read { (window + flight.outbox.len()) as u32 } else { 0 };
        let store = self.store.clone();
        Some(tokio::task::spawn_blocking(move || {
            let mut store = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let deleted = delete_acknowledged(&mut store, acked);
            let resolved = resolve(&mut unresolved);
            let pending = if want == 0 { Ok(Vec::new()) } else { store.outbox_pending(want) };
            Drained { deleted, resolved, unresolved, pending, want: want as usize }
        }))
    }

    /// Takes in what a drain found, and publishes the pending records (while `connected`)
    /// until the in-flight window is full.
    fn drained(&mut self, client: &AsyncClient, flight: &mut InFlight, drained: Drained, connected: bool) {
        let Drained { deleted, resolved, unresolved, pending, want } = drained;
        self.after_deletion(flight, deleted);
        for (number, record) in resolved {
            flight.learn(number, record);
        }
        // Express publishes still waiting in the lane may be held by records this read found
        // (committed after being handed over, before the loop took them): taken now, they go
        // out once, as express publishes, and their records are learnt just below.
        if connected {
            while let Ok(express) = self.express.try_recv() {
                send_express(client, flight, express);
            }
        }
        // Express publishes that arrived while the drain ran may have committed before its
        // read: their records are announced by now, so they are known before the filter below.
        flight.unresolved.extend(unresolved);
        flight.resolve_express();
        let mut pending = match pending {
            Ok(pending) => pending,
            Err(e) => {
                flight.unsent = true;
                return tracing::error!(error = %e, "could not read the outbox");
            }
        };
        if !connected {
            flight.unsent = true;
            return;
        }
        let window = usize::from(self.config.inflight.max(1));
        // A full read may have left more behind.
        if want > 0 && pending.len() >= want {
            flight.unsent = true;
        }
        // Replies first: someone is waiting for each, while events and states are reports
        // (their own order is kept, so a lock's retained state still ends on its latest).
        let replies = self.topics.replies();
        pending.sort_by_key(|r| (r.topic != replies, r.id));
        for record in pending {
            if flight.outbox.len() >= window {
                flight.unsent = true;
                break;
            }
            // In flight, or acknowledged while the drain ran (it is deleted by the next one).
            if flight.outbox.contains(&record.id) || flight.acked.contains(&record.id) {
                continue;
            }
            match client.try_publish(record.topic, QoS::AtLeastOnce, record.retain, record.payload) {
                Ok(()) => {
                    flight.unassigned.push_back(Tag::Outbox(record.id));
                    flight.outbox.insert(record.id);
                }
                // rumqttc's request queue is full: the rest goes out when acknowledgements free it.
                Err(_) => {
                    flight.unsent = true;
                    break;
                }
            }
        }
    }
}

/// A deletion of acknowledged records: how many, or the failure and the ids still to delete.
type Deletion = Result<u64, (StoreError, Vec<i64>)>;

/// Deletes the acknowledged records `acked` from the outbox, in one transaction.
fn delete_acknowledged(store: &mut Store, acked: Vec<i64>) -> Deletion {
    if acked.is_empty() {
        return Ok(0);
    }
    match store.outbox_ack(&acked) {
        Ok(()) => Ok(acked.len() as u64),
        Err(e) => Err((e, acked)),
    }
}

fn jittered(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    let jitter = rand_core::RngCore::next_u64(&mut rand_core::OsRng) % (ms / 2 + 1);
    Duration::from_millis(ms / 2 + jitter + ms / 4)
}

/// The retained status while up.
pub fn online_payload() -> Vec<u8> {
    format!(r#"{{"status":"online","version":"{}","capabilities":["lhp1"]}}"#, env!("CARGO_PKG_VERSION")).into_bytes()
}

/// The retained status when down (also the last will).
pub fn offline_payload() -> Vec<u8> {
    br#"{"status":"offline"}"#.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "devtools")]
    #[tokio::test]
    async fn an_express_publish_still_in_the_lane_when_a_drain_reads_its_record_goes_out_once() {
        use crate::store::StoreConfig;
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::devcloud::pki::Pki::init(&dir.path().join("pki"), &["gw-1"]).unwrap();
        let state = StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(&dir.path().join("state")) };
        let store = Arc::new(Mutex::new(Store::open(state).unwrap()));
        let config = CloudConfig::new(
            vec!["mqtts://localhost:8883".into()],
            pki.ca_cert(),
            pki.client_cert("gw-1"),
            pki.client_key("gw-1"),
        );
        let (commands, _inbound) = mpsc::channel(1);
        let gateway = GatewayId::new("gw-1").unwrap();
        let (mut link, _reports) = CloudLink::new(config, gateway, store.clone(), Arc::default(), commands).unwrap();
        let (client, _eventloop) = AsyncClient::new(link.options(&link.brokers[0].clone()), 16);
        // A reply handed to the lane, then committed (its record announced under the lock)…
        let topic = link.topics.replies();
        let handed = link.express_lane().send(topic.clone(), b"reply".to_vec()).unwrap();
        let id = {
            let mut store = store.lock().unwrap();
            let id = store.transaction(|tx| tx.append_outbox(None, &topic, b"reply", false, 1)).unwrap();
            handed.committed(Some(id));
            id
        };
        // …and an outbox read finding it before the link's loop took it from the lane.
        let mut flight = InFlight { unsent: true, ..InFlight::default() };
        let drained = link.start_drain(&mut flight).unwrap().await.unwrap();
        assert_eq!(drained.pending.as_ref().unwrap().len(), 1);
        link.drained(&client, &mut flight, drained, true);
        // Published once, as the express publish, its record known to be in flight.
        assert!(
            matches!(flight.unassigned.iter().collect::<Vec<_>>()[..], [Tag::Express(0)]),
            "{:?}",
            flight.unassigned
        );
        assert!(flight.outbox.contains(&id));
        assert!(link.express.try_recv().is_err(), "the lane is empty");
    }
}
