//! The `lockhub` binary as an operator runs it: `check-config` and its errors, `claim-code`,
//! and `run` as a process on the test bus and the bundled broker — online, claimed and
//! commanded through the cloud, `offline` after SIGTERM; its log quiet through a lock's life;
//! its control socket out of descriptors.

mod support;

use support::daemon::write_config;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use lockhub::auth::statement::{Operation, Statement};
use lockhub::cloud::reply::Outcome;
use lockhub::devcloud::app::{AppClient, AppKey};
use lockhub::devcloud::pki::Pki;
use lockhub::protocol::ids::GatewayId;
use lockhub::store::unix_now;

const WAIT: Duration = Duration::from_secs(60);

fn lockhub(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lockhub")).args(args).output().unwrap()
}

/// Runs `lockhub check-config` on `config` after `edit` changed its text (and `prepare` the
/// files around it); returns stderr, asserting failure.
fn broken(config: &Path, edit: impl Fn(&str) -> String) -> String {
    let good = std::fs::read_to_string(config).unwrap();
    std::fs::write(config, edit(&good)).unwrap();
    let out = lockhub(&["check-config", "--config", config.to_str().unwrap()]);
    std::fs::write(config, good).unwrap();
    assert!(!out.status.success(), "a broken configuration passed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stderr).unwrap()
}

/// Every command that prints, its reader gone before the first byte (`lockhub man | head -0`):
/// a quiet, successful end, not "failed printing to stdout" and exit 101; a failing command
/// with nobody reading its errors, a plain failure; output to a full device, an error.
#[test]
fn every_printing_command_ends_quietly_when_its_reader_has_gone() {
    crate::needs!(Mosquitto, Root);
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    let pki = Pki::init(&pki_dir, &["gw-pipe"]).unwrap();
    let config = write_config(dir.path(), &pki, 8883, "gw-pipe");
    let config = config.to_str().unwrap();
    let pki_dir = pki_dir.to_str().unwrap();
    let code = dir.path().join("code");
    std::fs::write(&code, "2468\n").unwrap();
    for args in [
        &["check-config", "--config", config][..],
        &["claim-code", "--config", config],
        &["completions", "bash"],
        &["man"],
    ] {
        support::assert_quiet_with_reader_gone(Command::new(env!("CARGO_BIN_EXE_lockhub")).args(args));
    }
    support::assert_quiet_with_reader_gone(
        Command::new(env!("CARGO_BIN_EXE_lockhub")).arg("hash-code").stdin(std::fs::File::open(&code).unwrap()),
    );
    let new_pki = dir.path().join("pki-2");
    for args in [
        &["pki", "init", "--dir", new_pki.to_str().unwrap(), "--gateway", "gw-a"][..],
        &["pki", "issue", "--dir", pki_dir, "gw-b"],
        &["mosquitto-config", "--pki", pki_dir],
        &["mosquitto-config", "--pki", pki_dir, "--acl"],
    ] {
        support::assert_quiet_with_reader_gone(Command::new(env!("CARGO_BIN_EXE_lockhub-cloud")).args(args));
    }
    // A command that fails, with nobody reading its standard error either (`… 2>&1 | head
    // -0`): its status says it failed (1), not that it panicked over the pipe (101).
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let status = Command::new(env!("CARGO_BIN_EXE_lockhub"))
        .args(["check-config", "--config", "/nonexistent/lockhub.toml"])
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1), "{status}");
    // A reader that is there but cannot take it (`> /dev/full`): an error that says so.
    let out = Command::new(env!("CARGO_BIN_EXE_lockhub"))
        .args(["check-config", "--config", config])
        .stdout(std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && err.starts_with("Error: writing to standard output: No space left on device"),
        "{}: {err}",
        out.status
    );
}

/// The daemon reads `RUST_LOG` as well as `LOCKHUB_LOG` (which wins), and says which one it
/// could not use rather than dropping it in silence.
#[test]
fn the_log_level_comes_from_lockhub_log_or_rust_log_and_a_bad_one_is_named() {
    let run = |vars: &[(&str, &str)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_lockhub"));
        command.args(["run", "--config", "/nonexistent/lockhub.toml"]).env_remove("LOCKHUB_LOG").env_remove("RUST_LOG");
        command.envs(vars.iter().copied());
        String::from_utf8_lossy(&command.output().unwrap().stderr).into_owned()
    };
    let said = run(&[("RUST_LOG", "lockhub=loud")]);
    assert!(said.contains("RUST_LOG is not a log directive"), "{said}");
    let said = run(&[("RUST_LOG", "debug"), ("LOCKHUB_LOG", "lockhub=\x1b[2J")]);
    assert!(said.contains("LOCKHUB_LOG is not a log directive") && !said.contains('\x1b'), "{said}");
    assert!(!run(&[("RUST_LOG", "debug")]).contains("not a log directive"));
}

