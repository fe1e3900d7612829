//! The hub, assembled in one place: the store and its checkpointer, the cloud link, the intake,
//! the gateway core and its locks' tasks, the radio watch, maintenance, the control socket and,
//! with `[local.mqtt]`, the local bridge; started from a configuration plus what only the
//! caller can give (the radios, the time source), and stopped in order.
//!
//! `lockhub run`, `lockhub demo` and the integration tests all start their hub here, so what
//! the tests exercise is what the package runs. What stays with the daemon is what only a
//! service has: signals, systemd notification, journald.
//!
//! The order of [`Hub::stop`]: no new statements are taken (unacknowledged ones are
//! redelivered after a restart), the commands in flight finish (bounded), the locks' tasks
//! record what they read and let go of their locks (bounded), the audit's counted refusals are
//! written, and the cloud link sends what the outbox holds (bounded), says `offline` and
//! disconnects; the local bridge says `offline` too.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use crate::ble::LockTransport;
use crate::ble::radios::Radios;
use crate::cloud::link::{CloudError, CloudLink, FLUSH_TIMEOUT, InboundCommand, LinkReports, LinkState};
use crate::config::Config;
use crate::control::peer::AdminGroup;
use crate::control::server::ControlServer;
use crate::gateway::clock::system_clock;
use crate::gateway::intake::{self, Intake};
use crate::gateway::lock_worker::LockUpdate;
use crate::gateway::radio_watch;
use crate::gateway::{Clock, Gateway};
use crate::local::bridge::{BridgeError, LocalBridge};
use crate::protocol::ids::GatewayId;
use crate::store::checkpoint::{Checkpoints, LogDebt};
use crate::store::{Store, StoreConfig, StoreError, unix_now};

/// How long the commands in flight may take to finish when stopping. A command's own deadline
/// is at most 60 s away, but systemd's stop timeout (90 s by default) must cover this, the
/// outbox flush and the disconnect.
pub const FINISH_IN_FLIGHT: Duration = Duration::from_secs(20);

/// How long the locks' tasks may take, once the commands are done, to record what they were
/// reading and let go of their locks (an unreachable lock's connection attempt gives up within
/// seconds).
pub const STOP_LOCKS: Duration = Duration::from_secs(5);

/// How long the local bridge and the control server may take to say goodbye.
const STOP_EDGES: Duration = Duration::from_secs(3);

/// Why the hub did not start.
#[derive(Debug, Error)]
pub enum HubError {
    /// `gateway.state_dir` names something that is not a directory.
    #[error("gateway.state_dir = {0}: not a directory: point it at a directory (the package's is /var/lib/lockhub)")]
    StateDirNotADirectory(PathBuf),
    /// The state directory could not be made or made private.
    #[error("the state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store belongs to another gateway.
    #[error(
        "{dir} belongs to gateway {existing}, but the configuration says {configured}: point gateway.state_dir elsewhere or fix gateway.id"
    )]
    OtherGateway {
        /// The state directory.
        dir: PathBuf,
        /// The gateway it belongs to.
        existing: GatewayId,
        /// The gateway the configuration names.
        configured: GatewayId,
    },
    /// The store did not open or answer.
    #[error("the store: {0}")]
    Store(#[from] StoreError),
    /// The cloud link's configuration does not load (broker URL, certificate, key).
    #[error("the cloud link: {0}")]
    Cloud(#[from] CloudError),
    /// The local bridge's configuration does not load (password file, CA, codes).
    #[error("starting local MQTT: {0}")]
    Local(#[from] BridgeError),
    /// The control socket could not be created.
    #[error("creating the control socket {path}: {source}")]
    ControlSocket {
        /// Where it should be.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Where the hub's time comes from.
pub enum TimeSource {
    /// The system clock, trusted for remote commands once `synchronised` first says so when
    /// `[clock] require_sync` is on (the daemon passes the kernel's `adjtimex` view).
    System {
        /// Whether the kernel says the clock is synchronised.
        synchronised: fn() -> bool,
    },
    /// A clock the caller keeps (a test's, shifted at will).
    Given(Clock),
}

impl std::fmt::Debug for TimeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TimeSource::System { .. } => "System",
            TimeSource::Given(_) => "Given",
        })
    }
}

