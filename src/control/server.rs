//! The control socket's listener and handlers.
//!
//! One request per connection, read with a size bound and a time bound; the peer is checked
//! before its request is read; at most [`MAX_CONNECTIONS`] are served at once. Handlers run on
//! their own tasks, so a slow one (unbind waits for the lock) holds up nobody else.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, watch};

use super::peer::AdminGroup;
use super::protocol::{Answer, MAX_REQUEST_BYTES, Request};
use crate::auth::keys::PublicKey;
use crate::ble::LockTransport;
use crate::cloud::link::LinkState;
use crate::gateway::lock_worker::LockUpdate;
use crate::gateway::{Clock, Gateway};
use crate::protocol::ids::LockId;
use crate::protocol::message::LockStatus;
use crate::store::audit::{AuditActor, AuditVerification};
use crate::store::checkpoint::LogDebt;
use crate::store::{Store, StoreError};

/// How long a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; more are answered `busy` and closed. Each may hold a descriptor
/// for 10 s (`REQUEST_TIMEOUT`) before its request arrives: without a bound, a script gone
/// wrong in the admin group could take every descriptor the daemon has, and with them its
/// store, its links to BlueZ and its broker connection.
pub const MAX_CONNECTIONS: usize = 16;

/// How long accepting pauses after it failed (out of descriptors, most likely): trying again at
/// once would only fail again, as fast as the loop turns.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Creates the socket at `path`: a stale one is replaced; mode 0660, group `group` (when it
/// exists), so that only root, the daemon and the group's members can connect.
pub fn bind(path: &Path, group: &AdminGroup) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(gid) = group.gid {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    Ok(listener)
}

/// The latest of a lock, from its updates.
#[derive(Clone, Copy, Debug)]
struct Latest {
    status: Option<LockStatus>,
    connected: bool,
    reachable: bool,
}

impl Default for Latest {
    /// A lock nothing has been heard of yet (just paired, or its task still starting): not
    /// connected, and reachable until an attempt to reach it fails, as its task assumes.
    fn default() -> Self {
        Latest { status: None, connected: false, reachable: true }
    }
}

/// The control server of one gateway.
pub struct ControlServer<T: LockTransport> {
    gateway: Arc<Gateway<T>>,
    store: Arc<Mutex<Store>>,
    link: watch::Receiver<LinkState>,
    group: AdminGroup,
    clock: Clock,
    latest: Mutex<HashMap<LockId, Latest>>,
    path: PathBuf,
    /// The store's deletions whose rows its log may still hold, when its checkpoints are
    /// handed off ([`ControlServer::reporting_deletions`]).
    deletions: Option<watch::Receiver<LogDebt>>,
}

impl<T: LockTransport> std::fmt::Debug for ControlServer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer").field("path", &self.path).finish_non_exhaustive()
    }
}

impl<T: LockTransport> ControlServer<T> {
    /// A server for `gateway`, admitting root, the daemon's user and `group`'s members.
    pub fn new(
        gateway: Arc<Gateway<T>>,
        store: Arc<Mutex<Store>>,
        link: watch::Receiver<LinkState>,
        group: AdminGroup,
        clock: Clock,
        path: &Path,
    ) -> Self {
        ControlServer {
            gateway,
            store,
            link,
            group,
            clock,
            latest: Mutex::new(HashMap::new()),
            path: path.to_owned(),
            deletions: None,
        }
    }

    /// Has `status` say whether deleted rows still wait in the store's log for another
    /// connection to let go (after a `LogInUse` answer to unbind or forget-user).
    #[must_use]
    pub fn reporting_deletions(mut self, debt: watch::Receiver<LogDebt>) -> Self {
        self.deletions = Some(debt);
        self
    }

