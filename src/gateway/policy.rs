//! The policy engine: whether a verified remote command may run, decided by the gateway alone.
//!
//! [`PolicyEngine::decide`] is a pure function of the command, the facts the caller gathered
//! from the store ([`Facts`]) and the engine's own memory of recent decisions (rate limits and
//! lockouts). The checks run in a fixed, documented order and the first that fails names the
//! refusal (docs/mqtt-api.md, "Policy"):
//!
//! 1. `clock_unsynchronised` — the gateway's clock has never been synchronised;
//! 2. `expired` / `not_yet_valid` — the command's `exp` has passed, or its `iat` is ahead of the
//!    gateway's clock by more than the allowed skew;
//! 3. `replayed` — its id was seen before (persisted, so also across restarts);
//! 4. `locked_out` — the signer has had too many refusals recently;
//! 5. `unknown_key` — the signer is neither an owner nor a user with a grant;
//! 6. `unknown_lock` — the lock is not paired;
//! 7. for users: `revoked` (every grant for this lock revoked), `not_granted` (no grant valid
//!    now with this operation's permission and `remote`), `outside_schedule`;
//! 8. `remote_disabled` — unlock or unlatch while the owner has not turned remote unlock on
//!    for this lock (locking remotely is always allowed);
//! 9. `quiet_hours` — during the lock's quiet hours only an owner operates remotely;
//! 10. `rate_limited` — the signer's commands in the window exceed the limit.
//!
//! Owners pass step 7 without grants: they may do everything the lock's policy allows.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::auth::keys::PublicKey;
use crate::auth::reason::Reason;
use crate::auth::statement::{Command, Grant, Operation, Permission, Schedule};

/// Tunables of the engine (the `[policy]` section of the configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyLimits {
    /// Commands allowed per signer in `rate_window_s`.
    pub rate_commands: usize,
    /// The rate-limit window.
    pub rate_window_s: i64,
    /// Refusals of a signer in `lockout_window_s` that lock them out.
    pub lockout_failures: usize,
    /// The lockout counting window.
    pub lockout_window_s: i64,
    /// How long a lockout lasts.
    pub lockout_s: i64,
    /// How far ahead of the gateway's clock a command's `iat` may be.
    pub max_skew_s: i64,
}

impl Default for PolicyLimits {
    /// 10 commands a minute; 5 refusals in 10 minutes lock a signer out for 15 minutes; 30 s of
    /// clock skew.
    fn default() -> Self {
        PolicyLimits {
            rate_commands: 10,
            rate_window_s: 60,
            lockout_failures: 5,
            lockout_window_s: 600,
            lockout_s: 900,
            max_skew_s: 30,
        }
    }
}

/// A lock's remote policy, set by an owner-signed policy statement. The default is the safe
/// one: remote unlock off, no quiet hours.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockPolicy {
    /// Whether remote unlock and unlatch are allowed.
    pub remote_unlock: bool,
    /// When only owners operate remotely.
    #[serde(default)]
    pub quiet_hours: Option<Schedule>,
}

/// A grant as the engine sees it.
#[derive(Clone, Debug)]
pub struct GrantFacts {
    /// The verified grant.
    pub grant: Grant,
    /// Whether an owner revoked it.
    pub revoked: bool,
}

/// What the caller knows when a command arrives.
#[derive(Clone, Debug)]
pub struct Facts<'a> {
    /// The gateway's clock (Unix seconds).
    pub now: i64,
    /// Whether that clock has ever been synchronised.
    pub clock_synced: bool,
    /// Whether the command's id was seen before.
    pub seen: bool,
    /// Whether the signer is a pinned owner.
    pub owner: bool,
    /// Whether the signer is a known user.
    pub known_user: bool,
    /// Whether the lock is paired.
    pub lock_paired: bool,
    /// The signer's grants for this lock, verified.
    pub grants: &'a [GrantFacts],
    /// The lock's policy.
    pub policy: &'a LockPolicy,
}

/// Who is allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A pinned owner.
    Owner,
    /// A user, by the grant that allows it.
    User,
}

