//! The phone-app stand-in: keys kept in a directory, statements signed with them, sent to a
//! gateway through the broker, and the gateway's typed reply awaited by id.
//!
//! It connects with the relay's certificate (client id `lockhub-relay-app-<random>`), as the
//! cloud's relay would forward a phone's statements; the statements themselves are signed by
//! the app's own keys, which the cloud never holds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, SubscribeFilter, TlsConfiguration, Transport};
use thiserror::Error;
use tokio::sync::{broadcast, oneshot};
use zeroize::Zeroizing;

use crate::auth::keys::{PublicKey, generate};
use crate::auth::statement::{
    Claim, Command, Grant, LocalCode, Operation, Pair, Permission, Policy, Revoke, Schedule, Statement, StatementId,
};
use crate::cloud::broker_url::BrokerUrl;
use crate::cloud::reply::Reply;
use crate::cloud::tls::{TlsError, client_config};
use crate::cloud::topics::Topics;
use crate::devcloud::pki::{Pki, RELAY_IDENTITY};
use crate::protocol::ids::{GatewayId, LockId};

/// Why the app could not do something.
#[derive(Debug, Error)]
pub enum AppError {
    /// A key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key file holds no key.
    #[error("{0}: not a lockhub app key (run `lockhub-cloud app keygen`)")]
    BadKey(PathBuf),
    /// A key's name that would not stay a plain file name in the keys' directory.
    #[error("key name {0:?}: 1 to 32 letters, digits, '-' or '_'")]
    BadName(String),
    /// No key of that name.
    #[error("no key named {name} in {dir}: make one with `lockhub-cloud app --key {name} keygen`")]
    NoKey {
        /// The keys' directory.
        dir: PathBuf,
        /// The name asked for.
        name: String,
    },
    /// A key of that name exists.
    #[error("{0} exists: pass --force to replace it (the old key's grants stop working)")]
    Exists(PathBuf),
    /// TLS set-up failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The broker URL is unusable.
    #[error(transparent)]
    Url(#[from] crate::cloud::broker_url::BadBrokerUrl),
    /// MQTT failed.
    #[error("MQTT: {0}")]
    Mqtt(String),
    /// No reply in time.
    #[error("no reply from the gateway within {0:?} (is it online? `lockhub-cloud app status`)")]
    Timeout(Duration),
    /// The broker did not deliver the retained messages in time.
    #[error("the broker did not deliver the gateway's retained messages within {0:?}")]
    RetainedTimeout(Duration),
}

/// A key pair kept as `<dir>/<name>.key` (mode 0600; the 32-byte seed, base64url).
pub struct AppKey {
    /// The signing key.
    pub key: SigningKey,
}

impl std::fmt::Debug for AppKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AppKey({})", self.public())
    }
}

/// The most a key file holds: 43 characters of base64url and a newline, with room to spare.
const MAX_KEY_FILE_BYTES: usize = 128;

impl AppKey {
    /// Where the key named `name` lives: a name is a plain file name (no `/`, no `..`), so that
    /// no key is read or written outside `dir`.
    fn path(dir: &Path, name: &str) -> Result<PathBuf, AppError> {
        let plain =
            (1..=32).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !plain {
            return Err(AppError::BadName(name.to_owned()));
        }
        Ok(dir.join(format!("{name}.key")))
    }

    /// Creates a key named `name` in `dir`.
    pub fn generate(dir: &Path, name: &str, force: bool) -> Result<Self, AppError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = Self::path(dir, name)?;
        if path.exists() && !force {
            return Err(AppError::Exists(path));
        }
        std::fs::create_dir_all(dir).map_err(|source| AppError::Io { path: dir.to_owned(), source })?;
        let key = generate();
        let text = Zeroizing::new(URL_SAFE_NO_PAD.encode(key.to_bytes()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| AppError::Io { path: path.clone(), source })?;
        // A key replaced with --force keeps its file, and the file its mode: make it 0600 too.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|source| AppError::Io { path: path.clone(), source })?;
        f.write_all(text.as_bytes()).map_err(|source| AppError::Io { path: path.clone(), source })?;
        Ok(AppKey { key })
    }

