//! Replay throughput over a segment already in memory, as ratios against
//! `crc32fast::hash` and a plain copy of the same bytes, measured in one run.
//!
//! `cargo bench -p walcast-core --bench replay`

use std::hint::black_box;
use std::time::{Duration, Instant};

use walcast_core::batch::{self, Op};
use walcast_core::segment::{self, SegmentBuilder};
use walcast_core::state::KvState;

/// Best of `runs` timings of `f`. What `f` returns (a replayed state) is
/// dropped after the clock stops: freeing the result is not replay.
fn best<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            let out = black_box(f());
            let d = t.elapsed();
            drop(out);
            d
        })
        .min()
        .unwrap_or_default()
}

/// A segment of `n` single-put batches (12-byte key `key:{key(i):08}`, a
/// 100-byte value), as walcast-bench writes it.
fn segment_of(n: u64, key: impl Fn(u64) -> u64) -> (Vec<u8>, segment::SegmentSummary) {
    let mut b = SegmentBuilder::new(1, 1);
    for i in 0..n {
        let mut value = vec![b'v'; 100];
        let tag = i.to_string();
        value[..tag.len()].copy_from_slice(tag.as_bytes());
        let payload = batch::encode(&[Op::put(format!("key:{:08}", key(i)).into_bytes(), value)])
            .expect("encode");
        assert!(b.push(&payload));
    }
    b.finish().expect("non-empty")
}

/// A replica's verify step (replica/verify.rs): `segment::decode_with`
/// checks the file and gathers each record's payload position (their LSNs
/// are dense) in its one walk over the records.
fn verify(bytes: &[u8], crc: u32, count: u64) -> Vec<(u32, u32)> {
    let mut records = Vec::with_capacity(count as usize);
    let at = bytes.as_ptr() as usize;
    segment::decode_with(bytes, Some(crc), |r| {
        let start = r.payload.as_ptr() as usize - at;
        records.push((start as u32, (start + r.payload.len()) as u32));
    })
    .expect("valid");
    records
}

/// A replica's verify and apply steps (replica/apply.rs): each gathered
/// payload decoded as a batch and applied.
fn replay(bytes: &[u8], crc: u32, count: u64) -> KvState {
    let mut state = KvState::new();
    for (s, e) in verify(bytes, crc, count) {
        state.apply(batch::Batch::parse(&bytes[s as usize..e as usize]).expect("batch"));
    }
    state
}

fn main() {
    // 500,000 batches of one 100-byte put of a new key (walcast-bench's
    // replay-limit segment): about 64 MB of segment.
    let n = 500_000u64;
    let (bytes, summary) = segment_of(n, |i| i);
    // The same with updates: keys cycle over 200,000 (the overlay and its merges).
    let (upd_bytes, upd_summary) = segment_of(n, |i| i % 200_000);
    let mb = bytes.len() as f64 / 1e6;
    if std::env::var_os("REPLAY_PROFILE").is_some() {
        // Only the sequential replay, repeated: for a profiler.
        for _ in 0..20 {
            black_box(replay(&bytes, summary.crc32, n).len());
        }
        return;
    }

    let copy = best(5, || bytes.clone());
    let crc = best(25, || crc32fast::hash(&bytes));
    let decode_only = best(15, || {
        segment::decode(&bytes, Some(summary.crc32))
            .expect("valid")
            .trailer
            .last_lsn
    });
    let verified = best(15, || verify(&bytes, summary.crc32, n));
    let verify_decode = best(15, || {
        let mut ops = 0usize;
        for (s, e) in verify(&bytes, summary.crc32, n) {
            ops += batch::Batch::parse(&bytes[s as usize..e as usize])
                .expect("batch")
                .iter()
                .count();
        }
        ops
    });
    let apply = best(9, || replay(&bytes, summary.crc32, n));
    let apply_updates = best(3, || replay(&upd_bytes, upd_summary.crc32, n));

    // The two headline shares, paired: each round times the hash (best of
    // three) and then each step once, so a round's ratio holds even when the
    // machine's speed drifts between rounds; the median round is quoted.
    let rounds = 15;
    let mut verify_shares = Vec::with_capacity(rounds);
    let mut apply_shares = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let c = best(3, || crc32fast::hash(&bytes)).as_secs_f64();
        let v = best(1, || verify(&bytes, summary.crc32, n)).as_secs_f64();
        let a = best(1, || replay(&bytes, summary.crc32, n)).as_secs_f64();
        verify_shares.push(c / v);
        apply_shares.push(c / a);
    }

    let rate = |d: Duration| mb / d.as_secs_f64();
    println!("segment: {n} records, {mb:.1} MB");
    println!("| step | MB/s | time vs crc32fast::hash |");
    println!("| --- | ---: | ---: |");
    for (name, d) in [
        ("Vec clone (allocate + copy)", copy),
        ("crc32fast::hash over the file", crc),
        (
            "segment::decode alone (file CRC, framing and LSNs)",
            decode_only,
        ),
        (
            "decode + verify, records gathered (a replica's verify step)",
            verified,
        ),
        ("… + KV batch decode", verify_decode),
        ("… + apply to KvState", apply),
        (
            "… + apply, keys cycling over 200,000 (updates)",
            apply_updates,
        ),
    ] {
        println!(
            "| {name} | {:.0} | {:.2}x |",
            rate(d),
            d.as_secs_f64() / crc.as_secs_f64()
        );
    }
    for (name, shares) in [
        ("decode + verify", &mut verify_shares),
        ("decode + verify + apply", &mut apply_shares),
    ] {
        shares.sort_by(f64::total_cmp);
        println!(
            "{name}, share of crc32fast::hash paired round by round ({rounds} rounds): median {:.3} (min {:.3}, max {:.3})",
            shares[rounds / 2],
            shares[0],
            shares[rounds - 1]
        );
    }
    println!(
        "records/s: verify {:.1} M/s, verify+apply {:.2} M/s",
        n as f64 / verified.as_secs_f64() / 1e6,
        n as f64 / apply.as_secs_f64() / 1e6
    );

    // Memory: 1,000,000 keys with 100-byte values, as an edge isolate holds them.
    let mut state = KvState::new();
    for i in 0..1_000_000u32 {
        state.put(
            format!("user:{:07}", (u64::from(i) * 7919) % 1_000_000).as_bytes(),
            &[7u8; 100],
        );
    }
    state.compact();
    let payload = state.len() * (12 + 100);
    println!(
        "KvState with {} keys (12-byte keys, 100-byte values): {:.1} MB heap, {:.1} bytes/entry ({:.1} of them key and value), vs 128 MB per Workers isolate",
        state.len(),
        state.heap_bytes() as f64 / 1e6,
        state.heap_bytes() as f64 / state.len() as f64,
        payload as f64 / state.len() as f64
    );
}
