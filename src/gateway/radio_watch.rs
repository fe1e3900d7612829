//! Listening to the radio: a paired lock that advertises unread events gets its task to read
//! them. This is what makes a keypad or thumb-turn operation reach the cloud without polling.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;

use super::statements::Gateway;
use crate::ble::bluez::{BluezChange, BluezTransport};

/// How often a discovery that hears nothing asks whether the bus is still there: a connection
/// that went silent without closing (a wedged bus) would otherwise end discovery unnoticed,
/// and with it every advertised event until the next command.
pub const BUS_CHECK: Duration = Duration::from_secs(30);

/// Watches advertisements until `shutdown` turns true. Discovery is restarted when BlueZ
/// comes back (restarted: its discovery died with it) and after an error, with a pause; when
/// the connection to the bus is lost (the D-Bus daemon restarted), the transport connects again,
/// and discovery restarts whenever the transport's connection is replaced. After `bus_check`
/// without an advertisement, the bus is asked whether it still answers; if not, discovery
/// starts again on a new connection.
pub async fn watch_advertisements(
    transport: Arc<BluezTransport>,
    gateway: Arc<Gateway<BluezTransport>>,
    bus_check: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut replaced = transport.replaced();
    loop {
        // Discovery runs on one connection to the bus: started again when it is replaced.
        let generation = *replaced.borrow_and_update();
        let watched = async {
            let changes = transport.changes().await?;
            let stream = transport.discover().await?;
            Ok::<_, crate::ble::BleError>((changes, stream))
        };
        match watched.await {
            Ok((changes, stream)) => {
                let (mut changes, mut stream) = (std::pin::pin!(changes), std::pin::pin!(stream));
                let quiet = tokio::time::sleep(bus_check);
                let mut quiet = std::pin::pin!(quiet);
                loop {
                    tokio::select! {
                        ad = stream.next() => match ad {
                            Some(ad) => {
                                quiet.as_mut().reset(tokio::time::Instant::now() + bus_check);
                                if ad.new_events && let Some(lock) = gateway.lock(ad.lock_id) {
                                    lock.sync();
                                }
                            }
                            None => break,
                        },
                        () = quiet.as_mut() => {
                            if !transport.bus_answers().await {
                                tracing::warn!("the connection to D-Bus stopped answering: connecting again");
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
                        _ = shutdown.changed() => return,
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "discovery failed; retrying");
                // A failure of the bus itself (not an adapter switched off): connect afresh.
                if matches!(e, crate::ble::BleError::Bus(_)) {
                    transport.drop_connection(generation);
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
    }
}
