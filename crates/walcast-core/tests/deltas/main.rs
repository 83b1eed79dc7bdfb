//! Delta snapshots from the publisher: under steady random writes the head
//! names a base snapshot and a short chain of deltas over it; base plus
//! deltas equal the origin's state at the chain's end; deltas the chain
//! absorbed, and all deltas once a newer snapshot lands, are retired and
//! deleted. Prints the upload figures (write amplification).
//!
//! This file holds the store in memory that drives a publisher and answers
//! replicas, and the cold reads measured against it; the tests are in one
//! module per topic.

use std::collections::{BTreeMap, HashMap};

use walcast_core::batch::{self, Op};
use walcast_core::catalog::{object_kind, Head, HEAD_KEY, MAX_DELTAS, MAX_HEAD_BYTES};
use walcast_core::io::{ByteRange, ContentRange, GetRequest, GetResponse};
use walcast_core::publisher::{
    Action, Publisher, PublisherConfig, PutCondition, PutResponse, MAX_HEAD_FILTER_BYTES,
};
use walcast_core::replica::{self, Entries, LazyScan, Read, Replica, ReplicaConfig};
use walcast_core::snapshot::delta::{decode_delta, DeltaFooter, DeltaIndex, KeyFilter};
use walcast_core::snapshot::indexed::decode_indexed;

mod chain;
mod deferred;
mod figures;
mod head_limits;
mod hostile;
mod pointers;
mod retention;
mod snapshots;

#[derive(Default)]
struct Store {
    objects: HashMap<String, (Vec<u8>, u64)>,
    etag: u64,
    uploaded: BTreeMap<&'static str, u64>,
    deleted: Vec<String>,
    /// Head PUTs, and the bytes of their tails' base64 bodies.
    head_puts: u64,
    head_tail_bytes: u64,
    /// Bytes of the heads' members, by what they hold (see [`head_parts`]).
    head_parts: BTreeMap<&'static str, u64>,
    /// Errors the publishers reported.
    errors: u64,
}

/// A head's bytes split by what they hold: each part is what the head
/// would lose without it (tail copies, segment filters, the rest of the
/// segment entries, pages, deltas, the retired list, the snapshot entry);
/// `fixed` is the rest.
fn head_parts(h: &Head) -> Vec<(&'static str, u64)> {
    let mut h = h.clone();
    let mut last = h.encode().len() as u64;
    let mut out = Vec::new();
    let mut cut = |name: &'static str, h: &mut Head, f: &dyn Fn(&mut Head)| {
        f(h);
        let now = h.encode().len() as u64;
        out.push((name, last - now));
        last = now;
    };
    cut("tail", &mut h, &|h| h.tail.clear());
    cut("filters", &mut h, &|h| {
        h.segments.iter_mut().for_each(|s| s.filter = None)
    });
    cut("segments", &mut h, &|h| h.segments.clear());
    cut("pages", &mut h, &|h| h.pages.clear());
    cut("deltas", &mut h, &|h| h.deltas.clear());
    cut("retired", &mut h, &|h| h.retired.clear());
    cut("snapshot", &mut h, &|h| h.snapshot = None);
    out.push(("fixed", last));
    out
}

