//! Argument handling of `walcast publish`: a size too large for a u64 is a
//! usage error (never a panic, never a wrapped value), and a flag that needs
//! another one is refused when that one is off, not accepted and ignored.
//!
//! Real processes: the `walcast` binary on a temporary WAL and dataset.

use crate::support;

use support::{file_url, p, run, Env};

fn wal_with_records(dir: &std::path::Path, n: usize) {
    let mut input = String::new();
    for i in 0..n {
        input.push_str(&format!(
            "{{\"op\":\"put\",\"key\":\"k{i}\",\"value\":\"v\"}}\n"
        ));
    }
    run(
        &["write", "--wal", p(dir)],
        &Env::new(),
        Some(input.as_bytes()),
    )
    .ok();
}

/// `walcast publish --once` of `wal` to `data` with `flags`.
fn publish_once(wal: &std::path::Path, data: &std::path::Path, flags: &[&str]) -> support::Out {
    let url = file_url(data);
    let mut args = vec!["publish", "--wal", p(wal), "--to", &url, "--once"];
    args.extend_from_slice(flags);
    run(&args, &Env::new(), None)
}

/// `--segment-bytes 17179869184GiB` is 2^64 bytes: `parse_size` multiplies
/// unchecked, which panics in an overflow-checked build (exit 101) and wraps
/// to 0 in a release build (accepted as a 0-byte segment size).
#[test]
fn a_size_above_u64_is_a_usage_error_not_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let (wal, data) = (tmp.path().join("wal"), tmp.path().join("data"));
    wal_with_records(&wal, 1);
    std::fs::create_dir_all(&data).unwrap();
    for flag in [
        "--segment-bytes",
        "--tail-bytes",
        "--snapshot-bytes",
        "--delta-bytes",
    ] {
        let out = publish_once(&wal, &data, &[flag, "17179869184GiB"]);
        assert_eq!(
            out.code,
            Some(2),
            "{flag} 17179869184GiB (2^64 bytes) must be a usage error: {}",
            out.describe()
        );
    }
}

/// `--snapshot-bytes` "needs --snapshot-every": with `--snapshot-every 0` it
/// is accepted and silently does nothing (so is `--retain`, which drops
/// history only behind a snapshot).
#[test]
fn snapshot_bytes_without_snapshots_is_not_silently_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let (wal, data) = (tmp.path().join("wal"), tmp.path().join("data"));
    wal_with_records(&wal, 20);
    std::fs::create_dir_all(&data).unwrap();
    let out = publish_once(
        &wal,
        &data,
        &["--snapshot-every", "0", "--snapshot-bytes", "1"],
    );
    if out.code == Some(0) {
        let head: serde_json::Value =
            serde_json::from_slice(&std::fs::read(data.join("catalog/head.json")).unwrap())
                .unwrap();
        assert!(
            !head["snapshot"].is_null(),
            "--snapshot-bytes 1 was accepted and ignored (no snapshot after 20 LSNs): {head}"
        );
    }
}

/// `walcast write` with a line that is not UTF-8 between good ones: the
/// lines before it are committed and acknowledged, and the error names the
/// line, as for a line of bad JSON.
#[test]
fn a_line_that_is_not_utf8_is_named_and_the_lines_before_it_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let wal = tmp.path().join("wal");
    let mut input = b"{\"op\":\"put\",\"key\":\"a\",\"value\":\"1\"}\n".to_vec();
    input.extend_from_slice(b"{\"op\":\"put\",\"key\":\"b\",\"value\":\"\xff\"}\n");
    input.extend_from_slice(b"{\"op\":\"put\",\"key\":\"c\",\"value\":\"3\"}\n");
    let out = run(&["write", "--wal", p(&wal)], &Env::new(), Some(&input));
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("line 2") && out.stderr.contains("UTF-8"),
        "{}",
        out.describe()
    );
    assert_eq!(out.stdout_str().trim(), "{\"lsn\":1}", "{}", out.describe());
}

/// `walcast demo --rate 0` is a usage error, not a demo quietly run at
/// one batch a second.
#[test]
fn a_demo_rate_of_zero_is_a_usage_error() {
    let out = run(
        &["demo", "--rate", "0", "--duration", "1s"],
        &Env::new(),
        None,
    );
    assert_eq!(out.code, Some(2), "{}", out.describe());
}
