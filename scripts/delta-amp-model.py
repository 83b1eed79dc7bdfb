#!/usr/bin/env python3
"""A model of the delta chain's uploads under uniform random writes.

Counts entries, not bytes (a delta entry and a WAL record of a single
100-byte put are within a few percent of each other): a dataset of KEYS
keys, single-key batches to uniformly random keys, a delta every EVERY
batches chosen by the publisher's rule (publisher/snapshot.rs
`maybe_delta`: absorb the newer deltas while the next older one holds at
most FACTOR times the merged keys (2 here; the publisher uses 1.5 since
2026-12-06), and always enough to keep at most K
deltas), a base snapshot (KEYS entries) every SNAP batches. Prints the
deltas' and snapshots' entries written per batch: their share of the write
amplification in steady state, the segments and heads not included.

    python3 scripts/delta-amp-model.py            # the table in docs/BENCHMARKS.md
    python3 scripts/delta-amp-model.py factors    # other merge ratios
    python3 scripts/delta-amp-model.py periodic   # fixed merge periods per level
    python3 scripts/delta-amp-model.py pointers   # deltas of pointers, not values
    python3 scripts/delta-amp-model.py pointers 30  # ... with 30-byte slots

`pointers` weighs the same counts in bytes for a chain whose deltas hold
no values: each entry a fixed-size slot of a hash table (a key fingerprint
and the position of the key's newest record in a segment, SLOT bytes with
the table's free slots; 27 unless given: a slot that names its record by
LSN, offset and length; one that also names the segment object itself, as
a cold read must without the catalog's pages, takes about 30: a 6-byte
fingerprint, the segment's first LSN and length in LSNs, the epoch, the
record's offset and length, in 4 KiB pages each with its checksum, three
quarters full), base snapshots of SNAPSHOT_ENTRY bytes a key, WAL
records of RECORD bytes; it adds the segments (1.15x) and, at one commit a
second, the heads' catalog (0.13x) measured by tests/deltas/figures.rs, and the key
filters of the segments past the chain (16 bits a key, half of them in an
average head), and prints the total.

`periodic` searches schedules in which the chain's first, second and third
deltas are rewritten every T1, T2 and T3 deltas (each dividing the one
before), with the expected number of distinct keys m random writes touch,
KEYS * (1 - exp(-m / KEYS)), instead of a simulation.
"""
import math
import random
import sys

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


def periodic():
    def touched(m):
        return KEYS * (1 - math.exp(-m / KEYS))

    found = []
    for every in [2000, 4000, 8000, 12000]:
        for snap in [300_000, 600_000, 900_000, 1_200_000, 1_800_000, 2_400_000, 3_600_000]:
            flushes = snap // every

            def divisors(n):
                return [d for d in range(1, n + 1) if n % d == 0]

            for t1 in divisors(flushes):
                for t2 in divisors(t1):
                    for t3 in divisors(t2):
                        cost = KEYS
                        for f in range(1, flushes):
                            if f % t1 == 0:
                                base = 0
                            elif f % t2 == 0:
                                base = f - f % t1
                            elif f % t3 == 0:
                                base = f - f % t2
                            else:
                                base = f - f % t3
                            cost += touched((f - base) * every)
                        found.append((cost / snap, every, snap, t1, t2, t3))
    for every in [2000, 4000, 8000, 12000]:
        amp, _, snap, t1, t2, t3 = min(f for f in found if f[1] == every)
        print(f"delta every {every:,}: best {amp:.2f}x (snapshot every {snap:,}, periods {t1}, {t2}, {t3})")


SLOT = 27.0  # 8-byte fingerprint, 8-byte LSN, 4-byte offset, 4-byte length, 75% full
RECORD = 117.0  # WAL bytes of one single-put batch (12-byte key, 100-byte value)
SNAPSHOT_ENTRY = 105.0  # a block-indexed snapshot's bytes a key, measured


def pointers(slot=None):
    slot = SLOT if slot is None else slot
    print(f"slot: {slot:g} bytes a key")
    print("| delta every | snapshot every | deltas (entries) | deltas (bytes) | snapshots | segment filters | total |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for every in [6000, 12000, 24000]:
        for snap in [1_200_000, 2_400_000, 4_800_000]:
            d, s = model(every, snap, batches=2 * snap)
            filters = every / 1000 / 2 * (1000 * 2 + 150) / (1000 * RECORD)
            dp, sp = d * slot / RECORD, s * SNAPSHOT_ENTRY / RECORD
            total = 1.15 + 0.13 + filters + dp + sp
            print(f"| {every:,} | {snap:,} | {d:.2f}x | {dp:.2f}x | {sp:.2f}x | {filters:.2f}x | {total:.2f}x |", flush=True)


def factors():
    for every in [2000, 8000]:
        for factor in [0.5, 1, 1.5, 2, 4, 8]:
            for snap in [600_000, 1_200_000, 2_400_000]:
                d, s = model(every, snap, factor=factor)
                print(f"every {every:,} factor {factor} snapshot every {snap:,}: {d + s:.2f}x", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["periodic"]:
        periodic()
        sys.exit()
    if sys.argv[1:2] == ["pointers"]:
        pointers(float(sys.argv[2]) if len(sys.argv) > 2 else None)
        sys.exit()
    if sys.argv[1:] == ["factors"]:
        factors()
        sys.exit()
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