/// Opens the store of `config`, creating the private state directory and, on first start, the
/// gateway's identity; refuses a store that belongs to another gateway.
pub fn open_store(config: &Config) -> Result<Store, HubError> {
    let dir = &config.gateway.state_dir;
    private_dir(dir)?;
    let mut store = Store::open(StoreConfig::in_dir(dir))?;
    let id = config.gateway_id();
    if let Some(existing) = store.gateway_identity()?
        && existing != id
    {
        return Err(HubError::OtherGateway { dir: dir.clone(), existing, configured: id });
    }
    store.transaction(|tx| tx.set_gateway_identity(&id, unix_now()))?;
    Ok(store)
}

/// Makes `dir` (mode 0700, whatever the umask; systemd's StateDirectoryMode= says the same),
/// or tightens an existing one open to others.
fn private_dir(dir: &Path) -> Result<(), HubError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let failed = |source| HubError::StateDir { path: dir.to_owned(), source };
    if dir.exists() && !dir.is_dir() {
        return Err(HubError::StateDirNotADirectory(dir.to_owned()));
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(failed)?;
    let mode = std::fs::metadata(dir).map_err(failed)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{mode:04o}"), "tightening to 0700");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(failed)?;
    }
    Ok(())
}

/// A hub about to start: the configuration and the outside parts.
#[derive(Debug)]
pub struct HubBuilder<T: LockTransport> {
    config: Config,
    radios: Radios<T>,
    time: TimeSource,
    reconnect: Option<(Duration, Duration)>,
    bus_check: Duration,
}

impl<T: LockTransport> HubBuilder<T> {
    /// A hub of `config` reaching its locks through `radios`, on `time`.
    pub fn new(config: Config, radios: Radios<T>, time: TimeSource) -> Self {
        HubBuilder { config, radios, time, reconnect: None, bus_check: radio_watch::BUS_CHECK }
    }

    /// How long the radio may stay silent before the radio watch asks whether the stack under
    /// it still answers, instead of [`radio_watch::BUS_CHECK`] (a test of a wedged bus should
    /// not wait half a minute).
    #[must_use]
    pub fn bus_check(mut self, silence: Duration) -> Self {
        self.bus_check = silence;
        self
    }

    /// The cloud link's reconnect backoff, first and longest delay, instead of 0.5 s to 60 s
    /// (a test that restarts its broker should not wait a minute).
    #[must_use]
    pub fn reconnect_backoff(mut self, first: Duration, longest: Duration) -> Self {
        self.reconnect = Some((first, longest));
        self
    }

