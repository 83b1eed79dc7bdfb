//! A new publisher taking over a dataset whose head was written by a
//! hostile or buggy earlier publisher (or a tampered bucket): it must not
//! delete what its own catalog names, nor write a catalog readers refuse.

#[path = "support/objects.rs"]
mod objects;

use objects::{head, Objects};
use walcast_core::batch::{self, Op};
use walcast_core::catalog::{Head, Page, PageRef, Retired, HEAD_KEY};
use walcast_core::publisher::{Action, Event, Publisher, PublisherConfig};

fn cfg() -> PublisherConfig {
    PublisherConfig {
        segment_bytes: 200,
        inline_segments: 8,
        page_fanout: 8,
        tail_bytes: 0,
        max_commits_per_sec: 0,
        head_check_ms: 0,
        grace_ms: 1_000,
        snapshot_every: None,
        ..PublisherConfig::default()
    }
}

/// Drives `p` against `objects` from `from` to `to` ms, pushing batches up
/// to LSN `n`. Returns the events.
fn run(p: &mut Publisher, objects: &mut Objects, n: u64, from: u64, to: u64) -> Vec<Event> {
    let mut events = Vec::new();
    let mut etag = objects.values().map(|(_, e)| *e).max().unwrap_or(0);
    for t in (from..to).step_by(10) {
        while let Some(lsn) = p.next_lsn().filter(|&l| l <= n && p.has_room()) {
            let ops = vec![Op::put(format!("k{lsn}").into_bytes(), vec![7; 40])];
            p.push(lsn, &batch::encode(&ops).unwrap(), t).unwrap();
            if lsn % 3 == 0 {
                break;
            }
        }
        loop {
            match p.poll(t) {
                Action::Put(req) => {
                    let resp = objects::put(objects, &mut etag, &req);
                    p.handle_put(req.id, t, resp);
                }
                Action::Get(req) => p.handle_get(req.id, t, objects::get(objects, &req.key)),
                Action::Delete(req) => {
                    objects.remove(&req.key);
                    p.handle_delete(req.id, t, Ok(()));
                }
                Action::Event(e) => events.push(e),
                Action::Wait { .. } => break,
            }
        }
        if p.is_fenced() {
            break;
        }
    }
    events
}

/// Writes `h` as the dataset's head (a new version of it).
fn tamper(objects: &mut Objects, mut h: Head) {
    h.generation += 1;
    let etag = objects.values().map(|(_, e)| *e).max().unwrap_or(0) + 1;
    objects.insert(HEAD_KEY.to_string(), (h.encode(), etag));
}

/// Every object the head names, through its pages (each page decoded
/// against its reference, as a replica does): the keys missing from the
/// store, and the pages a replica refuses.
fn check_catalog(objects: &Objects, h: &Head) -> (Vec<String>, Vec<String>) {
    let mut missing = Vec::new();
    let mut refused = Vec::new();
    let mut named: Vec<String> = h.segments.iter().map(|s| s.key.clone()).collect();
    named.extend(h.snapshot.iter().map(|s| s.key.clone()));
    named.extend(h.deltas.iter().map(|d| d.key.clone()));
    let mut refs: Vec<PageRef> = h.pages.clone();
    while let Some(r) = refs.pop() {
        let Some((body, _)) = objects.get(&r.key) else {
            missing.push(r.key.clone());
            continue;
        };
        match Page::decode(body, &r) {
            Ok(p) => {
                named.extend(p.segments.iter().map(|s| s.key.clone()));
                refs.extend(p.pages);
            }
            Err(e) => refused.push(format!("{}: {e}", r.key)),
        }
    }
    missing.extend(named.into_iter().filter(|k| !objects.contains_key(k)));
    (missing, refused)
}

/// The head lists in `retired` a segment it still names: the new publisher
/// must not delete it after the grace period (its heads go on naming it,
/// and replicas would find it gone for good).
#[test]
fn a_retired_entry_naming_a_live_segment_is_not_deleted() {
    let mut objects = Objects::new();
    let mut first = Publisher::new(cfg(), 1);
    run(&mut first, &mut objects, 30, 0, 3_000);
    let mut h = head(&objects);
    assert_eq!(h.committed_lsn, 30);
    let live = h.segments.last().unwrap().key.clone();
    h.retired.push(Retired {
        key: live.clone(),
        since_ms: 0,
    });
    tamper(&mut objects, h);

    let mut second = Publisher::new(cfg(), 2);
    let events = run(&mut second, &mut objects, 40, 10_000, 20_000);
    assert!(!second.is_fenced(), "{events:?}");
    let h = head(&objects);
    assert_eq!((h.epoch, h.committed_lsn), (2, 40));
    let (missing, refused) = check_catalog(&objects, &h);
    assert!(
        missing.is_empty() && refused.is_empty(),
        "the committed head names objects no longer in the store: {missing:?} {refused:?}; \
         deletions: {:?}",
        events
            .iter()
            .filter(|e| matches!(e, Event::Deleted { .. }))
            .collect::<Vec<_>>()
    );
}

