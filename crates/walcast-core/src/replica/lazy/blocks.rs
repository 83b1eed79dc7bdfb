//! The GETs lazy reads wait for: queued jobs, their requests, and their
//! answers (verified, fed to the snapshot or delta readers).

use super::*;
use crate::snapshot::delta::DELTA_FOOTER_LEN;

impl Lazy {
    /// [`want_in`](Self::want_in), unless the GET failed last time: its
    /// error goes to this read.
    pub(super) fn want_checked(
        &mut self,
        object: String,
        need: Need,
        key: &[u8],
    ) -> Result<(), Error> {
        // A delta's index and filter are held for as long as its chain,
        // besides the cache: each at most the cache's bytes (4 MiB at
        // least), so that a store cannot make four deltas hold 256 MiB.
        let most = self.cache_bytes.max(MAX_INDEX_FLOOR);
        if let Need::Suffix(n) = need {
            if n > most {
                return Err(Error::new(
                    ErrorKind::Data,
                    format!("index and filter of {n} bytes, over the cache's {most}"),
                )
                .with_object(object));
            }
        }
        match self.take_failure(&object, &need) {
            Some(e) => Err(e),
            None => {
                self.want_in(object, need, key, false);
                Ok(())
            }
        }
    }

    pub(super) fn want_in(&mut self, object: String, need: Need, key: &[u8], ahead: bool) {
        self.want_job(BlockJob {
            snapshot: object,
            need,
            key: key.to_vec(),
            ahead,
            record: None,
        });
    }

    /// Asks for the record `p` names, unless its GET failed last time: its
    /// error goes to this read.
    pub(super) fn want_record(&mut self, p: Pointer, key: &[u8]) -> Result<(), Error> {
        let object = p.segment_key();
        let r = p.range();
        let need = Need::Range {
            start: r.start,
            end: r.end,
        };
        if let Some(e) = self.take_failure(&object, &need) {
            return Err(e);
        }
        self.want_job(BlockJob {
            snapshot: object,
            need,
            key: key.to_vec(),
            ahead: false,
            record: Some(p),
        });
        Ok(())
    }

    fn want_job(&mut self, job: BlockJob) {
        match self
            .wanted
            .iter_mut()
            .chain(&mut self.inflight)
            .find(|j| j.same(&job))
        {
            // A block a read waits for, asked or read ahead already: its
            // failure is then kept for reads.
            Some(j) => j.ahead &= job.ahead,
            None => self.wanted.push(job),
        }
    }

