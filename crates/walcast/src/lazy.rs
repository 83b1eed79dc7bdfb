//! Lazy reads of a remote dataset: `walcast get --from URL KEY` and
//! `walcast scan --from URL`, answered without a local replica by fetching
//! only what the read needs, through any [`Fetch`] seam
//! ([`crate::replica::AnyFetch`] for everything `walcast replicate` accepts).
//!
//! A read answers from the origin's state at the head's committed LSN, and
//! from that state only:
//!
//! 1. GET the head and decode it.
//! 2. Together, in waves: the snapshot's bytes the read needs (its header and
//!    footer, then at most an index block and a data block per key, through
//!    [`LazySnapshot`]), and the tail after the snapshot (`snapshot.lsn + 1
//!    ..= committed_lsn`, or `1..=` without a snapshot): the segments named
//!    inline in the head or in the catalog pages covering the tail (only
//!    those pages are read). Every object is verified before use: pages
//!    against their reference, segments against their catalog checksum and
//!    LSNs, snapshot blocks against the handles naming them, and the
//!    snapshot's header against the head (LSN, dataset, entries).
//! 3. The tail's KV batches, in LSN order, make an overlay (key to value or
//!    deletion, last write wins) that wins over the snapshot.
//!
//! Every GET of a wave is in flight at once; a wave is one round trip.
//! A version 1 snapshot (no block index; the head names no version, and its
//! header says 1) is read whole, with a warning.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;

use anyhow::Result;
use futures::future::join_all;
use walcast_client::Fetch;
use walcast_core::batch::{self, OpRef};
use walcast_core::catalog::{
    DatasetId, Head, Page, PageRef, SegmentEntry, SnapshotEntry, HEAD_KEY, MAX_HEAD_BYTES,
    MAX_PAGE_BYTES,
};
use walcast_core::io::{ByteRange, GetRequest, GetResponse, RequestId};
use walcast_core::segment;
use walcast_core::snapshot::indexed::{self, LazySnapshot, Lookup, Need, ScanCursor};
use walcast_core::snapshot::{self, HEADER_LEN};
use walcast_core::state::KvState;
use walcast_core::{DecodeError, Error, ErrorKind};

/// Default timeout of one GET (ms).
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// Default bytes of snapshot data blocks cached during one read.
pub const DEFAULT_CACHE_BYTES: u64 = 8 << 20;
/// Default most segment GETs in one wave.
pub const DEFAULT_WAVE_SEGMENTS: usize = 32;
/// Default most segment bytes in one wave (a larger segment goes alone).
pub const DEFAULT_WAVE_SEGMENT_BYTES: u64 = 64 << 20;
/// Reads of one query: a segment, page or snapshot the head named but the
/// store no longer holds (retention removed it) makes the read start over
/// from a fresh head, this many times in all.
const ATTEMPTS: u32 = 3;
/// Blocks a scan step may feed from the suffix it holds, at most (more than
/// a 64 KiB suffix can frame).
const MAX_HELD_FEEDS: usize = 1 << 14;

/// What a lazy read cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LazyStats {
    /// GETs issued.
    pub gets: u64,
    /// Body bytes received.
    pub bytes: u64,
    /// Waves of GETs, each waiting for the one before: round trips.
    pub round_trips: u64,
}

impl LazyStats {
    /// One JSON line: `{"gets":N,"bytes":B,"round_trips":R}`.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"gets\":{},\"bytes\":{},\"round_trips\":{}}}",
            self.gets, self.bytes, self.round_trips
        )
    }
}

/// Tuning of a [`LazyReader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyOptions {
    /// Timeout of one GET (ms).
    pub timeout_ms: u64,
    /// Bytes of snapshot data blocks kept during one read.
    pub cache_bytes: u64,
    /// Most segment GETs in one wave.
    pub wave_segments: usize,
    /// Most segment bytes in one wave (a larger segment goes alone).
    pub wave_segment_bytes: u64,
}

impl Default for LazyOptions {
    fn default() -> Self {
        LazyOptions {
            timeout_ms: DEFAULT_TIMEOUT_MS,
            cache_bytes: DEFAULT_CACHE_BYTES,
            wave_segments: DEFAULT_WAVE_SEGMENTS,
            wave_segment_bytes: DEFAULT_WAVE_SEGMENT_BYTES,
        }
    }
}

/// The smallest key above every key that starts with `prefix`; `None` when
/// there is none (an empty prefix, or one of only `0xff` bytes).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Reads a remote dataset lazily: each [`get`](Self::get) or
/// [`scan`](Self::scan) reads the head afresh and fetches what it needs.
#[derive(Debug)]
pub struct LazyReader<F> {
    fetch: F,
    opts: LazyOptions,
    stats: LazyStats,
    next_id: u64,
}

/// What one read asks.
#[derive(Debug, Clone)]
enum Query {
    Get(Vec<u8>),
    Scan {
        start: Vec<u8>,
        end: Option<Vec<u8>>,
        limit: usize,
    },
}

/// What one read answers.
enum Answer {
    Value(Option<Vec<u8>>),
    Entries(Vec<(Vec<u8>, Vec<u8>)>),
}

impl<F: Fetch> LazyReader<F> {
    /// A reader through `fetch` with the default options.
    pub fn new(fetch: F) -> Self {
        LazyReader::with_options(fetch, LazyOptions::default())
    }

    /// A reader through `fetch`.
    pub fn with_options(fetch: F, opts: LazyOptions) -> Self {
        LazyReader {
            fetch,
            opts,
            stats: LazyStats::default(),
            next_id: 0,
        }
    }

    /// What the reads so far cost.
    pub fn stats(&self) -> LazyStats {
        self.stats
    }

