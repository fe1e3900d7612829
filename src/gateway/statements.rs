//! One statement's way from the intake to its recorded outcome: its id noted durably before
//! the broker's acknowledgement, the facts gathered, the decision (`decision`), then carried
//! out — a command on the lock's task, a claim against the store's code, a pairing, a grant
//! or the like — and the outcome recorded (`replies`).
//!
//! Every statement id is noted (with a digest of its bytes) before the broker gets its
//! acknowledgement, so a redelivery is answered with the stored reply and never runs twice,
//! and the same id with other bytes is a replay. Every outcome — allowed or refused — is one
//! transaction: the audit record, the reply in the outbox, and the reply kept for redeliveries.
//! Owner statements run in arrival order (a grant is in force before the command after it);
//! commands run concurrently, serialised per lock by the lock's task.

use std::sync::Arc;
use std::time::Duration;

use sha2::Digest;
use tokio::sync::mpsc;

use super::claim;
use super::core::Gateway;
use super::decision::{Verdict, decide, refuses_the_statement};
use super::facts_cache::SignerFacts;
use super::lock_worker::{Executed, Failure};
use super::policy::{Facts, GrantFacts, Role};
use super::replies::{Pending, failed, ok, refused};
use super::timing::{Stage, Timing};
use crate::auth::keys::PublicKey;
use crate::auth::reason::Reason;
use crate::auth::statement::{Command, Grant, Operation, Signed, Statement, open};
use crate::ble::LockTransport;
use crate::cloud::link::InboundCommand;
use crate::cloud::reply::Reply;
use crate::protocol::ids::LockId;
use crate::protocol::message::{Actor, Op, UserRef};
use crate::store::audit::AuditActor;
use crate::store::{CommandSeen, Store, StoreError};

/// How long a seen statement id is remembered after its expiry, so that a late redelivery is
/// still answered with the stored reply.
const REMEMBER_AFTER_EXPIRY_S: i64 = 3600;

/// The longest a claim counts as unexpired for remembering its id, whatever its `exp` says.
const CLAIM_REMEMBERED_S: i64 = 3600;

/// Verified grants remembered at most (the memory is emptied when full: a miss only costs a
/// signature check).
pub(super) const VERIFIED_GRANTS: usize = 1024;

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

fn op_of(op: Operation) -> Op {
    match op {
        Operation::Lock => Op::Lock,
        Operation::Unlock => Op::Unlock,
        Operation::Unlatch => Op::Unlatch,
    }
}

/// The lock a statement names, if any.
fn lock_of(statement: &Statement) -> Option<LockId> {
    match statement {
        Statement::Command(c) => Some(c.lock),
        Statement::Pair(p) => Some(p.lock),
        Statement::Grant(g) => Some(g.lock),
        Statement::Policy(p) => Some(p.lock),
        Statement::LocalCode(c) => Some(c.lock),
        Statement::Claim(_) | Statement::Revoke(_) => None,
    }
}

/// The audit action of a statement refused with `reason`.
fn refused_action(statement: &Statement, reason: Reason) -> String {
    match statement {
        Statement::Command(c) => format!("command.{}", c.op.as_str()),
        _ if refuses_the_statement(reason) => "statement".into(),
        Statement::Claim(_) => "gateway.claim".into(),
        Statement::Pair(_) => "lock.pair".into(),
        Statement::Grant(_) => "grant.add".into(),
        Statement::Revoke(_) => "grant.revoke".into(),
        Statement::LocalCode(_) => "local_code.set".into(),
        Statement::Policy(_) => "policy.set".into(),
    }
}