    /// Starts everything; the hub runs until [`Hub::stop`] (or until it is dropped, which stops
    /// its tasks without waiting for them).
    pub async fn start(self) -> Result<Hub<T>, HubError> {
        let HubBuilder { config, radios, time, reconnect, bus_check } = self;
        let id = config.gateway_id();
        let mut store = open_store(&config)?;
        let checkpoints = Checkpoints::hand_off(&mut store)?;
        let log_debt = checkpoints.debt();
        // An owner claims the gateway through the cloud: without one, there is no code to show.
        if config.cloud.is_some()
            && let Some(code) = crate::gateway::claim::claim_code(&mut store)?
        {
            tracing::info!(claim_code = code.as_str(), "this gateway has no owner yet: claim it with this code");
        }
        let store = Arc::new(Mutex::new(store));
        let outbox_ready = Arc::new(Notify::new());
        let cloud = match config.cloud_config() {
            Some(mut cloud) => {
                if let Some((first, longest)) = reconnect {
                    cloud.min_backoff = first;
                    cloud.max_backoff = longest;
                }
                let (inbound_tx, inbound) = mpsc::channel(64);
                let (link, reports) =
                    CloudLink::new(cloud, id.clone(), store.clone(), outbox_ready.clone(), inbound_tx)?;
                CloudSide::Link { link: Box::new(link), inbound, reports }
            }
            None => {
                tracing::info!(
                    "no [cloud] in the configuration: this hub runs local only (Home Assistant, the control socket)"
                );
                CloudSide::None { state: watch::channel(LinkState::NotConfigured), delivered: watch::channel(0) }
            }
        };
        let (cloud_state, delivered) = match &cloud {
            CloudSide::Link { reports, .. } => (reports.state.clone(), reports.delivered.clone()),
            CloudSide::None { state, delivered } => (state.1.clone(), delivered.1.clone()),
        };
        let require_sync = Arc::new(AtomicBool::new(config.clock.require_sync));
        let clock = match time {
            TimeSource::System { synchronised } => system_clock(require_sync.clone(), synchronised),
            TimeSource::Given(clock) => clock,
        };
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
        if let CloudSide::Link { link, .. } = &cloud {
            gateway.send_replies_through(link.express_lane());
        }
        // The edges hear every lock update from the start: subscribed before the locks run.
        let local = match &config.local.mqtt {
            Some(_) => Some((LocalBridge::new(&config.local, gateway.clone(), &id)?, gateway.updates())),
            None => None,
        };
        let (control, control_listener, control_updates) =
            control_server(&config, &gateway, &store, &cloud_state, &clock)?;
        let control = control.reporting_deletions(log_debt.clone());
        gateway.start_locks()?;

        let (stop, stopped) = watch::channel(false);
        let (stop_intake, mut intake_stopped) = watch::channel(false);
        let (statements, link, kept) = match cloud {
            CloudSide::Link { link, inbound, .. } => {
                let (accepted_tx, accepted) = mpsc::channel(64);
                let intake = Intake::new(store.clone(), id.clone(), outbox_ready);
                tokio::spawn(async move {
                    // Dropping the intake drops its channels: deliveries not yet noted stay
                    // unacknowledged and come again after a restart; the gateway sees its
                    // input end.
                    tokio::select! {
                        () = intake::serve(intake, inbound, accepted_tx, unix_now) => {}
                        () = crate::stop::requested(&mut intake_stopped) => {}
                    }
                });
                let statements = tokio::spawn(gateway.clone().serve(accepted));
                (Some(statements), tokio::spawn((*link).run(stopped.clone())), None)
            }
            CloudSide::None { state, delivered } => {
                let emptied = tokio::spawn(empty_outbox(store.clone(), outbox_ready, delivered.0, stopped.clone()));
                (None, emptied, Some(state.0))
            }
        };
        tokio::spawn(radio_watch::watch_radios(gateway.clone(), bus_check, stopped.clone()));
        let local =
            local.map(|(bridge, updates)| tokio::spawn(bridge.run(updates, cloud_state.clone(), stopped.clone())));
        let control = tokio::spawn(control.run(control_listener, control_updates, stopped.clone()));
        tokio::spawn(crate::gateway::maintenance::run(store.clone(), clock.clone(), stopped.clone()));
        tokio::spawn(checkpoints.run(stopped.clone()));
        tracing::info!(gateway = %id, "lockhub running");
        Ok(Hub {
            id,
            gateway,
            store,
            clock,
            require_sync,
            cloud: cloud_state,
            _no_cloud: kept,
            delivered,
            log_debt,
            brokers: config.cloud.as_ref().map_or(0, |c| c.brokers.len()),
            control_socket: config.control.socket.clone(),
            stop,
            stopped,
            stop_intake,
            tasks: Some(Tasks { statements, link, local, control }),
        })
    }
}

