//! Pointer deltas (version 5): the chain names each key's record in a
//! segment, not its value. Cold reads and scans answer as the origin, in
//! the round trips and GETs of a value chain, for a fraction of its bytes.

use super::*;

/// Steady writes and deletes to 400 keys with pointer deltas: every chain
/// the head names equals the origin at its end, cold point reads answer as
/// the origin within three round trips and eight GETs, and whole scans
/// through a settled lazy replica return the origin's state.
#[test]
fn pointer_chains_answer_cold_reads_and_scans_as_the_origin() {
    let cfg = PublisherConfig {
        snapshot_every: Some(3_000),
        delta_every: Some(40),
        retain_lsns: Some(500),
        grace_ms: 50,
        head_check_ms: 0,
        tail_bytes: 0,
        max_commits_per_sec: 20,
        pointer_deltas: true,
        ..PublisherConfig::default()
    };
    let (mut p, mut store) = started(cfg);
    let mut rng = 0x1234_5678_u64;
    let mut log: Vec<Vec<Op>> = Vec::new();
    let mut pointer_deltas = std::collections::BTreeSet::new();
    let mut worst = Cold::default();
    let mut scans = 0;
    let k_of = |r: u64| format!("key:{:04}", (r >> 33) % 400).into_bytes();
    for now in 1..=6_000u64 {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let k = k_of(rng);
        let op = if (rng >> 20) % 10 == 0 {
            Op::delete(k)
        } else {
            Op::put(k, vec![(rng >> 40) as u8; 100])
        };
        let payload = batch::encode(std::slice::from_ref(&op)).unwrap();
        log.push(vec![op]);
        p.push(now, &payload, now).unwrap();
        store.drive(&mut p, now);
        if now % 97 != 0 {
            continue;
        }
        let h = store.head();
        let (Some(_), Some(end)) = (&h.snapshot, h.delta_lsn()) else {
            continue;
        };
        pointer_deltas.extend(
            h.deltas
                .iter()
                .filter(|d| d.slots.is_some())
                .map(|d| d.key.clone()),
        );
        assert_eq!(
            materialize(&store, &h),
            model_at(&log, end),
            "chain at {end}"
        );
        for probe in [k_of(rng), k_of(rng >> 7), b"absent".to_vec()] {
            let (v, at, cost) = cold_read(&store, &probe);
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
        if now % (97 * 3) == 0 {
            // A whole scan with a small cache: windows of records.
            let mut r = settled_with_cache(&store, 16 << 10);
            let at = r.applied_lsn();
            let got = scan_all(&mut r, &store, LazyScan::new(b"", None, 1_000));
            let want: Entries = model_at(&log, at).into_iter().collect();
            assert_eq!(got, want, "scan at {at}");
            scans += 1;
        }
    }
    assert!(
        pointer_deltas.len() > 20,
        "{} pointer deltas",
        pointer_deltas.len()
    );
    assert!(scans > 5, "{scans} scans");
    assert!(
        worst.rounds <= 3 && worst.gets <= 8,
        "worst cold read {worst:?}"
    );
    println!("worst cold point read: {worst:?}");
}

/// The same writes publish a fraction of the delta bytes as pointers: the
/// values stay in their segments.
#[test]
fn pointer_deltas_upload_a_fraction_of_value_deltas() {
    let run = |pointer_deltas: bool| {
        let cfg = PublisherConfig {
            // One snapshot after the load, none after it.
            snapshot_every: Some(1),
            snapshot_bytes: Some(200_000),
            snapshot_ratio_percent: Some(100_000),
            delta_every: Some(200),
            head_check_ms: 0,
            tail_bytes: 0,
            pointer_deltas,
            ..PublisherConfig::default()
        };
        let (mut p, mut store) = started(cfg);
        let mut rng = 7u64;
        // A base first: 2,000 keys in 2 batches, then a snapshot.
        for b in 0..2u64 {
            let ops: Vec<Op> = (b * 1_000..(b + 1) * 1_000)
                .map(|i| Op::put(format!("key:{i:06}").into_bytes(), vec![1; 100]))
                .collect();
            p.push(b + 1, &batch::encode(&ops).unwrap(), b + 1).unwrap();
            store.drive(&mut p, b + 1);
        }
        for now in 3..=20_000u64 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let k = format!("key:{:06}", (rng >> 33) % 2_000).into_bytes();
            let op = Op::put(k, vec![(rng >> 40) as u8; 100]);
            p.push(now, &batch::encode(&[op]).unwrap(), now).unwrap();
            store.drive(&mut p, now);
        }
        let h = store.head();
        assert!(h.deltas.iter().all(|d| d.slots.is_some() == pointer_deltas));
        store.uploaded.get("delta").copied().unwrap_or(0)
    };
    let (values, pointers) = (run(false), run(true));
    println!("delta bytes: values {values}, pointers {pointers}");
    assert!(
        pointers * 5 < values * 2,
        "values {values}, pointers {pointers}"
    );
}

