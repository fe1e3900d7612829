//! Start-up time of `lockhub run`: from the process's spawn to its `READY=1` on the notify
//! socket (as systemd sees it), with its store, BlueZ on the test bus and the bundled broker in
//! place. Printed beside the floor measured in the same run: spawning `lockhub --version`
//! until it exits (exec, dynamic linking, Rust's start-up).
//!
//! Run: `cargo bench --bench daemon_start` (needs dbus-daemon; `.ci/run` installs it).

#[path = "../tests/support/mod.rs"]
mod support;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lockhub::devcloud::pki::Pki;
use support::floor::percentiles;

const GW: &str = "gw-start";
const RUNS: usize = 30;

fn main() {
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let bed = support::test_bed();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), &[GW]).unwrap();
    let broker = support::bundled::Bundled::start(&pki);
    let config = dir.path().join("lockhub.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"{GW}\"\nstate_dir = \"{}\"\n\n[cloud]\nbrokers = [\"mqtts://localhost:{}\"]\n\
             ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[clock]\nrequire_sync = false\n\n\
             [control]\nsocket = \"{}\"\n",
            dir.path().join("state").display(),
            broker.port,
            pki.ca_cert().display(),
            pki.client_cert(GW).display(),
            pki.client_key(GW).display(),
            dir.path().join("control.sock").display()
        ),
    )
    .unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(30))).unwrap();

    let mut floor = Vec::with_capacity(RUNS);
    let mut ready = Vec::with_capacity(RUNS);
    for run in 0..=RUNS {
        let started = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_lockhub")).arg("--version").output().unwrap();
        assert!(out.status.success());
        let version = started.elapsed();

        let started = Instant::now();
        let mut daemon = Command::new(env!("CARGO_BIN_EXE_lockhub"))
            .args(["run", "--config"])
            .arg(&config)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &bed.bus)
            .env("LOCKHUB_LOG", "error")
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 4096];
        loop {
            let n = notify.recv(&mut buf).expect("no READY=1 within 30 s");
            if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "READY=1") {
                break;
            }
        }
        let took = started.elapsed();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .unwrap();
        assert!(daemon.wait().unwrap().success());
        // The first run creates the store and the gateway's identity; it is reported apart.
        if run == 0 {
            println!("first start (creates the store): spawn → READY {took:.2?}");
        } else {
            floor.push(version);
            ready.push(took);
        }
    }
    println!("start-up, spawn → READY=1 ({RUNS} runs): {}", percentiles(ready));
    println!("floor, spawn → exit of `lockhub --version`: {}", percentiles(floor));
}
