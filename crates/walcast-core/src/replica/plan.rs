//! The catalog walk: which segments cover the LSNs after the applied one,
//! found in the head's inline segments or by descending catalog pages, and
//! the cache of verified pages.

use crate::catalog::{Head, Page, PageRef, SegmentEntry};
use crate::error::Error;
use crate::io::GetResponse;
use crate::segment::IndexEntry;

use super::fetch::unavailable;
use super::{Job, Replica};

/// Catalog pages kept at once; more than the deepest valid descent
/// ([`crate::catalog::MAX_PAGE_LEVEL`] + 1 pages).
const MAX_CACHED_PAGES: usize = 64;

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
                if self.pages.len() >= MAX_CACHED_PAGES {
                    // Keep the path being descended (one page per level, as
                    // levels strictly decrease down the tree), drop the rest.
                    let lsn = self.plan_next;
                    self.pages
                        .retain(|(pr, _)| pr.first_lsn <= lsn && lsn <= pr.last_lsn);
                }
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
