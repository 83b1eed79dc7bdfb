//! The catalog walk: which segments cover the LSNs after the applied one,
//! found in the head's inline segments or by descending catalog pages, and
//! the cache of verified pages.

use crate::catalog::{Head, Page, PageRef, SegmentEntry};
use crate::error::Error;
use crate::io::GetResponse;
use crate::segment::IndexEntry;

use super::fetch::unavailable;
use super::{Job, Replica};

/// One segment's part of the plan: the LSNs `from..=entry.last_lsn`.
#[derive(Debug, Clone)]
pub(super) struct Unit {
    pub(super) entry: SegmentEntry,
    pub(super) start: IndexEntry,
    /// First LSN to apply from this unit.
    pub(super) from: u64,
    /// The digest the signed catalog records for the segment (pinned only).
    pub(super) digest: Option<String>,
}

impl Replica {
    pub(super) fn clear_plan(&mut self) {
        self.plan.clear();
        self.ready.clear();
        self.inflight_units.clear();
        self.retry_at.clear();
        self.page_wanted = None;
        self.page_inflight = false;
        self.plan_next = self.applied + 1;
        // Responses to dropped jobs are ignored. The head, a bootstrap in
        // progress and lazy block reads do not depend on the plan: their
        // requests stay (a bootstrap waits for its answer).
        self.pending
            .retain(|_, j| matches!(j, Job::Head | Job::Block(_) | Job::Snapshot { .. }));
    }

    /// The index of the cached page verified against `r`. A cached page
    /// counts only for the very reference it was verified against: a page
    /// that names itself (or another page's key) must be fetched and
    /// checked against this reference.
    fn cached(&self, r: &PageRef) -> Option<usize> {
        self.pages.iter().position(|(pr, _)| pr == r)
    }

    /// Finds at most `max` entries from LSN `lsn` on: from the inline
    /// segments, or by descending cached pages. Returns `Err(page)` when a
    /// page must be fetched. At most `max` are copied, however many a page
    /// holds (a hostile page may hold some 100,000: copying the rest of
    /// the page for every few planned would take time quadratic in them).
    fn locate(
        &self,
        head: &Head,
        lsn: u64,
        max: usize,
    ) -> Result<Option<Vec<SegmentEntry>>, PageRef> {
        // Entries are validated ascending and contiguous: a binary search,
        // not a scan per call (a walk through a page of many entries, a few
        // planned at a time, would be quadratic). A page reference found
        // below costs a GET of its page, which outweighs scanning for it.
        let from = |entries: &[SegmentEntry]| {
            let i = entries.partition_point(|s| s.last_lsn < lsn);
            let rest = &entries[i..];
            rest[..rest.len().min(max)].to_vec()
        };
        if head.segments.first().is_some_and(|s| s.first_lsn <= lsn)
            && head.segments.last().is_some_and(|s| s.last_lsn >= lsn)
        {
            return Ok(Some(from(&head.segments)));
        }
        let mut refs: &[PageRef] = &head.pages;
        loop {
            let Some(r) = refs
                .iter()
                .find(|p| p.first_lsn <= lsn && lsn <= p.last_lsn)
            else {
                return Ok(None);
            };
            let Some(i) = self.cached(r) else {
                return Err(r.clone());
            };
            let page = &self.pages[i].1;
            if page.level == 0 {
                return Ok(Some(from(&page.segments)));
            }
            refs = &page.pages;
        }
    }