/// Steps `scan` to its answer.
fn scan_all(r: &mut Replica, store: &Store, mut scan: LazyScan) -> Entries {
    for _ in 0..100_000 {
        match r.scan_lazy(&mut scan).expect("a scan") {
            Read::Ready(e) => return e,
            Read::Pending => settle(r, store),
        }
    }
    panic!("the scan did not finish");
}

/// Two keys whose fingerprints collide, both written by one batch, and the
/// later of them written again alone: a read of the later key returns its
/// newest value even when the other key's record (which writes it too,
/// earlier) was fetched first.
#[test]
fn a_colliding_fingerprint_never_answers_an_older_write() {
    let fnv = |k: &[u8]| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in k {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h >> 32
    };
    // Two keys with the same upper 32 bits of FNV-1a (a birthday search).
    let mut seen = HashMap::new();
    let (a, b) = (0u64..)
        .find_map(|i| {
            let k = format!("c:{i:08}").into_bytes();
            seen.insert(fnv(&k), k.clone()).map(|other| (k, other))
        })
        .unwrap();
    let (mut p, mut store) = started(snapshot_first_then_pointer_deltas());
    let batches = [
        vec![Op::put(b"z".to_vec(), vec![0; 10])],
        vec![
            Op::put(a.clone(), b"old".to_vec()),
            Op::put(b.clone(), b"b".to_vec()),
        ],
        vec![Op::put(a.clone(), b"new".to_vec())],
        vec![Op::put(b"y".to_vec(), vec![1])],
        vec![Op::put(b"x".to_vec(), vec![2])],
    ];
    for (i, ops) in batches.iter().enumerate() {
        let now = i as u64 + 1;
        p.push(now, &batch::encode(ops).unwrap(), now).unwrap();
        store.drive(&mut p, now);
    }
    for t in 10..200 {
        store.drive(&mut p, t);
    }
    let h = store.head();
    let d = h.deltas.last().expect("a delta");
    assert!(
        d.slots.is_some() && d.base_lsn < 2 && d.lsn >= 3,
        "{:?}",
        h.deltas
    );
    let mut r = settled_with_cache(&store, 1 << 20);
    let mut get = |k: &[u8]| loop {
        match r.get_lazy(k).expect("a read") {
            Read::Ready(v) => return v,
            Read::Pending => settle(&mut r, &store),
        }
    };
    assert_eq!(get(&b).as_deref(), Some(&b"b"[..]));
    assert_eq!(
        get(&a).as_deref(),
        Some(&b"new"[..]),
        "{a:?} collides with {b:?}"
    );
}