    /// Feeds a delta's bytes: its suffix (index and filter), a data block,
    /// or (for scans) the whole object.
    pub(super) fn feed_delta(&mut self, job: &BlockJob, bytes: &[u8]) -> Result<bool, DecodeError> {
        let budget = self.delta_cache_bytes();
        let most = 2 * self.cache_bytes.max(1 << 20);
        let Some(base) = self.base.as_mut() else {
            return Ok(false);
        };
        let Some(i) = base.deltas.iter().position(|d| d.entry.key == job.snapshot) else {
            return Ok(false);
        };
        let held: u64 = base.deltas.iter().map(|d| d.cached).sum();
        let deltas = &mut base.deltas;
        let d = &mut deltas[i];
        let size = d.entry.size;
        match job.need {
            Need::Suffix(_) => {
                let crc = crate::snapshot::delta::footer_crc32(bytes);
                if d.entry.footer_crc32.is_some_and(|c| c != crc) {
                    return Err(crate::codec::invalid(
                        "delta footer",
                        size.saturating_sub(DELTA_FOOTER_LEN),
                        "its CRC-32 is not the catalog's",
                    ));
                }
                let idx = match d.entry.slots {
                    Some(_) => {
                        DeltaIndex::decode_pointer_suffix(bytes, size, d.entry.lsn, d.entry.epoch)?
                    }
                    None => DeltaIndex::decode_suffix(bytes, size)?,
                };
                // The file must be the one the catalog names, not another
                // of the same size (a dataset started over at the prefix),
                // and a pointer delta's pages those the head states.
                let f = idx.footer();
                let pages = d.entry.slots.map_or((0, 0), |s| (s.pages, s.page_bytes));
                if f.base_lsn != d.entry.base_lsn
                    || f.entry_count != d.entry.entries
                    || idx.pointer_pages() != pages
                {
                    return Err(crate::codec::invalid(
                        "delta footer",
                        size - DELTA_FOOTER_LEN,
                        format!(
                            "base LSN {} and {} entries, but the catalog says {} and {}",
                            f.base_lsn, f.entry_count, d.entry.base_lsn, d.entry.entries
                        ),
                    ));
                }
                d.index = Some(idx);
            }
            Need::Range { start: 0, end } if end == size && d.entry.slots.is_some() => {
                // (A pointer delta is never loaded whole.)
                return Ok(true);
            }
            Need::Range { start: 0, end } if end == size => {
                if crate::crc::hash(bytes) != d.entry.crc32 {
                    return Err(crate::codec::invalid(
                        "delta snapshot",
                        0,
                        "the file's crc32 is not the catalog's",
                    ));
                }
                if d.index.is_none() {
                    let suffix = (size - d.entry.suffix_len.min(size)) as usize;
                    let tail = bytes.get(suffix..).unwrap_or_default();
                    d.index = Some(DeltaIndex::decode_suffix(tail, size)?);
                }
                d.blocks.insert(u64::MAX, bytes.to_vec());
            }
            Need::Range { start, .. } => {
                match d.entry.slots {
                    // A slot page: the one the read's key hashes to.
                    Some(sp) if start < slot_pages_end(sp) => {
                        let (page, r) =
                            crate::snapshot::pointer::page_range(sp.pages, sp.page_bytes, &job.key);
                        if r.start != start {
                            return Err(crate::codec::invalid(
                                "slot page",
                                start,
                                "is not the key's page",
                            ));
                        }
                        d.page_of().lookup(bytes, page, &job.key)?;
                    }
                    _ => {
                        let Some(idx) = &d.index else {
                            return Ok(true);
                        };
                        // Which block it must be comes from the verified
                        // index: the one holding the read's key, or a
                        // scan's place.
                        match idx.block_from(&job.key) {
                            Some((h, ..)) if h.offset == start => {
                                idx.lookup(&h, bytes, &job.key)?;
                            }
                            _ => return Ok(true),
                        }
                    }
                }
                // The deltas' data blocks share a quarter of the cache (the
                // snapshot's LRU keeps the rest of the bound): past it, each
                // delta keeps the blocks it got last, so that reads needing
                // one block of each, or blocks of the same delta, find what
                // they wait for when they run.
                // As many of each one's last blocks are kept as hold at
                // most twice what the GETs out at once may bring (as the
                // snapshot's fresh blocks), and at least the last: a store
                // of 32 MiB blocks does not make four deltas hold sixteen
                // of them, and blocks answered together all stay.
                let len = bytes.len() as u64;
                if held + len > budget {
                    let mut n = RECENT_BLOCKS;
                    loop {
                        deltas.iter_mut().for_each(|d| d.shed(n));
                        let kept: u64 = deltas.iter().map(|d| d.cached).sum();
                        if n == 1 || kept <= most {
                            break;
                        }
                        n -= 1;
                    }
                }
                let d = &mut deltas[i];
                if let Some(old) = d.blocks.insert(start, bytes.to_vec()) {
                    d.cached -= old.len() as u64;
                }
                d.cached += bytes.len() as u64;
                d.recent[d.puts % RECENT_BLOCKS] = start;
                d.puts += 1;
            }
        }
        Ok(true)
    }

    /// Records the failure of the GET of `need` from `object` for the next
    /// read that needs it: the newest per block, the oldest dropped past
    /// [`MAX_FAILED`].
    pub(super) fn fail(&mut self, object: String, need: Need, err: Error) {
        self.take_failure(&object, &need);
        if self.failed.len() >= MAX_FAILED {
            self.failed.remove(0);
        }
        self.failed.push((object, need, err));
    }

    /// The failure of the GET of `need` from `object`, reported once.
    pub(super) fn take_failure(&mut self, object: &str, need: &Need) -> Option<Error> {
        let i = self
            .failed
            .iter()
            .position(|(o, n, _)| o == object && n == need)?;
        Some(self.failed.swap_remove(i).2)
    }

    /// [`take_failure`](Self::take_failure) for the base snapshot.
    pub(super) fn take_base_failure(&mut self, need: &Need) -> Option<Error> {
        let object = self.base.as_ref()?.entry.key.clone();
        self.take_failure(&object, need)
    }

