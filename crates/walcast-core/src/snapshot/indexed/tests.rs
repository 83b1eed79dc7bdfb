use super::lazy::MIN_BLOCK_CHARGE;
use super::*;
use proptest::prelude::*;

fn state(n: u32, vlen: usize) -> KvState {
    let mut s = KvState::new();
    for i in 0..n {
        s.put(
            format!("user:{:08}", i * 7).as_bytes(),
            &vec![(i % 251) as u8; vlen + (i as usize % 5)],
        );
    }
    s
}

/// Drives a point read to its end against the file's bytes; returns the
/// value and the GETs it took.
fn read(
    lazy: &mut LazySnapshot,
    file: &[u8],
    key: &[u8],
) -> Result<(Option<Vec<u8>>, u32), DecodeError> {
    let mut gets = 0;
    loop {
        match lazy.get(key)? {
            Lookup::Done(v) => return Ok((v, gets)),
            Lookup::Need(Need::Suffix(n)) => {
                gets += 1;
                let n = n.min(file.len() as u64) as usize;
                lazy.feed_suffix(&file[file.len() - n..])?;
            }
            Lookup::Need(Need::Range { start, end }) => {
                gets += 1;
                assert!(gets < 10, "a point read loops");
                let s = (start as usize).min(file.len());
                let e = (end as usize).min(file.len());
                lazy.feed_range(start, &file[s..e], key)?;
            }
        }
    }
}

#[test]
fn point_reads_on_one_and_two_levels() {
    for (n, opts) in [
        (0, IndexedOptions::default()),
        (1, IndexedOptions::default()),
        (5_000, IndexedOptions::default()),
        (
            5_000,
            IndexedOptions {
                block_bytes: 512,
                index_block_bytes: 256,
            },
        ),
    ] {
        let s = state(n, 20);
        let file = encode_indexed(&s, 9, 1, DatasetId([3; 16]), opts);
        let (h, back) = decode_indexed(&file, Some(crate::crc::hash(&file))).unwrap();
        assert_eq!(h.lsn, 9);
        assert_eq!(back.len(), s.len());
        assert!(back.iter().zip(s.iter()).all(|(a, b)| a == b));
        let mut lazy = LazySnapshot::new(file.len() as u64, 1 << 20);
        for i in [0u32, 1, 2, n / 2, n.saturating_sub(1), n] {
            let key = format!("user:{:08}", i * 7);
            let (got, gets) = read(&mut lazy, &file, key.as_bytes()).unwrap();
            assert_eq!(got.as_deref(), s.get(key.as_bytes()), "key {key}");
            assert!(gets <= 3, "{gets} GETs");
            let miss = format!("user:{:08}", i * 7 + 1);
            assert_eq!(read(&mut lazy, &file, miss.as_bytes()).unwrap().0, None);
        }
        if n == 5_000 && opts.index_block_bytes == 256 {
            assert_eq!(lazy.footer().unwrap().levels, 2);
        }
    }
}

/// Version 4: whole and lazy reads, bound to the index digest.
#[test]
fn version_4_reads_like_version_2_and_binds_to_its_index_digest() {
    for (n, opts) in [
        (0, IndexedOptions::default()),
        (3_000, IndexedOptions::default()),
        (
            3_000,
            IndexedOptions {
                block_bytes: 512,
                index_block_bytes: 256,
            },
        ),
    ] {
        let s = state(n, 20);
        let file = encode_verified(&s, 9, 1, DatasetId([3; 16]), opts);
        assert!(is_verified(&file) && is_indexed(&file));
        let (h, back) = decode_indexed(&file, Some(crate::crc::hash(&file))).unwrap();
        assert_eq!(h.entry_count, s.len());
        assert!(back.iter().eq(s.iter()));
        let digest = index_digest(&file).unwrap();
        let mut lazy = LazySnapshot::with_index_digest(file.len() as u64, 1 << 20, digest);
        for i in [0u32, 1, n / 2, n.saturating_sub(1), n] {
            let key = format!("user:{:08}", i * 7);
            let (got, gets) = read(&mut lazy, &file, key.as_bytes()).unwrap();
            assert_eq!(got.as_deref(), s.get(key.as_bytes()), "key {key}");
            assert!(gets <= 3, "{gets} GETs");
        }
        assert!(lazy.footer().unwrap().has_digests());
        // Another digest: nothing is read.
        let mut wrong = digest;
        wrong[0] ^= 1;
        let mut lazy = LazySnapshot::with_index_digest(file.len() as u64, 1 << 20, wrong);
        let err = read(&mut lazy, &file, b"user:00000000").unwrap_err();
        assert!(matches!(err, DecodeError::Digest { .. }), "{err}");
        assert_eq!(crate::Error::from(err).kind(), crate::ErrorKind::Untrusted);
    }
    // A version 2 file cannot be bound to a digest.
    let v2 = encode_indexed(&state(10, 5), 1, 1, DatasetId([1; 16]), Default::default());
    assert_eq!(index_digest(&v2), None);
    let mut lazy = LazySnapshot::with_index_digest(v2.len() as u64, 1 << 20, [0; 32]);
    let err = read(&mut lazy, &v2, b"user:00000000").unwrap_err();
    assert!(matches!(err, DecodeError::Digest { .. }), "{err}");
}

