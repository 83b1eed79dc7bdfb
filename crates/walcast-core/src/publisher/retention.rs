//! Retention: dropping history older than `retain_lsns` once a snapshot
//! covers it, reading the pages whose contents must be retired with it, and
//! deleting retired objects after their grace period.

use crate::catalog::{self, Head, Page, PageRef, Retired};
use crate::error::{Error, ErrorKind};
use crate::io::GetResponse;

use super::{Action, DeleteRequest, Event, Publisher, Req};

/// Most keys a head lists in `retired`: retention retires no more until
/// deletions make room, so the head stays far below
/// [`catalog::MAX_HEAD_BYTES`] (a retired entry takes at most about 130
/// bytes of JSON).
pub(super) const MAX_RETIRED: usize = 2048;

/// Most references a page may hold to be unfolded into the head (or
/// `page_fanout`, when larger): a head holds fewer than `2 × page_fanout`
/// references of a level as publishers write them. A larger page is
/// retired alone.
const MAX_UNFOLD: usize = 64;

/// Most pages read at once to retire or unfold them. Fewer when their
/// entries (each reference's `count`) pass what one commit can retire
/// ([`MAX_RETIRED`]): a hostile or broken head's pages may each hold
/// some 100,000 entries, and every page read stays in memory until it is
/// retired.
const MAX_PAGE_READS: usize = 64;

/// Most of those page GETs out at once: each answer may be up to
/// `MAX_PAGE_BYTES` until it is decoded.
const MAX_PAGE_READS_IN_FLIGHT: usize = 4;

/// Whether `key`, listed in `h.retired`, is one a head can have retired:
/// nothing the head names, nor anything its pages may still name or this
/// publisher is about to name. Retention retires segments and level-0 pages
/// wholly below `earliest_lsn`, higher pages it unfolds (their references
/// then stand in the head), snapshots older than the head's, and deltas
/// the chain (or the snapshot) covers; a head listing anything else (a
/// hostile or broken earlier writer) must not make a publisher delete it.
/// (Keys of the claiming epoch or later leave a claimed head's list too:
/// only this publisher retires those, `claim.rs`.)
pub(super) fn retirable(h: &Head, key: &str) -> bool {
    let named = h.snapshot.as_ref().is_some_and(|s| s.key == key)
        || h.deltas.iter().any(|d| d.key == key)
        || h.segments.iter().any(|s| s.key == key)
        || h.pages.iter().any(|p| p.key == key);
    if named {
        return false;
    }
    // The key's numbers, in order (its format is checked by `object_kind`).
    let n: Vec<u64> = key
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|t| t.parse().ok())
        .collect();
    match (catalog::object_kind(key), n.as_slice()) {
        (Some("segment"), [_, _, last]) => *last < h.earliest_lsn,
        (Some("page"), [level, first, last, _]) => {
            *last < h.earliest_lsn
                || !h.pages.iter().any(|p| {
                    u64::from(p.level) > *level && p.first_lsn <= *last && *first <= p.last_lsn
                })
        }
        (Some("snapshot"), [lsn, _]) => h.snapshot.as_ref().is_some_and(|s| *lsn < s.lsn),
        (Some("delta"), [_, lsn, _]) => {
            let end = h.deltas.last().map(|d| d.lsn);
            end.or(h.snapshot.as_ref().map(|s| s.lsn))
                .is_some_and(|end| *lsn <= end)
        }
        _ => false,
    }
}

/// The epoch a key carries (its last number but for segments, whose epoch
/// is their directory).
pub(super) fn key_epoch(key: &str) -> Option<u64> {
    if let Some(rest) = key.strip_prefix("segments/") {
        return rest.split('/').next()?.parse().ok();
    }
    let stem = key.rsplit_once('.')?.0;
    stem.rsplit('-').next()?.parse().ok()
}

