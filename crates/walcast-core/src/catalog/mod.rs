//! The catalog: the mutable head (`catalog/head.json`) and immutable pages of
//! older segment entries. See `docs/FORMAT.md`.

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

use crate::error::{DecodeError, Quoted};
use crate::segment::{IndexEntry, SegmentSummary};
use crate::snapshot::delta::KeyFilter;
use crate::trust::check_digests;
pub use crate::trust::{
    head_signature, page_signature, Digests, HeadTrust, KeyEndorsement, MAX_KEY_CHAIN,
};

/// Catalog format version written and understood by this crate.
pub const FORMAT: u32 = 1;
/// Key of the head, relative to the dataset prefix.
pub const HEAD_KEY: &str = "catalog/head.json";
/// Largest head accepted.
pub const MAX_HEAD_BYTES: usize = 1 << 20;
/// Largest page accepted.
pub const MAX_PAGE_BYTES: usize = 16 << 20;
/// Bytes of the head's checksum prefix `{"crc32":"xxxxxxxx",`.
pub const HEAD_PREFIX_LEN: usize = 20;
/// Index entries kept per segment in the catalog.
pub const CATALOG_INDEX_SAMPLE: usize = 16;
/// Most bytes of segment files the head may carry in its tail (decoded).
/// Keeps the head well under [`MAX_HEAD_BYTES`] with base64's 4/3.
pub const MAX_TAIL_BYTES: usize = 256 << 10;
/// Largest segment file a replica fetches, so that what it reads into
/// memory for one segment is bounded whatever a head claims. A catalog may
/// name a larger one (publishers before this limit wrote them): it is
/// refused when a replica would fetch it, never read, and a snapshot past
/// it still serves. A publisher seals a segment once it holds
/// [`crate::publisher::MAX_SEGMENT_SEAL_BYTES`] at most, and one record
/// ([`crate::segment::MAX_RECORD_LEN`]) can take it past that.
pub const MAX_SEGMENT_BYTES: u64 = 256 << 20;
/// Highest page level accepted. Pages fan out by 16 by default, so 16 levels
/// cover 2^64 segments, as many as LSNs exist; a deeper tree can only come
/// from a hostile store.
pub const MAX_PAGE_LEVEL: u32 = 16;

pub(crate) mod json;

/// The first two bytes of a gzip stream (RFC 1952). A head is JSON and so
/// starts with `{`; a head stored gzip-compressed starts with these.
pub const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The JSON of a head as stored: `bytes` themselves, or, when they are one
/// gzip stream ([`GZIP_MAGIC`]), what it decodes to. Decoding stops past
/// [`MAX_HEAD_BYTES`] (a `TooLarge` error, however far the stream would
/// go), and a stream that is damaged, truncated or followed by anything is
/// a `Json` error naming why.
#[cfg(feature = "gzip")]
pub fn head_json(bytes: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, DecodeError> {
    use std::io::Read as _;
    if !bytes.starts_with(&GZIP_MAGIC) {
        return Ok(std::borrow::Cow::Borrowed(bytes));
    }
    let too_large = |what, len: usize| DecodeError::TooLarge {
        what,
        at: 0,
        len: len as u64,
        limit: MAX_HEAD_BYTES as u64,
    };
    // The stored object is bounded as a JSON head is.
    if bytes.len() > MAX_HEAD_BYTES {
        return Err(too_large("catalog head (gzip)", bytes.len()));
    }
    let mut gz = flate2::bufread::GzDecoder::new(bytes);
    // Read by chunks into a buffer that never grows past the bound (plus
    // the byte that shows a stream going past it).
    let (mut out, mut chunk) = (Vec::new(), [0u8; 16 << 10]);
    loop {
        let n = match gz.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(DecodeError::Json(format!(
                    "the gzip-compressed head does not decode: {e}"
                )))
            }
        };
        let n = n.min(MAX_HEAD_BYTES + 1 - out.len());
        if out.capacity() < out.len() + n {
            let want = (out.capacity() * 2)
                .max(out.len() + n)
                .min(MAX_HEAD_BYTES + 1);
            out.reserve_exact(want - out.len());
        }
        out.extend_from_slice(&chunk[..n]);
        if out.len() > MAX_HEAD_BYTES {
            return Err(too_large("catalog head (gzip-decoded)", out.len()));
        }
    }
    let rest = gz.into_inner().len();
    if rest > 0 {
        return Err(DecodeError::Json(format!(
            "{rest} bytes follow the head's gzip stream"
        )));
    }
    // One stream of the JSON: not a stream of another stream.
    if out.starts_with(&GZIP_MAGIC) {
        return Err(DecodeError::Json(
            "the head's gzip stream holds another gzip stream, not JSON".into(),
        ));
    }
    Ok(std::borrow::Cow::Owned(out))
}