    pub(super) fn extend_plan(&mut self) {
        if self.dataset.is_none() {
            return;
        }
        let Some(head) = self.head.take() else {
            return;
        };
        // Keep a bounded look-ahead.
        while self.plan.len() < self.cfg.max_inflight * 2
            && self.plan_next <= self.committed.min(head.committed_lsn)
            && self.page_wanted.is_none()
        {
            let room = self.cfg.max_inflight * 2 - self.plan.len();
            match self.locate(&head, self.plan_next, room) {
                Ok(Some(entries)) => {
                    let before = self.plan_next;
                    for e in entries {
                        if e.last_lsn < self.plan_next {
                            continue;
                        }
                        if e.first_lsn > self.plan_next {
                            break;
                        }
                        // A pinned replica reads whole segments: only the
                        // whole file's digest is bound to the signed head.
                        let start = if self.trust.pinned() {
                            e.start_for(0)
                        } else {
                            e.start_for(self.plan_next)
                        };
                        let from = self.plan_next;
                        self.plan_next = e.last_lsn + 1;
                        let digest = self.digest_for(&head, &e.key);
                        self.plan.push_back(Unit {
                            entry: e,
                            start,
                            from,
                            digest,
                        });
                        if self.plan.len() >= self.cfg.max_inflight * 2 {
                            break;
                        }
                    }
                    if self.plan_next == before {
                        // The catalog does not cover the LSN it claims to: re-read the head.
                        self.head_fresh = true;
                        self.head_due = Some(0);
                        break;
                    }
                }
                Ok(None) => {
                    // The head does not cover what we need: it must be older
                    // than retention (a valid head covers earliest..=committed).
                    self.head_fresh = true;
                    self.head_due = Some(0);
                    break;
                }
                Err(page) => {
                    self.page_wanted = Some(page);
                }
            }
        }
        self.head = Some(head);
    }

    /// Drops the cached pages off the head's paths down to the next LSN
    /// to apply and the next to plan (`applied + 1` and `plan_next`: a
    /// plan cleared by a new head starts over at `applied + 1`). Pages a
    /// replica has walked past, and pages only an earlier head named, are
    /// never read from again; keeping every page that covered `plan_next`
    /// let a store whose every head names a new page at the same LSNs
    /// (each as large as [`crate::catalog::MAX_PAGE_BYTES`] allows) grow
    /// the cache by a page per head read. Levels strictly decrease down a
    /// path, so each holds at most [`crate::catalog::MAX_PAGE_LEVEL`] + 1
    /// pages.
    fn keep_needed_pages(&mut self) {
        let lo = self.applied.saturating_add(1);
        let mut keep: Vec<usize> = Vec::new();
        if let Some(head) = &self.head {
            for lsn in [lo, self.plan_next.max(lo)] {
                let mut refs: &[PageRef] = &head.pages;
                while let Some(i) = refs
                    .iter()
                    .find(|p| p.first_lsn <= lsn && lsn <= p.last_lsn)
                    .and_then(|r| self.cached(r))
                {
                    keep.push(i);
                    refs = &self.pages[i].1.pages;
                }
            }
        }
        let mut i = 0;
        self.pages.retain(|_| {
            i += 1;
            keep.contains(&(i - 1))
        });
    }

