//! A hub in process over the real stack, for tests that drive it through the bundled cloud:
//! the assembly `lockhub run` starts (`lockhub::hub`: store, cloud link, intake, core, radio
//! watch, maintenance, control socket, local bridge when configured), on the bundled broker
//! (mutual TLS) and the test bus; and the usual start of a test — claimed, one lock paired with
//! remote unlock on, a user granted.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockhub::auth::statement::{Operation, Permission, Statement};
use lockhub::ble::BleConfig;
use lockhub::ble::bluez::BluezTransport;
use lockhub::cloud::link::LinkState;
use lockhub::cloud::reply::{Outcome, Reply};
use lockhub::config::{Config, GatewaySection};
use lockhub::devcloud::app::{AppClient, AppKey, claim, command, grant, pair, remote_unlock};
use lockhub::devcloud::pki::Pki;
use lockhub::gateway::Gateway;
use lockhub::gateway::policy::PolicyLimits;
use lockhub::hub::{Hub, HubBuilder, TimeSource};
use lockhub::protocol::ids::{GatewayId, LockId};
use lockhub::store::checkpoint::LogDebt;
use lockhub::store::{Store, unix_now};
use tokio::sync::watch;

use super::bundled::Bundled;

pub const WAIT: Duration = Duration::from_secs(60);

/// The gateway's clock in a test: the system clock, shifted by `offset_s`, synchronised or not.
#[derive(Debug)]
pub struct TestClock {
    pub synced: AtomicBool,
    pub offset_s: AtomicI64,
}

impl TestClock {
    pub fn now(&self) -> (i64, bool) {
        (unix_now() + self.offset_s.load(Ordering::SeqCst), self.synced.load(Ordering::SeqCst))
    }
}

pub struct Stack {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub broker: Bundled,
    pub gw: GatewayId,
    /// The configuration the hub runs on (a restart runs on it again).
    pub config: Config,
    pub clock: Arc<TestClock>,
    /// The running hub, as `lockhub run` assembles it.
    pub hub: Hub<BluezTransport>,
    /// Its store.
    pub store: Arc<Mutex<Store>>,
    /// Its gateway core.
    pub gateway: Arc<Gateway<BluezTransport>>,
    /// Its (first) BLE transport.
    pub transport: Arc<BluezTransport>,
    /// Its cloud link's state.
    pub cloud: watch::Receiver<LinkState>,
    /// Outbox records the link has delivered (acknowledged and deleted), counted.
    pub delivered: watch::Receiver<u64>,
    /// Compactions whose log the store's checkpointer is still to empty.
    pub log_debt: watch::Receiver<LogDebt>,
}

/// A stack whose hub has not started yet: change [`Prepared::config`] (local MQTT, the control
/// socket's group, policy limits), then [`Prepared::start`].
pub struct Prepared {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub broker: Bundled,
    pub gw: GatewayId,
    pub config: Config,
    pub clock: Arc<TestClock>,
}

/// How long the radio watch of a test gateway hears nothing before asking whether the bus is
/// still there (the daemon's 30 s would make a test of it wait as long).
pub const BUS_CHECK: Duration = Duration::from_secs(1);

/// A BLE configuration that gives up on an unreachable lock within seconds.
pub fn ble() -> BleConfig {
    BleConfig { connect_timeout_ms: 3_000, connect_attempts: 2, ..BleConfig::default() }
}

/// The configuration of a test hub `gw`: its state and control socket in `dir`, the bundled
/// broker on `port` with `pki`'s credentials, the test BLE timings.
pub fn config(dir: &Path, pki: &Pki, gw: &GatewayId, port: u16) -> Config {
    let mut config = Config::new(
        GatewaySection { id: gw.as_str().to_owned(), state_dir: dir.join("state") },
        pki.cloud_section(gw.as_str(), vec![format!("mqtts://localhost:{port}")]),
    );
    config.ble = ble();
    config.control.socket = dir.join("run").join("control.sock");
    config
}

impl Stack {
    pub async fn start(gw: &str) -> Stack {
        Self::prepare(gw).start().await
    }

    pub async fn start_with(gw: &str, limits: PolicyLimits) -> Stack {
        let mut prepared = Self::prepare(gw);
        prepared.config.policy = limits;
        prepared.start().await
    }

