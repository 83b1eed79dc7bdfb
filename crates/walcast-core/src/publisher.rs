//! The publisher's commit machine: claims the dataset by bumping the epoch,
//! seals records into segments, uploads them create-only, commits the head
//! with compare-and-swap, pages old entries out, writes snapshots, applies
//! retention and deletes late.
//!
//! Pure like the replica: feed it records with [`Publisher::push`] and
//! responses with the `handle_*` methods, and after each call drain
//! [`Publisher::poll`] until it returns [`Action::Wait`].

use std::collections::{HashMap, HashSet, VecDeque};

use crate::batch;
use crate::catalog::{
    self, DatasetId, Head, Page, PageRef, Retired, SegmentEntry, SnapshotEntry, HEAD_KEY,
};
use crate::error::{Error, ErrorKind};
use crate::io::{GetRequest, GetResponse, RequestId};
use crate::rng::splitmix64;
use crate::segment::SegmentBuilder;
use crate::state::KvState;

/// A page to upload before the head that references it: (key, bytes).
type PageUpload = (String, Vec<u8>);

/// Tuning for a [`Publisher`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherConfig {
    /// Seal a segment once it holds this many bytes.
    pub segment_bytes: u64,
    /// Longest time (ms) a record may wait before it is sealed, even while
    /// another upload is in flight.
    pub flush_interval_ms: u64,
    /// Shortest time (ms) between two seals, unless a segment is full: caps
    /// segment PUTs and head commits at about `1000 / min_commit_interval_ms`
    /// a second under steady writes, for at most this much added lag. 0 (the
    /// default) seals whenever data waits and no upload is in flight.
    pub min_commit_interval_ms: u64,
    /// Sealed segments waiting for upload or commit, at most.
    pub max_pending_segments: usize,
    /// Write a snapshot every this many LSNs (KV payloads only).
    pub snapshot_every: Option<u64>,
    /// Keep at least this many LSNs of history in segments; older ones
    /// leave the catalog once a snapshot covers them.
    pub retain_lsns: Option<u64>,
    /// Delete an object only this long (ms) after the commit that retired it.
    pub grace_ms: u64,
    /// Segments kept inline in the head.
    pub inline_segments: usize,
    /// Entries per catalog page.
    pub page_fanout: usize,
    /// First retry delay (ms).
    pub retry_base_ms: u64,
    /// Longest retry delay (ms).
    pub retry_max_ms: u64,
    /// Failed attempts before an [`Event::Error`] is reported (retries go on).
    pub max_attempts: u32,
    /// While idle, re-read the head this often (ms) to notice a newer epoch
    /// and stop, instead of learning it only at the next commit.
    pub head_check_ms: u64,
    /// Timeout the driver applies to GETs (ms).
    pub request_timeout_ms: u64,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            segment_bytes: 8 << 20,
            flush_interval_ms: 250,
            min_commit_interval_ms: 0,
            max_pending_segments: 4,
            snapshot_every: None,
            retain_lsns: None,
            grace_ms: 60_000,
            inline_segments: 64,
            page_fanout: 32,
            retry_base_ms: 100,
            retry_max_ms: 10_000,
            max_attempts: 5,
            head_check_ms: 2_000,
            request_timeout_ms: 30_000,
        }
    }
}

/// The precondition of a PUT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutCondition {
    /// Create only: fail if the object exists (`If-None-Match: *`).
    CreateOnly,
    /// Replace only the version with this ETag (`If-Match`).
    IfMatch(String),
}

/// What the object is, so drivers can set cache headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// The mutable head.
    Head,
    /// An immutable segment.
    Segment,
    /// An immutable catalog page.
    Page,
    /// An immutable snapshot.
    Snapshot,
}

/// A conditional PUT for the driver to perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutRequest {
    /// Pass back with the response.
    pub id: RequestId,
    /// Object key relative to the dataset prefix.
    pub key: String,
    /// The object's bytes.
    pub body: Vec<u8>,
    /// Precondition.
    pub condition: PutCondition,
    /// What kind of object it is.
    pub kind: ObjectKind,
}

/// What a PUT produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutResponse {
    /// Written; the new ETag when the store gives one.
    Ok {
        /// The object's new ETag.
        etag: Option<String>,
    },
    /// Create-only PUT found the object already there.
    AlreadyExists,
    /// `If-Match` did not match.
    PreconditionFailed,
    /// Failed, or the answer was lost: the write may or may not have happened.
    Failed {
        /// What went wrong.
        message: String,
    },
}

