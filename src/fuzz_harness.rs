//! Entry points that feed arbitrary bytes to every parser of outside input: the radio, the
//! bundled broker's MQTT packets, the signed statements from the cloud, the configuration file.
//!
//! The cargo-fuzz targets in `fuzz/` call these, and `tests/fuzz_corpus.rs` replays the saved
//! corpora through the same functions on every test run, so a crash found once stays fixed.
//! Each function must return normally for every input; a panic is a bug.

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use crate::firmware::{Firmware, Mechanics, Output, Pairing, PersistentState};
use crate::protocol::fragment::{self, Fragmenter, Reassembler};
use crate::protocol::frame::Frame;
use crate::protocol::gatt::{Capabilities, LockInfo, ManufacturerData};
use crate::protocol::hub::HubConnection;
use crate::protocol::ids::{GatewayId, LockId};
use crate::protocol::message::{LockMessage, Request};
use crate::protocol::pairing::{PairingKey, SetupCode};
use crate::protocol::session::{Role, SecureChannel, SessionKeys};

/// Splits fuzz input into length-prefixed chunks (one byte of length, then that many bytes).
fn chunks(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (&len, rest) = data.split_first()?;
        let len = usize::from(len).min(rest.len());
        let (chunk, rest) = rest.split_at(len);
        data = rest;
        Some(chunk)
    })
}

const LOCK: LockId = LockId([0x42; 8]);

fn gateway() -> GatewayId {
    GatewayId::new("fuzz-hub").expect("constant id is valid")
}

/// Fragment reassembly: each chunk is one fragment, arriving 100 ms after the previous one.
/// A reassembler that failed is replaced, as a new link would.
pub fn reassembly(data: &[u8]) {
    let mut r = Reassembler::default();
    for (i, f) in chunks(data).enumerate() {
        match r.push(f, i as u64 * 100) {
            Ok(frames) => assert!(frames.iter().all(|frame| frame.len() <= fragment::MAX_FRAME_LEN)),
            Err(_) => r = Reassembler::default(),
        }
    }
}

/// Frame parsing (a parsed frame must re-encode to the same bytes) and sealed-frame opening.
pub fn frame(data: &[u8]) {
    if let Ok(f) = Frame::parse(data) {
        assert_eq!(f.encode(), data, "parse and encode disagree");
    }
    let keys = SessionKeys::derive(&PairingKey::from_bytes([1; 32]), LOCK, &[2; 16], &[3; 16]);
    let _ = SecureChannel::new(&keys, Role::Lock).open(data);
    let _ = SecureChannel::new(&keys, Role::Gateway).open(data);
}

/// Message decoding (a decoded message must survive an encode/decode round trip) and the
/// fixed records read before any key is involved.
pub fn message(data: &[u8]) {
    if let Ok(r) = Request::decode(data) {
        assert_eq!(Request::decode(&r.encode().expect("decoded request re-encodes")).ok(), Some(r));
    }
    if let Ok(m) = LockMessage::decode(data) {
        assert_eq!(LockMessage::decode(&m.encode().expect("decoded message re-encodes")).ok(), Some(m));
    }
    let _ = LockInfo::parse(data);
    let _ = ManufacturerData::parse(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = LockId::parse(text);
        let _ = GatewayId::new(text);
        let _ = SetupCode::parse(text);
    }
}

fn fuzz_firmware(paired: bool) -> Firmware {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let caps = Capabilities { unlatch: true, keypad: true, door_sensor: true };
    let mechanics = Mechanics { motor_ms: 50, auto_lock_ms: Some(500), drain_per_op_permille: 1 };
    let mut state = PersistentState::factory_new(LOCK, caps, mechanics, &mut rng);
    if paired {
        state.pairing = Some(Pairing { gateway_id: gateway(), key: PairingKey::from_bytes([7; 32]) });
    }
    Firmware::boot(state, Box::new(ChaCha20Rng::seed_from_u64(2)))
}

/// The lock's radio input: each chunk is a fragment written by an unauthenticated central, to
/// a factory-new lock and to a paired one.
pub fn firmware_radio(data: &[u8]) {
    for paired in [false, true] {
        let mut fw = fuzz_firmware(paired);
        fw.connect(23, 0);
        for (i, f) in chunks(data).enumerate() {
            let now = i as u64 * 40;
            fw.write(f, now);
            fw.on_timeout(now);
            while fw.poll_output(now).is_some() {}
            if !fw.is_connected() {
                fw.connect(23, now);
            }
        }
    }
}

