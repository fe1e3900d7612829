//! The local MQTT connection: Home Assistant's discovery and states out, local commands in.
//!
//! Independent of the cloud link: its own broker, credentials and task, so it works while the
//! cloud is unreachable. A clean session on every connect: a local command that could not be
//! delivered while the bridge was away must not run later, and everything retained is
//! published again on connect (and whenever Home Assistant announces itself `online`).
//!
//! Commands are handled on their own tasks (checking a code costs an Argon2id hash, and a
//! lock's motor takes time), so the connection keeps serving; each lock's task queues them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Incoming, LastWill, MqttOptions, QoS, TlsConfiguration, Transport};
use thiserror::Error;
use tokio::sync::{broadcast, watch};
use zeroize::Zeroizing;

use super::codes::{Attempt, CodeBook, CodeCheck, CodeError};
use super::command::LocalCommand;
use super::config::{LocalConfig, LocalMqtt, LocalOperation};
use super::home_assistant::{HomeAssistant, LockDescription, OFFLINE, ONLINE, Retained, lock_state};
use crate::auth::local_code::CodeHolder;
use crate::ble::LockTransport;
use crate::cloud::link::LinkState;
use crate::cloud::tls::{TlsError, server_auth_config};
use crate::gateway::Gateway;
use crate::gateway::lock_worker::LockUpdate;
use crate::protocol::gatt::LockInfo;
use crate::protocol::ids::LockId;
use crate::protocol::message::{LockState, LockStatus, Op};
use crate::store::unix_now;

/// Where local commands come from, in audit records.
const SOURCE: &str = "local MQTT";

/// Largest password file read.
const MAX_PASSWORD_BYTES: usize = 1024;

/// Why the bridge could not start.
#[derive(Debug, Error)]
pub enum BridgeError {
    /// `[local.mqtt]` is absent.
    #[error("no [local.mqtt] section: local MQTT is off")]
    Disabled,
    /// The password file could not be read.
    #[error("local.mqtt.password_file {path}: {source}")]
    Password {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TLS without a CA, or a CA that does not load.
    #[error("local.mqtt: {0}")]
    Tls(String),
    /// A configured code entry is unusable.
    #[error(transparent)]
    Codes(#[from] CodeError),
}

impl From<TlsError> for BridgeError {
    fn from(e: TlsError) -> Self {
        BridgeError::Tls(e.to_string())
    }
}

/// What the bridge knows about a lock, to publish it again on every connect.
#[derive(Clone, Debug)]
struct LockView {
    name: String,
    info: Option<LockInfo>,
    status: Option<LockStatus>,
    connected: bool,
    reachable: bool,
    last_event: Option<Retained>,
}

/// The local bridge of one gateway.
pub struct LocalBridge<T: LockTransport> {
    mqtt: LocalMqtt,
    code_required: Vec<LocalOperation>,
    ha: HomeAssistant,
    gateway: Arc<Gateway<T>>,
    codes: Arc<Mutex<CodeBook>>,
    password: Option<Zeroizing<String>>,
    tls: Option<Arc<rustls::ClientConfig>>,
    client_id: String,
    /// Each lock's last reported bolt state, to restore after a command that moved nothing.
    last_state: Mutex<HashMap<LockId, LockState>>,
}

impl<T: LockTransport> std::fmt::Debug for LocalBridge<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBridge").field("host", &self.mqtt.host).field("port", &self.mqtt.port()).finish()
    }
}

impl<T: LockTransport> LocalBridge<T> {
    /// Builds the bridge from `[local]`; reads the password file and the CA now, so that a
    /// mistake stops the start with a clear error instead of failing later in a loop.
    pub fn new(
        config: &LocalConfig,
        gateway: Arc<Gateway<T>>,
        gateway_id: &crate::protocol::ids::GatewayId,
    ) -> Result<Self, BridgeError> {
        let mqtt = config.mqtt.clone().ok_or(BridgeError::Disabled)?;
        let password = match &mqtt.password_file {
            Some(path) => Some(read_password(path)?),
            None => None,
        };
        let tls = match (mqtt.tls, &mqtt.ca) {
            (false, _) => None,
            (true, Some(ca)) => Some(server_auth_config(ca)?),
            (true, None) => {
                return Err(BridgeError::Tls(
                    "tls = true needs ca = the CA that signs the local broker's certificate".into(),
                ));
            }
        };
        Ok(LocalBridge {
            code_required: config.code_required.clone(),
            ha: HomeAssistant::new(gateway_id, &config.discovery_prefix),
            codes: Arc::new(Mutex::new(CodeBook::new(config)?)),
            client_id: format!("lockhub-{}", gateway_id.as_str()),
            mqtt,
            gateway,
            password,
            tls,
            last_state: Mutex::new(HashMap::new()),
        })
    }

