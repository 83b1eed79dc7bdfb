//! Lazy replicas: adopt a block-indexed snapshot without downloading it,
//! replay only the tail into an overlay, and answer point reads and ordered
//! scans from one state at the applied LSN, fetching only the blocks a read
//! needs.

#[path = "support/fixtures.rs"]
mod fixtures;

use std::collections::HashMap;

use fixtures::{build_segment, state_through, DATASET};
use walcast_core::catalog::{snapshot_key, Head, SegmentEntry, SnapshotEntry, HEAD_KEY};
use walcast_core::io::{ByteRange, ContentRange, GetRequest, GetResponse};
use walcast_core::replica::{Action, Event, LazyScan, Read, Replica, ReplicaConfig};
use walcast_core::snapshot::indexed::{encode_indexed, IndexedOptions};
use walcast_core::state::KvState;

#[derive(Default)]
struct Store {
    objects: HashMap<String, Vec<u8>>,
    gets: u64,
    bytes: u64,
}

impl Store {
    fn serve(&mut self, g: &GetRequest) -> GetResponse {
        self.gets += 1;
        let Some(body) = self.objects.get(&g.key) else {
            return GetResponse::NotFound;
        };
        let len = body.len() as u64;
        let (start, end) = match g.range {
            None => {
                self.bytes += len;
                return GetResponse::Ok {
                    body: body.clone(),
                    etag: Some(format!("\"{:08x}\"", crc32fast::hash(body))),
                    range: None,
                };
            }
            Some(ByteRange::Bounded { start, end }) => (start, end.min(len)),
            Some(ByteRange::Suffix(n)) => (len.saturating_sub(n), len),
        };
        self.bytes += end - start;
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
}

/// A dataset of segments through `last`, a version 2 snapshot at `snap`,
/// history from `snap + 1` on.
fn dataset(last: u64, snap: u64, block_bytes: usize) -> Store {
    dataset_from(last, snap, block_bytes, snap + 1)
}

/// Like [`dataset`], with segments from `first` on (history before the
/// snapshot kept when `first <= snap`).
fn dataset_from(last: u64, snap: u64, block_bytes: usize, first: u64) -> Store {
    let mut store = Store::default();
    let mut head = Head::new(DATASET, 1);
    let mut first = first;
    while first <= last {
        let end = (first + 6).min(last);
        let (bytes, summary) = build_segment(1, first, end, 64);
        let e = SegmentEntry::from_summary(&summary);
        store.objects.insert(e.key.clone(), bytes);
        head.segments.push(e);
        first = end + 1;
    }
    let st = state_through(1, snap);
    let bytes = encode_indexed(
        &st,
        snap,
        1,
        DATASET,
        IndexedOptions {
            block_bytes,
            index_block_bytes: block_bytes,
        },
    );
    let entry = SnapshotEntry {
        key: snapshot_key(snap, 1),
        lsn: snap,
        epoch: 1,
        size: bytes.len() as u64,
        crc32: crc32fast::hash(&bytes),
        entries: st.len(),
        version: 2,
        suffix: None,
        footer_crc32: None,
    };
    store.objects.insert(entry.key.clone(), bytes);
    head.snapshot = Some(entry);
    head.earliest_lsn = head.segments.first().map_or(snap + 1, |s| s.first_lsn);
    head.committed_lsn = last;
    head.generation = last;
    store.objects.insert(HEAD_KEY.into(), head.encode());
    store
}

/// Makes `store`'s snapshot (at `snap`) a version 1 snapshot of the same
/// state, which lazy replicas read whole.
fn to_version_1(store: &mut Store, snap: u64) {
    let mut head = Head::decode(&store.objects[HEAD_KEY]).unwrap();
    let v1 = walcast_core::snapshot::encode(&state_through(1, snap), snap, 1, DATASET);
    let entry = head.snapshot.as_mut().unwrap();
    entry.version = 1;
    entry.size = v1.len() as u64;
    entry.crc32 = crc32fast::hash(&v1);
    store.objects.insert(entry.key.clone(), v1);
    store.objects.insert(HEAD_KEY.into(), head.encode());
}

/// A dataset `id` of one version 2 snapshot of `st` at `lsn`, nothing after.
fn snapshot_only(id: walcast_core::catalog::DatasetId, st: &KvState, lsn: u64) -> Store {
    snapshot_only_in(id, st, lsn, 128)
}

/// [`snapshot_only`] with data blocks of about `block_bytes`.
fn snapshot_only_in(
    id: walcast_core::catalog::DatasetId,
    st: &KvState,
    lsn: u64,
    block_bytes: usize,
) -> Store {
    let mut store = Store::default();
    let bytes = encode_indexed(
        st,
        lsn,
        1,
        id,
        IndexedOptions {
            block_bytes,
            index_block_bytes: 128,
        },
    );
    let mut head = Head::new(id, 1);
    head.snapshot = Some(SnapshotEntry {
        key: snapshot_key(lsn, 1),
        lsn,
        epoch: 1,
        size: bytes.len() as u64,
        crc32: crc32fast::hash(&bytes),
        entries: st.len(),
        version: 2,
        suffix: None,
        footer_crc32: None,
    });
    head.earliest_lsn = lsn + 1;
    head.committed_lsn = lsn;
    head.generation = lsn;
    store.objects.insert(snapshot_key(lsn, 1), bytes);
    store.objects.insert(HEAD_KEY.into(), head.encode());
    store
}

fn lazy_cfg(cache: u64) -> ReplicaConfig {
    ReplicaConfig {
        poll_interval_ms: 100,
        retry_base_ms: 10,
        lazy_cache_bytes: Some(cache),
        ..ReplicaConfig::default()
    }
}

/// Drains `poll`, answering every fetch, until the machine waits.
fn drain(r: &mut Replica, store: &mut Store, now: u64) {
    drain_events(r, store, now);
}

/// [`drain`], returning the events the machine raised.
fn drain_events(r: &mut Replica, store: &mut Store, now: u64) -> Vec<Event> {
    let mut events = Vec::new();
    for _ in 0..10_000 {
        match r.poll(now) {
            Action::Fetch(req) => {
                let resp = store.serve(&req);
                r.handle_response(req.id, now, resp);
            }
            Action::Event(e) => events.push(e),
            Action::Wait { .. } => return events,
        }
    }
    panic!("poll did not settle");
}

/// A lazy replica of a dataset at LSN 70 (its snapshot at 60, 128-byte
/// blocks), opened; then a byte in the middle of the snapshot (a data
/// block) is flipped. Returns the snapshot's key and its sound bytes too.
fn opened_over_a_damaged_block() -> (Store, Replica, String, Vec<u8>) {
    let mut store = dataset(70, 60, 128);
    let key = snapshot_key(60, 1);
    let mut r = Replica::new(lazy_cfg(1 << 20), 4);
    drain(&mut r, &mut store, 0);
    let good = store.objects[&key].clone();
    let mut bad = good.clone();
    let mid = bad.len() / 3;
    bad[mid] ^= 0x40;
    store.objects.insert(key.clone(), bad);
    (store, r, key, good)
}

fn get(r: &mut Replica, store: &mut Store, key: &[u8]) -> Option<Vec<u8>> {
    for _ in 0..10 {
        match r.get_lazy(key).expect("read") {
            Read::Ready(v) => return v,
            Read::Pending => drain(r, store, 0),
        }
    }
    panic!("a read stayed pending");
}

fn scan(r: &mut Replica, store: &mut Store, mut s: LazyScan) -> Vec<(Vec<u8>, Vec<u8>)> {
    scan_in(r, store, &mut s)
}

/// [`scan`], keeping the scan (what it holds between calls) for the caller.
fn scan_in(r: &mut Replica, store: &mut Store, s: &mut LazyScan) -> Vec<(Vec<u8>, Vec<u8>)> {
    for _ in 0..10_000 {
        match r.scan_lazy(s).expect("scan") {
            Read::Ready(v) => return v,
            Read::Pending => drain(r, store, 0),
        }
    }
    panic!("a scan stayed pending");
}

fn keys(st: &KvState) -> Vec<Vec<u8>> {
    let mut k: Vec<Vec<u8>> = st.iter().map(|(k, _)| k.to_vec()).collect();
    k.extend((0..30u64).map(|i| format!("key/{i:03}").into_bytes()));
    k.push(b"absent".to_vec());
    k
}

/// Every probe key and a whole scan, read lazily, equal `want`.
fn reads_equal(r: &mut Replica, store: &mut Store, want: &KvState) {
    for k in keys(want) {
        assert_eq!(get(r, store, &k).as_deref(), want.get(&k), "{k:?}");
    }
    let all: Vec<_> = want.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
    assert_eq!(scan(r, store, LazyScan::new(b"", None, 10_000)), all);
}

#[test]
fn a_cold_lazy_replica_reads_the_origin_state_without_the_snapshot() {
    let mut store = dataset(90, 60, 128);
    let snapshot_size = store
        .objects
        .iter()
        .find(|(k, _)| k.starts_with("snapshots/"))
        .map(|(_, v)| v.len() as u64)
        .unwrap();
    let mut r = Replica::new(lazy_cfg(1 << 20), 1);
    drain(&mut r, &mut store, 0);
    assert_eq!(r.applied_lsn(), 90);
    // Catching up read the head and the tail's segments, no snapshot byte.
    assert!(store.bytes < 90 * 200, "{} bytes", store.bytes);
    let want = state_through(1, 90);
    let before = (store.gets, store.bytes);
    assert_eq!(
        get(&mut r, &mut store, b"key/005").as_deref(),
        want.get(b"key/005")
    );
    let point = (store.gets - before.0, store.bytes - before.1);
    assert!(point.0 <= 3, "a cold point read took {} GETs", point.0);
    assert!(point.1 < snapshot_size, "{point:?} of {snapshot_size}");
    for k in keys(&want) {
        assert_eq!(
            get(&mut r, &mut store, &k).as_deref(),
            want.get(&k),
            "{k:?}"
        );
    }
    let st = r.status(0);
    assert!(st.lazy.unwrap().blocks_fetched > 0);
}

#[test]
fn lazy_scans_merge_the_overlay_with_the_snapshot() {
    let mut store = dataset(120, 70, 96);
    // A cache smaller than any scan of the snapshot.
    let mut r = Replica::new(lazy_cfg(300), 2);
    drain(&mut r, &mut store, 0);
    let want = state_through(1, 120);
    let all: Vec<_> = want.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
    for limit in [0, 1, 3, 10, 1000] {
        let got = scan(&mut r, &mut store, LazyScan::new(b"", None, limit));
        assert_eq!(
            got,
            all.iter().take(limit).cloned().collect::<Vec<_>>(),
            "limit {limit}"
        );
    }
    for (a, b) in [
        (&b"key/003"[..], Some(&b"key/017"[..])),
        (b"key/010", None),
        (b"\x00", Some(&b"key"[..])),
    ] {
        let got = scan(&mut r, &mut store, LazyScan::new(a, b, 1000));
        let want: Vec<_> = all
            .iter()
            .filter(|(k, _)| k.as_slice() >= a && b.is_none_or(|b| k.as_slice() < b))
            .cloned()
            .collect();
        assert_eq!(got, want, "{a:?}..{b:?}");
    }
    let got = scan(&mut r, &mut store, LazyScan::prefix(b"key/01", 1000));
    let want: Vec<_> = all
        .iter()
        .filter(|(k, _)| k.starts_with(b"key/01"))
        .cloned()
        .collect();
    assert_eq!(got, want);
    // Inverted bounds: empty, never a panic.
    assert!(scan(&mut r, &mut store, LazyScan::new(b"z", Some(b"a"), 10)).is_empty());
}

#[test]
fn a_newer_snapshot_moves_the_base_without_mixing_states() {
    let mut store = dataset(80, 40, 128);
    let mut r = Replica::new(lazy_cfg(1 << 20), 3);
    drain(&mut r, &mut store, 0);
    assert_eq!(r.applied_lsn(), 80);
    let _ = get(&mut r, &mut store, b"key/001");
    // The publisher moves on: a snapshot at 100 and history to 110.
    let newer = dataset(110, 100, 128);
    store.objects.extend(newer.objects);
    drain(&mut r, &mut store, 1_000);
    assert_eq!(r.applied_lsn(), 110);
    let want = state_through(1, 110);
    reads_equal(&mut r, &mut store, &want);
}

/// Reads every probe key of `want` lazily: each answer equals `want`, each
/// failure is a `data` error naming `object` whose text holds `says`.
/// Returns how many reads failed.
fn data_errors_naming(
    r: &mut Replica,
    store: &mut Store,
    want: &KvState,
    object: &str,
    says: &str,
) -> usize {
    let mut errors = 0;
    for k in keys(want) {
        loop {
            match r.get_lazy(&k) {
                Ok(Read::Pending) => drain(r, store, 0),
                Ok(Read::Ready(v)) => {
                    assert_eq!(v.as_deref(), want.get(&k), "{k:?}");
                    break;
                }
                Err(e) => {
                    assert_eq!(e.kind(), walcast_core::ErrorKind::Data, "{e}");
                    assert_eq!(e.object(), Some(object));
                    assert!(e.to_string().contains(says), "{e}");
                    errors += 1;
                    break;
                }
            }
        }
    }
    errors
}

#[test]
fn a_damaged_block_is_a_data_error_and_reads_go_on() {
    let (mut store, mut r, key, good) = opened_over_a_damaged_block();
    let at_70 = state_through(1, 70);
    // A read of a sound block is right, and never carries another block's
    // failure.
    let saw_error = data_errors_naming(&mut r, &mut store, &at_70, &key, "") > 0;
    assert!(saw_error, "the damaged block was never read");
    // Repaired: every read is right again.
    store.objects.insert(key, good);
    let want = state_through(1, 70);
    for k in keys(&want) {
        assert_eq!(
            get(&mut r, &mut store, &k).as_deref(),
            want.get(&k),
            "{k:?}"
        );
    }
}

/// Reads of a block that keeps failing answer with the error each time,
/// and raise no error event: an event would end a sync (or a native open)
/// running beside them, which the block has nothing to do with.
#[test]
fn failing_block_reads_raise_no_error_event() {
    let (mut store, mut r, _, _) = opened_over_a_damaged_block();
    let at_70 = state_through(1, 70);
    let mut read_errors = 0;
    let mut events = Vec::new();
    for _ in 0..6 {
        for k in keys(&at_70) {
            for _ in 0..10 {
                match r.get_lazy(&k) {
                    Ok(Read::Pending) => events.extend(drain_events(&mut r, &mut store, 0)),
                    Ok(Read::Ready(_)) => break,
                    Err(_) => {
                        read_errors += 1;
                        break;
                    }
                }
            }
        }
    }
    assert!(read_errors >= 6, "{read_errors} read errors");
    let errors: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, Event::Error(_)))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    assert!(r.status(0).last_error.is_some());
}

