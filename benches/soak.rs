//! The soak: `lockhub run` (the release build) for an hour on the test bus and the bundled
//! broker, with three paired locks, while remote commands and lock events flow. Each minute it
//! samples the daemon's resident memory and open file descriptors, and how the commands went;
//! at the end it prints the table and whether anything grew. Not part of CI: it takes an hour.
//!
//! Run: `cargo bench --bench soak` (needs dbus-daemon). `LOCKHUB_SOAK_MINUTES` shortens it
//! (default 60); `LOCKHUB_SOAK_SAMPLE_S` changes the sampling period (default 60).
//!
//! The load, per second: one remote command (lock and unlock in turn, round the three locks),
//! signed by a granted user, awaited; one turn of a thumb-turn on one lock (an event the lock
//! pushes). Every ten minutes one lock reboots and another's link is dropped, so that the
//! recovery paths run too.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use lockhub::auth::statement::{Operation, Permission, Statement};
use lockhub::cloud::reply::Outcome;
use lockhub::devcloud::app::{AppClient, AppKey, claim, command, grant, pair, remote_unlock};
use lockhub::devcloud::pki::Pki;
use lockhub::protocol::ids::{GatewayId, LockId};
use lockhub::store::unix_now;
use support::daemon::{Daemon, claim_code, until_online, write_config};
use support::floor::at;

const GW: &str = "gw-soak";
const LOCKS: usize = 3;
const WAIT: Duration = Duration::from_secs(30);

/// One minute's sample.
struct Sample {
    elapsed_s: u64,
    rss_kib: u64,
    hwm_kib: u64,
    fds: usize,
    ok: usize,
    failed: usize,
    events: usize,
    p50: Duration,
    p99: Duration,
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let minutes = env_u64("LOCKHUB_SOAK_MINUTES", 60);
    let sample_every = Duration::from_secs(env_u64("LOCKHUB_SOAK_SAMPLE_S", 60));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(soak(Duration::from_secs(minutes * 60), sample_every));
}

