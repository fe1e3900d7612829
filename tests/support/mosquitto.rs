//! Debian's Mosquitto for tests: mutual TLS with the development PKI,
//! `use_identity_as_username`, and the ACLs a lockhub fleet uses (a gateway reaches its own
//! subtree only; the relay reaches all). Started on an ephemeral port under
//! `setpriv --pdeathsig KILL`, stopped on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use lockhub::devcloud::pki::{Pki, RELAY_IDENTITY};

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
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Mosquitto {
    /// Starts Mosquitto with mutual TLS (the PKI's CA, broker certificate) and the lockhub ACLs.
    pub fn start(pki: &Pki) -> Self {
        Self::start_with(pki, false)
    }

    /// Starts Mosquitto as [`Mosquitto::start`], keeping sessions and queued messages across
    /// restarts when `persistent`.
    pub fn start_with(pki: &Pki, persistent: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let acl = dir.path().join("acl");
        std::fs::write(
            &acl,
            format!("user {RELAY_IDENTITY}\ntopic readwrite lockhub/v1/#\n\npattern readwrite lockhub/v1/%u/#\n"),
        )
        .unwrap();
        let conf = dir.path().join("mosquitto.conf");
        let persistence = if persistent {
            format!("persistence true\npersistence_location {}/\nautosave_interval 1", dir.path().display())
        } else {
            "persistence false".to_owned()
        };
        let user = if std::env::var("USER").as_deref() == Ok("root") || is_root() { "user root\n" } else { "" };
        std::fs::write(
            &conf,
            format!(
                "{user}per_listener_settings false\nallow_anonymous false\n{persistence}\n\
                 log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
                 listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n\
                 use_identity_as_username true\nset_tcp_nodelay true\nacl_file {}\n",
                pki.ca_cert().display(),
                pki.broker_cert().display(),
                pki.broker_key().display(),
                acl.display()
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

    fn spawn(conf: &std::path::Path) -> Child {
        let mut child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "mosquitto", "-c"])
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

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}