/// The head lists in `retired` the keys the next epoch's first segment
/// will have (they do not exist yet): the new publisher writes that segment
/// and commits it, and must not delete it once the grace period (counted
/// from the claim) is over.
#[test]
fn a_retired_entry_naming_a_future_key_does_not_delete_what_is_written_there() {
    let mut objects = Objects::new();
    let mut first = Publisher::new(cfg(), 1);
    run(&mut first, &mut objects, 30, 0, 3_000);
    let mut h = head(&objects);
    for last in 31..=60u64 {
        h.retired.push(Retired {
            key: walcast_core::catalog::segment_key(h.epoch + 1, 31, last),
            since_ms: 0,
        });
    }
    tamper(&mut objects, h);

    let mut second = Publisher::new(
        PublisherConfig {
            grace_ms: 5_000,
            ..cfg()
        },
        2,
    );
    let events = run(&mut second, &mut objects, 60, 10_000, 30_000);
    assert!(!second.is_fenced(), "{events:?}");
    let h = head(&objects);
    assert_eq!((h.epoch, h.committed_lsn), (2, 60));
    let (missing, refused) = check_catalog(&objects, &h);
    assert!(
        missing.is_empty() && refused.is_empty(),
        "the committed head names objects no longer in the store: {missing:?} {refused:?}"
    );
}

/// A head whose page references mix levels (valid: only contiguity is
/// checked): when paging merges a level, it must move a run of references
/// of that level only, never upload a page every replica refuses ("does
/// not match its reference").
#[test]
fn paging_a_head_with_interleaved_levels_writes_no_page_readers_refuse() {
    let mut objects = Objects::new();
    let mut first = Publisher::new(cfg(), 1);
    run(&mut first, &mut objects, 400, 0, 30_000);
    let mut h = head(&objects);
    assert_eq!(h.committed_lsn, 400);
    let top = h
        .pages
        .iter()
        .position(|p| p.level == 1)
        .expect("a level-1 page");
    let r = h.pages[top].clone();
    let page = Page::decode(&objects[&r.key].0, &r).unwrap();
    // [c1, P'(c2..), rest]: the first child, then a new level-1 page of the
    // others (a valid page, in the store).
    let rest = page.pages[1..].to_vec();
    let p2 = Page {
        format: 1,
        level: 1,
        segments: Vec::new(),
        pages: rest.clone(),
        digests: Default::default(),
    };
    let bytes = p2.encode();
    let r2 = PageRef {
        key: walcast_core::catalog::page_key(
            1,
            rest[0].first_lsn,
            rest.last().unwrap().last_lsn,
            1,
        ),
        level: 1,
        first_lsn: rest[0].first_lsn,
        last_lsn: rest.last().unwrap().last_lsn,
        count: rest.len() as u32,
        crc32: crc32fast::hash(&bytes),
    };
    Page::decode(&bytes, &r2).expect("the tampered page is valid");
    objects.insert(r2.key.clone(), (bytes, 1));
    h.pages.splice(top..top + 1, [page.pages[0].clone(), r2]);
    tamper(&mut objects, h);
    let h = head(&objects);
    let (missing, refused) = check_catalog(&objects, &h);
    assert!(
        missing.is_empty() && refused.is_empty(),
        "{missing:?} {refused:?}"
    );

    let mut second = Publisher::new(cfg(), 2);
    let events = run(&mut second, &mut objects, 800, 40_000, 100_000);
    assert!(!second.is_fenced(), "{events:?}");
    let h = head(&objects);
    assert_eq!((h.epoch, h.committed_lsn), (2, 800));
    let (missing, refused) = check_catalog(&objects, &h);
    assert!(
        missing.is_empty() && refused.is_empty(),
        "the new publisher's catalog: missing {missing:?}, refused {refused:?}; levels {:?}",
        h.pages.iter().map(|p| p.level).collect::<Vec<_>>()
    );
}

