//! Writing a block-indexed snapshot (version 2, or 4 with each block's
//! SHA-256 in its handle): data blocks, the partitioned index, the footer.

use super::*;

/// Encodes `state` as a block-indexed snapshot at `lsn` (version 2).
pub fn encode_indexed(
    state: &KvState,
    lsn: u64,
    epoch: u64,
    dataset_id: DatasetId,
    opts: IndexedOptions,
) -> Vec<u8> {
    encode_blocks(state, lsn, epoch, dataset_id, opts, false).0
}

/// Encodes `state` as a version 4 snapshot at `lsn`: version 2 whose
/// handles carry each block's SHA-256, so a reader holding the
/// [`index_digest`] from a signed head verifies every block it fetches.
pub fn encode_verified(
    state: &KvState,
    lsn: u64,
    epoch: u64,
    dataset_id: DatasetId,
    opts: IndexedOptions,
) -> Vec<u8> {
    encode_blocks(state, lsn, epoch, dataset_id, opts, true).0
}

/// [`encode_indexed`] (`digests` false) or [`encode_verified`] (true), or
/// `None` when one of its blocks would decode to more than readers take
/// ([`crate::snapshot::block::decoded_limit`]: keys of kilobytes that share most of
/// their bytes, by the million); the writer then writes version 1.
pub fn encode_readable(
    state: &KvState,
    lsn: u64,
    epoch: u64,
    dataset_id: DatasetId,
    opts: IndexedOptions,
    digests: bool,
) -> Option<Vec<u8>> {
    let (bytes, too_wide) = encode_blocks(state, lsn, epoch, dataset_id, opts, digests);
    (!too_wide).then_some(bytes)
}

fn encode_blocks(
    state: &KvState,
    lsn: u64,
    epoch: u64,
    dataset_id: DatasetId,
    opts: IndexedOptions,
    digests: bool,
) -> (Vec<u8>, bool) {
    let version = if digests {
        VERSION_VERIFIED
    } else {
        VERSION_INDEXED
    };
    let mut out = crate::snapshot::encode_header(version, lsn, epoch, dataset_id, state.len());
    // Data blocks, remembering (first key, handle and digest) of each.
    type Named = (Vec<u8>, BlockHandle, Option<[u8; 32]>);
    let mut index: Vec<Named> = Vec::new();
    let mut b = BlockBuilder::new();
    let flush = |b: &mut BlockBuilder, out: &mut Vec<u8>, index: &mut Vec<Named>| {
        if b.count() == 0 {
            return;
        }
        let first = b.first_key().to_vec();
        let (bytes, crc) = b.finish();
        let h = BlockHandle {
            offset: out.len() as u64,
            len: bytes.len() as u32,
            crc,
        };
        let d = digests.then(|| sha256(&bytes));
        out.extend_from_slice(&bytes);
        index.push((first, h, d));
    };
    let mut entries = state.iter();
    while let Some((k, v)) = entries.next_entry() {
        if !b.fits(k.len(), v.len()) {
            flush(&mut b, &mut out, &mut index);
        }
        b.push(k, v);
        if b.size() >= opts.block_bytes {
            flush(&mut b, &mut out, &mut index);
        }
    }
    flush(&mut b, &mut out, &mut index);
    let index_offset = out.len() as u64;
    let data_blocks = index.len() as u32;
    // One index block if it fits, else index blocks under a top index.
    let mut level: Vec<Named> = Vec::new();
    let mut ib = BlockBuilder::new();
    for (k, h, d) in &index {
        ib.push(k, &encode_handle(h, d.as_ref()));
        if ib.size() >= opts.index_block_bytes {
            flush(&mut ib, &mut out, &mut level);
        }
    }
    let (top, levels) = if level.is_empty() {
        // Everything fits in one block: it is the top index.
        let mut top = Vec::new();
        flush(&mut ib, &mut out, &mut top);
        (top.pop().map(|(_, h, d)| (h, d)), 1u8)
    } else {
        flush(&mut ib, &mut out, &mut level);
        for (k, h, d) in &level {
            ib.push(k, &encode_handle(h, d.as_ref()));
        }
        let mut top = Vec::new();
        flush(&mut ib, &mut out, &mut top);
        (top.pop().map(|(_, h, d)| (h, d)), 2u8)
    };
    // An empty state has one index block with no entries: the footer
    // always names a block.
    let (top, top_sha256) = top.unwrap_or_else(|| {
        let (bytes, crc) = BlockBuilder::new().finish();
        let h = BlockHandle {
            offset: out.len() as u64,
            len: bytes.len() as u32,
            crc,
        };
        let d = digests.then(|| sha256(&bytes));
        out.extend_from_slice(&bytes);
        (h, d)
    });
    let footer = Footer {
        index_offset,
        top,
        entry_count: state.len(),
        data_blocks,
        levels,
        top_sha256,
    };
    out.extend_from_slice(&footer.encode());
    (out, b.too_wide() || ib.too_wide())
}
