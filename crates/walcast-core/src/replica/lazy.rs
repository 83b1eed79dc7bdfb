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

use crate::batch::OpRef;
use crate::catalog::{DeltaEntry, SnapshotEntry};
use crate::error::{DecodeError, Error, ErrorKind};
use crate::io::{ByteRange, GetResponse};
use crate::snapshot::delta::{Change, DeltaIndex};
use crate::snapshot::indexed::{LazySnapshot, Lookup, Need, ScanCursor};
use crate::state::Overlay;
use crate::vecmap::VecMap;

use super::{Event, Job, Replica};

/// Per overlay entry, what the cache charges besides key and value.
const OVERLAY_ENTRY_OVERHEAD: u64 = 64;

/// Most data blocks a point read fetches at once from the places that may
/// hold its key (see `Lazy::delta_get`).
const SPECULATIVE_BLOCKS: usize = 2;

/// Most segments a lazy replica holds unread at once (see
/// [`Lazy::deferred`]); past that, segments are fetched as they come.
pub(super) const MAX_DEFERRED: usize = 128;

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
    /// The snapshot being scanned, and what it returned so far.
    base_key: Option<String>,
    cursor: Option<ScanCursor>,
    collected: Vec<(Vec<u8>, Vec<u8>)>,
}

impl LazyScan {
    /// A scan of keys in `start..end` (`end` exclusive; `None`: to the last
    /// key), returning at most `limit` entries.
    pub fn new(start: &[u8], end: Option<&[u8]>, limit: usize) -> Self {
        LazyScan {
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec),
            limit,
            base_key: None,
            cursor: None,
            collected: Vec::new(),
        }
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
    pub(super) cached: u64,
}

impl LazyDelta {
    fn new(entry: DeltaEntry) -> Self {
        LazyDelta {
            entry,
            index: None,
            blocks: VecMap::default(),
            cached: 0,
        }
    }

    fn suffix_need(&self) -> Need {
        Need::Suffix(self.entry.suffix_len)
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
}

/// Lazy mode's state.
#[derive(Debug, Default)]
pub(super) struct Lazy {
    pub(super) cache_bytes: u64,
    pub(super) base: Option<Base>,
    /// Batches after the base: key -> (LSN of the last write, value or
    /// deletion).
    pub(super) overlay: Overlay,
    pub(super) overlay_bytes: u64,
    /// Blocks wanted by reads, not yet requested.
    pub(super) wanted: Vec<BlockJob>,
    /// Blocks requested and not yet answered.
    pub(super) inflight: Vec<BlockJob>,
    /// Failures of block GETs, each reported once to the next read that
    /// needs that block (reads of other blocks are not affected).
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
    pub(super) fn new(cache_bytes: u64) -> Self {
        Lazy {
            cache_bytes,
            ..Lazy::default()
        }
    }

