//! The delta chain under steady writes: short, equal to the origin at its
//! end, read a block or two at a time; a damaged or foreign delta is refused
//! and leaves no part of the chain applied.

use super::*;

#[test]
fn steady_writes_keep_a_short_chain_equal_to_the_origin() {
    let cfg = PublisherConfig {
        snapshot_every: Some(3_000),
        delta_every: Some(40),
        retain_lsns: Some(500),
        grace_ms: 50,
        head_check_ms: 0,
        tail_bytes: 0,
        max_commits_per_sec: 20,
        ..PublisherConfig::default()
    };
    let (mut p, mut store) = started(cfg);
    let mut rng = 0x1234_5678_u64;
    let mut log: Vec<Vec<Op>> = Vec::new();
    let mut wal_bytes = 0u64;
    let mut max_chain = 0;
    let mut deltas_seen = std::collections::BTreeSet::new();
    let mut bases_seen = std::collections::BTreeSet::new();
    let mut checked = 0;
    let mut worst = Cold::default();
    let k_of = |r: u64| format!("key:{:04}", (r >> 33) % 400).into_bytes();
    for now in 1..=8_000u64 {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let k = format!("key:{:04}", (rng >> 33) % 400).into_bytes();
        let op = if (rng >> 20) % 10 == 0 {
            Op::delete(k)
        } else {
            Op::put(k, vec![(rng >> 40) as u8; 100])
        };
        let payload = batch::encode(std::slice::from_ref(&op)).unwrap();
        wal_bytes += payload.len() as u64;
        log.push(vec![op]);
        p.push(now, &payload, now).unwrap();
        store.drive(&mut p, now);
        if now % 97 == 0 {
            let h = store.head();
            max_chain = max_chain.max(h.deltas.len());
            assert!(h.deltas.len() <= MAX_DELTAS);
            deltas_seen.extend(h.deltas.iter().map(|d| d.key.clone()));
            if let (Some(s), Some(end)) = (&h.snapshot, h.delta_lsn()) {
                bases_seen.insert(s.key.clone());
                assert_eq!(
                    materialize(&store, &h),
                    model_at(&log, end),
                    "base + deltas at LSN {end}"
                );
                checked += 1;
                for probe in [k_of(rng), k_of(rng >> 7), b"absent".to_vec()] {
                    let (v, at, cost) = cold_read(&store, &probe);
                    assert!(at >= end, "a cold replica starts at the chain's end");
                    assert_eq!(
                        v.as_ref(),
                        model_at(&log, at).get(&probe),
                        "{probe:?} at {at}"
                    );
                    worst = Cold {
                        rounds: worst.rounds.max(cost.rounds),
                        gets: worst.gets.max(cost.gets),
                        bytes: worst.bytes.max(cost.bytes),
                        segments: worst.segments.max(cost.segments),
                    };
                }
                // The chain keeps the segments a lazy replica replays short.
                assert!(h.committed_lsn - end < 40 + 200, "chain ends at {end}");
            }
        }
    }
    for t in 8_001..8_400 {
        store.drive(&mut p, t);
    }
    let h = store.head();
    assert!(checked > 50, "{checked} heads checked");
    assert!(bases_seen.len() >= 2, "a newer base replaced the first");
    assert!(deltas_seen.len() > 20, "{} deltas", deltas_seen.len());
    assert!(max_chain >= 2, "merges keep several deltas ({max_chain})");
    // Absorbed deltas were retired and deleted: no delta outside the chain
    // is left in the store once the grace period passed.
    let live: Vec<_> = store
        .objects
        .keys()
        .filter(|k| object_kind(k) == Some("delta"))
        .filter(|k| !h.deltas.iter().any(|d| &d.key == *k))
        .filter(|k| !h.retired.iter().any(|r| &r.key == *k))
        .collect();
    assert!(live.is_empty(), "unretired deltas left: {live:?}");
    assert!(store
        .deleted
        .iter()
        .any(|k| object_kind(k) == Some("delta")));
    println!("worst cold point read: {worst:?}");
    let up = &store.uploaded;
    let segs = up.get("segment").copied().unwrap_or(0);
    let snaps = up.get("snapshot").copied().unwrap_or(0);
    let deltas = up.get("delta").copied().unwrap_or(0);
    println!(
        "wal {wal_bytes} B; uploaded: segments {segs}, snapshots {snaps}, deltas {deltas}, \
         pages {}, head {}; (segments + snapshots + deltas) / wal = {:.2}; deltas / wal = {:.2}",
        up.get("page").copied().unwrap_or(0),
        up.get("head").copied().unwrap_or(0),
        (segs + snaps + deltas) as f64 / wal_bytes as f64,
        deltas as f64 / wal_bytes as f64,
    );
}

