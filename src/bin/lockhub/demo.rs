//! `lockhub demo`: the whole system on one machine, scripted, with a transcript.
//!
//! A private D-Bus bus (`dbus-daemon` started here in a temporary directory, or busd inside this
//! process where no dbus-daemon is installed: `private_bus.rs`) carries the emulated locks'
//! `org.bluez`; the bundled broker runs in this process with a fresh PKI and mutual TLS; the
//! hub is the one `lockhub run` assembles (`lockhub::hub`: store, cloud link, intake, policy,
//! per-lock tasks over bluer, control socket), on the private bus; the app stand-in signs
//! statements with its own keys. Nothing listens beyond 127.0.0.1, nothing outlives the run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lockhub::auth::statement::{Operation, Permission, Statement};
use lockhub::ble::bluez::BluezTransport;
use lockhub::cloud::link::LinkState;
use lockhub::cloud::reply::{Outcome, Reply};
use lockhub::config::{Config, GatewaySection};
use lockhub::devcloud::app::{AppClient, AppKey, claim, command, grant, new_id, pair, remote_unlock};
use lockhub::devcloud::broker::{Broker, BrokerConfig};
use lockhub::devcloud::pki::Pki;
use lockhub::firmware::bluez::control::EmulatorProxy;
use lockhub::firmware::bluez::{BluezEmulator, LockSpec};
use lockhub::hub::{HubBuilder, TimeSource};
use lockhub::protocol::ids::LockId;
use lockhub::protocol::message::{Actor, Op, Passcode};
use lockhub::standard_streams::{self, OutputError};
use lockhub::store::unix_now;
use tokio::sync::watch;

use crate::private_bus::PrivateBus;

const GATEWAY: &str = "demo-gw";
const WAIT: Duration = Duration::from_secs(30);
const KEYPAD_CODE: &str = "2468";

