//! The segment file: an immutable, checksummed run of WAL records with dense
//! LSNs, a sparse LSN→offset index and a trailer. See `docs/FORMAT.md`.

use serde::Serialize;

use crate::codec::{check_crc, invalid, Reader};
use crate::error::DecodeError;

/// Magic at the start of a segment.
pub const MAGIC: [u8; 4] = *b"WCSG";
/// Magic at the end of a segment.
pub const TRAILER_MAGIC: [u8; 4] = *b"WCSE";
/// Segment format version written by this crate.
pub const VERSION: u16 = 1;
/// Bytes in the segment header.
pub const HEADER_LEN: u64 = 32;
/// Bytes of framing before each record's payload.
pub const RECORD_HEADER_LEN: u64 = 16;
/// Bytes in the trailer.
pub const TRAILER_LEN: u64 = 40;
/// Bytes per index entry.
pub const INDEX_ENTRY_LEN: u64 = 16;
/// Largest record payload accepted.
pub const MAX_RECORD_LEN: u64 = 64 << 20;
/// Default bytes of records between two index entries.
pub const DEFAULT_INDEX_INTERVAL: u64 = 64 << 10;

/// One entry of the sparse index: the record with `lsn` starts at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(into = "(u64, u64)")]
pub struct IndexEntry {
    /// LSN of the indexed record.
    pub lsn: u64,
    /// Byte offset of its framing from the start of the file.
    pub offset: u64,
}

impl From<(u64, u64)> for IndexEntry {
    fn from((lsn, offset): (u64, u64)) -> Self {
        IndexEntry { lsn, offset }
    }
}

impl From<IndexEntry> for (u64, u64) {
    fn from(e: IndexEntry) -> Self {
        (e.lsn, e.offset)
    }
}

/// A verified record borrowed from a segment's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// The record's LSN.
    pub lsn: u64,
    /// The payload (a KV batch in KV mode).
    pub payload: &'a [u8],
}

/// Appends one framed record (lsn, len, crc, payload) to `out`: the framing
/// of segment records, also used by local logs. `payload` must be at most
/// [`MAX_RECORD_LEN`] bytes.
pub fn encode_record(lsn: u64, payload: &[u8], out: &mut Vec<u8>) {
    let lsn = lsn.to_le_bytes();
    let len = (payload.len() as u32).to_le_bytes();
    let mut h = crate::crc::Hasher::new();
    h.update(&lsn);
    h.update(&len);
    h.update(payload);
    out.extend_from_slice(&lsn);
    out.extend_from_slice(&len);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
}

/// Builds a segment in memory, record by record.
#[derive(Debug)]
pub struct SegmentBuilder {
    buf: Vec<u8>,
    epoch: u64,
    first_lsn: u64,
    next_lsn: u64,
    index: Vec<IndexEntry>,
    last_indexed: u64,
    index_interval: u64,
}

/// The facts about a sealed segment that the catalog records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSummary {
    /// Epoch that sealed it.
    pub epoch: u64,
    /// First LSN.
    pub first_lsn: u64,
    /// Last LSN.
    pub last_lsn: u64,
    /// End of the records (start of the index).
    pub records_end: u64,
    /// Size of the whole file.
    pub size: u64,
    /// `crc32` of the whole file.
    pub crc32: u32,
    /// The full sparse index.
    pub index: Vec<IndexEntry>,
}

impl SegmentBuilder {
    /// Starts a segment for `epoch` whose first record will be `first_lsn`.
    pub fn new(epoch: u64, first_lsn: u64) -> Self {
        Self::with_index_interval(epoch, first_lsn, DEFAULT_INDEX_INTERVAL)
    }

