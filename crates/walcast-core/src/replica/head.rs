//! The catalog head: reading it, deciding whether to trust it (a stale
//! cached copy, a history that went back, a new dataset), scheduling the next
//! read, and re-reading it when an object it named turns out wrong or missing.

use crate::catalog::{DatasetId, Head, HEAD_KEY};
use crate::error::{Error, ErrorKind};
use crate::io::{GetResponse, ResponseMeta};
use crate::snapshot::SnapshotDecoder;
use crate::state::KvState;

use super::bootstrap::Bootstrap;
use super::fetch::unavailable;
use super::{Event, Mode, Replica};

/// Head reads behind the applied LSN, at the least, before a rewind.
const REWIND_MIN_READS: u32 = 16;

impl Replica {
    pub(super) fn on_head(&mut self, now: u64, resp: GetResponse, meta: ResponseMeta) {
        self.head_inflight = false;
        let sent = self.head_req.take();
        if matches!(resp, GetResponse::Ok { .. } | GetResponse::NotModified) {
            // Each answer says afresh whether the server holds long-polls
            // (a proxy or a new server in front may not).
            self.long_poll = meta.long_poll_max_ms;
        }
        // A long-poll answered before half its wait without anything new: a
        // server that does not hold, or a proxy that cached an answer. The
        // next read waits the poll interval, so nothing spins.
        self.long_poll_early = sent.is_some_and(|(_, sent_at, wait)| {
            wait.is_some_and(|w| now.saturating_sub(sent_at) < w / 2)
        });
        let before = (self.dataset, self.committed);
        // A head stored gzip-compressed: its JSON, which the signature
        // covers (one that does not decode stays as it came, and
        // `Head::decode` names why).
        #[cfg(feature = "gzip")]
        let resp = match resp {
            GetResponse::Ok { body, etag, range } => GetResponse::Ok {
                body: match crate::catalog::head_json(&body) {
                    Ok(std::borrow::Cow::Owned(json)) => json,
                    _ => body,
                },
                etag,
                range,
            },
            other => other,
        };
        match resp {
            GetResponse::NotModified if self.etag.is_some() && self.head.is_some() => {
                self.success(HEAD_KEY);
                self.behind_since = None;
                self.behind_reads = 0;
                self.last_poll_at = Some(now);
                self.schedule_next_head(now);
            }
            GetResponse::Ok { body, etag, .. } => match Head::decode(&body)
                .map_err(|e| Error::decode(e).with_object(HEAD_KEY))
                .and_then(|head| self.check_head_trust(&body, &head).map(|()| head))
            {
                Ok(head) => {
                    self.success(HEAD_KEY);
                    self.last_poll_at = Some(now);
                    self.accept_head(now, head, etag);
                }
                Err(err) => self.head_retry(now, err),
            },
            GetResponse::NotFound => {
                let err = Error::new(
                    ErrorKind::NotFound,
                    "no catalog head: the dataset does not exist (yet)",
                )
                .with_object(HEAD_KEY);
                self.head_retry(now, err);
            }
            GetResponse::NotModified => {
                // A 304 we did not ask for: read it again in full.
                self.head_fresh = true;
                let err = Error::new(ErrorKind::Unavailable, "unexpected 304 for the head")
                    .with_object(HEAD_KEY);
                self.head_retry(now, err);
            }
            other => {
                let err = unavailable(&other).with_object(HEAD_KEY);
                self.head_retry(now, err);
            }
        }
        if self.dataset == before.0 && self.committed > before.1 {
            // Something new came: the server (or the proxy) is live. (Not
            // a change of dataset: two backends behind one URL answer each
            // other's long-polls at once, each with "news".)
            self.long_poll_early = false;
        }
    }

    /// Whether idle head reads are long-polls: the server advertised
    /// support, this replica long-polls, and the last long-poll was held.
    pub(super) fn long_poll_active(&self) -> bool {
        self.cfg.long_poll_wait_ms > 0 && self.long_poll.is_some() && !self.long_poll_early
    }

    /// The wait to ask for on the next head read: only for a conditional
    /// read (an ETag to compare) of a caught-up replica whose server holds
    /// long-polls; at most what the server grants.
    pub(super) fn long_poll_wait(&self, conditional: bool) -> Option<u64> {
        if !conditional
            || self.cfg.long_poll_wait_ms == 0
            || self.applied < self.committed
            || self.bootstrap.is_some()
        {
            return None;
        }
        self.long_poll
            .map(|max| self.cfg.long_poll_wait_ms.min(max).max(1000))
    }

    /// How long a caught-up replica waits before its next head read: none
    /// with long-poll (the server holds the read), else the poll interval.
    pub(super) fn idle_delay(&self) -> u64 {
        if self.long_poll_active() {
            0
        } else {
            self.cfg.poll_interval_ms
        }
    }

