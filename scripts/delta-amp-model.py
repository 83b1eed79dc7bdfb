#!/usr/bin/env python3
"""A model of the delta chain's uploads under uniform random writes.

Counts entries, not bytes (a delta entry and a WAL record of a single
100-byte put are within a few percent of each other): a dataset of KEYS
keys, single-key batches to uniformly random keys, a delta every EVERY
batches chosen by the publisher's rule (publisher/snapshot.rs
`maybe_delta`: absorb the newer deltas while the next older one holds at
most FACTOR times the merged keys, and always enough to keep at most K
deltas), a base snapshot (KEYS entries) every SNAP batches. Prints the
deltas' and snapshots' entries written per batch: their share of the write
amplification in steady state, the segments and heads not included.

    python3 scripts/delta-amp-model.py            # the table in docs/BENCHMARKS.md
"""
import random

KEYS = 1_000_000


def model(every, snap, k=4, factor=2.0, batches=2_400_000, seed=1):
    rnd = random.Random(seed)
    flushes = batches // every
    # count[i]: keys whose newest write fell in flush interval i (0: the base)
    count = [0] * (flushes + 2)
    count[0] = KEYS
    last = [0] * KEYS
    chain = []  # (base interval, end interval, entries)
    snap_at = 0
    deltas = snaps = 0
    for f in range(1, flushes + 1):
        for _ in range(every):
            key = rnd.randrange(KEYS)
            count[last[key]] -= 1
            last[key] = f
            count[f] += 1

        def changed_after(i):
            return sum(count[i + 1 : f + 1])

        if (f * every) % snap == 0:
            snaps += KEYS
            chain, snap_at = [], f
            continue
        keep = len(chain)
        n = changed_after(chain[-1][1] if chain else snap_at)
        while keep > 0:
            older = chain[keep - 1]
            if keep + 1 > k or older[2] <= factor * n:
                keep -= 1
                n = changed_after(older[0])
            else:
                break
        base = chain[keep - 1][1] if keep else snap_at
        chain = chain[:keep] + [(base, f, n)]
        deltas += n
    total = flushes * every
    return deltas / total, snaps / total


if __name__ == "__main__":
    print("| delta every | chain | snapshot every | deltas | snapshots | both |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for every, k, snap in [
        (2000, 4, 1_200_000),
        (2000, 4, 600_000),
        (2000, 4, 2_400_000),
        (4000, 4, 1_200_000),
        (8000, 4, 1_200_000),
        (2000, 6, 1_200_000),
        (8000, 6, 1_200_000),
    ]:
        d, s = model(every, snap, k)
        print(f"| {every:,} | {k} | {snap:,} | {d:.2f}x | {s:.2f}x | {d + s:.2f}x |", flush=True)