/// A head that states other slot pages than a pointer delta's file holds
/// (one page more): a cold read of a key the delta changed fails with a
/// `data` error naming the delta, never answers the snapshot's older value.
#[test]
fn a_head_stating_other_slot_pages_fails_the_read_not_answers_stale() {
    let (mut p, mut store) = started(snapshot_first_then_pointer_deltas());
    let key = |i: u64| format!("k:{i:05}").into_bytes();
    let mut now = 0;
    for round in 0..2u64 {
        for chunk in 0..4u64 {
            now += 1;
            let ops: Vec<Op> = (chunk * 500..(chunk + 1) * 500)
                .map(|i| Op::put(key(i), vec![round as u8; 40]))
                .collect();
            p.push(now, &batch::encode(&ops).unwrap(), now).unwrap();
            store.drive(&mut p, now);
        }
    }
    for t in now + 1..now + 200 {
        store.drive(&mut p, t);
    }
    let mut h = store.head();
    let d = h.deltas.last_mut().expect("a delta");
    let sp = d.slots.as_mut().expect("a pointer delta");
    assert!(sp.pages >= 2, "{sp:?}");
    let delta_key = d.key.clone();
    // The honest head answers round 1's value.
    let (v, ..) = cold_read(&store, &key(7));
    assert_eq!(v, Some(vec![1; 40]));
    sp.pages += 1;
    let etag = store.objects[HEAD_KEY].1 + 1000;
    store
        .objects
        .insert(HEAD_KEY.to_string(), (h.encode(), etag));
    for i in 0..40 {
        match try_cold_read(&store, &key(i * 50)) {
            Err(e) => {
                assert_eq!(e.kind(), walcast_core::ErrorKind::Data, "{e}");
                assert_eq!(e.object(), Some(delta_key.as_str()), "{e}");
            }
            Ok((v, ..)) => assert_eq!(v, Some(vec![1; 40]), "key {}", i * 50),
        }
    }
}

/// A chain of pointer deltas each smaller than a lazy replica's cache but
/// larger together: a cold read still sends every slot page in one round
/// trip (they are never counted at their delta's whole size), so it takes
/// three round trips.
#[test]
fn slot_pages_of_a_chain_larger_than_the_cache_go_out_together() {
    let cfg = PublisherConfig {
        // A snapshot once the base is in, none after it.
        snapshot_every: Some(40),
        snapshot_ratio_percent: Some(1_000_000),
        delta_every: Some(4),
        head_check_ms: 0,
        tail_bytes: 0,
        pointer_deltas: true,
        ..PublisherConfig::default()
    };
    let (mut p, mut store) = started(cfg);
    let key = |i: u64| format!("k:{i:06}").into_bytes();
    let mut now = 0;
    let mut model = BTreeMap::new();
    let mut rng = 99u64;
    // A base of 40,000 keys, then batches of 1,000 random keys.
    for b in 0..(40 + 60u64) {
        // (A commit each: the budget allows ten a second.)
        now += 200;
        let ops: Vec<Op> = (0..1_000u64)
            .map(|i| {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let k = if b < 40 {
                    b * 1_000 + i
                } else {
                    (rng >> 33) % 40_000
                };
                Op::put(key(k), vec![b as u8; 8])
            })
            .collect();
        for op in &ops {
            if let Op::Put { key, value } = op {
                model.insert(key.clone(), value.clone());
            }
        }
        p.push(b + 1, &batch::encode(&ops).unwrap(), now).unwrap();
        store.drive(&mut p, now);
    }
    for t in (now + 1..now + 20_000).step_by(100) {
        store.drive(&mut p, t);
    }
    let h = store.head();
    let sizes: Vec<u64> = h.deltas.iter().map(|d| d.size).collect();
    let cache = 1u64 << 20;
    let spans: Vec<(u64, u64, u64)> = h
        .deltas
        .iter()
        .map(|d| (d.base_lsn, d.lsn, d.entries))
        .collect();
    assert!(
        h.deltas.len() >= 2 && h.deltas.iter().all(|d| d.slots.is_some()),
        "{sizes:?} {spans:?} snapshot {:?}",
        h.snapshot.as_ref().map(|s| (s.lsn, s.entries))
    );
    assert!(
        sizes.iter().filter(|&&s| s <= cache).sum::<u64>() > cache,
        "{sizes:?}"
    );
    for i in [5u64, 1_500, 7_000, 15_000, 25_000, 39_999] {
        let (v, _, c) = try_cold_read_cached(&store, &key(i), cache).unwrap();
        assert_eq!(v.as_ref(), model.get(&key(i)), "key {i}");
        assert!(c.rounds <= 3, "key {i}: {c:?} over deltas of {sizes:?}");
    }
}