    /// The value of `key` at the head's committed LSN (`None`: absent).
    /// A verification failure is a [`walcast_core::Error`] naming the object
    /// (and LSN).
    pub async fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.read(Query::Get(key.to_vec())).await? {
            Answer::Value(v) => Ok(v),
            Answer::Entries(_) => unreachable!("a point read answers a value"),
        }
    }

    /// The entries with keys in `start..end` (`end: None`: to the last key),
    /// in key order, at most `limit`, at the head's committed LSN.
    pub async fn scan(
        &mut self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: Option<usize>,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let q = Query::Scan {
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec),
            limit: limit.unwrap_or(usize::MAX),
        };
        match self.read(q).await? {
            Answer::Entries(e) => Ok(e),
            Answer::Value(_) => unreachable!("a scan answers entries"),
        }
    }

    /// The entries whose keys start with `prefix`, as [`scan`](Self::scan).
    pub async fn scan_prefix(
        &mut self,
        prefix: &[u8],
        limit: Option<usize>,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let end = prefix_end(prefix);
        self.scan(prefix, end.as_deref(), limit).await
    }

    async fn read(&mut self, q: Query) -> Result<Answer> {
        let mut attempt = 1;
        loop {
            match self.read_once(&q).await {
                Err(e)
                    if e.kind() == ErrorKind::NotFound
                        && e.object() != Some(HEAD_KEY)
                        && attempt < ATTEMPTS =>
                {
                    tracing::warn!("{e}: reading the head again");
                    attempt += 1;
                }
                r => return r.map_err(anyhow::Error::new),
            }
        }
    }

    /// One GET per job, all in flight together: one round trip.
    async fn wave(
        &mut self,
        snap: Option<&SnapshotEntry>,
        jobs: Vec<Job>,
    ) -> Vec<(Job, GetResponse)> {
        let reqs: Vec<GetRequest> = jobs
            .iter()
            .map(|j| {
                self.next_id += 1;
                j.request(RequestId(self.next_id), snap, self.opts.timeout_ms)
            })
            .collect();
        let fetch = &self.fetch;
        let resps = join_all(reqs.into_iter().map(|r| fetch.get(r))).await;
        self.stats.round_trips += 1;
        self.stats.gets += resps.len() as u64;
        for r in &resps {
            if let GetResponse::Ok { body, .. } = r {
                self.stats.bytes += body.len() as u64;
            }
        }
        let mut out: Vec<(Job, GetResponse)> = jobs.into_iter().zip(resps).collect();
        // The snapshot's header says how to read the rest of it.
        out.sort_by_key(|(j, _)| !matches!(j, Job::SnapHeader));
        out
    }

    async fn read_head(&mut self) -> Result<Head, Error> {
        let (_, resp) = self
            .wave(None, vec![Job::Head])
            .await
            .pop()
            .ok_or_else(|| Error::new(ErrorKind::Unavailable, "no answer for the head"))?;
        let body = match resp {
            GetResponse::NotFound => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    "no dataset here: the catalog head is missing",
                )
                .with_object(HEAD_KEY))
            }
            other => whole_body(HEAD_KEY, other, None)?,
        };
        Head::decode(&body).map_err(|e| Error::decode(e).with_object(HEAD_KEY))
    }

    async fn read_once(&mut self, q: &Query) -> Result<Answer, Error> {
        let head = self.read_head().await?;
        let to = head.committed_lsn;
        let from = match &head.snapshot {
            Some(s) if s.lsn > to => {
                return Err(Error::new(
                    ErrorKind::Data,
                    format!(
                        "the snapshot is at LSN {} above the committed LSN {to}",
                        s.lsn
                    ),
                )
                .with_object(HEAD_KEY))
            }
            Some(s) => s.lsn + 1,
            None => 1,
        };
        let filter = match q {
            Query::Get(k) => Filter::Key(k.clone()),
            Query::Scan { start, end, .. } => Filter::Range(start.clone(), end.clone()),
        };
        if matches!(q, Query::Scan { limit: 0, .. }) {
            return Ok(Answer::Entries(Vec::new()));
        }
        let mut tail = Tail::new(&head, from, to, filter);
        let mut snap = head
            .snapshot
            .clone()
            .map(|e| Snap::new(e, head.dataset_id, self.opts.cache_bytes));
        let entry = head.snapshot.clone();
        match q {
            Query::Get(key) => {
                let mut value: Option<Option<Vec<u8>>> = None;
                loop {
                    let mut jobs = Vec::new();
                    let settled = tail.is_done() && tail.overlay.contains_key(key);
                    if let (Some(s), None, false) = (snap.as_mut(), &value, settled) {
                        match s.get_step(key)? {
                            Step::Done(v) => value = Some(v),
                            Step::Need(js) => jobs.extend(js),
                        }
                    }
                    tail.jobs(&mut jobs, &self.opts);
                    if jobs.is_empty() {
                        break;
                    }
                    for (job, resp) in self.wave(entry.as_ref(), jobs).await {
                        match snap.as_mut() {
                            Some(s) if job.is_snapshot() => s.on_response(job, resp, key)?,
                            _ => tail.on_response(job, resp)?,
                        }
                    }
                }
                tail.check_coverage()?;
                Ok(Answer::Value(match tail.overlay.remove(key) {
                    Some((_, v)) => v,
                    None => value.flatten(),
                }))
            }
            Query::Scan { start, end, limit } => {
                let limit = *limit;
                let mut scan = SnapScan::new(start, end.as_deref(), limit);
                let mut got: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
                let mut widened = false;
                loop {
                    let mut jobs = Vec::new();
                    if !widened && tail.is_done() {
                        // The snapshot must give `limit` entries more than
                        // the overlay deletes.
                        widened = true;
                        let deleted = tail.overlay.values().filter(|(_, v)| v.is_none()).count();
                        if deleted > 0 && !scan.is_done() {
                            scan.cursor.remaining = scan.cursor.remaining.saturating_add(deleted);
                        } else if deleted > 0 && scan.cursor.remaining == 0 {
                            // It stopped at the limit: go on after the last entry.
                            let next = got
                                .last()
                                .map(|(k, _)| successor(k))
                                .unwrap_or_else(|| start.clone());
                            scan = SnapScan::new(&next, end.as_deref(), deleted);
                        }
                    }
                    if let Some(s) = snap.as_mut() {
                        if !scan.is_done() {
                            if let Some(js) = s.scan_step(&mut scan, &mut got)? {
                                jobs.extend(js);
                            }
                        }
                    }
                    tail.jobs(&mut jobs, &self.opts);
                    if jobs.is_empty() {
                        break;
                    }
                    for (job, resp) in self.wave(entry.as_ref(), jobs).await {
                        match snap.as_mut() {
                            Some(s) if job.is_snapshot() => {
                                let next = scan.cursor.next.clone();
                                s.on_response(job, resp, &next)?
                            }
                            _ => tail.on_response(job, resp)?,
                        }
                    }
                }
                tail.check_coverage()?;
                Ok(Answer::Entries(merge(got, tail.overlay, limit)))
            }
        }
    }
}