impl<T: LockTransport> Gateway<T> {
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
        let lock = lock_of(statement);
        let (_, exp) = statement.validity();
        let owners = self.facts.owners(&self.store)?;
        let owner = owners.iter().any(|k| k.as_slice() == signed.signer.as_bytes());
        // A paired lock is one with a task: no store read for it on the command path.
        let lock_paired = lock.is_some_and(|lock| self.lock(lock).is_some());
        // What the store says of the signer: a command's judgement reads it all, and whether
        // anyone else is a stranger reads whether they are known; an owner's other statements
        // need none of it.
        let signer = if owner && !matches!(statement, Statement::Command(_)) {
            Arc::new(SignerFacts::default())
        } else {
            self.signer_facts_of(&signed.signer, lock.filter(|_| lock_paired))?
        };
        // A stranger — anyone but an owner or a known user, signing anything but a claim of an
        // unclaimed gateway — has nothing of theirs remembered: a noted id stays until its
        // statement expires, and a stranger picks the expiry (a grant's may be years away), so
        // a flood of them would fill the disk. Nothing of a stranger's ever runs, so there is
        // nothing to run twice; a replay is judged like the first delivery.
        let claimable = matches!(statement, Statement::Claim(_)) && owners.is_empty();
        let stranger = !owner && !claimable && !signer.known_user;
        // A claim of an unclaimed gateway is anyone's, and so is its expiry: it counts as an
        // hour away at most, so the id is remembered two hours at most (once the gateway has
        // its owner, every claim is a stranger's and not remembered at all).
        let remember_until = match statement {
            Statement::Claim(_) => exp.min((self.clock)().0.saturating_add(CLAIM_REMEMBERED_S)),
            _ => exp,
        }
        .saturating_add(REMEMBER_AFTER_EXPIRY_S);
        // A stranger's id is not remembered (above), so it needs no key of theirs either.
        let (key, seen) = if stranger {
            (String::new(), CommandSeen::New)
        } else {
            self.store().transaction(|tx| {
                // Keyed for a known user: forget-user leaves no row naming their key.
                let (key, digest) = tx.seen_key(&signed.signer, statement.id().as_str(), &digest)?;
                let seen = tx.note_command(&key, lock, remember_until, &digest)?;
                if let CommandSeen::Duplicate(Some(reply)) = &seen {
                    tx.append_outbox(None, &self.topics.replies(), reply, false, (self.clock)().0)?;
                }
                Ok((key, seen))
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
        let redelivery = matches!(seen, CommandSeen::Duplicate(_));
        let replayed = matches!(seen, CommandSeen::Conflict);
        let (now, synced) = (self.clock)();
        let facts = Facts {
            now,
            clock_synced: synced,
            seen: replayed,
            owner,
            known_user: signer.known_user,
            lock_paired,
            grants: &signer.grants,
            policy: &signer.policy,
        };
        let verdict = decide(
            statement,
            &signed.signer,
            redelivery,
            &facts,
            &mut self.policy.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        timing.mark(Stage::Decided);
        let id = statement.id().as_str();
        let mut pending = None;
        let (reply, action) = match (verdict, statement) {
            (Verdict::Redelivery, _) => {
                // Answered again (or still running, and answered when done); never run twice.
                self.outbox_ready.notify_one();
                return Ok(());
            }
            (Verdict::Refused(denial), _) => {
                (refused(id, denial.reason, &denial.detail, now), refused_action(statement, denial.reason))
            }
            (Verdict::Carry(role), Statement::Command(command)) => {
                let (mut reply, p) = self.run_command(signer.lock_ref, command, role, &mut timing).await?;
                // The user learns how the lock's log and the events name them.
                if role != Role::Owner {
                    reply.actor = signer.lock_ref.map(|r| crate::cloud::lock_report::hex(&r.0));
                }
                pending = p;
                (reply, format!("command.{}", command.op.as_str()))
            }
            (Verdict::Claim, Statement::Claim(c)) => {
                let reply = match claim::claim(&mut self.store(), &signed.signer, c, now)? {
                    Ok(()) => ok(id, "claimed: the signer is the owner", now),
                    Err(reason) => refused(id, reason, "claim refused", now),
                };
                (reply, "gateway.claim".into())
            }
            (Verdict::Carry(_), Statement::Pair(p)) => (self.pair(id, p.lock, &p.setup).await?, "lock.pair".into()),
            (Verdict::Carry(_), _) => {
                let (reply, action) = self.apply(statement, &text, now)?;
                (reply, action.to_owned())
            }
            (Verdict::Claim, _) => unreachable!("only a claim is judged as one"),
        };
        // A claim was audited by `claim::claim`, in the transaction that pinned the owner.
        let actor = if owner { AuditActor::Owner } else { AuditActor::User(signed.signer.as_bytes().to_vec()) };
        let actor = match (&signed.statement, reply.reason) {
            (Statement::Claim(_), _) if !replayed => None,
            (_, Some(Reason::UnknownKey)) => Some(AuditActor::Unknown),
            _ => Some(actor),
        };
        let record = self.replies.record(&key, &reply, &action, actor, lock, !replayed && !stranger, pending);
        timing.mark(Stage::Replied);
        self.replies.finish(record, &reply).await?;
        if let Some(delivery) = delivery {
            let _ = delivery.stored.send(());
        }
        if matches!(statement, Statement::Command(_)) {
            timing.mark(Stage::Committed);
            timing.log(statement.id().as_str());
        }
        Ok(())
    }

    /// What the store says about `signer` and, when it names a paired one, `lock`: from the
    /// facts cache, which commands read on every call.
    fn signer_facts_of(&self, signer: &PublicKey, lock: Option<LockId>) -> Result<Arc<SignerFacts>, StoreError> {
        match lock {
            Some(lock) => {
                self.facts.signer(&self.store, signer.as_bytes(), lock, |store| self.signer_facts(store, signer, lock))
            }
            None => Ok(Arc::new(SignerFacts {
                known_user: self.store().user_known(signer.as_bytes())?,
                ..SignerFacts::default()
            })),
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
        let lock_ref = store.user_lock_ref(signer.as_bytes())?.map(UserRef);
        Ok(SignerFacts { known_user: lock_ref.is_some(), grants, policy, lock_ref })
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

    /// Runs an allowed command on the lock's task, within the command's deadline.
    async fn run_command(
        &self,
        signer: Option<UserRef>,
        command: &Command,
        role: Role,
        timing: &mut Timing,
    ) -> Result<(Reply, Option<Pending>), StoreError> {
        let now = (self.clock)().0;
        let id = command.jti.as_str();
        // Unbound since the decision: the lock is not paired any more.
        let Some(handle) = self.lock(command.lock) else {
            return Ok((refused(id, Reason::UnknownLock, "the lock is not paired", now), None));
        };
        // A user's command is carried out only when the gateway knows them, so they have a
        // reference; the all-zero one would say "someone unknown" in the lock's log.
        let actor = match role {
            Role::Owner => Actor::Admin,
            _ => Actor::Cloud(signer.unwrap_or(UserRef([0; 8]))),
        };
        // The reply must come before the command's deadline.
        let left = Duration::from_secs(command.exp.saturating_sub(now).max(1) as u64);
        let executed = match tokio::time::timeout(left, handle.execute(op_of(command.op), actor)).await {
            Ok(executed) => executed,
            Err(_) => Err(Failure {
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
}
