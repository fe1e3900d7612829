//! What LHP/1 costs in CPU, without any radio: one unlock on a fresh connection (hello,
//! session keys, sealed request, motor events and response; pairing excluded), one pairing,
//! and the pieces they are made of. The in-memory link runs both ends in this process, so each
//! figure is gateway + lock together.
//!
//! Run: `cargo bench --bench protocol`

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use lockhub::firmware::{Firmware, Mechanics, PersistentState};
use lockhub::memlink::MemoryLink;
use lockhub::protocol::fragment::{Fragmenter, Reassembler};
use lockhub::protocol::gatt::Capabilities;
use lockhub::protocol::ids::{GatewayId, LockId};
use lockhub::protocol::message::{Actor, Op, Request, UserRef};
use lockhub::protocol::pairing::PairingKey;
use lockhub::protocol::session::{Role, SecureChannel, SessionKeys};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{OsRng, SeedableRng};

const USER: Actor = Actor::Cloud(UserRef([7; 8]));

fn factory_lock() -> PersistentState {
    // No motor time and no battery drain: the figures are the protocol alone, for any number of runs.
    let mechanics = Mechanics { motor_ms: 0, drain_per_op_permille: 0, ..Mechanics::default() };
    PersistentState::factory_new(LockId([1; 8]), Capabilities::default(), mechanics, &mut OsRng)
}

fn link(state: PersistentState, mtu: u16) -> MemoryLink {
    let fw = Firmware::boot(state, Box::new(ChaCha20Rng::from_rng(OsRng).unwrap()));
    MemoryLink::new(fw, GatewayId::new("bench-hub").unwrap(), mtu, Box::new(OsRng))
}

fn paired_lock() -> (PersistentState, PairingKey) {
    let state = factory_lock();
    let code = state.identity.setup_code.clone();
    let mut l = link(state, 247);
    l.connect().unwrap();
    let key = l.pair(&code).unwrap();
    (l.firmware().persistent().clone(), key)
}

fn bench_unlock(c: &mut Criterion) {
    let (paired, key) = paired_lock();
    for mtu in [23u16, 247] {
        c.bench_function(&format!("unlock, fresh session, MTU {mtu}"), |b| {
            b.iter_batched(
                || link(paired.clone(), mtu),
                |mut l| {
                    l.connect_session(&key).unwrap();
                    let r = l.call(USER, Op::Unlock).unwrap();
                    assert!(r.result.is_ok());
                },
                BatchSize::SmallInput,
            )
        });
    }
    c.bench_function("unlock, warm session, MTU 247", |b| {
        let mut l = link(paired.clone(), 247);
        l.connect_session(&key).unwrap();
        let mut op = Op::Unlock;
        b.iter(|| {
            let r = l.call(USER, op.clone()).unwrap();
            assert!(r.result.is_ok());
            l.take_events().unwrap();
            op = if op == Op::Unlock { Op::Lock } else { Op::Unlock };
        })
    });
}

fn bench_pairing(c: &mut Criterion) {
    c.bench_function("pairing (SPAKE2 + confirmation, both sides)", |b| {
        b.iter_batched(
            || {
                let state = factory_lock();
                let code = state.identity.setup_code.clone();
                (link(state, 247), code)
            },
            |(mut l, code)| {
                l.connect().unwrap();
                l.pair(&code).unwrap();
            },
            BatchSize::SmallInput,
        )
    });
}

fn bench_pieces(c: &mut Criterion) {
    let key = PairingKey::from_bytes([9; 32]);
    c.bench_function("session key derivation (HKDF)", |b| {
        b.iter(|| SessionKeys::derive(&key, LockId([1; 8]), &[2; 16], &[3; 16]))
    });
    let keys = SessionKeys::derive(&key, LockId([1; 8]), &[2; 16], &[3; 16]);
    let request = Request { id: 1, actor: USER, op: Op::Unlock }.encode().unwrap();
    c.bench_function("seal + open one request", |b| {
        let mut gw = SecureChannel::new(&keys, Role::Gateway);
        let mut lock = SecureChannel::new(&keys, Role::Lock);
        b.iter(|| lock.open(&gw.seal(&request).unwrap()).unwrap())
    });
    let frame = vec![0x5a; 1024];
    c.bench_function("fragment + reassemble 1 KiB at MTU 23", |b| {
        let (mut sender, mut r) = (Fragmenter::new(20).unwrap(), Reassembler::default());
        b.iter(|| {
            let mut out = Vec::new();
            for f in sender.cut(&frame).unwrap() {
                out = r.push(&f, 0).unwrap();
            }
            out.pop().unwrap()
        })
    });
}

criterion_group!(benches, bench_unlock, bench_pairing, bench_pieces);
criterion_main!(benches);
