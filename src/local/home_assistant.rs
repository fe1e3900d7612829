//! Home Assistant's view of the hub: MQTT discovery payloads, the topics they name and the
//! state values, built without I/O (the bridge publishes them).
//!
//! Per lock, five entities under one device (`via_device` = the gateway's device):
//! - `lock.<lock>`: `command_topic`, the five states (LOCKED, UNLOCKED, LOCKING, UNLOCKING,
//!   JAMMED), `payload_open` only for a lock with a latch motor, `code_format` and a
//!   `command_template` that sends the code when local policy wants one;
//! - `sensor.<lock>_battery` (device class battery, %);
//! - `binary_sensor.<lock>_door` (device class door; only for a lock with a door sensor);
//! - `binary_sensor.<lock>_connectivity` (device class connectivity, diagnostic);
//! - `sensor.<lock>_last_event`: who did what and how, the event as JSON attributes.
//!
//! Availability: the lock's entities need both the gateway's own availability topic (its last
//! will says `offline`) and the lock's (`offline` while its link is down and it cannot be
//! reached) — `availability_mode: all`. The connectivity sensor needs only the gateway's, so
//! that it can say the lock is unreachable. The gateway's device has one entity, the cloud
//! link's connectivity.

use serde_json::{Value, json};

use super::config::LocalOperation;
use crate::cloud::lock_report::event_payload;
use crate::protocol::gatt::LockInfo;
use crate::protocol::ids::{GatewayId, LockId};
use crate::protocol::message::{DoorState, LockState, LockStatus, LogEntry};

/// The online payload of availability topics.
pub const ONLINE: &str = "online";
/// The offline payload of availability topics (and the gateway's last will).
pub const OFFLINE: &str = "offline";

/// Home Assistant's state value for a bolt state.
pub fn lock_state(state: LockState) -> &'static str {
    match state {
        LockState::Locked => "LOCKED",
        LockState::Unlocked => "UNLOCKED",
        LockState::Locking => "LOCKING",
        LockState::Unlocking => "UNLOCKING",
        LockState::Jammed => "JAMMED",
    }
}

/// What the discovery of a lock depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockDescription {
    /// The lock.
    pub lock: LockId,
    /// The name the owner gave it (may be empty).
    pub name: String,
    /// Its info record, once a link has read it.
    pub info: Option<LockInfo>,
}

/// One message to publish, retained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retained {
    /// Topic.
    pub topic: String,
    /// Payload (empty: clears the retained message).
    pub payload: Vec<u8>,
}

fn retained(topic: String, value: &Value) -> Retained {
    Retained { topic, payload: serde_json::to_vec(value).expect("JSON values serialise") }
}

/// The hub's topics on the local broker and its discovery.
#[derive(Clone, Debug)]
pub struct HomeAssistant {
    gateway: GatewayId,
    /// The node id in discovery topics: the gateway id with what HA refuses replaced.
    node: String,
    prefix: String,
    base: String,
}

impl HomeAssistant {
    /// The topics of `gateway`, discovery under `prefix`.
    pub fn new(gateway: &GatewayId, prefix: &str) -> Self {
        let node: String =
            gateway.as_str().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        HomeAssistant {
            gateway: gateway.clone(),
            node,
            prefix: prefix.trim_end_matches('/').to_owned(),
            base: format!("lockhub/local/{}", gateway.as_str()),
        }
    }

    /// The gateway's availability (its last will publishes `offline` here).
    pub fn availability(&self) -> String {
        format!("{}/availability", self.base)
    }

    /// Home Assistant's birth and last-will topic.
    pub fn ha_status(&self) -> String {
        format!("{}/status", self.prefix)
    }

    /// The filter of every lock's command topic.
    pub fn command_filter(&self) -> String {
        format!("{}/+/set", self.base)
    }

    /// The lock a command topic is for, if it is one.
    pub fn command_lock(&self, topic: &str) -> Option<LockId> {
        let rest = topic.strip_prefix(&self.base)?.strip_prefix('/')?;
        LockId::parse(rest.strip_suffix("/set")?).ok()
    }

    fn lock_topic(&self, lock: LockId, leaf: &str) -> String {
        format!("{}/{lock}/{leaf}", self.base)
    }

    /// A lock's state topic (LOCKED, UNLOCKED, LOCKING, UNLOCKING, JAMMED).
    pub fn state_topic(&self, lock: LockId) -> String {
        self.lock_topic(lock, "state")
    }

    /// Where the outcome of each local command is published (not retained):
    /// `{"action":"unlock","result":"refused","reason":"wrong_code"}` — for automations that
    /// tell someone a code was wrong or a lock jammed.
    pub fn result_topic(&self, lock: LockId) -> String {
        self.lock_topic(lock, "result")
    }

    /// The cloud link's state topic (`ON` connected, `OFF` not).
    pub fn cloud_topic(&self) -> String {
        format!("{}/cloud", self.base)
    }

    fn config_topic(&self, component: &str, object: &str) -> String {
        format!("{}/{component}/{}/{object}/config", self.prefix, self.node)
    }

