//! One client connection of the bundled broker: the TLS handshake (a client certificate from
//! the pinned CA is required), the identity it proves, the CONNECT checks, then the packet
//! loop in which every publish and subscription passes the ACL before it reaches the router.
//!
//! A client that breaks the protocol (QoS 2, a second CONNECT, a malformed packet, silence
//! beyond its keep-alive) is disconnected; one that only oversteps its ACL is not: its
//! publish is acknowledged and dropped, its subscription refused in the SUBACK, as Mosquitto
//! does, so a misconfigured gateway keeps working on its own topics.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
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
    let mut session = Session { shared: &shared, conn, identity, reader, writer, buf, rx, keep_alive };
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
                () = keep_alive_expired => return Err(Ended::KeepAlive),
                _ = shutdown.changed() => return Ok(()),
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
        let ack = publish.qos == QoS::AtLeastOnce;
        if !self.identity.may_publish(&publish.topic) {
            tracing::warn!(conn = self.conn, identity = ?self.identity, topic = %publish.topic, "publish denied by the ACL: dropped");
        } else {
            self.record_event(&publish).await?;
            self.shared.with_hub(|hub| hub.router.publish(&publish));
        }
        if ack {
            write(&mut self.writer, &Packet::PubAck(PubAck::new(publish.pkid)), max).await?;
        }
        Ok(())
    }

    /// A gateway's event goes to the sink before the gateway hears it was received.
    async fn record_event(&self, publish: &Publish) -> Result<(), Ended> {
        let (Identity::Gateway(gateway), Some(sink)) = (&self.identity, &self.shared.sink) else { return Ok(()) };
        if publish.topic.strip_prefix(ROOT).and_then(|t| t.strip_prefix(gateway.as_str())) != Some("/events") {
            return Ok(());
        }
        let sink = sink.clone();
        let gateway = gateway.as_str().to_owned();
        let payload = publish.payload.clone();
        let stored = tokio::task::spawn_blocking(move || {
            sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).record(&gateway, &payload)
        })
        .await
        .map_err(|_| Ended::Protocol("the event store task failed"))?;
        match stored {
            Ok(_) => Ok(()),
            // Not an event: routed and acknowledged like any message, just not stored (a
            // redelivery would not make it better).
            Err(SinkError::Malformed(why)) => {
                tracing::warn!(conn = self.conn, identity = ?self.identity, %why, "event not stored");
                Ok(())
            }
            // Not acknowledged: the gateway sends it again on its next connection.
            Err(e) => Err(Ended::Sink(e)),
        }
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
