//! Decoders allocate no more than the bytes they verified justify, whatever
//! the counts those bytes claim: measured with a counting allocator (this
//! test binary's own).

use std::alloc::System;

use cap::Cap;
use walcast_core::snapshot::block::{
    decoded_limit, Block, BlockHandle, BLOCK_HEADER_LEN, RESTART_INTERVAL,
};

#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

/// Bytes allocated at the peak of `f`, above what was held before it.
/// (One test in this binary: nothing else allocates meanwhile.)
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOC.allocated();
    let out = f();
    (out, ALLOC.max_allocated().saturating_sub(before))
}

/// A 32 MiB block whose checksum holds and whose header claims some 11
/// million entries (as many as three bytes each allow), the restart table
/// to match, and entries that fail at the second: the decoder reserves no
/// more than the block may decode to, not an entry slot per claimed entry.
#[test]
fn a_block_claiming_millions_of_entries_reserves_within_its_decoded_bound() {
    let total: usize = 32 << 20;
    let count = (total / 3) as u32;
    let nrestarts = (count as usize).div_ceil(RESTART_INTERVAL);
    let body_len = total - BLOCK_HEADER_LEN as usize;
    let mut bytes = vec![0u8; total];
    let end = total - 4;
    bytes[end..].copy_from_slice(&(nrestarts as u32).to_le_bytes());
    bytes[..4].copy_from_slice(&(body_len as u32).to_le_bytes());
    bytes[4..8].copy_from_slice(&count.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..8]);
    h.update(&bytes[BLOCK_HEADER_LEN as usize..]);
    let crc = h.finalize();
    bytes[8..12].copy_from_slice(&crc.to_le_bytes());
    let handle = BlockHandle {
        offset: 0,
        len: total as u32,
        crc,
    };
    let (r, peak) = peak_of(|| Block::decode(&bytes, &handle, "snapshot data block"));
    let err = r.expect_err("entries that do not ascend").to_string();
    assert!(err.contains("snapshot data block"), "{err}");
    // The bound, and room for the error's message.
    let bound = decoded_limit(total as u64) as usize + 4096;
    assert!(
        peak <= bound,
        "decoding reserved {peak} bytes, above the block's decoded bound {bound}"
    );
}
