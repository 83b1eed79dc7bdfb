//! Lazy mode: the replica adopts the newest block-indexed snapshot without
//! downloading it, replays only the segments after it into an overlay, and
//! answers reads from the overlay first and the snapshot's blocks second,
//! fetching the blocks a read needs (footer, index, data) and keeping them in
//! a cache bounded in bytes.
//!
//! Every answer comes from one state the origin had: the snapshot at its LSN
//! plus the overlay of every batch after it up to the applied LSN. A newer
//! snapshot at or below the applied LSN replaces the base and drops the
//! overlay entries it covers; one above it is adopted as the new state.
//!
//! This file holds the state ([`Lazy`]) and the public types; `adopt`
//! takes heads' snapshots and delta chains, `read` answers reads, `blocks`
//! runs the GETs reads wait for, and `deferred` the segments counted as
//! applied without a GET.

mod adopt;
mod blocks;
mod deferred;
mod read;

use crate::batch::OpRef;
use crate::catalog::{DeltaEntry, SnapshotEntry};
use crate::error::{DecodeError, Error, ErrorKind};
use crate::io::{ByteRange, GetResponse};
use crate::snapshot::delta::{Change, DeltaIndex};
use crate::snapshot::indexed::{LazySnapshot, Lookup, Need, ScanCursor};
use crate::snapshot::pointer::Pointer;
use crate::state::Overlay;
use crate::vecmap::VecMap;

use super::{Event, Job, Replica};

/// Per overlay entry, what the cache charges besides key and value.
const OVERLAY_ENTRY_OVERHEAD: u64 = 64;

/// Most data blocks a point read fetches at once from the places that may
/// hold its key (see `Lazy::delta_get`).
const SPECULATIVE_BLOCKS: usize = 2;

/// Most block failures a lazy replica keeps for reads to report: a store
/// that fails GETs no read takes the failure of (speculative ones) must not
/// grow the list for as long as the base stays.
pub(super) const MAX_FAILED: usize = 64;

/// Snapshot and delta block GETs out at once, per segment GET a replica
/// makes at once (`ReplicaConfig::max_inflight`): a cold read needs up to
/// six at once (a suffix of each delta and a snapshot index block), so
/// never fewer than twice this.
pub(super) const BLOCKS_PER_INFLIGHT: usize = 4;

/// The data blocks each delta keeps past the deltas' share of the cache:
/// the last ones put in, so that this many reads (scans at several places,
/// say) waiting for a block of each delta find them when they run. Fewer
/// (as many of each delta's last) when they would hold more than twice the
/// bytes of the block GETs out at once, and at least the last.
pub(super) const RECENT_BLOCKS: usize = 4;

/// Most segments a lazy replica holds unread at once (see
/// [`Lazy::deferred`]); past that, segments are fetched as they come.
pub(super) const MAX_DEFERRED: usize = 128;

/// A delta's index and filter (its suffix) may take the lazy cache's
/// bytes, and at least this many: the chain's are held besides the cache.
pub(super) const MAX_INDEX_FLOOR: u64 = crate::snapshot::delta::MAX_LAZY_SUFFIX;

/// The answer to a lazy read: ready, or waiting for GETs the replica has
/// queued (drive [`Replica::poll`] and ask again after responses arrive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read<T> {
    /// The answer, from one state at the applied LSN.
    Ready(T),
    /// Blocks are being fetched.
    Pending,
}

