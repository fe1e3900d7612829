//! Remote unlock through the full stack: the app stand-in → the bundled broker (mutual TLS) →
//! `lockhub run` (a separate process: intake, policy, per-lock task) → bluer → private
//! dbus-daemon → emulated lock with zero motor time → back to the app. Printed beside the
//! floor measured in the same run, its samples taken in turns with the warm commands (ten
//! rounds of each, so that both see the machine at the same pace): the MQTT round trip through
//! the same broker (a request to a client that answers at once, and its reply: the four TLS
//! hops of the path) + the D-Bus GATT round trip + one durable SQLite commit. The warm
//! commands run twice, each time with the floor sampled at the same cadence: back to back
//! (the machine never idle) and spaced (an idle machine woken for each, as a hub is). Also the time
//! from a lock-side event (the thumb-turn) to the lock's retained state on the broker, and the
//! daemon's memory (peak during the run; idle with 10 paired locks). And where a warm command's time goes: the daemon's
//! `lockhub::timing` records (each stage's end inside the gateway) as medians, and the way in
//! and the way back outside it; and the least mean latency this machine allows a back-to-back
//! run, from the CPU all processes spent per command and the number of cores.
//!
//! Run: `cargo bench --bench remote_unlock` (needs dbus-daemon; `.ci/run` installs it; about
//! three minutes once built, most of them the spaced run's idle time).

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lockhub::auth::statement::{Operation, Permission, Statement};
use lockhub::cloud::reply::Outcome;
use lockhub::devcloud::app::{AppClient, AppKey, Seen, claim, command, grant, pair, remote_unlock};
use lockhub::devcloud::pki::Pki;
use lockhub::protocol::ids::{GatewayId, LockId};
use lockhub::store::unix_now;
use support::floor::{at, median, percentiles};
use support::timing_log::{STAGES, StageRecord, strip_ansi};
use tokio::sync::broadcast;

const GW: &str = "gw-bench";
const WARM: usize = 1_000;
const COLD: usize = 100;
const EVENTS: usize = 100;
const LOCKS: usize = 10;
/// The warm commands and the floor's samples are taken in this many turns.
const ROUNDS: usize = 10;
/// The floor's samples: MQTT request/replies, GATT round trips, durable commits.
const FLOOR_MQTT: usize = 1_000;
const FLOOR_GATT: usize = 1_000;
const FLOOR_COMMITS: usize = 500;
/// Spaced, the floor's samples: chains of the three parts.
const FLOOR_CHAINS: usize = 500;
const WAIT: Duration = Duration::from_secs(30);
/// The spaced cadence's interval between the starts of two commands (`BENCH_SPACING_US` to
/// change it). The previous command's trailing work (its outcome's commit, events and state)
/// is over within a few milliseconds, but a machine left idle longer wakes slower still: on
/// the development machine the ratio to the floor grew between 50 and 100 ms of spacing
/// (docs/benchmarks.md). A hub's commands come seconds apart; 100 ms is the longest that keeps
/// 1,000 commands within a few minutes.
const SPACING: Duration = Duration::from_millis(100);

/// How the warm commands follow each other; the floor's samples follow the same cadence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cadence {
    /// Each command leaves the moment the previous reply is in: the machine never idles, and
    /// the previous command's trailing work shares the cores with the next command. The
    /// stress case, bounded by the CPU a command costs across every process of the bench.
    BackToBack,
    /// A command, or a chain of the floor's three parts, starts every so often, the machine
    /// idle in between: how a hub receives commands, and what waking an idle machine costs,
    /// on both sides.
    Spaced(Duration),
}

impl Cadence {
    /// The interval between starts, if any.
    fn spacing(self) -> Option<Duration> {
        match self {
            Cadence::BackToBack => None,
            Cadence::Spaced(every) => Some(every),
        }
    }
}

impl std::fmt::Display for Cadence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cadence::BackToBack => f.write_str("back to back"),
            Cadence::Spaced(every) => write!(f, "one command every {every:?}"),
        }
    }
}

