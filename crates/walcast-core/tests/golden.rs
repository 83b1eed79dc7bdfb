//! Golden fixtures: the exact bytes walcast writes for a KV batch, a segment,
//! a snapshot, a catalog head and a catalog page, committed under
//! `tests/golden/`.
//!
//! Each test re-encodes its object and compares it byte for byte with the
//! committed file, then decodes the committed file and checks what it holds.
//! A mismatch means the encoding changed, which breaks files already
//! published: bump the format version, or, if the change is intended and
//! compatible, rewrite the files with
//! `WALCAST_BLESS=1 cargo test -p walcast-core --test golden`.

#[path = "support/fixtures.rs"]
mod fixtures;

use std::path::PathBuf;

use fixtures::*;
use walcast_core::batch::{self, OpRef};
use walcast_core::catalog::{Head, Page};
use walcast_core::segment;
use walcast_core::snapshot;

/// `crc32` of the whole golden segment file (`golden/segment.wseg`).
const SEGMENT_CRC32: u32 = 0xde2e_5a29;

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn blessing() -> bool {
    std::env::var_os("WALCAST_BLESS").is_some_and(|v| v == "1")
}

/// Compares `encoded` with the committed golden file (or writes it when
/// blessing) and returns the committed bytes.
fn check_golden(name: &str, what: &str, encoded: &[u8]) -> Vec<u8> {
    let path = golden_path(name);
    if blessing() {
        std::fs::create_dir_all(path.parent().expect("golden dir")).expect("create golden dir");
        std::fs::write(&path, encoded).expect("write golden file");
        eprintln!("blessed {} ({} bytes)", path.display(), encoded.len());
        return encoded.to_vec();
    }
    let committed = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "golden file {} is missing ({e}); create it with WALCAST_BLESS=1 cargo test -p walcast-core --test golden",
            path.display()
        )
    });
    if committed != encoded {
        let at = committed
            .iter()
            .zip(encoded)
            .position(|(a, b)| a != b)
            .unwrap_or(committed.len().min(encoded.len()));
        panic!(
            "encoding of {what} changed: this breaks files already published; bump the version or bless with \
             WALCAST_BLESS=1 (file {}: committed {} bytes, encoded {} bytes, first difference at byte {at})",
            path.display(),
            committed.len(),
            encoded.len()
        );
    }
    committed
}

#[test]
fn golden_batch() {
    let ops = fixtures::golden_batch();
    let encoded = batch::encode(&ops).expect("encode");
    let committed = check_golden("batch.bin", "the KV batch", &encoded);

    let decoded = batch::decode(&committed).expect("committed batch decodes");
    assert_eq!(
        decoded,
        vec![
            OpRef::Put(b"alpha", b"one"),
            OpRef::Put(&[0x00, 0xff, 0x80, 0x0a], &[0xde, 0xad, 0xbe, 0xef]),
            OpRef::Delete(b"beta"),
            OpRef::Put(b"empty", b""),
            OpRef::Put(&[0x7f; 130], b"a key whose length needs a two-byte varint"),
            OpRef::Delete(&[0xfe, 0x00]),
        ]
    );
    // Version byte and op count lead the batch.
    assert_eq!(&committed[..2], &[1, 6]);
}

#[test]
fn golden_segment() {
    let (encoded, summary) = fixtures::golden_segment();
    let committed = check_golden("segment.wseg", "the segment", &encoded);

    let crc = crc32fast::hash(&committed);
    assert_eq!(
        crc, SEGMENT_CRC32,
        "whole-file crc32 of the golden segment changed: {crc:#010x}; the encoding changed (see above) or SEGMENT_CRC32 is stale"
    );
    assert_eq!(summary.crc32, crc);

    let seg = segment::decode(&committed, Some(SEGMENT_CRC32)).expect("committed segment decodes");
    assert_eq!(seg.header.epoch, EPOCH);
    assert_eq!(seg.header.first_lsn, FIRST_LSN);
    assert_eq!(seg.trailer.first_lsn, FIRST_LSN);
    assert_eq!(seg.trailer.last_lsn, LAST_LSN);
    assert_eq!(seg.trailer.footer_offset, summary.records_end);
    assert_eq!(seg.index, summary.index);
    assert!(
        seg.index.len() >= 4,
        "index interval 256 should give several entries, got {}",
        seg.index.len()
    );
    assert_eq!(
        seg.index[0],
        segment::IndexEntry {
            lsn: FIRST_LSN,
            offset: segment::HEADER_LEN
        }
    );

    let mut lsn = FIRST_LSN;
    for rec in seg.records() {
        let rec = rec.expect("record verifies");
        assert_eq!(rec.lsn, lsn);
        let expected = batch::encode(&batch_for(lsn)).expect("encode");
        assert_eq!(rec.payload, expected.as_slice(), "payload of LSN {lsn}");
        lsn += 1;
    }
    assert_eq!(lsn, LAST_LSN + 1);

    // The trailer alone (a suffix range GET) and a mid-segment start from an index entry.
    let size = committed.len() as u64;
    let t = segment::decode_trailer(&committed[committed.len() - 40..]).expect("trailer");
    assert_eq!(t.file_size(), size);
    let e = seg.index[seg.index.len() / 2];
    let start = usize::try_from(e.offset).expect("offset");
    let end = usize::try_from(t.footer_offset).expect("footer");
    let tail: Vec<u64> = segment::Records::new(&committed[start..end], e.offset, e.lsn)
        .map(|r| r.expect("record").lsn)
        .collect();
    assert_eq!(tail, (e.lsn..=LAST_LSN).collect::<Vec<_>>());
}

