//! The hub `lockhub run` assembles (`lockhub::hub`), over the in-memory transport
//! (`ble::memory`) instead of BlueZ: the gateway's behaviour end to end with no dbus-daemon —
//! claimed, a lock paired and granted through the bundled cloud, a remote unlock, a thumb-turn
//! heard in the lock's advertisement by the radio watch with the link down, and the ordered
//! stop; then a second hub on the same state, as after a restart, still knows the lock.

mod support;

use std::sync::Arc;

use lockhub::auth::statement::{Operation, Permission, Statement};
use lockhub::ble::memory::{MemoryAdapter, MemoryAir};
use lockhub::ble::radios::Radios;
use lockhub::cloud::link::LinkState;
use lockhub::cloud::reply::Outcome;
use lockhub::devcloud::app::{AppClient, AppKey, claim, command, grant, pair, remote_unlock};
use lockhub::devcloud::pki::Pki;
use lockhub::firmware::{Mechanics, PersistentState};
use lockhub::hub::{Hub, HubBuilder, TimeSource};
use lockhub::protocol::gatt::Capabilities;
use lockhub::protocol::ids::{GatewayId, LockId};
use lockhub::protocol::message::LockState;
use lockhub::store::unix_now;
use rand_core::OsRng;
use support::bundled::Bundled;
use support::stack::{WAIT, assert_reply, next_state};

async fn start(config: &lockhub::config::Config, adapter: &Arc<MemoryAdapter>) -> Hub<MemoryAdapter> {
    let radios = Radios::new(vec![("hci0".to_owned(), adapter.clone())], 3);
    let time = TimeSource::Given(Arc::new(|| (unix_now(), true)));
    let hub = HubBuilder::new(config.clone(), radios, time).start().await.expect("the hub starts");
    let mut cloud = hub.cloud();
    tokio::time::timeout(WAIT, cloud.wait_for(|s| matches!(s, LinkState::Connected(_)))).await.unwrap().unwrap();
    hub
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_assembled_hub_serves_in_memory_locks_with_no_dbus() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), &["gw-mem"]).unwrap();
    let broker = Bundled::start(&pki);
    let gw = GatewayId::new("gw-mem").unwrap();
    let config = support::stack::config(dir.path(), &pki, &gw, broker.port);

    let air = MemoryAir::new();
    let lock_id = LockId([0x4d; 8]);
    let state = PersistentState::factory_new(
        lock_id,
        Capabilities::default(),
        Mechanics { motor_ms: 0, ..Mechanics::default() },
        &mut OsRng,
    );
    let setup_code = state.identity.setup_code.clone();
    let address = air.add_lock(state, 185);
    let lock = air.lock(&address).unwrap();
    let adapter = Arc::new(MemoryAdapter::new(&air, "hci0"));
    let hub = start(&config, &adapter).await;
    assert!(hub.control_socket().exists(), "the control socket is part of the hub");

    let app = AppClient::connect(&format!("mqtts://localhost:{}", broker.port), &pki, &gw).await.unwrap();
    let keys = dir.path().join("keys");
    let (owner, user) =
        (AppKey::generate(&keys, "owner", false).unwrap(), AppKey::generate(&keys, "user", false).unwrap());
    let now = unix_now();
    let code = lockhub::gateway::claim::claim_code(&mut hub.store().lock().unwrap()).unwrap().unwrap();
    assert_reply(&app.send(&claim(&gw, code.as_str(), now), &owner, WAIT).await.unwrap(), Outcome::Ok, None);
    let pairing = pair(&gw, lock_id, setup_code.expose(), now);
    assert_reply(&app.send(&pairing, &owner, WAIT).await.unwrap(), Outcome::Ok, None);
    assert_reply(&app.send(&remote_unlock(&gw, lock_id, true, now), &owner, WAIT).await.unwrap(), Outcome::Ok, None);
    let perms = vec![Permission::Lock, Permission::Unlock, Permission::Remote];
    let granted = Statement::Grant(grant(&gw, user.public(), lock_id, perms, None, 1, now));
    assert_reply(&app.send(&granted, &owner, WAIT).await.unwrap(), Outcome::Ok, None);

    // A remote unlock reaches the lock.
    let mut seen = app.watch();
    let unlock = Statement::Command(command(&gw, lock_id, Operation::Unlock, unix_now(), 30));
    assert_reply(&app.send(&unlock, &user, WAIT).await.unwrap(), Outcome::Ok, None);
    assert_eq!(lock.inspect(|fw, now| fw.status(now)).state, LockState::Unlocked);

    // The link down (the lock out of range, then back): only its advertisement can tell the
    // hub of a thumb-turn, and the radio watch hears it.
    let state_topic = format!("lockhub/v1/{gw}/lock/{lock_id}/state");
    adapter.set_in_range(&address, false);
    next_state(&mut seen, &state_topic, |s| s["connected"] == false).await;
    adapter.set_in_range(&address, true);
    lock.input(|fw, now| fw.turn_knob(now));
    next_state(&mut seen, &state_topic, |s| s["state"] == "locked").await;

    // Stopped in order: everything within its bound.
    let stopped = hub.stop().await;
    assert!(stopped.commands_finished && stopped.locks_released && stopped.link_closed, "{stopped:?}");
    assert!(!config.control.socket.exists(), "the control socket goes with the hub");

    // Started again on the same state: the lock is still paired and still answers.
    let hub = start(&config, &adapter).await;
    assert_eq!(hub.gateway().lock_count(), 1);
    let unlock = Statement::Command(command(&gw, lock_id, Operation::Unlock, unix_now(), 30));
    assert_reply(&app.send(&unlock, &user, WAIT).await.unwrap(), Outcome::Ok, None);
    assert_eq!(lock.inspect(|fw, now| fw.status(now)).state, LockState::Unlocked);
    hub.stop().await;
}

