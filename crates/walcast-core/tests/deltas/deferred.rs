//! Segments past the chain, which lazy replicas defer until a read needs
//! them: reads under writes, late and failed answers, lying filters.

use super::*;

/// A key written in every commit: a point read fetches the deferred
/// segment that may hold it, and while that GET is out the heads that come
/// in defer nothing (their segments come in as when catching up), so the
/// read answers in a few rounds however fast the writes come.
#[test]
fn a_read_of_a_key_every_commit_writes_is_answered_while_writes_go_on() {
    let (mut p, mut store, mut lsn, mut now) = loaded(cfg_filters());
    let hot = b"hot".to_vec();
    put(&mut p, &mut store, &mut lsn, &mut now, &hot, b"v0");
    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    assert_eq!(r.applied_lsn(), lsn);
    assert!(r.status(0).lazy.unwrap().deferred_segments >= 1);
    let mut c = Cold::default();
    let mut held: Vec<GetRequest> = Vec::new();
    for i in 1..=20 {
        if let Read::Ready(v) = r.get_lazy(&hot).unwrap() {
            assert!(i <= 3, "answered only at round {i}: {v:?}");
            return;
        }
        held.extend(collect(&mut r));
        // While the read's segment GETs are out, the origin commits the
        // hot key again and the replica reads the new head (long-poll).
        put(
            &mut p,
            &mut store,
            &mut lsn,
            &mut now,
            &hot,
            format!("v{i}").as_bytes(),
        );
        r.sync_now(0);
        settle(&mut r, &store);
        // Then the segment answers arrive.
        store.answer(&mut r, held.drain(..), &mut c);
    }
    panic!("a read of a key every commit writes stayed Pending for 20 commits");
}

/// A head that lands after the GET a read waited for was answered, but
/// before the read runs again (in the JS driver both are answers on the
/// event loop, in either order), defers nothing: its segment comes in as
/// when catching up, so the read answers on its next run instead of
/// needing the newly deferred segment and spending another round.
#[test]
fn a_head_between_a_reads_answer_and_its_next_run_defers_nothing() {
    let (mut p, mut store, mut lsn, mut now) = loaded(cfg_filters());
    let hot = b"hot".to_vec();
    put(&mut p, &mut store, &mut lsn, &mut now, &hot, b"v0");
    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    assert!(r.status(0).lazy.unwrap().deferred_segments >= 1);
    assert!(matches!(r.get_lazy(&hot).unwrap(), Read::Pending));
    let mut c = Cold::default();
    let asked = collect(&mut r);
    store.answer(&mut r, asked, &mut c);
    let deferred = r.status(0).lazy.unwrap().deferred_segments;
    // The origin writes the key again and the new head lands first.
    put(&mut p, &mut store, &mut lsn, &mut now, &hot, b"v1");
    r.sync_now(0);
    settle(&mut r, &store);
    assert_eq!(r.applied_lsn(), lsn);
    assert!(
        r.status(0).lazy.unwrap().deferred_segments <= deferred,
        "the new head deferred its segment while a read was due"
    );
    match r.get_lazy(&hot).unwrap() {
        Read::Ready(v) => assert_eq!(v.as_deref(), Some(&b"v1"[..])),
        Read::Pending => panic!("the read needs another round: the new head deferred its segment"),
    }
    // With no read waiting, the next head defers its segment again.
    next_head_defers(&mut p, &mut store, &mut lsn, &mut now, &mut r);
}