/// Key-value pairs in key order, as a scan returns them.
pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// An ordered scan in progress; keep it across [`Replica::scan_lazy`] calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyScan {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
    limit: usize,
    /// Stop after the entry that brings the keys and values returned to
    /// this many bytes (see [`LazyScan::max_bytes`]).
    max_bytes: usize,
    /// The base being scanned (its [`Lazy::base_gen`]), and what it
    /// returned so far.
    base_gen: Option<u64>,
    cursor: Option<ScanCursor>,
    collected: Vec<(Vec<u8>, Vec<u8>)>,
    /// The merge of `collected` with the overlay so far, at the applied LSN
    /// and [`Lazy::overlay_gen`] `merge_at`: `merged` (its entries and their bytes)
    /// holds every key up to `pos`, the last key merged, from
    /// `collected[..used]` and the overlay. Each turn merges only what a
    /// turn collected beyond it, so a scan of n blocks is not n merges of
    /// everything before.
    merge_at: Option<(u64, u64)>,
    merged: Entries,
    merged_bytes: usize,
    used: usize,
    pos: Option<Vec<u8>>,
    /// Entries copied into answers, over every turn.
    copied: u64,
    /// The delta chain scanned (its base's [`Lazy::base_gen`] and chain
    /// end): its changes to the keys from `start` (or `pos`) up to
    /// `chain_hi` (exclusive; every key once `chain_done`) are in the
    /// overlay, written a data block of each delta at a time, unless
    /// [`Lazy::chain_shed`] moved past `shed_seen` since.
    chain_at: Option<(u64, u64)>,
    chain_hi: Vec<u8>,
    chain_done: bool,
    shed_seen: u64,
}

impl LazyScan {
    /// Forgets the merge: the next turn merges `collected` from the start.
    pub(super) fn restart_merge(&mut self) {
        self.merge_at = None;
        self.merged.clear();
        self.merged_bytes = 0;
        self.used = 0;
        self.pos = None;
        self.chain_hi = self.start.clone();
        self.chain_done = self.chain_at.is_none();
    }

    /// The merge as the answer; a call after it merges again.
    pub(super) fn answer(&mut self) -> Read<Entries> {
        let out = std::mem::take(&mut self.merged);
        self.restart_merge();
        Read::Ready(out)
    }
}

impl LazyScan {
    /// A scan of keys in `start..end` (`end` exclusive; `None`: to the last
    /// key), returning at most `limit` entries.
    pub fn new(start: &[u8], end: Option<&[u8]>, limit: usize) -> Self {
        LazyScan {
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec),
            limit,
            max_bytes: usize::MAX,
            base_gen: None,
            cursor: None,
            collected: Vec::new(),
            merge_at: None,
            merged: Vec::new(),
            merged_bytes: 0,
            used: 0,
            pos: None,
            copied: 0,
            chain_at: None,
            chain_hi: Vec::new(),
            chain_done: true,
            shed_seen: 0,
        }
    }

    /// Ends the scan, besides `limit`, at the first entry that brings the
    /// bytes of the keys and values returned to `n` or more (at least one
    /// entry is returned): what one answer holds stays near `n` however
    /// large the values. A scan cut so returns fewer than `limit` entries;
    /// the next one starts past the last key.
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }

    /// The entries this scan copied into its answers over all its turns:
    /// about the entries it returned, as each turn merges only what it
    /// collected (more after a sync changed the state under a scan, which
    /// then merges again from its start).
    pub fn entries_copied(&self) -> u64 {
        self.copied
    }

    /// A scan of keys starting with `prefix`.
    pub fn prefix(prefix: &[u8], limit: usize) -> Self {
        let end = crate::state::prefix_end_key(prefix);
        Self::new(prefix, end.as_deref(), limit)
    }
}

/// Lazy mode's figures, as reported by [`Replica::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LazyStatus {
    /// Bytes of snapshot data blocks held.
    pub cached_bytes: u64,
    /// Snapshot blocks fetched so far (footer reads, index and data blocks).
    pub blocks_fetched: u64,
    /// Bytes held by the overlay of batches after the snapshot.
    pub overlay_bytes: u64,
    /// Entries in the overlay.
    pub overlay_entries: u64,
    /// Segments counted as applied but not fetched yet: their key filters
    /// say which reads must fetch them first.
    pub deferred_segments: u64,
}

