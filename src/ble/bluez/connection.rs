//! The transport's connection to BlueZ on the system bus: the D-Bus session and the adapter
//! chosen on it, found dead and replaced when the bus goes (the D-Bus daemon restarted, a
//! connection wedged), with every wait on the bus and on BlueZ bounded.
//!
//! What goes over it — discovery, GATT, links — is the transport's (`ble::bluez`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bluer::{Adapter, ErrorKind};
use tokio::sync::watch;

use super::bus_error;
use crate::ble::{BleConfig, BleError};

/// How long a connection attempt waits before asking whether the bus is still there, and how
/// long it waits for the answer. After the D-Bus daemon went away, bluer's connection is dead
/// but says so only when asked: a call made on it may wait out its whole bound unanswered.
pub(super) const BUS_SILENCE: Duration = Duration::from_millis(500);

/// How long BlueZ may take to answer the calls that set up a new connection to it (its
/// adapters, whether one is powered) when the gateway connects again while running. bluer
/// waits 120 s for any answer: a hung bluetoothd (the bus up, `org.bluez` never answering)
/// would hold whoever is connecting — a command, discovery — for that long, and a command's
/// own bound would then report a timeout instead of naming BlueZ.
const BLUEZ_SILENCE: Duration = Duration::from_secs(1);

/// The same bound at start-up, where BlueZ may still be busy starting too: more generous,
/// since failing here stops the daemon (and its service manager starts it again).
const BLUEZ_SILENCE_AT_START: Duration = Duration::from_secs(5);

/// One connection to BlueZ: the D-Bus session and the adapter chosen on it.
pub(super) struct Bluez {
    pub(super) session: bluer::Session,
    pub(super) adapter: Adapter,
    /// Set once the bus stopped answering on this connection: the next user connects anew.
    pub(super) gone: AtomicBool,
}

/// A new connection to the bus being made, shared by everyone who finds the current one gone.
///
/// It runs as a task of its own and is left to finish when they stop waiting: libdbus makes a
/// connection on a blocking thread that nothing can interrupt, holding a process-wide lock
/// through the bus's answer to its Hello (up to 25 s). Were each waiter to start its own, a bus
/// daemon that hangs would leave one more blocked thread per attempt, all queued on that lock,
/// until the blocking pool the store's commits also use ran out.
#[derive(Clone)]
struct Connecting {
    result: futures::future::Shared<futures::future::BoxFuture<'static, Result<Arc<Bluez>, BleError>>>,
    /// How far it got, set by its task.
    progress: Arc<Progress>,
}

/// How far a [`Connecting`] attempt got.
#[derive(Debug, Default)]
struct Progress {
    /// Set once the bus accepted the connection: what is left is BlueZ's to answer.
    accepted: AtomicBool,
    /// Set if it failed. Its error is the answer of those who waited for it; a caller who
    /// comes later (the bus hung, then restarted under it) starts a new attempt instead.
    failed: AtomicBool,
}

/// Marks an attempt failed when dropped, unless told it succeeded.
struct FailOnDrop(Option<Arc<Progress>>);

impl FailOnDrop {
    fn succeeded(mut self) {
        self.0 = None;
    }
}

impl Drop for FailOnDrop {
    fn drop(&mut self) {
        if let Some(progress) = &self.0 {
            progress.failed.store(true, Ordering::Release);
        }
    }
}

/// The current connection to BlueZ, replaced when the bus went away.
pub(super) struct BluezConnection {
    /// The current connection (see [`BluezConnection::live`]).
    bluez: std::sync::RwLock<Arc<Bluez>>,
    /// The new connection in the making, if any (see [`Connecting`]).
    connecting: std::sync::Mutex<Option<Connecting>>,
    /// Counts the connections replaced, for [`BluezConnection::replaced`].
    generation: watch::Sender<u64>,
    config: BleConfig,
}

impl BluezConnection {
    /// Connects to BlueZ on the system bus (`DBUS_SYSTEM_BUS_ADDRESS` when set) and picks the
    /// adapter: `config.adapter`, or the first powered one.
    pub(super) async fn open(config: &BleConfig) -> Result<Self, BleError> {
        let bluez = Self::connect_bluez(config, BLUEZ_SILENCE_AT_START).await?;
        Ok(BluezConnection {
            bluez: std::sync::RwLock::new(Arc::new(bluez)),
            connecting: std::sync::Mutex::new(None),
            generation: watch::Sender::new(0),
            config: config.clone(),
        })
    }

    /// Gives up the connection to the bus if it is still the one of `generation` (what
    /// [`BluezConnection::replaced`] said when its user started on it): the bus went away under
    /// it (the D-Bus daemon restarted). The next use connects afresh and picks the adapter
    /// again; a connection someone already replaced is left alone.
    pub(super) fn drop_connection(&self, generation: u64) {
        // Under the lock that `replace` changes both under: the connection read is the one of
        // the generation read.
        let slot = self.bluez.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if *self.generation.borrow() == generation {
            slot.gone.store(true, Ordering::Release);
        }
    }