/// A replica restored in lazy mode from a full state at LSN 70 keeps it as
/// its base when the only snapshot is older (LSN 60): the writes 61..=70
/// live in that state, not in the snapshot.
#[test]
fn a_restored_state_is_not_replaced_by_an_older_snapshot() {
    let mut store = dataset_from(90, 60, 128, 1);
    let mut r = Replica::restore(lazy_cfg(1 << 20), 5, state_through(1, 70), 70, DATASET, 1);
    drain(&mut r, &mut store, 0);
    assert_eq!(r.applied_lsn(), 90);
    let want = state_through(1, 90);
    reads_equal(&mut r, &mut store, &want);
}

/// The same with an empty restored state (every key deleted by LSN 70):
/// an empty state is no licence to take the older snapshot, which would
/// bring back keys deleted after it. Reads answer the restored state and
/// the writes after it.
#[test]
fn an_empty_restored_state_is_not_replaced_by_an_older_snapshot() {
    let mut store = dataset_from(90, 60, 128, 1);
    let mut r = Replica::restore(lazy_cfg(1 << 20), 5, KvState::new(), 70, DATASET, 1);
    drain(&mut r, &mut store, 0);
    assert_eq!(r.applied_lsn(), 90);
    let want = state_through(71, 90);
    reads_equal(&mut r, &mut store, &want);
    // Keys of the snapshot written at none of 71..=90 answer nothing.
    let gone: Vec<_> = keys(&state_through(1, 60))
        .into_iter()
        .filter(|k| want.get(k).is_none())
        .collect();
    assert!(!gone.is_empty());
    for k in gone {
        assert_eq!(get(&mut r, &mut store, &k), None, "{k:?}");
    }
}

/// A snapshot file whose footer counts other entries than the catalog
/// states (another file of the same size, left by a dataset started over at
/// the prefix) is a `data` error naming it: nothing of it is served.
#[test]
fn a_snapshot_unlike_its_catalog_entry_is_not_read() {
    let mut store = dataset(70, 60, 128);
    let key = snapshot_key(60, 1);
    let mut head = Head::decode(&store.objects[HEAD_KEY]).unwrap();
    head.snapshot.as_mut().unwrap().entries += 1;
    store.objects.insert(HEAD_KEY.into(), head.encode());
    let mut r = Replica::new(lazy_cfg(1 << 20), 4);
    drain(&mut r, &mut store, 0);
    let at_70 = state_through(1, 70);
    // Only what the overlay (LSNs 61..=70) holds is answered.
    let errors = data_errors_naming(&mut r, &mut store, &at_70, &key, "the catalog says");
    assert!(
        errors > 0,
        "the snapshot was read as if it were the catalog's"
    );
}

