//! The delta snapshot (snapshot format version 3): the keys written between
//! two LSNs, sorted, each with its newest value or a deletion mark, in the
//! block format of version 2, with one index block, a key filter (a Bloom
//! filter) and a fixed 64-byte footer. A replica applies a chain of deltas
//! over a base snapshot; a cold point read fetches the index and filter of
//! every delta with one suffix GET each (all in flight together), and then
//! one data block of the newest delta whose filter and index say it may hold
//! the key. See `docs/FORMAT.md`, "Delta snapshot".
//!
//! [`DeltaIndex`] is the pure reader of the suffix (footer, index, filter);
//! [`DeltaIndex::lookup`] verifies one data block and reads a key from it;
//! [`decode_delta`] verifies and decodes a whole delta.

use super::block::{Block, BlockBuilder, BlockHandle};
use super::{SnapshotHeader, HEADER_LEN, MAGIC};
use crate::catalog::DatasetId;
use crate::codec::{check_crc, invalid, le32, le64, Reader};
use crate::error::DecodeError;

/// Version of the delta snapshot.
pub const VERSION_DELTA: u16 = 3;
/// Bytes of the footer.
pub const DELTA_FOOTER_LEN: u64 = 64;
/// The CRC-32 of a delta's footer fields (the first 56 of its last
/// [`DELTA_FOOTER_LEN`] bytes: the checksum the footer carries), which
/// catalog entries record; `tail` is the file or any suffix of it.
pub fn footer_crc32(tail: &[u8]) -> u32 {
    let end = tail.len().saturating_sub(8);
    crate::crc::hash(
        &tail[tail
            .len()
            .saturating_sub(DELTA_FOOTER_LEN as usize)
            .min(end)..end],
    )
}
/// Magic at the end of a delta snapshot.
pub const DELTA_FOOTER_MAGIC: [u8; 4] = *b"WCD1";
/// Default target bytes of a data block.
pub const DEFAULT_DELTA_BLOCK_BYTES: usize = 16 << 10;
/// Bits of filter per key.
pub const FILTER_BITS_PER_KEY: u64 = 10;
/// Probes per key (about 1% false positives at 10 bits a key).
pub const FILTER_PROBES: u8 = 7;
/// Bytes of the filter header: `nbits: u32, probes: u8, reserved: [u8; 3]`.
pub const FILTER_HEADER_LEN: usize = 8;
/// Most bytes of bits [`KeyFilter::build`] gives a delta's filter (that of
/// 209,715 keys at 10 bits a key).
pub const MAX_BUILT_FILTER_BYTES: u64 = 256 << 10;
/// Largest filter accepted (bits of 13 million keys).
pub const MAX_FILTER_BYTES: u64 = 16 << 20;
/// Largest index block accepted.
pub const MAX_DELTA_INDEX_BYTES: u64 = 16 << 20;
/// The index and filter (suffix) of a delta that every lazy reader takes:
/// readers hold them beside their cache, up to its bytes and at least
/// this many, and publishers write no delta with a larger suffix.
pub const MAX_LAZY_SUFFIX: u64 = 4 << 20;
/// Tag of an entry's value: the key holds the bytes after the tag.
pub const TAG_PUT: u8 = 0;
/// Tag of an entry's value: the key was deleted (nothing follows the tag).
pub const TAG_DELETE: u8 = 1;

/// One key's change in a delta: the newest value, or `None` for a deletion.
pub type Change = Option<Vec<u8>>;

/// The footer of a delta snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaFooter {
    /// The delta holds the changes after this LSN (up to the header's LSN).
    pub base_lsn: u64,
    /// The index block (first key and handle of every data block).
    pub index: BlockHandle,
    /// The key filter.
    pub filter: BlockHandle,
    /// Entries (changed keys) in the delta.
    pub entry_count: u64,
    /// Data blocks in the delta.
    pub data_blocks: u32,
}

