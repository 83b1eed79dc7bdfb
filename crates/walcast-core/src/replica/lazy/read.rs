//! Point reads and ordered scans: the overlay first, then the newest
//! deltas that may hold the key, then the base snapshot's blocks.

use super::*;
use crate::snapshot::block::Block;
use crate::snapshot::delta::decode_change;
use crate::snapshot::pointer::{decode_entries, page_range, resolve, Pointer, Resolved};

impl Lazy {
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
    pub(super) fn delta_get(&mut self, key: &[u8]) -> Result<Result<Option<Change>, bool>, Error> {
        let Some(base) = self.base.as_ref() else {
            return Ok(Ok(None));
        };
        if base.deltas.is_empty() {
            return Ok(Ok(None));
        }
        // First every index and filter, and the slot page of the key in
        // each pointer delta, all in flight together.
        let mut wants: Vec<(String, Need)> = Vec::new();
        for d in &base.deltas {
            match d.entry.slots {
                Some(sp) => {
                    let (_, r) = page_range(sp.pages, sp.page_bytes, key);
                    if !d.blocks.contains_key(r.start) {
                        let need = Need::Range {
                            start: r.start,
                            end: r.end,
                        };
                        wants.push((d.entry.key.clone(), need));
                    }
                }
                None if d.index.is_none() => wants.push((d.entry.key.clone(), d.suffix_need())),
                None => {}
            }
        }
        let suffixes = !wants.is_empty();
        let mut records = Vec::new();
        if !suffixes {
            // Then the data blocks (or records) of the newest deltas that
            // may hold the key.
            for d in base.deltas.iter().rev() {
                if wants.len() + records.len() >= SPECULATIVE_BLOCKS {
                    break;
                }
                let named = |e: DecodeError| Error::decode(e).with_object(&d.entry.key);
                if let Some(sp) = d.entry.slots {
                    let (page, r) = page_range(sp.pages, sp.page_bytes, key);
                    let bytes = d.blocks.get(r.start).map_or(&[][..], Vec::as_slice);
                    // A key's fingerprint names it almost surely: the
                    // records say. Another key's record may write this key
                    // too, earlier: the newest that writes it answers.
                    let found = d.page_of().lookup(bytes, page, key).map_err(named)?;
                    let missing: Vec<Pointer> = found
                        .iter()
                        .filter(|p| self.record(p).is_none())
                        .copied()
                        .collect();
                    if !missing.is_empty() {
                        records.extend(missing);
                        continue;
                    }
                    let mut newest: Option<(u64, Change)> = None;
                    for p in &found {
                        let rec = self.record(p).unwrap_or_default();
                        match resolve(rec, p, key) {
                            Ok(Resolved::Change(c))
                                if newest.as_ref().is_none_or(|n| n.0 < p.lsn) =>
                            {
                                newest = Some((p.lsn, c));
                            }
                            Ok(_) => {}
                            Err(e) => {
                                return Err(Error::decode(e)
                                    .with_object(p.segment_key())
                                    .with_lsn(p.lsn))
                            }
                        }
                    }
                    match newest {
                        Some((_, c)) if wants.is_empty() && records.is_empty() => {
                            return Ok(Ok(Some(c)))
                        }
                        // A newer delta's part is still out: it may hold
                        // the key.
                        Some(_) => break,
                        None => continue,
                    }
                }
                let Some(idx) = &d.index else { continue };
                let Some(h) = idx.block_for(key) else {
                    continue;
                };
                match d.blocks.get(h.offset) {
                    Some(bytes) if wants.is_empty() && records.is_empty() => {
                        match idx.lookup(&h, bytes, key) {
                            Ok(Some(c)) => return Ok(Ok(Some(c))),
                            Ok(None) => {}
                            Err(e) => return Err(named(e)),
                        }
                    }
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
        if wants.is_empty() && records.is_empty() {
            return Ok(Ok(None));
        }
        // A record a slot names holds the key but for a fingerprint's
        // one in four billion: the snapshot's block waits for it.
        let snapshot_too = suffixes || (records.is_empty() && wants.len() < SPECULATIVE_BLOCKS);
        for (object, need) in wants {
            self.want_checked(object, need, key)?;
        }
        for p in records {
            self.want_record(p, key)?;
        }
        Ok(Err(snapshot_too))
    }

    /// The chain's changes to the keys from `from` (before `end`) that one
    /// data block of each delta holds (or its whole file, read for a
    /// version 1 load), written into the overlay at their deltas' LSNs
    /// (a newer write of a key stays): every change below the returned
    /// `Ok(Some(hi))` is there then (`None`: to `end`). `Ok(None)`: GETs
    /// are queued (the deltas' indexes, or their blocks). Past a quarter of
    /// the cache in such changes, those below `keep` go first (a scan's
    /// place: it merged them), and `chain_shed` counts it. While it waits
    /// for blocks, up to `ahead` blocks after each go out beside them (a
    /// long scan's next windows: not one round trip a window), as long as
    /// four scans' windows over the longest chain fit the deltas' share of
    /// the cache.
    pub(super) fn chain_window(
        &mut self,
        from: &[u8],
        end: Option<&[u8]>,
        keep: &[u8],
        ahead: usize,
    ) -> Result<Option<Option<Vec<u8>>>, Error> {
        let Some(base) = self.base.as_ref() else {
            return Ok(Some(None));
        };
        // A window and the blocks read ahead of it take at most this of
        // each delta: four scans' fit the deltas' share of the cache (a
        // quarter) with the longest chain, so that blocks read ahead do not
        // evict those scans wait for.
        let room = self.cache_bytes / (4 * RECENT_BLOCKS * crate::catalog::MAX_DELTAS) as u64;
        let mut hi = end;
        // Each with the key of a block read ahead.
        let mut wants = Vec::new();
        let mut blocks = Vec::new();
        for d in &base.deltas {
            let Some(idx) = &d.index else {
                wants.push((d.entry.key.clone(), d.suffix_need(), None));
                continue;
            };
            let Some((h, first, next)) = idx.block_from(from) else {
                continue;
            };
            if end.is_some_and(|e| first >= e) {
                continue;
            }
            if let Some(n) = next.filter(|n| hi.is_none_or(|h| *n < h)) {
                hi = Some(n);
            }
            let (mut k, mut took) = (next, h.end() - h.offset);
            for _ in 0..ahead {
                let Some((h, first, next)) = k
                    .filter(|k| end.is_none_or(|e| *k < e))
                    .and_then(|k| idx.block_from(k))
                else {
                    break;
                };
                took += h.end() - h.offset;
                if took > room {
                    break;
                }
                if !d.blocks.contains_key(h.offset) && !d.blocks.contains_key(u64::MAX) {
                    let need = Need::Range {
                        start: h.offset,
                        end: h.end(),
                    };
                    wants.push((d.entry.key.clone(), need, Some(first.to_vec())));
                }
                k = next;
            }
            // The block, or the whole file read for a version 1 load.
            let bytes = d.blocks.get(h.offset).map(Vec::as_slice).or_else(|| {
                d.blocks
                    .get(u64::MAX)
                    .and_then(|w| w.get(h.offset as usize..h.end() as usize))
            });
            match bytes {
                Some(b) => blocks.push((d, h, first.max(from), b)),
                None => wants.push((
                    d.entry.key.clone(),
                    Need::Range {
                        start: h.offset,
                        end: h.end(),
                    },
                    None,
                )),
            }
        }
        // Blocks are read ahead only beside those the window waits for.
        if wants.iter().any(|w| w.2.is_none()) {
            for (object, need, first) in wants {
                match first {
                    None => self.want_checked(object, need, from)?,
                    Some(k) => self.want_in(object, need, &k, true),
                }
            }
            return Ok(None);
        }
        // Every block decodes before any change is written, and the newest
        // delta's go first: whatever stops the writes leaves each key the
        // newest change of those written (a newer write of it stays).
        let mut decoded = Vec::new();
        for (d, h, lo, bytes) in blocks {
            let key = d.entry.key.clone();
            let named = |e: DecodeError| Error::decode(e).with_object(&key);
            let block = Block::decode(bytes, &h, "delta data block").map_err(named)?;
            // A pointer delta's entries in the window: keys with the
            // records that wrote them.
            let pointers = match d.index.as_ref().and_then(DeltaIndex::pointers) {
                Some((lsn, epoch)) => {
                    let mut e =
                        decode_entries(&block, d.entry.base_lsn, lsn, epoch).map_err(named)?;
                    e.retain(|(k, _)| k.as_slice() >= lo);
                    Some(e)
                }
                None => None,
            };
            decoded.push((d.entry.lsn, key, block, lo.to_vec(), h.offset, pointers));
        }
        let mut hi = hi.map(<[u8]>::to_vec);
        let chain_end = base.chain_end;
        let has_deltas = !base.deltas.is_empty();
        // The records a window waits for stay within what the records'
        // share of the cache holds (half of it, shared by the pointer
        // deltas; at least one record of each) and [`WINDOW_RECORDS`] of
        // each: the window ends before the entry past them.
        let pointed = decoded.iter().filter(|d| d.5.is_some()).count() as u64;
        let room = self.records_cache_bytes() / 2 / pointed.max(1);
        for (.., pointers) in &decoded {
            let Some(entries) = pointers else { continue };
            let mut took = 0u64;
            for (i, (k, p)) in entries.iter().enumerate() {
                if hi.as_ref().is_some_and(|h| k >= h) {
                    break;
                }
                took += p.range().end - p.offset;
                if i > 0 && (i >= WINDOW_RECORDS || took > room) {
                    hi = Some(k.clone());
                    break;
                }
            }
        }
        let mut missing = Vec::new();
        for (.., pointers) in &decoded {
            for (k, p) in pointers.iter().flatten() {
                if hi.as_ref().is_none_or(|h| k < h) && self.record(p).is_none() {
                    missing.push((k.clone(), *p));
                }
            }
        }
        if !missing.is_empty() {
            for (k, p) in missing {
                self.want_record(p, &k)?;
            }
            return Ok(None);
        }
        if self.chain_bytes > self.delta_cache_bytes() && has_deltas {
            self.drop_through(chain_end, Some(keep));
            self.chain_shed += 1;
        }
        for (lsn, key, block, lo, at, pointers) in decoded.into_iter().rev() {
            if let Some(entries) = pointers {
                for (k, p) in entries {
                    if hi.as_ref().is_some_and(|h| k >= *h) {
                        break;
                    }
                    let rec = self.record(&p).unwrap_or_default();
                    let v = match resolve(rec, &p, &k) {
                        Ok(Resolved::Change(v)) => v,
                        Ok(Resolved::NotHere) => {
                            return Err(Error::new(
                                ErrorKind::Data,
                                "a pointer names a record that does not write its key",
                            )
                            .with_object(key)
                            .with_lsn(p.lsn))
                        }
                        Err(e) => {
                            return Err(Error::decode(e)
                                .with_object(p.segment_key())
                                .with_lsn(p.lsn))
                        }
                    };
                    self.chain_bytes += entry_cost(&k, v.as_deref());
                    self.write(lsn, &k, v.as_deref());
                }
                continue;
            }
            for (k, v) in block.entries() {
                if *k >= lo && hi.as_ref().is_none_or(|h| k < h) {
                    let v = decode_change(v, at).map_err(|e| Error::decode(e).with_object(&key))?;
                    self.chain_bytes += entry_cost(k, v.as_deref());
                    self.write(lsn, k, v.as_deref());
                }
            }
        }
        Ok(Some(hi))
    }

    /// Loads every delta whole into the overlay (before a version 1
    /// snapshot is loaded under them). `Err(())`: GETs are queued. A
    /// pointer delta is not loaded so (its values are in segments): the
    /// load goes on without the chain, as when a delta is gone.
    pub(in crate::replica) fn deltas_into_overlay(&mut self) -> Result<Result<(), ()>, Error> {
        let Some(base) = self.base.as_ref() else {
            return Ok(Ok(()));
        };
        if let Some(d) = base.deltas.iter().find(|d| d.entry.slots.is_some()) {
            return Err(
                Error::new(ErrorKind::NotFound, "a pointer delta is not loaded whole")
                    .with_object(&d.entry.key),
            );
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
                self.want_checked(object, need, b"")?;
            }
            return Ok(Err(()));
        }
        // The changes, window by window as a scan reads them, from the
        // whole files; the deltas go once every window is in.
        let mut from = Vec::new();
        loop {
            match self.chain_window(&from, None, b"", 0)? {
                Some(Some(hi)) => from = hi,
                Some(None) => break,
                None => return Ok(Err(())),
            }
        }
        if let Some(base) = self.base.as_mut() {
            base.deltas.clear();
        }
        // They are the state now, which no scan may drop.
        self.chain_bytes = 0;
        self.fit_cache();
        Ok(Ok(()))
    }
}

impl Replica {
    pub(super) fn snapshot_error(&self, e: DecodeError) -> Error {
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
    pub(super) fn read_ran<T>(&mut self, r: &Result<Read<T>, Error>) {
        if let Some(lazy) = self.lazy.as_mut() {
            lazy.read_due = false;
            lazy.read_pending = matches!(r, Ok(Read::Pending));
        }
    }

    pub(super) fn get_at_applied(&mut self, key: &[u8]) -> Result<Read<Option<Vec<u8>>>, Error> {
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
                        // A failure kept for this block goes to this read.
                        if let Some(e) = lazy.take_base_failure(&n) {
                            return Err(e);
                        }
                        lazy.want(n, key, false);
                    }
                }
                return Ok(Read::Pending);
            }
        }
        let Some(base) = lazy.base.as_mut() else {
            // No block-indexed base: the state loaded whole (or empty),
            // once the deferred segments that may write the key are in.
            if segments {
                return Ok(Read::Pending);
            }
            return Ok(Read::Ready(self.state.get(key).map(<[u8]>::to_vec)));
        };
        match base.snap.get(key) {
            Ok(Lookup::Done(_)) if segments => Ok(Read::Pending),
            Ok(Lookup::Done(v)) => Ok(Read::Ready(v)),
            Ok(Lookup::Need(n)) => {
                if let Some(e) = lazy.take_base_failure(&n) {
                    return Err(e);
                }
                lazy.want(n, key, false);
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

    pub(super) fn scan_at_applied(&mut self, scan: &mut LazyScan) -> Result<Read<Entries>, Error> {
        let in_range =
            |k: &[u8], end: &Option<Vec<u8>>| end.as_ref().is_none_or(|e| k < e.as_slice());
        // Whether `(k, v)` may still be taken after `bytes` were: counts it.
        let max = scan.max_bytes;
        let room = |bytes: &mut usize, k: &[u8], v: &[u8]| {
            let fits = *bytes < max;
            *bytes = bytes.saturating_add(k.len() + v.len());
            fits
        };
        let Some(lazy) = self.lazy.as_mut() else {
            let mut bytes = 0;
            let out = self
                .state
                .range(std::ops::Bound::Included(&scan.start), upper(&scan.end))
                .take(scan.limit)
                .take_while(|(k, v)| room(&mut bytes, k, v))
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect();
            return Ok(Read::Ready(out));
        };
        // Deferred segments are read whole into the overlay before a scan
        // merges.
        if lazy.want_deferred(&scan.start, true)? {
            return Ok(Read::Pending);
        }
        // The snapshot's part starts over when the base changed.
        let base_gen = lazy.base.as_ref().map(|_| lazy.base_gen);
        if scan.base_gen != base_gen || (scan.cursor.is_none() && base_gen.is_some()) {
            scan.base_gen = base_gen;
            scan.collected.clear();
            scan.restart_merge();
            scan.cursor = lazy
                .base
                .as_ref()
                .map(|_| ScanCursor::new(&scan.start, scan.end.as_deref(), 0));
        }
        // The chain's part starts over when the chain changed, and goes on
        // from the merge's place when its changes were dropped since.
        let chain_at = lazy
            .base
            .as_ref()
            .filter(|b| !b.deltas.is_empty())
            .map(|b| (lazy.base_gen, b.chain_end));
        if scan.chain_at != chain_at {
            scan.chain_at = chain_at;
            scan.restart_merge();
        }
        if scan.shed_seen != lazy.chain_shed {
            scan.shed_seen = lazy.chain_shed;
            scan.chain_hi = scan.pos.clone().unwrap_or_else(|| scan.start.clone());
            scan.chain_done = chain_at.is_none();
        }
        // The base-less path copies the state's entries up to `budget`
        // bytes (`state_cut`: it stopped short); the merge takes them as
        // all the state holds below the last one, and asks for twice as
        // many when the overlay hid too many of them.
        let (mut budget, mut state_cut, mut state_take) = (max, false, 0);
        if lazy.base.is_none() {
            // The base is the state loaded whole (or empty): all present.
            let hidden = lazy
                .overlay
                .range((
                    std::ops::Bound::Included(scan.start.as_slice()),
                    std::ops::Bound::Unbounded,
                ))
                .take_while(|(k, _)| in_range(k, &scan.end))
                .count();
            state_take = scan.limit.saturating_add(hidden);
            state_cut = collect_state(&self.state, scan, state_take, budget);
        }
        // The merge so far holds for this state only (a sync that applied
        // more changed the overlay).
        let at = (self.applied, lazy.overlay_gen);
        if scan.merge_at != Some(at) {
            scan.restart_merge();
            scan.merge_at = Some(at);
        }
        // Each turn returns, or collects more snapshot entries (the cursor
        // moves forward or finishes), so the loop ends.
        loop {
            let snap_done = scan.cursor.as_ref().map_or(!state_cut, ScanCursor::is_done);
            // Snapshot keys above the last one collected are not known yet:
            // merge only up to it, unless the snapshot part is complete.
            // Nothing collected yet: nothing is known to be below (not even
            // the empty key, which the snapshot may still hold).
            let frontier = scan.collected.last().map(|(k, _)| k.as_slice());
            // Nor above the chain's changes written.
            let chain_hi = (!scan.chain_done).then_some(scan.chain_hi.as_slice());
            let below = |k: &[u8]| {
                (snap_done || frontier.is_some_and(|f| k <= f)) && chain_hi.is_none_or(|h| k < h)
            };
            // From where the last turn's merge stopped.
            let lower = match &scan.pos {
                Some(p) => std::ops::Bound::Excluded(p.as_slice()),
                None => std::ops::Bound::Included(scan.start.as_slice()),
            };
            let mut o = lazy
                .overlay
                .range((lower, std::ops::Bound::Unbounded))
                .take_while(|(k, _)| in_range(k, &scan.end) && below(k))
                .peekable();
            let (mut i, mut last) = (scan.used, None);
            while scan.merged.len() < scan.limit && scan.merged_bytes < max {
                let s = scan.collected.get(i).filter(|(k, _)| below(k));
                let from_overlay = match (s, o.peek()) {
                    (None, None) => break,
                    (None, Some(_)) => true,
                    (Some(_), None) => false,
                    (Some((sk, _)), Some((ok, _))) => &**ok <= sk.as_slice(),
                };
                let (k, v) = if from_overlay {
                    let (k, (_, v)) = o.next().expect("peeked");
                    if s.is_some_and(|(sk, _)| sk.as_slice() == k) {
                        i += 1; // the overlay wins
                    }
                    (k, v.as_deref())
                } else {
                    let (k, v) = &scan.collected[i];
                    i += 1;
                    (k.as_slice(), Some(v.as_slice()))
                };
                last = Some(k);
                if let Some(v) = v {
                    room(&mut scan.merged_bytes, k, v);
                    scan.merged.push((k.to_vec(), v.to_vec()));
                    scan.copied += 1;
                }
            }
            if let Some(k) = last {
                scan.pos = Some(k.to_vec());
            }
            // Snapshot entries the overlay hid (keys the chain or the tail
            // deleted, say) go: a merge from the start meets the same
            // overlay, or reads the chain again first. The last stays as
            // the frontier (looked at again next turn).
            let n = scan.collected.len();
            let end = i.min(n.saturating_sub(1));
            let from = scan.used.saturating_sub(1);
            let mut w = from;
            for r in from..n {
                if r >= end || !lazy.overlay.contains_key(scan.collected[r].0.as_slice()) {
                    scan.collected.swap(w, r);
                    w += 1;
                }
            }
            scan.collected.truncate(w);
            scan.used = i - (n - w);
            let chain_done = scan.chain_done;
            if scan.merged.len() >= scan.limit
                || scan.merged_bytes >= max
                || (snap_done && chain_done)
            {
                return Ok(scan.answer());
            }
            // The chain's next changes, when the merge waits for them (and,
            // while the snapshot's part has not started, its first block
            // beside them).
            let frontier = scan.collected.last().map(|(k, _)| k.as_slice());
            if !chain_done && (snap_done || frontier.is_none_or(|f| scan.chain_hi.as_slice() <= f))
            {
                // What the merge took is not needed again.
                let keep = scan.pos.as_ref().unwrap_or(&scan.start);
                let end = scan.end.as_deref();
                // The blocks the entries still wanted may take (at the
                // mean size of those merged so far), as the snapshot's.
                let mean = scan
                    .merged_bytes
                    .checked_div(scan.merged.len())
                    .unwrap_or(128);
                let wanted = (scan.limit - scan.merged.len())
                    .saturating_mul(mean)
                    .min(max - scan.merged_bytes);
                let ahead = (wanted / crate::snapshot::delta::DEFAULT_DELTA_BLOCK_BYTES)
                    .min(RECENT_BLOCKS - 1);
                let window = lazy.chain_window(&scan.chain_hi, end, keep, ahead)?;
                // Its own dropping leaves what it has not merged.
                scan.shed_seen = lazy.chain_shed;
                let loaded = window.is_some();
                match window {
                    Some(Some(h)) if end.is_none_or(|e| h.as_slice() < e) => scan.chain_hi = h,
                    Some(_) => scan.chain_done = true,
                    None if frontier.is_some() || snap_done => return Ok(Read::Pending),
                    None => {}
                }
                if loaded {
                    continue;
                }
            }
            let (out_len, bytes) = (scan.merged.len(), scan.merged_bytes);
            // More snapshot entries are needed.
            let (Some(cursor), Some(base)) = (scan.cursor.as_mut(), lazy.base.as_mut()) else {
                if !state_cut {
                    return Ok(scan.answer());
                }
                budget = budget.saturating_mul(2);
                state_cut = collect_state(&self.state, scan, state_take, budget);
                continue;
            };
            // Entries still wanted, and no more than the bytes still wanted
            // take at the mean size of those merged (16 to learn it), so
            // a scan over cached blocks copies about its bound.
            let by_bytes = match out_len {
                0 => 16,
                n => ((max - bytes) / (bytes / n).max(1)).saturating_add(1),
            };
            cursor.remaining = (scan.limit - out_len).max(16).min(by_bytes.max(16));
            match base.snap.scan_step(cursor, &mut scan.collected) {
                Ok(Some(need)) => {
                    // The block is the one holding the cursor's key now;
                    // the blocks after it that the entries still wanted
                    // will need (at the mean size of those merged so far)
                    // go out beside it.
                    let next = cursor.next.clone();
                    let mean = bytes.checked_div(out_len).unwrap_or(128);
                    let ahead = (cursor.remaining.saturating_mul(mean)
                        / crate::snapshot::indexed::DEFAULT_BLOCK_BYTES)
                        .min(SCAN_AHEAD);
                    let ahead = base.snap.blocks_ahead(&next, cursor.end.as_deref(), ahead);
                    if let Some(e) = lazy.take_base_failure(&need) {
                        return Err(e);
                    }
                    lazy.want(need, &next, false);
                    for (k, n) in ahead {
                        lazy.want(n, &k, true);
                    }
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
}

/// Most records one window of a scan waits for, of each pointer delta.
const WINDOW_RECORDS: usize = 64;

/// Data blocks a scan fetches beside the one it waits for.
const SCAN_AHEAD: usize = 7;

/// Copies at most `n` of the state's entries from `scan.start` (before its
/// end) into `scan.collected`, until their keys and values reach `budget`
/// bytes; true when it stopped there, short of the state's entries.
fn collect_state(
    state: &crate::state::KvState,
    scan: &mut LazyScan,
    n: usize,
    budget: usize,
) -> bool {
    scan.collected.clear();
    scan.restart_merge();
    let mut bytes = 0usize;
    for (k, v) in state
        .range(std::ops::Bound::Included(&scan.start), upper(&scan.end))
        .take(n)
    {
        if bytes >= budget {
            return true;
        }
        bytes = bytes.saturating_add(k.len() + v.len());
        scan.collected.push((k.to_vec(), v.to_vec()));
    }
    false
}
