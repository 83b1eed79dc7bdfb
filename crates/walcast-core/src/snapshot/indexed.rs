//! The block-indexed snapshot (format version 2): data blocks, an index of
//! them (partitioned into index blocks under a top index when large), and a
//! fixed 48-byte footer a reader finds with one suffix range GET. A point
//! read fetches the footer, the top index, at most one index block and one
//! data block, and verifies each before use. See `docs/FORMAT.md`.
//!
//! [`LazySnapshot`] is the pure point reader: ask it for a key and it answers
//! with a value, or with the byte range it needs next ("need more bytes" is a
//! value, not an error).

use crate::vecmap::VecMap;

use sha2::{Digest, Sha256};

use super::block::{Block, BlockBuilder, BlockHandle, HANDLE_LEN};
use super::{SnapshotHeader, HEADER_LEN, MAGIC};
use crate::catalog::DatasetId;
use crate::codec::{check_crc, invalid, le32, le64};
use crate::error::DecodeError;
use crate::state::KvState;

/// Version of the block-indexed snapshot.
pub const VERSION_INDEXED: u16 = 2;
/// Version of the block-indexed snapshot whose handles carry each block's
/// SHA-256 (verified lazy reads of signed datasets).
pub const VERSION_VERIFIED: u16 = 4;
/// Bytes of the footer (version 2).
pub const FOOTER_LEN: u64 = 48;
/// Bytes of the footer of version 4.
pub const FOOTER_LEN_V4: u64 = 80;
/// Magic at the end of a block-indexed snapshot (version 2).
pub const FOOTER_MAGIC: [u8; 4] = *b"WCS2";
/// Magic at the end of a version 4 snapshot.
pub const FOOTER_MAGIC_V4: [u8; 4] = *b"WCS4";
/// Bytes of a version 4 handle: the 16 bytes of version 2, then the
/// block's SHA-256.
pub const DIGEST_HANDLE_LEN: usize = HANDLE_LEN + 32;

/// The SHA-256 of `bytes`.
fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Bytes of the footer a file's last bytes `tail` end with: the magic in
/// the last 4 bytes says the version (a version 2 footer otherwise).
pub fn footer_len(tail: &[u8]) -> u64 {
    if tail.len() >= 4 && tail[tail.len() - 4..] == FOOTER_MAGIC_V4 {
        FOOTER_LEN_V4
    } else {
        FOOTER_LEN
    }
}

/// The CRC-32 of a block-indexed file's footer fields (its last
/// [`footer_len`] bytes but the checksum and magic that end them: the
/// footer's own checksum: a CRC over that checksum too is the same for
/// every footer), which catalog entries record; `file` may be any suffix.
pub fn footer_crc32(file: &[u8]) -> u32 {
    let flen = usize::try_from(footer_len(file)).unwrap_or(usize::MAX);
    let end = file.len().saturating_sub(8);
    crate::crc::hash(&file[file.len().saturating_sub(flen).min(end)..end])
}

/// A block-indexed file's last bytes from its top index block on (the top
/// index and the footer): what a lazy reader's first suffix read needs.
/// `None` when the file has no valid footer.
pub fn top_suffix(file: &[u8]) -> Option<&[u8]> {
    let flen = usize::try_from(footer_len(file)).ok()?;
    let fb = file.get(file.len().checked_sub(flen)?..)?;
    let footer = Footer::decode(fb, file.len() as u64).ok()?;
    file.get(usize::try_from(footer.top.offset).ok()?..)
}

/// An index entry's value: a handle, with the block's SHA-256 in version 4.
fn encode_handle(h: &BlockHandle, digest: Option<&[u8; 32]>) -> Vec<u8> {
    let mut v = h.encode().to_vec();
    if let Some(d) = digest {
        v.extend_from_slice(d);
    }
    v
}

/// Parses an index entry's value found at byte `at`: 16 bytes, or 48 with
/// the block's SHA-256 when `digests` (version 4).
pub fn decode_handle(
    bytes: &[u8],
    at: u64,
    digests: bool,
) -> Result<(BlockHandle, Option<[u8; 32]>), DecodeError> {
    if !digests {
        return Ok((BlockHandle::decode(bytes, at)?, None));
    }
    if bytes.len() != DIGEST_HANDLE_LEN {
        return Err(invalid(
            "block handle",
            at,
            format!(
                "{} bytes, a version 4 handle has {DIGEST_HANDLE_LEN}",
                bytes.len()
            ),
        ));
    }
    let h = BlockHandle::decode(&bytes[..HANDLE_LEN], at)?;
    let mut d = [0u8; 32];
    d.copy_from_slice(&bytes[HANDLE_LEN..]);
    Ok((h, Some(d)))
}

/// The digest a signed head records for a version 4 snapshot
/// (`trust.index_digests`): the SHA-256 of the top index block followed by
/// the footer, the file's last `top.len + 80` bytes. `None` for a file
/// that is not a well-formed version 4 snapshot.
pub fn index_digest(file: &[u8]) -> Option<[u8; 32]> {
    let size = file.len() as u64;
    if footer_len(file) != FOOTER_LEN_V4 || size < FOOTER_LEN_V4 {
        return None;
    }
    let footer = Footer::decode(&file[(size - FOOTER_LEN_V4) as usize..], size).ok()?;
    Some(sha256(&file[footer.top.offset as usize..]))
}
/// Default target bytes of a data block.
pub const DEFAULT_BLOCK_BYTES: usize = 16 << 10;
/// Default target bytes of an index block.
pub const DEFAULT_INDEX_BLOCK_BYTES: usize = 64 << 10;
/// Bytes a reader asks for in its first suffix GET: the footer and, for all
/// but huge snapshots, the whole top index.
pub const SUFFIX_GUESS: u64 = 64 << 10;

/// Block sizes for [`encode_indexed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexedOptions {
    /// Target bytes of a data block.
    pub block_bytes: usize,
    /// Target bytes of an index block.
    pub index_block_bytes: usize,
}

impl Default for IndexedOptions {
    fn default() -> Self {
        IndexedOptions {
            block_bytes: DEFAULT_BLOCK_BYTES,
            index_block_bytes: DEFAULT_INDEX_BLOCK_BYTES,
        }
    }
}

/// The footer of a block-indexed snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    /// End of the data blocks, start of the index blocks.
    pub index_offset: u64,
    /// The top index block.
    pub top: BlockHandle,
    /// Entries in the snapshot.
    pub entry_count: u64,
    /// Data blocks in the snapshot.
    pub data_blocks: u32,
    /// 1: the top index names data blocks; 2: it names index blocks, which
    /// name data blocks.
    pub levels: u8,
    /// Version 4: the SHA-256 of the top index block (and every handle in
    /// the index carries its block's SHA-256). `None` in version 2.
    pub top_sha256: Option<[u8; 32]>,
}

impl Footer {
    /// Bytes of this footer: 48 in version 2, 80 in version 4.
    pub fn wire_len(&self) -> u64 {
        if self.top_sha256.is_some() {
            FOOTER_LEN_V4
        } else {
            FOOTER_LEN
        }
    }