impl Publisher {
    /// Moves what retention lets go out of `h` into `h.retired`: inline
    /// segments and pages (with everything under them) wholly below the new
    /// earliest LSN, which the snapshot must cover, oldest first and no more
    /// than [`MAX_RETIRED`] keys in `retired` at once, so the head stays
    /// within its size bound however much retention lets go in one commit.
    /// A page whose contents would not fit is unfolded: the page itself is
    /// retired and its references take its place, to be retired in later
    /// commits as deletions make room. Pages it must read first, to retire
    /// or unfold them, are asked for on the side ([`Self::drive_page_reads`])
    /// and this commit stops before them: a page read that is slow or fails
    /// never holds back new data. After a page read failed, retention waits
    /// out its backoff.
    pub(super) fn retire_expired(&mut self, h: &mut Head, now: u64) {
        let (Some(retain), Some(snap)) = (self.cfg.retain_lsns, &h.snapshot) else {
            return;
        };
        if self.retention_retry_at.is_some_and(|t| t > now) {
            return;
        }
        // The committed LSN's segment always stays (`retain` 0 keeps one
        // LSN): a publisher restarting on a WAL compares its record there
        // with what was published before it publishes on (the CLI's claim
        // check); without it a WAL that reused the LSN would go unnoticed.
        let want = (h.committed_lsn + 1)
            .saturating_sub(retain.max(1))
            .max(h.earliest_lsn);
        let earliest = want.min(snap.lsn + 1);
        let mut room = MAX_RETIRED.saturating_sub(h.retired.len());
        let mut keys: Vec<String> = Vec::new();
        // Pages wholly below, oldest first: retire each with its contents,
        // or unfold it when they would not fit.
        while let Some(p) = h.pages.first().filter(|p| p.last_lsn < earliest).cloned() {
            if room == 0 {
                break;
            }
            let Some(page) = self.page_cache.get(&p.key) else {
                // One batch asked for at a time: the commit that retires
                // it asks for the next (`pages_read`).
                if !self.page_reading.is_empty() || !self.page_reads.is_empty() {
                    break;
                }
                // Ask for the pages below that are not at hand (this one,
                // and the next ones while their entries fit what a commit
                // can retire); a later commit retires them.
                let mut entries = 0usize;
                let need: Vec<PageRef> = h
                    .pages
                    .iter()
                    .take_while(|q| q.last_lsn < earliest)
                    .filter(|q| !self.page_cache.contains_key(&q.key))
                    .take(MAX_PAGE_READS)
                    .take_while(|q| {
                        let first = entries == 0;
                        entries = entries.saturating_add(q.count as usize).max(1);
                        first || entries <= room
                    })
                    .cloned()
                    .collect();
                self.page_reads.extend(need);
                break;
            };
            let (entries, what) = if page.level == 0 {
                (page.segments.len(), "segments")
            } else {
                (page.pages.len(), "pages")
            };
            let bound = if page.level == 0 {
                MAX_RETIRED - 1
            } else {
                MAX_UNFOLD.max(self.cfg.page_fanout)
            };
            if entries > bound {
                // More than a head can name in its place (a page no
                // publisher with these settings writes): the page alone
                // is retired, what it names stays in the store undeleted,
                // so the head keeps within its size bound.
                self.events.push_back(Event::Error(
                    Error::new(
                        ErrorKind::Data,
                        format!(
                            "retention: the page names {entries} {what}, more than a head \
                             can list in its place ({bound}); only the page is retired, \
                             and what it names stays in the store undeleted"
                        ),
                    )
                    .with_object(&p.key),
                ));
                room -= 1;
                keys.push(p.key.clone());
                h.pages.remove(0);
            } else if page.level == 0 {
                let cost = 1 + entries;
                if cost > room {
                    break;
                }
                room -= cost;
                keys.push(p.key.clone());
                keys.extend(page.segments.iter().map(|s| s.key.clone()));
                h.pages.remove(0);
            } else {
                // Unfold: retire the page, name its references instead.
                room -= 1;
                keys.push(p.key.clone());
                let children = page.pages.clone();
                h.pages.splice(0..1, children);
            }
        }
        // Inline segments wholly below (they follow every page).
        if h.pages.is_empty() {
            let n = h
                .segments
                .iter()
                .take_while(|s| s.last_lsn < earliest)
                .count()
                .min(room);
            keys.extend(h.segments.drain(..n).map(|s| s.key));
        }
        for k in keys {
            self.page_cache.remove(&k);
            h.retired.push(Retired {
                key: k,
                since_ms: now,
            });
        }
        // The history may still start below the new earliest LSN: what did
        // not fit stays named until later commits retire it.
        if earliest > h.earliest_lsn {
            h.earliest_lsn = earliest;
        }
    }

