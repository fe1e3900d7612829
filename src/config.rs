//! The daemon's configuration file (`/etc/lockhub/lockhub.toml`): TOML, strictly parsed.
//!
//! Unknown keys are refused (a misspelt key must not silently fall back to a default), and
//! every error names the file, the line and the column, and says what would be right.
//! `docs/lockhub.toml` shows every key with its default and meaning (a test keeps it valid).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::ble::BleConfig;
use crate::cloud::broker_url::BrokerUrl;
use crate::cloud::link::CloudConfig;
use crate::cloud::tls::MAX_PEM_BYTES;
use crate::gateway::policy::PolicyLimits;
use crate::protocol::ids::GatewayId;

/// Largest configuration file read, in bytes.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;

/// A day and a week, in seconds: the longest windows and lockouts the configuration takes.
const DAY_S: i128 = 86_400;
const WEEK_S: i128 = 7 * DAY_S;

/// Why the configuration is unusable.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Bigger than [`MAX_CONFIG_BYTES`] (a device, or the wrong file).
    #[error("{path}: more than {MAX_CONFIG_BYTES} bytes, which no configuration needs: is this the right file?")]
    TooBig {
        /// The file.
        path: PathBuf,
    },
    /// Not valid TOML, an unknown key, or a value of the wrong type (the message shows the
    /// line and column).
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, from the parser.
        message: String,
    },
    /// A value that parses but cannot work.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, e.g. `cloud.brokers`.
        key: &'static str,
        /// What is wrong and what would be right.
        message: String,
    },
    /// A file the configuration names is missing, unreadable, not what it should be, or
    /// readable by other users when it holds a secret.
    #[error("{path}: {key} = {file}: {message}")]
    File {
        /// The configuration file.
        path: PathBuf,
        /// The key naming the file, e.g. `cloud.cert`.
        key: &'static str,
        /// The file named.
        file: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// `[gateway]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// The gateway's id: its client certificate's common name and its topic level.
    pub id: String,
    /// Where the store lives (the systemd unit's StateDirectory).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/lockhub")
}

/// `[cloud]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudSection {
    /// Brokers, tried in order: `mqtts://host[:port]`.
    pub brokers: Vec<String>,
    /// The CA that signs the brokers' certificates.
    pub ca: PathBuf,
    /// This gateway's client certificate.
    pub cert: PathBuf,
    /// Its private key (mode 0600).
    pub key: PathBuf,
    /// MQTT keep-alive in seconds.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_s: u64,
}

fn default_keep_alive() -> u64 {
    30
}

impl CloudSection {
    /// Brokers and credentials, with the default keep-alive.
    pub fn new(brokers: Vec<String>, ca: PathBuf, cert: PathBuf, key: PathBuf) -> Self {
        CloudSection { brokers, ca, cert, key, keep_alive_s: default_keep_alive() }
    }
}

/// `[clock]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockSection {
    /// Refuse remote commands until the kernel reports the clock synchronised (NTP). Turn off
    /// only on a test rig whose clock is known good.
    pub require_sync: bool,
}

impl Default for ClockSection {
    fn default() -> Self {
        ClockSection { require_sync: true }
    }
}

/// `[control]`: the admin control socket.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSection {
    /// Where the socket is (the unit's RuntimeDirectory).
    pub socket: PathBuf,
    /// The group whose members may use it (besides root).
    pub group: String,
}

