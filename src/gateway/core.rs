//! The gateway's core: the [`Gateway`] every other part of the daemon holds, its locks' tasks
//! (started, found, stopped) and what the hub's edges read of it. What it does with a
//! statement is `statements` (the flow), `decision` (what is allowed), `pairing`, `grants`,
//! `replies`; local commands are `local_control`; unbinding a lock is `unbind`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, broadcast, watch};

use super::facts_cache::FactsCache;
use super::lock_worker::{LockHandle, LockUpdate, LockWorker};
use super::policy::{PolicyEngine, PolicyLimits};
use super::replies::Replies;
use crate::auth::reason::Reason;
use crate::auth::statement::Grant;
use crate::ble::client::LockClient;
use crate::ble::radios::Radios;
use crate::ble::{BleConfig, LockTransport};
use crate::cloud::express::ExpressLane;
use crate::cloud::reply::{Outcome, Reply};
use crate::cloud::topics::Topics;
use crate::protocol::ids::{GatewayId, LockId};
use crate::store::audit::AuditActor;
use crate::store::{Store, StoreError};

/// The gateway's clock: Unix seconds, and whether it was ever synchronised.
pub type Clock = Arc<dyn Fn() -> (i64, bool) + Send + Sync>;

/// Lock updates buffered for a slow local consumer before it misses some (it then republishes
/// every lock's state).
const UPDATES: usize = 256;

/// The gateway's core over a lock transport `T`: its locks' tasks and what every statement,
/// local command and admin request reads (the store, the policy engine, the facts cache).
pub struct Gateway<T: LockTransport> {
    pub(super) id: GatewayId,
    pub(super) topics: Topics,
    pub(super) store: Arc<Mutex<Store>>,
    pub(super) outbox_ready: Arc<Notify>,
    /// The hub's adapters, each with its link budget.
    pub(super) radios: Radios<T>,
    pub(super) ble: BleConfig,
    pub(super) policy: Mutex<PolicyEngine>,
    pub(super) locks: Mutex<HashMap<LockId, LockHandle>>,
    /// The locks' tasks, awaited by [`Gateway::stop_locks`].
    pub(super) lock_tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Turned true by [`Gateway::stop_locks`]: the locks' tasks take no new job, and no
    /// lock's task starts after it.
    pub(super) stopping: watch::Sender<bool>,
    pub(super) clock: Clock,
    pub(super) updates: broadcast::Sender<LockUpdate>,
    /// Where replies go and how outcomes are recorded.
    pub(super) replies: Replies,
    /// Grants whose signatures were checked, by the SHA-256 of their text: a stored grant is
    /// checked again on every command that uses it, unless these very bytes passed before.
    pub(super) verified_grants: Mutex<HashMap<[u8; 32], Grant>>,
    /// What commands read about their signers and locks, until a principal changes.
    pub(super) facts: FactsCache,
}

impl<T: LockTransport> std::fmt::Debug for Gateway<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("id", &self.id).finish_non_exhaustive()
    }
}