    /// Loads the key named `name` from `dir`.
    pub fn load(dir: &Path, name: &str) -> Result<Self, AppError> {
        let path = Self::path(dir, name)?;
        let bytes = crate::bounded_file::read(&path, MAX_KEY_FILE_BYTES).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => AppError::NoKey { dir: dir.to_owned(), name: name.to_owned() },
            std::io::ErrorKind::FileTooLarge => AppError::BadKey(path.clone()),
            _ => AppError::Io { path: path.clone(), source },
        })?;
        let text = std::str::from_utf8(&bytes).map_err(|_| AppError::BadKey(path.clone()))?;
        let seed = Zeroizing::new(URL_SAFE_NO_PAD.decode(text.trim()).map_err(|_| AppError::BadKey(path.clone()))?);
        let seed: [u8; 32] = seed.as_slice().try_into().map_err(|_| AppError::BadKey(path.clone()))?;
        Ok(AppKey { key: SigningKey::from_bytes(&seed) })
    }

    /// The public key (what grants name).
    pub fn public(&self) -> PublicKey {
        PublicKey::from(self.key.verifying_key())
    }
}

/// A fresh statement id: a prefix and 96 random bits.
pub fn new_id(prefix: &str) -> StatementId {
    let mut bytes = [0u8; 12];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    StatementId::new(format!("{prefix}-{}", URL_SAFE_NO_PAD.encode(bytes))).expect("a valid id")
}

/// How long the owner's statements built here stay valid: long enough for a slow relay, short
/// enough that a captured one is soon useless.
pub const STATEMENT_LIFETIME_S: i64 = 300;

/// How long [`AppClient::connect`] waits for its subscription to be in place.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// The owner's claim of `gateway` with its one-time `code`.
pub fn claim(gateway: &GatewayId, code: &str, now: i64) -> Statement {
    Statement::Claim(Claim {
        jti: new_id("k"),
        gw: gateway.clone(),
        code: code.to_owned(),
        iat: now,
        exp: now + STATEMENT_LIFETIME_S,
    })
}

/// The owner's pairing of `lock` (with the setup code on its label) to `gateway`.
pub fn pair(gateway: &GatewayId, lock: LockId, setup: &str, now: i64) -> Statement {
    Statement::Pair(Pair {
        jti: new_id("p"),
        gw: gateway.clone(),
        lock,
        setup: setup.to_owned(),
        iat: now,
        exp: now + STATEMENT_LIFETIME_S,
    })
}

/// The owner's policy for `lock`: remote unlock on or off, no quiet hours.
pub fn remote_unlock(gateway: &GatewayId, lock: LockId, on: bool, now: i64) -> Statement {
    Statement::Policy(Policy {
        jti: new_id("pol"),
        gw: gateway.clone(),
        lock,
        remote_unlock: on,
        quiet_hours: None,
        iat: now,
        exp: now + STATEMENT_LIFETIME_S,
    })
}

/// The owner's grant to `user` on `lock`, valid from a minute ago (clock skew) for `days`.
pub fn grant(
    gateway: &GatewayId,
    user: PublicKey,
    lock: LockId,
    perms: Vec<Permission>,
    schedule: Option<Schedule>,
    days: u32,
    now: i64,
) -> Grant {
    Grant {
        jti: new_id("g"),
        gw: gateway.clone(),
        sub: user,
        lock,
        perms,
        nbf: now - 60,
        iat: now,
        exp: now + i64::from(days) * 86_400,
        schedule,
    }
}

/// The owner's local code for `user` on `lock`, valid from a minute ago for `days`: the code
/// is hashed here (Argon2id), so only its hash leaves the app.
pub fn local_code(
    gateway: &GatewayId,
    user: PublicKey,
    lock: LockId,
    code: &str,
    days: u32,
    now: i64,
) -> Result<LocalCode, crate::local::codes::CodeError> {
    Ok(LocalCode {
        jti: new_id("k"),
        gw: gateway.clone(),
        sub: user,
        lock,
        hash: crate::local::codes::hash_code(code)?,
        nbf: now - 60,
        iat: now,
        exp: now + i64::from(days) * 86_400,
    })
}