    /// Whether the footer is of version 4 (handles carry digests).
    pub fn has_digests(&self) -> bool {
        self.top_sha256.is_some()
    }

    /// The footer's bytes (48, or 80 in version 4).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(FOOTER_LEN_V4 as usize);
        b.extend_from_slice(&self.index_offset.to_le_bytes());
        b.extend_from_slice(&encode_handle(&self.top, self.top_sha256.as_ref()));
        b.extend_from_slice(&self.entry_count.to_le_bytes());
        b.extend_from_slice(&self.data_blocks.to_le_bytes());
        b.push(self.levels);
        b.extend_from_slice(&[0, 0, 0]);
        let crc = crate::crc::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.extend_from_slice(if self.top_sha256.is_some() {
            &FOOTER_MAGIC_V4
        } else {
            &FOOTER_MAGIC
        });
        b
    }

    /// Parses the footer of a file of `size` bytes; `bytes` are its last 48
    /// (version 2) or 80 (version 4, magic `WCS4`).
    pub fn decode(bytes: &[u8], size: u64) -> Result<Footer, DecodeError> {
        let flen = footer_len(bytes);
        let at = size.saturating_sub(flen);
        if bytes.len() as u64 != flen || size < HEADER_LEN + flen {
            return Err(DecodeError::Truncated {
                what: "snapshot footer",
                at,
                need: flen,
                have: bytes.len() as u64,
            });
        }
        let digests = flen == FOOTER_LEN_V4;
        let hlen = if digests {
            DIGEST_HANDLE_LEN
        } else {
            HANDLE_LEN
        };
        // `flen` bytes, checked above: fixed offsets from here on.
        let index_offset = le64(bytes, 0);
        let (top, top_sha256) = decode_handle(&bytes[8..8 + hlen], at + 8, digests)?;
        let o = 8 + hlen;
        let entry_count = le64(bytes, o);
        let data_blocks = le32(bytes, o + 8);
        let levels = bytes[o + 12];
        let reserved = &bytes[o + 13..o + 16];
        let crc = le32(bytes, o + 16);
        let magic = if digests {
            FOOTER_MAGIC_V4
        } else {
            FOOTER_MAGIC
        };
        let mut found = [0u8; 4];
        found.copy_from_slice(&bytes[o + 20..]);
        if found != magic {
            return Err(DecodeError::BadMagic {
                what: "snapshot footer",
                at: at + o as u64 + 20,
                expected: magic,
                found,
            });
        }
        check_crc("snapshot footer", at, crc, &bytes[..flen as usize - 8])?;
        if reserved != [0, 0, 0] || !(1..=2).contains(&levels) {
            return Err(invalid(
                "snapshot footer",
                at,
                "unknown levels or reserved bits",
            ));
        }
        let body_end = size - flen;
        if index_offset < HEADER_LEN
            || index_offset > body_end
            || top.offset < index_offset
            || top.end() != body_end
        {
            return Err(invalid(
                "snapshot footer",
                at,
                "the index lies outside the file",
            ));
        }
        Ok(Footer {
            index_offset,
            top,
            entry_count,
            data_blocks,
            levels,
            top_sha256,
        })
    }
}

fn header_bytes(
    version: u16,
    lsn: u64,
    epoch: u64,
    dataset_id: DatasetId,
    entries: u64,
) -> Vec<u8> {
    let mut head = Vec::with_capacity(HEADER_LEN as usize);
    head.extend_from_slice(&MAGIC);
    head.extend_from_slice(&version.to_le_bytes());
    head.extend_from_slice(&0u16.to_le_bytes());
    head.extend_from_slice(&lsn.to_le_bytes());
    head.extend_from_slice(&epoch.to_le_bytes());
    head.extend_from_slice(&dataset_id.0);
    head.extend_from_slice(&entries.to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    let crc = crate::crc::hash(&head);
    head.extend_from_slice(&crc.to_le_bytes());
    head
}

/// Parses a 56-byte snapshot header of version 2 or 4.
pub fn decode_indexed_header(bytes: &[u8]) -> Result<SnapshotHeader, DecodeError> {
    super::decode_header_of(
        bytes,
        "block-indexed snapshot",
        &[VERSION_INDEXED, VERSION_VERIFIED],
    )
}

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
/// ([`super::block::decoded_limit`]: keys of kilobytes that share most of
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
    let mut out = header_bytes(version, lsn, epoch, dataset_id, state.len());
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

/// Whether `bytes` (at least the first 6 of a snapshot) are version 2 or 4.
pub fn is_indexed(bytes: &[u8]) -> bool {
    bytes.len() >= 6
        && bytes[..4] == MAGIC
        && (bytes[4..6] == VERSION_INDEXED.to_le_bytes() || is_verified(bytes))
}

/// Whether `bytes` (at least the first 6 of a snapshot) are version 4.
pub fn is_verified(bytes: &[u8]) -> bool {
    bytes.len() >= 6 && bytes[..4] == MAGIC && bytes[4..6] == VERSION_VERIFIED.to_le_bytes()
}

/// A block a read goes to: its handle, its digest (version 4), and whether
/// it is a data block (else an index block).
/// A block a read needs: its handle, digest, whether it is a data block
/// (else an index block), and the offset of the index block (partition)
/// that named it, if any.
type Located = (BlockHandle, Option<[u8; 32]>, bool, Option<u64>);

/// Checks `bytes` against `digest` when there is one.
fn verify_digest(
    bytes: &[u8],
    digest: Option<&[u8; 32]>,
    what: &'static str,
    at: u64,
) -> Result<(), DecodeError> {
    match digest {
        Some(d) if sha256(bytes) != *d => Err(DecodeError::Digest { what, at }),
        _ => Ok(()),
    }
}

/// What [`LazySnapshot::get`] needs to go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The last `n` bytes of the file (the footer and, with luck, the top
    /// index): feed them with [`LazySnapshot::feed_suffix`].
    Suffix(u64),
    /// Bytes `start..end` (a block): feed them with [`LazySnapshot::feed_range`].
    Range {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
}

/// The answer to a point read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The value, or `None` when the snapshot does not hold the key.
    Done(Option<Vec<u8>>),
    /// Fetch this and feed it, then ask again.
    Need(Need),
}

/// What a cached block (data, or an index partition) counts against the cache's bytes: its size,
/// and at least [`MIN_BLOCK_CHARGE`], so that a file of tiny blocks cannot
/// make the cache hold more than `cache_bytes / MIN_BLOCK_CHARGE` of them
/// (each read scans them for the least recently used).
fn cache_charge(block: &Block) -> u64 {
    // What it holds decoded, or fetched when that is more.
    block
        .wire_len()
        .max(block.heap_bytes())
        .max(MIN_BLOCK_CHARGE)
}

/// The least a cached data block counts as (see [`cache_charge`]).
const MIN_BLOCK_CHARGE: u64 = 1 << 10;