/// Binds the control socket (making its directory if need be) and builds its server.
#[allow(clippy::type_complexity)]
fn control_server<T: LockTransport>(
    config: &Config,
    gateway: &Arc<Gateway<T>>,
    store: &Arc<Mutex<Store>>,
    link: &watch::Receiver<LinkState>,
    clock: &Clock,
) -> Result<(ControlServer<T>, tokio::net::UnixListener, broadcast::Receiver<LockUpdate>), HubError> {
    let path = &config.control.socket;
    let failed = |source| HubError::ControlSocket { path: path.clone(), source };
    let group = AdminGroup::load(&config.control.group);
    if group.gid.is_none() {
        tracing::warn!(group = %config.control.group, "no such group: only root and the daemon's user can use the control socket");
    }
    if let Some(dir) = path.parent() {
        // systemd's RuntimeDirectory= makes it; by hand, it may be missing.
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    let listener = crate::control::server::bind(path, &group).map_err(failed)?;
    let server = ControlServer::new(gateway.clone(), store.clone(), link.clone(), group, clock.clone(), path);
    Ok((server, listener, gateway.updates()))
}

/// The hub's side of the cloud: the link and what it receives, or nothing to talk to.
enum CloudSide {
    Link {
        link: Box<CloudLink>,
        inbound: mpsc::Receiver<InboundCommand>,
        reports: LinkReports,
    },
    None {
        state: (watch::Sender<LinkState>, watch::Receiver<LinkState>),
        delivered: (watch::Sender<u64>, watch::Receiver<u64>),
    },
}

/// Without a cloud, the outbox has no reader: what the gateway queues for one (its locks'
/// events and states) is deleted as it comes, and counted in `delivered`, until `stopped`.
async fn empty_outbox(
    store: Arc<Mutex<Store>>,
    ready: Arc<Notify>,
    delivered: watch::Sender<u64>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let store = store.clone();
        // A durable commit: on the blocking pool.
        let emptied = tokio::task::spawn_blocking(move || {
            let mut store = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut emptied = 0;
            loop {
                let ids: Vec<i64> = store.outbox_pending(256)?.iter().map(|r| r.id).collect();
                if ids.is_empty() {
                    return Ok::<_, StoreError>(emptied);
                }
                store.outbox_ack(&ids)?;
                emptied += ids.len() as u64;
            }
        })
        .await;
        match emptied {
            Ok(Ok(n)) if n > 0 => delivered.send_modify(|count| *count += n),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "could not empty the outbox (no cloud reads it)"),
            Err(_) => return,
        }
        tokio::select! {
            () = ready.notified() => {}
            () = crate::stop::requested(&mut stopped) => return,
        }
    }
}

/// The tasks [`Hub::stop`] waits for.
#[derive(Debug)]
struct Tasks {
    /// The gateway taking the cloud's statements (none without a cloud).
    statements: Option<JoinHandle<()>>,
    /// The cloud link, or what empties the outbox without one.
    link: JoinHandle<()>,
    local: Option<JoinHandle<()>>,
    control: JoinHandle<()>,
}

/// What [`Hub::stop`] managed within its bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stopped {
    /// The commands in flight finished and their replies were sent.
    pub commands_finished: bool,
    /// The locks' tasks recorded what they were reading and let go of their locks.
    pub locks_released: bool,
    /// The cloud link flushed the outbox (or gave up on an unreachable broker) and ended.
    pub link_closed: bool,
}

/// A running hub.
pub struct Hub<T: LockTransport> {
    id: GatewayId,
    gateway: Arc<Gateway<T>>,
    store: Arc<Mutex<Store>>,
    clock: Clock,
    require_sync: Arc<AtomicBool>,
    cloud: watch::Receiver<LinkState>,
    /// Without a cloud, the sender of its state (kept: its receivers would see it gone).
    _no_cloud: Option<watch::Sender<LinkState>>,
    delivered: watch::Receiver<u64>,
    log_debt: watch::Receiver<LogDebt>,
    brokers: usize,
    control_socket: PathBuf,
    stop: watch::Sender<bool>,
    stopped: watch::Receiver<bool>,
    stop_intake: watch::Sender<bool>,
    tasks: Option<Tasks>,
}

