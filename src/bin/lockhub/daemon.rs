//! `lockhub run`: the gateway daemon, wired from its configuration — store, BlueZ transport,
//! per-lock tasks, policy, intake, cloud link, radio watch — and its life under systemd.
//!
//! - Ready (systemd notify) once the store answers and the locks' tasks run; the cloud may
//!   still be unreachable, which is how the gateway works offline.
//! - SIGHUP reloads the configuration: the policy limits and the clock requirement change at
//!   once; keys that only a restart can apply are named in the log. No link is dropped. A
//!   broken file is refused and the running configuration kept.
//! - With `[local.mqtt]`, the local bridge (Home Assistant, local commands) runs beside the
//!   cloud link, on its own connection.
//! - SIGTERM (or Ctrl-C) stops in order: no new statements are taken (unacknowledged ones are
//!   redelivered after the restart), the commands in flight finish (bounded), the locks' tasks
//!   record what they read and let go of their locks (bounded), the cloud link sends what the
//!   outbox holds (bounded), says `offline` and disconnects.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use lockhub::ble::bluez::BluezTransport;
use lockhub::cloud::link::CloudLink;
use lockhub::config::Config;
use lockhub::gateway::clock::system_clock;
use lockhub::gateway::intake::{self, Intake};
use lockhub::gateway::statements::Gateway;
use lockhub::store::{Store, StoreConfig, unix_now};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, mpsc, watch};

use crate::service;

/// How long the commands in flight may take to finish when stopping. A command's own
/// deadline is at most 60 s away, but systemd's stop timeout (90 s by default) must cover
/// this, the outbox flush and the disconnect.
const FINISH_IN_FLIGHT: Duration = Duration::from_secs(20);

/// How long the locks' tasks may take, once the commands are done, to record what they were
/// reading and let go of their locks (an unreachable lock's connection attempt gives up within
/// seconds).
const STOP_LOCKS: Duration = Duration::from_secs(5);

/// Whether the kernel says the clock is synchronised (`adjtimex(2)`, read-only).
pub fn kernel_synchronised() -> bool {
    // SAFETY: adjtimex with `modes = 0` only reads the kernel's state into a zeroed struct we
    // own; nothing is kept.
    let (state, status) = unsafe {
        let mut tx: libc::timex = std::mem::zeroed();
        let state = libc::adjtimex(&mut tx);
        (state, tx.status)
    };
    state >= 0 && state != libc::TIME_ERROR && status & libc::STA_UNSYNC == 0
}

/// Opens the store of `config`, creating the gateway's identity on first start.
pub fn open_store(config: &Config) -> Result<Store> {
    let dir = &config.gateway.state_dir;
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        // Private, whatever the umask (systemd's StateDirectoryMode= says the same).
        if dir.exists() && !dir.is_dir() {
            anyhow::bail!(
                "gateway.state_dir = {}: not a directory: point it at a directory (the package's is /var/lib/lockhub)",
                dir.display()
            );
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the state directory {}", dir.display()))?;
        let mode = std::fs::metadata(dir)
            .with_context(|| format!("the state directory {}", dir.display()))?
            .permissions()
            .mode()
            & 0o7777;
        if mode & 0o077 != 0 {
            tracing::warn!(dir = %dir.display(), mode = format!("{mode:04o}"), "tightening to 0700");
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(|| {
                format!(
                    "the state directory {} is mode {mode:04o}, open to others, and cannot be made 0700",
                    dir.display()
                )
            })?;
        }
    }
    let mut store = Store::open(StoreConfig::in_dir(dir)).context("opening the store")?;
    let id = config.gateway_id();
    if let Some(existing) = store.gateway_identity()?
        && existing != id
    {
        anyhow::bail!(
            "{} belongs to gateway {existing}, but the configuration says {id}: point gateway.state_dir elsewhere or fix gateway.id",
            dir.display()
        );
    }
    store.transaction(|tx| tx.set_gateway_identity(&id, unix_now()))?;
    Ok(store)
}

/// Runs the daemon until a stop signal.
pub fn run(config_path: &Path) -> Result<()> {
    let config = Config::load(config_path)?;
    config.check_files(config_path)?;
    // One thread runs every task; the store's durable commits that are off a command's path
    // (outcomes, lock reports, the outbox's bookkeeping) run on the blocking pool. A command
    // passes through five tasks (link, intake, statements, the lock's task, back to the link):
    // with two workers, every hand-off could wake the other worker to steal it, and the
    // remote-unlock benchmark measured the daemon's CPU per command 15% lower (640 against
    // 740-790 µs) and a command's time inside the gateway ~60 µs shorter on one thread. The
    // work between hand-offs is tens of microseconds; nothing here needs a second core.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(serve(config_path, config))
}