/// The snapshot read lazily.
#[derive(Debug)]
pub(super) struct Base {
    pub(super) entry: SnapshotEntry,
    pub(super) snap: LazySnapshot,
    /// The head's delta snapshots over it, oldest first: together with the
    /// snapshot they are the state at the chain's end.
    pub(super) deltas: Vec<LazyDelta>,
    /// The LSN the snapshot and its delta chain reach (the snapshot's LSN
    /// without deltas). Stays when a scan loads the deltas into the overlay.
    pub(super) chain_end: u64,
}

/// A delta snapshot read lazily: its verified index and filter once
/// fetched, and the data blocks point reads fetched.
#[derive(Debug)]
pub(super) struct LazyDelta {
    pub(super) entry: DeltaEntry,
    pub(super) index: Option<DeltaIndex>,
    /// Data blocks by offset, verified when used (`u64::MAX`: the whole
    /// file, when the chain is loaded whole).
    pub(super) blocks: VecMap<Vec<u8>>,
    /// Bytes of the data blocks in `blocks` (the whole file not counted).
    pub(super) cached: u64,
    /// Offsets of the data blocks put in last (`u64::MAX`: none): kept when the deltas' share of the cache
    /// overflows, so that reads waiting for a block of each delta (scans
    /// at several places, say) find them all when they run.
    pub(super) recent: [u64; RECENT_BLOCKS],
    /// Puts so far (the next goes to `recent[puts % RECENT_BLOCKS]`).
    pub(super) puts: usize,
}

impl LazyDelta {
    fn new(entry: DeltaEntry) -> Self {
        LazyDelta {
            entry,
            index: None,
            blocks: VecMap::default(),
            cached: 0,
            recent: [u64::MAX; RECENT_BLOCKS],
            puts: 0,
        }
    }

    /// Drops every data block but the last `n` put in (at most
    /// [`RECENT_BLOCKS`]): the ring's older slots take the last one's
    /// offset, until puts fill them again.
    pub(super) fn shed(&mut self, n: usize) {
        let last = (self.puts + RECENT_BLOCKS - 1) % RECENT_BLOCKS;
        for j in n..RECENT_BLOCKS {
            self.recent[(last + RECENT_BLOCKS - j) % RECENT_BLOCKS] = self.recent[last];
        }
        let recent = &self.recent;
        let mut kept = 0;
        self.blocks.retain(|k, b| {
            let keep = k == u64::MAX || recent.contains(&k);
            if keep && k != u64::MAX {
                kept += b.len() as u64;
            }
            keep
        });
        self.cached = kept;
    }

    fn suffix_need(&self) -> Need {
        Need::Suffix(self.entry.suffix_len)
    }

    /// A pointer delta's slot pages, as its entry names them (call only
    /// when `entry.slots` is set).
    pub(super) fn page_of(&self) -> crate::snapshot::pointer::PageOf {
        let sp = self.entry.slots.unwrap_or(crate::catalog::SlotPages {
            pages: 1,
            page_bytes: 0,
        });
        crate::snapshot::pointer::PageOf {
            base_lsn: self.entry.base_lsn,
            lsn: self.entry.lsn,
            epoch: self.entry.epoch,
            pages: sp.pages,
            page_bytes: sp.page_bytes,
        }
    }
}

impl Base {
    /// Size of the object `key` (the snapshot or one of its deltas).
    pub(super) fn object_size(&self, key: &str) -> u64 {
        if self.entry.key == key {
            return self.entry.size;
        }
        self.deltas
            .iter()
            .find(|d| d.entry.key == key)
            .map_or(0, |d| d.entry.size)
    }
}

/// A block a read needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BlockJob {
    pub(super) snapshot: String,
    pub(super) need: Need,
    pub(super) key: Vec<u8>,
    /// Read ahead of a scan: a failure is not kept for a read (the scan
    /// asks for the block again when it needs it).
    pub(super) ahead: bool,
    /// A record a pointer delta names (`snapshot` is then its segment):
    /// the range exactly, never a whole answer.
    pub(super) record: Option<Pointer>,
}

impl BlockJob {
    /// The same bytes of the same object (whether read ahead or not: a
    /// read may come to wait for a block asked ahead of need).
    pub(super) fn same(&self, other: &BlockJob) -> bool {
        self.need == other.need && self.snapshot == other.snapshot
    }