    /// Makes `fresh` the current connection, unless `stale` is no longer current (someone
    /// replaced it already); returns the current connection.
    fn replace(&self, stale: &Arc<Bluez>, fresh: Arc<Bluez>) -> Arc<Bluez> {
        let mut slot = self.bluez.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if Arc::ptr_eq(&slot, stale) {
            *slot = fresh;
            self.generation.send_modify(|g| *g += 1);
        }
        slot.clone()
    }

    /// Changes whenever the connection to the bus is replaced: what was started on the old
    /// one (discovery) is to be started again.
    pub(super) fn replaced(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub(super) fn current(&self) -> Arc<Bluez> {
        self.bluez.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The current connection, or a new one if the bus stopped answering on it. Callers that
    /// find it gone share one attempt ([`Connecting`]), waiting for it at most
    /// [`BLUEZ_SILENCE`] each; the first new connection is kept.
    pub(super) async fn live(&self) -> Result<Arc<Bluez>, BleError> {
        let current = self.current();
        if !current.gone.load(Ordering::Acquire) {
            return Ok(current);
        }
        let attempt = self.connecting();
        let outcome = match tokio::time::timeout(BLUEZ_SILENCE, attempt.result.clone()).await {
            Ok(outcome) => outcome,
            Err(_) if attempt.progress.accepted.load(Ordering::Acquire) => {
                return Err(BleError::BluezSilent { after: BLUEZ_SILENCE });
            }
            Err(_) => return Err(bus_silent_at_connect(BLUEZ_SILENCE)),
        };
        // Done, either way: the next caller to find the connection gone starts anew.
        {
            let mut slot = self.connecting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if slot.as_ref().is_some_and(|c| c.result.ptr_eq(&attempt.result)) {
                *slot = None;
            }
        }
        let fresh = outcome?;
        if !Arc::ptr_eq(&self.current(), &fresh) {
            tracing::info!("connected to D-Bus again");
        }
        Ok(self.replace(&current, fresh))
    }

    /// The attempt at a new connection in flight, or a new one started.
    fn connecting(&self) -> Connecting {
        let mut slot = self.connecting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(attempt) = slot.as_ref()
            && !attempt.progress.failed.load(Ordering::Acquire)
        {
            return attempt.clone();
        }
        let progress = Arc::new(Progress::default());
        let (config, reached) = (self.config.clone(), progress.clone());
        let task = tokio::spawn(async move {
            // Failed unless it succeeds, on every way out: a panic (the join error is the
            // waiters' answer) must not be handed to later callers either.
            let guard = FailOnDrop(Some(reached.clone()));
            // Unbounded here (libdbus bounds the Hello itself, and the waiters their wait): a
            // bound would only abandon the blocked thread and let the next waiter add another.
            let made = async {
                let session = new_session().await?;
                reached.accepted.store(true, Ordering::Release);
                Self::on_session(session, &config, BLUEZ_SILENCE).await.map(Arc::new)
            }
            .await;
            if made.is_ok() {
                guard.succeeded();
            }
            made
        });
        let result = async move {
            task.await.unwrap_or_else(|e| Err(BleError::Bus(format!("connecting to the bus failed: {e}"))))
        };
        let attempt = Connecting { result: futures::FutureExt::shared(futures::FutureExt::boxed(result)), progress };
        *slot = Some(attempt.clone());
        attempt
    }

    /// A new connection to the bus, and the adapter chosen on it; the bus daemon gets `bound`
    /// to accept the connection, and BlueZ as long to answer on it.
    async fn connect_bluez(config: &BleConfig, bound: Duration) -> Result<Bluez, BleError> {
        let session = tokio::time::timeout(bound, new_session()).await.map_err(|_| bus_silent_at_connect(bound))??;
        Self::on_session(session, config, bound).await
    }

    /// The adapter chosen on a new `session`; BlueZ gets `bound` to answer.
    async fn on_session(session: bluer::Session, config: &BleConfig, bound: Duration) -> Result<Bluez, BleError> {
        let adapter = tokio::time::timeout(bound, choose_adapter(&session, config.adapter.as_deref()))
            .await
            .map_err(|_| BleError::BluezSilent { after: bound })??;
        Ok(Bluez { session, adapter, gone: AtomicBool::new(false) })
    }

    /// Whether the current connection to the bus still answers. One that does not (wedged,
    /// or dead without having said so) is dropped: the next use of the transport connects
    /// afresh, and [`BluezConnection::replaced`] changes when it has.
    pub(super) async fn bus_answers(&self) -> bool {
        let bluez = self.current();
        let alive = answers(&bluez).await;
        if !alive {
            bluez.gone.store(true, Ordering::Release);
        }
        alive
    }
}

/// A new connection to the system bus, for BlueZ.
async fn new_session() -> Result<bluer::Session, BleError> {
    bluer::Session::new().await.map_err(|e| BleError::Bus(format!("cannot reach BlueZ: {e}")))
}

/// The bus daemon not accepting a new connection within `bound` (hung, or overloaded).
fn bus_silent_at_connect(bound: Duration) -> BleError {
    BleError::Bus(format!("the D-Bus system bus did not accept a connection within {bound:?}"))
}

/// The adapter to use on `session`: the one named (by name or address), or the first powered
/// one.
async fn choose_adapter(session: &bluer::Session, adapter: Option<&str>) -> Result<Adapter, BleError> {
    let names = session.adapter_names().await.map_err(bus_error)?;
    Ok(match adapter {
        Some(wanted) => {
            let mut name = names.iter().find(|n| *n == wanted).cloned();
            if name.is_none() && crate::ble::radios::is_address(wanted) {
                for candidate in &names {
                    let address = session.adapter(candidate).map_err(bus_error)?.address().await.map_err(bus_error)?;
                    if address.to_string().eq_ignore_ascii_case(wanted) {
                        name = Some(candidate.clone());
                        break;
                    }
                }
            }
            let Some(name) = name else {
                return Err(BleError::NoAdapter(format!(" {wanted} (found: {})", names.join(", "))));
            };
            let a = session.adapter(&name).map_err(bus_error)?;
            if !a.is_powered().await.map_err(bus_error)? {
                return Err(BleError::AdapterOff(name));
            }
            a
        }
        None => {
            let mut chosen = None;
            for name in &names {
                let a = session.adapter(name).map_err(bus_error)?;
                if a.is_powered().await.map_err(bus_error)? {
                    chosen = Some(a);
                    break;
                }
            }
            match chosen {
                Some(a) => a,
                None if names.is_empty() => return Err(BleError::NoAdapter(String::new())),
                None => return Err(BleError::AdapterOff(names.join(", "))),
            }
        }
    })
}

/// Returns once the connection to the bus shows it is dead, probing after each
/// [`BUS_SILENCE`] of waiting: a connection attempt that takes that long (a lock at the edge
/// of range may) asks the bus for a property. Dead is no answer within [`BUS_SILENCE`], or
/// the connection refusing to send (the D-Bus library's `Failed` once its socket is closed,
/// or bluer's own word for a lost connection); any other answer, an error from BlueZ
/// included, means the bus is there.
pub(super) async fn bus_silent(bluez: &Bluez) {
    loop {
        tokio::time::sleep(BUS_SILENCE).await;
        if !answers(bluez).await {
            return;
        }
    }
}

/// Whether the bus answers on `bluez`'s connection: a property within [`BUS_SILENCE`]; an
/// error from BlueZ is an answer too, the connection refusing to send is not.
async fn answers(bluez: &Bluez) -> bool {
    match tokio::time::timeout(BUS_SILENCE, bluez.adapter.is_powered()).await {
        Err(_) => false,
        Ok(Err(e)) => !connection_lost(&e),
        Ok(Ok(_)) => true,
    }
}

/// Whether `e` says the connection to the bus itself is gone (not that BlueZ refused).
fn connection_lost(e: &bluer::Error) -> bool {
    use bluer::InternalErrorKind;
    match &e.kind {
        ErrorKind::Internal(InternalErrorKind::DBusConnectionLost) => true,
        ErrorKind::Internal(InternalErrorKind::DBus(name)) => name == "org.freedesktop.DBus.Error.Failed",
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_attempt_is_failed_on_every_way_out_but_success_a_panic_included() {
        let panicked = Arc::new(Progress::default());
        let reached = panicked.clone();
        let task = tokio::spawn(async move {
            let _guard = FailOnDrop(Some(reached));
            panic!("inside bluer");
        });
        assert!(task.await.unwrap_err().is_panic());
        assert!(panicked.failed.load(Ordering::Acquire));
        let made = Arc::new(Progress::default());
        FailOnDrop(Some(made.clone())).succeeded();
        assert!(!made.failed.load(Ordering::Acquire));
    }

    fn error(kind: ErrorKind) -> bluer::Error {
        bluer::Error { kind, message: String::new() }
    }

    /// Only the connection's own failures replace it; BlueZ refusing something (or not being
    /// on the bus while it restarts) leaves a live connection alone.
    #[test]
    fn only_a_failing_connection_counts_as_lost() {
        use bluer::InternalErrorKind::{DBus, DBusConnectionLost};
        assert!(connection_lost(&error(ErrorKind::Internal(DBusConnectionLost))));
        assert!(connection_lost(&error(ErrorKind::Internal(DBus("org.freedesktop.DBus.Error.Failed".into())))));
        for alive in [
            ErrorKind::Failed,
            ErrorKind::NotReady,
            ErrorKind::Internal(DBus("org.freedesktop.DBus.Error.ServiceUnknown".into())),
            ErrorKind::Internal(DBus("org.freedesktop.DBus.Error.NoReply".into())),
        ] {
            assert!(!connection_lost(&error(alive.clone())), "{alive:?}");
        }
    }
}
