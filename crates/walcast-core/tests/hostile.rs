//! A replica facing a hostile or broken store: reproduced defects, each as a
//! test, and a property test that drives the replica machine through random
//! heads, pages, segments, snapshots, ranges and lengths.
//!
//! Every drain of `poll` must end within a bounded number of steps, nothing
//! may panic, the served state must always equal the origin's state at the
//! applied LSN, and once the store turns honest again the replica must catch
//! up by itself. `HOSTILE_SEEDS=N` runs N seeds (default 300);
//! `HOSTILE_SEED=S` replays one.

#[path = "support/fixtures.rs"]
mod fixtures;

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::Duration;

use fixtures::{build_segment, state_through, DATASET};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use walcast_core::batch;
use walcast_core::catalog::{
    page_key, snapshot_key, Head, Page, PageRef, SegmentEntry, SnapshotEntry, FORMAT, HEAD_KEY,
};
use walcast_core::io::{ByteRange, ContentRange, GetRequest, GetResponse};
use walcast_core::replica::{
    Action, Event, Replica, ReplicaConfig, MAX_TRANSFER_ALLOWANCE_MS, MIN_TRANSFER_BYTES_PER_SEC,
};
use walcast_core::snapshot;
use walcast_core::state::KvState;
use walcast_core::ErrorKind;

/// Most actions one drain of `poll` may return before it must wait.
const DRAIN_BOUND: u64 = 10_000;

/// An honest in-memory store.
#[derive(Clone, Default)]
struct Store {
    objects: HashMap<String, Vec<u8>>,
}

impl Store {
    fn put(&mut self, key: impl Into<String>, body: Vec<u8>) {
        self.objects.insert(key.into(), body);
    }

    fn serve(&self, g: &GetRequest) -> GetResponse {
        let Some(body) = self.objects.get(&g.key) else {
            return GetResponse::NotFound;
        };
        let etag = format!("\"{:08x}\"", crc32fast::hash(body));
        if g.if_none_match.as_deref() == Some(etag.as_str()) {
            return GetResponse::NotModified;
        }
        let len = body.len() as u64;
        let (start, end) = match g.range {
            None => {
                return GetResponse::Ok {
                    body: body.clone(),
                    etag: Some(etag),
                    range: None,
                }
            }
            Some(ByteRange::Bounded { start, end }) => (start, end.min(len)),
            Some(ByteRange::Suffix(n)) => (len.saturating_sub(n), len),
        };
        if start >= end {
            return GetResponse::RangeNotSatisfiable;
        }
        GetResponse::Ok {
            body: body[start as usize..end as usize].to_vec(),
            etag: Some(etag),
            range: Some(ContentRange {
                start,
                end,
                total: Some(len),
            }),
        }
    }
}

/// Drives a replica against a responder, on a virtual clock.
struct Driver {
    r: Replica,
    now: u64,
    events: Vec<Event>,
    longest_drain: u64,
}

impl Driver {
    fn new(cfg: ReplicaConfig, seed: u64) -> Self {
        Driver {
            r: Replica::new(cfg, seed),
            now: 0,
            events: Vec::new(),
            longest_drain: 0,
        }
    }

    /// Runs until `until` (virtual ms), answering every fetch at once.
    fn run(
        &mut self,
        until: u64,
        answer: &mut dyn FnMut(&GetRequest) -> GetResponse,
        check: &mut dyn FnMut(&Replica),
    ) {
        while self.now < until {
            let mut steps = 0;
            loop {
                steps += 1;
                assert!(
                    steps <= DRAIN_BOUND,
                    "poll did not settle within {DRAIN_BOUND} actions"
                );
                match self.r.poll(self.now) {
                    Action::Fetch(req) => {
                        let resp = answer(&req);
                        self.r.handle_response(req.id, self.now, resp);
                    }
                    Action::Event(e) => {
                        self.events.push(e);
                        check(&self.r);
                    }
                    Action::Wait { until: t } => {
                        self.now = t.max(self.now + 1).min(until.max(self.now + 1));
                        break;
                    }
                }
            }
            self.longest_drain = self.longest_drain.max(steps);
        }
    }

    fn errors(&self) -> Vec<walcast_core::Error> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Error(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Runs `f` on a thread and fails the test if it does not end in time: a
/// machine that spins inside `poll` never returns to the test's loop.
fn ends_within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("the replica did not return within {secs} s")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            panic!("the check failed (see the panic above)")
        }
    }
}

/// An honest dataset: segments of `per` LSNs through `last`, optionally a
/// snapshot at `snap_lsn` with history from `earliest` on.
struct Dataset {
    store: Store,
    head: Head,
    segments: Vec<SegmentEntry>,
}

/// Stores a version 1 snapshot of `st` at `lsn` and returns its entry.
fn put_snapshot(store: &mut Store, st: &KvState, lsn: u64, epoch: u64) -> SnapshotEntry {
    let bytes = snapshot::encode_with_chunk_bytes(st, lsn, epoch, DATASET, 200);
    let e = SnapshotEntry {
        key: snapshot_key(lsn, epoch),
        lsn,
        epoch,
        size: bytes.len() as u64,
        crc32: crc32fast::hash(&bytes),
        entries: st.len(),
        version: 1,
        suffix: None,
        footer_crc32: None,
    };
    store.put(e.key.clone(), bytes);
    e
}