    fn options(&self) -> MqttOptions {
        let mut o = MqttOptions::new(&self.client_id, &self.mqtt.host, self.mqtt.port());
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(true);
        // rumqttc drops the connection on a packet over its limit (10 KiB by default), and a
        // retained message on a topic the bridge subscribes to comes back at every new
        // subscription: anyone who may publish `homeassistant/status` could keep the bridge
        // reconnecting for good. Read up to the cloud link's bound; what is too big for a
        // command is refused by the command parser, a status that is not "online" ignored.
        o.set_max_packet_size(crate::cloud::link::MAX_READ_PACKET, crate::cloud::link::MAX_BROKER_PACKET);
        o.set_last_will(LastWill::new(self.ha.availability(), OFFLINE, QoS::AtLeastOnce, true));
        if let Some(user) = &self.mqtt.username {
            o.set_credentials(user, self.password.as_deref().map_or("", String::as_str));
        }
        if let Some(tls) = &self.tls {
            o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls.clone())));
        }
        o
    }

    fn code_required(&self) -> &[LocalOperation] {
        &self.code_required
    }

    /// Runs until `shutdown` turns true; then says `offline` and disconnects. `updates` must
    /// be subscribed before the gateway starts its locks; `cloud` is the cloud link's state.
    pub async fn run(
        self,
        mut updates: broadcast::Receiver<LockUpdate>,
        mut cloud: watch::Receiver<LinkState>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut locks: HashMap<LockId, LockView> = HashMap::new();
        match self.gateway.paired_locks() {
            Ok(paired) => {
                for lock in paired {
                    locks.insert(lock.lock_id, LockView::new(lock.name));
                }
            }
            Err(e) => tracing::error!(error = %e, "could not read the paired locks for Home Assistant"),
        }
        let this = Arc::new(self);
        let (client, mut eventloop) = AsyncClient::new(this.options(), 256);
        // Publishing waits for room in rumqttc's request queue, which only the event loop
        // below empties: batches go through a task of their own, in order, so that this loop
        // never waits on itself however many locks there are.
        let (outgoing, mut batches) = tokio::sync::mpsc::unbounded_channel::<Vec<Retained>>();
        let publisher = client.clone();
        tokio::spawn(async move {
            while let Some(batch) = batches.recv().await {
                publish(&publisher, batch).await;
            }
        });
        let mut connected = false;
        let mut backoff = Duration::from_millis(500);
        loop {
            tokio::select! {
                event = eventloop.poll() => match event {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        connected = true;
                        backoff = Duration::from_millis(500);
                        tracing::info!(host = %this.mqtt.host, port = this.mqtt.port(), "local MQTT up");
                        let _ = client.subscribe(this.ha.ha_status(), QoS::AtLeastOnce).await;
                        let _ = client.subscribe(this.ha.command_filter(), QoS::AtLeastOnce).await;
                        let state = *cloud.borrow();
                        let _ = outgoing.send(this.everything(&locks, &state));
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        if p.topic == this.ha.ha_status() {
                            // Home Assistant (re)started: it forgets what it was told before.
                            if p.payload.as_ref() == ONLINE.as_bytes() {
                                let state = *cloud.borrow();
                                let _ = outgoing.send(this.everything(&locks, &state));
                            }
                        } else if let Some(lock) = this.ha.command_lock(&p.topic) {
                            let this = this.clone();
                            let payload = p.payload.to_vec();
                            let client = client.clone();
                            tokio::spawn(async move { this.command(&client, lock, &payload).await });
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if connected {
                            tracing::warn!(host = %this.mqtt.host, error = %e, "local MQTT down; reconnecting");
                        }
                        connected = false;
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = crate::stop::requested(&mut shutdown) => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                },
                update = updates.recv() => match update {
                    Ok(update) => {
                        if let LockUpdate::Report { lock, status: Some(status), .. } = &update {
                            this.last_state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(*lock, status.state);
                        }
                        let out = apply(&this.ha, &mut locks, update, this.code_required());
                        if connected {
                            let _ = outgoing.send(out);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "the local bridge fell behind the locks' updates");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                changed = cloud.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if connected {
                        let state = cloud_state(&cloud.borrow_and_update());
                        let _ = outgoing.send(vec![Retained { topic: this.ha.cloud_topic(), payload: state.into() }]);
                    }
                }
                () = crate::stop::requested(&mut shutdown) => {
                    if connected {
                        // try_: a full request queue must not hold the stop up.
                        let _ = client.try_publish(this.ha.availability(), QoS::AtLeastOnce, true, OFFLINE);
                        let _ = client.try_disconnect();
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while eventloop.poll().await.is_ok() {}
                        })
                        .await;
                    }
                    return;
                }
            }
        }
    }

    /// Everything retained: availability, the gateway's and every lock's discovery, states.
    fn everything(&self, locks: &HashMap<LockId, LockView>, cloud: &LinkState) -> Vec<Retained> {
        let mut out = vec![Retained { topic: self.ha.availability(), payload: ONLINE.into() }];
        out.extend(self.ha.gateway_discovery());
        out.push(Retained { topic: self.ha.cloud_topic(), payload: cloud_state(cloud).into() });
        for (id, view) in locks {
            out.extend(view.publications(&self.ha, *id, self.code_required()));
        }
        out
    }

    /// Checks and carries out one local command; every outcome is audited and published on
    /// the lock's result topic.
    async fn command(&self, client: &AsyncClient, lock: LockId, payload: &[u8]) {
        let (action, result, reason) = self.decide(client, lock, payload).await;
        let message = serde_json::json!({ "action": action, "result": result, "reason": reason });
        let _ = client.publish(self.ha.result_topic(lock), QoS::AtLeastOnce, false, message.to_string()).await;
    }

    /// Returns the action, `ok` / `refused` / `failed`, and the reason.
    async fn decide(
        &self,
        client: &AsyncClient,
        lock: LockId,
        payload: &[u8],
    ) -> (&'static str, &'static str, Option<String>) {
        let refused = |reason: &str| ("refused", Some(reason.to_owned()));
        let command = match LocalCommand::parse(payload) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(lock_id = %lock, error = %e, "malformed local command");
                self.refuse(lock, "local.command", "malformed");
                let (r, why) = refused("malformed");
                return ("command", r, why);
            }
        };
        let name = command.operation.as_str();
        let action = format!("local.{name}");
        let needs_code = self.code_required.contains(&command.operation);
        let user = match (needs_code, command.code) {
            (true, None) => {
                self.refuse(lock, &action, "code_required");
                let (r, why) = refused("code_required");
                return (name, r, why);
            }
            // No code asked: the hub's owner allowed anyone on the local broker this operation.
            (false, None) => CodeHolder::Named("local".to_owned()),
            (_, Some(code)) => match self.check_code(lock, code).await {
                CodeCheck::Accepted { user } => user,
                CodeCheck::Wrong => {
                    self.refuse(lock, &action, "wrong_code");
                    let (r, why) = refused("wrong_code");
                    return (name, r, why);
                }
                CodeCheck::LockedOut { .. } => {
                    self.refuse(lock, &action, "locked_out");
                    let (r, why) = refused("locked_out");
                    return (name, r, why);
                }
            },
        };
        let op = match command.operation {
            LocalOperation::Lock => Op::Lock,
            LocalOperation::Unlock => Op::Unlock,
            LocalOperation::Unlatch => Op::Unlatch,
        };
        // Home Assistant shows the bolt moving from the moment the command is on its way; it is
        // queued on the connection before the command reaches the lock, so the lock's own
        // report of where the bolt ended always comes after it.
        let moving = if op == Op::Lock { LockState::Locking } else { LockState::Unlocking };
        let state = self.ha.state_topic(lock);
        let _ = client.publish(&state, QoS::AtLeastOnce, true, lock_state(moving)).await;
        match self.gateway.local_command(lock, op, &user, SOURCE).await {
            Ok(Ok(_)) => (name, "ok", None),
            Ok(Err(reason)) => {
                // A jam reports its own state; otherwise nothing moved: show the last known
                // state again (or none: Home Assistant's reset payload).
                if reason != "jammed" {
                    let last =
                        self.last_state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&lock).copied();
                    let _ = client.publish(&state, QoS::AtLeastOnce, true, last.map_or("None", lock_state)).await;
                }
                (name, "failed", Some(reason))
            }
            Err(e) => {
                tracing::error!(lock_id = %lock, error = %e, "could not record a local command");
                (name, "failed", Some("store".into()))
            }
        }
    }

    async fn check_code(&self, lock: LockId, code: Zeroizing<String>) -> CodeCheck {
        let codes = self.codes.clone();
        let issued = self.gateway.local_codes(lock).unwrap_or_else(|e| {
            // The configured codes still work; the owner's codes wait for the store.
            tracing::error!(lock_id = %lock, error = %e, "could not read the lock's local codes");
            Vec::new()
        });
        // Argon2id takes tens of milliseconds on a Pi: off the async threads.
        tokio::task::spawn_blocking(move || {
            let attempt = Attempt { source: SOURCE, lock };
            codes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).check(code, unix_now(), attempt, &issued)
        })
        .await
        .unwrap_or(CodeCheck::Wrong)
    }

    fn refuse(&self, lock: LockId, action: &str, reason: &str) {
        if let Err(e) = self.gateway.local_refusal(Some(lock), action, reason, SOURCE) {
            tracing::error!(lock_id = %lock, error = %e, "could not audit a refused local command");
        }
    }
}

