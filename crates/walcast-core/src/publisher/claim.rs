//! Owning the dataset: claiming it with a new epoch (or creating it),
//! noticing a claim whose answer was lost, and fencing this publisher for
//! good once another one owns the dataset.

use crate::catalog::{DatasetId, Head, HEAD_KEY};
use crate::error::{Error, ErrorKind};
use crate::io::GetResponse;
use crate::rng::splitmix64;

use super::{Event, ObjectKind, Publisher, PutCondition, Req, Role};

/// The key the idle checks' failures in a row are counted under (apart
/// from the head's writes, and reset by a check that reads the head).
const CHECK_KEY: &str = "head check";

impl Publisher {
    pub(super) fn on_claim_read(&mut self, now: u64, resp: GetResponse) {
        let body = match &resp {
            GetResponse::Ok { body, .. } => body.clone(),
            _ => Vec::new(),
        };
        let read = match Self::decode_head(resp) {
            Ok(r) => r,
            Err(e) => {
                let d = self.backoff(HEAD_KEY, e);
                self.retry_at = now + d;
                self.role = Role::Start;
                return;
            }
        };
        // Did our earlier claim land (its answer lost)?
        if let (Some(_), Some((_, None))) = (&self.claim, &read) {
            // Our claim may have landed, but with no ETag every commit's
            // conditional write would fail for ever: fenced, as below.
            self.fence(
                Error::new(
                    ErrorKind::InvalidInput,
                    "the store returned no ETag for the head: conditional writes are impossible",
                )
                .with_object(HEAD_KEY),
            );
            return;
        }
        if let (Some(claim), Some((h, etag))) = (&self.claim, &read) {
            if h.dataset_id == claim.dataset_id
                && h.epoch == claim.epoch
                && h.generation == claim.generation
                && h.writer == claim.writer
            {
                let h = h.clone();
                let etag = etag.clone();
                self.claimed(h, etag);
                return;
            }
        }
        self.claim_attempts += 1;
        if self.claim_attempts > 32 {
            let last = self
                .claim_failure
                .as_deref()
                .map_or(String::new(), |m| format!("; the store's last answer: {m}"));
            self.fence(
                Error::new(
                    ErrorKind::Unavailable,
                    format!("could not claim the dataset after 32 attempts{last}"),
                )
                .with_object(HEAD_KEY),
            );
            return;
        }
        let (mut proposed, cond) = match read {
            None => {
                let id = DatasetId::from_seed(splitmix64(&mut self.rng));
                let mut h = Head::new(id, 1);
                h.committed_at_ms = now;
                h.writer = self.writer.clone();
                (h, PutCondition::CreateOnly)
            }
            Some((h, etag)) => {
                let Some(etag) = etag else {
                    self.fence(Error::new(ErrorKind::InvalidInput, "the store returned no ETag for the head: conditional writes are impossible").with_object(HEAD_KEY));
                    return;
                };
                // Signed or not is the dataset's for good: a head without
                // a signature would stop every reader that pins its key,
                // and history published unsigned has no digests a signed
                // head could record (those readers would refuse it too).
                let refused = match (&h.trust, &self.cfg.signing_key) {
                    (Some(t), None) if !self.cfg.drop_signature => Some(format!(
                        "the dataset is signed (by {}): publish it with its signing key \
                         (--signing-key), or unsigned from now on (--drop-signature; \
                         replicas that pin its key then refuse it)",
                        t.signer
                    )),
                    (None, Some(_)) if h.committed_lsn > 0 => Some(
                        "the dataset was published unsigned: its objects have no digests a \
                         signed head could record; sign a new dataset from its start instead"
                            .to_string(),
                    ),
                    _ => None,
                };
                if let Some(msg) = refused {
                    self.fence(Error::new(ErrorKind::InvalidInput, msg).with_object(HEAD_KEY));
                    return;
                }
                if let Err(e) = self.check_signed(&body, &h) {
                    self.fence(e);
                    return;
                }
                // Half the range: commits go on adding one to the generation.
                let (Some(epoch), Some(generation)) = (
                    h.epoch.checked_add(1),
                    h.generation.checked_add(1).filter(|g| *g < u64::MAX / 2),
                ) else {
                    self.fence(
                        Error::new(
                            ErrorKind::Data,
                            format!(
                                "the head's epoch ({}) or generation ({}) is at its largest: no publisher can follow it",
                                h.epoch, h.generation
                            ),
                        )
                        .with_object(HEAD_KEY),
                    );
                    return;
                };
                let mut p = h.clone();
                // Only this epoch retires keys of this epoch or later, and
                // only what a head can have retired is deleted: a hostile
                // or broken writer's list must not delete what this
                // publisher names or is about to write.
                let kept = std::mem::take(&mut p.retired);
                p.retired = kept
                    .into_iter()
                    .filter(|r| {
                        super::retention::key_epoch(&r.key).is_some_and(|e| e < epoch)
                            && super::retention::retirable(&h, &r.key)
                    })
                    .collect();
                p.epoch = epoch;
                p.generation = generation;
                p.committed_at_ms = now;
                p.writer = self.writer.clone();
                (p, PutCondition::IfMatch(etag))
            }
        };
        self.role = Role::Claiming;
        self.sign_fields(&mut proposed);
        let body = self.encode_head(&proposed);
        self.claim = Some(proposed);
        let a = self.put(Req::ClaimPut, HEAD_KEY.into(), body, cond, ObjectKind::Head);
        self.queued.push_back(a);
    }

