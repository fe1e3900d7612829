//! Fuzz target: see `lockhub::fuzz_harness::firmware_requests`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lockhub::fuzz_harness::firmware_requests(data));
