//! Fuzz target: `walcast_core::fuzzing::page`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| walcast_core::fuzzing::page(data));
