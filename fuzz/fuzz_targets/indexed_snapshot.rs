//! Fuzz target: `walcast_core::fuzzing::indexed_snapshot`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| walcast_core::fuzzing::indexed_snapshot(data));