/// The lock's request handling: each chunk is the plaintext of a request, sealed correctly by
/// a gateway that holds the key, so the fuzzer reaches everything behind the cryptography.
pub fn firmware_requests(data: &[u8]) {
    let mut fw = fuzz_firmware(true);
    fw.connect(247, 0);
    let gw_nonce = [9u8; 16];
    let mut sender = Fragmenter::new(244).expect("a valid fragment size");
    for f in sender.cut(&Frame::Hello { nonce: gw_nonce }.encode()).expect("hello fits") {
        fw.write(&f, 0);
    }
    let mut reply = Reassembler::default();
    let mut hello_reply = None;
    while let Some(Output::Notify(f)) = fw.poll_output(0) {
        hello_reply = reply.push(&f, 0).ok().and_then(|mut frames| frames.pop()).or(hello_reply);
    }
    let Some(Ok(Frame::HelloReply { nonce, .. })) = hello_reply.as_deref().map(Frame::parse) else {
        panic!("a paired lock answers a hello");
    };
    let keys = SessionKeys::derive(&PairingKey::from_bytes([7; 32]), LOCK, &gw_nonce, &nonce);
    let mut channel = SecureChannel::new(&keys, Role::Gateway);
    for (i, plaintext) in chunks(data).enumerate() {
        let now = i as u64 * 40;
        let Ok(sealed) = channel.seal(plaintext) else { return };
        for f in sender.cut(&sealed).expect("sealed chunk fits a frame") {
            fw.write(&f, now);
        }
        fw.on_timeout(now);
        while let Some(out) = fw.poll_output(now) {
            if out == Output::Disconnect {
                return;
            }
        }
    }
}

/// The gateway's radio input: each chunk is a notification fragment, while pairing and while
/// opening a session.
pub fn hub_radio(data: &[u8]) {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    for pairing in [true, false] {
        let Ok(mut hub) = HubConnection::new(gateway(), LOCK, 20) else {
            return;
        };
        let started = if pairing {
            let code = SetupCode::parse("12345678").expect("constant code is valid");
            hub.begin_pairing(&code, &mut rng)
        } else {
            hub.begin_session(PairingKey::from_bytes([7; 32]), &mut rng)
        };
        if started.is_err() {
            return;
        }
        while hub.poll_transmit().is_some() {}
        for (i, f) in chunks(data).enumerate() {
            if hub.on_notification(f, i as u64 * 100).is_err() {
                break;
            }
            while hub.poll_transmit().is_some() {}
        }
    }
}

/// The bundled broker's input path: MQTT packets parsed with the broker's size limit, each
/// publish and subscription put through topic validation and the ACL of a gateway, and the
/// router driven with what passes (connect, publish, subscribe, acknowledge, disconnect).
pub fn mqtt_packets(data: &[u8]) {
    use crate::devcloud::acl::Identity;
    use crate::devcloud::broker::router::{Limits, Router};
    use rumqttc::mqttbytes::v4::Packet;

    let identity = Identity::from_common_name("gw-fuzz").expect("constant identity is valid");
    let mut router = Router::new(Limits { inflight: 4, queue: 16, subscriptions: 8, retained: 16 });
    router.connect(1, "gw-fuzz", false, None);
    router.connect(2, "lockhub-relay", true, None);
    router.subscribe(2, 1, vec![("lockhub/v1/#".into(), Some(rumqttc::mqttbytes::QoS::AtLeastOnce))]);
    let mut buf = bytes::BytesMut::from(data);
    // Every packet in the input, until one is malformed or incomplete (the broker would close).
    while let Ok(packet) = Packet::read(&mut buf, 64 * 1024) {
        match packet {
            Packet::Publish(p) => {
                if crate::devcloud::broker::topic::validate_name(&p.topic).is_ok() && identity.may_publish(&p.topic) {
                    router.publish(&p);
                }
                let _ = crate::devcloud::sink::event_id(&p.payload);
            }
            Packet::Subscribe(s) => {
                let filters =
                    s.filters.into_iter().map(|f| (f.path.clone(), identity.may_subscribe(&f.path).then_some(f.qos)));
                router.subscribe(1, s.pkid, filters.collect());
            }
            Packet::Unsubscribe(u) => {
                router.unsubscribe(1, u.pkid, &u.topics);
            }
            Packet::PubAck(a) => {
                router.puback(1, a.pkid);
                router.puback(2, a.pkid);
            }
            Packet::Connect(c) if identity.may_use_client_id(&c.client_id) => {
                router.connect(3, &c.client_id, c.clean_session, c.last_will);
            }
            Packet::Disconnect => {
                router.disconnected(3, false);
            }
            _ => {}
        }
    }
}

/// Signed statements from the cloud: the envelope, the claims of every type, the signature.
pub fn statement(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::auth::statement::open(text);
    }
}

/// The daemon's configuration file: TOML parsing with unknown keys refused, then the checks.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::Config::parse(std::path::Path::new("fuzz.toml"), text);
    }
}

/// A command from the local broker (Home Assistant): the bare payloads or the JSON with a
/// code; a parsed command must name an operation, and a code is never longer than the payload.
pub fn local_command(data: &[u8]) {
    if let Ok(command) = crate::local::command::LocalCommand::parse(data) {
        assert!(command.code.as_ref().is_none_or(|c| c.len() < data.len()));
        assert!(!command.operation.as_str().is_empty());
    }
}

/// A control-socket request line: parsed strictly, and what parses serialises back to a line
/// that parses to the same request.
pub fn control_request(data: &[u8]) {
    if let Ok(request) = crate::control::protocol::Request::parse(data) {
        let again = serde_json::to_vec(&request).expect("requests serialise");
        assert_eq!(crate::control::protocol::Request::parse(&again).ok(), Some(request));
    }
}
