//! Snapshots: encoding the replayed state every `snapshot_every` LSNs, to
//! upload before a head names it.

use crate::catalog::{self, DeltaEntry, SnapshotEntry, MAX_DELTAS};
use crate::snapshot::delta::{
    encode_delta_readable, DeltaFooter, DeltaMeta, DEFAULT_DELTA_BLOCK_BYTES,
};
use crate::snapshot::pointer::{
    encode_pointer_delta, Pointer, PointerFooter, PointerMeta, DEFAULT_PAGE_BYTES,
};

use super::{Publisher, Up};

/// A snapshot waiting for upload, or uploaded and waiting for a head.
#[derive(Debug)]
pub(super) struct PendingSnapshot {
    pub(super) entry: SnapshotEntry,
    pub(super) bytes: Vec<u8>,
    pub(super) up: Up,
    /// A delta snapshot: its catalog entry (`entry` then names the same key
    /// and LSN, so uploads and commits treat both kinds alike).
    pub(super) delta: Option<DeltaEntry>,
}

impl Publisher {
    pub(super) fn maybe_snapshot(&mut self, lsn: u64) {
        let (Some(every), Some(state), Some(head)) =
            (self.cfg.snapshot_every, &self.state, &self.head)
        else {
            return;
        };
        let last = head.snapshot.as_ref().map_or(0, |s| s.lsn);
        if self.snapshot.is_some() {
            return;
        }
        let by_bytes = self
            .cfg
            .snapshot_bytes
            .is_some_and(|b| self.bytes_since_snapshot >= b.max(1));
        // The floor: a multiple of the last snapshot's size in bytes of
        // batches since it, scaled down by the keys left when fewer remain
        // (a dataset that shrank): the next snapshot's cost is what it
        // weighs, and a floor set by keys since deleted would hold
        // snapshots back for good.
        let held = match (self.cfg.snapshot_ratio_percent, &head.snapshot) {
            (Some(r), Some(s)) => {
                let size = match s.entries {
                    0 => u128::from(s.size),
                    n => u128::from(s.size) * u128::from(state.len().min(n)) / u128::from(n),
                };
                u128::from(self.bytes_since_snapshot) * 100 < u128::from(r) * size
            }
            _ => false,
        };
        if (lsn < last.saturating_add(every) && !by_bytes) || held {
            self.maybe_delta(lsn);
            return;
        }
        self.bytes_since_snapshot = 0;
        self.bytes_since_delta = 0;
        self.touched.clear();
        self.sealed_ranges = self.sealed_ranges.split_off(&lsn.saturating_add(1));
        // (The open segment's records are still placed: its range goes in
        // at its seal.)
        // A block-indexed snapshot whose blocks readers would refuse (keys
        // too long and alike, a value over 32 MiB) is written as version 1,
        // read whole.
        let indexed = match self.cfg.snapshot_format {
            super::SnapshotFormat::Chunked => None,
            super::SnapshotFormat::Indexed(opts) => Some((opts, false)),
            super::SnapshotFormat::Verified(opts) => Some((opts, true)),
        }
        .and_then(|(opts, digests)| {
            let bytes = crate::snapshot::indexed::encode_readable(
                state,
                lsn,
                self.epoch,
                head.dataset_id,
                opts,
                digests,
            )?;
            Some((if digests { 4 } else { 2 }, bytes))
        });
        let (version, bytes) = indexed.unwrap_or_else(|| {
            (
                1,
                crate::snapshot::encode(state, lsn, self.epoch, head.dataset_id),
            )
        });
        let entry = SnapshotEntry {
            key: catalog::snapshot_key(lsn, self.epoch),
            lsn,
            epoch: self.epoch,
            size: bytes.len() as u64,
            crc32: crate::crc::hash(&bytes),
            entries: state.len(),
            version,
            suffix: (version >= 2)
                .then(|| crate::snapshot::indexed::top_suffix(&bytes))
                .flatten()
                .filter(|s| {
                    s.len()
                        <= self
                            .cfg
                            .snapshot_suffix_bytes
                            .min(catalog::MAX_SNAPSHOT_SUFFIX)
                })
                .map(<[u8]>::to_vec),
            footer_crc32: (version >= 2).then(|| crate::snapshot::indexed::footer_crc32(&bytes)),
        };
        self.note_digest(&entry.key, &bytes);
        self.note_index_digest(&entry.key, &bytes);
        self.snapshot = Some(PendingSnapshot {
            entry,
            bytes,
            up: Up::Waiting(0),
            delta: None,
        });
    }

    /// Keys written after `after` (at the current LSN), with their values
    /// now (`None`: deleted).
    fn changed_after(&self, after: u64) -> usize {
        self.touched.values().filter(|t| t.lsn > after).count()
    }

