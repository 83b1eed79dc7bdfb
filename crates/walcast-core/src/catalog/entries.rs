//! What the head and pages name: segments, the snapshot, deltas, page
//! references, the tail's copies and retired objects.

use serde::Serialize;

use super::*;
use crate::error::Quoted;
use crate::segment::{IndexEntry, SegmentSummary};
use crate::snapshot::delta::KeyFilter;

/// A segment as the catalog names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SegmentEntry {
    /// Object key relative to the prefix.
    pub key: String,
    /// Epoch that sealed it.
    pub epoch: u64,
    /// First LSN.
    pub first_lsn: u64,
    /// Last LSN.
    pub last_lsn: u64,
    /// File size.
    pub size: u64,
    /// `crc32` of the whole file.
    pub crc32: u32,
    /// End of the records.
    pub records_end: u64,
    /// A sample of the segment's sparse index (at most 16 entries, the first always).
    pub index: Vec<IndexEntry>,
    /// A filter of the keys the segment's batches write, when the head
    /// carries one (segments past the newest snapshot or delta, written by
    /// a publisher of delta snapshots): a lazy replica fetches the segment
    /// only for a read of a key the filter may hold. Base64 of the filter's
    /// bytes in JSON (`docs/FORMAT.md`); absent otherwise.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "base64_bytes::serialize_filter"
    )]
    pub filter: Option<KeyFilter>,
}

/// Most bytes of a segment's key filter a catalog entry may carry: the
/// filter of 4,096 keys at 16 bits a key, plus its 8-byte header.
pub const MAX_SEGMENT_FILTER_BYTES: usize = (8 << 10) + 8;

impl SegmentEntry {
    /// The catalog entry for a sealed segment.
    pub fn from_summary(s: &SegmentSummary) -> Self {
        let n = s.index.len();
        let step = n.div_ceil(CATALOG_INDEX_SAMPLE).max(1);
        SegmentEntry {
            key: segment_key(s.epoch, s.first_lsn, s.last_lsn),
            epoch: s.epoch,
            first_lsn: s.first_lsn,
            last_lsn: s.last_lsn,
            size: s.size,
            crc32: s.crc32,
            records_end: s.records_end,
            index: s.index.iter().step_by(step).copied().collect(),
            filter: None,
        }
    }

    /// The index entry to start from to read `lsn`: the last one at or below it.
    pub fn start_for(&self, lsn: u64) -> IndexEntry {
        self.index
            .iter()
            .rev()
            .find(|e| e.lsn <= lsn)
            .copied()
            .unwrap_or(IndexEntry {
                lsn: self.first_lsn,
                offset: crate::segment::HEADER_LEN,
            })
    }

    pub(super) fn validate(&self) -> Result<(), String> {
        let first_ok = self
            .index
            .first()
            .is_some_and(|e| e.lsn == self.first_lsn && e.offset == crate::segment::HEADER_LEN);
        let ordered = self
            .index
            .windows(2)
            .all(|w| w[0].lsn < w[1].lsn && w[0].offset < w[1].offset);
        let in_range = self
            .index
            .iter()
            .all(|e| e.lsn <= self.last_lsn && e.offset < self.records_end);
        if self.first_lsn == 0 || self.last_lsn < self.first_lsn {
            return Err(format!("segment {} has an empty LSN range", self.key));
        }
        check_key(
            "segment",
            &self.key,
            &segment_key(self.epoch, self.first_lsn, self.last_lsn),
        )?;
        if !(first_ok && ordered && in_range)
            || self.records_end >= self.size
            || self.records_end < crate::segment::HEADER_LEN
        {
            return Err(format!(
                "segment {} has an inconsistent index or size",
                self.key
            ));
        }
        Ok(())
    }
}

/// The latest snapshot, as the head names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotEntry {
    /// Object key relative to the prefix.
    pub key: String,
    /// LSN the snapshot is at.
    pub lsn: u64,
    /// Epoch that wrote it.
    pub epoch: u64,
    /// File size.
    pub size: u64,
    /// `crc32` of the whole file.
    pub crc32: u32,
    /// Number of entries.
    pub entries: u64,
    /// The snapshot file's version (`docs/FORMAT.md`): 2 for a
    /// block-indexed snapshot a lazy replica can read by blocks. Absent in
    /// the JSON for version 1.
    #[serde(skip_serializing_if = "is_version_1")]
    pub version: u16,
    /// A block-indexed snapshot's last bytes from its top index block on
    /// (the top index and the footer), when they are small: a lazy replica
    /// takes them from the head instead of its first suffix GET, and
    /// verifies them exactly as fetched ones. Base64 in JSON; absent when
    /// not carried.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "base64_bytes::serialize_opt"
    )]
    pub suffix: Option<Vec<u8>>,
    /// A block-indexed snapshot's: the CRC-32 of its footer's fields (the
    /// footer's own checksum), which a lazy reader checks before using it (the footer names the top index by
    /// offset, length and CRC, and the index every block): a file of the
    /// same size and entry count (an old dataset's, cached at a reused
    /// prefix) is not read as this one. Absent when not written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub footer_crc32: Option<u32>,
}

fn is_version_1(v: &u16) -> bool {
    *v == 1
}

/// Most bytes of a snapshot's suffix (top index and footer) a head may
/// carry in [`SnapshotEntry::suffix`] (decoded).
pub const MAX_SNAPSHOT_SUFFIX: usize = 16 << 10;

/// Most delta snapshots a head names. A cold point read fetches the index
/// and filter of each (all in flight together), so this bounds its GETs.
pub const MAX_DELTAS: usize = 4;

