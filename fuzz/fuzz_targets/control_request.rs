//! Fuzz target: see `lockhub::fuzz_harness::control_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lockhub::fuzz_harness::control_request(data));