/// A read that ended (Ready) leaves other GETs out; their answers, after
/// it, do not hold back deferral: the next head defers its segment.
#[test]
fn answers_after_a_read_ended_do_not_stop_deferral() {
    let (mut p, mut store, mut lsn, mut now) = loaded(cfg_filters());
    // Within the base's key range, so that the read needs a data block.
    let hot = b"key:004999z".to_vec();
    put(&mut p, &mut store, &mut lsn, &mut now, &hot, b"v0");
    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    assert!(matches!(r.get_lazy(&hot).unwrap(), Read::Pending));
    let (segments, others): (Vec<_>, Vec<_>) = collect(&mut r)
        .into_iter()
        .partition(|g| g.key.starts_with("segments/"));
    assert!(!segments.is_empty() && !others.is_empty(), "{others:?}");
    let mut c = Cold::default();
    store.answer(&mut r, segments, &mut c);
    // The segment alone answers the read: the snapshot's part is not needed.
    assert_eq!(r.get_lazy(&hot).unwrap(), Read::Ready(Some(b"v0".to_vec())));
    store.answer(&mut r, others, &mut c);
    next_head_defers(&mut p, &mut store, &mut lsn, &mut now, &mut r);
}

/// A block GET still out when the replica jumps to a longer chain over the
/// same base (a new reader of the base, which has asked for nothing yet):
/// its late answer is ignored, not fed to the new reader as bytes it did
/// not ask for, and the read answers right.
#[test]
fn a_late_block_answer_after_a_jump_over_the_same_base_is_ignored() {
    let cfg = PublisherConfig {
        delta_every: Some(3),
        snapshot_suffix_bytes: 0,
        ..cfg_filters()
    };
    let (mut p, mut store, mut lsn, mut now) = loaded(cfg);
    let base = store.head().snapshot.expect("a snapshot of the load").key;
    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    let key = b"key:000123";
    let mut c = Cold::default();
    // The first round (the base's footer and index) is served; the next
    // one (its blocks) is held.
    assert_eq!(r.get_lazy(key).unwrap(), Read::Pending);
    let asked = collect(&mut r);
    store.answer(&mut r, asked, &mut c);
    assert_eq!(r.get_lazy(key).unwrap(), Read::Pending);
    let held = collect(&mut r);
    assert!(held.iter().any(|g| g.key == base), "{held:?}");
    // The origin writes on; a delta past the applied LSN makes the replica
    // jump, over the same base.
    let before = store.head().deltas.len();
    for i in 0..4 {
        put(
            &mut p,
            &mut store,
            &mut lsn,
            &mut now,
            format!("w{i}").as_bytes(),
            b"x",
        );
    }
    assert!(store.head().deltas.len() > before, "a new delta");
    assert_eq!(store.head().snapshot.unwrap().key, base);
    r.sync_now(0);
    settle(&mut r, &store);
    assert_eq!(r.applied_lsn(), lsn);
    store.answer(&mut r, held, &mut c);
    for _ in 0..10 {
        match r.get_lazy(key).expect("no error from a late answer") {
            Read::Ready(v) => {
                assert_eq!(v, Some(vec![1u8; 100]));
                return;
            }
            Read::Pending => settle(&mut r, &store),
        }
    }
    panic!("the read did not answer");
}

/// A GET left out by a jump, sent again for the same block, then the first
/// one abandoned (its reader went away): the second stays in flight and its
/// answer is used, so the block is not fetched a third time.
#[test]
fn abandoning_a_get_left_by_a_jump_keeps_its_second_sending() {
    let cfg = PublisherConfig {
        delta_every: Some(3),
        snapshot_suffix_bytes: 0,
        ..cfg_filters()
    };
    let (mut p, mut store, mut lsn, mut now) = loaded(cfg);
    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    let key = b"key:000123";
    assert_eq!(r.get_lazy(key).unwrap(), Read::Pending);
    let first = collect(&mut r);
    assert!(
        first
            .iter()
            .all(|g| matches!(g.range, Some(ByteRange::Suffix(_)))),
        "{first:?}"
    );
    for i in 0..4 {
        put(
            &mut p,
            &mut store,
            &mut lsn,
            &mut now,
            format!("w{i}").as_bytes(),
            b"x",
        );
    }
    r.sync_now(0);
    settle(&mut r, &store); // the jump
    assert_eq!(r.applied_lsn(), lsn);
    assert_eq!(r.get_lazy(key).unwrap(), Read::Pending);
    let second = collect(&mut r);
    for g in &first {
        assert!(
            second
                .iter()
                .any(|h| (&h.key, h.range) == (&g.key, g.range)),
            "{g:?} sent again: {second:?}"
        );
    }
    for g in &first {
        r.abandon_read_fetch(g.id);
    }
    let mut c = Cold::default();
    store.answer(&mut r, second, &mut c);
    for _ in 0..10 {
        match r.get_lazy(key).unwrap() {
            Read::Ready(v) => {
                assert_eq!(v, Some(vec![1u8; 100]));
                return;
            }
            Read::Pending => {
                for g in collect(&mut r) {
                    assert!(
                        !matches!(g.range, Some(ByteRange::Suffix(_))),
                        "the suffix asked for a third time: {g:?}"
                    );
                    let resp = store.serve(&g, &mut c);
                    r.handle_response(g.id, 0, resp);
                }
            }
        }
    }
    panic!("the read did not answer");
}