    pub(super) fn on_page(&mut self, now: u64, r: PageRef, resp: GetResponse) {
        self.page_inflight = false;
        let result = match resp {
            GetResponse::Ok { body, .. } => self.check_page_trust(&r, &body).and_then(|()| {
                Page::decode(&body, &r).map_err(|e| Error::decode(e).with_object(&r.key))
            }),
            GetResponse::NotFound => {
                // Retention removed it: re-read the head.
                self.page_wanted = None;
                self.missing(now, &r.key);
                return;
            }
            other => Err(unavailable(&other).with_object(&r.key)),
        };
        match result {
            Ok(page) => {
                self.success(&r.key);
                self.keep_needed_pages();
                self.pages.retain(|(pr, _)| pr.key != r.key);
                self.pages.push((r, page));
                self.page_wanted = None;
            }
            Err(err) => {
                self.distrust_head(now, &err);
                let d = self.failure(&r.key, err);
                self.backoff_until = Some(now + d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Action, ReplicaConfig};
    use super::*;
    use crate::catalog::{page_key, segment_key, DatasetId, HEAD_KEY};
    use crate::segment::HEADER_LEN;

    /// A one-LSN segment entry of epoch 1.
    fn one_lsn(lsn: u64) -> SegmentEntry {
        one_lsn_of(1, lsn)
    }

    /// A one-LSN segment entry of `epoch`.
    fn one_lsn_of(epoch: u64, lsn: u64) -> SegmentEntry {
        SegmentEntry {
            key: segment_key(epoch, lsn, lsn),
            epoch,
            first_lsn: lsn,
            last_lsn: lsn,
            size: 100,
            crc32: 0,
            records_end: 40,
            index: vec![IndexEntry {
                lsn,
                offset: HEADER_LEN,
            }],
            filter: None,
        }
    }

    /// Planning from a page of 20,000 segments (or a head of as many)
    /// copies what the look-ahead takes, not the rest of the page each
    /// time: the entries from the LSN asked for on, at most as many as
    /// asked.
    #[test]
    fn locate_copies_at_most_what_the_plan_takes() {
        let r = Replica::new(ReplicaConfig::default(), 1);
        let segments: Vec<SegmentEntry> = (1..=20_000).map(one_lsn).collect();
        let mut head = Head::new(DatasetId::from_seed(1), 1);
        head.committed_lsn = 20_000;
        head.segments = segments.clone();
        let got = r.locate(&head, 5_000, 7).expect("inline").expect("covered");
        let lsns: Vec<u64> = got.iter().map(|e| e.first_lsn).collect();
        assert_eq!(lsns, (5_000..5_007).collect::<Vec<_>>());
        assert_eq!(r.locate(&head, 20_001, 7), Ok(None));

        let body = Page {
            format: 1,
            level: 0,
            segments,
            pages: Vec::new(),
            digests: Default::default(),
        };
        let reference = PageRef {
            key: page_key(0, 1, 20_000, 1),
            level: 0,
            first_lsn: 1,
            last_lsn: 20_000,
            count: 20_000,
            crc32: 0,
        };
        head.segments = Vec::new();
        head.pages = vec![reference.clone()];
        let mut r = r;
        assert_eq!(r.locate(&head, 19_999, 7), Err(reference.clone()));
        r.pages.push((reference, body));
        let got = r
            .locate(&head, 19_999, 7)
            .expect("cached")
            .expect("covered");
        let lsns: Vec<u64> = got.iter().map(|e| e.first_lsn).collect();
        assert_eq!(lsns, vec![19_999, 20_000]);
        let got = r.locate(&head, 2, 3).expect("cached").expect("covered");
        assert_eq!(got.len(), 3);
    }

    /// A store whose every head names a new sound page over the same LSNs
    /// (its first segment missing, so the replica reads the head again at
    /// once) used to grow the page cache by one page per head read, past
    /// its limit of 64 pages (all of them covered the LSN to apply), each
    /// as large as a page may be. Only the page the head names now stays.
    #[test]
    fn pages_only_earlier_heads_named_are_not_kept() {
        let mut r = Replica::new(
            ReplicaConfig {
                retry_base_ms: 1,
                retry_max_ms: 10,
                ..ReplicaConfig::default()
            },
            1,
        );
        let (mut heads, mut now, mut most) = (0u64, 0, 0);
        let mut page: Option<(String, Vec<u8>)> = None;
        while heads < 200 {
            match r.poll(now) {
                Action::Fetch(g) => {
                    let resp = if g.key == HEAD_KEY {
                        heads += 1;
                        let segments = (1..=10).map(|lsn| one_lsn_of(heads, lsn)).collect();
                        let body = Page {
                            format: 1,
                            level: 0,
                            segments,
                            pages: Vec::new(),
                            digests: Default::default(),
                        }
                        .encode();
                        let mut head = Head::new(DatasetId::from_seed(1), heads);
                        head.generation = heads;
                        head.committed_lsn = 10;
                        head.pages = vec![PageRef {
                            key: page_key(0, 1, 10, heads),
                            level: 0,
                            first_lsn: 1,
                            last_lsn: 10,
                            count: 10,
                            crc32: crate::crc::hash(&body),
                        }];
                        page = Some((head.pages[0].key.clone(), body));
                        GetResponse::Ok {
                            body: head.encode(),
                            etag: Some(format!("\"h{heads}\"")),
                            range: None,
                        }
                    } else {
                        match &page {
                            Some((key, body)) if *key == g.key => GetResponse::Ok {
                                body: body.clone(),
                                etag: None,
                                range: None,
                            },
                            _ => GetResponse::NotFound,
                        }
                    };
                    r.handle_response(g.id, now, resp);
                    most = most.max(r.pages.len());
                }
                Action::Event(_) => {}
                Action::Wait { until } => now = until.max(now + 1),
            }
        }
        assert!(most <= 2, "{most} pages cached after {heads} heads");
    }
}