/// A point reader over one block-indexed snapshot, holding its footer and
/// top index, and index partitions and data blocks in a cache bounded in
/// bytes (least recently used first out). Pure: it never does IO, it says
/// what it needs.
#[derive(Debug)]
pub struct LazySnapshot {
    size: u64,
    footer: Option<Footer>,
    /// The verified top index block, by offset.
    index: VecMap<Block>,
    /// Verified index partitions and data blocks by offset (their regions
    /// do not overlap), with their last use: the least recently used goes
    /// first when the cache is over its bytes.
    blocks: VecMap<(Block, u64)>,
    tick: u64,
    cache_bytes: u64,
    cached: u64,
    /// Blocks fetched so far (index and data).
    pub fetched_blocks: u64,
    /// The index digest a signed head states (see [`index_digest`]): when
    /// set, only a version 4 file whose top index and footer hash to it is
    /// read, and every block is checked against its handle's SHA-256.
    expect: Option<[u8; 32]>,
    /// The footer's bytes, kept until the top index is verified with them.
    footer_bytes: Vec<u8>,
    /// The entry count the catalog states, when known: a footer saying
    /// otherwise is another file's (see [`expect_entries`](Self::expect_entries)).
    entries: Option<u64>,
    /// The footer's CRC-32 the catalog states, when it does.
    footer_crc32: Option<u32>,
}

impl LazySnapshot {
    /// A reader for the snapshot of `size` bytes, caching at most
    /// `cache_bytes` of index partitions and data blocks (beyond that, only
    /// the two used last are kept); the top index is held apart.
    pub fn new(size: u64, cache_bytes: u64) -> Self {
        LazySnapshot {
            size,
            footer: None,
            index: VecMap::default(),
            blocks: VecMap::default(),
            tick: 0,
            cache_bytes,
            cached: 0,
            fetched_blocks: 0,
            expect: None,
            footer_bytes: Vec::new(),
            entries: None,
            footer_crc32: None,
        }
    }

    /// A reader like [`new`](Self::new) that trusts nothing the file says
    /// until it is bound to `digest`, the index digest of a signed head:
    /// the file must be version 4, its top index and footer must hash to
    /// `digest`, and every block must match the SHA-256 in the handle that
    /// names it. A mismatch is a [`DecodeError::Digest`] (an `untrusted`
    /// error) and nothing of the bytes is kept.
    pub fn with_index_digest(size: u64, cache_bytes: u64, digest: [u8; 32]) -> Self {
        LazySnapshot {
            expect: Some(digest),
            ..Self::new(size, cache_bytes)
        }
    }

    /// Checks the top index's bytes against the footer's digest and, when
    /// the reader is bound, top index ‖ footer against the index digest.
    fn verify_top(&self, bytes: &[u8], footer: &Footer) -> Result<(), DecodeError> {
        if let Some(want) = self.expect {
            let mut h = Sha256::new();
            h.update(bytes);
            h.update(&self.footer_bytes);
            let got: [u8; 32] = h.finalize().into();
            if got != want {
                return Err(DecodeError::Digest {
                    what: "snapshot top index and footer (index digest)",
                    at: footer.top.offset,
                });
            }
        }
        verify_digest(
            bytes,
            footer.top_sha256.as_ref(),
            "snapshot top index",
            footer.top.offset,
        )
    }

    /// The footer, once read.
    pub fn footer(&self) -> Option<&Footer> {
        self.footer.as_ref()
    }

    /// Bytes of index partitions and data blocks held, as charged: what a
    /// block holds decoded, or took on the wire when more, and at least
    /// 1 KiB.
    pub fn cached_bytes(&self) -> u64 {
        self.cached
    }

    /// Bounds the data blocks held to `cache_bytes` from now on, dropping
    /// the least recently used at once if they hold more (the newest one is
    /// always kept).
    pub fn set_cache_bytes(&mut self, cache_bytes: u64) {
        self.cache_bytes = cache_bytes;
        self.evict();
    }