/// The key right after `k`.
fn successor(k: &[u8]) -> Vec<u8> {
    let mut s = k.to_vec();
    s.push(0);
    s
}

/// The snapshot's entries (ascending) under the overlay: the overlay wins,
/// deletions drop keys, at most `limit` entries.
fn merge(
    snap: Vec<(Vec<u8>, Vec<u8>)>,
    overlay: BTreeMap<Vec<u8>, (u64, Option<Vec<u8>>)>,
    limit: usize,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut a = snap.into_iter().peekable();
    let mut b = overlay.into_iter().peekable();
    while out.len() < limit {
        let ord = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
        };
        if ord == std::cmp::Ordering::Equal {
            // The overlay's write replaces the snapshot's entry.
            a.next();
        }
        if ord == std::cmp::Ordering::Less {
            if let Some(e) = a.next() {
                out.push(e);
            }
        } else if let Some((k, (_, Some(v)))) = b.next() {
            out.push((k, v));
        }
    }
    out
}

/// One GET of a read.
#[derive(Debug, Clone)]
enum Job {
    Head,
    /// The snapshot's first 56 bytes.
    SnapHeader,
    /// The snapshot's last `n` bytes.
    SnapSuffix(u64),
    /// A block of the snapshot.
    SnapBlock {
        start: u64,
        end: u64,
    },
    /// The whole snapshot (version 1).
    SnapWhole,
    Page(PageRef),
    Segment(SegmentEntry),
}

impl Job {
    fn is_snapshot(&self) -> bool {
        matches!(
            self,
            Job::SnapHeader | Job::SnapSuffix(_) | Job::SnapBlock { .. } | Job::SnapWhole
        )
    }

    /// The GET, bounded by the most bytes the job can use.
    fn request(&self, id: RequestId, snap: Option<&SnapshotEntry>, timeout_ms: u64) -> GetRequest {
        let (snap_key, size) = snap.map_or((String::new(), 0), |s| (s.key.clone(), s.size));
        let (key, range, max_bytes) = match self {
            Job::Head => (HEAD_KEY.to_string(), None, MAX_HEAD_BYTES as u64),
            Job::SnapHeader => (
                snap_key,
                Some(ByteRange::Bounded {
                    start: 0,
                    end: HEADER_LEN,
                }),
                HEADER_LEN,
            ),
            Job::SnapSuffix(n) => (snap_key, Some(ByteRange::Suffix(*n)), *n),
            Job::SnapBlock { start, end } => (
                snap_key,
                Some(ByteRange::Bounded {
                    start: *start,
                    end: *end,
                }),
                end - start,
            ),
            Job::SnapWhole => (snap_key, None, size),
            Job::Page(r) => (r.key.clone(), None, MAX_PAGE_BYTES as u64),
            Job::Segment(e) => (e.key.clone(), None, e.size),
        };
        GetRequest {
            id,
            key,
            range,
            if_none_match: None,
            wait_ms: None,
            timeout_ms,
            max_bytes,
        }
    }
}

/// The error an answer that carries no usable body stands for.
fn unusable(key: &str, resp: GetResponse) -> Error {
    let e = match resp {
        GetResponse::NotFound => Error::new(
            ErrorKind::NotFound,
            "the head names this object but the store does not hold it",
        ),
        GetResponse::RangeNotSatisfiable => Error::new(
            ErrorKind::Data,
            "416 for a range inside the size the catalog states",
        ),
        GetResponse::NotModified => Error::new(ErrorKind::Unavailable, "304 to a plain GET"),
        GetResponse::Failed { status, message } => Error::new(
            ErrorKind::Unavailable,
            match status {
                Some(s) => format!("HTTP {s}: {message}"),
                None => message,
            },
        ),
        GetResponse::Ok { .. } => Error::new(ErrorKind::Unavailable, "unexpected answer"),
    };
    e.with_object(key)
}

/// The body of a whole-object GET; `size`, when known, is what the catalog
/// states.
fn whole_body(key: &str, resp: GetResponse, size: Option<u64>) -> Result<Vec<u8>, Error> {
    let GetResponse::Ok { body, range, .. } = resp else {
        return Err(unusable(key, resp));
    };
    let len = body.len() as u64;
    if range.is_some_and(|cr| cr.start != 0 || cr.end != len) {
        return Err(
            Error::new(ErrorKind::Data, "a part of the object for a whole GET").with_object(key),
        );
    }
    if size.is_some_and(|s| s != len) {
        return Err(Error::new(
            ErrorKind::Data,
            format!(
                "the body is {len} bytes, the catalog says {}",
                size.unwrap_or_default()
            ),
        )
        .with_object(key));
    }
    Ok(body)
}

