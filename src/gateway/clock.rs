//! The gateway's clock, and whether it can be trusted for freshness checks.
//!
//! A hub without a battery-backed clock boots in 1970 (or wherever its last fake-hwclock save
//! left it) until NTP corrects it. Remote commands are judged against this clock, so until
//! the kernel has once reported it synchronised, the policy refuses them
//! (`clock_unsynchronised`). The kernel's view comes from `adjtimex(2)`, which is what
//! systemd-timesyncd, chrony and ntpd all update; the daemon passes that probe in (the library
//! has no unsafe code, and the system call needs some).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::Clock;
use crate::store::unix_now;

/// The system clock. While `require_sync` holds, it counts as synchronised from the first
/// time `synchronised` says so (and stays so: a later NTP hiccup does not make it
/// untrustworthy); without, it is trusted (test rigs whose clock is known good). The flag is
/// shared so that a configuration reload can change it.
pub fn system_clock(require_sync: Arc<AtomicBool>, synchronised: fn() -> bool) -> Clock {
    let ever = Arc::new(AtomicBool::new(false));
    Arc::new(move || {
        let synced = !require_sync.load(Ordering::Acquire) || ever.load(Ordering::Acquire) || {
            let now = synchronised();
            if now {
                ever.store(true, Ordering::Release);
            }
            now
        };
        (unix_now(), synced)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_without_the_requirement_is_trusted_and_ticks() {
        let (now, synced) = system_clock(Arc::new(AtomicBool::new(false)), || false)();
        assert!(synced);
        assert!(now > 1_700_000_000);
    }

    static SYNCED: AtomicBool = AtomicBool::new(false);

    #[test]
    fn once_synchronised_the_clock_stays_trusted() {
        let clock = system_clock(Arc::new(AtomicBool::new(true)), || SYNCED.load(Ordering::SeqCst));
        assert!(!clock().1, "never synchronised");
        SYNCED.store(true, Ordering::SeqCst);
        assert!(clock().1);
        SYNCED.store(false, Ordering::SeqCst);
        assert!(clock().1, "a later loss of sync does not undo it");
    }
}
