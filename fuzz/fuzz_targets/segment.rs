//! Fuzz target: `walcast_core::fuzzing::segment`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| walcast_core::fuzzing::segment(data));