    /// Asks for a block of the base snapshot, read ahead of a scan's need
    /// when `ahead` (its failure is not kept for reads).
    pub(super) fn want(&mut self, need: Need, key: &[u8], ahead: bool) {
        let Some(b) = &self.base else { return };
        self.want_in(b.entry.key.clone(), need, key, ahead);
    }
}

/// Where a pointer delta's slot pages end.
pub(super) fn slot_pages_end(sp: crate::catalog::SlotPages) -> u64 {
    crate::snapshot::HEADER_LEN + u64::from(sp.pages) * u64::from(sp.page_bytes)
}

impl Replica {
    /// The next block GET a lazy read is waiting for, if any, for a reader
    /// that drives its own reads beside the loop that drives
    /// [`poll`](Self::poll) (which also issues them): perform it and pass the
    /// outcome to [`handle_response`](Self::handle_response).
    pub fn poll_read_fetch(&mut self) -> Option<crate::io::GetRequest> {
        match self.next_block_fetch()? {
            crate::replica::Action::Fetch(req) => Some(req),
            _ => None,
        }
    }

    /// Forgets a GET from [`poll_read_fetch`](Self::poll_read_fetch) whose
    /// answer will never come: the read that performed it ended first (it
    /// returned, or its caller dropped it). The next read that needs that
    /// block or segment asks for it again, instead of waiting for an answer
    /// in flight. Ids of other requests, or of answered ones, are ignored.
    pub fn abandon_read_fetch(&mut self, id: crate::io::RequestId) {
        self.block_gets.remove(id.0);
        self.segment_gets.remove(id.0);
        if !matches!(self.pending.get(id.0), Some(crate::replica::Job::Block(_))) {
            return;
        }
        if let (Some(crate::replica::Job::Block(job)), Some(lazy)) =
            (self.pending.remove(id.0), self.lazy.as_mut())
        {
            // A GET of the same block sent again (after a jump) stays out.
            let again = self
                .pending
                .iter()
                .any(|(_, j)| matches!(j, crate::replica::Job::Block(b) if b.same(&job)));
            if !again {
                lazy.inflight.retain(|j| !j.same(&job));
            }
            lazy.read_due = false;
            lazy.read_pending = false;
        }
    }

    /// The next block GET lazy reads are waiting for, if any.
    ///
    /// Whole deferred segments go out at most `max_inflight` at a time (as
    /// when catching up), and snapshot and delta blocks at most
    /// [`BLOCKS_PER_INFLIGHT`] times that, however many reads wait: the
    /// rest wait their turn. A GET that may bring a whole object (see
    /// [`Lazy::takes_whole`]) goes out only while no other GET of that
    /// object is out, so a server that ignores Range sends one whole copy
    /// at a time, not one per waiting read.
    pub(in crate::replica) fn next_block_fetch(&mut self) -> Option<crate::replica::Action> {
        let max_inflight = self.cfg.max_inflight.max(1);
        let lazy = self.lazy.as_mut()?;
        // Every block GET out counts, those of jobs a jump or a reset
        // forgot included, at the bytes its answer may bring.
        let blocks = self.block_gets.len();
        let bytes: u64 = self.block_gets.iter().map(|(_, b)| b).sum();
        let segments = self.segment_gets.len();
        let i = lazy.wanted.iter().position(|j| {
            if j.record.is_none() && lazy.is_deferred(&j.snapshot) {
                return segments < max_inflight;
            }
            blocks < max_inflight.max(2) * BLOCKS_PER_INFLIGHT
                // What the answers out may bring stays within the cache's
                // bytes (at least 1 MiB), past one GET: a file of 32 MiB
                // blocks gets one out at a time.
                && (blocks == 0 || bytes + lazy.job_bytes(j) <= lazy.cache_bytes.max(1 << 20))
                && !(j.record.is_none()
                    && lazy.takes_whole(&j.snapshot)
                    && lazy.inflight.iter().any(|f| f.snapshot == j.snapshot))
        })?;
        let job = lazy.wanted.remove(i);
        lazy.inflight.push(job.clone());
        let range = job.range();
        // Its max_bytes is the object's size when it fits the cache
        // (`Lazy::max_bytes`): a server that ignores Range answers with the
        // whole object.
        let key = job.snapshot.clone();
        // A deferred segment is read whole, as catching up would.
        let range = (job.record.is_some() || !lazy.is_deferred(&key)).then_some(range);
        let block = range.is_some();
        let action = self.fetch(Job::Block(job), key, range, None);
        if let crate::replica::Action::Fetch(req) = &action {
            if block {
                self.block_gets.insert(req.id.0, req.max_bytes);
            } else {
                self.segment_gets.insert(req.id.0, ());
            }
        }
        Some(action)
    }

