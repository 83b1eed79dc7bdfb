//! Base snapshots with deltas on: the footer check, the top index carried in
//! the head, the byte and ratio triggers, and the version-1 fallback.

use super::*;

/// Another dataset's snapshot of the same size and entry count at the
/// snapshot's key (a dataset started over at the prefix, its old snapshot
/// still in a CDN's cache): a lazy read refuses it by the footer's CRC-32
/// the catalog records, where size and entry count alone let it answer
/// the other dataset's values.
#[test]
fn a_lazy_read_refuses_another_snapshot_of_the_same_size_by_its_footer_crc() {
    let (mut store, _) = published_snapshot(0);
    let head = store.head();
    let snap = head.snapshot.clone().expect("a snapshot");
    assert!(snap.suffix.is_none() && snap.footer_crc32.is_some());
    let mut other = walcast_core::state::KvState::new();
    for i in 0..20_000u64 {
        let v = vec![(i % 251) as u8 ^ 0xff; 100];
        other.put(format!("key:{i:06}").as_bytes(), &v);
    }
    let opts = walcast_core::snapshot::indexed::IndexedOptions {
        block_bytes: 4 << 10,
        index_block_bytes: 1 << 10,
    };
    let id = walcast_core::catalog::DatasetId([9; 16]);
    let file =
        walcast_core::snapshot::indexed::encode_indexed(&other, snap.lsn, snap.epoch, id, opts);
    assert_eq!((file.len() as u64, other.len()), (snap.size, snap.entries));
    store.objects.get_mut(&snap.key).expect("stored").0 = file;
    let key = b"key:000123";
    let err = try_cold_read(&store, key).expect_err("the other snapshot is refused");
    assert_eq!(err.kind(), walcast_core::error::ErrorKind::Data, "{err}");
    assert_eq!(err.object(), Some(snap.key.as_str()), "{err}");
    // A head without the footer's CRC (as written before it) reads the
    // other file's value: what the CRC rules out.
    let mut h = head.clone();
    h.snapshot.as_mut().unwrap().footer_crc32 = None;
    store.objects.get_mut(HEAD_KEY).unwrap().0 = h.encode();
    let (v, _, _) = cold_read(&store, key);
    assert_eq!(v, Some(vec![123u8 ^ 0xff; 100]));
}

/// A head that carries the snapshot's top index and footer saves a cold
/// point read its first suffix GET: one round trip fewer, the same answers;
/// a head whose copy is damaged (with its checksum made right) costs that
/// GET again and still answers right.
#[test]
fn a_snapshot_suffix_in_the_head_saves_a_cold_read_a_round_trip() {
    let (with, log) = published_snapshot(16 << 10);
    let (without, _) = published_snapshot(0);
    let head = with.head();
    let suffix = head.snapshot.as_ref().and_then(|s| s.suffix.clone());
    let suffix = suffix.expect("the head carries the snapshot's suffix");
    assert!(without.head().snapshot.unwrap().suffix.is_none());
    // A two-level index: head, top index (now in the head), index block, data block.
    let mut damaged = Store {
        objects: with.objects.clone(),
        ..Store::default()
    };
    let mut h = head.clone();
    let s = h.snapshot.as_mut().unwrap();
    let mut bad = suffix.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x55;
    s.suffix = Some(bad);
    damaged.objects.get_mut(HEAD_KEY).unwrap().0 = h.encode();
    for i in [0u64, 12_345, 19_999] {
        let key = format!("key:{i:06}").into_bytes();
        let (a, at_a, ca) = cold_read(&with, &key);
        let (b, at_b, cb) = cold_read(&without, &key);
        let (c, at_c, cc) = cold_read(&damaged, &key);
        for (v, at) in [(&a, at_a), (&b, at_b), (&c, at_c)] {
            assert_eq!(v.as_ref(), model_at(&log, at).get(&key), "key {i} at {at}");
        }
        assert_eq!(ca.rounds + 1, cb.rounds, "{ca:?} against {cb:?}");
        assert_eq!(ca.gets + 1, cb.gets, "{ca:?} against {cb:?}");
        assert_eq!(cc.rounds, cb.rounds, "a damaged copy is fetched instead");
    }
}