/// Without the `gzip` feature (the wasm module, whose JS driver decodes a
/// gzip head before it hands it over) the bytes as they are: a gzip head
/// then fails [`Head::decode`]'s first check.
#[cfg(not(feature = "gzip"))]
#[inline(always)]
pub fn head_json(bytes: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, DecodeError> {
    Ok(std::borrow::Cow::Borrowed(bytes))
}

/// Compresses a head's JSON ([`Head::encode`]) into one gzip stream, as a
/// publisher with [`crate::publisher::PublisherConfig::head_gzip`] stores
/// it. [`head_json`] gives the JSON back.
#[cfg(feature = "gzip")]
pub fn gzip_head(json: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(json.len() / 2),
        flate2::Compression::new(6),
    );
    // Writing into a Vec cannot fail.
    let _ = gz.write_all(json);
    gz.finish().unwrap_or_default()
}

/// Checks that `key` is exactly the key the format derives for the object it
/// names, so no catalog entry can point outside the dataset's own object kinds
/// (`../x`, the head itself, an absolute path, a query).
fn check_key(what: &str, key: &str, expected: &str) -> Result<(), String> {
    if key == expected {
        Ok(())
    } else {
        Err(format!(
            "{what} key {} is not the key the format derives ({})",
            Quoted::str(key),
            Quoted::str(expected)
        ))
    }
}

/// The kind of immutable object `key` names, if it has the exact shape of a
/// segment, snapshot or page key; `None` for anything else (the head, a
/// relative path with `..`, stray files).
pub fn object_kind(key: &str) -> Option<&'static str> {
    fn num(s: &str, width: Option<usize>) -> bool {
        !s.is_empty()
            && s.len() <= 20
            && s.bytes().all(|b| b.is_ascii_digit())
            && width.is_none_or(|w| s.len() == w)
            && s.parse::<u64>().is_ok()
    }
    if let Some(rest) = key.strip_prefix("segments/") {
        let (epoch, file) = rest.split_once('/')?;
        let (first, last) = file.strip_suffix(".wseg")?.split_once('-')?;
        (num(epoch, None) && num(first, Some(20)) && num(last, Some(20))).then_some("segment")
    } else if let Some(rest) = key.strip_prefix("snapshots/") {
        let (lsn, epoch) = rest.strip_suffix(".wsnap")?.split_once('-')?;
        (num(lsn, Some(20)) && num(epoch, None)).then_some("snapshot")
    } else if let Some(rest) = key.strip_prefix("deltas/") {
        let mut parts = rest.strip_suffix(".wdelta")?.split('-');
        let ok = num(parts.next()?, Some(20))
            && num(parts.next()?, Some(20))
            && num(parts.next()?, None)
            && parts.next().is_none();
        ok.then_some("delta")
    } else if let Some(rest) = key.strip_prefix("catalog/pages/") {
        let mut parts = rest.strip_suffix(".json")?.split('-');
        let ok = num(parts.next()?, None)
            && num(parts.next()?, Some(20))
            && num(parts.next()?, Some(20))
            && num(parts.next()?, None)
            && parts.next().is_none();
        ok.then_some("page")
    } else {
        None
    }
}

/// A dataset's random 128-bit identity, written as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DatasetId(pub [u8; 16]);

impl DatasetId {
    /// Derives an id from a caller-provided seed (the core has no randomness
    /// of its own; drivers pass random bytes).
    pub fn from_seed(seed: u64) -> Self {
        let mut s = seed;
        let mut out = [0u8; 16];
        for chunk in out.chunks_mut(8) {
            chunk.copy_from_slice(&crate::rng::splitmix64(&mut s).to_le_bytes());
        }
        DatasetId(out)
    }
}

impl fmt::Display for DatasetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for DatasetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatasetId({self})")
    }
}

impl FromStr for DatasetId {
    type Err = DecodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let bad = || {
            DecodeError::Json(format!(
                "dataset_id {} is not 32 lowercase hex digits",
                Quoted::str(s)
            ))
        };
        if b.len() != 32 {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, pair) in b.chunks(2).enumerate() {
            let hex = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            out[i] = (hex(pair[0]).ok_or_else(bad)? << 4) | hex(pair[1]).ok_or_else(bad)?;
        }
        Ok(DatasetId(out))
    }
}

