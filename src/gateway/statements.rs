//! Carrying out accepted statements: the owner's claim, pairings, grants, revocations and
//! policies, and users' commands through the policy engine to the lock's task.
//!
//! Every statement id is noted durably (with a digest of its bytes) before the broker gets its
//! acknowledgement, so a redelivery is answered with the stored reply and never runs twice,
//! and the same id with other bytes is a replay. Every outcome — allowed or refused — is one
//! transaction: the audit record, the reply in the outbox, and the reply kept for redeliveries.
//! Owner statements run in arrival order (a grant is in force before the command after it);
//! commands run concurrently, serialised per lock by the lock's task.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::Digest;
use tokio::sync::{Notify, broadcast, mpsc};

use super::claim;
use super::facts_cache::{FactsCache, SignerFacts};
use super::lock_worker::{Executed, Failure, LockHandle, LockUpdate, LockWorker};
use super::policy::{Facts, GrantFacts, LockPolicy, PolicyEngine, PolicyLimits, Role};
use super::timing::{Stage, Timing};
use crate::auth::keys::PublicKey;
use crate::auth::local_code::{CodeHolder, IssuedCode, validate_hash};
use crate::auth::reason::Reason;
use crate::auth::statement::{Command, Grant, Operation, Signed, Statement, open};
use crate::ble::client::{LockClient, pair};
use crate::ble::radios::Radios;
use crate::ble::{BleConfig, LockTransport};
use crate::cloud::express::{ExpressLane, ExpressRecord};
use crate::cloud::link::InboundCommand;
use crate::cloud::reply::{Outcome, Reply};
use crate::cloud::topics::Topics;
use crate::protocol::ids::{GatewayId, LockId};
use crate::protocol::message::{Actor, LockStatus, Op, UserRef};
use crate::protocol::pairing::SetupCode;
use crate::store::audit::AuditActor;
use crate::store::{AuditEntry, CommandSeen, Store, StoreError};

/// How long a seen statement id is remembered after its expiry, so that a late redelivery is
/// still answered with the stored reply.
const REMEMBER_AFTER_EXPIRY_S: i64 = 3600;

/// The longest a claim counts as unexpired for remembering its id, whatever its `exp` says.
const CLAIM_REMEMBERED_S: i64 = 3600;

/// A command's report, waiting to be written with its reply.
struct Pending {
    report: Option<super::lock_worker::Report>,
    recorded: tokio::sync::oneshot::Sender<bool>,
}

/// The gateway's clock: Unix seconds, and whether it was ever synchronised.
pub type Clock = Arc<dyn Fn() -> (i64, bool) + Send + Sync>;

/// A statement that passed the intake, with what is needed to dedupe and acknowledge it.
#[derive(Debug)]
pub struct Accepted {
    /// The verified statement.
    pub signed: Signed,
    /// Its exact text (stored for grants and revocations).
    pub text: String,
    /// SHA-256 of its bytes.
    pub digest: [u8; 32],
    /// The delivery, acknowledged once the statement is noted.
    pub delivery: InboundCommand,
    /// Its stages so far (logged for commands).
    pub timing: Timing,
}

/// Lock updates buffered for a slow local consumer before it misses some (it then republishes
/// every lock's state).
const UPDATES: usize = 256;

/// The audit name of an operation.
fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Lock => "lock",
        Op::Unlock => "unlock",
        Op::Unlatch => "unlatch",
        _ => "other",
    }
}

/// The gateway's decision-making core over a lock transport `T`.
pub struct Gateway<T: LockTransport> {
    id: GatewayId,
    topics: Topics,
    store: Arc<Mutex<Store>>,
    outbox_ready: Arc<Notify>,
    /// The hub's adapters, each with its link budget.
    radios: Radios<T>,
    ble: BleConfig,
    policy: Mutex<PolicyEngine>,
    locks: Mutex<HashMap<LockId, LockHandle>>,
    /// The locks' tasks, awaited by [`Gateway::stop_locks`].
    lock_tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Set by [`Gateway::stop_locks`]: no lock's task starts after it.
    stopping: std::sync::atomic::AtomicBool,
    clock: Clock,
    updates: broadcast::Sender<LockUpdate>,
    /// Replies go out through it ahead of their commit, once the cloud link is wired in.
    express: std::sync::OnceLock<ExpressLane>,
    /// Grants whose signatures were checked, by the SHA-256 of their text: a stored grant is
    /// checked again on every command that uses it, unless these very bytes passed before.
    verified_grants: Mutex<HashMap<[u8; 32], Grant>>,
    /// What commands read about their signers and locks, until a principal changes.
    facts: FactsCache,
}

