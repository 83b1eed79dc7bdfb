//! Fuzz entry points: one function per decoder that must never panic and
//! never allocate from a length it has not checked, whatever bytes it is
//! given.
//!
//! The `fuzz/` crate (cargo-fuzz) calls these from its targets, and
//! `tests/fuzz_corpus.rs` replays the committed corpus and past crashers
//! through them as an ordinary test. Each function returns normally for any
//! input; a panic (including a failed round-trip assertion) is a bug.
//!
//! Where a format is guarded by checksums, the functions also decode a copy
//! of the input whose checksums were recomputed, so that a fuzzer reaches the
//! logic behind the checks instead of stopping at the first CRC mismatch.

use crate::batch::{self, Op, OpRef};
use crate::catalog::{Head, Page, PageRef};
use crate::segment::{self, Records};
use crate::snapshot::{self, SnapshotDecoder, SnapshotHeader};

// The formats' fixed sizes as `usize` (all far below `u32::MAX`).
#[allow(clippy::cast_possible_truncation)]
const SEG_HEADER: usize = segment::HEADER_LEN as usize;
#[allow(clippy::cast_possible_truncation)]
const SEG_TRAILER: usize = segment::TRAILER_LEN as usize;
#[allow(clippy::cast_possible_truncation)]
const SNAP_HEADER: usize = snapshot::HEADER_LEN as usize;
#[allow(clippy::cast_possible_truncation)]
const SNAP_TRAILER: usize = snapshot::TRAILER_LEN as usize;

/// Segment decoders: [`segment::decode`] without and with an expected
/// whole-file checksum (the right one and a wrong one), [`segment::decode_trailer`]
/// on the last 40 bytes, [`segment::decode_header`], and iterating
/// [`Records`] over the whole input; then the same on a copy whose header,
/// record, index and trailer checksums were recomputed.
pub fn segment(data: &[u8]) {
    segment_once(data);
    let fixed = fix_segment_crcs(data);
    if fixed != data {
        segment_once(&fixed);
    }
}

fn segment_once(data: &[u8]) {
    let plain = segment::decode(data, None);
    let crc = crc32fast::hash(data);
    let right = segment::decode(data, Some(crc));
    // The right catalog checksum covers every record's bytes, so records'
    // own checksums are not computed again under it: it accepts everything
    // the plain decode accepts, and rejects only on structure otherwise.
    if plain.is_ok() {
        assert!(
            right.is_ok(),
            "the right catalog checksum rejected a valid segment"
        );
    }
    if let (Ok(a), Ok(b)) = (&plain, &right) {
        assert_eq!(a.trailer, b.trailer);
    }
    if let Ok(seg) = &right {
        let mut n = 0u64;
        for r in seg.records() {
            r.expect("framing verified");
            n += 1;
        }
        assert_eq!(n, seg.trailer.last_lsn - seg.trailer.first_lsn + 1);
    }
    // The records `decode_with` visits in its one walk are those the
    // decoded segment iterates, in order; it fails where `decode` fails.
    let mut visited = Vec::new();
    let with = segment::decode_with(data, Some(crc), |r| visited.push((r.lsn, r.payload)));
    assert_eq!(with.is_ok(), right.is_ok());
    if let Ok(seg) = &right {
        let walked: Vec<_> = seg
            .records()
            .map(|r| r.map(|r| (r.lsn, r.payload)).expect("framing verified"))
            .collect();
        assert_eq!(visited, walked, "decode_with visited other records");
    }
    assert!(
        segment::decode(data, Some(crc ^ 1)).is_err(),
        "a wrong catalog checksum was accepted"
    );
    if let Ok(seg) = &plain {
        let t = seg.trailer;
        assert_eq!(t.file_size(), data.len() as u64);
        assert_eq!(seg.header.first_lsn, t.first_lsn);
        let mut expected = t.first_lsn;
        let mut n = 0u64;
        for rec in seg.records() {
            let rec = rec.expect("records of a verified segment must verify again");
            assert_eq!(rec.lsn, expected);
            expected = expected.wrapping_add(1);
            n += 1;
        }
        assert_eq!(
            n,
            t.last_lsn - t.first_lsn + 1,
            "record count disagrees with the trailer"
        );
        assert!(seg.index.len() as u64 <= n);
    }

    let tail = data.len().saturating_sub(SEG_TRAILER);
    let _ = segment::decode_trailer(&data[tail..]);
    let _ = segment::decode_header(data);
    let head = data.len().min(SEG_HEADER);
    let _ = segment::decode_header(&data[..head]);

    let mut next = 1u64;
    for rec in Records::new(data, segment::HEADER_LEN, 1) {
        match rec {
            Ok(r) => {
                assert_eq!(r.lsn, next);
                next += 1;
            }
            Err(_) => break,
        }
    }
}