    /// Writes a delta snapshot when `delta_every` LSNs passed, or
    /// `delta_bytes` of batches were pushed, since the end of the head's
    /// chain. The new delta covers the changes after the end
    /// of a kept prefix of the chain: it absorbs (merges) the newest deltas
    /// while the next older one holds at most 1.5 times its keys, and always
    /// enough to keep the chain within [`MAX_DELTAS`]. So delta sizes grow
    /// geometrically down the chain and each key is rewritten a few times
    /// before the next snapshot absorbs it.
    pub(super) fn maybe_delta(&mut self, lsn: u64) {
        if !self.deltas_on() || self.snapshot.is_some() {
            return;
        }
        // Pointer deltas are made as a segment is sealed (`lsn` its last):
        // every record they name is then in a sealed segment.
        if self.cfg.pointer_deltas && self.open.as_ref().is_some_and(|o| !o.is_empty()) {
            return;
        }
        let every = self.cfg.delta_every.unwrap_or(u64::MAX);
        let (Some(state), Some(head)) = (&self.state, &self.head) else {
            return;
        };
        let (super::SnapshotFormat::Indexed(opts) | super::SnapshotFormat::Verified(opts)) =
            self.cfg.snapshot_format
        else {
            return;
        };
        let Some(snap) = &head.snapshot else {
            return;
        };
        let chain_end = head.deltas.last().map_or(snap.lsn, |d| d.lsn);
        let by_bytes = self
            .cfg
            .delta_bytes
            .is_some_and(|b| self.bytes_since_delta >= b.max(1));
        // After a delta the readers would refuse, the next try waits as
        // long as after a delta.
        let since = chain_end.max(self.delta_refused_at);
        if lsn < since.saturating_add(every.max(1)) && !by_bytes {
            return;
        }
        if lsn <= chain_end {
            return;
        }
        self.bytes_since_delta = 0;
        let mut keep = head.deltas.len();
        let mut n = self.changed_after(chain_end);
        while keep > 0 {
            let older = &head.deltas[keep - 1];
            if keep + 1 > MAX_DELTAS
                || older.entries.saturating_mul(2) <= (n as u64).saturating_mul(3)
            {
                keep -= 1;
                n = self.changed_after(older.base_lsn);
            } else {
                break;
            }
        }
        let base_lsn = if keep == 0 {
            snap.lsn
        } else {
            head.deltas[keep - 1].lsn
        };
        let changed = || self.touched.iter().filter(|(_, t)| t.lsn > base_lsn);
        let block_bytes = opts.block_bytes.clamp(1, DEFAULT_DELTA_BLOCK_BYTES * 4);
        // (Over a version 1 snapshot, which loads whole, value deltas.)
        let pointers: Option<Vec<(&[u8], Pointer)>> =
            if self.cfg.pointer_deltas && snap.version != 1 {
                changed()
                    .map(|(k, t)| Some((k.as_slice(), self.pointer(t)?)))
                    .collect()
            } else {
                None
            };
        let pointed = pointers.and_then(|p| {
            let meta = PointerMeta {
                base_lsn,
                lsn,
                epoch: self.epoch,
                dataset_id: head.dataset_id,
            };
            let n = p.len() as u64;
            let bytes = encode_pointer_delta(p.into_iter(), meta, DEFAULT_PAGE_BYTES, block_bytes)?;
            let f = PointerFooter::decode(&bytes[bytes.len() - 64..], bytes.len() as u64).ok()?;
            Some((bytes, n, f))
        });
        let changes: Vec<(&[u8], Option<&[u8]>)> = match pointed {
            Some(_) => Vec::new(),
            None => changed()
                .map(|(k, _)| (k.as_slice(), state.get(k)))
                .collect(),
        };
        let meta = DeltaMeta {
            base_lsn,
            lsn,
            epoch: self.epoch,
            dataset_id: head.dataset_id,
        };
        if let Some((bytes, n, f)) = pointed {
            let size = bytes.len() as u64;
            let delta = DeltaEntry {
                key: catalog::delta_key(base_lsn, lsn, self.epoch),
                base_lsn,
                lsn,
                epoch: self.epoch,
                size,
                crc32: crate::crc::hash(&bytes),
                entries: n,
                suffix_len: size - f.index.offset,
                footer_crc32: Some(crate::snapshot::delta::footer_crc32(&bytes)),
                slots: Some(catalog::SlotPages {
                    pages: f.pages,
                    page_bytes: f.page_bytes,
                }),
            };
            self.pend_delta(delta, bytes, snap.lsn);
            return;
        }
        let Some(bytes) = encode_delta_readable(changes.iter().copied(), meta, block_bytes) else {
            // Its blocks would decode to more than readers take (keys long
            // and alike), or pass 32 MiB (a value that large): no delta;
            // lazy replicas replay the segments.
            self.delta_refused_at = lsn;
            return;
        };
        let size = bytes.len() as u64;
        let suffix_len = DeltaFooter::decode(&bytes[bytes.len() - 64..], size)
            .map_or(size, |f| f.suffix_len(size));
        if suffix_len > crate::snapshot::delta::MAX_LAZY_SUFFIX {
            // An index and filter some lazy readers would refuse to hold
            // (long keys that share no prefix): no delta, as above.
            self.delta_refused_at = lsn;
            return;
        }
        let key = catalog::delta_key(base_lsn, lsn, self.epoch);
        let crc32 = crate::crc::hash(&bytes);
        let delta = DeltaEntry {
            key: key.clone(),
            base_lsn,
            lsn,
            epoch: self.epoch,
            size,
            crc32,
            entries: changes.len() as u64,
            suffix_len,
            footer_crc32: Some(crate::snapshot::delta::footer_crc32(&bytes)),
            slots: None,
        };
        self.pend_delta(delta, bytes, snap.lsn);
    }

    /// Queues the delta `delta` for upload.
    fn pend_delta(&mut self, delta: DeltaEntry, bytes: Vec<u8>, snap_lsn: u64) {
        // Keys written at or before the snapshot are covered by it.
        self.touched.retain(|_, t| t.lsn > snap_lsn);
        let (key, lsn, size, crc32) = (delta.key.clone(), delta.lsn, delta.size, delta.crc32);
        self.note_digest(&key, &bytes);
        self.snapshot = Some(PendingSnapshot {
            entry: SnapshotEntry {
                key,
                lsn,
                epoch: self.epoch,
                size,
                crc32,
                entries: delta.entries,
                version: match delta.slots {
                    Some(_) => crate::snapshot::pointer::VERSION_POINTER,
                    None => crate::snapshot::delta::VERSION_DELTA,
                },
                suffix: None,
                footer_crc32: None,
            },
            bytes,
            up: Up::Waiting(0),
            delta: Some(delta),
        });
    }
}