/// Verified grants remembered at most (the memory is emptied when full: a miss only costs a
/// signature check).
const VERIFIED_GRANTS: usize = 1024;

impl<T: LockTransport> std::fmt::Debug for Gateway<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("id", &self.id).finish_non_exhaustive()
    }
}

/// A user's 8-byte reference in the lock's log: the start of SHA-256 of their public key.
pub fn user_ref(key: &PublicKey) -> UserRef {
    reference(key.as_bytes())
}

/// A local user's reference in the lock's log, from their name in `[[local.codes]]`.
pub fn local_user_ref(name: &str) -> UserRef {
    reference(format!("local:{name}").as_bytes())
}

fn reference(bytes: &[u8]) -> UserRef {
    let digest = sha2::Sha256::digest(bytes);
    UserRef(digest[..8].try_into().expect("8 bytes"))
}

fn op_of(op: Operation) -> Op {
    match op {
        Operation::Lock => Op::Lock,
        Operation::Unlock => Op::Unlock,
        Operation::Unlatch => Op::Unlatch,
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
        Arc::new(Gateway {
            topics: Topics::new(&id),
            id,
            store,
            outbox_ready,
            radios,
            ble,
            policy: Mutex::new(PolicyEngine::new(limits)),
            locks: Mutex::new(HashMap::new()),
            lock_tasks: Mutex::new(Vec::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            clock,
            updates: broadcast::channel(UPDATES).0,
            express: std::sync::OnceLock::new(),
            verified_grants: Mutex::new(HashMap::new()),
            facts: FactsCache::new(principals),
        })
    }

    /// Sends replies through the cloud link's express lane: published while their outcome is
    /// being committed rather than after (the outbox still holds each until acknowledged).
    pub fn send_replies_through(&self, lane: ExpressLane) {
        let _ = self.express.set(lane);
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
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
            };
            let record =
                self.outcome_record(&key, &reply, "command.interrupted", Some(AuditActor::Hub), None, true, None);
            let committed = record_outcome(&self.store, record);
            self.decided(&reply, "command.interrupted", None, committed)?;
        }
        Ok(())
    }

    fn start_lock(
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
        if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let (handle, task) = worker.spawn();
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
            self.stopping.store(true, std::sync::atomic::Ordering::Release);
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

    /// Takes accepted statements until the channel closes: owner statements in order,
    /// commands concurrently. Returns once the commands in flight have finished too, so that a
    /// stopping daemon can close the channel and await this before flushing the outbox.
    pub async fn serve(self: Arc<Self>, mut accepted: mpsc::Receiver<Accepted>) {
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                statement = accepted.recv() => {
                    let Some(statement) = statement else { break };
                    if matches!(statement.signed.statement, Statement::Command(_)) {
                        let gateway = self.clone();
                        in_flight.spawn(async move { gateway.handle(statement).await });
                    } else {
                        self.handle(statement).await;
                    }
                }
                // Reap finished commands as they go, so the set stays as small as the load.
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            }
        }
        while in_flight.join_next().await.is_some() {}
    }

    /// What the locks' tasks record from now on (subscribe before [`Gateway::start_locks`] to
    /// miss nothing).
    pub fn updates(&self) -> broadcast::Receiver<LockUpdate> {
        self.updates.subscribe()
    }

    /// The local codes owner-signed statements gave for `lock`, valid now.
    pub fn local_codes(&self, lock: LockId) -> Result<Vec<IssuedCode>, StoreError> {
        let now = (self.clock)().0;
        let rows = self.store().local_codes(lock, now)?;
        Ok(rows
            .into_iter()
            .filter_map(|(key, hash)| {
                let user = PublicKey::from_bytes(key.try_into().ok()?);
                Some(IssuedCode { user, hash })
            })
            .collect())
    }

    /// Carries out a local command (Home Assistant, the local broker) for `user`, whose code
    /// the caller has checked, and audits it with its `source`. The inner error is the reason
    /// code of a command that did not complete (`jammed`, `lock_unreachable`, ...).
    pub async fn local_command(
        &self,
        lock: LockId,
        op: Op,
        user: &CodeHolder,
        source: &str,
    ) -> Result<Result<Option<LockStatus>, String>, StoreError> {
        let action = format!("local.{}", op_name(&op));
        // A user known by key is audited under their pseudonym (forget-user unlinks it); a
        // configured name is the hub owner's label.
        let (actor, user_ref) = match user {
            CodeHolder::Named(name) => (AuditActor::User(format!("local:{name}").into_bytes()), local_user_ref(name)),
            CodeHolder::Key(key) => (AuditActor::User(key.as_bytes().to_vec()), user_ref(key)),
        };
        let outcome = match self.lock(lock) {
            None if self.stopping.load(std::sync::atomic::Ordering::Acquire) => {
                Err(Failure { reason: Reason::Failed, detail: "the gateway is stopping".into() })
            }
            None => Err(Failure { reason: Reason::UnknownLock, detail: "the lock is not paired".into() }),
            Some(handle) => {
                match handle.execute(op, Actor::Local(user_ref)).await {
                    // The lock's task records its own report: no reply shares its commit here.
                    Ok(executed) => {
                        let _ = executed.recorded.send(false);
                        executed.outcome
                    }
                    Err(failure) => Err(failure),
                }
            }
        };
        let (result, detail) = match &outcome {
            Ok(_) => ("ok", format!("from {source}")),
            Err(f) => (f.reason.as_str(), format!("from {source}: {}", f.detail)),
        };
        let now = (self.clock)().0;
        self.store().transaction(|tx| {
            tx.audit(AuditEntry { at: now, action: &action, outcome: result, actor, lock: Some(lock), detail: &detail })
        })?;
        tracing::info!(lock_id = %lock, action, decision = if outcome.is_ok() { "ok" } else { "failed" }, reason = result, "local command");
        Ok(outcome.map_err(|f| f.reason.as_str().to_owned()))
    }

    /// Audits a local command refused before it reached a lock (a wrong code, a lockout).
    pub fn local_refusal(
        &self,
        lock: Option<LockId>,
        action: &str,
        reason: &str,
        source: &str,
    ) -> Result<(), StoreError> {
        let now = (self.clock)().0;
        let detail = format!("from {source}");
        self.store().transaction(|tx| {
            tx.audit(AuditEntry { at: now, action, outcome: reason, actor: AuditActor::Unknown, lock, detail: &detail })
        })?;
        tracing::warn!(
            lock_id = lock.map(|l| l.to_string()),
            action,
            decision = "refused",
            reason,
            "local command refused"
        );
        Ok(())
    }

    /// Unbinds a paired lock: asks it to forget the gateway (when it can be reached), stops
    /// its task, deletes everything the store held about it, clears its retained cloud
    /// topics, and announces it (so that the local bridge clears its own). Returns whether
    /// the lock itself was told; `None` if it was not paired.
    pub async fn unbind(&self, lock: LockId, actor: AuditActor) -> Result<Option<bool>, StoreError> {
        let Some(handle) = self.locks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&lock) else {
            return Ok(None);
        };
        let outcome = match handle.execute(Op::Unpair, Actor::Admin).await {
            Ok(executed) => {
                let _ = executed.recorded.send(false);
                executed.outcome.map(|_| ())
            }
            Err(failure) => Err(failure),
        };
        if let Err(f) = &outcome {
            // Unbound here all the same; the lock keeps its pairing until it is reset by hand.
            tracing::warn!(lock_id = %lock, reason = f.reason.as_str(), detail = %f.detail, "the lock could not be told to forget this gateway");
        }
        let told = outcome.is_ok();
        drop(handle);
        let now = (self.clock)().0;
        let store = self.store.clone();
        let report = tokio::task::spawn_blocking(move || {
            store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).delete_lock(lock, actor, now)
        })
        .await
        .map_err(|_| StoreError::Invalid("the store task failed"))??;
        self.radios.forget(&report.address);
        self.store().transaction(|tx| {
            for topic in &report.retained_topics {
                tx.append_outbox(None, topic, b"", true, now)?;
            }
            Ok(())
        })?;
        self.outbox_ready.notify_one();
        let _ = self.updates.send(LockUpdate::Unbound { lock });
        // Last, so that nothing above waits on it or is skipped if it fails: the files
        // rewritten and the log emptied, no byte of the lock left in them.
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).compact())
            .await
            .map_err(|_| StoreError::Invalid("the store task failed"))??;
        tracing::info!(lock_id = %lock, told, "lock unbound");
        Ok(Some(told))
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

    /// Carries out one statement, recording its outcome.
    pub async fn handle(&self, accepted: Accepted) {
        if let Err(e) = self.try_handle(accepted).await {
            // Unrecorded: the delivery stays unacknowledged and the broker sends it again.
            tracing::error!(error = %e, "could not record a statement's outcome");
        }
    }

    async fn try_handle(&self, accepted: Accepted) -> Result<(), StoreError> {
        let Accepted { signed, text, digest, delivery, mut timing } = accepted;
        let statement = &signed.statement;
        let key = format!("{}:{}", signed.signer, statement.id());
        let lock = match statement {
            Statement::Command(c) => Some(c.lock),
            Statement::Pair(p) => Some(p.lock),
            Statement::Grant(g) => Some(g.lock),
            Statement::Policy(p) => Some(p.lock),
            Statement::LocalCode(c) => Some(c.lock),
            Statement::Claim(_) | Statement::Revoke(_) => None,
        };
        let (_, exp) = statement.validity();
        let owners = self.facts.owners(&self.store)?;
        let owner = owners.iter().any(|k| k.as_slice() == signed.signer.as_bytes());
        // A stranger — anyone but an owner or a known user, signing anything but a claim of an
        // unclaimed gateway — has nothing of theirs remembered: a noted id stays until its
        // statement expires, and a stranger picks the expiry (a grant's may be years away), so
        // a flood of them would fill the disk. Nothing of a stranger's ever runs, so there is
        // nothing to run twice; a replay is judged like the first delivery.
        let claimable = matches!(statement, Statement::Claim(_)) && owners.is_empty();
        let stranger = !owner && !claimable && !self.known_user(&signed.signer, lock)?;
        // A claim of an unclaimed gateway is anyone's, and so is its expiry: it counts as an
        // hour away at most, so the id is remembered two hours at most (once the gateway has
        // its owner, every claim is a stranger's and not remembered at all).
        let remember_until = match statement {
            Statement::Claim(_) => exp.min((self.clock)().0.saturating_add(CLAIM_REMEMBERED_S)),
            _ => exp,
        }
        .saturating_add(REMEMBER_AFTER_EXPIRY_S);
        let seen = if stranger {
            CommandSeen::New
        } else {
            self.store().transaction(|tx| {
                let seen = tx.note_command(&key, lock, remember_until, &digest)?;
                if let CommandSeen::Duplicate(Some(reply)) = &seen {
                    tx.append_outbox(None, &self.topics.replies(), reply, false, (self.clock)().0)?;
                }
                Ok(seen)
            })?
        };
        timing.mark(Stage::Noted);
        // Noted: the broker may forget it now. A stranger's delivery, once its refusal is recorded.
        let delivery = if stranger {
            Some(delivery)
        } else {
            let _ = delivery.stored.send(());
            None
        };
        let replayed = match seen {
            CommandSeen::New => false,
            CommandSeen::Conflict => true,
            CommandSeen::Duplicate(_) => {
                // Answered again (or still running, and answered when done); never run twice.
                self.outbox_ready.notify_one();
                return Ok(());
            }
        };
        let actor = if owner { AuditActor::Admin } else { AuditActor::User(signed.signer.as_bytes().to_vec()) };
        let mut pending = None;
        let (reply, action) = match statement {
            Statement::Command(command) => {
                let (reply, p) = self.command(&signed.signer, command, owner, replayed, &mut timing).await?;
                pending = p;
                (reply, format!("command.{}", command.op.as_str()))
            }
            _ if replayed => (
                refused(statement.id().as_str(), Reason::Replayed, "this id was already used", (self.clock)().0),
                "statement".into(),
            ),
            _ => self.owner_statement(&signed, &text, owner).await?,
        };
        // A claim was audited by `claim::claim`, in the transaction that pinned the owner.
        let actor = match (&signed.statement, reply.reason) {
            (Statement::Claim(_), _) if !replayed => None,
            (_, Some(Reason::UnknownKey)) => Some(AuditActor::Unknown),
            _ => Some(actor),
        };
        let record = self.outcome_record(&key, &reply, &action, actor, lock, !replayed && !stranger, pending);
        timing.mark(Stage::Replied);
        self.finish(record, &reply).await?;
        if let Some(delivery) = delivery {
            let _ = delivery.stored.send(());
        }
        if matches!(statement, Statement::Command(_)) {
            timing.mark(Stage::Committed);
            timing.log(statement.id().as_str());
        }
        Ok(())
    }

    /// Whether `signer` is a user the gateway knows (an owner granted them something once);
    /// from the facts cache when `lock` is paired, which the command's judgement reads next.
    fn known_user(&self, signer: &PublicKey, lock: Option<LockId>) -> Result<bool, StoreError> {
        match lock {
            Some(lock) if self.lock(lock).is_some() => Ok(self
                .facts
                .signer(&self.store, signer.as_bytes(), lock, |store| self.signer_facts(store, signer, lock))?
                .known_user),
            _ => self.store().user_known(signer.as_bytes()),
        }
    }

    /// What the store says about `signer` and paired `lock` (the facts cache's miss).
    fn signer_facts(&self, store: &Store, signer: &PublicKey, lock: LockId) -> Result<SignerFacts, StoreError> {
        let revoked = store.revoked_grant_ids()?;
        let grants = store
            .grants_for(lock)?
            .into_iter()
            .filter(|g| g.user_public_key.as_slice() == signer.as_bytes())
            .filter_map(|g| {
                let grant = self.verified_grant(&g.statement)?;
                Some(GrantFacts { revoked: revoked.contains(grant.jti.as_str()), grant })
            })
            .collect();
        let policy = store.policy(Some(lock))?.and_then(|p| serde_json::from_str(&p).ok()).unwrap_or_default();
        Ok(SignerFacts { known_user: store.user_known(signer.as_bytes())?, grants, policy })
    }

    /// Records an outcome: the reply to the outbox, the lock's report if the command produced
    /// one, the audit record, and (for the first delivery) the reply kept for redeliveries —
    /// one transaction, so a command costs one durable commit after it ran. The reply itself
    /// leaves first, through the express lane; the commit runs on the blocking pool, so that
    /// this worker is free for the link to send it meanwhile.
    async fn finish(&self, record: OutcomeRecord, reply: &Reply) -> Result<(), StoreError> {
        let (action, lock) = (record.action.clone(), record.lock);
        let store = self.store.clone();
        let committed = tokio::task::spawn_blocking(move || record_outcome(&store, record))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        self.decided(reply, &action, lock, committed)
    }

    /// What [`record_outcome`] writes, with the reply handed to the express lane.
    #[allow(clippy::too_many_arguments)]
    fn outcome_record(
        &self,
        key: &str,
        reply: &Reply,
        action: &str,
        actor: Option<AuditActor>,
        lock: Option<LockId>,
        keep: bool,
        pending: Option<Pending>,
    ) -> OutcomeRecord {
        let payload = reply.to_json();
        let (report, recorded) = match pending {
            Some(Pending { report, recorded }) => (report, Some(recorded)),
            None => (None, None),
        };
        let topic = self.topics.replies();
        // The reply leaves now; the link learns which outbox record is this one when committed.
        let express = self.express.get().and_then(|lane| lane.send(topic.clone(), payload.clone()));
        OutcomeRecord {
            key: key.to_owned(),
            topic,
            payload,
            at: reply.at,
            action: action.to_owned(),
            outcome: reply.reason.map_or("ok", Reason::as_str),
            detail: reply.detail.clone().unwrap_or_default(),
            actor,
            lock,
            keep,
            report,
            recorded,
            express,
        }
    }

    /// Logs a recorded decision and wakes the link.
    fn decided(
        &self,
        reply: &Reply,
        action: &str,
        lock: Option<LockId>,
        committed: Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        committed?;
        // Field names chosen for the journal (LOCK_ID, COMMAND_ID, DECISION, REASON).
        tracing::info!(
            command_id = %reply.id,
            lock_id = lock.map(|l| l.to_string()),
            action,
            decision = reply.result.as_str(),
            reason = reply.reason.map_or("ok", Reason::as_str),
            "statement decided"
        );
        self.outbox_ready.notify_one();
        Ok(())
    }

    async fn command(
        &self,
        signer: &PublicKey,
        command: &Command,
        owner: bool,
        replayed: bool,
        timing: &mut Timing,
    ) -> Result<(Reply, Option<Pending>), StoreError> {
        let (now, synced) = (self.clock)();
        let id = command.jti.as_str();
        // A paired lock is one with a task: no store read for it on the command path.
        let handle = self.lock(command.lock);
        let lock_paired = handle.is_some();
        let signer_facts = if lock_paired {
            self.facts.signer(&self.store, signer.as_bytes(), command.lock, |store| {
                self.signer_facts(store, signer, command.lock)
            })?
        } else {
            Arc::new(SignerFacts { known_user: self.store().user_known(signer.as_bytes())?, ..SignerFacts::default() })
        };
        let facts = Facts {
            now,
            clock_synced: synced,
            seen: replayed,
            owner,
            known_user: signer_facts.known_user,
            lock_paired,
            grants: &signer_facts.grants,
            policy: &signer_facts.policy,
        };
        let decision =
            self.policy.lock().unwrap_or_else(std::sync::PoisonError::into_inner).decide(signer, command, &facts);
        timing.mark(Stage::Decided);
        let role = match decision {
            Ok(role) => role,
            Err(denial) => return Ok((refused(id, denial.reason, &denial.detail, now), None)),
        };
        // The policy refused unpaired locks already (unknown_lock).
        let Some(handle) = handle else {
            return Ok((refused(id, Reason::UnknownLock, "the lock is not paired", now), None));
        };
        let actor = if role == Role::Owner { Actor::Admin } else { Actor::Cloud(user_ref(signer)) };
        // The reply must come before the command's deadline.
        let left = Duration::from_secs(command.exp.saturating_sub(now).max(1) as u64);
        let executed = match tokio::time::timeout(left, handle.execute(op_of(command.op), actor)).await {
            Ok(executed) => executed,
            Err(_) => Err(super::lock_worker::Failure {
                reason: Reason::LockUnreachable,
                detail: "no answer from the lock before the command's deadline".into(),
            }),
        };
        timing.mark(Stage::Answered);
        let (outcome, pending) = match executed {
            Ok(Executed { outcome, report, recorded, ran: (taken, answered) }) => {
                timing.mark_at(Stage::Taken, taken);
                timing.mark_at(Stage::LockAnswered, answered);
                (outcome, Some(Pending { report, recorded }))
            }
            Err(failure) => (Err(failure), None),
        };
        let (at, _) = (self.clock)();
        let reply = match outcome {
            Ok(status) => ok(id, status.map_or("done", |s| crate::cloud::lock_report::state_name(s.state)), at),
            Err(failure) => failed(id, failure.reason, &failure.detail, at),
        };
        Ok((reply, pending))
    }

    /// The grant a stored statement holds, if its signature holds (checked once per text).
    fn verified_grant(&self, statement: &[u8]) -> Option<Grant> {
        let digest: [u8; 32] = sha2::Sha256::digest(statement).into();
        let mut verified = self.verified_grants.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(grant) = verified.get(&digest) {
            return Some(grant.clone());
        }
        let Statement::Grant(grant) = open(std::str::from_utf8(statement).ok()?).ok()?.statement else { return None };
        if verified.len() >= VERIFIED_GRANTS {
            verified.clear();
        }
        verified.insert(digest, grant.clone());
        Some(grant)
    }

    /// Claim, pair, grant, revoke, policy, local code.
    async fn owner_statement(&self, signed: &Signed, text: &str, owner: bool) -> Result<(Reply, String), StoreError> {
        let (now, synced) = (self.clock)();
        let statement = &signed.statement;
        let id = statement.id().as_str();
        let (_, exp) = statement.validity();
        if let Statement::Claim(c) = statement {
            let outcome = claim::claim(&mut self.store(), &signed.signer, c, now)?;
            let reply = match outcome {
                Ok(()) => ok(id, "claimed: the signer is the owner", now),
                Err(reason) => refused(id, reason, "claim refused", now),
            };
            return Ok((reply, "gateway.claim".into()));
        }
        if !owner {
            return Ok((refused(id, Reason::UnknownKey, "only the owner may sign this", now), "statement".into()));
        }
        if synced && exp < now {
            return Ok((refused(id, Reason::Expired, "the statement has expired", now), "statement".into()));
        }
        match statement {
            Statement::Pair(p) => Ok((self.pair(id, p.lock, &p.setup).await?, "lock.pair".into())),
            Statement::Grant(g) => {
                if let Some(s) = &g.schedule
                    && let Err(e) = s.validate()
                {
                    return Ok((refused(id, Reason::Malformed, &e.to_string(), now), "grant.add".into()));
                }
                if self.lock(g.lock).is_none() {
                    return Ok((refused(id, Reason::UnknownLock, "the lock is not paired", now), "grant.add".into()));
                }
                self.store().transaction(|tx| {
                    tx.add_user(g.sub.as_bytes(), now)?;
                    tx.put_grant(g.jti.as_str(), g.lock, g.sub.as_bytes(), text.as_bytes(), Some(g.exp))
                })?;
                Ok((ok(id, "granted", now), "grant.add".into()))
            }
            Statement::Revoke(r) => {
                // The id names a grant or a local code; a local code is removed outright.
                let removed_code = self.store().transaction(|tx| {
                    tx.put_revocation(r.grant.as_str(), None, text.as_bytes(), now)?;
                    tx.remove_local_code(r.grant.as_str())
                })?;
                Ok((ok(id, "revoked", now), if removed_code { "local_code.revoke" } else { "grant.revoke" }.into()))
            }
            Statement::LocalCode(c) => {
                if let Err(e) = validate_hash(&c.hash) {
                    return Ok((refused(id, Reason::Malformed, &format!("hash: {e}"), now), "local_code.set".into()));
                }
                if self.lock(c.lock).is_none() {
                    return Ok((
                        refused(id, Reason::UnknownLock, "the lock is not paired", now),
                        "local_code.set".into(),
                    ));
                }
                self.store().transaction(|tx| {
                    tx.add_user(c.sub.as_bytes(), now)?;
                    tx.put_local_code(c.jti.as_str(), c.lock, c.sub.as_bytes(), &c.hash, c.nbf, c.exp)
                })?;
                Ok((ok(id, "local code set", now), "local_code.set".into()))
            }
            Statement::Policy(p) => {
                if let Some(s) = &p.quiet_hours
                    && let Err(e) = s.validate()
                {
                    return Ok((refused(id, Reason::Malformed, &e.to_string(), now), "policy.set".into()));
                }
                if self.lock(p.lock).is_none() {
                    return Ok((refused(id, Reason::UnknownLock, "the lock is not paired", now), "policy.set".into()));
                }
                let policy = LockPolicy { remote_unlock: p.remote_unlock, quiet_hours: p.quiet_hours.clone() };
                let json = serde_json::to_string(&policy).expect("policies serialise");
                self.store().transaction(|tx| tx.set_policy(Some(p.lock), &json))?;
                Ok((
                    ok(id, if p.remote_unlock { "remote unlock on" } else { "remote unlock off" }, now),
                    "policy.set".into(),
                ))
            }
            Statement::Claim(_) | Statement::Command(_) => unreachable!("handled above"),
        }
    }

    async fn pair(&self, id: &str, lock: LockId, setup: &str) -> Result<Reply, StoreError> {
        let (now, _) = (self.clock)();
        let Ok(code) = SetupCode::parse(setup) else {
            return Ok(refused(id, Reason::Malformed, "the setup code is 8 digits", now));
        };
        // Find the lock on the radio (it must be in pairing mode to accept), for as long as a
        // connection may take: a lock advertises every few hundred ms, but a scan hears it
        // only as often as the stack reports (under btvirt, once per scan restart, ~10 s).
        // Every adapter looks; the first to hear it pairs it and becomes its home.
        let bound = self.ble.connect_timeout().max(Duration::from_secs(10));
        let (heard_by, ad) = match self.radios.locate(lock, bound).await {
            Ok(found) => found,
            Err(e) => return Ok(failed(id, Reason::LockUnreachable, &format!("the lock was not seen: {e}"), now)),
        };
        let radio = self.radios.get(heard_by);
        let paired = pair(&**radio.transport(), radio.budget(), &self.ble, &self.id, lock, &ad.address, &code).await;
        let key = match paired {
            Ok(key) => key,
            Err(e) => return Ok(failed(id, Reason::Failed, &format!("pairing failed: {e} ({})", e.code()), now)),
        };
        self.store().transaction(|tx| tx.add_lock(lock, &ad.address, &lock.to_string(), &key, now))?;
        self.start_lock(lock, ad.address.clone(), key, now, 0, Some(heard_by));
        Ok(ok(id, "paired", now))
    }

    /// Pairs a lock for the hub's administrator (the control socket) with the setup code on
    /// its label; audited as the admin's. The reply says how it went.
    pub async fn admin_pair(&self, lock: LockId, setup: &str) -> Result<Reply, StoreError> {
        let reply = self.pair("admin", lock, setup).await?;
        let outcome = reply.reason.map_or("ok", Reason::as_str);
        let detail = reply.detail.clone().unwrap_or_default();
        self.store().transaction(|tx| {
            tx.audit(AuditEntry {
                at: reply.at,
                action: "lock.pair",
                outcome,
                actor: AuditActor::Admin,
                lock: Some(lock),
                detail: &detail,
            })
        })?;
        Ok(reply)
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

/// An outcome to record in one transaction (see [`Gateway::finish`]).
struct OutcomeRecord {
    key: String,
    topic: String,
    payload: Vec<u8>,
    at: i64,
    action: String,
    outcome: &'static str,
    detail: String,
    actor: Option<AuditActor>,
    lock: Option<LockId>,
    /// Keep the reply for redeliveries (first deliveries only).
    keep: bool,
    report: Option<super::lock_worker::Report>,
    /// Told whether `report` was committed (the lock's task records it otherwise).
    recorded: Option<tokio::sync::oneshot::Sender<bool>>,
    /// Told which outbox record holds the reply.
    express: Option<ExpressRecord>,
}

/// Writes an outcome in one transaction; blocking (a durable commit).
fn record_outcome(store: &Mutex<Store>, r: OutcomeRecord) -> Result<(), StoreError> {
    let mut store = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let committed = store.transaction(|tx| {
        // The reply first: it leaves the outbox ahead of the lock's reports.
        let record = tx.append_outbox(None, &r.topic, &r.payload, false, r.at)?;
        if let Some(report) = &r.report {
            report.write(tx)?;
        }
        if let Some(actor) = r.actor.clone() {
            let (action, outcome, lock, detail) = (r.action.as_str(), r.outcome, r.lock, r.detail.as_str());
            tx.audit(AuditEntry { at: r.at, action, outcome, actor, lock, detail })?;
        }
        if r.keep {
            tx.set_command_reply(&r.key, &r.payload)?;
        }
        Ok(record)
    });
    // Still under the store's lock: see `ExpressRecord`.
    if let Some(express) = r.express {
        express.committed(committed.as_ref().ok().copied());
    }
    drop(store);
    if let Some(recorded) = r.recorded {
        let _ = recorded.send(committed.is_ok());
    }
    committed.map(|_| ())
}

fn ok(id: &str, detail: &str, at: i64) -> Reply {
    Reply { id: id.to_owned(), result: Outcome::Ok, reason: None, detail: Some(detail.to_owned()), at }
}

fn refused(id: &str, reason: Reason, detail: &str, at: i64) -> Reply {
    Reply::refused(id, reason, detail, at)
}

fn failed(id: &str, reason: Reason, detail: &str, at: i64) -> Reply {
    Reply { result: Outcome::Failed, ..Reply::refused(id, reason, detail, at) }
}