impl DeltaFooter {
    /// The footer's 64 bytes.
    pub fn encode(&self) -> [u8; DELTA_FOOTER_LEN as usize] {
        let mut b = [0u8; DELTA_FOOTER_LEN as usize];
        b[..8].copy_from_slice(&self.base_lsn.to_le_bytes());
        b[8..24].copy_from_slice(&self.index.encode());
        b[24..40].copy_from_slice(&self.filter.encode());
        b[40..48].copy_from_slice(&self.entry_count.to_le_bytes());
        b[48..52].copy_from_slice(&self.data_blocks.to_le_bytes());
        let crc = crate::crc::hash(&b[..56]);
        b[56..60].copy_from_slice(&crc.to_le_bytes());
        b[60..].copy_from_slice(&DELTA_FOOTER_MAGIC);
        b
    }

    /// Parses the footer of a delta of `size` bytes; `bytes` are its last 64.
    pub fn decode(bytes: &[u8], size: u64) -> Result<DeltaFooter, DecodeError> {
        let what = "delta footer";
        let at = super::check_footer(what, bytes, size, DELTA_FOOTER_LEN, DELTA_FOOTER_MAGIC)?;
        // 64 bytes, checked above: fixed offsets from here on.
        let base_lsn = le64(bytes, 0);
        let index = BlockHandle::decode(&bytes[8..24], at + 8)?;
        let filter = decode_filter_handle(&bytes[24..40], at + 24)?;
        let entry_count = le64(bytes, 40);
        let data_blocks = le32(bytes, 48);
        let reserved = le32(bytes, 52);
        if reserved != 0 {
            return Err(invalid(what, at, "reserved bits set"));
        }
        let body_end = size - DELTA_FOOTER_LEN;
        if index.offset < HEADER_LEN
            || index.end() != filter.offset
            || filter.end() != body_end
            || u64::from(index.len) > MAX_DELTA_INDEX_BYTES
        {
            return Err(invalid(
                what,
                at,
                "the index or filter lies outside the file",
            ));
        }
        Ok(DeltaFooter {
            base_lsn,
            index,
            filter,
            entry_count,
            data_blocks,
        })
    }

    /// Bytes from the index block to the end of the file: what one suffix
    /// GET must fetch for [`DeltaIndex::decode_suffix`].
    pub fn suffix_len(&self, size: u64) -> u64 {
        size.saturating_sub(self.index.offset)
    }
}

/// A filter handle: the block handle layout, with the filter's own bounds.
/// `bytes` are the footer's 16 bytes of the handle.
fn decode_filter_handle(bytes: &[u8], at: u64) -> Result<BlockHandle, DecodeError> {
    let h = BlockHandle::fields(bytes);
    let len = u64::from(h.len);
    if len < FILTER_HEADER_LEN as u64 || len > FILTER_HEADER_LEN as u64 + MAX_FILTER_BYTES {
        return Err(invalid(
            "delta filter handle",
            at,
            format!("filter length {len} outside the format's bounds"),
        ));
    }
    Ok(h)
}

/// FNV-1a, 64 bits: the key hash the filter probes with.
pub(crate) fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The bit positions `key` sets in a filter of `nbits` bits.
fn probes(key: &[u8], nbits: u32, k: u8) -> impl Iterator<Item = u32> {
    hash_probes(key_hash(key), nbits, k)
}

/// The bit positions of a key of hash `h` ([`key_hash`]).
fn hash_probes(h: u64, nbits: u32, k: u8) -> impl Iterator<Item = u32> {
    let h1 = h as u32;
    let h2 = ((h >> 32) as u32) | 1;
    let n = nbits.max(1);
    (0..u32::from(k)).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % n)
}

/// A verified key filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFilter {
    nbits: u32,
    probes: u8,
    bits: Vec<u8>,
}