/// Changes the 4 bytes at `fix..fix + 4` of `msg` so that its CRC-32
/// becomes `want` (CRC-32 is affine in its input, so the 32 bits solve a
/// linear system over GF(2)).
fn force_crc(msg: &mut [u8], fix: usize, want: u32) {
    let base = crate::crc::hash(msg);
    // Column i: how flipping bit i of the window changes the CRC.
    let mut cols: Vec<(u32, u32)> = (0..32)
        .map(|i| {
            let mut m = msg.to_vec();
            m[fix + i / 8] ^= 1 << (i % 8);
            (crate::crc::hash(&m) ^ base, 1u32 << i)
        })
        .collect();
    // Gaussian elimination: reduce `target` with the columns.
    let mut target = base ^ want;
    let mut pick = 0u32;
    for bit in 0..32 {
        let Some(p) = (0..cols.len()).find(|&j| cols[j].0 >> bit & 1 == 1) else {
            continue;
        };
        let pivot = cols.swap_remove(p);
        for c in cols.iter_mut() {
            if c.0 >> bit & 1 == 1 {
                c.0 ^= pivot.0;
                c.1 ^= pivot.1;
            }
        }
        if target >> bit & 1 == 1 {
            target ^= pivot.0;
            pick ^= pivot.1;
        }
    }
    assert_eq!(target, 0, "the window cannot reach the CRC");
    for i in 0..32 {
        if pick >> i & 1 == 1 {
            msg[fix + i / 8] ^= 1 << (i % 8);
        }
    }
    assert_eq!(crate::crc::hash(msg), want);
}

#[test]
fn a_forged_block_with_a_valid_crc_is_untrusted() {
    let mut s = state(2_000, 20);
    s.put(b"user:target", &[0xAA; 64]);
    let opts = IndexedOptions {
        block_bytes: 1024,
        index_block_bytes: 512,
    };
    let file = encode_verified(&s, 1, 1, DatasetId([2; 16]), opts);
    let digest = index_digest(&file).unwrap();
    // The data block holding the target value, found by the value.
    let at = file.windows(64).position(|w| w == [0xAA; 64]).unwrap();
    let mut lazy = LazySnapshot::new(file.len() as u64, 1 << 20);
    read(&mut lazy, &file, b"user:target").unwrap();
    let (h, _, _, _) = lazy.locate(b"user:target").unwrap().unwrap().unwrap();
    assert!(h.offset < at as u64 && (at as u64) < h.end());
    // Change the value and force the block's CRC back to what the
    // index states: a CRC-32 check alone would accept the block.
    let (lo, hi) = (h.offset as usize, h.end() as usize);
    let mut msg: Vec<u8> = file[lo..lo + 8].to_vec();
    msg.extend_from_slice(&file[lo + 12..hi]);
    let v = at - lo - 4; // the value's offset in `msg`
    msg[v] = 0xBB;
    force_crc(&mut msg, v + 8, h.crc);
    let mut forged = file.clone();
    forged[lo..lo + 8].copy_from_slice(&msg[..8]);
    forged[lo + 12..hi].copy_from_slice(&msg[8..]);
    assert_ne!(forged, file);
    // An unbound reader trusting CRC-32 alone would answer the forged
    // value; version 4's digests refuse it, bound or not.
    let mut lazy = LazySnapshot::with_index_digest(forged.len() as u64, 1 << 20, digest);
    let err = read(&mut lazy, &forged, b"user:target").unwrap_err();
    assert_eq!(
        err,
        DecodeError::Digest {
            what: "snapshot data block",
            at: h.offset
        }
    );
    // The reader keeps answering from the blocks it verified.
    let key = b"user:00000007";
    assert_eq!(
        read(&mut lazy, &forged, key).unwrap().0.as_deref(),
        s.get(key)
    );
    let err = decode_indexed(&forged, None).unwrap_err();
    assert!(matches!(err, DecodeError::Digest { .. }), "{err}");
}

