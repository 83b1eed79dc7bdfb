//! The head stays small however long the history grows: publish 100,000
//! segments through the publisher machine and measure the head.

use std::collections::HashMap;

use walcast_core::batch::{self, Op};
use walcast_core::catalog::{Head, Page, HEAD_KEY};
use walcast_core::io::GetResponse;
use walcast_core::publisher::{
    Action, Event, Publisher, PublisherConfig, PutCondition, PutResponse,
};

#[test]
fn head_stays_bounded_over_100k_segments() {
    const SEGMENTS: u64 = 100_000;
    let cfg = PublisherConfig {
        segment_bytes: 1,
        ..PublisherConfig::default()
    };
    let mut p = Publisher::new(cfg, 1);
    let mut store: HashMap<String, (Vec<u8>, u64)> = HashMap::new();
    let mut etag = 0u64;
    let payload = batch::encode(&[Op::put(b"key".to_vec(), vec![7u8; 100])]).expect("encode");
    let mut now = 1_000;
    let mut max_head = 0u64;
    let mut committed = 0u64;
    while committed < SEGMENTS {
        now += 1;
        // One record per poll: each seals into its own segment.
        if let Some(next) = p.next_lsn() {
            if next <= SEGMENTS && p.has_room() {
                p.push(next, &payload, now).expect("push");
            }
        }
        let mut puts = Vec::new();
        loop {
            match p.poll(now) {
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
                    p.handle_get(g.id, now, resp);
                }
                Action::Put(put) => puts.push(put),
                Action::Delete(d) => {
                    store.remove(&d.key);
                    p.handle_delete(d.id, now, Ok(()));
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
            p.handle_put(put.id, now, resp);
        }
    }
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
