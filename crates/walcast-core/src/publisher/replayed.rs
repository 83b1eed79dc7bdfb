//! After a restart: where the records replayed into the state sit in the
//! catalog's segments, so that pointer deltas can name them too.
//!
//! A segment's layout follows from its records alone: its header, then
//! each record's framing and payload in LSN order. At the claim the
//! publisher learns the catalog's segments past the snapshot: those the
//! head holds, and those of the level-0 pages it reads (pages above level 0
//! lead to them). A segment is placed only when the records replayed from
//! its first LSN to its last end exactly where its catalog entry's
//! `records_end` says; the keys of one not placed (a page that could not be
//! read, a layout that does not match) get value deltas, as before a
//! restart.

use std::collections::{BTreeMap, VecDeque};

use crate::catalog::{Page, PageRef, SegmentEntry};
use crate::error::{Error, ErrorKind};
use crate::io::GetResponse;
use crate::segment::{HEADER_LEN, RECORD_HEADER_LEN};

use super::{Action, Publisher, Req};

/// Most catalog pages read to place the replayed records (some 65,000
/// segments at the default fanout): past it, the rest stay unplaced.
const MAX_PLACE_PAGES: usize = 8192;

/// Most segments learnt (some 12 MB of layout): a hostile catalog's pages
/// may each name some 100,000; past it, the rest stay unplaced.
const MAX_PLACE_SEGMENTS: usize = 1 << 18;

/// Most of those page GETs out at once.
const MAX_PLACE_READS_IN_FLIGHT: usize = 4;

/// A catalog segment's range and where its records end.
#[derive(Debug, Clone, Copy)]
struct Layout {
    last: u64,
    epoch: u64,
    records_end: u64,
}

/// What a restarted publisher knows of the catalog's segments while it
/// replays its WAL.
#[derive(Debug, Default)]
pub(super) struct Placing {
    /// Segments past the snapshot whose key is the one their numbers name,
    /// by first LSN.
    layout: BTreeMap<u64, Layout>,
    /// LSNs after the snapshot up to the committed LSN.
    after: u64,
    upto: u64,
    /// Pages still to read, and how many are out or were asked for.
    queue: VecDeque<PageRef>,
    reading: usize,
    asked: usize,
    retry_at: u64,
    /// The segment the records being replayed fall in, and where the next
    /// one's framing starts (`None`: not placed, its replay began past its
    /// first record or its layout broke).
    cursor: Option<(u64, Layout, Option<u64>)>,
}

impl Placing {
    /// Whether pages are still to be read.
    fn busy(&self) -> bool {
        !self.queue.is_empty() || self.reading > 0
    }

    fn learn(&mut self, s: &SegmentEntry) {
        if s.last_lsn > self.after
            && s.first_lsn <= self.upto
            && self.layout.len() < MAX_PLACE_SEGMENTS
            && s.key == crate::catalog::segment_key(s.epoch, s.first_lsn, s.last_lsn)
        {
            self.layout.insert(
                s.first_lsn,
                Layout {
                    last: s.last_lsn,
                    epoch: s.epoch,
                    records_end: s.records_end,
                },
            );
        }
    }

    fn want(&mut self, r: &PageRef) {
        if r.last_lsn > self.after && r.first_lsn <= self.upto && self.asked < MAX_PLACE_PAGES {
            self.asked += 1;
            self.queue.push_back(r.clone());
        }
    }
}

impl Publisher {
    /// At the claim of a dataset with pointer deltas: learns the head's
    /// segments past its snapshot and asks for the pages that hold the
    /// rest.
    pub(super) fn start_placing(&mut self) {
        self.placing = Placing::default();
        let Some(h) = self.head.as_ref() else {
            return;
        };
        let (true, true, Some(_), Some(snap)) = (
            self.cfg.pointer_deltas,
            self.deltas_on(),
            self.state.as_ref(),
            h.snapshot.as_ref(),
        ) else {
            return;
        };
        let mut p = Placing {
            after: snap.lsn,
            upto: h.committed_lsn,
            ..Placing::default()
        };
        for s in &h.segments {
            p.learn(s);
        }
        let inline_first = h.segments.first().map_or(u64::MAX, |s| s.first_lsn);
        for r in h.pages.iter().filter(|r| r.first_lsn < inline_first) {
            p.want(r);
        }
        self.placing = p;
    }

    /// Whether replay must wait for the pages that place its records.
    pub(super) fn placing_waits(&self) -> bool {
        self.placing.busy() && self.next_push <= self.committed_lsn()
    }

    /// The next page GET placing asked for.
    pub(super) fn drive_place_reads(&mut self, now: u64, wake: &mut u64) -> Option<Action> {
        let p = &mut self.placing;
        if p.queue.is_empty() || p.reading >= MAX_PLACE_READS_IN_FLIGHT {
            return None;
        }
        if p.retry_at > now {
            *wake = (*wake).min(p.retry_at);
            return None;
        }
        let r = p.queue.pop_front()?;
        p.reading += 1;
        let key = r.key.clone();
        Some(self.get(Req::PlaceRead(r), key))
    }

    pub(super) fn on_place_read(&mut self, now: u64, r: PageRef, resp: GetResponse) {
        self.placing.reading = self.placing.reading.saturating_sub(1);
        if self.next_push > self.committed_lsn() {
            // The replay is over: nothing is left to place.
            self.placing = Placing::default();
            return;
        }
        let page = match resp {
            GetResponse::Ok { body, .. } => {
                Page::decode(&body, &r).map_err(|e| Error::decode(e).with_object(&r.key))
            }
            other => {
                Err(Error::new(ErrorKind::Unavailable, format!("{other:?}")).with_object(&r.key))
            }
        };
        match page {
            Ok(page) => {
                self.attempts.remove(&r.key);
                for s in &page.segments {
                    self.placing.learn(s);
                }
                for c in &page.pages {
                    self.placing.want(c);
                }
            }
            Err(e) => {
                let n = self.attempts.get(&r.key).copied().unwrap_or(0) + 1;
                let d = self.backoff(&r.key, e);
                if n < self.cfg.max_attempts.max(1) {
                    self.placing.retry_at = now + d;
                    self.placing.queue.push_front(r);
                } else {
                    // Its segments stay unplaced: their keys get value deltas.
                    self.attempts.remove(&r.key);
                }
            }
        }
    }

    /// The offset of the replayed record `lsn` (of `len` payload bytes) in
    /// the catalog's segment that holds it, or 0 when not known. Its
    /// segment's range is placed ([`Publisher::pointer`] names its records)
    /// once the segment's last record was replayed where its entry says.
    pub(super) fn place_replayed(&mut self, lsn: u64, len: u64) -> u32 {
        let p = &mut self.placing;
        if p.cursor.is_none_or(|(_, l, _)| lsn > l.last) {
            p.cursor = p
                .layout
                .range(..=lsn)
                .next_back()
                .filter(|(_, l)| l.last >= lsn && l.epoch <= self.epoch)
                .map(|(&first, &l)| (first, l, (first == lsn).then_some(HEADER_LEN)));
        }
        let Some((first, l, Some(at))) = p.cursor else {
            return 0;
        };
        let end = at + RECORD_HEADER_LEN + len;
        let next = (end <= l.records_end).then_some(end);
        p.cursor = Some((first, l, next));
        if lsn == l.last && next == Some(l.records_end) {
            self.sealed_ranges.insert(first, (l.last, l.epoch));
        }
        if lsn >= p.upto {
            // The replay is over: the layout is not needed any more.
            p.layout.clear();
        }
        u32::try_from(at).unwrap_or(0)
    }
}
