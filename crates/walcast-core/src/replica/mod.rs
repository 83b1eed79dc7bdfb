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

mod apply;
mod bootstrap;
pub(crate) mod fetch;
mod head;
mod lazy;
mod plan;
mod tail;
mod trust;
mod verify;

pub use self::fetch::{
    MAX_TRANSFER_ALLOWANCE_MS, MAX_WHOLE_SNAPSHOT_ANSWER, MIN_TRANSFER_BYTES_PER_SEC,
};
pub use self::lazy::{Entries, LazyScan, LazyStatus, Read};

use std::collections::VecDeque;

use crate::catalog::{DatasetId, Head, Page, PageRef, HEAD_KEY};
use crate::error::{Error, ErrorKind};
use crate::io::{ByteRange, GetRequest, GetResponse, RequestId, ResponseMeta};
use crate::segment;
use crate::state::KvState;
use crate::vecmap::VecMap;

use self::bootstrap::Bootstrap;
use self::plan::Unit;
use self::verify::Verified;

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

/// The most GETs in flight a [`ReplicaConfig::max_inflight`] asks for
/// that a replica sends at once.
pub const MAX_INFLIGHT: usize = 1024;

/// The longest poll interval (ms) a [`ReplicaConfig`] takes (about 49
/// days); a longer one is taken as this.
pub const MAX_CONFIG_MS: u64 = u32::MAX as u64;

/// Tuning for a [`Replica`]: [`Replica::new`] takes `poll_interval_ms`
/// within `1..=`[`MAX_CONFIG_MS`] and `max_inflight` within
/// `1..=`[`MAX_INFLIGHT`].
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
    /// Timeout the driver applies to each request (ms); a GET of a
    /// segment, snapshot window or block gets more, by the bytes it
    /// expects ([`MIN_TRANSFER_BYTES_PER_SEC`]).
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
    /// Lazy mode, with at most this many bytes of data blocks cached (while
    /// the snapshot has deltas, theirs share a quarter, the snapshot's the
    /// rest): the
    /// replica adopts the newest snapshot without downloading it, replays
    /// only what follows it, and reads through
    /// [`Replica::get_lazy`] / [`Replica::scan_lazy`]. `None`: full mode.
    pub lazy_cache_bytes: Option<u64>,
    /// Long-poll: how long (ms) to ask a server that advertises support
    /// (see [`LONG_POLL_HEADER`](crate::io::LONG_POLL_HEADER)) to hold an
    /// idle replica's conditional head GET; capped by what the server
    /// grants. With long-poll an idle replica sends about one request per
    /// wait and sees a new head as soon as the server does; servers without
    /// it are polled every `poll_interval_ms`. `0`: never long-poll.
    pub long_poll_wait_ms: u64,
    /// Pinned keys: when not empty, apply only heads one of these keys (or
    /// a key they endorsed through the head's rotation chain) signed, never
    /// a signed head older than one applied, and only objects whose SHA-256
    /// equals the digest the signed catalog records; anything else is an
    /// [`ErrorKind::Untrusted`] error. A pinned
    /// replica reads whole segments (no mid-segment start) and, in lazy
    /// mode, loads the snapshot whole.
    pub trust: Vec<crate::keys::PublicKey>,
    /// The host makes the Ed25519 checks of a pinned replica: before it
    /// delivers a response it asks [`Replica::signature_checks`], verifies
    /// them, and passes those that held to [`Replica::signatures_verified`].
    /// Always so on wasm32, whose module carries no Ed25519 code (the JS
    /// driver uses WebCrypto); elsewhere the core verifies unless this is
    /// set.
    pub host_verifies_signatures: bool,
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
            lazy_cache_bytes: None,
            long_poll_wait_ms: 30_000,
            trust: Vec::new(),
            host_verifies_signatures: false,
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
    /// Lazy mode's cache and overlay, in lazy mode.
    pub lazy: Option<LazyStatus>,
    /// Whether the head is read by long-poll (the server holds conditional
    /// head GETs and answers in time); otherwise it is polled every
    /// `poll_interval_ms`.
    pub long_poll: bool,
    /// The key (`ed25519:<base64>`) that signed the newest head a pinned
    /// replica accepted; `None` for an unpinned replica, or before a head.
    pub signer: Option<String>,
}