/// A hub with no `[cloud]`: it runs local only. Paired and commanded through its own
/// interfaces (the admin's pairing, a local command), it keeps nothing queued for a cloud
/// that does not exist, and says so: its control socket's status, not "unreachable".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_without_a_cloud_runs_local_only_and_queues_nothing() {
    use lockhub::auth::local_code::CodeHolder;
    use lockhub::protocol::message::Op;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), &["gw-alone"]).unwrap();
    let gw = GatewayId::new("gw-alone").unwrap();
    let mut config = support::stack::config(dir.path(), &pki, &gw, 1);
    config.cloud = None;
    let air = MemoryAir::new();
    let lock_id = LockId([0x4e; 8]);
    let state = PersistentState::factory_new(
        lock_id,
        Capabilities::default(),
        Mechanics { motor_ms: 0, ..Mechanics::default() },
        &mut OsRng,
    );
    let setup_code = state.identity.setup_code.expose().to_owned();
    let address = air.add_lock(state, 185);
    let adapter = Arc::new(MemoryAdapter::new(&air, "hci0"));
    let radios = Radios::new(vec![("hci0".to_owned(), adapter.clone())], 3);
    let time = TimeSource::Given(Arc::new(|| (unix_now(), true)));
    let hub = HubBuilder::new(config, radios, time).start().await.expect("a hub without a cloud starts");
    assert_eq!(*hub.cloud().borrow(), LinkState::NotConfigured);

    let paired = hub.gateway().admin_pair(lock_id, &setup_code).await.unwrap();
    assert_eq!(paired.result, Outcome::Ok, "{paired:?}");
    let holder = CodeHolder::Named("hallway".into());
    let unlocked = hub.gateway().local_command(lock_id, Op::Unlock, &holder, "a test").await.unwrap();
    assert!(unlocked.is_ok(), "{unlocked:?}");
    assert_eq!(air.lock(&address).unwrap().inspect(|fw, now| fw.status(now)).state, LockState::Unlocked);

    // The lock's events and state were queued for a cloud, and emptied as they came.
    let mut delivered = hub.delivered();
    loop {
        let queued = hub.store().lock().unwrap().outbox_len().unwrap();
        if queued == 0 && *delivered.borrow_and_update() > 0 {
            break;
        }
        tokio::time::timeout(WAIT, delivered.changed()).await.expect("the outbox was not emptied").unwrap();
    }

    let mut socket = tokio::net::UnixStream::connect(hub.control_socket()).await.unwrap();
    socket.write_all(b"{\"cmd\":\"status\"}\n").await.unwrap();
    let mut answer = String::new();
    tokio::io::BufReader::new(&mut socket).read_line(&mut answer).await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(status["ok"]["cloud"], serde_json::json!({ "connected": false, "configured": false }), "{status}");
    let stopped = hub.stop().await;
    assert!(stopped.commands_finished && stopped.locks_released && stopped.link_closed, "{stopped:?}");
}
