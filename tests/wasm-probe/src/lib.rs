//! Probe module for `scripts/check-wasm.sh`: exports a few C-ABI functions that
//! call into `walcast-core`, so building this crate for `wasm32-unknown-unknown`
//! links real core code and the check can inspect the module's imports.
//!
//! Protocol from the host: `p = walcast_probe_alloc(n)`, write `n` bytes at `p`
//! in the exported memory, then `walcast_probe_run(p, n)`.
#![allow(unsafe_code)]

/// Allocates `len` zeroed bytes in linear memory and returns their address.
/// The buffer is leaked on purpose: the probe is short-lived.
#[no_mangle]
pub extern "C" fn walcast_probe_alloc(len: u32) -> *mut u8 {
    Box::leak(vec![0u8; len as usize].into_boxed_slice()).as_mut_ptr()
}

/// Runs core code over the `len` bytes at `ptr` and returns a 32-bit digest.
///
/// # Safety
/// `ptr` must point to `len` readable bytes (e.g. from [`walcast_probe_alloc`]),
/// or `len` must be 0.
#[no_mangle]
pub unsafe extern "C" fn walcast_probe_run(ptr: *const u8, len: u32) -> u32 {
    let input: &[u8] = if len == 0 || ptr.is_null() {
        &[]
    } else {
        // SAFETY: guaranteed by the caller (see `# Safety`).
        unsafe { std::slice::from_raw_parts(ptr, len as usize) }
    };
    // PROBE: replace with real core calls (decode a frame, replay, catalog JSON...).
    walcast_core::x();
    // PROBE: CRC32 of the input, the same crate the core frames with.
    crc32fast::hash(input)
}