/// A bulk load in large batches reaches `snapshot_bytes` long before
/// `snapshot_every` LSNs, and single puts after it reach `delta_bytes`
/// long before `delta_every`: the publisher writes the snapshot and the
/// deltas by bytes, so a cold point read replays little whatever the batch
/// sizes, and answers what the origin had.
#[test]
fn snapshots_and_deltas_by_bytes_bound_a_cold_read_after_a_bulk_load() {
    let cfg = PublisherConfig {
        snapshot_every: Some(1_000_000),
        snapshot_bytes: Some(1 << 20),
        delta_every: Some(1_000_000),
        delta_bytes: Some(32 << 10),
        head_check_ms: 0,
        tail_bytes: 0,
        ..PublisherConfig::default()
    };
    let (mut p, mut store, mut log, mut now) = bulk_loaded(cfg);
    let key = |i: u64| format!("key:{i:06}").into_bytes();
    let h = store.head();
    let snap = h
        .snapshot
        .as_ref()
        .expect("a snapshot by bytes after the bulk load");
    assert!(snap.lsn < 20, "snapshot at LSN {}", snap.lsn);
    // Then single puts of 100-byte values: a delta every 32 KiB or so.
    let mut rng = 0x9e37_79b9_u64;
    for _ in 0..3_000 {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let op = Op::put(key((rng >> 33) % 20_000), vec![(rng >> 40) as u8; 100]);
        let payload = batch::encode(std::slice::from_ref(&op)).unwrap();
        log.push(vec![op]);
        let lsn = log.len() as u64;
        p.push(lsn, &payload, now).unwrap();
        now += 1;
        store.drive(&mut p, now);
    }
    for t in 0..400 {
        store.drive(&mut p, now + t);
    }
    let h = store.head();
    let end = h.delta_lsn().expect("deltas by bytes");
    assert!(!h.deltas.is_empty());
    // What a cold replica replays after the chain: under two intervals.
    assert!(
        h.committed_lsn - end < 600,
        "the chain ends at {end}, committed {}",
        h.committed_lsn
    );
    for i in [0u64, 7_777, 19_999] {
        let (v, at, cost) = cold_read(&store, &key(i));
        assert_eq!(
            v.as_ref(),
            model_at(&log, at).get(&key(i)),
            "key {i} at {at}"
        );
        assert!(
            cost.bytes < 1 << 20,
            "a cold read moved {} bytes",
            cost.bytes
        );
    }
}

/// `snapshot_ratio_percent` holds a due snapshot back until that multiple of the
/// last snapshot's size in bytes of batches was written since it: the
/// first one (after the bulk load) comes at once, later ones are spaced
/// by their size rather than by `snapshot_every`, deltas are written
/// meanwhile, and cold reads answer what the origin had throughout.
#[test]
fn snapshot_ratio_spaces_snapshots_by_their_size() {
    let run = |ratio: Option<u32>| {
        let cfg = PublisherConfig {
            snapshot_every: Some(300),
            snapshot_bytes: Some(1 << 20),
            snapshot_ratio_percent: ratio,
            delta_every: Some(100),
            head_check_ms: 0,
            tail_bytes: 0,
            ..PublisherConfig::default()
        };
        let (mut p, mut store, mut log, mut now) = bulk_loaded(cfg);
        let key = |i: u64| format!("key:{i:06}").into_bytes();
        // (LSN, size) of each snapshot the heads named, and the batch
        // bytes pushed before each LSN.
        let mut snaps: Vec<(u64, u64)> = Vec::new();
        let mut bytes_at = vec![0u64; log.len() + 1];
        let mut rng = 0x9e37_79b9_u64;
        for _ in 0..6_000 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let op = Op::put(key((rng >> 33) % 20_000), vec![(rng >> 40) as u8; 100]);
            let payload = batch::encode(std::slice::from_ref(&op)).unwrap();
            log.push(vec![op]);
            let lsn = log.len() as u64;
            bytes_at.push(bytes_at[lsn as usize - 1] + payload.len() as u64);
            p.push(lsn, &payload, now).unwrap();
            now += 1;
            store.drive(&mut p, now);
            if let Some(s) = store.head().snapshot {
                if snaps.last().is_none_or(|(l, _)| *l != s.lsn) {
                    snaps.push((s.lsn, s.size));
                }
            }
        }
        for i in [0u64, 4_321, 19_999] {
            let (v, at, _) = cold_read(&store, &key(i));
            assert_eq!(
                v.as_ref(),
                model_at(&log, at).get(&key(i)),
                "key {i} at {at}"
            );
        }
        (snaps, bytes_at, store.head())
    };
    let (free, _, _) = run(None);
    let (held, bytes_at, head) = run(Some(25));
    // The first snapshot, by bytes after the load, is not held back.
    assert_eq!(held[0].0, free[0].0, "{held:?} against {free:?}");
    assert!(held[0].0 <= 21, "{held:?}");
    assert!(free.len() >= 15, "by snapshot_every alone: {free:?}");
    assert!(
        held.len() >= 2 && held.len() * 3 < free.len(),
        "held {held:?} against {free:?}"
    );
    for w in held.windows(2) {
        let ((a, size), (b, _)) = (w[0], w[1]);
        let since = bytes_at[b as usize] - bytes_at[a as usize];
        assert!(
            since as f64 >= 0.25 * size as f64,
            "snapshot at {b} after {since} bytes, the one at {a} is {size} bytes"
        );
    }
    assert!(!head.deltas.is_empty(), "deltas meanwhile");
}

