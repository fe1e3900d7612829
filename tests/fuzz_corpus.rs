//! Replays every saved fuzz input (fuzz/corpus/<target>/*) through the same harness the
//! cargo-fuzz targets use, so the suite re-checks every input fuzzing ever kept, including
//! the ones that once crashed, without needing nightly or libFuzzer.

use std::path::Path;

type Harness = fn(&[u8]);

const TARGETS: &[(&str, Harness)] = &[
    ("reassembly", lockhub::fuzz_harness::reassembly),
    ("frame", lockhub::fuzz_harness::frame),
    ("message", lockhub::fuzz_harness::message),
    ("firmware_radio", lockhub::fuzz_harness::firmware_radio),
    ("firmware_requests", lockhub::fuzz_harness::firmware_requests),
    ("hub_radio", lockhub::fuzz_harness::hub_radio),
    ("mqtt_packets", lockhub::fuzz_harness::mqtt_packets),
    ("statement", lockhub::fuzz_harness::statement),
    ("config", lockhub::fuzz_harness::config),
    ("local_command", lockhub::fuzz_harness::local_command),
    ("control_request", lockhub::fuzz_harness::control_request),
];

#[test]
fn every_saved_fuzz_input_is_handled() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, harness) in TARGETS {
        let dir = root.join(target);
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            harness(&data);
            count += 1;
        }
        assert!(count > 0, "no corpus for fuzz target {target}");
    }
}