/// A scan fetches the deferred segments whole, at most `max_inflight` at a
/// time, and then answers with every key they write.
#[test]
fn a_scan_fetches_deferred_segments_max_inflight_at_a_time() {
    let (mut p, mut store, mut lsn, mut now) = loaded(cfg_filters());
    for i in 0..60u32 {
        put(
            &mut p,
            &mut store,
            &mut lsn,
            &mut now,
            format!("s{i:03}").as_bytes(),
            &[7u8; 1000],
        );
    }
    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    let deferred = r.status(0).lazy.unwrap().deferred_segments;
    let mut scan = LazyScan::prefix(b"s", 10);
    assert_eq!(r.scan_lazy(&mut scan).unwrap(), Read::Pending);
    assert!(deferred >= 50, "{deferred} deferred");
    let mut rounds = 0;
    let entries = loop {
        if let Read::Ready(e) = r.scan_lazy(&mut scan).unwrap() {
            break e;
        }
        let reqs = collect(&mut r);
        let segs = reqs
            .iter()
            .filter(|g| object_kind(&g.key) == Some("segment"))
            .count();
        assert!(
            segs <= 4,
            "{segs} whole-segment GETs at once (max_inflight 4)"
        );
        let mut c = Cold::default();
        store.answer(&mut r, reqs, &mut c);
        rounds += 1;
        assert!(rounds < 100, "the scan did not finish");
    };
    let keys: Vec<Vec<u8>> = entries.into_iter().map(|(k, _)| k).collect();
    let want: Vec<Vec<u8>> = (0..10u32)
        .map(|i| format!("s{i:03}").into_bytes())
        .collect();
    assert_eq!(keys, want);
    assert!(
        rounds >= deferred / 4,
        "{rounds} rounds for {deferred} segments"
    );
}

/// Two deferred segments of the same size: a failed GET of one is reported
/// to the read that needs it, not to a read of a key only the other may
/// hold.
#[test]
fn a_failed_deferred_segment_is_reported_to_its_read_only() {
    let (mut p, mut store, mut lsn, mut now) = loaded(cfg_filters());
    put(&mut p, &mut store, &mut lsn, &mut now, b"aa", b"1");
    put(&mut p, &mut store, &mut lsn, &mut now, b"bb", b"2");
    let h = store.head();
    let n = h.segments.len();
    let (a, b) = (&h.segments[n - 2], &h.segments[n - 1]);
    assert_eq!(a.size, b.size, "equal sizes");
    let (a_key, b_key) = (a.key.clone(), b.key.clone());
    assert!(!a.filter.as_ref().unwrap().may_contain(b"bb"));
    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    assert_eq!(r.status(0).lazy.unwrap().deferred_segments, 2);
    assert_eq!(r.get_lazy(b"aa").unwrap(), Read::Pending);
    let reqs = collect(&mut r);
    assert!(reqs.iter().any(|g| g.key == a_key));
    for req in reqs {
        let resp = if req.key == a_key {
            GetResponse::Failed {
                status: Some(503),
                message: "busy".into(),
            }
        } else {
            let mut c = Cold::default();
            store.serve(&req, &mut c)
        };
        r.handle_response(req.id, 0, resp);
    }
    // A read of a key only segment B may hold.
    if let Err(e) = r.get_lazy(b"bb") {
        panic!("read of bb failed with segment A's error: {e}");
    }
    let _ = b_key;
    let err = r
        .get_lazy(b"aa")
        .expect_err("the read of aa gets its failure");
    assert!(err.to_string().contains(&a_key), "{err}");
}

