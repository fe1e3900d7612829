//! Durable outbox appends per second (one per transaction, and batched), database growth per
//! 10,000 events, and how fast a backlog drains. Every commit is durable (WAL,
//! `synchronous=FULL`): the figures include the fsyncs, so they depend on the disk more than on
//! the CPU.
//!
//! Run: `cargo bench --bench store`

use std::time::Instant;

use lockhub::protocol::ids::LockId;
use lockhub::protocol::pairing::PairingKey;
use lockhub::store::{Store, StoreConfig};

const EVENT: &[u8] = br#"{"id":"0197a1c2-7d2e-7cc1-9b3e-3f9d2a1c0e55","lock":"4c48000000000001","seq":1234,"time":1764460800,"event":"state_changed","state":"unlocked","cause":"remote","actor":"user:9f1c2b3a4d5e6f70"}"#;

fn open(dir: &std::path::Path) -> Store {
    let config = StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(dir) };
    Store::open(config).unwrap()
}

fn db_bytes(dir: &std::path::Path) -> u64 {
    ["lockhub.db", "lockhub.db-wal"].iter().filter_map(|f| std::fs::metadata(dir.join(f)).ok()).map(|m| m.len()).sum()
}

fn main() {
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let lock = LockId([0x4c, 0x48, 0, 0, 0, 0, 0, 1]);
    store
        .transaction(|tx| tx.add_lock(lock, "C0:00:00:00:00:01", "Front door", &PairingKey::from_bytes([7; 32]), 0))
        .unwrap();
    let topic = "lockhub/v1/hub-1/events";

    // One event per transaction: each is a state change (last seq) plus its outbox record.
    let n = 2_000;
    let t = Instant::now();
    for seq in 0..n {
        store
            .transaction(|tx| {
                tx.set_last_event_seq(lock, seq)?;
                tx.append_outbox(Some(lock), topic, EVENT, false, 0)
            })
            .unwrap();
    }
    let single = n as f64 / t.elapsed().as_secs_f64();

    let batches = 200;
    let per_batch = 100;
    let t = Instant::now();
    for b in 0..batches {
        store
            .transaction(|tx| {
                for i in 0..per_batch {
                    tx.set_last_event_seq(lock, (b * per_batch + i) as u64)?;
                    tx.append_outbox(Some(lock), topic, EVENT, false, 0)?;
                }
                Ok(())
            })
            .unwrap();
    }
    let batched = (batches * per_batch) as f64 / t.elapsed().as_secs_f64();

    // Acknowledge everything, compact, then measure growth for 10,000 more events.
    let ids: Vec<i64> = store.outbox_pending(u32::MAX).unwrap().iter().map(|r| r.id).collect();
    let t = Instant::now();
    store.outbox_ack(&ids).unwrap();
    let ack_rate = ids.len() as f64 / t.elapsed().as_secs_f64();
    store.compact().unwrap();
    let before = db_bytes(dir.path());
    store
        .transaction(|tx| {
            for seq in 0..10_000u64 {
                tx.set_last_event_seq(lock, seq)?;
                tx.append_outbox(Some(lock), topic, EVENT, false, 0)?;
            }
            Ok(())
        })
        .unwrap();
    store.compact().unwrap();
    let growth = db_bytes(dir.path()) - before;

    // A backlog drained as the cloud link drains it (acknowledged 16 at a time, the half of its
    // default window of 32), with and without a record clearing a retained topic behind it (an
    // unbind during the outage): while one may be pending, every acknowledgement also asks
    // whether any is left.
    let backlog = 20_000;
    let drain = |store: &mut Store, clearing: bool| {
        store.compact().unwrap();
        store
            .transaction(|tx| {
                for _ in 0..backlog {
                    tx.append_outbox(Some(lock), topic, EVENT, false, 0)?;
                }
                if clearing {
                    tx.append_outbox(None, "lockhub/v1/hub-1/locks/4c48000000000002/state", b"", true, 0)?;
                }
                Ok(())
            })
            .unwrap();
        let ids: Vec<i64> = store.outbox_pending(u32::MAX).unwrap().iter().map(|r| r.id).collect();
        let t = Instant::now();
        for batch in ids.chunks(16) {
            store.outbox_ack(batch).unwrap();
        }
        ids.len() as f64 / t.elapsed().as_secs_f64()
    };
    let drained_plain = drain(&mut store, false);
    let drained_clearing = drain(&mut store, true);

    // The floor: the smallest durable commit (one row changed) on the same disk.
    let t = Instant::now();
    for seq in 0..n {
        store.transaction(|tx| tx.set_last_event_seq(lock, seq)).unwrap();
    }
    let empty = n as f64 / t.elapsed().as_secs_f64();

    println!(
        "durable outbox append, one event per transaction : {single:>9.0} events/s ({:.2} ms each)",
        1000.0 / single
    );
    println!("durable outbox append, 100 events per transaction: {batched:>9.0} events/s");
    println!("outbox acknowledgement (one transaction)         : {ack_rate:>9.0} records/s");
    println!(
        "draining a backlog of {backlog}, 16 acknowledged at a time: {drained_plain:>9.0} records/s; with a retained topic's clearing behind it: {drained_clearing:.0} records/s"
    );
    println!(
        "one-row durable commit (the disk's floor)        : {empty:>9.0} commits/s ({:.2} ms each)",
        1000.0 / empty
    );
    println!(
        "database growth per 10,000 undelivered events    : {:.2} MiB ({:.0} bytes per event of {} payload bytes)",
        growth as f64 / 1048576.0,
        growth as f64 / 10_000.0,
        EVENT.len()
    );
}