#[test]
fn golden_indexed_snapshot() {
    use walcast_core::snapshot::indexed::{decode_indexed, LazySnapshot, Lookup, Need};
    let encoded = fixtures::golden_indexed_snapshot();
    let committed = check_golden("snapshot-v2.wsnap", "the block-indexed snapshot", &encoded);
    let state = golden_state();
    let (header, decoded) = decode_indexed(&committed, Some(crc32fast::hash(&committed)))
        .expect("committed block-indexed snapshot decodes");
    assert_eq!(header.lsn, LAST_LSN);
    assert_eq!(header.dataset_id, DATASET);
    assert!(decoded.iter().eq(state.iter()));
    // A point read through the footer, the top index, an index block and a
    // data block.
    let mut lazy = LazySnapshot::new(committed.len() as u64, 1 << 20);
    let mut fetches = 0;
    let value = loop {
        match lazy.get(b"alpha").expect("point read") {
            Lookup::Done(v) => break v,
            Lookup::Need(Need::Suffix(n)) => {
                fetches += 1;
                let n = (n as usize).min(committed.len());
                lazy.feed_suffix(&committed[committed.len() - n..])
                    .expect("footer");
            }
            Lookup::Need(Need::Range { start, end }) => {
                fetches += 1;
                lazy.feed_range(start, &committed[start as usize..end as usize], b"alpha")
                    .expect("block");
            }
        }
    };
    assert_eq!(value.as_deref(), Some(&b"one"[..]));
    assert_eq!(lazy.footer().expect("footer read").levels, 2);
    assert!(fetches <= 3, "{fetches} fetches");
}

#[test]
fn golden_verified_snapshot() {
    use walcast_core::snapshot::indexed::{
        decode_indexed, index_digest, LazySnapshot, Lookup, Need,
    };
    let encoded = fixtures::golden_verified_snapshot();
    let committed = check_golden("snapshot-v4.wsnap", "the verified snapshot", &encoded);
    let state = golden_state();
    let (header, decoded) = decode_indexed(&committed, Some(crc32fast::hash(&committed)))
        .expect("committed verified snapshot decodes");
    assert_eq!(header.lsn, LAST_LSN);
    assert!(decoded.iter().eq(state.iter()));
    // The index digest a signed head would record for it.
    let digest = index_digest(&committed).expect("version 4 has an index digest");
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    if blessing() {
        std::fs::write(golden_path("snapshot-v4.index-digest"), format!("{hex}\n"))
            .expect("write digest");
    }
    let committed_digest = std::fs::read_to_string(golden_path("snapshot-v4.index-digest"))
        .expect("golden/snapshot-v4.index-digest is committed");
    assert_eq!(hex, committed_digest.trim(), "the index digest changed");
    // A point read bound to the digest: footer and top index, an index
    // block and a data block, each checked against its SHA-256.
    let mut lazy = LazySnapshot::with_index_digest(committed.len() as u64, 1 << 20, digest);
    let mut fetches = 0;
    let value = loop {
        match lazy.get(b"alpha").expect("point read") {
            Lookup::Done(v) => break v,
            Lookup::Need(Need::Suffix(n)) => {
                fetches += 1;
                let n = (n as usize).min(committed.len());
                lazy.feed_suffix(&committed[committed.len() - n..])
                    .expect("footer");
            }
            Lookup::Need(Need::Range { start, end }) => {
                fetches += 1;
                lazy.feed_range(start, &committed[start as usize..end as usize], b"alpha")
                    .expect("block");
            }
        }
    };
    assert_eq!(value.as_deref(), Some(&b"one"[..]));
    let footer = lazy.footer().expect("footer read");
    assert_eq!((footer.levels, footer.has_digests()), (2, true));
    assert!(fetches <= 3, "{fetches} fetches");
}

