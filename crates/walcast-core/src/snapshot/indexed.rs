//! The block-indexed snapshot (format version 2): data blocks, an index of
//! them (partitioned into index blocks under a top index when large), and a
//! fixed 48-byte footer a reader finds with one suffix range GET. A point
//! read fetches the footer, the top index, at most one index block and one
//! data block, and verifies each before use. See `docs/FORMAT.md`.
//!
//! [`LazySnapshot`] is the pure point reader: ask it for a key and it answers
//! with a value, or with the byte range it needs next ("need more bytes" is a
//! value, not an error).

use std::collections::{BTreeMap, HashMap};

use super::block::{Block, BlockBuilder, BlockHandle, HANDLE_LEN};
use super::{SnapshotHeader, HEADER_LEN, MAGIC};
use crate::catalog::DatasetId;
use crate::codec::{check_crc, invalid, Reader};
use crate::error::DecodeError;
use crate::state::KvState;

/// Version of the block-indexed snapshot.
pub const VERSION_INDEXED: u16 = 2;
/// Bytes of the footer.
pub const FOOTER_LEN: u64 = 48;
/// Magic at the end of a block-indexed snapshot.
pub const FOOTER_MAGIC: [u8; 4] = *b"WCS2";
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
}

impl Footer {
    /// The footer's 48 bytes.
    pub fn encode(&self) -> [u8; FOOTER_LEN as usize] {
        let mut b = [0u8; FOOTER_LEN as usize];
        b[..8].copy_from_slice(&self.index_offset.to_le_bytes());
        b[8..24].copy_from_slice(&self.top.encode());
        b[24..32].copy_from_slice(&self.entry_count.to_le_bytes());
        b[32..36].copy_from_slice(&self.data_blocks.to_le_bytes());
        b[36] = self.levels;
        let crc = crate::crc::hash(&b[..40]);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        b[44..].copy_from_slice(&FOOTER_MAGIC);
        b
    }

    /// Parses the footer of a file of `size` bytes; `bytes` are its last 48.
    pub fn decode(bytes: &[u8], size: u64) -> Result<Footer, DecodeError> {
        let at = size.saturating_sub(FOOTER_LEN);
        if bytes.len() as u64 != FOOTER_LEN || size < HEADER_LEN + FOOTER_LEN {
            return Err(DecodeError::Truncated {
                what: "snapshot footer",
                at,
                need: FOOTER_LEN,
                have: bytes.len() as u64,
            });
        }
        let mut r = Reader::new(bytes, at);
        let index_offset = r.u64("snapshot footer")?;
        let top = BlockHandle::decode(r.bytes(HANDLE_LEN as u64, "snapshot footer")?, at + 8)?;
        let entry_count = r.u64("snapshot footer")?;
        let data_blocks = r.u32("snapshot footer")?;
        let levels = r.u8("snapshot footer")?;
        let reserved = r.bytes(3, "snapshot footer")?;
        let crc = r.u32("snapshot footer")?;
        r.magic(&FOOTER_MAGIC, "snapshot footer")?;
        check_crc("snapshot footer", at, crc, &bytes[..40])?;
        if reserved != [0, 0, 0] || !(1..=2).contains(&levels) {
            return Err(invalid(
                "snapshot footer",
                at,
                "unknown levels or reserved bits",
            ));
        }
        let body_end = size - FOOTER_LEN;
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
        })
    }
}

