//! Argument handling of `walcast publish`: a size too large for a u64 is a
//! usage error (never a panic, never a wrapped value), and a flag that needs
//! another one is refused when that one is off, not accepted and ignored.
//! Input handling of `walcast write`: a line that is not UTF-8 or longer
//! than 128 MiB is named, after the lines before it are committed.
//!
//! Real processes: the `walcast` binary on a temporary WAL and dataset.

use crate::support;

use std::io::{Read as _, Write as _};
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{file_url, p, run, vm_hwm_kib, walcast_cmd, Env};

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
    let mut bad = b"{\"op\":\"put\",\"key\":\"b\",\"value\":\"\xff\"}\n".to_vec();
    bad.extend_from_slice(b"{\"op\":\"put\",\"key\":\"c\",\"value\":\"3\"}\n");
    line_2_is_refused_and_line_1_committed(&bad, "UTF-8");
}

/// Writes a good line and then `rest` with `walcast write`: exit 1, an
/// error naming line 2 and saying `why`, and line 1 committed alone.
fn line_2_is_refused_and_line_1_committed(rest: &[u8], why: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let wal = tmp.path().join("wal");
    let mut input = b"{\"op\":\"put\",\"key\":\"a\",\"value\":\"1\"}\n".to_vec();
    input.extend_from_slice(rest);
    let out = run(&["write", "--wal", p(&wal)], &Env::new(), Some(&input));
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("line 2") && out.stderr.contains(why),
        "{}",
        out.describe()
    );
    assert_eq!(out.stdout_str().trim(), "{\"lsn\":1}", "{}", out.describe());
}

/// `walcast write` with a good line, then one whose batch (two values of
/// 40 MiB) is larger than a record may hold though the line is within the
/// line limit: the error names line 2, and line 1 is committed (the group
/// it was read with was refused whole before).
#[test]
fn a_batch_larger_than_a_record_is_named_and_the_lines_before_it_committed() {
    let big = "v".repeat(40 << 20);
    let line = format!("{{\"batch\":[{{\"op\":\"put\",\"key\":\"x\",\"value\":\"{big}\"}},{{\"op\":\"put\",\"key\":\"y\",\"value\":\"{big}\"}}]}}\n");
    line_2_is_refused_and_line_1_committed(line.as_bytes(), "a record may hold");
}

/// The longest line `walcast write` takes (its MAX_LINE_BYTES).
const MAX_LINE_BYTES: usize = 128 << 20;

