//! Delta snapshots in the head: adding one to the chain over the snapshot
//! (retiring the deltas it absorbed), and telling whether a pending one
//! still fits the chain.

use crate::catalog::{DeltaEntry, Head, Retired};

/// Puts `d` into `h`'s chain: it replaces every delta after its base (which
/// it absorbed) and retires them. A delta whose base is no longer in the
/// chain (a newer snapshot, or another publisher's chain) is left out.
pub(super) fn add_delta(h: &mut Head, d: DeltaEntry, now: u64) {
    let Some(keep) = chain_position(h, &d) else {
        return;
    };
    if h.deltas.iter().any(|x| x.key == d.key) {
        return;
    }
    for old in h.deltas.drain(keep..) {
        h.retired.push(Retired {
            key: old.key,
            since_ms: now,
        });
    }
    h.deltas.push(d);
}

/// Deltas of `h` kept under `d`: the chain's position where `d`'s base ends.
fn chain_position(h: &Head, d: &DeltaEntry) -> Option<usize> {
    let snap = h.snapshot.as_ref()?;
    if d.base_lsn == snap.lsn {
        return Some(0);
    }
    h.deltas
        .iter()
        .position(|x| x.lsn == d.base_lsn)
        .map(|i| i + 1)
}

/// Whether a pending delta `d` can still be committed over `h` (its base is
/// in the chain, it reaches past the chain's end, and `h` does not name it).
pub(super) fn still_applies(h: &Head, d: &DeltaEntry) -> bool {
    chain_position(h, d).is_some()
        && !h.deltas.iter().any(|x| x.key == d.key)
        && h.delta_lsn().is_some_and(|end| d.lsn > end)
}