/// A head whose key filter for a deferred segment leaves out a key the
/// segment writes: once a read fetches the segment, the replica finds the
/// lie and the read gets a `data` error naming the segment and the batch's
/// LSN (a read the filter ruled out would have been served stale).
#[test]
fn a_deferred_segment_whose_filter_lies_is_a_data_error() {
    let (mut p, mut store, mut lsn, mut now) = loaded(cfg_filters());
    put(&mut p, &mut store, &mut lsn, &mut now, b"aa", b"1");
    put(&mut p, &mut store, &mut lsn, &mut now, b"bb", b"2");
    let mut h = store.head();
    let n = h.segments.len();
    let lie = KeyFilter::build([b"zz".as_slice()].into_iter());
    assert!(!lie.may_contain(b"aa") && lie.may_contain(b"zz"));
    h.segments[n - 2].filter = Some(lie);
    let a_key = h.segments[n - 2].key.clone();
    let etag = store.objects[HEAD_KEY].1 + 1000;
    store
        .objects
        .insert(HEAD_KEY.to_string(), (h.encode(), etag));
    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    assert_eq!(r.status(0).lazy.unwrap().deferred_segments, 2);
    assert_eq!(r.get_lazy(b"zz").unwrap(), Read::Pending);
    let mut c = Cold::default();
    let asked = collect(&mut r);
    store.answer(&mut r, asked, &mut c);
    let err = r.get_lazy(b"zz").expect_err("the lie is found");
    assert_eq!(err.kind(), walcast_core::ErrorKind::Data, "{err}");
    assert_eq!(err.object(), Some(a_key.as_str()), "{err}");
    assert_eq!(err.lsn(), Some(lsn - 1), "{err}");
    // The segment stays deferred.
    assert_eq!(r.status(0).lazy.unwrap().deferred_segments, 2);
}

/// A head naming a segment past the chain, with a key filter, that claims
/// more than a replica reads (50 GB): the lazy replica does not defer it
/// (a read would ask for all of it), it refuses it as when catching up, an
/// error names it, and no GET may bring more than `MAX_SEGMENT_BYTES`.
#[test]
fn a_filtered_segment_claiming_more_than_a_replica_reads_is_never_deferred() {
    let (mut p, mut store, mut lsn, mut now) = loaded(cfg_filters());
    put(&mut p, &mut store, &mut lsn, &mut now, b"aa", b"1");
    put(&mut p, &mut store, &mut lsn, &mut now, b"bb", b"2");
    let mut h = store.head();
    let n = h.segments.len();
    assert!(h.segments[n - 2].filter.is_some());
    h.segments[n - 2].size = 50_000_000_000;
    let big = h.segments[n - 2].key.clone();
    let etag = store.objects[HEAD_KEY].1 + 1000;
    store
        .objects
        .insert(HEAD_KEY.to_string(), (h.encode(), etag));
    let mut r = lazy_replica();
    r.sync_now(0);
    let mut c = Cold::default();
    for _ in 0..10_000 {
        match r.poll(0) {
            replica::Action::Fetch(req) => {
                assert!(
                    req.max_bytes <= walcast_core::catalog::MAX_SEGMENT_BYTES,
                    "{} asked with room for {} bytes",
                    req.key,
                    req.max_bytes
                );
                assert_ne!(req.key, big, "fetched the oversized segment");
                let resp = store.serve(&req, &mut c);
                r.handle_response(req.id, 0, resp);
            }
            replica::Action::Event(_) => {}
            replica::Action::Wait { .. } => break,
        }
    }
    assert_eq!(r.status(0).lazy.unwrap().deferred_segments, 0);
    assert!(r.applied_lsn() < lsn - 1, "applied {}", r.applied_lsn());
    let last = r.status(0).last_error.expect("an error names it");
    assert_eq!(last.object(), Some(big.as_str()), "{last}");
    assert!(last.to_string().contains("above the limit"), "{last}");
}

