//! The floor of end-to-end latency: one GATT round trip (a request written to the lock's
//! write characteristic, its answer notified back) through bluer, a private dbus-daemon and
//! the emulated lock, beside the same request through the in-memory link in the same run.
//!
//! Run: `cargo bench --bench gatt_roundtrip` (needs dbus-daemon; `.ci/run` installs it).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use lockhub::firmware::{Firmware, Mechanics, PersistentState};
use lockhub::memlink::MemoryLink;
use lockhub::protocol::gatt::Capabilities;
use lockhub::protocol::ids::{GatewayId, LockId};
use lockhub::protocol::message::{Actor, Op};
use rand_core::OsRng;

const ROUND_TRIPS: usize = 2_000;

fn memory_round_trips(mtu: u16) -> Vec<Duration> {
    let mechanics = Mechanics { motor_ms: 0, ..Mechanics::default() };
    let state = PersistentState::factory_new(LockId([3; 8]), Capabilities::default(), mechanics, &mut OsRng);
    let code = state.identity.setup_code.clone();
    let mut link = MemoryLink::new(
        Firmware::boot(state, Box::new(OsRng)),
        GatewayId::new("hub-bench").unwrap(),
        mtu,
        Box::new(OsRng),
    );
    link.connect().unwrap();
    let key = link.pair(&code).unwrap();
    link.open_session(&key).unwrap();
    for _ in 0..1_000 {
        link.call(Actor::Hub, Op::Status).unwrap();
    }
    (0..ROUND_TRIPS * 10)
        .map(|_| {
            let t = Instant::now();
            link.call(Actor::Hub, Op::Status).unwrap();
            t.elapsed()
        })
        .collect()
}

fn main() {
    // `cargo test --benches` runs benchmarks in test mode: do nothing there.
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    println!("GATT round trip: Status request written, its response notified back (motor excluded)");
    for mtu in [247u16, 23] {
        let (dbus, cold) = rt.block_on(support::floor::gatt_round_trips(mtu, ROUND_TRIPS));
        let memory = memory_round_trips(mtu);
        let dbus_p50 = {
            let mut s = dbus.clone();
            s.sort();
            s[s.len() / 2]
        };
        let mem_p50 = {
            let mut s = memory.clone();
            s.sort();
            s[s.len() / 2]
        };
        println!("MTU {mtu:>3}  bluer + D-Bus + emulated lock : {}", support::floor::percentiles(dbus.clone()));
        println!("MTU {mtu:>3}  in-memory link (floor)        : {}", support::floor::percentiles(memory.clone()));
        println!(
            "MTU {mtu:>3}  D-Bus path / in-memory at p50  : {:.0}x;  first command incl. connect + session: {cold:.1?}",
            dbus_p50.as_secs_f64() / mem_p50.as_secs_f64()
        );
    }
}