/// A snapshot at the first LSN and none after it, then a pointer delta
/// every 3 LSNs.
fn snapshot_first_then_pointer_deltas() -> PublisherConfig {
    PublisherConfig {
        snapshot_every: Some(1),
        snapshot_bytes: Some(1),
        snapshot_ratio_percent: Some(1_000_000),
        delta_every: Some(3),
        head_check_ms: 0,
        tail_bytes: 0,
        pointer_deltas: true,
        ..PublisherConfig::default()
    }
}

/// A publisher restarted over a dataset with pointer deltas places the
/// records it replays in the catalog's segments (the head's, and those of
/// the pages it reads at the claim, levels above 0 included), so its deltas,
/// those that absorb its predecessor's included, still point at records;
/// and cold reads over them answer as the origin.
#[test]
fn a_restarted_publisher_keeps_writing_pointer_deltas() {
    // Every segment past the snapshot in the head; then most of them in
    // pages of two levels and more.
    restarted_publisher_writes_pointer_deltas(400, 8);
    restarted_publisher_writes_pointer_deltas(4, 2);
}

/// A snapshot at the first LSN and none after it, a pointer delta every 25
/// LSNs, `inline_segments` in the head and pages of `page_fanout`.
fn restart_config(inline_segments: usize, page_fanout: usize) -> PublisherConfig {
    PublisherConfig {
        snapshot_every: Some(1),
        snapshot_bytes: Some(1),
        snapshot_ratio_percent: Some(1_000_000),
        delta_every: Some(25),
        head_check_ms: 0,
        tail_bytes: 0,
        inline_segments,
        page_fanout,
        max_commits_per_sec: 0,
        pointer_deltas: true,
        ..PublisherConfig::default()
    }
}

fn restarted_publisher_writes_pointer_deltas(inline_segments: usize, page_fanout: usize) {
    let cfg = restart_config(inline_segments, page_fanout);
    let mut log: Vec<Vec<Op>> = Vec::new();
    let mut rng = 0x5eed_u64;
    let mut write =
        |p: &mut Publisher, store: &mut Store, log: &mut Vec<Vec<Op>>, lsn: u64, now: u64| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let ops: Vec<Op> = (0..1 + (rng >> 60) % 3)
                .map(|i| {
                    let k = format!("key:{:03}", ((rng >> 33) + i * 7) % 150).into_bytes();
                    if (rng >> 20) % 9 == 0 {
                        Op::delete(k)
                    } else {
                        Op::put(k, vec![(rng >> 40) as u8; 40 + (rng >> 50) as usize % 60])
                    }
                })
                .collect();
            p.push(lsn, &batch::encode(&ops).unwrap(), now).unwrap();
            log.push(ops);
            store.drive(p, now);
        };
    let (mut a, mut store) = started(cfg.clone());
    for lsn in 1..=400u64 {
        write(&mut a, &mut store, &mut log, lsn, lsn);
    }
    let first = store.head();
    assert_eq!(first.committed_lsn, 400);
    assert!(first.deltas.iter().all(|d| d.slots.is_some()), "{first:?}");
    if inline_segments < 10 {
        assert!(first.pages.iter().any(|p| p.level > 0), "{:?}", first.pages);
    }
    let a_epoch = first.epoch;
    drop(a);

    // A new process: it claims, replays the WAL into its state (once the
    // pages it reads let it), then publishes new records.
    let mut b = Publisher::new(cfg, 11);
    store.drive(&mut b, 1_000);
    assert_eq!(b.next_lsn(), Some(1));
    assert!(b.has_room(), "the claim's page reads are answered");
    for (i, ops) in log.iter().enumerate() {
        b.push(i as u64 + 1, &batch::encode(ops).unwrap(), 1_000)
            .unwrap();
    }
    store.drive(&mut b, 1_000);
    let mut seen = std::collections::BTreeSet::new();
    let mut absorbed = 0;
    for lsn in 401..=700u64 {
        write(&mut b, &mut store, &mut log, lsn, 1_000 + lsn);
        let h = store.head();
        for d in h.deltas.iter().filter(|d| d.epoch > a_epoch) {
            if seen.insert(d.key.clone()) {
                assert!(d.slots.is_some(), "a value delta after the restart: {d:?}");
                if d.base_lsn < 400 {
                    absorbed += 1;
                }
            }
        }
        let end = h.delta_lsn().unwrap();
        if lsn % 13 == 0 {
            assert_eq!(
                materialize(&store, &h),
                model_at(&log, end),
                "chain at {end}"
            );
            for probe in [lsn, lsn * 7, lsn * 31] {
                let k = format!("key:{:03}", probe % 150).into_bytes();
                let (v, at, _) = cold_read(&store, &k);
                assert_eq!(v.as_ref(), model_at(&log, at).get(&k), "{k:?} at {at}");
            }
        }
    }
    assert!(seen.len() >= 8, "{} deltas after the restart", seen.len());
    assert!(
        absorbed > 0,
        "no delta after the restart absorbed one before it"
    );
}