impl KeyFilter {
    /// A filter for `keys` (10 bits a key, 7 probes).
    /// A delta with more keys than fit [`MAX_BUILT_FILTER_BYTES`] at 10 bits
    /// gets a filter of that size, with fewer probes (3 at about 5 bits a
    /// key, some 9% false positives): its suffix, which a cold read fetches
    /// whole, stays small however many keys the delta holds. Such a delta is
    /// the oldest of a chain, whose newer deltas a point read checks first,
    /// and a point read fetches blocks from two places that may hold a key
    /// at once, so its false positives cost bytes, seldom a round trip.
    pub fn build<'a>(keys: impl ExactSizeIterator<Item = &'a [u8]>) -> KeyFilter {
        let n = keys.len() as u64;
        let bits = (n * FILTER_BITS_PER_KEY).min(MAX_BUILT_FILTER_BYTES * 8);
        // Past the cap, probes: bits a key times ln 2.
        let probes = if bits == n * FILTER_BITS_PER_KEY {
            FILTER_PROBES
        } else {
            (bits * 69 / 100 / n).clamp(1, u64::from(FILTER_PROBES)) as u8
        };
        let mut f = KeyFilter::sized(bits, probes);
        for k in keys {
            f.insert_hash(key_hash(k));
        }
        f
    }

    /// A filter for the keys of these hashes ([`key_hash`]; repeats are
    /// harmless but size the filter), of `bits_per_key` and `probes`.
    pub(crate) fn from_hashes(hashes: &[u64], bits_per_key: u64, probes: u8) -> KeyFilter {
        let mut f = KeyFilter::sized(hashes.len() as u64 * bits_per_key, probes);
        for &h in hashes {
            f.insert_hash(h);
        }
        f
    }

    fn sized(bits: u64, probes: u8) -> KeyFilter {
        let nbits = bits.clamp(64, MAX_FILTER_BYTES * 8).div_ceil(8) * 8;
        let nbits = nbits as u32;
        KeyFilter {
            nbits,
            probes,
            bits: vec![0u8; (nbits / 8) as usize],
        }
    }

    fn insert_hash(&mut self, h: u64) {
        for p in hash_probes(h, self.nbits, self.probes) {
            self.bits[(p / 8) as usize] |= 1 << (p % 8);
        }
    }

    /// Bytes of [`encode`](Self::encode)'s output.
    pub fn encoded_len(&self) -> usize {
        FILTER_HEADER_LEN + self.bits.len()
    }

    /// The filter's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FILTER_HEADER_LEN + self.bits.len());
        out.extend_from_slice(&self.nbits.to_le_bytes());
        out.push(self.probes);
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&self.bits);
        out
    }

    /// Parses and verifies the filter `handle` names.
    pub fn decode(bytes: &[u8], handle: &BlockHandle) -> Result<KeyFilter, DecodeError> {
        let what = "delta filter";
        let at = handle.offset;
        if bytes.len() as u64 != u64::from(handle.len) {
            return Err(DecodeError::Truncated {
                what,
                at,
                need: u64::from(handle.len),
                have: bytes.len() as u64,
            });
        }
        check_crc(what, at, handle.crc, bytes)?;
        KeyFilter::parse(bytes, what, at)
    }

    /// Parses a filter's bytes (header and bits), already bound to what
    /// names them (a checksum, or the catalog that carries them).
    pub(crate) fn parse(
        bytes: &[u8],
        what: &'static str,
        at: u64,
    ) -> Result<KeyFilter, DecodeError> {
        let mut r = Reader::new(bytes, at);
        let nbits = r.u32(what)?;
        let probes = r.u8(what)?;
        let reserved = r.bytes(3, what)?;
        let bits = &bytes[FILTER_HEADER_LEN..];
        if reserved != [0, 0, 0]
            || nbits == 0
            || nbits % 8 != 0
            || u64::from(nbits / 8) != bits.len() as u64
            || !(1..=32).contains(&probes)
        {
            return Err(invalid(
                what,
                at,
                "bit count, probe count or reserved bytes out of range",
            ));
        }
        Ok(KeyFilter {
            nbits,
            probes,
            bits: bits.to_vec(),
        })
    }

    /// `false` when the delta certainly does not hold `key`.
    pub fn may_contain(&self, key: &[u8]) -> bool {
        probes(key, self.nbits, self.probes).all(|p| {
            self.bits
                .get((p / 8) as usize)
                .is_some_and(|b| b & (1 << (p % 8)) != 0)
        })
    }

    /// Bytes held.
    pub fn heap_bytes(&self) -> u64 {
        self.bits.len() as u64
    }
}

/// Parses the 56-byte header of a delta snapshot.
pub fn decode_delta_header(bytes: &[u8]) -> Result<SnapshotHeader, DecodeError> {
    super::decode_header_of(bytes, "delta snapshot", &[VERSION_DELTA])
}

