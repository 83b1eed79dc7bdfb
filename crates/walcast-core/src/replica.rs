//! The replica's replay machine: decides what to GET, verifies what comes
//! back, and applies batches in dense LSN order.
//!
//! The machine is pure: no IO, no clock, no randomness of its own. Drive it
//! like this, and after every call that feeds it, drain [`Replica::poll`]
//! until it returns [`Action::Wait`]:
//!
//! ```
//! use walcast_core::replica::{Action, Replica, ReplicaConfig};
//! use walcast_core::io::GetResponse;
//!
//! let mut replica = Replica::new(ReplicaConfig::default(), 42);
//! let now = 0;
//! match replica.poll(now) {
//!     Action::Fetch(req) => {
//!         assert_eq!(req.key, "catalog/head.json");
//!         // perform the GET, then:
//!         replica.handle_response(req.id, now, GetResponse::NotFound);
//!     }
//!     other => panic!("unexpected {other:?}"),
//! }
//! // The head does not exist yet: the machine notes it and backs off.
//! assert!(matches!(replica.poll(now), Action::Wait { until } if until > now));
//! let err = replica.status(now).last_error.expect("reported");
//! assert_eq!(err.kind(), walcast_core::ErrorKind::NotFound);
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::batch;
use crate::catalog::{DatasetId, Head, Page, PageRef, SegmentEntry, HEAD_KEY};
use crate::error::{Error, ErrorKind};
use crate::io::{ByteRange, ContentRange, GetRequest, GetResponse, RequestId};
use crate::rng::splitmix64;
use crate::segment::{self, IndexEntry, Records};
use crate::snapshot::SnapshotDecoder;
use crate::state::KvState;

/// Catalog pages kept at once; more than the deepest valid descent
/// ([`crate::catalog::MAX_PAGE_LEVEL`] + 1 pages).
const MAX_CACHED_PAGES: usize = 64;

/// Head reads behind the applied LSN, at the least, before a rewind.
const REWIND_MIN_READS: u32 = 16;

/// What the replica does with verified records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Records are KV batches applied to the built-in [`KvState`]; the
    /// replica bootstraps from snapshots.
    #[default]
    Kv,
    /// Each verified record is handed to the caller as
    /// [`Event::Record`]; snapshots are not used, and a gap is reported as
    /// [`Event::Gap`].
    Raw,
}

/// Tuning for a [`Replica`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// How often an idle replica polls the head (ms).
    pub poll_interval_ms: u64,
    /// Most segment or snapshot GETs in flight at once.
    pub max_inflight: usize,
    /// First retry delay (ms); doubles per attempt, with jitter.
    pub retry_base_ms: u64,
    /// Longest retry delay (ms).
    pub retry_max_ms: u64,
    /// Failed attempts at one object before [`Event::Error`] is reported
    /// (the replica keeps retrying after that, at the longest delay).
    pub max_attempts: u32,
    /// Timeout the driver applies to each request (ms).
    pub request_timeout_ms: u64,
    /// Bytes per range GET while loading a snapshot.
    pub snapshot_window: u64,
    /// Built-in KV state or raw records.
    pub mode: Mode,
    /// How long (ms) every head read must commit less than the applied LSN
    /// before the replica concludes the dataset's history went back (a
    /// restored bucket, not a stale cache), reports it and starts over.
    pub rewind_after_ms: u64,
    /// KV mode: also hand each applied record to the driver as
    /// [`Event::Record`] (before its [`Event::Applied`]), e.g. to append it
    /// to a local log so a restart does not refetch it.
    pub emit_records: bool,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            poll_interval_ms: 1000,
            max_inflight: 4,
            retry_base_ms: 100,
            retry_max_ms: 30_000,
            max_attempts: 4,
            request_timeout_ms: 30_000,
            snapshot_window: 8 << 20,
            mode: Mode::Kv,
            rewind_after_ms: 60_000,
            emit_records: false,
        }
    }
}

