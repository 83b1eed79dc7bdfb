//! Retention with deltas: unreadable pages, and grace periods counted from
//! when the head lands.

use super::*;

/// A publisher taking over a dataset whose old pages are damaged: the
/// retention that must read them waits (and reports the error), while every
/// new record is still committed.
#[test]
fn an_unreadable_page_holds_back_retention_not_commits() {
    let cfg = PublisherConfig {
        snapshot_every: Some(50),
        inline_segments: 2,
        page_fanout: 2,
        head_check_ms: 0,
        max_commits_per_sec: 0,
        tail_bytes: 0,
        ..PublisherConfig::default()
    };
    let (mut p, mut store) = started(cfg.clone());
    let (mut lsn, mut now) = (0u64, 1u64);
    for i in 0..60u32 {
        put(
            &mut p,
            &mut store,
            &mut lsn,
            &mut now,
            format!("a{i}").as_bytes(),
            b"x",
        );
    }
    let h = store.head();
    assert!(
        h.snapshot.is_some() && !h.pages.is_empty(),
        "a snapshot and pages"
    );
    let mut damaged = 0;
    for (k, (b, _)) in store.objects.iter_mut() {
        if object_kind(k) == Some("page") {
            b[10] ^= 0x20;
            damaged += 1;
        }
    }
    assert!(damaged > 0);
    let mut q = Publisher::new(
        PublisherConfig {
            snapshot_every: None,
            retain_lsns: Some(5),
            ..cfg
        },
        8,
    );
    store.drive(&mut q, now);
    for i in 0..40u32 {
        put(
            &mut q,
            &mut store,
            &mut lsn,
            &mut now,
            format!("b{i}").as_bytes(),
            b"y",
        );
    }
    let h = store.head();
    assert_eq!(h.committed_lsn, lsn, "every record committed");
    assert!(!h.pages.is_empty(), "the damaged pages are still named");
}

/// A retired object is deleted no sooner than the grace period after the
/// head that retired it landed, however long that head took to land (its
/// page PUTs failing for three seconds, three grace periods): readers of
/// the head before it keep finding what it names.
#[test]
fn retired_objects_wait_their_grace_period_from_when_the_head_lands() {
    let grace = 1_000;
    let cfg = PublisherConfig {
        segment_bytes: 100,
        inline_segments: 2,
        page_fanout: 2,
        snapshot_every: Some(20),
        retain_lsns: Some(10),
        grace_ms: grace,
        max_commits_per_sec: 0,
        head_check_ms: 0,
        tail_bytes: 0,
        ..PublisherConfig::default()
    };
    let mut p = Publisher::new(cfg, 7);
    let mut objects: HashMap<String, (Vec<u8>, u64)> = HashMap::new();
    let mut etag = 0u64;
    // When a landed head first named each retired key.
    let mut landed: HashMap<String, u64> = HashMap::new();
    let (fail_from, fail_to) = (2_000, 5_000);
    let mut deletes_after_the_outage = 0;
    let mut lsn = 0u64;
    for t in (0..12_000u64).step_by(10) {
        if t < 6_000 && p.next_lsn().is_some_and(|n| n == lsn + 1) && p.has_room() {
            lsn += 1;
            let ops = vec![Op::put(
                format!("k{}", lsn % 7).into_bytes(),
                vec![lsn as u8; 40],
            )];
            p.push(lsn, &batch::encode(&ops).unwrap(), t).unwrap();
        }
        loop {
            match p.poll(t) {
                Action::Put(req) => {
                    if req.key.starts_with("catalog/pages/") && (fail_from..fail_to).contains(&t) {
                        let message = "503 slow down".to_string();
                        p.handle_put(req.id, t, PutResponse::Failed { message });
                        continue;
                    }
                    let cur = objects.get(&req.key).map(|(_, e)| e.to_string());
                    let ok = match &req.condition {
                        PutCondition::CreateOnly => cur.is_none(),
                        PutCondition::IfMatch(e) => cur.as_deref() == Some(e.as_str()),
                    };
                    if !ok {
                        p.handle_put(req.id, t, PutResponse::PreconditionFailed);
                        continue;
                    }
                    if req.key == HEAD_KEY {
                        let h = Head::decode(&req.body).expect("the publisher's head decodes");
                        for r in h.retired {
                            landed.entry(r.key).or_insert(t);
                        }
                    }
                    etag += 1;
                    objects.insert(req.key.clone(), (req.body.clone(), etag));
                    p.handle_put(
                        req.id,
                        t,
                        PutResponse::Ok {
                            etag: Some(etag.to_string()),
                        },
                    );
                }
                Action::Get(req) => {
                    let resp = match objects.get(&req.key) {
                        Some((b, e)) => GetResponse::Ok {
                            body: b.clone(),
                            etag: Some(e.to_string()),
                            range: None,
                        },
                        None => GetResponse::NotFound,
                    };
                    p.handle_get(req.id, t, resp);
                }
                Action::Delete(req) => {
                    let at = landed[&req.key];
                    assert!(
                        t >= at + grace,
                        "{} deleted {} ms after the head retiring it landed",
                        req.key,
                        t - at
                    );
                    if at >= fail_to {
                        deletes_after_the_outage += 1;
                    }
                    objects.remove(&req.key);
                    p.handle_delete(req.id, t, Ok(()));
                }
                Action::Event(_) => {}
                Action::Wait { .. } => break,
            }
        }
    }
    assert!(lsn > 150, "the publisher took {lsn} batches");
    assert!(
        deletes_after_the_outage > 0,
        "no object retired by a head landing after the outage was deleted"
    );
}
