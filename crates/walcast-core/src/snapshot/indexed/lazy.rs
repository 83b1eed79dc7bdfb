//! [`LazySnapshot`]: the pure point and range reader of a block-indexed
//! snapshot, which answers a read or names the bytes it needs next, and
//! keeps the blocks it fetched in a cache bounded in bytes.

use super::*;

/// A block a read needs: its handle, digest, whether it is a data block
/// (else an index block), and the offset of the index block (partition)
/// that named it, if any.
type Located = (BlockHandle, Option<[u8; 32]>, bool, Option<u64>);

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
pub(super) const MIN_BLOCK_CHARGE: u64 = 1 << 10;

/// The mark of a cached block not used since it was fetched (the high
/// bit of its last use).
pub(super) const FRESH: u64 = 1 << 63;

/// A point reader over one block-indexed snapshot, holding its footer and
/// top index, and index partitions and data blocks in a cache bounded in
/// bytes (least recently used first out). Pure: it never does IO, it says
/// what it needs.
#[derive(Debug)]
pub struct LazySnapshot {
    size: u64,
    pub(super) footer: Option<Footer>,
    /// The verified top index block, by offset.
    pub(super) index: VecMap<Block>,
    /// Verified index partitions and data blocks by offset (their regions
    /// do not overlap), with their last use: the least recently used goes
    /// first when the cache is over its bytes. A block not used since it
    /// was fetched has [`FRESH`] set, and goes after every used one.
    pub(super) blocks: VecMap<(Block, u64)>,
    tick: u64,
    cache_bytes: u64,
    /// Blocks fetched and not yet used kept past the cache's bytes (see
    /// [`set_cache`](Self::set_cache)).
    fresh_max: usize,
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
            fresh_max: 0,
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

    /// Bounds the blocks held to `cache_bytes` from now on, dropping the
    /// least recently used at once if they hold more, but keeping up to
    /// `fresh_max` blocks fetched and not yet used whatever their bytes:
    /// reads waiting for blocks whose GETs are answered together must find
    /// them when they run, not evicted by one another's arrival (give
    /// about the block GETs out at once).
    pub fn set_cache(&mut self, cache_bytes: u64, fresh_max: usize) {
        self.cache_bytes = cache_bytes;
        self.fresh_max = fresh_max;
        self.evict();
    }

