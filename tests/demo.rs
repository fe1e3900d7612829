//! The README's first command, `lockhub demo`, run as a user would: it must exit 0 and show
//! each step of the story with its outcome.

#[test]
fn the_demo_runs_the_whole_story_and_exits_0() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lockhub"))
        .arg("demo")
        .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
        .output()
        .expect("running lockhub demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
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
}