/// A dataset that shrinks (most keys deleted after a snapshot) is not held
/// to the old snapshot's size: the floor weighs what the next snapshot
/// costs, so a snapshot comes after about the ratio times the state left,
/// not times the state that was.
#[test]
fn snapshot_ratio_weighs_a_dataset_that_shrank_by_what_is_left() {
    let cfg = PublisherConfig {
        snapshot_every: Some(20),
        snapshot_ratio_percent: Some(100),
        delta_every: Some(100),
        head_check_ms: 0,
        tail_bytes: 0,
        ..PublisherConfig::default()
    };
    let (mut p, mut store, mut log, mut now) = bulk_loaded(cfg);
    let first = store.head().snapshot.expect("a snapshot after the load");
    assert!(first.size > 2_000_000, "{:?}", (first.lsn, first.size));
    // Delete all but 100 of the 20,000 keys, 100 a batch.
    let mut bytes = 0u64;
    let mut push = |ops: Vec<Op>, store: &mut Store, log: &mut Vec<Vec<Op>>, now: &mut u64| {
        let payload = batch::encode(&ops).unwrap();
        log.push(ops);
        p.push(log.len() as u64, &payload, *now).unwrap();
        *now += 1;
        store.drive(&mut p, *now);
        payload.len() as u64
    };
    for chunk in 0..199u64 {
        let ops = (chunk * 100..(chunk + 1) * 100)
            .map(|i| Op::delete(format!("key:{i:06}").into_bytes()))
            .collect();
        bytes += push(ops, &mut store, &mut log, &mut now);
    }
    // Then updates of what is left, until a snapshot holds only that, in
    // fewer bytes of batches than half the first snapshot's size (where the
    // old size as the floor held every snapshot back).
    let mut i = 0u64;
    while store.head().snapshot.is_some_and(|s| s.entries != 100) && bytes < first.size / 2 {
        let op = Op::put(
            format!("key:{:06}", 19_900 + i % 100).into_bytes(),
            vec![7u8; 100],
        );
        bytes += push(vec![op], &mut store, &mut log, &mut now);
        i += 1;
    }
    let h = store.head();
    let now_snap = h.snapshot.expect("a snapshot");
    assert_eq!(
        now_snap.entries,
        100,
        "no snapshot of the 100 keys left after {bytes} bytes of batches (the first snapshot: {} bytes, the last: {:?})",
        first.size,
        (now_snap.lsn, now_snap.entries, now_snap.size)
    );
    for k in [0u64, 19_899, 19_900, 19_999] {
        let key = format!("key:{k:06}").into_bytes();
        let (v, at, _) = cold_read(&store, &key);
        assert_eq!(v.as_ref(), model_at(&log, at).get(&key), "key {k} at {at}");
    }
}

