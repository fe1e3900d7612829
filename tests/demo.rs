//! The README's first command, `lockhub demo`, run as a user would: it must exit 0 and show
//! each step of the story with its outcome, with Debian's dbus-daemon and without it, and from
//! a temporary directory whose path a D-Bus address cannot carry.

mod support;

use std::os::unix::fs::PermissionsExt;

/// And it ends with its last line: every part of the hub stops within its bound, none waited
/// out (a lock's task kept alive by a handle the story still held took 5 s once).
#[test]
fn the_demo_runs_the_whole_story_and_exits_0() {
    crate::needs!(Dbus);
    let mut demo = std::process::Command::new(env!("CARGO_BIN_EXE_lockhub"));
    demo.arg("demo").env_remove("DBUS_SYSTEM_BUS_ADDRESS").env("LOCKHUB_LOG", "error,lockhub::hub=warn");
    let (stdout, stderr) = the_whole_story_told(demo);
    assert!(stdout.contains("bus      dbus-daemon"), "on Debian's dbus-daemon where it is installed:\n{stdout}");
    assert!(!stderr.contains("stopping without"), "a part of the hub was waited out:\n{stderr}");
}

/// On a machine without dbus-daemon (here: a PATH where no program is found), the demo says so
/// and runs the same story on a bus inside its own process.
#[test]
fn without_dbus_daemon_the_demo_says_so_and_runs_on_an_embedded_bus() {
    let empty = tempfile::tempdir().unwrap();
    let mut demo = std::process::Command::new(env!("CARGO_BIN_EXE_lockhub"));
    demo.arg("demo").env_remove("DBUS_SYSTEM_BUS_ADDRESS").env("PATH", empty.path());
    let stdout = the_whole_story(demo);
    assert!(stdout.contains("dbus-daemon is not installed here"), "it says so:\n{stdout}");
    assert!(stdout.contains("bus      busd, inside this process"), "{stdout}");
}

/// A dbus-daemon that cannot start (one that exits at once, one that never says it is ready) is
/// said so, and the demo runs on the embedded bus rather than stopping or waiting for ever.
#[test]
fn a_dbus_daemon_that_fails_to_start_leaves_the_demo_on_the_embedded_bus() {
    for (script, why) in [
        ("echo 'cannot start' >&2\nexit 1", "dbus-daemon exited before it was ready"),
        ("exec sleep 3600", "dbus-daemon did not say it was ready within 5s"),
    ] {
        let bin = tempfile::tempdir().unwrap();
        let broken = bin.path().join("dbus-daemon");
        std::fs::write(&broken, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut demo = std::process::Command::new(env!("CARGO_BIN_EXE_lockhub"));
        // `sleep` from the system's directories; no dbus-daemon is found before this one.
        let path = format!("{}:/usr/bin:/bin", bin.path().display());
        demo.arg("demo").env_remove("DBUS_SYSTEM_BUS_ADDRESS").env("PATH", path);
        let stdout = the_whole_story(demo);
        assert!(stdout.contains(&format!("dbus-daemon did not start ({why})")), "it says so:\n{stdout}");
        assert!(stdout.contains("bus      busd, inside this process"), "{stdout}");
    }
}

/// A temporary directory the private bus cannot listen in — a space and a comma in its name,
/// which a D-Bus address must escape and zbus does not unescape — is said so, and the demo
/// runs its story in /tmp instead of failing with a bus error.
#[test]
fn a_temporary_directory_the_bus_cannot_use_leaves_the_demo_in_tmp() {
    let odd = tempfile::tempdir().unwrap();
    let tmp = odd.path().join("my files, odd");
    std::fs::create_dir(&tmp).unwrap();
    let mut demo = std::process::Command::new(env!("CARGO_BIN_EXE_lockhub"));
    demo.arg("demo").env_remove("DBUS_SYSTEM_BUS_ADDRESS").env("TMPDIR", &tmp);
    let stdout = the_whole_story(demo);
    assert!(stdout.contains("its path holds ' '") && stdout.contains("using /tmp instead"), "it says so:\n{stdout}");
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "the demo wrote in the directory it said it would not use");
}

/// Its reader gone at once (`lockhub demo | head -0`): the story runs on to its end, cleans
/// up and exits 0, without a panic over the closed pipe.
#[test]
fn with_its_reader_gone_the_demo_still_ends_cleanly() {
    support::assert_quiet_with_reader_gone(
        std::process::Command::new(env!("CARGO_BIN_EXE_lockhub")).arg("demo").env_remove("DBUS_SYSTEM_BUS_ADDRESS"),
    );
}

/// Its output going to a device that takes nothing (`lockhub demo > /dev/full`): the demo
/// fails saying why, rather than ignoring the lost transcript, and leaves nothing behind.
#[test]
fn with_its_output_lost_the_demo_fails_saying_why() {
    let demo = std::process::Command::new(env!("CARGO_BIN_EXE_lockhub"))
        .arg("demo")
        .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
        .stdout(std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let scratch = std::env::temp_dir().join(format!("lockhub-demo-{}", demo.id()));
    let out = demo.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && err.starts_with("Error: writing to standard output: No space left on device"),
        "{}: {err}",
        out.status
    );
    assert!(!scratch.exists(), "{} left behind", scratch.display());
}

/// Runs `demo`, checks that it exits 0 having told every step of the story with its latency,
/// and returns what it printed.
fn the_whole_story(demo: std::process::Command) -> String {
    the_whole_story_told(demo).0
}

/// [`the_whole_story`], with what the demo wrote on standard error.
fn the_whole_story_told(mut demo: std::process::Command) -> (String, String) {
    let out = demo.output().expect("running lockhub demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for expected in [
        "owner claims the gateway with the code",
        "ok (paired)",
        "refused: remote_disabled",
        "ok (unlocked)",
        "event: unlocked by keypad",
        "stored reply: not run again",
        "refused: replayed",
        "refused: expired",
        "refused: unknown_key",
        "records, intact",
    ] {
        assert!(stdout.contains(expected), "the transcript lacks {expected:?}:\n{stdout}");
    }
    // Every step prints its latency.
    let steps = stdout.lines().filter(|l| l.trim_end().ends_with(" ms")).count();
    assert!(steps >= 15, "{steps} timed steps:\n{stdout}");
    (stdout, stderr)
}