/// Segments past the chain's end stay inline in the head even when
/// `inline_segments` is smaller (up to four times it): a new lazy replica
/// finds every segment it replays after the chain in the head, with no
/// catalog page to fetch first. Older segments are paged out as before.
#[test]
fn segments_past_the_chain_stay_in_the_head() {
    let cfg = PublisherConfig {
        snapshot_every: Some(60),
        delta_every: Some(6),
        inline_segments: 2,
        page_fanout: 2,
        head_check_ms: 0,
        tail_bytes: 0,
        max_commits_per_sec: 0,
        ..PublisherConfig::default()
    };
    let (mut p, mut store) = started(cfg);
    let mut log: Vec<Vec<Op>> = Vec::new();
    let (mut checked, mut paged) = (0, 0);
    let mut now = 0u64;
    for lsn in 1..=300u64 {
        let op = Op::put(
            format!("key:{:03}", lsn % 50).into_bytes(),
            vec![lsn as u8; 100],
        );
        p.push(lsn, &batch::encode(std::slice::from_ref(&op)).unwrap(), now)
            .unwrap();
        log.push(vec![op]);
        // Each batch seals a segment of its own.
        for _ in 0..4 {
            now += 100;
            store.drive(&mut p, now);
        }
        let h = store.head();
        let Some(end) = h.delta_lsn() else {
            continue;
        };
        checked += 1;
        paged += h.pages.len();
        assert!(
            h.pages.iter().all(|r| r.last_lsn <= end),
            "LSN {lsn}: a page holds segments past the chain's end {end}"
        );
        let inline_from = h.segments.first().map_or(u64::MAX, |s| s.first_lsn);
        assert!(
            inline_from <= end + 1,
            "LSN {lsn}: segments past {end} missing"
        );
        let probe = format!("key:{:03}", lsn % 7).into_bytes();
        let (v, at, cost) = cold_read(&store, &probe);
        assert_eq!(
            v.as_ref(),
            model_at(&log, at).get(&probe),
            "{probe:?} at {at}"
        );
        assert!(cost.rounds <= 3, "LSN {lsn}: {cost:?}");
    }
    assert!(checked > 200, "{checked} heads checked");
    assert!(paged > 0, "older segments were paged out");
}

/// Segments past the chain carry key filters in the head: a new lazy
/// replica counts them applied without fetching them, so a cold read
/// answers at the head's LSN and fetches only the segments whose filter may
/// hold its key (none for a key they do not write). A scan reads them all.
/// Pages and segments the chain covers carry no filter.
#[test]
fn a_cold_read_fetches_only_the_segments_that_may_hold_its_key() {
    let cfg = PublisherConfig {
        snapshot_every: Some(20),
        delta_every: Some(1_000),
        inline_segments: 8,
        page_fanout: 2,
        head_check_ms: 0,
        tail_bytes: 0,
        max_commits_per_sec: 0,
        ..PublisherConfig::default()
    };
    let (mut p, mut store, mut log, mut now) = bulk_loaded(cfg);
    // Past the bulk load's snapshot: 19 batches of 5 new keys each, each
    // sealed into a segment of its own.
    for i in 0..19u64 {
        let ops: Vec<Op> = (0..5)
            .map(|j| Op::put(format!("fresh:{i:02}:{j}").into_bytes(), vec![i as u8; 40]))
            .collect();
        let lsn = log.len() as u64 + 1;
        p.push(lsn, &batch::encode(&ops).unwrap(), now).unwrap();
        log.push(ops);
        for _ in 0..4 {
            now += 100;
            store.drive(&mut p, now);
        }
    }
    let h = store.head();
    let end = h.delta_lsn().expect("a snapshot");
    let past: Vec<_> = h.segments.iter().filter(|s| s.last_lsn > end).collect();
    assert_eq!(
        past.len(),
        19,
        "every new batch is a segment past the chain"
    );
    assert!(
        past.iter().all(|s| s.filter.is_some()),
        "each carries a filter"
    );
    assert!(h
        .segments
        .iter()
        .filter(|s| s.last_lsn <= end)
        .all(|s| s.filter.is_none()));
    assert!(!h.pages.is_empty(), "older segments were paged out");
    for r in &h.pages {
        let page = walcast_core::catalog::Page::decode(&store.objects[&r.key].0, r).unwrap();
        assert!(
            page.segments.iter().all(|s| s.filter.is_none()),
            "page {}",
            r.key
        );
    }
    let committed = h.committed_lsn;
    // A key the segments do not write: no segment is fetched.
    let key = b"key:000123".to_vec();
    let (v, at, cost) = cold_read(&store, &key);
    assert_eq!(at, committed, "the read answers at the head's LSN");
    assert_eq!(v.as_ref(), model_at(&log, at).get(&key));
    assert_eq!(cost.segments, 0, "{cost:?}");
    assert!(cost.rounds <= 3, "{cost:?}");
    // A key one segment writes: that segment, and at most one more the
    // filters cannot rule out.
    for i in [0u64, 11, 18] {
        let key = format!("fresh:{i:02}:3").into_bytes();
        let (v, at, cost) = cold_read(&store, &key);
        assert_eq!(at, committed);
        assert_eq!(v, Some(vec![i as u8; 40]), "{key:?}");
        assert!((1..=2).contains(&cost.segments), "{key:?}: {cost:?}");
        assert!(cost.rounds <= 3, "{key:?}: {cost:?}");
    }
    // A scan reads every deferred segment first, and sees every new key.
    let mut r = Replica::new(
        ReplicaConfig {
            lazy_cache_bytes: Some(8 << 20),
            ..ReplicaConfig::default()
        },
        5,
    );
    let mut scan = walcast_core::replica::LazyScan::prefix(b"fresh:", 1_000);
    let mut stats = Cold::default();
    let mut got = None;
    for _ in 0..50 {
        if r.applied_lsn() >= committed {
            if let Read::Ready(entries) = r.scan_lazy(&mut scan).unwrap() {
                got = Some(entries);
                break;
            }
        }
        let mut reqs = Vec::new();
        loop {
            match r.poll(0) {
                walcast_core::replica::Action::Fetch(req) => reqs.push(req),
                walcast_core::replica::Action::Event(_) => {}
                walcast_core::replica::Action::Wait { .. } => break,
            }
        }
        for req in reqs {
            let resp = store.serve(&req, &mut stats);
            r.handle_response(req.id, 0, resp);
        }
    }
    let got = got.expect("the scan finished");
    let want: Vec<(Vec<u8>, Vec<u8>)> = model_at(&log, committed)
        .into_iter()
        .filter(|(k, _)| k.starts_with(b"fresh:"))
        .collect();
    assert_eq!(got.len(), 95);
    assert_eq!(got, want);
    assert_eq!(stats.segments, 19, "the scan fetched each segment once");
}

