//! Issuing requests and accounting for their outcomes: request ids, the
//! next wake-up time, retry backoff with jitter, per-object failure counts,
//! and the error an unusable answer stands for.

use crate::error::{Error, ErrorKind};
use crate::io::{ByteRange, GetRequest, GetResponse, RequestId};
use crate::rng::splitmix64;

use super::{Action, Event, Job, Replica};
use crate::catalog::HEAD_KEY;

/// The slowest transfer a GET's time limit allows for, in bytes a second:
/// a segment, snapshot window or block GET may take
/// [`super::ReplicaConfig::request_timeout_ms`] plus the time its bytes
/// take at this rate (an 8 MiB segment: 64 s more), at most
/// [`MAX_TRANSFER_ALLOWANCE_MS`] more.
pub const MIN_TRANSFER_BYTES_PER_SEC: u64 = 128 * 1024;

/// The largest snapshot a replica takes as one whole answer to a window's
/// range GET (a server that ignores `Range`); a larger one must be served
/// by ranges, so no answer holds more than a window.
pub const MAX_WHOLE_SNAPSHOT_ANSWER: u64 = 64 << 20;

/// The most a GET's time limit grows by the bytes it expects (ms), so that
/// drivers watching for stuck syncs (the worker's) can bound a live one.
pub const MAX_TRANSFER_ALLOWANCE_MS: u64 = 90_000;

/// The time a GET expecting `bytes` gets on top of the plain request
/// limit: those bytes at [`MIN_TRANSFER_BYTES_PER_SEC`], at most
/// [`MAX_TRANSFER_ALLOWANCE_MS`] (replicas' GETs and the publisher's
/// read-backs alike).
pub(crate) fn transfer_allowance_ms(bytes: u64) -> u64 {
    (bytes.saturating_mul(1000) / MIN_TRANSFER_BYTES_PER_SEC).min(MAX_TRANSFER_ALLOWANCE_MS)
}

impl Replica {
    pub(super) fn wait(&mut self, now: u64) -> Action {
        let mut until = u64::MAX;
        if !self.head_inflight {
            if let Some(t) = self.head_due {
                until = until.min(t);
            }
        }
        // A retry already due waits for a free slot (or for a read that
        // needs it, when deferred): an answer wakes the driver then. Asking
        // to be woken now would make it spin without ever waiting.
        for (_, t) in self.retry_at.iter() {
            if *t > now {
                until = until.min(*t);
            }
        }
        if let Some(t) = self.backoff_until {
            until = until.min(t);
        }
        Action::Wait {
            until: until.max(now),
        }
    }

    pub(super) fn fetch(
        &mut self,
        job: Job,
        key: String,
        range: Option<ByteRange>,
        inm: Option<String>,
    ) -> Action {
        self.next_id += 1;
        let id = RequestId(self.next_id);
        // The most bytes this job can use: a server that ignores `Range`
        // may answer with the whole object, whose size the catalog states
        // (a lazy read takes it only when it fits the cache).
        let max_bytes = match &job {
            Job::Head => crate::catalog::MAX_HEAD_BYTES as u64,
            Job::Page(_) => crate::catalog::MAX_PAGE_BYTES as u64,
            Job::Segment(u) => u.entry.size,
            // The whole snapshot when it is small enough to take in one
            // answer (a server that ignores `Range`); else the window asked for.
            Job::Snapshot { .. } => match (self.bootstrap.as_ref(), &range) {
                (None, _) => 0,
                (Some(b), _) if b.entry.size <= MAX_WHOLE_SNAPSHOT_ANSWER => b.entry.size,
                (Some(_), Some(ByteRange::Bounded { start, end })) => end.saturating_sub(*start),
                (Some(b), _) => b.entry.size,
            },
            Job::Block(j) => self.lazy.as_ref().map_or(0, |l| match j.record {
                // A record: its range, never its segment whole.
                Some(_) => l.job_bytes(j),
                None => l.max_bytes(&j.snapshot, range.as_ref()),
            }),
        };
        // A segment, snapshot window or block gets the time to move the
        // bytes it expects at MIN_TRANSFER_BYTES_PER_SEC on top of the
        // limit, so a large object on a slow link is not cut off (and
        // retried from the start) for ever; the head (at most 1 MiB) and
        // pages (a few KiB as publishers write them, though a page of up
        // to 16 MiB is accepted) keep the plain limit.
        let expected = match (&job, &range) {
            (Job::Head | Job::Page(_), _) => 0,
            (_, Some(ByteRange::Bounded { start, end })) => end.saturating_sub(*start),
            (_, Some(ByteRange::Suffix(n))) => *n,
            (_, None) => max_bytes,
        };
        let timeout_ms = self
            .cfg
            .request_timeout_ms
            .saturating_add(transfer_allowance_ms(expected));
        self.pending.insert(id.0, job);
        self.requests += 1;
        Action::Fetch(GetRequest {
            id,
            key,
            range,
            if_none_match: inm,
            wait_ms: None,
            timeout_ms,
            max_bytes,
        })
    }