/// `walcast write` with a good line, then one of 192 MiB (128 MiB + 64
/// MiB), then another good line: the error names line 2 as longer than the
/// limit, line 1 is committed (and published: a read of the dataset finds
/// it), nothing after it is, and the writer reads no more of the long line
/// than the limit, so its memory stays near 128 MiB, not the line's 192.
#[test]
fn a_line_over_128_mib_is_named_and_the_lines_before_it_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let (wal, data) = (tmp.path().join("wal"), tmp.path().join("data"));
    let mut cmd = walcast_cmd(&["write", "--wal", p(&wal)], &Env::new());
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Owns the child so that a failed assertion still kills it.
    struct Guard(std::process::Child);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut g = Guard(cmd.spawn().expect("spawn walcast write"));
    let pid = g.0.id();
    let mut stdin = g.0.stdin.take().unwrap();
    // The long line is streamed a MiB at a time; a broken pipe (the writer
    // stopped reading) ends it.
    let feeder = std::thread::spawn(move || -> std::io::Result<()> {
        stdin.write_all(b"{\"op\":\"put\",\"key\":\"a\",\"value\":\"1\"}\n")?;
        stdin.write_all(b"{\"op\":\"put\",\"key\":\"big\",\"value\":\"")?;
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..(MAX_LINE_BYTES + (64 << 20)) / chunk.len() {
            stdin.write_all(&chunk)?;
        }
        stdin.write_all(b"\"}\n{\"op\":\"put\",\"key\":\"c\",\"value\":\"3\"}\n")
    });
    let mut so = g.0.stdout.take().unwrap();
    let mut se = g.0.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    // Its peak memory, sampled until it exits; past 512 MiB it is stopped.
    let start = Instant::now();
    let mut hwm_kib = 0;
    let status = loop {
        if let Some(k) = vm_hwm_kib(pid) {
            hwm_kib = hwm_kib.max(k);
        }
        if let Some(st) = g.0.try_wait().expect("try_wait") {
            break st;
        }
        assert!(
            hwm_kib < 512 << 10 && start.elapsed() < Duration::from_secs(120),
            "walcast write stopped: peak RSS {} MiB after {:?}",
            hwm_kib >> 10,
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    let _ = feeder.join();
    let (stdout, stderr) = (out_t.join().unwrap(), err_t.join().unwrap());
    let describe = format!(
        "{status} after {:?}, peak RSS {} MiB\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        start.elapsed(),
        hwm_kib >> 10
    );
    eprintln!(
        "walcast write: {status} after {:?}, peak RSS {} MiB",
        start.elapsed(),
        hwm_kib >> 10
    );
    assert_eq!(status.code(), Some(1), "{describe}");
    assert!(
        stderr.contains("line 2")
            && stderr.contains(&format!("longer than {MAX_LINE_BYTES} bytes")),
        "{describe}"
    );
    assert_eq!(stdout.trim(), "{\"lsn\":1}", "{describe}");
    assert!(hwm_kib > 0, "no memory sample of walcast write: {describe}");
    assert!(
        hwm_kib < ((MAX_LINE_BYTES as u64) >> 10) + (40 << 10),
        "walcast write held far more than the 128 MiB it may read of a line: {describe}"
    );
    // What was committed is line 1 alone.
    std::fs::create_dir_all(&data).unwrap();
    publish_once(&wal, &data, &[]).ok();
    let scan = run(&["scan", "--from", &file_url(&data)], &Env::new(), None).ok();
    let rows: Vec<serde_json::Value> = scan
        .stdout_str()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{}", scan.describe());
    assert_eq!(rows[0]["key"], "a", "{}", scan.describe());
    assert_eq!(rows[0]["value"], "1", "{}", scan.describe());
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

/// `--head-encoding` takes `json` or `gzip`: anything else is a usage
/// error naming the choices, and nothing is published.
#[test]
fn an_unknown_head_encoding_is_a_usage_error_naming_the_choices() {
    let tmp = tempfile::tempdir().unwrap();
    let (wal, data) = (tmp.path().join("wal"), tmp.path().join("data"));
    wal_with_records(&wal, 1);
    std::fs::create_dir_all(&data).unwrap();
    for bad in ["zstd", "GZIP ", ""] {
        let out = publish_once(&wal, &data, &["--head-encoding", bad]);
        assert_eq!(out.code, Some(2), "{bad:?}: {}", out.describe());
        assert!(
            out.stderr.contains("--head-encoding") && out.stderr.contains("json, gzip"),
            "{bad:?}: {}",
            out.describe()
        );
    }
    assert_eq!(
        std::fs::read_dir(&data).unwrap().count(),
        0,
        "published anyway"
    );
}

/// A key that is not UTF-8 text (written with `key_b64`) is read with
/// `get --key-b64`, from a replica directory and lazily from the dataset;
/// a key given both ways is a usage error.
#[test]
fn a_binary_key_is_read_with_key_b64() {
    let tmp = tempfile::tempdir().unwrap();
    let (wal, data, local) = (
        tmp.path().join("wal"),
        tmp.path().join("data"),
        tmp.path().join("replica"),
    );
    let line = br#"{"op":"put","key_b64":"AAH/","value_b64":"/w=="}"#;
    run(&["write", "--wal", p(&wal)], &Env::new(), Some(line)).ok();
    publish_once(&wal, &data, &[]).ok();
    let url = file_url(&data);
    run(
        &["replicate", &url, "--local", p(&local), "--once"],
        &Env::new(),
        None,
    )
    .ok();
    for from in [&["--local", p(&local)][..], &["--from", &url]] {
        let mut args = vec!["get"];
        args.extend_from_slice(from);
        args.extend(["--key-b64", "AAH/"]);
        let out = run(&args, &Env::new(), None).ok();
        assert_eq!(out.stdout, vec![0xff], "{}", out.describe());
        let mut args = vec!["get"];
        args.extend_from_slice(from);
        args.extend(["--key-b64", "AAE="]);
        let out = run(&args, &Env::new(), None).code(1);
        assert!(
            out.stderr.contains("not found: (base64) AAE="),
            "{}",
            out.describe()
        );
    }
    run(
        &["get", "--local", p(&local), "k", "--key-b64", "AAE="],
        &Env::new(),
        None,
    )
    .code(2);
}