impl LockView {
    fn new(name: String) -> Self {
        LockView { name, info: None, status: None, connected: false, reachable: true, last_event: None }
    }

    fn publications(&self, ha: &HomeAssistant, lock: LockId, code_required: &[LocalOperation]) -> Vec<Retained> {
        let description = LockDescription { lock, name: self.name.clone(), info: self.info };
        let mut out = ha.lock_discovery(&description, code_required);
        out.extend(ha.lock_states(lock, self.status.as_ref(), self.connected, self.reachable));
        out.extend(self.last_event.clone());
        out
    }
}

/// Takes in an update; returns what to publish.
fn apply(
    ha: &HomeAssistant,
    locks: &mut HashMap<LockId, LockView>,
    update: LockUpdate,
    code_required: &[LocalOperation],
) -> Vec<Retained> {
    match update {
        LockUpdate::Report { lock, epoch, status, connected, reachable, entries, info } => {
            let known = locks.contains_key(&lock);
            let view = locks.entry(lock).or_insert_with(|| LockView::new(String::new()));
            let mut out = Vec::new();
            // A newly paired lock, or one whose info record just arrived: (re)discover it.
            if !known || (info.is_some() && view.info != info) {
                view.info = info.or(view.info);
                out.extend(ha.lock_discovery(
                    &LockDescription { lock, name: view.name.clone(), info: view.info },
                    code_required,
                ));
            }
            if status.is_some() {
                view.status = status;
            }
            view.connected = connected;
            view.reachable = reachable;
            out.extend(ha.lock_states(lock, status.as_ref(), connected, reachable));
            if let Some(entry) = entries.last() {
                let event = ha.last_event(lock, epoch, entry);
                view.last_event = Some(event.clone());
                out.push(event);
            }
            out
        }
        LockUpdate::Unbound { lock } => {
            locks.remove(&lock);
            ha.lock_topics(lock).into_iter().map(|topic| Retained { topic, payload: Vec::new() }).collect()
        }
    }
}