/// A newer snapshot arrives while a read's GET of a deferred segment past
/// it is in flight: that GET stays counted, so the read does not ask for
/// the segment a second time, and its answer is applied when it comes.
#[test]
fn a_deferred_segment_in_flight_survives_a_newer_snapshot() {
    let (mut p, mut store, mut lsn, mut now) = loaded(cfg_filters());
    put(&mut p, &mut store, &mut lsn, &mut now, b"aa", b"1");
    let aa_lsn = lsn;
    put(&mut p, &mut store, &mut lsn, &mut now, b"bb", b"2");
    let h = store.head();
    let b_key = h.segments.last().unwrap().key.clone();
    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    assert_eq!(r.status(0).lazy.unwrap().deferred_segments, 2);
    assert_eq!(r.get_lazy(b"bb").unwrap(), Read::Pending);
    let held = collect(&mut r);
    assert!(held.iter().any(|g| g.key == b_key), "{held:?}");
    // A head whose snapshot is at aa's LSN: it covers aa's segment, not bb's.
    let mut h2 = h.clone();
    let snap = h2.snapshot.as_mut().unwrap();
    assert!(snap.lsn < aa_lsn);
    snap.lsn = aa_lsn;
    snap.key = walcast_core::catalog::snapshot_key(aa_lsn, snap.epoch);
    snap.suffix = None;
    h2.generation += 1;
    let etag = store.objects[HEAD_KEY].1 + 1000;
    store
        .objects
        .insert(HEAD_KEY.to_string(), (h2.encode(), etag));
    r.sync_now(0);
    settle(&mut r, &store);
    assert_eq!(r.status(0).lazy.unwrap().deferred_segments, 1);
    assert_eq!(r.get_lazy(b"bb").unwrap(), Read::Pending);
    let again = collect(&mut r);
    assert!(
        !again.iter().any(|g| g.key == b_key),
        "bb's segment asked for a second time: {again:?}"
    );
    let mut c = Cold::default();
    store.answer(&mut r, held, &mut c);
    assert_eq!(r.get_lazy(b"bb").unwrap(), Read::Ready(Some(b"2".to_vec())));
}

/// A head whose filter for a deferred segment lies, then the store turns
/// honest (the publisher's own head again, same segment, true filter): the
/// replica must read through the honest entry, not keep the lying one it
/// deferred, which serves `aa` stale and fails every read of `zz` for as
/// long as no newer delta or snapshot covers the segment.
#[test]
fn a_lying_filter_does_not_outlive_the_head_that_named_it() {
    let (mut p, mut store, mut lsn, mut now) = loaded(cfg_filters());
    put(&mut p, &mut store, &mut lsn, &mut now, b"aa", b"1");
    put(&mut p, &mut store, &mut lsn, &mut now, b"bb", b"2");
    let honest = store.objects[HEAD_KEY].clone();
    let mut h = store.head();
    let n = h.segments.len();
    let lie = KeyFilter::build([b"zz".as_slice()].into_iter());
    h.segments[n - 2].filter = Some(lie);
    let etag = honest.1 + 1000;
    store
        .objects
        .insert(HEAD_KEY.to_string(), (h.encode(), etag));
    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    assert_eq!(r.status(0).lazy.unwrap().deferred_segments, 2);
    // The lie is found by a read that fetches the segment.
    assert!(read_settled(&mut r, &store, b"zz").is_err());
    // The store turns honest: the publisher's head, with the true filter.
    store
        .objects
        .insert(HEAD_KEY.to_string(), (honest.0, etag + 1));
    r.sync_now(0);
    settle(&mut r, &store);
    assert_eq!(r.applied_lsn(), lsn);
    let aa = read_settled(&mut r, &store, b"aa").map_err(|e| e.to_string());
    let zz = read_settled(&mut r, &store, b"zz").map_err(|e| e.to_string());
    assert_eq!(
        (aa, zz),
        (Ok(Some(b"1".to_vec())), Ok(None)),
        "aa (written at LSN {}) and zz (never written), read from the honest store",
        lsn - 1
    );
}

