//! One client connection of the bundled broker: the TLS handshake (a client certificate from
//! the pinned CA is required), the identity it proves, the CONNECT checks, then the packet
//! loop in which every publish and subscription passes the ACL before it reaches the router.
//!
//! A client that breaks the protocol (QoS 2, a second CONNECT, a malformed packet, silence
//! beyond its keep-alive) is disconnected; one that only oversteps its ACL is not: its
//! publish is acknowledged and dropped, its subscription refused in the SUBACK, as Mosquitto
//! does, so a misconfigured gateway keeps working on its own topics.
//!
//! A gateway's events are stored in the sink before they are routed and acknowledged. The
//! storing runs beside the packet loop (a task per gateway connection, one commit per batch of
//! whatever arrived meanwhile), so the loop keeps writing to the gateway — the next command for
//! it must not wait behind an fsync. Other publishes are routed at once (the order MQTT keeps is
//! per topic, and events have a topic of their own); their PUBACKs wait behind the events'
//! while any are being stored, so acknowledgements still come in the order of the publishes.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet, PubAck, Publish};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;

use super::Shared;
use super::router::ConnId;
use crate::devcloud::acl::{Identity, ROOT};
use crate::devcloud::sink::SinkError;

/// Time allowed for the TLS handshake and the CONNECT that follows it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Packets waiting to be written to one client before it counts as too slow and is dropped.
pub(super) const OUTBOUND_QUEUE: usize = 1024;

/// Publishes of one gateway waiting to be stored before the connection stops reading more.
const STORE_QUEUE: usize = 1024;

/// Most events stored in one commit.
const STORE_BATCH: usize = 256;

type Tls = TlsStream<TcpStream>;

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("connection closed")]
    Eof,
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed packet: {0}")]
    Malformed(rumqttc::mqttbytes::Error),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("no packet within the keep-alive")]
    KeepAlive,
    #[error("the event store failed: {0}")]
    Sink(SinkError),
}

/// Serves one accepted TCP connection until it ends.
pub(super) async fn serve(
    shared: Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    conn: ConnId,
    shutdown: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::info!(conn, error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            tracing::info!(conn, "TLS handshake timed out");
            return;
        }
    };
    let Some(identity) = peer_identity(&stream) else {
        tracing::warn!(conn, "client certificate names no lockhub identity: refused");
        return;
    };
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(4096);
    let max = shared.max_packet;
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_packet(&mut reader, &mut buf, max)).await;
    let connect = match first {
        Ok(Ok(Packet::Connect(connect))) => connect,
        Ok(Ok(_)) => return tracing::info!(conn, "first packet is not CONNECT: closed"),
        Ok(Err(e)) => return tracing::info!(conn, error = %e, "no CONNECT: closed"),
        Err(_) => return tracing::info!(conn, "no CONNECT in time: closed"),
    };
    let refusal = if !identity.may_use_client_id(&connect.client_id) {
        tracing::warn!(conn, ?identity, client_id = %connect.client_id, "client id does not match the certificate: refused");
        Some(ConnectReturnCode::BadClientId)
    } else if connect.last_will.as_ref().is_some_and(|w| w.qos == QoS::ExactlyOnce || !identity.may_publish(&w.topic)) {
        tracing::warn!(conn, ?identity, "last will outside the client's topics: refused");
        Some(ConnectReturnCode::NotAuthorized)
    } else {
        None
    };
    if let Some(code) = refusal {
        let _ = write(&mut writer, &Packet::ConnAck(ConnAck::new(code, false)), max).await;
        let _ = writer.shutdown().await;
        return;
    }
    let client_id = connect.client_id.clone();
    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    shared.with_hub(|hub| {
        hub.outbound.insert(conn, tx);
        hub.router.connect(conn, &client_id, connect.clean_session, connect.last_will.clone())
    });
    tracing::info!(conn, client_id = %client_id, clean = connect.clean_session, "client connected");
    let keep_alive = (connect.keep_alive > 0).then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let events = match (&identity, &shared.sink) {
        (Identity::Gateway(gateway), Some(sink)) => Some(EventStore::start(sink.clone(), gateway.as_str(), conn)),
        _ => None,
    };
    let mut session = Session { shared: &shared, conn, identity, reader, writer, buf, rx, keep_alive, events };
    let result = session.run(shutdown).await;
    let graceful = matches!(result, Ok(()));
    match &result {
        Ok(()) => tracing::info!(conn, client_id = %client_id, "client disconnected"),
        Err(e) => tracing::info!(conn, client_id = %client_id, reason = %e, "connection ended"),
    }
    shared.with_hub(|hub| {
        hub.outbound.remove(&conn);
        hub.router.disconnected(conn, graceful)
    });
}

struct Session<'a> {
    shared: &'a Shared,
    conn: ConnId,
    identity: Identity,
    reader: ReadHalf<Tls>,
    writer: WriteHalf<Tls>,
    buf: BytesMut,
    rx: mpsc::Receiver<Packet>,
    keep_alive: Option<Duration>,
    /// A gateway's events on their way to the sink (none for other clients, or without a sink).
    events: Option<EventStore>,
}

