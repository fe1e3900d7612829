//! The bundled broker for tests: `lockhub-cloud serve` (the real binary) with the development
//! PKI and an event sink in a temporary directory, under `setpriv --pdeathsig KILL`, killed on
//! drop. `restart` kills it with SIGKILL and starts it again on the same port and data.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use lockhub::devcloud::pki::Pki;
use lockhub::devcloud::sink::EventSink;

/// A running `lockhub-cloud serve`.
pub struct Bundled {
    child: Child,
    pki: PathBuf,
    data: PathBuf,
    _temp: Option<tempfile::TempDir>,
    /// Its TLS port on 127.0.0.1.
    pub port: u16,
}

impl Drop for Bundled {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Bundled {
    /// Starts the broker on a free port.
    pub fn start(pki: &Pki) -> Self {
        let temp = tempfile::tempdir().unwrap();
        let mut broker = Self::start_in(pki, temp.path());
        broker._temp = Some(temp);
        broker
    }

    /// Starts the broker on a free port, with its data (the event sink) in `data`.
    pub fn start_in(pki: &Pki, data: &std::path::Path) -> Self {
        let pki = pki.dir().to_owned();
        let (child, port) = Self::spawn(&pki, data, 0);
        Bundled { child, pki, data: data.to_owned(), _temp: None, port }
    }

    /// Starts the broker on `port`, with its data in a temporary directory.
    pub fn start_on(pki: &Pki, port: u16) -> Self {
        let temp = tempfile::tempdir().unwrap();
        let (child, port) = Self::spawn(pki.dir(), temp.path(), port);
        Bundled { child, pki: pki.dir().to_owned(), data: temp.path().to_owned(), _temp: Some(temp), port }
    }

    /// Kills the broker (SIGKILL: no goodbye, nothing saved beyond what is on disk) and starts
    /// it again on the same port; returns once it accepts clients.
    pub fn restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let (child, _) = Self::spawn(&self.pki, &self.data, self.port);
        self.child = child;
    }

    /// Kills the broker (SIGKILL) and reaps it: its port refuses connections from now on.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The event sink's database (readable while the broker runs).
    pub fn events(&self) -> EventSink {
        EventSink::open(&self.data.join("events.db")).unwrap()
    }

    fn spawn(pki: &std::path::Path, data: &std::path::Path, port: u16) -> (Child, u16) {
        let mut child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", env!("CARGO_BIN_EXE_lockhub-cloud"), "serve", "--pki"])
            .arg(pki)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data")
            .arg(data)
            .env("RUST_LOG", std::env::var("BROKER_LOG").unwrap_or("error".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting lockhub-cloud serve");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = lines.next().expect("lockhub-cloud serve exited before listening").unwrap();
        let port = line
            .strip_prefix("listening on ")
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .unwrap_or_else(|| panic!("unexpected first line from lockhub-cloud serve: {line}"))
            .port();
        std::thread::spawn(move || for _ in lines {});
        (child, port)
    }
}
