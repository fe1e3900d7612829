//! Test support for the real D-Bus path: one private `dbus-daemon` (config in
//! `tests/dbus/bus.conf`) and one `lockhub-lock serve` per test binary, and bluer pointed at
//! them through `DBUS_SYSTEM_BUS_ADDRESS`.
//!
//! libdbus reads that variable once per process, so the bus is shared by the tests of one
//! binary; each test adds its own locks through the emulator's control interface, so tests do
//! not see each other's state. Both processes are started by a thread that lives as long as
//! the test process, under `setpriv --pdeathsig KILL`: they die with the test process, however
//! it ends. Tests that need the bus to themselves live in their own binary. The test bed's
//! directory (the bus socket, the emulated locks' flash) is in memory where the machine has
//! `/dev/shm`: see [`bed_root`].

#![allow(dead_code)]

pub mod broker;
pub mod bundled;
pub mod bus_calls;
pub mod bus_proxy;
pub mod daemon;
pub mod floor;
pub mod guest;
pub mod ha_core;
pub mod mosquitto;
pub mod nats;
pub mod small_fs;
pub mod stack;
pub mod tier;
pub mod timing_log;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use futures::StreamExt;
use lockhub::ble::bluez::BluezTransport;
pub use lockhub::firmware::bluez::control::EmulatorProxy;
use serde::Deserialize;

/// The shared bus and emulator of this test binary.
pub struct TestBed {
    /// The bus address.
    pub bus: String,
    /// The temporary directory holding the bus socket and the locks' state.
    pub dir: PathBuf,
    commands: std::sync::Mutex<std::sync::mpsc::Sender<TestBedCommand>>,
    /// The running emulator's and bus daemon's process ids (they change when restarted).
    emulator_pid: std::sync::Arc<std::sync::atomic::AtomicU32>,
    bus_pid: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

/// A process of the test bed stopped by SIGSTOP, as a hung one: its sockets take what is sent to
/// them, nothing answers. Continued when dropped, so that a failing test does not leave the
/// binary's other tests a frozen test bed.
pub struct Frozen {
    pid: nix::unistd::Pid,
}

impl Frozen {
    /// Stops the process and returns once every thread of it has stopped. `kill` returns
    /// before that: one thread is woken to take the signal and stops the others when it runs,
    /// and on a busy machine it may wait for a CPU while its siblings go on answering (a scan
    /// "while BlueZ is frozen" once found the lock). The parent is told when the whole group
    /// has stopped, and both processes are this one's children.
    fn stop(pid: &std::sync::atomic::AtomicU32, what: &str) -> Frozen {
        use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
        let raw = pid.load(std::sync::atomic::Ordering::Acquire);
        let pid = nix::unistd::Pid::from_raw(i32::try_from(raw).expect("a process id"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)
            .unwrap_or_else(|e| panic!("stopping {what}: {e}"));
        loop {
            match waitid(Id::Pid(pid), WaitPidFlag::WSTOPPED) {
                Ok(WaitStatus::Stopped(..)) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                other => panic!("waiting for {what} to stop: {other:?}"),
            }
        }
        Frozen { pid }
    }

    /// Lets the process run again; it answers what was asked of it meanwhile.
    pub fn thaw(self) {}
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGCONT);
    }
}

/// What the thread owning the processes can be asked to do.
enum TestBedCommand {
    /// Stop the emulator gracefully (it saves its locks), start it again, then answer.
    RestartEmulator(std::sync::mpsc::Sender<()>),
    /// Kill the dbus-daemon, start a new one on the same address, then restart the emulator
    /// on it (as a system's D-Bus restart takes BlueZ with it), then answer.
    RestartBus(std::sync::mpsc::Sender<()>),
}

impl TestBed {
    /// Restarts `lockhub-lock serve` on the same bus and state directory, as a lock's power
    /// cycle or a crashed org.bluez service would; returns once the new one is ready.
    pub fn restart_emulator(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.commands.lock().unwrap().send(TestBedCommand::RestartEmulator(tx)).expect("test bed thread");
        rx.recv().expect("emulator restarted");
    }

    /// Stops the emulator where it stands (SIGSTOP) until the returned guard is dropped:
    /// `org.bluez` owned on a bus that works, never answering, as a hung bluetoothd.
    pub fn freeze_emulator(&self) -> Frozen {
        Frozen::stop(&self.emulator_pid, "the emulator")
    }

    /// Stops the bus daemon where it stands (SIGSTOP) until the returned guard is dropped:
    /// connections are accepted (by the kernel) and nothing on them answered, new ones
    /// included, as a hung dbus-daemon.
    pub fn freeze_bus(&self) -> Frozen {
        Frozen::stop(&self.bus_pid, "the bus daemon")
    }