/// A refusal and why, for the reply, the audit record and the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// The reason code.
    pub reason: Reason,
    /// A human-readable explanation (no secrets).
    pub detail: String,
}

fn deny(reason: Reason, detail: impl Into<String>) -> Denial {
    Denial { reason, detail: detail.into() }
}

#[derive(Default)]
struct History {
    allowed: VecDeque<i64>,
    refused: VecDeque<i64>,
    locked_until: i64,
}

/// The engine, with its memory of recent decisions per signer.
#[derive(Default)]
pub struct PolicyEngine {
    limits: PolicyLimits,
    history: HashMap<PublicKey, History>,
}

/// Signers whose history is kept before idle ones are pruned.
const MAX_TRACKED_SIGNERS: usize = 4096;

fn permission_for(op: Operation) -> Permission {
    match op {
        Operation::Lock => Permission::Lock,
        Operation::Unlock => Permission::Unlock,
        Operation::Unlatch => Permission::Unlatch,
    }
}

impl PolicyEngine {
    /// An engine with these limits.
    pub fn new(limits: PolicyLimits) -> Self {
        PolicyEngine { limits, history: HashMap::new() }
    }

    /// Replaces the limits (a configuration reload); the memory of recent decisions stays, so
    /// a reload neither lifts a lockout nor resets a rate window.
    pub fn set_limits(&mut self, limits: PolicyLimits) {
        self.limits = limits;
    }

    /// Decides one command by `signer` and remembers the decision for rate limits and lockouts.
    pub fn decide(&mut self, signer: &PublicKey, command: &Command, facts: &Facts<'_>) -> Result<Role, Denial> {
        let decision = self.judge(signer, command, facts);
        let limits = self.limits;
        let now = facts.now;
        let history = self.history.entry(*signer).or_default();
        match &decision {
            Ok(_) => history.allowed.push_back(now),
            // Only refusals attributable to this signer's own requests count toward a lockout
            // (a stale clock or an unpaired lock is not their attempt at something forbidden).
            Err(d) if counts_toward_lockout(d.reason) => {
                history.refused.push_back(now);
                while history.refused.front().is_some_and(|t| *t <= now.saturating_sub(limits.lockout_window_s)) {
                    history.refused.pop_front();
                }
                if history.refused.len() >= limits.lockout_failures {
                    history.locked_until = now.saturating_add(limits.lockout_s);
                    history.refused.clear();
                    tracing::warn!(signer = %signer, "too many refused commands: locked out");
                }
            }
            Err(_) => {}
        }
        // Forget signers with nothing left to remember, so the map stays bounded: unknown keys
        // (free to make) leave nothing behind, and the rest is pruned when it grows.
        let idle = |h: &History| {
            h.allowed.back().is_none_or(|t| *t <= now.saturating_sub(limits.rate_window_s))
                && h.refused.back().is_none_or(|t| *t <= now.saturating_sub(limits.lockout_window_s))
                && h.locked_until <= now
        };
        if self
            .history
            .get(signer)
            .is_some_and(|h| h.allowed.is_empty() && h.refused.is_empty() && h.locked_until <= now)
        {
            self.history.remove(signer);
        }
        if self.history.len() > MAX_TRACKED_SIGNERS {
            self.history.retain(|_, h| !idle(h));
        }
        decision
    }

