//! Adopting a head's snapshot and delta chain: the base, a jump to a
//! newer one, a longer chain over the same base, and the jobs that stay.

use super::*;

impl Lazy {
    /// Makes `entry` the base: at `applied`, the overlay keeps only writes
    /// after the snapshot; above it, the snapshot is the whole state.
    pub(in crate::replica) fn set_base(
        &mut self,
        entry: SnapshotEntry,
        index_digest: Option<[u8; 32]>,
    ) {
        let lsn = entry.lsn;
        self.shed_through(lsn);
        // The old base's blocks are no longer wanted; the deferred segments
        // the new base leaves are, and a GET of one in flight stays counted
        // (else the next read would ask for it a second time).
        self.keep_jobs(false);
        let fresh = || {
            let mut s = match index_digest {
                Some(d) => LazySnapshot::with_index_digest(entry.size, 0, d),
                None => LazySnapshot::new(entry.size, 0),
            };
            s.expect_entries(entry.entries);
            s.set_cache(self.snapshot_cache_bytes(), self.fresh_blocks);
            if let Some(c) = entry.footer_crc32 {
                s.expect_footer_crc32(c);
            }
            s
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
        self.base_gen += 1;
        self.base = Some(Base {
            snap,
            chain_end: entry.lsn,
            entry,
            deltas: Vec::new(),
        });
    }

    /// The deltas `head` names over the base become part of it: call right
    /// after [`set_base`](Self::set_base) on a jump to the chain's end.
    pub(in crate::replica) fn set_deltas(&mut self, deltas: &[DeltaEntry]) {
        if let Some(b) = self.base.as_mut() {
            b.deltas = deltas.iter().cloned().map(LazyDelta::new).collect();
            if let Some(last) = deltas.last() {
                b.chain_end = last.lsn;
            }
        }
        self.fit_cache();
    }

    /// The head names another delta chain over the same base, reaching `end`
    /// (at most the applied LSN, and no earlier than the chain in use): a
    /// publisher consolidated or extended the chain, and may delete the
    /// deltas it replaced. Reads go through the new chain from now on; the
    /// overlay keeps only the writes after `end` (those before it are the
    /// same in the base and the new chain). A delta the new chain still
    /// names keeps what was read of it, and its GETs in flight; answers for
    /// the deltas it left are ignored when they come.
    pub(in crate::replica) fn replace_deltas(&mut self, deltas: &[DeltaEntry], end: u64) {
        let Some(b) = self.base.as_mut() else {
            return;
        };
        let mut old = std::mem::take(&mut b.deltas);
        b.deltas = deltas
            .iter()
            .map(|e| match old.iter().position(|d| d.entry == *e) {
                Some(i) => old.swap_remove(i),
                None => LazyDelta::new(e.clone()),
            })
            .collect();
        b.chain_end = end;
        // Scans collect the snapshot's entries again: those they dropped
        // as hidden by the old chain may show under this one.
        self.base_gen += 1;
        self.shed_through(end);
        self.keep_jobs(true);
        self.fit_cache();
    }

    /// Drops the deferred segments and overlay writes a base (or chain)
    /// reaching `lsn` holds.
    pub(in crate::replica) fn shed_through(&mut self, lsn: u64) {
        self.deferred.retain(|u| u.entry.last_lsn > lsn);
        self.drop_through(lsn, None);
        self.overlay_gen += 1;
    }

    /// Drops the overlay's writes at or before `lsn` (to keys below `keep`
    /// when given).
    pub(super) fn drop_through(&mut self, lsn: u64, keep: Option<&[u8]>) {
        let mut dropped = 0;
        self.overlay.retain(|k, (l, v)| {
            let stay = *l > lsn || keep.is_some_and(|keep| k >= keep);
            if !stay {
                dropped += entry_cost(k, v.as_deref());
            }
            stay
        });
        self.overlay_bytes -= dropped;
        self.chain_bytes = 0;
    }

    /// Keeps the wanted and in-flight jobs of the deferred segments and,
    /// with `chain` (the base stays), of the base and its deltas; forgets
    /// failures.
    pub(in crate::replica) fn keep_jobs(&mut self, chain: bool) {
        let deferred = &self.deferred;
        let base = self.base.as_ref().filter(|_| chain);
        // (Records stay: they are immutable, whatever names them.)
        let keep = |j: &BlockJob| {
            j.record.is_some()
                || base.is_some_and(|b| b.object_size(&j.snapshot) > 0)
                || deferred.iter().any(|u| u.entry.key == j.snapshot)
        };
        self.wanted.retain(keep);
        self.inflight.retain(keep);
        self.failed.clear();
    }
}

impl Replica {
    /// Lazy mode: adopts the head's snapshot as the base when it is newer
    /// than the applied LSN (the state jumps to it) or newer than the base
    /// (the overlay sheds what it covers). Returns whether the state jumped.
    /// `index_digest`: the signed head's index digest for a version 4
    /// snapshot, which every block read is then verified against.
    pub(in crate::replica) fn lazy_adopt(
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
        // span under other keys (another epoch's) or other entries (a head
        // that lied about one, then the truth), replaces the chain in use:
        // the publisher may delete the deltas it no longer names.
        let newer_chain = lazy.base.as_ref().is_some_and(|b| {
            b.entry.key == s.key
                && (end > b.chain_end
                    || (end == b.chain_end
                        && end > s.lsn
                        && !b.deltas.is_empty()
                        && !b.deltas.iter().map(|d| &d.entry).eq(deltas)))
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
            // A whole load under way (a version 1 snapshot) is older than
            // where the state jumped: its answers must not take it back
            // (without a bootstrap they are dropped).
            self.bootstrap = None;
            self.events.push_back(Event::Bootstrapped {
                lsn: end,
                dataset_id: self.dataset.unwrap_or_default(),
            });
            true
        } else if newer_chain {
            lazy.replace_deltas(deltas, end);
            false
        } else if let Some(old) = lazy.base.take_if(|b| b.entry.key == s.key && b.entry != *s) {
            // The base's entry as this head states it (one that lied about
            // the snapshot, then the truth): its blocks are read again, its
            // chain stays.
            lazy.set_base(s.clone(), index_digest);
            if let Some(b) = lazy.base.as_mut() {
                b.chain_end = old.chain_end;
                b.deltas = old.deltas;
            }
            // The snapshot was sized with no deltas beside it.
            lazy.fit_cache();
            false
        } else {
            // A base may replace a full state only if the overlay holds
            // every write after it, and the base in use only if it covers
            // that base's chain (the overlay holds the writes after the
            // chain's end, not those in its deltas).
            // (An empty state counts: all its keys may have been deleted
            // after the base, and the base would bring them back.)
            let state_covered = s.lsn >= lazy.state_lsn;
            let chain_covered = lazy.base.as_ref().is_none_or(|b| s.lsn >= b.chain_end);
            if newer_than_base
                && state_covered
                && chain_covered
                && lazy.base.as_ref().is_none_or(|b| b.entry.key != s.key)
            {
                lazy.set_base(s.clone(), index_digest);
                lazy.state_lsn = 0;
                // The base replaces a state loaded whole from version 1, and
                // a whole load under way older than it, which would take
                // the state back when it ends.
                self.state = crate::state::KvState::new();
                if self
                    .bootstrap
                    .as_ref()
                    .is_some_and(|b| b.entry.lsn <= s.lsn)
                {
                    self.bootstrap = None;
                }
            }
            false
        }
    }
}