    /// Like [`SegmentBuilder::new`] with a custom index interval in bytes.
    pub fn with_index_interval(epoch: u64, first_lsn: u64, index_interval: u64) -> Self {
        let mut buf = Vec::with_capacity(4096);
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&0u16.to_le_bytes());
        buf.extend_from_slice(&epoch.to_le_bytes());
        buf.extend_from_slice(&first_lsn.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        let crc = crate::crc::hash(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        SegmentBuilder {
            buf,
            epoch,
            first_lsn,
            next_lsn: first_lsn,
            index: Vec::new(),
            last_indexed: 0,
            index_interval: index_interval.max(1),
        }
    }

    /// The LSN the next record must carry.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// Records appended so far.
    pub fn record_count(&self) -> u64 {
        self.next_lsn - self.first_lsn
    }

    /// Bytes of the file so far (without index and trailer).
    pub fn len(&self) -> u64 {
        self.buf.len() as u64
    }

    /// True when no record has been appended.
    pub fn is_empty(&self) -> bool {
        self.next_lsn == self.first_lsn
    }

    /// Appends the record for [`next_lsn`](Self::next_lsn).
    ///
    /// # Panics
    /// Never; a payload above [`MAX_RECORD_LEN`] is the caller's bug and is
    /// rejected by returning `false` without appending.
    #[must_use]
    pub fn push(&mut self, payload: &[u8]) -> bool {
        if payload.len() as u64 > MAX_RECORD_LEN {
            return false;
        }
        let offset = self.buf.len() as u64;
        if self.index.is_empty() || offset - self.last_indexed >= self.index_interval {
            self.index.push(IndexEntry {
                lsn: self.next_lsn,
                offset,
            });
            self.last_indexed = offset;
        }
        encode_record(self.next_lsn, payload, &mut self.buf);
        self.next_lsn += 1;
        true
    }

    /// Writes index and trailer and returns the file and its summary.
    /// Returns `None` when the segment holds no record.
    pub fn finish(mut self) -> Option<(Vec<u8>, SegmentSummary)> {
        if self.is_empty() {
            return None;
        }
        let records_end = self.buf.len() as u64;
        let index_start = self.buf.len();
        for e in &self.index {
            self.buf.extend_from_slice(&e.lsn.to_le_bytes());
            self.buf.extend_from_slice(&e.offset.to_le_bytes());
        }
        let index_crc = crate::crc::hash(&self.buf[index_start..]);
        let trailer_start = self.buf.len();
        let last_lsn = self.next_lsn - 1;
        self.buf.extend_from_slice(&records_end.to_le_bytes());
        self.buf.extend_from_slice(&self.first_lsn.to_le_bytes());
        self.buf.extend_from_slice(&last_lsn.to_le_bytes());
        self.buf
            .extend_from_slice(&(self.index.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&index_crc.to_le_bytes());
        let tcrc = crate::crc::hash(&self.buf[trailer_start..]);
        self.buf.extend_from_slice(&tcrc.to_le_bytes());
        self.buf.extend_from_slice(&TRAILER_MAGIC);
        let summary = SegmentSummary {
            epoch: self.epoch,
            first_lsn: self.first_lsn,
            last_lsn,
            records_end,
            size: self.buf.len() as u64,
            crc32: crate::crc::hash(&self.buf),
            index: self.index,
        };
        Some((self.buf, summary))
    }
}

/// A segment's trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Start of the index (end of the records).
    pub footer_offset: u64,
    /// First LSN.
    pub first_lsn: u64,
    /// Last LSN.
    pub last_lsn: u64,
    /// Number of index entries.
    pub index_count: u32,
    /// `crc32` of the index entries.
    pub index_crc: u32,
}

impl Trailer {
    /// Size of the whole file this trailer describes (saturating at
    /// `u64::MAX` for a damaged trailer, which then matches no real file).
    pub fn file_size(&self) -> u64 {
        self.footer_offset
            .saturating_add(INDEX_ENTRY_LEN * u64::from(self.index_count))
            .saturating_add(TRAILER_LEN)
    }
}

/// Decodes the last [`TRAILER_LEN`] bytes of a segment (a suffix range GET).
pub fn decode_trailer(bytes: &[u8]) -> Result<Trailer, DecodeError> {
    if bytes.len() as u64 != TRAILER_LEN {
        return Err(DecodeError::Truncated {
            what: "segment trailer",
            at: 0,
            need: TRAILER_LEN,
            have: bytes.len() as u64,
        });
    }
    let mut r = Reader::new(bytes, 0);
    let footer_offset = r.u64("segment trailer")?;
    let first_lsn = r.u64("segment trailer")?;
    let last_lsn = r.u64("segment trailer")?;
    let index_count = r.u32("segment trailer")?;
    let index_crc = r.u32("segment trailer")?;
    let stored = r.u32("segment trailer")?;
    check_crc("segment trailer", 32, stored, &bytes[..32])?;
    r.magic(&TRAILER_MAGIC, "segment trailer")?;
    if first_lsn == 0 || last_lsn < first_lsn {
        return Err(invalid(
            "segment trailer",
            8,
            format!("LSN range {first_lsn}..={last_lsn} is empty or starts at 0"),
        ));
    }
    if footer_offset < HEADER_LEN + RECORD_HEADER_LEN {
        return Err(invalid(
            "segment trailer",
            0,
            "footer offset inside the header",
        ));
    }
    Ok(Trailer {
        footer_offset,
        first_lsn,
        last_lsn,
        index_count,
        index_crc,
    })
}

/// Decodes the index entries that sit between `footer_offset` and the trailer.
pub fn decode_index(bytes: &[u8], trailer: &Trailer) -> Result<Vec<IndexEntry>, DecodeError> {
    let need = INDEX_ENTRY_LEN * u64::from(trailer.index_count);
    if bytes.len() as u64 != need {
        return Err(DecodeError::Truncated {
            what: "segment index",
            at: trailer.footer_offset,
            need,
            have: bytes.len() as u64,
        });
    }
    check_crc(
        "segment index",
        trailer.footer_offset,
        trailer.index_crc,
        bytes,
    )?;
    let mut r = Reader::new(bytes, trailer.footer_offset);
    let mut out = Vec::with_capacity(trailer.index_count as usize);
    let mut prev: Option<IndexEntry> = None;
    while !r.is_empty() {
        let at = r.offset();
        let e = IndexEntry {
            lsn: r.u64("segment index")?,
            offset: r.u64("segment index")?,
        };
        let ordered = match prev {
            None => e.lsn == trailer.first_lsn && e.offset == HEADER_LEN,
            Some(p) => e.lsn > p.lsn && e.offset > p.offset,
        };
        if !ordered || e.lsn > trailer.last_lsn || e.offset >= trailer.footer_offset {
            return Err(invalid(
                "segment index",
                at,
                "entries out of order or out of range",
            ));
        }
        prev = Some(e);
        out.push(e);
    }
    Ok(out)
}

/// The header of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Epoch that sealed the segment.
    pub epoch: u64,
    /// First LSN.
    pub first_lsn: u64,
}