async fn serve(config_path: &Path, mut config: Config) -> Result<()> {
    // Signals first: a SIGTERM during start-up must not kill the process mid-write.
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let id = config.gateway_id();
    let mut store = open_store(&config)?;
    let checkpoints =
        lockhub::store::checkpoint::Checkpoints::hand_off(&mut store).context("opening the store's checkpointer")?;
    let deletions = checkpoints.debt();
    if let Some(code) = lockhub::gateway::claim::claim_code(&mut store)? {
        tracing::info!(claim_code = code.as_str(), "this gateway has no owner yet: claim it with this code");
    }
    let store = Arc::new(Mutex::new(store));
    let outbox_ready = Arc::new(Notify::new());
    let (inbound_tx, inbound) = mpsc::channel(64);
    let (link, reports) =
        CloudLink::new(config.cloud_config(), id.clone(), store.clone(), outbox_ready.clone(), inbound_tx)?;
    let radios = BluezTransport::open_radios(&config.ble).await.context("opening BlueZ")?;
    let require_sync = Arc::new(AtomicBool::new(config.clock.require_sync));
    let clock = system_clock(require_sync.clone(), kernel_synchronised);
    if !clock().1 {
        tracing::warn!("the clock has not been synchronised yet: remote commands are refused until it is");
    }
    let gateway = Gateway::new(
        id.clone(),
        store.clone(),
        outbox_ready.clone(),
        radios,
        config.ble.clone(),
        config.policy,
        clock.clone(),
    );
    gateway.send_replies_through(link.express_lane());
    // The local bridge hears every lock update from the start: subscribed before the locks run.
    let local = match &config.local.mqtt {
        Some(_) => Some((
            lockhub::local::bridge::LocalBridge::new(&config.local, gateway.clone(), &id)
                .context("starting local MQTT")?,
            gateway.updates(),
        )),
        None => None,
    };
    let control_group = lockhub::control::peer::AdminGroup::load(&config.control.group);
    if control_group.gid.is_none() {
        tracing::warn!(group = %config.control.group, "no such group: only root can use the control socket");
    }
    if let Some(dir) = config.control.socket.parent() {
        // systemd's RuntimeDirectory= makes it; by hand, it may be missing.
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let control_listener = lockhub::control::server::bind(&config.control.socket, &control_group)
        .with_context(|| format!("creating the control socket {}", config.control.socket.display()))?;
    let control = lockhub::control::server::ControlServer::new(
        gateway.clone(),
        store.clone(),
        reports.state.clone(),
        control_group,
        clock.clone(),
        &config.control.socket,
    )
    .reporting_deletions(deletions);
    let control_updates = gateway.updates();
    gateway.start_locks()?;
    let (stop, stopped) = watch::channel(false);
    let (accepted_tx, accepted) = mpsc::channel(64);
    let intake = Intake::new(store.clone(), id.clone(), outbox_ready);
    let (stop_intake, mut intake_stopped) = watch::channel(false);
    tokio::spawn(async move {
        // Dropping the intake drops its channels: deliveries not yet noted stay unacknowledged
        // and come again after the restart; the gateway sees its input end.
        tokio::select! {
            () = intake::serve(intake, inbound, accepted_tx, unix_now) => {}
            () = lockhub::stop::requested(&mut intake_stopped) => {}
        }
    });
    let statements = tokio::spawn(gateway.clone().serve(accepted));
    tokio::spawn(lockhub::gateway::radio_watch::watch_radios(
        gateway.clone(),
        lockhub::gateway::radio_watch::BUS_CHECK,
        stopped.clone(),
    ));
    let local_task =
        local.map(|(bridge, updates)| tokio::spawn(bridge.run(updates, reports.state.clone(), stopped.clone())));
    tokio::spawn(control.run(control_listener, control_updates, stopped.clone()));
    tokio::spawn(lockhub::gateway::maintenance::run(store.clone(), clock.clone(), stopped.clone()));
    tokio::spawn(crate::quiet::run(store.clone(), stopped.clone()));
    tokio::spawn(checkpoints.run(stopped.clone()));
    let link_task = tokio::spawn(link.run(stopped));
    let locks = gateway.clone();
    service::start(service::Health {
        link: reports.state.clone(),
        brokers: config.cloud.brokers.len(),
        locks: Box::new(move || locks.lock_count()),
        clock_synchronised: Box::new(move || clock().1),
        store: store.clone(),
    });
    tracing::info!(gateway = %id, "lockhub running");
    match crate::text_pages::trim() {
        Ok(kib) => tracing::debug!(resident_kib = kib, "start-up code handed back"),
        Err(e) => tracing::debug!(error = %e, "could not advise the kernel on the daemon's code pages"),
    }
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = hup.recv() => {
                service::reloading();
                match reload(config_path, &config) {
                    Ok(new) => {
                        gateway.set_policy_limits(new.policy);
                        require_sync.store(new.clock.require_sync, Ordering::Release);
                        config = new;
                        tracing::info!(config = %config_path.display(), "configuration reloaded");
                    }
                    Err(e) => tracing::error!(error = %e, "configuration not reloaded; the running one stays"),
                }
                service::reloaded();
            }
        }
    }
    tracing::info!("stopping");
    service::stopping();
    let _ = stop_intake.send(true);
    if tokio::time::timeout(FINISH_IN_FLIGHT, statements).await.is_err() {
        tracing::warn!("commands still running after {FINISH_IN_FLIGHT:?}: stopping without their replies");
    }
    if !gateway.stop_locks(STOP_LOCKS).await {
        tracing::warn!("locks' tasks still busy after {STOP_LOCKS:?}: stopping without what they were reading");
    }
    // Refusals the audit budget counted are written before the count goes with the process.
    let counted = store.clone();
    let written = tokio::task::spawn_blocking(move || {
        counted.lock().unwrap_or_else(std::sync::PoisonError::into_inner).write_counted_audit(unix_now())
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        tracing::error!("could not write the audit's count of refusals not recorded one by one");
    }
    let _ = stop.send(true);
    let _ = tokio::time::timeout(lockhub::cloud::link::FLUSH_TIMEOUT + Duration::from_secs(3), link_task).await;
    if let Some(local) = local_task {
        let _ = tokio::time::timeout(Duration::from_secs(3), local).await;
    }
    Ok(())
}

/// Reads the configuration again; returns it if it can be applied without a restart, after
/// logging which of its changes need one.
fn reload(path: &Path, running: &Config) -> Result<Config> {
    let new = Config::load(path)?;
    new.check_files(path)?;
    for key in running.restart_needed(&new) {
        tracing::warn!(key, "changed in the configuration: takes effect at the next restart");
    }
    Ok(new)
}
