//! One summary of the test tiers this machine skips, and how to enable each: the tests that
//! need a tier return at once where it is missing (`support::tier`), and this says so once,
//! in the output of `cargo test`. Under `LOCKHUB_TEST_ALL=1` (`.ci/run`) a missing tier fails.

mod support;

use support::tier::{ALL, all_required};

fn main() {
    let skipped: Vec<String> = ALL
        .iter()
        .filter_map(|t| t.missing().map(|lacks| format!("{} (lacks {lacks}: {})", t.name(), t.enable())))
        .collect();
    if skipped.is_empty() {
        println!("test tiers: all {} run on this machine", ALL.len());
        return;
    }
    println!(
        "test tiers skipped on this machine, their tests passing without running: {}. LOCKHUB_TEST_ALL=1 makes a skip a failure.",
        skipped.join("; ")
    );
    if all_required() {
        eprintln!("LOCKHUB_TEST_ALL=1: every tier must run");
        std::process::exit(1);
    }
}