    /// The next page GET retention asked for, while fewer than
    /// [`MAX_PAGE_READS_IN_FLIGHT`] are out.
    pub(super) fn drive_page_reads(&mut self) -> Option<Action> {
        if self.page_reading.len() >= MAX_PAGE_READS_IN_FLIGHT {
            return None;
        }
        let r = self.page_reads.pop_front()?;
        let key = r.key.clone();
        self.page_reading.insert(key.clone());
        Some(self.get(Req::PageRead(r), key))
    }

    pub(super) fn drive_deletes(&mut self, now: u64, wake: &mut u64) -> Option<Action> {
        // The store's head may be behind ours: it may name what ours retired.
        if self.behind_reads > 0 {
            return None;
        }
        if self.delete_retry_at > now {
            *wake = (*wake).min(self.delete_retry_at);
            return None;
        }
        // Nothing became due since the last walk over this head's list.
        if let Some(t) = self.deletes_quiet_until.filter(|&t| t > now) {
            *wake = (*wake).min(t);
            return None;
        }
        let head = self.head.as_ref()?;
        // The grace period runs from when this process first saw the key
        // retired in a head that landed (or that it claimed), and not
        // before the head's `since_ms`: a commit may land long after it
        // was built, and a head claimed from another writer carries that
        // writer's clock.
        let seen = &mut self.retired_seen;
        if seen.len() > head.retired.len() {
            let live: std::collections::HashSet<&str> =
                head.retired.iter().map(|r| r.key.as_str()).collect();
            seen.retain(|k, _| live.contains(k.as_str()));
        }
        let (mut next, mut quiet) = (None, u64::MAX);
        for r in &head.retired {
            if self.deleted.contains(&r.key)
                || self.deleting.contains(&r.key)
                || !retirable(head, &r.key)
            {
                continue;
            }
            // A `since_ms` past the grace period after this process saw
            // the entry (another writer's clock far ahead, or a hostile
            // head) does not hold the deletion back for longer.
            let first = *seen.entry(r.key.clone()).or_insert(now);
            let since = first.max(r.since_ms.min(first.saturating_add(self.cfg.grace_ms)));
            let due = since.saturating_add(self.cfg.grace_ms);
            if due <= now {
                next = Some(r.key.clone());
                break;
            }
            quiet = quiet.min(due);
        }
        *wake = (*wake).min(quiet);
        let Some(key) = next else {
            self.deletes_quiet_until = Some(quiet);
            return None;
        };
        self.deleting.insert(key.clone());
        let id = self.id(Req::Delete(key.clone()));
        Some(Action::Delete(DeleteRequest { id, key }))
    }

    pub(super) fn on_page_read(&mut self, now: u64, r: PageRef, resp: GetResponse) {
        let result = match resp {
            GetResponse::Ok { body, .. } => {
                Page::decode(&body, &r).map_err(|e| Error::decode(e).with_object(&r.key))
            }
            // A page the head names is not found: a store not yet showing
            // it, or one that lost it. Read again like any failure; after
            // `max_attempts` reads the page is taken for gone, and only it
            // leaves the catalog: what it named (unknown now) stays in the
            // store undeleted, and an error says so.
            GetResponse::NotFound
                if self.attempts.get(&r.key).copied().unwrap_or(0) + 1
                    >= self.cfg.max_attempts.max(1) =>
            {
                self.events.push_back(Event::Error(
                    Error::new(
                        ErrorKind::Data,
                        format!(
                            "retention: the page was not found in {} reads; only the page \
                             leaves the catalog, and what it named stays in the store undeleted",
                            self.cfg.max_attempts.max(1)
                        ),
                    )
                    .with_object(&r.key),
                ));
                Ok(Page {
                    format: catalog::FORMAT,
                    level: r.level,
                    segments: Vec::new(),
                    pages: Vec::new(),
                    digests: Default::default(),
                })
            }
            other => {
                Err(Error::new(ErrorKind::Unavailable, format!("{other:?}")).with_object(&r.key))
            }
        };
        self.page_reading.remove(&r.key);
        match result {
            Ok(page) => {
                // The next commit retires it.
                self.attempts.remove(&r.key);
                self.page_cache.insert(r.key.clone(), page);
                self.pages_read = self.page_reading.is_empty()
                    && self.page_reads.is_empty()
                    && self.retention_retry_at.is_none_or(|t| t <= now);
            }
            Err(e) => {
                // Retention waits out the backoff; commits never waited.
                let d = self.backoff(&r.key, e);
                self.page_reads.clear();
                self.retention_retry_at = Some(now + d);
            }
        }
    }
}
