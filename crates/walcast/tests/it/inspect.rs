//! `walcast inspect` over a wide and deep page tree: every page is read and
//! every segment counted, in LSN order, and the memory it takes does not
//! grow with the number of pages or segments (it walks the pages one at a
//! time, holding the references still to read).
//!
//! The datasets are catalogs built here, written to a `file://` directory:
//! a head naming a tree of pages, and a few inline segments. Their segment
//! files are not written (inspect without `--verify` reads none).

use std::path::Path;
use std::time::Duration;

use walcast_core::catalog::{
    page_key, segment_key, DatasetId, Head, Page, PageRef, SegmentEntry, FORMAT, HEAD_KEY,
};
use walcast_core::segment::{IndexEntry, HEADER_LEN};

use crate::support;

use support::{file_url, run_watched, Env};

/// A catalog entry for a one-LSN segment.
fn segment(lsn: u64) -> SegmentEntry {
    SegmentEntry {
        key: segment_key(1, lsn, lsn),
        epoch: 1,
        first_lsn: lsn,
        last_lsn: lsn,
        size: 100,
        crc32: 0,
        records_end: HEADER_LEN + 40,
        index: vec![IndexEntry {
            lsn,
            offset: HEADER_LEN,
        }],
        filter: None,
    }
}

/// The shape of a catalog: a head naming `fanout` pages of level
/// `levels - 1`, each page above level 0 naming `fanout` pages of the level
/// below, each level-0 page naming `per_page` segments; then `inline`
/// segments in the head.
struct Shape {
    fanout: usize,
    levels: u32,
    per_page: usize,
    inline: usize,
}

impl Shape {
    fn pages(&self) -> usize {
        (1..=self.levels).map(|l| self.fanout.pow(l)).sum()
    }

    fn segments(&self) -> usize {
        self.fanout.pow(self.levels) * self.per_page + self.inline
    }
}

/// Writes the page of `level` holding the next LSNs from `*next` under
/// `dir`, and the pages below it; returns its reference.
fn write_page(dir: &Path, shape: &Shape, level: u32, next: &mut u64) -> PageRef {
    let first = *next;
    let (segments, pages) = if level == 0 {
        let segments: Vec<SegmentEntry> = (0..shape.per_page)
            .map(|_| {
                *next += 1;
                segment(*next - 1)
            })
            .collect();
        (segments, Vec::new())
    } else {
        let pages: Vec<PageRef> = (0..shape.fanout)
            .map(|_| write_page(dir, shape, level - 1, next))
            .collect();
        (Vec::new(), pages)
    };
    let count = segments.len().max(pages.len()) as u32;
    let page = Page {
        format: FORMAT,
        level,
        segments,
        pages,
        digests: Default::default(),
    };
    let bytes = page.encode();
    let r = PageRef {
        key: page_key(level, first, *next - 1, 1),
        level,
        first_lsn: first,
        last_lsn: *next - 1,
        count,
        crc32: crc32fast::hash(&bytes),
    };
    let path = dir.join(&r.key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    r
}

/// Writes a dataset of `shape` to `dir`.
fn write_dataset(dir: &Path, shape: &Shape) {
    let mut next = 1;
    let mut head = Head::new(DatasetId([7; 16]), 1);
    head.pages = (0..shape.fanout)
        .map(|_| write_page(dir, shape, shape.levels - 1, &mut next))
        .collect();
    head.segments = (0..shape.inline)
        .map(|_| {
            next += 1;
            segment(next - 1)
        })
        .collect();
    head.committed_lsn = next - 1;
    let path = dir.join(HEAD_KEY);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, head.encode()).unwrap();
}

/// A dataset of `shape` in a new temporary directory, with its URL.
fn written(shape: &Shape) -> (tempfile::TempDir, String) {
    let tmp = tempfile::tempdir().unwrap();
    write_dataset(tmp.path(), shape);
    let url = file_url(tmp.path());
    (tmp, url)
}