/// What [`encode_delta`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaMeta {
    /// The changes are those after this LSN...
    pub base_lsn: u64,
    /// ... up to and including this one.
    pub lsn: u64,
    /// Epoch of the writer.
    pub epoch: u64,
    /// The dataset.
    pub dataset_id: DatasetId,
}

/// Encodes `changes` (keys strictly ascending; `None`: deleted) as a delta
/// snapshot of the LSNs `meta.base_lsn + 1 ..= meta.lsn`.
pub fn encode_delta<'a>(
    changes: impl ExactSizeIterator<Item = (&'a [u8], Option<&'a [u8]>)> + Clone,
    meta: DeltaMeta,
    block_bytes: usize,
) -> Vec<u8> {
    encode_delta_blocks(changes, meta, block_bytes).0
}

/// [`encode_delta`], or `None` when one of its blocks would decode to more
/// than readers take ([`super::block::decoded_limit`]: keys of kilobytes
/// that share most of their bytes, by the hundred thousand); the writer
/// then writes no delta.
pub fn encode_delta_readable<'a>(
    changes: impl ExactSizeIterator<Item = (&'a [u8], Option<&'a [u8]>)> + Clone,
    meta: DeltaMeta,
    block_bytes: usize,
) -> Option<Vec<u8>> {
    let (bytes, too_wide) = encode_delta_blocks(changes, meta, block_bytes);
    (!too_wide).then_some(bytes)
}

fn encode_delta_blocks<'a>(
    changes: impl ExactSizeIterator<Item = (&'a [u8], Option<&'a [u8]>)> + Clone,
    meta: DeltaMeta,
    block_bytes: usize,
) -> (Vec<u8>, bool) {
    let count = changes.len() as u64;
    let filter = KeyFilter::build(changes.clone().map(|(k, _)| k));
    let mut out = super::encode_header(VERSION_DELTA, meta.lsn, meta.epoch, meta.dataset_id, count);
    let mut index = BlockBuilder::new();
    let mut b = BlockBuilder::new();
    let mut data_blocks = 0u32;
    let mut value = Vec::new();
    let flush = |b: &mut BlockBuilder, out: &mut Vec<u8>| -> Option<(Vec<u8>, BlockHandle)> {
        if b.count() == 0 {
            return None;
        }
        let first = b.first_key().to_vec();
        let (bytes, crc) = b.finish();
        let h = BlockHandle {
            offset: out.len() as u64,
            len: bytes.len() as u32,
            crc,
        };
        out.extend_from_slice(&bytes);
        Some((first, h))
    };
    for (k, v) in changes {
        value.clear();
        match v {
            Some(v) => {
                value.push(TAG_PUT);
                value.extend_from_slice(v);
            }
            None => value.push(TAG_DELETE),
        }
        if !b.fits(k.len(), value.len()) {
            if let Some((first, h)) = flush(&mut b, &mut out) {
                index.push(&first, &h.encode());
                data_blocks += 1;
            }
        }
        b.push(k, &value);
        if b.size() >= block_bytes {
            if let Some((first, h)) = flush(&mut b, &mut out) {
                index.push(&first, &h.encode());
                data_blocks += 1;
            }
        }
    }
    if let Some((first, h)) = flush(&mut b, &mut out) {
        index.push(&first, &h.encode());
        data_blocks += 1;
    }
    let (ibytes, icrc) = index.finish();
    let index_h = BlockHandle {
        offset: out.len() as u64,
        len: ibytes.len() as u32,
        crc: icrc,
    };
    out.extend_from_slice(&ibytes);
    let fbytes = filter.encode();
    let filter_h = BlockHandle {
        offset: out.len() as u64,
        len: fbytes.len() as u32,
        crc: crate::crc::hash(&fbytes),
    };
    out.extend_from_slice(&fbytes);
    let footer = DeltaFooter {
        base_lsn: meta.base_lsn,
        index: index_h,
        filter: filter_h,
        entry_count: count,
        data_blocks,
    };
    out.extend_from_slice(&footer.encode());
    (out, b.too_wide() || index.too_wide())
}

/// Whether `bytes` (at least the first 6 of a snapshot) are a delta.
pub fn is_delta(bytes: &[u8]) -> bool {
    bytes.len() >= 6 && bytes[..4] == MAGIC && bytes[4..6] == VERSION_DELTA.to_le_bytes()
}

