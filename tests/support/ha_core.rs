//! A real Home Assistant core for the home-assistant tier: PyPI's `homeassistant` in a virtual
//! environment made once under `target/` (keyed by its version, about 600 MB, a few minutes
//! from PyPI), started per test with its own configuration directory:
//!
//! - its MQTT integration set up (the config entry the UI would write) against the test's
//!   broker, with discovery on;
//! - `mqtt_statestream`, which publishes every entity's state and attributes under `ha/…` on
//!   that broker: how the test reads what Home Assistant made of lockhub's discovery;
//! - one automation that performs any action published as JSON on `test/call` — the service
//!   calls the UI's buttons make (`lock.lock`, `lock.unlock` with or without a code).
//!
//! The process runs under `setpriv --pdeathsig KILL` and is killed on drop; its log is kept in
//! the configuration directory for the test to read.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The Home Assistant release the tier runs (the newest for Python 3.13.0).
pub const VERSION: &str = "2025.4.4";

/// How long it may take to come up and connect to the broker: its first start in a fresh
/// environment loads much of Home Assistant (about a minute on 2 cores).
pub const START: std::time::Duration = std::time::Duration::from_secs(300);

/// What Home Assistant 2025.4.4 installs at its first start for what the test loads (the MQTT
/// integration's client, the frontend that everything else waits for, the login modules'):
/// installed with it, so that it runs with `--skip-pip` and needs no network when it starts.
const RUNTIME: [&str; 4] =
    ["paho-mqtt==2.1.0", "home-assistant-frontend==20250411.0", "PyQRCode==1.2.1", "pyotp==2.8.0"];

/// A Python 3.13 to make the environment with: one of pyenv's, or `python3.13` on `PATH` —
/// whichever answers `--version` (pyenv's shim on `PATH` does not when another version is
/// its global one).
pub fn python() -> Option<PathBuf> {
    static FOUND: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    FOUND
        .get_or_init(|| {
            let mut candidates: Vec<PathBuf> = std::env::var_os("HOME")
                .map(|home| PathBuf::from(home).join(".pyenv/versions"))
                .and_then(|dir| std::fs::read_dir(dir).ok())
                .into_iter()
                .flatten()
                .flatten()
                .filter(|v| v.file_name().to_string_lossy().starts_with("3.13"))
                .map(|v| v.path().join("bin/python3.13"))
                .collect();
            candidates.sort();
            candidates.reverse();
            candidates.extend(super::tier::program("python3.13"));
            candidates.into_iter().find(|python| {
                Command::new(python)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
        })
        .clone()
}

/// The virtual environment, made on first use (one maker at a time, across test processes).
fn environment() -> PathBuf {
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let venv = target.join(format!("home-assistant-{VERSION}"));
    let made = venv.join(".made");
    let recipe = RUNTIME.join(" ");
    let ready = || std::fs::read_to_string(&made).is_ok_and(|r| r == recipe);
    if ready() {
        return venv;
    }
    std::fs::create_dir_all(&target).unwrap();
    let lock = std::fs::File::create(target.join("home-assistant.lock")).unwrap();
    lock.lock().unwrap();
    if ready() {
        return venv;
    }
    let python = python().expect("Python 3.13 (tier::ready checked)");
    let _ = std::fs::remove_dir_all(&venv);
    let run = |command: &mut Command, what: &str| {
        let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(out.status.success(), "{what} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    };
    run(Command::new(&python).args(["-m", "venv"]).arg(&venv), "making the virtual environment");
    run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("homeassistant=={VERSION}"))
            .args(RUNTIME),
        "pip install homeassistant",
    );
    std::fs::write(&made, &recipe).unwrap();
    venv
}

/// A running Home Assistant core.
pub struct HomeAssistantCore {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for HomeAssistantCore {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HomeAssistantCore {
    /// Starts it against the MQTT broker on 127.0.0.1:`port` as `user`. Returns at once: the
    /// broker shows when it is up (its birth message, `homeassistant/status` = `online`).
    pub fn start(port: u16, user: &str, password: &str) -> Self {
        let venv = environment();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path();
        std::fs::write(
            config.join("configuration.yaml"),
            "homeassistant:\n  name: lockhub test\n  time_zone: UTC\n  unit_system: metric\n  \
             latitude: 0\n  longitude: 0\n  elevation: 0\n\
             logger:\n  default: warning\n\
             mqtt_statestream:\n  base_topic: ha\n  publish_attributes: true\n\
             automation: !include automations.yaml\n",
        )
        .unwrap();
        std::fs::write(
            config.join("automations.yaml"),
            "- id: call_from_the_test\n  alias: a service call from the test\n  mode: queued\n  triggers:\n    \
             - trigger: mqtt\n      topic: test/call\n  actions:\n    \
             - action: \"{{ trigger.payload_json.action }}\"\n      target:\n        \
             entity_id: \"{{ trigger.payload_json.entity_id }}\"\n      \
             data: \"{{ trigger.payload_json.data | default({}) }}\"\n\
             - id: answer_the_test\n  alias: what Home Assistant has, for the test\n  mode: queued\n  max: 100\n  \
             triggers:\n    - trigger: mqtt\n      topic: test/ask\n  actions:\n    \
             - action: mqtt.publish\n      data:\n        topic: test/answer\n        payload: >-\n          \
             {\"asked\": {{ trigger.payload | tojson }},\n           \
             \"entities\": {{ integration_entities('mqtt') | sort | tojson }},\n           \
             \"names\": {{ integration_entities('mqtt') | sort | map('state_attr', 'friendly_name') | list | tojson }},\n           \
             \"states\": {{ integration_entities('mqtt') | sort | map('states') | list | tojson }}}\n",
        )
        .unwrap();
        std::fs::create_dir_all(config.join(".storage")).unwrap();
        let entry = serde_json::json!({
            "version": 1, "minor_version": 5, "key": "core.config_entries",
            "data": { "entries": [{
                "entry_id": "01JLOCKHUBTESTMQTT00000000", "version": 1, "minor_version": 2,
                "domain": "mqtt", "title": "127.0.0.1",
                "data": { "broker": "127.0.0.1", "port": port, "username": user, "password": password,
                          "discovery": true },
                "options": {}, "pref_disable_new_entities": false, "pref_disable_polling": false,
                "source": "user", "unique_id": null, "disabled_by": null, "discovery_keys": {},
                "created_at": "2026-01-01T00:00:00+00:00", "modified_at": "2026-01-01T00:00:00+00:00",
                "subentries": []
            }]}
        });
        std::fs::write(config.join(".storage/core.config_entries"), entry.to_string()).unwrap();
        let log = std::fs::File::create(config.join("test.log")).unwrap();
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(venv.join("bin/hass"))
            .arg("--config")
            .arg(config)
            .arg("--skip-pip")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting hass");
        HomeAssistantCore { child, dir }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("test.log")).unwrap_or_default()
    }

    /// Stops it (the process is killed; nothing of it is kept).
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