    fn judge(&mut self, signer: &PublicKey, command: &Command, facts: &Facts<'_>) -> Result<Role, Denial> {
        let limits = self.limits;
        let now = facts.now;
        if !facts.clock_synced {
            return Err(deny(Reason::ClockUnsynchronised, "the gateway's clock has never been synchronised"));
        }
        if now > command.exp {
            return Err(deny(Reason::Expired, format!("expired {} s ago", now - command.exp)));
        }
        if command.iat > now.saturating_add(limits.max_skew_s) {
            return Err(deny(Reason::NotYetValid, format!("issued {} s in the future", command.iat - now)));
        }
        if facts.seen {
            return Err(deny(Reason::Replayed, "this command id was already received"));
        }
        if let Some(h) = self.history.get(signer)
            && h.locked_until > now
        {
            return Err(deny(Reason::LockedOut, format!("locked out for {} s more", h.locked_until - now)));
        }
        if !facts.owner && !facts.known_user {
            return Err(deny(Reason::UnknownKey, "the signer is neither an owner nor a granted user"));
        }
        if !facts.lock_paired {
            return Err(deny(Reason::UnknownLock, format!("lock {} is not paired", command.lock)));
        }
        let role = if facts.owner { Role::Owner } else { Self::granted(command, facts)? };
        if command.op != Operation::Lock && !facts.policy.remote_unlock {
            return Err(deny(Reason::RemoteDisabled, "remote unlock is off for this lock (the owner can turn it on)"));
        }
        if role != Role::Owner
            && let Some(quiet) = &facts.policy.quiet_hours
            && quiet.covers(now).unwrap_or(true)
        {
            return Err(deny(Reason::QuietHours, "quiet hours: only the owner operates remotely now"));
        }
        if let Some(h) = self.history.get_mut(signer) {
            while h.allowed.front().is_some_and(|t| *t <= now.saturating_sub(limits.rate_window_s)) {
                h.allowed.pop_front();
            }
            if h.allowed.len() >= limits.rate_commands {
                return Err(deny(
                    Reason::RateLimited,
                    format!("at most {} commands per {} s", limits.rate_commands, limits.rate_window_s),
                ));
            }
        }
        Ok(role)
    }

    fn granted(command: &Command, facts: &Facts<'_>) -> Result<Role, Denial> {
        let now = facts.now;
        let for_lock: Vec<&GrantFacts> = facts.grants.iter().filter(|g| g.grant.lock == command.lock).collect();
        if for_lock.is_empty() {
            return Err(deny(Reason::NotGranted, "no grant for this lock"));
        }
        let live: Vec<&Grant> = for_lock.iter().filter(|g| !g.revoked).map(|g| &g.grant).collect();
        if live.is_empty() {
            return Err(deny(Reason::Revoked, "the grant for this lock was revoked"));
        }
        let needed = permission_for(command.op);
        let permitted: Vec<&Grant> = live
            .into_iter()
            .filter(|g| g.nbf <= now && now <= g.exp)
            .filter(|g| g.perms.contains(&needed) && g.perms.contains(&Permission::Remote))
            .collect();
        if permitted.is_empty() {
            return Err(deny(Reason::NotGranted, format!("no grant valid now allows remote {}", command.op.as_str())));
        }
        // A schedule that cannot be evaluated (unknown zone) allows nothing.
        if permitted.iter().any(|g| g.schedule.as_ref().is_none_or(|s| s.covers(now).unwrap_or(false))) {
            Ok(Role::User)
        } else {
            Err(deny(Reason::OutsideSchedule, "outside the grant's schedule"))
        }
    }
}

