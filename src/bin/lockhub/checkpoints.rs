//! The store's write-ahead log checkpointed beside the commands rather than inside one of
//! their commits (why: `lockhub::store::checkpoint`).

use std::sync::Arc;

use lockhub::store::Store;
use lockhub::store::checkpoint::{Checkpointer, WalLimits};
use tokio::sync::{Notify, watch};

/// The checkpoints handed off by a store, waiting for [`Checkpoints::run`].
pub struct Checkpoints {
    checkpointer: Checkpointer,
    wanted: Arc<Notify>,
}

impl Checkpoints {
    /// Takes `store`'s checkpoints off its commits. Until [`Checkpoints::run`] starts, a
    /// request waits (one is kept).
    pub fn hand_off(store: &mut Store) -> Result<Self, lockhub::store::StoreError> {
        let checkpointer = Checkpointer::open(store.database_path())?;
        let wanted = Arc::new(Notify::new());
        let ask = wanted.clone();
        store.checkpoint_elsewhere(WalLimits::default(), move || ask.notify_one())?;
        Ok(Checkpoints { checkpointer, wanted })
    }

    /// Checkpoints on the blocking pool whenever the store asks, until `stopped` changes.
    /// Requests made while one runs make one more.
    pub async fn run(self, mut stopped: watch::Receiver<bool>) {
        let Checkpoints { mut checkpointer, wanted } = self;
        let mut failing = false;
        loop {
            tokio::select! {
                () = wanted.notified() => {}
                _ = stopped.changed() => return,
            }
            let Ok((back, done)) = tokio::task::spawn_blocking(move || {
                let done = checkpointer.checkpoint();
                (checkpointer, done)
            })
            .await
            else {
                tracing::error!(
                    "the checkpoint task failed; commits checkpoint the store's log themselves from now on"
                );
                return;
            };
            checkpointer = back;
            match done {
                Ok(done) => {
                    failing = false;
                    tracing::debug!(log_pages = done.log, copied = done.copied, "store log checkpointed");
                }
                // Said once while it keeps failing: each commit past the line asks again.
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "could not checkpoint the store's log; trying again at the next commit");
                }
                Err(_) => {}
            }
        }
    }
}