/// A key that every delta of the chain changes: a cold read of it fetches
/// the data blocks of at most two places that may hold it at once (the
/// newest two deltas here, and not the snapshot), so it stays within 8 GETs
/// in three round trips however many deltas changed the key.
#[test]
fn a_key_in_every_delta_costs_two_data_blocks() {
    let cfg = PublisherConfig {
        snapshot_every: Some(1_000),
        delta_every: Some(50),
        head_check_ms: 0,
        tail_bytes: 0,
        max_commits_per_sec: 0,
        ..PublisherConfig::default()
    };
    let (mut p, mut store) = started(cfg);
    let mut log: Vec<Vec<Op>> = Vec::new();
    let mut now = 1;
    let mut best = 0;
    for lsn in 1..=1_999u64 {
        // `key:000007` in every batch of ten, other keys between.
        let k = if lsn % 10 == 0 {
            "key:000007".to_string()
        } else {
            format!("key:{:06}", (lsn * 7_919) % 500)
        };
        let op = Op::put(k.into_bytes(), lsn.to_le_bytes().to_vec());
        p.push(lsn, &batch::encode(std::slice::from_ref(&op)).unwrap(), now)
            .unwrap();
        log.push(vec![op]);
        now += 1;
        store.drive(&mut p, now);
        let h = store.head();
        if h.deltas.len() < 3 || lsn % 10 != 9 {
            continue;
        }
        let key = b"key:000007".to_vec();
        let (v, at, cost) = cold_read(&store, &key);
        assert_eq!(v.as_ref(), model_at(&log, at).get(&key), "at {at}");
        assert!(cost.rounds <= 3, "LSN {lsn}: {cost:?}");
        // The head, the snapshot's index, each delta's index and filter,
        // two data blocks, and the segments whose filter may hold the key.
        let limit = 2 + h.deltas.len() as u64 + 2 + cost.segments;
        assert!(
            cost.gets <= limit,
            "LSN {lsn}, {} deltas: {cost:?}",
            h.deltas.len()
        );
        best = best.max(h.deltas.len());
    }
    assert!(best >= 3, "chains of {best} deltas");
}