    /// The bytes the job's GET asks for.
    pub(super) fn range(&self) -> ByteRange {
        match self.need {
            Need::Suffix(n) => ByteRange::Suffix(n),
            Need::Range { start, end } => ByteRange::Bounded { start, end },
        }
    }
}

/// Lazy mode's state.
#[derive(Debug, Default)]
pub(super) struct Lazy {
    pub(super) cache_bytes: u64,
    /// Snapshot blocks fetched and not yet used kept past the cache's
    /// bytes: twice the block GETs out at most, and two (see
    /// [`LazySnapshot::set_cache`]).
    pub(super) fresh_blocks: usize,
    pub(super) base: Option<Base>,
    /// Batches after the base: key -> (LSN of the last write, value or
    /// deletion).
    pub(super) overlay: Overlay,
    pub(super) overlay_bytes: u64,
    /// Counts the overlay's changes of state (a batch applied, writes
    /// dropped under a newer base or chain): not a scan's delta changes.
    pub(super) overlay_gen: u64,
    /// Bytes of the chain's changes scans wrote into the overlay (at most,
    /// since they were last dropped), and how often they were dropped.
    pub(super) chain_bytes: u64,
    pub(super) chain_shed: u64,
    /// Records pointer deltas named, fetched for reads: segment key, the
    /// record's offset, its bytes (verified when used), oldest first,
    /// within [`Lazy::records_cache_bytes`] but the newest.
    pub(super) records: Vec<(String, u64, Vec<u8>)>,
    pub(super) records_bytes: u64,
    /// Blocks wanted by reads, not yet requested.
    pub(super) wanted: Vec<BlockJob>,
    /// Blocks requested and not yet answered.
    pub(super) inflight: Vec<BlockJob>,
    /// The store answered a range with that range: it honours Range, and
    /// GETs take no more than their range (see [`Lazy::max_bytes`]).
    pub(super) ranged: bool,
    /// Failures of block GETs, each reported once to the next read that
    /// needs that block (reads of other blocks are not affected): the
    /// newest per block, at most [`MAX_FAILED`] (see [`Lazy::fail`]).
    pub(super) failed: Vec<(String, Need, Error)>,
    /// The LSN of the full state beneath the overlay when there is no
    /// block-indexed base (a version 1 bootstrap or a restored state): a base
    /// below it would lose the writes between the two.
    pub(super) state_lsn: u64,
    pub(super) blocks_fetched: u64,
    /// Segments past the chain the catalog gives a key filter, counted as
    /// applied without a GET, oldest first. A read fetches (and replays
    /// into the overlay) those newer than the overlay's write of its key
    /// whose filter may hold the key; a scan fetches them all. Their
    /// writes at or below the chain's end are not replayed (the base and
    /// its deltas hold those).
    pub(super) deferred: Vec<super::plan::Unit>,
    /// A GET a read waited for was answered and no read has run since:
    /// until one does, a new head defers nothing (see
    /// [`Replica::deferrable`]).
    pub(super) read_due: bool,
    /// The last read run was [`Read::Pending`] (it waits for GETs).
    pub(super) read_pending: bool,
    /// Bumped whenever the base is set or its chain replaced, so a paused
    /// scan starts its snapshot part over on another base, even one under
    /// the same key (a dataset started over at the prefix, or the entry
    /// corrected), and collects again the entries it dropped as hidden.
    pub(super) base_gen: u64,
}

/// A scan's exclusive end as a range bound.
fn upper(end: &Option<Vec<u8>>) -> std::ops::Bound<&[u8]> {
    match end {
        Some(e) => std::ops::Bound::Excluded(e.as_slice()),
        None => std::ops::Bound::Unbounded,
    }
}

fn entry_cost(k: &[u8], v: Option<&[u8]>) -> u64 {
    (k.len() + v.map_or(0, <[u8]>::len)) as u64 + OVERLAY_ENTRY_OVERHEAD
}