/// Recomputes every checksum of something shaped like a segment, leaving
/// all other bytes alone.
fn fix_segment_crcs(data: &[u8]) -> Vec<u8> {
    let mut b = data.to_vec();
    let n = b.len();
    let hl = SEG_HEADER;
    let tl = SEG_TRAILER;
    if n >= hl {
        let c = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&c.to_le_bytes());
    }
    // Records up to the footer offset the trailer names (or the trailer).
    let trailer_at = n.checked_sub(tl).filter(|&t| t >= hl);
    let footer = trailer_at.map(|t| {
        let fo = u64::from_le_bytes(le8(&b[t..t + 8]));
        usize::try_from(fo).map_or(t, |fo| fo.min(t))
    });
    let end = footer.unwrap_or(n);
    let mut pos = hl;
    while pos + 16 <= end {
        let len = u32::from_le_bytes(le4(&b[pos + 8..pos + 12])) as usize;
        let Some(stop) = (pos + 16).checked_add(len).filter(|&s| s <= end) else {
            break;
        };
        let mut h = crc32fast::Hasher::new();
        h.update(&b[pos..pos + 12]);
        h.update(&b[pos + 16..stop]);
        let c = h.finalize();
        b[pos + 12..pos + 16].copy_from_slice(&c.to_le_bytes());
        pos = stop;
    }
    if let (Some(t), Some(fo)) = (trailer_at, footer) {
        let ic = crc32fast::hash(&b[fo..t]);
        b[t + 28..t + 32].copy_from_slice(&ic.to_le_bytes());
        let tc = crc32fast::hash(&b[t..t + 32]);
        b[t + 32..t + 36].copy_from_slice(&tc.to_le_bytes());
    }
    b
}

/// KV batch codec: [`batch::decode`]; when it accepts the input, the ops are
/// copied into owned [`Op`]s, re-encoded with [`batch::encode`], and the
/// re-encoding must decode to the same ops and (the format being canonical:
/// minimal varints, no trailing bytes) equal the input byte for byte.
pub fn batch(data: &[u8]) {
    let Ok(ops) = batch::decode(data) else {
        return;
    };
    let owned: Vec<Op> = ops
        .iter()
        .map(|op| match *op {
            OpRef::Put(k, v) => Op::put(k, v),
            OpRef::Delete(k) => Op::delete(k),
        })
        .collect();
    let bytes = batch::encode(&owned).expect("a decoded batch is within the limits");
    let again = batch::decode(&bytes).expect("a re-encoded batch must decode");
    assert_eq!(again, ops, "decode(encode(ops)) != ops");
    assert_eq!(bytes, data, "the batch encoding is not canonical");
}

/// Snapshot decoders: [`snapshot::decode`] on the whole input, and a
/// [`SnapshotDecoder`] fed the same bytes in pieces whose sizes derive from
/// the first byte; both must agree on success and, when they succeed, on the
/// header and every entry. The right whole-file checksum must not change the
/// verdict and a wrong one must fail. Then the same on a copy whose header,
/// chunk, index and trailer checksums were recomputed.
pub fn snapshot(data: &[u8]) {
    snapshot_once(data);
    let fixed = fix_snapshot_crcs(data);
    if fixed != data {
        snapshot_once(&fixed);
    }
}

