//! Fuzz target: see `lockhub::fuzz_harness::local_command`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lockhub::fuzz_harness::local_command(data));