impl Serialize for DatasetId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

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

    fn validate(&self) -> Result<(), String> {
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
}

impl DeltaEntry {
    fn validate(&self) -> Result<(), String> {
        check_key(
            "delta",
            &self.key,
            &delta_key(self.base_lsn, self.lsn, self.epoch),
        )?;
        if self.lsn <= self.base_lsn {
            return Err(format!("delta {} has an empty LSN range", self.key));
        }
        let min = crate::snapshot::HEADER_LEN + crate::snapshot::delta::DELTA_FOOTER_LEN;
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
    fn validate(&self) -> Result<(), String> {
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

/// The catalog head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Head {
    /// Catalog format version.
    pub format: u32,
    /// The dataset's identity.
    pub dataset_id: DatasetId,
    /// Epoch of the publisher that wrote this head.
    pub epoch: u64,
    /// Bumped by one on every head write.
    pub generation: u64,
    /// Everything at or below is visible.
    pub committed_lsn: u64,
    /// Lowest LSN still fetchable from segments.
    pub earliest_lsn: u64,
    /// Random id of the publisher process that claimed `epoch`; tells two
    /// claims of the same epoch apart when an acknowledgement is lost.
    #[serde(default)]
    pub writer: String,
    /// Publisher clock at the commit, ms since the Unix epoch.
    #[serde(default)]
    pub committed_at_ms: u64,
    /// The latest snapshot.
    pub snapshot: Option<SnapshotEntry>,
    /// Recent segments, ascending and contiguous, ending at `committed_lsn`.
    pub segments: Vec<SegmentEntry>,
    /// Older entries, ascending and contiguous with `segments`.
    #[serde(default)]
    pub pages: Vec<PageRef>,
    /// Objects waiting to be deleted.
    #[serde(default)]
    pub retired: Vec<Retired>,
    /// Delta snapshots over `snapshot`, oldest first, each starting where
    /// the one before ends (the first at the snapshot's LSN). Absent when
    /// empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<DeltaEntry>,
    /// Copies of the newest inline segments (at most [`MAX_TAIL_BYTES`] in
    /// all), for replicas following the tail. Absent when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tail: Vec<TailSegment>,
    /// Signed datasets only: the signer, the key rotation chain and the
    /// digest of every object the head names (`docs/FORMAT.md`, "Signed
    /// datasets"). Absent in unsigned heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<HeadTrust>,
}

impl Head {
    /// A claimed, empty dataset.
    pub fn new(dataset_id: DatasetId, epoch: u64) -> Self {
        Head {
            format: FORMAT,
            dataset_id,
            epoch,
            generation: 1,
            committed_lsn: 0,
            earliest_lsn: 1,
            writer: String::new(),
            committed_at_ms: 0,
            snapshot: None,
            segments: Vec::new(),
            pages: Vec::new(),
            retired: Vec::new(),
            deltas: Vec::new(),
            tail: Vec::new(),
            trust: None,
        }
    }

    /// The tail's copy of segment `key`, if the head carries one.
    pub fn tail_body(&self, key: &str) -> Option<&[u8]> {
        self.tail
            .iter()
            .find(|t| t.key == key)
            .map(|t| t.body.as_slice())
    }

    /// Serializes the head: JSON whose first member is `"crc32"`, eight hex
    /// digits of the CRC-32 of every byte after the 20-byte prefix
    /// `{"crc32":"xxxxxxxx",`.
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let rest = &json[1..];
        let mut out = Vec::with_capacity(json.len() + HEAD_PREFIX_LEN);
        out.extend_from_slice(
            format!("{{\"crc32\":\"{:08x}\",", crate::crc::hash(rest)).as_bytes(),
        );
        out.extend_from_slice(rest);
        out
    }

    /// Parses and validates a head, verifying its checksum first. A head
    /// stored gzip-compressed is decoded first ([`head_json`]).
    pub fn decode(bytes: &[u8]) -> Result<Head, DecodeError> {
        let json = head_json(bytes)?;
        let bytes = &json[..];
        if bytes.len() > MAX_HEAD_BYTES {
            return Err(DecodeError::TooLarge {
                what: "catalog head",
                at: 0,
                len: bytes.len() as u64,
                limit: MAX_HEAD_BYTES as u64,
            });
        }
        let prefix = bytes.get(..HEAD_PREFIX_LEN).unwrap_or(bytes);
        let stored = (prefix.len() == HEAD_PREFIX_LEN
            && prefix.starts_with(b"{\"crc32\":\"")
            && prefix.ends_with(b"\","))
        .then(|| std::str::from_utf8(&prefix[10..18]).ok())
        .flatten()
        .filter(|h| {
            h.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        })
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| {
            DecodeError::Json(
                "the head does not start with {\"crc32\":\"<8 hex digits>\", (nor is it gzip this reader decodes)".into(),
            )
        })?;
        crate::codec::check_crc(
            "catalog head",
            HEAD_PREFIX_LEN as u64,
            stored,
            &bytes[HEAD_PREFIX_LEN..],
        )?;
        check_format("catalog head", bytes)?;
        let head = json::head(bytes)?;
        head.validate().map_err(DecodeError::Json)?;
        Ok(head)
    }

