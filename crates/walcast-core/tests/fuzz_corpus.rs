//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) and every input
//! that once crashed a fuzz target (`fuzz/crashers/<target>/`) through the
//! matching `walcast_core::fuzzing` entry point, so that an ordinary
//! `cargo test` catches regressions without cargo-fuzz or a nightly compiler.
//!
//! `cargo test -p walcast-core --test fuzz_corpus -- --ignored write_seed_corpus`
//! rewrites the seed files (named `seed-*`) from the real encoders.

#[path = "support/fixtures.rs"]
mod fixtures;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use walcast_core::batch::{self, Op};
use walcast_core::catalog::{DatasetId, Head, Page, FORMAT};
use walcast_core::fuzzing;
use walcast_core::segment::SegmentBuilder;
use walcast_core::snapshot;
use walcast_core::state::KvState;

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// Regular files of `dir` except dotfiles such as `.gitkeep`, sorted.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let rd = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{} must exist: {e}", dir.display()));
    let mut out: Vec<PathBuf> = rd
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.is_file()
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    out.sort();
    out
}

fn run_target(name: &str, f: fn(&[u8])) {
    let corpus = inputs(&fuzz_dir().join("corpus").join(name));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{name} must hold at least one input"
    );
    let crashers = inputs(&fuzz_dir().join("crashers").join(name));
    let mut failed = Vec::new();
    for path in corpus.iter().chain(&crashers) {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| f(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    println!(
        "fuzz target {name}: ran {} corpus inputs and {} crashers",
        corpus.len(),
        crashers.len()
    );
    assert!(
        failed.is_empty(),
        "fuzz target {name} panicked on: {failed:#?}"
    );
}

#[test]
fn corpus_segment() {
    run_target("segment", fuzzing::segment);
}

#[test]
fn corpus_batch() {
    run_target("batch", fuzzing::batch);
}

#[test]
fn corpus_snapshot() {
    run_target("snapshot", fuzzing::snapshot);
}

#[test]
fn corpus_indexed_snapshot() {
    run_target("indexed_snapshot", fuzzing::indexed_snapshot);
}

#[test]
fn corpus_head() {
    run_target("head", fuzzing::head);
}

#[test]
fn corpus_page() {
    run_target("page", fuzzing::page);
}

#[test]
fn corpus_delta() {
    run_target("delta", fuzzing::delta);
}

#[test]
fn corpus_pointer_delta() {
    run_target("pointer_delta", fuzzing::pointer_delta);
}

fn flip(mut b: Vec<u8>, at: usize) -> Vec<u8> {
    if !b.is_empty() {
        let i = at.min(b.len() - 1);
        b[i] ^= 0x01;
    }
    b
}

fn truncate(mut b: Vec<u8>, keep: usize) -> Vec<u8> {
    b.truncate(keep);
    b
}

/// Seed inputs per target: small valid encodings from the real encoders plus
/// hand-made edge cases (empty, truncated, flipped byte, trailing garbage).
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out: Vec<(&'static str, &'static str, Vec<u8>)> = Vec::new();

    // Segments.
    let one = {
        let mut b = SegmentBuilder::new(1, 1);
        assert!(b.push(b""));
        b.finish().expect("segment").0
    };
    let small = fixtures::build_segment(3, 10, 17, 32).0;
    let golden = fixtures::golden_segment().0;
    out.push(("segment", "one-empty-record", one.clone()));
    out.push(("segment", "small", small.clone()));
    out.push(("segment", "golden", golden.clone()));
    out.push(("segment", "empty", Vec::new()));
    out.push(("segment", "header-only", truncate(small.clone(), 32)));
    out.push(("segment", "truncated-71", truncate(small.clone(), 71)));
    out.push((
        "segment",
        "truncated-tail",
        truncate(small.clone(), small.len() - 1),
    ));
    out.push((
        "segment",
        "trailer-only",
        small[small.len() - 40..].to_vec(),
    ));
    out.push(("segment", "flipped-header", flip(small.clone(), 9)));
    out.push(("segment", "flipped-record", flip(small.clone(), 60)));
    out.push((
        "segment",
        "flipped-trailer",
        flip(small.clone(), small.len() - 30),
    ));
    out.push((
        "segment",
        "records-only",
        small[32..small.len() - 40].to_vec(),
    ));
    let mut extra = one.clone();
    extra.push(0);
    out.push(("segment", "trailing-byte", extra));

    // KV batches.
    let enc = |ops: &[Op]| batch::encode(ops).expect("batch");
    out.push(("batch", "empty-batch", enc(&[])));
    out.push(("batch", "golden", enc(&fixtures::golden_batch())));
    out.push((
        "batch",
        "one-put",
        enc(&[Op::put(b"k".to_vec(), b"v".to_vec())]),
    ));
    out.push(("batch", "one-delete", enc(&[Op::delete(Vec::new())])));
    out.push((
        "batch",
        "long-key",
        enc(&[Op::put(vec![b'x'; 200], vec![b'y'; 300])]),
    ));
    out.push(("batch", "empty", Vec::new()));
    out.push(("batch", "version-2", vec![2, 0]));
    out.push(("batch", "unknown-tag", vec![1, 1, 3, 0]));
    out.push(("batch", "non-minimal-varint", vec![1, 0x81, 0x00, 2, 0]));
    out.push((
        "batch",
        "overlong-varint",
        vec![
            1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
        ],
    ));
    out.push((
        "batch",
        "huge-count",
        vec![1, 0xff, 0xff, 0xff, 0xff, 0x0f, 2, 0],
    ));
    out.push(("batch", "trailing-byte", vec![1, 1, 2, 0, 0]));
    out.push((
        "batch",
        "truncated",
        truncate(enc(&fixtures::golden_batch()), 20),
    ));

    // Snapshots.
    let id = DatasetId([0x22; 16]);
    let empty_snap = snapshot::encode(&KvState::new(), 0, 0, id);
    let mut st = KvState::new();
    for i in 0u8..12 {
        st.put(&[b'k', i], &vec![i; usize::from(i)]);
    }
    let multi = snapshot::encode_with_chunk_bytes(&st, 12, 2, id, 16);
    let single = snapshot::encode(&st, 12, 2, id);
    out.push(("snapshot", "empty-state", empty_snap.clone()));
    out.push(("snapshot", "multi-chunk", multi.clone()));
    out.push(("snapshot", "single-chunk", single));
    out.push(("snapshot", "golden", fixtures::golden_snapshot()));
    out.push(("snapshot", "empty", Vec::new()));
    out.push(("snapshot", "header-only", truncate(multi.clone(), 56)));
    out.push((
        "snapshot",
        "truncated",
        truncate(multi.clone(), multi.len() - 1),
    ));
    out.push(("snapshot", "flipped-chunk", flip(multi.clone(), 80)));
    out.push((
        "snapshot",
        "flipped-trailer",
        flip(multi.clone(), multi.len() - 35),
    ));
    let mut extra = empty_snap.clone();
    extra.push(0);
    out.push(("snapshot", "trailing-byte", extra));

    // Block-indexed snapshots.
    use walcast_core::snapshot::indexed::{encode_indexed, IndexedOptions};
    let small = IndexedOptions {
        block_bytes: 32,
        index_block_bytes: 48,
    };
    let two_levels = encode_indexed(&st, 12, 2, id, small);
    let one_level = encode_indexed(&st, 12, 2, id, IndexedOptions::default());
    out.push((
        "indexed_snapshot",
        "empty-state",
        encode_indexed(&KvState::new(), 0, 0, id, small),
    ));
    out.push(("indexed_snapshot", "two-levels", two_levels.clone()));
    out.push(("indexed_snapshot", "one-level", one_level.clone()));
    out.push((
        "indexed_snapshot",
        "golden",
        fixtures::golden_indexed_snapshot(),
    ));
    out.push((
        "indexed_snapshot",
        "golden-v4",
        fixtures::golden_verified_snapshot(),
    ));
    {
        use walcast_core::snapshot::indexed::encode_verified;
        let v4 = encode_verified(&st, 12, 2, id, small);
        out.push((
            "indexed_snapshot",
            "v4-flipped-footer",
            flip(v4.clone(), v4.len() - 30),
        ));
        out.push(("indexed_snapshot", "v4-two-levels", v4));
    }
    out.push((
        "indexed_snapshot",
        "truncated",
        truncate(two_levels.clone(), two_levels.len() - 1),
    ));
    out.push((
        "indexed_snapshot",
        "flipped-block",
        flip(two_levels.clone(), 70),
    ));
    out.push((
        "indexed_snapshot",
        "flipped-footer",
        flip(two_levels.clone(), two_levels.len() - 30),
    ));

    // Catalog heads.
    let head = fixtures::golden_head();
    let full = head.encode();
    out.push((
        "head",
        "new",
        Head::new(DatasetId::from_seed(1), 1).encode(),
    ));
    out.push(("head", "golden", full.clone()));
    out.push(("head", "empty", Vec::new()));
    out.push(("head", "not-json", b"{\"format\": 1,".to_vec()));
    out.push((
        "head",
        "format-2",
        String::from_utf8_lossy(&full)
            .replacen("\"format\":1", "\"format\":2", 1)
            .into_bytes(),
    ));
    out.push((
        "head",
        "bad-dataset-id",
        String::from_utf8_lossy(&full)
            .replacen(&"11".repeat(16), &"1G".repeat(16), 1)
            .into_bytes(),
    ));
    out.push(("head", "truncated", truncate(full.clone(), full.len() / 2)));
    // Stored gzip-compressed: whole, and decoding past the 1 MiB bound.
    #[cfg(feature = "gzip")]
    {
        out.push(("head", "gzip", walcast_core::catalog::gzip_head(&full)));
        out.push(("head", "gzip-past-1mib", {
            let mut big = full.clone();
            big.resize(2 << 20, b' ');
            walcast_core::catalog::gzip_head(&big)
        }));
    }
    out.push(("head", "unknown-field", {
        let mut s = String::from_utf8_lossy(&full).into_owned();
        s.insert_str(1, "\"future\":[1,{\"x\":null}],");
        s.into_bytes()
    }));

    // Catalog pages.
    let page = fixtures::golden_page();
    let p0 = page.encode();
    let r0 = fixtures::golden_page_ref(&p0);
    let mut r0b = r0.clone();
    r0b.first_lsn = 100;
    r0b.last_lsn = 199;
    r0b.key = "catalog/pages/0-00000000000000000100-00000000000000000199-7.json".into();
    let p1 = Page {
        format: FORMAT,
        level: 1,
        segments: Vec::new(),
        pages: vec![r0, r0b],
        digests: Default::default(),
    }
    .encode();
    out.push(("page", "level-0", p0.clone()));
    out.push(("page", "level-1", p1));
    out.push(("page", "empty", Vec::new()));
    out.push((
        "page",
        "empty-level-0",
        b"{\"format\":1,\"level\":0}".to_vec(),
    ));
    out.push(("page", "truncated", truncate(p0.clone(), p0.len() - 1)));
    out.push(("page", "flipped", flip(p0, 20)));

    // Delta snapshots.
    use walcast_core::snapshot::delta::{encode_delta, DeltaMeta};
    let meta = DeltaMeta {
        base_lsn: 3,
        lsn: 9,
        epoch: 2,
        dataset_id: DatasetId::from_seed(4),
    };
    let changes: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..40u32)
        .map(|i| {
            let k = format!("k{i:03}").into_bytes();
            (k, (i % 4 != 0).then(|| vec![i as u8; 9]))
        })
        .collect();
    let enc = |block: usize| {
        encode_delta(
            changes.iter().map(|(k, v)| (k.as_slice(), v.as_deref())),
            meta,
            block,
        )
    };
    let small = enc(64);
    out.push(("delta", "small-blocks", small.clone()));
    out.push(("delta", "one-block", enc(1 << 16)));
    out.push((
        "delta",
        "empty",
        encode_delta(std::iter::empty::<(&[u8], Option<&[u8]>)>(), meta, 64),
    ));
    out.push(("delta", "golden", fixtures::golden_delta()));
    // Pointer deltas.
    let golden = fixtures::golden_pointer_delta();
    out.push(("pointer_delta", "golden", golden.clone()));
    out.push((
        "pointer_delta",
        "truncated",
        truncate(golden.clone(), golden.len() - 3),
    ));
    out.push(("pointer_delta", "flipped-page", flip(golden.clone(), 100)));
    out.push((
        "pointer_delta",
        "flipped-block",
        flip(golden.clone(), golden.len() - 90),
    ));
    out.push((
        "delta",
        "truncated",
        truncate(small.clone(), small.len() - 5),
    ));
    out.push(("delta", "flipped-block", flip(small.clone(), 70)));
    out.push((
        "delta",
        "flipped-filter",
        flip(small.clone(), small.len() - 70),
    ));
    out.push((
        "delta",
        "flipped-footer",
        flip(small.clone(), small.len() - 20),
    ));
    out
}

#[test]
#[ignore = "writes the seed corpus under fuzz/corpus; run by hand"]
fn write_seed_corpus() {
    // SEED_TARGET=<target> writes one target's seeds only.
    let only = std::env::var("SEED_TARGET").ok();
    for (target, name, bytes) in seeds() {
        if only.as_deref().is_some_and(|t| t != target) {
            continue;
        }
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).expect("create corpus dir");
        std::fs::write(dir.join(format!("seed-{name}")), &bytes).expect("write seed");
    }
}