    /// Schedules the next head read of a caught-up replica.
    fn schedule_next_head(&mut self, now: u64) {
        if self.head_due.is_none() {
            self.head_due = Some(now + self.idle_delay());
        }
    }

    fn head_retry(&mut self, now: u64, err: Error) {
        let d = self.failure(HEAD_KEY, err);
        self.head_fresh = true;
        self.head_due = Some(now + d);
    }

    pub(super) fn schedule_poll(&mut self, now: u64) {
        if self.head_due.is_none() {
            self.head_due = Some(now + self.cfg.poll_interval_ms);
        }
    }

    fn accept_head(&mut self, now: u64, head: Head, etag: Option<String>) {
        self.started = true;
        if self.dataset.is_some_and(|d| d != head.dataset_id) {
            self.events.push_back(Event::DatasetChanged {
                dataset_id: head.dataset_id,
            });
            self.reset_to(head.dataset_id);
        }
        if self.dataset == Some(head.dataset_id) && head.committed_lsn < self.applied {
            // A stale copy (e.g. from a CDN): never go backwards. Ask again
            // in full next time.
            let since = *self.behind_since.get_or_insert(now);
            self.behind_reads += 1;
            if self.behind_reads >= REWIND_MIN_READS
                && now.saturating_sub(since) >= self.cfg.rewind_after_ms
            {
                // Not a stale cache: the dataset's history went back behind
                // what this replica applied (a bucket restored from a
                // backup). Say so, discard the state, and follow the history
                // the store now holds rather than wedging for good.
                self.events.push_back(Event::Error(
                    Error::new(
                        ErrorKind::Data,
                        format!(
                            "the dataset went back in history: every head for {} ms \
                             commits LSN {} but this replica applied {}; starting over",
                            now - since,
                            head.committed_lsn,
                            self.applied
                        ),
                    )
                    .with_object(HEAD_KEY)
                    .with_lsn(head.committed_lsn),
                ));
                self.events.push_back(Event::DatasetChanged {
                    dataset_id: head.dataset_id,
                });
                self.reset_to(head.dataset_id);
            } else {
                self.head_fresh = true;
                self.schedule_poll(now);
                return;
            }
        }
        self.behind_since = None;
        self.behind_reads = 0;
        self.epoch = self.epoch.max(head.epoch);
        // The newest head read decides what is committed: a head read earlier
        // that claimed more (a bogus or rolled-back one) must not keep this
        // replica waiting for LSNs the store no longer has.
        self.committed = head.committed_lsn;
        self.committed_at_ms = head.committed_at_ms;
        self.etag = etag;
        let fresh = self.dataset.is_none();
        let gap = head.earliest_lsn > self.applied + 1;
        // A pinned replica reads lazily only a version 4 snapshot whose index
        // digest the signed head records, and never the deltas (they are
        // bound by whole-object digests): it replays the segments after the
        // snapshot instead. Else it loads whole.
        let pinned = self.trust.pinned();
        let verified = head
            .snapshot
            .as_ref()
            .filter(|s| pinned && s.version == 4)
            .and_then(|s| head.index_digest(&s.key))
            .and_then(super::lazy::parse_digest);
        if let Some(l) = self.lazy.as_mut() {
            l.refresh_deferred(&head.segments);
        }
        if self.lazy.is_some() && (!pinned || verified.is_some()) {
            if fresh {
                self.dataset = Some(head.dataset_id);
            }
            let deltas: &[crate::catalog::DeltaEntry] = if pinned { &[] } else { &head.deltas };
            if self.lazy_adopt(head.snapshot.as_ref(), deltas, verified) {
                self.head = Some(head);
                self.caught_up_reported = false;
                if self.applied >= self.committed {
                    self.schedule_next_head(now);
                }
                return;
            }
        }
        // A lazy base older than the head's snapshot, which this replica
        // cannot read by blocks (version 1, or unverifiable when pinned),
        // is retired with the head that named it: the new snapshot is
        // loaded whole (and the overlay's newer writes kept on top of it,
        // see `on_snapshot`) before the old one's grace period ends.
        // Likewise a state loaded whole that keeps deferred segments on
        // top (see `on_snapshot`): a newer snapshot is loaded whole before
        // the segments it covers may be deleted.
        let base_left = self.cfg.mode == Mode::Kv
            && self.lazy.as_ref().is_some_and(|l| {
                head.snapshot.as_ref().is_some_and(|s| match &l.base {
                    Some(b) => s.lsn > b.entry.lsn && s.key != b.entry.key,
                    None => !l.deferred.is_empty() && s.lsn > l.state_lsn,
                })
            });
        let use_snapshot = self.cfg.mode == Mode::Kv
            && head.snapshot.as_ref().is_some_and(|s| s.lsn > self.applied)
            && (gap || fresh)
            || base_left;
        if use_snapshot {
            let entry = head.snapshot.clone().expect("checked");
            // (The whole entry: a load started from a head that lied about
            // the snapshot restarts from the one that tells the truth.)
            if self
                .bootstrap
                .as_ref()
                .is_some_and(|b| b.entry == entry && b.dataset_id == head.dataset_id)
            {
                // The same load is under way: it goes on.
                self.head = Some(head);
                return;
            }
            // A snapshot that just failed is not fetched again before its
            // backoff, whatever head names it next.
            let backoff = self.retry_at.get(0).copied();
            self.clear_plan();
            if let Some(t) = backoff {
                self.retry_at.insert(0, t);
            }
            // Answers meant for a bootstrap this one replaces are dropped.
            self.pending
                .retain(|_, j| !matches!(j, super::Job::Snapshot { .. }));
            let applied = self.applied;
            let chain = self
                .lazy
                .as_ref()
                .and_then(|l| l.base.as_ref())
                .is_some_and(|b| {
                    !b.deltas.is_empty() && b.chain_end > entry.lsn && applied > entry.lsn
                });
            self.bootstrap = Some(Bootstrap {
                entry,
                dataset_id: head.dataset_id,
                decoder: SnapshotDecoder::new(),
                next: 0,
                inflight: false,
                chain,
            });
            self.head = Some(head);
            return;
        }
        if fresh {
            self.dataset = Some(head.dataset_id);
        }
        if gap {
            // Raw mode (or no snapshot, which a valid head rules out in KV mode).
            let from = self.applied + 1;
            let to = head.earliest_lsn - 1;
            self.events.push_back(Event::Gap { from, to });
            self.applied = to;
            self.clear_plan();
        }
        // Re-plan when the head changed what we know.
        // Any difference counts, not just the generation: a head that lied
        // about an entry under a real generation must not keep its plan.
        let head_changed = self.head.as_ref().is_none_or(|h| *h != head);
        self.head = Some(head);
        if head_changed {
            self.clear_plan();
        }
        self.caught_up_reported = false;
        if self.applied >= self.committed {
            self.schedule_next_head(now);
        }
    }