    /// Drops the least recently used blocks while the cache is over its
    /// bytes, keeping the two used last: a point read of a partitioned
    /// index needs its partition and its data block at once.
    fn evict(&mut self) {
        while self.cached > self.cache_bytes && self.blocks.len() > 2 {
            let Some(off) = self
                .blocks
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(off, _)| off)
            else {
                break;
            };
            if let Some((b, _)) = self.blocks.remove(off) {
                self.cached -= cache_charge(&b);
            }
        }
    }

    /// Refuses a footer that does not count `n` entries, the number the
    /// catalog states: a file of the same size left by a dataset started
    /// over at the same prefix is not read as this one.
    pub fn expect_entries(&mut self, n: u64) {
        self.entries = Some(n);
    }

    /// Refuses a footer whose CRC-32 is not `crc`, the one the catalog
    /// states: the footer binds the top index and through it every block,
    /// so no other file (one of the same size and entry count, left by a
    /// dataset started over at the prefix) is read as this one.
    pub fn expect_footer_crc32(&mut self, crc: u32) {
        self.footer_crc32 = Some(crc);
    }

    /// Feeds the answer to [`Need::Suffix`]: the last `bytes.len()` bytes of
    /// the file. Verifies the footer, and the top index when it came along.
    pub fn feed_suffix(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        let n = bytes.len() as u64;
        let flen = footer_len(bytes);
        if n < flen || n > self.size {
            return Err(DecodeError::Truncated {
                what: "snapshot footer",
                at: self.size.saturating_sub(n),
                need: flen,
                have: n,
            });
        }
        let fb = &bytes[(n - flen) as usize..];
        if self.footer_crc32.is_some_and(|c| c != footer_crc32(bytes)) {
            return Err(crate::codec::invalid(
                "snapshot footer",
                self.size - flen,
                "its CRC-32 is not the catalog's: another file than the one it names",
            ));
        }
        let footer = Footer::decode(fb, self.size)?;
        if let Some(n) = self.entries.filter(|&n| n != footer.entry_count) {
            return Err(crate::codec::invalid(
                "snapshot footer",
                self.size - flen,
                format!("{} entries, but the catalog says {n}", footer.entry_count),
            ));
        }
        if self.expect.is_some() && !footer.has_digests() {
            return Err(DecodeError::Digest {
                what: "snapshot footer (not version 4: no block digests to verify)",
                at: self.size - flen,
            });
        }
        self.footer_bytes = fb.to_vec();
        let start = self.size - n;
        if footer.top.offset >= start {
            let lo = (footer.top.offset - start) as usize;
            let hi = (footer.top.end() - start) as usize;
            let top = Block::decode(&bytes[lo..hi], &footer.top, "snapshot top index")?;
            self.verify_top(&bytes[lo..hi], &footer)?;
            self.fetched_blocks += 1;
            self.index.insert(footer.top.offset, top);
        }
        self.footer = Some(footer);
        Ok(())
    }

    /// Feeds the answer to [`Need::Range`] for the block `handle` names.
    fn feed(
        &mut self,
        handle: &BlockHandle,
        digest: Option<&[u8; 32]>,
        bytes: &[u8],
        data: bool,
    ) -> Result<(), DecodeError> {
        let what = if data {
            "snapshot data block"
        } else {
            "snapshot index block"
        };
        let top = self
            .footer
            .filter(|f| !data && handle.offset == f.top.offset);
        let checked = Block::decode(bytes, handle, what).and_then(|block| {
            match &top {
                Some(f) => self.verify_top(bytes, f)?,
                None => verify_digest(bytes, digest, what, handle.offset)?,
            }
            Ok(block)
        });
        let block = match checked {
            Ok(b) => b,
            Err(e) => {
                if top.is_some() {
                    // A top index that fails the footer: the footer itself
                    // may be the lie (a forged one can match the catalog's
                    // CRC-32), so the next read fetches it again.
                    self.footer = None;
                }
                return Err(e);
            }
        };
        self.fetched_blocks += 1;
        if self.footer.is_some_and(|f| handle.offset == f.top.offset) {
            self.index.insert(handle.offset, block);
        } else {
            self.tick += 1;
            self.cached += cache_charge(&block);
            if let Some((old, _)) = self.blocks.insert(handle.offset, (block, self.tick)) {
                self.cached -= cache_charge(&old);
            }
            self.evict();
        }
        Ok(())
    }

    /// The data block that holds `key`, or what to fetch to find it.
    /// `Ok(None)`: no block can hold it (below the first key).
    fn locate(&self, key: &[u8]) -> Result<Result<Option<Located>, Need>, DecodeError> {
        let Some(footer) = self.footer else {
            return Ok(Err(Need::Suffix(SUFFIX_GUESS.min(self.size))));
        };
        let Some(top) = self.index.get(footer.top.offset) else {
            return Ok(Err(Need::Range {
                start: footer.top.offset,
                end: footer.top.end(),
            }));
        };
        let digests = footer.has_digests();
        let handle_at =
            |b: &Block, i: usize, at: u64| decode_handle(&b.entries()[i].1, at, digests);
        let Some(i) = top.child_for(key) else {
            return Ok(Ok(None));
        };
        let (mut h, mut d) = handle_at(top, i, footer.top.offset)?;
        let mut partition = None;
        if footer.levels == 2 {
            if h.offset < footer.index_offset || h.end() > footer.top.offset {
                return Err(invalid(
                    "snapshot top index",
                    footer.top.offset,
                    "an index block outside the index region",
                ));
            }
            let Some((part, _)) = self.blocks.get(h.offset) else {
                return Ok(Ok(Some((h, d, false, None))));
            };
            let Some(j) = part.child_for(key) else {
                return Ok(Ok(None));
            };
            partition = Some(h.offset);
            (h, d) = handle_at(part, j, h.offset)?;
        }
        if h.offset < HEADER_LEN || h.end() > footer.index_offset {
            return Err(invalid(
                "snapshot index",
                footer.top.offset,
                "a data block outside the data region",
            ));
        }
        Ok(Ok(Some((h, d, true, partition))))
    }

    /// Marks the index partition (if any) and then the data block at these
    /// offsets used now.
    fn touch(&mut self, partition: Option<u64>, block: u64) {
        for off in [partition.unwrap_or(block), block] {
            self.tick += 1;
            if let Some((_, used)) = self.blocks.get_mut(off) {
                *used = self.tick;
            }
        }
    }

    /// Looks `key` up: its value, or the bytes needed next.
    pub fn get(&mut self, key: &[u8]) -> Result<Lookup, DecodeError> {
        let (h, _, data, partition) = match self.locate(key)? {
            Err(need) => return Ok(Lookup::Need(need)),
            Ok(None) => return Ok(Lookup::Done(None)),
            Ok(Some(x)) => x,
        };
        if !data {
            return Ok(Lookup::Need(Need::Range {
                start: h.offset,
                end: h.end(),
            }));
        }
        self.touch(partition, h.offset);
        match self.blocks.get(h.offset) {
            Some((block, _)) => Ok(Lookup::Done(block.get(key).map(<[u8]>::to_vec))),
            None => Ok(Lookup::Need(Need::Range {
                start: h.offset,
                end: h.end(),
            })),
        }
    }

    /// Feeds the bytes a [`Need::Range`] for `key` asked for, starting at
    /// `start`. Which block they must be is derived again from the key and
    /// the verified index: bytes never name themselves.
    pub fn feed_range(&mut self, start: u64, bytes: &[u8], key: &[u8]) -> Result<(), DecodeError> {
        match self.locate(key)? {
            Err(Need::Range { start: s, .. }) if s == start => {
                let top = self
                    .footer
                    .map(|f| f.top)
                    .ok_or_else(|| invalid("snapshot index", start, "a block before the footer"))?;
                self.feed(&top, None, bytes, false)
            }
            Ok(Some((h, d, data, partition))) if h.offset == start => {
                // The partition first, so that it and the block are the two
                // used last (kept whatever the cache's bytes).
                self.touch(partition, h.offset);
                self.feed(&h, d.as_ref(), bytes, data)
            }
            // The key's index partition was evicted (other reads filled the
            // cache) after this read asked for a block under it: the bytes
            // cannot be checked now, and are dropped; the read asks again.
            Ok(Some((_, _, false, _))) => Ok(()),
            _ => Err(invalid(
                "snapshot block",
                start,
                "bytes for a block the read did not ask for",
            )),
        }
    }
}

/// Where an ordered scan of a [`LazySnapshot`] stands: the next key to
/// return from, the exclusive end, and how many entries may still be
/// returned. Keep it across [`LazySnapshot::scan_step`] calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanCursor {
    /// Entries at or above this key are still to come.
    pub next: Vec<u8>,
    /// Stop before this key (`None`: the end of the snapshot).
    pub end: Option<Vec<u8>>,
    /// Entries still wanted.
    pub remaining: usize,
    done: bool,
}

impl ScanCursor {
    /// A scan of keys in `start..end`, at most `limit` of them.
    pub fn new(start: &[u8], end: Option<&[u8]>, limit: usize) -> Self {
        ScanCursor {
            next: start.to_vec(),
            end: end.map(<[u8]>::to_vec),
            remaining: limit,
            done: end.is_some_and(|e| e <= start),
        }
    }

