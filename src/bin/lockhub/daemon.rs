//! `lockhub run`: the gateway daemon, wired from its configuration — store, BlueZ transport,
//! per-lock tasks, policy, intake, cloud link, radio watch — until SIGTERM or Ctrl-C, then a
//! clean stop (the cloud link says `offline` and flushes what it can).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use lockhub::ble::bluez::BluezTransport;
use lockhub::cloud::link::{CloudLink, LinkState};
use lockhub::config::Config;
use lockhub::gateway::clock::system_clock;
use lockhub::gateway::intake::{self, Intake};
use lockhub::gateway::statements::Gateway;
use lockhub::store::{Store, StoreConfig, unix_now};
use tokio::sync::{Notify, mpsc, watch};

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
    std::fs::create_dir_all(dir).with_context(|| format!("creating the state directory {}", dir.display()))?;
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
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> Result<()> {
    let id = config.gateway_id();
    let mut store = open_store(&config)?;
    if let Some(code) = lockhub::gateway::claim::claim_code(&mut store)? {
        tracing::info!(claim_code = code.as_str(), "this gateway has no owner yet: claim it with this code");
    }
    let store = Arc::new(Mutex::new(store));
    let outbox_ready = Arc::new(Notify::new());
    let (inbound_tx, inbound) = mpsc::channel(64);
    let (link, mut reports) =
        CloudLink::new(config.cloud_config(), id.clone(), store.clone(), outbox_ready.clone(), inbound_tx)?;
    let transport = Arc::new(BluezTransport::open(&config.ble).await.context("opening BlueZ")?);
    let clock = system_clock(config.clock.require_sync, kernel_synchronised);
    if !clock().1 {
        tracing::warn!("the clock has not been synchronised yet: remote commands are refused until it is");
    }
    let gateway = Gateway::new(
        id.clone(),
        store.clone(),
        outbox_ready.clone(),
        transport.clone(),
        config.ble.clone(),
        config.policy,
        clock,
    );
    gateway.start_locks()?;
    let (stop, stopped) = watch::channel(false);
    let (accepted_tx, accepted) = mpsc::channel(64);
    tokio::spawn(intake::serve(Intake::new(store.clone(), id.clone(), outbox_ready), inbound, accepted_tx, unix_now));
    tokio::spawn(gateway.clone().serve(accepted));
    tokio::spawn(lockhub::gateway::radio_watch::watch_advertisements(transport, gateway, stopped.clone()));
    let link_task = tokio::spawn(link.run(stopped));
    tokio::spawn(async move {
        let mut up = false;
        while reports.state.changed().await.is_ok() {
            let now_up = matches!(*reports.state.borrow(), LinkState::Connected(_));
            if now_up != up {
                up = now_up;
                // The daemon's readiness line (systemd notify comes with packaging).
                if up {
                    tracing::info!("connected to the cloud");
                }
            }
        }
    });
    tracing::info!(gateway = %id, "lockhub running");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping");
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), link_task).await;
    Ok(())
}
