//! The express lane: a reply someone waits for goes to the cloud link before the transaction
//! that writes it to the outbox has committed, so that the commit is not on its way. The
//! writer then tells the link which outbox record holds it (`ExpressRecord`), and from there
//! it is that record: not sent twice, deleted on its PUBACK, sent again if the connection
//! drops first (`super::in_flight` keeps that account).

use tokio::sync::{mpsc, oneshot};

/// A record published ahead of its outbox commit (see [`ExpressLane`]).
#[derive(Debug)]
pub(super) struct Express {
    pub(super) topic: String,
    pub(super) payload: Vec<u8>,
    /// The outbox record holding it once committed; `None` (or dropped): not committed.
    pub(super) record: oneshot::Receiver<Option<i64>>,
}

/// Hands the link a record to publish before the transaction that writes it to the outbox has
/// committed, so that the commit is not on the way of a reply someone waits for.
#[derive(Clone, Debug)]
pub struct ExpressLane(mpsc::Sender<Express>);

/// Where an express publish learns its outbox record: send it, while the store is still locked
/// for the transaction that wrote it (so the link can never read the record back as pending
/// before it knows it is already in flight), or `None` if the transaction failed.
#[derive(Debug)]
pub struct ExpressRecord(oneshot::Sender<Option<i64>>);

impl ExpressRecord {
    /// Tells the link which outbox record holds the express publish (`None`: none does).
    pub fn committed(self, record: Option<i64>) {
        let _ = self.0.send(record);
    }
}

impl ExpressLane {
    /// Hands `payload` for `topic` to the link. `None` when the link cannot take it now (its
    /// lane is full, or it is gone): the outbox alone carries the record then.
    pub fn send(&self, topic: String, payload: Vec<u8>) -> Option<ExpressRecord> {
        let (tx, record) = oneshot::channel();
        self.0.try_send(Express { topic, payload, record }).ok().map(|()| ExpressRecord(tx))
    }
}

/// Express publishes waiting in the lane at most.
const EXPRESS_LANE: usize = 64;

/// A new lane and the link's end of it.
pub(super) fn lane() -> (ExpressLane, mpsc::Receiver<Express>) {
    let (tx, rx) = mpsc::channel(EXPRESS_LANE);
    (ExpressLane(tx), rx)
}