    /// The PKI, the bundled broker and a configuration, before the hub starts.
    pub fn prepare(gw: &str) -> Prepared {
        super::test_bed();
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(&dir.path().join("pki"), &[gw]).unwrap();
        let broker = Bundled::start(&pki);
        let gw = GatewayId::new(gw).unwrap();
        let clock = Arc::new(TestClock { synced: AtomicBool::new(true), offset_s: AtomicI64::new(0) });
        let config = config(dir.path(), &pki, &gw, broker.port);
        Prepared { dir, pki, broker, gw, config, clock }
    }

    /// Starts a hub of `config` on the test bus's BlueZ and `clock`, and waits for its cloud
    /// link.
    pub async fn start_hub(config: &Config, clock: &Arc<TestClock>) -> Hub<BluezTransport> {
        super::test_bed();
        let radios = BluezTransport::open_radios(&config.ble).await.expect("opening the BlueZ transport");
        let c = clock.clone();
        let time = TimeSource::Given(Arc::new(move || c.now()));
        let hub = HubBuilder::new(config.clone(), radios, time)
            .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(2))
            .bus_check(BUS_CHECK)
            .start()
            .await
            .expect("starting the hub");
        hub.cloud().wait_for(|s| matches!(s, LinkState::Connected(_))).await.unwrap();
        hub
    }

    fn running(prepared: Prepared, hub: Hub<BluezTransport>) -> Stack {
        let Prepared { dir, pki, broker, gw, config, clock } = prepared;
        Stack {
            store: hub.store().clone(),
            gateway: hub.gateway().clone(),
            transport: hub.gateway().radios().get(0).transport().clone(),
            cloud: hub.cloud(),
            delivered: hub.delivered(),
            log_debt: hub.log_debt(),
            dir,
            pki,
            broker,
            gw,
            config,
            clock,
            hub,
        }
    }

    /// Stops the hub in order and starts a new one on the same configuration and state (the
    /// store reopened from disk), as a restart of the daemon would.
    pub async fn restart_gateway(self) -> Stack {
        let Stack { dir, pki, broker, gw, config, clock, hub, .. } = self;
        let stopped = hub.stop().await;
        assert!(stopped.locks_released && stopped.commands_finished, "{stopped:?}");
        let hub = Self::start_hub(&config, &clock).await;
        Self::running(Prepared { dir, pki, broker, gw, config, clock }, hub)
    }

    pub async fn app(&self) -> AppClient {
        AppClient::connect(&format!("mqtts://localhost:{}", self.broker.port), &self.pki, &self.gw).await.unwrap()
    }

    pub fn key(&self, name: &str) -> AppKey {
        AppKey::generate(&self.dir.path().join("keys"), name, false).unwrap()
    }

    /// What `check` finds once it finds it (`Ok`), reading again after each outbox record the
    /// link delivers, for at most a minute without one (then it fails with `check`'s `Err`).
    ///
    /// For what trails the replies a test has seen: a reply leaves through the express lane
    /// while its outcome (audit record, the lock's events) commits, and each commit is followed
    /// by the deletion of its reply's outbox record, which `delivered` counts.
    pub async fn after_deliveries<T>(&self, mut check: impl FnMut() -> Result<T, String>) -> T {
        let mut delivered = self.delivered.clone();
        loop {
            delivered.borrow_and_update();
            let why = match check() {
                Ok(found) => return found,
                Err(why) => why,
            };
            let changed = tokio::time::timeout(Duration::from_secs(60), delivered.changed()).await;
            assert!(matches!(changed, Ok(Ok(()))), "{why}, and nothing more delivered in a minute");
        }
    }

    /// The outcomes audited under `action_prefix` once `ready` holds for them (see
    /// [`Stack::after_deliveries`]).
    pub async fn audited_until(&self, action_prefix: &str, ready: impl Fn(&[String]) -> bool) -> Vec<String> {
        self.after_deliveries(|| {
            let outcomes = self.audit_outcomes(action_prefix);
            if ready(&outcomes) { Ok(outcomes) } else { Err(format!("audited under {action_prefix:?}: {outcomes:?}")) }
        })
        .await
    }

    /// The outcomes audited under `action_prefix` once each of `expected` is among them (as
    /// many times as it is listed).
    pub async fn audited(&self, action_prefix: &str, expected: &[&str]) -> Vec<String> {
        self.audited_until(action_prefix, |outcomes| {
            let mut left: Vec<&str> = outcomes.iter().map(String::as_str).collect();
            expected.iter().all(|want| match left.iter().position(|o| o == want) {
                Some(i) => {
                    left.swap_remove(i);
                    true
                }
                None => false,
            })
        })
        .await
    }

    /// The outcomes audited under `action_prefix` so far (see [`Stack::audited`] to await
    /// those of replies already seen).
    pub fn audit_outcomes(&self, action_prefix: &str) -> Vec<String> {
        let store = self.store.lock().unwrap();
        store
            .audit_records(0, 100_000)
            .unwrap()
            .into_iter()
            .filter(|r| r.action.starts_with(action_prefix))
            .map(|r| r.outcome)
            .collect()
    }
}