/// Something that happened, for the driver to act on or report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Batches `first..=last` were applied (atomically per batch). Persist
    /// the position when convenient.
    Applied {
        /// First LSN applied.
        first: u64,
        /// Last LSN applied; the new applied LSN.
        last: u64,
    },
    /// A verified record, in LSN order (raw mode, or KV mode with
    /// [`ReplicaConfig::emit_records`]).
    Record {
        /// The record's LSN.
        lsn: u64,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// The state was replaced from a snapshot at `lsn` (a fresh start, a gap
    /// behind retention, or a new dataset). A persisted copy must be rewritten.
    Bootstrapped {
        /// The snapshot's LSN, now the applied LSN.
        lsn: u64,
        /// The dataset it belongs to.
        dataset_id: DatasetId,
    },
    /// The dataset id changed, or its history went back behind the applied
    /// LSN for good (a bucket restored from a backup): the old state was
    /// discarded and the replica starts over.
    DatasetChanged {
        /// The new dataset id.
        dataset_id: DatasetId,
    },
    /// Raw mode: LSNs `from..=to` are no longer available and were skipped.
    Gap {
        /// First missing LSN.
        from: u64,
        /// Last missing LSN.
        to: u64,
    },
    /// The replica holds everything committed as of the head it last read.
    CaughtUp {
        /// The applied LSN, equal to that head's `committed_lsn`.
        lsn: u64,
    },
    /// A failure that persisted through retries. The replica keeps its last
    /// good state and keeps retrying.
    Error(Error),
}

/// What the driver should do next.
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Perform this GET and pass the outcome to [`Replica::handle_response`].
    Fetch(GetRequest),
    /// Report or act on an event, then poll again.
    Event(Event),
    /// Nothing to do until `until` (ms), or until a response arrives.
    Wait {
        /// Next time to call [`Replica::poll`].
        until: u64,
    },
}

/// Replica state, as reported by [`Replica::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the head for the first time.
    Starting,
    /// Loading a snapshot.
    Bootstrapping,
    /// Fetching and applying segments.
    CatchingUp,
    /// Caught up; polling the head.
    Idle,
    /// Backing off after a failure.
    Retrying,
}

impl Phase {
    /// Stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Bootstrapping => "bootstrapping",
            Phase::CatchingUp => "catching_up",
            Phase::Idle => "idle",
            Phase::Retrying => "retrying",
        }
    }
}

/// A snapshot of the replica's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Highest LSN applied.
    pub applied_lsn: u64,
    /// Highest committed LSN seen in a head.
    pub committed_lsn: u64,
    /// Epoch of the newest head seen.
    pub epoch: u64,
    /// The dataset, once known.
    pub dataset_id: Option<DatasetId>,
    /// ms between the commit of the newest head seen and `now`, when caught
    /// up to it; while behind, ms since that head was committed.
    pub lag_ms: u64,
    /// When the head was last read successfully (200 or 304), in ms.
    pub last_poll_at: Option<u64>,
    /// What the machine is doing.
    pub phase: Phase,
    /// The last error reported, cleared by the next success.
    pub last_error: Option<Error>,
    /// Requests issued so far.
    pub requests: u64,
    /// Body bytes received so far.
    pub bytes_received: u64,
}

#[derive(Debug, Clone)]
enum Job {
    Head,
    Page(PageRef),
    Segment(Unit),
    Snapshot { offset: u64 },
}

#[derive(Debug, Clone)]
struct Unit {
    entry: SegmentEntry,
    start: IndexEntry,
    /// First LSN to apply from this unit.
    from: u64,
}

#[derive(Debug)]
struct Verified {
    bytes: Vec<u8>,
    /// (lsn, start, end) of each payload to apply, ascending from `from`.
    records: Vec<(u64, usize, usize)>,
}

#[derive(Debug)]
struct Bootstrap {
    entry: crate::catalog::SnapshotEntry,
    dataset_id: DatasetId,
    decoder: SnapshotDecoder,
    next: u64,
    inflight: bool,
}

/// The replay machine.
#[derive(Debug)]
pub struct Replica {
    cfg: ReplicaConfig,
    rng: u64,
    next_id: u64,

    state: KvState,
    applied: u64,
    dataset: Option<DatasetId>,
    epoch: u64,

