//! The cloud MQTT topic layout (`lockhub/v1/<gateway>/…`), in one place.

use crate::protocol::ids::{GatewayId, LockId};

/// The topics of one gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics {
    base: String,
}

impl Topics {
    /// The topics of `gateway`.
    pub fn new(gateway: &GatewayId) -> Self {
        Topics { base: format!("lockhub/v1/{gateway}") }
    }

    /// Retained `online` / `offline` status (the last will).
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }

    /// Signed commands and owner statements in.
    pub fn commands(&self) -> String {
        format!("{}/cmd", self.base)
    }

    /// One typed result per command out.
    pub fn replies(&self) -> String {
        format!("{}/reply", self.base)
    }

    /// Lock events and audit records out, from the outbox.
    pub fn events(&self) -> String {
        format!("{}/events", self.base)
    }

    /// A lock's retained state.
    pub fn lock_state(&self, lock: LockId) -> String {
        format!("{}/lock/{lock}/state", self.base)
    }

    /// The filter matching every lock's retained state, for a subscriber.
    pub fn lock_states(&self) -> String {
        format!("{}/lock/+/state", self.base)
    }

    /// A topic nobody but one cloud client uses, which that client publishes on and reads back
    /// to learn that what the broker queued for it before has arrived (`…/marker/<nonce>`).
    /// The gateway neither reads nor writes it.
    pub fn marker(&self, nonce: &str) -> String {
        format!("{}/marker/{nonce}", self.base)
    }
}