/// A publish whose acknowledgement waits until the events before it, and itself if it is one,
/// are stored.
struct Held {
    /// An event, routed then.
    route: Option<Publish>,
    /// Acknowledged then (QoS 1).
    ack: Option<u16>,
}

/// One gateway connection's events on their way into the sink.
struct EventStore {
    /// Held publishes in arrival order, with the payload to store if it is an event.
    jobs: mpsc::Sender<(Held, Option<Bytes>)>,
    /// Held publishes given back in order once stored, or why storing failed. Unbounded, but
    /// never longer than `jobs` allows: each batch takes at least one job.
    stored: mpsc::UnboundedReceiver<Result<Vec<Held>, Ended>>,
    /// Publishes handed over and not given back yet.
    waiting: usize,
}

impl EventStore {
    fn start(sink: Arc<std::sync::Mutex<crate::devcloud::sink::EventSink>>, gateway: &str, conn: ConnId) -> Self {
        let (jobs, mut queue) = mpsc::channel::<(Held, Option<Bytes>)>(STORE_QUEUE);
        let (done, stored) = mpsc::unbounded_channel();
        let gateway = gateway.to_owned();
        // Ends when the connection drops its end of `jobs`.
        tokio::spawn(async move {
            while let Some(first) = queue.recv().await {
                let mut batch = vec![first];
                while batch.len() < STORE_BATCH
                    && let Ok(next) = queue.try_recv()
                {
                    batch.push(next);
                }
                let (sink, gateway) = (sink.clone(), gateway.clone());
                let written = tokio::task::spawn_blocking(move || {
                    let mut sink = sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let answers = sink.record_all(&gateway, batch.iter().filter_map(|(_, event)| event.as_deref()));
                    (batch, answers)
                })
                .await;
                let outcome = match written {
                    Ok((batch, Ok(answers))) => {
                        // Not an event: routed and acknowledged like any message, just not
                        // stored (a redelivery would not make it better).
                        for why in answers.into_iter().filter_map(Result::err) {
                            tracing::warn!(conn, %why, "event not stored");
                        }
                        Ok(batch.into_iter().map(|(held, _)| held).collect())
                    }
                    // Not acknowledged: the gateway sends them again on its next connection.
                    Ok((_, Err(e))) => Err(Ended::Sink(e)),
                    Err(_) => Err(Ended::Protocol("the event store task failed")),
                };
                let failed = outcome.is_err();
                if done.send(outcome).is_err() || failed {
                    return;
                }
            }
        });
        EventStore { jobs, stored, waiting: 0 }
    }
}

/// The next stored batch of `events`; never, for a connection without them.
async fn next_stored(events: &mut Option<EventStore>) -> Option<Result<Vec<Held>, Ended>> {
    match events {
        Some(events) => events.stored.recv().await,
        None => std::future::pending().await,
    }
}