fn dataset(last: u64, per: u64, snap: Option<u64>, epoch: u64) -> Dataset {
    let mut store = Store::default();
    let mut segments = Vec::new();
    let mut first = 1;
    while first <= last {
        let end = (first + per - 1).min(last);
        let (bytes, summary) = build_segment(epoch, first, end, 64);
        let e = SegmentEntry::from_summary(&summary);
        store.put(e.key.clone(), bytes);
        segments.push(e);
        first = end + 1;
    }
    let snapshot = snap.map(|lsn| put_snapshot(&mut store, &state_through(1, lsn), lsn, epoch));
    let mut head = Head::new(DATASET, epoch);
    head.generation = last + 1;
    head.committed_lsn = last;
    head.snapshot = snapshot;
    head.segments = segments.clone();
    store.put(HEAD_KEY, head.encode());
    Dataset {
        store,
        head,
        segments,
    }
}

fn assert_state(r: &Replica) {
    let want = state_through(1, r.applied_lsn());
    assert!(
        same_state(r.state(), &want),
        "state differs from the origin's at LSN {}",
        r.applied_lsn()
    );
}

fn same_state(a: &KvState, b: &KvState) -> bool {
    a.len() == b.len() && a.iter().zip(b.iter()).all(|(x, y)| x == y)
}

fn cfg() -> ReplicaConfig {
    ReplicaConfig {
        poll_interval_ms: 100,
        retry_base_ms: 10,
        retry_max_ms: 1_000,
        max_attempts: 3,
        snapshot_window: 97,
        ..ReplicaConfig::default()
    }
}

/// A level-1 page whose only child reference reuses the page's own key used
/// to make `poll` spin for good (pages were cached by key and not checked
/// against the reference naming them). It is now a `data` error naming the
/// page, and the replica carries on polling.
#[test]
fn a_page_that_names_itself_is_a_data_error_not_a_hang() {
    let errors = ends_within(20, || {
        let ds = dataset(40, 10, None, 1);
        let mut store = ds.store.clone();
        let key = page_key(1, 1, 30, 1);
        let child = PageRef {
            key: key.clone(),
            level: 0,
            first_lsn: 1,
            last_lsn: 30,
            count: 3,
            crc32: 0,
        };
        let page = Page {
            format: FORMAT,
            level: 1,
            segments: Vec::new(),
            pages: vec![child],
            digests: Default::default(),
        };
        let bytes = page.encode();
        let r = PageRef {
            key: key.clone(),
            level: 1,
            first_lsn: 1,
            last_lsn: 30,
            count: 1,
            crc32: crc32fast::hash(&bytes),
        };
        store.put(key.clone(), bytes);
        let mut head = ds.head.clone();
        head.segments = ds.segments[3..].to_vec();
        head.pages = vec![r];
        store.put(HEAD_KEY, head.encode());
        let mut d = Driver::new(cfg(), 1);
        d.run(10_000, &mut |g| store.serve(g), &mut |_| {});
        assert_eq!(d.r.applied_lsn(), 0);
        d.errors()
    });
    assert!(
        errors
            .iter()
            .any(|e| e.kind() == ErrorKind::Data && e.to_string().contains("catalog/pages/")),
        "{errors:?}"
    );
}

/// Puts the first three segments of `ds` (LSNs 1..=30) under a chain of
/// pages `top` levels high, one reference per page, and a head naming the
/// top page and the other segments inline.
fn page_chain(store: &mut Store, ds: &Dataset, top: u32) {
    let leaf = Page {
        format: FORMAT,
        level: 0,
        segments: ds.segments[..3].to_vec(),
        pages: Vec::new(),
        digests: Default::default(),
    };
    let bytes = leaf.encode();
    let mut r = PageRef {
        key: page_key(0, 1, 30, 1),
        level: 0,
        first_lsn: 1,
        last_lsn: 30,
        count: 3,
        crc32: crc32fast::hash(&bytes),
    };
    store.put(r.key.clone(), bytes);
    for level in 1..=top {
        let p = Page {
            format: FORMAT,
            level,
            segments: Vec::new(),
            pages: vec![r],
            digests: Default::default(),
        };
        let bytes = p.encode();
        r = PageRef {
            key: page_key(level, 1, 30, 1),
            level,
            first_lsn: 1,
            last_lsn: 30,
            count: 1,
            crc32: crc32fast::hash(&bytes),
        };
        store.put(r.key.clone(), bytes);
    }
    let mut head = ds.head.clone();
    head.segments = ds.segments[3..].to_vec();
    head.pages = vec![r];
    store.put(HEAD_KEY, head.encode());
}

