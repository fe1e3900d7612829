//! Listening to the radio: a paired lock that advertises unread events gets its task to read
//! them. This is what makes a keypad or thumb-turn operation reach the cloud without polling.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use super::statements::Gateway;
use crate::ble::bluez::BluezTransport;

/// Watches advertisements until `shutdown` turns true; restarts discovery after an error
/// (BlueZ restarted, adapter reset) with a pause.
pub async fn watch_advertisements(
    transport: Arc<BluezTransport>,
    gateway: Arc<Gateway<BluezTransport>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        match transport.discover().await {
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                loop {
                    tokio::select! {
                        ad = stream.next() => match ad {
                            Some(ad) if ad.new_events => {
                                if let Some(lock) = gateway.lock(ad.lock_id) {
                                    lock.sync();
                                }
                            }
                            Some(_) => {}
                            None => break,
                        },
                        _ = shutdown.changed() => return,
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "discovery failed; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
    }
}
