//! The published LHP/1 test vectors: recomputed from the implementation and compared, line by
//! line, with the block in docs/protocol.md, so the document cannot drift from the code.
//!
//! To print the block (e.g. after a deliberate protocol change):
//! `LHP_PRINT_VECTORS=1 cargo test --test protocol_vectors -- --nocapture`

use lockhub::protocol::fragment::fragment;
use lockhub::protocol::frame::Frame;
use lockhub::protocol::ids::{GatewayId, LockId};
use lockhub::protocol::message::{Actor, Op, Request};
use lockhub::protocol::pairing::{PairingInitiator, PairingResponder, SetupCode};
use lockhub::protocol::session::{Role, SecureChannel, SessionKeys};
use rand_chacha::rand_core::{CryptoRng, Error, RngCore};

/// Hands out a fixed byte script, so that other implementations can reproduce every value.
/// Test-only: it is not random at all.
struct ScriptedRng(std::vec::IntoIter<u8>);

impl ScriptedRng {
    fn new(bytes: Vec<u8>) -> Self {
        ScriptedRng(bytes.into_iter())
    }
}

impl RngCore for ScriptedRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for d in dest {
            *d = self.0.next().expect("the script holds every random byte the vectors use");
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for ScriptedRng {}

fn hex(bytes: impl AsRef<[u8]>) -> String {
    hex::encode(bytes)
}

fn vectors() -> Vec<(String, String)> {
    let code = SetupCode::parse("12345678").unwrap();
    let lock_id = LockId([1, 2, 3, 4, 5, 6, 7, 8]);
    let gateway_id = GatewayId::new("hub-vectors").unwrap();
    let gw_scalar: Vec<u8> = (0..64).collect();
    let lock_scalar: Vec<u8> = (0x80..0xc0).collect();
    let gw_nonce: [u8; 16] = std::array::from_fn(|i| 0xa0 + i as u8);
    let lock_nonce: [u8; 16] = std::array::from_fn(|i| 0xb0 + i as u8);

    let mut out: Vec<(&str, String)> = vec![
        ("setup_code", hex(code.expose())),
        ("lock_id", hex(lock_id.0)),
        ("gateway_id", hex(gateway_id.as_str())),
        ("gateway_spake2_rng", hex(&gw_scalar)),
        ("lock_spake2_rng", hex(&lock_scalar)),
    ];

    let (init, request) = PairingInitiator::start(&code, gateway_id.clone(), lock_id, &mut ScriptedRng::new(gw_scalar));
    out.push(("pair_request", hex(request.encode())));
    let Frame::PairRequest { spake: spake_a, .. } = request else { unreachable!() };
    let (responder, response) =
        PairingResponder::respond(&code, lock_id, gateway_id, &spake_a, &mut ScriptedRng::new(lock_scalar)).unwrap();
    out.push(("pair_response", hex(response.encode())));
    let Frame::PairResponse { spake: spake_b, confirm } = response else { unreachable!() };
    let (gw_key, confirm_frame) = init.on_response(&spake_b, &confirm).unwrap();
    out.push(("pair_confirm", hex(confirm_frame.encode())));
    let Frame::PairConfirm { confirm } = confirm_frame else { unreachable!() };
    let (_, lock_key) = responder.on_confirm(&confirm).unwrap();
    assert_eq!(gw_key, lock_key);
    out.push(("pairing_key", hex(gw_key.as_bytes())));

    out.push(("hello", hex(Frame::Hello { nonce: gw_nonce }.encode())));
    let keys = SessionKeys::derive(&gw_key, lock_id, &gw_nonce, &lock_nonce);
    let reply = Frame::HelloReply { nonce: lock_nonce, confirm: keys.hello_tag(&gw_nonce, &lock_nonce) };
    out.push(("hello_reply", hex(reply.encode())));
    out.push(("key_gateway_to_lock", hex(keys.gateway_to_lock())));
    out.push(("key_lock_to_gateway", hex(keys.lock_to_gateway())));

    let request = Request { id: 1, actor: Actor::Hub, op: Op::Unlock }.encode().unwrap();
    out.push(("unlock_request_plaintext", hex(&request)));
    let (mut gateway, mut lock) = (SecureChannel::new(&keys, Role::Gateway), SecureChannel::new(&keys, Role::Lock));
    let sealed = gateway.seal(&request).unwrap();
    assert_eq!(&lock.open(&sealed).unwrap()[..], &request[..]);
    out.push(("unlock_request_sealed", hex(&sealed)));
    // The second frame (counter 1) pins how the counter enters the header and the nonce: at
    // counter 0 both are zeros, which a constant nonce would match too.
    let second = Request { id: 2, actor: Actor::Hub, op: Op::Lock }.encode().unwrap();
    out.push(("lock_request_plaintext", hex(&second)));
    let second_sealed = gateway.seal(&second).unwrap();
    assert_eq!(&lock.open(&second_sealed).unwrap()[..], &second[..]);
    out.push(("lock_request_sealed", hex(&second_sealed)));
    let mut out: Vec<(String, String)> = out.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    // The first request on a link is the gateway's second frame, after its hello: number 1.
    for (i, f) in fragment(&sealed, 1, 20).unwrap().into_iter().enumerate() {
        out.push((format!("mtu23_fragment_{i}"), hex(f)));
    }
    out
}

#[test]
fn published_vectors_match_the_implementation() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/protocol.md")).unwrap();
    let lines: Vec<String> = vectors().into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
    if std::env::var_os("LHP_PRINT_VECTORS").is_some() {
        println!("{}", lines.join("\n"));
    }
    let doc_lines: Vec<&str> = doc.lines().map(str::trim).collect();
    let missing: Vec<&String> = lines.iter().filter(|l| !doc_lines.contains(&l.as_str())).collect();
    assert!(
        missing.is_empty(),
        "docs/protocol.md lacks or disagrees on:\n{}",
        missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
    );
}