/// A block GET in flight when the dataset is started over at the prefix
/// (same keys, other bytes) is not taken for the same GET asked again of
/// the new dataset: its answer is dropped, and reads serve the new state.
#[test]
fn a_block_answer_from_the_dataset_before_a_reset_is_dropped() {
    let old_state = state_through(1, 60);
    // The same keys and sizes, other values.
    let mut new_state = KvState::new();
    for (k, v) in old_state.iter() {
        let v: Vec<u8> = v.iter().map(|b| b ^ 1).collect();
        new_state.put(&k, &v);
    }
    let mut store = snapshot_only(DATASET, &old_state, 600);
    let mut r = Replica::new(lazy_cfg(1 << 20), 6);
    drain(&mut r, &mut store, 0);
    let key = old_state.iter().next().map(|(k, _)| k.to_vec()).unwrap();
    // A read's first GET goes out; its answer (the old bytes) is held.
    assert!(matches!(r.get_lazy(&key), Ok(Read::Pending)));
    let Action::Fetch(old_req) = r.poll(0) else {
        panic!("no block GET");
    };
    let old_resp = store.serve(&old_req);
    // The dataset starts over: another id, the same object keys.
    let mut store = snapshot_only(
        walcast_core::catalog::DatasetId([0x22; 16]),
        &new_state,
        600,
    );
    drain(&mut r, &mut store, 10_000);
    assert!(matches!(r.get_lazy(&key), Ok(Read::Pending)));
    let Action::Fetch(new_req) = r.poll(10_000) else {
        panic!("no block GET after the reset");
    };
    assert_eq!(
        (&new_req.key, &new_req.range),
        (&old_req.key, &old_req.range)
    );
    // The old answer arrives first.
    r.handle_response(old_req.id, 10_000, old_resp);
    let resp = store.serve(&new_req);
    r.handle_response(new_req.id, 10_000, resp);
    for k in keys(&new_state) {
        assert_eq!(
            get(&mut r, &mut store, &k).as_deref(),
            new_state.get(&k),
            "{k:?}"
        );
    }
}

/// A lazy replica whose base is followed by a snapshot it cannot read by
/// blocks (version 1) loads that one whole, keeping the writes after it:
/// the old base is retired, and deleted after its grace period.
#[test]
fn a_base_followed_by_a_version_1_snapshot_is_left_before_it_is_deleted() {
    let mut store = dataset(80, 40, 128);
    let mut r = Replica::new(lazy_cfg(1 << 20), 3);
    drain(&mut r, &mut store, 0);
    assert_eq!(r.applied_lsn(), 80);
    let _ = get(&mut r, &mut store, b"key/001");
    // The publisher (an older one) writes a version 1 snapshot at 70 and
    // history to 110; every segment after 40 is still there.
    let mut newer = dataset_from(110, 70, 128, 41);
    to_version_1(&mut newer, 70);
    store.objects.extend(newer.objects);
    drain(&mut r, &mut store, 1_000);
    assert_eq!(r.applied_lsn(), 110);
    drain(&mut r, &mut store, 2_000);
    // Loaded whole, with the overlay on top: the LSN never went back.
    assert_eq!(r.applied_lsn(), 110);
    // The grace period of the snapshot at 40 ends.
    store.objects.remove(&snapshot_key(40, 1));
    let want = state_through(1, 110);
    reads_equal(&mut r, &mut store, &want);
}

/// A whole load of a version 1 snapshot under way, while the old base's
/// snapshot is deleted: a read of one of its blocks meets a 404, which
/// makes the replica read the head again, and neither starts the load over
/// (it would start over for as long as reads come, and never end) nor
/// raises an error event.
#[test]
fn a_read_that_meets_a_deleted_block_does_not_start_a_whole_load_over() {
    let mut cfg = lazy_cfg(1 << 20);
    cfg.snapshot_window = 64;
    let mut store = dataset(80, 40, 128);
    let mut r = Replica::new(cfg, 3);
    drain(&mut r, &mut store, 0);
    let mut newer = dataset_from(110, 70, 128, 41);
    to_version_1(&mut newer, 70);
    store.objects.extend(newer.objects);
    let v1 = snapshot_key(70, 1);
    assert!(
        store.objects[&v1].len() > 4 * 64,
        "a load of several windows: {}",
        store.objects[&v1].len()
    );
    let base = snapshot_key(40, 1);
    store.objects.remove(&base);
    let (mut starts, mut events, mut reads, mut missing) = (Vec::new(), Vec::new(), 0, 0);
    let mut now = 1_000;
    for _ in 0..100_000 {
        match r.poll(now) {
            Action::Fetch(req) => {
                if req.key == v1 {
                    if let Some(ByteRange::Bounded { start, .. }) = req.range {
                        starts.push(start);
                    }
                }
                missing += u32::from(req.key == base);
                let resp = store.serve(&req);
                r.handle_response(req.id, now, resp);
                // Between the load's windows, a read of a block of the
                // deleted base.
                if req.key == v1 && reads < 3 {
                    reads += 1;
                    // Written at LSN 5, 10, 15 only: in the base alone.
                    let _ = r.get_lazy(&[0, 5 * reads, 0xff]);
                }
            }
            Action::Event(e) => events.push(e),
            Action::Wait { .. } => {
                if r.applied_lsn() == 110 && starts.len() > 1 {
                    break;
                }
                now += 100;
            }
        }
    }
    assert!(missing > 0, "no read met the deleted snapshot");
    assert!(
        starts.windows(2).all(|w| w[0] < w[1]),
        "the load started over: windows at {starts:?}"
    );
    let errors: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, Event::Error(_)))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(r.applied_lsn(), 110);
    reads_equal(&mut r, &mut store, &state_through(1, 110));
}

/// A scan in progress when the dataset is started over at the prefix
/// (another id, the same snapshot key, other bytes) must not keep the
/// entries it collected from the old dataset's snapshot.
#[test]
fn a_scan_across_a_dataset_reset_returns_only_the_new_state() {
    // Enough blocks that three rounds of the scan (reading ahead) do not
    // finish it.
    let old_state = state_through(1, 600);
    let mut new_state = KvState::new();
    for (k, v) in old_state.iter() {
        // Every value differs from the old one (some old values are empty).
        let v: Vec<u8> = v.iter().map(|b| b ^ 1).chain([1]).collect();
        new_state.put(&k, &v);
    }
    let mut store = snapshot_only(DATASET, &old_state, 600);
    let mut r = Replica::new(lazy_cfg(1 << 20), 6);
    drain(&mut r, &mut store, 0);
    let mut s = LazyScan::new(b"", None, 10_000);
    // A few rounds of the scan against the old dataset: some of its
    // entries are collected, the scan is not finished.
    for _ in 0..3 {
        assert!(matches!(r.scan_lazy(&mut s), Ok(Read::Pending)));
        drain(&mut r, &mut store, 0);
    }
    // The dataset starts over: another id, the same object keys.
    let mut store = snapshot_only(
        walcast_core::catalog::DatasetId([0x22; 16]),
        &new_state,
        600,
    );
    drain(&mut r, &mut store, 10_000);
    assert_eq!(
        r.dataset_id(),
        Some(walcast_core::catalog::DatasetId([0x22; 16]))
    );
    let got = scan(&mut r, &mut store, s);
    let want: Vec<_> = new_state
        .iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect();
    let stale = got
        .iter()
        .filter(|(k, v)| old_state.get(k) == Some(v.as_slice()))
        .count();
    assert_eq!(
        stale, 0,
        "{stale} entries of the old dataset's snapshot returned"
    );
    assert_eq!(got, want);
}

