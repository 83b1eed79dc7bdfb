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
/// (One test in this binary, so nothing else allocates meanwhile; its
/// checks run from the smallest peak up, as the peak only grows.)
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOC.allocated();
    let out = f();
    (out, ALLOC.max_allocated().saturating_sub(before))
}

/// A batch of 4 million deletes of the empty key (2 bytes each, the
/// smallest op): checked and applied without a vector of its ops, which
/// took 16 bytes an op in wasm and 32 natively (eight and sixteen times the
/// record).
fn a_batch_of_tiny_ops_is_applied_without_a_vector_of_them() {
    let count: u64 = 4 << 20;
    let mut payload = vec![walcast_core::batch::VERSION];
    let mut n = count;
    while n >= 0x80 {
        payload.push((n as u8) | 0x80);
        n >>= 7;
    }
    payload.push(n as u8);
    for _ in 0..count {
        payload.extend_from_slice(&[2, 0]);
    }
    let mut state = walcast_core::state::KvState::new();
    state.apply([walcast_core::batch::OpRef::Put(b"", b"x")]);
    let (r, peak) = peak_of(|| {
        let b = walcast_core::batch::Batch::parse(&payload).expect("a valid batch");
        state.apply(b);
        b.len()
    });
    assert_eq!(r as u64, count);
    assert_eq!(state.get(b""), None, "the deletes were applied");
    assert!(
        peak <= 64 << 10,
        "applying a {}-byte batch allocated {peak} bytes",
        payload.len()
    );
}

/// A 32 MiB block whose checksum holds and whose header claims some 11
/// million entries (as many as three bytes each allow), the restart table
/// to match, and entries that fail at the second: the decoder reserves no
/// more than the block may decode to, not an entry slot per claimed entry.
#[test]
fn decoders_allocate_within_what_their_bytes_justify() {
    a_batch_of_tiny_ops_is_applied_without_a_vector_of_them();
    a_block_claiming_millions_of_entries_reserves_within_its_decoded_bound();
}

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
