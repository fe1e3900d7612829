//! The lock's event log: a bounded ring whose sequence numbers never repeat.
//!
//! Sequence numbers start at 1 and survive reboots and unpairing (the counter is part of the
//! persistent state), so a gateway that remembers the last number it saw can always ask for
//! "everything after N" and get each entry exactly once, as long as the ring has not wrapped
//! past it.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::protocol::message::{Actor, Event, LogEntry};

/// Entries the ring keeps; older ones are overwritten.
pub const LOG_CAPACITY: usize = 1_024;

/// The ring.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLog {
    entries: VecDeque<LogEntry>,
    last_seq: u64,
}

impl EventLog {
    /// Appends an entry and returns it with its sequence number.
    pub fn append(&mut self, time: Option<u64>, event: Event, actor: Option<Actor>) -> LogEntry {
        self.last_seq += 1;
        let entry = LogEntry { seq: self.last_seq, time, event, actor };
        if self.entries.len() == LOG_CAPACITY {
            self.entries.pop_front();
        }
        self.entries.push_back(entry);
        entry
    }

    /// Sequence number of the newest entry ever written (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Up to `max` entries with a sequence number above `after`, oldest first, and whether
    /// more follow.
    pub fn read_after(&self, after: u64, max: usize) -> (Vec<LogEntry>, bool) {
        // Entries are contiguous in seq, so the start index is arithmetic, not a search.
        let first_seq = self.entries.front().map_or(self.last_seq + 1, |e| e.seq);
        let start = after.saturating_add(1).max(first_seq) - first_seq;
        let start = usize::try_from(start).unwrap_or(usize::MAX).min(self.entries.len());
        let page: Vec<LogEntry> = self.entries.iter().skip(start).take(max).copied().collect();
        let more = start + page.len() < self.entries.len();
        (page, more)
    }

    /// Drops every entry; the sequence counter carries on.
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_and_pages_from_any_point() {
        let mut log = EventLog::default();
        for _ in 0..LOG_CAPACITY + 10 {
            log.append(None, Event::Tamper, None);
        }
        assert_eq!(log.len(), LOG_CAPACITY);
        let (page, more) = log.read_after(0, 4);
        assert_eq!(page[0].seq, 11, "the oldest 10 were overwritten");
        assert!(more);
        let (page, more) = log.read_after(log.last_seq() - 2, 16);
        assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1033, 1034]);
        assert!(!more);
        assert!(log.read_after(u64::MAX, 16).0.is_empty());
        log.clear();
        assert_eq!(log.append(None, Event::Tamper, None).seq, 1035);
    }
}
