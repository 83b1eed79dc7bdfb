//! The head stays small however long the history grows: publish 100,000
//! segments through the publisher machine and measure the head.

use std::collections::HashMap;

use walcast_core::batch::{self, Op};
use walcast_core::catalog::{Head, Page, HEAD_KEY, MAX_HEAD_BYTES};
use walcast_core::io::GetResponse;
use walcast_core::publisher::{
    Action, Event, Publisher, PublisherConfig, PutCondition, PutResponse,
};

type Store = HashMap<String, (Vec<u8>, u64)>;

/// Drives `p` through an in-memory store, one record per poll (each seals
/// into its own segment), until `segments` LSNs are committed. Returns the
/// store and the largest head written.
fn publish(p: &mut Publisher, store: &mut Store, now: &mut u64, segments: u64) -> u64 {
    let payload = batch::encode(&[Op::put(b"key".to_vec(), vec![7u8; 100])]).expect("encode");
    let mut etag = store.values().map(|(_, e)| *e).max().unwrap_or(0);
    let mut max_head = 0u64;
    let mut committed = p.committed_lsn();
    while committed < segments {
        *now += 1;
        if let Some(next) = p.next_lsn() {
            if next <= segments && p.has_room() {
                p.push(next, &payload, *now).expect("push");
            }
        }
        let mut puts = Vec::new();
        loop {
            match p.poll(*now) {
                Action::Wait { .. } => break,
                Action::Get(g) => {
                    let resp = match store.get(&g.key) {
                        Some((b, e)) => GetResponse::Ok {
                            body: b.clone(),
                            etag: Some(e.to_string()),
                            range: None,
                        },
                        None => GetResponse::NotFound,
                    };
                    p.handle_get(g.id, *now, resp);
                }
                Action::Put(put) => puts.push(put),
                Action::Delete(d) => {
                    store.remove(&d.key);
                    p.handle_delete(d.id, *now, Ok(()));
                }
                Action::Event(Event::Committed {
                    lsn, head_bytes, ..
                }) => {
                    committed = lsn;
                    max_head = max_head.max(head_bytes);
                }
                Action::Event(Event::Fenced(e)) => panic!("fenced: {e}"),
                Action::Event(_) => {}
            }
        }
        for put in puts {
            let cur = store.get(&put.key).map(|(_, e)| *e);
            let resp = match (&put.condition, cur) {
                (PutCondition::CreateOnly, Some(_)) => PutResponse::AlreadyExists,
                (PutCondition::IfMatch(e), Some(c)) if *e != c.to_string() => {
                    PutResponse::PreconditionFailed
                }
                (PutCondition::IfMatch(_), None) => PutResponse::PreconditionFailed,
                _ => {
                    etag += 1;
                    store.insert(put.key.clone(), (put.body.clone(), etag));
                    PutResponse::Ok {
                        etag: Some(etag.to_string()),
                    }
                }
            };
            p.handle_put(put.id, *now, resp);
        }
    }
    max_head
}

/// Every key the catalog names: the head's segments, pages and everything
/// under them, and the snapshot.
fn named_keys(store: &Store, head: &Head) -> Vec<String> {
    let mut keys: Vec<String> = head.segments.iter().map(|s| s.key.clone()).collect();
    keys.extend(head.snapshot.iter().map(|s| s.key.clone()));
    let mut stack = head.pages.clone();
    while let Some(r) = stack.pop() {
        keys.push(r.key.clone());
        let page = Page::decode(&store[&r.key].0, &r).expect("valid page");
        keys.extend(page.segments.iter().map(|s| s.key.clone()));
        stack.extend(page.pages);
    }
    keys
}