/// `walcast inspect --json` of a dataset of `shape`: its report, checked
/// against the shape, and its peak memory in KiB.
fn inspect(shape: &Shape) -> u64 {
    let (_tmp, url) = written(shape);
    let w = run_watched(
        "inspect",
        &["inspect", &url, "--json"],
        &Env::new(),
        1024,
        Duration::from_secs(120),
    );
    assert_eq!(w.code, Some(0), "{}", w.logs);
    let v: serde_json::Value = serde_json::from_str(&w.stdout).expect("inspect --json");
    let segments = shape.segments() as u64;
    assert_eq!(v["segments"], segments, "{v}");
    assert_eq!(v["inline_segments"], shape.inline as u64, "{v}");
    assert_eq!(v["pages"], shape.pages() as u64, "{v}");
    assert_eq!(v["segment_bytes"], 100 * segments, "{v}");
    assert_eq!(v["committed_lsn"], segments, "{v}");
    assert_eq!(v["gaps"], serde_json::json!([]), "{v}");
    eprintln!(
        "inspect: {} pages, {segments} segments: peak RSS {} MiB in {:?}",
        shape.pages(),
        w.hwm_kib >> 10,
        w.elapsed
    );
    w.hwm_kib
}

/// A tree of three levels and fanout 8: 584 pages of up to 500 segments,
/// 256,000 segments in all. Inspect reports every page and segment, with
/// no gap, and holds one page at a time: its peak memory stays near that
/// of the process itself (about 10 MiB), where holding every segment entry
/// takes some 80 MiB.
#[test]
fn a_wide_and_deep_page_tree_is_walked_whole_in_bounded_memory() {
    let hwm_kib = inspect(&Shape {
        fanout: 8,
        levels: 3,
        per_page: 500,
        inline: 5,
    });
    assert!(hwm_kib > 0, "no memory sample of walcast inspect");
    assert!(
        hwm_kib < 40 << 10,
        "inspect of 584 pages took {} MiB: its memory grows with the catalog",
        hwm_kib >> 10
    );
}

/// The text report of a multi-level tree: the counts, the coverage and the
/// newest 20 segments, the older ones summed up.
#[test]
fn the_text_report_of_a_page_tree_counts_every_segment_and_shows_the_newest() {
    let shape = Shape {
        fanout: 3,
        levels: 2,
        per_page: 4,
        inline: 2,
    };
    let (_tmp, url) = written(&shape);
    let out = support::run(&["inspect", &url], &Env::new(), None).ok();
    let text = out.stdout_str();
    assert!(
        text.contains("segments     38 (2 inline, 36 in 12 pages), 3800 bytes"),
        "{text}"
    );
    assert!(
        text.contains("coverage     LSN 1..=38  (no gaps)"),
        "{text}"
    );
    assert!(text.contains("(… 18 older segments)"), "{text}");
    let listed: Vec<&str> = text.lines().filter(|l| l.ends_with(".wseg")).collect();
    assert_eq!(listed.len(), 20, "{text}");
    assert!(listed[0].contains(&segment_key(1, 19, 19)), "{text}");
    assert!(listed[19].contains(&segment_key(1, 38, 38)), "{text}");
}

/// `inspect --verify` of a catalog whose segment files are all missing:
/// every one fails, the report lists the first 1,000 failures and counts
/// the rest (what it holds of them does not grow with the catalog), and
/// the exit says how many failed.
#[test]
fn verify_lists_the_first_failures_and_counts_the_rest() {
    let shape = Shape {
        fanout: 4,
        levels: 2,
        per_page: 80,
        inline: 3,
    };
    let (_tmp, url) = written(&shape);
    let total = shape.segments();
    assert!(total > 1000);
    let out = support::run(&["inspect", &url, "--verify", "--json"], &Env::new(), None);
    assert_ne!(out.code, Some(0), "{}", out.describe());
    let v: serde_json::Value =
        serde_json::from_str(out.stdout_str().trim()).expect("inspect --json");
    let listed = v["failures"].as_array().expect("failures").len();
    assert_eq!(listed, 1000, "{v}");
    assert_eq!(v["failures_unlisted"], (total - 1000) as u64, "{v}");
    assert!(
        out.stderr.contains(&format!("… and {} more", total - 1000)),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr
            .contains(&format!("{total} objects failed verification")),
        "{}",
        out.describe()
    );
}