    /// The LSN ranges covered, oldest first: pages then inline segments.
    pub fn first_covered_lsn(&self) -> Option<u64> {
        self.pages
            .first()
            .map(|p| p.first_lsn)
            .or_else(|| self.segments.first().map(|s| s.first_lsn))
    }

    fn validate(&self) -> Result<(), String> {
        if self.epoch == 0 {
            return Err("epoch 0 is not valid".into());
        }
        let after = self
            .committed_lsn
            .checked_add(1)
            .ok_or_else(|| "committed_lsn is u64::MAX".to_string())?;
        if self.earliest_lsn == 0 || self.earliest_lsn > after {
            return Err(format!(
                "earliest_lsn {} outside 1..={after}",
                self.earliest_lsn
            ));
        }
        if let Some(s) = &self.snapshot {
            if s.lsn > self.committed_lsn || s.lsn + 1 < self.earliest_lsn {
                return Err(format!(
                    "snapshot LSN {} outside {}..={}",
                    s.lsn,
                    self.earliest_lsn - 1,
                    self.committed_lsn
                ));
            }
        } else if self.earliest_lsn > 1 {
            return Err("earliest_lsn above 1 without a snapshot".into());
        }
        if let Some(s) = &self.snapshot {
            check_key("snapshot", &s.key, &snapshot_key(s.lsn, s.epoch))?;
            // A file shorter than its header and footer cannot be read, and a
            // lazy reader must never ask for an empty suffix.
            let least = crate::snapshot::HEADER_LEN
                + match s.version {
                    crate::snapshot::indexed::VERSION_VERIFIED => {
                        crate::snapshot::indexed::FOOTER_LEN_V4
                    }
                    v if v >= 2 => crate::snapshot::indexed::FOOTER_LEN,
                    _ => 0,
                };
            if s.size < least {
                return Err(format!(
                    "snapshot {} has a size of {} bytes, below the {least} of its header and footer",
                    s.key, s.size
                ));
            }
            if let Some(suffix) = &s.suffix {
                if suffix.len() > MAX_SNAPSHOT_SUFFIX
                    || suffix.len() as u64 > s.size
                    || s.version < 2
                {
                    return Err(format!(
                        "snapshot {} carries a suffix of {} bytes (at most {MAX_SNAPSHOT_SUFFIX}, \
                         within the file, for a block-indexed snapshot)",
                        s.key,
                        suffix.len()
                    ));
                }
            }
        }
        self.validate_deltas()?;
        let mut tail_bytes = 0usize;
        for (i, t) in self.tail.iter().enumerate() {
            if !self.segments.iter().any(|s| s.key == t.key) {
                return Err(format!(
                    "tail segment {} is not one of the head's segments",
                    Quoted::str(&t.key)
                ));
            }
            if self.tail[..i].iter().any(|u| u.key == t.key) {
                return Err(format!(
                    "tail segment {} appears twice",
                    Quoted::str(&t.key)
                ));
            }
            tail_bytes = tail_bytes.saturating_add(t.body.len());
        }
        if tail_bytes > MAX_TAIL_BYTES {
            return Err(format!(
                "the tail carries {tail_bytes} bytes, above the limit {MAX_TAIL_BYTES}"
            ));
        }
        for r in &self.retired {
            if object_kind(&r.key).is_none() {
                return Err(format!(
                    "retired key {} is not a segment, snapshot or page key",
                    Quoted::str(&r.key)
                ));
            }
        }
        // Pages then segments: ascending, contiguous, ending at committed_lsn.
        let mut next: Option<u64> = None;
        for p in &self.pages {
            p.validate()?;
            if p.last_lsn < p.first_lsn || next.is_some_and(|n| n != p.first_lsn) {
                return Err(format!("page {} is not contiguous", p.key));
            }
            next = Some(
                p.last_lsn
                    .checked_add(1)
                    .ok_or_else(|| format!("page {} ends at u64::MAX", p.key))?,
            );
        }
        for s in &self.segments {
            s.validate()?;
            if next.is_some_and(|n| n != s.first_lsn) {
                return Err(format!("segment {} is not contiguous", s.key));
            }
            next = Some(
                s.last_lsn
                    .checked_add(1)
                    .ok_or_else(|| format!("segment {} ends at u64::MAX", s.key))?,
            );
        }
        match next {
            Some(n) if n != after => {
                return Err(format!(
                    "segments end at {} but committed_lsn is {}",
                    n - 1,
                    self.committed_lsn
                ))
            }
            None if self.committed_lsn >= self.earliest_lsn => {
                return Err("no segments cover committed LSNs".into())
            }
            _ => {}
        }
        if let Some(first) = self.first_covered_lsn() {
            if first > self.earliest_lsn {
                return Err(format!(
                    "history starts at {first}, after earliest_lsn {}",
                    self.earliest_lsn
                ));
            }
        }
        self.validate_trust()?;
        Ok(())
    }
}

