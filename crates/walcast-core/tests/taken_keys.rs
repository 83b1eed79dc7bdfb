//! Create-only PUTs that find their key taken: the publisher reads the
//! object back, settles the PUT when it holds its own bytes (an earlier try
//! whose answer was lost), and stops with an error naming the object when
//! it holds another writer's (an epoch used before at this prefix, by a
//! head since deleted). It never commits a head naming bytes it did not
//! write. Also: taking over a dataset whose head names what older
//! publishers wrote.

#[path = "support/objects.rs"]
mod objects;

use objects::{head, Objects};
use walcast_core::batch::{self, Op};
use walcast_core::catalog::{Head, HEAD_KEY};
use walcast_core::error::ErrorKind;
use walcast_core::io::GetResponse;
use walcast_core::publisher::{Action, Event, Publisher, PublisherConfig, PutRequest, PutResponse};

fn cfg() -> PublisherConfig {
    PublisherConfig {
        segment_bytes: 200,
        inline_segments: 0,
        tail_bytes: 0,
        max_commits_per_sec: 0,
        head_check_ms: 0,
        snapshot_every: None,
        ..PublisherConfig::default()
    }
}

/// Pushes batches up to LSN `n` whose values are `fill`, driving the publisher
/// against `objects` until it has nothing left to do; `lose` says which
/// PUTs land but lose their answer. Returns the events.
fn publish(
    p: &mut Publisher,
    objects: &mut Objects,
    n: u64,
    fill: u8,
    lose: &mut dyn FnMut(&PutRequest) -> bool,
) -> Vec<Event> {
    publish_denying(p, objects, n, fill, lose, &mut |_| false)
}