#[derive(Debug, Clone)]
enum Job {
    Head,
    Page(PageRef),
    Segment(Unit),
    Snapshot { offset: u64 },
    Block(lazy::BlockJob),
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
    pages: Vec<(PageRef, Page)>,
    /// Results by the unit's `from` LSN.
    ready: VecMap<Verified>,
    /// Segments whose copy in the head's tail failed verification.
    tail_refused: Vec<String>,
    /// Segments applied from the head's tail.
    tail_units: u64,
    inflight_units: VecMap<()>,
    /// Units waiting out a backoff: `from` -> (retry at).
    retry_at: VecMap<u64>,

    bootstrap: Option<Bootstrap>,
    pending: VecMap<Job>,
    /// The bytes each lazy block GET out may bring (its `max_bytes`), by
    /// request id, until it is answered or abandoned. A jump or a reset
    /// forgets the jobs, not the GETs: their answers still take memory in
    /// the driver, so they count against the bound on GETs out until then.
    block_gets: VecMap<u64>,
    /// Deferred-segment GETs out (by request id), until answered or
    /// abandoned: a jump forgets their jobs, not the GETs.
    segment_gets: VecMap<()>,
    attempts: Vec<(String, u32)>,
    /// Failures of objects other than the head since one last succeeded.
    failure_streak: u32,
    backoff_until: Option<u64>,
    events: VecDeque<Event>,
    caught_up_reported: bool,
    /// Since when every head read commits less than `applied`, and how many.
    behind_since: Option<u64>,
    behind_reads: u32,
    /// Lazy mode's base snapshot, overlay and block fetches.
    lazy: Option<lazy::Lazy>,
    /// The longest wait the server grants (ms), from the last head answer.
    long_poll: Option<u64>,
    /// The head GET in flight: its id, when it was sent, and its wait.
    head_req: Option<(RequestId, u64, Option<u64>)>,
    /// The last long-poll came back early with nothing new: the next head
    /// read waits `poll_interval_ms` (a server or proxy that does not hold).
    long_poll_early: bool,
    /// The next head read is answered at once (a sync wants the head as of
    /// now): no wait hint.
    head_now: bool,
    /// Pinned keys and what they accepted.
    trust: trust::Trust,
}