/// Decodes and verifies the 32-byte header.
pub fn decode_header(bytes: &[u8]) -> Result<Header, DecodeError> {
    let mut r = Reader::new(bytes, 0);
    r.magic(&MAGIC, "segment header")?;
    let version = r.u16("segment header")?;
    let flags = r.u16("segment header")?;
    let epoch = r.u64("segment header")?;
    let first_lsn = r.u64("segment header")?;
    let reserved = r.u32("segment header")?;
    let stored = r.u32("segment header")?;
    check_crc("segment header", 28, stored, &bytes[..28])?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion {
            what: "segment",
            version: u64::from(version),
            known: u64::from(VERSION),
        });
    }
    if flags != 0 {
        return Err(DecodeError::UnknownFlags {
            what: "segment",
            flags,
        });
    }
    if reserved != 0 {
        return Err(invalid("segment header", 24, "reserved field is not zero"));
    }
    Ok(Header { epoch, first_lsn })
}

/// A fully verified segment: header, trailer, index, and every record.
#[derive(Debug, Clone)]
pub struct Segment<'a> {
    /// The header.
    pub header: Header,
    /// The trailer.
    pub trailer: Trailer,
    /// The full sparse index.
    pub index: Vec<IndexEntry>,
    records: &'a [u8],
}

impl<'a> Segment<'a> {
    /// Iterates the (already verified) records. [`decode`] checked every
    /// record's checksum and LSN over these same borrowed bytes, so the
    /// iterator only re-reads the framing and does not hash again.
    pub fn records(&self) -> Records<'a> {
        Records::new(self.records, HEADER_LEN, self.header.first_lsn).already_verified()
    }
}

/// Decodes a whole segment file and verifies every checksum and every LSN.
///
/// `expected_crc`, when given, is the whole-file checksum from the catalog:
/// once it matches, the records' own checksums are not computed again (the
/// file's covers their bytes); without it every record's is checked.
pub fn decode(bytes: &[u8], expected_crc: Option<u32>) -> Result<Segment<'_>, DecodeError> {
    decode_with(bytes, expected_crc, |_| {})
}

