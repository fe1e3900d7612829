//! Listening: LE discovery kept running under the radio watch through BlueZ's restarts, the
//! D-Bus daemon's, a wedged bus and failures to start, each said once in the log.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use super::{BluezChange, BluezTransport};
use crate::ble::{Advertisement, BleError};

/// The first pause between attempts to start discovery while they fail; it doubles with each
/// failure, up to [`RETRY_LAST`] (a hung or absent BlueZ is asked every half minute, and said
/// so once).
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest pause between attempts to start discovery.
const RETRY_LAST: Duration = Duration::from_secs(30);

/// When to try starting discovery again while it fails, and what to say about it: an outage
/// is announced once, at its first failure, and its end once; the pause between attempts
/// doubles from [`RETRY_FIRST`] to [`RETRY_LAST`] and starts over after a success.
#[derive(Debug, Default)]
struct Retry {
    /// Failures since the last success.
    failures: u32,
}

impl Retry {
    /// A failed start: how long to wait before the next, and whether it begins an outage.
    fn failed(&mut self) -> (Duration, bool) {
        let wait = RETRY_FIRST.saturating_mul(1 << self.failures.min(16)).min(RETRY_LAST);
        self.failures = self.failures.saturating_add(1);
        (wait, self.failures == 1)
    }

    /// A successful start: whether it ends an outage.
    fn started(&mut self) -> bool {
        std::mem::take(&mut self.failures) > 0
    }
}

/// Listens until `shutdown` turns true, handing every advertisement to `heard`. Discovery is
/// restarted when BlueZ
/// comes back (restarted: its discovery died with it) and after an error, with a pause that
/// grows while starting it keeps failing (BlueZ absent or hung: the transport bounds each
/// start); when the connection to the bus is lost (the D-Bus daemon restarted), the transport
/// connects again, and discovery restarts whenever the transport's connection is replaced.
/// After `bus_check` without an advertisement, the bus is asked whether it still answers; if
/// not, discovery starts again on a new connection.
pub(super) async fn listen(
    transport: Arc<BluezTransport>,
    bus_check: Duration,
    mut heard: impl FnMut(&Advertisement) + Send,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut replaced = transport.replaced();
    let mut retry = Retry::default();
    loop {
        // Discovery runs on one connection to the bus: started again when it is replaced.
        let generation = *replaced.borrow_and_update();
        let watched = async {
            let changes = transport.changes().await?;
            let stream = transport.discover().await?;
            Ok::<_, BleError>((changes, stream))
        };
        // Bounded by the transport (a new connection, starting discovery); shutdown need not
        // wait for it.
        let started = tokio::select! {
            started = watched => started,
            () = crate::stop::requested(&mut shutdown) => return,
        };
        match started {
            Ok((changes, stream)) => {
                if retry.started() {
                    tracing::info!("discovery started again");
                }
                let (mut changes, mut stream) = (std::pin::pin!(changes), std::pin::pin!(stream));
                let quiet = tokio::time::sleep(bus_check);
                let mut quiet = std::pin::pin!(quiet);
                loop {
                    tokio::select! {
                        ad = stream.next() => match ad {
                            Some(ad) => {
                                quiet.as_mut().reset(tokio::time::Instant::now() + bus_check);
                                heard(&ad);
                            }
                            None => break,
                        },
                        () = quiet.as_mut() => {
                            if !transport.bus_answers().await {
                                tracing::warn!("BlueZ stopped answering on the connection to D-Bus: connecting again");
                                break;
                            }
                            quiet.as_mut().reset(tokio::time::Instant::now() + bus_check);
                        }
                        change = changes.next() => match change {
                            Some(BluezChange::AdapterBack) => {
                                tracing::info!("the Bluetooth adapter came back (BlueZ restarted?): discovery restarted");
                                break;
                            }
                            None => {
                                tracing::warn!("lost the connection to D-Bus: connecting again");
                                transport.drop_connection(generation);
                                break;
                            }
                        },
                        _ = replaced.changed() => {
                            tracing::info!("discovery restarted on the new connection to D-Bus");
                            break;
                        }
                        () = crate::stop::requested(&mut shutdown) => return,
                    }
                }
            }
            Err(e) => {
                // Said once per outage; the retries that follow, at debug level.
                let (pause, first) = retry.failed();
                if first {
                    tracing::warn!(error = %e, "discovery failed; retrying, less often while it keeps failing");
                } else {
                    tracing::debug!(error = %e, retry_in = ?pause, "discovery failed again");
                }
                // The bus or BlueZ not answering (not an adapter switched off): connect
                // afresh, in case it is this connection.
                if matches!(e, BleError::Bus(_) | BleError::BluezSilent { .. }) {
                    transport.drop_connection(generation);
                }
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = crate::stop::requested(&mut shutdown) => return,
                }
                continue;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RETRY_FIRST) => {}
            () = crate::stop::requested(&mut shutdown) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_announced_once_and_retried_ever_less_often_up_to_half_a_minute() {
        let mut retry = Retry::default();
        let waits: Vec<(u64, bool)> = (0..8)
            .map(|_| {
                let (wait, first) = retry.failed();
                (wait.as_secs(), first)
            })
            .collect();
        assert_eq!(
            waits,
            [(1, true), (2, false), (4, false), (8, false), (16, false), (30, false), (30, false), (30, false)]
        );
        assert!(retry.started(), "the end of the outage is said");
    }

    #[test]
    fn after_a_success_the_next_outage_starts_over() {
        let mut retry = Retry::default();
        assert!(!retry.started(), "a start without failures ends no outage");
        retry.failed();
        retry.failed();
        assert!(retry.started());
        assert_eq!(retry.failed(), (RETRY_FIRST, true), "announced again, retried after a second");
    }
}
