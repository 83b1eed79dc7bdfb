//! Committing: building the next head from the committed one, uploading
//! its new pages, the head's compare-and-swap, and verifying a CAS that
//! failed or went unanswered.

use std::collections::HashMap;

use crate::catalog::{Head, Retired, TailSegment, HEAD_KEY};
use crate::error::{Error, ErrorKind};
use crate::io::GetResponse;

use super::pages::PageUpload;
use super::{Action, Event, ObjectKind, Publisher, PutCondition, Req, Role, Up};

/// Where a commit in progress stands.
#[derive(Debug)]
pub(super) enum Stage {
    /// Uploading new pages.
    Paging(HashMap<String, (Vec<u8>, Up)>),
    /// The head PUT is in flight.
    Cas,
    /// Re-reading the head after a failed or unanswered CAS.
    Verifying,
}

/// A commit in progress: the head it will write, and its stage.
#[derive(Debug)]
pub(super) struct Commit {
    pub(super) proposed: Head,
    pub(super) stage: Stage,
}

/// A commit whose own segments are at most `tail_bytes / CARRY_SHARE`
/// bytes lets its head carry earlier heads' segments too (see `fill_tail`).
const CARRY_SHARE: usize = 8;

impl Publisher {
    /// The commit's next request; `wake` takes the time a page waiting to
    /// be retried is due.
    pub(super) fn drive_commit(&mut self, now: u64, wake: &mut u64) -> Option<Action> {
        if self.commit.is_none() {
            if self.commit_retry_at.is_some_and(|t| t > now) {
                return None;
            }
            self.commit_retry_at = None;
            let ready = self.sealed.iter().take_while(|s| s.up == Up::Done).count();
            let committed = self.committed_lsn();
            // A snapshot alone is worth a commit once the head can name it.
            let snap_ready = self
                .snapshot
                .as_ref()
                .is_some_and(|s| s.up == Up::Done && s.entry.lsn <= committed);
            // So are pages retention asked for, once read.
            if ready == 0 && !snap_ready && !self.pages_read {
                return None;
            }
            self.pages_read = false;
            let (proposed, pages) = self.build_commit(now, ready);
            let stage = if pages.is_empty() {
                Stage::Cas
            } else {
                Stage::Paging(
                    pages
                        .into_iter()
                        .map(|(k, b)| (k, (b, Up::Waiting(0))))
                        .collect(),
                )
            };
            self.commit = Some(Commit { proposed, stage });
            if matches!(self.commit.as_ref().map(|c| &c.stage), Some(Stage::Cas)) {
                return Some(self.send_cas());
            }
        }
        let c = self.commit.as_mut()?;
        match &mut c.stage {
            Stage::Paging(pages) => {
                let mut next = None;
                let mut all_done = true;
                for (k, (b, up)) in pages.iter_mut() {
                    match *up {
                        Up::Waiting(t) if t <= now && next.is_none() => {
                            *up = Up::InFlight;
                            next = Some((k.clone(), b.clone()));
                            all_done = false;
                        }
                        Up::Done => {}
                        Up::Waiting(t) => {
                            all_done = false;
                            if t > now {
                                *wake = (*wake).min(t);
                            }
                        }
                        _ => all_done = false,
                    }
                }
                if let Some((k, b)) = next {
                    return Some(self.put(
                        Req::Page(k.clone()),
                        k,
                        b,
                        PutCondition::CreateOnly,
                        ObjectKind::Page,
                    ));
                }
                if all_done {
                    c.stage = Stage::Cas;
                    return Some(self.send_cas());
                }
                None
            }
            Stage::Verifying => match self.verify_at {
                Some(t) if t <= now => {
                    self.verify_at = None;
                    Some(self.get(Req::Verify, HEAD_KEY.into()))
                }
                _ => None,
            },
            Stage::Cas => None,
        }
    }

    fn send_cas(&mut self) -> Action {
        let c = self.commit.as_ref().expect("commit");
        let body = self.encode_head(&c.proposed);
        let cond = PutCondition::IfMatch(self.etag.clone().unwrap_or_default());
        self.put(Req::Cas, HEAD_KEY.into(), body, cond, ObjectKind::Head)
    }