pub(crate) fn decode_change(value: &[u8], at: u64) -> Result<Change, DecodeError> {
    match value.split_first() {
        Some((&TAG_PUT, v)) => Ok(Some(v.to_vec())),
        Some((&TAG_DELETE, [])) => Ok(None),
        _ => Err(invalid(
            "delta entry",
            at,
            "a value tag other than 0 (put) or 1 (deletion)",
        )),
    }
}

/// A data block a scan reads: its handle, its first key, and the first key
/// of the block after it (`None`: it is the last).
pub type BlockFrom<'a> = (BlockHandle, &'a [u8], Option<&'a [u8]>);

/// A delta's verified footer, index and filter: what a point read needs
/// before it fetches a data block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaIndex {
    size: u64,
    footer: DeltaFooter,
    index: Block,
    filter: KeyFilter,
    /// A pointer delta's LSN and epoch (its entries are pointers; its
    /// footer here is the pointer footer's fields, with no filter).
    pointers: Option<(u64, u64)>,
    /// A pointer delta's slot pages and their bytes, as its footer states.
    pages: (u32, u32),
}

impl DeltaIndex {
    /// Verifies the last `bytes.len()` bytes of a delta of `size` bytes,
    /// which must reach back to its index block (see
    /// [`DeltaFooter::suffix_len`]; the catalog entry states it).
    pub fn decode_suffix(bytes: &[u8], size: u64) -> Result<DeltaIndex, DecodeError> {
        DeltaIndex::suffix(bytes, size, None)
    }

    /// Verifies the suffix (index block and footer) of a pointer delta of
    /// `size` bytes at `lsn` and `epoch` (see [`DeltaIndex::decode_suffix`]);
    /// its data blocks' entries are pointers.
    pub fn decode_pointer_suffix(
        bytes: &[u8],
        size: u64,
        lsn: u64,
        epoch: u64,
    ) -> Result<DeltaIndex, DecodeError> {
        DeltaIndex::suffix(bytes, size, Some((lsn, epoch)))
    }

    fn suffix(
        bytes: &[u8],
        size: u64,
        pointers: Option<(u64, u64)>,
    ) -> Result<DeltaIndex, DecodeError> {
        let n = bytes.len() as u64;
        if n < DELTA_FOOTER_LEN || n > size {
            return Err(DecodeError::Truncated {
                what: "delta footer",
                at: size.saturating_sub(n),
                need: DELTA_FOOTER_LEN,
                have: n,
            });
        }
        let last = &bytes[(n - DELTA_FOOTER_LEN) as usize..];
        // A pointer delta's footer as a value delta's, with no filter; its
        // data blocks start where its slot pages end.
        let mut pages = (0, 0);
        let (footer, first) = match pointers {
            None => (DeltaFooter::decode(last, size)?, HEADER_LEN),
            Some(_) => {
                let f = super::pointer::PointerFooter::decode(last, size)?;
                pages = (f.pages, f.page_bytes);
                let footer = DeltaFooter {
                    base_lsn: f.base_lsn,
                    index: f.index,
                    filter: BlockHandle {
                        offset: f.index.end(),
                        len: 0,
                        crc: 0,
                    },
                    entry_count: f.entry_count,
                    data_blocks: f.data_blocks,
                };
                (
                    footer,
                    HEADER_LEN + u64::from(f.pages) * u64::from(f.page_bytes),
                )
            }
        };
        let start = size - n;
        if footer.index.offset < start {
            return Err(DecodeError::Truncated {
                what: "delta index",
                at: footer.index.offset,
                need: size - footer.index.offset,
                have: n,
            });
        }
        let slice = |h: &BlockHandle| {
            let lo = (h.offset - start) as usize;
            &bytes[lo..lo + h.len as usize]
        };
        let index = Block::decode(slice(&footer.index), &footer.index, "delta index")?;
        let filter = match pointers {
            None => KeyFilter::decode(slice(&footer.filter), &footer.filter)?,
            Some(_) => {
                let mut all = KeyFilter::sized(64, 1);
                all.bits.fill(0xff);
                all
            }
        };
        let mut idx = DeltaIndex::checked(size, footer, index, filter, first, pointers)?;
        idx.pages = pages;
        Ok(idx)
    }

