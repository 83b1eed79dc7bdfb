//! The head's filters and retired list within its size limit.

use super::*;

/// Head size with filters: 128 segments past the chain, each of 4,096 key
/// writes in 16 batches (an 8,200-byte filter each): the head carries at
/// most `MAX_HEAD_FILTER_BYTES` of filters, the newest segments'.
#[test]
fn a_head_carries_a_bounded_amount_of_filters() {
    let cfg = PublisherConfig {
        snapshot_every: Some(130 * 16),
        delta_every: Some(1_000_000),
        head_check_ms: 0,
        // 128 segments past the chain stay inline (four times 32).
        inline_segments: 32,
        page_fanout: 16,
        max_commits_per_sec: 0,
        ..PublisherConfig::default()
    };
    let (mut p, mut store) = started(cfg);
    let mut lsn = 0u64;
    let mut now = 1u64;
    let mut max_head = 0usize;
    for seg in 0..(130 + 128) {
        for b in 0..16u64 {
            let ops: Vec<Op> = (0..256u64)
                .map(|i| {
                    Op::put(
                        format!("k{seg:03}-{:05}", b * 256 + i).into_bytes(),
                        vec![1u8],
                    )
                })
                .collect();
            lsn += 1;
            p.push(lsn, &batch::encode(&ops).unwrap(), now).unwrap();
        }
        for _ in 0..20 {
            now += 300;
            store.drive(&mut p, now);
        }
        max_head = max_head.max(store.max_head());
    }
    let h = store.head();
    let end = h.delta_lsn().unwrap();
    let past = h.segments.iter().filter(|s| s.last_lsn > end).count();
    let with = h.segments.iter().filter(|s| s.filter.is_some()).count();
    assert!(past >= 100, "{past} segments past the chain");
    assert!(with >= 1, "the newest segments keep their filters");
    assert!(h.segments.last().unwrap().filter.is_some());
    let filters: usize = h
        .segments
        .iter()
        .filter_map(|s| s.filter.as_ref())
        .map(|f| f.encoded_len())
        .sum();
    assert!(
        filters <= MAX_HEAD_FILTER_BYTES,
        "{filters} bytes of filters"
    );
    assert!(max_head < MAX_HEAD_BYTES / 4, "head of {max_head} bytes");
}

/// As above, with the `retired` list of a retention pass the head also
/// carries (grace period not over): every head still decodes.
#[test]
fn filters_and_retired_entries_keep_the_head_within_its_limit() {
    let cfg = PublisherConfig {
        snapshot_every: Some(2100),
        delta_every: Some(1_000_000),
        retain_lsns: Some(10),
        grace_ms: 1 << 40,
        head_check_ms: 0,
        max_commits_per_sec: 0,
        ..PublisherConfig::default()
    };
    let (mut p, mut store) = started(cfg);
    let mut lsn = 0u64;
    let mut now = 1u64;
    for i in 0..2100u64 {
        put(
            &mut p,
            &mut store,
            &mut lsn,
            &mut now,
            format!("t{i:05}").as_bytes(),
            b"x",
        );
    }
    assert!(store.head().retired.len() > 1_000);
    for seg in 0..128u64 {
        let ops: Vec<Op> = (0..4096u64)
            .map(|i| Op::put(format!("k{seg:03}-{i:05}").into_bytes(), vec![1u8]))
            .collect();
        lsn += 1;
        p.push(lsn, &batch::encode(&ops).unwrap(), now).unwrap();
        for _ in 0..20 {
            now += 300;
            store.drive(&mut p, now); // panics if the head does not decode
        }
        assert!(
            store.max_head() < MAX_HEAD_BYTES,
            "segment {seg}: head of {} bytes",
            store.max_head()
        );
    }
}

/// Deltas retire the deltas they absorb whatever `retired` holds: with
/// nothing deleted (a grace period longer than the run) and a delta every
/// LSN, the list stops at its bound of 2,048 keys, the oldest leaving
/// it, instead of growing until the head is refused.
#[test]
fn retired_deltas_past_the_bound_leave_the_list_not_the_head_over_its_limit() {
    let cfg = PublisherConfig {
        snapshot_every: Some(100),
        delta_every: Some(1),
        grace_ms: 1 << 40,
        head_check_ms: 0,
        tail_bytes: 0,
        max_commits_per_sec: 0,
        ..PublisherConfig::default()
    };
    let (mut p, mut store) = started(cfg);
    let (mut lsn, mut now) = (0u64, 1u64);
    let (mut longest, mut first) = (0, None);
    for i in 0..2_600u64 {
        put(
            &mut p,
            &mut store,
            &mut lsn,
            &mut now,
            format!("r{:03}", i % 500).as_bytes(),
            b"x",
        );
        if i % 25 == 0 {
            let h = store.head();
            longest = longest.max(h.retired.len());
            first = first.or(h.retired.iter().map(|r| r.since_ms).min());
        }
    }
    longest = longest.max(store.head().retired.len());
    assert!(
        store.deleted.is_empty(),
        "nothing is deleted in the grace period"
    );
    assert_eq!(longest, 2_048, "the list reached its bound and kept to it");
    let h = store.head();
    assert!(h.deltas.len() <= MAX_DELTAS);
    // The oldest entries are the ones that left.
    let (oldest, first) = (h.retired.iter().map(|r| r.since_ms).min(), first);
    assert!(oldest > first, "oldest kept {oldest:?}, first {first:?}");
}