impl Prepared {
    /// Starts the hub and waits for its cloud link.
    pub async fn start(self) -> Stack {
        let hub = Stack::start_hub(&self.config, &self.clock).await;
        Stack::running(self, hub)
    }
}

pub fn assert_reply(reply: &Reply, result: Outcome, reason: Option<&str>) {
    assert_eq!(reply.result, result, "{reply:?}");
    assert_eq!(reply.reason.map(|r| r.as_str()), reason, "{reply:?}");
}

/// A claimed gateway with one paired lock whose remote unlock is on, and a user granted
/// `perms` (with `schedule`).
pub struct Paired {
    pub app: AppClient,
    pub owner: AppKey,
    pub user: AppKey,
    pub lock: super::LockReport,
    pub lock_id: LockId,
    pub grant: lockhub::auth::statement::StatementId,
}

impl Paired {
    /// Sends `op` for the paired lock as the granted user (issued now, valid 30 s); the reply.
    pub async fn send(&self, stack: &Stack, op: Operation) -> Reply {
        let c = Statement::Command(command(&stack.gw, self.lock_id, op, unix_now(), 30));
        self.app.send(&c, &self.user, WAIT).await.unwrap()
    }

    /// The topic of the lock's retained state.
    pub fn state_topic(&self, stack: &Stack) -> String {
        format!("lockhub/v1/{}/lock/{}/state", stack.gw, self.lock_id)
    }

    /// Drops the lock's link in the emulator and waits for the retained state (on `seen`, from
    /// [`AppClient::watch`]) to say it is down: then only an advertisement, or a new link,
    /// tells the gateway what the lock does.
    pub async fn link_down(
        &self,
        stack: &Stack,
        ctl: &super::EmulatorProxy<'_>,
        seen: &mut tokio::sync::broadcast::Receiver<lockhub::devcloud::app::Seen>,
    ) {
        ctl.drop_link(&self.lock.lock_id).await.unwrap();
        next_state(seen, &self.state_topic(stack), |s| s["connected"] == false).await;
    }
}

pub async fn claim_pair_grant(
    stack: &Stack,
    perms: &[Permission],
    schedule: Option<lockhub::auth::statement::Schedule>,
) -> Paired {
    let app = stack.app().await;
    let (owner, user) = (stack.key("owner"), stack.key("user"));
    let now = unix_now();
    let gw = stack.gw.clone();
    let code = lockhub::gateway::claim::claim_code(&mut stack.store.lock().unwrap()).unwrap().unwrap();
    assert_reply(&app.send(&claim(&gw, code.as_str(), now), &owner, WAIT).await.unwrap(), Outcome::Ok, None);
    let ctl = super::control().await;
    let lock = super::add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    let lock_id = LockId::parse(&lock.lock_id).unwrap();
    let pair = pair(&gw, lock_id, &lock.setup_code, now);
    assert_reply(&app.send(&pair, &owner, WAIT).await.unwrap(), Outcome::Ok, None);
    assert_reply(&app.send(&remote_unlock(&gw, lock_id, true, now), &owner, WAIT).await.unwrap(), Outcome::Ok, None);
    let grant = grant(&gw, user.public(), lock_id, perms.to_vec(), schedule, 1, now);
    let id = grant.jti.clone();
    assert_reply(&app.send(&Statement::Grant(grant), &owner, WAIT).await.unwrap(), Outcome::Ok, None);
    // Audit records commit as their replies leave: tests reading the chain start with these in.
    for action in ["lock.pair", "policy.set", "grant.add"] {
        stack.audited(action, &["ok"]).await;
    }
    Paired { app, owner, user, lock, lock_id, grant: id }
}

/// Waits for the next retained state of the lock on `topic` that `wanted` accepts.
pub async fn next_state(
    seen: &mut tokio::sync::broadcast::Receiver<lockhub::devcloud::app::Seen>,
    topic: &str,
    wanted: impl Fn(&serde_json::Value) -> bool,
) {
    loop {
        let msg = tokio::time::timeout(WAIT, seen.recv()).await.expect("no such state").unwrap();
        if msg.topic == topic && wanted(&serde_json::from_slice(&msg.payload).unwrap()) {
            return;
        }
    }
}