#[test]
fn golden_delta() {
    use walcast_core::snapshot::delta::{decode_delta, DeltaFooter, DeltaIndex};
    let encoded = fixtures::golden_delta();
    let committed = check_golden("delta-v3.wdelta", "the delta snapshot", &encoded);
    let d = decode_delta(&committed).expect("committed delta decodes");
    assert_eq!((d.base_lsn, d.header.lsn), (60, LAST_LSN));
    assert_eq!(d.header.dataset_id, DATASET);
    assert_eq!(d.changes.len(), 4);
    assert_eq!(d.changes[1], (b"beta".to_vec(), None));
    // A point read: one suffix GET (index, filter, footer), one data block.
    let size = committed.len() as u64;
    let footer = DeltaFooter::decode(&committed[committed.len() - 64..], size).expect("footer");
    let n = footer.suffix_len(size) as usize;
    let idx = DeltaIndex::decode_suffix(&committed[committed.len() - n..], size).expect("suffix");
    let h = idx.block_for(b"delta").expect("delta is in the filter");
    let got = idx
        .lookup(
            &h,
            &committed[h.offset as usize..h.end() as usize],
            b"delta",
        )
        .expect("block");
    assert_eq!(got, Some(Some(b"four".to_vec())));
}

#[test]
fn golden_pointer_delta() {
    use walcast_core::snapshot::delta::DeltaIndex;
    use walcast_core::snapshot::pointer::{resolve, PageOf, PointerFooter, Resolved};
    let encoded = fixtures::golden_pointer_delta();
    let committed = check_golden("delta-v5.wdelta", "the pointer delta", &encoded);
    let size = committed.len() as u64;
    let f = PointerFooter::decode(&committed[committed.len() - 64..], size).expect("footer");
    assert_eq!((f.base_lsn, f.page_bytes), (119, 256));
    assert!(f.pages > 1, "{} pages", f.pages);
    let idx = DeltaIndex::decode_pointer_suffix(
        &committed[f.index.offset as usize..],
        size,
        LAST_LSN,
        EPOCH,
    )
    .expect("suffix");
    assert_eq!(idx.footer().entry_count, f.entry_count);
    // A point read: the key's slot page, then its record in the golden
    // segment.
    let (segment, _) = fixtures::golden_segment();
    let po = PageOf {
        base_lsn: 119,
        lsn: LAST_LSN,
        epoch: EPOCH,
        pages: f.pages,
        page_bytes: f.page_bytes,
    };
    let read = |key: &[u8]| {
        let (page, r) = f.page_range(key);
        let found = po
            .lookup(&committed[r.start as usize..r.end as usize], page, key)
            .expect("page");
        found.iter().find_map(|p| {
            let rec = &segment[p.range().start as usize..p.range().end as usize];
            match resolve(rec, p, key).expect("record") {
                Resolved::Change(c) => Some(c),
                Resolved::NotHere => None,
            }
        })
    };
    // key/012 is last written at 127 (a put) ... or deleted later; the
    // state after the golden segment says which.
    let state = fixtures::golden_state();
    for i in 0..23 {
        let k = format!("key/{i:03}").into_bytes();
        if let Some(c) = read(&k) {
            assert_eq!(c.as_deref(), state.get(&k), "{k:?}");
        }
    }
    assert_eq!(read(b"key/012"), Some(Some(b"v127".to_vec())));
    assert_eq!(read(b"alpha"), None, "written before the delta's base");
}

#[test]
fn golden_snapshot() {
    let encoded = fixtures::golden_snapshot();
    let committed = check_golden("snapshot.wsnap", "the snapshot", &encoded);

    let state = golden_state();
    let (header, decoded) = snapshot::decode(&committed, Some(crc32fast::hash(&committed)))
        .expect("committed snapshot decodes");
    assert_eq!(header.lsn, LAST_LSN);
    assert_eq!(header.epoch, EPOCH);
    assert_eq!(header.dataset_id, DATASET);
    assert_eq!(header.entry_count, state.len());
    assert!(
        decoded.iter().eq(state.iter()),
        "snapshot entries differ from the state"
    );
    assert_eq!(decoded.get(b"alpha"), Some(&b"one"[..]));
    assert_eq!(decoded.get(b"empty"), Some(&b""[..]));
    assert_eq!(decoded.get(b"beta"), None);

    // Several chunks: count chunk magics after the header.
    let chunks = committed
        .windows(4)
        .filter(|w| *w == snapshot::CHUNK_MAGIC)
        .count();
    assert!(
        chunks >= 3,
        "chunk size 128 should give several chunks, got {chunks}"
    );
}

