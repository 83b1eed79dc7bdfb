//! The head's tail: a replica following a publisher applies the newest
//! segments from the head it already read, so it makes about one request
//! per commit; segment objects stay in the store for replicas further
//! behind; a copy that fails verification is never applied (the object is
//! fetched instead).

use std::collections::HashMap;

use walcast_core::batch::{self, Op};
use walcast_core::catalog::{Head, HEAD_KEY};
use walcast_core::io::{ByteRange, ContentRange, GetRequest, GetResponse};
use walcast_core::publisher::{self, Publisher, PublisherConfig, PutCondition, PutResponse};
use walcast_core::replica::{self, Replica, ReplicaConfig};

/// An in-memory store with ETags, answering at once.
#[derive(Default)]
struct Store {
    objects: HashMap<String, (Vec<u8>, u64)>,
    next_etag: u64,
    /// Every replica GET, by kind.
    gets: HashMap<&'static str, u64>,
    /// Applied to every head body a replica reads (fault injection).
    tamper: Option<fn(Vec<u8>) -> Vec<u8>>,
}

impl Store {
    fn put(&mut self, key: &str, body: Vec<u8>, cond: &PutCondition) -> PutResponse {
        let cur = self.objects.get(key).map(|(_, e)| *e);
        match (cond, cur) {
            (PutCondition::CreateOnly, Some(_)) => return PutResponse::AlreadyExists,
            (PutCondition::IfMatch(e), c) if c.map(|c| c.to_string()) != Some(e.clone()) => {
                return PutResponse::PreconditionFailed
            }
            _ => {}
        }
        self.next_etag += 1;
        self.objects.insert(key.to_string(), (body, self.next_etag));
        PutResponse::Ok {
            etag: Some(self.next_etag.to_string()),
        }
    }

    fn get(&self, req: &GetRequest) -> GetResponse {
        let Some((body, etag)) = self.objects.get(&req.key) else {
            return GetResponse::NotFound;
        };
        if req.if_none_match.as_deref() == Some(&etag.to_string()) {
            return GetResponse::NotModified;
        }
        match req.range {
            Some(ByteRange::Bounded { start, end }) => GetResponse::Ok {
                body: body[start as usize..end as usize].to_vec(),
                etag: Some(etag.to_string()),
                range: Some(ContentRange {
                    start,
                    end,
                    total: Some(body.len() as u64),
                }),
            },
            _ => GetResponse::Ok {
                body: body.clone(),
                etag: Some(etag.to_string()),
                range: None,
            },
        }
    }

    fn replica_get(&mut self, req: &GetRequest) -> GetResponse {
        let kind = if req.key == HEAD_KEY {
            "head"
        } else if req.key.starts_with("segments/") {
            "segment"
        } else {
            "other"
        };
        *self.gets.entry(kind).or_default() += 1;
        let resp = self.get(req);
        match (resp, self.tamper, kind) {
            (GetResponse::Ok { body, etag, range }, Some(f), "head") => GetResponse::Ok {
                body: f(body),
                etag,
                range,
            },
            (r, _, _) => r,
        }
    }
}

fn drive_publisher(p: &mut Publisher, store: &mut Store, now: u64, commits: &mut u64) {
    loop {
        match p.poll(now) {
            publisher::Action::Put(req) => {
                let resp = store.put(&req.key, req.body, &req.condition);
                p.handle_put(req.id, now, resp);
            }
            publisher::Action::Get(req) => {
                let resp = store.get(&req);
                p.handle_get(req.id, now, resp);
            }
            publisher::Action::Delete(req) => {
                store.objects.remove(&req.key);
                p.handle_delete(req.id, now, Ok(()));
            }
            publisher::Action::Event(publisher::Event::Committed { .. }) => *commits += 1,
            publisher::Action::Event(_) => {}
            publisher::Action::Wait { .. } => return,
        }
    }
}