/// The body of a range GET for bytes `start..end` of an object of `size`
/// bytes, checked against the request.
fn range_body(
    key: &str,
    resp: GetResponse,
    start: u64,
    end: u64,
    size: u64,
) -> Result<Vec<u8>, Error> {
    let GetResponse::Ok { body, range, .. } = resp else {
        return Err(unusable(key, resp));
    };
    let len = body.len() as u64;
    let ok = match range {
        Some(cr) => {
            cr.start == start
                && cr.end == end
                && len == end - start
                && cr.total.is_none_or(|t| t == size)
        }
        // A whole object is fine when that is what was asked for.
        None => start == 0 && end == size && len == size,
    };
    if !ok {
        let got = match range {
            Some(cr) => format!("{}..{} ({len} bytes)", cr.start, cr.end),
            None => format!("a whole object ({len} bytes)"),
        };
        return Err(Error::new(
            ErrorKind::Data,
            format!("answer {got} does not match the request for bytes {start}..{end} of {size}"),
        )
        .with_object(key));
    }
    Ok(body)
}

/// Which keys of the tail the read needs.
#[derive(Debug, Clone)]
enum Filter {
    Key(Vec<u8>),
    Range(Vec<u8>, Option<Vec<u8>>),
}

impl Filter {
    fn matches(&self, k: &[u8]) -> bool {
        match self {
            Filter::Key(key) => k == key.as_slice(),
            Filter::Range(start, end) => {
                k >= start.as_slice() && end.as_ref().is_none_or(|e| k < e.as_slice())
            }
        }
    }
}

/// The tail after the snapshot: the catalog walk and the overlay.
struct Tail {
    from: u64,
    to: u64,
    filter: Filter,
    pages: Vec<PageRef>,
    segments: Vec<SegmentEntry>,
    queued: HashSet<String>,
    inflight: usize,
    /// LSNs applied, by segment (clipped to the tail).
    covered: Vec<(u64, u64)>,
    /// Key to (LSN of its last write, value or deletion).
    overlay: BTreeMap<Vec<u8>, (u64, Option<Vec<u8>>)>,
}

impl Tail {
    fn new(head: &Head, from: u64, to: u64, filter: Filter) -> Tail {
        let mut t = Tail {
            from,
            to,
            filter,
            pages: Vec::new(),
            segments: Vec::new(),
            queued: HashSet::new(),
            inflight: 0,
            covered: Vec::new(),
            overlay: BTreeMap::new(),
        };
        t.add_pages(&head.pages);
        t.add_segments(&head.segments);
        t
    }

    fn wanted(&self, first: u64, last: u64) -> bool {
        self.from <= self.to && first <= self.to && last >= self.from
    }

    fn add_pages(&mut self, refs: &[PageRef]) {
        for r in refs {
            if self.wanted(r.first_lsn, r.last_lsn) && self.queued.insert(r.key.clone()) {
                self.pages.push(r.clone());
            }
        }
    }

    fn add_segments(&mut self, entries: &[SegmentEntry]) {
        for e in entries {
            if self.wanted(e.first_lsn, e.last_lsn) && self.queued.insert(e.key.clone()) {
                self.segments.push(e.clone());
            }
        }
    }

    /// Nothing left to fetch or waiting for an answer.
    fn is_done(&self) -> bool {
        self.pages.is_empty() && self.segments.is_empty() && self.inflight == 0
    }

    /// Every page known, and segments within the wave's bounds.
    fn jobs(&mut self, out: &mut Vec<Job>, opts: &LazyOptions) {
        for r in self.pages.drain(..) {
            out.push(Job::Page(r));
            self.inflight += 1;
        }
        let (mut n, mut bytes) = (0usize, 0u64);
        while let Some(e) = self.segments.last() {
            if n > 0 && (n >= opts.wave_segments || bytes + e.size > opts.wave_segment_bytes) {
                break;
            }
            n += 1;
            bytes += e.size;
            if let Some(e) = self.segments.pop() {
                out.push(Job::Segment(e));
                self.inflight += 1;
            }
        }
    }

    fn on_response(&mut self, job: Job, resp: GetResponse) -> Result<(), Error> {
        self.inflight = self.inflight.saturating_sub(1);
        match job {
            Job::Page(r) => {
                let body = whole_body(&r.key, resp, None)?;
                let page =
                    Page::decode(&body, &r).map_err(|e| Error::decode(e).with_object(&r.key))?;
                if page.level == 0 {
                    self.add_segments(&page.segments);
                } else {
                    self.add_pages(&page.pages);
                }
                Ok(())
            }
            Job::Segment(e) => self.on_segment(&e, resp),
            _ => Err(Error::new(ErrorKind::Data, "an answer for another read")),
        }
    }