/// A block-indexed snapshot decoded whole keeps no more after its data
/// blocks than their index and a footer take, whatever size was claimed:
/// junk past them (a size a hostile head claimed) fails as it arrives,
/// not at the end; real snapshots of every shape still decode.
#[test]
fn the_bytes_after_the_data_blocks_are_bounded_by_their_index() {
    for (n, vlen) in [(0, 0), (1, 10), (20_000, 50), (3_000, 2_000)] {
        let s = state(n, vlen);
        for opts in [
            IndexedOptions::default(),
            IndexedOptions {
                block_bytes: 1024,
                index_block_bytes: 512,
            },
        ] {
            let file = encode_indexed(&s, 1, 1, DatasetId([1; 16]), opts);
            let mut d = crate::snapshot::SnapshotDecoder::new();
            for c in file.chunks(7_777) {
                d.feed(c).unwrap();
            }
            assert_eq!(d.finish(None).unwrap().1.len(), s.len());
        }
    }
    let empty = encode_indexed(
        &state(0, 0),
        1,
        1,
        DatasetId([1; 16]),
        IndexedOptions::default(),
    );
    let mut d = crate::snapshot::SnapshotDecoder::new();
    d.feed(&empty[..HEADER_LEN as usize]).unwrap();
    let junk = vec![0u8; 1 << 20];
    let mut fed = 0;
    let err = loop {
        match d.feed(&junk) {
            Ok(()) => fed += junk.len(),
            Err(e) => break e,
        }
        assert!(fed < 64 << 20, "64 MiB of junk kept");
    };
    assert!(fed < 1 << 20, "{fed} bytes kept: {err}");
    assert!(err.to_string().contains("snapshot index"), "{err}");
}

#[test]
fn the_cache_stays_within_its_bytes() {
    let s = state(20_000, 50);
    let opts = IndexedOptions {
        block_bytes: 4096,
        index_block_bytes: 4096,
    };
    let file = encode_indexed(&s, 1, 1, DatasetId([1; 16]), opts);
    let mut lazy = LazySnapshot::new(file.len() as u64, 32 << 10);
    for i in (0..20_000).step_by(97) {
        let key = format!("user:{:08}", i * 7);
        assert_eq!(
            read(&mut lazy, &file, key.as_bytes()).unwrap().0.as_deref(),
            s.get(key.as_bytes())
        );
        assert!(lazy.cached_bytes() <= 32 << 10);
    }
}

/// Blocks fetched and never used (a scan's read-ahead past where it
/// stopped, reads given up) stay fresh only up to `fresh_max`: past it the
/// oldest ages into an ordinary block, so they do not push out a block in
/// use however many arrive.
#[test]
fn blocks_never_used_do_not_push_out_the_blocks_in_use() {
    let s = state(20_000, 50);
    let opts = IndexedOptions {
        block_bytes: 1024,
        index_block_bytes: 1 << 20,
    };
    let file = encode_indexed(&s, 1, 1, DatasetId([1; 16]), opts);
    // Room for about 16 blocks; at most 4 fresh.
    let mut lazy = LazySnapshot::new(file.len() as u64, 16 << 10);
    lazy.set_cache(16 << 10, 4);
    let hot = b"user:00000000".to_vec();
    read(&mut lazy, &file, &hot).unwrap();
    let fetches_before = lazy.fetched_blocks;
    for i in (100..20_000).step_by(100) {
        // A block fetched for a read that never runs: fed, not used.
        let key = format!("user:{:08}", i * 7);
        if let Lookup::Need(Need::Range { start, end }) = lazy.get(key.as_bytes()).unwrap() {
            lazy.feed_range(start, &file[start as usize..end as usize], key.as_bytes())
                .unwrap();
        }
        let fresh = lazy
            .blocks
            .iter()
            .filter(|(_, (_, u))| u & super::lazy::FRESH != 0)
            .count();
        assert!(fresh <= 4, "{fresh} blocks never used are kept");
        // The block in use stays: answered without a fetch.
        let before = lazy.fetched_blocks;
        assert!(matches!(lazy.get(&hot).unwrap(), Lookup::Done(Some(_))));
        assert_eq!(lazy.fetched_blocks, before);
    }
    assert!(lazy.fetched_blocks - fetches_before > 100);
    assert!(
        lazy.cached_bytes() <= (16 << 10) + 4 * 2048,
        "{}",
        lazy.cached_bytes()
    );
}

