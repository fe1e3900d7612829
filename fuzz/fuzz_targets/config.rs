//! Fuzz target: see `lockhub::fuzz_harness::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lockhub::fuzz_harness::config(data));