/// A page tree far deeper than any valid one (each page one level below its
/// parent) used to evict its own path from the page cache and never finish.
/// Levels above the format's limit are now refused at the head.
#[test]
fn a_page_tree_deeper_than_the_format_allows_is_refused() {
    let errors = ends_within(20, || {
        let ds = dataset(40, 10, None, 1);
        let mut store = ds.store.clone();
        page_chain(&mut store, &ds, 100);
        let mut d = Driver::new(cfg(), 2);
        let mut gets = 0u64;
        d.run(
            60_000,
            &mut |g| {
                gets += 1;
                store.serve(g)
            },
            &mut |_| {},
        );
        assert_eq!(d.r.applied_lsn(), 0);
        d.errors()
    });
    assert!(
        errors
            .iter()
            .any(|e| e.kind() == ErrorKind::Data && e.to_string().contains(HEAD_KEY)),
        "{errors:?}"
    );
}

/// A valid tree as deep as the format allows is descended and applied.
#[test]
fn the_deepest_valid_page_tree_is_followed() {
    ends_within(20, || {
        let ds = dataset(40, 10, None, 1);
        let mut store = ds.store.clone();
        page_chain(&mut store, &ds, walcast_core::catalog::MAX_PAGE_LEVEL);
        let mut d = Driver::new(cfg(), 3);
        d.run(10_000, &mut |g| store.serve(g), &mut assert_state);
        assert_eq!(d.r.applied_lsn(), 40);
    });
}

/// One CRC-valid head with a huge `committed_lsn` and a missing segment used
/// to leave the replica waiting for that LSN for good, after the real head
/// was back. The newest head read now decides what is committed.
#[test]
fn a_bogus_high_head_does_not_wedge_the_replica() {
    ends_within(20, || {
        let ds = dataset(30, 10, None, 1);
        let mut bogus = ds.head.clone();
        let (_, far) = build_segment(1, 31, 1_000_000, 1_000_000);
        let _ = far;
        // A head that commits far more than exists, naming a segment that
        // was never uploaded.
        let (_, s) = build_segment(1, 31, 40, 64);
        let mut missing = SegmentEntry::from_summary(&s);
        missing.last_lsn = 1_000_000;
        missing.key = walcast_core::catalog::segment_key(1, 31, 1_000_000);
        bogus.segments.push(missing);
        bogus.committed_lsn = 1_000_000;
        bogus.generation += 1;
        let mut served_bogus = false;
        let store = ds.store.clone();
        let mut d = Driver::new(cfg(), 4);
        d.run(
            20_000,
            &mut |g| {
                if g.key == HEAD_KEY && !served_bogus && g.if_none_match.is_none() {
                    served_bogus = true;
                    let mut resp = store.serve(g);
                    if let GetResponse::Ok { body, .. } = &mut resp {
                        *body = bogus.encode();
                    }
                    return resp;
                }
                store.serve(g)
            },
            &mut assert_state,
        );
        assert!(served_bogus);
        assert_eq!(d.r.applied_lsn(), 30, "caught up with the real head");
        assert_eq!(d.r.status(d.now).committed_lsn, 30);
    });
}

/// A bucket restored from a backup holds less history than the replica
/// applied. A stale cache answers like that for a moment; a restored bucket
/// for good. After `rewind_after_ms` of only such heads the replica reports
/// a `data` error, starts over and follows the history the store holds.
#[test]
fn a_restored_bucket_is_followed_after_an_error_not_wedged() {
    ends_within(20, || {
        let newer = dataset(40, 10, None, 1);
        let older = dataset(20, 10, None, 1);
        let mut d = Driver::new(cfg(), 5);
        d.run(5_000, &mut |g| newer.store.serve(g), &mut assert_state);
        assert_eq!(d.r.applied_lsn(), 40);
        // The restore, and briefly a stale cache: no reset yet.
        d.run(10_000, &mut |g| older.store.serve(g), &mut assert_state);
        assert_eq!(
            d.r.applied_lsn(),
            40,
            "a short spell of old heads changes nothing"
        );
        d.run(120_000, &mut |g| older.store.serve(g), &mut assert_state);
        assert_eq!(d.r.applied_lsn(), 20);
        let errors = d.errors();
        assert!(
            errors
                .iter()
                .any(|e| e.kind() == ErrorKind::Data && e.to_string().contains("went back")),
            "{errors:?}"
        );
        assert!(d
            .events
            .iter()
            .any(|e| matches!(e, Event::DatasetChanged { .. })));
    });
}

/// A CRC-valid head whose keys point outside the dataset's object kinds is
/// refused before anything is fetched from those keys.
#[test]
fn catalog_keys_outside_the_dataset_are_refused() {
    let ds = dataset(20, 10, Some(10), 1);
    let mut bad = ds.head.clone();
    bad.segments[0].key = "../x".into();
    assert!(Head::decode(&bad.encode()).is_err());
    let mut bad = ds.head.clone();
    bad.retired.push(walcast_core::catalog::Retired {
        key: HEAD_KEY.into(),
        since_ms: 0,
    });
    assert!(Head::decode(&bad.encode()).is_err());
    let mut bad = ds.head.clone();
    bad.snapshot.as_mut().unwrap().key = "snapshots/../../etc/passwd".into();
    assert!(Head::decode(&bad.encode()).is_err());
    assert!(Head::decode(&ds.head.encode()).is_ok());
}

