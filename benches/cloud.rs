//! Events per second from the durable outbox to the broker at QoS 1 (deleted on PUBACK), and
//! the MQTT round trip through the same broker (publish QoS 1 → receive it back), the floor
//! end-to-end latency is compared with. Against Debian's Mosquitto and the bundled broker,
//! both with mutual TLS.
//!
//! Run: `cargo bench --bench cloud`

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use lockhub::cloud::link::{CloudConfig, CloudLink};
use lockhub::devcloud::pki::Pki;
use lockhub::protocol::ids::GatewayId;
use lockhub::store::{Store, StoreConfig};
use support::broker::{Kind, TestBroker};
use tokio::sync::{Notify, mpsc, watch};

const GW: &str = "gw-bench";
const EVENTS: u32 = 5_000;
const ROUND_TRIPS: usize = 1_000;

async fn outbox_rate(pki: &Pki, port: u16, dir: &std::path::Path, inflight: u16) -> f64 {
    let store = Store::open(StoreConfig {
        credentials_dir: None,
        ..StoreConfig::in_dir(&dir.join(format!("state-{inflight}")))
    })
    .unwrap();
    let store = Arc::new(Mutex::new(store));
    store
        .lock()
        .unwrap()
        .transaction(|tx| {
            for i in 0..EVENTS {
                tx.append_outbox(
                    None,
                    &format!("lockhub/v1/{GW}/events"),
                    format!(r#"{{"id":"ev-{i}"}}"#).as_bytes(),
                    false,
                    0,
                )?;
            }
            Ok(())
        })
        .unwrap();
    let config = CloudConfig {
        inflight,
        ..CloudConfig::new(
            vec![format!("mqtts://localhost:{port}")],
            pki.ca_cert(),
            pki.client_cert(GW),
            pki.client_key(GW),
        )
    };
    let (tx, _rx) = mpsc::channel(4);
    let (link, mut reports) =
        CloudLink::new(config, GatewayId::new(GW).unwrap(), store.clone(), Arc::new(Notify::new()), tx).unwrap();
    let (stop, stopped) = watch::channel(false);
    let started = Instant::now();
    let task = tokio::spawn(link.run(stopped));
    reports.delivered.wait_for(|n| *n >= u64::from(EVENTS)).await.unwrap();
    let rate = f64::from(EVENTS) / started.elapsed().as_secs_f64();
    stop.send(true).unwrap();
    task.await.unwrap();
    rate
}

fn main() {
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), &[GW]).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    for kind in [Kind::Mosquitto, Kind::Bundled] {
        let broker = TestBroker::start(kind, &pki, false);
        let name = match kind {
            Kind::Mosquitto => "Mosquitto",
            // Its sink commits every event (synchronous=FULL) before the PUBACK.
            Kind::Bundled => "bundled broker + sink",
        };
        for inflight in [1u16, 32] {
            let state = dir.path().join(format!("{kind:?}"));
            let rate = rt.block_on(outbox_rate(&pki, broker.port(), &state, inflight));
            println!(
                "outbox → {name} (mTLS, QoS 1, delete on PUBACK), in-flight window {inflight:>2}: {rate:>8.0} events/s"
            );
        }
        let mut samples = rt.block_on(support::floor::mqtt_round_trips(&pki, broker.port(), GW, ROUND_TRIPS));
        samples.sort();
        let at = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
        println!(
            "MQTT round trip through {name} (mTLS, QoS 1 publish → delivery): p50 {:.1?}  p95 {:.1?}  p99 {:.1?}  (n = {})",
            at(0.5),
            at(0.95),
            at(0.99),
            samples.len()
        );
    }
}