    pub(in crate::replica) fn on_block(&mut self, now: u64, job: BlockJob, resp: GetResponse) {
        let Some(lazy) = self.lazy.as_mut() else {
            return;
        };
        // An answer for a job no longer in flight is stale: the replica
        // left its object (a jump or a new chain dropped the job) and reads
        // ask again for what they still need.
        let Some(at) = lazy.inflight.iter().position(|j| j.same(&job)) else {
            return;
        };
        // Asked ahead of need when sent, a read may have come to wait for it.
        let job = lazy.inflight.remove(at);
        lazy.read_due = lazy.read_pending;
        if let Some(i) = lazy
            .deferred
            .iter()
            .position(|u| u.entry.key == job.snapshot)
            .filter(|_| job.record.is_none())
        {
            self.on_deferred(now, job, i, resp);
            return;
        }
        let Some(base) = lazy.base.as_mut() else {
            return;
        };
        // A record's GET takes its range: the whole segment, never the
        // record's end, is no answer for it.
        let size = match job.record {
            Some(p) => p.range().end,
            None => base.object_size(&job.snapshot),
        };
        let is_delta = base.entry.key != job.snapshot;
        if size == 0 {
            return; // an answer for a snapshot this replica left
        }
        let key = job.snapshot.clone();
        let data_err = |msg: String| Error::new(ErrorKind::Data, msg).with_object(&key);
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
                        lazy.ranged = true;
                        Ok(&body[..])
                    }
                    None if body.len() as u64 == size => {
                        Ok(&body[want_start as usize..want_end as usize])
                    }
                    None => {
                        // A store that answered ranges before (a CDN that
                        // honours Range only on a cache hit): the next GET
                        // of an object that fits the cache takes a whole
                        // answer again.
                        lazy.ranged = false;
                        Err(data_err(format!(
                            "a whole-object answer for bytes {want_start}..{want_end}: \
                             the server ignores Range"
                        )))
                    }
                    _ => Err(data_err(format!(
                        "answer for bytes {want_start}..{want_end} does not match the request"
                    ))),
                };
                bytes.and_then(|b| {
                    if let Some(p) = job.record {
                        crate::snapshot::pointer::resolve(b, &p, &job.key)
                            .map_err(|e| Error::decode(e).with_object(&key))?;
                        lazy.keep_record(key.clone(), p.offset, b.to_vec());
                        return Ok(());
                    }
                    if is_delta {
                        return lazy
                            .feed_delta(&job, b)
                            .map(|_| ())
                            .map_err(|e| Error::decode(e).with_object(&key));
                    }
                    let Some(base) = lazy.base.as_mut() else {
                        return Ok(());
                    };
                    let fed = match job.need {
                        Need::Suffix(_) => base.snap.feed_suffix(b),
                        Need::Range { start, .. } => base.snap.feed_range(start, b, &job.key),
                    };
                    fed.map_err(|e| Error::decode(e).with_object(&key))
                })
            }
            GetResponse::NotFound => {
                let e = Error::new(
                    ErrorKind::NotFound,
                    "object named by the catalog is missing",
                )
                .with_object(&key);
                lazy.fail(key.clone(), job.need, e.clone());
                self.read_missing(now, &key, e);
                return;
            }
            other => Err(crate::replica::fetch::unavailable(&other).with_object(&key)),
        };
        match result {
            Ok(()) => {
                // A failure kept from an earlier GET of the block is old news.
                lazy.take_failure(&key, &job.need);
                let delta_fetches = u64::from(is_delta || job.record.is_some());
                lazy.blocks_fetched = lazy
                    .base
                    .as_ref()
                    .map_or(lazy.blocks_fetched, |b| b.snap.fetched_blocks)
                    .max(lazy.blocks_fetched + delta_fetches);
                self.success(&key);
            }
            Err(e) => {
                if !job.ahead {
                    lazy.fail(key.clone(), job.need, e.clone());
                }
                self.distrust_head(now, &e);
                self.read_failure(&key, e);
            }
        }
    }
}
