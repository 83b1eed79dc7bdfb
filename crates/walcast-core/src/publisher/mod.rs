//! The publisher's commit machine: claims the dataset by bumping the epoch,
//! seals records into segments, uploads them create-only, commits the head
//! with compare-and-swap, pages old entries out, writes snapshots, applies
//! retention and deletes late.
//!
//! Pure like the replica: feed it records with [`Publisher::push`] and
//! responses with the `handle_*` methods, and after each call drain
//! [`Publisher::poll`] until it returns [`Action::Wait`].

mod actions;
mod claim;
mod commit;
mod config;
mod delta;
mod pages;
mod replayed;
mod requests;
mod retention;
mod sign;
mod snapshot;

use std::collections::{HashMap, HashSet, VecDeque};

use crate::batch;
use crate::catalog::{Head, Page, PageRef, SegmentEntry, HEAD_KEY};
use crate::error::{Error, ErrorKind};
use crate::io::{GetResponse, RequestId};
use crate::rng::splitmix64;
use crate::segment::SegmentBuilder;
use crate::state::KvState;

pub use self::actions::{
    Action, DeleteRequest, Event, ObjectKind, PutCondition, PutRequest, PutResponse,
};
use self::commit::{Commit, Stage};
pub use self::config::{
    PublisherConfig, SnapshotFormat, DEFAULT_COMMIT_BURST, DEFAULT_MAX_COMMITS_PER_SEC,
    DEFAULT_SNAPSHOT_SUFFIX_BYTES, DEFAULT_TAIL_BYTES, MAX_HEAD_FILTER_BYTES,
    MAX_SEGMENT_FILTER_KEYS, MAX_SEGMENT_SEAL_BYTES, SEGMENT_FILTER_BITS_PER_KEY,
    SEGMENT_FILTER_PROBES,
};
use self::replayed::Placing;
use self::snapshot::PendingSnapshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Up {
    Waiting(u64),
    InFlight,
    Done,
}

/// A key's last write: its LSN, and where the record is in the segment
/// this publisher wrote it to (`offset` 0: not known, a record replayed
/// after a restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Touch {
    lsn: u64,
    offset: u32,
    len: u32,
}

#[derive(Debug)]
struct Sealed {
    entry: SegmentEntry,
    bytes: Vec<u8>,
    up: Up,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Need to read the head.
    Start,
    /// Head read in flight.
    Reading,
    /// Claim PUT in flight (or being verified).
    Claiming,
    Running,
    Fenced,
}

#[derive(Debug)]
enum Req {
    ClaimRead,
    ClaimPut,
    Segment(String),
    Snapshot,
    Page(String),
    PageRead(PageRef),
    /// A page read to place replayed records (`replayed.rs`).
    PlaceRead(PageRef),
    Cas,
    Verify,
    Check,
    Delete(String),
    /// A create-only PUT found its key taken: read the object to learn
    /// whether it holds our bytes (an earlier try whose answer was lost) or
    /// another writer's (the epoch used before at this prefix).
    Confirm {
        of: Box<Req>,
        key: String,
        len: u64,
        crc: u32,
    },
}

/// The commit machine.
#[derive(Debug)]
pub struct Publisher {
    cfg: PublisherConfig,
    /// Digests of objects this publisher uploaded that no committed head
    /// records yet (signing only).
    digests: HashMap<String, String>,
    rng: u64,
    next_id: u64,
    role: Role,
    claim: Option<Head>,
    claim_attempts: u32,
    /// The store's answer to the last claim PUT it refused.
    claim_failure: Option<String>,
    head: Option<Head>,
    etag: Option<String>,
    epoch: u64,
    writer: String,

    next_push: u64,
    open: Option<SegmentBuilder>,
    /// Delta snapshots on: the hashes of the keys the open segment's
    /// batches write, for its key filter (`None` past
    /// [`MAX_SEGMENT_FILTER_KEYS`]: the segment gets no filter).
    open_keys: Option<Vec<u64>>,
    open_since: u64,
    last_seal_at: Option<u64>,
    /// The commit budget's theoretical arrival time (GCRA, ms): a seal is
    /// within budget once `now + burst tolerance >= budget_tat`.
    budget_tat: u64,
    sealed: VecDeque<Sealed>,

    state: Option<KvState>,
    snapshot: Option<PendingSnapshot>,
    /// Delta snapshots on: each key written since the state's base, with the
    /// LSN of its last write and where its record is.
    touched: std::collections::BTreeMap<Vec<u8>, Touch>,
    /// Segments past the snapshot whose records [`Touch`] places: first LSN
    /// to last LSN and epoch. Those this publisher sealed, and after a
    /// restart those of the catalog whose layout the replayed records
    /// matched (`replayed.rs`).
    sealed_ranges: std::collections::BTreeMap<u64, (u64, u64)>,
    /// After a restart: the catalog's segments the replayed records sit in.
    placing: Placing,
    /// Bytes of batches pushed since the newest snapshot, and since the end
    /// of its delta chain, was made (`snapshot_bytes`, `delta_bytes`).
    bytes_since_snapshot: u64,
    bytes_since_delta: u64,
    /// The LSN of the last delta not written because readers would refuse
    /// its blocks (0: none).
    delta_refused_at: u64,
    /// When this process first saw each key of the head's `retired` (its
    /// grace period runs from then; see `drive_deletes`).
    retired_seen: HashMap<String, u64>,
    /// No entry of the head's `retired` is due for deletion before this
    /// time (`drive_deletes` skips its walk until then); `None` after the
    /// head or the deletions under way changed.
    deletes_quiet_until: Option<u64>,

    commit: Option<Commit>,
    commit_retry_at: Option<u64>,
    /// Retention waits until then after a page it needed could not be
    /// read; commits go on without it meanwhile.
    retention_retry_at: Option<u64>,
    page_cache: HashMap<String, Page>,

    deleting: HashSet<String>,
    deleted: HashSet<String>,
    delete_retry_at: u64,

    pending: HashMap<RequestId, Req>,
    /// Key, length and CRC-32 of the body of each create-only PUT in flight.
    created: HashMap<RequestId, (String, u64, u32)>,
    attempts: HashMap<String, u32>,
    retry_at: u64,
    events: VecDeque<Event>,
    queued: VecDeque<Action>,
    /// Pages retention asked for, not yet read.
    page_reads: VecDeque<PageRef>,
    /// Keys of the page reads out.
    page_reading: HashSet<String>,
    /// Every page retention asked for has been read: a commit may retire
    /// them even with no new segment to name.
    pages_read: bool,
    verify_at: Option<u64>,
    next_check: u64,
    check_inflight: bool,
    /// Reads in a row that found the head behind the one this publisher
    /// committed last (see [`Publisher::head_went_back`]): while any, no
    /// object is deleted.
    behind_reads: u32,
    /// The store's answer to the last head write that did not commit.
    cas_answer: String,
}

/// Reads in a row that find the head behind this publisher's last commit
/// before it stops (with backoff between them, some minutes: a stale read
/// passes long before).
const BEHIND_READS_LIMIT: u32 = 16;

impl Publisher {
    /// A publisher that will claim the dataset. `seed` drives the dataset id
    /// of a new dataset and retry jitter.
    pub fn new(cfg: PublisherConfig, seed: u64) -> Self {
        let state = cfg.snapshot_every.map(|_| KvState::new());
        let mut s = seed ^ 0x5752_4954_4552;
        let writer = format!("{:016x}", splitmix64(&mut s));
        Publisher {
            cfg,
            digests: HashMap::new(),
            rng: seed,
            next_id: 0,
            role: Role::Start,
            claim: None,
            claim_attempts: 0,
            claim_failure: None,
            head: None,
            etag: None,
            epoch: 0,
            writer,
            next_push: 0,
            open: None,
            open_keys: Some(Vec::new()),
            open_since: 0,
            last_seal_at: None,
            budget_tat: 0,
            sealed: VecDeque::new(),
            state,
            snapshot: None,
            touched: std::collections::BTreeMap::new(),
            sealed_ranges: std::collections::BTreeMap::new(),
            placing: Placing::default(),
            bytes_since_snapshot: 0,
            bytes_since_delta: 0,
            delta_refused_at: 0,
            retired_seen: HashMap::new(),
            deletes_quiet_until: None,
            commit: None,
            commit_retry_at: None,
            retention_retry_at: None,
            page_cache: HashMap::new(),
            deleting: HashSet::new(),
            deleted: HashSet::new(),
            delete_retry_at: 0,
            pending: HashMap::new(),
            created: HashMap::new(),
            attempts: HashMap::new(),
            retry_at: 0,
            events: VecDeque::new(),
            queued: VecDeque::new(),
            page_reads: VecDeque::new(),
            page_reading: HashSet::new(),
            pages_read: false,
            verify_at: None,
            next_check: 0,
            check_inflight: false,
            behind_reads: 0,
            cas_answer: String::new(),
        }
    }

