//! The upload and cold-read figures at the scale (ignored: a
//! benchmark run by hand).

use super::*;

/// Figures at the scale (a benchmark, not run in CI):
/// `cargo test --release -p walcast-core --test deltas -- --ignored --nocapture`.
/// A 1,000,000-key dataset (loaded in batches of 1,000 puts), then steady
/// writes of single 100-byte puts to random keys at 1,000 batches a second
/// (`DELTA_BENCH_LSNS`, default 7,500,000, past several rewrites of the
/// base snapshot, written every `DELTA_BENCH_SNAPSHOT_EVERY`, default
/// 1,200,000, LSNs, or 117 MB of batches; `DELTA_BENCH_SNAPSHOT_RATIO_PERCENT`
/// holds one back until that share of the last one's size in batches, as
/// `--snapshot-ratio`; default 0, no floor), with
/// a delta every `DELTA_BENCH_DELTA_EVERY` (default 6,000) LSNs; the head's
/// tail, inline segments and page fanout are the publisher's defaults unless
/// `DELTA_BENCH_TAIL_BYTES`, `DELTA_BENCH_INLINE_SEGMENTS` or
/// `DELTA_BENCH_PAGE_FANOUT` say otherwise; `DELTA_BENCH_SNAPSHOT_BYTES` and
/// `DELTA_BENCH_DELTA_BYTES` add the byte triggers (unset: none);
/// `DELTA_BENCH_SAMPLE_EVERY` (default 500,000) LSNs a cold read is sampled;
/// `DELTA_BENCH_COMMIT_RATE` sets the commit budget (commits a second, the
/// publisher's default unless set); `DELTA_BENCH_RESTART_EVERY` restarts
/// the publisher every that many steady LSNs (a new process claims the
/// dataset and replays the whole WAL into its state, as `walcast publish`
/// does; default 0, never).
/// Prints the
/// publisher's uploaded bytes by kind against the WAL bytes of the steady
/// writes, and the worst cold point read (round trips, GETs, bytes) of new
/// lazy replicas sampled along the run.
#[test]
#[ignore = "a benchmark at 1,000,000 keys; run by hand"]
fn delta_figures_at_scale() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let keys = env("DELTA_BENCH_KEYS", 1_000_000);
    let steady = env("DELTA_BENCH_LSNS", 7_500_000);
    let sample_every = env("DELTA_BENCH_SAMPLE_EVERY", 500_000).max(1);
    let defaults = PublisherConfig::default();
    let cfg = PublisherConfig {
        snapshot_every: Some(env("DELTA_BENCH_SNAPSHOT_EVERY", 1_200_000)),
        delta_every: Some(env("DELTA_BENCH_DELTA_EVERY", 6_000)),
        // Later snapshots wait for this share of the last one's size in
        // batches (0, the default: no floor).
        snapshot_ratio_percent: Some(env("DELTA_BENCH_SNAPSHOT_RATIO_PERCENT", 0) as u32)
            .filter(|&r| r > 0),
        head_check_ms: 0,
        // A snapshot once the load's bytes were written (the load is then
        // followed by one, as `--snapshot-bytes` makes it in practice), so
        // deltas are written through the whole steady phase: its figures
        // are the steady state's. 0: by LSNs only.
        snapshot_bytes: Some(env("DELTA_BENCH_SNAPSHOT_BYTES", keys * 117)).filter(|&b| b > 0),
        delta_bytes: std::env::var("DELTA_BENCH_DELTA_BYTES")
            .ok()
            .and_then(|v| v.parse().ok()),
        tail_bytes: env("DELTA_BENCH_TAIL_BYTES", defaults.tail_bytes as u64) as usize,
        inline_segments: env(
            "DELTA_BENCH_INLINE_SEGMENTS",
            defaults.inline_segments as u64,
        ) as usize,
        page_fanout: env("DELTA_BENCH_PAGE_FANOUT", defaults.page_fanout as u64) as usize,
        max_commits_per_sec: env(
            "DELTA_BENCH_COMMIT_RATE",
            u64::from(defaults.max_commits_per_sec),
        ) as u32,
        // Heads stored gzip-compressed (`--head-encoding gzip`); 0: JSON.
        head_gzip: env("DELTA_BENCH_HEAD_GZIP", 1) != 0,
        pointer_deltas: env("DELTA_BENCH_POINTERS", 0) != 0,
        ..defaults
    };
    let cfg_pointers = cfg.pointer_deltas;
    let restart_every = env("DELTA_BENCH_RESTART_EVERY", 0);
    let mut restarts = 0u64;
    let mut p = Publisher::new(cfg.clone(), 11);
    let mut store = Store::default();
    store.drive(&mut p, 0);
    let key = |i: u64| format!("key:{i:08}").into_bytes();
    let load_batch = |chunk: u64| {
        let ops: Vec<Op> = (chunk * 1_000..((chunk + 1) * 1_000).min(keys))
            .map(|i| Op::put(key(i), vec![(i % 251) as u8; 100]))
            .collect();
        batch::encode(&ops).unwrap()
    };
    // The next steady write: its key and value, and its batch.
    let steady_write = |rng: &mut u64| {
        *rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // 100 bytes that do not compress (the heads' tail copies carry them).
        let mut value = [0u8; 100];
        let mut x = *rng;
        for chunk in value.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let id = (*rng >> 11) % keys;
        let payload = batch::encode(&[Op::put(key(id), value.to_vec())]).unwrap();
        (id, value, payload)
    };
    const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut lsn = 0u64;
    let mut now = 1u64;
    for chunk in 0..keys.div_ceil(1_000) {
        lsn += 1;
        p.push(lsn, &load_batch(chunk), now).unwrap();
        now += 1;
        store.drive(&mut p, now);
    }
    let load_end = lsn;
    // Every key's value now, to check the cold reads.
    let mut values: Vec<[u8; 100]> = (0..keys).map(|i| [(i % 251) as u8; 100]).collect();
    let before = store.uploaded.clone();
    let (puts_before, tail_before) = (store.head_puts, store.head_tail_bytes);
    let parts_before = store.head_parts.clone();
    let mut wal = 0u64;
    let mut rng = SEED;
    let mut worst = Cold::default();
    let mut samples = 0;
    let (mut full_now, mut full_deltas) = (0u64, 0u64);
    for i in 0..steady {
        let (id, value, payload) = steady_write(&mut rng);
        values[id as usize] = value;
        wal += payload.len() as u64;
        lsn += 1;
        p.push(lsn, &payload, now).unwrap();
        // 1,000 batches a second: one a millisecond.
        now += 1;
        store.drive(&mut p, now);
        if restart_every > 0 && i % restart_every == restart_every - 1 {
            // A new process: it claims the dataset (reading the pages it
            // asks for), replays the WAL into its state, and goes on.
            for t in 0..2_000 {
                store.drive(&mut p, now + t);
            }
            now += 2_000;
            p = Publisher::new(cfg.clone(), 11 + restarts + 1);
            store.drive(&mut p, now);
            let mut replay = SEED;
            for l in 1..=lsn {
                let payload = match l <= load_end {
                    true => load_batch(l - 1),
                    false => steady_write(&mut replay).2,
                };
                while !p.has_room() {
                    now += 1;
                    store.drive(&mut p, now);
                }
                p.push(l, &payload, now).unwrap();
            }
            store.drive(&mut p, now);
            restarts += 1;
        }
        if i % sample_every == sample_every - 1 {
            // Segments older than the chain's end are not read any more.
            let h = store.head();
            if h.snapshot.is_none() {
                println!("at LSN {lsn}: no snapshot yet (a cold replica replays every segment)");
                continue;
            }
            // (Pointer deltas name records in them.)
            if let Some(end) = h.delta_lsn().filter(|_| !cfg_pointers) {
                // (By the last LSN in the key: those the head lists in
                // pages, past the inline ones, stay too.)
                let last_lsn = |k: &str| {
                    k.strip_suffix(".wseg")
                        .and_then(|k| k.rsplit('-').next())
                        .and_then(|n| n.parse::<u64>().ok())
                };
                store.objects.retain(|k, _| {
                    object_kind(k) != Some("segment") || last_lsn(k).is_some_and(|l| l > end)
                });
            }
            let (snap, segs, deltas, tail) = full_cold_bytes(&store, &h);
            full_now += snap + segs;
            full_deltas += snap + deltas + tail;
            println!(
                "  full cold start: snapshot {snap} + segments after it {segs} = {} bytes; over deltas: snapshot + deltas {deltas} + segments after the chain {tail} = {} bytes ({:.2}x)",
                snap + segs,
                snap + deltas + tail,
                (snap + segs) as f64 / (snap + deltas + tail).max(1) as f64
            );
            if std::env::var_os("DELTA_TRACE").is_some() {
                let raw = &store.objects[HEAD_KEY].0;
                let v: serde_json::Value =
                    serde_json::from_slice(&walcast_core::catalog::head_json(raw).unwrap())
                        .unwrap();
                let parts: Vec<String> = v
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, x)| format!("{k}={}", serde_json::to_vec(x).unwrap().len()))
                    .collect();
                eprintln!("head {} bytes stored: {}", raw.len(), parts.join(" "));
                if let Some(path) = std::env::var_os("DELTA_DUMP_HEAD") {
                    std::fs::write(path, raw).unwrap();
                }
            }
            let id = (rng >> 17) % keys;
            let (v, _, c) = cold_read(&store, &key(id));
            assert_eq!(v.as_deref(), Some(&values[id as usize][..]), "key {id}");
            samples += 1;
            worst = Cold {
                rounds: worst.rounds.max(c.rounds),
                gets: worst.gets.max(c.gets),
                bytes: worst.bytes.max(c.bytes),
                segments: worst.segments.max(c.segments),
            };
            println!(
                "at LSN {lsn}: chain {} deltas over the snapshot at {:?}; cold read {c:?}",
                h.deltas.len(),
                h.snapshot.as_ref().map(|s| s.lsn)
            );
        }
    }
    for t in 0..2_000 {
        store.drive(&mut p, now + t);
    }
    let after = &store.uploaded;
    let grown = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);
    let (segs, snaps, deltas) = (grown("segment"), grown("snapshot"), grown("delta"));
    let (pages, heads) = (grown("page"), grown("head"));
    println!(
        "{keys} keys loaded in {load_end} batches, then {steady} steady batches ({wal} WAL bytes); {restarts} restarts"
    );
    println!(
        "uploaded during steady writes: segments {segs}, snapshots {snaps}, deltas {deltas}, pages {pages}, heads {heads}"
    );
    println!(
        "write amplification (segments + snapshots + deltas) / WAL = {:.2} (snapshots {:.2}, deltas {:.2}); with heads and pages {:.2}",
        (segs + snaps + deltas) as f64 / wal as f64,
        snaps as f64 / wal as f64,
        deltas as f64 / wal as f64,
        (segs + snaps + deltas + pages + heads) as f64 / wal as f64,
    );
    let puts = store.head_puts - puts_before;
    let tails = store.head_tail_bytes - tail_before;
    let parts: Vec<String> = store
        .head_parts
        .iter()
        .map(|(k, v)| {
            let d = v - parts_before.get(k).copied().unwrap_or(0);
            format!("{k} {:.2}", d as f64 / wal as f64)
        })
        .collect();
    let json = store.head_parts.values().sum::<u64>() - parts_before.values().sum::<u64>();
    let each = |n: u64| n as f64 / puts.max(1) as f64;
    println!(
        "heads: {puts} PUTs, {:.0} bytes each stored, of {:.0} bytes of JSON: {:.0} of tail copies (base64), {:.0} of catalog",
        each(heads),
        each(json),
        each(tails),
        each(json.saturating_sub(tails))
    );
    println!(
        "heads per WAL byte: {:.2} stored, {:.2} of JSON",
        heads as f64 / wal as f64,
        json as f64 / wal as f64,
    );
    println!("heads' JSON by part, per WAL byte: {}", parts.join(", "));
    println!("worst cold point read over {samples} samples: {worst:?}");
    println!(
        "full cold start, mean over the samples: {:.1} MB replaying segments after the snapshot, {:.1} MB over the delta chain ({:.2}x fewer)",
        full_now as f64 / samples.max(1) as f64 / 1e6,
        full_deltas as f64 / samples.max(1) as f64 / 1e6,
        full_now as f64 / full_deltas.max(1) as f64
    );
}