/// One cadence's warm commands and the floor sampled in turns with them.
struct WarmRun {
    cadence: Cadence,
    samples: Vec<Duration>,
    /// Medians: MQTT request/reply, GATT round trip, durable commit.
    floor: [Duration; 3],
    stages: Vec<StageRecord>,
    /// CPU per command by process, and in all (µs): meaningful back to back only, where the
    /// run holds nothing but the commands.
    cpu: (String, f64),
}

struct Daemon(Child);

impl Daemon {
    /// Stops the daemon as systemd does (SIGTERM, then its graceful shutdown), so that a
    /// wrapper around it (`packaging/profile-hot-code` runs it under callgrind) sees an
    /// ordinary exit. A daemon still running after a minute is killed on drop.
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match self.0.try_wait() {
                Ok(Some(status)) if status.success() => return,
                Ok(Some(status)) => return eprintln!("lockhub run ended with {status} after SIGTERM"),
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => return,
            }
        }
        eprintln!("lockhub run did not stop within a minute of SIGTERM: killed");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time (user, system: in clock ticks) of this process and of each of its children, by
/// program name: the app stand-in (this benchmark), the daemon, the broker, the D-Bus daemon
/// and the emulated locks.
fn cpu_ticks_by_process() -> std::collections::BTreeMap<String, (u64, u64)> {
    let me = std::process::id();
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ppid ... utime (14th) stime (15th): comm may hold spaces.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let pid: u32 = stat[..open].trim().parse().unwrap_or(0);
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ppid: u32 = fields.get(1).and_then(|f| f.parse().ok()).unwrap_or(0);
        if pid != me && ppid != me {
            continue;
        }
        let name = if pid == me { "app (this benchmark)".to_owned() } else { stat[open + 1..close].to_owned() };
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        let entry: &mut (u64, u64) = out.entry(name).or_default();
        entry.0 += ticks(11);
        entry.1 += ticks(12);
    }
    out
}

/// Adds what each process spent between two readings to `spent`.
fn add_cpu(
    spent: &mut std::collections::BTreeMap<String, (u64, u64)>,
    before: &std::collections::BTreeMap<String, (u64, u64)>,
    after: &std::collections::BTreeMap<String, (u64, u64)>,
) {
    for (name, &(user, sys)) in after {
        let (user0, sys0) = before.get(name).copied().unwrap_or_default();
        let entry = spent.entry(name.clone()).or_default();
        entry.0 += user.saturating_sub(user0);
        entry.1 += sys.saturating_sub(sys0);
    }
}

/// The CPU time each process spent per command between two readings, in µs (of which in the
/// kernel), largest first; and their sum, in µs.
fn cpu_per_command(
    before: &std::collections::BTreeMap<String, (u64, u64)>,
    after: &std::collections::BTreeMap<String, (u64, u64)>,
    commands: usize,
) -> (String, f64) {
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let us = |ticks: u64| ticks as f64 / hz * 1e6 / commands as f64;
    let mut per: Vec<(f64, f64, &str)> = after
        .iter()
        .map(|(name, &(user, sys))| {
            let (user0, sys0) = before.get(name).copied().unwrap_or_default();
            let (user, sys) = (us(user.saturating_sub(user0)), us(sys.saturating_sub(sys0)));
            (user + sys, sys, name.as_str())
        })
        .collect();
    per.sort_by(|a, b| b.0.total_cmp(&a.0));
    let total: f64 = per.iter().map(|(us, _, _)| us).sum();
    let parts: Vec<String> =
        per.iter().map(|(us, sys, name)| format!("{name} {us:.0} µs ({sys:.0} in the kernel)")).collect();
    (format!("{} — {total:.0} µs in all", parts.join(", ")), total)
}

/// A process's proportional set size in KiB: its mappings' pages, each divided by the number
/// of processes mapping it (libc counts fully in RSS, a fraction of it here).
fn pss_kib(pid: u32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// (VmRSS, VmHWM, RssAnon, RssFile) of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"), field("RssAnon:"), field("RssFile:"))
}

