//! Retention: dropping history older than `retain_lsns` once a snapshot
//! covers it, reading the pages whose contents must be retired with it, and
//! deleting retired objects after their grace period.

use crate::catalog::{self, Head, Page, PageRef, Retired};
use crate::error::{Error, ErrorKind};
use crate::io::GetResponse;

use super::commit::{Commit, Stage};
use super::{Action, DeleteRequest, Publisher, Req};

impl Publisher {
    /// Moves what retention lets go out of `h` into `h.retired`: inline
    /// segments and pages (with everything under them) wholly below the new
    /// earliest LSN, which the snapshot must cover. Returns the pages that
    /// must be read first, to retire their contents too.
    pub(super) fn retire_expired(&mut self, h: &mut Head, now: u64) -> Result<(), Vec<PageRef>> {
        if let (Some(retain), Some(snap)) = (self.cfg.retain_lsns, &h.snapshot) {
            let want = (h.committed_lsn + 1)
                .saturating_sub(retain)
                .max(h.earliest_lsn);
            let earliest = want.min(snap.lsn + 1);
            if earliest > h.earliest_lsn {
                // Pages wholly below: read them (and their children) to retire their contents.
                let dropped: Vec<PageRef> = h
                    .pages
                    .iter()
                    .filter(|p| p.last_lsn < earliest)
                    .cloned()
                    .collect();
                let mut need = Vec::new();
                let mut keys = Vec::new();
                let mut stack = dropped.clone();
                while let Some(p) = stack.pop() {
                    keys.push(p.key.clone());
                    match self.page_cache.get(&p.key) {
                        None => need.push(p),
                        Some(page) => {
                            keys.extend(page.segments.iter().map(|s| s.key.clone()));
                            stack.extend(page.pages.iter().cloned());
                        }
                    }
                }
                if !need.is_empty() {
                    return Err(need);
                }
                h.pages.retain(|p| p.last_lsn >= earliest);
                for s in h.segments.iter().filter(|s| s.last_lsn < earliest) {
                    keys.push(s.key.clone());
                }
                h.segments.retain(|s| s.last_lsn >= earliest);
                for k in keys {
                    self.page_cache.remove(&k);
                    h.retired.push(Retired {
                        key: k,
                        since_ms: now,
                    });
                }
                h.earliest_lsn = earliest;
            }
        }
        Ok(())
    }

    pub(super) fn drive_deletes(&mut self, now: u64, wake: &mut u64) -> Option<Action> {
        if self.delete_retry_at > now {
            *wake = (*wake).min(self.delete_retry_at);
            return None;
        }
        let head = self.head.as_ref()?;
        let mut next = None;
        for r in &head.retired {
            if self.deleted.contains(&r.key) || self.deleting.contains(&r.key) {
                continue;
            }
            let due = r.since_ms.saturating_add(self.cfg.grace_ms);
            if due <= now {
                next = Some(r.key.clone());
                break;
            }
            *wake = (*wake).min(due);
        }
        let key = next?;
        self.deleting.insert(key.clone());
        let id = self.id(Req::Delete(key.clone()));
        Some(Action::Delete(DeleteRequest { id, key }))
    }

    pub(super) fn on_page_read(&mut self, now: u64, r: PageRef, resp: GetResponse) {
        let result =
            match resp {
                GetResponse::Ok { body, .. } => {
                    Page::decode(&body, &r).map_err(|e| Error::decode(e).with_object(r.key.clone()))
                }
                // Already gone (deleted by an earlier publisher): nothing left to retire under it.
                GetResponse::NotFound => Ok(Page {
                    format: catalog::FORMAT,
                    level: 0,
                    segments: Vec::new(),
                    pages: Vec::new(),
                    digests: Default::default(),
                }),
                other => Err(Error::new(ErrorKind::Unavailable, format!("{other:?}"))
                    .with_object(r.key.clone())),
            };
        let Some(Commit {
            stage: Stage::Reading(keys),
            ..
        }) = self.commit.as_mut()
        else {
            return;
        };
        keys.remove(&r.key);
        let done = keys.is_empty();
        match result {
            Ok(page) => {
                self.page_cache.insert(r.key.clone(), page);
                if done {
                    // Rebuild the commit with the pages known.
                    self.commit = None;
                }
            }
            Err(e) => {
                let d = self.backoff(&r.key, e);
                self.commit = None;
                self.page_reads.clear();
                self.commit_retry_at = Some(now + d);
            }
        }
    }
}