#[test]
fn check_config_says_where_what_and_how_to_fix_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), &["gw-cfg"]).unwrap();
    let config = write_config(dir.path(), &pki, 8883, "gw-cfg");
    let path = config.to_str().unwrap();
    let out = lockhub(&["check-config", "--config", path]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{path}: ok (gateway gw-cfg, 1 broker(s))\n"));

    // 1. An unknown key: where, and which keys would be right.
    let err = broken(&config, |t| t.replace("require_sync", "require_synced"));
    assert!(err.contains("lockhub.toml:12:1: unknown field `require_synced`, expected `require_sync`"), "{err}");
    // 2. A value of the wrong type: where, and what type is wanted.
    let err = broken(&config, |t| t.replace("require_sync = false", "require_sync = \"no\""));
    assert!(err.contains("lockhub.toml:12:16: invalid type: string \"no\", expected a boolean"), "{err}");
    // 3. A certificate that is not there.
    let err = broken(&config, |t| t.replace("gw-cfg.pem", "gw-missing.pem"));
    assert!(
        err.contains("cloud.cert = ")
            && err.contains("gw-missing.pem: no such file: fix the path, or put the file there"),
        "{err}"
    );
    // 4. A private key other users can read.
    let key = pki.client_key("gw-cfg");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = broken(&config, |t| t.to_owned());
    // The daemon refuses it too, with EX_CONFIG, which the unit does not restart on.
    let out = lockhub(&["run", "--config", path]);
    assert_eq!(out.status.code(), Some(78), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("other users can read this private key"));
    assert!(
        err.contains("cloud.key = ")
            && err.contains(
                "other users can read this private key (mode 0644): chmod 0640 it, owned by root and group lockhub"
            ),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // 5. A broker URL without TLS.
    let err = broken(&config, |t| t.replace("mqtts://localhost:8883", "mqtt://localhost:1883"));
    assert!(
        err.contains(
            "cloud.brokers: broker URL \"mqtt://localhost:1883\": expected mqtts://host[:port] (TLS is required)"
        ),
        "{err}"
    );
    // The local broker's password, readable by others.
    let password = dir.path().join("local.password");
    std::fs::write(&password, "secret\n").unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).unwrap();
    let local = format!(
        "\n[local.mqtt]\nhost = \"localhost\"\nusername = \"hub\"\npassword_file = \"{}\"\n",
        password.display()
    );
    let err = broken(&config, |t| format!("{t}{local}"));
    assert!(err.contains("local.mqtt.password_file = ") && err.contains("other users can read this password"), "{err}");
    // No file at all.
    let out = lockhub(&["check-config", "--config", "/nonexistent/lockhub.toml"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("/nonexistent/lockhub.toml"));
    // Paths that name no configuration: a device that never ends (its size says 0), refused at
    // the bound rather than read until memory runs out; a directory, said once.
    let stderr = |args: &[&str]| {
        let out = lockhub(args);
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    assert_eq!(
        stderr(&["check-config", "--config", "/dev/zero"]),
        "Error: /dev/zero: more than 65536 bytes, which no configuration needs: is this the right file?\n"
    );
    let here = dir.path().to_str().unwrap();
    assert_eq!(stderr(&["check-config", "--config", here]), format!("Error: {here}: Is a directory (os error 21)\n"));
    // A state directory that is a file: said so, at the first command that opens the store.
    let good = std::fs::read_to_string(&config).unwrap();
    let state = dir.path().join("state").display().to_string();
    std::fs::write(&config, good.replace(&state, "/dev/null")).unwrap();
    assert_eq!(
        stderr(&["claim-code", "--config", path]),
        "Error: gateway.state_dir = /dev/null: not a directory: point it at a directory (the package's is \
         /var/lib/lockhub)\n"
    );
    std::fs::write(&config, good).unwrap();
    // A certificate path naming that device.
    let cert = pki.client_cert("gw-cfg");
    let err = broken(&config, |t| t.replace(cert.to_str().unwrap(), "/dev/zero"));
    assert!(err.contains("more than 65536 bytes: not a certificate or key file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_is_claimed_through_the_cloud_and_stops_cleanly() {
    crate::needs!(Dbus, Root);
    let bed = support::test_bed();
    let dir = tempfile::tempdir().unwrap();
    let gw = "gw-daemon";
    let pki = Pki::init(&dir.path().join("pki"), &[gw]).unwrap();
    let broker = support::bundled::Bundled::start(&pki);
    let config = write_config(dir.path(), &pki, broker.port, gw);
    let app = AppClient::connect(&format!("mqtts://localhost:{}", broker.port), &pki, &GatewayId::new(gw).unwrap())
        .await
        .unwrap();
    let mut seen = app.watch();
    let mut daemon = Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--", env!("CARGO_BIN_EXE_lockhub"), "run", "--config"])
        .arg(&config)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bed.bus)
        .env("LOCKHUB_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let status_topic = format!("lockhub/v1/{gw}/status");
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), seen.recv())
            .await
            .expect("the daemon never came online")
            .unwrap();
        if msg.topic == status_topic && String::from_utf8_lossy(&msg.payload).contains("\"online\"") {
            break;
        }
    }
    // The claim code from the CLI, while the daemon runs (the store is shared safely).
    let out = lockhub(&["claim-code", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let code = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(code.len(), 11, "{code}");
    let owner = AppKey::generate(&dir.path().join("keys"), "owner", false).unwrap();
    let now = unix_now();
    let claim = lockhub::devcloud::app::claim(&GatewayId::new(gw).unwrap(), &code, now);
    let reply = app.send(&claim, &owner, WAIT).await.unwrap();
    assert_eq!(reply.result, Outcome::Ok, "{reply:?}");

    // The doctor finds everything in order.
    let doctor = |bus: String| {
        let config = config.clone();
        let socket = dir.path().join("control.sock");
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_lockhub"))
                .args(["doctor", "--config"])
                .arg(&config)
                .arg("--socket")
                .arg(&socket)
                .env("DBUS_SYSTEM_BUS_ADDRESS", bus)
                .output()
                .unwrap()
        })
    };
    let out = doctor(bed.bus.clone()).await.unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{report}{}", String::from_utf8_lossy(&out.stderr));
    for check in [
        "configuration",
        "gateway certificate",
        "cloud CA",
        "clock",
        "file modes",
        "bluetooth",
        "broker",
        "database",
        "daemon",
    ] {
        assert!(report.lines().any(|l| l.starts_with("ok") && l.contains(check)), "{check}: {report}");
    }
    assert!(report.contains("reachable, TLS with the pinned CA"), "{report}");
    // The store's log is checkpointed beside the statements, by the daemon's checkpointer:
    // the database file changes while they come in, long before the log could reach the
    // bound at which a commit checkpoints by itself (16,384 pages; a refused statement
    // writes about ten).
    let database = dir.path().join("state").join("lockhub.db");
    let before = std::fs::read(&database).unwrap();
    let stranger = AppKey::generate(&dir.path().join("keys"), "stranger", false).unwrap();
    let nowhere = lockhub::protocol::ids::LockId([0x5a; 8]);
    let mut statements = 0;
    while std::fs::read(&database).unwrap() == before {
        statements += 1;
        assert!(statements <= 400, "400 statements and the log was never checkpointed");
        let command =
            lockhub::devcloud::app::command(&GatewayId::new(gw).unwrap(), nowhere, Operation::Unlock, unix_now(), 30);
        let reply = app.send(&Statement::Command(command), &stranger, WAIT).await.unwrap();
        assert_eq!(reply.result, Outcome::Refused, "{reply:?}");
    }

    // A flood of garbage beyond the audit budget is counted, not recorded one by one; with no
    // record after it to go before, the count is written as the daemon stops. (The claim's
    // bytes again are a redelivery, answered from the store without a record, after the
    // flood: the intake takes them in order.)
    use lockhub::store::audit_budget::{BURST, SUMMARY_ACTION};
    for i in 0..BURST + 5 {
        app.publish_text(format!("garbage {i}")).await.unwrap();
    }
    assert_eq!(app.send(&claim, &owner, WAIT).await.unwrap().result, Outcome::Ok);

    // Online, claimed, its control socket up: still no port open to the network.
    let open = open_ports(daemon.id());
    assert!(open.is_empty(), "the daemon has ports open: {open:?}");
    // The same check does see a listener: the broker's.
    let broker_port = format!(":{:04X}", broker.port);
    assert!(open_ports(broker.pid()).iter().any(|p| p.ends_with(&broker_port)), "{:?}", open_ports(broker.pid()));

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), seen.recv()).await.expect("no offline status").unwrap();
        if msg.topic == status_topic && String::from_utf8_lossy(&msg.payload).contains("\"offline\"") {
            break;
        }
    }
    let exit = tokio::task::spawn_blocking(move || daemon.wait().unwrap()).await.unwrap();
    assert!(exit.success(), "the daemon exited with {exit}");
    let out = lockhub(&["claim-code", "--config", config.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("already claimed"));
    let store = lockhub::store::Store::open(lockhub::store::StoreConfig {
        credentials_dir: None,
        ..lockhub::store::StoreConfig::in_dir(&dir.path().join("state"))
    })
    .unwrap();
    let records = store.audit_records(0, 10_000).unwrap();
    let last = records.last().unwrap();
    assert_eq!(last.action, SUMMARY_ACTION, "the count was not written at the stop: {last:?}");
    assert!(last.detail.contains("malformed"), "{}", last.detail);
    drop(store);
    // With the daemon stopped and BlueZ out of reach, the doctor says so, with fixes.
    let out = doctor("unix:path=/nonexistent/bus".into()).await.unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "{report}");
    assert!(report.contains("FAIL  daemon") && report.contains("is the daemon running?"), "{report}");
    assert!(report.contains("FAIL  bluetooth") && report.contains("fix: systemctl status bluetooth"), "{report}");
}