    /// Kills the bus (SIGKILL) and starts a new one on the same address, with the emulator
    /// (`org.bluez`) restarted on it; returns once both are ready. Every connection to the old
    /// bus is gone: clients must connect again.
    pub fn restart_bus(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.commands.lock().unwrap().send(TestBedCommand::RestartBus(tx)).expect("test bed thread");
        rx.recv().expect("bus restarted");
    }
}

static TEST_BED: OnceLock<TestBed> = OnceLock::new();

fn spawn_reaped(program: &str, args: &[&str], stderr: Stdio) -> std::process::Child {
    Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--", program])
        .args(args)
        .env("LOCKHUB_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e} (is dbus installed? .ci/run installs it)"))
}

fn first_line(child: &mut std::process::Child, what: &str) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("piped stdout"))
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("reading {what}'s first line: {e}"));
    assert!(!line.is_empty(), "{what} exited before it was ready");
    line.trim().to_owned()
}

/// Removes the directories of earlier test processes that are gone (a process cannot remove
/// its own: the test bed lives until the process exits).
fn sweep_stale_beds() {
    for root in [bed_root(), std::env::temp_dir()] {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("lockhub-test-")) else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !std::path::Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Where beds live: in memory (`/dev/shm`) where the machine has it. The emulated locks' flash
/// is kept there because a real lock's flash is a chip of its own: on the hub's disk, each
/// lock's save (a write, a rename and an fsync, 200 ms after a change) would compete with the
/// gateway's own durable commits, as no real lock's can. A remote unlock every 100 ms met a
/// lock's save, triggered by the command two before, at its own commit.
fn bed_root() -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() && tempfile::tempdir_in(shm).is_ok() { shm.to_path_buf() } else { std::env::temp_dir() }
}

/// Starts the bus and the emulator on first use.
pub fn test_bed() -> &'static TestBed {
    TEST_BED.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        let emulator_pid = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let bus_pid = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (running_emulator, running_bus) = (emulator_pid.clone(), bus_pid.clone());
        std::thread::Builder::new()
            .name("dbus-test-bed".into())
            .spawn(move || {
                sweep_stale_beds();
                let dir = bed_root().join(format!("lockhub-test-{}", std::process::id()));
                std::fs::create_dir_all(&dir).expect("temporary directory");
                let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dbus/bus.conf");
                let socket = dir.join("bus");
                let listen = format!("unix:path={}", socket.display());
                let start_bus = || {
                    let mut dbus = spawn_reaped(
                        "dbus-daemon",
                        &["--config-file", conf, "--address", &listen, "--nofork", "--nopidfile", "--print-address=1"],
                        // It warns that it cannot raise its fd limit when not run as a system service.
                        Stdio::null(),
                    );
                    // Without the server's guid: a restarted bus on the same socket has another.
                    let printed = first_line(&mut dbus, "dbus-daemon");
                    running_bus.store(dbus.id(), std::sync::atomic::Ordering::Release);
                    let bus = printed.split(",guid=").next().unwrap_or(&printed).to_owned();
                    (dbus, bus)
                };
                let (mut dbus, bus) = start_bus();
                let state = dir.join("locks");
                let start_emulator = || {
                    let mut emulator = spawn_reaped(
                        env!("CARGO_BIN_EXE_lockhub-lock"),
                        &[
                            "serve",
                            "--bus",
                            &bus,
                            "--state-dir",
                            state.to_str().unwrap(),
                            "--locks",
                            "0",
                            "--exit-with-stdin",
                        ],
                        Stdio::inherit(),
                    );
                    let ready = first_line(&mut emulator, "lockhub-lock");
                    assert!(ready.starts_with("READY"), "unexpected first line from lockhub-lock: {ready}");
                    // setpriv executes the emulator in its own process: the child's id is its.
                    running_emulator.store(emulator.id(), std::sync::atomic::Ordering::Release);
                    emulator
                };
                let mut emulator = start_emulator();
                let (commands, requests) = std::sync::mpsc::channel();
                tx.send((bus.clone(), dir.clone(), commands)).expect("test bed receiver");
                // This thread holds the children (and the emulator's stdin) for the life of
                // the process; the test bed's sender is never dropped, so this waits forever.
                while let Ok(command) = requests.recv() {
                    match command {
                        TestBedCommand::RestartEmulator(done) => {
                            // Closing its stdin stops it gracefully (it saves every lock).
                            drop(emulator.stdin.take());
                            let _ = emulator.wait();
                            emulator = start_emulator();
                            let _ = done.send(());
                        }
                        TestBedCommand::RestartBus(done) => {
                            drop(emulator.stdin.take());
                            let _ = dbus.kill();
                            let _ = dbus.wait();
                            let _ = emulator.wait();
                            let _ = std::fs::remove_file(&socket);
                            let (new_bus, address) = start_bus();
                            assert_eq!(address, bus, "the new bus has the old address");
                            dbus = new_bus;
                            emulator = start_emulator();
                            let _ = done.send(());
                        }
                    }
                }
                // Only if the test bed itself went away: take the processes down with it.
                for mut child in [emulator, dbus] {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            })
            .expect("test bed thread");
        let (bus, dir, commands) = rx.recv().expect("the test bed failed to start");
        // SAFETY: set once, while the test bed is being created and before any bluer session exists
        // in this process; libdbus reads it when the first session connects.
        unsafe { std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", &bus) };
        TestBed { bus, dir, commands: std::sync::Mutex::new(commands), emulator_pid, bus_pid }
    })
}