impl Store {
    fn drive(&mut self, p: &mut Publisher, now: u64) {
        loop {
            match p.poll(now) {
                Action::Put(req) => {
                    let cur = self.objects.get(&req.key).map(|(_, e)| e.to_string());
                    let ok = match &req.condition {
                        PutCondition::CreateOnly => cur.is_none(),
                        PutCondition::IfMatch(e) => cur.as_deref() == Some(e.as_str()),
                    };
                    if !ok {
                        p.handle_put(req.id, now, PutResponse::PreconditionFailed);
                        continue;
                    }
                    let kind = object_kind(&req.key).unwrap_or("head");
                    *self.uploaded.entry(kind).or_default() += req.body.len() as u64;
                    if kind == "head" {
                        self.head_puts += 1;
                        let h = Head::decode(&req.body).expect("the publisher's head decodes");
                        self.head_tail_bytes += h
                            .tail
                            .iter()
                            .map(|t| t.body.len().div_ceil(3) * 4)
                            .sum::<usize>() as u64;
                        for (part, n) in head_parts(&h) {
                            *self.head_parts.entry(part).or_default() += n;
                        }
                    }
                    self.etag += 1;
                    self.objects
                        .insert(req.key.clone(), (req.body.clone(), self.etag));
                    let etag = Some(self.etag.to_string());
                    p.handle_put(req.id, now, PutResponse::Ok { etag });
                }
                Action::Get(req) => {
                    let resp = match self.objects.get(&req.key) {
                        Some((b, e)) => GetResponse::Ok {
                            body: b.clone(),
                            etag: Some(e.to_string()),
                            range: None,
                        },
                        None => GetResponse::NotFound,
                    };
                    p.handle_get(req.id, now, resp);
                }
                Action::Delete(req) => {
                    self.objects.remove(&req.key);
                    self.deleted.push(req.key.clone());
                    p.handle_delete(req.id, now, Ok(()));
                }
                Action::Event(walcast_core::publisher::Event::Error(_)) => self.errors += 1,
                Action::Event(_) => {}
                Action::Wait { .. } => break,
            }
        }
    }

    /// A replica's GET, with ranges, counting GETs and bytes.
    fn serve(&self, g: &GetRequest, stats: &mut Cold) -> GetResponse {
        stats.gets += 1;
        if object_kind(&g.key) == Some("segment") {
            stats.segments += 1;
        }
        if std::env::var_os("DELTA_TRACE").is_some() {
            eprintln!("  GET {} {:?}", g.key, g.range);
        }
        let Some((body, etag)) = self.objects.get(&g.key) else {
            return GetResponse::NotFound;
        };
        let len = body.len() as u64;
        let (start, end) = match g.range {
            None => {
                stats.bytes += len;
                return GetResponse::Ok {
                    body: body.clone(),
                    etag: Some(etag.to_string()),
                    range: None,
                };
            }
            Some(ByteRange::Bounded { start, end }) => (start, end.min(len)),
            Some(ByteRange::Suffix(n)) => (len.saturating_sub(n), len),
        };
        stats.bytes += end - start;
        GetResponse::Ok {
            body: body[start as usize..end as usize].to_vec(),
            etag: None,
            range: Some(ContentRange {
                start,
                end,
                total: Some(len),
            }),
        }
    }

    fn head(&self) -> Head {
        Head::decode(&self.objects[HEAD_KEY].0).expect("a valid head")
    }
}

/// A publisher of `cfg` over an empty store, past its claim.
fn started(cfg: PublisherConfig) -> (Publisher, Store) {
    let mut p = Publisher::new(cfg, 7);
    let mut store = Store::default();
    store.drive(&mut p, 0);
    (p, store)
}

/// The origin's state after the batches `1..=lsn` of `log`.
fn model_at(log: &[Vec<Op>], lsn: u64) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut m = BTreeMap::new();
    for ops in &log[..lsn as usize] {
        for op in ops {
            match op {
                Op::Put { key, value } => {
                    m.insert(key.clone(), value.clone());
                }
                Op::Delete { key } => {
                    m.remove(key);
                }
            }
        }
    }
    m
}

/// Base snapshot plus the head's deltas, decoded from the store.
fn materialize(store: &Store, head: &Head) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let snap = head.snapshot.as_ref().expect("a snapshot");
    let (_, state) = decode_indexed(&store.objects[&snap.key].0, Some(snap.crc32)).unwrap();
    let mut m: BTreeMap<Vec<u8>, Vec<u8>> = state
        .iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect();
    for d in &head.deltas {
        let bytes = &store.objects[&d.key].0;
        assert_eq!(crc32fast::hash(bytes), d.crc32, "{}", d.key);
        let changes = match d.slots {
            Some(_) => pointer_changes(store, d),
            None => {
                let delta = decode_delta(bytes).unwrap();
                assert_eq!((delta.base_lsn, delta.header.lsn), (d.base_lsn, d.lsn));
                delta.changes
            }
        };
        assert_eq!(changes.len() as u64, d.entries);
        for (k, v) in changes {
            match v {
                Some(v) => {
                    m.insert(k, v);
                }
                None => {
                    m.remove(&k);
                }
            }
        }
    }
    m
}