/// A DELETE for the driver to perform (a missing object counts as deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteRequest {
    /// Pass back with the response.
    pub id: RequestId,
    /// Object key relative to the dataset prefix.
    pub key: String,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The dataset is ours at `epoch`; publishing resumes after `committed_lsn`.
    Claimed {
        /// Our epoch.
        epoch: u64,
        /// The dataset.
        dataset_id: DatasetId,
        /// The head's committed LSN at the claim.
        committed_lsn: u64,
    },
    /// A head naming everything up to `lsn` was committed.
    Committed {
        /// New committed LSN.
        lsn: u64,
        /// The head's generation.
        generation: u64,
        /// Size of the head in bytes.
        head_bytes: u64,
    },
    /// An object was deleted after its grace period.
    Deleted {
        /// Its key.
        key: String,
    },
    /// Another publisher owns the dataset: stop for good.
    Fenced(Error),
    /// A failure that persisted through retries; the machine keeps retrying.
    Error(Error),
}

/// What the driver should do next.
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Perform this GET, then call [`Publisher::handle_get`].
    Get(GetRequest),
    /// Perform this PUT, then call [`Publisher::handle_put`].
    Put(PutRequest),
    /// Perform this DELETE, then call [`Publisher::handle_delete`].
    Delete(DeleteRequest),
    /// Report or act on an event, then poll again.
    Event(Event),
    /// Nothing to do until `until` (ms), a response, or a new record.
    Wait {
        /// Next time to call [`Publisher::poll`].
        until: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Up {
    Waiting(u64),
    InFlight,
    Done,
}

#[derive(Debug)]
struct Sealed {
    entry: SegmentEntry,
    bytes: Vec<u8>,
    up: Up,
}

#[derive(Debug)]
struct PendingSnapshot {
    entry: SnapshotEntry,
    bytes: Vec<u8>,
    up: Up,
}

#[derive(Debug)]
enum Stage {
    /// Reading pages whose contents must be retired.
    Reading(HashSet<String>),
    /// Uploading new pages.
    Paging(HashMap<String, (Vec<u8>, Up)>),
    /// The head PUT is in flight.
    Cas,
    /// Re-reading the head after a failed or unanswered CAS.
    Verifying,
}

#[derive(Debug)]
struct Commit {
    proposed: Head,
    stage: Stage,
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
    Cas,
    Verify,
    Check,
    Delete(String),
}

/// The commit machine.
#[derive(Debug)]
pub struct Publisher {
    cfg: PublisherConfig,
    rng: u64,
    next_id: u64,
    role: Role,
    claim: Option<Head>,
    claim_attempts: u32,
    head: Option<Head>,
    etag: Option<String>,
    epoch: u64,
    writer: String,

    next_push: u64,
    open: Option<SegmentBuilder>,
    open_since: u64,
    last_seal_at: Option<u64>,
    sealed: VecDeque<Sealed>,

    state: Option<KvState>,
    snapshot: Option<PendingSnapshot>,

    commit: Option<Commit>,
    commit_retry_at: Option<u64>,
    page_cache: HashMap<String, Page>,

    deleting: HashSet<String>,
    deleted: HashSet<String>,
    delete_retry_at: u64,

    pending: HashMap<RequestId, Req>,
    attempts: HashMap<String, u32>,
    retry_at: u64,
    events: VecDeque<Event>,
    queued: VecDeque<Action>,
    page_reads: VecDeque<PageRef>,
    verify_at: Option<u64>,
    next_check: u64,
    check_inflight: bool,
}

impl Publisher {
    /// A publisher that will claim the dataset. `seed` drives the dataset id
    /// of a new dataset and retry jitter.
    pub fn new(cfg: PublisherConfig, seed: u64) -> Self {
        let state = cfg.snapshot_every.map(|_| KvState::new());
        let mut s = seed ^ 0x5752_4954_4552;
        let writer = format!("{:016x}", splitmix64(&mut s));
        Publisher {
            cfg,
            rng: seed,
            next_id: 0,
            role: Role::Start,
            claim: None,
            claim_attempts: 0,
            head: None,
            etag: None,
            epoch: 0,
            writer,
            next_push: 0,
            open: None,
            open_since: 0,
            last_seal_at: None,
            sealed: VecDeque::new(),
            state,
            snapshot: None,
            commit: None,
            commit_retry_at: None,
            page_cache: HashMap::new(),
            deleting: HashSet::new(),
            deleted: HashSet::new(),
            delete_retry_at: 0,
            pending: HashMap::new(),
            attempts: HashMap::new(),
            retry_at: 0,
            events: VecDeque::new(),
            queued: VecDeque::new(),
            page_reads: VecDeque::new(),
            verify_at: None,
            next_check: 0,
            check_inflight: false,
        }
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
            && self
                .open
                .as_ref()
                .is_none_or(|o| o.len() < self.cfg.segment_bytes)
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
        if let Some(state) = &mut self.state {
            let ops = batch::decode(payload).map_err(|e| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!("record is not a KV batch ({e}); snapshots need KV payloads"),
                )
                .with_lsn(lsn)
            })?;
            state.apply(&ops);
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

    fn maybe_snapshot(&mut self, lsn: u64) {
        let (Some(every), Some(state), Some(head)) =
            (self.cfg.snapshot_every, &self.state, &self.head)
        else {
            return;
        };
        let last = head.snapshot.as_ref().map_or(0, |s| s.lsn);
        if self.snapshot.is_some() || lsn < last + every {
            return;
        }
        let bytes = crate::snapshot::encode(state, lsn, self.epoch, head.dataset_id);
        let entry = SnapshotEntry {
            key: catalog::snapshot_key(lsn, self.epoch),
            lsn,
            epoch: self.epoch,
            size: bytes.len() as u64,
            crc32: crc32fast::hash(&bytes),
            entries: state.len(),
        };
        self.snapshot = Some(PendingSnapshot {
            entry,
            bytes,
            up: Up::Waiting(0),
        });
    }

    fn id(&mut self, req: Req) -> RequestId {
        self.next_id += 1;
        let id = RequestId(self.next_id);
        self.pending.insert(id, req);
        id
    }

    fn get(&mut self, req: Req, key: String) -> Action {
        let id = self.id(req);
        let max_bytes = if key == HEAD_KEY {
            crate::catalog::MAX_HEAD_BYTES as u64
        } else {
            crate::catalog::MAX_PAGE_BYTES as u64
        };
        Action::Get(GetRequest {
            id,
            key,
            range: None,
            if_none_match: None,
            timeout_ms: self.cfg.request_timeout_ms,
            max_bytes,
        })
    }

    fn put(
        &mut self,
        req: Req,
        key: String,
        body: Vec<u8>,
        condition: PutCondition,
        kind: ObjectKind,
    ) -> Action {
        let id = self.id(req);
        Action::Put(PutRequest {
            id,
            key,
            body,
            condition,
            kind,
        })
    }

    fn backoff(&mut self, key: &str, err: Error) -> u64 {
        let n = self.attempts.entry(key.to_string()).or_insert(0);
        *n += 1;
        let n = *n;
        if n == self.cfg.max_attempts {
            self.events.push_back(Event::Error(err));
        }
        let exp = self
            .cfg
            .retry_base_ms
            .saturating_mul(1 << n.min(16))
            .min(self.cfg.retry_max_ms);
        exp / 2 + splitmix64(&mut self.rng) % (exp / 2 + 1)
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
                    .map_or(0, |t| t + self.cfg.min_commit_interval_ms);
                let full = open.len() >= self.cfg.segment_bytes;
                if full || (spaced <= now && (!uploading || due <= now)) {
                    self.last_seal_at = Some(now);
                    let open = self.open.take().expect("checked");
                    if let Some((bytes, summary)) = open.finish() {
                        self.sealed.push_back(Sealed {
                            entry: SegmentEntry::from_summary(&summary),
                            bytes,
                            up: Up::Waiting(0),
                        });
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
        if let Some(a) = self.drive_commit(now) {
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

    fn drive_commit(&mut self, now: u64) -> Option<Action> {
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
            if ready == 0 && !snap_ready {
                return None;
            }
            match self.build_commit(now, ready) {
                Ok((proposed, pages)) => {
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
                Err(reads) => {
                    let keys: HashSet<String> = reads.iter().map(|r| r.key.clone()).collect();
                    self.commit = Some(Commit {
                        proposed: self.head.clone().expect("running"),
                        stage: Stage::Reading(keys),
                    });
                    // Issue the first read now; the rest on later polls.
                    let mut it = reads.into_iter();
                    let first = it.next().expect("non-empty");
                    self.page_reads.extend(it);
                    let key = first.key.clone();
                    return Some(self.get(Req::PageRead(first), key));
                }
            }
        }
        let c = self.commit.as_mut()?;
        match &mut c.stage {
            Stage::Reading(_) => {
                let r = self.page_reads.pop_front()?;
                let key = r.key.clone();
                Some(self.get(Req::PageRead(r), key))
            }
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
        let body = c.proposed.encode();
        let cond = PutCondition::IfMatch(self.etag.clone().unwrap_or_default());
        self.put(Req::Cas, HEAD_KEY.into(), body, cond, ObjectKind::Head)
    }

    /// Builds the next head from the committed one plus the first `ready`
    /// sealed segments. Returns the head and the pages to upload first, or
    /// the pages that must be read before retention can drop them.
    fn build_commit(
        &mut self,
        now: u64,
        ready: usize,
    ) -> Result<(Head, Vec<PageUpload>), Vec<PageRef>> {
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
        if let Some(s) = &self.snapshot {
            if s.up == Up::Done && s.entry.lsn <= h.committed_lsn {
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
        // Retention.
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
        // Paging.
        let mut uploads = Vec::new();
        let fan = self.cfg.page_fanout.max(2);
        while h.segments.len() > self.cfg.inline_segments.max(fan) {
            let moved: Vec<SegmentEntry> = h.segments.drain(..fan).collect();
            let page = Page {
                format: catalog::FORMAT,
                level: 0,
                segments: moved,
                pages: Vec::new(),
            };
            let r = self.page_ref(&page, 0, &mut uploads);
            h.pages.push(r);
        }
        loop {
            // Find a level with more than `fan` references (they are contiguous).
            let mut counts: HashMap<u32, usize> = HashMap::new();
            for p in &h.pages {
                *counts.entry(p.level).or_default() += 1;
            }
            let Some((&level, _)) = counts
                .iter()
                .filter(|(_, c)| **c > fan)
                .min_by_key(|(l, _)| **l)
            else {
                break;
            };
            let start = h
                .pages
                .iter()
                .position(|p| p.level == level)
                .expect("counted");
            let moved: Vec<PageRef> = h.pages.drain(start..start + fan).collect();
            let page = Page {
                format: catalog::FORMAT,
                level: level + 1,
                segments: Vec::new(),
                pages: moved,
            };
            let r = self.page_ref(&page, level + 1, &mut uploads);
            h.pages.insert(start, r);
        }
        Ok((h, uploads))
    }

    fn page_ref(&mut self, page: &Page, level: u32, uploads: &mut Vec<PageUpload>) -> PageRef {
        let (first, last, count) = if level == 0 {
            (
                page.segments[0].first_lsn,
                page.segments[page.segments.len() - 1].last_lsn,
                page.segments.len(),
            )
        } else {
            (
                page.pages[0].first_lsn,
                page.pages[page.pages.len() - 1].last_lsn,
                page.pages.len(),
            )
        };
        let bytes = page.encode();
        let key = catalog::page_key(level, first, last, self.epoch);
        let r = PageRef {
            key: key.clone(),
            level,
            first_lsn: first,
            last_lsn: last,
            count: count as u32,
            crc32: crc32fast::hash(&bytes),
        };
        self.page_cache.insert(key.clone(), page.clone());
        uploads.push((key, bytes));
        r
    }

    fn drive_deletes(&mut self, now: u64, wake: &mut u64) -> Option<Action> {
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

    /// Feeds the outcome of a DELETE: `Ok(())` when gone (or never there).
    pub fn handle_delete(&mut self, id: RequestId, now: u64, result: Result<(), String>) {
        let Some(Req::Delete(key)) = self.pending.remove(&id) else {
            return;
        };
        self.deleting.remove(&key);
        match result {
            Ok(()) => {
                self.deleted.insert(key.clone());
                self.events.push_back(Event::Deleted { key });
            }
            Err(m) => {
                let d = self.backoff(
                    &key,
                    Error::new(ErrorKind::Unavailable, m).with_object(key.clone()),
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
            _ => {}
        }
    }

    fn decode_head(resp: GetResponse) -> Result<Option<(Head, Option<String>)>, Error> {
        match resp {
            GetResponse::Ok { body, etag, .. } => Head::decode(&body)
                .map(|h| Some((h, etag)))
                .map_err(|e| Error::decode(e).with_object(HEAD_KEY)),
            GetResponse::NotFound => Ok(None),
            GetResponse::Failed { status, message } => Err(Error::new(
                ErrorKind::Unavailable,
                format!("reading the head failed: {status:?} {message}"),
            )
            .with_object(HEAD_KEY)),
            other => Err(Error::new(
                ErrorKind::Unavailable,
                format!("unexpected answer {other:?}"),
            )
            .with_object(HEAD_KEY)),
        }
    }

    fn on_claim_read(&mut self, now: u64, resp: GetResponse) {
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
            self.fence(
                Error::new(
                    ErrorKind::Unavailable,
                    "could not claim the dataset after 32 attempts",
                )
                .with_object(HEAD_KEY),
            );
            return;
        }
        let (proposed, cond) = match read {
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
                let mut p = h.clone();
                p.epoch = h.epoch + 1;
                p.generation = h.generation + 1;
                p.committed_at_ms = now;
                p.writer = self.writer.clone();
                (p, PutCondition::IfMatch(etag))
            }
        };
        self.role = Role::Claiming;
        let body = proposed.encode();
        self.claim = Some(proposed);
        let a = self.put(Req::ClaimPut, HEAD_KEY.into(), body, cond, ObjectKind::Head);
        self.queued.push_back(a);
    }

    fn claimed(&mut self, h: Head, etag: Option<String>) {
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
        self.etag = etag;
    }

    fn fence(&mut self, err: Error) {
        self.role = Role::Fenced;
        self.events.push_back(Event::Fenced(err));
    }

    /// Feeds the outcome of a PUT.
    pub fn handle_put(&mut self, id: RequestId, now: u64, resp: PutResponse) {
        let Some(req) = self.pending.remove(&id) else {
            return;
        };
        match req {
            Req::ClaimPut => match resp {
                PutResponse::Ok { etag } if etag.is_some() => {
                    let h = self.claim.take().expect("claim in flight");
                    self.claimed(h, etag);
                }
                _ => {
                    // Lost, failed or raced: read the head and decide.
                    self.role = Role::Start;
                    self.retry_at = now;
                }
            },
            Req::Segment(key) => {
                let Some(i) = self.sealed.iter().position(|s| s.entry.key == key) else {
                    return;
                };
                match resp {
                    // Same epoch, same LSN range: the bytes are ours.
                    PutResponse::Ok { .. }
                    | PutResponse::AlreadyExists
                    | PutResponse::PreconditionFailed => {
                        self.attempts.remove(&key);
                        self.sealed[i].up = Up::Done;
                    }
                    PutResponse::Failed { message } => {
                        let d = self.backoff(
                            &key,
                            Error::new(ErrorKind::Unavailable, message).with_object(key.clone()),
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
                            Error::new(ErrorKind::Unavailable, message).with_object(key.clone()),
                        );
                        if let Some(s) = self.snapshot.as_mut() {
                            s.up = Up::Waiting(now + d);
                        }
                    }
                    _ => {
                        s.up = Up::Done;
                        s.bytes = Vec::new();
                    }
                }
            }
            Req::Page(key) => {
                let failed = matches!(resp, PutResponse::Failed { .. });
                let d = if let PutResponse::Failed { message } = resp {
                    self.backoff(
                        &key,
                        Error::new(ErrorKind::Unavailable, message).with_object(key.clone()),
                    )
                } else {
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
                _ => {
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

    fn committed(&mut self, etag: Option<String>) {
        let Some(c) = self.commit.take() else {
            return;
        };
        self.adopt(c.proposed, etag);
    }

    /// Makes `h`, a head this publisher wrote and saw land, the base of the
    /// next commit.
    fn adopt(&mut self, h: Head, etag: Option<String>) {
        self.commit = None;
        self.attempts.remove(HEAD_KEY);
        while self
            .sealed
            .front()
            .is_some_and(|s| s.entry.last_lsn <= h.committed_lsn)
        {
            self.sealed.pop_front();
        }
        if self.snapshot.as_ref().is_some_and(|s| {
            h.snapshot.as_ref().is_some_and(|x| x.key == s.entry.key)
                || s.entry.lsn <= h.snapshot.as_ref().map_or(0, |x| x.lsn)
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
        self.head = Some(h);
        self.etag = etag;
    }

    fn on_verify(&mut self, now: u64, resp: GetResponse) {
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
                    // build on what is really there.
                    self.adopt(h, etag);
                } else if self.head.as_ref() == Some(&h) {
                    // Our write did not land; the head is still ours. Retry.
                    self.etag = etag;
                    self.commit = None;
                    let d = self.backoff(
                        HEAD_KEY,
                        Error::new(ErrorKind::Unavailable, "head write failed")
                            .with_object(HEAD_KEY),
                    );
                    self.commit_retry_at = Some(now + d);
                } else {
                    // A stale read: look again.
                    let d = self.backoff(
                        HEAD_KEY,
                        Error::new(ErrorKind::Unavailable, "stale head read").with_object(HEAD_KEY),
                    );
                    self.reverify_at(now + d);
                }
            }
            Ok(None) => {
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

    /// Whether `h` shows the dataset owned by another publisher: a newer
    /// epoch, our epoch claimed by another writer, or another dataset.
    fn taken_by_another(&self, h: &Head, ours: DatasetId) -> bool {
        h.epoch > self.epoch
            || h.dataset_id != ours
            || (h.epoch == self.epoch && h.writer != self.writer)
    }

    /// Stops for good: `h` belongs to another publisher.
    fn lost_to(&mut self, h: &Head) {
        self.commit = None;
        self.fence(
            Error::new(
                ErrorKind::Fenced,
                format!(
                    "epoch {} now owns the dataset (ours is {})",
                    h.epoch, self.epoch
                ),
            )
            .with_object(HEAD_KEY),
        );
    }

    fn on_check(&mut self, now: u64, resp: GetResponse) {
        self.check_inflight = false;
        self.next_check = now + self.cfg.head_check_ms;
        if self.role != Role::Running {
            return;
        }
        if let Ok(Some((h, _))) = Self::decode_head(resp) {
            if let Some(ours) = self.head.as_ref().map(|o| o.dataset_id) {
                if self.taken_by_another(&h, ours) {
                    self.lost_to(&h);
                }
            }
        }
    }

    fn reverify_at(&mut self, t: u64) {
        self.verify_at = Some(t);
    }

    fn on_page_read(&mut self, now: u64, r: PageRef, resp: GetResponse) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Segments sealed while one record arrives every millisecond for a
    /// second and every PUT succeeds at once.
    fn segments_for_steady_writes(min_commit_interval_ms: u64) -> (usize, u64) {
        let cfg = PublisherConfig {
            min_commit_interval_ms,
            head_check_ms: 0,
            ..PublisherConfig::default()
        };
        let mut p = Publisher::new(cfg, 1);
        let Action::Get(g) = p.poll(0) else {
            panic!("reads the head first")
        };
        p.handle_get(g.id, 0, GetResponse::NotFound);
        let payload = batch::encode(&[batch::Op::put(b"k".to_vec(), vec![0; 100])]).unwrap();
        let (mut segments, mut etag) = (0, 0u64);
        // Answers everything at once until the machine waits.
        let mut drive = |p: &mut Publisher, now: u64| loop {
            match p.poll(now) {
                Action::Put(req) => {
                    segments += usize::from(req.key.starts_with("segments/"));
                    etag += 1;
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
        };
        for now in 0..=1_000u64 {
            if now > 0 {
                p.push(now, &payload, now).unwrap();
            }
            drive(&mut p, now);
        }
        // Let the last spaced seal happen.
        for now in 1_001..1_200u64 {
            drive(&mut p, now);
        }
        (segments, p.committed_lsn())
    }

    #[test]
    fn min_commit_interval_spaces_seals() {
        let (eager, lsn) = segments_for_steady_writes(0);
        assert_eq!(lsn, 1_000);
        assert!(eager >= 900, "eager publisher sealed only {eager} segments");
        let (spaced, lsn) = segments_for_steady_writes(100);
        assert_eq!(lsn, 1_000, "every record is still committed");
        assert!(
            (9..=12).contains(&spaced),
            "a 100 ms floor over one second sealed {spaced} segments"
        );
    }

    #[test]
    fn memory_is_bounded_when_uploads_stall() {
        let cfg = PublisherConfig {
            segment_bytes: 10_000,
            max_pending_segments: 2,
            ..PublisherConfig::default()
        };
        let mut p = Publisher::new(cfg, 1);
        let Action::Get(g) = p.poll(0) else {
            panic!("reads the head first")
        };
        p.handle_get(g.id, 0, GetResponse::NotFound);
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