impl Head {
    /// The LSN the snapshot and its deltas reach together, if there is a
    /// snapshot.
    pub fn delta_lsn(&self) -> Option<u64> {
        let s = self.snapshot.as_ref()?;
        Some(self.deltas.last().map_or(s.lsn, |d| d.lsn))
    }

    fn validate_deltas(&self) -> Result<(), String> {
        if self.deltas.is_empty() {
            return Ok(());
        }
        let Some(s) = &self.snapshot else {
            return Err("delta snapshots without a snapshot".into());
        };
        if self.deltas.len() > MAX_DELTAS {
            return Err(format!(
                "{} delta snapshots, above the limit {MAX_DELTAS}",
                self.deltas.len()
            ));
        }
        let mut at = s.lsn;
        for d in &self.deltas {
            d.validate()?;
            if d.base_lsn != at {
                return Err(format!(
                    "delta {} starts after LSN {}, not where the chain ends ({at})",
                    d.key, d.base_lsn
                ));
            }
            at = d.lsn;
        }
        if at > self.committed_lsn {
            return Err(format!(
                "delta snapshots reach LSN {at}, above committed_lsn {}",
                self.committed_lsn
            ));
        }
        Ok(())
    }
}

fn check_format(what: &str, bytes: &[u8]) -> Result<(), DecodeError> {
    let format = json::format_of(what, bytes)?;
    if format != FORMAT {
        return Err(DecodeError::UnsupportedVersion {
            what: "catalog",
            version: u64::from(format),
            known: u64::from(FORMAT),
        });
    }
    Ok(())
}

/// An immutable catalog page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Page {
    /// Catalog format version.
    pub format: u32,
    /// Level: 0 holds segments, `L > 0` holds references of level `L - 1`.
    pub level: u32,
    /// Segment entries (level 0).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<SegmentEntry>,
    /// Page references (level above 0).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pages: Vec<PageRef>,
    /// Signed datasets only: SHA-256 of every segment or page the page
    /// names, by key.
    #[serde(default, skip_serializing_if = "Digests::is_empty")]
    pub digests: Digests,
}

impl Page {
    /// Serializes the page.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and validates a page against the reference that named it.
    pub fn decode(bytes: &[u8], r: &PageRef) -> Result<Page, DecodeError> {
        if bytes.len() > MAX_PAGE_BYTES {
            return Err(DecodeError::TooLarge {
                what: "catalog page",
                at: 0,
                len: bytes.len() as u64,
                limit: MAX_PAGE_BYTES as u64,
            });
        }
        crate::codec::check_crc("catalog page", 0, r.crc32, bytes)?;
        check_format("catalog page", bytes)?;
        let page = json::page(bytes)?;
        let (first, last, count) = if page.level == 0 {
            for s in &page.segments {
                s.validate().map_err(DecodeError::Json)?;
            }
            (
                page.segments.first().map(|s| s.first_lsn),
                page.segments.last().map(|s| s.last_lsn),
                page.segments.len(),
            )
        } else {
            for p in &page.pages {
                p.validate().map_err(DecodeError::Json)?;
            }
            (
                page.pages.first().map(|s| s.first_lsn),
                page.pages.last().map(|s| s.last_lsn),
                page.pages.len(),
            )
        };
        let contiguous = if page.level == 0 {
            page.segments
                .windows(2)
                .all(|w| w[0].last_lsn.checked_add(1) == Some(w[1].first_lsn))
        } else {
            page.pages
                .windows(2)
                .all(|w| w[0].last_lsn.checked_add(1) == Some(w[1].first_lsn))
                && page
                    .pages
                    .iter()
                    .all(|p| p.level.checked_add(1) == Some(page.level))
        };
        let named: Vec<&str> = page
            .segments
            .iter()
            .map(|s| s.key.as_str())
            .chain(page.pages.iter().map(|p| p.key.as_str()))
            .collect();
        check_digests("page", &page.digests, &named).map_err(DecodeError::Json)?;
        if page.level != r.level
            || first != Some(r.first_lsn)
            || last != Some(r.last_lsn)
            || count != r.count as usize
            || !contiguous
        {
            return Err(DecodeError::Json(format!(
                "page {} does not match its reference",
                r.key
            )));
        }
        Ok(page)
    }
}