/// A head whose segment entry disagrees with the segment's own trailer
/// (the LSNs it holds, where its records end) gets a `data` error naming the
/// segment, and nothing of that segment is applied: a segment is checked
/// against its catalog entry in the walk that verifies it.
#[test]
fn a_segment_unlike_its_catalog_entry_is_a_data_error() {
    type Lie = fn(&mut Head);
    // Each lie keeps the catalog itself consistent (dense LSNs, keys as
    // the format derives them); the segment it names (the second or third of 1..=10, 11..=20, 21..=30)
    // says otherwise, and the replica stops before it.
    let lies: [(&str, Lie, usize, u64); 3] = [
        (
            "one LSN fewer",
            |h| {
                h.segments[2].last_lsn -= 1;
                h.committed_lsn -= 1;
            },
            2,
            20,
        ),
        (
            "the boundary one LSN later",
            |h| {
                h.segments[1].last_lsn += 1;
                h.segments[2].first_lsn += 1;
                h.segments[2].index[0].lsn += 1;
            },
            1,
            10,
        ),
        (
            "records ending a byte sooner",
            |h| h.segments[1].records_end -= 1,
            1,
            10,
        ),
    ];
    for (what, lie, liar, stop) in lies {
        let ds = dataset(30, 10, None, 1);
        let mut store = ds.store.clone();
        let mut head = ds.head.clone();
        lie(&mut head);
        // The lying entries' keys as the format derives them, holding the
        // real segments' bytes (as a hostile store may).
        for (e, real) in head.segments.iter_mut().zip(&ds.segments) {
            e.key = walcast_core::catalog::segment_key(e.epoch, e.first_lsn, e.last_lsn);
            let bytes = ds.store.objects[&real.key].clone();
            store.put(e.key.clone(), bytes);
        }
        store.put(HEAD_KEY, head.encode());
        let key = head.segments[liar].key.clone();
        let mut d = Driver::new(cfg(), 1);
        d.run(2_000, &mut |g| store.serve(g), &mut |r| {
            assert!(r.applied_lsn() <= stop, "{what}: applied past the lie")
        });
        assert_eq!(d.r.applied_lsn(), stop, "{what}: {:?}", d.errors());
        assert_state(&d.r);
        let errors = d.errors();
        assert!(
            errors
                .iter()
                .any(|e| e.kind() == ErrorKind::Data && e.to_string().contains(&key)),
            "{what}: {errors:?}"
        );
    }
}

/// The `n`th head of a server whose every head is of a new epoch and names
/// one segment of it (LSNs 1..=10): a new key each time.
fn head_naming_a_new_segment(n: u64) -> GetResponse {
    let (_, summary) = build_segment(n, 1, 10, 64);
    let mut head = Head::new(DATASET, n);
    head.generation = n;
    head.committed_lsn = 10;
    head.segments = vec![SegmentEntry::from_summary(&summary)];
    GetResponse::Ok {
        body: head.encode(),
        etag: Some(format!("\"h{n}\"")),
        range: None,
    }
}

/// A server whose every head names a new, damaged segment (a new epoch, so
/// a new key each time) used to keep a sync going without end and without
/// an error: failures were counted per key, and none reached the limit; the
/// head was re-read at once after each. Now failures in a row without a
/// success report an error, and the head reads back off.
#[test]
fn a_new_damaged_segment_in_every_head_ends_in_an_error_and_backs_off() {
    let mut heads = 0u64;
    let mut segment_gets = 0u64;
    let mut d = Driver::new(cfg(), 3);
    d.run(
        60_000,
        &mut |g| {
            if g.key == HEAD_KEY {
                heads += 1;
                head_naming_a_new_segment(heads)
            } else {
                segment_gets += 1;
                let epoch = g
                    .key
                    .split('/')
                    .nth(1)
                    .and_then(|e| e.parse().ok())
                    .unwrap_or(1);
                let (mut bytes, _) = build_segment(epoch, 1, 10, 64);
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x55;
                GetResponse::Ok {
                    body: bytes,
                    etag: None,
                    range: None,
                }
            }
        },
        &mut assert_state,
    );
    assert_eq!(d.r.applied_lsn(), 0);
    let errors = d.errors();
    assert!(
        errors.iter().any(|e| e.kind() == ErrorKind::Data),
        "no error after {heads} heads and {segment_gets} segment GETs"
    );
    // Backing off to at most retry_max_ms (1 s) between tries: about 60
    // in the minute, not one a millisecond.
    assert!(
        heads < 400 && segment_gets < 400,
        "{heads} head and {segment_gets} segment GETs in a minute"
    );
}