/// Steps the replica until it waits; returns the last error it reported
/// on the way.
fn drive_replica(r: &mut Replica, store: &mut Store, now: u64) -> Option<String> {
    let mut seen = None;
    for _ in 0..10_000 {
        if let Some(e) = r.status(now).last_error {
            seen = Some(e.to_string());
        }
        match r.poll(now) {
            replica::Action::Fetch(req) => {
                let resp = store.replica_get(&req);
                r.handle_response(req.id, now, resp);
            }
            replica::Action::Event(_) => {}
            replica::Action::Wait { .. } => return seen,
        }
    }
    panic!("the replica did not come to a wait");
}

fn payload(lsn: u64) -> Vec<u8> {
    batch::encode(&[Op::put(
        format!("key:{lsn:08}").into_bytes(),
        vec![b'v'; 100],
    )])
    .unwrap()
}

struct Run {
    commits: u64,
    head_gets: u64,
    segment_gets: u64,
    applied: u64,
    tail_applied: u64,
    last_error: Option<String>,
}

/// One write a millisecond for `ms`, a replica polling every 100 ms.
fn follow(cfg: PublisherConfig, ms: u64, tamper: Option<fn(Vec<u8>) -> Vec<u8>>) -> Run {
    follow_at(cfg, ms, 1, 100, tamper)
}

/// One write every `every_ms` for `ms`, a replica polling every `poll_ms`.
fn follow_at(
    cfg: PublisherConfig,
    ms: u64,
    every_ms: u64,
    poll_ms: u64,
    tamper: Option<fn(Vec<u8>) -> Vec<u8>>,
) -> Run {
    let mut store = Store::default();
    let mut p = Publisher::new(
        PublisherConfig {
            head_check_ms: 0,
            ..cfg
        },
        7,
    );
    let mut commits = 0;
    drive_publisher(&mut p, &mut store, 0, &mut commits);
    // A first record, committed before the replica starts.
    p.push(1, &payload(1), 0).unwrap();
    drive_publisher(&mut p, &mut store, 0, &mut commits);
    store.tamper = tamper;
    let mut r = Replica::new(
        ReplicaConfig {
            poll_interval_ms: poll_ms,
            long_poll_wait_ms: 0,
            ..ReplicaConfig::default()
        },
        3,
    );
    r.sync_now(1);
    drive_replica(&mut r, &mut store, 1);
    assert_eq!(r.applied_lsn(), 1);
    store.gets.clear();
    let before = commits;
    let mut lsn = 2;
    let mut seen_error = None;
    for now in 2..ms {
        if now % every_ms == 0 {
            p.push(lsn, &payload(lsn), now).unwrap();
            lsn += 1;
        }
        drive_publisher(&mut p, &mut store, now, &mut commits);
        if let Some(e) = drive_replica(&mut r, &mut store, now) {
            seen_error = Some(e);
        }
    }
    // Until the replica has what was written (its requests while following).
    let mut now = ms;
    while r.applied_lsn() < lsn - 1 && now < ms + 2_000 {
        drive_publisher(&mut p, &mut store, now, &mut commits);
        drive_replica(&mut r, &mut store, now);
        now += 1;
    }
    assert_eq!(p.committed_lsn(), lsn - 1, "every record committed");
    // Every committed segment is still an object in the store.
    let head = Head::decode(&store.objects[HEAD_KEY].0).unwrap();
    for s in &head.segments {
        let (body, _) = &store.objects[&s.key];
        assert_eq!(
            crc32fast::hash(body),
            s.crc32,
            "segment {} in the store",
            s.key
        );
    }
    Run {
        commits: commits - before,
        head_gets: store.gets.get("head").copied().unwrap_or(0),
        segment_gets: store.gets.get("segment").copied().unwrap_or(0),
        applied: r.applied_lsn(),
        tail_applied: r.tail_applied(),
        last_error: seen_error,
    }
}

