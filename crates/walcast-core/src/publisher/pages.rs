//! Catalog pages: moving the oldest inline segments into level-0 pages and
//! full levels into a page one level up, so the head stays small.

use std::collections::HashMap;

use crate::catalog::{self, Head, Page, PageRef, SegmentEntry};

use super::Publisher;

/// How many times [`PublisherConfig::inline_segments`](super::PublisherConfig::inline_segments)
/// (or `page_fanout`, when larger) the segments past the newest snapshot or
/// delta may number and still stay inline, up to [`MAX_KEPT_AFTER_CHAIN`].
const KEEP_AFTER_CHAIN: usize = 4;
/// The most segments past the chain kept inline for that reason: a head of
/// any `inline_segments` stays as far below
/// [`MAX_HEAD_BYTES`](crate::catalog::MAX_HEAD_BYTES) as without it.
const MAX_KEPT_AFTER_CHAIN: usize = 128;

/// A page to upload before the head that references it: (key, bytes).
pub(super) type PageUpload = (String, Vec<u8>);

impl Publisher {
    /// Pages out `h` until it holds at most `inline_segments` segments and
    /// at most `page_fanout` page references per level. Returns the new
    /// pages, to upload before the head that references them.
    ///
    /// Segments past the newest snapshot or delta stay inline when they
    /// number at most [`KEEP_AFTER_CHAIN`] times that many (at most
    /// [`MAX_KEPT_AFTER_CHAIN`], unless `inline_segments` is more): they are what a
    /// new lazy replica reads after the chain, and it finds them in the
    /// head, with no page to fetch first. (When there are more, as with
    /// snapshots and no deltas, a cold read reads pages anyway.)
    pub(super) fn page_out(&mut self, h: &mut Head) -> Vec<PageUpload> {
        let mut uploads = Vec::new();
        let fan = self.cfg.page_fanout.max(2);
        let floor = self.cfg.inline_segments.max(fan);
        // The end of the chain, when every segment past it fits the room.
        let keep_after = h.delta_lsn().filter(|&end| {
            let past = h.segments.iter().filter(|s| s.last_lsn > end).count();
            past <= (KEEP_AFTER_CHAIN * floor).min(MAX_KEPT_AFTER_CHAIN.max(floor))
        });
        while h.segments.len() > floor {
            if keep_after.is_some_and(|end| h.segments[fan - 1].last_lsn > end) {
                break;
            }
            // Pages carry no key filters: a segment paged out is read by
            // catching up, not by a cold read.
            let moved: Vec<SegmentEntry> = h
                .segments
                .drain(..fan)
                .map(|s| SegmentEntry { filter: None, ..s })
                .collect();
            let mut page = Page {
                format: catalog::FORMAT,
                level: 0,
                segments: moved,
                pages: Vec::new(),
                digests: Default::default(),
            };
            self.page_digests(h, &mut page);
            let r = self.page_ref(&page, 0, &mut uploads);
            h.pages.push(r);
        }
        loop {
            // Find a level with more than `fan` references (they are
            // contiguous). References wholly below `earliest_lsn` wait for
            // retention to retire them (unfolded pages among them break the
            // order of levels) and are left alone.
            let below = h
                .pages
                .iter()
                .take_while(|p| p.last_lsn < h.earliest_lsn)
                .count();
            let mut counts: HashMap<u32, usize> = HashMap::new();
            for p in &h.pages[below..] {
                *counts.entry(p.level).or_default() += 1;
            }
            let mut levels: Vec<u32> = counts
                .iter()
                // Pages above the format's deepest level would be refused:
                // references at that level stay in the head instead.
                .filter(|(l, c)| **c > fan && **l < catalog::MAX_PAGE_LEVEL)
                .map(|(l, _)| *l)
                .collect();
            levels.sort_unstable();
            // The first `fan` adjacent references of one level: a head
            // whose levels interleave (another writer's) pages only runs of
            // one level, as a page holds references of one level only.
            let run = levels.into_iter().find_map(|level| {
                h.pages[below..]
                    .windows(fan.max(1))
                    .position(|w| w.iter().all(|p| p.level == level))
                    .map(|i| (level, below + i))
            });
            let Some((level, start)) = run else {
                break;
            };
            let moved: Vec<PageRef> = h.pages.drain(start..start + fan).collect();
            let mut page = Page {
                format: catalog::FORMAT,
                level: level + 1,
                segments: Vec::new(),
                pages: moved,
                digests: Default::default(),
            };
            self.page_digests(h, &mut page);
            let r = self.page_ref(&page, level + 1, &mut uploads);
            h.pages.insert(start, r);
        }
        uploads
    }

    fn page_ref(&mut self, page: &Page, level: u32, uploads: &mut Vec<PageUpload>) -> PageRef {
        let (first, last, count) = if level == 0 {
            (
                page.segments[0].first_lsn,
                page.segments[page.segments.len() - 1].last_lsn,
                page.segments.len(),
            )
        } else {
            (
                page.pages[0].first_lsn,
                page.pages[page.pages.len() - 1].last_lsn,
                page.pages.len(),
            )
        };
        let bytes = match &self.cfg.signing_key {
            Some(k) => page.encode_signed(k),
            None => page.encode(),
        };
        let key = catalog::page_key(level, first, last, self.epoch);
        self.note_digest(&key, &bytes);
        let r = PageRef {
            key: key.clone(),
            level,
            first_lsn: first,
            last_lsn: last,
            count: count as u32,
            crc32: crc32fast::hash(&bytes),
        };
        // Only retention reads pages back.
        if self.cfg.retain_lsns.is_some() {
            self.page_cache.insert(key.clone(), page.clone());
        }
        uploads.push((key, bytes));
        r
    }
}