/// A server whose every head names a new segment (a new epoch, so a new
/// key each time) and answers 404 for it: the first miss of each key used
/// to read the head again at once, so head, 404, head went on without a
/// pause. Now, after rounds of failures, the head reads back off as for a
/// damaged segment, and an error says what is missing.
#[test]
fn a_new_missing_segment_in_every_head_backs_off() {
    let (mut heads, mut gets) = (0u64, 0u64);
    let mut d = Driver::new(cfg(), 3);
    d.run(
        60_000,
        &mut |g| {
            gets += 1;
            if g.key != HEAD_KEY {
                return GetResponse::NotFound;
            }
            heads += 1;
            head_naming_a_new_segment(heads)
        },
        &mut assert_state,
    );
    assert!(
        d.errors().iter().any(|e| e.kind() == ErrorKind::NotFound),
        "no error after {heads} heads"
    );
    assert!(gets < 400, "{gets} GETs ({heads} heads) in a minute");
}

/// The same through a page: every head names a new page, which is sound
/// and names a new damaged segment. Reading the page is no progress, so
/// the failures still add up to an error; and with 16 GETs in flight the
/// error comes after as many rounds of failures (the backoff grows by
/// rounds, not by failures).
#[test]
fn a_new_page_naming_a_new_damaged_segment_in_every_head_ends_in_an_error() {
    for max_inflight in [4, 16] {
        let mut heads = 0u64;
        let mut pages: HashMap<String, Vec<u8>> = HashMap::new();
        let mut d = Driver::new(
            ReplicaConfig {
                max_inflight,
                retry_max_ms: 30_000,
                ..cfg()
            },
            3,
        );
        d.run(
            120_000,
            &mut |g| {
                if g.key == HEAD_KEY {
                    heads += 1;
                    let (_, summary) = build_segment(heads, 1, 10, 64);
                    let page = Page {
                        format: 1,
                        level: 0,
                        segments: vec![SegmentEntry::from_summary(&summary)],
                        pages: Vec::new(),
                        digests: Default::default(),
                    }
                    .encode();
                    let key = page_key(0, 1, 10, heads);
                    let mut head = Head::new(DATASET, heads);
                    head.generation = heads;
                    head.committed_lsn = 10;
                    head.pages = vec![PageRef {
                        key: key.clone(),
                        level: 0,
                        first_lsn: 1,
                        last_lsn: 10,
                        count: 1,
                        crc32: crc32fast::hash(&page),
                    }];
                    pages.insert(key, page);
                    return GetResponse::Ok {
                        body: head.encode(),
                        etag: Some(format!("\"h{heads}\"")),
                        range: None,
                    };
                }
                if let Some(page) = pages.get(&g.key) {
                    return GetResponse::Ok {
                        body: page.clone(),
                        etag: None,
                        range: None,
                    };
                }
                let epoch = g
                    .key
                    .split('/')
                    .nth(1)
                    .and_then(|e| e.parse().ok())
                    .unwrap_or(1);
                let (mut bytes, _) = build_segment(epoch, 1, 10, 64);
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x55;
                GetResponse::Ok {
                    body: bytes,
                    etag: None,
                    range: None,
                }
            },
            &mut assert_state,
        );
        assert_eq!(d.r.applied_lsn(), 0);
        let errors = d.errors();
        assert!(
            errors.iter().any(|e| e.kind() == ErrorKind::Data),
            "max_inflight {max_inflight}: no error in two minutes after {heads} heads"
        );
    }
}

/// A blip that fails every GET in flight once (16 at a time) is retried
/// and reports no error: the failure streak's limit grows with how many
/// GETs may be in flight.
#[test]
fn a_blip_failing_every_get_in_flight_reports_no_error() {
    let ds = dataset(200, 5, None, 1);
    let mut failed = std::collections::HashSet::new();
    let mut d = Driver::new(
        ReplicaConfig {
            max_inflight: 16,
            ..cfg()
        },
        9,
    );
    d.run(
        20_000,
        &mut |g| {
            if g.key != HEAD_KEY && failed.insert(g.key.clone()) {
                return GetResponse::Failed {
                    status: Some(503),
                    message: "blip".into(),
                };
            }
            ds.store.serve(g)
        },
        &mut assert_state,
    );
    assert_eq!(d.r.applied_lsn(), 200);
    assert!(failed.len() > 16, "{} GETs failed", failed.len());
    assert_eq!(d.errors(), Vec::new());
}

/// A segment that failed is due for its retry while every slot holds a
/// GET still in flight (large segments on a slow link): the machine must
/// not ask to be woken now, or a driver sleeping until `until` spins
/// without ever yielding to the I/O that would free a slot (a
/// current-thread runtime then hangs for good at full CPU).
#[test]
fn a_retry_due_while_every_slot_is_busy_does_not_ask_to_be_woken_now() {
    let ds = dataset(200, 5, None, 1);
    let mut r = Replica::new(
        ReplicaConfig {
            max_inflight: 2,
            ..cfg()
        },
        9,
    );
    let mut now = 0;
    let mut held = Vec::new();
    let mut failed = false;
    for _ in 0..200 {
        match r.poll(now) {
            Action::Fetch(req) if req.key == HEAD_KEY => {
                let resp = ds.store.serve(&req);
                r.handle_response(req.id, now, resp);
            }
            Action::Fetch(req) if !failed => {
                failed = true;
                r.handle_response(
                    req.id,
                    now,
                    GetResponse::Failed {
                        status: Some(503),
                        message: "busy".into(),
                    },
                );
            }
            // Every other GET stays in flight.
            Action::Fetch(req) => held.push(req.id),
            Action::Event(_) => {}
            Action::Wait { until } => {
                assert!(
                    until > now || held.len() < 2,
                    "asked to be woken at once ({until} at {now}) with every slot busy"
                );
                // The retry falls due; nothing answers the GETs in flight.
                now += 5_000;
                if now > 50_000 {
                    break;
                }
            }
        }
    }
    assert!(failed && held.len() == 2, "{held:?}");
}