/// A pointer delta's changes, in key order, its records read from the
/// store's segments.
fn pointer_changes(
    store: &Store,
    d: &walcast_core::catalog::DeltaEntry,
) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    use walcast_core::snapshot::block::{Block, BlockHandle};
    use walcast_core::snapshot::pointer::{decode_entries, resolve, Resolved};
    let bytes = &store.objects[&d.key].0;
    let size = bytes.len() as u64;
    let idx = DeltaIndex::decode_pointer_suffix(
        &bytes[(size - d.suffix_len) as usize..],
        size,
        d.lsn,
        d.epoch,
    )
    .unwrap();
    assert_eq!(idx.footer().base_lsn, d.base_lsn);
    let index_h = idx.footer().index;
    let index = Block::decode(
        &bytes[index_h.offset as usize..index_h.end() as usize],
        &index_h,
        "index",
    )
    .unwrap();
    let mut out = Vec::new();
    for (_, hb) in index.entries() {
        let h = BlockHandle::decode(hb, 0).unwrap();
        let b = Block::decode(&bytes[h.offset as usize..h.end() as usize], &h, "block").unwrap();
        for (k, p) in decode_entries(&b, d.base_lsn, d.lsn, d.epoch).unwrap() {
            let seg = &store.objects[&p.segment_key()].0;
            let r = p.range();
            match resolve(&seg[r.start as usize..r.end as usize], &p, &k).unwrap() {
                Resolved::Change(v) => out.push((k, v)),
                Resolved::NotHere => panic!("{}: {k:?} is not in its record", d.key),
            }
        }
    }
    out
}

/// What a cold full replica downloads, in bytes: the snapshot, the segments
/// after it (what a full replica replays today), the delta chain, and the
/// segments after the chain's end (what it would replay over the deltas).
fn full_cold_bytes(store: &Store, head: &Head) -> (u64, u64, u64, u64) {
    let Some(snap) = head.snapshot.as_ref() else {
        return (0, 0, 0, 0);
    };
    let end = head.delta_lsn().unwrap_or(snap.lsn);
    let mut entries: Vec<(u64, u64)> = head.segments.iter().map(|s| (s.last_lsn, s.size)).collect();
    let mut stack = head.pages.clone();
    while let Some(r) = stack.pop() {
        if r.last_lsn <= snap.lsn {
            continue;
        }
        let page = walcast_core::catalog::Page::decode(&store.objects[&r.key].0, &r).expect("page");
        entries.extend(page.segments.iter().map(|s| (s.last_lsn, s.size)));
        stack.extend(page.pages);
    }
    let after = |lsn: u64| {
        entries
            .iter()
            .filter(|(l, _)| *l > lsn)
            .map(|(_, s)| s)
            .sum::<u64>()
    };
    let deltas = head.deltas.iter().map(|d| d.size).sum();
    (snap.size, after(snap.lsn), deltas, after(end))
}

/// What a cold point read cost: round trips (GETs in flight together count
/// once), GETs and bytes, from a new replica to the answer.
#[derive(Debug, Default, Clone, Copy)]
struct Cold {
    rounds: u64,
    gets: u64,
    bytes: u64,
    /// Of the GETs, those of segments.
    segments: u64,
}

/// A new lazy replica reads `key`: the answer, the LSN it answered at, and
/// what it cost. As the JS driver does, the read waits for the first sync
/// to catch up with the head, then asks. Every GET the machine asks for in
/// one turn goes out together (one round trip).
fn cold_read(store: &Store, key: &[u8]) -> (Option<Vec<u8>>, u64, Cold) {
    try_cold_read(store, key).expect("a cold read")
}

/// [`cold_read`], with the read's error.
fn try_cold_read(
    store: &Store,
    key: &[u8],
) -> Result<(Option<Vec<u8>>, u64, Cold), walcast_core::Error> {
    try_cold_read_cached(store, key, 8 << 20)
}