impl Replica {
    /// A fresh replica with no state. `seed` drives retry jitter.
    pub fn new(mut cfg: ReplicaConfig, seed: u64) -> Self {
        // A poll every 0 ms would read the head again before a sync could
        // report it caught up, and a count or a time past these bounds
        // would overflow the machine's arithmetic (a GET count doubled, a
        // deadline added to the clock): kept within them, whatever a
        // caller asks.
        cfg.poll_interval_ms = cfg.poll_interval_ms.clamp(1, MAX_CONFIG_MS);
        cfg.max_inflight = cfg.max_inflight.clamp(1, MAX_INFLIGHT);
        let cfg_lazy = cfg.lazy_cache_bytes;
        let inflight = cfg.max_inflight;
        let trust = trust::Trust::new(&cfg.trust, cfg.host_verifies_signatures);
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
            pages: Vec::new(),
            ready: VecMap::default(),
            tail_refused: Vec::new(),
            tail_units: 0,
            inflight_units: VecMap::default(),
            retry_at: VecMap::default(),
            bootstrap: None,
            pending: VecMap::default(),
            block_gets: VecMap::default(),
            segment_gets: VecMap::default(),
            attempts: Vec::new(),
            failure_streak: 0,
            backoff_until: None,
            events: VecDeque::new(),
            caught_up_reported: false,
            behind_since: None,
            behind_reads: 0,
            lazy: cfg_lazy.map(|c| lazy::Lazy::new(c, inflight)),
            long_poll: None,
            head_req: None,
            long_poll_early: false,
            head_now: false,
            trust,
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
        if let Some(l) = r.lazy.as_mut() {
            // The restored state is the base; the overlay holds what follows.
            l.state_lsn = applied_lsn;
        }
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
            lazy: self.lazy.as_ref().map(lazy::Lazy::status),
            long_poll: self.long_poll_active(),
            signer: self.trust.signer().map(ToString::to_string),
        }
    }

    /// Asks for a head poll now (for `sync()`): the next [`poll`](Self::poll)
    /// fetches the head unless a fetch is already in flight.
    ///
    /// Failure counts start over, so a sync that keeps failing reports
    /// [`Event::Error`] again after `max_attempts`.
    pub fn sync_now(&mut self, now: u64) {
        // A long-poll in flight may be held for long: read the head now
        // beside it (its answer, when it comes, is ignored).
        if let Some((id, _, Some(_))) = self.head_req {
            if self.head_inflight {
                self.pending.remove(id.0);
                self.head_inflight = false;
                self.head_req = None;
            }
        }
        self.head_due = Some(now);
        self.head_now = true;
        self.backoff_until = None;
        self.caught_up_reported = false;
        self.attempts.clear();
        self.failure_streak = 0;
    }

    /// Events queued and not yet returned by [`poll`](Self::poll): a driver
    /// that starts a sync takes an error among them for an earlier one's
    /// (GETs of a sync that ended, answered after it).
    pub fn queued_events(&self) -> usize {
        self.events.len()
    }

    /// Drops the [`Event::Error`]s queued and not yet taken by
    /// [`poll`](Self::poll): failures of lazy reads while no sync ran. Call
    /// before [`sync_now`](Self::sync_now) when that sync ends on the first
    /// error it meets, so that it reports its own, not an older one.
    pub fn forget_errors(&mut self) {
        self.events.retain(|e| !matches!(e, Event::Error(_)));
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
        // Blocks lazy reads are waiting for: reads do not wait out the
        // backoff of the catch-up.
        if self.started {
            if let Some(a) = self.next_block_fetch() {
                return a;
            }
        }
        if let Some(t) = self.backoff_until {
            if t > now {
                return Action::Wait { until: t };
            }
            self.backoff_until = None;
        }
        // Caught up, with a long-poll due: say so before the head read that
        // the server may hold for long (a sync ends here).
        if self.started
            && !self.caught_up_reported
            && !self.head_inflight
            && self.head_due.is_some_and(|t| t <= now)
            && self.bootstrap.is_none()
            && self.plan.is_empty()
            && self.page_wanted.is_none()
            && self
                .long_poll_wait(!self.head_fresh && self.etag.is_some() && !self.head_now)
                .is_some()
        {
            self.caught_up_reported = true;
            return Action::Event(Event::CaughtUp { lsn: self.applied });
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
            let wait = self.long_poll_wait(inm.is_some() && !self.head_now);
            self.head_now = false;
            let mut action = self.fetch(Job::Head, HEAD_KEY.to_string(), None, inm);
            if let Action::Fetch(req) = &mut action {
                req.wait_ms = wait;
                req.timeout_ms = req.timeout_ms.saturating_add(wait.unwrap_or(0));
                self.head_req = Some((req.id, now, wait));
            }
            return action;
        }
        if self.head_inflight && !self.started {
            return self.wait(now);
        }
        // Blocks lazy reads are waiting for.
        if let Some(a) = self.next_block_fetch() {
            return a;
        }
        // The delta chain a whole load must not lose (see `Bootstrap::chain`),
        // read whole first. A delta that failed is tried again after a
        // backoff (the replica serves its state meanwhile); one gone (the
        // chain retired and deleted) lets the load go on without it, and the
        // state then goes back to the snapshot's LSN.
        if self.bootstrap.as_ref().is_some_and(|b| b.chain) {
            if self.retry_at.get(0).is_none_or(|t| *t <= now) {
                // Looked at again a poll interval on (a reader may take
                // these GETs, and its answers wake no run), or after a
                // failure's backoff.
                let mut again = self.cfg.poll_interval_ms;
                match self.lazy.as_mut().map(|l| l.deltas_into_overlay()) {
                    Some(Ok(Err(()))) => {}
                    Some(Err(e)) if e.kind() != ErrorKind::NotFound => {
                        let key = e.object().unwrap_or_default().to_string();
                        again = self.failure(&key, e);
                    }
                    _ => {
                        if let Some(b) = &mut self.bootstrap {
                            b.chain = false;
                        }
                        again = 0;
                    }
                }
                self.retry_at.insert(0, now + again);
            }
            if self.bootstrap.as_ref().is_some_and(|b| b.chain) {
                return self.next_block_fetch().unwrap_or_else(|| self.wait(now));
            }
        }
        // Snapshot.
        if let Some(b) = &mut self.bootstrap {
            if !b.inflight {
                let key = b.entry.key.clone();
                if let Some(t) = self.retry_at.get(0).copied() {
                    if t > now {
                        return self.wait(now);
                    }
                    self.retry_at.remove(0);
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
        // Segments the head carries: no GET.
        if self.take_from_tail() {
            self.apply_ready(now);
            if let Some(e) = self.events.pop_front() {
                return Action::Event(e);
            }
        }
        // Segments a lazy read fetches only when it needs them.
        if self.defer_front_if_able() {
            if let Some(e) = self.events.pop_front() {
                return Action::Event(e);
            }
        }
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
                    !self.inflight_units.contains_key(u.from)
                        && !self.ready.contains_key(u.from)
                        && self.retry_at.get(u.from).is_none_or(|t| *t <= now)
                        && !self.deferrable(u)
                })
                .cloned();
            if let Some(u) = next {
                if u.entry.size > crate::catalog::MAX_SEGMENT_BYTES {
                    // Never read: a head's claim does not set what a
                    // replica holds in memory (older publishers wrote such
                    // segments). Retried with backoff; a newer head may
                    // name a snapshot past it.
                    let err = Error::new(
                        ErrorKind::Data,
                        format!(
                            "segment {} claims {} bytes, above the limit of {} a replica reads",
                            u.entry.key,
                            u.entry.size,
                            crate::catalog::MAX_SEGMENT_BYTES
                        ),
                    )
                    .with_object(&u.entry.key)
                    .with_lsn(u.from);
                    // As for an object that fails verification: the head
                    // is read again, in case it was not the dataset's.
                    self.distrust_head(now, &err);
                    let d = self.failure(&u.entry.key, err);
                    self.retry_at.insert(u.from, now + d);
                    if let Some(e) = self.events.pop_front() {
                        return Action::Event(e);
                    }
                    return self.wait(now);
                }
                self.retry_at.remove(u.from);
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
            let delay = if self.applied < self.committed {
                self.head_fresh = true;
                self.cfg.poll_interval_ms
            } else {
                self.idle_delay()
            };
            self.head_due = Some(now + delay);
        }
        // Not while the last head read failed (unreadable, not verified,
        // untrusted): caught up means to a head read since, so a sync then
        // ends with the error after the retries, not with the old LSN.
        if self.started
            && self.plan.is_empty()
            && self.page_wanted.is_none()
            && self.applied >= self.committed
            && !self.caught_up_reported
            && !self.head_inflight
            && !self.attempts.iter().any(|(k, _)| k == HEAD_KEY)
        {
            self.caught_up_reported = true;
            return Action::Event(Event::CaughtUp { lsn: self.applied });
        }
        self.wait(now)
    }

    /// Feeds the outcome of request `id`. Unknown ids (e.g. answered after a
    /// reset) are ignored.
    pub fn handle_response(&mut self, id: RequestId, now: u64, resp: GetResponse) {
        self.handle_response_with(id, now, resp, ResponseMeta::default());
    }

    /// [`handle_response`](Self::handle_response) with what the driver saw
    /// in the response's headers (whether the server holds long-polls).
    /// Drivers that cannot see headers use `handle_response`: the replica
    /// then polls.
    pub fn handle_response_with(
        &mut self,
        id: RequestId,
        now: u64,
        resp: GetResponse,
        meta: ResponseMeta,
    ) {
        self.block_gets.remove(id.0);
        self.segment_gets.remove(id.0);
        let Some(job) = self.pending.remove(id.0) else {
            return;
        };
        if let GetResponse::Ok { body, .. } = &resp {
            self.bytes += body.len() as u64;
        }
        match job {
            Job::Head => self.on_head(now, resp, meta),
            Job::Page(p) => self.on_page(now, p, resp),
            Job::Segment(u) => self.on_segment(now, u, resp),
            Job::Snapshot { offset } => self.on_snapshot(now, offset, resp),
            Job::Block(b) => self.on_block(now, b, resp),
        }
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