#[test]
fn a_following_replica_makes_about_one_request_per_commit() {
    let run = follow(PublisherConfig::default(), 3_000, None);
    assert_eq!(run.applied, 3_000 - 1);
    assert!(run.commits >= 25, "only {} commits", run.commits);
    let per_commit = (run.head_gets + run.segment_gets) as f64 / run.commits as f64;
    eprintln!(
        "{} commits: {} head GETs, {} segment GETs, {per_commit:.2} requests per commit, {} segments from the tail",
        run.commits, run.head_gets, run.segment_gets, run.tail_applied
    );
    // A head carries only the segments its commit adds: a poll that finds
    // two commits at once fetches the older one's segment.
    assert!(
        run.segment_gets * 10 <= run.commits,
        "{} segment GETs in {} commits: most segments must come from the head",
        run.segment_gets,
        run.commits
    );
    assert!(per_commit <= 1.2, "{per_commit:.2} requests per commit");
}

/// At 100 writes a second a commit's segment is small, so heads carry the
/// earlier heads' segments too: a replica polling once a second finds every
/// commit since its last poll in the head it reads.
#[test]
fn at_low_rates_a_replica_polling_each_second_finds_every_commit_in_the_head() {
    let run = follow_at(PublisherConfig::default(), 10_000, 10, 1_000, None);
    assert_eq!(run.applied, 1_000);
    assert!(run.commits >= 50, "only {} commits", run.commits);
    eprintln!(
        "{} commits: {} head GETs, {} segment GETs, {} segments from the tail",
        run.commits, run.head_gets, run.segment_gets, run.tail_applied
    );
    assert!(
        run.segment_gets * 10 <= run.commits,
        "{} segment GETs for {} commits: the heads did not carry the earlier commits",
        run.segment_gets,
        run.commits
    );
    assert!(
        run.head_gets * 5 <= run.commits,
        "{} head GETs",
        run.head_gets
    );
}

/// At 1,000 writes a second each head carries only its own commit's
/// segment: a replica polling once a second finds about ten commits, reads
/// the newest from the head and fetches the others, about one request per
/// commit in all.
#[test]
fn at_high_rates_a_replica_polling_each_second_makes_about_one_request_per_commit() {
    let run = follow_at(PublisherConfig::default(), 10_000, 1, 1_000, None);
    assert_eq!(run.applied, 10_000 - 1);
    assert!(run.commits >= 50, "only {} commits", run.commits);
    let per_commit = (run.head_gets + run.segment_gets) as f64 / run.commits as f64;
    eprintln!(
        "{} commits: {} head GETs, {} segment GETs, {per_commit:.2} requests per commit, {} segments from the tail",
        run.commits, run.head_gets, run.segment_gets, run.tail_applied
    );
    assert!(per_commit <= 1.2, "{per_commit:.2} requests per commit");
    assert!(
        run.tail_applied >= run.head_gets / 2,
        "the heads' own segments were used"
    );
}

#[test]
fn without_a_tail_each_commit_costs_a_segment_get() {
    let cfg = PublisherConfig {
        tail_bytes: 0,
        ..PublisherConfig::default()
    };
    let run = follow(cfg, 2_000, None);
    assert_eq!(run.applied, 2_000 - 1);
    assert_eq!(run.tail_applied, 0);
    assert!(
        run.segment_gets + 2 >= run.commits,
        "{} segment GETs for {} commits",
        run.segment_gets,
        run.commits
    );
}

/// Rewrites the head so every tail copy has one flipped byte (and a
/// correct head checksum): the copies must fail verification, and the
/// replica fetches the objects instead.
fn corrupt_tail(body: Vec<u8>) -> Vec<u8> {
    let mut head = Head::decode(&body).unwrap();
    for t in &mut head.tail {
        let i = t.body.len() / 2;
        t.body[i] ^= 0x40;
    }
    head.encode()
}

#[test]
fn a_bad_copy_in_the_tail_is_never_applied() {
    let run = follow(PublisherConfig::default(), 1_000, Some(corrupt_tail));
    assert_eq!(run.applied, 1_000 - 1, "caught up from the objects");
    assert_eq!(run.tail_applied, 0, "no bad copy applied");
    assert!(run.segment_gets > 0);
    let err = run.last_error.unwrap_or_default();
    assert!(err.contains("segments/"), "error names the segment: {err}");
}