/// The owner's revocation of `grant` (a grant's or a local code's id).
pub fn revoke(gateway: &GatewayId, grant: StatementId, now: i64) -> Statement {
    Statement::Revoke(Revoke {
        jti: new_id("r"),
        gw: gateway.clone(),
        grant,
        iat: now,
        exp: now + STATEMENT_LIFETIME_S,
    })
}

/// A command valid for `lifetime_s` from `now`.
pub fn command(gateway: &GatewayId, lock: LockId, op: Operation, now: i64, lifetime_s: i64) -> Command {
    let mut nonce = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    Command {
        jti: new_id("c"),
        gw: gateway.clone(),
        lock,
        op,
        iat: now,
        exp: now + lifetime_s,
        nonce: URL_SAFE_NO_PAD.encode(nonce),
    }
}

/// A message seen on the gateway's topics.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
}

/// A connection to the broker, watching one gateway's topics.
pub struct AppClient {
    client: AsyncClient,
    topics: Topics,
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Reply>>>>,
    seen: broadcast::Sender<Seen>,
    retained: Arc<Mutex<std::collections::BTreeMap<String, Vec<u8>>>>,
    /// The task that runs the MQTT session: ended with the client, so that a dropped client
    /// leaves no connection behind.
    session: tokio::task::JoinHandle<()>,
}

impl Drop for AppClient {
    fn drop(&mut self) {
        self.session.abort();
    }
}

impl std::fmt::Debug for AppClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppClient").finish_non_exhaustive()
    }
}

impl AppClient {
    /// Connects to `broker` with the relay's certificate from `pki` and subscribes to
    /// `gateway`'s replies, events, status and lock states; returns once subscribed.
    pub async fn connect(broker: &str, pki: &Pki, gateway: &GatewayId) -> Result<Self, AppError> {
        let suffix: String = new_id("app").as_str().chars().filter(|c| c.is_ascii_alphanumeric()).take(16).collect();
        Self::connect_with(broker, pki, gateway, &suffix, false).await
    }

    /// Connects as [`AppClient::connect`] with a persistent session named `name`: what the
    /// broker queues for it while its connection is down (a broker node failing over) comes
    /// when it is back, as for the cloud's relay.
    pub async fn connect_persistent(
        broker: &str,
        pki: &Pki,
        gateway: &GatewayId,
        name: &str,
    ) -> Result<Self, AppError> {
        Self::connect_with(broker, pki, gateway, name, true).await
    }