/// Keys of kilobytes that share most of their bytes, in blocks far larger
/// than the default: the block-indexed snapshot's blocks would decode to
/// more than readers take, so the publisher writes version 1 instead (read
/// whole), and the dataset stays readable.
#[test]
fn a_snapshot_whose_blocks_readers_would_refuse_is_written_as_version_1() {
    let cfg = PublisherConfig {
        snapshot_every: Some(80),
        snapshot_format: walcast_core::publisher::SnapshotFormat::Indexed(
            walcast_core::snapshot::indexed::IndexedOptions {
                block_bytes: 64 << 20,
                index_block_bytes: 64 << 10,
            },
        ),
        head_check_ms: 0,
        tail_bytes: 0,
        ..PublisherConfig::default()
    };
    let (mut p, mut store) = started(cfg);
    // 8,000 keys "a", "aa", ...: 32 MB of keys in some 2 MB of
    // prefix-compressed block.
    let mut want = BTreeMap::new();
    for lsn in 1..=80u64 {
        let ops: Vec<Op> = (0..100)
            .map(|i| {
                Op::put(
                    vec![b'a'; ((lsn - 1) * 100 + i + 1) as usize],
                    b"v".to_vec(),
                )
            })
            .collect();
        for op in &ops {
            if let Op::Put { key, value } = op {
                want.insert(key.clone(), value.clone());
            }
        }
        p.push(lsn, &batch::encode(&ops).unwrap(), lsn).unwrap();
        store.drive(&mut p, lsn);
    }
    for t in 0..100 {
        store.drive(&mut p, 100 + t * 100);
    }
    let head = store.head();
    let snap = head
        .snapshot
        .clone()
        .unwrap_or_else(|| panic!("no snapshot: committed {}", head.committed_lsn));
    assert_eq!((snap.lsn, snap.version), (80, 1));
    let (_, state) =
        walcast_core::snapshot::decode(&store.objects[&snap.key].0, Some(snap.crc32)).unwrap();
    let got: BTreeMap<Vec<u8>, Vec<u8>> = state
        .iter()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect();
    assert!(got == want, "the snapshot holds the origin's state");
}

