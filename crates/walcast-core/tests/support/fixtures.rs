//! Deterministic objects built with the real encoders, shared by the golden
//! test and the fuzz seed generator.

#![allow(dead_code)]

use walcast_core::batch::{self, Op};
use walcast_core::catalog::{
    page_key, snapshot_key, DatasetId, Head, Page, PageRef, Retired, SegmentEntry, SnapshotEntry,
    FORMAT,
};
use walcast_core::segment::{SegmentBuilder, SegmentSummary};
use walcast_core::snapshot;
use walcast_core::state::KvState;

/// The golden delta snapshot: puts and deletions of the golden state's
/// keys and a few more, after LSN 60 up to the golden segment's last LSN.
pub(crate) fn golden_delta() -> Vec<u8> {
    use walcast_core::snapshot::delta::{encode_delta, DeltaMeta};
    let changes: Vec<(&[u8], Option<&[u8]>)> = vec![
        (b"alpha", Some(b"one")),
        (b"beta", None),
        (b"delta", Some(b"four")),
        (b"zeta", None),
    ];
    encode_delta(
        changes.into_iter(),
        DeltaMeta {
            base_lsn: 60,
            lsn: LAST_LSN,
            epoch: EPOCH,
            dataset_id: DATASET,
        },
        32,
    )
}

/// The golden pointer delta (version 5): the keys the golden segment's
/// records 120..=139 write, each pointing at the last of them that does,
/// after LSN 119; slot pages of 256 bytes, data blocks of about 48.
pub(crate) fn golden_pointer_delta() -> Vec<u8> {
    use std::collections::BTreeMap;
    use walcast_core::snapshot::pointer::{encode_pointer_delta, Pointer, PointerMeta};
    let mut last: BTreeMap<Vec<u8>, Pointer> = BTreeMap::new();
    let mut offset = walcast_core::segment::HEADER_LEN;
    for lsn in FIRST_LSN..=LAST_LSN {
        let payload = batch::encode(&batch_for(lsn)).expect("fixture batch encodes");
        let p = Pointer {
            lsn,
            epoch: EPOCH,
            first: FIRST_LSN,
            last: LAST_LSN,
            offset,
            len: payload.len() as u32,
        };
        offset += walcast_core::segment::RECORD_HEADER_LEN + payload.len() as u64;
        if lsn < 120 {
            continue;
        }
        for op in batch_for(lsn) {
            let k = match op {
                Op::Put { key, .. } | Op::Delete { key } => key,
            };
            last.insert(k, p);
        }
    }
    encode_pointer_delta(
        last.iter().map(|(k, p)| (k.as_slice(), *p)),
        PointerMeta {
            base_lsn: 119,
            lsn: LAST_LSN,
            epoch: EPOCH,
            dataset_id: DATASET,
        },
        256,
        48,
    )
    .expect("the golden pointer delta encodes")
}

/// Dataset id of every fixture.
pub(crate) const DATASET: DatasetId = DatasetId([0x11; 16]);
/// Epoch of the golden segment, snapshot and head.
pub(crate) const EPOCH: u64 = 7;
/// First LSN of the golden segment.
pub(crate) const FIRST_LSN: u64 = 100;
/// Records in the golden segment.
pub(crate) const RECORDS: u64 = 40;
/// Last LSN of the golden segment, and LSN of the golden snapshot.
pub(crate) const LAST_LSN: u64 = FIRST_LSN + RECORDS - 1;

/// The golden KV batch: puts, deletes, binary keys and an empty value.
pub(crate) fn golden_batch() -> Vec<Op> {
    vec![
        Op::put(b"alpha".to_vec(), b"one".to_vec()),
        Op::put(vec![0x00, 0xff, 0x80, 0x0a], vec![0xde, 0xad, 0xbe, 0xef]),
        Op::delete(b"beta".to_vec()),
        Op::put(b"empty".to_vec(), Vec::new()),
        Op::put(
            vec![0x7f; 130],
            b"a key whose length needs a two-byte varint".to_vec(),
        ),
        Op::delete(vec![0xfe, 0x00]),
    ]
}

/// The batch carried by the record at `lsn` in fixture segments.
pub(crate) fn batch_for(lsn: u64) -> Vec<Op> {
    let mut ops = vec![Op::put(
        format!("key/{:03}", lsn % 23).into_bytes(),
        format!("v{lsn}").into_bytes(),
    )];
    if lsn % 3 == 0 {
        ops.push(Op::delete(
            format!("key/{:03}", lsn.wrapping_mul(7) % 23).into_bytes(),
        ));
    }
    if lsn % 5 == 0 {
        ops.push(Op::put(vec![0x00, lsn.to_le_bytes()[0], 0xff], Vec::new()));
    }
    if lsn == FIRST_LSN {
        ops = golden_batch();
    }
    ops
}