/// Retention that lets go of tens of thousands of segments in one commit
/// retires them in bounded chunks: every head stays far below its 1 MiB
/// bound, the history keeps covering `earliest_lsn`, and once deletions
/// catch up every retired object is gone and nothing is left behind.
#[test]
fn retention_of_30k_segments_keeps_the_head_small() {
    const FIRST: u64 = 30_000;
    let cfg = PublisherConfig {
        segment_bytes: 1,
        // No snapshot until the history is long, then one covering it all.
        snapshot_every: Some(FIRST - 10),
        retain_lsns: Some(10),
        grace_ms: 5_000,
        tail_bytes: 0,
        max_commits_per_sec: 0,
        ..PublisherConfig::default()
    };
    let mut p = Publisher::new(cfg, 7);
    let mut store = Store::new();
    let mut now = 1_000;
    let mut max_head = publish(&mut p, &mut store, &mut now, FIRST);
    let mut lsn = FIRST;
    let mut retired_seen = 0;
    // Keep writing while the grace periods pass, until every object below
    // the earliest LSN is gone.
    for _ in 0..400 {
        let head = Head::decode(&store[HEAD_KEY].0).expect("valid head");
        retired_seen = retired_seen.max(head.retired.len());
        let first = head.first_covered_lsn().expect("history");
        assert!(first <= head.earliest_lsn, "history starts at {first}");
        let named = named_keys(&store, &head);
        let covers = |last: u64| last >= head.earliest_lsn;
        let clean = head.pages.first().is_none_or(|r| covers(r.last_lsn))
            && head.segments.first().is_none_or(|s| covers(s.last_lsn));
        if head.earliest_lsn > FIRST - 100 && clean && head.retired.is_empty() {
            // Everything stored is named by the catalog.
            let stored: Vec<&String> = store.keys().filter(|k| *k != HEAD_KEY).collect();
            assert_eq!(stored.len(), named.len(), "objects left behind");
            break;
        }
        now += 1_000;
        lsn += 20;
        max_head = max_head.max(publish(&mut p, &mut store, &mut now, lsn));
    }
    let head = Head::decode(&store[HEAD_KEY].0).expect("valid head");
    println!(
        "retention over {FIRST} segments: largest head {max_head} bytes, at most {retired_seen} retired keys listed; now {} stored objects, earliest LSN {}",
        store.len(),
        head.earliest_lsn
    );
    assert!(
        head.retired.is_empty(),
        "{} still retired",
        head.retired.len()
    );
    assert!(
        max_head < 512 << 10,
        "a head of {max_head} bytes (the cap is {MAX_HEAD_BYTES})"
    );
}

#[test]
fn head_stays_bounded_over_100k_segments() {
    const SEGMENTS: u64 = 100_000;
    let cfg = PublisherConfig {
        segment_bytes: 1,
        ..PublisherConfig::default()
    };
    let mut p = Publisher::new(cfg, 1);
    let mut store = Store::new();
    let mut now = 1_000;
    let max_head = publish(&mut p, &mut store, &mut now, SEGMENTS);
    let head_bytes = store.get(HEAD_KEY).expect("head").0.clone();
    let head = Head::decode(&head_bytes).expect("valid head");
    assert_eq!(head.committed_lsn, SEGMENTS);
    // Every segment is reachable through the head, its pages and their pages.
    let mut count = head.segments.len() as u64;
    let mut levels = 0;
    let mut stack = head.pages.clone();
    while let Some(r) = stack.pop() {
        let page = Page::decode(&store[&r.key].0, &r).expect("valid page");
        levels = levels.max(r.level + 1);
        count += page.segments.len() as u64;
        stack.extend(page.pages);
    }
    assert_eq!(count, SEGMENTS, "segments reachable from the head");
    println!(
        "head after {SEGMENTS} segments: {} bytes ({} inline segments, {} page refs, {levels} page levels; largest head written {max_head} bytes)",
        head_bytes.len(),
        head.segments.len(),
        head.pages.len()
    );
    assert!(
        head_bytes.len() < 64 << 10,
        "head is {} bytes",
        head_bytes.len()
    );
}