/// A head that misstates its snapshot's entry count (or size, or footer
/// CRC), then the store turns honest: the same snapshot key with the true
/// figures. Reads must then be answered from the honest entry, not fail
/// for as long as no newer snapshot is published.
#[test]
fn a_base_adopted_from_a_lying_head_is_replaced_by_the_honest_entry() {
    let mut store = dataset(80, 40, 128);
    let honest = store.objects[HEAD_KEY].clone();
    let mut head = Head::decode(&honest).unwrap();
    head.snapshot.as_mut().unwrap().entries += 1;
    store.objects.insert(HEAD_KEY.into(), head.encode());
    let mut r = Replica::new(lazy_cfg(1 << 20), 3);
    drain(&mut r, &mut store, 0);
    assert_eq!(r.applied_lsn(), 80);
    // A key only the snapshot holds: the read needs its footer, which
    // does not count the entries the head claims.
    let want = state_through(1, 80);
    let key = keys(&want)
        .into_iter()
        .find(|k| want.get(k).is_some() && state_through(41, 80).get(k).is_none())
        .expect("a key only the snapshot holds");
    assert!(matches!(r.get_lazy(&key), Ok(Read::Pending)));
    drain(&mut r, &mut store, 0);
    assert!(r.get_lazy(&key).is_err(), "the lie is found");
    // The store turns honest.
    store.objects.insert(HEAD_KEY.into(), honest);
    for t in 1..=5 {
        drain(&mut r, &mut store, t * 10_000);
    }
    assert_eq!(r.applied_lsn(), 80);
    let mut got = None;
    for _ in 0..10 {
        match r.get_lazy(&key) {
            Ok(Read::Ready(v)) => {
                got = Some(Ok(v));
                break;
            }
            Ok(Read::Pending) => drain(&mut r, &mut store, 60_000),
            Err(e) => got = Some(Err(e.to_string())),
        }
    }
    assert_eq!(got, Some(Ok(want.get(&key).map(<[u8]>::to_vec))), "{key:?}");
}

/// A full replica bootstrapping from a head that misstates its snapshot's
/// entry count, then the store turns honest (the same snapshot key and
/// CRC-32, the true count): the load must go on with the honest entry,
/// not retry the lying one for as long as the snapshot stays the newest.
#[test]
fn a_bootstrap_started_from_a_lying_head_takes_the_honest_entry() {
    let mut store = dataset(80, 40, 128);
    let honest = store.objects[HEAD_KEY].clone();
    let mut head = Head::decode(&honest).unwrap();
    head.snapshot.as_mut().unwrap().entries += 1;
    store.objects.insert(HEAD_KEY.into(), head.encode());
    let cfg = ReplicaConfig {
        lazy_cache_bytes: None,
        ..lazy_cfg(0)
    };
    let mut r = Replica::new(cfg, 3);
    drain(&mut r, &mut store, 0);
    assert_eq!(r.applied_lsn(), 0, "the lying entry is refused");
    // The store turns honest.
    store.objects.insert(HEAD_KEY.into(), honest);
    let mut head_reads = 0;
    for t in 1..=50 {
        let now = t * 10_000;
        for _ in 0..1000 {
            match r.poll(now) {
                Action::Fetch(req) => {
                    head_reads += u32::from(req.key == HEAD_KEY);
                    let resp = store.serve(&req);
                    r.handle_response(req.id, now, resp);
                }
                Action::Event(_) => {}
                Action::Wait { .. } => break,
            }
        }
    }
    assert!(
        head_reads >= 5,
        "the honest head was read {head_reads} times"
    );
    let last = r.status(500_000).last_error.map(|e| e.to_string());
    assert_eq!(r.applied_lsn(), 80, "last error: {last:?}");
    assert!(r.state().iter().eq(state_through(1, 80).iter()));
}

/// Reads every key of `want` at once, answering the GETs one at a time in
/// the order asked (a Range-ignoring server answers ranges with the whole
/// object when `whole`), and rereads each pending key after every answer.
/// Returns the most GETs out at once, the most of them for one object, and
/// the most bytes their answers could bring at once (their `max_bytes`).
fn concurrent_reads(
    r: &mut Replica,
    store: &mut Store,
    want: &KvState,
    whole: bool,
) -> (usize, usize, u64) {
    let mut pending: Vec<Vec<u8>> = keys(want);
    let mut out: std::collections::VecDeque<GetRequest> = Default::default();
    let (mut most, mut most_one, mut most_bytes) = (0, 0, 0);
    for _ in 0..100_000 {
        pending.retain(|k| match r.get_lazy(k).expect("read") {
            Read::Ready(v) => {
                assert_eq!(v.as_deref(), want.get(k), "{k:?}");
                false
            }
            Read::Pending => true,
        });
        loop {
            match r.poll(0) {
                Action::Fetch(req) => out.push_back(req),
                Action::Event(_) => {}
                Action::Wait { .. } => break,
            }
        }
        most = most.max(out.len());
        most_bytes = most_bytes.max(out.iter().map(|g| g.max_bytes).sum::<u64>());
        for g in &out {
            let same = out.iter().filter(|o| o.key == g.key).count();
            most_one = most_one.max(same);
        }
        let Some(mut req) = out.pop_front() else {
            assert!(pending.is_empty(), "reads left waiting with no GET out");
            return (most, most_one, most_bytes);
        };
        if whole {
            req.range = None;
        }
        let resp = store.serve(&req);
        r.handle_response(req.id, 0, resp);
    }
    panic!("reads did not finish");
}

/// However many reads wait at once, the block GETs out at once stay under
/// a fixed cap; against a server that ignores Range, a GET that may bring
/// a whole object goes out only while no other GET of it is out. Every
/// read still gets the origin's value.
#[test]
fn concurrent_reads_keep_block_gets_bounded() {
    let mut want = KvState::new();
    for i in 0..3_000u32 {
        want.put(format!("k{i:05}").as_bytes(), &[i as u8; 24]);
    }
    for whole in [false, true] {
        let mut store = snapshot_only(DATASET, &want, 400);
        let mut r = Replica::new(lazy_cfg(1 << 20), 7);
        drain(&mut r, &mut store, 0);
        let (most, most_one, _) = concurrent_reads(&mut r, &mut store, &want, whole);
        assert!(most <= 16, "{most} block GETs out at once (whole: {whole})");
        if whole {
            assert_eq!(most_one, 1, "whole-object GETs of the snapshot at once");
        } else {
            assert!(most > 8, "reads of distinct blocks go out together: {most}");
        }
    }
}

/// A snapshot of large blocks (a hostile one may hold 32 MiB blocks): the
/// answers of the block GETs out at once may bring at most the cache's
/// bytes (at least 1 MiB), or one block, not sixteen of them; every read
/// still gets the origin's value.
#[test]
fn large_blocks_keep_the_bytes_of_block_gets_out_bounded() {
    let mut want = KvState::new();
    for i in 0..4_000u32 {
        want.put(format!("k{i:05}").as_bytes(), &[i as u8; 1_000]);
    }
    let mut store = snapshot_only_in(DATASET, &want, 400, 300 << 10);
    let mut r = Replica::new(lazy_cfg(64 << 10), 7);
    drain(&mut r, &mut store, 0);
    let (most, _, most_bytes) = concurrent_reads(&mut r, &mut store, &want, false);
    assert!(
        most_bytes <= 1 << 20,
        "{most_bytes} bytes of {most} block GETs out at once"
    );
    assert!(most > 1, "blocks that fit go out together: {most}");
}

/// A scan bounded in bytes returns the whole scan's first entries, through
/// the one whose keys and values reach the bound, however the overlay and
/// the snapshot interleave; going on past its last key gives the rest.
#[test]
fn a_scan_bounded_in_bytes_returns_a_prefix_and_goes_on() {
    let mut store = dataset(60, 40, 128);
    let want = state_through(1, 60);
    let all: Vec<(Vec<u8>, Vec<u8>)> = want.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
    assert!(all.len() > 10, "{} entries", all.len());
    for max in [1usize, 150, 1_000, 1 << 20] {
        let mut r = Replica::new(lazy_cfg(1 << 20), 3);
        drain(&mut r, &mut store, 0);
        let mut start: Vec<u8> = Vec::new();
        let mut pages = 0;
        loop {
            let page = scan(
                &mut r,
                &mut store,
                LazyScan::new(&start, None, 10_000).max_bytes(max),
            );
            let rest: Vec<_> = all.iter().filter(|(k, _)| *k >= start).cloned().collect();
            let mut bytes = 0;
            let n = rest
                .iter()
                .position(|(k, v)| {
                    bytes += k.len() + v.len();
                    bytes >= max
                })
                .map_or(rest.len(), |i| i + 1);
            assert_eq!(page, rest[..n], "max {max}, page {pages}");
            pages += 1;
            if n == rest.len() {
                break;
            }
            start = page.last().expect("a page holds an entry").0.clone();
            start.push(0);
        }
        if max == 1 {
            assert_eq!(pages, all.len(), "one entry a page at a 1-byte bound");
        }
    }
}