    /// Drops the least recently used blocks while the cache is over its
    /// bytes, keeping the two used last (a point read of a partitioned
    /// index needs its partition and its data block at once) and the fresh
    /// ones: at most `fresh_max`, and at most twice the cache's bytes (at
    /// least 1 MiB); past either, every one ages into an ordinary block,
    /// last used when it was fetched.
    fn evict(&mut self) {
        // Their count, and their bytes past twice what the GETs out at once
        // may bring (a store of large blocks nobody reads).
        let (mut n, mut bytes) = (0, 0);
        for (_, (b, u)) in self.blocks.iter() {
            if u & FRESH != 0 {
                n += 1;
                bytes += cache_charge(b);
            }
        }
        if n > self.fresh_max || bytes > 2 * self.cache_bytes.max(1 << 20) {
            self.blocks.retain(|_, (_, u)| {
                *u &= !FRESH;
                true
            });
        }
        while self.cached > self.cache_bytes && self.blocks.len() > 2 {
            let Some((off, used)) = self
                .blocks
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(off, (_, used))| (off, *used))
            else {
                break;
            };
            // The least recently used is fresh: so is every block held.
            if used & FRESH != 0 {
                break;
            }
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
                "its CRC-32 is not the catalog's",
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
                what: "snapshot footer (no block digests: not version 4)",
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
            if let Some((old, _)) = self
                .blocks
                .insert(handle.offset, (block, self.tick | FRESH))
            {
                self.cached -= cache_charge(&old);
            }
            self.evict();
        }
        Ok(())
    }

    /// The data block that holds `key`, or what to fetch to find it.
    /// `Ok(None)`: no block can hold it (below the first key).
    pub(super) fn locate(&self, key: &[u8]) -> Result<Result<Option<Located>, Need>, DecodeError> {
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

    /// A read waits for a data block under the index partition at
    /// `partition`: the partition is kept (fresh again, as fetched now)
    /// until the block is here and used with it.
    fn wait_under(&mut self, partition: Option<u64>) {
        self.tick += 1;
        if let Some((_, used)) = partition.and_then(|p| self.blocks.get_mut(p)) {
            *used = self.tick | FRESH;
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
        if self.blocks.get(h.offset).is_none() {
            self.wait_under(partition);
            return Ok(Lookup::Need(Need::Range {
                start: h.offset,
                end: h.end(),
            }));
        }
        self.touch(partition, h.offset);
        let value = self.blocks.get(h.offset).and_then(|(b, _)| b.get(key));
        Ok(Lookup::Done(value.map(<[u8]>::to_vec)))
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
            // The block and its partition stay fresh (kept) until the read
            // runs and uses them.
            Ok(Some((h, d, data, _))) if h.offset == start => {
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
            if !data || self.blocks.get(h.offset).is_none() {
                self.wait_under(partition);
                return Ok(Some(Need::Range {
                    start: h.offset,
                    end: h.end(),
                }));
            }
            self.touch(partition, h.offset);
            // The block's entries up to the next block's first key: what
            // the index says it holds, as a point read finds it (a block
            // holding more, out of order, is not scanned past its range).
            let upper = self.next_block_key(&cursor.next)?;
            let Some((block, _)) = self.blocks.get(h.offset) else {
                break;
            };
            for (k, v) in &block.entries()[block.lower_bound(&cursor.next)..] {
                if upper.as_ref().is_some_and(|u| k >= u) {
                    break;
                }
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
            match upper {
                Some(k) if k > cursor.next => cursor.next = k,
                _ => cursor.done = true,
            }
        }
        Ok(None)
    }

    /// Up to `n` data blocks after the one holding `key`, listed by the same
    /// index block (held) and starting before `end`, that are not cached and
    /// together take at most a quarter of the cache: each with its first
    /// key (which locates it), for a scan to fetch beside its next block
    /// (read-ahead: their GETs go out together, not one round trip a block).
    #[inline(never)]
    pub fn blocks_ahead(&self, key: &[u8], end: Option<&[u8]>, n: usize) -> Vec<(Vec<u8>, Need)> {
        let mut out = Vec::new();
        let Some(footer) = self.footer else {
            return out;
        };
        let Some(mut ix) = self.index.get(footer.top.offset) else {
            return out;
        };
        let (mut at, digests) = (footer.top.offset, footer.has_digests());
        if footer.levels == 2 {
            let part = ix
                .child_for(key)
                .and_then(|i| decode_handle(&ix.entries()[i].1, at, digests).ok());
            let Some((b, h)) = part.and_then(|(h, _)| Some((&self.blocks.get(h.offset)?.0, h)))
            else {
                return out;
            };
            (ix, at) = (b, h.offset);
        }
        let Some(i) = ix.child_for(key) else {
            return out;
        };
        let mut bytes = 0u64;
        for (k, v) in ix.entries().iter().skip(i + 1).take(n) {
            let Ok((h, _)) = decode_handle(v, at, digests) else {
                break;
            };
            if end.is_some_and(|e| k.as_slice() >= e) {
                break;
            }
            bytes += u64::from(h.len);
            // Where the index points outside the data, the read that needs
            // the block reports it.
            if bytes > self.cache_bytes / 4
                || h.offset < HEADER_LEN
                || h.end() > footer.index_offset
            {
                break;
            }
            if self.blocks.get(h.offset).is_none() {
                out.push((
                    k.clone(),
                    Need::Range {
                        start: h.offset,
                        end: h.end(),
                    },
                ));
            }
        }
        out
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