    head: Option<Head>,
    etag: Option<String>,
    committed: u64,
    committed_at_ms: u64,
    last_poll_at: Option<u64>,
    last_error: Option<Error>,
    requests: u64,
    bytes: u64,

    /// Head fetch wanted at or after this time.
    head_due: Option<u64>,
    head_inflight: bool,
    head_fresh: bool,
    started: bool,

    /// Units planned, in LSN order; the front is applied next.
    plan: VecDeque<Unit>,
    /// LSN after the last planned unit.
    plan_next: u64,
    /// Page needed to extend the plan.
    page_wanted: Option<PageRef>,
    page_inflight: bool,
    /// Verified pages by key, with the reference each was verified against.
    pages: HashMap<String, (PageRef, Page)>,
    /// Results by the unit's `from` LSN.
    ready: BTreeMap<u64, Verified>,
    inflight_units: HashMap<u64, ()>,
    /// Units waiting out a backoff: `from` -> (retry at).
    retry_at: HashMap<u64, u64>,

    bootstrap: Option<Bootstrap>,
    pending: HashMap<RequestId, Job>,
    attempts: HashMap<String, u32>,
    backoff_until: Option<u64>,
    events: VecDeque<Event>,
    caught_up_reported: bool,
    /// Since when every head read commits less than `applied`, and how many.
    behind_since: Option<u64>,
    behind_reads: u32,
}

impl Replica {
    /// A fresh replica with no state. `seed` drives retry jitter.
    pub fn new(cfg: ReplicaConfig, seed: u64) -> Self {
        Replica {
            cfg,
            rng: seed,
            next_id: 0,
            state: KvState::new(),
            applied: 0,
            dataset: None,
            epoch: 0,
            head: None,
            etag: None,
            committed: 0,
            committed_at_ms: 0,
            last_poll_at: None,
            last_error: None,
            requests: 0,
            bytes: 0,
            head_due: Some(0),
            head_inflight: false,
            head_fresh: true,
            started: false,
            plan: VecDeque::new(),
            plan_next: 1,
            page_wanted: None,
            page_inflight: false,
            pages: HashMap::new(),
            ready: BTreeMap::new(),
            inflight_units: HashMap::new(),
            retry_at: HashMap::new(),
            bootstrap: None,
            pending: HashMap::new(),
            attempts: HashMap::new(),
            backoff_until: None,
            events: VecDeque::new(),
            caught_up_reported: false,
            behind_since: None,
            behind_reads: 0,
        }
    }

    /// A replica resuming from a persisted position: `state` holds every
    /// batch up to `applied_lsn` of `dataset_id`.
    pub fn restore(
        cfg: ReplicaConfig,
        seed: u64,
        state: KvState,
        applied_lsn: u64,
        dataset_id: DatasetId,
        epoch: u64,
    ) -> Self {
        let mut r = Replica::new(cfg, seed);
        r.state = state;
        r.applied = applied_lsn;
        r.committed = applied_lsn;
        r.dataset = Some(dataset_id);
        r.epoch = epoch;
        r.plan_next = applied_lsn + 1;
        r
    }

    /// The served state (KV mode).
    pub fn state(&self) -> &KvState {
        &self.state
    }

    /// Highest LSN applied.
    pub fn applied_lsn(&self) -> u64 {
        self.applied
    }

    /// The dataset this replica follows, once known.
    pub fn dataset_id(&self) -> Option<DatasetId> {
        self.dataset
    }

    /// Epoch of the newest head seen.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Progress report.
    pub fn status(&self, now: u64) -> Status {
        let phase = if self.bootstrap.is_some() {
            Phase::Bootstrapping
        } else if self.backoff_until.is_some_and(|t| t > now) {
            Phase::Retrying
        } else if !self.started {
            Phase::Starting
        } else if self.applied < self.committed || !self.plan.is_empty() {
            Phase::CatchingUp
        } else {
            Phase::Idle
        };
        Status {
            applied_lsn: self.applied,
            committed_lsn: self.committed,
            epoch: self.epoch,
            dataset_id: self.dataset,
            lag_ms: if self.committed_at_ms == 0 {
                0
            } else {
                now.saturating_sub(self.committed_at_ms)
            },
            last_poll_at: self.last_poll_at,
            phase,
            last_error: self.last_error.clone(),
            requests: self.requests,
            bytes_received: self.bytes,
        }
    }