#[test]
fn blocks_count_against_the_cache_by_what_they_hold_decoded() {
    // Keys sharing a long prefix: a block holds far more decoded than
    // it took on the wire.
    let prefix = "p".repeat(900);
    let mut s = KvState::new();
    for i in 0..4_000u32 {
        s.put(format!("{prefix}{i:08}").as_bytes(), b"v");
    }
    let file = encode_indexed(&s, 1, 1, DatasetId([1; 16]), IndexedOptions::default());
    // About four blocks' worth decoded (the file holds 3.6 MB decoded).
    let cache = 1 << 20;
    let mut lazy = LazySnapshot::new(file.len() as u64, cache);
    let mut rng = 3u64;
    let (mut wire, mut held) = (0, 0);
    for _ in 0..500 {
        let i = crate::rng::splitmix64(&mut rng) % 4_000;
        let key = format!("{prefix}{i:08}");
        let (v, _) = read(&mut lazy, &file, key.as_bytes()).unwrap();
        assert_eq!(v.as_deref(), Some(&b"v"[..]));
        let blocks = lazy.blocks.iter().map(|(_, (b, _))| b);
        (wire, held) = blocks.fold((0, 0), |(w, h), b| (w + b.wire_len(), h + b.heap_bytes()));
        assert!(
            held <= cache,
            "{held} bytes held decoded for a cache of {cache}"
        );
    }
    assert!(
        held > 8 * wire,
        "the blocks held {held} decoded from {wire} on the wire"
    );
}

/// 60,000 keys in 1 KiB blocks under 512-byte index partitions: a
/// two-level index of many partitions.
fn many_partitions() -> (u32, KvState, Vec<u8>) {
    let n = 60_000;
    let s = state(n, 50);
    let opts = IndexedOptions {
        block_bytes: 1024,
        index_block_bytes: 512,
    };
    let file = encode_indexed(&s, 1, 1, DatasetId([1; 16]), opts);
    (n, s, file)
}

#[test]
fn a_block_whose_partition_another_read_evicted_is_asked_for_again() {
    let (n, s, file) = many_partitions();
    // A cache so small that only the two blocks used last stay.
    let mut lazy = LazySnapshot::new(file.len() as u64, 1);
    let (a, b) = (
        b"user:00000007".to_vec(),
        format!("user:{:08}", (n - 1) * 7),
    );
    let range = |lazy: &mut LazySnapshot, key: &[u8]| match lazy.get(key).unwrap() {
        Lookup::Need(Need::Range { start, end }) => (start, end),
        Lookup::Need(Need::Suffix(n)) => {
            let n = n as usize;
            lazy.feed_suffix(&file[file.len() - n..]).unwrap();
            match lazy.get(key).unwrap() {
                Lookup::Need(Need::Range { start, end }) => (start, end),
                other => panic!("{other:?}"),
            }
        }
        other => panic!("{other:?}"),
    };
    let bytes = |(start, end): (u64, u64)| &file[start as usize..end as usize];
    // Read A fetches its partition and asks for its data block...
    let pa = range(&mut lazy, &a);
    lazy.feed_range(pa.0, bytes(pa), &a).unwrap();
    let da = range(&mut lazy, &a);
    assert_ne!(da, pa);
    // ...while read B fetches its partition and block, evicting A's
    // partition.
    let pb = range(&mut lazy, b.as_bytes());
    lazy.feed_range(pb.0, bytes(pb), b.as_bytes()).unwrap();
    let db = range(&mut lazy, b.as_bytes());
    lazy.feed_range(db.0, bytes(db), b.as_bytes()).unwrap();
    assert_eq!(lazy.blocks.len(), 2);
    // A's block arrives: not an error; A asks again and answers.
    lazy.feed_range(da.0, bytes(da), &a).unwrap();
    let (v, gets) = read(&mut lazy, &file, &a).unwrap();
    assert_eq!(v.as_deref(), s.get(&a));
    assert_eq!(gets, 2, "the partition and the block again");
    assert_eq!(
        read(&mut lazy, &file, b.as_bytes()).unwrap().0.as_deref(),
        s.get(b.as_bytes())
    );
}