fn snapshot_once(data: &[u8]) {
    let whole = snapshot::decode(data, None);
    let crc = crc32fast::hash(data);
    assert_eq!(
        snapshot::decode(data, Some(crc)).is_ok(),
        whole.is_ok(),
        "the right catalog checksum changed the verdict"
    );
    assert!(
        snapshot::decode(data, Some(crc ^ 1)).is_err(),
        "a wrong catalog checksum was accepted"
    );

    let pieces = chunked(data);
    match (&whole, &pieces) {
        (Ok((h1, s1)), Ok((h2, s2))) => {
            assert_eq!(h1, h2, "streamed header differs");
            assert_eq!(s1.len(), h1.entry_count);
            assert!(s1.iter().eq(s2.iter()), "streamed entries differ");
            let mut prev: Option<Vec<u8>> = None;
            let mut entries = s1.iter();
            while let Some((k, _)) = entries.next_entry() {
                assert!(
                    prev.as_deref().is_none_or(|p| p < k),
                    "keys not strictly ascending"
                );
                prev = Some(k.to_vec());
            }
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!(
            "whole-buffer and streamed decoding disagree: {:?} vs {:?}",
            a.as_ref().map(|x| x.0),
            b.as_ref().map(|x| x.0)
        ),
    }
}

fn chunked(data: &[u8]) -> Result<(SnapshotHeader, crate::state::KvState), crate::DecodeError> {
    let mut d = SnapshotDecoder::new();
    let seed = data.first().copied().unwrap_or(0);
    // Piece sizes cycle through a small sequence derived from the seed,
    // including empty feeds.
    let mut x = u32::from(seed) | 1;
    let max = usize::from(seed % 97) + 1;
    let mut pos = 0usize;
    while pos < data.len() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let step = ((x >> 16) as usize) % (max + 1);
        let end = (pos + step).min(data.len());
        d.feed(&data[pos..end])?;
        assert_eq!(d.position(), end as u64);
        pos = end;
    }
    d.feed(&[])?;
    d.finish(None)
}

/// Recomputes every checksum of something shaped like a snapshot.
fn fix_snapshot_crcs(data: &[u8]) -> Vec<u8> {
    let mut b = data.to_vec();
    let n = b.len();
    let hl = SNAP_HEADER;
    let tl = SNAP_TRAILER;
    if n < hl {
        return b;
    }
    let c = crc32fast::hash(&b[..52]);
    b[52..56].copy_from_slice(&c.to_le_bytes());
    let mut pos = hl;
    while pos + 16 <= n && b[pos..pos + 4] == snapshot::CHUNK_MAGIC {
        let len = u32::from_le_bytes(le4(&b[pos + 8..pos + 12])) as usize;
        let Some(stop) = (pos + 16).checked_add(len).filter(|&s| s <= n) else {
            break;
        };
        let mut h = crc32fast::Hasher::new();
        h.update(&b[pos + 4..pos + 12]);
        h.update(&b[pos + 16..stop]);
        let c = h.finalize();
        b[pos + 12..pos + 16].copy_from_slice(&c.to_le_bytes());
        pos = stop;
    }
    if let Some(t) = n.checked_sub(tl).filter(|&t| t >= pos) {
        let ic = crc32fast::hash(&b[pos..t]);
        b[t + 20..t + 24].copy_from_slice(&ic.to_le_bytes());
        let tc = crc32fast::hash(&b[t..t + 32]);
        b[t + 32..t + 36].copy_from_slice(&tc.to_le_bytes());
    }
    b
}

/// Catalog head: [`Head::decode`]; when it accepts the input, the head must
/// survive `decode(encode(head))` unchanged, and encoding must be stable.
/// Each input is tried twice: as it is, and with its checksum prefix
/// rewritten to match the rest, so that mutations reach the JSON reader
/// instead of stopping at the checksum.
pub fn head(data: &[u8]) {
    head_once(data);
    if let Some(rest) = data.get(crate::catalog::HEAD_PREFIX_LEN..) {
        let mut fixed = format!("{{\"crc32\":\"{:08x}\",", crate::crc::hash(rest)).into_bytes();
        fixed.extend_from_slice(rest);
        head_once(&fixed);
    }
}

fn head_once(data: &[u8]) {
    let Ok(head) = Head::decode(data) else {
        return;
    };
    let bytes = head.encode();
    let again = Head::decode(&bytes).expect("an encoded valid head must decode");
    assert_eq!(again, head, "decode(encode(head)) != head");
    assert_eq!(again.encode(), bytes, "head encoding is not stable");
}