#[test]
fn the_tail_is_bounded_and_names_only_inline_segments() {
    let mut store = Store::default();
    let cfg = PublisherConfig {
        head_check_ms: 0,
        tail_bytes: 4_000,
        ..PublisherConfig::default()
    };
    let mut p = Publisher::new(cfg, 9);
    let mut commits = 0;
    drive_publisher(&mut p, &mut store, 0, &mut commits);
    for lsn in 1..=2_000u64 {
        p.push(lsn, &payload(lsn), lsn).unwrap();
        drive_publisher(&mut p, &mut store, lsn, &mut commits);
        let head = Head::decode(&store.objects[HEAD_KEY].0).unwrap();
        let total: usize = head.tail.iter().map(|t| t.body.len()).sum();
        assert!(total <= 4_000, "tail of {total} bytes");
        // The tail is the newest run of inline segments.
        let n = head.tail.len();
        let newest: Vec<&str> = head.segments[head.segments.len() - n..]
            .iter()
            .map(|s| s.key.as_str())
            .collect();
        let tail: Vec<&str> = head.tail.iter().map(|t| t.key.as_str()).collect();
        assert_eq!(tail, newest);
        for t in &head.tail {
            assert_eq!(&store.objects[&t.key].0, &t.body, "copy of {}", t.key);
        }
    }
}

#[test]
fn a_head_whose_tail_names_another_segment_is_refused() {
    let mut store = Store::default();
    let mut p = Publisher::new(
        PublisherConfig {
            head_check_ms: 0,
            ..PublisherConfig::default()
        },
        5,
    );
    let mut commits = 0;
    drive_publisher(&mut p, &mut store, 0, &mut commits);
    p.push(1, &payload(1), 0).unwrap();
    drive_publisher(&mut p, &mut store, 0, &mut commits);
    let mut head = Head::decode(&store.objects[HEAD_KEY].0).unwrap();
    assert_eq!(head.tail.len(), 1);
    head.tail[0].key = "segments/1/00000000000000000002-00000000000000000002.wseg".into();
    let err = Head::decode(&head.encode()).unwrap_err().to_string();
    assert!(err.contains("not one of the head's segments"), "{err}");
    // More copies than the tail's bytes hold (empty bodies), each checked
    // against the others and the segments, are refused by their count.
    let mut many = Head::decode(&store.objects[HEAD_KEY].0).unwrap();
    let one = many.segments[0].clone();
    many.segments = (1..=3_641u64)
        .map(|l| walcast_core::catalog::SegmentEntry {
            key: format!("segments/1/{l:020}-{l:020}.wseg"),
            first_lsn: l,
            last_lsn: l,
            index: vec![walcast_core::segment::IndexEntry {
                lsn: l,
                offset: walcast_core::segment::HEADER_LEN,
            }],
            ..one.clone()
        })
        .collect();
    many.committed_lsn = 3_641;
    many.generation = 3_641;
    many.tail = many
        .segments
        .iter()
        .map(|s| walcast_core::catalog::TailSegment {
            key: s.key.clone(),
            body: Vec::new(),
        })
        .collect();
    let err = Head::decode(&many.encode()).unwrap_err().to_string();
    assert!(err.contains("the tail carries over 262144 bytes"), "{err}");
    // Malformed base64 is a clear error too.
    let text = String::from_utf8(store.objects[HEAD_KEY].0.clone()).unwrap();
    let at = text.find("\"body\":\"").unwrap() + 8;
    let mut bad = text.clone();
    bad.insert(at, '!');
    let mut h2 = bad.into_bytes();
    let crc = crc32fast::hash(&h2[20..]);
    h2[10..18].copy_from_slice(format!("{crc:08x}").as_bytes());
    let err = Head::decode(&h2).unwrap_err().to_string();
    assert!(err.contains("base64"), "{err}");
}