impl Lazy {
    pub(super) fn new(cache_bytes: u64, max_inflight: usize) -> Self {
        Lazy {
            cache_bytes,
            fresh_blocks: 2 + 2 * BLOCKS_PER_INFLIGHT * max_inflight.max(2),
            ..Lazy::default()
        }
    }

    /// Applies one batch at `lsn` to the overlay. A key's newer write
    /// stays (a deferred segment is replayed after newer ones).
    pub(super) fn apply(&mut self, lsn: u64, ops: crate::batch::Batch<'_>) {
        self.overlay_gen += 1;
        for op in ops {
            let (k, v) = match op {
                OpRef::Put(k, v) => (k, Some(v)),
                OpRef::Delete(k) => (k, None),
            };
            self.write(lsn, k, v);
        }
    }

    /// Writes `key` (`None`: deleted) at `lsn` into the overlay, unless it
    /// holds a newer write of it.
    pub(super) fn write(&mut self, lsn: u64, k: &[u8], v: Option<&[u8]>) {
        let cost = entry_cost(k, v);
        match self.overlay.get_mut(k) {
            Some(slot) if slot.0 > lsn => return,
            Some(slot) => {
                self.overlay_bytes -= entry_cost(k, slot.1.as_deref());
                *slot = (lsn, v.map(Into::into));
            }
            None => {
                self.overlay.insert(k.into(), (lsn, v.map(Into::into)));
            }
        }
        self.overlay_bytes += cost;
    }

    /// Size of the object `key` a lazy read may fetch (0: none it knows).
    pub(super) fn object_size(&self, key: &str) -> u64 {
        match self.deferred.iter().find(|u| u.entry.key == key) {
            Some(u) => u.entry.size,
            None => self.base.as_ref().map_or(0, |b| b.object_size(key)),
        }
    }

    /// The most bytes a GET of `range` of the object `key` may bring: the
    /// whole object when no range is asked, or when it fits the cache (a
    /// server that ignores Range then answers with all of it, which is
    /// used) and the store has not answered a range yet; else only the
    /// range, so that
    /// a server ignoring Range costs a read an error, not the memory of a
    /// whole large snapshot.
    pub(super) fn max_bytes(&self, key: &str, range: Option<&ByteRange>) -> u64 {
        let size = self.object_size(key);
        let whole = self.takes_whole(key);
        match range {
            Some(ByteRange::Bounded { start, end }) if !whole => end.saturating_sub(*start),
            Some(ByteRange::Suffix(n)) if !whole => (*n).min(size),
            _ => size,
        }
        // A head's claimed size never sets more than a replica reads.
        .min(crate::catalog::MAX_SEGMENT_BYTES)
    }

    /// The most bytes the answer to `job`'s GET may bring (see
    /// [`max_bytes`](Self::max_bytes)).
    pub(super) fn job_bytes(&self, job: &BlockJob) -> u64 {
        match &job.record {
            Some(p) => p.range().end - p.offset,
            None => self.max_bytes(&job.snapshot, Some(&job.range())),
        }
    }

    /// Whether a ranged GET of `key` may bring the whole object: it fits
    /// the cache and the store has not answered a range yet (once it has,
    /// it honours Range, and an answer past the range is refused).
    ///
    /// Never for a pointer delta: its slot pages go out together on a cold
    /// read, and counted at its whole size they would not fit the bytes
    /// GETs out may bring (a server that ignores Range fails its reads, as
    /// for a snapshot larger than the cache).
    pub(super) fn takes_whole(&self, key: &str) -> bool {
        !self.ranged
            && self.object_size(key) <= self.cache_bytes
            && !self.base.as_ref().is_some_and(|b| {
                b.deltas
                    .iter()
                    .any(|d| d.entry.slots.is_some() && d.entry.key == key)
            })
    }