/// The process's sockets that accept from the network: TCP in LISTEN state, and UDP sockets
/// bound to a port with no peer. Read from its fd table and its network namespace's tables.
fn open_ports(pid: u32) -> Vec<String> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    assert!(!inodes.is_empty(), "the daemon holds no socket at all: the check would prove nothing");
    let mut open = Vec::new();
    for table in ["tcp", "tcp6", "udp", "udp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state, inode) = (f[1], f[2], f[3], f[9]);
            let accepts = if table.starts_with("tcp") {
                state == "0A"
            } else {
                !local.ends_with(":0000") && remote.trim_start_matches(['0', ':']).is_empty()
            };
            if accepts && inodes.contains(inode) {
                open.push(format!("{table} {local}"));
            }
        }
    }
    open
}

/// A stand-in for systemd's notify socket: what the daemon tells the service manager, line by
/// line.
fn notify_socket(dir: &Path) -> (std::path::PathBuf, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let path = dir.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            for line in String::from_utf8_lossy(&buf[..n]).lines() {
                if tx.send(line.to_owned()).is_err() {
                    return;
                }
            }
        }
    });
    (path, rx)
}

/// A stand-in for journald's native socket: each datagram is one entry, its fields parsed
/// from the journal's native protocol (`KEY=value` lines, or a key, a 64-bit little-endian
/// length and the value when the value holds a newline).
fn journal_socket(dir: &Path) -> (std::path::PathBuf, std::sync::mpsc::Receiver<HashMap<String, String>>) {
    let journal_dir = dir.join("journal");
    std::fs::create_dir(&journal_dir).unwrap();
    let socket = std::os::unix::net::UnixDatagram::bind(journal_dir.join("socket")).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = socket.recv(&mut buf) {
            let mut entry = HashMap::new();
            let mut rest = &buf[..n];
            while let Some(end) = rest.iter().position(|b| *b == b'\n') {
                let line = &rest[..end];
                if let Some(eq) = line.iter().position(|b| *b == b'=') {
                    entry.insert(
                        String::from_utf8_lossy(&line[..eq]).into_owned(),
                        String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
                    );
                    rest = &rest[end + 1..];
                } else {
                    let len = u64::from_le_bytes(rest[end + 1..end + 9].try_into().unwrap()) as usize;
                    let value = &rest[end + 9..end + 9 + len];
                    entry.insert(
                        String::from_utf8_lossy(line).into_owned(),
                        String::from_utf8_lossy(value).into_owned(),
                    );
                    rest = &rest[end + 9 + len + 1..];
                }
            }
            if tx.send(entry).is_err() {
                return;
            }
        }
    });
    (journal_dir, rx)
}

