//! The gateway's BLE transport over the real D-Bus path: bluer → private dbus-daemon →
//! `lockhub-lock serve` (the emulated lock, serving org.bluez).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use lockhub::ble::budget::ConnectionBudget;
use lockhub::ble::client::LockClient;
use lockhub::ble::{BleConfig, BleError, LockLink, LockTransport};
use lockhub::protocol::message::{Actor, LockState, Op, Reply, UserRef};
use support::*;

const USER: Actor = Actor::Cloud(UserRef([0x0b; 8]));

async fn client_for(
    transport: Arc<lockhub::ble::bluez::BluezTransport>,
    lock: &LockReport,
    config: BleConfig,
) -> LockClient<lockhub::ble::bluez::BluezTransport> {
    let budget = ConnectionBudget::new(config.max_links);
    paired_client(transport, lock, config, budget, "hub-ble-test").await
}

#[tokio::test]
async fn discovers_five_locks_with_their_ids_and_rssi() {
    crate::needs!(Dbus);
    let ctl = control().await;
    let mut expected = Vec::new();
    for i in 0..5i16 {
        let rssi = -40 - 7 * i;
        let lock = add_lock(&ctl, &format!(r#"{{"rssi": {rssi}}}"#)).await;
        expected.push((lock.lock_id, lock.address, rssi));
    }
    let transport = transport().await;
    let ids: Vec<String> = expected.iter().map(|e| e.0.clone()).collect();
    let seen = scan_until_seen(&transport, &ids).await;
    for (id, address, rssi) in &expected {
        let ad = &seen[id];
        assert_eq!(&ad.address, address);
        assert_eq!(ad.rssi, *rssi, "RSSI of {id}");
        assert!(ad.pairing_mode, "a factory-new lock advertises pairing mode");
    }
    // The one-shot scan reports the same, strongest first.
    let scanned = transport.scan(Duration::from_millis(800)).await.unwrap();
    let ours: Vec<_> = scanned
        .iter()
        .filter(|a| ids.iter().any(|id| a.is_of(lockhub::protocol::ids::LockId::parse(id).unwrap())))
        .collect();
    assert!(ours.windows(2).all(|w| w[0].rssi >= w[1].rssi));
}

#[tokio::test]
async fn pairs_and_unlocks_a_lock_whose_mtu_is_23() {
    crate::needs!(Dbus);
    let ctl = control().await;
    let lock = add_lock(&ctl, r#"{"mtu": 23, "motor_ms": 50}"#).await;
    let transport = Arc::new(transport().await);
    let mut client = client_for(transport, &lock, BleConfig::default()).await;
    let r = client.call(USER, Op::Unlock).await.unwrap();
    assert!(matches!(r.result, Ok(Reply::Done(s)) if s.state == LockState::Unlocked), "{r:?}");
    let events = client.take_events();
    assert!(events.iter().any(|e| e.actor == Some(USER)), "the lock pushed its state changes");
    let after = report(&ctl, &lock.lock_id).await;
    assert_eq!(after.status.state, LockState::Unlocked);
    assert!(!after.pairing_mode);
    // Everything a request can carry also fits through 20-byte writes.
    let r = client.call(Actor::Hub, Op::ReadEvents { after: 0, max: 16 }).await.unwrap();
    assert!(matches!(r.result, Ok(Reply::Events { ref entries, .. }) if entries.len() >= 3), "{r:?}");
}

#[tokio::test]
async fn a_link_dropped_mid_command_is_link_lost_and_the_next_command_reconnects() {
    crate::needs!(Dbus);
    let ctl = control().await;
    let lock = add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    let transport = Arc::new(transport().await);
    let mut client = client_for(transport, &lock, BleConfig::default()).await;
    client.call(USER, Op::Status).await.unwrap();
    ctl.set_faults(&lock.lock_id, r#"{"drop_link_after_frames": 1}"#).await.unwrap();
    let err = client.call(USER, Op::Unlock).await.unwrap_err();
    assert_eq!(err, BleError::LinkLost);
    assert_eq!(err.code(), "link_lost");
    assert!(!client.is_connected());
    assert_eq!(report(&ctl, &lock.lock_id).await.status.state, LockState::Locked, "the lost command did not run");
    let r = client.call(USER, Op::Unlock).await.unwrap();
    assert!(matches!(r.result, Ok(Reply::Done(s)) if s.state == LockState::Unlocked));
}

/// When the lock drops the link, BlueZ closes the sockets acquired on it: the central reads
/// the end at once, instead of waiting on a socket nobody writes to any more (the emulated
/// BlueZ kept it open until the central closed its own end, and the gateway waited out its
/// drain bound on every link the lock dropped).
#[tokio::test]
async fn a_link_the_lock_drops_closes_its_notification_socket() {
    crate::needs!(Dbus);
    let ctl = control().await;
    let lock = add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    let transport = transport().await;
    scan_until_seen(&transport, std::slice::from_ref(&lock.lock_id)).await;
    let session = bluer::Session::new().await.unwrap();
    let device = session.default_adapter().await.unwrap().device(lock.address.parse().unwrap()).unwrap();
    device.connect().await.unwrap();
    let mut notify = None;
    for service in device.services().await.unwrap() {
        for c in service.characteristics().await.unwrap() {
            if c.uuid().await.unwrap() == bluer::Uuid::from_u128(lockhub::protocol::gatt::NOTIFY_CHAR_UUID) {
                notify = Some(c);
            }
        }
    }
    let reader = notify.expect("the notify characteristic").notify_io().await.unwrap();
    ctl.drop_link(&lock.lock_id).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(60), reader.recv()).await.expect("the socket outlived the link");
    assert!(end.is_err() || end.as_ref().is_ok_and(Vec::is_empty), "{end:?}");
}

#[tokio::test]
async fn a_lock_out_of_range_is_unreachable_within_the_configured_timeout() {
    crate::needs!(Dbus);
    let ctl = control().await;
    let lock = add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    let transport = Arc::new(transport().await);
    let config = BleConfig { connect_timeout_ms: 1_500, ..BleConfig::default() };
    let mut client = client_for(transport, &lock, config.clone()).await;
    client.call(USER, Op::Status).await.unwrap();
    ctl.set_in_range(&lock.lock_id, false).await.unwrap();
    let started = Instant::now();
    let err = client.call(USER, Op::Status).await.unwrap_err();
    let took = started.elapsed();
    // The link was up when the lock left: that command fails as a lost link or, if the drop
    // was seen first, as unreachable. The next one must be unreachable.
    if err != BleError::LinkLost {
        assert_eq!(err.code(), "unreachable", "{err}");
    }
    let started = Instant::now();
    let err = client.call(USER, Op::Status).await.unwrap_err();
    let took_next = started.elapsed();
    assert_eq!(err.code(), "unreachable", "{err}");
    let bound = config.connect_timeout() + Duration::from_millis(500);
    assert!(took.min(took_next) <= bound && took_next <= bound, "took {took_next:?}, bound {bound:?}");
    ctl.set_in_range(&lock.lock_id, true).await.unwrap();
    client.call(USER, Op::Status).await.unwrap();
}

#[tokio::test]
async fn an_idle_link_is_dropped_after_the_keep_alive_window() {
    crate::needs!(Dbus);
    let ctl = control().await;
    let lock = add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    let transport = Arc::new(transport().await);
    let config = BleConfig { keep_alive_ms: 200, ..BleConfig::default() };
    let mut client = client_for(transport, &lock, config).await;
    client.call(USER, Op::Status).await.unwrap();
    let deadline = client.idle_deadline().expect("a link is up");
    assert!(!client.disconnect_if_idle().await, "not idle yet");
    // The gateway's lock task sleeps until this deadline; so does the test.
    tokio::time::sleep_until(deadline).await;
    assert!(client.disconnect_if_idle().await);
    assert!(!client.is_connected());
    assert!(!report(&ctl, &lock.lock_id).await.connected, "the lock saw the link go");
    client.call(USER, Op::Status).await.unwrap();
}

#[tokio::test]
async fn an_unknown_address_is_not_found() {
    crate::needs!(Dbus);
    let transport = transport().await;
    let err = transport.connect("C0:DE:AD:00:00:01").await.unwrap_err();
    assert_eq!(err.code(), "not_found", "{err}");
}

/// A connection attempt its caller gave up on (a timeout dropping the future) is cancelled
/// with `Device1.Disconnect`: bluetoothd keeps an abandoned attempt pending and refuses every
/// new `Connect` meanwhile ("Operation already in progress", as the emulator now does too),
/// which once left a hub unable to reach a lock for some 40 s after one slow attempt.
#[tokio::test]
async fn a_connection_attempt_given_up_is_cancelled_and_the_next_one_connects() {
    crate::needs!(Dbus);
    use futures::StreamExt;
    let ctl = control().await;
    let lock = add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    let transport = transport().await;
    scan_until_seen(&transport, std::slice::from_ref(&lock.lock_id)).await;
    let path = lockhub::firmware::bluez::device_path(&lock.address).to_string();
    let rule = format!("type='method_call',interface='org.bluez.Device1',member='Disconnect',path='{path}'");
    let mut disconnects = support::bus_calls::monitor(&[rule.as_str()]).await;
    // Gone quiet (BlueZ still knows it), BlueZ's attempt takes seconds: the caller gives up
    // long before.
    ctl.set_quiet(&lock.lock_id, true).await.unwrap();
    let gave_up = tokio::time::timeout(Duration::from_millis(300), transport.connect(&lock.address)).await;
    assert!(gave_up.is_err(), "the attempt was to outlast its caller: {gave_up:?}");
    let cancel = tokio::time::timeout(Duration::from_secs(30), disconnects.next()).await;
    assert!(cancel.is_ok_and(|m| m.is_some()), "the abandoned attempt was never cancelled");
    // Back in range, the next attempt connects at once instead of being refused.
    ctl.set_quiet(&lock.lock_id, false).await.unwrap();
    let link = transport.connect(&lock.address).await.expect("the next attempt connects");
    link.close().await;
}

/// An adapter the configuration names but the system lacks is left out while another can be
/// opened (the hub runs on those it has), by name or by address; with none, its error.
#[tokio::test]
async fn an_adapter_that_cannot_be_opened_is_left_out_while_another_can() {
    crate::needs!(Dbus);
    test_bed();
    let open = |adapters: &[&str]| {
        let config = BleConfig { adapters: adapters.iter().map(|a| (*a).to_owned()).collect(), ..BleConfig::default() };
        async move { lockhub::ble::bluez::BluezTransport::open_radios(&config).await }
    };
    let radios = open(&["hci7", "hci0"]).await.expect("hci0 is there");
    assert_eq!(radios.iter().map(|r| r.name().to_owned()).collect::<Vec<_>>(), ["hci0"]);
    // The emulator's one adapter, named by its address.
    let radios = open(&["00:1B:DC:00:00:01", "00:00:00:00:00:07"]).await.expect("found by address");
    assert_eq!(radios.iter().map(|r| r.name().to_owned()).collect::<Vec<_>>(), ["hci0"]);
    let e = open(&["hci7", "hci8"]).await.expect_err("neither is there");
    assert!(matches!(e, BleError::NoAdapter(_)), "{e}");
    assert!(e.to_string().contains("hci7"), "the first one's error names it: {e}");
}

/// bluetoothd spreads a link's ATT traffic over its EATT bearers (three by default), and
/// fragments sent back to back were seen to arrive out of order through bluetoothd 5.66
/// (docs/emulator.md). The emulated org.bluez does the same unless a lock has one bearer;
/// LHP/1 puts the fragments back in order and pairing goes through either way.
#[tokio::test]
async fn fragments_over_several_eatt_bearers_arrive_out_of_order_and_pairing_still_works() {
    use lockhub::protocol::gatt::{NOTIFY_CHAR_UUID, WRITE_CHAR_UUID};
    use lockhub::protocol::hub::{HubConnection, HubEvent};
    use lockhub::protocol::ids::{GatewayId, LockId};
    use lockhub::protocol::pairing::SetupCode;

    crate::needs!(Dbus);
    let ctl = control().await;
    let transport = transport().await;
    let session = bluer::Session::new().await.unwrap();
    for (bearers, reordered) in [(3u8, true), (1, false)] {
        let lock = add_lock(&ctl, &format!(r#"{{"mtu": 23, "eatt_bearers": {bearers}}}"#)).await;
        scan_until_seen(&transport, std::slice::from_ref(&lock.lock_id)).await;
        let device = session.default_adapter().await.unwrap().device(lock.address.parse().unwrap()).unwrap();
        device.connect().await.unwrap();
        let (mut write, mut notify) = (None, None);
        for service in device.services().await.unwrap() {
            for c in service.characteristics().await.unwrap() {
                match c.uuid().await.unwrap().as_u128() {
                    WRITE_CHAR_UUID => write = Some(c),
                    NOTIFY_CHAR_UUID => notify = Some(c),
                    _ => {}
                }
            }
        }
        let writer = write.expect("the write characteristic").write_io().await.unwrap();
        let reader = notify.expect("the notify characteristic").notify_io().await.unwrap();
        let lock_id = LockId::parse(&lock.lock_id).unwrap();
        let mut hub = HubConnection::new(GatewayId::new("hub-eatt").unwrap(), lock_id, writer.mtu()).unwrap();
        hub.begin_pairing(&SetupCode::parse(&lock.setup_code).unwrap(), &mut rand_core::OsRng).unwrap();
        // (frame number, fragment index) of each notification, as it arrived.
        let mut arrived = Vec::new();
        'pairing: loop {
            while let Some(fragment) = hub.poll_transmit() {
                writer.send(&fragment).await.unwrap();
            }
            let fragment = tokio::time::timeout(Duration::from_secs(30), reader.recv()).await.unwrap().unwrap();
            arrived.push((fragment[0], fragment[1] & 0x7f));
            hub.on_notification(&fragment, 0).unwrap();
            while let Some(event) = hub.poll_event() {
                if matches!(event, HubEvent::Paired(_)) {
                    break 'pairing;
                }
            }
        }
        assert_eq!(!arrived.is_sorted(), reordered, "{bearers} bearers: fragments arrived as {arrived:?}");
        assert_eq!(hub.fragments_out_of_order() > 0, reordered, "{bearers} bearers");
        assert!(!report(&ctl, &lock.lock_id).await.pairing_mode, "the lock paired");
        device.disconnect().await.unwrap();
    }
}
