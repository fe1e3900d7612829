//! What the gateway decides about a statement that passed the intake, before anything acts on
//! it: a pure function of the statement, what the store says about its signer and lock, and
//! the clock (the policy engine's [`Facts`], gathered by the caller). No I/O, so every order
//! and every refusal code is pinned by the unit tests below; `docs/mqtt-api.md` documents the
//! same order.
//!
//! Before any check, a redelivery — the same id with the same bytes, while the id is
//! remembered (until an hour after the statement's `exp`) — gets the stored reply, whatever the
//! clock says now: an app retrying a command that ran must learn that it ran, not that it has
//! expired since. A stranger's ids are not remembered (see `statements`), so theirs are judged
//! afresh each time. Then:
//! - commands go through the policy engine ([`PolicyEngine::decide`]: clock, expiry, replay,
//!   lockout, signer, lock, grants, remote policy, quiet hours, rate);
//! - owner statements: `replayed` (the id with other bytes); a claim is judged against the claim
//!   code in the store (`claim::claim`); then `unknown_key` (not the owner), `expired` (once the
//!   clock is trusted), `malformed` (a schedule, hash or setup code that does not hold) and
//!   `unknown_lock` (a grant, policy or local code for a lock that is not paired).

use super::policy::{Denial, Facts, PolicyEngine, Role};
use crate::auth::keys::PublicKey;
use crate::auth::local_code::validate_hash;
use crate::auth::reason::Reason;
use crate::auth::statement::Statement;
use crate::protocol::pairing::SetupCode;

/// The decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A redelivery: answer with the stored reply; nothing runs again.
    Redelivery,
    /// Refused, and why.
    Refused(Denial),
    /// A claim: judged against the claim code the store holds (`claim::claim`).
    Claim,
    /// Carry it out, with the signer in this role.
    Carry(Role),
}

/// Decides `statement` signed by `signer`: `redelivery` when its id came before with the same
/// bytes and is still remembered (`facts.seen`: with other bytes). The policy engine keeps its
/// memory of recent decisions (rate limits, lockouts), the one state a decision changes.
pub fn decide(
    statement: &Statement,
    signer: &PublicKey,
    redelivery: bool,
    facts: &Facts<'_>,
    policy: &mut PolicyEngine,
) -> Verdict {
    if redelivery {
        return Verdict::Redelivery;
    }
    let decided = match statement {
        Statement::Command(command) => policy.decide(signer, command, facts).map(Verdict::Carry),
        _ => owner_statement(statement, facts),
    };
    decided.unwrap_or_else(Verdict::Refused)
}

/// Whether a refusal of an owner statement is of the statement as such — its id, signer or
/// validity — and so audited as `statement`, rather than of what it asks (audited under its
/// own action, `grant.add`, `policy.set`, ...).
pub fn refuses_the_statement(reason: Reason) -> bool {
    matches!(reason, Reason::Replayed | Reason::UnknownKey | Reason::Expired)
}

fn refuse(reason: Reason, detail: impl Into<String>) -> Denial {
    Denial { reason, detail: detail.into() }
}