    /// A read found the store's head behind the one this publisher last
    /// committed (`seen`: its generation, or no head at all): a stale read,
    /// or the store went back (a bucket restored from a backup, a write it
    /// acknowledged and lost). Until a read finds this publisher's head
    /// again, nothing is deleted (what it retired since, the store's head
    /// may name); after [`BEHIND_READS_LIMIT`] such reads it stops, naming
    /// both generations: started again, it publishes from the head as it is.
    pub(super) fn head_went_back(&mut self, seen: Option<&Head>) {
        self.behind_reads += 1;
        if self.behind_reads < BEHIND_READS_LIMIT {
            return;
        }
        let (ours, epoch) = self
            .head
            .as_ref()
            .map_or((0, 0), |h| (h.generation, h.epoch));
        let seen = seen.map_or_else(
            || "no head".to_string(),
            |h| format!("generation {} of epoch {}", h.generation, h.epoch),
        );
        self.stop(
            Error::new(
                ErrorKind::Data,
                format!(
                    "the head went back: {} reads in a row found {seen}, not generation \
                     {ours} of epoch {epoch} this publisher committed (a bucket restored from \
                     a backup, a write the store acknowledged and lost, or an older writer's \
                     write that a store not enforcing conditional writes let through); \
                     stopped without deleting what it retired since; started again, it \
                     publishes from the head as it is",
                    self.behind_reads
                ),
            )
            .with_object(HEAD_KEY),
        );
    }

    /// The LSN the next [`push`](Self::push) must carry, once the dataset is
    /// claimed. With snapshots on, replay starts at 1 to rebuild the state.
    pub fn next_lsn(&self) -> Option<u64> {
        (self.role == Role::Running).then_some(self.next_push)
    }

    /// Whether another record may be pushed now without exceeding the memory bound.
    ///
    /// Memory stays below `segment_bytes × (max_pending_segments + 1)` plus
    /// one record (and the snapshot state, when snapshots are on): once the
    /// open segment is full, [`poll`](Self::poll) must seal it, which it does
    /// only while fewer than `max_pending_segments` wait for upload or commit.
    pub fn has_room(&self) -> bool {
        self.role == Role::Running
            && !self.placing_waits()
            && self
                .open
                .as_ref()
                .is_none_or(|o| o.len() < self.cfg.segment_bytes.min(MAX_SEGMENT_SEAL_BYTES))
    }

    /// Highest LSN named by a head this publisher committed or claimed.
    pub fn committed_lsn(&self) -> u64 {
        self.head.as_ref().map_or(0, |h| h.committed_lsn)
    }

    /// Our epoch (0 before the claim).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The head as last committed or read.
    pub fn head(&self) -> Option<&Head> {
        self.head.as_ref()
    }

    /// True once fenced: the machine does nothing more.
    pub fn is_fenced(&self) -> bool {
        self.role == Role::Fenced
    }

    /// True when every pushed record is committed and nothing is in flight
    /// except deletions.
    pub fn is_drained(&self) -> bool {
        self.role == Role::Running
            && self.open.as_ref().is_none_or(|o| o.is_empty())
            && self.sealed.is_empty()
            && self.commit.is_none()
            && self.snapshot.is_none()
            && self.committed_lsn() + 1 >= self.next_push
    }

    /// True when the publisher writes delta snapshots (by LSNs or bytes).
    /// Where the record `t` names is, as a pointer delta names it (`None`:
    /// a record this publisher did not write, or one too large).
    fn pointer(&self, t: &Touch) -> Option<crate::snapshot::pointer::Pointer> {
        if t.offset == 0 || t.len > crate::snapshot::pointer::MAX_POINTED_PAYLOAD {
            return None;
        }
        let (&first, &(last, epoch)) = self.sealed_ranges.range(..=t.lsn).next_back()?;
        (t.lsn <= last).then_some(crate::snapshot::pointer::Pointer {
            lsn: t.lsn,
            epoch,
            first,
            last,
            offset: u64::from(t.offset),
            len: t.len,
        })
    }

    fn deltas_on(&self) -> bool {
        self.cfg.delta_every.is_some() || self.cfg.delta_bytes.is_some()
    }