#[test]
fn index_partitions_share_the_cache_bound() {
    // Many small partitions: random reads over the whole key space
    // would, kept forever, hold every one of them.
    let (n, s, file) = many_partitions();
    let cache = 16 << 10;
    let mut lazy = LazySnapshot::new(file.len() as u64, cache);
    let mut rng = 7u64;
    let mut partitions = std::collections::HashSet::new();
    for round in 0..3_000 {
        let i = crate::rng::splitmix64(&mut rng) % n as u64;
        let key = format!("user:{:08}", i * 7);
        let (v, gets) = read(&mut lazy, &file, key.as_bytes()).unwrap();
        assert_eq!(v.as_deref(), s.get(key.as_bytes()));
        assert!(
            round == 0 || gets <= 2,
            "{gets} GETs for one key with the top held"
        );
        assert_eq!(lazy.footer.unwrap().levels, 2);
        let (_, _, _, p) = lazy.locate(key.as_bytes()).unwrap().unwrap().unwrap();
        partitions.insert(p.unwrap());
        assert_eq!(lazy.index.len(), 1, "only the top index is kept apart");
        assert!(lazy.cached_bytes() <= cache, "{}", lazy.cached_bytes());
    }
    assert!(
        partitions.len() as u64 * MIN_BLOCK_CHARGE > 4 * cache,
        "{} partitions read",
        partitions.len()
    );
    // A scan across all partitions finishes within the same bound.
    let mut cursor = ScanCursor::new(b"", None, usize::MAX);
    let (mut out, mut needs) = (Vec::new(), 0);
    while let Some(need) = lazy.scan_step(&mut cursor, &mut out).unwrap() {
        needs += 1;
        match need {
            Need::Suffix(_) => unreachable!("the footer is held"),
            Need::Range { start, end } => {
                lazy.feed_range(start, &file[start as usize..end as usize], &cursor.next)
            }
        }
        .unwrap();
        assert!(lazy.cached_bytes() <= cache);
    }
    assert_eq!(out.len(), n as usize);
    assert!(
        needs < 3 * (file.len() / 1024),
        "{needs} fetches for one scan"
    );
}

type Entries = Vec<(Vec<u8>, Vec<u8>)>;

fn scan_all(
    lazy: &mut LazySnapshot,
    file: &[u8],
    cur: &mut ScanCursor,
) -> Result<(Entries, u32), DecodeError> {
    let mut out = Vec::new();
    let mut gets = 0;
    while let Some(need) = lazy.scan_step(cur, &mut out)? {
        gets += 1;
        assert!(gets < 10_000, "a scan loops");
        match need {
            Need::Suffix(n) => {
                let n = n.min(file.len() as u64) as usize;
                lazy.feed_suffix(&file[file.len() - n..])?;
            }
            Need::Range { start, end } => {
                let s = (start as usize).min(file.len());
                let e = (end as usize).min(file.len());
                lazy.feed_range(start, &file[s..e], &cur.next.clone())?;
            }
        }
    }
    Ok((out, gets))
}