/// [`decode`], handing each record to `visit` during its one walk over the
/// records, so a caller that wants the records does not walk them again.
/// `visit` sees a record once its framing, LSN and (without
/// `expected_crc`) checksum are checked, before the checks of the whole
/// file end: a caller keeps what it gathered only when this returns `Ok`.
pub fn decode_with<'a>(
    bytes: &'a [u8],
    expected_crc: Option<u32>,
    mut visit: impl FnMut(Record<'a>),
) -> Result<Segment<'a>, DecodeError> {
    // Only the walk is generic: the checks around it are shared.
    let (seg, walk) = decode_frame(bytes, expected_crc)?;
    let mut last = None;
    for rec in walk {
        let rec = rec?;
        last = Some(rec.lsn);
        visit(rec);
    }
    check_last(&seg, last)?;
    Ok(seg)
}

/// The checks of [`decode_with`] before its walk: the file checksum,
/// trailer, header and index; returns the segment and the walk over its
/// records.
fn decode_frame(
    bytes: &[u8],
    expected_crc: Option<u32>,
) -> Result<(Segment<'_>, Records<'_>), DecodeError> {
    let len = bytes.len() as u64;
    if len < HEADER_LEN + TRAILER_LEN {
        return Err(DecodeError::Truncated {
            what: "segment",
            at: 0,
            need: HEADER_LEN + TRAILER_LEN,
            have: len,
        });
    }
    if let Some(stored) = expected_crc {
        check_crc("segment file (catalog checksum)", 0, stored, bytes)?;
    }
    let trailer = decode_trailer(&bytes[(len - TRAILER_LEN) as usize..])
        .map_err(|e| shift(e, len - TRAILER_LEN))?;
    if trailer.file_size() != len {
        return Err(invalid(
            "segment trailer",
            len - TRAILER_LEN,
            format!(
                "trailer describes {} bytes, file has {len}",
                trailer.file_size()
            ),
        ));
    }
    let header = decode_header(&bytes[..HEADER_LEN as usize])?;
    if header.first_lsn != trailer.first_lsn {
        return Err(invalid(
            "segment header",
            16,
            "first LSN differs from the trailer's",
        ));
    }
    let fo = trailer.footer_offset as usize;
    let index = decode_index(&bytes[fo..(len - TRAILER_LEN) as usize], &trailer)?;
    let records = &bytes[HEADER_LEN as usize..fo];
    let mut walk = Records::new(records, HEADER_LEN, header.first_lsn);
    if expected_crc.is_some() {
        // The catalog's checksum of the whole file matched above: it covers
        // every record's bytes already, so hashing each record a second
        // time adds nothing. Framing, lengths and LSN order are still
        // checked record by record.
        walk = walk.already_verified();
    }
    let seg = Segment {
        header,
        trailer,
        index,
        records,
    };
    Ok((seg, walk))
}

/// The check of [`decode_with`] after its walk: the records ended at the
/// trailer's last LSN.
fn check_last(seg: &Segment<'_>, last: Option<u64>) -> Result<(), DecodeError> {
    let trailer = &seg.trailer;
    if last != Some(trailer.last_lsn) {
        return Err(invalid(
            "segment records",
            trailer.footer_offset,
            format!(
                "records end at LSN {}, trailer says {}",
                last.map_or_else(|| "(none)".to_string(), |l| l.to_string()),
                trailer.last_lsn
            ),
        ));
    }
    Ok(())
}

fn shift(e: DecodeError, by: u64) -> DecodeError {
    match e {
        DecodeError::Truncated {
            what,
            at,
            need,
            have,
        } => DecodeError::Truncated {
            what,
            at: at + by,
            need,
            have,
        },
        DecodeError::BadMagic {
            what,
            at,
            expected,
            found,
        } => DecodeError::BadMagic {
            what,
            at: at + by,
            expected,
            found,
        },
        DecodeError::Checksum {
            what,
            at,
            stored,
            computed,
        } => DecodeError::Checksum {
            what,
            at: at + by,
            stored,
            computed,
        },
        DecodeError::Invalid { what, at, why } => DecodeError::Invalid {
            what,
            at: at + by,
            why,
        },
        other => other,
    }
}