async fn soak(length: Duration, sample_every: Duration) {
    let bed = support::test_bed();
    let dir = tempfile::tempdir().unwrap();
    let gw = GatewayId::new(GW).unwrap();
    let pki = Pki::init(&dir.path().join("pki"), &[GW]).unwrap();
    let broker = support::bundled::Bundled::start(&pki);
    let config = write_config(dir.path(), &pki, broker.port, GW);
    // One user sends a command a second: far above the default rate limit.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[policy]\nrate_commands = 1000000\n");
    std::fs::write(&config, text).unwrap();
    let app = AppClient::connect(&format!("mqtts://localhost:{}", broker.port), &pki, &gw).await.unwrap();
    let mut seen = app.watch();
    let daemon = Daemon::spawn(&config, &bed.bus);
    until_online(&mut seen, GW, WAIT).await;

    // Claimed, three locks paired, a user granted all of them.
    let code = claim_code(&config);
    let keys = dir.path().join("keys");
    let (owner, user) =
        (AppKey::generate(&keys, "owner", false).unwrap(), AppKey::generate(&keys, "user", false).unwrap());
    let ok = |r: lockhub::cloud::reply::Reply| assert_eq!(r.result, Outcome::Ok, "{r:?}");
    ok(app.send(&claim(&gw, &code, unix_now()), &owner, WAIT).await.unwrap());
    let ctl = support::control().await;
    let mut locks = Vec::new();
    for _ in 0..LOCKS {
        let lock = support::add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
        let id = LockId::parse(&lock.lock_id).unwrap();
        ok(app.send(&pair(&gw, id, &lock.setup_code, unix_now()), &owner, WAIT).await.unwrap());
        ok(app.send(&remote_unlock(&gw, id, true, unix_now()), &owner, WAIT).await.unwrap());
        let perms = vec![Permission::Lock, Permission::Unlock, Permission::Remote];
        let g = grant(&gw, user.public(), id, perms, None, 2, unix_now());
        ok(app.send(&Statement::Grant(g), &owner, WAIT).await.unwrap());
        locks.push((lock.lock_id, id));
    }

    // Events are counted as the cloud sees them.
    let events_topic = format!("lockhub/v1/{GW}/events");
    let events = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = events.clone();
    tokio::spawn(async move {
        while let Ok(m) = seen.recv().await {
            if m.topic == events_topic {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });

    let pid = daemon.pid();
    println!("soak: {} min, sampling every {} s; lockhub run pid {pid}", length.as_secs() / 60, sample_every.as_secs());
    println!(
        "{:>6} {:>9} {:>9} {:>5} {:>7} {:>6} {:>7} {:>9} {:>9}",
        "m:ss", "RSS KiB", "peak KiB", "fds", "ok", "failed", "events", "p50", "p99"
    );
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut next_sample = started + sample_every;
    let mut samples = Vec::new();
    let (mut ok_total, mut failed_total, mut latencies) = (0usize, 0usize, Vec::new());
    let mut second = 0u64;
    while started.elapsed() < length {
        tick.tick().await;
        second += 1;
        let (name, id) = &locks[(second as usize) % LOCKS];
        let op = if (second / LOCKS as u64).is_multiple_of(2) { Operation::Unlock } else { Operation::Lock };
        let sent = Instant::now();
        let c = Statement::Command(command(&gw, *id, op, unix_now(), 30));
        match app.send(&c, &user, WAIT).await {
            Ok(r) if r.result == Outcome::Ok => {
                ok_total += 1;
                latencies.push(sent.elapsed());
            }
            _ => failed_total += 1,
        }
        let _ = ctl.turn_knob(&locks[(second as usize + 1) % LOCKS].0).await;
        if second % 600 == 300 {
            let _ = ctl.reboot(name).await;
            let _ = ctl.drop_link(&locks[(second as usize + 2) % LOCKS].0).await;
        }
        if Instant::now() >= next_sample {
            next_sample += sample_every;
            latencies.sort();
            let (p50, p99) = if latencies.is_empty() {
                (Duration::ZERO, Duration::ZERO)
            } else {
                (at(&latencies, 0.5), at(&latencies, 0.99))
            };
            latencies.clear();
            let s = Sample {
                elapsed_s: started.elapsed().as_secs(),
                rss_kib: status_kib(pid, "VmRSS:"),
                hwm_kib: status_kib(pid, "VmHWM:"),
                fds: fds(pid),
                ok: ok_total,
                failed: failed_total,
                events: events.load(std::sync::atomic::Ordering::Relaxed),
                p50,
                p99,
            };
            println!(
                "{:>6} {:>9} {:>9} {:>5} {:>7} {:>6} {:>7} {:>9.2?} {:>9.2?}",
                format!("{}:{:02}", s.elapsed_s / 60, s.elapsed_s % 60),
                s.rss_kib,
                s.hwm_kib,
                s.fds,
                s.ok,
                s.failed,
                s.events,
                s.p50,
                s.p99
            );
            samples.push(s);
        }
    }
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        println!("too short for a sample");
        return;
    };
    let max_rss = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let max_fds = samples.iter().map(|s| s.fds).max().unwrap_or(0);
    // Growth is judged from the second half on: the first minutes fill caches and pools.
    let half = &samples[samples.len() / 2..];
    let (rss_lo, rss_hi) =
        (half.iter().map(|s| s.rss_kib).min().unwrap(), half.iter().map(|s| s.rss_kib).max().unwrap());
    let (fds_lo, fds_hi) = (half.iter().map(|s| s.fds).min().unwrap(), half.iter().map(|s| s.fds).max().unwrap());
    println!(
        "summary: {} commands ok, {} failed, {} events; RSS {} → {} KiB (max {max_rss}, second half {rss_lo}..{rss_hi}); \
         fds {} → {} (max {max_fds}, second half {fds_lo}..{fds_hi})",
        last.ok, last.failed, last.events, first.rss_kib, last.rss_kib, first.fds, last.fds
    );
    drop(daemon);
}