    /// Whether the scan reached its end key or the snapshot's last entry.
    /// A scan that returned `remaining` entries is paused, not done: raise
    /// `remaining` and step again to go on from `next`.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

impl LazySnapshot {
    /// Advances an ordered scan: appends the entries it can answer from
    /// what it holds to `out`, and returns what it needs next (feed it with
    /// [`feed_suffix`](Self::feed_suffix) or [`feed_range`](Self::feed_range)
    /// for the key `cursor.next`), or `None` once the scan is done or has
    /// returned `cursor.remaining` entries. Blocks
    /// already scanned are never needed again, so a scan of any length works
    /// within any cache size.
    pub fn scan_step(
        &mut self,
        cursor: &mut ScanCursor,
        out: &mut Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Option<Need>, DecodeError> {
        // Each turn either returns, finishes, or moves the cursor to the
        // next block, so the loop ends within one turn per block.
        while !cursor.done {
            if cursor.remaining == 0 {
                // Paused: `next` is the first key not yet returned.
                return Ok(None);
            }
            let (h, _, data, partition) = match self.locate(&cursor.next)? {
                Err(need) => return Ok(Some(need)),
                Ok(None) => match self.first_key() {
                    Some(k) if k > cursor.next.as_slice() => {
                        cursor.next = k.to_vec();
                        continue;
                    }
                    _ => {
                        cursor.done = true;
                        break;
                    }
                },
                Ok(Some(x)) => x,
            };
            if data {
                self.touch(partition, h.offset);
            }
            let Some((block, _)) = self.blocks.get(h.offset).filter(|_| data) else {
                return Ok(Some(Need::Range {
                    start: h.offset,
                    end: h.end(),
                }));
            };
            for (k, v) in &block.entries()[block.lower_bound(&cursor.next)..] {
                if cursor.end.as_ref().is_some_and(|e| k >= e) {
                    cursor.done = true;
                    return Ok(None);
                }
                if cursor.remaining == 0 {
                    cursor.next = k.clone();
                    return Ok(None);
                }
                out.push((k.clone(), v.clone()));
                cursor.remaining -= 1;
            }
            match self.next_block_key(&cursor.next)? {
                Some(k) if k.as_slice() > cursor.next.as_slice() => cursor.next = k,
                _ => cursor.done = true,
            }
        }
        Ok(None)
    }

    /// The snapshot's first key, once the top index is held.
    fn first_key(&self) -> Option<&[u8]> {
        let top = self.index.get(self.footer?.top.offset)?;
        top.entries().first().map(|(k, _)| k.as_slice())
    }

    /// The first key of the data block after the one holding `key`.
    fn next_block_key(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DecodeError> {
        let Some(footer) = self.footer else {
            return Ok(None);
        };
        let Some(top) = self.index.get(footer.top.offset) else {
            return Ok(None);
        };
        let Some(i) = top.child_for(key) else {
            return Ok(None);
        };
        let after_top = top.entries().get(i + 1).map(|(k, _)| k.clone());
        if footer.levels == 1 {
            return Ok(after_top);
        }
        let (h, _) = decode_handle(&top.entries()[i].1, footer.top.offset, footer.has_digests())?;
        let Some((part, _)) = self.blocks.get(h.offset) else {
            return Ok(None);
        };
        let next = part
            .child_for(key)
            .and_then(|j| part.entries().get(j + 1))
            .map(|(k, _)| k.clone());
        Ok(next.or(after_top))
    }
}

/// Decodes a whole block-indexed snapshot held in memory, verifying every
/// block, the index and the footer, and `crc32` (the catalog's whole-file
/// checksum) when given. The same checks as a streaming
/// [`SnapshotDecoder`](super::SnapshotDecoder), which reads both versions.
pub fn decode_indexed(
    bytes: &[u8],
    crc32: Option<u32>,
) -> Result<(SnapshotHeader, KvState), DecodeError> {
    if !is_indexed(bytes) {
        return Err(invalid("snapshot", 0, "not a block-indexed snapshot"));
    }
    super::decode(bytes, crc32)
}

/// Checks the index region and footer of a version 2 or 4 snapshot against
/// the data blocks a streaming reader decoded: `tail` holds the file's bytes
/// from `tail_at` (the end of the data blocks) to `size`; `blocks` the first
/// key and handle of each data block, in order; `digests` the SHA-256 of
/// each data block for version 4 (`None`: version 2); `entries` the
/// entries read.
pub(crate) fn verify_index(
    tail: &[u8],
    tail_at: u64,
    size: u64,
    blocks: &[(Vec<u8>, BlockHandle)],
    digests: Option<&[[u8; 32]]>,
    entries: u64,
) -> Result<(), DecodeError> {
    let flen = if digests.is_some() {
        FOOTER_LEN_V4
    } else {
        FOOTER_LEN
    };
    if (tail.len() as u64) < flen || tail_at + tail.len() as u64 != size {
        return Err(DecodeError::Truncated {
            what: "snapshot index",
            at: tail_at,
            need: flen,
            have: tail.len() as u64,
        });
    }
    if footer_len(tail) != flen {
        return Err(invalid(
            "snapshot footer",
            size - flen,
            "the footer's version differs from the header's",
        ));
    }
    let footer = Footer::decode(&tail[tail.len() - flen as usize..], size)?;
    if footer.index_offset != tail_at
        || footer.data_blocks as usize != blocks.len()
        || footer.entry_count != entries
    {
        return Err(invalid(
            "snapshot footer",
            size - flen,
            "the footer disagrees with the data blocks read",
        ));
    }
    let has = digests.is_some();
    let slice =
        |h: &BlockHandle| &tail[(h.offset - tail_at) as usize..(h.end() - tail_at) as usize];
    type Named = (Vec<u8>, BlockHandle, Option<[u8; 32]>);
    let handles = |b: &Block, at: u64| -> Result<Vec<Named>, DecodeError> {
        b.entries()
            .iter()
            .map(|(k, v)| {
                let (h, d) = decode_handle(v, at, has)?;
                Ok((k.clone(), h, d))
            })
            .collect()
    };
    let top = Block::decode(slice(&footer.top), &footer.top, "snapshot top index")?;
    verify_digest(
        slice(&footer.top),
        footer.top_sha256.as_ref(),
        "snapshot top index",
        footer.top.offset,
    )?;
    let named = if footer.levels == 1 {
        if footer.top.offset != tail_at {
            return Err(invalid(
                "snapshot index",
                tail_at,
                "bytes between the data and the index",
            ));
        }
        handles(&top, footer.top.offset)?
    } else {
        let mut next = tail_at;
        let mut named = Vec::new();
        for (first, ih, id) in handles(&top, footer.top.offset)? {
            if ih.offset != next || ih.end() > footer.top.offset {
                return Err(invalid(
                    "snapshot top index",
                    ih.offset,
                    "index blocks are not contiguous",
                ));
            }
            next = ih.end();
            let part = Block::decode(slice(&ih), &ih, "snapshot index block")?;
            verify_digest(slice(&ih), id.as_ref(), "snapshot index block", ih.offset)?;
            let children = handles(&part, ih.offset)?;
            if children.first().map(|(k, _, _)| k) != Some(&first) {
                return Err(invalid(
                    "snapshot top index",
                    ih.offset,
                    "an index block's first key disagrees with the top index",
                ));
            }
            named.extend(children);
        }
        if next != footer.top.offset {
            return Err(invalid(
                "snapshot top index",
                next,
                "index blocks do not reach the top index",
            ));
        }
        named
    };
    let same = named.len() == blocks.len()
        && named
            .iter()
            .zip(blocks)
            .all(|((k, h, _), (bk, bh))| k == bk && h == bh);
    if !same {
        return Err(invalid(
            "snapshot index",
            tail_at,
            "the index disagrees with the data blocks read",
        ));
    }
    if let Some(ds) = digests {
        for ((_, h, d), want) in named.iter().zip(ds) {
            if d.as_ref() != Some(want) {
                return Err(DecodeError::Digest {
                    what: "snapshot data block",
                    at: h.offset,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn state(n: u32, vlen: usize) -> KvState {
        let mut s = KvState::new();
        for i in 0..n {
            s.put(
                format!("user:{:08}", i * 7).as_bytes(),
                &vec![(i % 251) as u8; vlen + (i as usize % 5)],
            );
        }
        s
    }

    /// Drives a point read to its end against the file's bytes; returns the
    /// value and the GETs it took.
    fn read(
        lazy: &mut LazySnapshot,
        file: &[u8],
        key: &[u8],
    ) -> Result<(Option<Vec<u8>>, u32), DecodeError> {
        let mut gets = 0;
        loop {
            match lazy.get(key)? {
                Lookup::Done(v) => return Ok((v, gets)),
                Lookup::Need(Need::Suffix(n)) => {
                    gets += 1;
                    let n = n.min(file.len() as u64) as usize;
                    lazy.feed_suffix(&file[file.len() - n..])?;
                }
                Lookup::Need(Need::Range { start, end }) => {
                    gets += 1;
                    assert!(gets < 10, "a point read loops");
                    let s = (start as usize).min(file.len());
                    let e = (end as usize).min(file.len());
                    lazy.feed_range(start, &file[s..e], key)?;
                }
            }
        }
    }

    #[test]
    fn point_reads_on_one_and_two_levels() {
        for (n, opts) in [
            (0, IndexedOptions::default()),
            (1, IndexedOptions::default()),
            (5_000, IndexedOptions::default()),
            (
                5_000,
                IndexedOptions {
                    block_bytes: 512,
                    index_block_bytes: 256,
                },
            ),
        ] {
            let s = state(n, 20);
            let file = encode_indexed(&s, 9, 1, DatasetId([3; 16]), opts);
            let (h, back) = decode_indexed(&file, Some(crate::crc::hash(&file))).unwrap();
            assert_eq!(h.lsn, 9);
            assert_eq!(back.len(), s.len());
            assert!(back.iter().zip(s.iter()).all(|(a, b)| a == b));
            let mut lazy = LazySnapshot::new(file.len() as u64, 1 << 20);
            for i in [0u32, 1, 2, n / 2, n.saturating_sub(1), n] {
                let key = format!("user:{:08}", i * 7);
                let (got, gets) = read(&mut lazy, &file, key.as_bytes()).unwrap();
                assert_eq!(got.as_deref(), s.get(key.as_bytes()), "key {key}");
                assert!(gets <= 3, "{gets} GETs");
                let miss = format!("user:{:08}", i * 7 + 1);
                assert_eq!(read(&mut lazy, &file, miss.as_bytes()).unwrap().0, None);
            }
            if n == 5_000 && opts.index_block_bytes == 256 {
                assert_eq!(lazy.footer().unwrap().levels, 2);
            }
        }
    }

    /// Version 4: whole and lazy reads, bound to the index digest.
    #[test]
    fn version_4_reads_like_version_2_and_binds_to_its_index_digest() {
        for (n, opts) in [
            (0, IndexedOptions::default()),
            (3_000, IndexedOptions::default()),
            (
                3_000,
                IndexedOptions {
                    block_bytes: 512,
                    index_block_bytes: 256,
                },
            ),
        ] {
            let s = state(n, 20);
            let file = encode_verified(&s, 9, 1, DatasetId([3; 16]), opts);
            assert!(is_verified(&file) && is_indexed(&file));
            let (h, back) = decode_indexed(&file, Some(crate::crc::hash(&file))).unwrap();
            assert_eq!(h.entry_count, s.len());
            assert!(back.iter().eq(s.iter()));
            let digest = index_digest(&file).unwrap();
            let mut lazy = LazySnapshot::with_index_digest(file.len() as u64, 1 << 20, digest);
            for i in [0u32, 1, n / 2, n.saturating_sub(1), n] {
                let key = format!("user:{:08}", i * 7);
                let (got, gets) = read(&mut lazy, &file, key.as_bytes()).unwrap();
                assert_eq!(got.as_deref(), s.get(key.as_bytes()), "key {key}");
                assert!(gets <= 3, "{gets} GETs");
            }
            assert!(lazy.footer().unwrap().has_digests());
            // Another digest: nothing is read.
            let mut wrong = digest;
            wrong[0] ^= 1;
            let mut lazy = LazySnapshot::with_index_digest(file.len() as u64, 1 << 20, wrong);
            let err = read(&mut lazy, &file, b"user:00000000").unwrap_err();
            assert!(matches!(err, DecodeError::Digest { .. }), "{err}");
            assert_eq!(crate::Error::from(err).kind(), crate::ErrorKind::Untrusted);
        }
        // A version 2 file cannot be bound to a digest.
        let v2 = encode_indexed(&state(10, 5), 1, 1, DatasetId([1; 16]), Default::default());
        assert_eq!(index_digest(&v2), None);
        let mut lazy = LazySnapshot::with_index_digest(v2.len() as u64, 1 << 20, [0; 32]);
        let err = read(&mut lazy, &v2, b"user:00000000").unwrap_err();
        assert!(matches!(err, DecodeError::Digest { .. }), "{err}");
    }

    /// Changes the 4 bytes at `fix..fix + 4` of `msg` so that its CRC-32
    /// becomes `want` (CRC-32 is affine in its input, so the 32 bits solve a
    /// linear system over GF(2)).
    fn force_crc(msg: &mut [u8], fix: usize, want: u32) {
        let base = crate::crc::hash(msg);
        // Column i: how flipping bit i of the window changes the CRC.
        let mut cols: Vec<(u32, u32)> = (0..32)
            .map(|i| {
                let mut m = msg.to_vec();
                m[fix + i / 8] ^= 1 << (i % 8);
                (crate::crc::hash(&m) ^ base, 1u32 << i)
            })
            .collect();
        // Gaussian elimination: reduce `target` with the columns.
        let mut target = base ^ want;
        let mut pick = 0u32;
        for bit in 0..32 {
            let Some(p) = (0..cols.len()).find(|&j| cols[j].0 >> bit & 1 == 1) else {
                continue;
            };
            let pivot = cols.swap_remove(p);
            for c in cols.iter_mut() {
                if c.0 >> bit & 1 == 1 {
                    c.0 ^= pivot.0;
                    c.1 ^= pivot.1;
                }
            }
            if target >> bit & 1 == 1 {
                target ^= pivot.0;
                pick ^= pivot.1;
            }
        }
        assert_eq!(target, 0, "the window cannot reach the CRC");
        for i in 0..32 {
            if pick >> i & 1 == 1 {
                msg[fix + i / 8] ^= 1 << (i % 8);
            }
        }
        assert_eq!(crate::crc::hash(msg), want);
    }

    #[test]
    fn a_forged_block_with_a_valid_crc_is_untrusted() {
        let mut s = state(2_000, 20);
        s.put(b"user:target", &[0xAA; 64]);
        let opts = IndexedOptions {
            block_bytes: 1024,
            index_block_bytes: 512,
        };
        let file = encode_verified(&s, 1, 1, DatasetId([2; 16]), opts);
        let digest = index_digest(&file).unwrap();
        // The data block holding the target value, found by the value.
        let at = file.windows(64).position(|w| w == [0xAA; 64]).unwrap();
        let mut lazy = LazySnapshot::new(file.len() as u64, 1 << 20);
        read(&mut lazy, &file, b"user:target").unwrap();
        let (h, _, _, _) = lazy.locate(b"user:target").unwrap().unwrap().unwrap();
        assert!(h.offset < at as u64 && (at as u64) < h.end());
        // Change the value and force the block's CRC back to what the
        // index states: a CRC-32 check alone would accept the block.
        let (lo, hi) = (h.offset as usize, h.end() as usize);
        let mut msg: Vec<u8> = file[lo..lo + 8].to_vec();
        msg.extend_from_slice(&file[lo + 12..hi]);
        let v = at - lo - 4; // the value's offset in `msg`
        msg[v] = 0xBB;
        force_crc(&mut msg, v + 8, h.crc);
        let mut forged = file.clone();
        forged[lo..lo + 8].copy_from_slice(&msg[..8]);
        forged[lo + 12..hi].copy_from_slice(&msg[8..]);
        assert_ne!(forged, file);
        // An unbound reader trusting CRC-32 alone would answer the forged
        // value; version 4's digests refuse it, bound or not.
        let mut lazy = LazySnapshot::with_index_digest(forged.len() as u64, 1 << 20, digest);
        let err = read(&mut lazy, &forged, b"user:target").unwrap_err();
        assert_eq!(
            err,
            DecodeError::Digest {
                what: "snapshot data block",
                at: h.offset
            }
        );
        // The reader keeps answering from the blocks it verified.
        let key = b"user:00000007";
        assert_eq!(
            read(&mut lazy, &forged, key).unwrap().0.as_deref(),
            s.get(key)
        );
        let err = decode_indexed(&forged, None).unwrap_err();
        assert!(matches!(err, DecodeError::Digest { .. }), "{err}");
    }

    #[test]
    fn the_cache_stays_within_its_bytes() {
        let s = state(20_000, 50);
        let opts = IndexedOptions {
            block_bytes: 4096,
            index_block_bytes: 4096,
        };
        let file = encode_indexed(&s, 1, 1, DatasetId([1; 16]), opts);
        let mut lazy = LazySnapshot::new(file.len() as u64, 32 << 10);
        for i in (0..20_000).step_by(97) {
            let key = format!("user:{:08}", i * 7);
            assert_eq!(
                read(&mut lazy, &file, key.as_bytes()).unwrap().0.as_deref(),
                s.get(key.as_bytes())
            );
            assert!(lazy.cached_bytes() <= 32 << 10);
        }
    }

    #[test]
    fn blocks_count_against_the_cache_by_what_they_hold_decoded() {
        // Keys sharing a long prefix: a block holds far more decoded than
        // it took on the wire.
        let prefix = "p".repeat(900);
        let mut s = KvState::new();
        for i in 0..4_000u32 {
            s.put(format!("{prefix}{i:08}").as_bytes(), b"v");
        }
        let file = encode_indexed(&s, 1, 1, DatasetId([1; 16]), IndexedOptions::default());
        // About four blocks' worth decoded (the file holds 3.6 MB decoded).
        let cache = 1 << 20;
        let mut lazy = LazySnapshot::new(file.len() as u64, cache);
        let mut rng = 3u64;
        let (mut wire, mut held) = (0, 0);
        for _ in 0..500 {
            let i = crate::rng::splitmix64(&mut rng) % 4_000;
            let key = format!("{prefix}{i:08}");
            let (v, _) = read(&mut lazy, &file, key.as_bytes()).unwrap();
            assert_eq!(v.as_deref(), Some(&b"v"[..]));
            let blocks = lazy.blocks.iter().map(|(_, (b, _))| b);
            (wire, held) = blocks.fold((0, 0), |(w, h), b| (w + b.wire_len(), h + b.heap_bytes()));
            assert!(
                held <= cache,
                "{held} bytes held decoded for a cache of {cache}"
            );
        }
        assert!(
            held > 8 * wire,
            "the blocks held {held} decoded from {wire} on the wire"
        );
    }

    /// 60,000 keys in 1 KiB blocks under 512-byte index partitions: a
    /// two-level index of many partitions.
    fn many_partitions() -> (u32, KvState, Vec<u8>) {
        let n = 60_000;
        let s = state(n, 50);
        let opts = IndexedOptions {
            block_bytes: 1024,
            index_block_bytes: 512,
        };
        let file = encode_indexed(&s, 1, 1, DatasetId([1; 16]), opts);
        (n, s, file)
    }

    #[test]
    fn a_block_whose_partition_another_read_evicted_is_asked_for_again() {
        let (n, s, file) = many_partitions();
        // A cache so small that only the two blocks used last stay.
        let mut lazy = LazySnapshot::new(file.len() as u64, 1);
        let (a, b) = (
            b"user:00000007".to_vec(),
            format!("user:{:08}", (n - 1) * 7),
        );
        let range = |lazy: &mut LazySnapshot, key: &[u8]| match lazy.get(key).unwrap() {
            Lookup::Need(Need::Range { start, end }) => (start, end),
            Lookup::Need(Need::Suffix(n)) => {
                let n = n as usize;
                lazy.feed_suffix(&file[file.len() - n..]).unwrap();
                match lazy.get(key).unwrap() {
                    Lookup::Need(Need::Range { start, end }) => (start, end),
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        };
        let bytes = |(start, end): (u64, u64)| &file[start as usize..end as usize];
        // Read A fetches its partition and asks for its data block...
        let pa = range(&mut lazy, &a);
        lazy.feed_range(pa.0, bytes(pa), &a).unwrap();
        let da = range(&mut lazy, &a);
        assert_ne!(da, pa);
        // ...while read B fetches its partition and block, evicting A's
        // partition.
        let pb = range(&mut lazy, b.as_bytes());
        lazy.feed_range(pb.0, bytes(pb), b.as_bytes()).unwrap();
        let db = range(&mut lazy, b.as_bytes());
        lazy.feed_range(db.0, bytes(db), b.as_bytes()).unwrap();
        assert_eq!(lazy.blocks.len(), 2);
        // A's block arrives: not an error; A asks again and answers.
        lazy.feed_range(da.0, bytes(da), &a).unwrap();
        let (v, gets) = read(&mut lazy, &file, &a).unwrap();
        assert_eq!(v.as_deref(), s.get(&a));
        assert_eq!(gets, 2, "the partition and the block again");
        assert_eq!(
            read(&mut lazy, &file, b.as_bytes()).unwrap().0.as_deref(),
            s.get(b.as_bytes())
        );
    }

    #[test]
    fn index_partitions_share_the_cache_bound() {
        // Many small partitions: random reads over the whole key space
        // would, kept forever, hold every one of them.
        let (n, s, file) = many_partitions();
        let cache = 16 << 10;
        let mut lazy = LazySnapshot::new(file.len() as u64, cache);
        let mut rng = 7u64;
        let mut partitions = std::collections::HashSet::new();
        for round in 0..3_000 {
            let i = crate::rng::splitmix64(&mut rng) % n as u64;
            let key = format!("user:{:08}", i * 7);
            let (v, gets) = read(&mut lazy, &file, key.as_bytes()).unwrap();
            assert_eq!(v.as_deref(), s.get(key.as_bytes()));
            assert!(
                round == 0 || gets <= 2,
                "{gets} GETs for one key with the top held"
            );
            assert_eq!(lazy.footer.unwrap().levels, 2);
            let (_, _, _, p) = lazy.locate(key.as_bytes()).unwrap().unwrap().unwrap();
            partitions.insert(p.unwrap());
            assert_eq!(lazy.index.len(), 1, "only the top index is kept apart");
            assert!(lazy.cached_bytes() <= cache, "{}", lazy.cached_bytes());
        }
        assert!(
            partitions.len() as u64 * MIN_BLOCK_CHARGE > 4 * cache,
            "{} partitions read",
            partitions.len()
        );
        // A scan across all partitions finishes within the same bound.
        let mut cursor = ScanCursor::new(b"", None, usize::MAX);
        let (mut out, mut needs) = (Vec::new(), 0);
        while let Some(need) = lazy.scan_step(&mut cursor, &mut out).unwrap() {
            needs += 1;
            match need {
                Need::Suffix(_) => unreachable!("the footer is held"),
                Need::Range { start, end } => {
                    lazy.feed_range(start, &file[start as usize..end as usize], &cursor.next)
                }
            }
            .unwrap();
            assert!(lazy.cached_bytes() <= cache);
        }
        assert_eq!(out.len(), n as usize);
        assert!(
            needs < 3 * (file.len() / 1024),
            "{needs} fetches for one scan"
        );
    }

    type Entries = Vec<(Vec<u8>, Vec<u8>)>;

    fn scan_all(
        lazy: &mut LazySnapshot,
        file: &[u8],
        cur: &mut ScanCursor,
    ) -> Result<(Entries, u32), DecodeError> {
        let mut out = Vec::new();
        let mut gets = 0;
        while let Some(need) = lazy.scan_step(cur, &mut out)? {
            gets += 1;
            assert!(gets < 10_000, "a scan loops");
            match need {
                Need::Suffix(n) => {
                    let n = n.min(file.len() as u64) as usize;
                    lazy.feed_suffix(&file[file.len() - n..])?;
                }
                Need::Range { start, end } => {
                    let s = (start as usize).min(file.len());
                    let e = (end as usize).min(file.len());
                    lazy.feed_range(start, &file[s..e], &cur.next.clone())?;
                }
            }
        }
        Ok((out, gets))
    }

    proptest! {
        /// Ordered scans over one or two index levels, with a cache smaller
        /// than the scan, equal a filter over the state.
        #[test]
        fn scans_match_the_state(n in 0u32..800, a in 0u32..6000, b in 0u32..6000, limit in 0usize..900, small in any::<bool>()) {
            let s = state(n, 6);
            let opts = if small {
                IndexedOptions { block_bytes: 128, index_block_bytes: 96 }
            } else {
                IndexedOptions::default()
            };
            let file = if small {
                encode_verified(&s, 1, 1, DatasetId([1; 16]), opts)
            } else {
                encode_indexed(&s, 1, 1, DatasetId([1; 16]), opts)
            };
            let start = format!("user:{a:08}").into_bytes();
            let end = (b % 3 != 0).then(|| format!("user:{b:08}").into_bytes());
            let mut lazy = LazySnapshot::new(file.len() as u64, 512);
            let mut cur = ScanCursor::new(&start, end.as_deref(), limit);
            let (got, _) = scan_all(&mut lazy, &file, &mut cur).unwrap();
            let want: Vec<_> = s
                .iter()
                .filter(|(k, _)| **k >= *start.as_slice() && end.as_ref().is_none_or(|e| **k < *e.as_slice()))
                .take(limit)
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect();
            prop_assert_eq!(got, want);
            prop_assert!(cur.is_done() || cur.remaining == 0);
        }

        /// A flipped byte anywhere is either caught, or cannot change an
        /// answer (it lies in bytes the read never uses).
        #[test]
        fn a_damaged_file_never_answers_wrong(at in 0usize..100_000, bit in 0u8..8, k in 0u32..400, v4 in any::<bool>()) {
            let s = state(400, 8);
            let opts = IndexedOptions { block_bytes: 256, index_block_bytes: 128 };
            let good = if v4 {
                encode_verified(&s, 1, 1, DatasetId([1; 16]), opts)
            } else {
                encode_indexed(&s, 1, 1, DatasetId([1; 16]), opts)
            };
            let mut file = good.clone();
            let at = at % file.len();
            file[at] ^= 1 << bit;
            prop_assert!(decode_indexed(&file, None).is_err());
            let key = format!("user:{:08}", k * 7);
            let mut lazy = LazySnapshot::new(file.len() as u64, 1 << 20);
            if let Ok((v, _)) = read(&mut lazy, &file, key.as_bytes()) {
                prop_assert_eq!(v.as_deref(), s.get(key.as_bytes()));
            }
            if let Some(d) = index_digest(&good) {
                // Bound to the signed digest: any answer is the right one.
                let mut lazy = LazySnapshot::with_index_digest(file.len() as u64, 1 << 20, d);
                if let Ok((v, _)) = read(&mut lazy, &file, key.as_bytes()) {
                    prop_assert_eq!(v.as_deref(), s.get(key.as_bytes()));
                }
            }
        }

        /// The streaming decoder reads version 2 fed in pieces of any size.
        #[test]
        fn streams_in_any_pieces(n in 0u32..600, piece in 1usize..5000, small in any::<bool>(), v4 in any::<bool>()) {
            let s = state(n, 10);
            let opts = if small {
                IndexedOptions { block_bytes: 200, index_block_bytes: 100 }
            } else {
                IndexedOptions::default()
            };
            let file = if v4 {
                encode_verified(&s, 4, 2, DatasetId([5; 16]), opts)
            } else {
                encode_indexed(&s, 4, 2, DatasetId([5; 16]), opts)
            };
            let mut d = super::super::SnapshotDecoder::new();
            for c in file.chunks(piece) {
                d.feed(c).unwrap();
            }
            let (h, back) = d.finish(Some(crate::crc::hash(&file))).unwrap();
            prop_assert_eq!(h.entry_count, s.len());
            prop_assert!(back.iter().eq(s.iter()));
        }

        /// Arbitrary bytes as a file: errors, never a panic or a loop.
        #[test]
        fn garbage_is_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..400), key in proptest::collection::vec(any::<u8>(), 0..8)) {
            let _ = decode_indexed(&bytes, None);
            let mut lazy = LazySnapshot::new(bytes.len() as u64, 1 << 20);
            let _ = read(&mut lazy, &bytes, &key);
        }
    }
}