/// Another delta of the same size, base and entry count at a delta's key
/// (a dataset started over at the prefix, cached): a lazy read refuses it
/// by the footer's CRC-32 the catalog records.
#[test]
fn a_lazy_read_refuses_another_delta_of_the_same_size_by_its_footer_crc() {
    let mut store = small_chain_store();
    let h = store.head();
    let d = h.deltas.last().expect("a delta over the snapshot").clone();
    assert!(d.footer_crc32.is_some());
    let bytes = store.objects[&d.key].0.clone();
    let (key, want) = key_only_in(&bytes, d.lsn);
    assert_eq!(cold_read(&store, &key).0, want);
    let delta = decode_delta(&bytes).unwrap();
    let flipped: Vec<(Vec<u8>, Option<Vec<u8>>)> = delta
        .changes
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_ref().map(|v| v.iter().map(|b| b ^ 0x5a).collect()),
            )
        })
        .collect();
    let meta = walcast_core::snapshot::delta::DeltaMeta {
        base_lsn: delta.base_lsn,
        lsn: d.lsn,
        epoch: d.epoch,
        dataset_id: walcast_core::catalog::DatasetId([9; 16]),
    };
    let changes = flipped.iter().map(|(k, v)| (k.as_slice(), v.as_deref()));
    let other = walcast_core::snapshot::delta::encode_delta_readable(
        changes,
        meta,
        walcast_core::snapshot::delta::DEFAULT_DELTA_BLOCK_BYTES,
    )
    .expect("a readable delta");
    assert_eq!(other.len(), bytes.len());
    store.objects.get_mut(&d.key).unwrap().0 = other;
    let err = try_cold_read(&store, &key).expect_err("the other delta is refused");
    assert_eq!(err.kind(), walcast_core::error::ErrorKind::Data, "{err}");
    assert_eq!(err.object(), Some(d.key.as_str()), "{err}");
}