impl<T: LockTransport> Gateway<T> {
    /// The core of gateway `id`. Call [`Gateway::start_locks`] to start the paired locks' tasks.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: GatewayId,
        store: Arc<Mutex<Store>>,
        outbox_ready: Arc<Notify>,
        radios: Radios<T>,
        ble: BleConfig,
        limits: PolicyLimits,
        clock: Clock,
    ) -> Arc<Self> {
        let principals = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).principals_version();
        let topics = Topics::new(&id);
        Arc::new(Gateway {
            replies: Replies::new(store.clone(), &topics, outbox_ready.clone()),
            topics,
            id,
            store,
            outbox_ready,
            radios,
            ble,
            policy: Mutex::new(PolicyEngine::new(limits)),
            locks: Mutex::new(HashMap::new()),
            lock_tasks: Mutex::new(Vec::new()),
            stopping: watch::channel(false).0,
            clock,
            updates: broadcast::channel(UPDATES).0,
            verified_grants: Mutex::new(HashMap::new()),
            facts: FactsCache::new(principals),
        })
    }

    /// Sends replies through the cloud link's express lane: published while their outcome is
    /// being committed rather than after (the outbox still holds each until acknowledged).
    pub fn send_replies_through(&self, lane: ExpressLane) {
        self.replies.send_through(lane);
    }

    pub(super) fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a task for every paired lock in the store; answers commands a previous run left
    /// unanswered (it stopped while they ran: whether the lock moved, its log will say).
    pub fn start_locks(&self) -> Result<(), StoreError> {
        let (locks, unanswered) = {
            let store = self.store();
            (store.locks()?, store.unanswered_commands()?)
        };
        for lock in locks {
            let key = self.store().pairing_key(lock.lock_id)?;
            self.start_lock(lock.lock_id, lock.address, key, lock.paired_at, lock.last_event_seq, None);
        }
        let (now, _) = (self.clock)();
        for key in unanswered {
            let id = key.rsplit(':').next().unwrap_or(&key).to_owned();
            let reply = Reply {
                id,
                result: Outcome::Failed,
                reason: Some(Reason::Failed),
                detail: Some("interrupted by a gateway restart; the lock's events tell whether it ran".into()),
                at: now,
                actor: None,
            };
            let record =
                self.replies.record(&key, &reply, "command.interrupted", Some(AuditActor::Hub), None, true, None);
            self.replies.finish_now(record, &reply)?;
        }
        Ok(())
    }

    pub(super) fn start_lock(
        &self,
        lock: LockId,
        address: String,
        key: crate::protocol::pairing::PairingKey,
        epoch: i64,
        last_seq: u64,
        home: Option<usize>,
    ) {
        // A lock with no home yet settles where the fewest locks live.
        let home = home.unwrap_or_else(|| {
            let locks = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            self.radios.least_loaded(locks.values().map(LockHandle::home))
        });
        let client = LockClient::new(self.radios.clone(), home, self.ble.clone(), self.id.clone(), lock, address, key);
        let worker = LockWorker {
            client,
            epoch,
            last_seq,
            store: self.store.clone(),
            topics: self.topics.clone(),
            outbox_ready: self.outbox_ready.clone(),
            clock: self.clock.clone(),
            last_status: None,
            published_connected: None,
            updates: self.updates.clone(),
            reachable: true,
        };
        // Checked under the map's lock, which `stop_locks` takes to empty it: a lock paired
        // while stopping gets its task at the next start instead.
        let mut locks = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if *self.stopping.borrow() {
            return;
        }
        let (handle, task) = worker.spawn(self.stopping.subscribe());
        locks.insert(lock, handle);
        let mut tasks = self.lock_tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Unbound locks' tasks end on their own: only the running ones are kept.
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }

    /// Stops the locks' tasks, for a stopping gateway (after the last command): each finishes
    /// what it was doing — recording the events it read, so that they reach the outbox before
    /// the cloud link's last flush — and lets go of its lock. Waits at most `within`; returns
    /// whether every task ended by then. No lock's task starts afterwards.
    pub async fn stop_locks(&self, within: Duration) -> bool {
        let handles = {
            let mut locks = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            self.stopping.send_replace(true);
            std::mem::take(&mut *locks)
        };
        drop(handles);
        let tasks = std::mem::take(&mut *self.lock_tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        tokio::time::timeout(within, futures::future::join_all(tasks)).await.is_ok()
    }

    /// The task of a paired lock.
    pub fn lock(&self, lock: LockId) -> Option<LockHandle> {
        self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&lock).cloned()
    }

    /// The task of the paired lock that advertises `tag`, if any. Only called for an
    /// advertisement that says a lock has news, so a digest per paired lock is cheap.
    pub fn lock_tagged(&self, tag: crate::protocol::ids::LockTag) -> Option<LockHandle> {
        let locks = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.iter().find(|(id, _)| crate::protocol::ids::LockTag::of(**id) == tag).map(|(_, lock)| lock.clone())
    }

    /// The id of the paired lock that advertises `tag`, if any.
    pub fn paired_tagged(&self, tag: crate::protocol::ids::LockTag) -> Option<LockId> {
        let locks = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.keys().find(|id| crate::protocol::ids::LockTag::of(**id) == tag).copied()
    }

    /// What the locks' tasks record from now on (subscribe before [`Gateway::start_locks`] to
    /// miss nothing).
    pub fn updates(&self) -> broadcast::Receiver<LockUpdate> {
        self.updates.subscribe()
    }

    /// The paired locks, with the names the owner gave them.
    pub fn paired_locks(&self) -> Result<Vec<crate::store::PairedLock>, StoreError> {
        self.store().locks()
    }

    /// Replaces the policy limits (a configuration reload).
    pub fn set_policy_limits(&self, limits: PolicyLimits) {
        self.policy.lock().unwrap_or_else(std::sync::PoisonError::into_inner).set_limits(limits);
    }

    /// The adapter each paired lock goes through (its home), by lock.
    pub fn adapters_of_locks(&self) -> HashMap<LockId, String> {
        let locks = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.iter().map(|(lock, handle)| (*lock, self.radios.get(handle.home()).name().to_owned())).collect()
    }

    /// How many locks each adapter is home to, in the configured order.
    pub fn homes_per_adapter(&self) -> Vec<usize> {
        let locks = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.radios.count_homes(locks.values().map(LockHandle::home))
    }

    /// How many locks are paired (and have a task).
    pub fn lock_count(&self) -> usize {
        self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// Scans through every adapter for `duration`: every LHP/1 lock in range, strongest first.
    pub async fn scan(&self, duration: Duration) -> Result<Vec<crate::ble::Advertisement>, crate::ble::BleError> {
        self.radios.scan(duration).await
    }

    /// The hub's adapters.
    pub fn radios(&self) -> &Radios<T> {
        &self.radios
    }
}