/// A head claiming a 50 GB segment is read (publishers before the limit
/// wrote segments past it), but that segment is never fetched (the replica
/// would read up to the claimed size into memory): the segments before it
/// are applied, an error names it, and a head with a snapshot past it
/// serves. A snapshot too large to take whole is never asked for with room
/// for more than a window (a server ignoring `Range` would stream all of
/// it).
#[test]
fn claimed_sizes_do_not_set_what_a_replica_reads_into_memory() {
    let ds = dataset(20, 10, None, 1);
    let mut head = ds.head.clone();
    let big = head.segments[1].key.clone();
    head.segments[1].size = 50_000_000_000;
    let mut store = ds.store.clone();
    store.put(HEAD_KEY, head.encode());
    let decoded =
        walcast_core::catalog::Head::decode(&head.encode()).expect("a head naming it is read");
    assert_eq!(decoded.segments[1].size, 50_000_000_000);
    let mut d = Driver::new(cfg(), 1);
    let mut asked = Vec::new();
    d.run(
        2_000,
        &mut |g| {
            asked.push((g.key.clone(), g.max_bytes));
            store.serve(g)
        },
        &mut assert_state,
    );
    assert_eq!(d.r.applied_lsn(), 10, "the segment before it is applied");
    assert!(
        asked.iter().all(|(k, _)| *k != big),
        "fetched the oversized segment: {asked:?}"
    );
    let errors = d.errors();
    assert!(
        errors
            .iter()
            .any(|e| e.to_string().contains("above the limit")
                && e.to_string().contains(&big)
                && e.lsn() == Some(11)),
        "{errors:?}"
    );
    // A snapshot past the oversized segment: the replica moves on.
    let snap = put_snapshot(&mut store, &state_through(1, 20), 20, 1);
    let mut past = head.clone();
    past.generation += 1;
    past.snapshot = Some(snap);
    past.earliest_lsn = 21;
    past.segments.clear();
    store.put(HEAD_KEY, past.encode());
    let mut d = Driver::new(cfg(), 1);
    d.run(2_000, &mut |g| store.serve(g), &mut assert_state);
    assert_eq!(d.r.applied_lsn(), 20);

    // A snapshot of 100 MiB (by its entry): each window GET may bring at
    // most the window.
    let mut head = ds.head.clone();
    let snap = put_snapshot(&mut store, &state_through(1, 20), 20, 1);
    head.snapshot = Some(SnapshotEntry {
        size: 100 << 20,
        ..snap
    });
    head.earliest_lsn = 21;
    head.segments.clear();
    head.committed_lsn = 20;
    store.put(HEAD_KEY, head.encode());
    let mut d = Driver::new(cfg(), 1);
    let mut windows = Vec::new();
    d.run(
        2_000,
        &mut |g| {
            if g.key != HEAD_KEY {
                windows.push(g.max_bytes);
            }
            store.serve(g)
        },
        &mut assert_state,
    );
    assert!(!windows.is_empty());
    assert!(
        windows.iter().all(|&m| m <= cfg().snapshot_window),
        "{windows:?}"
    );
}

/// A dataset at the top of the LSN range, a snapshot at `u64::MAX - 2` and a
/// segment holding `u64::MAX - 1` (the highest LSN a catalog accepts), is
/// followed to its end: no LSN is computed past the last one (tests build
/// with overflow checks, so such a sum would panic here).
#[test]
fn a_dataset_at_the_top_of_the_lsn_range_is_followed() {
    let top = u64::MAX - 1;
    let snap_lsn = top - 1;
    let mut store = Store::default();
    let (bytes, summary) = build_segment(1, top, top, 64);
    let seg = SegmentEntry::from_summary(&summary);
    store.put(seg.key.clone(), bytes);
    let st = state_through(snap_lsn - 2, snap_lsn);
    let entry = put_snapshot(&mut store, &st, snap_lsn, 1);
    let mut head = Head::new(DATASET, 1);
    head.generation = 2;
    head.committed_lsn = top;
    head.earliest_lsn = top;
    head.snapshot = Some(entry);
    head.segments = vec![seg];
    store.put(HEAD_KEY, head.encode());
    let mut d = Driver::new(cfg(), 1);
    d.run(2_000, &mut |g| store.serve(g), &mut |_| {});
    assert_eq!(d.r.applied_lsn(), top, "{:?}", d.errors());
    let mut want = st.clone();
    want.apply(batch::Batch::parse(&batch::encode(&fixtures::batch_for(top)).unwrap()).unwrap());
    assert!(same_state(d.r.state(), &want));
}