    fn backoff_delay(&mut self, attempts: u32) -> u64 {
        let exp = self
            .cfg
            .retry_base_ms
            .saturating_mul(1u64 << attempts.min(20))
            .min(self.cfg.retry_max_ms);
        let jitter = splitmix64(&mut self.rng) % (exp / 2 + 1);
        exp / 2 + jitter
    }

    /// Records a failure of `key` on the way to catching up (a segment,
    /// page, snapshot or the head); returns the retry delay, and reports an
    /// error event once attempts at `key` reach the limit, or once objects
    /// other than the head failed `max_attempts` rounds in a row without
    /// the replica getting anywhere (a round: [`STREAK_FACTOR`] failures, or
    /// twice `max_inflight` if more, as a blip fails every GET in flight).
    /// A server naming a new object in every head would otherwise never
    /// reach the limit for any one key; the delay grows with the rounds.
    pub(super) fn failure(&mut self, key: &str, err: Error) -> u64 {
        let n = self.count_failure(key);
        let mut report = n == self.cfg.max_attempts;
        if key != HEAD_KEY {
            self.failure_streak = self.failure_streak.saturating_add(1);
            report |= self.failure_streak == self.cfg.max_attempts.saturating_mul(self.per_round());
        }
        if report {
            self.events.push_back(Event::Error(err.clone()));
        }
        self.last_error = Some(err);
        self.backoff_delay(n.max(self.failure_streak / self.per_round()))
    }

    /// Records a failure of a GET a lazy read made (a block, a deferred
    /// segment): counted for `key` and kept as the last error, and not part
    /// of the streak that measures catching up. No [`Event::Error`]: the
    /// read that needed the GET answers with the error itself, and an event
    /// would end a sync (or a native open) running beside it that had
    /// nothing to do with the read.
    pub(super) fn read_failure(&mut self, key: &str, err: Error) {
        self.count_failure(key);
        self.last_error = Some(err);
    }

    fn count_failure(&mut self, key: &str) -> u32 {
        match self.attempts.iter_mut().find(|(k, _)| k == key) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                // The head's count is kept: it says whether the last head
                // read failed.
                if self.attempts.len() >= MAX_TRACKED_FAILURES {
                    if let Some(i) = self.attempts.iter().position(|(k, _)| k != HEAD_KEY) {
                        self.attempts.remove(i);
                    }
                }
                self.attempts.push((key.to_string(), 1));
                1
            }
        }
    }

    /// Failures in a row that make one round of the streak.
    fn per_round(&self) -> u32 {
        u32::try_from(self.cfg.max_inflight.saturating_mul(2))
            .unwrap_or(u32::MAX)
            .max(STREAK_FACTOR)
    }

    /// How long to wait before re-reading the head after an object failed
    /// verification: at once in the first round of failures, then backing
    /// off as rounds without progress pile up.
    pub(super) fn distrust_delay(&mut self) -> u64 {
        let rounds = self.failure_streak / self.per_round();
        if rounds == 0 {
            0
        } else {
            self.backoff_delay(rounds)
        }
    }

    /// Forgets the failures of `key` after it was read.
    pub(super) fn success(&mut self, key: &str) {
        self.attempts.retain(|(k, _)| k != key);
    }

    /// The replica got somewhere (it applied batches, or loaded a
    /// snapshot): the streak of failures starts over. Other reads that
    /// succeed (a page, a lazy read's block) do not end it: a server can
    /// answer those and fail every batch.
    pub(super) fn progress(&mut self) {
        self.failure_streak = 0;
    }
}

/// Objects whose failures are counted at once; past this the oldest count
/// is dropped (a hostile server can name endless new keys).
const MAX_TRACKED_FAILURES: usize = 64;

/// Failures in a row of objects other than the head that make a round of
/// the streak (at least; twice `max_inflight` when that is more):
/// [`super::ReplicaConfig::max_attempts`] rounds report an error event.
pub(super) const STREAK_FACTOR: u32 = 8;

pub(super) fn unavailable(resp: &GetResponse) -> Error {
    match resp {
        GetResponse::Failed { status, message } => Error::new(
            ErrorKind::Unavailable,
            match status {
                Some(s) => format!("HTTP {s}: {message}"),
                None => message.clone(),
            },
        ),
        GetResponse::RangeNotSatisfiable => Error::new(
            ErrorKind::Data,
            "416: the object is shorter than the catalog says",
        ),
        GetResponse::NotModified => Error::new(ErrorKind::Unavailable, "unexpected 304"),
        GetResponse::NotFound => Error::new(ErrorKind::NotFound, "404"),
        GetResponse::Ok { .. } => Error::new(ErrorKind::Unavailable, "unexpected answer"),
    }
}