/// A delta whose file matches the catalog's crc32 but does not decode (a
/// hostile server with a head to match, or a publisher's bug): a scan that
/// reaches its damaged block fails naming it, and nothing of the chain is
/// taken without that block: a later read of a key the delta changed fails
/// too instead of answering the older value beneath it.
#[test]
fn a_delta_that_fails_to_decode_leaves_no_part_of_the_chain_applied() {
    let mut store = small_chain_store();
    let mut h = store.head();
    let d = h.deltas.last().expect("a delta over the snapshot").clone();
    let bytes = store.objects[&d.key].0.clone();
    let (key, want) = key_only_in(&bytes, d.lsn);
    assert_eq!(cold_read(&store, &key).0, want);
    let block = delta_index(&bytes)
        .block_for(&key)
        .expect("the key's block");
    let bad = &mut store.objects.get_mut(&d.key).unwrap().0;
    bad[block.offset as usize + 20] ^= 0x10;
    let crc = crc32fast::hash(bad);
    h.deltas.last_mut().unwrap().crc32 = crc;
    store.objects.get_mut(HEAD_KEY).unwrap().0 = h.encode();

    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    let mut scan = LazyScan::prefix(b"key:", usize::MAX);
    let mut err = None;
    for _ in 0..100 {
        match r.scan_lazy(&mut scan) {
            Ok(Read::Ready(_)) => panic!("a scan through a damaged delta answered"),
            Ok(Read::Pending) => {
                let reqs = collect(&mut r);
                store.answer(&mut r, reqs, &mut Cold::default());
            }
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let e = err.expect("the scan failed");
    assert_eq!(e.kind(), walcast_core::ErrorKind::Data, "{e}");
    assert_eq!(e.object(), Some(d.key.as_str()), "{e}");
    for _ in 0..100 {
        match r.get_lazy(&key) {
            Ok(Read::Ready(v)) => {
                panic!("a read through a damaged delta answered {v:?} (the delta has {want:?})")
            }
            Ok(Read::Pending) => {
                let reqs = collect(&mut r);
                store.answer(&mut r, reqs, &mut Cold::default());
            }
            Err(e) => {
                assert_eq!(e.object(), Some(d.key.as_str()), "{e}");
                return;
            }
        }
    }
    panic!("the read neither answered nor failed");
}

/// A head naming a newer snapshot that ends inside the chain in use (a
/// hostile or broken head: an honest publisher writes a snapshot past the
/// chain's end) does not replace the base: the writes in the chain's deltas
/// past that snapshot would be lost to reads.
#[test]
fn a_snapshot_inside_the_chain_in_use_does_not_replace_the_base() {
    let mut store = small_chain_store();
    let h = store.head();
    let snap = h.snapshot.clone().expect("a snapshot");
    let d = h.deltas.last().expect("a chain").clone();
    assert!(d.lsn > snap.lsn + 1);
    let bytes = store.objects[&d.key].0.clone();
    let (key, want) = key_only_in(&bytes, d.lsn);
    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    // The same head, naming a snapshot between the old one and the chain's
    // end (its object does not exist) and no deltas.
    let mut forged = h.clone();
    let inside = d.lsn - 1;
    let mut s2 = snap.clone();
    s2.lsn = inside;
    s2.key = walcast_core::catalog::snapshot_key(inside, s2.epoch);
    s2.suffix = None;
    forged.snapshot = Some(s2);
    forged.deltas.clear();
    forged.generation += 1;
    store.etag += 1;
    store
        .objects
        .insert(HEAD_KEY.into(), (forged.encode(), store.etag));
    r.sync_now(0);
    settle(&mut r, &store);
    for _ in 0..100 {
        match r.get_lazy(&key) {
            Ok(Read::Ready(v)) => {
                assert_eq!(v, want);
                return;
            }
            Ok(Read::Pending) => {
                let reqs = collect(&mut r);
                store.answer(&mut r, reqs, &mut Cold::default());
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("the read did not finish");
}

/// The data blocks of the snapshot and of every delta together stay within
/// `lazy_cache_bytes` (give or take one block), however many deltas the
/// reads go through: the deltas share a quarter of the bound, past which
/// each keeps only the last four blocks it got (for reads waiting on a
/// block of each).
#[test]
fn the_deltas_blocks_share_the_cache_bound_with_the_snapshot() {
    let (store, keys) = new_keys_over_a_chain();
    let bound = 128u64 << 10;
    let mut r = settled_with_cache(&store, bound);
    let mut most = 0;
    for (n, k) in keys.iter().enumerate().step_by(7) {
        let v = read_through(&mut r, &store, k).expect("the read finished");
        assert_eq!(v, Some(vec![(n / 100) as u8; 100]));
        most = most.max(r.status(0).lazy.unwrap().cached_bytes);
    }
    let deltas = store.head().deltas.len() as u64;
    assert!(
        most <= bound + (17 << 10) * (1 + 4 * deltas),
        "{most} bytes of blocks held under a bound of {bound}"
    );
}

/// A key of an older delta that a newer delta's filter lets through (a
/// false positive), read with a cache whose deltas' share is below one
/// block: the read takes a block of each delta at once, and each must
/// survive the other's arrival, or the read asks for them for ever.
#[test]
fn a_read_needing_a_block_of_two_deltas_finishes_under_a_tiny_cache() {
    let (store, keys) = new_keys_over_a_chain();
    let h = store.head();
    let idx: Vec<DeltaIndex> = h
        .deltas
        .iter()
        .map(|d| delta_index(&store.objects[&d.key].0))
        .collect();
    let holds = |i: usize, k: &[u8]| {
        decode_delta(&store.objects[&h.deltas[i].key].0)
            .unwrap()
            .changes
            .iter()
            .any(|(x, _)| x.as_slice() == k)
    };
    let n = h.deltas.len();
    let (pos, key) = keys
        .iter()
        .enumerate()
        .find(|(_, k)| idx[n - 1].block_for(k).is_some() && !holds(n - 1, k) && holds(n - 2, k))
        .expect("a false positive of the newest delta's filter among the older one's keys");
    let mut r = settled_with_cache(&store, 16 << 10);
    let v = read_through(&mut r, &store, key).expect("the read finished");
    assert_eq!(v, Some(vec![(pos / 100) as u8; 100]));
}

/// A store whose newest delta is damaged: a cold read through it fails with
/// a data error naming the delta, never panics or hangs, and reads of keys
/// the filters rule out still answer.
#[test]
fn a_damaged_delta_fails_the_read_naming_it() {
    let store2 = small_chain_store();
    let h = store2.head();
    let d = h.deltas.last().expect("a delta over the snapshot").clone();
    // A key the newest delta holds and no later batch wrote.
    let bytes = store2.objects[&d.key].0.clone();
    let (key, want) = key_only_in(&bytes, d.lsn);
    let (v, _, _) = cold_read(&store2, &key);
    assert_eq!(v, want);
    let block = delta_index(&bytes)
        .block_for(&key)
        .expect("the key's block");
    // A flipped byte in the delta's filter, then in the key's data block.
    for at in [d.size - 70, block.offset + 20] {
        let mut bad = Store {
            objects: store2.objects.clone(),
            ..Store::default()
        };
        bad.objects.get_mut(&d.key).unwrap().0[at as usize] ^= 0x10;
        let e = try_cold_read(&bad, &key).expect_err("a damaged delta is not used");
        assert_eq!(e.kind(), walcast_core::ErrorKind::Data, "{e}");
        assert_eq!(e.object(), Some(d.key.as_str()), "{e}");
    }
    // A delta gone from the store: an error, not a hang.
    let mut gone = Store {
        objects: store2.objects.clone(),
        ..Store::default()
    };
    gone.objects.remove(&d.key);
    assert!(try_cold_read(&gone, &key).is_err());
}

/// 20,000 keys loaded and snapshotted, then nine batches that rewrite or
/// delete a share of them, fewer every three: a chain of two or more deltas
/// holding more than 1 MiB over the snapshot. Returns the store, the
/// batches and the last LSN.
fn chain_over_a_load() -> (Store, Vec<Vec<Op>>, u64) {
    let (store, log, lsn) = chain_written(|b, i| {
        let key = format!("key:{i:06}").into_bytes();
        if (i + b) % 9 == 0 {
            Op::delete(key)
        } else {
            Op::put(key, vec![(b + 2) as u8; 100])
        }
    });
    let h = store.head();
    assert!(h.deltas.len() >= 2, "a chain: {:?}", h.deltas);
    let chain_bytes: u64 = h.deltas.iter().map(|d| d.size).sum();
    assert!(chain_bytes > 1 << 20, "the chain holds {chain_bytes} bytes");
    (store, log, lsn)
}

/// 20,000 keys loaded and snapshotted (one snapshot, a delta every three
/// batches), then nine batches of `op(b, i)` for batch `b` and a share of
/// the keys `i` below 20,000, fewer every three. Returns the store, the
/// batches (the load's included) and the last LSN.
fn chain_written(op: impl Fn(u64, u64) -> Op) -> (Store, Vec<Vec<Op>>, u64) {
    let cfg = PublisherConfig {
        delta_every: Some(3),
        // One snapshot at the load's end, and none after it (within 4
        // times its size).
        snapshot_bytes: Some(2 << 20),
        snapshot_ratio_percent: Some(400),
        ..cfg_filters()
    };
    let (mut p, mut store, mut lsn, mut now) = loaded(cfg);
    let mut log: Vec<Vec<Op>> = (0..20u64)
        .map(|chunk| {
            (chunk * 1_000..(chunk + 1) * 1_000)
                .map(|i| Op::put(format!("key:{i:06}").into_bytes(), vec![1u8; 100]))
                .collect()
        })
        .collect();
    for b in 0..9u64 {
        let every = [2, 16, 128][b as usize / 3];
        let ops: Vec<Op> = (0..20_000u64)
            .filter(|i| (i * 7 + b) % every == 0)
            .map(|i| op(b, i))
            .collect();
        push_and_drive(&mut p, &mut store, (&mut lsn, &mut now), &ops, (50, 10));
        log.push(ops);
    }
    (store, log, lsn)
}

/// The first `n` entries of `want` from `start` on.
fn entries_from(
    want: &std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
    start: &[u8],
    n: usize,
) -> Entries {
    want.range(start.to_vec()..)
        .take(n)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Steps `scan` on `r` to its answer, serving each turn's GETs together.
fn scan_through(r: &mut Replica, store: &Store, mut scan: LazyScan) -> (Entries, Cold) {
    scan_through_mut(r, store, &mut scan)
}

/// A scan through a chain that changed most keys reads, of each delta, the
/// data blocks that hold its range, not the whole chain, and leaves none of
/// it in the overlay: a scan of 10 entries costs a few blocks, and a whole
/// scan returns the origin's state, reading the chain's next blocks ahead.
#[test]
fn a_scan_reads_the_blocks_of_the_chain_it_needs() {
    let (store, log, lsn) = chain_over_a_load();
    let h = store.head();
    let chain_bytes: u64 = h.deltas.iter().map(|d| d.size).sum();
    let end = h.deltas.last().unwrap().lsn;
    // Keys written past the chain (the overlay holds those).
    let past: std::collections::BTreeSet<&[u8]> = log[end as usize..]
        .iter()
        .flatten()
        .map(|op| match op {
            Op::Put { key, .. } | Op::Delete { key } => key.as_slice(),
        })
        .collect();
    let want = model_at(&log, lsn);

    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    assert_eq!(r.applied_lsn(), lsn);
    let (got, c) = scan_through(&mut r, &store, LazyScan::new(b"key:010000", None, 10));
    let expect = entries_from(&want, b"key:010000", 10);
    assert!(
        got == expect,
        "{} entries, want {}",
        got.len(),
        expect.len()
    );
    eprintln!("a scan of 10 entries over a chain of {chain_bytes} bytes: {c:?}");
    assert!(
        c.bytes < chain_bytes / 8,
        "a scan of 10 entries fetched {} bytes of a chain of {chain_bytes} ({c:?})",
        c.bytes
    );
    // The overlay holds the writes past the chain, and the changes of the
    // blocks the scan read: not the chain's thousands.
    let chain_entries: u64 = h.deltas.iter().map(|d| d.entries).sum();
    let status = r.status(0).lazy.expect("lazy");
    assert!(
        status.overlay_entries <= past.len() as u64 + 200,
        "{status:?}: {} keys written past the chain of {chain_entries} changes",
        past.len()
    );
    let (got, c) = scan_through(&mut r, &store, LazyScan::new(b"", None, usize::MAX));
    assert!(
        got.iter().map(|(k, v)| (k, v)).eq(want.iter()),
        "a whole scan differs from the origin ({} entries, want {})",
        got.len(),
        want.len()
    );
    // A whole scan reads the chain's blocks once, several windows a round
    // trip (one a round trip took 201); the changes it leaves in the
    // overlay stay within the deltas' quarter of the 8 MiB cache.
    assert!(c.bytes < chain_bytes * 2, "{c:?}");
    assert!(c.rounds <= 60, "a whole scan took {} round trips", c.rounds);
    let status = r.status(0).lazy.expect("lazy");
    eprintln!("after a whole scan: {status:?}, {c:?}");
    assert!(
        status.overlay_bytes <= (2 << 20) + (256 << 10),
        "{status:?}"
    );
}

/// Two scans stepped in turn over the chain with a cache so small that
/// each drops the chain's changes the other wrote into the overlay (and a
/// point read between their turns): every answer is the origin's.
#[test]
fn scans_that_drop_each_others_chain_changes_answer_the_origin() {
    let (store, log, lsn) = chain_over_a_load();
    let want = model_at(&log, lsn);
    let mut r = settled_with_cache(&store, 64 << 10);
    assert_eq!(r.applied_lsn(), lsn);
    let starts: [&[u8]; 2] = [b"key:000000", b"key:010000"];
    let mut scans: Vec<Option<LazyScan>> = starts
        .iter()
        .map(|s| Some(LazyScan::new(s, None, 3_000)))
        .collect();
    let mut c = Cold::default();
    let mut probe = 0u64;
    for _ in 0..10_000 {
        if scans.iter().all(Option::is_none) {
            let status = r.status(0).lazy.expect("lazy");
            assert!(status.overlay_bytes < 256 << 10, "{status:?}");
            return;
        }
        for (i, slot) in scans.iter_mut().enumerate() {
            let Some(scan) = slot.as_mut() else { continue };
            if let Read::Ready(got) = r.scan_lazy(scan).expect("a scan") {
                let expect = entries_from(&want, starts[i], 3_000);
                let first_diff = got.iter().zip(&expect).position(|(a, b)| a != b);
                assert!(
                    got == expect,
                    "scan {i}: {} entries (want {}), first difference at {first_diff:?}",
                    got.len(),
                    expect.len()
                );
                *slot = None;
            }
        }
        probe = (probe * 31 + 7) % 20_000;
        let key = format!("key:{probe:06}").into_bytes();
        if let Read::Ready(v) = r.get_lazy(&key).expect("a read") {
            assert_eq!(v.as_ref(), want.get(&key), "{key:?}");
        }
        let reqs = collect(&mut r);
        store.answer(&mut r, reqs, &mut c);
    }
    panic!("the scans did not finish");
}

/// Three scans stepped in turn over the chain with a 16 KiB cache, and
/// with a 2 MiB one (their next blocks read ahead): the blocks one's
/// answers bring do not evict the ones another waits for (each would ask
/// again for ever), so each finishes with the origin's entries.
#[test]
fn three_scans_over_a_chain_with_a_small_cache_finish() {
    let (store, log, lsn) = chain_over_a_load();
    let want = model_at(&log, lsn);
    for cache in [16 << 10, 2 << 20] {
        three_scans_finish(&store, &want, cache);
    }
}

fn three_scans_finish(
    store: &Store,
    want: &std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
    cache: u64,
) {
    let mut r = settled_with_cache(store, cache);
    let starts: [&[u8]; 3] = [b"key:000000", b"key:006333", b"key:012666"];
    let mut scans: Vec<Option<LazyScan>> = starts
        .iter()
        .map(|s| Some(LazyScan::new(s, None, 2_000)))
        .collect();
    let mut c = Cold::default();
    for _ in 0..1_000 {
        if scans.iter().all(Option::is_none) {
            eprintln!("three scans with a cache of {cache} bytes: {c:?}");
            return;
        }
        for (i, slot) in scans.iter_mut().enumerate() {
            let Some(scan) = slot.as_mut() else { continue };
            if let Read::Ready(got) = r.scan_lazy(scan).expect("a scan") {
                let expect = entries_from(want, starts[i], 2_000);
                assert!(got == expect, "scan {i}: {} entries", got.len());
                *slot = None;
            }
        }
        let reqs = collect(&mut r);
        store.answer(&mut r, reqs, &mut c);
    }
    panic!("the scans did not finish in 1,000 turns with a cache of {cache} bytes: {c:?}");
}

/// Nine batches after the 20,000-key load: `deletes` deletes keys of the
/// load (as `chain_over_a_load`), else as many puts to keys it never had.
fn chain_of(deletes: bool) -> (Store, Vec<Vec<Op>>, u64) {
    chain_written(|b, i| {
        if b >= 6 {
            // The same in both: the tail past the chain's end.
            Op::put(format!("zzz:{i:06}").into_bytes(), vec![b as u8; 100])
        } else if deletes {
            Op::delete(format!("key:{i:06}").into_bytes())
        } else {
            Op::put(format!("other:{i:06}").into_bytes(), vec![9u8; 100])
        }
    })
}

/// A store that named a chain deleting keys (a head that lied, or another
/// epoch's history over the same base), then the true chain over the same
/// base to the same LSN: the replica replaces the chain, and a scan asked
/// again after its answer must return the new state, not one missing the
/// snapshot entries the old chain's deletions hid.
#[test]
fn a_scan_asked_again_after_the_chain_was_replaced_answers_the_new_chain() {
    let (lie, _, lsn) = chain_of(true);
    let (mut truth, log, lsn2) = chain_of(false);
    assert_eq!(lsn, lsn2);
    let (hl, ht) = (lie.head(), truth.head());
    assert_eq!(hl.snapshot, ht.snapshot, "the same base");
    assert_eq!(hl.delta_lsn(), ht.delta_lsn(), "chains to the same LSN");
    assert!(
        hl.delta_lsn().unwrap() >= 26,
        "the chain holds the batches that differ"
    );
    assert_ne!(hl.deltas, ht.deltas);
    // The true head under another etag, so the replica reads it.
    truth.objects.get_mut(HEAD_KEY).unwrap().1 += 1_000;

    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &lie);
    assert_eq!(r.applied_lsn(), lsn);
    let mut scan = LazyScan::new(b"key:000000", None, 2_000);
    let (got, _) = scan_through_mut(&mut r, &lie, &mut scan);
    assert!(!got.is_empty());

    // The truth: the chain is replaced (same base, same end).
    r.sync_now(0);
    settle(&mut r, &truth);
    assert_eq!(r.applied_lsn(), lsn);
    let want = model_at(&log, lsn);
    let expect = entries_from(&want, b"key:000000", 2_000);
    // A new scan sees the truth...
    let (fresh, _) = scan_through(&mut r, &truth, LazyScan::new(b"key:000000", None, 2_000));
    assert!(fresh == expect, "a new scan: {} entries", fresh.len());
    // ... and so must the scan asked again.
    let (again, _) = scan_through_mut(&mut r, &truth, &mut scan);
    let first_diff = again.iter().zip(&expect).position(|(a, b)| a != b);
    assert!(
        again == expect,
        "the scan asked again: first difference at {first_diff:?}: got {:?}, want {:?}",
        first_diff.map(|i| String::from_utf8_lossy(&again[i].0).into_owned()),
        first_diff.map(|i| String::from_utf8_lossy(&expect[i].0).into_owned()),
    );
}

/// Steps `scan` on `r` to its answer, serving each turn's GETs together
/// (the scan stays the caller's, to be asked again).
fn scan_through_mut(r: &mut Replica, store: &Store, scan: &mut LazyScan) -> (Entries, Cold) {
    let mut c = Cold::default();
    for _ in 0..1_000 {
        match r.scan_lazy(scan).expect("a scan") {
            Read::Ready(got) => return (got, c),
            Read::Pending => {
                let reqs = collect(r);
                c.rounds += 1;
                store.answer(r, reqs, &mut c);
            }
        }
    }
    panic!("the scan did not finish");
}

/// The GETs a whole scan over the chain reads ahead in one round fail (a
/// 503), every other GET is answered: the scan asks again for those blocks
/// when it needs them, and answers the origin's state, instead of failing
/// with the error of a GET it made only ahead of need.
#[test]
fn a_failed_read_ahead_does_not_fail_the_scan() {
    let (store, log, lsn) = chain_over_a_load();
    let want = model_at(&log, lsn);
    let mut r = settled_with_cache(&store, 8 << 20);
    let mut scan = LazyScan::new(b"", None, usize::MAX);
    let mut c = Cold::default();
    let mut failed_once = false;
    for round in 0..1_000 {
        match r.scan_lazy(&mut scan) {
            Ok(Read::Ready(got)) => {
                assert!(got.iter().map(|(k, v)| (k, v)).eq(want.iter()));
                assert!(failed_once, "no GET read ahead failed");
                return;
            }
            Err(e) => panic!("round {round}: the scan failed: {e}"),
            Ok(Read::Pending) => {}
        }
        let reqs = collect(&mut r);
        // The lowest offset asked of each delta this round: its window.
        let mut lowest: HashMap<String, u64> = HashMap::new();
        for g in &reqs {
            if let Some(ByteRange::Bounded { start, .. }) = g.range {
                if g.key.starts_with("deltas/") {
                    let e = lowest.entry(g.key.clone()).or_insert(start);
                    *e = (*e).min(start);
                }
            }
        }
        let mut failed_now = 0;
        for g in reqs {
            let ahead = match g.range {
                Some(ByteRange::Bounded { start, .. }) => {
                    g.key.starts_with("deltas/") && lowest.get(&g.key).is_some_and(|l| *l < start)
                }
                _ => false,
            };
            if ahead && !failed_once {
                failed_now += 1;
                r.handle_response(
                    g.id,
                    0,
                    GetResponse::Failed {
                        status: Some(503),
                        message: "busy".into(),
                    },
                );
            } else {
                let resp = store.serve(&g, &mut c);
                r.handle_response(g.id, 0, resp);
            }
        }
        failed_once |= failed_now > 0;
    }
    panic!("the scan did not finish");
}