/// A scan bounded in bytes over a lazy replica whose base is the state
/// held whole (restored, or a version 1 snapshot) copies no more than about
/// its bound: not `limit` whole entries it then throws away.
#[test]
fn a_scan_bounded_in_bytes_without_a_base_copies_about_its_bound() {
    let mut store = dataset_from(90, 60, 128, 1);
    let mut restored = state_through(1, 70);
    let big = vec![7u8; 16 << 10];
    for i in 0..300u32 {
        restored.put(format!("big/{i:04}").as_bytes(), &big);
    }
    let mut r = Replica::restore(lazy_cfg(1 << 20), 5, restored, 70, DATASET, 1);
    drain(&mut r, &mut store, 0);
    assert_eq!(r.applied_lsn(), 90);
    let mut s = LazyScan::prefix(b"big/", 10_000).max_bytes(1);
    let page = scan_in(&mut r, &mut store, &mut s);
    assert_eq!(page.len(), 1, "one entry reaches a 1-byte bound");
    // What the scan keeps between calls (its Debug shows every byte held):
    // a 1-byte bound must not hold all 300 values of 16 KiB (4.9 MB).
    let held = format!("{s:?}").len();
    assert!(
        held < 1 << 20,
        "a scan bounded to 1 byte holds {held} bytes of Debug output: every entry up to `limit` was copied"
    );
}

/// The same over a block-indexed base whose blocks are cached (a second
/// page of a scan, say): the scan takes about its bound from them, not
/// `limit` entries copied out of the cache.
#[test]
fn a_scan_bounded_in_bytes_over_cached_blocks_copies_about_its_bound() {
    let mut want = KvState::new();
    let big = vec![7u8; 16 << 10];
    for i in 0..300u32 {
        want.put(format!("big/{i:04}").as_bytes(), &big);
    }
    let mut store = snapshot_only(DATASET, &want, 60);
    let mut r = Replica::new(lazy_cfg(16 << 20), 5);
    drain(&mut r, &mut store, 0);
    // A first scan brings every block into the cache.
    assert_eq!(
        scan(&mut r, &mut store, LazyScan::new(b"", None, 10_000)).len(),
        300
    );
    let mut s = LazyScan::prefix(b"big/", 10_000).max_bytes(1);
    let page = scan_in(&mut r, &mut store, &mut s);
    assert_eq!(page.len(), 1, "one entry reaches a 1-byte bound");
    let held = format!("{s:?}").len();
    assert!(
        held < 1 << 20,
        "a scan bounded to 1 byte holds {held} bytes of Debug output: entries up to `limit` were copied from the cache"
    );
}

/// A scan over many blocks merges, each turn, only what that turn
/// collected, not everything collected before it: the entries it copies
/// stay about those it returns however many blocks it fetched.
#[test]
fn a_scan_over_many_blocks_copies_each_entry_about_once() {
    let (want, mut store, mut r) = opened_over_many_blocks(5_000);
    let mut s = LazyScan::new(b"", None, usize::MAX);
    let (mut turns, gets) = (0, store.gets);
    let got = loop {
        turns += 1;
        match r.scan_lazy(&mut s).expect("scan") {
            Read::Ready(v) => break v,
            Read::Pending => drain(&mut r, &mut store, 0),
        }
    };
    let all: Vec<_> = want.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
    assert_eq!(got, all);
    let gets = store.gets - gets;
    assert!(turns > 100, "{turns} turns: the scan fetches many blocks");
    // Reading ahead: the blocks after the one a turn waits for (those its
    // index block lists: this snapshot's hold a few) go out beside it, so
    // a turn takes several blocks.
    assert!(
        turns * 2 < gets,
        "{turns} turns for {gets} GETs: no read-ahead"
    );
    assert!(gets < 2 * turns * 8, "{gets} GETs over {turns} turns");
    assert!(
        s.entries_copied() <= 2 * all.len() as u64,
        "{} entries copied for {} returned over {turns} turns",
        s.entries_copied(),
        all.len()
    );
}

/// Read-ahead stops at the scan's end: a prefix scan with no limit makes
/// no more GETs than one limited to the entries the prefix holds.
#[test]
fn read_ahead_stops_at_the_end_of_the_scan() {
    let mut want = KvState::new();
    for i in 0..2_000u32 {
        want.put(format!("k/{i:05}").as_bytes(), &i.to_le_bytes());
    }
    let store = snapshot_only(DATASET, &want, 60);
    let gets = |limit: usize| {
        let mut store = Store {
            objects: store.objects.clone(),
            ..Store::default()
        };
        let mut r = Replica::new(lazy_cfg(1 << 20), 5);
        drain(&mut r, &mut store, 0);
        let before = store.gets;
        let got = scan(&mut r, &mut store, LazyScan::prefix(b"k/001", limit));
        assert_eq!(got.len(), 100);
        store.gets - before
    };
    let (exact, unlimited) = (gets(100), gets(usize::MAX));
    assert!(
        unlimited <= exact + 1,
        "{unlimited} GETs without a limit, {exact} with"
    );
}

/// The empty key, in the snapshot and written or deleted after it: a scan
/// from the empty key returns it once, as the overlay has it, whatever
/// the turn on which the snapshot's entries arrive.
#[test]
fn a_scan_from_the_empty_key_takes_its_newest_write_once() {
    use walcast_core::batch::{self, Op};
    use walcast_core::segment::SegmentBuilder;
    for (op, want) in [
        (Op::put(Vec::new(), b"new".to_vec()), Some(&b"new"[..])),
        (Op::delete(Vec::new()), None),
    ] {
        let mut st = KvState::new();
        st.put(b"", b"old");
        for i in 0..200u32 {
            st.put(format!("k/{i:04}").as_bytes(), b"v");
        }
        let mut store = snapshot_only(DATASET, &st, 60);
        let mut b = SegmentBuilder::with_index_interval(1, 61, 64);
        assert!(b.push(&batch::encode(&[op]).unwrap()));
        let (bytes, summary) = b.finish().unwrap();
        let e = SegmentEntry::from_summary(&summary);
        let mut head = Head::decode(&store.objects[HEAD_KEY]).unwrap();
        store.objects.insert(e.key.clone(), bytes);
        head.segments.push(e);
        head.committed_lsn = 61;
        head.generation = 61;
        store.objects.insert(HEAD_KEY.into(), head.encode());
        for cache in [300, 1 << 20] {
            let mut r = Replica::new(lazy_cfg(cache), 8);
            drain(&mut r, &mut store, 0);
            assert_eq!(r.applied_lsn(), 61);
            let got = scan(&mut r, &mut store, LazyScan::new(b"", None, 5));
            let empty: Vec<_> = got.iter().filter(|(k, _)| k.is_empty()).collect();
            match want {
                Some(v) => assert_eq!(empty, [&(Vec::new(), v.to_vec())], "cache {cache}: {got:?}"),
                None => assert!(
                    empty.is_empty(),
                    "cache {cache}: a deleted key returned: {got:?}"
                ),
            }
            assert_eq!(got.len(), 5, "{got:?}");
        }
    }
}

/// Answers every GET with the whole object, as a server that ignores Range
/// does, cut at `max_bytes + 1` as a driver cuts a body.
fn drain_whole(r: &mut Replica, store: &mut Store) {
    for _ in 0..10_000 {
        match r.poll(0) {
            Action::Fetch(mut req) => {
                let most = req.max_bytes.saturating_add(1) as usize;
                req.range = None;
                let resp = match store.serve(&req) {
                    GetResponse::Ok { mut body, etag, .. } => {
                        body.truncate(most);
                        GetResponse::Ok {
                            body,
                            etag,
                            range: None,
                        }
                    }
                    other => other,
                };
                r.handle_response(req.id, 0, resp);
            }
            Action::Event(_) => {}
            Action::Wait { .. } => return,
        }
    }
    panic!("poll did not settle");
}

/// A store that answered ranges and then answers with whole objects (a CDN
/// that honours Range only on a cache hit) costs one read a `data` error,
/// not every read after it: the next GET of an object that fits the cache
/// takes the whole answer again.
#[test]
fn a_store_that_stops_honouring_range_costs_one_read() {
    let mut want = KvState::new();
    for i in 0..3_000u32 {
        want.put(format!("k{i:05}").as_bytes(), &[i as u8; 24]);
    }
    let mut store = snapshot_only(DATASET, &want, 400);
    let mut r = Replica::new(lazy_cfg(1 << 20), 9);
    drain(&mut r, &mut store, 0);
    assert_eq!(
        get(&mut r, &mut store, b"k00010").as_deref(),
        want.get(&b"k00010"[..])
    );
    let key = b"k02990";
    let mut failed = 0;
    let got = loop {
        match r.get_lazy(key) {
            Ok(Read::Ready(v)) => break v,
            Ok(Read::Pending) => drain_whole(&mut r, &mut store),
            Err(e) => {
                assert_eq!(e.kind(), walcast_core::error::ErrorKind::Data, "{e}");
                failed += 1;
                assert!(
                    failed <= 1,
                    "every read fails after the store stopped honouring Range: {e}"
                );
            }
        }
    };
    assert_eq!(got.as_deref(), want.get(&key[..]));
}