    /// Asks for a head poll now (for `sync()`): the next [`poll`](Self::poll)
    /// fetches the head unless a fetch is already in flight.
    ///
    /// Failure counts start over, so a sync that keeps failing reports
    /// [`Event::Error`] again after `max_attempts`.
    pub fn sync_now(&mut self, now: u64) {
        self.head_due = Some(now);
        self.backoff_until = None;
        self.caught_up_reported = false;
        self.attempts.clear();
    }

    /// The next thing to do. Call after every input until it returns
    /// [`Action::Wait`].
    pub fn poll(&mut self, now: u64) -> Action {
        if let Some(e) = self.events.pop_front() {
            return Action::Event(e);
        }
        self.apply_ready(now);
        if let Some(e) = self.events.pop_front() {
            return Action::Event(e);
        }
        if let Some(t) = self.backoff_until {
            if t > now {
                return Action::Wait { until: t };
            }
            self.backoff_until = None;
        }
        // Head.
        if !self.head_inflight && self.head_due.is_some_and(|t| t <= now) {
            self.head_due = None;
            self.head_inflight = true;
            let inm = if self.head_fresh {
                None
            } else {
                self.etag.clone()
            };
            self.head_fresh = false;
            return self.fetch(Job::Head, HEAD_KEY.to_string(), None, inm);
        }
        if self.head_inflight && !self.started {
            return self.wait(now);
        }
        // Snapshot.
        if let Some(b) = &mut self.bootstrap {
            if !b.inflight {
                let key = b.entry.key.clone();
                if let Some(t) = self.retry_at.get(&0).copied() {
                    if t > now {
                        return self.wait(now);
                    }
                    self.retry_at.remove(&0);
                }
                b.inflight = true;
                let start = b.next;
                let end = (start + self.cfg.snapshot_window).min(b.entry.size);
                return self.fetch(
                    Job::Snapshot { offset: start },
                    key,
                    Some(ByteRange::Bounded { start, end }),
                    None,
                );
            }
            return self.wait(now);
        }
        // Pages and segments.
        self.extend_plan();
        if let Some(p) = self.page_wanted.clone() {
            if !self.page_inflight {
                self.page_inflight = true;
                let key = p.key.clone();
                return self.fetch(Job::Page(p), key, None, None);
            }
        }
        let inflight = self.inflight_units.len();
        if inflight < self.cfg.max_inflight {
            let next = self
                .plan
                .iter()
                .find(|u| {
                    !self.inflight_units.contains_key(&u.from)
                        && !self.ready.contains_key(&u.from)
                        && self.retry_at.get(&u.from).is_none_or(|t| *t <= now)
                })
                .cloned();
            if let Some(u) = next {
                self.retry_at.remove(&u.from);
                self.inflight_units.insert(u.from, ());
                let range = if u.start.offset == segment::HEADER_LEN {
                    None
                } else {
                    Some(ByteRange::Bounded {
                        start: u.start.offset,
                        end: u.entry.records_end,
                    })
                };
                let key = u.entry.key.clone();
                return self.fetch(Job::Segment(u), key, range, None);
            }
        }
        if self.started
            && self.bootstrap.is_none()
            && self.plan.is_empty()
            && self.page_wanted.is_none()
            && !self.head_inflight
            && self.head_due.is_none()
        {
            // Nothing left to do from the head we hold: read it again.
            if self.applied < self.committed {
                self.head_fresh = true;
            }
            self.head_due = Some(now + self.cfg.poll_interval_ms);
        }
        if self.started
            && self.plan.is_empty()
            && self.page_wanted.is_none()
            && self.applied >= self.committed
            && !self.caught_up_reported
            && !self.head_inflight
        {
            self.caught_up_reported = true;
            return Action::Event(Event::CaughtUp { lsn: self.applied });
        }
        self.wait(now)
    }