async fn wait_for(seen: &mut broadcast::Receiver<Seen>, want: impl Fn(&str, &serde_json::Value) -> bool) {
    tokio::time::timeout(WAIT, async {
        loop {
            let msg = seen.recv().await.unwrap();
            if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&msg.payload)
                && want(&msg.topic, &json)
            {
                return;
            }
        }
    })
    .await
    .expect("nothing within 30 s");
}

/// The stages `lockhub::timing` logs for each command, in order.
/// The stage records of a daemon's log, as its lines come, and how many times it gave memory
/// back while quiet; every other line passes through to stderr.
#[derive(Clone)]
struct StageLog(std::sync::Arc<std::sync::Mutex<Vec<StageRecord>>>, std::sync::Arc<tokio::sync::watch::Sender<u32>>);

impl Default for StageLog {
    fn default() -> Self {
        StageLog(Default::default(), std::sync::Arc::new(tokio::sync::watch::channel(0).0))
    }
}

impl StageLog {
    fn follow(&self, stderr: std::process::ChildStderr) {
        let (records, given_back) = (self.0.clone(), self.1.clone());
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if strip_ansi(&line).contains("handed back while quiet") {
                    given_back.send_modify(|n| *n += 1);
                    continue;
                }
                let Some(record) = StageRecord::parse(&line) else {
                    eprintln!("{}", strip_ansi(&line));
                    continue;
                };
                records.lock().unwrap().push(record);
            }
        });
    }

    /// Counts the daemon's hand-backs while quiet (src/bin/lockhub/quiet.rs).
    fn given_back(&self) -> tokio::sync::watch::Receiver<u32> {
        self.1.subscribe()
    }

    /// The records so far, leaving none.
    fn take(&self) -> Vec<StageRecord> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Now, µs since the Unix epoch (the clock the daemon's records share).
fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64
}

/// "stage at p50 µs" for each stage the records reached.
fn stage_medians(records: &[StageRecord]) -> String {
    let mut parts = Vec::new();
    for (i, stage) in STAGES.iter().enumerate() {
        let at: Vec<u64> = records.iter().filter_map(|r| r.ended[i]).collect();
        if let Some(m) = median_us(at) {
            parts.push(format!("{stage} {m} µs"));
        }
    }
    format!("{} (n = {})", parts.join(", "), records.len())
}

/// Each step's own time (from the previous stage's end, the first from the link receiving the
/// command) and the two ways outside the gateway — the way in (the app's send, signing
/// included → the link receiving it) and the way back (the reply handed to the link → the app
/// having it) —, as p50 / p99: where the slow commands lose their time, which the medians of
/// [`stage_medians`] do not show.
fn step_tails(records: &[StageRecord], sent: &std::collections::HashMap<String, (u64, u64)>) -> String {
    let replied = STAGES.iter().position(|s| *s == "replied").unwrap();
    let mut steps: Vec<(String, Vec<u64>)> = Vec::new();
    steps.push(("way in".into(), Vec::new()));
    for stage in &STAGES[..=replied] {
        steps.push(((*stage).into(), Vec::new()));
    }
    steps.push(("way back".into(), Vec::new()));
    for r in records {
        let Some(&(at, done)) = sent.get(&r.id) else { continue };
        let (Some(received), Some(handed)) = (r.received_unix_us, r.ended[replied]) else { continue };
        steps[0].1.push(received.saturating_sub(at));
        let mut before = 0;
        for (i, ended) in r.ended[..=replied].iter().enumerate() {
            // A stage a command did not reach (none in a warm run) takes nothing.
            if let Some(ended) = *ended {
                steps[i + 1].1.push(ended.saturating_sub(before));
                before = ended;
            }
        }
        steps[replied + 2].1.push(done.saturating_sub(received + handed));
    }
    let parts: Vec<String> = steps
        .into_iter()
        .filter_map(|(name, mut v)| {
            v.sort_unstable();
            let p99 = *v.get((v.len() * 99 / 100).min(v.len().checked_sub(1)?))?;
            Some(format!("{name} {}/{p99}", v[v.len() / 2]))
        })
        .collect();
    format!("{} µs", parts.join(", "))
}