/// A cache far smaller than the blocks concurrent reads fetch at once (one
/// byte) still answers every read when the GETs out are answered together
/// before the reads run again, 32 reads at a time (as the drivers run
/// them): a block fetched and not yet used, an index partition among them,
/// is not dropped for another's arrival before its read runs. (Before, 2,007
/// of 2,031 reads never finished.)
#[test]
fn concurrent_reads_finish_over_a_tiny_cache() {
    let mut want = KvState::new();
    for i in 0..2_000u32 {
        want.put(format!("k{i:05}").as_bytes(), &[i as u8; 24]);
    }
    for max_inflight in [1, 4, 16] {
        let mut store = snapshot_only(DATASET, &want, 400);
        let cfg = ReplicaConfig {
            max_inflight,
            ..lazy_cfg(1)
        };
        let mut r = Replica::new(cfg, 7);
        drain(&mut r, &mut store, 0);
        read_all_answering_together(&mut r, &mut store, &want);
    }
}

/// Reads every key of `want`, 32 at a time; after each round of reads
/// answers every GET out before the reads run again.
fn read_all_answering_together(r: &mut Replica, store: &mut Store, want: &KvState) {
    let mut pending: Vec<Vec<u8>> = keys(want);
    for _ in 0..10_000 {
        // At most 32 reads run at once (the JS package's cap); the rest
        // wait their turn.
        let (mut running, before) = (0, pending.len());
        pending.retain(|k| {
            running += 1;
            if running > 32 {
                return true;
            }
            match r.get_lazy(k).expect("read") {
                Read::Ready(v) => {
                    assert_eq!(v.as_deref(), want.get(k), "{k:?}");
                    false
                }
                Read::Pending => true,
            }
        });
        if pending.is_empty() {
            return;
        }
        let mut out = Vec::new();
        loop {
            match r.poll(0) {
                Action::Fetch(req) => out.push(req),
                Action::Event(_) => {}
                Action::Wait { .. } => break,
            }
        }
        assert!(
            !out.is_empty() || pending.len() < before,
            "reads left waiting with no GET out"
        );
        for req in out {
            let resp = store.serve(&req);
            r.handle_response(req.id, 0, resp);
        }
    }
    panic!("{} reads never finished", pending.len());
}

/// A lazy replica loading a version 1 snapshot whole that meanwhile jumps
/// to a newer block-indexed snapshot (a head read while the load runs)
/// drops the load: its answers arriving after the jump never take the
/// state back to the older snapshot.
#[test]
fn a_whole_load_overtaken_by_a_jump_never_takes_the_state_back() {
    // A version 1 snapshot at 40 (read whole), history to 60.
    let mut store = dataset(60, 40, 128);
    to_version_1(&mut store, 40);
    let mut r = Replica::new(lazy_cfg(1 << 20), 3);
    // Answer everything but the snapshot's GETs, which are held.
    let mut held = Vec::new();
    for _ in 0..100 {
        match r.poll(0) {
            Action::Fetch(req) if req.key.starts_with("snapshots/") => held.push(req),
            Action::Fetch(req) => {
                let resp = store.serve(&req);
                r.handle_response(req.id, 0, resp);
            }
            Action::Event(_) => {}
            Action::Wait { .. } => break,
        }
    }
    assert!(!held.is_empty(), "the whole load is under way");
    // The publisher writes a block-indexed snapshot at 100, history to 110.
    let newer = dataset_from(110, 100, 128, 41);
    store.objects.extend(newer.objects);
    r.sync_now(10);
    let mut lowest_after_jump = u64::MAX;
    let mut events = Vec::new();
    for round in 0..200 {
        match r.poll(10 + round) {
            Action::Fetch(req) => {
                let resp = store.serve(&req);
                r.handle_response(req.id, 10 + round, resp);
            }
            Action::Event(e) => events.push(e),
            Action::Wait { .. } => {
                // Then the old load's answers arrive.
                let Some(req) = held.pop() else { break };
                let resp = store.serve(&req);
                r.handle_response(req.id, 10 + round, resp);
            }
        }
        if r.applied_lsn() >= 100 || lowest_after_jump != u64::MAX {
            lowest_after_jump = lowest_after_jump.min(r.applied_lsn());
        }
    }
    drain(&mut r, &mut store, 1_000);
    assert_eq!(r.applied_lsn(), 110);
    assert!(
        lowest_after_jump >= 100,
        "the state went back to LSN {lowest_after_jump} after the jump: {events:?}"
    );
    reads_equal(&mut r, &mut store, &state_through(1, 110));
}

/// A version 2 snapshot of `st` at LSN 10 (blocks of about `block_bytes`)
/// and one delta over it, LSNs 11..=20, of `changes` (a segment holds
/// them too).
fn snapshot_and_delta(
    st: &KvState,
    block_bytes: usize,
    changes: &[(Vec<u8>, Option<Vec<u8>>)],
) -> Store {
    snapshot_and_deltas(st, block_bytes, &[changes])
}

/// Point reads of keys a delta holds fetch the snapshot's block for the
/// key beside the delta's (in case the delta's filter was wrong); the delta
/// answers and the snapshot's block is never used. Such blocks, fetched and
/// not yet used, are kept past the cache's bytes for the reads waiting on
/// them, but not past twice those bytes: a store of large blocks does not
/// make the cache hold dozens of them.
#[test]
fn unused_blocks_stay_within_twice_the_cache() {
    let mut st = KvState::new();
    for i in 0..40u32 {
        st.put(format!("s{i:03}").as_bytes(), &vec![i as u8; 250 << 10]);
    }
    let changes: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..40u32)
        .map(|i| (format!("s{i:03}").into_bytes(), Some(vec![b'n'; 20 << 10])))
        .collect();
    let mut store = snapshot_and_delta(&st, 200 << 10, &changes);
    let cache = 1u64 << 20;
    let mut r = Replica::new(lazy_cfg(cache), 7);
    drain(&mut r, &mut store, 0);
    assert_eq!(r.applied_lsn(), 20);
    let mut most = 0;
    for (k, v) in &changes {
        assert_eq!(get(&mut r, &mut store, k).as_ref(), v.as_ref());
        most = most.max(r.status(0).lazy.expect("lazy").cached_bytes);
    }
    assert!(
        most <= 2 * cache + (260 << 10),
        "the cache of {cache} bytes held {most} bytes of blocks"
    );
}

/// A scan over snapshot entries a delta deleted returns nothing, and does
/// not keep the entries it read and the overlay hid until it returns: what
/// it holds stays within a few blocks, not the snapshot's bytes.
#[test]
fn a_scan_keeps_no_entries_the_overlay_hid() {
    let mut st = KvState::new();
    for i in 0..4_000u32 {
        st.put(format!("s{i:05}").as_bytes(), &[i as u8; 1 << 10]);
    }
    let changes: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..4_000u32)
        .map(|i| (format!("s{i:05}").into_bytes(), None))
        .collect();
    let mut store = snapshot_and_delta(&st, 16 << 10, &changes);
    let mut r = Replica::new(lazy_cfg(1 << 20), 7);
    drain(&mut r, &mut store, 0);
    assert_eq!(r.applied_lsn(), 20);
    let mut s = LazyScan::new(b"", None, 10);
    assert_eq!(scan_in(&mut r, &mut store, &mut s), Vec::new());
    // Each byte of a key or value prints as at most five characters.
    let held = format!("{s:?}").len() / 5;
    eprintln!("a scan over 4,000 deleted entries holds about {held} bytes");
    assert!(
        held < 64 << 10,
        "a scan that returned nothing holds about {held} bytes of the {} bytes it read",
        st.len() << 10
    );
}

/// A head that says a delta's index and filter take all of its 5 MB: a
/// replica with a 1 MiB cache refuses to hold them beside the cache (each
/// delta's at most the cache's bytes, 4 MiB at least) and the read fails
/// naming the delta, before any GET of them.
#[test]
fn a_delta_index_over_the_cache_is_refused_naming_the_delta() {
    let mut st = KvState::new();
    st.put(b"a", b"1");
    let changes: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..50u32)
        .map(|i| {
            (
                format!("d{i:03}").into_bytes(),
                Some(vec![i as u8; 100 << 10]),
            )
        })
        .collect();
    let mut store = snapshot_and_delta(&st, 16 << 10, &changes);
    let mut head = Head::decode(&store.objects[HEAD_KEY]).expect("a head");
    let d = &mut head.deltas[0];
    assert!(d.size > 5_000_000 && d.suffix_len < 64 << 10, "{d:?}");
    d.suffix_len = d.size - walcast_core::snapshot::HEADER_LEN;
    let delta = d.key.clone();
    store.objects.insert(HEAD_KEY.into(), head.encode());
    let mut r = Replica::new(lazy_cfg(1 << 20), 7);
    drain(&mut r, &mut store, 0);
    assert_eq!(r.applied_lsn(), 20);
    let bytes = store.bytes;
    let e = r.get_lazy(b"d001").expect_err("the read fails");
    assert_eq!(
        (e.kind(), e.object()),
        (walcast_core::ErrorKind::Data, Some(delta.as_str())),
        "{e}"
    );
    drain(&mut r, &mut store, 0);
    assert_eq!(store.bytes, bytes, "no GET of the delta's suffix");
}

