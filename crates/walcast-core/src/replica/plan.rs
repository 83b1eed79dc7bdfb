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

    /// Finds the entries for LSN `lsn`: from the inline segments, or by
    /// descending cached pages. Returns `Err(page)` when a page must be fetched.
    fn locate(&self, head: &Head, lsn: u64) -> Result<Option<Vec<SegmentEntry>>, PageRef> {
        if head.segments.first().is_some_and(|s| s.first_lsn <= lsn) {
            if let Some(i) = head.segments.iter().position(|s| s.last_lsn >= lsn) {
                return Ok(Some(head.segments[i..].to_vec()));
            }
        }
        let mut refs: &[PageRef] = &head.pages;
        loop {
            let Some(r) = refs
                .iter()
                .find(|p| p.first_lsn <= lsn && lsn <= p.last_lsn)
            else {
                return Ok(None);
            };
            // A cached page counts only for the very reference it was
            // verified against: a page that names itself (or another page's
            // key) must be fetched and checked against this reference.
            let page = match self.pages.iter().find(|(pr, _)| pr.key == r.key) {
                Some((verified, page)) if verified == r => page,
                _ => return Err(r.clone()),
            };
            if page.level == 0 {
                let i = page
                    .segments
                    .iter()
                    .position(|s| s.last_lsn >= lsn)
                    .unwrap_or(page.segments.len());
                return Ok(Some(page.segments[i..].to_vec()));
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
            match self.locate(&head, self.plan_next) {
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

    /// Drops the cached pages the head no longer leads to: a page stays
    /// only while it lies on the head's path down to an LSN still to
    /// apply or planned (`applied + 1 ..= plan_next`: a plan cleared by a
    /// new head starts over at `applied + 1`). Pages a replica has walked
    /// past, and pages only an earlier head named, are never read from
    /// again. Keeping the pages that merely covered `plan_next` let a store
    /// whose every head names a new page at the same LSNs (each as large
    /// as [`crate::catalog::MAX_PAGE_BYTES`] allows) grow the cache by a
    /// page per head read, without end.
    fn keep_needed_pages(&mut self) {
        let lo = self.applied.saturating_add(1);
        let hi = self.plan_next.max(lo);
        let needed = |r: &PageRef| r.first_lsn <= hi && lo <= r.last_lsn;
        let mut keep = vec![false; self.pages.len()];
        let mut refs: Vec<&PageRef> = self
            .head
            .iter()
            .flat_map(|h| h.pages.iter())
            .filter(|r| needed(r))
            .collect();
        while let Some(r) = refs.pop() {
            // As in `locate`: a cached page counts only for the very
            // reference it was verified against.
            if let Some(i) = self.pages.iter().position(|(pr, _)| pr == r) {
                if !keep[i] {
                    keep[i] = true;
                    refs.extend(self.pages[i].1.pages.iter().filter(|r| needed(r)));
                }
            }
        }
        let mut keep = keep.into_iter();
        self.pages.retain(|_| keep.next().unwrap_or(false));
    }

    pub(super) fn on_page(&mut self, now: u64, r: PageRef, resp: GetResponse) {
        self.page_inflight = false;
        let result = match resp {
            GetResponse::Ok { body, .. } => self.check_page_trust(&r, &body).and_then(|()| {
                Page::decode(&body, &r).map_err(|e| Error::decode(e).with_object(r.key.clone()))
            }),
            GetResponse::NotFound => {
                // Retention removed it: re-read the head.
                self.page_wanted = None;
                self.missing(now, &r.key);
                return;
            }
            other => Err(unavailable(&other).with_object(r.key.clone())),
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
                        let segments = (1..=10)
                            .map(|lsn| SegmentEntry {
                                key: segment_key(heads, lsn, lsn),
                                epoch: heads,
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
                            })
                            .collect();
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
