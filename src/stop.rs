//! The stop signal every long-running task watches: a `watch` channel of `bool` that turns
//! true once, when the daemon (or the demo, or a test) wants everything to finish.

use tokio::sync::watch;

/// Resolves once `stop` says true, or once its sender is gone — a stop too: an owner that
/// dropped it without a word will never say more, and waiting on `changed()` alone would then
/// wake on every turn of a `select!` loop. Cancel-safe, so it can sit in one.
pub async fn requested(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn true_or_a_dropped_sender_is_a_stop_and_false_is_not() {
        let (tx, mut rx) = watch::channel(false);
        tx.send(false).unwrap();
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(10), requested(&mut rx)).await;
        assert!(waiting.is_err(), "false is no stop");
        tx.send(true).unwrap();
        requested(&mut rx).await;
        requested(&mut rx).await;
        let (tx, mut rx) = watch::channel(false);
        drop(tx);
        requested(&mut rx).await;
    }
}