    /// Builds the next head from the committed one plus the first `ready`
    /// sealed segments. Returns the head and the pages to upload first.
    /// Retention that needs pages not at hand asks for them on the side and
    /// retires nothing they hold in this commit.
    fn build_commit(&mut self, now: u64, ready: usize) -> (Head, Vec<PageUpload>) {
        let cur = self.head.as_ref().expect("running");
        let mut h = cur.clone();
        h.generation += 1;
        h.epoch = self.epoch;
        h.committed_at_ms = now;
        for s in self.sealed.iter().take(ready) {
            h.segments.push(s.entry.clone());
            h.committed_lsn = s.entry.last_lsn;
        }
        // Snapshot.
        if let Some(s) = self.snapshot.as_ref().filter(|s| s.delta.is_some()) {
            if s.up == Up::Done && s.entry.lsn <= h.committed_lsn {
                if let Some(d) = &s.delta {
                    super::delta::add_delta(&mut h, d.clone(), now);
                }
            }
        } else if let Some(s) = &self.snapshot {
            if s.up == Up::Done && s.entry.lsn <= h.committed_lsn {
                // The new snapshot covers every delta over the old one.
                for d in h.deltas.drain(..) {
                    h.retired.push(Retired {
                        key: d.key,
                        since_ms: now,
                    });
                }
                if let Some(old) = h.snapshot.replace(s.entry.clone()) {
                    h.retired.push(Retired {
                        key: old.key,
                        since_ms: now,
                    });
                }
            }
        }
        // Forget retirees already deleted.
        h.retired.retain(|r| !self.deleted.contains(&r.key));
        // Anything a head cannot have retired leaves the list undeleted.
        let kept = std::mem::take(&mut h.retired);
        h.retired = kept
            .into_iter()
            .filter(|r| super::retention::retirable(&h, &r.key))
            .collect();
        // Snapshots and deltas retire what they replace however long the
        // list is (deletions that keep failing, a long grace period): past
        // `MAX_RETIRED` the oldest entries leave it, and stay in the store
        // undeleted, so that the head keeps within its size bound.
        let over = h
            .retired
            .len()
            .saturating_sub(super::retention::MAX_RETIRED);
        if over > 0 {
            let oldest = h.retired[0].key.clone();
            h.retired.drain(..over);
            self.events.push_back(Event::Error(
                Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "{over} retired objects left the retired list undeleted (deletions \
                         are not keeping up with the grace period); the oldest stays in the store"
                    ),
                )
                .with_object(oldest),
            ));
        }
        // Retention.
        self.retire_expired(&mut h, now);
        // Key filters only for segments past the chain: a lazy replica
        // never replays the segments the snapshot and its deltas cover.
        if let Some(end) = h.delta_lsn() {
            for s in h.segments.iter_mut().filter(|s| s.last_lsn <= end) {
                s.filter = None;
            }
        }
        // And at most `MAX_HEAD_FILTER_BYTES` of them, the newest segments'
        // (the older ones' leave the head first, as the chain covers them).
        let mut budget = super::MAX_HEAD_FILTER_BYTES;
        for s in h.segments.iter_mut().rev() {
            if let Some(f) = &s.filter {
                let n = f.encoded_len();
                if n > budget {
                    s.filter = None;
                    budget = 0;
                } else {
                    budget -= n;
                }
            }
        }
        // Paging.
        let uploads = self.page_out(&mut h);
        self.fill_tail(&mut h, ready);
        self.sign_fields(&mut h);
        (h, uploads)
    }

    /// Carries copies of the newest inline segments in the head, newest
    /// first back to the first that has no body at hand or would take the
    /// tail past `tail_bytes`: the segments this commit adds and, while
    /// those are small (at most [`CARRY_SHARE`] of `tail_bytes`), those the
    /// committed head already carried. A replica that read the committed
    /// head needs nothing else to apply this one; at low write rates a
    /// replica polling once a second finds every commit since its last poll
    /// in the head. Once a commit's own segments are larger, a poll finds
    /// more commits than the tail could hold anyway, so each segment goes
    /// into one head only and the heads' bytes stay about the segments'.
    fn fill_tail(&self, h: &mut Head, ready: usize) {
        let budget = self.cfg.tail_bytes.min(crate::catalog::MAX_TAIL_BYTES);
        let own: usize = self.sealed.iter().take(ready).map(|s| s.bytes.len()).sum();
        let carry = own <= budget / CARRY_SHARE;
        let cur = self.head.as_ref().filter(|_| carry);
        // A copy the committed head carried is carried on only when it is
        // the segment's bytes: after a claim that head is another
        // publisher's, and a wrong copy would be republished (and signed).
        let body = |e: &crate::catalog::SegmentEntry| -> Option<&[u8]> {
            self.sealed
                .iter()
                .take(ready)
                .find(|s| s.entry.key == e.key)
                .map(|s| s.bytes.as_slice())
                .or_else(|| {
                    cur.and_then(|c| c.tail_body(&e.key))
                        .filter(|b| b.len() as u64 == e.size && crate::crc::hash(b) == e.crc32)
                })
        };
        let mut tail = Vec::new();
        let mut total = 0usize;
        for e in h.segments.iter().rev() {
            let Some(b) = body(e) else { break };
            if total + b.len() > budget {
                break;
            }
            total += b.len();
            tail.push(TailSegment {
                key: e.key.clone(),
                body: b.to_vec(),
            });
        }
        tail.reverse();
        h.tail = tail;
    }

    pub(super) fn committed(&mut self, etag: Option<String>) {
        let Some(c) = self.commit.take() else {
            return;
        };
        self.adopt(c.proposed, etag);
    }

    /// Makes `h`, a head this publisher wrote and saw land, the base of the
    /// next commit.
    fn adopt(&mut self, h: Head, etag: Option<String>) {
        self.commit = None;
        self.behind_reads = 0;
        self.attempts.remove(HEAD_KEY);
        while self
            .sealed
            .front()
            .is_some_and(|s| s.entry.last_lsn <= h.committed_lsn)
        {
            self.sealed.pop_front();
        }
        if self.snapshot.as_ref().is_some_and(|s| match &s.delta {
            Some(d) => !super::delta::still_applies(&h, d),
            None => {
                h.snapshot.as_ref().is_some_and(|x| x.key == s.entry.key)
                    || s.entry.lsn <= h.snapshot.as_ref().map_or(0, |x| x.lsn)
            }
        }) {
            self.snapshot = None;
        }
        self.deleted
            .retain(|k| h.retired.iter().any(|r| &r.key == k));
        self.events.push_back(Event::Committed {
            lsn: h.committed_lsn,
            generation: h.generation,
            head_bytes: h.encode().len() as u64,
        });
        self.forget_digests(&h);
        self.head = Some(h);
        self.deletes_quiet_until = None;
        self.etag = etag;
    }

    pub(super) fn on_verify(&mut self, now: u64, resp: GetResponse) {
        let body = match &resp {
            GetResponse::Ok { body, .. } => body.clone(),
            _ => Vec::new(),
        };
        let read = Self::decode_head(resp);
        let Some(c) = self.commit.as_ref() else {
            return;
        };
        match read {
            Ok(Some((h, etag))) => {
                if self.taken_by_another(&h, c.proposed.dataset_id) {
                    self.lost_to(&h);
                } else if h == c.proposed {
                    // Our write landed; its acknowledgement was lost.
                    self.committed(etag);
                } else if h.epoch == self.epoch
                    && h.generation > self.head.as_ref().map_or(0, |x| x.generation)
                {
                    // An earlier write of ours landed after we thought it had
                    // not (its answer was lost, then a stale read misled us):
                    // build on what is really there, once its signature says
                    // it is ours.
                    match self.check_signed(&body, &h) {
                        Ok(()) => self.adopt(h, etag),
                        Err(e) => self.fence(e),
                    }
                } else if self.head.as_ref() == Some(&h) {
                    // Our write did not land; the head is still ours. Retry.
                    self.behind_reads = 0;
                    self.etag = etag;
                    self.commit = None;
                    let d = self.backoff(
                        HEAD_KEY,
                        Error::new(
                            ErrorKind::Unavailable,
                            format!("head write failed: {}", self.cas_answer),
                        )
                        .with_object(HEAD_KEY),
                    );
                    self.commit_retry_at = Some(now + d);
                } else {
                    // A stale read: look again (a head that stays behind
                    // stops this publisher).
                    self.head_went_back(Some(&h));
                    if self.role != Role::Running {
                        return;
                    }
                    let d = self.backoff(
                        HEAD_KEY,
                        Error::new(ErrorKind::Unavailable, "stale head read").with_object(HEAD_KEY),
                    );
                    self.reverify_at(now + d);
                }
            }
            Ok(None) => {
                self.head_went_back(None);
                if self.role != Role::Running {
                    return;
                }
                let d = self.backoff(
                    HEAD_KEY,
                    Error::new(ErrorKind::NotFound, "the head vanished").with_object(HEAD_KEY),
                );
                self.reverify_at(now + d);
            }
            Err(e) => {
                let d = self.backoff(HEAD_KEY, e);
                self.reverify_at(now + d);
            }
        }
    }

    fn reverify_at(&mut self, t: u64) {
        self.verify_at = Some(t);
    }
}