    fn reset_to(&mut self, id: DatasetId) {
        self.state = KvState::new();
        self.applied = 0;
        self.committed = 0;
        self.epoch = 0;
        self.dataset = Some(id);
        self.clear_plan();
        self.bootstrap = None;
        // Answers for the old dataset's snapshot and blocks are dropped: its
        // keys may come back with other bytes, and a lazy job is matched by
        // key and range.
        self.pending
            .retain(|_, j| !matches!(j, super::Job::Snapshot { .. } | super::Job::Block(_)));
        self.pages.clear();
        if let Some(l) = self.lazy.as_mut() {
            l.clear();
        }
    }
    /// An object failed verification against the entry the head gave for
    /// it: the object or the head may be wrong. Read the head again in full
    /// (a newer or honest one replaces the plan built from this one).
    pub(super) fn distrust_head(&mut self, now: u64, err: &Error) {
        if matches!(err.kind(), ErrorKind::Data | ErrorKind::Untrusted) {
            self.head_fresh = true;
            let due = now + self.distrust_delay();
            if self.head_due.is_none_or(|t| t > due) && !self.head_inflight {
                self.head_due = Some(due);
            }
        }
    }

    /// A block or deferred segment a lazy read asked for is missing: the
    /// head that named it may be old news (its publisher deleted the object
    /// under a newer one). The head is read again at once (conditional, not
    /// held as a long-poll), as a read failure: no [`Event::Error`], no
    /// share of the catch-up streak, and the plan and a whole load under
    /// way, which do not depend on that object, go on (a load cut short by
    /// every such read would start over for as long as reads come). The
    /// failure is kept for the block: the next read of it answers with it
    /// at once.
    pub(super) fn read_missing(&mut self, now: u64, key: &str, err: Error) {
        self.read_failure(key, err);
        self.head_now = true;
        self.head_due = Some(now);
    }

    /// A 404 for an object the head named on the way to catching up:
    /// re-read the head (in full).
    pub(super) fn missing(&mut self, now: u64, key: &str) {
        let err = Error::new(
            ErrorKind::NotFound,
            "object named by the catalog is missing",
        )
        .with_object(key.to_string());
        let d = self.failure(key, err);
        self.clear_plan();
        // Plan nothing more from the head that named it until a new one is read.
        self.head = None;
        self.head_fresh = true;
        // A first miss of this key reads the head again at once while the
        // replica is getting somewhere (an honest head moved on); after
        // rounds of failures, it waits as a distrusted head does (a hostile
        // store naming a new missing key in every head would otherwise
        // loop head, 404, head without a pause).
        self.head_due = Some(
            now + if self
                .attempts
                .iter()
                .find(|(k, _)| k == key)
                .map_or(0, |(_, n)| *n)
                <= 1
            {
                self.distrust_delay()
            } else {
                d
            },
        );
        self.bootstrap = None;
        self.pending
            .retain(|_, j| !matches!(j, super::Job::Snapshot { .. }));
    }
}