/// Iterator over framed records, verifying each record's checksum and that
/// LSNs are dense. Stops after the first error.
#[derive(Debug, Clone)]
pub struct Records<'a> {
    buf: &'a [u8],
    pos: usize,
    base: u64,
    next_lsn: u64,
    failed: bool,
    /// True when every record was verified already (by [`decode`] over
    /// the same bytes): checksums are not computed again.
    verified: bool,
    /// A fresh hasher, cloned per record (its CPU feature detection runs
    /// once per iterator, not once per record).
    hasher: crate::crc::Hasher,
}

impl<'a> Records<'a> {
    /// Records in `buf`, which starts at byte `base` of the file and whose
    /// first record must carry `first_lsn`.
    pub fn new(buf: &'a [u8], base: u64, first_lsn: u64) -> Self {
        Records {
            buf,
            pos: 0,
            base,
            next_lsn: first_lsn,
            failed: false,
            verified: false,
            hasher: crate::crc::Hasher::new(),
        }
    }

    /// The LSN the next record must carry.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// The same iterator over records whose checksums [`decode`] verified
    /// already, over these same bytes: framing and LSN order are still
    /// checked, checksums are not computed again.
    pub fn already_verified(mut self) -> Self {
        self.verified = true;
        self
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.buf.len() {
            return None;
        }
        let res = self.step();
        if res.is_err() {
            self.failed = true;
        }
        Some(res)
    }
}

impl<'a> Records<'a> {
    fn step(&mut self) -> Result<Record<'a>, DecodeError> {
        // The hot path: a whole record with the expected LSN. Anything else
        // goes the careful way below, which names what is wrong.
        let rest = &self.buf[self.pos..];
        if let Some((head, body)) = rest.split_first_chunk::<16>() {
            let lsn = u64::from_le_bytes(*head.first_chunk::<8>().unwrap_or(&[0; 8]));
            let mut word = [0u8; 4];
            word.copy_from_slice(&head[8..12]);
            let len = u32::from_le_bytes(word) as usize;
            word.copy_from_slice(&head[12..16]);
            let stored = u32::from_le_bytes(word);
            if lsn == self.next_lsn && len as u64 <= MAX_RECORD_LEN && len <= body.len() {
                let payload = &body[..len];
                if !self.verified {
                    self.check(self.base + self.pos as u64, stored, payload)?;
                }
                self.pos += 16 + len;
                self.next_lsn = self.next_lsn.wrapping_add(1);
                return Ok(Record { lsn, payload });
            }
        }
        let at = self.base + self.pos as u64;
        let mut r = Reader::new(&self.buf[self.pos..], at);
        let lsn = r.u64("record framing")?;
        let len = r.u32("record framing")?;
        let stored = r.u32("record framing")?;
        if u64::from(len) > MAX_RECORD_LEN {
            return Err(DecodeError::TooLarge {
                what: "record payload",
                at: at + 8,
                len: u64::from(len),
                limit: MAX_RECORD_LEN,
            });
        }
        let payload = r.bytes(u64::from(len), "record payload")?;
        if !self.verified {
            self.check(at, stored, payload)?;
        }
        if lsn != self.next_lsn {
            return Err(DecodeError::LsnOrder {
                at,
                expected: self.next_lsn,
                found: lsn,
            });
        }
        self.pos += r.pos();
        // Wraps after LSN u64::MAX: no record can follow it (LSN 0 never
        // verifies against a catalog's or trailer's last LSN).
        self.next_lsn = self.next_lsn.wrapping_add(1);
        Ok(Record { lsn, payload })
    }

    /// Checks one record's checksum: `crc32` of its LSN and length (the 12
    /// bytes at `self.pos`) then its payload.
    fn check(&self, at: u64, stored: u32, payload: &[u8]) -> Result<(), DecodeError> {
        let mut h = self.hasher.clone();
        h.update(&self.buf[self.pos..self.pos + 12]);
        h.update(payload);
        let computed = h.finalize();
        if computed != stored {
            return Err(DecodeError::Checksum {
                what: "record",
                at,
                stored,
                computed,
            });
        }
        Ok(())
    }
}