/// Builds a segment of `first..=last` with the fixture batches.
pub(crate) fn build_segment(
    epoch: u64,
    first: u64,
    last: u64,
    index_interval: u64,
) -> (Vec<u8>, SegmentSummary) {
    let mut b = SegmentBuilder::with_index_interval(epoch, first, index_interval);
    for lsn in first..=last {
        let payload = batch::encode(&batch_for(lsn)).expect("fixture batch encodes");
        assert!(b.push(&payload));
    }
    b.finish().expect("fixture segment has records")
}

/// The golden segment: epoch 7, LSNs 100..=139, index every 256 bytes.
pub(crate) fn golden_segment() -> (Vec<u8>, SegmentSummary) {
    build_segment(EPOCH, FIRST_LSN, LAST_LSN, 256)
}

/// The state after applying the fixture batches of `first..=last`.
pub(crate) fn state_through(first: u64, last: u64) -> KvState {
    let mut s = KvState::new();
    for lsn in first..=last {
        let payload = batch::encode(&batch_for(lsn)).expect("fixture batch encodes");
        s.apply(batch::Batch::parse(&payload).expect("fixture batch decodes"));
    }
    s
}

/// The golden snapshot state: the golden segment's batches applied in order.
pub(crate) fn golden_state() -> KvState {
    state_through(FIRST_LSN, LAST_LSN)
}

/// The golden snapshot: LSN 139, epoch 7, chunks of about 128 bytes.
pub(crate) fn golden_snapshot() -> Vec<u8> {
    snapshot::encode_with_chunk_bytes(&golden_state(), LAST_LSN, EPOCH, DATASET, 128)
}

/// The golden block-indexed snapshot (version 2): the golden state at LSN
/// 139, blocks of about 96 bytes, index blocks of about 64 bytes (two levels).
pub(crate) fn golden_indexed_snapshot() -> Vec<u8> {
    snapshot::indexed::encode_indexed(
        &golden_state(),
        LAST_LSN,
        EPOCH,
        DATASET,
        snapshot::indexed::IndexedOptions {
            block_bytes: 96,
            index_block_bytes: 64,
        },
    )
}

/// The golden verified snapshot (version 4): the same state and block sizes
/// as [`golden_indexed_snapshot`], with handles carrying SHA-256 digests.
pub(crate) fn golden_verified_snapshot() -> Vec<u8> {
    snapshot::indexed::encode_verified(
        &golden_state(),
        LAST_LSN,
        EPOCH,
        DATASET,
        snapshot::indexed::IndexedOptions {
            block_bytes: 96,
            index_block_bytes: 64,
        },
    )
}

/// The golden level-0 page: two older segments covering LSNs 1..=99.
pub(crate) fn golden_page() -> Page {
    let (_, a) = build_segment(6, 1, 49, 512);
    let (_, b) = build_segment(6, 50, 99, 512);
    Page {
        format: FORMAT,
        level: 0,
        segments: vec![
            SegmentEntry::from_summary(&a),
            SegmentEntry::from_summary(&b),
        ],
        pages: Vec::new(),
        digests: Default::default(),
    }
}

/// The reference the golden head holds for [`golden_page`].
pub(crate) fn golden_page_ref(page_bytes: &[u8]) -> PageRef {
    PageRef {
        key: page_key(0, 1, FIRST_LSN - 1, EPOCH),
        level: 0,
        first_lsn: 1,
        last_lsn: FIRST_LSN - 1,
        count: 2,
        crc32: crc32fast::hash(page_bytes),
    }
}

/// The golden head: the golden page, segment and snapshot, one retired object.
pub(crate) fn golden_head() -> Head {
    let (_, summary) = golden_segment();
    let snap = golden_snapshot();
    let page = golden_page().encode();
    Head {
        format: FORMAT,
        dataset_id: DATASET,
        epoch: EPOCH,
        generation: 42,
        committed_lsn: LAST_LSN,
        earliest_lsn: 1,
        writer: "5f0c2a9e8b7d6c41".into(),
        committed_at_ms: 1_795_000_000_000,
        snapshot: Some(SnapshotEntry {
            key: snapshot_key(LAST_LSN, EPOCH),
            lsn: LAST_LSN,
            epoch: EPOCH,
            size: snap.len() as u64,
            crc32: crc32fast::hash(&snap),
            entries: golden_state().len(),
            version: 1,
            suffix: None,
            footer_crc32: None,
        }),
        segments: vec![SegmentEntry::from_summary(&summary)],
        pages: vec![golden_page_ref(&page)],
        retired: vec![Retired {
            key: snapshot_key(60, 6),
            since_ms: 1_794_999_990_000,
        }],
        tail: Vec::new(),
        deltas: Vec::new(),
        trust: None,
    }
}