fn counts_toward_lockout(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::Expired
            | Reason::NotYetValid
            | Reason::Replayed
            | Reason::NotGranted
            | Reason::Revoked
            | Reason::OutsideSchedule
            | Reason::RemoteDisabled
            | Reason::QuietHours
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::statement::StatementId;
    use crate::protocol::ids::{GatewayId, LockId};

    const NOW: i64 = 1_796_029_200; // Monday 2026-11-30 09:00 UTC
    const LOCK: LockId = LockId([7; 8]);

    fn user() -> PublicKey {
        PublicKey::from_bytes([2; 32])
    }

    fn command(id: &str, op: Operation) -> Command {
        Command {
            jti: StatementId::new(id).unwrap(),
            gw: GatewayId::new("gw").unwrap(),
            lock: LOCK,
            op,
            iat: NOW - 1,
            exp: NOW + 29,
            nonce: "nnnnnnnnnnnnnnnn".into(),
        }
    }

    fn grant(perms: &[Permission], schedule: Option<Schedule>) -> GrantFacts {
        GrantFacts {
            grant: Grant {
                jti: StatementId::new("g-1").unwrap(),
                gw: GatewayId::new("gw").unwrap(),
                sub: user(),
                lock: LOCK,
                perms: perms.to_vec(),
                nbf: NOW - 3600,
                iat: NOW - 3600,
                exp: NOW + 3600,
                schedule,
            },
            revoked: false,
        }
    }

    fn facts<'a>(grants: &'a [GrantFacts], policy: &'a LockPolicy) -> Facts<'a> {
        Facts {
            now: NOW,
            clock_synced: true,
            seen: false,
            owner: false,
            known_user: true,
            lock_paired: true,
            grants,
            policy,
        }
    }

    fn remote_on() -> LockPolicy {
        LockPolicy { remote_unlock: true, quiet_hours: None }
    }

    fn reason(r: Result<Role, Denial>) -> Reason {
        r.unwrap_err().reason
    }

    #[test]
    fn a_granted_user_with_remote_may_unlock() {
        let grants = [grant(&[Permission::Unlock, Permission::Remote], None)];
        let policy = remote_on();
        let mut engine = PolicyEngine::default();
        assert_eq!(engine.decide(&user(), &command("c", Operation::Unlock), &facts(&grants, &policy)), Ok(Role::User));
    }

    #[test]
    fn each_check_has_its_reason() {
        let ok_grant = [grant(&[Permission::Unlock, Permission::Lock, Permission::Remote], None)];
        let policy = remote_on();
        let base = facts(&ok_grant, &policy);
        let cmd = command("c", Operation::Unlock);
        let e = PolicyEngine::default;

        assert_eq!(
            reason(e().decide(&user(), &cmd, &Facts { clock_synced: false, ..base.clone() })),
            Reason::ClockUnsynchronised
        );
        assert_eq!(reason(e().decide(&user(), &cmd, &Facts { now: NOW + 30, ..base.clone() })), Reason::Expired);
        assert_eq!(
            reason(e().decide(&user(), &Command { iat: NOW + 31, exp: NOW + 60, ..cmd.clone() }, &base)),
            Reason::NotYetValid
        );
        assert_eq!(reason(e().decide(&user(), &cmd, &Facts { seen: true, ..base.clone() })), Reason::Replayed);
        assert_eq!(reason(e().decide(&user(), &cmd, &Facts { known_user: false, ..base.clone() })), Reason::UnknownKey);
        assert_eq!(
            reason(e().decide(&user(), &cmd, &Facts { lock_paired: false, ..base.clone() })),
            Reason::UnknownLock
        );
        assert_eq!(reason(e().decide(&user(), &cmd, &Facts { grants: &[], ..base.clone() })), Reason::NotGranted);
        let revoked = [GrantFacts { revoked: true, ..ok_grant[0].clone() }];
        assert_eq!(reason(e().decide(&user(), &cmd, &Facts { grants: &revoked, ..base.clone() })), Reason::Revoked);
        let local_only = [grant(&[Permission::Unlock], None)];
        assert_eq!(
            reason(e().decide(&user(), &cmd, &Facts { grants: &local_only, ..base.clone() })),
            Reason::NotGranted
        );
        let weekend =
            Schedule { tz: "Europe/Berlin".into(), days: vec!["sat".into()], from: "00:00".into(), to: "23:59".into() };
        let scheduled = [grant(&[Permission::Unlock, Permission::Remote], Some(weekend.clone()))];
        assert_eq!(
            reason(e().decide(&user(), &cmd, &Facts { grants: &scheduled, ..base.clone() })),
            Reason::OutsideSchedule
        );
        let off = LockPolicy::default();
        assert_eq!(reason(e().decide(&user(), &cmd, &Facts { policy: &off, ..base.clone() })), Reason::RemoteDisabled);
        assert_eq!(
            e().decide(&user(), &command("c", Operation::Lock), &Facts { policy: &off, ..base.clone() }),
            Ok(Role::User),
            "locking remotely stays allowed"
        );
        let quiet = LockPolicy {
            remote_unlock: true,
            quiet_hours: Some(Schedule {
                days: vec!["mon".into()],
                from: "08:00".into(),
                to: "12:00".into(),
                ..weekend
            }),
        };
        assert_eq!(reason(e().decide(&user(), &cmd, &Facts { policy: &quiet, ..base.clone() })), Reason::QuietHours);
        let owner = PublicKey::from_bytes([1; 32]);
        assert_eq!(
            e().decide(
                &owner,
                &cmd,
                &Facts { owner: true, known_user: false, grants: &[], policy: &quiet, ..base.clone() }
            ),
            Ok(Role::Owner),
            "the owner needs no grant and is not bound by quiet hours"
        );
    }

    #[test]
    fn rate_limits_then_lockouts_apply_per_signer() {
        let grants = [grant(&[Permission::Unlock, Permission::Remote], None)];
        let policy = remote_on();
        let f = facts(&grants, &policy);
        let mut engine =
            PolicyEngine::new(PolicyLimits { rate_commands: 3, lockout_failures: 2, ..PolicyLimits::default() });
        for i in 0..3 {
            assert!(engine.decide(&user(), &command(&format!("c{i}"), Operation::Unlock), &f).is_ok());
        }
        assert_eq!(reason(engine.decide(&user(), &command("c3", Operation::Unlock), &f)), Reason::RateLimited);
        // A minute later the window has moved on.
        let later = Facts { now: NOW + 61, ..f.clone() };
        let fresh = |id: &str| Command { iat: NOW + 60, exp: NOW + 90, ..command(id, Operation::Unlock) };
        assert!(engine.decide(&user(), &fresh("c4"), &later).is_ok());
        // Two replays in a row lock the signer out, even for a valid command.
        for _ in 0..2 {
            assert_eq!(
                reason(engine.decide(&user(), &fresh("c4"), &Facts { seen: true, ..later.clone() })),
                Reason::Replayed
            );
        }
        assert_eq!(reason(engine.decide(&user(), &fresh("c5"), &later)), Reason::LockedOut);
        let other = PublicKey::from_bytes([3; 32]);
        let other_grants = [GrantFacts { grant: Grant { sub: other, ..grants[0].grant.clone() }, revoked: false }];
        assert!(
            engine.decide(&other, &fresh("c6"), &Facts { grants: &other_grants, ..later.clone() }).is_ok(),
            "per signer"
        );
    }

    #[test]
    fn a_reload_applies_new_limits_and_keeps_what_was_remembered() {
        let grants = [grant(&[Permission::Unlock, Permission::Remote], None)];
        let policy = remote_on();
        let f = facts(&grants, &policy);
        let cmd = |i: usize| command(&format!("c{i}"), Operation::Unlock);
        let mut engine =
            PolicyEngine::new(PolicyLimits { rate_commands: 3, lockout_failures: 2, ..PolicyLimits::default() });
        for i in 0..2 {
            assert!(engine.decide(&user(), &cmd(i), &f).is_ok());
        }
        // A stricter limit counts the commands already allowed in the window.
        engine.set_limits(PolicyLimits { rate_commands: 2, lockout_failures: 2, ..PolicyLimits::default() });
        assert_eq!(reason(engine.decide(&user(), &cmd(2), &f)), Reason::RateLimited);
        // A lockout outlives a reload, even one that would not have locked the signer out.
        for _ in 0..2 {
            assert_eq!(reason(engine.decide(&user(), &cmd(0), &Facts { seen: true, ..f.clone() })), Reason::Replayed);
        }
        engine.set_limits(PolicyLimits { rate_commands: 100, lockout_failures: 50, ..PolicyLimits::default() });
        assert_eq!(reason(engine.decide(&user(), &cmd(3), &f)), Reason::LockedOut);
    }

    #[test]
    fn refusals_that_are_not_the_signers_doing_do_not_lock_them_out() {
        let grants = [grant(&[Permission::Unlock, Permission::Remote], None)];
        let policy = remote_on();
        let f = facts(&grants, &policy);
        let limits = PolicyLimits { rate_commands: 1, lockout_failures: 2, ..PolicyLimits::default() };
        let mut engine = PolicyEngine::new(limits);
        let cmd = |i: usize| command(&format!("c{i}"), Operation::Unlock);
        // The gateway's clock, a lock not (yet) paired, and the rate limit: twice each, more
        // than the two refusals that lock a signer out.
        for i in 0..2 {
            let stale = Facts { clock_synced: false, ..f.clone() };
            assert_eq!(reason(engine.decide(&user(), &cmd(i), &stale)), Reason::ClockUnsynchronised);
            let unpaired = Facts { lock_paired: false, ..f.clone() };
            assert_eq!(reason(engine.decide(&user(), &cmd(i), &unpaired)), Reason::UnknownLock);
        }
        assert!(engine.decide(&user(), &cmd(10), &f).is_ok());
        for i in 11..13 {
            assert_eq!(reason(engine.decide(&user(), &cmd(i), &f)), Reason::RateLimited);
        }
        // A minute on, the window has room again and nothing has locked the signer out.
        let later = Facts { now: NOW + 61, ..f.clone() };
        let fresh = Command { iat: NOW + 60, exp: NOW + 90, ..cmd(13) };
        assert_eq!(engine.decide(&user(), &fresh, &later), Ok(Role::User));
    }

    #[test]
    fn the_time_bounds_are_inclusive() {
        let grants = [grant(&[Permission::Unlock, Permission::Remote], None)];
        let policy = remote_on();
        let f = facts(&grants, &policy);
        let mut engine = PolicyEngine::default();
        // Valid up to and including its `exp`…
        let at_expiry = Command { iat: NOW - 30, exp: NOW, ..command("at-exp", Operation::Unlock) };
        assert_eq!(engine.decide(&user(), &at_expiry, &f), Ok(Role::User));
        // …and issued at most `max_skew_s` ahead of the gateway's clock.
        let skew = PolicyLimits::default().max_skew_s;
        let ahead = Command { iat: NOW + skew, exp: NOW + skew + 30, ..command("ahead", Operation::Unlock) };
        assert_eq!(engine.decide(&user(), &ahead, &f), Ok(Role::User));
    }

    #[test]
    fn one_refusal_short_of_the_limit_does_not_lock_out_and_the_limit_does() {
        let grants = [grant(&[Permission::Unlock, Permission::Remote], None)];
        let policy = remote_on();
        let f = facts(&grants, &policy);
        let mut engine = PolicyEngine::new(PolicyLimits { lockout_failures: 3, ..PolicyLimits::default() });
        let replayed = Facts { seen: true, ..f.clone() };
        for _ in 0..2 {
            assert_eq!(reason(engine.decide(&user(), &command("old", Operation::Unlock), &replayed)), Reason::Replayed);
        }
        assert_eq!(engine.decide(&user(), &command("c1", Operation::Unlock), &f), Ok(Role::User));
        // The signer had an allowed command; this one has none, and its lockout must hold all
        // the same (nothing else is left in its history to remember it by).
        let stranger = PublicKey::from_bytes([4; 32]);
        let their_grants = [GrantFacts { grant: Grant { sub: stranger, ..grants[0].grant.clone() }, revoked: false }];
        let theirs = Facts { grants: &their_grants, ..f.clone() };
        for _ in 0..3 {
            let old = command("old", Operation::Unlock);
            assert_eq!(
                reason(engine.decide(&stranger, &old, &Facts { seen: true, ..theirs.clone() })),
                Reason::Replayed
            );
        }
        assert_eq!(reason(engine.decide(&stranger, &command("c2", Operation::Unlock), &theirs)), Reason::LockedOut);
        let after = Facts { now: NOW + PolicyLimits::default().lockout_s, ..theirs.clone() };
        let fresh = Command { iat: after.now - 1, exp: after.now + 29, ..command("c3", Operation::Unlock) };
        assert_eq!(engine.decide(&stranger, &fresh, &after), Ok(Role::User), "the lockout ends");
    }

    #[test]
    fn the_memory_of_signers_is_pruned_of_the_idle_only() {
        let policy = remote_on();
        let grant_for = |signer: PublicKey| GrantFacts {
            grant: Grant { sub: signer, ..grant(&[Permission::Unlock, Permission::Remote], None).grant },
            revoked: false,
        };
        let signer = |i: u32| {
            let mut bytes = [9; 32];
            bytes[..4].copy_from_slice(&i.to_be_bytes());
            PublicKey::from_bytes(bytes)
        };
        let limits = PolicyLimits { rate_commands: 1, lockout_failures: 2, ..PolicyLimits::default() };
        let mut engine = PolicyEngine::new(limits);
        let replay = |engine: &mut PolicyEngine, who: PublicKey, f: &Facts<'_>| {
            let old = Command { iat: f.now - 1, exp: f.now + 29, ..command("old", Operation::Unlock) };
            assert_eq!(reason(engine.decide(&who, &old, &Facts { seen: true, ..f.clone() })), Reason::Replayed);
        };
        // At NOW: one signer locked out, one a refusal short of it, then as many others as the
        // map holds, each with one allowed command.
        let (locked, refused_once) = (signer(u32::MAX), signer(u32::MAX - 1));
        let (locked_grants, refused_grants) = ([grant_for(locked)], [grant_for(refused_once)]);
        replay(&mut engine, locked, &facts(&locked_grants, &policy));
        replay(&mut engine, locked, &facts(&locked_grants, &policy));
        replay(&mut engine, refused_once, &facts(&refused_grants, &policy));
        for i in 0..MAX_TRACKED_SIGNERS as u32 - 3 {
            let grants = [grant_for(signer(i))];
            engine.decide(&signer(i), &command("c", Operation::Unlock), &facts(&grants, &policy)).unwrap();
        }
        // A minute on, the others' rate windows are over. The bound's last place is taken
        // without pruning; the signer past it prunes them, but neither the lockout, nor the
        // refusal still inside its window, nor the newcomers' windows.
        let later = |grants| Facts { now: NOW + 61, ..facts(grants, &policy) };
        let fresh = |id: &str| Command { iat: NOW + 60, exp: NOW + 90, ..command(id, Operation::Unlock) };
        let (last, newcomer) = (signer(MAX_TRACKED_SIGNERS as u32), signer(MAX_TRACKED_SIGNERS as u32 + 1));
        let (last_grants, newcomer_grants) = ([grant_for(last)], [grant_for(newcomer)]);
        engine.decide(&last, &fresh("m1"), &later(&last_grants)).unwrap();
        assert_eq!(engine.history.len(), MAX_TRACKED_SIGNERS, "nothing is pruned up to the bound");
        engine.decide(&newcomer, &fresh("n1"), &later(&newcomer_grants)).unwrap();
        assert_eq!(engine.history.len(), 4, "the idle are forgotten");
        assert_eq!(reason(engine.decide(&locked, &fresh("l1"), &later(&locked_grants))), Reason::LockedOut);
        assert_eq!(reason(engine.decide(&newcomer, &fresh("n2"), &later(&newcomer_grants))), Reason::RateLimited);
        replay(&mut engine, refused_once, &later(&refused_grants));
        assert_eq!(
            reason(engine.decide(&refused_once, &fresh("r1"), &later(&refused_grants))),
            Reason::LockedOut,
            "its first refusal was remembered"
        );
    }

    #[test]
    fn a_grant_counts_only_inside_its_validity_window() {
        let policy = remote_on();
        let cmd = command("c", Operation::Unlock);
        let with_window = |nbf: i64, exp: i64| {
            let mut g = grant(&[Permission::Unlock, Permission::Remote], None);
            (g.grant.nbf, g.grant.exp) = (nbf, exp);
            [g]
        };
        let decide = |grants: &[GrantFacts]| PolicyEngine::default().decide(&user(), &cmd, &facts(grants, &policy));
        assert_eq!(decide(&with_window(NOW, NOW + 60)), Ok(Role::User), "from its nbf");
        assert_eq!(decide(&with_window(NOW - 60, NOW)), Ok(Role::User), "until its exp");
        assert_eq!(reason(decide(&with_window(NOW + 1, NOW + 60))), Reason::NotGranted, "not yet valid");
        assert_eq!(reason(decide(&with_window(NOW - 60, NOW - 1))), Reason::NotGranted, "expired");
    }
}