/// The run's temporary directory, removed however the run ends.
struct Scratch {
    dir: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the demo.
pub fn run(locks: u8) -> Result<()> {
    let name = format!("lockhub-demo-{}", std::process::id());
    let mut dir = std::env::temp_dir().join(&name);
    if let Some(why) = PrivateBus::unusable_in(&dir) {
        lockhub::outln!(
            "lockhub demo: the temporary directory will not do for the private bus ({why}); using /tmp instead."
        )?;
        dir = Path::new("/tmp").join(&name);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let scratch = Scratch { dir: dir.clone() };
    // SAFETY: no other thread exists yet (the bus and the runtime start below); libdbus reads
    // the variable when bluer first connects.
    unsafe { std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", PrivateBus::address_in(&dir)) };
    let bus = PrivateBus::start(&dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = runtime.block_on(script(&dir, &bus, locks));
    runtime.shutdown_timeout(Duration::from_secs(2));
    drop(bus);
    drop(scratch);
    result
}

/// The transcript, on standard output. With its reader gone the story still runs to its end,
/// so that it cleans up after itself; any other failure to write fails the demo at the end.
struct Transcript {
    step: usize,
    failed: Option<OutputError>,
}

impl Transcript {
    fn say(&mut self, text: std::fmt::Arguments<'_>) {
        if self.failed.is_none()
            && let Err(e) = standard_streams::line(text)
        {
            self.failed = Some(e);
        }
    }

    /// A numbered step: what was done, what came of it, how long it took.
    fn line(&mut self, what: &str, result: &str, took: Duration) {
        self.step += 1;
        let ms = took.as_secs_f64() * 1000.0;
        let step = self.step;
        self.say(format_args!("{step:>2}  {what:<62} {result:<44} {ms:>8.1} ms"));
    }

    fn note(&mut self, text: &str) {
        self.say(format_args!("    {text}"));
    }

    fn finish(self) -> Result<()> {
        self.failed.map_or(Ok(()), |e| Err(e.into()))
    }
}

fn describe(reply: &Reply) -> String {
    match (reply.result, reply.reason) {
        (Outcome::Ok, _) => format!("ok ({})", reply.detail.as_deref().unwrap_or("")),
        (result, Some(reason)) => format!("{result:?}: {reason}").to_lowercase(),
        (result, None) => format!("{result:?}").to_lowercase(),
    }
}

async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let start = Instant::now();
    let out = f.await;
    (out, start.elapsed())
}

async fn script(dir: &Path, private_bus: &PrivateBus, locks: u8) -> Result<()> {
    let bus = private_bus.address.as_str();
    let mut t = Transcript { step: 0, failed: None };
    let total = Instant::now();

    // The locks, behind org.bluez on the private bus. Their flash stays in memory: a real
    // lock's is a chip of its own, and on this machine's disk its saves would compete with the
    // gateway's commits, whose latency the transcript shows.
    let emulator = BluezEmulator::serve(bus, None).await.context("serving the emulated locks")?;
    let mut lock_ids = Vec::new();
    for i in 0..locks {
        let spec = LockSpec { lock_id: format!("4c48de{:010x}", u64::from(i) + 1), motor_ms: 0, ..LockSpec::default() };
        lock_ids.push(emulator.add_lock(spec).await?);
    }
    let control = EmulatorProxy::new(&zbus::connection::Builder::address(bus).build().await?).await?;

    // The cloud: a fresh PKI, the broker with mutual TLS and ACLs, the event sink.
    let pki = Pki::init(&dir.join("pki"), &[GATEWAY]).context("creating the PKI")?;
    let broker =
        Broker::bind(BrokerConfig::from_pki(&pki, "127.0.0.1:0".parse()?, Some(dir.join("events.db")))).await?;
    let port = broker.local_addr().port();
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(broker.run(stopped.clone()));
    let broker_url = format!("mqtts://localhost:{port}");

    // The gateway: the hub `lockhub run` assembles, on the private bus's BlueZ. This
    // machine's clock is taken as synchronised for the demo; the daemon checks.
    let mut config = Config::new(
        GatewaySection { id: GATEWAY.into(), state_dir: dir.join("state") },
        pki.cloud_section(GATEWAY, vec![broker_url.clone()]),
    );
    config.clock.require_sync = false;
    config.control.socket = dir.join("control.sock");
    let radios = BluezTransport::open_radios(&config.ble).await.context("opening BlueZ on the private bus")?;
    let hub = HubBuilder::new(config, radios, TimeSource::System { synchronised: || false }).start().await?;
    let gw = hub.id().clone();
    let store = hub.store().clone();
    tokio::time::timeout(WAIT, hub.cloud().wait_for(|s| matches!(s, LinkState::Connected(_))))
        .await
        .context("the gateway did not reach the broker")??;

    t.say(format_args!("lockhub demo: everything runs on this machine, nothing needs root."));
    t.say(format_args!("  broker   {broker_url} (mutual TLS, per-gateway ACLs; PKI made just now)"));
    let bus_path = bus.trim_start_matches("unix:path=");
    t.say(format_args!("  bus      {}, private, at {bus_path}", private_bus.kind()));
    t.say(format_args!("  locks    {} emulated, serving org.bluez on that bus", lock_ids.len()));
    t.say(format_args!("  gateway  {GATEWAY}: the hub `lockhub run` starts, one task per lock over bluer"));
    t.say(format_args!("  app      owner and user keys made just now; statements signed as JWS (EdDSA)"));
    t.say(format_args!(""));
    t.say(format_args!("    {:<62} {:<44} {:>11}", "step", "result", "latency"));

    let keys = dir.join("app");
    let (owner, user) = (AppKey::generate(&keys, "owner", false)?, AppKey::generate(&keys, "user", false)?);
    let app = AppClient::connect(&broker_url, &pki, &gw).await?;
    let now = unix_now();

    // Claim.
    let code = lockhub::gateway::claim::claim_code(&mut store.lock().expect("store"))?.context("already claimed")?;
    t.note(&format!("the gateway shows its one-time claim code: {}", code.as_str()));
    let claim = claim(&gw, code.as_str(), now);
    let (reply, took) = timed(app.send(&claim, &owner, WAIT)).await;
    t.line("owner claims the gateway with the code", &describe(&reply?), took);

    // Pair every lock.
    for id in &lock_ids {
        let report: serde_json::Value = serde_json::from_str(&control.lock_state(&id.to_string()).await?)?;
        let setup = report["setup_code"].as_str().context("no setup code")?.to_owned();
        let pair = pair(&gw, *id, &setup, now);
        let (reply, took) = timed(app.send(&pair, &owner, WAIT)).await;
        t.line(&format!("owner pairs lock {id} with the code on its label"), &describe(&reply?), took);
    }
    let lock: LockId = lock_ids[0];

    // Grant, and remote unlock on.
    let perms = vec![Permission::Lock, Permission::Unlock, Permission::Remote];
    let grant = Statement::Grant(grant(&gw, user.public(), lock, perms, None, 1, now));
    let (reply, took) = timed(app.send(&grant, &owner, WAIT)).await;
    t.line("owner grants the user lock + unlock + remote", &describe(&reply?), took);
    let cmd = |op| Statement::Command(command(&gw, lock, op, unix_now(), 30));
    let (reply, took) = timed(app.send(&cmd(Operation::Unlock), &user, WAIT)).await;
    t.line("user unlocks remotely (remote unlock still off)", &describe(&reply?), took);
    let policy = remote_unlock(&gw, lock, true, now);
    let (reply, took) = timed(app.send(&policy, &owner, WAIT)).await;
    t.line("owner turns remote unlock on for the lock", &describe(&reply?), took);

    // The remote unlock, and its state on the broker.
    let mut seen = app.watch();
    let unlock = cmd(Operation::Unlock);
    let text = unlock.sign(&user.key);
    let start = Instant::now();
    let reply = app.send_text(unlock.id().as_str(), text.clone(), WAIT).await?;
    t.line("user unlocks remotely: app → broker → gateway → lock → app", &describe(&reply), start.elapsed());
    let state_topic = format!("lockhub/v1/{gw}/lock/{lock}/state");
    wait_for(&mut seen, |topic, json| topic == state_topic && json["state"] == "unlocked").await?;
    t.line("  … the lock's retained state on the broker says unlocked", "ok", start.elapsed());
    let (reply, took) = timed(app.send(&cmd(Operation::Lock), &user, WAIT)).await;
    t.line("user locks remotely", &describe(&reply?), took);

    // A keypad unlock at the door, reported by the lock itself.
    let handle = hub.gateway().lock(lock).context("no task for the lock")?;
    handle
        .execute(
            Op::AddPasscode { code: Passcode::new(KEYPAD_CODE)?, valid_from: None, valid_until: None },
            Actor::Admin,
        )
        .await
        .ok();
    let mut seen = app.watch();
    let events_topic = format!("lockhub/v1/{gw}/events");
    let start = Instant::now();
    if !control.enter_keypad_code(&lock.to_string(), KEYPAD_CODE).await? {
        bail!("the keypad refused the demo's passcode");
    }
    let event = wait_for(&mut seen, |topic, json| {
        topic == events_topic && json["cause"] == "keypad" && json["state"] == "unlocked"
    })
    .await?;
    t.line(
        "someone types a passcode on the lock's keypad",
        &format!("event: {} by keypad slot {}", event["state"].as_str().unwrap_or("?"), event["actor"]["slot"]),
        start.elapsed(),
    );

    // What the gateway refuses.
    let (reply, took) = timed(app.send_text(unlock.id().as_str(), text.clone(), WAIT)).await;
    t.line("the same unlock delivered again", &format!("{}, stored reply: not run again", describe(&reply?)), took);
    let replay = match &unlock {
        Statement::Command(c) => Statement::Command(lockhub::auth::statement::Command {
            nonce: new_id("n").as_str().replace(['.', '-'], "_"),
            ..c.clone()
        }),
        _ => unreachable!("a command"),
    };
    let (reply, took) = timed(app.send(&replay, &user, WAIT)).await;
    t.line("a replay: the same command id, re-signed", &describe(&reply?), took);
    let stale = Statement::Command(command(&gw, lock, Operation::Unlock, unix_now() - 120, 30));
    let (reply, took) = timed(app.send(&stale, &user, WAIT)).await;
    t.line("an expired command (issued 2 minutes ago)", &describe(&reply?), took);
    let stranger = AppKey::generate(&keys, "stranger", false)?;
    let (reply, took) = timed(app.send(&cmd(Operation::Unlock), &stranger, WAIT)).await;
    t.line("someone with no grant", &describe(&reply?), took);

    // Each reply leaves while its audit record commits: the chain is read once the last
    // reply's outbox record is delivered (deleted after its commit), so that it holds them all.
    let mut delivered = hub.delivered();
    tokio::time::timeout(WAIT, async {
        while store.lock().expect("store").outbox_len()? > 0 {
            if delivered.changed().await.is_err() {
                break;
            }
        }
        Ok::<_, lockhub::store::StoreError>(())
    })
    .await
    .context("the last replies were not delivered")??;
    let verified = store.lock().expect("store").verify_audit()?;
    t.say(format_args!(""));
    let verified = match verified {
        lockhub::store::AuditVerification::Intact { records } => format!("{records} records, intact"),
        broken => format!("{broken:?}"),
    };
    t.say(format_args!("audit chain: {verified}. The demo took {:.2} s.", total.elapsed().as_secs_f64()));
    // In the daemon's order: the locks' tasks let go of their locks before the locks go away
    // (a task still recording then would have its store work cancelled with the runtime).
    hub.stop().await;
    let _ = stop.send(true);
    emulator.shutdown().await;
    t.finish()
}

/// Waits for a JSON message on the gateway's topics that `want` accepts.
async fn wait_for(
    seen: &mut tokio::sync::broadcast::Receiver<lockhub::devcloud::app::Seen>,
    want: impl Fn(&str, &serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    tokio::time::timeout(WAIT, async {
        loop {
            let msg = seen.recv().await.context("the app's connection ended")?;
            if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&msg.payload)
                && want(&msg.topic, &json)
            {
                return Ok(json);
            }
        }
    })
    .await
    .context("nothing arrived within 30 s")?
}