/// Catalog page: [`Page::decode`] against a [`PageRef`] derived from the
/// input: its checksum is the input's real `crc32` (wrong for one input in
/// sixteen), and level, LSN range and count come from a lenient parse of the
/// input when it has one, so that valid-looking pages can pass. A page that
/// decodes must survive re-encoding and decoding against a matching reference.
pub fn page(data: &[u8]) {
    let crc = crc32fast::hash(data);
    let crc = if crc & 0xf == 0 { !crc } else { crc };
    let lenient: Option<Page> = crate::catalog::json::page(data).ok();
    let mut r = PageRef {
        key: "catalog/pages/fuzz.json".into(),
        level: 0,
        first_lsn: 1,
        last_lsn: 1,
        count: 1,
        crc32: crc,
    };
    if let Some(p) = &lenient {
        set_ref(&mut r, p);
    }
    let Ok(page) = Page::decode(data, &r) else {
        return;
    };
    let bytes = page.encode();
    r.crc32 = crc32fast::hash(&bytes);
    set_ref(&mut r, &page);
    let again = Page::decode(&bytes, &r).expect("an encoded valid page must decode");
    assert_eq!(again, page, "decode(encode(page)) != page");
}

fn set_ref(r: &mut PageRef, p: &Page) {
    r.level = p.level;
    let (first, last, count) = if p.level == 0 {
        (
            p.segments.first().map(|s| s.first_lsn),
            p.segments.last().map(|s| s.last_lsn),
            p.segments.len(),
        )
    } else {
        (
            p.pages.first().map(|s| s.first_lsn),
            p.pages.last().map(|s| s.last_lsn),
            p.pages.len(),
        )
    };
    r.first_lsn = first.unwrap_or(1);
    r.last_lsn = last.unwrap_or(1);
    r.count = u32::try_from(count).unwrap_or(u32::MAX);
}

fn le4(s: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&s[..4]);
    a
}

fn le8(s: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&s[..8]);
    a
}

/// Drives one point read of `key` over `data`: the answer, or `None` when
/// the reader refused the bytes. Panics if the read does not end within a
/// few fetches.
fn bounded_point_read(
    lazy: &mut crate::snapshot::indexed::LazySnapshot,
    data: &[u8],
    key: &[u8],
) -> Option<Option<Vec<u8>>> {
    use crate::snapshot::indexed::{Lookup, Need};
    for _ in 0..6 {
        match lazy.get(key).ok()? {
            Lookup::Done(v) => return Some(v),
            Lookup::Need(Need::Suffix(n)) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX).min(data.len());
                lazy.feed_suffix(&data[data.len() - n..]).ok()?;
            }
            Lookup::Need(Need::Range { start, end }) => {
                let s = usize::try_from(start).unwrap_or(usize::MAX).min(data.len());
                let e = usize::try_from(end)
                    .unwrap_or(usize::MAX)
                    .min(data.len())
                    .max(s);
                lazy.feed_range(start, &data[s..e], key).ok()?;
            }
        }
    }
    panic!("a point read did not end")
}

