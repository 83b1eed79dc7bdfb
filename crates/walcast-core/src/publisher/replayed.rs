//! After a restart: where the records replayed into the state sit in the
//! catalog's segments, so that pointer deltas can name them too.
//!
//! A segment's layout follows from its records alone: its header, then
//! each record's framing and payload in LSN order. At the claim the
//! publisher learns the catalog's segments past the snapshot: those the
//! head holds, and those of the level-0 pages it reads (pages above level 0
//! lead to them). A segment is placed only when the records replayed from
//! its first LSN to its last start where its entry's index sample says and
//! end exactly where its `records_end` says; the keys of one not placed (a
//! page that could not be read, a layout that does not match) get value
//! deltas, as before a restart.
//!
//! The replay of the records after the snapshot waits for the page reads,
//! which go out while the records before it are replayed; it waits no
//! longer than the first failed read or `MAX_PLACE_BYTES` of pages:
//! placing is given up then, quietly, and the replay goes on.

use std::collections::{BTreeMap, VecDeque};

use crate::catalog::{Page, PageRef, SegmentEntry};
use crate::io::GetResponse;
use crate::segment::{HEADER_LEN, RECORD_HEADER_LEN};

use super::{Action, Publisher, Req};

/// Most catalog pages read to place the replayed records, of every level
/// (some 60,000 segments at the default fanout): past it, the rest stay
/// unplaced.
const MAX_PLACE_PAGES: usize = 8192;

/// Most bytes of pages read to place them: past it, placing is given up.
const MAX_PLACE_BYTES: u64 = 64 << 20;

/// Most segments learnt (with their index samples, some 20 MB at most): a
/// hostile catalog's pages may each name some 100,000; past it, the rest
/// stay unplaced.
const MAX_PLACE_SEGMENTS: usize = 1 << 16;

/// Most of those page GETs out at once.
const MAX_PLACE_READS_IN_FLIGHT: usize = 4;

/// A catalog segment's range, its index sample and where its records end.
#[derive(Debug, Clone)]
struct Layout {
    last: u64,
    epoch: u64,
    records_end: u64,
    index: Box<[(u64, u64)]>,
}

/// What a restarted publisher knows of the catalog's segments while it
/// replays its WAL.
#[derive(Debug, Default)]
pub(super) struct Placing {
    /// Segments past the snapshot, by first LSN.
    layout: BTreeMap<u64, Layout>,
    /// LSNs after the snapshot up to the committed LSN.
    after: u64,
    upto: u64,
    /// Pages still to read, and how many are out or were asked for, and
    /// the bytes read.
    queue: VecDeque<PageRef>,
    reading: usize,
    asked: usize,
    bytes: u64,
    /// The segment the records being replayed fall in: its first LSN, its
    /// layout, and where the next record's framing starts (`None`: not
    /// placed, its replay began past its first record or its layout broke).
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
        {
            self.layout.insert(
                s.first_lsn,
                Layout {
                    last: s.last_lsn,
                    epoch: s.epoch,
                    records_end: s.records_end,
                    index: s.index.iter().map(|e| (e.lsn, e.offset)).collect(),
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

    /// Stops reading pages: what was learnt still places its segments.
    fn give_up(&mut self) {
        self.queue.clear();
    }
}

impl Publisher {
    /// At the claim of a dataset whose deltas may point at records: learns
    /// the head's segments past its snapshot and asks for the pages that
    /// hold the rest.
    pub(super) fn start_placing(&mut self) {
        self.placing = Placing::default();
        let Some(h) = self.head.as_ref() else {
            return;
        };
        let indexed = !matches!(self.cfg.snapshot_format, super::SnapshotFormat::Chunked);
        let (true, true, true, Some(_), Some(snap)) = (
            self.cfg.pointer_deltas,
            indexed,
            self.deltas_on(),
            self.state.as_ref(),
            // (Over a version 1 snapshot, deltas hold values.)
            h.snapshot.as_ref().filter(|s| s.version != 1),
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

    /// Whether the replay waits for the pages that place its records: those
    /// after the snapshot do.
    pub(super) fn placing_waits(&self) -> bool {
        self.placing.busy()
            && self.next_push > self.placing.after
            && self.next_push <= self.committed_lsn()
    }

    /// The next page GET placing asked for.
    pub(super) fn drive_place_reads(&mut self) -> Option<Action> {
        let p = &mut self.placing;
        if p.reading >= MAX_PLACE_READS_IN_FLIGHT {
            return None;
        }
        let r = p.queue.pop_front()?;
        p.reading += 1;
        let key = r.key.clone();
        Some(self.get(Req::PlaceRead(r), key))
    }

    pub(super) fn on_place_read(&mut self, r: PageRef, resp: GetResponse) {
        if self.next_push > self.committed_lsn() {
            // The replay is over: nothing is left to place.
            self.placing = Placing::default();
            return;
        }
        let p = &mut self.placing;
        p.reading = p.reading.saturating_sub(1);
        let page = match resp {
            GetResponse::Ok { body, .. } => {
                p.bytes += body.len() as u64;
                Page::decode(&body, &r).ok()
            }
            _ => None,
        };
        match page {
            Some(page) if p.bytes <= MAX_PLACE_BYTES => {
                for s in &page.segments {
                    p.learn(s);
                }
                for c in &page.pages {
                    p.want(c);
                }
            }
            // A page that cannot be read now, or too many bytes of them:
            // the replay does not wait. The segments not learnt stay
            // unplaced and their keys get value deltas; publishing goes on
            // as it would without placing.
            _ => p.give_up(),
        }
    }

    /// The offset of the replayed record `lsn` (of `len` payload bytes) in
    /// the catalog's segment that holds it, or 0 when not known. Its
    /// segment's range is placed ([`Publisher::pointer`] names its records)
    /// once the segment's last record was replayed where its entry says.
    pub(super) fn place_replayed(&mut self, lsn: u64, len: u64) -> u32 {
        let epoch = self.epoch;
        let p = &mut self.placing;
        if p.cursor.as_ref().is_none_or(|(_, l, _)| lsn > l.last) {
            p.cursor = p
                .layout
                .range(..=lsn)
                .next_back()
                .filter(|(_, l)| l.last >= lsn && l.epoch <= epoch)
                .map(|(&first, l)| (first, l.clone(), (first == lsn).then_some(HEADER_LEN)));
        }
        let Some((first, l, next)) = p.cursor.as_mut() else {
            return 0;
        };
        // The record must start where the entry's index sample says.
        let at = next.filter(|&at| {
            l.index
                .iter()
                .find(|&&(x, _)| x == lsn)
                .is_none_or(|&(_, off)| off == at)
        });
        let Some(at) = at else {
            *next = None;
            return 0;
        };
        let end = at + RECORD_HEADER_LEN + len;
        *next = (end <= l.records_end).then_some(end);
        if lsn == l.last && *next == Some(l.records_end) {
            self.sealed_ranges.insert(*first, (l.last, l.epoch));
        }
        if lsn >= p.upto {
            // The replay is over: the layout is not needed any more.
            p.layout.clear();
            p.cursor = None;
        }
        u32::try_from(at).unwrap_or(0)
    }
}