    /// Serves `listener` until `shutdown` turns true, then removes the socket file.
    pub async fn run(
        self,
        listener: UnixListener,
        mut updates: broadcast::Receiver<LockUpdate>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let this = Arc::new(self);
        let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut said_busy = false;
        let pause = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(pause);
        let mut paused = false;
        loop {
            tokio::select! {
                accepted = listener.accept(), if !paused => match accepted {
                    Ok((stream, _)) => match connections.clone().try_acquire_owned() {
                        Ok(permit) => {
                            said_busy = false;
                            let this = this.clone();
                            tokio::spawn(async move {
                                this.serve(stream).await;
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            if !std::mem::replace(&mut said_busy, true) {
                                tracing::warn!(
                                    limit = MAX_CONNECTIONS,
                                    "control socket: too many connections at once; answering busy"
                                );
                            }
                            // A fresh socket's buffer takes a line: this never waits for the peer.
                            let busy = Answer::error(
                                "busy",
                                format!("{MAX_CONNECTIONS} requests are being served; try again in a moment"),
                            );
                            let _ = stream.try_write(&busy.line());
                        }
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket: accept failed; pausing {ACCEPT_PAUSE:?}");
                        pause.as_mut().reset(tokio::time::Instant::now() + ACCEPT_PAUSE);
                        paused = true;
                    }
                },
                () = &mut pause, if paused => paused = false,
                update = updates.recv() => match update {
                    Ok(LockUpdate::Report { lock, status, connected, reachable, .. }) => {
                        let mut latest = this.latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        let entry = latest.entry(lock).or_default();
                        if status.is_some() {
                            entry.status = status;
                        }
                        entry.connected = connected;
                        entry.reachable = reachable;
                    }
                    Ok(LockUpdate::Unbound { lock }) => {
                        this.latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&lock);
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {}
                },
                () = crate::stop::requested(&mut shutdown) => {
                    let _ = std::fs::remove_file(&this.path);
                    return;
                }
            }
        }
    }

    async fn serve(&self, mut stream: UnixStream) {
        let admitted = match stream.peer_cred() {
            Ok(cred) => self.group.admits(cred.uid(), cred.gid()),
            Err(e) => Err(format!("could not read the peer's credentials: {e}")),
        };
        if let Err(message) = admitted {
            tracing::warn!(%message, "control socket: refused a peer");
            let _ = stream.write_all(&Answer::error("unauthorised", message).line()).await;
            return;
        }
        let (read, mut write) = stream.split();
        let mut line = Vec::new();
        let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
        let answer = match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
            Err(_) => Answer::error("malformed", "no request within 10 s"),
            Ok(Err(e)) => Answer::error("malformed", e.to_string()),
            Ok(Ok(_)) => {
                let text = line.strip_suffix(b"\n").unwrap_or(&line);
                match Request::parse(text) {
                    Err(e) => Answer::error("malformed", e.to_string()),
                    Ok(Request::Scan { seconds }) => self.scan(seconds, &mut write).await,
                    Ok(request) => {
                        let progress = match &request {
                            Request::Unbind { .. } => Some("asking the lock to forget this hub"),
                            Request::Pair { .. } => {
                                Some("looking for the lock (it must be in pairing mode), then pairing")
                            }
                            _ => None,
                        };
                        if let Some(text) = progress {
                            let _ = write.write_all(&Answer::Progress(text.into()).line()).await;
                        }
                        self.handle(request).await
                    }
                }
            }
        };
        let _ = write.write_all(&answer.line()).await;
    }

    async fn handle(&self, request: Request) -> Answer {
        let result = match request {
            Request::Status => self.status(),
            Request::Locks => self.locks(),
            Request::Audit { after, limit } => self.with_store(move |s| {
                let records = s.audit_records(after, limit)?;
                Ok(Value::Array(
                    records
                        .into_iter()
                        .map(|r| {
                            json!({ "seq": r.seq, "at": r.at, "action": r.action, "outcome": r.outcome,
                                    "actor": r.actor, "subject": r.subject, "detail": r.detail })
                        })
                        .collect(),
                ))
            }),
            Request::AuditVerify => self.with_store(|s| {
                Ok(match s.verify_audit()? {
                    AuditVerification::Intact { records } => json!({ "intact": true, "records": records }),
                    AuditVerification::Broken { seq, reason } => {
                        json!({ "intact": false, "seq": seq, "reason": reason })
                    }
                })
            }),
            Request::Users => self.with_store(|s| {
                Ok(Value::Array(
                    s.users()?
                        .into_iter()
                        .map(|(key, since, grants)| {
                            let key = <[u8; 32]>::try_from(key.as_slice())
                                .map(|k| PublicKey::from_bytes(k).to_string())
                                .unwrap_or_default();
                            json!({ "key": key, "since": since, "grants": grants })
                        })
                        .collect(),
                ))
            }),
            Request::ForgetUser { key } => match PublicKey::from_base64(&key) {
                Err(e) => return Answer::error("malformed", format!("key: {e}")),
                Ok(key) => {
                    let now = (self.clock)().0;
                    // On the blocking pool, as rekey: the compaction after the deletion rewrites
                    // the database, and waits up to seconds for other connections.
                    let store = self.store.clone();
                    match tokio::task::spawn_blocking(move || {
                        store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).forget_user(key.as_bytes(), now)
                    })
                    .await
                    {
                        Ok(Ok(false)) => {
                            return Answer::error("not_found", "no such user (lockhub users lists them)");
                        }
                        Ok(Ok(true)) => Ok(json!({ "forgotten": true })),
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(StoreError::Invalid("the store task failed")),
                    }
                }
            },
            Request::Unbind { lock } => match LockId::parse(&lock) {
                Err(_) => return Answer::error("malformed", "lock: 16 hex digits (lockhub locks lists them)"),
                Ok(lock) => match self.gateway.unbind(lock, AuditActor::Admin).await {
                    Ok(None) => return Answer::error("not_found", format!("lock {lock} is not paired")),
                    Ok(Some(told)) => Ok(json!({ "unbound": lock.to_string(), "lock_told": told })),
                    Err(e) => Err(e),
                },
            },
            // Served by `serve`, which streams its progress.
            Request::Scan { .. } => return Answer::error("failed", "scan is served with its progress"),
            Request::Pair { lock, setup } => match LockId::parse(&lock) {
                Err(_) => return Answer::error("malformed", "lock: 16 hex digits (lockhub scan lists them)"),
                Ok(lock) => {
                    let setup = zeroize::Zeroizing::new(setup);
                    match self.gateway.admin_pair(lock, &setup).await {
                        Ok(reply) if reply.reason.is_none() => Ok(json!({ "paired": lock.to_string() })),
                        Ok(reply) => {
                            let code = reply.reason.map_or("failed", |r| r.as_str());
                            return Answer::error(code, reply.detail.unwrap_or_default());
                        }
                        Err(e) => Err(e),
                    }
                }
            },
            Request::Rekey => {
                let store = self.store.clone();
                match tokio::task::spawn_blocking(move || {
                    store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).rekey()
                })
                .await
                {
                    Ok(Ok(n)) => Ok(json!({ "resealed": n })),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(StoreError::Invalid("the store task failed")),
                }
            }
        };
        match result {
            Ok(value) => Answer::Ok(value),
            Err(e) => Answer::error("failed", e.to_string()),
        }
    }

    /// Scans one second at a time, reporting what it has seen so far after each.
    async fn scan(&self, seconds: u32, write: &mut (impl AsyncWriteExt + Unpin)) -> Answer {
        let mut seen: HashMap<String, crate::ble::Advertisement> = HashMap::new();
        for elapsed in 1..=seconds {
            match self.gateway.scan(Duration::from_secs(1)).await {
                Ok(found) => {
                    for ad in found {
                        seen.insert(ad.address.clone(), ad);
                    }
                }
                Err(e) => return Answer::error("failed", e.to_string()),
            }
            let progress = Answer::Progress(format!("scanning: {elapsed} of {seconds} s, {} lock(s) seen", seen.len()));
            if write.write_all(&progress.line()).await.is_err() {
                return Answer::error("failed", "the client left");
            }
        }
        let mut found: Vec<_> = seen.into_values().collect();
        found.sort_by_key(|a| std::cmp::Reverse(a.rssi));
        Answer::Ok(Value::Array(
            found
                .into_iter()
                .map(|a| {
                    // A lock advertises its tag; the full id is on its label, and known here
                    // for the locks paired with this hub.
                    let paired = self.gateway.paired_tagged(a.tag);
                    json!({
                        "tag": a.tag.to_string(),
                        "lock": paired.map(|id| id.to_string()),
                        "address": a.address,
                        "rssi": a.rssi,
                        "pairing_mode": a.pairing_mode,
                        "paired_here": paired.is_some(),
                    })
                })
                .collect(),
        ))
    }

    fn with_store(&self, f: impl FnOnce(&mut Store) -> Result<Value, StoreError>) -> Result<Value, StoreError> {
        f(&mut self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn status(&self) -> Result<Value, StoreError> {
        let (outbox, claimed, id) = {
            let store = self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            (store.outbox_len()?, !store.owner_keys()?.is_empty(), store.gateway_identity()?)
        };
        let cloud = match *self.link.borrow() {
            LinkState::Connected(i) => json!({ "connected": true, "broker": i + 1 }),
            LinkState::Connecting => json!({ "connected": false }),
            LinkState::NotConfigured => json!({ "connected": false, "configured": false }),
        };
        Ok(json!({
            "gateway": id.map(|g| g.to_string()),
            "version": env!("CARGO_PKG_VERSION"),
            "cloud": cloud,
            "locks": self.gateway.lock_count(),
            "adapters": self.gateway.radios().iter().zip(self.gateway.homes_per_adapter()).map(|(r, homes)| json!({
                "name": r.name(),
                "locks": homes,
                "links": r.budget().in_use(),
                "max_links": r.budget().capacity(),
            })).collect::<Vec<_>>(),
            "reports_queued": outbox,
            "claimed": claimed,
            "clock_synchronised": (self.clock)().1,
            "deleted_rows_in_log": self.deletions.as_ref().map(|d| d.borrow().outstanding()),
        }))
    }

    fn locks(&self) -> Result<Value, StoreError> {
        let paired = self.gateway.paired_locks()?;
        let adapters = self.gateway.adapters_of_locks();
        let latest = self.latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(Value::Array(
            paired
                .into_iter()
                .map(|l| {
                    let now = latest.get(&l.lock_id).copied().unwrap_or_default();
                    let status = now.status.map(|s| {
                        json!({
                            "state": crate::cloud::lock_report::state_name(s.state),
                            "battery": s.battery_pct,
                            "door": crate::cloud::lock_report::door_name(s.door),
                        })
                    });
                    json!({
                        "lock": l.lock_id.to_string(),
                        "name": l.name,
                        "address": l.address,
                        "adapter": adapters.get(&l.lock_id),
                        "paired_at": l.paired_at,
                        "last_event_seq": l.last_event_seq,
                        "connected": now.connected,
                        "reachable": now.reachable,
                        "status": status,
                    })
                })
                .collect(),
        ))
    }
}
