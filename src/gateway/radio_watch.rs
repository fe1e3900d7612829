//! Listening to the radio: a paired lock that advertises unread events gets its task to read
//! them. This is what makes a keypad or thumb-turn operation reach the cloud without polling.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Gateway;
use crate::ble::LockTransport;

/// How long the radio may stay silent before the transport asks whether the stack under it
/// still answers (see [`LockTransport::listen`]): a connection to D-Bus that went silent
/// without closing (a wedged bus) would otherwise end discovery unnoticed, and with it every
/// advertised event until the next command.
pub const BUS_CHECK: Duration = Duration::from_secs(30);

/// Listens through every adapter of `gateway` until `shutdown` turns true; a lock heard with
/// unread events is asked to sync.
pub async fn watch_radios<T: LockTransport>(
    gateway: Arc<Gateway<T>>,
    bus_check: Duration,
    shutdown: watch::Receiver<bool>,
) {
    let listens = gateway.radios().iter().map(|radio| {
        let gateway = gateway.clone();
        let heard = move |ad: &crate::ble::Advertisement| {
            if ad.new_events
                && let Some(lock) = gateway.lock_tagged(ad.tag)
            {
                lock.sync();
            }
        };
        radio.transport().clone().listen(bus_check, heard, shutdown.clone())
    });
    futures::future::join_all(listens.collect::<Vec<_>>()).await;
}