    async fn connect_with(
        broker: &str,
        pki: &Pki,
        gateway: &GatewayId,
        suffix: &str,
        persistent: bool,
    ) -> Result<Self, AppError> {
        let url = BrokerUrl::parse(broker)?;
        let tls = client_config(&pki.ca_cert(), &pki.client_cert(RELAY_IDENTITY), &pki.client_key(RELAY_IDENTITY))?;
        let mut o = MqttOptions::new(format!("{RELAY_IDENTITY}-{suffix}"), url.host, url.port);
        o.set_clean_session(!persistent);
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(o, 64);
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let topics = Topics::new(gateway);
        let waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Reply>>>> = Arc::default();
        // Room for bursts of replies and events between two reads of a watcher.
        let (seen, _) = broadcast::channel(1 << 16);
        let (subscribed_tx, subscribed) = oneshot::channel::<Result<(), String>>();
        // What the gateway publishes, not the whole subtree: `#` would bring every command the
        // app sends back to it, one more delivery and acknowledgement per command for nothing.
        let filters: Vec<SubscribeFilter> = [topics.replies(), topics.events(), topics.status(), topics.lock_states()]
            .into_iter()
            .map(|path| SubscribeFilter::new(path, QoS::AtLeastOnce))
            .collect();
        client.subscribe_many(filters.clone()).await.map_err(|e| AppError::Mqtt(e.to_string()))?;
        let resubscriber = client.clone();
        let replies_topic = topics.replies();
        let retained: Arc<Mutex<std::collections::BTreeMap<String, Vec<u8>>>> = Arc::default();
        let (w, s, r) = (waiting.clone(), seen.clone(), retained.clone());
        // Why the last attempt to connect failed, for the error when none succeeds in time.
        let last_error: Arc<Mutex<Option<String>>> = Arc::default();
        let failed = last_error.clone();
        let session = tokio::spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            // A failed first attempt may have taken the subscription with it.
            let mut retried = false;
            loop {
                match eventloop.poll().await {
                    // A broker that lost the session (restarted) lost the subscription too.
                    Ok(Event::Incoming(Incoming::ConnAck(ack)))
                        if (subscribed_tx.is_none() && !ack.session_present) || retried =>
                    {
                        retried = false;
                        let _ = resubscriber.try_subscribe_many(filters.clone());
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        if p.retain {
                            let mut kept = r.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                            if p.payload.is_empty() {
                                kept.remove(&p.topic);
                            } else {
                                kept.insert(p.topic.clone(), p.payload.to_vec());
                            }
                        }
                        if p.topic == replies_topic
                            && let Ok(reply) = serde_json::from_slice::<Reply>(&p.payload)
                            && let Some(waiter) =
                                w.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&reply.id)
                        {
                            let _ = waiter.send(reply);
                        }
                        let _ = s.send(Seen { topic: p.topic, payload: p.payload.to_vec() });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // A one-off client reports a broker it cannot reach at once; the relay's
                        // persistent session keeps trying, as the cloud's relay would (a
                        // clustered broker refuses sessions while its streams are placed).
                        if !persistent && let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(Err(e.to_string()));
                            return;
                        }
                        if let Some(tx) = &subscribed_tx {
                            if tx.is_closed() {
                                return; // the caller gave up waiting
                            }
                            retried = true;
                            *failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e.to_string());
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        match tokio::time::timeout(CONNECT_TIMEOUT, subscribed).await {
            Ok(Ok(Ok(()))) => Ok(AppClient { client, topics, waiting, seen, retained, session }),
            Ok(Ok(Err(e))) => Err(AppError::Mqtt(e)),
            _ => {
                session.abort();
                let last = last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
                Err(AppError::Mqtt(match last {
                    Some(e) => format!("no session with the broker within {CONNECT_TIMEOUT:?} (last attempt: {e})"),
                    None => "no SUBACK from the broker".into(),
                }))
            }
        }
    }

    /// The retained messages of the gateway's topics (its status, its locks' states), by
    /// topic, once the broker has delivered them all, waiting at most `timeout`.
    ///
    /// MQTT marks no end of the retained messages. A broker queues them for the subscriber
    /// when it takes the subscription and delivers to one client in order, so a message of
    /// our own, published on a topic nobody else uses after the subscription was taken, comes
    /// back behind them: its return is the end. (So the bundled broker and Mosquitto do; a
    /// NATS cluster serves each subscription from its own stream, and the marker may overtake
    /// them there.)
    pub async fn retained(&self, timeout: Duration) -> Result<Vec<(String, Vec<u8>)>, AppError> {
        let marker = self.topics.marker(new_id("end").as_str());
        let mut seen = self.watch();
        let mqtt = |e: rumqttc::ClientError| AppError::Mqtt(e.to_string());
        self.client.subscribe(marker.as_str(), QoS::AtLeastOnce).await.map_err(mqtt)?;
        self.client.publish(marker.as_str(), QoS::AtLeastOnce, false, b"end".to_vec()).await.map_err(mqtt)?;
        let came_back = async {
            loop {
                match seen.recv().await {
                    Ok(m) if m.topic == marker => return Ok(()),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(AppError::Mqtt("the session with the broker ended".into()));
                    }
                }
            }
        };
        tokio::time::timeout(timeout, came_back).await.map_err(|_| AppError::RetainedTimeout(timeout))??;
        let _ = self.client.unsubscribe(marker.as_str()).await;
        // The session task keeps a retained message before it passes it on: all are kept now.
        let kept = self.retained.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(kept.iter().map(|(t, p)| (t.clone(), p.clone())).collect())
    }