/// The head's `retired` list is full (2,048 keys) of entries whose
/// `since_ms` lies far in the future: retention, which retires nothing
/// while the list is full, must not stop for good; such an entry waits at
/// most twice the grace period, and the history below `earliest_lsn` is
/// retired and deleted.
#[test]
fn retired_entries_dated_in_the_future_do_not_stop_retention_for_good() {
    let c = PublisherConfig {
        snapshot_every: Some(20),
        retain_lsns: Some(20),
        ..cfg()
    };
    let mut objects = Objects::new();
    let mut first = Publisher::new(c.clone(), 1);
    run(&mut first, &mut objects, 30, 0, 3_000);
    let mut h = head(&objects);
    h.retired.clear();
    for i in 0..2048u64 {
        h.retired.push(Retired {
            key: walcast_core::catalog::segment_key(9, 1_000_000 + 2 * i, 1_000_000 + 2 * i),
            since_ms: u64::MAX,
        });
    }
    tamper(&mut objects, h);

    let mut second = Publisher::new(c, 2);
    let events = run(&mut second, &mut objects, 400, 10_000, 200_000);
    assert!(!second.is_fenced(), "{events:?}");
    let h = head(&objects);
    assert_eq!(h.committed_lsn, 400);
    let first_covered = h.first_covered_lsn().unwrap();
    let stuck = h.retired.iter().filter(|r| r.since_ms == u64::MAX).count();
    assert!(
        first_covered + 100 >= h.earliest_lsn,
        "retention stalled: history starts at {first_covered}, earliest_lsn {}; \
         {stuck} future-dated entries still retired, {} objects stored",
        h.earliest_lsn,
        objects.len()
    );
}

/// Puts `body` in the store as the head under the running publisher `p`
/// (at 6 s), runs it on, and checks that the store's head names nothing it
/// deleted and that it stopped. Returns its events.
fn head_under_the_publisher(p: &mut Publisher, objects: &mut Objects, body: Vec<u8>) -> Vec<Event> {
    let etag = objects.values().map(|(_, e)| *e).max().unwrap_or(0) + 1;
    objects.insert(HEAD_KEY.to_string(), (body, etag));
    let events = run(p, objects, 40, 6_000, 600_000);
    let (missing, refused) = check_catalog(objects, &head(objects));
    assert!(
        missing.is_empty() && refused.is_empty(),
        "the store's head names objects the publisher deleted: {missing:?} {refused:?}"
    );
    assert!(p.is_fenced(), "the publisher goes on: {events:?}");
    events
}

/// The store's head goes back to an earlier head of this publisher (a
/// bucket restored from a backup, or a write the store acknowledged and
/// then lost) after later heads retired objects that earlier head names:
/// the publisher deletes none of them, and stops with a `data` error
/// naming the head and both generations instead of retrying for ever.
#[test]
fn a_head_that_went_back_stops_the_publisher_before_it_deletes_what_that_head_names() {
    let cfg = PublisherConfig {
        snapshot_every: Some(10),
        retain_lsns: Some(1),
        head_check_ms: 100,
        grace_ms: 5_000,
        ..cfg()
    };
    let mut objects = Objects::new();
    let mut p = Publisher::new(cfg, 1);
    run(&mut p, &mut objects, 20, 0, 3_000);
    let backup = objects[HEAD_KEY].0.clone();
    let before = Head::decode(&backup).unwrap();
    assert_eq!(before.committed_lsn, 20);
    run(&mut p, &mut objects, 40, 3_000, 6_000);
    let later = head(&objects);
    assert_eq!(later.committed_lsn, 40);
    // The later heads retired objects the backup names.
    let named: Vec<&str> = before.segments.iter().map(|s| s.key.as_str()).collect();
    assert!(
        later
            .retired
            .iter()
            .any(|r| named.contains(&r.key.as_str())),
        "retention retired none of the backup's segments: {:?}",
        later.retired
    );
    let events = head_under_the_publisher(&mut p, &mut objects, backup);
    let said = events.iter().any(|e| {
        matches!(e, Event::Fenced(err) if err.to_string().contains("went back")
            && err.to_string().contains(&format!("generation {}", before.generation)))
    });
    assert!(said, "{events:?}");
}