    /// A pointer delta's slot pages and their bytes (`(0, 0)` for a value
    /// delta).
    pub fn pointer_pages(&self) -> (u32, u32) {
        self.pages
    }

    /// A pointer delta's LSN and epoch (`None`: a value delta).
    pub fn pointers(&self) -> Option<(u64, u64)> {
        self.pointers
    }

    /// The index checked against the footer: as many entries as data
    /// blocks, contiguous from `first` (the end of the header, or of a
    /// pointer delta's slot pages) to the index block.
    fn checked(
        size: u64,
        footer: DeltaFooter,
        index: Block,
        filter: KeyFilter,
        first: u64,
        pointers: Option<(u64, u64)>,
    ) -> Result<DeltaIndex, DecodeError> {
        if index.entries().len() as u64 != u64::from(footer.data_blocks) {
            return Err(invalid(
                "delta index",
                footer.index.offset,
                format!(
                    "{} index entries for {} data blocks",
                    index.entries().len(),
                    footer.data_blocks
                ),
            ));
        }
        let mut prev_end = first;
        for (i, (_, hb)) in index.entries().iter().enumerate() {
            let h = BlockHandle::decode(hb, footer.index.offset)?;
            if h.offset != prev_end || h.end() > footer.index.offset {
                return Err(invalid(
                    "delta index",
                    footer.index.offset,
                    format!("data block {i} is not where the previous one ends"),
                ));
            }
            prev_end = h.end();
        }
        if prev_end != footer.index.offset {
            return Err(invalid(
                "delta index",
                footer.index.offset,
                "the data blocks do not reach the index",
            ));
        }
        Ok(DeltaIndex {
            size,
            footer,
            index,
            filter,
            pointers,
            pages: (0, 0),
        })
    }

    /// The footer.
    pub fn footer(&self) -> &DeltaFooter {
        &self.footer
    }

    /// The delta's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes held (index entries and filter bits).
    pub fn heap_bytes(&self) -> u64 {
        self.index.heap_bytes() + self.filter.heap_bytes()
    }

    /// The data block that may hold `key`: `None` when the filter or the
    /// index rules it out.
    pub fn block_for(&self, key: &[u8]) -> Option<BlockHandle> {
        self.index.child_for(key)?;
        self.block_from(key)
            .filter(|_| self.filter.may_contain(key))
            .map(|(h, ..)| h)
    }

    /// For a scan from `from`: the data block holding the delta's first
    /// keys at or after it, that block's first key, and the first key of
    /// the block after it (`None`: it is the last). `None`: no blocks.
    pub fn block_from(&self, from: &[u8]) -> Option<BlockFrom<'_>> {
        let entries = self.index.entries();
        let i = self.index.child_for(from).unwrap_or(0);
        let (first, hb) = entries.get(i)?;
        // Checked by decode_suffix.
        let h = BlockHandle::decode(hb, self.footer.index.offset).ok()?;
        Some((h, first, entries.get(i + 1).map(|(k, _)| k.as_slice())))
    }

    /// Verifies the data block `handle` names (as [`block_for`] gave it)
    /// and reads `key` from it: `None` when the delta does not change the
    /// key, `Some(None)` when it deletes it.
    ///
    /// [`block_for`]: Self::block_for
    pub fn lookup(
        &self,
        handle: &BlockHandle,
        bytes: &[u8],
        key: &[u8],
    ) -> Result<Option<Change>, DecodeError> {
        let block = Block::decode(bytes, handle, "delta data block")?;
        if self.pointers.is_some() {
            // (Verified; a pointer delta's point reads go through its
            // slot pages.)
            return Ok(None);
        }
        block
            .get(key)
            .map(|v| decode_change(v, handle.offset))
            .transpose()
    }
}

/// A whole delta, verified and decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The header (`lsn` is the last LSN the delta covers).
    pub header: SnapshotHeader,
    /// The changes are those after this LSN.
    pub base_lsn: u64,
    /// Changed keys, ascending, with their newest value (`None`: deleted).
    pub changes: Vec<(Vec<u8>, Change)>,
}