    fn wait(&mut self, now: u64) -> Action {
        let mut until = u64::MAX;
        if !self.head_inflight {
            if let Some(t) = self.head_due {
                until = until.min(t);
            }
        }
        for t in self.retry_at.values() {
            until = until.min(*t);
        }
        if let Some(t) = self.backoff_until {
            until = until.min(t);
        }
        Action::Wait {
            until: until.max(now),
        }
    }

    fn fetch(
        &mut self,
        job: Job,
        key: String,
        range: Option<ByteRange>,
        inm: Option<String>,
    ) -> Action {
        self.next_id += 1;
        let id = RequestId(self.next_id);
        // The most bytes this job can use: a server that ignores `Range`
        // may answer with the whole object, whose size the catalog states.
        let max_bytes = match &job {
            Job::Head => crate::catalog::MAX_HEAD_BYTES as u64,
            Job::Page(_) => crate::catalog::MAX_PAGE_BYTES as u64,
            Job::Segment(u) => u.entry.size,
            Job::Snapshot { .. } => self.bootstrap.as_ref().map_or(0, |b| b.entry.size),
        };
        self.pending.insert(id, job);
        self.requests += 1;
        Action::Fetch(GetRequest {
            id,
            key,
            range,
            if_none_match: inm,
            timeout_ms: self.cfg.request_timeout_ms,
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

    /// Records a failure of `key`; returns the retry delay, and reports an
    /// error event once attempts reach the limit.
    fn failure(&mut self, key: &str, err: Error) -> u64 {
        let n = self.attempts.entry(key.to_string()).or_insert(0);
        *n += 1;
        let n = *n;
        if n == self.cfg.max_attempts {
            self.events.push_back(Event::Error(err.clone()));
        }
        self.last_error = Some(err);
        self.backoff_delay(n)
    }

    fn success(&mut self, key: &str) {
        self.attempts.remove(key);
    }

    /// Feeds the outcome of request `id`. Unknown ids (e.g. answered after a
    /// reset) are ignored.
    pub fn handle_response(&mut self, id: RequestId, now: u64, resp: GetResponse) {
        let Some(job) = self.pending.remove(&id) else {
            return;
        };
        if let GetResponse::Ok { body, .. } = &resp {
            self.bytes += body.len() as u64;
        }
        match job {
            Job::Head => self.on_head(now, resp),
            Job::Page(p) => self.on_page(now, p, resp),
            Job::Segment(u) => self.on_segment(now, u, resp),
            Job::Snapshot { offset } => self.on_snapshot(now, offset, resp),
        }
    }

    fn on_head(&mut self, now: u64, resp: GetResponse) {
        self.head_inflight = false;
        match resp {
            GetResponse::NotModified if self.etag.is_some() && self.head.is_some() => {
                self.success(HEAD_KEY);
                self.behind_since = None;
                self.behind_reads = 0;
                self.last_poll_at = Some(now);
                self.schedule_poll(now);
            }
            GetResponse::Ok { body, etag, .. } => match Head::decode(&body) {
                Ok(head) => {
                    self.success(HEAD_KEY);
                    self.last_poll_at = Some(now);
                    self.accept_head(now, head, etag);
                }
                Err(e) => {
                    let err = Error::decode(e).with_object(HEAD_KEY);
                    self.head_retry(now, err);
                }
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
    }

    fn head_retry(&mut self, now: u64, err: Error) {
        let d = self.failure(HEAD_KEY, err);
        self.head_fresh = true;
        self.head_due = Some(now + d);
    }

    fn schedule_poll(&mut self, now: u64) {
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
        let use_snapshot = self.cfg.mode == Mode::Kv
            && head.snapshot.as_ref().is_some_and(|s| s.lsn > self.applied)
            && (gap || fresh);
        if use_snapshot {
            let entry = head.snapshot.clone().expect("checked");
            self.clear_plan();
            self.bootstrap = Some(Bootstrap {
                entry,
                dataset_id: head.dataset_id,
                decoder: SnapshotDecoder::new(),
                next: 0,
                inflight: false,
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
            self.schedule_poll(now);
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
        self.pages.clear();
    }

    fn clear_plan(&mut self) {
        self.plan.clear();
        self.ready.clear();
        self.inflight_units.clear();
        self.retry_at.clear();
        self.page_wanted = None;
        self.page_inflight = false;
        self.plan_next = self.applied + 1;
        // Responses to dropped jobs are ignored.
        self.pending.retain(|_, j| matches!(j, Job::Head));
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
            let page = match self.pages.get(&r.key) {
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

    fn extend_plan(&mut self) {
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
                        let start = e.start_for(self.plan_next);
                        let from = self.plan_next;
                        self.plan_next = e.last_lsn + 1;
                        self.plan.push_back(Unit {
                            entry: e,
                            start,
                            from,
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

    fn on_page(&mut self, now: u64, r: PageRef, resp: GetResponse) {
        self.page_inflight = false;
        let result = match resp {
            GetResponse::Ok { body, .. } => {
                Page::decode(&body, &r).map_err(|e| Error::decode(e).with_object(r.key.clone()))
            }
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
                        .retain(|_, (pr, _)| pr.first_lsn <= lsn && lsn <= pr.last_lsn);
                }
                self.pages.insert(r.key.clone(), (r, page));
                self.page_wanted = None;
            }
            Err(err) => {
                self.distrust_head(now, &err);
                let d = self.failure(&r.key, err);
                self.backoff_until = Some(now + d);
            }
        }
    }

    /// An object failed verification against the entry the head gave for
    /// it: the object or the head may be wrong. Read the head again in full
    /// (a newer or honest one replaces the plan built from this one).
    fn distrust_head(&mut self, now: u64, err: &Error) {
        if err.kind() == ErrorKind::Data {
            self.head_fresh = true;
            if self.head_due.is_none_or(|t| t > now) && !self.head_inflight {
                self.head_due = Some(now);
            }
        }
    }

    /// A 404 for an object the head named: re-read the head (in full).
    fn missing(&mut self, now: u64, key: &str) {
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
        self.head_due = Some(
            now + if self.attempts.get(key).copied().unwrap_or(0) <= 1 {
                0
            } else {
                d
            },
        );
        self.bootstrap = None;
    }

    fn on_segment(&mut self, now: u64, u: Unit, resp: GetResponse) {
        self.inflight_units.remove(&u.from);
        let key = u.entry.key.clone();
        let result = match resp {
            GetResponse::Ok { body, range, .. } => self.verify_segment(&u, body, range),
            GetResponse::NotFound => {
                self.missing(now, &key);
                return;
            }
            other => Err(unavailable(&other).with_object(key.clone())),
        };
        match result {
            Ok(v) => {
                self.ready.insert(u.from, v);
            }
            Err(err) => {
                self.distrust_head(now, &err);
                let d = self.failure(&key, err);
                self.retry_at.insert(u.from, now + d);
            }
        }
    }

    fn verify_segment(
        &self,
        u: &Unit,
        body: Vec<u8>,
        range: Option<ContentRange>,
    ) -> Result<Verified, Error> {
        let e = &u.entry;
        let data_err = |d| Error::decode(d).with_object(e.key.clone()).with_lsn(u.from);
        let whole = u.start.offset == segment::HEADER_LEN;
        // Work out which bytes of the file `body` holds.
        let (bytes, base) = match range {
            None => {
                // The whole object (asked for, or a server that ignored Range).
                if body.len() as u64 != e.size {
                    return Err(Error::new(
                        ErrorKind::Data,
                        format!(
                            "segment body is {} bytes, catalog says {}",
                            body.len(),
                            e.size
                        ),
                    )
                    .with_object(e.key.clone())
                    .with_lsn(u.from));
                }
                segment::decode(&body, Some(e.crc32)).map_err(data_err)?;
                (body, 0u64)
            }
            Some(cr) => {
                let want_end = e.records_end;
                if whole
                    || cr.start != u.start.offset
                    || cr.end != want_end
                    || body.len() as u64 != want_end - cr.start
                {
                    return Err(Error::new(
                        ErrorKind::Data,
                        format!(
                            "range answer {}..{} with {} bytes does not match the request {}..{}",
                            cr.start,
                            cr.end,
                            body.len(),
                            u.start.offset,
                            want_end
                        ),
                    )
                    .with_object(e.key.clone())
                    .with_lsn(u.from));
                }
                (body, cr.start)
            }
        };
        let lo = (u.start.offset - base) as usize;
        let hi = (e.records_end - base) as usize;
        let mut records = Vec::new();
        let mut last = u.start.lsn - 1;
        for rec in Records::new(&bytes[lo..hi], u.start.offset, u.start.lsn) {
            let rec = rec.map_err(data_err)?;
            last = rec.lsn;
            if rec.lsn >= u.from {
                let start = rec.payload.as_ptr() as usize - bytes.as_ptr() as usize;
                records.push((rec.lsn, start, start + rec.payload.len()));
            }
        }
        if last != e.last_lsn {
            return Err(Error::new(
                ErrorKind::Data,
                format!(
                    "segment records end at LSN {last}, catalog says {}",
                    e.last_lsn
                ),
            )
            .with_object(e.key.clone())
            .with_lsn(last + 1));
        }
        Ok(Verified { bytes, records })
    }

    fn apply_ready(&mut self, now: u64) {
        // One unit per poll, so the state matches the event the driver sees.
        if let Some(front) = self.plan.front() {
            let from = front.from;
            if from != self.applied + 1 {
                // The plan no longer lines up (after a reset): rebuild it.
                self.clear_plan();
                return;
            }
            let Some(v) = self.ready.remove(&from) else {
                return;
            };
            let unit = self.plan.pop_front().expect("front exists");
            let key = unit.entry.key.clone();
            let first = self.applied + 1;
            for &(lsn, s, e) in &v.records {
                let payload = &v.bytes[s..e];
                match self.cfg.mode {
                    Mode::Kv => match batch::decode(payload) {
                        Ok(ops) => {
                            self.state.apply(&ops);
                            if self.cfg.emit_records {
                                self.events.push_back(Event::Record {
                                    lsn,
                                    payload: payload.to_vec(),
                                });
                            }
                        }
                        Err(d) => {
                            if lsn > first {
                                self.events.push_back(Event::Applied {
                                    first,
                                    last: lsn - 1,
                                });
                            }
                            let err = Error::decode(d).with_object(key.clone()).with_lsn(lsn);
                            let delay = self.failure(&key, err);
                            self.clear_plan();
                            self.backoff_until = Some(now + delay);
                            self.head_due = Some(now);
                            self.head_fresh = true;
                            return;
                        }
                    },
                    Mode::Raw => self.events.push_back(Event::Record {
                        lsn,
                        payload: payload.to_vec(),
                    }),
                }
                self.applied = lsn;
            }
            self.success(&key);
            self.last_error = None;
            if self.applied >= first {
                self.events.push_back(Event::Applied {
                    first,
                    last: self.applied,
                });
            }
            if self.applied >= self.committed {
                self.schedule_poll_from_last();
            }
        }
    }

    fn schedule_poll_from_last(&mut self) {
        if self.head_due.is_none() && !self.head_inflight {
            let base = self.last_poll_at.unwrap_or(0);
            self.head_due = Some(base + self.cfg.poll_interval_ms);
        }
    }

    fn on_snapshot(&mut self, now: u64, offset: u64, resp: GetResponse) {
        let Some(b) = self.bootstrap.as_mut() else {
            return;
        };
        b.inflight = false;
        let key = b.entry.key.clone();
        let size = b.entry.size;
        let fed: Result<u64, Error> = match resp {
            GetResponse::Ok { body, range, .. } => {
                // Which bytes did we get? A 206 says; a 200 is the whole object.
                let (start, bytes) = match range {
                    Some(cr) => (cr.start, &body[..]),
                    None => (0, &body[..]),
                };
                if start > offset || (range.is_none() && body.len() as u64 != size) {
                    Err(Error::new(
                        ErrorKind::Data,
                        format!("snapshot answer does not cover byte {offset}"),
                    )
                    .with_object(key.clone()))
                } else {
                    // Offsets stay u64 until they are known to fit the body,
                    // so a snapshot over 4 GiB works on 32-bit targets.
                    let skip = usize::try_from(offset - start).unwrap_or(usize::MAX);
                    let avail = bytes.get(skip..).unwrap_or(&[]);
                    // Take what arrived, up to the end of the file (a 200 or a
                    // generous 206 may carry more than the window asked for).
                    let left = size.saturating_sub(offset);
                    let take = usize::try_from(left).map_or(avail.len(), |l| avail.len().min(l));
                    if take == 0 {
                        Err(Error::new(
                            ErrorKind::Data,
                            format!("empty snapshot answer at byte {offset}"),
                        )
                        .with_object(key.clone()))
                    } else {
                        b.decoder
                            .feed(&avail[..take])
                            .map(|_| take as u64)
                            .map_err(|d| Error::decode(d).with_object(key.clone()))
                    }
                }
            }
            GetResponse::NotFound => {
                self.missing(now, &key);
                return;
            }
            other => Err(unavailable(&other).with_object(key.clone())),
        };
        match fed {
            Ok(n) => {
                b.next += n;
                if b.next >= size {
                    self.finish_bootstrap(now);
                }
            }
            Err(err) => {
                // A decode error poisons the decoder: start the snapshot over.
                if err.kind() == ErrorKind::Data {
                    b.decoder = SnapshotDecoder::new();
                    b.next = 0;
                }
                self.distrust_head(now, &err);
                let d = self.failure(&key, err);
                self.retry_at.insert(0, now + d);
            }
        }
    }

    fn finish_bootstrap(&mut self, now: u64) {
        let Some(b) = self.bootstrap.take() else {
            return;
        };
        let key = b.entry.key.clone();
        let result = b
            .decoder
            .finish(Some(b.entry.crc32))
            .map_err(|d| Error::decode(d).with_object(key.clone()))
            .and_then(|(h, st)| {
                if h.lsn != b.entry.lsn
                    || h.dataset_id != b.dataset_id
                    || h.entry_count != b.entry.entries
                {
                    Err(Error::new(
                        ErrorKind::Data,
                        "snapshot header disagrees with the catalog",
                    )
                    .with_object(key.clone()))
                } else {
                    Ok((h, st))
                }
            });
        match result {
            Ok((h, st)) => {
                self.success(&key);
                self.state = st;
                self.applied = h.lsn;
                self.dataset = Some(h.dataset_id);
                self.plan_next = h.lsn + 1;
                self.last_error = None;
                self.events.push_back(Event::Bootstrapped {
                    lsn: h.lsn,
                    dataset_id: h.dataset_id,
                });
                self.clear_plan();
                if self.applied >= self.committed {
                    self.schedule_poll(now);
                }
            }
            Err(err) => {
                self.distrust_head(now, &err);
                let d = self.failure(&key, err);
                self.retry_at.insert(0, now + d);
                self.bootstrap = Some(Bootstrap {
                    decoder: SnapshotDecoder::new(),
                    next: 0,
                    inflight: false,
                    ..b
                });
            }
        }
    }
}

fn unavailable(resp: &GetResponse) -> Error {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_sync_reports_a_persisting_failure_again() {
        let cfg = ReplicaConfig {
            max_attempts: 2,
            ..ReplicaConfig::default()
        };
        let mut r = Replica::new(cfg, 1);
        for sync in 0..2 {
            r.sync_now(0);
            let mut errors = 0;
            let mut now = 0;
            for _ in 0..100 {
                match r.poll(now) {
                    Action::Fetch(req) => r.handle_response(
                        req.id,
                        now,
                        GetResponse::Failed {
                            status: Some(503),
                            message: "down".into(),
                        },
                    ),
                    Action::Event(Event::Error(_)) => {
                        errors += 1;
                        break;
                    }
                    Action::Event(_) => {}
                    Action::Wait { until } => now = until.max(now + 1),
                }
            }
            assert_eq!(errors, 1, "sync {sync} reported its failure");
        }
    }
}