/// After this publisher claimed the dataset at a newer epoch, the store's
/// head becomes an older writer's (epoch below ours, generation above
/// ours: a store that does not enforce conditional writes let its write
/// through). The publisher deletes nothing that head names, and stops with
/// a `data` error naming both epochs, instead of writing over it.
#[test]
fn an_older_epochs_head_over_our_claim_stops_the_publisher_before_it_deletes() {
    let cfg = PublisherConfig {
        snapshot_every: Some(10),
        retain_lsns: Some(1),
        head_check_ms: 100,
        grace_ms: 5_000,
        ..cfg()
    };
    let mut objects = Objects::new();
    let mut old = Publisher::new(cfg.clone(), 1);
    run(&mut old, &mut objects, 20, 0, 3_000);
    let older = head(&objects);
    assert_eq!(older.committed_lsn, 20);
    let mut p = Publisher::new(cfg, 2);
    run(&mut p, &mut objects, 40, 3_000, 6_000);
    let ours = head(&objects);
    assert!(ours.epoch > older.epoch && ours.committed_lsn == 40);
    assert!(
        ours.retired
            .iter()
            .any(|r| older.segments.iter().any(|s| s.key == r.key)),
        "retention retired none of the older writer's segments: {:?}",
        ours.retired
    );
    // The older writer's write lands over our claim.
    let mut theirs = older.clone();
    theirs.generation = ours.generation + 3;
    let events = head_under_the_publisher(&mut p, &mut objects, theirs.encode());
    let said = events.iter().any(|e| {
        matches!(e, Event::Fenced(err) if err.to_string().contains("went back")
            && err.to_string().contains(&format!("of epoch {}", older.epoch))
            && err.to_string().contains(&format!("of epoch {}", ours.epoch)))
    });
    assert!(said, "{events:?}");
}

/// A store that refuses every head write (a bucket policy's 403): the
/// publisher keeps retrying, and says so again after every run of failed
/// attempts, each time with the store's answer and the head's key.
#[test]
fn a_store_refusing_every_head_write_is_reported_again_with_its_answer() {
    let mut objects = Objects::new();
    let mut p = Publisher::new(cfg(), 3);
    run(&mut p, &mut objects, 3, 0, 1_000);
    let committed = head(&objects).committed_lsn;
    let mut etag = objects.values().map(|(_, e)| *e).max().unwrap_or(0);
    let mut errors = Vec::new();
    for t in (1_000..600_000u64).step_by(10) {
        while let Some(lsn) = p.next_lsn().filter(|&l| l <= 10 && p.has_room()) {
            let ops = vec![Op::put(format!("k{lsn}").into_bytes(), vec![7; 40])];
            p.push(lsn, &batch::encode(&ops).unwrap(), t).unwrap();
        }
        loop {
            match p.poll(t) {
                Action::Put(req) if req.key == HEAD_KEY => {
                    let resp = walcast_core::publisher::PutResponse::Failed {
                        message: "403 AccessDenied".into(),
                    };
                    p.handle_put(req.id, t, resp);
                }
                Action::Put(req) => {
                    let resp = objects::put(&mut objects, &mut etag, &req);
                    p.handle_put(req.id, t, resp);
                }
                Action::Get(req) => p.handle_get(req.id, t, objects::get(&objects, &req.key)),
                Action::Delete(req) => {
                    objects.remove(&req.key);
                    p.handle_delete(req.id, t, Ok(()));
                }
                Action::Event(Event::Error(e)) => errors.push(e),
                Action::Event(_) => {}
                Action::Wait { .. } => break,
            }
        }
    }
    assert_eq!(head(&objects).committed_lsn, committed, "nothing committed");
    assert!(!p.is_fenced());
    let said: Vec<_> = errors
        .iter()
        .filter(|e| e.to_string().contains("403 AccessDenied") && e.object() == Some(HEAD_KEY))
        .collect();
    assert!(said.len() >= 2, "reported {} times: {errors:?}", said.len());
}

/// A store whose every claim PUT fails its condition (a cache answering
/// head reads with a stale ETag): the claims are spaced by the retry base,
/// not sent back to back, and the publisher stops naming the 412.
#[test]
fn claims_refused_with_412_back_off_and_the_error_says_so() {
    let mut objects = Objects::new();
    let mut first = Publisher::new(cfg(), 4);
    run(&mut first, &mut objects, 3, 0, 1_000);
    let mut p = Publisher::new(
        PublisherConfig {
            retry_base_ms: 100,
            ..cfg()
        },
        5,
    );
    let mut claims = Vec::new();
    let mut fenced = None;
    for t in 0..60_000u64 {
        loop {
            match p.poll(t) {
                Action::Put(req) if req.key == HEAD_KEY => {
                    claims.push(t);
                    p.handle_put(
                        req.id,
                        t,
                        walcast_core::publisher::PutResponse::PreconditionFailed,
                    );
                }
                Action::Put(req) => p.handle_put(
                    req.id,
                    t,
                    walcast_core::publisher::PutResponse::Ok { etag: None },
                ),
                Action::Get(req) => p.handle_get(req.id, t, objects::get(&objects, &req.key)),
                Action::Delete(req) => p.handle_delete(req.id, t, Ok(())),
                Action::Event(Event::Fenced(e)) => fenced = Some(e),
                Action::Event(_) => {}
                Action::Wait { .. } => break,
            }
        }
        if fenced.is_some() {
            break;
        }
    }
    let err = fenced.expect("the claim gives up").to_string();
    assert!(
        err.contains("after 32 attempts") && err.contains("412"),
        "{err}"
    );
    assert_eq!(claims.len(), 32);
    let span = claims.last().unwrap() - claims.first().unwrap();
    assert!(span >= 31 * 100, "32 claims within {span} ms");
}