fn header_bytes(lsn: u64, epoch: u64, dataset_id: DatasetId, entries: u64) -> Vec<u8> {
    let mut head = Vec::with_capacity(HEADER_LEN as usize);
    head.extend_from_slice(&MAGIC);
    head.extend_from_slice(&VERSION_INDEXED.to_le_bytes());
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

/// Parses a 56-byte snapshot header of version 2.
pub fn decode_indexed_header(bytes: &[u8]) -> Result<SnapshotHeader, DecodeError> {
    let mut r = Reader::new(bytes, 0);
    r.magic(&MAGIC, "snapshot header")?;
    let version = r.u16("snapshot header")?;
    if version != VERSION_INDEXED {
        return Err(DecodeError::UnsupportedVersion {
            what: "block-indexed snapshot",
            version: u64::from(version),
            known: u64::from(VERSION_INDEXED),
        });
    }
    let flags = r.u16("snapshot header")?;
    if flags != 0 {
        return Err(DecodeError::UnknownFlags {
            what: "snapshot header",
            flags,
        });
    }
    let lsn = r.u64("snapshot header")?;
    let epoch = r.u64("snapshot header")?;
    let dataset_id = DatasetId(r.array("snapshot header")?);
    let entry_count = r.u64("snapshot header")?;
    let _reserved = r.u32("snapshot header")?;
    let crc = r.u32("snapshot header")?;
    check_crc("snapshot header", 0, crc, &bytes[..52.min(bytes.len())])?;
    Ok(SnapshotHeader {
        lsn,
        epoch,
        dataset_id,
        entry_count,
    })
}

/// Encodes `state` as a block-indexed snapshot at `lsn`.
pub fn encode_indexed(
    state: &KvState,
    lsn: u64,
    epoch: u64,
    dataset_id: DatasetId,
    opts: IndexedOptions,
) -> Vec<u8> {
    let mut out = header_bytes(lsn, epoch, dataset_id, state.len());
    // Data blocks, remembering (first key, handle) of each.
    let mut index: Vec<(Vec<u8>, BlockHandle)> = Vec::new();
    let mut b = BlockBuilder::new();
    let flush = |b: &mut BlockBuilder, out: &mut Vec<u8>, index: &mut Vec<_>| {
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
        out.extend_from_slice(&bytes);
        index.push((first, h));
    };
    for (k, v) in state.iter() {
        b.push(k, v);
        if b.size() >= opts.block_bytes {
            flush(&mut b, &mut out, &mut index);
        }
    }
    flush(&mut b, &mut out, &mut index);
    let index_offset = out.len() as u64;
    let data_blocks = index.len() as u32;
    // One index block if it fits, else index blocks under a top index.
    let mut level: Vec<(Vec<u8>, BlockHandle)> = Vec::new();
    let mut ib = BlockBuilder::new();
    for (k, h) in &index {
        ib.push(k, &h.encode());
        if ib.size() >= opts.index_block_bytes {
            flush(&mut ib, &mut out, &mut level);
        }
    }
    let (top, levels) = if level.is_empty() {
        // Everything fits in one block: it is the top index.
        let mut top = Vec::new();
        flush(&mut ib, &mut out, &mut top);
        (top.pop().map(|(_, h)| h), 1u8)
    } else {
        flush(&mut ib, &mut out, &mut level);
        for (k, h) in &level {
            ib.push(k, &h.encode());
        }
        let mut top = Vec::new();
        flush(&mut ib, &mut out, &mut top);
        (top.pop().map(|(_, h)| h), 2u8)
    };
    // An empty state has one index block with no entries: the footer
    // always names a block.
    let top = top.unwrap_or_else(|| {
        let (bytes, crc) = BlockBuilder::new().finish();
        let h = BlockHandle {
            offset: out.len() as u64,
            len: bytes.len() as u32,
            crc,
        };
        out.extend_from_slice(&bytes);
        h
    });
    let footer = Footer {
        index_offset,
        top,
        entry_count: state.len(),
        data_blocks,
        levels,
    };
    out.extend_from_slice(&footer.encode());
    out
}

/// Whether `bytes` (at least the first 6 of a snapshot) are version 2.
pub fn is_indexed(bytes: &[u8]) -> bool {
    bytes.len() >= 6 && bytes[..4] == MAGIC && bytes[4..6] == VERSION_INDEXED.to_le_bytes()
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

/// A point reader over one block-indexed snapshot, holding its footer and
/// index blocks, and data blocks in a cache bounded in bytes (least recently
/// used first out). Pure: it never does IO, it says what it needs.
#[derive(Debug)]
pub struct LazySnapshot {
    size: u64,
    footer: Option<Footer>,
    /// Verified index blocks by offset (the top one and partitions).
    index: HashMap<u64, Block>,
    /// Verified data blocks by offset, with their last use.
    blocks: HashMap<u64, (Block, u64)>,
    lru: BTreeMap<u64, u64>,
    tick: u64,
    cache_bytes: u64,
    cached: u64,
    /// Blocks fetched so far (index and data).
    pub fetched_blocks: u64,
}

impl LazySnapshot {
    /// A reader for the snapshot of `size` bytes, caching at most
    /// `cache_bytes` of data blocks (at least one block is always kept).
    pub fn new(size: u64, cache_bytes: u64) -> Self {
        LazySnapshot {
            size,
            footer: None,
            index: HashMap::new(),
            blocks: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            cache_bytes,
            cached: 0,
            fetched_blocks: 0,
        }
    }

    /// The footer, once read.
    pub fn footer(&self) -> Option<&Footer> {
        self.footer.as_ref()
    }

    /// Bytes of data blocks held.
    pub fn cached_bytes(&self) -> u64 {
        self.cached
    }

    /// Feeds the answer to [`Need::Suffix`]: the last `bytes.len()` bytes of
    /// the file. Verifies the footer, and the top index when it came along.
    pub fn feed_suffix(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        let n = bytes.len() as u64;
        if n < FOOTER_LEN || n > self.size {
            return Err(DecodeError::Truncated {
                what: "snapshot footer",
                at: self.size.saturating_sub(n),
                need: FOOTER_LEN,
                have: n,
            });
        }
        let footer = Footer::decode(&bytes[(n - FOOTER_LEN) as usize..], self.size)?;
        let start = self.size - n;
        if footer.top.offset >= start {
            let lo = (footer.top.offset - start) as usize;
            let hi = (footer.top.end() - start) as usize;
            let top = Block::decode(&bytes[lo..hi], &footer.top, "snapshot top index")?;
            self.fetched_blocks += 1;
            self.index.insert(footer.top.offset, top);
        }
        self.footer = Some(footer);
        Ok(())
    }

    /// Feeds the answer to [`Need::Range`] for the block `handle` names.
    fn feed(&mut self, handle: &BlockHandle, bytes: &[u8], data: bool) -> Result<(), DecodeError> {
        let what = if data {
            "snapshot data block"
        } else {
            "snapshot index block"
        };
        let block = Block::decode(bytes, handle, what)?;
        self.fetched_blocks += 1;
        if data {
            self.tick += 1;
            self.cached += block.wire_len();
            self.lru.insert(self.tick, handle.offset);
            if let Some((_, old)) = self.blocks.insert(handle.offset, (block, self.tick)) {
                self.lru.remove(&old);
            }
            while self.cached > self.cache_bytes && self.blocks.len() > 1 {
                let Some((_, off)) = self.lru.pop_first() else {
                    break;
                };
                if let Some((b, _)) = self.blocks.remove(&off) {
                    self.cached -= b.wire_len();
                }
            }
        } else {
            self.index.insert(handle.offset, block);
        }
        Ok(())
    }

    /// The data block that holds `key`, or what to fetch to find it.
    /// `Ok(None)`: no block can hold it (below the first key).
    fn locate(&self, key: &[u8]) -> Result<Result<Option<(BlockHandle, bool)>, Need>, DecodeError> {
        let Some(footer) = self.footer else {
            return Ok(Err(Need::Suffix(SUFFIX_GUESS.min(self.size))));
        };
        let Some(top) = self.index.get(&footer.top.offset) else {
            return Ok(Err(Need::Range {
                start: footer.top.offset,
                end: footer.top.end(),
            }));
        };
        let handle_at = |b: &Block, i: usize, at: u64| BlockHandle::decode(&b.entries()[i].1, at);
        let Some(i) = top.child_for(key) else {
            return Ok(Ok(None));
        };
        let mut h = handle_at(top, i, footer.top.offset)?;
        if footer.levels == 2 {
            if h.offset < footer.index_offset || h.end() > footer.top.offset {
                return Err(invalid(
                    "snapshot top index",
                    footer.top.offset,
                    "an index block outside the index region",
                ));
            }
            let Some(part) = self.index.get(&h.offset) else {
                return Ok(Ok(Some((h, false))));
            };
            let Some(j) = part.child_for(key) else {
                return Ok(Ok(None));
            };
            h = handle_at(part, j, h.offset)?;
        }
        if h.offset < HEADER_LEN || h.end() > footer.index_offset {
            return Err(invalid(
                "snapshot index",
                footer.top.offset,
                "a data block outside the data region",
            ));
        }
        Ok(Ok(Some((h, true))))
    }

    /// Looks `key` up: its value, or the bytes needed next.
    pub fn get(&mut self, key: &[u8]) -> Result<Lookup, DecodeError> {
        let (h, data) = match self.locate(key)? {
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
        self.tick += 1;
        let tick = self.tick;
        match self.blocks.get_mut(&h.offset) {
            Some((block, used)) => {
                self.lru.remove(used);
                *used = tick;
                self.lru.insert(tick, h.offset);
                Ok(Lookup::Done(block.get(key).map(<[u8]>::to_vec)))
            }
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
                self.feed(&top, bytes, false)
            }
            Ok(Some((h, data))) if h.offset == start => self.feed(&h, bytes, data),
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
            let (h, data) = match self.locate(&cursor.next)? {
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
            let Some((block, _)) = self.blocks.get(&h.offset).filter(|_| data) else {
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
        let top = self.index.get(&self.footer?.top.offset)?;
        top.entries().first().map(|(k, _)| k.as_slice())
    }

    /// The first key of the data block after the one holding `key`.
    fn next_block_key(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DecodeError> {
        let Some(footer) = self.footer else {
            return Ok(None);
        };
        let Some(top) = self.index.get(&footer.top.offset) else {
            return Ok(None);
        };
        let Some(i) = top.child_for(key) else {
            return Ok(None);
        };
        let after_top = top.entries().get(i + 1).map(|(k, _)| k.clone());
        if footer.levels == 1 {
            return Ok(after_top);
        }
        let h = BlockHandle::decode(&top.entries()[i].1, footer.top.offset)?;
        let Some(part) = self.index.get(&h.offset) else {
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

/// Checks the index region and footer of a version 2 snapshot against the
/// data blocks a streaming reader decoded: `tail` holds the file's bytes
/// from `tail_at` (the end of the data blocks) to `size`; `blocks` the first
/// key and handle of each data block, in order; `entries` the entries read.
pub(crate) fn verify_index(
    tail: &[u8],
    tail_at: u64,
    size: u64,
    blocks: &[(Vec<u8>, BlockHandle)],
    entries: u64,
) -> Result<(), DecodeError> {
    if (tail.len() as u64) < FOOTER_LEN || tail_at + tail.len() as u64 != size {
        return Err(DecodeError::Truncated {
            what: "snapshot index",
            at: tail_at,
            need: FOOTER_LEN,
            have: tail.len() as u64,
        });
    }
    let footer = Footer::decode(&tail[tail.len() - FOOTER_LEN as usize..], size)?;
    if footer.index_offset != tail_at
        || footer.data_blocks as usize != blocks.len()
        || footer.entry_count != entries
    {
        return Err(invalid(
            "snapshot footer",
            size - FOOTER_LEN,
            "the footer disagrees with the data blocks read",
        ));
    }
    let slice =
        |h: &BlockHandle| &tail[(h.offset - tail_at) as usize..(h.end() - tail_at) as usize];
    let handles = |b: &Block, at: u64| -> Result<Vec<(Vec<u8>, BlockHandle)>, DecodeError> {
        b.entries()
            .iter()
            .map(|(k, v)| Ok((k.clone(), BlockHandle::decode(v, at)?)))
            .collect()
    };
    let top = Block::decode(slice(&footer.top), &footer.top, "snapshot top index")?;
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
        for (first, ih) in handles(&top, footer.top.offset)? {
            if ih.offset != next || ih.end() > footer.top.offset {
                return Err(invalid(
                    "snapshot top index",
                    ih.offset,
                    "index blocks are not contiguous",
                ));
            }
            next = ih.end();
            let part = Block::decode(slice(&ih), &ih, "snapshot index block")?;
            let children = handles(&part, ih.offset)?;
            if children.first().map(|(k, _)| k) != Some(&first) {
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
    if named.as_slice() != blocks {
        return Err(invalid(
            "snapshot index",
            tail_at,
            "the index disagrees with the data blocks read",
        ));
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
            let file = encode_indexed(&s, 1, 1, DatasetId([1; 16]), opts);
            let start = format!("user:{a:08}").into_bytes();
            let end = (b % 3 != 0).then(|| format!("user:{b:08}").into_bytes());
            let mut lazy = LazySnapshot::new(file.len() as u64, 512);
            let mut cur = ScanCursor::new(&start, end.as_deref(), limit);
            let (got, _) = scan_all(&mut lazy, &file, &mut cur).unwrap();
            let want: Vec<_> = s
                .iter()
                .filter(|(k, _)| *k >= start.as_slice() && end.as_ref().is_none_or(|e| *k < e.as_slice()))
                .take(limit)
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect();
            prop_assert_eq!(got, want);
            prop_assert!(cur.is_done() || cur.remaining == 0);
        }

        /// A flipped byte anywhere is either caught, or cannot change an
        /// answer (it lies in bytes the read never uses).
        #[test]
        fn a_damaged_file_never_answers_wrong(at in 0usize..100_000, bit in 0u8..8, k in 0u32..400) {
            let s = state(400, 8);
            let opts = IndexedOptions { block_bytes: 256, index_block_bytes: 128 };
            let mut file = encode_indexed(&s, 1, 1, DatasetId([1; 16]), opts);
            let at = at % file.len();
            file[at] ^= 1 << bit;
            prop_assert!(decode_indexed(&file, None).is_err());
            let key = format!("user:{:08}", k * 7);
            let mut lazy = LazySnapshot::new(file.len() as u64, 1 << 20);
            if let Ok((v, _)) = read(&mut lazy, &file, key.as_bytes()) {
                prop_assert_eq!(v.as_deref(), s.get(key.as_bytes()));
            }
        }

        /// The streaming decoder reads version 2 fed in pieces of any size.
        #[test]
        fn streams_in_any_pieces(n in 0u32..600, piece in 1usize..5000, small in any::<bool>()) {
            let s = state(n, 10);
            let opts = if small {
                IndexedOptions { block_bytes: 200, index_block_bytes: 100 }
            } else {
                IndexedOptions::default()
            };
            let file = encode_indexed(&s, 4, 2, DatasetId([5; 16]), opts);
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