/// A delta snapshot the head names: the keys written after `base_lsn` up to
/// `lsn`, with their newest values or deletion marks (`docs/FORMAT.md`,
/// "Delta snapshot"). The head's deltas apply in order over its snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeltaEntry {
    /// Object key relative to the prefix.
    pub key: String,
    /// The delta holds the changes after this LSN...
    pub base_lsn: u64,
    /// ... up to and including this one.
    pub lsn: u64,
    /// Epoch that wrote it.
    pub epoch: u64,
    /// File size.
    pub size: u64,
    /// `crc32` of the whole file.
    pub crc32: u32,
    /// Changed keys in the delta.
    pub entries: u64,
    /// Bytes from the delta's index block to its end (index, filter and
    /// footer): the one suffix GET a point read makes first.
    pub suffix_len: u64,
    /// The CRC-32 of the delta's footer fields (its last 64 bytes but the
    /// checksum and magic: the footer's own checksum), checked like
    /// [`SnapshotEntry::footer_crc32`]. Absent when not written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub footer_crc32: Option<u32>,
    /// A pointer delta (version 5): its slot pages and their bytes, which
    /// place a key's page with no GET first. Absent: a value delta
    /// (version 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<SlotPages>,
}

/// The slot pages of a pointer delta, as its head entry states them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SlotPages {
    /// Number of pages.
    pub pages: u32,
    /// Bytes of each.
    pub page_bytes: u32,
}

impl DeltaEntry {
    pub(super) fn validate(&self) -> Result<(), String> {
        check_key(
            "delta",
            &self.key,
            &delta_key(self.base_lsn, self.lsn, self.epoch),
        )?;
        if self.lsn <= self.base_lsn {
            return Err(format!("delta {} has an empty LSN range", self.key));
        }
        let min = crate::snapshot::HEADER_LEN + crate::snapshot::delta::DELTA_FOOTER_LEN;
        if let Some(s) = self.slots {
            let pages_end =
                u64::from(s.pages) * u64::from(s.page_bytes) + crate::snapshot::HEADER_LEN;
            if s.pages == 0
                || !(crate::snapshot::pointer::MIN_PAGE_BYTES
                    ..=crate::snapshot::pointer::MAX_PAGE_BYTES)
                    .contains(&s.page_bytes)
                || pages_end.saturating_add(self.suffix_len) > self.size
            {
                return Err(format!(
                    "delta {} has slot pages ({} of {} bytes) that its size ({}) cannot hold",
                    self.key, s.pages, s.page_bytes, self.size
                ));
            }
        }
        if self.size < min
            || self.suffix_len < crate::snapshot::delta::DELTA_FOOTER_LEN
            || self.suffix_len > self.size - crate::snapshot::HEADER_LEN
        {
            return Err(format!(
                "delta {} has an inconsistent size ({}) or suffix length ({})",
                self.key, self.size, self.suffix_len
            ));
        }
        Ok(())
    }
}

/// A pointer to an immutable catalog page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PageRef {
    /// Object key relative to the prefix.
    pub key: String,
    /// 0 for a page of segments, `L` for a page of level `L - 1` references.
    pub level: u32,
    /// First LSN covered.
    pub first_lsn: u64,
    /// Last LSN covered.
    pub last_lsn: u64,
    /// Entries in the page.
    pub count: u32,
    /// `crc32` of the page's bytes.
    pub crc32: u32,
}

impl PageRef {
    /// Checks the reference on its own: a page key of the right level and
    /// range, a level the format allows, a non-empty range.
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.level > MAX_PAGE_LEVEL {
            return Err(format!(
                "page {} has level {}, above the limit {MAX_PAGE_LEVEL}",
                self.key, self.level
            ));
        }
        if self.last_lsn < self.first_lsn || self.first_lsn == 0 || self.count == 0 {
            return Err(format!("page {} has an empty range", self.key));
        }
        let prefix = format!(
            "catalog/pages/{}-{:020}-{:020}-",
            self.level, self.first_lsn, self.last_lsn
        );
        if object_kind(&self.key) != Some("page") || !self.key.starts_with(&prefix) {
            return Err(format!(
                "page key {} is not the key the format derives for level {} and LSNs {}..={}",
                Quoted::str(&self.key),
                self.level,
                self.first_lsn,
                self.last_lsn
            ));
        }
        Ok(())
    }
}

/// A copy of one of the head's newest segment files, carried in the head so
/// that a replica following the tail applies it without another GET. The
/// segment object stays in the store, byte for byte the same; a reader
/// verifies the copy exactly as a fetched whole segment (size, whole-file
/// `crc32`, every record) against the head's entry with the same key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TailSegment {
    /// Key of the segment entry (in the head's `segments`) this is a copy of.
    pub key: String,
    /// The whole segment file; base64 (standard alphabet, padded) in JSON.
    #[serde(with = "base64_bytes")]
    pub body: Vec<u8>,
}

mod base64_bytes {
    use serde::Serializer;

    pub(super) fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&crate::b64::Display(b))
    }

    pub(super) fn serialize_filter<S: Serializer>(
        f: &Option<crate::snapshot::delta::KeyFilter>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match f {
            Some(f) => serialize(&f.encode(), s),
            None => s.serialize_none(),
        }
    }

    pub(super) fn serialize_opt<S: Serializer>(
        b: &Option<Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match b {
            Some(b) => serialize(b, s),
            None => s.serialize_none(),
        }
    }
}

/// An object no longer named by the catalog, waiting out the grace period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Retired {
    /// Object key relative to the prefix.
    pub key: String,
    /// Publisher clock (ms) of the commit that dropped it.
    pub since_ms: u64,
}