/// Another dataset's head at the prefix (a new dataset started there):
/// the publisher stops, naming both datasets, not an epoch "owning" ours.
#[test]
fn another_datasets_head_stops_the_publisher_naming_both_datasets() {
    let cfg = PublisherConfig {
        head_check_ms: 100,
        ..cfg()
    };
    let mut objects = Objects::new();
    let mut p = Publisher::new(cfg, 6);
    run(&mut p, &mut objects, 6, 0, 2_000);
    let ours = head(&objects);
    let other = walcast_core::catalog::DatasetId::from_seed(99);
    let theirs = Head::new(other, 1);
    let etag = objects.values().map(|(_, e)| *e).max().unwrap_or(0) + 1;
    objects.insert(HEAD_KEY.to_string(), (theirs.encode(), etag));
    let events = run(&mut p, &mut objects, 6, 2_000, 10_000);
    assert!(p.is_fenced(), "{events:?}");
    let said = events.iter().any(|e| {
        matches!(e, Event::Fenced(err) if err.to_string().contains(&other.to_string())
            && err.to_string().contains(&ours.dataset_id.to_string()))
    });
    assert!(said, "{events:?}");
}

/// The publisher's defaults (segments of any size, the tail carried),
/// committing at once.
fn quiet() -> PublisherConfig {
    PublisherConfig {
        max_commits_per_sec: 0,
        head_check_ms: 0,
        snapshot_every: None,
        ..PublisherConfig::default()
    }
}

/// A claimed head's tail copy that is not the segment's bytes: the new
/// publisher carries no such copy into its heads (replicas would refuse it
/// and fetch the segment, on every head that carried it).
#[test]
fn a_bad_tail_copy_in_a_claimed_head_is_not_carried_on() {
    let mut objects = Objects::new();
    let mut a = Publisher::new(quiet(), 1);
    run(&mut a, &mut objects, 3, 0, 500);
    let mut h = head(&objects);
    assert!(!h.tail.is_empty(), "A's head carries a tail");
    let key = h.tail[0].key.clone();
    let n = h.tail[0].body.len();
    h.tail[0].body[n / 2] ^= 0xff;
    tamper(&mut objects, h);
    let mut b = Publisher::new(quiet(), 2);
    run(&mut b, &mut objects, 4, 1000, 1500);
    let h = head(&objects);
    assert!(
        h.committed_lsn >= 4 && h.epoch == 2,
        "{} {}",
        h.committed_lsn,
        h.epoch
    );
    let stored = &objects[&key].0;
    let carried = h.tail_body(&key);
    assert!(
        carried.is_none() || carried == Some(stored.as_slice()),
        "B's head (epoch {}) carries a copy of {key} that is not the stored object",
        h.epoch
    );
}

/// A claimed head whose delta claims u64::MAX entries: the publisher's
/// merge rule does not overflow.
#[test]
fn a_delta_entry_count_at_u64_max_does_not_panic_the_publisher() {
    let cfg = |every| PublisherConfig {
        snapshot_every: Some(every),
        delta_every: Some(1),
        ..quiet()
    };
    let mut objects = Objects::new();
    let mut a = Publisher::new(cfg(3), 1);
    run(&mut a, &mut objects, 4, 0, 2_000);
    let mut h = head(&objects);
    assert_eq!(h.snapshot.as_ref().map(|s| s.lsn), Some(3), "{h:?}");
    assert_eq!(h.deltas.len(), 1, "{h:?}");
    h.deltas[0].entries = u64::MAX;
    tamper(&mut objects, h);
    let mut b = Publisher::new(cfg(100), 2);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(&mut b, &mut objects, 6, 3_000, 4_000)
    }));
    assert!(
        r.is_ok(),
        "the publisher panicked on a claimed head's delta entry count"
    );
}