/// Key of a segment: `segments/<epoch>/<first:020>-<last:020>.wseg`.
pub fn segment_key(epoch: u64, first: u64, last: u64) -> String {
    format!("segments/{epoch}/{first:020}-{last:020}.wseg")
}

/// Key of a snapshot: `snapshots/<lsn:020>-<epoch>.wsnap`.
pub fn snapshot_key(lsn: u64, epoch: u64) -> String {
    format!("snapshots/{lsn:020}-{epoch}.wsnap")
}

/// Key of a delta snapshot: `deltas/<base:020>-<lsn:020>-<epoch>.wdelta`.
pub fn delta_key(base_lsn: u64, lsn: u64, epoch: u64) -> String {
    format!("deltas/{base_lsn:020}-{lsn:020}-{epoch}.wdelta")
}

/// Key of a page: `catalog/pages/<level>-<first:020>-<last:020>-<epoch>.json`.
pub fn page_key(level: u32, first: u64, last: u64, epoch: u64) -> String {
    format!("catalog/pages/{level}-{first:020}-{last:020}-{epoch}.json")
}

#[cfg(all(test, feature = "gzip"))]
mod gzip_tests {
    use super::*;
    use std::io::Write as _;

    const HEAD: &[u8] = include_bytes!("../../tests/golden/head.json");

    fn gzip_raw(data: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn a_gzip_head_decodes_to_the_same_head() {
        let plain = Head::decode(HEAD).unwrap();
        let gz = gzip_head(HEAD);
        assert!(gz.starts_with(&GZIP_MAGIC) && gz.len() < HEAD.len());
        assert_eq!(Head::decode(&gz).unwrap(), plain);
        assert_eq!(&head_json(&gz).unwrap()[..], HEAD);
        // Plain JSON is passed through untouched.
        assert!(matches!(
            head_json(HEAD).unwrap(),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_head_bound() {
        // 64 MiB of spaces after the head: less than a GET of the head
        // may bring.
        let mut big = HEAD.to_vec();
        big.resize(64 << 20, b' ');
        let gz = gzip_raw(&big);
        assert!(gz.len() < MAX_HEAD_BYTES, "{}", gz.len());
        let err = Head::decode(&gz).unwrap_err();
        assert!(
            matches!(err, DecodeError::TooLarge { len, limit, .. }
                if limit == MAX_HEAD_BYTES as u64 && len == limit + 1),
            "{err}"
        );
    }

    #[test]
    fn damaged_truncated_or_trailed_gzip_is_refused() {
        let gz = gzip_head(HEAD);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", gz[..gz.len() - 9].to_vec()),
            ("magic only", GZIP_MAGIC.to_vec()),
            ("trailing bytes", [gz.clone(), b"{}".to_vec()].concat()),
            ("a second member", [gz.clone(), gz.clone()].concat()),
            ("a flipped bit", {
                let mut d = gz.clone();
                let mid = d.len() / 2;
                d[mid] ^= 0x10;
                d
            }),
            ("not JSON inside", gzip_raw(b"\x00\x01 not a head")),
        ];
        for (what, bytes) in cases {
            let err = Head::decode(&bytes).expect_err(what);
            assert!(
                matches!(
                    err,
                    DecodeError::Json(_)
                        | DecodeError::Checksum { .. }
                        | DecodeError::TooLarge { .. }
                ),
                "{what}: {err}"
            );
        }
    }
}
