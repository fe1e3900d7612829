//! The hub's adapters above the radio: a lock reached through another adapter when its own
//! is powered off or cannot hear it, and its home moving with it. In memory
//! (`ble::memory`): no dbus-daemon; the same through real bluetoothd is a step of the
//! real-BlueZ tier.

use std::sync::Arc;

use lockhub::ble::BleConfig;
use lockhub::ble::client::{LockClient, pair};
use lockhub::ble::memory::{MemoryAdapter, MemoryAir};
use lockhub::ble::radios::Radios;
use lockhub::firmware::{Mechanics, PersistentState};
use lockhub::protocol::gatt::Capabilities;
use lockhub::protocol::ids::{GatewayId, LockId};
use lockhub::protocol::message::{Actor, LockState, Op, Reply};
use rand_core::OsRng;

/// The adapter the gateway says `client`'s lock goes through (its home, as `lockhub locks`
/// and `lockhub status` read it).
fn home_of(radios: &Radios<MemoryAdapter>, client: &LockClient<MemoryAdapter>) -> String {
    radios.get(client.home_index().load(std::sync::atomic::Ordering::Acquire)).name().to_owned()
}

#[tokio::test]
async fn a_lock_goes_through_the_other_adapter_when_its_own_is_off_or_out_of_range() {
    let air = MemoryAir::new();
    let state = PersistentState::factory_new(
        LockId([4; 8]),
        Capabilities::default(),
        Mechanics { motor_ms: 0, ..Mechanics::default() },
        &mut OsRng,
    );
    let code = state.identity.setup_code.clone();
    let address = air.add_lock(state, 23);
    let radios = Radios::new(
        vec![
            ("hci0".to_owned(), Arc::new(MemoryAdapter::new(&air, "hci0"))),
            ("hci1".to_owned(), Arc::new(MemoryAdapter::new(&air, "hci1"))),
        ],
        1,
    );
    let (hci0, hci1) = (radios.get(0).transport().clone(), radios.get(1).transport().clone());
    let config = BleConfig { connect_attempts: 1, ..BleConfig::default() };
    let gateway = GatewayId::new("hub").unwrap();
    let lock = LockId([4; 8]);

    // Every adapter looks; the first to hear it pairs it, and is its home.
    let (heard_by, ad) = radios.locate(lock, config.connect_timeout()).await.unwrap();
    let radio = radios.get(heard_by);
    let key = pair(&**radio.transport(), radio.budget(), &config, &gateway, lock, &ad.address, &code).await.unwrap();
    assert_eq!(ad.address, address);
    let mut client = LockClient::new(radios.clone(), heard_by, config, gateway, lock, address.clone(), key);
    let home = radios.get(heard_by).name().to_owned();
    assert_eq!(client.adapter(), home);
    assert!(client.call(Actor::Hub, Op::Status).await.is_ok());

    // Its home adapter powered off: the link drops; the next command goes through the other.
    let (off, other) = if heard_by == 0 { (&hci0, &hci1) } else { (&hci1, &hci0) };
    off.set_powered(false);
    let first = client.call(Actor::Hub, Op::Unlock).await;
    let reply = match first {
        Ok(r) => r,
        // The link it had was through the adapter now off: that command is lost with it (it
        // is never sent twice); the next one connects through the other adapter.
        Err(e) => {
            assert_eq!(e.code(), "link_lost", "{e}");
            client.call(Actor::Hub, Op::Unlock).await.unwrap()
        }
    };
    assert!(matches!(reply.result, Ok(Reply::Done(s)) if s.state == LockState::Unlocked), "{reply:?}");
    assert_eq!(client.adapter(), other.name(), "its home moved with it");
    assert_eq!(home_of(&radios, &client), other.name(), "and the gateway sees it there");
    off.set_powered(true);

    // Out of range of its new home: back through the first adapter.
    other.set_in_range(&address, false);
    let reply = match client.call(Actor::Hub, Op::Lock).await {
        Ok(r) => r,
        Err(e) => {
            assert_eq!(e.code(), "link_lost", "{e}");
            client.call(Actor::Hub, Op::Lock).await.unwrap()
        }
    };
    assert!(matches!(reply.result, Ok(Reply::Done(s)) if s.state == LockState::Locked), "{reply:?}");
    assert_eq!(client.adapter(), off.name());

    // Neither can reach it: unreachable, each adapter's reason told.
    off.set_in_range(&address, false);
    client.disconnect().await;
    let e = client.call(Actor::Hub, Op::Status).await.unwrap_err();
    assert_eq!(e.code(), "unreachable", "{e}");
    assert!(e.to_string().contains("through hci0") && e.to_string().contains("through hci1"), "{e}");
    assert_eq!(home_of(&radios, &client), off.name(), "no adapter reached it: its home stays");
}
