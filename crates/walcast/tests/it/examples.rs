//! The Rust examples, run as users run them: `examples/rust-origin` commits
//! and publishes page-view counters in one process into a `file://`
//! dataset; `examples/rust-replica` holds a replica of it in memory and
//! answers HTTP reads, in full and lazy mode, and follows a second run of
//! the origin (read-your-writes through /wait). Replicas over http(s)
//! take the same path (serve.rs runs them against `walcast serve`).
//!
//! The example binaries are built by `cargo test -p walcast` (examples are
//! test targets); `cargo build -p walcast --examples` builds them alone.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{http, Deadline, Proc};

/// `target/<profile>/examples/<name>`, beside this test's binary.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = dir.join("examples").join(name);
    assert!(
        bin.exists(),
        "{} is not built: run `cargo test -p walcast` (it builds the examples) or `cargo build -p walcast --examples`",
        bin.display()
    );
    bin
}

/// Runs rust-origin for `visits` visits; returns its stdout.
fn origin(wal: &Path, url: &str, visits: u64, logs: &Path) -> String {
    let mut cmd = Command::new(example("rust-origin"));
    cmd.args(["--wal", wal.to_str().unwrap(), "--to", url])
        .args(["--visits", &visits.to_string()]);
    let mut p = Proc::spawn("rust-origin", cmd, logs);
    let st = p
        .wait_timeout(Duration::from_secs(120))
        .unwrap_or_else(|| panic!("rust-origin did not finish\n{}", p.logs()));
    assert!(st.success(), "rust-origin failed: {st}\n{}", p.logs());
    p.stdout()
}

/// Starts rust-replica on `url`; returns it and its host:port.
fn replica(url: &str, extra: &[&str], logs: &Path) -> (Proc, String) {
    let mut cmd = Command::new(example("rust-replica"));
    cmd.args([url, "--addr", "127.0.0.1:0"]).args(extra);
    let mut p = Proc::spawn("rust-replica", cmd, logs);
    let deadline = Deadline::after(Duration::from_secs(60), "rust-replica start");
    loop {
        let out = p.stdout();
        if let Some(addr) = out
            .lines()
            .find_map(|l| l.strip_prefix("listening on http://"))
        {
            let addr = addr.trim().to_string();
            return (p, addr);
        }
        if let Some(st) = p.try_status() {
            panic!("rust-replica exited: {st}\n{}", p.logs());
        }
        if deadline.passed() {
            panic!("rust-replica did not start\n{}", p.logs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn get(addr: &str, path: &str) -> (u16, String) {
    let (status, body) = http("GET", addr, path, b"").unwrap();
    (status, String::from_utf8(body).unwrap())
}

#[test]
fn rust_origin_publishes_and_rust_replica_serves_reads() {
    if support::skip("rust_origin_publishes_and_rust_replica_serves_reads") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs");
    let wal = tmp.path().join("wal");
    let ds = tmp.path().join("ds");
    let url = support::file_url(&ds);

    // 40 visits, one batch each: the last lines report LSN 40 committed.
    let out = origin(&wal, &url, 40, &logs);
    let last = out.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["committed_lsn"], 40, "{out}");
    assert!(
        out.lines().any(|l| l == "{\"committed\":40}"),
        "the commit of LSN 40 is reported: {out}"
    );

    for extra in [&[][..], &["--lazy", "65536"][..]] {
        let (mut p, addr) = replica(&url, extra, &logs);
        let (code, body) = get(&addr, "/status");
        assert_eq!(code, 200, "{body}");
        let st: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(st["applied_lsn"], 40, "{body}");
        assert_eq!(get(&addr, "/get/views:home"), (200, "10".into()));
        assert_eq!(get(&addr, "/get/last_visit"), (200, "blog #40".into()));
        assert_eq!(get(&addr, "/get/nothing").0, 404);
        let (code, body) = get(&addr, "/scan?prefix=views:&limit=10");
        assert_eq!(code, 200);
        let keys: Vec<String> = body
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["key"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(
            keys,
            ["views:blog", "views:docs", "views:home", "views:pricing"],
            "{body}"
        );
        p.kill9();
    }

    // A replica that follows a second run of the origin: /wait resolves
    // once the new LSN is applied, and the counters went on from the WAL's.
    let (mut p, addr) = replica(&url, &[], &logs);
    let out = origin(&wal, &url, 3, &logs);
    assert!(out.contains("\"committed_lsn\":43"), "{out}");
    let (code, body) = get(&addr, "/wait?lsn=43");
    assert_eq!(code, 200, "{body}\n{}", p.logs());
    assert_eq!(get(&addr, "/get/last_visit"), (200, "docs #43".into()));
    assert_eq!(get(&addr, "/get/views:home"), (200, "11".into()));
    assert_eq!(get(&addr, "/get/views:blog"), (200, "10".into()));
    assert_eq!(get(&addr, "/wait?lsn=x").0, 400);
    p.kill9();
}
