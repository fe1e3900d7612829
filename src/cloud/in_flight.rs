//! One connection's account of what is in flight: which packet id carries which outbox record
//! or express publish, what the broker acknowledged and is still to be deleted, and what an
//! express publish has learnt of its outbox record — whichever of its PUBACK and its record
//! comes first.

use std::collections::{HashMap, HashSet, VecDeque};

use rumqttc::{AsyncClient, QoS};
use tokio::sync::oneshot;

use super::express::Express;

/// Why a publish went out: to map PUBACKs back to outbox records.
#[derive(Clone, Copy, Debug)]
pub(super) enum Tag {
    Outbox(i64),
    /// An express publish, by its number on this connection.
    Express(u64),
    Status,
}

/// What is known of an express publish in flight.
#[derive(Debug, Default)]
pub(super) struct ExpressState {
    /// Its outbox record, once committed.
    pub(super) record: Option<i64>,
    /// Its PUBACK arrived before its record was known.
    pub(super) acked: bool,
}

/// Per-connection bookkeeping of what is in flight.
#[derive(Default)]
pub(super) struct InFlight {
    /// Tags of publishes handed to rumqttc, waiting for their packet id.
    pub(super) unassigned: VecDeque<Tag>,
    /// Packet id → tag, until the PUBACK.
    pub(super) by_pkid: HashMap<u16, Tag>,
    /// Outbox ids published and not yet acknowledged.
    pub(super) outbox: HashSet<i64>,
    /// Outbox ids acknowledged by the broker, to delete in the next batch.
    pub(super) acked: Vec<i64>,
    /// Express publishes sent on this connection, by number.
    pub(super) express: HashMap<u64, ExpressState>,
    /// Express publishes still to learn their outbox record.
    pub(super) unresolved: Vec<(u64, oneshot::Receiver<Option<i64>>)>,
    /// The next express publish's number.
    pub(super) next_express: u64,
    /// The outbox may hold records not sent yet: something was appended since the last read,
    /// or the last read stopped at the window. Without it a PUBACK costs no outbox read.
    pub(super) unsent: bool,
    /// The last deletion of acknowledged records failed (said once until one succeeds).
    pub(super) deletions_failing: bool,
}

impl InFlight {
    /// Takes in that express publish `number` is held by outbox record `record` (`None`: by
    /// none, its transaction failed).
    pub(super) fn learn(&mut self, number: u64, record: Option<i64>) {
        let Some(state) = self.express.get_mut(&number) else { return };
        match (record, state.acked) {
            // Acknowledged already: only the deletion is left.
            (Some(id), true) => {
                self.express.remove(&number);
                self.acked.push(id);
            }
            (Some(id), false) => {
                state.record = Some(id);
                self.outbox.insert(id);
            }
            // Never written: nothing to delete or send again (a PUBACK still to come finds
            // nothing, as it should).
            (None, _) => {
                self.express.remove(&number);
            }
        }
    }

    /// The outbox record to delete now that the publish tagged `tag` was acknowledged, if any.
    pub(super) fn acknowledged(&mut self, tag: Tag) -> Option<i64> {
        match tag {
            Tag::Outbox(id) => Some(id),
            Tag::Express(number) => match self.express.get_mut(&number) {
                Some(ExpressState { record: Some(id), .. }) => {
                    let id = *id;
                    self.express.remove(&number);
                    Some(id)
                }
                // Its record is learnt later, and deleted then.
                Some(state) => {
                    state.acked = true;
                    None
                }
                None => None,
            },
            Tag::Status => None,
        }
    }

    /// Learns the records of express publishes whose transactions have finished.
    pub(super) fn resolve_express(&mut self) {
        for (number, record) in resolve(&mut self.unresolved) {
            self.learn(number, record);
        }
    }
}

/// Takes out of `unresolved` the express publishes whose transactions have finished, with
/// their records.
pub(super) fn resolve(unresolved: &mut Vec<(u64, oneshot::Receiver<Option<i64>>)>) -> Vec<(u64, Option<i64>)> {
    let mut resolved = Vec::new();
    unresolved.retain_mut(|(number, record)| match record.try_recv() {
        Ok(record) => {
            resolved.push((*number, record));
            false
        }
        Err(oneshot::error::TryRecvError::Empty) => true,
        Err(oneshot::error::TryRecvError::Closed) => {
            resolved.push((*number, None));
            false
        }
    });
    resolved
}

/// Publishes an express record and keeps track of it until its PUBACK and its outbox record
/// are both known. rumqttc's request queue full: left to the outbox.
pub(super) fn send_express(client: &AsyncClient, flight: &mut InFlight, express: Express) {
    if client.try_publish(express.topic, QoS::AtLeastOnce, false, express.payload).is_ok() {
        let number = flight.next_express;
        flight.next_express += 1;
        flight.unassigned.push_back(Tag::Express(number));
        flight.express.insert(number, ExpressState::default());
        flight.unresolved.push((number, express.record));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_express_publish_is_forgotten_whatever_the_order_of_its_puback_and_its_record() {
        // (record committed?, PUBACK before the record is learnt?) → what is deleted.
        for (record, ack_first) in [(Some(7), true), (Some(7), false), (None, true), (None, false)] {
            let mut flight = InFlight::default();
            flight.express.insert(0, ExpressState::default());
            let deleted = if ack_first {
                let now = flight.acknowledged(Tag::Express(0));
                flight.learn(0, record);
                assert_eq!(now, None, "nothing known to delete at the PUBACK");
                flight.acked.clone()
            } else {
                flight.learn(0, record);
                assert_eq!(flight.outbox.contains(&7), record.is_some(), "in flight once known");
                flight.acknowledged(Tag::Express(0)).into_iter().collect()
            };
            assert_eq!(deleted, record.into_iter().collect::<Vec<_>>(), "{record:?} ack first {ack_first}");
            assert!(flight.express.is_empty(), "{record:?} ack first {ack_first}: {:?}", flight.express);
        }
    }
}