/// Block GETs of a snapshot are out (300 KiB blocks, up to the 1 MiB the
/// replica lets out at once) when a newer snapshot makes the replica jump:
/// those GETs still count until they are answered, so the answers out at
/// once stay within that bound across the jump, not twice it; every read
/// still gets the origin's value once they are answered.
#[test]
fn a_jump_keeps_counting_the_block_gets_still_out() {
    let mut want = KvState::new();
    for i in 0..4_000u32 {
        want.put(format!("k{i:05}").as_bytes(), &[i as u8; 1_000]);
    }
    let mut store = snapshot_only_in(DATASET, &want, 400, 300 << 10);
    let mut r = Replica::new(lazy_cfg(64 << 10), 7);
    drain(&mut r, &mut store, 0);
    let probes: Vec<Vec<u8>> = keys(&want).into_iter().step_by(97).collect();
    let mut out: Vec<GetRequest> = Vec::new();
    // What the snapshots' GETs out may bring (the head's GET is not a
    // block GET).
    let out_bytes = |out: &[GetRequest]| {
        out.iter()
            .filter(|g| g.key != HEAD_KEY)
            .map(|g| g.max_bytes)
            .sum::<u64>()
    };
    let ask = |r: &mut Replica, out: &mut Vec<GetRequest>, now: u64| {
        for k in &probes {
            let _ = r.get_lazy(k).expect("a read");
        }
        loop {
            match r.poll(now) {
                Action::Fetch(req) => out.push(req),
                Action::Event(_) => {}
                Action::Wait { .. } => break,
            }
        }
    };
    // Answer the old snapshot's GETs one at a time until at least two data
    // blocks are out unanswered.
    for _ in 0..100 {
        ask(&mut r, &mut out, 0);
        if out_bytes(&out) >= 600 << 10 {
            break;
        }
        let req = out.remove(0);
        let resp = store.serve(&req);
        r.handle_response(req.id, 0, resp);
    }
    let stale = out_bytes(&out);
    assert!(stale >= 600 << 10, "{stale} bytes of block GETs out");

    // The publisher writes a newer snapshot of the same state: the replica
    // reads the head and jumps to it, its old GETs still out.
    let newer = snapshot_only_in(DATASET, &want, 500, 300 << 10);
    store.objects.extend(newer.objects);
    r.sync_now(1_000);
    let (mut most, mut new_gets) = (stale, 0);
    for _ in 0..100 {
        ask(&mut r, &mut out, 1_000);
        most = most.max(out_bytes(&out));
        // The head and the new snapshot's GETs are answered; the old ones
        // are held.
        let Some(at) = out.iter().position(|g| g.key != snapshot_key(400, 1)) else {
            break;
        };
        let req = out.remove(at);
        new_gets += u64::from(req.key == snapshot_key(500, 1));
        let resp = store.serve(&req);
        r.handle_response(req.id, 1_000, resp);
    }
    assert_eq!(r.applied_lsn(), 500, "the replica jumped");
    assert!(new_gets >= 1, "the new snapshot was read");
    assert!(
        most <= 1 << 20,
        "{most} bytes of block GETs out at once across the jump ({stale} before it)"
    );
    // The old answers arrive; every read goes on to the origin's value.
    for req in std::mem::take(&mut out) {
        let resp = store.serve(&req);
        r.handle_response(req.id, 1_000, resp);
    }
    for k in &probes {
        assert_eq!(get(&mut r, &mut store, k).as_deref(), want.get(k), "{k:?}");
    }
}

/// A delta of 2 MiB blocks (one value each) read a key at a time with a
/// 1 MiB cache: past the deltas' share of the cache, the delta keeps its
/// last blocks only while they hold at most twice the bytes of the GETs out
/// at once (2 MiB here), then its last one, not its last four: a store of
/// 32 MiB blocks does not make a chain hold sixteen of them. Every read
/// still gets the delta's value.
#[test]
fn a_delta_of_large_blocks_keeps_only_its_last_past_the_bound() {
    let mut st = KvState::new();
    st.put(b"a", b"1");
    let changes: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..8u32)
        .map(|i| {
            (
                format!("d{i:03}").into_bytes(),
                Some(vec![i as u8; 2 << 20]),
            )
        })
        .collect();
    let mut store = snapshot_and_delta(&st, 16 << 10, &changes);
    let mut r = Replica::new(lazy_cfg(1 << 20), 7);
    drain(&mut r, &mut store, 0);
    assert_eq!(r.applied_lsn(), 20);
    let mut most = 0;
    for (k, v) in &changes {
        assert_eq!(get(&mut r, &mut store, k).as_ref(), v.as_ref());
        most = most.max(r.status(0).lazy.expect("lazy").cached_bytes);
    }
    assert!(
        most <= (4 << 20) + (64 << 10),
        "{most} bytes of blocks held (a block is 2 MiB)"
    );
    let got = scan(&mut r, &mut store, LazyScan::new(b"d", None, 100));
    let want: Vec<(Vec<u8>, Vec<u8>)> = changes
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().unwrap()))
        .collect();
    assert!(got == want, "a scan of the delta: {} entries", got.len());
}

/// A key and its new value, or its deletion.
type Change = (Vec<u8>, Option<Vec<u8>>);

/// A version 2 snapshot of `st` at LSN 10 (blocks of about `block_bytes`)
/// and a chain of deltas over it, the `i`th of `chain[i]` over LSNs
/// `11 + 10i..=20 + 10i` (a segment holds them too).
fn snapshot_and_deltas(st: &KvState, block_bytes: usize, chain: &[&[Change]]) -> Store {
    use walcast_core::catalog::{delta_key, DeltaEntry};
    use walcast_core::snapshot::delta::{encode_delta, DeltaFooter, DeltaMeta};
    let mut store = snapshot_only_in(DATASET, st, 10, block_bytes);
    let mut head = Head::decode(&store.objects[HEAD_KEY]).expect("a head");
    let mut base = 10;
    for changes in chain {
        let lsn = base + 10;
        let bytes = encode_delta(
            changes.iter().map(|(k, v)| (k.as_slice(), v.as_deref())),
            DeltaMeta {
                base_lsn: base,
                lsn,
                epoch: 1,
                dataset_id: DATASET,
            },
            16 << 10,
        );
        let size = bytes.len() as u64;
        let footer = DeltaFooter::decode(&bytes[bytes.len() - 64..], size).expect("a footer");
        head.deltas.push(DeltaEntry {
            key: delta_key(base, lsn, 1),
            base_lsn: base,
            lsn,
            epoch: 1,
            size,
            crc32: crc32fast::hash(&bytes),
            entries: changes.len() as u64,
            suffix_len: footer.suffix_len(size),
            footer_crc32: None,
            slots: None,
        });
        store.objects.insert(delta_key(base, lsn, 1), bytes);
        base = lsn;
    }
    let (bytes, summary) = build_segment(1, 11, base, 64);
    let e = SegmentEntry::from_summary(&summary);
    store.objects.insert(e.key.clone(), bytes);
    head.segments.push(e);
    head.committed_lsn = base;
    head.generation = base;
    store.objects.insert(HEAD_KEY.into(), head.encode());
    store
}