/// A lazy replica with deferred segments past its base meets a head whose
/// newer snapshot it cannot read by blocks (version 1, at an LSN below the
/// one it applied): it loads that snapshot whole without its applied LSN
/// ever going back, and every read after it (of keys in deferred segments
/// too) answers the origin's state.
#[test]
fn a_whole_load_under_deferred_segments_never_takes_the_state_back() {
    let (mut p, mut store, mut lsn, mut now) = loaded(cfg_filters());
    put(&mut p, &mut store, &mut lsn, &mut now, b"aa", b"1");
    put(&mut p, &mut store, &mut lsn, &mut now, b"bb", b"2");
    put(&mut p, &mut store, &mut lsn, &mut now, b"aa", b"3");
    let top = lsn;
    let h = store.head();
    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    assert_eq!(r.applied_lsn(), top);
    assert!(r.status(0).lazy.unwrap().deferred_segments >= 2);
    // A version 1 snapshot at bb's LSN (aa was 1 then), newer than the base.
    let at = top - 1;
    let mut st = walcast_core::state::KvState::new();
    for i in 0..20_000u64 {
        st.put(format!("key:{i:06}").as_bytes(), &[1u8; 100]);
    }
    st.put(b"aa", b"1");
    st.put(b"bb", b"2");
    let v1 = walcast_core::snapshot::encode(&st, at, h.epoch, h.dataset_id);
    let mut h2 = h.clone();
    let snap = h2.snapshot.as_mut().unwrap();
    assert!(snap.lsn < at);
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
    r.sync_now(0);
    let mut lowest = u64::MAX;
    settle_watching(&mut r, &store, |r| lowest = lowest.min(r.applied_lsn()));
    assert!(
        lowest >= top,
        "the applied LSN went back to {lowest} from {top}"
    );
    assert_eq!(r.status(0).lazy.unwrap().deferred_segments, 1);
    // A newer version 1 snapshot covering the segment still deferred: it
    // is loaded whole too, before the publisher may delete that segment.
    st.put(b"aa", b"3");
    let v1 = walcast_core::snapshot::encode(&st, top, h.epoch, h.dataset_id);
    let mut h3 = h2.clone();
    let snap = h3.snapshot.as_mut().unwrap();
    snap.lsn = top;
    snap.key = walcast_core::catalog::snapshot_key(top, snap.epoch);
    snap.size = v1.len() as u64;
    snap.crc32 = crc32fast::hash(&v1);
    h3.generation += 1;
    store.objects.insert(snap.key.clone(), (v1, 1));
    store
        .objects
        .insert(HEAD_KEY.to_string(), (h3.encode(), etag + 1));
    r.sync_now(0);
    settle(&mut r, &store);
    assert_eq!(r.applied_lsn(), top);
    assert_eq!(r.status(0).lazy.unwrap().deferred_segments, 0);
    for (k, v) in [
        (&b"aa"[..], &b"3"[..]),
        (b"bb", b"2"),
        (b"key:000007", &[1u8; 100]),
    ] {
        assert_eq!(
            read_through(&mut r, &store, k),
            Some(Some(v.to_vec())),
            "{k:?}"
        );
    }
}

