//! Fuzz target: `walcast_core::fuzzing::snapshot`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| walcast_core::fuzzing::snapshot(data));
