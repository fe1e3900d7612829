//! The connection budget: at most N links up at once, granted in arrival order.
//!
//! BLE controllers manage a handful of simultaneous connections, and a hub with twenty locks
//! must not try twenty at once. A tokio semaphore is FIFO, so a lock that asked first is
//! served first and nobody starves.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::BleError;

/// A shared budget of link slots.
#[derive(Clone, Debug)]
pub struct ConnectionBudget {
    slots: Arc<Semaphore>,
    capacity: usize,
    counts: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    in_use: AtomicUsize,
    peak: AtomicUsize,
    waiting: AtomicUsize,
    /// Woken whenever someone starts waiting, so that idle links make way at once.
    arrived: tokio::sync::Notify,
}

/// One slot, held while a link is up; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    counts: Arc<Counts>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counts.in_use.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionBudget {
    /// A budget of `max_links` slots (at least one).
    pub fn new(max_links: usize) -> Self {
        let capacity = max_links.max(1);
        ConnectionBudget { slots: Arc::new(Semaphore::new(capacity)), capacity, counts: Arc::default() }
    }

    /// Waits (in arrival order) for a slot, at most `timeout`.
    pub async fn acquire(&self, timeout: Duration) -> Result<Slot, BleError> {
        self.counts.waiting.fetch_add(1, Ordering::AcqRel);
        if self.slots.available_permits() == 0 {
            self.counts.arrived.notify_waiters();
        }
        let permit = tokio::time::timeout(timeout, self.slots.clone().acquire_owned()).await;
        self.counts.waiting.fetch_sub(1, Ordering::AcqRel);
        let permit = permit
            .map_err(|_| BleError::Timeout { during: "waiting for a free link slot", after: timeout })?
            .expect("the budget's semaphore is never closed");
        let in_use = self.counts.in_use.fetch_add(1, Ordering::AcqRel) + 1;
        self.counts.peak.fetch_max(in_use, Ordering::AcqRel);
        Ok(Slot { _permit: permit, counts: self.counts.clone() })
    }

    /// Slots in all.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Slots held now.
    pub fn in_use(&self) -> usize {
        self.counts.in_use.load(Ordering::Acquire)
    }

    /// Whether someone waits for a slot: idle links should make way.
    pub fn has_waiters(&self) -> bool {
        self.counts.waiting.load(Ordering::Acquire) > 0
    }

    /// Returns once someone waits for a slot (at once if someone already does): an idle link
    /// awaits this to make way.
    pub async fn someone_waits(&self) {
        loop {
            let notified = self.counts.arrived.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.has_waiters() {
                return;
            }
            notified.await;
        }
    }

    /// The most slots ever held at once.
    pub fn peak(&self) -> usize {
        self.counts.peak.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grants_in_order_and_never_exceeds_the_budget() {
        let budget = ConnectionBudget::new(2);
        let a = budget.acquire(Duration::from_secs(1)).await.unwrap();
        let _b = budget.acquire(Duration::from_secs(1)).await.unwrap();
        let err = budget.acquire(Duration::from_millis(10)).await.unwrap_err();
        assert_eq!(err.code(), "timeout");
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.acquire(Duration::from_secs(5)).await.map(|_| ()) })
        };
        drop(a);
        waiter.await.unwrap().unwrap();
        assert_eq!(budget.peak(), 2);
    }
}
