//! Memory given back while the daemon is quiet.
//!
//! A hub spends nearly all its time waiting, and what a burst of work touched stays resident
//! after it: pairing's SPAKE2, a cold link's service discovery, the command path itself, the
//! allocator's pages from the busiest moment. Once nothing has changed in the store for a
//! whole [`QUIET`] interval — no command, no event, no report — the daemon hands its read-only
//! code pages back ([`crate::text_pages::trim`]) and returns the allocator's free pages to the
//! kernel (`malloc_trim`), once per quiet spell. The next command brings back, page by page
//! from the page cache, only the code it runs: tens of page faults, once, on a hub that was
//! idle anyway.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockhub::store::Store;
use tokio::sync::watch;

/// How long the store must stay unchanged before the daemon gives memory back.
pub const QUIET: Duration = Duration::from_secs(5);

/// Decides, from the store's change count seen at each look, when a quiet spell has begun.
#[derive(Debug, Default)]
struct QuietDetector {
    /// The count at the previous look.
    seen: Option<u64>,
    /// The count when memory was last given back.
    given_back_at: Option<u64>,
}

impl QuietDetector {
    /// Takes the change count now; `true` when memory should be given back: the count has
    /// not moved for a whole interval, and nothing was given back since it last moved.
    fn look(&mut self, changes: u64) -> bool {
        let quiet = self.seen == Some(changes) && self.given_back_at != Some(changes);
        self.seen = Some(changes);
        if quiet {
            self.given_back_at = Some(changes);
        }
        quiet
    }
}

/// Looks at the store every [`QUIET`] and gives memory back when a quiet spell begins, until
/// `stopped` turns true.
pub async fn run(store: Arc<Mutex<Store>>, mut stopped: watch::Receiver<bool>) {
    let mut detector = QuietDetector::default();
    let mut tick = tokio::time::interval(QUIET);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = lockhub::stop::requested(&mut stopped) => return,
        }
        let changes = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).changes_so_far();
        if detector.look(changes) {
            give_back();
        }
    }
}

/// Hands the code pages back and trims the heap. Runs on the runtime's thread: it takes about
/// a millisecond, on a daemon with nothing to do, and a blocking-pool thread would only add
/// a stack and an allocator arena of its own.
fn give_back() {
    let code = crate::text_pages::trim();
    let heap = trim_heap();
    match code {
        Ok(kib) => {
            tracing::debug!(target: "lockhub::memory", code_kib = kib, heap_trimmed = heap, "handed back while quiet")
        }
        Err(e) => {
            tracing::debug!(target: "lockhub::memory", error = %e, heap_trimmed = heap, "could not hand the code back")
        }
    }
}

/// Returns the allocator's free pages, in every arena, to the kernel; `true` if any went.
fn trim_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only releases memory the allocator holds free; no live
        // allocation moves or changes.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_goes_back_once_per_quiet_spell() {
        let mut detector = QuietDetector::default();
        assert!(!detector.look(10), "the first look has nothing to compare with");
        assert!(!detector.look(12), "busy");
        assert!(detector.look(12), "a whole interval without a change: give back");
        assert!(!detector.look(12), "still the same spell: already given back");
        assert!(!detector.look(12));
        assert!(!detector.look(13), "busy again");
        assert!(detector.look(13), "a new spell");
    }

    /// KiB of this process's anonymous memory resident (heap and stacks).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn rss_anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix("RssAnon:")).unwrap();
        line.split_whitespace().next().unwrap().parse().unwrap()
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn the_heap_gives_back_what_it_holds_free() {
        // 32 MiB in 8 KiB blocks (below the mmap threshold: from the heap itself); three of
        // every four freed. The freed neighbours merge into 24 KiB holes between live blocks,
        // where the allocator never shrinks the heap on its own: only trimming returns their
        // whole pages (five or six a hole, some 22 MiB). Holes of one block each would hold a
        // single whole page on average (the blocks are 16 bytes more than two pages and not
        // page-aligned), which put the yield right at the bound and made the test flaky.
        let mut blocks: Vec<Option<Box<[u8; 8192]>>> = (0..4096).map(|_| Some(Box::new([1u8; 8192]))).collect();
        for (i, block) in blocks.iter_mut().enumerate() {
            if i % 4 != 3 {
                *block = None;
            }
        }
        let before = rss_anon_kib();
        assert!(trim_heap());
        let after = rss_anon_kib();
        assert!(before >= after + 12 * 1024, "{before} KiB before trimming, {after} KiB after");
        assert!(blocks.iter().skip(3).step_by(4).all(|b| b.as_ref().is_some_and(|b| b[8191] == 1)));
    }
}
