//! Deferred segments: segments past the delta chain that carry a key
//! filter in the head, counted as applied without a GET; a read fetches
//! (and replays into the overlay) those whose filter may hold its key.

use super::*;

impl Lazy {
    /// Queues the deferred segments a read of `key` must replay first:
    /// those newer than the overlay's write of it whose filter may hold it
    /// (`all`: every one, for a scan). `Ok(true)`: some are on their way.
    pub(super) fn want_deferred(&mut self, key: &[u8], all: bool) -> Result<bool, Error> {
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
            self.want_checked(object, need, key)?;
            any = true;
        }
        Ok(any)
    }

    /// Takes the entries `segments` (a newer head's) gives the deferred
    /// segments, where they differ: a head that lied about a segment (its
    /// filter, size or checksum), then the truth, must not leave the lie
    /// deciding what reads fetch and how they verify it.
    pub(in crate::replica) fn refresh_deferred(
        &mut self,
        segments: &[crate::catalog::SegmentEntry],
    ) {
        for u in &mut self.deferred {
            if let Some(e) = segments
                .iter()
                .find(|e| e.key == u.entry.key && **e != u.entry)
            {
                u.entry = e.clone();
                u.start = e.start_for(0);
            }
        }
    }

    /// Whether `key` names a deferred segment.
    pub(super) fn is_deferred(&self, key: &str) -> bool {
        self.deferred.iter().any(|u| u.entry.key == key)
    }
}

impl Replica {
    /// Whether the planned unit `u` may be counted as applied without a
    /// GET (see [`Lazy::deferred`]): lazy KV mode over a block-indexed base,
    /// no records to report, a key filter from the catalog, a size a
    /// replica reads (`MAX_SEGMENT_BYTES`), no copy in the
    /// head, room to hold it, and no read waiting: none of its GETs out,
    /// and none answered since reads last ran. Else a head landing while a
    /// read waits (or between an answer and the read's next run) could
    /// defer a segment the read must then fetch, one more round each time:
    /// a read of a key every commit writes could wait for ever. The
    /// segments then come in as when catching up.
    pub(in crate::replica) fn deferrable(&self, u: &crate::replica::plan::Unit) -> bool {
        let Some(l) = self.lazy.as_ref() else {
            return false;
        };
        self.cfg.mode == crate::replica::Mode::Kv
            && !self.cfg.emit_records
            && u.entry.filter.is_some()
            // One a read could never fetch is refused as when catching up.
            && u.entry.size <= crate::catalog::MAX_SEGMENT_BYTES
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
    pub(in crate::replica) fn defer_front(&mut self) {
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
    pub(super) fn on_deferred(&mut self, now: u64, job: BlockJob, i: usize, resp: GetResponse) {
        let Some(lazy) = self.lazy.as_ref() else {
            return;
        };
        let u = &lazy.deferred[i];
        let key = job.snapshot.clone();
        let filter = u.entry.filter.clone();
        let result = match resp {
            GetResponse::Ok { body, range, .. } => self.verify_segment(u, body, range),
            other => Err(crate::replica::fetch::unavailable(&other).with_object(&key)),
        };
        let Some(lazy) = self.lazy.as_mut() else {
            return;
        };
        // Writes at or below the chain's end (without a base: the whole
        // state's LSN) are held there already.
        let chain_end = lazy.base.as_ref().map_or(lazy.state_lsn, |b| b.chain_end);
        let result = result.and_then(|v| {
            for (&(s, e), lsn) in v.records.iter().zip(v.first..) {
                let ops = crate::batch::Batch::parse(&v.bytes[s as usize..e as usize])
                    .map_err(|d| Error::decode(d).with_object(&key).with_lsn(lsn))?;
                // The replica skipped this segment for every read whose key
                // the head's filter ruled out: a filter that leaves out a
                // key the segment writes would have served stale values.
                // (What was applied before the lie is the segment's own
                // verified writes: the overlay keeps a key's newest write.)
                let lie = filter.as_ref().is_some_and(|f| {
                    ops.iter().any(|op| {
                        let (crate::batch::OpRef::Put(k, _) | crate::batch::OpRef::Delete(k)) = op;
                        !f.may_contain(k)
                    })
                });
                if lie {
                    return Err(Error::new(
                        ErrorKind::Data,
                        "the segment writes a key its head filter lacks",
                    )
                    .with_object(&key)
                    .with_lsn(lsn));
                }
                if lsn > chain_end {
                    lazy.apply(lsn, ops);
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
                lazy.fail(key.clone(), job.need, e.clone());
                if e.kind() == ErrorKind::NotFound {
                    self.read_missing(now, &key, e);
                } else {
                    self.distrust_head(now, &e);
                    self.read_failure(&key, e);
                }
            }
        }
    }
}
