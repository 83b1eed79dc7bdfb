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
    probe(input).unwrap_or(0)
}

/// Exercises the core end to end: batch codec, segment seal and verify, KV
/// state, snapshot round trip, catalog head, and both state machines.
/// Returns the CRC-32 of the input (read back through the whole pipeline).
fn probe(input: &[u8]) -> Option<u32> {
    use walcast_core::batch::{self, Op};
    use walcast_core::catalog::{DatasetId, Head, SegmentEntry};
    use walcast_core::publisher::{Publisher, PublisherConfig};
    use walcast_core::replica::{Replica, ReplicaConfig};
    use walcast_core::segment::{self, SegmentBuilder};
    use walcast_core::snapshot;
    use walcast_core::state::KvState;

    let payload = batch::encode(&[
        Op::put(b"k".to_vec(), input.to_vec()),
        Op::delete(b"gone".to_vec()),
    ])
    .ok()?;
    let mut b = SegmentBuilder::new(1, 1);
    if !b.push(&payload) {
        return None;
    }
    let (bytes, summary) = b.finish()?;
    let seg = segment::decode(&bytes, Some(summary.crc32)).ok()?;
    let mut state = KvState::new();
    for rec in seg.records() {
        state.apply(batch::Batch::parse(rec.ok()?.payload).ok()?);
    }
    let id = DatasetId::from_seed(7);
    let snap = snapshot::encode(&state, 1, 1, id);
    let (_, restored) = snapshot::decode(&snap, None).ok()?;
    let mut head = Head::new(id, 1);
    head.committed_lsn = 1;
    head.segments.push(SegmentEntry::from_summary(&summary));
    let head = Head::decode(&head.encode()).ok()?;
    let mut replica = Replica::new(ReplicaConfig::default(), 1);
    let _ = replica.poll(0);
    let mut publisher = Publisher::new(PublisherConfig::default(), 1);
    let _ = publisher.poll(0);
    let value = restored.get(b"k")?;
    Some(crc32fast::hash(value) ^ (head.committed_lsn as u32 - 1))
}