impl Session<'_> {
    /// The packet loop. `Ok` when the client said DISCONNECT (or the broker shuts down): no will.
    async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), Ended> {
        let max = self.shared.max_packet;
        let mut deadline = self.keep_alive.map(|k| Instant::now() + k);
        loop {
            // Whole packets already buffered first; then wait for bytes or for outbound packets.
            match Packet::read(&mut self.buf, max) {
                Ok(Packet::Disconnect) => return Ok(()),
                Ok(packet) => {
                    deadline = self.keep_alive.map(|k| Instant::now() + k);
                    self.handle(packet).await?;
                    continue;
                }
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(Ended::Malformed(e)),
            }
            let keep_alive_expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                read = self.reader.read_buf(&mut self.buf) => {
                    if read? == 0 {
                        return Err(Ended::Eof);
                    }
                }
                out = self.rx.recv() => match out {
                    Some(packet) => {
                        let mut bytes = BytesMut::new();
                        encode(&packet, &mut bytes, max);
                        // Whatever else is queued goes out in the same write.
                        while let Ok(packet) = self.rx.try_recv() {
                            encode(&packet, &mut bytes, max);
                        }
                        self.writer.write_all(&bytes).await?;
                    }
                    None => return Err(Ended::Protocol("closed by the broker (taken over, or too slow to read)")),
                },
                stored = next_stored(&mut self.events) => match stored {
                    Some(Ok(held)) => self.release(held).await?,
                    Some(Err(e)) => return Err(e),
                    None => return Err(Ended::Protocol("the event store task failed")),
                },
                () = keep_alive_expired => return Err(Ended::KeepAlive),
                () = crate::stop::requested(&mut shutdown) => return Ok(()),
            }
        }
    }

    async fn handle(&mut self, packet: Packet) -> Result<(), Ended> {
        let max = self.shared.max_packet;
        match packet {
            Packet::Publish(publish) => self.publish(publish).await,
            Packet::PubAck(ack) => {
                self.shared.with_hub(|hub| hub.router.puback(self.conn, ack.pkid));
                Ok(())
            }
            Packet::Subscribe(subscribe) => {
                let filters = subscribe
                    .filters
                    .into_iter()
                    .map(|f| {
                        let allowed = self.identity.may_subscribe(&f.path);
                        if !allowed {
                            tracing::warn!(conn = self.conn, identity = ?self.identity, filter = %f.path, "subscription denied by the ACL");
                        }
                        (f.path, allowed.then_some(f.qos))
                    })
                    .collect();
                self.shared.with_hub(|hub| hub.router.subscribe(self.conn, subscribe.pkid, filters));
                Ok(())
            }
            Packet::Unsubscribe(unsubscribe) => {
                self.shared.with_hub(|hub| hub.router.unsubscribe(self.conn, unsubscribe.pkid, &unsubscribe.topics));
                Ok(())
            }
            Packet::PingReq => write(&mut self.writer, &Packet::PingResp, max).await,
            Packet::Connect(_) => Err(Ended::Protocol("a second CONNECT")),
            Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => {
                Err(Ended::Protocol("QoS 2 is not supported"))
            }
            _ => Err(Ended::Protocol("a packet only a broker sends")),
        }
    }

    async fn publish(&mut self, publish: Publish) -> Result<(), Ended> {
        let max = self.shared.max_packet;
        if publish.qos == QoS::ExactlyOnce {
            return Err(Ended::Protocol("QoS 2 is not supported"));
        }
        if super::topic::validate_name(&publish.topic).is_err() {
            return Err(Ended::Protocol("invalid topic name"));
        }
        let allowed = self.identity.may_publish(&publish.topic);
        if !allowed {
            tracing::warn!(conn = self.conn, identity = ?self.identity, topic = %publish.topic, "publish denied by the ACL: dropped");
        }
        let ack = (publish.qos == QoS::AtLeastOnce).then_some(publish.pkid);
        let event = allowed && self.is_event(&publish.topic);
        if allowed && !event {
            self.shared.with_hub(|hub| hub.router.publish(&publish));
        }
        match &mut self.events {
            // An event, or an acknowledgement behind one: held until stored.
            Some(events) if event || (events.waiting > 0 && ack.is_some()) => {
                let payload = event.then(|| publish.payload.clone());
                events.waiting += 1;
                let held = Held { route: event.then_some(publish), ack };
                events.jobs.send((held, payload)).await.map_err(|_| Ended::Protocol("the event store task failed"))
            }
            _ => match ack {
                Some(pkid) => write(&mut self.writer, &Packet::PubAck(PubAck::new(pkid)), max).await,
                None => Ok(()),
            },
        }
    }

    /// Whether `topic` is this gateway's event topic.
    fn is_event(&self, topic: &str) -> bool {
        let Identity::Gateway(gateway) = &self.identity else { return false };
        topic.strip_prefix(ROOT).and_then(|t| t.strip_prefix(gateway.as_str())) == Some("/events")
    }

    /// Routes the held events, now stored, and acknowledges the held publishes, in their order.
    async fn release(&mut self, held: Vec<Held>) -> Result<(), Ended> {
        let max = self.shared.max_packet;
        if let Some(events) = &mut self.events {
            events.waiting -= held.len();
        }
        let mut acks = BytesMut::new();
        for Held { route, ack } in held {
            if let Some(publish) = route {
                self.shared.with_hub(|hub| hub.router.publish(&publish));
            }
            if let Some(pkid) = ack {
                encode(&Packet::PubAck(PubAck::new(pkid)), &mut acks, max);
            }
        }
        self.writer.write_all(&acks).await?;
        Ok(())
    }
}

/// The identity in the (already verified) client certificate's common name.
fn peer_identity(stream: &Tls) -> Option<Identity> {
    let der = stream.get_ref().1.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Identity::from_common_name(cn)
}

async fn read_packet(reader: &mut ReadHalf<Tls>, buf: &mut BytesMut, max: usize) -> Result<Packet, Ended> {
    loop {
        match Packet::read(buf, max) {
            Ok(packet) => return Ok(packet),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(Ended::Malformed(e)),
        }
        if reader.read_buf(buf).await? == 0 {
            return Err(Ended::Eof);
        }
    }
}

fn encode(packet: &Packet, bytes: &mut BytesMut, max: usize) {
    // Every packet the broker sends was received within `max` (publishes) or is tiny (acks).
    if let Err(e) = packet.write(bytes, max) {
        tracing::error!(error = %e, "could not encode a packet");
    }
}

async fn write(writer: &mut WriteHalf<Tls>, packet: &Packet, max: usize) -> Result<(), Ended> {
    let mut bytes = BytesMut::new();
    encode(packet, &mut bytes, max);
    writer.write_all(&bytes).await?;
    Ok(())
}