    /// Forgets everything (a new dataset, or a base above the applied LSN).
    pub(super) fn clear(&mut self) {
        self.deferred.clear();
        self.overlay.clear();
        self.overlay_bytes = 0;
        self.overlay_gen += 1;
        self.chain_bytes = 0;
        self.base = None;
        self.wanted.clear();
        self.inflight.clear();
        self.failed.clear();
        self.records.clear();
        self.records_bytes = 0;
        self.ranged = false;
        // The state goes with it (its caller empties it).
        self.state_lsn = 0;
    }

    /// The share of `cache_bytes` the records pointer deltas name take, an
    /// eighth, and at least one record of the largest size a pointer names
    /// for each delta of a chain (the newest is kept past it).
    pub(super) fn records_cache_bytes(&self) -> u64 {
        // (At least a record of the largest size from each delta of a
        // chain: a scan's window holds them together.)
        let floor = crate::catalog::MAX_DELTAS as u64
            * (u64::from(crate::snapshot::pointer::MAX_POINTED_PAYLOAD) + 16);
        (self.cache_bytes / 8).max(floor)
    }

    /// The record `p` names, if fetched.
    pub(super) fn record(&self, p: &Pointer) -> Option<&[u8]> {
        let key = p.segment_key();
        self.records
            .iter()
            .rev()
            .find(|(k, o, _)| *o == p.offset && *k == key)
            .map(|(.., b)| b.as_slice())
    }

    /// Keeps a fetched record, dropping the oldest past the records' share.
    pub(super) fn keep_record(&mut self, key: String, offset: u64, bytes: Vec<u8>) {
        if self
            .records
            .iter()
            .any(|(k, o, _)| *o == offset && *k == key)
        {
            return;
        }
        self.records_bytes += bytes.len() as u64;
        self.records.push((key, offset, bytes));
        while self.records_bytes > self.records_cache_bytes() && self.records.len() > 1 {
            let (.., b) = self.records.remove(0);
            self.records_bytes -= b.len() as u64;
        }
    }

    /// The share of `cache_bytes` the deltas' data blocks hold together: a
    /// quarter, or each delta's last block if they take more.
    pub(super) fn delta_cache_bytes(&self) -> u64 {
        self.cache_bytes / 4
    }

    /// The share of `cache_bytes` the snapshot's data blocks hold at most:
    /// all of it while the base has no deltas, else what the deltas' share
    /// leaves.
    pub(super) fn snapshot_cache_bytes(&self) -> u64 {
        match &self.base {
            Some(b) if !b.deltas.is_empty() => self.cache_bytes - self.delta_cache_bytes(),
            _ => self.cache_bytes,
        }
    }

    /// Sets the snapshot's share after the base's deltas changed.
    pub(super) fn fit_cache(&mut self) {
        let n = self.snapshot_cache_bytes();
        if let Some(b) = self.base.as_mut() {
            b.snap.set_cache(n, self.fresh_blocks);
        }
    }

    pub(super) fn status(&self) -> LazyStatus {
        LazyStatus {
            cached_bytes: self.records_bytes
                + self.base.as_ref().map_or(0, |b| {
                    b.snap.cached_bytes() + b.deltas.iter().map(|d| d.cached).sum::<u64>()
                }),
            blocks_fetched: self.blocks_fetched,
            overlay_bytes: self.overlay_bytes,
            overlay_entries: self.overlay.len() as u64,
            deferred_segments: self.deferred.len() as u64,
        }
    }
}