/// A connection to the test bed's bus (one per test: each test has its own runtime).
pub async fn bus() -> zbus::Connection {
    zbus::connection::Builder::address(test_bed().bus.as_str()).build().await.expect("connecting to the test bus")
}

/// The emulator's control interface.
pub async fn control() -> EmulatorProxy<'static> {
    EmulatorProxy::new(&bus().await).await.expect("emulator proxy")
}

/// What the emulator reports about a lock (the parts tests read).
#[derive(Debug, Deserialize)]
pub struct LockReport {
    pub lock_id: String,
    pub address: String,
    pub setup_code: String,
    pub connected: bool,
    pub pairing_mode: bool,
    pub status: lockhub::protocol::message::LockStatus,
}

pub async fn report(ctl: &EmulatorProxy<'_>, lock_id: &str) -> LockReport {
    serde_json::from_str(&ctl.lock_state(lock_id).await.expect("lock state")).expect("lock state JSON")
}

/// Adds a lock from a JSON spec and returns what the emulator reports about it.
pub async fn add_lock(ctl: &EmulatorProxy<'_>, spec_json: &str) -> LockReport {
    let id = ctl.add_lock(spec_json).await.expect("adding a lock");
    report(ctl, &id).await
}

/// How many connections the emulator's locks have accepted so far.
pub async fn connects(ctl: &EmulatorProxy<'_>) -> usize {
    #[derive(serde::Deserialize)]
    struct Connects {
        connects: usize,
    }
    serde_json::from_str::<Connects>(&ctl.counters().await.unwrap()).unwrap().connects
}

/// Opens the BlueZ transport (on the test bed's bus).
pub async fn transport() -> BluezTransport {
    test_bed();
    BluezTransport::open(&lockhub::ble::BleConfig::default()).await.expect("opening the BlueZ transport")
}

/// Scans until every id in `ids` has been seen (bounded: a missing lock fails the test).
pub async fn scan_until_seen(
    transport: &BluezTransport,
    ids: &[String],
) -> std::collections::BTreeMap<String, lockhub::ble::Advertisement> {
    let mut seen = std::collections::BTreeMap::new();
    let stream = transport.discover().await.expect("discovery");
    let mut stream = std::pin::pin!(stream);
    let wait = async {
        while let Some(ad) = stream.next().await {
            let id = ids.iter().find(|id| ad.is_of(lockhub::protocol::ids::LockId::parse(id).unwrap())).cloned();
            if let Some(id) = id {
                seen.insert(id, ad);
                if seen.len() == ids.len() {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), wait).await.expect("locks not seen within 60 s");
    seen
}

/// Scans until `lock` is seen, pairs with its setup code, and returns a client for it.
pub async fn paired_client(
    transport: std::sync::Arc<BluezTransport>,
    lock: &LockReport,
    config: lockhub::ble::BleConfig,
    budget: lockhub::ble::budget::ConnectionBudget,
    gateway: &str,
) -> lockhub::ble::client::LockClient<BluezTransport> {
    use lockhub::protocol::ids::{GatewayId, LockId};
    scan_until_seen(&transport, std::slice::from_ref(&lock.lock_id)).await;
    let gateway = GatewayId::new(gateway).expect("valid gateway id");
    let lock_id = LockId::parse(&lock.lock_id).expect("valid lock id");
    let code = lockhub::protocol::pairing::SetupCode::parse(&lock.setup_code).expect("valid setup code");
    let key = lockhub::ble::client::pair(&*transport, &budget, &config, &gateway, lock_id, &lock.address, &code)
        .await
        .expect("pairing");
    let radios = lockhub::ble::radios::Radios::single("hci0", transport, budget);
    lockhub::ble::client::LockClient::new(radios, 0, config, gateway, lock_id, lock.address.clone(), key)
}

/// Runs `command` with its standard output a pipe whose reader has already gone (`… | head
/// -0`) and asserts that it ends as a C tool would: successfully and silently, with no panic
/// over the closed pipe.
pub fn assert_quiet_with_reader_gone(command: &mut Command) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = command.stdout(writer).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.is_empty(), "{command:?} with its reader gone: {}: {err}", out.status);
}