/// A restarted publisher whose catalog pages cannot be read does not hold
/// its replay back nor report an error: it gives placing up and publishes
/// on, the keys it could not place in value deltas, its new records' in
/// pointer deltas; cold reads answer as the origin.
#[test]
fn a_restart_whose_pages_cannot_be_read_publishes_on() {
    // Gone, then answering with bytes that fail the reference's checksum,
    // then with a page that is not the one its reference names.
    restart_over_unreadable_pages(|_, v| {
        v.take();
    });
    restart_over_unreadable_pages(|_, v| {
        if let Some((b, _)) = v {
            let mid = b.len() / 2;
            b[mid] ^= 0x20;
        }
    });
    restart_over_unreadable_pages(|k, v| {
        if let Some((b, _)) = v {
            *b = format!("{{\"format\":1,\"level\":0,\"key\":\"{k}\"}}").into_bytes();
        }
    });
}

/// Publishes 300 LSNs, then restarts over the same store with every page
/// damaged by `damage` (given its key and its bytes, `None` to remove it)
/// while the new publisher claims and replays; the pages come back after.
fn restart_over_unreadable_pages(damage: impl Fn(&str, &mut Option<(Vec<u8>, u64)>)) {
    let cfg = restart_config(4, 2);
    let (mut a, mut store) = started(cfg.clone());
    let mut log: Vec<Vec<Op>> = Vec::new();
    let op = |lsn: u64| {
        let k = format!("key:{:03}", (lsn * 37) % 120).into_bytes();
        vec![Op::put(k, vec![lsn as u8; 30 + (lsn % 50) as usize])]
    };
    for lsn in 1..=300u64 {
        log.push(op(lsn));
        a.push(lsn, &batch::encode(&log[lsn as usize - 1]).unwrap(), lsn)
            .unwrap();
        store.drive(&mut a, lsn);
    }
    assert!(!store.head().pages.is_empty());
    drop(a);
    // The pages are damaged while the new process claims and replays.
    let pages: HashMap<String, (Vec<u8>, u64)> = store
        .objects
        .iter()
        .filter(|(k, _)| object_kind(k) == Some("page"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in &pages {
        let mut d = Some(v.clone());
        damage(k, &mut d);
        match d {
            Some(d) => store.objects.insert(k.clone(), d),
            None => store.objects.remove(k),
        };
    }
    let mut b = Publisher::new(cfg, 11);
    store.drive(&mut b, 1_000);
    for (i, ops) in log.iter().enumerate() {
        assert!(b.has_room(), "the replay waits at LSN {}", i + 1);
        b.push(i as u64 + 1, &batch::encode(ops).unwrap(), 1_000)
            .unwrap();
    }
    store.objects.extend(pages);
    for lsn in 301..=450u64 {
        log.push(op(lsn));
        b.push(
            lsn,
            &batch::encode(&log[lsn as usize - 1]).unwrap(),
            1_000 + lsn,
        )
        .unwrap();
        store.drive(&mut b, 1_000 + lsn);
    }
    let h = store.head();
    assert_eq!(h.committed_lsn, 450);
    assert_eq!(store.errors, 0, "no error reported");
    let end = h.delta_lsn().unwrap();
    assert_eq!(
        materialize(&store, &h),
        model_at(&log, end),
        "chain at {end}"
    );
    for i in 0..120u64 {
        let k = format!("key:{i:03}").into_bytes();
        let (v, at, _) = cold_read(&store, &k);
        assert_eq!(v.as_ref(), model_at(&log, at).get(&k), "{k:?} at {at}");
    }
}