    /// Everything published on the gateway's topics from now on.
    pub fn watch(&self) -> broadcast::Receiver<Seen> {
        self.seen.subscribe()
    }

    /// Publishes a signed statement (its text) and waits for the reply to `id`.
    pub async fn send_text(&self, id: &str, text: String, timeout: Duration) -> Result<Reply, AppError> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id.to_owned(), tx);
        self.client
            .publish(self.topics.commands(), QoS::AtLeastOnce, false, text.into_bytes())
            .await
            .map_err(|e| AppError::Mqtt(e.to_string()))?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            _ => {
                self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(id);
                Err(AppError::Timeout(timeout))
            }
        }
    }

    /// Publishes a statement's text without waiting for its reply (watch for it with
    /// [`AppClient::watch`]).
    pub async fn publish_text(&self, text: String) -> Result<(), AppError> {
        self.client
            .publish(self.topics.commands(), QoS::AtLeastOnce, false, text.into_bytes())
            .await
            .map_err(|e| AppError::Mqtt(e.to_string()))
    }

    /// Signs `statement` with `key`, sends it and waits for its reply.
    pub async fn send(&self, statement: &Statement, key: &AppKey, timeout: Duration) -> Result<Reply, AppError> {
        self.send_text(statement.id().as_str(), statement.sign(&key.key), timeout).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A key's name is a plain file name: none reads or writes outside the keys' directory.
    /// A missing key says how to make one; a file that is no key (or far too long to be one)
    /// says so; a key replaced with --force is 0600 again, whatever mode its file had.
    #[test]
    fn key_names_stay_inside_the_directory_and_errors_say_what_to_do() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        for bad in ["../evil", "", "a/b", ".hidden", "white space", &"x".repeat(33)] {
            assert!(matches!(AppKey::generate(&keys, bad, false), Err(AppError::BadName(_))), "{bad:?}");
            assert!(matches!(AppKey::load(&keys, bad), Err(AppError::BadName(_))), "{bad:?}");
        }
        assert!(!dir.path().join("evil.key").exists() && !keys.exists());
        let missing = AppKey::load(&keys, "owner").unwrap_err().to_string();
        assert!(missing.contains("no key named owner in") && missing.contains("--key owner keygen"), "{missing}");

        AppKey::generate(&keys, "owner", false).unwrap();
        let file = keys.join("owner.key");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let replaced = AppKey::generate(&keys, "owner", true).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(AppKey::load(&keys, "owner").unwrap().public(), replaced.public());

        std::fs::write(keys.join("big.key"), [b'A'; 1000]).unwrap();
        assert!(matches!(AppKey::load(&keys, "big"), Err(AppError::BadKey(_))));
        std::fs::write(keys.join("short.key"), "AAAA").unwrap();
        assert!(matches!(AppKey::load(&keys, "short"), Err(AppError::BadKey(_))));
    }

    /// A persistent session that never gets one (a broker that takes the connection and never
    /// answers) gives up with the reason, and stops trying: no connection attempt after the
    /// error. The clock is paused: tokio moves it on whenever nothing else can run.
    #[tokio::test(start_paused = true)]
    async fn a_session_that_never_starts_is_given_up_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let gw = GatewayId::new("gw-silent").unwrap();
        let pki = Pki::init(&dir.path().join("pki"), &[gw.as_str()]).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        });
        let broker = format!("mqtts://127.0.0.1:{port}");
        let error = match AppClient::connect_persistent(&broker, &pki, &gw, "silent").await {
            Ok(_) => panic!("a session with a broker that never answers"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains(&format!("no session with the broker within {CONNECT_TIMEOUT:?}")), "{error}");
        assert!(error.contains("last attempt"), "the reason of the last attempt: {error}");
        let tries = accepted.load(Ordering::SeqCst);
        assert!(tries >= 1, "it never tried");
        tokio::time::sleep(CONNECT_TIMEOUT * 3).await;
        assert_eq!(accepted.load(Ordering::SeqCst), tries, "still trying after giving up");
    }
}