#[test]
fn golden_head() {
    let head = fixtures::golden_head();
    let committed = check_golden("head.json", "the catalog head", &head.encode());

    let decoded = Head::decode(&committed).expect("committed head decodes");
    assert_eq!(decoded, head);
    assert_eq!(decoded.dataset_id.to_string(), "11".repeat(16));
    assert_eq!(decoded.committed_lsn, LAST_LSN);
    let seg = &decoded.segments[0];
    let (bytes, summary) = fixtures::golden_segment();
    assert_eq!(
        seg.key,
        "segments/7/00000000000000000100-00000000000000000139.wseg"
    );
    assert_eq!(seg.crc32, SEGMENT_CRC32);
    assert_eq!(seg.size, bytes.len() as u64);
    assert_eq!(seg.records_end, summary.records_end);
    assert!(seg.index.len() > 1 && seg.index.len() <= 16);
    let snap = decoded.snapshot.as_ref().expect("snapshot");
    assert_eq!(snap.key, "snapshots/00000000000000000139-7.wsnap");
    // The snapshot and page bytes equal the committed files (their own tests check that).
    let snap_bytes = fixtures::golden_snapshot();
    assert_eq!(snap.crc32, crc32fast::hash(&snap_bytes));
    assert_eq!(snap.size, snap_bytes.len() as u64);
    let page_bytes = fixtures::golden_page().encode();
    assert_eq!(decoded.pages[0].crc32, crc32fast::hash(&page_bytes));
}

/// `head.json.gz` is `gzip -9` of `head.json` (another encoder than
/// walcast's, with the file name in its header): it decodes to the same
/// JSON and head, and walcast's own gzip of the head does too.
#[test]
#[cfg(feature = "gzip")]
fn golden_head_gzip() {
    let json = std::fs::read(golden_path("head.json")).unwrap();
    let gz = std::fs::read(golden_path("head.json.gz")).unwrap();
    assert_eq!(&gz[..2], &walcast_core::catalog::GZIP_MAGIC);
    assert_eq!(
        gz[3] & 0x08,
        0x08,
        "the fixture carries a file name (FNAME)"
    );
    assert_eq!(
        &walcast_core::catalog::head_json(&gz).unwrap()[..],
        &json[..]
    );
    let head = Head::decode(&json).unwrap();
    assert_eq!(Head::decode(&gz).unwrap(), head);
    let ours = walcast_core::catalog::gzip_head(&json);
    assert_eq!(Head::decode(&ours).unwrap(), head);
    // Level 6, no file name, mtime 0: the same bytes for the same head.
    assert_eq!(&ours[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff][..]);
}

#[test]
fn golden_page() {
    let page = fixtures::golden_page();
    let encoded = page.encode();
    let committed = check_golden("page.json", "the level-0 catalog page", &encoded);

    let r = golden_page_ref(&committed);
    let decoded = Page::decode(&committed, &r).expect("committed page decodes");
    assert_eq!(decoded, page);
    assert_eq!(decoded.level, 0);
    assert_eq!(decoded.segments.len(), 2);
    assert_eq!(decoded.segments[0].first_lsn, 1);
    assert_eq!(decoded.segments[1].last_lsn, FIRST_LSN - 1);
    assert!(decoded.pages.is_empty());
}

/// The golden head with its newest segment carried in the tail
/// (`docs/FORMAT.md`, "The tail"): base64 of the golden segment file.
#[test]
fn golden_head_with_tail() {
    let (bytes, _) = fixtures::golden_segment();
    let mut head = fixtures::golden_head();
    head.tail = vec![walcast_core::catalog::TailSegment {
        key: head.segments[0].key.clone(),
        body: bytes.clone(),
    }];
    let committed = check_golden(
        "head-tail.json",
        "the catalog head with a tail",
        &head.encode(),
    );
    let decoded = Head::decode(&committed).expect("committed head decodes");
    assert_eq!(decoded, head);
    assert_eq!(
        decoded.tail_body(&decoded.segments[0].key),
        Some(&bytes[..])
    );
    assert_eq!(crc32fast::hash(&bytes), SEGMENT_CRC32);
    // Readers that do not know the tail read the same head without it.
    let mut plain = decoded.clone();
    plain.tail.clear();
    assert_eq!(plain, fixtures::golden_head());
}
