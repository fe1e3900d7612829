//! How many records of refusals attributed to nobody the audit log takes: a budget, so that
//! whoever can publish on the gateway's command topic cannot fill the hub's disk with them.
//!
//! Anyone can make an Ed25519 key, and the cloud (which the trust model does not trust) can
//! publish garbage at line rate: each refusal used to cost an audit record kept for the
//! retention period (365 days by default) — a flood of a few hundred a second fills an SD card
//! within days, and a full disk stops every unlock, local ones too. Records whose actor is
//! nobody we know (malformed or badly signed statements, unknown keys, dropped messages) are
//! taken one by one up to a burst, then one per [`REFILL_EVERY_S`]; beyond that they are
//! counted per outcome, and the counts are written as one summary record (action
//! [`SUMMARY_ACTION`]) before the next record of any kind, or by the hourly housekeeping. So
//! every refusal is still on the record — the excess in aggregate — and the log grows by at
//! most about two records a minute from strangers.
//!
//! Sans-IO: the store keeps one budget, a transaction works on a copy that replaces it only
//! when the transaction commits.

use std::collections::BTreeMap;

/// Records of nobody's refusals taken at once, from a full budget.
pub const BURST: u32 = 100;

/// Then one more each this many seconds.
pub const REFILL_EVERY_S: i64 = 60;

/// The action of a summary record.
pub const SUMMARY_ACTION: &str = "audit.counted";

/// What the budget says of one record attributed to nobody.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Write it.
    Record,
    /// Count it only.
    Count,
}

/// The budget of records attributed to nobody, and what it counted instead.
#[derive(Clone, Debug)]
pub struct AuditBudget {
    tokens: u32,
    /// When the tokens were last topped up (Unix seconds).
    refilled_at: Option<i64>,
    /// Refusals counted instead of recorded, by outcome, since `since`.
    counted: BTreeMap<String, u64>,
    since: i64,
}

impl Default for AuditBudget {
    fn default() -> Self {
        AuditBudget { tokens: BURST, refilled_at: None, counted: BTreeMap::new(), since: 0 }
    }
}

impl AuditBudget {
    /// Whether a record attributed to nobody, with `outcome`, at `now`, is written or counted.
    pub fn admit(&mut self, outcome: &str, now: i64) -> Admission {
        self.refill(now);
        if self.tokens > 0 {
            self.tokens -= 1;
            return Admission::Record;
        }
        if self.counted.is_empty() {
            self.since = now;
        }
        // Outcomes are the gateway's reason codes (a fixed, small set), not the stranger's words.
        *self.counted.entry(outcome.to_owned()).or_default() += 1;
        Admission::Count
    }

    /// Whether anything was counted since the last summary.
    pub fn has_counted(&self) -> bool {
        !self.counted.is_empty()
    }

    /// Takes what was counted since the last summary, if anything, as the summary record's
    /// detail: how many in all and of each outcome, and since when.
    pub fn take_summary(&mut self) -> Option<String> {
        if self.counted.is_empty() {
            return None;
        }
        let counted = std::mem::take(&mut self.counted);
        let total: u64 = counted.values().sum();
        let each: Vec<String> = counted.iter().map(|(outcome, n)| format!("{outcome} {n}")).collect();
        Some(format!(
            "{total} refusals of statements from nobody known since {} (Unix time), counted instead of \
             recorded one by one (more than {BURST} at once, then one a minute): {}",
            self.since,
            each.join(", ")
        ))
    }

    fn refill(&mut self, now: i64) {
        let Some(at) = self.refilled_at else {
            self.refilled_at = Some(now);
            return;
        };
        // A clock set back starts the interval again rather than granting or owing anything.
        if now < at {
            self.refilled_at = Some(now);
            return;
        }
        let earned = (now - at) / REFILL_EVERY_S;
        if earned > 0 {
            self.tokens = u32::try_from(earned).unwrap_or(u32::MAX).saturating_add(self.tokens).min(BURST);
            self.refilled_at = Some(at + earned * REFILL_EVERY_S);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_recorded_then_one_a_minute_and_the_rest_counted_per_outcome() {
        let mut budget = AuditBudget::default();
        let t = 1_700_000_000;
        for _ in 0..BURST {
            assert_eq!(budget.admit("malformed", t), Admission::Record);
        }
        assert_eq!(budget.admit("malformed", t + 1), Admission::Count);
        assert_eq!(budget.admit("bad_signature", t + 2), Admission::Count);
        assert_eq!(budget.admit("malformed", t + 59), Admission::Count);
        assert_eq!(budget.admit("malformed", t + 60), Admission::Record, "a minute earns one");
        assert_eq!(budget.admit("malformed", t + 61), Admission::Count);
        let summary = budget.take_summary().unwrap();
        assert!(
            summary.starts_with(&format!("4 refusals of statements from nobody known since {} ", t + 1)),
            "{summary}"
        );
        assert!(summary.ends_with(": bad_signature 1, malformed 3"), "{summary}");
        assert_eq!(budget.take_summary(), None, "taken");
        assert_eq!(budget.admit("unknown_key", t + 62), Admission::Count);
        let summary = budget.take_summary().unwrap();
        assert!(
            summary.starts_with(&format!("1 refusals of statements from nobody known since {} ", t + 62)),
            "{summary}"
        );
    }

    #[test]
    fn quiet_refills_the_budget_up_to_the_burst_and_a_clock_set_back_grants_nothing() {
        let mut budget = AuditBudget::default();
        let t = 1_700_000_000;
        for _ in 0..BURST {
            budget.admit("malformed", t);
        }
        assert_eq!(budget.admit("malformed", t), Admission::Count);
        // Set back a day: no tokens; the interval starts again from there.
        assert_eq!(budget.admit("malformed", t - 86_400), Admission::Count);
        assert_eq!(budget.admit("malformed", t - 86_400 + 59), Admission::Count);
        assert_eq!(budget.admit("malformed", t - 86_400 + 60), Admission::Record);
        // A day of quiet: a full burst again, no more.
        let later = t + 86_400;
        for _ in 0..BURST {
            assert_eq!(budget.admit("malformed", later), Admission::Record);
        }
        assert_eq!(budget.admit("malformed", later), Admission::Count);
    }
}
