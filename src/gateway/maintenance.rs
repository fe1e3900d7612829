//! Housekeeping while the daemon runs: command ids remembered past their use, and audit records
//! past the retention period, are deleted once an hour; refusals the audit budget counted since
//! its last summary are written.
//!
//! Forgetting is where a clock that jumps does harm. A command id is remembered until an hour
//! after the command expires, so that a replay is refused; if the wall clock leapt a day ahead,
//! pruning by it would forget every id, and when the clock came back a captured command still
//! inside its window could run a second time. So the time pruned against never runs ahead of
//! the time that really passed: it is the wall clock, but at most the wall time seen when the
//! clock was first trusted plus the monotonic time elapsed since ([`SafeClock`]). A clock that
//! jumps ahead only delays forgetting; one that jumps back delays it too. Nothing is forgotten
//! while the clock has never been synchronised.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Clock;
use crate::store::{Store, StoreError};

/// How often the store is tidied.
pub const EVERY: Duration = Duration::from_secs(3600);

/// The time it is safe to forget against: sans-IO, fed the wall clock and a monotonic instant.
#[derive(Debug, Default)]
pub struct SafeClock {
    /// Wall time and monotonic instant when the clock was first trusted.
    anchor: Option<(i64, Instant)>,
}

impl SafeClock {
    /// Unix seconds up to which it is safe to forget, given the wall clock `(now, synced)` and
    /// the monotonic `mono`; `None` while the wall clock has never been trusted.
    pub fn now(&mut self, (wall, synced): (i64, bool), mono: Instant) -> Option<i64> {
        if !synced && self.anchor.is_none() {
            return None;
        }
        let (wall0, mono0) = *self.anchor.get_or_insert((wall, mono));
        let elapsed = i64::try_from(mono.saturating_duration_since(mono0).as_secs()).unwrap_or(i64::MAX);
        Some(wall.min(wall0.saturating_add(elapsed)))
    }
}

/// What one pass deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tidied {
    /// Command ids past their memory.
    pub commands: usize,
    /// Audit records past retention.
    pub audit_records: usize,
}

/// One tidying pass against `safe_now` (see [`SafeClock`]).
pub fn tidy(store: &Mutex<Store>, safe_now: i64) -> Result<Tidied, StoreError> {
    let mut store = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let commands = store.expire_commands(safe_now)?;
    let audit_records = store.prune_audit(safe_now)?;
    store.write_counted_audit(safe_now)?;
    Ok(Tidied { commands, audit_records })
}

/// Tidies the store now and every [`EVERY`] until `shutdown` turns true.
pub async fn run(store: Arc<Mutex<Store>>, clock: Clock, mut shutdown: watch::Receiver<bool>) {
    let mut safe = SafeClock::default();
    loop {
        if let Some(safe_now) = safe.now(clock(), Instant::now()) {
            let store = store.clone();
            match tokio::task::spawn_blocking(move || tidy(&store, safe_now)).await {
                Ok(Ok(t)) if t != Tidied::default() => {
                    tracing::info!(commands = t.commands, audit_records = t.audit_records, "store tidied")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not tidy the store; trying again later"),
                Err(e) if e.is_cancelled() => return, // the runtime is going
                Err(e) => tracing::error!(error = %e, "the tidying task failed"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(EVERY) => {}
            () = crate::stop::requested(&mut shutdown) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_forgotten_before_the_clock_is_trusted() {
        let mut safe = SafeClock::default();
        assert_eq!(safe.now((1_000, false), Instant::now()), None);
    }

    #[test]
    fn a_jump_ahead_does_not_advance_forgetting_and_a_jump_back_holds_it_back() {
        let mut safe = SafeClock::default();
        let t0 = Instant::now();
        assert_eq!(safe.now((1_000, true), t0), Some(1_000));
        // Ten seconds pass; the wall clock says a day did.
        assert_eq!(safe.now((1_010 + 86_400, true), t0 + Duration::from_secs(10)), Some(1_010));
        // It comes back, behind where it was.
        assert_eq!(safe.now((900, true), t0 + Duration::from_secs(20)), Some(900));
        // Back to the truth: forgetting follows real time again.
        assert_eq!(safe.now((1_030, true), t0 + Duration::from_secs(30)), Some(1_030));
        // Trusted once, trusted while the sync flag flickers.
        assert_eq!(safe.now((1_040, false), t0 + Duration::from_secs(40)), Some(1_040));
    }
}