proptest! {
    /// Ordered scans over one or two index levels, with a cache smaller
    /// than the scan, equal a filter over the state.
    #[test]
    fn scans_match_the_state(n in 0u32..800, a in 0u32..6000, b in 0u32..6000, limit in 0usize..900, small in any::<bool>()) {
        let s = state(n, 6);
        let opts = if small {
            IndexedOptions { block_bytes: 128, index_block_bytes: 96 }
        } else {
            IndexedOptions::default()
        };
        let file = if small {
            encode_verified(&s, 1, 1, DatasetId([1; 16]), opts)
        } else {
            encode_indexed(&s, 1, 1, DatasetId([1; 16]), opts)
        };
        let start = format!("user:{a:08}").into_bytes();
        let end = (b % 3 != 0).then(|| format!("user:{b:08}").into_bytes());
        let mut lazy = LazySnapshot::new(file.len() as u64, 512);
        let mut cur = ScanCursor::new(&start, end.as_deref(), limit);
        let (got, _) = scan_all(&mut lazy, &file, &mut cur).unwrap();
        let want: Vec<_> = s
            .iter()
            .filter(|(k, _)| **k >= *start.as_slice() && end.as_ref().is_none_or(|e| **k < *e.as_slice()))
            .take(limit)
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        prop_assert_eq!(got, want);
        prop_assert!(cur.is_done() || cur.remaining == 0);
    }

    /// A flipped byte anywhere is either caught, or cannot change an
    /// answer (it lies in bytes the read never uses).
    #[test]
    fn a_damaged_file_never_answers_wrong(at in 0usize..100_000, bit in 0u8..8, k in 0u32..400, v4 in any::<bool>()) {
        let s = state(400, 8);
        let opts = IndexedOptions { block_bytes: 256, index_block_bytes: 128 };
        let good = if v4 {
            encode_verified(&s, 1, 1, DatasetId([1; 16]), opts)
        } else {
            encode_indexed(&s, 1, 1, DatasetId([1; 16]), opts)
        };
        let mut file = good.clone();
        let at = at % file.len();
        file[at] ^= 1 << bit;
        prop_assert!(decode_indexed(&file, None).is_err());
        let key = format!("user:{:08}", k * 7);
        let mut lazy = LazySnapshot::new(file.len() as u64, 1 << 20);
        if let Ok((v, _)) = read(&mut lazy, &file, key.as_bytes()) {
            prop_assert_eq!(v.as_deref(), s.get(key.as_bytes()));
        }
        if let Some(d) = index_digest(&good) {
            // Bound to the signed digest: any answer is the right one.
            let mut lazy = LazySnapshot::with_index_digest(file.len() as u64, 1 << 20, d);
            if let Ok((v, _)) = read(&mut lazy, &file, key.as_bytes()) {
                prop_assert_eq!(v.as_deref(), s.get(key.as_bytes()));
            }
        }
    }

    /// The streaming decoder reads version 2 fed in pieces of any size.
    #[test]
    fn streams_in_any_pieces(n in 0u32..600, piece in 1usize..5000, small in any::<bool>(), v4 in any::<bool>()) {
        let s = state(n, 10);
        let opts = if small {
            IndexedOptions { block_bytes: 200, index_block_bytes: 100 }
        } else {
            IndexedOptions::default()
        };
        let file = if v4 {
            encode_verified(&s, 4, 2, DatasetId([5; 16]), opts)
        } else {
            encode_indexed(&s, 4, 2, DatasetId([5; 16]), opts)
        };
        let mut d = crate::snapshot::SnapshotDecoder::new();
        for c in file.chunks(piece) {
            d.feed(c).unwrap();
        }
        let (h, back) = d.finish(Some(crate::crc::hash(&file))).unwrap();
        prop_assert_eq!(h.entry_count, s.len());
        prop_assert!(back.iter().eq(s.iter()));
    }

    /// Arbitrary bytes as a file: errors, never a panic or a loop.
    #[test]
    fn garbage_is_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..400), key in proptest::collection::vec(any::<u8>(), 0..8)) {
        let _ = decode_indexed(&bytes, None);
        let mut lazy = LazySnapshot::new(bytes.len() as u64, 1 << 20);
        let _ = read(&mut lazy, &bytes, &key);
    }
}