impl<T: LockTransport> std::fmt::Debug for Hub<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("id", &self.id)
            .field("control_socket", &self.control_socket)
            .finish_non_exhaustive()
    }
}

impl<T: LockTransport> Hub<T> {
    /// The gateway's id.
    pub fn id(&self) -> &GatewayId {
        &self.id
    }

    /// The gateway core (its locks, their updates, local commands).
    pub fn gateway(&self) -> &Arc<Gateway<T>> {
        &self.gateway
    }

    /// The store.
    pub fn store(&self) -> &Arc<Mutex<Store>> {
        &self.store
    }

    /// The clock remote commands are judged by: now, and whether it is trusted.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The cloud link's state.
    pub fn cloud(&self) -> watch::Receiver<LinkState> {
        self.cloud.clone()
    }

    /// How many brokers are configured.
    pub fn brokers(&self) -> usize {
        self.brokers
    }

    /// Outbox records the cloud link has delivered (acknowledged and deleted), counted.
    pub fn delivered(&self) -> watch::Receiver<u64> {
        self.delivered.clone()
    }

    /// Deletions whose rows the store's log may still hold.
    pub fn log_debt(&self) -> watch::Receiver<LogDebt> {
        self.log_debt.clone()
    }

    /// Where the control socket is.
    pub fn control_socket(&self) -> &Path {
        &self.control_socket
    }

    /// Turns true when the hub's background tasks are told to stop: for tasks a caller runs
    /// beside the hub and wants ended with it.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stopped.clone()
    }

    /// Applies what of `config` can change while running: the policy limits and the clock
    /// requirement. Returns the keys that changed but take effect only at the next start.
    pub fn reload(&self, running: &Config, config: &Config) -> Vec<&'static str> {
        self.gateway.set_policy_limits(config.policy);
        self.require_sync.store(config.clock.require_sync, Ordering::Release);
        running.restart_needed(config)
    }

    /// Stops in order (see the module's doc), each step bounded.
    pub async fn stop(mut self) -> Stopped {
        let Some(tasks) = self.tasks.take() else {
            return Stopped { commands_finished: true, locks_released: true, link_closed: true };
        };
        let _ = self.stop_intake.send(true);
        let commands_finished = match tasks.statements {
            Some(statements) => tokio::time::timeout(FINISH_IN_FLIGHT, statements).await.is_ok(),
            None => true,
        };
        if !commands_finished {
            tracing::warn!("commands still running after {FINISH_IN_FLIGHT:?}: stopping without their replies");
        }
        let locks_released = self.gateway.stop_locks(STOP_LOCKS).await;
        if !locks_released {
            tracing::warn!("locks' tasks still busy after {STOP_LOCKS:?}: stopping without what they were reading");
        }
        // Refusals the audit budget counted are written before the count goes with the process.
        let counted = self.store.clone();
        let written = tokio::task::spawn_blocking(move || {
            counted.lock().unwrap_or_else(std::sync::PoisonError::into_inner).write_counted_audit(unix_now())
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::error!("could not write the audit's count of refusals not recorded one by one");
        }
        let _ = self.stop.send(true);
        let link_closed = tokio::time::timeout(FLUSH_TIMEOUT + STOP_EDGES, tasks.link).await.is_ok();
        if let Some(local) = tasks.local {
            let _ = tokio::time::timeout(STOP_EDGES, local).await;
        }
        let _ = tokio::time::timeout(STOP_EDGES, tasks.control).await;
        Stopped { commands_finished, locks_released, link_closed }
    }
}

impl<T: LockTransport> Drop for Hub<T> {
    fn drop(&mut self) {
        // Not stopped in order: every task is told to end, nothing is waited for.
        let _ = self.stop_intake.send(true);
        let _ = self.stop.send(true);
    }
}