fn owner_statement(statement: &Statement, facts: &Facts<'_>) -> Result<Verdict, Denial> {
    if facts.seen {
        return Err(refuse(Reason::Replayed, "this id was already used"));
    }
    if let Statement::Claim(_) = statement {
        return Ok(Verdict::Claim);
    }
    if !facts.owner {
        return Err(refuse(Reason::UnknownKey, "only the owner may sign this"));
    }
    let (_, exp) = statement.validity();
    if facts.clock_synced && exp < facts.now {
        return Err(refuse(Reason::Expired, "the statement has expired"));
    }
    let needs_lock = match statement {
        Statement::Pair(p) => {
            SetupCode::parse(&p.setup).map_err(|_| refuse(Reason::Malformed, "the setup code is 8 digits"))?;
            false
        }
        Statement::Grant(g) => {
            if let Some(schedule) = &g.schedule {
                schedule.validate().map_err(|e| refuse(Reason::Malformed, e.to_string()))?;
            }
            true
        }
        Statement::LocalCode(c) => {
            validate_hash(&c.hash).map_err(|e| refuse(Reason::Malformed, format!("hash: {e}")))?;
            true
        }
        Statement::Policy(p) => {
            if let Some(schedule) = &p.quiet_hours {
                schedule.validate().map_err(|e| refuse(Reason::Malformed, e.to_string()))?;
            }
            true
        }
        Statement::Revoke(_) => false,
        Statement::Claim(_) | Statement::Command(_) => unreachable!("decided above"),
    };
    if needs_lock && !facts.lock_paired {
        return Err(refuse(Reason::UnknownLock, "the lock is not paired"));
    }
    Ok(Verdict::Carry(Role::Owner))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::statement::{
        Claim, Command, Grant, LocalCode, Operation, Pair, Permission, Policy, Revoke, Schedule, StatementId,
    };
    use crate::gateway::policy::{LockPolicy, PolicyLimits};
    use crate::protocol::ids::{GatewayId, LockId};

    const NOW: i64 = 1_796_029_200;
    const LOCK: LockId = LockId([7; 8]);

    fn signer() -> PublicKey {
        PublicKey::from_bytes([2; 32])
    }

    fn id(text: &str) -> StatementId {
        StatementId::new(text).unwrap()
    }

    fn gw() -> GatewayId {
        GatewayId::new("gw").unwrap()
    }

    /// The facts of an owner's statement about a paired lock, on a trusted clock, seen first.
    fn owners() -> Facts<'static> {
        static POLICY: LockPolicy = LockPolicy { remote_unlock: false, quiet_hours: None };
        Facts {
            now: NOW,
            clock_synced: true,
            seen: false,
            owner: true,
            known_user: false,
            lock_paired: true,
            grants: &[],
            policy: &POLICY,
        }
    }

    fn bad_schedule() -> Schedule {
        Schedule { tz: "Mars/Olympus".into(), days: vec!["mon".into()], from: "09:00".into(), to: "12:00".into() }
    }

    fn grant(exp: i64, schedule: Option<Schedule>) -> Statement {
        Statement::Grant(Grant {
            jti: id("g-1"),
            gw: gw(),
            sub: PublicKey::from_bytes([3; 32]),
            lock: LOCK,
            perms: vec![Permission::Unlock],
            nbf: NOW - 10,
            iat: NOW - 10,
            exp,
            schedule,
        })
    }

    fn command(exp: i64) -> Statement {
        Statement::Command(Command {
            jti: id("c-1"),
            gw: gw(),
            lock: LOCK,
            op: Operation::Unlock,
            iat: exp - 30,
            exp,
            nonce: "nnnnnnnnnnnnnnnn".into(),
        })
    }

    fn decided(statement: &Statement, facts: &Facts<'_>) -> Verdict {
        decide(statement, &signer(), false, facts, &mut PolicyEngine::new(PolicyLimits::default()))
    }

    fn redelivered(statement: &Statement, facts: &Facts<'_>) -> Verdict {
        decide(statement, &signer(), true, facts, &mut PolicyEngine::new(PolicyLimits::default()))
    }

    fn reason(verdict: Verdict) -> Reason {
        match verdict {
            Verdict::Refused(denial) => denial.reason,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_redelivery_gets_the_stored_reply_before_any_check_even_once_expired() {
        let late = Facts { now: NOW + 3000, ..owners() };
        let stranger = Facts { owner: false, clock_synced: false, ..late.clone() };
        for statement in [command(NOW), grant(NOW, None)] {
            assert_eq!(redelivered(&statement, &late), Verdict::Redelivery);
            assert_eq!(redelivered(&statement, &stranger), Verdict::Redelivery);
        }
    }

    #[test]
    fn a_command_past_its_expiry_is_expired_before_it_is_a_replay() {
        let late = Facts { now: NOW + 1, seen: true, ..owners() };
        assert_eq!(reason(decided(&command(NOW), &late)), Reason::Expired);
        let in_time = Facts { seen: true, ..owners() };
        assert_eq!(reason(decided(&command(NOW), &in_time)), Reason::Replayed);
        let untrusted = Facts { clock_synced: false, ..late };
        assert_eq!(reason(decided(&command(NOW), &untrusted)), Reason::ClockUnsynchronised);
    }

    #[test]
    fn an_owner_statement_is_judged_replay_signer_expiry_form_lock_in_that_order() {
        let base = owners();
        let expired_bad_for_unpaired = grant(NOW - 1, Some(bad_schedule()));
        let facts = |f: Facts<'static>| Facts { lock_paired: false, ..f };
        // Every check fails: the first one names the refusal; each passed in turn, the next.
        let all = facts(Facts { seen: true, owner: false, ..base.clone() });
        assert_eq!(reason(decided(&expired_bad_for_unpaired, &all)), Reason::Replayed);
        let not_owner = facts(Facts { owner: false, ..base.clone() });
        assert_eq!(reason(decided(&expired_bad_for_unpaired, &not_owner)), Reason::UnknownKey);
        let owner = facts(base.clone());
        assert_eq!(reason(decided(&expired_bad_for_unpaired, &owner)), Reason::Expired);
        assert_eq!(reason(decided(&grant(NOW, Some(bad_schedule())), &owner)), Reason::Malformed);
        assert_eq!(reason(decided(&grant(NOW, None), &owner)), Reason::UnknownLock);
        assert_eq!(decided(&grant(NOW, None), &base), Verdict::Carry(Role::Owner));
        // Expiry counts only on a trusted clock (a hub set up before NTP answered).
        let untrusted = Facts { clock_synced: false, ..base };
        assert_eq!(decided(&grant(NOW - 1, None), &untrusted), Verdict::Carry(Role::Owner));
    }

    #[test]
    fn each_owner_statement_checks_its_own_form_and_lock() {
        let base = owners();
        let unpaired = Facts { lock_paired: false, ..base.clone() };
        let pair = |setup: &str| {
            Statement::Pair(Pair { jti: id("p-1"), gw: gw(), lock: LOCK, setup: setup.into(), iat: NOW, exp: NOW + 60 })
        };
        assert_eq!(reason(decided(&pair("1234"), &base)), Reason::Malformed);
        assert_eq!(decided(&pair("12345678"), &unpaired), Verdict::Carry(Role::Owner), "pairing needs no paired lock");
        let local_code = |hash: &str| {
            Statement::LocalCode(LocalCode {
                jti: id("l-1"),
                gw: gw(),
                sub: PublicKey::from_bytes([3; 32]),
                lock: LOCK,
                hash: hash.into(),
                nbf: NOW,
                iat: NOW,
                exp: NOW + 60,
            })
        };
        assert_eq!(reason(decided(&local_code("plaintext"), &base)), Reason::Malformed);
        let policy = |quiet_hours| {
            Statement::Policy(Policy {
                jti: id("pol-1"),
                gw: gw(),
                lock: LOCK,
                remote_unlock: true,
                quiet_hours,
                iat: NOW,
                exp: NOW + 60,
            })
        };
        assert_eq!(reason(decided(&policy(Some(bad_schedule())), &base)), Reason::Malformed);
        assert_eq!(reason(decided(&policy(None), &unpaired)), Reason::UnknownLock);
        assert_eq!(decided(&policy(None), &base), Verdict::Carry(Role::Owner));
        let revoke = Statement::Revoke(Revoke { jti: id("r-1"), gw: gw(), grant: id("g-1"), iat: NOW, exp: NOW + 60 });
        assert_eq!(decided(&revoke, &unpaired), Verdict::Carry(Role::Owner), "a revocation names no lock");
    }

    #[test]
    fn a_claim_is_anyones_until_the_store_judges_its_code_but_not_twice() {
        let claim = Statement::Claim(Claim { jti: id("k-1"), gw: gw(), code: "1234".into(), iat: NOW, exp: NOW - 1 });
        let stranger = Facts { owner: false, lock_paired: false, ..owners() };
        assert_eq!(decided(&claim, &stranger), Verdict::Claim, "expiry and code are the claim's own checks");
        let again = Facts { seen: true, ..stranger };
        assert_eq!(reason(decided(&claim, &again)), Reason::Replayed);
    }

    #[test]
    fn refusals_of_the_statement_itself_are_told_from_refusals_of_what_it_asks() {
        for reason in [Reason::Replayed, Reason::UnknownKey, Reason::Expired] {
            assert!(refuses_the_statement(reason), "{reason:?}");
        }
        for reason in [Reason::Malformed, Reason::UnknownLock] {
            assert!(!refuses_the_statement(reason), "{reason:?}");
        }
    }
}