/// [`publish`], answering `403` to the GETs `deny` picks (by key).
fn publish_denying(
    p: &mut Publisher,
    objects: &mut Objects,
    n: u64,
    fill: u8,
    lose: &mut dyn FnMut(&PutRequest) -> bool,
    deny: &mut dyn FnMut(&str) -> bool,
) -> Vec<Event> {
    let mut events = Vec::new();
    let mut etag = objects.values().map(|(_, e)| *e).max().unwrap_or(0);
    for t in (0..60_000u64).step_by(10) {
        // Up to LSN `n`, from wherever the claimed dataset ends.
        if let Some(lsn) = p.next_lsn().filter(|&l| l <= n && p.has_room()) {
            let ops = vec![Op::put(format!("k{lsn}").into_bytes(), vec![fill; 40])];
            p.push(lsn, &batch::encode(&ops).unwrap(), t).unwrap();
        }
        loop {
            match p.poll(t) {
                Action::Put(req) => {
                    let resp = match objects::put(objects, &mut etag, &req) {
                        // Stored, and the answer lost.
                        PutResponse::Ok { .. } if lose(&req) => PutResponse::Failed {
                            message: "connection reset".into(),
                        },
                        resp => resp,
                    };
                    p.handle_put(req.id, t, resp);
                }
                Action::Get(req) if deny(&req.key) => {
                    let resp = GetResponse::Failed {
                        status: Some(403),
                        message: "AccessDenied".into(),
                    };
                    p.handle_get(req.id, t, resp);
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
        if p.is_fenced() || p.committed_lsn() == n {
            break;
        }
    }
    events
}

#[test]
fn a_put_whose_answer_was_lost_is_settled_by_reading_it_back() {
    let mut objects = Objects::new();
    let mut p = Publisher::new(cfg(), 1);
    let mut lost = Vec::new();
    let events = publish(&mut p, &mut objects, 30, 1, &mut |req| {
        let first = req.key.starts_with("segments/") || req.key.starts_with("catalog/pages/");
        if first && !lost.contains(&req.key) {
            lost.push(req.key.clone());
            return true;
        }
        false
    });
    assert!(!p.is_fenced(), "{events:?}");
    assert!(lost.iter().any(|k| k.starts_with("segments/")));
    let h = head(&objects);
    assert_eq!(h.committed_lsn, 30);
    for s in &h.segments {
        let (body, _) = &objects[&s.key];
        assert_eq!(crc32fast::hash(body), s.crc32, "{}", s.key);
    }
}

#[test]
fn another_writers_object_at_our_key_stops_the_publisher_naming_it() {
    let mut objects = Objects::new();
    let mut first = Publisher::new(cfg(), 1);
    publish(&mut first, &mut objects, 30, 1, &mut |_| false);
    let old = head(&objects);
    assert_eq!((old.epoch, old.committed_lsn), (1, 30));
    let old_objects: Vec<String> = objects.keys().filter(|k| *k != HEAD_KEY).cloned().collect();
    assert!(old_objects.iter().any(|k| k.starts_with("segments/1/")));

    // The head goes (deleted by hand, or a bucket rule); the segments stay.
    objects.remove(HEAD_KEY);
    let mut second = Publisher::new(cfg(), 2);
    let events = publish(&mut second, &mut objects, 30, 2, &mut |_| false);
    assert!(second.is_fenced(), "{events:?}");
    let err = events
        .iter()
        .find_map(|e| match e {
            Event::Fenced(err) => Some(err.clone()),
            _ => None,
        })
        .expect("a fenced event");
    assert_eq!(err.kind(), ErrorKind::Fenced);
    let fenced = events
        .iter()
        .filter(|e| matches!(e, Event::Fenced(_)))
        .count();
    assert_eq!(fenced, 1, "{events:?}");
    assert!(
        old_objects.iter().any(|k| err.object() == Some(k.as_str())),
        "{err}"
    );
    assert!(err.to_string().contains("epoch 1"), "{err}");
    // No head names the old writer's bytes as the new writer's batches.
    let h = head(&objects);
    assert_ne!(h.dataset_id, old.dataset_id);
    assert_eq!(h.committed_lsn, 0);
    for s in &h.segments {
        assert!(!old_objects.contains(&s.key), "{} committed", s.key);
    }
}

/// A read-back that fails (a bucket policy that allows PUT but not GET)
/// settles nothing: the PUT is retried with backoff, an error naming the
/// object is reported once attempts reach the limit, no head names the
/// object meanwhile, and once the read-back succeeds publishing goes on.
#[test]
fn a_read_back_that_fails_is_retried_and_reported_never_taken_as_ours() {
    use std::cell::{Cell, RefCell};
    let mut objects = Objects::new();
    let mut p = Publisher::new(cfg(), 1);
    let lost: RefCell<Option<String>> = RefCell::new(None);
    let denied = Cell::new(0u32);
    let heads_naming_it = Cell::new(0u32);
    let events = publish_denying(
        &mut p,
        &mut objects,
        30,
        1,
        &mut |req| {
            if let Some(k) = lost.borrow().as_deref() {
                if req.key == HEAD_KEY && denied.get() < 8 {
                    let h = Head::decode(&req.body).unwrap();
                    if h.segments.iter().any(|s| s.key == k) {
                        heads_naming_it.set(heads_naming_it.get() + 1);
                    }
                }
                return false;
            }
            if req.key.starts_with("segments/") {
                *lost.borrow_mut() = Some(req.key.clone());
                return true;
            }
            false
        },
        &mut |key| {
            if lost.borrow().as_deref() == Some(key) && denied.get() < 8 {
                denied.set(denied.get() + 1);
                return true;
            }
            false
        },
    );
    let lost = lost.take().expect("a segment PUT lost its answer");
    assert_eq!(denied.get(), 8, "read-backs denied");
    assert!(!p.is_fenced(), "{events:?}");
    assert_eq!(
        heads_naming_it.get(),
        0,
        "a head named {lost} before it was read back"
    );
    let reported = events.iter().any(|e| match e {
        Event::Error(err) => err.object() == Some(lost.as_str()) || err.to_string().contains(&lost),
        _ => false,
    });
    assert!(reported, "no error named {lost}: {events:?}");
    let h = head(&objects);
    assert_eq!(h.committed_lsn, 30);
    assert!(
        h.segments.iter().any(|s| s.key == lost) || !h.pages.is_empty(),
        "{lost} not committed"
    );
}

/// A dataset whose head names a segment over `MAX_SEGMENT_BYTES` (as
/// publishers before that limit could write): a new publisher reads the
/// head, claims the dataset and goes on publishing after it.
#[test]
fn a_publisher_takes_over_a_dataset_naming_an_oversized_segment() {
    let mut objects = Objects::new();
    let mut first = Publisher::new(cfg(), 1);
    publish(&mut first, &mut objects, 30, 1, &mut |_| false);
    let mut h = head(&objects);
    let big = walcast_core::catalog::MAX_SEGMENT_BYTES + 1;
    h.segments[0].size = big;
    h.generation += 1;
    let etag = objects.values().map(|(_, e)| *e).max().unwrap() + 1;
    objects.insert(HEAD_KEY.to_string(), (h.encode(), etag));

    let mut second = Publisher::new(cfg(), 2);
    let events = publish(&mut second, &mut objects, 40, 2, &mut |_| false);
    for e in &events {
        assert!(!matches!(e, Event::Fenced(_)), "{e:?}");
    }
    assert!(!second.is_fenced());
    let h = head(&objects);
    assert_eq!((h.epoch, h.committed_lsn), (2, 40));
    let named_big = h.segments.iter().any(|s| s.size == big) || !h.pages.is_empty();
    assert!(
        named_big,
        "the old segment's entry is kept: {:?}",
        h.segments
    );
}

/// A store that refuses every conditional PUT of the head (a read-only
/// policy, conditional writes unsupported): the claim is retried a little
/// later each time, not at once, and the error that stops the publisher
/// carries the store's answer.
#[test]
fn a_refused_claim_waits_between_attempts_and_its_error_carries_the_stores_answer() {
    let mut p = Publisher::new(cfg(), 7);
    let mut puts = Vec::new();
    let mut events = Vec::new();
    let mut now = 0u64;
    while !p.is_fenced() && now < 100_000_000 {
        match p.poll(now) {
            Action::Get(req) => p.handle_get(req.id, now, GetResponse::NotFound),
            Action::Put(req) => {
                puts.push(now);
                let message = "403 AccessDenied: conditional writes are not allowed".to_string();
                p.handle_put(req.id, now, PutResponse::Failed { message });
            }
            Action::Delete(req) => p.handle_delete(req.id, now, Ok(())),
            Action::Event(e) => events.push(e),
            Action::Wait { until } => now = until.max(now + 1),
        }
    }
    assert!(p.is_fenced(), "{events:?}");
    while let Action::Event(e) = p.poll(now) {
        events.push(e);
    }
    assert_eq!(puts.len(), 32, "{puts:?}");
    let gaps: Vec<u64> = puts.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|&g| g > 0),
        "a claim PUT right after a refused one: {gaps:?}"
    );
    let fenced = events.iter().find_map(|e| match e {
        Event::Fenced(err) => Some(err.to_string()),
        _ => None,
    });
    let fenced = fenced.expect("a Fenced event");
    assert!(fenced.contains("AccessDenied"), "{fenced}");
}

/// A page PUT that fails once, with nothing else to do: the time its retry
/// is due is in the `Wait` the publisher returns, so a driver that sleeps
/// until then (as `Action::Wait` says) retries it and the commit lands.
#[test]
fn a_page_waiting_to_be_retried_sets_the_wait() {
    let mut objects = Objects::new();
    let mut etag = 0;
    let cfg = PublisherConfig {
        inline_segments: 1,
        page_fanout: 2,
        ..cfg()
    };
    let mut p = Publisher::new(cfg, 3);
    let (mut now, mut failed, mut steps) = (0u64, 0, 0);
    loop {
        steps += 1;
        assert!(steps < 100_000, "no progress");
        while let Some(lsn) = p.next_lsn().filter(|&l| l <= 12 && p.has_room()) {
            let ops = vec![Op::put(format!("k{lsn}").into_bytes(), vec![9; 120])];
            p.push(lsn, &batch::encode(&ops).unwrap(), now).unwrap();
        }
        match p.poll(now) {
            Action::Put(req) => {
                let resp = if req.key.starts_with("catalog/pages/") && failed == 0 {
                    failed += 1;
                    PutResponse::Failed {
                        message: "503 SlowDown".into(),
                    }
                } else {
                    objects::put(&mut objects, &mut etag, &req)
                };
                p.handle_put(req.id, now, resp);
            }
            Action::Get(req) => p.handle_get(req.id, now, objects::get(&objects, &req.key)),
            Action::Delete(req) => {
                objects.remove(&req.key);
                p.handle_delete(req.id, now, Ok(()));
            }
            Action::Event(_) => {}
            Action::Wait { until } if until == u64::MAX => break,
            Action::Wait { until } => now = until.max(now + 1),
        }
    }
    assert_eq!(failed, 1, "a page PUT failed");
    assert_eq!(head(&objects).committed_lsn, 12);
}