/// Three scans stepped in turn over two deltas of 300 KiB blocks (one
/// value each) with a 1 MiB cache, their GETs answered in the order sent
/// and in reverse: the blocks one scan's answers bring do not evict those
/// another waits for, past the bound on the deltas' last blocks too, so
/// each finishes with the newest delta's values.
#[test]
fn three_scans_over_two_deltas_of_large_blocks_finish() {
    let mut st = KvState::new();
    st.put(b"a", b"1");
    let n = 24u32;
    let a: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..n)
        .map(|i| (format!("d{i:03}").into_bytes(), Some(vec![b'a'; 300 << 10])))
        .collect();
    let b: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..n)
        .map(|i| (format!("d{i:03}").into_bytes(), Some(vec![b'b'; 300 << 10])))
        .collect();
    for lifo in [false, true] {
        let mut store = snapshot_and_deltas(&st, 16 << 10, &[&a, &b]);
        let mut r = Replica::new(lazy_cfg(1 << 20), 7);
        drain(&mut r, &mut store, 0);
        assert_eq!(r.applied_lsn(), 30);
        let starts: [&[u8]; 3] = [b"d000", b"d008", b"d016"];
        let mut scans: Vec<Option<LazyScan>> = starts
            .iter()
            .map(|s| Some(LazyScan::new(s, None, 8)))
            .collect();
        let mut done = [0usize; 3];
        let mut gets = 0;
        let mut finished = false;
        for turn in 0..2_000 {
            if scans.iter().all(Option::is_none) {
                finished = true;
                break;
            }
            for (i, slot) in scans.iter_mut().enumerate() {
                let Some(s) = slot.as_mut() else { continue };
                if let Read::Ready(got) = r.scan_lazy(s).expect("a scan") {
                    assert_eq!(got.len(), 8, "scan {i}");
                    assert!(got.iter().all(|(_, v)| v[0] == b'b'), "scan {i}");
                    *slot = None;
                    done[i] = turn;
                }
            }
            let mut reqs = Vec::new();
            loop {
                match r.poll(0) {
                    Action::Fetch(req) => reqs.push(req),
                    Action::Event(_) => {}
                    Action::Wait { .. } => break,
                }
            }
            if lifo {
                reqs.reverse();
            }
            for req in reqs {
                gets += 1;
                let resp = store.serve(&req);
                r.handle_response(req.id, 0, resp);
            }
        }
        eprintln!(
            "lifo {lifo}: finished {finished}, scans done at turns {done:?}, {gets} GETs (48 blocks needed at most)"
        );
        assert!(
            finished,
            "lifo {lifo}: three scans did not finish in 2,000 turns ({gets} GETs)"
        );
    }
}

/// As [`three_scans_over_two_deltas_of_large_blocks_finish`], run as the
/// drivers run reads: each GET answered alone, in the order sent, and the
/// scan that sent it runs right after (scans owning no GET run when
/// nothing is out).
#[test]
fn three_scans_over_large_delta_blocks_finish_run_as_drivers_run_them() {
    let mut st = KvState::new();
    st.put(b"a", b"1");
    let n = 24u32;
    let a: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..n)
        .map(|i| (format!("d{i:03}").into_bytes(), Some(vec![b'a'; 300 << 10])))
        .collect();
    let b: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..n)
        .map(|i| (format!("d{i:03}").into_bytes(), Some(vec![b'b'; 300 << 10])))
        .collect();
    let mut store = snapshot_and_deltas(&st, 16 << 10, &[&a, &b]);
    let mut r = Replica::new(lazy_cfg(1 << 20), 7);
    drain(&mut r, &mut store, 0);
    let starts: [&[u8]; 3] = [b"d000", b"d008", b"d016"];
    let mut scans: Vec<Option<LazyScan>> = starts
        .iter()
        .map(|s| Some(LazyScan::new(s, None, 8)))
        .collect();
    let mut queue: std::collections::VecDeque<(GetRequest, usize)> = Default::default();
    let mut gets = 0;
    let run = |i: usize,
               scans: &mut Vec<Option<LazyScan>>,
               r: &mut Replica,
               queue: &mut std::collections::VecDeque<(GetRequest, usize)>| {
        let Some(s) = scans[i].as_mut() else { return };
        if let Read::Ready(got) = r.scan_lazy(s).expect("a scan") {
            assert_eq!(got.len(), 8);
            scans[i] = None;
            return;
        }
        while let Some(req) = r.poll_read_fetch() {
            queue.push_back((req, i));
        }
    };
    for i in 0..3 {
        run(i, &mut scans, &mut r, &mut queue);
    }
    for _ in 0..20_000 {
        if scans.iter().all(Option::is_none) {
            break;
        }
        match queue.pop_front() {
            Some((req, owner)) => {
                gets += 1;
                let resp = store.serve(&req);
                r.handle_response(req.id, 0, resp);
                run(owner, &mut scans, &mut r, &mut queue);
            }
            None => {
                for i in 0..3 {
                    run(i, &mut scans, &mut r, &mut queue);
                }
            }
        }
        // Scans that own no GET out look again (a driver's short sleep).
        for i in 0..3 {
            if !queue.iter().any(|(_, o)| *o == i) {
                run(i, &mut scans, &mut r, &mut queue);
            }
        }
    }
    eprintln!(
        "driver order: finished {}, {gets} GETs (48 blocks needed at most)",
        scans.iter().all(Option::is_none)
    );
    assert!(
        scans.iter().all(Option::is_none),
        "driver order: no finish after {gets} GETs"
    );
}

/// The block GETs a lazy read is waiting for, performed by the caller.
fn read_fetches(r: &mut Replica) -> Vec<GetRequest> {
    std::iter::from_fn(|| r.poll_read_fetch()).collect()
}

/// Where a ranged GET of the snapshot starts (`None` for any other GET).
fn snapshot_start(g: &GetRequest) -> Option<u64> {
    match g.range {
        Some(ByteRange::Bounded { start, .. }) if g.key.starts_with("snapshots/") => Some(start),
        _ => None,
    }
}

fn busy() -> GetResponse {
    GetResponse::Failed {
        status: Some(503),
        message: "busy".into(),
    }
}

/// A snapshot of `n` keys `k/00000`.. in 128-byte blocks, and a lazy
/// replica opened on it.
fn opened_over_many_blocks(n: u32) -> (KvState, Store, Replica) {
    let mut want = KvState::new();
    for i in 0..n {
        want.put(format!("k/{i:05}").as_bytes(), &i.to_le_bytes());
    }
    let mut store = snapshot_only(DATASET, &want, 60);
    let mut r = Replica::new(lazy_cfg(1 << 20), 5);
    drain(&mut r, &mut store, 0);
    (want, store, r)
}

/// GETs a scan over the snapshot sends ahead of the block it waits for
/// (those after the round's lowest offset) that fail do not fail the scan:
/// it reads those blocks again when it needs them.
#[test]
fn a_failed_read_ahead_of_a_snapshot_scan_does_not_fail_it() {
    let (want, mut store, mut r) = opened_over_many_blocks(2_000);
    let mut s = LazyScan::new(b"", None, usize::MAX);
    let mut failed = 0;
    for round in 0..10_000 {
        match r.scan_lazy(&mut s) {
            Ok(Read::Ready(got)) => {
                let all: Vec<_> = want.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
                assert!(got == all, "the scan's entries differ from the origin's");
                assert!(failed >= 10, "only {failed} GETs read ahead failed");
                return;
            }
            Err(e) => panic!("round {round}: the scan failed: {e}"),
            Ok(Read::Pending) => {}
        }
        let reqs = read_fetches(&mut r);
        let lowest = reqs.iter().filter_map(snapshot_start).min();
        for g in reqs {
            let ahead = snapshot_start(&g).is_some_and(|s| Some(s) > lowest);
            if ahead && failed < 10 {
                failed += 1;
                r.handle_response(g.id, 0, busy());
            } else {
                let resp = store.serve(&g);
                r.handle_response(g.id, 0, resp);
            }
        }
    }
    panic!("the scan did not finish");
}

/// A block a scan comes to wait for while its GET, sent ahead of need, is
/// still out: that GET's failure is the scan's (a data block it waits for
/// failed), not a reason to send it again and again unseen.
#[test]
fn a_block_a_scan_waits_for_fails_it_when_its_read_ahead_fails() {
    let (_, mut store, mut r) = opened_over_many_blocks(2_000);
    let mut s = LazyScan::new(b"", None, usize::MAX);
    // Answer everything until a round sends GETs ahead; hold those.
    let mut held = Vec::new();
    for _ in 0..100 {
        assert!(matches!(r.scan_lazy(&mut s), Ok(Read::Pending)));
        let reqs = read_fetches(&mut r);
        let lowest = reqs.iter().filter_map(snapshot_start).min();
        for g in reqs {
            if snapshot_start(&g).is_some_and(|s| Some(s) > lowest) {
                held.push(g);
            } else {
                let resp = store.serve(&g);
                r.handle_response(g.id, 0, resp);
            }
        }
        if !held.is_empty() {
            break;
        }
    }
    assert!(!held.is_empty(), "no GET went out ahead");
    // The scan now waits for the first block read ahead: no GET of its own.
    assert!(matches!(r.scan_lazy(&mut s), Ok(Read::Pending)));
    held.sort_by_key(snapshot_start);
    let next = held.remove(0);
    let again: Vec<_> = read_fetches(&mut r);
    assert!(
        again.iter().all(|g| g.range != next.range),
        "the block was asked for twice at once"
    );
    r.handle_response(next.id, 0, busy());
    match r.scan_lazy(&mut s) {
        Err(e) => {
            assert_eq!(e.object(), Some(next.key.as_str()), "{e}");
            assert!(e.to_string().contains("503"), "{e}");
        }
        other => panic!("the scan did not see its block's failure: {other:?}"),
    }
}