/// [`try_cold_read`] with a cache of `cache` bytes.
fn try_cold_read_cached(
    store: &Store,
    key: &[u8],
    cache: u64,
) -> Result<(Option<Vec<u8>>, u64, Cold), walcast_core::Error> {
    let cfg = ReplicaConfig {
        poll_interval_ms: 1_000,
        lazy_cache_bytes: Some(cache),
        ..ReplicaConfig::default()
    };
    let mut r = Replica::new(cfg, 3);
    let mut c = Cold::default();
    let mut synced = false;
    for _ in 0..50 {
        let mut reqs = Vec::new();
        let drain = |r: &mut Replica, reqs: &mut Vec<GetRequest>, synced: &mut bool| loop {
            match r.poll(0) {
                walcast_core::replica::Action::Fetch(req) => reqs.push(req),
                walcast_core::replica::Action::Event(e) => {
                    *synced |= matches!(e, walcast_core::replica::Event::CaughtUp { .. });
                }
                walcast_core::replica::Action::Wait { .. } => break,
            }
        };
        drain(&mut r, &mut reqs, &mut synced);
        if synced {
            match r.get_lazy(key)? {
                Read::Ready(v) => return Ok((v, r.applied_lsn(), c)),
                Read::Pending => drain(&mut r, &mut reqs, &mut synced),
            }
        }
        assert!(!reqs.is_empty(), "a pending read asked for nothing");
        c.rounds += 1;
        if std::env::var_os("DELTA_TRACE").is_some() {
            eprintln!(" round {}", c.rounds);
        }
        store.answer(&mut r, reqs, &mut c);
    }
    panic!("a cold read did not finish");
}

/// A publisher of `cfg` over a new store that has loaded 20,000 keys
/// (`key:000000`, ...) in 20 batches of 1,000 puts of 100-byte values
/// (about 2.3 MB in 20 LSNs, at LSNs 1..=20 and times 1..=20) and finished
/// its uploads; with the batches and the time after them.
fn bulk_loaded(cfg: PublisherConfig) -> (Publisher, Store, Vec<Vec<Op>>, u64) {
    let (mut p, mut store) = started(cfg);
    let mut log = Vec::new();
    let now = bulk_load(&mut p, &mut store, &mut log);
    (p, store, log, now)
}

fn bulk_load(p: &mut Publisher, store: &mut Store, log: &mut Vec<Vec<Op>>) -> u64 {
    for chunk in 0..20u64 {
        let ops: Vec<Op> = (chunk * 1_000..(chunk + 1) * 1_000)
            .map(|i| {
                Op::put(
                    format!("key:{i:06}").into_bytes(),
                    vec![(i % 251) as u8; 100],
                )
            })
            .collect();
        p.push(chunk + 1, &batch::encode(&ops).unwrap(), chunk + 1)
            .unwrap();
        log.push(ops);
        store.drive(p, chunk + 1);
    }
    for t in 0..200 {
        store.drive(p, 21 + t);
    }
    221
}

/// Publishes 20,000 keys in 20 batches and a snapshot of them, with the
/// head carrying the snapshot's top index and footer when they take at most
/// `suffix_bytes`; returns the store and the batches.
fn published_snapshot(suffix_bytes: usize) -> (Store, Vec<Vec<Op>>) {
    let cfg = PublisherConfig {
        snapshot_every: Some(20),
        snapshot_suffix_bytes: suffix_bytes,
        snapshot_format: walcast_core::publisher::SnapshotFormat::Indexed(
            walcast_core::snapshot::indexed::IndexedOptions {
                block_bytes: 4 << 10,
                index_block_bytes: 1 << 10,
            },
        ),
        head_check_ms: 0,
        tail_bytes: 0,
        ..PublisherConfig::default()
    };
    let (_, store, log, _) = bulk_loaded(cfg);
    (store, log)
}

/// In `small_chain_store`, a key the delta `bytes` (ending at `lsn`) holds
/// and no later batch wrote, and its value there.
fn key_only_in(bytes: &[u8], lsn: u64) -> (Vec<u8>, Option<Vec<u8>>) {
    let later: Vec<Vec<u8>> = (lsn + 1..=180)
        .map(|l| format!("key:{:03}", l % 150).into_bytes())
        .collect();
    decode_delta(bytes)
        .unwrap()
        .changes
        .into_iter()
        .find(|(k, _)| !later.contains(k))
        .expect("a key only the delta has")
}