    fn on_segment(&mut self, e: &SegmentEntry, resp: GetResponse) -> Result<(), Error> {
        let body = whole_body(&e.key, resp, Some(e.size)).map_err(|x| x.with_lsn(e.first_lsn))?;
        let seg = segment::decode(&body, Some(e.crc32))
            .map_err(|x| Error::decode(x).with_object(&e.key).with_lsn(e.first_lsn))?;
        if seg.header.first_lsn != e.first_lsn || seg.trailer.last_lsn != e.last_lsn {
            return Err(Error::new(
                ErrorKind::Data,
                format!(
                    "the segment holds LSNs {}..={}, the catalog says {}..={}",
                    seg.header.first_lsn, seg.trailer.last_lsn, e.first_lsn, e.last_lsn
                ),
            )
            .with_object(&e.key)
            .with_lsn(e.first_lsn));
        }
        for rec in seg.records() {
            let rec = rec.map_err(|x| Error::decode(x).with_object(&e.key))?;
            if rec.lsn < self.from || rec.lsn > self.to {
                continue;
            }
            let ops = batch::decode(rec.payload)
                .map_err(|x| Error::decode(x).with_object(&e.key).with_lsn(rec.lsn))?;
            for op in ops {
                let (k, v) = match op {
                    OpRef::Put(k, v) => (k, Some(v)),
                    OpRef::Delete(k) => (k, None),
                };
                if !self.filter.matches(k) {
                    continue;
                }
                // Last write wins: a later LSN, or a later op of the same batch.
                match self.overlay.get_mut(k) {
                    Some(slot) if slot.0 > rec.lsn => {}
                    Some(slot) => *slot = (rec.lsn, v.map(<[u8]>::to_vec)),
                    None => {
                        self.overlay
                            .insert(k.to_vec(), (rec.lsn, v.map(<[u8]>::to_vec)));
                    }
                }
            }
        }
        self.covered
            .push((e.first_lsn.max(self.from), e.last_lsn.min(self.to)));
        Ok(())
    }

    /// Every LSN of the tail applied exactly once.
    fn check_coverage(&mut self) -> Result<(), Error> {
        if self.from > self.to {
            return Ok(());
        }
        self.covered.sort_unstable();
        let mut next = self.from;
        for &(a, b) in &self.covered {
            if a != next {
                break;
            }
            next = b + 1;
        }
        if next != self.to + 1 {
            return Err(Error::new(
                ErrorKind::Data,
                format!(
                    "the catalog does not cover LSNs {next}..={} exactly once",
                    self.to
                ),
            )
            .with_object(HEAD_KEY)
            .with_lsn(next));
        }
        Ok(())
    }
}

/// What the snapshot reader says after a step.
enum Step {
    Done(Option<Vec<u8>>),
    Need(Vec<Job>),
}

/// An ordered scan of the snapshot.
struct SnapScan {
    cursor: ScanCursor,
    /// A version 1 snapshot, read whole, is done.
    whole_done: bool,
}

impl SnapScan {
    fn new(start: &[u8], end: Option<&[u8]>, limit: usize) -> SnapScan {
        SnapScan {
            cursor: ScanCursor::new(start, end, limit),
            whole_done: false,
        }
    }

    fn is_done(&self) -> bool {
        self.whole_done || self.cursor.is_done()
    }
}

/// The snapshot the head names, read by blocks (version 2) or whole
/// (version 1).
struct Snap {
    entry: SnapshotEntry,
    dataset: DatasetId,
    lazy: LazySnapshot,
    /// The layout version, once the header was read.
    version: Option<u16>,
    header_asked: bool,
    /// A version 1 snapshot, decoded.
    whole: Option<KvState>,
    /// The suffix read (its first byte's offset, its bytes): blocks inside
    /// it are fed from here, not fetched again.
    held: Option<(u64, Vec<u8>)>,
}

impl Snap {
    fn new(entry: SnapshotEntry, dataset: DatasetId, cache_bytes: u64) -> Snap {
        Snap {
            lazy: LazySnapshot::new(entry.size, cache_bytes),
            entry,
            dataset,
            version: None,
            header_asked: false,
            whole: None,
            held: None,
        }
    }

    fn err(&self, e: DecodeError) -> Error {
        Error::decode(e)
            .with_object(&self.entry.key)
            .with_lsn(self.entry.lsn)
    }

    fn data(&self, msg: String) -> Error {
        Error::new(ErrorKind::Data, msg)
            .with_object(&self.entry.key)
            .with_lsn(self.entry.lsn)
    }

    /// The GETs for what the block reader needs; the header goes along with
    /// the first suffix unless that suffix is the whole file.
    fn jobs_for(&mut self, need: Need) -> Vec<Job> {
        match need {
            Need::Suffix(n) => {
                let mut v = Vec::new();
                if self.version.is_none() && n < self.entry.size && !self.header_asked {
                    self.header_asked = true;
                    v.push(Job::SnapHeader);
                }
                v.push(Job::SnapSuffix(n));
                v
            }
            Need::Range { start, end } => vec![Job::SnapBlock { start, end }],
        }
    }

    /// Bytes `start..end` if the suffix read holds them.
    fn held(&self, start: u64, end: u64) -> Option<&[u8]> {
        let (at, bytes) = self.held.as_ref()?;
        let lo = usize::try_from(start.checked_sub(*at)?).ok()?;
        let hi = usize::try_from(end.checked_sub(*at)?).ok()?;
        bytes.get(lo..hi)
    }

    /// Feeds a block from the suffix read when it holds it; whether it did.
    fn feed_held(&mut self, need: Need, key: &[u8]) -> Result<bool, Error> {
        let Need::Range { start, end } = need else {
            return Ok(false);
        };
        let Some(b) = self.held(start, end) else {
            return Ok(false);
        };
        let b = b.to_vec();
        self.lazy
            .feed_range(start, &b, key)
            .map_err(|e| self.err(e))?;
        Ok(true)
    }