    pub(super) fn claimed(&mut self, h: Head, etag: Option<String>) {
        self.role = Role::Running;
        self.epoch = h.epoch;
        self.claim = None;
        self.attempts.remove(HEAD_KEY);
        self.next_push = if self.state.is_some() {
            1
        } else {
            h.committed_lsn + 1
        };
        self.events.push_back(Event::Claimed {
            epoch: h.epoch,
            dataset_id: h.dataset_id,
            committed_lsn: h.committed_lsn,
        });
        self.head = Some(h);
        self.deletes_quiet_until = None;
        self.etag = etag;
        self.start_placing();
    }

    /// Stops for good, reporting `err`.
    pub(super) fn stop(&mut self, err: Error) {
        self.commit = None;
        self.fence(err);
    }

    pub(super) fn fence(&mut self, err: Error) {
        self.role = Role::Fenced;
        // Nothing more goes out.
        self.queued.clear();
        self.events.push_back(Event::Fenced(err));
    }

    /// Whether `h` shows the dataset owned by another publisher: a newer
    /// epoch, our epoch claimed by another writer, or another dataset.
    pub(super) fn taken_by_another(&self, h: &Head, ours: DatasetId) -> bool {
        h.epoch > self.epoch
            || h.dataset_id != ours
            || (h.epoch == self.epoch && h.writer != self.writer)
    }

    /// Stops for good: `h` belongs to another publisher.
    pub(super) fn lost_to(&mut self, h: &Head) {
        self.commit = None;
        let ours = self.head.as_ref().map(|o| o.dataset_id);
        let msg = match ours {
            // A new dataset at the prefix, or another dataset's head.
            Some(d) if d != h.dataset_id => format!(
                "the head is now dataset {}'s, epoch {} (ours: dataset {d}, epoch {})",
                h.dataset_id, h.epoch, self.epoch
            ),
            _ => format!(
                "epoch {} now owns the dataset (ours is {})",
                h.epoch, self.epoch
            ),
        };
        self.fence(Error::new(ErrorKind::Fenced, msg).with_object(HEAD_KEY));
    }

    pub(super) fn on_check(&mut self, now: u64, resp: GetResponse) {
        self.check_inflight = false;
        self.next_check = now + self.cfg.head_check_ms;
        if self.role != Role::Running {
            return;
        }
        let Some(ours) = self.head.as_ref() else {
            return;
        };
        match Self::decode_head(resp) {
            Ok(Some((h, _))) if self.taken_by_another(&h, ours.dataset_id) => self.lost_to(&h),
            // Behind our last commit, or (whatever its generation) of an
            // epoch below ours: an older writer's write over our claim,
            // which only a store that does not enforce conditional writes
            // lets through. Deletes wait while it lasts; it stops us.
            Ok(Some((h, _))) if h.generation < ours.generation || h.epoch < self.epoch => {
                self.head_went_back(Some(&h));
                self.check_later(now);
            }
            Ok(Some(_)) => {
                self.behind_reads = 0;
                self.attempts.remove(CHECK_KEY);
            }
            Ok(None) => {
                self.head_went_back(None);
                self.check_later(now);
            }
            // A head this publisher cannot read (damaged, or a newer
            // release's): reported after `max_attempts` checks in a row, as
            // a commit's reads of it are, and checked again after a backoff.
            Err(e) => {
                let d = self.backoff(CHECK_KEY, e);
                self.next_check = now + d.max(self.cfg.head_check_ms);
            }
        }
    }

    /// The next check of a head behind ours waits out a backoff, as a
    /// commit's re-reads do: the reads that stop the publisher span a
    /// minute or more, not 16 check intervals.
    fn check_later(&mut self, now: u64) {
        let err = Error::new(
            ErrorKind::Unavailable,
            "the head read is behind this publisher's last commit",
        )
        .with_object(HEAD_KEY);
        let d = self.backoff(HEAD_KEY, err);
        self.next_check = now + d.max(self.cfg.head_check_ms);
    }
}