/// Block-indexed snapshots (format versions 2 and 4; version 4 is also
/// read bound to its own index digest):
/// [`snapshot::indexed::decode_indexed`] on the whole input, and lazy point
/// reads of keys taken from the input through
/// [`snapshot::indexed::LazySnapshot`], fed from the input's own bytes. A
/// point read must end within a few fetches, and a whole decode that
/// succeeds must agree with every point read.
pub fn indexed_snapshot(data: &[u8]) {
    use crate::snapshot::indexed::{decode_indexed, LazySnapshot, Lookup, Need};
    let whole = decode_indexed(data, None);
    let keys: Vec<&[u8]> = data.chunks(7).take(8).collect();
    let mut lazy = LazySnapshot::new(data.len() as u64, 4096);
    for key in keys {
        let mut fetches = 0;
        let got = loop {
            fetches += 1;
            assert!(fetches <= 6, "a point read did not end");
            match lazy.get(key) {
                Err(_) => break None,
                Ok(Lookup::Done(v)) => break Some(v),
                Ok(Lookup::Need(Need::Suffix(n))) => {
                    let n = usize::try_from(n).unwrap_or(usize::MAX).min(data.len());
                    if lazy.feed_suffix(&data[data.len() - n..]).is_err() {
                        break None;
                    }
                }
                Ok(Lookup::Need(Need::Range { start, end })) => {
                    let s = usize::try_from(start).unwrap_or(usize::MAX).min(data.len());
                    let e = usize::try_from(end)
                        .unwrap_or(usize::MAX)
                        .min(data.len())
                        .max(s);
                    if lazy.feed_range(start, &data[s..e], key).is_err() {
                        break None;
                    }
                }
            }
        };
        if let (Ok((_, state)), Some(v)) = (&whole, got) {
            assert_eq!(
                state.get(key),
                v.as_deref(),
                "a point read disagrees with the whole decode"
            );
        }
    }
    // Version 4 bound to the digest of its own top index and footer: every
    // block is checked against its SHA-256, and an answer agrees with the
    // whole decode.
    if let Some(digest) = crate::snapshot::indexed::index_digest(data) {
        let mut bound = LazySnapshot::with_index_digest(data.len() as u64, 4096, digest);
        for key in data.chunks(5).take(4) {
            let got = bounded_point_read(&mut bound, data, key);
            if let (Ok((_, state)), Some(v)) = (&whole, got) {
                assert_eq!(state.get(key), v.as_deref(), "a bound read disagrees");
            }
        }
    }
    // An ordered scan from a key taken from the input.
    use crate::snapshot::indexed::ScanCursor;
    let start = data.get(..3).unwrap_or(&[]);
    let mut cursor = ScanCursor::new(start, None, 64);
    let mut out = Vec::new();
    let mut lazy = LazySnapshot::new(data.len() as u64, 512);
    let mut steps = 0;
    let complete = loop {
        steps += 1;
        assert!(steps <= 10_000, "a scan did not end");
        let step = lazy.scan_step(&mut cursor, &mut out);
        let next = cursor.next.clone();
        let fed = match step {
            Err(_) => break false,
            Ok(None) => break true,
            Ok(Some(Need::Suffix(n))) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX).min(data.len());
                lazy.feed_suffix(&data[data.len() - n..])
            }
            Ok(Some(Need::Range { start, end })) => {
                let s = usize::try_from(start).unwrap_or(usize::MAX).min(data.len());
                let e = usize::try_from(end)
                    .unwrap_or(usize::MAX)
                    .min(data.len())
                    .max(s);
                lazy.feed_range(start, &data[s..e], &next)
            }
        };
        if fed.is_err() {
            break false;
        }
    };
    if let (Ok((_, state)), true) = (&whole, complete) {
        let want: Vec<_> = state
            .range(std::ops::Bound::Included(start), std::ops::Bound::Unbounded)
            .take(64)
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(out, want, "a scan disagrees with the whole decode");
    }
}

/// [`snapshot::delta::decode_delta`] on the whole input, and point reads of
/// keys taken from the input through [`snapshot::delta::DeltaIndex`], fed
/// from the input's own bytes (the suffix the footer asks for, then the data
/// block the index names). A whole decode that succeeds must agree with
/// every point read.
///
/// [`snapshot::delta::decode_delta`]: crate::snapshot::delta::decode_delta
/// [`snapshot::delta::DeltaIndex`]: crate::snapshot::delta::DeltaIndex
pub fn delta(data: &[u8]) {
    use crate::snapshot::delta::{decode_delta, DeltaFooter, DeltaIndex, DELTA_FOOTER_LEN};
    let whole = decode_delta(data);
    let size = data.len() as u64;
    if size < DELTA_FOOTER_LEN {
        return;
    }
    let Ok(footer) = DeltaFooter::decode(&data[data.len() - DELTA_FOOTER_LEN as usize..], size)
    else {
        assert!(whole.is_err(), "a whole decode passed a bad footer");
        return;
    };
    let n = usize::try_from(footer.suffix_len(size))
        .unwrap_or(usize::MAX)
        .min(data.len());
    let Ok(idx) = DeltaIndex::decode_suffix(&data[data.len() - n..], size) else {
        return;
    };
    let mut keys: Vec<Vec<u8>> = data.chunks(7).take(8).map(<[u8]>::to_vec).collect();
    if let Ok(d) = &whole {
        keys.extend(d.changes.iter().take(8).map(|(k, _)| k.clone()));
    }
    for key in keys {
        let got = idx.block_for(&key).and_then(|h| {
            let s = usize::try_from(h.offset).ok()?.min(data.len());
            let e = usize::try_from(h.end()).ok()?.min(data.len()).max(s);
            idx.lookup(&h, &data[s..e], &key).ok()
        });
        if let Ok(d) = &whole {
            let want = d
                .changes
                .binary_search_by(|(k, _)| k.as_slice().cmp(&key))
                .ok()
                .map(|i| d.changes[i].1.clone());
            match got {
                Some(g) => assert_eq!(g, want, "a point read disagrees with the whole decode"),
                // Ruled out by the filter or index: the key must be absent.
                None => assert!(
                    want.is_none() || idx.block_for(&key).is_some(),
                    "the filter ruled out a key the delta holds"
                ),
            }
        }
    }
}

