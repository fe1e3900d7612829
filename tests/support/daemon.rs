//! `lockhub run` as a child process on the test bus, as systemd would run it: its
//! configuration file, and a handle that kills it when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use lockhub::devcloud::pki::Pki;

/// Writes a configuration for gateway `gw` in `dir`: state in `dir/state`, the control socket
/// at `dir/control.sock`, the broker on 127.0.0.1:`port`, the clock trusted.
pub fn write_config(dir: &Path, pki: &Pki, port: u16, gw: &str) -> PathBuf {
    let path = dir.join("lockhub.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"{gw}\"\nstate_dir = \"{}\"\n\n[cloud]\nbrokers = [\"mqtts://localhost:{port}\"]\n\
             ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[clock]\nrequire_sync = false\n\n\
             [control]\nsocket = \"{}\"\n",
            dir.join("state").display(),
            pki.ca_cert().display(),
            pki.client_cert(gw).display(),
            pki.client_key(gw).display(),
            dir.join("control.sock").display()
        ),
    )
    .unwrap();
    path
}

/// The claim code `lockhub claim-code --config config` prints.
pub fn claim_code(config: &Path) -> String {
    let out =
        Command::new(env!("CARGO_BIN_EXE_lockhub")).args(["claim-code", "--config"]).arg(config).output().unwrap();
    assert!(out.status.success(), "lockhub claim-code: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Waits (at most `wait`) until `seen` shows gateway `gw` announce itself online.
pub async fn until_online(
    seen: &mut tokio::sync::broadcast::Receiver<lockhub::devcloud::app::Seen>,
    gw: &str,
    wait: std::time::Duration,
) {
    let status = format!("lockhub/v1/{gw}/status");
    loop {
        let m = tokio::time::timeout(wait, seen.recv()).await.expect("the daemon never came online").unwrap();
        if m.topic == status && String::from_utf8_lossy(&m.payload).contains("\"online\"") {
            return;
        }
    }
}

/// A running `lockhub run`; killed (SIGKILL) and reaped when dropped.
pub struct Daemon {
    child: Child,
}

impl Daemon {
    /// Starts `lockhub run --config config` on the D-Bus `bus`, logging warnings and errors to
    /// the test's stderr; it dies with the test process however that ends.
    pub fn spawn(config: &Path, bus: &str) -> Daemon {
        Daemon { child: Self::command(config, bus).spawn().expect("starting lockhub run") }
    }

    /// `lockhub run --config config` on `bus`, at the log level `LOCKHUB_TEST_LOG` says (warn).
    fn command(config: &Path, bus: &str) -> Command {
        let mut command = Command::new("setpriv");
        command
            .args(["--pdeathsig", "KILL", "--", env!("CARGO_BIN_EXE_lockhub"), "run", "--config"])
            .arg(config)
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus)
            .env("LOCKHUB_LOG", std::env::var("LOCKHUB_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null());
        command
    }

    /// Like [`Daemon::spawn`], its log read line by line: each line is copied to the test's
    /// stderr and sent to the returned channel, which closes when the daemon exits.
    pub fn spawn_logged(config: &Path, bus: &str) -> (Daemon, std::sync::mpsc::Receiver<String>) {
        Self::spawn_logged_with(config, bus, &[])
    }

    /// Like [`Daemon::spawn_logged`], with more in its environment (`NOTIFY_SOCKET`, say).
    pub fn spawn_logged_with(
        config: &Path,
        bus: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> (Daemon, std::sync::mpsc::Receiver<String>) {
        use std::io::BufRead;
        let mut command = Self::command(config, bus);
        command.envs(env.iter().copied());
        let mut child = command.stderr(Stdio::piped()).spawn().expect("starting lockhub run");
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("lockhub: {line}");
                let _ = tx.send(line);
            }
        });
        (Daemon { child }, rx)
    }

    /// Asks it to stop (SIGTERM) and waits for it; true when it exited with status 0.
    pub fn stop(&mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signalling lockhub run");
        self.child.wait().expect("waiting for lockhub run").success()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it with SIGKILL (no goodbye: as a power cut would) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