/// A lazy replica reading through a delta chain meets a head whose newer
/// snapshot it cannot read by blocks (version 1) at an LSN inside that
/// chain, below the one it applied: it reads the chain whole into its
/// overlay before loading the snapshot, so its applied LSN never goes back
/// and every read afterwards answers the origin's state at that LSN.
/// A delta whose whole GET fails once (503) is tried again after a backoff,
/// and a block-indexed snapshot at the applied LSN that comes during the
/// load ends it (its end would take the state back).
///
/// Should the chain be gone (deleted), the snapshot is loaded as before: the
/// state goes back to it, and comes to the same LSN and answers again.
#[test]
fn a_version_1_snapshot_inside_the_chain_never_takes_a_lazy_replica_back() {
    for mode in [Mode::Chain, Mode::Flaky, Mode::Newer, Mode::Gone] {
        version_1_snapshot_inside_the_chain(mode);
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    /// The chain is there.
    Chain,
    /// Each delta's whole GET fails once.
    Flaky,
    /// A version 2 snapshot at the applied LSN comes during the load.
    Newer,
    /// The chain was deleted.
    Gone,
}

fn version_1_snapshot_inside_the_chain(mode: Mode) {
    let chain_gone = mode == Mode::Gone;
    let (mut p, mut store, mut lsn, mut now) = loaded(PublisherConfig {
        delta_every: Some(4),
        ..cfg_filters()
    });
    let base = store.head().snapshot.unwrap().lsn;
    let mut writes = Vec::new();
    for i in 0..12u64 {
        let k = format!("w:{:02}", i % 5).into_bytes();
        let v = format!("{i}").into_bytes();
        put(&mut p, &mut store, &mut lsn, &mut now, &k, &v);
        writes.push((lsn, k, v));
    }
    let top = lsn;
    let h = store.head();
    let end = h.delta_lsn().unwrap();
    assert!(!h.deltas.is_empty() && end > base + 4, "{:?}", h.deltas);
    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    assert_eq!(r.applied_lsn(), top);
    // A version 1 snapshot of the origin's state a little after the base,
    // inside the chain (its first delta ends past it).
    let at = base + 2;
    assert!(at < end);
    let mut st = walcast_core::state::KvState::new();
    for i in 0..20_000u64 {
        st.put(format!("key:{i:06}").as_bytes(), &[1u8; 100]);
    }
    for (l, k, v) in &writes {
        if *l <= at {
            st.put(k, v);
        }
    }
    let v1 = walcast_core::snapshot::encode(&st, at, h.epoch, h.dataset_id);
    let mut h2 = h.clone();
    h2.deltas.clear();
    let snap = h2.snapshot.as_mut().unwrap();
    snap.lsn = at;
    snap.key = walcast_core::catalog::snapshot_key(at, snap.epoch);
    snap.version = 1;
    snap.size = v1.len() as u64;
    snap.crc32 = crc32fast::hash(&v1);
    snap.entries = st.len();
    snap.suffix = None;
    snap.footer_crc32 = None;
    h2.generation += 1;
    store.objects.insert(snap.key.clone(), (v1, 1));
    let etag = store.objects[HEAD_KEY].1 + 1000;
    store
        .objects
        .insert(HEAD_KEY.to_string(), (h2.encode(), etag));
    if chain_gone {
        store.objects.retain(|k, _| object_kind(k) != Some("delta"));
    }
    // A version 2 snapshot of the state at the applied LSN.
    let newer = {
        let mut st = st.clone();
        for (l, k, v) in &writes {
            if *l > at {
                st.put(k, v);
            }
        }
        let bytes = walcast_core::snapshot::indexed::encode_indexed(
            &st,
            top,
            h.epoch,
            h.dataset_id,
            Default::default(),
        );
        let mut h3 = h2.clone();
        let snap = h3.snapshot.as_mut().unwrap();
        snap.lsn = top;
        snap.key = walcast_core::catalog::snapshot_key(top, snap.epoch);
        snap.version = 2;
        snap.size = bytes.len() as u64;
        snap.crc32 = crc32fast::hash(&bytes);
        snap.entries = st.len();
        h3.generation += 1;
        (h3, bytes)
    };
    let v1_key = h2.snapshot.as_ref().unwrap().key.clone();
    r.sync_now(0);
    let mut lowest = u64::MAX;
    let (mut t, mut c, mut failed) = (0u64, Cold::default(), Vec::new());
    let mut held = None;
    for _ in 0..20_000 {
        match r.poll(t) {
            replica::Action::Fetch(req) => {
                let whole_delta = object_kind(&req.key) == Some("delta")
                    && matches!(req.range, Some(ByteRange::Bounded { start: 0, .. }));
                let resp = if mode == Mode::Flaky && whole_delta && !failed.contains(&req.key) {
                    failed.push(req.key.clone());
                    GetResponse::Failed {
                        status: Some(503),
                        message: "busy".into(),
                    }
                } else {
                    store.serve(&req, &mut c)
                };
                if mode == Mode::Newer && req.key == v1_key && !failed.contains(&req.key) {
                    // The load has started: the publisher writes a snapshot
                    // at the applied LSN, and the replica reads that head
                    // before the load's first answer.
                    failed.push(req.key.clone());
                    let (h3, bytes) = &newer;
                    let snap = h3.snapshot.as_ref().unwrap();
                    store.objects.insert(snap.key.clone(), (bytes.clone(), 1));
                    let etag = store.objects[HEAD_KEY].1 + 1;
                    store
                        .objects
                        .insert(HEAD_KEY.to_string(), (h3.encode(), etag));
                    held = Some((req.id, resp));
                    r.sync_now(t);
                    continue;
                }
                r.handle_response(req.id, t, resp);
                if req.key == HEAD_KEY {
                    if let Some((id, resp)) = held.take() {
                        r.handle_response(id, t, resp);
                    }
                }
            }
            replica::Action::Event(_) => {}
            replica::Action::Wait { until } => {
                if t > 120_000 {
                    break;
                }
                t = until.clamp(t + 1, t + 5_000);
            }
        }
        lowest = lowest.min(r.applied_lsn());
    }
    if mode == Mode::Flaky {
        assert!(!failed.is_empty(), "a delta's whole GET failed");
    }
    if chain_gone {
        assert_eq!(lowest, at);
    } else {
        assert!(
            lowest >= top,
            "the applied LSN went back to {lowest} from {top}"
        );
    }
    assert_eq!(r.applied_lsn(), top);
    let mut want = BTreeMap::new();
    for (_, k, v) in &writes {
        want.insert(k.clone(), v.clone());
    }
    want.insert(b"key:000007".to_vec(), vec![1u8; 100]);
    for (k, v) in want {
        assert_eq!(
            read_through(&mut r, &store, &k),
            Some(Some(v)),
            "{}",
            String::from_utf8_lossy(&k)
        );
    }
}