/// Waits for a notification matching `want`; returns it.
async fn notified(notes: &mut tokio::sync::mpsc::UnboundedReceiver<String>, want: impl Fn(&str) -> bool) -> String {
    let mut other = Vec::new();
    loop {
        let Ok(note) = tokio::time::timeout(Duration::from_secs(60), notes.recv()).await else {
            panic!("not the notification awaited within a minute; others: {other:?}");
        };
        let note = note.expect("notify socket closed");
        if want(&note) {
            return note;
        }
        other.push(note);
    }
}

/// Waits until the daemon has said READY and a STATUS saying the cloud is connected, in either
/// order: the first STATUS comes just before READY, and says connected when the cloud link
/// was up by then. Returns that STATUS.
async fn ready_and_connected(notes: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    let (mut ready, mut connected) = (false, None);
    while !ready || connected.is_none() {
        let note =
            notified(notes, |n| n == "READY=1" || (n.starts_with("STATUS=") && n.contains("cloud connected"))).await;
        if note == "READY=1" {
            ready = true;
        } else {
            connected = Some(note);
        }
    }
    connected.unwrap_or_default()
}

fn signal(child: &std::process::Child, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_it_notifies_reloads_on_sighup_and_finishes_its_command_on_sigterm() {
    crate::needs!(Dbus, Root);
    use lockhub::auth::statement::Operation;
    use lockhub::devcloud::app::{command, pair, remote_unlock};
    use lockhub::protocol::ids::LockId;
    use lockhub::protocol::message::LockState;
    use nix::sys::signal::Signal;

    let bed = support::test_bed();
    let dir = tempfile::tempdir().unwrap();
    let gw = "gw-notify";
    let gw_id = GatewayId::new(gw).unwrap();
    let pki = Pki::init(&dir.path().join("pki"), &[gw]).unwrap();
    let broker = support::bundled::Bundled::start(&pki);
    let config = write_config(dir.path(), &pki, broker.port, gw);
    let (notify_path, mut notes) = notify_socket(dir.path());
    let app = AppClient::connect(&format!("mqtts://localhost:{}", broker.port), &pki, &gw_id).await.unwrap();
    let mut seen = app.watch();
    // As systemd starts it: WATCHDOG_PID is the daemon's own pid (unshare and the shell exec
    // into it), stderr is a stream whose device and inode JOURNAL_STREAM names, and the
    // journal's socket is at /run/systemd/journal/socket — in a mount namespace of its own, the
    // test's socket mounted there.
    let (journal_dir, journal) = journal_socket(dir.path());
    let (mut stderr, stderr_writer) = std::io::pipe().unwrap();
    let stream = {
        use std::os::unix::fs::MetadataExt;
        let fd = std::os::fd::OwnedFd::from(stderr_writer.try_clone().unwrap());
        let meta = std::fs::File::from(fd).metadata().unwrap();
        format!("{}:{}", meta.dev(), meta.ino())
    };
    let mut daemon = Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(
            r#"mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && mount --bind "$1" /run/systemd/journal \
               && shift && export WATCHDOG_PID=$$ && exec "$@""#,
        )
        .arg("sh")
        .arg(&journal_dir)
        .args(["setpriv", "--pdeathsig", "KILL", "--", env!("CARGO_BIN_EXE_lockhub"), "run", "--config"])
        .arg(&config)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bed.bus)
        .env("LOCKHUB_LOG", "info")
        .env("NOTIFY_SOCKET", &notify_path)
        // A 200 ms watchdog: pings every 100 ms.
        .env("WATCHDOG_USEC", "200000")
        .env("JOURNAL_STREAM", &stream)
        .stdin(Stdio::null())
        .stderr(stderr_writer)
        .spawn()
        .unwrap();

    // Ready, with a health line, and pinging the watchdog.
    let status = ready_and_connected(&mut notes).await;
    assert!(status.contains("0 lock(s) paired") && status.contains("not claimed yet (lockhub claim-code)"), "{status}");
    notified(&mut notes, |n| n == "WATCHDOG=1").await;
    notified(&mut notes, |n| n == "WATCHDOG=1").await;

    // Claimed, with a lock whose motor takes 2 s, remote unlock on.
    let out = lockhub(&["claim-code", "--config", config.to_str().unwrap()]);
    let code = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let owner = AppKey::generate(&dir.path().join("keys"), "owner", false).unwrap();
    let now = unix_now();
    let ok = |r: lockhub::cloud::reply::Reply| assert_eq!(r.result, Outcome::Ok, "{r:?}");
    ok(app.send(&lockhub::devcloud::app::claim(&gw_id, &code, now), &owner, WAIT).await.unwrap());
    let ctl = support::control().await;
    let lock = support::add_lock(&ctl, r#"{"motor_ms": 2000}"#).await;
    let lock_id = LockId::parse(&lock.lock_id).unwrap();
    ok(app.send(&pair(&gw_id, lock_id, &lock.setup_code, now), &owner, WAIT).await.unwrap());
    ok(app.send(&remote_unlock(&gw_id, lock_id, true, now), &owner, WAIT).await.unwrap());
    notified(&mut notes, |n| n.starts_with("STATUS=") && n.contains("1 lock(s) paired") && !n.contains("not claimed"))
        .await;
    let cmd = |op| Statement::Command(command(&gw_id, lock_id, op, unix_now(), 30));
    ok(app.send(&cmd(Operation::Unlock), &owner, WAIT).await.unwrap());

    // SIGHUP with a stricter rate limit: applied at once; a changed keep-alive (the cloud
    // link's) is named as needing a restart.
    let original = std::fs::read_to_string(&config).unwrap();
    let stricter = original.replace("[clock]", "keep_alive_s = 45\n\n[clock]");
    std::fs::write(&config, format!("{stricter}\n[policy]\nrate_commands = 1\n")).unwrap();
    signal(&daemon, Signal::SIGHUP);
    notified(&mut notes, |n| n == "RELOADING=1").await;
    notified(&mut notes, |n| n == "READY=1").await;
    let reply = app.send(&cmd(Operation::Lock), &owner, WAIT).await.unwrap();
    assert_eq!((reply.result, reply.reason.map(|r| r.as_str())), (Outcome::Refused, Some("rate_limited")), "{reply:?}");
    // A broken file is refused and the running configuration kept.
    std::fs::write(&config, format!("{original}\n[policy]\nrate_commands = \"many\"\n")).unwrap();
    signal(&daemon, Signal::SIGHUP);
    notified(&mut notes, |n| n == "RELOADING=1").await;
    notified(&mut notes, |n| n == "READY=1").await;
    let reply = app.send(&cmd(Operation::Lock), &owner, WAIT).await.unwrap();
    assert_eq!(reply.reason.map(|r| r.as_str()), Some("rate_limited"), "{reply:?}");
    // And back.
    std::fs::write(&config, &original).unwrap();
    signal(&daemon, Signal::SIGHUP);
    notified(&mut notes, |n| n == "RELOADING=1").await;
    notified(&mut notes, |n| n == "READY=1").await;

    // SIGTERM while the lock's motor turns: the command finishes and its reply goes out.
    let lock_command = cmd(Operation::Lock);
    let sending = app.send(&lock_command, &owner, WAIT);
    let stopping = async {
        loop {
            match support::report(&ctl, &lock.lock_id).await.status.state {
                LockState::Locking => break,
                LockState::Locked => panic!("the command ended before SIGTERM could be sent during it"),
                _ => tokio::task::yield_now().await,
            }
        }
        signal(&daemon, Signal::SIGTERM);
    };
    let (reply, ()) = tokio::join!(sending, stopping);
    ok(reply.unwrap());
    notified(&mut notes, |n| n == "STOPPING=1").await;
    let exit = tokio::task::spawn_blocking(move || daemon.wait().unwrap()).await.unwrap();
    assert!(exit.success(), "the daemon exited with {exit}");
    assert_eq!(support::report(&ctl, &lock.lock_id).await.status.state, LockState::Locked);

    // The logs went to the journal, with structured fields, and nothing to stderr.
    let entries: Vec<HashMap<String, String>> = journal.try_iter().collect();
    let decided = entries
        .iter()
        .find(|e| e.get("MESSAGE").is_some_and(|m| m == "statement decided") && e.contains_key("LOCK_ID"))
        .unwrap_or_else(|| panic!("no decision with a lock in the journal: {entries:#?}"));
    assert_eq!(decided["LOCK_ID"], lock.lock_id);
    assert_eq!(decided["DECISION"], "ok");
    assert!(!decided["COMMAND_ID"].is_empty());
    assert_eq!(decided["SYSLOG_IDENTIFIER"], "lockhub");
    assert_eq!(decided["PRIORITY"], "5", "info is the journal's notice");
    let restart =
        entries.iter().find(|e| e.get("MESSAGE").is_some_and(|m| m.contains("takes effect at the next restart")));
    assert_eq!(restart.map(|e| e["KEY"].as_str()), Some("cloud"), "{entries:#?}");
    let refused = entries.iter().find(|e| e.get("REASON").is_some_and(|r| r == "rate_limited"));
    assert_eq!(refused.map(|e| e["DECISION"].as_str()), Some("refused"), "{entries:#?}");
    // The pairing is logged; no health line after it counts the lock away, not even while
    // stopping, when the locks' tasks end first.
    let paired = entries
        .iter()
        .position(|e| e.get("MESSAGE").is_some_and(|m| m == "lock paired"))
        .unwrap_or_else(|| panic!("the pairing is not in the journal: {entries:#?}"));
    assert_eq!(entries[paired]["LOCK_ID"], lock.lock_id);
    let health: Vec<&str> = entries[paired..]
        .iter()
        .filter(|e| e.get("MESSAGE").is_some_and(|m| m == "health"))
        .map(|e| e["STATUS"].as_str())
        .collect();
    assert!(!health.is_empty() && health.iter().all(|s| s.contains("1 lock(s) paired")), "{health:#?}");
    let mut written = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut written).unwrap();
    assert_eq!(written, "", "logged to stderr too");

    // Reloads dropped no link: the gateway said `online` once, and `offline` only at the end.
    let status_topic = format!("lockhub/v1/{gw}/status");
    let mut statuses = Vec::new();
    while let Ok(msg) = seen.try_recv() {
        if msg.topic == status_topic {
            statuses.push(String::from_utf8_lossy(&msg.payload).contains("\"online\""));
        }
    }
    assert_eq!(statuses.first(), Some(&true), "{statuses:?}");
    assert_eq!(statuses.iter().filter(|online| **online).count(), 1, "reconnected: {statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_without_any_privilege() {
    crate::needs!(Dbus, Root);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // What the unit gives it: an unprivileged user, no capabilities at all (bounding set
    // included), no new privileges, umask 0077. Here the user is `nobody`.
    let bed = support::test_bed();
    let dir = tempfile::tempdir().unwrap();
    let gw = "gw-nobody";
    let pki = Pki::init(&dir.path().join("pki"), &[gw]).unwrap();
    let broker = support::bundled::Bundled::start(&pki);
    let config = write_config(dir.path(), &pki, broker.port, gw);
    let (notify_path, mut notes) = notify_socket(dir.path());
    let nobody = |p: &Path| {
        Command::new("chown").arg("-R").arg("nobody:nogroup").arg(p).status().unwrap().success().then_some(()).unwrap()
    };
    nobody(dir.path());
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut daemon = Command::new("sh")
        .args(["-c", r#"umask 0077 && exec "$@""#, "sh", "setpriv", "--pdeathsig", "KILL"])
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .args(["--no-new-privs", "--", env!("CARGO_BIN_EXE_lockhub"), "run", "--config"])
        .arg(&config)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bed.bus)
        .env("LOCKHUB_LOG", "warn")
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    ready_and_connected(&mut notes).await;
    let capabilities = std::fs::read_to_string(format!("/proc/{}/status", daemon.id())).unwrap();
    for line in capabilities.lines().filter(|l| l.starts_with("Cap")) {
        assert!(line.ends_with("0000000000000000"), "a capability is left: {line}");
    }
    signal(&daemon, nix::sys::signal::Signal::SIGTERM);
    let exit = tokio::task::spawn_blocking(move || daemon.wait().unwrap()).await.unwrap();
    assert!(exit.success(), "the daemon exited with {exit}");
    // Everything it wrote is its own, and nobody else's to read.
    for entry in std::fs::read_dir(dir.path().join("state")).unwrap() {
        let meta = entry.unwrap().metadata().unwrap();
        assert_eq!(meta.mode() & 0o077, 0, "readable by others: mode {:o}", meta.mode());
    }
}

/// Out of descriptors, the control socket's `accept` fails for as long as they stay taken: the
/// daemon pauses accepting (a warning at most every 100 ms, not a loop turning as fast as it
/// fails) and serves again as soon as descriptors are free. The daemon's limit is lowered
/// from outside (`prlimit --pid`) once it runs, to leave it three descriptors. (Its log, on a
/// pipe here, is plain text: no colour codes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_control_socket_pauses_and_then_serves_again() {
    crate::needs!(Dbus);
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    const WARNING: &str = "control socket: accept failed";
    let bed = support::test_bed();
    let dir = tempfile::tempdir().unwrap();
    let gw = "gw-descriptors";
    let pki = Pki::init(&dir.path().join("pki"), &[gw]).unwrap();
    let broker = support::bundled::Bundled::start(&pki);
    let config = write_config(dir.path(), &pki, broker.port, gw);
    let (notify_path, mut notes) = notify_socket(dir.path());
    let (mut daemon, log) =
        support::daemon::Daemon::spawn_logged_with(&config, &bed.bus, &[("NOTIFY_SOCKET", notify_path.as_os_str())]);
    let is_warning = |line: &str| {
        assert!(!line.contains('\u{1b}'), "colour codes in a log that is not a terminal: {line:?}");
        line.contains(WARNING)
    };
    ready_and_connected(&mut notes).await;
    let socket = dir.path().join("control.sock");
    let status = |socket: std::path::PathBuf| -> String {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    };
    assert!(status(socket.clone()).contains(gw), "the control socket does not serve to begin with");

    // The lowest limit that leaves three descriptor numbers free.
    let taken: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    let limit = (0..).filter(|n| !taken.contains(n)).nth(3).unwrap();
    let started = std::time::Instant::now();
    let lowered =
        Command::new("prlimit").arg("--pid").arg(daemon.pid().to_string()).arg(format!("--nofile={limit}:")).status();
    assert!(lowered.unwrap().success(), "prlimit failed");
    let silent: Vec<UnixStream> = (0..8).map(|_| UnixStream::connect(&socket).unwrap()).collect();
    // Failing, and failing again after its pause: it neither spins nor gives up.
    let mut count = 0;
    while count < 2 {
        count += usize::from(is_warning(&log.recv_timeout(WAIT).expect("no accept failed while out of descriptors")));
    }
    drop(silent);
    let answer = tokio::task::spawn_blocking(move || status(socket)).await.unwrap();
    assert!(answer.contains(gw), "not served once descriptors were free: {answer}");

    let stopped = tokio::task::spawn_blocking(move || daemon.stop()).await.unwrap();
    let elapsed = started.elapsed();
    assert!(stopped, "the daemon did not exit with 0");
    // The channel closes once the log's reader has read it to its end.
    count += log.iter().filter(|line| is_warning(line)).count();
    let most = usize::try_from(elapsed.as_millis() / 100 + 1).unwrap();
    assert!(count <= most, "{count} accept failures logged in {elapsed:?}: at most {most} with a 100 ms pause");
}

/// A lock's whole life through the daemon — paired, granted, unlocked by a user, turned by
/// hand, unbound through the control socket — and the daemon stopped: its log holds no
/// warning and no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_paired_used_and_unbound_leaves_no_warning_in_the_log() {
    crate::needs!(Dbus);
    use lockhub::auth::statement::Permission;
    use lockhub::devcloud::app::{claim, command, grant, pair, remote_unlock};
    use lockhub::protocol::ids::LockId;
    use support::daemon::{Daemon, claim_code, until_online};
    let bed = support::test_bed();
    let dir = tempfile::tempdir().unwrap();
    let name = "gw-clean-log";
    let gw = GatewayId::new(name).unwrap();
    let pki = Pki::init(&dir.path().join("pki"), &[name]).unwrap();
    let broker = support::bundled::Bundled::start(&pki);
    let config = write_config(dir.path(), &pki, broker.port, name);
    // The admin group exists here (else the daemon warns that only root may use the socket).
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}group = \"root\"\n")).unwrap();
    let app = AppClient::connect(&format!("mqtts://localhost:{}", broker.port), &pki, &gw).await.unwrap();
    let mut seen = app.watch();
    let (mut daemon, log) = Daemon::spawn_logged(&config, &bed.bus);
    until_online(&mut seen, name, WAIT).await;

    let keys = dir.path().join("keys");
    let (owner, user) =
        (AppKey::generate(&keys, "owner", false).unwrap(), AppKey::generate(&keys, "user", false).unwrap());
    let ok = |reply: lockhub::cloud::reply::Reply| assert_eq!(reply.result, Outcome::Ok, "{reply:?}");
    ok(app.send(&claim(&gw, &claim_code(&config), unix_now()), &owner, WAIT).await.unwrap());
    let ctl = support::control().await;
    let lock = support::add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    let lock_id = LockId::parse(&lock.lock_id).unwrap();
    ok(app.send(&pair(&gw, lock_id, &lock.setup_code, unix_now()), &owner, WAIT).await.unwrap());
    ok(app.send(&remote_unlock(&gw, lock_id, true, unix_now()), &owner, WAIT).await.unwrap());
    let granted = grant(&gw, user.public(), lock_id, vec![Permission::Unlock, Permission::Remote], None, 1, unix_now());
    ok(app.send(&Statement::Grant(granted), &owner, WAIT).await.unwrap());
    let unlock = command(&gw, lock_id, Operation::Unlock, unix_now(), 30);
    ok(app.send(&Statement::Command(unlock), &user, WAIT).await.unwrap());
    ctl.turn_knob(&lock.lock_id).await.unwrap();
    let events = format!("lockhub/v1/{name}/events");
    loop {
        let m = tokio::time::timeout(WAIT, seen.recv()).await.expect("the thumb-turn never reached the cloud").unwrap();
        if m.topic == events && String::from_utf8_lossy(&m.payload).contains("\"manual\"") {
            break;
        }
    }

    let socket = dir.path().join("control.sock");
    let args = ["unbind", &lock.lock_id, "--yes", "--socket", socket.to_str().unwrap()];
    let out = lockhub(&args);
    assert!(out.status.success(), "unbind: {}", String::from_utf8_lossy(&out.stderr));
    assert!(tokio::task::spawn_blocking(move || daemon.stop()).await.unwrap(), "the daemon did not exit cleanly");
    let lines: Vec<String> = log.iter().collect();
    let loud: Vec<&String> = lines.iter().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).collect();
    assert!(loud.is_empty(), "the daemon's log: {loud:#?}");
}