// ---- the property test ----

/// Re-encodes a JSON head with a valid CRC, as a hostile server could.
fn with_crc(v: &serde_json::Value) -> Vec<u8> {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("crc32");
    }
    let json = serde_json::to_vec(&v).unwrap();
    let rest = &json[1..];
    let mut out = format!("{{\"crc32\":\"{:08x}\",", crc32fast::hash(rest)).into_bytes();
    out.extend_from_slice(rest);
    out
}

fn hostile_number(rng: &mut ChaCha8Rng) -> serde_json::Value {
    let n: u64 = match rng.random_range(0..6) {
        0 => 0,
        1 => u64::MAX,
        2 => u64::MAX / 2,
        3 => rng.random_range(0..100),
        4 => 1 << rng.random_range(0..64),
        _ => rng.random(),
    };
    serde_json::Value::from(n)
}

/// Replaces one number somewhere in `v` with a hostile one.
fn mutate_json(v: &mut serde_json::Value, rng: &mut ChaCha8Rng) {
    let mut paths = Vec::new();
    fn walk(v: &serde_json::Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match v {
            serde_json::Value::Object(o) => {
                for (k, x) in o {
                    path.push(k.clone());
                    walk(x, path, out);
                    path.pop();
                }
            }
            serde_json::Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    path.push(i.to_string());
                    walk(x, path, out);
                    path.pop();
                }
            }
            serde_json::Value::Number(_) | serde_json::Value::String(_) => out.push(path.clone()),
            _ => {}
        }
    }
    walk(v, &mut Vec::new(), &mut paths);
    if paths.is_empty() {
        return;
    }
    let path = &paths[rng.random_range(0..paths.len())];
    let mut at = v;
    for p in path {
        at = match at {
            serde_json::Value::Object(o) => o.get_mut(p).unwrap(),
            serde_json::Value::Array(a) => &mut a[p.parse::<usize>().unwrap()],
            _ => unreachable!(),
        };
    }
    *at = if at.is_string() && rng.random_bool(0.5) {
        serde_json::Value::from(
            [
                "../x",
                "catalog/head.json",
                "",
                "segments/1/x.wseg",
                "/etc/passwd",
            ][rng.random_range(0..5)],
        )
    } else {
        hostile_number(rng)
    };
}

/// One hostile answer in place of the honest one.
fn hostile(
    rng: &mut ChaCha8Rng,
    g: &GetRequest,
    honest: GetResponse,
    store: &Store,
) -> GetResponse {
    match rng.random_range(0..12) {
        0 => GetResponse::NotFound,
        1 => GetResponse::NotModified,
        2 => GetResponse::RangeNotSatisfiable,
        3 => GetResponse::Failed {
            status: Some(503),
            message: "416 in the text of a 503".into(),
        },
        4 | 5 => {
            // Flip, truncate or extend the body.
            let GetResponse::Ok {
                mut body,
                etag,
                range,
            } = honest
            else {
                return honest;
            };
            match rng.random_range(0..3) {
                0 if !body.is_empty() => {
                    let i = rng.random_range(0..body.len());
                    body[i] ^= 1 << rng.random_range(0..8);
                }
                1 => body.truncate(rng.random_range(0..=body.len())),
                _ => body.extend((0..rng.random_range(1..300)).map(|_| rng.random::<u8>())),
            }
            GetResponse::Ok { body, etag, range }
        }
        6 => {
            // A Content-Range that lies.
            let GetResponse::Ok { body, etag, .. } = honest else {
                return honest;
            };
            let start = match rng.random_range(0..3) {
                0 => 0,
                1 => u64::MAX - 1,
                _ => rng.random_range(0..1000),
            };
            let end = start.saturating_add(rng.random_range(0..2000));
            let total = [None, Some(0), Some(u64::MAX)][rng.random_range(0..3)];
            GetResponse::Ok {
                body,
                etag,
                range: Some(ContentRange { start, end, total }),
            }
        }
        7 => {
            // Another object's bytes under this key.
            let keys: Vec<_> = store.objects.keys().collect();
            let other = keys[rng.random_range(0..keys.len())];
            GetResponse::Ok {
                body: store.objects[other].clone(),
                etag: Some("\"other\"".into()),
                range: None,
            }
        }
        8 | 9 if g.key == HEAD_KEY => {
            // A head with a valid CRC and a hostile field.
            let Some(body) = store.objects.get(HEAD_KEY) else {
                return honest;
            };
            let mut v: serde_json::Value = serde_json::from_slice(body).unwrap();
            for _ in 0..rng.random_range(1..4) {
                mutate_json(&mut v, rng);
            }
            GetResponse::Ok {
                body: with_crc(&v),
                etag: Some(format!("\"h{}\"", rng.random::<u32>())),
                range: None,
            }
        }
        10 => {
            // The whole object where a range was asked (a server ignoring Range).
            match store.objects.get(&g.key) {
                Some(b) => GetResponse::Ok {
                    body: b.clone(),
                    etag: None,
                    range: None,
                },
                None => honest,
            }
        }
        _ => GetResponse::Ok {
            body: Vec::new(),
            etag: None,
            range: None,
        },
    }
}

