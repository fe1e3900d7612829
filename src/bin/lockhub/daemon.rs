//! `lockhub run`: the gateway daemon — the hub (`lockhub::hub`) on BlueZ and the kernel's
//! clock — and its life under systemd.
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

use anyhow::{Context, Result};
use lockhub::ble::bluez::BluezTransport;
use lockhub::config::Config;
use lockhub::hub::{HubBuilder, TimeSource};
use tokio::signal::unix::{SignalKind, signal};

use crate::service;

/// Threads in the blocking pool at most (see `run`); the unit's `TasksMax=48` counts them.
const BLOCKING_THREADS: usize = 16;
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
    // The blocking pool is bounded (tokio's default is 512 threads): its work mostly waits on
    // the store's one connection, so more threads would only queue there, and the unit's
    // TasksMax= must hold with room to spare.
    let runtime =
        tokio::runtime::Builder::new_current_thread().max_blocking_threads(BLOCKING_THREADS).enable_all().build()?;
    runtime.block_on(serve(config_path, config))
}

async fn serve(config_path: &Path, mut config: Config) -> Result<()> {
    // Signals first: a SIGTERM during start-up must not kill the process mid-write.
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let radios = BluezTransport::open_radios(&config.ble).await.context("opening BlueZ")?;
    let time = TimeSource::System { synchronised: kernel_synchronised };
    let hub = HubBuilder::new(config.clone(), radios, time).start().await?;
    tokio::spawn(crate::quiet::run(hub.store().clone(), hub.stopping()));
    let clock = hub.clock().clone();
    service::start(service::Health {
        link: hub.cloud(),
        brokers: hub.brokers(),
        clock_synchronised: Box::new(move || clock().1),
        store: hub.store().clone(),
    });
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
                match reload(config_path) {
                    Ok(new) => {
                        for key in hub.reload(&config, &new) {
                            tracing::warn!(key, "changed in the configuration: takes effect at the next restart");
                        }
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
    hub.stop().await;
    Ok(())
}

/// Reads and checks the configuration again.
fn reload(path: &Path) -> Result<Config> {
    let new = Config::load(path)?;
    new.check_files(path)?;
    Ok(new)
}