fn median_us(mut v: Vec<u64>) -> Option<u64> {
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

fn main() {
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let bed = support::test_bed();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(&dir.path().join("pki"), &[GW]).unwrap();
        // The bundled broker by default; BENCH_BROKER=mosquitto for Debian's Mosquitto.
        let kind = match std::env::var("BENCH_BROKER").as_deref() {
            Ok("mosquitto") => support::broker::Kind::Mosquitto,
            _ => support::broker::Kind::Bundled,
        };
        let broker = support::broker::TestBroker::start(kind, &pki, false);
        println!("broker: {kind:?}");
        let config = dir.path().join("lockhub.toml");
        std::fs::write(
            &config,
            format!(
                "[gateway]\nid = \"{GW}\"\nstate_dir = \"{}\"\n\n[cloud]\nbrokers = [\"mqtts://localhost:{}\"]\n\
                 ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[policy]\nrate_commands = 1000000\n\n\
                 [clock]\nrequire_sync = false\n\n[control]\nsocket = \"{}\"\n",
                dir.path().join("state").display(),
                broker.port(),
                pki.ca_cert().display(),
                pki.client_cert(GW).display(),
                pki.client_key(GW).display(),
                dir.path().join("control.sock").display()
            ),
        )
        .unwrap();
        let gw = GatewayId::new(GW).unwrap();
        let app = AppClient::connect(&format!("mqtts://localhost:{}", broker.port()), &pki, &gw).await.unwrap();
        let mut seen = app.watch();
        // BENCH_DAEMON: another build of `lockhub` to run as the daemon, such as the packaged
        // one (`cargo build --release --no-default-features`: no demo, emulator or broker).
        let daemon_bin = std::env::var_os("BENCH_DAEMON")
            .map_or_else(|| std::path::PathBuf::from(env!("CARGO_BIN_EXE_lockhub")), std::path::PathBuf::from);
        println!("daemon: {}", daemon_bin.display());
        let mut daemon = Daemon(
            Command::new("setpriv")
                .args(["--pdeathsig", "KILL", "--"])
                .arg(&daemon_bin)
                .args(["run", "--config"])
                .arg(&config)
                .env("DBUS_SYSTEM_BUS_ADDRESS", &bed.bus)
                .env("LOCKHUB_LOG", format!("{},lockhub::timing=debug,lockhub::memory=debug", std::env::var("BENCH_LOG").unwrap_or("error".into())))
                .envs(std::env::var("BENCH_MALLOC_ARENA_MAX").map(|v| ("MALLOC_ARENA_MAX", v)))
                .stdin(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stages = StageLog::default();
        stages.follow(daemon.0.stderr.take().unwrap());
        let status_topic = format!("lockhub/v1/{GW}/status");
        wait_for(&mut seen, |t, j| t == status_topic && j["status"] == "online").await;

        // Claim, pair 10 locks, grant the user lock 1, remote unlock on.
        let keys = dir.path().join("keys");
        let (owner, user) = (AppKey::generate(&keys, "owner", false).unwrap(), AppKey::generate(&keys, "user", false).unwrap());
        let now = unix_now();
        let out = Command::new(&daemon_bin).args(["claim-code", "--config"]).arg(&config).output().unwrap();
        let code = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let ok = |r: lockhub::cloud::reply::Reply| assert_eq!(r.result, Outcome::Ok, "{r:?}");
        ok(app.send(&claim(&gw, &code, now), &owner, WAIT).await.unwrap());
        let ctl = support::control().await;
        let mut locks = Vec::new();
        for _ in 0..LOCKS {
            let lock = support::add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
            let lock_id = LockId::parse(&lock.lock_id).unwrap();
            ok(app.send(&pair(&gw, lock_id, &lock.setup_code, now), &owner, WAIT).await.unwrap());
            locks.push(lock_id);
        }
        let lock = locks[0];
        ok(app.send(&remote_unlock(&gw, lock, true, now), &owner, WAIT).await.unwrap());
        let perms = vec![Permission::Lock, Permission::Unlock, Permission::Remote];
        ok(app.send(&Statement::Grant(grant(&gw, user.public(), lock, perms, None, 1, now)), &owner, WAIT).await.unwrap());
        let op = |i: usize| if i.is_multiple_of(2) { Operation::Unlock } else { Operation::Lock };
        // Each command's id → (sent, reply received), µs since the Unix epoch.
        let sent_at = std::sync::Mutex::new(std::collections::HashMap::<String, (u64, u64)>::new());
        let send = |i: usize| {
            let statement = Statement::Command(command(&gw, lock, op(i), unix_now(), 30));
            let app = &app;
            let user = &user;
            let sent_at = &sent_at;
            async move {
                let (t, at) = (Instant::now(), unix_us());
                let reply = app.send(&statement, user, WAIT).await.unwrap();
                let elapsed = t.elapsed();
                sent_at.lock().unwrap().insert(statement.id().as_str().to_owned(), (at, unix_us()));
                assert_eq!(reply.result, Outcome::Ok, "{reply:?}");
                elapsed
            }
        };

        // Idle memory with 10 paired locks (their first syncs done): once the daemon has
        // given memory back, as it does after 5 s without a change (src/bin/lockhub/quiet.rs).
        let mut given_back = stages.given_back();
        for _ in 0..20 {
            send(0).await;
        }
        let (busy_rss, ..) = memory_kib(daemon.0.id());
        let quiet_from = Instant::now();
        given_back.borrow_and_update();
        // Long enough for a daemon under callgrind (packaging/profile-hot-code).
        tokio::time::timeout(Duration::from_secs(300), given_back.changed())
            .await
            .expect("the daemon never gave memory back while quiet")
            .unwrap();
        let quiet_after = quiet_from.elapsed();
        let (idle_rss, _, idle_anon, idle_file) = memory_kib(daemon.0.id());
        let idle_pss = pss_kib(daemon.0.id());
        if std::env::var_os("BENCH_SMAPS").is_some() {
            let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", daemon.0.id())).unwrap();
            let mut per_file = std::collections::BTreeMap::<String, u64>::new();
            let mut current = String::new();
            for line in smaps.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() >= 5 && fields[0].contains('-') {
                    // Per mapping kind: the binary's code (r-xp), read-only data (r--p) and
                    // relocated data are different stories.
                    current = format!("{} ({})", fields.get(5).unwrap_or(&"[anon]"), fields[1]);
                } else if fields.first() == Some(&"Rss:") {
                    *per_file.entry(current.clone()).or_default() += fields[1].parse::<u64>().unwrap();
                }
            }
            let mut v: Vec<_> = per_file.into_iter().collect();
            v.sort_by_key(|(_, kib)| std::cmp::Reverse(*kib));
            for (file, kib) in v.iter().take(12) {
                eprintln!("  {kib:>6} KiB  {file}");
            }
        }
        // What the hand-back costs the next command: its code comes back from the page cache.
        let first_after_quiet = send(0).await;

        // Warm: the link stays up between commands.
        // The emulated battery drains per operation, as a real one does: fresh batteries now
        // and then, outside the timed sections.
        let refill = || async { ctl.set_battery(&lock.to_string(), 100).await.unwrap() };
        // The floor's instruments, set up now and sampled in turns with the warm commands, so
        // that both see the machine at the same pace (it drifts over a run).
        let mut floor_mqtt = support::floor::MqttRequestReply::start(&pki, broker.port(), GW).await;
        let (mut floor_gatt, _) =
            support::floor::GattExchanges::start(247, support::floor::GattOp::Status).await;
        let mut floor_commits = support::floor::DurableCommits::open(&dir.path().join("floor-store"));
        let spacing = std::env::var("BENCH_SPACING_US").map_or(SPACING, |v| {
            Duration::from_micros(v.parse().expect("BENCH_SPACING_US: a whole number of µs"))
        });
        let mut warm_runs = Vec::new();
        for cadence in [Cadence::BackToBack, Cadence::Spaced(spacing)] {
            let spacing = cadence.spacing();
            let (mut mqtt, mut gatt, mut commit) = (Vec::new(), Vec::new(), Vec::new());
            stages.take();
            let mut samples = Vec::with_capacity(WARM);
            let mut cpu_spent = std::collections::BTreeMap::new();
            for round in 0..ROUNDS {
                let cpu_before = cpu_ticks_by_process();
                for i in round * WARM / ROUNDS..(round + 1) * WARM / ROUNDS {
                    if i % 200 == 0 {
                        refill().await;
                    }
                    let t = tokio::time::Instant::now();
                    samples.push(send(i).await);
                    if let Some(spacing) = spacing {
                        tokio::time::sleep_until(t + spacing).await;
                    }
                }
                add_cpu(&mut cpu_spent, &cpu_before, &cpu_ticks_by_process());
                let Some(spacing) = spacing else {
                    mqtt.extend(floor_mqtt.sample(FLOOR_MQTT / ROUNDS).await);
                    gatt.extend(floor_gatt.sample(FLOOR_GATT / ROUNDS).await);
                    commit.extend(floor_commits.sample(FLOOR_COMMITS / ROUNDS));
                    continue;
                };
                // Spaced, the three parts run as one chain from an idle machine, in the order
                // a command needs them, one chain per interval: like a command, a chain wakes
                // the machine once and then finds it awake.
                for _ in 0..FLOOR_CHAINS / ROUNDS {
                    let t = tokio::time::Instant::now();
                    mqtt.push(floor_mqtt.once().await);
                    commit.extend(floor_commits.sample(1));
                    gatt.extend(floor_gatt.sample(1).await);
                    tokio::time::sleep_until(t + spacing).await;
                }
            }
            // Records of the last commands may still be on their way through the log pipe:
            // those of the warm run are nearly all in, which is enough for medians.
            warm_runs.push(WarmRun {
                cadence,
                samples,
                floor: [median(mqtt), median(gatt), median(commit)],
                stages: stages.take(),
                cpu: cpu_per_command(&Default::default(), &cpu_spent, WARM),
            });
        }
        drop(floor_mqtt);
        floor_gatt.finish().await;
        refill().await;

        // Cold: the link dropped before each command (connect + session + command).
        let mut cold = Vec::with_capacity(COLD);
        let state_topic = format!("lockhub/v1/{GW}/lock/{lock}/state");
        for i in 0..COLD {
            let mut watch = app.watch();
            ctl.drop_link(&lock.to_string()).await.unwrap();
            wait_for(&mut watch, |t, j| t == state_topic && j["connected"] == false).await;
            cold.push(send(i).await);
        }

        // A lock-side event to the retained state on the broker.
        let mut to_state = Vec::with_capacity(EVENTS);
        refill().await;
        send(1).await; // locked, link up
        for i in 0..EVENTS {
            let mut watch = app.watch();
            let want = if i % 2 == 0 { "unlocked" } else { "locked" };
            let t = Instant::now();
            ctl.turn_knob(&lock.to_string()).await.unwrap();
            wait_for(&mut watch, |topic, j| topic == state_topic && j["state"] == want).await;
            to_state.push(t.elapsed());
        }
        let (_, peak_rss, _, _) = memory_kib(daemon.0.id());

        // What the floor's MQTT part costs in CPU, on its own.
        let floor_cpu_before = cpu_ticks_by_process();
        let mut floor_mqtt = support::floor::MqttRequestReply::start(&pki, broker.port(), GW).await;
        floor_mqtt.sample(FLOOR_MQTT).await;
        drop(floor_mqtt);
        let (floor_cpu, _) = cpu_per_command(&floor_cpu_before, &cpu_ticks_by_process(), FLOOR_MQTT);
        // The loopback (publish, delivered back to the same client: two hops) the floor used
        // before, printed for comparison.
        let loopback = median(support::floor::mqtt_round_trips(&pki, broker.port(), GW, 1_000).await);
        let motor = median(support::floor::gatt_motor_round_trips(1_000).await);

        println!("remote unlock, app → TLS broker → lockhub run → D-Bus → emulated lock (motor 0 ms) → app");
        let sent_at = sent_at.lock().unwrap();
        for run in &warm_runs {
            let [mqtt, gatt, commit] = run.floor;
            let floor = mqtt + gatt + commit;
            let ratio = |d: Duration| d.as_secs_f64() / floor.as_secs_f64();
            let mut sorted = run.samples.clone();
            sorted.sort();
            println!("  warm link, {} ({WARM}): {}", run.cadence, percentiles(run.samples.clone()));
            println!(
                "    floor (same run, same cadence): {floor:.1?} = MQTT request/reply {mqtt:.1?} + GATT round trip {gatt:.1?} + durable commit {commit:.1?}"
            );
            println!(
                "    warm / floor: p50 {:.2}x  p99 {:.2}x   (targets: 1.5x, 3x)",
                ratio(at(&sorted, 0.5)),
                ratio(at(&sorted, 0.99))
            );
            println!(
                "    inside the gateway, from the link receiving the command (medians): {}",
                stage_medians(&run.stages)
            );
            println!("    each step's own time, p50/p99: {}", step_tails(&run.stages, &sent_at));
            if run.cadence != Cadence::BackToBack {
                continue;
            }
            let old_floor = loopback + gatt + commit;
            let old_ratio = |d: Duration| d.as_secs_f64() / old_floor.as_secs_f64();
            println!(
                "    (with the two-hop MQTT loopback {loopback:.1?} instead: floor {old_floor:.1?}, p50 {:.2}x, p99 {:.2}x)",
                old_ratio(at(&sorted, 0.5)),
                old_ratio(at(&sorted, 0.99))
            );
            let (cpu, cpu_total_us) = &run.cpu;
            println!("    CPU time per command (all its threads, this machine): {cpu}");
            // One command at a time, each leaving when the previous one's reply is in: the CPU
            // the run spent (every process, trailing work included) cannot have been spent
            // faster than on all cores at once, so the mean command took at least that share
            // of it. However the work is scheduled, only spending less CPU per command lowers
            // this bound.
            let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
            let bound = Duration::from_secs_f64(cpu_total_us / cores as f64 / 1e6);
            let mean = run.samples.iter().sum::<Duration>() / WARM as u32;
            println!(
                "    this machine's bound: {cpu_total_us:.0} µs of CPU per command on {cores} cores → a back-to-back run averages at least {bound:.1?} ({:.2}x the floor); this one averaged {mean:.1?} ({:.2}x)",
                ratio(bound),
                ratio(mean)
            );
        }
        println!("  cold link ({COLD}): {}", percentiles(cold.clone()));
        println!("  the lock alone: an unlock or lock over GATT (motor 0 ms, two log entries pushed before the answer) {motor:.1?}, median");
        println!("  CPU time per MQTT request/reply of the floor (its two clients are this benchmark): {floor_cpu}");
        println!("lock-side event (thumb-turn) → retained state on the broker: {}", percentiles(to_state));
        println!("  the first command after the daemon gave memory back while quiet: {first_after_quiet:.1?}");
        let mib = |kib: u64| kib as f64 / 1024.0;
        println!(
            "lockhub run memory: idle with {LOCKS} paired locks {:.1} MiB RSS ({:.1} MiB heap and stacks, {:.1} MiB mapped code and libraries; PSS {:.1} MiB; given back {:.1?} after the last command, {:.1} MiB before); peak during the run {:.1} MiB (target idle ≤ 8 MiB)",
            mib(idle_rss),
            mib(idle_anon),
            mib(idle_file),
            mib(idle_pss),
            quiet_after,
            mib(busy_rss),
            mib(peak_rss)
        );
        daemon.stop();
    });
}
