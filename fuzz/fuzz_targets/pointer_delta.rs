//! Fuzz target: `walcast_core::fuzzing::pointer_delta`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| walcast_core::fuzzing::pointer_delta(data));