/// Verifies and decodes a whole delta snapshot.
pub fn decode_delta(bytes: &[u8]) -> Result<Delta, DecodeError> {
    let size = bytes.len() as u64;
    if size < HEADER_LEN + DELTA_FOOTER_LEN {
        return Err(DecodeError::Truncated {
            what: "delta snapshot",
            at: 0,
            need: HEADER_LEN + DELTA_FOOTER_LEN,
            have: size,
        });
    }
    let header = decode_delta_header(&bytes[..HEADER_LEN as usize])?;
    let footer = DeltaFooter::decode(&bytes[(size - DELTA_FOOTER_LEN) as usize..], size)?;
    let idx = DeltaIndex::decode_suffix(&bytes[footer.index.offset as usize..], size)?;
    if header.entry_count != footer.entry_count || footer.base_lsn > header.lsn {
        return Err(invalid("delta snapshot", 0, "header and footer disagree"));
    }
    let mut changes: Vec<(Vec<u8>, Change)> = Vec::new();
    for (_, hb) in idx.index.entries() {
        let h = BlockHandle::decode(hb, footer.index.offset)?;
        let block = Block::decode(
            &bytes[h.offset as usize..h.end() as usize],
            &h,
            "delta data block",
        )?;
        for (k, v) in block.entries() {
            if changes.last().is_some_and(|(last, _)| last >= k) {
                return Err(invalid("delta data block", h.offset, "keys do not ascend"));
            }
            changes.push((k.clone(), decode_change(v, h.offset)?));
        }
    }
    if changes.len() as u64 != header.entry_count {
        return Err(invalid(
            "delta snapshot",
            0,
            format!(
                "{} entries, the header says {}",
                changes.len(),
                header.entry_count
            ),
        ));
    }
    Ok(Delta {
        header,
        base_lsn: footer.base_lsn,
        changes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> DeltaMeta {
        DeltaMeta {
            base_lsn: 100,
            lsn: 250,
            epoch: 3,
            dataset_id: DatasetId([7; 16]),
        }
    }

    fn sample(n: usize) -> Vec<(Vec<u8>, Change)> {
        (0..n)
            .map(|i| {
                let k = format!("key:{i:06}").into_bytes();
                let v = (i % 5 != 0).then(|| vec![i as u8; 40 + i % 13]);
                (k, v)
            })
            .collect()
    }

    /// A value past what a block takes (32 MiB) makes no unreadable delta
    /// (none is written); values up to it among small ones get a block of
    /// their own each, and the delta reads.
    #[test]
    fn values_past_what_a_block_takes_make_no_unreadable_delta() {
        let encode = |changes: &[(Vec<u8>, Change)]| {
            encode_delta_readable(
                changes.iter().map(|(k, v)| (k.as_slice(), v.as_deref())),
                meta(),
                DEFAULT_DELTA_BLOCK_BYTES,
            )
        };
        let mut changes: Vec<(Vec<u8>, Change)> = vec![
            (b"a".to_vec(), Some(b"xyz".to_vec())),
            (b"b".to_vec(), Some(vec![7u8; (32 << 20) - 64])),
            (b"c".to_vec(), None),
            (b"d".to_vec(), Some(vec![9u8; (32 << 20) - 64])),
            (b"e".to_vec(), Some(b"last".to_vec())),
        ];
        let bytes = encode(&changes).expect("readable");
        assert_eq!(decode_delta(&bytes).unwrap().changes, changes);
        changes[1].1 = Some(vec![7u8; (64 << 20) - 9]);
        assert!(encode(&changes).is_none());
    }

    /// A delta whose blocks readers would refuse (8,000 keys "a", "aa",
    /// ... in one block: 32 MB of keys in some 2 MB) is not written; the
    /// same keys in small blocks, or ordinary keys, are.
    #[test]
    fn a_delta_readers_would_refuse_is_not_written() {
        let alike: Vec<(Vec<u8>, Change)> = (1..=8_000)
            .map(|n| (vec![b'a'; n], Some(b"v".to_vec())))
            .collect();
        let readable = |changes: &[(Vec<u8>, Change)], block: usize| {
            encode_delta_readable(
                changes.iter().map(|(k, v)| (k.as_slice(), v.as_deref())),
                meta(),
                block,
            )
        };
        assert!(readable(&alike, 64 << 20).is_none());
        let bytes = readable(&alike, 16 << 10).expect("small blocks are readable");
        assert_eq!(decode_delta(&bytes).unwrap().changes.len(), 8_000);
        assert!(readable(&sample(500), 64 << 20).is_some());
    }

    fn encode(changes: &[(Vec<u8>, Change)], block: usize) -> Vec<u8> {
        encode_delta(
            changes.iter().map(|(k, v)| (k.as_slice(), v.as_deref())),
            meta(),
            block,
        )
    }

    #[test]
    fn round_trip_whole_and_point_reads() {
        let changes = sample(3000);
        let bytes = encode(&changes, 1024);
        let d = decode_delta(&bytes).unwrap();
        assert_eq!(d.changes, changes);
        assert_eq!(d.base_lsn, 100);
        assert_eq!(d.header.lsn, 250);
        let size = bytes.len() as u64;
        let footer = DeltaFooter::decode(&bytes[bytes.len() - 64..], size).unwrap();
        let idx = DeltaIndex::decode_suffix(&bytes[footer.index.offset as usize..], size).unwrap();
        for (k, v) in &changes {
            let h = idx.block_for(k).expect("a written key passes the filter");
            let got = idx
                .lookup(&h, &bytes[h.offset as usize..h.end() as usize], k)
                .unwrap();
            assert_eq!(got.as_ref(), Some(v));
        }
        // Absent keys: mostly ruled out by the filter, never found.
        let mut passed = 0;
        for i in 0..3000 {
            let k = format!("nokey:{i}").into_bytes();
            if let Some(h) = idx.block_for(&k) {
                passed += 1;
                let got = idx
                    .lookup(&h, &bytes[h.offset as usize..h.end() as usize], &k)
                    .unwrap();
                assert_eq!(got, None);
            }
        }
        assert!(
            passed < 150,
            "{passed} of 3000 absent keys passed the filter"
        );
    }

    #[test]
    fn empty_delta() {
        let bytes = encode(&[], 1024);
        let d = decode_delta(&bytes).unwrap();
        assert!(d.changes.is_empty());
        let footer = DeltaFooter::decode(&bytes[bytes.len() - 64..], bytes.len() as u64).unwrap();
        let idx =
            DeltaIndex::decode_suffix(&bytes[footer.index.offset as usize..], bytes.len() as u64)
                .unwrap();
        assert_eq!(idx.block_for(b"x"), None);
    }

    #[test]
    fn a_large_delta_filter_is_capped_and_holds_every_key() {
        let keys: Vec<Vec<u8>> = (0..300_000u32)
            .map(|i| format!("key:{i:08}").into_bytes())
            .collect();
        let f = KeyFilter::build(keys.iter().map(Vec::as_slice));
        assert_eq!(
            f.encoded_len(),
            FILTER_HEADER_LEN + MAX_BUILT_FILTER_BYTES as usize
        );
        assert!(keys.iter().all(|k| f.may_contain(k)));
        let fp = (0..100_000u32)
            .filter(|i| f.may_contain(format!("other:{i:08}").as_bytes()))
            .count();
        assert!(fp < 10_000, "{fp} false positives of 100,000");
        // Below the cap: 10 bits a key, 7 probes, as before.
        let small = KeyFilter::build(keys[..1_000].iter().map(Vec::as_slice));
        assert_eq!(small.encoded_len(), FILTER_HEADER_LEN + 1_250);
        assert_eq!(small.encode()[4], FILTER_PROBES);
    }

    #[test]
    fn every_flipped_byte_is_an_error() {
        let bytes = encode(&sample(40), 256);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode_delta(&b).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn short_suffix_and_truncation_are_errors() {
        let bytes = encode(&sample(200), 512);
        let size = bytes.len() as u64;
        assert!(DeltaIndex::decode_suffix(&bytes[bytes.len() - 64..], size).is_err());
        assert!(DeltaIndex::decode_suffix(&bytes[bytes.len() - 10..], size).is_err());
        for n in [0, 10, 56, 100, bytes.len() - 1] {
            assert!(decode_delta(&bytes[..n]).is_err(), "truncated to {n}");
        }
        let e = DeltaIndex::decode_suffix(&bytes[bytes.len() - 64..], size).unwrap_err();
        assert!(e.to_string().contains("delta index"), "{e}");
    }
}