/// The index (and filter) of the delta file `bytes`.
fn delta_index(bytes: &[u8]) -> DeltaIndex {
    let size = bytes.len() as u64;
    let footer = DeltaFooter::decode(&bytes[bytes.len() - 64..], size).unwrap();
    DeltaIndex::decode_suffix(&bytes[footer.index.offset as usize..], size).unwrap()
}

/// A dataset of 180 single puts to 150 keys, a snapshot every 100 LSNs and
/// a delta every 50: a snapshot with a chain over it.
fn small_chain_store() -> Store {
    let cfg = PublisherConfig {
        snapshot_every: Some(100),
        delta_every: Some(50),
        head_check_ms: 0,
        tail_bytes: 0,
        max_commits_per_sec: 20,
        ..PublisherConfig::default()
    };
    let mut p = Publisher::new(cfg, 9);
    let mut store = Store::default();
    store.drive(&mut p, 0);
    for now in 1..=180u64 {
        let op = Op::put(
            format!("key:{:03}", now % 150).into_bytes(),
            vec![now as u8; 50],
        );
        p.push(now, &batch::encode(&[op]).unwrap(), now).unwrap();
        store.drive(&mut p, now);
    }
    for t in 181..1_000 {
        store.drive(&mut p, t);
    }
    store
}

/// A get through a lazy replica, answering its GETs, within 50 turns.
fn read_through(r: &mut Replica, store: &Store, k: &[u8]) -> Option<Option<Vec<u8>>> {
    for _ in 0..50 {
        match r.get_lazy(k).unwrap() {
            Read::Ready(v) => return Some(v),
            Read::Pending => {
                let reqs = collect(r);
                store.answer(r, reqs, &mut Cold::default());
            }
        }
    }
    None
}

/// 20,000 keys loaded and snapshotted, then 4,800 new keys in batches of
/// 100 (the `n`th key's value is 100 bytes of `n / 100`), a delta every
/// 96 KiB of batches: a chain of several deltas of several blocks.
fn new_keys_over_a_chain() -> (Store, Vec<Vec<u8>>) {
    let (mut p, mut store, mut lsn, mut now) = loaded(PublisherConfig {
        delta_bytes: Some(96 << 10),
        ..cfg_filters()
    });
    let mut keys = Vec::new();
    for batch_no in 0..48u64 {
        let ops: Vec<Op> = (0..100u64)
            .map(|i| {
                let k = format!("new:{i:03}:{batch_no:03}").into_bytes();
                keys.push(k.clone());
                Op::put(k, vec![batch_no as u8; 100])
            })
            .collect();
        push_and_drive(&mut p, &mut store, (&mut lsn, &mut now), &ops, (20, 100));
    }
    let h = store.head();
    assert!(h.deltas.len() >= 2, "{:?}", h.deltas);
    (store, keys)
}

impl Store {
    fn max_head(&self) -> usize {
        self.objects.get(HEAD_KEY).map_or(0, |(b, _)| b.len())
    }

    /// Serves `reqs` and hands `r` their answers.
    fn answer(&self, r: &mut Replica, reqs: impl IntoIterator<Item = GetRequest>, c: &mut Cold) {
        for req in reqs {
            let resp = self.serve(&req, c);
            r.handle_response(req.id, 0, resp);
        }
    }
}

fn cfg_filters() -> PublisherConfig {
    PublisherConfig {
        snapshot_every: Some(1_000_000),
        snapshot_bytes: Some(1 << 20),
        delta_every: Some(1_000_000),
        head_check_ms: 0,
        tail_bytes: 0,
        max_commits_per_sec: 0,
        ..PublisherConfig::default()
    }
}

/// Pushes `ops` as the batch after `lsn`, a millisecond after `now`, then
/// drives the publisher `rounds` times, `step` ms apart (`lsn` and `now`
/// move on).
fn push_and_drive(
    p: &mut Publisher,
    store: &mut Store,
    (lsn, now): (&mut u64, &mut u64),
    ops: &[Op],
    (rounds, step): (usize, u64),
) {
    *lsn += 1;
    *now += 1;
    p.push(*lsn, &batch::encode(ops).unwrap(), *now).unwrap();
    for _ in 0..rounds {
        *now += step;
        store.drive(p, *now);
    }
}