fn cloud_state(state: &LinkState) -> &'static str {
    if matches!(state, LinkState::Connected(_)) { "ON" } else { "OFF" }
}

async fn publish(client: &AsyncClient, messages: Vec<Retained>) {
    for m in messages {
        if client.publish(m.topic, QoS::AtLeastOnce, true, m.payload).await.is_err() {
            // The event loop is gone or the connection dropped: all is published again on
            // the next connect.
            return;
        }
    }
}

fn read_password(path: &std::path::Path) -> Result<Zeroizing<String>, BridgeError> {
    let err = |source| BridgeError::Password { path: path.to_owned(), source };
    let bytes = crate::bounded_file::read(path, MAX_PASSWORD_BYTES).map_err(err)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text")))?;
    Ok(Zeroizing::new(text.lines().next().unwrap_or("").to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_file_is_read_bounded_and_its_errors_name_the_file_never_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("local-mqtt.password");
        std::fs::write(&path, "s3cret-local\nsecond line ignored\n").unwrap();
        assert_eq!(read_password(&path).unwrap().as_str(), "s3cret-local");

        std::fs::write(&path, "s3cret-local".repeat(200)).unwrap();
        let too_big = read_password(&path).unwrap_err().to_string();
        assert!(too_big.contains("local-mqtt.password") && too_big.contains("more than 1024 bytes"), "{too_big}");
        assert!(!too_big.contains("s3cret"), "{too_big}");

        let missing = read_password(&dir.path().join("absent")).unwrap_err();
        assert!(
            matches!(&missing, BridgeError::Password { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
        );
        assert!(missing.to_string().starts_with("local.mqtt.password_file "), "{missing}");
    }
}
