//! Debian's Mosquitto for tests, configured by `lockhub::devcloud::mosquitto_config` (what
//! `lockhub-cloud mosquitto-config` prints): mutual TLS with the development PKI,
//! `use_identity_as_username`, and the fleet's ACLs (a gateway reaches its own subtree only;
//! the relay reaches all). Started on an ephemeral port under
//! `setpriv --pdeathsig KILL`, stopped on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use lockhub::devcloud::mosquitto_config::MosquittoConfig;
use lockhub::devcloud::pki::Pki;

/// A Mosquitto broker on an ephemeral port, stopped on drop.
pub struct Mosquitto {
    child: Child,
    conf: std::path::PathBuf,
    /// Its TLS port on 127.0.0.1.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on, for a server started next.
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct free ports. Each is held until all are chosen: a port let go at once can be
/// handed out again by the next `bind(0)` (a NATS node once got the same port for MQTT and
/// its routes, and failed to start).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: [std::net::TcpListener; N] = std::array::from_fn(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    held.map(|l| l.local_addr().unwrap().port())
}

impl Mosquitto {
    /// Starts Mosquitto with mutual TLS (the PKI's CA, broker certificate) and the lockhub ACLs.
    pub fn start(pki: &Pki) -> Self {
        Self::start_with(pki, false)
    }

    /// Starts Mosquitto as [`Mosquitto::start`], keeping sessions and queued messages across
    /// restarts when `persistent`.
    pub fn start_with(pki: &Pki, persistent: bool) -> Self {
        Self::start_configured(pki, persistent, None)
    }

    /// Starts Mosquitto as [`Mosquitto::start`] with `acl` in place of the fleet's ACL: a
    /// broker that silently drops what a client may not publish.
    pub fn start_with_acl(pki: &Pki, acl: &str) -> Self {
        Self::start_configured(pki, false, Some(acl))
    }

    /// Starts Mosquitto as [`Mosquitto::start`] but with no packet size limit, as a broker
    /// configured by someone else may be.
    pub fn start_without_packet_limit(pki: &Pki) -> Self {
        Self::start_edited(pki, false, None, |config| config.max_packet_size = None)
    }

    fn start_configured(pki: &Pki, persistent: bool, acl: Option<&str>) -> Self {
        Self::start_edited(pki, persistent, acl, |_| {})
    }

    fn start_edited(pki: &Pki, persistent: bool, acl: Option<&str>, edit: impl FnOnce(&mut MosquittoConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        // Exactly what `lockhub-cloud mosquitto-config` prints, plus logging for readiness.
        let mut config = MosquittoConfig::for_pki(pki, "127.0.0.1", port, dir.path().join("acl"));
        edit(&mut config);
        config.persistence_dir = persistent.then(|| dir.path().to_owned());
        config.run_as_root = super::tier::is_root();
        std::fs::write(&config.acl_file, acl.map_or_else(|| config.render_acl(), str::to_owned)).unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "{}log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n",
                config.render()
            ),
        )
        .unwrap();
        let child = Self::spawn(&conf);
        Mosquitto { child, conf, port, _dir: dir }
    }

    /// Stops the broker gracefully (SIGTERM: it saves its state) and starts it again on the
    /// same port; returns once it is running.
    pub fn restart(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signalling mosquitto");
        self.child.wait().expect("mosquitto exits");
        self.child = Self::spawn(&self.conf);
    }

    /// Kills the broker (SIGKILL) and reaps it: its port refuses connections from now on.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn spawn(conf: &std::path::Path) -> Child {
        let mut child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(super::tier::program("mosquitto").expect("mosquitto is installed (tier::ready)"))
            .arg("-c")
            .arg(conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting mosquitto (.ci/run installs it)");
        // Ready when it says it is running; its log then goes nowhere.
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        loop {
            let line = lines.next().expect("mosquitto exited before it was running").unwrap();
            if line.contains("running") {
                break;
            }
            assert!(!line.contains("Error"), "mosquitto: {line}");
        }
        std::thread::spawn(move || for _ in lines {});
        child
    }
}