    /// Appends the record `lsn` (which must be [`next_lsn`](Self::next_lsn)).
    /// Records at or below the committed LSN only rebuild the snapshot state.
    pub fn push(&mut self, lsn: u64, payload: &[u8], now: u64) -> Result<(), Error> {
        if self.role != Role::Running || lsn != self.next_push {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "record {lsn} pushed out of order: the publisher expects {:?}",
                    self.next_lsn()
                ),
            )
            .with_lsn(lsn));
        }
        // Refused before anything moves: the caller may push `lsn` again.
        if payload.len() as u64 > crate::segment::MAX_RECORD_LEN {
            return Err(
                Error::new(ErrorKind::InvalidInput, "record larger than 64 MiB").with_lsn(lsn),
            );
        }
        // A caller that ignores `has_room` must not grow a segment past
        // what catalogs accept (the open one seals in `poll`).
        let open = self
            .open
            .as_ref()
            .map_or(crate::segment::HEADER_LEN, |o| o.len());
        // (1 MiB spare for the segment's index and trailer.)
        let after = open + crate::segment::RECORD_HEADER_LEN + payload.len() as u64;
        if after > crate::catalog::MAX_SEGMENT_BYTES - (1 << 20) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the open segment is full: poll until has_room() before pushing",
            )
            .with_lsn(lsn));
        }
        if let Some(state) = &mut self.state {
            let ops = batch::Batch::parse(payload).map_err(|e| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!("record is not a KV batch ({e}); snapshots need KV payloads"),
                )
                .with_lsn(lsn)
            })?;
            state.apply(ops);
            // Only what a replica would replay after the snapshot and its
            // chain counts (a restart replays older records into the state).
            let head = self.head.as_ref();
            let snap = head.and_then(|h| h.snapshot.as_ref()).map_or(0, |s| s.lsn);
            let chain_end = head.and_then(|h| h.deltas.last()).map_or(snap, |d| d.lsn);
            if lsn > snap {
                self.bytes_since_snapshot += payload.len() as u64;
            }
            if lsn > chain_end {
                self.bytes_since_delta += payload.len() as u64;
            }
            if self.deltas_on() {
                let fresh = lsn > self.committed_lsn();
                let replayed_at = match fresh || !self.cfg.pointer_deltas {
                    true => 0,
                    false => self.place_replayed(lsn, payload.len() as u64),
                };
                for op in ops {
                    let k = match op {
                        batch::OpRef::Put(k, _) | batch::OpRef::Delete(k) => k,
                    };
                    if fresh {
                        if let Some(keys) = self.open_keys.as_mut() {
                            if keys.len() < MAX_SEGMENT_FILTER_KEYS {
                                keys.push(crate::snapshot::delta::key_hash(k));
                            } else {
                                self.open_keys = None;
                            }
                        }
                    }
                    // A fresh record goes at the end of the open segment;
                    // a replayed one is in a segment of the catalog (0:
                    // not one of the claimed head's).
                    let t = Touch {
                        lsn,
                        offset: if fresh { open as u32 } else { replayed_at },
                        len: payload.len() as u32,
                    };
                    match self.touched.get_mut(k) {
                        Some(l) => *l = t,
                        None => {
                            self.touched.insert(k.to_vec(), t);
                        }
                    }
                }
            }
        }
        self.next_push += 1;
        if lsn <= self.committed_lsn() {
            return Ok(());
        }
        let epoch = self.epoch;
        let open = self
            .open
            .get_or_insert_with(|| SegmentBuilder::new(epoch, lsn));
        if open.is_empty() {
            self.open_since = now;
        }
        if !open.push(payload) {
            return Err(
                Error::new(ErrorKind::InvalidInput, "record larger than 64 MiB").with_lsn(lsn),
            );
        }
        self.maybe_snapshot(lsn);
        Ok(())
    }

    /// The next thing to do. Call after every input until [`Action::Wait`].
    pub fn poll(&mut self, now: u64) -> Action {
        if let Some(a) = self.queued.pop_front() {
            return a;
        }
        if let Some(e) = self.events.pop_front() {
            return Action::Event(e);
        }
        match self.role {
            Role::Fenced => return Action::Wait { until: u64::MAX },
            Role::Start => {
                if self.retry_at > now {
                    return Action::Wait {
                        until: self.retry_at,
                    };
                }
                self.role = Role::Reading;
                return self.get(Req::ClaimRead, HEAD_KEY.into());
            }
            Role::Reading | Role::Claiming => return Action::Wait { until: u64::MAX },
            Role::Running => {}
        }
        let mut wake = u64::MAX;
        // Seal.
        let uploading = self.sealed.iter().any(|s| s.up != Up::Done);
        if let Some(open) = &self.open {
            if !open.is_empty() && self.sealed.len() < self.cfg.max_pending_segments {
                let due = self.open_since + self.cfg.flush_interval_ms;
                let spaced = self
                    .last_seal_at
                    .map_or(0, |t| t + self.cfg.min_commit_interval_ms)
                    .max(self.budget_allows_at());
                let full = open.len() >= self.cfg.segment_bytes.min(MAX_SEGMENT_SEAL_BYTES);
                if full || (spaced <= now && (!uploading || due <= now)) {
                    self.last_seal_at = Some(now);
                    self.spend_budget(now);
                    let open = self.open.take().expect("checked");
                    let keys = self.open_keys.replace(Vec::new());
                    if let Some((bytes, summary)) = open.finish() {
                        if self.deltas_on() {
                            self.sealed_ranges
                                .insert(summary.first_lsn, (summary.last_lsn, summary.epoch));
                        }
                        let mut entry = SegmentEntry::from_summary(&summary);
                        self.note_digest(&entry.key, &bytes);
                        entry.filter =
                            keys.filter(|k| self.deltas_on() && !k.is_empty())
                                .map(|mut k| {
                                    k.sort_unstable();
                                    k.dedup();
                                    crate::snapshot::delta::KeyFilter::from_hashes(
                                        &k,
                                        SEGMENT_FILTER_BITS_PER_KEY,
                                        SEGMENT_FILTER_PROBES,
                                    )
                                });
                        self.sealed.push_back(Sealed {
                            entry,
                            bytes,
                            up: Up::Waiting(0),
                        });
                        if self.cfg.pointer_deltas {
                            self.maybe_delta(summary.last_lsn);
                        }
                    }
                } else if uploading {
                    wake = wake.min(due.max(spaced));
                } else {
                    wake = wake.min(spaced);
                }
            }
        }
        // Upload segments.
        for i in 0..self.sealed.len() {
            if let Up::Waiting(t) = self.sealed[i].up {
                if t <= now {
                    self.sealed[i].up = Up::InFlight;
                    let key = self.sealed[i].entry.key.clone();
                    let body = self.sealed[i].bytes.clone();
                    return self.put(
                        Req::Segment(key.clone()),
                        key,
                        body,
                        PutCondition::CreateOnly,
                        ObjectKind::Segment,
                    );
                }
                wake = wake.min(t);
            }
        }
        // Upload the snapshot.
        if let Some(s) = &mut self.snapshot {
            if let Up::Waiting(t) = s.up {
                if t <= now {
                    s.up = Up::InFlight;
                    let key = s.entry.key.clone();
                    let body = s.bytes.clone();
                    return self.put(
                        Req::Snapshot,
                        key,
                        body,
                        PutCondition::CreateOnly,
                        ObjectKind::Snapshot,
                    );
                }
                wake = wake.min(t);
            }
        }
        // Commit.
        if let Some(a) = self.drive_commit(now, &mut wake) {
            return a;
        }
        if let Some(a) = self.drive_page_reads() {
            return a;
        }
        if let Some(a) = self.drive_place_reads() {
            return a;
        }
        if let Some(t) = self.commit_retry_at.into_iter().chain(self.verify_at).min() {
            wake = wake.min(t);
        }
        // While idle, look at the head now and then: a newer epoch fences us.
        if self.commit.is_none() && !self.check_inflight && self.cfg.head_check_ms > 0 {
            if self.next_check == 0 {
                self.next_check = now + self.cfg.head_check_ms;
            }
            if self.next_check <= now {
                self.check_inflight = true;
                return self.get(Req::Check, HEAD_KEY.into());
            }
            wake = wake.min(self.next_check);
        }
        // Delete what waited out its grace period.
        if let Some(a) = self.drive_deletes(now, &mut wake) {
            return a;
        }
        Action::Wait {
            until: wake.max(now),
        }
    }

    /// Milliseconds between two seals the budget allows under steady writes
    /// (0: no budget).
    fn budget_interval_ms(&self) -> u64 {
        match self.cfg.max_commits_per_sec {
            0 => 0,
            r => 1_000 / u64::from(r),
        }
    }

    /// The earliest time the commit budget allows the next seal.
    fn budget_allows_at(&self) -> u64 {
        let t = self.budget_interval_ms();
        let tolerance = t.saturating_mul(u64::from(self.cfg.commit_burst.max(1) - 1));
        self.budget_tat.saturating_sub(tolerance)
    }

    /// Records a seal at `now` against the commit budget (a full segment
    /// spends it too, so a burst of full segments is followed by spacing).
    fn spend_budget(&mut self, now: u64) {
        self.budget_tat = self.budget_tat.max(now) + self.budget_interval_ms();
    }

    /// Feeds the outcome of a DELETE: `Ok(())` when gone (or never there).
    pub fn handle_delete(&mut self, id: RequestId, now: u64, result: Result<(), String>) {
        let Some(Req::Delete(key)) = self.pending.remove(&id) else {
            return;
        };
        self.deleting.remove(&key);
        self.deletes_quiet_until = None;
        match result {
            Ok(()) => {
                self.attempts.remove(&key);
                self.deleted.insert(key.clone());
                self.events.push_back(Event::Deleted { key });
            }
            Err(m) => {
                let d = self.backoff(
                    &key,
                    Error::new(ErrorKind::Unavailable, m).with_object(&key),
                );
                self.delete_retry_at = now + d;
            }
        }
    }

    /// Feeds the outcome of a GET.
    pub fn handle_get(&mut self, id: RequestId, now: u64, resp: GetResponse) {
        let Some(req) = self.pending.remove(&id) else {
            return;
        };
        match req {
            Req::ClaimRead => self.on_claim_read(now, resp),
            Req::Verify => self.on_verify(now, resp),
            Req::Check => self.on_check(now, resp),
            Req::PageRead(r) => self.on_page_read(now, r, resp),
            Req::PlaceRead(r) => self.on_place_read(r, resp),
            Req::Confirm { of, key, len, crc } => self.on_confirm(now, *of, key, (len, crc), resp),
            _ => {}
        }
    }

    /// Feeds the outcome of a PUT.
    pub fn handle_put(&mut self, id: RequestId, now: u64, resp: PutResponse) {
        let Some(req) = self.pending.remove(&id) else {
            return;
        };
        let created = self.created.remove(&id);
        match (resp, created) {
            (
                PutResponse::AlreadyExists | PutResponse::PreconditionFailed,
                Some((key, len, crc)),
            ) => {
                // Ours only if it holds our bytes: read it back.
                if self.role == Role::Fenced {
                    return;
                }
                let a = self.get_sized(
                    Req::Confirm {
                        of: Box::new(req),
                        key: key.clone(),
                        len,
                        crc,
                    },
                    key,
                    len,
                );
                self.queued.push_back(a);
            }
            (r, _) => self.settle_put(now, req, r),
        }
    }

    /// Acts on what a PUT produced (for a create-only PUT whose key was
    /// taken, once its bytes are known to be ours).
    fn settle_put(&mut self, now: u64, req: Req, resp: PutResponse) {
        match req {
            Req::ClaimPut => match resp {
                PutResponse::Ok { etag } if etag.is_some() => {
                    let h = self.claim.take().expect("claim in flight");
                    self.claimed(h, etag);
                }
                PutResponse::Failed { message } => {
                    // The store refused the write (a policy, conditional
                    // writes it does not support, an outage): read the head
                    // and try again a little later (the claim's 32 attempts
                    // then span seconds, so a store that never takes it
                    // fails the claim soon), keeping its answer for the
                    // error if the claim never lands.
                    self.role = Role::Start;
                    self.retry_at = now + self.cfg.retry_base_ms;
                    self.claim_failure = Some(message);
                }
                other => {
                    // Raced (another claim landed first) or a store whose
                    // head reads lag its writes: read the head and decide,
                    // a little later as above, keeping the answer too.
                    self.role = Role::Start;
                    self.retry_at = now + self.cfg.retry_base_ms;
                    self.claim_failure = Some(
                        match other {
                            PutResponse::PreconditionFailed => "412: If-Match did not match",
                            PutResponse::AlreadyExists => "412: a head already exists",
                            _ => "written, without an ETag",
                        }
                        .into(),
                    );
                }
            },
            Req::Segment(key) => {
                let Some(i) = self.sealed.iter().position(|s| s.entry.key == key) else {
                    return;
                };
                match resp {
                    // Taken keys reach here once their bytes proved ours.
                    PutResponse::Ok { .. }
                    | PutResponse::AlreadyExists
                    | PutResponse::PreconditionFailed => {
                        self.attempts.remove(&key);
                        self.sealed[i].up = Up::Done;
                    }
                    PutResponse::Failed { message } => {
                        let d = self.backoff(
                            &key,
                            Error::new(ErrorKind::Unavailable, message).with_object(&key),
                        );
                        self.sealed[i].up = Up::Waiting(now + d);
                    }
                }
            }
            Req::Snapshot => {
                let Some(s) = self.snapshot.as_mut() else {
                    return;
                };
                let key = s.entry.key.clone();
                match resp {
                    PutResponse::Failed { message } => {
                        let d = self.backoff(
                            &key,
                            Error::new(ErrorKind::Unavailable, message).with_object(&key),
                        );
                        if let Some(s) = self.snapshot.as_mut() {
                            s.up = Up::Waiting(now + d);
                        }
                    }
                    _ => {
                        s.up = Up::Done;
                        s.bytes = Vec::new();
                        self.attempts.remove(&key);
                    }
                }
            }
            Req::Page(key) => {
                let failed = matches!(resp, PutResponse::Failed { .. });
                let d = if let PutResponse::Failed { message } = resp {
                    self.backoff(
                        &key,
                        Error::new(ErrorKind::Unavailable, message).with_object(&key),
                    )
                } else {
                    // Its failures in a row end here (each page key is
                    // written once: an entry left would stay for good).
                    self.attempts.remove(&key);
                    0
                };
                if let Some(Commit {
                    stage: Stage::Paging(pages),
                    ..
                }) = self.commit.as_mut()
                {
                    if let Some((_, up)) = pages.get_mut(&key) {
                        *up = if failed {
                            Up::Waiting(now + d)
                        } else {
                            Up::Done
                        };
                    }
                }
            }
            Req::Cas => match resp {
                PutResponse::Ok { etag } if etag.is_some() => self.committed(etag),
                other => {
                    // What the store said, for the error should the head
                    // read back show the write did not land.
                    self.cas_answer = match other {
                        PutResponse::Failed { message } => message,
                        PutResponse::PreconditionFailed => "412: If-Match did not match".into(),
                        PutResponse::AlreadyExists => "the head already exists".into(),
                        PutResponse::Ok { .. } => "written, without an ETag".into(),
                    };
                    if let Some(c) = self.commit.as_mut() {
                        c.stage = Stage::Verifying;
                    }
                    let a = self.get(Req::Verify, HEAD_KEY.into());
                    self.queued.push_back(a);
                }
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::DatasetId;

    /// Drives a publisher answering everything at once until it waits;
    /// returns the times (ms) of its segment PUTs.
    fn drive(p: &mut Publisher, now: u64, etag: &mut u64, seals: &mut Vec<u64>) {
        loop {
            match p.poll(now) {
                Action::Put(req) => {
                    if req.key.starts_with("segments/") {
                        seals.push(now);
                    }
                    *etag += 1;
                    let ok = PutResponse::Ok {
                        etag: Some(etag.to_string()),
                    };
                    p.handle_put(req.id, now, ok);
                }
                Action::Get(req) => p.handle_get(req.id, now, GetResponse::NotFound),
                Action::Delete(req) => p.handle_delete(req.id, now, Ok(())),
                Action::Event(_) => {}
                Action::Wait { .. } => break,
            }
        }
    }

    /// A publisher of `cfg` whose first read of the head found none.
    fn on_an_empty_store(cfg: PublisherConfig) -> Publisher {
        let mut p = Publisher::new(cfg, 1);
        let Action::Get(g) = p.poll(0) else {
            panic!("reads the head first")
        };
        p.handle_get(g.id, 0, GetResponse::NotFound);
        p
    }

    /// Times (ms) of the segment PUTs while a record arrives at each of
    /// `writes` (ms) and every PUT succeeds at once, and the committed LSN
    /// 200 ms after the last write.
    fn seals_for(cfg: PublisherConfig, writes: &[u64]) -> (Vec<u64>, u64) {
        let cfg = PublisherConfig {
            head_check_ms: 0,
            ..cfg
        };
        let mut p = on_an_empty_store(cfg);
        let payload = batch::encode(&[batch::Op::put(b"k".to_vec(), vec![0; 100])]).unwrap();
        let (mut seals, mut etag) = (Vec::new(), 0u64);
        let end = writes.last().copied().unwrap_or(0) + 200;
        let mut next = writes.iter().peekable();
        let mut lsn = 1;
        for now in 0..=end {
            while next.next_if(|&&w| w == now).is_some() {
                p.push(lsn, &payload, now).unwrap();
                lsn += 1;
            }
            drive(&mut p, now, &mut etag, &mut seals);
        }
        (seals, p.committed_lsn())
    }

    #[test]
    fn pushing_past_has_room_never_grows_a_segment_past_the_catalog_limit() {
        let mut p = on_an_empty_store(PublisherConfig {
            snapshot_every: None,
            head_check_ms: 0,
            ..PublisherConfig::default()
        });
        drive(&mut p, 0, &mut 0, &mut Vec::new());
        let record = vec![7u8; crate::segment::MAX_RECORD_LEN as usize];
        let mut lsn = 1;
        let err = loop {
            match p.push(lsn, &record, 1) {
                Ok(()) => lsn += 1,
                Err(e) => break e,
            }
            assert!(lsn < 10, "pushed {lsn} records of 64 MiB into one segment");
        };
        assert_eq!(
            (err.kind(), err.lsn()),
            (ErrorKind::InvalidInput, Some(lsn))
        );
        let open = p.open.as_ref().unwrap().len();
        assert!(open <= crate::catalog::MAX_SEGMENT_BYTES, "{open}");
        // Refused before anything moved: after a poll, the same LSN goes in.
        drive(&mut p, 2, &mut 0, &mut Vec::new());
        p.push(lsn, &record, 3).unwrap();
    }

    /// Segments sealed while one record arrives every millisecond for a
    /// second.
    fn segments_for_steady_writes(cfg: PublisherConfig) -> (usize, u64) {
        let writes: Vec<u64> = (1..=1_000).collect();
        let (seals, lsn) = seals_for(cfg, &writes);
        (seals.len(), lsn)
    }

    fn unbudgeted(min_commit_interval_ms: u64) -> PublisherConfig {
        PublisherConfig {
            min_commit_interval_ms,
            max_commits_per_sec: 0,
            ..PublisherConfig::default()
        }
    }

    /// A head whose epoch is `u64::MAX`, or whose generation is past half
    /// its range (a hostile or damaged store), fences the publisher with a
    /// data error naming the head, instead of an overflow (a panic, or a
    /// head of epoch 0 every reader refuses).
    #[test]
    fn a_head_at_the_largest_epoch_fences_the_claim() {
        for (epoch, generation) in [(u64::MAX, 1), (3, u64::MAX / 2 - 1), (3, u64::MAX)] {
            fences_the_claim(epoch, generation);
        }
    }

    fn fences_the_claim(epoch: u64, generation: u64) {
        let mut h = Head::new(DatasetId::from_seed(5), epoch);
        h.generation = generation;
        h.committed_at_ms = 1;
        let mut p = Publisher::new(PublisherConfig::default(), 1);
        let Action::Get(g) = p.poll(0) else {
            panic!("reads the head first")
        };
        let body = h.encode();
        let resp = GetResponse::Ok {
            body,
            etag: Some("\"1\"".into()),
            range: None,
        };
        p.handle_get(g.id, 0, resp);
        let mut fenced = None;
        for _ in 0..10 {
            match p.poll(0) {
                Action::Event(Event::Fenced(e)) => fenced = Some(e),
                Action::Put(req) => panic!("claimed with a head of {} bytes", req.body.len()),
                Action::Wait { .. } => break,
                _ => {}
            }
        }
        let e = fenced.expect("fenced");
        assert_eq!(e.kind(), ErrorKind::Data, "{e}");
        assert_eq!(e.object(), Some(crate::catalog::HEAD_KEY), "{e}");
    }

    /// A store that gives no ETag, on the claim's PUT nor on the head read
    /// that finds the claim landed: the publisher stops at once with an
    /// error saying so, rather than taking the claim and failing every
    /// conditional write after it for ever.
    #[test]
    fn a_claim_found_landed_without_an_etag_fences() {
        let mut p = Publisher::new(PublisherConfig::default(), 1);
        let (mut fenced, mut claim) = (None, None);
        for now in 0..200 {
            match p.poll(now) {
                Action::Get(g) => {
                    let resp = match &claim {
                        None => GetResponse::NotFound,
                        Some(body) => GetResponse::Ok {
                            body: Clone::clone(body),
                            etag: None,
                            range: None,
                        },
                    };
                    p.handle_get(g.id, now, resp);
                }
                Action::Put(req) => {
                    assert_eq!(req.key, HEAD_KEY, "only the claim is written");
                    assert!(claim.is_none(), "claimed a second time");
                    claim = Some(req.body.to_vec());
                    p.handle_put(req.id, now, PutResponse::Ok { etag: None });
                }
                Action::Event(Event::Fenced(e)) => {
                    fenced = Some(e);
                    break;
                }
                _ => {}
            }
        }
        let e = fenced.expect("fenced");
        assert!(e.to_string().contains("no ETag"), "{e}");
        assert_eq!(e.object(), Some(HEAD_KEY), "{e}");
    }

    /// An idle publisher whose checks of the head read bytes it cannot
    /// decode (a damaged head, or a newer release's) says so after
    /// `max_attempts` checks, naming the head, and checks less often.
    #[test]
    fn idle_checks_that_cannot_read_the_head_are_reported() {
        let mut p = on_an_empty_store(PublisherConfig::default());
        let (mut etag, mut seals) = (0, Vec::new());
        drive(&mut p, 0, &mut etag, &mut seals);
        assert!(p.head.is_some(), "claimed");
        let (mut errors, mut checks) = (Vec::new(), Vec::new());
        let mut now = 0;
        while now < 600_000 && errors.is_empty() {
            match p.poll(now) {
                Action::Get(g) => {
                    assert_eq!(g.key, HEAD_KEY);
                    checks.push(now);
                    let resp = GetResponse::Ok {
                        body: b"{\"format\": 99}".to_vec(),
                        etag: Some("\"x\"".into()),
                        range: None,
                    };
                    p.handle_get(g.id, now, resp);
                }
                Action::Event(Event::Error(e)) => errors.push(e),
                Action::Wait { until } => now = until.max(now + 1),
                other => panic!("{other:?}"),
            }
        }
        let e = errors.first().expect("reported");
        assert_eq!(e.object(), Some(HEAD_KEY), "{e}");
        let n = p.cfg.max_attempts as usize;
        assert_eq!(checks.len(), n, "reported at the {n}th check: {checks:?}");
        let gaps: Vec<u64> = checks.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "backs off: {gaps:?}");
    }

    /// Idle checks that fail now and then, each followed by one that reads
    /// the head: never `max_attempts` in a row, so never reported, and the
    /// checks keep their interval.
    #[test]
    fn scattered_failed_idle_checks_are_not_reported() {
        let mut p = on_an_empty_store(PublisherConfig::default());
        let (mut etag, mut seals) = (0, Vec::new());
        drive(&mut p, 0, &mut etag, &mut seals);
        let ours = p.head.as_ref().unwrap().encode();
        let (mut errors, mut checks, mut now) = (Vec::new(), 0u32, 0);
        while checks < 40 {
            match p.poll(now) {
                Action::Get(g) => {
                    checks += 1;
                    let body = if checks % 4 == 0 {
                        ours.clone()
                    } else {
                        b"{".to_vec()
                    };
                    let resp = GetResponse::Ok {
                        body,
                        etag: Some(etag.to_string()),
                        range: None,
                    };
                    p.handle_get(g.id, now, resp);
                }
                Action::Event(Event::Error(e)) => errors.push(e),
                Action::Wait { until } => now = until.max(now + 1),
                other => panic!("{other:?}"),
            }
        }
        assert!(errors.is_empty(), "{errors:?}");
        let most = 40 * p.cfg.retry_max_ms.max(p.cfg.head_check_ms);
        assert!(now < most, "checks spread over {now} ms");
    }

    /// A publisher that claimed `h`, given a snapshot at its committed
    /// LSN, with retention keeping one LSN: everything below goes.
    fn claimed_retaining_one_lsn(h: &mut Head) -> Publisher {
        h.snapshot = Some(crate::catalog::SnapshotEntry {
            key: crate::catalog::snapshot_key(h.committed_lsn, 1),
            lsn: h.committed_lsn,
            epoch: 1,
            size: 1 << 10,
            crc32: 0,
            entries: 1,
            version: 1,
            suffix: None,
            footer_crc32: None,
        });
        let cfg = PublisherConfig {
            head_check_ms: 0,
            max_commits_per_sec: 0,
            retain_lsns: Some(1),
            snapshot_every: None,
            ..PublisherConfig::default()
        };
        let mut p = Publisher::new(cfg, 1);
        let Action::Get(g) = p.poll(0) else {
            panic!("reads the head first")
        };
        let resp = GetResponse::Ok {
            body: h.encode(),
            etag: Some("\"1\"".into()),
            range: None,
        };
        p.handle_get(g.id, 0, resp);
        p
    }

    /// Retention of a claimed head whose pages each hold more entries
    /// than one commit can retire (a hostile or broken writer's: up to
    /// some 100,000 in a 16 MiB page) reads one page at a time, not 64
    /// of them into memory at once; pages of honest sizes are read 4 at a
    /// time.
    #[test]
    fn retention_reads_no_more_pages_than_one_commit_can_retire() {
        for (count, reads) in [(retention::MAX_RETIRED as u32 * 2, 1), (8, 4)] {
            let mut h = Head::new(DatasetId::from_seed(5), 1);
            h.committed_at_ms = 1;
            h.committed_lsn = 100 * u64::from(count);
            h.pages = (0..100)
                .map(|i| {
                    let (first, last) = (i * u64::from(count) + 1, (i + 1) * u64::from(count));
                    PageRef {
                        key: crate::catalog::page_key(0, first, last, 1),
                        level: 0,
                        first_lsn: first,
                        last_lsn: last,
                        count,
                        crc32: 0,
                    }
                })
                .collect();
            let mut p = claimed_retaining_one_lsn(&mut h);
            let small = batch::encode(&[batch::Op::put(b"k".to_vec(), vec![1])]).unwrap();
            let mut pushed = false;
            let mut page_reads = 0;
            for now in 0..1_000 {
                match p.poll(now) {
                    Action::Put(req) => {
                        let ok = PutResponse::Ok {
                            etag: Some(format!("\"{now}\"")),
                        };
                        p.handle_put(req.id, now, ok);
                    }
                    // Page reads stay unanswered: how many are out at once.
                    Action::Get(req) if req.key.starts_with("catalog/pages/") => page_reads += 1,
                    Action::Get(req) => p.handle_get(req.id, now, GetResponse::NotFound),
                    Action::Delete(req) => p.handle_delete(req.id, now, Ok(())),
                    Action::Event(_) => {}
                    Action::Wait { .. } if !pushed && p.committed_lsn() == h.committed_lsn => {
                        p.push(h.committed_lsn + 1, &small, now).unwrap();
                        pushed = true;
                    }
                    Action::Wait { .. } => {}
                }
            }
            assert!(pushed, "claimed");
            assert_eq!(page_reads, reads, "pages of {count} entries");
        }
    }

    /// Names `n` pages of `count` entries each (never stored) in `h`.
    fn hostile_pages(h: &mut Head, count: u32, n: u64) {
        h.committed_at_ms = 1;
        h.committed_lsn = n * u64::from(count);
        h.pages = (0..n)
            .map(|i| {
                let (first, last) = (i * u64::from(count) + 1, (i + 1) * u64::from(count));
                PageRef {
                    key: crate::catalog::page_key(0, first, last, 1),
                    level: 0,
                    first_lsn: first,
                    last_lsn: last,
                    count,
                    crc32: 0,
                }
            })
            .collect();
    }

    /// Page GETs that do not answer while commits go on: each commit does
    /// not ask for more pages (each up to 16 MiB, cached until retired);
    /// one batch is asked for at a time.
    #[test]
    fn page_reads_asked_across_commits_stay_within_one_batch() {
        let mut h = Head::new(DatasetId::from_seed(5), 1);
        hostile_pages(&mut h, retention::MAX_RETIRED as u32 * 2, 100);
        let mut p = claimed_retaining_one_lsn(&mut h);
        let small = batch::encode(&[batch::Op::put(b"k".to_vec(), vec![1])]).unwrap();
        for now in 0..2_000u64 {
            match p.poll(now) {
                Action::Put(req) => {
                    let ok = PutResponse::Ok {
                        etag: Some(format!("\"{now}\"")),
                    };
                    p.handle_put(req.id, now, ok);
                }
                Action::Get(req) if req.key.starts_with("catalog/pages/") => {}
                Action::Get(req) => p.handle_get(req.id, now, GetResponse::NotFound),
                Action::Delete(req) => p.handle_delete(req.id, now, Ok(())),
                Action::Event(_) => {}
                Action::Wait { .. } => {
                    if p.next_lsn() == Some(p.committed_lsn() + 1) && now % 50 == 0 {
                        p.push(p.committed_lsn() + 1, &small, now).unwrap();
                    }
                }
            }
        }
        let asked = p.page_reads.len() + p.page_reading.len();
        assert!(
            asked <= 1,
            "pages asked for (each up to 16 MiB, cached until retired): {asked}"
        );
    }

    /// The level-0 page of the eight one-LSN segments from `first`.
    fn eight_segment_page(first: u64) -> Vec<u8> {
        crate::catalog::Page {
            format: 1,
            level: 0,
            segments: (first..first + 8).map(one_lsn_segment).collect(),
            pages: Vec::new(),
            digests: Default::default(),
        }
        .encode()
    }

    /// A head committed at LSN 64 whose history is eight such pages.
    fn head_of_eight_pages() -> Head {
        let mut h = Head::new(DatasetId::from_seed(5), 1);
        h.committed_at_ms = 1;
        h.committed_lsn = 64;
        h.pages = (0..8u64)
            .map(|i| PageRef {
                key: crate::catalog::page_key(0, 1 + 8 * i, 8 + 8 * i, 1),
                level: 0,
                first_lsn: 1 + 8 * i,
                last_lsn: 8 + 8 * i,
                count: 8,
                crc32: crate::crc::hash(&eight_segment_page(1 + 8 * i)),
            })
            .collect();
        h
    }

    /// The store's answer to a GET of one of [`head_of_eight_pages`]'s pages.
    fn eight_page_answer(key: &str) -> GetResponse {
        let first = key
            .split(['-', '.', '/'])
            .filter_map(|t| t.parse().ok())
            .nth(1)
            .expect("a page key");
        GetResponse::Ok {
            body: eight_segment_page(first),
            etag: None,
            range: None,
        }
    }

    /// One of four page reads fails and the other three are read: no head
    /// is written with nothing new (retention waits out its backoff).
    #[test]
    fn a_failed_page_read_makes_no_empty_commit() {
        let mut h = head_of_eight_pages();
        let mut p = claimed_retaining_one_lsn(&mut h);
        let small = batch::encode(&[batch::Op::put(b"k".to_vec(), vec![1])]).unwrap();
        let mut held = Vec::new();
        let mut heads = Vec::new();
        let mut pushed = false;
        for now in 0..500u64 {
            if now == 200 {
                let mut it = held.drain(..);
                let first: crate::io::GetRequest = it.next().unwrap();
                p.handle_get(
                    first.id,
                    now,
                    GetResponse::Failed {
                        status: Some(500),
                        message: "x".into(),
                    },
                );
                for r in it {
                    let r: crate::io::GetRequest = r;
                    p.handle_get(r.id, now, eight_page_answer(&r.key));
                }
            }
            match p.poll(now) {
                Action::Put(req) => {
                    if req.key == HEAD_KEY {
                        heads.push((now, Head::decode(&req.body).unwrap()));
                    }
                    let ok = PutResponse::Ok {
                        etag: Some(format!("\"{now}\"")),
                    };
                    p.handle_put(req.id, now, ok);
                }
                Action::Get(req) if req.key.starts_with("catalog/pages/") => held.push(req),
                Action::Get(req) => p.handle_get(req.id, now, GetResponse::NotFound),
                Action::Delete(req) => p.handle_delete(req.id, now, Ok(())),
                Action::Event(_) => {}
                Action::Wait { .. } if !pushed => {
                    p.push(p.committed_lsn() + 1, &small, now).unwrap();
                    pushed = true;
                }
                Action::Wait { .. } => {}
            }
        }
        let after: Vec<_> = heads.iter().filter(|(t, _)| *t >= 200).collect();
        assert!(
            after.is_empty(),
            "head writes with nothing new: {}",
            after.len()
        );
    }

    /// An entry for a segment of epoch 1 holding LSN `lsn` alone.
    fn one_lsn_segment(lsn: u64) -> SegmentEntry {
        SegmentEntry {
            key: crate::catalog::segment_key(1, lsn, lsn),
            epoch: 1,
            first_lsn: lsn,
            last_lsn: lsn,
            size: 100,
            crc32: 0,
            records_end: crate::segment::HEADER_LEN + 40,
            index: vec![crate::segment::IndexEntry {
                lsn,
                offset: crate::segment::HEADER_LEN,
            }],
            filter: None,
        }
    }

    /// Retention of a claimed head naming a level-0 page of 14,000
    /// segments and a level-1 page of 10,000 references (pages no
    /// publisher with these settings writes): listing what either names
    /// in the head would take it past its 1 MiB bound, where every reader
    /// refuses it, this publisher too. Each page is retired alone, an error
    /// names it, and every head written stays within the bound.
    #[test]
    fn a_page_too_large_to_list_in_the_head_is_retired_alone() {
        let reference = |level: u32, first: u64, last: u64, count: u32, body: &[u8]| PageRef {
            key: crate::catalog::page_key(level, first, last, 1),
            level,
            first_lsn: first,
            last_lsn: last,
            count,
            crc32: crate::crc::hash(body),
        };
        let leaves = crate::catalog::Page {
            format: 1,
            level: 0,
            segments: (1..=14_000).map(one_lsn_segment).collect(),
            pages: Vec::new(),
            digests: Default::default(),
        }
        .encode();
        let children: Vec<PageRef> = (14_001..=24_000)
            .map(|lsn| reference(0, lsn, lsn, 1, b"absent"))
            .collect();
        let upper = crate::catalog::Page {
            format: 1,
            level: 1,
            segments: Vec::new(),
            pages: children,
            digests: Default::default(),
        }
        .encode();
        let mut h = Head::new(DatasetId::from_seed(5), 1);
        h.committed_at_ms = 1;
        h.committed_lsn = 24_000;
        h.pages = vec![
            reference(0, 1, 14_000, 14_000, &leaves),
            reference(1, 14_001, 24_000, 10_000, &upper),
        ];
        let keys = [h.pages[0].key.clone(), h.pages[1].key.clone()];
        let bodies = [leaves, upper];
        let mut p = claimed_retaining_one_lsn(&mut h);
        let small = batch::encode(&[batch::Op::put(b"k".to_vec(), vec![1])]).unwrap();
        let (mut pushed, mut heads, mut named) = (false, 0, Vec::new());
        let mut last = None;
        for now in 0..2_000 {
            match p.poll(now) {
                Action::Put(req) => {
                    if req.key == HEAD_KEY {
                        heads += 1;
                        assert!(
                            req.body.len() <= crate::catalog::MAX_HEAD_BYTES,
                            "a head of {} bytes",
                            req.body.len()
                        );
                        last = Some(Head::decode(&req.body).expect("a head readers take"));
                    }
                    let ok = PutResponse::Ok {
                        etag: Some(format!("\"{now}\"")),
                    };
                    p.handle_put(req.id, now, ok);
                }
                Action::Get(req) => {
                    let resp = match keys.iter().position(|k| *k == req.key) {
                        Some(i) => GetResponse::Ok {
                            body: bodies[i].clone(),
                            etag: None,
                            range: None,
                        },
                        None => GetResponse::NotFound,
                    };
                    p.handle_get(req.id, now, resp);
                }
                Action::Delete(req) => p.handle_delete(req.id, now, Ok(())),
                Action::Event(Event::Error(e)) => {
                    named.extend(e.object().map(str::to_string));
                }
                Action::Event(_) => {}
                Action::Wait { .. } if !pushed && p.committed_lsn() == h.committed_lsn => {
                    p.push(h.committed_lsn + 1, &small, now).unwrap();
                    pushed = true;
                }
                Action::Wait { .. } => {}
            }
        }
        assert!(pushed && heads > 0, "claimed and committed");
        let last = last.expect("a head written");
        assert!(last.pages.is_empty(), "{:?}", last.pages);
        for k in &keys {
            assert!(named.contains(k), "no error names {k}: {named:?}");
            assert!(last.retired.iter().any(|r| &r.key == k) || p.deleted.contains(k));
        }
    }

    /// Retention of a claimed head naming a page that is not found: once
    /// (a store not showing it yet), the page is read again and what it
    /// names is retired with it; for good, only the page leaves the head
    /// after `max_attempts` reads, and an error names it.
    #[test]
    fn a_page_not_found_is_read_again_before_only_it_is_retired() {
        let leaves = crate::catalog::Page {
            format: 1,
            level: 0,
            segments: (1..=4).map(one_lsn_segment).collect(),
            pages: Vec::new(),
            digests: Default::default(),
        }
        .encode();
        for missing_reads in [1, u32::MAX] {
            let mut h = Head::new(DatasetId::from_seed(5), 1);
            h.committed_at_ms = 1;
            h.committed_lsn = 4;
            h.pages = vec![PageRef {
                key: crate::catalog::page_key(0, 1, 4, 1),
                level: 0,
                first_lsn: 1,
                last_lsn: 4,
                count: 4,
                crc32: crate::crc::hash(&leaves),
            }];
            let page = h.pages[0].key.clone();
            let mut p = claimed_retaining_one_lsn(&mut h);
            let small = batch::encode(&[batch::Op::put(b"k".to_vec(), vec![1])]).unwrap();
            let (mut pushed, mut reads, mut named) = (false, 0u32, Vec::new());
            let mut last = None;
            let mut next_push = 0;
            for now in (0..60_000).step_by(10) {
                match p.poll(now) {
                    Action::Put(req) => {
                        if req.key == HEAD_KEY {
                            last = Some(Head::decode(&req.body).unwrap());
                        }
                        let ok = PutResponse::Ok {
                            etag: Some(format!("\"{now}\"")),
                        };
                        p.handle_put(req.id, now, ok);
                    }
                    Action::Get(req) if req.key == page => {
                        reads += 1;
                        let resp = if reads <= missing_reads {
                            GetResponse::NotFound
                        } else {
                            GetResponse::Ok {
                                body: leaves.clone(),
                                etag: None,
                                range: None,
                            }
                        };
                        p.handle_get(req.id, now, resp);
                    }
                    Action::Get(req) => p.handle_get(req.id, now, GetResponse::NotFound),
                    Action::Delete(req) => p.handle_delete(req.id, now, Ok(())),
                    Action::Event(Event::Error(e)) => named.extend(e.object().map(str::to_string)),
                    Action::Event(_) => {}
                    // A commit every second or so: retention acts as commits are built.
                    Action::Wait { .. }
                        if now >= next_push && p.next_lsn() == Some(p.committed_lsn() + 1) =>
                    {
                        p.push(p.committed_lsn() + 1, &small, now).unwrap();
                        pushed = true;
                        next_push = now + 1_000;
                    }
                    Action::Wait { .. } => {}
                }
            }
            let last = last.expect("a head written");
            assert!(pushed && last.pages.is_empty(), "{:?}", last.pages);
            let gone =
                |k: &String| p.deleted.contains(k) || last.retired.iter().any(|r| &r.key == k);
            assert!(gone(&page));
            let under: Vec<String> = (1..=4)
                .map(|l| crate::catalog::segment_key(1, l, l))
                .collect();
            if missing_reads == 1 {
                assert_eq!(reads, 2, "read again after the first answer");
                assert!(
                    under.iter().all(gone),
                    "what the page names was left behind"
                );
                assert!(!named.contains(&page), "{named:?}");
            } else {
                assert_eq!(
                    reads, p.cfg.max_attempts,
                    "reads before the page was taken for gone"
                );
                assert!(!under.iter().any(gone));
                assert!(named.contains(&page), "no error names {page}: {named:?}");
            }
        }
    }

    /// Retention that must read pages first reads them on the side: while
    /// a page GET is out (a store that hangs until the driver's time
    /// limit), new LSNs are committed as usual, and no more than
    /// `MAX_PAGE_READS_IN_FLIGHT` page GETs (each up to 16 MiB) are out at
    /// once. Once the pages are read, a later commit retires them.
    #[test]
    fn page_reads_for_retention_do_not_hold_back_commits() {
        let mut h = head_of_eight_pages();
        let mut p = claimed_retaining_one_lsn(&mut h);
        let small = batch::encode(&[batch::Op::put(b"k".to_vec(), vec![1])]).unwrap();
        let mut held: Vec<crate::io::GetRequest> = Vec::new();
        let mut most_out = 0;
        let mut last = None;
        for now in (0..20_000).step_by(10) {
            if now == 10_000 {
                // The store answers at last.
                for req in held.drain(..) {
                    p.handle_get(req.id, now, eight_page_answer(&req.key));
                }
            }
            if p.next_lsn() == Some(p.committed_lsn() + 1) && now % 1_000 == 0 {
                p.push(p.committed_lsn() + 1, &small, now).unwrap();
            }
            loop {
                match p.poll(now) {
                    Action::Put(req) => {
                        if req.key == HEAD_KEY {
                            last = Some(Head::decode(&req.body).unwrap());
                        }
                        let ok = PutResponse::Ok {
                            etag: Some(format!("\"{now}-{}\"", req.key.len())),
                        };
                        p.handle_put(req.id, now, ok);
                    }
                    Action::Get(req) if req.key.starts_with("catalog/pages/") => {
                        if now < 10_000 {
                            held.push(req);
                            most_out = most_out.max(held.len());
                        } else {
                            p.handle_get(req.id, now, eight_page_answer(&req.key));
                        }
                    }
                    Action::Get(req) => p.handle_get(req.id, now, GetResponse::NotFound),
                    Action::Delete(req) => p.handle_delete(req.id, now, Ok(())),
                    Action::Event(_) => {}
                    Action::Wait { .. } => break,
                }
            }
            if now == 9_990 {
                assert!(!held.is_empty(), "retention asked for pages");
                assert!(
                    p.committed_lsn() >= 64 + 9,
                    "commits waited for the page reads: committed {}",
                    p.committed_lsn()
                );
                assert_eq!(most_out, 4, "page reads out at once");
            }
        }
        let last = last.expect("heads written");
        assert!(last.pages.is_empty(), "pages left: {:?}", last.pages);
        assert!(
            last.retired
                .iter()
                .any(|r| r.key == crate::catalog::segment_key(1, 1, 1))
                || p.deleted.contains(&crate::catalog::segment_key(1, 1, 1)),
            "what the pages named was not retired"
        );
    }

    /// A record over the segment's bound is refused before the publisher
    /// moves: the next LSN it expects is still that record's.
    #[test]
    fn a_record_too_large_leaves_the_publisher_where_it_was() {
        let mut p = on_an_empty_store(PublisherConfig::default());
        let (mut etag, mut seals) = (0, Vec::new());
        drive(&mut p, 0, &mut etag, &mut seals);
        let small = batch::encode(&[batch::Op::put(b"k".to_vec(), vec![1])]).unwrap();
        p.push(1, &small, 1).unwrap();
        let huge = vec![0u8; (crate::segment::MAX_RECORD_LEN + 1) as usize];
        let e = p.push(2, &huge, 1).expect_err("too large");
        assert_eq!(e.lsn(), Some(2), "{e}");
        assert_eq!(p.next_lsn(), Some(2));
        p.push(2, &small, 1).unwrap();
        drive(&mut p, 300, &mut etag, &mut seals);
        assert_eq!(p.committed_lsn(), 2);
    }

    /// Without retention no page is ever read back, so none is kept in
    /// memory: a publisher running for days pages out without growing.
    #[test]
    fn pages_are_not_kept_without_retention() {
        let cfg = PublisherConfig {
            head_check_ms: 0,
            max_commits_per_sec: 0,
            inline_segments: 2,
            page_fanout: 2,
            ..PublisherConfig::default()
        };
        let mut p = on_an_empty_store(cfg);
        let (mut etag, mut seals) = (0, Vec::new());
        drive(&mut p, 0, &mut etag, &mut seals);
        let small = batch::encode(&[batch::Op::put(b"k".to_vec(), vec![1])]).unwrap();
        for lsn in 1..=200u64 {
            p.push(lsn, &small, lsn * 300).unwrap();
            drive(&mut p, lsn * 300, &mut etag, &mut seals);
        }
        assert_eq!(p.committed_lsn(), 200);
        assert!(!p.head.as_ref().unwrap().pages.is_empty(), "paged out");
        assert_eq!(p.page_cache.len(), 0);
    }

    /// Every page, snapshot, delta and delete fails once, then lands: the
    /// count of failures in a row each left ends with it, so a publisher
    /// under a flaky store keeps no entry per object it ever wrote.
    #[test]
    fn failures_of_objects_that_then_landed_are_forgotten() {
        let cfg = PublisherConfig {
            head_check_ms: 0,
            max_commits_per_sec: 0,
            inline_segments: 2,
            page_fanout: 2,
            snapshot_every: Some(40),
            delta_every: Some(10),
            retain_lsns: Some(20),
            grace_ms: 0,
            retry_base_ms: 1,
            retry_max_ms: 2,
            ..PublisherConfig::default()
        };
        let mut p = on_an_empty_store(cfg);
        let (mut etag, mut failed) = (0u64, std::collections::HashSet::new());
        drive(&mut p, 0, &mut etag, &mut Vec::new());
        let small = batch::encode(&[batch::Op::put(b"k".to_vec(), vec![1])]).unwrap();
        let (mut kinds, mut now) = (std::collections::BTreeSet::new(), 0);
        for lsn in 1..=420u64 {
            if lsn <= 400 {
                p.push(lsn, &small, now).unwrap();
            }
            for _ in 0..20 {
                now += 5;
                loop {
                    match p.poll(now) {
                        Action::Put(req) => {
                            let kind = match req.key.split('/').next().unwrap_or("") {
                                "catalog" if req.key != HEAD_KEY => "pages".to_string(),
                                k => k.to_string(),
                            };
                            let flaky = kind != "segments" && req.key != HEAD_KEY;
                            if flaky && failed.insert(req.key.clone()) {
                                kinds.insert(kind);
                                let message = "503: try again".into();
                                p.handle_put(req.id, now, PutResponse::Failed { message });
                            } else {
                                etag += 1;
                                let ok = PutResponse::Ok {
                                    etag: Some(etag.to_string()),
                                };
                                p.handle_put(req.id, now, ok);
                            }
                        }
                        Action::Get(req) => p.handle_get(req.id, now, GetResponse::NotFound),
                        Action::Delete(req) => {
                            let first = failed.insert(format!("delete {}", req.key));
                            let r = if first { Err("503".into()) } else { Ok(()) };
                            if first {
                                kinds.insert("delete".into());
                            }
                            p.handle_delete(req.id, now, r);
                        }
                        Action::Event(_) => {}
                        Action::Wait { .. } => break,
                    }
                }
            }
        }
        assert_eq!(p.committed_lsn(), 400);
        for k in ["delete", "deltas", "pages", "snapshots"] {
            assert!(kinds.contains(k), "no {k} failed: {kinds:?}");
        }
        let left: Vec<_> = p.attempts.keys().filter(|k| *k != HEAD_KEY).collect();
        assert!(left.is_empty(), "{} counts left: {left:?}", left.len());
    }

    #[test]
    fn min_commit_interval_spaces_seals() {
        let (eager, lsn) = segments_for_steady_writes(unbudgeted(0));
        assert_eq!(lsn, 1_000);
        assert!(eager >= 900, "eager publisher sealed only {eager} segments");
        let (spaced, lsn) = segments_for_steady_writes(unbudgeted(100));
        assert_eq!(lsn, 1_000, "every record is still committed");
        assert!(
            (9..=12).contains(&spaced),
            "a 100 ms floor over one second sealed {spaced} segments"
        );
    }

    #[test]
    fn the_default_budget_spaces_steady_writes() {
        let (n, lsn) = segments_for_steady_writes(PublisherConfig::default());
        assert_eq!(lsn, 1_000, "every record is still committed");
        let most = DEFAULT_MAX_COMMITS_PER_SEC + DEFAULT_COMMIT_BURST + 1;
        assert!(
            (DEFAULT_MAX_COMMITS_PER_SEC as usize..=most as usize).contains(&n),
            "the default budget sealed {n} segments for a second of steady writes"
        );
        // A budget of 50 a second with a burst of 5.
        let cfg = PublisherConfig {
            max_commits_per_sec: 50,
            commit_burst: 5,
            ..PublisherConfig::default()
        };
        let (n, _) = segments_for_steady_writes(cfg);
        assert!((50..=56).contains(&n), "sealed {n} segments");
    }

    #[test]
    fn sporadic_writes_are_sealed_at_once() {
        // A write now and then, and short bursts after quiet periods.
        let writes = [5, 400, 401, 900, 1_300, 1_301, 1_302, 2_000];
        let (seals, lsn) = seals_for(PublisherConfig::default(), &writes);
        assert_eq!(lsn, writes.len() as u64);
        // The first write after each quiet period is sealed the moment it
        // arrives.
        for quiet_first in [5, 400, 900, 1_300, 2_000] {
            assert!(
                seals.contains(&quiet_first),
                "write at {quiet_first} ms not sealed at once: seals at {seals:?}"
            );
        }
        // The budget only ever delays, never drops: the burst's tail is
        // sealed within one budget interval.
        let interval = 1_000 / u64::from(DEFAULT_MAX_COMMITS_PER_SEC);
        assert!(seals
            .iter()
            .any(|&t| (1_301..=1_302 + interval).contains(&t)));
    }

    /// With a steady stream the budget, not the flush interval, sets the
    /// pace; a full segment is sealed at once whatever the budget.
    #[test]
    fn full_segments_are_not_held_by_the_budget() {
        let cfg = PublisherConfig {
            segment_bytes: 1_000,
            max_commits_per_sec: 1,
            commit_burst: 1,
            ..PublisherConfig::default()
        };
        let writes: Vec<u64> = (1..=200).collect();
        let (seals, lsn) = seals_for(cfg, &writes);
        assert!(lsn >= 190, "committed only {lsn} of 200 records");
        // About 120 bytes a record: a segment fills every 8 or 9 records.
        assert!(seals.len() >= 20, "sealed only {} segments", seals.len());
    }

    #[test]
    fn memory_is_bounded_when_uploads_stall() {
        let cfg = PublisherConfig {
            segment_bytes: 10_000,
            max_pending_segments: 2,
            ..PublisherConfig::default()
        };
        let mut p = on_an_empty_store(cfg);
        let Action::Put(claim) = p.poll(0) else {
            panic!("claims")
        };
        p.handle_put(
            claim.id,
            0,
            PutResponse::Ok {
                etag: Some("1".into()),
            },
        );
        let payload = batch::encode(&[batch::Op::put(b"k".to_vec(), vec![0; 100])]).unwrap();
        let mut lsn = 1;
        // No PUT is ever answered: the backlog must stop being accepted.
        for _ in 0..10_000 {
            while p.has_room() {
                p.push(lsn, &payload, 0).unwrap();
                lsn += 1;
            }
            while !matches!(p.poll(0), Action::Wait { .. }) {}
        }
        let held: u64 = p.sealed.iter().map(|s| s.bytes.len() as u64).sum::<u64>()
            + p.open.as_ref().map_or(0, |o| o.len());
        // Two sealed segments and the open one, each at most one record and a footer past the target.
        assert!(held <= 3 * (10_000 + 1_000), "holds {held} bytes");
        assert!(lsn < 400, "accepted {lsn} records with uploads stalled");
    }
}