    fn get_step(&mut self, key: &[u8]) -> Result<Step, Error> {
        if self.version == Some(snapshot::VERSION) {
            return Ok(match &self.whole {
                Some(st) => Step::Done(st.get(key).map(<[u8]>::to_vec)),
                None => Step::Need(vec![Job::SnapWhole]),
            });
        }
        // Each block fed moves the read one level down: a few turns.
        for _ in 0..8 {
            match self.lazy.get(key).map_err(|e| self.err(e))? {
                Lookup::Done(v) => return Ok(Step::Done(v)),
                Lookup::Need(n) if self.feed_held(n, key)? => {}
                Lookup::Need(n) => return Ok(Step::Need(self.jobs_for(n))),
            }
        }
        Err(self.data("a point read does not end".into()))
    }

    /// Advances `scan`, appending entries to `out`; the GETs it needs next.
    fn scan_step(
        &mut self,
        scan: &mut SnapScan,
        out: &mut Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Option<Vec<Job>>, Error> {
        if self.version == Some(snapshot::VERSION) {
            let Some(st) = &self.whole else {
                return Ok(Some(vec![Job::SnapWhole]));
            };
            let c = &mut scan.cursor;
            let end = c.end.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            for (k, v) in st.range(Bound::Included(&c.next), end).take(c.remaining) {
                out.push((k.to_vec(), v.to_vec()));
                c.remaining -= 1;
            }
            scan.whole_done = true;
            return Ok(None);
        }
        // Blocks held are fed at once; a block is never needed twice, so
        // this ends within one turn per block of the suffix (bounded anyway).
        for _ in 0..MAX_HELD_FEEDS {
            let need = self
                .lazy
                .scan_step(&mut scan.cursor, out)
                .map_err(|e| self.err(e))?;
            match need {
                None => return Ok(None),
                Some(n) => {
                    let next = scan.cursor.next.clone();
                    if !self.feed_held(n, &next)? {
                        return Ok(Some(self.jobs_for(n)));
                    }
                }
            }
        }
        Err(self.data("a scan of the blocks held does not end".into()))
    }

    /// Checks a version 2 header against the head.
    fn check_indexed_header(&self, bytes: &[u8]) -> Result<(), Error> {
        let h = indexed::decode_indexed_header(bytes).map_err(|e| self.err(e))?;
        let e = &self.entry;
        if h.lsn != e.lsn || h.dataset_id != self.dataset || h.entry_count != e.entries {
            return Err(self.data(format!(
                "the snapshot holds LSN {} of dataset {} with {} entries; the head names LSN {} of dataset {} with {} entries",
                h.lsn, h.dataset_id, h.entry_count, e.lsn, self.dataset, e.entries
            )));
        }
        Ok(())
    }

    /// Decodes a whole version 1 snapshot and checks it against the head.
    fn load_whole(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let (h, st) = snapshot::decode(bytes, Some(self.entry.crc32)).map_err(|e| self.err(e))?;
        let e = &self.entry;
        if h.lsn != e.lsn || h.dataset_id != self.dataset || st.len() != e.entries {
            return Err(self.data(format!(
                "the snapshot holds LSN {} of dataset {} with {} entries; the head names LSN {} of dataset {} with {} entries",
                h.lsn, h.dataset_id, st.len(), e.lsn, self.dataset, e.entries
            )));
        }
        self.version = Some(snapshot::VERSION);
        self.whole = Some(st);
        Ok(())
    }

    fn warn_whole(&self) {
        tracing::warn!(
            "{} is a version 1 snapshot, without a block index: reading all {} bytes of it",
            self.entry.key,
            self.entry.size
        );
    }

    /// Takes the answer to one of its GETs; `key` is the key the read
    /// stands at (for a block).
    fn on_response(&mut self, job: Job, resp: GetResponse, key: &[u8]) -> Result<(), Error> {
        let size = self.entry.size;
        let with_lsn = |e: Error| e.with_lsn(self.entry.lsn);
        match job {
            Job::SnapHeader => {
                let b = range_body(&self.entry.key, resp, 0, HEADER_LEN, size).map_err(with_lsn)?;
                if indexed::is_indexed(&b) {
                    self.check_indexed_header(&b)?;
                    self.version = Some(indexed::VERSION_INDEXED);
                } else if self.entry.version == snapshot::VERSION
                    && b[..4] == snapshot::MAGIC
                    && b[4..6] == snapshot::VERSION.to_le_bytes()
                {
                    self.version = Some(snapshot::VERSION);
                    self.warn_whole();
                } else {
                    // Not a snapshot header this reader knows: say why.
                    self.check_indexed_header(&b)?;
                }
                Ok(())
            }
            Job::SnapSuffix(n) => {
                let start = size.saturating_sub(n);
                let b = range_body(&self.entry.key, resp, start, size, size).map_err(with_lsn)?;
                if n >= size && !indexed::is_indexed(&b) && self.entry.version == snapshot::VERSION
                {
                    // The whole file, and not version 2.
                    self.warn_whole();
                    return self.load_whole(&b);
                }
                if self.version == Some(snapshot::VERSION) {
                    return Ok(());
                }
                if n >= size {
                    let crc = crc32fast::hash(&b);
                    if crc != self.entry.crc32 {
                        return Err(self.err(DecodeError::Checksum {
                            what: "snapshot file (catalog checksum)",
                            at: 0,
                            stored: self.entry.crc32,
                            computed: crc,
                        }));
                    }
                    self.check_indexed_header(&b[..HEADER_LEN as usize])?;
                    self.version = Some(indexed::VERSION_INDEXED);
                }
                self.lazy.feed_suffix(&b).map_err(|e| self.err(e))?;
                self.held = Some((start, b));
                match self.lazy.footer() {
                    Some(f) if f.entry_count != self.entry.entries => Err(self.data(format!(
                        "the snapshot's footer counts {} entries, the head {}",
                        f.entry_count, self.entry.entries
                    ))),
                    _ => Ok(()),
                }
            }
            Job::SnapBlock { start, end } => {
                let b = range_body(&self.entry.key, resp, start, end, size).map_err(with_lsn)?;
                self.lazy
                    .feed_range(start, &b, key)
                    .map_err(|e| self.err(e))
            }
            Job::SnapWhole => {
                let b = whole_body(&self.entry.key, resp, Some(size)).map_err(with_lsn)?;
                self.load_whole(&b)
            }
            _ => Err(self.data("an answer for another read".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::{publish, PublishOptions};
    use crate::replica::StoreFetch;
    use crate::store::Store;
    use crate::wal::Writer;
    use walcast_core::batch::Op;
    use walcast_core::publisher::{PublisherConfig, SnapshotFormat};
    use walcast_core::snapshot::indexed::{IndexedOptions, SUFFIX_GUESS};

    type Model = BTreeMap<Vec<u8>, Vec<u8>>;

    /// A dataset published in two rounds: a snapshot at LSN 240, then a
    /// tail that overwrites and deletes snapshot keys and adds its own.
    struct Fixture {
        tmp: tempfile::TempDir,
        store: Store,
        model: Model,
    }

    fn apply(model: &mut Model, ops: &[Op]) {
        for op in ops {
            match op {
                Op::Put { key, value } => {
                    model.insert(key.clone(), value.clone());
                }
                Op::Delete { key } => {
                    model.remove(key);
                }
            }
        }
    }

    fn k(i: usize) -> Vec<u8> {
        format!("k{i:03}").into_bytes()
    }

    /// `pad` bytes are added to each value of the first round.
    async fn fixture(url: Option<&str>, cfg: PublisherConfig, pad: usize) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let url = match url {
            Some(u) => u.to_string(),
            None => format!("file://{}", tmp.path().join("data").display()),
        };
        let store = Store::open(&url).unwrap();
        let w = Writer::open(&tmp.path().join("wal")).unwrap();
        let mut model = Model::new();
        let mut commit = |ops: Vec<Op>| {
            w.commit(&ops).unwrap();
            apply(&mut model, &ops);
        };
        for i in 0..240 {
            let mut ops = vec![Op::put(k(i), format!("a{i}{}", "x".repeat(pad)))];
            if i % 10 == 9 {
                ops.push(Op::delete(k(i - 5)));
                ops.push(Op::put(format!("m{i:03}"), vec![0xff, i as u8]));
            }
            commit(ops);
        }
        let round = |store: Store| {
            let opts = PublishOptions {
                config: cfg.clone(),
                once: true,
                ..PublishOptions::default()
            };
            publish(
                tmp.path().join("wal"),
                store,
                opts,
                std::future::pending(),
                |_| {},
            )
        };
        round(store.clone()).await.unwrap();
        for i in 0..120 {
            let ops = match i % 3 {
                0 => vec![Op::put(k(i * 2), format!("b{i}"))],
                1 => vec![Op::delete(k(i * 2 + 1))],
                _ => vec![Op::put(format!("n{i:03}"), format!("c{i}"))],
            };
            commit(ops);
            if i % 7 == 0 {
                // Last write wins inside a batch too.
                commit(vec![Op::put(k(i + 100), "gone"), Op::delete(k(i + 100))]);
                commit(vec![Op::delete(k(i + 101)), Op::put(k(i + 101), "back")]);
            }
        }
        round(store.clone()).await.unwrap();
        Fixture { tmp, store, model }
    }

    async fn head(store: &Store) -> Head {
        let req = GetRequest {
            id: RequestId(0),
            key: HEAD_KEY.into(),
            range: None,
            if_none_match: None,
            wait_ms: None,
            timeout_ms: 10_000,
            max_bytes: MAX_HEAD_BYTES as u64,
        };
        match store.get(&req).await {
            GetResponse::Ok { body, .. } => Head::decode(&body).unwrap(),
            other => panic!("head: {other:?}"),
        }
    }

    fn small(format: SnapshotFormat) -> PublisherConfig {
        PublisherConfig {
            segment_bytes: 256,
            snapshot_every: Some(240),
            inline_segments: 4,
            page_fanout: 2,
            snapshot_format: format,
            ..PublisherConfig::default()
        }
    }

    const TINY_BLOCKS: SnapshotFormat = SnapshotFormat::Indexed(IndexedOptions {
        block_bytes: 128,
        index_block_bytes: 96,
    });

    fn want_scan(model: &Model, prefix: &[u8], limit: Option<usize>) -> Vec<(Vec<u8>, Vec<u8>)> {
        model
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .take(limit.unwrap_or(usize::MAX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Every key (present, deleted, never written) and many scans equal the model.
    async fn check_all(f: &Fixture, opts: LazyOptions) {
        let mut r = LazyReader::with_options(StoreFetch::new(f.store.clone()), opts);
        let mut keys: Vec<Vec<u8>> = (0..260).map(k).collect();
        keys.extend(f.model.keys().cloned());
        keys.extend([b"".to_vec(), b"a".to_vec(), b"zzz".to_vec(), vec![0xff; 3]]);
        for key in &keys {
            let got = r.get(key).await.unwrap();
            assert_eq!(
                got.as_ref(),
                f.model.get(key),
                "get {:?}",
                String::from_utf8_lossy(key)
            );
        }
        for prefix in [
            &b""[..],
            b"k",
            b"k0",
            b"k1",
            b"k2",
            b"k10",
            b"m",
            b"n",
            b"zz",
            b"\xff",
        ] {
            for limit in [
                None,
                Some(0),
                Some(1),
                Some(3),
                Some(17),
                Some(60),
                Some(1000),
            ] {
                let got = r.scan_prefix(prefix, limit).await.unwrap();
                assert_eq!(
                    got,
                    want_scan(&f.model, prefix, limit),
                    "scan {:?} limit {limit:?}",
                    String::from_utf8_lossy(prefix)
                );
            }
        }
        let got = r.scan(b"k050", Some(b"k090"), Some(25)).await.unwrap();
        let want: Vec<_> = f
            .model
            .range(b"k050".to_vec()..b"k090".to_vec())
            .take(25)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(got, want, "scan k050..k090");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn indexed_snapshot_two_levels_and_pages() {
        let f = fixture(Some("memory://"), small(TINY_BLOCKS), 400).await;
        let h = head(&f.store).await;
        assert_eq!(h.snapshot.as_ref().map(|s| s.lsn), Some(240));
        let size = h.snapshot.as_ref().map_or(0, |s| s.size);
        assert!(size > SUFFIX_GUESS, "blocks read by range: {size} bytes");
        assert!(h.committed_lsn > 300, "a tail after the snapshot");
        assert!(h.pages.iter().any(|p| p.level > 0), "pages of pages");
        check_all(&f, LazyOptions::default()).await;
        // Tiny caches and waves change the cost, never the answers.
        let tight = LazyOptions {
            cache_bytes: 1,
            wave_segments: 1,
            wave_segment_bytes: 1,
            ..LazyOptions::default()
        };
        check_all(&f, tight).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn version_1_snapshot_is_read_whole() {
        // Smaller than the first suffix read, and larger.
        for pad in [0, 400] {
            let f = fixture(Some("memory://"), small(SnapshotFormat::Chunked), pad).await;
            let size = head(&f.store).await.snapshot.map_or(0, |s| s.size);
            assert_eq!(size > SUFFIX_GUESS, pad > 0, "{size} bytes");
            check_all(&f, LazyOptions::default()).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_snapshot_replays_the_whole_history() {
        let cfg = PublisherConfig {
            snapshot_every: None,
            ..small(TINY_BLOCKS)
        };
        let f = fixture(Some("memory://"), cfg, 0).await;
        assert!(head(&f.store).await.snapshot.is_none());
        check_all(&f, LazyOptions::default()).await;
    }

    /// A small snapshot comes whole with its suffix: the head, then one
    /// wave with the snapshot and the tail's segments together.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshot_and_tail_share_a_round_trip() {
        let cfg = PublisherConfig {
            snapshot_every: Some(240),
            ..PublisherConfig::default()
        };
        let f = fixture(Some("memory://"), cfg, 0).await;
        let h = head(&f.store).await;
        assert!(h.pages.is_empty() && h.snapshot.is_some());
        let mut r = LazyReader::new(StoreFetch::new(f.store.clone()));
        assert_eq!(r.get(&k(2)).await.unwrap(), Some(b"a2".to_vec()));
        let s = r.stats();
        assert_eq!(s.round_trips, 2, "{s:?}");
        assert!(s.gets > s.round_trips, "{s:?}");
        assert_eq!(
            s.to_json(),
            format!(
                "{{\"gets\":{},\"bytes\":{},\"round_trips\":2}}",
                s.gets, s.bytes
            )
        );
    }

    fn flip(path: &std::path::Path, at: u64) {
        let mut b = std::fs::read(path).unwrap();
        b[at as usize] ^= 0x20;
        std::fs::write(path, b).unwrap();
    }

    fn data_error(e: anyhow::Error) -> Error {
        let e = e
            .downcast::<Error>()
            .unwrap_or_else(|e| panic!("not a walcast error: {e:#}"));
        assert_eq!(e.kind(), ErrorKind::Data, "{e}");
        e
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_block_or_segment_is_a_data_error_naming_it() {
        let f = fixture(None, small(TINY_BLOCKS), 400).await;
        let h = head(&f.store).await;
        let snap = h.snapshot.clone().unwrap();
        let data = f.tmp.path().join("data");
        // k001 lives in the snapshot only (the tail never touches it): damage
        // its value in the data block that holds it.
        assert!(f.model.get(&k(1)).is_some_and(|v| v.starts_with(b"a1x")));
        let snap_path = data.join(&snap.key);
        let bytes = std::fs::read(&snap_path).unwrap();
        let at = bytes.windows(4).position(|w| w == b"a1xx").unwrap() as u64;
        assert!(
            at + SUFFIX_GUESS < snap.size,
            "the block is outside the suffix"
        );
        flip(&snap_path, at);
        let mut r = LazyReader::new(StoreFetch::new(f.store.clone()));
        let e = data_error(r.get(&k(1)).await.unwrap_err());
        assert_eq!(e.object(), Some(snap.key.as_str()), "{e}");
        let e = data_error(r.scan_prefix(b"k", None).await.unwrap_err());
        assert_eq!(e.object(), Some(snap.key.as_str()), "{e}");
        // Other blocks still read; so does this one, repaired.
        assert_eq!(r.get(&k(2)).await.unwrap().as_ref(), f.model.get(&k(2)));
        flip(&snap_path, at);
        assert_eq!(r.get(&k(1)).await.unwrap().as_ref(), f.model.get(&k(1)));

        // A segment of the tail.
        let seg = h.segments.last().unwrap().clone();
        flip(&data.join(&seg.key), seg.size / 2);
        let e = data_error(r.get(&k(200)).await.unwrap_err());
        assert_eq!(e.object(), Some(seg.key.as_str()), "{e}");
        assert!(e.lsn().is_some(), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_dataset_is_not_found() {
        let store = Store::open("memory://").unwrap();
        let mut r = LazyReader::new(StoreFetch::new(store));
        let e = r.get(b"x").await.unwrap_err().downcast::<Error>().unwrap();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.object(), Some(HEAD_KEY));
        assert_eq!(r.stats().round_trips, 1);
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b""), None);
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
    }
}
