//! A gateway in process over the real stack, for tests that drive it through the bundled
//! cloud: its store, cloud link, intake, core and radio watch, on the bundled broker (mutual
//! TLS) and the test bus; and the usual start of a test — claimed, one lock paired with remote
//! unlock on, a user granted.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lockhub::auth::statement::{Operation, Permission, Statement};
use lockhub::ble::BleConfig;
use lockhub::ble::bluez::BluezTransport;
use lockhub::cloud::link::{CloudConfig, CloudLink, LinkState};
use lockhub::cloud::reply::{Outcome, Reply};
use lockhub::devcloud::app::{AppClient, AppKey, claim, command, grant, pair, remote_unlock};
use lockhub::devcloud::pki::Pki;
use lockhub::gateway::intake::{self, Intake};
use lockhub::gateway::policy::PolicyLimits;
use lockhub::gateway::statements::Gateway;
use lockhub::protocol::ids::{GatewayId, LockId};
use lockhub::store::checkpoint::{Checkpoints, LogDebt};
use lockhub::store::{Store, StoreConfig, unix_now};
use tokio::sync::{Notify, mpsc, watch};

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
    pub store: Arc<Mutex<Store>>,
    pub clock: Arc<TestClock>,
    pub limits: PolicyLimits,
    pub stop: watch::Sender<bool>,
    /// The running gateway's core.
    pub gateway: Arc<Gateway<BluezTransport>>,
    /// Its BLE transport.
    pub transport: Arc<BluezTransport>,
    /// The cloud link's state.
    pub cloud: watch::Receiver<LinkState>,
    /// Outbox records the link has delivered (acknowledged and deleted), counted.
    pub delivered: watch::Receiver<u64>,
    /// Compactions whose log the store's checkpointer is still to empty.
    pub log_debt: watch::Receiver<LogDebt>,
}

/// What [`Stack::run_gateway`] started.
pub struct Running {
    pub store: Arc<Mutex<Store>>,
    pub stop: watch::Sender<bool>,
    pub gateway: Arc<Gateway<BluezTransport>>,
    pub transport: Arc<BluezTransport>,
    pub cloud: watch::Receiver<LinkState>,
    /// Outbox records the link has delivered (acknowledged and deleted), counted.
    pub delivered: watch::Receiver<u64>,
    pub log_debt: watch::Receiver<LogDebt>,
}

/// How long the radio watch of a test gateway hears nothing before asking whether the bus is
/// still there (the daemon's 30 s would make a test of it wait as long).
pub const BUS_CHECK: Duration = Duration::from_secs(1);

/// A BLE configuration that gives up on an unreachable lock within seconds.
pub fn ble() -> BleConfig {
    BleConfig { connect_timeout_ms: 3_000, connect_attempts: 2, ..BleConfig::default() }
}

impl Stack {
    pub async fn start(gw: &str) -> Stack {
        Self::start_with(gw, PolicyLimits::default()).await
    }

    pub async fn start_with(gw: &str, limits: PolicyLimits) -> Stack {
        super::test_bed();
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(&dir.path().join("pki"), &[gw]).unwrap();
        let broker = Bundled::start(&pki);
        let gw = GatewayId::new(gw).unwrap();
        let clock = Arc::new(TestClock { synced: AtomicBool::new(true), offset_s: AtomicI64::new(0) });
        let Running { store, stop, gateway, transport, cloud, delivered, log_debt } =
            Self::run_gateway(&dir, &pki, &broker, &gw, &clock, limits).await;
        Stack { dir, pki, broker, gw, store, clock, limits, stop, gateway, transport, cloud, delivered, log_debt }
    }

    /// Starts a gateway (store and its checkpointer, cloud link, intake, core, radio watch) on
    /// the stack's state directory, wired as the daemon wires them.
    pub async fn run_gateway(
        dir: &tempfile::TempDir,
        pki: &Pki,
        broker: &Bundled,
        gw: &GatewayId,
        clock: &Arc<TestClock>,
        limits: PolicyLimits,
    ) -> Running {
        let mut store =
            Store::open(StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(&dir.path().join("state")) })
                .unwrap();
        store.transaction(|tx| tx.set_gateway_identity(gw, unix_now())).unwrap();
        let checkpoints = Checkpoints::hand_off(&mut store).unwrap();
        let log_debt = checkpoints.debt();
        let store = Arc::new(Mutex::new(store));
        let outbox_ready = Arc::new(Notify::new());
        let config = CloudConfig {
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            ..CloudConfig::new(
                vec![format!("mqtts://localhost:{}", broker.port)],
                pki.ca_cert(),
                pki.client_cert(gw.as_str()),
                pki.client_key(gw.as_str()),
            )
        };
        let (inbound_tx, inbound) = mpsc::channel(64);
        let (link, mut reports) =
            CloudLink::new(config, gw.clone(), store.clone(), outbox_ready.clone(), inbound_tx).unwrap();
        let c = clock.clone();
        let clock: lockhub::gateway::statements::Clock = Arc::new(move || c.now());
        super::test_bed();
        let radios = BluezTransport::open_radios(&ble()).await.expect("opening the BlueZ transport");
        let gateway: Arc<Gateway<BluezTransport>> =
            Gateway::new(gw.clone(), store.clone(), outbox_ready.clone(), radios, ble(), limits, clock);
        gateway.send_replies_through(link.express_lane());
        gateway.start_locks().unwrap();
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(checkpoints.run(stopped.clone()));
        let (accepted_tx, accepted) = mpsc::channel(64);
        tokio::spawn(intake::serve(
            Intake::new(store.clone(), gw.clone(), outbox_ready.clone()),
            inbound,
            accepted_tx,
            unix_now,
        ));
        tokio::spawn(gateway.clone().serve(accepted));
        tokio::spawn(lockhub::gateway::radio_watch::watch_radios(gateway.clone(), BUS_CHECK, stopped.clone()));
        let link = tokio::spawn(link.run(stopped.clone()));
        reports.state.wait_for(|s| matches!(s, LinkState::Connected(_))).await.unwrap();
        // Keep the link's task handle alive with the switch: stopping ends it.
        tokio::spawn(async move {
            let _ = link.await;
        });
        let transport = gateway.radios().get(0).transport().clone();
        Running { store, stop, gateway, transport, cloud: reports.state, delivered: reports.delivered, log_debt }
    }

    /// Stops the gateway and starts a new one on the same state directory (the store reopened
    /// from disk), as a restart of the daemon would.
    pub async fn restart_gateway(&mut self) {
        // In the daemon's order: the locks' tasks let go of their locks first.
        assert!(self.gateway.stop_locks(WAIT).await, "the locks' tasks did not end");
        self.stop.send(true).unwrap();
        let running = Self::run_gateway(&self.dir, &self.pki, &self.broker, &self.gw, &self.clock, self.limits).await;
        self.store = running.store;
        self.stop = running.stop;
        self.gateway = running.gateway;
        self.transport = running.transport;
        self.cloud = running.cloud;
        self.delivered = running.delivered;
        self.log_debt = running.log_debt;
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