    /// Applies one batch at `lsn` to the overlay. A key's newer write
    /// stays (a deferred segment is replayed after newer ones).
    pub(super) fn apply(&mut self, lsn: u64, ops: &[OpRef<'_>]) {
        for op in ops {
            let (k, v) = match *op {
                OpRef::Put(k, v) => (k, Some(v)),
                OpRef::Delete(k) => (k, None),
            };
            let cost = entry_cost(k, v);
            match self.overlay.get_mut(k) {
                Some(slot) if slot.0 > lsn => continue,
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
    }

    /// Queues the deferred segments a read of `key` must replay first:
    /// those newer than the overlay's write of it whose filter may hold it
    /// (`all`: every one, for a scan). `Ok(true)`: some are on their way.
    fn want_deferred(&mut self, key: &[u8], all: bool) -> Result<bool, Error> {
        let since = self.overlay.get(key).map_or(0, |(l, _)| *l);
        let mut any = false;
        for i in 0..self.deferred.len() {
            let e = &self.deferred[i].entry;
            if !all
                && (e.last_lsn <= since || e.filter.as_ref().is_some_and(|f| !f.may_contain(key)))
            {
                continue;
            }
            let need = Need::Range {
                start: 0,
                end: e.size,
            };
            let object = e.key.clone();
            if let Some(err) = self.take_failure(&object, &need) {
                return Err(err);
            }
            self.want_in(object, need, key);
            any = true;
        }
        Ok(any)
    }

    /// Whether `key` names a deferred segment.
    fn is_deferred(&self, key: &str) -> bool {
        self.deferred.iter().any(|u| u.entry.key == key)
    }

    /// Size of the object `key` a lazy read may fetch (0: none it knows).
    pub(super) fn object_size(&self, key: &str) -> u64 {
        match self.deferred.iter().find(|u| u.entry.key == key) {
            Some(u) => u.entry.size,
            None => self.base.as_ref().map_or(0, |b| b.object_size(key)),
        }
    }

    /// Makes `entry` the base: at `applied`, the overlay keeps only writes
    /// after the snapshot; above it, the snapshot is the whole state.
    pub(super) fn set_base(&mut self, entry: SnapshotEntry, index_digest: Option<[u8; 32]>) {
        let lsn = entry.lsn;
        self.deferred.retain(|u| u.entry.last_lsn > lsn);
        let mut dropped = 0;
        self.overlay.retain(|k, (l, v)| {
            let keep = *l > lsn;
            if !keep {
                dropped += entry_cost(k, v.as_deref());
            }
            keep
        });
        self.overlay_bytes -= dropped;
        // The old base's blocks are no longer wanted; the deferred segments
        // the new base leaves are, and a GET of one in flight stays counted
        // (else the next read would ask for it a second time).
        self.keep_jobs(None);
        let fresh = || match index_digest {
            Some(d) => LazySnapshot::with_index_digest(entry.size, self.cache_bytes, d),
            None => LazySnapshot::new(entry.size, self.cache_bytes),
        };
        let mut snap = fresh();
        if let Some(suffix) = &entry.suffix {
            // The head carries the top index and footer: they are checked
            // exactly as a fetched suffix. Should they fail, nothing of
            // them is kept and the first read fetches the suffix instead.
            if snap.feed_suffix(suffix).is_err() {
                snap = fresh();
            }
        }
        self.base = Some(Base {
            snap,
            chain_end: entry.lsn,
            entry,
            deltas: Vec::new(),
        });
    }

    /// The deltas `head` names over the base become part of it: call right
    /// after [`set_base`](Self::set_base) on a jump to the chain's end.
    pub(super) fn set_deltas(&mut self, deltas: &[DeltaEntry]) {
        if let Some(b) = self.base.as_mut() {
            b.deltas = deltas.iter().cloned().map(LazyDelta::new).collect();
            if let Some(last) = deltas.last() {
                b.chain_end = last.lsn;
            }
        }
    }

    /// The head names another delta chain over the same base, reaching `end`
    /// (at most the applied LSN, and no earlier than the chain in use): a
    /// publisher consolidated or extended the chain, and may delete the
    /// deltas it replaced. Reads go through the new chain from now on; the
    /// overlay keeps only the writes after `end` (those before it are the
    /// same in the base and the new chain). Answers for the old deltas are
    /// ignored when they come.
    pub(super) fn replace_deltas(&mut self, deltas: &[DeltaEntry], end: u64) {
        let Some(b) = self.base.as_mut() else {
            return;
        };
        b.deltas = deltas.iter().cloned().map(LazyDelta::new).collect();
        b.chain_end = end;
        let base_key = b.entry.key.clone();
        self.deferred.retain(|u| u.entry.last_lsn > end);
        let mut dropped = 0;
        self.overlay.retain(|k, (l, v)| {
            let keep = *l > end;
            if !keep {
                dropped += entry_cost(k, v.as_deref());
            }
            keep
        });
        self.overlay_bytes -= dropped;
        self.keep_jobs(Some(&base_key));
    }

    /// Keeps the wanted and in-flight jobs of the deferred segments and of
    /// `object` (the base, when it stays); forgets failures.
    fn keep_jobs(&mut self, object: Option<&str>) {
        let deferred = &self.deferred;
        let keep = |j: &BlockJob| {
            object == Some(j.snapshot.as_str())
                || deferred.iter().any(|u| u.entry.key == j.snapshot)
        };
        self.wanted.retain(keep);
        self.inflight.retain(keep);
        self.failed.clear();
    }

    /// Point read through the deltas, newest first. `Ok(Some(change))`: the
    /// newest delta that changes `key` says so; `Ok(None)`: no delta changes
    /// it (read the snapshot); `Err(snapshot_too)`: GETs are queued
    /// (pending), and the snapshot's part should go out beside them.
    ///
    /// Data blocks go out for at most [`SPECULATIVE_BLOCKS`] places that may
    /// hold the key at once, newest first: the deltas whose filter and
    /// index may hold it, then the snapshot. Each guards against a false
    /// positive of the filter before it without another round trip, and a
    /// read stays within a few GETs however many deltas may hold the key.
    fn delta_get(&mut self, key: &[u8]) -> Result<Result<Option<Change>, bool>, Error> {
        let Some(base) = self.base.as_ref() else {
            return Ok(Ok(None));
        };
        if base.deltas.is_empty() {
            return Ok(Ok(None));
        }
        // First every index and filter, all in flight together.
        let mut wants: Vec<(String, Need)> = Vec::new();
        for d in &base.deltas {
            if d.index.is_none() {
                wants.push((d.entry.key.clone(), d.suffix_need()));
            }
        }
        let suffixes = !wants.is_empty();
        if !suffixes {
            // Then the data blocks of the newest deltas that may hold the key.
            for d in base.deltas.iter().rev() {
                if wants.len() >= SPECULATIVE_BLOCKS {
                    break;
                }
                let Some(idx) = &d.index else { continue };
                let Some(h) = idx.block_for(key) else {
                    continue;
                };
                match d.blocks.get(h.offset) {
                    Some(bytes) if wants.is_empty() => match idx.lookup(&h, bytes, key) {
                        Ok(Some(c)) => return Ok(Ok(Some(c))),
                        Ok(None) => {}
                        Err(e) => return Err(Error::decode(e).with_object(d.entry.key.clone())),
                    },
                    Some(_) => {}
                    None => wants.push((
                        d.entry.key.clone(),
                        Need::Range {
                            start: h.offset,
                            end: h.end(),
                        },
                    )),
                }
            }
        }
        if wants.is_empty() {
            return Ok(Ok(None));
        }
        let snapshot_too = suffixes || wants.len() < SPECULATIVE_BLOCKS;
        for (object, need) in wants {
            if let Some(e) = self.take_failure(&object, &need) {
                return Err(e);
            }
            self.want_in(object, need, key);
        }
        Ok(Err(snapshot_too))
    }

    /// Loads every delta whole into the overlay (for scans, which read
    /// ranges rather than keys). `Err(())`: GETs are queued.
    fn deltas_into_overlay(&mut self) -> Result<Result<(), ()>, Error> {
        let Some(base) = self.base.as_ref() else {
            return Ok(Ok(()));
        };
        if base.deltas.is_empty() {
            return Ok(Ok(()));
        }
        let mut wants = Vec::new();
        for d in &base.deltas {
            let need = Need::Range {
                start: 0,
                end: d.entry.size,
            };
            if !d.blocks.contains_key(u64::MAX) {
                wants.push((d.entry.key.clone(), need));
            }
        }
        if !wants.is_empty() {
            for (object, need) in wants {
                if let Some(e) = self.take_failure(&object, &need) {
                    return Err(e);
                }
                self.want_in(object, need, b"");
            }
            return Ok(Err(()));
        }
        let Some(base) = self.base.as_mut() else {
            return Ok(Ok(()));
        };
        let deltas = std::mem::take(&mut base.deltas);
        for d in deltas {
            let Some(bytes) = d.blocks.get(u64::MAX) else {
                continue;
            };
            let delta = crate::snapshot::delta::decode_delta(bytes)
                .map_err(|e| Error::decode(e).with_object(d.entry.key.clone()))?;
            for (k, v) in delta.changes {
                let cost = entry_cost(&k, v.as_deref());
                match self.overlay.get(k.as_slice()) {
                    // A write after the delta wins.
                    Some((l, _)) if *l > d.entry.lsn => {}
                    _ => {
                        let slot = (d.entry.lsn, v.map(Into::into));
                        if let Some((_, old)) = self.overlay.insert(k.as_slice().into(), slot) {
                            self.overlay_bytes -= entry_cost(&k, old.as_deref());
                        }
                        self.overlay_bytes += cost;
                    }
                }
            }
        }
        Ok(Ok(()))
    }

    fn want_in(&mut self, object: String, need: Need, key: &[u8]) {
        let job = BlockJob {
            snapshot: object,
            need,
            key: key.to_vec(),
        };
        let same = |j: &BlockJob| j.need == job.need && j.snapshot == job.snapshot;
        if !self.wanted.iter().any(same) && !self.inflight.iter().any(same) {
            self.wanted.push(job);
        }
    }

    /// Feeds a delta's bytes: its suffix (index and filter), a data block,
    /// or (for scans) the whole object.
    fn feed_delta(&mut self, job: &BlockJob, bytes: &[u8]) -> Result<bool, DecodeError> {
        let cache_bytes = self.cache_bytes;
        let Some(d) = self
            .base
            .as_mut()
            .and_then(|b| b.deltas.iter_mut().find(|d| d.entry.key == job.snapshot))
        else {
            return Ok(false);
        };
        let size = d.entry.size;
        match job.need {
            Need::Suffix(_) => {
                d.index = Some(DeltaIndex::decode_suffix(bytes, size)?);
            }
            Need::Range { start: 0, end } if end == size => {
                if crate::crc::hash(bytes) != d.entry.crc32 {
                    return Err(crate::codec::invalid(
                        "delta snapshot",
                        0,
                        "the file's crc32 is not the catalog's",
                    ));
                }
                d.blocks.insert(u64::MAX, bytes.to_vec());
            }
            Need::Range { start, .. } => {
                let Some(idx) = &d.index else {
                    return Ok(true);
                };
                // Which block it must be comes from the verified index.
                match idx.block_for(&job.key) {
                    Some(h) if h.offset == start => {
                        idx.lookup(&h, bytes, &job.key)?;
                    }
                    _ => return Ok(true),
                }
                if d.cached + bytes.len() as u64 > cache_bytes {
                    d.blocks.retain(|k, _| k == u64::MAX);
                    d.cached = 0;
                }
                d.cached += bytes.len() as u64;
                d.blocks.insert(start, bytes.to_vec());
            }
        }
        Ok(true)
    }

    /// Forgets everything (a new dataset, or a base above the applied LSN).
    pub(super) fn clear(&mut self) {
        self.deferred.clear();
        self.overlay.clear();
        self.overlay_bytes = 0;
        self.base = None;
        self.wanted.clear();
        self.inflight.clear();
        self.failed.clear();
    }

    /// The failure of the GET of `need` from `object`, reported once.
    fn take_failure(&mut self, object: &str, need: &Need) -> Option<Error> {
        let i = self
            .failed
            .iter()
            .position(|(o, n, _)| o == object && n == need)?;
        Some(self.failed.swap_remove(i).2)
    }

    /// [`take_failure`](Self::take_failure) for the base snapshot.
    fn take_base_failure(&mut self, need: &Need) -> Option<Error> {
        let object = self.base.as_ref()?.entry.key.clone();
        self.take_failure(&object, need)
    }

    fn want(&mut self, need: Need, key: &[u8]) {
        let Some(b) = &self.base else { return };
        let job = BlockJob {
            snapshot: b.entry.key.clone(),
            need,
            key: key.to_vec(),
        };
        let same = |j: &BlockJob| j.need == job.need && j.snapshot == job.snapshot;
        if !self.wanted.iter().any(same) && !self.inflight.iter().any(same) {
            self.wanted.push(job);
        }
    }

    pub(super) fn status(&self) -> LazyStatus {
        LazyStatus {
            cached_bytes: self.base.as_ref().map_or(0, |b| b.snap.cached_bytes()),
            blocks_fetched: self.blocks_fetched,
            overlay_bytes: self.overlay_bytes,
            overlay_entries: self.overlay.len() as u64,
            deferred_segments: self.deferred.len() as u64,
        }
    }
}

impl Replica {
    fn snapshot_error(&self, e: DecodeError) -> Error {
        let key = self
            .lazy
            .as_ref()
            .and_then(|l| l.base.as_ref())
            .map(|b| b.entry.key.clone())
            .unwrap_or_default();
        Error::decode(e).with_object(key)
    }

    /// Reads `key` from the state at the applied LSN. In full mode the
    /// answer is always ready. In lazy mode it may be [`Read::Pending`]: the
    /// GETs it needs are queued, so drain [`poll`](Self::poll), feed the
    /// responses, and ask again. A block that failed verification or could
    /// not be fetched is reported once as an error naming the snapshot.
    pub fn get_lazy(&mut self, key: &[u8]) -> Result<Read<Option<Vec<u8>>>, Error> {
        let r = self.get_at_applied(key);
        self.read_ran(&r);
        r
    }

    /// Notes a read run's outcome: whether it waits for GETs (see
    /// [`Lazy::read_due`]).
    fn read_ran<T>(&mut self, r: &Result<Read<T>, Error>) {
        if let Some(lazy) = self.lazy.as_mut() {
            lazy.read_due = false;
            lazy.read_pending = matches!(r, Ok(Read::Pending));
        }
    }

    fn get_at_applied(&mut self, key: &[u8]) -> Result<Read<Option<Vec<u8>>>, Error> {
        let Some(lazy) = self.lazy.as_mut() else {
            return Ok(Read::Ready(self.state.get(key).map(<[u8]>::to_vec)));
        };
        // Deferred segments that may write the key after the overlay did
        // are fetched first; the deltas' and snapshot's parts go out beside
        // them, in case the filters were wrong.
        let segments = lazy.want_deferred(key, false)?;
        if let Some((_, v)) = lazy.overlay.get(key) {
            if segments {
                return Ok(Read::Pending);
            }
            return Ok(Read::Ready(v.as_deref().map(<[u8]>::to_vec)));
        }
        match lazy.delta_get(key)? {
            Ok(Some(_)) if segments => return Ok(Read::Pending),
            Ok(Some(change)) => return Ok(Read::Ready(change)),
            Ok(None) => {}
            Err(false) => return Ok(Read::Pending),
            Err(true) => {
                // The snapshot's part goes out beside the deltas' GETs.
                if let Some(base) = lazy.base.as_mut() {
                    if let Ok(Lookup::Need(n)) = base.snap.get(key) {
                        if lazy.take_base_failure(&n).is_none() {
                            lazy.want(n, key);
                        }
                    }
                }
                return Ok(Read::Pending);
            }
        }
        let Some(base) = lazy.base.as_mut() else {
            // No block-indexed base: the state loaded whole (or empty).
            return Ok(Read::Ready(self.state.get(key).map(<[u8]>::to_vec)));
        };
        match base.snap.get(key) {
            Ok(Lookup::Done(_)) if segments => Ok(Read::Pending),
            Ok(Lookup::Done(v)) => Ok(Read::Ready(v)),
            Ok(Lookup::Need(n)) => {
                if let Some(e) = lazy.take_base_failure(&n) {
                    return Err(e);
                }
                lazy.want(n, key);
                Ok(Read::Pending)
            }
            Err(e) => Err(self.snapshot_error(e)),
        }
    }

    /// Advances an ordered scan of the state at the applied LSN: ready with
    /// the entries, or pending while the blocks it needs are fetched (as for
    /// [`get_lazy`](Self::get_lazy)). Blocks already scanned are not needed
    /// again, so a scan of any length completes within any cache size.
    pub fn scan_lazy(&mut self, scan: &mut LazyScan) -> Result<Read<Entries>, Error> {
        let r = self.scan_at_applied(scan);
        self.read_ran(&r);
        r
    }

    fn scan_at_applied(&mut self, scan: &mut LazyScan) -> Result<Read<Entries>, Error> {
        let in_range =
            |k: &[u8], end: &Option<Vec<u8>>| end.as_ref().is_none_or(|e| k < e.as_slice());
        let Some(lazy) = self.lazy.as_mut() else {
            let out = self
                .state
                .range(std::ops::Bound::Included(&scan.start), upper(&scan.end))
                .take(scan.limit)
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect();
            return Ok(Read::Ready(out));
        };
        // Deferred segments and deltas are read whole into the overlay
        // before a scan merges.
        let segments = lazy.want_deferred(&scan.start, true)?;
        if lazy.deltas_into_overlay()?.is_err() || segments {
            return Ok(Read::Pending);
        }
        // The snapshot's part starts over when the base changed.
        let base_key = lazy.base.as_ref().map(|b| b.entry.key.clone());
        if scan.base_key != base_key || (scan.cursor.is_none() && base_key.is_some()) {
            scan.base_key = base_key;
            scan.collected.clear();
            scan.cursor = lazy
                .base
                .as_ref()
                .map(|_| ScanCursor::new(&scan.start, scan.end.as_deref(), 0));
        }
        if lazy.base.is_none() {
            // The base is the state loaded whole (or empty): all present.
            let hidden = lazy
                .overlay
                .range::<[u8], _>((
                    std::ops::Bound::Included(scan.start.as_slice()),
                    std::ops::Bound::Unbounded,
                ))
                .take_while(|(k, _)| in_range(k, &scan.end))
                .count();
            scan.collected = self
                .state
                .range(std::ops::Bound::Included(&scan.start), upper(&scan.end))
                .take(scan.limit.saturating_add(hidden))
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect();
        }
        // Each turn returns, or collects more snapshot entries (the cursor
        // moves forward or finishes), so the loop ends.
        loop {
            let snap_done = scan.cursor.as_ref().is_none_or(ScanCursor::is_done);
            // Snapshot keys above the last one collected are not known yet:
            // merge only up to it, unless the snapshot part is complete.
            let frontier: Option<&[u8]> = if snap_done {
                None
            } else {
                Some(scan.collected.last().map_or(&[][..], |(k, _)| k.as_slice()))
            };
            let below = |k: &[u8]| frontier.is_none_or(|f| k <= f);
            let mut out = Vec::new();
            let mut s = scan.collected.iter().peekable();
            let mut o = lazy
                .overlay
                .range::<[u8], _>((
                    std::ops::Bound::Included(scan.start.as_slice()),
                    std::ops::Bound::Unbounded,
                ))
                .take_while(|(k, _)| in_range(k, &scan.end) && below(k))
                .peekable();
            while out.len() < scan.limit {
                let from_overlay = match (s.peek(), o.peek()) {
                    (None, None) => break,
                    (None, Some(_)) => true,
                    (Some(_), None) => false,
                    (Some((sk, _)), Some((ok, _))) => &***ok <= sk.as_slice(),
                };
                if from_overlay {
                    let (k, (_, v)) = o.next().expect("peeked");
                    if s.peek().is_some_and(|(sk, _)| sk.as_slice() == &**k) {
                        s.next(); // the overlay wins
                    }
                    if let Some(v) = v {
                        out.push((k.to_vec(), v.to_vec()));
                    }
                } else {
                    let (k, v) = s.next().expect("peeked");
                    out.push((k.clone(), v.clone()));
                }
            }
            if out.len() >= scan.limit || snap_done {
                return Ok(Read::Ready(out));
            }
            // More snapshot entries are needed.
            let (Some(cursor), Some(base)) = (scan.cursor.as_mut(), lazy.base.as_mut()) else {
                return Ok(Read::Ready(out));
            };
            cursor.remaining = (scan.limit - out.len()).max(16);
            match base.snap.scan_step(cursor, &mut scan.collected) {
                Ok(Some(need)) => {
                    if let Some(e) = lazy.take_base_failure(&need) {
                        return Err(e);
                    }
                    // The block is the one holding the cursor's key now.
                    let next = cursor.next.clone();
                    lazy.want(need, &next);
                    return Ok(Read::Pending);
                }
                Ok(None) => {}
                Err(e) => {
                    let key = base.entry.key.clone();
                    return Err(Error::decode(e).with_object(key));
                }
            }
        }
    }

    /// The next block GET a lazy read is waiting for, if any, for a reader
    /// that drives its own reads beside the loop that drives
    /// [`poll`](Self::poll) (which also issues them): perform it and pass the
    /// outcome to [`handle_response`](Self::handle_response).
    pub fn poll_read_fetch(&mut self) -> Option<crate::io::GetRequest> {
        match self.next_block_fetch()? {
            super::Action::Fetch(req) => Some(req),
            _ => None,
        }
    }

    /// Forgets a GET from [`poll_read_fetch`](Self::poll_read_fetch) whose
    /// answer will never come: the read that performed it ended first (it
    /// returned, or its caller dropped it). The next read that needs that
    /// block or segment asks for it again, instead of waiting for an answer
    /// in flight. Ids of other requests, or of answered ones, are ignored.
    pub fn abandon_read_fetch(&mut self, id: crate::io::RequestId) {
        if !matches!(self.pending.get(id.0), Some(super::Job::Block(_))) {
            return;
        }
        if let (Some(super::Job::Block(job)), Some(lazy)) =
            (self.pending.remove(id.0), self.lazy.as_mut())
        {
            lazy.inflight.retain(|j| *j != job);
            lazy.read_due = false;
            lazy.read_pending = false;
        }
    }

    /// The next block GET lazy reads are waiting for, if any.
    pub(super) fn next_block_fetch(&mut self) -> Option<super::Action> {
        let max_inflight = self.cfg.max_inflight.max(1);
        let lazy = self.lazy.as_mut()?;
        // Whole deferred segments go out at most `max_inflight` at a time
        // (as when catching up); blocks of the snapshot and deltas at once.
        let segments = lazy
            .inflight
            .iter()
            .filter(|j| lazy.is_deferred(&j.snapshot))
            .count();
        let i = lazy
            .wanted
            .iter()
            .position(|j| segments < max_inflight || !lazy.is_deferred(&j.snapshot))?;
        let job = lazy.wanted.remove(i);
        lazy.inflight.push(job.clone());
        let range = match job.need {
            Need::Suffix(n) => ByteRange::Suffix(n),
            Need::Range { start, end } => ByteRange::Bounded { start, end },
        };
        // Its max_bytes is the snapshot's size (`fetch`): a server that
        // ignores Range answers with the whole object.
        let key = job.snapshot.clone();
        // A deferred segment is read whole, as catching up would.
        let range = (!lazy.is_deferred(&key)).then_some(range);
        Some(self.fetch(Job::Block(job), key, range, None))
    }

    pub(super) fn on_block(&mut self, now: u64, job: BlockJob, resp: GetResponse) {
        let Some(lazy) = self.lazy.as_mut() else {
            return;
        };
        // An answer for a job no longer in flight is stale: the replica
        // left its object (a jump or a new chain dropped the job) and reads
        // ask again for what they still need.
        let Some(at) = lazy.inflight.iter().position(|j| *j == job) else {
            return;
        };
        lazy.inflight.remove(at);
        lazy.read_due = lazy.read_pending;
        if let Some(i) = lazy
            .deferred
            .iter()
            .position(|u| u.entry.key == job.snapshot)
        {
            self.on_deferred(now, job, i, resp);
            return;
        }
        let Some(base) = lazy.base.as_mut() else {
            return;
        };
        let size = base.object_size(&job.snapshot);
        let is_delta = base.entry.key != job.snapshot;
        if size == 0 {
            return; // an answer for a snapshot this replica left
        }
        let key = job.snapshot.clone();
        let data_err = |msg: String| Error::new(ErrorKind::Data, msg).with_object(key.clone());
        let result: Result<(), Error> = match resp {
            GetResponse::Ok { body, range, .. } => {
                let (want_start, want_end) = match job.need {
                    Need::Suffix(n) => (size - n.min(size), size),
                    Need::Range { start, end } => (start, end),
                };
                let bytes = match range {
                    // The object's size changed under the job (a head
                    // that names the same key with another size).
                    _ if want_start > want_end || want_end > size => Err(data_err(format!(
                        "bytes {want_start}..{want_end} are outside its {size} bytes"
                    ))),
                    Some(cr)
                        if cr.start == want_start
                            && cr.end == want_end
                            && body.len() as u64 == want_end - want_start =>
                    {
                        Ok(&body[..])
                    }
                    None if body.len() as u64 == size => {
                        Ok(&body[want_start as usize..want_end as usize])
                    }
                    _ => Err(data_err(format!(
                        "answer for bytes {want_start}..{want_end} does not match the request"
                    ))),
                };
                bytes.and_then(|b| {
                    if is_delta {
                        return lazy
                            .feed_delta(&job, b)
                            .map(|_| ())
                            .map_err(|e| Error::decode(e).with_object(key.clone()));
                    }
                    let Some(base) = lazy.base.as_mut() else {
                        return Ok(());
                    };
                    let fed = match job.need {
                        Need::Suffix(_) => base.snap.feed_suffix(b),
                        Need::Range { start, .. } => base.snap.feed_range(start, b, &job.key),
                    };
                    fed.map_err(|e| Error::decode(e).with_object(key.clone()))
                })
            }
            GetResponse::NotFound => {
                lazy.failed.push((
                    key.clone(),
                    job.need,
                    Error::new(
                        ErrorKind::NotFound,
                        "snapshot named by the catalog is missing",
                    )
                    .with_object(key.clone()),
                ));
                self.missing(now, &key);
                return;
            }
            other => Err(super::fetch::unavailable(&other).with_object(key.clone())),
        };
        match result {
            Ok(()) => {
                let delta_fetches = u64::from(is_delta);
                lazy.blocks_fetched = lazy
                    .base
                    .as_ref()
                    .map_or(lazy.blocks_fetched, |b| b.snap.fetched_blocks)
                    .max(lazy.blocks_fetched + delta_fetches);
                self.success(&key);
            }
            Err(e) => {
                lazy.failed.push((key.clone(), job.need, e.clone()));
                self.distrust_head(now, &e);
                let _ = self.failure(&key, e);
            }
        }
    }

    /// Whether the planned unit `u` may be counted as applied without a
    /// GET (see [`Lazy::deferred`]): lazy KV mode over a block-indexed base,
    /// no records to report, a key filter from the catalog, no copy in the
    /// head, room to hold it, and no read waiting: none of its GETs out,
    /// and none answered since reads last ran. Else a head landing while a
    /// read waits (or between an answer and the read's next run) could
    /// defer a segment the read must then fetch, one more round each time:
    /// a read of a key every commit writes could wait for ever. The
    /// segments then come in as when catching up.
    pub(super) fn deferrable(&self, u: &super::plan::Unit) -> bool {
        let Some(l) = self.lazy.as_ref() else {
            return false;
        };
        self.cfg.mode == super::Mode::Kv
            && !self.cfg.emit_records
            && u.entry.filter.is_some()
            && l.base.is_some()
            && l.deferred.len() < MAX_DEFERRED
            && l.wanted.is_empty()
            && l.inflight.is_empty()
            && !l.read_due
            && self
                .head
                .as_ref()
                .is_none_or(|h| h.tail_body(&u.entry.key).is_none())
    }

    /// Counts the unit at the front of the plan as applied, unread.
    pub(super) fn defer_front(&mut self) {
        let Some(mut u) = self.plan.pop_front() else {
            return;
        };
        let (first, last) = (u.from, u.entry.last_lsn);
        self.retry_at.remove(first);
        self.applied = last;
        // Read whole when a read needs it.
        u.start = u.entry.start_for(0);
        if let Some(l) = self.lazy.as_mut() {
            l.deferred.push(u);
        }
        self.events.push_back(Event::Applied { first, last });
    }

    /// A deferred segment a read asked for: verified whole like any
    /// segment, then replayed into the overlay (its writes after the
    /// chain's end; newer writes stay).
    fn on_deferred(&mut self, now: u64, job: BlockJob, i: usize, resp: GetResponse) {
        let Some(lazy) = self.lazy.as_ref() else {
            return;
        };
        let u = &lazy.deferred[i];
        let key = job.snapshot.clone();
        let filter = u.entry.filter.clone();
        let result = match resp {
            GetResponse::Ok { body, range, .. } => self.verify_segment(u, body, range),
            other => Err(super::fetch::unavailable(&other).with_object(key.clone())),
        };
        let Some(lazy) = self.lazy.as_mut() else {
            return;
        };
        let chain_end = lazy.base.as_ref().map_or(0, |b| b.chain_end);
        let result = result.and_then(|v| {
            let mut ops = Vec::new();
            for (&(s, e), lsn) in v.records.iter().zip(v.first..) {
                crate::batch::decode_into(&v.bytes[s..e], &mut ops)
                    .map_err(|d| Error::decode(d).with_object(key.clone()).with_lsn(lsn))?;
                // The replica skipped this segment for every read whose key
                // the head's filter ruled out: a filter that leaves out a
                // key the segment writes would have served stale values.
                // (What was applied before the lie is the segment's own
                // verified writes: the overlay keeps a key's newest write.)
                let lie = filter.as_ref().is_some_and(|f| {
                    ops.iter().any(|op| {
                        let (crate::batch::OpRef::Put(k, _) | crate::batch::OpRef::Delete(k)) = *op;
                        !f.may_contain(k)
                    })
                });
                if lie {
                    return Err(Error::new(
                        ErrorKind::Data,
                        "the segment writes a key its head filter lacks",
                    )
                    .with_object(key.clone())
                    .with_lsn(lsn));
                }
                if lsn > chain_end {
                    lazy.apply(lsn, &ops);
                }
            }
            Ok(())
        });
        match result {
            Ok(()) => {
                lazy.deferred.retain(|d| d.entry.key != key);
                lazy.blocks_fetched += 1;
                self.success(&key);
            }
            Err(e) => {
                lazy.failed.push((key.clone(), job.need, e.clone()));
                if e.kind() == ErrorKind::NotFound {
                    self.missing(now, &key);
                } else {
                    self.distrust_head(now, &e);
                    let _ = self.failure(&key, e);
                }
            }
        }
    }

    /// Lazy mode: adopts the head's snapshot as the base when it is newer
    /// than the applied LSN (the state jumps to it) or newer than the base
    /// (the overlay sheds what it covers). Returns whether the state jumped.
    /// `index_digest`: the signed head's index digest for a version 4
    /// snapshot, which every block read is then verified against.
    pub(super) fn lazy_adopt(
        &mut self,
        snapshot: Option<&SnapshotEntry>,
        deltas: &[DeltaEntry],
        index_digest: Option<[u8; 32]>,
    ) -> bool {
        let applied = self.applied;
        let Some(lazy) = self.lazy.as_mut() else {
            return false;
        };
        // Version 1 snapshots have no index: they load whole, as in full
        // mode, and the overlay sits on that state.
        let Some(s) = snapshot.filter(|s| s.version == 2 || s.version == 4) else {
            return false;
        };
        let newer_than_base = lazy.base.as_ref().is_none_or(|b| b.entry.lsn < s.lsn);
        // Where the snapshot and the head's delta chain over it reach.
        let end = deltas
            .last()
            .filter(|_| deltas.first().is_some_and(|f| f.base_lsn == s.lsn))
            .map_or(s.lsn, |d| d.lsn);
        // Over the base in use, a chain that reaches further, or the same
        // span under other keys (another epoch's), replaces the chain in use:
        // the publisher may delete the deltas it no longer names.
        let newer_chain = lazy.base.as_ref().is_some_and(|b| {
            b.entry.key == s.key
                && (end > b.chain_end
                    || (end == b.chain_end
                        && end > s.lsn
                        && !b.deltas.is_empty()
                        && !b
                            .deltas
                            .iter()
                            .map(|d| &d.entry.key)
                            .eq(deltas.iter().map(|d| &d.key))))
        });
        if s.lsn > applied || (newer_chain && end > applied) {
            // The state jumps to the end of the snapshot's delta chain: only
            // the segments after it are replayed.
            lazy.clear();
            lazy.set_base(s.clone(), index_digest);
            if end > s.lsn {
                lazy.set_deltas(deltas);
            }
            self.state = crate::state::KvState::new();
            self.applied = end;
            self.plan_next = end + 1;
            self.clear_plan();
            self.events.push_back(Event::Bootstrapped {
                lsn: end,
                dataset_id: self.dataset.unwrap_or_default(),
            });
            true
        } else if newer_chain {
            lazy.replace_deltas(deltas, end);
            false
        } else {
            // A base may replace a full state only if the overlay holds
            // every write after it.
            let state_covered = self.state.is_empty() || s.lsn >= lazy.state_lsn;
            if newer_than_base
                && state_covered
                && lazy.base.as_ref().is_none_or(|b| b.entry.key != s.key)
            {
                lazy.set_base(s.clone(), index_digest);
                // The base replaces a state loaded whole from version 1.
                self.state = crate::state::KvState::new();
            }
            false
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
