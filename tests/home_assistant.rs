//! Home Assistant and local control over Debian's Mosquitto (plain MQTT with a password, as a
//! home broker is set up), beside the gateway running over the real stack:
//! - discovery payloads checked field by field against Home Assistant's MQTT lock, sensor and
//!   binary_sensor schemas (`docs/schemas/ha-*.json`);
//! - the lock's state through its transitions, jam included, and its availability;
//! - local commands: the right code, a missing one, wrong ones into the lockout, each audited
//!   and answered on the result topic; lock without a code;
//! - discovery republished when Home Assistant says `online`;
//! - unbind clears every retained config and state.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lockhub::auth::statement::Permission;
use lockhub::ble::LockTransport;
use lockhub::local::codes::hash_code;
use lockhub::local::config::{LocalCodeEntry, LocalConfig, LocalMqtt};
use lockhub::local::home_assistant::lock_state;
use lockhub::protocol::message::LockState;
use lockhub::store::audit::AuditActor;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::Value;
use support::stack::{Stack, claim_pair_grant};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(60);
const PREFIX: &str = "homeassistant";

/// Debian's Mosquitto on an ephemeral port, users with passwords, no anonymous access.
struct HomeBroker {
    child: Child,
    port: u16,
    /// A second listener with TLS (the certificate of `pki`), when asked for.
    tls_port: Option<u16>,
    _dir: tempfile::TempDir,
}

impl Drop for HomeBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HomeBroker {
    fn start(users: &[(&str, &str)]) -> Self {
        Self::start_with_tls(users, None)
    }

    fn start_with_tls(users: &[(&str, &str)], pki: Option<&lockhub::devcloud::pki::Pki>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        for (i, (user, password)) in users.iter().enumerate() {
            let mut args = vec!["-b"];
            if i == 0 {
                args.push("-c");
            }
            let ok = Command::new("mosquitto_passwd").args(args).arg(&passwd).args([user, password]).status().unwrap();
            assert!(ok.success(), "mosquitto_passwd");
        }
        let [port, spare] = support::mosquitto::free_ports::<2>();
        let root = std::fs::read_to_string("/proc/self/status").unwrap().lines().any(|l| l.starts_with("Uid:\t0\t"));
        let conf = dir.path().join("mosquitto.conf");
        let tls_port = pki.map(|_| spare);
        // Listener settings apply per listener: each gets the password file.
        let listener = |port: u16| {
            format!("listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n", passwd.display())
        };
        let mut text = format!(
            "{}per_listener_settings true\npersistence false\n\
             log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n{}",
            if root { "user root\n" } else { "" },
            listener(port)
        );
        if let (Some(pki), Some(tls_port)) = (pki, tls_port) {
            text += &format!(
                "{}cafile {}\ncertfile {}\nkeyfile {}\ntls_version tlsv1.3\n",
                listener(tls_port),
                pki.ca_cert().display(),
                pki.broker_cert().display(),
                pki.broker_key().display()
            );
        }
        std::fs::write(&conf, text).unwrap();
        let mut child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(support::tier::program("mosquitto").expect("mosquitto is installed (tier::ready)"))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting mosquitto (.ci/run installs it)");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        loop {
            let line = lines.next().expect("mosquitto exited before it was running").unwrap();
            if line.contains("running") {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        HomeBroker { child, port, tls_port, _dir: dir }
    }
}

/// Home Assistant's side: subscribed to discovery and lockhub's local topics, keeping the
/// latest payload of every topic and how many times each was published.
struct HomeAssistant {
    client: AsyncClient,
    messages: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    latest: HashMap<String, Vec<u8>>,
    count: HashMap<String, usize>,
    history: HashMap<String, Vec<String>>,
}

impl HomeAssistant {
    async fn connect(port: u16, password: &str) -> Self {
        let mut options = MqttOptions::new("home-assistant", "127.0.0.1", port);
        options.set_credentials("homeassistant", password);
        // Room to send oversized messages on purpose.
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        client.subscribe(format!("{PREFIX}/#"), QoS::AtLeastOnce).await.unwrap();
        client.subscribe("lockhub/local/#", QoS::AtLeastOnce).await.unwrap();
        let (tx, messages) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        if tx.send((p.topic, p.payload.to_vec())).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => panic!("Home Assistant's connection failed: {e}"),
                }
            }
        });
        HomeAssistant { client, messages, latest: HashMap::new(), count: HashMap::new(), history: HashMap::new() }
    }

    /// Takes messages until `done` holds of what has been seen.
    async fn until(&mut self, what: &str, done: impl Fn(&HomeAssistant) -> bool) {
        if !self.until_within(WAIT, &done).await {
            panic!("never saw {what}; latest: {:#?}", self.latest.keys().collect::<Vec<_>>());
        }
    }

    /// Takes messages until `done` holds of what has been seen (true), or for `bound` at most.
    async fn until_within(&mut self, bound: Duration, done: impl Fn(&HomeAssistant) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + bound;
        while !done(self) {
            let Ok(Some((topic, payload))) = tokio::time::timeout_at(deadline, self.messages.recv()).await else {
                return false;
            };
            *self.count.entry(topic.clone()).or_default() += 1;
            self.history.entry(topic.clone()).or_default().push(String::from_utf8_lossy(&payload).into_owned());
            self.latest.insert(topic, payload);
        }
        true
    }

    /// The next message on `topic`.
    async fn next_on(&mut self, topic: &str) -> Vec<u8> {
        let seen = self.count.get(topic).copied().unwrap_or(0);
        self.until(topic, |ha| ha.count.get(topic).copied().unwrap_or(0) > seen).await;
        self.latest[topic].clone()
    }

    fn text(&self, topic: &str) -> Option<&str> {
        self.latest.get(topic).map(|p| std::str::from_utf8(p).unwrap())
    }

    fn json(&self, topic: &str) -> Value {
        serde_json::from_slice(&self.latest[topic]).unwrap_or_else(|e| panic!("{topic}: {e}"))
    }

    async fn subscribe(&self, filter: &str) {
        self.client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    }

    async fn publish(&self, topic: &str, payload: &str) {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.to_owned()).await.unwrap();
    }
}

