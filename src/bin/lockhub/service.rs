//! What systemd sees of the daemon (`Type=notify`): READY once it serves, a one-line STATUS
//! with the health summary whenever that changes, WATCHDOG pings while it is healthy,
//! RELOADING and STOPPING around those. Outside systemd (no `NOTIFY_SOCKET`) all of it is a
//! no-op.
//!
//! The watchdog pings only after the store has answered a query: a daemon whose store is
//! wedged (a stuck lock, a hung disk) stops pinging and systemd restarts it, which a timer
//! that pinged unconditionally would never let happen.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockhub::cloud::link::LinkState;
use lockhub::store::Store;
use sd_notify::NotifyState;
use tokio::sync::watch;

/// What the STATUS line is made of.
pub struct Health {
    /// The cloud link's state.
    pub link: watch::Receiver<LinkState>,
    /// How many brokers are configured.
    pub brokers: usize,
    /// Whether the clock is trusted for remote commands.
    pub clock_synchronised: Box<dyn Fn() -> bool + Send + Sync>,
    /// The store (for the outbox's length, and as the watchdog's liveness probe).
    pub store: Arc<Mutex<Store>>,
}

impl Health {
    /// The STATUS line, or `None` when the store did not answer within `timeout`.
    async fn summary(&self, timeout: Duration) -> Option<String> {
        let store = self.store.clone();
        let query = tokio::task::spawn_blocking(move || {
            let store = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Paired locks as the store has them: while stopping, their tasks are gone first.
            let paired = store.locks()?.len();
            Ok::<_, lockhub::store::StoreError>((store.outbox_len()?, !store.owner_keys()?.is_empty(), paired))
        });
        let (outbox, claimed, paired) = match tokio::time::timeout(timeout, query).await {
            Ok(Ok(Ok(answer))) => answer,
            _ => return None,
        };
        let cloud = match *self.link.borrow() {
            LinkState::Connected(i) => format!("cloud connected (broker {} of {})", i + 1, self.brokers),
            LinkState::Connecting => "cloud unreachable, working offline".to_owned(),
            LinkState::NotConfigured => "no cloud configured: local only".to_owned(),
        };
        let clock = if (self.clock_synchronised)() { "clock synchronised" } else { "clock NOT synchronised" };
        let owner = if claimed { "" } else { "; not claimed yet (lockhub claim-code)" };
        Some(format!("{cloud}; {paired} lock(s) paired; {outbox} report(s) queued; {clock}{owner}"))
    }
}

/// Says READY, then keeps STATUS current and pings the watchdog until the runtime stops.
pub fn start(health: Health) {
    let mut watchdog_usec = 0;
    let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec);
    // Half the interval, as sd_watchdog_enabled(3) advises; without a watchdog, a STATUS
    // refresh every 30 s still catches slow changes (the queued reports).
    let every = if watchdog { Duration::from_micros(watchdog_usec / 2) } else { Duration::from_secs(30) };
    tokio::spawn(async move {
        let mut link = health.link.clone();
        let mut tick = tokio::time::interval(every);
        let mut shown = String::new();
        let mut ready = false;
        loop {
            let healthy = match health.summary(every).await {
                Some(status) => {
                    if status != shown {
                        tracing::info!(status = %status, "health");
                        notify(&[NotifyState::Status(&status)]);
                        shown = status;
                    }
                    true
                }
                None => {
                    tracing::error!("the store did not answer in time: not pinging the watchdog");
                    false
                }
            };
            if !ready {
                // Ready only once the first summary could be made: the store answers.
                notify(&[NotifyState::Ready]);
                ready = true;
            }
            if healthy && watchdog {
                notify(&[NotifyState::Watchdog]);
            }
            tokio::select! {
                _ = tick.tick() => {}
                changed = link.changed() => if changed.is_err() { return },
            }
        }
    });
}

/// Tells systemd that a reload began; `ready` must follow.
pub fn reloading() {
    notify(&[NotifyState::Reloading, NotifyState::Status("reloading the configuration")]);
}

/// Tells systemd that the reload is done.
pub fn reloaded() {
    notify(&[NotifyState::Ready]);
}

/// Tells systemd that the daemon is stopping, and why it takes a moment.
pub fn stopping() {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: finishing commands in flight, flushing the outbox"),
    ]);
}

fn notify(state: &[NotifyState<'_>]) {
    // Nothing to tell outside systemd; a failure to tell it is not worth stopping for.
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::debug!(error = %e, "systemd notify failed");
    }
}