    fn gateway_device(&self) -> Value {
        json!({
            "identifiers": [format!("lockhub_{}", self.node)],
            "name": format!("lockhub {}", self.gateway.as_str()),
            "manufacturer": "lockhub",
            "model": "lockhub gateway",
            "sw_version": env!("CARGO_PKG_VERSION"),
        })
    }

    fn origin() -> Value {
        json!({ "name": "lockhub", "sw_version": env!("CARGO_PKG_VERSION") })
    }

    /// The gateway's own discovery: its device, with the cloud link's connectivity.
    pub fn gateway_discovery(&self) -> Vec<Retained> {
        vec![retained(
            self.config_topic("binary_sensor", "cloud"),
            &json!({
                "name": "Cloud link",
                "unique_id": format!("lockhub_{}_cloud", self.node),
                "device_class": "connectivity",
                "entity_category": "diagnostic",
                "state_topic": self.cloud_topic(),
                "payload_on": "ON",
                "payload_off": "OFF",
                "availability_topic": self.availability(),
                "payload_available": ONLINE,
                "payload_not_available": OFFLINE,
                "device": self.gateway_device(),
                "origin": Self::origin(),
            }),
        )]
    }

    /// A lock's discovery: five configs (four without a door sensor), retained.
    /// `code_required` lists the local operations that need a code.
    pub fn lock_discovery(&self, lock: &LockDescription, code_required: &[LocalOperation]) -> Vec<Retained> {
        let id = lock.lock;
        let object = format!("{id}");
        let unique = |suffix: &str| format!("lockhub_{}_{id}{suffix}", self.node);
        let name = if lock.name.is_empty() { format!("Lock {}", &object[..6]) } else { lock.name.clone() };
        let mut device = json!({
            "identifiers": [format!("lockhub_lock_{id}")],
            "name": name,
            "manufacturer": "LHP/1 lock",
            "model": "LHP/1 smart lock",
            "via_device": format!("lockhub_{}", self.node),
        });
        if let Some(info) = &lock.info {
            let (a, b, c) = info.firmware;
            device["sw_version"] = json!(format!("{a}.{b}.{c}"));
            let mut features = vec!["bolt"];
            if info.capabilities.unlatch {
                features.push("latch");
            }
            if info.capabilities.keypad {
                features.push("keypad");
            }
            if info.capabilities.door_sensor {
                features.push("door sensor");
            }
            device["model"] = json!(format!("LHP/1 smart lock ({})", features.join(", ")));
        }
        let both = json!([
            { "topic": self.availability(), "payload_available": ONLINE, "payload_not_available": OFFLINE },
            { "topic": self.lock_topic(id, "availability"), "payload_available": ONLINE, "payload_not_available": OFFLINE },
        ]);
        let mut entity = json!({
            "name": null,
            "unique_id": unique(""),
            "command_topic": self.lock_topic(id, "set"),
            "state_topic": self.lock_topic(id, "state"),
            "payload_lock": "LOCK",
            "payload_unlock": "UNLOCK",
            "state_locked": "LOCKED",
            "state_unlocked": "UNLOCKED",
            "state_locking": "LOCKING",
            "state_unlocking": "UNLOCKING",
            "state_jammed": "JAMMED",
            "qos": 1,
            "optimistic": false,
            "availability": both,
            "availability_mode": "all",
            "device": device.clone(),
            "origin": Self::origin(),
        });
        if lock.info.is_some_and(|i| i.capabilities.unlatch) {
            entity["payload_open"] = json!("OPEN");
        }
        if !code_required.is_empty() {
            // Home Assistant checks the format on every operation, locking included, with an
            // empty code when none was typed: unless every operation it can send needs a code,
            // the format also takes none, so that those that need none go without.
            let latch = lock.info.is_some_and(|i| i.capabilities.unlatch);
            let every = [LocalOperation::Lock, LocalOperation::Unlock]
                .into_iter()
                .chain(latch.then_some(LocalOperation::Unlatch))
                .all(|op| code_required.contains(&op));
            entity["code_format"] = json!(if every { r"^\d{4,12}$" } else { r"^(\d{4,12})?$" });
            entity["command_template"] =
                json!(r#"{"action":"{{ value }}"{% if code %},"code":"{{ code }}"{% endif %}}"#);
        }
        let mut configs = vec![
            retained(self.config_topic("lock", &object), &entity),
            retained(
                self.config_topic("sensor", &format!("{object}_battery")),
                &json!({
                    "name": "Battery",
                    "unique_id": unique("_battery"),
                    "device_class": "battery",
                    "state_class": "measurement",
                    "unit_of_measurement": "%",
                    "entity_category": "diagnostic",
                    "state_topic": self.lock_topic(id, "battery"),
                    "availability": both,
                    "availability_mode": "all",
                    "device": device,
                    "origin": Self::origin(),
                }),
            ),
            retained(
                self.config_topic("binary_sensor", &format!("{object}_connectivity")),
                &json!({
                    "name": "Connectivity",
                    "unique_id": unique("_connectivity"),
                    "device_class": "connectivity",
                    "entity_category": "diagnostic",
                    "state_topic": self.lock_topic(id, "connectivity"),
                    "payload_on": "ON",
                    "payload_off": "OFF",
                    "availability_topic": self.availability(),
                    "payload_available": ONLINE,
                    "payload_not_available": OFFLINE,
                    "device": device,
                    "origin": Self::origin(),
                }),
            ),
            retained(
                self.config_topic("sensor", &format!("{object}_last_event")),
                &json!({
                    "name": "Last event",
                    "unique_id": unique("_last_event"),
                    "icon": "mdi:history",
                    "state_topic": self.lock_topic(id, "event"),
                    "value_template": "{{ value_json.summary }}",
                    "json_attributes_topic": self.lock_topic(id, "event"),
                    "availability": both,
                    "availability_mode": "all",
                    "device": device,
                    "origin": Self::origin(),
                }),
            ),
        ];
        // Without the info record the door sensor is assumed, as most locks have one.
        if lock.info.is_none_or(|i| i.capabilities.door_sensor) {
            configs.push(retained(
                self.config_topic("binary_sensor", &format!("{object}_door")),
                &json!({
                    "name": "Door",
                    "unique_id": unique("_door"),
                    "device_class": "door",
                    "state_topic": self.lock_topic(id, "door"),
                    "payload_on": "ON",
                    "payload_off": "OFF",
                    "availability": both,
                    "availability_mode": "all",
                    "device": device,
                    "origin": Self::origin(),
                }),
            ));
        }
        configs
    }

    /// Every retained topic a lock has here: its configs and its states. Publishing an empty
    /// payload on each removes the lock from Home Assistant and the broker.
    pub fn lock_topics(&self, lock: LockId) -> Vec<String> {
        let object = lock.to_string();
        let mut topics = vec![
            self.config_topic("lock", &object),
            self.config_topic("sensor", &format!("{object}_battery")),
            self.config_topic("binary_sensor", &format!("{object}_connectivity")),
            self.config_topic("sensor", &format!("{object}_last_event")),
            self.config_topic("binary_sensor", &format!("{object}_door")),
        ];
        topics.extend(
            ["state", "battery", "door", "connectivity", "event", "availability"]
                .map(|leaf| self.lock_topic(lock, leaf)),
        );
        topics
    }

    /// A lock's state topics after a status (or only its reachability, without one).
    pub fn lock_states(
        &self,
        lock: LockId,
        status: Option<&LockStatus>,
        connected: bool,
        reachable: bool,
    ) -> Vec<Retained> {
        let text = |topic: String, value: &str| Retained { topic, payload: value.as_bytes().to_vec() };
        let on_off = |b: bool| if b { "ON" } else { "OFF" };
        let mut out = vec![
            text(self.lock_topic(lock, "connectivity"), on_off(connected)),
            text(self.lock_topic(lock, "availability"), if reachable { ONLINE } else { OFFLINE }),
        ];
        if let Some(status) = status {
            out.push(text(self.lock_topic(lock, "state"), lock_state(status.state)));
            out.push(text(self.lock_topic(lock, "battery"), &status.battery_pct.min(100).to_string()));
            match status.door {
                DoorState::Open => out.push(text(self.lock_topic(lock, "door"), "ON")),
                DoorState::Closed => out.push(text(self.lock_topic(lock, "door"), "OFF")),
                DoorState::Unknown => {}
            }
        }
        out
    }

    /// The last-event sensor's message for a log entry: the cloud's event payload with a
    /// one-line `summary` (who did what, and how).
    pub fn last_event(&self, lock: LockId, epoch: i64, entry: &LogEntry) -> Retained {
        let mut event: Value = serde_json::from_slice(&event_payload(lock, epoch, entry)).expect("events are JSON");
        event["summary"] = json!(summary(&event));
        retained(self.lock_topic(lock, "event"), &event)
    }
}

/// "unlocked by keypad (slot 2)", "door opened", "jammed", ...
fn summary(event: &Value) -> String {
    let what = match event["kind"].as_str().unwrap_or("event") {
        "state_changed" => event["state"].as_str().unwrap_or("changed").to_owned(),
        "door" => format!("door {}", event["door"].as_str().unwrap_or("moved")),
        "battery_low" => format!("battery low ({}%)", event["battery"]),
        other => other.replace('_', " "),
    };
    let actor = &event["actor"];
    let how = match actor["kind"].as_str() {
        Some("keypad") => format!(" by keypad (slot {})", actor["slot"]),
        Some("cloud") => " remotely".to_owned(),
        Some("local") => " locally".to_owned(),
        Some("admin") => " by the owner".to_owned(),
        Some("hub") => " by the hub".to_owned(),
        _ => match event["cause"].as_str() {
            Some("manual") => " by hand".to_owned(),
            Some("auto_lock") => " by auto-lock".to_owned(),
            _ => String::new(),
        },
    };
    format!("{what}{how}")
}