/// A pointer delta (version 5) read as a lazy replica reads it: the footer
/// and suffix, every data block the index names (their pointers decoded),
/// and the slot page of keys taken from the input and from the blocks, with
/// the records their slots name resolved against the input's own bytes
/// (standing for a segment). Nothing may panic or allocate past the input.
pub fn pointer_delta(data: &[u8]) {
    use crate::snapshot::delta::DeltaIndex;
    use crate::snapshot::pointer::{
        decode_entries, decode_pointer_header, resolve, PageOf, PointerFooter, POINTER_FOOTER_LEN,
    };
    let size = data.len() as u64;
    if size < POINTER_FOOTER_LEN {
        return;
    }
    let Ok(f) = PointerFooter::decode(&data[data.len() - POINTER_FOOTER_LEN as usize..], size)
    else {
        return;
    };
    let (lsn, epoch) = decode_pointer_header(data)
        .map(|h| (h.lsn, h.epoch))
        .unwrap_or((u64::MAX, u64::MAX));
    let slice = |s: u64, e: u64| {
        let s = usize::try_from(s).unwrap_or(usize::MAX).min(data.len());
        let e = usize::try_from(e)
            .unwrap_or(usize::MAX)
            .min(data.len())
            .max(s);
        &data[s..e]
    };
    let mut keys: Vec<Vec<u8>> = data.chunks(9).take(6).map(<[u8]>::to_vec).collect();
    let whole = crate::snapshot::pointer::decode_pointer_delta(data);
    if let Ok(idx) =
        DeltaIndex::decode_pointer_suffix(slice(f.index.offset, size), size, lsn, epoch)
    {
        let mut from: &[u8] = b"";
        for _ in 0..f.data_blocks.min(64) {
            let Some((h, _, next)) = idx.block_from(from) else {
                break;
            };
            if let Ok(b) = crate::snapshot::block::Block::decode(
                slice(h.offset, h.end()),
                &h,
                "delta data block",
            ) {
                if let Ok(e) = decode_entries(&b, f.base_lsn, lsn, epoch) {
                    keys.extend(e.into_iter().take(4).map(|(k, _)| k));
                }
            }
            match next {
                Some(n) => from = n,
                None => break,
            }
        }
    }
    let po = PageOf {
        base_lsn: f.base_lsn,
        lsn,
        epoch,
        pages: f.pages,
        page_bytes: f.page_bytes,
    };
    if let Ok(d) = &whole {
        // A delta that verifies whole names every entry's pointer in its
        // key's page.
        for (k, p) in d.entries.iter().take(16) {
            let (page, r) = f.page_range(k);
            let found = po.lookup(slice(r.start, r.end), page, k);
            assert!(found.is_ok_and(|f| f.contains(p)), "a slot page lost {k:?}");
        }
    }
    for key in keys {
        let (page, r) = f.page_range(&key);
        let Ok(found) = po.lookup(slice(r.start, r.end), page, &key) else {
            continue;
        };
        for p in found.iter().take(4) {
            let r = p.range();
            let _ = resolve(slice(r.start, r.end), p, &key);
        }
    }
}