/// A deferred segment deleted under a newer head whose delta holds its
/// writes (the origin moved on while the replica held an old head): the
/// read that meets the 404 gets an error naming the segment, no error
/// event, and the replica reads the head at once; the next read answers
/// from the newer chain.
#[test]
fn a_deferred_segment_deleted_under_a_newer_head_sends_reads_to_it() {
    let cfg = PublisherConfig {
        delta_every: Some(2),
        ..cfg_filters()
    };
    let (mut p, mut store, mut lsn, mut now) = loaded(cfg);
    put(&mut p, &mut store, &mut lsn, &mut now, b"aa", b"1");
    let h = store.head();
    let seg = h
        .segments
        .last()
        .expect("a segment past the chain")
        .key
        .clone();
    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    assert!(r.status(0).lazy.unwrap().deferred_segments >= 1);
    let old_lsn = r.applied_lsn();
    // The origin writes on; a delta takes the segment's writes in.
    for i in 0..4u8 {
        put(&mut p, &mut store, &mut lsn, &mut now, &[b'b', i], b"2");
    }
    let h = store.head();
    assert!(
        h.deltas.last().is_some_and(|d| d.lsn >= old_lsn),
        "a delta over the segment: {:?}",
        h.deltas
    );
    store.objects.remove(&seg).expect("the segment was there");
    assert_eq!(r.get_lazy(b"aa").unwrap(), Read::Pending);
    let mut c = Cold::default();
    let mut errors = Vec::new();
    let mut answer = None;
    for _ in 0..20 {
        loop {
            match r.poll(0) {
                replica::Action::Fetch(req) => {
                    let resp = store.serve(&req, &mut c);
                    r.handle_response(req.id, 0, resp);
                }
                replica::Action::Event(replica::Event::Error(e)) => errors.push(e),
                replica::Action::Event(_) => {}
                replica::Action::Wait { .. } => break,
            }
        }
        match r.get_lazy(b"aa") {
            Ok(Read::Ready(v)) => {
                answer = Some(v);
                break;
            }
            Ok(Read::Pending) => {}
            Err(e) => assert!(e.to_string().contains(&seg), "{e}"),
        }
    }
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(answer, Some(Some(b"1".to_vec())), "the read never answered");
    assert_eq!(r.applied_lsn(), lsn);
}

/// Deferred-segment GETs whose answers are late, while every head brings
/// a delta past the applied LSN (a jump, which forgets their jobs): they
/// still count against `max_inflight` until answered, so a read that keeps
/// waiting does not send a new batch of whole-segment GETs after each jump.
#[test]
fn deferred_segment_gets_out_stay_bounded_across_jumps() {
    let cfg = PublisherConfig {
        delta_every: Some(3),
        ..cfg_filters()
    };
    let (mut p, mut store, mut lsn, mut now) = loaded(cfg);
    let hot = b"hot".to_vec();
    put(&mut p, &mut store, &mut lsn, &mut now, &hot, b"v0");
    let mut r = lazy_replica();
    r.sync_now(0);
    settle(&mut r, &store);
    let mut out: Vec<GetRequest> = Vec::new();
    let mut most = 0;
    for i in 0..30 {
        let _ = r.get_lazy(&hot);
        for g in collect(&mut r) {
            if g.key.starts_with("segments/") {
                out.push(g);
            } else {
                let resp = store.serve(&g, &mut Cold::default());
                r.handle_response(g.id, 0, resp);
            }
        }
        most = most.max(out.len());
        // The origin writes on: a delta past the applied LSN, then a
        // segment or two past it.
        for j in 0..4 {
            let v = format!("v{i}.{j}");
            put(&mut p, &mut store, &mut lsn, &mut now, &hot, v.as_bytes());
        }
        r.sync_now(0);
        // Heads, pages and catch-up served; segment GETs held.
        for _ in 0..10_000 {
            match r.poll(0) {
                replica::Action::Fetch(g) => {
                    let resp = store.serve(&g, &mut Cold::default());
                    r.handle_response(g.id, 0, resp);
                }
                replica::Action::Event(_) => {}
                replica::Action::Wait { .. } => break,
            }
        }
    }
    assert!(
        most <= 4,
        "{most} deferred-segment GETs out at once (max_inflight 4)"
    );
}
