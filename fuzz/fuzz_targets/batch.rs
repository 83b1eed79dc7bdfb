//! Fuzz target: `walcast_core::fuzzing::batch`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| walcast_core::fuzzing::batch(data));