impl Default for ControlSection {
    fn default() -> Self {
        ControlSection { socket: PathBuf::from("/run/lockhub/control.sock"), group: "lockhub-admin".into() }
    }
}

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[gateway]`.
    pub gateway: GatewaySection,
    /// `[cloud]`; without it the hub runs local only (Home Assistant, the control socket).
    #[serde(default)]
    pub cloud: Option<CloudSection>,
    /// `[ble]`.
    #[serde(default)]
    pub ble: BleConfig,
    /// `[policy]`.
    #[serde(default)]
    pub policy: PolicyLimits,
    /// `[clock]`.
    #[serde(default)]
    pub clock: ClockSection,
    /// `[local]`: Home Assistant and local control.
    #[serde(default)]
    pub local: crate::local::config::LocalConfig,
    /// `[control]`: the admin control socket.
    #[serde(default)]
    pub control: ControlSection,
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read = |source| ConfigError::Read { path: path.to_owned(), source };
        let bytes = crate::bounded_file::read(path, MAX_CONFIG_BYTES).map_err(|e| match e.kind() {
            std::io::ErrorKind::FileTooLarge => ConfigError::TooBig { path: path.to_owned() },
            _ => read(e),
        })?;
        let text = std::str::from_utf8(&bytes).map_err(|_| {
            read(std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text: is this the right file?"))
        })?;
        Self::parse(path, text)
    }

    /// Parses and checks `text` (read from `path`, for messages).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |span| line_column(text, span.start));
            ConfigError::Syntax { path: path.to_owned(), line, column, message: e.message().to_owned() }
        })?;
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, message: String| ConfigError::Invalid { path: path.to_owned(), key, message };
        GatewayId::new(self.gateway.id.clone()).map_err(|_| {
            invalid(
                "gateway.id",
                "1 to 32 characters of letters, digits, '.', '_' or '-' (your certificate's CN)".into(),
            )
        })?;
        if let Some(cloud) = &self.cloud {
            if cloud.brokers.is_empty() {
                return Err(invalid(
                    "cloud.brokers",
                    "at least one broker: brokers = [\"mqtts://host:8883\"] (or no [cloud] section, for a hub without a cloud)".into(),
                ));
            }
            for url in &cloud.brokers {
                BrokerUrl::parse(url).map_err(|e| invalid("cloud.brokers", e.to_string()))?;
            }
        }
        if self.ble.adapter.is_some() && !self.ble.adapters.is_empty() {
            return Err(invalid("ble.adapters", "set either adapter or adapters, not both".into()));
        }
        let most = crate::ble::radios::MAX_RADIOS;
        if self.ble.adapters.len() > most {
            return Err(invalid("ble.adapters", format!("at most {most} adapters")));
        }
        let (key, listed) = match &self.ble.adapter {
            Some(one) => ("ble.adapter", std::slice::from_ref(one)),
            None => ("ble.adapters", self.ble.adapters.as_slice()),
        };
        for (i, adapter) in listed.iter().enumerate() {
            if !crate::ble::radios::is_adapter_selector(adapter) {
                return Err(invalid(
                    key,
                    format!("{adapter:?}: an adapter's name (hci0) or address (00:1A:7D:DA:71:13)"),
                ));
            }
            if listed[..i].iter().any(|a| a.eq_ignore_ascii_case(adapter)) {
                return Err(invalid(key, format!("{adapter} is listed twice")));
            }
        }
        if self.ble.max_links == 0 || self.ble.max_links > 10 {
            return Err(invalid("ble.max_links", "1 to 10 (3 suits a Raspberry Pi's controller)".into()));
        }
        if self.policy.rate_commands == 0 || self.policy.lockout_failures == 0 {
            return Err(invalid("policy", "rate_commands and lockout_failures must be at least 1".into()));
        }
        // Windows and bounds a person would set; beyond them, arithmetic on times could
        // overflow (a lockout ending before it began), and a zero bound fails every attempt.
        let (ble, policy, local) = (&self.ble, &self.policy, &self.local);
        let ranges: [(&'static str, i128, i128, i128, &str); 15] = [
            ("ble.connect_timeout_ms", ble.connect_timeout_ms.into(), 500, 120_000, "ms"),
            ("ble.command_timeout_ms", ble.command_timeout_ms.into(), 500, 120_000, "ms"),
            ("ble.resolve_timeout_ms", ble.resolve_timeout_ms.into(), 500, 120_000, "ms"),
            ("ble.slot_timeout_ms", ble.slot_timeout_ms.into(), 500, 600_000, "ms"),
            ("ble.keep_alive_ms", ble.keep_alive_ms.into(), 0, 3_600_000, "ms"),
            ("ble.retry_backoff_ms", ble.retry_backoff_ms.into(), 10, 10_000, "ms"),
            ("ble.connect_attempts", ble.connect_attempts.into(), 1, 10, "attempts"),
            ("policy.rate_window_s", policy.rate_window_s.into(), 1, DAY_S, "seconds"),
            ("policy.lockout_window_s", policy.lockout_window_s.into(), 1, WEEK_S, "seconds"),
            ("policy.lockout_s", policy.lockout_s.into(), 1, WEEK_S, "seconds"),
            ("policy.max_skew_s", policy.max_skew_s.into(), 0, 300, "seconds"),
            ("local.lockout_window_s", local.lockout_window_s.into(), 1, WEEK_S, "seconds"),
            ("local.lockout_s", local.lockout_s.into(), 1, WEEK_S, "seconds"),
            ("local.lockout_failures", local.lockout_failures.into(), 1, 1_000, "failures"),
            ("local.lockout_ceiling", local.lockout_ceiling.into(), 1, 10_000, "failures"),
        ];
        let keep_alive =
            self.cloud.as_ref().map(|c| ("cloud.keep_alive_s", c.keep_alive_s.into(), 5, 3_600, "seconds"));
        let ranges = ranges.into_iter().chain(keep_alive);
        for (key, value, least, most, unit) in ranges {
            if !(least..=most).contains(&value) {
                return Err(invalid(key, format!("{value} is out of range: {least} to {most} {unit}")));
            }
        }
        crate::local::codes::CodeBook::new(local).map_err(|e| invalid("local.codes", e.to_string()))?;
        let prefix_ok = !local.discovery_prefix.is_empty()
            && local.discovery_prefix.len() <= 64
            && local.discovery_prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'/'));
        if !prefix_ok {
            return Err(invalid(
                "local.discovery_prefix",
                "letters, digits, '_', '-', '/' (Home Assistant's default is homeassistant)".into(),
            ));
        }
        if let Some(mqtt) = &local.mqtt {
            if mqtt.host.is_empty() || mqtt.host.len() > 253 {
                return Err(invalid("local.mqtt.host", "the local broker's host name or address".into()));
            }
            if mqtt.tls && mqtt.ca.is_none() {
                return Err(invalid(
                    "local.mqtt.ca",
                    "tls = true needs the CA that signs the local broker's certificate".into(),
                ));
            }
            if mqtt.password_file.is_some() && mqtt.username.is_none() {
                return Err(invalid("local.mqtt.username", "a password_file needs a username".into()));
            }
        }
        Ok(())
    }

    /// Checks the files the configuration names, as the daemon will use them: the CA and the
    /// client certificate must be readable PEM certificates, the key a readable PEM private key
    /// that no other user can read. `path` is the configuration file, for messages.
    pub fn check_files(&self, path: &Path) -> Result<(), ConfigError> {
        let err = |key, file: &Path, message: String| ConfigError::File {
            path: path.to_owned(),
            key,
            file: file.to_owned(),
            message,
        };
        if let Some(cloud) = &self.cloud {
            for (key, file) in [("cloud.ca", &cloud.ca), ("cloud.cert", &cloud.cert)] {
                let pem = read_pem(file).map_err(|m| err(key, file, m))?;
                let certs = rustls_pemfile::certs(&mut pem.as_slice()).collect::<Result<Vec<_>, _>>();
                if !matches!(certs, Ok(c) if !c.is_empty()) {
                    return Err(err(key, file, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
                }
            }
            let key = &cloud.key;
            let mode =
                std::fs::metadata(key).map_err(|e| err("cloud.key", key, file_problem(&e)))?.permissions().mode();
            if mode & 0o007 != 0 {
                return Err(err(
                    "cloud.key",
                    key,
                    format!(
                        "other users can read this private key (mode {:04o}): chmod 0640 it, owned by root and group lockhub",
                        mode & 0o7777
                    ),
                ));
            }
            let pem = read_pem(key).map_err(|m| err("cloud.key", key, m))?;
            if !matches!(rustls_pemfile::private_key(&mut pem.as_slice()), Ok(Some(_))) {
                return Err(err("cloud.key", key, "holds no PEM private key (-----BEGIN PRIVATE KEY-----)".into()));
            }
        }
        if let Some(password) = self.local.mqtt.as_ref().and_then(|m| m.password_file.as_ref()) {
            let meta =
                std::fs::metadata(password).map_err(|e| err("local.mqtt.password_file", password, file_problem(&e)))?;
            if meta.permissions().mode() & 0o007 != 0 {
                return Err(err(
                    "local.mqtt.password_file",
                    password,
                    "other users can read this password: chmod 0640 it, owned by root and group lockhub".into(),
                ));
            }
        }
        if let Some(ca) = self.local.mqtt.as_ref().and_then(|m| m.ca.as_ref()) {
            read_pem(ca).map_err(|m| err("local.mqtt.ca", ca, m))?;
        }
        Ok(())
    }

    /// The sections of `new` that differ from this one and that only a restart applies
    /// (a reload applies `[policy]` and `[clock]`).
    pub fn restart_needed(&self, new: &Config) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.gateway != new.gateway {
            keys.push("gateway");
        }
        if self.cloud != new.cloud {
            keys.push("cloud");
        }
        if self.ble != new.ble {
            keys.push("ble");
        }
        if self.local != new.local {
            keys.push("local");
        }
        if self.control != new.control {
            keys.push("control");
        }
        keys
    }

    /// A configuration with `[gateway]` and `[cloud]` as given and every other section at its
    /// default (for a hub assembled in code: the demo's, a test's).
    pub fn new(gateway: GatewaySection, cloud: CloudSection) -> Self {
        Config {
            gateway,
            cloud: Some(cloud),
            ble: BleConfig::default(),
            policy: PolicyLimits::default(),
            clock: ClockSection::default(),
            local: crate::local::config::LocalConfig::default(),
            control: ControlSection::default(),
        }
    }

    /// The gateway id (checked by `load`).
    pub fn gateway_id(&self) -> GatewayId {
        GatewayId::new(self.gateway.id.clone()).expect("checked when loaded")
    }

    /// The cloud link's configuration, if the hub has a cloud.
    pub fn cloud_config(&self) -> Option<CloudConfig> {
        let cloud = self.cloud.as_ref()?;
        Some(CloudConfig {
            keep_alive: Duration::from_secs(cloud.keep_alive_s),
            ..CloudConfig::new(cloud.brokers.clone(), cloud.ca.clone(), cloud.cert.clone(), cloud.key.clone())
        })
    }
}

fn read_pem(file: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
    crate::bounded_file::read(file, MAX_PEM_BYTES).map_err(|e| file_problem(&e))
}

fn file_problem(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file: fix the path, or put the file there".into(),
        std::io::ErrorKind::PermissionDenied => {
            "permission denied: the daemon's user (lockhub) must be able to read it (group lockhub, mode 0640)".into()
        }
        std::io::ErrorKind::FileTooLarge => format!("{e}: not a certificate or key file"),
        _ => e.to_string(),
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[gateway]
id = "gw-1"
state_dir = "/tmp/lockhub"

[cloud]
brokers = ["mqtts://cloud.example:8883", "mqtts://backup.example"]
ca = "/etc/lockhub/ca.pem"
cert = "/etc/lockhub/gw.pem"
key = "/etc/lockhub/gw.key"

[ble]
max_links = 2

[policy]
rate_commands = 5
"#;

    #[test]
    fn a_good_file_loads_with_defaults_filled_in() {
        let c = Config::parse(Path::new("lockhub.toml"), GOOD).unwrap();
        assert_eq!(c.gateway_id().as_str(), "gw-1");
        assert_eq!(c.ble.max_links, 2);
        assert_eq!(c.ble.connect_attempts, BleConfig::default().connect_attempts);
        assert_eq!(c.policy.rate_commands, 5);
        assert_eq!(c.policy.lockout_failures, PolicyLimits::default().lockout_failures);
        assert!(c.clock.require_sync);
        assert_eq!(c.cloud_config().unwrap().brokers.len(), 2);
    }

    #[test]
    fn the_documented_example_is_valid_and_shows_the_defaults() {
        let example = include_str!("../docs/lockhub.toml");
        let c = Config::parse(Path::new("docs/lockhub.toml"), example).unwrap();
        assert_eq!(c.ble, BleConfig::default());
        assert_eq!(c.policy, PolicyLimits::default());
        assert!(c.clock.require_sync);
    }

    #[test]
    fn adapters_are_named_by_name_or_address_once_each() {
        let two = GOOD.replace("max_links = 2", "adapters = [\"hci0\", \"00:1a:7d:da:71:13\"]");
        let c = Config::parse(Path::new("x"), &two).unwrap();
        assert_eq!(c.ble.adapter_choices(), [Some("hci0".to_owned()), Some("00:1a:7d:da:71:13".to_owned())]);
        assert_eq!(BleConfig::default().adapter_choices(), [None], "the first powered adapter");
        let refused = [
            ("adapters = [\"00:1A:7D:DA:71:13\", \"00:1a:7d:da:71:13\"]", "listed twice"),
            ("adapters = [\"hci0\", \"hci0\"]", "listed twice"),
            ("adapters = [\"wlan0\"]", "an adapter's name (hci0) or address"),
            ("adapter = \"00:1A:7D:DA:71\"", "an adapter's name (hci0) or address"),
            ("adapters = [\"hci0\", \"hci1\", \"hci2\", \"hci3\", \"hci4\"]", "at most 4 adapters"),
            ("adapter = \"hci0\"\nadapters = [\"hci1\"]", "either adapter or adapters"),
        ];
        for (line, why) in refused {
            let text = GOOD.replace("max_links = 2", line);
            let e = Config::parse(Path::new("x"), &text).unwrap_err().to_string();
            assert!(e.contains("ble.adapter") && e.contains(why), "{line}: {e}");
        }
    }

    #[test]
    fn errors_name_the_line_column_and_fix() {
        let unknown = GOOD.replace("max_links = 2", "max_link = 2");
        let e = Config::parse(Path::new("lockhub.toml"), &unknown).unwrap_err().to_string();
        assert!(e.starts_with("lockhub.toml:13:1: unknown field `max_link`"), "{e}");
        assert!(e.contains("max_links"), "the message lists the known keys: {e}");
        let wrong_type = GOOD.replace("rate_commands = 5", "rate_commands = \"five\"");
        let e = Config::parse(Path::new("lockhub.toml"), &wrong_type).unwrap_err().to_string();
        assert!(e.starts_with("lockhub.toml:16:17:"), "{e}");
        let plain = GOOD.replace("mqtts://backup.example", "mqtt://backup.example");
        let e = Config::parse(Path::new("lockhub.toml"), &plain).unwrap_err().to_string();
        assert!(e.contains("cloud.brokers") && e.contains("TLS is required"), "{e}");
        let bad_id = GOOD.replace("gw-1", "gw 1");
        assert!(Config::parse(Path::new("x"), &bad_id).unwrap_err().to_string().contains("gateway.id"));
        assert!(matches!(Config::parse(Path::new("x"), "[gateway"), Err(ConfigError::Syntax { line: 1, .. })));
    }

    /// Windows, lockouts and bounds outside what a person would set are refused with the key
    /// and the range: a lockout of i64::MAX seconds overflowed `now + lockout_s` (in a release
    /// build, a lockout that ended before it began), a zero bound would fail every attempt.
    #[test]
    fn times_and_bounds_out_of_range_name_the_key_and_the_range() {
        let with = |section: &str, line: &str| {
            let text = if GOOD.contains(&format!("[{section}]")) {
                GOOD.replace(&format!("[{section}]\n"), &format!("[{section}]\n{line}\n"))
            } else {
                format!("{GOOD}\n[{section}]\n{line}\n")
            };
            Config::parse(Path::new("lockhub.toml"), &text).map(|_| ()).map_err(|e| e.to_string())
        };
        let e = with("policy", "lockout_s = 9223372036854775807").unwrap_err();
        assert_eq!(e, "lockhub.toml: policy.lockout_s: 9223372036854775807 is out of range: 1 to 604800 seconds");
        for (section, line, key) in [
            ("policy", "lockout_s = 0", "policy.lockout_s"),
            ("policy", "rate_window_s = -60", "policy.rate_window_s"),
            ("policy", "lockout_window_s = 604801", "policy.lockout_window_s"),
            ("policy", "max_skew_s = -1", "policy.max_skew_s"),
            ("ble", "connect_timeout_ms = 0", "ble.connect_timeout_ms"),
            ("ble", "command_timeout_ms = 9223372036854775807", "ble.command_timeout_ms"),
            ("ble", "connect_attempts = 0", "ble.connect_attempts"),
            ("local", "lockout_s = 9223372036854775807", "local.lockout_s"),
            ("local", "lockout_failures = 0", "local.lockout_failures"),
            ("local", "lockout_ceiling = 0", "local.lockout_ceiling"),
        ] {
            let e = with(section, line).unwrap_err();
            assert!(e.contains(&format!("{key}: ")) && e.contains("is out of range"), "{line}: {e}");
        }
        with("policy", "lockout_s = 604800").unwrap();
        with("ble", "keep_alive_ms = 0").unwrap();
    }

    #[test]
    fn without_a_cloud_section_the_hub_runs_local_only() {
        let text = "[gateway]\nid = \"gw-alone\"\nstate_dir = \"/tmp/lockhub\"\n";
        let c = Config::parse(Path::new("/etc/lockhub/lockhub.toml"), text).unwrap();
        assert!(c.cloud.is_none() && c.cloud_config().is_none());
        c.check_files(Path::new("/etc/lockhub/lockhub.toml")).unwrap();
        let empty = format!("{text}[cloud]\nbrokers = []\nca = \"/a\"\ncert = \"/b\"\nkey = \"/c\"\n");
        let e = Config::parse(Path::new("x.toml"), &empty).unwrap_err().to_string();
        assert!(e.contains("at least one broker") && e.contains("no [cloud] section"), "{e}");
    }
}