fn schema(name: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schemas").join(name);
    let json: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    jsonschema::validator_for(&json).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn assert_valid(validator: &jsonschema::Validator, topic: &str, value: &Value) {
    let errors: Vec<String> = validator.iter_errors(value).map(|e| format!("{} at {}", e, e.instance_path())).collect();
    assert!(errors.is_empty(), "{topic} does not match Home Assistant's schema: {errors:#?}\n{value:#}");
}

#[test]
fn every_bolt_state_has_its_home_assistant_value() {
    let states = [LockState::Locked, LockState::Unlocked, LockState::Locking, LockState::Unlocking, LockState::Jammed];
    let values: Vec<&str> = states.iter().map(|s| lock_state(*s)).collect();
    assert_eq!(values, ["LOCKED", "UNLOCKED", "LOCKING", "UNLOCKING", "JAMMED"]);
}

fn result_topic(id: &str) -> String {
    format!("lockhub/local/gw-ha/{id}/result")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistant_discovers_commands_with_codes_and_forgets_an_unbound_lock() {
    crate::needs!(Dbus, Mosquitto);
    let mut hub = Stack::prepare("gw-ha");
    let broker = HomeBroker::start(&[("lockhub", "hub-secret-1"), ("homeassistant", "ha-secret-2")]);
    let password_file = hub.dir.path().join("local-mqtt.password");
    std::fs::write(&password_file, "hub-secret-1\n").unwrap();
    let local = LocalConfig {
        mqtt: Some(LocalMqtt {
            host: "127.0.0.1".into(),
            port: Some(broker.port),
            tls: false,
            ca: None,
            username: Some("lockhub".into()),
            password_file: Some(password_file),
        }),
        codes: vec![LocalCodeEntry { user: "alice".into(), hash: hash_code("2468").unwrap() }],
        lockout_failures: 3,
        ..LocalConfig::default()
    };
    let mut ha = HomeAssistant::connect(broker.port, "ha-secret-2").await;
    hub.config.local = local;
    let stack = hub.start().await;

    // The gateway's own device, online, its cloud link up.
    let node = "gw-ha";
    let cloud_config = format!("{PREFIX}/binary_sensor/{node}/cloud/config");
    let availability = "lockhub/local/gw-ha/availability";
    ha.until("the gateway's discovery", |ha| {
        ha.latest.contains_key(&cloud_config) && ha.text(availability) == Some("online")
    })
    .await;
    ha.until("the cloud link's state", |ha| ha.text("lockhub/local/gw-ha/cloud") == Some("ON")).await;
    let binary_sensor = schema("ha-binary_sensor.json");
    assert_valid(&binary_sensor, &cloud_config, &ha.json(&cloud_config));

    // A lock is paired (through the cloud): discovered with its five entities.
    let p = claim_pair_grant(&stack, &[Permission::Lock, Permission::Unlock], None).await;
    let id = p.lock_id.to_string();
    let lock_config = format!("{PREFIX}/lock/{node}/{id}/config");
    let battery_config = format!("{PREFIX}/sensor/{node}/{id}_battery/config");
    let event_config = format!("{PREFIX}/sensor/{node}/{id}_last_event/config");
    let door_config = format!("{PREFIX}/binary_sensor/{node}/{id}_door/config");
    let link_config = format!("{PREFIX}/binary_sensor/{node}/{id}_connectivity/config");
    let state = format!("lockhub/local/gw-ha/{id}/state");
    ha.until("the lock's discovery and state", |ha| {
        [&lock_config, &battery_config, &event_config, &door_config, &link_config]
            .iter()
            .all(|t| ha.latest.contains_key(*t))
            && ha.text(&state).is_some()
            && [&lock_config, &battery_config, &event_config, &door_config, &link_config]
                .iter()
                .all(|t| ha.json(t)["device"].get("sw_version").is_some())
    })
    .await;
    // Every entity carries the whole device: whichever config Home Assistant reads first names
    // the device (with identifiers alone it would be nameless, and its entities `none_…`).
    for topic in [&battery_config, &event_config, &door_config, &link_config] {
        assert_eq!(ha.json(topic)["device"], ha.json(&lock_config)["device"], "{topic}");
    }
    for key in ["name", "identifiers", "manufacturer", "model", "sw_version"] {
        assert!(ha.json(&lock_config)["device"].get(key).is_some(), "the device's {key}");
    }
    let lock = ha.json(&lock_config);
    assert_valid(&schema("ha-lock.json"), &lock_config, &lock);
    let sensor = schema("ha-sensor.json");
    for topic in [&battery_config, &event_config] {
        assert_valid(&sensor, topic, &ha.json(topic));
    }
    for topic in [&door_config, &link_config] {
        assert_valid(&binary_sensor, topic, &ha.json(topic));
    }
    // Field by field: what Home Assistant needs to drive and show the lock.
    let set = format!("lockhub/local/gw-ha/{id}/set");
    assert_eq!(lock["command_topic"], set.as_str());
    assert_eq!(lock["state_topic"], state.as_str());
    for (key, value) in [
        ("payload_lock", "LOCK"),
        ("payload_unlock", "UNLOCK"),
        ("payload_open", "OPEN"),
        ("state_locked", "LOCKED"),
        ("state_unlocked", "UNLOCKED"),
        ("state_locking", "LOCKING"),
        ("state_unlocking", "UNLOCKING"),
        ("state_jammed", "JAMMED"),
        ("availability_mode", "all"),
        // Locking needs no code here (the default): the format takes none as well, as Home
        // Assistant checks it on locking too.
        ("code_format", r"^(\d{4,12})?$"),
    ] {
        assert_eq!(lock[key], value, "{key}");
    }
    assert_eq!(lock["unique_id"], format!("lockhub_gw-ha_{id}").as_str());
    let availability_topics: Vec<&str> =
        lock["availability"].as_array().unwrap().iter().map(|a| a["topic"].as_str().unwrap()).collect();
    assert_eq!(availability_topics, [availability.to_owned(), format!("lockhub/local/gw-ha/{id}/availability")]);
    let device = &lock["device"];
    assert_eq!(device["via_device"], "lockhub_gw-ha");
    assert_eq!(device["manufacturer"], "LHP/1 lock");
    assert!(device["model"].as_str().unwrap().contains("latch"), "{device}");
    assert!(!device["sw_version"].as_str().unwrap().is_empty());
    let battery = ha.json(&battery_config);
    assert_eq!(
        (battery["device_class"].as_str(), battery["unit_of_measurement"].as_str()),
        (Some("battery"), Some("%"))
    );
    assert_eq!(ha.json(&door_config)["device_class"], "door");
    assert_eq!(ha.json(&link_config)["device_class"], "connectivity");
    let last_event = ha.json(&event_config);
    assert_eq!(last_event["json_attributes_topic"], last_event["state_topic"]);
    let battery_state = format!("lockhub/local/gw-ha/{id}/battery");
    ha.until("the battery level", |ha| ha.text(&battery_state).is_some_and(|b| b.parse::<u8>().is_ok())).await;

    // Anyone who may publish on the local broker leaves a 64 KiB retained message on
    // Home Assistant's status topic and sends a 64 KiB command: the bridge, which gets the
    // retained one again at every subscription, reads both and keeps serving (with rumqttc's
    // 10 KiB default it dropped the connection, and every reconnection brought it back).
    ha.client.publish("homeassistant/status", QoS::AtLeastOnce, true, vec![b'x'; 64 << 10]).await.unwrap();
    ha.client.publish(&set, QoS::AtLeastOnce, false, vec![b'x'; 64 << 10]).await.unwrap();
    let refused: Value = serde_json::from_slice(&ha.next_on(&result_topic(&id)).await).unwrap();
    assert_eq!(refused["result"], "refused", "{refused}");

    // Local commands. Unlock needs a code: the right one opens, audited as alice's.
    let result = format!("lockhub/local/gw-ha/{id}/result");
    let answer = |payload: Vec<u8>| serde_json::from_slice::<Value>(&payload).unwrap();
    ha.publish(&set, r#"{"action":"UNLOCK","code":"2468"}"#).await;
    assert_eq!(answer(ha.next_on(&result).await), serde_json::json!({"action":"unlock","result":"ok","reason":null}));
    ha.until("UNLOCKED", |ha| ha.text(&state) == Some("UNLOCKED")).await;
    // The bolt was shown moving first.
    let states = &ha.history[&state];
    assert_eq!(states[states.len() - 2..], ["UNLOCKING", "UNLOCKED"], "{states:?}");
    let event = format!("lockhub/local/gw-ha/{id}/event");
    ha.until("the last event", |ha| {
        ha.latest.get(&event).is_some_and(|_| ha.json(&event)["summary"] == "unlocked locally")
    })
    .await;
    // Lock needs none.
    ha.publish(&set, "LOCK").await;
    assert_eq!(answer(ha.next_on(&result).await)["result"], "ok");
    ha.until("LOCKED", |ha| ha.text(&state) == Some("LOCKED")).await;
    let states = &ha.history[&state];
    assert_eq!(states[states.len() - 2..], ["LOCKING", "LOCKED"], "{states:?}");
    // A jam reaches Home Assistant as JAMMED; locking again clears it.
    let ctl = support::control().await;
    ctl.set_faults(&p.lock.lock_id, r#"{"jam_next_operation": true}"#).await.unwrap();
    ha.publish(&set, r#"{"action":"UNLOCK","code":"2468"}"#).await;
    assert_eq!(
        answer(ha.next_on(&result).await),
        serde_json::json!({"action":"unlock","result":"failed","reason":"jammed"})
    );
    ha.until("JAMMED", |ha| ha.text(&state) == Some("JAMMED")).await;
    let states = &ha.history[&state];
    assert_eq!(states[states.len() - 2..], ["UNLOCKING", "JAMMED"], "{states:?}");
    ctl.set_faults(&p.lock.lock_id, "{}").await.unwrap();
    ha.publish(&set, "LOCK").await;
    assert_eq!(answer(ha.next_on(&result).await)["result"], "ok");
    ha.until("LOCKED after the jam", |ha| ha.text(&state) == Some("LOCKED")).await;
    // Unlock without a code, then with wrong ones until local control is locked out: even the
    // right code is then refused.
    ha.publish(&set, "UNLOCK").await;
    assert_eq!(answer(ha.next_on(&result).await)["reason"], "code_required");
    for _ in 0..3 {
        ha.publish(&set, r#"{"action":"UNLOCK","code":"1111"}"#).await;
        assert_eq!(answer(ha.next_on(&result).await)["reason"], "wrong_code");
    }
    ha.publish(&set, r#"{"action":"UNLOCK","code":"2468"}"#).await;
    assert_eq!(answer(ha.next_on(&result).await)["reason"], "locked_out");
    assert_eq!(ha.text(&state), Some("LOCKED"));
    // The lockout is this lock's: alice's code still opens another lock meanwhile (all local
    // control locked out, a guesser at one door shut every door).
    let ctl = support::control().await;
    let back = support::add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    let back_id = lockhub::protocol::ids::LockId::parse(&back.lock_id).unwrap();
    let paired = lockhub::devcloud::app::pair(&stack.gw, back_id, &back.setup_code, lockhub::store::unix_now());
    let reply = p.app.send(&paired, &p.owner, WAIT).await.unwrap();
    support::stack::assert_reply(&reply, lockhub::cloud::reply::Outcome::Ok, None);
    let back_state = format!("lockhub/local/gw-ha/{back_id}/state");
    ha.until("the second lock's state", |ha| ha.text(&back_state) == Some("LOCKED")).await;
    ha.publish(&format!("lockhub/local/gw-ha/{back_id}/set"), r#"{"action":"UNLOCK","code":"2468"}"#).await;
    let opened = answer(ha.next_on(&result_topic(&back_id.to_string())).await);
    assert_eq!(opened["result"], "ok", "{opened}");
    ha.publish(&set, "BREAK IN").await;
    assert_eq!(answer(ha.next_on(&result).await)["reason"], "malformed");
    let audited: Vec<(String, String)> = {
        let store = stack.store.lock().unwrap();
        store
            .audit_records(0, 1000)
            .unwrap()
            .into_iter()
            .filter(|r| r.action.starts_with("local."))
            .map(|r| (r.action, r.outcome))
            .collect()
    };
    let pairs: Vec<(&str, &str)> = audited.iter().map(|(a, o)| (a.as_str(), o.as_str())).collect();
    assert_eq!(
        pairs,
        [
            ("local.command", "malformed"),
            ("local.unlock", "ok"),
            ("local.lock", "ok"),
            ("local.unlock", "jammed"),
            ("local.lock", "ok"),
            ("local.unlock", "code_required"),
            ("local.unlock", "wrong_code"),
            ("local.unlock", "wrong_code"),
            ("local.unlock", "wrong_code"),
            ("local.unlock", "locked_out"),
            ("local.unlock", "ok"),
            ("local.command", "malformed"),
        ]
    );

    // Home Assistant restarts and says so: everything is published again.
    let before = ha.count[&lock_config];
    ha.publish(&format!("{PREFIX}/status"), "online").await;
    ha.until("discovery again", |ha| ha.count[&lock_config] > before && ha.count[&cloud_config] > 1).await;

    // Unbound: every retained config and state of the lock is cleared, and the BLE transport
    // keeps nothing of it either.
    assert!(stack.transport.remembers(&p.lock.address), "connected, so where its characteristics are is known");
    assert_eq!(stack.gateway.unbind(p.lock_id, AuditActor::Admin).await.unwrap(), Some(true));
    assert!(!stack.transport.remembers(&p.lock.address), "the transport forgot the unbound lock");
    let cleared: Vec<String> =
        [&lock_config, &battery_config, &event_config, &door_config, &link_config, &state, &battery_state]
            .iter()
            .map(|t| t.to_string())
            .collect();
    ha.until("the lock's topics cleared", |ha| cleared.iter().all(|t| ha.latest.get(t).is_some_and(Vec::is_empty)))
        .await;
    // And the broker keeps none of it: a new subscriber sees only the gateway's own.
    let mut fresh = HomeAssistant::connect(broker.port, "ha-secret-2").await;
    fresh.until("the gateway's retained discovery", |ha| ha.latest.contains_key(&cloud_config)).await;
    fresh.client.publish(format!("{PREFIX}/probe"), QoS::AtLeastOnce, false, "end").await.unwrap();
    fresh.until("the probe", |ha| ha.latest.contains_key(&format!("{PREFIX}/probe"))).await;
    let left: Vec<&String> = fresh.latest.keys().filter(|t| t.contains(&id)).collect();
    assert!(left.is_empty(), "retained after unbind: {left:?}");
}

/// Owner-signed local codes, with the hub reaching the home broker over TLS: the owner's app
/// gives a granted user a code for one lock (only its Argon2id hash travels); it opens that
/// lock through the local broker, audited under the same pseudonym as the user's remote
/// commands; a user cannot give one; revoking it, or forgetting the user, removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_signed_local_codes_work_over_tls_until_revoked_or_the_user_is_forgotten() {
    crate::needs!(Dbus, Mosquitto);
    use lockhub::auth::statement::{Operation, Statement};
    use lockhub::cloud::reply::Outcome;
    use lockhub::devcloud::app::{command, local_code, revoke};
    use lockhub::store::unix_now;
    use support::stack::assert_reply;

    let mut hub = Stack::prepare("gw-hk");
    let broker =
        HomeBroker::start_with_tls(&[("lockhub", "hub-secret-3"), ("homeassistant", "ha-secret-4")], Some(&hub.pki));
    let password_file = hub.dir.path().join("local-mqtt.password");
    std::fs::write(&password_file, "hub-secret-3\n").unwrap();
    let local = LocalConfig {
        mqtt: Some(LocalMqtt {
            host: "localhost".into(),
            port: broker.tls_port,
            tls: true,
            ca: Some(hub.pki.ca_cert()),
            username: Some("lockhub".into()),
            password_file: Some(password_file),
        }),
        lockout_failures: 10,
        ..LocalConfig::default()
    };
    let mut ha = HomeAssistant::connect(broker.port, "ha-secret-4").await;
    hub.config.local = local;
    let stack = hub.start().await;
    ha.until("the hub online through TLS", |ha| ha.text("lockhub/local/gw-hk/availability") == Some("online")).await;

    let p = claim_pair_grant(&stack, &[Permission::Lock, Permission::Remote], None).await;
    let id = p.lock_id.to_string();
    let (set, result, state) = (
        format!("lockhub/local/gw-hk/{id}/set"),
        format!("lockhub/local/gw-hk/{id}/result"),
        format!("lockhub/local/gw-hk/{id}/state"),
    );
    ha.until("the lock's state", |ha| ha.text(&state).is_some()).await;
    let reason = |payload: Vec<u8>| serde_json::from_slice::<Value>(&payload).unwrap()["reason"].clone();
    let unlock = r#"{"action":"UNLOCK","code":"97531"}"#;
    ha.publish(&set, unlock).await;
    assert_eq!(reason(ha.next_on(&result).await), "wrong_code", "no code given yet");

    // The user's own remote command names them in the audit log by their pseudonym.
    let now = unix_now();
    let remote = Statement::Command(command(&stack.gw, p.lock_id, Operation::Lock, now, 30));
    assert_reply(&p.app.send(&remote, &p.user, WAIT).await.unwrap(), Outcome::Ok, None);

    // Only the owner gives codes; only the hash travels; a hash too costly to check is refused.
    let given = local_code(&stack.gw, p.user.public(), p.lock_id, "97531", 1, now).unwrap();
    let signed = Statement::LocalCode(given.clone());
    assert!(!String::from_utf8(signed.to_json()).unwrap().contains("97531"));
    let by_user = Statement::LocalCode(local_code(&stack.gw, p.user.public(), p.lock_id, "1111", 1, now).unwrap());
    assert_reply(&p.app.send(&by_user, &p.user, WAIT).await.unwrap(), Outcome::Refused, Some("unknown_key"));
    let unpaired = lockhub::protocol::ids::LockId([0xab; 8]);
    let for_unpaired = Statement::LocalCode(local_code(&stack.gw, p.user.public(), unpaired, "1111", 1, now).unwrap());
    assert_reply(&p.app.send(&for_unpaired, &p.owner, WAIT).await.unwrap(), Outcome::Refused, Some("unknown_lock"));
    let mut costly = local_code(&stack.gw, p.user.public(), p.lock_id, "1111", 1, now).unwrap();
    costly.hash = costly.hash.replace("m=19456", "m=4194304");
    let reply = p.app.send(&Statement::LocalCode(costly), &p.owner, WAIT).await.unwrap();
    assert_reply(&reply, Outcome::Refused, Some("malformed"));
    assert!(reply.detail.as_deref().unwrap().contains("64 MiB"), "{reply:?}");
    assert_reply(&p.app.send(&signed, &p.owner, WAIT).await.unwrap(), Outcome::Ok, None);

    ha.publish(&set, unlock).await;
    assert_eq!(reason(ha.next_on(&result).await), Value::Null);
    ha.until("UNLOCKED", |ha| ha.text(&state) == Some("UNLOCKED")).await;
    stack.audited("command.lock", &["ok"]).await;
    let actor_of = |action: &str| {
        let store = stack.store.lock().unwrap();
        let records = store.audit_records(0, 1000).unwrap();
        records.into_iter().rev().find(|r| r.action == action && r.outcome == "ok").and_then(|r| r.actor)
    };
    assert_eq!(actor_of("local.unlock"), actor_of("command.lock"));
    assert!(actor_of("local.unlock").is_some());

    // Revoked: the code no longer opens.
    let revocation = revoke(&stack.gw, given.jti.clone(), now);
    assert_reply(&p.app.send(&revocation, &p.owner, WAIT).await.unwrap(), Outcome::Ok, None);
    assert_eq!(stack.audited("local_code.revoke", &["ok"]).await, ["ok"]);
    ha.publish(&set, unlock).await;
    assert_eq!(reason(ha.next_on(&result).await), "wrong_code");

    // Given again, then the user forgotten: gone with the rest of their data.
    let again = Statement::LocalCode(local_code(&stack.gw, p.user.public(), p.lock_id, "97531", 1, now).unwrap());
    assert_reply(&p.app.send(&again, &p.owner, WAIT).await.unwrap(), Outcome::Ok, None);
    assert_eq!(stack.gateway.local_codes(p.lock_id).unwrap().len(), 1);
    assert!(stack.store.lock().unwrap().forget_user(p.user.public().as_bytes(), unix_now()).unwrap());
    assert!(stack.gateway.local_codes(p.lock_id).unwrap().is_empty());
    ha.publish(&set, unlock).await;
    assert_eq!(reason(ha.next_on(&result).await), "wrong_code");
}

/// What a real Home Assistant core has of its MQTT entities, as the `test/ask` automation
/// answers: their ids, names and states, sorted by id.
#[derive(Debug, serde::Deserialize)]
struct CoreView {
    asked: String,
    entities: Vec<String>,
    names: Vec<Option<String>>,
    states: Vec<String>,
}

impl CoreView {
    fn get(&self, entity: &str) -> Option<(&str, Option<&str>)> {
        let i = self.entities.iter().position(|e| e == entity)?;
        Some((self.states[i].as_str(), self.names[i].as_deref()))
    }
}

/// Asks the core for its view until `done` holds of it, asking again after each state change
/// it reports (its statestream, `ha/…`) — events, not a timer.
async fn core_until(ha: &mut HomeAssistant, what: &str, done: impl Fn(&CoreView) -> bool) -> CoreView {
    let deadline = tokio::time::Instant::now() + WAIT;
    for round in 0.. {
        let asked = format!("{what} #{round}");
        ha.publish("test/ask", &asked).await;
        ha.until(&format!("the core's answer to {asked}"), |ha| {
            ha.latest
                .get("test/answer")
                .and_then(|a| serde_json::from_slice::<CoreView>(a).ok())
                .is_some_and(|v| v.asked == asked)
        })
        .await;
        let view: CoreView = serde_json::from_slice(&ha.latest["test/answer"]).unwrap();
        if done(&view) {
            return view;
        }
        assert!(tokio::time::Instant::now() < deadline, "Home Assistant never had {what}: {view:#?}");
        let changes = ha.count.iter().filter(|(t, _)| t.starts_with("ha/")).map(|(_, n)| n).sum::<usize>();
        ha.until(&format!("a state change in Home Assistant, for {what}"), |ha| {
            ha.count.iter().filter(|(t, _)| t.starts_with("ha/")).map(|(_, n)| n).sum::<usize>() > changes
        })
        .await;
    }
    unreachable!()
}

/// The home-assistant tier: a real Home Assistant core (PyPI `homeassistant`) on the local
/// broker, not our reading of its discovery documentation. It names every entity of a paired
/// lock after the lock (none `none_…`); its own service calls lock with no code, unlock with a
/// code, and an unlock without one is refused by lockhub (`code_required`); unbinding removes
/// every entity with no error in its log; and when the hub stops, the lock is unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_home_assistant_core_names_drives_and_forgets_the_lock() {
    crate::needs!(Dbus, Mosquitto, HomeAssistant);
    use support::ha_core::HomeAssistantCore;
    let mut hub = Stack::prepare("gw-core");
    let broker = HomeBroker::start(&[("lockhub", "hub-secret-5"), ("homeassistant", "ha-secret-6")]);
    let password_file = hub.dir.path().join("local-mqtt.password");
    std::fs::write(&password_file, "hub-secret-5\n").unwrap();
    hub.config.local = LocalConfig {
        mqtt: Some(LocalMqtt {
            host: "127.0.0.1".into(),
            port: Some(broker.port),
            tls: false,
            ca: None,
            username: Some("lockhub".into()),
            password_file: Some(password_file),
        }),
        codes: vec![LocalCodeEntry { user: "alice".into(), hash: hash_code("2468").unwrap() }],
        ..LocalConfig::default()
    };
    let mut ha = HomeAssistant::connect(broker.port, "ha-secret-6").await;
    ha.subscribe("ha/#").await;
    ha.subscribe("test/answer").await;
    let core = HomeAssistantCore::start(broker.port, "homeassistant", "ha-secret-6");
    // Its first start in a fresh environment loads (and compiles) much of Home Assistant.
    let born = ha.until_within(support::ha_core::START, |ha| ha.text("homeassistant/status") == Some("online")).await;
    assert!(born, "Home Assistant did not come up within {:?}:\n{}", support::ha_core::START, core.log());

    let stack = hub.start().await;
    let p = claim_pair_grant(&stack, &[Permission::Lock, Permission::Unlock], None).await;
    let six = &p.lock.lock_id[..6];
    let lock = format!("lock.lock_{six}");
    let expected = [
        (lock.clone(), format!("Lock {six}")),
        (format!("sensor.lock_{six}_battery"), format!("Lock {six} Battery")),
        (format!("binary_sensor.lock_{six}_connectivity"), format!("Lock {six} Connectivity")),
        (format!("sensor.lock_{six}_last_event"), format!("Lock {six} Last event")),
        (format!("binary_sensor.lock_{six}_door"), format!("Lock {six} Door")),
        ("binary_sensor.lockhub_gw_core_cloud_link".to_owned(), "lockhub gw-core Cloud link".to_owned()),
    ];
    let view = core_until(&mut ha, "the lock's entities", |v| {
        expected.iter().all(|(id, _)| v.get(id).is_some()) && v.get(&lock).is_some_and(|(s, _)| s == "locked")
    })
    .await;
    for (id, name) in &expected {
        assert_eq!(view.get(id).and_then(|(_, n)| n), Some(name.as_str()), "{id}: {view:#?}");
    }
    assert!(!view.entities.iter().any(|e| e.contains("none")), "a nameless device's entity: {view:#?}");

    // Its own service calls, as its lock card's buttons make them.
    let call = |action: &str, code: Option<&str>| {
        let data = code.map_or(serde_json::json!({}), |c| serde_json::json!({ "code": c }));
        serde_json::json!({ "action": action, "entity_id": lock, "data": data }).to_string()
    };
    let ctl = support::control().await;
    ha.publish("test/call", &call("lock.unlock", Some("2468"))).await;
    core_until(&mut ha, "the lock unlocked", |v| v.get(&lock).is_some_and(|(s, _)| s == "unlocked")).await;
    assert_eq!(support::report(&ctl, &p.lock.lock_id).await.status.state, LockState::Unlocked);
    ha.publish("test/call", &call("lock.lock", None)).await;
    core_until(&mut ha, "the lock locked, with no code", |v| v.get(&lock).is_some_and(|(s, _)| s == "locked")).await;
    let result = format!("lockhub/local/gw-core/{}/result", p.lock.lock_id);
    ha.publish("test/call", &call("lock.unlock", None)).await;
    let refused: Value = serde_json::from_slice(&ha.next_on(&result).await).unwrap();
    assert_eq!((refused["result"].as_str(), refused["reason"].as_str()), (Some("refused"), Some("code_required")));
    assert_eq!(support::report(&ctl, &p.lock.lock_id).await.status.state, LockState::Locked);

    // Unbound: every entity of the lock goes, and nothing in Home Assistant's log complains of
    // the empty retained messages that clear its topics.
    assert_eq!(stack.gateway.unbind(p.lock_id, AuditActor::Admin).await.unwrap(), Some(true));
    core_until(&mut ha, "the lock's entities gone", |v| !v.entities.iter().any(|e| e.contains(six))).await;
    // A marker through the same automation after the clears: the core has read them all.
    core_until(&mut ha, "a last answer", |_| true).await;
    let log = core.log();
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| (l.contains("ERROR") || l.contains("WARNING")) && (l.contains("mqtt") || l.contains("lock")))
        .filter(|l| !l.contains("turbojpeg"))
        .collect();
    assert!(complaints.is_empty(), "Home Assistant complained:\n{}", complaints.join("\n"));

    // The hub stops: its entities become unavailable (its last will / offline message).
    let Stack { hub, .. } = stack;
    hub.stop().await;
    core_until(&mut ha, "the hub unavailable", |v| {
        v.get("binary_sensor.lockhub_gw_core_cloud_link").is_some_and(|(s, _)| s == "unavailable")
    })
    .await;
    core.stop();
}