/// Values past what a block takes (32 MiB; a batch takes values of up to
/// 64 MiB less the 9 bytes of its framing for a 1-byte key): no unreadable
/// version 2; version 1, the writer's fallback, reads. Values up to the
/// block's bound beside small ones each get a block of their own, which
/// every reader takes (whole, streamed, lazily).
#[test]
fn values_past_what_a_block_takes_are_written_readably() {
    let mut s = KvState::new();
    s.put(b"a", b"xyz");
    s.put(b"b", &vec![7u8; (64 << 20) - 9]);
    s.put(b"c", b"small");
    let id = DatasetId([2; 16]);
    assert!(encode_readable(&s, 3, 1, id, IndexedOptions::default(), false).is_none());
    let v1 = crate::snapshot::encode(&s, 3, 1, id);
    let (_, back) = crate::snapshot::decode(&v1, None).unwrap();
    assert!(back.iter().eq(s.iter()));
    let mut s = KvState::new();
    s.put(b"a", b"xyz");
    s.put(b"b", &vec![7u8; (32 << 20) - 64]);
    s.put(b"c", b"small");
    s.put(b"d", &vec![9u8; (32 << 20) - 64]);
    s.put(b"e", b"last");
    let file = encode_readable(&s, 3, 1, id, IndexedOptions::default(), false).expect("readable");
    let (_, back) = decode_indexed(&file, Some(crate::crc::hash(&file))).unwrap();
    assert!(back.iter().eq(s.iter()));
    let (_, streamed) = crate::snapshot::decode(&file, None).unwrap();
    assert!(streamed.iter().eq(s.iter()));
    let mut lazy = LazySnapshot::new(file.len() as u64, 1 << 20);
    for k in [&b"a"[..], b"b", b"c", b"d", b"e"] {
        assert_eq!(
            read(&mut lazy, &file, k).unwrap().0.as_deref(),
            s.get(k),
            "{k:?}"
        );
    }
}

/// Keys of 64 KiB that share nothing, more of them than the top index
/// block (which nothing closes early) can hold: no unreadable version 2;
/// version 1 (the writer's fallback) reads.
#[test]
fn a_top_index_longer_than_readers_take_is_not_written() {
    let mut s = KvState::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..1_100u32 {
        let mut k = vec![0u8; 64 << 10];
        k[..4].copy_from_slice(&i.to_be_bytes());
        for b in &mut k[4..] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        s.put(&k, b"v");
    }
    let opts = IndexedOptions::default();
    assert!(encode_readable(&s, 3, 1, DatasetId([2; 16]), opts, false).is_none());
    let v1 = crate::snapshot::encode(&s, 3, 1, DatasetId([2; 16]));
    assert_eq!(crate::snapshot::decode(&v1, None).unwrap().1.len(), 1_100);
}

/// A file whose checksums all hold but whose first data block holds a key
/// past the second block's first key: a lazy scan returns what each
/// block's index range holds, in order, as point reads find it (the key
/// out of place is absent to both), not the block's every entry.
#[test]
fn a_lazy_scan_returns_only_what_each_blocks_index_range_holds() {
    use crate::catalog::DatasetId;
    use crate::snapshot::block::{BlockBuilder, BlockHandle};
    let empty = encode_indexed(
        &KvState::new(),
        1,
        1,
        DatasetId::from_seed(1),
        IndexedOptions::default(),
    );
    let mut file = empty[..crate::snapshot::HEADER_LEN as usize].to_vec();
    let block = |entries: &[(&[u8], &[u8])], file: &mut Vec<u8>| {
        let mut b = BlockBuilder::new();
        for (k, v) in entries {
            b.push(k, v);
        }
        let (bytes, crc) = b.finish();
        let h = BlockHandle {
            offset: file.len() as u64,
            len: bytes.len() as u32,
            crc,
        };
        file.extend_from_slice(&bytes);
        h
    };
    let h0 = block(&[(b"a", b"1"), (b"z", b"2")], &mut file);
    let h1 = block(&[(b"m", b"3"), (b"n", b"4")], &mut file);
    let index_offset = file.len() as u64;
    let top = block(&[(b"a", &h0.encode()), (b"m", &h1.encode())], &mut file);
    let footer = Footer {
        index_offset,
        top,
        entry_count: 4,
        data_blocks: 2,
        levels: 1,
        top_sha256: None,
    };
    file.extend_from_slice(&footer.encode());
    let size = file.len() as u64;
    let mut lazy = LazySnapshot::new(size, 1 << 20);
    let mut cursor = ScanCursor::new(b"", None, 100);
    let mut out = Vec::new();
    while let Some(need) = lazy.scan_step(&mut cursor, &mut out).unwrap() {
        match need {
            Need::Suffix(n) => lazy.feed_suffix(&file[(size - n) as usize..]).unwrap(),
            Need::Range { start, end } => lazy
                .feed_range(start, &file[start as usize..end as usize], &cursor.next)
                .unwrap(),
        }
    }
    let keys: Vec<&[u8]> = out.iter().map(|(k, _)| k.as_slice()).collect();
    assert_eq!(keys, [&b"a"[..], b"m", b"n"]);
    assert_eq!(read(&mut lazy, &file, b"z").unwrap().0, None);
}