/// Parses 64 lowercase hex digits (a digest in a signed head).
pub(super) fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    let b = hex.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = nib(b[2 * i])? << 4 | nib(b[2 * i + 1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{delta_key, snapshot_key};

    /// A version 2 snapshot at LSN 10.
    fn base_at_10() -> SnapshotEntry {
        SnapshotEntry {
            key: snapshot_key(10, 1),
            lsn: 10,
            epoch: 1,
            size: 5_000,
            crc32: 0,
            entries: 100,
            version: 2,
            suffix: None,
            footer_crc32: None,
        }
    }

    fn delta(base: u64, lsn: u64) -> DeltaEntry {
        DeltaEntry {
            key: delta_key(base, lsn, 1),
            base_lsn: base,
            lsn,
            epoch: 1,
            size: 1_000,
            crc32: 0,
            entries: 10,
            suffix_len: 200,
            footer_crc32: None,
            slots: None,
        }
    }

    /// Failures no read takes keep one entry per block, and at most
    /// `MAX_FAILED` in all, however often GETs fail.
    #[test]
    fn block_failures_are_kept_one_per_block_and_bounded() {
        let mut lazy = Lazy::new(1 << 20, 4);
        let err = || Error::new(ErrorKind::Unavailable, "HTTP 503");
        let need = |start: u64| Need::Range {
            start,
            end: start + 10,
        };
        for _ in 0..1_000 {
            lazy.fail("snapshots/a".into(), need(0), err());
        }
        assert_eq!(lazy.failed.len(), 1);
        for i in 0..1_000 {
            lazy.fail("snapshots/a".into(), need(i * 10), err());
        }
        assert_eq!(lazy.failed.len(), MAX_FAILED);
        // The newest are kept: the next read of the last block gets its error.
        assert!(lazy.take_failure("snapshots/a", &need(9_990)).is_some());
        assert!(lazy.take_failure("snapshots/a", &need(0)).is_none());
    }

    /// The snapshot's blocks have the whole cache while the base has no
    /// deltas, three quarters while it has some, and all of it again once
    /// the chain is gone.
    #[test]
    fn the_snapshot_shares_the_cache_only_with_deltas() {
        let mut lazy = Lazy::new(1 << 20, 4);
        lazy.set_base(base_at_10(), None);
        assert_eq!(lazy.snapshot_cache_bytes(), 1 << 20);
        lazy.set_deltas(&[delta(10, 20)]);
        assert_eq!(lazy.snapshot_cache_bytes(), 3 << 18);
        assert_eq!(lazy.delta_cache_bytes(), 1 << 18);
        lazy.replace_deltas(&[], 20);
        assert_eq!(lazy.snapshot_cache_bytes(), 1 << 20);
    }

    /// A longer chain over the same base keeps what was read of the deltas
    /// it still names, and their GETs in flight (their answers are used,
    /// not dropped as stale); the GETs of a delta it left are forgotten.
    #[test]
    fn a_longer_chain_keeps_the_deltas_it_still_names() {
        let mut lazy = Lazy::new(1 << 20, 4);
        lazy.set_base(base_at_10(), None);
        let (d1, d2, d3) = (delta(10, 20), delta(20, 30), delta(30, 40));
        lazy.set_deltas(&[d1.clone(), d2.clone()]);
        lazy.base.as_mut().unwrap().deltas[0].cached = 7;
        let job = |d: &DeltaEntry| BlockJob {
            snapshot: d.key.clone(),
            need: Need::Suffix(d.suffix_len),
            key: b"k".to_vec(),
            ahead: false,
            record: None,
        };
        lazy.inflight.push(job(&d1));
        lazy.wanted.push(job(&d2));
        // The publisher merged d2 away: [d1, d3].
        lazy.replace_deltas(&[d1.clone(), d3.clone()], 40);
        let b = lazy.base.as_ref().unwrap();
        let keys: Vec<&str> = b.deltas.iter().map(|d| d.entry.key.as_str()).collect();
        assert_eq!(keys, [d1.key.as_str(), d3.key.as_str()]);
        assert_eq!(b.deltas[0].cached, 7, "d1 kept what was read of it");
        assert_eq!(b.deltas[1].cached, 0);
        assert_eq!(lazy.inflight, [job(&d1)], "d1's GET stays in flight");
        assert!(lazy.wanted.is_empty(), "d2's GET is forgotten");
        // A new base forgets every job of the old chain.
        let mut next = lazy.base.as_ref().unwrap().entry.clone();
        next.key = snapshot_key(40, 1);
        next.lsn = 40;
        lazy.set_base(next, None);
        assert!(lazy.inflight.is_empty());
    }
}