fn hostile_seed(seed: u64) -> u64 {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let last = rng.random_range(1..80);
    let per = rng.random_range(1..20);
    let snap = rng.random_bool(0.5).then(|| rng.random_range(1..=last));
    let mut ds = dataset(last, per, snap, 1);
    if let Some(s) = snap {
        // Retention: history before the snapshot may be gone.
        if rng.random_bool(0.5) {
            ds.head.earliest_lsn = s + 1;
            ds.head.segments.retain(|e| e.last_lsn > s);
            if ds
                .head
                .segments
                .first()
                .is_some_and(|e| e.first_lsn > s + 1)
                || ds.head.segments.is_empty()
            {
                ds.head.earliest_lsn = ds
                    .head
                    .segments
                    .first()
                    .map_or(s + 1, |e| e.first_lsn.min(s + 1));
            }
            ds.store.put(HEAD_KEY, ds.head.encode());
            assert!(Head::decode(&ds.head.encode()).is_ok());
        }
    }
    let p: f64 = [0.1, 0.3, 0.6, 0.9][rng.random_range(0..4)];
    let mut c = cfg();
    c.snapshot_window = rng.random_range(16..4096);
    c.max_inflight = rng.random_range(1..5);
    let mut d = Driver::new(c, seed);
    let store = ds.store.clone();
    let mut frng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    // Hostile phase.
    d.run(
        30_000,
        &mut |g| {
            let honest = store.serve(g);
            if frng.random_bool(p) {
                hostile(&mut frng, g, honest, &store)
            } else {
                honest
            }
        },
        &mut |r| {
            if r.dataset_id() == Some(DATASET) {
                assert_state(r)
            }
        },
    );
    // Honest phase: the replica must catch up by itself.
    d.run(d.now + 300_000, &mut |g| store.serve(g), &mut assert_state);
    assert_eq!(
        d.r.applied_lsn(),
        last,
        "seed {seed}: did not catch up once the store was honest: {:?}; last events {:?}",
        d.r.status(d.now),
        &d.events[d.events.len().saturating_sub(6)..]
    );
    assert_state(&d.r);
    d.longest_drain
}

#[test]
fn hostile_store_property() {
    let seeds: Vec<u64> = match std::env::var("HOSTILE_SEED") {
        Ok(s) => vec![s.parse().expect("HOSTILE_SEED is a number")],
        Err(_) => {
            let n: u64 = std::env::var("HOSTILE_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(300);
            (0..n).collect()
        }
    };
    let n = seeds.len();
    let longest = ends_within(600, move || {
        let mut longest = 0;
        for seed in seeds {
            let r = std::panic::catch_unwind(|| hostile_seed(seed));
            match r {
                Ok(l) => longest = longest.max(l),
                Err(e) => {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    panic!("seed {seed}: {msg}\nreplay: HOSTILE_SEED={seed} cargo test -p walcast-core --test hostile");
                }
            }
        }
        longest
    });
    println!("hostile store: {n} seeds, longest drain {longest} actions");
}

/// A GET of a segment or snapshot gets, on top of the base time limit, the
/// time its bytes take at `MIN_TRANSFER_BYTES_PER_SEC`: an object larger
/// than the base limit moves on a slow link is not cut off on every try
/// (and fetched again from its start for ever). The head keeps the base.
#[test]
fn a_get_has_time_for_the_bytes_it_expects() {
    let ds = dataset(40, 10, Some(20), 1);
    let store = ds.store.clone();
    let base = cfg().request_timeout_ms;
    let mut seen = Vec::new();
    let mut d = Driver::new(cfg(), 2);
    d.run(
        60_000,
        &mut |g| {
            seen.push((g.key.clone(), g.timeout_ms, g.range, g.max_bytes));
            store.serve(g)
        },
        &mut |_| {},
    );
    assert_state(&d.r);
    let mut big = 0;
    for (key, timeout, range, max_bytes) in &seen {
        if key.starts_with("catalog/") {
            assert_eq!(*timeout, base, "{key}");
            continue;
        }
        let bytes = match range {
            Some(ByteRange::Bounded { start, end }) => end - start,
            Some(ByteRange::Suffix(n)) => *n,
            None => *max_bytes,
        };
        assert!(bytes > 0, "{key}");
        assert!(
            *timeout
                >= base
                    + (bytes * 1000 / MIN_TRANSFER_BYTES_PER_SEC).min(MAX_TRANSFER_ALLOWANCE_MS),
            "{key}: {timeout} ms for {bytes} bytes"
        );
        big += 1;
    }
    assert!(big >= 2, "a snapshot and segments were fetched: {seen:?}");
}
