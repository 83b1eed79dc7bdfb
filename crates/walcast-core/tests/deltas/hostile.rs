//! Stores that ignore Range and deltas that claim sizes: what a lazy replica
//! reads stays bounded.

use super::*;

/// A server that ignores Range (a 200 with the whole object): a lazy read
/// takes the whole object only when it fits the cache. For a larger one it
/// asks for at most the range's bytes, and what a driver keeps of such an
/// answer (`max_bytes + 1`) is a data error naming the snapshot, instead of
/// the memory of the whole snapshot.
#[test]
fn a_server_ignoring_range_costs_a_large_snapshot_an_error_not_its_size() {
    let (_, store, _, _) = loaded(cfg_filters());
    let snap = store.head().snapshot.expect("a snapshot of the load");
    // In the snapshot, and not written after it.
    let key = b"key:001234";
    for (cache, fits) in [(64 << 10, false), (8 << 20, true)] {
        assert_eq!(snap.size <= cache, fits);
        let cfg = ReplicaConfig {
            lazy_cache_bytes: Some(cache),
            long_poll_wait_ms: 0,
            ..ReplicaConfig::default()
        };
        let mut r = Replica::new(cfg, 3);
        r.sync_now(0);
        settle(&mut r, &store);
        let mut answer = None;
        for _ in 0..10 {
            match r.get_lazy(key) {
                Ok(Read::Pending) => {}
                done => {
                    answer = Some(done);
                    break;
                }
            }
            for req in collect(&mut r) {
                let whole = &store.objects[&req.key].0;
                let size = whole.len() as u64;
                let asked = match req.range.expect("a block read asks for a range") {
                    ByteRange::Bounded { start, end } => end - start,
                    ByteRange::Suffix(n) => n.min(size),
                };
                assert_eq!(req.max_bytes, if fits { size } else { asked }, "{req:?}");
                let kept = whole.len().min(req.max_bytes as usize + 1);
                let resp = GetResponse::Ok {
                    body: whole[..kept].to_vec(),
                    etag: None,
                    range: None,
                };
                r.handle_response(req.id, 0, resp);
            }
        }
        match answer {
            Some(Ok(Read::Ready(v))) if fits => assert_eq!(v, Some(vec![1u8; 100])),
            Some(Err(e)) if !fits => {
                assert_eq!(e.kind(), walcast_core::ErrorKind::Data, "{e}");
                assert_eq!(e.object(), Some(snap.key.as_str()), "{e}");
                assert!(e.to_string().contains("ignores Range"), "{e}");
            }
            other => panic!("cache {cache}: {other:?}"),
        }
    }
}

/// A head claiming its delta holds 50 GB: a lazy replica's GETs of it, a
/// point read's suffix and a scan's, may bring no more than a replica
/// reads of any object (`MAX_SEGMENT_BYTES`), as for a segment or a
/// snapshot window that claims as much; a driver buffers up to `max_bytes`
/// of a body. One claiming its index and filter take 40 GB is refused
/// before any GET of them: they would be held beside the cache.
#[test]
fn claimed_delta_sizes_do_not_set_what_a_lazy_replica_reads_into_memory() {
    let mut store = small_chain_store();
    let mut h = store.head();
    assert!(!h.deltas.is_empty());
    let d = h.deltas.last_mut().unwrap();
    d.size = 50_000_000_000;
    let big = d.key.clone();
    let etag = store.objects[HEAD_KEY].1 + 1000;
    store
        .objects
        .insert(HEAD_KEY.to_string(), (h.encode(), etag));
    let mut huge = h.clone();
    huge.deltas.last_mut().unwrap().suffix_len = 40_000_000_000;
    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    let mut asked = Vec::new();
    let _ = r.get_lazy(b"key:001");
    asked.extend(collect(&mut r));
    let _ = r.scan_lazy(&mut LazyScan::new(b"", None, 10));
    asked.extend(collect(&mut r));
    let to_big: Vec<_> = asked
        .iter()
        .filter(|g| g.key == big)
        .map(|g| (g.range, g.max_bytes))
        .collect();
    assert!(!to_big.is_empty());
    assert!(
        to_big
            .iter()
            .all(|(_, m)| *m <= walcast_core::catalog::MAX_SEGMENT_BYTES),
        "GETs of {big} may bring: {to_big:?}"
    );
    store
        .objects
        .insert(HEAD_KEY.to_string(), (huge.encode(), etag + 1));
    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    let e = r.get_lazy(b"key:001").expect_err("an index of 40 GB");
    assert_eq!(e.object(), Some(big.as_str()), "{e}");
    assert!(collect(&mut r).iter().all(|g| g.key != big));
}

/// Keys of 60 KiB that share no prefix: a delta of them would carry an
/// index over `MAX_LAZY_SUFFIX`, which lazy readers with a small cache
/// refuse to hold beside it. The publisher writes no such delta, and a
/// lazy replica reads the keys from the segments.
#[test]
fn a_delta_whose_index_readers_would_refuse_is_not_written() {
    use walcast_core::snapshot::delta::MAX_LAZY_SUFFIX;
    let (mut p, mut store, mut lsn, mut now) = loaded(PublisherConfig {
        delta_every: Some(1),
        // One snapshot at the load's end, and none after it (within 10
        // times its size).
        snapshot_bytes: Some(2 << 20),
        snapshot_ratio_percent: Some(1_000),
        ..cfg_filters()
    });
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let keys: Vec<Vec<u8>> = (0..160)
        .map(|_| {
            (0..60 << 10)
                .map(|_| {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    (x >> 56) as u8
                })
                .collect()
        })
        .collect();
    for chunk in keys.chunks(8) {
        let ops: Vec<Op> = chunk
            .iter()
            .map(|k| Op::put(k.clone(), b"v".to_vec()))
            .collect();
        push_and_drive(&mut p, &mut store, (&mut lsn, &mut now), &ops, (20, 100));
    }
    let h = store.head();
    assert_eq!(h.committed_lsn, lsn);
    let largest = h.deltas.iter().map(|d| d.suffix_len).max().unwrap_or(0);
    assert!(
        largest <= MAX_LAZY_SUFFIX,
        "a delta's suffix of {largest} bytes"
    );
    let mut r = Replica::new(
        ReplicaConfig {
            lazy_cache_bytes: Some(1 << 20),
            long_poll_wait_ms: 0,
            ..ReplicaConfig::default()
        },
        3,
    );
    r.sync_now(0);
    settle(&mut r, &store);
    assert_eq!(r.applied_lsn(), lsn);
    for k in [&keys[0], &keys[159]] {
        let v = read_through(&mut r, &store, k).expect("the read finished");
        assert_eq!(v.as_deref(), Some(&b"v"[..]));
    }
}