/// Publisher with a snapshot after a 2.3 MB bulk load (keys key:000000..).
fn loaded(cfg: PublisherConfig) -> (Publisher, Store, u64, u64) {
    let (mut p, mut store) = started(cfg);
    let mut lsn = 0;
    for chunk in 0..20u64 {
        let ops: Vec<Op> = (chunk * 1_000..(chunk + 1) * 1_000)
            .map(|i| Op::put(format!("key:{i:06}").into_bytes(), vec![1u8; 100]))
            .collect();
        lsn += 1;
        p.push(lsn, &batch::encode(&ops).unwrap(), chunk + 1)
            .unwrap();
        store.drive(&mut p, chunk + 1);
    }
    for t in 0..200 {
        store.drive(&mut p, 21 + t);
    }
    (p, store, lsn, 221)
}

fn put(p: &mut Publisher, store: &mut Store, lsn: &mut u64, now: &mut u64, k: &[u8], v: &[u8]) {
    *lsn += 1;
    let payload = batch::encode(&[Op::put(k.to_vec(), v.to_vec())]).unwrap();
    p.push(*lsn, &payload, *now).unwrap();
    for _ in 0..20 {
        *now += 100;
        store.drive(p, *now);
    }
}

fn lazy_replica() -> Replica {
    Replica::new(
        ReplicaConfig {
            lazy_cache_bytes: Some(8 << 20),
            long_poll_wait_ms: 0,
            ..ReplicaConfig::default()
        },
        3,
    )
}

/// Drains the replica, serving every GET at once, until it waits.
/// A lazy replica with a cache of `cache` bytes, synced with `store`.
fn settled_with_cache(store: &Store, cache: u64) -> Replica {
    let mut r = Replica::new(
        ReplicaConfig {
            lazy_cache_bytes: Some(cache),
            long_poll_wait_ms: 0,
            ..ReplicaConfig::default()
        },
        3,
    );
    r.sync_now(0);
    settle(&mut r, store);
    r
}

fn settle(r: &mut Replica, store: &Store) {
    settle_watching(r, store, |_| {});
}

/// [`settle`], calling `each` with the replica after every step.
fn settle_watching(r: &mut Replica, store: &Store, mut each: impl FnMut(&Replica)) {
    let mut c = Cold::default();
    for _ in 0..10_000 {
        match r.poll(0) {
            replica::Action::Fetch(req) => {
                let resp = store.serve(&req, &mut c);
                r.handle_response(req.id, 0, resp);
            }
            replica::Action::Event(_) => {}
            replica::Action::Wait { .. } => return,
        }
        each(r);
    }
    panic!("replica did not settle");
}

/// Drains the replica, returning the GETs it asks for (not served).
fn collect(r: &mut Replica) -> Vec<GetRequest> {
    let mut v = Vec::new();
    loop {
        match r.poll(0) {
            replica::Action::Fetch(req) => v.push(req),
            replica::Action::Event(_) => {}
            replica::Action::Wait { .. } => return v,
        }
    }
}

/// The origin commits once more and `r` reads the new head: its segment is
/// deferred (no read waits).
fn next_head_defers(
    p: &mut Publisher,
    store: &mut Store,
    lsn: &mut u64,
    now: &mut u64,
    r: &mut Replica,
) {
    let deferred = r.status(0).lazy.unwrap().deferred_segments;
    put(p, store, lsn, now, b"cold", b"c");
    r.sync_now(0);
    settle(r, store);
    assert_eq!(r.applied_lsn(), *lsn);
    assert_eq!(r.status(0).lazy.unwrap().deferred_segments, deferred + 1);
}

/// Reads `key` lazily, serving every GET, until it is answered or fails.
fn read_settled(
    r: &mut Replica,
    store: &Store,
    key: &[u8],
) -> Result<Option<Vec<u8>>, walcast_core::Error> {
    for _ in 0..20 {
        match r.get_lazy(key)? {
            Read::Ready(v) => return Ok(v),
            Read::Pending => settle(r, store),
        }
    }
    panic!("a read stayed pending");
}
